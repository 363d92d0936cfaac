/* The reliable-lane shim over two kernel UDP backends in one process,
 * through the driver ops table: the handshake, control frames, pending
 * payloads, several lanes sharing queues, streams in both directions with
 * and without injected faults (every byte once, in order), and peers that
 * close or go silent. FERRY_TEST_MB sets the bytes per lane and direction
 * (default 8; valgrind runs use less). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "dataplane/rldrv.h"
#include "drivers/dgram.h"

#define NLANES 3
#define SESSION 77

static struct ferry_driver_ops ops;
static const struct ferry_dgram_ops *udp;
static const struct ferry_dgram_ops *backend; /* what dev_open opens: udp, or lend_ops */

/* ---- a backend that lends its buffers ------------------------------------
 * udp, with each received datagram in a buffer of its own that the shim may
 * keep (may_hold) past later recvs, as DPDK's mbufs. Every buffer is
 * recorded and freed only at the end, so a second give-back is counted, not
 * a use after free; may_hold says no on every third recv (a pool running
 * low), so kept and copied datagrams mix on every lane. */
struct lent {
	struct lent *next;
	unsigned back;          /* times given back: must end at exactly 1 */
	bool held;              /* given back by release_held */
	uint8_t data[];
};

static struct ferry_dgram_ops lend_ops;
static pthread_mutex_t lend_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lent *lend_all;
static unsigned long lend_recvs;

static int lend_recv(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n,
		     struct ferry_err *err)
{
	int got = udp->recv(dev, q, bufs, n, err);
	if (got <= 0)
		return got;
	for (int i = 0; i < got; i++) {
		struct lent *b = malloc(sizeof(*b) + bufs[i].len);
		if (!b) {
			udp->release(dev, q, bufs, (unsigned)got);
			return ferry_err_set(err, ENOMEM, "lend backend: out of memory");
		}
		*b = (struct lent){ 0 };
		memcpy(b->data, bufs[i].data, bufs[i].len);
		pthread_mutex_lock(&lend_lock);
		b->next = lend_all;
		lend_all = b;
		pthread_mutex_unlock(&lend_lock);
		struct ferry_dgram_buf u = bufs[i];
		udp->release(dev, q, &u, 1);
		bufs[i].data = b->data;
		bufs[i].priv = b;
	}
	return got;
}

static void lend_back(struct lent *b, bool held)
{
	pthread_mutex_lock(&lend_lock);
	b->back++;
	b->held = held;
	pthread_mutex_unlock(&lend_lock);
}

static void lend_release(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n)
{
	(void)dev, (void)q;
	for (unsigned i = 0; i < n; i++)
		lend_back(bufs[i].priv, false);
}

static bool lend_may_hold(struct ferry_dgram_dev *dev, unsigned q)
{
	(void)dev, (void)q;
	return __atomic_add_fetch(&lend_recvs, 1, __ATOMIC_RELAXED) % 3 != 0;
}

static void lend_release_held(struct ferry_dgram_dev *dev, void *priv)
{
	(void)dev;
	lend_back(priv, true);
}

/* Frees every buffer lent so far; counts those given back as held, and
 * those not given back exactly once. */
static void lend_sweep(uint64_t *held, uint64_t *wrong)
{
	*held = *wrong = 0;
	for (struct lent *b = lend_all, *nx; b; b = nx) {
		nx = b->next;
		*held += b->held;
		*wrong += b->back != 1;
		free(b);
	}
	lend_all = NULL;
}

static uint64_t ms_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int dev_open(struct ferry_device **dev, const char *o1, const char *o2, const char *o3,
		    struct ferry_err *err)
{
	const char *opts[] = { "bind=127.0.0.1:0", o1, o2, o3, NULL };
	struct ferry_driver_config cfg = { .options = opts };
	return ferry_rldrv_open(backend, &cfg, dev, err);
}

static int send_frame(struct ferry_lane_drv *l, uint8_t type, uint32_t stream, uint64_t seq, const void *p,
		      uint32_t len, void *cookie, struct ferry_err *err)
{
	struct iovec iov = { (void *)p, len };
	struct ferry_tx_frame f = { .hdr = { .type = type, .session = SESSION, .stream = stream, .seq = seq, .length = len },
				    .iov = len ? &iov : NULL, .iovcnt = len ? 1 : 0, .cookie = cookie };
	for (int i = 0; i < 5000; i++) {
		int n = ops.tx_burst(l, &f, 1, err);
		if (n == 1) {
			int rc = ops.tx_flush(l, err);
			return rc == -EAGAIN ? 0 : rc;
		}
		if (n < 0)
			return n;
		ops.tx_flush(l, err);
		void *c[16];
		ops.poll_completions(l, c, 16);
		usleep(200);
	}
	return -ETIMEDOUT;
}

