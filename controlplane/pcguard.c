#include "pcguard.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* QEMU's return-path message types (migration/migration.c, MIG_RP_MSG_*). */
#define RP_MSG_SHUT 1
#define RP_HDR 4
#define RP_MAX_LEN 65535
#define SPLICE_CHUNK (1u << 20)

struct ferry_pcguard {
	int qemu_end, dp_end;
	int pipe_rd, pipe_wr;
	pthread_t down, up;
	bool down_started, up_started;
	pthread_mutex_t lock;      /* st and the rest below, and writes to qemu_end */
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

/* Swallow QEMU's bytes, remembering the last one and when it came. */
static void sink(struct ferry_pcguard *g)
{
	uint8_t buf[64 * 1024];
	for (;;) {
		ssize_t n = read(g->qemu_end, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		pthread_mutex_lock(&g->lock);
		g->st.sunk_bytes += (uint64_t)n;
		g->st.last_sunk_byte = buf[n - 1];
		touch_rx(g);
		pthread_mutex_unlock(&g->lock);
	}
}

/* QEMU -> data plane, kernel-side (splice through a pipe). */
static void *down_main(void *arg)
{
	struct ferry_pcguard *g = arg;
	for (;;) {
		pthread_mutex_lock(&g->lock);
		bool rescuing = g->st.rescuing || g->st.dp_broken;
		pthread_mutex_unlock(&g->lock);
		if (rescuing) {
			sink(g);
			return NULL;
		}
		ssize_t n = splice(g->qemu_end, NULL, g->pipe_wr, NULL, SPLICE_CHUNK, SPLICE_F_MOVE);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* QEMU closed its channel: pass the end on. */
			shutdown(g->dp_end, SHUT_WR);
			return NULL;
		}
		pthread_mutex_lock(&g->lock);
		touch_rx(g);
		pthread_mutex_unlock(&g->lock);
		size_t left = (size_t)n;
		while (left > 0) {
			ssize_t w = splice(g->pipe_rd, NULL, g->dp_end, NULL, left, SPLICE_F_MOVE);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				pthread_mutex_lock(&g->lock);
				g->st.peer_closed = true;
				g->st.dp_broken = true; /* before commit: swallow, never let QEMU see it */
				bool committed = g->st.committed;
				pthread_mutex_unlock(&g->lock);
				if (committed) {
					/* Postcopy already runs on the destination: QEMU
					 * must notice and pause for recovery. */
					shutdown(g->qemu_end, SHUT_RDWR);
					return NULL;
				}
				/* drop what sits in the pipe: it was going nowhere */
				uint8_t junk[64 * 1024];
				while (left > 0) {
					ssize_t r = read(g->pipe_rd, junk, left < sizeof(junk) ? left : sizeof(junk));
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

/* Data plane -> QEMU: the return path, passed on a whole message at a time so
 * that a SHUT of ours can always be put between two messages. */
static void *up_main(void *arg)
{
	struct ferry_pcguard *g = arg;
	uint8_t *buf = malloc(RP_HDR + RP_MAX_LEN);
	size_t have = 0;
	if (!buf)
		goto closed;
	for (;;) {
		ssize_t n = read(g->dp_end, buf + have, RP_HDR + RP_MAX_LEN - have);
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
				rc = write_all(g->qemu_end, buf + off, RP_HDR + len);
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
	pthread_mutex_lock(&g->lock);
	g->st.peer_closed = true;
	bool cut = g->st.committed && !g->shut_forwarded;
	pthread_mutex_unlock(&g->lock);
	if (cut)
		shutdown(g->qemu_end, SHUT_RDWR); /* after commit: QEMU pauses for recovery */
out:
	free(buf);
	return NULL;
}

int ferry_pcguard_start(struct ferry_pcguard **out, int *qemu_fd, int *dp_fd, struct ferry_err *err)
{
	*out = NULL;
	*qemu_fd = *dp_fd = -1;
	struct ferry_pcguard *g = calloc(1, sizeof(*g));
	if (!g)
		return ferry_err_set(err, ENOMEM, "out of memory");
	g->qemu_end = g->dp_end = g->pipe_rd = g->pipe_wr = -1;
	g->st.last_sunk_byte = -1;
	touch_rx(g);
	int a[2] = { -1, -1 }, b[2] = { -1, -1 }, p[2] = { -1, -1 };
	int rc;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) ||
	    pipe2(p, O_CLOEXEC)) {
		rc = ferry_err_set(err, -errno, "postcopy guard: cannot create its sockets: %s", strerror(errno));
		goto fail;
	}
	(void)fcntl(p[1], F_SETPIPE_SZ, SPLICE_CHUNK);
	if ((rc = pthread_mutex_init(&g->lock, NULL))) {
		rc = ferry_err_set(err, -rc, "postcopy guard: mutex: %s", strerror(rc));
		goto fail;
	}
	g->qemu_end = a[0];
	g->dp_end = b[0];
	g->pipe_rd = p[0];
	g->pipe_wr = p[1];
	*qemu_fd = a[1];
	*dp_fd = b[1];
	if ((rc = pthread_create(&g->down, NULL, down_main, g)) == 0) {
		g->down_started = true;
		rc = pthread_create(&g->up, NULL, up_main, g);
		g->up_started = rc == 0;
	}
	if (rc) {
		ferry_err_set(err, -rc, "postcopy guard: cannot start its threads: %s", strerror(rc));
		ferry_pcguard_stop(g);
		close(*qemu_fd);
		close(*dp_fd);
		*qemu_fd = *dp_fd = -1;
		return -rc;
	}
	*out = g;
	return 0;
fail:
	for (int i = 0; i < 2; i++) {
		if (a[i] >= 0)
			close(a[i]);
		if (b[i] >= 0)
			close(b[i]);
		if (p[i] >= 0)
			close(p[i]);
	}
	free(g);
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
		if (g->st.shut_held && write_all(g->qemu_end, g->held_shut, sizeof(g->held_shut)) == 0) {
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
	pthread_mutex_unlock(&g->lock);
	/* Unblock a splice stuck on a data plane that stopped reading. */
	shutdown(g->dp_end, SHUT_RDWR);
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
	int rc = g->st.rescuing ? write_all(g->qemu_end, shut_ok, sizeof(shut_ok)) : -EPERM;
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
	if (g->qemu_end >= 0)
		shutdown(g->qemu_end, SHUT_RDWR);
	if (g->dp_end >= 0)
		shutdown(g->dp_end, SHUT_RDWR);
	if (g->down_started)
		pthread_join(g->down, NULL);
	if (g->up_started)
		pthread_join(g->up, NULL);
	int fds[] = { g->qemu_end, g->dp_end, g->pipe_rd, g->pipe_wr };
	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (fds[i] >= 0)
			close(fds[i]);
	pthread_mutex_destroy(&g->lock);
	free(g);
}
