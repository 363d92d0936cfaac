#!/usr/bin/env bash
# dest-dies-at-finish.sh - the VM must never run on both hosts.
#
# The destination ferry daemon is SIGKILLed in the last moment of a live
# migration: right after the destination QEMU reports the incoming migration
# "completed" (it then resumes the guest by itself), before the source
# daemon has heard so through "migrate-finish". The source daemon cannot
# know whether the destination took over, so it must leave the source
# stopped (postmigrate); resuming it means the guest runs twice.
#
# A RUNNING dirty.bin TCG guest (256 MiB) migrates; a watcher polls the
# destination's query-migrate through a second monitor every ~2 ms and kills
# ferryd b the moment it says "completed". Each QEMU boots from its own copy
# of the image (separate storage, as with local disks; with a shared image
# file QEMU's image locking can hide the problem). If ferryctl still got the
# answer in time (exit 0) the window was missed: retried up to ATTEMPTS
# (default 3) times.
# Checks, 1.5 s after ferryctl exits: never both VMs running (status and
# heartbeat progress); when the destination runs, the source is postmigrate
# and ferryctl does not claim the source is running.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh; RUN_RAM
# (default 256M), ATTEMPTS (default 3), CHANNELS (default 0).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=${RUN_RAM:-256M}
ATTEMPTS=${ATTEMPTS:-3}
CHANNELS=${CHANNELS:-0}
ram_bytes=$(size_bytes "$RAM") || exit 2
ferry_init --shm $((2 * ram_bytes)) --timeout $((30 + 40 * ATTEMPTS))
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemon a || ferry_fail "starting ferryd a failed"

hit=0
for ((i = 1; i <= ATTEMPTS; i++)); do
	src=src$i dst=dst$i
	ferry_start_daemon b || ferry_fail "starting ferryd b failed"
	FERRY_TO=${FERRY_LISTEN[b]}
	cp "$DIRTY_BIN" "$QEMU_DIR/$src.img" && cp "$DIRTY_BIN" "$QEMU_DIR/$dst.img" || ferry_fail "cannot copy the boot image"
	# shellcheck disable=SC2046
	qemu_start "$src" --ram "$RAM" --boot "$QEMU_DIR/$src.img" -- $(side_qmp_args "$src") || ferry_fail "starting $src failed"
	# shellcheck disable=SC2046
	qemu_start "$dst" --ram "$RAM" --boot "$QEMU_DIR/$dst.img" --prealloc --incoming -- $(side_qmp_args "$dst") ||
		ferry_fail "starting $dst failed"
	wait_heartbeat "$(qemu_ramfile "$src")" 3 60 >/dev/null || ferry_fail "guest on $src does not run"
	bpid=$(ferry_pid b) && [ -n "$bpid" ] || ferry_fail "no pid for ferryd b"

	ferry_migrate_start "$src" "$dst" --channels "$CHANNELS"
	watch=$(timeout 60 python3 - "$(side_sock "$dst")" "$bpid" <<'PY'
import json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rb")
f.readline()
def run(c):
    s.sendall(json.dumps({"execute": c, "id": 1}).encode() + b"\n")
    while True:
        m = json.loads(f.readline())
        if m.get("id") == 1:
            return m.get("return")
run("qmp_capabilities")
t0 = time.monotonic()
while True:
    st = run("query-migrate").get("status")
    if st == "completed":
        os.kill(int(sys.argv[2]), 9)
        print("killed ferryd b %.0f ms after the start, as the destination completed" % (1000 * (time.monotonic() - t0)))
        sys.exit(0)
    if st in ("failed", "cancelled") or time.monotonic() - t0 > 50:
        print("destination migration %s, not completed" % st)
        sys.exit(1)
    time.sleep(0.002)
PY
	) || { ferry_migrate_wait 5; ferry_mig_report; ferry_fail "attempt $i: watcher: ${watch:-failed}"; }
	ferry_migrate_wait 150
	rc=$FERRY_MIG_RC
	log "attempt $i: $watch; ferryctl exit $rc"
	sleep 1.5
	s_st=$(QMP_TIMEOUT=5 qmp_get "$(qemu_sock "$src")" query-status status)
	d_st=$(QMP_TIMEOUT=5 qmp_get "$(side_sock "$dst")" query-status status)
	sw1=$(heartbeat_words "$(qemu_ramfile "$src")") || ferry_fail "no heartbeat in $src's RAM"
	dw1=$(heartbeat_words "$(qemu_ramfile "$dst")") || ferry_fail "no heartbeat in $dst's RAM"
	sleep 1
	sw2=$(heartbeat_words "$(qemu_ramfile "$src")") || ferry_fail "no heartbeat in $src's RAM"
	dw2=$(heartbeat_words "$(qemu_ramfile "$dst")") || ferry_fail "no heartbeat in $dst's RAM"
	log "attempt $i: source $s_st (words $sw1 -> $sw2), destination $d_st (words $dw1 -> $dw2)"
	if [ "$s_st" = running ] && [ "$d_st" = running ] || { [ "$sw2" -gt "$sw1" ] && [ "$dw2" -gt "$dw1" ]; }; then
		ferry_mig_report
		ferry_fail "attempt $i: the guest runs on BOTH hosts (source $s_st, destination $d_st): after losing the destination daemon at migrate-finish, ferry resumed the source although the destination had completed"
	fi
	if [ "$d_st" = running ]; then
		[ "$s_st" = postmigrate ] || ferry_fail "attempt $i: destination runs, source is '$s_st' (expected postmigrate)"
		if grep -q "source VM is running" "$FERRY_MIG_ERR"; then
			ferry_mig_report
			ferry_fail "attempt $i: ferryctl claims the source VM is running while the destination runs the guest"
		fi
	fi
	qemu_stop "$src"
	qemu_stop "$dst"
	qemu_rm_ram "$src"
	qemu_rm_ram "$dst"
	ferry_stop_daemon b 1
	if [ "$rc" -ne 0 ]; then
		hit=1
		break
	fi
	log "attempt $i: ferryctl finished before the kill (window missed), retrying"
done
if [ "$hit" = 1 ]; then
	echo "PASS dest-dies-at-finish: the VM ran on one host only (ferryctl: $(grep -m1 'failed:' "$FERRY_MIG_ERR" | cut -c1-160)) in $(ferry_elapsed)s"
else
	echo "PASS dest-dies-at-finish (window never hit in $ATTEMPTS attempts; VM ran on one host only) in $(ferry_elapsed)s"
fi
exit 0