/* Drive a lane until a frame (or an error) comes out, up to ms; also run
 * the timers of 'other' (the peer lane, which may owe a retransmission). */
static int recv_frame2(struct ferry_lane_drv *l, struct ferry_lane_drv *other, struct ferry_rx_frame *f, int ms,
		       struct ferry_err *err)
{
	uint64_t end = ms_now() + (uint64_t)ms;
	while (ms_now() < end) {
		int n = ops.rx_burst(l, f, 1, err);
		if (n != 0)
			return n;
		int rc = ops.tx_flush(l, err);
		if (rc && rc != -EAGAIN)
			return rc;
		if (other) {
			struct ferry_err ignored = { 0 };
			ops.tx_flush(other, &ignored);
		}
		short ev;
		struct pollfd p = { .fd = ops.wakeup_fd(l, &ev, false) };
		p.events = ev;
		poll(&p, 1, 1);
	}
	return 0;
}

static int recv_frame(struct ferry_lane_drv *l, struct ferry_rx_frame *f, int ms, struct ferry_err *err)
{
	return recv_frame2(l, NULL, f, ms, err);
}

/* Connect lane 'index' from a to b with the data plane's HELLO handshake. */
static int lane_pair(struct ferry_device *a, struct ferry_device *b, unsigned index, struct ferry_lane_drv **la,
		     struct ferry_lane_drv **lb, struct ferry_err *err)
{
	char ep[FERRY_ENDPOINT_MAX];
	int rc = ops.local_endpoint(b, ep, sizeof(ep), err);
	if (rc || (rc = ops.lane_connect(a, ep, index, 1000, la, err)))
		return rc;
	static const uint8_t token[16] = "0123456789abcdef";
	if ((rc = send_frame(*la, FERRY_FT_HELLO, index, NLANES, token, 16, NULL, err)) < 0)
		return rc;
	uint64_t end = ms_now() + 5000;
	*lb = NULL;
	while (!*lb && ms_now() < end) {
		struct pollfd p = { .fd = ops.listen_fd(b), .events = POLLIN };
		poll(&p, 1, 2);
		rc = ops.lane_accept(b, lb, err);
		if (rc && rc != -EAGAIN)
			return rc;
		ops.tx_flush(*la, err); /* repeats a lost HELLO */
		struct ferry_rx_frame f;
		if ((rc = ops.rx_burst(*la, &f, 1, err)) < 0)
			return rc;
	}
	if (!*lb)
		return ferry_err_set(err, ETIMEDOUT, "no lane accepted");
	struct ferry_rx_frame f;
	rc = recv_frame2(*lb, *la, &f, 5000, err);
	if (rc != 1 || f.hdr.type != FERRY_FT_HELLO || f.hdr.stream != index || f.hdr.length != 16 ||
	    memcmp(f.payload, token, 16) != 0)
		return rc < 0 ? rc : ferry_err_set(err, EPROTO, "accepted lane did not start with the HELLO");
	if ((rc = send_frame(*lb, FERRY_FT_HELLO_ACK, index, 0, NULL, 0, NULL, err)) < 0)
		return rc;
	rc = recv_frame2(*la, *lb, &f, 5000, err);
	if (rc != 1 || f.hdr.type != FERRY_FT_HELLO_ACK)
		return rc < 0 ? rc : ferry_err_set(err, EPROTO, "no HELLO_ACK");
	return 0;
}

/* The tests' preamble: devices a and b with the same options (o1, o2 as for
 * dev_open) and, when la is given, lane 0 between them (a -> b). Each step is
 * a check; returns whether all is there. What opened is left in *a, *b, *la
 * and *lb for the caller's cleanup (ops.close takes NULL). */
static bool pair_up(const char *label, const char *o1, const char *o2, struct ferry_device **a,
		    struct ferry_device **b, struct ferry_lane_drv **la, struct ferry_lane_drv **lb)
{
	struct ferry_err err = { 0 };
	*a = *b = NULL;
	bool ok = dev_open(a, o1, o2, NULL, &err) == 0 && dev_open(b, o1, o2, NULL, &err) == 0;
	CHECK(ok, "%s: two devices open: %s", label, err.msg);
	if (ok && la) {
		ok = lane_pair(*a, *b, 0, la, lb, &err) == 0 && *la && *lb;
		CHECK(ok, "%s: a lane with the HELLO handshake: %s", label, err.msg);
	}
	return ok;
}

/* ---- streams both ways on every lane -------------------------------------- */

struct side {
	struct ferry_lane_drv *l;
	const uint8_t *out;        /* what this side sends */
	uint8_t *in;               /* what it received */
	const uint8_t *want;       /* what it should receive */
	size_t bytes;
	unsigned seed;
	char result[FERRY_ERR_MSG_MAX];
	bool ok;
	bool done;                 /* atomic: finished (either way) */
	struct side *peer;         /* the other end of the lane: keep answering it until it is done */
};

