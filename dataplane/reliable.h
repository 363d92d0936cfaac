/* Reliable, ordered message delivery over a lossy datagram path.
 *
 * One "rlane" is one connection between two endpoints over a datagram
 * driver queue (a DPDK queue pair, a UDP socket): per-packet sequence
 * numbers, cumulative and selective acks, retransmission on timeout (RFC 6298
 * timer) and on SACK evidence (RACK-style, RFC 8985), tail loss probes,
 * duplicate suppression, reordering, receive-window flow control, AIMD
 * congestion control with pacing, a CRC32C over every datagram byte, and a
 * bounded failure when the peer goes silent. The wire format is in
 * docs/wire-format.md ("Reliable transport over datagrams").
 *
 * Pure logic: no I/O, no threads, no clock. Every call that needs the time
 * takes now_ns (monotonic, any origin), so tests run on a virtual clock. The
 * owner (a lane's poller thread) calls, in any order:
 *   ferry_rl_send       queue a message (a ferry frame: header + payload);
 *   ferry_rl_poll       hand datagrams to the driver (data, retransmissions,
 *                       acks, window updates, probes) through a callback;
 *   ferry_rl_input      give it a datagram the driver received;
 *   ferry_rl_recv/_read take delivered bytes, in order, exactly once;
 *   ferry_rl_completions learn which sent messages the peer has all of;
 * and polls again by ferry_rl_next_deadline.
 *
 * Messages of any size up to FERRY_RL_MSG_MAX are cut into segments that fit
 * one datagram; the receiver hands segments back in order with START/END
 * marks, so a consumer can place payload directly (a stream ring, a region)
 * without reassembling whole messages. */
#ifndef FERRY_RELIABLE_H
#define FERRY_RELIABLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "../drivers/err.h"

/* Wire constants (see docs/wire-format.md). */
#define FERRY_RL_VERSION     0xf1u   /* first byte of every datagram */
#define FERRY_RL_HDR_LEN     24
#define FERRY_RL_SACK_LEN    8
#define FERRY_RL_MAX_SACK    4
#define FERRY_RL_OVERHEAD    (FERRY_RL_HDR_LEN + FERRY_RL_MAX_SACK * FERRY_RL_SACK_LEN)

enum ferry_rl_type {
	FERRY_RL_T_DATA = 1,   /* a segment of a message (and an ack) */
	FERRY_RL_T_ACK = 2,    /* an ack / window update / probe, no payload */
	FERRY_RL_T_RESET = 3,  /* the sender gave the connection up */
};

/* datagram flags */
#define FERRY_RL_F_START   0x01u  /* DATA: the segment starts a message */
#define FERRY_RL_F_END     0x02u  /* DATA: the segment ends a message */
#define FERRY_RL_F_ACK_REQ 0x04u  /* answer with an ack at once (probes, retransmissions) */
#define FERRY_RL_F_RETX    0x08u  /* DATA: a retransmission (informational) */
#define FERRY_RL_F_KNOWN   0x0fu

#define FERRY_RL_DATAGRAM_MIN 128         /* smallest max_datagram accepted */
#define FERRY_RL_DATAGRAM_MAX 65535       /* the length field is 16 bits */
#define FERRY_RL_WINDOW_MAX   32768       /* packets; half the 16-bit wnd field, so wrap is unambiguous */
#define FERRY_RL_INLINE_MAX   64          /* message head bytes copied at send (a frame header) */
#define FERRY_RL_MSG_MAX      0x7fffffffu

