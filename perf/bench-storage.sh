#!/usr/bin/env bash
# perf/bench-storage.sh — storage migration of a VM's local disk (issue 6):
# QEMU mirroring straight into the destination QEMU's NBD server over TCP
# loopback ("direct") against `ferryctl migrate --disk vda` over ferry's NBD
# path with the tcp driver and, where this build has it and DPDK starts here,
# the dpdk driver over net_memif. One run, arms rotated each round, medians.
#
# The VM: 256 MiB of RAM, stopped (-S: no guest dirties the disk or RAM, so
# the copy is what is measured), one virtio disk: a raw image of SIZE in
# /dev/shm, its first half random, its second half zero (a hole: the mirror
# sends it as zero writes, as it would a real disk's unused space). The
# destination's image is a fresh raw file of the same size, fully allocated
# with fallocate before each run (tmpfs: its pages exist before the clock
# starts, so first touch of the target is not measured; the zero half is
# zeroed again by the mirror in every arm alike).
#
# Timed from the source QEMU's own event timestamps (perf/storage.py):
#   storage = the mirror job created .. ready (the whole disk copied);
#   whole   = the first command until both sides completed and the mirror
#             concluded (ferry: ferryctl exited).
# Ratio = direct's time / the arm's time (above 1: faster than direct).
#
# Usage: perf/bench-storage.sh [options]
#   --size SIZE     disk size (default 4G; K/M/G suffixes, binary; >= 16M)
#   --runs N        rounds (default 3); each round runs every arm once
#   --arms LIST     comma list of direct,tcp,dpdk (default all; dpdk is left
#                   out, saying why, when it cannot run here); direct-unix
#                   (QEMU's flow over a unix socket instead of TCP) on request
#   --lanes N       NBD lanes per disk for ferry (default: ferryctl's)
#   --verify MODE   first (default: each arm's first run), all, none:
#                   cmp of the two images after the run
#   --timeout S     per-run timeout (default 600)
#   --keep-logs     keep the work directory
# Environment: FERRYD, FERRYCTL, QEMU (qemu-system-x86_64), PYTHON.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=perf/lib.sh
. "$HERE/lib.sh"

SIZE_ARG=4G RUNS=3 ARMS=direct,tcp,dpdk LANES='' VERIFY=first TIMEOUT=600 KEEP_LOGS=0
QEMU=${QEMU:-qemu-system-x86_64}
PYTHON=${PYTHON:-python3}
FERRYD=${FERRYD:-$ROOT/build/controlplane/ferryd}
FERRYCTL=${FERRYCTL:-$ROOT/build/controlplane/ferryctl}

while [ $# -gt 0 ]; do
	case $1 in
	--lanes) need_arg "$@"; LANES=$2; shift 2 ;;
	*) bench_opt "$@"; shift "$OPT_SHIFT" ;;
	esac
done

SIZE=$(parse_size "$SIZE_ARG") || die "bad --size $SIZE_ARG"
[ $((SIZE % (1 << 20))) -eq 0 ] && [ "$SIZE" -ge $((16 << 20)) ] || die "--size must be a whole number of MiB, at least 16M"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "bad --runs $RUNS"
[ -z "$LANES" ] || [[ $LANES =~ ^[1-9][0-9]*$ ]] || die "bad --lanes $LANES"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "bad --timeout $TIMEOUT"
case $VERIFY in first | all | none) ;; *) die "bad --verify $VERIFY" ;; esac
IFS=, read -r -a ARM_LIST <<<"$ARMS"
[ ${#ARM_LIST[@]} -gt 0 ] || die "nothing to run"
for a in "${ARM_LIST[@]}"; do
	case $a in direct | direct-unix | tcp | dpdk) ;; *) die "unknown arm '$a' (direct, direct-unix, tcp, dpdk)" ;; esac
done
for t in "$QEMU" "$PYTHON" qemu-img ss; do
	command -v "$t" >/dev/null || die "$t not found (run ./bootstrap.sh)"
done
if [[ ,$ARMS, == *,tcp,* || ,$ARMS, == *,dpdk,* ]]; then
	[ -x "$FERRYD" ] && [ -x "$FERRYCTL" ] || die "ferry is not built ($FERRYD, $FERRYCTL)"
fi
ACCEL=tcg
[ -r /dev/kvm ] && [ -w /dev/kvm ] && ACCEL=kvm

