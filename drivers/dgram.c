#include "dgram.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "udp/udp.h"
#ifdef FERRY_HAVE_DPDK
#include "dpdk/dpdk.h"
#endif

static const struct ferry_dgram_ops *const backends[] = {
#ifdef FERRY_HAVE_DPDK
	&ferry_dpdk_dgram,
#endif
	&ferry_udp_dgram,
};

const struct ferry_dgram_ops *ferry_dgram_find(const char *name)
{
	for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
		if (strcmp(backends[i]->name, name) == 0)
			return backends[i];
	return NULL;
}

int ferry_dgram_opt_uint(const struct ferry_driver_config *cfg, const char *key, unsigned long def,
			 unsigned long min, unsigned long max, unsigned long *out, struct ferry_err *err)
{
	const char *v = ferry_driver_option(cfg, key);
	if (!v) {
		*out = def;
		return 0;
	}
	char *end;
	errno = 0;
	unsigned long n = strtoul(v, &end, 0);
	if (errno || end == v || *end || v[0] == '-' || n < min || n > max)
		return ferry_err_set(err, EINVAL, "option %s=%s is not a number from %lu to %lu", key, v, min, max);
	*out = n;
	return 0;
}