static void *side_main(void *arg)
{
	struct side *sd = arg;
	struct ferry_err err = { 0 };
	struct ferry_lane_drv *l = sd->l;
	size_t sent = 0, got = 0, framed_since_credit = 0;
	unsigned inflight = 0;
	bool fin_sent = false, fin_rcvd = false;
	size_t rx_left = 0;
	uint64_t credit_seq_expect = 0;
	unsigned rnd = sd->seed;
	uint64_t end = ms_now() + 120000;
	snprintf(sd->result, sizeof(sd->result), "timed out");
	for (;;) {
		if (fin_sent && fin_rcvd && inflight == 0)
			__atomic_store_n(&sd->done, true, __ATOMIC_RELEASE);
		if (ms_now() >= end || (sd->done && __atomic_load_n(&sd->peer->done, __ATOMIC_ACQUIRE)))
			break;
		void *c[64];
		int k = ops.poll_completions(l, c, 64);
		if (k > 0)
			inflight -= (unsigned)k;
		/* send: DATA of 1 B .. 256 KiB, a CREDIT every few frames */
		while (!fin_sent && inflight < 32) {
			if (sent == sd->bytes) {
				/* counted in flight too: we stop only once the peer has it */
				int n = ops.tx_burst(l, &(struct ferry_tx_frame){ .hdr = { .type = FERRY_FT_FIN, .session = SESSION,
						      .stream = 1, .seq = sent }, .cookie = (void *)2 }, 1, &err);
				if (n < 0)
					goto fail;
				fin_sent = n == 1;
				inflight += (unsigned)n;
				break;
			}
			if (framed_since_credit >= 5) {
				int n = ops.tx_burst(l, &(struct ferry_tx_frame){ .hdr = { .type = FERRY_FT_CREDIT, .session = SESSION,
						      .stream = 1, .seq = sent }, .cookie = (void *)3 }, 1, &err);
				if (n < 0)
					goto fail;
				if (n == 0)
					break;
				inflight++;
				framed_since_credit = 0;
			}
			rnd = rnd * 1103515245u + 12345u;
			size_t len = 1 + (rnd >> 8) % (256u << 10);
			if (len > sd->bytes - sent)
				len = sd->bytes - sent;
			struct iovec iov = { (void *)(sd->out + sent), len };
			struct ferry_tx_frame f = { .hdr = { .type = FERRY_FT_DATA, .session = SESSION, .stream = 1, .seq = sent,
							     .length = (uint32_t)len }, .iov = &iov, .iovcnt = 1, .cookie = (void *)1 };
			int n = ops.tx_burst(l, &f, 1, &err);
			if (n < 0)
				goto fail;
			if (n == 0)
				break;
			sent += len;
			inflight++;
			framed_since_credit++;
		}
		int rc = ops.tx_flush(l, &err);
		if (rc && rc != -EAGAIN)
			goto fail;
		/* receive */
		bool progress = false;
		for (int b = 0; b < 64; b++) {
			if (rx_left > 0) {
				ssize_t r = ops.rx_payload(l, sd->in + got, rx_left, &err);
				if (r < 0)
					goto fail;
				if (r == 0)
					break;
				got += (size_t)r;
				rx_left -= (size_t)r;
				progress = true;
				continue;
			}
			struct ferry_rx_frame f;
			int n = ops.rx_burst(l, &f, 1, &err);
			if (n < 0)
				goto fail;
			if (n == 0)
				break;
			progress = true;
			if (f.hdr.type == FERRY_FT_DATA) {
				if (f.hdr.seq != got || !f.pending || f.hdr.length > sd->bytes - got) {
					snprintf(sd->result, sizeof(sd->result), "DATA at %llu, expected %zu (pending %d, %u bytes)",
						 (unsigned long long)f.hdr.seq, got, f.pending, f.hdr.length);
					goto stop;
				}
				rx_left = f.hdr.length;
			} else if (f.hdr.type == FERRY_FT_CREDIT) {
				if (f.hdr.seq != got || f.hdr.seq < credit_seq_expect) {
					snprintf(sd->result, sizeof(sd->result), "CREDIT says %llu, %zu bytes arrived before it",
						 (unsigned long long)f.hdr.seq, got);
					goto stop;
				}
				credit_seq_expect = f.hdr.seq;
			} else if (f.hdr.type == FERRY_FT_FIN) {
				if (f.hdr.seq != got || got != sd->bytes) {
					snprintf(sd->result, sizeof(sd->result), "FIN says %llu, %zu arrived of %zu",
						 (unsigned long long)f.hdr.seq, got, sd->bytes);
					goto stop;
				}
				fin_rcvd = true;
			} else {
				snprintf(sd->result, sizeof(sd->result), "unexpected %s frame", ferry_wire_type_name(f.hdr.type));
				goto stop;
			}
			ops.rx_release(l, &f, 1);
		}
		if (!progress) {
			short ev;
			struct pollfd p = { .fd = ops.wakeup_fd(l, &ev, false) };
			p.events = ev;
			uint64_t dl = ferry_rldrv_next_deadline(l);
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			uint64_t nn = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
			int ms = dl <= nn ? 0 : dl - nn > 20000000 ? 20 : (int)((dl - nn) / 1000000);
			poll(&p, 1, ms);
		}
	}
	__atomic_store_n(&sd->done, true, __ATOMIC_RELEASE);
	if (!(fin_sent && fin_rcvd && inflight == 0))
		return NULL;
	if (memcmp(sd->in, sd->want, sd->bytes) != 0) {
		snprintf(sd->result, sizeof(sd->result), "bytes differ");
		return NULL;
	}
	sd->ok = true;
	snprintf(sd->result, sizeof(sd->result), "ok");
	return NULL;
fail:
	snprintf(sd->result, sizeof(sd->result), "lane failed: %.400s", err.msg);
stop:
	__atomic_store_n(&sd->done, true, __ATOMIC_RELEASE);
	return NULL;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (uint8_t)x;
	}
}

