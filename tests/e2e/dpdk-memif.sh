#!/usr/bin/env bash
# dpdk-memif.sh - two ferryd --driver dpdk joined by net_memif (a shared-memory
# NIC between the two processes, DPDK in copy mode, 9000-byte frames): one
# session of 4 streams over 4 lanes (4 memif queue pairs), DPDK_MEMIF_MB
# (default 1024, 256 in the sanitizer build) of random data on each; sha256 identical at the far end.
# Then the same with injected loss, reordering, duplication and corruption:
# at 1 % loss (a quarter of the size), and at 5 % loss with 5 % reordering, 2 %
# duplication and 1 % corruption (DPDK_MEMIF_5PCT_MB per stream, default 32:
# small so the stage stays near 10 s in CI), where the source's tunnel-status
# must also show retransmissions and corrupt frames dropped: proof that the
# repair happened, not just that the bytes came through. The first round sends
# payload by reference (tunnel-status tx_by_ref > 0); the last, a memif client
# started before its server (which must wait for it), has the source copying
# (tx=copy): both paths carry identical bytes.
#
# Exit: 0 pass, 1 fail, 77 skip (no DPDK driver in this build, or DPDK cannot
# start here). Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py
# the sanitizer build moves a quarter: the plain build carries the issue's 1 GiB per stream
if [ "${FERRY_SANITIZED:-0}" = 1 ]; then mb=${DPDK_MEMIF_MB:-256}; else mb=${DPDK_MEMIF_MB:-1024}; fi

ferry_init --timeout 280
allow=$QEMU_DIR/b-allowed
mkdir -p "$allow"
python3 "$check" serve "$allow/target.sock" "$QEMU_DIR/accepted.log" </dev/null >"$QEMU_DIR/serve.out" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")

# pair NAME-SUFFIX [extra driver options]: a memif server "a$1" and client "b$1"
pair() {
	local sfx=$1 sock=$QEMU_DIR/memif$1.sock
	shift
	local -a common=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972 "$@")
	ferry_start_daemon "a$sfx" "${common[@]}" --driver-opt "vdev=net_memif0,role=server,socket=$sock,bsize=9216" \
		--driver-opt eal=-l0 --driver-opt ip=198.18.0.1 || return 1
	ferry_start_daemon "b$sfx" "${common[@]}" --driver-opt "vdev=net_memif0,role=client,socket=$sock,bsize=9216" \
		--driver-opt eal=-l1 --driver-opt ip=198.18.0.2 --allow-dir "$allow" || return 1
}

if ! pair 1; then
	grep -q "no driver named 'dpdk'" "$QEMU_DIR"/ferryd-a1.log && ferry_skip "this build has no DPDK driver (libdpdk-dev)"
	grep -q "rte_eal_init" "$QEMU_DIR"/ferryd-a1.log && ferry_skip "DPDK cannot start here: $(grep -m1 rte_eal_init "$QEMU_DIR"/ferryd-a1.log)"
	ferry_fail "starting the memif pair failed"
fi
grep -q "data dpdk:[0-9a-f:]*/198.18.0.1:47000-47003 (dpdk driver" "${FERRY_LOG[a1]}" ||
	ferry_fail "ferryd a1 does not report its dpdk endpoint with 4 queues"

round() { # label daemon-suffix
	local out t0
	out=$(ferry_ctl "a$2" tunnel-open --to "${FERRY_LISTEN[b$2]}" --listen "$QEMU_DIR/t$2.sock" \
		--target "$allow/target.sock" --streams 4) || ferry_fail "$1: tunnel-open failed: $out"
	tunnel=$(json_field tunnel <<<"$out")
	t0=$(now_ms)
	out=$(python3 "$check" client "$QEMU_DIR/t$2.sock" "x$2a,x$2b,x$2c,x$2d" $((mb << 20)) 240) ||
		ferry_fail "$1: 4 x $mb MiB were not carried whole: $out"
	echo "$1: 4 x $mb MiB, sha256 identical, in $(($(now_ms) - t0)) ms"
}
round "memif" 1
# memif in copy mode reads mbuf chains by address: the payload goes by
# reference (docs/performance.md, "Transmit path")
ferry_dpdk_tx_path a1 "$tunnel" ref net_memif memif
ferry_stop_daemon a1
ferry_stop_daemon b1

