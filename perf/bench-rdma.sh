#!/usr/bin/env bash
# ferry's RDMA driver against perftest's ib_write_bw, both in the same
# soft-RoCE guest run (tests/lib/rdma-guest.sh): two ferryd --driver rdma over
# rxe0 and ferry-perf for streams and regions, ib_write_bw (RC, RDMA WRITE,
# 1 MiB messages) as the reference, interleaved, medians of --runs.
# Under TCG the absolute figures are tiny and mean nothing; the ratio to
# ib_write_bw is the result (bar: 0.8x). See docs/performance.md.
# Each case also reports the guest's whole CPU time (every process and the
# kernel's soft-RoCE, from /proc/stat) per MB moved: under TCG the transfer is
# CPU-bound, so the ratio of these is where the time goes.
# FERRYD_ALT=path/to/other/ferryd adds a second pair of daemons from that
# build, interleaved with the first in the same guest run ("alt" rows): an A/B
# of a driver change under the same load. FERRYD_ALT_ARGS: extra ferryd
# arguments for that pair (e.g. "--poll busy"; FERRYD_ALT defaults to FERRYD
# when only these are given).
# usage: perf/bench-rdma.sh [--bytes 128M] [--runs 3]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
FERRYD=${FERRYD:-$here/build/controlplane/ferryd}
FERRY_PERF=${FERRY_PERF:-$here/build/perf/ferry-perf}
bytes=128M runs=3
if [ "${1:-}" = --in-guest ]; then
	shift
	in_guest=1
fi
while [ $# -gt 0 ]; do
	case $1 in
	--bytes) bytes=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	*) echo "usage: $0 [--bytes N] [--runs N]" >&2; exit 2 ;;
	esac
done

if [ -z "${in_guest:-}" ]; then
	. "$here/tests/lib/rdma-guest.sh"
	trap rdma_guest_cleanup EXIT
	[ -x "$FERRYD" ] && [ -x "$FERRY_PERF" ] || { echo "build first: ninja -C build" >&2; exit 1; }
	rdma_guest_prepare || { echo "no guest: $RDMA_GUEST_WHY" >&2; exit 77; }
	[ -n "${FERRYD_ALT_ARGS:-}" ] && FERRYD_ALT=${FERRYD_ALT:-$FERRYD}
	export FERRYD FERRY_PERF FERRYD_ALT FERRYD_ALT_ARGS
	rdma_guest_run "${RDMA_GUEST_TIMEOUT:-1200}" "bash '$here/perf/bench-rdma.sh' --in-guest --bytes $bytes --runs $runs"
	rc=$RDMA_GUEST_RC
	cat "$RDMA_GUEST_OUT"
	[ "$rc" = 0 ] || { cat "$RDMA_GUEST_ERR"; tail -5 "$RDMA_GUEST_CONSOLE"; echo "guest run failed ($rc)" >&2; exit 1; }
	exit 0
fi

