#!/usr/bin/env bash
# bootstrap.sh — install what ferry's build, demo, tests and benchmarks need
# (Debian 12). Idempotent and non-interactive: with everything present it
# only checks and returns (well under 2 s); `apt-get update` runs only when
# a package is missing.
#
# Usage: ./bootstrap.sh [--hugepages N] [--check] [-h]
#   --hugepages N   reserve N 2 MiB hugepages (vm.nr_hugepages) and check
#                   that the kernel really reserved them; mounts hugetlbfs
#                   on /dev/hugepages if nothing is mounted there
#   --check         only report what is missing; exit 1 if anything is
#
# Must run as root (it calls apt-get and writes /proc/sys).

set -euo pipefail

PACKAGES=(
	# build
	build-essential gcc meson ninja-build pkg-config binutils
	# clang: the libFuzzer run of the cookie parser in test.sh
	clang
	libjansson-dev libxml2-dev libxml2-utils libgnutls28-dev
	# the DPDK driver (drivers/dpdk) and its virtual PMDs (memif, af_xdp, vhost)
	libdpdk-dev
	# QEMU guests for the demo, the e2e tests and perf/bench-migrate.sh
	qemu-system-x86 qemu-utils
	# test and benchmark tools
	socat iperf3 libnbd-bin nbdkit valgrind jq xxd
	# tests/tools/nbdcheck.py: libnbd from Python (the NBD path tests)
	python3-libnbd
	# certtool, for the TLS tests' X.509 certificates
	gnutls-bin
	iproute2 procps util-linux
	# perf/qmp.py (QMP driver) and the fast random fill in perf/bench-migrate.sh
	python3 openssl
	# tests/e2e/libvirt-*.sh: two real libvirtd instances migrating through ferry
	libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
	# the RDMA driver (drivers/rdma) and its tests: real verbs over soft-RoCE in a
	# guest that boots Debian's kernel (tests/lib/rdma-guest.sh)
	libibverbs-dev librdmacm-dev rdma-core ibverbs-utils ibverbs-providers perftest rdmacm-utils
	busybox-static cpio kmod xz-utils
)

ORIG_ARGS="$*"
HUGEPAGES=
CHECK_ONLY=0

say() { printf 'bootstrap: %s\n' "$*"; }
fail() {
	printf 'bootstrap: ERROR: %s\n' "$*" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case $1 in
	--hugepages)
		[ $# -ge 2 ] || fail "--hugepages needs a number"
		HUGEPAGES=$2
		shift 2
		;;
	--hugepages=*)
		HUGEPAGES=${1#*=}
		shift
		;;
	--check)
		CHECK_ONLY=1
		shift
		;;
	-h | --help)
		sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
		exit 0
		;;
	*) fail "unknown argument '$1' (try --help)" ;;
	esac
done
if [ -n "$HUGEPAGES" ] && ! [[ $HUGEPAGES =~ ^[0-9]+$ ]]; then
	fail "--hugepages wants a whole number of 2 MiB pages, got '$HUGEPAGES'"
fi

export DEBIAN_FRONTEND=noninteractive
export DEBCONF_NONINTERACTIVE_SEEN=true
export NEEDRESTART_MODE=a
exec </dev/null # never wait for a terminal, also with CI=true and no stdin

if [ "$(id -u)" != 0 ] && [ "$CHECK_ONLY" = 0 ]; then
	fail "must run as root (apt-get, /proc/sys); try: sudo $0 $ORIG_ARGS  (or --check to only look)"
fi
[ -r /etc/debian_version ] || fail "this script targets Debian (no /etc/debian_version)"
command -v dpkg-query >/dev/null && command -v apt-get >/dev/null ||
	fail "dpkg/apt-get not found; this script targets Debian 12"

# ------------------------------------------------------------ packages
missing_packages() {
	# One dpkg-query for all: prints "name status" for known packages;
	# unknown ones are absent from the output (and missing).
	local installed
	installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null |
		awk '$2 == "installed" { print $1 }' || true)
	local p
	for p in "${PACKAGES[@]}"; do
		grep -qxF -- "$p" <<<"$installed" || echo "$p"
	done
}

