/* Recovery: deciding, from both daemons' durable records (state.h) and both
 * QEMUs' own state, what becomes of a migration whose daemon died or lost its
 * peer before the last step, so the VM ends up running on exactly one host.
 *
 * The source asks the destination (peer command "migrate-state"); the
 * destination finishes what its QEMU did without it: a QEMU that completed
 * loading runs the VM (resumed if it waits paused and the VM ran before), one
 * that failed is ended. Then the source ends its own QEMU if the destination
 * runs the VM, or resumes it if the destination does not have it. With the
 * destination unreachable nothing is decided: the source stays paused. */
#ifndef FERRY_RECOVER_H
#define FERRY_RECOVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "../drivers/err.h"

/* Destination side of "migrate-state": settle session's record (see above)
 * and describe it: {"phase": "done"|"failed"|"in-progress"|"none", "vm_status", "note"}.
 * busy: this daemon still holds a live session with that id (then nothing
 * is touched). */
json_t *ferry_recover_destination(const char *state_dir, uint32_t session, bool resume, bool busy,
				  struct ferry_err *err);

/* Source side: settle every unfinished source record (or only id, if not 0)
 * that is not still running here (in_progress says which are). Returns a JSON
 * array, one object per record: {"migration", "vm", "was", "decision",
 * "source", "detail"}. */
json_t *ferry_recover_source(const char *state_dir, uint32_t only_id, bool (*in_progress)(uint32_t id, void *ctx),
			     void *ctx, struct ferry_err *err);

#endif
