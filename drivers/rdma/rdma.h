/* RDMA verbs driver: one RC queue pair per lane, set up with librdmacm.
 *
 * Endpoint "rdma:IP:PORT" (an address of the RDMA device, as rdma_cm binds
 * it). Options: bind=IP:PORT (ferryd's --data), dev=NAME (a verbs device: use
 * the IPv4 address of its first active port instead of bind's host, and
 * refuse to start if bind's address is on another device), gid=GID (the same
 * by RoCEv2 GID, "::ffff:198.18.0.1"), keepalive_ms=N (probe an idle lane
 * this often, default 1000, 0 = never) and dead_ms=N (fail a lane whose peer
 * sent nothing for this long, default 15000), test_cq_entries=N (tests only:
 * a CQ too small for a lane's work). See docs/wire-format.md (RDMA lanes)
 * for the messages, credits and one-sided region writes. */
#ifndef FERRY_RDMA_H
#define FERRY_RDMA_H

#include "../driver.h"

extern const struct ferry_driver_ops ferry_rdma_driver;

#endif
