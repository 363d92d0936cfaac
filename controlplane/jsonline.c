#include "jsonline.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../drivers/hostport.h"

#define TLS_BYE_MS 1000
#define TLS_CONNECT_MAX_MS 30000   /* handshake bound when the caller gave none */

/* Set once at daemon start, read by every thread that dials a peer. */
static _Atomic(struct ferry_tls *) jl_tls;

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int wait_fd(int fd, short events, long long deadline, struct ferry_err *err)
{
	for (;;) {
		int left = -1;
		if (deadline >= 0) {
			long long l = deadline - now_ms();
			if (l <= 0)
				return ferry_err_set(err, ETIMEDOUT, "no answer in time");
			left = (int)l;
		}
		struct pollfd p = { .fd = fd, .events = events };
		int r = poll(&p, 1, left);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return ferry_err_set(err, errno, "poll: %s", strerror(errno));
	}
}

void ferry_jl_init(struct ferry_jl *jl, int fd)
{
	jl->fd = fd;
	jl->buf = NULL;
	jl->len = jl->cap = 0;
	jl->tls = NULL;
}

void ferry_jl_close(struct ferry_jl *jl)
{
	if (jl->tls)
		ferry_tls_close(jl->tls, TLS_BYE_MS);
	jl->tls = NULL;
	if (jl->fd >= 0)
		close(jl->fd);
	jl->fd = -1;
	free(jl->buf);
	jl->buf = NULL;
	jl->len = jl->cap = 0;
}

/* Write all of buf, over TLS or plain, by the deadline. */
static int jl_write(struct ferry_jl *jl, const char *buf, size_t len, long long deadline, struct ferry_err *err)
{
	size_t off = 0;
	while (off < len) {
		if (jl->tls) {
			/* After GNUTLS_E_AGAIN the same arguments are passed again. */
			ssize_t w = gnutls_record_send(jl->tls, buf + off, len - off);
			if (w > 0) {
				off += (size_t)w;
				continue;
			}
			if (w == GNUTLS_E_PUSH_ERROR) {
				/* The peer may have said why before it closed (TLS 1.3:
				 * a refused client certificate shows only now). */
				char tmp[512];
				ssize_t r = gnutls_record_recv(jl->tls, tmp, sizeof(tmp));
				if (r == GNUTLS_E_FATAL_ALERT_RECEIVED)
					w = r;
			}
			if (w != GNUTLS_E_AGAIN && w != GNUTLS_E_INTERRUPTED)
				return ferry_tls_io_error(jl->tls, (int)w, "send", err);
			int rc = wait_fd(jl->fd, gnutls_record_get_direction(jl->tls) ? POLLOUT : POLLIN, deadline, err);
			if (rc)
				return rc;
			continue;
		}
		ssize_t w = send(jl->fd, buf + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w > 0) {
			off += (size_t)w;
			continue;
		}
		if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
			int rc = wait_fd(jl->fd, POLLOUT, deadline, err);
			if (rc)
				return rc;
			continue;
		}
		return ferry_err_set(err, errno == EPIPE ? ECONNRESET : errno, "send: %s",
				     errno == EPIPE ? "peer closed the connection" : strerror(errno));
	}
	return 0;
}

int ferry_jl_send(struct ferry_jl *jl, json_t *msg, int timeout_ms, struct ferry_err *err)
{
	char *text = json_dumps(msg, JSON_COMPACT);
	if (!text)
		return ferry_err_set(err, ENOMEM, "cannot encode JSON");
	size_t len = strlen(text);
	/* One buffer with the newline: one TLS record, not two. */
	char *line = realloc(text, len + 2);
	if (!line) {
		free(text);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	line[len] = '\n';
	line[len + 1] = '\0';
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	int rc = jl_write(jl, line, len + 1, deadline, err);
	free(line);
	return rc;
}

/* Read what is there into the buffer: > 0 bytes, 0 at EOF, -EAGAIN when
 * nothing is ready (wait for *events), another -errno with err filled. */
static ssize_t jl_read(struct ferry_jl *jl, short *events, struct ferry_err *err)
{
	*events = POLLIN;
	if (jl->tls) {
		for (;;) {
			ssize_t r = gnutls_record_recv(jl->tls, jl->buf + jl->len, jl->cap - jl->len);
			if (r >= 0)
				return r;
			if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
				*events = gnutls_record_get_direction(jl->tls) ? POLLOUT : POLLIN;
				return -EAGAIN;
			}
			/* A peer that died sends no close_notify: that is still EOF. */
			if (r == GNUTLS_E_PREMATURE_TERMINATION)
				return 0;
			if (!gnutls_error_is_fatal((int)r))
				continue; /* a warning alert: read on */
			return ferry_tls_io_error(jl->tls, (int)r, "recv", err);
		}
	}
	ssize_t r = recv(jl->fd, jl->buf + jl->len, jl->cap - jl->len, MSG_DONTWAIT);
	if (r >= 0)
		return r;
	if (errno == EAGAIN || errno == EINTR)
		return -EAGAIN;
	return ferry_err_set(err, errno, "recv: %s", strerror(errno));
}

