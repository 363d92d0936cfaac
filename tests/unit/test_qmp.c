/* Unit tests for the QMP client (controlplane/qmp.c).
 *
 * Standalone: prints one line per check, exits 0 when all pass, 1 otherwise.
 * The client is driven against scripted peers (a thread on the other end of
 * a socketpair, or of a real unix listening socket) and, when installed,
 * against a real qemu-system-x86_64. */
#include "controlplane/qmp.h"
#include "controlplane/migrate.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
static int checks;

static void check(bool ok, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void check(bool ok, int line, const char *fmt, ...)
{
	va_list ap;

	checks++;
	if (!ok)
		failures++;
	printf("%s - ", ok ? "ok  " : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (!ok)
		printf("   (test_qmp.c:%d)", line);
	printf("\n");
	fflush(stdout);
}
#define CHECK(cond, ...) check((cond), __LINE__, __VA_ARGS__)

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* ---- scripted peer ------------------------------------------------------- */

#define GREETING                                                                              \
	"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 1, \"minor\": 2, \"major\": 8}, "     \
	"\"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n"

struct peer {
	int fd;         /* peer end */
	int listen_fd;  /* when >= 0, accept() the connection first */
	void (*script)(struct peer *);
	pthread_t thread;
	char buf[1 << 16];
	size_t len;
	int got_fds[8];
	int nfds;
	char fail[256]; /* first peer-side failure, empty if none */
};

static void peer_fail(struct peer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void peer_fail(struct peer *p, const char *fmt, ...)
{
	va_list ap;

	if (p->fail[0])
		return;
	va_start(ap, fmt);
	vsnprintf(p->fail, sizeof(p->fail), fmt, ap);
	va_end(ap);
}

static int peer_send(struct peer *p, const char *data, size_t len)
{
	while (len) {
		ssize_t n = send(p->fd, data, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

static void peer_sendf(struct peer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void peer_sendf(struct peer *p, const char *fmt, ...)
{
	char line[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(line)) {
		peer_fail(p, "peer_sendf: line too long");
		return;
	}
	if (peer_send(p, line, (size_t)n) < 0)
		peer_fail(p, "peer send failed: %s", strerror(errno));
}

/* Next line from the client as a JSON object, or NULL on EOF/timeout.
 * recvmsg() so fds passed with SCM_RIGHTS are collected. */
static json_t *peer_read(struct peer *p, int timeout_ms)
{
	for (;;) {
		char *nl = memchr(p->buf, '\n', p->len);
		union {
			char b[CMSG_SPACE(sizeof(int) * 4)];
			struct cmsghdr align;
		} ctl;
		struct iovec iov;
		struct msghdr mh;
		struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
		ssize_t n;

		if (nl) {
			size_t l = (size_t)(nl - p->buf);
			json_error_t je;
			json_t *j = json_loadb(p->buf, l, 0, &je);

			memmove(p->buf, nl + 1, p->len - l - 1);
			p->len -= l + 1;
			if (!j)
				peer_fail(p, "client sent bad JSON: %s", je.text);
			return j;
		}
		if (p->len == sizeof(p->buf)) {
			peer_fail(p, "client line too long");
			return NULL;
		}
		if (poll(&pfd, 1, timeout_ms) <= 0)
			return NULL;
		iov.iov_base = p->buf + p->len;
		iov.iov_len = sizeof(p->buf) - p->len;
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = ctl.b;
		mh.msg_controllen = sizeof(ctl.b);
		n = recvmsg(p->fd, &mh, MSG_CMSG_CLOEXEC);
		if (n <= 0)
			return NULL;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (size_t i = 0; i < k; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					if (p->nfds < 8)
						p->got_fds[p->nfds++] = fd;
					else
						close(fd);
				}
			}
		}
		p->len += (size_t)n;
	}
}

/* Expect {"execute": cmd, "id": N, ...}; returns N (or -1), *msg_out if wanted. */
static int64_t peer_expect(struct peer *p, const char *cmd, json_t **msg_out)
{
	json_t *m = peer_read(p, 5000);
	const char *got;
	json_t *id;
	int64_t r;

	if (msg_out)
		*msg_out = NULL;
	if (!m) {
		peer_fail(p, "expected command %s, got EOF/timeout", cmd);
		return -1;
	}
	got = json_string_value(json_object_get(m, "execute"));
	id = json_object_get(m, "id");
	if (!got || strcmp(got, cmd) != 0 || !json_is_integer(id)) {
		peer_fail(p, "expected command %s with integer id, got %s", cmd, got ? got : "?");
		json_decref(m);
		return -1;
	}
	r = json_integer_value(id);
	if (msg_out)
		*msg_out = m;
	else
		json_decref(m);
	return r;
}

/* Hold the connection open until the client closes it. */
static void peer_drain(struct peer *p)
{
	json_t *m;

	while ((m = peer_read(p, 10000)))
		json_decref(m);
}

static void peer_handshake(struct peer *p)
{
	int64_t id;

	peer_sendf(p, "%s", GREETING);
	id = peer_expect(p, "qmp_capabilities", NULL);
	peer_sendf(p, "{\"return\": {}, \"id\": %" PRId64 "}\r\n", id);
}

static void *peer_main(void *arg)
{
	struct peer *p = arg;

	if (p->listen_fd >= 0) {
		p->fd = accept4(p->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (p->fd < 0) {
			peer_fail(p, "accept: %s", strerror(errno));
			return NULL;
		}
	}
	p->script(p);
	return NULL;
}

/* Start a peer on a socketpair; returns the client's fd (or -1). */
static struct peer *peer_start(void (*script)(struct peer *), int *client_fd)
{
	struct peer *p = calloc(1, sizeof(*p));
	int sv[2];

	*client_fd = -1;
	if (!p)
		return NULL;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		free(p);
		return NULL;
	}
	p->fd = sv[1];
	p->listen_fd = -1;
	p->script = script;
	if (pthread_create(&p->thread, NULL, peer_main, p) != 0) {
		close(sv[0]);
		close(sv[1]);
		free(p);
		return NULL;
	}
	*client_fd = sv[0];
	return p;
}

static void peer_finish(struct peer *p, const char *name)
{
	if (!p) {
		CHECK(false, "%s: peer started", name);
		return;
	}
	pthread_join(p->thread, NULL);
	CHECK(p->fail[0] == '\0', "%s: scripted peer saw expected traffic%s%s", name,
	      p->fail[0] ? ": " : "", p->fail);
	if (p->fd >= 0)
		close(p->fd);
	for (int i = 0; i < p->nfds; i++)
		close(p->got_fds[i]);
	free(p);
}

/* ---- parsing ------------------------------------------------------------- */

static int parse(const char *s, json_t **msg, enum ferry_qmp_msg_kind *kind, int64_t *id,
		 struct ferry_err *err)
{
	ferry_err_clear(err);
	return ferry_qmp_parse_message(s, strlen(s), msg, kind, id, err);
}

static void test_parse(void)
{
	struct ferry_err err;
	enum ferry_qmp_msg_kind kind;
	json_t *msg;
	int64_t id;
	int rc;

	rc = parse(GREETING, &msg, &kind, &id, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_GREETING && id == -1 && msg,
	      "parse: greeting (rc=%d kind=%d id=%" PRId64 ")", rc, kind, id);
	json_decref(msg);

	rc = parse("{\"return\": {\"status\": \"running\"}, \"id\": 42}", &msg, &kind, &id, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_RETURN && id == 42 &&
		      json_is_object(json_object_get(msg, "return")),
	      "parse: return with id 42");
	json_decref(msg);

	rc = parse("{\"return\": []}", NULL, &kind, &id, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_RETURN && id == -1, "parse: return without id");

	rc = parse("{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 7}", &msg,
		   &kind, &id, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_ERROR && id == 7, "parse: error reply");
	json_decref(msg);

	rc = parse("{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}",
		   &msg, &kind, &id, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_EVENT, "parse: event with timestamp");
	json_decref(msg);

	rc = parse("{\"event\": \"RESUME\"}", NULL, &kind, NULL, &err);
	CHECK(rc == 0 && kind == FERRY_QMP_MSG_EVENT, "parse: event without timestamp");

	rc = parse("{\"return\": {}, ", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && msg == NULL && strstr(err.msg, "malformed JSON"),
	      "parse: malformed JSON -> -EPROTO (%s)", err.msg);

	rc = parse("SSH-2.0-OpenSSH_9.2", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "malformed JSON"),
	      "parse: plain text -> -EPROTO (%s)", err.msg);

	rc = parse("[1, 2, 3]", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "not a JSON object") && strstr(err.msg, "array"),
	      "parse: array -> -EPROTO (%s)", err.msg);

	rc = parse("\"hello\"", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "not a JSON object"),
	      "parse: string -> -EPROTO (%s)", err.msg);

	rc = parse("{\"error\": {\"class\": \"GenericError\"}, \"id\": 1}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "desc") && msg == NULL,
	      "parse: error without desc -> -EPROTO (%s)", err.msg);

	rc = parse("{\"error\": {\"class\": 5, \"desc\": \"d\"}}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "class"),
	      "parse: error with non-string class -> -EPROTO (%s)", err.msg);

	rc = parse("{\"error\": \"boom\"}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "not an object"),
	      "parse: error not an object -> -EPROTO (%s)", err.msg);

	rc = parse("{\"return\": {}, \"id\": \"5\"}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "id is not an integer"),
	      "parse: string id -> -EPROTO (%s)", err.msg);

	rc = parse("{\"return\": {}, \"id\": 5.5}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "id is not an integer"),
	      "parse: real id -> -EPROTO (%s)", err.msg);

	rc = parse("{\"event\": 3}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "event"),
	      "parse: non-string event -> -EPROTO (%s)", err.msg);

	rc = parse("{\"QMP\": []}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "QMP"),
	      "parse: QMP not an object -> -EPROTO (%s)", err.msg);

	rc = parse("{\"hello\": 1, \"world\": 2}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "unrecognized") && strstr(err.msg, "hello"),
	      "parse: unknown message -> -EPROTO naming keys (%s)", err.msg);

	rc = parse("{}", &msg, &kind, &id, &err);
	CHECK(rc == -EPROTO && strstr(err.msg, "unrecognized"),
	      "parse: empty object -> -EPROTO (%s)", err.msg);

	{
		size_t n = (size_t)16 * 1024 * 1024 + 16;
		char *big = malloc(n);

		if (!big) {
			CHECK(false, "parse: allocate huge message");
		} else {
			memset(big, ' ', n);
			memcpy(big, "{\"return\": \"", 12);
			big[n - 2] = '"';
			big[n - 1] = '}';
			ferry_err_clear(&err);
			rc = ferry_qmp_parse_message(big, n, &msg, &kind, &id, &err);
			CHECK(rc == -EPROTO && strstr(err.msg, "QMP message too large"),
			      "parse: >16 MiB message -> -EPROTO (%s)", err.msg);
			free(big);
		}
	}

	/* Error messages go to the first error only; NULL err is allowed. */
	rc = ferry_qmp_parse_message("[]", 2, NULL, NULL, NULL, NULL);
	CHECK(rc == -EPROTO, "parse: NULL outputs and NULL err tolerated");
}

/* ---- scripted sessions --------------------------------------------------- */

static void script_full(struct peer *p)
{
	int64_t id_status, id_bad, id_fd, id_mig, id_hang;
	json_t *m;

	/* Greeting split in two writes: the client must reassemble lines. */
	peer_sendf(p, "%.20s", GREETING);
	sleep_ms(20);
	peer_sendf(p, "%s", &GREETING[20]);
	id_status = peer_expect(p, "qmp_capabilities", NULL);
	peer_sendf(p, "{\"return\": {}, \"id\": %" PRId64 "}\n", id_status);

	id_status = peer_expect(p, "query-status", NULL);
	/* Event first, then a reply for someone else, then ours; the last two
	 * in one write so the client sees several lines in one recv. */
	peer_sendf(p, "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 5}}\n");
	sleep_ms(10);
	peer_sendf(p,
		   "{\"return\": {\"status\": \"wrong\"}, \"id\": %" PRId64 "}\n"
		   "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": %" PRId64 "}\n",
		   id_status + 1000, id_status);

	id_bad = peer_expect(p, "bad-command", NULL);
	if (id_bad <= id_status)
		peer_fail(p, "ids not increasing: %" PRId64 " then %" PRId64, id_status, id_bad);
	peer_sendf(p,
		   "{\"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}, \"id\": %" PRId64
		   "}\n",
		   id_bad);

	id_fd = peer_expect(p, "getfd", &m);
	if (m) {
		const char *name = json_string_value(
			json_object_get(json_object_get(m, "arguments"), "fdname"));
		if (!name || strcmp(name, "migfd") != 0)
			peer_fail(p, "getfd: wrong fdname");
		json_decref(m);
	}
	if (p->nfds != 1)
		peer_fail(p, "getfd: expected 1 fd via SCM_RIGHTS, got %d", p->nfds);
	peer_sendf(p, "{\"return\": {}, \"id\": %" PRId64 "}\n", id_fd);

	id_mig = peer_expect(p, "migrate", &m);
	if (m) {
		json_t *a = json_object_get(m, "arguments");
		if (!json_is_string(json_object_get(a, "uri")) ||
		    strcmp(json_string_value(json_object_get(a, "uri")), "fd:migfd") != 0 ||
		    !json_is_false(json_object_get(a, "detach")))
			peer_fail(p, "migrate: wrong arguments");
		json_decref(m);
	}
	peer_sendf(p, "{\"return\": {}, \"id\": %" PRId64 "}\n", id_mig);
	sleep_ms(100);
	peer_sendf(p, "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 2, \"microseconds\": 0}}\n");

	/* Close in the middle of the reply. */
	id_hang = peer_expect(p, "query-hang", NULL);
	(void)id_hang;
	peer_sendf(p, "{\"return\": {\"sta");
	close(p->fd);
	p->fd = -1;
}

static void test_full_session(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	json_t *res = NULL, *ev = NULL;
	int cfd, rc, pfd[2];
	struct peer *p = peer_start(script_full, &cfd);
	const struct ferry_qmp_version *v;
	int64_t t0;

	if (!p) {
		CHECK(false, "session: start peer");
		return;
	}
	rc = ferry_qmp_open_fd(cfd, 5000, &q, &err);
	CHECK(rc == 0 && q, "session: greeting + qmp_capabilities (rc=%d %s)", rc, err.msg);
	if (rc < 0) {
		peer_finish(p, "session");
		return;
	}
	v = ferry_qmp_version(q);
	CHECK(v && v->major == 8 && v->minor == 2 && v->micro == 1, "session: version 8.2.1 stored");

	rc = ferry_qmp_execute(q, "query-status", NULL, &res, &err);
	CHECK(rc == 0 && json_is_string(json_object_get(res, "status")) &&
		      strcmp(json_string_value(json_object_get(res, "status")), "running") == 0,
	      "session: reply with wrong id skipped, own reply returned (rc=%d %s)", rc, err.msg);
	json_decref(res);

	ferry_err_clear(&err);
	rc = ferry_qmp_execute(q, "bad-command", NULL, &res, &err);
	CHECK(rc == -EREMOTEIO && res == NULL &&
		      strcmp(err.msg, "qmp bad-command: GenericError: boom") == 0,
	      "session: error reply -> -EREMOTEIO \"%s\"", err.msg);

	ferry_err_clear(&err);
	if (pipe2(pfd, O_CLOEXEC) < 0) {
		CHECK(false, "session: pipe");
	} else {
		rc = ferry_qmp_getfd(q, pfd[0], "migfd", &err);
		CHECK(rc == 0, "session: getfd passes fd via SCM_RIGHTS (rc=%d %s)", rc, err.msg);
		close(pfd[0]);
		close(pfd[1]);
	}

	ferry_err_clear(&err);
	rc = ferry_qmp_executef(q, &res, &err, "migrate", "{s:s, s:b}", "uri", "fd:migfd",
				"detach", 0);
	CHECK(rc == 0 && json_is_object(res), "session: executef with packed args (rc=%d %s)", rc,
	      err.msg);
	json_decref(res);

	ferry_err_clear(&err);
	rc = ferry_qmp_next_event(q, 0, &ev, &err);
	CHECK(rc == 0 && ev && strcmp(json_string_value(json_object_get(ev, "event")), "STOP") == 0,
	      "session: event seen while waiting for reply was queued");
	json_decref(ev);

	rc = ferry_qmp_next_event(q, 3000, &ev, &err);
	CHECK(rc == 0 && ev && strcmp(json_string_value(json_object_get(ev, "event")), "RESUME") == 0,
	      "session: next_event waits for a new event (rc=%d %s)", rc, err.msg);
	json_decref(ev);

	t0 = now_ms();
	rc = ferry_qmp_next_event(q, 100, &ev, &err);
	CHECK(rc == 0 && ev == NULL && now_ms() - t0 >= 90,
	      "session: next_event timeout -> 0 with NULL event");

	ferry_err_clear(&err);
	rc = ferry_qmp_execute(q, "query-hang", NULL, &res, &err);
	CHECK(rc == -ECONNRESET && res == NULL && strstr(err.msg, "QEMU closed the monitor"),
	      "session: peer closing mid-reply -> -ECONNRESET \"%s\"", err.msg);

	ferry_err_clear(&err);
	rc = ferry_qmp_execute(q, "query-status", NULL, &res, &err);
	CHECK(rc == -ECONNRESET, "session: later command on closed monitor -> -ECONNRESET \"%s\"",
	      err.msg);

	ferry_qmp_close(q);
	peer_finish(p, "session");
}

static void script_silent(struct peer *p)
{
	peer_drain(p);
}

static void script_banner(struct peer *p)
{
	peer_sendf(p, "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
	peer_drain(p);
}

static void script_banner_nonl(struct peer *p)
{
	peer_sendf(p, "220 mail.example.com ESMTP ready");
	peer_drain(p);
}

static void script_json_not_qmp(struct peer *p)
{
	peer_sendf(p, "{\"hello\": \"world\"}\n");
	peer_drain(p);
}

static void script_no_version(struct peer *p)
{
	peer_sendf(p, "{\"QMP\": {\"capabilities\": []}}\n");
	peer_drain(p);
}

static void script_close_at_once(struct peer *p)
{
	close(p->fd);
	p->fd = -1;
}

static void script_caps_error(struct peer *p)
{
	int64_t id;

	peer_sendf(p, "%s", GREETING);
	id = peer_expect(p, "qmp_capabilities", NULL);
	peer_sendf(p,
		   "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}, \"id\": %" PRId64
		   "}\n",
		   id);
	peer_drain(p);
}

/* ---- what each side's migration settings send (ferry_migrate_set_caps) -- */

/* Expect cmd whose "arguments" dump (sorted keys; "null": none) is want; reply {}. */
static void peer_expect_args(struct peer *p, const char *cmd, const char *want)
{
	json_t *m = NULL;
	int64_t id = peer_expect(p, cmd, &m);
	json_t *args = json_object_get(m, "arguments");
	char *got = args ? json_dumps(args, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
	if (m && strcmp(got ? got : "null", want) != 0)
		peer_fail(p, "%s: arguments %s, want %s", cmd, got ? got : "null", want);
	free(got);
	json_decref(m);
	peer_sendf(p, "{\"return\": {}, \"id\": %" PRId64 "}\n", id);
}

#define CAP(name, on) "{\"capability\":\"" name "\",\"state\":" on "}"
static void script_migrate_caps(struct peer *p)
{
	peer_handshake(p);
	/* The source: multifd, postcopy, its bandwidth. */
	peer_expect_args(p, "migrate-set-capabilities",
			 "{\"capabilities\":[" CAP("events", "true") "," CAP("multifd", "true") ","
			 CAP("postcopy-ram", "true") "," CAP("postcopy-preempt", "true") "]}");
	peer_expect_args(p, "migrate-set-parameters", "{\"max-bandwidth\":5000,\"multifd-channels\":2}");
	/* The source without channels: multifd off, so no earlier setting lingers. */
	peer_expect_args(p, "migrate-set-capabilities",
			 "{\"capabilities\":[" CAP("events", "true") "," CAP("multifd", "false") "]}");
	peer_expect_args(p, "migrate-set-parameters", "{\"max-bandwidth\":7000}");
	/* The destination: multifd only when used, never max-bandwidth... */
	peer_expect_args(p, "migrate-set-capabilities",
			 "{\"capabilities\":[" CAP("events", "true") "," CAP("multifd", "true") "]}");
	peer_expect_args(p, "migrate-set-parameters", "{\"multifd-channels\":3}");
	/* ... and with neither, no migrate-set-parameters at all: the next
	 * command is the test's own. */
	peer_expect_args(p, "migrate-set-capabilities",
			 "{\"capabilities\":[" CAP("events", "true") "," CAP("postcopy-ram", "true") "]}");
	peer_expect_args(p, "query-name", "null");
	peer_drain(p);
}
#undef CAP

static void test_migrate_caps(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	int cfd, rc;
	struct peer *p = peer_start(script_migrate_caps, &cfd);

	if (!p) {
		CHECK(false, "migrate caps: start peer");
		return;
	}
	rc = ferry_qmp_open_fd(cfd, 5000, &q, &err);
	CHECK(rc == 0, "migrate caps: open (rc=%d %s)", rc, err.msg);
	if (rc == 0) {
		const struct ferry_migrate_caps sides[] = {
			{ .channels = 2, .multifd_always = true, .postcopy = true, .preempt = true, .max_bandwidth = 5000 },
			{ .multifd_always = true, .max_bandwidth = 7000 },
			{ .channels = 3 },
			{ .postcopy = true },
		};
		for (size_t i = 0; i < sizeof(sides) / sizeof(sides[0]); i++) {
			rc = ferry_migrate_set_caps(q, &sides[i], &err);
			CHECK(rc == 0, "migrate caps: settings %zu sent (rc=%d %s)", i, rc, err.msg);
		}
		rc = ferry_qmp_execute(q, "query-name", NULL, NULL, &err);
		CHECK(rc == 0, "migrate caps: the next command gets its own reply (rc=%d %s)", rc, err.msg);
		ferry_qmp_close(q);
	}
	peer_finish(p, "migrate caps");
}

/* Open against a peer script and check the result of the handshake. */
static void expect_open_fails(void (*script)(struct peer *), int timeout_ms, int want_rc,
			      const char *want_msg, int64_t max_ms, const char *name)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = (struct ferry_qmp *)1;
	int cfd, rc;
	struct peer *p = peer_start(script, &cfd);
	int64_t t0 = now_ms(), el;

	if (!p) {
		CHECK(false, "%s: start peer", name);
		return;
	}
	rc = ferry_qmp_open_fd(cfd, timeout_ms, &q, &err);
	el = now_ms() - t0;
	CHECK(rc == want_rc && q == NULL && strstr(err.msg, want_msg) && el <= max_ms,
	      "%s -> %s in %" PRId64 " ms \"%s\"", name, strerror(-want_rc), el, err.msg);
	/* open_fd owns cfd and has closed it; the peer sees EOF and exits. */
	peer_finish(p, name);
}

static void script_reply_timeout(struct peer *p)
{
	int64_t id_slow, id_next;

	peer_handshake(p);
	id_slow = peer_expect(p, "query-slow", NULL);
	/* No answer until the client gave up and asked something else; then
	 * the late reply arrives first and must be skipped. */
	id_next = peer_expect(p, "query-next", NULL);
	peer_sendf(p, "{\"return\": {\"which\": \"slow\"}, \"id\": %" PRId64 "}\n", id_slow);
	peer_sendf(p, "{\"return\": {\"which\": \"next\"}, \"id\": %" PRId64 "}\n", id_next);
	peer_drain(p);
}

static void test_reply_timeout(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	json_t *res = NULL;
	int cfd, rc;
	struct peer *p = peer_start(script_reply_timeout, &cfd);
	int64_t t0, el;

	if (!p) {
		CHECK(false, "timeout: start peer");
		return;
	}
	rc = ferry_qmp_open_fd(cfd, 300, &q, &err);
	CHECK(rc == 0, "timeout: handshake (rc=%d %s)", rc, err.msg);
	if (rc == 0) {
		t0 = now_ms();
		rc = ferry_qmp_execute(q, "query-slow", NULL, &res, &err);
		el = now_ms() - t0;
		CHECK(rc == -ETIMEDOUT && res == NULL && el >= 250 && el < 3000,
		      "timeout: silent peer -> -ETIMEDOUT after %" PRId64 " ms \"%s\"", el, err.msg);
		ferry_err_clear(&err);
		rc = ferry_qmp_execute(q, "query-next", NULL, &res, &err);
		CHECK(rc == 0 && res &&
			      strcmp(json_string_value(json_object_get(res, "which")), "next") == 0,
		      "timeout: late reply to the timed-out command is skipped (rc=%d %s)", rc,
		      err.msg);
		json_decref(res);
	}
	ferry_qmp_close(q);
	peer_finish(p, "timeout");
}

static void script_huge(struct peer *p)
{
	static char chunk[1 << 16];
	size_t sent = 0;

	peer_handshake(p);
	peer_expect(p, "query-huge", NULL);
	memset(chunk, 'x', sizeof(chunk));
	peer_sendf(p, "{\"return\": \"");
	/* 17 MiB without a newline; the client gives up and closes, so a
	 * failing send ends the script. */
	while (sent < (size_t)17 * 1024 * 1024) {
		if (peer_send(p, chunk, sizeof(chunk)) < 0)
			return;
		sent += sizeof(chunk);
	}
	peer_drain(p);
}

static void test_huge_stream(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	json_t *res = NULL;
	int cfd, rc;
	struct peer *p = peer_start(script_huge, &cfd);

	if (!p) {
		CHECK(false, "huge: start peer");
		return;
	}
	rc = ferry_qmp_open_fd(cfd, 10000, &q, &err);
	CHECK(rc == 0, "huge: handshake (rc=%d %s)", rc, err.msg);
	if (rc == 0) {
		rc = ferry_qmp_execute(q, "query-huge", NULL, &res, &err);
		CHECK(rc == -EPROTO && strstr(err.msg, "QMP message too large"),
		      "huge: >16 MiB line -> -EPROTO \"%s\"", err.msg);
		ferry_err_clear(&err);
		rc = ferry_qmp_execute(q, "query-status", NULL, &res, &err);
		CHECK(rc == -EPROTO, "huge: connection unusable afterwards -> -EPROTO \"%s\"", err.msg);
	}
	ferry_qmp_close(q);
	peer_finish(p, "huge");
}

#define FLOOD 1100

static void script_flood(struct peer *p)
{
	int64_t id;
	char *big = malloc((size_t)FLOOD * 64 + 64);
	size_t n = 0;

	peer_handshake(p);
	id = peer_expect(p, "query-flood", NULL);
	if (!big) {
		peer_fail(p, "out of memory");
		return;
	}
	for (int i = 0; i < FLOOD; i++)
		n += (size_t)sprintf(big + n, "{\"event\": \"TICK\", \"data\": {\"n\": %d}}\n", i);
	n += (size_t)sprintf(big + n, "{\"return\": {}, \"id\": %" PRId64 "}\n", id);
	if (peer_send(p, big, n) < 0)
		peer_fail(p, "send flood failed");
	free(big);
	peer_drain(p);
}

static void test_event_flood(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	json_t *ev = NULL;
	int cfd, rc, count = 0;
	int64_t first = -1, last = -1;
	struct peer *p = peer_start(script_flood, &cfd);

	if (!p) {
		CHECK(false, "flood: start peer");
		return;
	}
	rc = ferry_qmp_open_fd(cfd, 5000, &q, &err);
	if (rc == 0)
		rc = ferry_qmp_execute(q, "query-flood", NULL, NULL, &err);
	CHECK(rc == 0, "flood: command with %d interleaved events (rc=%d %s)", FLOOD, rc, err.msg);
	while (rc == 0 && ferry_qmp_next_event(q, 0, &ev, &err) == 0 && ev) {
		int64_t nn = json_integer_value(json_object_get(json_object_get(ev, "data"), "n"));
		if (count == 0)
			first = nn;
		last = nn;
		count++;
		json_decref(ev);
	}
	CHECK(count == 1024 && first == FLOOD - 1024 && last == FLOOD - 1,
	      "flood: queue bounded at 1024, oldest dropped (count=%d first=%" PRId64
	      " last=%" PRId64 ")",
	      count, first, last);
	ferry_qmp_close(q);
	peer_finish(p, "flood");
}

static void script_simple(struct peer *p)
{
	int64_t id;

	peer_handshake(p);
	id = peer_expect(p, "query-version", NULL);
	peer_sendf(p, "{\"return\": {\"qemu\": {\"major\": 8}}, \"id\": %" PRId64 "}\n", id);
	peer_drain(p);
}

static void test_connect_path(void)
{
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	char dir[] = "/tmp/ferry-qmp-test-XXXXXX";
	char path[256], longpath[200];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct peer *p;
	json_t *res = NULL;
	int lfd, rc;

	memset(longpath, 'a', sizeof(longpath) - 1);
	longpath[0] = '/';
	longpath[sizeof(longpath) - 1] = '\0';
	rc = ferry_qmp_connect(longpath, 1000, &q, &err);
	CHECK(rc == -ENAMETOOLONG && q == NULL && strstr(err.msg, "too long"),
	      "connect: path too long -> -ENAMETOOLONG \"%.60s...\"", err.msg);

	ferry_err_clear(&err);
	rc = ferry_qmp_connect("/nonexistent/ferry/qmp.sock", 1000, &q, &err);
	CHECK(rc == -ENOENT && strstr(err.msg, "/nonexistent/ferry/qmp.sock"),
	      "connect: missing socket -> -ENOENT \"%s\"", err.msg);

	if (!mkdtemp(dir)) {
		CHECK(false, "connect: mkdtemp");
		return;
	}
	snprintf(path, sizeof(path), "%s/qmp.sock", dir);
	if (strlen(path) >= sizeof(sa.sun_path)) {
		CHECK(false, "connect: temp path fits sun_path");
		rmdir(dir);
		return;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 4) < 0) {
		CHECK(false, "connect: listen on %s", path);
		if (lfd >= 0)
			close(lfd);
		rmdir(dir);
		return;
	}
	p = calloc(1, sizeof(*p));
	if (p) {
		p->fd = -1;
		p->listen_fd = lfd;
		p->script = script_simple;
		if (pthread_create(&p->thread, NULL, peer_main, p) != 0) {
			free(p);
			p = NULL;
		}
	}
	if (p) {
		ferry_err_clear(&err);
		rc = ferry_qmp_connect(path, 5000, &q, &err);
		CHECK(rc == 0 && q, "connect: unix socket path (rc=%d %s)", rc, err.msg);
		if (rc == 0) {
			rc = ferry_qmp_execute(q, "query-version", NULL, &res, &err);
			CHECK(rc == 0 && res, "connect: command over connected socket (rc=%d %s)", rc,
			      err.msg);
			json_decref(res);
		}
		ferry_qmp_close(q);
	}
	peer_finish(p, "connect");
	close(lfd);
	unlink(path);
	rmdir(dir);
}

/* ---- real QEMU ----------------------------------------------------------- */

static bool in_path(const char *prog)
{
	const char *path = getenv("PATH");
	char buf[4096];

	if (!path)
		path = "/usr/local/bin:/usr/bin:/bin";
	while (*path) {
		const char *colon = strchr(path, ':');
		size_t n = colon ? (size_t)(colon - path) : strlen(path);

		if (n > 0 && (size_t)snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, path, prog) <
				     sizeof(buf) &&
		    access(buf, X_OK) == 0)
			return true;
		path += n;
		if (*path == ':')
			path++;
	}
	return false;
}

