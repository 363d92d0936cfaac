#!/usr/bin/env bash
# perf/bench-migrate.sh — live-migration throughput: direct TCP vs socat
# forwarders vs ferry, multifd off/on, on one host over loopback.
#
# A STOPPED guest (-S, nothing dirties RAM) with SIZE of random RAM is
# migrated from a source QEMU to a destination QEMU. Both RAMs are
# memory-backend-file objects under /dev/shm (share=on, prealloc=on), so the
# destination memory is populated before the clock starts and the result can
# be checked byte for byte (cmp of the two backing files).
#
# Throughput = ram.transferred / (total-time - setup-time), from the
# source's query-migrate. Wall = from the user's command (direct: before
# `migrate-incoming` on the destination; ferry: the start of ferryctl) until
# both QEMUs report "completed" (their MIGRATION events) and, for ferry, the
# command exited. The summary also gives the median moment of each phase
# (qmp.py phases: ferryctl's start, the source ferryd's Begin/Prepare/lane/
# migrate/Finish steps, the QEMUs' completion events).
#
# Usage: perf/bench-migrate.sh [options]
#   --size SIZE        guest RAM (default 2G; K/M/G suffixes, binary)
#   --runs N           runs per arm and multifd setting (default 5); median and
#                      min-max reported; each round runs every arm once, the
#                      arms' order rotated from round to round
#   --arms LIST        comma list of direct,direct-fd,socat1m,socat8k,ferry,ferry-b,ferry-relay,ferry-dpdk,ferry-dpdk-b
#                      (default: direct,socat1m,socat8k,ferry; direct-fd = QEMU
#                      over a loopback TCP pair handed to it as fd:, no ferry
#                      (multifd off only); ferry = the tcp
#                      driver on defaults (handoff: ferry out of QEMU's byte
#                      path), ferry-b = the same with the binaries FERRYD_B and
#                      FERRYCTL_B (paired A/B, e.g. an older build), ferry-relay = the same with --no-handoff (every
#                      byte through ferry's lanes), ferry-dpdk = two ferryd
#                      --driver dpdk joined by net_memif, needs a DPDK build;
#                      ferry-dpdk-b = the same with FERRYD_B/FERRYCTL_B, another
#                      build, for before/after ratios in one run)
#   --multifd LIST     comma list of channel counts, 0 = multifd off (default 0,2,4)
#   --json FILE        write every run and the summary as JSON
#   --accel kvm|tcg    default kvm when /dev/kvm is usable, else tcg
#   --verify MODE      first (default: first run of each arm/multifd), all, none;
#                      zeroes the destination RAM before the run, compares after
#   --retries N        extra attempts for a failed run (default 3)
#   --timeout S        per-migration timeout in seconds (default 180)
#   --stall S          fail a run whose source sends nothing for S seconds (default 10)
#   --keep-logs        keep the work directory (QEMU/socat/ferryd logs)
#   -h, --help
# Environment:
#   FERRYD, FERRYCTL   ferry binaries (default build/controlplane/ferryd, build/controlplane/ferryctl)
#   FERRYD_B, FERRYCTL_B  the ferry-b and ferry-dpdk-b arms' binaries
#   FERRY_DPDK_QUEUES  queues= of the ferry-dpdk arms' devices (default 4; a user's default is 1)
#   FERRY_PRESET=0     let ferryctl set multifd/max-bandwidth itself (default:
#                      the bench sets them on both QEMUs before ferryctl runs)
#   QEMU               qemu-system-x86_64 binary; PYTHON python3 binary
#
# Each QEMU has two QMP monitors: one for this script (*-qmp.sock) and one
# handed to ferryctl (*-ctl.sock), so both can talk to QEMU at the same time.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=perf/lib.sh
. "$HERE/lib.sh"

SIZE_ARG=2G
RUNS=5
ARMS=direct,socat1m,socat8k,ferry
MULTIFD=0,2,4
JSON_OUT=
ACCEL=
VERIFY=first
RETRIES=3
TIMEOUT=180
STALL=10
KEEP_LOGS=0
QEMU=${QEMU:-qemu-system-x86_64}
PYTHON=${PYTHON:-python3}
FERRYD=${FERRYD:-$ROOT/build/controlplane/ferryd}
FERRYCTL=${FERRYCTL:-$ROOT/build/controlplane/ferryctl}
FERRY_PRESET=${FERRY_PRESET:-1}
MAX_BW=$((1 << 40)) # bytes/s; QEMU 7.2 defaults to 32 MiB/s

