#include "rdma.h"
#include "../dgram.h"
#include "../hostport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

/* Sizing. Messages are SLOT_BYTES at most: a frame larger than one slot goes
 * as several messages (RC keeps them in order). The receive pool is
 * registered once per lane; so is the send pool, which frames are copied into
 * (inline sends skip it for small frames). */
#define SLOT_BYTES     (128u << 10)
#define RQ_DATA        64              /* receives the peer's credits cover */
#define RQ_SPARE       8               /* for credit-only messages, which need no credit */
#define RQ_TOTAL       (RQ_DATA + RQ_SPARE)
#define TX_SLOTS       64
#define WRITES_MAX     16              /* one-sided writes in flight per lane */
#define SQ_DEPTH       (TX_SLOTS + WRITES_MAX + 32)
#define CQ_DEPTH       (SQ_DEPTH + RQ_TOTAL + 16)
#define SIGNAL_EVERY   16              /* at least one signalled send per this many */
#define INLINE_WANT    256
#define DONE_DEPTH     256
#define RECV_BIT       (1ull << 63)
#define CREDIT_BATCH   (RQ_DATA / 4)
#define HDR_STRIDE     64              /* zero-copy sends: a header buffer per send queue entry */
/* Idle lanes: a probe (a credit-only message) once per keepalive_ms with
 * nothing else sent; the lane fails when the peer has sent nothing, not even
 * its own probes, for dead_ms. Defaults generous enough for a loaded TCG
 * guest; a real fabric can go much lower. */
#define KEEPALIVE_MS   1000u
#define DEAD_MS        15000u
/* Local ACK timeout, 4.096 us * 2^17 = 0.54 s, times RETRY_COUNT + 1: a
 * message to a host that vanished errors in about 3.8 s rather than never.
 * Not 7 retries: soft-RoCE (rxe) takes 7 to mean "retry for ever", as the
 * spec has it only for RNR retries. */
#define ACK_TIMEOUT    17
#define RETRY_COUNT    6

struct ferry_device {
	struct rdma_event_channel *ec;
	struct rdma_cm_id *listen_id;
	struct ibv_context *verbs;
	struct ibv_pd *pd;
	struct sockaddr_storage src;   /* our address, port 0, for active connects */
	char endpoint[FERRY_ENDPOINT_MAX];
	pthread_mutex_t async_lock;
	int fatal;                     /* the device itself failed (async event) */
	unsigned keepalive_ms, dead_ms; /* keepalive_ms 0: no probes, no dead peer check */
	int cq_entries;                /* CQ size per lane (test_cq_entries= makes it too small) */
};

/* SQ_PROBE: a credit-only message sent as an idle lane's keepalive (named so in errors) */
enum sq_kind { SQ_SLOT = 1, SQ_INLINE, SQ_ZEROCOPY, SQ_CREDIT, SQ_PROBE, SQ_WRITE };

struct sq_rec {
	uint8_t kind;
	int slot;
	void *cookie;
};

enum rx_kind { RX_SEND = 1, RX_WRITE };

struct rxmsg {
	int slot;
	uint32_t len;
};

struct ferry_lane_drv {
	struct ferry_device *dev;
	struct rdma_event_channel *ec;
	struct rdma_cm_id *id;
	struct ibv_comp_channel *cc;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	int epfd, evfd;
	bool evfd_set, armed, established, disconnected;
	uint64_t slow_check_ns;        /* when connection and async events were last looked at */
	bool heard, posted;            /* since the last keepalive look: a receive came / a send went */
	uint64_t heard_ns, posted_ns;  /* when (as of those looks) */
	unsigned cq_events;            /* to acknowledge before destroying the CQ */
	uint32_t max_inline;
	/* send side */
	uint8_t *txbuf;
	struct ibv_mr *txmr;
	uint8_t *hdrbuf;               /* HDR_STRIDE per send queue entry, for zero-copy frames */
	struct ibv_mr *hdrmr;
	int tx_free[TX_SLOTS];
	unsigned tx_nfree;
	struct sq_rec sq[SQ_DEPTH];
	uint64_t sq_head, sq_tail;     /* next sequence to post, oldest not retired */
	unsigned unsignaled, writes;
	uint32_t sent;                 /* messages that used a peer credit */
	uint32_t peer_freed;           /* the peer's receives freed (from immediates) */
	bool credit_inflight;
	unsigned need_msgs;            /* a refused frame's messages (0: none refused) */
	bool need_write;
	void *done[DONE_DEPTH];
	unsigned done_head, done_count;
	/* receive side */
	uint8_t *rxbuf;
	struct ibv_mr *rxmr;
	struct rxmsg rxq[RQ_TOTAL];
	unsigned rxq_head, rxq_count;
	uint32_t freed, reported;      /* our receives freed / told to the peer */
	int cur_slot;                  /* message being consumed as payload */
	uint32_t cur_off, cur_len;
	uint64_t frame_left;           /* payload bytes of the current frame not consumed */
	int held_slot;                 /* a control frame's payload, until the next rx_burst */
	/* failure: the first reason wins */
	int fail_code;
	char fail_msg[FERRY_ERR_MSG_MAX - 64];
	int async_code;                /* set by whichever lane read the device's async event */
	char async_msg[128];
};

