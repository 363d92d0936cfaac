#!/usr/bin/env bash
# cancel.sh [HOW...] - a live migration through ferry is cancelled by the
# user; the source VM keeps running and nothing is lost. HOW is "cancel"
# (`ferryctl cancel ID`, ID taken from daemon a's log since `ferryctl
# migrate` prints it only at the end), "sigint" (Ctrl-C: SIGINT to the
# `ferryctl migrate` process) or "sigterm". Default: cancel sigint.
#
# Per run: a RUNNING dirty.bin TCG guest (256 MiB) migrates with 2 multifd
# channels (CHANNELS). Kept from converging as in dest-dies.sh: downtime-limit
# 1 ms on the source before ferryctl starts, ferryctl --max-bandwidth 64 MiB/s
# (checked on the source QEMU through a second monitor).
# Checks: ferryctl migrate exits 1 within 15 s of the cancel, saying
# "migration N cancelled" and "source VM is running"; `ferryctl status N`
# says state "cancelled"; the source QEMU is running and its query-migrate
# says cancelled; the destination QEMU does not run the guest (it exits or
# stays not running); the guest keeps making progress on the source and,
# after `stop`, its RAM passes `ramcheck pattern`; both daemons answer ping;
# then the same source migrates to a fresh destination and completes.
#
# Exit: 0 pass, 1 fail, 77 skip, 2 usage. Environment: tests/lib/ferry.sh;
# RUN_RAM (default 256M), CHANNELS (default 2).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(cancel sigint)
for r in "${runs[@]}"; do
	case $r in cancel | sigint | sigterm) ;; *) echo "usage: $0 [cancel|sigint|sigterm ...]" >&2; exit 2 ;; esac
done
RAM=${RUN_RAM:-256M}
CHANNELS=${CHANNELS:-2}
SLOW_BW=$((64 * 1024 * 1024))

ram_bytes=$(size_bytes "$RAM") || exit 2
ferry_init --shm $((3 * ram_bytes)) --timeout $((30 + 40 * ${#runs[@]}))
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the ferry daemons failed"

declare -a REPORT=()
n=0

run_one() {
	local how=$1 src dst dst2 srcram st out id t_c t_exit
	n=$((n + 1))
	src=src$n dst=dst$n dst2=dst${n}r
	ferry_slow_migration_start "$src" "$dst" "$CHANNELS" "$SLOW_BW" "$how"
	srcram=$FERRY_SRC_RAM
	id=$(ferry_mig_id) || ferry_fail "$how: no migration id in ferryd a's log"
	sleep 0.5
	st=$(mig_field "$(side_sock "$src")" status)
	kill -0 "$FERRY_MIG_PID" 2>/dev/null && [ "$st" = active ] ||
		{ ferry_mig_report; ferry_fail "$how: migration is no longer active before the cancel (source: $st)"; }

	t_c=$(now_ms)
	case $how in
	cancel)
		out=$(ferry_ctl a cancel "$id") || ferry_fail "$how: ferryctl cancel $id failed: $out"
		;;
	sigint) kill -INT "$FERRY_MIG_PID" ;;
	sigterm) kill -TERM "$FERRY_MIG_PID" ;;
	esac
	ferry_migrate_wait 15
	t_exit=$(($(now_ms) - t_c))
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "$how: ferryctl migrate exited $FERRY_MIG_RC after the cancel, expected 1"; }
	grep -q "ferryctl: migration $id cancelled" "$FERRY_MIG_ERR" ||
		{ ferry_mig_report; ferry_fail "$how: ferryctl does not say migration $id was cancelled"; }
	grep -q "ferryctl: source VM is running" "$FERRY_MIG_ERR" ||
		{ ferry_mig_report; ferry_fail "$how: ferryctl does not report the source VM running"; }
	out=$(ferry_ctl a status "$id" --json) || ferry_fail "$how: ferryctl status $id failed"
	st=$(json_field state <<<"$out")
	[ "$st" = cancelled ] || ferry_fail "$how: ferryctl status $id says state '$st', expected cancelled"

	st=$(qmp_get "$(qemu_sock "$src")" query-status status)
	[ "$st" = running ] || ferry_fail "$how: source VM is '$st' after the cancel, expected running"
	st=$(mig_field "$(qemu_sock "$src")" status)
	[ "$st" = cancelled ] || ferry_fail "$how: source query-migrate status '$st', expected cancelled"
	# the destination must not run the guest (QEMU 7.2 exits when an
	# incoming migration breaks off)
	local dst_state=exited
	if qemu_alive "$dst"; then
		dst_state=$(qmp_get "$(side_sock "$dst")" query-status status 2>/dev/null) || dst_state="(no answer)"
		[ "$dst_state" != running ] || ferry_fail "$how: the destination VM is running after the cancel: VM running twice"
	fi
	ferry_source_intact "$src" "$srcram" "$how" "after the cancel"
	for d in a b; do ferry_ping "$d" || ferry_fail "$how: ferryd $d does not answer ping after the cancel"; done
	qemu_stop "$dst"
	qemu_rm_ram "$dst"

	# the same source migrates fine afterwards
	ferry_retry_migration "$src" "$dst2" "$CHANNELS" "$how"
	local retry_ms=$FERRY_MIG_MS
	REPORT+=("$how: migration $id cancelled, ferryctl exit 1 after ${t_exit}ms; destination $dst_state; retry ${retry_ms}ms")
}

for r in "${runs[@]}"; do
	run_one "$r"
done
ferry_pass "cancel ($RAM TCG guest, $CHANNELS channels)"