/* Every zero field takes its default. */
struct ferry_rl_config {
	uint32_t conn_id;          /* both ends use the same; other connections' datagrams are dropped */
	uint32_t initial_seq;      /* first packet number, the same at both ends (any value) */
	size_t max_datagram;       /* bytes the driver carries per datagram, this header included
				    * (UDP payload: 1472 at MTU 1500, 8972 at 9000); default 1472 */
	unsigned window_pkts;      /* receive slots, also the most packets in flight; rounded up
				    * to a power of two; default 512 */
	uint64_t max_inflight_bytes; /* cap on unacknowledged bytes; default window_pkts segments */
	unsigned send_queue;       /* messages queued or awaiting completion; rounded up to a
				    * power of two; default 256 */
	uint64_t rto_initial_ns;   /* before the first RTT sample; default 100 ms */
	uint64_t rto_min_ns;       /* default 2 ms */
	uint64_t rto_max_ns;       /* backoff ceiling; default 1 s */
	uint64_t dead_ns;          /* fail when waiting on a peer silent this long; default 5 s */
	uint64_t keepalive_ns;     /* probe a peer silent this long while idle; default dead_ns / 4,
				    * UINT64_MAX = never (an idle dead peer then goes unnoticed) */
	uint64_t ack_delay_ns;     /* longest a pure ack waits for more data; default 50 us */
	unsigned ack_every;        /* ack at once after this many new data packets; default 2 */
	unsigned init_cwnd_pkts;   /* default 10 */
	unsigned min_cwnd_pkts;    /* floor after a loss episode; default 2 */
	unsigned ai_pkts;          /* additive increase per RTT; default 1 */
	double md_factor;          /* cwnd multiplier on a loss episode, (0,1); default 0.5 */
	bool no_pacing;            /* pacing is on unless this is set */
	unsigned pace_burst;       /* datagrams that may leave back to back; default 4 */
	uint64_t max_rate;         /* bytes/s ceiling on sending (pacing), 0 = none */
	/* Zero-copy receive: when set, ferry_rl_input keeps the datagrams it
	 * accepts (returns 1) and calls rx_release(user, cookie) once the bytes
	 * are consumed or the rlane is destroyed. Otherwise, and for a datagram
	 * input with a NULL cookie (the backend cannot lend it), it copies the
	 * payload into slots of its own (window_pkts x segment bytes, allocated
	 * once). */
	void (*rx_release)(void *user, void *cookie);
	void *user;
};

/* One message to send: head bytes are copied (a frame header), payload is
 * referenced and must stay valid and unchanged until the message's cookie
 * comes back from ferry_rl_completions (it may be retransmitted until then). */
struct ferry_rl_msg {
	const void *head;
	size_t head_len;           /* 0..FERRY_RL_INLINE_MAX */
	const void *payload;
	size_t payload_len;        /* head_len + payload_len: 1..FERRY_RL_MSG_MAX */
	void *cookie;
};

/* Delivered bytes, in order: a segment, or what is left of one after
 * ferry_rl_read took part of it. Valid until released. */
struct ferry_rl_seg {
	const void *data;
	size_t len;
	unsigned flags;            /* FERRY_RL_F_START (first bytes of a message), FERRY_RL_F_END */
};

/* Hands one datagram (iov pieces, len bytes in all) to the driver: return 0
 * when taken (the bytes may be reused once it returns), -EAGAIN when the
 * driver is full (poll stops; call it again later), another negative errno
 * when the driver failed (the rlane fails with it). */
typedef int (*ferry_rl_tx_fn)(void *ctx, const struct iovec *iov, unsigned iovcnt, size_t len);

struct ferry_rl_stats {
	/* transmit */
	uint64_t tx_datagrams;     /* everything handed to the driver */
	uint64_t tx_data;          /* data segments, first transmissions */
	uint64_t tx_bytes;         /* message bytes in those */
	uint64_t tx_acks;          /* pure acks, window updates, probes */
	uint64_t retransmits;      /* data segments sent again, for any reason */
	uint64_t fast_retransmits; /* ... because acks showed them lost (SACK/RACK) */
	uint64_t rto_retransmits;  /* ... because the retransmission timer expired */
	uint64_t timeouts;         /* retransmission timer expiries */
	uint64_t tlp_probes;       /* tail loss probes */
	uint64_t probes;           /* keepalive and zero-window probes */
	uint64_t loss_events;      /* congestion window reductions (one per episode) */
	uint64_t msgs_completed;   /* sent messages the peer has all of */
	/* receive */
	uint64_t rx_datagrams;     /* datagrams that passed the check */
	uint64_t rx_data;          /* new data segments accepted */
	uint64_t rx_bytes;
	uint64_t dup_drops;        /* data already received */
	uint64_t corrupt_drops;    /* failed the CRC32C or truncated: never delivered */
	uint64_t foreign_drops;    /* another version's or connection's */
	uint64_t malformed_drops;  /* passed the check but impossible (bad ack, lengths) */
	uint64_t window_drops;     /* beyond the window this end advertised */
	uint64_t reorder_buffered; /* segments that arrived ahead of a gap and waited */
	uint64_t msgs_delivered;   /* message ends handed to the user */
	uint64_t bytes_delivered;
	/* state now */
	uint64_t cwnd, ssthresh;   /* bytes */
	uint64_t srtt_ns, rttvar_ns, rto_ns, min_rtt_ns;
	uint64_t inflight_bytes;   /* sent, not yet cumulatively acknowledged */
	unsigned inflight_pkts;
	uint64_t pipe_bytes;       /* of those, believed in the network (not SACKed, not lost) */
	uint64_t max_inflight_bytes; /* high-water marks */
	unsigned max_inflight_pkts;
	unsigned peer_window;      /* packets the peer accepts beyond its cumulative ack */
	uint64_t pacing_rate;      /* bytes/s, 0 = not pacing (no RTT sample yet, or off) */
	/* filled by the datagram shim (dataplane/rldrv.h), 0 here */
	uint64_t tx_by_ref;        /* datagrams whose payload the backend sent without copying it */
	/* transmit, added later */
	uint64_t spurious_timeouts; /* timer expiries undone: what they declared lost arrived, never sent again */
	uint64_t reorder_seen;     /* acks showing a first transmission delivered after a later one */
	/* receive, filled by the datagram shim, 0 here */
	uint64_t rx_held;          /* datagrams kept in the backend's buffer until consumed (no copy) */
};