static void lane_fail(struct ferry_lane_drv *l, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void lane_fail(struct ferry_lane_drv *l, int code, const char *fmt, ...)
{
	if (l->fail_code)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(l->fail_msg, sizeof(l->fail_msg), fmt, ap);
	va_end(ap);
	l->fail_code = code;
}

static int lane_err(struct ferry_lane_drv *l, struct ferry_err *err)
{
	return ferry_err_set(err, l->fail_code, "rdma lane: %s", l->fail_msg);
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ---- addresses ------------------------------------------------------------ */

static int parse_addr(const char *s, struct sockaddr_storage *ss, struct ferry_err *err)
{
	struct ferry_hostport hp;
	if (ferry_parse_hostport(s, FERRY_HP_PORT0, &hp, err))
		return ferry_err_prefix(err, "rdma address (IP:PORT)");
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV }, *res = NULL;
	int g = getaddrinfo(hp.host, hp.port, &hints, &res);
	if (g)
		return ferry_err_set(err, EINVAL, "rdma address '%s': '%s' is not a numeric IP address (%s)", s, hp.host,
				     gai_strerror(g));
	memset(ss, 0, sizeof(*ss));
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	freeaddrinfo(res);
	return 0;
}

static bool gid_is_v4(const union ibv_gid *g)
{
	static const uint8_t pfx[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	return memcmp(g->raw, pfx, sizeof(pfx)) == 0;
}

/* The IPv4 address rdma_cm should bind for device 'name' (NULL: any) or GID
 * 'want' (NULL: any): the first IPv4-mapped GID of the first active port. */
static int find_device_ip(const char *name, const union ibv_gid *want, struct in_addr *ip, char *devname,
			  size_t devlen, struct ferry_err *err)
{
	int n = 0;
	struct ibv_device **list = ibv_get_device_list(&n);
	if (!list)
		return ferry_err_set(err, ENODEV, "rdma driver: no RDMA device on this host (libibverbs: %s)", strerror(errno));
	int rc = -ENODEV;
	bool named = false;
	for (int i = 0; i < n && rc; i++) {
		const char *dn = ibv_get_device_name(list[i]);
		if (name && strcmp(dn, name) != 0)
			continue;
		named = true;
		struct ibv_context *ctx = ibv_open_device(list[i]);
		if (!ctx)
			continue;
		struct ibv_device_attr da;
		if (ibv_query_device(ctx, &da) == 0) {
			for (uint8_t port = 1; port <= da.phys_port_cnt && rc; port++) {
				struct ibv_port_attr pa;
				if (ibv_query_port(ctx, port, &pa) || pa.state != IBV_PORT_ACTIVE)
					continue;
				for (int gi = 0; gi < pa.gid_tbl_len && rc; gi++) {
					union ibv_gid g;
					if (ibv_query_gid(ctx, port, gi, &g) || !gid_is_v4(&g))
						continue;
					if (want && memcmp(want->raw, g.raw, sizeof(g.raw)) != 0)
						continue;
					memcpy(&ip->s_addr, g.raw + 12, 4);
					snprintf(devname, devlen, "%s", dn);
					rc = 0;
				}
			}
		}
		ibv_close_device(ctx);
	}
	ibv_free_device_list(list);
	if (rc == 0)
		return 0;
	if (name && !named)
		return ferry_err_set(err, ENODEV, "rdma driver: no verbs device named '%s'", name);
	if (want)
		return ferry_err_set(err, ENODEV, "rdma driver: no active port has that GID%s%s", name ? " on " : "",
				     name ? name : "");
	return ferry_err_set(err, ENODEV, "rdma driver: no active port with an IPv4 (RoCEv2) GID%s%s", name ? " on " : "",
			     name ? name : "");
}

/* ---- device --------------------------------------------------------------- */

static void dev_free(struct ferry_device *dev)
{
	if (dev->pd)
		ibv_dealloc_pd(dev->pd);
	if (dev->listen_id)
		rdma_destroy_id(dev->listen_id);
	if (dev->ec)
		rdma_destroy_event_channel(dev->ec);
	pthread_mutex_destroy(&dev->async_lock);
	free(dev);
}

static int rdma_open(const struct ferry_driver_config *cfg, struct ferry_device **out, struct ferry_err *err)
{
	const char *bind_opt = ferry_driver_option(cfg, "bind");
	const char *dev_opt = ferry_driver_option(cfg, "dev");
	const char *gid_opt = ferry_driver_option(cfg, "gid");
	struct sockaddr_storage ss;
	int rc = parse_addr(bind_opt ? bind_opt : "0.0.0.0:0", &ss, err);
	if (rc)
		return ferry_err_prefix(err, "rdma driver: bind");
	/* test_cq_entries: for tests only, a CQ too small for the work a lane
	 * posts, so that a real overrun can be provoked. */
	unsigned long keepalive_ms, dead_ms, cq_entries;
	if ((rc = ferry_dgram_opt_uint(cfg, "keepalive_ms", KEEPALIVE_MS, 0, 3600000, &keepalive_ms, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "dead_ms", DEAD_MS, 1, 36000000, &dead_ms, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "test_cq_entries", CQ_DEPTH, 1, CQ_DEPTH, &cq_entries, err)))
		return ferry_err_prefix(err, "rdma driver");
	if (keepalive_ms && dead_ms <= keepalive_ms)
		return ferry_err_set(err, EINVAL, "rdma driver: dead_ms=%lu must exceed keepalive_ms=%lu (the peer's probes come that often)",
				     dead_ms, keepalive_ms);
	char devname[64] = "";
	union ibv_gid want;
	if (gid_opt) {
		struct in6_addr a6;
		if (inet_pton(AF_INET6, gid_opt, &a6) != 1)
			return ferry_err_set(err, EINVAL, "rdma driver: gid '%s' is not a GID (IPv6 notation, e.g. ::ffff:198.18.0.1)",
					     gid_opt);
		memcpy(want.raw, &a6, 16);
		if (!gid_is_v4(&want))
			return ferry_err_set(err, EINVAL, "rdma driver: gid '%s' is not IPv4-mapped: rdma_cm needs the RoCEv2 GID of an IPv4 address",
					     gid_opt);
	}
	bool wildcard = ss.ss_family == AF_INET &&
			(((struct sockaddr_in *)&ss)->sin_addr.s_addr == htonl(INADDR_ANY) ||
			 (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127);
	if (dev_opt || gid_opt || wildcard) {
		/* Device by name or GID, or the first active port: its address. */
		struct in_addr ip = { 0 };
		rc = find_device_ip(dev_opt, gid_opt ? &want : NULL, &ip, devname, sizeof(devname), err);
		if (rc)
			return rc;
		uint16_t port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
							     : ((struct sockaddr_in6 *)&ss)->sin6_port);
		memset(&ss, 0, sizeof(ss));
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
		sin->sin_family = AF_INET;
		sin->sin_addr = ip;
		sin->sin_port = htons(port);
	}

	struct ferry_device *dev = calloc(1, sizeof(*dev));
	if (!dev)
		return ferry_err_set(err, ENOMEM, "rdma driver: out of memory");
	pthread_mutex_init(&dev->async_lock, NULL);
	dev->keepalive_ms = (unsigned)keepalive_ms;
	dev->dead_ms = (unsigned)dead_ms;
	dev->cq_entries = (int)cq_entries;
	char host[INET6_ADDRSTRLEN] = "?";
	getnameinfo((struct sockaddr *)&ss, sizeof(ss), host, sizeof(host), NULL, 0, NI_NUMERICHOST);
	dev->ec = rdma_create_event_channel();
	if (!dev->ec) {
		rc = ferry_err_set(err, errno ? errno : ENODEV, "rdma driver: cannot open rdma_cm (%s): is rdma_ucm loaded?",
				   strerror(errno));
		goto fail;
	}
	if (rdma_create_id(dev->ec, &dev->listen_id, NULL, RDMA_PS_TCP)) {
		rc = ferry_err_set(err, errno, "rdma driver: rdma_create_id: %s", strerror(errno));
		goto fail;
	}
	if (rdma_bind_addr(dev->listen_id, (struct sockaddr *)&ss)) {
		rc = ferry_err_set(err, errno, "rdma driver: cannot bind %s: %s", host, strerror(errno));
		goto fail;
	}
	if (!dev->listen_id->verbs) {
		rc = ferry_err_set(err, ENODEV, "rdma driver: %s is not the address of an RDMA device", host);
		goto fail;
	}
	dev->verbs = dev->listen_id->verbs;
	const char *bound = ibv_get_device_name(dev->verbs->device);
	if (dev_opt && strcmp(bound, dev_opt) != 0) {
		rc = ferry_err_set(err, EINVAL, "rdma driver: %s is on device %s, not %s", host, bound, dev_opt);
		goto fail;
	}
	if (rdma_listen(dev->listen_id, 64)) {
		rc = ferry_err_set(err, errno, "rdma driver: cannot listen on %s: %s", host, strerror(errno));
		goto fail;
	}
	if (set_nonblock(dev->ec->fd) || set_nonblock(dev->verbs->async_fd)) {
		rc = ferry_err_set(err, errno, "rdma driver: fcntl: %s", strerror(errno));
		goto fail;
	}
	dev->pd = ibv_alloc_pd(dev->verbs);
	if (!dev->pd) {
		rc = ferry_err_set(err, errno ? errno : ENOMEM, "rdma driver: cannot allocate a protection domain on %s", bound);
		goto fail;
	}
	dev->src = ss; /* the same address, any port */
	if (ss.ss_family == AF_INET6)
		((struct sockaddr_in6 *)&dev->src)->sin6_port = 0;
	else
		((struct sockaddr_in *)&dev->src)->sin_port = 0;
	unsigned port = ntohs(rdma_get_src_port(dev->listen_id));
	if (ss.ss_family == AF_INET6)
		snprintf(dev->endpoint, sizeof(dev->endpoint), "rdma:[%s]:%u", host, port);
	else
		snprintf(dev->endpoint, sizeof(dev->endpoint), "rdma:%s:%u", host, port);
	*out = dev;
	return 0;
fail:
	dev_free(dev);
	return rc;
}

static void rdma_close(struct ferry_device *dev)
{
	if (dev)
		dev_free(dev);
}

static int rdma_local_endpoint(struct ferry_device *dev, char *buf, size_t len, struct ferry_err *err)
{
	if (strlen(dev->endpoint) >= len)
		return ferry_err_set(err, ENOSPC, "endpoint buffer too small");
	strcpy(buf, dev->endpoint);
	return 0;
}

static int rdma_listen_fd(struct ferry_device *dev)
{
	return dev->ec->fd;
}

/* ---- lane set-up and teardown -------------------------------------------- */

static struct ferry_lane_drv *lane_alloc(struct ferry_device *dev, struct ferry_err *err)
{
	struct ferry_lane_drv *l = calloc(1, sizeof(*l));
	if (!l) {
		ferry_err_set(err, ENOMEM, "rdma lane: out of memory");
		return NULL;
	}
	l->dev = dev;
	l->epfd = l->evfd = -1;
	l->cur_slot = l->held_slot = -1;
	l->ec = rdma_create_event_channel();
	if (!l->ec) {
		ferry_err_set(err, errno, "rdma lane: rdma_create_event_channel: %s", strerror(errno));
		free(l);
		return NULL;
	}
	return l;
}

static void lane_free(struct ferry_lane_drv *l)
{
	if (l->id && l->id->qp)
		rdma_destroy_qp(l->id);
	if (l->cq) {
		ibv_ack_cq_events(l->cq, l->cq_events);
		ibv_destroy_cq(l->cq);
	}
	if (l->cc)
		ibv_destroy_comp_channel(l->cc);
	if (l->txmr)
		ibv_dereg_mr(l->txmr);
	if (l->rxmr)
		ibv_dereg_mr(l->rxmr);
	if (l->hdrmr)
		ibv_dereg_mr(l->hdrmr);
	free(l->hdrbuf);
	free(l->txbuf);
	free(l->rxbuf);
	if (l->id)
		rdma_destroy_id(l->id);
	if (l->ec)
		rdma_destroy_event_channel(l->ec);
	if (l->epfd >= 0)
		close(l->epfd);
	if (l->evfd >= 0)
		close(l->evfd);
	free(l);
}

static int post_recv(struct ferry_lane_drv *l, int slot)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(l->rxbuf + (size_t)slot * SLOT_BYTES), .length = SLOT_BYTES,
			       .lkey = l->rxmr->lkey };
	struct ibv_recv_wr wr = { .wr_id = RECV_BIT | (uint64_t)slot, .sg_list = &sge, .num_sge = 1 }, *bad;
	int rc = ibv_post_recv(l->qp, &wr, &bad);
	if (rc)
		lane_fail(l, rc, "cannot post a receive: %s", strerror(rc));
	return rc ? -rc : 0;
}

