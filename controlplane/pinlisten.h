/* Multifd handoff over kernel TCP: QEMU 7.2 takes multifd channels only from
 * a socket address it connects itself, so ferry cannot hand it connections
 * as it does a single channel. Instead the destination QEMU gets a listening
 * socket ferry made (`migrate-incoming tcp:fd:NAME`), bound to the data
 * address and pinned to the source host: a socket filter drops every packet
 * from any other address, so only the source host can reach it, and the
 * source QEMU connects its channels straight to it. */
#ifndef FERRY_PINLISTEN_H
#define FERRY_PINLISTEN_H

#include <stddef.h>

#include "../drivers/err.h"

/* A TCP listener on bind_ip (a port the kernel picks, returned in *port)
 * admitting only peer_ip; both numeric IPv4 or IPv6 of one family. */
int ferry_pinned_listen(const char *bind_ip, const char *peer_ip, int backlog, int *fd_out, unsigned *port,
			struct ferry_err *err);

/* The local address a connection to ip leaves from (the route's choice):
 * what a peer sees as our address, numeric, in out. */
int ferry_route_source(const char *ip, char *out, size_t len, struct ferry_err *err);

/* The host part of an endpoint "DRIVER:HOST:PORT" or "DRIVER:[V6]:PORT". */
int ferry_endpoint_host(const char *endpoint, char *out, size_t len, struct ferry_err *err);

#endif
