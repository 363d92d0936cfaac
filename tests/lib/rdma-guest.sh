# shellcheck shell=bash
# tests/lib/rdma-guest.sh - run a command inside a QEMU guest that has real
# RDMA verbs (soft-RoCE, rdma_rxe on its virtio NIC, device rxe0).
#
# The host kernel has no RDMA; Debian's own kernel has. The guest boots that
# kernel under TCG with a tiny busybox initramfs, mounts the host's / read-only
# over 9p with a tmpfs overlay (so host-built binaries run unchanged), brings
# up rxe0 and runs one command. Its stdout, stderr and exit code come back over
# a second, writable 9p share. See shared notes rdma-in-guest.md.
#
#   . tests/lib/rdma-guest.sh
#   rdma_guest_prepare || exit 77     # first-time set-up, cached; the reason is in RDMA_GUEST_WHY
#   rdma_guest_run 300 'ib_write_bw -d rxe0 ...'   # -> RDMA_GUEST_RC, _OUT, _ERR (files)
#
# The cache (kernel .deb unpacked, modules.dep, vmlinux, initramfs) lives in
# RDMA_GUEST_CACHE (default <repo>/build/cache/rdma-guest, outside git) and
# is rebuilt when the kernel version or this file changes. Set-up needs the
# Debian package lists (apt-get update) for `apt-get download`.
#
# Environment (optional): RDMA_GUEST_CACHE, RDMA_GUEST_MEM (default 2048 MiB),
# RDMA_GUEST_CPUS (default 2), QEMU_BIN (default qemu-system-x86_64).
# In the guest: eth0 has RDMA_GUEST_IP (198.18.0.1/24, a benchmark-range
# address that never leaves the guest: the NIC is on a QEMU hub with only
# eth1, a second NIC left down for tests that want two hosts' worth of wire:
# tests/lib/rdma-twohost.sh), rxe0 rides it, GID index 1 is its RoCEv2 (IPv4-mapped) GID, memlock is
# unlimited, the working directory is the caller's.

_rdma_guest_lib=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_rdma_guest_repo=$(cd "$_rdma_guest_lib/../.." && pwd)
RDMA_GUEST_CACHE=${RDMA_GUEST_CACHE:-$_rdma_guest_repo/build/cache/rdma-guest}
RDMA_GUEST_IP=198.18.0.1
RDMA_GUEST_WHY=
RDMA_GUEST_RC=
RDMA_GUEST_OUT=
RDMA_GUEST_ERR=
RDMA_GUEST_CONSOLE=

# Modules the initramfs loads, in dependency order, to reach the 9p root.
_rdma_guest_mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net netfs fscache 9pnet 9pnet_virtio 9p overlay"

_rdma_guest_no() { RDMA_GUEST_WHY=$*; }

# rdma_guest_prepare: make sure a bootable kernel + initramfs are cached.
# Returns 1 with RDMA_GUEST_WHY set when this machine cannot boot the guest.
rdma_guest_prepare() {
	local qemu=${QEMU_BIN:-qemu-system-x86_64} t
	for t in "$qemu" busybox cpio depmod modprobe xz dpkg-deb apt-get python3 timeout; do
		command -v "$t" >/dev/null || { _rdma_guest_no "$t not found (bootstrap.sh installs it)"; return 1; }
	done
	[ -x /bin/busybox ] || { _rdma_guest_no "/bin/busybox (busybox-static) not found"; return 1; }
	command -v ibv_devinfo >/dev/null || { _rdma_guest_no "ibv_devinfo (ibverbs-utils) not found"; return 1; }
	"$qemu" -accel help 2>/dev/null | grep -qx tcg || { _rdma_guest_no "$qemu has no TCG"; return 1; }
	mkdir -p "$RDMA_GUEST_CACHE" || { _rdma_guest_no "cannot create $RDMA_GUEST_CACHE"; return 1; }
	# One set-up at a time (tests may start in parallel).
	exec {_rdma_guest_lockfd}>"$RDMA_GUEST_CACHE/.lock"
	flock "$_rdma_guest_lockfd"
	_rdma_guest_prepare_locked
	local rc=$?
	flock -u "$_rdma_guest_lockfd"
	exec {_rdma_guest_lockfd}>&-
	return $rc
}

