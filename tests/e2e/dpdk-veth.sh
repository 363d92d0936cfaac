#!/usr/bin/env bash
# dpdk-veth.sh - two ferryd --driver dpdk in two network namespaces, each
# driving its end of a veth pair through a kernel-backed DPDK port:
# net_af_packet (9000-byte MTU, 9216-byte ring frames), then net_af_xdp
# (3442-byte MTU: DPDK 22.11's af_xdp takes a frame in one 4 KiB umem chunk).
# One session of 4 streams (a tunnel; one DPDK queue: one lane carries them),
# DPDK_VETH_MB (default 1024, 256 in the sanitizer build) of random data on each: sha256 identical at the
# far end. Nothing is injected: what these kernel paths lose, ferry's
# reliable lanes send again (af_packet's receive ring loses a few tenths of a
# percent at ferry's rate; blasting, both lose 1-2 %). The daemons address
# each other by the veth ends' own MACs from the endpoint
# ("dpdk:MAC/IP:PORTS"): the data link has no IPv4 address and no ARP ever
# runs on it. The control connections run over a second veth pair (af_xdp
# takes every frame of the queue it is bound to).
#
# Prints, per PMD: time, GB/s, the datagrams each side put on the link, the
# retransmissions among them where a kernel tap can see them (af_packet: the
# RETX-flagged datagrams reaching b), the veth's drops, and for af_xdp the
# frames its XDP program could not hand to the socket (lost).
#
# Exit: 0 pass, 1 fail, 77 skip (not root, no network namespaces, no DPDK
# driver in this build, or DPDK cannot start here). Environment:
# tests/lib/ferry.sh; DPDK_VETH_MB; DPDK_VETH_PMDS (default "af_packet
# af_xdp"). The af_xdp round is skipped, saying why, on a kernel without XDP
# sockets or a DPDK without the PMD; anything else failing there fails.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py
# the sanitizer build moves a quarter: the plain build carries the issue's 1 GiB per stream
if [ "${FERRY_SANITIZED:-0}" = 1 ]; then mb=${DPDK_VETH_MB:-256}; else mb=${DPDK_VETH_MB:-1024}; fi
pmds=${DPDK_VETH_PMDS:-af_packet af_xdp}

[ "$(id -u)" = 0 ] || ferry_skip "needs root (network namespaces)"
command -v ip >/dev/null || ferry_skip "ip (iproute2) not found"
ferry_init --timeout 280
allow=$QEMU_DIR/b-allowed
mkdir -p "$allow"
# DPDK 22.11's af_xdp never frees its umem (eth_dev_close tests the wrong
# reference count): 80 bytes from libxdp that a sanitizer build reports at exit
echo "leak:xsk_umem__create" >"$QEMU_DIR/lsan.supp"
export LSAN_OPTIONS="suppressions=$QEMU_DIR/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

nsa=ferry-da-$$ nsb=ferry-db-$$
ca=fca$$ cb=fcb$$ da=fda$$ db=fdb$$
net_cleanup() {
	ip netns del "$nsa" 2>/dev/null
	ip netns del "$nsb" 2>/dev/null
}
ip netns add "$nsa" && ip netns add "$nsb" || { net_cleanup; ferry_skip "cannot create network namespaces here"; }
# the daemons leave their namespaces before the namespaces (and the veths) go
trap 'rc=$?; for n in "${!FERRY_PID[@]}"; do ferry_stop_daemon "$n" 3; done; net_cleanup; (exit $rc); ferry_cleanup' EXIT
ip link add "$ca" type veth peer name "$cb" && ip link add "$da" type veth peer name "$db" ||
	ferry_fail "cannot create the veth pairs"
ip link set "$ca" netns "$nsa" && ip link set "$cb" netns "$nsb" && ip link set "$da" netns "$nsa" &&
	ip link set "$db" netns "$nsb" || ferry_fail "cannot move the veth ends"
ip -n "$nsa" addr add 10.199.78.1/30 dev "$ca" && ip -n "$nsb" addr add 10.199.78.2/30 dev "$cb" ||
	ferry_fail "cannot address the control link"
for n in "$nsa" "$nsb"; do ip -n "$n" link set lo up; done
# the data link stays quiet but for ferry (no IPv6 autoconfiguration either)
ip netns exec "$nsa" sysctl -qw "net.ipv6.conf.$da.disable_ipv6=1" 2>/dev/null
ip netns exec "$nsb" sysctl -qw "net.ipv6.conf.$db.disable_ipv6=1" 2>/dev/null
ip -n "$nsa" link set "$ca" up && ip -n "$nsb" link set "$cb" up && ip -n "$nsa" link set "$da" up &&
	ip -n "$nsb" link set "$db" up || ferry_fail "cannot bring the links up"
