#include "rldrv.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "../drivers/wire.h"

#define BURST 32
#define INBOX_MAX 512          /* datagrams handed over to a lane, waiting */
#define ACCEPT_MAX 64          /* first datagrams of new connections, waiting */
#define CLOSED_MAX 64          /* recently closed connections whose stragglers we ignore */
#define CLOSED_NS (10ull * 1000000000ull)
#define LIVE_NS (5ull * 1000000ull)       /* a queue nobody received from this long gets swept */
#define SWEEP_NS (5ull * 1000000ull)      /* the acceptor's sweep period */
#define LINGER_NS (2ull * 1000000000ull)  /* closing: wait this long at most for acks ... */
#define LINGER_QUIET_NS (200ull * 1000000ull) /* ... or this long without hearing the peer */
#define PUMPS_PER_READ 8
#define PUMP_GAP_NS (100ull * 1000ull)    /* tx_flush reads input not read for this long */
#define DEFAULT_POLL_US 200
#define INLINE_CTRL (FERRY_RL_INLINE_MAX - FERRY_WIRE_HDR_LEN)
#define PEEK_SEGS 64           /* segments one rx_peek lends at most */

struct item {                  /* a received datagram copied for another thread */
	struct item *next;
	unsigned q;
	size_t len;
	struct ferry_dgram_addr src;
	uint8_t data[];
};

struct fifo {
	struct item *head, *tail;
	unsigned count;
};

struct rq {
	pthread_mutex_t rx_lock, tx_lock;
	unsigned lanes;            /* attached lanes; under dev->lock */
	uint64_t last_rx_ns;       /* atomic: last receive by any thread */
	int fd;                    /* backend wakeup fd or -1 */
	short fd_events;
	bool in_listen;            /* fd is in the listen epoll (the queue is idle) */
};

struct closed_conn {
	uint32_t conn;
	struct ferry_dgram_addr peer;
	uint64_t until;
};

struct ferry_device {
	const struct ferry_dgram_ops *b;
	struct ferry_dgram_dev *bd;
	unsigned nq;
	size_t dgram;
	struct rq *q;
	struct ferry_rl_config rlcfg;      /* template for every lane */
	bool has_fault;
	struct ferry_fault_config fault;
	uint64_t poll_ns;
	pthread_mutex_t lock;              /* lanes, accept, closed, queue lane counts */
	struct ferry_lane_drv *lanes;
	struct fifo accept;
	struct closed_conn closed[CLOSED_MAX];
	unsigned closed_next;
	int accept_evfd, sweep_tfd, listen_epfd;
	uint64_t last_sweep;
};

struct txslot {
	void *cookie;              /* the caller's */
	void *copy;                /* a control payload we copied */
};

struct ferry_lane_drv {
	struct ferry_device *dev;
	pthread_mutex_t op_lock;   /* held by every entry point (see lane_enter) */
	uint64_t last_op_ns;       /* atomic: when an owner last called in */
	struct ferry_lane_drv *next;
	unsigned q;
	uint32_t conn;
	struct ferry_dgram_addr peer;
	char peer_str[64];
	struct ferry_rl *rl;
	struct ferry_fault *fault;
	uint8_t *scratch;          /* fault path: a datagram made contiguous */
	uint64_t now;              /* time of the current poll (fault emit) */
	uint64_t last_pump_ns;     /* when input was last taken (owner or sweep, under op_lock) */
	/* inbox: datagrams other threads received for us */
	pthread_mutex_t in_lock;
	struct fifo inbox;
	unsigned in_count;         /* atomic mirror of inbox.count */
	bool poked;                /* atomic: evfd was written since the last drain */
	int evfd, epfd;
	int tfd;                   /* backends without a wakeup fd: a one-shot poll timer */
	short qfd_events;          /* as registered in epfd */
	/* tx */
	struct txslot *slots;
	unsigned slot_cap, slot_head, slot_count;
	bool wire_full;
	uint64_t tx_by_ref;        /* datagrams whose payload the backend sent without copying */
	uint64_t rx_held;          /* datagrams the rlane kept in the backend's buffer */
	/* rx */
	uint8_t hdr[FERRY_WIRE_HDR_LEN];
	size_t hdr_got;
	struct ferry_frame_hdr cur;
	bool in_ctrl;
	size_t ctrl_got;
	size_t payload_left;
	uint8_t ctrl[FERRY_WIRE_MAX_CTRL];
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void poke(int fd)
{
	uint64_t one = 1;
	ssize_t w = write(fd, &one, sizeof(one));
	(void)w; /* a full counter still wakes */
}

static void drain(int fd)
{
	uint64_t v;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
}

static bool addr_eq(const struct ferry_dgram_addr *a, const struct ferry_dgram_addr *b)
{
	return a->len == b->len && memcmp(a->b, b->b, a->len) == 0;
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return be32toh(v);
}

static void fifo_push(struct fifo *f, struct item *it)
{
	it->next = NULL;
	if (f->tail)
		f->tail->next = it;
	else
		f->head = it;
	f->tail = it;
	f->count++;
}

static struct item *fifo_pop(struct fifo *f)
{
	struct item *it = f->head;
	if (it) {
		f->head = it->next;
		if (!f->head)
			f->tail = NULL;
		f->count--;
	}
	return it;
}

static void fifo_free(struct fifo *f)
{
	struct item *it;
	while ((it = fifo_pop(f)))
		free(it);
}

static struct item *item_new(unsigned q, const struct ferry_dgram_buf *b)
{
	struct item *it = malloc(sizeof(*it) + b->len);
	if (!it)
		return NULL; /* a lost datagram: the sender repeats it */
	it->q = q;
	it->len = b->len;
	it->src = b->src;
	memcpy(it->data, b->data, b->len);
	return it;
}

static int poll_completions_locked(struct ferry_lane_drv *l, void **cookies, unsigned n);
static unsigned tx_refs(struct ferry_lane_drv *l);

/* ---- queues and the listen epoll ---------------------------------------- */

/* Under dev->lock: an idle queue (no lane) is watched by the acceptor. */
static void queue_watch(struct ferry_device *dev, unsigned qi)
{
	struct rq *q = &dev->q[qi];
	bool want = q->lanes == 0 && q->fd >= 0;
	if (want == q->in_listen)
		return;
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = qi };
	if (epoll_ctl(dev->listen_epfd, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, q->fd, &ev) == 0)
		q->in_listen = want;
	/* On failure the periodic sweep still finds new lanes. */
}

static bool closed_recently(struct ferry_device *dev, uint32_t conn, const struct ferry_dgram_addr *src, uint64_t now)
{
	for (unsigned i = 0; i < CLOSED_MAX; i++)
		if (dev->closed[i].until > now && dev->closed[i].conn == conn && addr_eq(&dev->closed[i].peer, src))
			return true;
	return false;
}

