#include "reliable.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../drivers/wire.h"   /* ferry_crc32c */

#define NEVER UINT64_MAX
#define BACKOFF_MAX 16

/* per-segment send state */
#define SEG_SACKED 0x01u   /* the peer has it (selectively or cumulatively) */
#define SEG_LOST   0x02u   /* judged lost, waiting to go again */
#define SEG_PIPE   0x04u   /* believed in the network: counts against cwnd */
#define SEG_RETX   0x08u   /* sent more than once: no RTT sample from it (Karn) */
#define SEG_RTO    0x10u   /* judged lost by the timer rather than by acks */

struct rl_msg {
	uint8_t head[FERRY_RL_INLINE_MAX];
	uint32_t head_len;
	uint32_t total;
	const uint8_t *payload;
	void *cookie;
};

struct rl_seg {
	uint64_t xmit_ns;      /* last transmission */
	uint64_t msg;          /* message number */
	uint32_t off;          /* byte offset in the message */
	uint16_t len;
	uint8_t flags;         /* FERRY_RL_F_START / END */
	uint8_t state;
};

struct rl_slot {
	const uint8_t *data;
	void *cookie;
	uint16_t len;
	uint8_t flags;
	bool present;
	bool retained;         /* data points into the caller's datagram */
};

struct ferry_rl {
	struct ferry_rl_config cfg;   /* defaults filled in */
	size_t seg_max;
	uint64_t W;                   /* window_pkts */
	uint64_t wmask, qmask;
	uint64_t now;                 /* latest time seen: time never goes back */

	int fail_code;
	char fail_msg[FERRY_ERR_MSG_MAX];
	bool reset_due;

	/* send: messages [collect, done) completed, [done, tail) unfinished;
	 * msg_seg/seg_off is where segmentation continues */
	struct rl_msg *msgs;
	uint64_t msg_collect, msg_done, msg_seg, msg_tail;
	uint32_t seg_off;
	struct rl_seg *segs;          /* ring of W, by packet number */
	uint64_t snd_una, snd_nxt;
	uint64_t peer_edge;           /* the peer accepts packet numbers below this */
	uint64_t outstanding;         /* bytes in [snd_una, snd_nxt) */
	uint64_t pipe;                /* bytes of SEG_PIPE segments */
	unsigned lost_pkts;
	uint64_t rtx_cursor;          /* no SEG_LOST segment below this */

	/* congestion control (bytes) */
	uint64_t cwnd, ssthresh, ca_acc;
	bool in_recovery;
	uint64_t recovery_point;      /* losses below this belong to the current episode */
	bool undo_ok;                 /* a timeout's reduction may still prove spurious ... */
	uint64_t undo_cwnd, undo_ssthresh; /* ... and these come back then */
	bool cwnd_limited;            /* last time data waited, cwnd or pacing held it */
	uint64_t pace_next;

	/* RTT and timers */
	bool have_rtt;
	uint64_t srtt, rttvar, rto, min_rtt;
	unsigned backoff;
	uint64_t rto_base;
	uint64_t tlp_deadline;
	bool tlp_out;
	bool rack_valid;
	uint64_t rack_xmit, rack_seq, rack_rtt;  /* most recently sent segment known delivered */
	uint64_t reo_deadline;
	unsigned reo_mult;            /* RACK's reordering allowance in min_rtt/4 units (RFC 8985 6.2) */

	/* liveness */
	uint64_t last_rx, last_progress, wait_start;
	bool waiting;
	bool probe_out;
	unsigned probe_backoff;
	uint64_t probe_deadline;
	uint64_t persist_since;       /* window-blocked with nothing in flight since */
	unsigned persist_backoff;     /* zero-window probes while the window stays shut */

	/* receive: [rcv_head, rcv_nxt) deliverable, then out of order up to rcv_max */
	struct rl_slot *slots;        /* ring of W */
	uint8_t *slot_mem;            /* copy mode: W x seg_max */
	uint64_t rcv_head, rcv_nxt, rcv_max;
	unsigned ooo;
	uint64_t last_ooo;
	size_t rd_off;                /* bytes of the head slot already read */
	bool ack_now;
	unsigned ack_pending;
	uint64_t ack_deadline;
	uint64_t adv_edge;            /* right edge last advertised */

	uint8_t hdr[FERRY_RL_OVERHEAD];
	struct ferry_rl_stats st;
};

/* ---- small helpers ------------------------------------------------------ */

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* The packet number nearest ref whose low 32 bits are w. Numbers before the
 * start of the connection come out as 0 (older than anything live). */
static uint64_t unwrap(uint64_t ref, uint32_t w)
{
	int32_t d = (int32_t)(w - (uint32_t)ref);
	if (d < 0 && (uint64_t)(-(int64_t)d) > ref)
		return 0;
	return ref + (uint64_t)(int64_t)d;
}

static uint64_t pow2_up(uint64_t v)
{
	uint64_t p = 1;
	while (p < v)
		p <<= 1;
	return p;
}

static uint64_t tick(struct ferry_rl *rl, uint64_t now)
{
	if (now < rl->now)
		now = rl->now;
	rl->now = now;
	return now;
}

__attribute__((format(printf, 3, 4)))
static int rl_fail(struct ferry_rl *rl, int code, const char *fmt, ...)
{
	if (!rl->fail_code) {
		va_list ap;
		rl->fail_code = code;
		va_start(ap, fmt);
		vsnprintf(rl->fail_msg, sizeof(rl->fail_msg), fmt, ap);
		va_end(ap);
	}
	return -rl->fail_code;
}

static int failed(const struct ferry_rl *rl, struct ferry_err *err)
{
	return ferry_err_set(err, rl->fail_code, "%s", rl->fail_msg);
}

static struct rl_seg *seg_at(const struct ferry_rl *rl, uint64_t seq)
{
	return &rl->segs[seq & rl->wmask];
}

static struct rl_slot *slot_at(const struct ferry_rl *rl, uint64_t seq)
{
	return &rl->slots[seq & rl->wmask];
}

/* ---- wire --------------------------------------------------------------- */

/* Layout: check 0-3, version 4, type 5, flags 6, nsack 7, conn 8-11,
 * seq 12-15, ack 16-19, wnd 20-21, len 22-23, then nsack x (start, end),
 * then payload. The check (CRC32C) covers every byte after it: one pass. */
static uint32_t dgram_crc(const uint8_t *p, size_t len)
{
	return ferry_crc32c(0, p + 4, len - 4);
}

