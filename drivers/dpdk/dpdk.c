#include "dpdk.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_xdp.h>
#include <sys/socket.h>

#include <rte_dev.h>
#include <rte_devargs.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_flow.h>
#include <rte_ip.h>
#include <rte_kvargs.h>
#include <rte_mbuf.h>
#include <rte_mbuf_pool_ops.h>
#include <rte_udp.h>

#define BATCH 32
#define HOLD_CHECK 16
#define MAX_QUEUES 64
#define HDRS (RTE_ETHER_HDR_LEN + 20 + 8)  /* Ethernet + IPv4 + UDP */
#define MAX_EAL_ARGS 64
#define LINK_WAIT_MS 1500     /* a memif client: one connection attempt's handshake */
#define LINK_ATTEMPTS 6       /* ... and how many before giving up (9 s in all) */

#define REF_MIN 512           /* smaller last pieces are copied: an extra mbuf costs more */

struct dpdk_queue {
	struct rte_mbuf *tx[BATCH];
	unsigned tx_count;
	/* By-reference sends: every mbuf attached to caller memory holds one
	 * count beyond the queue's own, until the PMD frees it. */
	struct rte_mbuf_ext_shared_info shinfo;
	/* Receive side: whether mbufs may be lent, looked up every HOLD_CHECK
	 * recvs (counting the pool visits every lcore's cache). */
	unsigned hold_calls;
	bool hold_ok;
};

struct ferry_dgram_dev {
	uint16_t port;
	unsigned nq;
	size_t dgram;
	uint16_t port0;             /* UDP port of queue 0 */
	struct rte_ether_addr mac;
	uint32_t ip;                /* network order */
	struct rte_mempool *pool;
	struct rte_mempool *ext_pool;  /* data-less mbufs for by-reference payloads */
	bool by_ref;                   /* the transmit path: by reference, or copies */
	unsigned hold_floor;           /* free mbufs below which received ones are not lent */
	bool started;
	bool af_xdp;
	struct dpdk_queue q[];
};

/* One EAL per process: rte_eal_init cannot run twice. */
static pthread_mutex_t eal_lock = PTHREAD_MUTEX_INITIALIZER;
static bool eal_up;
static unsigned devs_open;

static unsigned long free_hugepages(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	unsigned long n = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "HugePages_Free: %lu", &n) == 1)
			break;
	fclose(f);
	return n;
}

static bool has_arg(char **argv, int argc, const char *a)
{
	size_t n = strlen(a);
	bool shortopt = n == 2 && a[0] == '-'; /* "-l0" is "-l 0" */
	for (int i = 0; i < argc; i++)
		if (strncmp(argv[i], a, n) == 0 && (argv[i][n] == '\0' || argv[i][n] == '=' || shortopt))
			return true;
	return false;
}

static int eal_init(const struct ferry_driver_config *cfg, struct ferry_err *err)
{
	if (eal_up)
		return 0;
	static char buf[4096];
	static char *argv[MAX_EAL_ARGS + 1];
	static char pfx[64];
	int argc = 0;
	argv[argc++] = "ferryd";
	const char *eal = ferry_driver_option(cfg, "eal");
	if (eal) {
		if (strlen(eal) >= sizeof(buf))
			return ferry_err_set(err, E2BIG, "dpdk driver: eal= is longer than %zu bytes", sizeof(buf) - 1);
		strcpy(buf, eal);
		for (char *t = strtok(buf, " \t"); t; t = strtok(NULL, " \t")) {
			if (argc >= MAX_EAL_ARGS - 12)
				return ferry_err_set(err, E2BIG, "dpdk driver: more than %d eal= arguments", MAX_EAL_ARGS - 12);
			argv[argc++] = t;
		}
	}
	/* Defaults that work on a small host, unless eal= says otherwise. */
	if (!has_arg(argv, argc, "-l") && !has_arg(argv, argc, "-c") && !has_arg(argv, argc, "--lcores")) {
		argv[argc++] = "-l";
		argv[argc++] = "0";
	}
	if (!has_arg(argv, argc, "--in-memory") && !has_arg(argv, argc, "--no-huge") &&
	    !has_arg(argv, argc, "--huge-dir")) {
		if (free_hugepages() >= 512) {
			argv[argc++] = "--in-memory";
		} else {
			argv[argc++] = "--no-huge";
			argv[argc++] = "-m";
			argv[argc++] = "1024";
		}
	}
	bool own_dir = false;
	if (!has_arg(argv, argc, "--file-prefix") && !has_arg(argv, argc, "--in-memory")) {
		snprintf(pfx, sizeof(pfx), "--file-prefix=ferry%d", (int)getpid());
		argv[argc++] = pfx;
		/* ferry is a single DPDK process: without this every daemon
		 * leaves ~12 MB of runtime files in /var/run/dpdk behind. */
		if (!has_arg(argv, argc, "--no-shconf"))
			argv[argc++] = "--no-shconf";
		/* ... and without this, its telemetry socket keeps the runtime
		 * directory, which stays behind empty (removed below). */
		if (!has_arg(argv, argc, "--no-telemetry") && !has_arg(argv, argc, "--telemetry"))
			argv[argc++] = "--no-telemetry";
		own_dir = true;
	}
	if (!has_arg(argv, argc, "--no-pci") && !has_arg(argv, argc, "-a") && !has_arg(argv, argc, "--allow"))
		argv[argc++] = "--no-pci";
	if (!has_arg(argv, argc, "--log-level"))
		argv[argc++] = "--log-level=notice";
	const char *vdev = ferry_driver_option(cfg, "vdev");
	if (vdev) {
		argv[argc++] = "--vdev";
		argv[argc++] = (char *)vdev;
	}
	argv[argc] = NULL;
	/* rte_eal_init pins the calling thread to the main lcore: give the
	 * daemon's thread its CPUs back afterwards. */
	cpu_set_t before;
	bool restore = pthread_getaffinity_np(pthread_self(), sizeof(before), &before) == 0;
	int rc = rte_eal_init(argc, argv);
	if (restore)
		(void)pthread_setaffinity_np(pthread_self(), sizeof(before), &before);
	if (rc < 0) {
		char all[1024] = "";
		for (int i = 1; i < argc; i++)
			snprintf(all + strlen(all), sizeof(all) - strlen(all), " %s", argv[i]);
		return ferry_err_set(err, rte_errno ? rte_errno : EINVAL, "dpdk driver: rte_eal_init(%s) failed: %s",
				     all, rte_strerror(rte_errno));
	}
	/* Nothing is kept in our own, per-process runtime directory: remove it
	 * now rather than leave one per daemon run (best effort). */
	if (own_dir)
		(void)rmdir(rte_eal_get_runtime_dir());
	eal_up = true;
	return 0;
}

