#include "jsonline.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

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
}

void ferry_jl_close(struct ferry_jl *jl)
{
	if (jl->fd >= 0)
		close(jl->fd);
	jl->fd = -1;
	free(jl->buf);
	jl->buf = NULL;
	jl->len = jl->cap = 0;
}

int ferry_jl_send(struct ferry_jl *jl, json_t *msg, int timeout_ms, struct ferry_err *err)
{
	char *text = json_dumps(msg, JSON_COMPACT);
	if (!text)
		return ferry_err_set(err, ENOMEM, "cannot encode JSON");
	size_t len = strlen(text);
	text[len] = '\0';
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	int rc = 0;
	const char *parts[2] = { text, "\n" };
	size_t lens[2] = { len, 1 };
	for (int i = 0; i < 2 && rc == 0; i++) {
		size_t off = 0;
		while (off < lens[i]) {
			ssize_t w = send(jl->fd, parts[i] + off, lens[i] - off, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w > 0) {
				off += (size_t)w;
				continue;
			}
			if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
				if ((rc = wait_fd(jl->fd, POLLOUT, deadline, err)))
					break;
				continue;
			}
			rc = ferry_err_set(err, errno == EPIPE ? ECONNRESET : errno, "send: %s",
					   errno == EPIPE ? "peer closed the connection" : strerror(errno));
			break;
		}
	}
	free(text);
	return rc;
}

int ferry_jl_recv(struct ferry_jl *jl, int timeout_ms, json_t **msg, struct ferry_err *err)
{
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
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
		if (jl->cap - jl->len < 4096) {
			size_t ncap = jl->cap ? jl->cap * 2 : 8192;
			char *nb = realloc(jl->buf, ncap);
			if (!nb)
				return ferry_err_set(err, ENOMEM, "out of memory");
			jl->buf = nb;
			jl->cap = ncap;
		}
		ssize_t r = recv(jl->fd, jl->buf + jl->len, jl->cap - jl->len, MSG_DONTWAIT);
		if (r > 0) {
			jl->len += (size_t)r;
			continue;
		}
		if (r == 0)
			return ferry_err_set(err, ECONNRESET, jl->len ? "connection closed in the middle of a message"
								: "connection closed");
		if (errno != EAGAIN && errno != EINTR)
			return ferry_err_set(err, errno, "recv: %s", strerror(errno));
		int rc = wait_fd(jl->fd, POLLIN, deadline, err);
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

int ferry_jl_connect_tcp(const char *hostport, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err)
{
	char host[256];
	const char *colon = strrchr(hostport, ':');
	if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof(host) || !colon[1])
		return ferry_err_set(err, EINVAL, "'%s' is not HOST:PORT", hostport);
	memcpy(host, hostport, (size_t)(colon - hostport));
	host[colon - hostport] = '\0';
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
	int g = getaddrinfo(host, colon + 1, &hints, &res);
	if (g)
		return ferry_err_set(err, EHOSTUNREACH, "cannot resolve %s: %s", hostport, gai_strerror(g));
	int rc = -EHOSTUNREACH;
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
			int fl = fcntl(fd, F_GETFL);
			if (fl >= 0)
				(void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
			freeaddrinfo(res);
			ferry_jl_init(jl, fd);
			return 0;
		}
		rc = ferry_err_set(err, pr == 0 ? ETIMEDOUT : (soerr ? soerr : errno), "cannot connect to %s: %s",
				   hostport, pr == 0 ? "timed out" : strerror(soerr ? soerr : errno));
		close(fd);
	}
	freeaddrinfo(res);
	return rc;
}