static struct ferry_lane_drv *find_lane(struct ferry_device *dev, uint32_t conn, const struct ferry_dgram_addr *src)
{
	for (struct ferry_lane_drv *l = dev->lanes; l; l = l->next)
		if (l->conn == conn && addr_eq(&l->peer, src))
			return l;
	return NULL;
}

/* The first datagram of a lane: a whole one-segment message that is a HELLO. */
static bool is_hello(const struct ferry_dgram_buf *b, struct ferry_rl_hdr *h)
{
	if (ferry_rl_decode(b->data, b->len, h, NULL))
		return false;
	if (h->type != FERRY_RL_T_DATA || (h->flags & (FERRY_RL_F_START | FERRY_RL_F_END)) !=
						  (FERRY_RL_F_START | FERRY_RL_F_END))
		return false;
	if (h->len < FERRY_WIRE_HDR_LEN)
		return false;
	const uint8_t *seg = b->data + FERRY_RL_HDR_LEN + h->nsack * FERRY_RL_SACK_LEN;
	struct ferry_frame_hdr fh;
	return ferry_wire_decode(seg, &fh, NULL) == 0 && fh.type == FERRY_FT_HELLO &&
	       h->len == FERRY_WIRE_HDR_LEN + fh.length;
}

static void lane_poke(struct ferry_lane_drv *l)
{
	__atomic_store_n(&l->poked, true, __ATOMIC_RELEASE);
	poke(l->evfd);
}

/* ---- receive: feed, route, pump ------------------------------------------ */

/* Returns true when the rlane kept the datagram: priv (non-NULL only when
 * the backend lends it) then goes back through held_release. */
static bool feed(struct ferry_lane_drv *l, const void *data, size_t len, void *priv, uint64_t now)
{
	/* A failure (the peer's RESET) is kept in the rlane and reported once
	 * the frames before it are read. */
	return ferry_rl_input(l->rl, data, len, priv, now, NULL) == 1;
}

/* The rlane's rx_release: a lent buffer whose bytes were consumed. */
static void held_release(void *user, void *cookie)
{
	struct ferry_device *dev = user;
	dev->b->release_held(dev->bd, cookie);
}

/* A datagram that is not for self (which may be NULL): hand it to its lane,
 * or to the acceptor when it opens a new connection, or drop it. */
static void route(struct ferry_device *dev, unsigned qi, const struct ferry_dgram_buf *b, uint64_t now)
{
	if (b->len < FERRY_RL_HDR_LEN || b->data[4] != FERRY_RL_VERSION)
		return;
	uint32_t conn = get32(b->data + 8);
	pthread_mutex_lock(&dev->lock);
	struct ferry_lane_drv *l = find_lane(dev, conn, &b->src);
	if (l) {
		pthread_mutex_lock(&l->in_lock);
		struct item *it = l->inbox.count < INBOX_MAX ? item_new(qi, b) : NULL;
		if (it) {
			fifo_push(&l->inbox, it);
			__atomic_store_n(&l->in_count, l->inbox.count, __ATOMIC_RELEASE);
		}
		pthread_mutex_unlock(&l->in_lock);
		pthread_mutex_unlock(&dev->lock);
		if (it)
			lane_poke(l);
		return;
	}
	struct ferry_rl_hdr h;
	bool queued = false;
	if (dev->accept.count < ACCEPT_MAX && !closed_recently(dev, conn, &b->src, now) && is_hello(b, &h)) {
		bool dup = false;
		for (struct item *it = dev->accept.head; it && !dup; it = it->next)
			dup = get32(it->data + 8) == conn && addr_eq(&it->src, &b->src);
		struct item *it = dup ? NULL : item_new(qi, b);
		if (it) {
			fifo_push(&dev->accept, it);
			queued = true;
		}
	}
	pthread_mutex_unlock(&dev->lock);
	if (queued)
		poke(dev->accept_evfd);
}