# ---- inside the guest ----------------------------------------------------------
ip=$RDMA_GUEST_IP
work=$(mktemp -d /tmp/ferry-rdmabench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/a" "$work/b" "$work/sink"
(umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$work/ferry.psk") || exit 1
"$FERRYD" --admin "$work/a/admin.sock" --listen "$ip:17470" --driver rdma --tls-psk "$work/ferry.psk" 2>"$work/a.log" & pids+=($!)
"$FERRYD" --admin "$work/b/admin.sock" --listen "$ip:17480" --driver rdma --allow-dir "$work/sink" --tls-psk "$work/ferry.psk" 2>"$work/b.log" & pids+=($!)
socks=("$work/a/admin.sock" "$work/b/admin.sock")
if [ -n "${FERRYD_ALT:-}" ]; then
	mkdir -p "$work/a2" "$work/b2" "$work/sink2"
	read -ra alt_args <<<"${FERRYD_ALT_ARGS:-}"
	"$FERRYD_ALT" --admin "$work/a2/admin.sock" --listen "$ip:17490" --driver rdma --tls-psk "$work/ferry.psk" \
		"${alt_args[@]}" 2>"$work/a2.log" & pids+=($!)
	"$FERRYD_ALT" --admin "$work/b2/admin.sock" --listen "$ip:17500" --driver rdma --allow-dir "$work/sink2" \
		--tls-psk "$work/ferry.psk" "${alt_args[@]}" 2>"$work/b2.log" & pids+=($!)
	socks+=("$work/a2/admin.sock" "$work/b2/admin.sock")
fi
for _ in $(seq 100); do
	up=1
	for s in "${socks[@]}"; do [ -S "$s" ] || up=; done
	[ -n "$up" ] && break
	sleep 0.1
done

n=$(numfmt --from=iec "$bytes")
iters=$((n / 1048576))
[ "$iters" -ge 5 ] || iters=5
ibw() { # ib_write_bw loopback, MB/s (1e6 bytes); a second try if the first finds no server yet
	local try r
	for try in 1 2; do
		ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n "$iters" >/dev/null 2>&1 &
		local srv=$!
		sleep $try
		r=$(ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n "$iters" "$ip" 2>/dev/null | awk '$1 == 1048576 && NF >= 5 {print $4}')
		kill "$srv" 2>/dev/null
		wait "$srv" 2>/dev/null
		[ -n "$r" ] && break
	done
	echo "$r"
}
fperf() { # [alt] ferry-perf args... -> MB/s
	local a=a b=b
	if [ "$1" = alt ]; then
		a=a2 b=b2
		shift
	fi
	"$FERRY_PERF" --src-admin "$work/$a/admin.sock" --dst-admin "$work/$b/admin.sock" --json --no-verify "$@" |
		python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["gbs"]*1000)'
}
busy() { # the guest's busy CPU time so far, in clock ticks
	awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat
}
hz=$(getconf CLK_TCK)
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A res=() cpu=()
# measure CASE MB COMMAND...: run it, add its MB/s and the guest's CPU ms per MB to the case
measure() {
	local c=$1 mb=$2 t0 r t1
	shift 2
	t0=$(busy)
	r=$("$@")
	t1=$(busy)
	if [ -z "$r" ]; then # a failed run is reported, never counted as 0
		echo "$c: a run failed" >&2
		return
	fi
	res[$c]+="$r "
	cpu[$c]+="$(awk -v d=$((t1 - t0)) -v hz="$hz" -v mb="$mb" 'BEGIN {printf "%.1f", d * 1000 / hz / mb}') "
}
cases=("ib_write_bw" "stream-1" "stream-2" "region-1" "region-2")
[ -n "${FERRYD_ALT:-}" ] && cases+=("alt-stream-1" "alt-stream-2" "alt-region-1")
mb=$(awk -v n="$n" 'BEGIN {print n / 1e6}')
for i in $(seq "$runs"); do
	measure ib_write_bw "$(awk -v i="$iters" 'BEGIN {print i * 1048576 / 1e6}')" ibw
	# rotate the two builds' order from run to run
	for arm in $([ $((i % 2)) = 1 ] && echo "main alt" || echo "alt main"); do
		if [ "$arm" = alt ]; then
			[ -n "${FERRYD_ALT:-}" ] || continue
			measure alt-stream-1 "$mb" fperf alt --mode stream --bytes "$bytes" --streams 1 --lanes 1
			measure alt-stream-2 "$mb" fperf alt --mode stream --bytes $((n / 2)) --streams 2 --lanes 2
			measure alt-region-1 "$mb" fperf alt --mode region --bytes "$bytes" --lanes 1
			continue
		fi
		measure stream-1 "$mb" fperf --mode stream --bytes "$bytes" --streams 1 --lanes 1
		measure stream-2 "$mb" fperf --mode stream --bytes $((n / 2)) --streams 2 --lanes 2
		measure region-1 "$mb" fperf --mode region --bytes "$bytes" --lanes 1
		measure region-2 "$mb" fperf --mode region --bytes "$bytes" --lanes 2
	done
done
ref=$(tr ' ' '\n' <<<"${res[ib_write_bw]}" | grep . | median)
printf '%-40s %10s %8s %12s   %s\n' "case ($bytes, median of $runs, TCG guest)" "MB/s" "ratio" "CPU ms/MB" "runs (MB/s)"
for c in "${cases[@]}"; do
	m=$(tr ' ' '\n' <<<"${res[$c]}" | grep . | median)
	cm=$(tr ' ' '\n' <<<"${cpu[$c]}" | grep . | median)
	label=$c
	case $c in
	stream-1) label="ferry stream, 1 lane, 1 stream" ;;
	stream-2) label="ferry stream, 2 lanes, 2 streams" ;;
	region-1) label="ferry region (one-sided), 1 lane" ;;
	region-2) label="ferry region (one-sided), 2 lanes" ;;
	alt-stream-1) label="alt: stream, 1 lane, 1 stream" ;;
	alt-stream-2) label="alt: stream, 2 lanes, 2 streams" ;;
	alt-region-1) label="alt: region, 1 lane" ;;
	ib_write_bw) label="ib_write_bw, RC WRITE, 1 MiB" ;;
	esac
	printf '%-40s %10.1f %8.2f %12s   %s\n' "$label" "$m" "$(awk -v a="$m" -v b="$ref" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
		"$cm" "${res[$c]}"
done
