/* Reliable transport over lossy datagrams (dataplane/reliable.h) and the
 * fault injector (drivers/fault.h).
 *
 * Two rlanes talk through an in-memory network on a virtual clock: each
 * direction is a link with a bandwidth, a propagation delay and optionally a
 * drop-tail queue, behind a fault injector. Pseudo-random messages (a 32-byte
 * head naming the message, then payload taken from a random pool) go both
 * ways and every delivered byte is compared with what was sent.
 *
 *   test-reliable            the tests
 *   test-reliable --bench    the engine's throughput through the in-memory path */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "dataplane/reliable.h"
#include "drivers/fault.h"
#include "drivers/wire.h"

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

#define NEVER UINT64_MAX
#define MS ((uint64_t)1000000)
#define US ((uint64_t)1000)
#define MIB ((uint64_t)1 << 20)
#define POOL_LEN (6u << 20)
#define HEAD_LEN 32
#define HEAD_MAGIC 0x544d5347u
#define AF_XDP_DGRAM (3456 - 42)   /* an af_xdp frame less Ethernet, IPv4 and UDP headers */
#define JUMBO_DGRAM (9000 - 28)

static uint8_t *pool;
static unsigned scale = 1;   /* divides the big transfers' sizes under valgrind */
static bool lean;            /* --bench: count delivered bytes, skip verifying them */
static bool small_msgs;      /* --bench: control-frame-sized messages only */

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static double wall(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* ---- messages ----------------------------------------------------------- */

/* Sizes like ferry's frames: control frames (head only), small and medium
 * DATA, and now and then a full 1 MiB frame. */
static void msg_shape(uint64_t seed, uint64_t idx, uint32_t *off, uint32_t *len)
{
	uint64_t x = seed ^ (idx * 0xd1b54a32d192ed03ull);
	uint64_t r = splitmix(&x), r2 = splitmix(&x), r3 = splitmix(&x);
	unsigned cls = small_msgs ? 0 : (unsigned)(r % 100);
	uint32_t L;
	if (cls < 25)
		L = (uint32_t)(r2 % 64);                  /* 0: a head-only control frame */
	else if (cls < 60)
		L = 64 + (uint32_t)(r2 % 16384);
	else if (cls < 97)
		L = 16384 + (uint32_t)(r2 % 245760);
	else
		L = 1u << 20;
	*len = L;
	*off = (uint32_t)(r3 % (POOL_LEN - L + 1));
}

static void head_make(uint8_t *h, uint64_t idx, uint32_t off, uint32_t len)
{
	memset(h, 0, HEAD_LEN);
	put64(h, idx);
	put32(h + 8, off);
	put32(h + 12, len);
	put32(h + 16, HEAD_MAGIC);
	put32(h + 28, ferry_crc32c(0, h, 28));
}

struct rx_state {
	bool in_msg;
	uint8_t head[HEAD_LEN];
	size_t hgot;
	uint32_t off, len, pos;
	uint64_t expect;      /* next message index */
	uint64_t msgs, bytes;
	uint32_t crc;
	bool bad;
	char why[160];
};

__attribute__((format(printf, 2, 3)))
static void rx_bad(struct rx_state *r, const char *fmt, ...)
{
	if (r->bad)
		return;
	r->bad = true;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r->why, sizeof(r->why), fmt, ap);
	va_end(ap);
}

/* Check delivered bytes against the message they claim to be. */
static void rx_feed(struct rx_state *r, const uint8_t *d, size_t n, bool start, bool end)
{
	if (r->bad)
		return;
	if (lean) {
		r->bytes += n;
		if (end) {
			r->msgs++;
			r->expect++;
		}
		r->in_msg = !end;
		return;
	}
	if (start) {
		if (r->in_msg)
			return rx_bad(r, "message %" PRIu64 " started inside another", r->expect);
		r->in_msg = true;
		r->hgot = 0;
		r->pos = 0;
	} else if (!r->in_msg) {
		return rx_bad(r, "%zu bytes outside any message", n);
	}
	r->crc = ferry_crc32c(r->crc, d, n);
	r->bytes += n;
	if (r->hgot < HEAD_LEN) {
		size_t k = n < HEAD_LEN - r->hgot ? n : HEAD_LEN - r->hgot;
		memcpy(r->head + r->hgot, d, k);
		r->hgot += k;
		d += k;
		n -= k;
		if (r->hgot == HEAD_LEN) {
			if (get32(r->head + 16) != HEAD_MAGIC || get32(r->head + 28) != ferry_crc32c(0, r->head, 28))
				return rx_bad(r, "message %" PRIu64 ": garbled head", r->expect);
			uint64_t idx = get64(r->head);
			if (idx != r->expect)
				return rx_bad(r, "message %" PRIu64 " arrived where %" PRIu64 " was due", idx, r->expect);
			r->off = get32(r->head + 8);
			r->len = get32(r->head + 12);
		}
	}
	if (n) {
		if (r->pos + n > r->len)
			return rx_bad(r, "message %" PRIu64 " longer than sent", r->expect);
		if (memcmp(d, pool + r->off + r->pos, n) != 0)
			return rx_bad(r, "message %" PRIu64 ": bytes differ at %u", r->expect, r->pos);
		r->pos += (uint32_t)n;
	}
	if (end) {
		if (r->hgot < HEAD_LEN || r->pos != r->len)
			return rx_bad(r, "message %" PRIu64 " ended short (%u of %u payload bytes)", r->expect, r->pos, r->len);
		r->in_msg = false;
		r->msgs++;
		r->expect++;
	}
}

/* ---- the in-memory network --------------------------------------------- */

struct net;

struct pkt {
	struct pkt *next;
	uint64_t at;
	size_t len, cap;
	uint8_t data[];
};

/* Recycled packet buffers: the network should cost little next to the engine. */
static struct pkt *pkt_pool;

static struct pkt *pkt_get(size_t len)
{
	struct pkt *p = pkt_pool;
	if (p && p->cap >= len) {
		pkt_pool = p->next;
	} else {
		size_t cap = len > JUMBO_DGRAM ? len : JUMBO_DGRAM;
		p = malloc(sizeof(*p) + cap);
		if (!p)
			return NULL;
		p->cap = cap;
	}
	p->next = NULL;
	p->len = len;
	return p;
}

static void pkt_put(struct pkt *p)
{
	p->next = pkt_pool;
	pkt_pool = p;
}

static void pkt_drain(void)
{
	while (pkt_pool) {
		struct pkt *p = pkt_pool;
		pkt_pool = p->next;
		free(p);
	}
}

struct link {
	struct net *net;
	double ns_per_byte;   /* serialisation time; 0 = unlimited bandwidth */
	uint64_t latency;
	uint64_t qlimit;      /* bytes waiting for the wire before drop-tail; 0 = unlimited */
	uint64_t busy_until;
	struct pkt *head, *tail;
	struct ferry_fault *fault;
	bool blackhole;       /* everything vanishes */
	uint64_t qdrops, carried;
};

struct side {
	const char *name;
	struct net *net;
	struct ferry_rl *rl;
	struct link *out;
	bool read_mode;       /* receive with ferry_rl_read (else zero-copy recv/release) */
	bool dead;            /* neither polled nor fed */
	bool paused;          /* the application stops consuming */
	bool stalled;         /* not scheduled: takes nothing off its link, sends nothing, then resumes */
	int fail_rc;
	uint64_t fail_at;
	struct ferry_err err;
	unsigned live_retained;
	unsigned lend_every;       /* rx_release side: every lend_every-th datagram comes without a cookie (copied) */
	unsigned lend_n;
	uint64_t kept, released, copied_in;
	uint64_t bad_arrivals;
	/* sending application */
	uint64_t seed, tx_target, tx_queued, tx_msgs, tx_completed;
	uint32_t tx_crc;
	bool tx_order_bad;
	/* receiving application */
	struct rx_state rx;
	/* watching this side's data datagrams */
	bool watch;
	uint64_t w_last_at, w_last_len, w_min_slack;
	unsigned w_burst, w_max_burst, w_count;
	uint64_t w_rate;      /* max_rate in force (bytes/s), for the spacing check */
	/* congestion window trace */
	bool trace;
	uint64_t tr_cwnd, tr_losses, tr_timeouts, tr_floor, tr_peak;
	unsigned tr_md_ok, tr_md_events, tr_regrown, tr_episodes;
	double tr_worst_md;
};

struct net {
	uint64_t now;
	struct side a, b;
	struct link ab, ba;
};

/* Put a datagram on the wire (gathered from iov, or data when iov is NULL). */
static int link_send(struct link *l, const struct iovec *iov, unsigned n, const void *data, size_t len)
{
	uint64_t now = l->net->now;
	if (l->blackhole)
		return 0;
	uint64_t start = l->busy_until > now ? l->busy_until : now;
	if (l->qlimit && l->ns_per_byte > 0 && (double)(start - now) / l->ns_per_byte > (double)l->qlimit) {
		l->qdrops++;
		return 0;
	}
	l->busy_until = start + (uint64_t)((double)len * l->ns_per_byte);
	struct pkt *p = pkt_get(len);
	if (!p)
		return -ENOMEM;
	p->at = l->busy_until + l->latency;
	if (iov) {
		size_t at = 0;
		for (unsigned i = 0; i < n; i++) {
			memcpy(p->data + at, iov[i].iov_base, iov[i].iov_len);
			at += iov[i].iov_len;
		}
	} else {
		memcpy(p->data, data, len);
	}
	if (l->tail)
		l->tail->next = p;
	else
		l->head = p;
	l->tail = p;
	l->carried++;
	return 0;
}

