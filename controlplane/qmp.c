/* QMP client: line-oriented JSON over a unix stream socket. See qmp.h. */
#include "qmp.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* QEMU emits one message per line; anything bigger than this is either a
 * runaway peer or not QEMU at all, and buffering it would cost unbounded
 * memory. */
#define QMP_MAX_MSG ((size_t)16 * 1024 * 1024)
#define QMP_BUF_MIN 4096
/* A long migration can emit many events nobody polls; keep the newest. */
#define QMP_EVENT_QUEUE 1024

struct qmp_deadline {
	int64_t at_ms;  /* CLOCK_MONOTONIC ms, or -1 for no limit */
	int timeout_ms; /* the original budget, for error messages */
};

struct ferry_qmp {
	int fd;
	int timeout_ms;
	int64_t next_id;
	/* Nonzero once the stream is unusable (peer gone, or framing lost);
	 * later calls fail fast with this errno instead of reading garbage. */
	int broken;
	struct ferry_qmp_version version;

	char *buf;      /* received bytes not yet consumed */
	size_t len;     /* bytes in buf */
	size_t cap;     /* allocated size of buf */
	size_t scanned; /* prefix of buf known to contain no '\n' */
	size_t line_end; /* bytes (incl. '\n') of the line handed out */

	json_t *events[QMP_EVENT_QUEUE];
	size_t ev_head, ev_count;
};

/* ---- time ---------------------------------------------------------------- */

