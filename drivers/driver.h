/* The driver ops table: how the data plane reaches a device.
 *
 * Modelled on SPDK's transport ops. One table fits three kinds of device:
 *  - a kernel byte-stream socket (tcp): reliable, in order; the driver cuts
 *    the byte stream into frames; it may also move payload between a pipe and
 *    the wire with splice() so stream bytes never enter user space;
 *  - a datagram NIC that loses packets (dpdk): each frame is one message; the
 *    data plane's reliability layer sits on top (caps lack FERRY_DRV_RELIABLE);
 *  - a reliable-connected verbs device with one-sided writes (rdma).
 *
 * A lane is one driver queue (a TCP connection, a DPDK queue pair, an RC QP)
 * owned by one poller thread: lane functions are never called concurrently
 * for the same lane. Device-level functions are thread safe. */
#ifndef FERRY_DRIVER_H
#define FERRY_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "err.h"
#include "wire.h"

#define FERRY_ENDPOINT_MAX 256

/* capability bits */
#define FERRY_DRV_RELIABLE  0x1u /* frames arrive once, in order, or the lane fails */
#define FERRY_DRV_SPLICE    0x2u /* tx_splice / rx_splice move payload kernel-side */
#define FERRY_DRV_ONESIDED  0x4u /* write_remote places bytes in a peer region */
#define FERRY_DRV_HANDOFF   0x8u /* lane_detach_fd gives the lane's kernel socket away */

struct ferry_device;
struct ferry_lane_drv;
struct ferry_listener;

struct ferry_mr {
	void *addr;
	size_t len;
	uint64_t rkey;  /* what a peer needs to write into it (0 where meaningless) */
	void *drv;      /* driver private */
};

/* A key=value option list from the daemon's config (e.g. "bind=127.0.0.1:7471"). */
struct ferry_driver_config {
	const char *const *options;   /* NULL-terminated "key=value" strings */
	/* Optional: bit i is set when a driver looked options[i] up, so that a
	 * key no driver asked for (a typo) can be refused after open. */
	unsigned long long *seen;
};

/* A frame to send: header fields (the driver encodes them) and payload. The
 * payload memory must stay valid until the frame completes (see
 * poll_completions); 'cookie' is handed back then. */
struct ferry_tx_frame {
	struct ferry_frame_hdr hdr;
	const struct iovec *iov;
	unsigned iovcnt;
	void *cookie;
	/* Optional: the payload (one iovec) lies in memory registered with
	 * mem_register, so a verbs driver can send it without copying. */
	const struct ferry_mr *mr;
};

/* A received frame. payload points at driver memory valid until rx_release,
 * or is NULL with 'pending' set when the driver leaves the payload on the wire
 * (byte-stream drivers) or in its own receive buffers: the caller then
 * consumes exactly hdr.length bytes with rx_payload / rx_splice /
 * rx_peek + rx_consume before the next rx_burst. */
struct ferry_rx_frame {
	struct ferry_frame_hdr hdr;
	void *payload;
	bool pending;
	void *drv;   /* driver private, for rx_release */
};

struct ferry_driver_ops {
	const char *name;
	uint32_t caps;

	int (*open)(const struct ferry_driver_config *cfg, struct ferry_device **out,
		    struct ferry_err *err);
	void (*close)(struct ferry_device *dev);

	/* Describe where peers reach this device, for the control plane's cookie
	 * ("tcp:127.0.0.1:7471"). */
	int (*local_endpoint)(struct ferry_device *dev, char *buf, size_t len, struct ferry_err *err);

	/* Passive side: an fd that becomes readable when a lane is waiting, and
	 * accept one (returns -EAGAIN when none is waiting). */
	int (*listen_fd)(struct ferry_device *dev);
	int (*lane_accept)(struct ferry_device *dev, struct ferry_lane_drv **out, struct ferry_err *err);
	/* Active side: connect lane number 'index' to a peer endpoint. */
	int (*lane_connect)(struct ferry_device *dev, const char *peer_endpoint, unsigned index,
			    int timeout_ms, struct ferry_lane_drv **out, struct ferry_err *err);
	void (*lane_close)(struct ferry_lane_drv *lane);

	int (*mem_register)(struct ferry_device *dev, void *addr, size_t len, struct ferry_mr *mr,
			    struct ferry_err *err);
	void (*mem_deregister)(struct ferry_device *dev, struct ferry_mr *mr);

