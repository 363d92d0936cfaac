#include "recover.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jsonline.h"
#include "qmp.h"
#include "spawn.h"
#include "state.h"

#define QMP_TIMEOUT_MS  5000
#define PEER_TIMEOUT_MS 15000

/* A QEMU's run state and migration status; "" where unknown. */
static int qemu_states(struct ferry_qmp *q, char *run, size_t rlen, char *mig, size_t mlen, struct ferry_err *err)
{
	json_t *st = NULL, *mi = NULL;
	int rc = ferry_qmp_execute(q, "query-status", NULL, &st, err);
	if (!rc)
		rc = ferry_qmp_execute(q, "query-migrate", NULL, &mi, err);
	if (!rc) {
		const char *r = json_string_value(json_object_get(st, "status"));
		const char *m = json_string_value(json_object_get(mi, "status"));
		snprintf(run, rlen, "%s", r ? r : "");
		snprintf(mig, mlen, "%s", m ? m : "none");
	}
	json_decref(st);
	json_decref(mi);
	return rc;
}

/* The QEMU a destination daemon started for the migration (record's
 * spawned_pid), still there though its monitor cannot settle it: end it.
 * Its command line must name the record's monitor, so a pid reused since by
 * another process is left alone. Returns whether it was ended. */
static bool end_spawned(const struct ferry_state_record *r)
{
	char args[16384];
	if (r->spawned_pid <= 0 || !r->qmp[0])
		return false;
	long got = ferry_proc_read((long)r->spawned_pid, "cmdline", args, sizeof(args) - 1);
	if (got <= 0)
		return false;
	size_t n = (size_t)got;
	args[n] = '\0';
	bool ours = false;
	for (size_t off = 0; off < n && !ours; off += strlen(args + off) + 1)
		ours = strncmp(args + off, "unix:", 5) == 0 && strstr(args + off, r->qmp) != NULL;
	return ours && kill((pid_t)r->spawned_pid, SIGKILL) == 0;
}

static json_t *dst_reply(const char *phase, const char *vm, const char *note)
{
	return json_pack("{s:b, s:s, s:s, s:s}", "ok", 1, "phase", phase, "vm_status", vm ? vm : "", "note", note ? note : "");
}

json_t *ferry_recover_destination(const char *state_dir, uint32_t session, bool resume, bool busy,
				  struct ferry_err *err)
{
	struct ferry_state_record r;
	struct ferry_err e = { 0 };
	if (busy)
		return dst_reply("in-progress", "", "the session is still live on the destination");
	if (ferry_state_read(state_dir, FERRY_ROLE_DESTINATION, session, &r, &e)) {
		if (e.code == ENOENT)
			return dst_reply("none", "", "the destination has no record of this migration");
		ferry_err_set(err, e.code, "%s", e.msg);
		return NULL;
	}
	if (r.phase == FERRY_PHASE_DONE)
		return dst_reply("done", "", r.note);
	if (r.phase == FERRY_PHASE_FAILED || r.phase == FERRY_PHASE_CANCELLED)
		return dst_reply("failed", "", r.note);

	/* Prepared, never finished: ask the QEMU what it did on its own. */
	struct ferry_qmp *q = NULL;
	char run[32] = "", mig[32] = "", note[256];
	const char *phase;
	if (ferry_qmp_connect(r.qmp, QMP_TIMEOUT_MS, &q, &e) || qemu_states(q, run, sizeof(run), mig, sizeof(mig), &e)) {
		r.phase = FERRY_PHASE_FAILED;
		snprintf(note, sizeof(note), "the destination QEMU is gone (%.160s)%s", e.msg,
			 end_spawned(&r) ? "; the QEMU this daemon started for it was ended" : "");
		phase = "failed";
	} else if (strcmp(mig, "completed") == 0) {
		struct ferry_err e2 = { 0 };
		if (resume && strcmp(run, "paused") == 0 && ferry_qmp_execute(q, "cont", NULL, NULL, &e2) == 0)
			snprintf(run, sizeof(run), "running");
		r.phase = FERRY_PHASE_DONE;
		snprintf(note, sizeof(note), "recovered: the destination QEMU had loaded the VM; it is %s", run);
		phase = "done";
	} else if (strcmp(mig, "active") == 0 || strcmp(mig, "setup") == 0 || strcmp(mig, "device") == 0 ||
		   strcmp(mig, "postcopy-active") == 0) {
		ferry_qmp_close(q);
		return dst_reply("in-progress", run, "the destination QEMU is still receiving");
	} else {
		/* failed, or never started receiving: it cannot run the VM; end it
		 * so it does not linger half-loaded. */
		struct ferry_err e2 = { 0 };
		(void)ferry_qmp_execute(q, "quit", NULL, NULL, &e2);
		r.phase = FERRY_PHASE_FAILED;
		snprintf(note, sizeof(note), "recovered: the destination QEMU's migration is '%s'; it was ended", mig);
		phase = "failed";
		snprintf(run, sizeof(run), "ended");
	}
	ferry_qmp_close(q);
	snprintf(r.note, sizeof(r.note), "%s", note);
	if (ferry_state_write(state_dir, &r, err))
		return NULL;
	return dst_reply(phase, run, note);
}

static void src_item(json_t *out, const struct ferry_state_record *r, enum ferry_state_phase was,
		     const char *decision, const char *source, const char *detail)
{
	json_array_append_new(out, json_pack("{s:I, s:s, s:s, s:s, s:s, s:s}", "migration", (json_int_t)r->id, "vm", r->vm,
					     "was", ferry_state_phase_name(was), "decision", decision, "source", source,
					     "detail", detail));
}

