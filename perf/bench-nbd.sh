#!/usr/bin/env bash
# Copying a disk image into an NBD export through ferry's NBD path (ferryctl
# nbd-open: block messages over data-plane lanes) versus straight into the same
# target NBD server, in one run, with the ratio. The target is qemu-nbd on a
# raw file in /dev/shm (so the disk is not what is measured); the copiers are
# nbdcopy (one connection, 64 requests in flight: one client, as QEMU's mirror
# job is) and qemu-img convert (QEMU's own client).
# Arms: direct, ferry over the tcp driver, and ferry over DPDK net_memif when
# this build has the dpdk driver and DPDK starts here.
# usage: perf/bench-nbd.sh [--size 1G] [--runs 3] [--lanes 4]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
FERRYD=${FERRYD:-$here/build/controlplane/ferryd}
FERRYCTL=${FERRYCTL:-$here/build/controlplane/ferryctl}
size=1G runs=3 lanes=4
while [ $# -gt 0 ]; do
	case $1 in
	--size) size=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--lanes) lanes=$2; shift 2 ;;
	*) echo "usage: $0 [--size N] [--runs N] [--lanes N]" >&2; exit 2 ;;
	esac
done
for t in qemu-nbd qemu-img nbdcopy; do
	command -v "$t" >/dev/null || { echo "$0: $t is not installed" >&2; exit 1; }
done
work=$(mktemp -d /dev/shm/ferry-nbdbench.XXXXXX)
pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
(umask 077 && printf 'ferry-bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$work/ferry.psk") || exit 1
mkdir -p "$work/allow"

# source image: random data, half of it; the rest zero (as a real disk has holes)
bytes=$(numfmt --from=iec "$size")
head -c $((bytes / 2)) /dev/urandom >"$work/src.img"
truncate -s "$bytes" "$work/src.img"
truncate -s "$bytes" "$work/allow/dst.img"
qemu-nbd -f raw -k "$work/allow/t.sock" -e 0 -t --cache=writeback "$work/allow/dst.img" 2>"$work/qemu-nbd.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/allow/t.sock" ] && break; sleep 0.05; done

# daemons NAME-PAIR [ferryd options]: start a source/destination pair; sets SRC_ADMIN, DST_LISTEN
daemons() {
	local pair=$1 pa pb
	shift
	pa=$(port) pb=$(port)
	mkdir -p "$work/$pair-a" "$work/$pair-b"
	"$FERRYD" --admin "$work/$pair-a/admin.sock" --listen "127.0.0.1:$pa" --run-dir "$work/$pair-a" \
		--tls-psk "$work/ferry.psk" "$@" "${SRC_OPTS[@]}" 2>"$work/$pair-a.log" &
	pids+=($!)
	"$FERRYD" --admin "$work/$pair-b/admin.sock" --listen "127.0.0.1:$pb" --run-dir "$work/$pair-b" \
		--allow-dir "$work/allow" --tls-psk "$work/ferry.psk" "$@" "${DST_OPTS[@]}" 2>"$work/$pair-b.log" &
	pids+=($!)
	for _ in $(seq 100); do
		"$FERRYCTL" --admin "$work/$pair-a/admin.sock" ping >/dev/null 2>&1 &&
			"$FERRYCTL" --admin "$work/$pair-b/admin.sock" ping >/dev/null 2>&1 && break
		sleep 0.1
	done
	SRC_ADMIN=$work/$pair-a/admin.sock
	DST_LISTEN=127.0.0.1:$pb
	"$FERRYCTL" --admin "$SRC_ADMIN" nbd-open --to "$DST_LISTEN" --listen "$work/$pair-a/nbd.sock" \
		--target "$work/allow/t.sock" --lanes "$lanes" >/dev/null
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# copy TOOL URI: one timed copy, prints MB/s
copy() {
	local tool=$1 uri=$2 t0 t1
	t0=$(now_ms)
	case $tool in
	nbdcopy) nbdcopy --connections=1 --requests=64 "$work/src.img" "$uri" || return 1 ;;
	qemu-img) qemu-img convert -n -W -m 8 -f raw -O raw "$work/src.img" "$uri" || return 1 ;;
	esac
	t1=$(now_ms)
	cmp -s "$work/src.img" "$work/allow/dst.img" || { echo "$0: $tool via $uri: target differs" >&2; return 1; }
	# empty the target between runs: every run writes all of it
	: >"$work/allow/dst.img" && truncate -s "$bytes" "$work/allow/dst.img"
	awk -v b="$bytes" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f\n", b / 1e6 / (ms / 1000) }'
}
arm() { # label tool uri
	local r=() i f
	for ((i = 0; i < runs; i++)); do
		r+=("$(copy "$2" "$3")") && continue
		echo "$0: $2 into the $1 arm failed; logs:" >&2
		for f in "$work"/*.log; do echo "--- $f" >&2; tail -n 8 "$f" >&2; done
		return 1
	done
	printf '%s\n' "${r[@]}" | median
}

printf 'image %s (half random, half zero), %s lanes, median of %s runs, MB/s\n' "$size" "$lanes" "$runs"
SRC_OPTS=() DST_OPTS=()
daemons tcp
direct="nbd+unix:///?socket=$work/allow/t.sock"
viaTcp="nbd+unix:///?socket=$work/tcp-a/nbd.sock"
viaDpdk=
SRC_OPTS=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972 --driver-opt eal=-l0 --driver-opt ip=198.18.0.1
	--driver-opt "vdev=net_memif0,role=server,socket=$work/memif.sock,bsize=9216")
DST_OPTS=(--driver dpdk --driver-opt queues=4 --driver-opt dgram=8972 --driver-opt eal=-l1 --driver-opt ip=198.18.0.2
	--driver-opt "vdev=net_memif0,role=client,socket=$work/memif.sock,bsize=9216")
if daemons dpdk 2>/dev/null && [ -S "$work/dpdk-a/nbd.sock" ]; then
	viaDpdk="nbd+unix:///?socket=$work/dpdk-a/nbd.sock"
else
	echo "(dpdk arm skipped: $(grep -m1 -h -i "error\|cannot\|no driver" "$work"/dpdk-*.log 2>/dev/null | head -c 200))"
fi
printf '%-10s %10s %12s %8s %12s %8s\n' copier direct ferry-tcp ratio ferry-dpdk ratio
for tool in nbdcopy qemu-img; do
	d=$(arm direct "$tool" "$direct") || exit 1
	t=$(arm tcp "$tool" "$viaTcp") || exit 1
	m=- mr=-
	if [ -n "$viaDpdk" ]; then
		m=$(arm dpdk "$tool" "$viaDpdk") || exit 1
		mr=$(awk -v a="$m" -v b="$d" 'BEGIN { printf "%.2f", a / b }')
	fi
	printf '%-10s %10s %12s %8s %12s %8s\n' "$tool" "$d" "$t" "$(awk -v a="$t" -v b="$d" 'BEGIN { printf "%.2f", a / b }')" "$m" "$mr"
done
