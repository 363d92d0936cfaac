/* The postcopy set-up guard: ferry's hold on the source QEMU's main
 * migration channel while a postcopy switch is not yet acknowledged.
 *
 * QEMU 7.2 has no postcopy-device state: once it has written its postcopy
 * package the source sits in postcopy-active, and a destination that then
 * fails leaves it postcopy-paused for good. The guard sits between the source
 * QEMU (one end of a socketpair, given to QEMU with getfd) and the data plane
 * (the other socketpair, adopted as the session's stream). Until commit:
 *  - QEMU never sees the data plane fail: the guard keeps QEMU's socket open;
 *  - return-path messages pass whole, except SHUT, which is held;
 *  - on rescue the guard sinks what QEMU still sends, and once QEMU has sent
 *    its last byte, answers SHUT(0) itself, so QEMU completes into nothing
 *    and its VM (stopped, RAM and devices intact) can be resumed with cont.
 * After commit the guard is a plain relay (stream bytes by splice, so the
 * process must ignore SIGPIPE, as ferryd does). */
#ifndef FERRY_PCGUARD_H
#define FERRY_PCGUARD_H

#include <stdbool.h>
#include <stdint.h>

#include "../drivers/err.h"

struct ferry_pcguard;

/* Start the guard. *qemu_fd is the end for QEMU (pass it with getfd, then
 * close it), *dp_fd the end for the data plane (ferry_session_add_stream). */
int ferry_pcguard_start(struct ferry_pcguard **out, int *qemu_fd, int *dp_fd, struct ferry_err *err);

/* The destination acknowledged it loaded every device: from now on QEMU's
 * channel is the destination's; a held SHUT is passed on. Refused (-EPIPE)
 * after a rescue, or when some of QEMU's bytes never reached the data plane
 * (the destination then lacks pages it needs: it must not run). */
int ferry_pcguard_commit(struct ferry_pcguard *g);

/* The destination failed before acknowledging: stop forwarding, swallow what
 * QEMU still sends. Refused (-EPERM) after commit. */
int ferry_pcguard_rescue(struct ferry_pcguard *g);

struct ferry_pcguard_state {
	bool committed, rescuing;
	bool peer_closed;          /* the data plane side ended */
	bool dp_broken;            /* QEMU's bytes stopped reaching it (swallowed since) */
	uint64_t to_peer_bytes;    /* QEMU's bytes forwarded to the data plane */
	uint64_t sunk_bytes;       /* QEMU's bytes swallowed since rescue */
	int last_sunk_byte;        /* -1 if none */
	double quiet_s;            /* seconds since QEMU last sent a byte */
	unsigned rp_messages;      /* return-path messages passed to QEMU */
	bool shut_held;            /* the destination's SHUT waits for commit */
};
void ferry_pcguard_state(struct ferry_pcguard *g, struct ferry_pcguard_state *st);

/* Rescue only: QEMU has sent everything; answer its wait for the
 * destination's SHUT with success so its migration ends. */
int ferry_pcguard_send_shut(struct ferry_pcguard *g, struct ferry_err *err);

/* Stop the threads, close every end, free. */
void ferry_pcguard_stop(struct ferry_pcguard *g);

#endif
