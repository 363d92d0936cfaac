#include "tcp.h"
#include "../hostport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TXQ_DEPTH 64
#define TXQ_MAX_IOV 4
#define COMPLETION_DEPTH TXQ_DEPTH

struct ferry_device {
	int listen_fd;
	char endpoint[FERRY_ENDPOINT_MAX];
};

struct tx_entry {
	uint8_t hdr[FERRY_WIRE_HDR_LEN];
	struct iovec iov[TXQ_MAX_IOV];
	unsigned iovcnt;
	int pipe_fd;         /* >= 0: payload is spliced from this pipe */
	size_t hdr_sent;
	size_t payload_len;
	size_t payload_sent;
	void *cookie;
};

struct ferry_lane_drv {
	int fd;
	/* tx ring: frames taken by tx_burst/tx_splice, not yet fully written */
	struct tx_entry txq[TXQ_DEPTH];
	unsigned tx_head, tx_count;
	void *done[COMPLETION_DEPTH];
	unsigned done_head, done_count;
	/* rx: header being assembled, then a payload the caller consumes */
	uint8_t rx_hdr[FERRY_WIRE_HDR_LEN];
	size_t rx_hdr_got;
	size_t rx_pending;   /* payload bytes of the current frame still on the wire */
	uint8_t ctrl[FERRY_WIRE_MAX_CTRL];
	size_t ctrl_got;
	struct ferry_frame_hdr cur;
};

static int resolve(const char *hostport, bool passive, struct addrinfo **res, struct ferry_err *err)
{
	/* Port 0 binds any free port; nothing listens there to connect to. */
	struct ferry_hostport hp;
	if (ferry_parse_hostport(hostport, passive ? FERRY_HP_PORT0 : 0, &hp, err))
		return ferry_err_prefix(err, "tcp address");
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
	if (passive)
		hints.ai_flags |= AI_PASSIVE;
	int g = getaddrinfo(hp.host, hp.port, &hints, res);
	if (g)
		return ferry_err_set(err, EHOSTUNREACH, "cannot resolve '%s': %s", hostport, gai_strerror(g));
	return 0;
}

static void tune_socket(int fd)
{
	int one = 1;
	/* Frames are written whole (header + payload); Nagle would only delay
	 * the small control frames (credits) that the peer is waiting for. */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* A lane whose peer host vanished (no FIN, no RST) must fail, not hang:
	 * probes when idle, and give up on data unacknowledged for 60 s (long
	 * enough for a destination that is slow to take its RAM). */
	int idle = 10, intvl = 5, cnt = 3;
	unsigned user_timeout_ms = 60000;
	(void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

static int tcp_open(const struct ferry_driver_config *cfg, struct ferry_device **out,
		    struct ferry_err *err)
{
	const char *bind_addr = ferry_driver_option(cfg, "bind");
	struct addrinfo *res = NULL;
	int rc = resolve(bind_addr ? bind_addr : "127.0.0.1:0", true, &res, err);
	if (rc)
		return ferry_err_prefix(err, "tcp driver");

	struct ferry_device *dev = calloc(1, sizeof(*dev));
	if (!dev) {
		freeaddrinfo(res);
		return ferry_err_set(err, ENOMEM, "tcp driver: out of memory");
	}
	dev->listen_fd = -1;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0)
			continue;
		int one = 1;
		(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
			dev->listen_fd = fd;
			break;
		}
		ferry_err_set(err, errno, "tcp driver: cannot listen on %s: %s",
			      bind_addr ? bind_addr : "127.0.0.1:0", strerror(errno));
		close(fd);
	}
	freeaddrinfo(res);
	if (dev->listen_fd < 0) {
		free(dev);
		return ferry_err_set(err, EADDRNOTAVAIL, "tcp driver: no usable address");
	}
	ferry_err_clear(err);

	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[INET6_ADDRSTRLEN], port[16];
	if (getsockname(dev->listen_fd, (struct sockaddr *)&ss, &sl) ||
	    getnameinfo((struct sockaddr *)&ss, sl, host, sizeof(host), port, sizeof(port),
			NI_NUMERICHOST | NI_NUMERICSERV)) {
		rc = ferry_err_set(err, errno ? errno : EIO, "tcp driver: cannot read the bound address");
		close(dev->listen_fd);
		free(dev);
		return rc;
	}
	if (ss.ss_family == AF_INET6)
		snprintf(dev->endpoint, sizeof(dev->endpoint), "tcp:[%s]:%s", host, port);
	else
		snprintf(dev->endpoint, sizeof(dev->endpoint), "tcp:%s:%s", host, port);
	*out = dev;
	return 0;
}