static int opt(const struct ferry_driver_config *cfg, const char *key, unsigned long def, unsigned long min,
	       unsigned long max, unsigned long *out, struct ferry_err *err)
{
	int rc = ferry_dgram_opt_uint(cfg, key, def, min, max, out, err);
	return rc ? ferry_err_prefix(err, "dpdk driver") : 0;
}

/* Steer queue q's UDP port to rx queue q where the PMD takes flow rules. */
static void steer(struct ferry_dgram_dev *dev)
{
	for (unsigned q = 0; q < dev->nq && dev->nq > 1; q++) {
		struct rte_flow_attr attr = { .ingress = 1 };
		struct rte_flow_item_udp spec = { .hdr.dst_port = htons((uint16_t)(dev->port0 + q)) };
		struct rte_flow_item_udp mask = { .hdr.dst_port = 0xffff };
		struct rte_flow_item pattern[] = {
			{ .type = RTE_FLOW_ITEM_TYPE_ETH },
			{ .type = RTE_FLOW_ITEM_TYPE_IPV4 },
			{ .type = RTE_FLOW_ITEM_TYPE_UDP, .spec = &spec, .mask = &mask },
			{ .type = RTE_FLOW_ITEM_TYPE_END },
		};
		struct rte_flow_action_queue qa = { .index = (uint16_t)q };
		struct rte_flow_action actions[] = {
			{ .type = RTE_FLOW_ACTION_TYPE_QUEUE, .conf = &qa },
			{ .type = RTE_FLOW_ACTION_TYPE_END },
		};
		struct rte_flow_error fe;
		/* No rules (memif, af_packet): the sender's queue index or the
		 * shim's hand-over between lanes does the steering. */
		if (!rte_flow_create(dev->port, &attr, pattern, actions, &fe))
			return;
	}
}

/* One of the port's device arguments (its --vdev string), or NULL. */
static const char *devarg(const struct rte_eth_dev_info *info, const char *key, char *buf, size_t len)
{
	const struct rte_devargs *da = info->device ? rte_dev_devargs(info->device) : NULL;
	struct rte_kvargs *kv = da && da->args ? rte_kvargs_parse(da->args, NULL) : NULL;
	const char *v = kv ? rte_kvargs_get(kv, key) : NULL;
	if (v)
		snprintf(buf, len, "%s", v);
	rte_kvargs_free(kv);
	return v ? buf : NULL;
}

/* The transmit path (option tx=auto|copy|ref). By reference, a datagram's
 * payload is not copied into an mbuf: a second, data-less mbuf is attached
 * to the caller's bytes (rte_pktmbuf_attach_extbuf) and chained after the
 * headers. That needs a PMD that sends chains (MULTI_SEGS) and reads them
 * through their virtual address, copying them before tx_burst returns, as
 * the memif (copy mode), af_packet and vhost PMDs do; a PMD that hands
 * addresses to hardware or to another process (a NIC, virtio_user, memif
 * zero-copy) could only take DPDK memory, which ferry's buffers are not, so
 * it gets copies. Sets *why to the reason, for the log. */
static int pick_tx_path(struct ferry_dgram_dev *dev, const struct ferry_driver_config *cfg,
			const struct rte_eth_dev_info *info, const char **why, struct ferry_err *err)
{
	const char *mode = ferry_driver_option(cfg, "tx");
	if (mode && strcmp(mode, "auto") && strcmp(mode, "copy") && strcmp(mode, "ref"))
		return ferry_err_set(err, EINVAL, "dpdk driver: tx=%s is not auto, copy or ref", mode);
	const char *drv = info->driver_name;
	char zc[16];
	bool vaddr = strcmp(drv, "net_af_packet") == 0 || strcmp(drv, "net_vhost") == 0 ||
		     (strcmp(drv, "net_memif") == 0 && !(devarg(info, "zero-copy", zc, sizeof(zc)) &&
							  strcmp(zc, "yes") == 0));
	if (mode && strcmp(mode, "copy") == 0) {
		*why = "tx=copy";
	} else if (!(info->tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS)) {
		*why = "the PMD sends no mbuf chains";
	} else if (!vaddr) {
		*why = strcmp(drv, "net_memif") == 0 ? "memif zero-copy sends from DPDK memory only"
						      : "the PMD may hand buffer addresses on: DPDK memory only";
	} else {
		dev->by_ref = true;
		*why = "the PMD copies mbuf chains by virtual address";
	}
	if (mode && strcmp(mode, "ref") == 0 && !dev->by_ref)
		return ferry_err_set(err, ENOTSUP, "dpdk driver: tx=ref on port %u (%s): %s", dev->port, drv, *why);
	return 0;
}

