/* Tunnels: unix-socket connections on this host carried to a unix socket on
 * a peer host through both daemons' data planes.
 *
 * A standing tunnel listens on a path for as long as it exists and gives each
 * connection its own session (one stream, its own lanes), so any number of
 * migrations can use it one after another, and several connections of one
 * migration (QEMU's main channel, then its multifd channels) move in parallel.
 * It accepts the next connection only once the peer has connected the
 * previous one to the target: the destination sees the source's order, which
 * QEMU 7.2 uses to name its channels. */
#ifndef FERRY_TUNNEL_H
#define FERRY_TUNNEL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "../dataplane/dataplane.h"
#include "../drivers/err.h"
#include "jsonline.h"

/* Ask the peer daemon (over ctl) for a destination session with open_req,
 * then create the matching source session: listen on listen_path (NULL: the
 * caller adds streams itself). On success *sid is the session id. */
int ferry_tunnel_session_open(struct ferry_dp *dp, struct ferry_jl *ctl, json_t *open_req, unsigned lanes,
			      unsigned streams, const char *listen_path, struct ferry_session **out, uint32_t *sid,
			      double *peer_cpu, struct ferry_err *err);

struct ferry_standing_tunnel;

struct ferry_standing_tunnel_params {
	struct ferry_dp *dp;
	const char *peer;          /* HOST:PORT of the peer daemon's control listener */
	const char *listen_path;   /* local unix path to listen on (already confined by the caller) */
	const char *target;        /* the peer's unix path, as the peer will resolve it */
	unsigned lanes;            /* lanes per connection; 0 = 1 */
	bool connect_now;          /* reach the peer before returning (fail if it refuses) */
	void (*log)(void *ctx, const char *msg);
	void *log_ctx;
};

struct ferry_standing_tunnel_stats {
	uint64_t connections;      /* accepted so far */
	uint64_t failed;           /* connections that could not be carried, or whose session failed */
	unsigned active;
	uint64_t tx_bytes, rx_bytes;
	char last_error[FERRY_ERR_MSG_MAX];
};

int ferry_standing_tunnel_start(const struct ferry_standing_tunnel_params *p, struct ferry_standing_tunnel **out,
				struct ferry_err *err);
void ferry_standing_tunnel_stats(struct ferry_standing_tunnel *t, struct ferry_standing_tunnel_stats *st);
/* Stop listening, close every connection's session (the peer is told), free. */
void ferry_standing_tunnel_stop(struct ferry_standing_tunnel *t);

#endif