static int epoll_add(int epfd, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

/* Page-aligned memory to register (aligned_alloc wants a multiple of the alignment). */
static void *alloc_pages(size_t len)
{
	return aligned_alloc(4096, (len + 4095) & ~(size_t)4095);
}

/* Completion channel, CQ, QP on l->id, the registered pools, the receives
 * posted, and the wakeup fd (an epoll over the completion channel, the
 * connection's events, the device's async events and our own eventfd). */
static int lane_setup_qp(struct ferry_lane_drv *l, struct ferry_err *err)
{
	struct ferry_device *dev = l->dev;
	if (l->id->verbs != dev->verbs)
		return ferry_err_set(err, EXDEV, "rdma lane: the peer is reached through device %s, not %s",
				     ibv_get_device_name(l->id->verbs->device), ibv_get_device_name(dev->verbs->device));
	l->cc = ibv_create_comp_channel(dev->verbs);
	if (!l->cc || set_nonblock(l->cc->fd) || set_nonblock(l->ec->fd))
		return ferry_err_set(err, errno ? errno : ENOMEM, "rdma lane: completion channel: %s", strerror(errno));
	l->cq = ibv_create_cq(dev->verbs, dev->cq_entries, l, l->cc, 0);
	if (!l->cq)
		return ferry_err_set(err, errno ? errno : ENOMEM, "rdma lane: cannot create a CQ of %d entries: %s",
				     dev->cq_entries, strerror(errno));
	struct ibv_qp_init_attr qa = {
		.qp_context = l, .send_cq = l->cq, .recv_cq = l->cq, .qp_type = IBV_QPT_RC,
		.cap = { .max_send_wr = SQ_DEPTH, .max_recv_wr = RQ_TOTAL, .max_send_sge = 2, .max_recv_sge = 1,
			 .max_inline_data = INLINE_WANT },
	};
	if (rdma_create_qp(l->id, dev->pd, &qa)) {
		qa.cap.max_inline_data = 0; /* a device without inline sends */
		if (rdma_create_qp(l->id, dev->pd, &qa))
			return ferry_err_set(err, errno, "rdma lane: cannot create an RC queue pair: %s", strerror(errno));
	}
	l->qp = l->id->qp;
	l->max_inline = qa.cap.max_inline_data;
	l->txbuf = alloc_pages((size_t)TX_SLOTS * SLOT_BYTES);
	l->rxbuf = alloc_pages((size_t)RQ_TOTAL * SLOT_BYTES);
	l->hdrbuf = alloc_pages((size_t)SQ_DEPTH * HDR_STRIDE);
	if (!l->txbuf || !l->rxbuf || !l->hdrbuf)
		return ferry_err_set(err, ENOMEM, "rdma lane: out of memory for the message pools");
	/* Registered once for the lane's life, never per message. */
	l->txmr = ibv_reg_mr(dev->pd, l->txbuf, (size_t)TX_SLOTS * SLOT_BYTES, IBV_ACCESS_LOCAL_WRITE);
	l->rxmr = ibv_reg_mr(dev->pd, l->rxbuf, (size_t)RQ_TOTAL * SLOT_BYTES, IBV_ACCESS_LOCAL_WRITE);
	l->hdrmr = ibv_reg_mr(dev->pd, l->hdrbuf, (size_t)SQ_DEPTH * HDR_STRIDE, IBV_ACCESS_LOCAL_WRITE);
	if (!l->txmr || !l->rxmr || !l->hdrmr)
		return ferry_err_set(err, errno, "rdma lane: cannot register the message pools: %s (memlock limit?)",
				     strerror(errno));
	for (int i = 0; i < TX_SLOTS; i++)
		l->tx_free[i] = TX_SLOTS - 1 - i;
	l->tx_nfree = TX_SLOTS;
	for (int i = 0; i < RQ_TOTAL; i++)
		if (post_recv(l, i))
			return ferry_err_set(err, l->fail_code, "rdma lane: %s", l->fail_msg);
	l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (l->evfd < 0 || l->epfd < 0 || epoll_add(l->epfd, l->cc->fd) || epoll_add(l->epfd, l->ec->fd) ||
	    epoll_add(l->epfd, l->evfd) || epoll_add(l->epfd, dev->verbs->async_fd))
		return ferry_err_set(err, errno, "rdma lane: wakeup fd: %s", strerror(errno));
	uint8_t ack = ACK_TIMEOUT;
	if (rdma_set_option(l->id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &ack, sizeof(ack)))
		return ferry_err_set(err, errno, "rdma lane: cannot set the ACK timeout: %s", strerror(errno));
	l->heard_ns = l->posted_ns = mono_ns();
	return 0;
}

static struct rdma_conn_param conn_param(void)
{
	/* SEND and WRITE only: no RDMA READ resources. RNR retries without end
	 * cover the credit-only messages' spare receives. */
	struct rdma_conn_param p = { .responder_resources = 0, .initiator_depth = 0, .retry_count = RETRY_COUNT,
				     .rnr_retry_count = 7 };
	return p;
}

static int rdma_lane_accept(struct ferry_device *dev, struct ferry_lane_drv **out, struct ferry_err *err)
{
	struct rdma_cm_event *ev;
	if (rdma_get_cm_event(dev->ec, &ev)) {
		if (errno == EAGAIN || errno == EINTR)
			return -EAGAIN;
		return ferry_err_set(err, errno, "rdma accept: %s", strerror(errno));
	}
	if (ev->event != RDMA_CM_EVENT_CONNECT_REQUEST) {
		rdma_ack_cm_event(ev);
		return -EAGAIN;
	}
	struct rdma_cm_id *id = ev->id;
	rdma_ack_cm_event(ev);
	struct ferry_lane_drv *l = lane_alloc(dev, err);
	if (!l) {
		rdma_reject(id, NULL, 0);
		rdma_destroy_id(id);
		return -ENOMEM;
	}
	l->id = id;
	id->context = l;
	/* The lane's own channel: its connection events are its poller's. */
	int rc = rdma_migrate_id(id, l->ec);
	if (rc)
		rc = ferry_err_set(err, errno, "rdma accept: rdma_migrate_id: %s", strerror(errno));
	if (!rc)
		rc = lane_setup_qp(l, err);
	if (!rc) {
		struct rdma_conn_param p = conn_param();
		if (rdma_accept(id, &p))
			rc = ferry_err_set(err, errno, "rdma accept: %s", strerror(errno));
	}
	if (rc) {
		rdma_reject(id, NULL, 0);
		lane_free(l);
		return rc;
	}
	*out = l;
	return 0;
}

static uint64_t now_ms(void)
{
	return mono_ns() / 1000000u;
}

/* Connect-time wait for one rdma_cm event on the lane's channel. */
static int wait_cm(struct ferry_lane_drv *l, enum rdma_cm_event_type want, uint64_t deadline, const char *peer,
		   unsigned index, struct ferry_err *err)
{
	for (;;) {
		struct rdma_cm_event *ev;
		if (rdma_get_cm_event(l->ec, &ev) == 0) {
			enum rdma_cm_event_type got = ev->event;
			int status = ev->status;
			rdma_ack_cm_event(ev);
			if (got == want)
				return 0;
			if (got == RDMA_CM_EVENT_REJECTED)
				return ferry_err_set(err, ECONNREFUSED, "rdma lane %u: %s refused the connection (status %d)",
						     index, peer, status);
			return ferry_err_set(err, EHOSTUNREACH, "rdma lane %u: connecting to %s: %s (status %d)", index, peer,
					     rdma_event_str(got), status);
		}
		if (errno != EAGAIN && errno != EINTR)
			return ferry_err_set(err, errno, "rdma lane %u: rdma_get_cm_event: %s", index, strerror(errno));
		uint64_t now = now_ms();
		if (now >= deadline)
			return ferry_err_set(err, ETIMEDOUT, "rdma lane %u: connecting to %s timed out waiting for %s", index,
					     peer, rdma_event_str(want));
		struct pollfd p = { .fd = l->ec->fd, .events = POLLIN };
		poll(&p, 1, (int)(deadline - now));
	}
}

static int rdma_lane_connect(struct ferry_device *dev, const char *peer, unsigned index, int timeout_ms,
			     struct ferry_lane_drv **out, struct ferry_err *err)
{
	if (strncmp(peer, "rdma:", 5) != 0)
		return ferry_err_set(err, EINVAL, "rdma driver cannot reach endpoint '%s' (want rdma:IP:PORT)", peer);
	struct sockaddr_storage dst;
	int rc = parse_addr(peer + 5, &dst, err);
	if (rc)
		return rc;
	struct ferry_lane_drv *l = lane_alloc(dev, err);
	if (!l)
		return -ENOMEM;
	if (set_nonblock(l->ec->fd) || rdma_create_id(l->ec, &l->id, l, RDMA_PS_TCP)) {
		rc = ferry_err_set(err, errno, "rdma lane %u: rdma_create_id: %s", index, strerror(errno));
		goto fail;
	}
	uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 10000);
	int step_ms = timeout_ms > 0 && timeout_ms < 2000 ? timeout_ms : 2000;
	if (rdma_resolve_addr(l->id, (struct sockaddr *)&dev->src, (struct sockaddr *)&dst, step_ms)) {
		rc = ferry_err_set(err, errno, "rdma lane %u: cannot resolve %s: %s", index, peer, strerror(errno));
		goto fail;
	}
	if ((rc = wait_cm(l, RDMA_CM_EVENT_ADDR_RESOLVED, deadline, peer, index, err)))
		goto fail;
	if (rdma_resolve_route(l->id, step_ms)) {
		rc = ferry_err_set(err, errno, "rdma lane %u: no route to %s: %s", index, peer, strerror(errno));
		goto fail;
	}
	if ((rc = wait_cm(l, RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, peer, index, err)))
		goto fail;
	if ((rc = lane_setup_qp(l, err)))
		goto fail;
	struct rdma_conn_param p = conn_param();
	if (rdma_connect(l->id, &p)) {
		rc = ferry_err_set(err, errno, "rdma lane %u: rdma_connect to %s: %s", index, peer, strerror(errno));
		goto fail;
	}
	if ((rc = wait_cm(l, RDMA_CM_EVENT_ESTABLISHED, deadline, peer, index, err)))
		goto fail;
	l->established = true;
	*out = l;
	return 0;
fail:
	lane_free(l);
	return rc;
}