int ferry_rl_decode(const void *dgram, size_t len, struct ferry_rl_hdr *h, struct ferry_err *err)
{
	const uint8_t *p = dgram;
	if (len < FERRY_RL_HDR_LEN)
		return ferry_err_set(err, EBADMSG, "datagram of %zu bytes is shorter than the %d-byte header",
				     len, FERRY_RL_HDR_LEN);
	uint32_t want = get32(p), got = dgram_crc(p, len);
	if (want != got)
		return ferry_err_set(err, EBADMSG, "datagram checksum mismatch (0x%08x != 0x%08x)", got, want);
	if (p[4] != FERRY_RL_VERSION)
		return ferry_err_set(err, EPROTONOSUPPORT, "datagram version 0x%02x is not ferry's reliable transport (0x%02x)",
				     p[4], FERRY_RL_VERSION);
	h->type = p[5];
	h->flags = p[6];
	h->nsack = p[7];
	h->conn = get32(p + 8);
	h->seq = get32(p + 12);
	h->ack = get32(p + 16);
	h->wnd = get16(p + 20);
	h->len = get16(p + 22);
	if (h->type < FERRY_RL_T_DATA || h->type > FERRY_RL_T_RESET)
		return ferry_err_set(err, EPROTO, "unknown datagram type %u", h->type);
	if (h->flags & ~FERRY_RL_F_KNOWN)
		return ferry_err_set(err, EPROTO, "unknown datagram flags 0x%02x", h->flags & ~FERRY_RL_F_KNOWN);
	if (h->nsack > FERRY_RL_MAX_SACK)
		return ferry_err_set(err, EPROTO, "%u SACK blocks (at most %d)", h->nsack, FERRY_RL_MAX_SACK);
	size_t expect = FERRY_RL_HDR_LEN + (size_t)h->nsack * FERRY_RL_SACK_LEN + h->len;
	if (expect != len)
		return ferry_err_set(err, EPROTO, "datagram is %zu bytes but its header accounts for %zu", len, expect);
	if (h->type == FERRY_RL_T_DATA ? h->len == 0
	    : h->len != 0 || (h->flags & (FERRY_RL_F_START | FERRY_RL_F_END | FERRY_RL_F_RETX)))
		return ferry_err_set(err, EPROTO, "inconsistent length or flags for datagram type %u", h->type);
	if (h->wnd > FERRY_RL_WINDOW_MAX)
		return ferry_err_set(err, EPROTO, "window %u exceeds %d packets", h->wnd, FERRY_RL_WINDOW_MAX);
	for (unsigned i = 0; i < h->nsack; i++) {
		h->sack[i][0] = get32(p + FERRY_RL_HDR_LEN + i * FERRY_RL_SACK_LEN);
		h->sack[i][1] = get32(p + FERRY_RL_HDR_LEN + i * FERRY_RL_SACK_LEN + 4);
	}
	return 0;
}

static bool rcv_present(const struct ferry_rl *rl, uint64_t seq)
{
	return slot_at(rl, seq)->present;
}

/* SACK blocks for what arrived beyond the gap: first the block holding the
 * latest arrival (RFC 2018), then the lowest blocks, whose holes the sender
 * must fill first. The sender keeps a scoreboard, so blocks left out of one
 * ack are learnt from the next. */
static unsigned make_sacks(const struct ferry_rl *rl, uint8_t *p)
{
	uint64_t b[FERRY_RL_MAX_SACK][2];
	unsigned n = 0;
	if (!rl->ooo)
		return 0;
	if (rl->last_ooo >= rl->rcv_nxt && rl->last_ooo < rl->rcv_max && rcv_present(rl, rl->last_ooo)) {
		uint64_t s = rl->last_ooo, e = rl->last_ooo + 1;
		while (s > rl->rcv_nxt && rcv_present(rl, s - 1))
			s--;
		while (e < rl->rcv_max && rcv_present(rl, e))
			e++;
		b[n][0] = s;
		b[n][1] = e;
		n++;
	}
	uint64_t seq = rl->rcv_nxt;
	while (n < FERRY_RL_MAX_SACK && seq < rl->rcv_max) {
		while (seq < rl->rcv_max && !rcv_present(rl, seq))
			seq++;
		if (seq >= rl->rcv_max)
			break;
		uint64_t s = seq;
		while (seq < rl->rcv_max && rcv_present(rl, seq))
			seq++;
		if (n > 0 && s == b[0][0])
			continue;
		b[n][0] = s;
		b[n][1] = seq;
		n++;
	}
	for (unsigned i = 0; i < n; i++) {
		put32(p + i * FERRY_RL_SACK_LEN, (uint32_t)b[i][0]);
		put32(p + i * FERRY_RL_SACK_LEN + 4, (uint32_t)b[i][1]);
	}
	return n;
}

/* Fill rl->hdr (checksum left for seal); every datagram carries the ack. */
static size_t build_hdr(struct ferry_rl *rl, uint8_t type, uint8_t flags, uint64_t seq, uint16_t len)
{
	uint8_t *h = rl->hdr;
	unsigned nsack = type == FERRY_RL_T_RESET ? 0 : make_sacks(rl, h + FERRY_RL_HDR_LEN);
	h[4] = FERRY_RL_VERSION;
	h[5] = type;
	h[6] = flags;
	h[7] = (uint8_t)nsack;
	put32(h + 8, rl->cfg.conn_id);
	put32(h + 12, (uint32_t)seq);
	put32(h + 16, (uint32_t)rl->rcv_nxt);
	put16(h + 20, (uint16_t)(rl->rcv_head + rl->W - rl->rcv_nxt));
	put16(h + 22, len);
	return FERRY_RL_HDR_LEN + nsack * FERRY_RL_SACK_LEN;
}

static size_t seal(struct iovec *iov, unsigned n)
{
	uint8_t *h = iov[0].iov_base;
	size_t len = iov[0].iov_len;
	uint32_t crc = ferry_crc32c(0, h + 4, iov[0].iov_len - 4);
	for (unsigned i = 1; i < n; i++) {
		crc = ferry_crc32c(crc, iov[i].iov_base, iov[i].iov_len);
		len += iov[i].iov_len;
	}
	put32(h, crc);
	return len;
}

/* Hand a datagram over; every datagram carries the current ack, so any
 * pending ack is now sent. */
static int xmit(struct ferry_rl *rl, struct iovec *iov, unsigned n, ferry_rl_tx_fn tx, void *ctx)
{
	size_t len = seal(iov, n);
	int rc = tx(ctx, iov, n, len);
	if (rc)
		return rc;
	rl->st.tx_datagrams++;
	rl->ack_now = false;
	rl->ack_pending = 0;
	rl->ack_deadline = NEVER;
	rl->adv_edge = rl->rcv_head + rl->W;
	return 0;
}

/* ---- configuration ------------------------------------------------------ */

