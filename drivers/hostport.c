#include "hostport.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* Decimal digits only (strtoul would take spaces and signs), at most 65535. */
static int parse_port(const char *s, size_t len, const char *whole, unsigned min, uint16_t *out,
		      struct ferry_err *err)
{
	unsigned long v = 0;
	size_t i = 0;
	for (; i < len && s[i] >= '0' && s[i] <= '9' && v <= 65535; i++)
		v = v * 10 + (unsigned long)(s[i] - '0');
	if (len == 0 || i < len || v < min || v > 65535)
		return ferry_err_set(err, EINVAL, "'%s': port '%.*s' is not a number from %u to 65535", whole, (int)len,
				     s, min);
	*out = (uint16_t)v;
	return 0;
}

int ferry_parse_hostport(const char *s, unsigned flags, struct ferry_hostport *out, struct ferry_err *err)
{
	if (!s || !*s)
		return ferry_err_set(err, EINVAL, "'%s' is not HOST:PORT: it is empty", s ? s : "(null)");
	const char *host = s, *colon;
	size_t hl;
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');
		if (!rb)
			return ferry_err_set(err, EINVAL, "'%s' is not [HOST]:PORT: '[' without ']'", s);
		if (rb[1] != ':')
			return ferry_err_set(err, EINVAL, "'%s' is not [HOST]:PORT: %s after ']'", s,
					     rb[1] ? "unexpected text" : "no port");
		host = s + 1;
		hl = (size_t)(rb - host);
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return ferry_err_set(err, EINVAL, "'%s' is not HOST:PORT: no port", s);
		hl = (size_t)(colon - s);
	}
	if (!colon[1])
		return ferry_err_set(err, EINVAL, "'%s' is not HOST:PORT: no port after ':'", s);
	if (hl == 0 && !(flags & FERRY_HP_ANY_HOST))
		return ferry_err_set(err, EINVAL, "'%s' is not HOST:PORT: no host", s);
	if (hl >= FERRY_HOST_MAX)
		return ferry_err_set(err, ENAMETOOLONG, "'%s': the host is longer than %d characters", s,
				     FERRY_HOST_MAX - 1);
	const char *ports = colon + 1, *dash = (flags & FERRY_HP_RANGE) ? strchr(ports, '-') : NULL;
	size_t fl = dash ? (size_t)(dash - ports) : strlen(ports);
	unsigned min = (flags & FERRY_HP_PORT0) ? 0 : 1;
	uint16_t first, last;
	int rc;
	if ((rc = parse_port(ports, fl, s, min, &first, err)))
		return rc;
	last = first;
	if (dash && (rc = parse_port(dash + 1, strlen(dash + 1), s, min, &last, err)))
		return rc;
	if (last < first)
		return ferry_err_set(err, EINVAL, "'%s': the port range ends before it starts", s);
	memcpy(out->host, host, hl);
	out->host[hl] = '\0';
	snprintf(out->port, sizeof(out->port), "%u", (unsigned)first);
	out->first = first;
	out->last = last;
	return 0;
}