static void streams(const char *label, const char *fault, const char *queues, size_t bytes)
{
	struct ferry_err err = { 0 };
	struct ferry_device *a = NULL, *b = NULL;
	uint64_t kept = 0; /* datagrams the lanes kept in lent buffers */
	int rc;
	if (!pair_up(label, fault, queues, &a, &b, NULL, NULL))
		goto out;
	struct ferry_lane_drv *la[NLANES] = { 0 }, *lb[NLANES] = { 0 };
	for (unsigned i = 0; i < NLANES; i++) {
		rc = lane_pair(a, b, i, &la[i], &lb[i], &err);
		CHECK(rc == 0, "%s: lane %u connected with the HELLO handshake: %s", label, i, err.msg);
		if (rc)
			goto out_lanes;
	}
	struct side sides[2 * NLANES];
	uint8_t *bufs[4 * NLANES] = { 0 };
	for (unsigned i = 0; i < NLANES; i++) {
		uint8_t *ab = malloc(bytes), *ba = malloc(bytes), *ain = malloc(bytes), *bin = malloc(bytes);
		bufs[4 * i] = ab, bufs[4 * i + 1] = ba, bufs[4 * i + 2] = ain, bufs[4 * i + 3] = bin;
		if (!ab || !ba || !ain || !bin) {
			CHECK(0, "out of memory");
			goto out_bufs;
		}
		fill(ab, bytes, 2 * i + 1);
		fill(ba, bytes, 2 * i + 2);
		sides[2 * i] = (struct side){ .l = la[i], .out = ab, .in = ain, .want = ba, .bytes = bytes, .seed = 2 * i + 11 };
		sides[2 * i + 1] = (struct side){ .l = lb[i], .out = ba, .in = bin, .want = ab, .bytes = bytes, .seed = 2 * i + 12 };
	}
	for (unsigned i = 0; i < 2 * NLANES; i++)
		sides[i].peer = &sides[i ^ 1];
	pthread_t th[2 * NLANES];
	uint64_t t0 = ms_now();
	for (unsigned i = 0; i < 2 * NLANES; i++)
		pthread_create(&th[i], NULL, side_main, &sides[i]);
	for (unsigned i = 0; i < 2 * NLANES; i++)
		pthread_join(th[i], NULL);
	uint64_t el = ms_now() - t0;
	for (unsigned i = 0; i < 2 * NLANES; i++)
		CHECK(sides[i].ok, "%s: lane %u %s: %zu bytes each way, every byte once and in order: %s", label, i / 2,
		      i % 2 ? "b->a" : "a->b", bytes, sides[i].result);
	struct ferry_rl_stats rs, tot = { 0 };
	struct ferry_fault_stats fs, ftot = { 0 };
	for (unsigned i = 0; i < NLANES; i++) {
		for (int s = 0; s < 2; s++) {
			ferry_rldrv_lane_stats(s ? lb[i] : la[i], &rs, &fs);
			tot.retransmits += rs.retransmits;
			tot.corrupt_drops += rs.corrupt_drops;
			tot.dup_drops += rs.dup_drops;
			tot.reorder_buffered += rs.reorder_buffered;
			tot.tx_datagrams += rs.tx_datagrams;
			kept += rs.rx_held;
			ftot.dropped += fs.dropped;
			ftot.duplicated += fs.duplicated;
			ftot.reordered += fs.reordered;
			ftot.corrupted += fs.corrupted;
		}
	}
	printf("# %s: %.1f MB in %llu ms (%.2f GB/s); datagrams %llu, injected drop %llu dup %llu reorder %llu corrupt %llu; "
	       "retransmits %llu, dup drops %llu, corrupt drops %llu, reorder buffered %llu\n",
	       label, 2.0 * NLANES * bytes / 1e6, (unsigned long long)el, el ? 2.0 * NLANES * bytes / 1e6 / el : 0.0,
	       (unsigned long long)tot.tx_datagrams, (unsigned long long)ftot.dropped, (unsigned long long)ftot.duplicated,
	       (unsigned long long)ftot.reordered, (unsigned long long)ftot.corrupted, (unsigned long long)tot.retransmits,
	       (unsigned long long)tot.dup_drops, (unsigned long long)tot.corrupt_drops,
	       (unsigned long long)tot.reorder_buffered);
	if (fault) {
		CHECK(ftot.dropped > 0 && tot.retransmits > 0, "%s: datagrams were dropped and sent again", label);
		CHECK(ftot.duplicated > 0 && tot.dup_drops > 0, "%s: duplicates were made and dropped", label);
		CHECK(ftot.reordered > 0 && tot.reorder_buffered > 0, "%s: reordered datagrams waited for the gap", label);
		CHECK(ftot.corrupted > 0 && tot.corrupt_drops > 0, "%s: corrupted datagrams were dropped, never delivered", label);
	}
	if (backend == udp)
		CHECK(kept == 0, "%s: udp lends no buffers: every datagram copied (%llu kept)", label,
		      (unsigned long long)kept);
out_bufs:
	for (unsigned i = 0; i < 4 * NLANES; i++)
		free(bufs[i]);
out_lanes:
	for (unsigned i = 0; i < NLANES; i++) {
		ops.lane_close(la[i]);
		ops.lane_close(lb[i]);
	}
out:
	ops.close(a);
	ops.close(b);
	if (backend == &lend_ops) {
		uint64_t held, wrong;
		lend_sweep(&held, &wrong);
		CHECK(held > 0 && held == kept, "%s: the lanes kept %llu lent buffers, and gave back as many (%llu)",
		      label, (unsigned long long)kept, (unsigned long long)held);
		CHECK(wrong == 0, "%s: every lent buffer given back exactly once (%llu not)", label,
		      (unsigned long long)wrong);
	}
}