# two images in /dev/shm and two small QEMUs
shm_avail=$(($(df -Pk /dev/shm | awk 'NR==2{print $4}') * 1024))
mem_avail=$(($(awk '/^MemAvailable:/{print $2}' /proc/meminfo) * 1024))
need=$((2 * SIZE + (1 << 30)))
[ "$shm_avail" -ge "$need" ] || die "/dev/shm has $((shm_avail >> 20)) MiB free, need $((need >> 20)) MiB"
[ "$mem_avail" -ge "$need" ] || die "MemAvailable is $((mem_avail >> 20)) MiB, need $((need >> 20)) MiB"

SHM=$(mktemp -d /dev/shm/ferry-storage.XXXXXX)
bench_work "$SHM" storage
: >"$RESULTS"
SRC_IMG=$SHM/src.raw
DST_IMG=$SHM/dst.raw

log "storage bench: $SIZE_ARG disk, runs $RUNS, arms $ARMS, accel $ACCEL; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
others=$(pgrep -c -x qemu-system-x86 || true)
[ "${others:-0}" = 0 ] || warn "$others other QEMU process(es) running on this host: figures may be noisy"
fill_random "$SRC_IMG" $((SIZE / 2))
truncate -s "$SIZE" "$SRC_IMG"

# ------------------------------------------------------------ ferry daemons
# daemons PAIR: a source/destination pair with the options in A_OPTS / B_OPTS,
# sharing the work dir as run dir (where the QMP sockets are); sets TO_<PAIR>
# and ADMIN_<PAIR>.
(umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$WORK/ferry.psk")
A_OPTS=() B_OPTS=()
DAEMON_PIDS=()
# the daemons go first, each with its DPDK runtime dir (EAL's --file-prefix ferryPID)
stop_daemons() {
	local p
	for p in "${DAEMON_PIDS[@]}"; do
		stop_pid "$p" 3
		rm -rf "/var/run/dpdk/ferry$p"
	done
}
LIB_CLEANUP_HOOKS+=(stop_daemons)
daemon() { # PAIR SIDE PORT OPTS...
	local pair=$1 side=$2 port=$3
	shift 3
	mkdir -p "$WORK/$pair-$side"
	bg_start "$WORK/ferryd-$pair-$side.log" "$FERRYD" --admin "$WORK/$pair-$side/admin.sock" \
		--listen "127.0.0.1:$port" --run-dir "$WORK" --state-dir "$WORK/$pair-$side/state" \
		--host-uuid "$(cat /proc/sys/kernel/random/uuid)" --tls-psk "$WORK/ferry.psk" "$@"
	DAEMON_PIDS+=("$BG_PID")
	# one at a time: a memif client must find its server's socket
	wait_for 20 "ferryd $pair-$side" eval "'$FERRYCTL' --admin '$WORK/$pair-$side/admin.sock' ping >/dev/null 2>&1"
}
daemons() {
	local pair=$1 ports
	read -r -a ports < <("$PYTHON" "$HERE/qmp.py" freeports 2 | tr '\n' ' ')
	daemon "$pair" a "${ports[0]}" "${A_OPTS[@]}" && daemon "$pair" b "${ports[1]}" "${B_OPTS[@]}" || return 1
	printf -v "TO_$pair" '127.0.0.1:%s' "${ports[1]}"
	printf -v "ADMIN_$pair" '%s' "$WORK/$pair-a/admin.sock"
}

ARMS_RUN=()
for a in "${ARM_LIST[@]}"; do
	case $a in
	direct | direct-unix) ARMS_RUN+=("$a") ;;
	tcp)
		A_OPTS=() B_OPTS=()
		daemons tcp || die "the tcp daemons did not start: $(tail -n 3 "$WORK"/ferryd-tcp-*.log)"
		ARMS_RUN+=(tcp)
		;;
	dpdk) # the options of tests/e2e/migrate-dpdk.sh: a net_memif pair, one lcore each
		memif=$WORK/memif.sock
		A_OPTS=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972 --driver-opt eal=-l0
			--driver-opt ip=198.18.0.1 --driver-opt "vdev=net_memif0,role=server,socket=$memif,bsize=9216")
		B_OPTS=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972 --driver-opt eal=-l1
			--driver-opt ip=198.18.0.2 --driver-opt "vdev=net_memif0,role=client,socket=$memif,bsize=9216")
		if daemons dpdk 2>/dev/null; then
			ARMS_RUN+=(dpdk)
		else
			echo "(dpdk arm left out: $(grep -m1 -h -i "error\|cannot\|no driver" "$WORK"/ferryd-dpdk-*.log 2>/dev/null | head -c 200))"
		fi
		;;
	esac
done

