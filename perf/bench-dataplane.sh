#!/usr/bin/env bash
# Raw data-plane throughput between two local ferryd (ferry-perf) over each
# driver, beside iperf3 on loopback and this host's single-core memcpy
# bandwidth (the physical ceiling of a copying driver), all in one run.
# Streams (1 lane 1 stream, 2 lanes 4 streams) and regions (1 and 2 lanes):
# GB/s and CPU seconds per GiB on each side, median of --runs.
#
# Drivers (--drivers, comma list):
#   tcp      the kernel TCP driver on loopback
#   memif    --driver dpdk over net_memif (shared memory between the daemons)
#   af_xdp   --driver dpdk over net_af_xdp on a veth pair whose ends sit in two
#            network namespaces this script creates (root; one queue)
#   udp      the kernel UDP driver (ferry's reliable lanes over datagrams)
# Default: tcp, plus memif and af_xdp when this build has the DPDK driver.
# usage: perf/bench-dataplane.sh [--bytes 2G] [--runs 3] [--drivers LIST] [-- extra ferryd options]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
FERRYD=${FERRYD:-$here/build/controlplane/ferryd}
FERRY_PERF=${FERRY_PERF:-$here/build/perf/ferry-perf}
bytes=2G runs=3 drivers=
while [ $# -gt 0 ]; do
	case $1 in
	--bytes) bytes=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--drivers) drivers=$2; shift 2 ;;
	--) shift; break ;;
	*) echo "usage: $0 [--bytes N] [--runs N] [--drivers tcp,memif,af_xdp,udp] [-- ferryd options]" >&2; exit 2 ;;
	esac
done
has_dpdk() { "$FERRYD" --help 2>&1 | grep -q dpdk; }
if [ -z "$drivers" ]; then
	drivers=tcp
	has_dpdk && drivers=tcp,memif,af_xdp
fi
IFS=, read -r -a driver_list <<<"$drivers"
for d in "${driver_list[@]}"; do
	case $d in tcp | memif | af_xdp | udp) ;; *) echo "$0: unknown driver '$d'" >&2; exit 2 ;; esac
done