mac() { ip -n "$1" -j link show dev "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])'; }
maca=$(mac "$nsa" "$da") && macb=$(mac "$nsb" "$db") || ferry_fail "cannot read the data link's MACs"

python3 "$check" serve "$allow/target.sock" "$QEMU_DIR/accepted.log" </dev/null >"$QEMU_DIR/serve.out" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")

# counters NS DEV: "tx_packets rx_packets tx_dropped rx_dropped" of a link
counters() {
	ip -n "$1" -s -j link show dev "$2" | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["tx"]["packets"], s["rx"]["packets"], s["tx"]["dropped"], s["rx"]["dropped"])'
}

# start SUFFIX PMD DGRAM [VDEV-OPTS]: ferryd a$SUFFIX in nsa, b$SUFFIX in
# nsb; returns 2 (a) or 3 (b) when one does not come up (its log says why).
# --no-shconf: DPDK keeps no shared config files (12 MB of them per process
# in /var/run/dpdk, left behind otherwise).
start() {
	local sfx=$1 vd=$2 dg=$3
	local -a common=(--driver dpdk --driver-opt queues=1 --driver-opt "dgram=$dg")
	FERRY_NETNS[a$sfx]=$nsa FERRY_ADDR[a$sfx]=10.199.78.1
	FERRY_NETNS[b$sfx]=$nsb FERRY_ADDR[b$sfx]=10.199.78.2
	ferry_start_daemon "a$sfx" "${common[@]}" --driver-opt "vdev=net_${vd}0,iface=$da${4:-}" \
		--driver-opt "eal=-l0 --no-shconf" --driver-opt ip=198.18.0.1 2>/dev/null || return 2
	ferry_start_daemon "b$sfx" "${common[@]}" --driver-opt "vdev=net_${vd}0,iface=$db${4:-}" \
		--driver-opt "eal=-l1 --no-shconf" --driver-opt ip=198.18.0.2 --allow-dir "$allow" 2>/dev/null || return 3
}

# retx.py IF OUT: count, until SIGTERM, the ferry datagrams arriving on IF
# (in its namespace) flagged RETX (wire-format.md: a retransmission); writes
# the count to OUT. A kernel tap sees what reaches an af_packet port, not an
# af_xdp one (XDP takes its frames first), nor what either sends (af_packet
# bypasses the qdisc, and with it the taps).
cat >"$QEMU_DIR/retx.py" <<'PY'
import ctypes, signal, socket, struct, sys
ifname, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
# classic BPF: IPv4, UDP, ferry's flags byte (14 + 20 + 8 + 6) with RETX
prog = [(0x28, 0, 0, 12), (0x15, 0, 5, 0x0800), (0x30, 0, 0, 23), (0x15, 0, 3, 17),
        (0x30, 0, 0, 48), (0x45, 0, 1, 0x08), (0x06, 0, 0, 64), (0x06, 0, 0, 0)]
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
s.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf)))
s.bind((ifname, 3))  # ETH_P_ALL
n = 0
def done(*_):
    with open(out, "w") as f:
        f.write("%d\n" % n)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
open(out + ".ready", "w").close()
while True:
    d, a = s.recvfrom(128)
    if a[2] != socket.PACKET_OUTGOING and len(d) > 48 and d[46] == 0xf1 and d[48] & 8:
        n += 1
PY

# xdpstat.py IF: "FRAMES REDIRECTED" from the veth's ethtool counters (the
# SIOCETHTOOL ioctl, no ethtool needed): frames its XDP program saw and
# those it handed to the XDP socket; the rest were lost there (ring full).
cat >"$QEMU_DIR/xdpstat.py" <<'PY'
import array, fcntl, socket, struct, sys
SIOCETHTOOL, GSSET_INFO, GSTRINGS, GSTATS, SS_STATS = 0x8946, 0x37, 0x1b, 0x1d, 1
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def call(buf):
    fcntl.ioctl(s.fileno(), SIOCETHTOOL, struct.pack("16sP", sys.argv[1].encode(), buf.buffer_info()[0]))