	/* Queue up to n frames; returns how many were taken (0 when the lane is
	 * full: retry after tx_flush made progress), or a negative errno when the
	 * lane has failed. */
	int (*tx_burst)(struct ferry_lane_drv *lane, const struct ferry_tx_frame *frames, unsigned n,
			struct ferry_err *err);
	/* Push queued bytes out. Returns 0 when nothing is left queued, -EAGAIN
	 * when the wire is full, another negative errno on failure. */
	int (*tx_flush)(struct ferry_lane_drv *lane, struct ferry_err *err);
	/* Hand back cookies of frames whose payload memory may be reused. */
	int (*poll_completions)(struct ferry_lane_drv *lane, void **cookies, unsigned n);

	/* Receive up to n frames (0 when none is ready, negative on failure;
	 * -ECONNRESET when the peer closed the lane). */
	int (*rx_burst)(struct ferry_lane_drv *lane, struct ferry_rx_frame *frames, unsigned n,
			struct ferry_err *err);
	/* For a pending payload: copy up to len bytes into dst; returns bytes
	 * copied (0 = try later) or negative errno. */
	ssize_t (*rx_payload)(struct ferry_lane_drv *lane, void *dst, size_t len, struct ferry_err *err);
	void (*rx_release)(struct ferry_lane_drv *lane, struct ferry_rx_frame *frames, unsigned n);

	/* Optional (both or neither; drivers whose pending payload already sits
	 * in their own memory). rx_peek fills up to n iovecs with the next bytes
	 * of the pending payload where they lie, in order, never past the
	 * frame's end; returns how many (0 = none arrived yet) or a negative
	 * errno. Nothing is consumed: the memory stays valid and the bytes
	 * pending until the lane's next rx call. rx_consume then takes the
	 * first 'len' of the bytes peeked (any prefix, 0 included) as used, so
	 * the caller can hand the payload on (to a socket) without copying it
	 * first, and rx_payload copies whatever the target did not take. The
	 * caller may wait for a whole frame's payload before it consumes any:
	 * a driver must be able to hold one, or as much as fills n iovecs. */
	int (*rx_peek)(struct ferry_lane_drv *lane, struct iovec *iov, unsigned n, struct ferry_err *err);
	int (*rx_consume)(struct ferry_lane_drv *lane, size_t len, struct ferry_err *err);

	/* FERRY_DRV_SPLICE only. tx_splice sends a frame whose payload (hdr.length
	 * bytes) is read from pipe_fd; the driver owns the frame from then on and
	 * tx_flush finishes it (the pipe must stay open until tx_flush returns 0).
	 * rx_splice moves up to len bytes of a pending payload into pipe_fd. */
	int (*tx_splice)(struct ferry_lane_drv *lane, const struct ferry_frame_hdr *hdr, int pipe_fd,
			 struct ferry_err *err);
	ssize_t (*rx_splice)(struct ferry_lane_drv *lane, int pipe_fd, size_t len, struct ferry_err *err);

	/* FERRY_DRV_ONESIDED only: write len bytes from a local MR into the
	 * peer's region (rkey, remote_offset), announcing 'imm' on completion. */
	int (*write_remote)(struct ferry_lane_drv *lane, const struct ferry_mr *local, size_t local_off,
			    uint64_t rkey, uint64_t remote_off, size_t len, uint32_t imm, void *cookie,
			    struct ferry_err *err);

	/* FERRY_DRV_HANDOFF only: end the lane and return its connected kernel
	 * socket, with no byte of the peer's consumed beyond the last frame
	 * received. The caller owns the fd (QEMU gets it). */
	int (*lane_detach_fd)(struct ferry_lane_drv *lane, struct ferry_err *err);

	/* An fd to poll() when idle: readable when rx may have work; with
	 * want_tx, also writable when tx_flush may progress. */
	int (*wakeup_fd)(struct ferry_lane_drv *lane, short *events, bool want_tx);

	/* Datagram devices only (NULL for connection drivers, whose lanes are
	 * independent whatever their number): this device's queue count and,
	 * given a peer endpoint (or NULL), the peer's. Two lanes on one queue
	 * pass each other's datagrams through a hand-over that makes them late
	 * (taken for loss), so the data plane opens no more lanes than both
	 * have queues. */
	int (*queue_counts)(struct ferry_device *dev, const char *peer_endpoint, unsigned *local, unsigned *peer,
			    struct ferry_err *err);
};

/* Driver registry. */
const struct ferry_driver_ops *ferry_driver_find(const char *name);
/* Names of built drivers, best first ("rdma", "dpdk", "tcp"), NULL-terminated. */
const char *const *ferry_driver_names(void);

/* Option list helper for drivers: value of "key=..." or NULL. */
const char *ferry_driver_option(const struct ferry_driver_config *cfg, const char *key);
/* After open with cfg->seen: 0, or -EINVAL naming the first of the first n
 * options that is not "key=value" or that the driver (named for the
 * message) never read. */
int ferry_driver_options_check(const struct ferry_driver_config *cfg, unsigned n, const char *driver,
			       struct ferry_err *err);

#endif
