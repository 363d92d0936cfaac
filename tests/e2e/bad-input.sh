#!/usr/bin/env bash
# bad-input.sh - ferry facing bad input: every case must fail with a clear
# message in bounded time, crash nothing, and leave both daemons working.
#
#  (a) --src-qmp is not a QEMU monitor: a unix listener sending an SSH banner,
#      one that accepts and stays silent, a path where nothing listens;
#      also `ferryctl qmp` on the banner socket
#      -> ferryctl exit 1, error naming the monitor
#  (b) --dst-qmp the destination daemon must refuse or cannot use: outside
#      its run dir (absolute, via "..", relative), missing, not QEMU, a QEMU
#      not started with -incoming -> exit 1 with the reason
#  (c) --to where no ferryd is: nothing listening, a banner-sending TCP
#      server, not HOST:PORT -> exit 1 with the reason
#      After (a)-(c): the source VM (a running dirty.bin guest) still runs
#      and makes progress, the destination QEMU is still waiting
#      (inmigrate), and both monitors are free again (no connection leaked).
#  (d) garbage on the destination daemon's control port, from a client
#      that passed its TLS authentication (random bytes, bad JSON, oversized
#      line, bogus peer requests) or did not (plain TCP), and on its data
#      port (random bytes, a frame header with a bad checksum, a connection
#      closed at once) -> the daemon stays up; then the source guest, stopped, is
#      migrated (64 MiB) through the same daemons and the RAM files must be
#      identical afterwards.
#  (e) bad requests on the admin socket: truncated line (closed, and left
#      open while others use the daemon), oversized line, deep nesting, NUL
#      byte, non-object, no "cmd", unknown cmd, bad arguments, unknown ids
#  (f) ferryctl usage errors -> exit 2 with a message; unreachable daemon
#      -> exit 3
# At the end both daemons are alive and answer ping.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=64M
ferry_init --shm 256M --timeout 150
ferry_need_ramcheck
ferry_need_dirty_bin
# X.509 credentials, so that the control-port cases below can pass TLS as a
# peer would (python's ssl module has no PSK)
ferry_make_x509 "$QEMU_DIR/x509/daemons" "$QEMU_DIR/x509/ca" || ferry_fail "making the daemons' certificate failed"
ferry_make_x509 "$QEMU_DIR/x509/peer" "$QEMU_DIR/x509/ca" peer || ferry_fail "making the peer's certificate failed"
export FERRY_NET_TLS_DIR=$QEMU_DIR/x509/peer
ferry_start_daemons --tls-x509 "$QEMU_DIR/x509/daemons" || ferry_fail "starting the ferry daemons failed"
W=$QEMU_DIR
ncases=0

# expect NAME RC REGEX CMD...: CMD (bounded to 30 s) must exit RC and print
# (stdout+stderr) something matching the extended REGEX (case-insensitive).
expect() {
	local name=$1 want=$2 re=$3 t out rc
	shift 3
	t=$(now_ms)
	out=$(timeout -k 2 30 "$@" 2>&1)
	rc=$?
	t=$(($(now_ms) - t))
	if [ "$rc" -ne "$want" ] || ! grep -Eqi -- "$re" <<<"$out"; then
		printf '%s\n' "$out" | sed 's/^/  | /' >&2
		ferry_fail "case $name: exit $rc (wanted $want) in ${t}ms; output must match /$re/"
	fi
	ncases=$((ncases + 1))
	printf '  ok  %-28s exit %d, %5dms: %s\n' "$name" "$rc" "$t" "$(grep -Ei -m1 -- "$re" <<<"$out" | cut -c1-150)"
}

# reply NAME DEST DATA REGEX: send DATA to DEST with net_tool; the first line
# of the answer must match REGEX (e.g. an error reply, or <EOF>)
reply() {
	local name=$1 dest=$2 data=$3 re=$4 out
	out=$(timeout -k 2 20 python3 -c "$(_net_tool_src)" send "$dest" "$data" 5 2>/dev/null)
	if ! grep -Eq -- "$re" <<<"$out"; then
		printf '%s\n' "$out" | sed 's/^/  | /' >&2
		ferry_fail "case $name: answer does not match /$re/"
	fi
	ncases=$((ncases + 1))
	printf '  ok  %-28s %s\n' "$name" "$(head -n 1 <<<"$out" | cut -c1-150)"
}

# both daemons alive and answering
daemons_ok() {
	local d
	for d in a b; do
		ferry_alive "$d" || ferry_fail "after $1: ferryd $d died"
		ferry_ping "$d" || ferry_fail "after $1: ferryd $d does not answer ping"
	done
}

