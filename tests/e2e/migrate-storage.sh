#!/usr/bin/env bash
# migrate-storage.sh - storage migration: `ferryctl migrate --disk vda` mirrors
# a running VM's local disk into the destination QEMU's disk over ferry's NBD
# path, then moves RAM (docs/protocol.md, "Storage migration").
#
# The guest (diskguest-w.bin, tests/guest/diskguest.S) boots from its
# virtio disk (STORAGE_DISK bytes, default 2G, 256M in a sanitizer build
# (FERRY_SANITIZED=1, set by tests/meson.build): random first half, zero
# second half, the guest in sector 0) and keeps writing stamped sectors
# (LBA 2048..2303) with int 13h, counting completed writes in RAM.
#
# 1. Migration with --disk vda --suspend into a destination QEMU with an
#    empty qcow2 of the same size: ferryctl exits 0, its plan says "disks over
#    nbd"; the guest wrote during the migration; the destination is paused
#    (--suspend), its NBD server stopped; `qemu-img compare` finds its disk
#    identical to the source's (the source QEMU ended at the switch-over, so
#    its disk is the switch-over state) and the written range holds exactly
#    the guest's last 256 stamps. Resumed, the destination guest goes on
#    writing without an error.
# 2. Cancel during the mirror (the destination's disk behind a write
#    throttle keeps the copy going): ferryctl reports cancelled; the source
#    VM runs on, its mirror job and nbd node are gone, the guest keeps
#    writing; stopped, its disk holds a consistent stamp sequence.
# 3. The destination daemon killed mid-mirror: the same, with an error
#    naming the mirror or the destination.
# 4. No QEMU waits on the destination: its daemon starts one from the
#    source's command line and creates the missing target image in its
#    --storage-dir (sparse raw, the source's size); the image ends up
#    identical to the source's. (A 256 MiB disk here and in the refusals.)
# Refusals: an unknown --disk; a second writable local disk neither listed
# nor on a --shared-dir; a destination daemon without nbd (--disable nbd:
# the disks cannot move, so no fallback). Each leaves both QEMUs as they were.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh;
# STORAGE_DISK (default 2G; 256M with FERRY_SANITIZED=1), MIG_TIMEOUT (default 60 s), STORAGE_RUN1_ARGS
# (more ferryctl migrate options for run 1, e.g. "--channels 2").
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

# The issue's 2 GiB disk; under ASan/UBSan the copies run several times
# slower (82 s for 2 GiB), so those builds check the same flow on 256 MiB.
if [ "${FERRY_SANITIZED:-0}" = 1 ]; then DISK=${STORAGE_DISK:-256M}; else DISK=${STORAGE_DISK:-2G}; fi
MIG_TIMEOUT=${MIG_TIMEOUT:-60}
RUN1_ARGS=${STORAGE_RUN1_ARGS:-} # more ferryctl migrate options for run 1, e.g. "--channels 2"
WRITE_LBA=2048
WRITE_SECTORS=256

ferry_init --timeout 170
command -v qemu-img >/dev/null || ferry_skip "qemu-img is not installed"
[ -n "${DISKGUEST_W_BIN:-}" ] && [ -f "$DISKGUEST_W_BIN" ] ||
	ferry_skip "DISKGUEST_W_BIN (tests/guest/diskguest.S built with writes) is not set; run through meson test"
disk_bytes=$(size_bytes "$DISK") || ferry_fail "bad STORAGE_DISK '$DISK'"
ferry_start_daemons || ferry_fail "starting the ferry daemons failed"
T_READY=$(ferry_elapsed)

# make_disk PATH BYTES: random first half, zero second half, the guest in sector 0
make_disk() {
	fill_random "$1" $(($2 / 2)) || ferry_fail "fill_random failed"
	truncate -s "$2" "$1" || ferry_fail "truncate failed"
	dd if="$DISKGUEST_W_BIN" of="$1" bs=512 count=1 conv=notrunc status=none || ferry_fail "writing the guest failed"
}
SRC=$QEMU_DIR/src.raw
make_disk "$SRC" "$disk_bytes"

# hb NAME: the guest's block (count magic done errs stamp lasterr) from its RAM file
hb() { od -An -tu4 -j $((0x7e00)) -N 24 "$(qemu_ramfile "$1")" 2>/dev/null | tr -s ' ' | sed 's/^ //'; }
hb_done() { local w; read -ra w < <(hb "$1") && echo "${w[2]}"; }