/* Lanes over a backend that lends its buffers: the kept and the copied
 * receive paths together, with faults (out-of-order segments kept too). */
static void lent(size_t bytes)
{
	lend_ops = *udp;
	lend_ops.recv = lend_recv;
	lend_ops.release = lend_release;
	lend_ops.may_hold = lend_may_hold;
	lend_ops.release_held = lend_release_held;
	backend = &lend_ops;
	streams("lent buffers, 1% loss", "fault=drop=0.01,reorder=0.02,dup=0.01,corrupt=0.002,seed=3", "queues=2",
		bytes / 2 < 4096 ? 4096 : bytes / 2);
	backend = udp;
}

/* ---- single-lane behaviour ------------------------------------------------ */

/* A lane the acceptor has just handed out holds its HELLO; the acceptor's
 * sweep, which services lanes no poller runs yet, must not swallow the wakeup
 * that says so (the data plane's lane set-up then waited for the peer's next
 * datagram: 1.25 s per lane). */
static void accepted_lane_wakes(void)
{
	struct ferry_err err = { 0 };
	struct ferry_device *a = NULL, *b = NULL;
	struct ferry_lane_drv *la = NULL, *lb = NULL;
	if (!pair_up("accepted lane", "queues=1", NULL, &a, &b, NULL, NULL))
		goto out;
	char ep[FERRY_ENDPOINT_MAX];
	static const uint8_t token[16] = "0123456789abcdef";
	CHECK(ops.local_endpoint(b, ep, sizeof(ep), &err) == 0 && ops.lane_connect(a, ep, 0, 1000, &la, &err) == 0 &&
	      send_frame(la, FERRY_FT_HELLO, 0, 1, token, 16, NULL, &err) >= 0, "connect and send a HELLO: %s", err.msg);
	for (uint64_t end = ms_now() + 5000; la && !lb && ms_now() < end;) {
		struct pollfd p = { .fd = ops.listen_fd(b), .events = POLLIN };
		poll(&p, 1, 2);
		if (ops.lane_accept(b, &lb, &err) == -EAGAIN)
			ops.tx_flush(la, &err);
	}
	CHECK(lb != NULL, "the lane is accepted: %s", err.msg);
	if (lb) {
		/* idle past the sweep's staleness bound, then let it run */
		struct timespec ts = { 0, 20 * 1000000L };
		nanosleep(&ts, NULL);
		struct ferry_lane_drv *none = NULL;
		CHECK(ops.lane_accept(b, &none, &err) == -EAGAIN, "the next accept finds nothing new");
		short ev = 0;
		struct pollfd p = { .fd = ops.wakeup_fd(lb, &ev, false) };
		p.events = ev;
		CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLIN), "after the sweep the lane still wakes its reader");
		struct ferry_rx_frame f;
		CHECK(ops.rx_burst(lb, &f, 1, &err) == 1 && f.hdr.type == FERRY_FT_HELLO, "and its HELLO is there: %s",
		      err.msg);
		ops.lane_close(lb);
	}
	if (la)
		ops.lane_close(la);