static int fill_defaults(struct ferry_rl_config *c, struct ferry_err *err)
{
	if (!c->max_datagram)
		c->max_datagram = 1472;
	if (c->max_datagram < FERRY_RL_DATAGRAM_MIN || c->max_datagram > FERRY_RL_DATAGRAM_MAX)
		return ferry_err_set(err, EINVAL, "max_datagram %zu is outside %d..%d bytes", c->max_datagram,
				     FERRY_RL_DATAGRAM_MIN, FERRY_RL_DATAGRAM_MAX);
	size_t seg = c->max_datagram - FERRY_RL_OVERHEAD;
	if (!c->window_pkts)
		c->window_pkts = 512;
	if (c->window_pkts < 4 || c->window_pkts > FERRY_RL_WINDOW_MAX)
		return ferry_err_set(err, EINVAL, "window of %u packets is outside 4..%d", c->window_pkts,
				     FERRY_RL_WINDOW_MAX);
	c->window_pkts = (unsigned)pow2_up(c->window_pkts);
	if (!c->max_inflight_bytes)
		c->max_inflight_bytes = (uint64_t)c->window_pkts * seg;
	if (c->max_inflight_bytes < seg)
		return ferry_err_set(err, EINVAL, "max_inflight_bytes %" PRIu64 " is less than one %zu-byte segment",
				     c->max_inflight_bytes, seg);
	if (!c->send_queue)
		c->send_queue = 256;
	if (c->send_queue > (1u << 20))
		return ferry_err_set(err, EINVAL, "send queue of %u messages is over the limit of %u",
				     c->send_queue, 1u << 20);
	c->send_queue = (unsigned)pow2_up(c->send_queue);
	if (!c->rto_initial_ns)
		c->rto_initial_ns = 100000000;
	if (!c->rto_min_ns)
		c->rto_min_ns = 2000000;
	if (!c->rto_max_ns)
		c->rto_max_ns = 1000000000;
	if (c->rto_min_ns > c->rto_max_ns || c->rto_max_ns > 60000000000ull)
		return ferry_err_set(err, EINVAL, "retransmission timeout bounds %" PRIu64 "..%" PRIu64 " ns are inconsistent",
				     c->rto_min_ns, c->rto_max_ns);
	c->rto_initial_ns = max64(c->rto_min_ns, min64(c->rto_initial_ns, c->rto_max_ns));
	if (!c->dead_ns)
		c->dead_ns = 5000000000ull;
	if (!c->keepalive_ns)
		c->keepalive_ns = c->dead_ns / 4;
	if (!c->ack_delay_ns)
		c->ack_delay_ns = 50000;
	if (!c->ack_every)
		c->ack_every = 2;
	if (!c->init_cwnd_pkts)
		c->init_cwnd_pkts = 10;
	if (!c->min_cwnd_pkts)
		c->min_cwnd_pkts = 2;
	if (!c->ai_pkts)
		c->ai_pkts = 1;
	if (c->md_factor == 0.0)
		c->md_factor = 0.5;
	if (!(c->md_factor > 0.0 && c->md_factor < 1.0))
		return ferry_err_set(err, EINVAL, "md_factor %g is outside (0, 1)", c->md_factor);
	if (!c->pace_burst)
		c->pace_burst = 4;
	return 0;
}

int ferry_rl_create(const struct ferry_rl_config *cfg, uint64_t now_ns, struct ferry_rl **out,
		    struct ferry_err *err)
{
	*out = NULL;
	struct ferry_rl_config c = *cfg;
	int rc = fill_defaults(&c, err);
	if (rc)
		return rc;
	struct ferry_rl *rl = calloc(1, sizeof(*rl));
	if (!rl)
		return ferry_err_set(err, ENOMEM, "out of memory for a reliable lane");
	rl->cfg = c;
	rl->seg_max = c.max_datagram - FERRY_RL_OVERHEAD;
	rl->W = c.window_pkts;
	rl->wmask = rl->W - 1;
	rl->qmask = c.send_queue - 1u;
	rl->msgs = calloc(c.send_queue, sizeof(*rl->msgs));
	rl->segs = calloc(rl->W, sizeof(*rl->segs));
	rl->slots = calloc(rl->W, sizeof(*rl->slots));
	/* Copy slots also in rx_release mode: a datagram input without a
	 * cookie (a backend short of buffers) is copied. */
	rl->slot_mem = malloc(rl->W * rl->seg_max);
	if (!rl->msgs || !rl->segs || !rl->slots || !rl->slot_mem) {
		ferry_rl_destroy(rl);
		return ferry_err_set(err, ENOMEM, "out of memory for a reliable lane's %" PRIu64 "-packet window",
				     (uint64_t)c.window_pkts);
	}
	rl->now = now_ns;
	rl->snd_una = rl->snd_nxt = rl->rtx_cursor = c.initial_seq;
	/* Until the peer's first ack, assume it accepts an initial window. */
	rl->peer_edge = rl->snd_una + min64(c.init_cwnd_pkts, rl->W);
	rl->recovery_point = rl->snd_una;
	rl->cwnd = (uint64_t)c.init_cwnd_pkts * rl->seg_max;
	rl->ssthresh = NEVER;
	rl->rto = c.rto_initial_ns;
	rl->tlp_deadline = NEVER;
	rl->reo_deadline = NEVER;
	rl->reo_mult = 1;
	rl->last_rx = rl->last_progress = now_ns;
	rl->rcv_head = rl->rcv_nxt = rl->rcv_max = c.initial_seq;
	rl->ack_deadline = NEVER;
	rl->adv_edge = rl->rcv_head + rl->W;
	*out = rl;
	return 0;
}

static void slot_free(struct ferry_rl *rl, struct rl_slot *s)
{
	if (s->retained)
		rl->cfg.rx_release(rl->cfg.user, s->cookie);
	memset(s, 0, sizeof(*s));
}

void ferry_rl_destroy(struct ferry_rl *rl)
{
	if (!rl)
		return;
	if (rl->slots)
		for (uint64_t i = 0; i < rl->W; i++)
			if (rl->slots[i].present)
				slot_free(rl, &rl->slots[i]);
	free(rl->slot_mem);
	free(rl->slots);
	free(rl->segs);
	free(rl->msgs);
	free(rl);
}

size_t ferry_rl_segment_max(const struct ferry_rl *rl)
{
	return rl->seg_max;
}

/* ---- send side ---------------------------------------------------------- */

int ferry_rl_send(struct ferry_rl *rl, const struct ferry_rl_msg *m, struct ferry_err *err)
{
	if (rl->fail_code)
		return failed(rl, err);
	if (m->head_len > FERRY_RL_INLINE_MAX)
		return ferry_err_set(err, EINVAL, "message head of %zu bytes is over the %d copied inline",
				     m->head_len, FERRY_RL_INLINE_MAX);
	if ((m->head_len && !m->head) || (m->payload_len && !m->payload))
		return ferry_err_set(err, EINVAL, "message with a length but no bytes");
	if (m->head_len + m->payload_len == 0)
		return ferry_err_set(err, EINVAL, "empty message");
	if (m->payload_len > FERRY_RL_MSG_MAX - m->head_len)
		return ferry_err_set(err, EMSGSIZE, "message of %zu bytes is over the limit of %u",
				     m->head_len + m->payload_len, FERRY_RL_MSG_MAX);
	if (rl->msg_tail - rl->msg_collect > rl->qmask)
		return -EAGAIN; /* not a failure: completions free room */
	struct rl_msg *q = &rl->msgs[rl->msg_tail & rl->qmask];
	if (m->head_len)
		memcpy(q->head, m->head, m->head_len);
	q->head_len = (uint32_t)m->head_len;
	q->total = (uint32_t)(m->head_len + m->payload_len);
	q->payload = m->payload;
	q->cookie = m->cookie;
	rl->msg_tail++;
	return 0;
}

int ferry_rl_completions(struct ferry_rl *rl, void **cookies, unsigned n)
{
	unsigned k = 0;
	while (k < n && rl->msg_collect < rl->msg_done)
		cookies[k++] = rl->msgs[rl->msg_collect++ & rl->qmask].cookie;
	return (int)k;
}

unsigned ferry_rl_unfinished(const struct ferry_rl *rl)
{
	return (unsigned)(rl->msg_tail - rl->msg_done);
}

