#!/usr/bin/env bash
# recover.sh - the source daemon dies during a migration; after its restart
# `ferryctl recover` settles the migration from both daemons' durable
# records and both QEMUs' own state, so the VM runs on exactly one host:
#
#  1. handoff (QEMU streams to QEMU by itself): the source daemon is frozen
#     mid-migration, both QEMUs finish without it (the destination, started
#     with -S, waits paused), then it is killed. With the destination daemon
#     down, recover is undecided: the source stays paused (exit 1, says so).
#     With it back: the destination VM is resumed, the source QEMU ended;
#     the guest goes on on the destination with its memory consistent.
#  2. relay (ferry carries the bytes): killing the source daemon breaks the
#     stream; QEMU resumes the source guest by itself; recover finds it
#     running and leaves it there.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=512M
ferry_init --shm 3G --timeout 240
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the daemons failed"

# restart NAME: the same daemon again (its port, host uuid and state dir)
restart() {
	FERRY_FIXED_PORT=${FERRY_LISTEN[$1]##*:} ferry_start_daemon "$1" || ferry_fail "restarting ferryd $1 failed"
}

start_guests() { # SRC DST [dst -S]
	cp "$DIRTY_BIN" "$QEMU_DIR/$1.img" && cp "$DIRTY_BIN" "$QEMU_DIR/$2.img" || ferry_fail "cannot copy the boot image"
	# shellcheck disable=SC2046
	qemu_start "$1" --ram "$RAM" --boot "$QEMU_DIR/$1.img" -- $(side_qmp_args "$1") || ferry_fail "starting $1 failed"
	# shellcheck disable=SC2046
	qemu_start "$2" --ram "$RAM" --boot "$QEMU_DIR/$2.img" --prealloc --incoming ${3:+--stopped} -- $(side_qmp_args "$2") ||
		ferry_fail "starting $2 failed"
	wait_heartbeat "$(qemu_ramfile "$1")" 3 60 >/dev/null || ferry_fail "guest on $1 does not run"
	# a guest rewriting 32 MiB never converges within 1 ms of downtime: the
	# migration stays active until the test lets it finish
	qmp "$(side_sock "$1")" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1}}' >/dev/null ||
		ferry_fail "cannot set downtime-limit on $1"
}

side_status() { qmp_get "$(side_sock "$1")" query-migrate status 2>/dev/null; }
wait_side() { # NAME STATUS TIMEOUT
	local deadline=$(($(now_ms) + $3 * 1000))
	until [ "$(side_status "$1")" = "$2" ]; do
		[ "$(now_ms)" -lt "$deadline" ] || return 1
		sleep 0.05
	done
}

# ---- 1: handoff, the source daemon frozen then killed ----------------------
start_guests src1 dst1 stopped
ferry_migrate_start src1 dst1
wait_side src1 active 30 || { ferry_mig_report; ferry_fail "the migration did not start"; }
apid=$(ferry_pid a) || ferry_fail "no pid for ferryd a"
kill -STOP "$apid"
qmp "$(side_sock src1)" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300}}' >/dev/null
wait_side src1 completed 60 || ferry_fail "src1 did not complete on its own (status $(side_status src1))"
wait_side dst1 completed 30 || ferry_fail "dst1 did not complete (status $(side_status dst1))"
st=$(qmp_get "$(side_sock dst1)" query-status status)
[ "$st" = paused ] || ferry_fail "dst1 is '$st', expected paused (-S, nobody finished it)"
kill -KILL "$apid"
ferry_migrate_wait 10 >/dev/null
ferry_stop_daemon a 1
grep -q "source daemon went away" "${FERRY_LOG[b]}" || sleep 1

ferry_stop_daemon b
restart a
grep -q "was 'performing' when this daemon last stopped: run \`ferryctl recover\`" "${FERRY_LOG[a]}" ||
	ferry_fail "the restarted daemon does not say where the migration stood"
out=$(ferry_ctl a status) || ferry_fail "ferryctl status failed: $out"
echo "$out" | grep -q "cut short in phase 'performing' by an earlier stop of this daemon: ferryctl recover" ||
	ferry_fail "ferryctl status does not list the cut-short migration: $out"
out=$(ferry_ctl a recover) && ferry_fail "recover decided with the destination daemon down: $out"
echo "$out" | grep -q "undecided: cannot decide: the destination daemon" || ferry_fail "unclear undecided report: $out"
st=$(qmp_get "$(side_sock src1)" query-status status)
[ "$st" = postmigrate ] || ferry_fail "src1 is '$st' after an undecided recover, expected postmigrate (never resumed)"
echo "undecided while the destination is down: $out"

restart b
out=$(ferry_ctl a recover) || ferry_fail "recover failed with both daemons up: $out"
echo "$out" | grep -q "lives on the destination" || ferry_fail "recover did not settle on the destination: $out"
echo "recovered: $out"
wait_status "$(qemu_sock dst1)" running 10 || ferry_fail "dst1 was not resumed"
for _ in $(seq 50); do qemu_alive src1 || break; sleep 0.1; done
qemu_alive src1 && ferry_fail "src1 still exists: the VM could run twice"
vm_runs_consistent dst1 "after recover"
out=$(ferry_ctl a recover) || ferry_fail "a second recover failed: $out"
[ "$out" = "nothing to recover" ] || ferry_fail "a settled migration came back: $out"
out=$(ferry_ctl a status)
[ "$out" = "no migrations" ] || ferry_fail "ferryctl status still lists something: $out"
qemu_stop dst1
qemu_rm_ram src1
qemu_rm_ram dst1

# ---- 2: relay, the source daemon killed -------------------------------------
start_guests src2 dst2
ferry_migrate_start src2 dst2 --no-handoff
wait_side src2 active 30 || { ferry_mig_report; ferry_fail "the relayed migration did not start"; }
sleep 0.3
ferry_kill_daemon a KILL
ferry_migrate_wait 10 >/dev/null
ferry_stop_daemon a 1
wait_status "$(side_sock src2)" running 30 || ferry_fail "QEMU did not resume src2 after losing its stream"
restart a
out=$(ferry_ctl a recover) || ferry_fail "recover failed: $out"
echo "$out" | grep -q "stays on the source" || ferry_fail "recover did not leave the VM on the source: $out"
st=$(qmp_get "$(side_sock src2)" query-status status)
[ "$st" = running ] || ferry_fail "src2 is '$st' after recover"
echo "relay: $out"

echo "PASS recover in $(ferry_elapsed)s"
exit 0