static int link_put(void *ctx, const void *data, size_t len)
{
	return link_send(ctx, NULL, 0, data, len);
}

static void watch_datagram(struct side *s, const uint8_t *d, size_t len)
{
	struct ferry_rl_hdr h;
	if (ferry_rl_decode(d, len, &h, NULL) || h.type != FERRY_RL_T_DATA)
		return;
	uint64_t now = s->net->now;
	if (s->w_count && now == s->w_last_at) {
		s->w_burst++;
	} else {
		if (s->w_count && s->w_rate) {
			/* the previous datagram's wire time at the configured rate */
			uint64_t need = (uint64_t)((double)(s->w_last_len + FERRY_RL_OVERHEAD) * 1e9 / (double)s->w_rate);
			uint64_t gap = now - s->w_last_at;
			uint64_t slack = gap + 2 >= need ? gap + 2 - need : 0;
			if (slack < s->w_min_slack)
				s->w_min_slack = slack;
		}
		s->w_burst = 1;
	}
	if (s->w_burst > s->w_max_burst)
		s->w_max_burst = s->w_burst;
	s->w_last_at = now;
	s->w_last_len = h.len;
	s->w_count++;
}

static int side_tx(void *ctx, const struct iovec *iov, unsigned n, size_t len)
{
	static uint8_t buf[FERRY_RL_DATAGRAM_MAX];
	struct side *s = ctx;
	if (!s->watch && !s->out->fault)
		return link_send(s->out, iov, n, NULL, len);
	size_t at = 0;
	for (unsigned i = 0; i < n; i++) {
		memcpy(buf + at, iov[i].iov_base, iov[i].iov_len);
		at += iov[i].iov_len;
	}
	if (at != len)
		return -EINVAL;
	if (s->watch)
		watch_datagram(s, buf, len);
	if (s->out->fault)
		return ferry_fault_submit(s->out->fault, buf, len, s->net->now, link_put, s->out);
	return link_put(s->out, buf, len);
}

static void rx_release(void *user, void *cookie)
{
	struct side *s = user;
	s->live_retained--;
	s->released++;
	pkt_put(cookie);
}

static void side_fail(struct side *s, int rc)
{
	if (!s->fail_rc) {
		s->fail_rc = rc;
		s->fail_at = s->net->now;
	}
}

static void side_trace(struct side *s)
{
	struct ferry_rl_stats st;
	if (!s->trace)
		return;
	ferry_rl_stats(s->rl, &st);
	size_t seg = ferry_rl_segment_max(s->rl);
	if (st.loss_events > s->tr_losses) {
		/* a reduction: was it multiplicative, and did the last one regrow? */
		if (s->tr_episodes && s->tr_peak >= s->tr_floor + 2 * seg)
			s->tr_regrown++;
		if (st.timeouts == s->tr_timeouts) {
			double r = (double)st.cwnd / (double)s->tr_cwnd;
			s->tr_md_events++;
			if (r >= 0.45 && r <= 0.55)
				s->tr_md_ok++;
			else if (fabs(r - 0.5) > fabs(s->tr_worst_md - 0.5))
				s->tr_worst_md = r;
		}
		s->tr_episodes++;
		s->tr_losses = st.loss_events;
		s->tr_floor = s->tr_peak = st.cwnd;
	}
	s->tr_timeouts = st.timeouts;
	if (st.cwnd < s->tr_floor)
		s->tr_floor = s->tr_peak = st.cwnd;
	if (st.cwnd > s->tr_peak)
		s->tr_peak = st.cwnd;
	s->tr_cwnd = st.cwnd;
}

static void deliver(struct link *l, struct side *to)
{
	struct net *n = l->net;
	while (!to->stalled && l->head && l->head->at <= n->now) {
		struct pkt *p = l->head;
		l->head = p->next;
		if (!l->head)
			l->tail = NULL;
		if (to->dead) {
			pkt_put(p);
			continue;
		}
		struct ferry_rl_hdr h;
		if (!lean && ferry_rl_decode(p->data, p->len, &h, NULL) == -EBADMSG)
			to->bad_arrivals++;
		/* Like a backend short of buffers: some datagrams are not lent. */
		bool lend = !to->lend_every || ++to->lend_n % to->lend_every;
		if (!lend)
			to->copied_in++;
		int rc = ferry_rl_input(to->rl, p->data, p->len, lend ? p : NULL, n->now, &to->err);
		if (rc == 1) {
			to->live_retained++;
			to->kept++;
		} else {
			pkt_put(p);
		}
		if (rc < 0)
			side_fail(to, rc);
		side_trace(to);
	}
}

static void app_tx(struct side *s)
{
	void *ck[64];
	int k;
	while ((k = ferry_rl_completions(s->rl, ck, 64)) > 0)
		for (int i = 0; i < k; i++)
			if ((uintptr_t)ck[i] != ++s->tx_completed)
				s->tx_order_bad = true;
	while (s->tx_queued < s->tx_target) {
		uint32_t off, len;
		uint8_t head[HEAD_LEN];
		msg_shape(s->seed, s->tx_msgs, &off, &len);
		head_make(head, s->tx_msgs, off, len);
		struct ferry_rl_msg m = { .head = head, .head_len = HEAD_LEN, .payload = pool + off,
					  .payload_len = len, .cookie = (void *)(uintptr_t)(s->tx_msgs + 1) };
		int rc = ferry_rl_send(s->rl, &m, &s->err);
		if (rc == -EAGAIN)
			break;
		if (rc) {
			side_fail(s, rc);
			break;
		}
		if (!lean)
			s->tx_crc = ferry_crc32c(ferry_crc32c(s->tx_crc, head, HEAD_LEN), pool + off, len);
		s->tx_msgs++;
		s->tx_queued += HEAD_LEN + len;
	}
}

static void app_rx(struct side *s)
{
	if (s->paused)
		return;
	if (s->read_mode) {
		/* Copying reads, alternating with looks in place consumed by
		 * ferry_rl_skip, both smaller than a segment: partial ones too. */
		uint8_t buf[2999];
		bool end;
		size_t n;
		for (bool skip = false;; skip = !skip) {
			struct ferry_rl_seg sg[1];
			if (!skip) {
				if ((n = ferry_rl_read(s->rl, buf, sizeof(buf), &end)) == 0)
					break;
				rx_feed(&s->rx, buf, n, !s->rx.in_msg, end);
				continue;
			}
			if (ferry_rl_recv(s->rl, sg, 1) != 1)
				break;
			n = sg[0].len < 1777 ? sg[0].len : 1777;
			bool last = n == sg[0].len && (sg[0].flags & FERRY_RL_F_END);
			rx_feed(&s->rx, sg[0].data, n, !s->rx.in_msg, last);
			if (ferry_rl_skip(s->rl, n, &end) != n || end != last)
				rx_bad(&s->rx, "ferry_rl_skip took other bytes or another message end than ferry_rl_recv showed");
		}
	} else {
		struct ferry_rl_seg sg[32];
		int k;
		while ((k = ferry_rl_recv(s->rl, sg, 32)) > 0) {
			for (int i = 0; i < k; i++)
				rx_feed(&s->rx, sg[i].data, sg[i].len, sg[i].flags & FERRY_RL_F_START,
					sg[i].flags & FERRY_RL_F_END);
			ferry_rl_release(s->rl, (unsigned)k);
		}
	}
}

static void side_poll(struct side *s)
{
	if (s->dead || s->fail_rc || s->stalled)
		return;
	int rc = ferry_rl_poll(s->rl, s->net->now, side_tx, s, &s->err);
	if (rc < 0)
		side_fail(s, rc);
	side_trace(s);
}

static uint64_t side_deadline(const struct side *s)
{
	return s->dead || s->fail_rc || s->stalled ? NEVER : ferry_rl_next_deadline(s->rl);
}

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* Run until done(n) or the virtual clock passes 'until'. */
static bool net_run(struct net *n, bool (*done)(struct net *), uint64_t until)
{
	unsigned same = 0;
	for (;;) {
		deliver(&n->ab, &n->b);
		deliver(&n->ba, &n->a);
		struct side *sides[2] = { &n->a, &n->b };
		for (int i = 0; i < 2; i++) {
			if (sides[i]->dead || sides[i]->fail_rc || sides[i]->stalled)
				continue;
			app_rx(sides[i]);
			app_tx(sides[i]);
		}
		side_poll(&n->a);
		side_poll(&n->b);
		if (n->ab.fault && ferry_fault_poll(n->ab.fault, n->now, link_put, &n->ab))
			return false;
		if (n->ba.fault && ferry_fault_poll(n->ba.fault, n->now, link_put, &n->ba))
			return false;
		if (done && done(n))
			return true;
		uint64_t next = min64(side_deadline(&n->a), side_deadline(&n->b));
		if (n->ab.head && !n->b.stalled)
			next = min64(next, n->ab.head->at);
		if (n->ba.head && !n->a.stalled)
			next = min64(next, n->ba.head->at);
		if (n->ab.fault)
			next = min64(next, ferry_fault_next_release(n->ab.fault));
		if (n->ba.fault)
			next = min64(next, ferry_fault_next_release(n->ba.fault));
		if (next <= n->now) {
			if (++same > 100000) {
				printf("# livelock at %" PRIu64 " ns: deadlines a %" PRIu64 " b %" PRIu64 "\n", n->now,
				       side_deadline(&n->a), side_deadline(&n->b));
				return false;
			}
			continue;
		}
		same = 0;
		if (next > until) {
			n->now = until;
			return false;
		}
		n->now = next;
	}
}

