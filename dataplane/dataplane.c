#include "dataplane.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../drivers/driver.h"
#include "../drivers/wire.h"
#include "credit.h"
#include "rldrv.h"

#define DEFAULT_WINDOW   (4u << 20)
#define DEFAULT_SPIN_US  50
#define PIPE_BYTES       (1u << 20)
#define LOCAL_SNDBUF     (2 << 20)
#define TX_CHUNKS        4
/* Verbs drivers send from the chunks themselves (no copy), so a chunk is busy
 * until the peer acknowledged it: more of them keep a window's worth in flight. */
#define TX_CHUNKS_VERBS  16
#define TX_CHUNK_BYTES   (256u << 10)
#define YIELDS_BEFORE_SLEEP 8
#define MAX_REGIONS      8
#define REGION_FRAME     (1u << 20)
#define REGION_JOBS      64
#define HELLO_TIMEOUT_MS 5000
#define HELLO_TIMEOUT_TEXT "5000 ms"
#define PENDING_LANES    64
/* rx_peek: iovecs per look (a datagram driver lends a segment per iovec) */
#define PEEK_IOV         64

struct region {
	uint32_t id;
	uint8_t *base;
	size_t len;
	struct ferry_mr mr;
	uint8_t key_msg[FERRY_WIRE_REGION_KEY_LEN]; /* one-sided drivers: REGION_KEY payload (rkey, len) */
	bool used;
};

/* Source, one-sided drivers: a destination region as its REGION_KEY told. */
struct peer_region {
	uint32_t id;
	uint64_t addr, rkey, len;
	bool known;
};

struct chunk {
	uint8_t *buf;
	struct ferry_mr mr;   /* one-sided (verbs) drivers: registered once, sent from without a copy */
	bool busy;      /* framed, waiting for the driver's completion */
	size_t held;    /* read from the local socket, not framed yet (wire was full) */
};

struct stream {
	uint32_t id;
	int fd;                    /* local unix socket */
	struct lane *lane;
	bool open_sent;            /* source: OPEN queued */
	bool open_ack_due;         /* destination: OPEN_ACK to send */
	bool open_acked;           /* source: the peer connected this stream */
	/* local -> wire */
	struct ferry_credit_tx txc;
	uint64_t tx_off;
	size_t unframed;           /* splice path: bytes in txp not yet given to the driver */
	bool local_eof;
	bool fin_sent;
	int txp[2];
	struct chunk chunks[TX_CHUNKS_VERBS];
	unsigned nchunks;
	/* wire -> local */
	struct ferry_credit_rx rxc;
	uint64_t rx_off;
	int rxp[2];
	size_t rxp_bytes;
	uint8_t *ring;             /* copy path: window-sized ring */
	size_t ring_head, ring_len;
	bool fin_rcvd;
	bool shut_wr;
	bool reset_due;            /* tell the peer this stream's local end failed */
	bool closed;
};

struct region_job {
	struct region *r;
	uint64_t off;
	size_t len;
};

struct lane {
	struct ferry_session *s;
	unsigned index;
	struct ferry_lane_drv *drv;
	pthread_t thread;
	bool thread_started;
	int evfd;
	struct stream *streams[FERRY_MAX_STREAMS];
	unsigned nstreams;
	bool tx_blocked;
	/* rx: payload of the current frame still to consume */
	struct stream *rx_stream;
	struct region *rx_region;
	uint64_t rx_region_off;
	size_t rx_left;
	/* guarded by lock */
	pthread_mutex_t lock;
	struct stream *inbox[FERRY_MAX_STREAMS];
	unsigned ninbox;
	struct region_job jobs[REGION_JOBS];
	unsigned job_head, job_count;
	struct peer_region peer_regions[MAX_REGIONS]; /* source: written by this lane's thread only */
	bool key_sent[MAX_REGIONS];                    /* destination: REGION_KEY sent for regions[i] */
	uint64_t fence_req;        /* source: fence token to send after queued work */
	uint64_t fence_sent;
	uint64_t fence_acked;      /* source: last token the peer acknowledged */
	uint64_t fence_ack_due;    /* destination: token to acknowledge */
	uint64_t fence_ack_sent;
	/* stats (written by the lane thread, read with atomics) */
	uint64_t tx_bytes, rx_bytes, tx_frames, rx_frames;
	uint64_t rx_direct_bytes;
	uint64_t idle_ns;
	uint64_t start_ns;
};

struct ferry_session {
	struct ferry_dp *dp;
	struct ferry_session *next;
	bool is_src;
	uint32_t id;
	uint8_t token[FERRY_TOKEN_LEN];
	unsigned nlanes;
	unsigned max_streams;
	char lanes_note[128];      /* why fewer lanes than asked for ("" if none) */
	uint64_t window;
	int timeout_ms;
	bool handoff;
	char unix_path[108];
	struct lane lanes[FERRY_MAX_LANES];
	struct region regions[MAX_REGIONS];

	pthread_mutex_t lock;
	pthread_cond_t cond;
	enum ferry_session_state state;
	unsigned lanes_up;
	unsigned next_connect;     /* destination: streams connected so far, in order */
	unsigned streams_opened, streams_closed;
	unsigned streams_acked;    /* source: streams the peer has connected (OPEN_ACK) */
	unsigned streams_refused;  /* source: connections beyond max_streams, closed at once */
	bool stop;
	bool tell_peer;
	char error[FERRY_ERR_MSG_MAX];
	uint64_t fence_token;

	/* source: accepts QEMU's connections on unix_path */
	int listen_fd;
	int acc_evfd;
	pthread_t acceptor;
	bool acceptor_started;
	unsigned accepted;
};

struct ferry_dp {
	const struct ferry_driver_ops *ops;
	bool rl;                            /* a datagram backend under the reliable-lane shim */
	struct ferry_driver_ops rl_ops;     /* ... whose ops table ops points at */
	struct ferry_device *dev;
	enum ferry_poll_mode poll_mode;
	uint64_t spin_ns;
	bool splice;
	bool onesided;                      /* regions go by write_remote, not REGION_WRITE frames */
	bool peek;                          /* stream payload goes from the driver's memory to the socket */
	uint64_t window;
	pthread_mutex_t lock;
	struct ferry_session *sessions;
	pthread_t acceptor;
	int stop_evfd;
	uint64_t rejected;
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void wake(int evfd)
{
	uint64_t one = 1;
	ssize_t w = write(evfd, &one, sizeof(one));
	(void)w; /* a full eventfd counter still wakes the reader */
}

static void drain_evfd(int evfd)
{
	uint64_t v;
	ssize_t r = read(evfd, &v, sizeof(v));
	(void)r;
}

static void deadline_ts(struct timespec *ts, int timeout_ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += timeout_ms / 1000;
	ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

/* ---- session failure ---------------------------------------------------- */

static void session_fail(struct ferry_session *s, bool tell_peer, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void session_fail(struct ferry_session *s, bool tell_peer, const char *fmt, ...)
{
	pthread_mutex_lock(&s->lock);
	if (s->state != FERRY_SESSION_FAILED && s->state != FERRY_SESSION_CLOSED) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(s->error, sizeof(s->error), fmt, ap);
		va_end(ap);
		s->state = FERRY_SESSION_FAILED;
		s->tell_peer = tell_peer;
	}
	s->stop = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	for (unsigned i = 0; i < s->nlanes; i++)
		if (s->lanes[i].evfd >= 0)
			wake(s->lanes[i].evfd);
	if (s->acc_evfd >= 0)
		wake(s->acc_evfd);
}

static bool session_stopping(struct ferry_session *s)
{
	return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE);
}

/* ---- streams ------------------------------------------------------------ */

static void close_pipe(int p[2])
{
	if (p[0] >= 0)
		close(p[0]);
	if (p[1] >= 0)
		close(p[1]);
	p[0] = p[1] = -1;
}

static int make_pipe(int p[2], struct ferry_err *err)
{
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK))
		return ferry_err_set(err, errno, "pipe: %s", strerror(errno));
	/* A large pipe lets one splice move up to a whole frame. Best effort:
	 * an unprivileged daemon may be capped lower by pipe-max-size. */
	(void)fcntl(p[1], F_SETPIPE_SZ, PIPE_BYTES);
	return 0;
}

static void stream_free(struct stream *st)
{
	if (!st)
		return;
	if (st->fd >= 0)
		close(st->fd);
	close_pipe(st->txp);
	close_pipe(st->rxp);
	for (unsigned i = 0; i < st->nchunks; i++) {
		if (st->chunks[i].mr.addr)
			st->lane->s->dp->ops->mem_deregister(st->lane->s->dp->dev, &st->chunks[i].mr);
		free(st->chunks[i].buf);
	}
	free(st->ring);
	free(st);
}

static struct stream *stream_new(struct ferry_session *s, uint32_t id, int fd, struct ferry_err *err)
{
	struct stream *st = calloc(1, sizeof(*st));
	if (!st) {
		ferry_err_set(err, ENOMEM, "stream %u: out of memory", id);
		return NULL;
	}
	st->id = id;
	st->fd = fd;
	st->txp[0] = st->txp[1] = st->rxp[0] = st->rxp[1] = -1;
	st->lane = &s->lanes[id % s->nlanes];
	ferry_credit_tx_init(&st->txc, s->window);
	ferry_credit_rx_init(&st->rxc, s->window);
	if (s->dp->splice) {
		if (make_pipe(st->txp, err) || make_pipe(st->rxp, err))
			goto fail;
	} else {
		st->nchunks = s->dp->onesided ? TX_CHUNKS_VERBS : TX_CHUNKS;
		for (unsigned i = 0; i < st->nchunks; i++) {
			st->chunks[i].buf = malloc(TX_CHUNK_BYTES);
			if (!st->chunks[i].buf)
				goto nomem;
			/* Verbs drivers send straight from registered memory: the
			 * socket's bytes are read into the buffer the NIC sends. */
			if (s->dp->onesided &&
			    s->dp->ops->mem_register(s->dp->dev, st->chunks[i].buf, TX_CHUNK_BYTES, &st->chunks[i].mr, err))
				goto fail;
		}
		st->ring = malloc(s->window);
		if (!st->ring)
			goto nomem;
	}
	/* A unix stream socket queues at most the writer's send buffer: a larger
	 * one lets each splice toward QEMU move more per call. Best effort. */
	int sndbuf = LOCAL_SNDBUF;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)))
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		ferry_err_set(err, errno, "stream %u: cannot make the socket non-blocking: %s", id, strerror(errno));
		goto fail;
	}
	return st;
