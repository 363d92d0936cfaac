#!/usr/bin/env bash
# tunnel-standing.sh - a standing tunnel carries any number of connections,
# one after another and several at once, whole and in the order they arrived,
# for as long as it stands (opened with ferryctl or from ferryd --tunnel);
# a vanished peer daemon fails the connections made
# meanwhile (promptly, with the reason in tunnel-status), and the tunnel works
# again once the peer is back.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py

ferry_init --timeout 240
allow=$QEMU_DIR/b-allowed
mkdir -p "$allow"
ferry_start_daemon a || ferry_fail "starting ferryd a failed"
ferry_start_daemon b --allow-dir "$allow" || ferry_fail "starting ferryd b failed"
net_log=$QEMU_DIR/accepted.log
: >"$net_log"
python3 "$check" serve "$allow/target.sock" "$net_log" </dev/null >"$QEMU_DIR/serve.out" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")
listen=$QEMU_DIR/a/tunnel.sock

out=$(ferry_ctl a tunnel-open --to "${FERRY_LISTEN[b]}" --listen "$listen" --target "$allow/target.sock" --standing) ||
	ferry_fail "tunnel-open --standing failed: $out"
tid=$(echo "$out" | json_field tunnel) || ferry_fail "no tunnel id in: $out"
[ -S "$listen" ] || ferry_fail "the standing tunnel does not listen on $listen"

# The tags as the far side accepted them, in order.
accepted() { sort -n "$net_log" | awk '{print $2}' | paste -sd, -; }

# 1: three connections made back to back (like QEMU's main channel and two
# multifd channels), 48 MiB each, in parallel.
python3 "$check" client "$listen" m0,m1,m2 $((48 << 20)) 120 || ferry_fail "round 1: a connection was not carried whole"
[ "$(accepted)" = m0,m1,m2 ] || ferry_fail "round 1: the far side accepted $(accepted), expected m0,m1,m2"
# 2: the same tunnel again, later, twice in a row (a second and a third migration)
python3 "$check" client "$listen" n0 $((16 << 20)) 60 || ferry_fail "round 2: not carried"
python3 "$check" client "$listen" p0,p1 $((8 << 20)) 60 || ferry_fail "round 3: not carried"
[ "$(accepted)" = m0,m1,m2,n0,p0,p1 ] || ferry_fail "the far side accepted $(accepted)"

# once idle, every carried connection's session is closed on both sides
deadline=$(($(now_ms) + 5000))
while :; do
	st=$(ferry_ctl a tunnel-status "$tid") || ferry_fail "tunnel-status failed"
	[ "$(echo "$st" | json_field stats.active)" = 0 ] && break
	[ "$(now_ms)" -lt "$deadline" ] || ferry_fail "sessions still active after the connections ended: $st"
	sleep 0.1
done
[ "$(echo "$st" | json_field stats.connections)" = 6 ] || ferry_fail "expected 6 connections: $st"
[ "$(echo "$st" | json_field stats.failed)" = 0 ] || ferry_fail "expected no failure: $st"
want=$(((3 * 48 + 16 + 2 * 8) << 20))
tx=$(echo "$st" | json_field stats.tx_bytes)
[ "$tx" -ge "$want" ] || ferry_fail "tx_bytes $tx < $want"
grep -q "session .* the source daemon went away" "${FERRY_LOG[b]}" &&
	ferry_fail "ferryd b tore sessions down as if the source had vanished"

# 3: the peer daemon vanishes: a connection made now is closed promptly and
# the reason is kept
ferry_kill_daemon b KILL
ferry_stop_daemon b 1
t0=$(now_ms)
res=$(python3 "$check" client "$listen" q0 4096 20) && ferry_fail "a connection succeeded with no peer daemon: $res"
el=$(($(now_ms) - t0))
[ "$el" -lt 15000 ] || ferry_fail "the failed connection took ${el} ms to end"
st=$(ferry_ctl a tunnel-status "$tid") || ferry_fail "tunnel-status failed"
[ "$(echo "$st" | json_field stats.failed)" -ge 1 ] || ferry_fail "the failure is not counted: $st"
echo "$st" | json_field stats.last_error | grep -q "${FERRY_LISTEN[b]}" ||
	ferry_fail "last_error does not name the peer: $st"

# 4: the peer daemon is back on its address: the same tunnel works again
FERRY_FIXED_PORT=${FERRY_LISTEN[b]##*:} ferry_start_daemon b --allow-dir "$allow" || ferry_fail "restarting ferryd b failed"
python3 "$check" client "$listen" r0,r1 $((4 << 20)) 60 || ferry_fail "not carried after the peer came back"

# 5: a tunnel sized for one migration (--streams 2) refuses a third
# connection at once and counts it
out=$(ferry_ctl a tunnel-open --to "${FERRY_LISTEN[b]}" --listen "$QEMU_DIR/a/sized.sock" --target "$allow/target.sock" \
	--streams 2) || ferry_fail "tunnel-open --streams 2 failed: $out"
sid=$(echo "$out" | json_field tunnel)
python3 "$check" client "$QEMU_DIR/a/sized.sock" u0,u1 $((1 << 20)) 60 || ferry_fail "the sized tunnel did not carry 2"
python3 "$check" client "$QEMU_DIR/a/sized.sock" u2 4096 20 && ferry_fail "the sized tunnel carried a third connection"
st=$(ferry_ctl a tunnel-status "$sid") || ferry_fail "tunnel-status failed"
[ "$(echo "$st" | json_field stats.streams_refused)" = 1 ] || ferry_fail "the refused connection is not counted: $st"
ferry_ctl a tunnel-close "$sid" >/dev/null || ferry_fail "tunnel-close failed"

# 6: the same from ferryd's configuration, standing from the start
ferry_start_daemon c --tunnel "${FERRY_LISTEN[b]},$QEMU_DIR/c/cfg.sock,$allow/target.sock" ||
	ferry_fail "starting ferryd c with --tunnel failed"
python3 "$check" client "$QEMU_DIR/c/cfg.sock" s0,s1 $((4 << 20)) 60 || ferry_fail "the configured tunnel did not carry"
bad=$("$FERRYD" --admin "$QEMU_DIR/x.sock" --tls-psk "$QEMU_DIR/ferry.psk" --tunnel "${FERRY_LISTEN[b]},$QEMU_DIR/x.sock" 2>&1) &&
	ferry_fail "ferryd took --tunnel without a target"
echo "$bad" | grep -q "PEER,LISTEN,TARGET" || ferry_fail "unclear --tunnel error: $bad"

out=$(ferry_ctl a tunnel-close "$tid") || ferry_fail "tunnel-close failed: $out"
[ -e "$listen" ] && ferry_fail "$listen still exists after tunnel-close"
ferry_ping a || ferry_fail "ferryd a does not answer ping afterwards"
echo "PASS tunnel-standing in $(ferry_elapsed)s"
exit 0