static void ext_free(void *addr, void *opaque)
{
	/* Never reached: each queue keeps one count of its own. */
}

static void dpdk_tx_discard(struct ferry_dgram_dev *dev, unsigned qi)
{
	struct dpdk_queue *q = &dev->q[qi];
	for (unsigned k = 0; k < q->tx_count; k++)
		rte_pktmbuf_free(q->tx[k]);
	q->tx_count = 0;
}

/* af_xdp: the XDP sockets' own counters, logged as the port closes (DPDK
 * 22.11 reports only their rx_dropped, inside imissed). Frames the kernel
 * refused are lost without a trace otherwise. The process has one port, so
 * its XDP sockets are this port's queues. */
static void log_xdp_stats(const struct ferry_dgram_dev *dev)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d))) {
		int fd = atoi(e->d_name), dom = 0;
		socklen_t l = sizeof(dom);
		struct xdp_statistics xs;
		if (fd == dirfd(d) || getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &l) || dom != AF_XDP)
			continue;
		l = sizeof(xs);
		if (getsockopt(fd, SOL_XDP, XDP_STATISTICS, &xs, &l))
			continue;
		RTE_LOG(NOTICE, USER1, "ferry dpdk: port %u (net_af_xdp): XDP socket: rx_dropped %llu rx_invalid_descs %llu "
			"tx_invalid_descs %llu rx_ring_full %llu rx_fill_ring_empty_descs %llu\n", dev->port,
			(unsigned long long)xs.rx_dropped, (unsigned long long)xs.rx_invalid_descs,
			(unsigned long long)xs.tx_invalid_descs, (unsigned long long)xs.rx_ring_full,
			(unsigned long long)xs.rx_fill_ring_empty_descs);
	}
	closedir(d);
}

static void dpdk_close(struct ferry_dgram_dev *dev)
{
	if (!dev)
		return;
	for (unsigned i = 0; i < dev->nq; i++)
		dpdk_tx_discard(dev, i);
	if (dev->started) {
		if (dev->af_xdp)
			log_xdp_stats(dev);
		(void)rte_eth_dev_stop(dev->port);
		(void)rte_eth_dev_close(dev->port);
	}
	if (dev->pool)
		rte_mempool_free(dev->pool);
	if (dev->ext_pool)
		rte_mempool_free(dev->ext_pool);
	free(dev);
	pthread_mutex_lock(&eal_lock);
	devs_open--;
	pthread_mutex_unlock(&eal_lock);
}

/* A memif client given in vdev= or among the EAL arguments. */
static bool memif_client(const struct ferry_driver_config *cfg)
{
	const char *keys[] = { "vdev", "eal" };
	for (unsigned i = 0; i < 2; i++) {
		const char *v = ferry_driver_option(cfg, keys[i]);
		const char *m = v ? strstr(v, "net_memif") : NULL;
		if (m && strstr(m, "role=client"))
			return true;
	}
	return false;
}

static bool link_up_within(uint16_t port, unsigned ms)
{
	for (unsigned waited = 0;; waited += 10) {
		struct rte_eth_link lk;
		if (rte_eth_link_get_nowait(port, &lk) == 0 && lk.link_status == RTE_ETH_LINK_UP)
			return true;
		if (waited >= ms)
			return false;
		usleep(10000);
	}
}

/* Start the port. A memif client must also see its link come up: one that
 * connects while its server (a ferryd starting at the same moment) has made
 * its socket but not yet started its port is left with the link down on
 * both ends for good, silently (DPDK 22.11 never connects again), and every
 * lane over it then fails with "peer silent". So it connects again (stop,
 * start) until the link is up, as it does while the server's socket is not
 * there yet, within a bound. */
static int start_port(struct ferry_dgram_dev *dev, bool memif_cl, struct ferry_err *err)
{
	int rc = rte_eth_dev_start(dev->port);
	for (unsigned attempt = 1; memif_cl; attempt++) {
		if (!rc && link_up_within(dev->port, LINK_WAIT_MS))
			return 0;
		if (attempt == LINK_ATTEMPTS)
			break;
		if (!rc)
			(void)rte_eth_dev_stop(dev->port);
		else
			usleep(LINK_WAIT_MS * 1000);
		rc = rte_eth_dev_start(dev->port);
	}
	if (rc && memif_cl)
		return ferry_err_set(err, -rc, "dpdk driver: starting port %u (memif client: is its server up? tried for "
				     "%d s): %s", dev->port, LINK_ATTEMPTS * LINK_WAIT_MS / 1000, rte_strerror(-rc));
	if (rc)
		return ferry_err_set(err, -rc, "dpdk driver: starting port %u: %s", dev->port, rte_strerror(-rc));
	if (!memif_cl)
		return 0;
	(void)rte_eth_dev_stop(dev->port);
	return ferry_err_set(err, ETIMEDOUT, "dpdk driver: port %u (memif client): the link stayed down through %d "
			     "connection attempts of %d ms: the memif server does not complete the handshake",
			     dev->port, LINK_ATTEMPTS, LINK_WAIT_MS);
}

