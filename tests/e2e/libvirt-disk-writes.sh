#!/usr/bin/env bash
# libvirt-disk-writes.sh - a guest that keeps writing its disk while `virsh
# migrate --live --p2p --persistent --undefinesource --copy-storage-all
# --suspend` moves it from libvirtd A to libvirtd B through ferry tunnels:
# the NBD copy must carry the writes made during the copy, and nothing else.
#
# The guest (diskguest-w.bin, see tests/guest/diskguest.S) boots from its
# virtio raw disk (sector 0; the rest random data) and writes sector after
# sector of LBA 2048..2303 with int 13h, each stamped with the number of the
# write; it counts its completed writes in RAM (HB_DONE at 0x7e08).
#
# Checks: before the migration the guest has written the whole range at
# least twice without an error. virsh migrate exits 0, each tunnel carried
# the connections libvirt opens (libvirt 1, migration 1, NBD 1). After it the
# domain is paused on B (--suspend) and gone from A. `qemu-img compare` finds
# A's disk (its QEMU stopped writing at the switch-over) and B's identical.
# B's disk is the original outside the written range, and inside holds
# exactly the stamps M-255..M, stamp s at sector 2048 + (s-1) mod 256, with
# M the guest's own count (HB_DONE, or HB_DONE+1 when the write in flight
# reached the disk before the vCPU stopped) and M at least 256 beyond the
# count seen when the migration started (the guest rewrote the whole range
# during the copy, so every sector's final content came as a write mirrored
# while the copy ran). Then B resumes the
# guest: its heartbeat and its write count advance, with no write error.
#
# Exit: 0 pass, 1 fail, 77 skip (not root, no libvirtd/virsh).
# Environment: tests/lib/libvirt.sh; LV_DISK_SIZE (default 128M),
# MIG_TIMEOUT (default 90 s), LV_MIG_BANDWIDTH (MiB/s, default 64: the copy
# takes a couple of seconds, so the guest writes during it).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/libvirt.sh
. "$here/../lib/libvirt.sh"

DISK_SIZE=${LV_DISK_SIZE:-128M}
MIG_TIMEOUT=${MIG_TIMEOUT:-90}
BW=${LV_MIG_BANDWIDTH:-64}
WRITE_LBA=2048
WRITE_SECTORS=256

lv_setup_on_a 200 "$DISKGUEST_W_BIN" vm.img raw

# hb_field X NAME: one field of the guest's block (count magic done errs stamp lasterr)
hb_field() {
	local w i
	w=($(lv_hb "$1" vm)) || return 1
	case $2 in count) i=0 ;; magic) i=1 ;; done) i=2 ;; errs) i=3 ;; stamp) i=4 ;; lasterr) i=5 ;; esac
	echo "${w[$i]}"
}

# wait until the guest has written the range twice over
deadline=$(($(now_ms) + 60000))
while :; do
	hb=($(lv_hb A vm 2>/dev/null)) && [ "${hb[1]}" = $((0x44595246)) ] && [ "${hb[2]}" -ge $((2 * WRITE_SECTORS)) ] && break
	[ "$(now_ms)" -gt "$deadline" ] && ferry_fail "the guest on A did not write its disk (block: ${hb[*]:-none})"
	sleep 0.2
done
[ "${hb[3]}" = 0 ] || ferry_fail "the guest on A got ${hb[3]} int 13h write errors (AH|drive<<8 = ${hb[5]})"
sleep 0.5
d1=$(hb_field A "done") || ferry_fail "no heartbeat block on A"
[ "$d1" -gt "${hb[2]}" ] || ferry_fail "the guest on A stopped writing (${hb[2]} -> $d1)"
WRITE_RATE=$(((d1 - hb[2]) * 2))

lv_precreate_disk B vm.img raw "$DISK_SIZE" || ferry_fail "creating the target disk on B failed"
lv_tunnels_open A B 1 1 1 || ferry_fail "opening the tunnels failed"
C0=$(hb_field A done) || ferry_fail "no heartbeat block on A"
H0=$(hb_field A count)
lv_migrate A B vm "$MIG_TIMEOUT" --suspend --bandwidth "$BW"
[ "$LV_MIG_RC" -eq 0 ] || { lv_mig_report; ferry_fail "virsh migrate exited $LV_MIG_RC"; }
lv_tunnels_close || { echo "$LV_TUNNEL_SUMMARY"; ferry_fail "closing the tunnels failed"; }
printf '%s' "$LV_TUNNEL_SUMMARY" | sed "s/^/  A -> B tunnel /"
for what in libvirt migration nbd; do
	[ "$(lv_tunnel_opened "$what")" = 1 ] ||
		ferry_fail "the $what tunnel carried $(lv_tunnel_opened "$what") connections, expected 1"
