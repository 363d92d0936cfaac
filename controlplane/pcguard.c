#include "pcguard.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* QEMU's return-path message types (migration/migration.c, MIG_RP_MSG_*). */
#define RP_MSG_SHUT 1
#define RP_HDR 4
#define RP_MAX_LEN 65535
#define SPLICE_CHUNK (1u << 20)

struct channel {
	struct ferry_pcguard *g;
	unsigned index;            /* 0: main channel with the return path */
	int qemu_end, dp_end;
	int pipe_rd, pipe_wr;
	pthread_t down, up;
	bool down_started, up_started;
};

struct ferry_pcguard {
	int listen_fd;
	int stop_pipe[2];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	pthread_t acceptor;
	bool acceptor_started;
	unsigned max_channels;
	ferry_pcguard_adopt_fn adopt;
	void *adopt_arg;
	struct channel ch[FERRY_PCGUARD_MAX_CHANNELS];
	pthread_mutex_t lock;      /* st and the rest below, and writes to a qemu_end */
	struct ferry_pcguard_state st; /* quiet_s is computed from last_rx when read */
	bool shut_forwarded;
	uint8_t held_shut[RP_HDR + 4];
	struct timespec last_rx;
};

static int write_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void touch_rx(struct ferry_pcguard *g)
{
	clock_gettime(CLOCK_MONOTONIC, &g->last_rx);
}

/* Swallow QEMU's bytes, remembering (main channel) the last one, and when
 * any came. */
static void sink(struct channel *c)
{
	struct ferry_pcguard *g = c->g;
	uint8_t buf[64 * 1024];
	for (;;) {
		ssize_t n = read(c->qemu_end, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		pthread_mutex_lock(&g->lock);
		if (c->index == 0) {
			g->st.sunk_bytes += (uint64_t)n;
			g->st.last_sunk_byte = buf[n - 1];
		}
		touch_rx(g);
		pthread_mutex_unlock(&g->lock);
	}
}

/* QEMU -> data plane, kernel-side (splice through a pipe). */
static void *down_main(void *arg)
{
	struct channel *c = arg;
	struct ferry_pcguard *g = c->g;
	for (;;) {
		pthread_mutex_lock(&g->lock);
		bool swallow = g->st.rescuing || g->st.dp_broken;
		pthread_mutex_unlock(&g->lock);
		if (swallow) {
			sink(c);
			return NULL;
		}
		ssize_t n = splice(c->qemu_end, NULL, c->pipe_wr, NULL, SPLICE_CHUNK, SPLICE_F_MOVE);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* QEMU closed its channel: pass the end on. */
			shutdown(c->dp_end, SHUT_WR);
			return NULL;
		}
		pthread_mutex_lock(&g->lock);
		touch_rx(g);
		pthread_mutex_unlock(&g->lock);
		size_t left = (size_t)n;
		while (left > 0) {
			ssize_t w = splice(c->pipe_rd, NULL, c->dp_end, NULL, left, SPLICE_F_MOVE);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				pthread_mutex_lock(&g->lock);
				g->st.dp_broken = true; /* before commit: swallow, never let QEMU see it */
				bool committed = g->st.committed;
				pthread_mutex_unlock(&g->lock);
				if (committed) {
					/* Postcopy already runs on the destination: QEMU
					 * must notice and pause for recovery. */
					shutdown(c->qemu_end, SHUT_RDWR);
					return NULL;
				}
				/* drop what sits in the pipe: it was going nowhere */
				uint8_t junk[64 * 1024];
				while (left > 0) {
					ssize_t r = read(c->pipe_rd, junk, left < sizeof(junk) ? left : sizeof(junk));
					if (r <= 0)
						break;
					left -= (size_t)r;
				}
				left = 0;
				break;
			}
			left -= (size_t)w;
			pthread_mutex_lock(&g->lock);
			g->st.to_peer_bytes += (uint64_t)w;
			pthread_mutex_unlock(&g->lock);
		}
	}
}