# wait_writing NAME MIN: the guest on NAME has completed MIN writes, none failed
wait_writing() {
	local deadline=$(($(now_ms) + 60000)) w
	while :; do
		read -ra w < <(hb "$1") && [ "${w[1]:-0}" = $((0x44595246)) ] && [ "${w[2]}" -ge "$2" ] && break
		[ "$(now_ms)" -gt "$deadline" ] && ferry_fail "the guest on $1 did not write its disk (block: ${w[*]:-none})"
		sleep 0.1
	done
	[ "${w[3]}" = 0 ] || ferry_fail "the guest on $1 got ${w[3]} disk write errors (AH|drive<<8 = ${w[5]})"
}

# stamps_ok IMAGE(raw) DONE: the written range holds the stamps M-255..M,
# stamp s at sector 2048 + (s-1) mod 256, with M = DONE or DONE+1 (the write
# in flight when the vCPU stopped)
stamps_ok() {
	python3 - "$1" "$2" "$WRITE_LBA" "$WRITE_SECTORS" <<'PY'
import struct, sys
img, done, lba, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(img, "rb") as f:
    f.seek(lba * 512)
    data = f.read(n * 512)
st = []
for k in range(n):
    w = struct.unpack_from("<3I", data, k * 512)
    if w[0] != 0x57595246 or w[2] != lba + k:
        sys.exit(f"sector {lba + k}: not a stamped write ({w[0]:#x}, lba {w[2]})")
    st.append(w[1])
m = max(st)
if m not in (done, done + 1):
    sys.exit(f"largest stamp {m}, the guest completed {done} writes")
for k, s in enumerate(st):
    if s < m - n + 1 or (s - 1) % n != k:
        sys.exit(f"sector {lba + k} holds stamp {s}: stale or misplaced (largest {m})")
print(f"stamps {m - n + 1}..{m} in place")
PY
}

src_args() {
	echo "-drive file=$SRC,format=raw,if=none,id=vda,cache=writeback -device virtio-blk-pci,drive=vda,bootindex=0"
}
# dst_args NAME [BPS]: an empty qcow2 of the source's size; with BPS, behind a write throttle
dst_args() {
	local img=$QEMU_DIR/$1.qcow2
	qemu-img create -q -f qcow2 "$img" "$disk_bytes" || return 1
	if [ -n "${2:-}" ]; then
		# a throttle node on top: the export writes through it too
		echo "-object throttle-group,id=tg0,x-bps-write=$2" \
			"-drive if=none,id=vda,driver=throttle,throttle-group=tg0,file.driver=qcow2,file.file.driver=file,file.file.filename=$img" \
			"-device virtio-blk-pci,drive=vda,bootindex=0"
	else
		echo "-drive file=$img,format=qcow2,if=none,id=vda -device virtio-blk-pci,drive=vda,bootindex=0"
	fi
}

log "1."
# --- 1. a running VM's disk and RAM move; the destination stays paused ---
# shellcheck disable=SC2046
qemu_start src --ram 64M -- $(src_args) $(side_qmp_args src) || ferry_fail "starting src failed"
args=$(dst_args dst) || ferry_fail "creating the target image failed"
# shellcheck disable=SC2086,SC2046
qemu_start dst --ram 64M --incoming -- $args $(side_qmp_args dst) || ferry_fail "starting dst failed"
wait_writing src $((2 * WRITE_SECTORS))
d0=$(hb_done src)
# shellcheck disable=SC2086
ferry_migrate src dst "$MIG_TIMEOUT" --disk vda --suspend $RUN1_ARGS
[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "storage migration: ferryctl exited $FERRY_MIG_RC"; }
grep -q "plan: .*disks over nbd" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "the plan does not say disks over nbd"; }
grep -q "completed.*destination completed" "$FERRY_MIG_OUT" || { ferry_mig_report; ferry_fail "no completed migration reported"; }
for _ in $(seq 50); do qemu_alive src || break; sleep 0.1; done
qemu_alive src && ferry_fail "the source QEMU still runs after the migration"
d1=$(hb_done src)
[ "$d1" -gt "$d0" ] || ferry_fail "the guest did not write during the migration ($d0 -> $d1)"
wait_status "$(side_sock dst)" paused 10 || ferry_fail "the destination is not paused (--suspend)"
out=$(qmp "$(side_sock dst)" nbd-server-stop 2>&1) && ferry_fail "the destination's NBD server still ran after Finish"
qemu-img compare -U -f raw -F qcow2 "$SRC" "$QEMU_DIR/dst.qcow2" ||
	ferry_fail "the destination's disk differs from the source's at the switch-over"
# only the sectors up to the written range: a whole 2 GiB convert costs seconds
qemu-img dd -U -f qcow2 -O raw bs=512 count=$((WRITE_LBA + WRITE_SECTORS)) if="$QEMU_DIR/dst.qcow2" \
	of="$QEMU_DIR/dst.raw" || ferry_fail "qemu-img dd failed"
