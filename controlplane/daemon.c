#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../drivers/hostport.h"
#include "jsonline.h"
#include "migrate.h"
#include "nbdpath.h"
#include "pinlisten.h"
#include "plan.h"
#include "probe.h"
#include "recover.h"
#include "spawn.h"
#include "state.h"
#include "qmp.h"
#include "tunnel.h"

#define REQ_TIMEOUT_MS   30000
#define QMP_TIMEOUT_MS   10000
#define SPAWN_TIMEOUT_S  60   /* a started QEMU's monitor must come up by then */
#define MAX_ENTRIES      256
#define REGION_MAX_BYTES (64ull << 30)
#define REGION_BUDGET_BYTES (64ull << 30) /* all peer regions of one daemon together */

/* A destination-side session and what belongs to it. */
struct dst_entry {
	uint32_t id;
	struct ferry_session *sess;
	struct ferry_qmp *qmp;   /* migrations: the destination QEMU */
	uint8_t *region;
	size_t region_len;
	char sock_path[PATH_MAX];
	bool unlink_sock;
	struct daemon *d;   /* set when region bytes were charged to its budget */
	uint64_t charged;
	uint64_t window;    /* flow-control window agreed with the source */
	/* A destination QEMU this daemon started (spawn_cmd != NULL): ended
	 * with the session unless the migration succeeded (spawn_keep). */
	struct ferry_spawn_cmd *spawn_cmd;
	struct ferry_spawned spawned;
	bool spawn_files;   /* its RAM files were made by us */
	bool spawn_keep;
	char qmp_path[PATH_MAX];
	char pidfile[PATH_MAX];
	/* Guarded postcopy: our QEMU keeps the VM paused after the switch until
	 * the source, told the devices loaded, says go. Without go it must die. */
	bool pc_guarded, pc_go;
	unsigned pc_recoveries;   /* new sessions after cut lanes */
	unsigned pc_streams;      /* QEMU's channels: main (+ preempt) */
	/* Storage migration: our QEMU's NBD server (nbd-server-start) on this
	 * socket in the run dir; the VM stays paused until Finish, and a copy
	 * that never got there must not run (its disks may be incomplete). */
	char nbd_sock[PATH_MAX];
	bool nbd_started, nbd_guarded, nbd_finished;
	/* Multifd handoff: our QEMU listens on a socket pinned to the source
	 * host; the session's one lane only proves the source holds the token. */
	bool direct;
};

/* A source-side tunnel opened from the admin socket: one session for a fixed
 * number of connections, or standing (a session per connection, for ever). */
struct src_tunnel {
	uint32_t id;
	struct ferry_session *sess;
	struct ferry_standing_tunnel *standing;
	struct ferry_jl ctl;
	char listen[PATH_MAX];
};

struct mig_entry {
	uint32_t id;
	struct ferry_migration *m;
};

struct daemon {
	const struct ferry_daemon_config *cfg;
	char run_dir[PATH_MAX];
	char allow[FERRY_MAX_ALLOW_DIRS + 1][PATH_MAX];
	unsigned nallow;
	struct ferry_dp *dp;
	char endpoint[FERRY_DP_ENDPOINT_MAX];
	pthread_mutex_t lock;
	struct dst_entry *dst[MAX_ENTRIES];
	struct src_tunnel *tun[MAX_ENTRIES];
	struct mig_entry mig[MAX_ENTRIES];
	uint32_t next_id;
	unsigned active_conns;     /* peer connections */
	unsigned active_admin;     /* admin connections, counted apart so peers cannot lock admins out */
	dev_t admin_dev;
	ino_t admin_ino;
	uint64_t region_bytes;     /* destination regions allocated for peers, bounded */
	char hostname[FERRY_COOKIE_HOSTNAME_MAX + 1];
	char hostuuid[FERRY_COOKIE_UUID_LEN + 1];
	char state_dir[PATH_MAX];  /* durable migration records (state.h) */
	struct ferry_nbd_registry *nbd; /* NBD paths (nbdpath.h) */
};

#define MAX_CONNS 128
#define MAX_ADMIN_CONNS 32
#define MAX_OWNED 64

struct conn {
	struct daemon *d;
	int fd;
	bool admin;
	/* destination sessions this peer connection created: if the peer goes
	 * away (its daemon died) they are torn down, never left behind */
	uint32_t owned[MAX_OWNED];
	unsigned nowned;
};

static void conn_own(struct conn *c, json_t *reply)
{
	json_t *id = json_object_get(reply, "session");
	if (reply && json_is_integer(id) && c->nowned < MAX_OWNED)
		c->owned[c->nowned++] = (uint32_t)json_integer_value(id);
}

/* A closed session no longer counts against the connection's limit: a
 * standing tunnel opens one session per carried connection, for ever. */
static void conn_disown(struct conn *c, json_t *req)
{
	json_t *id = json_object_get(req, "session");
	for (unsigned i = 0; json_is_integer(id) && i < c->nowned; i++) {
		if (c->owned[i] == (uint32_t)json_integer_value(id)) {
			c->owned[i] = c->owned[--c->nowned];
			return;
		}
	}
}

/* Session commands act only on sessions this connection created: ids are not
 * secrets, and another peer must not finish or abort someone's migration. */
static bool conn_owns(const struct conn *c, json_t *req)
{
	json_t *id = json_object_get(req, "session");
	if (!json_is_integer(id))
		return true; /* the handler reports the malformed id */
	for (unsigned i = 0; i < c->nowned; i++)
		if (c->owned[i] == (uint32_t)json_integer_value(id))
			return true;
	return false;
}

static void logf_(struct daemon *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(struct daemon *d, const char *fmt, ...)
{
	va_list ap;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	char line[1024];
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "ferryd[%ld.%03ld]: %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000000, line);
	(void)d;
}

/* CLOCK_MONOTONIC in ms, for the timings a reply reports. */
static double mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static uint32_t new_id(struct daemon *d)
{
	uint32_t r;
	if (getrandom(&r, sizeof(r), 0) != sizeof(r))
		r = 0;
	pthread_mutex_lock(&d->lock);
	/* Random high bits keep ids of two daemons (or restarts) apart. */
	uint32_t id = (r & 0xffff0000u) | (++d->next_id & 0xffffu);
	pthread_mutex_unlock(&d->lock);
	return id;
}

/* ---- paths a peer may name ---------------------------------------------- */

static bool under(const char *path, const char *dir)
{
	size_t n = strlen(dir);
	return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

/* Where a peer-named socket may be. QMP sockets of VMs being migrated may sit
 * in the run dir or an --allow-dir; tunnel targets only in an --allow-dir,
 * because the run dir also holds this daemon's own sockets. */
enum path_scope { SCOPE_RUN_AND_ALLOWED, SCOPE_ALLOWED_ONLY };

/* Resolve a peer-supplied socket path: a bare name means DIR/name (run dir,
 * or the first --allow-dir for tunnel targets); an absolute path must lie
 * (after resolving its directory) inside a permitted dir. The last component
 * must not be a symbolic link, and never this daemon's admin socket: nothing
 * a peer sends can point this host elsewhere. */
static int resolve_peer_path(struct daemon *d, const char *in, enum path_scope scope, char *out, size_t outlen,
			     struct ferry_err *err)
{
	unsigned first = scope == SCOPE_ALLOWED_ONLY ? 1 : 0; /* allow[0] is the run dir */
	if (!in || !in[0])
		return ferry_err_set(err, EINVAL, "empty socket path");
	if (strlen(in) >= PATH_MAX)
		return ferry_err_set(err, ENAMETOOLONG, "socket path too long");
	if (first >= d->nallow)
		return ferry_err_set(err, EPERM, "this daemon serves no --allow-dir, so a peer may not name sockets here");
	char dirbuf[PATH_MAX], real[PATH_MAX];
	const char *base;
	if (in[0] != '/') {
		if (strchr(in, '/') || strcmp(in, ".") == 0 || strcmp(in, "..") == 0)
			return ferry_err_set(err, EPERM, "socket name '%s' must be a plain name or an absolute path", in);
		strcpy(real, d->allow[first]);
		base = in;
	} else {
		strcpy(dirbuf, in);
		char *dir = dirname(dirbuf);
		if (!realpath(dir, real))
			return ferry_err_set(err, errno, "socket directory of '%s': %s", in, strerror(errno));
		base = strrchr(in, '/') + 1;
		if (!base[0] || strcmp(base, "..") == 0 || strcmp(base, ".") == 0)
			return ferry_err_set(err, EPERM, "'%s' does not name a socket", in);
		unsigned i;
		for (i = first; i < d->nallow && !under(real, d->allow[i]); i++)
			;
		if (i == d->nallow)
			return ferry_err_set(err, EPERM, "'%s' is outside the directories this daemon lets peers name%s",
					     in, scope == SCOPE_ALLOWED_ONLY ? " (--allow-dir)" : " (its run dir and --allow-dir)");
	}
	if ((size_t)snprintf(out, outlen, "%s/%s", real, base) >= outlen)
		return ferry_err_set(err, ENAMETOOLONG, "socket path too long");
	struct stat st;
	if (lstat(out, &st) == 0) {
		if (S_ISLNK(st.st_mode))
			return ferry_err_set(err, EPERM, "'%s' is a symbolic link; peers may not name links", in);
		if (st.st_dev == d->admin_dev && st.st_ino == d->admin_ino)
			return ferry_err_set(err, EPERM, "'%s' is this daemon's admin socket", in);
	}
	return 0;
}

/* ---- replies ------------------------------------------------------------- */

static json_t *reply_ok(void)
{
	return json_pack("{s:b}", "ok", 1);
}

static json_t *reply_err(const char *msg)
{
	return json_pack("{s:b, s:s}", "ok", 0, "error", msg);
}

static const char *req_str(json_t *req, const char *key)
{
	return json_string_value(json_object_get(req, key));
}

static int req_uint(json_t *req, const char *key, unsigned def, unsigned max, unsigned *out, struct ferry_err *err)
{
	json_t *v = json_object_get(req, key);
	if (!v) {
		*out = def;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < 0 || (json_int_t)max < json_integer_value(v))
		return ferry_err_set(err, EINVAL, "\"%s\" must be an integer from 0 to %u", key, max);
	*out = (unsigned)json_integer_value(v);
	return 0;
}

static int req_u64(json_t *req, const char *key, uint64_t *out, struct ferry_err *err)
{
	json_t *v = json_object_get(req, key);
	if (!json_is_integer(v) || json_integer_value(v) < 0)
		return ferry_err_set(err, EINVAL, "\"%s\" must be a non-negative integer", key);
	*out = (uint64_t)json_integer_value(v);
	return 0;
}

static void hex(const uint8_t *in, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", in[i]);
}

/* A datagram lane's reliability counters (docs/wire-format.md, "Counters"). */
static json_t *rel_json(const struct ferry_rel_stats *r)
{
	return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I,"
			 " s:I, s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
			 "tx_datagrams", (json_int_t)r->tx_datagrams, "tx_data", (json_int_t)r->tx_data, "retransmits",
			 (json_int_t)r->retransmits, "retx_timeout", (json_int_t)r->retx_timeout, "retx_sack",
			 (json_int_t)r->retx_sack, "tlp_probes", (json_int_t)r->tlp_probes, "timeouts",
			 (json_int_t)r->timeouts, "loss_events", (json_int_t)r->loss_events, "rx_datagrams",
			 (json_int_t)r->rx_datagrams, "dup_drops", (json_int_t)r->dup_drops, "corrupt_drops",
			 (json_int_t)r->corrupt_drops, "reorder_buffered", (json_int_t)r->reorder_buffered,
			 "window_drops", (json_int_t)r->window_drops, "malformed_drops", (json_int_t)r->malformed_drops,
			 "cwnd", (json_int_t)r->cwnd, "srtt_us", (double)r->srtt_ns / 1e3, "rto_ms", (double)r->rto_ns / 1e6,
			 "inflight_bytes", (json_int_t)r->inflight_bytes, "fault_dropped", (json_int_t)r->fault_dropped,
			 "fault_duplicated", (json_int_t)r->fault_duplicated, "fault_reordered",
			 (json_int_t)r->fault_reordered, "fault_corrupted", (json_int_t)r->fault_corrupted, "tx_by_ref",
			 (json_int_t)r->tx_by_ref, "spurious_timeouts", (json_int_t)r->spurious_timeouts);
}

static json_t *session_stats_json(struct ferry_session *s)
{
	struct ferry_session_stats st;
	ferry_session_stats(s, &st);
	static const char *const names[] = { "connecting", "active", "failed", "closed" };
	json_t *lanes = json_array();
	for (unsigned i = 0; i < st.lanes; i++) {
		json_t *l = json_pack("{s:I, s:I, s:I, s:I, s:f}", "tx_bytes", (json_int_t)st.lane[i].tx_bytes, "rx_bytes",
				      (json_int_t)st.lane[i].rx_bytes, "tx_frames", (json_int_t)st.lane[i].tx_frames,
				      "rx_frames", (json_int_t)st.lane[i].rx_frames, "idle_pct", st.lane[i].idle_pct);
		if (l && st.lane[i].reliable)
			json_object_set_new(l, "reliable", rel_json(&st.lane[i].rel));
		json_array_append_new(lanes, l);
	}
	json_t *r = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:I, s:I, s:s, s:o}", "state", names[st.state], "lanes",
			      (int)st.lanes, "lanes_up", (int)st.lanes_up, "streams_opened", (int)st.streams_opened,
			      "streams_closed", (int)st.streams_closed, "streams_refused", (int)st.streams_refused,
			      "tx_bytes", (json_int_t)st.tx_bytes, "rx_bytes", (json_int_t)st.rx_bytes, "error", st.error,
			      "lane", lanes);
	if (r && st.reliable)
		json_object_set_new(r, "reliable", rel_json(&st.rel));
	if (r && st.lanes_note[0]) /* fewer lanes than asked: a device with fewer queues */
		json_object_set_new(r, "lanes_note", json_string(st.lanes_note));
	return r;
}

