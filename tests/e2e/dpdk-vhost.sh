#!/usr/bin/env bash
# dpdk-vhost.sh - two ferryd --driver dpdk joined by a vhost-user socket: one
# serves it with net_vhost (the "host" side), the other drives it with
# net_virtio_user (the "guest" side; DPDK memory in one file segment, which
# the vhost side maps). One session of 4 streams over 4 lanes (4 queue
# pairs), DPDK_VHOST_MB (default 1024; 256 in the sanitizer build) of random data on each from the vhost
# side to the virtio side, then a quarter of that the other way (the test
# stays within ~60 s on a 2-core host): sha256 identical at the far end; the
# vhost side sends payload by reference, the virtio side copies.
#
# Exit: 0 pass, 1 fail, 77 skip (no DPDK driver in this build, or DPDK
# cannot start here). Environment: tests/lib/ferry.sh; DPDK_VHOST_MB.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py
# the sanitizer build moves a quarter: the plain build carries the issue's 1 GiB per stream
if [ "${FERRY_SANITIZED:-0}" = 1 ]; then mb=${DPDK_VHOST_MB:-256}; else mb=${DPDK_VHOST_MB:-1024}; fi
nq=4

ferry_init --timeout 280
for s in a b; do
	mkdir -p "$QEMU_DIR/$s-allowed"
	python3 "$check" serve "$QEMU_DIR/$s-allowed/target.sock" "$QEMU_DIR/accepted-$s.log" </dev/null \
		>"$QEMU_DIR/serve-$s.out" 2>&1 &
	FERRY_EXTRA_PIDS+=("$!")
done
sock=$QEMU_DIR/vhost.sock
rm -f "$sock" # a socket file left behind keeps net_vhost from starting
common=(--driver dpdk --driver-opt "queues=$nq")
# --no-shconf: no shared config files left in /var/run/dpdk (the memory the
# vhost side maps is a memfd either way)
if ! ferry_start_daemon a "${common[@]}" --driver-opt "vdev=net_vhost0,iface=$sock,queues=$nq" \
	--driver-opt "eal=-l0 --no-shconf" --driver-opt ip=198.18.0.1 --allow-dir "$QEMU_DIR/a-allowed"; then
	grep -q "no driver named 'dpdk'" "${FERRY_LOG[a]}" && ferry_skip "this build has no DPDK driver (libdpdk-dev)"
	grep -q "rte_eal_init" "${FERRY_LOG[a]}" && ferry_skip "DPDK cannot start here: $(grep -m1 rte_eal_init "${FERRY_LOG[a]}")"
	ferry_fail "starting the vhost side failed"
fi
ferry_start_daemon b "${common[@]}" --driver-opt "vdev=net_virtio_user0,path=$sock,queues=$nq,queue_size=1024" \
	--driver-opt "eal=-l1 --no-shconf --single-file-segments" --driver-opt ip=198.18.0.2 --allow-dir "$QEMU_DIR/b-allowed" ||
	ferry_fail "starting the virtio-user side failed"
for s in a b; do
	ip=198.18.0.1
	[ $s = b ] && ip=198.18.0.2
	grep -q "data dpdk:[0-9a-f:]*/$ip:47000-$((47000 + nq - 1)) (dpdk driver" "${FERRY_LOG[$s]}" ||
		ferry_fail "ferryd $s does not report its dpdk endpoint with $nq queues"
done

round() { # label from to [MiB]
	local out t0 ms mb=${4:-$mb}
	out=$(ferry_ctl "$2" tunnel-open --to "${FERRY_LISTEN[$3]}" --listen "$QEMU_DIR/t$2.sock" \
		--target "$QEMU_DIR/$3-allowed/target.sock" --streams 4) || ferry_fail "$1: tunnel-open failed: $out"
	tunnel=$(json_field tunnel <<<"$out")
	t0=$(now_ms)
	out=$(python3 "$check" client "$QEMU_DIR/t$2.sock" "h$2a,h$2b,h$2c,h$2d" $((mb << 20)) 240) ||
		ferry_fail "$1: 4 x $mb MiB were not carried whole: $out"
	ms=$(($(now_ms) - t0))
	echo "$1: 4 x $mb MiB, sha256 identical, in $ms ms" \
		"($(awk -v b=$((4 * (mb << 20))) -v t="$ms" 'BEGIN { printf "%.2f", b / t / 1e6 }') GB/s)"
}
round "vhost -> virtio-user" a b
# vhost copies mbuf chains by address; virtio_user hands addresses to the
# vhost side, which maps DPDK memory only
ferry_dpdk_tx_path a "$tunnel" ref net_vhost vhost
round "virtio-user -> vhost" b a $(((mb + 3) / 4))
ferry_dpdk_tx_path b "$tunnel" copy net_virtio_user virtio-user
ferry_stop_daemon b
ferry_stop_daemon a
echo "PASS dpdk-vhost in $(ferry_elapsed)s"
exit 0