static int jl_grow(struct ferry_jl *jl, struct ferry_err *err)
{
	if (jl->cap - jl->len >= 4096)
		return 0;
	size_t ncap = jl->cap ? jl->cap * 2 : 8192;
	char *nb = realloc(jl->buf, ncap);
	if (!nb)
		return ferry_err_set(err, ENOMEM, "out of memory");
	jl->buf = nb;
	jl->cap = ncap;
	return 0;
}

int ferry_jl_recv(struct ferry_jl *jl, int timeout_ms, json_t **msg, struct ferry_err *err)
{
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		/* A TLS record where a JSON line should be: a daemon with
		 * credentials talking to one without. Say so at once rather than
		 * wait for a newline that may never come. */
		if (!jl->tls && jl->len >= 2 && (jl->buf[0] == 0x15 || jl->buf[0] == 0x16) && jl->buf[1] == 0x03)
			return ferry_err_set(err, EPROTO, "the peer speaks TLS and this end is plain TCP (--insecure-no-tls "
							  "on one side only?)");
		char *nl = jl->len ? memchr(jl->buf, '\n', jl->len) : NULL;
		if (nl) {
			size_t line = (size_t)(nl - jl->buf);
			json_error_t je;
			json_t *j = json_loadb(jl->buf, line, 0, &je);
			memmove(jl->buf, nl + 1, jl->len - line - 1);
			jl->len -= line + 1;
			if (!j)
				return ferry_err_set(err, EPROTO, "malformed JSON message: %s", je.text);
			if (!json_is_object(j)) {
				json_decref(j);
				return ferry_err_set(err, EPROTO, "message is not a JSON object");
			}
			*msg = j;
			return 0;
		}
		if (jl->len >= FERRY_JSONLINE_MAX)
			return ferry_err_set(err, EPROTO, "message longer than %u bytes", FERRY_JSONLINE_MAX);
		int rc = jl_grow(jl, err);
		if (rc)
			return rc;
		short events;
		ssize_t r = jl_read(jl, &events, err);
		if (r > 0) {
			jl->len += (size_t)r;
			continue;
		}
		if (r == 0)
			return ferry_err_set(err, ECONNRESET, jl->len ? "connection closed in the middle of a message"
								: "connection closed");
		if (r != -EAGAIN)
			return (int)r;
		rc = wait_fd(jl->fd, events, deadline, err);
		if (rc)
			return rc;
	}
}

int ferry_jl_call(struct ferry_jl *jl, json_t *req, int timeout_ms, json_t **reply, struct ferry_err *err)
{
	int rc = ferry_jl_send(jl, req, timeout_ms, err);
	if (rc)
		return rc;
	json_t *r = NULL;
	rc = ferry_jl_recv(jl, timeout_ms, &r, err);
	if (rc)
		return rc;
	json_t *ok = json_object_get(r, "ok");
	if (!json_is_boolean(ok)) {
		json_decref(r);
		return ferry_err_set(err, EPROTO, "reply has no boolean \"ok\"");
	}
	if (!json_is_true(ok)) {
		const char *e = json_string_value(json_object_get(r, "error"));
		rc = ferry_err_set(err, EREMOTEIO, "%s", e ? e : "request failed (no reason given)");
		json_decref(r);
		return rc;
	}
	if (reply)
		*reply = r;
	else
		json_decref(r);
	return 0;
}

int ferry_jl_connect_unix(const char *path, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return ferry_err_set(err, ENAMETOOLONG, "socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return ferry_err_set(err, errno, "socket: %s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		int e = errno;
		close(fd);
		return ferry_err_set(err, e, "cannot connect to %s: %s", path, strerror(e));
	}
	(void)timeout_ms;
	ferry_jl_init(jl, fd);
	return 0;
}

