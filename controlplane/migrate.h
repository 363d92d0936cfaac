/* Source-side migration driver: runs one QEMU migration through a ferry
 * session, talking to the source QEMU over QMP and to the destination daemon
 * over the control channel (which drives the destination QEMU). */
#ifndef FERRY_MIGRATE_H
#define FERRY_MIGRATE_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "../dataplane/dataplane.h"
#include "../drivers/err.h"

struct ferry_nbd_registry;

#define FERRY_MIG_MAX_DISKS 16
#define FERRY_MIG_MAX_SHARED 8

/* --postcopy-after auto: switch once QEMU starts a third pass over RAM, i.e.
 * when two passes did not converge (the guest dirties faster than the wire). */
#define FERRY_POSTCOPY_AFTER_AUTO 0xffffffffu
#define FERRY_POSTCOPY_AUTO_PASSES 3

struct ferry_migration_params {
	const char *src_qmp;      /* source QEMU's QMP unix socket */
	const char *dst_qmp;      /* destination QEMU's QMP socket, as the destination daemon sees it */
	const char *peer;         /* destination daemon, HOST:PORT */
	const char *run_dir;      /* where this daemon puts the source-side stream socket */
	unsigned channels;        /* multifd channels; 0 = single stream */
	unsigned lanes;           /* 0 = one lane per stream */
	int stall_timeout_s;      /* fail when no byte moves for this long; 0 = 120 */
	bool no_handoff;          /* keep ferry in the data path even where it could hand the connection to QEMU */
	uint32_t require;         /* FERRY_F_* (plan.h) the user insists on: missing is an error, not a fallback */
	uint32_t disabled;        /* FERRY_F_* this daemon's configuration masks */
	int transport;            /* enum ferry_cookie_driver_kind; 0 = the best both sides have */
	bool keep_source;         /* after success leave the source QEMU paused instead of ending it */
	bool suspend;             /* leave the VM paused on the destination (virsh migrate --suspend) */
	uint64_t max_bandwidth;   /* QEMU's max-bandwidth in bytes/s; 0 = no cap */
	bool postcopy;            /* switch to postcopy postcopy_after_ms into the migration */
	bool force_postcopy;      /* postcopy even without the set-up acknowledgement */
	unsigned postcopy_after_ms; /* or FERRY_POSTCOPY_AFTER_AUTO */
	const char *hostname;     /* this host, for the cookie */
	const char *hostuuid;
	const char *state_dir;    /* where the migration's durable record goes (state.h); NULL: none */
	const char *cookie_log;   /* keep each cookie sent here (ferryd --cookie-log); NULL: no */
	/* Storage migration (docs/protocol.md): the disks to mirror, by device,
	 * qdev id or node name; the directories on shared storage; the NBD
	 * registry the mirrors go through and an NBD path id for each disk. */
	unsigned ndisks, nshared;
	const char *disks[FERRY_MIG_MAX_DISKS];
	const char *shared_dirs[FERRY_MIG_MAX_SHARED];
	struct ferry_nbd_registry *nbd;
	uint32_t nbd_ids[FERRY_MIG_MAX_DISKS];
};

enum ferry_migration_state {
	FERRY_MIG_SETUP = 0,
	FERRY_MIG_ACTIVE,
	FERRY_MIG_COMPLETED,
	FERRY_MIG_FAILED,
	FERRY_MIG_CANCELLED,
};

/* Where a migration's time goes (migrate-status "phases"): the moment each
 * step ended, in seconds since the migration started. */
enum ferry_migration_mark {
	FERRY_MARK_QMP = 0,   /* source monitor connected, VM state read */
	FERRY_MARK_BEGIN,     /* Begin: source probed, cookie made */
	FERRY_MARK_CONNECTED, /* control connection to the destination daemon up (TLS) */
	FERRY_MARK_PREPARED,  /* Prepare answered: plan agreed, destination QEMU listening */
	FERRY_MARK_CAPS,      /* source QEMU's capabilities and parameters set */
	FERRY_MARK_LANE,      /* token lane up (data connection authenticated) */
	FERRY_MARK_HANDOFF,   /* destination took its end of the connection */
	FERRY_MARK_MIGRATE,   /* `migrate` accepted by the source QEMU */
	FERRY_MARK_SENT,      /* source QEMU reported completed */
	FERRY_MARK_TIMINGS,   /* source QEMU's total-time read */
	FERRY_MARK_FINISHED,  /* Finish answered: destination QEMU completed */
	FERRY_MARK_END,       /* migration over, state published */
	FERRY_MARK_COUNT
};

