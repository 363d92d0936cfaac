#include "driver.h"

#include <errno.h>
#include <string.h>

#include "tcp/tcp.h"
#ifdef FERRY_HAVE_RDMA
#include "rdma/rdma.h"
#endif

static const struct ferry_driver_ops *const drivers[] = {
	&ferry_tcp_driver,
#ifdef FERRY_HAVE_RDMA
	&ferry_rdma_driver,
#endif
};

/* Datagram backends (dgram.h) are drivers too, through the data plane's
 * reliable-lane shim; best first. */
static const char *const names[] = {
#ifdef FERRY_HAVE_RDMA
	"rdma",
#endif
#ifdef FERRY_HAVE_DPDK
	"dpdk",
#endif
	"tcp", "udp", NULL
};

const struct ferry_driver_ops *ferry_driver_find(const char *name)
{
	for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
		if (strcmp(drivers[i]->name, name) == 0)
			return drivers[i];
	return NULL;
}

const char *const *ferry_driver_names(void)
{
	return names;
}

const char *ferry_driver_option(const struct ferry_driver_config *cfg, const char *key)
{
	size_t klen = strlen(key);
	if (!cfg || !cfg->options)
		return NULL;
	for (unsigned i = 0; cfg->options[i]; i++) {
		const char *o = cfg->options[i];
		if (strncmp(o, key, klen) == 0 && o[klen] == '=') {
			if (cfg->seen && i < 64)
				*cfg->seen |= 1ull << i;
			return o + klen + 1;
		}
	}
	return NULL;
}

int ferry_driver_options_check(const struct ferry_driver_config *cfg, unsigned n, const char *driver,
			       struct ferry_err *err)
{
	if (!cfg || !cfg->options || !cfg->seen)
		return 0;
	for (unsigned i = 0; i < n && cfg->options[i]; i++) {
		const char *o = cfg->options[i], *eq = strchr(o, '=');
		if (i >= 64)
			return ferry_err_set(err, EINVAL, "too many driver options (at most 64)");
		if (!eq || eq == o)
			return ferry_err_set(err, EINVAL, "driver option '%s' is not KEY=VALUE", o);
		if (*cfg->seen & (1ull << i))
			continue;
		/* Unread because an earlier one of the same key won (the first
		 * match does): say so, not "no such option". */
		size_t klen = (size_t)(eq - o);
		for (unsigned j = 0; j < i; j++)
			if (strncmp(cfg->options[j], o, klen + 1) == 0)
				return ferry_err_set(err, EINVAL, "driver option '%s': '%.*s' is given more than once",
						     o, (int)klen, o);
		return ferry_err_set(err, EINVAL, "driver option '%s': the %s driver has no option '%.*s'", o, driver,
				     (int)klen, o);
	}
	return 0;
}