s=$(stamps_ok "$QEMU_DIR/dst.raw" "$d1" 2>&1) || ferry_fail "destination disk: $s"
rm -f "$QEMU_DIR/dst.raw"
qmp "$(side_sock dst)" cont >/dev/null || ferry_fail "cont on the destination failed"
wait_writing dst $((d1 + 20))
REPORT="run 1: ferryctl ${FERRY_MIG_MS} ms for $DISK + 64M RAM, guest writes $d0 -> $d1 during it; $s; $(grep -o 'completed over [^:]*' "$FERRY_MIG_OUT")"
qemu_stop dst
qemu_rm_ram dst
qemu_rm_ram src

# check_source_kept NAME TAG: the source runs on with its disk and no trace of the mirror
check_source_kept() {
	local sq out d
	sq=$(side_sock "$1")
	grep -q "source VM is running" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "$2: the source VM is not reported running"; }
	[ "$(qmp_get "$sq" query-status status)" = running ] || ferry_fail "$2: the source VM does not run"
	out=$(qmp "$sq" query-jobs) || ferry_fail "$2: query-jobs failed"
	[ "$(echo "$out" | tr -d ' \n')" = "[]" ] || ferry_fail "$2: a job is left on the source: $out"
	out=$(qmp "$sq" query-named-block-nodes) || ferry_fail "$2: query-named-block-nodes failed"
	echo "$out" | grep -q ferry-nbd && ferry_fail "$2: the nbd node is left on the source"
	d=$(hb_done "$1")
	wait_writing "$1" $((d + 20))
	qmp "$sq" stop >/dev/null || ferry_fail "$2: stop failed"
	wait_status "$sq" paused 10 || ferry_fail "$2: the source did not pause"
	sleep 0.2
	out=$(stamps_ok "$SRC" "$(hb_done "$1")" 2>&1) || ferry_fail "$2: the source disk is not intact: $out"
	ferry_ping a || ferry_fail "$2: ferryd a does not answer"
}

# wait_mirroring NAME: the mirror job runs and has copied something, not yet ready
wait_mirroring() {
	local deadline=$(($(now_ms) + 30000)) out
	while :; do
		out=$(qmp "$(side_sock "$1")" query-jobs 2>/dev/null)
		echo "$out" | grep -q '"status": *"running"' && echo "$out" | grep -q '"current-progress": *[1-9]' && return 0
		echo "$out" | grep -q '"status": *"ready"' && ferry_fail "the mirror got ready before the test could interrupt it"
		[ "$(now_ms)" -gt "$deadline" ] && { ferry_mig_report; ferry_fail "no running mirror on $1: $out"; }
		sleep 0.05
	done
}

# interrupted N HOW: a migration of srcN into a throttled dstN, interrupted
# mid-mirror by HOW (cancel: ferryctl cancel; kill: ferryd b killed)
interrupted() {
	local n=$1 how=$2 id
	# shellcheck disable=SC2046
	qemu_start "src$n" --ram 64M -- $(src_args) $(side_qmp_args "src$n") || ferry_fail "starting src$n failed"
	args=$(dst_args "dst$n" $((8 << 20))) || ferry_fail "creating the target image failed"
	# shellcheck disable=SC2086
	qemu_start "dst$n" --ram 64M --incoming -- $args || ferry_fail "starting dst$n failed"
	wait_writing "src$n" $((WRITE_SECTORS + 16)) # the whole range rewritten by this boot
	ferry_migrate_start "src$n" "dst$n" --disk vda
	wait_mirroring "src$n"
	case $how in
	cancel)
		id=$(ferry_mig_id) || ferry_fail "no migration id"
		ferry_ctl a cancel "$id" >/dev/null || ferry_fail "ferryctl cancel failed"
		;;
	kill) ferry_kill_daemon b KILL || ferry_fail "cannot kill ferryd b" ;;
	esac
	ferry_migrate_wait 60
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "$how: ferryctl exited $FERRY_MIG_RC, expected 1"; }
	log "$how: ferryctl ended"
	check_source_kept "src$n" "$how"
	qemu_stop "src$n"
	qemu_stop "dst$n"
	qemu_rm_ram "src$n"
	qemu_rm_ram "dst$n"
}

# --- 2. cancel during the mirror ---
interrupted 2 cancel
grep -q "cancelled" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "cancel: not reported cancelled"; }

# --- 3. the destination daemon killed mid-mirror ---
interrupted 3 kill
grep -qi "mirror\|destination" "$FERRY_MIG_ERR" ||
	{ ferry_mig_report; ferry_fail "killed destination: the error names neither the mirror nor the destination"; }
REPORT3=$(grep "failed:" "$FERRY_MIG_ERR")

log "4. spawn"
# what is checked here is the spawn and the image ferryd makes, not the size:
# a smaller disk (with a 2 GiB one this part alone took ~30 s)
if [ "$disk_bytes" -gt $((256 << 20)) ]; then
	SRC=$QEMU_DIR/src-spawn.raw
	make_disk "$SRC" $((256 << 20))
