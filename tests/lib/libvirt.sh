# shellcheck shell=bash
# tests/lib/libvirt.sh - two real libvirtd instances ("A" and "B") on this one
# machine, each in its own private mount namespace, and ferry tunnels that
# carry a `virsh migrate --p2p --copy-storage-all` between them (the libvirt
# connection, the migration stream and the NBD disk copy, each a unix socket
# stream). Builds on tests/lib/ferry.sh (sourced here).
#
#   . tests/lib/libvirt.sh
#   lv_init --timeout 150        # SKIP (77) without root/libvirtd/virsh/unshare;
#                                # ferry_init + cleanup chain (lv_cleanup)
#   lv_start_pair                # libvirtd A and B, ferryd a (host A) and b (host B)
#   lv_make_disk A vm.qcow2 128M "$DISKGUEST_BIN" qcow2 [ORIG.raw]  # guest + random data
#   lv_precreate_disk B vm.qcow2 qcow2 128M                  # empty target, same size
#   lv_define_start A vm vm.qcow2 qcow2
#   lv_tunnels_open A B 1        # three tunnels on ferryd a: libvirt, migration (N streams), NBD
#   lv_migrate A B vm 90 [virsh migrate options...]  # -> LV_MIG_RC, LV_MIG_MS, LV_MIG_OUT
#   lv_tunnels_close             # -> LV_TUNNEL_SUMMARY, lv_tunnel_opened libvirt|migration|nbd
#   lv_hb A vm                   # the guest's heartbeat block (lv_hb_count, lv_hb_advances)
#
# Instance X (A or B) lives in $QEMU_DIR/hostX/{run,etc,lib,log,cache}; inside
# its namespace these are bind-mounted over /run, /etc/libvirt,
# /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, so the same path
# (/var/lib/libvirt/images/vm.qcow2, /run/ferry/nbd.sock) names a different
# file on each "host", as on two machines. From the root namespace (where the
# tests, virsh and both ferryd run) instance X's /run is ${LV_RUN[X]} and its
# /var/lib/libvirt is ${LV_ROOT[X]}/lib. virsh reaches X with ${LV_URI[X]}.
#
# On exit (pass, fail or signal) every domain is destroyed, each libvirtd is
# stopped and every process left in its mount namespace (QEMU) killed; the
# mounts vanish with the namespaces; disk images are removed, logs kept on
# failure (with the work dir, see qemu.sh).
#
# Environment (all optional, plus those of ferry.sh):
#   LIBVIRTD VIRSH     binaries (default: from PATH, /usr/sbin for libvirtd)
#   LV_LIFETIME        hard cap on each libvirtd's life in s (default FERRY_LIFETIME)
#   LV_VIRSH_TIMEOUT   limit for short virsh commands (default 60)
#   LV_START_TIMEOUT   how long a libvirtd may take to answer (default 120)
#   LV_DEBUG=1         libvirtd logs at debug level for qemu/rpc (large)
#   LV_TUNNEL_MODE=standing  open standing tunnels (tunnel-open --standing: a
#                      session per connection) instead of --streams N ones
#   DISKGUEST_BIN DISKGUEST_W_BIN  the guests (default: build dir, else built here)

_lv_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=ferry.sh
. "$_lv_lib_dir/ferry.sh"

LIBVIRTD=${LIBVIRTD:-}
VIRSH=${VIRSH:-virsh}
LV_LIFETIME=${LV_LIFETIME:-$FERRY_LIFETIME}
LV_VIRSH_TIMEOUT=${LV_VIRSH_TIMEOUT:-60}
LV_START_TIMEOUT=${LV_START_TIMEOUT:-120}
DISKGUEST_BIN=${DISKGUEST_BIN:-}
DISKGUEST_W_BIN=${DISKGUEST_W_BIN:-}