static int64_t now_ms(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC cannot fail on Linux with a valid pointer. */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct qmp_deadline deadline_in(int timeout_ms)
{
	struct qmp_deadline d = { .at_ms = -1, .timeout_ms = timeout_ms };

	if (timeout_ms >= 0)
		d.at_ms = now_ms() + timeout_ms;
	return d;
}

/* Milliseconds left for poll(): -1 = forever, 0 = expired. */
static int deadline_left(const struct qmp_deadline *d)
{
	int64_t left;

	if (d->at_ms < 0)
		return -1;
	left = d->at_ms - now_ms();
	if (left < 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

/* ---- small helpers ------------------------------------------------------- */

static const char *json_type_name(const json_t *j)
{
	switch (json_typeof(j)) {
	case JSON_OBJECT: return "object";
	case JSON_ARRAY: return "array";
	case JSON_STRING: return "string";
	case JSON_INTEGER: return "integer";
	case JSON_REAL: return "real";
	case JSON_TRUE: return "true";
	case JSON_FALSE: return "false";
	case JSON_NULL: return "null";
	}
	return "unknown";
}

/* Printable, bounded excerpt of peer data for error messages, so a binary
 * banner cannot garble the message. */
static void snippet(char *out, size_t outsz, const char *data, size_t len)
{
	size_t i, n = 0;

	for (i = 0; i < len && n + 4 < outsz; i++) {
		unsigned char c = (unsigned char)data[i];
		if (c == '\r' || c == '\n')
			break;
		out[n++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
	}
	if (i < len && data[i] != '\r' && data[i] != '\n' && n + 3 < outsz) {
		memcpy(out + n, "...", 3);
		n += 3;
	}
	out[n] = '\0';
}

static bool is_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* ---- event queue --------------------------------------------------------- */

/* Takes the reference. On overflow the oldest event is dropped: the newest
 * ones describe the current state, which is what callers act on. */
static void event_push(struct ferry_qmp *q, json_t *ev)
{
	if (q->ev_count == QMP_EVENT_QUEUE) {
		json_decref(q->events[q->ev_head]);
		q->events[q->ev_head] = NULL;
		q->ev_head = (q->ev_head + 1) % QMP_EVENT_QUEUE;
		q->ev_count--;
	}
	q->events[(q->ev_head + q->ev_count) % QMP_EVENT_QUEUE] = ev;
	q->ev_count++;
}

static json_t *event_pop(struct ferry_qmp *q)
{
	json_t *ev;

	if (q->ev_count == 0)
		return NULL;
	ev = q->events[q->ev_head];
	q->events[q->ev_head] = NULL;
	q->ev_head = (q->ev_head + 1) % QMP_EVENT_QUEUE;
	q->ev_count--;
	return ev;
}

/* ---- socket I/O ---------------------------------------------------------- */

static int mark_broken(struct ferry_qmp *q, int code)
{
	if (!q->broken)
		q->broken = code;
	return -code;
}

static int broken_error(const struct ferry_qmp *q, struct ferry_err *err)
{
	if (q->broken == ECONNRESET)
		return ferry_err_set(err, ECONNRESET, "QEMU closed the monitor");
	return ferry_err_set(err, q->broken,
			     "monitor connection unusable after an earlier error (%s)",
			     strerror(q->broken));
}

static int wait_fd(int fd, short events, const struct qmp_deadline *d, struct ferry_err *err)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int rc = poll(&p, 1, deadline_left(d));

		if (rc < 0) {
			if (errno == EINTR)
				continue;
			return ferry_err_set(err, errno, "poll on monitor socket: %s", strerror(errno));
		}
		if (rc == 0)
			return ferry_err_set(err, ETIMEDOUT,
					     "no answer from the monitor within %d ms", d->timeout_ms);
		if (p.revents & POLLNVAL)
			return ferry_err_set(err, EBADF, "monitor socket fd %d is not open", fd);
		/* POLLHUP/POLLERR: let the following recv/send report the cause. */
		return 0;
	}
}

/* One recv() into the buffer, growing it up to the message limit. */
static int fill(struct ferry_qmp *q, const struct qmp_deadline *d, struct ferry_err *err)
{
	if (q->len == q->cap) {
		size_t ncap = q->cap ? q->cap * 2 : QMP_BUF_MIN;
		char *nbuf;

		/* One maximal line plus its '\n' must fit, nothing more is needed. */
		if (ncap > QMP_MAX_MSG + 1)
			ncap = QMP_MAX_MSG + 1;
		nbuf = realloc(q->buf, ncap);
		if (!nbuf)
			return ferry_err_set(err, ENOMEM, "out of memory growing QMP buffer to %zu bytes",
					     ncap);
		q->buf = nbuf;
		q->cap = ncap;
	}
	for (;;) {
		ssize_t n = recv(q->fd, q->buf + q->len, q->cap - q->len, MSG_DONTWAIT);
		int rc;

		if (n > 0) {
			q->len += (size_t)n;
			return 0;
		}
		if (n == 0 || errno == ECONNRESET || errno == EPIPE) {
			mark_broken(q, ECONNRESET);
			return ferry_err_set(err, ECONNRESET, "QEMU closed the monitor");
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return ferry_err_set(err, errno, "recv from monitor: %s", strerror(errno));
		rc = wait_fd(q->fd, POLLIN, d, err);
		if (rc < 0)
			return rc;
	}
}

/* Find the next complete line (without its '\n'). It stays valid until
 * consume_line(). With greeting set, data that cannot start a JSON object is
 * rejected at once rather than waiting for a newline a banner may never send. */
static int read_line(struct ferry_qmp *q, const struct qmp_deadline *d, bool greeting,
		     const char **line, size_t *len, struct ferry_err *err)
{
	for (;;) {
		/* buf is NULL until the first read; memchr(NULL, .., 0) is UB. */
		char *nl = q->len > q->scanned ? memchr(q->buf + q->scanned, '\n', q->len - q->scanned)
					       : NULL;
		int rc;

		if (nl) {
			*line = q->buf;
			*len = (size_t)(nl - q->buf);
			q->line_end = *len + 1;
			return 0;
		}
		q->scanned = q->len;
		if (greeting) {
			size_t i = 0;
			while (i < q->len && is_ws(q->buf[i]))
				i++;
			if (i < q->len && q->buf[i] != '{') {
				char s[80];
				snippet(s, sizeof(s), q->buf + i, q->len - i);
				return ferry_err_set(err, EPROTO, "not a QEMU monitor: peer sent '%s'", s);
			}
		}
		if (q->len > QMP_MAX_MSG) {
			/* Framing is lost: we cannot find where the next message starts. */
			mark_broken(q, EPROTO);
			return ferry_err_set(err, EPROTO, "QMP message too large (over %zu bytes)",
					     QMP_MAX_MSG);
		}
		rc = fill(q, d, err);
		if (rc < 0)
			return rc;
	}
}

static void consume_line(struct ferry_qmp *q)
{
	q->len -= q->line_end;
	memmove(q->buf, q->buf + q->line_end, q->len);
	q->line_end = 0;
	q->scanned = 0;
	/* Give back memory after a rare huge message; failure just keeps it. */
	if (q->cap > 256 * 1024 && q->len <= QMP_BUF_MIN) {
		char *nbuf = realloc(q->buf, QMP_BUF_MIN);
		if (nbuf) {
			q->buf = nbuf;
			q->cap = QMP_BUF_MIN;
		}
	}
}

/* Read and classify the next non-blank message. */
static int read_message(struct ferry_qmp *q, const struct qmp_deadline *d, bool greeting,
			json_t **msg, enum ferry_qmp_msg_kind *kind, int64_t *id,
			struct ferry_err *err)
{
	for (;;) {
		const char *line = NULL;
		size_t len = 0, i = 0;
		int rc = read_line(q, d, greeting, &line, &len, err);

		if (rc < 0)
			return rc;
		while (i < len && is_ws(line[i]))
			i++;
		if (i == len) {
			consume_line(q);
			continue;
		}
		rc = ferry_qmp_parse_message(line, len, msg, kind, id, err);
		consume_line(q);
		return rc;
	}
}

static int send_all(struct ferry_qmp *q, const char *data, size_t len, int pass_fd,
		    const struct qmp_deadline *d, struct ferry_err *err)
{
	size_t off = 0;

	while (off < len) {
		struct iovec iov = { .iov_base = (char *)data + off, .iov_len = len - off };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		union {
			char buf[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} ctl;
		ssize_t n;
		int rc;

		/* The fd must ride on the command's own bytes: QEMU associates
		 * received fds with the message they arrive with. */
		if (pass_fd >= 0 && off == 0) {
			struct cmsghdr *c;

			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = sizeof(ctl.buf);
			c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
		}
		/* MSG_NOSIGNAL: a dead QEMU must give EPIPE, not kill us. */
		n = sendmsg(q->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n >= 0) {
			off += (size_t)n;
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno == EPIPE || errno == ECONNRESET) {
			mark_broken(q, ECONNRESET);
			return ferry_err_set(err, ECONNRESET, "QEMU closed the monitor");
		}
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return ferry_err_set(err, errno, "send to monitor: %s", strerror(errno));
		rc = wait_fd(q->fd, POLLOUT, d, err);
		if (rc < 0) {
			/* Half a command is on the wire; anything sent next would
			 * be glued to it, so the connection cannot be reused. */
			if (off > 0)
				mark_broken(q, -rc);
			return rc;
		}
	}
	return 0;
}

/* ---- parsing ------------------------------------------------------------- */

static int describe_keys(char *out, size_t outsz, json_t *obj)
{
	const char *key;
	json_t *val;
	size_t n = 0;
	int count = 0;

	out[0] = '\0';
	json_object_foreach(obj, key, val) {
		int w;

		if (count == 8) {
			snprintf(out + n, outsz - n, ", ...");
			break;
		}
		w = snprintf(out + n, outsz - n, "%s%.40s", count ? ", " : "", key);
		if (w < 0 || (size_t)w >= outsz - n)
			break;
		n += (size_t)w;
		count++;
	}
	return count;
}

int ferry_qmp_parse_message(const char *line, size_t len, json_t **msg,
			    enum ferry_qmp_msg_kind *kind, int64_t *id, struct ferry_err *err)
{
	json_error_t je;
	json_t *root, *v;
	enum ferry_qmp_msg_kind k;
	int64_t mid = -1;
	int rc;

	if (msg)
		*msg = NULL;
	if (kind)
		*kind = 0;
	if (id)
		*id = -1;
	if (!line)
		return ferry_err_set(err, EINVAL, "QMP message is NULL");
	if (len > QMP_MAX_MSG)
		return ferry_err_set(err, EPROTO, "QMP message too large (%zu bytes, max %zu)", len,
				     QMP_MAX_MSG);

	/* DECODE_ANY so a non-object gets a clear "not an object" error. */
	root = json_loadb(line, len, JSON_DECODE_ANY, &je);
	if (!root) {
		char s[80];
		snippet(s, sizeof(s), line, len);
		return ferry_err_set(err, EPROTO, "malformed JSON in QMP message '%s': %s (column %d)",
				     s, je.text, je.column);
	}
	if (!json_is_object(root)) {
		rc = ferry_err_set(err, EPROTO, "QMP message is not a JSON object (got %s)",
				   json_type_name(root));
		goto fail;
	}

	v = json_object_get(root, "id");
	if (v) {
		if (!json_is_integer(v)) {
			rc = ferry_err_set(err, EPROTO, "id is not an integer (got %s)",
					   json_type_name(v));
			goto fail;
		}
		mid = json_integer_value(v);
	}

	if ((v = json_object_get(root, "QMP"))) {
		if (!json_is_object(v)) {
			rc = ferry_err_set(err, EPROTO, "greeting \"QMP\" is not an object (got %s)",
					   json_type_name(v));
			goto fail;
		}
		k = FERRY_QMP_MSG_GREETING;
	} else if (json_object_get(root, "return")) {
		k = FERRY_QMP_MSG_RETURN;
	} else if ((v = json_object_get(root, "error"))) {
		json_t *cls, *desc;

		if (!json_is_object(v)) {
			rc = ferry_err_set(err, EPROTO, "\"error\" is not an object (got %s)",
					   json_type_name(v));
			goto fail;
		}
		cls = json_object_get(v, "class");
		desc = json_object_get(v, "desc");
		if (!json_is_string(cls)) {
			rc = ferry_err_set(err, EPROTO, "error reply has no string \"class\"");
			goto fail;
		}
		if (!json_is_string(desc)) {
			rc = ferry_err_set(err, EPROTO, "error reply has no string \"desc\"");
			goto fail;
		}
		k = FERRY_QMP_MSG_ERROR;
	} else if ((v = json_object_get(root, "event"))) {
		json_t *ts = json_object_get(root, "timestamp");

		if (!json_is_string(v)) {
			rc = ferry_err_set(err, EPROTO, "\"event\" is not a string (got %s)",
					   json_type_name(v));
			goto fail;
		}
		if (ts && !json_is_object(ts)) {
			rc = ferry_err_set(err, EPROTO, "event \"timestamp\" is not an object (got %s)",
					   json_type_name(ts));
			goto fail;
		}
		k = FERRY_QMP_MSG_EVENT;
	} else {
		char keys[200];

		if (describe_keys(keys, sizeof(keys), root) == 0)
			rc = ferry_err_set(err, EPROTO, "unrecognized QMP message (empty object)");
		else
			rc = ferry_err_set(err, EPROTO, "unrecognized QMP message (keys: %s)", keys);
		goto fail;
	}

	if (kind)
		*kind = k;
	if (id)
		*id = mid;
	if (msg)
		*msg = root;
	else
		json_decref(root);
	return 0;
fail:
	json_decref(root);
	return rc;
}

/* ---- commands ------------------------------------------------------------ */

/* Serialize a request as one line; QMP needs no newline, but it keeps the
 * stream readable in traces. */
static int build_request(const char *command, json_t *args, int64_t id, char **out,
			 size_t *outlen, struct ferry_err *err)
{
	json_t *req = json_object();
	json_t *jcmd = json_string(command);
	json_t *jid = json_integer(id);
	char *text = NULL, *line;
	size_t n;
	int rc = 0;

	if (!req || !jid) {
		rc = ferry_err_set(err, ENOMEM, "out of memory building request");
		goto out;
	}
	if (!jcmd) {
		/* json_string() refuses invalid UTF-8 (or fails on ENOMEM). */
		rc = ferry_err_set(err, EINVAL, "command name is not valid UTF-8");
		goto out;
	}
	if (json_object_set(req, "execute", jcmd) < 0 || json_object_set(req, "id", jid) < 0 ||
	    (args && json_object_set(req, "arguments", args) < 0)) {
		rc = ferry_err_set(err, ENOMEM, "out of memory building request");
		goto out;
	}
	/* COMPACT without INDENT never emits a raw newline (strings are escaped). */
	text = json_dumps(req, JSON_COMPACT);
	if (!text) {
		rc = ferry_err_set(err, ENOMEM, "cannot serialize request");
		goto out;
	}
	n = strlen(text);
	line = malloc(n + 2);
	if (!line) {
		rc = ferry_err_set(err, ENOMEM, "out of memory building request");
		goto out;
	}
	memcpy(line, text, n);
	line[n] = '\n';
	line[n + 1] = '\0';
	*out = line;
	*outlen = n + 1;
out:
	free(text);
	json_decref(req);
	json_decref(jcmd);
	json_decref(jid);
	return rc;
}

/* n commands (already checked) in one write, pass_fd riding on the first,
 * their replies read in order: the one exchange under both ferry_qmp_execute
 * and ferry_qmp_execute_batch. Errors are reported as "qmp COMMAND: ..."
 * through a local err so the detail can be embedded regardless of what the
 * caller passed; on error every results[i] is NULL. */
static int exchange(struct ferry_qmp *q, size_t n, const char *const commands[], json_t *const args[], int pass_fd,
		    json_t *results[], struct ferry_err *err)
{
	struct ferry_err e = { 0 };
	char *all = NULL;
	size_t len = 0, replied = 0, failed = n; /* failed: index of the first error reply */
	int rc = 0;

	for (size_t i = 0; i < n; i++)
		results[i] = NULL;
	if (q->broken) {
		broken_error(q, &e);
		return ferry_err_set(err, q->broken, "qmp %s: %s", commands[0], e.msg);
	}
	int64_t first = q->next_id;
	q->next_id += (int64_t)n;
	for (size_t i = 0; i < n && rc == 0; i++) {
		char *req = NULL, *grown;
		size_t reqlen = 0;
		if ((rc = build_request(commands[i], args ? args[i] : NULL, first + (int64_t)i, &req, &reqlen, &e)) < 0)
			break;
		if (!(grown = realloc(all, len + reqlen)))
			rc = ferry_err_set(&e, ENOMEM, "out of memory building requests");
		else {
			memcpy(grown + len, req, reqlen);
			all = grown;
			len += reqlen;
		}
		free(req);
	}
	struct qmp_deadline d = deadline_in(q->timeout_ms);
	if (rc == 0)
		rc = send_all(q, all, len, pass_fd, &d, &e);
	free(all);
	/* Every reply is read, errors included, so none is left for a later
	 * command to skip; the replies come in the order of the commands. */
	while (rc == 0 && replied < n) {
		enum ferry_qmp_msg_kind kind;
		int64_t rid;
		json_t *msg;

		if ((rc = read_message(q, &d, false, &msg, &kind, &rid, &e)) < 0)
			break;
		if (kind == FERRY_QMP_MSG_EVENT) {
			event_push(q, msg);
			continue;
		}
		/* An error without an id answers the oldest command still open:
		 * QEMU cannot echo the id of a request it failed to parse. */
		size_t i = rid >= first && rid < first + (int64_t)n ? (size_t)(rid - first)
			   : kind == FERRY_QMP_MSG_ERROR && rid == -1 ? replied : n;
		if (i < n && kind == FERRY_QMP_MSG_RETURN) {
			results[i] = json_incref(json_object_get(msg, "return"));
			replied++;
		} else if (i < n && kind == FERRY_QMP_MSG_ERROR) {
			if (i < failed) {
				json_t *eo = json_object_get(msg, "error");
				failed = i;
				ferry_err_set(&e, EREMOTEIO, "%s: %s", json_string_value(json_object_get(eo, "class")),
					      json_string_value(json_object_get(eo, "desc")));
			}
			replied++;
		}
		json_decref(msg); /* stale replies (e.g. to a command that timed out) and stray greetings are not ours */
	}
	if (rc == 0 && failed < n)
		rc = -EREMOTEIO;
	if (rc < 0) {
		for (size_t i = 0; i < n; i++) {
			json_decref(results[i]);
			results[i] = NULL;
		}
		return ferry_err_set(err, rc, "qmp %s: %s", commands[failed < n ? failed : replied < n ? replied : 0], e.msg);
	}
	return 0;
}

/* One command: a batch of one, its checks worded for the single command. */
static int do_execute(struct ferry_qmp *q, const char *command, json_t *args, int pass_fd,
		      json_t **result, struct ferry_err *err)
{
	if (result)
		*result = NULL;
	if (!q)
		return ferry_err_set(err, EINVAL, "qmp: no monitor connection");
	if (!command || !*command)
		return ferry_err_set(err, EINVAL, "qmp: empty command name");
	if (args && !json_is_object(args))
		return ferry_err_set(err, EINVAL, "qmp %s: arguments must be a JSON object, not %s",
				     command, json_type_name(args));
	const char *const cmds[1] = { command };
	json_t *const cargs[1] = { args };
	json_t *res = NULL;
	int rc = exchange(q, 1, cmds, cargs, pass_fd, &res, err);
	if (rc == 0 && result)
		*result = res;
	else
		json_decref(res);
	return rc;
}

int ferry_qmp_execute(struct ferry_qmp *qmp, const char *command, json_t *args,
		      json_t **result, struct ferry_err *err)
{
	return do_execute(qmp, command, args, -1, result, err);
}

int ferry_qmp_execute_batch(struct ferry_qmp *q, size_t n, const char *const commands[], json_t *const args[],
			    json_t *results[], struct ferry_err *err)
{
	if (!q || n == 0 || n > FERRY_QMP_BATCH_MAX || !commands || !results)
		return ferry_err_set(err, EINVAL, "qmp batch: no monitor, or not 1 to %d commands", FERRY_QMP_BATCH_MAX);
	for (size_t i = 0; i < n; i++) {
		results[i] = NULL;
		if (!commands[i] || !*commands[i])
			return ferry_err_set(err, EINVAL, "qmp batch: empty command name");
		if (args && args[i] && !json_is_object(args[i]))
			return ferry_err_set(err, EINVAL, "qmp %s: arguments must be a JSON object, not %s", commands[i],
					     json_type_name(args[i]));
	}
	return exchange(q, n, commands, args, -1, results, err);
}

int ferry_qmp_executef(struct ferry_qmp *qmp, json_t **result, struct ferry_err *err,
		       const char *command, const char *args_fmt, ...)
{
	json_t *args = NULL;
	int rc;

	if (result)
		*result = NULL;
	if (args_fmt && *args_fmt) {
		json_error_t je;
		va_list ap;

		va_start(ap, args_fmt);
		args = json_vpack_ex(&je, 0, args_fmt, ap);
		va_end(ap);
		if (!args)
			return ferry_err_set(err, EINVAL, "qmp %s: cannot build arguments: %s",
					     command ? command : "(null)", je.text);
	}
	rc = do_execute(qmp, command, args, -1, result, err);
	json_decref(args);
	return rc;
}

int ferry_qmp_getfd(struct ferry_qmp *qmp, int fd, const char *fdname, struct ferry_err *err)
{
	json_t *args;
	int rc;

	if (fd < 0)
		return ferry_err_set(err, EBADF, "qmp getfd: invalid fd %d", fd);
	if (!fdname || !*fdname)
		return ferry_err_set(err, EINVAL, "qmp getfd: empty fdname");
	args = json_pack("{s:s}", "fdname", fdname);
	if (!args)
		return ferry_err_set(err, EINVAL, "qmp getfd: cannot encode fdname '%s'", fdname);
	rc = do_execute(qmp, "getfd", args, fd, NULL, err);
	json_decref(args);
	return rc;
}

int ferry_qmp_next_event(struct ferry_qmp *qmp, int wait_ms, json_t **event, struct ferry_err *err)
{
	struct ferry_err e = { 0 };
	struct qmp_deadline d;

	if (!event)
		return ferry_err_set(err, EINVAL, "qmp next_event: event pointer is NULL");
	*event = NULL;
	if (!qmp)
		return ferry_err_set(err, EINVAL, "qmp next_event: no monitor connection");
	if ((*event = event_pop(qmp)))
		return 0;
	if (qmp->broken) {
		broken_error(qmp, &e);
		return ferry_err_set(err, qmp->broken, "qmp next_event: %s", e.msg);
	}
	/* wait_ms <= 0 still drains what is already readable, without blocking,
	 * so a caller polling with 0 does see events. */
	d = deadline_in(wait_ms > 0 ? wait_ms : 0);
	for (;;) {
		enum ferry_qmp_msg_kind kind;
		json_t *msg;
		int rc = read_message(qmp, &d, false, &msg, &kind, NULL, &e);

		if (rc == -ETIMEDOUT)
			return 0;
		if (rc < 0)
			return ferry_err_set(err, rc, "qmp next_event: %s", e.msg);
		if (kind == FERRY_QMP_MSG_EVENT) {
			*event = msg;
			return 0;
		}
		json_decref(msg); /* stale reply, nobody waits for it */
	}
}

void ferry_qmp_wait_event(struct ferry_qmp *qmp, int wait_ms)
{
	json_t *ev = NULL;
	struct ferry_err e = { 0 };
	if (ferry_qmp_next_event(qmp, wait_ms, &ev, &e) == 0) {
		json_decref(ev);
		return;
	}
	struct timespec ts = { wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/* ---- connection ---------------------------------------------------------- */

static int get_version_part(json_t *qemu, const char *name, int *out)
{
	json_t *v = json_object_get(qemu, name);

	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT_MAX)
		return -1;
	*out = (int)json_integer_value(v);
	return 0;
}

static int handshake(struct ferry_qmp *q, struct ferry_err *err)
{
	struct ferry_err e = { 0 };
	struct qmp_deadline d = deadline_in(q->timeout_ms);
	enum ferry_qmp_msg_kind kind;
	json_t *msg, *qemu;
	int rc;

	rc = read_message(q, &d, true, &msg, &kind, NULL, &e);
	if (rc == -EPROTO)
		return ferry_err_set(err, EPROTO, "%s%s",
				     strncmp(e.msg, "not a QEMU monitor", 18) ? "not a QEMU monitor: " : "",
				     e.msg);
	if (rc < 0)
		return ferry_err_set(err, rc, "waiting for QMP greeting: %s", e.msg);
	if (kind != FERRY_QMP_MSG_GREETING) {
		json_decref(msg);
		return ferry_err_set(err, EPROTO,
				     "not a QEMU monitor: first message is a %s, not a QMP greeting",
				     kind == FERRY_QMP_MSG_EVENT ? "event" : "command reply");
	}
	qemu = json_object_get(json_object_get(json_object_get(msg, "QMP"), "version"), "qemu");
	if (get_version_part(qemu, "major", &q->version.major) < 0 ||
	    get_version_part(qemu, "minor", &q->version.minor) < 0 ||
	    get_version_part(qemu, "micro", &q->version.micro) < 0) {
		json_decref(msg);
		return ferry_err_set(err, EPROTO,
				     "not a QEMU monitor: greeting lacks QMP.version.qemu major/minor/micro");
	}
	json_decref(msg);
	return do_execute(q, "qmp_capabilities", NULL, -1, NULL, err);
}

int ferry_qmp_open_fd(int fd, int timeout_ms, struct ferry_qmp **out, struct ferry_err *err)
{
	struct ferry_qmp *q;
	int rc;

	if (out)
		*out = NULL;
	if (fd < 0)
		return ferry_err_set(err, EBADF, "qmp: invalid monitor fd %d", fd);
	if (!out) {
		close(fd);
		return ferry_err_set(err, EINVAL, "qmp: output pointer is NULL");
	}
	q = calloc(1, sizeof(*q));
	if (!q) {
		close(fd);
		return ferry_err_set(err, ENOMEM, "qmp: out of memory");
	}
	q->fd = fd;
	q->timeout_ms = timeout_ms;
	q->next_id = 1;
	rc = handshake(q, err);
	if (rc < 0) {
		ferry_qmp_close(q);
		return rc;
	}
	*out = q;
	return 0;
}

/* Unix connect never really waits, except when the listen backlog is full
 * (EAGAIN on a non-blocking socket): retry briefly until the deadline. */
static int connect_unix(int fd, const struct sockaddr_un *sa, const char *path,
			const struct qmp_deadline *d, struct ferry_err *err)
{
	for (;;) {
		struct timespec pause = { .tv_sec = 0, .tv_nsec = 10 * 1000000 };
		int rc;

		if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0)
			return 0;
		if (errno == EISCONN)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EINPROGRESS) {
			int soerr = 0;
			socklen_t sl = sizeof(soerr);

			rc = wait_fd(fd, POLLOUT, d, err);
			if (rc < 0)
				return rc;
			if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
				return ferry_err_set(err, errno, "connect %s: getsockopt: %s", path,
						     strerror(errno));
			if (soerr)
				return ferry_err_set(err, soerr, "connect %s: %s", path,
						     strerror(soerr));
			return 0;
		}
		if (errno != EAGAIN)
			return ferry_err_set(err, errno, "connect %s: %s", path, strerror(errno));
		if (deadline_left(d) == 0)
			return ferry_err_set(err, ETIMEDOUT,
					     "connect %s: monitor backlog full for %d ms", path,
					     d->timeout_ms);
		nanosleep(&pause, NULL);
	}
}

int ferry_qmp_connect(const char *socket_path, int timeout_ms, struct ferry_qmp **out,
		      struct ferry_err *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct qmp_deadline d = deadline_in(timeout_ms);
	struct ferry_err e = { 0 };
	size_t plen;
	int fd, rc;

	if (out)
		*out = NULL;
	if (!out)
		return ferry_err_set(err, EINVAL, "qmp: output pointer is NULL");
	if (!socket_path || !*socket_path)
		return ferry_err_set(err, EINVAL, "qmp: empty monitor socket path");
	plen = strlen(socket_path);
	if (plen >= sizeof(sa.sun_path))
		return ferry_err_set(err, ENAMETOOLONG,
				     "QMP socket path too long (%zu bytes, max %zu): %s", plen,
				     sizeof(sa.sun_path) - 1, socket_path);
	memcpy(sa.sun_path, socket_path, plen + 1);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return ferry_err_set(err, errno, "qmp: socket: %s", strerror(errno));
	rc = connect_unix(fd, &sa, socket_path, &d, &e);
	if (rc < 0) {
		close(fd);
		return ferry_err_set(err, rc, "%s", e.msg);
	}
	rc = ferry_qmp_open_fd(fd, timeout_ms, out, &e);
	if (rc < 0)
		return ferry_err_set(err, rc, "QMP socket %s: %s", socket_path, e.msg);
	return 0;
}

void ferry_qmp_close(struct ferry_qmp *qmp)
{
	json_t *ev;

	if (!qmp)
		return;
	if (qmp->fd >= 0)
		close(qmp->fd);
	while ((ev = event_pop(qmp)))
		json_decref(ev);
	free(qmp->buf);
	free(qmp);
}

const struct ferry_qmp_version *ferry_qmp_version(const struct ferry_qmp *qmp)
{
	return qmp ? &qmp->version : NULL;
}

int ferry_qmp_peer_pid(const struct ferry_qmp *qmp, int *pid, struct ferry_err *err)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	if (getsockopt(qmp->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
		return ferry_err_set(err, errno, "SO_PEERCRED on the QEMU monitor: %s", strerror(errno));
	if (cred.pid <= 0)
		return ferry_err_set(err, ESRCH, "the QEMU monitor's peer has no process id");
	*pid = cred.pid;
	return 0;
}
