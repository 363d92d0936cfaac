/* The reliable-lane shim: any datagram backend (drivers/dgram.h) as a
 * driver with the ordinary ops table semantics (drivers/driver.h).
 *
 * Each lane is one rlane (reliable.h) on one backend queue: tx_burst queues
 * a frame as one message (its 32-byte header, then the payload, referenced
 * until the peer has it all); tx_flush runs the rlane (sends, retransmits,
 * acks; takes input nobody read for 100 us, so a caller that only sends
 * still acks and learns acks) and pushes the backend's batch out; poll_completions hands back the
 * cookies of frames the peer acknowledged whole; rx_burst feeds received
 * datagrams to the rlane and returns frames in order, DATA and REGION_WRITE
 * payloads pending (rx_payload copies them out of the rlane). The caps are
 * FERRY_DRV_RELIABLE only: the data plane uses its copy path.
 *
 * Lanes and queues: a lane's active side picks the least loaded queue q and
 * a random connection id, and talks to the peer's queue q (so point-to-point
 * links like memif, which steer by queue index, work too); the passive side
 * learns a new lane from the first datagram of an unknown connection that
 * carries a HELLO frame, on whichever queue it arrived. Several lanes may
 * share a queue: a poller that receives another lane's datagram hands it
 * over (a copy into that lane's inbox and a wakeup). The data plane's own
 * HELLO handshake runs unchanged on top.
 *
 * Options (beside the backend's own, in the same list):
 *   fault=SPEC      fault injector on every lane's sent datagrams (fault.h
 *                   syntax: drop=0.01,dup=0.01,reorder=0.02,corrupt=0.001,seed=1)
 *   rl_window=N     receive window and most packets in flight (default 512)
 *   rl_dead_ms=MS   a lane fails when the peer is silent this long (default 5000)
 *   rl_rate=BYTES   pacing ceiling per lane, bytes/s (default none)
 *   poll_us=US      wakeup period for backends without a wakeup fd (default 200)
 */
#ifndef FERRY_RLDRV_H
#define FERRY_RLDRV_H

#include <stdint.h>

#include "../drivers/dgram.h"
#include "../drivers/driver.h"
#include "../drivers/fault.h"
#include "reliable.h"

/* The ops table for backend b (name = b->name, open unused: see below). */
void ferry_rldrv_ops(const struct ferry_dgram_ops *b, struct ferry_driver_ops *out);
/* Open backend b and the shim's device over it. */
int ferry_rldrv_open(const struct ferry_dgram_ops *b, const struct ferry_driver_config *cfg,
		     struct ferry_device **out, struct ferry_err *err);

/* When this lane's rlane next needs to run (CLOCK_MONOTONIC ns; UINT64_MAX
 * for never): an idle poller must not sleep past it. */
uint64_t ferry_rldrv_next_deadline(struct ferry_lane_drv *lane);

/* A lane's reliability and fault counters (fault zeroed without an injector). */
void ferry_rldrv_lane_stats(struct ferry_lane_drv *lane, struct ferry_rl_stats *rl, struct ferry_fault_stats *fault);

#endif