# source running, destination still waiting, both monitors free again
vms_ok() {
	local st
	st=$(QMP_TIMEOUT=5 qmp_get "$(qemu_sock src)" query-status status) ||
		ferry_fail "after $1: the source monitor does not answer (connection leaked?)"
	[ "$st" = running ] || ferry_fail "after $1: source VM is '$st', expected running"
	st=$(QMP_TIMEOUT=5 qmp_get "$(qemu_sock dst)" query-status status) ||
		ferry_fail "after $1: the destination monitor does not answer (connection leaked?)"
	[ "$st" = inmigrate ] || ferry_fail "after $1: destination VM is '$st', expected inmigrate"
}


qemu_start src --ram "$RAM" --boot "$DIRTY_BIN" || ferry_fail "starting the source QEMU failed"
qemu_start dst --ram "$RAM" --boot "$DIRTY_BIN" --stopped --prealloc --incoming || ferry_fail "starting the destination QEMU failed"
qemu_start other --ram 16M --stopped || ferry_fail "starting the 'other' QEMU failed"
SRC=$(qemu_sock src)
DST=$(qemu_sock dst)
TO=$FERRY_TO
mig=("$FERRYCTL" --admin "${FERRY_ADMIN[a]}" migrate)
wait_heartbeat "$(qemu_ramfile src)" 2 60 >/dev/null || ferry_fail "the source guest does not run"

# fake monitors: in the run dir (so the destination daemon accepts the paths)
net_tool_bg "$W/banner.out" listen "unix:$W/banner.sock" banner
net_tool_bg "$W/silent.out" listen "unix:$W/silent.sock" silent
outside=$(mktemp -d /tmp/ferry-outside.XXXXXX) || ferry_fail "mktemp failed"
FERRY_CLEANUP_DIRS+=("$outside")
net_tool_bg "$W/outside.out" listen "unix:$outside/dst.qmp" banner
net_tool_bg "$W/tcpbanner.out" listen "tcp:$W/tcpbanner.port" banner
for s in "$W/banner.sock" "$W/silent.sock" "$outside/dst.qmp" "$W/tcpbanner.port"; do
	deadline=$(($(now_ms) + 10000))
	until [ -e "$s" ]; do
		[ "$(now_ms)" -gt "$deadline" ] && ferry_fail "fake listener $s did not come up"
		sleep 0.05
	done
done
tcpbanner=127.0.0.1:$(cat "$W/tcpbanner.port")
noport=127.0.0.1:$(ferry_free_port)

echo "(a) --src-qmp is not a QEMU monitor"
expect a-banner 1 'monitor' "${mig[@]}" --src-qmp "$W/banner.sock" --dst-qmp "$DST" --to "$TO"
expect a-silent 1 'monitor' "${mig[@]}" --src-qmp "$W/silent.sock" --dst-qmp "$DST" --to "$TO"
expect a-missing 1 'monitor.*(no such file|cannot connect)' "${mig[@]}" --src-qmp "$W/nothing-here.sock" --dst-qmp "$DST" --to "$TO"
expect a-ferryctl-qmp 1 'not a QEMU monitor' "$FERRYCTL" qmp "$W/banner.sock" query-status
vms_ok "(a)"
daemons_ok "(a)"

echo "(b) --dst-qmp the destination must refuse"
expect b-outside 1 'outside the directories' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$outside/dst.qmp" --to "$TO"
expect b-dotdot 1 'outside the directories' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$W/a/../../$(basename "$outside")/dst.qmp" --to "$TO"
expect b-relative 1 'plain name or an absolute path' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "../dst.qmp" --to "$TO"
expect b-missing 1 'destination QEMU monitor' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$W/no-such.qmp" --to "$TO"
expect b-not-qemu 1 'not a QEMU monitor' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$W/banner.sock" --to "$TO"
expect b-not-incoming 1 'not waiting for a migration' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$(qemu_sock other)" --to "$TO"
vms_ok "(b)"
daemons_ok "(b)"

echo "(c) --to where no ferry daemon is"
expect c-nothing-listens 1 'destination daemon.*(refused|cannot connect)' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$DST" --to "$noport"
grep -q "source VM is running" <<<"$("${mig[@]}" --src-qmp "$SRC" --dst-qmp "$DST" --to "$noport" 2>&1)" ||
	ferry_fail "case c: ferryctl does not report the source VM running"
expect c-not-ferryd 1 'destination daemon' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$DST" --to "$tcpbanner"
expect c-no-port-means-7470 1 'no-port-here:7470' "${mig[@]}" --src-qmp "$SRC" --dst-qmp "$DST" --to "no-port-here"
vms_ok "(c)"
daemons_ok "(c)"
w1=$(heartbeat_words "$(qemu_ramfile src)")
sleep 0.5
w2=$(heartbeat_words "$(qemu_ramfile src)")
[ "$w2" -gt "$w1" ] || ferry_fail "after (a)-(c): the source guest makes no progress ($w1 -> $w2)"