nomem:
	ferry_err_set(err, ENOMEM, "stream %u: out of memory for buffers", id);
fail:
	st->fd = -1; /* the caller still owns fd on failure */
	stream_free(st);
	return NULL;
}

static struct stream *lane_stream(struct lane *l, uint32_t id)
{
	for (unsigned i = 0; i < l->nstreams; i++)
		if (l->streams[i]->id == id)
			return l->streams[i];
	return NULL;
}

static void stream_local_gone(struct lane *l, struct stream *st)
{
	/* The local peer (QEMU) went away or failed: nothing more can be
	 * delivered, so tell the far side to drop its end too. */
	if (!st->closed) {
		st->reset_due = true;
		st->local_eof = true;
		st->fin_rcvd = true;
		st->rxp_bytes = 0;
		st->ring_len = 0;
	}
}

static void stream_maybe_close(struct ferry_session *s, struct stream *st)
{
	if (st->closed)
		return;
	if (!(st->fin_sent && st->fin_rcvd && st->shut_wr))
		return;
	st->closed = true;
	if (st->fd >= 0) {
		close(st->fd);
		st->fd = -1;
	}
	pthread_mutex_lock(&s->lock);
	s->streams_closed++;
	pthread_mutex_unlock(&s->lock);
}

/* ---- destination: connecting streams in the source's order -------------- */

static int connect_unix(const char *path, int timeout_ms, struct ferry_err *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return ferry_err_set(err, ENAMETOOLONG, "unix socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ull;
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return ferry_err_set(err, errno, "socket: %s", strerror(errno));
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			return fd;
		int e = errno;
		close(fd);
		/* The destination QEMU may be a moment late to listen. */
		if ((e == ENOENT || e == ECONNREFUSED) && now_ns() < end) {
			usleep(20000);
			continue;
		}
		return ferry_err_set(err, e, "cannot connect to %s: %s", path, strerror(e));
	}
}

static int dst_open_stream(struct lane *l, uint32_t id, struct ferry_err *err)
{
	struct ferry_session *s = l->s;
	if (id >= s->max_streams)
		return ferry_err_set(err, EPROTO, "OPEN for stream %u, but the session allows %u streams", id,
				     s->max_streams);
	if (id % s->nlanes != l->index)
		return ferry_err_set(err, EPROTO, "OPEN for stream %u arrived on lane %u (expected lane %u)", id,
				     l->index, id % s->nlanes);
	if (lane_stream(l, id))
		return ferry_err_set(err, EPROTO, "OPEN for stream %u, which is already open", id);
	if (!s->unix_path[0])
		return ferry_err_set(err, EPROTO, "OPEN for stream %u on a session without streams", id);

	/* Keep the source's order: stream n connects only after 0..n-1. */
	pthread_mutex_lock(&s->lock);
	struct timespec dl;
	deadline_ts(&dl, s->timeout_ms);
	while (s->next_connect != id && !s->stop) {
		if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT) {
			pthread_mutex_unlock(&s->lock);
			return ferry_err_set(err, ETIMEDOUT, "stream %u: streams before it did not open within %d ms",
					     id, s->timeout_ms);
		}
	}
	pthread_mutex_unlock(&s->lock);
	if (session_stopping(s))
		return -ECANCELED;

	int fd = connect_unix(s->unix_path, s->timeout_ms, err);
	if (fd < 0)
		return ferry_err_prefix(err, "stream %u", id);
	struct stream *st = stream_new(s, id, fd, err);
	if (!st) {
		close(fd);
		return -ENOMEM;
	}
	st->open_sent = true;
	st->open_ack_due = true;
	l->streams[l->nstreams++] = st;
	pthread_mutex_lock(&s->lock);
	s->next_connect++;
	s->streams_opened++;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* ---- lane: receive ------------------------------------------------------ */

static ssize_t discard_payload(struct lane *l, size_t len, struct ferry_err *err)
{
	static __thread uint8_t sink[65536];
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	if (l->s->dp->peek) {
		/* Nothing to copy: take the bytes where they lie. */
		struct iovec iov[PEEK_IOV];
		int n = ops->rx_peek(l->drv, iov, PEEK_IOV, err);
		if (n <= 0)
			return n;
		size_t have = 0;
		for (int i = 0; i < n; i++)
			have += iov[i].iov_len;
		int rc = ops->rx_consume(l->drv, have, err);
		return rc ? rc : (ssize_t)have;
	}
	return ops->rx_payload(l->drv, sink, len < sizeof(sink) ? len : sizeof(sink), err);
}

/* n bytes of the current frame's payload went where they belong. */
static void rx_moved(struct lane *l, size_t n)
{
	l->rx_left -= n;
	l->rx_bytes += (uint64_t)n;
	if (l->rx_left == 0) {
		l->rx_stream = NULL;
		l->rx_region = NULL;
	}
}

/* Drivers that lend their receive memory (rx_peek): while the stream's ring
 * is empty, write the payload from there straight into the local socket, so
 * the bytes are copied once (by the kernel) instead of twice. Stops when the
 * wire has no more for now, the frame is done, or the socket took less than
 * offered (*full: the caller copies the rest into the ring, which from then
 * on keeps the order until it drains). Returns bytes delivered or negative. */
static ssize_t lane_rx_direct(struct lane *l, struct stream *st, bool *full, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	size_t moved = 0;
	*full = false;
	while (l->rx_left > 0 && st->ring_len == 0 && !st->reset_due) {
		struct iovec iov[PEEK_IOV];
		int n = ops->rx_peek(l->drv, iov, PEEK_IOV, err);
		if (n < 0)
			return n;
		if (n == 0)
			break;
		size_t have = 0;
		for (int i = 0; i < n; i++)
			have += iov[i].iov_len;
		/* Wait for the rest of the frame (it is on its way): one write per
		 * frame wakes the target's reader once, not once per piece. */
		if (have < l->rx_left && n < PEEK_IOV)
			break;
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(st->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
				*full = true;
				break;
			}
			stream_local_gone(l, st); /* the rest of the frame is discarded */
			break;
		}
		if (w > 0) {
			int rc = ops->rx_consume(l->drv, (size_t)w, err);
			if (rc)
				return rc;
			ferry_credit_rx_consumed(&st->rxc, (uint64_t)w);
			l->rx_direct_bytes += (uint64_t)w;
			moved += (size_t)w;
			rx_moved(l, (size_t)w);
		}
		if ((size_t)w < have) {
			*full = true;
			break;
		}
	}
	return (ssize_t)moved;
}

/* Move pending payload of the current frame. Returns bytes moved, 0 when it
 * must wait, negative on failure. */
static ssize_t lane_rx_payload(struct lane *l, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	ssize_t r, direct = 0;
	if (l->rx_region) {
		r = ops->rx_payload(l->drv, l->rx_region->base + l->rx_region_off, l->rx_left, err);
		if (r > 0)
			l->rx_region_off += (uint64_t)r;
	} else if (!l->rx_stream || l->rx_stream->closed || l->rx_stream->reset_due) {
		r = discard_payload(l, l->rx_left, err);
	} else if (l->s->dp->splice) {
		struct stream *st = l->rx_stream;
		r = ops->rx_splice(l->drv, st->rxp[1], l->rx_left, err);
		if (r > 0)
			st->rxp_bytes += (size_t)r;
	} else {
		struct stream *st = l->rx_stream;
		if (l->s->dp->peek && st->ring_len == 0) {
			bool full;
			direct = lane_rx_direct(l, st, &full, err);
			if (direct < 0)
				return direct;
			if (l->rx_left == 0 || (!full && !st->reset_due))
				return direct; /* frame done, or the wire is empty for now */
		}
		if (st->reset_due) {
			r = discard_payload(l, l->rx_left, err); /* the socket failed under the direct write */
		} else {
			size_t cap = (size_t)st->rxc.window;
			size_t tail = (st->ring_head + st->ring_len) % cap;
			size_t room = cap - st->ring_len;
			size_t contig = cap - tail < room ? cap - tail : room;
			if (contig > l->rx_left)
				contig = l->rx_left;
			if (contig == 0)
				return direct;
			r = ops->rx_payload(l->drv, st->ring + tail, contig, err);
			if (r > 0)
				st->ring_len += (size_t)r;
		}
	}
	if (r > 0)
		rx_moved(l, (size_t)r);
	return r < 0 ? r : r + direct;
}

static struct region *find_region(struct ferry_session *s, uint32_t id)
{
	for (unsigned i = 0; i < MAX_REGIONS; i++)
		if (s->regions[i].used && s->regions[i].id == id)
			return &s->regions[i];
	return NULL;
}