declare -gA LV_ROOT=()   # instance -> its directory
declare -gA LV_RUN=()    # instance -> root-namespace view of its /run
declare -gA LV_URI=()    # instance -> virsh URI
declare -gA LV_PID=()    # instance -> pid of the `timeout` wrapping libvirtd
declare -gA LV_NS=()     # instance -> mount namespace (mnt:[inode])
LV_TUNNELS=()            # "daemon:id:what" of the open tunnels
LV_MIG_N=0
LV_MIG_PID=""

# Inside each instance: where the ferry sockets are, as libvirt sees them.
LV_FERRY_DIR=/run/ferry
LV_IMAGES=/var/lib/libvirt/images

# lv_init [--timeout S]: skip (77) unless root with libvirtd, virsh, unshare,
# qemu-img and mount namespaces; then ferry_init, the cleanup chain, the
# janitor and the guests.
lv_init() {
	[ "$(id -u)" = 0 ] || ferry_skip "needs root (libvirtd, mount namespaces)"
	if [ -z "$LIBVIRTD" ]; then
		LIBVIRTD=$(command -v libvirtd || { [ -x /usr/sbin/libvirtd ] && echo /usr/sbin/libvirtd; })
	fi
	[ -n "$LIBVIRTD" ] && [ -x "$LIBVIRTD" ] ||
		ferry_skip "libvirtd not found (./bootstrap.sh installs libvirt-daemon-system libvirt-daemon-driver-qemu)"
	command -v "$VIRSH" >/dev/null || ferry_skip "virsh not found (./bootstrap.sh installs libvirt-clients)"
	local t
	for t in unshare mount qemu-img setsid as ld; do
		command -v "$t" >/dev/null || ferry_skip "$t not found"
	done
	unshare -m --propagation private true 2>/dev/null ||
		ferry_skip "cannot create a mount namespace here (unshare -m failed)"
	ferry_init "$@"
	trap 'lv_cleanup' EXIT
	_lv_janitor_start
	lv_need_guests
}