/* af_xdp's umem (DPDK 22.11, XDP_UMEM_UNALIGNED_CHUNK_FLAG build) is the
 * mbuf pool itself, registered as populated_size x object size bytes from
 * the page holding the pool's first memory chunk: it assumes the objects lie
 * back to back. A default pool does not: without hugepages DPDK keeps each
 * object within one 4 KiB page, so 4032-byte objects sit 4096 bytes apart
 * and the last 1.6 % of them (75 of 4736) lie beyond the umem. The kernel
 * rejects their descriptors (tx_invalid_descs): a transmit ring holding a
 * run of them moves one descriptor per kick and sends nothing, and the lane
 * starves ("peer silent"). So af_xdp gets a pool packed back to back (no
 * IOVA contiguity asked: af_xdp's kernel copy mode, the only one veth has,
 * addresses the umem by offset), and the layout is checked. */
struct umem_span {
	uintptr_t base;
	uint64_t size;
	unsigned outside;
};

static void umem_check_obj(struct rte_mempool *mp, void *arg, void *obj, unsigned idx)
{
	struct umem_span *u = arg;
	uint64_t end = (uintptr_t)obj + mp->elt_size + mp->trailer_size - u->base;
	if ((uintptr_t)obj - mp->header_size < u->base || end > u->size)
		u->outside++;
}

static unsigned outside_umem(struct rte_mempool *mp)
{
	struct rte_mempool_memhdr *h = STAILQ_FIRST(&mp->mem_list);
	if (!h)
		return mp->populated_size;
	uintptr_t a = (uintptr_t)h->addr;
	struct umem_span u = { .base = a & ~(uintptr_t)(getpagesize() - 1) };
	u.size = (uint64_t)mp->populated_size * (mp->header_size + mp->elt_size + mp->trailer_size) + (a - u.base);
	rte_mempool_obj_iter(mp, umem_check_obj, &u);
	return u.outside;
}

/* rte_pktmbuf_pool_create, but with the objects back to back. */
static struct rte_mempool *packed_pool(const char *name, unsigned n, uint16_t room, int socket)
{
	struct rte_pktmbuf_pool_private priv = { .mbuf_data_room_size = room };
	struct rte_mempool *mp = rte_mempool_create_empty(name, n, (unsigned)sizeof(struct rte_mbuf) + room, 256,
							  sizeof(priv), socket, RTE_MEMPOOL_F_NO_IOVA_CONTIG);
	if (!mp)
		return NULL;
	int rc = rte_mempool_set_ops_byname(mp, rte_mbuf_best_mempool_ops(), NULL);
	if (!rc) {
		rte_pktmbuf_pool_init(mp, &priv);
		rc = rte_mempool_populate_default(mp);
	}
	if (rc < 0) {
		rte_mempool_free(mp);
		rte_errno = -rc;
		return NULL;
	}
	rte_mempool_obj_iter(mp, rte_pktmbuf_init, NULL);
	return mp;
}