static void rdma_lane_close(struct ferry_lane_drv *l)
{
	if (!l)
		return;
	if (l->id && !l->disconnected)
		rdma_disconnect(l->id); /* best effort: tells the peer now */
	lane_free(l);
}

/* ---- memory ---------------------------------------------------------------- */

static int rdma_mem_register(struct ferry_device *dev, void *addr, size_t len, struct ferry_mr *mr,
			     struct ferry_err *err)
{
	if (len == 0)
		return ferry_err_set(err, EINVAL, "rdma: cannot register an empty region");
	struct ibv_mr *m = ibv_reg_mr(dev->pd, addr, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	if (!m)
		return ferry_err_set(err, errno, "rdma: cannot register %zu bytes: %s (memlock limit?)", len, strerror(errno));
	mr->addr = addr;
	mr->len = len;
	mr->rkey = m->rkey;
	mr->drv = m;
	return 0;
}

static void rdma_mem_deregister(struct ferry_device *dev, struct ferry_mr *mr)
{
	if (mr->drv)
		ibv_dereg_mr(mr->drv);
	mr->drv = NULL;
}

/* ---- completions and events ------------------------------------------------ */

static void check_cm(struct ferry_lane_drv *l);
static void check_events(struct ferry_lane_drv *l, bool now);

static const char *wc_op(const struct ibv_wc *wc, const struct ferry_lane_drv *l)
{
	if (wc->wr_id & RECV_BIT)
		return "receive";
	const struct sq_rec *r = &l->sq[wc->wr_id % SQ_DEPTH];
	return r->kind == SQ_WRITE    ? "one-sided write"
	       : r->kind == SQ_CREDIT ? "credit message"
	       : r->kind == SQ_PROBE  ? "keepalive probe"
				      : "send";
}

static void wc_failed(struct ferry_lane_drv *l, const struct ibv_wc *wc)
{
	const char *op = wc_op(wc, l);
	switch (wc->status) {
	case IBV_WC_WR_FLUSH_ERR:
		/* A disconnect or an async error (CQ overrun) flushes the queue
		 * pair: say that, if it is why. */
		check_events(l, true);
		if (l->disconnected)
			lane_fail(l, ECONNRESET, "peer closed the lane");
		else
			lane_fail(l, EIO, "queue pair in error state (%s flushed)", op);
		break;
	case IBV_WC_RETRY_EXC_ERR:
	case IBV_WC_RNR_RETRY_EXC_ERR:
		lane_fail(l, EHOSTUNREACH, "peer vanished: %s failed with '%s'", op, ibv_wc_status_str(wc->status));
		break;
	case IBV_WC_REM_ACCESS_ERR:
	case IBV_WC_LOC_PROT_ERR:
		lane_fail(l, EACCES, "%s failed with '%s' (a key or address outside a registered region)", op,
			  ibv_wc_status_str(wc->status));
		break;
	default:
		lane_fail(l, EIO, "%s failed with '%s' (vendor error 0x%x)", op, ibv_wc_status_str(wc->status),
			  wc->vendor_err);
	}
}

static void complete_cookie(struct ferry_lane_drv *l, void *cookie)
{
	if (!cookie)
		return;
	l->done[(l->done_head + l->done_count) % DONE_DEPTH] = cookie;
	l->done_count++;
}

/* A signalled send completed: everything posted up to it has too. */
static void retire_sends(struct ferry_lane_drv *l, uint64_t seq)
{
	while (l->sq_tail <= seq && l->sq_tail < l->sq_head) {
		struct sq_rec *r = &l->sq[l->sq_tail % SQ_DEPTH];
		if (r->kind == SQ_SLOT)
			l->tx_free[l->tx_nfree++] = r->slot;
		else if (r->kind == SQ_ZEROCOPY)
			complete_cookie(l, r->cookie); /* the caller's buffer is free again */
		else if (r->kind == SQ_CREDIT || r->kind == SQ_PROBE)
			l->credit_inflight = false;
		else if (r->kind == SQ_WRITE) {
			l->writes--;
			complete_cookie(l, r->cookie);
		}
		r->kind = 0;
		l->sq_tail++;
	}
}

static void recv_done(struct ferry_lane_drv *l, int slot)
{
	if (post_recv(l, slot) == 0)
		l->freed++;
}

static void handle_wc(struct ferry_lane_drv *l, const struct ibv_wc *wc)
{
	if (wc->status != IBV_WC_SUCCESS) {
		wc_failed(l, wc);
		return;
	}
	if (!(wc->wr_id & RECV_BIT)) {
		retire_sends(l, wc->wr_id);
		return;
	}
	int slot = (int)(wc->wr_id & 0xffff);
	l->heard = true;
	if (wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
		/* A one-sided write landed; its bytes are in the region already.
		 * It used one of our receives (and one of the peer's credits). */
		recv_done(l, slot);
		return;
	}
	if (wc->wc_flags & IBV_WC_WITH_IMM)
		l->peer_freed = ntohl(wc->imm_data);
	if (wc->byte_len == 0) {
		/* credit-only: a spare receive, no credit to give back */
		post_recv(l, slot);
		return;
	}
	if (l->rxq_count == RQ_TOTAL) {
		lane_fail(l, EPROTO, "more messages than posted receives");
		return;
	}
	l->rxq[(l->rxq_head + l->rxq_count) % RQ_TOTAL] = (struct rxmsg){ slot, wc->byte_len };
	l->rxq_count++;
}

/* Asynchronous events that fail one lane (the CQ's or the QP's). */
static const struct async_kind {
	enum ibv_event_type type;
	bool on_cq;
	int code;
	const char *what;
} async_kinds[] = {
	{ IBV_EVENT_CQ_ERR, true, EIO, "CQ overrun: the completion queue was too small for the work posted" },
	{ IBV_EVENT_QP_FATAL, false, EIO, "queue pair in error state (fatal)" },
	{ IBV_EVENT_QP_REQ_ERR, false, EIO, "queue pair in error state (invalid request)" },
	{ IBV_EVENT_QP_ACCESS_ERR, false, EACCES, "remote access error" },
};

static void check_async(struct ferry_lane_drv *l)
{
	struct ferry_device *dev = l->dev;
	pthread_mutex_lock(&dev->async_lock);
	struct ibv_async_event ev;
	while (ibv_get_async_event(dev->verbs, &ev) == 0) {
		struct ferry_lane_drv *t = NULL;
		const struct async_kind *k = NULL;
		for (size_t i = 0; i < sizeof(async_kinds) / sizeof(async_kinds[0]); i++)
			if (async_kinds[i].type == ev.event_type)
				k = &async_kinds[i];
		if (k && k->on_cq)
			t = ev.element.cq->cq_context;
		else if (k)
			t = ev.element.qp->qp_context;
		if (ev.event_type == IBV_EVENT_DEVICE_FATAL)
			__atomic_store_n(&dev->fatal, 1, __ATOMIC_RELEASE);
		const char *what = k ? k->what : NULL;
		int code = k ? k->code : EIO;
		if (t && what && !__atomic_load_n(&t->async_code, __ATOMIC_ACQUIRE)) {
			snprintf(t->async_msg, sizeof(t->async_msg), "%s", what);
			__atomic_store_n(&t->async_code, code, __ATOMIC_RELEASE);
			uint64_t one = 1;
			ssize_t w = write(t->evfd, &one, sizeof(one));
			(void)w;
		}
		ibv_ack_async_event(&ev);
	}
	pthread_mutex_unlock(&dev->async_lock);
}

static void check_cm(struct ferry_lane_drv *l)
{
	struct rdma_cm_event *ev;
	while (rdma_get_cm_event(l->ec, &ev) == 0) {
		enum rdma_cm_event_type t = ev->event;
		rdma_ack_cm_event(ev);
		if (t == RDMA_CM_EVENT_ESTABLISHED) {
			l->established = true;
		} else if (t == RDMA_CM_EVENT_DISCONNECTED) {
			l->disconnected = true;
			lane_fail(l, ECONNRESET, "peer closed the lane");
		} else if (t == RDMA_CM_EVENT_DEVICE_REMOVAL) {
			lane_fail(l, ENODEV, "the RDMA device was removed");
		} else if (t != RDMA_CM_EVENT_TIMEWAIT_EXIT) {
			lane_fail(l, EIO, "connection event %s", rdma_event_str(t));
		}
	}
}

static void keepalive(struct ferry_lane_drv *l, uint64_t t);

/* Reap completions; when there are none, look at the slower event sources. */
/* Handle what the CQ holds: one batch, or until it is empty (all). Returns
 * completions handled; a failed poll fails the lane. */
static int reap_cq(struct ferry_lane_drv *l, bool all)
{
	struct ibv_wc wc[32];
	int total = 0, n;
	while ((n = ibv_poll_cq(l->cq, 32, wc)) > 0) {
		for (int i = 0; i < n; i++)
			handle_wc(l, &wc[i]);
		total += n;
		if (!all)
			break;
	}
	if (n < 0)
		lane_fail(l, EIO, "polling the completion queue failed");
	return total;
}

static void poll_lane(struct ferry_lane_drv *l)
{
	if (l->evfd_set || __atomic_load_n(&l->async_code, __ATOMIC_ACQUIRE)) {
		uint64_t v;
		ssize_t r = read(l->evfd, &v, sizeof(v));
		(void)r;
		l->evfd_set = false;
	}
	if (reap_cq(l, true) == 0)
		check_events(l, false);
}

/* Connection and device events: a syscall, so at most once a millisecond
 * while the lane is busy (a busy lane sees a failure in its completions
 * anyway), and always before it sleeps. */
static void check_events(struct ferry_lane_drv *l, bool now)
{
	uint64_t t = mono_ns();
	if (!now && t - l->slow_check_ns < 1000000)
		return;
	l->slow_check_ns = t;
	struct pollfd p[2] = { { .fd = l->ec->fd, .events = POLLIN }, { .fd = l->dev->verbs->async_fd, .events = POLLIN } };
	if (poll(p, 2, 0) > 0) {
		if (p[0].revents)
			check_cm(l);
		if (p[1].revents)
			check_async(l);
	}
	int ac = __atomic_load_n(&l->async_code, __ATOMIC_ACQUIRE);
	if (ac)
		lane_fail(l, ac, "%s", l->async_msg);
	if (__atomic_load_n(&l->dev->fatal, __ATOMIC_ACQUIRE))
		lane_fail(l, EIO, "the RDMA device reported a fatal error");
	/* Last: a disconnect or async error already known is the reason, not a probe. */
	keepalive(l, t);
}

/* ---- send side ------------------------------------------------------------- */

static unsigned sq_room(const struct ferry_lane_drv *l)
{
	return SQ_DEPTH - (unsigned)(l->sq_head - l->sq_tail);
}

static unsigned credits(const struct ferry_lane_drv *l)
{
	uint32_t used = l->sent - l->peer_freed;
	return used >= RQ_DATA ? 0 : RQ_DATA - used;
}

/* Post a chain of n work requests (one doorbell), recording each. */
static int post_chain(struct ferry_lane_drv *l, struct ibv_send_wr *wr, const struct sq_rec *recs, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		uint64_t seq = l->sq_head + i;
		wr[i].wr_id = seq;
		wr[i].next = i + 1 < n ? &wr[i + 1] : NULL;
		/* A zero-copy frame's buffer stays the caller's until its send
		 * completes: signal it, or the caller could wait for ever. */
		bool sig = recs[i].kind == SQ_WRITE || recs[i].kind == SQ_CREDIT || recs[i].kind == SQ_PROBE ||
			   (recs[i].kind == SQ_ZEROCOPY && recs[i].cookie);
		if (!sig) {
			l->unsignaled++;
			/* Batch: signal every SIGNAL_EVERY, and whenever the ring or
			 * the slots run low, so a full lane always has a completion
			 * coming that frees it. */
			sig = l->unsignaled >= SIGNAL_EVERY || sq_room(l) - i <= SIGNAL_EVERY ||
			      (recs[i].kind == SQ_SLOT && l->tx_nfree == 0 && i + 1 == n);
		}
		if (sig) {
			wr[i].send_flags |= IBV_SEND_SIGNALED;
			l->unsignaled = 0;
		}
		l->sq[seq % SQ_DEPTH] = recs[i];
	}
	struct ibv_send_wr *bad = NULL;
	int rc = ibv_post_send(l->qp, wr, &bad);
	if (rc) {
		lane_fail(l, rc, "cannot post a send: %s", strerror(rc));
		return -rc;
	}
	l->sq_head += n;
	l->posted = true;
	return 0;
}

