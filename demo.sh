#!/usr/bin/env bash
# ferry's main job, from a fresh Debian 12 machine: installs what it needs,
# builds, starts two ferry daemons (a "source host" and a "destination host"
# on this machine) and live-migrates a running demo VM between them.
#
# The demo VM has 1 GiB of RAM filled with generated data and runs a tiny
# guest that keeps rewriting 32 MiB of its memory in a checkable pattern
# while it migrates. At the end the script verifies, on the destination:
#   - the VM runs there (its heartbeat advances) and no longer on the source,
#   - the generated RAM arrived byte for byte,
#   - the memory the guest kept dirtying is consistent (ramcheck pattern).
# Options: --ram SIZE (default 1G), --channels N (multifd, default 0),
#          --no-bootstrap, --keep (leave the work dir and logs).
set -uo pipefail
here=$(dirname "$(readlink -f "$0")")
cd "$here"

ram=1G channels=0 bootstrap=1 keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--ram) ram=${2:?--ram needs a size}; shift 2 ;;
	--channels) channels=${2:?--channels needs a number}; shift 2 ;;
	--no-bootstrap) bootstrap=0; shift ;;
	--keep) keep=1; shift ;;
	-h|--help) sed -n '2,15p' "$0"; exit 0 ;;
	*) echo "demo.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
	esac
done
case "$channels" in ''|*[!0-9]*) echo "demo.sh: --channels must be a number" >&2; exit 2 ;; esac

if [ "$bootstrap" = 1 ]; then
	./bootstrap.sh || { echo "demo.sh: bootstrap failed" >&2; exit 1; }
fi
if [ ! -f build/build.ninja ]; then
	meson setup build >/dev/null || { echo "demo.sh: meson setup failed" >&2; exit 1; }
fi
ninja -C build >/dev/null || { echo "demo.sh: build failed (run: ninja -C build)" >&2; exit 1; }

FERRYD=$here/build/controlplane/ferryd
FERRYCTL=$here/build/controlplane/ferryctl
RAMCHECK=$here/build/tests/ramcheck
DIRTY_BIN=$here/build/tests/dirty.bin
export RAMCHECK

. tests/lib/qemu.sh
[ "$keep" = 1 ] && export QEMU_KEEP=1
qemu_init
work=$QEMU_DIR
daemon_pids=()
demo_cleanup() {
	local p
	for p in "${daemon_pids[@]+"${daemon_pids[@]}"}"; do kill "$p" 2>/dev/null; done
	# only the daemons: the QEMUs' wrappers are qemu_cleanup's to stop
	for p in "${daemon_pids[@]+"${daemon_pids[@]}"}"; do wait "$p" 2>/dev/null; done
	qemu_cleanup
}
trap demo_cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 30000))
		ss -ltnH "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return 0; }
	done
	return 1
}

step() { printf '\n== %s\n' "$*"; }

step "starting two ferry daemons (source and destination host)"
mkdir -p "$work/src-host" "$work/dst-host"
port_src=$(free_port) port_dst=$(free_port)
# The daemons' control connection is TLS: both "hosts" share a pre-shared
# key (psktool's IDENTITY:HEXKEY format, readable by its owner only).
psk=$work/ferry.psk
(umask 077 && printf 'ferry-demo:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')" >"$psk") || exit 1
# Each daemon stands for a host of its own: two host identities, or ferry
# refuses the migration as one to the same host.
"$FERRYD" --admin "$work/src-host/ferryd.sock" --listen "127.0.0.1:$port_src" --allow-dir "$work" --tls-psk "$psk" \
	--host-uuid "$(cat /proc/sys/kernel/random/uuid)" \
	2>"$work/src-host/ferryd.log" &
daemon_pids+=($!)
"$FERRYD" --admin "$work/dst-host/ferryd.sock" --listen "127.0.0.1:$port_dst" --allow-dir "$work" --tls-psk "$psk" \
	--host-uuid "$(cat /proc/sys/kernel/random/uuid)" \
	2>"$work/dst-host/ferryd.log" &
