#!/usr/bin/env bash
# Raw data-plane throughput between two local ferryd (ferry-perf), beside
# iperf3 on loopback measured in the same run.
# usage: perf/bench-dataplane.sh [--bytes 2G] [--runs 3] [-- extra ferryd options]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
FERRYD=${FERRYD:-$here/build/controlplane/ferryd}
FERRY_PERF=${FERRY_PERF:-$here/build/perf/ferry-perf}
bytes=2G runs=3
while [ $# -gt 0 ]; do
	case $1 in
	--bytes) bytes=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--) shift; break ;;
	*) echo "usage: $0 [--bytes N] [--runs N] [-- ferryd options]" >&2; exit 2 ;;
	esac
done
work=$(mktemp -d /tmp/ferry-dpbench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mkdir -p "$work/a" "$work/b" "$work/sink"
# the daemons' control connection is TLS with a pre-shared key, unless the
# extra options bring their own credentials
tls=(--tls-psk "$work/ferry.psk")
for a in "$@"; do case $a in --tls-* | --insecure-no-tls) tls=() ;; esac; done
(umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$work/ferry.psk") || exit 1
# the stream sink lives in an --allow-dir of the destination daemon
"$FERRYD" --admin "$work/a/admin.sock" --listen "127.0.0.1:$(port)" "${tls[@]+"${tls[@]}"}" "$@" 2>"$work/a.log" & pids+=($!)
"$FERRYD" --admin "$work/b/admin.sock" --listen "127.0.0.1:$(port)" --allow-dir "$work/sink" "${tls[@]+"${tls[@]}"}" "$@" 2>"$work/b.log" & pids+=($!)
for _ in $(seq 50); do [ -S "$work/a/admin.sock" ] && [ -S "$work/b/admin.sock" ] && break; sleep 0.1; done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-34s %8s %10s %10s\n' "case" "GB/s" "src s/GiB" "dst s/GiB"
perf_case() { # label ferry-perf-args...
	local label=$1; shift
	local out=() g s d
	for _ in $(seq "$runs"); do
		out+=("$("$FERRY_PERF" --src-admin "$work/a/admin.sock" --dst-admin "$work/b/admin.sock" --json --no-verify "$@" |
			python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["gbs"], r["src_cpu_s_per_gib"], r["dst_cpu_s_per_gib"])')")
	done
	g=$(printf '%s\n' "${out[@]}" | awk '{print $1}' | median)
	s=$(printf '%s\n' "${out[@]}" | awk '{print $2}' | median)
	d=$(printf '%s\n' "${out[@]}" | awk '{print $3}' | median)
	printf '%-34s %8.2f %10.3f %10.3f\n' "$label" "$g" "$s" "$d"
}
perf_case "stream, 1 lane, 1 stream" --mode stream --bytes "$bytes" --streams 1
perf_case "stream, 2 lanes, 4 streams" --mode stream --bytes "$bytes" --streams 4 --lanes 2
perf_case "region, 1 lane" --mode region --bytes "$bytes" --lanes 1
perf_case "region, 2 lanes" --mode region --bytes "$bytes" --lanes 2
if command -v iperf3 >/dev/null; then
	ip=$(port)
	iperf3 -s -1 -p "$ip" >/dev/null 2>&1 & pids+=($!)
	sleep 0.3
	g=$(iperf3 -c 127.0.0.1 -p "$ip" -l 1M -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e9)')
	printf '%-34s %8.2f %10s %10s\n' "iperf3 loopback, 1 stream, -l 1M" "$g" "-" "-"
fi
