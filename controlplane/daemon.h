/* ferryd's core: the admin socket (ferryctl's JSON requests), the control
 * listener for peer daemons, and the sessions, tunnels and migrations they
 * create. The ferryd binary only parses options and calls this. */
#ifndef FERRY_DAEMON_H
#define FERRY_DAEMON_H

#include <signal.h>

#include "../dataplane/dataplane.h"
#include "../drivers/err.h"
#include "tls.h"

#define FERRY_MAX_ALLOW_DIRS 8
#define FERRY_MAX_CONFIG_TUNNELS 16

/* A standing tunnel the daemon opens at start (see tunnel.h). */
struct ferry_tunnel_config {
	const char *peer;    /* HOST:PORT of the peer daemon */
	const char *listen;  /* local unix path, confined like tunnel-open's */
	const char *target;  /* the peer's unix path */
};

struct ferry_daemon_config {
	const char *admin_path;        /* unix socket for ferryctl (mode 0600) */
	const char *listen;            /* HOST:PORT for peer daemons' control connections */
	const char *run_dir;           /* stream sockets live here; default: the admin socket's directory */
	const char *allow_dirs[FERRY_MAX_ALLOW_DIRS]; /* further dirs peers may name (QMP sockets, tunnel targets) */
	struct ferry_dp_config dp;
	struct ferry_tls_config tls;   /* credentials for the control connection between daemons */
	const char *host_uuid;         /* this host's identity in cookies; NULL: from /etc/machine-id */
	const char *state_dir;         /* durable migration records; NULL: <run dir>/state */
	const char *cookie_log;        /* keep a copy of every cookie sent here; NULL: no */
	uint32_t disabled_features;    /* FERRY_F_* (plan.h) this host never offers */
	/* Prepare when no QEMU waits for the VM: start one from the source's
	 * description (spawn.h), unless no_spawn. */
	bool no_spawn;                 /* --disable spawn */
	const char *qemu;              /* the binary; NULL: qemu-system-x86_64 on PATH */
	const char *storage_dir;       /* disk images; NULL: /var/lib/ferry/images */
	const char *mem_dir;           /* RAM files of memory-backend-file; NULL: such VMs are not started */
	bool spawn_prealloc;           /* fault a started QEMU's RAM in before the migration */
	struct ferry_tunnel_config tunnels[FERRY_MAX_CONFIG_TUNNELS]; /* up to the first with peer == NULL */
	int verbose;
};

/* Runs until *stop becomes non-zero (set it from a signal handler). */
int ferry_daemon_run(const struct ferry_daemon_config *cfg, volatile sig_atomic_t *stop, struct ferry_err *err);

#endif