# The janitor: a detached process that outlives this test if it is killed
# with SIGKILL (no EXIT trap runs then) and kills what the test left in the
# instances' namespaces (libvirtd and the QEMUs it started, which no
# `timeout` bounds). lv_cleanup stops it first on every ordinary exit.
_lv_janitor_pid=""
_lv_janitor_start() {
	local main=$$
	setsid bash -c '
		main=$1 dir=$2
		trap "" INT TERM HUP
		while kill -0 "$main" 2>/dev/null; do sleep 1; done
		'"$(declare -f _lv_ns_pids)"'
		for f in "$dir"/host*/ns; do
			[ -r "$f" ] || continue
			for p in $(_lv_ns_pids "$(cat "$f")" "${f%/ns}"); do kill -KILL "$p" 2>/dev/null; done
			rm -rf "${f%/ns}/lib/images" "${f%/ns}/cache"
		done
		rm -f "$dir"/*.raw' _ "$main" "$QEMU_DIR" </dev/null >/dev/null 2>&1 &
	_lv_janitor_pid=$!
}

# lv_need_guests: DISKGUEST_BIN (heartbeat only) and DISKGUEST_W_BIN (also
# writes the disk): from the build dir when newer than the source, else
# assembled into the work dir.
lv_need_guests() {
	local v name w out src=$FERRY_ROOT/tests/guest/diskguest.S
	for v in DISKGUEST_BIN DISKGUEST_W_BIN; do
		if [ "$v" = DISKGUEST_BIN ]; then name=diskguest w=0; else name=diskguest-w w=1; fi
		if [ -z "${!v}" ]; then
			out=$FERRY_BUILD/tests/$name.bin
			if ! [ -r "$out" ] || [ "$src" -nt "$out" ]; then
				out=$QEMU_DIR/guest/$name.bin
				mkdir -p "$QEMU_DIR/guest"
				as --32 --defsym DISK_WRITES=$w -o "$out.o" "$src" &&
					ld -m elf_i386 -Ttext 0x7c00 -e _start --oformat binary -o "$out" "$out.o" ||
					die "cannot build $out from $src (as/ld from binutils)"
			fi
			printf -v "$v" '%s' "$out"
		fi
		[ "$(stat -c %s "${!v}" 2>/dev/null)" = 512 ] || die "$v=${!v} is not a 512-byte boot sector"
	done
}

# lv_virsh X ARGS...: virsh against instance X, bounded in time.
lv_virsh() {
	local x=$1
	shift
	timeout -k 2 "$LV_VIRSH_TIMEOUT" "$VIRSH" -q -c "${LV_URI[$x]}" "$@"
}

# lv_start X: start libvirtd instance X (A or B) and wait until it answers.
lv_start() {
	local x=$1 root uuid log t0 deadline pid
	root=$QEMU_DIR/host$x
	LV_ROOT[$x]=$root
	LV_RUN[$x]=$root/run
	LV_URI[$x]="qemu+unix:///system?socket=$root/run/libvirt/libvirt-sock"
	log=$QEMU_DIR/libvirtd-$x.log
	mkdir -p "$root"/{run,etc,lib,log,cache} "$root/run/ferry" "$root/lib/images" "$root/etc/qemu" || return 1
	uuid=$(cat /proc/sys/kernel/random/uuid)
	{
		echo "# libvirtd instance $x of a ferry test (tests/lib/libvirt.sh)"
		echo "host_uuid = \"$uuid\""
		echo 'auth_unix_rw = "none"'
		echo 'auth_unix_ro = "none"'
		echo 'unix_sock_rw_perms = "0700"'
		echo 'unix_sock_ro_perms = "0700"'
		if [ -n "${LV_DEBUG:-}" ]; then
			echo 'log_filters = "1:qemu 1:rpc 3:util 3:conf 3:object 3:event"'
			echo 'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"'
		else
			echo 'log_outputs = "3:stderr"'
		fi
	} >"$root/etc/libvirtd.conf"
	cat >"$root/etc/qemu.conf" <<-'EOF'
		# precautions for a libvirtd without systemd in a private mount namespace
		user = "root"
		group = "root"
		dynamic_ownership = 0
		remember_owner = 0
		security_driver = "none"
		cgroup_controllers = [ ]
		namespaces = [ ]
		stdio_handler = "file"
	EOF
	# libvirtd itself (no --fork) is the child of `timeout`: unshare execs
	# bash, which mounts and execs libvirtd.
	echo "=== $(date +%T.%3N) libvirtd $x: root $root, host_uuid $uuid" >"$log"
	t0=$(now_ms)
	timeout -k 5 "$LV_LIFETIME" unshare -m --propagation private -- bash -c '
		set -e
		r=$1 d=$2
		mount --bind "$r/run" /run
		mount --bind "$r/etc" /etc/libvirt
		mount --bind "$r/lib" /var/lib/libvirt
		mount --bind "$r/log" /var/log/libvirt
		mount --bind "$r/cache" /var/cache/libvirt
		exec "$d" --pid-file /run/libvirtd.pid --config /etc/libvirt/libvirtd.conf' \
		_ "$root" "$LIBVIRTD" </dev/null >>"$log" 2>&1 &
	LV_PID[$x]=$!
	deadline=$((t0 + LV_START_TIMEOUT * 1000))
	while :; do
		kill -0 "${LV_PID[$x]}" 2>/dev/null || {
			wait "${LV_PID[$x]}" 2>/dev/null
			unset "LV_PID[$x]"
			echo "lv_start: libvirtd $x exited during start-up; log:" >&2
			sed 's/^/  | /' "$log" >&2
			return 1
		}
		pid=$(pgrep -P "${LV_PID[$x]}" 2>/dev/null | head -n 1)
		if [ -n "$pid" ] && [ -z "${LV_NS[$x]:-}" ]; then
			local ns
			ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)
			if [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/self/ns/mnt)" ]; then
				LV_NS[$x]=$ns
				echo "$ns" >"$root/ns" # for the janitor
			fi
		fi
		# `capabilities` answers only once the QEMU binaries are probed
		if [ -S "$root/run/libvirt/libvirt-sock" ] && [ -n "${LV_NS[$x]:-}" ] &&
			timeout 60 "$VIRSH" -q -c "${LV_URI[$x]}" capabilities >/dev/null 2>&1; then
			break
		fi
		if [ "$(now_ms)" -gt "$deadline" ]; then
			echo "lv_start: libvirtd $x does not answer after ${LV_START_TIMEOUT}s; log:" >&2
			sed 's/^/  | /' "$log" >&2
			return 1
		fi
		sleep 0.2
	done
	log "libvirtd $x ready in $(($(now_ms) - t0)) ms (pid $pid, ${LV_NS[$x]})"
}

# lv_setup_on_a TIMEOUT GUEST_BIN FILE FORMAT: lv_init --timeout TIMEOUT,
# the libvirtd pair with their ferryd (T_READY: the seconds that took), and
# domain vm defined and started on A from a DISK_SIZE disk FILE (FORMAT)
# booting GUEST_BIN, whose content is also kept raw in ORIG. The common
# opening of the libvirt migration tests.
lv_setup_on_a() {
	local timeout=$1 guest=$2 file=$3 format=$4
	lv_init --timeout "$timeout"
	lv_start_pair || ferry_fail "starting libvirtd A and B and their ferryd failed"
	T_READY=$(ferry_elapsed)
	ORIG=$QEMU_DIR/orig.raw
	lv_make_disk A "$file" "$DISK_SIZE" "$guest" "$format" "$ORIG" || ferry_fail "making the disk failed"
	lv_define_start A vm "$file" "$format" || ferry_fail "defining/starting the domain on A failed"
}

# lv_start_pair: libvirtd A, then B (B reuses A's probed QEMU capabilities,
# which halves the start-up), and ferryd a (for host A) and b (for host B);
# each ferryd lets peers name sockets only in its own host's /run/ferry and
# /run/libvirt.
lv_start_pair() {
	lv_start A || return 1
	mkdir -p "$QEMU_DIR/hostB/cache"
	cp -a "${LV_ROOT[A]}/cache/qemu" "$QEMU_DIR/hostB/cache/" 2>/dev/null
	lv_start B || return 1
	local x
	for x in A B; do
		ferry_start_daemon "${x,,}" --allow-dir "${LV_RUN[$x]}/ferry" --allow-dir "${LV_RUN[$x]}/libvirt" || return 1
	done
}

# lv_ns_pids X: every process in instance X's mount namespace: the same
# namespace and X's /run bind mount in its mount table (namespace numbers are
# reused once a namespace is gone).
lv_ns_pids() { _lv_ns_pids "${LV_NS[$1]:-}" "${LV_ROOT[$1]}"; }
_lv_ns_pids() {
	local ns=$1 mark p
	[ -n "$ns" ] || return 0
	mark="${2#"${2%/*/*}"/}/run /run " # e.g. "ferry-qemu.XXXXXX/hostA/run /run "
	for p in /proc/[0-9]*; do
		[ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] && grep -qF -- "$mark" "$p/mountinfo" 2>/dev/null &&
			echo "${p#/proc/}"
	done
}