struct net_params {
	size_t dgram;
	unsigned window;
	uint64_t max_inflight_bytes;
	double ns_per_byte;
	uint64_t latency;
	uint64_t qlimit;
	const char *fault_ab, *fault_ba;
	uint64_t bytes_ab, bytes_ba;
	bool no_pacing;
	unsigned pace_burst;
	uint64_t max_rate;
	uint32_t initial_seq;
	uint64_t dead_ns, keepalive_ns, rto_max_ns;
};

static void base_config(const struct net_params *p, struct ferry_rl_config *c)
{
	memset(c, 0, sizeof(*c));
	c->conn_id = 0x5eed0001;
	c->initial_seq = p->initial_seq ? p->initial_seq : 12345;
	c->max_datagram = p->dgram;
	c->window_pkts = p->window;
	c->max_inflight_bytes = p->max_inflight_bytes;
	c->rto_min_ns = 1 * MS;
	c->rto_initial_ns = 20 * MS;
	c->rto_max_ns = p->rto_max_ns ? p->rto_max_ns : 200 * MS;
	c->dead_ns = p->dead_ns ? p->dead_ns : 2000 * MS;
	c->keepalive_ns = p->keepalive_ns;
	c->no_pacing = p->no_pacing;
	c->pace_burst = p->pace_burst;
	c->max_rate = p->max_rate;
}

static int fault_for(struct link *l, const char *spec, struct ferry_err *err)
{
	if (!spec)
		return 0;
	struct ferry_fault_config fc;
	int rc = ferry_fault_parse(spec, &fc, err);
	return rc ? rc : ferry_fault_create(&fc, &l->fault, err);
}

/* a copies into its own slots and reads with ferry_rl_read; b keeps the
 * datagrams (rx_release) and receives zero-copy: both paths in every run.
 * A failure is a failed check named after label. */
static int net_setup(struct net *n, const struct net_params *p, const char *label)
{
	struct ferry_err err = { 0 };
	struct ferry_rl_config c;
	memset(n, 0, sizeof(*n));
	n->now = 1 * MS;
	struct link *links[2] = { &n->ab, &n->ba };
	for (int i = 0; i < 2; i++) {
		links[i]->net = n;
		links[i]->ns_per_byte = p->ns_per_byte;
		links[i]->latency = p->latency;
		links[i]->qlimit = p->qlimit;
	}
	if (fault_for(&n->ab, p->fault_ab, &err) || fault_for(&n->ba, p->fault_ba, &err)) {
		CHECK(0, "%s: set up: fault config: %s", label, err.msg);
		return -1;
	}
	struct side *sides[2] = { &n->a, &n->b };
	for (int i = 0; i < 2; i++) {
		struct side *s = sides[i];
		s->name = i ? "b" : "a";
		s->net = n;
		s->out = i ? &n->ba : &n->ab;
		s->read_mode = i == 0;
		s->seed = i ? 0xb0b : 0xa11ce;
		s->tx_target = i ? p->bytes_ba : p->bytes_ab;
		s->w_min_slack = NEVER;
		base_config(p, &c);
		if (i) {
			c.rx_release = rx_release;
			c.user = s;
			s->lend_every = 3;
		}
		if (ferry_rl_create(&c, n->now, &s->rl, &err)) {
			CHECK(0, "%s: set up: rlane: %s", label, err.msg);
			return -1;
		}
	}
	return 0;
}

static void net_free(struct net *n)
{
	struct side *sides[2] = { &n->a, &n->b };
	struct link *links[2] = { &n->ab, &n->ba };
	for (int i = 0; i < 2; i++) {
		ferry_rl_destroy(sides[i]->rl);
		ferry_fault_destroy(links[i]->fault);
		while (links[i]->head) {
			struct pkt *p = links[i]->head;
			links[i]->head = p->next;
			free(p);
		}
	}
	pkt_drain();
}

static bool dir_done(const struct side *tx, const struct side *rx)
{
	return tx->tx_queued >= tx->tx_target && tx->tx_completed == tx->tx_msgs && rx->rx.msgs == tx->tx_msgs;
}

static bool transfer_done(struct net *n)
{
	return (n->a.fail_rc || n->b.fail_rc || n->a.rx.bad || n->b.rx.bad) ||
	       (dir_done(&n->a, &n->b) && dir_done(&n->b, &n->a));
}

static void check_direction(const char *what, struct side *tx, struct side *rx, const struct ferry_rl_stats *rs,
			    const struct ferry_rl_stats *ts, unsigned window)
{
	CHECK(!rx->rx.bad, "%s: every delivered byte matches what was sent%s%s", what, rx->rx.bad ? ": " : "",
	      rx->rx.why);
	CHECK(rx->rx.msgs == tx->tx_msgs && rx->rx.bytes == tx->tx_queued && !rx->rx.in_msg,
	      "%s: all %" PRIu64 " messages (%" PRIu64 " bytes) delivered exactly once, in order", what,
	      tx->tx_msgs, tx->tx_queued);
	CHECK(rx->rx.crc == tx->tx_crc, "%s: CRC32C of the delivered stream equals the sent one (0x%08x)", what,
	      tx->tx_crc);
	CHECK(tx->tx_completed == tx->tx_msgs && !tx->tx_order_bad,
	      "%s: every message completed, in send order", what);
	CHECK(rs->corrupt_drops == rx->bad_arrivals,
	      "%s: corrupt datagrams counted (%" PRIu64 ") = datagrams that arrived failing the check (%" PRIu64 ")",
	      what, rs->corrupt_drops, rx->bad_arrivals);
	CHECK(rs->window_drops == 0 && ts->max_inflight_pkts <= window,
	      "%s: the sender kept within the receiver's window (at most %u of %u packets in flight)", what,
	      ts->max_inflight_pkts, window);
}

/* ---- transfers ---------------------------------------------------------- */

struct xfer_result {
	double wall, cpu;
	uint64_t virt_ns;
	uint64_t msgs, bytes, datagrams;
};