static uint64_t rto_cur(const struct ferry_rl *rl, unsigned backoff)
{
	uint64_t r = rl->rto;
	for (unsigned i = 0; i < backoff && r < rl->cfg.rto_max_ns; i++)
		r <<= 1;
	return min64(r, rl->cfg.rto_max_ns);
}

static uint64_t rto_deadline(const struct ferry_rl *rl)
{
	return rl->rto_base + rto_cur(rl, rl->backoff);
}

/* bytes/s; 0 = not pacing. cwnd per smoothed RTT, with headroom so pacing
 * never holds the sender below its window (2x in slow start, 1.25x after,
 * as Linux does), capped by max_rate. */
static uint64_t pacing_rate(const struct ferry_rl *rl)
{
	double r = 0.0;
	if (!rl->cfg.no_pacing && rl->have_rtt) {
		double gain = rl->cwnd < rl->ssthresh ? 2.0 : 1.25;
		r = gain * (double)rl->cwnd * 1e9 / (double)max64(rl->srtt, 1000);
	}
	if (rl->cfg.max_rate && (r == 0.0 || r > (double)rl->cfg.max_rate))
		r = (double)rl->cfg.max_rate;
	return (uint64_t)r;
}

static void pace_charge(struct ferry_rl *rl, uint64_t now, size_t len)
{
	uint64_t rate = pacing_rate(rl);
	if (!rate)
		return;
	double per_byte = 1e9 / (double)rate;
	/* Credit for idle time is capped at pace_burst - 1 full segments. */
	uint64_t slack = (uint64_t)((double)(rl->cfg.pace_burst - 1) * (double)rl->seg_max * per_byte);
	uint64_t base = rl->pace_next;
	if (base + slack < now)
		base = now - slack;
	rl->pace_next = base + (uint64_t)((double)(len + FERRY_RL_OVERHEAD) * per_byte);
}

static uint64_t pace_gate(const struct ferry_rl *rl)
{
	return pacing_rate(rl) ? rl->pace_next : 0;
}

static bool cwnd_allows(const struct ferry_rl *rl, uint64_t len)
{
	return rl->pipe == 0 || rl->pipe + len <= rl->cwnd;
}

static uint32_t next_new_len(const struct ferry_rl *rl)
{
	const struct rl_msg *m = &rl->msgs[rl->msg_seg & rl->qmask];
	return (uint32_t)min64(m->total - rl->seg_off, rl->seg_max);
}

static uint64_t first_lost(const struct ferry_rl *rl)
{
	for (uint64_t seq = max64(rl->rtx_cursor, rl->snd_una); seq < rl->snd_nxt; seq++)
		if (seg_at(rl, seq)->state & SEG_LOST)
			return seq;
	return NEVER;
}

enum act { ACT_NONE, ACT_RETX, ACT_NEW };
enum hold { HOLD_NODATA, HOLD_CWND, HOLD_PEER };

/* What the send loop would do next, ignoring pacing. */
static enum act pick(const struct ferry_rl *rl, uint64_t *seq, enum hold *why)
{
	if (rl->lost_pkts) {
		*seq = first_lost(rl);
		if (*seq != NEVER) {
			if (cwnd_allows(rl, seg_at(rl, *seq)->len))
				return ACT_RETX;
			*why = HOLD_CWND; /* repairs first: no new data while they wait */
			return ACT_NONE;
		}
	}
	if (rl->msg_seg == rl->msg_tail) {
		*why = HOLD_NODATA;
		return ACT_NONE;
	}
	uint32_t len = next_new_len(rl);
	if (rl->snd_nxt >= rl->peer_edge || rl->snd_nxt - rl->snd_una >= rl->W ||
	    rl->outstanding + len > rl->cfg.max_inflight_bytes) {
		*why = HOLD_PEER;
		return ACT_NONE;
	}
	if (!cwnd_allows(rl, len)) {
		*why = HOLD_CWND;
		return ACT_NONE;
	}
	*seq = rl->snd_nxt;
	return ACT_NEW;
}

/* Send the segment at seq (already described in the ring). */
static int send_seg(struct ferry_rl *rl, uint64_t seq, uint8_t extra, ferry_rl_tx_fn tx, void *ctx)
{
	const struct rl_seg *s = seg_at(rl, seq);
	const struct rl_msg *m = &rl->msgs[s->msg & rl->qmask];
	struct iovec iov[3];
	unsigned n = 0;
	iov[n].iov_base = rl->hdr;
	iov[n++].iov_len = build_hdr(rl, FERRY_RL_T_DATA, (uint8_t)(s->flags | extra), seq, s->len);
	uint32_t off = s->off, len = s->len;
	if (off < m->head_len) {
		uint32_t k = (uint32_t)min64(len, m->head_len - off);
		iov[n].iov_base = (void *)(m->head + off);
		iov[n++].iov_len = k;
		off += k;
		len -= k;
	}
	if (len) {
		iov[n].iov_base = (void *)(m->payload + (off - m->head_len));
		iov[n++].iov_len = len;
	}
	return xmit(rl, iov, n, tx, ctx);
}

static void arm_tlp(struct ferry_rl *rl, uint64_t now)
{
	rl->tlp_deadline = rl->have_rtt && !rl->tlp_out ? now + 2 * rl->srtt + rl->cfg.ack_delay_ns : NEVER;
}

static int send_new(struct ferry_rl *rl, uint64_t now, ferry_rl_tx_fn tx, void *ctx)
{
	uint64_t seq = rl->snd_nxt;
	const struct rl_msg *m = &rl->msgs[rl->msg_seg & rl->qmask];
	uint32_t len = next_new_len(rl);
	struct rl_seg *s = seg_at(rl, seq);
	*s = (struct rl_seg){
		.xmit_ns = now, .msg = rl->msg_seg, .off = rl->seg_off, .len = (uint16_t)len,
		.flags = (uint8_t)((rl->seg_off == 0 ? FERRY_RL_F_START : 0) |
				   (rl->seg_off + len == m->total ? FERRY_RL_F_END : 0)),
		.state = SEG_PIPE,
	};
	int rc = send_seg(rl, seq, 0, tx, ctx);
	if (rc)
		return rc;
	if (rl->snd_una == rl->snd_nxt)
		rl->rto_base = now; /* the timer starts with the first packet in flight */
	rl->snd_nxt++;
	rl->seg_off += len;
	if (rl->seg_off == m->total) {
		rl->msg_seg++;
		rl->seg_off = 0;
	}
	rl->outstanding += len;
	rl->pipe += len;
	rl->st.tx_data++;
	rl->st.tx_bytes += len;
	if (rl->outstanding > rl->st.max_inflight_bytes)
		rl->st.max_inflight_bytes = rl->outstanding;
	if (rl->snd_nxt - rl->snd_una > rl->st.max_inflight_pkts)
		rl->st.max_inflight_pkts = (unsigned)(rl->snd_nxt - rl->snd_una);
	pace_charge(rl, now, len);
	arm_tlp(rl, now);
	return 0;
}