static void test_real_qemu(void)
{
	const char *qemu = "qemu-system-x86_64";
	char dir[] = "/tmp/ferry-qmp-qemu-XXXXXX";
	char path[256], qmparg[300];
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	const struct ferry_qmp_version *v;
	json_t *res = NULL;
	int64_t t0, el;
	pid_t pid;
	int rc = -1, status, pfd[2];

	if (!in_path(qemu)) {
		printf("SKIP: qemu-system-x86_64 not installed\n");
		return;
	}
	if (!mkdtemp(dir)) {
		CHECK(false, "qemu: mkdtemp");
		return;
	}
	snprintf(path, sizeof(path), "%s/qmp.sock", dir);
	snprintf(qmparg, sizeof(qmparg), "unix:%s,server=on,wait=off", path);
	pid = fork();
	if (pid < 0) {
		CHECK(false, "qemu: fork");
		rmdir(dir);
		return;
	}
	if (pid == 0) {
		int devnull = open("/dev/null", O_RDWR);
		if (devnull >= 0) {
			dup2(devnull, 0);
			dup2(devnull, 1);
		}
		execlp(qemu, qemu, "-nodefaults", "-display", "none", "-machine", "none", "-qmp",
		       qmparg, (char *)NULL);
		_exit(127);
	}

	/* QEMU creates the socket shortly after start; retry until it does. */
	t0 = now_ms();
	for (;;) {
		ferry_err_clear(&err);
		rc = ferry_qmp_connect(path, 5000, &q, &err);
		if (rc == 0 || (rc != -ENOENT && rc != -ECONNREFUSED) || now_ms() - t0 > 15000)
			break;
		if (waitpid(pid, &status, WNOHANG) == pid) {
			pid = -1;
			break;
		}
		sleep_ms(50);
	}
	CHECK(rc == 0 && q, "qemu: connect to real QEMU (rc=%d %s)", rc, err.msg);
	if (rc == 0) {
		v = ferry_qmp_version(q);
		CHECK(v->major >= 7, "qemu: version %d.%d.%d has major >= 7", v->major, v->minor,
		      v->micro);

		rc = ferry_qmp_execute(q, "query-status", NULL, &res, &err);
		CHECK(rc == 0 && json_is_string(json_object_get(res, "status")),
		      "qemu: query-status -> status \"%s\" (rc=%d %s)",
		      res ? json_string_value(json_object_get(res, "status")) : "?", rc, err.msg);
		json_decref(res);

		ferry_err_clear(&err);
		rc = ferry_qmp_execute(q, "ferry-no-such-command", NULL, &res, &err);
		CHECK(rc == -EREMOTEIO && strstr(err.msg, "CommandNotFound"),
		      "qemu: invalid command -> -EREMOTEIO \"%s\"", err.msg);

		ferry_err_clear(&err);
		if (pipe2(pfd, O_CLOEXEC) == 0) {
			rc = ferry_qmp_getfd(q, pfd[1], "ferrytest", &err);
			CHECK(rc == 0, "qemu: getfd with SCM_RIGHTS accepted (rc=%d %s)", rc, err.msg);
			close(pfd[0]);
			close(pfd[1]);
			ferry_err_clear(&err);
			rc = ferry_qmp_executef(q, NULL, &err, "closefd", "{s:s}", "fdname",
						"ferrytest");
			CHECK(rc == 0, "qemu: closefd finds the passed fd (rc=%d %s)", rc, err.msg);
		}

		/* Pipelined: three commands in one write, replies in order. */
		const char *const ok3[] = { "query-status", "query-name", "query-version" };
		json_t *out[3];
		ferry_err_clear(&err);
		rc = ferry_qmp_execute_batch(q, 3, ok3, NULL, out, &err);
		CHECK(rc == 0 && json_is_string(json_object_get(out[0], "status")) && json_is_object(out[1]) &&
			      json_is_object(json_object_get(out[2], "qemu")),
		      "qemu: batch of 3 -> each reply in its slot (rc=%d %s)", rc, err.msg);
		for (int i = 0; rc == 0 && i < 3; i++)
			json_decref(out[i]);
		/* A failing command in the middle: its error, no results, and the
		 * replies after it do not leak into the next command. */
		const char *const bad3[] = { "query-status", "ferry-no-such-command", "query-name" };
		json_t *args3[3] = { NULL, NULL, NULL };
		ferry_err_clear(&err);
		rc = ferry_qmp_execute_batch(q, 3, bad3, args3, out, &err);
		CHECK(rc == -EREMOTEIO && !out[0] && !out[1] && !out[2] &&
			      strstr(err.msg, "qmp ferry-no-such-command: CommandNotFound"),
		      "qemu: batch with a bad command -> -EREMOTEIO \"%s\"", err.msg);
		ferry_err_clear(&err);
		rc = ferry_qmp_execute(q, "query-version", NULL, &res, &err);
		CHECK(rc == 0 && json_is_object(json_object_get(res, "qemu")),
		      "qemu: the command after a failed batch gets its own reply (rc=%d %s)", rc, err.msg);
		json_decref(res);
		ferry_err_clear(&err);
		rc = ferry_qmp_execute_batch(q, FERRY_QMP_BATCH_MAX + 1, ok3, NULL, out, &err);
		CHECK(rc == -EINVAL, "qemu: batch over FERRY_QMP_BATCH_MAX refused (rc=%d)", rc);

		if (pid > 0) {
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			pid = -1;
		}
		ferry_err_clear(&err);
		t0 = now_ms();
		rc = ferry_qmp_execute(q, "query-status", NULL, &res, &err);
		el = now_ms() - t0;
		CHECK(rc == -ECONNRESET && el < 2000,
		      "qemu: command after QEMU was killed -> -ECONNRESET in %" PRId64 " ms \"%s\"",
		      el, err.msg);
		ferry_qmp_close(q);
	}
	if (pid > 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
	}
	unlink(path);
	rmdir(dir);
}