static void tcp_close(struct ferry_device *dev)
{
	if (!dev)
		return;
	if (dev->listen_fd >= 0)
		close(dev->listen_fd);
	free(dev);
}

static int tcp_local_endpoint(struct ferry_device *dev, char *buf, size_t len, struct ferry_err *err)
{
	if (strlen(dev->endpoint) >= len)
		return ferry_err_set(err, ENOSPC, "endpoint buffer too small");
	strcpy(buf, dev->endpoint);
	return 0;
}

static int tcp_listen_fd(struct ferry_device *dev)
{
	return dev->listen_fd;
}

static struct ferry_lane_drv *lane_new(int fd, struct ferry_err *err)
{
	struct ferry_lane_drv *lane = calloc(1, sizeof(*lane));
	if (!lane) {
		ferry_err_set(err, ENOMEM, "tcp lane: out of memory");
		return NULL;
	}
	lane->fd = fd;
	tune_socket(fd);
	return lane;
}

static int tcp_lane_accept(struct ferry_device *dev, struct ferry_lane_drv **out, struct ferry_err *err)
{
	int fd = accept4(dev->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
			return -EAGAIN;
		return ferry_err_set(err, errno, "tcp accept: %s", strerror(errno));
	}
	*out = lane_new(fd, err);
	if (!*out) {
		close(fd);
		return -ENOMEM;
	}
	return 0;
}

