/* Kernel UDP datagram backend: one UDP socket per queue on consecutive
 * ports, batched with sendmmsg / recvmmsg. Runs anywhere; the reliable lane
 * on top (dataplane/rldrv.h) makes it a driver ("ferryd --driver udp").
 *
 * Options: bind=HOST:PORT (the first queue's port; 0 = any free run of
 * ports), queues=N (default 8, at most 64), dgram=BYTES (largest datagram
 * payload, both ends alike: default 1472 for a 1500-byte MTU, up to 65507),
 * sockbuf=BYTES (socket send and receive buffers, default 4 MiB). Endpoint:
 * "udp:HOST:FIRST-LAST" (queue q is port FIRST + q). */
#ifndef FERRY_UDP_H
#define FERRY_UDP_H

#include "../dgram.h"

extern const struct ferry_dgram_ops ferry_udp_dgram;

#endif