static int dpdk_open(const struct ferry_driver_config *cfg, struct ferry_dgram_dev **out, struct ferry_err *err)
{
	unsigned long nq, mtu, port0, ring, mbufs, portid, window;
	int rc;
	if ((rc = opt(cfg, "queues", 1, 1, MAX_QUEUES, &nq, err)) || (rc = opt(cfg, "mtu", 9000, 576, 9600, &mtu, err)) ||
	    (rc = opt(cfg, "udp_port", 47000, 1, 65535, &port0, err)) || (rc = opt(cfg, "ring", 1024, 64, 16384, &ring, err)) ||
	    (rc = opt(cfg, "mbufs", 0, 0, 1u << 22, &mbufs, err)) || (rc = opt(cfg, "port", 0xffff, 0, 0xffff, &portid, err)) ||
	    (rc = opt(cfg, "rl_window", 512, 4, 32768, &window, err)))
		return rc;
	const char *ipstr = ferry_driver_option(cfg, "ip");
	struct in_addr ia;
	if (inet_pton(AF_INET, ipstr ? ipstr : "198.18.0.1", &ia) != 1)
		return ferry_err_set(err, EINVAL, "dpdk driver: ip=%s is not an IPv4 address", ipstr);

	pthread_mutex_lock(&eal_lock);
	if (devs_open > 0) {
		pthread_mutex_unlock(&eal_lock);
		return ferry_err_set(err, EBUSY, "dpdk driver: one device per process");
	}
	rc = eal_init(cfg, err);
	if (!rc)
		devs_open++;
	pthread_mutex_unlock(&eal_lock);
	if (rc)
		return rc;

	struct ferry_dgram_dev *dev = calloc(1, sizeof(*dev) + nq * sizeof(struct dpdk_queue));
	if (!dev) {
		pthread_mutex_lock(&eal_lock);
		devs_open--;
		pthread_mutex_unlock(&eal_lock);
		return ferry_err_set(err, ENOMEM, "dpdk driver: out of memory");
	}
	dev->ip = ia.s_addr;
	dev->port0 = (uint16_t)port0;
	if (portid == 0xffff) {
		uint16_t p;
		bool found = false;
		RTE_ETH_FOREACH_DEV(p) {
			portid = p;
			found = true;
			break;
		}
		if (!found) {
			rc = ferry_err_set(err, ENODEV, "dpdk driver: no port (give vdev=... or a PCI device in eal=)");
			dpdk_close(dev);
			return rc;
		}
	}
	if (!rte_eth_dev_is_valid_port((uint16_t)portid)) {
		rc = ferry_err_set(err, ENODEV, "dpdk driver: no port %lu", portid);
		dpdk_close(dev);
		return rc;
	}
	dev->port = (uint16_t)portid;
	struct rte_eth_dev_info info;
	if ((rc = rte_eth_dev_info_get(dev->port, &info))) {
		rc = ferry_err_set(err, -rc, "dpdk driver: port %u: no device info: %s", dev->port, rte_strerror(-rc));
		dpdk_close(dev);
		return rc;
	}
	if (nq > info.max_rx_queues || nq > info.max_tx_queues) {
		rc = ferry_err_set(err, EINVAL, "dpdk driver: port %u (%s) has %u rx / %u tx queues, %lu asked for",
				     dev->port, info.driver_name, info.max_rx_queues, info.max_tx_queues, nq);
		dpdk_close(dev);
		return rc;
	}
	dev->nq = (unsigned)nq;
	if (mtu > info.max_mtu)
		mtu = info.max_mtu;
	if (mtu > info.max_rx_pktlen - RTE_ETHER_HDR_LEN - RTE_ETHER_CRC_LEN)
		mtu = info.max_rx_pktlen - RTE_ETHER_HDR_LEN - RTE_ETHER_CRC_LEN;
	/* Frame and mbuf limits of PMDs that do not say them (DPDK 22.11):
	 * - af_packet copies each frame of its ring (framesz= in its devargs,
	 *   default 2048, less 32 B of ring header) into one mbuf and refuses
	 *   rx queues whose mbufs hold less; it drops larger frames on tx. Its
	 *   MTU says 1500 whatever the ring holds: dgram= goes up to the ring's
	 *   frame.
	 * - af_xdp takes the mbufs as its umem: an mbuf with its headers must
	 *   fit a 4 KiB page (mempool objects are an odd number of cache lines:
	 *   4032 B at most) and the kernel writes a frame 256 B into the data
	 *   room: a data room of 3840 B carries frames of 3456 B. */
	size_t room_min = RTE_MBUF_DEFAULT_BUF_SIZE, room_fixed = 0, frame_max = 9600 + HDRS;
	if (strcmp(info.driver_name, "net_af_packet") == 0) {
		unsigned long fsz = 2048;
		char v[32];
		if (devarg(&info, "framesz", v, sizeof(v)))
			fsz = strtoul(v, NULL, 0);
		if (fsz > 32 && fsz <= 65536) {
			frame_max = fsz - 32;
			if (RTE_PKTMBUF_HEADROOM + frame_max > room_min)
				room_min = RTE_PKTMBUF_HEADROOM + frame_max;
		}
	} else if (strcmp(info.driver_name, "net_af_xdp") == 0) {
		room_fixed = 3840;
		frame_max = room_fixed - RTE_PKTMBUF_HEADROOM - 256;
	}
	if (mtu > frame_max - RTE_ETHER_HDR_LEN)
		mtu = frame_max - RTE_ETHER_HDR_LEN;
	/* dgram= overrides for PMDs that carry more than their MTU says
	 * (memif carries frames up to its bsize whatever the MTU, af_packet
	 * up to its framesz). */
	unsigned long dg;
	if ((rc = opt(cfg, "dgram", mtu - 28, 128, 9600, &dg, err))) {
		dpdk_close(dev);
		return rc;
	}
	if (HDRS + dg > frame_max) {
		rc = ferry_err_set(err, EMSGSIZE, "dpdk driver: dgram=%lu does not fit port %u (%s): frames of %zu bytes at most",
				   dg, dev->port, info.driver_name, frame_max);
		dpdk_close(dev);
		return rc;
	}
	dev->dgram = dg;

	size_t room = RTE_PKTMBUF_HEADROOM + HDRS + dev->dgram + 64;
	if (room < room_min)
		room = room_min;
	if (room_fixed)
		room = room_fixed;
	if (room > UINT16_MAX) {
		rc = ferry_err_set(err, EMSGSIZE, "dpdk driver: port %u (%s) wants mbufs of %zu bytes, more than DPDK has",
				   dev->port, info.driver_name, room);
		dpdk_close(dev);
		return rc;
	}
	/* Receive may lend mbufs to the lanes, which keep up to a window
	 * (rl_window, the shim's option) of them each until the bytes are
	 * consumed: size the pool for that beside every rx and tx ring full,
	 * and stop lending while fewer than the rings may take are free. */
	if (!mbufs)
		mbufs = nq * (2 * ring + 4 * BATCH + window) + 2048;
	dev->hold_floor = (unsigned)(nq * (ring + 4 * BATCH) + HOLD_CHECK * BATCH + 256);
	char name[RTE_MEMPOOL_NAMESIZE];
	snprintf(name, sizeof(name), "ferry%u", dev->port);
	dev->af_xdp = strcmp(info.driver_name, "net_af_xdp") == 0;
	int sock = (int)rte_eth_dev_socket_id(dev->port);
	dev->pool = dev->af_xdp ? packed_pool(name, (unsigned)mbufs, (uint16_t)room, sock)
			   : rte_pktmbuf_pool_create(name, (unsigned)mbufs, 256, 0, (uint16_t)room, sock);
	if (!dev->pool) {
		rc = ferry_err_set(err, rte_errno, "dpdk driver: no pool of %lu mbufs of %zu bytes: %s", mbufs, room,
				   rte_strerror(rte_errno));
		dpdk_close(dev);
		return rc;
	}
	unsigned outside = dev->af_xdp ? outside_umem(dev->pool) : 0;
	if (outside) {
		rc = ferry_err_set(err, EFAULT, "dpdk driver: port %u (net_af_xdp): %u of %u mbufs lie outside the umem "
				   "the PMD registers (%u memory chunks): their frames would be rejected by the kernel",
				   dev->port, outside, dev->pool->populated_size, dev->pool->nb_mem_chunks);
		dpdk_close(dev);
		return rc;
	}
	const char *why = "";
	if ((rc = pick_tx_path(dev, cfg, &info, &why, err))) {
		dpdk_close(dev);
		return rc;
	}
	if (dev->by_ref) {
		snprintf(name, sizeof(name), "ferryx%u", dev->port);
		dev->ext_pool = rte_pktmbuf_pool_create(name, (unsigned)(nq * (ring + 4 * BATCH) + 1024), 256, 0, 0,
							(int)rte_eth_dev_socket_id(dev->port));
		if (!dev->ext_pool) {
			rc = ferry_err_set(err, rte_errno, "dpdk driver: no pool of attachable mbufs: %s",
					   rte_strerror(rte_errno));
			dpdk_close(dev);
			return rc;
		}
		for (unsigned i = 0; i < nq; i++) {
			dev->q[i].shinfo.free_cb = ext_free;
			rte_mbuf_ext_refcnt_set(&dev->q[i].shinfo, 1);
		}
	}
	RTE_LOG(NOTICE, USER1, "ferry dpdk: port %u (%s): transmit %s (%s)\n", dev->port, info.driver_name,
		dev->by_ref ? "by reference" : "by copy", why);
	struct rte_eth_conf conf = { 0 };
	conf.rxmode.mtu = (uint32_t)mtu;
	if ((rc = rte_eth_dev_configure(dev->port, (uint16_t)nq, (uint16_t)nq, &conf))) {
		rc = ferry_err_set(err, -rc, "dpdk driver: configuring port %u (%s) with %lu queues, MTU %lu: %s", dev->port,
				     info.driver_name, nq, mtu, rte_strerror(-rc));
		dpdk_close(dev);
		return rc;
	}
	for (unsigned i = 0; i < nq; i++) {
		int s = (int)rte_eth_dev_socket_id(dev->port);
		if ((rc = rte_eth_rx_queue_setup(dev->port, (uint16_t)i, (uint16_t)ring, (unsigned)s, NULL, dev->pool)) ||
		    (rc = rte_eth_tx_queue_setup(dev->port, (uint16_t)i, (uint16_t)ring, (unsigned)s, NULL))) {
			rc = ferry_err_set(err, -rc, "dpdk driver: port %u queue %u set-up: %s", dev->port, i, rte_strerror(-rc));
			dpdk_close(dev);
			return rc;
		}
	}
	if ((rc = start_port(dev, memif_client(cfg), err))) {
		dpdk_close(dev);
		return rc;
	}
	dev->started = true;
	(void)rte_eth_promiscuous_enable(dev->port);
	if ((rc = rte_eth_macaddr_get(dev->port, &dev->mac))) {
		rc = ferry_err_set(err, -rc, "dpdk driver: port %u has no MAC address: %s", dev->port, rte_strerror(-rc));
		dpdk_close(dev);
		return rc;
	}
	steer(dev);
	*out = dev;
	return 0;
}

