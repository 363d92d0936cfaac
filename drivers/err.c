#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ferry_err_set(struct ferry_err *err, int code, const char *fmt, ...)
{
	if (code < 0)
		code = -code;
	if (code == 0)
		code = EIO;
	if (err && err->code == 0) {
		va_list ap;
		err->code = code;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
	}
	return -code;
}

int ferry_err_prefix(struct ferry_err *err, const char *fmt, ...)
{
	char joined[FERRY_ERR_MSG_MAX];
	va_list ap;

	if (!err)
		return -EIO;
	va_start(ap, fmt);
	int n = vsnprintf(joined, sizeof(joined), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	size_t used = (size_t)n < sizeof(joined) - 1 ? (size_t)n : sizeof(joined) - 1;
	/* Append ": <old message>" as far as it fits; the cause is kept whole
	 * whenever the prefix leaves room for it. */
	const char *sep = ": ";
	for (const char *p = sep; *p && used < sizeof(joined) - 1; p++)
		joined[used++] = *p;
	size_t old = strnlen(err->msg, sizeof(err->msg));
	size_t room = sizeof(joined) - 1 - used;
	if (old > room)
		old = room;
	memcpy(joined + used, err->msg, old);
	joined[used + old] = '\0';
	memcpy(err->msg, joined, sizeof(err->msg));
	return -(err->code ? err->code : EIO);
}

void ferry_err_clear(struct ferry_err *err)
{
	if (err) {
		err->code = 0;
		err->msg[0] = '\0';
	}
}