static int lane_handle_frame(struct lane *l, struct ferry_rx_frame *f, struct ferry_err *err)
{
	struct ferry_session *s = l->s;
	const struct ferry_frame_hdr *h = &f->hdr;
	struct stream *st = NULL;

	if (h->session != s->id)
		return ferry_err_set(err, EPROTO, "%s frame for session %u on a lane of session %u",
				     ferry_wire_type_name(h->type), h->session, s->id);
	l->rx_frames++;

	switch (h->type) {
	case FERRY_FT_DATA:
	case FERRY_FT_CREDIT:
	case FERRY_FT_FIN:
	case FERRY_FT_OPEN_ACK:
		st = lane_stream(l, h->stream);
		if (!st)
			return ferry_err_set(err, EPROTO, "%s frame for stream %u, which is not open on lane %u",
					     ferry_wire_type_name(h->type), h->stream, l->index);
		break;
	default:
		break;
	}

	switch (h->type) {
	case FERRY_FT_DATA:
		if (st->fin_rcvd && !st->reset_due)
			return ferry_err_set(err, EPROTO, "DATA for stream %u after its FIN", st->id);
		if (h->seq != st->rx_off)
			return ferry_err_set(err, EPROTO, "DATA for stream %u at offset %" PRIu64 ", expected %" PRIu64,
					     st->id, h->seq, st->rx_off);
		if (ferry_credit_rx_arrive(&st->rxc, h->length, err))
			return ferry_err_prefix(err, "stream %u", st->id);
		st->rx_off += h->length;
		l->rx_stream = st;
		l->rx_region = NULL;
		l->rx_left = h->length;
		if (!f->pending)
			return ferry_err_set(err, ENOTSUP, "driver delivered an in-memory payload; this path is not built yet");
		return 0;
	case FERRY_FT_REGION_WRITE: {
		struct region *r = find_region(s, h->stream);
		if (!r)
			return ferry_err_set(err, EPROTO, "REGION_WRITE to unknown region %u", h->stream);
		if (h->seq > r->len || h->length > r->len - h->seq)
			return ferry_err_set(err, EPROTO, "REGION_WRITE of %u bytes at offset %" PRIu64
					     " overruns region %u (%zu bytes)", h->length, h->seq, r->id, r->len);
		l->rx_region = r;
		l->rx_region_off = h->seq;
		l->rx_stream = NULL;
		l->rx_left = h->length;
		return 0;
	}
	case FERRY_FT_CREDIT:
		if (ferry_credit_tx_update(&st->txc, h->seq, err))
			return ferry_err_prefix(err, "stream %u", st->id);
		return 0;
	case FERRY_FT_FIN:
		if (h->seq != st->rx_off)
			return ferry_err_set(err, EPROTO, "FIN for stream %u says %" PRIu64 " bytes, %" PRIu64 " arrived",
					     st->id, h->seq, st->rx_off);
		st->fin_rcvd = true;
		return 0;
	case FERRY_FT_OPEN:
		if (s->is_src)
			return ferry_err_set(err, EPROTO, "OPEN frame sent to the source side");
		return dst_open_stream(l, h->stream, err);
	case FERRY_FT_OPEN_ACK:
		if (!s->is_src || st->open_acked)
			return ferry_err_set(err, EPROTO, "unexpected OPEN_ACK for stream %u", st->id);
		st->open_acked = true;
		pthread_mutex_lock(&s->lock);
		s->streams_acked++;
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);
		return 0;
	case FERRY_FT_RESET: {
		char reason[FERRY_WIRE_MAX_CTRL + 1];
		size_t n = h->length;
		memcpy(reason, f->payload ? f->payload : "", f->payload ? n : 0);
		reason[f->payload ? n : 0] = '\0';
		for (size_t i = 0; reason[i]; i++)
			if ((unsigned char)reason[i] < 0x20)
				reason[i] = ' ';
		if (h->stream == FERRY_STREAM_ANY) {
			session_fail(s, false, "peer aborted the session: %s", reason[0] ? reason : "no reason given");
			return -ECONNABORTED;
		}
		st = lane_stream(l, h->stream);
		if (st && !st->closed) {
			/* The far end's local socket failed: fail ours the same way. */
			if (st->fd >= 0)
				shutdown(st->fd, SHUT_RDWR);
			st->local_eof = st->fin_rcvd = st->shut_wr = st->fin_sent = true;
			st->rxp_bytes = st->ring_len = 0;
			stream_maybe_close(s, st);
		}
		return 0;
	}
	case FERRY_FT_REGION_KEY: {
		if (!s->is_src || !s->dp->onesided || h->length != FERRY_WIRE_REGION_KEY_LEN || !f->payload)
			return ferry_err_set(err, EPROTO, "unexpected REGION_KEY frame for region %u", h->stream);
		struct peer_region *pr = NULL;
		for (unsigned i = 0; i < MAX_REGIONS && !pr; i++)
			if (!l->peer_regions[i].known || l->peer_regions[i].id == h->stream)
				pr = &l->peer_regions[i];
		if (!pr)
			return ferry_err_set(err, EPROTO, "REGION_KEY for more than %d regions", MAX_REGIONS);
		uint64_t v[2];
		memcpy(v, f->payload, sizeof(v));
		*pr = (struct peer_region){ .id = h->stream, .addr = h->seq, .rkey = be64toh(v[0]), .len = be64toh(v[1]),
					    .known = true };
		return 0;
	}
	case FERRY_FT_REGION_FENCE:
		/* Frames on a lane are handled in order: every earlier write landed. */
		pthread_mutex_lock(&l->lock);
		l->fence_ack_due = h->seq;
		pthread_mutex_unlock(&l->lock);
		return 0;
	case FERRY_FT_REGION_FENCE_ACK:
		pthread_mutex_lock(&s->lock);
		l->fence_acked = h->seq;
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);
		return 0;
	default:
		return ferry_err_set(err, EPROTO, "unexpected %s frame on an established lane",
				     ferry_wire_type_name(h->type));
	}
}

static int lane_rx(struct lane *l, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	int progress = 0;
	for (int budget = 0; budget < 32; budget++) {
		if (l->rx_left > 0) {
			ssize_t r = lane_rx_payload(l, err);
			if (r < 0)
				return (int)r;
			if (r == 0 || l->rx_left > 0)
				return progress; /* wire empty, or the stream's buffer is full */
			progress = 1;
			continue;
		}
		struct ferry_rx_frame f;
		int n = ops->rx_burst(l->drv, &f, 1, err);
		if (n < 0)
			return n;
		if (n == 0)
			return progress;
		progress = 1;
		int rc = lane_handle_frame(l, &f, err);
		ops->rx_release(l->drv, &f, 1);
		if (rc)
			return rc;
	}
	return progress;
}

/* ---- lane: deliver to local sockets ------------------------------------- */

static int lane_deliver(struct lane *l, struct ferry_err *err)
{
	struct ferry_session *s = l->s;
	int progress = 0;
	for (unsigned i = 0; i < l->nstreams; i++) {
		struct stream *st = l->streams[i];
		if (st->closed)
			continue;
		while (!st->reset_due && (st->rxp_bytes > 0 || st->ring_len > 0)) {
			ssize_t w;
			if (s->dp->splice) {
				w = splice(st->rxp[0], NULL, st->fd, NULL, st->rxp_bytes,
					   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			} else {
				size_t cap = (size_t)st->rxc.window;
				size_t contig = cap - st->ring_head < st->ring_len ? cap - st->ring_head : st->ring_len;
				w = send(st->fd, st->ring + st->ring_head, contig, MSG_NOSIGNAL | MSG_DONTWAIT);
			}
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					break;
				stream_local_gone(l, st);
				break;
			}
			if (w == 0)
				break;
			if (s->dp->splice) {
				st->rxp_bytes -= (size_t)w;
			} else {
				st->ring_head = (st->ring_head + (size_t)w) % (size_t)st->rxc.window;
				st->ring_len -= (size_t)w;
			}
			ferry_credit_rx_consumed(&st->rxc, (uint64_t)w);
			progress = 1;
		}
		if (st->fin_rcvd && !st->shut_wr && st->rxp_bytes == 0 && st->ring_len == 0 && l->rx_stream != st) {
			if (st->fd >= 0 && !st->reset_due)
				shutdown(st->fd, SHUT_WR);
			st->shut_wr = true;
			progress = 1;
		}
	}
	(void)err;
	return progress;
}

/* ---- lane: transmit ----------------------------------------------------- */

static int send_ctrl(struct lane *l, uint8_t type, uint32_t stream, uint64_t seq, const void *payload,
		     uint32_t len, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	struct iovec iov = { .iov_base = (void *)payload, .iov_len = len };
	struct ferry_tx_frame f = {
		.hdr = { .type = type, .session = l->s->id, .stream = stream, .seq = seq, .length = len },
		.iov = len ? &iov : NULL,
		.iovcnt = len ? 1 : 0,
	};
	/* A payload must outlive the frame: callers pass static strings. */
	int n = ops->tx_burst(l->drv, &f, 1, err);
	if (n > 0)
		l->tx_frames++;
	return n; /* 1 queued, 0 driver full, <0 failed */
}

static int lane_tx_ctrl(struct lane *l, struct ferry_err *err)
{
	int progress = 0;
	int n;
	for (unsigned i = 0; i < l->nstreams; i++) {
		struct stream *st = l->streams[i];
		if (!st->open_sent) {
			if ((n = send_ctrl(l, FERRY_FT_OPEN, st->id, 0, NULL, 0, err)) <= 0)
				return n;
			st->open_sent = true;
			progress = 1;
		}
		if (st->open_ack_due) {
			if ((n = send_ctrl(l, FERRY_FT_OPEN_ACK, st->id, 0, NULL, 0, err)) <= 0)
				return n;
			st->open_ack_due = false;
			progress = 1;
		}
		if (st->reset_due && !st->closed) {
			static const char why[] = "local socket closed or failed";
			if ((n = send_ctrl(l, FERRY_FT_RESET, st->id, 0, why, sizeof(why) - 1, err)) <= 0)
				return n;
			if (st->fd >= 0)
				shutdown(st->fd, SHUT_RDWR);
			st->fin_sent = st->shut_wr = true;
			stream_maybe_close(l->s, st);
			progress = 1;
			continue;
		}
		if (!st->closed && ferry_credit_rx_report_due(&st->rxc)) {
			uint64_t v = st->rxc.consumed;
			if ((n = send_ctrl(l, FERRY_FT_CREDIT, st->id, v, NULL, 0, err)) <= 0)
				return n;
			ferry_credit_rx_report(&st->rxc);
			progress = 1;
		}
	}
	struct ferry_session *s = l->s;
	for (unsigned i = 0; s->dp->onesided && !s->is_src && i < MAX_REGIONS; i++) {
		struct region *r = &s->regions[i];
		if (l->key_sent[i] || !__atomic_load_n(&r->used, __ATOMIC_ACQUIRE))
			continue;
		/* One-sided writes need the region's address and key: tell each lane. */
		if ((n = send_ctrl(l, FERRY_FT_REGION_KEY, r->id, (uint64_t)(uintptr_t)r->base, r->key_msg,
				   FERRY_WIRE_REGION_KEY_LEN, err)) <= 0)
			return n;
		l->key_sent[i] = true;
		progress = 1;
	}
	pthread_mutex_lock(&l->lock);
	uint64_t ack = l->fence_ack_due, acked = l->fence_ack_sent;
	pthread_mutex_unlock(&l->lock);
	if (ack != acked) {
		if ((n = send_ctrl(l, FERRY_FT_REGION_FENCE_ACK, FERRY_STREAM_ANY, ack, NULL, 0, err)) <= 0)
			return n;
		l->fence_ack_sent = ack;
		progress = 1;
	}
	return progress;
}

/* Push what the driver holds; a full wire pauses the producers until it drains. */
static int lane_push(struct lane *l, struct ferry_err *err)
{
	int rc = l->s->dp->ops->tx_flush(l->drv, err);
	if (rc == -EAGAIN) {
		l->tx_blocked = true;
		return 0;
	}
	if (rc == 0)
		l->tx_blocked = false;
	return rc;
}