echo "(d) garbage to the destination daemon's control and data ports"
ctl=tls:${FERRY_LISTEN[b]}
ep=$(ferry_endpoint b) || ferry_fail "no data endpoint in ferryctl ping"
[[ $ep =~ ^tcp:(.+):([0-9]+)$ ]] || ferry_fail "data endpoint '$ep' is not tcp:HOST:PORT"
data=tcp:${BASH_REMATCH[1]}:${BASH_REMATCH[2]}
rej0=$(ferry_ctl b stats | json_field rejected_lanes)
reply d-ctl-random "$ctl" random:65536 '"ok": *false|<EOF>|<RESET>'
reply d-ctl-badjson "$ctl" 'str:this is not json\n' '"ok":false.*malformed JSON'
reply d-ctl-oversized "$ctl" big:3000000 '"ok":false.*longer than|<RESET>|<EOF>'
reply d-ctl-unknown "$ctl" 'str:{"cmd":"format-disk"}\n' '"ok":false.*unknown command'
reply d-ctl-admin-only "$ctl" 'str:{"cmd":"migrate","src_qmp":"x","dst_qmp":"y","peer":"z"}\n' '"ok":false.*unknown command'
reply d-ctl-prepare-outside "$ctl" 'str:{"cmd":"migrate-prepare","qmp":"/etc/passwd"}\n' '"ok":false.*outside'
reply d-ctl-prepare-badtype "$ctl" 'str:{"cmd":"migrate-prepare","qmp":"dst.qmp","channels":"many"}\n' '"ok":false.*integer'
reply d-ctl-finish-bogus "$ctl" 'str:{"cmd":"migrate-finish","session":12345}\n' '"ok":false.*(no migration session|not opened on this connection)'
reply d-ctl-session-huge "$ctl" 'str:{"cmd":"session-open","streams":1,"region_bytes":99999999999999}\n' '"ok":false'
reply d-ctl-session-close "$ctl" 'str:{"cmd":"session-close","session":-1}\n' '"ok":false'
# without TLS: not a byte of JSON back, and the refusal is logged
reply d-ctl-plain-tcp "tcp:${FERRY_LISTEN[b]}" 'str:{"cmd":"migrate-prepare","qmp":"dst.qmp"}\n' '<EOF>|<RESET>|^[?]*$'
wait_file_line "${FERRY_LOG[b]}" "peer 127.0.0.1:[0-9]* refused: TLS handshake failed: the peer does not speak TLS" 5 ||
	ferry_fail "case d-ctl-plain-tcp: ferryd b did not log the refusal"
reply d-data-random "$data" random:65536 '<EOF>|<RESET>|.'
reply d-data-badheader "$data" header '<EOF>|<RESET>|.'
reply d-data-empty "$data" 'str:' '<EOF>|<RESET>|.'
vms_ok "(d) garbage"
daemons_ok "(d) garbage"
rej1=$(ferry_ctl b stats | json_field rejected_lanes)
echo "      daemon b rejected_lanes: $rej0 -> $rej1"
[ "$rej1" -gt "$rej0" ] || ferry_fail "ferryd b's rejected_lanes did not grow after the garbage lanes ($rej0 -> $rej1)"

# the same daemons still migrate: the 64 MiB guest, stopped
qmp "$SRC" stop >/dev/null || ferry_fail "stop on the source failed"
wait_status "$SRC" paused 10 || ferry_fail "the source did not pause"
ferry_migrate src dst 60 --channels 2
[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "case d: the migration after the garbage exited $FERRY_MIG_RC"; }
wait_migration "$DST" 10 >/dev/null || ferry_fail "case d: destination query-migrate is not completed"
qemu_stop src
qemu_stop dst
out=$("$RAMCHECK" compare "$(qemu_ramfile src)" "$(qemu_ramfile dst)") ||
	{ echo "$out" >&2; ferry_fail "case d: destination RAM differs from the source's"; }
ncases=$((ncases + 1))
echo "  ok  d-migration-after-garbage  ${FERRY_MIG_MS}ms, RAM identical"

