#include "nbdpath.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "jsonline.h"
#include "migrate.h"
#include "tunnel.h"

#define REQ_TIMEOUT_MS    30000
#define HANDSHAKE_S       10      /* a client or target silent this long in the handshake is dropped */
#define LANE_CONNECT_MS   15000   /* the destination waits this long for a session's lanes */
#define MAX_PATHS         64
#define MAX_DST           256
#define MAX_CLIENTS       32      /* NBD clients served at once by one path */
#define SRC_SLOTS         128     /* requests in flight per client */
#define SRC_BYTES_BUDGET  (256u << 20) /* READ/WRITE bytes in flight per client */
#define DST_SLOTS         256     /* requests in flight per lane */
#define DST_HOLES         32      /* hole chunks remembered per READ; past that holes travel as data */
#define MAX_EXPORT_NAME   FERRY_NBD_MAX_STRING
#define DRAIN_S           10      /* a closing lane waits this long for the target's last replies */

static void vlog_(void (*log)(void *, const char *), void *ctx, const char *fmt, va_list ap)
{
	char msg[1024];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	if (log)
		log(ctx, msg);
}

struct ferry_nbd_registry {
	struct ferry_dp *dp;
	char run_dir[PATH_MAX];
	void (*log)(void *ctx, const char *msg);
	void *log_ctx;
	pthread_mutex_t lock;
	struct nbd_src *src[MAX_PATHS];
	struct nbd_dst *dst[MAX_DST];
	pthread_t watch_thr;          /* housekeeping: failed sessions, ended ones */
	bool watch_started, stopping;
	pthread_cond_t watch_cond;
};