static void transfer(const char *name, const struct net_params *p, struct xfer_result *out)
{
	struct net n;
	struct ferry_rl_stats sa, sb;
	printf("# %s\n", name);
	if (net_setup(&n, p, name))
		return;
	uint64_t t0 = n.now;
	double w0 = wall(), c0 = cpu();
	bool ok = net_run(&n, transfer_done, 600000 * MS);
	double w1 = wall(), c1 = cpu();
	ferry_rl_stats(n.a.rl, &sa);
	ferry_rl_stats(n.b.rl, &sb);
	CHECK(ok && !n.a.fail_rc && !n.b.fail_rc, "%s: both directions finished (%.1f ms virtual)%s%s%s%s", name,
	      (double)(n.now - t0) / 1e6, n.a.fail_rc ? "; a: " : "", n.a.fail_rc ? n.a.err.msg : "",
	      n.b.fail_rc ? "; b: " : "", n.b.fail_rc ? n.b.err.msg : "");
	unsigned W = p->window ? p->window : 512;
	check_direction("a->b", &n.a, &n.b, &sb, &sa, W);
	check_direction("b->a", &n.b, &n.a, &sa, &sb, W);
	CHECK(ferry_rl_unfinished(n.a.rl) == 0 && ferry_rl_unfinished(n.b.rl) == 0,
	      "%s: nothing left unacknowledged", name);
	struct ferry_fault_stats fa = { 0 }, fb = { 0 };
	if (n.ab.fault)
		ferry_fault_stats(n.ab.fault, &fa);
	if (n.ba.fault)
		ferry_fault_stats(n.ba.fault, &fb);
	printf("# %s: a sent %" PRIu64 " data (+%" PRIu64 " retx: %" PRIu64 " fast, %" PRIu64 " tlp; %" PRIu64
	       " timeouts), %" PRIu64 " acks; b dropped %" PRIu64 " dups, %" PRIu64 " corrupt, buffered %" PRIu64
	       " out of order; cwnd %" PRIu64 " srtt %" PRIu64 " us rttvar %" PRIu64 " us\n",
	       name, sa.tx_data, sa.retransmits, sa.fast_retransmits, sa.tlp_probes, sa.timeouts, sa.tx_acks,
	       sb.dup_drops, sb.corrupt_drops, sb.reorder_buffered, sa.cwnd, sa.srtt_ns / 1000, sa.rttvar_ns / 1000);
	printf("# %s: faults a->b: %" PRIu64 " seen, %" PRIu64 " dropped, %" PRIu64 " duplicated, %" PRIu64
	       " reordered, %" PRIu64 " corrupted; queue drops %" PRIu64 "\n",
	       name, fa.seen, fa.dropped, fa.duplicated, fa.reordered, fa.corrupted, n.ab.qdrops);
	if (out) {
		out->wall = w1 - w0;
		out->cpu = c1 - c0;
		out->virt_ns = n.now - t0;
		out->msgs = n.a.tx_msgs + n.b.tx_msgs;
		out->bytes = n.a.tx_queued + n.b.tx_queued;
		out->datagrams = sa.tx_datagrams + sb.tx_datagrams;
	}
	if (p->fault_ab) {
		struct ferry_fault_config fc;
		ferry_fault_parse(p->fault_ab, &fc, NULL);
		if (fc.drop > 0)
			CHECK(sa.retransmits > 0 && sb.retransmits > 0 && fa.dropped > 0,
			      "%s: losses happened and were repaired (%" PRIu64 " + %" PRIu64 " retransmissions)", name,
			      sa.retransmits, sb.retransmits);
		/* every retransmission has one cause: the timer, acks, or a
		 * tail loss probe resending the newest segment */
		CHECK(sa.rto_retransmits + sa.fast_retransmits <= sa.retransmits &&
			      sa.retransmits - sa.rto_retransmits - sa.fast_retransmits <= sa.tlp_probes,
		      "%s: retransmissions by cause add up (%" PRIu64 " = %" PRIu64 " timer + %" PRIu64 " acks + tlp, %" PRIu64
		      " probes)", name, sa.retransmits, sa.rto_retransmits, sa.fast_retransmits, sa.tlp_probes);
		/* (duplicated acks need no suppression, so no equality here;
		 * exactly-once delivery above is the real check) */
		if (fc.dup > 0)
			CHECK(sb.dup_drops > 0 && sa.dup_drops > 0,
			      "%s: duplicates suppressed (%" PRIu64 " and %" PRIu64 " dropped)", name, sb.dup_drops,
			      sa.dup_drops);
		if (fc.reorder > 0)
			CHECK(sb.reorder_buffered > 0 && sa.reorder_buffered > 0,
			      "%s: out-of-order segments buffered (%" PRIu64 ", %" PRIu64 ")", name, sb.reorder_buffered,
			      sa.reorder_buffered);
		if (fc.corrupt > 0)
			CHECK(sb.corrupt_drops >= fa.corrupted && fa.corrupted > 0 && sa.corrupt_drops >= fb.corrupted,
			      "%s: every corrupted datagram dropped and counted (%" PRIu64 " >= %" PRIu64 ")", name,
			      sb.corrupt_drops, fa.corrupted);
	} else {
		CHECK(sa.retransmits == 0 && sb.retransmits == 0 && sa.timeouts == 0,
		      "%s: a clean path needs no retransmission (%" PRIu64 ", %" PRIu64 ")", name, sa.retransmits,
		      sb.retransmits);
	}
	CHECK(n.b.live_retained <= W, "%s: datagrams kept for zero-copy receive stay within the window (%u)", name,
	      n.b.live_retained);
	net_free(&n);
	CHECK(n.b.live_retained == 0, "%s: every retained datagram went back through rx_release", name);
	CHECK(n.b.kept == n.b.released, "%s: each kept datagram released exactly once (%" PRIu64 " kept, %" PRIu64
	      " released)", name, n.b.kept, n.b.released);
	if (p->bytes_ab > 0)
		CHECK(n.b.kept > 0 && n.b.copied_in > 0, "%s: b took datagrams both kept and copied (%" PRIu64 " kept, %" PRIu64
		      " offered without a cookie)", name, n.b.kept, n.b.copied_in);
}

static void test_transfers(void)
{
	uint64_t big = 64 * MIB / scale;
	struct xfer_result r;
	struct net_params p = { .dgram = JUMBO_DGRAM, .ns_per_byte = 0.8 /* 10 Gb/s */, .latency = 20 * US,
				.bytes_ab = big, .bytes_ba = big };
	transfer("clean path, 9000-byte MTU", &p, &r);
	printf("# clean path: %" PRIu64 " messages, %.1f MiB, %" PRIu64 " datagrams in %.3f s wall (%.3f s CPU): "
	       "%.0f msgs/s, %.2f GB/s through both engines and the test network\n",
	       r.msgs, (double)r.bytes / MIB, r.datagrams, r.wall, r.cpu, (double)r.msgs / r.cpu,
	       (double)r.bytes / r.cpu / 1e9);

	p.fault_ab = "drop=0.01,dup=0.01,reorder=0.02,seed=1";
	p.fault_ba = "drop=0.01,dup=0.01,reorder=0.02,seed=2";
	transfer("1% loss, 1% duplication, 2% reordering, 9000-byte MTU", &p, NULL);

	p.dgram = AF_XDP_DGRAM;
	p.fault_ab = "drop=0.05,dup=0.02,reorder=0.05,depth=16,seed=3";
	p.fault_ba = "drop=0.05,dup=0.02,reorder=0.05,depth=16,seed=4";
	transfer("5% loss, 2% duplication, 5% reordering, af_xdp frames", &p, NULL);

	p.dgram = 1472;
	p.bytes_ab = p.bytes_ba = big / 2;
	p.fault_ab = "drop=0.01,corrupt=0.02,reorder=0.01,seed=5";
	p.fault_ba = "drop=0.01,corrupt=0.02,reorder=0.01,seed=6";
	transfer("2% corruption, 1% loss, 1500-byte MTU", &p, NULL);

	/* packet numbers wrap past 2^32 on the wire mid-transfer */
	p.bytes_ab = p.bytes_ba = 8 * MIB / scale;
	p.initial_seq = 0xfffff000u;
	p.fault_ab = "drop=0.02,reorder=0.02,seed=7";
	p.fault_ba = "drop=0.02,reorder=0.02,seed=8";
	transfer("packet numbers wrapping through 2^32 with 2% loss", &p, NULL);
}

/* ---- congestion control ------------------------------------------------- */

static bool ab_done(struct net *n)
{
	return n->a.fail_rc || n->b.fail_rc || n->b.rx.bad || dir_done(&n->a, &n->b);
}

/* a's counters before and after an episode: *flag set for len, then settle. */
static void episode(struct net *n, bool *flag, uint64_t len, uint64_t settle, struct ferry_rl_stats *before,
		    struct ferry_rl_stats *after)
{
	ferry_rl_stats(n->a.rl, before);
	*flag = true;
	net_run(n, NULL, n->now + len);
	*flag = false;
	net_run(n, NULL, n->now + settle);
	ferry_rl_stats(n->a.rl, after);
}

static void test_aimd(void)
{
	/* A 1 Gb/s bottleneck with a 128 KiB drop-tail queue and a window far
	 * above the path's capacity: cwnd must saw-tooth on queue overflow. */
	struct net n;
	struct net_params p = { .dgram = JUMBO_DGRAM, .window = 2048, .ns_per_byte = 8.0, .latency = 50 * US,
				.qlimit = 128 << 10, .bytes_ab = 48 * MIB / scale };
	printf("# AIMD over a congested bottleneck\n");
	if (net_setup(&n, &p, "aimd"))
		return;
	n.a.trace = true;
	bool ok = net_run(&n, ab_done, 600000 * MS);
	struct ferry_rl_stats st;
	ferry_rl_stats(n.a.rl, &st);
	size_t seg = ferry_rl_segment_max(n.a.rl);
	CHECK(ok && !n.b.rx.bad && n.b.rx.msgs == n.a.tx_msgs, "aimd: the transfer completes intact despite %" PRIu64
	      " queue drops", n.ab.qdrops);
	CHECK(n.ab.qdrops > 0 && st.loss_events >= 3, "aimd: the queue overflowed and cwnd was cut %" PRIu64 " times",
	      st.loss_events);
	CHECK(n.a.tr_md_events > 0 && n.a.tr_md_ok == n.a.tr_md_events,
	      "aimd: each loss episode halved cwnd (%u of %u within 0.45..0.55; worst %.2f)", n.a.tr_md_ok,
	      n.a.tr_md_events, n.a.tr_worst_md);
	/* Leaving slow start overshoots: packets sent just before the first cut
	 * may overflow the queue once more, a second cut with no regrowth. */
	CHECK(n.a.tr_regrown + 2 >= n.a.tr_episodes && n.a.tr_regrown > 0,
	      "aimd: after each cut (but the slow-start exit) cwnd grew back by 2+ segments before the next (%u of %u)",
	      n.a.tr_regrown, n.a.tr_episodes > 0 ? n.a.tr_episodes - 1 : 0);
	/* the path holds ~ 100 us x 1 Gb/s + 128 KiB; a healthy AIMD stays near it */
	double bdp = 100e-6 * 125e6 + (128 << 10);
	double rate = (double)n.a.tx_queued / ((double)(n.now - MS) / 1e9);
	CHECK(rate > 0.7 * 125e6, "aimd: goodput %.0f MB/s of the 125 MB/s bottleneck", rate / 1e6);
	CHECK(st.cwnd < 4 * bdp + 10 * seg, "aimd: cwnd (%" PRIu64 ") stays within a few path capacities (%.0f)",
	      st.cwnd, bdp);
	printf("# aimd: %" PRIu64 " loss events, %" PRIu64 " timeouts, %" PRIu64 " retransmissions, cwnd %" PRIu64
	       ", ssthresh %" PRIu64 ", goodput %.0f MB/s\n", st.loss_events, st.timeouts, st.retransmits, st.cwnd,
	       st.ssthresh, rate / 1e6);
	net_free(&n);

	/* Deterministic: a burst of loss on an uncongested path cuts cwnd, and
	 * afterwards it climbs back to where it was. A 64-packet window below
	 * the path's capacity (10 Gb/s, 100 us) keeps queues out of it. */
	struct net_params q = { .dgram = 1472, .window = 64, .ns_per_byte = 0.8, .latency = 50 * US,
				.bytes_ab = 48 * MIB };
	if (net_setup(&n, &q, "aimd burst"))
		return;
	net_run(&n, NULL, 3 * MS);
	struct ferry_rl_stats before, cut, after;
	episode(&n, &n.ab.blackhole, 60 * US, 2 * MS, &before, &cut);
	net_run(&n, NULL, n.now + 20 * MS);
	ferry_rl_stats(n.a.rl, &after);
	CHECK(cut.loss_events > before.loss_events && cut.ssthresh <= before.cwnd * 6 / 10,
	      "aimd burst: losing a burst cuts the window (cwnd %" PRIu64 " -> ssthresh %" PRIu64 ")", before.cwnd,
	      cut.ssthresh);
	CHECK(after.cwnd > cut.ssthresh && after.cwnd >= before.cwnd,
	      "aimd burst: cwnd grows back (%" PRIu64 " -> %" PRIu64 ", was %" PRIu64 " before the loss)",
	      cut.ssthresh, after.cwnd, before.cwnd);
	bool ok2 = net_run(&n, ab_done, n.now + 60000 * MS);
	CHECK(ok2 && !n.b.rx.bad, "aimd burst: the transfer still completes intact");
	net_free(&n);
}

