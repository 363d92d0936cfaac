/* ferry host:port parsing: one reading of "HOST:PORT" and "[IPV6]:PORT" for
 * every address users and peers give (driver endpoints and bind options, the
 * control connection, ferryd --listen), so they accept the same forms and
 * say the same about what is wrong. */
#ifndef FERRY_HOSTPORT_H
#define FERRY_HOSTPORT_H

#include <stdint.h>

#include "err.h"

#define FERRY_HOST_MAX 256

struct ferry_hostport {
	char host[FERRY_HOST_MAX]; /* without brackets: "::1" */
	char port[6];              /* the first port as decimal text, for getaddrinfo */
	uint16_t first, last;      /* the port; with FERRY_HP_RANGE the range's ends (else last == first) */
};

enum {
	FERRY_HP_PORT0 = 1,    /* port 0 (any free port: a bind address) is allowed */
	FERRY_HP_RANGE = 2,    /* "HOST:FIRST-LAST" is allowed too */
	FERRY_HP_ANY_HOST = 4, /* an empty host (":PORT": every address) is allowed */
};

/* Parse s, "HOST:PORT" or "[HOST]:PORT" (the port after the last ':', so an
 * unbracketed IPv6 host still parses), into *out. The port is decimal digits,
 * 1 to 65535 (0 too with FERRY_HP_PORT0). Returns 0, or -EINVAL (err names s
 * and what is wrong: no port, no host, a '[' without ']', something after
 * ']', a bad port) or -ENAMETOOLONG (host of FERRY_HOST_MAX or more).
 * *out is only written on success. */
int ferry_parse_hostport(const char *s, unsigned flags, struct ferry_hostport *out, struct ferry_err *err);

#endif