# ------------------------------------------------------------ one run
start_qemu() { # ROLE IMAGE [args...]: sets QEMU_PID
	local role=$1 img=$2
	shift 2
	rm -f "$WORK/$role-qmp.sock" "$WORK/$role-ctl.sock"
	bg_start "$WORK/$RUN-$role-qemu.log" "$QEMU" -name ferry-storage-vm -nodefaults -no-user-config \
		-display none -S -accel "$ACCEL" -smp 1 -m 256M \
		-qmp "unix:$WORK/$role-qmp.sock,server=on,wait=off" \
		-chardev "socket,id=ctl,path=$WORK/$role-ctl.sock,server=on,wait=off" -mon chardev=ctl,mode=control \
		-drive "file=$img,format=raw,if=none,id=vda,node-name=vda-fmt,cache=writeback" \
		-device virtio-blk-pci,drive=vda "$@"
	QEMU_PID=$BG_PID
}

run_once() { # ARM ROUND VERIFY(0/1)
	local arm=$1 round=$2 verify=$3 rc=0 src dst p
	RUN=r$round-$arm
	# a fresh, fully allocated target each run
	rm -f "$DST_IMG"
	fallocate -l "$SIZE" "$DST_IMG" || die "fallocate $DST_IMG failed"
	start_qemu src "$SRC_IMG"
	src=$QEMU_PID
	start_qemu dst "$DST_IMG" -incoming defer
	dst=$QEMU_PID
	read -r -a p < <("$PYTHON" "$HERE/qmp.py" freeports 2 | tr '\n' ' ')
	local -a args=(--arm direct --nbd-port "${p[0]}" --mig-port "${p[1]}")
	if [ "$arm" = direct-unix ]; then
		args+=(--label direct-unix --nbd-unix "$WORK/direct-nbd.sock")
	elif [ "$arm" != direct ]; then
		local to=TO_$arm admin=ADMIN_$arm
		args=(--arm ferry --label "ferry-$arm" --exec-log "$WORK/$RUN-ferryctl.log" --
			"$FERRYCTL" --admin "${!admin}" migrate --src-qmp "$WORK/src-ctl.sock" --dst-qmp "$WORK/dst-ctl.sock"
			--to "${!to}" --disk vda ${LANES:+--lanes "$LANES"})
	fi
	run_wait "$WORK/$RUN.json" "$PYTHON" "$HERE/storage.py" run --src "$WORK/src-qmp.sock" --dst "$WORK/dst-qmp.sock" \
		--timeout "$TIMEOUT" "${args[@]}" || rc=$?
	stop_pid "$src" 5
	stop_pid "$dst" 5
	local line
	line=$(tail -n 1 "$WORK/$RUN.json")
	[ -n "$line" ] || line="{\"arm\": \"$arm\", \"ok\": false, \"error\": \"storage.py: $(tail -n 1 "$WORK/$RUN.json.err" | tr -d '"\\')\"}"
	if [ "$rc" = 0 ] && [ "$verify" = 1 ]; then
		if cmp -s "$SRC_IMG" "$DST_IMG"; then
			line=${line%\}}', "verified": true}'
		else
			line=${line%\}}', "ok": false, "verified": false, "error": "the destination image differs"}'
			rc=1
		fi
	fi
	printf '%s\n' "$line" >>"$RESULTS"
	"$PYTHON" -c 'import json,sys; r=json.loads(sys.argv[1]); print("  round %s %-11s " % (sys.argv[2], r["arm"]) + (
		"storage %.2f s, whole %.2f s%s" % (r["storage_s"], r["whole_s"], ", verified" if r.get("verified") else "")
		if r.get("ok") else "FAILED: %s" % r.get("error")))' "$line" "$round" >&2
	return "$rc"
}

BENCH_FAILED=0
declare -A verified=()
for ((round = 1; round <= RUNS; round++)); do
	n=${#ARMS_RUN[@]}
	for ((k = 0; k < n; k++)); do
		arm=${ARMS_RUN[$(((k + round - 1) % n))]} # rotated: each arm takes each position in turn
		v=0
		{ [ "$VERIFY" = all ] || { [ "$VERIFY" = first ] && [ -z "${verified[$arm]:-}" ]; }; } && v=1
		verified[$arm]=1
		run_once "$arm" "$round" "$v" || BENCH_FAILED=1
	done
done

echo
echo "storage migration: $SIZE_ARG disk (first half random, second half zero), VM stopped, 256 MiB RAM," \
	"accel $ACCEL, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), median of $RUNS"
"$PYTHON" "$HERE/storage.py" summarize "$RESULTS" --size "$SIZE" || BENCH_FAILED=1
[ "$BENCH_FAILED" = 0 ] || { warn "some runs failed (logs kept)"; exit 2; }
