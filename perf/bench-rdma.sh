#!/usr/bin/env bash
# ferry's RDMA driver against perftest's ib_write_bw, both in the same
# soft-RoCE guest run (tests/lib/rdma-guest.sh): two ferryd --driver rdma over
# rxe0 and ferry-perf for streams and regions, ib_write_bw (RC, RDMA WRITE,
# 1 MiB messages) as the reference, interleaved, medians of --runs.
# Under TCG the absolute figures are tiny and mean nothing; the ratio to
# ib_write_bw is the result (bar: 0.8x). See docs/performance.md.
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
	export FERRYD FERRY_PERF
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
for _ in $(seq 100); do [ -S "$work/a/admin.sock" ] && [ -S "$work/b/admin.sock" ] && break; sleep 0.1; done

n=$(numfmt --from=iec "$bytes")
iters=$((n / 1048576))
[ "$iters" -ge 5 ] || iters=5
ibw() { # ib_write_bw loopback, MB/s (1e6 bytes)
	ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n "$iters" >/dev/null 2>&1 &
	local srv=$!
	sleep 1
	ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n "$iters" "$ip" 2>/dev/null | awk '$1 == 1048576 && NF >= 5 {print $4}'
	wait "$srv"
}
fperf() { # ferry-perf args... -> MB/s
	"$FERRY_PERF" --src-admin "$work/a/admin.sock" --dst-admin "$work/b/admin.sock" --json --no-verify "$@" |
		python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["gbs"]*1000)'
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A res=()
cases=("ib_write_bw" "stream-1" "stream-2" "region-1" "region-2")
for _ in $(seq "$runs"); do
	res[ib_write_bw]+="$(ibw) "
	res[stream-1]+="$(fperf --mode stream --bytes "$bytes" --streams 1 --lanes 1) "
	res[stream-2]+="$(fperf --mode stream --bytes $((n / 2)) --streams 2 --lanes 2) "
	res[region-1]+="$(fperf --mode region --bytes "$bytes" --lanes 1) "
	res[region-2]+="$(fperf --mode region --bytes "$bytes" --lanes 2) "
done
ref=$(tr ' ' '\n' <<<"${res[ib_write_bw]}" | grep . | median)
printf '%-40s %10s %8s   %s\n' "case ($bytes, median of $runs, TCG guest)" "MB/s" "ratio" "runs"
for c in "${cases[@]}"; do
	m=$(tr ' ' '\n' <<<"${res[$c]}" | grep . | median)
	label=$c
	case $c in
	stream-1) label="ferry stream, 1 lane, 1 stream" ;;
	stream-2) label="ferry stream, 2 lanes, 2 streams" ;;
	region-1) label="ferry region (one-sided), 1 lane" ;;
	region-2) label="ferry region (one-sided), 2 lanes" ;;
	ib_write_bw) label="ib_write_bw, RC WRITE, 1 MiB" ;;
	esac
	printf '%-40s %10.1f %8.2f   %s\n' "$label" "$m" "$(awk -v a="$m" -v b="$ref" 'BEGIN {print (b > 0 ? a / b : 0)}')" "${res[$c]}"
done