/* ---- destination side --------------------------------------------------- */

/* A started destination QEMU outlives the session only if it runs the VM. */
static void dst_spawned_end(struct dst_entry *e)
{
	if (!e->spawn_cmd)
		return;
	if (e->spawned.pid > 0 && e->spawn_keep) {
		logf_(e->d, "session %u: the destination QEMU it started (pid %d) runs on, detached", e->id,
		      (int)e->spawned.pid);
		ferry_spawn_release(&e->spawned);
	} else if (e->spawned.pid > 0) {
		logf_(e->d, "session %u: ending the destination QEMU it started (pid %d)", e->id, (int)e->spawned.pid);
		ferry_spawn_kill(&e->spawned, 5000);
		unlink(e->pidfile);
		unlink(e->qmp_path);
	}
	if (e->spawn_files && !e->spawn_keep)
		ferry_spawn_remove_ram(e->spawn_cmd);
	if (!e->spawn_keep)
		ferry_spawn_remove_images(e->spawn_cmd);
	ferry_spawn_cmd_free(e->spawn_cmd);
	free(e->spawn_cmd);
	e->spawn_cmd = NULL;
}

static void dst_free(struct dst_entry *e)
{
	if (!e)
		return;
	ferry_session_close(e->sess);
	if (e->nbd_started && e->qmp) {
		struct ferry_err qe = { 0 };
		(void)ferry_qmp_execute(e->qmp, "nbd-server-stop", NULL, NULL, &qe);
	}
	if (e->nbd_sock[0])
		unlink(e->nbd_sock);
	if (e->nbd_guarded && !e->nbd_finished && e->qmp) {
		struct ferry_err qe = { 0 };
		(void)ferry_qmp_execute(e->qmp, "quit", NULL, NULL, &qe);
	}
	if (e->pc_guarded && !e->pc_go && e->qmp) {
		/* The source may have taken the VM back: this paused copy must
		 * never be resumed by anyone. */
		struct ferry_err qe = { 0 };
		(void)ferry_qmp_execute(e->qmp, "quit", NULL, NULL, &qe);
	}
	ferry_qmp_close(e->qmp);
	e->qmp = NULL;
	dst_spawned_end(e);
	if (e->region)
		munmap(e->region, e->region_len);
	if (e->d && e->charged) {
		pthread_mutex_lock(&e->d->lock);
		e->d->region_bytes -= e->charged;
		pthread_mutex_unlock(&e->d->lock);
	}
	if (e->unlink_sock)
		unlink(e->sock_path);
	free(e);
}

static int dst_insert(struct daemon *d, struct dst_entry *e, struct ferry_err *err)
{
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		if (!d->dst[i]) {
			d->dst[i] = e;
			pthread_mutex_unlock(&d->lock);
			return 0;
		}
	}
	pthread_mutex_unlock(&d->lock);
	return ferry_err_set(err, ENOSPC, "too many sessions on this daemon");
}

static struct dst_entry *dst_take(struct daemon *d, uint32_t id)
{
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		if (d->dst[i] && d->dst[i]->id == id) {
			struct dst_entry *e = d->dst[i];
			d->dst[i] = NULL;
			pthread_mutex_unlock(&d->lock);
			return e;
		}
	}
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

static json_t *session_reply(struct daemon *d, struct dst_entry *e, const uint8_t *token)
{
	char tok[2 * FERRY_TOKEN_LEN + 1];
	hex(token, FERRY_TOKEN_LEN, tok);
	return json_pack("{s:b, s:I, s:s, s:s, s:I}", "ok", 1, "session", (json_int_t)e->id, "token", tok, "endpoint",
			 d->endpoint, "window", (json_int_t)e->window);
}


static int dst_session_open(struct daemon *d, struct dst_entry *e, unsigned lanes, unsigned streams,
			    const char *target, bool handoff, uint8_t *token, struct ferry_err *err);

/* target NULL: a migration stream socket in the run dir, named after the session. */
static int new_dst_session(struct daemon *d, struct dst_entry *e, unsigned lanes, unsigned streams,
			   const char *target, bool handoff, uint8_t *token, struct ferry_err *err)
{
	e->id = new_id(d);
	return dst_session_open(d, e, lanes, streams, target, handoff, token, err);
}

/* Open e's data-plane session under e->id with a fresh token. */
static int dst_session_open(struct daemon *d, struct dst_entry *e, unsigned lanes, unsigned streams,
			    const char *target, bool handoff, uint8_t *token, struct ferry_err *err)
{
	if (getrandom(token, FERRY_TOKEN_LEN, 0) != FERRY_TOKEN_LEN)
		return ferry_err_set(err, EIO, "no randomness for the session token");
	if (handoff) {
		target = "";
		lanes = 1;
	} else if (!target) {
		if ((size_t)snprintf(e->sock_path, sizeof(e->sock_path), "%s/mig-%u-dst.sock", d->run_dir, e->id) >=
		    sizeof(e->sock_path))
			return ferry_err_set(err, ENAMETOOLONG, "run directory path too long");
		target = e->sock_path;
	}
	struct ferry_session_params sp = { .id = e->id, .lanes = lanes ? lanes : streams, .max_streams = streams,
					   .unix_path = target[0] ? target : NULL, .timeout_ms = 10000, .handoff = handoff,
					   .window = e->window };
	memcpy(sp.token, token, FERRY_TOKEN_LEN);
	return ferry_session_create_dst(d->dp, &sp, &e->sess, err);
}