/* After commit, a data plane side that ends without the destination's SHUT
 * means the lanes broke: QEMU must notice and pause for recovery. */
static void peer_ended(struct channel *c)
{
	struct ferry_pcguard *g = c->g;
	pthread_mutex_lock(&g->lock);
	if (c->index == 0)
		g->st.peer_closed = true;
	bool cut = g->st.committed && !g->shut_forwarded;
	pthread_mutex_unlock(&g->lock);
	if (cut)
		shutdown(c->qemu_end, SHUT_RDWR);
}

/* Data plane -> QEMU on the main channel: the return path, passed on a whole
 * message at a time so that a SHUT of ours always fits between two. */
static void *up_main(void *arg)
{
	struct channel *c = arg;
	struct ferry_pcguard *g = c->g;
	uint8_t *buf = malloc(RP_HDR + RP_MAX_LEN);
	size_t have = 0;
	if (!buf)
		goto closed;
	for (;;) {
		ssize_t n = read(c->dp_end, buf + have, RP_HDR + RP_MAX_LEN - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += (size_t)n;
		size_t off = 0;
		while (have - off >= RP_HDR) {
			unsigned type = (unsigned)buf[off] << 8 | buf[off + 1];
			size_t len = (size_t)buf[off + 2] << 8 | buf[off + 3];
			if (have - off < RP_HDR + len)
				break;
			pthread_mutex_lock(&g->lock);
			int rc = 0;
			if (g->st.rescuing) {
				/* the destination is written off: nothing of it reaches QEMU */
			} else if (type == RP_MSG_SHUT && !g->st.committed && len == 4) {
				memcpy(g->held_shut, buf + off, sizeof(g->held_shut));
				g->st.shut_held = true;
			} else {
				rc = write_all(c->qemu_end, buf + off, RP_HDR + len);
				if (rc == 0) {
					g->st.rp_messages++;
					if (type == RP_MSG_SHUT)
						g->shut_forwarded = true;
				}
			}
			pthread_mutex_unlock(&g->lock);
			if (rc)
				goto out;
			off += RP_HDR + len;
		}
		memmove(buf, buf + off, have - off);
		have -= off;
	}
closed:
	peer_ended(c);
out:
	free(buf);
	return NULL;
}

/* Data plane -> QEMU on another channel (QEMU 7.2's preempt channel carries
 * nothing this way; whatever comes is passed on unless rescuing). */
static void *up_raw(void *arg)
{
	struct channel *c = arg;
	struct ferry_pcguard *g = c->g;
	uint8_t buf[16 * 1024];
	for (;;) {
		ssize_t n = read(c->dp_end, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		pthread_mutex_lock(&g->lock);
		int rc = g->st.rescuing ? 0 : write_all(c->qemu_end, buf, (size_t)n);
		pthread_mutex_unlock(&g->lock);
		if (rc)
			return NULL;
	}
	peer_ended(c);
	return NULL;
}

static int channel_start(struct ferry_pcguard *g, int qemu_conn, struct ferry_err *err)
{
	unsigned i = g->st.channels; /* only the acceptor adds channels */
	struct channel *c = &g->ch[i];
	int sp[2] = { -1, -1 }, p[2] = { -1, -1 };
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) || pipe2(p, O_CLOEXEC)) {
		int e = errno;
		if (sp[0] >= 0) {
			close(sp[0]);
			close(sp[1]);
		}
		close(qemu_conn);
		return ferry_err_set(err, -e, "postcopy guard: cannot create channel %u's sockets: %s", i, strerror(e));
	}
	(void)fcntl(p[1], F_SETPIPE_SZ, SPLICE_CHUNK);
	int rc = g->adopt(g->adopt_arg, sp[1], err);
	if (rc) {
		close(sp[0]);
		close(sp[1]);
		close(p[0]);
		close(p[1]);
		close(qemu_conn);
		return rc;
	}
	/* From here the channel owns its fds (stop_channels closes them). */
	pthread_mutex_lock(&g->lock);
	c->g = g;
	c->index = i;
	c->qemu_end = qemu_conn;
	c->dp_end = sp[0];
	c->pipe_rd = p[0];
	c->pipe_wr = p[1];
	g->st.channels = i + 1;
	pthread_mutex_unlock(&g->lock);
	if ((rc = pthread_create(&c->down, NULL, down_main, c)) == 0) {
		c->down_started = true;
		rc = pthread_create(&c->up, NULL, i == 0 ? up_main : up_raw, c);
		c->up_started = rc == 0;
	}
	if (rc)
		return ferry_err_set(err, -rc, "postcopy guard: cannot start channel %u's threads: %s", i, strerror(rc));
	return 0;
}

