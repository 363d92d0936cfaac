#!/usr/bin/env bash
# postcopy-forced.sh - postcopy through ferry, as far as it goes today:
#  - `ferryctl migrate --postcopy` is refused, saying why (ferry cannot yet
#    confirm the destination loaded every device before it runs the VM), and
#    the source VM runs on untouched;
#  - with --force-postcopy a running guest that keeps rewriting 32 MiB is
#    switched to postcopy 0.3 s into the migration and completes: the plan says
#    postcopy, the guest runs on the destination with its memory consistent
#    (ramcheck pattern), the source QEMU is ended.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=512M
ferry_init --shm 1200M --timeout 120
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the daemons failed"
cp "$DIRTY_BIN" "$QEMU_DIR/src.img" && cp "$DIRTY_BIN" "$QEMU_DIR/dst.img" || ferry_fail "cannot copy the boot image"
qemu_start src --ram "$RAM" --boot "$QEMU_DIR/src.img" || ferry_fail "starting src failed"
qemu_start dst --ram "$RAM" --boot "$QEMU_DIR/dst.img" --incoming || ferry_fail "starting dst failed"
wait_heartbeat "$(qemu_ramfile src)" 3 60 >/dev/null || ferry_fail "the guest does not run"

ferry_migrate src dst 60 --postcopy
[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "--postcopy without --force-postcopy exited $FERRY_MIG_RC"; }
grep -q "add --force-postcopy to accept that risk" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "the refusal does not say why"; }
st=$(qmp_get "$(qemu_sock src)" query-status status)
[ "$st" = running ] || ferry_fail "the source is '$st' after the refusal"

ferry_migrate src dst 90 --force-postcopy --postcopy-after 0.3 --json
[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "forced postcopy exited $FERRY_MIG_RC"; }
plan=$(json_field plan <"$FERRY_MIG_OUT")
[ "$plan" = "tcp handoff, single channel, postcopy" ] || ferry_fail "plan '$plan'"
[ "$(json_field src_vm_status <"$FERRY_MIG_OUT")" = ended ] || ferry_fail "the source was not ended"
at=$(json_field postcopy_at_s <"$FERRY_MIG_OUT")
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$at" ||
	ferry_fail "the migration never switched to postcopy (it converged first?)"
wait_status "$(qemu_sock dst)" running 10 || ferry_fail "the VM does not run on the destination"
f=$(qemu_ramfile dst)
w1=$(heartbeat_words "$f")
sleep 1
w2=$(heartbeat_words "$f")
[ "$w2" -gt "$w1" ] || ferry_fail "the guest does not run on the destination ($w1 -> $w2)"
qmp "$(qemu_sock dst)" stop >/dev/null
o=$("$RAMCHECK" pattern "$f") || { echo "$o" >&2; ferry_fail "the destination's memory is inconsistent after postcopy"; }
echo "handed over: $plan, $(json_field total_s <"$FERRY_MIG_OUT") s, switched at ${at}s"
qemu_stop dst

# the same relayed: page requests and the return path go through ferry's lanes
cp "$DIRTY_BIN" "$QEMU_DIR/src2.img" && cp "$DIRTY_BIN" "$QEMU_DIR/dst2.img" || ferry_fail "cannot copy the boot image"
qemu_start src2 --ram "$RAM" --boot "$QEMU_DIR/src2.img" || ferry_fail "starting src2 failed"
qemu_start dst2 --ram "$RAM" --boot "$QEMU_DIR/dst2.img" --incoming || ferry_fail "starting dst2 failed"
wait_heartbeat "$(qemu_ramfile src2)" 3 60 >/dev/null || ferry_fail "the guest does not run on src2"
ferry_migrate src2 dst2 90 --force-postcopy --postcopy-after 0.3 --no-handoff --json
[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "relayed forced postcopy exited $FERRY_MIG_RC"; }
plan=$(json_field plan <"$FERRY_MIG_OUT")
[ "$plan" = "tcp relay, single channel, postcopy" ] || ferry_fail "plan '$plan'"
at=$(json_field postcopy_at_s <"$FERRY_MIG_OUT")
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$at" || ferry_fail "the relayed migration never switched"
wait_status "$(qemu_sock dst2)" running 10 || ferry_fail "the VM does not run on dst2"
qmp "$(qemu_sock dst2)" stop >/dev/null
o=$("$RAMCHECK" pattern "$(qemu_ramfile dst2)") || { echo "$o" >&2; ferry_fail "dst2's memory is inconsistent after postcopy"; }
echo "relayed: $plan, $(json_field total_s <"$FERRY_MIG_OUT") s, switched at ${at}s"
echo "PASS postcopy-forced in $(ferry_elapsed)s"
exit 0