/* A generic tunnel: streams to a socket named by the source side. */
static json_t *peer_session_open(struct daemon *d, json_t *req, struct ferry_err *err)
{
	unsigned streams, lanes;
	uint64_t region_bytes = 0;
	if (req_uint(req, "streams", 1, FERRY_MAX_STREAMS, &streams, err) ||
	    req_uint(req, "lanes", 0, FERRY_MAX_LANES, &lanes, err))
		return NULL;
	if (json_object_get(req, "region_bytes") && req_u64(req, "region_bytes", &region_bytes, err))
		return NULL;
	if (streams == 0) {
		ferry_err_set(err, EINVAL, "\"streams\" must be at least 1");
		return NULL;
	}
	if (region_bytes > REGION_MAX_BYTES) {
		ferry_err_set(err, EINVAL, "region of %" PRIu64 " bytes is over the %llu byte limit", region_bytes,
			      (unsigned long long)REGION_MAX_BYTES);
		return NULL;
	}
	struct dst_entry *e = calloc(1, sizeof(*e));
	if (!e) {
		ferry_err_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	e->window = ferry_agree_window(json_object_get(req, "window"), ferry_dp_window(d->dp));
	const char *target = req_str(req, "target");
	if (target && resolve_peer_path(d, target, SCOPE_ALLOWED_ONLY, e->sock_path, sizeof(e->sock_path), err))
		goto fail;
	uint8_t token[FERRY_TOKEN_LEN];
	if (!target && !region_bytes) {
		ferry_err_set(err, EINVAL, "session-open needs a \"target\" socket or a region");
		goto fail;
	}
	if (new_dst_session(d, e, lanes, streams, target ? e->sock_path : "", false, token, err))
		goto fail;
	if (region_bytes) {
		pthread_mutex_lock(&d->lock);
		bool over = d->region_bytes + region_bytes > REGION_BUDGET_BYTES;
		if (!over)
			d->region_bytes += region_bytes;
		pthread_mutex_unlock(&d->lock);
		if (over) {
			ferry_err_set(err, ENOMEM, "region of %" PRIu64 " bytes is over this daemon's budget for peer regions (%llu bytes)",
				      region_bytes, (unsigned long long)REGION_BUDGET_BYTES);
			goto fail;
		}
		e->charged = region_bytes;
		e->d = d;
		/* Populate now: first touch of fresh memory would otherwise be timed. */
		e->region = mmap(NULL, region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (e->region == MAP_FAILED) {
			e->region = NULL;
			ferry_err_set(err, errno, "cannot allocate a %" PRIu64 " byte region: %s", region_bytes, strerror(errno));
			goto fail;
		}
		e->region_len = region_bytes;
		if (ferry_region_add(e->sess, 0, e->region, e->region_len, err))
			goto fail;
	}
	if (dst_insert(d, e, err))
		goto fail;
	json_t *r = session_reply(d, e, token);
	/* CPU so far, so a benchmark can leave set-up (pre-faulting) out. */
	json_object_set_new(r, "cpu_s", json_real(cpu_seconds()));
	return r;
fail:
	dst_free(e);
	return NULL;
}

/* The destination's durable record of a migration session. */
static void dst_record(struct daemon *d, uint32_t id, enum ferry_state_phase phase, const char *vm, const char *peer,
		       const char *qmp, pid_t spawned, const char *note)
{
	struct ferry_state_record r = { .id = id, .role = FERRY_ROLE_DESTINATION, .phase = phase,
					.spawned_pid = spawned > 0 ? spawned : 0 };
	struct ferry_err e = { 0 };
	if (phase != FERRY_PHASE_PREPARED && ferry_state_read(d->state_dir, FERRY_ROLE_DESTINATION, id, &r, &e) == 0) {
		r.phase = phase; /* keep what prepare recorded */
	} else {
		snprintf(r.vm, sizeof(r.vm), "%s", vm ? vm : "");
		snprintf(r.peer, sizeof(r.peer), "%s", peer ? peer : "");
		snprintf(r.qmp, sizeof(r.qmp), "%s", qmp ? qmp : "");
	}
	snprintf(r.note, sizeof(r.note), "%s", note ? note : "");
	ferry_err_clear(&e);
	if (ferry_state_write(d->state_dir, &r, &e))
		logf_(d, "session %u: cannot record its phase '%s': %s", id, ferry_state_phase_name(phase), e.msg);
}

/* A JSON array of feature names (the user's --require) as FERRY_F_* bits. */
static int req_features(json_t *req, const char *key, uint32_t *out, struct ferry_err *err)
{
	*out = 0;
	json_t *a = json_object_get(req, key);
	if (!a)
		return 0;
	if (!json_is_array(a))
		return ferry_err_set(err, EINVAL, "\"%s\" must be a list of feature names", key);
	size_t i;
	json_t *v;
	json_array_foreach(a, i, v) {
		uint32_t f = json_is_string(v) ? ferry_feature_parse(json_string_value(v)) : 0;
		if (!f)
			return ferry_err_set(err, EINVAL, "\"%s\" names an unknown feature", key);
		*out |= f;
	}
	return 0;
}

/* Storage migration, destination (docs/protocol.md): each disk of the
 * source's <nbd> must be a disk of our QEMU at least as large; our QEMU's NBD
 * server listens on a socket in our run dir and exports each one writable
 * under the source's name for it; our cookie tells the socket and sizes.
 * Autostart goes off (stop while incoming), so the VM runs here only once
 * Finish says so, after the mirrors ended. */
static int dst_nbd_setup(struct daemon *d, struct dst_entry *e, const struct ferry_cookie *theirs,
			 struct ferry_cookie *mine, struct ferry_err *err)
{
	json_t *blocks = NULL;
	int rc = ferry_qmp_execute(e->qmp, "query-block", NULL, &blocks, err);
	if (rc)
		return rc;
	char nodes[FERRY_COOKIE_MAX_DISKS][128];
	mine->nbd.ndisks = 0;
	for (size_t k = 0; k < theirs->nbd.ndisks && rc == 0; k++) {
		const struct ferry_cookie_disk *sd = &theirs->nbd.disks[k];
		size_t i;
		json_t *b, *found = NULL;
		json_array_foreach(blocks, i, b) {
			json_t *ins = json_object_get(b, "inserted");
			const char *device = json_string_value(json_object_get(b, "device"));
			const char *qdev = json_string_value(json_object_get(b, "qdev"));
			const char *node = json_string_value(json_object_get(ins, "node-name"));
			if (ins && ((device && strcmp(device, sd->target) == 0) || (qdev && strcmp(qdev, sd->target) == 0) ||
				    (node && strcmp(node, sd->target) == 0)))
				found = ins;
		}
		json_t *vs = json_object_get(json_object_get(found, "image"), "virtual-size");
		const char *node = json_string_value(json_object_get(found, "node-name"));
		if (!found || !node)
			rc = ferry_err_set(err, ENOENT, "the destination QEMU has no disk '%s' to receive it", sd->target);
		else if (json_is_true(json_object_get(found, "ro")))
			rc = ferry_err_set(err, EROFS, "the destination's disk '%s' is read-only", sd->target);
		else if (!json_is_integer(vs) || (uint64_t)json_integer_value(vs) < sd->capacity)
			rc = ferry_err_set(err, ENOSPC, "the destination's disk '%s' has %" PRIu64 " bytes, the source's %" PRIu64,
					   sd->target, json_is_integer(vs) ? (uint64_t)json_integer_value(vs) : 0, sd->capacity);
		else {
			snprintf(nodes[k], sizeof(nodes[k]), "%s", node);
			mine->nbd.disks[k] = (struct ferry_cookie_disk){ .capacity = (uint64_t)json_integer_value(vs) };
			memcpy(mine->nbd.disks[k].target, sd->target, sizeof(sd->target));
			mine->nbd.ndisks++;
		}
	}
	json_decref(blocks);
	if (rc)
		return rc;
	if ((size_t)snprintf(e->nbd_sock, sizeof(e->nbd_sock), "%s/nbd-%u.sock", d->run_dir, new_id(d)) >=
	    sizeof(mine->nbd.socket)) {
		e->nbd_sock[0] = '\0';
		return ferry_err_set(err, ENAMETOOLONG, "run directory path too long for an NBD socket");
	}
	unlink(e->nbd_sock);
	if ((rc = ferry_qmp_executef(e->qmp, NULL, err, "nbd-server-start", "{s:{s:s, s:{s:s}}}", "addr", "type", "unix",
				     "data", "path", e->nbd_sock)))
		return ferry_err_prefix(err, "starting the destination QEMU's NBD server");
	e->nbd_started = true;
	for (size_t k = 0; k < mine->nbd.ndisks; k++) {
		char id[64];
		snprintf(id, sizeof(id), "ferry-%s", mine->nbd.disks[k].target);
		if ((rc = ferry_qmp_executef(e->qmp, NULL, err, "block-export-add", "{s:s, s:s, s:s, s:s, s:b}", "type",
					     "nbd", "id", id, "node-name", nodes[k], "name", mine->nbd.disks[k].target,
					     "writable", 1)))
			return ferry_err_prefix(err, "exporting disk '%s'", mine->nbd.disks[k].target);
	}
	if ((rc = ferry_qmp_execute(e->qmp, "stop", NULL, NULL, err)))
		return rc;
	e->nbd_guarded = true;
	memcpy(mine->nbd.socket, e->nbd_sock, strlen(e->nbd_sock) + 1); /* fits: checked above */
	mine->flags |= FERRY_COOKIE_NBD;
	mine->features |= FERRY_COOKIE_FEAT_NBD;
	logf_(d, "storage migration: %zu disk%s exported on %s", mine->nbd.ndisks, mine->nbd.ndisks == 1 ? "" : "s",
	      e->nbd_sock);
	return 0;
}

/* Prepare (v3, step 2) on the destination: validate the source's cookie
 * against our QEMU and host, choose the plan from both sides' capabilities.
 * Fills the reply's cookie and plan. */
static int prepare_plan(struct daemon *d, struct dst_entry *e, json_t *req, const char *cookie_xml,
			struct ferry_plan *plan, json_t **cookie_out, char *vm, size_t vmlen, char *src_host,
			size_t hostlen, double *probe_ms, struct ferry_err *err)
{
	struct ferry_cookie theirs, mine;
	struct ferry_side_caps mycaps, scaps;
	int rc = ferry_cookie_parse(cookie_xml, strlen(cookie_xml), &theirs, err);
	if (rc)
		return ferry_err_prefix(err, "the source's cookie");
	double t_probe = mono_ms();
	if ((rc = ferry_probe_cookie(e->qmp, d->dp, d->endpoint, d->cfg->disabled_features, d->hostname, d->hostuuid,
				     &mine, &mycaps, err)))
		return ferry_err_prefix(err, "describing the destination");
	*probe_ms = mono_ms() - t_probe;
	if ((rc = ferry_cookie_check_peer(&mine, &theirs, err)) || (rc = ferry_cookie_check_shape(&theirs, &mine, err)))
		return rc;
	snprintf(vm, vmlen, "%s", mine.name);
	snprintf(src_host, hostlen, "%s", theirs.hostname);
	ferry_caps_from_cookie(&theirs, &scaps);
	struct ferry_plan_request preq = { .no_handoff = json_is_true(json_object_get(req, "no_handoff")),
					   .postcopy = json_is_true(json_object_get(req, "postcopy")),
					   .nbd = (theirs.flags & FERRY_COOKIE_NBD) && theirs.nbd.ndisks > 0 };
	unsigned channels;
	if ((rc = req_uint(req, "channels", 0, FERRY_MAX_STREAMS - 1, &channels, err)) ||
	    (rc = req_features(req, "require", &preq.require, err)))
		return rc;
	preq.channels = channels;
	const char *t = req_str(req, "transport");
	if (t && strcmp(t, "auto") != 0) {
		preq.transport = ferry_cookie_driver_kind(t);
		if (!preq.transport)
			return ferry_err_set(err, EINVAL, "unknown transport '%s'", t);
	}
	if ((rc = ferry_plan_choose(&scaps, &mycaps, &preq, plan, err)))
		return rc;
	if ((plan->features & FERRY_F_NBD) && (rc = dst_nbd_setup(d, e, &theirs, &mine, err)))
		return ferry_err_prefix(err, "storage migration");
	char *xml = NULL;
	mine.vm.nargs = mine.vm.cmdline_len = 0; /* the source has no use for our command line */
	if ((rc = ferry_cookie_format(&mine, &xml, err)))
		return rc;
	if (d->cfg->cookie_log) {
		/* The session has no id yet: number the prepares instead. */
		static unsigned prepares;
		char name[64];
		struct ferry_err le = { 0 };
		snprintf(name, sizeof(name), "destination-%u-prepare", __atomic_add_fetch(&prepares, 1, __ATOMIC_RELAXED));
		if (ferry_cookie_save(d->cfg->cookie_log, name, xml, &le))
			logf_(d, "%s", le.msg);
	}
	*cookie_out = json_string(xml);
	free(xml);
	return *cookie_out ? 0 : ferry_err_set(err, ENOMEM, "out of memory");
}

/* Nothing at path, or a socket nobody listens on (a QEMU that ended). */
static bool no_monitor(const char *path)
{
	struct stat st;
	if (lstat(path, &st) != 0)
		return errno == ENOENT;
	if (!S_ISSOCK(st.st_mode))
		return false;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return false;
	strcpy(sa.sun_path, path);
	/* Non-blocking: a live monitor busy with another client (full backlog)
	 * says EAGAIN, never "refused". */
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return false;
	bool stale = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno == ECONNREFUSED;
	close(fd);
	if (stale)
		unlink(path);
	return stale;
}

/* The last line QEMU wrote to its log, for an error message. */
static void log_tail(const char *path, char *out, size_t outlen)
{
	char buf[512];
	out[0] = '\0';
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	off_t end = lseek(fd, 0, SEEK_END);
	off_t from = end > (off_t)sizeof(buf) - 1 ? end - (off_t)sizeof(buf) + 1 : 0;
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, from);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		buf[--n] = '\0';
	char *nl = strrchr(buf, '\n');
	snprintf(out, outlen, "%s", nl ? nl + 1 : buf);
}

/* Prepare with no destination QEMU: start one with -incoming defer from the
 * source's command line (sanitized by spawn.c), wait for its monitor, and
 * leave e as the attach path would (e->qmp connected). */
static int spawn_destination(struct daemon *d, struct dst_entry *e, const char *cookie_xml, const char *qmp_path,
			     struct ferry_err *err)
{
	if (d->cfg->no_spawn)
		return ferry_err_set(err, ENOENT, "no destination QEMU at %s, and this host does not start one "
				     "(ferryd --disable spawn)", qmp_path);
	if (!cookie_xml)
		return ferry_err_set(err, ENOENT, "no destination QEMU at %s, and a source without cookies cannot "
				     "describe the VM to start one", qmp_path);
	struct ferry_cookie *c = malloc(sizeof(*c));
	if (!c)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = ferry_cookie_parse(cookie_xml, strlen(cookie_xml), c, err);
	if (rc) {
		free(c);
		return ferry_err_prefix(err, "the source's cookie");
	}
	char storage[PATH_MAX], mem[PATH_MAX], log[PATH_MAX + 8];
	const char *sdir = d->cfg->storage_dir ? d->cfg->storage_dir : "/var/lib/ferry/images";
	size_t base = strlen(qmp_path);
	if (base > 4 && strcmp(qmp_path + base - 4, ".qmp") == 0)
		base -= 4;
	e->d = d;
	e->spawned = (struct ferry_spawned){ .pid = -1, .pidfd = -1 };
	snprintf(e->qmp_path, sizeof(e->qmp_path), "%s", qmp_path);
	if (!(c->flags & FERRY_COOKIE_VM) || c->vm.nargs == 0)
		rc = ferry_err_set(err, ENOENT, "no destination QEMU at %s, and the source's cookie carries no QEMU "
				   "command line to start one from", qmp_path);
	else if (!realpath(sdir, storage))
		rc = ferry_err_set(err, errno, "storage directory %s (ferryd --storage-dir): %s", sdir, strerror(errno));
	else if (d->cfg->mem_dir && !realpath(d->cfg->mem_dir, mem))
		rc = ferry_err_set(err, errno, "RAM directory %s (ferryd --mem-dir): %s", d->cfg->mem_dir, strerror(errno));
	else if ((size_t)snprintf(e->pidfile, sizeof(e->pidfile), "%.*s.pid", (int)base, qmp_path) >= sizeof(e->pidfile) ||
		 (size_t)snprintf(log, sizeof(log), "%.*s.log", (int)base, qmp_path) >= sizeof(log))
		rc = ferry_err_set(err, ENAMETOOLONG, "run directory path too long");
	else if (!(e->spawn_cmd = calloc(1, sizeof(*e->spawn_cmd))))
		rc = ferry_err_set(err, ENOMEM, "out of memory");
	struct ferry_spawn_config sc = { .qemu = d->cfg->qemu ? d->cfg->qemu : "qemu-system-x86_64",
					 .storage_dir = storage, .mem_dir = d->cfg->mem_dir ? mem : NULL,
					 .qmp_path = qmp_path, .pidfile = e->pidfile, .prealloc = d->cfg->spawn_prealloc };
	/* Storage migration: the disks to receive are made empty here. */
	if (!rc && (rc = ferry_spawn_build(&sc, &c->vm, e->spawn_cmd, err)) == 0 &&
	    (rc = ferry_spawn_make_images(e->spawn_cmd, c, err)) == 0 &&
	    (rc = ferry_spawn_check_files(e->spawn_cmd, &c->vm, err)) == 0) {
		e->spawn_files = true;
		rc = ferry_spawn_start(e->spawn_cmd, log, &e->spawned, err);
	}
	free(c);
	if (rc)
		return ferry_err_prefix(err, "cannot start the destination QEMU");
	char line[1024];
	size_t o = 0;
	for (size_t i = 0; i < e->spawn_cmd->argc && o < sizeof(line); i++)
		o += (size_t)snprintf(line + o, sizeof(line) - o, "%s%s", i ? " " : "", e->spawn_cmd->argv[i]);
	logf_(d, "started the destination QEMU (pid %d, log %s): %s", (int)e->spawned.pid, log, line);
	/* Its monitor comes up once QEMU has set the machine up (and faulted
	 * its RAM in, with prealloc). */
	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		struct ferry_err ce = { 0 };
		if (ferry_qmp_connect(qmp_path, QMP_TIMEOUT_MS, &e->qmp, &ce) == 0)
			return 0;
		if (!ferry_spawn_alive(&e->spawned)) {
			log_tail(log, line, sizeof(line));
			return ferry_err_set(err, ECHILD, "the destination QEMU it started exited: %s", line[0] ? line : "(no output)");
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - t0.tv_sec > SPAWN_TIMEOUT_S)
			return ferry_err_set(err, ETIMEDOUT, "the destination QEMU it started has no monitor at %s after %d s",
					     qmp_path, SPAWN_TIMEOUT_S);
		usleep(100000);
	}
}

/* Multifd handoff (controlplane/pinlisten.h): a listener on our data address
 * pinned to the source host's address (which the source names: the one its
 * route to us leaves from), given to our QEMU as its incoming socket. The
 * reply tells the source where its QEMU connects. */
static int listen_pinned(struct daemon *d, struct dst_entry *e, json_t *req, unsigned channels, char *addr,
			 size_t len, struct ferry_err *err)
{
	const char *src_ip = req_str(req, "src_ip");
	char host[FERRY_DP_ENDPOINT_MAX];
	if (!src_ip)
		return ferry_err_set(err, EINVAL, "multifd handoff: the request names no source address (src_ip)");
	int rc = ferry_endpoint_host(d->endpoint, host, sizeof(host), err);
	int fd = -1;
	unsigned port = 0;
	if (rc || (rc = ferry_pinned_listen(host, src_ip, (int)channels + 1, &fd, &port, err)))
		return ferry_err_prefix(err, "multifd handoff");
	rc = ferry_qmp_getfd(e->qmp, fd, "ferry-multifd", err);
	close(fd); /* QEMU holds its own copy now */
	if (rc || (rc = ferry_qmp_executef(e->qmp, NULL, err, "migrate-incoming", "{s:s}", "uri", "tcp:fd:ferry-multifd")))
		return ferry_err_prefix(err, "the destination QEMU did not take the pinned listener");
	snprintf(addr, len, strchr(host, ':') ? "[%s]:%u" : "%s:%u", host, port);
	return 0;
}