/* A receiver that is not scheduled for longer than the RTO (a lane thread on
 * a busy 2-core host) loses nothing: the timeout it causes is spurious, and
 * must neither leave cwnd at one segment nor send the whole window again. */
static void test_spurious_rto(void)
{
	struct net n;
	struct net_params p = { .dgram = JUMBO_DGRAM, .window = 256, .ns_per_byte = 0.1, .latency = 20 * US,
				.bytes_ab = 256 * MIB / scale };
	printf("# a receiver descheduled past the RTO\n");
	if (net_setup(&n, &p, "spurious rto"))
		return;
	net_run(&n, NULL, 3 * MS);
	struct ferry_rl_stats before, after, end;
	episode(&n, &n.b.stalled, 8 * MS, 1 * MS, &before, &after);
	uint64_t retx = after.retransmits - before.retransmits;
	CHECK(after.timeouts > before.timeouts, "spurious rto: the stall fired the timer (%" PRIu64 " timeouts)",
	      after.timeouts - before.timeouts);
	CHECK(after.spurious_timeouts > before.spurious_timeouts, "spurious rto: the timeout was found spurious and undone");
	CHECK(after.cwnd >= before.cwnd, "spurious rto: cwnd is back (%" PRIu64 " before the stall, %" PRIu64 " after)",
	      before.cwnd, after.cwnd);
	CHECK(retx < 8, "spurious rto: %" PRIu64 " segments sent again, not the window (%u in flight before)", retx,
	      before.inflight_pkts);
	bool ok = net_run(&n, ab_done, n.now + 60000 * MS);
	ferry_rl_stats(n.a.rl, &end);
	CHECK(ok && !n.b.rx.bad && n.b.rx.msgs == n.a.tx_msgs, "spurious rto: the transfer completes intact");
	printf("# spurious rto: %" PRIu64 " timeouts (%" PRIu64 " undone), %" PRIu64 " retransmissions in all\n",
	       end.timeouts, end.spurious_timeouts, end.retransmits);
	net_free(&n);
}

/* Reordering without loss (datagrams handed between two lane threads that
 * share a queue arrive a thread's scheduling delay late): RACK's allowance
 * must grow with the reordering it sees, so that few segments are sent
 * again and cwnd is cut only a few times, not once per late datagram. */
static void test_reorder_adapts(void)
{
	struct net n;
	struct net_params p = { .dgram = JUMBO_DGRAM, .window = 256, .ns_per_byte = 0.1, .latency = 20 * US,
				.fault_ab = "reorder=0.03,depth=64,hold_us=25,seed=11", .bytes_ab = 128 * MIB / scale };
	printf("# reordering, no loss\n");
	if (net_setup(&n, &p, "reorder"))
		return;
	bool ok = net_run(&n, ab_done, 60000 * MS);
	struct ferry_rl_stats st;
	ferry_rl_stats(n.a.rl, &st);
	struct ferry_fault_stats fs;
	ferry_fault_stats(n.ab.fault, &fs);
	CHECK(ok && !n.b.rx.bad && n.b.rx.msgs == n.a.tx_msgs, "reorder: the transfer completes intact");
	printf("# reorder: retx %" PRIu64 " (fast %" PRIu64 ", rto %" PRIu64 ", tlp %" PRIu64 "), srtt %" PRIu64
	       " us, min_rtt %" PRIu64 " us\n", st.retransmits, st.fast_retransmits, st.rto_retransmits, st.tlp_probes,
	       st.srtt_ns / 1000, st.min_rtt_ns / 1000);
	CHECK(st.reorder_seen > 0, "reorder: the sender saw reordering (%" PRIu64 " times)", st.reorder_seen);
	CHECK(st.retransmits * 10 < fs.reordered, "reorder: %" PRIu64 " segments sent again for %" PRIu64
	      " reordered (under a tenth)", st.retransmits, fs.reordered);
	CHECK(st.loss_events * 20 < fs.reordered, "reorder: cwnd cut %" PRIu64 " times for %" PRIu64
	      " reordered (under a twentieth)", st.loss_events, fs.reordered);
	net_free(&n);
}

/* ---- pacing ------------------------------------------------------------- */

static void test_pacing(void)
{
	struct net n;
	/* unlimited bandwidth, 1 ms RTT: without pacing a window leaves at once */
	struct net_params p = { .dgram = JUMBO_DGRAM, .ns_per_byte = 0, .latency = 500 * US,
				.bytes_ab = 16 * MIB, .pace_burst = 1 };
	for (int paced = 1; paced >= 0; paced--) {
		p.no_pacing = !paced;
		if (net_setup(&n, &p, "pacing"))
			return;
		/* watch from the first RTT sample on (before it nothing paces) */
		while (!n.a.fail_rc) {
			struct ferry_rl_stats st;
			ferry_rl_stats(n.a.rl, &st);
			if (st.srtt_ns)
				break;
			if (!net_run(&n, NULL, n.now + 100 * US) && n.now > 100 * MS)
				break;
		}
		n.a.watch = true;
		bool ok = net_run(&n, ab_done, 60000 * MS);
		if (paced)
			CHECK(ok && n.a.w_max_burst == 1 && n.a.w_count > 100,
			      "pacing on: no two data datagrams leave at the same instant (%u datagrams, largest burst %u)",
			      n.a.w_count, n.a.w_max_burst);
		else
			CHECK(ok && n.a.w_max_burst >= 8,
			      "pacing off: the same transfer sends bursts (largest %u datagrams at one instant)",
			      n.a.w_max_burst);
		net_free(&n);
	}

	/* A rate ceiling: datagrams spaced by their wire time at max_rate. */
	p.no_pacing = false;
	p.max_rate = 200000000; /* 200 MB/s */
	p.bytes_ab = 8 * MIB;
	if (net_setup(&n, &p, "pacing"))
		return;
	n.a.watch = true;
	n.a.w_rate = p.max_rate;
	uint64_t t0 = n.now;
	bool ok = net_run(&n, ab_done, 60000 * MS);
	double secs = (double)(n.now - t0) / 1e9;
	double rate = (double)n.a.tx_queued / secs;
	CHECK(ok && n.a.w_min_slack != NEVER && n.a.w_min_slack >= 1,
	      "max_rate: every data datagram waited at least the previous one's wire time at 200 MB/s");
	CHECK(rate <= 200e6 && rate >= 0.9 * 200e6 * 8916 / 8972 * 0.95,
	      "max_rate: goodput %.1f MB/s just under the 200 MB/s ceiling", rate / 1e6);
	net_free(&n);
}

/* ---- flow control ------------------------------------------------------- */

