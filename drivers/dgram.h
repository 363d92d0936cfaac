/* Datagram backends: the unreliable half of a datagram driver.
 *
 * A backend moves datagrams (one UDP payload each) between queues of two
 * devices and nothing more: no ordering, no delivery guarantee. The data
 * plane's shim (dataplane/rldrv.h) puts a reliable lane (dataplane/reliable.h)
 * on top and presents the result through the ordinary driver ops table, so a
 * backend only has to be a fast packet pipe: kernel UDP sockets (drivers/udp)
 * or a DPDK port (drivers/dpdk).
 *
 * A device has a fixed number of queues, 0..queues-1. Each queue has its own
 * local address (a UDP port), and a datagram sent to a peer's queue q address
 * arrives at the peer's queue q (steering by port; on a point-to-point link
 * such as memif, also by queue index: senders use the same index on both
 * ends). Threading: the receive functions of one queue (recv, release) are
 * never called concurrently with each other, nor the send functions (send,
 * flush) with each other; a queue's receive and send sides may run at the
 * same time in two threads, and different queues are independent. Device
 * functions (open, close, local_endpoint, resolve, ...) are thread safe. */
#ifndef FERRY_DGRAM_H
#define FERRY_DGRAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "driver.h"
#include "err.h"

#define FERRY_DGRAM_ADDR_MAX 30

/* Where a datagram goes or came from, in the backend's own encoding (a
 * sockaddr, or MAC + IPv4 + port). Two addresses are the same peer queue
 * when len and the first len bytes of b are equal. */
struct ferry_dgram_addr {
	uint8_t len;
	uint8_t b[FERRY_DGRAM_ADDR_MAX];
};

/* A received datagram: data is backend memory, valid until release. */
struct ferry_dgram_buf {
	const uint8_t *data;
	size_t len;
	struct ferry_dgram_addr src;
	void *priv;   /* backend private (an mbuf) */
};

struct ferry_dgram_dev;

struct ferry_dgram_ops {
	const char *name;   /* also the endpoint's scheme: "udp" -> "udp:..." */

	/* Options are the driver options of the daemon ("bind=HOST:PORT",
	 * "queues=N", backend specific ones); unknown keys are ignored (the
	 * shim reads its own from the same list). */
	int (*open)(const struct ferry_driver_config *cfg, struct ferry_dgram_dev **out, struct ferry_err *err);
	void (*close)(struct ferry_dgram_dev *dev);
	/* "udp:127.0.0.1:40000-40003": everything a peer needs to reach every queue. */
	int (*local_endpoint)(struct ferry_dgram_dev *dev, char *buf, size_t len, struct ferry_err *err);
	unsigned (*queues)(const struct ferry_dgram_dev *dev);
	/* Largest datagram payload (bytes) a send may carry, both ends alike. */
	size_t (*max_datagram)(const struct ferry_dgram_dev *dev);

	/* The address of queue 'queue' of the peer described by endpoint (what
	 * the peer's local_endpoint said); *peer_queues gets how many queues it
	 * has. -ERANGE (with *peer_queues set) when queue is beyond them. */
	int (*resolve)(struct ferry_dgram_dev *dev, const char *endpoint, unsigned queue,
		       struct ferry_dgram_addr *out, unsigned *peer_queues, struct ferry_err *err);
	/* Printable form of an address, for messages. */
	void (*addr_str)(const struct ferry_dgram_addr *a, char *buf, size_t len);

	/* Send one datagram (iov pieces, len bytes in all, at most max_datagram)
	 * from queue q. The bytes are copied or sent before it returns; the
	 * backend may hold datagrams until flush to send them in a batch.
	 * Returns 0 (taken), -EAGAIN (queue full: flush, retry later) or
	 * another negative errno (the queue failed). */
	int (*send)(struct ferry_dgram_dev *dev, unsigned q, const struct ferry_dgram_addr *to,
		    const struct iovec *iov, unsigned iovcnt, size_t len, struct ferry_err *err);
	/* Optional (NULL: send only). As send, but the backend may keep a
	 * reference to the last piece instead of copying it, until the PMD has
	 * read it: the caller keeps those bytes unchanged until tx_refs says
	 * no datagram of the queue refers to memory any more. Returns 1 when it
	 * referenced the piece, 0 when it copied, else as send. */
	int (*send_ref)(struct ferry_dgram_dev *dev, unsigned q, const struct ferry_dgram_addr *to,
			const struct iovec *iov, unsigned iovcnt, size_t len, struct ferry_err *err);
	/* With send_ref: datagrams of queue q still referring to caller memory
	 * (held for flush or not yet read by the PMD). Called under the queue's
	 * send side. */
	unsigned (*tx_refs)(struct ferry_dgram_dev *dev, unsigned q);
	/* With send_ref: drop the datagrams held for flush (a lane closing on a
	 * wire nobody reads, before its payloads are freed). */
	void (*tx_discard)(struct ferry_dgram_dev *dev, unsigned q);
	/* Push out held datagrams: 0 when none is left, -EAGAIN when the wire is full. */
	int (*flush)(struct ferry_dgram_dev *dev, unsigned q, struct ferry_err *err);

	/* Up to n received datagrams of queue q (0 when none), negative on failure. */
	int (*recv)(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n,
		    struct ferry_err *err);
	/* Give back what recv returned (all of one recv before the next recv). */
	void (*release)(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n);
	/* Optional (NULL: every buffer goes back through release before the
	 * next recv). True when the caller may keep buffers of the recv that
	 * follows past later recvs and give each back by release_held; false
	 * when the backend is short of buffers (the caller copies instead), so
	 * that held buffers never starve the queue's receive ring. Called under
	 * the queue's receive side, once per recv. */
	bool (*may_hold)(struct ferry_dgram_dev *dev, unsigned q);
	/* With may_hold: give back one kept buffer (its priv), exactly once,
	 * from any thread (not necessarily the queue's receive side). */
	void (*release_held)(struct ferry_dgram_dev *dev, void *priv);

	/* An fd readable when queue q may have datagrams to receive, with
	 * *events for poll(); -1 when the backend has none (busy polling only:
	 * the caller wakes up on a timer). With want_tx, also POLLOUT when a
	 * full send side may progress. */
	int (*wakeup_fd)(struct ferry_dgram_dev *dev, unsigned q, bool want_tx, short *events);
};

/* Registry of built datagram backends ("udp", "dpdk"); NULL if none. */
const struct ferry_dgram_ops *ferry_dgram_find(const char *name);

/* Helpers for backends parsing options: "key=N" as an unsigned within
 * [min, max], or def when absent. */
int ferry_dgram_opt_uint(const struct ferry_driver_config *cfg, const char *key, unsigned long def,
			 unsigned long min, unsigned long max, unsigned long *out, struct ferry_err *err);

#endif
