#include "migrate.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "jsonline.h"
#include "qmp.h"

#define QMP_TIMEOUT_MS   10000
#define PEER_TIMEOUT_MS  15000
#define POLL_INTERVAL_MS 50
#define FINISH_TIMEOUT_MS 120000
#define SWITCHOVER_TIMEOUT_S 120
#define FERRY_MIGRATE_MAX_BANDWIDTH (100ll * 1000 * 1000 * 1000) /* bytes/s: effectively unlimited */

struct ferry_migration {
	struct ferry_dp *dp;
	uint32_t id;
	char *src_qmp, *dst_qmp, *peer, *run_dir;
	unsigned channels, lanes;
	int stall_timeout_s;
	bool no_handoff;

	pthread_t thread;
	pthread_mutex_t lock;
	bool cancel;
	bool done;
	struct ferry_migration_progress prog;
	struct timespec t0;
};

const char *ferry_migration_state_name(enum ferry_migration_state s)
{
	switch (s) {
	case FERRY_MIG_SETUP: return "setup";
	case FERRY_MIG_ACTIVE: return "active";
	case FERRY_MIG_COMPLETED: return "completed";
	case FERRY_MIG_FAILED: return "failed";
	case FERRY_MIG_CANCELLED: return "cancelled";
	}
	return "unknown";
}

static double since(const struct timespec *t0)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static bool cancelled(struct ferry_migration *m)
{
	pthread_mutex_lock(&m->lock);
	bool c = m->cancel;
	pthread_mutex_unlock(&m->lock);
	return c;
}

static void set_state(struct ferry_migration *m, enum ferry_migration_state st)
{
	pthread_mutex_lock(&m->lock);
	m->prog.state = st;
	pthread_mutex_unlock(&m->lock);
}

static uint64_t ju(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	return json_is_integer(v) && json_integer_value(v) > 0 ? (uint64_t)json_integer_value(v) : 0;
}

static double jd(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	return json_is_number(v) ? json_number_value(v) : 0.0;
}

/* Ask the destination daemon to prepare its QEMU and a session. */
static int peer_prepare(struct ferry_migration *m, struct ferry_jl *jl, struct ferry_session_params *sp,
			char *endpoint, size_t eplen, struct ferry_err *err)
{
	json_t *req = json_pack("{s:s, s:s, s:i, s:i, s:b, s:I}", "cmd", "migrate-prepare", "qmp", m->dst_qmp,
				"channels", (int)m->channels, "lanes", (int)sp->lanes, "handoff", sp->handoff, "window",
				(json_int_t)ferry_dp_window(m->dp));
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	json_t *reply = NULL;
	int rc = ferry_jl_call(jl, req, PEER_TIMEOUT_MS, &reply, err);
	json_decref(req);
	if (rc)
		return ferry_err_prefix(err, "destination daemon refused to prepare");
	rc = ferry_session_reply_parse(reply, ferry_dp_window(m->dp), sp, endpoint, eplen, err);
	json_decref(reply);
	return rc;
}

uint64_t ferry_agree_window(json_t *offer, uint64_t mine)
{
	if (json_is_integer(offer) && json_integer_value(offer) >= 65536 && (uint64_t)json_integer_value(offer) < mine)
		return (uint64_t)json_integer_value(offer);
	return mine;
}

int ferry_session_reply_parse(json_t *reply, uint64_t my_window, struct ferry_session_params *sp, char *endpoint,
			      size_t eplen, struct ferry_err *err)
{
	json_t *sid = json_object_get(reply, "session");
	const char *token = json_string_value(json_object_get(reply, "token"));
	const char *ep = json_string_value(json_object_get(reply, "endpoint"));
	if (!json_is_integer(sid) || json_integer_value(sid) < 0 || json_integer_value(sid) > UINT32_MAX ||
	    !token || strlen(token) != 2 * FERRY_TOKEN_LEN || !ep || strlen(ep) >= eplen)
		return ferry_err_set(err, EPROTO, "the peer's session reply lacks a valid session, token or endpoint");
	for (unsigned i = 0; i < FERRY_TOKEN_LEN; i++) {
		unsigned v;
		if (sscanf(token + 2 * i, "%2x", &v) != 1)
			return ferry_err_set(err, EPROTO, "the peer sent a malformed session token");
		sp->token[i] = (uint8_t)v;
	}
	sp->id = (uint32_t)json_integer_value(sid);
	sp->window = ferry_agree_window(json_object_get(reply, "window"), my_window);
	strcpy(endpoint, ep);
	return 0;
}

