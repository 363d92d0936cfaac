#!/usr/bin/env bash
# libvirt-dest-dies.sh - the destination host's ferryd dies (SIGKILL) in the
# middle of a `virsh migrate --live --p2p --persistent --undefinesource
# --copy-storage-all` from libvirtd A to libvirtd B, during the NBD disk copy
# (slowed down with --bandwidth so that there is time). Nothing may be lost:
#   - virsh migrate fails (non-zero), in bounded time;
#   - the domain still runs on A (state running, heartbeat advances), still
#     defined and persistent there; its disk is byte for byte the original
#     (the guest, diskguest.bin, does not write its disk);
#   - B is left with no domain: none running, none defined, no QEMU in its
#     namespace.
# Then ferryd b is started again and the same domain migrates A -> B through
# fresh tunnels: it runs on B only, and B's disk is the original.
#
# Exit: 0 pass, 1 fail, 77 skip (not root, no libvirtd/virsh).
# Environment: tests/lib/libvirt.sh; LV_DISK_SIZE (default 256M),
# LV_MIG_BANDWIDTH (MiB/s while ferryd b is killed, default 16),
# MIG_TIMEOUT (default 90 s).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/libvirt.sh
. "$here/../lib/libvirt.sh"

DISK_SIZE=${LV_DISK_SIZE:-256M}
BW=${LV_MIG_BANDWIDTH:-16}
MIG_TIMEOUT=${MIG_TIMEOUT:-90}

lv_setup_on_a 240 "$DISKGUEST_BIN" vm.qcow2 qcow2
lv_wait_hb A vm 10 60 >/dev/null || ferry_fail "the guest on A shows no heartbeat"
lv_precreate_disk B vm.qcow2 qcow2 "$DISK_SIZE" || ferry_fail "creating the target disk on B failed"
lv_tunnels_open A B 1 1 1 || ferry_fail "opening the tunnels failed"

# block_job_offset: "offset len" of the migration's disk mirror on A (empty if none)
block_job_offset() {
	local out
	out=$(lv_virsh A qemu-monitor-command vm '{"execute":"query-block-jobs"}' 2>/dev/null) || return 1
	python3 -c '
import json, sys
jobs = json.loads(sys.argv[1]).get("return", [])
if not jobs:
    sys.exit(1)
print(jobs[0]["offset"], jobs[0]["len"])
' "$out"
}

lv_migrate_start A B vm --bandwidth "$BW"
# wait until the disk copy is under way (at least 8 MiB and not near the end)
deadline=$(($(now_ms) + 60000))
while :; do
	kill -0 "$LV_MIG_PID" 2>/dev/null || { lv_migrate_wait 1; lv_mig_report; ferry_fail "virsh migrate ended (rc $LV_MIG_RC) before the disk copy was seen"; }
	if job=$(block_job_offset) && read -r off len <<<"$job" && [ "$off" -ge $((8 << 20)) ]; then
		break
	fi
	[ "$(now_ms)" -gt "$deadline" ] && { lv_mig_report; ferry_fail "no disk copy under way on A after 60 s (last: ${job:-none})"; }
	sleep 0.1
done
[ "$off" -lt $((len * 3 / 4)) ] || ferry_fail "the disk copy is too fast to kill ferryd b during it ($off of $len); lower LV_MIG_BANDWIDTH"
T_KILL=$(now_ms)
ferry_kill_daemon b KILL || ferry_fail "cannot kill ferryd b"
log "killed ferryd b with the disk copy at $((off >> 20)) of $((len >> 20)) MiB"

lv_migrate_wait 60
FAIL_MS=$(($(now_ms) - T_KILL))
[ "$LV_MIG_RC" -ne 124 ] || ferry_fail "virsh migrate still ran 60 s after ferryd b died"
[ "$LV_MIG_RC" -ne 0 ] && grep -qi "error" "$LV_MIG_OUT" ||
	{ lv_mig_report; ferry_fail "virsh migrate exited $LV_MIG_RC without an error after ferryd b died"; }
