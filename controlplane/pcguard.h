/* The postcopy set-up guard: ferry's hold on the source QEMU's migration
 * channels while a postcopy switch is not yet acknowledged.
 *
 * QEMU 7.2 has no postcopy-device state: once it has written its postcopy
 * package the source sits in postcopy-active, and a destination that then
 * fails leaves it postcopy-paused for good. The guard listens where the
 * source QEMU migrates to (migrate uri=unix:PATH) and relays each channel it
 * accepts to a data-plane stream. The first channel is QEMU's main channel
 * (with its return path); later ones are QEMU's postcopy-preempt channel,
 * relayed alike. Until commit:
 *  - QEMU never sees the data plane fail: the guard keeps its sockets open;
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

#define FERRY_PCGUARD_MAX_CHANNELS 2 /* main + postcopy-preempt */

struct ferry_pcguard;

/* Where each accepted channel's data-plane end goes: adopt takes dp_fd (a
 * connected socket) on success, e.g. as a session's next stream. */
typedef int (*ferry_pcguard_adopt_fn)(void *arg, int dp_fd, struct ferry_err *err);

/* Listen on path for up to max_channels connections from QEMU. */
int ferry_pcguard_start(struct ferry_pcguard **out, const char *path, unsigned max_channels,
			ferry_pcguard_adopt_fn adopt, void *adopt_arg, struct ferry_err *err);

/* The destination acknowledged it loaded every device: from now on QEMU's
 * channels are the destination's; a held SHUT is passed on. Refused (-EPIPE)
 * after a rescue, or when some of QEMU's bytes never reached the data plane
 * (the destination then lacks pages it needs: it must not run). */
int ferry_pcguard_commit(struct ferry_pcguard *g);

/* The destination failed before acknowledging: stop forwarding, swallow what
 * QEMU still sends. Refused (-EPERM) after commit. */
int ferry_pcguard_rescue(struct ferry_pcguard *g);

struct ferry_pcguard_state {
	unsigned channels;         /* accepted so far */
	bool committed, rescuing;
	bool peer_closed;          /* the main channel's data plane side ended */
	bool dp_broken;            /* QEMU's bytes stopped reaching it (swallowed since) */
	uint64_t to_peer_bytes;    /* QEMU's bytes forwarded to the data plane */
	uint64_t sunk_bytes;       /* main channel bytes swallowed since the data plane broke */
	int last_sunk_byte;        /* of the main channel; -1 if none */
	double quiet_s;            /* seconds since QEMU last sent a byte on any channel */
	unsigned rp_messages;      /* return-path messages passed to QEMU */
	bool shut_held;            /* the destination's SHUT waits for commit */
};
void ferry_pcguard_state(struct ferry_pcguard *g, struct ferry_pcguard_state *st);

/* Rescue only: QEMU has sent everything; answer its wait for the
 * destination's SHUT with success so its migration ends. */
int ferry_pcguard_send_shut(struct ferry_pcguard *g, struct ferry_err *err);

/* Stop the threads, close every socket, remove the listening path, free. */
void ferry_pcguard_stop(struct ferry_pcguard *g);

#endif