out:
	ops.close(a);
	ops.close(b);
}

static void basics(void)
{
	struct ferry_err err = { 0 };
	struct ferry_device *a = NULL, *b = NULL;
	struct ferry_lane_drv *la = NULL, *lb = NULL;
	if (!pair_up("basics", "queues=2", NULL, &a, &b, NULL, NULL))
		goto out;
	char ep[FERRY_ENDPOINT_MAX];
	CHECK(ops.local_endpoint(b, ep, sizeof(ep), &err) == 0 && strncmp(ep, "udp:127.0.0.1:", 14) == 0 &&
	      strchr(ep + 14, '-'), "endpoint names the port range: %s", ep);
	struct ferry_lane_drv *x = NULL;
	ferry_err_clear(&err);
	CHECK(ops.lane_connect(a, "tcp:127.0.0.1:1", 0, 100, &x, &err) == -EINVAL && strstr(err.msg, "udp"),
	      "a foreign endpoint is refused: %s", err.msg);

	ferry_err_clear(&err);
	CHECK(lane_pair(a, b, 0, &la, &lb, &err) == 0, "a lane with the HELLO handshake: %s", err.msg);
	if (!la || !lb)
		goto out;

	/* a control payload larger than the inline head, from memory that is
	 * reused right after tx_burst: the shim keeps its own copy */
	char reason[3000];
	memset(reason, 'r', sizeof(reason));
	struct ferry_rx_frame f;
	CHECK(send_frame(la, FERRY_FT_RESET, 5, 0, reason, sizeof(reason), (void *)0x77, &err) >= 0, "queue a 3000-byte RESET");
	memset(reason, 'X', sizeof(reason));
	int n = recv_frame(lb, &f, 3000, &err);
	bool same = n == 1 && f.hdr.length == 3000 && f.payload && !f.pending;
	for (size_t i = 0; same && i < 3000; i++)
		same = ((char *)f.payload)[i] == 'r';
	CHECK(same, "it arrives whole, as it was when queued: %s", err.msg);
	void *c[4] = { 0 };
	int k = 0;
	for (int i = 0; i < 200 && k == 0; i++) {
		ops.rx_burst(la, &f, 1, &err);
		ops.tx_flush(la, &err);
		k = ops.poll_completions(la, c, 4);
		usleep(1000);
	}
	CHECK(k == 1 && c[0] == (void *)0x77, "its cookie comes back once the peer has it");

	/* REGION_WRITE: 1 MiB payload pending, read into place */
	size_t rlen = 1u << 20;
	uint8_t *src = malloc(rlen), *dst = calloc(1, rlen);
	fill(src, rlen, 99);
	CHECK(send_frame(la, FERRY_FT_REGION_WRITE, 3, 4096, src, (uint32_t)rlen, (void *)0x88, &err) >= 0,
	      "queue a 1 MiB REGION_WRITE");
	n = recv_frame(lb, &f, 3000, &err);
	CHECK(n == 1 && f.hdr.type == FERRY_FT_REGION_WRITE && f.pending && f.hdr.seq == 4096 && f.hdr.length == rlen,
	      "its header comes first, payload pending");
	size_t got = 0;
	uint64_t end = ms_now() + 5000;
	while (got < rlen && ms_now() < end) {
		ops.tx_flush(la, &err);
		ops.rx_burst(la, &f, 1, &err); /* acks */
		ssize_t r = ops.rx_payload(lb, dst + got, rlen - got, &err);
		if (r < 0)
			break;
		got += (size_t)r;
		if (r == 0)
			usleep(100);
	}
	CHECK(got == rlen && memcmp(src, dst, rlen) == 0, "rx_payload places all of it (%zu bytes)", got);
	CHECK(ops.rx_payload(lb, dst, 10, &err) == 0, "nothing more is pending");
	free(src);
	free(dst);

	/* a peer that closes its lane: the other end learns at once */
	ops.lane_close(lb);
	uint64_t t0 = ms_now();
	ferry_err_clear(&err);
	n = recv_frame(la, &f, 3000, &err);
	CHECK(n == -ECONNRESET && strstr(err.msg, "peer closed"), "closing one end fails the other with ECONNRESET in %llu ms: %s",
	      (unsigned long long)(ms_now() - t0), err.msg);
	ops.lane_close(la);
	la = lb = NULL;
out:
	ops.close(a);
	ops.close(b);
}