static int send_retx(struct ferry_rl *rl, uint64_t seq, uint64_t now, ferry_rl_tx_fn tx, void *ctx)
{
	struct rl_seg *s = seg_at(rl, seq);
	int rc = send_seg(rl, seq, FERRY_RL_F_RETX | FERRY_RL_F_ACK_REQ, tx, ctx);
	if (rc)
		return rc;
	rl->st.retransmits++;
	if (s->state & SEG_RTO)
		rl->st.rto_retransmits++;
	else
		rl->st.fast_retransmits++;
	s->state = (uint8_t)((s->state & ~(SEG_LOST | SEG_RTO)) | SEG_PIPE | SEG_RETX);
	s->xmit_ns = now;
	rl->lost_pkts--;
	rl->pipe += s->len;
	rl->rtx_cursor = seq + 1;
	if (seq == rl->snd_una)
		rl->rto_base = now; /* the timer guards the oldest packet, just sent again */
	pace_charge(rl, now, s->len);
	arm_tlp(rl, now);
	return 0;
}

static int send_ctrl(struct ferry_rl *rl, uint8_t type, uint8_t flags, ferry_rl_tx_fn tx, void *ctx)
{
	struct iovec iov = { .iov_base = rl->hdr, .iov_len = build_hdr(rl, type, flags, rl->snd_nxt, 0) };
	int rc = xmit(rl, &iov, 1, tx, ctx);
	if (!rc)
		rl->st.tx_acks++;
	return rc;
}

/* ---- loss detection and congestion control ------------------------------ */

static void mark_lost(struct ferry_rl *rl, uint64_t seq, bool by_timer)
{
	struct rl_seg *s = seg_at(rl, seq);
	if (s->state & SEG_PIPE)
		rl->pipe -= s->len;
	s->state = (uint8_t)((s->state & ~SEG_PIPE) | SEG_LOST | (by_timer ? SEG_RTO : 0));
	rl->lost_pkts++;
	if (seq < rl->rtx_cursor)
		rl->rtx_cursor = seq;
}

static uint64_t cwnd_floor(const struct ferry_rl *rl)
{
	return (uint64_t)rl->cfg.min_cwnd_pkts * rl->seg_max;
}

/* Multiplicative decrease, once per episode: losses among packets sent
 * before the last reduction are the same congestion. */
static void congestion_event(struct ferry_rl *rl)
{
	rl->undo_ok = false; /* real loss: whatever the timer did stands */
	if (rl->snd_una < rl->recovery_point)
		return;
	rl->st.loss_events++;
	rl->ssthresh = max64((uint64_t)((double)rl->cwnd * rl->cfg.md_factor), cwnd_floor(rl));
	rl->cwnd = rl->ssthresh;
	rl->ca_acc = 0;
	rl->in_recovery = true;
	rl->recovery_point = rl->snd_nxt;
}

/* RACK (RFC 8985): a segment is lost once a segment sent after it has been
 * delivered and a reordering allowance (min RTT / 4) has passed since it
 * should have arrived too. Works the same for first transmissions and
 * retransmissions. */
static void rack_detect(struct ferry_rl *rl, uint64_t now)
{
	rl->reo_deadline = NEVER;
	if (!rl->rack_valid)
		return;
	/* The allowance grows with reordering seen, up to srtt: datagrams
	 * handed between two lanes' threads sharing a queue are late by a
	 * thread's scheduling delay, far beyond the path's min_rtt / 4. */
	uint64_t reo = min64((rl->min_rtt / 4) * rl->reo_mult, max64(rl->srtt, rl->min_rtt / 4));
	bool lost = false;
	for (uint64_t seq = rl->snd_una; seq < rl->snd_nxt; seq++) {
		struct rl_seg *s = seg_at(rl, seq);
		if (s->state & (SEG_SACKED | SEG_LOST))
			continue;
		if (s->xmit_ns > rl->rack_xmit || (s->xmit_ns == rl->rack_xmit && seq >= rl->rack_seq)) {
			/* Sent after the newest delivery. First transmissions go
			 * out in order, so every later one is newer still, and so
			 * is any later retransmission: stop. */
			if (!(s->state & SEG_RETX))
				break;
			continue;
		}
		uint64_t when = s->xmit_ns + rl->rack_rtt + reo;
		if (when <= now) {
			mark_lost(rl, seq, false);
			lost = true;
		} else if (when < rl->reo_deadline) {
			rl->reo_deadline = when;
		}
	}
	if (lost)
		congestion_event(rl);
}

static void on_rto(struct ferry_rl *rl, uint64_t now)
{
	rl->st.timeouts++;
	for (uint64_t seq = rl->snd_una; seq < rl->snd_nxt; seq++)
		if (!(seg_at(rl, seq)->state & (SEG_SACKED | SEG_LOST)))
			mark_lost(rl, seq, true);
	if (rl->backoff == 0) {
		rl->undo_ok = true;
		rl->undo_cwnd = rl->cwnd;
		rl->undo_ssthresh = rl->ssthresh;
		if (rl->snd_una >= rl->recovery_point) {
			rl->st.loss_events++;
			rl->ssthresh = max64((uint64_t)((double)rl->cwnd * rl->cfg.md_factor), cwnd_floor(rl));
		}
	}
	/* One packet at a time, then slow start back to ssthresh (RFC 5681). */
	rl->cwnd = rl->seg_max;
	rl->ca_acc = 0;
	rl->in_recovery = false;
	rl->recovery_point = rl->snd_nxt;
	if (rl->backoff < BACKOFF_MAX)
		rl->backoff++;
	rl->rto_base = now;
	rl->tlp_deadline = NEVER;
	rl->reo_deadline = NEVER;
}

static void rtt_sample(struct ferry_rl *rl, uint64_t r)
{
	if (r == 0)
		r = 1;
	if (!rl->have_rtt) {
		rl->srtt = r;
		rl->rttvar = r / 2;
		rl->have_rtt = true;
	} else {
		uint64_t d = rl->srtt > r ? rl->srtt - r : r - rl->srtt;
		rl->rttvar = (3 * rl->rttvar + d) / 4;
		rl->srtt = (7 * rl->srtt + r) / 8;
	}
	if (!rl->min_rtt || r < rl->min_rtt)
		rl->min_rtt = r;
	/* RFC 6298 with a 1 us clock granularity */
	rl->rto = min64(max64(rl->srtt + max64(4 * rl->rttvar, 1000), rl->cfg.rto_min_ns), rl->cfg.rto_max_ns);
}

static void on_delivered(struct ferry_rl *rl, uint64_t bytes)
{
	if (rl->in_recovery && rl->snd_una >= rl->recovery_point)
		rl->in_recovery = false;
	/* No growth in recovery, nor while the application or the peer's
	 * window, not cwnd, limits sending (RFC 7661). */
	if (rl->in_recovery || !rl->cwnd_limited)
		return;
	if (rl->cwnd < rl->ssthresh) {
		rl->cwnd += bytes;
	} else {
		rl->ca_acc += bytes;
		while (rl->ca_acc >= rl->cwnd) {
			rl->ca_acc -= rl->cwnd;
			rl->cwnd += (uint64_t)rl->cfg.ai_pkts * rl->seg_max;
		}
	}
	uint64_t cap = max64(rl->cfg.max_inflight_bytes, cwnd_floor(rl));
	if (rl->cwnd > cap)
		rl->cwnd = cap;
}

struct ack_info {
	uint64_t bytes;        /* newly delivered */
	uint64_t sample_xmit;  /* newest never-retransmitted segment delivered: RTT sample */
	bool have_sample;
	bool rack_moved;
	bool spurious;         /* a segment the timer declared lost arrived without being sent again */
	bool reordered;        /* a first transmission arrived after a later one */
};

