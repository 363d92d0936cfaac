#include "migrate.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cookie.h"
#include "jsonline.h"
#include "nbdpath.h"
#include "pcguard.h"
#include "pinlisten.h"
#include "plan.h"
#include "probe.h"
#include "qmp.h"
#include "state.h"

#define QMP_TIMEOUT_MS   10000
#define PEER_TIMEOUT_MS  15000
#define PREPARE_TIMEOUT_MS 90000 /* the destination may start its QEMU first (up to 60 s) */
#define POLL_INTERVAL_MS 50
#define FINISH_TIMEOUT_MS 120000
#define SWITCHOVER_TIMEOUT_S 120
#define MIRROR_READY_TIMEOUT_S 600 /* a full copy that makes no job progress for this long fails */
#define MIRROR_END_TIMEOUT_S 120
#define NBD_LANES 2                /* per disk, unless --lanes says otherwise */
#define FERRY_MIGRATE_MAX_BANDWIDTH (100ll * 1000 * 1000 * 1000) /* bytes/s: effectively unlimited */

/* One disk of a storage migration (docs/protocol.md, "Storage migration"). */
struct mig_disk {
	char name[FERRY_COOKIE_TARGET_MAX + 1]; /* as the user named it; also the export name */
	char node[128];      /* its root node: what blockdev-mirror copies */
	char job[64];        /* ferry-mirror-NAME */
	char tgt[64];        /* ferry-nbd-NAME: the nbd node on ferry's NBD path */
	char listen[PATH_MAX];
	uint64_t size;
	uint32_t nbd_id;
	bool path_open, node_added, job_started;
};