/* A credit-only message: a zero-length SEND_WITH_IMM into one of the peer's
 * spare receives, carrying our count of freed receives. */
static void send_credit(struct ferry_lane_drv *l, enum sq_kind kind)
{
	struct ibv_send_wr wr = { .opcode = IBV_WR_SEND_WITH_IMM, .imm_data = htonl(l->freed) };
	struct sq_rec rec = { .kind = (uint8_t)kind, .slot = -1 };
	if (post_chain(l, &wr, &rec, 1) == 0) {
		l->reported = l->freed;
		l->credit_inflight = true;
	}
}

static void maybe_send_credit(struct ferry_lane_drv *l)
{
	uint32_t owed = l->freed - l->reported;
	if (owed == 0 || l->credit_inflight || l->fail_code || sq_room(l) < 2)
		return;
	/* Report in batches, or at once when we have drained everything (the
	 * peer may be waiting for exactly these). */
	if (owed < CREDIT_BATCH && (l->rxq_count > 0 || l->cur_slot >= 0))
		return;
	send_credit(l, SQ_CREDIT);
}

/* An RC queue pair with nothing to send never learns that its peer's host
 * died. So, every keepalive_ms without a send, probe with a credit-only
 * message: to a vanished host it errors once the ACK timeout's retries run
 * out ("peer vanished"). A peer whose ferry stopped running (hung, stopped)
 * still has its kernel or NIC acknowledge: it is caught by its own probes
 * no longer arriving for dead_ms. */