/* A timeout was spurious (RFC 4015's idea, without timestamps): a segment
 * it declared lost was delivered though never sent again, so the path lost
 * nothing; the receiver or this end was not scheduled for longer than the
 * RTO (lane threads outnumber a small host's cores). Put cwnd back and keep
 * the other segments it declared lost from going again. */
static void undo_rto(struct ferry_rl *rl)
{
	rl->undo_ok = false;
	rl->st.spurious_timeouts++;
	rl->cwnd = max64(rl->cwnd, rl->undo_cwnd);
	rl->ssthresh = max64(rl->ssthresh, rl->undo_ssthresh);
	rl->in_recovery = false;
	rl->backoff = 0;
	for (uint64_t seq = rl->snd_una; seq < rl->snd_nxt; seq++) {
		struct rl_seg *s = seg_at(rl, seq);
		if ((s->state & (SEG_LOST | SEG_RTO)) == (SEG_LOST | SEG_RTO)) {
			s->state = (uint8_t)((s->state & ~(SEG_LOST | SEG_RTO)) | SEG_PIPE);
			rl->lost_pkts--;
			rl->pipe += s->len;
		}
	}
}

static void seg_delivered(struct ferry_rl *rl, uint64_t seq, struct rl_seg *s, uint64_t now, struct ack_info *ai)
{
	if (s->state & SEG_PIPE)
		rl->pipe -= s->len;
	if (s->state & SEG_LOST)
		rl->lost_pkts--;
	if ((s->state & (SEG_LOST | SEG_RTO)) == (SEG_LOST | SEG_RTO))
		ai->spurious = true;
	/* First transmissions leave in order: one delivered after a later one
	 * was (or after acks declared it lost) arrived out of order. */
	if (!(s->state & SEG_RETX) && rl->rack_valid && (s->xmit_ns < rl->rack_xmit || (s->state & SEG_LOST)))
		ai->reordered = true;
	ai->bytes += s->len;
	/* a retransmission acked sooner than the path allows was the original */
	bool ambiguous = (s->state & SEG_RETX) && now - s->xmit_ns < rl->min_rtt;
	if (!ambiguous && (!rl->rack_valid || s->xmit_ns > rl->rack_xmit || (s->xmit_ns == rl->rack_xmit && seq > rl->rack_seq))) {
		rl->rack_xmit = s->xmit_ns;
		rl->rack_seq = seq;
		rl->rack_rtt = now - s->xmit_ns;
		rl->rack_valid = true;
		ai->rack_moved = true;
	}
	if (!(s->state & SEG_RETX) && (!ai->have_sample || s->xmit_ns >= ai->sample_xmit)) {
		ai->sample_xmit = s->xmit_ns;
		ai->have_sample = true;
	}
	s->state = (uint8_t)((s->state & ~(SEG_PIPE | SEG_LOST | SEG_RTO)) | SEG_SACKED);
}

/* Check an ack and its SACK blocks against what was sent, before using any of it. */
static bool ack_valid(const struct ferry_rl *rl, const struct ferry_rl_hdr *h, uint64_t *ack)
{
	*ack = unwrap(rl->snd_una, h->ack);
	if (*ack > rl->snd_nxt)
		return false;
	for (unsigned i = 0; i < h->nsack; i++) {
		uint64_t s = unwrap(rl->snd_una, h->sack[i][0]), e = unwrap(rl->snd_una, h->sack[i][1]);
		if (s >= e || e > rl->snd_nxt)
			return false;
	}
	return true;
}

static void process_ack(struct ferry_rl *rl, const struct ferry_rl_hdr *h, uint64_t ack, uint64_t now)
{
	struct ack_info ai = { 0 };
	bool progress = false;
	if (ack > rl->snd_una) {
		for (uint64_t seq = rl->snd_una; seq < ack; seq++) {
			struct rl_seg *s = seg_at(rl, seq);
			if (!(s->state & SEG_SACKED))
				seg_delivered(rl, seq, s, now, &ai);
			rl->outstanding -= s->len;
			if (s->flags & FERRY_RL_F_END) {
				rl->msg_done = s->msg + 1;
				rl->st.msgs_completed++;
			}
		}
		rl->snd_una = ack;
		if (rl->rtx_cursor < ack)
			rl->rtx_cursor = ack;
		rl->rto_base = now;
		rl->backoff = 0;
		rl->tlp_out = false;
		progress = true;
	}
	for (unsigned i = 0; i < h->nsack; i++) {
		uint64_t s = max64(unwrap(rl->snd_una, h->sack[i][0]), rl->snd_una);
		uint64_t e = unwrap(rl->snd_una, h->sack[i][1]);
		for (uint64_t seq = s; seq < e; seq++) {
			struct rl_seg *g = seg_at(rl, seq);
			if (!(g->state & SEG_SACKED)) {
				seg_delivered(rl, seq, g, now, &ai);
				progress = true;
			}
		}
	}
	if (ai.reordered) {
		rl->st.reorder_seen++;
		if (rl->reo_mult < 256)
			rl->reo_mult *= 2;
	}
	if (ai.spurious && rl->undo_ok)
		undo_rto(rl);
	else if (rl->snd_una >= rl->recovery_point)
		rl->undo_ok = false; /* everything the timeout covered is acknowledged */
	uint64_t edge = ack + h->wnd;
	if (edge > rl->peer_edge) {
		rl->peer_edge = edge;
		rl->persist_backoff = 0;
	}
	if (ai.have_sample)
		rtt_sample(rl, now - ai.sample_xmit);
	if (ai.bytes)
		on_delivered(rl, ai.bytes);
	if (ai.rack_moved)
		rack_detect(rl, now);
	if (progress) {
		rl->last_progress = now;
		if (rl->snd_una < rl->snd_nxt)
			arm_tlp(rl, now);
		else
			rl->tlp_deadline = NEVER;
	}
}

/* ---- liveness ----------------------------------------------------------- */

static void update_wait(struct ferry_rl *rl, uint64_t now)
{
	bool w = rl->snd_una < rl->snd_nxt || rl->probe_out;
	if (w && !rl->waiting)
		rl->wait_start = now;
	rl->waiting = w;
}

static uint64_t dead_deadline(const struct ferry_rl *rl)
{
	if (!rl->waiting)
		return NEVER;
	return max64(rl->wait_start, rl->last_progress) + rl->cfg.dead_ns;
}

static int check_dead(struct ferry_rl *rl, uint64_t now)
{
	if (now < dead_deadline(rl))
		return 0;
	uint64_t since = max64(rl->wait_start, rl->last_progress);
	return rl_fail(rl, ETIMEDOUT, "peer silent for %" PRIu64 " ms while %s (%" PRIu64
		       " retransmission timeouts, RTO %" PRIu64 " ms; limit %" PRIu64 " ms): connection failed",
		       (now - since) / 1000000,
		       rl->snd_una < rl->snd_nxt ? "data waited for acknowledgement" : "probing it",
		       rl->st.timeouts, rto_cur(rl, rl->backoff) / 1000000, rl->cfg.dead_ns / 1000000);
}

/* ---- poll --------------------------------------------------------------- */