fi
# --- 4. the destination daemon starts the QEMU and makes the target image ---
store=$QEMU_DIR/store
memdir=$QEMU_RAM_DIR/ferry-test-$$-c
mkdir -p "$QEMU_DIR/c" "$store" "$memdir" || ferry_fail "cannot make the directories"
FERRY_CLEANUP_DIRS+=("$memdir")
ferry_start_daemon c --run-dir "$QEMU_DIR/c" --storage-dir "$store" --mem-dir "$memdir" --qemu "$QEMU_BIN" ||
	ferry_fail "starting ferryd c failed"
# shellcheck disable=SC2046
qemu_start src5 --ram 64M -- $(src_args) $(side_qmp_args src5) || ferry_fail "starting src5 failed"
wait_writing src5 $((WRITE_SECTORS + 16))
out=$(ferry_ctl a migrate src5 --to "${FERRY_LISTEN[c]}" --disk vda --suspend 2>&1)
rc=$?
[ "$rc" -eq 0 ] || { echo "$out" >&2; ferry_fail "spawn: ferryctl migrate exited $rc"; }
pid=$(cat "$QEMU_DIR/c/src5.pid" 2>/dev/null)
[[ $pid =~ ^[0-9]+$ ]] || ferry_fail "spawn: the started QEMU wrote no pid file"
FERRY_EXTRA_PIDS+=("$pid")
for _ in $(seq 50); do qemu_alive src5 || break; sleep 0.1; done
qemu_alive src5 && ferry_fail "spawn: the source QEMU still runs"
wait_status "$QEMU_DIR/c/src5.qmp" paused 10 || ferry_fail "spawn: the started QEMU is not paused (--suspend)"
img=$store/$(basename "$SRC")
qemu-img compare -U -f raw -F raw "$SRC" "$img" || ferry_fail "spawn: the image made on the destination differs"
s=$(stamps_ok "$img" "$(hb_done src5)" 2>&1) || ferry_fail "spawn: $s"
qmp "$QEMU_DIR/c/src5.qmp" quit >/dev/null 2>&1
qemu_rm_ram src5

log "refusals"
# --- refusals (the daemon is gone on b: refused before Prepare) ---
ferry_start_daemon b --disable nbd || ferry_fail "restarting ferryd b failed"
FERRY_TO=${FERRY_LISTEN[b]}
truncate -s 1M "$QEMU_DIR/scratch.raw"
# shellcheck disable=SC2046
qemu_start src4 --ram 64M --stopped -- $(src_args) -drive "file=$QEMU_DIR/scratch.raw,format=raw,if=none,id=scratch" \
	$(side_qmp_args src4) || ferry_fail "starting src4 failed"
ferry_migrate src4 src4 20 --disk vdz
[ "$FERRY_MIG_RC" -eq 1 ] && grep -q "no such disk.*vda" "$FERRY_MIG_ERR" ||
	{ ferry_mig_report; ferry_fail "an unknown --disk is not refused with the disks it has"; }
ferry_migrate src4 src4 20 --disk vda
[ "$FERRY_MIG_RC" -eq 1 ] && grep -q "disk 'scratch'.*not migrated" "$FERRY_MIG_ERR" ||
	{ ferry_mig_report; ferry_fail "a local writable disk left behind is not refused"; }
# the fallback row: a destination without nbd cannot take the disks
args=$(dst_args dst4) || ferry_fail "creating the target image failed"
# shellcheck disable=SC2086,SC2046
qemu_start dst4 --ram 64M --incoming -- $args -drive "file=$QEMU_DIR/scratch.raw,format=raw,if=none,id=scratch" \
	$(side_qmp_args dst4) || ferry_fail "starting dst4 failed"
ferry_migrate src4 dst4 20 --disk vda --shared-dir "$QEMU_DIR"
[ "$FERRY_MIG_RC" -eq 1 ] && grep -q "needs NBD on both sides and the destination does not support it" "$FERRY_MIG_ERR" ||
	{ ferry_mig_report; ferry_fail "a destination without nbd is not refused with the reason"; }
[ "$(qmp_get "$(side_sock src4)" query-status status)" = prelaunch ] || ferry_fail "a refusal changed the source VM"
[ "$(qmp_get "$(side_sock dst4)" query-status status)" = inmigrate ] || ferry_fail "a refusal changed the destination QEMU"
qemu_stop src4
qemu_stop dst4

echo "PASS migrate-storage ($DISK disk, daemons ready at ${T_READY}s) in $(ferry_elapsed)s"
echo "  $REPORT"
echo "  run 3: $REPORT3"
exit 0