struct ferry_migration {
	struct ferry_dp *dp;
	uint32_t id;
	char *src_qmp, *dst_qmp, *peer, *run_dir;
	unsigned channels, lanes;
	int stall_timeout_s;
	bool no_handoff, keep_source, postcopy, force_postcopy, suspend;
	uint64_t max_bandwidth;
	unsigned postcopy_after_ms;
	uint32_t require, disabled;
	int transport;
	char hostname[FERRY_COOKIE_HOSTNAME_MAX + 1];
	char hostuuid[FERRY_COOKIE_UUID_LEN + 1];
	char *state_dir;
	char *cookie_log;
	struct ferry_state_record rec;   /* this migration's durable record, as last written */
	struct ferry_nbd_registry *nbd;
	unsigned ndisks, nshared;
	struct mig_disk disks[FERRY_MIG_MAX_DISKS];
	char *shared[FERRY_MIG_MAX_SHARED];
	char dst_nbd_sock[FERRY_COOKIE_SOCKET_MAX + 1]; /* the destination's NBD server, from its cookie */
	/* Multifd handoff: where our QEMU connects (the destination's pinned
	 * listener), and the address the destination admits (ours). */
	char direct_addr[FERRY_DP_ENDPOINT_MAX];
	char src_ip[64];

	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t ended; /* signalled when done is set (CLOCK_MONOTONIC) */
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

const char *ferry_migration_mark_name(enum ferry_migration_mark k)
{
	static const char *const names[FERRY_MARK_COUNT] = {
		[FERRY_MARK_QMP] = "qmp",         [FERRY_MARK_BEGIN] = "begin",     [FERRY_MARK_CONNECTED] = "connected",
		[FERRY_MARK_PREPARED] = "prepared", [FERRY_MARK_CAPS] = "caps",     [FERRY_MARK_LANE] = "lane",
		[FERRY_MARK_HANDOFF] = "handoff", [FERRY_MARK_MIGRATE] = "migrate", [FERRY_MARK_SENT] = "sent",
		[FERRY_MARK_TIMINGS] = "timings", [FERRY_MARK_FINISHED] = "finished", [FERRY_MARK_END] = "end",
	};
	return (unsigned)k < FERRY_MARK_COUNT ? names[k] : "?";
}

/* Step k ended now (the first time only: a repeated step keeps its first end). */
static void mark(struct ferry_migration *m, enum ferry_migration_mark k)
{
	double t = since(&m->t0);
	pthread_mutex_lock(&m->lock);
	if (m->prog.marks[k] == 0)
		m->prog.marks[k] = t;
	pthread_mutex_unlock(&m->lock);
}

/* The destination daemon's timing object ({"name_ms": ms, ...}) read into *out. */
static void dst_ms(struct ferry_migration *m, json_t *timing, const char *key, double *out)
{
	json_t *v = json_object_get(timing, key);
	if (!json_is_number(v))
		return;
	pthread_mutex_lock(&m->lock);
	*out = json_number_value(v);
	pthread_mutex_unlock(&m->lock);
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

static void log_cookie(struct ferry_migration *m, const char *step, const char *xml)
{
	if (!m->cookie_log)
		return;
	char name[64];
	snprintf(name, sizeof(name), "source-%u-%s", m->id, step);
	struct ferry_err e = { 0 };
	if (ferry_cookie_save(m->cookie_log, name, xml, &e)) {
		pthread_mutex_lock(&m->lock);
		snprintf(m->prog.warning, sizeof(m->prog.warning), "%.250s", e.msg);
		pthread_mutex_unlock(&m->lock);
	}
}

static void plan_to_progress(struct ferry_migration *m, const struct ferry_plan *plan)
{
	pthread_mutex_lock(&m->lock);
	ferry_plan_describe(plan, m->prog.plan, sizeof(m->prog.plan));
	m->prog.fallbacks[0] = '\0';
	for (unsigned i = 0; i < plan->nnotes; i++) {
		size_t n = strlen(m->prog.fallbacks);
		snprintf(m->prog.fallbacks + n, sizeof(m->prog.fallbacks) - n, "%s%s", n ? "; " : "", plan->notes[i]);
	}
	pthread_mutex_unlock(&m->lock);
}

/* Prepare (v3, step 2): send our cookie and what the user asked for; the
 * destination validates the cookie, chooses the plan from both sides'
 * capabilities, readies its QEMU and a session, and answers with its own
 * cookie and the plan. We compute the plan too and insist they match. */
static int peer_prepare(struct ferry_migration *m, struct ferry_jl *jl, const struct ferry_cookie *mine,
			const struct ferry_side_caps *mycaps, struct ferry_plan *plan, struct ferry_session_params *sp,
			char *endpoint, size_t eplen, struct ferry_err *err)
{
	char *xml = NULL;
	int rc = ferry_cookie_format(mine, &xml, err);
	if (rc)
		return ferry_err_prefix(err, "our own cookie");
	log_cookie(m, "begin", xml);
	const char *tname = m->transport ? ferry_cookie_driver_name(m->transport) : "auto";
	/* Our address as the destination sees it: the control connection's
	 * local end. A pinned multifd listener admits only it. */
	struct sockaddr_storage me;
	socklen_t melen = sizeof(me);
	m->src_ip[0] = 0;
	if (getsockname(jl->fd, (struct sockaddr *)&me, &melen) == 0)
		(void)getnameinfo((struct sockaddr *)&me, melen, m->src_ip, sizeof(m->src_ip), NULL, 0, NI_NUMERICHOST);
	/* "channels", "lanes" and "handoff" are what a daemon without cookies reads. */
	json_t *req = json_pack("{s:s, s:s, s:s, s:i, s:i, s:b, s:I, s:s, s:o, s:b, s:b}", "cmd", "migrate-prepare", "qmp",
				m->dst_qmp, "cookie", xml, "channels", (int)m->channels, "lanes", (int)m->lanes,
				"handoff", false, "window", (json_int_t)ferry_dp_window(m->dp), "transport", tname,
				"require", ferry_features_json(m->require), "no_handoff", m->no_handoff, "postcopy", m->postcopy);
	free(xml);
	if (req && m->src_ip[0])
		json_object_set_new(req, "src_ip", json_string(m->src_ip));
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	json_t *reply = NULL;
	rc = ferry_jl_call(jl, req, PREPARE_TIMEOUT_MS, &reply, err);
	json_decref(req);
	if (rc)
		return ferry_err_prefix(err, "destination daemon refused to prepare");
	json_t *timing = json_object_get(reply, "timing");
	dst_ms(m, timing, "qmp_ms", &m->prog.dst_qmp_ms);
	dst_ms(m, timing, "probe_ms", &m->prog.dst_probe_ms);
	dst_ms(m, timing, "total_ms", &m->prog.dst_prepare_ms);

	const char *theirs_xml = json_string_value(json_object_get(reply, "cookie"));
	json_t *jplan = json_object_get(reply, "plan");
	if (!theirs_xml && !jplan) {
		/* A ferry from before cookies set up what "channels" and "lanes"
		 * asked for, relayed: go on with that, and say so. */
		memset(plan, 0, sizeof(*plan));
		plan->transport = FERRY_COOKIE_DRIVER_TCP;
		plan->channels = m->channels;
		plan->features = m->channels ? FERRY_F_MULTIFD : 0;
		snprintf(plan->notes[plan->nnotes++], sizeof(plan->notes[0]),
			 "the destination daemon predates migration cookies: no capability check, tcp relay");
		if (m->require & ~plan->features) {
			rc = ferry_err_set(err, ENOTSUP, "required features cannot be checked: the destination daemon "
					   "predates migration cookies");
			goto out;
		}
		sp->lanes = m->lanes ? m->lanes : 1 + m->channels;
		sp->max_streams = 1 + m->channels;
		sp->handoff = false;
		rc = ferry_session_reply_parse(reply, ferry_dp_window(m->dp), sp, endpoint, eplen, err);
		goto out;
	}
	if (!theirs_xml || !json_is_object(jplan)) {
		rc = ferry_err_set(err, EPROTO, "the destination daemon's prepare reply has %s",
				   theirs_xml ? "a cookie but no plan" : "a plan but no cookie");
		goto out;
	}
	struct ferry_cookie theirs;
	if ((rc = ferry_cookie_parse(theirs_xml, strlen(theirs_xml), &theirs, err))) {
		ferry_err_prefix(err, "the destination's cookie");
		goto out;
	}
	if ((rc = ferry_cookie_check_peer(mine, &theirs, err)) || (rc = ferry_cookie_check_shape(mine, &theirs, err)))
		goto out;
	struct ferry_side_caps dcaps;
	ferry_caps_from_cookie(&theirs, &dcaps);
	struct ferry_plan_request preq = { .transport = m->transport, .channels = m->channels, .require = m->require,
					   .no_handoff = m->no_handoff, .postcopy = m->postcopy, .nbd = m->ndisks > 0 };
	if ((rc = ferry_plan_choose(mycaps, &dcaps, &preq, plan, err)))
		goto out;
	if (plan->features & FERRY_F_NBD) {
		/* The destination exports each disk on its NBD server's socket. */
		if (!(theirs.flags & FERRY_COOKIE_NBD) || !theirs.nbd.socket[0]) {
			rc = ferry_err_set(err, EPROTO, "the destination agreed to storage migration but its cookie has no "
					   "<nbd socket=...>");
			goto out;
		}
		for (unsigned k = 0; k < m->ndisks; k++) {
			size_t j;
			for (j = 0; j < theirs.nbd.ndisks && strcmp(theirs.nbd.disks[j].target, m->disks[k].name); j++)
				;
			if (j == theirs.nbd.ndisks) {
				rc = ferry_err_set(err, EPROTO, "the destination exports no disk '%s'", m->disks[k].name);
				goto out;
			}
			if (theirs.nbd.disks[j].capacity < m->disks[k].size) {
				rc = ferry_err_set(err, ENOSPC, "disk '%s': the destination's image has %" PRIu64
						   " bytes, smaller than the source's %" PRIu64, m->disks[k].name,
						   theirs.nbd.disks[j].capacity, m->disks[k].size);
				goto out;
			}
		}
		snprintf(m->dst_nbd_sock, sizeof(m->dst_nbd_sock), "%s", theirs.nbd.socket);
	}
	struct ferry_plan told = { 0 };
	const char *tt = json_string_value(json_object_get(jplan, "transport"));
	told.transport = ferry_cookie_driver_kind(tt);
	json_t *jch = json_object_get(jplan, "channels");
	told.channels = json_is_integer(jch) ? (unsigned)json_integer_value(jch) : ~0u;
	told.handoff = json_is_true(json_object_get(jplan, "handoff"));
	json_t *jf = json_object_get(jplan, "features");
	size_t i;
	json_t *v;
	json_array_foreach(jf, i, v) told.features |= json_is_string(v) ? ferry_feature_parse(json_string_value(v)) : 0;
	if (!ferry_plan_equal(plan, &told)) {
		char a[96], b[96];
		ferry_plan_describe(plan, a, sizeof(a));
		ferry_plan_describe(&told, b, sizeof(b));
		rc = ferry_err_set(err, EPROTO, "the destination set up '%s' but the cookies give '%s'", b, a);
		goto out;
	}
	json_t *jl_lanes = json_object_get(jplan, "lanes");
	if (!json_is_integer(jl_lanes) || json_integer_value(jl_lanes) < 1 ||
	    json_integer_value(jl_lanes) > FERRY_MAX_LANES) {
		rc = ferry_err_set(err, EPROTO, "the destination's plan has no valid lane count");
		goto out;
	}
	sp->lanes = (unsigned)json_integer_value(jl_lanes);
	sp->max_streams = ferry_plan_streams(plan);
	sp->handoff = plan->handoff;
	if (plan->handoff && plan->channels > 0) {
		const char *direct = json_string_value(json_object_get(jplan, "direct"));
		if (!direct || !direct[0] || strlen(direct) >= sizeof(m->direct_addr) || strchr(direct, ',')) {
			rc = ferry_err_set(err, EPROTO, "the destination agreed to multifd handoff but names no valid "
					   "listener address ('direct': %s)", direct ? direct : "missing");
			goto out;
		}
		snprintf(m->direct_addr, sizeof(m->direct_addr), "%s", direct);
		sp->max_streams = 1; /* the lane only proves the token; QEMU connects itself */
	}
	rc = ferry_session_reply_parse(reply, ferry_dp_window(m->dp), sp, endpoint, eplen, err);
out:
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

/* The control connection to the destination daemon closed: nobody will
 * finish the destination side, so the migration must not go on. */
static bool peer_gone(struct ferry_jl *jl)
{
	/* Over TLS a byte on the wire may be a record, not a message: ask the
	 * JSON-lines layer, which knows. */
	return ferry_jl_peer_gone(jl);
}

static json_t *cap(const char *name, bool on)
{
	return json_pack("{s:s, s:b}", "capability", name, "state", on);
}

int ferry_migrate_set_caps(struct ferry_qmp *q, const struct ferry_migrate_caps *c, struct ferry_err *err)
{
	/* MIGRATION events wake the waiting loops (the source's progress,
	 * the destination's Finish) the moment QEMU's status changes. */
	json_t *caps = json_array();
	if (!caps || json_array_append_new(caps, cap("events", true)) ||
	    ((c->channels > 0 || c->multifd_always) && json_array_append_new(caps, cap("multifd", c->channels > 0))) ||
	    (c->postcopy && json_array_append_new(caps, cap("postcopy-ram", true))) ||
	    (c->preempt && json_array_append_new(caps, cap("postcopy-preempt", true)))) {
		json_decref(caps);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	json_t *params = json_object();
	if (params && ((c->max_bandwidth && json_object_set_new(params, "max-bandwidth",
								  json_integer((json_int_t)c->max_bandwidth))) ||
		       (c->channels > 0 && json_object_set_new(params, "multifd-channels",
								json_integer((json_int_t)c->channels))))) {
		json_decref(params);
		params = NULL;
	}
	/* Parameters ride in the same write; with none, there is no command. */
	size_t n = params && json_object_size(params) ? 2 : 1;
	json_t *args[2] = { json_pack("{s:o}", "capabilities", caps), params }, *res[2] = { NULL, NULL };
	const char *const cmds[2] = { "migrate-set-capabilities", "migrate-set-parameters" };
	int rc = args[0] && args[1] ? ferry_qmp_execute_batch(q, n, cmds, args, res, err)
				    : ferry_err_set(err, ENOMEM, "out of memory");
	for (size_t i = 0; i < 2; i++) {
		json_decref(args[i]);
		json_decref(res[i]);
	}
	return rc;
}

/* The plan's capabilities and parameters on the source QEMU.
 * has_multifd: whether this QEMU has the capability at all (Begin's probe);
 * it is then set either way, so an earlier setting cannot linger. */
static int set_source_caps(struct ferry_qmp *q, bool has_multifd, unsigned channels, bool postcopy, bool preempt,
			   uint64_t max_bandwidth, struct ferry_err *err)
{
	if (channels > 0 && !has_multifd)
		return ferry_err_set(err, ENOTSUP, "the source QEMU has no multifd capability");
	/* QEMU 7.2 throttles migration to 32 MiB/s unless told otherwise; the
	 * transport (or the user's cap), not a default, should set the pace. */
	const struct ferry_migrate_caps c = {
		.channels = channels,
		.multifd_always = has_multifd,
		.postcopy = postcopy,
		.preempt = preempt,
		.max_bandwidth = max_bandwidth ? max_bandwidth : FERRY_MIGRATE_MAX_BANDWIDTH,
	};
	return ferry_migrate_set_caps(q, &c, err);
}

/* Datagram lanes: the session's reliability counters for migrate-status. */
static void note_rel(struct ferry_migration *m, const struct ferry_session_stats *ss)
{
	if (!ss->reliable)
		return;
	pthread_mutex_lock(&m->lock);
	m->prog.reliable = true;
	m->prog.rel = ss->rel;
	pthread_mutex_unlock(&m->lock);
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
		      "run `ferryctl recover` once the destination daemon answers (it decides from both hosts' records)",
		      why, status);
	pthread_mutex_lock(&m->lock);
	snprintf(m->prog.src_vm_status, sizeof(m->prog.src_vm_status), "%s", status);
	pthread_mutex_unlock(&m->lock);
}

/* Write the migration's record at a phase change, so a restarted daemon and
 * `ferryctl recover` know where it stood. A failure to write does not stop
 * the migration but is reported. */
static void record(struct ferry_migration *m, enum ferry_state_phase phase, const char *note)
{
	if (!m->state_dir)
		return;
	m->rec.phase = phase;
	snprintf(m->rec.note, sizeof(m->rec.note), "%s", note ? note : "");
	struct ferry_err e = { 0 };
	if (ferry_state_write(m->state_dir, &m->rec, &e)) {
		pthread_mutex_lock(&m->lock);
		snprintf(m->prog.warning, sizeof(m->prog.warning), "cannot record the migration's phase: %.200s", e.msg);
		pthread_mutex_unlock(&m->lock);
	}
}

/* How long the destination may take from the postcopy switch to having
 * loaded every device (it reads the whole package first). */
#define POSTCOPY_SETUP_TIMEOUT_MS 60000
/* Rescue: how long QEMU may take to push its remaining RAM into the sink,
 * and to settle once told its migration ended. */
#define RESCUE_DRAIN_TIMEOUT_S 300
#define RESCUE_END_TIMEOUT_S 30

/* Postcopy set-up (the guard's purpose): ask the destination daemon to wait
 * until its QEMU loaded every device (it is then paused, never running,
 * because the destination turned autostart off at Prepare). 0 = loaded. */
static int postcopy_setup_wait(struct ferry_jl *jl, uint32_t session, struct ferry_err *err)
{
	json_t *req = json_pack("{s:s, s:I, s:i}", "cmd", "postcopy-setup-wait", "session", (json_int_t)session,
				"timeout_ms", POSTCOPY_SETUP_TIMEOUT_MS);
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	json_t *rep = NULL;
	int rc = ferry_jl_call(jl, req, POSTCOPY_SETUP_TIMEOUT_MS + 10000, &rep, err);
	json_decref(req);
	json_decref(rep);
	return rc;
}

/* The destination failed (or fell silent) before acknowledging: it never ran
 * the VM. Let the source QEMU finish its postcopy into the guard's sink, then
 * run the VM here again. QEMU 7.2 cannot leave postcopy-active any other way
 * (migrate_cancel stays in "cancelling"; cont says "not finalized"). */
static int postcopy_rescue(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_pcguard *g, bool was_running,
			   struct ferry_err *err)
{
	(void)ferry_pcguard_rescue(g);
	bool shut_sent = false;
	double t0 = since(&m->t0), shut_t = 0;
	for (;;) {
		json_t *info = NULL;
		int rc = ferry_qmp_execute(q, "query-migrate", NULL, &info, err);
		if (rc)
			return ferry_err_prefix(err, "rescuing the source after the failed postcopy set-up");
		char status[32];
		const char *js = json_string_value(json_object_get(info, "status"));
		snprintf(status, sizeof(status), "%s", js ? js : "?");
		bool over = strcmp(status, "completed") == 0 || strcmp(status, "failed") == 0 ||
			    strcmp(status, "cancelled") == 0;
		uint64_t remaining = ju(json_object_get(info, "ram"), "remaining");
		bool has_ram = json_object_get(info, "ram") != NULL;
		json_decref(info);
		if (over)
			break;
		if (strcmp(status, "postcopy-paused") == 0)
			return ferry_err_set(err, EIO, "the source QEMU paused its postcopy although ferry held its channel");
		struct ferry_pcguard_state st;
		ferry_pcguard_state(g, &st);
		/* QEMU's last byte is QEMU_VM_EOF (0) after its final RAM section;
		 * it then waits for the destination's SHUT on the return path.
		 * A SHUT any earlier would close the channel under QEMU's feet. */
		if (!shut_sent && strcmp(status, "postcopy-active") == 0 && has_ram && remaining == 0 &&
		    st.quiet_s >= 0.5 && (st.sunk_bytes == 0 || st.last_sunk_byte == 0)) {
			if ((rc = ferry_pcguard_send_shut(g, err)))
				return rc;
			shut_sent = true;
			shut_t = since(&m->t0);
		}
		double now = since(&m->t0);
		if ((!shut_sent && now - t0 > RESCUE_DRAIN_TIMEOUT_S) || (shut_sent && now - shut_t > RESCUE_END_TIMEOUT_S))
			return ferry_err_set(err, ETIMEDOUT, "the source QEMU did not end its postcopy (status '%s')", status);
		struct timespec ts = { 0, 50 * 1000000L };
		nanosleep(&ts, NULL);
	}
	recover_source(m, q, was_running);
	return 0;
}

/* Each channel QEMU opens to the guard becomes the session's next stream. */
static int guard_adopt(void *arg, int dp_fd, struct ferry_err *err)
{
	return ferry_session_add_stream(arg, dp_fd, err);
}

/* Postcopy recovery: how often, and how long the destination QEMU may take
 * to notice the cut and pause. */
#define POSTCOPY_MAX_RECOVERIES 3
#define POSTCOPY_RECOVER_TIMEOUT_MS 60000

/* After the commit the lanes broke and both QEMUs paused their postcopy:
 * the destination listens again (migrate-recover) behind a new session,
 * and the source resumes over it (migrate resume=true). Replaces *sess. */
static int postcopy_recover(struct ferry_migration *m, struct ferry_jl *jl, struct ferry_qmp *q,
			    struct ferry_session **sess, struct ferry_session_params *sp, unsigned streams,
			    unsigned n, struct ferry_err *err)
{
	json_t *req = json_pack("{s:s, s:I}", "cmd", "postcopy-recover", "session", (json_int_t)sp->id);
	json_t *rep = NULL;
	if (!req)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = ferry_jl_call(jl, req, POSTCOPY_RECOVER_TIMEOUT_MS + 10000, &rep, err);
	json_decref(req);
	if (rc)
		return ferry_err_prefix(err, "the destination cannot take up the postcopy again");
	struct ferry_session_params np = *sp;
	char endpoint[FERRY_DP_ENDPOINT_MAX], path[512];
	rc = ferry_session_reply_parse(rep, ferry_dp_window(m->dp), &np, endpoint, sizeof(endpoint), err);
	json_decref(rep);
	if (rc)
		return rc;
	snprintf(path, sizeof(path), "%s/mig-%u-src-r%u.sock", m->run_dir, m->id, n);
	np.unix_path = path;
	np.lanes = np.max_streams = streams; /* QEMU reconnects every channel */
	np.handoff = false;
	ferry_session_close(*sess);
	*sess = NULL;
	if ((rc = ferry_session_create_src(m->dp, &np, endpoint, sess, err)))
		return ferry_err_prefix(err, "cannot open new data lanes for the postcopy");
	*sp = np;
	char uri[600];
	snprintf(uri, sizeof(uri), "unix:%s", path);
	if ((rc = ferry_qmp_executef(q, NULL, err, "migrate", "{s:s, s:b}", "uri", uri, "resume", 1)))
		return ferry_err_prefix(err, "the source QEMU did not resume its postcopy");
	/* The resume is asynchronous: wait until QEMU has left postcopy-paused
	 * (the handshake over the new lane), or the next look would count it
	 * as another cut. */
	for (int waited = 0;; waited += POLL_INTERVAL_MS) {
		json_t *info = NULL;
		if ((rc = ferry_qmp_execute(q, "query-migrate", NULL, &info, err)))
			return rc;
		const char *st = json_string_value(json_object_get(info, "status"));
		bool paused = st && strcmp(st, "postcopy-paused") == 0;
		json_decref(info);
		if (!paused)
			break;
		if (waited >= POSTCOPY_RECOVER_TIMEOUT_MS)
			return ferry_err_set(err, ETIMEDOUT, "the source QEMU stayed paused after resuming over new lanes");
		struct timespec ts = { 0, POLL_INTERVAL_MS * 1000000L };
		nanosleep(&ts, NULL);
	}
	pthread_mutex_lock(&m->lock);
	m->prog.postcopy_recoveries = n;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* ---- storage migration (docs/protocol.md, "Storage migration") ---------- */

/* A local file under one of the --shared-dir directories (both resolved). */
static bool on_shared_dir(struct ferry_migration *m, const char *file)
{
	char f[PATH_MAX], dir[PATH_MAX];
	if (!realpath(file, f))
		return false;
	for (unsigned i = 0; i < m->nshared; i++) {
		if (!realpath(m->shared[i], dir))
			continue;
		size_t n = strlen(dir);
		if (strncmp(f, dir, n) == 0 && (f[n] == '/' || (n == 1 && dir[0] == '/')))
			return true;
	}
	return false;
}

static bool disk_listed(struct ferry_migration *m, const char *device, const char *qdev, const char *node)
{
	for (unsigned i = 0; i < m->ndisks; i++) {
		const char *n = m->disks[i].name;
		if ((device && strcmp(device, n) == 0) || (qdev && strcmp(qdev, n) == 0) || (node && strcmp(node, n) == 0))
			return true;
	}
	return false;
}

/* Begin, storage part: resolve each listed disk (its root node and size),
 * refuse a writable local disk that is neither listed nor on a --shared-dir,
 * and refuse while any block job runs (it would race the mirrors). */
static int disks_check(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_err *err)
{
	json_t *blocks = NULL, *jobs = NULL;
	int rc = ferry_qmp_execute(q, "query-block", NULL, &blocks, err);
	if (rc)
		return ferry_err_prefix(err, "listing the source's disks");
	char have[512] = "";
	size_t i, hl = 0;
	json_t *b;
	json_array_foreach(blocks, i, b) {
		const char *device = json_string_value(json_object_get(b, "device"));
		const char *qdev = json_string_value(json_object_get(b, "qdev"));
		json_t *ins = json_object_get(b, "inserted");
		const char *node = json_string_value(json_object_get(ins, "node-name"));
		const char *shown = device && *device ? device : qdev ? qdev : node ? node : "?";
		if (ins && hl < sizeof(have))
			hl += (size_t)snprintf(have + hl, sizeof(have) - hl, "%s%s", hl ? ", " : "", shown);
		for (unsigned k = 0; k < m->ndisks; k++) {
			struct mig_disk *d = &m->disks[k];
			if ((!device || strcmp(device, d->name)) && (!qdev || strcmp(qdev, d->name)) &&
			    (!node || strcmp(node, d->name)))
				continue;
			json_t *vs = json_object_get(json_object_get(ins, "image"), "virtual-size");
			if (!ins || !node || !json_is_integer(vs) || json_integer_value(vs) <= 0) {
				rc = ferry_err_set(err, ENOMEDIUM, "disk '%s' has no medium to migrate", d->name);
				goto out;
			}
			if (d->size) {
				rc = ferry_err_set(err, EINVAL, "disk '%s' names two block devices; name it by node name", d->name);
				goto out;
			}
			snprintf(d->node, sizeof(d->node), "%s", node);
			d->size = (uint64_t)json_integer_value(vs);
		}
	}
	for (unsigned k = 0; k < m->ndisks; k++)
		if (!m->disks[k].size) {
			rc = ferry_err_set(err, ENOENT, "--disk %s: the source VM has no such disk (device, qdev id or node "
					   "name; it has: %s)", m->disks[k].name, have[0] ? have : "none");
			goto out;
		}
	json_array_foreach(blocks, i, b) {
		const char *device = json_string_value(json_object_get(b, "device"));
		const char *qdev = json_string_value(json_object_get(b, "qdev"));
		json_t *ins = json_object_get(b, "inserted");
		const char *node = json_string_value(json_object_get(ins, "node-name"));
		if (!ins || json_is_true(json_object_get(ins, "ro")) || disk_listed(m, device, qdev, node))
			continue;
		const char *file = json_string_value(json_object_get(ins, "file"));
		/* A network image (nbd:, rbd:, json:{...}) is reachable from both hosts; a local file only
		 * where a --shared-dir says its directory is shared. */
		if (file && file[0] == '/' && !on_shared_dir(m, file)) {
			rc = ferry_err_set(err, EXDEV, "disk '%s' (%s) is writable, local and not migrated: list it with "
					   "--disk to migrate it, or name the shared directory it lies in with --shared-dir",
					   device && *device ? device : qdev ? qdev : node ? node : "?", file);
			goto out;
		}
	}
	if (m->ndisks == 0)
		goto out;
	if ((rc = ferry_qmp_execute(q, "query-block-jobs", NULL, &jobs, err))) {
		ferry_err_prefix(err, "listing the source's block jobs");
		goto out;
	}
	if (json_array_size(jobs) > 0) {
		json_t *j0 = json_array_get(jobs, 0);
		const char *id = json_string_value(json_object_get(j0, "device"));
		const char *type = json_string_value(json_object_get(j0, "type"));
		rc = ferry_err_set(err, EBUSY, "a block job is active on the source (%s '%s'%s): storage migration needs "
				   "the disks free of jobs; wait for it or cancel it", type ? type : "job", id ? id : "?",
				   json_array_size(jobs) > 1 ? " and more" : "");
	}
out:
	json_decref(blocks);
	json_decref(jobs);
	return rc;
}

/* The job status of disk d's mirror ("" when QEMU has no such job) and its error. */
static int job_status(json_t *jobs, const struct mig_disk *d, char *status, size_t slen, char *why, size_t wlen)
{
	size_t i;
	json_t *j;
	status[0] = why[0] = '\0';
	json_array_foreach(jobs, i, j) {
		const char *id = json_string_value(json_object_get(j, "id"));
		if (!id || strcmp(id, d->job) != 0)
			continue;
		const char *st = json_string_value(json_object_get(j, "status"));
		const char *e = json_string_value(json_object_get(j, "error"));
		snprintf(status, slen, "%s", st ? st : "?");
		snprintf(why, wlen, "%s", e ? e : "");
		return 0;
	}
	return 0;
}

/* Why disk d's NBD path failed, if it knows. */
static void path_failure(struct ferry_migration *m, const struct mig_disk *d, char *out, size_t len)
{
	struct ferry_err e = { 0 };
	out[0] = '\0';
	json_t *st = d->path_open ? ferry_nbd_status(m->nbd, d->nbd_id, false, &e) : NULL;
	const char *lf = json_string_value(json_object_get(json_object_get(st, "stats"), "last_error"));
	if (lf && *lf)
		snprintf(out, len, "; ferry's NBD path: %s", lf);
	json_decref(st);
}

/* Step 3: one NBD path per disk to the destination's export, an nbd node on
 * it, and a full mirror into that node. */
static int disks_start(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_err *err)
{
	for (unsigned i = 0; i < m->ndisks; i++) {
		struct mig_disk *d = &m->disks[i];
		if ((size_t)snprintf(d->listen, sizeof(d->listen), "%s/mig-%u-nbd-%u.sock", m->run_dir, m->id, i) >=
		    sizeof(d->listen))
			return ferry_err_set(err, ENAMETOOLONG, "run directory path too long");
		unlink(d->listen);
		json_t *r = ferry_nbd_open(m->nbd, d->nbd_id, m->peer, d->listen, m->dst_nbd_sock, d->name,
					   m->lanes ? m->lanes : NBD_LANES, err);
		if (!r)
			return ferry_err_prefix(err, "disk '%s': opening ferry's NBD path to the destination's export", d->name);
		d->path_open = true;
		json_t *sz = json_object_get(json_object_get(r, "export"), "size");
		uint64_t tsize = json_is_integer(sz) ? (uint64_t)json_integer_value(sz) : 0;
		json_decref(r);
		if (tsize < d->size)
			return ferry_err_set(err, ENOSPC, "disk '%s': the destination's export has %" PRIu64
					     " bytes, the source's disk %" PRIu64, d->name, tsize, d->size);
		char name[sizeof(d->name)]; /* a copy: -Wrestrict cannot tell the fields apart */
		memcpy(name, d->name, sizeof(name));
		snprintf(d->tgt, sizeof(d->tgt), "ferry-nbd-%s", name);
		snprintf(d->job, sizeof(d->job), "ferry-mirror-%s", name);
		int rc = ferry_qmp_executef(q, NULL, err, "blockdev-add", "{s:s, s:s, s:s, s:{s:s, s:s}}", "driver", "nbd",
					    "node-name", d->tgt, "export", d->name, "server", "type", "unix", "path",
					    d->listen);
		if (rc)
			return ferry_err_prefix(err, "disk '%s': adding the nbd node", d->name);
		d->node_added = true;
		/* auto-dismiss off: the job's outcome stays readable until we dismiss it. */
		rc = ferry_qmp_executef(q, NULL, err, "blockdev-mirror", "{s:s, s:s, s:s, s:s, s:b}", "job-id", d->job,
					"device", d->node, "target", d->tgt, "sync", "full", "auto-dismiss", 0);
		if (rc)
			return ferry_err_prefix(err, "disk '%s': starting the mirror", d->name);
		d->job_started = true;
	}
	return 0;
}

static void progress_storage(struct ferry_migration *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void progress_storage(struct ferry_migration *m, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	pthread_mutex_lock(&m->lock);
	vsnprintf(m->prog.storage, sizeof(m->prog.storage), fmt, ap);
	pthread_mutex_unlock(&m->lock);
	va_end(ap);
}

/* Step 4: every mirror READY (the copy done, writes mirrored from now on).
 * A mirror that ends before, the user's cancel or a vanished destination
 * stop the wait. */
static int disks_wait_ready(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_jl *jl, struct ferry_err *err)
{
	uint64_t last_done = 0;
	double last_move = since(&m->t0);
	for (;;) {
		json_t *jobs = NULL;
		int rc = ferry_qmp_execute(q, "query-jobs", NULL, &jobs, err);
		if (rc)
			return ferry_err_prefix(err, "watching the mirrors");
		unsigned ready = 0;
		uint64_t done = 0, total = 0;
		size_t i;
		json_t *j;
		json_array_foreach(jobs, i, j) {
			done += ju(j, "current-progress");
			total += ju(j, "total-progress");
		}
		for (unsigned k = 0; k < m->ndisks && rc == 0; k++) {
			char st[32], why[256], pf[300];
			job_status(jobs, &m->disks[k], st, sizeof(st), why, sizeof(why));
			if (strcmp(st, "ready") == 0) {
				ready++;
			} else if (strcmp(st, "running") != 0 && strcmp(st, "created") != 0) {
				path_failure(m, &m->disks[k], pf, sizeof(pf));
				rc = ferry_err_set(err, EIO, "the mirror of disk '%s' ended before it was ready (%s%s%s)%s",
						   m->disks[k].name, st[0] ? st : "gone", why[0] ? ": " : "", why, pf);
			}
		}
		json_decref(jobs);
		if (rc)
			return rc;
		progress_storage(m, "mirroring %u disk%s: %" PRIu64 " of %" PRIu64 " bytes, %u ready", m->ndisks,
				 m->ndisks == 1 ? "" : "s", done, total, ready);
		if (ready == m->ndisks)
			return 0;
		if (cancelled(m))
			return ferry_err_set(err, ECANCELED, "cancelled by the user");
		if (peer_gone(jl))
			return ferry_err_set(err, ECONNRESET, "the destination daemon went away during the disk copy");
		if (done != last_done) {
			last_done = done;
			last_move = since(&m->t0);
		} else if (since(&m->t0) - last_move > MIRROR_READY_TIMEOUT_S) {
			return ferry_err_set(err, ETIMEDOUT, "the disk copy made no progress for %d s", MIRROR_READY_TIMEOUT_S);
		}
		struct timespec ts = { 0, 100 * 1000000L };
		nanosleep(&ts, NULL);
	}
}

/* Wait until every started mirror concluded; the first failure is returned. */
static int disks_wait_concluded(struct ferry_migration *m, struct ferry_qmp *q, int timeout_s, struct ferry_err *err)
{
	double t0 = since(&m->t0);
	for (;;) {
		json_t *jobs = NULL;
		int rc = ferry_qmp_execute(q, "query-jobs", NULL, &jobs, err);
		if (rc)
			return rc;
		unsigned open = 0;
		for (unsigned k = 0; k < m->ndisks && rc == 0; k++) {
			struct mig_disk *d = &m->disks[k];
			char st[32], why[256];
			if (!d->job_started)
				continue;
			job_status(jobs, d, st, sizeof(st), why, sizeof(why));
			if (strcmp(st, "concluded") == 0 || st[0] == '\0') {
				d->job_started = false;
				struct ferry_err e2 = { 0 };
				if (st[0])
					(void)ferry_qmp_executef(q, NULL, &e2, "job-dismiss", "{s:s}", "id", d->job);
				if (why[0] || !st[0])
					rc = ferry_err_set(err, EIO, "the mirror of disk '%s' failed at its end: %s", d->name,
							   why[0] ? why : "the job vanished");
			} else {
				open++;
			}
		}
		json_decref(jobs);
		if (rc || open == 0)
			return rc;
		if (since(&m->t0) - t0 > timeout_s)
			return ferry_err_set(err, ETIMEDOUT, "the mirrors did not end within %d s", timeout_s);
		struct timespec ts = { 0, 20 * 1000000L };
		nanosleep(&ts, NULL);
	}
}

/* After QEMU completed (the VM is stopped): a ready mirror cancelled without
 * force completes without pivot once the target holds every last write. */
static int disks_complete(struct ferry_migration *m, struct ferry_qmp *q, struct ferry_err *err)
{
	for (unsigned k = 0; k < m->ndisks; k++) {
		int rc = ferry_qmp_executef(q, NULL, err, "block-job-cancel", "{s:s}", "device", m->disks[k].job);
		if (rc)
			return ferry_err_prefix(err, "ending the mirror of disk '%s'", m->disks[k].name);
	}
	progress_storage(m, "%u disk%s in sync at the switch-over", m->ndisks, m->ndisks == 1 ? "" : "s");
	return disks_wait_concluded(m, q, MIRROR_END_TIMEOUT_S, err);
}

/* Whatever is left: mirrors cancelled by force, nbd nodes removed, NBD
 * paths closed. The source's own disks are never touched. */
static void disks_cleanup(struct ferry_migration *m, struct ferry_qmp *q)
{
	bool any = false;
	for (unsigned k = 0; k < m->ndisks; k++) {
		struct ferry_err e = { 0 };
		if (m->disks[k].job_started && q) {
			(void)ferry_qmp_executef(q, NULL, &e, "block-job-cancel", "{s:s, s:b}", "device", m->disks[k].job,
						 "force", 1);
			any = true;
		}
	}
	if (any && q) {
		struct ferry_err e = { 0 };
		(void)disks_wait_concluded(m, q, 30, &e);
	}
	for (unsigned k = 0; k < m->ndisks; k++) {
		struct mig_disk *d = &m->disks[k];
		struct ferry_err e = { 0 };
		if (d->node_added && q && !d->job_started)
			(void)ferry_qmp_executef(q, NULL, &e, "blockdev-del", "{s:s}", "node-name", d->tgt);
		d->node_added = false;
		if (d->path_open)
			json_decref(ferry_nbd_status(m->nbd, d->nbd_id, true, &e));
		d->path_open = false;
	}
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
	/* Guarded postcopy: the destination acknowledged it loaded every device
	 * (committed), or failed before and the source was taken back (rescued). */
	struct ferry_pcguard *guard = NULL;
	bool pc_committed = false, rescued = false;
	unsigned pc_recoveries = 0;
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
	mark(m, FERRY_MARK_QMP);
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

	/* Begin (v3, step 1): who we are and what this side can do. */
	struct ferry_cookie mine;
	struct ferry_side_caps mycaps;
	char my_ep[FERRY_DP_ENDPOINT_MAX];
	if ((rc = ferry_dp_endpoint(m->dp, my_ep, sizeof(my_ep), &err)) ||
	    (rc = ferry_probe_cookie(q, m->dp, my_ep, m->disabled, m->hostname, m->hostuuid, &mine, &mycaps, &err))) {
		ferry_err_prefix(&err, "describing the source");
		goto out;
	}
	if (m->ndisks || m->nshared) {
		if ((rc = disks_check(m, q, &err)))
			goto out;
	}
	if (m->ndisks) {
		mine.flags |= FERRY_COOKIE_NBD;
		mine.features |= FERRY_COOKIE_FEAT_NBD;
		mine.nbd.ndisks = m->ndisks;
		for (unsigned k = 0; k < m->ndisks; k++) {
			snprintf(mine.nbd.disks[k].target, sizeof(mine.nbd.disks[k].target), "%s", m->disks[k].name);
			mine.nbd.disks[k].capacity = m->disks[k].size;
		}
	}
	snprintf(m->rec.vm, sizeof(m->rec.vm), "%s", mine.name);
	m->rec.was_running = was_running;
	record(m, FERRY_PHASE_BEGIN, NULL);
	mark(m, FERRY_MARK_BEGIN);
	if (cancelled(m))
		goto cancel;

	rc = ferry_jl_connect_tcp(m->peer, PEER_TIMEOUT_MS, &jl, &err);
	if (rc) {
		ferry_err_prefix(&err, "destination daemon");
		goto out;
	}
	mark(m, FERRY_MARK_CONNECTED);
	struct ferry_plan plan;
	if ((rc = peer_prepare(m, &jl, &mine, &mycaps, &plan, &sp, endpoint, sizeof(endpoint), &err)))
		goto out;
	prepared = true;
	mark(m, FERRY_MARK_PREPARED);
	m->rec.session = sp.id;
	record(m, FERRY_PHASE_PREPARED, NULL);
	streams = sp.max_streams;
	plan_to_progress(m, &plan);
	pthread_mutex_lock(&m->lock);
	if (sp.handoff)
		snprintf(m->prog.transport, sizeof(m->prog.transport), "%s handoff", ferry_dp_driver_name(m->dp));
	else
		snprintf(m->prog.transport, sizeof(m->prog.transport), "%s relay, %u lane%s", ferry_dp_driver_name(m->dp),
			 sp.lanes, sp.lanes == 1 ? "" : "s");
	pthread_mutex_unlock(&m->lock);
	bool guarded = (plan.features & FERRY_F_POSTCOPY) && (plan.features & FERRY_F_POSTCOPY_SETUP);
	if ((plan.features & FERRY_F_POSTCOPY) && !guarded && !m->force_postcopy) {
		rc = ferry_err_set(&err, ENOTSUP, "postcopy: the set-up acknowledgement is not available (%s), so a "
				   "destination failing during the switch would leave the source paused for good; add "
				   "--force-postcopy to accept that risk",
				   plan.nnotes ? plan.notes[plan.nnotes - 1] : "one side lacks postcopy-setup");
		goto out;
	}
	if ((rc = set_source_caps(q, (mycaps.qemu & FERRY_F_MULTIFD) != 0, plan.channels,
				  (plan.features & FERRY_F_POSTCOPY) != 0, (plan.features & FERRY_F_POSTCOPY_PREEMPT) != 0,
				  m->max_bandwidth, &err)))
		goto out;
	mark(m, FERRY_MARK_CAPS);
	if (cancelled(m))
		goto cancel;
	if (plan.features & FERRY_F_NBD) {
		/* Disks first: RAM starts once every mirror is ready. */
		if ((rc = disks_start(m, q, &err)) || (rc = disks_wait_ready(m, q, &jl, &err))) {
			if (rc == -ECANCELED)
				goto cancel;
			goto out;
		}
	}

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
		mark(m, FERRY_MARK_LANE);
		/* The destination QEMU takes its end first, then ours starts writing. */
		rc = peer_simple(&jl, "migrate-handoff", sp.id, PEER_TIMEOUT_MS, NULL, &err);
		mark(m, FERRY_MARK_HANDOFF);
		if (rc == 0 && !plan.channels)
			rc = ferry_qmp_getfd(q, fd, "ferry-migration", &err);
		close(fd);
		if (rc) {
			ferry_err_prefix(&err, "handing the connection to QEMU");
			goto out;
		}
		if (plan.channels) {
			/* Multifd: our QEMU connects its channels to the destination
			 * QEMU's listener, which admits only m->src_ip: the route
			 * there must leave from that address too. */
			snprintf(uri, sizeof(uri), "tcp:%s", m->direct_addr);
			char host[FERRY_DP_ENDPOINT_MAX], from[64];
			if ((rc = ferry_endpoint_host(uri, host, sizeof(host), &err)) ||
			    (rc = ferry_route_source(host, from, sizeof(from), &err))) {
				ferry_err_prefix(&err, "multifd handoff");
				goto out;
			}
			if (strcmp(from, m->src_ip) != 0) {
				rc = ferry_err_set(&err, EADDRNOTAVAIL, "multifd handoff: the route to the destination's data "
						   "address %s leaves from %s, but the destination admits %s (where the "
						   "control connection comes from); use --no-handoff", host, from, m->src_ip);
				goto out;
			}
		} else {
			snprintf(uri, sizeof(uri), "fd:ferry-migration");
		}
	} else if (guarded) {
		/* QEMU's channel goes through the guard, which holds it until the
		 * destination acknowledged the postcopy set-up. */
		rc = ferry_session_create_src(m->dp, &sp, endpoint, &sess, &err);
		if (rc) {
			ferry_err_prefix(&err, "cannot open the data lanes");
			goto out;
		}
		/* A socket address, not an fd: QEMU 7.2 opens its preempt
		 * channel only to one. */
		snprintf(path, sizeof(path), "%s/mig-%u-src.sock", m->run_dir, m->id);
		if ((rc = ferry_pcguard_start(&guard, path, sp.max_streams, guard_adopt, sess, &err)))
			goto out;
		snprintf(uri, sizeof(uri), "unix:%s", path);
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
	mark(m, FERRY_MARK_LANE);
	if (sess && !sp.handoff) {
		/* A datagram device opens no more lanes than both ends have
		 * queues; the streams then share lanes: say so. */
		struct ferry_session_stats ss;
		ferry_session_stats(sess, &ss);
		if (ss.lanes_note[0]) {
			pthread_mutex_lock(&m->lock);
			snprintf(m->prog.transport, sizeof(m->prog.transport), "%s relay, %s", ferry_dp_driver_name(m->dp),
				 ss.lanes_note);
			pthread_mutex_unlock(&m->lock);
		}
	}
	if ((rc = ferry_qmp_executef(q, NULL, &err, "migrate", "{s:s}", "uri", uri)))
		goto out;
	mark(m, FERRY_MARK_MIGRATE);
	set_state(m, FERRY_MIG_ACTIVE);
	record(m, FERRY_PHASE_PERFORMING, NULL);

	uint64_t last_bytes = 0, stall_bytes = 0;
	bool postcopy_started = false;
	double active_t = since(&m->t0);
	double last_t = 0, stall_t = since(&m->t0);
	double switch_t = -1;
	for (;;) {
		json_t *info = NULL;
		if ((rc = ferry_qmp_execute(q, "query-migrate", NULL, &info, &err)))
			goto out;
		update_progress(m, info, &last_bytes, &last_t);
		const char *status = json_string_value(json_object_get(info, "status"));
		if (status && strcmp(status, "completed") == 0) {
			mark(m, FERRY_MARK_SENT);
			/* QEMU 7.2 says completed a moment before it fills in its
			 * timings (its migration thread needs the main loop's
			 * lock for that): read them again until they are there,
			 * soon at first (1, 2, 4 ... 64 ms; about 0.5 s in all). */
			for (int i = 0; i < 12 && ju(info, "total-time") == 0; i++) {
				json_t *again = NULL;
				struct timespec ts = { 0, (1L << (i < 6 ? i : 6)) * 1000000L };
				nanosleep(&ts, NULL);
				if (ferry_qmp_execute(q, "query-migrate", NULL, &again, &err))
					break;
				json_decref(info);
				info = again;
			}
			ferry_err_clear(&err);
			update_progress(m, info, &last_bytes, &last_t);
			mark(m, FERRY_MARK_TIMINGS);
			json_decref(info);
			struct ferry_session_stats fin;
			ferry_session_stats(sess, &fin);
			note_rel(m, &fin);
			src_completed = true;
			record(m, FERRY_PHASE_SENT, NULL);
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
		/* Postcopy: after the given time, or (auto) once QEMU begins a
		 * third pass over RAM because two did not converge. */
		bool switch_due = m->postcopy_after_ms == FERRY_POSTCOPY_AFTER_AUTO
					  ? ju(json_object_get(info, "ram"), "dirty-sync-count") >= FERRY_POSTCOPY_AUTO_PASSES
					  : since(&m->t0) - active_t >= m->postcopy_after_ms / 1000.0;
		if ((plan.features & FERRY_F_POSTCOPY) && !postcopy_started && status && strcmp(status, "active") == 0 &&
		    switch_due) {
			if ((rc = ferry_qmp_execute(q, "migrate-start-postcopy", NULL, NULL, &err))) {
				json_decref(info);
				goto out;
			}
			postcopy_started = true;
			pthread_mutex_lock(&m->lock);
			m->prog.postcopy_at_s = since(&m->t0);
			pthread_mutex_unlock(&m->lock);
			if (guard) {
				json_decref(info);
				struct ferry_err why = { 0 };
				if (postcopy_setup_wait(&jl, sp.id, &why) != 0 && why.code == 0)
					ferry_err_set(&why, EIO, "no acknowledgement from the destination daemon");
				if (why.code == 0 && ferry_pcguard_commit(guard) != 0)
					ferry_err_set(&why, EPIPE, "the destination loaded every device, but the data lanes "
							  "broke before ferry could commit to it: it lacks pages and must not run");
				if (why.code == 0) {
					/* From here the destination owns the VM. */
					record(m, FERRY_PHASE_SENT, "postcopy: the destination loaded every device");
					pc_committed = true;
					src_completed = true;
					if ((rc = peer_simple(&jl, "postcopy-go", sp.id, PEER_TIMEOUT_MS, NULL, &err))) {
						ferry_err_prefix(&err, "postcopy: the destination loaded every device but "
								 "could not be told to run the VM");
						goto out;
					}
					continue;
				}
				rescued = true;
				struct ferry_err e2 = { 0 };
				if (postcopy_rescue(m, q, guard, was_running, &e2) == 0)
					rc = ferry_err_set(&err, EIO, "postcopy set-up failed at the destination (%.400s); the "
							   "source VM was taken back and %s, nothing was lost", why.msg,
							   was_running ? "runs again" : "stays paused");
				else
					rc = ferry_err_set(&err, EIO, "postcopy set-up failed at the destination (%.300s) and "
							   "taking the source back failed too: %.300s", why.msg, e2.msg);
				goto out;
			}
		}
		bool in_postcopy = status && strncmp(status, "postcopy", 8) == 0;
		/* QEMU 10.2+ says postcopy-device until its destination acknowledged
		 * every device loaded; failing before that, it can be resumed. */
		bool qemu_setup = status && strcmp(status, "postcopy-device") == 0;
		if (in_postcopy && !qemu_setup && (!guard || pc_committed))
			src_completed = true; /* the destination may run the VM now: never resume the source */
		bool switching = status && (strcmp(status, "device") == 0 || strcmp(status, "pre-switchover") == 0 ||
					    in_postcopy);
		bool postcopy_paused = in_postcopy && strcmp(status, "postcopy-paused") == 0;
		json_decref(info); /* status points into it: not used below */
		if (postcopy_paused && pc_committed && pc_recoveries < POSTCOPY_MAX_RECOVERIES) {
			/* The destination runs the VM: only going on can save it. */
			if ((rc = postcopy_recover(m, &jl, q, &sess, &sp, streams, ++pc_recoveries, &err)))
				goto out;
			continue;
		}
		if (postcopy_paused) {
			rc = ferry_err_set(&err, EIO, "postcopy paused: the stream to the destination broke after the switch%s",
					   pc_committed ? " and recovering it failed too often" : "");
			goto out;
		}
		if (switching) {
			if (switch_t < 0)
				switch_t = since(&m->t0);
			/* Postcopy lasts as long as the remaining RAM takes: no bound. */
			if (!in_postcopy && since(&m->t0) - switch_t > SWITCHOVER_TIMEOUT_S) {
				src_completed = true; /* outcome unknown: never resume */
				rc = ferry_err_set(&err, ETIMEDOUT, "the source QEMU stayed in its final phase for %d s",
						   SWITCHOVER_TIMEOUT_S);
				goto out;
			}
			/* Until the next look in 10 ms, or at once on QEMU's
			 * "completed" event. */
			ferry_qmp_wait_event(q, 10);
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
		note_rel(m, &ss);
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
		/* Until the next look or QEMU's next event (a MIGRATION status
		 * change ends the wait at once). A dead monitor fails the next
		 * query-migrate, which says why. */
		ferry_qmp_wait_event(q, POLL_INTERVAL_MS);
	}

	if (plan.features & FERRY_F_NBD) {
		/* The VM is stopped: the mirrors bring the destination's disks to
		 * the switch-over state. Until Finish the destination keeps its VM
		 * paused, so a failure here still leaves the VM to the source. */
		if ((rc = disks_complete(m, q, &err))) {
			src_completed = false;
			ferry_err_prefix(&err, "the disks could not be brought in sync; the source keeps the VM");
			goto out;
		}
		disks_cleanup(m, q);
	}
	/* Finish (v3, step 4): the destination checks its QEMU loaded
	 * everything, resumes the VM if it ran here, and answers. */
	json_t *fin = NULL;
	pthread_mutex_lock(&m->lock);
	mine.flags |= FERRY_COOKIE_STATS;
	mine.stats.ram_total = m->prog.ram_total;
	mine.stats.ram_transferred = m->prog.ram_transferred;
	mine.stats.total_time_ms = (uint64_t)(m->prog.total_s * 1000.0);
	mine.stats.setup_time_ms = (uint64_t)(m->prog.setup_s * 1000.0);
	mine.stats.downtime_ms = (uint64_t)m->prog.downtime_ms;
	pthread_mutex_unlock(&m->lock);
	char *fin_xml = NULL;
	if ((rc = ferry_cookie_format(&mine, &fin_xml, &err)))
		goto out;
	log_cookie(m, "perform", fin_xml);
	json_t *freq = json_pack("{s:s, s:I, s:b, s:s}", "cmd", "migrate-finish", "session", (json_int_t)sp.id, "resume",
				 was_running && !m->suspend, "cookie", fin_xml);
	free(fin_xml);
	rc = freq ? ferry_jl_call(&jl, freq, FINISH_TIMEOUT_MS, &fin, &err) : ferry_err_set(&err, ENOMEM, "out of memory");
	json_decref(freq);
	prepared = false;
	if (rc) {
		ferry_err_prefix(&err, "destination did not complete");
		goto out;
	}
	mark(m, FERRY_MARK_FINISHED);
	dst_ms(m, json_object_get(fin, "timing"), "wait_ms", &m->prog.dst_finish_wait_ms);
	dst_ms(m, json_object_get(fin, "timing"), "total_ms", &m->prog.dst_finish_ms);
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
	/* Confirm (v3, step 5): the VM lives on the destination now; end the
	 * source QEMU so it can never be resumed by mistake. */
	if (!m->keep_source) {
		struct ferry_err e2 = { 0 };
		const char *what = ferry_qmp_execute(q, "quit", NULL, NULL, &e2) == 0 ? "ended" : "postmigrate";
		pthread_mutex_lock(&m->lock);
		snprintf(m->prog.src_vm_status, sizeof(m->prog.src_vm_status), "%s", what);
		pthread_mutex_unlock(&m->lock);
	}
	goto out;

cancel:
	final = FERRY_MIG_CANCELLED;
	ferry_err_clear(&err);
	ferry_err_set(&err, ECANCELED, "cancelled by the user");
out:
	if (final != FERRY_MIG_COMPLETED) {
		/* The mirrors go first: the source's disks stay as they are. */
		disks_cleanup(m, q);
		if (prepared && jl.fd >= 0) {
			struct ferry_err e2 = { 0 };
			(void)peer_simple(&jl, "migrate-abort", sp.id, 5000, NULL, &e2);
		}
		if (sess)
			ferry_session_abort(sess, err.msg[0] ? err.msg : "migration failed");
		/* The transport may have failed just as the source completed. */
		json_t *info = NULL;
		struct ferry_err e3 = { 0 };
		if (!src_completed && !rescued && q && ferry_qmp_execute(q, "query-migrate", NULL, &info, &e3) == 0) {
			const char *now = json_string_value(json_object_get(info, "status"));
			src_completed = now && strcmp(now, "completed") == 0;
		}
		json_decref(info);
		if (rescued) {
			/* postcopy_rescue already put the VM back (or said why not) */
		} else if (src_completed) {
			report_unknown_outcome(m, q, &err);
			record(m, FERRY_PHASE_UNKNOWN, err.msg);
		} else {
			recover_source(m, q, was_running);
			record(m, final == FERRY_MIG_CANCELLED ? FERRY_PHASE_CANCELLED : FERRY_PHASE_FAILED, err.msg);
		}
	} else {
		record(m, FERRY_PHASE_DONE, m->keep_source ? "source kept paused" : "source ended");
	}
	ferry_session_close(sess);
	ferry_pcguard_stop(guard);
	ferry_jl_close(&jl);
	ferry_qmp_close(q);
	mark(m, FERRY_MARK_END);
	pthread_mutex_lock(&m->lock);
	m->prog.state = final;
	m->prog.elapsed_s = since(&m->t0);
	if (final != FERRY_MIG_COMPLETED)
		snprintf(m->prog.error, sizeof(m->prog.error), "%s", err.msg[0] ? err.msg : "migration failed");
	m->done = true;
	pthread_cond_broadcast(&m->ended);
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
	m->keep_source = p->keep_source;
	m->max_bandwidth = p->max_bandwidth;
	m->suspend = p->suspend;
	m->postcopy = p->postcopy;
	m->force_postcopy = p->force_postcopy;
	m->postcopy_after_ms = p->postcopy_after_ms;
	m->require = p->require;
	m->disabled = p->disabled;
	m->transport = p->transport;
	snprintf(m->hostname, sizeof(m->hostname), "%s", p->hostname ? p->hostname : "localhost");
	snprintf(m->hostuuid, sizeof(m->hostuuid), "%s", p->hostuuid ? p->hostuuid : "");
	m->rec = (struct ferry_state_record){ .id = id, .role = FERRY_ROLE_SOURCE };
	snprintf(m->rec.peer, sizeof(m->rec.peer), "%s", p->peer);
	snprintf(m->rec.qmp, sizeof(m->rec.qmp), "%s", p->src_qmp);
	snprintf(m->rec.peer_qmp, sizeof(m->rec.peer_qmp), "%s", p->dst_qmp);
	if ((p->state_dir && !(m->state_dir = strdup(p->state_dir))) ||
	    (p->cookie_log && !(m->cookie_log = strdup(p->cookie_log)))) {
		ferry_migration_free(m);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	if (p->ndisks > FERRY_MIG_MAX_DISKS || p->nshared > FERRY_MIG_MAX_SHARED) {
		ferry_migration_free(m);
		return ferry_err_set(err, EINVAL, "at most %d --disk and %d --shared-dir", FERRY_MIG_MAX_DISKS,
				     FERRY_MIG_MAX_SHARED);
	}
	if (p->ndisks && !p->nbd) {
		ferry_migration_free(m);
		return ferry_err_set(err, ENOTSUP, "this daemon has no NBD path for storage migration");
	}
	m->nbd = p->nbd;
	for (unsigned k = 0; k < p->ndisks; k++) {
		const char *n = p->disks[k];
		size_t len = n ? strlen(n) : 0;
		bool ok = len > 0 && len <= FERRY_COOKIE_TARGET_MAX;
		for (size_t c = 0; ok && c < len; c++)
			ok = (n[c] >= 'a' && n[c] <= 'z') || (n[c] >= 'A' && n[c] <= 'Z') || (n[c] >= '0' && n[c] <= '9') ||
			     n[c] == '_' || n[c] == '-';
		for (unsigned j = 0; ok && j < k; j++)
			ok = strcmp(m->disks[j].name, n) != 0;
		if (!ok) {
			ferry_migration_free(m);
			return ferry_err_set(err, EINVAL, "--disk '%s': a disk is named once, by 1 to %d of A-Z a-z 0-9 _ -",
					     n ? n : "", FERRY_COOKIE_TARGET_MAX);
		}
		memcpy(m->disks[k].name, n, len + 1);
		m->disks[k].nbd_id = p->nbd_ids[k];
	}
	m->ndisks = p->ndisks;
	for (unsigned k = 0; k < p->nshared; k++) {
		if (!p->shared_dirs[k] || p->shared_dirs[k][0] != '/') {
			ferry_migration_free(m);
			return ferry_err_set(err, EINVAL, "--shared-dir '%s' must be an absolute path",
					     p->shared_dirs[k] ? p->shared_dirs[k] : "");
		}
		if (!(m->shared[k] = strdup(p->shared_dirs[k]))) {
			ferry_migration_free(m);
			return ferry_err_set(err, ENOMEM, "out of memory");
		}
		m->nshared = k + 1;
	}
	m->stall_timeout_s = p->stall_timeout_s > 0 ? p->stall_timeout_s : 120;
	pthread_mutex_init(&m->lock, NULL);
	pthread_condattr_t ca;
	if (pthread_condattr_init(&ca) == 0) {
		(void)pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		(void)pthread_cond_init(&m->ended, &ca);
		pthread_condattr_destroy(&ca);
	} else {
		(void)pthread_cond_init(&m->ended, NULL);
	}
	clock_gettime(CLOCK_MONOTONIC, &m->t0);
	m->prog.t0_mono = (double)m->t0.tv_sec + (double)m->t0.tv_nsec / 1e9;
	m->prog.dst_qmp_ms = m->prog.dst_probe_ms = m->prog.dst_prepare_ms = -1;
	m->prog.dst_finish_wait_ms = m->prog.dst_finish_ms = -1;
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

bool ferry_migration_wait(struct ferry_migration *m, int timeout_ms)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += timeout_ms / 1000;
	until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&m->lock);
	while (!m->done && pthread_cond_timedwait(&m->ended, &m->lock, &until) == 0)
		;
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
	pthread_cond_destroy(&m->ended);
	pthread_mutex_destroy(&m->lock);
	free(m->src_qmp);
	free(m->dst_qmp);
	free(m->peer);
	free(m->run_dir);
	free(m->state_dir);
	free(m->cookie_log);
	for (unsigned k = 0; k < m->nshared; k++)
		free(m->shared[k]);
	free(m);
}
