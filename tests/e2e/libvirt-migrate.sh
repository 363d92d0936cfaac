#!/usr/bin/env bash
# libvirt-migrate.sh [PARALLEL [standing]] - real `virsh migrate --live --p2p --persistent
# --undefinesource --copy-storage-all` between two real libvirtd instances on
# this machine (A and B, each in its own mount namespace), with the libvirt
# connection, the migration stream and the NBD disk copy each carried by a
# ferry tunnel (ferryd a for host A, ferryd b for host B): A -> B, then back
# B -> A. PARALLEL > 0 adds `--parallel --parallel-connections PARALLEL`
# (multifd: the source QEMU then opens 1 + PARALLEL migration connections).
# "standing" carries them with standing tunnels (a session per connection,
# as docs/libvirt.md recommends) instead of tunnels sized per migration.
#
# The guest (diskguest.bin) boots from its virtio qcow2 disk (sector 0; the
# rest random data) and counts a heartbeat at 0x7e00, ~18 per second since
# boot. Per direction FROM -> TO:
#   before: the domain runs on FROM only, its heartbeat advances; TO gets an
#     empty target image of the same size; FROM's ferryd opens three tunnels
#     sized to what libvirt 9.0 / QEMU 7.2 open (libvirt 1, migration
#     1 + PARALLEL, NBD 1 for the one disk).
#   virsh migrate exits 0; each tunnel carried exactly that many connections
#     and failed none.
#   after: the domain runs on TO (persistent there) and is gone from FROM (not
#     even defined, no QEMU left in FROM's namespace); TO's heartbeat is at
#     least the value FROM had just before the migration (the migrated guest
#     went on; one booted anew would count from 0) and advances;
#     `qemu-img compare` finds FROM's disk, TO's disk and the original content
#     identical (the guest does not write its disk).
#
# Exit: 0 pass, 1 fail, 77 skip (not root, no libvirtd/virsh), 2 usage.
# Environment: tests/lib/libvirt.sh; LV_DISK_SIZE (default 128M),
# MIG_TIMEOUT (default 90 s per migration).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/libvirt.sh
. "$here/../lib/libvirt.sh"

PAR=${1:-0}
[[ $PAR =~ ^[0-9]+$ ]] && [ "$PAR" -le 16 ] || { echo "usage: $0 [PARALLEL-CONNECTIONS (0-16) [standing]]" >&2; exit 2; }
case ${2:-} in
"") ;;
standing) export LV_TUNNEL_MODE=standing ;;
*) echo "usage: $0 [PARALLEL-CONNECTIONS (0-16) [standing]]" >&2; exit 2 ;;
esac
DISK_SIZE=${LV_DISK_SIZE:-128M}
MIG_TIMEOUT=${MIG_TIMEOUT:-90}
MIG_OPTS=()
[ "$PAR" -gt 0 ] && MIG_OPTS=(--parallel --parallel-connections "$PAR")
TAG="libvirt-migrate$([ "$PAR" -gt 0 ] && echo " --parallel-connections $PAR")"

lv_setup_on_a 240 "$DISKGUEST_BIN" vm.qcow2 qcow2
lv_wait_hb A vm 20 60 >/dev/null || ferry_fail "the guest on A shows no heartbeat (lv_hb: $(lv_hb A vm 2>&1))"

declare -a REPORT=()

migrate_one() {
	local from=$1 to=$2 h0 h1 h2 st out want what n
	st=$(lv_state "$from" vm)
	[ "$st" = running ] || ferry_fail "$from -> $to: the domain is '$st' on $from before the migration"
	lv_defined "$to" vm && ferry_fail "$from -> $to: $to already knows the domain before the migration"
	lv_hb_advances "$from" vm 1 || ferry_fail "$from -> $to: the guest on $from does not run before the migration"
	lv_precreate_disk "$to" vm.qcow2 qcow2 "$DISK_SIZE" || ferry_fail "creating the target disk on $to failed"
	lv_tunnels_open "$from" "$to" $((1 + PAR)) 1 1 || ferry_fail "$from -> $to: opening the tunnels failed"

	h0=$(lv_hb_count "$from" vm) || ferry_fail "no heartbeat on $from"
	lv_migrate "$from" "$to" vm "$MIG_TIMEOUT" "${MIG_OPTS[@]}"
	[ "$LV_MIG_RC" -eq 0 ] || { lv_mig_report; ferry_fail "$from -> $to: virsh migrate exited $LV_MIG_RC"; }
	lv_tunnels_close || { echo "$LV_TUNNEL_SUMMARY"; ferry_fail "$from -> $to: closing the tunnels failed"; }
	out=$LV_TUNNEL_SUMMARY
	printf '%s' "$out" | sed "s/^/  $from -> $to tunnel /"
	for want in "libvirt 1" "migration $((1 + PAR))" "nbd 1"; do
		read -r what n <<<"$want"
		[ "$(lv_tunnel_opened "$what")" = "$n" ] ||
			ferry_fail "$from -> $to: the $what tunnel carried $(lv_tunnel_opened "$what") connections, expected $n"
	done
	grep -q "error:" <<<"$out" && ferry_fail "$from -> $to: a tunnel reports an error: $out"

	st=$(lv_state "$to" vm)
	[ "$st" = running ] || ferry_fail "$from -> $to: the domain is '$st' on $to after the migration, expected running"
	lv_persistent "$to" vm || ferry_fail "$from -> $to: the domain is not persistent on $to (--persistent)"
	lv_defined "$from" vm && ferry_fail "$from -> $to: $from still has the domain (--undefinesource)"
	lv_wait_no_qemu "$from" 10 || ferry_fail "$from -> $to: a QEMU still runs on $from: $(lv_qemu_pids "$from")"
	[ "$(lv_qemu_pids "$to" | wc -l)" = 1 ] || ferry_fail "$from -> $to: expected one QEMU on $to, found: $(lv_qemu_pids "$to")"
	h1=$(lv_hb_count "$to" vm) || ferry_fail "no heartbeat on $to after the migration"
	[ "$h1" -ge "$h0" ] ||
		ferry_fail "$from -> $to: heartbeat on $to is $h1, below $h0 on $from before the migration: not the migrated guest"
	sleep 1
	h2=$(lv_hb_count "$to" vm) || ferry_fail "no heartbeat on $to"
	[ "$h2" -gt "$h1" ] || ferry_fail "$from -> $to: the guest on $to does not run (heartbeat $h1 -> $h2)"

	out=$(qemu-img compare -U "$(lv_img "$from" vm.qcow2)" "$(lv_img "$to" vm.qcow2)" 2>&1) ||
		ferry_fail "$from -> $to: disks differ: $out"
	out=$(qemu-img compare -U "$ORIG" "$(lv_img "$to" vm.qcow2)" 2>&1) ||
		ferry_fail "$from -> $to: $to's disk differs from the original content: $out"
	REPORT+=("$from -> $to: virsh migrate ${LV_MIG_MS} ms; heartbeat $h0 on $from before, $h1 -> $h2 on $to after")
}

migrate_one A B
migrate_one B A
for x in a b; do ferry_ping "$x" || ferry_fail "ferryd $x does not answer ping at the end"; done
echo "PASS $TAG in $(ferry_elapsed)s (libvirtd pair and ferryd ready after ${T_READY}s)"
for r in "${REPORT[@]}"; do echo "  $r"; done
exit 0
