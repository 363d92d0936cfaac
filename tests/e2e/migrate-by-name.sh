#!/usr/bin/env bash
# migrate-by-name.sh - `ferryctl migrate VM --to HOST[:PORT]`: the VM's
# monitors are VM.qmp in each daemon's run directory (where a management
# layer started the two QEMUs); no paths on the command line. Also: a name
# that could escape the directory is a usage error, and a missing port means
# ferryd's default 7470.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=256M
ferry_init --shm 1G --timeout 120
ferry_need_ramcheck
ferry_need_dirty_bin
mkdir -p "$QEMU_DIR/a" "$QEMU_DIR/b"
ferry_start_daemon a --run-dir "$QEMU_DIR/a" || ferry_fail "starting ferryd a failed"
ferry_start_daemon b --run-dir "$QEMU_DIR/b" || ferry_fail "starting ferryd b failed"

cp "$DIRTY_BIN" "$QEMU_DIR/src.img" && cp "$DIRTY_BIN" "$QEMU_DIR/dst.img" || ferry_fail "cannot copy the boot image"
qemu_start src --ram "$RAM" --boot "$QEMU_DIR/src.img" -- -qmp "unix:$QEMU_DIR/a/web-7.qmp,server=on,wait=off" ||
	ferry_fail "starting src failed"
qemu_start dst --ram "$RAM" --boot "$QEMU_DIR/dst.img" --prealloc --incoming -- \
	-qmp "unix:$QEMU_DIR/b/web-7.qmp,server=on,wait=off" || ferry_fail "starting dst failed"
wait_heartbeat "$(qemu_ramfile src)" 3 60 >/dev/null || ferry_fail "the guest does not run"

# no port: ferryd's default 7470 (nobody listens on 127.0.0.9:7470 here)
out=$(ferry_ctl a migrate web-7 --to 127.0.0.9 2>&1)
echo "$out" | grep -q "127.0.0.9:7470" || ferry_fail "--to without a port did not mean port 7470: $out"
echo "$out" | grep -q "source VM is running (nothing was lost)" || ferry_fail "the source is not said to run: $out"

out=$(ferry_ctl a migrate web-7 --to "${FERRY_LISTEN[b]}" 2>&1)
rc=$?
[ "$rc" -eq 0 ] || { echo "$out" >&2; ferry_fail "ferryctl migrate web-7 exited $rc"; }
echo "$out" | grep -q "completed over tcp handoff" || { echo "$out" >&2; ferry_fail "no completion line"; }
wait_status "$(qemu_sock dst)" running 10 || ferry_fail "the VM does not run on the destination"
for _ in $(seq 50); do qemu_alive src || break; sleep 0.1; done
qemu_alive src && ferry_fail "the source QEMU still runs"
qmp "$(qemu_sock dst)" stop >/dev/null
o=$("$RAMCHECK" pattern "$(qemu_ramfile dst)") || { echo "$o" >&2; ferry_fail "memory inconsistent on the destination"; }

for bad in ../web-7 web/7 .hidden ""; do
	out=$(ferry_ctl a migrate "$bad" --to "${FERRY_LISTEN[b]}" 2>&1)
	rc=$?
	[ "$rc" -eq 2 ] || ferry_fail "VM name '$bad': exit $rc, expected 2 (usage): $out"
done
out=$(ferry_ctl a migrate nosuchvm --to "${FERRY_LISTEN[b]}" 2>&1)
[ $? -eq 1 ] || ferry_fail "a VM with no monitor did not fail: $out"
echo "$out" | grep -q "a/nosuchvm.qmp" || ferry_fail "the error does not name the monitor it looked for: $out"
echo "PASS migrate-by-name in $(ferry_elapsed)s"
exit 0
