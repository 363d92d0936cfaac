#!/usr/bin/env bash
# netns-flow.sh - the whole v3 flow between two daemons in two network
# namespaces joined by a veth pair (as two hosts on a link), then the link
# cut in the middle of a migration.
#
#  1. One stream (handed over: ferry's authenticated connection crosses the
#     veth, then belongs to both QEMUs) and 2 multifd channels (relayed: the
#     QEMUs run outside the daemons' namespaces, so they cannot connect to
#     each other, and ferry does not offer multifd handoff):
#     each completes, the guest runs on the destination only, its memory
#     consistent, the source QEMU ended.
#  2. The link goes down mid-migration (no reset, no FIN: packets just stop).
#     The source daemon notices no byte moves (--stall-timeout 5), cancels,
#     and the source VM runs on; the destination never runs it. With the link
#     back, the same VM migrates to a fresh destination.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

[ "$(id -u)" = 0 ] || ferry_skip "needs root (network namespaces)"
command -v ip >/dev/null || ferry_skip "ip (iproute2) not found"
RAM=256M
ferry_init --shm 2G --timeout 240
ferry_need_ramcheck
ferry_need_dirty_bin

nsa=ferry-a-$$ nsb=ferry-b-$$ va=fva$$ vb=fvb$$
net_cleanup() {
	ip netns del "$nsa" 2>/dev/null
	ip netns del "$nsb" 2>/dev/null
}
ip netns add "$nsa" && ip netns add "$nsb" || ferry_skip "cannot create network namespaces here"
# net_cleanup must not hide the test's exit status from ferry_cleanup
trap 'rc=$?; net_cleanup; (exit $rc); ferry_cleanup' EXIT
ip link add "$va" type veth peer name "$vb" || ferry_fail "cannot create a veth pair"
ip link set "$va" netns "$nsa" && ip link set "$vb" netns "$nsb" || ferry_fail "cannot move the veth ends"
ip -n "$nsa" addr add 10.199.77.1/30 dev "$va" && ip -n "$nsb" addr add 10.199.77.2/30 dev "$vb" ||
	ferry_fail "cannot address the veth ends"
for n in "$nsa" "$nsb"; do ip -n "$n" link set lo up; done
ip -n "$nsa" link set "$va" up && ip -n "$nsb" link set "$vb" up || ferry_fail "cannot bring the link up"

FERRY_NETNS[a]=$nsa FERRY_ADDR[a]=10.199.77.1
FERRY_NETNS[b]=$nsb FERRY_ADDR[b]=10.199.77.2
ferry_start_daemons || ferry_fail "starting the daemons in their namespaces failed"
case "$FERRY_TO" in 10.199.77.2:*) ;; *) ferry_fail "daemon b listens on $FERRY_TO, not on its link" ;; esac

guests() { # SRC DST [RAM]
	local ram=${3:-$RAM}
	cp "$DIRTY_BIN" "$QEMU_DIR/$1.img" && cp "$DIRTY_BIN" "$QEMU_DIR/$2.img" || ferry_fail "cannot copy the boot image"
	# shellcheck disable=SC2046
	qemu_start "$1" --ram "$ram" --boot "$QEMU_DIR/$1.img" -- $(side_qmp_args "$1") || ferry_fail "starting $1 failed"
	qemu_start "$2" --ram "$ram" --boot "$QEMU_DIR/$2.img" --prealloc --incoming || ferry_fail "starting $2 failed"
	wait_heartbeat "$(qemu_ramfile "$1")" 3 60 >/dev/null || ferry_fail "guest on $1 does not run"
}

runs_on() { # NAME: the guest's heartbeat advances there
	local f w1 w2
	f=$(qemu_ramfile "$1")
	w1=$(heartbeat_words "$f") || return 1
	sleep 0.7
	w2=$(heartbeat_words "$f") || return 1
	[ "$w2" -gt "$w1" ]
}

