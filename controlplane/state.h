/* Durable migration records: each daemon writes one small file per
 * migration it takes part in and rewrites it at every phase change, so that
 * after a crash or restart it knows where each migration stood, and
 * `ferryctl recover` can decide from both sides' records what must happen to
 * the VM (end the source, or resume it).
 *
 * A record is written to a temporary file, fsync'ed and renamed over the old
 * one (then the directory is fsync'ed): a reader sees the old record or the
 * new one, never a torn one. */
#ifndef FERRY_STATE_H
#define FERRY_STATE_H

#include <stdbool.h>
#include <stdint.h>

#include "../drivers/err.h"

#define FERRY_STATE_PATH_MAX 512

enum ferry_state_role {
	FERRY_ROLE_SOURCE = 1,
	FERRY_ROLE_DESTINATION,
};

/* Phases, in order. A source passes begin .. confirmed; a destination
 * prepared .. finished. The last four are final. */
enum ferry_state_phase {
	FERRY_PHASE_BEGIN = 1,     /* source: cookie built */
	FERRY_PHASE_PREPARED,      /* both: the destination is ready, a session exists */
	FERRY_PHASE_PERFORMING,    /* source: QEMU migrating */
	FERRY_PHASE_SENT,          /* source: QEMU completed; the destination's verdict pending */
	FERRY_PHASE_DONE,          /* final: source ended (or kept) / destination runs the VM */
	FERRY_PHASE_FAILED,        /* final: the VM stays (or was put back) on the source */
	FERRY_PHASE_CANCELLED,     /* final: cancelled by the user, VM on the source */
	FERRY_PHASE_UNKNOWN,       /* final until recovered: the source is paused, the destination's fate unknown */
};

struct ferry_state_record {
	uint32_t id;                      /* source: migration id; destination: session id */
	uint32_t session;                 /* source: the destination's session id (0 until prepared) */
	enum ferry_state_role role;
	enum ferry_state_phase phase;
	char vm[1025];                    /* VM name (UTF-8, up to 256 characters) */
	char peer[256];                   /* source: destination daemon HOST:PORT; destination: source host name */
	char qmp[FERRY_STATE_PATH_MAX];   /* this side's QEMU monitor */
	char peer_qmp[FERRY_STATE_PATH_MAX]; /* source: the destination QEMU's monitor, as the destination names it */
	bool was_running;                 /* source: the VM ran before the migration */
	int64_t spawned_pid;              /* destination: the QEMU this daemon started for it (0: attached) */
	int64_t updated;                  /* seconds since the epoch */
	char note[256];                   /* last error or outcome */
};

const char *ferry_state_phase_name(enum ferry_state_phase p);
enum ferry_state_phase ferry_state_phase_parse(const char *name); /* 0 if unknown */
bool ferry_state_phase_final(enum ferry_state_phase p);

/* Make sure dir exists (mode 0700). */
int ferry_state_init(const char *dir, struct ferry_err *err);
/* Write (create or replace) the record's file, durably. */
int ferry_state_write(const char *dir, const struct ferry_state_record *r, struct ferry_err *err);
/* Read one record back. -ENOENT if there is none. */
int ferry_state_read(const char *dir, enum ferry_state_role role, uint32_t id, struct ferry_state_record *r,
		     struct ferry_err *err);
int ferry_state_remove(const char *dir, enum ferry_state_role role, uint32_t id, struct ferry_err *err);
/* Every record in dir, in no particular order: *out is malloc'ed (free it),
 * *n its length. Unreadable or malformed files are skipped and counted in
 * *bad (a daemon must start even if one record is damaged). */
int ferry_state_list(const char *dir, struct ferry_state_record **out, unsigned *n, unsigned *bad,
		     struct ferry_err *err);

#endif
