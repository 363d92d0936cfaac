#!/usr/bin/env bash
# nbd-path.sh - ferry's NBD-aware block path (ferryctl nbd-open) against real
# NBD peers: the target export behind daemon b is nbdkit (a file of a size that
# is no multiple of 512) or qemu-nbd; real clients use daemon a's socket:
# nbdinfo (size, flags, allocation map), libnbd (unaligned writes, zeroes,
# trim, flush, 64 writes in flight), nbdcopy with many requests in flight,
# qemu-img convert + compare, hand-made malformed requests answered with NBD
# errors (or a logged disconnect) while the next client is still served, and
# clients that leave mid-request.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/nbd.sh
. "$here/../lib/nbd.sh"

ferry_init --timeout 240
nbd_init nbdkit qemu-nbd qemu-img qemu-io nbdinfo nbdcopy
allow=$NBD_ALLOW PY=$NBD_PY check=$NBD_CHECK

# ---- 1: nbdkit target, a size that is no multiple of 512 -------------------
size=$(((24 << 20) + 1000))
img=$allow/odd.img
truncate -s "$size" "$img"
nbdkit_start "$img" "$allow/odd.sock"

sock=$QEMU_DIR/a/nbd.sock
uri="nbd+unix:///?socket=$sock"
out=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$sock" --target "$allow/odd.sock" --lanes 4) ||
	ferry_fail "nbd-open failed: $out"
nid=$(echo "$out" | json_field nbd) || ferry_fail "no path id in: $out"
[ "$(echo "$out" | json_field export.size)" = "$size" ] || ferry_fail "nbd-open reports another size: $out"