static int dpdk_local_endpoint(struct ferry_dgram_dev *dev, char *buf, size_t len, struct ferry_err *err)
{
	const uint8_t *m = dev->mac.addr_bytes;
	char ip[INET_ADDRSTRLEN];
	inet_ntop(AF_INET, &dev->ip, ip, sizeof(ip));
	int n = snprintf(buf, len, "dpdk:%02x:%02x:%02x:%02x:%02x:%02x/%s:%u-%u", m[0], m[1], m[2], m[3], m[4], m[5], ip,
			 dev->port0, dev->port0 + dev->nq - 1);
	if (n < 0 || (size_t)n >= len)
		return ferry_err_set(err, ENOSPC, "endpoint buffer too small");
	return 0;
}

static unsigned dpdk_queues(const struct ferry_dgram_dev *dev)
{
	return dev->nq;
}

static size_t dpdk_max_datagram(const struct ferry_dgram_dev *dev)
{
	return dev->dgram;
}

/* Address bytes: MAC (6), IPv4 (4), UDP port (2), network order. */
static void make_addr(struct ferry_dgram_addr *a, const uint8_t mac[6], uint32_t ip, uint16_t port_be)
{
	memset(a, 0, sizeof(*a));
	memcpy(a->b, mac, 6);
	memcpy(a->b + 6, &ip, 4);
	memcpy(a->b + 10, &port_be, 2);
	a->len = 12;
}