# lv_stop X: destroy X's domains, stop libvirtd, kill what is left in its
# namespace (QEMUs it started).
lv_stop() {
	local x=$1 t dom deadline p
	t=${LV_PID[$x]:-}
	[ -n "$t" ] || return 0
	if kill -0 "$t" 2>/dev/null; then
		for dom in $(LV_VIRSH_TIMEOUT=10 lv_virsh "$x" list --name 2>/dev/null); do
			LV_VIRSH_TIMEOUT=10 lv_virsh "$x" destroy "$dom" >/dev/null 2>&1
		done
		kill -TERM "$t" 2>/dev/null
		deadline=$(($(now_ms) + 5000))
		while kill -0 "$t" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
			sleep 0.05
		done
	fi
	for p in $(lv_ns_pids "$x"); do
		kill -KILL "$p" 2>/dev/null
	done
	kill -KILL "$t" 2>/dev/null
	wait "$t" 2>/dev/null
	unset "LV_PID[$x]"
}

# lv_dump_logs: libvirt's per-domain QEMU logs (libvirtd's own stderr is in
# $QEMU_DIR/libvirtd-X.log, which ferry_dump_logs prints).
lv_dump_logs() {
	local x f
	for x in "${!LV_ROOT[@]}"; do
		for f in "${LV_ROOT[$x]}"/log/qemu/*.log "${LV_ROOT[$x]}"/log/libvirtd.log; do
			[ -s "$f" ] || continue
			echo "--- $x: $f" >&2
			tail -n 25 "$f" >&2
		done
	done
	for f in "$QEMU_DIR"/virsh-migrate-*.out; do
		[ -s "$f" ] || continue
		echo "--- $f ($(cat "$f.cmd" 2>/dev/null))" >&2
		tail -n 10 "$f" >&2
	done
}

# lv_cleanup: EXIT trap: background virsh, libvirtd instances, disk images;
# then ferry_cleanup (ferry daemons, work dir).
lv_cleanup() {
	local rc=$? x
	trap - EXIT
	if [ -n "$_lv_janitor_pid" ]; then
		kill -KILL "$_lv_janitor_pid" 2>/dev/null
		wait "$_lv_janitor_pid" 2>/dev/null
	fi
	if [ -n "$LV_MIG_PID" ] && kill -0 "$LV_MIG_PID" 2>/dev/null; then
		kill -KILL "$LV_MIG_PID" 2>/dev/null
		wait "$LV_MIG_PID" 2>/dev/null
	fi
	[ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && lv_dump_logs
	for x in "${!LV_PID[@]}"; do
		lv_stop "$x"
	done
	for x in "${!LV_ROOT[@]}"; do
		rm -rf -- "${LV_ROOT[$x]}/lib/images" "${LV_ROOT[$x]}/cache"
	done
	rm -f "$QEMU_DIR"/*.img "$QEMU_DIR"/*.qcow2 "$QEMU_DIR"/*.raw 2>/dev/null
	(exit "$rc")
	ferry_cleanup
}

# lv_img X NAME: root-namespace path of instance X's /var/lib/libvirt/images/NAME.
lv_img() { echo "${LV_ROOT[$1]}/lib/images/$2"; }

# lv_make_disk X NAME SIZE BOOTBIN FORMAT [ORIG]: a disk of SIZE random
# bytes whose sector 0 is BOOTBIN, in instance X's images. With ORIG, a raw
# copy of that content is kept there (to compare against later).
lv_make_disk() {
	local x=$1 name=$2 size=$3 boot=$4 fmt=$5 orig=${6:-} img raw
	img=$(lv_img "$x" "$name")
	raw=${orig:-$img.raw}
	fill_random "$raw" "$size" || return 1
	dd if="$boot" of="$raw" bs=512 count=1 conv=notrunc status=none || return 1
	if [ "$fmt" = raw ] && [ -z "$orig" ]; then
		mv "$raw" "$img"
	else
		qemu-img convert -q -f raw -O "$fmt" "$raw" "$img" || return 1
		[ -n "$orig" ] || rm -f "$raw"
	fi
}

# lv_precreate_disk X NAME FORMAT SIZE: the empty target image of a
# --copy-storage-all migration (libvirt wants it to exist, same size).
lv_precreate_disk() {
	local img
	img=$(lv_img "$1" "$2")
	rm -f "$img"
	qemu-img create -q -f "$3" "$img" "$4"
}

# lv_domain_xml DOM IMAGE FORMAT [BUS=virtio]: a TCG domain, 128 MiB, one
# disk (/var/lib/libvirt/images/IMAGE, booted), no network, no display.
lv_domain_xml() {
	local dom=$1 img=$2 fmt=$3 bus=${4:-virtio} dev=vda
	[ "$bus" = ide ] && dev=hda
	cat <<-EOF
		<domain type='qemu'>
		  <name>$dom</name>
		  <memory unit='MiB'>128</memory>
		  <vcpu>1</vcpu>
		  <os>
		    <type arch='x86_64' machine='pc'>hvm</type>
		    <boot dev='hd'/>
		  </os>
		  <on_poweroff>destroy</on_poweroff>
		  <on_reboot>destroy</on_reboot>
		  <on_crash>destroy</on_crash>
		  <devices>
		    <emulator>/usr/bin/qemu-system-x86_64</emulator>
		    <disk type='file' device='disk'>
		      <driver name='qemu' type='$fmt' cache='none'/>
		      <source file='$LV_IMAGES/$img'/>
		      <target dev='$dev' bus='$bus'/>
		    </disk>
		    <controller type='usb' model='none'/>
		    <memballoon model='none'/>
		  </devices>
		</domain>
	EOF
}

# lv_define_start X DOM IMAGE FORMAT [BUS]: define DOM on X (persistent) and start it.
lv_define_start() {
	local x=$1 dom=$2 xml=$QEMU_DIR/$2.xml
	lv_domain_xml "$dom" "$3" "$4" "${5:-virtio}" >"$xml"
	lv_virsh "$x" define "$xml" >/dev/null || return 1
	lv_virsh "$x" start "$dom" >/dev/null
}

# lv_state X DOM: the domain state on X ("running", "paused", "shut off"),
# or "absent" when X does not know DOM.
lv_state() {
	local s
	s=$(lv_virsh "$1" domstate "$2" 2>/dev/null) || { echo absent; return 0; }
	echo "$s" | head -n 1
}

# lv_defined X DOM: true when X knows DOM (running or not).
lv_defined() {
	local names
	names=$(lv_virsh "$1" list --all --name 2>/dev/null)
	grep -qxF -- "$2" <<<"$names"
}

# lv_persistent X DOM: true when DOM is a persistent domain on X.
lv_persistent() {
	local info
	info=$(lv_virsh "$1" dominfo "$2" 2>/dev/null)
	grep -Eq '^Persistent: +yes' <<<"$info"
}

# lv_qemu_pids X: the QEMU processes in instance X's namespace.
lv_qemu_pids() {
	local p
	for p in $(lv_ns_pids "$1"); do
		case $(cat "/proc/$p/comm" 2>/dev/null) in qemu-system-*) echo "$p" ;; esac
	done
}

# lv_wait_no_qemu X TIMEOUT: wait until no QEMU runs in X's namespace.
lv_wait_no_qemu() {
	local deadline=$(($(now_ms) + $2 * 1000))
	while [ -n "$(lv_qemu_pids "$1")" ]; do
		[ "$(now_ms)" -gt "$deadline" ] && return 1
		sleep 0.2
	done
}

# lv_running_names X: names of the running domains on X.
lv_running_names() { lv_virsh "$1" list --name --state-running 2>/dev/null | sed '/^$/d'; }

# lv_hb X DOM: the guest's heartbeat block (tests/guest/diskguest.S) as six
# decimal numbers: count magic done errs stamp lasterr.
lv_hb() {
	local out
	out=$(lv_virsh "$1" qemu-monitor-command --hmp "$2" 'xp /6wx 0x7e00') || return 1
	python3 - "$out" <<-'PY'
		import re, sys
		words = []
		for line in sys.argv[1].splitlines():
		    if ":" in line:
		        words += [int(w, 16) for w in re.findall(r"0x[0-9a-fA-F]+", line.split(":", 1)[1])]
		if len(words) != 6:
		    sys.exit("lv_hb: cannot parse %r" % sys.argv[1])
		print(*words)
	PY
}

# lv_hb_count X DOM: the heartbeat counter alone (fails unless the magic is set).
lv_hb_count() {
	local w
	w=($(lv_hb "$1" "$2")) || return 1
	[ "${w[1]}" = $((0x44595246)) ] || { echo "lv_hb_count: no guest magic on $1/$2 (${w[*]})" >&2; return 1; }
	echo "${w[0]}"
}

# lv_wait_hb X DOM MIN TIMEOUT: wait until the heartbeat is at least MIN; prints it.
lv_wait_hb() {
	local deadline=$(($(now_ms) + $4 * 1000)) c
	while :; do
		c=$(lv_hb_count "$1" "$2" 2>/dev/null) && [ "$c" -ge "$3" ] && { echo "$c"; return 0; }
		[ "$(now_ms)" -gt "$deadline" ] && return 1
		sleep 0.2
	done
}

# lv_hb_advances X DOM [SECONDS=1]: true when the heartbeat moves within SECONDS.
lv_hb_advances() {
	local a b
	a=$(lv_hb_count "$1" "$2") || return 1
	sleep "${3:-1}"
	b=$(lv_hb_count "$1" "$2") || return 1
	[ "$b" -gt "$a" ] || { echo "lv_hb_advances: $1/$2 heartbeat $a -> $b" >&2; return 1; }
}

# lv_tunnels_open FROM TO MIG_STREAMS [LIBVIRT_STREAMS=1] [NBD_STREAMS=1]:
# on FROM's ferryd, three tunnels to TO's ferryd, for a migration FROM -> TO:
#   FROM:/run/ferry/libvirt.sock   -> TO's libvirt-sock
#   FROM:/run/ferry/migration.sock -> TO:/run/ferry/migration.sock (TO's QEMU listens)
#   FROM:/run/ferry/nbd.sock       -> TO:/run/ferry/nbd.sock (TO's NBD server)
lv_tunnels_open() {
	local from=$1 to=$2 fd=${1,,} out id what listen target n
	local -a spec=("libvirt ${LV_RUN[$from]}/ferry/libvirt.sock ${LV_RUN[$to]}/libvirt/libvirt-sock ${4:-1}"
		"migration ${LV_RUN[$from]}/ferry/migration.sock ${LV_RUN[$to]}/ferry/migration.sock $3"
		"nbd ${LV_RUN[$from]}/ferry/nbd.sock ${LV_RUN[$to]}/ferry/nbd.sock ${5:-1}")
	local s
	local -a size
	for s in "${spec[@]}"; do
		read -r what listen target n <<<"$s"
		size=(--streams "$n")
		[ "${LV_TUNNEL_MODE:-}" = standing ] && size=(--standing)
		out=$(ferry_ctl "$fd" tunnel-open --to "${FERRY_LISTEN[${2,,}]}" --listen "$listen" --target "$target" \
			"${size[@]}") || { echo "lv_tunnels_open: $what tunnel: $out" >&2; return 1; }
		id=$(echo "$out" | json_field tunnel) || { echo "lv_tunnels_open: no tunnel id in: $out" >&2; return 1; }
		LV_TUNNELS+=("$fd:$id:$what:$n")
	done
}

# lv_tunnels_close: close every open tunnel (call it directly, not in $(...):
# it sets variables). LV_TUNNEL_SUMMARY gets one line per tunnel ("what:
# streams opened/closed of allowed, bytes out/back, state[, error]") and
# LV_TUNNEL_STATS[what] the stats JSON ferryd returned.
declare -gA LV_TUNNEL_STATS=()
LV_TUNNEL_SUMMARY=""
lv_tunnels_close() {
	local t fd id what n out line rc=0
	LV_TUNNEL_SUMMARY=""
	LV_TUNNEL_STATS=()
	for t in "${LV_TUNNELS[@]}"; do
		IFS=: read -r fd id what n <<<"$t"
		if ! out=$(ferry_ctl "$fd" tunnel-close "$id" 2>&1); then
			LV_TUNNEL_SUMMARY+="$what: tunnel-close $id failed: $out"$'\n'
			rc=1
			continue
		fi
		LV_TUNNEL_STATS[$what]=$(echo "$out" | json_field stats)
		line=$(echo "$out" | python3 -c '
import json, sys
what, n = sys.argv[1], sys.argv[2]
s = json.load(sys.stdin)["stats"]
if s.get("standing"):
    print("%s: %d connections (standing tunnel), %d failed, %d bytes out, %d bytes back%s" % (what, s["connections"],
          s["failed"], s["tx_bytes"], s["rx_bytes"], (", error: " + s["last_error"]) if s["failed"] else ""))
else:
    print("%s: streams %d opened/%d closed of %s, %d bytes out, %d bytes back, %s%s" % (what, s["streams_opened"],
          s["streams_closed"], n, s["tx_bytes"], s["rx_bytes"], s["state"], (", error: " + s["error"]) if s["error"] else ""))
' "$what" "$n") || { line="$what: cannot read: $out"; rc=1; }
		LV_TUNNEL_SUMMARY+="$line"$'\n'
	done
	LV_TUNNELS=()
	return $rc
}

# lv_tunnel_opened WHAT: connections the last closed tunnel WHAT carried.
lv_tunnel_opened() {
	local st=${LV_TUNNEL_STATS[$1]:-}
	if [[ $st == *'"standing"'* ]]; then json_field connections <<<"$st"; else json_field streams_opened <<<"$st"; fi
}

# lv_migrate_start FROM TO DOM [virsh migrate options...]: start
# `virsh migrate --live --p2p --persistent --undefinesource --copy-storage-all`
# FROM -> TO through the tunnels (lv_tunnels_open FROM TO first) in the
# background. Sets LV_MIG_PID, LV_MIG_OUT, LV_MIG_T0.
lv_migrate_start() {
	local from=$1 to=$2 dom=$3
	shift 3
	LV_MIG_N=$((LV_MIG_N + 1))
	LV_MIG_OUT=$QEMU_DIR/virsh-migrate-$LV_MIG_N.out
	local -a cmd=("$VIRSH" -c "${LV_URI[$from]}" migrate --live --p2p --persistent --undefinesource
		--copy-storage-all "$dom" "qemu+unix:///system?socket=$LV_FERRY_DIR/libvirt.sock"
		--migrateuri "unix://$LV_FERRY_DIR/migration.sock" --disks-uri "unix://$LV_FERRY_DIR/nbd.sock" "$@")
	echo "${cmd[*]}" >"$LV_MIG_OUT.cmd"
	LV_MIG_T0=$(now_ms)
	"${cmd[@]}" </dev/null >"$LV_MIG_OUT" 2>&1 &
	LV_MIG_PID=$!
}

# lv_migrate_wait TIMEOUT: wait for it; sets LV_MIG_RC (124 after TIMEOUT s,
# when it is killed) and LV_MIG_MS. Returns LV_MIG_RC.
lv_migrate_wait() {
	ferry_wait_pid "$LV_MIG_PID" "$1" "lv_migrate_wait: virsh migrate"
	LV_MIG_RC=$?
	LV_MIG_MS=$(($(now_ms) - LV_MIG_T0))
	LV_MIG_PID=""
	return "$LV_MIG_RC"
}

# lv_migrate FROM TO DOM TIMEOUT [options...]: both of the above.
lv_migrate() {
	local from=$1 to=$2 dom=$3 tmo=$4
	shift 4
	lv_migrate_start "$from" "$to" "$dom" "$@"
	lv_migrate_wait "$tmo"
}

# lv_mig_report: virsh migrate's output, indented.
lv_mig_report() {
	sed 's/^/  virsh| /' "$LV_MIG_OUT" >&2
}