# ---- 1: the five steps over the link -----------------------------------------
n=0
for ch in 0 2; do
	n=$((n + 1))
	guests src$n dst$n
	ferry_migrate src$n dst$n 90 --channels "$ch"
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "channels=$ch over the link: ferryctl exited $FERRY_MIG_RC"; }
	plan=$(sed -n 's/^ferryctl: plan: //p' "$FERRY_MIG_ERR")
	grep -q "source ended" "$FERRY_MIG_OUT" || { ferry_mig_report; ferry_fail "channels=$ch: the source was not ended"; }
	wait_status "$(qemu_sock dst$n)" running 10 || ferry_fail "channels=$ch: dst$n is not running"
	runs_on dst$n || ferry_fail "channels=$ch: the guest does not run on dst$n"
	qemu_alive src$n && ferry_fail "channels=$ch: src$n still exists"
	qmp "$(qemu_sock dst$n)" stop >/dev/null
	o=$("$RAMCHECK" pattern "$(qemu_ramfile dst$n)") || { echo "$o" >&2; ferry_fail "channels=$ch: memory inconsistent on dst$n"; }
	echo "over the veth link, channels=$ch: $plan; $(grep -o 'completed over .*' "$FERRY_MIG_OUT" | cut -c1-90)"
	qemu_stop dst$n
	qemu_rm_ram src$n
	qemu_rm_ram dst$n
done

# ---- 2: the link cut mid-migration ------------------------------------------
guests src3 dst3 512M
ferry_migrate_start src3 dst3 --stall-timeout 5
deadline=$(($(now_ms) + 30000))
until [ "$(qmp_get "$(side_sock src3)" query-migrate status 2>/dev/null)" = active ]; do
	[ "$(now_ms)" -lt "$deadline" ] || { ferry_mig_report; ferry_fail "the migration did not start"; }
	sleep 0.01
done
# slow it down (ferry lifted QEMU's own limit) so it is surely running when the link goes
qmp "$(side_sock src3)" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":16777216}}' >/dev/null ||
	ferry_fail "cannot throttle the migration"
sleep 0.5
[ "$(qmp_get "$(side_sock src3)" query-migrate status 2>/dev/null)" = active ] ||
	ferry_fail "the migration is not running any more before the cut"

ip -n "$nsa" link set "$va" down || ferry_fail "cannot cut the link"
t0=$(now_ms)
ferry_migrate_wait 60
el=$(($(now_ms) - t0))
[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "with the link cut ferryctl exited $FERRY_MIG_RC, expected 1"; }
grep -q "no data moved for 5 s" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "the failure does not say the transfer stalled"; }
grep -q "source VM is running" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "ferryctl does not say the source runs"; }
runs_on src3 || ferry_fail "the source guest does not run after the cut"
st=$(qmp_get "$(qemu_sock dst3)" query-status status 2>/dev/null || echo gone)
[ "$st" != running ] || ferry_fail "the destination runs the VM too"
echo "link cut: ferryctl gave up after ${el} ms: $(grep -m1 'failed:' "$FERRY_MIG_ERR" | cut -c1-140)"

ip -n "$nsa" link set "$va" up || ferry_fail "cannot restore the link"
# the destination daemon lets go of the dead migration's session (its QEMU
# monitor with it) once the source's connection ends or its probes go
# unanswered
wait_file_line "${FERRY_LOG[b]}" "the source daemon went away; tearing the session down" 45 ||
	ferry_fail "ferryd b still holds the session of the cut migration"
qemu_stop dst3
qemu_start dst4 --ram 512M --boot "$QEMU_DIR/dst3.img" --prealloc --incoming || ferry_fail "starting dst4 failed"
ferry_migrate src3 dst4 90
[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "the retry after the cut exited $FERRY_MIG_RC"; }
runs_on dst4 || ferry_fail "the guest does not run on dst4"
qmp "$(qemu_sock dst4)" stop >/dev/null
o=$("$RAMCHECK" pattern "$(qemu_ramfile dst4)") || { echo "$o" >&2; ferry_fail "memory inconsistent on dst4"; }
echo "PASS netns-flow in $(ferry_elapsed)s"
exit 0
