#!/usr/bin/env bash
# migrate-stopped.sh CHANNELS - a stopped (-S) guest with 1 GiB of random RAM
# (memory-backend-file filled before QEMU starts) is migrated through two
# ferry daemons into a destination started with --prealloc and -incoming
# defer, with CHANNELS multifd channels (0 = a single migration stream).
#
# Checks: ferryctl exits 0 and its --json report says completed (destination
# completed) with the plan asked for; the destination's query-migrate says
# "completed" with the requested multifd setting; the source QEMU was ended
# (v3 Confirm) and the destination stays paused (-S); both daemons still
# answer ping and left no stream sockets behind; `ramcheck compare` finds the
# two RAM files byte-identical.
#
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, no /dev/shm space), 2 usage.
# Environment: see tests/lib/ferry.sh; STOPPED_RAM (default 1G),
# STOPPED_ACCEL (tcg|kvm, default tcg), MIG_TIMEOUT (default 60 s).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
	echo "usage: $0 CHANNELS [auto|relay]  (0 = single stream, N = multifd with N channels)" >&2
	exit 2
fi
CHANNELS=$1
# MODE: auto (ferry picks: over tcp, one stream handed over, multifd channels
# straight to a listener pinned to the source host) or relay (--no-handoff)
MODE=${2:-auto}
case "$MODE" in auto) mode_args=() ;; relay) mode_args=(--no-handoff) ;; *) echo "MODE must be auto or relay" >&2; exit 2 ;; esac
RAM=${STOPPED_RAM:-1G}
ACCEL=${STOPPED_ACCEL:-tcg}
MIG_TIMEOUT=${MIG_TIMEOUT:-60}

ram_bytes=$(size_bytes "$RAM") || exit 2
ferry_init --shm $((2 * ram_bytes)) --timeout 150
ferry_need_ramcheck

srcram=$QEMU_RAM_DIR/ferry-e2e-$$-src.ram
dstram=$QEMU_RAM_DIR/ferry-e2e-$$-dst.ram
QEMU_CLEANUP_FILES+=("$srcram" "$dstram")

t=$(now_ms)
fill_random "$srcram" "$RAM" || ferry_fail "fill_random $srcram $RAM failed"
tfill=$(($(now_ms) - t))

ferry_start_daemons || ferry_fail "starting the ferry daemons failed"
t=$(now_ms)
qemu_start src --ram "$RAM" --ram-file "$srcram" --stopped --accel "$ACCEL" ||
	ferry_fail "starting the source QEMU failed"
qemu_start dst --ram "$RAM" --ram-file "$dstram" --stopped --prealloc --incoming --accel "$ACCEL" ||
	ferry_fail "starting the destination QEMU failed"
tstart=$(($(now_ms) - t))

ferry_migrate src dst "$MIG_TIMEOUT" --channels "$CHANNELS" "${mode_args[@]+"${mode_args[@]}"}" --json
rc=$FERRY_MIG_RC
[ "$rc" -eq 0 ] || { ferry_mig_report; ferry_fail "ferryctl migrate --channels $CHANNELS exited $rc, expected 0"; }
state=$(json_field state <"$FERRY_MIG_OUT")
dst_status=$(json_field dst_status <"$FERRY_MIG_OUT")
[ "$state" = completed ] && [ "$dst_status" = completed ] || {
	ferry_mig_report
	ferry_fail "ferryctl --json says state '$state', dst_status '$dst_status'; expected completed/completed"
}

# the data path must be the one expected for this mode
transport=$(json_field transport <"$FERRY_MIG_OUT")
if [ "$MODE" = auto ]; then want="tcp handoff"; else want="tcp relay"; fi
case "$transport" in "$want"*) ;; *) ferry_fail "data path was '$transport', expected '$want'" ;; esac

src_sock=$(qemu_sock src)
dst_sock=$(qemu_sock dst)
st=$(mig_field "$dst_sock" status)
[ "$st" = completed ] || ferry_fail "destination query-migrate status '$st', expected completed"
summary="$(json_field total_s <"$FERRY_MIG_OUT") s, $(json_field throughput_gbs <"$FERRY_MIG_OUT") GB/s"

# ferry must have set up what was asked: multifd on iff CHANNELS > 0
plan=$(json_field plan <"$FERRY_MIG_OUT")
fallbacks=$(json_field fallbacks <"$FERRY_MIG_OUT")
[ -z "$fallbacks" ] || ferry_fail "fallbacks taken between two full daemons: $fallbacks"
caps=$(qmp "$dst_sock" query-migrate-capabilities) || ferry_fail "query-migrate-capabilities failed"
multifd=$(python3 -c 'import json,sys; print(next((str(c["state"]).lower() for c in json.loads(sys.argv[1]) if c["capability"]=="multifd"), "absent"))' "$caps")
if [ "$CHANNELS" -gt 0 ]; then
	[ "$plan" = "$want, $CHANNELS multifd channels" ] || ferry_fail "plan '$plan' with --channels $CHANNELS"
	[ "$multifd" = true ] || ferry_fail "destination multifd capability is '$multifd' with --channels $CHANNELS"
	n=$(qmp_get "$dst_sock" query-migrate-parameters multifd-channels)
	[ "$n" = "$CHANNELS" ] || ferry_fail "destination multifd-channels is '$n', expected $CHANNELS"
else
	case "$plan" in "tcp ${want#tcp }, single channel") ;; *) ferry_fail "plan '$plan', expected $want, single channel" ;; esac
	[ "$multifd" = false ] || [ "$multifd" = absent ] ||
		ferry_fail "destination multifd capability is '$multifd' with --channels 0"
fi

# Confirm: the VM lives on the destination only; the source QEMU is gone
[ "$(json_field src_vm_status <"$FERRY_MIG_OUT")" = ended ] || ferry_fail "ferryctl does not report the source ended"
for _ in $(seq 50); do qemu_alive src || break; sleep 0.1; done
qemu_alive src && ferry_fail "the source QEMU still runs after a completed migration"
st=$(qmp_get "$dst_sock" query-status status)
case $st in paused | prelaunch) ;; *) ferry_fail "destination VM status '$st', expected paused/prelaunch (-S)" ;; esac

for d in a b; do
	ferry_ping "$d" || ferry_fail "ferryd $d does not answer ping after the migration"
done
left=$(find "$QEMU_DIR" -maxdepth 1 -name 'mig-*.sock' 2>/dev/null)
[ -z "$left" ] || ferry_fail "stream sockets left in the run dir after the migration: $left"

qemu_stop src
qemu_stop dst
t=$(now_ms)
out=$("$RAMCHECK" compare "$srcram" "$dstram") || { echo "$out" >&2; ferry_fail "destination RAM differs from the source RAM"; }
tcmp=$(($(now_ms) - t))

echo "PASS migrate-stopped channels=$CHANNELS ($RAM, $ACCEL): fill ${tfill}ms, qemu start ${tstart}ms," \
	"ferryctl ${FERRY_MIG_MS}ms, compare ${tcmp}ms, total $(ferry_elapsed)s; src: $summary"
exit 0
