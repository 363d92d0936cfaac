/* ferry size parsing: one parser for the byte counts and rates users type
 * (ferryctl --max-bandwidth, ferry-perf --bytes), so they accept the same forms. */
#ifndef FERRY_SIZE_H
#define FERRY_SIZE_H

#include "err.h"

/* Parse s as decimal digits with an optional K, M or G suffix (binary,
 * either case) into *out. Returns 0, or -EINVAL (err names s and why) when s
 * is empty, signed, has other characters, overflows, or lies outside
 * [min, max]. *out is only written on success. */
int ferry_parse_size(const char *s, unsigned long long min, unsigned long long max,
		     unsigned long long *out, struct ferry_err *err);

#endif