mapfile -t MISSING < <(missing_packages)

if [ ${#MISSING[@]} -eq 0 ]; then
	say "all ${#PACKAGES[@]} packages present"
elif [ "$CHECK_ONLY" = 1 ]; then
	say "missing: ${MISSING[*]}"
	exit 1
else
	APT_OPTS=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
		-o Dpkg::Options::=--force-confold)
	say "missing: ${MISSING[*]}"
	say "running apt-get update"
	apt-get "${APT_OPTS[@]}" update >/tmp/bootstrap-apt-update.log 2>&1 || {
		tail -n 20 /tmp/bootstrap-apt-update.log >&2
		fail "apt-get update failed (log: /tmp/bootstrap-apt-update.log)"
	}
	unknown=()
	for p in "${MISSING[@]}"; do
		cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ { print $2 }')
		[ -n "$cand" ] && [ "$cand" != "(none)" ] || unknown+=("$p")
	done
	[ ${#unknown[@]} -eq 0 ] || fail "no installable candidate for: ${unknown[*]} (check the apt sources)"
	say "installing (--no-install-recommends): ${MISSING[*]}"
	apt-get "${APT_OPTS[@]}" install --no-install-recommends "${MISSING[@]}" \
		>/tmp/bootstrap-apt-install.log 2>&1 || {
		tail -n 30 /tmp/bootstrap-apt-install.log >&2
		fail "apt-get install failed (log: /tmp/bootstrap-apt-install.log)"
	}
	mapfile -t STILL < <(missing_packages)
	[ ${#STILL[@]} -eq 0 ] || fail "still not installed after apt-get install: ${STILL[*]}"
	say "installed ${#MISSING[@]} package(s)"
fi

# ------------------------------------------------------------ hugepages
if [ -n "$HUGEPAGES" ]; then
	hp_size_kb=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
	if [ "$hp_size_kb" = 2048 ]; then
		knob=/proc/sys/vm/nr_hugepages
	else
		knob=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
	fi
	[ -e "$knob" ] || fail "this kernel has no 2 MiB hugepages ($knob missing)"
	have=$(cat "$knob")
	if [ "$have" = "$HUGEPAGES" ]; then
		say "hugepages: $have x 2 MiB already reserved"
	elif [ "$CHECK_ONLY" = 1 ]; then
		say "hugepages: $have x 2 MiB reserved, $HUGEPAGES wanted"
		exit 1
	else
		echo "$HUGEPAGES" >"$knob" 2>/dev/null || fail "cannot write $knob (read-only /proc/sys in this container?)"
		got=$(cat "$knob")
		if [ "$got" != "$HUGEPAGES" ] && [ "$got" -lt "$HUGEPAGES" ]; then
			# Fragmented memory: compact once and try again.
			say "hugepages: only $got of $HUGEPAGES reserved, compacting memory and retrying"
			echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
			echo "$HUGEPAGES" >"$knob" 2>/dev/null || true
			got=$(cat "$knob")
		fi
		[ "$got" = "$HUGEPAGES" ] ||
			fail "asked for $HUGEPAGES hugepages of 2 MiB, the kernel reserved $got (not enough free contiguous memory?)"
		say "hugepages: reserved $got x 2 MiB ($((got * 2)) MiB), was $have"
	fi
	if [ "$HUGEPAGES" -gt 0 ] && [ "$CHECK_ONLY" = 0 ]; then
		if ! awk '$3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
			mkdir -p /dev/hugepages
			if mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages 2>/dev/null; then
				say "hugepages: mounted hugetlbfs on /dev/hugepages"
			else
				say "hugepages: WARNING: could not mount hugetlbfs on /dev/hugepages (QEMU needs a hugetlbfs mount to use them)"
			fi
		fi
	fi
fi

say "done"