const char *ferry_migration_mark_name(enum ferry_migration_mark k);

struct ferry_migration_progress {
	enum ferry_migration_state state;
	double t0_mono;             /* CLOCK_MONOTONIC seconds at the start (one clock for every process of a host) */
	double marks[FERRY_MARK_COUNT]; /* seconds since t0_mono; 0 = not reached */
	/* The destination daemon's own accounting (ms): Prepare's monitor
	 * connection, its probes, the whole Prepare; how long Finish waited for
	 * its QEMU to complete, and the whole Finish. -1 = not told. */
	double dst_qmp_ms, dst_probe_ms, dst_prepare_ms, dst_finish_wait_ms, dst_finish_ms;
	char qemu_status[32];       /* the source QEMU's migration status */
	char transport[160];        /* e.g. "tcp handoff", "tcp relay, 5 lanes", "dpdk relay, 5 streams on 4 lanes ..." */
	uint64_t ram_total, ram_transferred, ram_remaining;
	double throughput_gbs;      /* GB/s over the last interval */
	double dirty_rate_bps;      /* bytes/s the guest dirties */
	double elapsed_s;
	double setup_s, total_s, downtime_ms;  /* from QEMU once completed */
	char src_vm_status[32];     /* after a failure: what the source VM is doing */
	char dst_status[32];
	char plan[96];              /* what was agreed, e.g. "tcp relay, 2 multifd channels" */
	char fallbacks[600];        /* fallbacks taken, "; "-separated ("" = none) */
	char warning[256];          /* e.g. the durable record could not be written */
	char storage[160];          /* storage migration: the mirrors' state ("" = none) */
	double postcopy_at_s;       /* when the switch to postcopy was made (0: never) */
	unsigned postcopy_recoveries; /* postcopy resumed over new lanes after a cut */
	bool reliable;              /* datagram lanes (dpdk, udp): rel is the session's sum */
	struct ferry_rel_stats rel;
	char error[FERRY_ERR_MSG_MAX];
};

struct ferry_migration;

int ferry_migration_start(struct ferry_dp *dp, const struct ferry_migration_params *p, uint32_t id,
			  struct ferry_migration **out, struct ferry_err *err);
void ferry_migration_progress(struct ferry_migration *m, struct ferry_migration_progress *out);
void ferry_migration_cancel(struct ferry_migration *m);
bool ferry_migration_done(struct ferry_migration *m);
/* Wait up to timeout_ms for the migration to end; true once it has. Lets a
 * watcher see the end the moment it happens instead of at its next look. */
bool ferry_migration_wait(struct ferry_migration *m, int timeout_ms);
/* Joins the worker (cancel first to hurry it). */
void ferry_migration_free(struct ferry_migration *m);

const char *ferry_migration_state_name(enum ferry_migration_state s);

/* The plan's capabilities and parameters on one side's QEMU, in one write
 * (each round trip to QEMU is set-up time the user waits for). Both sides
 * turn on events; the rest as the fields say. */
struct ferry_migrate_caps {
	unsigned channels;      /* multifd channels (multifd on and multifd-channels set); 0: none */
	bool multifd_always;    /* with no channels, still send multifd off (the source, whose QEMU has the
				 * capability: an earlier setting must not linger); else multifd only when used */
	bool postcopy, preempt; /* postcopy-ram, postcopy-preempt on */
	uint64_t max_bandwidth; /* bytes/s; 0: not sent (the destination does not send it) */
};
struct ferry_qmp;
int ferry_migrate_set_caps(struct ferry_qmp *q, const struct ferry_migrate_caps *c, struct ferry_err *err);

/* The flow-control window both daemons use: the peer's offer if it is a sane
 * size no larger than ours, else ours (the smaller of the two settings). */
uint64_t ferry_agree_window(json_t *offer, uint64_t mine);

/* Read the destination daemon's reply to a session-creating request
 * (session id, token, data endpoint, agreed window) into sp and endpoint. */
int ferry_session_reply_parse(json_t *reply, uint64_t my_window, struct ferry_session_params *sp, char *endpoint,
			      size_t eplen, struct ferry_err *err);

#endif