static void take_inbox(struct ferry_lane_drv *l, uint64_t now, unsigned *got)
{
	if (__atomic_exchange_n(&l->poked, false, __ATOMIC_ACQ_REL))
		drain(l->evfd);
	if (!__atomic_load_n(&l->in_count, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&l->in_lock);
	struct fifo f = l->inbox;
	l->inbox = (struct fifo){ 0 };
	__atomic_store_n(&l->in_count, 0, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&l->in_lock);
	struct item *it;
	while ((it = fifo_pop(&f))) {
		(void)feed(l, it->data, it->len, NULL, now);
		free(it);
		(*got)++;
	}
}

/* Receive one burst from queue qi (if no other thread is at it), feeding
 * self's datagrams directly and routing the others. Returns datagrams seen. */
static unsigned recv_queue(struct ferry_device *dev, unsigned qi, struct ferry_lane_drv *self, uint64_t now,
			   int *fail, struct ferry_err *err)
{
	struct rq *q = &dev->q[qi];
	if (pthread_mutex_trylock(&q->rx_lock))
		return 0;
	/* What the acceptor's sweep took off this queue for self (while self
	 * did not receive) left it before anything still there: feed it first,
	 * under the queue's lock, or the two arrive swapped and the peer takes
	 * the late ones for lost (a resend and a window cut for nothing). */
	unsigned got = 0;
	if (self)
		take_inbox(self, now, &got);
	__atomic_store_n(&q->last_rx_ns, now, __ATOMIC_RELAXED);
	struct ferry_dgram_buf bufs[BURST];
	int n = dev->b->recv(dev->bd, qi, bufs, BURST, err);
	if (n < 0) {
		pthread_mutex_unlock(&q->rx_lock);
		*fail = n;
		return got;
	}
	/* Self's datagrams may stay in the backend's buffers until consumed
	 * (no copy into the rlane) while the backend has buffers to spare;
	 * the rest goes back now. */
	bool lend = self && n > 0 && dev->rlcfg.rx_release && dev->b->may_hold(dev->bd, qi);
	unsigned back = 0;
	for (int i = 0; i < n; i++) {
		const struct ferry_dgram_buf *b = &bufs[i];
		if (self && b->len >= FERRY_RL_HDR_LEN && get32(b->data + 8) == self->conn &&
		    addr_eq(&b->src, &self->peer)) {
			if (feed(self, b->data, b->len, lend ? b->priv : NULL, now)) {
				self->rx_held++;
				continue;
			}
		} else {
			route(dev, qi, b, now);
		}
		bufs[back++] = *b;
	}
	if (back > 0)
		dev->b->release(dev->bd, qi, bufs, back);
	pthread_mutex_unlock(&q->rx_lock);
	return got + (unsigned)n;
}

/* Everything that arrived for this lane so far; returns datagrams seen. */
static unsigned pump(struct ferry_lane_drv *l, uint64_t now, int *fail, struct ferry_err *err)
{
	l->last_pump_ns = now;
	unsigned got = recv_queue(l->dev, l->q, l, now, fail, err);
	/* the queue was busy (the sweep at it): take what it handed over */
	take_inbox(l, now, &got);
	return got;
}

/* ---- transmit ------------------------------------------------------------ */

/* by_ref: the last piece is a message's payload, unchanged until the
 * message completes, so the backend may send it without copying (completions
 * then wait for tx_refs, see poll_completions_locked). */
static int backend_send(struct ferry_lane_drv *l, const struct iovec *iov, unsigned iovcnt, size_t len, bool by_ref)
{
	struct ferry_device *dev = l->dev;
	struct ferry_err err = { 0 };
	__typeof__(dev->b->send) send = by_ref && dev->b->send_ref ? dev->b->send_ref : dev->b->send;
	int rc = send(dev->bd, l->q, &l->peer, iov, iovcnt, len, &err);
	if (rc == -EAGAIN) {
		rc = dev->b->flush(dev->bd, l->q, &err);
		if (rc == 0)
			rc = send(dev->bd, l->q, &l->peer, iov, iovcnt, len, &err);
	}
	if (rc == -EAGAIN)
		l->wire_full = true;
	if (rc == 1) {
		l->tx_by_ref++;
		rc = 0;
	}
	return rc;
}

static int fault_emit(void *ctx, const void *data, size_t len)
{
	struct iovec v = { (void *)data, len };
	int rc = backend_send(ctx, &v, 1, len, false);
	/* A full wire under the injector is one more lost datagram. */
	return rc == -EAGAIN ? 0 : rc;
}

static int rl_tx(void *ctx, const struct iovec *iov, unsigned iovcnt, size_t len)
{
	struct ferry_lane_drv *l = ctx;
	if (!l->fault)
		return backend_send(l, iov, iovcnt, len, true);
	uint8_t *p = l->scratch;
	for (unsigned i = 0; i < iovcnt; i++) {
		memcpy(p, iov[i].iov_base, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	return ferry_fault_submit(l->fault, l->scratch, len, l->now, fault_emit, l);
}

/* Run the rlane's timers and send what is due, then push the batch out.
 * Returns the backend's failure only: the rlane's own is read with
 * ferry_rl_status (frames delivered before it come first). */
static int service(struct ferry_lane_drv *l, uint64_t now, struct ferry_err *err)
{
	struct ferry_device *dev = l->dev;
	struct rq *q = &dev->q[l->q];
	l->now = now;
	l->wire_full = false;
	pthread_mutex_lock(&q->tx_lock);
	if (l->fault)
		(void)ferry_fault_poll(l->fault, now, fault_emit, l);
	(void)ferry_rl_poll(l->rl, now, rl_tx, l, NULL);
	int rc = dev->b->flush(dev->bd, l->q, err);
	pthread_mutex_unlock(&q->tx_lock);
	if (rc == -EAGAIN) {
		l->wire_full = true;
		rc = 0;
	}
	return rc;
}

static int lane_failed(struct ferry_lane_drv *l, struct ferry_err *err)
{
	struct ferry_err e = { 0 };
	int rc = ferry_rl_status(l->rl, &e);
	if (!rc)
		return 0;
	if (rc == -ECONNRESET)
		return ferry_err_set(err, ECONNRESET, "%s lane to %s: peer closed the lane", l->dev->b->name, l->peer_str);
	return ferry_err_set(err, -rc, "%s lane to %s: %s", l->dev->b->name, l->peer_str, e.msg);
}

/* ---- lanes ---------------------------------------------------------------- */

static void lane_free(struct ferry_lane_drv *l)
{
	if (!l)
		return;
	fifo_free(&l->inbox);
	for (unsigned i = 0; i < l->slot_count; i++)
		free(l->slots[(l->slot_head + i) % l->slot_cap].copy);
	free(l->slots);
	ferry_rl_destroy(l->rl);
	ferry_fault_destroy(l->fault);
	free(l->scratch);
	if (l->tfd >= 0)
		close(l->tfd);
	if (l->epfd >= 0)
		close(l->epfd);
	if (l->evfd >= 0)
		close(l->evfd);
	pthread_mutex_destroy(&l->in_lock);
	pthread_mutex_destroy(&l->op_lock);
	free(l);
}

static struct ferry_lane_drv *lane_new(struct ferry_device *dev, unsigned qi, uint32_t conn, uint32_t iseq,
				       const struct ferry_dgram_addr *peer, uint64_t now, struct ferry_err *err)
{
	struct ferry_lane_drv *l = calloc(1, sizeof(*l));
	if (!l) {
		ferry_err_set(err, ENOMEM, "%s lane: out of memory", dev->b->name);
		return NULL;
	}
	pthread_mutex_init(&l->in_lock, NULL);
	pthread_mutex_init(&l->op_lock, NULL);
	l->dev = dev;
	l->q = qi;
	l->conn = conn;
	l->peer = *peer;
	l->evfd = l->epfd = l->tfd = -1;
	dev->b->addr_str(peer, l->peer_str, sizeof(l->peer_str));
	struct ferry_rl_config c = dev->rlcfg;
	c.conn_id = conn;
	c.initial_seq = iseq;
	if (ferry_rl_create(&c, now, &l->rl, err))
		goto fail;
	l->slot_cap = c.send_queue ? c.send_queue : 256;
	/* ferry_rl rounds send_queue up to a power of two; so do we. */
	unsigned cap = 1;
	while (cap < l->slot_cap)
		cap <<= 1;
	l->slot_cap = cap;
	l->slots = calloc(cap, sizeof(*l->slots));
	if (!l->slots) {
		ferry_err_set(err, ENOMEM, "%s lane: out of memory", dev->b->name);
		goto fail;
	}
	if (dev->has_fault) {
		struct ferry_fault_config fc = dev->fault;
		fc.seed ^= (uint64_t)conn * 0x9e3779b97f4a7c15ull; /* lanes draw different faults */
		l->scratch = malloc(dev->dgram);
		if (!l->scratch) {
			ferry_err_set(err, ENOMEM, "%s lane: out of memory", dev->b->name);
			goto fail;
		}
		if (ferry_fault_create(&fc, &l->fault, err))
			goto fail;
	}
	l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (l->evfd < 0 || l->epfd < 0) {
		ferry_err_set(err, errno, "%s lane: %s", dev->b->name, strerror(errno));
		goto fail;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 0 };
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->evfd, &ev)) {
		ferry_err_set(err, errno, "%s lane: epoll: %s", dev->b->name, strerror(errno));
		goto fail;
	}
	int qfd = dev->q[qi].fd;
	if (qfd < 0) {
		qfd = l->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		if (qfd < 0) {
			ferry_err_set(err, errno, "%s lane: timerfd: %s", dev->b->name, strerror(errno));
			goto fail;
		}
	}
	ev = (struct epoll_event){ .events = EPOLLIN, .data.u32 = 1 };
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, qfd, &ev)) {
		ferry_err_set(err, errno, "%s lane: epoll: %s", dev->b->name, strerror(errno));
		goto fail;
	}
	l->qfd_events = POLLIN;
	return l;
