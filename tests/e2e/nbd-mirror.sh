#!/usr/bin/env bash
# nbd-mirror.sh - QEMU's own mirror job through ferry's NBD path, standalone
# (no RAM migration): a destination QEMU exports its target image with its NBD
# server (nbd-server-start + block-export-add, as in storage migration); daemon
# a serves that export on a unix socket (ferryctl nbd-open); a source QEMU adds
# an nbd node on that socket and runs blockdev-mirror sync=full of a 256 MiB
# disk (random first half, zero second half), gets written to while the job is
# ready (qemu-io through HMP), then block-job-complete; qemu-img compare finds
# the target identical to the source.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/nbd.sh
. "$here/../lib/nbd.sh"

ferry_init --timeout 240
QEMU=${QEMU_BIN:-qemu-system-x86_64}
nbd_init qemu-img "$QEMU"
allow=$NBD_ALLOW

half=$((128 << 20))
src=$QEMU_DIR/src.img
fill_random "$src" "$half" || ferry_fail "fill_random failed"
truncate -s $((2 * half)) "$src"
dst=$QEMU_DIR/dst.qcow2
qemu-img create -q -f qcow2 "$dst" $((2 * half)) || ferry_fail "qemu-img create failed"

# A QEMU with only block nodes: -machine none runs no guest.
start_qemu() {
	local name=$1
	shift
	# QEMU itself is the background job, so the cleanup's kill reaches it
	# (the test's watchdog bounds its life)
	"$QEMU" -machine none -nodefaults -display none -S \
		-qmp "unix:$QEMU_DIR/$name.qmp,server=on,wait=off" "$@" </dev/null >"$QEMU_DIR/$name.log" 2>&1 &
	FERRY_EXTRA_PIDS+=("$!")
	wait_sock "$QEMU_DIR/$name.qmp"
}
start_qemu dst -blockdev "driver=file,filename=$dst,node-name=dst-file" \
	-blockdev "driver=qcow2,file=dst-file,node-name=dst"
start_qemu src -blockdev "driver=file,filename=$src,node-name=src-file" \
	-blockdev "driver=raw,file=src-file,node-name=src"
dq=$QEMU_DIR/dst.qmp
sq=$QEMU_DIR/src.qmp

qmp "$dq" "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$allow/nbd.sock\"}}}}" \
	'{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"dst","name":"vda","writable":true}}' \
	>/dev/null || ferry_fail "exporting the target from the destination QEMU failed"

fsock=$QEMU_DIR/a/vda.sock
out=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$fsock" --target "$allow/nbd.sock" --export vda \
	--lanes 4) || ferry_fail "nbd-open failed: $out"
nid=$(echo "$out" | json_field nbd)
[ "$(echo "$out" | json_field export.size)" = $((2 * half)) ] || ferry_fail "nbd-open reports another size: $out"

qmp "$sq" "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"nbd\",\"node-name\":\"tgt\",\"export\":\"vda\",\"server\":{\"type\":\"unix\",\"path\":\"$fsock\"}}}" \
	'{"execute":"blockdev-mirror","arguments":{"job-id":"m0","device":"src","target":"tgt","sync":"full"}}' \
	>/dev/null || ferry_fail "starting the mirror into ferry failed"

# wait_job READY|GONE TIMEOUT
wait_job() {
	local want=$1 deadline=$(($(now_ms) + $2 * 1000)) jobs
	while :; do
		jobs=$(qmp "$sq" query-block-jobs) || ferry_fail "query-block-jobs failed"
		case $want in
		READY) echo "$jobs" | grep -q '"ready": *true' && return 0 ;;
		GONE) [ "$jobs" = "[]" ] && return 0 ;;
		esac
		echo "$jobs" | grep -q '"error"' && ferry_fail "the mirror job failed: $jobs"
		[ "$(now_ms)" -lt "$deadline" ] || ferry_fail "mirror job not $want after $2 s: $jobs"
		sleep 0.2
	done
}
wait_job READY 150
# the source changes while the job mirrors every write
hmp() {
	qmp "$sq" "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"$1\"}}" >/dev/null ||
		ferry_fail "HMP '$1' failed"
}
hmp "qemu-io src \\\"write -P 0x33 1000 70000\\\""
hmp "qemu-io src \\\"write -P 0x44 200M 3M\\\""
hmp "qemu-io src \\\"write -z 0 4096\\\""
qmp "$sq" '{"execute":"block-job-complete","arguments":{"device":"m0"}}' >/dev/null ||
	ferry_fail "block-job-complete failed"
wait_job GONE 60
grep -q "BLOCK_JOB_ERROR\|error" "$QEMU_DIR/src.log" && ferry_fail "the source QEMU logged an error: $(cat "$QEMU_DIR/src.log")"
qmp "$sq" '{"execute":"blockdev-del","arguments":{"node-name":"tgt"}}' >/dev/null || ferry_fail "blockdev-del failed"
qmp "$dq" '{"execute":"nbd-server-stop"}' >/dev/null || ferry_fail "nbd-server-stop failed"

timeout 60 qemu-img compare -U -f raw -F qcow2 "$src" "$dst" || ferry_fail "the target differs from the source"
st=$(ferry_ctl a nbd-status "$nid") || ferry_fail "nbd-status failed"
echo "$st" | json_field stats >&2
[ "$(echo "$st" | json_field stats.failed)" = 0 ] || ferry_fail "failures counted: $st"
ferry_ctl a nbd-close "$nid" >/dev/null || ferry_fail "nbd-close failed"
echo "nbd-mirror: ok"