int main(void)
{
	/* SIGPIPE stays at its default (fatal) on purpose: the client must
	 * use MSG_NOSIGNAL, and so do the scripted peers. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	test_parse();
	test_full_session();
	expect_open_fails(script_silent, 300, -ETIMEDOUT, "300 ms", 3000,
			  "greeting: silent peer");
	expect_open_fails(script_banner, 5000, -EPROTO, "not a QEMU monitor", 3000,
			  "greeting: SSH banner");
	expect_open_fails(script_banner_nonl, 5000, -EPROTO, "not a QEMU monitor", 3000,
			  "greeting: banner without newline");
	expect_open_fails(script_json_not_qmp, 5000, -EPROTO, "not a QEMU monitor", 3000,
			  "greeting: JSON without QMP");
	expect_open_fails(script_no_version, 5000, -EPROTO, "not a QEMU monitor", 3000,
			  "greeting: QMP without version");
	expect_open_fails(script_close_at_once, 5000, -ECONNRESET, "QEMU closed the monitor", 3000,
			  "greeting: peer closes");
	expect_open_fails(script_caps_error, 5000, -EREMOTEIO,
			  "qmp qmp_capabilities: CommandNotFound: nope", 3000,
			  "handshake: qmp_capabilities rejected");
	test_migrate_caps();
	test_reply_timeout();
	test_huge_stream();
	test_event_flood();
	test_connect_path();
	test_real_qemu();

	printf("%d checks, %d failed\n", checks, failures);
	return failures ? 1 : 0;
}
