#include "tunnel.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "migrate.h"

#define REQ_TIMEOUT_MS 30000
#define STREAM_CONNECT_MS 10000  /* the peer connects a carried connection to its target */
#define MAX_ACTIVE 64            /* connections carried at once by one standing tunnel */

int ferry_tunnel_session_open(struct ferry_dp *dp, struct ferry_jl *ctl, json_t *open_req, unsigned lanes,
			      unsigned streams, const char *listen_path, struct ferry_session **out, uint32_t *sid,
			      double *peer_cpu, struct ferry_err *err)
{
	json_t *rep = NULL;
	json_object_set_new(open_req, "window", json_integer((json_int_t)ferry_dp_window(dp)));
	if (ferry_jl_call(ctl, open_req, REQ_TIMEOUT_MS, &rep, err))
		return ferry_err_prefix(err, "peer refused the session");
	struct ferry_session_params sp = { .lanes = lanes ? lanes : streams, .max_streams = streams,
					   .unix_path = listen_path, .timeout_ms = 10000 };
	char ep[FERRY_DP_ENDPOINT_MAX];
	int rc = ferry_session_reply_parse(rep, ferry_dp_window(dp), &sp, ep, sizeof(ep), err);
	if (rc)
		goto out;
	if (peer_cpu)
		*peer_cpu = json_number_value(json_object_get(rep, "cpu_s"));
	rc = ferry_session_create_src(dp, &sp, ep, out, err);
	*sid = sp.id;
out:
	json_decref(rep);
	return rc;
}

struct carried {
	uint32_t id;
	struct ferry_session *sess;
};

struct ferry_standing_tunnel {
	struct ferry_dp *dp;
	char peer[256];
	char listen_path[108];
	char target[4096];
	unsigned lanes;
	void (*log)(void *ctx, const char *msg);
	void *log_ctx;

	int listen_fd;
	int stop_evfd;
	pthread_t thread;
	bool thread_started;
	struct ferry_jl ctl;          /* used by the tunnel's thread only, once started */

	pthread_mutex_t lock;         /* guards what follows */
	struct carried active[MAX_ACTIVE];
	unsigned nactive;
	uint64_t connections, failed;
	uint64_t done_tx, done_rx;    /* bytes of sessions already closed */
	char last_error[FERRY_ERR_MSG_MAX];
};