while [ $# -gt 0 ]; do
	case $1 in
	--multifd) need_arg "$@"; MULTIFD=$2; shift 2 ;;
	--json) need_arg "$@"; JSON_OUT=$2; shift 2 ;;
	--accel) need_arg "$@"; ACCEL=$2; shift 2 ;;
	--retries) need_arg "$@"; RETRIES=$2; shift 2 ;;
	--stall) need_arg "$@"; STALL=$2; shift 2 ;;
	*) bench_opt "$@"; shift "$OPT_SHIFT" ;;
	esac
done

# ------------------------------------------------------------ validation
SIZE=$(parse_size "$SIZE_ARG") || die "bad --size $SIZE_ARG"
[ $((SIZE % (1 << 20))) -eq 0 ] && [ "$SIZE" -ge $((64 << 20)) ] ||
	die "--size must be a whole number of MiB, at least 64M"
SIZE_MIB=$((SIZE >> 20))
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "bad --runs $RUNS"
[[ $RETRIES =~ ^[0-9]+$ ]] || die "bad --retries $RETRIES"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "bad --timeout $TIMEOUT"
[[ $STALL =~ ^[0-9]+$ ]] || die "bad --stall $STALL"
case $VERIFY in first | all | none) ;; *) die "bad --verify $VERIFY" ;; esac
IFS=, read -r -a ARM_LIST <<<"$ARMS"
IFS=, read -r -a MF_LIST <<<"$MULTIFD"
for a in "${ARM_LIST[@]}"; do
	case $a in direct | direct-fd | socat1m | socat8k | ferry | ferry-b | ferry-relay | ferry-dpdk | ferry-dpdk-b) ;; *) die "unknown arm '$a'" ;; esac
done
for m in "${MF_LIST[@]}"; do
	[[ $m =~ ^[0-9]+$ ]] && [ "$m" -le 64 ] || die "bad multifd channel count '$m'"
done
[ ${#ARM_LIST[@]} -gt 0 ] && [ ${#MF_LIST[@]} -gt 0 ] || die "nothing to run"

command -v "$QEMU" >/dev/null || die "$QEMU not found (run ./bootstrap.sh)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (run ./bootstrap.sh)"
command -v ss >/dev/null || die "ss not found (iproute2; run ./bootstrap.sh)"
if [[ ,$ARMS, == *,socat* ]]; then
	command -v socat >/dev/null || die "socat not found (run ./bootstrap.sh)"
fi
if [ -z "$ACCEL" ]; then
	if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
case $ACCEL in
kvm | tcg) ;; # default CPU model: -cpu host trips over MSRs under nested KVM
*) die "bad --accel $ACCEL" ;;
esac
if [ -n "$JSON_OUT" ]; then
	: >"$JSON_OUT" 2>/dev/null || die "cannot write $JSON_OUT"
	JSON_OUT=$(cd "$(dirname "$JSON_OUT")" && pwd)/$(basename "$JSON_OUT")
fi

# Free memory: two RAM files in /dev/shm plus QEMU overhead.
shm_avail=$(($(df -Pk /dev/shm | awk 'NR==2{print $4}') * 1024))
mem_avail=$(($(awk '/^MemAvailable:/{print $2}' /proc/meminfo) * 1024))
need=$((2 * SIZE + (512 << 20)))
[ "$shm_avail" -ge "$need" ] || die "/dev/shm has $((shm_avail >> 20)) MiB free, need $((need >> 20)) MiB"
[ "$mem_avail" -ge "$need" ] || die "MemAvailable is $((mem_avail >> 20)) MiB, need $((need >> 20)) MiB"

