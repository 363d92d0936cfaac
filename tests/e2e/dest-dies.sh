#!/usr/bin/env bash
# dest-dies.sh [KIND:CHANNELS...] - the destination side dies in the middle
# of a live migration through ferry; the source VM must not lose anything.
# KIND is "qemu" (the destination QEMU gets SIGKILL) or "ferryd" (the
# destination ferry daemon gets SIGKILL). Default: qemu:0 ferryd:2 (the
# other pairings: `dest-dies.sh qemu:0 qemu:2 ferryd:0 ferryd:2`, ~2x the time).
#
# Per run: a RUNNING dirty.bin TCG guest (512 MiB) migrates with CHANNELS
# multifd channels. To keep the migration from completing before the kill,
# the source gets downtime-limit=1 ms before ferryctl starts (a guest that
# rewrites 32 MiB over and over can then never converge while ferryctl
# --max-bandwidth holds QEMU at 64 MiB/s: at full speed over a handed-over
# path a pass is so quick that its few dirty pages would fit 1 ms). Then the
# kill.
# Checks: ferryctl exits 1 within KILL_DETECT_LIMIT s (default 20) of the
# kill, prints "migration N failed: REASON" and "source VM is running";
# the source QEMU is running, its query-migrate says failed/cancelled, the
# guest's heartbeat keeps advancing on the source, and after `stop` its RAM
# passes `ramcheck pattern`; daemon a (and b, when only QEMU died) still
# answers ping; the destination VM does not run. Then the same source is
# migrated again (default downtime-limit) to a fresh destination through a
# (restarted) daemon b and must complete, with the destination running.
#
# Exit: 0 pass, 1 fail, 77 skip, 2 usage. Environment: tests/lib/ferry.sh;
# RUN_RAM (default 512M), KILL_DETECT_LIMIT (default 20 s).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(qemu:0 ferryd:2)
for r in "${runs[@]}"; do
	[[ $r =~ ^(qemu|ferryd):[0-9]+$ ]] || { echo "usage: $0 [qemu|ferryd:CHANNELS ...]" >&2; exit 2; }
done
RAM=${RUN_RAM:-512M}
DETECT=${KILL_DETECT_LIMIT:-20}
SLOW_BW=$((64 * 1024 * 1024))

ram_bytes=$(size_bytes "$RAM") || exit 2
# source + killed destination + retry destination
ferry_init --shm $((3 * ram_bytes)) --timeout $((30 + 45 * ${#runs[@]}))
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the ferry daemons failed"

declare -a REPORT=()
n=0

run_one() {
	local kind=$1 ch=$2 tag src dst dst2 srcram st out t_kill t_exit
	n=$((n + 1))
	tag="$kind:$ch"
	src=src$n dst=dst$n dst2=dst${n}r
	ferry_ping b 2>/dev/null || ferry_start_daemon b || ferry_fail "restarting ferryd b failed"
	FERRY_TO=${FERRY_LISTEN[b]}
	ferry_slow_migration_start "$src" "$dst" "$ch" "$SLOW_BW" "$tag"
	srcram=$FERRY_SRC_RAM
	# the destination QEMU must be loading data
	st=$(mig_field "$(side_sock "$dst")" status)
	[ "$st" = active ] || ferry_fail "$tag: destination query-migrate status '$st', expected active"
	sleep 1
	st=$(mig_field "$(side_sock "$src")" status)
	kill -0 "$FERRY_MIG_PID" 2>/dev/null && [ "$st" = active ] ||
		{ ferry_mig_report; ferry_fail "$tag: migration is no longer active before the kill (source: $st)"; }
	local moved
	moved=$(mig_field "$(side_sock "$src")" ram.transferred)

	t_kill=$(now_ms)
	case $kind in
	qemu) qemu_kill "$dst" KILL || ferry_fail "$tag: cannot kill the destination QEMU" ;;
	ferryd) ferry_kill_daemon b KILL || ferry_fail "$tag: cannot kill ferryd b" ;;
	esac
	ferry_migrate_wait "$DETECT"
	t_exit=$(($(now_ms) - t_kill))
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "$tag: ferryctl exited $FERRY_MIG_RC after the kill, expected 1"; }
	grep -q "ferryctl: migration [0-9]* failed: ." "$FERRY_MIG_ERR" ||
		{ ferry_mig_report; ferry_fail "$tag: ferryctl did not say why the migration failed"; }
	grep -q "ferryctl: source VM is running" "$FERRY_MIG_ERR" ||
		{ ferry_mig_report; ferry_fail "$tag: ferryctl does not report the source VM running"; }
	local reason
	reason=$(sed -n 's/^ferryctl: migration [0-9]* failed: //p' "$FERRY_MIG_ERR" | head -n 1)

	# the source: running, migration failed/cancelled, guest alive and intact
	st=$(qmp_get "$(qemu_sock "$src")" query-status status)
	[ "$st" = running ] || ferry_fail "$tag: source VM is '$st' after the failed migration, expected running"
	st=$(mig_field "$(qemu_sock "$src")" status)
	case $st in failed | cancelled) ;; *) ferry_fail "$tag: source query-migrate status '$st', expected failed/cancelled" ;; esac
	ferry_source_intact "$src" "$srcram" "$tag" "after the failure"

	# the destination must not run the guest
	if [ "$kind" = ferryd ] && qemu_alive "$dst"; then
		st=$(qmp_get "$(side_sock "$dst")" query-status status 2>/dev/null) || st="(no answer)"
		[ "$st" != running ] || ferry_fail "$tag: the destination VM is running after the failure: VM running twice"
	fi
	ferry_ping a || ferry_fail "$tag: ferryd a does not answer ping after the failure"
	if [ "$kind" = qemu ]; then
		ferry_ping b || ferry_fail "$tag: ferryd b does not answer ping after its QEMU died"
	else
		ferry_stop_daemon b 1
		ferry_start_daemon b || ferry_fail "$tag: restarting ferryd b failed"
		FERRY_TO=${FERRY_LISTEN[b]}
	fi
	qemu_stop "$dst"
	qemu_rm_ram "$dst"

	# nothing lost: the same source migrates fine now
	ferry_retry_migration "$src" "$dst2" "$ch" "$tag"
	local retry_ms=$FERRY_MIG_MS
	REPORT+=("$tag: killed after $((moved / 1048576)) MiB sent; ferryctl exit 1 after ${t_exit}ms: \"$reason\"; retry ${retry_ms}ms")
}

for r in "${runs[@]}"; do
	run_one "${r%%:*}" "${r##*:}"
done
ferry_pass "dest-dies ($RAM TCG guest)"