static void test_window(void)
{
	struct net n;
	const unsigned W = 64;
	struct net_params p = { .dgram = 1472, .window = W, .ns_per_byte = 0.8, .latency = 20 * US,
				.bytes_ab = 4 * MIB, .dead_ns = 50 * MS, .keepalive_ns = 10 * MS };
	if (net_setup(&n, &p, "window"))
		return;
	size_t seg = ferry_rl_segment_max(n.a.rl);
	ferry_rl_destroy(n.a.rl);
	struct ferry_rl_config c;
	struct ferry_err err = { 0 };
	base_config(&p, &c);
	c.max_inflight_bytes = 40 * seg; /* bytes bind before packets */
	c.dead_ns = 50 * MS;
	c.keepalive_ns = 10 * MS;
	int rc = ferry_rl_create(&c, n.now, &n.a.rl, &err);
	CHECK(rc == 0, "window: sender with a 40-segment byte cap");
	if (rc)
		return;

	n.b.paused = true; /* the receiving application stops reading */
	net_run(&n, NULL, n.now + 200 * MS);
	struct ferry_rl_stats sa, sb;
	ferry_rl_stats(n.a.rl, &sa);
	ferry_rl_stats(n.b.rl, &sb);
	struct ferry_rl_seg sg[128];
	int held = ferry_rl_recv(n.b.rl, sg, 128);
	CHECK(!n.a.fail_rc && !n.b.fail_rc,
	      "window: a reader stalled 200 ms (4x the dead time) does not fail the connection (%s)",
	      n.a.fail_rc ? n.a.err.msg : "ok");
	CHECK(held == (int)W && sb.window_drops == 0,
	      "window: the receiver holds exactly its window (%d of %u) and nothing arrived beyond it", held, W);
	CHECK(sa.max_inflight_bytes <= 40 * seg && sa.max_inflight_pkts <= W,
	      "window: never more in flight than allowed (%" PRIu64 " <= %zu bytes, %u <= %u packets)",
	      sa.max_inflight_bytes, 40 * seg, sa.max_inflight_pkts, W);
	CHECK(sa.probes > 0 && sa.peer_window == 0, "window: the blocked sender probes the closed window (%" PRIu64
	      " probes)", sa.probes);

	/* Reading resumes while the return path is down: the window update is
	 * lost, the sender's probe finds the open window. */
	n.ba.blackhole = true;
	n.b.paused = false;
	net_run(&n, NULL, n.now + 1 * MS);
	n.ba.blackhole = false;
	bool ok = net_run(&n, ab_done, n.now + 10000 * MS);
	ferry_rl_stats(n.a.rl, &sa);
	ferry_rl_stats(n.b.rl, &sb);
	CHECK(ok && !n.b.rx.bad && n.b.rx.msgs == n.a.tx_msgs,
	      "window: after the lost window update the transfer completes intact (%" PRIu64 " messages)",
	      n.b.rx.msgs);
	CHECK(sb.window_drops == 0 && sa.max_inflight_bytes <= 40 * seg && sa.max_inflight_pkts <= W,
	      "window: limits held for the whole transfer");
	net_free(&n);
}

/* ---- liveness ----------------------------------------------------------- */

static bool a_failed(struct net *n)
{
	return n->a.fail_rc != 0;
}

static void test_dead_peer(void)
{
	struct net n;
	const uint64_t dead = 300 * MS;
	struct net_params p = { .dgram = 1472, .ns_per_byte = 0.8, .latency = 20 * US, .bytes_ab = 64 * MIB,
				.dead_ns = dead, .keepalive_ns = 40 * MS, .rto_max_ns = 50 * MS };

	/* busy: the peer vanishes mid-transfer */
	if (net_setup(&n, &p, "dead busy peer"))
		return;
	net_run(&n, NULL, 5 * MS);
	uint64_t died = n.now;
	n.b.dead = true;
	n.ab.blackhole = n.ba.blackhole = true;
	bool failed = net_run(&n, a_failed, died + 10 * dead);
	CHECK(failed && n.a.fail_rc == -ETIMEDOUT, "dead peer mid-transfer: the connection fails with ETIMEDOUT");
	CHECK_MSG(n.a.err, "silent", "dead peer: the reason says so: %s", n.a.err.msg);
	CHECK(n.a.fail_at >= died + dead - 5 * MS && n.a.fail_at <= died + dead + 5 * MS,
	      "dead peer: failed %.1f ms after the peer went silent (bound %" PRIu64 " ms)",
	      (double)(n.a.fail_at - died) / 1e6, dead / MS);
	struct ferry_err e2 = { 0 };
	uint8_t h[1] = { 0 };
	struct ferry_rl_msg m = { .head = h, .head_len = 1 };
	CHECK(ferry_rl_send(n.a.rl, &m, &e2) == -ETIMEDOUT && ferry_rl_status(n.a.rl, NULL) == -ETIMEDOUT,
	      "dead peer: later calls report the same failure");
	CHECK(ferry_rl_next_deadline(n.a.rl) == NEVER, "dead peer: a failed rlane wants no more polling");
	net_free(&n);

	/* idle: nothing to send, the keepalive notices */
	p.bytes_ab = 0;
	if (net_setup(&n, &p, "dead idle peer"))
		return;
	net_run(&n, NULL, 3 * MS);
	died = n.now;
	n.b.dead = true;
	n.ab.blackhole = n.ba.blackhole = true;
	failed = net_run(&n, a_failed, died + 10 * dead);
	CHECK(failed && n.a.fail_rc == -ETIMEDOUT && n.a.fail_at <= died + 40 * MS + dead + 5 * MS,
	      "dead idle peer: found by keepalive within keepalive + dead time (%.1f ms)",
	      (double)(n.a.fail_at - died) / 1e6);
	net_free(&n);

	/* idle but alive: keepalives keep it up for many dead times */
	if (net_setup(&n, &p, "idle live peer"))
		return;
	net_run(&n, NULL, n.now + 10 * dead);
	struct ferry_rl_stats st;
	ferry_rl_stats(n.a.rl, &st);
	CHECK(!n.a.fail_rc && !n.b.fail_rc && st.probes > 0,
	      "idle live peer: %" PRIu64 " keepalives answered, no failure in %" PRIu64 " ms", st.probes,
	      10 * dead / MS);

	/* abort: a RESET fails both ends with clear errors */
	ferry_rl_abort(n.a.rl);
	net_run(&n, NULL, n.now + 5 * MS);
	CHECK(n.a.fail_rc == -ECONNABORTED, "abort: the aborting end fails with ECONNABORTED");
	CHECK(n.b.fail_rc == -ECONNRESET, "abort: the peer fails with ECONNRESET");
	CHECK_MSG(n.b.err, "reset", "abort: the peer's reason: %s", n.b.err.msg);
	net_free(&n);
}

/* ---- hostile and broken datagrams --------------------------------------- */

struct capture {
	uint8_t d[4][2048];
	size_t len[4];
	unsigned n;
};

static int capture_tx(void *ctx, const struct iovec *iov, unsigned n, size_t len)
{
	struct capture *c = ctx;
	if (c->n == 4)
		return -EAGAIN;
	size_t at = 0;
	for (unsigned i = 0; i < n; i++) {
		memcpy(c->d[c->n] + at, iov[i].iov_base, iov[i].iov_len);
		at += iov[i].iov_len;
	}
	c->len[c->n++] = len;
	return 0;
}

struct jcap {
	uint8_t *buf;
	size_t len;
};

/* keeps the first datagram only, whole */
static int jumbo_tx(void *ctx, const struct iovec *iov, unsigned n, size_t len)
{
	struct jcap *j = ctx;
	if (j->len)
		return -EAGAIN;
	for (unsigned i = 0; i < n; i++) {
		memcpy(j->buf + j->len, iov[i].iov_base, iov[i].iov_len);
		j->len += iov[i].iov_len;
	}
	return len == j->len ? 0 : -EINVAL;
}

static void reseal(uint8_t *d, size_t len)
{
	uint32_t crc = htobe32(ferry_crc32c(0, d + 4, len - 4));
	memcpy(d, &crc, 4);
}