static int dpdk_resolve(struct ferry_dgram_dev *dev, const char *endpoint, unsigned queue,
			struct ferry_dgram_addr *out, unsigned *peer_queues, struct ferry_err *err)
{
	unsigned m[6], lo, hi;
	char ip[32];
	int n = 0;
	if (strncmp(endpoint, "dpdk:", 5) != 0 ||
	    sscanf(endpoint + 5, "%2x:%2x:%2x:%2x:%2x:%2x/%31[0-9.]:%u-%u%n", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5], ip,
		   &lo, &hi, &n) != 9 || endpoint[5 + n] != '\0')
		return ferry_err_set(err, EINVAL, "dpdk driver cannot reach endpoint '%s' (want dpdk:MAC/IPV4:PORT-PORT)",
				     endpoint);
	struct in_addr ia;
	if (inet_pton(AF_INET, ip, &ia) != 1 || lo == 0 || hi < lo || hi > 65535 || hi - lo >= MAX_QUEUES)
		return ferry_err_set(err, EINVAL, "dpdk endpoint '%s' has a bad address or port range", endpoint);
	*peer_queues = hi - lo + 1;
	if (queue >= *peer_queues)
		return -ERANGE;
	uint8_t mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = (uint8_t)m[i];
	make_addr(out, mac, ia.s_addr, htons((uint16_t)(lo + queue)));
	return 0;
}

static void dpdk_addr_str(const struct ferry_dgram_addr *a, char *buf, size_t len)
{
	char ip[INET_ADDRSTRLEN];
	uint16_t port;
	memcpy(&port, a->b + 10, 2);
	inet_ntop(AF_INET, a->b + 6, ip, sizeof(ip));
	snprintf(buf, len, "%02x:%02x:%02x:%02x:%02x:%02x/%s:%u", a->b[0], a->b[1], a->b[2], a->b[3], a->b[4], a->b[5], ip,
		 ntohs(port));
}

static int dpdk_flush(struct ferry_dgram_dev *dev, unsigned qi, struct ferry_err *err)
{
	struct dpdk_queue *q = &dev->q[qi];
	if (q->tx_count == 0)
		return 0;
	uint16_t n = rte_eth_tx_burst(dev->port, (uint16_t)qi, q->tx, (uint16_t)q->tx_count);
	if (n < q->tx_count)
		memmove(q->tx, q->tx + n, (q->tx_count - n) * sizeof(q->tx[0]));
	q->tx_count -= n;
	return q->tx_count ? -EAGAIN : 0;
}

/* Headers, then the pieces: all copied into one mbuf, or, by reference,
 * all but a large last piece, which a second mbuf points at. 0 (copied), 1
 * (referenced) or a negative errno. */
static int frame_out(struct ferry_dgram_dev *dev, unsigned qi, const struct ferry_dgram_addr *to,
		     const struct iovec *iov, unsigned iovcnt, size_t len, bool may_ref, struct ferry_err *err)
{
	struct dpdk_queue *q = &dev->q[qi];
	if (len > dev->dgram)
		return ferry_err_set(err, EMSGSIZE, "dpdk queue %u: datagram of %zu bytes, at most %zu", qi, len, dev->dgram);
	if (q->tx_count == BATCH && dpdk_flush(dev, qi, err))
		return -EAGAIN;
	bool ref = may_ref && dev->by_ref && iovcnt > 1 && iov[iovcnt - 1].iov_len >= REF_MIN;
	size_t copied = len - (ref ? iov[iovcnt - 1].iov_len : 0);
	struct rte_mbuf *m = rte_pktmbuf_alloc(dev->pool);
	if (!m)
		return -EAGAIN; /* all mbufs in flight: the wire is full */
	struct rte_mbuf *x = NULL;
	if (ref && !(x = rte_pktmbuf_alloc(dev->ext_pool))) {
		rte_pktmbuf_free(m);
		return -EAGAIN;
	}
	uint8_t *p = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)(HDRS + copied));
	if (!p) {
		rte_pktmbuf_free(m);
		rte_pktmbuf_free(x);
		return ferry_err_set(err, EMSGSIZE, "dpdk queue %u: a %zu-byte frame does not fit an mbuf", qi, HDRS + len);
	}
	struct rte_ether_hdr *eh = (struct rte_ether_hdr *)p;
	memcpy(eh->dst_addr.addr_bytes, to->b, 6);
	eh->src_addr = dev->mac;
	eh->ether_type = htons(RTE_ETHER_TYPE_IPV4);
	struct rte_ipv4_hdr *ih = (struct rte_ipv4_hdr *)(eh + 1);
	memset(ih, 0, sizeof(*ih));
	ih->version_ihl = 0x45;
	ih->total_length = htons((uint16_t)(20 + 8 + len));
	ih->fragment_offset = htons(RTE_IPV4_HDR_DF_FLAG);
	ih->time_to_live = 64;
	ih->next_proto_id = IPPROTO_UDP;
	ih->src_addr = dev->ip;
	memcpy(&ih->dst_addr, to->b + 6, 4);
	ih->hdr_checksum = rte_ipv4_cksum(ih);
	struct rte_udp_hdr *uh = (struct rte_udp_hdr *)(ih + 1);
	uh->src_port = htons((uint16_t)(dev->port0 + qi));
	memcpy(&uh->dst_port, to->b + 10, 2);
	uh->dgram_len = htons((uint16_t)(8 + len));
	uh->dgram_cksum = 0; /* none: ferry's CRC32C covers every datagram byte */
	uint8_t *d = (uint8_t *)(uh + 1);
	for (unsigned i = 0; i < iovcnt - (ref ? 1 : 0); i++) {
		memcpy(d, iov[i].iov_base, iov[i].iov_len);
		d += iov[i].iov_len;
	}
	if (ref) {
		const struct iovec *v = &iov[iovcnt - 1];
		/* Only VA-reading PMDs get here (pick_tx_path): the IOVA is never
		 * used, the virtual address stands in for it. */
		rte_pktmbuf_attach_extbuf(x, v->iov_base, (rte_iova_t)(uintptr_t)v->iov_base, (uint16_t)v->iov_len,
					  &q->shinfo);
		rte_mbuf_ext_refcnt_update(&q->shinfo, 1);
		x->data_len = (uint16_t)v->iov_len;
		x->pkt_len = v->iov_len;
		m->next = x;
		m->nb_segs = 2;
		m->pkt_len += v->iov_len;
	}
	q->tx[q->tx_count++] = m;
	return ref ? 1 : 0;
}