fail:
	lane_free(l);
	return NULL;
}

static void lane_attach(struct ferry_device *dev, struct ferry_lane_drv *l)
{
	/* under dev->lock */
	l->next = dev->lanes;
	dev->lanes = l;
	dev->q[l->q].lanes++;
	queue_watch(dev, l->q);
}

static void lane_detach(struct ferry_device *dev, struct ferry_lane_drv *l, uint64_t now)
{
	pthread_mutex_lock(&dev->lock);
	for (struct ferry_lane_drv **pp = &dev->lanes; *pp; pp = &(*pp)->next) {
		if (*pp == l) {
			*pp = l->next;
			break;
		}
	}
	dev->q[l->q].lanes--;
	queue_watch(dev, l->q);
	dev->closed[dev->closed_next] = (struct closed_conn){ l->conn, l->peer, now + CLOSED_NS };
	dev->closed_next = (dev->closed_next + 1) % CLOSED_MAX;
	pthread_mutex_unlock(&dev->lock);
}

static int rl_listen_fd(struct ferry_device *dev)
{
	return dev->listen_epfd;
}

/* Sweep queues no lane is receiving from, so first datagrams of new lanes
 * (and of lanes whose poller has not started) are found. */
static void sweep(struct ferry_device *dev, uint64_t now)
{
	for (unsigned qi = 0; qi < dev->nq; qi++) {
		struct rq *q = &dev->q[qi];
		uint64_t last = __atomic_load_n(&q->last_rx_ns, __ATOMIC_RELAXED);
		pthread_mutex_lock(&dev->lock);
		bool idle = q->lanes == 0;
		pthread_mutex_unlock(&dev->lock);
		if (!idle && now - last < LIVE_NS)
			continue;
		struct ferry_err err = { 0 };
		int fail = 0;
		for (int i = 0; i < 8 && recv_queue(dev, qi, NULL, now, &fail, &err) == BURST; i++)
			;
	}
	/* Lanes no poller runs (set up, waiting for their session's other
	 * lanes; or an owner asleep): run their timers and take their input,
	 * so the peer gets its retransmissions and acks. */
	struct ferry_lane_drv *stale[64];
	unsigned ns = 0;
	pthread_mutex_lock(&dev->lock);
	for (struct ferry_lane_drv *l = dev->lanes; l && ns < 64; l = l->next)
		if (now - __atomic_load_n(&l->last_op_ns, __ATOMIC_RELAXED) >= LIVE_NS && pthread_mutex_trylock(&l->op_lock) == 0)
			stale[ns++] = l;
	pthread_mutex_unlock(&dev->lock);
	for (unsigned i = 0; i < ns; i++) {
		struct ferry_lane_drv *l = stale[i];
		struct ferry_err err = { 0 };
		int fail = 0;
		/* pump drains the lane's wakeup: a poke not answered yet (the
		 * acceptor's, for the HELLO it fed) must outlive the sweep, or the
		 * lane sleeps until the peer's next datagram (a probe, ~1.2 s). */
		bool poked = __atomic_load_n(&l->poked, __ATOMIC_ACQUIRE);
		bool got = pump(l, now, &fail, &err) > 0;
		(void)service(l, now, &err);
		if (got || poked)
			lane_poke(l); /* its owner may be asleep on a socket we just emptied */
		pthread_mutex_unlock(&l->op_lock);
	}
	dev->last_sweep = now;
}

static int rl_lane_accept(struct ferry_device *dev, struct ferry_lane_drv **out, struct ferry_err *err)
{
	uint64_t now = now_ns();
	drain(dev->accept_evfd);
	drain(dev->sweep_tfd);
	if (now - dev->last_sweep >= SWEEP_NS / 2 || dev->accept.count == 0)
		sweep(dev, now);
	for (;;) {
		pthread_mutex_lock(&dev->lock);
		struct item *it = fifo_pop(&dev->accept);
		if (!it) {
			pthread_mutex_unlock(&dev->lock);
			return -EAGAIN;
		}
		uint32_t conn = get32(it->data + 8);
		if (find_lane(dev, conn, &it->src)) { /* a repeated HELLO raced its lane */
			pthread_mutex_unlock(&dev->lock);
			free(it);
			continue;
		}
		struct ferry_rl_hdr h;
		struct ferry_dgram_buf b = { .data = it->data, .len = it->len, .src = it->src };
		if (!is_hello(&b, &h)) {
			pthread_mutex_unlock(&dev->lock);
			free(it);
			continue;
		}
		struct ferry_lane_drv *l = lane_new(dev, it->q, conn, h.seq, &it->src, now, err);
		if (!l) {
			pthread_mutex_unlock(&dev->lock);
			free(it);
			return -(err && err->code ? err->code : ENOMEM);
		}
		lane_attach(dev, l);
		pthread_mutex_unlock(&dev->lock);
		(void)feed(l, it->data, it->len, NULL, now);
		free(it);
		lane_poke(l); /* its HELLO is waiting */
		*out = l;
		return 0;
	}
}

static int rl_lane_connect(struct ferry_device *dev, const char *peer, unsigned index, int timeout_ms,
			   struct ferry_lane_drv **out, struct ferry_err *err)
{
	struct ferry_dgram_addr addr;
	unsigned pq = 0;
	int rc = dev->b->resolve(dev->bd, peer, 0, &addr, &pq, err);
	if (rc)
		return ferry_err_prefix(err, "%s lane %u", dev->b->name, index);
	unsigned lim = pq < dev->nq ? pq : dev->nq;
	uint64_t now = now_ns();
	uint32_t rnd[2];
	if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd)) {
		rnd[0] = (uint32_t)now ^ (uint32_t)(uintptr_t)dev;
		rnd[1] = (uint32_t)(now >> 32) * 2654435761u;
	}
	pthread_mutex_lock(&dev->lock);
	/* The least loaded queue, starting from the lane's own index so the
	 * lanes of one session spread over the queues. */
	unsigned qi = index % lim;
	for (unsigned k = 1; k < lim; k++) {
		unsigned c = (index + k) % lim;
		if (dev->q[c].lanes < dev->q[qi].lanes)
			qi = c;
	}
	pthread_mutex_unlock(&dev->lock);
	if ((rc = dev->b->resolve(dev->bd, peer, qi, &addr, &pq, err)))
		return ferry_err_prefix(err, "%s lane %u", dev->b->name, index);
	pthread_mutex_lock(&dev->lock);
	uint32_t conn = rnd[0] ? rnd[0] : 1;
	while (find_lane(dev, conn, &addr) || closed_recently(dev, conn, &addr, now))
		conn = conn * 2654435761u + 1;
	struct ferry_lane_drv *l = lane_new(dev, qi, conn, rnd[1], &addr, now, err);
	if (l)
		lane_attach(dev, l);
	pthread_mutex_unlock(&dev->lock);
	if (!l)
		return -(err && err->code ? err->code : ENOMEM);
	(void)timeout_ms; /* the handshake's wait is the data plane's (HELLO / HELLO_ACK) */
	*out = l;
	return 0;
}