echo "(e) bad requests on the admin socket"
adm=unix:${FERRY_ADMIN[a]}
reply e-truncated-eof "$adm" 'str:{"cmd":"pi' '<EOF>|"ok":false'
net_tool_bg "$W/hold.out" hold "$adm" 3 'str:{"cmd":"migrate","src_qmp":"'
wait_file_line "$W/hold.out" "held 3" 10 || ferry_fail "case e: cannot hold admin connections open"
expect e-ping-while-truncated-open 0 '"version"' "$FERRYCTL" --admin "${FERRY_ADMIN[a]}" ping
kill "$NET_TOOL_PID" 2>/dev/null
reply e-oversized "$adm" big:2000000 '"ok":false.*longer than|<RESET>|<EOF>'
reply e-deep-nesting "$adm" deep:300000 '"ok":false'
reply e-nul-byte "$adm" nul '"ok":false'
reply e-not-object "$adm" 'str:[1,2,3]\n' '"ok":false.*not a JSON object'
reply e-no-cmd "$adm" 'str:{"command":"ping"}\n' '"ok":false.*no \\"cmd\\"'
reply e-cmd-not-string "$adm" 'str:{"cmd":42}\n' '"ok":false'
reply e-unknown-cmd "$adm" 'str:{"cmd":"self-destruct"}\n' '"ok":false.*unknown command'
reply e-migrate-no-args "$adm" 'str:{"cmd":"migrate"}\n' '"ok":false.*migrate needs'
reply e-migrate-bad-channels "$adm" 'str:{"cmd":"migrate","src_qmp":"a","dst_qmp":"b","peer":"c:1","channels":-5}\n' '"ok":false.*channels'
reply e-migrate-many-channels "$adm" 'str:{"cmd":"migrate","src_qmp":"a","dst_qmp":"b","peer":"c:1","channels":100000}\n' '"ok":false.*channels'
reply e-status-unknown "$adm" 'str:{"cmd":"migrate-status","migration":4242}\n' '"ok":false.*no migration'
reply e-status-badid "$adm" 'str:{"cmd":"migrate-status","migration":"x"}\n' '"ok":false.*migration'
reply e-two-lines "$adm" 'str:{"cmd":"ping"}\n{"cmd":"ping"}\n' '"ok":true'
expect e-ferryctl-status-unknown 1 'no migration 4242' "$FERRYCTL" --admin "${FERRY_ADMIN[a]}" status 4242
expect e-ferryctl-cancel-unknown 1 'no migration 4242' "$FERRYCTL" --admin "${FERRY_ADMIN[a]}" cancel 4242
daemons_ok "(e)"

echo "(f) ferryctl usage errors"
A=(--admin "${FERRY_ADMIN[a]}")
expect f-unknown-command 2 "unknown command 'frobnicate'" "$FERRYCTL" "${A[@]}" frobnicate
expect f-no-command 2 'usage' "$FERRYCTL" "${A[@]}"
expect f-unknown-option 2 "unknown option '--bogus'" "$FERRYCTL" --bogus ping
# a mistyped driver option stops the daemon by name, not silently ignored
expect f-ferryd-driver-opt 1 "the tcp driver has no option 'queus'" "$FERRYD" --admin "$QEMU_DIR/typo.sock" \
	--listen 127.0.0.1:0 --insecure-no-tls --driver tcp --driver-opt queus=4
expect f-migrate-no-to 2 'and --to' "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST"
expect f-migrate-nothing 2 'needs VM' "$FERRYCTL" "${A[@]}" migrate
expect f-migrate-extra-arg 2 'not both' "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" extra
expect f-channels-word 2 "--channels 'two' is not a number" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --channels two
expect f-channels-negative 2 "--channels '-1' is not a number" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --channels -1
expect f-channels-too-many 2 "--channels '64' is not a number from 0 to 63" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --channels 64
expect f-channels-empty 2 "--channels '' is not a number" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --channels ""
expect f-bandwidth-word 2 "--max-bandwidth 'fast' is not a rate" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --max-bandwidth fast
expect f-bandwidth-tiny 2 "--max-bandwidth '64K' is not a rate from 1M" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --max-bandwidth 64K
expect f-bandwidth-unit 2 "--max-bandwidth '5T' is not a rate" "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --max-bandwidth 5T
expect f-unknown-migrate-opt 2 'usage' "$FERRYCTL" "${A[@]}" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO" --turbo
expect f-cancel-no-id 2 'cancel needs an ID' "$FERRYCTL" "${A[@]}" cancel
expect f-status-bad-id 2 "ID 'abc' is not a number" "$FERRYCTL" "${A[@]}" status abc
expect f-qmp-bad-args 2 'arguments must be a JSON object' "$FERRYCTL" qmp "$(qemu_sock other)" query-status '{broken'
expect f-unreachable 3 'cannot reach ferryd' "$FERRYCTL" --admin "$W/no-daemon.sock" ping
expect f-unreachable-migrate 3 'cannot reach ferryd' "$FERRYCTL" --admin "$W/no-daemon.sock" migrate --src-qmp "$SRC" --dst-qmp "$DST" --to "$TO"
daemons_ok "(f)"
st=$(QMP_TIMEOUT=5 qmp_get "$(qemu_sock other)" query-status status) || ferry_fail "the 'other' QEMU's monitor does not answer"

for d in a b; do
	if grep -Eqi 'sanitizer|assert|segmentation|abort' "${FERRY_LOG[$d]}"; then
		ferry_fail "ferryd $d's log reports a crash or assertion"
	fi
done
echo "PASS bad-input: $ncases cases in $(ferry_elapsed)s"
exit 0