static int tx_failed(struct ferry_rl *rl, int rc, struct ferry_err *err)
{
	rl_fail(rl, -rc, "datagram driver failed to send: %s", strerror(-rc));
	return failed(rl, err);
}

int ferry_rl_poll(struct ferry_rl *rl, uint64_t now, ferry_rl_tx_fn tx, void *ctx, struct ferry_err *err)
{
	now = tick(rl, now);
	if (rl->fail_code)
		return failed(rl, err);
	if (rl->reset_due) {
		int rc = send_ctrl(rl, FERRY_RL_T_RESET, 0, tx, ctx);
		if (rc == -EAGAIN)
			return 0;
		rl_fail(rl, ECONNABORTED, "connection aborted locally");
		return failed(rl, err);
	}
	if (check_dead(rl, now))
		return failed(rl, err);

	int sent = 0, rc = 0;
	bool tlp_due = false;
	if (rl->snd_una < rl->snd_nxt) {
		/* The first expiry sends a tail loss probe instead of collapsing
		 * cwnd (as Linux does when the RTO would come before the PTO). */
		uint64_t rto_dl = rto_deadline(rl);
		if (!rl->tlp_out && now >= min64(rl->tlp_deadline, rto_dl))
			tlp_due = true;
		else if (now >= rto_dl)
			on_rto(rl, now);
	}
	if (now >= rl->reo_deadline)
		rack_detect(rl, now);

	for (;;) {
		uint64_t seq = 0;
		enum hold why = HOLD_NODATA;
		enum act a = pick(rl, &seq, &why);
		if (a == ACT_NONE) {
			if (why == HOLD_CWND)
				rl->cwnd_limited = true;
			else if (why == HOLD_NODATA)
				rl->cwnd_limited = false;
			if (why == HOLD_PEER && rl->snd_una == rl->snd_nxt && rl->snd_nxt >= rl->peer_edge && !rl->persist_since)
				rl->persist_since = now;
			break;
		}
		if (pace_gate(rl) > now) {
			rl->cwnd_limited = true;
			break;
		}
		rc = a == ACT_RETX ? send_retx(rl, seq, now, tx, ctx) : send_new(rl, now, tx, ctx);
		if (rc)
			goto out;
		sent++;
	}

	/* Tail loss probe (RFC 8985): the last packets of a burst have no later
	 * ones to reveal their loss, and packets believed in flight may hold
	 * cwnd shut in front of a repair. Send the first repair regardless of
	 * cwnd, or else the newest packet, to draw an ack; the RTO restarts. */
	if (tlp_due && rl->snd_una < rl->snd_nxt) {
		uint64_t seq = rl->lost_pkts ? first_lost(rl) : NEVER;
		if (seq != NEVER) {
			if ((rc = send_retx(rl, seq, now, tx, ctx)))
				goto out;
		} else {
			for (uint64_t q = rl->snd_nxt; q-- > rl->snd_una;) {
				if (!(seg_at(rl, q)->state & SEG_SACKED)) {
					seq = q;
					break;
				}
			}
			if (seq != NEVER) {
				struct rl_seg *s = seg_at(rl, seq);
				if ((rc = send_seg(rl, seq, FERRY_RL_F_RETX | FERRY_RL_F_ACK_REQ, tx, ctx)))
					goto out;
				s->state |= SEG_RETX;
				s->xmit_ns = now;
				rl->st.retransmits++;
			}
		}
		rl->st.tlp_probes++;
		rl->tlp_out = true;
		rl->tlp_deadline = NEVER;
		rl->rto_base = now;
		sent++;
	}

	if (rl->ack_now || now >= rl->ack_deadline) {
		if ((rc = send_ctrl(rl, FERRY_RL_T_ACK, 0, tx, ctx)))
			goto out;
		sent++;
	}

	/* Probes: an unanswered one again with backoff; a zero window with
	 * nothing in flight (the window update may have been lost); an idle
	 * peer not heard from for keepalive_ns. */
	bool probe = false;
	if (rl->probe_out) {
		probe = now >= rl->probe_deadline;
	} else if (rl->snd_una == rl->snd_nxt) {
		if (rl->persist_since && now >= rl->persist_since + rto_cur(rl, rl->persist_backoff)) {
			probe = true;
			/* a peer that answers but keeps its window shut is asked less and less often */
			if (rl->persist_backoff < BACKOFF_MAX)
				rl->persist_backoff++;
		}
		if (rl->cfg.keepalive_ns != NEVER && now - rl->last_rx >= rl->cfg.keepalive_ns)
			probe = true;
	}
	if (probe) {
		if ((rc = send_ctrl(rl, FERRY_RL_T_ACK, FERRY_RL_F_ACK_REQ, tx, ctx)))
			goto out;
		if (rl->probe_out && rl->probe_backoff < BACKOFF_MAX)
			rl->probe_backoff++;
		rl->probe_out = true;
		rl->probe_deadline = now + rto_cur(rl, rl->probe_backoff);
		rl->st.probes++;
		sent++;
	}
out:
	update_wait(rl, now);
	if (rc && rc != -EAGAIN)
		return tx_failed(rl, rc, err);
	return sent;
}

uint64_t ferry_rl_next_deadline(const struct ferry_rl *rl)
{
	if (rl->fail_code)
		return NEVER;
	if (rl->reset_due || rl->ack_now)
		return 0;
	uint64_t d = rl->ack_deadline;
	if (rl->snd_una < rl->snd_nxt) {
		d = min64(d, rto_deadline(rl));
		if (!rl->tlp_out)
			d = min64(d, rl->tlp_deadline);
	}
	d = min64(d, rl->reo_deadline);
	uint64_t seq;
	enum hold why;
	if (pick(rl, &seq, &why) != ACT_NONE)
		d = min64(d, pace_gate(rl));
	if (rl->probe_out) {
		d = min64(d, rl->probe_deadline);
	} else if (rl->snd_una == rl->snd_nxt) {
		if (rl->persist_since)
			d = min64(d, rl->persist_since + rto_cur(rl, rl->persist_backoff));
		if (rl->cfg.keepalive_ns != NEVER)
			d = min64(d, rl->last_rx + rl->cfg.keepalive_ns);
	}
	return min64(d, dead_deadline(rl));
}

/* ---- input -------------------------------------------------------------- */