/* Accept QEMU's channels in arrival order (main first, as QEMU connects). */
static void *acceptor_main(void *arg)
{
	struct ferry_pcguard *g = arg;
	while (g->st.channels < g->max_channels) {
		struct pollfd pf[2] = { { g->listen_fd, POLLIN, 0 }, { g->stop_pipe[0], POLLIN, 0 } };
		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (pf[1].revents)
			break;
		int fd = accept4(g->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
				continue;
			break;
		}
		struct ferry_err err = { 0 };
		if (channel_start(g, fd, &err)) {
			/* QEMU sees its channel close and fails the migration
			 * itself, before any switch: nothing to hold yet. */
			fprintf(stderr, "ferry: %s\n", err.msg);
			break;
		}
	}
	return NULL;
}

static void stop_channels(struct ferry_pcguard *g)
{
	for (unsigned i = 0; i < FERRY_PCGUARD_MAX_CHANNELS; i++) {
		struct channel *c = &g->ch[i];
		if (c->qemu_end >= 0)
			shutdown(c->qemu_end, SHUT_RDWR);
		if (c->dp_end >= 0)
			shutdown(c->dp_end, SHUT_RDWR);
		if (c->down_started)
			pthread_join(c->down, NULL);
		if (c->up_started)
			pthread_join(c->up, NULL);
		int fds[] = { c->qemu_end, c->dp_end, c->pipe_rd, c->pipe_wr };
		for (size_t k = 0; k < sizeof(fds) / sizeof(fds[0]); k++)
			if (fds[k] >= 0)
				close(fds[k]);
	}
}

