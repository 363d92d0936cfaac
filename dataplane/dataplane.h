/* ferry data plane: sessions of streams and regions carried over lanes.
 *
 * A data plane instance owns one driver device. A session joins two data
 * planes (source and destination) over N lanes; each lane is a driver queue
 * owned by one poller thread. Streams are ordered, reliable, bidirectional
 * byte streams between a local unix socket on each side (one per QEMU
 * migration channel); stream k rides lane k % lanes. Regions are registered
 * memory areas written by offset (the raw page path).
 *
 * Source side: QEMU connects to the session's listening unix path; the n-th
 * accepted connection becomes stream n. Destination side: stream n is
 * connected to the target unix path only after streams 0..n-1 are connected,
 * so the destination QEMU sees the source's order (it names channels by
 * arrival order). */
#ifndef FERRY_DATAPLANE_H
#define FERRY_DATAPLANE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../drivers/err.h"

#define FERRY_TOKEN_LEN 16
#define FERRY_MAX_LANES 64
#define FERRY_MAX_STREAMS 64
#define FERRY_DP_ENDPOINT_MAX 256   /* an endpoint description, e.g. "tcp:10.0.0.2:7471" */

enum ferry_poll_mode {
	FERRY_POLL_ADAPTIVE = 0, /* spin for a short budget after work, then yield, then sleep on the wakeup fds */
	FERRY_POLL_BUSY,         /* never sleep: lowest latency, one core per lane */
};

struct ferry_dp_config {
	const char *driver;                 /* "tcp" */
	const char *const *driver_options;  /* NULL-terminated "key=value"; a key the driver does not read is refused */
	const char *const *driver_defaults; /* the daemon's own (bind= from --listen): used where driver_options
					     * gives no value, never refused (not every driver binds) */
	enum ferry_poll_mode poll_mode;
	unsigned spin_us;                   /* adaptive spin budget; 0 = default 50 us */
	bool no_splice;                     /* force the copy path even where the driver splices */
	size_t window;                      /* per-stream flow-control window; 0 = default 4 MiB */
	bool no_rx_peek;                    /* copy every received stream byte into the stream's buffer
					     * even where the driver can lend its receive memory */
};

struct ferry_dp;
struct ferry_session;

int ferry_dp_open(const struct ferry_dp_config *cfg, struct ferry_dp **out, struct ferry_err *err);
void ferry_dp_close(struct ferry_dp *dp);
int ferry_dp_endpoint(struct ferry_dp *dp, char *buf, size_t len, struct ferry_err *err);
const char *ferry_dp_driver_name(const struct ferry_dp *dp);
/* This data plane's per-stream flow-control window (bytes). */
uint64_t ferry_dp_window(const struct ferry_dp *dp);
/* Frames that arrived for no established session (bad HELLOs), for stats. */
uint64_t ferry_dp_rejected_lanes(const struct ferry_dp *dp);
/* CRC32C (hardware-assisted where the CPU has it), for verifying transfers;
 * pass 0 to start, the previous result to continue over more bytes. */
uint32_t ferry_dp_checksum(uint32_t crc, const void *buf, size_t len);

struct ferry_session_params {
	uint32_t id;
	uint8_t token[FERRY_TOKEN_LEN];  /* per-session secret, agreed over the control channel */
	unsigned lanes;                  /* 1..FERRY_MAX_LANES */
	unsigned max_streams;            /* 1..FERRY_MAX_STREAMS */
	uint64_t window;                 /* 0 = the data plane's default; both sides must use the same (the control plane agrees it) */
	const char *unix_path;           /* source: path to listen on; destination: path to connect to (may be NULL for region-only sessions) */
	int timeout_ms;                  /* lane set-up and stream-order waits */
	bool handoff;                    /* one lane, authenticated, then given to QEMU whole (see ferry_session_take_fd) */
};

/* Destination: register a session; its lanes arrive through the device's
 * listener and are attached once their HELLO carries this id and token. */
int ferry_session_create_dst(struct ferry_dp *dp, const struct ferry_session_params *p,
			     struct ferry_session **out, struct ferry_err *err);
/* Source: connect the lanes to the peer's endpoint, then listen on unix_path. */
int ferry_session_create_src(struct ferry_dp *dp, const struct ferry_session_params *p,
			     const char *peer_endpoint, struct ferry_session **out, struct ferry_err *err);
/* Handoff sessions: once the lane is up (waits up to timeout_ms), detach its
 * connected kernel socket and return it; the caller owns the fd. The data then
 * flows QEMU to QEMU over the connection ferry authenticated, with no copy or
 * thread of ferry's in the path. */
int ferry_session_take_fd(struct ferry_session *s, int timeout_ms, struct ferry_err *err);
/* Whether this data plane's driver can hand a lane's socket to QEMU. */
bool ferry_dp_can_handoff(const struct ferry_dp *dp);

/* Source sessions made without a unix_path: adopt fd, an already connected
 * local socket, as the next stream (the session owns fd on success only).
 * Lets a caller that accepts connections itself decide which session each
 * one joins. */
