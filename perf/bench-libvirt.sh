#!/usr/bin/env bash
# perf/bench-libvirt.sh - the same libvirt migration carried by socat
# forwarders and by ferry, in one run.
#
# Two real libvirtd instances on this machine (tests/lib/libvirt.sh: each in
# its own mount namespace, as two hosts), a TCG domain with 1 GiB of non-zero
# RAM (a guest that fills it once, then idles) and a 1 GiB disk of random
# data, migrated with
#   virsh migrate --live --p2p --persistent --undefinesource --copy-storage-all
#     --migrateuri unix://…/migration.sock --disks-uri unix://…/nbd.sock
# A -> B and back, through each arm in turn (order rotated every round):
#   socat8k   socat forwarders per socket, default 8 KiB buffer (what a plain
#             "socat UNIX-LISTEN:… TCP:…" gives)
#   socat1m   the same with a 1 MiB buffer (-b 1048576)
#   ferry-tcp ferry's standing tunnels (ferryd --driver tcp)
#   ferry-dpdk the same between two ferryd on the DPDK driver over net_memif
#             (skipped, and said so, where DPDK cannot start)
# Per migration: wall time of virsh migrate, and from `virsh domjobinfo
# --completed` on the target the job's time and the downtime. Prints every
# sample and a median table with each arm's ratio to socat8k.
#
# Usage: perf/bench-libvirt.sh [--rounds N] [--arms a,b,c] [--ram MiB] [--disk MiB]
# Needs root (mount namespaces, libvirtd); ./bootstrap.sh installs the rest.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$here/.." && pwd)
ROUNDS=3
ARMS=socat8k,socat1m,ferry-tcp,ferry-dpdk
RAM_MIB=1040    # the guest fills 1 GiB from 16 MiB up
DISK_MIB=1024
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) ROUNDS=$2; shift 2 ;;
	--arms) ARMS=$2; shift 2 ;;
	--ram) RAM_MIB=$2; shift 2 ;;
	--disk) DISK_MIB=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set/{s/^# \{0,1\}//;/^set/d;p}' "$0"; exit 0 ;;
	*) echo "bench-libvirt: unknown argument $1 (try --help)" >&2; exit 2 ;;
	esac
done
[ "$RAM_MIB" -ge 32 ] || { echo "bench-libvirt: --ram must be at least 32 (MiB)" >&2; exit 2; }
IFS=, read -r -a arms <<<"$ARMS"
for a in "${arms[@]}"; do
	case $a in socat8k | socat1m | ferry-tcp | ferry-dpdk) ;; *) echo "bench-libvirt: unknown arm $a" >&2; exit 2 ;; esac
done

# shellcheck source-path=SCRIPTDIR source=../tests/lib/libvirt.sh
. "$ROOT/tests/lib/libvirt.sh"
lv_init --timeout $((900 + ROUNDS * 600))
lv_start_pair || ferry_fail "starting the libvirt pair failed"
# ferry-dpdk: a second pair of daemons ("da" for host A, "db" for B) on the
# DPDK driver, joined by a net_memif port (a shared-memory NIC)
if [[ ,$ARMS, == *,ferry-dpdk,* ]]; then
	memif=$QEMU_DIR/memif.sock
	dpdk_opts=(--driver dpdk --driver-opt queues=2 --driver-opt dgram=8972)
	if ! ferry_start_daemon da "${dpdk_opts[@]}" --driver-opt "vdev=net_memif0,role=server,socket=$memif,bsize=9216" \
		--driver-opt eal=-l0 --driver-opt ip=198.18.0.1 --allow-dir "${LV_RUN[A]}/ferry" --allow-dir "${LV_RUN[A]}/libvirt" ||
		! ferry_start_daemon db "${dpdk_opts[@]}" --driver-opt "vdev=net_memif0,role=client,socket=$memif,bsize=9216" \
			--driver-opt eal=-l1 --driver-opt ip=198.18.0.2 --allow-dir "${LV_RUN[B]}/ferry" --allow-dir "${LV_RUN[B]}/libvirt"; then
		log "SKIP ferry-dpdk: the DPDK daemons do not start here (see $QEMU_DIR/ferryd-da.log)"
		arms=("${arms[@]/ferry-dpdk/}")
		read -r -a arms <<<"${arms[*]}"
	fi
fi