static void rl_lane_close(struct ferry_lane_drv *l)
{
	if (!l)
		return;
	struct ferry_device *dev = l->dev;
	struct ferry_err err = { 0 };
	pthread_mutex_lock(&l->op_lock); /* waits out a sweep servicing it */
	uint64_t t0 = now_ns(), now = t0, heard = t0;
	/* Like a kernel socket's close: what was queued still reaches the peer
	 * (a final FIN or credit), bounded in time, quicker when the peer is gone. */
	while (!ferry_rl_status(l->rl, NULL) && ferry_rl_unfinished(l->rl) > 0 && now - t0 < LINGER_NS &&
	       now - heard < LINGER_QUIET_NS) {
		int fail = 0;
		if (pump(l, now, &fail, &err))
			heard = now;
		if (fail || service(l, now, &err))
			break;
		void *c[64];
		while (poll_completions_locked(l, c, 64) > 0)
			;
		struct pollfd p = { .fd = l->epfd, .events = POLLIN };
		(void)poll(&p, 1, 1);
		now = now_ns();
	}
	if (!ferry_rl_status(l->rl, NULL)) {
		/* A delayed ack may still be due (the peer's last frames): send
		 * it before the RESET, or the peer waits for it in vain. */
		uint64_t dl = ferry_rl_next_deadline(l->rl);
		now = now_ns();
		if (dl > now && dl - now < 1000000)
			usleep((useconds_t)((dl - now) / 1000 + 1));
		(void)service(l, now_ns(), &err);
		ferry_rl_abort(l->rl); /* the peer learns at once, as from a closed socket */
		(void)service(l, now_ns(), &err);
	}
	/* The caller frees the payloads once we return: nothing may point at
	 * them then. A wire full this long has no reader: drop what is held. */
	for (t0 = now_ns(); tx_refs(l) && now_ns() - t0 < LINGER_QUIET_NS;)
		usleep(1000);
	if (tx_refs(l) && dev->b->tx_discard) {
		pthread_mutex_lock(&dev->q[l->q].tx_lock);
		dev->b->tx_discard(dev->bd, l->q);
		pthread_mutex_unlock(&dev->q[l->q].tx_lock);
	}
	lane_detach(dev, l, now_ns());
	pthread_mutex_unlock(&l->op_lock);
	lane_free(l);
}

static int rl_mem_register(struct ferry_device *dev, void *addr, size_t len, struct ferry_mr *mr,
			   struct ferry_err *err)
{
	/* Copy path: the backend copies from any memory. */
	mr->addr = addr;
	mr->len = len;
	mr->rkey = 0;
	mr->drv = NULL;
	return 0;
}

static void rl_mem_deregister(struct ferry_device *dev, struct ferry_mr *mr)
{
}

static bool payload_goes_to_caller(uint8_t type)
{
	return type == FERRY_FT_DATA || type == FERRY_FT_REGION_WRITE;
}

static int tx_burst_locked(struct ferry_lane_drv *l, const struct ferry_tx_frame *frames, unsigned n,
			   struct ferry_err *err)
{
	int rc = lane_failed(l, err);
	if (rc)
		return rc;
	unsigned taken = 0;
	for (; taken < n && l->slot_count < l->slot_cap; taken++) {
		const struct ferry_tx_frame *f = &frames[taken];
		if (f->iovcnt > 1)
			return ferry_err_set(err, EINVAL, "%s tx: %u payload pieces, at most 1", l->dev->b->name, f->iovcnt);
		size_t total = f->iovcnt ? f->iov[0].iov_len : 0;
		if (total != f->hdr.length)
			return ferry_err_set(err, EINVAL, "%s tx: payload %zu bytes but header says %u", l->dev->b->name,
					     total, f->hdr.length);
		uint8_t head[FERRY_RL_INLINE_MAX];
		ferry_wire_encode(&f->hdr, NULL, head);
		struct ferry_rl_msg m = { .head = head, .head_len = FERRY_WIRE_HDR_LEN, .cookie = NULL };
		void *copy = NULL;
		if (total && !payload_goes_to_caller(f->hdr.type)) {
			/* Control payloads may live on the caller's stack; the rlane
			 * holds them until acknowledged, so keep a copy. */
			if (total <= INLINE_CTRL) {
				memcpy(head + FERRY_WIRE_HDR_LEN, f->iov[0].iov_base, total);
				m.head_len += total;
			} else {
				if (!(copy = malloc(total)))
					return ferry_err_set(err, ENOMEM, "%s tx: out of memory", l->dev->b->name);
				memcpy(copy, f->iov[0].iov_base, total);
				m.payload = copy;
				m.payload_len = total;
			}
		} else if (total) {
			m.payload = f->iov[0].iov_base;
			m.payload_len = total;
		}
		struct txslot *s = &l->slots[(l->slot_head + l->slot_count) % l->slot_cap];
		m.cookie = s;
		rc = ferry_rl_send(l->rl, &m, err);
		if (rc) {
			free(copy);
			if (rc == -EAGAIN)
				break;
			return rc;
		}
		s->cookie = f->cookie;
		s->copy = copy;
		l->slot_count++;
	}
	return (int)taken;
}

static int tx_flush_locked(struct ferry_lane_drv *l, struct ferry_err *err)
{
	uint64_t now = now_ns();
	/* A caller mid-frame with nowhere to put the payload (its local socket
	 * full) calls only tx_flush until that drains, and the acceptor's sweep
	 * leaves a lane so busy alone. Input must still be taken meanwhile: the
	 * peer wants acks for its data (and a shut window), we want its acks for
	 * ours, or either end takes the other for dead. The rlane's window
	 * bounds what it buffers. */
	if (now - l->last_pump_ns >= PUMP_GAP_NS) {
		int fail = 0;
		(void)pump(l, now, &fail, err);
		if (fail)
			return fail;
	}
	int rc = service(l, now, err);
	if (rc)
		return rc;
	if ((rc = lane_failed(l, err)))
		return rc;
	return l->wire_full ? -EAGAIN : 0;
}

/* Datagrams of the lane's queue that still refer to payload memory (sent
 * by reference, not yet read by the PMD), after one attempt to push them out. */
static unsigned tx_refs(struct ferry_lane_drv *l)
{
	struct ferry_device *dev = l->dev;
	if (!dev->b->tx_refs)
		return 0;
	struct rq *q = &dev->q[l->q];
	struct ferry_err err = { 0 };
	pthread_mutex_lock(&q->tx_lock);
	unsigned n = dev->b->tx_refs(dev->bd, l->q);
	if (n) {
		(void)dev->b->flush(dev->bd, l->q, &err);
		n = dev->b->tx_refs(dev->bd, l->q);
	}
	pthread_mutex_unlock(&q->tx_lock);
	return n;
}