static void test_hostile(void)
{
	struct ferry_err err = { 0 };
	struct ferry_rl_config c = { .conn_id = 7, .max_datagram = 1472 };
	struct ferry_rl *tx = NULL, *rx = NULL;
	CHECK(ferry_rl_create(&c, 1, &tx, &err) == 0 && ferry_rl_create(&c, 1, &rx, &err) == 0, "hostile: two rlanes");
	uint8_t hello[100];
	memset(hello, 'x', sizeof(hello));
	struct ferry_rl_msg m = { .head = hello, .head_len = 50, .payload = hello + 50, .payload_len = 50 };
	ferry_rl_send(tx, &m, &err);
	struct capture cap = { .n = 0 };
	CHECK(ferry_rl_poll(tx, 2, capture_tx, &cap, &err) == 1 && cap.n == 1, "hostile: one data datagram produced");
	struct ferry_rl_hdr h;
	CHECK(ferry_rl_decode(cap.d[0], cap.len[0], &h, &err) == 0 && h.type == FERRY_RL_T_DATA &&
	      h.flags == (FERRY_RL_F_START | FERRY_RL_F_END) && h.len == 100 && h.conn == 7,
	      "hostile: the datagram decodes (DATA, START|END, 100 bytes)");
	uint8_t d[2048];
	size_t L = cap.len[0];
	struct ferry_rl_stats st;

	memcpy(d, cap.d[0], L);
	d[L - 1] ^= 0x40;
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: a flipped payload bit is dropped");
	CHECK(ferry_rl_decode(d, L, &h, &err) == -EBADMSG, "hostile: decode reports the checksum");
	CHECK(ferry_rl_input(rx, cap.d[0], 10, NULL, 3, &err) == 0, "hostile: a runt is dropped");
	CHECK(ferry_rl_input(rx, cap.d[0], L - 1, NULL, 3, &err) == 0, "hostile: a truncated datagram is dropped");
	memcpy(d, cap.d[0], L);
	d[11] ^= 1; /* connection id */
	reseal(d, L);
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: another connection's datagram is dropped");
	memcpy(d, cap.d[0], L);
	d[4] = 0xf2; /* version */
	reseal(d, L);
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: another version's datagram is dropped");
	memcpy(d, cap.d[0], L);
	d[23] ^= 1; /* length field */
	reseal(d, L);
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: an inconsistent length is dropped");
	memcpy(d, cap.d[0], L);
	d[19] += 5; /* acks packets never sent */
	reseal(d, L);
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: an ack of unsent packets is dropped");
	memcpy(d, cap.d[0], L);
	d[20] = 0xff; /* window over the maximum */
	reseal(d, L);
	CHECK(ferry_rl_input(rx, d, L, NULL, 3, &err) == 0, "hostile: an impossible window is dropped");
	struct ferry_rl_seg sg[4];
	CHECK(ferry_rl_recv(rx, sg, 4) == 0, "hostile: none of them delivered anything");
	ferry_rl_stats(rx, &st);
	CHECK(st.corrupt_drops == 3 && st.foreign_drops == 2 && st.malformed_drops == 3 && st.rx_datagrams == 0,
	      "hostile: counted as 3 corrupt, 2 foreign, 3 malformed (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ")",
	      st.corrupt_drops, st.foreign_drops, st.malformed_drops);

	CHECK(ferry_rl_input(rx, cap.d[0], L, NULL, 4, &err) == 0, "hostile: the genuine datagram is taken");
	CHECK(ferry_rl_input(rx, cap.d[0], L, NULL, 4, &err) == 0, "hostile: and its replay");
	int k = ferry_rl_recv(rx, sg, 4);
	CHECK(k == 1 && sg[0].len == 100 && memcmp(sg[0].data, hello, 100) == 0 &&
	      sg[0].flags == (FERRY_RL_F_START | FERRY_RL_F_END), "hostile: delivered once, intact");
	ferry_rl_stats(rx, &st);
	CHECK(st.dup_drops == 1, "hostile: the replay counted as a duplicate");
	ferry_rl_release(rx, 1);
	CHECK(ferry_rl_recv(rx, sg, 4) == 0, "hostile: released");

	/* a driver that fills up: poll stops at -EAGAIN and resumes where it was */
	struct ferry_rl_config c2 = { .conn_id = 7, .max_datagram = 1472, .init_cwnd_pkts = 16 };
	struct ferry_rl *t2;
	ferry_rl_create(&c2, 1, &t2, &err);
	static uint8_t big[10000];
	struct ferry_rl_msg bm = { .head = hello, .head_len = 8, .payload = big, .payload_len = sizeof(big) };
	ferry_rl_send(t2, &bm, &err);
	struct capture c4 = { .n = 0 }, c5 = { .n = 0 };
	int first = ferry_rl_poll(t2, 2, capture_tx, &c4, &err);
	int second = ferry_rl_poll(t2, 3, capture_tx, &c5, &err);
	uint32_t seqs[8];
	bool consecutive = first == 4 && second == 4;
	for (unsigned i = 0; consecutive && i < 8; i++) {
		struct capture *cc = i < 4 ? &c4 : &c5;
		consecutive = ferry_rl_decode(cc->d[i % 4], cc->len[i % 4], &h, &err) == 0;
		seqs[i] = h.seq;
		consecutive = consecutive && (i == 0 || seqs[i] == seqs[i - 1] + 1);
	}
	CHECK(consecutive, "api: a driver that fills up (-EAGAIN) loses nothing: 4 + 4 consecutive segments");
	ferry_rl_destroy(t2);

	/* mismatched datagram sizes fail clearly instead of stalling */
	struct ferry_rl_config cbig = { .conn_id = 7, .max_datagram = 9000 };
	struct ferry_rl *tbig, *rsmall;
	ferry_rl_create(&cbig, 1, &tbig, &err);
	ferry_rl_create(&c, 1, &rsmall, &err); /* 1472 bytes, copying into its slots */
	ferry_rl_send(tbig, &bm, &err);
	static uint8_t jumbo[9000];
	struct jcap jc = { jumbo, 0 };
	ferry_rl_poll(tbig, 2, jumbo_tx, &jc, &err);
	ferry_err_clear(&err);
	CHECK(jc.len > 1472 && ferry_rl_input(rsmall, jumbo, jc.len, NULL, 3, &err) == -EMSGSIZE,
	      "config: a segment larger than this end's slots fails the connection (EMSGSIZE)");
	CHECK_MSG(err, "max_datagram", "config: the reason names the setting: %s", err.msg);
	ferry_rl_destroy(tbig);
	ferry_rl_destroy(rsmall);

	/* message and configuration validation */
	ferry_err_clear(&err);
	struct ferry_rl_msg empty = { 0 };
	CHECK(ferry_rl_send(tx, &empty, &err) == -EINVAL, "api: an empty message is refused");
	struct ferry_rl_msg fat = { .head = d, .head_len = FERRY_RL_INLINE_MAX + 1 };
	CHECK(ferry_rl_send(tx, &fat, &err) == -EINVAL, "api: a head over the inline limit is refused");
	ferry_rl_destroy(tx);
	ferry_rl_destroy(rx);

	struct ferry_rl_config q = { .send_queue = 4 };
	CHECK(ferry_rl_create(&q, 0, &tx, &err) == 0, "api: a 4-message send queue");
	int sent = 0, rc;
	while ((rc = ferry_rl_send(tx, &m, &err)) == 0)
		sent++;
	CHECK(rc == -EAGAIN && sent == 4, "api: a full send queue says EAGAIN after 4 messages");
	ferry_rl_destroy(tx);
	struct { struct ferry_rl_config c; const char *what, *word; } bad[] = {
		{ { .max_datagram = 100 }, "a datagram too small for header and SACKs", "max_datagram" },
		{ { .max_datagram = 70000 }, "a datagram over the 16-bit length", "max_datagram" },
		{ { .window_pkts = 2 }, "a 2-packet window", "window" },
		{ { .window_pkts = 65536 }, "a window over 32768", "window" },
		{ { .md_factor = 1.5 }, "a multiplicative 'decrease' above 1", "md_factor" },
		{ { .rto_min_ns = 5000000, .rto_max_ns = 1000000 }, "RTO min above max", "timeout" },
		{ { .max_inflight_bytes = 10 }, "a byte cap under one segment", "max_inflight" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ferry_err_clear(&err);
		struct ferry_rl *x = NULL;
		CHECK(ferry_rl_create(&bad[i].c, 0, &x, &err) == -EINVAL && !x, "config: %s is refused", bad[i].what);
		CHECK_MSG(err, bad[i].word, "config: message names it: %s", err.msg);
	}
}

/* ---- the fault injector ------------------------------------------------- */

struct sink {
	uint64_t n, hash;
	uint64_t at_submit;      /* submissions so far, when each came out */
	uint64_t idx[4096];
	uint64_t emitted_at[4096];
	unsigned nidx;
	const uint8_t *ref;      /* for single-byte corruption checks */
	size_t reflen;
	unsigned one_byte, other;
};

static int sink_emit(void *ctx, const void *data, size_t len)
{
	struct sink *s = ctx;
	s->n++;
	s->hash = ferry_crc32c((uint32_t)s->hash, data, len) + s->hash * 31;
	if (len >= 8 && s->nidx < 4096) {
		s->idx[s->nidx] = get64(data);
		s->emitted_at[s->nidx++] = s->at_submit;
	}
	if (s->ref) {
		unsigned diff = 0;
		for (size_t i = 0; i < len && i < s->reflen; i++)
			diff += ((const uint8_t *)data)[i] != s->ref[i];
		if (diff == 1 && len == s->reflen)
			s->one_byte++;
		else
			s->other++;
	}
	return 0;
}

/* square root without libm: a few Newton steps */
static double root(double v)
{
	double x = v > 1 ? v : 1;
	for (int i = 0; i < 60; i++)
		x = 0.5 * (x + v / x);
	return x;
}

static bool within(uint64_t got, double n, double p)
{
	double mean = n * p, sd = root(n * p * (1 - p));
	return fabs((double)got - mean) <= 5 * sd + 1;
}

