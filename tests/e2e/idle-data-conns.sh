#!/usr/bin/env bash
# idle-data-conns.sh - idle connections to the destination daemon's data
# port must not stop migrations.
#
# Anyone who can reach the data port can open a TCP connection and send
# nothing (a port scanner, a stuck peer, a half-open connection). Here
# IDLE_CONNS (default 3) such connections (one of them having sent half a
# frame header) are held open on daemon b's data endpoint (from `ferryctl
# ping`), then a stopped 64 MiB guest is migrated through the daemons. The
# migration must complete within MIG_LIMIT (default 20) seconds and the RAM
# files must be identical; the daemons must keep answering ping.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

IDLE=${IDLE_CONNS:-3}
LIMIT=${MIG_LIMIT:-20}
ferry_init --shm 256M --timeout 90
ferry_need_ramcheck
ferry_start_daemons || ferry_fail "starting the ferry daemons failed"
ep=$(ferry_endpoint b) || ferry_fail "no data endpoint in ferryctl ping"
[[ $ep =~ ^tcp:(.+):([0-9]+)$ ]] || ferry_fail "data endpoint '$ep' is not tcp:HOST:PORT"
data=tcp:${BASH_REMATCH[1]}:${BASH_REMATCH[2]}

srcram=$QEMU_RAM_DIR/ferry-e2e-$$-src.ram
QEMU_CLEANUP_FILES+=("$srcram")
fill_random "$srcram" 64M || ferry_fail "fill_random failed"
qemu_start src --ram 64M --ram-file "$srcram" --stopped || ferry_fail "starting src failed"
qemu_start dst --ram 64M --stopped --prealloc --incoming || ferry_fail "starting dst failed"

net_tool_bg "$QEMU_DIR/idle1.out" hold "$data" 1 'str:FRY1\x01\x00\x00'
[ "$IDLE" -gt 1 ] && net_tool_bg "$QEMU_DIR/idle2.out" hold "$data" $((IDLE - 1))
wait_file_line "$QEMU_DIR/idle1.out" held 10 || ferry_fail "cannot open idle connections to $data"
[ "$IDLE" -gt 1 ] && { wait_file_line "$QEMU_DIR/idle2.out" held 10 || ferry_fail "cannot open idle connections to $data"; }
log "$IDLE idle connections open on $data"

ferry_migrate src dst "$LIMIT" --channels 0
rc=$FERRY_MIG_RC
if [ "$rc" -ne 0 ]; then
	ferry_mig_report
	ferry_fail "with $IDLE idle connections on the destination's data port the migration failed (exit $rc after ${FERRY_MIG_MS}ms): lane set-up is blocked behind them"
fi
for d in a b; do ferry_ping "$d" || ferry_fail "ferryd $d does not answer ping"; done
qemu_stop src
qemu_stop dst
out=$("$RAMCHECK" compare "$srcram" "$(qemu_ramfile dst)") || { echo "$out" >&2; ferry_fail "RAM differs"; }
echo "PASS idle-data-conns: migration with $IDLE idle data connections took ${FERRY_MIG_MS}ms (total $(ferry_elapsed)s)"
exit 0
