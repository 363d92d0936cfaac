#!/usr/bin/env bash
# migrate-spawn.sh - Prepare starts the destination QEMU itself: a running
# source VM on host a, no QEMU for it on host b; `ferryctl migrate VM --to B`
# makes b's daemon start one from the source's command line (the disk image
# found in b's --storage-dir, the RAM file made in its --mem-dir), the
# migration completes, the RAM checks out, the VM runs on b only, and the
# started QEMU outlives b's daemon.
# Refused at Prepare, with the source left running and nothing left on the
# destination: a missing image in the storage dir (the error names the
# file), a source command line with an option b does not start (named), a
# host that does not start QEMUs at all (--disable spawn), and a QEMU started
# for a plan that then fails (--require multifd on a host without it): it is
# ended again.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=256M
ferry_init --shm 1G --timeout 240
ferry_need_ramcheck
ferry_need_dirty_bin
store=$QEMU_DIR/store
memdir=$QEMU_RAM_DIR/ferry-test-$$-b
mkdir -p "$QEMU_DIR/a" "$QEMU_DIR/b" "$QEMU_DIR/c" "$QEMU_DIR/d" "$store" "$memdir" || ferry_fail "cannot make the directories"
FERRY_CLEANUP_DIRS+=("$memdir")
ferry_start_daemon a --run-dir "$QEMU_DIR/a" || ferry_fail "starting ferryd a failed"
# b faults the started QEMU's RAM in first: first touch is slow in this nested VM
ferry_start_daemon b --run-dir "$QEMU_DIR/b" --storage-dir "$store" --mem-dir "$memdir" --spawn-prealloc \
	--qemu "$QEMU_BIN" || ferry_fail "starting ferryd b failed"
ferry_start_daemon c --run-dir "$QEMU_DIR/c" --storage-dir "$store" --mem-dir "$memdir" --disable spawn ||
	ferry_fail "starting ferryd c failed"
ferry_start_daemon d --run-dir "$QEMU_DIR/d" --storage-dir "$store" --mem-dir "$memdir" --disable multifd ||
	ferry_fail "starting ferryd d failed"

cp "$DIRTY_BIN" "$QEMU_DIR/web.img" || ferry_fail "cannot copy the boot image"
qemu_start src --ram "$RAM" --boot "$QEMU_DIR/web.img" -- -qmp "unix:$QEMU_DIR/a/web-7.qmp,server=on,wait=off" ||
	ferry_fail "starting src failed"
# a VM whose command line has an option b will not start (rng-random reads a host device)
qemu_start odd --ram 64M -- -object rng-random,id=rng0,filename=/dev/urandom \
	-qmp "unix:$QEMU_DIR/a/odd-1.qmp,server=on,wait=off" || ferry_fail "starting odd failed"
wait_heartbeat "$(qemu_ramfile src)" 3 60 >/dev/null || ferry_fail "the guest does not run"

# nothing of a refused Prepare stays behind on b, and the source runs on
refused() {
	local what=$1 vm=$2 to=$3 needle=$4 state=$5 out rc
	shift 5
	out=$(ferry_ctl a migrate "$vm" --to "$to" "$@" 2>&1)
	rc=$?
	[ "$rc" -eq 1 ] || ferry_fail "$what: exit $rc, expected 1: $out"
	grep -qF -- "$needle" <<<"$out" || ferry_fail "$what: the error does not say '$needle': $out"
	[ "$(qmp_get "$QEMU_DIR/a/$vm.qmp" query-status status)" = "$state" ] ||
		ferry_fail "$what: the source VM is not $state any more"
	ls "$QEMU_DIR"/[bcd]/"$vm".* 2>/dev/null | grep -v '\.log$' &&
		ferry_fail "$what: left a monitor or pid file on the destination"
	[ -z "$(ls -A "$memdir")" ] || ferry_fail "$what: left a RAM file in $memdir: $(ls "$memdir")"
	log "$what: refused: $(grep -o 'destination daemon refused.*' <<<"$out" | head -n 1)"
}
refused "missing image" web-7 "${FERRY_LISTEN[b]}" "$store/web.img" running
refused "hostile option" odd-1 "${FERRY_LISTEN[b]}" "-object rng-random is not started here" running
cp "$QEMU_DIR/web.img" "$store/web.img" || ferry_fail "cannot fill the storage dir"
refused "spawning disabled" web-7 "${FERRY_LISTEN[c]}" "does not start one (ferryd --disable spawn)" running
refused "plan fails after the start" web-7 "${FERRY_LISTEN[d]}" "the destination does not support it" running --channels 2 \
	--require multifd
p=$(sed -n 's/.*started the destination QEMU (pid \([0-9]*\).*/\1/p' "${FERRY_LOG[d]}")
[ -n "$p" ] || ferry_fail "ferryd d did not start a QEMU before the plan failed"
grep -q "ending the destination QEMU it started (pid $p)" "${FERRY_LOG[d]}" || ferry_fail "d does not say it ended QEMU $p"
# gone, or a zombie this container's init has not reaped
[ ! -e "/proc/$p" ] || grep -q '^[0-9]* (.*) [ZX] ' "/proc/$p/stat" || ferry_fail "the QEMU d started ($p) still runs"

# a monitor socket left by a QEMU that ended is no QEMU waiting: b starts one
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$QEMU_DIR/b/web-7.qmp" ||
	ferry_fail "cannot leave a stale socket"
out=$(ferry_ctl a migrate web-7 --to "${FERRY_LISTEN[b]}" 2>&1)
rc=$?
[ "$rc" -eq 0 ] || { echo "$out" >&2; ferry_fail "ferryctl migrate web-7 exited $rc"; }
echo "$out" | grep -q "completed over" || { echo "$out" >&2; ferry_fail "no completion line"; }
dst=$QEMU_DIR/b/web-7.qmp
pid=$(cat "$QEMU_DIR/b/web-7.pid" 2>/dev/null)
[[ $pid =~ ^[0-9]+$ ]] || ferry_fail "the started QEMU wrote no pid file"
FERRY_EXTRA_PIDS+=("$pid")
grep -q "started the destination QEMU (pid $pid" "${FERRY_LOG[b]}" || ferry_fail "ferryd b does not log the start"
grep -qs "\"spawned_pid\": $pid" "$QEMU_DIR"/b/state/* || ferry_fail "b's migration record does not name the started QEMU"
wait_status "$dst" running 10 || ferry_fail "the VM does not run on the destination"
for _ in $(seq 50); do qemu_alive src || break; sleep 0.1; done
qemu_alive src && ferry_fail "the source QEMU still runs"

# the started QEMU is no child of ferryd: it runs on when ferryd stops
ferry_stop_daemon b
[ "$(qmp_get "$dst" query-status status)" = running ] || ferry_fail "the VM stopped with ferryd b"
ram=$memdir/$(basename "$(qemu_ramfile src)")
h1=$(heartbeat_done "$ram") && sleep 1 && h2=$(heartbeat_done "$ram") ||
	ferry_fail "no heartbeat in the destination's RAM file $ram"
[ "$h2" -gt "$h1" ] || ferry_fail "the guest does not advance on the destination ($h1 -> $h2)"
qmp "$dst" stop >/dev/null
o=$("$RAMCHECK" pattern "$ram") || { echo "$o" >&2; ferry_fail "memory inconsistent on the destination"; }
qmp "$dst" quit >/dev/null 2>&1
echo "PASS migrate-spawn in $(ferry_elapsed)s"
exit 0