static void keepalive(struct ferry_lane_drv *l, uint64_t t)
{
	const struct ferry_device *dev = l->dev;
	if (!dev->keepalive_ms || l->fail_code)
		return;
	if (l->heard) {
		l->heard = false;
		l->heard_ns = t;
	}
	if (l->posted) {
		l->posted = false;
		l->posted_ns = t;
	}
	if (t - l->heard_ns >= (uint64_t)dev->dead_ms * 1000000u) {
		lane_fail(l, ETIMEDOUT, "peer stopped answering: nothing came from it for %u ms (keepalive every %u ms)",
			  (unsigned)((t - l->heard_ns) / 1000000u), dev->keepalive_ms);
		return;
	}
	if (t - l->posted_ns >= (uint64_t)dev->keepalive_ms * 1000000u && !l->credit_inflight && sq_room(l) >= 2) {
		send_credit(l, SQ_PROBE);
		l->posted_ns = t;
		l->posted = false;
	}
}

static size_t frame_msgs(const struct ferry_lane_drv *l, size_t total)
{
	if (total <= l->max_inline)
		return 1;
	return (total + SLOT_BYTES - 1) / SLOT_BYTES;
}

static bool room_for(const struct ferry_lane_drv *l, unsigned msgs, bool inl)
{
	return credits(l) >= msgs && (inl || l->tx_nfree >= msgs) && sq_room(l) >= msgs + 1 &&
	       l->done_count < DONE_DEPTH;
}

/* A frame whose payload lies in registered memory: the header from this send
 * queue entry's header buffer, the payload straight from the caller's memory
 * (no copy); the caller's cookie completes when the last message does. */
static int send_zerocopy(struct ferry_lane_drv *l, const struct ferry_tx_frame *f, unsigned msgs)
{
	struct ibv_send_wr wr[TX_SLOTS / 2];
	struct ibv_sge sge[TX_SLOTS / 2][2];
	struct sq_rec rec[TX_SLOTS / 2];
	const uint8_t *payload = f->iov[0].iov_base;
	uint32_t lkey = ((struct ibv_mr *)f->mr->drv)->lkey;
	size_t len = f->hdr.length, off = 0;
	memset(wr, 0, sizeof(wr[0]) * msgs);
	for (unsigned m = 0; m < msgs; m++) {
		unsigned ns = 0;
		size_t cap = SLOT_BYTES;
		if (m == 0) {
			uint8_t *h = l->hdrbuf + ((l->sq_head) % SQ_DEPTH) * HDR_STRIDE;
			ferry_wire_encode(&f->hdr, NULL, h);
			sge[m][ns++] = (struct ibv_sge){ .addr = (uintptr_t)h, .length = FERRY_WIRE_HDR_LEN, .lkey = l->hdrmr->lkey };
			cap -= FERRY_WIRE_HDR_LEN;
		}
		size_t take = len - off < cap ? len - off : cap;
		if (take)
			sge[m][ns++] = (struct ibv_sge){ .addr = (uintptr_t)(payload + off), .length = (uint32_t)take, .lkey = lkey };
		off += take;
		wr[m].sg_list = sge[m];
		wr[m].num_sge = (int)ns;
		wr[m].opcode = IBV_WR_SEND_WITH_IMM;
		wr[m].imm_data = htonl(l->freed);
		rec[m] = (struct sq_rec){ .kind = SQ_ZEROCOPY, .slot = -1, .cookie = m + 1 == msgs ? f->cookie : NULL };
	}
	if (post_chain(l, wr, rec, msgs))
		return -1;
	l->reported = l->freed;
	l->sent += msgs;
	return 0;
}