static json_t *peer_migrate_prepare(struct daemon *d, json_t *req, struct ferry_err *err)
{
	double t_start = mono_ms(), qmp_ms = -1, probe_ms = -1;
	struct ferry_plan plan = { 0 };
	json_t *my_cookie = NULL;
	unsigned channels, lanes;
	if (req_uint(req, "channels", 0, FERRY_MAX_STREAMS - 1, &channels, err) ||
	    req_uint(req, "lanes", 0, FERRY_MAX_LANES, &lanes, err))
		return NULL;
	char qmp_path[PATH_MAX];
	const char *qmp_req = req_str(req, "qmp");
	if (resolve_peer_path(d, qmp_req, SCOPE_RUN_AND_ALLOWED, qmp_path, sizeof(qmp_path), err)) {
		ferry_err_prefix(err, "destination QMP socket");
		return NULL;
	}
	struct dst_entry *e = calloc(1, sizeof(*e));
	if (!e) {
		ferry_err_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	/* A VM named by its name ("ferryctl migrate VM") that no QEMU here
	 * serves yet: start one from the source's description. */
	if (!strchr(qmp_req, '/') && no_monitor(qmp_path)) {
		if (spawn_destination(d, e, req_str(req, "cookie"), qmp_path, err))
			goto fail;
	} else if (ferry_qmp_connect(qmp_path, QMP_TIMEOUT_MS, &e->qmp, err)) {
		ferry_err_prefix(err, "destination QEMU monitor %s", qmp_path);
		goto fail;
	}
	json_t *st = NULL;
	if (ferry_qmp_execute(e->qmp, "query-status", NULL, &st, err))
		goto fail;
	qmp_ms = mono_ms() - t_start;
	const char *status = json_string_value(json_object_get(st, "status"));
	if (!status || strcmp(status, "inmigrate") != 0) {
		ferry_err_set(err, EINVAL, "the destination QEMU is '%s', not waiting for a migration (start it with -incoming defer)",
			      status ? status : "?");
		json_decref(st);
		goto fail;
	}
	json_decref(st);
	/* A source with a cookie gets the negotiated plan; one from before
	 * cookies gets what it asked for, as it always did. */
	const char *cookie_xml = req_str(req, "cookie");
	bool handoff = json_is_true(json_object_get(req, "handoff"));
	char vm[FERRY_COOKIE_NAME_MAX * 4 + 1] = "", src_host[FERRY_COOKIE_HOSTNAME_MAX + 1] = "";
	if (cookie_xml) {
		if (prepare_plan(d, e, req, cookie_xml, &plan, &my_cookie, vm, sizeof(vm), src_host, sizeof(src_host),
				 &probe_ms, err))
			goto fail;
		channels = plan.channels;
		handoff = plan.handoff;
		if (!lanes || handoff)
			lanes = handoff ? 1 : ferry_plan_streams(&plan); /* a lane per stream */
		for (unsigned i = 0; i < plan.nnotes; i++)
			logf_(d, "migration from %s: fallback: %s", d->hostname, plan.notes[i]);
	}
	/* Events, so Finish sees the load complete at once; no max-bandwidth
	 * (the source's QEMU sets the pace). */
	const struct ferry_migrate_caps caps = {
		.channels = channels,
		.postcopy = (plan.features & FERRY_F_POSTCOPY) != 0,
		.preempt = (plan.features & FERRY_F_POSTCOPY_PREEMPT) != 0,
	};
	if (ferry_migrate_set_caps(e->qmp, &caps, err))
		goto fail;
	/* Guarded postcopy: `stop` while incoming turns QEMU's autostart off,
	 * so after the postcopy switch the VM stays paused until postcopy-go. */
	if ((plan.features & FERRY_F_POSTCOPY) && (plan.features & FERRY_F_POSTCOPY_SETUP)) {
		if (ferry_qmp_execute(e->qmp, "stop", NULL, NULL, err))
			goto fail;
		e->pc_guarded = true;
	}
	e->pc_streams = channels + 1 + ((plan.features & FERRY_F_POSTCOPY_PREEMPT) ? 1 : 0);
	e->direct = handoff && channels > 0;
	if (e->direct)
		e->pc_streams = 1;
	if (handoff && !ferry_dp_can_handoff(d->dp)) {
		ferry_err_set(err, EINVAL, "handoff needs a driver that can hand over (kernel tcp)");
		goto fail;
	}
	char direct_addr[FERRY_DP_ENDPOINT_MAX] = "";
	if (e->direct && listen_pinned(d, e, req, channels, direct_addr, sizeof(direct_addr), err))
		goto fail;
	uint8_t token[FERRY_TOKEN_LEN];
	e->window = ferry_agree_window(json_object_get(req, "window"), ferry_dp_window(d->dp));
	/* The stream socket is ours, in our run dir, named after the session. */
	if (new_dst_session(d, e, lanes, e->pc_streams, NULL, handoff, token, err))
		goto fail;
	uint32_t id = e->id;
	if (e->direct) {
		logf_(d, "session %u: destination QEMU %s listens on %s for the source host %s (%u multifd channels)", id,
		      qmp_path, direct_addr, req_str(req, "src_ip"), channels);
	} else if (handoff) {
		/* QEMU gets the authenticated connection in migrate-handoff. */
		logf_(d, "session %u: destination QEMU %s waits for a handed-over connection", id, qmp_path);
	} else {
		unlink(e->sock_path);
		char uri[PATH_MAX + 8];
		snprintf(uri, sizeof(uri), "unix:%s", e->sock_path);
		if (ferry_qmp_executef(e->qmp, NULL, err, "migrate-incoming", "{s:s}", "uri", uri))
			goto fail;
		e->unlink_sock = true;
		logf_(d, "session %u: destination QEMU %s listens on %s (%u multifd channels)", id, qmp_path,
		      e->sock_path, channels);
	}
	if (dst_insert(d, e, err))
		goto fail;
	dst_record(d, id, FERRY_PHASE_PREPARED, vm, src_host, qmp_path, e->spawn_cmd ? e->spawned.pid : 0, NULL);
	json_t *r = session_reply(d, e, token);
	if (my_cookie) {
		json_t *notes = json_array(), *feats = ferry_features_json(plan.features);
		for (unsigned i = 0; i < plan.nnotes; i++)
			json_array_append_new(notes, json_string(plan.notes[i]));
		json_object_set_new(r, "cookie", my_cookie);
		json_object_set_new(r, "plan", json_pack("{s:s, s:i, s:b, s:i, s:o, s:o}", "transport",
							 ferry_cookie_driver_name(plan.transport), "channels", (int)channels,
							 "handoff", handoff, "lanes", (int)(lanes ? lanes : channels + 1),
							 "features", feats, "notes", notes));
		if (e->direct)
			json_object_set_new(json_object_get(r, "plan"), "direct", json_string(direct_addr));
	}
	/* Where Prepare's time went, for the source's migrate-status. */
	json_object_set_new(r, "timing", json_pack("{s:f, s:f, s:f}", "qmp_ms", qmp_ms, "probe_ms", probe_ms, "total_ms",
						   mono_ms() - t_start));
	return r;
fail:
	json_decref(my_cookie);
	dst_free(e);
	return NULL;
}

/* Take the migration session a request names out of the table (the caller
 * puts it back or frees it); a tunnel session with that id stays where it is. */
static struct dst_entry *take_migration(struct daemon *d, json_t *req, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "session", &id, err))
		return NULL;
	struct dst_entry *e = dst_take(d, (uint32_t)id);
	if (!e || !e->qmp) {
		ferry_err_set(err, ENOENT, "no migration session %" PRIu64 " here", id);
		if (e)
			dst_insert(d, e, err);
		return NULL;
	}
	return e;
}

/* Return a migration taken with take_migration to the table, with the reply
 * r made for it (NULL on failure, err set); frees both if that fails. */
static json_t *put_back(struct daemon *d, struct dst_entry *e, json_t *r, struct ferry_err *err)
{
	struct ferry_err e2 = { 0 };
	if (dst_insert(d, e, &e2)) {
		dst_free(e);
		json_decref(r);
		ferry_err_set(err, e2.code, "%s", e2.msg);
		return NULL;
	}
	return r;
}

static json_t *peer_migrate_finish(struct daemon *d, json_t *req, struct ferry_err *err)
{
	double t_start = mono_ms(), wait_ms = -1;
	struct dst_entry *e = take_migration(d, req, err);
	if (!e)
		return NULL;
	/* The source has sent everything; wait for the destination to load it. */
	const char *status = NULL;
	json_t *info = NULL;
	for (int i = 0; i < 6000; i++) {
		json_decref(info);
		info = NULL;
		if (ferry_qmp_execute(e->qmp, "query-migrate", NULL, &info, err))
			break;
		status = json_string_value(json_object_get(info, "status"));
		if (status && (strcmp(status, "completed") == 0 || strcmp(status, "failed") == 0))
			break;
		struct ferry_session_stats ss;
		ferry_session_stats(e->sess, &ss);
		if (ss.state == FERRY_SESSION_FAILED && (!status || strcmp(status, "active") != 0)) {
			ferry_err_set(err, EIO, "transport failed: %s", ss.error);
			break;
		}
		/* Until QEMU's next event (its MIGRATION status change ends the
		 * wait at once) or 20 ms; a dead monitor fails the next query. */
		ferry_qmp_wait_event(e->qmp, 20);
	}
	json_t *r = NULL;
	if (status && !err->code) {
		wait_ms = mono_ms() - t_start;
		json_t *vs = NULL;
		struct ferry_err e2 = { 0 };
		const char *vm = "?";
		if (ferry_qmp_execute(e->qmp, "query-status", NULL, &vs, &e2) == 0)
			vm = json_string_value(json_object_get(vs, "status"));
		/* Storage migration: the source ended its mirrors before Finish;
		 * the NBD server goes before the VM runs here. */
		if (e->nbd_started && strcmp(status, "completed") == 0) {
			(void)ferry_qmp_execute(e->qmp, "nbd-server-stop", NULL, NULL, &e2);
			e->nbd_started = false;
			e->nbd_finished = true;
		}
		/* Finish (v3, step 4): a QEMU started with -S waits for us to run
		 * the VM it received, if the VM ran on the source; a QEMU that
		 * failed to load is ended, never left half-alive. */
		if (strcmp(status, "completed") == 0 && vm && strcmp(vm, "paused") == 0 &&
		    json_is_true(json_object_get(req, "resume")) &&
		    ferry_qmp_execute(e->qmp, "cont", NULL, NULL, &e2) == 0) {
			json_decref(vs);
			vs = NULL;
			vm = "?";
			if (ferry_qmp_execute(e->qmp, "query-status", NULL, &vs, &e2) == 0)
				vm = json_string_value(json_object_get(vs, "status"));
		} else if (strcmp(status, "failed") == 0) {
			(void)ferry_qmp_execute(e->qmp, "quit", NULL, NULL, &e2);
		}
		const char *cx = req_str(req, "cookie");
		struct ferry_cookie sc;
		if (cx && ferry_cookie_parse(cx, strlen(cx), &sc, &e2) == 0 && (sc.flags & FERRY_COOKIE_STATS))
			logf_(d, "session %u: source reports %" PRIu64 " of %" PRIu64 " RAM bytes sent in %" PRIu64
			      " ms, downtime %" PRIu64 " ms", e->id, sc.stats.ram_transferred, sc.stats.ram_total,
			      sc.stats.total_time_ms, sc.stats.downtime_ms);
		r = json_pack("{s:b, s:s, s:s}", "ok", 1, "status", status, "vm_status", vm ? vm : "?");
		if (r)
			json_object_set_new(r, "timing", json_pack("{s:f, s:f}", "wait_ms", wait_ms, "total_ms",
								   mono_ms() - t_start));
		logf_(d, "session %u: destination migration %s, VM %s", e->id, status, vm ? vm : "?");
		char note[96];
		snprintf(note, sizeof(note), "finished: migration %s, VM %.32s", status, vm ? vm : "?");
		dst_record(d, e->id, strcmp(status, "completed") == 0 ? FERRY_PHASE_DONE : FERRY_PHASE_FAILED, NULL, NULL,
			   NULL, 0, note);
		e->spawn_keep = strcmp(status, "completed") == 0;
		json_decref(vs);
	} else if (!err->code) {
		ferry_err_set(err, ETIMEDOUT, "destination QEMU did not finish loading in time");
	}
	json_decref(info);
	dst_free(e);
	return r;
}

/* Guarded postcopy, step 1: the source switched to postcopy; wait until our
 * QEMU has loaded every device. It is then paused in postcopy-active (the
 * package's POSTCOPY_RUN found autostart off), and has not run the VM. */