static void rlog(struct ferry_nbd_registry *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void rlog(struct ferry_nbd_registry *r, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vlog_(r->log, r->log_ctx, fmt, ap);
	va_end(ap);
}

static int writev_full(int fd, struct iovec *iov, int n, struct ferry_err *err)
{
	while (n > 0) {
		ssize_t w = writev(fd, iov, n > IOV_MAX ? IOV_MAX : n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return ferry_err_set(err, errno == EPIPE ? ECONNRESET : errno, "write: %s", strerror(errno));
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

/* Deep socket buffers on the lanes' local sockets: a 256 KiB request and its
 * neighbours fit without the writer waiting for the data plane. */
static void set_bufs(int fd)
{
	int sz = 4 << 20;
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
}

static void set_rcv_timeout(int fd, int seconds)
{
	struct timeval tv = { .tv_sec = seconds };
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

/* A plain unix connection (jsonline's connect, without its framing). */
static int connect_unix(const char *path, struct ferry_err *err)
{
	struct ferry_jl jl;
	int rc = ferry_jl_connect_unix(path, 0, &jl, err);
	return rc ? rc : jl.fd; /* nothing else of jl is allocated before use */
}

static int listen_unix(const char *path, struct ferry_err *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return ferry_err_set(err, ENAMETOOLONG, "socket path %s too long", path);
	strcpy(sa.sun_path, path);
	struct stat st;
	/* Replace a stale socket from an earlier run, never any other file. */
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 64)) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		return ferry_err_set(err, e, "cannot listen on %s: %s", path, strerror(e));
	}
	return fd;
}

/* Connect to the target export and run the client handshake. */
static int target_connect(const char *target, const char *export, struct ferry_nbd_export_info *info,
			  struct ferry_nbd_neg *neg, struct ferry_err *err)
{
	int fd = connect_unix(target, err);
	if (fd < 0)
		return fd;
	set_rcv_timeout(fd, HANDSHAKE_S);
	int rc = ferry_nbd_client_handshake(fd, export, info, neg, err);
	if (rc) {
		close(fd);
		return ferry_err_prefix(err, "NBD export '%s' at %s", export, target);
	}
	set_rcv_timeout(fd, 0);
	return fd;
}

json_t *ferry_nbd_info_json(const struct ferry_nbd_export_info *info)
{
	return json_pack("{s:I, s:i, s:I, s:I, s:I, s:b}", "size", (json_int_t)info->size, "flags", (int)info->flags,
			 "min_block", (json_int_t)info->min_block, "pref_block", (json_int_t)info->pref_block,
			 "max_block", (json_int_t)info->max_block, "base_allocation", info->base_allocation);
}

int ferry_nbd_info_parse(json_t *j, struct ferry_nbd_export_info *info, struct ferry_err *err)
{
	json_t *size = json_object_get(j, "size"), *flags = json_object_get(j, "flags");
	if (!json_is_integer(size) || json_integer_value(size) < 0 || !json_is_integer(flags) ||
	    json_integer_value(flags) < 0 || json_integer_value(flags) > 0xffff)
		return ferry_err_set(err, EPROTO, "the peer's export description has no valid size and flags");
	memset(info, 0, sizeof(*info));
	info->size = (uint64_t)json_integer_value(size);
	info->flags = (uint16_t)json_integer_value(flags);
	json_int_t v;
	if ((v = json_integer_value(json_object_get(j, "min_block"))) > 0 && v <= 65536)
		info->min_block = (uint32_t)v;
	if ((v = json_integer_value(json_object_get(j, "pref_block"))) > 0 && v <= (32 << 20))
		info->pref_block = (uint32_t)v;
	if ((v = json_integer_value(json_object_get(j, "max_block"))) > 0 && v <= UINT32_MAX)
		info->max_block = (uint32_t)v;
	info->base_allocation = json_is_true(json_object_get(j, "base_allocation"));
	return 0;
}

/* ======================================================================
 * Destination: lanes to the target export
 * ====================================================================== */

struct dst_slot {
	bool used;
	struct ferry_blk_req req;
	uint8_t *buf;                 /* READ: the data, zero where holes are */
	struct { uint32_t off, len; } holes[DST_HOLES];
	unsigned nholes;
	bool holes_lost;              /* more hole chunks than remembered: send as data */
	uint8_t *ext;                 /* BLOCK_STATUS: u32 count + descriptors */
	uint32_t ext_len;
	uint32_t error;
};

struct dst_lane {
	struct nbd_dst *d;
	unsigned idx;
	int sfd, tfd;                 /* stream from the source; target NBD connection */
	struct ferry_nbd_neg neg;
	pthread_t req_thr, rep_thr;
	bool started;
	pthread_mutex_t wlock;        /* writes to sfd */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct dst_slot slot[DST_SLOTS];
	unsigned used;
	bool dead;
};

struct nbd_dst {
	struct ferry_nbd_registry *r;
	uint32_t id;
	char target[PATH_MAX];
	char export[MAX_EXPORT_NAME + 1];
	char sock[PATH_MAX];
	struct ferry_session *sess;
	struct ferry_nbd_export_info info;
	unsigned nlanes;
	struct dst_lane *lane;
	int listen_fd;
	pthread_t accept_thr;
	bool accept_started;
	pthread_mutex_t lock;
	unsigned lanes_ended;
	bool accept_done;
	bool failed_seen;             /* the watcher saw its session fail */
	uint64_t requests;
};

static void dlog(struct nbd_dst *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dlog(struct nbd_dst *d, const char *fmt, ...)
{
	char msg[900];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	rlog(d->r, "nbd session %u (%s): %s", d->id, d->target, msg);
}

static int dst_send_reply(struct dst_lane *l, const struct ferry_blk_rep *rep, struct iovec *extra, int nextra)
{
	uint8_t h[FERRY_BLK_REP_LEN];
	ferry_blk_rep_encode(rep, h);
	struct iovec iov[2 + 2 * FERRY_BLK_MAX_SEGS];
	iov[0] = (struct iovec){ h, sizeof(h) };
	for (int i = 0; i < nextra; i++)
		iov[1 + i] = extra[i];
	struct ferry_err err = { 0 };
	pthread_mutex_lock(&l->wlock);
	int rc = writev_full(l->sfd, iov, 1 + nextra, &err);
	pthread_mutex_unlock(&l->wlock);
	return rc;
}

static int dst_reply_error(struct dst_lane *l, uint64_t handle, uint32_t error)
{
	struct ferry_blk_rep rep = { .error = error, .handle = handle };
	return dst_send_reply(l, &rep, NULL, 0);
}

static int cmp_hole(const void *a, const void *b)
{
	const uint32_t *x = a, *y = b;
	return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* The finished reply of one slot, to the source. */
static int dst_finish(struct dst_lane *l, struct dst_slot *s)
{
	struct ferry_blk_rep rep = { .error = s->error, .handle = s->req.handle };
	if (s->error)
		return dst_send_reply(l, &rep, NULL, 0);
	if (s->req.type == FERRY_NBD_CMD_BLOCK_STATUS) {
		rep.length = s->ext_len;
		struct iovec iov = { s->ext, s->ext_len };
		return dst_send_reply(l, &rep, &iov, 1);
	}
	if (s->req.type != FERRY_NBD_CMD_READ)
		return dst_send_reply(l, &rep, NULL, 0);
	/* Segments: data between the holes the target reported, holes bare. */
	uint8_t segh[FERRY_BLK_MAX_SEGS][FERRY_BLK_SEG_LEN];
	struct iovec iov[2 * FERRY_BLK_MAX_SEGS];
	int n = 0, nseg = 0;
	uint32_t pos = 0, len = s->req.length;
	if (s->holes_lost)
		s->nholes = 0;
	qsort(s->holes, s->nholes, sizeof(s->holes[0]), cmp_hole);
	for (unsigned i = 0; i < s->nholes; i++)
		if (s->holes[i].off < pos || (i && s->holes[i].off < s->holes[i - 1].off + s->holes[i - 1].len))
			s->nholes = 0; /* overlapping: send all as data */
	for (unsigned i = 0; i <= s->nholes; i++) {
		uint32_t hoff = i < s->nholes ? s->holes[i].off : len;
		if (hoff > pos) {
			ferry_blk_seg_encode(FERRY_BLK_SEG_DATA, hoff - pos, segh[nseg]);
			iov[n++] = (struct iovec){ segh[nseg++], FERRY_BLK_SEG_LEN };
			iov[n++] = (struct iovec){ s->buf + pos, hoff - pos };
			rep.length += FERRY_BLK_SEG_LEN + (hoff - pos);
		}
		if (i < s->nholes) {
			ferry_blk_seg_encode(FERRY_BLK_SEG_HOLE, s->holes[i].len, segh[nseg]);
			iov[n++] = (struct iovec){ segh[nseg++], FERRY_BLK_SEG_LEN };
			rep.length += FERRY_BLK_SEG_LEN;
			pos = hoff + s->holes[i].len;
		}
	}
	return dst_send_reply(l, &rep, iov, n);
}

static void dst_slot_free(struct dst_lane *l, struct dst_slot *s)
{
	free(s->buf);
	free(s->ext);
	memset(s, 0, sizeof(*s));
	pthread_mutex_lock(&l->lock);
	l->used--;
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
}

/* Target replies -> block replies. */
static void *dst_rep_main(void *arg)
{
	struct dst_lane *l = arg;
	struct nbd_dst *d = l->d;
	struct ferry_err err = { 0 };
	int rc = 0;
	bool source_gone = false;
	for (;;) {
		struct ferry_nbd_reply r;
		if ((rc = ferry_nbd_read_reply(l->tfd, &r, &err)))
			break;
		if (r.cookie >= DST_SLOTS || !l->slot[r.cookie].used) {
			rc = ferry_err_set(&err, EPROTO, "target replied to unknown cookie %llu", (unsigned long long)r.cookie);
			break;
		}
		struct dst_slot *s = &l->slot[r.cookie];
		bool done = true;
		if (!r.structured) {
			s->error = r.error;
			if (s->req.type == FERRY_NBD_CMD_READ && !r.error &&
			    (rc = ferry_nbd_read_full(l->tfd, s->buf, s->req.length, &err)))
				break;
		} else {
			done = r.flags & FERRY_NBD_REPLY_FLAG_DONE;
			uint8_t *p = NULL;
			/* Data goes straight into the slot's buffer; other payloads are small. */
			if (r.type == FERRY_NBD_REPLY_TYPE_OFFSET_DATA) {
				uint8_t o[8];
				if (r.length < 8 || s->req.type != FERRY_NBD_CMD_READ) {
					rc = ferry_err_set(&err, EPROTO, "target sent a malformed data chunk");
					break;
				}
				if ((rc = ferry_nbd_read_full(l->tfd, o, 8, &err)))
					break;
				uint64_t off = ferry_nbd_get64(o), n = r.length - 8;
				if (off < s->req.offset || off - s->req.offset + n > s->req.length) {
					rc = ferry_err_set(&err, EPROTO, "target sent data outside the read");
					break;
				}
				if ((rc = ferry_nbd_read_full(l->tfd, s->buf + (off - s->req.offset), n, &err)))
					break;
			} else {
				p = malloc(r.length ? r.length : 1);
				if (!p) {
					rc = ferry_err_set(&err, ENOMEM, "out of memory");
					break;
				}
				if ((rc = ferry_nbd_read_full(l->tfd, p, r.length, &err))) {
					free(p);
					break;
				}
				if (r.type == FERRY_NBD_REPLY_TYPE_OFFSET_HOLE && r.length == 12 &&
				    s->req.type == FERRY_NBD_CMD_READ) {
					uint64_t off = ferry_nbd_get64(p);
					uint32_t n = ferry_nbd_get32(p + 8);
					if (off < s->req.offset || off - s->req.offset + n > s->req.length) {
						free(p);
						rc = ferry_err_set(&err, EPROTO, "target sent a hole outside the read");
						break;
					}
					if (s->nholes < DST_HOLES)
						s->holes[s->nholes++] = (typeof(s->holes[0])){ (uint32_t)(off - s->req.offset), n };
					else
						s->holes_lost = true;
				} else if (r.type == FERRY_NBD_REPLY_TYPE_BLOCK_STATUS && r.length >= 12 && (r.length - 4) % 8 == 0 &&
					   s->req.type == FERRY_NBD_CMD_BLOCK_STATUS && !s->ext) {
					/* Re-frame as a count and the descriptors (the context id is ours to choose). */
					uint32_t count = (r.length - 4) / 8;
					ferry_nbd_put32(p, count);
					s->ext = p;
					s->ext_len = r.length;
					p = NULL;
				} else if (r.type & 0x8000u) {
					s->error = r.length >= 4 ? ferry_nbd_get32(p) : FERRY_NBD_EIO;
					if (!s->error)
						s->error = FERRY_NBD_EIO;
				} else if (r.type != FERRY_NBD_REPLY_TYPE_NONE) {
					free(p);
					rc = ferry_err_set(&err, EPROTO, "target sent an unexpected chunk type %u", r.type);
					break;
				}
				free(p);
			}
		}
		if (!done)
			continue;
		if (!s->error && s->req.type == FERRY_NBD_CMD_BLOCK_STATUS && !s->ext)
			s->error = FERRY_NBD_EIO; /* done without any extent */
		/* With the source gone, keep draining the target's replies until it
		 * closes after our DISC: a server whose replies hit a closed socket
		 * may take it badly. */
		if (!source_gone && dst_finish(l, s)) {
			source_gone = true;
			shutdown(l->sfd, SHUT_RDWR); /* the request thread stops reading */
		}
		dst_slot_free(l, s);
	}
	if (rc && rc != -ECONNRESET)
		dlog(d, "lane %u: %s", l->idx, err.msg);
	pthread_mutex_lock(&l->lock);
	l->dead = true;
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
	shutdown(l->sfd, SHUT_RDWR); /* the source sees the lane end */
	return NULL;
}

/* Block requests from the source -> the target. */
static void *dst_req_main(void *arg)
{
	struct dst_lane *l = arg;
	struct nbd_dst *d = l->d;
	struct ferry_err err = { 0 };
	int rc;
	uint8_t *wbuf = NULL;
	for (;;) {
		uint8_t h[FERRY_BLK_REQ_LEN];
		struct ferry_blk_req q;
		if ((rc = ferry_nbd_read_full(l->sfd, h, sizeof(h), &err)) || (rc = ferry_blk_req_decode(h, &q, &err)))
			break;
		struct ferry_nbd_request nr = { .flags = q.flags, .type = q.type, .offset = q.offset, .length = q.length };
		/* The source checked the request; check again, this host's export is at stake. */
		struct ferry_nbd_neg neg = { .structured = true, .meta_alloc = true };
		char why[256];
		uint32_t e = q.type == FERRY_NBD_CMD_DISC ? FERRY_NBD_EINVAL
							  : ferry_nbd_check_request(&nr, &d->info, &neg, why, sizeof(why));
		if (q.type == FERRY_NBD_CMD_WRITE) {
			free(wbuf);
			wbuf = malloc(q.length ? q.length : 1);
			if (!wbuf) {
				rc = ferry_err_set(&err, ENOMEM, "out of memory");
				break;
			}
			if ((rc = ferry_nbd_read_full(l->sfd, wbuf, q.length, &err)))
				break;
		}
		if (e) {
			dlog(d, "lane %u: refused a block request: %s", l->idx, why);
			if ((rc = dst_reply_error(l, q.handle, e)))
				break;
			continue;
		}
		if (q.type == FERRY_NBD_CMD_BLOCK_STATUS && !l->neg.meta_alloc) {
			/* The target has no allocation map: all of it is data. */
			uint8_t ext[12];
			ferry_nbd_put32(ext, 1);
			ferry_nbd_put32(ext + 4, q.length);
			ferry_nbd_put32(ext + 8, 0);
			struct ferry_blk_rep rep = { .handle = q.handle, .length = sizeof(ext) };
			struct iovec iov = { ext, sizeof(ext) };
			if ((rc = dst_send_reply(l, &rep, &iov, 1)))
				break;
			continue;
		}
		pthread_mutex_lock(&l->lock);
		while (l->used >= DST_SLOTS && !l->dead)
			pthread_cond_wait(&l->cond, &l->lock);
		bool dead = l->dead;
		unsigned i = 0;
		while (!dead && l->slot[i].used)
			i++;
		if (!dead) {
			l->slot[i].used = true;
			l->used++;
		}
		pthread_mutex_unlock(&l->lock);
		if (dead) {
			rc = ferry_err_set(&err, EPIPE, "the target connection ended");
			break;
		}
		struct dst_slot *s = &l->slot[i];
		s->req = q;
		if (q.type == FERRY_NBD_CMD_READ && !(s->buf = calloc(1, q.length))) {
			dst_slot_free(l, s);
			if ((rc = dst_reply_error(l, q.handle, FERRY_NBD_ENOMEM)))
				break;
			continue;
		}
		__atomic_fetch_add(&d->requests, 1, __ATOMIC_RELAXED);
		nr.cookie = i;
		nr.flags &= (uint16_t)~FERRY_NBD_CMD_FLAG_DF; /* ferry reassembles reads itself */
		if (q.type == FERRY_NBD_CMD_BLOCK_STATUS)
			nr.flags &= FERRY_NBD_CMD_FLAG_REQ_ONE;
		uint8_t th[FERRY_NBD_REQUEST_LEN];
		ferry_nbd_request_encode(&nr, th);
		struct iovec iov[2] = { { th, sizeof(th) }, { wbuf, q.type == FERRY_NBD_CMD_WRITE ? q.length : 0 } };
		if ((rc = writev_full(l->tfd, iov, q.type == FERRY_NBD_CMD_WRITE ? 2 : 1, &err)))
			break; /* the reply thread sees the target go and fails the lane */
	}
	free(wbuf);
	if (rc && rc != -ECONNRESET)
		dlog(d, "lane %u: %s", l->idx, err.msg);
	/* Let the target finish what is in flight (bounded), then the reply thread ends. */
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += DRAIN_S;
	pthread_mutex_lock(&l->lock);
	while (l->used > 0 && !l->dead)
		if (pthread_cond_timedwait(&l->cond, &l->lock, &until) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&l->lock);
	struct ferry_nbd_request disc = { .type = FERRY_NBD_CMD_DISC };
	uint8_t th[FERRY_NBD_REQUEST_LEN];
	ferry_nbd_request_encode(&disc, th);
	(void)ferry_nbd_write_full(l->tfd, th, sizeof(th), NULL);
	shutdown(l->tfd, SHUT_WR);
	return NULL;
}

/* Accept the session's lanes on the private socket, each paired with its
 * own connection to the target export. */
static void *dst_accept_main(void *arg)
{
	struct nbd_dst *d = arg;
	unsigned n;
	for (n = 0; n < d->nlanes; n++) {
		struct pollfd p = { .fd = d->listen_fd, .events = POLLIN };
		if (poll(&p, 1, LANE_CONNECT_MS) <= 0) {
			dlog(d, "only %u of %u lanes arrived", n, d->nlanes);
			break;
		}
		int sfd = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (sfd < 0) {
			dlog(d, "accept: %s", strerror(errno));
			break;
		}
		struct dst_lane *l = &d->lane[n];
		set_bufs(sfd);
		l->sfd = sfd;
		struct ferry_err err = { 0 };
		struct ferry_nbd_export_info info;
		l->tfd = target_connect(d->target, d->export, &info, &l->neg, &err);
		if (l->tfd < 0) {
			dlog(d, "lane %u: %s", n, err.msg);
			close(sfd);
			l->sfd = -1;
			break;
		}
		if (pthread_create(&l->rep_thr, NULL, dst_rep_main, l) == 0) {
			if (pthread_create(&l->req_thr, NULL, dst_req_main, l) == 0) {
				pthread_mutex_lock(&l->lock);
				l->started = true;
				pthread_mutex_unlock(&l->lock);
				continue;
			}
			shutdown(l->tfd, SHUT_RDWR);
			pthread_join(l->rep_thr, NULL);
		}
		dlog(d, "lane %u: cannot start its threads", n);
		break;
	}
	pthread_mutex_lock(&d->lock);
	d->accept_done = true;
	close(d->listen_fd);
	d->listen_fd = -1;
	pthread_mutex_unlock(&d->lock);
	unlink(d->sock);
	if (n < d->nlanes) /* a lane could not be made: fail the whole session */
		ferry_session_abort(d->sess, "the destination could not connect every lane to the NBD export");
	return NULL;
}

static void dst_free(struct nbd_dst *d)
{
	if (!d)
		return;
	if (d->sess)
		ferry_session_abort(d->sess, "NBD session closed");
	if (d->accept_started) {
		pthread_mutex_lock(&d->lock);
		if (!d->accept_done && d->listen_fd >= 0)
			shutdown(d->listen_fd, SHUT_RDWR); /* wakes the accepting thread */
		pthread_mutex_unlock(&d->lock);
		pthread_join(d->accept_thr, NULL);
	} else if (d->listen_fd >= 0) {
		close(d->listen_fd);
		unlink(d->sock);
	}
	for (unsigned i = 0; d->lane && i < d->nlanes; i++) {
		struct dst_lane *l = &d->lane[i];
		/* Gently: the lane's threads finish what the target has in flight
		 * and say DISC; only a target silent past DRAIN_S is cut off. */
		if (l->sfd >= 0)
			shutdown(l->sfd, SHUT_RDWR);
		if (l->started) {
			pthread_join(l->req_thr, NULL);
			struct timespec until;
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_sec += DRAIN_S;
			if (pthread_timedjoin_np(l->rep_thr, NULL, &until)) {
				shutdown(l->tfd, SHUT_RDWR);
				pthread_join(l->rep_thr, NULL);
			}
		}
		for (unsigned k = 0; k < DST_SLOTS; k++) {
			free(l->slot[k].buf);
			free(l->slot[k].ext);
		}
		if (l->sfd >= 0)
			close(l->sfd);
		if (l->tfd >= 0)
			close(l->tfd);
		pthread_mutex_destroy(&l->wlock);
		pthread_mutex_destroy(&l->lock);
		pthread_cond_destroy(&l->cond);
	}
	ferry_session_close(d->sess);
	free(d->lane);
	pthread_mutex_destroy(&d->lock);
	free(d);
}

/* A session whose lanes all ended (the source closed them, or went away). */
static bool dst_ended(struct nbd_dst *d)
{
	pthread_mutex_lock(&d->lock);
	bool accepted = d->accept_done;
	pthread_mutex_unlock(&d->lock);
	if (!accepted)
		return false;
	for (unsigned i = 0; i < d->nlanes; i++) {
		struct dst_lane *l = &d->lane[i];
		pthread_mutex_lock(&l->lock);
		bool live = l->started && !l->dead;
		pthread_mutex_unlock(&l->lock);
		if (live)
			return false;
	}
	return true;
}

/* A destination session whose data plane failed (the source daemon died):
 * its lanes stop taking requests, finish what the target has, and end. */
static void watch_dst(struct ferry_nbd_registry *r)
{
	pthread_mutex_lock(&r->lock);
	for (unsigned i = 0; i < MAX_DST; i++) {
		struct nbd_dst *d = r->dst[i];
		if (!d || !d->sess || d->failed_seen)
			continue;
		struct ferry_session_stats st;
		ferry_session_stats(d->sess, &st);
		if (st.state != FERRY_SESSION_FAILED)
			continue;
		d->failed_seen = true;
		dlog(d, "data-plane session failed (%s); ending its lanes", st.error);
		for (unsigned k = 0; k < d->nlanes; k++) {
			pthread_mutex_lock(&d->lane[k].lock);
			if (d->lane[k].started && d->lane[k].sfd >= 0)
				shutdown(d->lane[k].sfd, SHUT_RDWR);
			pthread_mutex_unlock(&d->lane[k].lock);
		}
	}
	pthread_mutex_unlock(&r->lock);
}

/* Free destination sessions that ended by themselves. */
static void reap_dst(struct ferry_nbd_registry *r)
{
	for (unsigned i = 0; i < MAX_DST; i++) {
		pthread_mutex_lock(&r->lock);
		struct nbd_dst *d = r->dst[i] && dst_ended(r->dst[i]) ? r->dst[i] : NULL;
		if (d)
			r->dst[i] = NULL;
		pthread_mutex_unlock(&r->lock);
		if (d) {
			dlog(d, "ended (%llu requests)", (unsigned long long)d->requests);
			dst_free(d);
		}
	}
}

json_t *ferry_nbd_peer_probe(struct ferry_nbd_registry *r, const char *target, const char *export,
			     struct ferry_err *err)
{
	(void)r;
	struct ferry_nbd_export_info info;
	struct ferry_nbd_neg neg;
	int fd = target_connect(target, export, &info, &neg, err);
	if (fd < 0)
		return NULL;
	struct ferry_nbd_request disc = { .type = FERRY_NBD_CMD_DISC };
	uint8_t h[FERRY_NBD_REQUEST_LEN];
	ferry_nbd_request_encode(&disc, h);
	(void)ferry_nbd_write_full(fd, h, sizeof(h), NULL);
	close(fd);
	return json_pack("{s:b, s:o}", "ok", 1, "export", ferry_nbd_info_json(&info));
}

json_t *ferry_nbd_peer_session_open(struct ferry_nbd_registry *r, uint32_t id, const char *target,
				    const char *export, unsigned lanes, uint64_t window, struct ferry_err *err)
{
	reap_dst(r);
	if (lanes < 1 || lanes > FERRY_MAX_STREAMS) {
		ferry_err_set(err, EINVAL, "\"lanes\" must be from 1 to %d", FERRY_MAX_STREAMS);
		return NULL;
	}
	if (strlen(target) >= PATH_MAX || strlen(export) > MAX_EXPORT_NAME) {
		ferry_err_set(err, ENAMETOOLONG, "target or export name too long");
		return NULL;
	}
	struct nbd_dst *d = calloc(1, sizeof(*d));
	struct dst_lane *lane = calloc(lanes, sizeof(*lane));
	if (!d || !lane) {
		free(d);
		free(lane);
		ferry_err_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	d->r = r;
	d->id = id;
	d->listen_fd = -1;
	d->lane = lane;
	d->nlanes = lanes;
	pthread_mutex_init(&d->lock, NULL);
	for (unsigned i = 0; i < lanes; i++) {
		lane[i] = (struct dst_lane){ .d = d, .idx = i, .sfd = -1, .tfd = -1 };
		pthread_mutex_init(&lane[i].wlock, NULL);
		pthread_mutex_init(&lane[i].lock, NULL);
		pthread_cond_init(&lane[i].cond, NULL);
	}
	strcpy(d->target, target);
	strcpy(d->export, export);
	json_t *rep = NULL;
	/* Learn the export again: its size bounds every request this session serves. */
	struct ferry_nbd_neg neg;
	int fd = target_connect(target, export, &d->info, &neg, err);
	if (fd < 0)
		goto fail;
	close(fd);
	if ((size_t)snprintf(d->sock, sizeof(d->sock), "%s/nbd-%u-dst.sock", r->run_dir, id) >= sizeof(d->sock)) {
		ferry_err_set(err, ENAMETOOLONG, "run directory path too long");
		goto fail;
	}
	if ((d->listen_fd = listen_unix(d->sock, err)) < 0)
		goto fail;
	uint8_t token[FERRY_TOKEN_LEN];
	if (getrandom(token, sizeof(token), 0) != sizeof(token)) {
		ferry_err_set(err, EIO, "no randomness for the session token");
		goto fail;
	}
	struct ferry_session_params sp = { .id = id, .lanes = lanes, .max_streams = lanes, .unix_path = d->sock,
					   .timeout_ms = 10000, .window = window };
	memcpy(sp.token, token, sizeof(token));
	if (ferry_session_create_dst(r->dp, &sp, &d->sess, err))
		goto fail;
	if (pthread_create(&d->accept_thr, NULL, dst_accept_main, d)) {
		ferry_err_set(err, EAGAIN, "cannot start a thread");
		goto fail;
	}
	d->accept_started = true;
	pthread_mutex_lock(&r->lock);
	unsigned i;
	for (i = 0; i < MAX_DST && r->dst[i]; i++)
		;
	if (i < MAX_DST)
		r->dst[i] = d;
	pthread_mutex_unlock(&r->lock);
	if (i == MAX_DST) {
		ferry_err_set(err, ENOSPC, "too many NBD sessions on this daemon");
		goto fail;
	}
	char tok[2 * FERRY_TOKEN_LEN + 1];
	for (unsigned k = 0; k < FERRY_TOKEN_LEN; k++)
		sprintf(tok + 2 * k, "%02x", token[k]);
	char ep[FERRY_DP_ENDPOINT_MAX];
	if (ferry_dp_endpoint(r->dp, ep, sizeof(ep), err)) {
		d = NULL; /* in the table: closed by its id */
		(void)ferry_nbd_peer_session_close(r, id, NULL);
		return NULL;
	}
	rep = json_pack("{s:b, s:I, s:s, s:s, s:I}", "ok", 1, "session", (json_int_t)id, "token", tok, "endpoint", ep,
			"window", (json_int_t)window);
	dlog(d, "opened, %u lanes to export '%s' (%llu bytes)", lanes, export, (unsigned long long)d->info.size);
	return rep;
fail:
	dst_free(d);
	return NULL;
}

json_t *ferry_nbd_peer_session_close(struct ferry_nbd_registry *r, uint32_t id, struct ferry_err *err)
{
	struct nbd_dst *d = NULL;
	pthread_mutex_lock(&r->lock);
	for (unsigned i = 0; i < MAX_DST && !d; i++) {
		if (r->dst[i] && r->dst[i]->id == id) {
			d = r->dst[i];
			r->dst[i] = NULL;
		}
	}
	pthread_mutex_unlock(&r->lock);
	if (!d) /* it ended by itself (its lanes closed) and was reaped */
		return json_pack("{s:b, s:b}", "ok", 1, "gone", 1);
	json_t *rep = json_pack("{s:b, s:I}", "ok", 1, "requests", (json_int_t)d->requests);
	dst_free(d);
	reap_dst(r);
	return rep;
}

/* ======================================================================
 * Source: ferry's NBD server
 * ====================================================================== */

struct src_slot {
	bool used;
	uint64_t cookie;              /* the client's */
	uint16_t type, flags;
	uint64_t offset;
	uint32_t length;
	unsigned pending;             /* FLUSH: lanes still to answer */
	uint32_t error;
};

struct nbd_client {
	struct nbd_src *p;
	unsigned no;                  /* for logs */
	int fd;
	pthread_t thr;
	bool finished;                /* set by its thread as it ends (under p->lock) */
	struct ferry_nbd_neg neg;
	struct ferry_session *sess;
	uint32_t sid;
	unsigned nlanes;
	int lane_fd[FERRY_MAX_STREAMS];
	pthread_t lane_thr[FERRY_MAX_STREAMS];
	bool lane_started[FERRY_MAX_STREAMS];
	pthread_mutex_t wlock;        /* writes to the client */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct src_slot slot[SRC_SLOTS];
	unsigned inflight;
	uint64_t inflight_bytes;
	bool dead;                    /* a lane failed: no more replies will come */
	bool client_gone;             /* the client closed: replies to it may fail */
	char why[FERRY_ERR_MSG_MAX];
};

struct nbd_src {
	struct ferry_nbd_registry *r;
	uint32_t id;
	char peer[256];
	char listen[PATH_MAX];
	char target[PATH_MAX];
	char export[MAX_EXPORT_NAME + 1];
	unsigned lanes;
	struct ferry_nbd_export_info info;
	int listen_fd, stop_evfd;
	pthread_t thr;
	bool thr_started;
	pthread_mutex_t ctl_lock;     /* guards ctl */
	struct ferry_jl ctl;
	pthread_mutex_t lock;         /* guards what follows */
	struct nbd_client *client[MAX_CLIENTS];
	uint64_t clients, failed, requests, errors, bytes_written, bytes_read;
	char last_error[FERRY_ERR_MSG_MAX];
};

static void slog_(struct nbd_src *p, bool failure, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void slog_(struct nbd_src *p, bool failure, const char *fmt, ...)
{
	char msg[900];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (failure) {
		pthread_mutex_lock(&p->lock);
		p->failed++;
		snprintf(p->last_error, sizeof(p->last_error), "%.500s", msg);
		pthread_mutex_unlock(&p->lock);
	}
	rlog(p->r, "nbd %u (%s): %s", p->id, p->listen, msg);
}

/* One reply to the client, whole (replies of lanes must not interleave inside one). */
static int client_write(struct nbd_client *c, struct iovec *iov, int n)
{
	struct ferry_err err = { 0 };
	pthread_mutex_lock(&c->wlock);
	int rc = writev_full(c->fd, iov, n, &err);
	pthread_mutex_unlock(&c->wlock);
	if (rc) { /* the client left: what fails after this is its doing */
		pthread_mutex_lock(&c->lock);
		c->client_gone = true;
		pthread_mutex_unlock(&c->lock);
	}
	return rc;
}

static int client_reply_error(struct nbd_client *c, uint64_t cookie, uint16_t type, uint32_t error, const char *msg)
{
	if (c->neg.structured && (type == FERRY_NBD_CMD_READ || type == FERRY_NBD_CMD_BLOCK_STATUS)) {
		size_t ml = strlen(msg) > 200 ? 200 : strlen(msg);
		uint8_t h[FERRY_NBD_CHUNK_LEN], e[6];
		ferry_nbd_chunk_encode(FERRY_NBD_REPLY_FLAG_DONE, FERRY_NBD_REPLY_TYPE_ERROR, cookie, (uint32_t)(6 + ml), h);
		ferry_nbd_put32(e, error);
		ferry_nbd_put16(e + 4, (uint16_t)ml);
		struct iovec iov[3] = { { h, sizeof(h) }, { e, sizeof(e) }, { (void *)msg, ml } };
		return client_write(c, iov, 3);
	}
	uint8_t h[FERRY_NBD_SIMPLE_LEN];
	ferry_nbd_simple_reply_encode(cookie, error, h);
	struct iovec iov = { h, sizeof(h) };
	return client_write(c, &iov, 1);
}

/* A READ's block reply, read from the lane, answered to the client. */
static int client_read_reply(struct nbd_client *c, int lfd, struct src_slot *s, uint32_t plen, struct ferry_err *err)
{
	uint8_t *buf = malloc(s->length);
	if (!buf)
		return ferry_err_set(err, ENOMEM, "out of memory");
	struct { uint32_t kind, off, len; } seg[FERRY_BLK_MAX_SEGS];
	unsigned nseg = 0;
	uint32_t pos = 0;
	uint64_t left = plen;
	int rc = 0;
	while (left > 0) {
		uint8_t sh[FERRY_BLK_SEG_LEN];
		uint32_t kind, len;
		if (left < FERRY_BLK_SEG_LEN || nseg == FERRY_BLK_MAX_SEGS) {
			rc = ferry_err_set(err, EPROTO, "READ reply with malformed segments");
			break;
		}
		if ((rc = ferry_nbd_read_full(lfd, sh, sizeof(sh), err)))
			break;
		left -= FERRY_BLK_SEG_LEN;
		ferry_blk_seg_decode(sh, &kind, &len);
		if ((kind != FERRY_BLK_SEG_DATA && kind != FERRY_BLK_SEG_HOLE) || len == 0 || len > s->length - pos ||
		    (kind == FERRY_BLK_SEG_DATA && len > left)) {
			rc = ferry_err_set(err, EPROTO, "READ reply segment out of bounds");
			break;
		}
		if (kind == FERRY_BLK_SEG_DATA) {
			if ((rc = ferry_nbd_read_full(lfd, buf + pos, len, err)))
				break;
			left -= len;
		} else {
			memset(buf + pos, 0, len);
		}
		seg[nseg++] = (typeof(seg[0])){ kind, pos, len };
		pos += len;
	}
	if (!rc && pos != s->length)
		rc = ferry_err_set(err, EPROTO, "READ reply covers %u of %u bytes", pos, s->length);
	if (rc) {
		free(buf);
		return rc;
	}
	if (!c->neg.structured) {
		uint8_t h[FERRY_NBD_SIMPLE_LEN];
		ferry_nbd_simple_reply_encode(s->cookie, 0, h);
		struct iovec iov[2] = { { h, sizeof(h) }, { buf, s->length } };
		rc = client_write(c, iov, 2);
		free(buf);
		return rc ? ferry_err_set(err, -rc, "writing to the client failed") : 0;
	}
	/* Structured: a chunk per segment; with DF (or one segment) a single chunk. */
	bool df = s->flags & FERRY_NBD_CMD_FLAG_DF;
	if (df && nseg > 1) {
		seg[0] = (typeof(seg[0])){ FERRY_BLK_SEG_DATA, 0, s->length };
		nseg = 1;
	}
	uint8_t hdr[FERRY_BLK_MAX_SEGS][FERRY_NBD_CHUNK_LEN + 12];
	struct iovec iov[2 * FERRY_BLK_MAX_SEGS];
	int n = 0;
	for (unsigned i = 0; i < nseg; i++) {
		uint16_t fl = i + 1 == nseg ? FERRY_NBD_REPLY_FLAG_DONE : 0;
		uint8_t *h = hdr[i];
		ferry_nbd_put64(h + FERRY_NBD_CHUNK_LEN, s->offset + seg[i].off);
		if (seg[i].kind == FERRY_BLK_SEG_DATA) {
			ferry_nbd_chunk_encode(fl, FERRY_NBD_REPLY_TYPE_OFFSET_DATA, s->cookie, 8 + seg[i].len, h);
			iov[n++] = (struct iovec){ h, FERRY_NBD_CHUNK_LEN + 8 };
			iov[n++] = (struct iovec){ buf + seg[i].off, seg[i].len };
		} else {
			ferry_nbd_chunk_encode(fl, FERRY_NBD_REPLY_TYPE_OFFSET_HOLE, s->cookie, 12, h);
			ferry_nbd_put32(h + FERRY_NBD_CHUNK_LEN + 8, seg[i].len);
			iov[n++] = (struct iovec){ h, FERRY_NBD_CHUNK_LEN + 12 };
		}
	}
	rc = client_write(c, iov, n);
	free(buf);
	return rc ? ferry_err_set(err, -rc, "writing to the client failed") : 0;
}

static int client_status_reply(struct nbd_client *c, int lfd, struct src_slot *s, uint32_t plen, struct ferry_err *err)
{
	if (plen < 12 || (plen - 4) % 8)
		return ferry_err_set(err, EPROTO, "BLOCK_STATUS reply of %u bytes is malformed", plen);
	uint8_t *b = malloc(plen);
	if (!b)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = ferry_nbd_read_full(lfd, b, plen, err);
	if (!rc && ferry_nbd_get32(b) != (plen - 4) / 8)
		rc = ferry_err_set(err, EPROTO, "BLOCK_STATUS reply count does not match its length");
	if (!rc) {
		uint32_t count = (plen - 4) / 8;
		if (s->flags & FERRY_NBD_CMD_FLAG_REQ_ONE)
			count = 1;
		uint8_t h[FERRY_NBD_CHUNK_LEN];
		ferry_nbd_chunk_encode(FERRY_NBD_REPLY_FLAG_DONE, FERRY_NBD_REPLY_TYPE_BLOCK_STATUS, s->cookie, 4 + 8 * count, h);
		ferry_nbd_put32(b, c->neg.meta_id);
		struct iovec iov[2] = { { h, sizeof(h) }, { b, 4 + 8 * count } };
		if (client_write(c, iov, 2))
			rc = ferry_err_set(err, ECONNRESET, "writing to the client failed");
	}
	free(b);
	return rc;
}

static void slot_release(struct nbd_client *c, struct src_slot *s)
{
	pthread_mutex_lock(&c->lock);
	if (s->type == FERRY_NBD_CMD_READ || s->type == FERRY_NBD_CMD_WRITE)
		c->inflight_bytes -= s->length;
	s->used = false;
	c->inflight--;
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

struct lane_arg {
	struct nbd_client *c;
	unsigned idx;
};

/* Block replies from one lane -> NBD replies to the client. */
static void *src_lane_main(void *arg)
{
	struct lane_arg *a = arg;
	struct nbd_client *c = a->c;
	int lfd = c->lane_fd[a->idx];
	unsigned idx = a->idx;
	free(a);
	struct ferry_err err = { 0 };
	int rc;
	for (;;) {
		uint8_t h[FERRY_BLK_REP_LEN];
		struct ferry_blk_rep rep;
		if ((rc = ferry_nbd_read_full(lfd, h, sizeof(h), &err)) || (rc = ferry_blk_rep_decode(h, &rep, &err)))
			break;
		pthread_mutex_lock(&c->lock);
		struct src_slot *s = rep.handle < SRC_SLOTS && c->slot[rep.handle].used ? &c->slot[rep.handle] : NULL;
		pthread_mutex_unlock(&c->lock);
		if (!s) {
			rc = ferry_err_set(&err, EPROTO, "block reply for unknown handle %llu", (unsigned long long)rep.handle);
			break;
		}
		if (rep.error && rep.length) {
			rc = ferry_err_set(&err, EPROTO, "block error reply with a payload");
			break;
		}
		if (s->type == FERRY_NBD_CMD_FLUSH) {
			if (rep.length) {
				rc = ferry_err_set(&err, EPROTO, "FLUSH reply with a payload");
				break;
			}
			pthread_mutex_lock(&c->lock);
			if (rep.error && !s->error)
				s->error = rep.error;
			bool last = --s->pending == 0;
			pthread_mutex_unlock(&c->lock);
			if (!last)
				continue;
			rep.error = s->error;
		}
		if (rep.error)
			rc = client_reply_error(c, s->cookie, s->type, rep.error, "the target export failed the request");
		else if (s->type == FERRY_NBD_CMD_READ)
			rc = client_read_reply(c, lfd, s, rep.length, &err);
		else if (s->type == FERRY_NBD_CMD_BLOCK_STATUS)
			rc = client_status_reply(c, lfd, s, rep.length, &err);
		else if (rep.length)
			rc = ferry_err_set(&err, EPROTO, "%s reply with a payload", ferry_nbd_cmd_name(s->type));
		else
			rc = client_reply_error(c, s->cookie, s->type, 0, "");
		if (rep.error) {
			pthread_mutex_lock(&c->p->lock);
			c->p->errors++;
			pthread_mutex_unlock(&c->p->lock);
		}
		slot_release(c, s);
		if (rc)
			break;
	}
	pthread_mutex_lock(&c->lock);
	/* A lane ends as expected only after the client left (then the source
	 * closes the lanes); before that, the destination or the data plane
	 * failed it, even with nothing in flight. */
	bool expected = c->client_gone;
	if (!c->dead && !expected) {
		c->dead = true;
		snprintf(c->why, sizeof(c->why), "lane %u: %.400s", idx, err.msg);
	}
	c->dead = true;
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	shutdown(c->fd, SHUT_RDWR); /* no more replies can come: end the client */
	return NULL;
}

static int send_lane(struct nbd_client *c, unsigned lane, const struct ferry_blk_req *q, const void *payload,
		     struct ferry_err *err)
{
	uint8_t h[FERRY_BLK_REQ_LEN];
	ferry_blk_req_encode(q, h);
	struct iovec iov[2] = { { h, sizeof(h) }, { (void *)payload, payload ? q->length : 0 } };
	return writev_full(c->lane_fd[lane], iov, payload ? 2 : 1, err);
}

/* Take a slot for a request, waiting while the client has too much in flight. */
static int slot_take(struct nbd_client *c, const struct ferry_nbd_request *r, bool barrier)
{
	uint64_t bytes = r->type == FERRY_NBD_CMD_READ || r->type == FERRY_NBD_CMD_WRITE ? r->length : 0;
	pthread_mutex_lock(&c->lock);
	while (!c->dead && (c->inflight >= SRC_SLOTS || (barrier && c->inflight > 0) ||
			    (c->inflight > 0 && c->inflight_bytes + bytes > SRC_BYTES_BUDGET)))
		pthread_cond_wait(&c->cond, &c->lock);
	int i = -1;
	if (!c->dead) {
		for (i = 0; c->slot[i].used; i++)
			;
		c->slot[i] = (struct src_slot){ .used = true, .cookie = r->cookie, .type = r->type, .flags = r->flags,
						.offset = r->offset, .length = r->length,
						.pending = barrier ? c->nlanes : 1 };
		c->inflight++;
		c->inflight_bytes += bytes;
	}
	pthread_mutex_unlock(&c->lock);
	return i;
}

/* Serve transmission requests until the client leaves or a lane fails. */
static void client_serve(struct nbd_client *c)
{
	struct nbd_src *p = c->p;
	struct ferry_err err = { 0 };
	uint8_t *wbuf = NULL;
	size_t wcap = 0;
	unsigned rr = 0;
	for (;;) {
		struct ferry_nbd_request r;
		int rc = ferry_nbd_read_request(c->fd, &r, &err);
		if (rc == -ECONNRESET) {
			pthread_mutex_lock(&c->lock);
			unsigned n = c->inflight;
			bool dead = c->dead;
			pthread_mutex_unlock(&c->lock);
			if (n && !dead)
				slog_(p, false, "client %u disconnected with %u requests in flight", c->no, n);
			break;
		}
		if (rc) {
			pthread_mutex_lock(&c->lock);
			bool dead = c->dead;
			pthread_mutex_unlock(&c->lock);
			if (!dead)
				slog_(p, true, "client %u: %s; disconnecting it", c->no, err.msg);
			break;
		}
		if (r.type == FERRY_NBD_CMD_DISC)
			break;
		char why[256];
		uint32_t e = ferry_nbd_check_request(&r, &p->info, &c->neg, why, sizeof(why));
		if (e && r.type == FERRY_NBD_CMD_WRITE) {
			/* Its payload must go too, or the stream is lost; one too large to read ends the client. */
			if (r.length > FERRY_NBD_MAX_PAYLOAD) {
				slog_(p, true, "client %u: %s; disconnecting it", c->no, why);
				break;
			}
			if (ferry_nbd_skip(c->fd, r.length, &err))
				break;
		}
		if (e) {
			slog_(p, false, "client %u: %s: answering error %u", c->no, why, e);
			pthread_mutex_lock(&p->lock);
			p->errors++;
			pthread_mutex_unlock(&p->lock);
			if (client_reply_error(c, r.cookie, r.type, e, why))
				break;
			continue;
		}
		if (r.type == FERRY_NBD_CMD_WRITE) {
			if (wcap < r.length) {
				free(wbuf);
				wcap = 0;
				if (!(wbuf = malloc(r.length))) {
					slog_(p, true, "client %u: out of memory", c->no);
					break;
				}
				wcap = r.length;
			}
			if (ferry_nbd_read_full(c->fd, wbuf, r.length, &err)) {
				slog_(p, false, "client %u disconnected inside a WRITE's payload", c->no);
				break;
			}
		}
		bool barrier = r.type == FERRY_NBD_CMD_FLUSH;
		int i = slot_take(c, &r, barrier);
		if (i < 0)
			break; /* a lane failed; the lane thread said why */
		pthread_mutex_lock(&p->lock);
		p->requests++;
		if (r.type == FERRY_NBD_CMD_WRITE)
			p->bytes_written += r.length;
		if (r.type == FERRY_NBD_CMD_READ)
			p->bytes_read += r.length;
		pthread_mutex_unlock(&p->lock);
		struct ferry_blk_req q = { .type = r.type, .flags = r.flags, .handle = (uint64_t)i, .offset = r.offset,
					   .length = r.length };
		rc = 0;
		if (barrier) {
			/* Every earlier request has its reply; now flush what each lane's target connection wrote. */
			for (unsigned k = 0; k < c->nlanes && !rc; k++)
				rc = send_lane(c, k, &q, NULL, &err);
		} else {
			rc = send_lane(c, rr++ % c->nlanes, &q, r.type == FERRY_NBD_CMD_WRITE ? wbuf : NULL, &err);
		}
		if (rc) {
			slog_(p, true, "client %u: lane write failed: %s", c->no, err.msg);
			break;
		}
	}
	free(wbuf);
	pthread_mutex_lock(&c->lock);
	c->client_gone = true;
	pthread_mutex_unlock(&c->lock);
}

static int client_open_session(struct nbd_client *c, struct ferry_err *err)
{
	struct nbd_src *p = c->p;
	json_t *req = json_pack("{s:s, s:s, s:s, s:i}", "cmd", "nbd-session-open", "target", p->target, "export",
				p->export, "lanes", (int)p->lanes);
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = 0;
	pthread_mutex_lock(&p->ctl_lock);
	/* A control connection kept from earlier may have died while idle: retry once on a fresh one. */
	for (int attempt = 0; attempt < 2; attempt++) {
		bool fresh = p->ctl.fd < 0;
		if (fresh && (rc = ferry_jl_connect_tcp(p->peer, REQ_TIMEOUT_MS, &p->ctl, err))) {
			p->ctl.fd = -1;
			ferry_err_prefix(err, "cannot reach the peer daemon %s", p->peer);
			break;
		}
		struct ferry_session *sess = NULL;
		rc = ferry_tunnel_session_open(p->r->dp, &p->ctl, req, p->lanes, p->lanes, NULL, &sess, &c->sid, NULL, err);
		if (sess) {
			pthread_mutex_lock(&c->lock); /* the watcher reads it */
			c->sess = sess;
			pthread_mutex_unlock(&c->lock);
		}
		if (!rc || rc == -EREMOTEIO || sess || fresh)
			break;
		ferry_jl_close(&p->ctl);
		p->ctl.fd = -1;
		memset(err, 0, sizeof(*err));
	}
	pthread_mutex_unlock(&p->ctl_lock);
	json_decref(req);
	return rc;
}

static void client_close_session(struct nbd_client *c)
{
	struct nbd_src *p = c->p;
	if (c->sid) {
		pthread_mutex_lock(&p->ctl_lock);
		if (p->ctl.fd >= 0) {
			struct ferry_err e = { 0 };
			json_t *req = json_pack("{s:s, s:I}", "cmd", "nbd-session-close", "session", (json_int_t)c->sid);
			int rc = req ? ferry_jl_call(&p->ctl, req, 5000, NULL, &e) : -ENOMEM;
			json_decref(req);
			if (rc && rc != -EREMOTEIO) {
				ferry_jl_close(&p->ctl);
				p->ctl.fd = -1;
			}
		}
		pthread_mutex_unlock(&p->ctl_lock);
	}
	pthread_mutex_lock(&c->lock);
	struct ferry_session *sess = c->sess;
	c->sess = NULL;
	pthread_mutex_unlock(&c->lock);
	ferry_session_close(sess);
}

static void *client_main(void *arg)
{
	struct nbd_client *c = arg;
	struct nbd_src *p = c->p;
	struct ferry_err err = { 0 };
	set_rcv_timeout(c->fd, HANDSHAKE_S);
	int rc = ferry_nbd_server_handshake(c->fd, p->export, &p->info, &c->neg, &err);
	set_rcv_timeout(c->fd, 0);
	if (rc) {
		if (rc != -ECONNABORTED && rc != -ECONNRESET)
			slog_(p, true, "client %u: handshake failed: %s", c->no, err.msg);
		goto done;
	}
	if ((rc = client_open_session(c, &err))) {
		slog_(p, true, "client %u: %s", c->no, err.msg);
		goto done;
	}
	c->nlanes = p->lanes;
	for (unsigned i = 0; i < c->nlanes; i++) {
		int sp[2];
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp)) {
			slog_(p, true, "client %u: socketpair: %s", c->no, strerror(errno));
			goto done;
		}
		set_bufs(sp[0]);
		set_bufs(sp[1]);
		if (ferry_session_add_stream(c->sess, sp[1], &err)) {
			close(sp[0]);
			close(sp[1]);
			slog_(p, true, "client %u: %s", c->no, err.msg);
			goto done;
		}
		c->lane_fd[i] = sp[0];
	}
	if (ferry_session_wait_streams(c->sess, c->nlanes, LANE_CONNECT_MS, &err)) {
		slog_(p, true, "client %u: lanes not connected: %s", c->no, err.msg);
		goto done;
	}
	for (unsigned i = 0; i < c->nlanes; i++) {
		struct lane_arg *a = malloc(sizeof(*a));
		if (a)
			*a = (struct lane_arg){ c, i };
		if (!a || pthread_create(&c->lane_thr[i], NULL, src_lane_main, a)) {
			free(a);
			slog_(p, true, "client %u: cannot start a lane thread", c->no);
			goto done;
		}
		c->lane_started[i] = true;
	}
	client_serve(c);
	/* Let what is in flight finish (its replies may still reach a client that only half-closed). */
	pthread_mutex_lock(&c->lock);
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += REQ_TIMEOUT_MS / 1000;
	while (c->inflight > 0 && !c->dead)
		if (pthread_cond_timedwait(&c->cond, &c->lock, &until) == ETIMEDOUT)
			break;
	bool dead = c->dead;
	char why[FERRY_ERR_MSG_MAX];
	memcpy(why, c->why, sizeof(why));
	pthread_mutex_unlock(&c->lock);
	if (dead && why[0])
		slog_(p, true, "client %u: %s", c->no, why);
done:
	for (unsigned i = 0; i < c->nlanes; i++)
		if (c->lane_fd[i] >= 0)
			shutdown(c->lane_fd[i], SHUT_RDWR);
	shutdown(c->fd, SHUT_RDWR);
	for (unsigned i = 0; i < c->nlanes; i++)
		if (c->lane_started[i])
			pthread_join(c->lane_thr[i], NULL);
	client_close_session(c);
	pthread_mutex_lock(&p->lock);
	c->finished = true;
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

static void client_free(struct nbd_client *c)
{
	pthread_join(c->thr, NULL);
	for (unsigned i = 0; i < FERRY_MAX_STREAMS; i++)
		if (c->lane_fd[i] >= 0)
			close(c->lane_fd[i]);
	close(c->fd);
	pthread_mutex_destroy(&c->wlock);
	pthread_mutex_destroy(&c->lock);
	pthread_cond_destroy(&c->cond);
	free(c);
}

static void reap_clients(struct nbd_src *p, bool all)
{
	for (unsigned i = 0; i < MAX_CLIENTS; i++) {
		pthread_mutex_lock(&p->lock);
		struct nbd_client *c = p->client[i];
		if (c && (c->finished || all))
			p->client[i] = NULL;
		else
			c = NULL;
		pthread_mutex_unlock(&p->lock);
		if (!c)
			continue;
		if (all)
			shutdown(c->fd, SHUT_RDWR);
		client_free(c);
	}
}

static void accept_client(struct nbd_src *p, int fd)
{
	struct nbd_client *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		slog_(p, true, "out of memory for a client");
		return;
	}
	c->p = p;
	c->fd = fd;
	for (unsigned i = 0; i < FERRY_MAX_STREAMS; i++)
		c->lane_fd[i] = -1;
	pthread_mutex_init(&c->wlock, NULL);
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_mutex_lock(&p->lock);
	c->no = (unsigned)++p->clients;
	unsigned i;
	for (i = 0; i < MAX_CLIENTS && p->client[i]; i++)
		;
	if (i < MAX_CLIENTS)
		p->client[i] = c;
	pthread_mutex_unlock(&p->lock);
	if (i == MAX_CLIENTS) {
		slog_(p, true, "refused a client: already serving %d", MAX_CLIENTS);
		c->lane_fd[0] = -1;
		close(fd);
		pthread_mutex_destroy(&c->wlock);
		pthread_mutex_destroy(&c->lock);
		pthread_cond_destroy(&c->cond);
		free(c);
		return;
	}
	if (pthread_create(&c->thr, NULL, client_main, c)) {
		slog_(p, true, "cannot start a client thread");
		shutdown(fd, SHUT_RDWR);
		pthread_mutex_lock(&p->lock);
		p->client[i] = NULL;
		pthread_mutex_unlock(&p->lock);
		close(fd);
		free(c);
	}
}

/* A client whose data-plane session failed (the peer daemon died, a lane
 * broke) is ended: its lane sockets would otherwise wait for ever. */
static void watch_clients(struct nbd_src *p)
{
	for (unsigned i = 0; i < MAX_CLIENTS; i++) {
		pthread_mutex_lock(&p->lock);
		struct nbd_client *c = p->client[i];
		if (c && !c->finished) {
			pthread_mutex_lock(&c->lock);
			if (c->sess && !c->dead) {
				struct ferry_session_stats st;
				ferry_session_stats(c->sess, &st);
				if (st.state == FERRY_SESSION_FAILED) {
					c->dead = true;
					snprintf(c->why, sizeof(c->why), "data-plane session failed: %.400s", st.error);
					for (unsigned k = 0; k < c->nlanes; k++)
						if (c->lane_fd[k] >= 0)
							shutdown(c->lane_fd[k], SHUT_RDWR);
					shutdown(c->fd, SHUT_RDWR);
					pthread_cond_broadcast(&c->cond);
				}
			}
			pthread_mutex_unlock(&c->lock);
		}
		pthread_mutex_unlock(&p->lock);
	}
}

static void *src_main(void *arg)
{
	struct nbd_src *p = arg;
	for (;;) {
		struct pollfd pf[2] = { { .fd = p->listen_fd, .events = POLLIN }, { .fd = p->stop_evfd, .events = POLLIN } };
		int n = poll(pf, 2, 500);
		if (n > 0 && pf[1].revents)
			break;
		reap_clients(p, false);
		if (n <= 0 || !(pf[0].revents & POLLIN))
			continue;
		int fd = accept4(p->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0)
			accept_client(p, fd);
	}
	return NULL;
}

static void src_free(struct nbd_src *p)
{
	if (!p)
		return;
	if (p->thr_started) {
		uint64_t one = 1;
		ssize_t w = write(p->stop_evfd, &one, sizeof(one));
		(void)w;
		pthread_join(p->thr, NULL);
	}
	if (p->listen_fd >= 0) {
		close(p->listen_fd);
		unlink(p->listen);
	}
	reap_clients(p, true);
	if (p->stop_evfd >= 0)
		close(p->stop_evfd);
	ferry_jl_close(&p->ctl);
	pthread_mutex_destroy(&p->ctl_lock);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

static json_t *src_stats(struct nbd_src *p)
{
	pthread_mutex_lock(&p->lock);
	unsigned active = 0;
	for (unsigned i = 0; i < MAX_CLIENTS; i++)
		if (p->client[i] && !p->client[i]->finished)
			active++;
	json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:i, s:o, s:I, s:i, s:I, s:I, s:I, s:I, s:I, s:s}", "listen",
			      p->listen, "peer", p->peer, "target", p->target, "export", p->export, "lanes",
			      (int)p->lanes, "info", ferry_nbd_info_json(&p->info), "clients", (json_int_t)p->clients,
			      "active", (int)active, "failed", (json_int_t)p->failed, "requests", (json_int_t)p->requests,
			      "errors", (json_int_t)p->errors, "bytes_written", (json_int_t)p->bytes_written,
			      "bytes_read", (json_int_t)p->bytes_read, "last_error", p->last_error);
	pthread_mutex_unlock(&p->lock);
	return j;
}

json_t *ferry_nbd_open(struct ferry_nbd_registry *r, uint32_t id, const char *peer, const char *listen,
		       const char *target, const char *export, unsigned lanes, struct ferry_err *err)
{
	if (lanes < 1 || lanes > FERRY_MAX_STREAMS) {
		ferry_err_set(err, EINVAL, "\"lanes\" must be from 1 to %d", FERRY_MAX_STREAMS);
		return NULL;
	}
	struct nbd_src *p = calloc(1, sizeof(*p));
	if (!p) {
		ferry_err_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	p->r = r;
	p->id = id;
	p->lanes = lanes;
	p->listen_fd = p->stop_evfd = p->ctl.fd = -1;
	pthread_mutex_init(&p->ctl_lock, NULL);
	pthread_mutex_init(&p->lock, NULL);
	json_t *rep = NULL;
	if (strlen(peer) >= sizeof(p->peer) || strlen(listen) >= sizeof(p->listen) || strlen(target) >= sizeof(p->target) ||
	    strlen(export) > MAX_EXPORT_NAME) {
		ferry_err_set(err, ENAMETOOLONG, "peer, path or export name too long");
		goto fail;
	}
	strcpy(p->peer, peer);
	strcpy(p->listen, listen);
	strcpy(p->target, target);
	strcpy(p->export, export);
	/* Learn the export from the peer now: every client's handshake answers with it. */
	if (ferry_jl_connect_tcp(peer, REQ_TIMEOUT_MS, &p->ctl, err)) {
		p->ctl.fd = -1;
		ferry_err_prefix(err, "cannot reach the peer daemon %s", peer);
		goto fail;
	}
	json_t *req = json_pack("{s:s, s:s, s:s}", "cmd", "nbd-probe", "target", target, "export", export);
	json_t *prep = NULL;
	int rc = req ? ferry_jl_call(&p->ctl, req, REQ_TIMEOUT_MS, &prep, err) : ferry_err_set(err, ENOMEM, "out of memory");
	json_decref(req);
	if (!rc)
		rc = ferry_nbd_info_parse(json_object_get(prep, "export"), &p->info, err);
	json_decref(prep);
	if (rc) {
		ferry_err_prefix(err, "peer %s could not open the NBD export", peer);
		goto fail;
	}
	/* Only what ferry carries: no CACHE or RESIZE; DF is ferry's own (it reassembles reads). */
	p->info.flags &= FERRY_NBD_FLAG_HAS_FLAGS | FERRY_NBD_FLAG_READ_ONLY | FERRY_NBD_FLAG_SEND_FLUSH |
			 FERRY_NBD_FLAG_SEND_FUA | FERRY_NBD_FLAG_ROTATIONAL | FERRY_NBD_FLAG_SEND_TRIM |
			 FERRY_NBD_FLAG_SEND_WRITE_ZEROES | FERRY_NBD_FLAG_CAN_MULTI_CONN | FERRY_NBD_FLAG_SEND_FAST_ZERO;
	struct ferry_err lerr = { 0 };
	if ((p->listen_fd = listen_unix(p->listen, &lerr)) < 0) {
		*err = lerr;
		goto fail;
	}
	p->stop_evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (p->stop_evfd < 0) {
		ferry_err_set(err, errno, "eventfd: %s", strerror(errno));
		goto fail;
	}
	pthread_mutex_lock(&r->lock);
	unsigned i;
	for (i = 0; i < MAX_PATHS && r->src[i]; i++)
		;
	if (i < MAX_PATHS)
		r->src[i] = p;
	pthread_mutex_unlock(&r->lock);
	if (i == MAX_PATHS) {
		ferry_err_set(err, ENOSPC, "too many NBD paths");
		goto fail;
	}
	if (pthread_create(&p->thr, NULL, src_main, p)) {
		pthread_mutex_lock(&r->lock);
		r->src[i] = NULL;
		pthread_mutex_unlock(&r->lock);
		ferry_err_set(err, EAGAIN, "cannot start a thread");
		goto fail;
	}
	p->thr_started = true;
	rep = json_pack("{s:b, s:I, s:s, s:o}", "ok", 1, "nbd", (json_int_t)id, "listen", p->listen, "export",
			ferry_nbd_info_json(&p->info));
	slog_(p, false, "serving export '%s' of %s:%s (%llu bytes, flags 0x%x) over %u lanes", export, peer, target,
	      (unsigned long long)p->info.size, p->info.flags, lanes);
	return rep;
fail:
	src_free(p);
	return NULL;
}

json_t *ferry_nbd_status(struct ferry_nbd_registry *r, uint32_t id, bool close_it, struct ferry_err *err)
{
	json_t *stats = NULL;
	struct nbd_src *p = NULL;
	pthread_mutex_lock(&r->lock);
	for (unsigned i = 0; i < MAX_PATHS; i++) {
		if (r->src[i] && r->src[i]->id == id) {
			p = r->src[i];
			if (close_it)
				r->src[i] = NULL;
			else
				stats = src_stats(p); /* under the table lock: a close cannot free it meanwhile */
			break;
		}
	}
	pthread_mutex_unlock(&r->lock);
	if (!p) {
		ferry_err_set(err, ENOENT, "no NBD path %u", id);
		return NULL;
	}
	if (close_it) {
		stats = src_stats(p);
		src_free(p);
	}
	return json_pack("{s:b, s:o}", "ok", 1, "stats", stats);
}

/* ======================================================================
 * Registry
 * ====================================================================== */

static void *watch_main(void *arg)
{
	struct ferry_nbd_registry *r = arg;
	pthread_mutex_lock(&r->lock);
	while (!r->stopping) {
		struct timespec until;
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_nsec += 300 * 1000000L;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&r->watch_cond, &r->lock, &until);
		if (r->stopping)
			break;
		pthread_mutex_unlock(&r->lock);
		watch_dst(r);
		reap_dst(r);
		pthread_mutex_lock(&r->lock);
		for (unsigned i = 0; i < MAX_PATHS; i++)
			if (r->src[i])
				watch_clients(r->src[i]); /* under r->lock: no close frees it meanwhile */
	}
	pthread_mutex_unlock(&r->lock);
	return NULL;
}

struct ferry_nbd_registry *ferry_nbd_registry_new(struct ferry_dp *dp, const char *run_dir,
						  void (*log)(void *ctx, const char *msg), void *log_ctx)
{
	struct ferry_nbd_registry *r = calloc(1, sizeof(*r));
	if (!r || strlen(run_dir) >= sizeof(r->run_dir)) {
		free(r);
		return NULL;
	}
	r->dp = dp;
	strcpy(r->run_dir, run_dir);
	r->log = log;
	r->log_ctx = log_ctx;
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->watch_cond, NULL);
	r->watch_started = pthread_create(&r->watch_thr, NULL, watch_main, r) == 0;
	if (!r->watch_started)
		rlog(r, "nbd: cannot start the housekeeping thread; failed sessions end only when closed");
	return r;
}

void ferry_nbd_registry_free(struct ferry_nbd_registry *r)
{
	if (!r)
		return;
	if (r->watch_started) {
		pthread_mutex_lock(&r->lock);
		r->stopping = true;
		pthread_cond_broadcast(&r->watch_cond);
		pthread_mutex_unlock(&r->lock);
		pthread_join(r->watch_thr, NULL);
	}
	for (unsigned i = 0; i < MAX_PATHS; i++) {
		pthread_mutex_lock(&r->lock);
		struct nbd_src *p = r->src[i];
		r->src[i] = NULL;
		pthread_mutex_unlock(&r->lock);
		src_free(p);
	}
	for (unsigned i = 0; i < MAX_DST; i++) {
		pthread_mutex_lock(&r->lock);
		struct nbd_dst *d = r->dst[i];
		r->dst[i] = NULL;
		pthread_mutex_unlock(&r->lock);
		dst_free(d);
	}
	pthread_cond_destroy(&r->watch_cond);
	pthread_mutex_destroy(&r->lock);
	free(r);
}