/* n stream bytes were handed to the driver as one DATA frame. */
static void stream_framed(struct lane *l, struct stream *st, size_t n)
{
	st->tx_off += n;
	ferry_credit_tx_sent(&st->txc, n);
	l->tx_bytes += n;
	l->tx_frames++;
}

static int stream_tx_splice(struct lane *l, struct stream *st, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	int progress = 0;
	for (int frames = 0; frames < 4 && !l->tx_blocked; frames++) {
		if (st->unframed == 0) {
			if (st->local_eof)
				break;
			uint64_t avail = ferry_credit_tx_avail(&st->txc);
			if (avail == 0)
				break;
			size_t want = avail < FERRY_WIRE_MAX_PAYLOAD ? (size_t)avail : FERRY_WIRE_MAX_PAYLOAD;
			ssize_t r = splice(st->fd, NULL, st->txp[1], NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			if (r < 0) {
				if (errno == EAGAIN || errno == EINTR)
					break;
				stream_local_gone(l, st);
				return 1;
			}
			if (r == 0) {
				st->local_eof = true;
				progress = 1;
				break;
			}
			st->unframed = (size_t)r;
		}
		struct ferry_frame_hdr h = { .type = FERRY_FT_DATA, .session = l->s->id, .stream = st->id,
					     .seq = st->tx_off, .length = (uint32_t)st->unframed };
		int rc = ops->tx_splice(l->drv, &h, st->txp[0], err);
		if (rc == -EAGAIN)
			break;
		if (rc)
			return rc;
		stream_framed(l, st, st->unframed);
		st->unframed = 0;
		progress = 1;
		/* Hand the frame to the wire now so the pipe drains for the next. */
		if ((rc = lane_push(l, err)))
			return rc;
	}
	return progress;
}

static int stream_tx_copy(struct lane *l, struct stream *st, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	int progress = 0;
	for (unsigned c = 0; c < st->nchunks && !l->tx_blocked && !st->local_eof; c++) {
		struct chunk *ch = &st->chunks[c];
		if (ch->busy)
			continue;
		ssize_t r;
		if (ch->held) {
			r = (ssize_t)ch->held; /* read earlier, the wire was full then */
			ch->held = 0;
			goto frame;
		}
		uint64_t avail = ferry_credit_tx_avail(&st->txc);
		if (avail == 0)
			break;
		size_t want = avail < TX_CHUNK_BYTES ? (size_t)avail : TX_CHUNK_BYTES;
		r = recv(st->fd, ch->buf, want, MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			stream_local_gone(l, st);
			return 1;
		}
		if (r == 0) {
			st->local_eof = true;
			return 1;
		}
frame:;
		struct iovec iov = { .iov_base = ch->buf, .iov_len = (size_t)r };
		struct ferry_tx_frame f = {
			.hdr = { .type = FERRY_FT_DATA, .session = l->s->id, .stream = st->id,
				 .seq = st->tx_off, .length = (uint32_t)r },
			.iov = &iov, .iovcnt = 1, .cookie = ch, .mr = ch->mr.addr ? &ch->mr : NULL,
		};
		int n = ops->tx_burst(l->drv, &f, 1, err);
		if (n < 0)
			return n;
		if (n == 0) {
			/* The wire is full: keep the bytes in the chunk and frame them
			 * first next time, before reading anything more. */
			ch->held = (size_t)r;
			l->tx_blocked = true;
			return 1;
		}
		ch->busy = true;
		stream_framed(l, st, (size_t)r);
		progress = 1;
		int rc = lane_push(l, err);
		if (rc)
			return rc;
	}
	return progress;
}

/* One-sided drivers: the bytes go straight into the peer's region (its
 * REGION_KEY gave the address and key); the fence that follows on the same
 * lane arrives after them. Returns 1 written, 0 not now (tx_blocked set when
 * the lane is full), negative on failure. */
static int region_write_onesided(struct lane *l, const struct region_job *job, size_t len, struct ferry_err *err)
{
	const struct peer_region *pr = NULL;
	for (unsigned i = 0; i < MAX_REGIONS && !pr; i++)
		if (l->peer_regions[i].known && l->peer_regions[i].id == job->r->id)
			pr = &l->peer_regions[i];
	if (!pr)
		return 0;
	if (job->off > pr->len || len > pr->len - job->off)
		return ferry_err_set(err, ERANGE, "region %u: a write of %zu bytes at %" PRIu64 " overruns the peer's region (%" PRIu64 " bytes)",
				     job->r->id, len, job->off, pr->len);
	int rc = l->s->dp->ops->write_remote(l->drv, &job->r->mr, job->off, pr->rkey, pr->addr + job->off, len,
					     job->r->id, NULL, err);
	if (rc == -EAGAIN) {
		l->tx_blocked = true;
		return 0;
	}
	return rc < 0 ? rc : 1;
}

static int lane_tx_regions(struct lane *l, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	int progress = 0;
	while (!l->tx_blocked) {
		pthread_mutex_lock(&l->lock);
		if (l->job_count == 0) {
			uint64_t fence = l->fence_req;
			pthread_mutex_unlock(&l->lock);
			if (fence != l->fence_sent) {
				int n = send_ctrl(l, FERRY_FT_REGION_FENCE, FERRY_STREAM_ANY, fence, NULL, 0, err);
				if (n < 0)
					return n;
				if (n > 0) {
					l->fence_sent = fence;
					progress = 1;
				}
			}
			break;
		}
		struct region_job *j = &l->jobs[l->job_head];
		struct region_job job = *j;
		size_t len = job.len < REGION_FRAME ? job.len : REGION_FRAME;
		pthread_mutex_unlock(&l->lock);

		int n;
		if (l->s->dp->onesided) {
			n = region_write_onesided(l, &job, len, err);
		} else {
			struct iovec iov = { .iov_base = job.r->base + job.off, .iov_len = len };
			struct ferry_tx_frame f = {
				.hdr = { .type = FERRY_FT_REGION_WRITE, .session = l->s->id, .stream = job.r->id,
					 .seq = job.off, .length = (uint32_t)len },
				.iov = &iov, .iovcnt = 1,
			};
			n = ops->tx_burst(l->drv, &f, 1, err);
		}
		if (n < 0)
			return n;
		if (n == 0) {
			/* one-sided: lane full (tx_blocked set) or the peer's key not here yet */
			if (!l->s->dp->onesided)
				l->tx_blocked = true;
			break;
		}
		l->tx_bytes += len;
		l->tx_frames++;
		progress = 1;
		pthread_mutex_lock(&l->lock);
		j->off += len;
		j->len -= len;
		if (j->len == 0) {
			l->job_head = (l->job_head + 1) % REGION_JOBS;
			l->job_count--;
		}
		pthread_mutex_unlock(&l->lock);
		int rc = lane_push(l, err);
		if (rc)
			return rc;
	}
	return progress;
}

static int lane_tx(struct lane *l, struct ferry_err *err)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	int progress = 0;

	int rc = lane_push(l, err);
	if (rc)
		return rc;
	void *done[64];
	int nd;
	while ((nd = ops->poll_completions(l->drv, done, 64)) > 0) {
		for (int i = 0; i < nd; i++)
			((struct chunk *)done[i])->busy = false;
		progress = 1;
	}

	rc = lane_tx_ctrl(l, err);
	if (rc < 0)
		return rc;
	progress |= rc;

	for (unsigned i = 0; i < l->nstreams; i++) {
		struct stream *st = l->streams[i];
		if (st->closed || !st->open_sent || st->reset_due)
			continue;
		if (!st->local_eof || st->unframed) {
			rc = l->s->dp->splice ? stream_tx_splice(l, st, err) : stream_tx_copy(l, st, err);
			if (rc < 0)
				return rc;
			progress |= rc;
		}
		if (st->local_eof && !st->unframed && !st->fin_sent && !st->reset_due) {
			int n = send_ctrl(l, FERRY_FT_FIN, st->id, st->tx_off, NULL, 0, err);
			if (n < 0)
				return n;
			if (n > 0) {
				st->fin_sent = true;
				progress = 1;
			}
		}
		stream_maybe_close(l->s, st);
	}

	rc = lane_tx_regions(l, err);
	if (rc < 0)
		return rc;
	return progress | rc;
}

static int lane_take_inbox(struct lane *l)
{
	pthread_mutex_lock(&l->lock);
	unsigned n = l->ninbox;
	for (unsigned i = 0; i < n; i++)
		l->streams[l->nstreams++] = l->inbox[i];
	l->ninbox = 0;
	pthread_mutex_unlock(&l->lock);
	return n > 0;
}

/* ---- lane: idle waiting ------------------------------------------------- */

/* Copy path: whether a chunk can take more of the local socket's bytes. All
 * busy means waiting for the driver's completions (a datagram driver's come
 * with the peer's acks), not for the socket: polling it would spin. */
static bool stream_chunk_free(const struct ferry_dp *dp, const struct stream *st)
{
	if (dp->splice)
		return true;
	for (unsigned i = 0; i < st->nchunks; i++)
		if (!st->chunks[i].busy)
			return true;
	return false;
}

static void lane_sleep(struct lane *l)
{
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	struct pollfd p[2 + FERRY_MAX_STREAMS];
	unsigned np = 0;
	short ev = 0;
	p[np].fd = ops->wakeup_fd(l->drv, &ev, l->tx_blocked);
	/* Mid-frame with bytes still waiting for the local socket, the lane's
	 * input may not fit: waiting for it could spin. The local socket's
	 * POLLOUT (asked below) wakes us instead; with nothing waiting, POLLIN. */
	struct stream *rs = l->rx_stream;
	if (l->rx_left > 0 && rs && !rs->closed && !rs->reset_due && (rs->rxp_bytes > 0 || rs->ring_len > 0))
		ev &= (short)~POLLIN;
	p[np++].events = ev;
	p[np].fd = l->evfd;
	p[np++].events = POLLIN;
	for (unsigned i = 0; i < l->nstreams; i++) {
		struct stream *st = l->streams[i];
		if (st->closed || st->fd < 0)
			continue;
		short e = 0;
		if (!st->local_eof && !st->unframed && !l->tx_blocked && ferry_credit_tx_avail(&st->txc) > 0 &&
		    stream_chunk_free(l->s->dp, st))
			e |= POLLIN;
		if (!st->reset_due && (st->rxp_bytes > 0 || st->ring_len > 0))
			e |= POLLOUT;
		if (e) {
			p[np].fd = st->fd;
			p[np++].events = e;
		}
	}
	/* Datagram lanes have timers (acks, retransmissions, pacing) that no
	 * fd announces: sleep no longer than the next one. */
	int64_t wait_ns = 200000000;
	uint64_t t0 = now_ns();
	if (l->s->dp->rl) {
		uint64_t dl = ferry_rldrv_next_deadline(l->drv);
		if (dl <= t0)
			wait_ns = 0;
		else if (dl - t0 < (uint64_t)wait_ns)
			wait_ns = (int64_t)(dl - t0);
	}
	struct timespec ts = { .tv_sec = (time_t)(wait_ns / 1000000000), .tv_nsec = (long)(wait_ns % 1000000000) };
	int r = ppoll(p, np, &ts, NULL);
	l->idle_ns += now_ns() - t0;
	if (r > 0 && (p[1].revents & POLLIN))
		drain_evfd(l->evfd);
}