static int take_data(struct ferry_rl *rl, const struct ferry_rl_hdr *h, const uint8_t *payload, void *cookie,
		     uint64_t now)
{
	uint64_t seq = unwrap(rl->rcv_nxt, h->seq);
	if (seq < rl->rcv_nxt || (seq < rl->rcv_head + rl->W && rcv_present(rl, seq))) {
		rl->st.dup_drops++;
		rl->ack_now = true; /* our ack may have been lost: repeat it */
		return 0;
	}
	if (seq >= rl->rcv_head + rl->W) {
		rl->st.window_drops++;
		rl->ack_now = true;
		return 0;
	}
	/* The limit holds whether the segment is kept or copied, so whether a
	 * datagram is taken never depends on the backend's buffer supply. */
	bool keep = rl->cfg.rx_release && cookie;
	if (h->len > rl->seg_max)
		return rl_fail(rl, EMSGSIZE, "peer sent a %u-byte segment; this end takes %zu "
			       "(both ends must use the same max_datagram)", h->len, rl->seg_max);
	struct rl_slot *sl = slot_at(rl, seq);
	sl->len = h->len;
	sl->flags = h->flags & (FERRY_RL_F_START | FERRY_RL_F_END);
	sl->present = true;
	if (keep) {
		sl->data = payload;
		sl->cookie = cookie;
		sl->retained = true;
	} else {
		uint8_t *dst = rl->slot_mem + (seq & rl->wmask) * rl->seg_max;
		memcpy(dst, payload, h->len);
		sl->data = dst;
	}
	rl->st.rx_data++;
	rl->st.rx_bytes += h->len;
	if (seq + 1 > rl->rcv_max)
		rl->rcv_max = seq + 1;
	if (seq == rl->rcv_nxt) {
		bool filled = rl->ooo > 0;
		rl->rcv_nxt++;
		while (rl->rcv_nxt < rl->rcv_max && rcv_present(rl, rl->rcv_nxt)) {
			rl->rcv_nxt++;
			rl->ooo--;
		}
		if (filled)
			rl->ack_now = true; /* a hole filled: the sender wants to know */
	} else {
		rl->ooo++;
		rl->st.reorder_buffered++;
		rl->last_ooo = seq;
		rl->ack_now = true;   /* out of order: SACK at once so the gap is repaired */
	}
	if (++rl->ack_pending >= rl->cfg.ack_every)
		rl->ack_now = true;
	else if (rl->ack_deadline == NEVER)
		rl->ack_deadline = now + rl->cfg.ack_delay_ns;
	return keep ? 1 : 0;
}

int ferry_rl_input(struct ferry_rl *rl, const void *dgram, size_t len, void *cookie, uint64_t now_ns,
		   struct ferry_err *err)
{
	uint64_t now = tick(rl, now_ns);
	if (rl->fail_code)
		return failed(rl, err);
	struct ferry_rl_hdr h;
	int rc = ferry_rl_decode(dgram, len, &h, NULL);
	if (rc == -EBADMSG) {
		rl->st.corrupt_drops++;
		return 0;
	}
	if (rc == -EPROTONOSUPPORT || (!rc && h.conn != rl->cfg.conn_id)) {
		rl->st.foreign_drops++;
		return 0;
	}
	uint64_t ack;
	if (rc || !ack_valid(rl, &h, &ack)) {
		rl->st.malformed_drops++;
		return 0;
	}
	rl->st.rx_datagrams++;
	rl->last_rx = now;
	rl->persist_since = 0;
	if (rl->probe_out || rl->snd_una == rl->snd_nxt)
		rl->last_progress = now; /* nothing of ours outstanding: hearing the peer is enough */
	rl->probe_out = false;
	rl->probe_backoff = 0;
	if (h.type == FERRY_RL_T_RESET) {
		rl_fail(rl, ECONNRESET, "peer reset the connection");
		return failed(rl, err);
	}
	process_ack(rl, &h, ack, now);
	if (h.flags & FERRY_RL_F_ACK_REQ)
		rl->ack_now = true;
	rc = 0;
	if (h.type == FERRY_RL_T_DATA) {
		const uint8_t *payload = (const uint8_t *)dgram + FERRY_RL_HDR_LEN + h.nsack * FERRY_RL_SACK_LEN;
		rc = take_data(rl, &h, payload, cookie, now);
		if (rc < 0)
			return failed(rl, err);
	}
	update_wait(rl, now);
	return rc;
}

/* ---- receive ------------------------------------------------------------ */

/* After the user consumed slots: tell a sender that may be window-blocked. */
static void window_opened(struct ferry_rl *rl)
{
	uint64_t edge = rl->rcv_head + rl->W;
	if (edge - rl->adv_edge >= rl->W / 4)
		rl->ack_now = true;
}

static void consume_head(struct ferry_rl *rl)
{
	struct rl_slot *s = slot_at(rl, rl->rcv_head);
	rl->st.bytes_delivered += s->len - rl->rd_off;
	if (s->flags & FERRY_RL_F_END)
		rl->st.msgs_delivered++;
	slot_free(rl, s);
	rl->rcv_head++;
	rl->rd_off = 0;
}

int ferry_rl_recv(struct ferry_rl *rl, struct ferry_rl_seg *segs, unsigned n)
{
	unsigned k = 0;
	for (uint64_t seq = rl->rcv_head; seq < rl->rcv_nxt && k < n; seq++, k++) {
		const struct rl_slot *s = slot_at(rl, seq);
		size_t off = seq == rl->rcv_head ? rl->rd_off : 0;
		segs[k].data = s->data + off;
		segs[k].len = s->len - off;
		segs[k].flags = off ? (s->flags & ~FERRY_RL_F_START) : s->flags;
	}
	return (int)k;
}

void ferry_rl_release(struct ferry_rl *rl, unsigned n)
{
	while (n-- && rl->rcv_head < rl->rcv_nxt)
		consume_head(rl);
	window_opened(rl);
}

/* Consume up to cap in-order bytes, stopping at a message end; copy them to
 * buf unless it is NULL (the caller used them where ferry_rl_recv showed them). */
size_t ferry_rl_read(struct ferry_rl *rl, void *buf, size_t cap, bool *msg_end)
{
	size_t got = 0;
	bool end = false;
	while (got < cap && rl->rcv_head < rl->rcv_nxt) {
		const struct rl_slot *s = slot_at(rl, rl->rcv_head);
		size_t k = min64(s->len - rl->rd_off, cap - got);
		if (buf)
			memcpy((uint8_t *)buf + got, s->data + rl->rd_off, k);
		got += k;
		if (rl->rd_off + k < s->len) {
			rl->rd_off += k;
			rl->st.bytes_delivered += k;
			break;
		}
		end = s->flags & FERRY_RL_F_END;
		consume_head(rl);
		if (end)
			break;
	}
	if (msg_end)
		*msg_end = end;
	window_opened(rl);
	return got;
}

size_t ferry_rl_skip(struct ferry_rl *rl, size_t n, bool *msg_end)
{
	return ferry_rl_read(rl, NULL, n, msg_end);
}

/* ---- misc --------------------------------------------------------------- */

void ferry_rl_abort(struct ferry_rl *rl)
{
	if (!rl->fail_code)
		rl->reset_due = true;
}

int ferry_rl_status(const struct ferry_rl *rl, struct ferry_err *err)
{
	return rl->fail_code ? failed(rl, err) : 0;
}

void ferry_rl_stats(const struct ferry_rl *rl, struct ferry_rl_stats *st)
{
	*st = rl->st;
	st->cwnd = rl->cwnd;
	st->ssthresh = rl->ssthresh;
	st->srtt_ns = rl->srtt;
	st->rttvar_ns = rl->rttvar;
	st->rto_ns = rto_cur(rl, rl->backoff);
	st->min_rtt_ns = rl->min_rtt;
	st->inflight_bytes = rl->outstanding;
	st->inflight_pkts = (unsigned)(rl->snd_nxt - rl->snd_una);
	st->pipe_bytes = rl->pipe;
	st->peer_window = rl->peer_edge > rl->snd_una ? (unsigned)(rl->peer_edge - rl->snd_una) : 0;
	st->pacing_rate = pacing_rate(rl);
}