info = array.array("B", struct.pack("IIQI", GSSET_INFO, 0, 1 << SS_STATS, 0))
call(info)
n = struct.unpack_from("I", info, 16)[0]
names = array.array("B", struct.pack("III", GSTRINGS, SS_STATS, n) + bytes(32 * n))
call(names)
vals = array.array("B", struct.pack("II", GSTATS, n) + bytes(8 * n))
call(vals)
tot = {"xdp_packets": 0, "xdp_redirect": 0}
for i in range(n):
    name = bytes(names[12 + 32 * i:44 + 32 * i]).split(b"\0")[0].decode()
    for k in tot:
        if name.startswith("rx_queue_") and name.endswith("_" + k):
            tot[k] += struct.unpack_from("Q", vals, 8 + 8 * i)[0]
print(tot["xdp_packets"], tot["xdp_redirect"])
PY
xdpstat() { ip netns exec "$1" python3 "$QEMU_DIR/xdpstat.py" "$2" 2>/dev/null || echo "0 0"; }

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f%%", b ? a * 100 / b : 0 }'; }

# round LABEL SUFFIX DGRAM: 4 streams of $mb MiB from a$SUFFIX to b$SUFFIX
round() {
	local label=$1 sfx=$2 dg=$3 out t0 ms a0 b0 a1 b1 xa0 xb0 xa1 xb1 spid="" retx="not visible outside ferry"
	grep -q "data dpdk:$maca/198.18.0.1:47000-47000 (dpdk driver" "${FERRY_LOG[a$sfx]}" ||
		ferry_fail "$label: ferryd a does not report its veth end's MAC ($maca) in its endpoint"
	grep -q "data dpdk:$macb/198.18.0.2:47000-47000 (dpdk driver" "${FERRY_LOG[b$sfx]}" ||
		ferry_fail "$label: ferryd b does not report its veth end's MAC ($macb) in its endpoint"
	out=$(ferry_ctl "a$sfx" tunnel-open --to "${FERRY_LISTEN[b$sfx]}" --listen "$QEMU_DIR/t$sfx.sock" \
		--target "$allow/target.sock" --streams 4) || ferry_fail "$label: tunnel-open failed: $out"
	tunnel=$(json_field tunnel <<<"$out")
	if [ "$label" = af_packet ]; then
		ip netns exec "$nsb" python3 "$QEMU_DIR/retx.py" "$db" "$QEMU_DIR/retx$sfx" </dev/null >"$QEMU_DIR/retx$sfx.log" 2>&1 &
		spid=$!
		FERRY_EXTRA_PIDS+=("$spid")
		for _ in $(seq 100); do [ -e "$QEMU_DIR/retx$sfx.ready" ] && break; sleep 0.05; done
	fi
	read -ra a0 <<<"$(counters "$nsa" "$da")" && read -ra b0 <<<"$(counters "$nsb" "$db")" ||
		ferry_fail "$label: no link counters"
	read -ra xa0 <<<"$(xdpstat "$nsa" "$da")"
	read -ra xb0 <<<"$(xdpstat "$nsb" "$db")"
	t0=$(now_ms)
	out=$(python3 "$check" client "$QEMU_DIR/t$sfx.sock" "v${sfx}a,v${sfx}b,v${sfx}c,v${sfx}d" $((mb << 20)) 240) ||
		ferry_fail "$label: 4 x $mb MiB were not carried whole: $out"
	ms=$(($(now_ms) - t0))
	read -ra a1 <<<"$(counters "$nsa" "$da")" && read -ra b1 <<<"$(counters "$nsb" "$db")" ||
		ferry_fail "$label: no link counters"
	read -ra xa1 <<<"$(xdpstat "$nsa" "$da")"
	read -ra xb1 <<<"$(xdpstat "$nsb" "$db")"
	local sent=$((a1[0] - a0[0])) xb=$((xb1[0] - xb0[0])) xa=$((xa1[0] - xa0[0])) lost=""
	[ "$xb" -gt 0 ] && lost="; lost at b's XDP socket $((xb - (xb1[1] - xb0[1]))) of $xb ($(pct \
		$((xb - (xb1[1] - xb0[1]))) "$xb")), at a's $((xa - (xa1[1] - xa0[1]))) of $xa"
	if [ -n "$spid" ]; then
		kill -TERM "$spid" 2>/dev/null
		wait "$spid" 2>/dev/null
		[ -s "$QEMU_DIR/retx$sfx" ] && retx="$(cat "$QEMU_DIR/retx$sfx") ($(pct "$(cat "$QEMU_DIR/retx$sfx")" "$sent"))"
	fi
	[ -z "$(ip -n "$nsa" neigh show dev "$da")$(ip -n "$nsb" neigh show dev "$db")" ] ||
		ferry_fail "$label: the kernel resolved neighbours on the data link: $(ip -n "$nsa" neigh show dev "$da")"
	echo "$label: 4 x $mb MiB, sha256 identical, in $ms ms ($(awk -v b=$((4 * (mb << 20))) -v t="$ms" \
		'BEGIN { printf "%.2f", b / t / 1e6 }') GB/s, $dg-byte datagrams); a->b $sent datagrams, of them" \
		"retransmissions: $retx; b->a $((b1[0] - b0[0])); veth drops a tx $((a1[2] - a0[2])) rx $((a1[3] - a0[3]))," \
		"b tx $((b1[2] - b0[2])) rx $((b1[3] - b0[3]))$lost"
}