static void tlog(struct ferry_standing_tunnel *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tlog(struct ferry_standing_tunnel *t, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (t->log)
		t->log(t->log_ctx, msg);
}

static void note_failure(struct ferry_standing_tunnel *t, const char *msg)
{
	pthread_mutex_lock(&t->lock);
	t->failed++;
	snprintf(t->last_error, sizeof(t->last_error), "%s", msg);
	pthread_mutex_unlock(&t->lock);
	tlog(t, "tunnel %s -> %s:%s: %s", t->listen_path, t->peer, t->target, msg);
}

static int ctl_connect(struct ferry_standing_tunnel *t, struct ferry_err *err)
{
	if (t->ctl.fd >= 0)
		return 0;
	if (ferry_jl_connect_tcp(t->peer, REQ_TIMEOUT_MS, &t->ctl, err)) {
		t->ctl.fd = -1;
		return ferry_err_prefix(err, "cannot reach the peer daemon %s", t->peer);
	}
	return 0;
}

/* Tell the peer, close the session, and keep its count: the caller already
 * took it out of the active table. */
static void close_carried(struct ferry_standing_tunnel *t, struct carried *c)
{
	struct ferry_session_stats st = { .state = FERRY_SESSION_CLOSED };
	if (c->sess)
		ferry_session_stats(c->sess, &st);
	if (t->ctl.fd >= 0) {
		struct ferry_err e = { 0 };
		json_t *req = json_pack("{s:s, s:I}", "cmd", "session-close", "session", (json_int_t)c->id);
		int rc = req ? ferry_jl_call(&t->ctl, req, 5000, NULL, &e) : -ENOMEM;
		json_decref(req);
		/* A broken control connection is remade for the next connection. */
		if (rc && rc != -EREMOTEIO)
			ferry_jl_close(&t->ctl);
	}
	ferry_session_close(c->sess);
	if (st.state == FERRY_SESSION_FAILED)
		note_failure(t, st.error);
}

/* Take entry i out of the active table, its bytes into the totals (in one
 * step, so a status read never misses them). Caller holds t->lock. */
static struct carried retire_locked(struct ferry_standing_tunnel *t, unsigned i)
{
	struct carried c = t->active[i];
	struct ferry_session_stats st;
	ferry_session_stats(c.sess, &st);
	t->done_tx += st.tx_bytes;
	t->done_rx += st.rx_bytes;
	t->active[i] = t->active[--t->nactive];
	return c;
}

/* Close the sessions whose connection ended (both directions closed) or failed. */
static void reap(struct ferry_standing_tunnel *t)
{
	for (unsigned i = 0; i < t->nactive;) {
		struct ferry_session_stats st;
		ferry_session_stats(t->active[i].sess, &st);
		bool ended = st.state == FERRY_SESSION_FAILED || (st.streams_opened > 0 && st.streams_closed == st.streams_opened);
		if (!ended) {
			i++;
			continue;
		}
		pthread_mutex_lock(&t->lock);
		struct carried c = retire_locked(t, i);
		pthread_mutex_unlock(&t->lock);
		close_carried(t, &c);
	}
}

/* Carry one accepted connection: a session of its own, and wait until the
 * peer has connected it, so the next connection cannot overtake it. */
static void carry(struct ferry_standing_tunnel *t, int fd)
{
	struct ferry_err err = { 0 };
	pthread_mutex_lock(&t->lock);
	t->connections++;
	bool full = t->nactive >= MAX_ACTIVE;
	pthread_mutex_unlock(&t->lock);
	if (full) {
		close(fd);
		char msg[96];
		snprintf(msg, sizeof(msg), "refused a connection: already carrying %d connections", MAX_ACTIVE);
		note_failure(t, msg);
		return;
	}
	struct carried c = { 0 };
	json_t *req = json_pack("{s:s, s:s, s:i, s:i}", "cmd", "session-open", "target", t->target, "streams", 1,
				"lanes", (int)t->lanes);
	int rc = req ? 0 : ferry_err_set(&err, ENOMEM, "out of memory");
	/* A control connection kept from earlier may have died while idle (the
	 * peer restarted): then try once more on a fresh one. */
	for (int attempt = 0; !rc && attempt < 2; attempt++) {
		bool fresh = t->ctl.fd < 0;
		if ((rc = ctl_connect(t, &err)))
			break;
		rc = ferry_tunnel_session_open(t->dp, &t->ctl, req, t->lanes, 1, NULL, &c.sess, &c.id, NULL, &err);
		if (!rc || rc == -EREMOTEIO || c.sess)
			break;
		ferry_jl_close(&t->ctl); /* the control connection itself failed */
		if (fresh)
			break;
		memset(&err, 0, sizeof(err));
		rc = 0;
	}
	if (rc && rc != -EREMOTEIO && !strstr(err.msg, t->peer))
		ferry_err_prefix(&err, "peer daemon %s", t->peer);
	json_decref(req);
	if (!rc)
		rc = ferry_session_add_stream(c.sess, fd, &err);
	if (rc) {
		close(fd);
		if (c.sess || c.id) /* the peer may hold its half: close it */
			close_carried(t, &c);
		note_failure(t, err.msg);
		return;
	}
	pthread_mutex_lock(&t->lock);
	t->active[t->nactive++] = c;
	pthread_mutex_unlock(&t->lock);
	/* On failure the session is failed too: the reaper accounts for it. */
	if (ferry_session_wait_streams(c.sess, 1, STREAM_CONNECT_MS, &err)) {
		ferry_session_abort(c.sess, err.msg);
		tlog(t, "tunnel %s: session %u: %s", t->listen_path, c.id, err.msg);
	}
}

static void *tunnel_main(void *arg)
{
	struct ferry_standing_tunnel *t = arg;
	for (;;) {
		struct pollfd p[2] = { { .fd = t->listen_fd, .events = POLLIN }, { .fd = t->stop_evfd, .events = POLLIN } };
		int r = poll(p, 2, 200);
		if (r > 0 && p[1].revents)
			break;
		reap(t);
		if (r <= 0 || !(p[0].revents & POLLIN))
			continue;
		int fd = accept4(t->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0)
			carry(t, fd);
	}
	return NULL;
}

int ferry_standing_tunnel_start(const struct ferry_standing_tunnel_params *p, struct ferry_standing_tunnel **out,
				struct ferry_err *err)
{
	struct ferry_standing_tunnel *t = calloc(1, sizeof(*t));
	if (!t)
		return ferry_err_set(err, ENOMEM, "out of memory");
	t->listen_fd = t->stop_evfd = t->ctl.fd = -1;
	pthread_mutex_init(&t->lock, NULL);
	t->dp = p->dp;
	t->lanes = p->lanes ? p->lanes : 1;
	t->log = p->log;
	t->log_ctx = p->log_ctx;
	int rc;
	if (strlen(p->peer) >= sizeof(t->peer) || strlen(p->listen_path) >= sizeof(t->listen_path) ||
	    strlen(p->target) >= sizeof(t->target)) {
		rc = ferry_err_set(err, ENAMETOOLONG, "tunnel peer or path too long");
		goto fail;
	}
	strcpy(t->peer, p->peer);
	strcpy(t->listen_path, p->listen_path);
	strcpy(t->target, p->target);
	if (p->connect_now && (rc = ctl_connect(t, err)))
		goto fail;

	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, t->listen_path);
	struct stat stbuf;
	/* Replace a stale socket from an earlier run, never any other file. */
	if (lstat(t->listen_path, &stbuf) == 0 && S_ISSOCK(stbuf.st_mode))
		unlink(t->listen_path);
	t->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (t->listen_fd < 0 || bind(t->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(t->listen_fd, 64)) {
		rc = ferry_err_set(err, errno, "cannot listen on %s: %s", t->listen_path, strerror(errno));
		if (t->listen_fd >= 0) {
			close(t->listen_fd);
			t->listen_fd = -1;
		}
		goto fail;
	}
	t->stop_evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (t->stop_evfd < 0) {
		rc = ferry_err_set(err, errno, "eventfd: %s", strerror(errno));
		goto fail;
	}
	if ((rc = pthread_create(&t->thread, NULL, tunnel_main, t))) {
		rc = ferry_err_set(err, rc, "cannot start the tunnel thread: %s", strerror(rc));
		goto fail;
	}
	t->thread_started = true;
	*out = t;
	return 0;
fail:
	ferry_standing_tunnel_stop(t);
	return rc;
}

void ferry_standing_tunnel_stats(struct ferry_standing_tunnel *t, struct ferry_standing_tunnel_stats *st)
{
	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&t->lock);
	st->connections = t->connections;
	st->failed = t->failed;
	st->active = t->nactive;
	st->tx_bytes = t->done_tx;
	st->rx_bytes = t->done_rx;
	for (unsigned i = 0; i < t->nactive; i++) {
		struct ferry_session_stats ss;
		ferry_session_stats(t->active[i].sess, &ss);
		st->tx_bytes += ss.tx_bytes;
		st->rx_bytes += ss.rx_bytes;
	}
	memcpy(st->last_error, t->last_error, sizeof(st->last_error));
	pthread_mutex_unlock(&t->lock);
}

void ferry_standing_tunnel_stop(struct ferry_standing_tunnel *t)
{
	if (!t)
		return;
	if (t->thread_started) {
		uint64_t one = 1;
		ssize_t w = write(t->stop_evfd, &one, sizeof(one));
		(void)w; /* a full eventfd counter still wakes the thread */
		pthread_join(t->thread, NULL);
	}
	if (t->listen_fd >= 0) {
		close(t->listen_fd);
		unlink(t->listen_path);
	}
	while (t->nactive > 0) {
		pthread_mutex_lock(&t->lock);
		struct carried c = retire_locked(t, t->nactive - 1);
		pthread_mutex_unlock(&t->lock);
		close_carried(t, &c);
	}
	if (t->stop_evfd >= 0)
		close(t->stop_evfd);
	ferry_jl_close(&t->ctl);
	pthread_mutex_destroy(&t->lock);
	free(t);
}