static int peer_simple(struct ferry_jl *jl, const char *cmd, uint32_t session, int timeout_ms, json_t **reply,
		       struct ferry_err *err)
{
	json_t *req = json_pack("{s:s, s:I}", "cmd", cmd, "session", (json_int_t)session);
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = ferry_jl_call(jl, req, timeout_ms, reply, err);
	json_decref(req);
	return rc;
}

/* An older or differently built peer may lack handoff: then ferry relays. */
static bool peer_can_handoff(struct ferry_jl *jl)
{
	struct ferry_err e = { 0 };
	json_t *req = json_pack("{s:s}", "cmd", "hello"), *rep = NULL;
	bool can = req && ferry_jl_call(jl, req, PEER_TIMEOUT_MS, &rep, &e) == 0 &&
		   json_is_true(json_object_get(rep, "handoff"));
	json_decref(req);
	json_decref(rep);
	return can;
}

/* The control connection to the destination daemon closed: nobody will
 * finish the destination side, so the migration must not go on. */
static bool peer_gone(struct ferry_jl *jl)
{
	struct pollfd p = { .fd = jl->fd, .events = POLLIN };
	char c;
	if (poll(&p, 1, 0) != 1)
		return false;
	return recv(jl->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0 || (p.revents & (POLLHUP | POLLERR));
}

static int set_source_caps(struct ferry_qmp *q, unsigned channels, struct ferry_err *err)
{
	json_t *caps = NULL;
	int rc = ferry_qmp_execute(q, "query-migrate-capabilities", NULL, &caps, err);
	if (rc)
		return rc;
	bool has_multifd = false;
	size_t i;
	json_t *c;
	json_array_foreach(caps, i, c) {
		const char *name = json_string_value(json_object_get(c, "capability"));
		if (name && strcmp(name, "multifd") == 0)
			has_multifd = true;
	}
	json_decref(caps);
	if (channels > 0 && !has_multifd)
		return ferry_err_set(err, ENOTSUP, "the source QEMU has no multifd capability");
	if (has_multifd) {
		rc = ferry_qmp_executef(q, NULL, err, "migrate-set-capabilities", "{s:[{s:s, s:b}]}", "capabilities",
					"capability", "multifd", "state", channels > 0);
		if (rc)
			return rc;
	}
	if (channels > 0)
		rc = ferry_qmp_executef(q, NULL, err, "migrate-set-parameters", "{s:i}", "multifd-channels",
					(int)channels);
	/* QEMU 7.2 throttles migration to 32 MiB/s unless told otherwise; the
	 * transport, not a default, should set the pace. */
	if (rc == 0)
		rc = ferry_qmp_executef(q, NULL, err, "migrate-set-parameters", "{s:I}", "max-bandwidth",
					(json_int_t)FERRY_MIGRATE_MAX_BANDWIDTH);
	return rc;
}

static void update_progress(struct ferry_migration *m, json_t *info, uint64_t *last_bytes, double *last_t)
{
	json_t *ram = json_object_get(info, "ram");
	const char *status = json_string_value(json_object_get(info, "status"));
	double now = since(&m->t0);
	pthread_mutex_lock(&m->lock);
	snprintf(m->prog.qemu_status, sizeof(m->prog.qemu_status), "%s", status ? status : "?");
	m->prog.elapsed_s = now;
	if (ram) {
		m->prog.ram_total = ju(ram, "total");
		m->prog.ram_transferred = ju(ram, "transferred");
		m->prog.ram_remaining = ju(ram, "remaining");
		m->prog.dirty_rate_bps = jd(ram, "dirty-pages-rate") * (double)(ju(ram, "page-size") ? ju(ram, "page-size") : 4096);
		if (now > *last_t && m->prog.ram_transferred >= *last_bytes) {
			m->prog.throughput_gbs = (double)(m->prog.ram_transferred - *last_bytes) / (now - *last_t) / 1e9;
			*last_bytes = m->prog.ram_transferred;
			*last_t = now;
		}
	}
	if (status && strcmp(status, "completed") == 0) {
		m->prog.setup_s = (double)ju(info, "setup-time") / 1000.0;
		m->prog.total_s = (double)ju(info, "total-time") / 1000.0;
		m->prog.downtime_ms = (double)ju(info, "downtime");
		if (m->prog.total_s > m->prog.setup_s && m->prog.ram_transferred)
			m->prog.throughput_gbs = (double)m->prog.ram_transferred / (m->prog.total_s - m->prog.setup_s) / 1e9;
	}
	pthread_mutex_unlock(&m->lock);
}

/* After a failure the source VM must run again if it ran before. */
static void recover_source(struct ferry_migration *m, struct ferry_qmp *q, bool was_running)
{
	struct ferry_err e = { 0 };
	json_t *st = NULL;
	const char *status = "unknown (monitor unreachable)";
	char buf[32];
	if (q && ferry_qmp_execute(q, "query-status", NULL, &st, &e) == 0) {
		const char *s = json_string_value(json_object_get(st, "status"));
		if (was_running && s && strcmp(s, "running") != 0) {
			ferry_err_clear(&e);
			if (ferry_qmp_execute(q, "cont", NULL, NULL, &e) == 0) {
				json_decref(st);
				st = NULL;
				if (ferry_qmp_execute(q, "query-status", NULL, &st, &e) == 0)
					s = json_string_value(json_object_get(st, "status"));
			}
		}
		snprintf(buf, sizeof(buf), "%s", s ? s : "?");
		status = buf;
	}
	pthread_mutex_lock(&m->lock);
	snprintf(m->prog.src_vm_status, sizeof(m->prog.src_vm_status), "%s", status);
	pthread_mutex_unlock(&m->lock);
	json_decref(st);
}

/* The source finished sending but the destination's fate is unknown: it may
 * be running the VM. Resuming the source could run the VM twice, so leave it
 * paused and say so. */
static void report_unknown_outcome(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_err *err)
{
	struct ferry_err e = { 0 };
	json_t *st = NULL;
	char status[32] = "unknown";
	if (q && ferry_qmp_execute(q, "query-status", NULL, &st, &e) == 0)
		snprintf(status, sizeof(status), "%s", json_string_value(json_object_get(st, "status")) ?
			 json_string_value(json_object_get(st, "status")) : "?");
	json_decref(st);
	char why[FERRY_ERR_MSG_MAX];
	snprintf(why, sizeof(why), "%s", err->msg);
	ferry_err_clear(err);
	ferry_err_set(err, EIO, "the source QEMU completed but the destination's outcome is unknown (%.300s); "
		      "the source VM was left %s and NOT resumed because the destination may be running it: "
		      "check the destination, and resume the source (QMP 'cont') only if the destination VM is not running",
		      why, status);
	pthread_mutex_lock(&m->lock);
	snprintf(m->prog.src_vm_status, sizeof(m->prog.src_vm_status), "%s", status);
	pthread_mutex_unlock(&m->lock);
}

static void *migration_main(void *arg)
{
	struct ferry_migration *m = arg;
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	struct ferry_jl jl = { .fd = -1 };
	struct ferry_session *sess = NULL;
	bool was_running = false, prepared = false;
	/* Once the source QEMU completed, the destination may already run the
	 * VM: from then on the source must never be resumed by us. */
	bool src_completed = false;
	enum ferry_migration_state final = FERRY_MIG_FAILED;
	char endpoint[FERRY_DP_ENDPOINT_MAX];
	char path[512];
	unsigned streams = 1 + m->channels;
	struct ferry_session_params sp = {
		.lanes = m->lanes ? m->lanes : streams,
		.max_streams = streams,
		.timeout_ms = 10000,
	};
	int rc;

	rc = ferry_qmp_connect(m->src_qmp, QMP_TIMEOUT_MS, &q, &err);
	if (rc) {
		ferry_err_prefix(&err, "source QEMU monitor %s", m->src_qmp);
		goto out;
	}
	json_t *st = NULL;
	if ((rc = ferry_qmp_execute(q, "query-status", NULL, &st, &err)))
		goto out;
	const char *vmstat = json_string_value(json_object_get(st, "status"));
	was_running = vmstat && strcmp(vmstat, "running") == 0;
	bool startable = vmstat && (strcmp(vmstat, "running") == 0 || strcmp(vmstat, "paused") == 0 ||
				    strcmp(vmstat, "prelaunch") == 0);
	if (!startable) {
		rc = ferry_err_set(&err, EINVAL, "the source VM is '%s'; it must be running or paused to migrate",
				   vmstat ? vmstat : "?");
		json_decref(st);
		goto out;
	}
	json_decref(st);
	if ((rc = set_source_caps(q, m->channels, &err)))
		goto out;
	if (cancelled(m))
		goto cancel;

	rc = ferry_jl_connect_tcp(m->peer, PEER_TIMEOUT_MS, &jl, &err);
	if (rc) {
		ferry_err_prefix(&err, "destination daemon");
		goto out;
	}
	sp.handoff = m->channels == 0 && !m->no_handoff && ferry_dp_can_handoff(m->dp) && peer_can_handoff(&jl);
	if (sp.handoff)
		sp.lanes = 1;
	pthread_mutex_lock(&m->lock);
	if (sp.handoff)
		snprintf(m->prog.transport, sizeof(m->prog.transport), "%s handoff", ferry_dp_driver_name(m->dp));
	else
		snprintf(m->prog.transport, sizeof(m->prog.transport), "%s relay, %u lane%s", ferry_dp_driver_name(m->dp),
			 sp.lanes, sp.lanes == 1 ? "" : "s");
	pthread_mutex_unlock(&m->lock);
	if ((rc = peer_prepare(m, &jl, &sp, endpoint, sizeof(endpoint), &err)))
		goto out;
	prepared = true;
	if (cancelled(m))
		goto cancel;

	char uri[600];
	if (sp.handoff) {
		rc = ferry_session_create_src(m->dp, &sp, endpoint, &sess, &err);
		if (rc) {
			ferry_err_prefix(&err, "cannot open the data connection");
			goto out;
		}
		int fd = ferry_session_take_fd(sess, 10000, &err);
		if (fd < 0) {
			rc = fd;
			goto out;
		}
		/* The destination QEMU takes its end first, then ours starts writing. */
		rc = peer_simple(&jl, "migrate-handoff", sp.id, PEER_TIMEOUT_MS, NULL, &err);
		if (rc == 0)
			rc = ferry_qmp_getfd(q, fd, "ferry-migration", &err);
		close(fd);
		if (rc) {
			ferry_err_prefix(&err, "handing the connection to QEMU");
			goto out;
		}
		snprintf(uri, sizeof(uri), "fd:ferry-migration");
	} else {
		snprintf(path, sizeof(path), "%s/mig-%u-src.sock", m->run_dir, m->id);
		sp.unix_path = path;
		rc = ferry_session_create_src(m->dp, &sp, endpoint, &sess, &err);
		if (rc) {
			ferry_err_prefix(&err, "cannot open the data lanes");
			goto out;
		}
		snprintf(uri, sizeof(uri), "unix:%s", path);
	}
	if ((rc = ferry_qmp_executef(q, NULL, &err, "migrate", "{s:s}", "uri", uri)))
		goto out;
	set_state(m, FERRY_MIG_ACTIVE);

	uint64_t last_bytes = 0, stall_bytes = 0;
	double last_t = 0, stall_t = since(&m->t0);
	double switch_t = -1;
	for (;;) {
		json_t *info = NULL;
		if ((rc = ferry_qmp_execute(q, "query-migrate", NULL, &info, &err)))
			goto out;
		update_progress(m, info, &last_bytes, &last_t);
		const char *status = json_string_value(json_object_get(info, "status"));
		if (status && strcmp(status, "completed") == 0) {
			/* QEMU 7.2 says completed a moment before it fills in its
			 * timings: read them again until they are there. */
			for (int i = 0; i < 25 && ju(info, "total-time") == 0; i++) {
				json_t *again = NULL;
				struct timespec ts = { 0, 20 * 1000000L };
				nanosleep(&ts, NULL);
				if (ferry_qmp_execute(q, "query-migrate", NULL, &again, &err))
					break;
				json_decref(info);
				info = again;
			}
			ferry_err_clear(&err);
			update_progress(m, info, &last_bytes, &last_t);
			json_decref(info);
			src_completed = true;
			break;
		}
		if (status && (strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0)) {
			const char *desc = json_string_value(json_object_get(info, "error-desc"));
			struct ferry_session_stats ss;
			ferry_session_stats(sess, &ss);
			rc = ferry_err_set(&err, EIO, "source QEMU reports migration %s: %s%s%s", status,
					   desc ? desc : "no reason given",
					   ss.error[0] ? "; transport: " : "", ss.error);
			json_decref(info);
			goto out;
		}
		/* In the final stop-and-copy the destination may already hold the
		 * whole stream: cancelling now could leave the VM running on both
		 * hosts. Only QEMU's own verdict counts until it is over. */
		bool switching = status && (strcmp(status, "device") == 0 || strcmp(status, "pre-switchover") == 0);
		json_decref(info);
		if (switching) {
			if (switch_t < 0)
				switch_t = since(&m->t0);
			if (since(&m->t0) - switch_t > SWITCHOVER_TIMEOUT_S) {
				src_completed = true; /* outcome unknown: never resume */
				rc = ferry_err_set(&err, ETIMEDOUT, "the source QEMU stayed in its final phase for %d s",
						   SWITCHOVER_TIMEOUT_S);
				goto out;
			}
			struct timespec ts = { 0, 10 * 1000000L };
			nanosleep(&ts, NULL);
			continue;
		}
		if (cancelled(m)) {
			struct ferry_err e2 = { 0 };
			(void)ferry_qmp_execute(q, "migrate_cancel", NULL, NULL, &e2);
			ferry_session_abort(sess, "migration cancelled by the user");
			goto cancel;
		}
		struct ferry_session_stats ss;
		ferry_session_stats(sess, &ss);
		if (ss.state == FERRY_SESSION_FAILED) {
			/* QEMU notices the broken stream itself; cancel makes it certain. */
			struct ferry_err e2 = { 0 };
			(void)ferry_qmp_execute(q, "migrate_cancel", NULL, NULL, &e2);
			rc = ferry_err_set(&err, EIO, "transport failed: %s", ss.error);
			goto out;
		}
		double now = since(&m->t0);
		if (peer_gone(&jl)) {
			struct ferry_err e2 = { 0 };
			(void)ferry_qmp_execute(q, "migrate_cancel", NULL, NULL, &e2);
			rc = ferry_err_set(&err, ECONNRESET, "the destination daemon went away; migration cancelled");
			goto out;
		}
		/* Handed-over connections move bytes ferry does not see: count QEMU's too. */
		pthread_mutex_lock(&m->lock);
		uint64_t moved = ss.tx_bytes + m->prog.ram_transferred;
		pthread_mutex_unlock(&m->lock);
		if (moved != stall_bytes) {
			stall_bytes = moved;
			stall_t = now;
		} else if (now - stall_t > m->stall_timeout_s) {
			struct ferry_err e2 = { 0 };
			(void)ferry_qmp_execute(q, "migrate_cancel", NULL, NULL, &e2);
			rc = ferry_err_set(&err, ETIMEDOUT, "no data moved for %d s; migration cancelled", m->stall_timeout_s);
			goto out;
		}
		struct timespec ts = { 0, POLL_INTERVAL_MS * 1000000L };
		nanosleep(&ts, NULL);
	}

	/* The source is done; the destination must confirm it loaded everything. */
	json_t *fin = NULL;
	rc = peer_simple(&jl, "migrate-finish", sp.id, FINISH_TIMEOUT_MS, &fin, &err);
	prepared = false;
	if (rc) {
		ferry_err_prefix(&err, "destination did not complete");
		goto out;
	}
	const char *dst_status = json_string_value(json_object_get(fin, "status"));
	pthread_mutex_lock(&m->lock);
	snprintf(m->prog.dst_status, sizeof(m->prog.dst_status), "%s", dst_status ? dst_status : "?");
	pthread_mutex_unlock(&m->lock);
	if (!dst_status || strcmp(dst_status, "completed") != 0) {
		rc = ferry_err_set(&err, EIO, "destination QEMU reports '%s'", dst_status ? dst_status : "?");
		/* A destination that positively failed cannot run the VM: the
		 * source may take it back. */
		if (dst_status && strcmp(dst_status, "failed") == 0)
			src_completed = false;
		json_decref(fin);
		goto out;
	}
	json_decref(fin);
	final = FERRY_MIG_COMPLETED;
	goto out;

cancel:
	final = FERRY_MIG_CANCELLED;
	ferry_err_clear(&err);
	ferry_err_set(&err, ECANCELED, "cancelled by the user");
out:
	if (final != FERRY_MIG_COMPLETED) {
		if (prepared && jl.fd >= 0) {
			struct ferry_err e2 = { 0 };
			(void)peer_simple(&jl, "migrate-abort", sp.id, 5000, NULL, &e2);
		}
		if (sess)
			ferry_session_abort(sess, err.msg[0] ? err.msg : "migration failed");
		/* The transport may have failed just as the source completed. */
		json_t *info = NULL;
		struct ferry_err e3 = { 0 };
		if (!src_completed && q && ferry_qmp_execute(q, "query-migrate", NULL, &info, &e3) == 0) {
			const char *now = json_string_value(json_object_get(info, "status"));
			src_completed = now && strcmp(now, "completed") == 0;
		}
		json_decref(info);
		if (src_completed)
			report_unknown_outcome(m, q, &err);
		else
			recover_source(m, q, was_running);
	}
	ferry_session_close(sess);
	ferry_jl_close(&jl);
	ferry_qmp_close(q);
	pthread_mutex_lock(&m->lock);
	m->prog.state = final;
	m->prog.elapsed_s = since(&m->t0);
	if (final != FERRY_MIG_COMPLETED)
		snprintf(m->prog.error, sizeof(m->prog.error), "%s", err.msg[0] ? err.msg : "migration failed");
	m->done = true;
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

int ferry_migration_start(struct ferry_dp *dp, const struct ferry_migration_params *p, uint32_t id,
			  struct ferry_migration **out, struct ferry_err *err)
{
	if (!p->src_qmp || !p->dst_qmp || !p->peer || !p->run_dir)
		return ferry_err_set(err, EINVAL, "migrate needs the source QMP socket, the destination QMP socket and the destination daemon");
	if (p->channels + 1 > FERRY_MAX_STREAMS)
		return ferry_err_set(err, EINVAL, "at most %d multifd channels", FERRY_MAX_STREAMS - 1);
	if (p->lanes > FERRY_MAX_LANES)
		return ferry_err_set(err, EINVAL, "at most %d lanes", FERRY_MAX_LANES);
	struct ferry_migration *m = calloc(1, sizeof(*m));
	if (!m)
		return ferry_err_set(err, ENOMEM, "out of memory");
	m->dp = dp;
	m->id = id;
	m->src_qmp = strdup(p->src_qmp);
	m->dst_qmp = strdup(p->dst_qmp);
	m->peer = strdup(p->peer);
	m->run_dir = strdup(p->run_dir);
	m->channels = p->channels;
	m->lanes = p->lanes;
	m->no_handoff = p->no_handoff;
	m->stall_timeout_s = p->stall_timeout_s > 0 ? p->stall_timeout_s : 120;
	pthread_mutex_init(&m->lock, NULL);
	clock_gettime(CLOCK_MONOTONIC, &m->t0);
	if (!m->src_qmp || !m->dst_qmp || !m->peer || !m->run_dir) {
		ferry_migration_free(m);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	int rc = pthread_create(&m->thread, NULL, migration_main, m);
	if (rc) {
		m->done = true;
		ferry_migration_free(m);
		return ferry_err_set(err, rc, "cannot start the migration thread: %s", strerror(rc));
	}
	*out = m;
	return 0;
}

void ferry_migration_progress(struct ferry_migration *m, struct ferry_migration_progress *out)
{
	pthread_mutex_lock(&m->lock);
	*out = m->prog;
	if (!m->done)
		out->elapsed_s = since(&m->t0);
	pthread_mutex_unlock(&m->lock);
}

void ferry_migration_cancel(struct ferry_migration *m)
{
	pthread_mutex_lock(&m->lock);
	m->cancel = true;
	pthread_mutex_unlock(&m->lock);
}

bool ferry_migration_done(struct ferry_migration *m)
{
	pthread_mutex_lock(&m->lock);
	bool d = m->done;
	pthread_mutex_unlock(&m->lock);
	return d;
}

void ferry_migration_free(struct ferry_migration *m)
{
	if (!m)
		return;
	if (m->thread)
		pthread_join(m->thread, NULL);
	pthread_mutex_destroy(&m->lock);
	free(m->src_qmp);
	free(m->dst_qmp);
	free(m->peer);
	free(m->run_dir);
	free(m);
}