# The guest: tests/guest/dirty.S filling [16 MiB, RAM) once with non-zero words, then halting.
area=$(((RAM_MIB - 16) << 20))
guest=$("$ROOT/tests/guest/build.sh" "$QEMU_DIR/benchguest" --defsym MAX_PASSES=1 \
	--defsym AREA_SIZE=$(printf '0x%x' "$area")) || ferry_fail "cannot build the benchmark guest"
DOM=bench
lv_make_disk A bench.raw "${DISK_MIB}M" "$guest" raw || ferry_fail "cannot make the disk"
lv_precreate_disk B bench.raw raw "${DISK_MIB}M" || ferry_fail "cannot make the target disk"
xml=$QEMU_DIR/bench.xml
lv_domain_xml "$DOM" bench.raw raw | sed "s|<memory unit='MiB'>[0-9]*</memory>|<memory unit='MiB'>$RAM_MIB</memory>|" >"$xml"
lv_virsh A define "$xml" >/dev/null || ferry_fail "define failed"
lv_virsh A start "$DOM" >/dev/null || ferry_fail "start failed"
# HB_DONE (0x7e04) becomes 1 once the whole area holds non-zero words
deadline=$(($(now_ms) + 300000))
while :; do
	# "0000000000007e00: 0x59525246 0x00000001": the magic, then passes done
	read -r magic done_ < <(lv_virsh A qemu-monitor-command --hmp "$DOM" 'xp /2wx 0x7e00' 2>/dev/null |
		tr -d '\r' | awk -F': ' 'NF > 1 {print $2; exit}')
	[[ ${magic:-} == 0x59525246 && ${done_:-} =~ ^0x[0-9a-f]+$ ]] && [ $((done_)) -ge 1 ] && break
	[ "$(now_ms)" -lt "$deadline" ] || ferry_fail "the guest did not fill its RAM within 300 s"
	sleep 1
done
log "guest RAM filled (${area} bytes non-zero)"

# Each direction has its own socket directory (/run/ferry/to-B on both hosts
# for A -> B): a host that is the destination of one direction has its QEMU
# listen on those paths, which must not be the paths its own tunnels for the
# other direction listen on.
mkdir -p "${LV_RUN[A]}"/ferry/to-{A,B} "${LV_RUN[B]}"/ferry/to-{A,B}

# Forwarders for one direction FROM -> TO: the three unix sockets libvirt uses.
declare -a SOCAT_PIDS=()
socat_up() {
	local from=$1 to=$2 buf=$3 what port listen target
	for what in libvirt migration nbd; do
		port=$(ferry_free_port)
		listen=${LV_RUN[$from]}/ferry/to-$to/$what.sock
		if [ "$what" = libvirt ]; then target=${LV_RUN[$to]}/libvirt/libvirt-sock; else target=${LV_RUN[$to]}/ferry/to-$to/$what.sock; fi
		rm -f "$listen"
		socat -b "$buf" "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$target" </dev/null >/dev/null 2>&1 &
		SOCAT_PIDS+=($!)
		FERRY_EXTRA_PIDS+=($!)
		socat -b "$buf" "UNIX-LISTEN:$listen,fork" "TCP:127.0.0.1:$port" </dev/null >/dev/null 2>&1 &
		SOCAT_PIDS+=($!)
		FERRY_EXTRA_PIDS+=($!)
	done
	for what in libvirt migration nbd; do
		for _ in $(seq 50); do [ -S "${LV_RUN[$from]}/ferry/to-$to/$what.sock" ] && break; sleep 0.05; done
	done
}
socat_down() {
	local p
	for p in "${SOCAT_PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	SOCAT_PIDS=()
}