static json_t *peer_postcopy_setup_wait(struct daemon *d, json_t *req, struct ferry_err *err)
{
	unsigned timeout_ms;
	if (req_uint(req, "timeout_ms", 60000, 600000, &timeout_ms, err))
		return NULL;
	struct dst_entry *e = take_migration(d, req, err);
	if (!e)
		return NULL;
	json_t *r = NULL;
	if (!e->pc_guarded) {
		ferry_err_set(err, EINVAL, "session %u was not prepared for guarded postcopy", e->id);
		goto out;
	}
	for (unsigned waited = 0;; waited += 20) {
		json_t *info = NULL, *vs = NULL;
		if (ferry_qmp_execute(e->qmp, "query-migrate", NULL, &info, err) ||
		    ferry_qmp_execute(e->qmp, "query-status", NULL, &vs, err)) {
			json_decref(info);
			ferry_err_prefix(err, "the destination QEMU did not survive loading the devices");
			break;
		}
		const char *ms = json_string_value(json_object_get(info, "status"));
		const char *rs = json_string_value(json_object_get(vs, "status"));
		bool switched = ms && (strcmp(ms, "postcopy-active") == 0 || strcmp(ms, "completed") == 0);
		bool loaded = switched && rs && strcmp(rs, "paused") == 0;
		if (ms && strcmp(ms, "failed") == 0) {
			const char *desc = json_string_value(json_object_get(info, "error-desc"));
			ferry_err_set(err, EIO, "the destination QEMU failed loading the migration: %s",
				      desc ? desc : "no reason given");
		} else if (rs && strcmp(rs, "running") == 0) {
			/* autostart was on after all: that must not happen */
			ferry_err_set(err, EPROTO, "the destination QEMU runs the VM without being told to");
		}
		json_decref(info);
		json_decref(vs);
		if (err->code)
			break;
		if (loaded) {
			logf_(d, "session %u: postcopy set-up: the destination QEMU loaded every device", e->id);
			r = reply_ok();
			break;
		}
		if (waited >= timeout_ms) {
			ferry_err_set(err, ETIMEDOUT, "the destination QEMU did not load the devices within %u ms", timeout_ms);
			break;
		}
		usleep(20000);
	}
	if (!r)
		logf_(d, "session %u: postcopy set-up failed: %s", e->id, err->msg);
out:
	return put_back(d, e, r, err);
}

/* Guarded postcopy, step 2: the source committed to us; run the VM. */
static json_t *peer_postcopy_go(struct daemon *d, json_t *req, struct ferry_err *err)
{
	struct dst_entry *e = take_migration(d, req, err);
	if (!e)
		return NULL;
	json_t *r = NULL;
	if (!e->pc_guarded)
		ferry_err_set(err, EINVAL, "session %u was not prepared for guarded postcopy", e->id);
	else if (ferry_qmp_execute(e->qmp, "cont", NULL, NULL, err) == 0) {
		e->pc_go = true;
		logf_(d, "session %u: postcopy: the VM runs here now", e->id);
		r = reply_ok();
	}
	return put_back(d, e, r, err);
}

/* Guarded postcopy after go: the lanes broke and our QEMU paused its
 * postcopy. Listen again (migrate-recover) behind a new session under the
 * same id; the source resumes its QEMU over it. */
static json_t *peer_postcopy_recover(struct daemon *d, json_t *req, struct ferry_err *err)
{
	struct dst_entry *e = take_migration(d, req, err);
	if (!e)
		return NULL;
	json_t *r = NULL;
	if (!e->pc_guarded || !e->pc_go) {
		ferry_err_set(err, EINVAL, "session %u has no postcopy running here", e->id);
		goto out;
	}
	/* QEMU notices the closed channel by itself; wait for it to pause. */
	for (unsigned waited = 0;; waited += 50) {
		json_t *info = NULL;
		if (ferry_qmp_execute(e->qmp, "query-migrate", NULL, &info, err)) {
			ferry_err_prefix(err, "the destination QEMU");
			goto out;
		}
		char st[32];
		const char *js = json_string_value(json_object_get(info, "status"));
		snprintf(st, sizeof(st), "%s", js ? js : "?");
		json_decref(info);
		if (strcmp(st, "postcopy-paused") == 0)
			break;
		if (strcmp(st, "postcopy-active") != 0 || waited >= 30000) {
			ferry_err_set(err, EIO, "the destination QEMU is '%s', not paused for a postcopy recovery", st);
			goto out;
		}
		usleep(50000);
	}
	ferry_session_close(e->sess);
	e->sess = NULL;
	if (e->unlink_sock)
		unlink(e->sock_path);
	e->pc_recoveries++;
	if ((size_t)snprintf(e->sock_path, sizeof(e->sock_path), "%s/mig-%u-dst-r%u.sock", d->run_dir, e->id,
			     e->pc_recoveries) >= sizeof(e->sock_path)) {
		ferry_err_set(err, ENAMETOOLONG, "run directory path too long");
		goto out;
	}
	uint8_t token[FERRY_TOKEN_LEN];
	if (dst_session_open(d, e, e->pc_streams, e->pc_streams, e->sock_path, false, token, err))
		goto out;
	unlink(e->sock_path);
	char uri[PATH_MAX + 8];
	snprintf(uri, sizeof(uri), "unix:%s", e->sock_path);
	if (ferry_qmp_executef(e->qmp, NULL, err, "migrate-recover", "{s:s}", "uri", uri))
		goto out;
	e->unlink_sock = true;
	logf_(d, "session %u: postcopy recovery %u: the destination QEMU listens on %s", e->id, e->pc_recoveries,
	      e->sock_path);
	r = session_reply(d, e, token);
out:
	return put_back(d, e, r, err);
}

/* The source's lane is up: give its socket to the destination QEMU. */
static json_t *peer_migrate_handoff(struct daemon *d, json_t *req, struct ferry_err *err)
{
	struct dst_entry *e = take_migration(d, req, err);
	if (!e)
		return NULL;
	json_t *r = NULL;
	int fd = ferry_session_take_fd(e->sess, 10000, err);
	if (fd >= 0 && e->direct) {
		/* The source proved it holds the session's token; its QEMU
		 * connects to our QEMU's pinned listener, not over this lane. */
		close(fd);
		r = reply_ok();
	} else if (fd >= 0) {
		int rc = ferry_qmp_getfd(e->qmp, fd, "ferry-migration", err);
		close(fd); /* QEMU holds its own copy now */
		if (rc == 0 && ferry_qmp_executef(e->qmp, NULL, err, "migrate-incoming", "{s:s}", "uri",
						  "fd:ferry-migration") == 0) {
			r = reply_ok();
			logf_(d, "session %u: connection handed to the destination QEMU", e->id);
		}
	}
	return put_back(d, e, r, err);
}

static json_t *peer_session_close(struct daemon *d, json_t *req, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "session", &id, err))
		return NULL;
	struct dst_entry *e = dst_take(d, (uint32_t)id);
	if (!e) {
		ferry_err_set(err, ENOENT, "no session %" PRIu64 " here", id);
		return NULL;
	}
	json_t *r = reply_ok();
	json_object_set_new(r, "cpu_s", json_real(cpu_seconds()));
	json_object_set_new(r, "stats", session_stats_json(e->sess));
	if (e->region && json_is_true(json_object_get(req, "crc")))
		json_object_set_new(r, "crc", json_integer(ferry_dp_checksum(0, e->region, e->region_len)));
	dst_free(e);
	return r;
}

/* ---- source side: tunnels ------------------------------------------------ */

static void tunnel_log(void *ctx, const char *msg)
{
	logf_(ctx, "%s", msg);
}

static void tunnel_free(struct src_tunnel *t)
{
	if (!t)
		return;
	ferry_standing_tunnel_stop(t->standing);
	if (t->sess && t->ctl.fd >= 0) {
		struct ferry_err e = { 0 };
		json_t *req = json_pack("{s:s, s:I}", "cmd", "session-close", "session", (json_int_t)t->id);
		if (req)
			(void)ferry_jl_call(&t->ctl, req, 5000, NULL, &e);
		json_decref(req);
	}
	ferry_session_close(t->sess);
	ferry_jl_close(&t->ctl);
	free(t);
}

static json_t *tunnel_stats_json(struct src_tunnel *t)
{
	if (!t->standing)
		return session_stats_json(t->sess);
	struct ferry_standing_tunnel_stats st;
	ferry_standing_tunnel_stats(t->standing, &st);
	return json_pack("{s:b, s:I, s:I, s:i, s:I, s:I, s:s}", "standing", 1, "connections", (json_int_t)st.connections,
			 "failed", (json_int_t)st.failed, "active", (int)st.active, "tx_bytes", (json_int_t)st.tx_bytes,
			 "rx_bytes", (json_int_t)st.rx_bytes, "last_error", st.last_error);
}

static int tunnel_insert(struct daemon *d, struct src_tunnel *t, struct ferry_err *err)
{
	pthread_mutex_lock(&d->lock);
	unsigned i;
	for (i = 0; i < MAX_ENTRIES && d->tun[i]; i++)
		;
	if (i < MAX_ENTRIES)
		d->tun[i] = t;
	pthread_mutex_unlock(&d->lock);
	return i < MAX_ENTRIES ? 0 : ferry_err_set(err, ENOSPC, "too many tunnels");
}

/* Open a tunnel and enter it in the table (streams == 0: standing); give
 * back its id and the resolved listening path. */
static int tunnel_open(struct daemon *d, const char *peer, const char *listen, const char *target, unsigned streams,
		       unsigned lanes, bool connect_now, uint32_t *id, char listen_out[PATH_MAX], struct ferry_err *err)
{
	struct src_tunnel *t = calloc(1, sizeof(*t));
	if (!t)
		return ferry_err_set(err, ENOMEM, "out of memory");
	t->ctl.fd = -1;
	if (resolve_peer_path(d, listen, SCOPE_RUN_AND_ALLOWED, t->listen, sizeof(t->listen), err))
		goto fail;
	if (streams == 0) {
		struct ferry_standing_tunnel_params sp = { .dp = d->dp, .peer = peer, .listen_path = t->listen,
							   .target = target, .lanes = lanes, .connect_now = connect_now,
							   .log = tunnel_log, .log_ctx = d };
		if (ferry_standing_tunnel_start(&sp, &t->standing, err))
			goto fail;
		t->id = new_id(d);
	} else {
		if (ferry_jl_connect_tcp(peer, REQ_TIMEOUT_MS, &t->ctl, err))
			goto fail;
		json_t *oreq = json_pack("{s:s, s:s, s:i, s:i}", "cmd", "session-open", "target", target, "streams",
					 (int)streams, "lanes", (int)lanes);
		int rc = ferry_tunnel_session_open(d->dp, &t->ctl, oreq, lanes, streams, t->listen, &t->sess, &t->id,
						   NULL, err);
		json_decref(oreq);
		if (rc)
			goto fail;
	}
	/* Read what the caller needs before the table makes t visible (and closable). */
	*id = t->id;
	memcpy(listen_out, t->listen, PATH_MAX);
	if (streams == 0)
		logf_(d, "tunnel %u: %s -> %s:%s (standing, a session per connection)", t->id, t->listen, peer, target);
	else
		logf_(d, "tunnel %u: %s -> %s:%s (%u streams)", t->id, t->listen, peer, target, streams);
	if (tunnel_insert(d, t, err))
		goto fail;
	return 0;
fail:
	tunnel_free(t);
	return -(err->code ? err->code : EIO);
}

static json_t *admin_tunnel_open(struct daemon *d, json_t *req, struct ferry_err *err)
{
	const char *peer = req_str(req, "peer");
	const char *listen = req_str(req, "listen");
	const char *target = req_str(req, "target");
	unsigned streams, lanes;
	if (!peer || !listen || !target) {
		ferry_err_set(err, EINVAL, "tunnel-open needs \"peer\", \"listen\" and \"target\"");
		return NULL;
	}
	if (req_uint(req, "streams", 1, FERRY_MAX_STREAMS, &streams, err) ||
	    req_uint(req, "lanes", 0, FERRY_MAX_LANES, &lanes, err))
		return NULL;
	if (streams == 0) {
		ferry_err_set(err, EINVAL, "\"streams\" must be at least 1");
		return NULL;
	}
	json_t *jstanding = json_object_get(req, "standing");
	if (jstanding && !json_is_boolean(jstanding)) {
		ferry_err_set(err, EINVAL, "\"standing\" must be true or false");
		return NULL;
	}
	bool standing = json_is_true(jstanding);
	uint32_t id;
	char path[PATH_MAX];
	if (tunnel_open(d, peer, listen, target, standing ? 0 : streams, lanes, true, &id, path, err))
		return NULL;
	return json_pack("{s:b, s:I, s:s, s:b}", "ok", 1, "tunnel", (json_int_t)id, "listen", path, "standing", standing);
}

/* Take a tunnel out of the table (the caller frees it). */
static struct src_tunnel *tunnel_take(struct daemon *d, uint32_t id)
{
	pthread_mutex_lock(&d->lock);
	struct src_tunnel *t = NULL;
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		if (d->tun[i] && d->tun[i]->id == id) {
			t = d->tun[i];
			d->tun[i] = NULL;
			break;
		}
	}
	pthread_mutex_unlock(&d->lock);
	return t;
}


static json_t *admin_tunnel_status(struct daemon *d, json_t *req, bool close_it, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "tunnel", &id, err))
		return NULL;
	json_t *r = reply_ok();
	if (close_it) {
		/* Closing takes it out of the table first, so nobody else uses it. */
		struct src_tunnel *t = tunnel_take(d, (uint32_t)id);
		if (t) {
			json_object_set_new(r, "stats", tunnel_stats_json(t));
			tunnel_free(t);
		}
	} else {
		/* Read it under the table lock: a concurrent close cannot free it meanwhile. */
		pthread_mutex_lock(&d->lock);
		for (unsigned i = 0; i < MAX_ENTRIES; i++)
			if (d->tun[i] && d->tun[i]->id == (uint32_t)id)
				json_object_set_new(r, "stats", tunnel_stats_json(d->tun[i]));
		pthread_mutex_unlock(&d->lock);
	}
	if (!json_object_get(r, "stats")) {
		json_decref(r);
		ferry_err_set(err, ENOENT, "no tunnel %" PRIu64, id);
		return NULL;
	}
	return r;
}