static void lane_send_reset(struct lane *l, const char *reason)
{
	struct ferry_err ignored = { 0 };
	const struct ferry_driver_ops *ops = l->s->dp->ops;
	size_t len = strlen(reason);
	if (len > FERRY_WIRE_MAX_CTRL)
		len = FERRY_WIRE_MAX_CTRL;
	struct iovec iov = { .iov_base = (void *)reason, .iov_len = len };
	struct ferry_tx_frame f = {
		.hdr = { .type = FERRY_FT_RESET, .session = l->s->id, .stream = FERRY_STREAM_ANY, .length = (uint32_t)len },
		.iov = &iov, .iovcnt = 1,
	};
	/* Best effort and bounded (the peer may be gone): make room, queue, push. */
	void *done[64];
	int queued = 0;
	for (int i = 0; i < 50; i++) {
		while (ops->poll_completions(l->drv, done, 64) > 0)
			;
		if (!queued)
			queued = ops->tx_burst(l->drv, &f, 1, &ignored) == 1;
		int rc = ops->tx_flush(l->drv, &ignored);
		if (queued && rc == 0)
			return;
		if (rc != 0 && rc != -EAGAIN)
			return;
		usleep(1000);
	}
}

static void *lane_main(void *arg)
{
	struct lane *l = arg;
	struct ferry_session *s = l->s;
	struct ferry_dp *dp = s->dp;
	struct ferry_err err = { 0 };
	uint64_t last_work = now_ns();
	unsigned yields = 0;
	l->start_ns = last_work;

	while (!session_stopping(s)) {
		int progress = lane_take_inbox(l);
		int rc = lane_rx(l, &err);
		if (rc >= 0) {
			progress |= rc;
			rc = lane_deliver(l, &err);
		}
		if (rc >= 0) {
			progress |= rc;
			rc = lane_tx(l, &err);
		}
		if (rc < 0) {
			if (rc != -ECONNABORTED && rc != -ECANCELED)
				session_fail(s, rc != -ECONNRESET, "lane %u: %s", l->index,
					     err.msg[0] ? err.msg : strerror(-rc));
			break;
		}
		progress |= rc;
		if (progress) {
			last_work = now_ns();
			yields = 0;
			continue;
		}
		if (dp->poll_mode == FERRY_POLL_BUSY)
			continue;
		if (now_ns() - last_work < dp->spin_ns)
			continue;
		if (yields < YIELDS_BEFORE_SLEEP) {
			yields++;
			sched_yield();
			continue;
		}
		lane_sleep(l);
	}

	pthread_mutex_lock(&s->lock);
	bool tell = s->tell_peer && s->state == FERRY_SESSION_FAILED;
	char reason[FERRY_ERR_MSG_MAX];
	memcpy(reason, s->error, sizeof(reason));
	pthread_mutex_unlock(&s->lock);
	if (tell)
		lane_send_reset(l, reason);
	/* Make QEMU see the failure now rather than at session close. */
	for (unsigned i = 0; i < l->nstreams; i++)
		if (l->streams[i]->fd >= 0 && !l->streams[i]->closed)
			shutdown(l->streams[i]->fd, SHUT_RDWR);
	return NULL;
}

/* ---- session set-up ----------------------------------------------------- */

static int start_lane_threads(struct ferry_session *s, struct ferry_err *err)
{
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		int rc = pthread_create(&l->thread, NULL, lane_main, l);
		if (rc)
			return ferry_err_set(err, rc, "cannot start lane %u's poller: %s", i, strerror(rc));
		l->thread_started = true;
		char name[32];
		snprintf(name, sizeof(name), "ferry-lane%u", i);
		name[15] = '\0'; /* the kernel keeps 15 characters */
		pthread_setname_np(l->thread, name);
	}
	return 0;
}

static struct ferry_session *session_alloc(struct ferry_dp *dp, const struct ferry_session_params *p,
					   bool is_src, struct ferry_err *err)
{
	if (p->lanes == 0 || p->lanes > FERRY_MAX_LANES) {
		ferry_err_set(err, EINVAL, "lanes must be 1..%d (got %u)", FERRY_MAX_LANES, p->lanes);
		return NULL;
	}
	if (p->max_streams == 0 || p->max_streams > FERRY_MAX_STREAMS) {
		ferry_err_set(err, EINVAL, "streams must be 1..%d (got %u)", FERRY_MAX_STREAMS, p->max_streams);
		return NULL;
	}
	if (p->unix_path && strlen(p->unix_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		ferry_err_set(err, ENAMETOOLONG, "unix socket path too long: %s", p->unix_path);
		return NULL;
	}
	if (p->handoff && (p->lanes != 1 || p->unix_path || !(dp->ops->caps & FERRY_DRV_HANDOFF))) {
		ferry_err_set(err, EINVAL, "a handoff session has exactly one lane, no local socket, and a driver that can hand over (%s cannot)",
			      dp->ops->name);
		return NULL;
	}
	struct ferry_session *s = calloc(1, sizeof(*s));
	if (!s) {
		ferry_err_set(err, ENOMEM, "session: out of memory");
		return NULL;
	}
	s->handoff = p->handoff;
	s->dp = dp;
	s->is_src = is_src;
	s->id = p->id;
	memcpy(s->token, p->token, FERRY_TOKEN_LEN);
	s->nlanes = p->lanes;
	s->max_streams = p->max_streams;
	s->window = p->window ? p->window : dp->window;
	s->timeout_ms = p->timeout_ms > 0 ? p->timeout_ms : 10000;
	if (p->unix_path)
		strcpy(s->unix_path, p->unix_path);
	s->listen_fd = -1;
	s->acc_evfd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_cond_init(&s->cond, &ca);
	pthread_condattr_destroy(&ca);
	for (unsigned i = 0; i < FERRY_MAX_LANES; i++)
		s->lanes[i].evfd = -1;
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		l->s = s;
		l->index = i;
		pthread_mutex_init(&l->lock, NULL);
		l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (l->evfd < 0) {
			ferry_err_set(err, errno, "eventfd: %s", strerror(errno));
			ferry_session_close(s);
			return NULL;
		}
	}
	return s;
}

static void dp_link(struct ferry_dp *dp, struct ferry_session *s)
{
	pthread_mutex_lock(&dp->lock);
	s->next = dp->sessions;
	dp->sessions = s;
	pthread_mutex_unlock(&dp->lock);
}

static void dp_unlink(struct ferry_dp *dp, struct ferry_session *s)
{
	pthread_mutex_lock(&dp->lock);
	for (struct ferry_session **pp = &dp->sessions; *pp; pp = &(*pp)->next) {
		if (*pp == s) {
			*pp = s->next;
			break;
		}
	}
	pthread_mutex_unlock(&dp->lock);
}

int ferry_session_create_dst(struct ferry_dp *dp, const struct ferry_session_params *p,
			     struct ferry_session **out, struct ferry_err *err)
{
	pthread_mutex_lock(&dp->lock);
	for (struct ferry_session *o = dp->sessions; o; o = o->next) {
		if (o->id == p->id) {
			pthread_mutex_unlock(&dp->lock);
			return ferry_err_set(err, EEXIST, "session %u already exists", p->id);
		}
	}
	pthread_mutex_unlock(&dp->lock);
	struct ferry_session *s = session_alloc(dp, p, false, err);
	if (!s)
		return -(err && err->code ? err->code : ENOMEM);
	dp_link(dp, s);
	*out = s;
	return 0;
}

/* Blocking helpers for the lane handshake (done before the pollers run). */
static int lane_send_blocking(struct ferry_dp *dp, struct ferry_lane_drv *drv, const struct ferry_tx_frame *f,
			      int timeout_ms, struct ferry_err *err)
{
	int n = dp->ops->tx_burst(drv, f, 1, err);
	if (n < 0)
		return n;
	if (n == 0)
		return ferry_err_set(err, EAGAIN, "driver queue full during lane set-up");
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ull;
	for (;;) {
		int rc = dp->ops->tx_flush(drv, err);
		if (rc != -EAGAIN)
			return rc;
		if (now_ns() > end)
			return ferry_err_set(err, ETIMEDOUT, "lane set-up: the peer stopped reading");
		short ev;
		struct pollfd pf = { .fd = dp->ops->wakeup_fd(drv, &ev, true) };
		pf.events = ev;
		poll(&pf, 1, 50);
	}
}

static int lane_recv_blocking(struct ferry_dp *dp, struct ferry_lane_drv *drv, struct ferry_rx_frame *f,
			      int timeout_ms, struct ferry_err *err)
{
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ull;
	for (;;) {
		int n = dp->ops->rx_burst(drv, f, 1, err);
		if (n < 0)
			return n;
		if (n == 1)
			return 0;
		if (now_ns() > end)
			return ferry_err_set(err, ETIMEDOUT, "lane set-up: no handshake within %d ms", timeout_ms);
		short ev;
		struct pollfd pf = { .fd = dp->ops->wakeup_fd(drv, &ev, false) };
		pf.events = ev;
		poll(&pf, 1, 50);
	}
}

static void *src_acceptor_main(void *arg);

static void note_lanes(struct ferry_session *s, unsigned asked, const char *why, unsigned queues)
{
	snprintf(s->lanes_note, sizeof(s->lanes_note), "%u stream%s on %u lane%s of %u asked for (%s has %u queue%s)",
		 s->max_streams, s->max_streams == 1 ? "" : "s", s->nlanes, s->nlanes == 1 ? "" : "s", asked, why, queues,
		 queues == 1 ? "" : "s");
}

