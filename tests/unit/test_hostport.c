/* ferry_parse_hostport: the address forms users and peers give, and every
 * rejection names the input and what is wrong with it. */
#include <errno.h>
#include <string.h>

#include "check.h"
#include "drivers/hostport.h"

static void good(const char *s, unsigned flags, const char *host, unsigned first, unsigned last)
{
	struct ferry_err err = { 0 };
	struct ferry_hostport hp;
	memset(&hp, 0x5a, sizeof(hp));
	int rc = ferry_parse_hostport(s, flags, &hp, &err);
	char port[8];
	snprintf(port, sizeof(port), "%u", first);
	CHECK(rc == 0 && strcmp(hp.host, host) == 0 && hp.first == first && hp.last == last &&
		      strcmp(hp.port, port) == 0,
	      "'%s' is host '%s' ports %u-%u (rc %d: %s)", s, host, first, last, rc, err.msg);
}

static void bad(const char *s, unsigned flags, int want, const char *why)
{
	struct ferry_err err = { 0 };
	struct ferry_hostport hp, before;
	memset(&hp, 0x5a, sizeof(hp));
	before = hp;
	int rc = ferry_parse_hostport(s, flags, &hp, &err);
	char quoted[300];
	snprintf(quoted, sizeof(quoted), "'%s'", s ? s : "(null)");
	CHECK(rc == want && memcmp(&hp, &before, sizeof(hp)) == 0, "'%s' is rejected, *out untouched (rc %d)",
	      s ? s : "(null)", rc);
	CHECK_MSG(err, quoted, "message names '%s': %s", s ? s : "(null)", err.msg);
	CHECK_MSG(err, why, "message for '%s' says '%s': %s", s ? s : "(null)", why, err.msg);
}

int main(void)
{
	static const struct {
		const char *s;
		unsigned flags;
		const char *host;
		unsigned first, last;
	} goods[] = {
		{ "127.0.0.1:7470", 0, "127.0.0.1", 7470, 7470 },
		{ "localhost:1", 0, "localhost", 1, 1 },
		{ "h:65535", 0, "h", 65535, 65535 },
		{ "[::1]:5", 0, "::1", 5, 5 },
		{ "[fe80::1%eth0]:7471", 0, "fe80::1%eth0", 7471, 7471 },
		{ "::1:5", 0, "::1", 5, 5 }, /* unbracketed IPv6: the port is after the last ':' */
		{ "127.0.0.1:0", FERRY_HP_PORT0, "127.0.0.1", 0, 0 },
		{ "[::]:0", FERRY_HP_PORT0, "::", 0, 0 },
		{ ":7470", FERRY_HP_ANY_HOST, "", 7470, 7470 },
		{ "10.0.0.1:5000-5003", FERRY_HP_RANGE, "10.0.0.1", 5000, 5003 },
		{ "[::1]:5000-5000", FERRY_HP_RANGE, "::1", 5000, 5000 },
		{ "10.0.0.1:5000", FERRY_HP_RANGE, "10.0.0.1", 5000, 5000 },
	};
	for (size_t i = 0; i < sizeof(goods) / sizeof(goods[0]); i++)
		good(goods[i].s, goods[i].flags, goods[i].host, goods[i].first, goods[i].last);
	static const struct {
		const char *s;
		unsigned flags;
		int want;
		const char *why;
	} bads[] = {
		{ "", 0, -EINVAL, "empty" },
		{ NULL, 0, -EINVAL, "empty" },
		{ "localhost", 0, -EINVAL, "no port" },
		{ "localhost:", 0, -EINVAL, "no port" },
		{ ":7470", 0, -EINVAL, "no host" },
		{ "[]:7470", 0, -EINVAL, "no host" },
		{ "h:0", 0, -EINVAL, "port '0' is not a number from 1 to 65535" },
		{ "h:65536", 0, -EINVAL, "port '65536' is not a number from 1 to 65535" },
		{ "h:65536", FERRY_HP_PORT0, -EINVAL, "port '65536' is not a number from 0 to 65535" },
		{ "h:99999999999999999999", 0, -EINVAL, "port '99999999999999999999'" },
		{ "h:-1", FERRY_HP_PORT0, -EINVAL, "port '-1'" },
		{ "h:+5", 0, -EINVAL, "port '+5'" },
		{ "h: 5", 0, -EINVAL, "port ' 5'" },
		{ "h:ssh", 0, -EINVAL, "port 'ssh'" },
		{ "h:5x", 0, -EINVAL, "port '5x'" },
		{ "h:5-6", 0, -EINVAL, "port '5-6'" }, /* no range unless asked for */
		{ "[::1:5", 0, -EINVAL, "'[' without ']'" },
		{ "[::1]5", 0, -EINVAL, "unexpected text after ']'" },
		{ "[::1]", 0, -EINVAL, "no port after ']'" },
		{ "[::1]:5junk", 0, -EINVAL, "port '5junk'" },
		{ "[::1]:", 0, -EINVAL, "no port after ':'" },
		{ "h:6-5", FERRY_HP_RANGE, -EINVAL, "ends before it starts" },
		{ "h:5-", FERRY_HP_RANGE, -EINVAL, "port ''" },
		{ "h:0-5", FERRY_HP_RANGE, -EINVAL, "port '0'" },
		{ "h:5-70000", FERRY_HP_RANGE, -EINVAL, "port '70000'" },
	};
	for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++)
		bad(bads[i].s, bads[i].flags, bads[i].want, bads[i].why);

	char longhost[FERRY_HOST_MAX + 8];
	memset(longhost, 'a', FERRY_HOST_MAX);
	strcpy(longhost + FERRY_HOST_MAX, ":5");
	bad(longhost, 0, -ENAMETOOLONG, "longer than 255");
	longhost[FERRY_HOST_MAX - 1] = '\0';
	strcat(longhost, ":5");
	struct ferry_hostport hp;
	CHECK(ferry_parse_hostport(longhost, 0, &hp, NULL) == 0 && strlen(hp.host) == FERRY_HOST_MAX - 1,
	      "a host of %d characters fits", FERRY_HOST_MAX - 1);
	CHECK(ferry_parse_hostport("x", 0, &hp, NULL) == -EINVAL, "err may be NULL on failure");
	CHECK_DONE();
}