# the same with faults on every datagram both daemons send
fmb=$((mb / 4))
[ "$fmb" -ge 1 ] || fmb=1
pair 2 --driver-opt fault=drop=1%,reorder=2%,dup=1%,corrupt=0.1%,seed=5 || ferry_fail "starting the faulty memif pair failed"
mb=$fmb round "memif, 1% loss + reorder + dup + corruption" 2
ferry_stop_daemon a2
ferry_stop_daemon b2

# 5 % loss: the counters of the source's lanes must show the repair
pair 3 --driver-opt fault=drop=5%,reorder=5%,dup=2%,corrupt=1%,seed=9 || ferry_fail "starting the 5 % loss memif pair failed"
mb=${DPDK_MEMIF_5PCT_MB:-32} round "memif, 5% loss + reorder + dup + corruption" 3
st=$(ferry_ctl a3 tunnel-status "$tunnel") || ferry_fail "tunnel-status $tunnel failed: $st"
rel=$(json_field stats.reliable <<<"$st") || ferry_fail "tunnel-status has no reliability counters: $st"
echo "5% loss, source lanes: $rel"
for k in retransmits corrupt_drops fault_dropped fault_corrupted dup_drops; do
	v=$(json_field "stats.reliable.$k" <<<"$st")
	[ "${v:-0}" -gt 0 ] || ferry_fail "5% loss: reliable.$k is ${v:-missing}, expected > 0: $rel"
done
lanes=$(json_field stats.lane <<<"$st" | python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin) if "reliable" in l))')
[ "$lanes" = 4 ] || ferry_fail "5% loss: $lanes of 4 lanes report reliability counters: $st"
ferry_stop_daemon a3
ferry_stop_daemon b3
# A memif client started before its server (both daemons started at once, as
# perf/bench-nbd.sh does) waits for it: it connects again until its link is
# up. (DPDK 22.11's client gave up at once without a socket, and one that
# connected while its server's port was not yet started kept the link down
# for good: every lane then failed "peer silent for 5000 ms".)
sock=$QEMU_DIR/memif4.sock
(ferry_start_daemon b4 --driver dpdk --driver-opt queues=1 --driver-opt dgram=8972 --allow-dir "$allow" \
	--driver-opt "vdev=net_memif0,role=client,socket=$sock,bsize=9216" --driver-opt eal=-l1 --driver-opt ip=198.18.0.2 &&
	echo "${FERRY_PID[b4]} ${FERRY_LISTEN[b4]}" >"$QEMU_DIR/b4.started") &
client=$!
sleep 1
ferry_start_daemon a4 --driver dpdk --driver-opt queues=1 --driver-opt dgram=8972 --driver-opt tx=copy \
	--driver-opt "vdev=net_memif0,role=server,socket=$sock,bsize=9216" --driver-opt eal=-l0 --driver-opt ip=198.18.0.1 ||
	ferry_fail "starting the memif server after its client failed"
wait "$client" || ferry_fail "a memif client started 1 s before its server did not wait for it: $(grep -h "dpdk driver" "$QEMU_DIR/ferryd-b4.log")"
read -r "FERRY_PID[b4]" "FERRY_LISTEN[b4]" <"$QEMU_DIR/b4.started"
FERRY_ADMIN[b4]=$QEMU_DIR/b4/admin.sock
FERRY_LOG[b4]=$QEMU_DIR/ferryd-b4.log
mb=16 round "memif, client started 1 s before its server, the source copying (tx=copy)" 4
ferry_dpdk_tx_path a4 "$tunnel" copy net_memif "memif, tx=copy"
ferry_stop_daemon a4
ferry_stop_daemon b4
# a transmit path that does not exist is refused, naming the option
if ferry_start_daemon a5 --driver dpdk --driver-opt tx=sometimes --driver-opt eal=-l0 \
	--driver-opt "vdev=net_memif0,role=server,socket=$QEMU_DIR/memif5.sock,bsize=9216" 2>/dev/null; then
	ferry_fail "ferryd started with tx=sometimes"
fi
grep -q "tx=sometimes is not auto, copy or ref" "$QEMU_DIR/ferryd-a5.log" ||
	ferry_fail "tx=sometimes: no clear error: $(tail -n 2 "$QEMU_DIR/ferryd-a5.log")"
echo "PASS dpdk-memif in $(ferry_elapsed)s"
exit 0