static int rdma_tx_burst(struct ferry_lane_drv *l, const struct ferry_tx_frame *frames, unsigned n,
			 struct ferry_err *err)
{
	if (l->fail_code)
		return lane_err(l, err);
	if (l->tx_nfree < TX_SLOTS / 4)
		poll_lane(l);
	unsigned taken = 0;
	for (; taken < n; taken++) {
		const struct ferry_tx_frame *f = &frames[taken];
		size_t len = 0;
		for (unsigned i = 0; i < f->iovcnt; i++)
			len += f->iov[i].iov_len;
		if (len != f->hdr.length)
			return ferry_err_set(err, EINVAL, "rdma tx: payload %zu bytes but header says %u", len, f->hdr.length);
		size_t total = FERRY_WIRE_HDR_LEN + len;
		bool inl = total <= l->max_inline;
		unsigned msgs = (unsigned)frame_msgs(l, total);
		if (msgs > TX_SLOTS / 2)
			return ferry_err_set(err, EMSGSIZE, "rdma tx: a %zu byte frame is too large", total);
		bool zc = !inl && f->mr && f->mr->drv && f->iovcnt == 1 &&
			  (const uint8_t *)f->iov[0].iov_base >= (const uint8_t *)f->mr->addr &&
			  (const uint8_t *)f->iov[0].iov_base + len <= (const uint8_t *)f->mr->addr + f->mr->len;
		if (!room_for(l, msgs, inl || zc)) {
			l->need_msgs = msgs;
			break;
		}
		if (zc) {
			if (send_zerocopy(l, f, msgs))
				return lane_err(l, err);
			continue;
		}
		struct ibv_send_wr wr[TX_SLOTS / 2];
		struct ibv_sge sge[TX_SLOTS / 2];
		struct sq_rec rec[TX_SLOTS / 2];
		uint8_t small[INLINE_WANT];
		memset(wr, 0, sizeof(wr[0]) * msgs);
		/* Copy header + payload into the message buffers, slot by slot. */
		unsigned iv = 0;
		size_t ivoff = 0;
		size_t left = total;
		for (unsigned m = 0; m < msgs; m++) {
			uint8_t *buf;
			size_t cap;
			if (inl) {
				buf = small;
				cap = sizeof(small);
				rec[m] = (struct sq_rec){ .kind = SQ_INLINE, .slot = -1 };
			} else {
				int slot = l->tx_free[--l->tx_nfree];
				buf = l->txbuf + (size_t)slot * SLOT_BYTES;
				cap = SLOT_BYTES;
				rec[m] = (struct sq_rec){ .kind = SQ_SLOT, .slot = slot };
			}
			size_t fill = left < cap ? left : cap, at = 0;
			if (m == 0) {
				ferry_wire_encode(&f->hdr, NULL, buf);
				at = FERRY_WIRE_HDR_LEN;
			}
			while (at < fill) {
				size_t chunk = f->iov[iv].iov_len - ivoff;
				if (chunk > fill - at)
					chunk = fill - at;
				memcpy(buf + at, (const uint8_t *)f->iov[iv].iov_base + ivoff, chunk);
				at += chunk;
				ivoff += chunk;
				if (ivoff == f->iov[iv].iov_len) {
					iv++;
					ivoff = 0;
				}
			}
			left -= fill;
			sge[m] = (struct ibv_sge){ .addr = (uintptr_t)buf, .length = (uint32_t)fill,
						   .lkey = inl ? 0 : l->txmr->lkey };
			wr[m].sg_list = &sge[m];
			wr[m].num_sge = 1;
			wr[m].opcode = IBV_WR_SEND_WITH_IMM;
			wr[m].imm_data = htonl(l->freed); /* credits ride on every message */
			wr[m].send_flags = inl ? IBV_SEND_INLINE : 0;
		}
		if (post_chain(l, wr, rec, msgs))
			return lane_err(l, err);
		l->reported = l->freed;
		l->sent += msgs;
		/* The payload is in our buffers now: the caller may reuse its own. */
		complete_cookie(l, f->cookie);
	}
	return (int)taken;
}

static int rdma_tx_flush(struct ferry_lane_drv *l, struct ferry_err *err)
{
	poll_lane(l);
	if (l->fail_code)
		return lane_err(l, err);
	maybe_send_credit(l);
	if (l->need_msgs) {
		if (!room_for(l, l->need_msgs, false))
			return -EAGAIN;
		l->need_msgs = 0;
	}
	if (l->need_write) {
		if (credits(l) < 1 || l->writes >= WRITES_MAX || sq_room(l) < 2)
			return -EAGAIN;
		l->need_write = false;
	}
	return 0;
}

static int rdma_poll_completions(struct ferry_lane_drv *l, void **cookies, unsigned n)
{
	unsigned k = 0;
	while (k < n && l->done_count > 0) {
		cookies[k++] = l->done[l->done_head];
		l->done_head = (l->done_head + 1) % DONE_DEPTH;
		l->done_count--;
	}
	return (int)k;
}

static int rdma_write_remote(struct ferry_lane_drv *l, const struct ferry_mr *local, size_t local_off, uint64_t rkey,
			     uint64_t remote_off, size_t len, uint32_t imm, void *cookie, struct ferry_err *err)
{
	if (l->fail_code)
		return lane_err(l, err);
	if (!local->drv || local_off > local->len || len > local->len - local_off || len > (1u << 30) || len == 0)
		return ferry_err_set(err, EINVAL, "rdma write: %zu bytes at %zu do not fit the local region (%zu bytes)", len,
				     local_off, local->len);
	if (credits(l) < 1 || l->writes >= WRITES_MAX || sq_room(l) < 2 || (cookie && l->done_count + l->writes >= DONE_DEPTH)) {
		poll_lane(l);
		if (credits(l) < 1 || l->writes >= WRITES_MAX || sq_room(l) < 2) {
			l->need_write = true;
			return -EAGAIN;
		}
	}
	struct ibv_sge sge = { .addr = (uintptr_t)local->addr + local_off, .length = (uint32_t)len,
			       .lkey = ((struct ibv_mr *)local->drv)->lkey };
	/* Zero copies: the NIC reads the source region and places the bytes in
	 * the peer's; the immediate announces it with a completion there. */
	struct ibv_send_wr wr = { .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
				  .imm_data = htonl(imm) };
	wr.wr.rdma.remote_addr = remote_off;
	wr.wr.rdma.rkey = (uint32_t)rkey;
	struct sq_rec rec = { .kind = SQ_WRITE, .slot = -1, .cookie = cookie };
	if (post_chain(l, &wr, &rec, 1))
		return lane_err(l, err);
	l->writes++;
	l->sent++;
	return 0;
}

/* ---- receive side ---------------------------------------------------------- */

static void release_slot(struct ferry_lane_drv *l, int *slot)
{
	if (*slot >= 0) {
		recv_done(l, *slot);
		*slot = -1;
	}
}

static bool rxq_pop(struct ferry_lane_drv *l, struct rxmsg *m)
{
	if (l->rxq_count == 0)
		return false;
	*m = l->rxq[l->rxq_head];
	l->rxq_head = (l->rxq_head + 1) % RQ_TOTAL;
	l->rxq_count--;
	return true;
}

static bool payload_goes_to_caller(const struct ferry_frame_hdr *h)
{
	return h->type == FERRY_FT_DATA || h->type == FERRY_FT_REGION_WRITE;
}