static int tcp_lane_connect(struct ferry_device *dev, const char *peer, unsigned index, int timeout_ms,
			    struct ferry_lane_drv **out, struct ferry_err *err)
{
	if (strncmp(peer, "tcp:", 4) != 0)
		return ferry_err_set(err, EINVAL, "tcp driver cannot reach endpoint '%s' (want tcp:HOST:PORT)", peer);
	struct addrinfo *res = NULL;
	int rc = resolve(peer + 4, false, &res, err);
	if (rc)
		return rc;
	int fd = -1;
	rc = -EHOSTUNREACH;
	for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			rc = ferry_err_set(err, errno, "tcp lane %u: socket: %s", index, strerror(errno));
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			break;
		if (errno == EINPROGRESS) {
			struct pollfd p = { .fd = fd, .events = POLLOUT };
			int pr;
			do {
				pr = poll(&p, 1, timeout_ms);
			} while (pr < 0 && errno == EINTR);
			int soerr = 0;
			socklen_t sl = sizeof(soerr);
			if (pr == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
				break;
			if (pr == 0)
				rc = ferry_err_set(err, ETIMEDOUT, "tcp lane %u: connecting to %s timed out after %d ms",
						   index, peer, timeout_ms);
			else
				rc = ferry_err_set(err, soerr ? soerr : errno, "tcp lane %u: cannot connect to %s: %s",
						   index, peer, strerror(soerr ? soerr : errno));
		} else {
			rc = ferry_err_set(err, errno, "tcp lane %u: cannot connect to %s: %s", index, peer,
					   strerror(errno));
		}
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return rc;
	*out = lane_new(fd, err);
	if (!*out) {
		close(fd);
		return -ENOMEM;
	}
	return 0;
}

static void tcp_lane_close(struct ferry_lane_drv *lane)
{
	if (!lane)
		return;
	close(lane->fd);
	free(lane);
}

static int tcp_mem_register(struct ferry_device *dev, void *addr, size_t len, struct ferry_mr *mr,
			    struct ferry_err *err)
{
	/* The kernel copies from any memory: registration is bookkeeping only. */
	mr->addr = addr;
	mr->len = len;
	mr->rkey = 0;
	mr->drv = NULL;
	return 0;
}

static void tcp_mem_deregister(struct ferry_device *dev, struct ferry_mr *mr)
{
}

static void complete(struct ferry_lane_drv *lane, void *cookie)
{
	if (!cookie)
		return;
	/* The completion ring is as deep as the tx ring, so it cannot overflow
	 * as long as callers poll completions before queueing more. */
	unsigned slot = (lane->done_head + lane->done_count) % COMPLETION_DEPTH;
	lane->done[slot] = cookie;
	lane->done_count++;
}

static unsigned tx_room(const struct ferry_lane_drv *lane)
{
	/* Keep room in the completion ring for everything queued. */
	unsigned used = lane->tx_count + lane->done_count;
	return used >= TXQ_DEPTH ? 0 : TXQ_DEPTH - used;
}

static int tcp_tx_burst(struct ferry_lane_drv *lane, const struct ferry_tx_frame *frames, unsigned n,
			struct ferry_err *err)
{
	unsigned taken = 0;
	while (taken < n && tx_room(lane) > 0) {
		const struct ferry_tx_frame *f = &frames[taken];
		if (f->iovcnt > TXQ_MAX_IOV)
			return ferry_err_set(err, EINVAL, "tcp tx: %u payload pieces, at most %d", f->iovcnt, TXQ_MAX_IOV);
		size_t total = 0;
		for (unsigned i = 0; i < f->iovcnt; i++)
			total += f->iov[i].iov_len;
		if (total != f->hdr.length)
			return ferry_err_set(err, EINVAL, "tcp tx: payload %zu bytes but header says %u", total,
					     f->hdr.length);
		struct tx_entry *e = &lane->txq[(lane->tx_head + lane->tx_count) % TXQ_DEPTH];
		memset(e, 0, sizeof(*e));
		ferry_wire_encode(&f->hdr, NULL, e->hdr);
		if (f->iovcnt)
			memcpy(e->iov, f->iov, f->iovcnt * sizeof(struct iovec));
		e->iovcnt = f->iovcnt;
		e->pipe_fd = -1;
		e->payload_len = total;
		e->cookie = f->cookie;
		lane->tx_count++;
		taken++;
	}
	return (int)taken;
}

static int tcp_tx_splice(struct ferry_lane_drv *lane, const struct ferry_frame_hdr *hdr, int pipe_fd,
			 struct ferry_err *err)
{
	if (tx_room(lane) == 0)
		return -EAGAIN;
	struct tx_entry *e = &lane->txq[(lane->tx_head + lane->tx_count) % TXQ_DEPTH];
	memset(e, 0, sizeof(*e));
	ferry_wire_encode(hdr, NULL, e->hdr);
	e->pipe_fd = pipe_fd;
	e->payload_len = hdr->length;
	lane->tx_count++;
	return 0;
}

static int sock_fail(struct ferry_err *err, const char *what, int e)
{
	if (e == EPIPE || e == ECONNRESET)
		return ferry_err_set(err, ECONNRESET, "tcp %s: peer closed the lane", what);
	return ferry_err_set(err, e, "tcp %s: %s", what, strerror(e));
}

/* Write as many iov-backed frames as possible with one writev. */
static int flush_iov_run(struct ferry_lane_drv *lane, struct ferry_err *err)
{
	struct iovec v[64];
	unsigned nv = 0;
	for (unsigned k = 0; k < lane->tx_count && nv + TXQ_MAX_IOV + 1 <= 64; k++) {
		struct tx_entry *e = &lane->txq[(lane->tx_head + k) % TXQ_DEPTH];
		if (e->pipe_fd >= 0)
			break;
		if (e->hdr_sent < FERRY_WIRE_HDR_LEN) {
			v[nv].iov_base = e->hdr + e->hdr_sent;
			v[nv].iov_len = FERRY_WIRE_HDR_LEN - e->hdr_sent;
			nv++;
		}
		size_t skip = e->payload_sent;
		for (unsigned i = 0; i < e->iovcnt; i++) {
			size_t l = e->iov[i].iov_len;
			if (skip >= l) {
				skip -= l;
				continue;
			}
			v[nv].iov_base = (char *)e->iov[i].iov_base + skip;
			v[nv].iov_len = l - skip;
			skip = 0;
			nv++;
		}
	}
	if (nv == 0)
		return 0;
	struct msghdr mh = { .msg_iov = v, .msg_iovlen = nv };
	ssize_t w = sendmsg(lane->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (w < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return -EAGAIN;
		return sock_fail(err, "send", errno);
	}
	size_t left = (size_t)w;
	while (lane->tx_count > 0) {
		struct tx_entry *e = &lane->txq[lane->tx_head];
		if (e->pipe_fd >= 0)
			break;
		size_t h = FERRY_WIRE_HDR_LEN - e->hdr_sent;
		size_t take = left < h ? left : h;
		e->hdr_sent += take;
		left -= take;
		size_t p = e->payload_len - e->payload_sent;
		take = left < p ? left : p;
		e->payload_sent += take;
		left -= take;
		if (e->hdr_sent < FERRY_WIRE_HDR_LEN || e->payload_sent < e->payload_len)
			break;
		complete(lane, e->cookie);
		lane->tx_head = (lane->tx_head + 1) % TXQ_DEPTH;
		lane->tx_count--;
	}
	return 0;
}

static int flush_splice_head(struct ferry_lane_drv *lane, struct ferry_err *err)
{
	struct tx_entry *e = &lane->txq[lane->tx_head];
	while (e->hdr_sent < FERRY_WIRE_HDR_LEN) {
		ssize_t w = send(lane->fd, e->hdr + e->hdr_sent, FERRY_WIRE_HDR_LEN - e->hdr_sent,
				 MSG_NOSIGNAL | MSG_DONTWAIT | MSG_MORE);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return -EAGAIN;
			return sock_fail(err, "send", errno);
		}
		e->hdr_sent += (size_t)w;
	}
	while (e->payload_sent < e->payload_len) {
		/* No SPLICE_F_MORE: it corks the frame's tail for up to 200 ms
		 * when the stream then goes quiet (QEMU waiting on a sync). */
		ssize_t w = splice(e->pipe_fd, NULL, lane->fd, NULL, e->payload_len - e->payload_sent,
				   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return -EAGAIN;
			return sock_fail(err, "splice", errno);
		}
		if (w == 0)
			return ferry_err_set(err, EPIPE, "tcp splice: the payload pipe ran dry (%zu of %zu bytes)",
					     e->payload_sent, e->payload_len);
		e->payload_sent += (size_t)w;
	}
	complete(lane, e->cookie);
	lane->tx_head = (lane->tx_head + 1) % TXQ_DEPTH;
	lane->tx_count--;
	return 0;
}

static int tcp_tx_flush(struct ferry_lane_drv *lane, struct ferry_err *err)
{
	while (lane->tx_count > 0) {
		struct tx_entry *e = &lane->txq[lane->tx_head];
		unsigned before = lane->tx_count;
		size_t sent_before = e->hdr_sent + e->payload_sent;
		int rc = e->pipe_fd >= 0 ? flush_splice_head(lane, err) : flush_iov_run(lane, err);
		if (rc)
			return rc;
		if (lane->tx_count == before && e->hdr_sent + e->payload_sent == sent_before)
			return -EAGAIN;
	}
	return 0;
}

static int tcp_poll_completions(struct ferry_lane_drv *lane, void **cookies, unsigned n)
{
	unsigned k = 0;
	while (k < n && lane->done_count > 0) {
		cookies[k++] = lane->done[lane->done_head];
		lane->done_head = (lane->done_head + 1) % COMPLETION_DEPTH;
		lane->done_count--;
	}
	return (int)k;
}

static int rx_fail_closed(struct ferry_lane_drv *lane, struct ferry_err *err)
{
	if (lane->rx_hdr_got > 0)
		return ferry_err_set(err, ECONNRESET, "tcp rx: truncated frame header (%zu of %d bytes) before the peer closed",
				     lane->rx_hdr_got, FERRY_WIRE_HDR_LEN);
	return ferry_err_set(err, ECONNRESET, "tcp rx: peer closed the lane");
}

static bool payload_goes_to_caller(const struct ferry_frame_hdr *h)
{
	return h->type == FERRY_FT_DATA || h->type == FERRY_FT_REGION_WRITE;
}

static int tcp_rx_burst(struct ferry_lane_drv *lane, struct ferry_rx_frame *frames, unsigned n,
			struct ferry_err *err)
{
	unsigned got = 0;
	if (lane->rx_pending > 0 && lane->ctrl_got == 0 && payload_goes_to_caller(&lane->cur))
		return 0; /* caller still owes the payload of the last frame */
	while (got < n) {
		if (lane->rx_hdr_got < FERRY_WIRE_HDR_LEN) {
			ssize_t r = recv(lane->fd, lane->rx_hdr + lane->rx_hdr_got,
					 FERRY_WIRE_HDR_LEN - lane->rx_hdr_got, MSG_DONTWAIT);
			if (r == 0)
				return got ? (int)got : rx_fail_closed(lane, err);
			if (r < 0) {
				if (errno == EAGAIN || errno == EINTR)
					break;
				return sock_fail(err, "recv", errno);
			}
			lane->rx_hdr_got += (size_t)r;
			if (lane->rx_hdr_got < FERRY_WIRE_HDR_LEN)
				break;
			int rc = ferry_wire_decode(lane->rx_hdr, &lane->cur, err);
			if (rc)
				return rc;
			/* TCP already checks integrity; a frame asking for a payload
			 * checksum here is not one this driver would verify. */
			if (lane->cur.flags & FERRY_FF_PAYLOAD_CRC)
				return ferry_err_set(err, EPROTO, "%s frame asks for a payload checksum, which tcp lanes do not carry",
						     ferry_wire_type_name(lane->cur.type));
			lane->rx_pending = lane->cur.length;
			lane->ctrl_got = 0;
		}
		struct ferry_rx_frame *f = &frames[got];
		f->hdr = lane->cur;
		f->drv = NULL;
		if (payload_goes_to_caller(&lane->cur)) {
			f->payload = NULL;
			f->pending = true;
			lane->rx_hdr_got = 0;
			got++;
			break; /* the caller consumes the payload before the next header */
		}
		/* small control payload: gather it here */
		while (lane->rx_pending > 0) {
			ssize_t r = recv(lane->fd, lane->ctrl + lane->ctrl_got, lane->rx_pending, MSG_DONTWAIT);
			if (r == 0)
				return ferry_err_set(err, ECONNRESET, "tcp rx: truncated %s frame (%zu payload bytes missing)",
						     ferry_wire_type_name(lane->cur.type), lane->rx_pending);
			if (r < 0) {
				if (errno == EAGAIN || errno == EINTR)
					return (int)got;
				return sock_fail(err, "recv", errno);
			}
			lane->ctrl_got += (size_t)r;
			lane->rx_pending -= (size_t)r;
		}
		/* The payload stays valid until the next rx_burst: control frames
		 * are handled before the lane reads again. Only one control frame
		 * per call for that reason. */
		f->payload = lane->ctrl;
		f->pending = false;
		lane->rx_hdr_got = 0;
		lane->ctrl_got = 0;
		got++;
		break;
	}
	return (int)got;
}

static ssize_t payload_fail(struct ferry_lane_drv *lane, ssize_t r, struct ferry_err *err)
{
	if (r == 0)
		return ferry_err_set(err, ECONNRESET, "tcp rx: truncated %s frame, peer closed with %zu payload bytes missing",
				     ferry_wire_type_name(lane->cur.type), lane->rx_pending);
	if (errno == EAGAIN || errno == EINTR)
		return 0;
	return sock_fail(err, "recv", errno);
}

/* A lane carries data one way and credits the other, which the kernel takes
 * for an interactive exchange ("pingpong" mode) and answers with delayed
 * ACKs: the sender then waits on them. Re-armed after each payload read
 * (the mode comes back with the next credit): regions 1 lane 4.2 -> 5.1
 * GB/s in perf/bench-dataplane.sh. */
static void ack_promptly(struct ferry_lane_drv *lane)
{
	(void)setsockopt(lane->fd, IPPROTO_TCP, TCP_QUICKACK, &(int){ 1 }, sizeof(int));
}

static ssize_t tcp_rx_payload(struct ferry_lane_drv *lane, void *dst, size_t len, struct ferry_err *err)
{
	if (len > lane->rx_pending)
		len = lane->rx_pending;
	if (len == 0)
		return 0;
	ssize_t r = recv(lane->fd, dst, len, MSG_DONTWAIT);
	if (r <= 0)
		return payload_fail(lane, r, err);
	lane->rx_pending -= (size_t)r;
	ack_promptly(lane);
	return r;
}

static ssize_t tcp_rx_splice(struct ferry_lane_drv *lane, int pipe_fd, size_t len, struct ferry_err *err)
{
	if (len > lane->rx_pending)
		len = lane->rx_pending;
	if (len == 0)
		return 0;
	ssize_t r = splice(lane->fd, NULL, pipe_fd, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	if (r < 0 && errno == EAGAIN) {
		/* EAGAIN means either the socket is empty or the pipe is full;
		 * both are "try later". */
		return 0;
	}
	if (r <= 0)
		return payload_fail(lane, r, err);
	lane->rx_pending -= (size_t)r;
	ack_promptly(lane);
	return r;
}

static void tcp_rx_release(struct ferry_lane_drv *lane, struct ferry_rx_frame *frames, unsigned n)
{
}

static int tcp_lane_detach_fd(struct ferry_lane_drv *lane, struct ferry_err *err)
{
	if (lane->tx_count > 0 || lane->rx_hdr_got > 0 || lane->rx_pending > 0)
		return ferry_err_set(err, EBUSY, "tcp lane still has frames in flight; cannot hand it over");
	int fd = lane->fd;
	/* QEMU expects a blocking socket it drives itself, with the options
	 * of one it made: Nagle on (its migration stream is many small
	 * headers between pages, which it leaves to the kernel to merge). */
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
		return ferry_err_set(err, errno, "tcp lane: cannot make the socket blocking: %s", strerror(errno));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 0 }, sizeof(int));
	/* Our HELLO exchange (data each way in quick succession) left the
	 * socket in the kernel's interactive "pingpong" mode, which delays
	 * ACKs; QEMU's one-way stream then ran 10-30 % slower than on a fresh
	 * connection (perf/bench-migrate.sh, docs/performance.md). */
	ack_promptly(lane);
	free(lane);
	return fd;
}