static void test_fault(void)
{
	struct ferry_err err = { 0 };
	struct ferry_fault_config c;
	CHECK(ferry_fault_parse("drop=0.01,dup=0.01,reorder=0.02,corrupt=0.001,seed=42", &c, &err) == 0 &&
	      c.drop == 0.01 && c.dup == 0.01 && c.reorder == 0.02 && c.corrupt == 0.001 && c.seed == 42,
	      "fault: the documented example parses");
	CHECK(ferry_fault_parse(" drop=1%, depth=4 ,hold_us=250,", &c, &err) == 0 && c.drop == 0.01 &&
	      c.reorder_depth == 4 && c.hold_ns == 250000, "fault: percentages, spaces, depth and hold time");
	CHECK(ferry_fault_parse("", &c, &err) == 0 && c.drop == 0 && c.seed == 0, "fault: empty means no faults");
	ferry_err_clear(&err);
	CHECK(ferry_fault_parse("drop=0.1,loss=0.2", &c, &err) == -EINVAL, "fault: an unknown key is refused");
	CHECK_MSG(err, "loss", "fault: message names it: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_fault_parse("drop=1.5", &c, &err) == -EINVAL, "fault: a rate above 1 is refused");
	CHECK_MSG(err, "drop", "fault: message names the key: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_fault_parse("dup=lots", &c, &err) == -EINVAL, "fault: a non-number is refused");
	ferry_err_clear(&err);
	CHECK(ferry_fault_parse("seed", &c, &err) == -EINVAL, "fault: a key without a value is refused");
	ferry_err_clear(&err);
	CHECK(ferry_fault_parse("depth=0", &c, &err) == -EINVAL, "fault: a zero reorder depth is refused");

	/* rates within tolerance, deterministic per seed */
	const unsigned N = RUNNING_ON_VALGRIND ? 50000 : 200000;
	uint64_t hashes[3];
	uint64_t seeds[3] = { 42, 42, 43 };
	for (int run = 0; run < 3; run++) {
		struct ferry_fault *f;
		ferry_fault_parse("drop=0.01,dup=0.02,reorder=0.03,corrupt=0.005,depth=8", &c, &err);
		c.seed = seeds[run];
		if (ferry_fault_create(&c, &f, &err)) {
			CHECK(0, "fault: create: %s", err.msg);
			return;
		}
		struct sink s = { 0 };
		uint8_t d[100];
		memset(d, 0xab, sizeof(d));
		for (unsigned i = 0; i < N; i++) {
			put64(d, i);
			ferry_fault_submit(f, d, sizeof(d), i, sink_emit, &s);
		}
		ferry_fault_flush(f, sink_emit, &s);
		struct ferry_fault_stats st;
		ferry_fault_stats(f, &st);
		hashes[run] = s.hash;
		if (run == 0) {
			CHECK(st.seen == N && within(st.dropped, N, 0.01), "fault: drops %" PRIu64 " ~ 1%% of %u",
			      st.dropped, N);
			CHECK(within(st.duplicated, N - st.dropped, 0.02), "fault: duplicates %" PRIu64 " ~ 2%%",
			      st.duplicated);
			CHECK(within(st.reordered, N - st.dropped, 0.03), "fault: reorders %" PRIu64 " ~ 3%%", st.reordered);
			CHECK(within(st.corrupted, N - st.dropped, 0.005), "fault: corruptions %" PRIu64 " ~ 0.5%%",
			      st.corrupted);
			CHECK(st.emitted == N - st.dropped + st.duplicated && s.n == st.emitted && st.held == 0,
			      "fault: everything not dropped came out, duplicates twice (%" PRIu64 ")", st.emitted);
		}
		ferry_fault_destroy(f);
	}
	CHECK(hashes[0] == hashes[1], "fault: the same seed gives the same faults, byte for byte");
	CHECK(hashes[0] != hashes[2], "fault: another seed gives other faults");

	/* corruption changes exactly one byte */
	struct ferry_fault *f;
	struct ferry_fault_config cc = { .corrupt = 1.0, .seed = 9 };
	ferry_fault_create(&cc, &f, &err);
	uint8_t ref[300];
	for (unsigned i = 0; i < sizeof(ref); i++)
		ref[i] = (uint8_t)i;
	struct sink s = { .ref = ref, .reflen = sizeof(ref) };
	for (int i = 0; i < 1000; i++)
		ferry_fault_submit(f, ref, sizeof(ref), 0, sink_emit, &s);
	CHECK(s.one_byte == 1000 && s.other == 0, "fault: each corruption changes exactly one byte (%u of 1000)",
	      s.one_byte);
	ferry_fault_destroy(f);

	/* reordering: all come out once, some late, none later than depth */
	struct ferry_fault_config rc = { .reorder = 0.3, .reorder_depth = 4, .seed = 11 };
	ferry_fault_create(&rc, &f, &err);
	struct sink r = { 0 };
	const unsigned M = 4000;
	uint8_t d[16] = { 0 };
	for (unsigned i = 0; i < M; i++) {
		put64(d, i);
		r.at_submit = i;
		ferry_fault_submit(f, d, sizeof(d), 0, sink_emit, &r);
	}
	r.at_submit = M + 100;
	ferry_fault_flush(f, sink_emit, &r);
	static unsigned char seen[4000];
	memset(seen, 0, sizeof(seen));
	unsigned inversions = 0, late = 0, twice = 0;
	for (unsigned i = 0; i < r.nidx; i++) {
		uint64_t x = r.idx[i];
		if (x < M && seen[x]++)
			twice++;
		if (i && r.idx[i] < r.idx[i - 1])
			inversions++;
		if (r.emitted_at[i] < M && r.emitted_at[i] > x + 4)
			late++;
	}
	unsigned missing = 0;
	for (unsigned i = 0; i < M; i++)
		missing += !seen[i];
	CHECK(r.nidx == M && missing == 0 && twice == 0, "fault: reordering loses and duplicates nothing");
	CHECK(inversions > 100, "fault: reordering reorders (%u inversions)", inversions);
	CHECK(late == 0, "fault: a held datagram goes out within 'depth' later datagrams");
	ferry_fault_destroy(f);

	/* hold time: released by poll once traffic stops */
	struct ferry_fault_config hc = { .reorder = 1.0, .reorder_depth = 64, .hold_ns = 100 * US, .seed = 1 };
	ferry_fault_create(&hc, &f, &err);
	struct sink h = { 0 };
	ferry_fault_submit(f, d, sizeof(d), 1000, sink_emit, &h);
	CHECK(h.n == 0 && ferry_fault_next_release(f) == 1000 + 100 * US, "fault: a held datagram waits for its time");
	ferry_fault_poll(f, 1000 + 50 * US, sink_emit, &h);
	CHECK(h.n == 0, "fault: not before");
	ferry_fault_poll(f, 1000 + 100 * US, sink_emit, &h);
	CHECK(h.n == 1 && ferry_fault_next_release(f) == NEVER, "fault: released once held long enough");
	/* destroy with datagrams still held frees them (valgrind/ASan check) */
	ferry_fault_submit(f, d, sizeof(d), 2000, sink_emit, &h);
	ferry_fault_destroy(f);
}

/* ---- throughput --------------------------------------------------------- */

static void bench(uint64_t mib)
{
	size_t sizes[] = { JUMBO_DGRAM, AF_XDP_DGRAM, 1472 };
	const char *only = getenv("FERRY_BENCH_DGRAM"); /* one size or "small", for profiling */
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		if (only && (size_t)strtoul(only, NULL, 0) != sizes[i])
			continue;
		struct net_params p = { .dgram = sizes[i], .window = 1024, .ns_per_byte = 0, .latency = 10 * US,
					.bytes_ab = mib * MIB };
		struct net n;
		if (net_setup(&n, &p, "bench"))
			return;
		double w0 = wall(), c0 = cpu();
		bool ok = net_run(&n, ab_done, NEVER - 1);
		double w = wall() - w0, c = cpu() - c0;
		struct ferry_rl_stats sa, sb;
		ferry_rl_stats(n.a.rl, &sa);
		ferry_rl_stats(n.b.rl, &sb);
		printf("bench %5zu-byte datagrams: %s %" PRIu64 " msgs, %.0f MiB, %" PRIu64 " data + %" PRIu64
		       " ack datagrams in %.3f s CPU (%.3f wall): %.0f msgs/s, %.2f Mdatagrams/s, %.2f GB/s\n",
		       sizes[i], ok && !n.b.rx.bad ? "ok" : "FAILED", n.a.tx_msgs, (double)n.a.tx_queued / MIB,
		       sa.tx_data, sb.tx_acks, c, w, (double)n.a.tx_msgs / c, (double)sa.tx_data / c / 1e6,
		       (double)n.a.tx_queued / c / 1e9);
		net_free(&n);
	}
	/* per-message cost: 32..95-byte messages, one per datagram */
	if (only && strcmp(only, "small") != 0)
		return;
	small_msgs = true;
	struct net_params p = { .dgram = 1472, .window = 1024, .ns_per_byte = 0, .latency = 10 * US,
				.bytes_ab = mib * MIB / 16 };
	struct net n;
	if (net_setup(&n, &p, "bench small"))
		return;
	double c0 = cpu();
	bool ok = net_run(&n, ab_done, NEVER - 1);
	double c = cpu() - c0;
	printf("bench small messages: %s %" PRIu64 " msgs of %.0f bytes on average in %.3f s CPU: %.2f M msgs/s\n",
	       ok && !n.b.rx.bad ? "ok" : "FAILED", n.a.tx_msgs, (double)n.a.tx_queued / (double)n.a.tx_msgs, c,
	       (double)n.a.tx_msgs / c / 1e6);
	net_free(&n);
	small_msgs = false;
}

static int make_pool(void)
{
	pool = malloc(POOL_LEN);
	if (!pool)
		return -1;
	uint64_t x = 0x600d5eed;
	for (size_t i = 0; i < POOL_LEN; i += 8) {
		uint64_t v = splitmix(&x);
		memcpy(pool + i, &v, 8);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (make_pool())
		return 2;
	if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
		lean = true;
		bench(argc > 2 ? strtoull(argv[2], NULL, 0) : 1024);
		free(pool);
		return 0;
	}
	if (RUNNING_ON_VALGRIND) {
		scale = 4; /* same paths, fewer bytes: valgrind runs ~50x slower */
		printf("# under valgrind: transfers are 1/%u of their size\n", scale);
	}
	test_fault();
	test_hostile();
	test_transfers();
	test_aimd();
	test_spurious_rto();
	test_reorder_adapts();
	test_pacing();
	test_window();
	test_dead_peer();
	free(pool);
	CHECK_DONE();
}