static int poll_completions_locked(struct ferry_lane_drv *l, void **cookies, unsigned n)
{
	void *c[64];
	unsigned out = 0;
	/* A completed message's payload goes back to the caller, who refills
	 * it: not while a datagram (a retransmission, say) still points at it. */
	if (tx_refs(l))
		return 0;
	while (out < n) {
		int k = ferry_rl_completions(l->rl, c, n - out < 64 ? n - out : 64);
		if (k <= 0)
			break;
		for (int i = 0; i < k; i++) {
			struct txslot *s = c[i];
			/* completions come in send order: always the ring's head */
			l->slot_head = (l->slot_head + 1) % l->slot_cap;
			l->slot_count--;
			free(s->copy);
			s->copy = NULL;
			if (s->cookie)
				cookies[out++] = s->cookie;
		}
	}
	return (int)out;
}

/* Parse the next frame from the rlane's in-order bytes: 1 when one is
 * complete in *f, 0 when more must arrive, negative on a protocol error. */
/* The rlane's message boundaries disagree with the frame header's length. */
static int frame_mismatch(const struct ferry_lane_drv *l, struct ferry_err *err)
{
	return ferry_err_set(err, EPROTO, "%s rx: %s frame's message does not match its %u payload bytes",
			     l->dev->b->name, ferry_wire_type_name(l->cur.type), l->cur.length);
}

static int next_frame(struct ferry_lane_drv *l, struct ferry_rx_frame *f, struct ferry_err *err)
{
	bool end = false;
	const char *name = l->dev->b->name;
	if (!l->in_ctrl) {
		while (l->hdr_got < FERRY_WIRE_HDR_LEN) {
			size_t k = ferry_rl_read(l->rl, l->hdr + l->hdr_got, FERRY_WIRE_HDR_LEN - l->hdr_got, &end);
			if (k == 0)
				return 0;
			l->hdr_got += k;
			if (end && l->hdr_got < FERRY_WIRE_HDR_LEN)
				return ferry_err_set(err, EPROTO, "%s rx: a %zu-byte message is shorter than a frame header",
						     name, l->hdr_got);
		}
		int rc = ferry_wire_decode(l->hdr, &l->cur, err);
		if (rc)
			return rc;
		if (l->cur.flags & FERRY_FF_PAYLOAD_CRC)
			return ferry_err_set(err, EPROTO, "%s frame asks for a payload checksum; %s lanes check every datagram instead",
					     ferry_wire_type_name(l->cur.type), name);
		if (end != (l->cur.length == 0))
			return ferry_err_set(err, EPROTO, "%s rx: %s frame's message %s its %u payload bytes", name,
					     ferry_wire_type_name(l->cur.type), end ? "ends before" : "runs past",
					     l->cur.length);
		l->hdr_got = 0;
		f->hdr = l->cur;
		f->drv = NULL;
		if (payload_goes_to_caller(l->cur.type)) {
			f->payload = NULL;
			f->pending = true;
			l->payload_left = l->cur.length;
			return 1;
		}
		l->in_ctrl = true;
		l->ctrl_got = 0;
	}
	while (l->ctrl_got < l->cur.length) {
		size_t k = ferry_rl_read(l->rl, l->ctrl + l->ctrl_got, l->cur.length - l->ctrl_got, &end);
		if (k == 0)
			return 0;
		l->ctrl_got += k;
		if (end != (l->ctrl_got == l->cur.length))
			return frame_mismatch(l, err);
	}
	l->in_ctrl = false;
	/* Valid until the next rx_burst: control frames are handled first. */
	f->hdr = l->cur;
	f->payload = l->cur.length ? l->ctrl : NULL;
	f->pending = false;
	f->drv = NULL;
	return 1;
}

static int rx_burst_locked(struct ferry_lane_drv *l, struct ferry_rx_frame *frames, unsigned n,
			   struct ferry_err *err)
{
	if (n == 0 || l->payload_left > 0)
		return 0; /* the caller still owes the last frame's payload */
	uint64_t now = now_ns();
	int fail = 0;
	(void)pump(l, now, &fail, err);
	if (fail)
		return fail;
	int rc = next_frame(l, &frames[0], err);
	int s = service(l, now, err); /* acks and window updates for what was read */
	if (rc)
		return rc;
	if (s)
		return s;
	return lane_failed(l, err);
}

static ssize_t rx_payload_locked(struct ferry_lane_drv *l, void *dst, size_t len, struct ferry_err *err)
{
	if (len > l->payload_left)
		len = l->payload_left;
	if (len == 0)
		return 0;
	uint64_t now = now_ns();
	size_t got = 0;
	for (int pumps = 0;; pumps++) {
		bool end = false;
		size_t k = ferry_rl_read(l->rl, (uint8_t *)dst + got, len - got, &end);
		got += k;
		l->payload_left -= k;
		if (end != (l->payload_left == 0) && (k > 0 || end))
			return frame_mismatch(l, err);
		if (got == len || pumps == PUMPS_PER_READ)
			break;
		int fail = 0;
		if (pump(l, now, &fail, err) == 0) {
			if (fail)
				return fail;
			break;
		}
	}
	int rc = service(l, now, err);
	if (rc)
		return rc;
	if (got == 0)
		return lane_failed(l, err);
	return (ssize_t)got;
}

static void rl_rx_release(struct ferry_lane_drv *l, struct ferry_rx_frame *frames, unsigned n)
{
}

/* The pending payload where the rlane keeps it (its slots): each in-order
 * segment of the frame's message is one iovec. */
static int rx_peek_locked(struct ferry_lane_drv *l, struct iovec *iov, unsigned n, struct ferry_err *err)
{
	struct ferry_rl_seg segs[PEEK_SEGS];
	if (n > PEEK_SEGS)
		n = PEEK_SEGS;
	if (l->payload_left == 0 || n == 0)
		return 0;
	int k = ferry_rl_recv(l->rl, segs, n);
	if ((unsigned)k < n) {
		/* Take in what has arrived, so one look hands on as much as it can. */
		int fail = 0;
		if (pump(l, now_ns(), &fail, err) > 0)
			k = ferry_rl_recv(l->rl, segs, n);
		else if (fail && k == 0)
			return fail;
	}
	size_t left = l->payload_left;
	unsigned out = 0;
	for (int i = 0; i < k && left > 0; i++) {
		bool end = segs[i].flags & FERRY_RL_F_END;
		if (segs[i].len > left || end != (segs[i].len == left))
			return frame_mismatch(l, err);
		iov[out++] = (struct iovec){ .iov_base = (void *)segs[i].data, .iov_len = segs[i].len };
		left -= segs[i].len;
	}
	if (out == 0) {
		int rc = service(l, now_ns(), err);
		return rc ? rc : lane_failed(l, err);
	}
	return (int)out;
}