/* ---- NBD paths (nbdpath.h) ----------------------------------------------- */

static void nbd_log(void *ctx, const char *msg)
{
	logf_(ctx, "%s", msg);
}

static const char *nbd_export_name(json_t *req, struct ferry_err *err)
{
	json_t *e = json_object_get(req, "export");
	if (!e)
		return "";
	if (!json_is_string(e) || json_string_length(e) > FERRY_NBD_MAX_STRING) {
		ferry_err_set(err, EINVAL, "\"export\" must be a string of at most %d bytes", FERRY_NBD_MAX_STRING);
		return NULL;
	}
	return json_string_value(e);
}

/* Peer: nbd-probe / nbd-session-open: the target must lie in an --allow-dir, like tunnel targets. */
static json_t *peer_nbd(struct daemon *d, json_t *req, bool open, struct ferry_err *err)
{
	char target[PATH_MAX];
	const char *export = nbd_export_name(req, err);
	unsigned lanes;
	if (!export || req_uint(req, "lanes", 1, FERRY_MAX_STREAMS, &lanes, err))
		return NULL;
	/* A storage migration's export: the socket this daemon chose in its run dir. */
	const char *t = req_str(req, "target");
	bool own = false;
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; t && i < MAX_ENTRIES && !own; i++)
		own = d->dst[i] && d->dst[i]->nbd_started && strcmp(d->dst[i]->nbd_sock, t) == 0;
	pthread_mutex_unlock(&d->lock);
	if (own)
		snprintf(target, sizeof(target), "%s", t);
	else if (resolve_peer_path(d, t, SCOPE_ALLOWED_ONLY, target, sizeof(target), err))
		return NULL;
	if (!open)
		return ferry_nbd_peer_probe(d->nbd, target, export, err);
	uint64_t window = ferry_agree_window(json_object_get(req, "window"), ferry_dp_window(d->dp));
	return ferry_nbd_peer_session_open(d->nbd, new_id(d), target, export, lanes, window, err);
}

static json_t *admin_nbd_open(struct daemon *d, json_t *req, struct ferry_err *err)
{
	const char *peer = req_str(req, "peer"), *listen = req_str(req, "listen"), *target = req_str(req, "target");
	const char *export = nbd_export_name(req, err);
	unsigned lanes;
	if (!export)
		return NULL;
	if (!peer || !listen || !target) {
		ferry_err_set(err, EINVAL, "nbd-open needs \"peer\", \"listen\" and \"target\"");
		return NULL;
	}
	if (req_uint(req, "lanes", 4, FERRY_MAX_STREAMS, &lanes, err))
		return NULL;
	char path[PATH_MAX];
	if (resolve_peer_path(d, listen, SCOPE_RUN_AND_ALLOWED, path, sizeof(path), err))
		return NULL;
	return ferry_nbd_open(d->nbd, new_id(d), peer, path, target, export, lanes, err);
}

static json_t *admin_nbd_status(struct daemon *d, json_t *req, bool close_it, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "nbd", &id, err))
		return NULL;
	return ferry_nbd_status(d->nbd, (uint32_t)id, close_it, err);
}

/* ---- source side: raw region benchmark ---------------------------------- */

static json_t *admin_perf_region(struct daemon *d, json_t *req, struct ferry_err *err)
{
	const char *peer = req_str(req, "peer");
	uint64_t bytes;
	unsigned lanes;
	if (!peer) {
		ferry_err_set(err, EINVAL, "perf-region needs \"peer\"");
		return NULL;
	}
	if (req_u64(req, "bytes", &bytes, err) || req_uint(req, "lanes", 1, FERRY_MAX_LANES, &lanes, err))
		return NULL;
	if (bytes == 0 || bytes > REGION_MAX_BYTES || lanes == 0) {
		ferry_err_set(err, EINVAL, "bytes must be 1..%llu and lanes at least 1", (unsigned long long)REGION_MAX_BYTES);
		return NULL;
	}
	struct ferry_jl ctl = { .fd = -1 };
	struct ferry_session *s = NULL;
	uint8_t *buf = NULL;
	json_t *r = NULL;
	uint32_t sid = 0;
	if (ferry_jl_connect_tcp(peer, REQ_TIMEOUT_MS, &ctl, err))
		return NULL;
	buf = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED) {
		buf = NULL;
		ferry_err_set(err, errno, "cannot allocate %" PRIu64 " bytes: %s", bytes, strerror(errno));
		goto out;
	}
	uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t)time(NULL);
	for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, 8);
	}
	json_t *oreq = json_pack("{s:s, s:i, s:i, s:I}", "cmd", "session-open", "streams", 1, "lanes", (int)lanes,
				 "region_bytes", (json_int_t)bytes);
	double dst_cpu0 = 0;
	int rc = ferry_tunnel_session_open(d->dp, &ctl, oreq, lanes, 1, NULL, &s, &sid, &dst_cpu0, err);
	json_decref(oreq);
	if (rc || ferry_region_add(s, 0, buf, bytes, err))
		goto out;
	double cpu0 = cpu_seconds();
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (ferry_region_write(s, 0, 0, bytes, err) || ferry_region_fence(s, 600000, err))
		goto out;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double cpu = cpu_seconds() - cpu0;
	double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	json_t *creq = json_pack("{s:s, s:I, s:b}", "cmd", "session-close", "session", (json_int_t)sid, "crc", 1);
	json_t *crep = NULL;
	rc = ferry_jl_call(&ctl, creq, REQ_TIMEOUT_MS, &crep, err);
	json_decref(creq);
	if (rc)
		goto out;
	uint32_t want = ferry_dp_checksum(0, buf, bytes);
	json_t *jc = json_object_get(crep, "crc");
	bool match = json_is_integer(jc) && (uint32_t)json_integer_value(jc) == want;
	double dst_cpu = json_number_value(json_object_get(crep, "cpu_s")) - dst_cpu0;
	json_decref(crep);
	r = json_pack("{s:b, s:I, s:f, s:f, s:f, s:f, s:b}", "ok", 1, "bytes", (json_int_t)bytes, "seconds", secs, "gbs",
		      (double)bytes / secs / 1e9, "src_cpu_s", cpu, "dst_cpu_s", dst_cpu, "verified", match);
out:
	ferry_session_close(s);
	ferry_jl_close(&ctl);
	if (buf)
		munmap(buf, bytes);
	return r;
}

/* ---- source side: migrations -------------------------------------------- */

static json_t *admin_migrate(struct daemon *d, json_t *req, struct ferry_err *err)
{
	/* A relative monitor path names a socket in this daemon's run dir (the
	 * "ferryctl migrate VM" form); the admin is trusted with any other path. */
	const char *src_in = req_str(req, "src_qmp");
	char src_path[PATH_MAX];
	if (src_in && src_in[0] != '/') {
		if (strstr(src_in, "..") || strchr(src_in, '/') ||
		    (size_t)snprintf(src_path, sizeof(src_path), "%s/%s", d->run_dir, src_in) >= sizeof(src_path)) {
			ferry_err_set(err, EINVAL, "source monitor '%s': a relative name may not contain '/' or '..'", src_in);
			return NULL;
		}
		src_in = src_path;
	}
	struct ferry_migration_params p = {
		.src_qmp = src_in,
		.dst_qmp = req_str(req, "dst_qmp"),
		.peer = req_str(req, "peer"),
		.run_dir = d->run_dir,
	};
	unsigned stall;
	if (req_uint(req, "channels", 0, FERRY_MAX_STREAMS - 1, &p.channels, err) ||
	    req_uint(req, "lanes", 0, FERRY_MAX_LANES, &p.lanes, err) ||
	    req_uint(req, "stall_timeout", 0, 86400, &stall, err))
		return NULL;
	p.stall_timeout_s = (int)stall;
	p.no_handoff = json_is_false(json_object_get(req, "handoff"));
	p.keep_source = json_is_true(json_object_get(req, "keep_source"));
	p.suspend = json_is_true(json_object_get(req, "suspend"));
	json_t *jbw = json_object_get(req, "max_bandwidth");
	if (jbw && (!json_is_integer(jbw) || json_integer_value(jbw) < 0)) {
		ferry_err_set(err, EINVAL, "max_bandwidth must be a number of bytes/s");
		return NULL;
	}
	p.max_bandwidth = jbw ? (uint64_t)json_integer_value(jbw) : 0;
	p.postcopy = json_is_true(json_object_get(req, "postcopy"));
	/* Without the set-up acknowledgement (decided with the peer) postcopy
	 * needs this; migrate.c refuses otherwise. */
	p.force_postcopy = json_is_true(json_object_get(req, "force_postcopy"));
	json_t *jafter = json_object_get(req, "postcopy_after_ms");
	p.postcopy_after_ms = json_is_integer(jafter) && json_integer_value(jafter) >= 0 &&
				      (json_integer_value(jafter) <= 86400000 ||
				       json_integer_value(jafter) == FERRY_POSTCOPY_AFTER_AUTO)
			      ? (unsigned)json_integer_value(jafter)
			      : 1000;
	if (req_features(req, "require", &p.require, err))
		return NULL;
	const char *t = req_str(req, "transport");
	if (t && strcmp(t, "auto") != 0) {
		p.transport = ferry_cookie_driver_kind(t);
		if (!p.transport) {
			ferry_err_set(err, EINVAL, "unknown transport '%s' (auto, rdma, dpdk or tcp)", t);
			return NULL;
		}
	}
	/* Storage migration: the disks to mirror and the shared directories. */
	json_t *jd = json_object_get(req, "disks"), *js = json_object_get(req, "shared_dirs"), *v;
	size_t k;
	if ((jd && (!json_is_array(jd) || json_array_size(jd) > FERRY_MIG_MAX_DISKS)) ||
	    (js && (!json_is_array(js) || json_array_size(js) > FERRY_MIG_MAX_SHARED))) {
		ferry_err_set(err, EINVAL, "\"disks\" and \"shared_dirs\" must be arrays of at most %d and %d strings",
			      FERRY_MIG_MAX_DISKS, FERRY_MIG_MAX_SHARED);
		return NULL;
	}
	json_array_foreach(jd, k, v) {
		if (!json_is_string(v)) {
			ferry_err_set(err, EINVAL, "\"disks\" must hold strings");
			return NULL;
		}
		p.disks[p.ndisks] = json_string_value(v);
		p.nbd_ids[p.ndisks++] = new_id(d);
	}
	json_array_foreach(js, k, v) {
		if (!json_is_string(v)) {
			ferry_err_set(err, EINVAL, "\"shared_dirs\" must hold strings");
			return NULL;
		}
		p.shared_dirs[p.nshared++] = json_string_value(v);
	}
	p.nbd = d->nbd;
	p.disabled = d->cfg->disabled_features;
	p.state_dir = d->state_dir;
	p.cookie_log = d->cfg->cookie_log;
	p.hostname = d->hostname;
	p.hostuuid = d->hostuuid;
	uint32_t id = new_id(d);
	/* Start and record under one lock so two requests never share a slot. */
	pthread_mutex_lock(&d->lock);
	unsigned i;
	for (i = 0; i < MAX_ENTRIES && d->mig[i].m; i++)
		;
	struct ferry_migration *m = NULL;
	int rc = i == MAX_ENTRIES ? ferry_err_set(err, ENOSPC, "too many migrations recorded; restart the daemon")
				  : ferry_migration_start(d->dp, &p, id, &m, err);
	if (rc == 0) {
		d->mig[i].id = id;
		d->mig[i].m = m;
	}
	pthread_mutex_unlock(&d->lock);
	if (rc)
		return NULL;
	logf_(d, "migration %u: %s -> %s (%s), %u multifd channels", id, p.src_qmp, p.peer, p.dst_qmp, p.channels);
	return json_pack("{s:b, s:I}", "ok", 1, "migration", (json_int_t)id);
}

static struct ferry_migration *mig_find(struct daemon *d, uint32_t id)
{
	pthread_mutex_lock(&d->lock);
	struct ferry_migration *m = NULL;
	for (unsigned i = 0; i < MAX_ENTRIES; i++)
		if (d->mig[i].m && d->mig[i].id == id)
			m = d->mig[i].m;
	pthread_mutex_unlock(&d->lock);
	return m;
}

