#!/usr/bin/env bash
# nbd-peer-dies.sh - ferry's NBD path when a daemon dies under a client that
# keeps writing: (1) the destination daemon is killed: the client's next
# request fails promptly (no hang), the reason is in nbd-status, and once the
# destination daemon is back the same path serves a new client; (2) the
# source daemon is killed: the destination ends that session's lanes and lets
# go of its connections to the export; (3) the export fails a write ferry
# already answered: the client's next flush fails.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/nbd.sh
. "$here/../lib/nbd.sh"

ferry_init --timeout 180
nbd_init nbdkit nbdcopy
allow=$NBD_ALLOW PY=$NBD_PY check=$NBD_CHECK
truncate -s 64M "$allow/disk.img"
nbdkit_start "$allow/disk.img" "$allow/t.sock"
sock=$QEMU_DIR/a/nbd.sock
out=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$sock" --target "$allow/t.sock" --lanes 3) ||
	ferry_fail "nbd-open failed: $out"
nid=$(echo "$out" | json_field nbd)

# hold_start: a writing client in the background (HOLD_PID, HOLD_OUT)
hold_start() {
	HOLD_OUT=$QEMU_DIR/hold-$1.out
	"$PY" "$check" hold "$sock" 60 >"$HOLD_OUT" 2>&1 &
	HOLD_PID=$!
	FERRY_EXTRA_PIDS+=("$HOLD_PID")
	wait_file_line "$HOLD_OUT" started 20 || ferry_fail "the writing client did not start: $(cat "$HOLD_OUT")"
}

# 1: the destination daemon dies
hold_start 1
sleep 0.3
ferry_kill_daemon b KILL
ferry_stop_daemon b 1
t0=$(now_ms)
ferry_wait_pid "$HOLD_PID" 30 "the writing client"
rc=$?
el=$(($(now_ms) - t0))
[ "$rc" = 0 ] || ferry_fail "the client saw no failure after the destination died (exit $rc): $(cat "$HOLD_OUT")"
[ "$el" -lt 20000 ] || ferry_fail "the client's failure took $el ms"
st=$(ferry_ctl a nbd-status "$nid") || ferry_fail "nbd-status failed"
[ "$(echo "$st" | json_field stats.failed)" -ge 1 ] || ferry_fail "the failure is not counted: $st"
[ -n "$(echo "$st" | json_field stats.last_error)" ] || ferry_fail "no reason kept: $st"

# the destination comes back on its address: the same path serves again
FERRY_FIXED_PORT=${FERRY_LISTEN[b]##*:} ferry_start_daemon b --allow-dir "$allow" || ferry_fail "restarting ferryd b failed"
head -c $((8 << 20)) /dev/urandom >"$QEMU_DIR/rand.img"
timeout 60 nbdcopy "$QEMU_DIR/rand.img" "nbd+unix:///?socket=$sock" || ferry_fail "no copy after the destination came back"
cmp -n $((8 << 20)) "$QEMU_DIR/rand.img" "$allow/disk.img" || ferry_fail "the copy after the restart differs"

# 2: the source daemon dies: the destination lets go of the export
hold_start 2
sleep 0.3
sid=$(sed -n 's/.*nbd session \([0-9]*\) .*: opened.*/\1/p' "${FERRY_LOG[b]}" | tail -n 1)
[ -n "$sid" ] || ferry_fail "no session of the writing client in ferryd b's log"
ferry_kill_daemon a KILL
ferry_stop_daemon a 1
wait_file_line "${FERRY_LOG[b]}" "nbd session $sid .* ended" 20 ||
	ferry_fail "the destination did not end the orphaned session $sid"
ferry_wait_pid "$HOLD_PID" 30 "the writing client" || ferry_fail "the client saw no failure after the source died"
ferry_ping b || ferry_fail "ferryd b does not answer ping afterwards"

# 3: the export fails a write that ferry already answered (docs/nbd.md, "Early
# write replies"): the next flush and what follows fail, the reason is kept,
# and a client after that one is served again
ferry_start_daemon a || ferry_fail "restarting ferryd a failed"
truncate -s 16M "$allow/bad.img"
nbdkit -f --unix "$allow/bad.sock" -t 16 --filter=error file "$allow/bad.img" error-pwrite=EIO \
	error-pwrite-rate=100% error-pwrite-file="$QEMU_DIR/trigger" </dev/null >>"$QEMU_DIR/nbdkit.log" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")
wait_sock "$allow/bad.sock"
sock=$QEMU_DIR/a/bad.sock
out=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$sock" --target "$allow/bad.sock" --lanes 2) ||
	ferry_fail "nbd-open of the failing export failed: $out"
nid=$(echo "$out" | json_field nbd)
out=$(timeout 60 "$PY" "$check" latefail "$sock" "$QEMU_DIR/trigger" 2>&1) || ferry_fail "$out"
echo "$out"
st=$(ferry_ctl a nbd-status "$nid") || ferry_fail "nbd-status failed"
[ "$(echo "$st" | json_field stats.errors)" -ge 1 ] || ferry_fail "the failed write is not counted: $st"
rm -f "$QEMU_DIR/trigger"
timeout 60 nbdcopy "$QEMU_DIR/rand.img" "nbd+unix:///?socket=$sock" || ferry_fail "no copy after the failed client left"
cmp -n $((8 << 20)) "$QEMU_DIR/rand.img" "$allow/bad.img" || ferry_fail "the copy after the failure differs"
echo "nbd-peer-dies: ok"
