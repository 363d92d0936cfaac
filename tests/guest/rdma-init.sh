#!/bin/bash
# Inside the RDMA test guest (tests/lib/rdma-guest.sh), as PID 1 after the
# initramfs switched to the overlay root: mount the basics, load soft-RoCE,
# bring up rxe0 on eth0, run the host's command, write its stdout, stderr and
# exit code to the io share ($1), power off. Never returns.
io=$1
finish() {
	echo "$1" >"$io/rc"
	sync
	/bin/busybox poweroff -f
	sleep 5
	exit 1
}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# /tmp stays the host's (writable through the overlay): a clone or build
# directory under the host's /tmp must be visible in here.
# The guest kernel's modules, not the host's, under /lib/modules.
mkdir -p /lib/modules
mount --bind "$RDMA_GUEST_KMODS" /lib/modules || { echo "rdma-guest: no modules dir" >"$io/err"; finish 125; }
{
	modprobe -a rdma_rxe ib_uverbs rdma_ucm &&
		ip link set lo up &&
		ip link set eth0 up &&
		ip addr add "$RDMA_GUEST_IP/24" dev eth0 &&
		rdma link add rxe0 type rxe netdev eth0
} >"$io/setup.log" 2>&1 || { cp "$io/setup.log" "$io/err"; finish 125; }
for _ in $(seq 50); do
	[ -e /dev/infiniband/uverbs0 ] && break
	sleep 0.1
done
ulimit -l unlimited
ulimit -n 65536
hostname rdma-guest
export HOME=/root TMPDIR=/tmp
# shellcheck disable=SC1091
[ -f "$io/env" ] && . "$io/env"
cd "$RDMA_GUEST_CWD" 2>/dev/null || cd /tmp
bash "$io/cmd" >"$io/out" 2>"$io/err" </dev/null
finish $?