/* A decoded datagram header, for tools and tests (the rlane decodes its own). */
struct ferry_rl_hdr {
	uint8_t type, flags, nsack;
	uint32_t conn, seq, ack;
	uint16_t wnd, len;
	uint32_t sack[FERRY_RL_MAX_SACK][2];  /* [start, end) packet numbers */
};

struct ferry_rl;

int ferry_rl_create(const struct ferry_rl_config *cfg, uint64_t now_ns, struct ferry_rl **out,
		    struct ferry_err *err);
/* Frees everything; retained datagrams go back through rx_release. Cookies
 * of unfinished messages are not handed back: the caller owns that memory. */
void ferry_rl_destroy(struct ferry_rl *rl);

/* Segment payload bytes per datagram (max_datagram - FERRY_RL_OVERHEAD). */
size_t ferry_rl_segment_max(const struct ferry_rl *rl);

/* Queue a message. 0, -EAGAIN when send_queue messages are queued or
 * uncollected, -EINVAL/-EMSGSIZE for a bad message, or the failure code. */
int ferry_rl_send(struct ferry_rl *rl, const struct ferry_rl_msg *m, struct ferry_err *err);
/* Cookies of messages the peer has received whole, in send order. */
int ferry_rl_completions(struct ferry_rl *rl, void **cookies, unsigned n);
/* Messages queued and not yet completed (0: everything sent was acknowledged). */
unsigned ferry_rl_unfinished(const struct ferry_rl *rl);

/* Run timers and transmit what is due. Returns datagrams handed to tx, or a
 * negative errno once the connection failed (err says why). */
int ferry_rl_poll(struct ferry_rl *rl, uint64_t now_ns, ferry_rl_tx_fn tx, void *ctx, struct ferry_err *err);
/* When poll has work next: now or earlier for "at once", UINT64_MAX for
 * "only after send or input". */
uint64_t ferry_rl_next_deadline(const struct ferry_rl *rl);

/* A received datagram. Returns 1 when kept (rx_release mode and a non-NULL
 * cookie; the cookie comes back through rx_release exactly once), 0 when done with the buffer, negative once the connection
 * failed (a RESET arrived). Corrupt, duplicate and foreign datagrams are
 * counted and return 0. */
int ferry_rl_input(struct ferry_rl *rl, const void *dgram, size_t len, void *cookie, uint64_t now_ns,
		   struct ferry_err *err);

/* Zero-copy receive: up to n in-order segments, oldest first, without
 * consuming them; ferry_rl_release(n) consumes the first n (and opens the
 * window for the sender). */
int ferry_rl_recv(struct ferry_rl *rl, struct ferry_rl_seg *segs, unsigned n);
void ferry_rl_release(struct ferry_rl *rl, unsigned n);
/* Copying receive: up to cap in-order bytes, stopping at a message end
 * (then *msg_end is set). 0 when nothing is deliverable. */
size_t ferry_rl_read(struct ferry_rl *rl, void *buf, size_t cap, bool *msg_end);
/* Like ferry_rl_read without the copy: up to n bytes that ferry_rl_recv
 * showed were used in place (partial segments included). */
size_t ferry_rl_skip(struct ferry_rl *rl, size_t n, bool *msg_end);

/* Give up: a RESET goes to the peer on the next poll, then the rlane fails
 * with -ECONNABORTED. */
void ferry_rl_abort(struct ferry_rl *rl);
/* 0 while healthy, else the failure code with the reason in err. */
int ferry_rl_status(const struct ferry_rl *rl, struct ferry_err *err);

void ferry_rl_stats(const struct ferry_rl *rl, struct ferry_rl_stats *st);

/* Check and decode one datagram's header (CRC32C over all of it). */
int ferry_rl_decode(const void *dgram, size_t len, struct ferry_rl_hdr *h, struct ferry_err *err);

#endif
