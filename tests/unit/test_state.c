/* Durable migration records: round trip, replace, damaged files skipped,
 * removal; recover ending a destination QEMU the daemon started. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "controlplane/recover.h"
#include "controlplane/state.h"

int main(void)
{
	struct ferry_err err = { 0 };
	char dir[] = "/tmp/ferry-state-test.XXXXXX";
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	char sub[256];
	snprintf(sub, sizeof(sub), "%s/state", dir);
	CHECK(ferry_state_init(sub, &err) == 0, "state dir created");
	struct stat st;
	CHECK(stat(sub, &st) == 0 && (st.st_mode & 0777) == 0700, "owner-only");
	CHECK(ferry_state_init(sub, &err) == 0, "init again is fine");

	struct ferry_state_record r = { .id = 42, .session = 7, .role = FERRY_ROLE_SOURCE, .phase = FERRY_PHASE_PERFORMING,
					.was_running = true, .spawned_pid = 4242 };
	snprintf(r.vm, sizeof(r.vm), "vm \"one\"");
	snprintf(r.peer, sizeof(r.peer), "10.0.0.2:7470");
	snprintf(r.qmp, sizeof(r.qmp), "/run/vm1.qmp");
	CHECK(ferry_state_write(sub, &r, &err) == 0, "written: %s", err.msg);
	struct ferry_state_record back;
	CHECK(ferry_state_read(sub, FERRY_ROLE_SOURCE, 42, &back, &err) == 0, "read back");
	CHECK(back.id == 42 && back.session == 7 && back.role == FERRY_ROLE_SOURCE &&
		      back.phase == FERRY_PHASE_PERFORMING && back.was_running && strcmp(back.vm, "vm \"one\"") == 0 &&
		      strcmp(back.peer, r.peer) == 0 && strcmp(back.qmp, r.qmp) == 0 && back.updated > 0 &&
		      back.spawned_pid == 4242,
	      "every field survives (quotes in names too)");

	r.phase = FERRY_PHASE_SENT;
	snprintf(r.note, sizeof(r.note), "waiting for the destination");
	CHECK(ferry_state_write(sub, &r, &err) == 0, "rewritten");
	CHECK(ferry_state_read(sub, FERRY_ROLE_SOURCE, 42, &back, &err) == 0 && back.phase == FERRY_PHASE_SENT &&
		      strcmp(back.note, r.note) == 0,
	      "the new phase replaced the old");

	struct ferry_state_record d = { .id = 42, .role = FERRY_ROLE_DESTINATION, .phase = FERRY_PHASE_PREPARED };
	CHECK(ferry_state_write(sub, &d, &err) == 0, "a destination record with the same id is another file");

	char bad[300];
	snprintf(bad, sizeof(bad), "%s/source-99.json", sub);
	FILE *f = fopen(bad, "w");
	fputs("{\"id\": 99, \"role\": \"source\", \"phase\": \"teleported\"}", f);
	fclose(f);
	snprintf(bad, sizeof(bad), "%s/source-100.json", sub);
	f = fopen(bad, "w");
	fputs("{ torn", f);
	fclose(f);
	snprintf(bad, sizeof(bad), "%s/unrelated.txt", sub);
	f = fopen(bad, "w");
	fclose(f);

	struct ferry_state_record *all = NULL;
	unsigned n = 0, nbad = 0;
	CHECK(ferry_state_list(sub, &all, &n, &nbad, &err) == 0, "listed");
	CHECK(n == 2 && nbad == 2, "two records, two damaged files skipped and counted (n=%u bad=%u)", n, nbad);
	free(all);

	ferry_err_clear(&err);
	CHECK(ferry_state_read(sub, FERRY_ROLE_SOURCE, 99, &back, &err) == -EPROTO, "a bad phase is an error");
	CHECK_MSG(err, "source-99.json", "naming the file: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_state_read(sub, FERRY_ROLE_SOURCE, 5, &back, &err) == -ENOENT, "no record: ENOENT");

	CHECK(ferry_state_remove(sub, FERRY_ROLE_SOURCE, 42, &err) == 0, "removed");
	CHECK(ferry_state_remove(sub, FERRY_ROLE_SOURCE, 42, &err) == 0, "removing again is fine");
	ferry_err_clear(&err);
	CHECK(ferry_state_read(sub, FERRY_ROLE_SOURCE, 42, &back, &err) == -ENOENT, "gone");

	CHECK(ferry_state_phase_final(FERRY_PHASE_DONE) && !ferry_state_phase_final(FERRY_PHASE_SENT) &&
		      !ferry_state_phase_final(FERRY_PHASE_UNKNOWN),
	      "done is final; sent and unknown need recovery");
	CHECK(ferry_state_phase_parse("unknown") == FERRY_PHASE_UNKNOWN && ferry_state_phase_parse("x") == 0,
	      "phase names parse");

	{
		/* A destination's record of a QEMU it started, whose monitor is
		 * gone: recover ends that QEMU, found by its command line naming
		 * the monitor, and leaves a process that does not alone. */
		char qmp[300];
		snprintf(qmp, sizeof(qmp), "%s/web-1.qmp", dir);
		char qarg[400];
		snprintf(qarg, sizeof(qarg), "unix:%s,server=on,wait=off", qmp);
		pid_t ours = fork(), other = ours > 0 ? fork() : -1;
		if (ours == 0 || other == 0) {
			/* Their own process group, off our stdout: the shell's
			 * sleep must neither outlive the test holding the test
			 * runner's pipe open nor escape the final kill. */
			setpgid(0, 0);
			int nul = open("/dev/null", O_WRONLY);
			if (nul >= 0) {
				dup2(nul, 1);
				dup2(nul, 2);
			}
			execlp("sh", "sh", "-c", "sleep 30; :", "-qmp", ours == 0 ? qarg : "unix:/elsewhere.qmp",
			       (char *)NULL);
			_exit(127);
		}
		CHECK(ours > 0 && other > 0, "two stand-ins for QEMU");
		usleep(100000);
		struct ferry_state_record dr = { .id = 77, .role = FERRY_ROLE_DESTINATION, .phase = FERRY_PHASE_PREPARED,
						.spawned_pid = ours };
		snprintf(dr.qmp, sizeof(dr.qmp), "%s", qmp);
		CHECK(ferry_state_write(sub, &dr, &err) == 0, "destination record with a started QEMU");
		ferry_err_clear(&err);
		json_t *rep = ferry_recover_destination(sub, 77, false, false, &err);
		const char *note = json_string_value(json_object_get(rep, "note"));
		CHECK(note && strstr(note, "the QEMU this daemon started for it was ended"), "recover ends it: %s",
		      note ? note : err.msg);
		json_decref(rep);
		int ws = 0;
		CHECK(waitpid(ours, &ws, 0) == ours && WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL, "killed");
		dr.id = 78;
		dr.phase = FERRY_PHASE_PREPARED;
		dr.spawned_pid = other;
		CHECK(ferry_state_write(sub, &dr, &err) == 0, "a record whose pid is another process now");
		rep = ferry_recover_destination(sub, 78, false, false, &err);
		note = json_string_value(json_object_get(rep, "note"));
		CHECK(note && !strstr(note, "was ended") && kill(other, 0) == 0, "that one is left alone: %s",
		      note ? note : err.msg);
		json_decref(rep);
		kill(other, SIGKILL);
		waitpid(other, &ws, 0);
		kill(-ours, SIGKILL);
		kill(-other, SIGKILL);
	}

	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	CHECK(system(cmd) == 0, "cleaned up");
	CHECK_DONE();
}