int ferry_session_add_stream(struct ferry_session *s, int fd, struct ferry_err *err);
/* Source: wait until the peer has connected n streams to its local socket
 * (so a next connection, in whatever session, cannot overtake them), the
 * session fails, or timeout_ms passes. */
int ferry_session_wait_streams(struct ferry_session *s, unsigned n, int timeout_ms, struct ferry_err *err);

/* Stop all threads, close all sockets, free. Safe on a failed session. */
void ferry_session_close(struct ferry_session *s);
/* Fail the session on purpose (cancel): tells the peer, closes local ends. */
void ferry_session_abort(struct ferry_session *s, const char *reason);

enum ferry_session_state {
	FERRY_SESSION_CONNECTING = 0, /* lanes not all up yet */
	FERRY_SESSION_ACTIVE,
	FERRY_SESSION_FAILED,
	FERRY_SESSION_CLOSED,
};

/* Datagram lanes (dpdk, udp): the reliability engine's view of one lane
 * (dataplane/reliable.h; the fields are described in docs/wire-format.md,
 * "Counters"). In a session's sum the counters add up and the state fields
 * (cwnd .. inflight_bytes) are the largest lane's. uint64_t fields only. */
struct ferry_rel_stats {
	uint64_t tx_datagrams;     /* everything sent: data, retransmissions, acks, probes */
	uint64_t tx_data;          /* data segments, first transmissions */
	uint64_t retransmits;      /* data segments sent again, for any reason, of which */
	uint64_t retx_timeout;     /*   the retransmission timer expired */
	uint64_t retx_sack;        /*   acks (SACK gaps, RACK) showed them lost */
	uint64_t tlp_probes;       /* tail loss probes (each sends a segment again) */
	uint64_t timeouts;         /* retransmission timer expiries */
	uint64_t loss_events;      /* congestion window reductions */
	uint64_t rx_datagrams;     /* received datagrams that passed the CRC32C */
	uint64_t dup_drops;        /* data segments received again, dropped */
	uint64_t corrupt_drops;    /* failed the CRC32C or truncated: dropped, never delivered */
	uint64_t reorder_buffered; /* segments that arrived ahead of a gap and waited */
	uint64_t window_drops;     /* beyond the advertised window */
	uint64_t malformed_drops;  /* passed the CRC but impossible (bad ack, lengths) */
	uint64_t cwnd;             /* congestion window now, bytes */
	uint64_t srtt_ns, rto_ns;  /* smoothed round trip, retransmission timeout */
	uint64_t inflight_bytes;   /* sent, not yet acknowledged */
	/* the fault injector on this end's sends (driver option fault=; 0 without) */
	uint64_t fault_dropped, fault_duplicated, fault_reordered, fault_corrupted;
	uint64_t tx_by_ref;        /* datagrams whose payload left without a copy into the driver (dpdk) */
	uint64_t spurious_timeouts; /* timeouts undone: what they declared lost arrived after all */
};

struct ferry_lane_stats {
	uint64_t tx_bytes, rx_bytes, tx_frames, rx_frames;
	double idle_pct;   /* share of wall time the poller slept since the lane started */
	bool reliable;     /* a datagram lane: rel is filled */
	struct ferry_rel_stats rel;
	uint64_t rx_direct_bytes;  /* of rx_bytes, written to the local socket straight from the driver's memory */
};

struct ferry_session_stats {
	enum ferry_session_state state;
	unsigned lanes, lanes_up;
	/* Datagram devices: set when the session has fewer lanes than asked for
	 * because an end has fewer queues ("5 streams on 4 lanes of 5 asked for
	 * (the peer's device has 4 queues)"); "" otherwise. */
	char lanes_note[128];
	unsigned streams_opened, streams_closed;
	unsigned streams_refused;          /* source: connections beyond the session's streams, closed */
	uint64_t tx_bytes, rx_bytes;       /* stream payload bytes */
	struct ferry_lane_stats lane[FERRY_MAX_LANES];
	bool reliable;                     /* datagram lanes: rel sums theirs */
	struct ferry_rel_stats rel;
	char error[FERRY_ERR_MSG_MAX];     /* why it failed */
	uint64_t rx_direct_bytes;          /* of rx_bytes, not copied into a stream buffer first */
};

void ferry_session_stats(struct ferry_session *s, struct ferry_session_stats *st);
/* Wait until the session is ACTIVE (all lanes up) or failed. */
int ferry_session_wait_active(struct ferry_session *s, int timeout_ms, struct ferry_err *err);

/* Regions: both sides add a region under the same id; the source then
 * writes [offset, offset+len) of its region into the same range of the
 * peer's. Writes are spread over the lanes; fence waits until every write
 * issued before it has landed in the peer's memory. */
int ferry_region_add(struct ferry_session *s, uint32_t id, void *base, size_t len, struct ferry_err *err);
int ferry_region_write(struct ferry_session *s, uint32_t id, uint64_t offset, size_t len,
		       struct ferry_err *err);
int ferry_region_fence(struct ferry_session *s, int timeout_ms, struct ferry_err *err);

#endif