static json_t *admin_migrate_status(struct daemon *d, json_t *req, bool cancel, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "migration", &id, err))
		return NULL;
	struct ferry_migration *m = mig_find(d, (uint32_t)id);
	if (!m) {
		ferry_err_set(err, ENOENT, "no migration %" PRIu64, id);
		return NULL;
	}
	if (cancel) {
		ferry_migration_cancel(m);
		logf_(d, "migration %" PRIu64 ": cancel requested", id);
	}
	/* "wait_ms": answer once the migration ended, or after that long (a
	 * watcher sees the end at once, without polling). */
	unsigned wait_ms = 0;
	if (!cancel && req_uint(req, "wait_ms", 0, 1000, &wait_ms, err))
		return NULL;
	if (wait_ms)
		ferry_migration_wait(m, (int)wait_ms);
	struct ferry_migration_progress p;
	ferry_migration_progress(m, &p);
	json_t *r = json_pack("{s:b, s:s, s:s, s:s, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:s, s:s, s:s}", "ok", 1,
			 "state", ferry_migration_state_name(p.state), "transport", p.transport, "qemu_status", p.qemu_status, "ram_total",
			 (json_int_t)p.ram_total, "ram_transferred", (json_int_t)p.ram_transferred, "ram_remaining",
			 (json_int_t)p.ram_remaining, "throughput_gbs", p.throughput_gbs, "dirty_rate_bps",
			 p.dirty_rate_bps, "elapsed_s", p.elapsed_s, "setup_s", p.setup_s, "total_s", p.total_s,
			 "downtime_ms", p.downtime_ms, "src_vm_status", p.src_vm_status, "dst_status", p.dst_status,
			 "error", p.error);
	if (r) {
		json_object_set_new(r, "plan", json_string(p.plan));
		json_object_set_new(r, "fallbacks", json_string(p.fallbacks));
		json_object_set_new(r, "postcopy_at_s", json_real(p.postcopy_at_s));
		json_object_set_new(r, "postcopy_recoveries", json_integer(p.postcopy_recoveries));
		json_object_set_new(r, "storage", json_string(p.storage));
		if (p.warning[0])
			json_object_set_new(r, "warning", json_string(p.warning));
		if (p.reliable)
			json_object_set_new(r, "reliable", rel_json(&p.rel));
		json_t *ph = json_object();
		for (int k = 0; ph && k < FERRY_MARK_COUNT; k++)
			if (p.marks[k] > 0)
				json_object_set_new(ph, ferry_migration_mark_name(k), json_real(p.marks[k]));
		json_object_set_new(r, "phases", ph);
		if (wait_ms)
			json_object_set_new(r, "waited", json_true());
		json_object_set_new(r, "t0_mono", json_real(p.t0_mono));
		json_object_set_new(r, "dst_timing", json_pack("{s:f, s:f, s:f, s:f, s:f}", "qmp_ms", p.dst_qmp_ms,
							       "probe_ms", p.dst_probe_ms, "prepare_ms", p.dst_prepare_ms,
							       "finish_wait_ms", p.dst_finish_wait_ms, "finish_ms",
							       p.dst_finish_ms));
	}
	return r;
}

/* ---- recovery ------------------------------------------------------------ */

/* A source daemon (restarted, or one that lost us) asks what became of a
 * session: settle it from our record and our QEMU. Any authenticated peer may
 * ask; the answer only ever completes what QEMU itself already did. */
static json_t *peer_migrate_state(struct daemon *d, json_t *req, struct ferry_err *err)
{
	uint64_t id;
	if (req_u64(req, "session", &id, err))
		return NULL;
	pthread_mutex_lock(&d->lock);
	bool busy = false;
	for (unsigned i = 0; i < MAX_ENTRIES; i++)
		if (d->dst[i] && d->dst[i]->id == (uint32_t)id)
			busy = true;
	pthread_mutex_unlock(&d->lock);
	json_t *r = ferry_recover_destination(d->state_dir, (uint32_t)id, json_is_true(json_object_get(req, "resume")),
					      busy, err);
	if (r)
		logf_(d, "session %" PRIu64 ": state asked by the source: %s (%s)", id,
		      json_string_value(json_object_get(r, "phase")), json_string_value(json_object_get(r, "note")));
	return r;
}

static bool mig_running(uint32_t id, void *ctx)
{
	struct daemon *d = ctx;
	pthread_mutex_lock(&d->lock);
	struct ferry_migration *m = NULL;
	for (unsigned i = 0; i < MAX_ENTRIES; i++)
		if (d->mig[i].m && d->mig[i].id == id)
			m = d->mig[i].m;
	bool running = m && !ferry_migration_done(m);
	pthread_mutex_unlock(&d->lock);
	return running;
}

/* Every migration this daemon knows: those it runs or ran since it started,
 * and the unfinished ones its records hold from before. */
static json_t *admin_migrate_list(struct daemon *d, struct ferry_err *err)
{
	json_t *live = json_array(), *recorded = json_array();
	if (!live || !recorded) {
		json_decref(live);
		json_decref(recorded);
		ferry_err_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		if (!d->mig[i].m)
			continue;
		struct ferry_migration_progress p;
		ferry_migration_progress(d->mig[i].m, &p);
		json_array_append_new(live, json_pack("{s:I, s:s, s:s, s:f, s:s}", "migration", (json_int_t)d->mig[i].id,
						      "state", ferry_migration_state_name(p.state), "plan", p.plan,
						      "elapsed_s", p.elapsed_s, "error", p.error));
	}
	pthread_mutex_unlock(&d->lock);
	struct ferry_state_record *all = NULL;
	unsigned n = 0, bad = 0;
	struct ferry_err e = { 0 };
	if (ferry_state_list(d->state_dir, &all, &n, &bad, &e) == 0) {
		for (unsigned i = 0; i < n; i++)
			if (all[i].role == FERRY_ROLE_SOURCE && !ferry_state_phase_final(all[i].phase) && !mig_running(all[i].id, d))
				json_array_append_new(recorded, json_pack("{s:I, s:s, s:s, s:s, s:I}", "migration",
									  (json_int_t)all[i].id, "vm", all[i].vm, "phase",
									  ferry_state_phase_name(all[i].phase), "peer", all[i].peer,
									  "updated", (json_int_t)all[i].updated));
		free(all);
	}
	json_t *r = reply_ok();
	json_object_set_new(r, "migrations", live);
	json_object_set_new(r, "unfinished", recorded);
	return r;
}

static json_t *admin_recover(struct daemon *d, json_t *req, struct ferry_err *err)
{
	uint64_t id = 0;
	if (json_object_get(req, "migration") && req_u64(req, "migration", &id, err))
		return NULL;
	json_t *items = ferry_recover_source(d->state_dir, (uint32_t)id, mig_running, d, err);
	if (!items)
		return NULL;
	size_t i;
	json_t *it;
	json_array_foreach(items, i, it)
		logf_(d, "recover: migration %" JSON_INTEGER_FORMAT " (%s): %s: %s",
		      json_integer_value(json_object_get(it, "migration")), json_string_value(json_object_get(it, "vm")),
		      json_string_value(json_object_get(it, "decision")), json_string_value(json_object_get(it, "detail")));
	json_t *r = reply_ok();
	json_object_set_new(r, "migrations", items);
	return r;
}

/* At start: say which migrations were cut short by our last stop. */
static void report_records(struct daemon *d)
{
	struct ferry_state_record *all = NULL;
	unsigned n = 0, bad = 0;
	struct ferry_err e = { 0 };
	if (ferry_state_list(d->state_dir, &all, &n, &bad, &e)) {
		logf_(d, "cannot read migration records: %s", e.msg);
		return;
	}
	for (unsigned i = 0; i < n; i++)
		if (!ferry_state_phase_final(all[i].phase))
			logf_(d, "%s %u (VM '%s', peer %s) was '%s' when this daemon last stopped%s",
			      all[i].role == FERRY_ROLE_SOURCE ? "migration" : "session", all[i].id, all[i].vm, all[i].peer,
			      ferry_state_phase_name(all[i].phase),
			      all[i].role == FERRY_ROLE_SOURCE ? ": run `ferryctl recover` to settle it" : "");
	if (bad)
		logf_(d, "%u damaged migration record(s) in %s ignored", bad, d->state_dir);
	free(all);
}

/* ---- dispatch ------------------------------------------------------------ */

static json_t *handle(struct conn *c, json_t *req, struct ferry_err *err)
{
	struct daemon *d = c->d;
	bool admin = c->admin;
	const char *cmd = req_str(req, "cmd");
	if (!cmd) {
		ferry_err_set(err, EINVAL, "request has no \"cmd\" string");
		return NULL;
	}
	if (strcmp(cmd, "ping") == 0 || strcmp(cmd, "hello") == 0) {
		json_t *r = json_pack("{s:b, s:s, s:s, s:s, s:s, s:b}", "ok", 1, "version", "0.1.0", "driver",
				      ferry_dp_driver_name(d->dp), "endpoint", d->endpoint, "run_dir", d->run_dir,
				      "handoff", ferry_dp_can_handoff(d->dp));
		if (admin) {
			json_object_set_new(r, "listen", json_string(d->cfg->listen));
			json_t *dirs = json_array();
			for (unsigned i = 1; i < d->nallow; i++)
				json_array_append_new(dirs, json_string(d->allow[i]));
			json_object_set_new(r, "allow_dirs", dirs);
		}
		return r;
	}
	if (strcmp(cmd, "stats") == 0) {
		return json_pack("{s:b, s:f, s:I}", "ok", 1, "cpu_s", cpu_seconds(), "rejected_lanes",
				 (json_int_t)ferry_dp_rejected_lanes(d->dp));
	}
	if (!admin) {
		bool creates = strcmp(cmd, "session-open") == 0 || strcmp(cmd, "migrate-prepare") == 0 ||
			       strcmp(cmd, "nbd-session-open") == 0;
		if (creates && c->nowned >= MAX_OWNED) {
			ferry_err_set(err, ENOSPC, "this connection already holds %d sessions", MAX_OWNED);
			return NULL;
		}
		bool acts = strcmp(cmd, "session-close") == 0 || strcmp(cmd, "migrate-finish") == 0 ||
			    strcmp(cmd, "migrate-abort") == 0 || strcmp(cmd, "migrate-handoff") == 0 ||
			    strcmp(cmd, "postcopy-setup-wait") == 0 || strcmp(cmd, "postcopy-go") == 0 ||
			    strcmp(cmd, "postcopy-recover") == 0 || strcmp(cmd, "nbd-session-close") == 0;
		if (acts && !conn_owns(c, req)) {
			ferry_err_set(err, EPERM, "session %lld was not opened on this connection",
				      (long long)json_integer_value(json_object_get(req, "session")));
			return NULL;
		}
		if (strcmp(cmd, "session-open") == 0) {
			json_t *r = peer_session_open(d, req, err);
			conn_own(c, r);
			return r;
		}
		if (strcmp(cmd, "session-close") == 0) {
			json_t *r = peer_session_close(d, req, err);
			if (r)
				conn_disown(c, req);
			return r;
		}
		if (strcmp(cmd, "migrate-prepare") == 0) {
			json_t *r = peer_migrate_prepare(d, req, err);
			conn_own(c, r);
			return r;
		}
		if (strcmp(cmd, "migrate-finish") == 0)
			return peer_migrate_finish(d, req, err);
		if (strcmp(cmd, "migrate-handoff") == 0)
			return peer_migrate_handoff(d, req, err);
		if (strcmp(cmd, "postcopy-setup-wait") == 0)
			return peer_postcopy_setup_wait(d, req, err);
		if (strcmp(cmd, "postcopy-go") == 0)
			return peer_postcopy_go(d, req, err);
		if (strcmp(cmd, "postcopy-recover") == 0)
			return peer_postcopy_recover(d, req, err);
		if (strcmp(cmd, "migrate-abort") == 0) {
			uint64_t id;
			if (req_u64(req, "session", &id, err))
				return NULL;
			struct dst_entry *e = dst_take(d, (uint32_t)id);
			if (e) {
				logf_(d, "session %u: aborted by the source", e->id);
				if (e->qmp)
					dst_record(d, e->id, FERRY_PHASE_FAILED, NULL, NULL, NULL, 0, "aborted by the source");
			}
			dst_free(e);
			conn_disown(c, req);
			return reply_ok();
		}
		if (strcmp(cmd, "migrate-state") == 0)
			return peer_migrate_state(d, req, err);
		if (strcmp(cmd, "nbd-probe") == 0)
			return peer_nbd(d, req, false, err);
		if (strcmp(cmd, "nbd-session-open") == 0) {
			json_t *r = peer_nbd(d, req, true, err);
			conn_own(c, r);
			return r;
		}
		if (strcmp(cmd, "nbd-session-close") == 0) {
			uint64_t id;
			if (req_u64(req, "session", &id, err))
				return NULL;
			json_t *r = ferry_nbd_peer_session_close(d->nbd, (uint32_t)id, err);
			conn_disown(c, req);
			return r;
		}
	} else {
		if (strcmp(cmd, "migrate") == 0)
			return admin_migrate(d, req, err);
		if (strcmp(cmd, "migrate-status") == 0)
			return admin_migrate_status(d, req, false, err);
		if (strcmp(cmd, "migrate-cancel") == 0)
			return admin_migrate_status(d, req, true, err);
		if (strcmp(cmd, "tunnel-open") == 0)
			return admin_tunnel_open(d, req, err);
		if (strcmp(cmd, "tunnel-status") == 0)
			return admin_tunnel_status(d, req, false, err);
		if (strcmp(cmd, "tunnel-close") == 0)
			return admin_tunnel_status(d, req, true, err);
		if (strcmp(cmd, "perf-region") == 0)
			return admin_perf_region(d, req, err);
		if (strcmp(cmd, "nbd-open") == 0)
			return admin_nbd_open(d, req, err);
		if (strcmp(cmd, "nbd-status") == 0)
			return admin_nbd_status(d, req, false, err);
		if (strcmp(cmd, "nbd-close") == 0)
			return admin_nbd_status(d, req, true, err);
		if (strcmp(cmd, "recover") == 0)
			return admin_recover(d, req, err);
		if (strcmp(cmd, "migrate-list") == 0)
			return admin_migrate_list(d, err);
	}
	ferry_err_set(err, EINVAL, "unknown command '%s'", cmd);
	return NULL;
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	struct daemon *d = c->d;
	struct ferry_jl jl;
	ferry_jl_init(&jl, c->fd);
	bool serve = true;
	struct ferry_tls *tls = c->admin ? NULL : ferry_jl_get_tls();
	if (tls) {
		/* Nothing is read from a peer before it proved who it is; a silent
		 * one is dropped after FERRY_TLS_HANDSHAKE_MS. */
		char host[NI_MAXHOST] = "?", port[NI_MAXSERV] = "?";
		struct sockaddr_storage sa;
		socklen_t sl = sizeof(sa);
		if (getpeername(c->fd, (struct sockaddr *)&sa, &sl) == 0)
			(void)getnameinfo((struct sockaddr *)&sa, sl, host, sizeof(host), port, sizeof(port),
					  NI_NUMERICHOST | NI_NUMERICSERV);
		char peer[NI_MAXHOST + NI_MAXSERV + 4];
		snprintf(peer, sizeof(peer), strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
		struct ferry_err herr = { 0 };
		if (ferry_jl_accept_tls(&jl, tls, FERRY_TLS_HANDSHAKE_MS, &herr)) {
			logf_(d, "peer %s refused: TLS handshake failed: %s", peer, herr.msg);
			serve = false;
		} else if (d->cfg->verbose) {
			char who[300];
			ferry_tls_peer_describe(jl.tls, who, sizeof(who));
			logf_(d, "peer %s authenticated: %s", peer, who);
		}
	}
	while (serve) {
		struct ferry_err err = { 0 };
		json_t *req = NULL;
		/* Peers keep their control connection open for a whole migration. */
		int rc = ferry_jl_recv(&jl, -1, &req, &err);
		if (rc == -ECONNRESET)
			break;
		json_t *rep;
		if (rc) {
			logf_(d, "%s connection: %s", c->admin ? "admin" : "peer", err.msg);
			rep = reply_err(err.msg);
			ferry_jl_send(&jl, rep, 1000, &err);
			json_decref(rep);
			break; /* framing is lost: drop the connection */
		}
		rep = handle(c, req, &err);
		if (!rep) {
			logf_(d, "%s request '%s' failed: %s", c->admin ? "admin" : "peer",
			      req_str(req, "cmd") ? req_str(req, "cmd") : "?", err.msg);
			rep = reply_err(err.msg[0] ? err.msg : "request failed");
		}
		json_decref(req);
		struct ferry_err serr = { 0 };
		rc = ferry_jl_send(&jl, rep, REQ_TIMEOUT_MS, &serr);
		json_decref(rep);
		if (rc)
			break;
	}
	ferry_jl_close(&jl);
	for (unsigned i = 0; i < c->nowned; i++) {
		struct dst_entry *e = dst_take(d, c->owned[i]);
		if (e) {
			logf_(d, "session %u: the source daemon went away; tearing the session down", e->id);
			dst_free(e);
		}
	}
	pthread_mutex_lock(&d->lock);
	if (c->admin)
		d->active_admin--;
	else
		d->active_conns--;
	pthread_mutex_unlock(&d->lock);
	free(c);
	return NULL;
}

static int listen_admin(const char *path, struct ferry_err *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return ferry_err_set(err, ENAMETOOLONG, "admin socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	struct stat st;
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return ferry_err_set(err, EEXIST, "%s exists and is not a socket", path);
		/* A live daemon answers; a stale socket file refuses. */
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			return ferry_err_set(err, EADDRINUSE, "another ferryd is serving %s", path);
		}
		if (probe >= 0)
			close(probe);
		unlink(path);
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return ferry_err_set(err, errno, "socket: %s", strerror(errno));
	mode_t old = umask(0077); /* owner only: the admin socket can start migrations */
	int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (rc || listen(fd, 16)) {
		rc = ferry_err_set(err, errno, "cannot listen on %s: %s", path, strerror(errno));
		close(fd);
		return rc;
	}
	return fd;
}

static int listen_peer(const char *hostport, struct ferry_err *err)
{
	struct ferry_hostport hp;
	if (ferry_parse_hostport(hostport, FERRY_HP_PORT0 | FERRY_HP_ANY_HOST, &hp, err))
		return ferry_err_prefix(err, "--listen");
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV }, *res = NULL;
	int g = getaddrinfo(hp.host[0] ? hp.host : NULL, hp.port, &hints, &res);
	if (g)
		return ferry_err_set(err, EINVAL, "--listen %s: %s", hostport, gai_strerror(g));
	int fd = -1;
	for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			continue;
		int one = 1;
		(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 64)) {
			ferry_err_set(err, errno, "cannot listen on %s: %s", hostport, strerror(errno));
			close(fd);
			fd = -1;
		}
	}
	freeaddrinfo(res);
	if (fd < 0)
		return err && err->code ? -err->code : -EADDRNOTAVAIL;
	return fd;
}