int ferry_session_create_src(struct ferry_dp *dp, const struct ferry_session_params *p,
			     const char *peer_endpoint, struct ferry_session **out, struct ferry_err *err)
{
	/* Over a datagram device, no more lanes than both ends have queues:
	 * streams share lanes instead (stream k rides lane k % lanes), and the
	 * destination takes the count from the lanes' HELLOs. A bad endpoint is
	 * left for lane_connect to report. */
	struct ferry_session_params cp = *p;
	unsigned lq = 0, pq = 0;
	struct ferry_err qerr = { 0 };
	bool clamp = dp->ops->queue_counts && !p->handoff &&
		     dp->ops->queue_counts(dp->dev, peer_endpoint, &lq, &pq, &qerr) == 0 && lq && pq;
	unsigned queues = lq < pq ? lq : pq;
	clamp = clamp && p->lanes > queues;
	if (clamp)
		cp.lanes = queues;
	struct ferry_session *s = session_alloc(dp, &cp, true, err);
	if (!s)
		return -(err && err->code ? err->code : ENOMEM);
	if (clamp)
		note_lanes(s, p->lanes, pq <= lq ? "the peer's device" : "this device", cp.lanes);
	int rc = 0;
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		rc = dp->ops->lane_connect(dp->dev, peer_endpoint, i, s->timeout_ms, &l->drv, err);
		if (rc)
			goto fail;
		struct iovec iov = { .iov_base = s->token, .iov_len = FERRY_TOKEN_LEN };
		struct ferry_tx_frame hello = {
			.hdr = { .type = FERRY_FT_HELLO, .flags = s->handoff ? FERRY_FF_HANDOFF : 0, .session = s->id,
				 .stream = i, .seq = s->nlanes, .length = FERRY_TOKEN_LEN },
			.iov = &iov, .iovcnt = 1,
		};
		rc = lane_send_blocking(dp, l->drv, &hello, s->timeout_ms, err);
		if (rc)
			goto fail_lane;
		struct ferry_rx_frame f;
		rc = lane_recv_blocking(dp, l->drv, &f, s->timeout_ms, err);
		if (rc)
			goto fail_lane;
		if (f.hdr.type == FERRY_FT_RESET) {
			char reason[FERRY_WIRE_MAX_CTRL + 1];
			memcpy(reason, f.payload, f.hdr.length);
			reason[f.hdr.length] = '\0';
			rc = ferry_err_set(err, ECONNREFUSED, "peer refused lane %u: %s", i, reason);
			goto fail;
		}
		if (f.hdr.type != FERRY_FT_HELLO_ACK || f.hdr.session != s->id || f.hdr.stream != i) {
			rc = ferry_err_set(err, EPROTO, "lane %u: expected HELLO_ACK, got %s", i,
					   ferry_wire_type_name(f.hdr.type));
			goto fail;
		}
		s->lanes_up++;
		continue;
fail_lane:
		ferry_err_prefix(err, "lane %u to %s", i, peer_endpoint);
		goto fail;
	}
	s->state = FERRY_SESSION_ACTIVE;

	if (s->unix_path[0]) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		strcpy(sa.sun_path, s->unix_path);
		struct stat stbuf;
		/* Replace a stale socket from an earlier run, never a regular file. */
		if (lstat(s->unix_path, &stbuf) == 0 && S_ISSOCK(stbuf.st_mode))
			unlink(s->unix_path);
		s->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (s->listen_fd < 0 || bind(s->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) ||
		    listen(s->listen_fd, FERRY_MAX_STREAMS)) {
			rc = ferry_err_set(err, errno, "cannot listen on %s: %s", s->unix_path, strerror(errno));
			goto fail;
		}
		s->acc_evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (s->acc_evfd < 0) {
			rc = ferry_err_set(err, errno, "eventfd: %s", strerror(errno));
			goto fail;
		}
	}
	/* A handoff lane is QEMU's, not a poller's. */
	rc = s->handoff ? 0 : start_lane_threads(s, err);
	if (rc)
		goto fail;
	if (s->listen_fd >= 0) {
		rc = pthread_create(&s->acceptor, NULL, src_acceptor_main, s);
		if (rc) {
			rc = ferry_err_set(err, rc, "cannot start the stream acceptor: %s", strerror(rc));
			goto fail;
		}
		s->acceptor_started = true;
	}
	dp_link(dp, s);
	*out = s;
	return 0;
fail:
	ferry_session_close(s);
	return rc ? rc : -EIO;
}

/* Source: make fd the session's next stream and hand it to its lane. The
 * caller keeps fd on failure. */
static int src_stream_start(struct ferry_session *s, int fd, struct ferry_err *err)
{
	struct stream *st = stream_new(s, s->accepted, fd, err);
	if (!st)
		return -(err->code ? err->code : ENOMEM);
	s->accepted++;
	struct lane *l = st->lane;
	pthread_mutex_lock(&s->lock);
	s->streams_opened++;
	pthread_mutex_unlock(&s->lock);
	pthread_mutex_lock(&l->lock);
	l->inbox[l->ninbox++] = st;
	pthread_mutex_unlock(&l->lock);
	wake(l->evfd);
	return 0;
}

static void *src_acceptor_main(void *arg)
{
	struct ferry_session *s = arg;
	while (!session_stopping(s)) {
		struct pollfd p[2] = { { .fd = s->listen_fd, .events = POLLIN }, { .fd = s->acc_evfd, .events = POLLIN } };
		if (poll(p, 2, 500) <= 0)
			continue;
		if (p[1].revents)
			drain_evfd(s->acc_evfd);
		if (!(p[0].revents & POLLIN))
			continue;
		int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		if (s->accepted >= s->max_streams) {
			/* More connections than the session was set up for: refuse
			 * (the client sees it closed) and count it for the user. */
			close(fd);
			pthread_mutex_lock(&s->lock);
			s->streams_refused++;
			pthread_mutex_unlock(&s->lock);
			continue;
		}
		struct ferry_err err = { 0 };
		if (src_stream_start(s, fd, &err)) {
			close(fd);
			session_fail(s, true, "%s", err.msg);
			break;
		}
	}
	return NULL;
}

/* ---- destination lane acceptance (the dp's own thread) ------------------ */

static void refuse_lane(struct ferry_dp *dp, struct ferry_lane_drv *drv, uint32_t session, const char *why)
{
	struct ferry_err ignored = { 0 };
	size_t len = strlen(why);
	struct iovec iov = { .iov_base = (void *)why, .iov_len = len };
	struct ferry_tx_frame f = {
		.hdr = { .type = FERRY_FT_RESET, .session = session, .stream = FERRY_STREAM_ANY, .length = (uint32_t)len },
		.iov = &iov, .iovcnt = 1,
	};
	(void)lane_send_blocking(dp, drv, &f, 200, &ignored);
	__atomic_add_fetch(&dp->rejected, 1, __ATOMIC_RELAXED);
	dp->ops->lane_close(drv);
}

/* Destination over a datagram device: the source opened fewer lanes than
 * registered (no more than both ends have queues); take its count before any
 * lane is up, so streams map to lanes (k % lanes) the same on both ends. */
static void shrink_lanes(struct ferry_session *s, unsigned n)
{
	unsigned asked = s->nlanes, lq = 0, pq = 0;
	struct ferry_err err = { 0 };
	(void)s->dp->ops->queue_counts(s->dp->dev, NULL, &lq, &pq, &err);
	pthread_mutex_lock(&s->lock);
	for (unsigned i = n; i < asked; i++) {
		struct lane *l = &s->lanes[i];
		if (l->evfd >= 0)
			close(l->evfd);
		l->evfd = -1;
		pthread_mutex_destroy(&l->lock);
	}
	s->nlanes = n;
	if (lq == n)
		note_lanes(s, asked, "this device", lq);
	else
		note_lanes(s, asked, "the source's device", n);
	pthread_mutex_unlock(&s->lock);
}

/* A lane's first frame arrived: attach it to its session or refuse it. */
static void handle_hello(struct ferry_dp *dp, struct ferry_lane_drv *drv, const struct ferry_rx_frame *f)
{
	struct ferry_err err = { 0 };
	if (f->hdr.type != FERRY_FT_HELLO || f->hdr.length != FERRY_TOKEN_LEN || !f->payload) {
		refuse_lane(dp, drv, f->hdr.session, "expected a HELLO frame");
		return;
	}
	pthread_mutex_lock(&dp->lock);
	struct ferry_session *s = dp->sessions;
	while (s && (s->is_src || s->id != f->hdr.session))
		s = s->next;
	/* Compare the whole token regardless of where it differs. */
	unsigned diff = 0;
	if (s)
		for (unsigned i = 0; i < FERRY_TOKEN_LEN; i++)
			diff |= (unsigned)(s->token[i] ^ ((const uint8_t *)f->payload)[i]);
	const char *why = NULL;
	if (!s || diff)
		why = "unknown session or wrong session token";
	else if (f->hdr.seq != s->nlanes && !(f->hdr.seq && f->hdr.seq < s->nlanes && !s->lanes_up &&
						 dp->ops->queue_counts && !s->handoff))
		why = "lane number or count does not match the session";
	else if (f->hdr.stream >= f->hdr.seq)
		why = "lane number beyond the session's lanes";
	else if (s->lanes[f->hdr.stream].drv)
		why = "lane already attached";
	else if (s->state != FERRY_SESSION_CONNECTING)
		why = "session is not accepting lanes";
	else if (!(f->hdr.flags & FERRY_FF_HANDOFF) != !s->handoff)
		why = "handoff mode does not match the session";
	if (why) {
		pthread_mutex_unlock(&dp->lock);
		refuse_lane(dp, drv, f->hdr.session, why);
		return;
	}
	unsigned idx = f->hdr.stream;
	struct ferry_tx_frame ack = { .hdr = { .type = FERRY_FT_HELLO_ACK, .session = s->id, .stream = idx } };
	if (lane_send_blocking(dp, drv, &ack, 1000, &err)) {
		pthread_mutex_unlock(&dp->lock);
		dp->ops->lane_close(drv);
		return;
	}
	if (f->hdr.seq < s->nlanes)
		shrink_lanes(s, f->hdr.seq);
	s->lanes[idx].drv = drv;
	pthread_mutex_lock(&s->lock);
	s->lanes_up++;
	bool all = s->lanes_up == s->nlanes;
	if (all)
		s->state = FERRY_SESSION_ACTIVE;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	if (all && !s->handoff && start_lane_threads(s, &err))
		session_fail(s, true, "%s", err.msg);
	pthread_mutex_unlock(&dp->lock);
}