info=$(timeout 30 nbdinfo --json "$uri") || ferry_fail "nbdinfo failed"
bad=$(echo "$info" | python3 -c '
import json, sys
e = json.load(sys.stdin)["exports"][0]
want = {"export-size": int(sys.argv[1]), "can_flush": True, "can_trim": True, "can_zero": True,
        "can_fua": True, "can_df": True, "is_read_only": False}
print(" ".join("%s=%r" % (k, e.get(k)) for k, v in want.items() if e.get(k) != v))
' "$size") || ferry_fail "nbdinfo --json output unreadable: $info"
[ -z "$bad" ] || ferry_fail "nbdinfo sees: $bad"
echo "$info" | grep -q '"base:allocation"' || ferry_fail "base:allocation is not offered: $info"
# a fresh sparse file: one hole, zero, over the whole export
map=$(timeout 30 nbdinfo --map "$uri") || ferry_fail "nbdinfo --map failed"
echo "$map" | awk -v s="$size" '$1 == 0 && $2 == s && $3 == 3 { ok = 1 } END { exit !ok }' ||
	ferry_fail "allocation map of the empty export is not one hole: $map"

# nbdcopy, 64 requests in flight on each of its connections
head -c "$size" /dev/urandom >"$QEMU_DIR/rand.img"
timeout 60 nbdcopy --requests=64 --request-size=262144 "$QEMU_DIR/rand.img" "$uri" || ferry_fail "nbdcopy into ferry failed"
cmp "$QEMU_DIR/rand.img" "$img" || ferry_fail "the target differs from what nbdcopy wrote"
timeout 60 nbdcopy --requests=64 "$uri" "$QEMU_DIR/back.img" || ferry_fail "nbdcopy out of ferry failed"
cmp "$QEMU_DIR/rand.img" "$QEMU_DIR/back.img" || ferry_fail "reading back through ferry differs"
map=$(timeout 30 nbdinfo --map "$uri") || ferry_fail "nbdinfo --map failed"
echo "$map" | awk '$3 == 0 { ok = 1 } END { exit !ok }' || ferry_fail "no data extent after the copy: $map"

# unaligned writes, zeroes, trim, flush, writes in flight, a read past the end
timeout 60 "$PY" "$check" ops "$sock" "$img" || ferry_fail "libnbd checks failed"

# malformed requests: each gets its protocol answer, the next client is served
for c in bad-magic unknown-cmd past-end write-past-end oversized-read oversized-write bad-flags bad-option \
	mid-write mid-read; do
	r=$(timeout 30 "$PY" "$check" raw "$sock" "$c") || ferry_fail "malformed case $c: $r"
done
timeout 60 nbdcopy "$uri" - | cmp - "$img" || ferry_fail "no client served whole after the malformed ones"
grep -q "client [0-9]*: request with bad magic" "${FERRY_LOG[a]}" || ferry_fail "the bad magic is not logged"
grep -q "WRITE of 4294967280 bytes is over the .* maximum; disconnecting" "${FERRY_LOG[a]}" ||
	ferry_fail "the oversized write's disconnect is not logged"
grep -q "unknown command 99: answering error 22" "${FERRY_LOG[a]}" || ferry_fail "the unknown command is not logged"
grep -q "disconnected inside a WRITE's payload" "${FERRY_LOG[a]}" || ferry_fail "the cut write is not logged"

st=$(ferry_ctl a nbd-status "$nid") || ferry_fail "nbd-status failed"
[ "$(echo "$st" | json_field stats.requests)" -gt 100 ] || ferry_fail "too few requests counted: $st"

# ---- 2: qemu-nbd target, qemu-img convert + compare -----------------------
qimg=$allow/q.qcow2
qemu-img create -q -f qcow2 "$qimg" 64M || ferry_fail "qemu-img create failed"
qemu-nbd -f qcow2 -k "$allow/q.sock" -e 0 -t "$qimg" </dev/null >"$QEMU_DIR/qemu-nbd.log" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")
wait_sock "$allow/q.sock"
src=$QEMU_DIR/src.qcow2
qemu-img create -q -f qcow2 "$src" 64M
qemu-io -f qcow2 -c "write -P 0x5a 0 16M" -c "write -P 0xa5 40M 3M" -c "write -z 50M 1M" "$src" >/dev/null ||
	ferry_fail "qemu-io failed"
qsock=$QEMU_DIR/a/q.sock
out=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$qsock" --target "$allow/q.sock" --lanes 2) ||
	ferry_fail "nbd-open (qemu-nbd) failed: $out"
qid=$(echo "$out" | json_field nbd)
timeout 120 qemu-img convert -n -f qcow2 -O raw "$src" "nbd+unix:///?socket=$qsock" ||
	ferry_fail "qemu-img convert into ferry failed"
timeout 60 qemu-img compare -f qcow2 -F raw "$src" "nbd+unix:///?socket=$qsock" ||
	ferry_fail "qemu-img compare through ferry found a difference"
ferry_ctl a nbd-close "$qid" >/dev/null || ferry_fail "nbd-close failed"
[ -e "$qsock" ] && ferry_fail "$qsock still exists after nbd-close"

# confinement: the destination serves only targets in its --allow-dir
bad=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$QEMU_DIR/a/x.sock" --target "$QEMU_DIR/a/admin.sock" 2>&1) &&
	ferry_fail "nbd-open accepted a target outside the peer's --allow-dir"
echo "$bad" | grep -q "outside the directories" || ferry_fail "unclear refusal: $bad"

# an export that is not there, and usage errors, are refused with the reason
bad=$(ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$QEMU_DIR/a/y.sock" --target "$allow/none.sock" 2>&1) &&
	ferry_fail "nbd-open accepted a missing export"
echo "$bad" | grep -q "none.sock" || ferry_fail "the refusal does not name the export: $bad"
[ -e "$QEMU_DIR/a/y.sock" ] && ferry_fail "a refused nbd-open left its socket"
ferry_ctl a nbd-open --listen "$QEMU_DIR/a/y.sock" --target "$allow/odd.sock" >/dev/null 2>&1
[ $? = 2 ] || ferry_fail "nbd-open without --to is no usage error"
ferry_ctl a nbd-open --to "${FERRY_LISTEN[b]}" --listen "$QEMU_DIR/a/y.sock" --target "$allow/odd.sock" --lanes 0 >/dev/null 2>&1
[ $? = 2 ] || ferry_fail "nbd-open --lanes 0 is no usage error"
ferry_ctl a nbd-status 12345 >/dev/null 2>&1 && ferry_fail "nbd-status of an unknown path succeeded"

ferry_ctl a nbd-close "$nid" >/dev/null || ferry_fail "nbd-close failed"
ferry_ping a || ferry_fail "ferryd a does not answer ping afterwards"
ferry_ping b || ferry_fail "ferryd b does not answer ping afterwards"
echo "nbd-path: ok"
