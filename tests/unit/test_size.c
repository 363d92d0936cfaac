/* ferry_parse_size: the forms users type for sizes and rates, and every
 * rejection names the input. */
#include <errno.h>
#include <string.h>

#include "check.h"
#include "drivers/size.h"

#define ANY 0, ~0ull

static void good(const char *s, unsigned long long min, unsigned long long max, unsigned long long want)
{
	struct ferry_err err = { 0 };
	unsigned long long v = 12345;
	int rc = ferry_parse_size(s, min, max, &v, &err);
	CHECK(rc == 0 && v == want, "'%s' parses to %llu (got rc %d, %llu: %s)", s, want, rc, v, err.msg);
}

static void bad(const char *s, unsigned long long min, unsigned long long max, const char *why)
{
	struct ferry_err err = { 0 };
	unsigned long long v = 12345;
	int rc = ferry_parse_size(s, min, max, &v, &err);
	char quoted[64];
	snprintf(quoted, sizeof(quoted), "'%s'", s);
	CHECK(rc == -EINVAL && v == 12345, "'%s' is rejected and *out untouched (rc %d)", s, rc);
	CHECK_MSG(err, quoted, "message names '%s': %s", s, err.msg);
	CHECK_MSG(err, why, "message for '%s' says '%s': %s", s, why, err.msg);
}

int main(void)
{
	good("0", ANY, 0);
	good("1", ANY, 1);
	good("4096", ANY, 4096);
	good("4k", ANY, 4096);
	good("4K", ANY, 4096);
	good("3m", ANY, 3ull << 20);
	good("3M", ANY, 3ull << 20);
	good("2g", ANY, 2ull << 30);
	good("2G", ANY, 2ull << 30);
	good("18446744073709551615", ANY, ~0ull);
	good("17179869183G", ANY, 17179869183ull << 30);  /* the largest G that fits */
	good("1M", 1ull << 20, 1ull << 50, 1ull << 20);     /* both ends inclusive */
	good("1048576G", 1ull << 20, 1ull << 50, 1ull << 50);

	bad("", ANY, "start with a digit");
	bad("-1", ANY, "start with a digit");
	bad("+1", ANY, "start with a digit");
	bad(" 1", ANY, "start with a digit");
	bad("fast", ANY, "start with a digit");
	bad("5T", ANY, "unexpected 'T'");
	bad("5KB", ANY, "unexpected 'B'");
	bad("1.5G", ANY, "unexpected '.5G'");
	bad("1 K", ANY, "unexpected ' K'");
	bad("18446744073709551616", ANY, "too large");
	bad("17179869184G", ANY, "too large");
	bad("64K", 1ull << 20, 1ull << 50, "out of range");
	bad("0", 1, ~0ull, "out of range");
	bad("1048577G", 1ull << 20, 1ull << 50, "out of range");

	struct ferry_err err = { 0 };
	unsigned long long v;
	CHECK(ferry_parse_size(NULL, ANY, &v, &err) == -EINVAL, "NULL is rejected, not a crash");
	CHECK(ferry_parse_size("1", ANY, &v, NULL) == 0 && v == 1, "err may be NULL");
	CHECK(ferry_parse_size("x", ANY, &v, NULL) == -EINVAL, "err may be NULL on failure");
	CHECK_DONE();
}
