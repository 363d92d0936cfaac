/* JSON-lines request/reply over a stream socket: the admin socket
 * (ferryctl <-> ferryd) and the control channel between two daemons. One JSON
 * object per line; a request has "cmd", a reply has "ok" (and "error" when
 * false). */
#ifndef FERRY_JSONLINE_H
#define FERRY_JSONLINE_H

#include <jansson.h>

#include "../drivers/err.h"

#define FERRY_JSONLINE_MAX (1u << 20)

struct ferry_jl {
	int fd;
	char *buf;
	size_t len, cap;
};

void ferry_jl_init(struct ferry_jl *jl, int fd);
void ferry_jl_close(struct ferry_jl *jl);   /* closes fd and frees */

/* Send one object as a line (does not steal msg). */
int ferry_jl_send(struct ferry_jl *jl, json_t *msg, int timeout_ms, struct ferry_err *err);
/* Receive one object (new reference). A line over FERRY_JSONLINE_MAX, non-JSON
 * or a non-object is -EPROTO naming it; EOF is -ECONNRESET. */
int ferry_jl_recv(struct ferry_jl *jl, int timeout_ms, json_t **msg, struct ferry_err *err);
/* Request and wait for the reply; a reply with ok=false becomes -EREMOTEIO
 * carrying the peer's "error" text. */
int ferry_jl_call(struct ferry_jl *jl, json_t *req, int timeout_ms, json_t **reply, struct ferry_err *err);

/* Connect helpers. */
int ferry_jl_connect_unix(const char *path, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err);
int ferry_jl_connect_tcp(const char *hostport, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err);

#endif