/* Settle one source record. */
static void recover_one(const char *state_dir, struct ferry_state_record *r, json_t *out)
{
	struct ferry_err e = { 0 };
	struct ferry_qmp *q = NULL;
	char run[32] = "gone", mig[32] = "", detail[1024];
	if (ferry_qmp_connect(r->qmp, QMP_TIMEOUT_MS, &q, &e) || qemu_states(q, run, sizeof(run), mig, sizeof(mig), &e)) {
		ferry_qmp_close(q);
		q = NULL;
		snprintf(run, sizeof(run), "gone");
	}
	enum ferry_state_phase was = r->phase;
	if (strcmp(run, "running") == 0) {
		/* QEMU resumed the guest itself (its migration failed): it lives here. */
		r->phase = FERRY_PHASE_FAILED;
		snprintf(r->note, sizeof(r->note), "recovered: the source VM runs (its migration is '%s')", mig);
		src_item(out, r, was, "stays on the source", "running", r->note);
		struct ferry_err we = { 0 };
		if (ferry_state_write(state_dir, r, &we))
			json_object_set_new(json_array_get(out, json_array_size(out) - 1), "warning", json_string(we.msg));
		ferry_qmp_close(q);
		return;
	}

	/* Ask the destination what became of its half. */
	struct ferry_jl jl = { .fd = -1 };
	json_t *rep = NULL;
	const char *dphase = NULL;
	if (r->session == 0) {
		dphase = "none"; /* never prepared: the destination has nothing */
	} else if (ferry_jl_connect_tcp(r->peer, PEER_TIMEOUT_MS, &jl, &e) == 0) {
		json_t *req = json_pack("{s:s, s:I, s:b}", "cmd", "migrate-state", "session", (json_int_t)r->session,
					"resume", r->was_running);
		if (req && ferry_jl_call(&jl, req, PEER_TIMEOUT_MS, &rep, &e) == 0)
			dphase = json_string_value(json_object_get(rep, "phase"));
		json_decref(req);
		ferry_jl_close(&jl);
	}
	struct ferry_err e2 = { 0 };
	if (!dphase) {
		snprintf(detail, sizeof(detail), "cannot decide: the destination daemon %s cannot tell (%.300s); the source "
			 "stays %s: run ferryctl recover again once it is back", r->peer, e.msg, run);
		src_item(out, r, was, "undecided", run, detail);
	} else if (strcmp(dphase, "done") == 0) {
		if (q && ferry_qmp_execute(q, "quit", NULL, NULL, &e2) == 0)
			snprintf(run, sizeof(run), "ended");
		r->phase = FERRY_PHASE_DONE;
		snprintf(r->note, sizeof(r->note), "recovered: the destination runs the VM; the source QEMU is %s", run);
		snprintf(detail, sizeof(detail), "%s", r->note);
		src_item(out, r, was, "lives on the destination", run, detail);
	} else if (strcmp(dphase, "failed") == 0 || strcmp(dphase, "none") == 0) {
		if (!q) {
			r->phase = FERRY_PHASE_FAILED;
			snprintf(r->note, sizeof(r->note), "the destination does not have the VM and the source QEMU is gone");
			snprintf(detail, sizeof(detail), "%s: the VM is not running anywhere", r->note);
			src_item(out, r, was, "lost", run, detail);
		} else {
			if (r->was_running && ferry_qmp_execute(q, "cont", NULL, NULL, &e2) == 0)
				snprintf(run, sizeof(run), "running");
			r->phase = FERRY_PHASE_FAILED;
			snprintf(r->note, sizeof(r->note), "recovered: the destination does not have the VM (%s); the source "
				 "is %s", dphase, run);
			snprintf(detail, sizeof(detail), "%s", r->note);
			src_item(out, r, was, "stays on the source", run, detail);
		}
	} else {
		snprintf(detail, sizeof(detail), "the destination is still receiving; the source stays %s: try again later",
			 run);
		src_item(out, r, was, "undecided", run, detail);
	}
	if (r->phase != was) {
		struct ferry_err we = { 0 };
		if (ferry_state_write(state_dir, r, &we))
			json_object_set_new(json_array_get(out, json_array_size(out) - 1), "warning", json_string(we.msg));
	}
	json_decref(rep);
	ferry_qmp_close(q);
}

json_t *ferry_recover_source(const char *state_dir, uint32_t only_id, bool (*in_progress)(uint32_t id, void *ctx),
			     void *ctx, struct ferry_err *err)
{
	struct ferry_state_record *all = NULL;
	unsigned n = 0, bad = 0;
	if (ferry_state_list(state_dir, &all, &n, &bad, err))
		return NULL;
	json_t *out = json_array();
	for (unsigned i = 0; out && i < n; i++) {
		struct ferry_state_record *r = &all[i];
		if (r->role != FERRY_ROLE_SOURCE || (only_id && r->id != only_id) || ferry_state_phase_final(r->phase))
			continue;
		if (in_progress && in_progress(r->id, ctx)) {
			src_item(out, r, r->phase, "in progress", "", "the migration is still running in this daemon");
			continue;
		}
		recover_one(state_dir, r, out);
	}
	free(all);
	if (!out)
		ferry_err_set(err, ENOMEM, "out of memory");
	return out;
}
