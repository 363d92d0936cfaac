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
	local how=$1 src dst dst2 srcram st out id t_c t_exit w1 w2
	n=$((n + 1))
	src=src$n dst=dst$n dst2=dst${n}r
	# shellcheck disable=SC2046
	qemu_start "$src" --ram "$RAM" --boot "$DIRTY_BIN" -- $(side_qmp_args "$src") || ferry_fail "starting $src failed"
	# shellcheck disable=SC2046
	qemu_start "$dst" --ram "$RAM" --boot "$DIRTY_BIN" --prealloc --incoming -- $(side_qmp_args "$dst") ||
		ferry_fail "starting $dst failed"
	srcram=$(qemu_ramfile "$src")
	wait_heartbeat "$srcram" 3 60 >/dev/null || ferry_fail "guest on $src does not run (no heartbeat)"
	qmp "$(qemu_sock "$src")" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1}}' >/dev/null ||
		ferry_fail "$how: setting downtime-limit on $src failed"

	ferry_migrate_start "$src" "$dst" --channels "$CHANNELS" --max-bandwidth "$SLOW_BW"
	wait_mig_active "$(side_sock "$src")" 20 $((16 * 1024 * 1024)) >/dev/null || {
		ferry_migrate_wait 1
		ferry_mig_report
		ferry_fail "$how: the migration did not become active with data flowing"
	}
	# ferryctl --max-bandwidth reached the source QEMU
	bw=$(qmp_get "$(side_sock "$src")" query-migrate-parameters max-bandwidth)
	[ "$bw" = "$SLOW_BW" ] || ferry_fail "$how: the source QEMU's max-bandwidth is '$bw', not --max-bandwidth $SLOW_BW"
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
	w1=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	sleep 1
	w2=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	[ "$w2" -gt "$w1" ] || ferry_fail "$how: guest on the source makes no progress after the cancel ($w1 -> $w2)"
	qmp "$(qemu_sock "$src")" stop >/dev/null || ferry_fail "stop on $src failed"
	wait_status "$(qemu_sock "$src")" paused 10 || ferry_fail "$src did not pause"
	out=$("$RAMCHECK" pattern "$srcram") || { echo "$out" >&2; ferry_fail "$how: pattern broken on the source RAM"; }
	qmp "$(qemu_sock "$src")" cont >/dev/null || ferry_fail "cont on $src failed"
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
echo "PASS cancel ($RAM TCG guest, $CHANNELS channels) in $(ferry_elapsed)s"
for r in "${REPORT[@]}"; do echo "  $r"; done
exit 0