static int rdma_rx_burst(struct ferry_lane_drv *l, struct ferry_rx_frame *frames, unsigned n,
			 struct ferry_err *err)
{
	/* A control frame's payload was valid until this call. */
	release_slot(l, &l->held_slot);
	if (l->frame_left > 0)
		return 0; /* the caller still owes the last frame's payload */
	poll_lane(l);
	maybe_send_credit(l);
	struct rxmsg m;
	if (!rxq_pop(l, &m)) {
		if (l->fail_code)
			return lane_err(l, err);
		return 0;
	}
	uint8_t *buf = l->rxbuf + (size_t)m.slot * SLOT_BYTES;
	struct ferry_rx_frame *f = &frames[0];
	if (m.len < FERRY_WIRE_HDR_LEN) {
		recv_done(l, m.slot);
		return ferry_err_set(err, EPROTO, "rdma rx: a %u byte message where a frame header was due", m.len);
	}
	int rc = ferry_wire_decode(buf, &f->hdr, err);
	if (rc) {
		recv_done(l, m.slot);
		return rc;
	}
	uint32_t here = m.len - FERRY_WIRE_HDR_LEN;
	if (here > f->hdr.length) {
		recv_done(l, m.slot);
		return ferry_err_set(err, EPROTO, "rdma rx: %s frame of %u bytes came with %u", ferry_wire_type_name(f->hdr.type),
				     f->hdr.length, here);
	}
	f->drv = NULL;
	if (payload_goes_to_caller(&f->hdr)) {
		f->payload = NULL;
		f->pending = true;
		l->frame_left = f->hdr.length;
		l->cur_slot = m.slot;
		l->cur_off = FERRY_WIRE_HDR_LEN;
		l->cur_len = m.len;
		if (here == 0)
			release_slot(l, &l->cur_slot);
		(void)n;
		return 1;
	}
	if (here != f->hdr.length) {
		recv_done(l, m.slot);
		return ferry_err_set(err, EPROTO, "rdma rx: %s frame split over messages", ferry_wire_type_name(f->hdr.type));
	}
	f->payload = buf + FERRY_WIRE_HDR_LEN;
	f->pending = false;
	l->held_slot = m.slot;
	return 1;
}

/* Take up to len bytes of the pending payload, message by message, copying
 * them to dst unless it is NULL (rx_consume: the caller used them in place);
 * each receive is re-posted as soon as its message is used up. */
/* A received message longer than what its frame has left to deliver. */
static int long_continuation(uint32_t len, uint64_t left, struct ferry_err *err)
{
	return ferry_err_set(err, EPROTO, "rdma rx: a %u byte continuation for %" PRIu64 " bytes left", len, left);
}

static ssize_t rdma_rx_payload(struct ferry_lane_drv *l, void *dst, size_t len, struct ferry_err *err)
{
	size_t got = 0;
	if (len > l->frame_left)
		len = l->frame_left;
	while (got < len) {
		if (l->cur_slot < 0) {
			struct rxmsg m;
			if (!rxq_pop(l, &m)) {
				poll_lane(l);
				if (!rxq_pop(l, &m))
					break;
			}
			if ((uint64_t)m.len > l->frame_left) {
				recv_done(l, m.slot);
				return long_continuation(m.len, l->frame_left, err);
			}
			l->cur_slot = m.slot;
			l->cur_off = 0;
			l->cur_len = m.len;
		}
		size_t take = l->cur_len - l->cur_off;
		if (take > len - got)
			take = len - got;
		if (dst)
			memcpy((uint8_t *)dst + got, l->rxbuf + (size_t)l->cur_slot * SLOT_BYTES + l->cur_off, take);
		got += take;
		l->cur_off += (uint32_t)take;
		l->frame_left -= take;
		if (l->cur_off == l->cur_len)
			release_slot(l, &l->cur_slot);
	}
	if (l->frame_left == 0 && l->cur_slot >= 0)
		release_slot(l, &l->cur_slot);
	maybe_send_credit(l);
	if (got == 0 && l->fail_code)
		return lane_err(l, err);
	return (ssize_t)got;
}

/* The pending payload where it landed: the rest of the current message's
 * receive buffer, then the frame's further messages as they arrived. */
static int rdma_rx_peek(struct ferry_lane_drv *l, struct iovec *iov, unsigned n, struct ferry_err *err)
{
	if (l->frame_left == 0 || n == 0)
		return 0;
	poll_lane(l);
	uint64_t left = l->frame_left;
	unsigned out = 0;
	if (l->cur_slot >= 0) {
		iov[out++] = (struct iovec){ .iov_base = l->rxbuf + (size_t)l->cur_slot * SLOT_BYTES + l->cur_off,
					     .iov_len = l->cur_len - l->cur_off };
		left -= l->cur_len - l->cur_off;
	}
	for (unsigned i = 0; out < n && left > 0 && i < l->rxq_count; i++) {
		const struct rxmsg *m = &l->rxq[(l->rxq_head + i) % RQ_TOTAL];
		if ((uint64_t)m->len > left)
			return long_continuation(m->len, left, err);
		iov[out++] = (struct iovec){ .iov_base = l->rxbuf + (size_t)m->slot * SLOT_BYTES, .iov_len = m->len };
		left -= m->len;
	}
	if (out == 0 && l->fail_code)
		return lane_err(l, err);
	return (int)out;
}

static int rdma_rx_consume(struct ferry_lane_drv *l, size_t len, struct ferry_err *err)
{
	if (len > l->frame_left)
		return ferry_err_set(err, EINVAL, "rdma rx: %zu bytes consumed, %" PRIu64 " pending", len, l->frame_left);
	ssize_t got = rdma_rx_payload(l, NULL, len, err);
	if (got < 0)
		return (int)got;
	if ((size_t)got != len)
		return ferry_err_set(err, EINVAL, "rdma rx: %zu bytes consumed, %zd had arrived", len, got);
	return 0;
}

static void rdma_rx_release(struct ferry_lane_drv *l, struct ferry_rx_frame *frames, unsigned n)
{
	release_slot(l, &l->held_slot);
}

static int rdma_wakeup_fd(struct ferry_lane_drv *l, short *events, bool want_tx)
{
	*events = POLLIN;
	if (!l->cq)
		return l->epfd;
	/* Consume the completion event that woke us last (if it came), re-arm. */
	if (l->armed) {
		struct ibv_cq *cq;
		void *ctx;
		if (ibv_get_cq_event(l->cc, &cq, &ctx) == 0 && ++l->cq_events >= 64) {
			ibv_ack_cq_events(l->cq, l->cq_events);
			l->cq_events = 0;
		}
	}
	l->armed = ibv_req_notify_cq(l->cq, 0) == 0;
	check_events(l, true);
	/* Completions that arrived before the CQ was armed raise no event:
	 * reap them now, and wake ourselves if there were any (or the lane has
	 * just failed). Reaped here rather than kept for later: whatever the
	 * owner calls next (a lane stuck mid-frame, its target not reading,
	 * may call little), the peer's probes count and their spare receives
	 * are re-posted, so a slow reader never looks like a dead peer. */
	if (reap_cq(l, false) > 0 || l->fail_code) {
		uint64_t one = 1;
		ssize_t w = write(l->evfd, &one, sizeof(one));
		(void)w;
		l->evfd_set = true;
	}
	return l->epfd;
}

const struct ferry_driver_ops ferry_rdma_driver = {
	.name = "rdma",
	.caps = FERRY_DRV_RELIABLE | FERRY_DRV_ONESIDED,
	.open = rdma_open,
	.close = rdma_close,
	.local_endpoint = rdma_local_endpoint,
	.listen_fd = rdma_listen_fd,
	.lane_accept = rdma_lane_accept,
	.lane_connect = rdma_lane_connect,
	.lane_close = rdma_lane_close,
	.mem_register = rdma_mem_register,
	.mem_deregister = rdma_mem_deregister,
	.tx_burst = rdma_tx_burst,
	.tx_flush = rdma_tx_flush,
	.poll_completions = rdma_poll_completions,
	.rx_burst = rdma_rx_burst,
	.rx_payload = rdma_rx_payload,
	.rx_release = rdma_rx_release,
	.rx_peek = rdma_rx_peek,
	.rx_consume = rdma_rx_consume,
	.write_remote = rdma_write_remote,
	.wakeup_fd = rdma_wakeup_fd,
};
