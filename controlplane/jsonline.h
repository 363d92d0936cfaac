/* JSON-lines request/reply over a stream socket: the admin socket
 * (ferryctl <-> ferryd) and the control channel between two daemons. One JSON
 * object per line; a request has "cmd", a reply has "ok" (and "error" when
 * false). The control channel runs over TLS when the daemon has credentials
 * (tls.h): send, recv and call work the same either way. */
#ifndef FERRY_JSONLINE_H
#define FERRY_JSONLINE_H

#include <stdbool.h>

#include <gnutls/gnutls.h>
#include <jansson.h>

#include "../drivers/err.h"
#include "tls.h"

#define FERRY_JSONLINE_MAX (1u << 20)

struct ferry_jl {
	int fd;
	char *buf;
	size_t len, cap;
	gnutls_session_t tls;   /* NULL: plain bytes on fd */
};

void ferry_jl_init(struct ferry_jl *jl, int fd);
void ferry_jl_close(struct ferry_jl *jl);   /* TLS close_notify (bounded), closes fd and frees */

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
/* TCP to a peer daemon; with the process-wide TLS context (ferry_jl_set_tls)
 * the TLS handshake is part of the connect, within timeout_ms. */
int ferry_jl_connect_tcp(const char *hostport, int timeout_ms, struct ferry_jl *jl, struct ferry_err *err);
/* Keepalive probes and a user timeout on a control connection's TCP socket,
 * so a peer host that vanished without a FIN is noticed in about 30 s; and
 * TCP_NODELAY, so a request never waits for the peer's delayed ACK. */
void ferry_jl_tcp_setup(int fd);
/* The same with an explicit context (NULL: plain TCP). */
int ferry_jl_connect_tcp_tls(const char *hostport, int timeout_ms, struct ferry_tls *tls, struct ferry_jl *jl,
			     struct ferry_err *err);
/* Set once by the daemon before it starts threads (NULL: plain TCP); the
 * context must outlive every connection made with it. */
void ferry_jl_set_tls(struct ferry_tls *tls);
struct ferry_tls *ferry_jl_get_tls(void);
/* Server side of an accepted connection: the TLS handshake, bounded by
 * timeout_ms. On failure jl stays plain (the caller closes it). */
int ferry_jl_accept_tls(struct ferry_jl *jl, struct ferry_tls *tls, int timeout_ms, struct ferry_err *err);

/* True when the peer has closed the connection, judged without blocking;
 * bytes that arrived meanwhile are kept for the next ferry_jl_recv. */
bool ferry_jl_peer_gone(struct ferry_jl *jl);

#endif