# ------------------------------------------------------------ work areas
# Remove /dev/shm areas left by earlier runs that were killed hard.
for d in /dev/shm/ferry-bench.*; do
	[ -d "$d" ] || continue
	p=${d##*.}
	if [[ $p =~ ^[0-9]+$ ]] && ! kill -0 "$p" 2>/dev/null; then
		log "removing stale $d"
		rm -rf -- "$d"
	fi
done
SHM=/dev/shm/ferry-bench.$$
mkdir -p "$SHM"
bench_work "$SHM" bench
SRC_RAM=$SHM/src.ram
DST_RAM=$SHM/dst.ram

QEMU_VERSION=$("$QEMU" --version | head -n1)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
OTHER_QEMUS=$(pgrep -c -x "$(basename "$QEMU" | cut -c1-15)" || true)
[ "${OTHER_QEMUS:-0}" = 0 ] || warn "$OTHER_QEMUS other QEMU process(es) running on this host: figures may be noisy"
log "ferry migration bench: size $SIZE_MIB MiB, runs $RUNS, arms $ARMS, multifd $MULTIFD, accel $ACCEL"
log "$QEMU_VERSION; $(nproc) CPUs; load $LOADAVG; work dir $WORK"


# ------------------------------------------------------------ QEMU

# start_qemu ROLE RAMFILE [extra args...]: sets QEMU_PID; sockets
# $WORK/ROLE-qmp.sock (bench) and $WORK/ROLE-ctl.sock (ferryctl).
start_qemu() {
	local role=$1 ram=$2
	shift 2
	rm -f "$WORK/$role-qmp.sock" "$WORK/$role-ctl.sock"
	bg_start "$RUN_LOG_PREFIX-$role-qemu.log" "$QEMU" \
		-name ferry-bench -nodefaults -no-user-config -display none -S \
		-accel "$ACCEL" -smp 1 -m "${SIZE_MIB}M" \
		-object "memory-backend-file,id=ram0,size=$SIZE,mem-path=$ram,share=on,prealloc=on,prealloc-threads=2" \
		-machine "pc,memory-backend=ram0" \
		-qmp "unix:$WORK/$role-qmp.sock,server=on,wait=off" \
		-chardev "socket,id=ctl,path=$WORK/$role-ctl.sock,server=on,wait=off" \
		-mon "chardev=ctl,mode=control" \
		"$@"
	QEMU_PID=$BG_PID
}

qemu_ready() { # ROLE PID
	local out=$RUN_LOG_PREFIX-$1-ready
	run_wait "$out" "$PYTHON" "$HERE/qmp.py" ready "$WORK/$1-qmp.sock" --timeout 120 --pid "$2" || {
		warn "$1 QEMU not ready: $(tail -n 1 "$out.err")"
		sed 's/^/    /' "$RUN_LOG_PREFIX-$1-qemu.log" | tail -n 5 >&2 || true
		return 1
	}
}

# ------------------------------------------------------------ arms
# Each arm_* function sets MIG_ARGS (arguments for `qmp.py migrate`) and may
# start helper processes (tracked in ARM_PIDS, stopped after the run).

arm_direct() {
	MIG_ARGS=(--uri "tcp:127.0.0.1:$P_DST" --incoming "tcp:127.0.0.1:$P_DST")
}
# QEMU's fd: path over a connected loopback TCP pair made by qmp.py, no ferry:
# what ferry's single-channel handoff gives QEMU, minus ferry. Single
# channel only (QEMU 7.2's outgoing fd: has no multifd).
arm_direct-fd() {
	[ "$1" = 0 ] || { warn "direct-fd is single channel only"; return 1; }
	MIG_ARGS=(--tcp-pair --uri fd:mig --incoming fd:mig)
}

socat_forwarder() { # BUFSIZE
	# fork: one child per connection, so the multifd channels pass too.
	# QEMU 7.2 gives incoming connections their role by arrival order (first
	# = main channel), and each child connects on its own, so with multifd a
	# run can fail when a multifd child wins the race; such runs are retried.
	bg_start "$RUN_LOG_PREFIX-socat.log" socat "-b$1" \
		"TCP-LISTEN:$P_FWD,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$P_DST"
	ARM_PIDS+=("$BG_PID")
	wait_for 10 "socat on port $P_FWD" tcp_listening "$P_FWD" || return 1
	MIG_ARGS=(--uri "tcp:127.0.0.1:$P_FWD" --incoming "tcp:127.0.0.1:$P_DST")
}
arm_socat1m() { socat_forwarder 1048576; }
arm_socat8k() { socat_forwarder 8192; }

ferry_missing() { # prints the reason ferry cannot run, if any
	if [ ! -x "$FERRYD" ]; then
		echo "FERRYD not found ($FERRYD)"
	elif [ ! -x "$FERRYCTL" ]; then
		echo "FERRYCTL not found ($FERRYCTL)"
	fi
}

# Two daemons whose run dir is the work dir, so the QMP sockets there qualify.
# FERRYD_SRC_ARGS / FERRYD_DST_ARGS: extra options (the driver) per daemon.
arm_ferry() {
	local mf=$1 sock_src=$WORK/ferryd-src.sock sock_dst=$WORK/ferryd-dst.sock psk=$WORK/ferry.psk
	rm -f "$sock_src" "$sock_dst"
	# the daemons' control connection is TLS with a pre-shared key (psktool's format)
	[ -f "$psk" ] || (umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$psk") ||
		return 1
	# Durable records on tmpfs, where ferryd keeps them by default (its run
	# dir, /run/ferry): the work dir is on disk, and an fsync per phase
	# record there (1-150 ms on this host under load) is not ferry's default.
	mkdir -p "$SHM/state" || return 1
	bg_start "$RUN_LOG_PREFIX-ferryd-src.log" "$FERRYD" --admin "$sock_src" --listen "127.0.0.1:$P_FERRY_SRC" --tls-psk "$psk" \
		--state-dir "$SHM/state" \
		--host-uuid "$(cat /proc/sys/kernel/random/uuid)" "${FERRYD_SRC_ARGS[@]+"${FERRYD_SRC_ARGS[@]}"}"
	ARM_PIDS+=("$BG_PID")
	local pid_src=$BG_PID
	bg_start "$RUN_LOG_PREFIX-ferryd-dst.log" "$FERRYD" --admin "$sock_dst" --listen "127.0.0.1:$P_FERRY_DST" --tls-psk "$psk" \
		--state-dir "$SHM/state" \
		--host-uuid "$(cat /proc/sys/kernel/random/uuid)" "${FERRYD_DST_ARGS[@]+"${FERRYD_DST_ARGS[@]}"}"
	ARM_PIDS+=("$BG_PID")
	local pid_dst=$BG_PID
	wait_for 10 "ferryd admin sockets" eval "[ -S '$sock_src' ] && [ -S '$sock_dst' ]" || {
		pid_alive "$pid_src" || warn "source ferryd exited: $(tail -n 3 "$RUN_LOG_PREFIX-ferryd-src.log")"
		pid_alive "$pid_dst" || warn "destination ferryd exited: $(tail -n 3 "$RUN_LOG_PREFIX-ferryd-dst.log")"
		return 1
	}
	MIG_ARGS=(--exec-log "$RUN_LOG_PREFIX-ferryctl.log")
	[ "$FERRY_PRESET" = 1 ] || MIG_ARGS+=(--no-configure)
	MIG_ARGS+=(-- "$FERRYCTL" --admin "$sock_src" migrate
		--src-qmp "$WORK/src-ctl.sock" --dst-qmp "$WORK/dst-ctl.sock"
		--to "127.0.0.1:$P_FERRY_DST" --channels "$mf" --keep-source --json "${FERRYCTL_ARGS[@]+"${FERRYCTL_ARGS[@]}"}")
}

# Paired A/B: the same arm with another build's binaries.
arm_ferry-b() {
	local d=$FERRYD c=$FERRYCTL rc=0
	FERRYD=$FERRYD_B FERRYCTL=$FERRYCTL_B
	arm_ferry "$1" || rc=$?
	FERRYD=$d FERRYCTL=$c
	return $rc
}

arm_ferry-relay() {
	FERRYCTL_ARGS=(--no-handoff)
	arm_ferry "$1"
	local rc=$?
	FERRYCTL_ARGS=()
	return $rc
}

# The same two daemons over DPDK: net_memif between them (shared memory, one
# core each), as tests/e2e/migrate-dpdk.sh runs them. The plan must be dpdk.
arm_ferry-dpdk() {
	local memif=$WORK/memif.sock common=(--driver dpdk --driver-opt "queues=${FERRY_DPDK_QUEUES:-4}" --driver-opt dgram=8972)
	rm -f "$memif"
	FERRYD_SRC_ARGS=("${common[@]}" --driver-opt "vdev=net_memif0,role=server,socket=$memif,bsize=9216"
		--driver-opt eal=-l0 --driver-opt ip=198.18.0.1)
	FERRYD_DST_ARGS=("${common[@]}" --driver-opt "vdev=net_memif0,role=client,socket=$memif,bsize=9216"
		--driver-opt eal=-l1 --driver-opt ip=198.18.0.2)
	arm_ferry "$1"
	local rc=$?
	FERRYD_SRC_ARGS=() FERRYD_DST_ARGS=()
	return $rc
}
# The same with another build's binaries (bash's dynamic scope: arm_ferry
# starts $FERRYD and puts $FERRYCTL in MIG_ARGS while these are in force).
arm_ferry-dpdk-b() {
	local FERRYD=${FERRYD_B:-$FERRYD} FERRYCTL=${FERRYCTL_B:-$FERRYCTL}
	arm_ferry-dpdk "$1"
}

# ------------------------------------------------------------ one run

# run_once ARM MULTIFD RUN ATTEMPT VERIFY(0/1): appends one JSON line to
# $RESULTS; returns non-zero if the run failed.
run_once() {
	local arm=$1 mf=$2 run=$3 attempt=$4 verify=$5 rc=0 line src_pid dst_pid p
	RUN_LOG_PREFIX=$WORK/r$run-$arm-mf$mf-a$attempt
	ARM_PIDS=()
	MIG_ARGS=()
	read -r P_DST P_FWD P_FERRY_SRC P_FERRY_DST < <("$PYTHON" "$HERE/qmp.py" freeports 4 | tr '\n' ' ')

	if [ "$verify" = 1 ]; then # make a stale copy impossible to pass the check
		dd if=/dev/zero of="$DST_RAM" bs=1M count="$SIZE_MIB" conv=notrunc status=none
	fi
	start_qemu src "$SRC_RAM"
	src_pid=$QEMU_PID
	start_qemu dst "$DST_RAM" -incoming defer
	dst_pid=$QEMU_PID
	local labels=(--label "arm=$arm" --label "run=$run" --label "attempt=$attempt"
		--label "size_bytes=$SIZE")
	if qemu_ready src "$src_pid" && qemu_ready dst "$dst_pid" && "arm_$arm" "$mf"; then
		local vargs=()
		[ "$verify" = 1 ] && vargs=(--verify "$SRC_RAM" "$DST_RAM")
		run_wait "$RUN_LOG_PREFIX-migrate" "$PYTHON" "$HERE/qmp.py" migrate \
			--src "$WORK/src-qmp.sock" --dst "$WORK/dst-qmp.sock" \
			--multifd "$mf" --max-bandwidth "$MAX_BW" --timeout "$TIMEOUT" --stall "$STALL" \
			"${labels[@]}" "${vargs[@]}" "${MIG_ARGS[@]}" || rc=$?
		line=$(tail -n 1 "$RUN_LOG_PREFIX-migrate")
		if [ -z "$line" ]; then
			line=$("$PYTHON" -c 'import json,sys; print(json.dumps({"ok": False, "error": sys.argv[1]}))' \
				"qmp.py failed: $(tail -n 1 "$RUN_LOG_PREFIX-migrate.err" 2>/dev/null)")
			rc=1
		fi
	else
		line='{"ok": false, "error": "setup failed (QEMU or arm helpers did not start)"}'
		rc=1
	fi
	# CPU each party spent in this run (QEMU's includes its start-up and the
	# destination's prealloc, the same in every arm): on 2 cores, what the
	# helpers (ferryd, socat) burn is taken from the two QEMUs.
	local cpu
	cpu="$(cpu_seconds "$src_pid") $(cpu_seconds "$dst_pid") $(cpu_seconds ${ARM_PIDS[@]+"${ARM_PIDS[@]}"})"
	# Merge the labels into records that qmp.py did not produce.
	line=$(printf '%s' "$line" | "$PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read())
arm, mf, run, att, size, cpu = sys.argv[1:7]
r.setdefault("arm", arm); r.setdefault("multifd", int(mf)); r.setdefault("run", int(run))
r.setdefault("attempt", int(att)); r.setdefault("size_bytes", int(size))
r["cpu_src_qemu_s"], r["cpu_dst_qemu_s"], r["cpu_helpers_s"] = (float(x) for x in cpu.split())
print(json.dumps(r, sort_keys=True))' "$arm" "$mf" "$run" "$attempt" "$SIZE" "$cpu")
	printf '%s\n' "$line" >>"$RESULTS"

	for p in "${ARM_PIDS[@]}"; do stop_pid "$p" 3; done
	stop_pid "$src_pid" 5
	stop_pid "$dst_pid" 5
	return "$rc"
}

show_run() { # last line of RESULTS, human readable
	tail -n 1 "$RESULTS" | "$PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read())
tag = "%-8s multifd=%-3s run %d" % (r["arm"], r["multifd"] or "off", r["run"])
if r.get("attempt", 1) > 1: tag += " (attempt %d)" % r["attempt"]
if r.get("ok"):
    v = " verified" if r.get("verified") else ""
    print("  %s: %8.1f MiB/s  wall %.3f s  total-time %s ms  downtime %s ms%s" % (tag,
        r.get("throughput_MiBps") or 0, r.get("wall_s") or 0, r.get("total_time_ms"), r.get("downtime_ms"), v))
else:
    print("  %s: FAILED: %s" % (tag, r.get("error")))' >&2
}

# ------------------------------------------------------------ main loop
printf '%s\n' "$("$PYTHON" -c '
import json, sys
print(json.dumps({"kind": "meta", "size_bytes": int(sys.argv[1]), "runs": int(sys.argv[2]),
    "arms": sys.argv[3].split(","), "multifd": [int(x) for x in sys.argv[4].split(",")],
    "accel": sys.argv[5], "qemu": sys.argv[6], "cpus": int(sys.argv[7]), "kernel": sys.argv[8],
    "started": sys.argv[9], "loadavg_at_start": sys.argv[10], "other_qemus_at_start": int(sys.argv[11] or 0)}))' \
	"$SIZE" "$RUNS" "$ARMS" "$MULTIFD" "$ACCEL" "$QEMU_VERSION" \
	"$(nproc)" "$(uname -r)" "$(date -Is)" "$LOADAVG" "${OTHER_QEMUS:-0}")" >"$RESULTS"


FERRY_SKIP=
if [[ ,$ARMS, == *,ferry,* ]]; then
	FERRY_SKIP=$(ferry_missing)
	[ -z "$FERRY_SKIP" ] || echo "SKIP ferry: $FERRY_SKIP"
fi
if [[ ,$ARMS, == *,ferry-b,* ]]; then
	[ -n "${FERRYD_B:-}" ] && [ -x "$FERRYD_B" ] && [ -n "${FERRYCTL_B:-}" ] && [ -x "$FERRYCTL_B" ] ||
		die "the ferry-b arm needs FERRYD_B and FERRYCTL_B (executables)"
fi

if [ -n "$FERRY_SKIP" ] && [ "$ARMS" = ferry ]; then
	log "nothing to run"
else
	t=$(date +%s.%N)
	log "filling $SIZE_MIB MiB of random source RAM ($SRC_RAM)"
	fill_random "$SRC_RAM" "$SIZE"
	log "allocating destination RAM ($DST_RAM)"
	fallocate -l "$SIZE" "$DST_RAM" 2>/dev/null || head -c "$SIZE" /dev/zero >"$DST_RAM"
	log "RAM files ready in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
fi

T_BENCH=$(date +%s)
BENCH_FAILED=0
NARMS=${#ARM_LIST[@]}
for ((run = 1; run <= RUNS; run++)); do
	for mf in "${MF_LIST[@]}"; do
		# Rotate the arms' order each round: no arm always runs first (after
		# the RAM fill) or right after another that heats the host.
		for ((ai = 0; ai < NARMS; ai++)); do
			arm=${ARM_LIST[$(((ai + run - 1) % NARMS))]}
			if [ "$arm" = ferry ] && [ -n "$FERRY_SKIP" ]; then
				[ "$run" = 1 ] && "$PYTHON" -c 'import json,sys; print(json.dumps({"arm":"ferry","multifd":int(sys.argv[1]),"run":1,"attempt":1,"ok":False,"skipped":True,"error":sys.argv[2]}))' \
					"$mf" "$FERRY_SKIP" >>"$RESULTS"
				continue
			fi
			verify=0
			{ [ "$VERIFY" = all ] || { [ "$VERIFY" = first ] && [ "$run" = 1 ]; }; } && verify=1
			for ((attempt = 1; attempt <= RETRIES + 1; attempt++)); do
				if run_once "$arm" "$mf" "$run" "$attempt" "$verify"; then
					show_run
					break
				fi
				show_run
				[ "$attempt" -le "$RETRIES" ] && log "retrying $arm multifd=$mf run $run"
			done
			[ "$attempt" -le $((RETRIES + 1)) ] || BENCH_FAILED=1
		done
	done
done

echo
echo "ferry migration bench: $SIZE_MIB MiB random RAM, stopped guest, accel $ACCEL, $(nproc) CPUs, median of $RUNS run(s), $(($(date +%s) - T_BENCH)) s"
"$PYTHON" "$HERE/qmp.py" summarize "$RESULTS" ${JSON_OUT:+--json "$JSON_OUT"}
[ "$BENCH_FAILED" = 0 ] || { warn "some runs failed after $RETRIES retries (logs kept)"; exit 2; }