# ferry: standing tunnels, opened once per direction and kept while the same
# daemons serve; another arm on the same paths closes them first.
declare -A FERRY_TUN=()
FERRY_TUN_ARM=""
ferry_up() {
	local from=$1 to=$2 pfx=$3 what target out
	[ "$FERRY_TUN_ARM" = "$pfx" ] && [ -n "${FERRY_TUN[$from]:-}" ] && return 0
	[ "$FERRY_TUN_ARM" = "$pfx" ] || ferry_park
	FERRY_TUN_ARM=$pfx
	for what in libvirt migration nbd; do
		if [ "$what" = libvirt ]; then target=${LV_RUN[$to]}/libvirt/libvirt-sock; else target=${LV_RUN[$to]}/ferry/to-$to/$what.sock; fi
		out=$(ferry_ctl "$pfx${from,,}" tunnel-open --standing --to "${FERRY_LISTEN[$pfx${to,,}]}" \
			--listen "${LV_RUN[$from]}/ferry/to-$to/$what.sock" --target "$target") || ferry_fail "tunnel-open $what: $out"
		FERRY_TUN[$from]+="$(echo "$out" | json_field tunnel) "
	done
}
ferry_park() {
	# a standing tunnel keeps its socket; socat arms need the paths: close ours meanwhile
	local x id
	for x in "${!FERRY_TUN[@]}"; do
		for id in ${FERRY_TUN[$x]}; do ferry_ctl "$FERRY_TUN_ARM${x,,}" tunnel-close "$id" >/dev/null; done
		unset "FERRY_TUN[$x]"
	done
}

# jobinfo FILE FIELD: a number from a saved `virsh domjobinfo --completed`.
jobinfo() {
	awk -F: -v f="$2" '{k = $1; sub(/ +$/, "", k)} k ~ f {gsub(/[^0-9.]/, "", $2); print $2; exit}' "$1"
}

results=$QEMU_DIR/bench-libvirt.tsv
printf 'arm\tdir\twall_ms\tjob_ms\tdowntime_ms\n' >"$results"
one() {
	local arm=$1 from=$2 to=$3
	case $arm in
	socat8k) ferry_park; socat_up "$from" "$to" 8192 ;;
	socat1m) ferry_park; socat_up "$from" "$to" 1048576 ;;
	ferry-tcp) ferry_up "$from" "$to" "" ;;
	ferry-dpdk) ferry_up "$from" "$to" d ;;
	esac
	LV_FERRY_DIR=/run/ferry/to-$to lv_migrate "$from" "$to" "$DOM" 600
	local rc=$LV_MIG_RC
	socat_down
	[ "$rc" -eq 0 ] || { lv_mig_report; ferry_fail "$arm $from->$to: virsh migrate exited $rc"; }
	[ "$(lv_state "$to" "$DOM")" = running ] || ferry_fail "$arm $from->$to: the domain does not run on $to"
	local job down info=$QEMU_DIR/jobinfo-$arm-$from$to-$r.txt
	# read once: libvirt drops completed-job statistics once they are read
	lv_virsh "$to" domjobinfo --completed "$DOM" >"$info" 2>&1
	job=$(jobinfo "$info" "^Time elapsed$")
	down=$(jobinfo "$info" "^Total downtime$")
	printf '%s\t%s\t%s\t%s\t%s\n' "$arm" "$from$to" "$LV_MIG_MS" "${job:-0}" "${down:-0}" >>"$results"
	log "$arm $from->$to: wall ${LV_MIG_MS} ms, job ${job:-?} ms, downtime ${down:-?} ms"
	# the disk must have arrived whole (the guest never writes it)
	qemu-img compare -q "$(lv_img "$from" bench.raw)" "$(lv_img "$to" bench.raw)" ||
		ferry_fail "$arm $from->$to: the target disk differs from the source"
}

for ((r = 0; r < ROUNDS; r++)); do
	n=${#arms[@]}
	for ((k = 0; k < n; k++)); do
		arm=${arms[$(((k + r) % n))]}
		# a fresh empty target each time, as on a new host
		lv_precreate_disk B bench.raw raw "${DISK_MIB}M" >/dev/null
		one "$arm" A B
		lv_precreate_disk A bench.raw raw "${DISK_MIB}M" >/dev/null
		one "$arm" B A
	done
done
ferry_park

python3 - "$results" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
arms = []
for r in rows:
    if r[0] not in arms:
        arms.append(r[0])
def med(arm, col):
    v = [float(r[col]) for r in rows if r[0] == arm]
    return statistics.median(v), len(v)
base = med(arms[0], 2)[0] if arms else 1
print("\n| arm | migrations | wall s (median) | job s | downtime ms | wall / %s |" % arms[0])
print("|---|---:|---:|---:|---:|---:|")
for a in arms:
    w, n = med(a, 2)
    print("| %s | %d | %.2f | %.2f | %.0f | %.2f |" % (a, n, w / 1000, med(a, 3)[0] / 1000, med(a, 4)[0], w / base))
PY
echo "samples: $results"
exit 0