static int tcp_wakeup_fd(struct ferry_lane_drv *lane, short *events, bool want_tx)
{
	*events = POLLIN;
	if (want_tx || lane->tx_count > 0)
		*events |= POLLOUT;
	return lane->fd;
}

const struct ferry_driver_ops ferry_tcp_driver = {
	.name = "tcp",
	.caps = FERRY_DRV_RELIABLE | FERRY_DRV_SPLICE | FERRY_DRV_HANDOFF,
	.open = tcp_open,
	.close = tcp_close,
	.local_endpoint = tcp_local_endpoint,
	.listen_fd = tcp_listen_fd,
	.lane_accept = tcp_lane_accept,
	.lane_connect = tcp_lane_connect,
	.lane_close = tcp_lane_close,
	.mem_register = tcp_mem_register,
	.mem_deregister = tcp_mem_deregister,
	.tx_burst = tcp_tx_burst,
	.tx_flush = tcp_tx_flush,
	.poll_completions = tcp_poll_completions,
	.rx_burst = tcp_rx_burst,
	.rx_payload = tcp_rx_payload,
	.rx_release = tcp_rx_release,
	.tx_splice = tcp_tx_splice,
	.rx_splice = tcp_rx_splice,
	.lane_detach_fd = tcp_lane_detach_fd,
	.wakeup_fd = tcp_wakeup_fd,
};
