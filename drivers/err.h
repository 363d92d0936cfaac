/* ferry error reporting: every fallible function returns 0 or a negative errno
 * and fills a struct ferry_err with a message that names what went wrong. */
#ifndef FERRY_ERR_H
#define FERRY_ERR_H

#include <stddef.h>

#define FERRY_ERR_MSG_MAX 512

struct ferry_err {
	int code;                     /* positive errno of the first failure */
	char msg[FERRY_ERR_MSG_MAX];  /* human readable, no trailing newline */
};

/* Record an error (if err is non-NULL and still empty) and return -code. */
int ferry_err_set(struct ferry_err *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Prefix the existing message with context ("while X: <old message>"). */
int ferry_err_prefix(struct ferry_err *err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

void ferry_err_clear(struct ferry_err *err);

#endif