/* A peer that stops answering mid-transfer: the lane fails by rl_dead_ms. */
static void silent_peer(void)
{
	struct ferry_err err = { 0 };
	struct ferry_device *a = NULL, *b = NULL;
	struct ferry_lane_drv *la = NULL, *lb = NULL;
	if (!pair_up("silent peer (rl_dead_ms=800)", "rl_dead_ms=800", NULL, &a, &b, &la, &lb))
		goto out;
	static uint8_t data[1 << 20];
	CHECK(send_frame(la, FERRY_FT_DATA, 1, 0, data, sizeof(data), (void *)1, &err) >= 0, "queue 1 MiB; the peer never reads again");
	uint64_t t0 = ms_now();
	struct ferry_rx_frame f;
	ferry_err_clear(&err);
	int n = recv_frame(la, &f, 5000, &err);
	uint64_t el = ms_now() - t0;
	CHECK(n == -ETIMEDOUT && strstr(err.msg, "peer silent") && strstr(err.msg, "127.0.0.1"),
	      "the sender fails with a clear error: %s", err.msg);
	CHECK(el >= 700 && el < 2500, "within a bounded time (%llu ms, limit 800 ms)", (unsigned long long)el);
	ops.lane_close(la);
	ops.lane_close(lb);
out:
	ops.close(a);
	ops.close(b);

	/* nobody there at all: the handshake fails by the same bound */
	CHECK(dev_open(&a, "rl_dead_ms=500", NULL, NULL, &err) == 0, "open a device");
	struct ferry_lane_drv *l = NULL;
	CHECK(ops.lane_connect(a, "udp:127.0.0.1:9-10", 0, 1000, &l, &err) == 0, "connecting needs no answer yet");
	static const uint8_t token[16];
	send_frame(l, FERRY_FT_HELLO, 0, 1, token, 16, NULL, &err);
	ferry_err_clear(&err);
	t0 = ms_now();
	n = recv_frame(l, &f, 3000, &err);
	CHECK(n == -ETIMEDOUT && strstr(err.msg, "peer silent") && strstr(err.msg, "127.0.0.1:9"),
	      "a HELLO into the void fails in %llu ms: %s", (unsigned long long)(ms_now() - t0), err.msg);
	ops.lane_close(l);
	ops.close(a);
}

enum { BR_FRAMES = 3, BR_FRAME = 1 << 20 };

/* Queue the next of busy_reader's DATA frames, if the lane takes it. */
static void queue_frame(struct ferry_lane_drv *l, uint8_t (*data)[BR_FRAME], unsigned *queued, struct ferry_err *err)
{
	if (*queued == BR_FRAMES)
		return;
	struct iovec iov = { data[*queued], BR_FRAME };
	struct ferry_tx_frame tf = { .hdr = { .type = FERRY_FT_DATA, .session = SESSION, .stream = 1,
					      .seq = (uint64_t)*queued * BR_FRAME, .length = BR_FRAME },
				     .iov = &iov, .iovcnt = 1, .cookie = (void *)1 };
	if (ops.tx_burst(l, &tf, 1, err) == 1)
		(*queued)++;
}

/* A receiver whose consumer is slow: mid-frame, with nowhere to put the
 * payload, the data plane calls only tx_flush and poll_completions (never
 * rx_payload) until its local socket drains. The sender must not take that
 * for a dead peer: the receiver still acks what arrived and shuts its window.
 * (Lanes used to read nothing in that state, and the busy-polled DPDK lanes
 * looked too fresh for the acceptor's sweep, so the sender failed with "peer
 * silent" under host load.) */