done
grep -q "error:" <<<"$LV_TUNNEL_SUMMARY" && ferry_fail "a tunnel reports an error"

st=$(lv_state B vm)
[ "$st" = paused ] || ferry_fail "the domain is '$st' on B after migrate --suspend, expected paused"
lv_defined A vm && ferry_fail "A still has the domain (--undefinesource)"
lv_wait_no_qemu A 10 || ferry_fail "a QEMU still runs on A: $(lv_qemu_pids A)"
hb=($(lv_hb B vm)) || ferry_fail "no heartbeat block on B"
[ "${hb[1]}" = $((0x44595246)) ] || ferry_fail "no guest magic on B: ${hb[*]}"
[ "${hb[0]}" -ge "$H0" ] || ferry_fail "heartbeat on B (${hb[0]}) below A's before the migration ($H0)"
[ "${hb[3]}" = 0 ] || ferry_fail "the guest got ${hb[3]} write errors"
C=${hb[2]} S=${hb[4]}

SRC_IMG=$(lv_img A vm.img)
DST_IMG=$(lv_img B vm.img)
out=$(qemu-img compare -U -f raw -F raw "$SRC_IMG" "$DST_IMG" 2>&1) ||
	ferry_fail "A's disk (stopped at the switch-over) and B's differ: $out"

# the written range and the rest, on B's disk
check=$(python3 - "$ORIG" "$DST_IMG" "$WRITE_LBA" "$WRITE_SECTORS" "$C" "$S" "$C0" <<'PY'
import struct, sys
orig_path, img_path = sys.argv[1], sys.argv[2]
lba0, n, done, stamp, c0 = (int(a) for a in sys.argv[3:8])
SEC = 512
with open(orig_path, "rb") as f:
    orig = f.read()
with open(img_path, "rb") as f:
    img = f.read()
bad = []
if len(orig) != len(img):
    sys.exit("size differs: original %d, image %d" % (len(orig), len(img)))
lo, hi = lba0 * SEC, (lba0 + n) * SEC
for a, b in ((0, lo), (hi, len(img))):
    if img[a:b] != orig[a:b]:
        first = next(s for s in range(a, b, SEC) if img[s:s + SEC] != orig[s:s + SEC]) // SEC
        sys.exit("outside the written range the disk differs from the original (first at sector %d)" % first)
stamps = []
for k in range(n):
    w = struct.unpack_from("<128I", img, lo + k * SEC)
    if w[0] != 0x57595246 or w[2] != lba0 + k or any(x != w[1] for x in w[3:]) or w[1] == 0:
        sys.exit("sector %d is not a complete stamped write: %s ..." % (lba0 + k, " ".join("%08x" % x for x in w[:6])))
    stamps.append(w[1])
m = max(stamps)
for k, s in enumerate(stamps):
    if (s - 1) % n != k or not (m - n < s <= m):
        sys.exit("sector %d holds stamp %d: with the newest stamp %d it should hold %d (a lost or stale write)"
                 % (lba0 + k, s, m, m - ((m - 1 - k) % n)))
if m not in (done, stamp):
    sys.exit("newest stamp on disk %d, but the guest counts %d completed writes (in flight: %d)" % (m, done, stamp))
if m - c0 < n:
    sys.exit("newest stamp %d is not %d beyond %d, the count when the migration started: the guest did not rewrite"
             " the range during the copy" % (m, n, c0))
print(m)
PY
) || ferry_fail "B's disk: $check"
M=$check

# resume on B: the guest goes on writing there
lv_virsh B resume vm >/dev/null || ferry_fail "virsh resume on B failed"
st=$(lv_state B vm)
[ "$st" = running ] || ferry_fail "the domain is '$st' on B after resume"
lv_hb_advances B vm 1 || ferry_fail "the guest on B does not run after resume"
hb2=($(lv_hb B vm)) || ferry_fail "no heartbeat block on B"
[ "${hb2[2]}" -gt "$C" ] || ferry_fail "the guest on B does not write after resume (done $C -> ${hb2[2]})"
[ "${hb2[3]}" = 0 ] || ferry_fail "the guest on B got ${hb2[3]} write errors after resume (AH|drive<<8 = ${hb2[5]})"
for x in a b; do ferry_ping "$x" || ferry_fail "ferryd $x does not answer ping at the end"; done

echo "PASS libvirt-disk-writes in $(ferry_elapsed)s (libvirtd pair and ferryd ready after ${T_READY}s)"
echo "  virsh migrate --suspend --bandwidth $BW: ${LV_MIG_MS} ms; guest writes ~${WRITE_RATE}/s before it"
echo "  writes: $C0 when the migration started, newest stamp on disk $M (guest: done $C, in flight $S): $((M - C0)) during the migration"
echo "  after resume on B: done ${hb2[2]}, heartbeat ${hb2[0]}"
exit 0