daemon_pids+=($!)
for s in src-host dst-host; do
	for _ in $(seq 50); do "$FERRYCTL" --admin "$work/$s/ferryd.sock" ping >/dev/null 2>&1 && break; sleep 0.1; done
	"$FERRYCTL" --admin "$work/$s/ferryd.sock" ping >/dev/null || { cat "$work/$s/ferryd.log"; exit 1; }
	echo "   $s: $(sed -n 's/.*ready: //p' "$work/$s/ferryd.log")"
done

step "generating $ram of guest RAM and booting the demo VM (TCG)"
src_ram=$QEMU_RAM_DIR/ferry-demo-$$-src.ram
QEMU_CLEANUP_FILES+=("$src_ram")
fill_random "$src_ram" "$ram" || exit 1
# Each VM gets its own copy of the boot disk: QEMU locks its image, and the
# destination needs the same device configuration as the source.
cp "$DIRTY_BIN" "$work/src-disk.bin" && cp "$DIRTY_BIN" "$work/dst-disk.bin" || exit 1
qemu_start src --ram "$ram" --ram-file "$src_ram" --boot "$work/src-disk.bin" || exit 1
qemu_start dst --ram "$ram" --incoming --prealloc --boot "$work/dst-disk.bin" || exit 1
wait_heartbeat "$src_ram" 3 60 >/dev/null || { echo "demo.sh: the demo guest did not start" >&2; exit 1; }
echo "   source VM running, rewriting 32 MiB of its memory $(( $(heartbeat_done "$src_ram") )) times so far"

step "migrating through ferry ($( [ "$channels" = 0 ] && echo "one stream" || echo "main + $channels multifd channels"))"
"$FERRYCTL" --admin "$work/src-host/ferryd.sock" migrate --src-qmp "$(qemu_sock src)" \
	--dst-qmp "$(qemu_sock dst)" --to "127.0.0.1:$port_dst" --channels "$channels"
rc=$?
if [ $rc -ne 0 ]; then
	echo "demo.sh: migration failed (ferryctl exit $rc); daemon logs:" >&2
	tail -5 "$work/src-host/ferryd.log" "$work/dst-host/ferryd.log" >&2
	exit 1
fi

step "verifying the result"
fail=0
# ferry ends the source QEMU once the destination runs the VM (v3 Confirm)
for _ in $(seq 50); do qemu_alive src || break; sleep 0.1; done
if qemu_alive src; then src_state=$(qmp_get "$(qemu_sock src)" query-status status); else src_state="ended"; fi
dst_state=$(qmp_get "$(qemu_sock dst)" query-status status)
echo "   source VM: $src_state, destination VM: $dst_state"
[ "$dst_state" = running ] || { echo "   FAIL: the destination VM is not running"; fail=1; }
[ "$src_state" = ended ] || { echo "   FAIL: the source QEMU is still there ($src_state)"; fail=1; }
dst_ram=$(qemu_ramfile dst)
w0=$(heartbeat_words "$dst_ram")
sleep 1
w1=$(heartbeat_words "$dst_ram")
if [ "$w1" -gt "$w0" ]; then
	echo "   the guest keeps running on the destination ($((w1 - w0)) words written in 1 s)"
else
	echo "   FAIL: the guest's heartbeat does not advance on the destination"; fail=1
fi
qmp "$(qemu_sock dst)" stop >/dev/null
# Generated data above the guest's working area (64 MiB .. end) must be identical.
bytes=$(size_bytes "$ram")
skip=$((64 << 20))
if [ "$bytes" -gt "$skip" ]; then
	if cmp --ignore-initial="$skip:$skip" --bytes=$((bytes - skip)) "$src_ram" "$dst_ram" >/dev/null; then
		echo "   generated RAM identical on both hosts ($(( (bytes - skip) >> 20 )) MiB compared byte for byte)"
	else
		echo "   FAIL: generated RAM differs between source and destination"; fail=1
	fi
fi
if "$RAMCHECK" pattern "$dst_ram" >"$work/pattern.txt" 2>&1; then
	echo "   the memory the guest was dirtying is consistent ($(head -1 "$work/pattern.txt"))"
else
	echo "   FAIL: dirtied memory is inconsistent: $(cat "$work/pattern.txt")"; fail=1
fi
if [ $fail = 0 ]; then
	printf '\ndemo: OK - the VM was live-migrated through ferry and verified\n'
else
	printf '\ndemo: FAILED (logs in %s)\n' "$work"
	export QEMU_KEEP=1
fi
exit $fail