_rdma_guest_prepare_locked() {
	local c=$RDMA_GUEST_CACHE pkg ver stamp
	pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	if [ -z "$pkg" ] && [ -f "$c/kernel.pkg" ]; then
		pkg=$(cat "$c/kernel.pkg") # no package lists now: keep what we had
	fi
	[ -n "$pkg" ] || { _rdma_guest_no "no Debian kernel package known (run apt-get update)"; return 1; }
	ver=${pkg#linux-image-}
	stamp="$pkg $(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
	if [ -f "$c/ready" ] && [ "$(cat "$c/ready")" = "$stamp" ]; then
		return 0
	fi
	rm -rf "$c/kernel" "$c/initrd" "$c/ready" "$c"/*.deb
	mkdir -p "$c/kernel" "$c/initrd"
	(cd "$c" && apt-get download "$pkg" >"$c/download.log" 2>&1) ||
		{ _rdma_guest_no "apt-get download $pkg failed: $(tail -1 "$c/download.log")"; return 1; }
	dpkg-deb -x "$c"/"$pkg"_*.deb "$c/kernel" || { _rdma_guest_no "dpkg-deb -x of $pkg failed"; return 1; }
	rm -f "$c"/*.deb
	# The unpacked package has no modules.dep: make it for modprobe -d.
	depmod -b "$c/kernel" "$ver" || { _rdma_guest_no "depmod for $ver failed"; return 1; }
	local vmlinuz="$c/kernel/boot/vmlinuz-$ver"
	[ -f "$vmlinuz" ] || { _rdma_guest_no "$pkg has no vmlinuz"; return 1; }
	# The uncompressed ELF boots directly (PVH) and saves the guest ~4 s of
	# decompression under TCG. Optional: fall back to the bzImage.
	python3 - "$vmlinuz" "$c/vmlinux" <<'EOF' || rm -f "$c/vmlinux"
import lzma, sys
data = open(sys.argv[1], "rb").read()
off = data.find(b"\xfd7zXZ\x00")
if off < 0:
    sys.exit(1)
out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[off:])
if out[:4] != b"\x7fELF":
    sys.exit(1)
open(sys.argv[2], "wb").write(out)
EOF
	# initramfs: busybox, the modules for virtio + 9p + overlay, /init.
	local ir=$c/initrd m path
	mkdir -p "$ir/bin" "$ir/lib/mod" "$ir/proc" "$ir/sys" "$ir/dev" "$ir/lower" "$ir/upper" "$ir/newroot"
	cp /bin/busybox "$ir/bin/busybox" || { _rdma_guest_no "cannot copy busybox"; return 1; }
	: >"$ir/modules.order"
	for m in $_rdma_guest_mods; do
		path=$(modprobe -d "$c/kernel" -S "$ver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}' | tail -1)
		[ -n "$path" ] || continue # built in
		cp "$path" "$ir/lib/mod/$m.ko" || { _rdma_guest_no "cannot copy module $m"; return 1; }
		echo "$m" >>"$ir/modules.order"
	done
	cat >"$ir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/mod/$m.ko || echo "rdma-guest: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /lower || echo "rdma-guest: no 9p root"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || echo "rdma-guest: no overlay"
mkdir -p /newroot/ferry-io
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ferryio /newroot/ferry-io || echo "rdma-guest: no io share"
umount /proc /sys /dev
exec switch_root /newroot /bin/sh /ferry-io/boot.sh
echo "rdma-guest: switch_root failed"
poweroff -f
EOF
	chmod 755 "$ir/init"
	(cd "$ir" && find . | cpio -o -H newc --quiet >"$c/initrd.cpio") || { _rdma_guest_no "cpio failed"; return 1; }
	# /dev/console must exist before devtmpfs is mounted (the kernel opens it
	# for init's stdio); only root can mknod, so append it with a cpio list.
	python3 - "$c/initrd.cpio" <<'EOF' || { _rdma_guest_no "cannot add /dev/console to the initramfs"; return 1; }
import sys
# A second newc archive with /dev/console (char 5:1), concatenated: the
# kernel unpacks concatenated archives in order.
def hdr(name, mode, rmaj=0, rmin=0):
    name = name.encode() + b"\0"
    h = b"070701" + b"".join(b"%08X" % v for v in (0, mode, 0, 0, 1, 0, 0, 0, 0, rmaj, rmin, len(name), 0))
    rec = h + name
    rec += b"\0" * ((4 - len(rec) % 4) % 4)
    return rec
arc = hdr("dev", 0o40755) + hdr("dev/console", 0o20600, 5, 1) + hdr("TRAILER!!!", 0)
arc += b"\0" * ((512 - len(arc) % 512) % 512)
open(sys.argv[1], "ab").write(arc)
EOF
	echo "$ver" >"$c/kernel.ver"
	echo "$pkg" >"$c/kernel.pkg"
	echo "$stamp" >"$c/ready"
}

# rdma_guest_run TIMEOUT_S COMMAND: run COMMAND (bash) in a fresh guest with
# rxe0 up, in the current directory. Sets RDMA_GUEST_RC (the command's exit
# code; 124 = host-side timeout, 125 = the guest failed before the command),
# RDMA_GUEST_OUT / _ERR (files with its stdout / stderr) and
# RDMA_GUEST_CONSOLE (the guest's console log). Returns RDMA_GUEST_RC.
rdma_guest_run() {
	local limit=$1 cmd=$2 c=$RDMA_GUEST_CACHE io kernel
	io=$(mktemp -d /tmp/ferry-rdma-guest.XXXXXX) || return 125
	RDMA_GUEST_OUT=$io/out RDMA_GUEST_ERR=$io/err RDMA_GUEST_CONSOLE=$io/console
	printf '%s\n' "$cmd" >"$io/cmd"
	cat >"$io/boot.sh" <<EOF
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RDMA_GUEST_IP=$RDMA_GUEST_IP RDMA_GUEST_KMODS=$c/kernel/lib/modules
export RDMA_GUEST_CWD='$(pwd)'
exec /bin/bash $_rdma_guest_repo/tests/guest/rdma-init.sh /ferry-io
EOF
	# Pass the caller's environment for the variables tests use.
	local v val
	for v in $(compgen -e | grep -E '^(FERRY|RDMA|ASAN|UBSAN|LSAN)[A-Z_]*$'); do
		val=${!v}
		# Sanitizer reports land in the io share; copied to log_path's dir below.
		[[ $v == *SAN_OPTIONS && $val == *log_path=* ]] &&
			val=$(sed -E 's#log_path=[^:]*/#log_path=/ferry-io/san/#' <<<"$val")
		printf 'export %s=%q\n' "$v" "$val"
	done >"$io/env"
	mkdir -p "$io/san"
	kernel=$c/vmlinux
	[ -f "$kernel" ] || kernel=$c/kernel/boot/vmlinuz-$(cat "$c/kernel.ver")
	timeout -k 5 "$limit" "${QEMU_BIN:-qemu-system-x86_64}" -accel tcg -nodefaults -no-user-config -display none \
		-machine pc -cpu max -smp "${RDMA_GUEST_CPUS:-2}" -m "${RDMA_GUEST_MEM:-2048}" -no-reboot \
		-kernel "$kernel" -initrd "$c/initrd.cpio" \
		-append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" \
		-serial "file:$io/console" -monitor none -parallel none \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap,readonly=on" \
		-virtfs "local,path=$io,mount_tag=ferryio,security_model=none" \
		-netdev hubport,id=n0,hubid=0 -device virtio-net-pci,netdev=n0 \
		-netdev hubport,id=n1,hubid=0 -device virtio-net-pci,netdev=n1 \
		</dev/null >"$io/qemu.log" 2>&1
	local qrc=$?
	for v in ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS; do
		val=${!v:-}
		[[ $val == *log_path=*/* ]] || continue
		val=${val#*log_path=}
		val=${val%%:*}
		compgen -G "$io/san/*" >/dev/null && cp "$io"/san/* "$(dirname "$val")/" 2>/dev/null
	done
	if [ -s "$io/rc" ]; then
		RDMA_GUEST_RC=$(cat "$io/rc")
	elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
		RDMA_GUEST_RC=124
	else
		RDMA_GUEST_RC=125
	fi
	return "$RDMA_GUEST_RC"
}

# rdma_guest_cleanup: remove the last run's io dir (keeps it with RDMA_GUEST_KEEP=1)
rdma_guest_cleanup() {
	[ -n "$RDMA_GUEST_OUT" ] && [ -z "${RDMA_GUEST_KEEP:-}" ] && rm -rf "$(dirname "$RDMA_GUEST_OUT")"
	return 0
}

# Inside the guest only: rdma_guest_twohost makes eth1 a second "host":
# RDMA_GUEST_IP2 (198.18.1.2) on eth1 with soft-RoCE device rxe1, and traffic
# between the two addresses going over the wire (out of one NIC, through the
# QEMU hub, into the other) rather than through the kernel's loopback, which
# soft-RoCE would short-cut. Then `ip link set eth1 down` is a cable pulled:
# packets to the second host vanish without any event on the first. Each
# address leaves the shared local routing table for a table consulted only
# for packets arriving on its own NIC; static neighbours replace ARP (which
# would consult the local table). Call it after every check that uses
# RDMA_GUEST_IP on its own: from here on that address is reached over eth1.
RDMA_GUEST_IP2=198.18.1.2
rdma_guest_twohost() {
	local ip1=$RDMA_GUEST_IP ip2=$RDMA_GUEST_IP2 mac0 mac1 i
	mac0=$(cat /sys/class/net/eth0/address) && mac1=$(cat /sys/class/net/eth1/address) || return 1
	# Our own addresses arrive from the wire (accept_local) and, no longer
	# in the local table, can still be bound (ip_nonlocal_bind).
	sysctl -qw net.ipv4.ip_nonlocal_bind=1 || return 1
	for i in all default eth0 eth1; do
		sysctl -qw "net.ipv4.conf.$i.accept_local=1" "net.ipv4.conf.$i.rp_filter=0" || return 1
	done
	ip link set eth1 up &&
		ip addr add "$ip2/24" dev eth1 &&
		rdma link add rxe1 type rxe netdev eth1 &&
		ip route del local "$ip1" table local &&
		ip route del local "$ip2" table local &&
		ip route add local "$ip1" dev eth0 table 101 &&
		ip rule add iif eth0 lookup 101 pref 10 &&
		ip route add local "$ip2" dev eth1 table 102 &&
		ip rule add iif eth1 lookup 102 pref 11 &&
		ip route add "$ip2/32" dev eth0 &&
		ip route add "$ip1/32" dev eth1 &&
		ip neigh replace "$ip2" lladdr "$mac1" dev eth0 nud permanent &&
		ip neigh replace "$ip1" lladdr "$mac0" dev eth1 nud permanent || return 1
	for i in $(seq 50); do
		rdma link show rxe1/1 2>/dev/null | grep -q 'state ACTIVE' && return 0
		sleep 0.1
	done
	return 1
}
