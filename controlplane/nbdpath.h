/* NBD paths: an NBD export on the destination host served on the source
 * host, its requests carried as block messages (dataplane/nbd.h,
 * docs/nbd.md) over data-plane lanes.
 *
 * Source: ferry serves NBD on a unix socket with the size and flags the
 * destination learned from the target export when the path was opened. Each
 * client gets a session of N lanes; its requests are spread over the lanes
 * and are in flight in parallel; FLUSH waits for every earlier request's
 * reply, then flushes on every lane.
 * Destination: each lane is one NBD client connection to the target export;
 * requests are issued there as they arrive and replies go back. */
#ifndef FERRY_NBDPATH_H
#define FERRY_NBDPATH_H

#include <jansson.h>
#include <stdint.h>

#include "../dataplane/dataplane.h"
#include "../dataplane/nbd.h"
#include "../drivers/err.h"

struct ferry_nbd_registry;

struct ferry_nbd_registry *ferry_nbd_registry_new(struct ferry_dp *dp, const char *run_dir,
						  void (*log)(void *ctx, const char *msg), void *log_ctx);
/* Closes every path and destination session. */
void ferry_nbd_registry_free(struct ferry_nbd_registry *r);

/* Destination, peer requests (target already confined by the caller). */
json_t *ferry_nbd_peer_probe(struct ferry_nbd_registry *r, const char *target, const char *export,
			     struct ferry_err *err);
json_t *ferry_nbd_peer_session_open(struct ferry_nbd_registry *r, uint32_t id, const char *target,
				    const char *export, unsigned lanes, uint64_t window, struct ferry_err *err);
json_t *ferry_nbd_peer_session_close(struct ferry_nbd_registry *r, uint32_t id, struct ferry_err *err);

/* Source, admin requests (listen already confined by the caller). */
json_t *ferry_nbd_open(struct ferry_nbd_registry *r, uint32_t id, const char *peer, const char *listen,
		       const char *target, const char *export, unsigned lanes, struct ferry_err *err);
json_t *ferry_nbd_status(struct ferry_nbd_registry *r, uint32_t id, bool close_it, struct ferry_err *err);

/* info <-> JSON, as the probe reply carries it. */
json_t *ferry_nbd_info_json(const struct ferry_nbd_export_info *info);
int ferry_nbd_info_parse(json_t *j, struct ferry_nbd_export_info *info, struct ferry_err *err);

#endif