static void spawn_conn(struct daemon *d, int lfd, bool admin)
{
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		/* Out of fds: the listener stays readable; back off, do not spin. */
		if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS)
			usleep(100000);
		return;
	}
	if (!admin)
		ferry_jl_tcp_setup(fd);
	pthread_mutex_lock(&d->lock);
	/* Bounded threads, counted apart: idle peers cannot lock the admin out. */
	bool full = admin ? d->active_admin >= MAX_ADMIN_CONNS : d->active_conns >= MAX_CONNS;
	pthread_mutex_unlock(&d->lock);
	if (full) {
		logf_(d, "refusing a %s connection: %d open", admin ? "admin" : "peer", admin ? MAX_ADMIN_CONNS : MAX_CONNS);
		close(fd);
		return;
	}
	struct conn *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->d = d;
	c->fd = fd;
	c->admin = admin;
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	pthread_mutex_lock(&d->lock);
	if (admin)
		d->active_admin++;
	else
		d->active_conns++;
	pthread_mutex_unlock(&d->lock);
	pthread_t t;
	if (pthread_create(&t, &a, conn_main, c)) {
		close(fd);
		free(c);
		pthread_mutex_lock(&d->lock);
		if (admin)
			d->active_admin--;
		else
			d->active_conns--;
		pthread_mutex_unlock(&d->lock);
	}
	pthread_attr_destroy(&a);
}

int ferry_daemon_run(const struct ferry_daemon_config *cfg, volatile sig_atomic_t *stop, struct ferry_err *err)
{
	struct daemon *d = calloc(1, sizeof(*d));
	if (!d)
		return ferry_err_set(err, ENOMEM, "out of memory");
	d->cfg = cfg;
	pthread_mutex_init(&d->lock, NULL);
	int afd = -1, pfd = -1, rc = 0;
	struct ferry_tls *tls = NULL;   /* NULL: --insecure-no-tls */

	char tmp[PATH_MAX];
	if (!cfg->admin_path || !cfg->listen) {
		rc = ferry_err_set(err, EINVAL, "ferryd needs --admin PATH and --listen HOST:PORT");
		goto out;
	}
	if ((rc = ferry_tls_load(&cfg->tls, &tls, err)))
		goto out;
	/* Every peer connection, dialled or accepted, uses it from now on. */
	ferry_jl_set_tls(tls);
	snprintf(tmp, sizeof(tmp), "%s", cfg->run_dir ? cfg->run_dir : cfg->admin_path);
	const char *rd = cfg->run_dir ? tmp : dirname(tmp);
	if (!realpath(rd, d->run_dir)) {
		rc = ferry_err_set(err, errno, "run directory %s: %s", rd, strerror(errno));
		goto out;
	}
	strcpy(d->allow[d->nallow++], d->run_dir);
	for (unsigned i = 0; i < FERRY_MAX_ALLOW_DIRS && cfg->allow_dirs[i]; i++) {
		if (!realpath(cfg->allow_dirs[i], d->allow[d->nallow])) {
			rc = ferry_err_set(err, errno, "--allow-dir %s: %s", cfg->allow_dirs[i], strerror(errno));
			goto out;
		}
		d->nallow++;
	}
	if ((rc = ferry_host_identity(cfg->host_uuid, d->hostname, d->hostuuid, err)))
		goto out;
	/* Records live in the run dir by default: a host reboot ends every QEMU
	 * anyway, a daemon restart must not forget. */
	if ((size_t)snprintf(d->state_dir, sizeof(d->state_dir), "%s", cfg->state_dir ? cfg->state_dir : "") >=
		    sizeof(d->state_dir) ||
	    (!cfg->state_dir && (size_t)snprintf(d->state_dir, sizeof(d->state_dir), "%s/state", d->run_dir) >=
					 sizeof(d->state_dir))) {
		rc = ferry_err_set(err, ENAMETOOLONG, "state directory path too long");
		goto out;
	}
	if ((rc = ferry_state_init(d->state_dir, err)))
		goto out;
	report_records(d);
	if ((rc = ferry_dp_open(&cfg->dp, &d->dp, err)))
		goto out;
	if ((rc = ferry_dp_endpoint(d->dp, d->endpoint, sizeof(d->endpoint), err)))
		goto out;
	if (!(d->nbd = ferry_nbd_registry_new(d->dp, d->run_dir, nbd_log, d))) {
		rc = ferry_err_set(err, ENOMEM, "out of memory");
		goto out;
	}
	if ((afd = listen_admin(cfg->admin_path, err)) < 0) {
		rc = afd;
		goto out;
	}
	struct stat ast;
	if (stat(cfg->admin_path, &ast) == 0) {
		d->admin_dev = ast.st_dev;
		d->admin_ino = ast.st_ino;
	}
	if ((pfd = listen_peer(cfg->listen, err)) < 0) {
		rc = pfd;
		goto out;
	}
	logf_(d, "ready: admin %s, control %s, data %s (%s driver, %s polling), run dir %s", cfg->admin_path,
	      cfg->listen, d->endpoint, ferry_dp_driver_name(d->dp),
	      cfg->dp.poll_mode == FERRY_POLL_BUSY ? "busy" : "adaptive", d->run_dir);
	logf_(d, "control connection: %s", ferry_tls_describe(tls));
	if (!tls)
		logf_(d, "WARNING: --insecure-no-tls: the control connection is plain TCP; anyone who reaches %s "
		      "can drive this daemon", cfg->listen);

	/* Standing tunnels from the configuration: the peer may come up later,
	 * so each reaches it only when a first connection arrives. */
	for (unsigned i = 0; i < FERRY_MAX_CONFIG_TUNNELS && cfg->tunnels[i].peer; i++) {
		const struct ferry_tunnel_config *tc = &cfg->tunnels[i];
		uint32_t id;
		if (tunnel_open(d, tc->peer, tc->listen, tc->target, 0, 0, false, &id, tmp, err)) {
			rc = ferry_err_prefix(err, "--tunnel %s,%s,%s", tc->peer, tc->listen, tc->target);
			goto out;
		}
	}

	while (!*stop) {
		struct pollfd p[2] = { { .fd = afd, .events = POLLIN }, { .fd = pfd, .events = POLLIN } };
		int r = poll(p, 2, 250);
		if (r < 0 && errno != EINTR) {
			rc = ferry_err_set(err, errno, "poll: %s", strerror(errno));
			break;
		}
		if (r > 0 && (p[0].revents & POLLIN))
			spawn_conn(d, afd, true);
		if (r > 0 && (p[1].revents & POLLIN))
			spawn_conn(d, pfd, false);
	}
	logf_(d, "shutting down");

	/* Stop migrations first: each resumes its source VM if it must. */
	for (unsigned i = 0; i < MAX_ENTRIES; i++)
		if (d->mig[i].m)
			ferry_migration_cancel(d->mig[i].m);
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		ferry_migration_free(d->mig[i].m);
		d->mig[i].m = NULL;
	}
out:
	if (afd >= 0) {
		close(afd);
		unlink(cfg->admin_path);
	}
	if (pfd >= 0)
		close(pfd);
	/* Connection threads may still be inside a request; wait a little. */
	for (int i = 0; i < 100; i++) {
		pthread_mutex_lock(&d->lock);
		unsigned n = d->active_conns + d->active_admin;
		pthread_mutex_unlock(&d->lock);
		if (n == 0)
			break;
		usleep(20000);
	}
	/* Tunnels tell their peers goodbye (a bounded call each): not under the
	 * table lock, which a connection thread may still want. */
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		pthread_mutex_lock(&d->lock);
		struct src_tunnel *t = d->tun[i];
		d->tun[i] = NULL;
		pthread_mutex_unlock(&d->lock);
		tunnel_free(t);
	}
	ferry_nbd_registry_free(d->nbd); /* NULL-safe; before the data plane its sessions use */
	d->nbd = NULL;
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; i < MAX_ENTRIES; i++) {
		dst_free(d->dst[i]);
		d->dst[i] = NULL;
	}
	bool conns_left = d->active_conns + d->active_admin > 0;
	pthread_mutex_unlock(&d->lock);
	ferry_dp_close(d->dp);
	ferry_jl_set_tls(NULL);
	if (!conns_left) {
		pthread_mutex_destroy(&d->lock);
		free(d);
		ferry_tls_free(tls);
	}
	/* else: a connection thread still holds d; the process is exiting anyway. */
	return rc;
}
