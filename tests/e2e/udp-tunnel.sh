#!/usr/bin/env bash
# udp-tunnel.sh - two ferryd --driver udp (datagram lanes made reliable by
# the data plane's shim) with injected faults on every datagram they send
# (loss, reordering, duplication, corruption): 4 connections through a
# standing tunnel (4 sessions of one lane) and 4 streams of one session over
# 4 lanes arrive whole (sha256 identical, in order); a peer daemon killed
# mid-transfer fails the transfer with a clear error within a bounded time.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh;
# UDP_TUNNEL_MB (default 32) sets the bytes per connection.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py
mb=${UDP_TUNNEL_MB:-32}
dead_ms=3000

ferry_init --timeout 240
allow=$QEMU_DIR/b-allowed
mkdir -p "$allow"
udp=(--driver udp --driver-opt rl_dead_ms=$dead_ms)
ferry_start_daemon a "${udp[@]}" --driver-opt fault=drop=1%,reorder=2%,dup=1%,corrupt=0.1%,seed=11 ||
	ferry_fail "starting ferryd a failed"
ferry_start_daemon b "${udp[@]}" --driver-opt fault=drop=1%,reorder=2%,dup=1%,corrupt=0.1%,seed=12 \
	--allow-dir "$allow" || ferry_fail "starting ferryd b failed"
grep -q "data udp:127.0.0.1:[0-9]*-[0-9]* (udp driver" "${FERRY_LOG[a]}" ||
	ferry_fail "ferryd a does not report a udp data endpoint"
python3 "$check" serve "$allow/target.sock" "$QEMU_DIR/accepted.log" </dev/null >"$QEMU_DIR/serve.out" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")

# 1: four connections at once through a standing tunnel: four sessions
listen=$QEMU_DIR/a/tunnel.sock
out=$(ferry_ctl a tunnel-open --to "${FERRY_LISTEN[b]}" --listen "$listen" --target "$allow/target.sock" --standing) ||
	ferry_fail "tunnel-open --standing failed: $out"
tid=$(echo "$out" | json_field tunnel) || ferry_fail "no tunnel id in: $out"
t0=$(now_ms)
res=$(python3 "$check" client "$listen" s0,s1,s2,s3 $((mb << 20)) 120) ||
	ferry_fail "4 connections over lossy udp lanes were not carried whole: $res"
echo "round 1: 4 x $mb MiB through 4 sessions in $(($(now_ms) - t0)) ms"

# 2: one session with 4 streams over 4 lanes
out=$(ferry_ctl a tunnel-open --to "${FERRY_LISTEN[b]}" --listen "$QEMU_DIR/a/four.sock" --target "$allow/target.sock" \
	--streams 4) || ferry_fail "tunnel-open --streams 4 failed: $out"
t0=$(now_ms)
res=$(python3 "$check" client "$QEMU_DIR/a/four.sock" f0,f1,f2,f3 $((mb << 20)) 120) ||
	ferry_fail "4 streams of one session over 4 lossy udp lanes were not carried whole: $res"
echo "round 2: 4 x $mb MiB through 1 session of 4 lanes in $(($(now_ms) - t0)) ms"
st=$(ferry_ctl a tunnel-status "$tid") || ferry_fail "tunnel-status failed"
[ "$(echo "$st" | json_field stats.failed)" = 0 ] || ferry_fail "a session failed on the lossy path: $st"

# 3: the peer daemon dies mid-transfer: the transfer fails, promptly, and
# says why
python3 "$check" client "$listen" k0 $((1 << 30)) 60 >"$QEMU_DIR/killed.out" 2>&1 &
cpid=$!
FERRY_EXTRA_PIDS+=("$cpid")
sleep 1
kill -0 "$cpid" 2>/dev/null || ferry_fail "the 1 GiB transfer ended before the peer was killed: $(cat "$QEMU_DIR/killed.out")"
ferry_kill_daemon b KILL
t0=$(now_ms)
wait "$cpid" && ferry_fail "the transfer succeeded with its peer daemon killed: $(cat "$QEMU_DIR/killed.out")"
el=$(($(now_ms) - t0))
grep -q "BAD k0" "$QEMU_DIR/killed.out" || ferry_fail "the client did not report the failure: $(cat "$QEMU_DIR/killed.out")"
[ "$el" -lt $((dead_ms + 10000)) ] || ferry_fail "the transfer took ${el} ms to fail (lane limit ${dead_ms} ms)"
# the session's end is recorded once the daemon has torn it down
deadline=$(($(now_ms) + 10000))
while :; do
	st=$(ferry_ctl a tunnel-status "$tid") || ferry_fail "tunnel-status failed"
	[ "$(echo "$st" | json_field stats.failed)" -ge 1 ] && break
	[ "$(now_ms)" -lt "$deadline" ] || ferry_fail "the failure is not counted: $st"
	sleep 0.1
done
err=$(echo "$st" | json_field stats.last_error)
# (the last error may be the tunnel's next attempt to reach the dead daemon)
echo "$err" | grep -Eq "peer silent|peer closed|went away|connection|cannot reach the peer daemon" ||
	ferry_fail "unclear error: $err"
echo "peer killed: the transfer failed after ${el} ms: $err"
ferry_stop_daemon b 1
ferry_ping a || ferry_fail "ferryd a does not answer ping afterwards"
echo "PASS udp-tunnel in $(ferry_elapsed)s"
exit 0