static int rx_consume_locked(struct ferry_lane_drv *l, size_t len, struct ferry_err *err)
{
	if (len > l->payload_left)
		return ferry_err_set(err, EINVAL, "%s rx: %zu bytes consumed, %zu pending", l->dev->b->name, len,
				     l->payload_left);
	size_t k = ferry_rl_skip(l->rl, len, NULL);
	l->payload_left -= k;
	if (k != len)
		return ferry_err_set(err, EINVAL, "%s rx: %zu bytes consumed, %zu were there", l->dev->b->name, len, k);
	/* Acks and window updates for the slots just freed. */
	return len ? service(l, now_ns(), err) : 0;
}

static int wakeup_fd_locked(struct ferry_lane_drv *l, short *events, bool want_tx)
{
	struct ferry_device *dev = l->dev;
	struct rq *q = &dev->q[l->q];
	if (l->tfd >= 0) {
		/* Busy-polled backend: look again after poll_us (re-arming also
		 * clears the last expiry). */
		struct itimerspec its = { .it_value = { (time_t)(dev->poll_ns / 1000000000ull),
							(long)(dev->poll_ns % 1000000000ull) } };
		(void)timerfd_settime(l->tfd, 0, &its, NULL);
	} else if (q->fd >= 0) {
		short want = POLLIN;
		int fd = dev->b->wakeup_fd(dev->bd, l->q, want_tx || l->wire_full, &want);
		if (fd == q->fd && want != l->qfd_events) {
			struct epoll_event ev = { .events = (want & POLLIN ? EPOLLIN : 0) | (want & POLLOUT ? EPOLLOUT : 0),
						  .data.u32 = 1 };
			if (epoll_ctl(l->epfd, EPOLL_CTL_MOD, q->fd, &ev) == 0)
				l->qfd_events = want;
		}
	}
	*events = POLLIN;
	return l->epfd;
}

static uint64_t next_deadline_locked(struct ferry_lane_drv *l)
{
	uint64_t d = ferry_rl_next_deadline(l->rl);
	if (l->fault) {
		uint64_t f = ferry_fault_next_release(l->fault);
		if (f < d)
			d = f;
	}
	return d;
}

/* Every lane entry point holds the lane's op_lock: the owner's calls never
 * contend with each other, only with the acceptor's sweep, which keeps lanes
 * that no poller runs yet (set-up) answering their peer. */
static void lane_enter(struct ferry_lane_drv *l)
{
	pthread_mutex_lock(&l->op_lock);
	__atomic_store_n(&l->last_op_ns, now_ns(), __ATOMIC_RELAXED);
}

static void lane_leave(struct ferry_lane_drv *l)
{
	pthread_mutex_unlock(&l->op_lock);
}

static int rl_tx_burst(struct ferry_lane_drv *l, const struct ferry_tx_frame *frames, unsigned n,
		       struct ferry_err *err)
{
	lane_enter(l);
	int rc = tx_burst_locked(l, frames, n, err);
	lane_leave(l);
	return rc;
}

static int rl_tx_flush(struct ferry_lane_drv *l, struct ferry_err *err)
{
	lane_enter(l);
	int rc = tx_flush_locked(l, err);
	lane_leave(l);
	return rc;
}

static int rl_poll_completions(struct ferry_lane_drv *l, void **cookies, unsigned n)
{
	lane_enter(l);
	int rc = poll_completions_locked(l, cookies, n);
	lane_leave(l);
	return rc;
}

static int rl_rx_burst(struct ferry_lane_drv *l, struct ferry_rx_frame *frames, unsigned n,
		       struct ferry_err *err)
{
	lane_enter(l);
	int rc = rx_burst_locked(l, frames, n, err);
	lane_leave(l);
	return rc;
}

static ssize_t rl_rx_payload(struct ferry_lane_drv *l, void *dst, size_t len, struct ferry_err *err)
{
	lane_enter(l);
	ssize_t rc = rx_payload_locked(l, dst, len, err);
	lane_leave(l);
	return rc;
}

static int rl_rx_peek(struct ferry_lane_drv *l, struct iovec *iov, unsigned n, struct ferry_err *err)
{
	lane_enter(l);
	int rc = rx_peek_locked(l, iov, n, err);
	lane_leave(l);
	return rc;
}

static int rl_rx_consume(struct ferry_lane_drv *l, size_t len, struct ferry_err *err)
{
	lane_enter(l);
	int rc = rx_consume_locked(l, len, err);
	lane_leave(l);
	return rc;
}

static int rl_wakeup_fd(struct ferry_lane_drv *l, short *events, bool want_tx)
{
	pthread_mutex_lock(&l->op_lock);
	int fd = wakeup_fd_locked(l, events, want_tx);
	pthread_mutex_unlock(&l->op_lock);
	return fd;
}

uint64_t ferry_rldrv_next_deadline(struct ferry_lane_drv *l)
{
	pthread_mutex_lock(&l->op_lock);
	uint64_t d = next_deadline_locked(l);
	pthread_mutex_unlock(&l->op_lock);
	return d;
}

void ferry_rldrv_lane_stats(struct ferry_lane_drv *l, struct ferry_rl_stats *rl, struct ferry_fault_stats *fault)
{
	pthread_mutex_lock(&l->op_lock);
	if (rl) {
		ferry_rl_stats(l->rl, rl);
		rl->tx_by_ref = l->tx_by_ref;
		rl->rx_held = l->rx_held;
	}
	if (fault) {
		memset(fault, 0, sizeof(*fault));
		if (l->fault)
			ferry_fault_stats(l->fault, fault);
	}
	pthread_mutex_unlock(&l->op_lock);
}

/* ---- device --------------------------------------------------------------- */

static void rl_close(struct ferry_device *dev)
{
	if (!dev)
		return;
	/* Lanes are closed by their owners before the device. */
	fifo_free(&dev->accept);
	if (dev->bd)
		dev->b->close(dev->bd);
	if (dev->q) {
		for (unsigned i = 0; i < dev->nq; i++) {
			pthread_mutex_destroy(&dev->q[i].rx_lock);
			pthread_mutex_destroy(&dev->q[i].tx_lock);
		}
		free(dev->q);
	}
	if (dev->listen_epfd >= 0)
		close(dev->listen_epfd);
	if (dev->accept_evfd >= 0)
		close(dev->accept_evfd);
	if (dev->sweep_tfd >= 0)
		close(dev->sweep_tfd);
	pthread_mutex_destroy(&dev->lock);
	free(dev);
}

static int periodic_timer(uint64_t ns, struct ferry_err *err)
{
	int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (fd < 0)
		return ferry_err_set(err, errno, "timerfd: %s", strerror(errno));
	struct itimerspec its = { .it_interval = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) } };
	its.it_value = its.it_interval;
	if (timerfd_settime(fd, 0, &its, NULL)) {
		int e = errno;
		close(fd);
		return ferry_err_set(err, e, "timerfd_settime: %s", strerror(e));
	}
	return fd;
}