bool ferry_jl_peer_gone(struct ferry_jl *jl)
{
	struct pollfd p = { .fd = jl->fd, .events = POLLIN };
	if (jl->fd < 0)
		return true;
	if (poll(&p, 1, 0) != 1)
		return false;
	if (!jl->tls) {
		char c;
		return recv(jl->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0 || (p.revents & (POLLHUP | POLLERR));
	}
	/* TLS: bytes on the socket may be a record or the close_notify, only
	 * reading tells; a record read here waits in the buffer. */
	struct ferry_err e = { 0 };
	if (jl_grow(jl, &e))
		return false;
	short events;
	ssize_t r = jl_read(jl, &events, &e);
	if (r > 0) {
		jl->len += (size_t)r;
		return false;
	}
	return r != -EAGAIN;
}

void ferry_jl_set_tls(struct ferry_tls *tls)
{
	atomic_store(&jl_tls, tls);
}

struct ferry_tls *ferry_jl_get_tls(void)
{
	return atomic_load(&jl_tls);
}

int ferry_jl_accept_tls(struct ferry_jl *jl, struct ferry_tls *tls, int timeout_ms, struct ferry_err *err)
{
	if (!tls)
		return 0;
	return ferry_tls_handshake(tls, jl->fd, true, NULL, timeout_ms, &jl->tls, err);
}

void ferry_jl_tcp_setup(int fd)
{
	/* A peer host that vanishes (power, a cut link) sends no FIN: without
	 * probes a daemon would hold the sessions it owns for hours. Idle 10 s,
	 * then 3 probes 5 s apart; unacknowledged data gives up after 30 s. */
	int one = 1, idle = 10, intvl = 5, cnt = 3;
	unsigned user_timeout_ms = 30000;
	(void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
	/* Every message is one write (one TLS record), so Nagle never merges
	 * anything; it only stalls: TLS 1.3's client Finished and the first
	 * request go out as two writes, and the second one waited for the
	 * peer's delayed ACK (40 ms, measured in Prepare). */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int ferry_jl_connect_tcp(const char *hostport, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err)
{
	return ferry_jl_connect_tcp_tls(hostport, timeout_ms, atomic_load(&jl_tls), jl, err);
}

int ferry_jl_connect_tcp_tls(const char *hostport, int timeout_ms, struct ferry_tls *tls, struct ferry_jl *jl,
			     struct ferry_err *err)
{
	long long t0 = now_ms();
	struct ferry_hostport hp;
	int rc = ferry_parse_hostport(hostport, 0, &hp, err);
	if (rc)
		return rc;
	const char *host = hp.host;
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV }, *res = NULL;
	int g = getaddrinfo(host, hp.port, &hints, &res);
	if (g)
		return ferry_err_set(err, EHOSTUNREACH, "cannot resolve %s: %s", hostport, gai_strerror(g));
	rc = -EHOSTUNREACH;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) && errno != EINPROGRESS) {
			rc = ferry_err_set(err, errno, "cannot connect to %s: %s", hostport, strerror(errno));
			close(fd);
			continue;
		}
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		int pr = poll(&p, 1, timeout_ms);
		int soerr = 0;
		socklen_t sl = sizeof(soerr);
		if (pr == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0) {
			ferry_jl_tcp_setup(fd);
			int fl = fcntl(fd, F_GETFL);
			if (fl >= 0)
				(void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
			freeaddrinfo(res);
			gnutls_session_t s = NULL;
			if (tls) {
				long long left = timeout_ms < 0 ? TLS_CONNECT_MAX_MS : timeout_ms - (now_ms() - t0);
				if (left < 1)
					left = 1;
				if ((rc = ferry_tls_handshake(tls, fd, false, host, (int)left, &s, err))) {
					close(fd);
					return ferry_err_prefix(err, "TLS handshake with %s failed", hostport);
				}
			}
			ferry_jl_init(jl, fd);
			jl->tls = s;
			return 0;
		}
		rc = ferry_err_set(err, pr == 0 ? ETIMEDOUT : (soerr ? soerr : errno), "cannot connect to %s: %s",
				   hostport, pr == 0 ? "timed out" : strerror(soerr ? soerr : errno));
		close(fd);
	}
	freeaddrinfo(res);
	return rc;
}