struct pending_lane {
	struct ferry_lane_drv *drv;
	uint64_t deadline_ns;
};

/* Accepts lanes and waits for their HELLOs, all at once: a peer that connects
 * and stays silent costs one slot until its deadline, never other lanes' time. */
static void *dp_acceptor_main(void *arg)
{
	struct ferry_dp *dp = arg;
	struct pending_lane pend[PENDING_LANES];
	unsigned np = 0;
	for (;;) {
		struct pollfd p[2 + PENDING_LANES];
		p[0] = (struct pollfd){ .fd = dp->ops->listen_fd(dp->dev), .events = POLLIN };
		p[1] = (struct pollfd){ .fd = dp->stop_evfd, .events = POLLIN };
		uint64_t now = now_ns(), next = UINT64_MAX;
		for (unsigned i = 0; i < np; i++) {
			short ev = 0;
			p[2 + i].fd = dp->ops->wakeup_fd(pend[i].drv, &ev, false);
			p[2 + i].events = ev;
			p[2 + i].revents = 0;
			if (pend[i].deadline_ns < next)
				next = pend[i].deadline_ns;
		}
		int timeout = next == UINT64_MAX ? -1 : next <= now ? 0 : (int)((next - now) / 1000000 + 1);
		int r = poll(p, 2 + np, timeout);
		if (r < 0 && errno != EINTR)
			break;
		if (r > 0 && p[1].revents)
			break;
		now = now_ns();
		for (unsigned i = 0; i < np;) {
			struct ferry_err err = { 0 };
			struct ferry_rx_frame f;
			int n = p[2 + i].revents || now >= pend[i].deadline_ns ? dp->ops->rx_burst(pend[i].drv, &f, 1, &err) : 0;
			if (n == 1)
				handle_hello(dp, pend[i].drv, &f);
			else if (n < 0)
				refuse_lane(dp, pend[i].drv, 0, err.msg); /* say why: the peer's log shows it */
			else if (now >= pend[i].deadline_ns)
				refuse_lane(dp, pend[i].drv, 0, "no HELLO within " HELLO_TIMEOUT_TEXT);
			if (n != 0 || now >= pend[i].deadline_ns) {
				pend[i] = pend[--np];
				p[2 + i] = p[2 + np];
				continue;
			}
			i++;
		}
		if (r > 0 && (p[0].revents & POLLIN)) {
			for (;;) {
				struct ferry_err err = { 0 };
				struct ferry_lane_drv *drv = NULL;
				if (dp->ops->lane_accept(dp->dev, &drv, &err))
					break;
				if (np == PENDING_LANES) {
					refuse_lane(dp, drv, 0, "too many lanes waiting for their handshake");
					continue;
				}
				pend[np++] = (struct pending_lane){ drv, now + (uint64_t)HELLO_TIMEOUT_MS * 1000000ull };
			}
		}
	}
	for (unsigned i = 0; i < np; i++)
		dp->ops->lane_close(pend[i].drv);
	return NULL;
}

/* ---- public: data plane -------------------------------------------------- */

int ferry_dp_open(const struct ferry_dp_config *cfg, struct ferry_dp **out, struct ferry_err *err)
{
	const char *name = cfg->driver ? cfg->driver : "tcp";
	const struct ferry_driver_ops *ops = ferry_driver_find(name);
	const struct ferry_dgram_ops *backend = ops ? NULL : ferry_dgram_find(name);
	if (!ops && !backend)
		return ferry_err_set(err, ENOENT, "no driver named '%s' in this build", name);
	struct ferry_dp *dp = calloc(1, sizeof(*dp));
	if (!dp)
		return ferry_err_set(err, ENOMEM, "data plane: out of memory");
	if (backend) {
		/* A datagram backend: the shim makes it a reliable driver. */
		ferry_rldrv_ops(backend, &dp->rl_ops);
		dp->rl = true;
		ops = &dp->rl_ops;
	}
	dp->ops = ops;
	dp->poll_mode = cfg->poll_mode;
	dp->spin_ns = (uint64_t)(cfg->spin_us ? cfg->spin_us : DEFAULT_SPIN_US) * 1000ull;
	dp->splice = (ops->caps & FERRY_DRV_SPLICE) && !cfg->no_splice;
	dp->onesided = (ops->caps & FERRY_DRV_ONESIDED) && ops->write_remote;
	dp->peek = !dp->splice && ops->rx_peek && ops->rx_consume && !cfg->no_rx_peek;
	dp->window = cfg->window ? cfg->window : DEFAULT_WINDOW;
	pthread_mutex_init(&dp->lock, NULL);
	/* The user's options first (the first match wins), then the daemon's. */
	const char *opts[65];
	unsigned nuser = 0, n = 0;
	for (const char *const *o = cfg->driver_options; o && *o; o++, nuser++)
		if (nuser < 64)
			opts[n++] = *o;
	for (const char *const *o = cfg->driver_defaults; o && *o && n < 64; o++)
		opts[n++] = *o;
	opts[n] = NULL;
	if (nuser > 64) {
		free(dp);
		return ferry_err_set(err, EINVAL, "too many driver options (%u, at most 64)", nuser);
	}
	unsigned long long seen = 0;
	struct ferry_driver_config dcfg = { .options = opts, .seen = &seen };
	int rc = backend ? ferry_rldrv_open(backend, &dcfg, &dp->dev, err) : ops->open(&dcfg, &dp->dev, err);
	if (rc) {
		free(dp);
		return rc;
	}
	/* Checked after open: the driver's reads are the list of its options. */
	if ((rc = ferry_driver_options_check(&dcfg, nuser, name, err))) {
		ops->close(dp->dev);
		free(dp);
		return rc;
	}
	dp->stop_evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (dp->stop_evfd < 0) {
		rc = ferry_err_set(err, errno, "eventfd: %s", strerror(errno));
		ops->close(dp->dev);
		free(dp);
		return rc;
	}
	rc = pthread_create(&dp->acceptor, NULL, dp_acceptor_main, dp);
	if (rc) {
		close(dp->stop_evfd);
		ops->close(dp->dev);
		free(dp);
		return ferry_err_set(err, rc, "cannot start the lane acceptor: %s", strerror(rc));
	}
	*out = dp;
	return 0;
}

void ferry_dp_close(struct ferry_dp *dp)
{
	if (!dp)
		return;
	wake(dp->stop_evfd);
	pthread_join(dp->acceptor, NULL);
	while (dp->sessions)
		ferry_session_close(dp->sessions);
	close(dp->stop_evfd);
	dp->ops->close(dp->dev);
	pthread_mutex_destroy(&dp->lock);
	free(dp);
}

int ferry_dp_endpoint(struct ferry_dp *dp, char *buf, size_t len, struct ferry_err *err)
{
	return dp->ops->local_endpoint(dp->dev, buf, len, err);
}

uint64_t ferry_dp_window(const struct ferry_dp *dp)
{
	return dp->window;
}

const char *ferry_dp_driver_name(const struct ferry_dp *dp)
{
	return dp->ops->name;
}

uint32_t ferry_dp_checksum(uint32_t crc, const void *buf, size_t len)
{
	return ferry_crc32c(crc, buf, len);
}

uint64_t ferry_dp_rejected_lanes(const struct ferry_dp *dp)
{
	return __atomic_load_n(&dp->rejected, __ATOMIC_RELAXED);
}

/* ---- public: session ----------------------------------------------------- */

int ferry_session_add_stream(struct ferry_session *s, int fd, struct ferry_err *err)
{
	if (!s->is_src || s->listen_fd >= 0 || s->handoff)
		return ferry_err_set(err, EINVAL, "session %u: only a source session without a listening socket adopts streams",
				     s->id);
	if (s->accepted >= s->max_streams)
		return ferry_err_set(err, ENOSPC, "session %u: already carries its %u streams", s->id, s->max_streams);
	pthread_mutex_lock(&s->lock);
	enum ferry_session_state state = s->state;
	pthread_mutex_unlock(&s->lock);
	if (state != FERRY_SESSION_ACTIVE)
		return ferry_err_set(err, EIO, "session %u is not active", s->id);
	return src_stream_start(s, fd, err);
}

int ferry_session_wait_streams(struct ferry_session *s, unsigned n, int timeout_ms, struct ferry_err *err)
{
	struct timespec dl;
	deadline_ts(&dl, timeout_ms);
	int rc = 0;
	pthread_mutex_lock(&s->lock);
	while (s->streams_acked < n && s->state == FERRY_SESSION_ACTIVE && !s->stop) {
		if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT) {
			rc = ferry_err_set(err, ETIMEDOUT, "session %u: the peer connected %u of %u streams within %d ms",
					   s->id, s->streams_acked, n, timeout_ms);
			break;
		}
	}
	if (!rc && s->streams_acked < n)
		rc = ferry_err_set(err, EIO, "session %u failed: %s", s->id, s->error[0] ? s->error : "closed");
	pthread_mutex_unlock(&s->lock);
	return rc;
}

void ferry_session_abort(struct ferry_session *s, const char *reason)
{
	session_fail(s, true, "aborted: %s", reason);
}

void ferry_session_close(struct ferry_session *s)
{
	if (!s)
		return;
	if (s->dp)
		dp_unlink(s->dp, s);
	pthread_mutex_lock(&s->lock);
	s->stop = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	if (s->acc_evfd >= 0)
		wake(s->acc_evfd);
	for (unsigned i = 0; i < s->nlanes; i++)
		if (s->lanes[i].evfd >= 0)
			wake(s->lanes[i].evfd);
	if (s->acceptor_started)
		pthread_join(s->acceptor, NULL);
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		if (l->thread_started)
			pthread_join(l->thread, NULL);
		for (unsigned k = 0; k < l->nstreams; k++)
			stream_free(l->streams[k]);
		for (unsigned k = 0; k < l->ninbox; k++)
			stream_free(l->inbox[k]);
		if (l->drv)
			s->dp->ops->lane_close(l->drv);
		if (l->evfd >= 0)
			close(l->evfd);
		pthread_mutex_destroy(&l->lock);
	}
	if (s->listen_fd >= 0) {
		close(s->listen_fd);
		if (s->unix_path[0])
			unlink(s->unix_path);
	}
	if (s->acc_evfd >= 0)
		close(s->acc_evfd);
	for (unsigned i = 0; i < MAX_REGIONS; i++)
		if (s->regions[i].used)
			s->dp->ops->mem_deregister(s->dp->dev, &s->regions[i].mr);
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

