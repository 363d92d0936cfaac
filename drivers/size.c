#include "size.h"

#include <errno.h>
#include <stdlib.h>

int ferry_parse_size(const char *s, unsigned long long min, unsigned long long max,
		     unsigned long long *out, struct ferry_err *err)
{
	if (!s || *s < '0' || *s > '9')  /* strtoull would take spaces, '+' and '-' */
		return ferry_err_set(err, EINVAL, "'%s' is not a size: it must start with a digit", s ? s : "(null)");
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	unsigned shift = 0;
	switch (*end) {
	case 'K': case 'k': shift = 10; end++; break;
	case 'M': case 'm': shift = 20; end++; break;
	case 'G': case 'g': shift = 30; end++; break;
	default: break;
	}
	if (*end)
		return ferry_err_set(err, EINVAL, "'%s' is not a size: unexpected '%s' (suffixes K, M, G)", s, end);
	if (errno || v > ~0ull >> shift)
		return ferry_err_set(err, EINVAL, "'%s' is not a size: too large", s);
	v <<= shift;
	if (v < min || v > max)
		return ferry_err_set(err, EINVAL, "'%s' is out of range %llu..%llu", s, min, max);
	*out = v;
	return 0;
}