int ferry_pcguard_start(struct ferry_pcguard **out, const char *path, unsigned max_channels,
			ferry_pcguard_adopt_fn adopt, void *adopt_arg, struct ferry_err *err)
{
	*out = NULL;
	if (max_channels < 1 || max_channels > FERRY_PCGUARD_MAX_CHANNELS)
		return ferry_err_set(err, EINVAL, "postcopy guard: 1 to %d channels, not %u", FERRY_PCGUARD_MAX_CHANNELS,
				     max_channels);
	struct ferry_pcguard *g = calloc(1, sizeof(*g));
	if (!g)
		return ferry_err_set(err, ENOMEM, "out of memory");
	g->listen_fd = g->stop_pipe[0] = g->stop_pipe[1] = -1;
	for (unsigned i = 0; i < FERRY_PCGUARD_MAX_CHANNELS; i++)
		g->ch[i].qemu_end = g->ch[i].dp_end = g->ch[i].pipe_rd = g->ch[i].pipe_wr = -1;
	g->max_channels = max_channels;
	g->adopt = adopt;
	g->adopt_arg = adopt_arg;
	g->st.last_sunk_byte = -1;
	touch_rx(g);
	int rc = pthread_mutex_init(&g->lock, NULL);
	if (rc) {
		free(g);
		return ferry_err_set(err, -rc, "postcopy guard: mutex: %s", strerror(rc));
	}
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path)) {
		rc = ferry_err_set(err, ENAMETOOLONG, "postcopy guard: socket path too long: %s", path);
		goto fail;
	}
	strcpy(sa.sun_path, path);
	if (pipe2(g->stop_pipe, O_CLOEXEC) ||
	    (g->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
		rc = ferry_err_set(err, -errno, "postcopy guard: %s", strerror(errno));
		goto fail;
	}
	unlink(path);
	if (bind(g->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(g->listen_fd, (int)max_channels)) {
		rc = ferry_err_set(err, -errno, "postcopy guard: cannot listen on %s: %s", path, strerror(errno));
		goto fail;
	}
	strcpy(g->path, path);
	if ((rc = pthread_create(&g->acceptor, NULL, acceptor_main, g))) {
		rc = ferry_err_set(err, -rc, "postcopy guard: cannot start: %s", strerror(rc));
		goto fail;
	}
	g->acceptor_started = true;
	*out = g;
	return 0;
fail:
	ferry_pcguard_stop(g);
	return rc;
}

int ferry_pcguard_commit(struct ferry_pcguard *g)
{
	pthread_mutex_lock(&g->lock);
	if (g->st.rescuing || g->st.dp_broken) {
		pthread_mutex_unlock(&g->lock);
		return -EPIPE;
	}
	if (!g->st.committed) {
		g->st.committed = true;
		if (g->st.shut_held && write_all(g->ch[0].qemu_end, g->held_shut, sizeof(g->held_shut)) == 0) {
			g->st.shut_held = false;
			g->shut_forwarded = true;
			g->st.rp_messages++;
		}
	}
	pthread_mutex_unlock(&g->lock);
	return 0;
}

int ferry_pcguard_rescue(struct ferry_pcguard *g)
{
	pthread_mutex_lock(&g->lock);
	if (g->st.committed) {
		pthread_mutex_unlock(&g->lock);
		return -EPERM;
	}
	g->st.rescuing = true;
	/* Unblock a splice stuck on a data plane that stopped reading. */
	for (unsigned i = 0; i < g->st.channels; i++)
		shutdown(g->ch[i].dp_end, SHUT_RDWR);
	pthread_mutex_unlock(&g->lock);
	return 0;
}

void ferry_pcguard_state(struct ferry_pcguard *g, struct ferry_pcguard_state *st)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&g->lock);
	*st = g->st;
	st->quiet_s = (double)(now.tv_sec - g->last_rx.tv_sec) + (double)(now.tv_nsec - g->last_rx.tv_nsec) / 1e9;
	pthread_mutex_unlock(&g->lock);
}

int ferry_pcguard_send_shut(struct ferry_pcguard *g, struct ferry_err *err)
{
	/* be16 type SHUT, be16 length 4, be32 0 = "no error" */
	static const uint8_t shut_ok[RP_HDR + 4] = { 0, RP_MSG_SHUT, 0, 4, 0, 0, 0, 0 };
	pthread_mutex_lock(&g->lock);
	int rc = !g->st.rescuing ? -EPERM : g->st.channels ? write_all(g->ch[0].qemu_end, shut_ok, sizeof(shut_ok)) : -ENOTCONN;
	pthread_mutex_unlock(&g->lock);
	if (rc)
		return ferry_err_set(err, rc, "postcopy guard: cannot end the source QEMU's migration: %s",
				     rc == -EPERM ? "not rescuing" : strerror(-rc));
	return 0;
}

void ferry_pcguard_stop(struct ferry_pcguard *g)
{
	if (!g)
		return;
	if (g->acceptor_started) {
		ssize_t n = write(g->stop_pipe[1], "x", 1);
		(void)n;
		pthread_join(g->acceptor, NULL);
	}
	stop_channels(g);
	int fds[] = { g->listen_fd, g->stop_pipe[0], g->stop_pipe[1] };
	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (g->path[0])
		unlink(g->path);
	pthread_mutex_destroy(&g->lock);
	free(g);
}