static void busy_reader(void)
{
	struct ferry_err err = { 0 };
	struct ferry_device *a = NULL, *b = NULL;
	struct ferry_lane_drv *la = NULL, *lb = NULL;
	if (!pair_up("busy reader (rl_dead_ms=500)", "rl_dead_ms=500", NULL, &a, &b, &la, &lb))
		goto out;
	enum { FRAMES = BR_FRAMES, FRAME = BR_FRAME };
	static uint8_t data[FRAMES][FRAME], got[FRAMES][FRAME];
	for (unsigned i = 0; i < FRAMES; i++)
		fill(data[i], FRAME, 40 + i);
	unsigned queued = 0;
	struct ferry_rx_frame f;
	int n = 0;
	/* b takes the first frame's header and 1000 bytes, then its consumer stalls */
	uint64_t end = ms_now() + 5000;
	while (n == 0 && ms_now() < end) {
		queue_frame(la, data, &queued, &err);
		ops.tx_flush(la, &err);
		n = ops.rx_burst(lb, &f, 1, &err);
		usleep(200);
	}
	CHECK(n == 1 && f.hdr.type == FERRY_FT_DATA && f.pending && ops.rx_payload(lb, got[0], 1000, &err) == 1000,
	      "b has the first DATA frame's header and 1000 of its bytes: %s", err.msg);
	/* 3 x rl_dead_ms of b running only its send side, as the data plane does */
	int ra = 0, rb = 0;
	end = ms_now() + 1500;
	while (ms_now() < end && (ra == 0 || ra == -EAGAIN) && (rb == 0 || rb == -EAGAIN)) {
		queue_frame(la, data, &queued, &err);
		void *c[8];
		ops.poll_completions(la, c, 8);
		ra = ops.tx_flush(la, &err);
		if (ra == 0 || ra == -EAGAIN)
			ra = ops.rx_burst(la, &f, 1, &err);
		ops.poll_completions(lb, c, 8);
		rb = ops.tx_flush(lb, &err);
		usleep(1000);
	}
	CHECK((ra == 0 || ra == -EAGAIN) && (rb == 0 || rb == -EAGAIN),
	      "neither end gave up while b's consumer stalled for 1.5 s (a %d, b %d): %s", ra, rb, err.msg);
	/* the consumer is back: everything arrives whole */
	size_t off = 1000, total = (size_t)FRAMES * FRAME;
	end = ms_now() + 10000;
	ferry_err_clear(&err);
	while (off < total && ms_now() < end) {
		queue_frame(la, data, &queued, &err);
		void *c[8];
		ops.poll_completions(la, c, 8);
		if (ops.tx_flush(la, &err) < -EAGAIN || ops.rx_burst(la, &f, 1, &err) < 0)
			break;
		if (off % FRAME == 0) { /* the next frame's header first */
			int r = ops.rx_burst(lb, &f, 1, &err);
			if (r < 0)
				break;
			if (r == 0) {
				ops.tx_flush(lb, &err);
				usleep(200);
				continue;
			}
			if (f.hdr.type != FERRY_FT_DATA || f.hdr.length != FRAME || f.hdr.seq != off) {
				ferry_err_set(&err, EPROTO, "type %u, %u bytes at %llu", f.hdr.type, f.hdr.length,
					      (unsigned long long)f.hdr.seq);
				break;
			}
		}
		ssize_t r = ops.rx_payload(lb, got[off / FRAME] + off % FRAME, FRAME - off % FRAME, &err);
		if (r < 0)
			break;
		off += (size_t)r;
		if (r == 0) {
			ops.tx_flush(lb, &err);
			usleep(200);
		}
	}
	bool same = off == total;
	for (unsigned i = 0; same && i < FRAMES; i++)
		same = memcmp(data[i], got[i], FRAME) == 0;
	CHECK(same, "then all %u MiB arrive whole (%zu bytes): %s", (unsigned)FRAMES, off, err.msg);
	ops.lane_close(la);
	ops.lane_close(lb);
out:
	ops.close(a);
	ops.close(b);
}

static void options(void)
{
	struct ferry_err err = { 0 };
	struct ferry_device *d = NULL;
	CHECK(dev_open(&d, "fault=drop=2", NULL, NULL, &err) == -EINVAL && strstr(err.msg, "drop"),
	      "a bad fault spec is refused: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(dev_open(&d, "rl_window=1", NULL, NULL, &err) == -EINVAL && strstr(err.msg, "rl_window"),
	      "a bad window is refused: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(dev_open(&d, "queues=0", NULL, NULL, &err) == -EINVAL && strstr(err.msg, "queues"),
	      "zero queues are refused: %s", err.msg);
	ferry_err_clear(&err);
	const char *o[] = { "bind=127.0.0.1:notaport", NULL };
	struct ferry_driver_config cfg = { .options = o };
	CHECK(ferry_rldrv_open(udp, &cfg, &d, &err) == -EINVAL && strstr(err.msg, "notaport"),
	      "a malformed bind is refused: %s", err.msg);
}

int main(void)
{
	udp = backend = ferry_dgram_find("udp");
	CHECK(udp != NULL, "the udp backend is registered");
	if (!udp)
		CHECK_DONE();
	ferry_rldrv_ops(udp, &ops);
	CHECK(strcmp(ops.name, "udp") == 0 && ops.caps == FERRY_DRV_RELIABLE && !ops.tx_splice,
	      "the shim's ops table: udp, reliable, no splice");
	const char *mb = getenv("FERRY_TEST_MB");
	size_t bytes = (size_t)(mb ? atof(mb) * 1048576.0 : 8.0 * 1048576.0);
	if (bytes < 4096)
		bytes = 4096;
	options();
	basics();
	accepted_lane_wakes();
	silent_peer();
	busy_reader();
	/* 3 lanes over 2 queues: one queue is shared, its poller hands datagrams over */
	streams("clean", NULL, "queues=2", bytes);
	streams("1% loss", "fault=drop=0.01,reorder=0.02,dup=0.01,corrupt=0.002,seed=1", "queues=2", bytes);
	streams("5% loss", "fault=drop=0.05,reorder=0.05,dup=0.02,corrupt=0.01,seed=2", "queues=4", bytes);
	lent(bytes);
	CHECK_DONE();
}
