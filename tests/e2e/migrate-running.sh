#!/usr/bin/env bash
# migrate-running.sh [CHANNELS...] - a RUNNING dirty.bin TCG guest (256 MiB,
# rewriting a 32 MiB area in a checkable pattern) is migrated through two
# ferry daemons while it dirties memory; once per CHANNELS value (default:
# "0 2", i.e. a single stream, then multifd with 2 channels).
#
# Per run: wait until the guest's heartbeat advances; ferryctl migrate exits 0
# and reports the destination completed; the guest kept running on the source
# during the migration; afterwards the source QEMU has been ended (v3
# Confirm: its heartbeat no longer moves, the VM never runs twice) and its RAM
# passes `ramcheck pattern`; the destination (no -S) is running, continues
# the guest where the source left it (its pass counter starts at or above the
# source's last one) and makes progress; then it is stopped and its RAM
# passes `ramcheck pattern`. Both daemons still answer ping.
#
# Exit: 0 pass, 1 fail, 77 skip, 2 usage. Environment: tests/lib/ferry.sh;
# RUN_RAM (default 256M), MIG_TIMEOUT (default 60 s).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(0 2)
for c in "${runs[@]}"; do
	[[ $c =~ ^[0-9]+$ ]] || { echo "usage: $0 [CHANNELS...]   (default: 0 2)" >&2; exit 2; }
done
RAM=${RUN_RAM:-256M}
MIG_TIMEOUT=${MIG_TIMEOUT:-60}

ram_bytes=$(size_bytes "$RAM") || exit 2
ferry_init --shm $((2 * ram_bytes)) --timeout $((30 + 60 * ${#runs[@]}))
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the ferry daemons failed"

declare -a REPORT=()

run_one() {
	local ch=$1 src=src$1 dst=dst$1 srcram dstram t0 hb0 hbm hb1 w1 w2 st out
	t0=$(now_ms)
	qemu_start "$src" --ram "$RAM" --boot "$DIRTY_BIN" || ferry_fail "starting $src failed"
	qemu_start "$dst" --ram "$RAM" --boot "$DIRTY_BIN" --prealloc --incoming || ferry_fail "starting $dst failed"
	srcram=$(qemu_ramfile "$src")
	dstram=$(qemu_ramfile "$dst")
	hb0=$(wait_heartbeat "$srcram" 3 60) || ferry_fail "guest on $src does not run (no heartbeat)"
	local tboot=$(($(now_ms) - t0))
	# progress right before the migration
	hbm=$(heartbeat_done "$srcram") || ferry_fail "no heartbeat in $srcram"
	sleep 0.5
	hb1=$(heartbeat_done "$srcram") || ferry_fail "no heartbeat in $srcram"
	[ "$hb1" -gt "$hbm" ] || ferry_fail "guest on $src stalls before the migration ($hbm -> $hb1)"
	hbm=$hb1

	ferry_migrate "$src" "$dst" "$MIG_TIMEOUT" --channels "$ch"
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "channels=$ch: ferryctl migrate exited $FERRY_MIG_RC, expected 0"; }
	grep -q "completed.*destination completed" "$FERRY_MIG_OUT" ||
		{ ferry_mig_report; ferry_fail "channels=$ch: ferryctl did not report a completed migration"; }
	local summary
	summary=$(grep -o "completed over .*" "$FERRY_MIG_OUT")
	wait_migration "$(qemu_sock "$dst")" 10 >/dev/null || ferry_fail "destination query-migrate is not completed"

	# the source: ended for good (v3 Confirm), and it ran while RAM was being sent
	grep -q "source ended" "$FERRY_MIG_OUT" || ferry_fail "channels=$ch: ferryctl does not report the source ended"
	for _ in $(seq 50); do qemu_alive "$src" || break; sleep 0.1; done
	qemu_alive "$src" && ferry_fail "channels=$ch: the source QEMU still runs after the migration"
	hb1=$(heartbeat_done "$srcram") || ferry_fail "no heartbeat in $srcram"
	[ "$hb1" -gt "$hbm" ] || ferry_fail "channels=$ch: source guest did not run during the migration ($hbm -> $hb1)"
	w1=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	# the destination resumes by itself (no -S)
	wait_status "$(qemu_sock "$dst")" running 10 ||
		ferry_fail "channels=$ch: destination is not running after the migration"
	local d1 d2 dw1 dw2
	d1=$(heartbeat_done "$dstram") && dw1=$(heartbeat_words "$dstram") || ferry_fail "no heartbeat on $dst"
	sleep 1.5
	w2=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	[ "$w1" = "$w2" ] || ferry_fail "channels=$ch: the source guest still runs after the migration (words $w1 -> $w2): VM running twice"
	out=$("$RAMCHECK" pattern "$srcram") || { echo "$out" >&2; ferry_fail "channels=$ch: pattern broken on the source after migration"; }

	st=$(qmp_get "$(qemu_sock "$dst")" query-status status)
	[ "$st" = running ] || ferry_fail "channels=$ch: destination status '$st' 1.5s after migration, expected running"
	d2=$(heartbeat_done "$dstram") && dw2=$(heartbeat_words "$dstram") || ferry_fail "no heartbeat on $dst"
	[ "$dw2" -gt "$dw1" ] || ferry_fail "channels=$ch: destination guest makes no progress (words $dw1 -> $dw2)"
	[ "$d1" -ge "$hb1" ] || ferry_fail "channels=$ch: destination pass counter $d1 is below the source's final $hb1: it did not continue the migrated guest"

	qmp "$(qemu_sock "$dst")" stop >/dev/null || ferry_fail "stop on $dst failed"
	wait_status "$(qemu_sock "$dst")" paused 10 || ferry_fail "$dst did not pause"
	out=$("$RAMCHECK" pattern "$dstram") || { echo "$out" >&2; ferry_fail "channels=$ch: pattern broken on the destination"; }
	for d in a b; do ferry_ping "$d" || ferry_fail "ferryd $d does not answer ping after the migration"; done
	qemu_stop "$src"
	qemu_stop "$dst"
	qemu_rm_ram "$src"
	qemu_rm_ram "$dst"
	REPORT+=("channels=$ch: boot ${tboot}ms (pass $hb0), ferryctl ${FERRY_MIG_MS}ms, $((hb1 - hbm)) passes during it; dst passes $d1 -> $d2 in 1.5s; src: $summary")
}

for c in "${runs[@]}"; do
	run_one "$c"
done
ferry_pass "migrate-running ($RAM TCG guest)"
