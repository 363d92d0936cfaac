#!/usr/bin/env bash
# migrate-dpdk.sh [CHANNELS...] - the foundation's QEMU migration over the
# DPDK driver: two ferryd --driver dpdk joined by net_memif (a shared-memory
# NIC), a stopped guest with 1 GiB of random RAM migrated with each CHANNELS
# setting (default: 0 2), RAM compared byte for byte. The plan must say dpdk:
# both daemons offer only that driver, and it cannot hand a socket to QEMU.
# The migration's status must carry the lanes' reliability counters. Each
# device has 2 queues, so channels=2 (3 streams) must run on 2 lanes (never
# two lanes on one queue) and the status must say so.
#
# Exit: 0 pass, 1 fail, 77 skip (no DPDK driver in this build, or DPDK cannot
# start here). Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(0 2)
RAM=1G
ferry_init --shm 2200M --timeout $((60 + 60 * ${#runs[@]}))
ferry_need_ramcheck

memif=$QEMU_DIR/memif.sock
common=(--driver dpdk --driver-opt queues=2 --driver-opt dgram=8972)
if ! ferry_start_daemon a "${common[@]}" --driver-opt "vdev=net_memif0,role=server,socket=$memif,bsize=9216" \
	--driver-opt eal=-l0 --driver-opt ip=198.18.0.1 ||
	! ferry_start_daemon b "${common[@]}" --driver-opt "vdev=net_memif0,role=client,socket=$memif,bsize=9216" \
		--driver-opt eal=-l1 --driver-opt ip=198.18.0.2; then
	grep -q "no driver named 'dpdk'" "$QEMU_DIR"/ferryd-a.log && ferry_skip "this build has no DPDK driver (libdpdk-dev)"
	grep -q "rte_eal_init" "$QEMU_DIR"/ferryd-a.log && ferry_skip "DPDK cannot start here: $(grep -m1 rte_eal_init "$QEMU_DIR"/ferryd-a.log)"
	ferry_fail "starting the memif pair failed"
fi
FERRY_TO=${FERRY_LISTEN[b]}

for ch in "${runs[@]}"; do
	srcram=$QEMU_RAM_DIR/ferry-dpdk-$$-src$ch.ram dstram=$QEMU_RAM_DIR/ferry-dpdk-$$-dst$ch.ram
	QEMU_CLEANUP_FILES+=("$srcram" "$dstram")
	fill_random "$srcram" "$RAM" || ferry_fail "fill_random failed"
	qemu_start src$ch --ram "$RAM" --ram-file "$srcram" --stopped --accel kvm || ferry_fail "starting src$ch failed"
	qemu_start dst$ch --ram "$RAM" --ram-file "$dstram" --stopped --prealloc --incoming --accel kvm ||
		ferry_fail "starting dst$ch failed"
	ferry_migrate src$ch dst$ch 120 --channels "$ch" --json
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "channels=$ch over dpdk: ferryctl exited $FERRY_MIG_RC"; }
	plan=$(json_field plan <"$FERRY_MIG_OUT")
	case "$plan" in "dpdk relay, "*) ;; *) ferry_fail "channels=$ch: plan '$plan', expected dpdk relay" ;; esac
	[ "$(mig_field "$(qemu_sock dst$ch)" status)" = completed ] || ferry_fail "channels=$ch: destination not completed"
	# lanes: one per stream up to the 2 queues, the streams sharing them beyond
	transport=$(json_field transport <"$FERRY_MIG_OUT")
	if [ "$ch" -ge 2 ]; then
		want="dpdk relay, $((ch + 1)) streams on 2 lanes of $((ch + 1)) asked for (the peer's device has 2 queues)"
	else
		want="dpdk relay, $((ch + 1)) lane$([ "$ch" -eq 0 ] || echo s)"
	fi
	[ "$transport" = "$want" ] || ferry_fail "channels=$ch: transport '$transport', expected '$want'"
	# the status carries the datagram lanes' reliability counters (docs/wire-format.md, "Counters")
	txd=$(json_field reliable.tx_data <"$FERRY_MIG_OUT")
	[ "${txd:-0}" -gt 0 ] || ferry_fail "channels=$ch: the migration's status has no reliability counters (reliable.tx_data '$txd')"
	qemu_stop dst$ch
	"$RAMCHECK" compare "$srcram" "$dstram" >/dev/null || ferry_fail "channels=$ch: destination RAM differs"
	echo "over dpdk memif, channels=$ch: $plan ($transport), $(json_field total_s <"$FERRY_MIG_OUT") s," \
		"$(json_field throughput_gbs <"$FERRY_MIG_OUT") GB/s, RAM identical;" \
		"$txd datagrams of data, $(json_field reliable.retransmits <"$FERRY_MIG_OUT") retransmitted"
	qemu_stop src$ch
	rm -f "$srcram" "$dstram"
done
echo "PASS migrate-dpdk in $(ferry_elapsed)s"
exit 0