static int parse_options(struct ferry_device *dev, const struct ferry_driver_config *cfg, struct ferry_err *err)
{
	unsigned long window, dead_ms, rate, poll_us;
	int rc;
	if ((rc = ferry_dgram_opt_uint(cfg, "rl_window", 512, 4, FERRY_RL_WINDOW_MAX, &window, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "rl_dead_ms", 5000, 100, 3600000, &dead_ms, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "rl_rate", 0, 0, ~0ul, &rate, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "poll_us", DEFAULT_POLL_US, 10, 1000000, &poll_us, err)))
		return rc;
	dev->rlcfg = (struct ferry_rl_config){
		.max_datagram = dev->dgram,
		.window_pkts = (unsigned)window,
		.dead_ns = (uint64_t)dead_ms * 1000000ull,
		.max_rate = rate,
	};
	/* Backends that lend received buffers: lanes keep them instead of
	 * copying payload (rl_hold=0 turns that off, for comparisons). */
	unsigned long hold;
	if ((rc = ferry_dgram_opt_uint(cfg, "rl_hold", 1, 0, 1, &hold, err)))
		return rc;
	if (hold && dev->b->may_hold && dev->b->release_held) {
		dev->rlcfg.rx_release = held_release;
		dev->rlcfg.user = dev;
	}
	dev->poll_ns = (uint64_t)poll_us * 1000ull;
	const char *spec = ferry_driver_option(cfg, "fault");
	if (spec && *spec) {
		if ((rc = ferry_fault_parse(spec, &dev->fault, err)))
			return rc;
		dev->has_fault = true;
	}
	/* Check the lane settings once here rather than at the first lane. */
	struct ferry_rl *probe = NULL;
	if ((rc = ferry_rl_create(&dev->rlcfg, 0, &probe, err)))
		return rc;
	ferry_rl_destroy(probe);
	return 0;
}

int ferry_rldrv_open(const struct ferry_dgram_ops *b, const struct ferry_driver_config *cfg,
		     struct ferry_device **out, struct ferry_err *err)
{
	struct ferry_device *dev = calloc(1, sizeof(*dev));
	if (!dev)
		return ferry_err_set(err, ENOMEM, "%s driver: out of memory", b->name);
	dev->b = b;
	dev->listen_epfd = dev->accept_evfd = dev->sweep_tfd = -1;
	pthread_mutex_init(&dev->lock, NULL);
	int rc = b->open(cfg, &dev->bd, err);
	if (rc) {
		dev->bd = NULL;
		rl_close(dev);
		return rc;
	}
	dev->nq = b->queues(dev->bd);
	dev->dgram = b->max_datagram(dev->bd);
	if ((rc = parse_options(dev, cfg, err))) {
		ferry_err_prefix(err, "%s driver", b->name);
		rl_close(dev);
		return rc;
	}
	dev->q = calloc(dev->nq, sizeof(*dev->q));
	if (!dev->q) {
		rl_close(dev);
		return ferry_err_set(err, ENOMEM, "%s driver: out of memory", b->name);
	}
	for (unsigned i = 0; i < dev->nq; i++) {
		pthread_mutex_init(&dev->q[i].rx_lock, NULL);
		pthread_mutex_init(&dev->q[i].tx_lock, NULL);
		dev->q[i].fd = -1;
	}
	for (unsigned i = 0; i < dev->nq; i++) {
		short ev;
		dev->q[i].fd = b->wakeup_fd(dev->bd, i, false, &ev);
		dev->q[i].fd_events = ev;
	}
	dev->accept_evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	dev->listen_epfd = epoll_create1(EPOLL_CLOEXEC);
	if (dev->accept_evfd < 0 || dev->listen_epfd < 0) {
		rc = ferry_err_set(err, errno, "%s driver: %s", b->name, strerror(errno));
		rl_close(dev);
		return rc;
	}
	if ((rc = dev->sweep_tfd = periodic_timer(SWEEP_NS, err)) < 0) {
		ferry_err_prefix(err, "%s driver", b->name);
		rl_close(dev);
		return rc;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = UINT32_MAX };
	if (epoll_ctl(dev->listen_epfd, EPOLL_CTL_ADD, dev->accept_evfd, &ev) ||
	    epoll_ctl(dev->listen_epfd, EPOLL_CTL_ADD, dev->sweep_tfd, &ev)) {
		rc = ferry_err_set(err, errno, "%s driver: epoll: %s", b->name, strerror(errno));
		rl_close(dev);
		return rc;
	}
	pthread_mutex_lock(&dev->lock);
	for (unsigned i = 0; i < dev->nq; i++)
		queue_watch(dev, i);
	pthread_mutex_unlock(&dev->lock);
	*out = dev;
	return 0;
}

static int rl_local_endpoint(struct ferry_device *dev, char *buf, size_t len, struct ferry_err *err)
{
	return dev->b->local_endpoint(dev->bd, buf, len, err);
}

static int rl_queue_counts(struct ferry_device *dev, const char *peer, unsigned *local, unsigned *peer_q,
			   struct ferry_err *err)
{
	*local = dev->nq;
	*peer_q = 0;
	if (!peer)
		return 0;
	struct ferry_dgram_addr addr;
	int rc = dev->b->resolve(dev->bd, peer, 0, &addr, peer_q, err);
	return rc ? ferry_err_prefix(err, "%s driver", dev->b->name) : 0;
}

static int rl_open_unused(const struct ferry_driver_config *cfg, struct ferry_device **out, struct ferry_err *err)
{
	return ferry_err_set(err, ENOTSUP, "datagram drivers are opened with ferry_rldrv_open");
}

void ferry_rldrv_ops(const struct ferry_dgram_ops *b, struct ferry_driver_ops *out)
{
	*out = (struct ferry_driver_ops){
		.name = b->name,
		.caps = FERRY_DRV_RELIABLE,
		.open = rl_open_unused,
		.close = rl_close,
		.local_endpoint = rl_local_endpoint,
		.listen_fd = rl_listen_fd,
		.lane_accept = rl_lane_accept,
		.lane_connect = rl_lane_connect,
		.lane_close = rl_lane_close,
		.mem_register = rl_mem_register,
		.mem_deregister = rl_mem_deregister,
		.tx_burst = rl_tx_burst,
		.tx_flush = rl_tx_flush,
		.poll_completions = rl_poll_completions,
		.rx_burst = rl_rx_burst,
		.rx_payload = rl_rx_payload,
		.rx_release = rl_rx_release,
		.rx_peek = rl_rx_peek,
		.rx_consume = rl_rx_consume,
		.wakeup_fd = rl_wakeup_fd,
		.queue_counts = rl_queue_counts,
	};
}
