/* DPDK datagram backend: one DPDK port, N rx/tx queue pairs (one per lane),
 * ferry's datagrams as UDP/IPv4 payloads, queue q on UDP port udp_port + q
 * (steered with rte_flow rules where the PMD has them; on point-to-point
 * PMDs such as memif the queue index itself steers). Receive copies each
 * datagram out of its mbuf; transmit sends the payload by reference (an
 * mbuf attached to it, chained after the headers) where the PMD copies mbuf
 * chains by address, else copies it into an mbuf. The reliable lane on top
 * (dataplane/rldrv.h) makes it a driver ("ferryd --driver dpdk").
 *
 * Options: eal="ARGS" (passed to rte_eal_init; default: --in-memory with
 * free hugepages, else --no-huge -m 1024; --no-pci; -l 0), vdev=SPEC (an
 * extra --vdev, e.g. net_memif0,role=server,socket=/run/x.sock,bsize=9216),
 * port=N (default: the first), queues=N (default 1), mtu=N (default 9000,
 * lowered to what the PMD allows), ip=A.B.C.D (this end's address, default
 * 198.18.0.1), udp_port=N (first queue's port, default 47000), ring=N
 * (descriptors per queue, default 1024), mbufs=N (pool size; default sized
 * from queues and ring), tx=auto|copy|ref (the transmit path; auto picks by
 * PMD, ref fails where the PMD cannot). Endpoint: "dpdk:MAC/IP:FIRST-LAST". */
#ifndef FERRY_DPDK_H
#define FERRY_DPDK_H

#include "../dgram.h"

extern const struct ferry_dgram_ops ferry_dpdk_dgram;

#endif