n=0 done_any=0
for pmd in $pmds; do
	n=$((n + 1))
	case $pmd in
	af_packet)
		ip -n "$nsa" link set "$da" mtu 9000 && ip -n "$nsb" link set "$db" mtu 9000 || ferry_fail "cannot set MTU 9000"
		dg=8972 vopts=,framesz=9216,blocksz=36864,framecnt=1024 ;;
	af_xdp)
		if ! python3 -c 'import socket; socket.socket(44, socket.SOCK_RAW).close()' 2>/dev/null; then
			echo "af_xdp: this kernel has no XDP sockets (AF_XDP), round skipped"
			continue
		fi
		ip -n "$nsa" link set "$da" mtu 3442 && ip -n "$nsb" link set "$db" mtu 3442 || ferry_fail "cannot set MTU 3442"
		dg=3414 vopts= ;;
	*) ferry_fail "unknown PMD $pmd (DPDK_VETH_PMDS)" ;;
	esac
	start "$n" "$pmd" "$dg" "$vopts"
	rc=$?
	if [ "$rc" -ne 0 ]; then
		log=${FERRY_LOG[a$n]}
		[ "$rc" -eq 3 ] && log=${FERRY_LOG[b$n]}
		grep -q "no driver named 'dpdk'" "$log" && ferry_skip "this build has no DPDK driver (libdpdk-dev)"
		why=$(grep -m1 -E "dpdk driver|rte_eal_init|af_xdp|AF_XDP|xsk|Failed" "$log" | cut -c1-300)
		# af_xdp where the kernel or this DPDK lacks it: its round is skipped
		# (a failure past EAL's start, where the XDP socket is made, is not)
		if [ "$pmd" = af_xdp ] && grep -q "rte_eal_init" "$log"; then
			echo "$pmd: cannot be used here, round skipped: ${why:-see $log}"
			ferry_stop_daemon "a$n"
			ferry_stop_daemon "b$n"
			continue
		fi
		grep -q "rte_eal_init" "$log" && ferry_skip "DPDK cannot start here: $why"
		ferry_fail "$pmd: starting the pair failed: $why"
	fi
	round "$pmd" "$n" "$dg"
	# one queue, one lane: on af_xdp too (a lone lane used to starve there:
	# the PMD's umem left mbufs out, docs/performance.md)
	st=$(ferry_ctl "a$n" tunnel-status "$tunnel") || ferry_fail "$pmd: tunnel-status failed: $st"
	lanes=$(json_field stats.lanes <<<"$st")
	[ "$lanes" = 1 ] || ferry_fail "$pmd: the session ran on ${lanes:-?} lanes, expected 1 on one queue"
	echo "$pmd: 1 lane; the source sent $(json_field stats.reliable.retransmits <<<"$st") datagrams again," \
		"$(json_field stats.reliable.timeouts <<<"$st") retransmission timeouts"
	# af_packet copies mbuf chains by address; af_xdp sends no chains
	path=copy
	[ "$pmd" = af_packet ] && path=ref
	ferry_dpdk_tx_path "a$n" "$tunnel" $path "net_$pmd" "$pmd"
	ferry_stop_daemon "a$n"
	ferry_stop_daemon "b$n"
	if [ "$pmd" = af_xdp ]; then
		# the kernel drops a frame whose descriptor lies outside the umem
		# without a trace but these counters, which each daemon logs on close
		for d in "a$n" "b$n"; do
			x=$(grep -m1 "XDP socket:" "${FERRY_LOG[$d]}") || ferry_fail "af_xdp: ferryd $d logged no XDP socket counters"
			echo "af_xdp: ferryd $d's XDP socket: ${x#*XDP socket: }"
			grep -q "rx_invalid_descs 0 tx_invalid_descs 0 " <<<"$x" ||
				ferry_fail "af_xdp: the kernel refused descriptors of ferryd $d: ${x#*XDP socket: }"
		done
	fi
	done_any=1
done
[ "$done_any" = 1 ] || ferry_fail "no PMD could run"
echo "PASS dpdk-veth in $(ferry_elapsed)s"
exit 0