work=$(mktemp -d /tmp/ferry-dpbench.XXXXXX)
pids=() nsa=ferry-pa-$$ nsb=ferry-pb-$$
cleanup() {
	kill "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	ip netns del "$nsa" 2>/dev/null
	ip netns del "$nsb" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mkdir -p "$work/sink"
# the daemons' control connection is TLS with a pre-shared key, unless the
# extra options bring their own credentials
tls=(--tls-psk "$work/ferry.psk")
for a in "$@"; do case $a in --tls-* | --insecure-no-tls) tls=() ;; esac; done
(umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$work/ferry.psk") || exit 1

# af_xdp: a data veth pair (no addresses: ferry addresses the ends by MAC)
# and a control veth pair with addresses, each end in its own namespace.
# DPDK 22.11's af_xdp takes a frame in one 4 KiB umem chunk: datagrams of 3414 B.
netns_up() {
	[ -e "/run/netns/$nsa" ] && return 0
	[ "$(id -u)" = 0 ] || { echo "af_xdp needs root (network namespaces)"; return 1; }
	ip netns add "$nsa" && ip netns add "$nsb" &&
		ip link add fpc$$a type veth peer name fpc$$b && ip link add fpd$$a type veth peer name fpd$$b &&
		ip link set fpc$$a netns "$nsa" && ip link set fpd$$a netns "$nsa" &&
		ip link set fpc$$b netns "$nsb" && ip link set fpd$$b netns "$nsb" &&
		ip -n "$nsa" addr add 10.199.79.1/30 dev fpc$$a && ip -n "$nsb" addr add 10.199.79.2/30 dev fpc$$b &&
		ip -n "$nsa" link set fpd$$a mtu 3442 && ip -n "$nsb" link set fpd$$b mtu 3442 &&
		ip netns exec "$nsa" sysctl -qw "net.ipv6.conf.fpd$$a.disable_ipv6=1" &&
		ip netns exec "$nsb" sysctl -qw "net.ipv6.conf.fpd$$b.disable_ipv6=1" || {
		echo "cannot build the veth pairs in two namespaces"
		return 1
	}
	local n l
	for n in "$nsa" "$nsb"; do
		ip -n "$n" link set lo up
		for l in $(ip -n "$n" -o link show | awk -F': ' '/fp[cd]/ {sub(/@.*/, "", $2); print $2}'); do
			ip -n "$n" link set "$l" up
		done
	done
}

# start_pair DRIVER: ferryd a and b for DRIVER; prints why not on failure
start_pair() {
	local d=$1 a=() b=() pre_a=() pre_b=() la=127.0.0.1 lb=127.0.0.1
	shift
	case $d in
	tcp) ;;
	udp) a=(--driver udp) b=(--driver udp) ;;
	memif)
		local m=$work/memif.sock c=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972)
		a=("${c[@]}" --driver-opt "vdev=net_memif0,role=server,socket=$m,bsize=9216" --driver-opt "eal=-l0 --no-shconf"
			--driver-opt ip=198.18.0.1)
		b=("${c[@]}" --driver-opt "vdev=net_memif0,role=client,socket=$m,bsize=9216" --driver-opt "eal=-l1 --no-shconf"
			--driver-opt ip=198.18.0.2) ;;
	af_xdp)
		netns_up || return 1
		local c=(--driver dpdk --driver-opt queues=1 --driver-opt dgram=3414)
		a=("${c[@]}" --driver-opt "vdev=net_af_xdp0,iface=fpd$$a" --driver-opt "eal=-l0 --no-shconf" --driver-opt ip=198.18.0.1)
		b=("${c[@]}" --driver-opt "vdev=net_af_xdp0,iface=fpd$$b" --driver-opt "eal=-l1 --no-shconf" --driver-opt ip=198.18.0.2)
		pre_a=(ip netns exec "$nsa") pre_b=(ip netns exec "$nsb") la=10.199.79.1 lb=10.199.79.2 ;;
	esac
	rm -rf "$work/a" "$work/b"
	mkdir -p "$work/a" "$work/b"
	"${pre_a[@]}" "$FERRYD" --admin "$work/a/admin.sock" --listen "$la:$(port)" "${tls[@]+"${tls[@]}"}" "${a[@]}" "$@" \
		2>"$work/$d-a.log" &
	pids+=($!)
	# the stream sink lives in an --allow-dir of the destination daemon
	"${pre_b[@]}" "$FERRYD" --admin "$work/b/admin.sock" --listen "$lb:$(port)" --allow-dir "$work/sink" \
		"${tls[@]+"${tls[@]}"}" "${b[@]}" "$@" 2>"$work/$d-b.log" &
	pids+=($!)
	for _ in $(seq 100); do [ -S "$work/a/admin.sock" ] && [ -S "$work/b/admin.sock" ] && return 0; sleep 0.1; done
	echo "daemons did not start: $(grep -hv TELEMETRY "$work/$d-a.log" "$work/$d-b.log" | tail -n 2 | tr '\n' ' ')"
	return 1
}
stop_pair() {
	kill "${pids[@]}" 2>/dev/null
	wait "${pids[@]}" 2>/dev/null
	pids=()
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-44s %8s %10s %10s\n' "case" "GB/s" "src s/GiB" "dst s/GiB"
perf_case() { # label ferry-perf-args...
	local label=$1; shift
	local out=() g s d r
	for _ in $(seq "$runs"); do
		r=$("$FERRY_PERF" --src-admin "$work/a/admin.sock" --dst-admin "$work/b/admin.sock" --json --no-verify "$@" |
			python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["gbs"], r["src_cpu_s_per_gib"], r["dst_cpu_s_per_gib"])' 2>/dev/null) &&
			out+=("$r")
	done
	if [ ${#out[@]} = 0 ]; then
		printf '%-44s %8s\n' "$label" "failed"
		return
	fi
	g=$(printf '%s\n' "${out[@]}" | awk '{print $1}' | median)
	s=$(printf '%s\n' "${out[@]}" | awk '{print $2}' | median)
	d=$(printf '%s\n' "${out[@]}" | awk '{print $3}' | median)
	printf '%-44s %8.2f %10.3f %10.3f\n' "$label" "$g" "$s" "$d"
}

m=$("$FERRY_PERF" --mode memcpy --bytes 8G --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["gbs"])')
printf '%-44s %8.2f %10s %10s\n' "memcpy, one core (copying drivers' ceiling)" "$m" "-" "-"
if command -v iperf3 >/dev/null; then
	ip=$(port)
	iperf3 -s -1 -p "$ip" >/dev/null 2>&1 &
	pids+=($!)
	sleep 0.3
	g=$(iperf3 -c 127.0.0.1 -p "$ip" -l 1M -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e9)')
	printf '%-44s %8.2f %10s %10s\n' "iperf3 loopback, 1 stream, -l 1M" "$g" "-" "-"
	stop_pair
fi
for d in "${driver_list[@]}"; do
	if ! start_pair "$d" "$@" >"$work/why"; then
		printf '%-44s %s\n' "$d" "SKIP: $(cat "$work/why")"
		stop_pair
		continue
	fi
	perf_case "$d: stream, 1 lane, 1 stream" --mode stream --bytes "$bytes" --streams 1
	perf_case "$d: stream, 2 lanes, 4 streams" --mode stream --bytes "$bytes" --streams 4 --lanes 2
	perf_case "$d: region, 1 lane" --mode region --bytes "$bytes" --lanes 1
	perf_case "$d: region, 2 lanes" --mode region --bytes "$bytes" --lanes 2
	stop_pair
done