static void rel_stats(struct ferry_lane_drv *drv, struct ferry_rel_stats *o)
{
	struct ferry_rl_stats r;
	struct ferry_fault_stats f;
	ferry_rldrv_lane_stats(drv, &r, &f);
	*o = (struct ferry_rel_stats){
		.tx_datagrams = r.tx_datagrams, .tx_data = r.tx_data, .retransmits = r.retransmits,
		.retx_timeout = r.rto_retransmits, .retx_sack = r.fast_retransmits, .tlp_probes = r.tlp_probes,
		.timeouts = r.timeouts, .loss_events = r.loss_events, .rx_datagrams = r.rx_datagrams,
		.dup_drops = r.dup_drops, .corrupt_drops = r.corrupt_drops, .reorder_buffered = r.reorder_buffered,
		.window_drops = r.window_drops, .malformed_drops = r.malformed_drops, .cwnd = r.cwnd,
		.srtt_ns = r.srtt_ns, .rto_ns = r.rto_ns, .inflight_bytes = r.inflight_bytes,
		.fault_dropped = f.dropped, .fault_duplicated = f.duplicated, .fault_reordered = f.reordered,
		.fault_corrupted = f.corrupted, .tx_by_ref = r.tx_by_ref,
		.spurious_timeouts = r.spurious_timeouts,
	};
}

/* A session's sum: counters add up, state is the largest lane's. */
static void rel_add(struct ferry_rel_stats *sum, const struct ferry_rel_stats *l)
{
	static const size_t state[] = { offsetof(struct ferry_rel_stats, cwnd), offsetof(struct ferry_rel_stats, srtt_ns),
					offsetof(struct ferry_rel_stats, rto_ns),
					offsetof(struct ferry_rel_stats, inflight_bytes) };
	for (size_t off = 0; off < sizeof(*sum); off += sizeof(uint64_t)) {
		uint64_t *d = (uint64_t *)((char *)sum + off);
		uint64_t v = *(const uint64_t *)((const char *)l + off);
		bool is_state = false;
		for (size_t k = 0; k < sizeof(state) / sizeof(state[0]); k++)
			is_state |= state[k] == off;
		*d = is_state ? (v > *d ? v : *d) : *d + v;
	}
}

void ferry_session_stats(struct ferry_session *s, struct ferry_session_stats *st)
{
	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&s->lock);
	st->state = s->state;
	st->lanes = s->nlanes;
	memcpy(st->lanes_note, s->lanes_note, sizeof(st->lanes_note));
	st->lanes_up = s->lanes_up;
	st->streams_opened = s->streams_opened;
	st->streams_closed = s->streams_closed;
	st->streams_refused = s->streams_refused;
	memcpy(st->error, s->error, sizeof(st->error));
	pthread_mutex_unlock(&s->lock);
	uint64_t now = now_ns();
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		struct ferry_lane_stats *ls = &st->lane[i];
		/* Plain reads of counters one thread writes: a torn read is
		 * impossible for aligned 64-bit words on the targets we build for. */
		ls->tx_bytes = __atomic_load_n(&l->tx_bytes, __ATOMIC_RELAXED);
		ls->rx_bytes = __atomic_load_n(&l->rx_bytes, __ATOMIC_RELAXED);
		ls->tx_frames = __atomic_load_n(&l->tx_frames, __ATOMIC_RELAXED);
		ls->rx_frames = __atomic_load_n(&l->rx_frames, __ATOMIC_RELAXED);
		ls->rx_direct_bytes = __atomic_load_n(&l->rx_direct_bytes, __ATOMIC_RELAXED);
		uint64_t start = __atomic_load_n(&l->start_ns, __ATOMIC_RELAXED);
		uint64_t idle = __atomic_load_n(&l->idle_ns, __ATOMIC_RELAXED);
		ls->idle_pct = start && now > start ? 100.0 * (double)idle / (double)(now - start) : 0.0;
		st->tx_bytes += ls->tx_bytes;
		st->rx_bytes += ls->rx_bytes;
		st->rx_direct_bytes += ls->rx_direct_bytes;
		/* A datagram lane's drv, once set, lives until the session is
		 * closed (it cannot be handed off): no lock needed to use it. */
		struct ferry_lane_drv *drv = s->dp->rl ? __atomic_load_n(&l->drv, __ATOMIC_ACQUIRE) : NULL;
		if (drv) {
			ls->reliable = st->reliable = true;
			rel_stats(drv, &ls->rel);
			rel_add(&st->rel, &ls->rel);
		}
	}
}

int ferry_session_wait_active(struct ferry_session *s, int timeout_ms, struct ferry_err *err)
{
	struct timespec dl;
	deadline_ts(&dl, timeout_ms);
	pthread_mutex_lock(&s->lock);
	while (s->state == FERRY_SESSION_CONNECTING) {
		if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT)
			break;
	}
	enum ferry_session_state st = s->state;
	int rc = 0;
	if (st == FERRY_SESSION_CONNECTING)
		rc = ferry_err_set(err, ETIMEDOUT, "session %u: only %u of %u lanes arrived within %d ms", s->id,
				   s->lanes_up, s->nlanes, timeout_ms);
	else if (st != FERRY_SESSION_ACTIVE)
		rc = ferry_err_set(err, EIO, "session %u failed: %s", s->id, s->error);
	pthread_mutex_unlock(&s->lock);
	return rc;
}

bool ferry_dp_can_handoff(const struct ferry_dp *dp)
{
	return (dp->ops->caps & FERRY_DRV_HANDOFF) && dp->ops->lane_detach_fd;
}

int ferry_session_take_fd(struct ferry_session *s, int timeout_ms, struct ferry_err *err)
{
	if (!s->handoff)
		return ferry_err_set(err, EINVAL, "session %u is not a handoff session", s->id);
	int rc = ferry_session_wait_active(s, timeout_ms, err);
	if (rc)
		return rc;
	/* The acceptor attaches lanes under dp->lock; take it so the lane is ours. */
	pthread_mutex_lock(&s->dp->lock);
	struct ferry_lane_drv *drv = s->lanes[0].drv;
	s->lanes[0].drv = NULL;
	pthread_mutex_unlock(&s->dp->lock);
	if (!drv)
		return ferry_err_set(err, EALREADY, "session %u's connection was already handed over", s->id);
	int fd = s->dp->ops->lane_detach_fd(drv, err);
	if (fd < 0) {
		s->dp->ops->lane_close(drv);
		return fd;
	}
	return fd;
}

/* ---- public: regions ----------------------------------------------------- */

int ferry_region_add(struct ferry_session *s, uint32_t id, void *base, size_t len, struct ferry_err *err)
{
	pthread_mutex_lock(&s->lock);
	struct region *slot = NULL;
	for (unsigned i = 0; i < MAX_REGIONS; i++) {
		if (s->regions[i].used && s->regions[i].id == id) {
			pthread_mutex_unlock(&s->lock);
			return ferry_err_set(err, EEXIST, "region %u already added", id);
		}
		if (!s->regions[i].used && !slot)
			slot = &s->regions[i];
	}
	if (!slot) {
		pthread_mutex_unlock(&s->lock);
		return ferry_err_set(err, ENOSPC, "at most %d regions per session", MAX_REGIONS);
	}
	int rc = s->dp->ops->mem_register(s->dp->dev, base, len, &slot->mr, err);
	if (rc == 0) {
		slot->id = id;
		slot->base = base;
		slot->len = len;
		uint64_t key[2] = { htobe64(slot->mr.rkey), htobe64((uint64_t)len) };
		memcpy(slot->key_msg, key, sizeof(key));
		/* Published under the lock; lanes look regions up after this returns. */
		__atomic_store_n(&slot->used, true, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}

int ferry_region_write(struct ferry_session *s, uint32_t id, uint64_t offset, size_t len, struct ferry_err *err)
{
	struct region *r = find_region(s, id);
	if (!r)
		return ferry_err_set(err, ENOENT, "no region %u", id);
	if (offset > r->len || len > r->len - offset)
		return ferry_err_set(err, ERANGE, "write of %zu bytes at %" PRIu64 " is outside region %u (%zu bytes)",
				     len, offset, id, r->len);
	if (!s->is_src)
		return ferry_err_set(err, EINVAL, "region writes go from the source side");
	/* Spread the range over the lanes in lane-sized slices. */
	size_t slice = (len + s->nlanes - 1) / s->nlanes;
	if (slice < REGION_FRAME)
		slice = REGION_FRAME;
	for (unsigned i = 0; i < s->nlanes && len > 0; i++) {
		struct lane *l = &s->lanes[i];
		size_t n = len < slice ? len : slice;
		pthread_mutex_lock(&l->lock);
		if (l->job_count == REGION_JOBS) {
			pthread_mutex_unlock(&l->lock);
			return ferry_err_set(err, EBUSY, "lane %u has %d region writes queued; fence first", i, REGION_JOBS);
		}
		l->jobs[(l->job_head + l->job_count) % REGION_JOBS] = (struct region_job){ r, offset, n };
		l->job_count++;
		pthread_mutex_unlock(&l->lock);
		wake(l->evfd);
		offset += n;
		len -= n;
	}
	return 0;
}

int ferry_region_fence(struct ferry_session *s, int timeout_ms, struct ferry_err *err)
{
	pthread_mutex_lock(&s->lock);
	uint64_t token = ++s->fence_token;
	pthread_mutex_unlock(&s->lock);
	for (unsigned i = 0; i < s->nlanes; i++) {
		struct lane *l = &s->lanes[i];
		pthread_mutex_lock(&l->lock);
		l->fence_req = token;
		pthread_mutex_unlock(&l->lock);
		wake(l->evfd);
	}
	struct timespec dl;
	deadline_ts(&dl, timeout_ms);
	pthread_mutex_lock(&s->lock);
	int rc = 0;
	for (;;) {
		if (s->state == FERRY_SESSION_FAILED) {
			rc = ferry_err_set(err, EIO, "session failed: %s", s->error);
			break;
		}
		unsigned acked = 0;
		for (unsigned i = 0; i < s->nlanes; i++)
			acked += s->lanes[i].fence_acked >= token;
		if (acked == s->nlanes)
			break;
		if (pthread_cond_timedwait(&s->cond, &s->lock, &dl) == ETIMEDOUT) {
			rc = ferry_err_set(err, ETIMEDOUT, "fence: %u of %u lanes acknowledged within %d ms", acked,
					   s->nlanes, timeout_ms);
			break;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}