MIG_ERR=$(grep -i "error" "$LV_MIG_OUT" | tail -n 1)

# A: still running, still defined there, nothing lost
st=$(lv_state A vm)
[ "$st" = running ] || ferry_fail "the domain is '$st' on A after the failed migration, expected running"
lv_persistent A vm || ferry_fail "the domain is no longer persistent on A"
lv_hb_advances A vm 1 || ferry_fail "the guest on A does not run after the failed migration"
# B: nothing left (libvirtd B cleans up the incoming domain once its client is gone)
t_b=$(now_ms)
deadline=$((t_b + 30000))
while lv_defined B vm || [ -n "$(lv_qemu_pids B)" ]; do
	[ "$(now_ms)" -gt "$deadline" ] &&
		ferry_fail "30 s after the failure B still has: domain state '$(lv_state B vm)', QEMU pids: $(lv_qemu_pids B)"
	sleep 0.2
done
B_CLEAN_MS=$(($(now_ms) - t_b))
[ -z "$(lv_running_names B)" ] || ferry_fail "domains still run on B: $(lv_running_names B)"
[ "$(lv_qemu_pids A | wc -l)" = 1 ] || ferry_fail "expected one QEMU on A, found: $(lv_qemu_pids A)"
out=$(qemu-img compare -U "$ORIG" "$(lv_img A vm.qcow2)" 2>&1) || ferry_fail "A's disk is no longer the original: $out"
lv_tunnels_close >/dev/null 2>&1 # the peer is gone: what they report does not matter, only that closing returns
ferry_ping a || ferry_fail "ferryd a does not answer ping after its peer died"

# the same domain migrates once ferryd b is back
ferry_stop_daemon b 1
ferry_start_daemon b --allow-dir "${LV_RUN[B]}/ferry" --allow-dir "${LV_RUN[B]}/libvirt" ||
	ferry_fail "restarting ferryd b failed"
lv_precreate_disk B vm.qcow2 qcow2 "$DISK_SIZE" || ferry_fail "creating the target disk on B again failed"
lv_tunnels_open A B 1 1 1 || ferry_fail "opening the tunnels again failed"
h0=$(lv_hb_count A vm) || ferry_fail "no heartbeat on A"
lv_migrate A B vm "$MIG_TIMEOUT"
[ "$LV_MIG_RC" -eq 0 ] || { lv_mig_report; ferry_fail "the retry: virsh migrate exited $LV_MIG_RC"; }
lv_tunnels_close || { echo "$LV_TUNNEL_SUMMARY"; ferry_fail "closing the tunnels after the retry failed"; }
st=$(lv_state B vm)
[ "$st" = running ] || ferry_fail "the retry: the domain is '$st' on B"
lv_defined A vm && ferry_fail "the retry: A still has the domain"
lv_wait_no_qemu A 10 || ferry_fail "the retry: a QEMU still runs on A"
h1=$(lv_hb_count B vm) || ferry_fail "no heartbeat on B"
[ "$h1" -ge "$h0" ] || ferry_fail "the retry: heartbeat on B $h1 below A's $h0 before: not the migrated guest"
lv_hb_advances B vm 1 || ferry_fail "the retry: the guest on B does not run"
out=$(qemu-img compare -U "$ORIG" "$(lv_img B vm.qcow2)" 2>&1) || ferry_fail "the retry: B's disk differs from the original: $out"

echo "PASS libvirt-dest-dies in $(ferry_elapsed)s (libvirtd pair and ferryd ready after ${T_READY}s)"
echo "  ferryd b killed at $((off >> 20))/$((len >> 20)) MiB of the disk copy (--bandwidth $BW); virsh migrate failed ${FAIL_MS} ms later: $MIG_ERR"
echo "  B had no domain and no QEMU left ${B_CLEAN_MS} ms after that; A's domain ran on, its disk intact"
echo "  retry through a restarted ferryd b: ${LV_MIG_MS} ms, heartbeat $h0 on A before, $h1 on B after"
exit 0