static int dpdk_send(struct ferry_dgram_dev *dev, unsigned qi, const struct ferry_dgram_addr *to,
		     const struct iovec *iov, unsigned iovcnt, size_t len, struct ferry_err *err)
{
	int rc = frame_out(dev, qi, to, iov, iovcnt, len, false, err);
	return rc < 0 ? rc : 0;
}

static int dpdk_send_ref(struct ferry_dgram_dev *dev, unsigned qi, const struct ferry_dgram_addr *to,
			 const struct iovec *iov, unsigned iovcnt, size_t len, struct ferry_err *err)
{
	return frame_out(dev, qi, to, iov, iovcnt, len, true, err);
}

static unsigned dpdk_tx_refs(struct ferry_dgram_dev *dev, unsigned qi)
{
	return dev->by_ref ? (unsigned)(rte_mbuf_ext_refcnt_read(&dev->q[qi].shinfo) - 1) : 0;
}

static int dpdk_recv(struct ferry_dgram_dev *dev, unsigned qi, struct ferry_dgram_buf *bufs, unsigned n,
		     struct ferry_err *err)
{
	struct rte_mbuf *pkts[BATCH];
	if (n > BATCH)
		n = BATCH;
	uint16_t got = rte_eth_rx_burst(dev->port, (uint16_t)qi, pkts, (uint16_t)n);
	unsigned k = 0;
	for (uint16_t i = 0; i < got; i++) {
		struct rte_mbuf *m = pkts[i];
		const uint8_t *p = rte_pktmbuf_mtod(m, const uint8_t *);
		const struct rte_ether_hdr *eh = (const struct rte_ether_hdr *)p;
		const struct rte_ipv4_hdr *ih = (const struct rte_ipv4_hdr *)(eh + 1);
		const struct rte_udp_hdr *uh = (const struct rte_udp_hdr *)(ih + 1);
		uint16_t dport = ntohs(uh->dst_port);
		size_t ulen;
		/* Only whole, single-segment UDP/IPv4 frames to our ports; the
		 * rest (ARP, IPv6, strangers) is not ferry's. */
		if (m->nb_segs != 1 || m->data_len < HDRS || eh->ether_type != htons(RTE_ETHER_TYPE_IPV4) ||
		    ih->version_ihl != 0x45 || ih->next_proto_id != IPPROTO_UDP || dport < dev->port0 ||
		    dport >= dev->port0 + dev->nq || (ulen = ntohs(uh->dgram_len)) < 8 || HDRS - 8 + ulen > m->data_len) {
			rte_pktmbuf_free(m);
			continue;
		}
		bufs[k].data = (const uint8_t *)(uh + 1);
		bufs[k].len = ulen - 8;
		make_addr(&bufs[k].src, eh->src_addr.addr_bytes, ih->src_addr, uh->src_port);
		bufs[k].priv = m;
		k++;
	}
	return (int)k;
}

static void dpdk_release(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		rte_pktmbuf_free(bufs[i].priv);
}

static bool dpdk_may_hold(struct ferry_dgram_dev *dev, unsigned q)
{
	/* Between looks, a queue lends at most HOLD_CHECK bursts: the floor
	 * leaves room for them. */
	struct dpdk_queue *dq = &dev->q[q];
	if (dq->hold_calls++ % HOLD_CHECK == 0)
		dq->hold_ok = rte_mempool_avail_count(dev->pool) > dev->hold_floor;
	return dq->hold_ok;
}

static void dpdk_release_held(struct ferry_dgram_dev *dev, void *priv)
{
	(void)dev;
	rte_pktmbuf_free(priv); /* mempool puts are thread safe */
}

static int dpdk_wakeup_fd(struct ferry_dgram_dev *dev, unsigned q, bool want_tx, short *events)
{
	/* Polled: the shim wakes its lanes on a short timer. */
	*events = 0;
	return -1;
}

const struct ferry_dgram_ops ferry_dpdk_dgram = {
	.name = "dpdk",
	.open = dpdk_open,
	.close = dpdk_close,
	.local_endpoint = dpdk_local_endpoint,
	.queues = dpdk_queues,
	.max_datagram = dpdk_max_datagram,
	.resolve = dpdk_resolve,
	.addr_str = dpdk_addr_str,
	.send = dpdk_send,
	.send_ref = dpdk_send_ref,
	.tx_refs = dpdk_tx_refs,
	.tx_discard = dpdk_tx_discard,
	.flush = dpdk_flush,
	.recv = dpdk_recv,
	.release = dpdk_release,
	.may_hold = dpdk_may_hold,
	.release_held = dpdk_release_held,
	.wakeup_fd = dpdk_wakeup_fd,
};
