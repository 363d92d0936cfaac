# shellcheck shell=bash
# tests/lib/ferry.sh - helpers for end-to-end tests that migrate QEMU guests
# through two ferry daemons. Builds on tests/lib/qemu.sh (sourced here).
#
#   . tests/lib/ferry.sh
#   ferry_init --shm 2G --timeout 90    # qemu_init + cleanup chain + watchdog;
#                                       # exits 77 (SKIP) when QEMU/python3/
#                                       # /dev/shm space are missing
#   ferry_need_ramcheck                 # RAMCHECK usable (built if needed)
#   ferry_need_dirty_bin                # DIRTY_BIN usable (built if needed)
#   ferry_start_daemons                 # daemons "a" (source host) and "b"
#                                       # (destination host); run dir = QEMU_DIR
#   qemu_start src ...; qemu_start dst ... --incoming
#   ferry_migrate src dst 120 --channels 2   # -> FERRY_MIG_RC, _OUT, _ERR, _MS
#
# Daemon "x" has its admin socket at $QEMU_DIR/x/admin.sock
# (FERRY_ADMIN[x]), control address FERRY_LISTEN[x] (127.0.0.1:PORT, a free
# random port), log $QEMU_DIR/ferryd-x.log. Its control connection is TLS
# with the test's pre-shared key ($QEMU_DIR/ferry.psk, made on first use)
# unless the caller passes its own --tls-psk, --tls-x509 or --insecure-no-tls
# (ferry_make_psk and ferry_make_x509 make other credentials). Every
# daemon, ferryctl and QEMU started through these helpers is stopped on exit
# (ferry_cleanup chains into qemu_cleanup); on a failing exit the logs are
# printed and the work dir is kept.
#
# Environment (all optional):
#   FERRY_BUILD     build dir (default: <repo>/build, from this file's place)
#   FERRYD FERRYCTL ferryd / ferryctl binaries (default $FERRY_BUILD/controlplane/...)
#   RAMCHECK        ramcheck binary (default $FERRY_BUILD/tests/ramcheck if
#                   present, else compiled from tests/tools/ramcheck.c into
#                   the work dir)
#   DIRTY_BIN       dirty.bin guest (default $FERRY_BUILD/tests/dirty.bin if
#                   present, else built with tests/guest/build.sh)
#   FERRY_TEST_TIMEOUT  hard limit for the whole test in seconds (watchdog;
#                   default: ferry_init --timeout, else 300)
#   FERRYCTL_TIMEOUT    limit for short ferryctl commands (default 30)
#   FERRY_KEEP=1    keep the work dir even on success (same as QEMU_KEEP=1)
#   plus the knobs of qemu.sh (QEMU_BIN, QEMU_RAM_DIR, QMP_VERBOSE, ...)

_ferry_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FERRY_ROOT=$(cd "$_ferry_lib_dir/../.." && pwd)
FERRY_BUILD=${FERRY_BUILD:-$FERRY_ROOT/build}
FERRYD=${FERRYD:-$FERRY_BUILD/controlplane/ferryd}
FERRYCTL=${FERRYCTL:-$FERRY_BUILD/controlplane/ferryctl}
RAMCHECK=${RAMCHECK:-}
DIRTY_BIN=${DIRTY_BIN:-}
FERRYCTL_TIMEOUT=${FERRYCTL_TIMEOUT:-30}
# orphans (test killed with SIGKILL) must not live for long
QEMU_LIFETIME=${QEMU_LIFETIME:-300}
FERRY_LIFETIME=${FERRY_LIFETIME:-$QEMU_LIFETIME}
[ -n "${FERRY_KEEP:-}" ] && QEMU_KEEP=1

# shellcheck source-path=SCRIPTDIR source=qemu.sh
. "$_ferry_lib_dir/qemu.sh"

declare -gA FERRY_PID=()     # daemon name -> pid of its `timeout` wrapper
declare -gA FERRY_ADMIN=()   # daemon name -> admin socket
declare -gA FERRY_LISTEN=()  # daemon name -> control HOST:PORT
declare -gA FERRY_LOG=()     # daemon name -> log file
declare -gA FERRY_HOST_UUID=() # daemon name -> its --host-uuid
declare -gA FERRY_NETNS=()    # daemon name -> network namespace to run it in (optional)
declare -gA FERRY_ADDR=()     # daemon name -> address it listens on (default 127.0.0.1)
FERRY_EXTRA_PIDS=()          # other helpers to kill on exit (listeners, ...)
FERRY_CLEANUP_DIRS=()        # extra directories removed on exit
FERRY_MIG_PID=""             # background ferryctl migrate, if any
FERRY_MIG_N=0
_ferry_watchdog_pid=""

ferry_skip() {
	echo "SKIP: $*"
	exit 77
}

# ferry_fail MSG: print the daemon and QEMU logs, then fail (exit 1).
ferry_fail() {
	_ferry_logs_dumped=1
	ferry_dump_logs
	die "$*"
}

# ferry_init [--shm SIZE] [--timeout SECONDS]: check what the test needs
# (skip with 77 when it cannot run here), create the work dir, install the
# cleanup trap and the watchdog.
ferry_init() {
	local shm=0 tmo=${FERRY_TEST_TIMEOUT:-}
	while [ $# -gt 0 ]; do
		case $1 in
		--shm) shm=$(size_bytes "$2") || return 1; shift 2 ;;
		--timeout) [ -n "${FERRY_TEST_TIMEOUT:-}" ] || tmo=$2; shift 2 ;;
		*) echo "ferry_init: unknown option $1" >&2; return 1 ;;
		esac
	done
	tmo=${tmo:-300}
	command -v "$QEMU_BIN" >/dev/null || ferry_skip "$QEMU_BIN not found"
	command -v python3 >/dev/null || ferry_skip "python3 not found (needed for QMP)"
	if [ "$shm" -gt 0 ]; then
		mkdir -p "$QEMU_RAM_DIR" 2>/dev/null
		local avail
		avail=$(df -B1 --output=avail "$QEMU_RAM_DIR" 2>/dev/null | tail -n 1 | tr -d ' ')
		[[ $avail =~ ^[0-9]+$ ]] || ferry_skip "cannot tell the free space in $QEMU_RAM_DIR"
		# leave some headroom for everything else using the tmpfs
		[ "$avail" -ge $((shm + 64 * 1024 * 1024)) ] ||
			ferry_skip "$QEMU_RAM_DIR has $((avail / 1048576)) MiB free, the test needs $((shm / 1048576)) MiB"
	fi
	[ -x "$FERRYD" ] || die "FERRYD=$FERRYD is not executable (build with: ninja -C $FERRY_BUILD)"
	[ -x "$FERRYCTL" ] || die "FERRYCTL=$FERRYCTL is not executable (build with: ninja -C $FERRY_BUILD)"
	qemu_init
	trap 'ferry_cleanup' EXIT
	# the watchdog: TERM the test (its trap cleans up), KILL it if that hangs
	local main=$$
	(
		trap - EXIT INT TERM
		for ((i = 0; i < tmo; i++)); do sleep 1; done
		echo "[$(date +%H:%M:%S.%3N)] FAIL: test exceeded its ${tmo}s limit (watchdog)" >&2
		kill -TERM "$main" 2>/dev/null
		for ((i = 0; i < 30; i++)); do sleep 1; done
		kill -KILL "$main" 2>/dev/null
	) </dev/null &
	_ferry_watchdog_pid=$!
	FERRY_T0=$(now_ms)
}

# ferry_elapsed: seconds since ferry_init, with ms.
ferry_elapsed() {
	local ms=$(($(now_ms) - FERRY_T0))
	printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# ferry_need_ramcheck: make RAMCHECK point at a working ramcheck.
ferry_need_ramcheck() {
	if [ -z "$RAMCHECK" ]; then
		if [ -x "$FERRY_BUILD/tests/ramcheck" ]; then
			RAMCHECK=$FERRY_BUILD/tests/ramcheck
		else
			local cc=${CC:-cc}
			command -v "$cc" >/dev/null || ferry_skip "no ramcheck built and no C compiler ($cc) to build it"
			RAMCHECK=$QEMU_DIR/ramcheck
			"$cc" -std=c11 -O2 -Wall -Wextra -o "$RAMCHECK" "$FERRY_ROOT/tests/tools/ramcheck.c" ||
				die "building ramcheck from tests/tools/ramcheck.c failed"
		fi
	fi
	[ -x "$RAMCHECK" ] || die "RAMCHECK=$RAMCHECK is not executable"
	export RAMCHECK
}

# ferry_need_dirty_bin: make DIRTY_BIN point at the dirty.bin boot payload.
ferry_need_dirty_bin() {
	if [ -z "$DIRTY_BIN" ]; then
		if [ -r "$FERRY_BUILD/tests/dirty.bin" ]; then
			DIRTY_BIN=$FERRY_BUILD/tests/dirty.bin
		else
			command -v as >/dev/null && command -v ld >/dev/null ||
				ferry_skip "no dirty.bin built and no binutils (as, ld) to build it"
			DIRTY_BIN=$("$FERRY_ROOT/tests/guest/build.sh" "$QEMU_DIR/guest") ||
				die "building dirty.bin with tests/guest/build.sh failed"
		fi
	fi
	[ -r "$DIRTY_BIN" ] || die "DIRTY_BIN=$DIRTY_BIN is not readable"
	# QEMU opens the boot image read-write and locks it: tests running in
	# parallel must not share one file. A private copy per test (its QEMUs
	# share it the way hosts share storage in a migration).
	if [ "$DIRTY_BIN" != "$QEMU_DIR/guest/dirty.bin" ]; then
		mkdir -p "$QEMU_DIR/guest"
		cp "$DIRTY_BIN" "$QEMU_DIR/guest/dirty.bin" || die "cannot copy $DIRTY_BIN"
		DIRTY_BIN=$QEMU_DIR/guest/dirty.bin
	fi
	export DIRTY_BIN
}

# ferry_free_port: print a TCP port in 20000-59999 nobody listens on now
# (a race with other tests is possible: ferry_start_daemon retries).
ferry_free_port() {
	local p i used
	used=$(ss -Htln 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)
	for ((i = 0; i < 100; i++)); do
		p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
		grep -qx "$p" <<<"$used" || { echo "$p"; return 0; }
	done
	echo "$p"
}

# ferry_pid NAME: pid of the ferryd process itself (the child of `timeout`)
ferry_pid() {
	local t=${FERRY_PID[$1]:-}
	[ -n "$t" ] || return 1
	pgrep -P "$t" 2>/dev/null | head -n 1
}

ferry_alive() {
	local t=${FERRY_PID[$1]:-}
	[ -n "$t" ] && kill -0 "$t" 2>/dev/null
}

# ferry_start_daemon NAME [extra ferryd args]: start one daemon with its admin
# socket in $QEMU_DIR/NAME/, run dir $QEMU_DIR (where qemu.sh puts the QMP
# sockets), control port random; waits until it answers ping.
ferry_start_daemon() {
	local name=$1
	shift
	local dir=$QEMU_DIR/$name log=$QEMU_DIR/ferryd-$name.log attempt port pid deadline
	mkdir -p "$dir"
	FERRY_ADMIN[$name]=$dir/admin.sock
	FERRY_LOG[$name]=$log
	# ferryd refuses to start without credentials for its control connection
	local -a tls=() a
	for a in "$@"; do
		case $a in --tls-psk | --tls-psk=* | --tls-x509 | --tls-x509=* | --insecure-no-tls) tls=(none) ;; esac
	done
	if [ ${#tls[@]} -eq 0 ]; then
		[ -f "$QEMU_DIR/ferry.psk" ] || ferry_make_psk "$QEMU_DIR/ferry.psk" || return 1
		tls=(--tls-psk "$QEMU_DIR/ferry.psk")
	else
		tls=()
	fi
	local host=${FERRY_ADDR[$name]:-127.0.0.1}
	local -a ns=()
	[ -n "${FERRY_NETNS[$name]:-}" ] && ns=(ip netns exec "${FERRY_NETNS[$name]}")
	for ((attempt = 1; attempt <= 8; attempt++)); do
		# FERRY_FIXED_PORT: restart a daemon where its peers expect it
		port=${FERRY_FIXED_PORT:-$(ferry_free_port)}
		FERRY_LISTEN[$name]=$host:$port
		echo "=== attempt $attempt: ${ns[*]} $FERRYD --admin $dir/admin.sock --listen $host:$port --run-dir $QEMU_DIR $*" >>"$log"
		# each daemon plays its own host: distinct host uuids (kept across restarts)
		FERRY_HOST_UUID[$name]=${FERRY_HOST_UUID[$name]:-$(cat /proc/sys/kernel/random/uuid)}
		timeout -k 5 "$FERRY_LIFETIME" "${ns[@]+"${ns[@]}"}" "$FERRYD" --admin "$dir/admin.sock" --listen "$host:$port" \
			--run-dir "$QEMU_DIR" --state-dir "$dir/state" --host-uuid "${FERRY_HOST_UUID[$name]}" "${tls[@]+"${tls[@]}"}" "$@" </dev/null >>"$log" 2>&1 &
		pid=$!
		FERRY_PID[$name]=$pid
		deadline=$(($(now_ms) + ${FERRY_START_TIMEOUT:-10} * 1000))
		while :; do
			if ! kill -0 "$pid" 2>/dev/null; then
				wait "$pid" 2>/dev/null
				unset "FERRY_PID[$name]"
				if grep -q "cannot listen on $host:$port" "$log"; then
					continue 2 # port taken meanwhile: try another
				fi
				echo "ferry_start_daemon: ferryd $name exited during startup; log:" >&2
				sed 's/^/  | /' "$log" >&2
				return 1
			fi
			if [ -S "$dir/admin.sock" ] &&
				timeout 5 "$FERRYCTL" --admin "$dir/admin.sock" ping >/dev/null 2>&1; then
				return 0
			fi
			if [ "$(now_ms)" -gt "$deadline" ]; then
				echo "ferry_start_daemon: ferryd $name does not answer ping after ${FERRY_START_TIMEOUT:-10}s; log:" >&2
				sed 's/^/  | /' "$log" >&2
				return 1
			fi
			sleep 0.05
		done
	done
	echo "ferry_start_daemon: no free port for ferryd $name after 8 attempts" >&2
	return 1
}

# ferry_make_psk FILE [IDENTITY=ferry-test]: a fresh pre-shared key in
# psktool's format (IDENTITY:HEXKEY), mode 0600, for ferryd --tls-psk.
ferry_make_psk() {
	local f=$1 id=${2:-ferry-test} key
	key=$(head -c 32 /dev/urandom | od -An -tx1 -v | tr -d ' \n')
	[ ${#key} -eq 64 ] || { echo "ferry_make_psk: no random key" >&2; return 1; }
	(umask 077 && printf '%s:%s\n' "$id" "$key" >"$f") || { echo "ferry_make_psk: cannot write $f" >&2; return 1; }
}

# ferry_make_x509 DIR CADIR [CN=ferry-test]: DIR/ca-cert.pem,
# server-cert.pem and server-key.pem for ferryd --tls-x509, signed by the CA
# in CADIR (made there first if missing; its key stays in CADIR). The
# certificate names localhost and 127.0.0.1 and serves as client and server
# certificate. Skips the test (77) without certtool (package gnutls-bin).
ferry_make_x509() {
	local dir=$1 ca=$2 cn=${3:-ferry-test}
	command -v certtool >/dev/null || ferry_skip "certtool not found (Debian package gnutls-bin)"
	mkdir -p "$dir" "$ca" && chmod 700 "$dir" "$ca" || return 1
	if [ ! -f "$ca/ca-cert.pem" ]; then
		printf 'cn = "ferry test CA %s"\nca\ncert_signing_key\nexpiration_days = 2\n' "${ca##*/}" >"$ca/ca.tmpl"
		if ! {
			certtool --generate-privkey --key-type=ecdsa --outfile "$ca/ca-key.pem" &&
				certtool --generate-self-signed --load-privkey "$ca/ca-key.pem" --template "$ca/ca.tmpl" \
					--outfile "$ca/ca-cert.pem"
		} >"$ca/certtool.log" 2>&1; then
			cat "$ca/certtool.log" >&2
			return 1
		fi
	fi
	printf 'cn = "%s"\ndns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\ntls_www_client\nsigning_key\nexpiration_days = 2\n' \
		"$cn" >"$dir/cert.tmpl"
	if ! {
		cp "$ca/ca-cert.pem" "$dir/ca-cert.pem" &&
			(umask 077 && certtool --generate-privkey --key-type=ecdsa --outfile "$dir/server-key.pem") &&
			certtool --generate-certificate --load-privkey "$dir/server-key.pem" --load-ca-certificate "$ca/ca-cert.pem" \
				--load-ca-privkey "$ca/ca-key.pem" --template "$dir/cert.tmpl" --outfile "$dir/server-cert.pem"
	} >"$dir/certtool.log" 2>&1; then
		cat "$dir/certtool.log" >&2
		return 1
	fi
}

# ferry_start_daemons [extra ferryd args]: daemon "a" (source host) and "b"
# (destination host). FERRY_TO = b's control address (for --to).
ferry_start_daemons() {
	ferry_start_daemon a "$@" || return 1
	ferry_start_daemon b "$@" || return 1
	FERRY_TO=${FERRY_LISTEN[b]}
}

# ferry_stop_daemon NAME [GRACE=5]: SIGTERM, then SIGKILL after GRACE s.
ferry_stop_daemon() {
	local name=$1 grace=${2:-5} t child deadline
	t=${FERRY_PID[$name]:-}
	[ -n "$t" ] || return 0
	if kill -0 "$t" 2>/dev/null; then
		child=$(pgrep -P "$t" 2>/dev/null)
		kill -TERM "$t" 2>/dev/null # timeout passes it on to ferryd
		deadline=$(($(now_ms) + grace * 1000))
		while kill -0 "$t" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
			sleep 0.05
		done
		if kill -0 "$t" 2>/dev/null; then
			echo "ferry_stop_daemon: ferryd $name ignored SIGTERM for ${grace}s, killing it" >&2
			for c in $child; do kill -KILL "$c" 2>/dev/null; done
			kill -KILL "$t" 2>/dev/null
		fi
	fi
	wait "$t" 2>/dev/null
	unset "FERRY_PID[$name]"
	return 0
}

# ferry_kill_daemon NAME [SIGNAL=KILL]: signal the ferryd process itself
# (e.g. to simulate a crashed host daemon).
ferry_kill_daemon() {
	local name=$1 sig=${2:-KILL} p
	p=$(ferry_pid "$name") || return 1
	[ -n "$p" ] || return 1
	kill -"$sig" "$p"
}

# ferry_ctl NAME ARGS...: ferryctl against daemon NAME, bounded in time.
ferry_ctl() {
	local name=$1
	shift
	timeout -k 2 "$FERRYCTL_TIMEOUT" "$FERRYCTL" --admin "${FERRY_ADMIN[$name]}" "$@"
}

# ferry_ping NAME: true when daemon NAME is alive and answers ping.
ferry_ping() {
	ferry_alive "$1" && ferry_ctl "$1" ping >/dev/null
}

# ferry_endpoint NAME: the data endpoint "tcp:HOST:PORT" from ping.
ferry_endpoint() {
	ferry_ctl "$1" ping | json_field endpoint
}

# json_field PATH: read JSON on stdin, print the dotted PATH (empty + 1 when
# missing).
json_field() {
	python3 -c '
import json, sys
try:
    v = json.load(sys.stdin)
except ValueError as e:
    sys.stderr.write("json_field: not JSON: %s\n" % e)
    sys.exit(2)
for k in sys.argv[1].split("."):
    if isinstance(v, dict) and k in v:
        v = v[k]
    else:
        print("")
        sys.exit(1)
print(json.dumps(v) if isinstance(v, (dict, list)) else ("true" if v is True else "false" if v is False else v))
' "$1"
}

# ferry_migrate_start SRC DST [ferryctl migrate args...]: start
# `ferryctl migrate` (via daemon a, to daemon b) in the background.
# Sets FERRY_MIG_PID, FERRY_MIG_OUT, FERRY_MIG_ERR (files), FERRY_MIG_T0.
ferry_migrate_start() {
	local src=$1 dst=$2
	shift 2
	FERRY_MIG_N=$((FERRY_MIG_N + 1))
	FERRY_MIG_OUT=$QEMU_DIR/ferryctl-$FERRY_MIG_N.out
	FERRY_MIG_ERR=$QEMU_DIR/ferryctl-$FERRY_MIG_N.err
	FERRY_MIG_T0=$(now_ms)
	local -a cmd=("$FERRYCTL" --admin "${FERRY_ADMIN[a]}" migrate --src-qmp "$(qemu_sock "$src")"
		--dst-qmp "$(qemu_sock "$dst")" --to "$FERRY_TO" "$@")
	echo "${cmd[*]}" >"$FERRY_MIG_ERR.cmd"
	"${cmd[@]}" </dev/null >"$FERRY_MIG_OUT" 2>"$FERRY_MIG_ERR" &
	FERRY_MIG_PID=$!
}

# ferry_migrate_wait TIMEOUT: wait for the background ferryctl. Sets
# FERRY_MIG_RC (124 when it had to be killed after TIMEOUT s) and
# FERRY_MIG_MS (wall time since the start). Returns FERRY_MIG_RC.
# ferry_wait_pid PID TIMEOUT WHAT: wait for a background child; kill it after
# TIMEOUT s (saying so, WHAT naming it). Returns its exit status, 124 if killed.
ferry_wait_pid() {
	local pid=$1 tmo=$2 what=$3 deadline
	deadline=$(($(now_ms) + tmo * 1000))
	while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
		sleep 0.05
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "$what still running after ${tmo}s, killing it" >&2
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
		return 124
	fi
	wait "$pid"
}

ferry_migrate_wait() {
	local tmo=$1
	[ -n "$FERRY_MIG_PID" ] || { echo "ferry_migrate_wait: no ferryctl running" >&2; return 1; }
	ferry_wait_pid "$FERRY_MIG_PID" "$tmo" "ferry_migrate_wait: ferryctl"
	FERRY_MIG_RC=$?
	FERRY_MIG_MS=$(($(now_ms) - FERRY_MIG_T0))
	FERRY_MIG_PID=""
	return "$FERRY_MIG_RC"
}

# ferry_migrate SRC DST TIMEOUT [ferryctl migrate args...]: both of the above.
ferry_migrate() {
	local src=$1 dst=$2 tmo=$3
	shift 3
	ferry_migrate_start "$src" "$dst" "$@"
	ferry_migrate_wait "$tmo"
}

# ferry_mig_id [TIMEOUT=10]: the id of the newest migration daemon "a" logged
# (ferryctl prints it only at the end; "ferryctl cancel ID" needs it). Call
# it once the migration is known to run (the daemon logs it before replying).
ferry_mig_id() {
	local deadline id
	deadline=$(($(now_ms) + ${1:-10} * 1000))
	while :; do
		id=$(sed -n 's/^ferryd\[[0-9.]*\]: migration \([0-9][0-9]*\): .* -> .*/\1/p' "${FERRY_LOG[a]}" | tail -n 1)
		[ -n "$id" ] && { echo "$id"; return 0; }
		[ "$(now_ms)" -gt "$deadline" ] && return 1
		sleep 0.05
	done
}

# ferry_mig_report: ferryctl's output of the last migration, indented.
ferry_mig_report() {
	sed 's/^/  out| /' "$FERRY_MIG_OUT" >&2
	sed 's/^/  err| /' "$FERRY_MIG_ERR" >&2
}

# wait_mig_active SOCK TIMEOUT [MIN_BYTES=1]: wait until query-migrate on
# SOCK says "active" and at least MIN_BYTES of RAM were transferred.
wait_mig_active() {
	local sock=$1 tmo=$2 min=${3:-1}
	_ferry_py wait-active "$sock" "$tmo" "$min"
}

# A QEMU monitor serves one client at a time and ferry holds the QMP sockets
# of both QEMUs for the whole migration. A test that must talk to a QEMU
# meanwhile gives it a second monitor:
#   qemu_start src ... -- $(side_qmp_args src)   ...   qmp "$(side_sock src)" ...
# vm_runs_consistent NAME WHEN: the test guest runs on NAME (its heartbeat
# advances), then, stopped, its memory passes ramcheck's pattern check.
# Fails the test otherwise (WHEN says after what, for the message).
vm_runs_consistent() {
	local name=$1 when=$2 f w1 w2 o
	wait_status "$(qemu_sock "$name")" running 10 || ferry_fail "$name does not run $when"
	f=$(qemu_ramfile "$name")
	w1=$(heartbeat_words "$f")
	sleep 1
	w2=$(heartbeat_words "$f")
	[ "$w2" -gt "$w1" ] || ferry_fail "the guest on $name does not run $when ($w1 -> $w2)"
	qmp "$(qemu_sock "$name")" stop >/dev/null
	o=$("$RAMCHECK" pattern "$f") || { echo "$o" >&2; ferry_fail "$name's memory is inconsistent $when"; }
}

side_sock() { echo "$QEMU_DIR/$1-side.qmp"; }
side_qmp_args() { echo "-qmp unix:$(side_sock "$1"),server=on,wait=off"; }

# qemu_kill NAME [SIGNAL=KILL]: signal the QEMU process itself (not its
# `timeout` wrapper), e.g. to simulate a crash.
qemu_kill() {
	local t=${QEMU_PIDS[$1]:-} p
	[ -n "$t" ] || return 1
	p=$(pgrep -P "$t" 2>/dev/null | head -n 1)
	[ -n "$p" ] || return 1
	kill -"${2:-KILL}" "$p"
}

# mig_field SOCK PATH: one field of query-migrate ("" if absent).
mig_field() { qmp_get "$1" query-migrate "$2" 2>/dev/null; }

_ferry_py() {
	python3 - "$@" <<'PY'
import json, os, socket, sys, time
mode, path = sys.argv[1], sys.argv[2]
timeout = float(os.environ.get("QMP_TIMEOUT", "30"))

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rb")
    f.readline()  # greeting
    return s, f

def run(s, f, cmd, args=None):
    msg = {"execute": cmd, "id": 1}
    if args:
        msg["arguments"] = args
    s.sendall(json.dumps(msg).encode() + b"\n")
    while True:
        line = f.readline()
        if not line:
            raise OSError("QEMU closed the monitor")
        m = json.loads(line)
        if m.get("id") == 1:
            if "error" in m:
                raise OSError("%s: %s" % (cmd, m["error"].get("desc")))
            return m.get("return")

try:
    s, f = connect()
    run(s, f, "qmp_capabilities")
    if mode == "wait-active":
        limit, want = float(sys.argv[3]), int(sys.argv[4])
        deadline = time.monotonic() + limit
        last = None
        while True:
            m = run(s, f, "query-migrate")
            st = m.get("status")
            tr = m.get("ram", {}).get("transferred", 0)
            last = "status=%s transferred=%d" % (st, tr)
            if st == "active" and tr >= want:
                print(last)
                sys.exit(0)
            if st in ("completed", "failed", "cancelled"):
                sys.stderr.write("wait_mig_active: migration already %s (%s)\n" % (st, last))
                sys.exit(1)
            if time.monotonic() > deadline:
                sys.stderr.write("wait_mig_active: timeout after %gs, last: %s\n" % (limit, last))
                sys.exit(2)
            time.sleep(0.05)
except (OSError, ValueError) as e:
    sys.stderr.write("wait_mig_active: %s\n" % e)
    sys.exit(2)
PY
}

# ferry_dump_logs: tails of the daemon logs, ferryctl outputs and QEMU logs
# (for failure reports).
ferry_dump_logs() {
	local f
	[ -n "$QEMU_DIR" ] && [ -d "$QEMU_DIR" ] || return 0
	for f in "$QEMU_DIR"/ferryd-*.log; do
		[ -s "$f" ] || continue
		echo "--- $f" >&2
		tail -n 40 "$f" >&2
	done
	for f in "$QEMU_DIR"/ferryctl-*.out "$QEMU_DIR"/ferryctl-*.err; do
		[ -s "$f" ] || continue
		echo "--- $f ($(cat "$f.cmd" 2>/dev/null || cat "${f%.out}.err.cmd" 2>/dev/null))" >&2
		tail -n 10 "$f" >&2
	done
	for f in "$QEMU_DIR"/*.log; do
		case ${f##*/} in ferryd-*) continue ;; esac
		[ -s "$f" ] || continue
		echo "--- $f" >&2
		tail -n 30 "$f" >&2
	done
}

# ferry_cleanup: EXIT trap: stop ferryctl, helpers, daemons, watchdog, then
# qemu_cleanup (QEMUs, RAM files, work dir). Dumps logs on failure.
ferry_cleanup() {
	local rc=$? name p
	trap - EXIT
	if [ -n "$FERRY_MIG_PID" ] && kill -0 "$FERRY_MIG_PID" 2>/dev/null; then
		kill -KILL "$FERRY_MIG_PID" 2>/dev/null
		wait "$FERRY_MIG_PID" 2>/dev/null
	fi
	for p in "${FERRY_EXTRA_PIDS[@]}"; do
		kill -KILL "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ -z "${_ferry_logs_dumped:-}" ]; then
		ferry_dump_logs
	fi
	for name in "${!FERRY_PID[@]}"; do
		ferry_stop_daemon "$name" 3
	done
	for p in "${FERRY_CLEANUP_DIRS[@]}"; do
		[ -n "$p" ] && rm -rf -- "$p"
	done
	if [ -n "$_ferry_watchdog_pid" ]; then
		kill -KILL "$_ferry_watchdog_pid" 2>/dev/null
		wait "$_ferry_watchdog_pid" 2>/dev/null
	fi
	# qemu_cleanup takes the exit status from $? (a skip is no failure:
	# nothing worth keeping)
	if [ "$rc" -eq 77 ]; then (exit 0); else (exit "$rc"); fi
	qemu_cleanup
	exit "$rc"
}

# net_tool MODE ...: small socket helper for bad-input tests (python3).
#   net_tool listen unix:PATH|tcp:PORTFILE BEHAVIOUR
#       serve until killed (run it in the background); tcp: binds
#       127.0.0.1:0 and writes the port to PORTFILE. BEHAVIOUR: banner (send
#       an SSH-like banner line, then read and discard), silent (accept and
#       say nothing), close (accept and close at once).
#   net_tool send unix:PATH|tcp:HOST:PORT|tls:HOST:PORT DATA TIMEOUT [keep]
#       connect, send DATA, shut down the write side (unless "keep"), print
#       the first line received (bytes outside ASCII 32..126 shown as '?'),
#       or <EOF> / <TIMEOUT> / <RESET>. DATA: str:TEXT (\n escapes allowed), random:N, big:N (N
#       bytes of 'x', no newline), deep:N (N '[' + N ']' + newline),
#       nul (a JSON line with a raw NUL byte), header (a 32-byte frame header
#       with the right magic but a bad checksum).
#       tls: TLS 1.3 with the certificate in $FERRY_NET_TLS_DIR (a
#       ferry_make_x509 directory), as a peer daemon; never half-closed.
#   net_tool hold unix:PATH|tcp:HOST:PORT N [DATA]
#       open N connections (optionally send DATA without newline on each) and
#       keep them open until killed; prints "held N" once they are up.
net_tool() { python3 -c "$(_net_tool_src)" "$@"; }
_net_tool_src() {
	cat <<'PY'
import os, socket, struct, sys, threading, time

def addr(spec):
    kind, rest = spec.split(":", 1)
    if kind == "unix":
        return socket.AF_UNIX, rest
    host, port = rest.rsplit(":", 1)
    return socket.AF_INET, (host, int(port))

def connect(spec, timeout):
    fam, a = addr(spec)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(a)
    if spec.startswith("tls:"):
        import ssl
        d = os.environ["FERRY_NET_TLS_DIR"]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(d + "/ca-cert.pem")
        ctx.load_cert_chain(d + "/server-cert.pem", d + "/server-key.pem")
        s = ctx.wrap_socket(s, server_hostname=a[0])
    return s

def printable(b):
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in b)

def data(spec):
    kind, _, arg = spec.partition(":")
    if kind == "str":
        return arg.encode().decode("unicode_escape").encode("latin-1")
    if kind == "random":
        return os.urandom(int(arg))
    if kind == "big":
        return b"x" * int(arg)
    if kind == "deep":
        n = int(arg)
        return b"[" * n + b"]" * n + b"\n"
    if kind == "nul":
        return b'{"cmd":"pi\x00ng"}\n'
    if kind == "header":
        return struct.pack(">I", 0x46525931) + bytes([1]) + os.urandom(27)
    raise SystemExit("net_tool: bad DATA %r" % spec)

mode = sys.argv[1]
if mode == "listen":
    spec, how = sys.argv[2], sys.argv[3]
    kind, rest = spec.split(":", 1)
    if kind == "unix":
        if os.path.exists(rest):
            os.unlink(rest)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(rest)
    else:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        with open(rest + ".tmp", "w") as f:
            f.write("%d\n" % ls.getsockname()[1])
        os.rename(rest + ".tmp", rest)
    ls.listen(16)
    def serve(c):
        try:
            if how == "close":
                return
            if how == "banner":
                c.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
            while c.recv(65536):
                pass
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
elif mode == "send":
    spec, d, timeout = sys.argv[2], data(sys.argv[3]), float(sys.argv[4])
    keep = len(sys.argv) > 5 and sys.argv[5] == "keep"
    s = connect(spec, timeout)
    try:
        s.sendall(d)
        # (an SSL socket cannot half-close and still read)
        if not keep and not spec.startswith("tls:"):
            s.shutdown(socket.SHUT_WR)
    except OSError as e:
        # the peer may close early (e.g. after an oversized line): that is fine
        sys.stderr.write("net_tool: send: %s\n" % e)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                print("<TIMEOUT>" if not buf else printable(buf))
                sys.exit(0)
            s.settimeout(left)
            r = s.recv(65536)
            if not r:
                break
            buf += r
    except socket.timeout:
        print("<TIMEOUT>" if not buf else printable(buf))
        sys.exit(0)
    except OSError:  # a reset, or a TLS layer that gave up
        print("<RESET>" if not buf else printable(buf))
        sys.exit(0)
    if not buf:
        print("<EOF>")
    else:
        print(printable(buf.split(b"\n", 1)[0]))
elif mode == "hold":
    spec, n = sys.argv[2], int(sys.argv[3])
    d = data(sys.argv[4]) if len(sys.argv) > 4 else b""
    held = []
    for _ in range(n):
        s = connect(spec, 10)
        if d:
            s.sendall(d)
        held.append(s)
    print("held %d" % n, flush=True)
    while True:
        time.sleep(3600)
else:
    raise SystemExit("net_tool: unknown mode %s" % mode)
PY
}

# net_tool_bg OUTFILE MODE ...: net_tool in the background (killed on exit);
# sets NET_TOOL_PID.
net_tool_bg() {
	local out=$1
	shift
	# python3 itself is the background job: $! is the process to kill
	python3 -c "$(_net_tool_src)" "$@" </dev/null >"$out" 2>&1 &
	NET_TOOL_PID=$!
	FERRY_EXTRA_PIDS+=("$NET_TOOL_PID")
}

# wait_file_line FILE PATTERN TIMEOUT: wait until FILE has a line matching
# the grep PATTERN.
wait_file_line() {
	local deadline=$(($(now_ms) + $3 * 1000))
	until grep -q "$2" "$1" 2>/dev/null; do
		[ "$(now_ms)" -gt "$deadline" ] && return 1
		sleep 0.05
	done
}

# ferry_retry_migration SRC DST2 CHANNELS TAG: after a failed or cancelled
# migration, the same source must migrate cleanly to a fresh destination DST2
# (the failure lost nothing). Restores the downtime limit the slow tests lower,
# leaves FERRY_MIG_MS set, and stops and removes both guests afterwards.
ferry_retry_migration() {
	local src=$1 dst2=$2 ch=$3 tag=$4 st
	qmp "$(qemu_sock "$src")" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300}}' >/dev/null ||
		ferry_fail "restoring downtime-limit on $src failed"
	qemu_start "$dst2" --ram "$RAM" --boot "$DIRTY_BIN" --prealloc --incoming || ferry_fail "starting $dst2 failed"
	ferry_migrate "$src" "$dst2" 60 --channels "$ch"
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "$tag: migrating the source again afterwards exited $FERRY_MIG_RC"; }
	wait_status "$(qemu_sock "$dst2")" running 10 || ferry_fail "$tag: $dst2 is not running after the retry"
	# v3 Confirm ends the source QEMU once the destination runs the VM
	for _ in $(seq 50); do qemu_alive "$src" || break; sleep 0.1; done
	qemu_alive "$src" && ferry_fail "$tag: the source QEMU still runs after the retry"
	qemu_stop "$src"
	qemu_stop "$dst2"
	qemu_rm_ram "$src"
	qemu_rm_ram "$dst2"
}

# ferry_slow_migration_start SRC DST CHANNELS BW TAG: boot running dirty.bin
# guests SRC and DST (RAM), make SRC unable to converge (downtime-limit 1 ms)
# and start `ferryctl migrate --max-bandwidth BW` between them; returns once
# data flows and BW reached SRC's QEMU. For tests that break a migration off
# midway. Sets FERRY_SRC_RAM (SRC's RAM file).
ferry_slow_migration_start() {
	local src=$1 dst=$2 ch=$3 bw=$4 tag=$5 got
	# shellcheck disable=SC2046
	qemu_start "$src" --ram "$RAM" --boot "$DIRTY_BIN" -- $(side_qmp_args "$src") || ferry_fail "starting $src failed"
	# shellcheck disable=SC2046
	qemu_start "$dst" --ram "$RAM" --boot "$DIRTY_BIN" --prealloc --incoming -- $(side_qmp_args "$dst") ||
		ferry_fail "starting $dst failed"
	FERRY_SRC_RAM=$(qemu_ramfile "$src")
	wait_heartbeat "$FERRY_SRC_RAM" 3 60 >/dev/null || ferry_fail "guest on $src does not run (no heartbeat)"
	qmp "$(qemu_sock "$src")" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1}}' >/dev/null ||
		ferry_fail "$tag: setting downtime-limit on $src failed"

	ferry_migrate_start "$src" "$dst" --channels "$ch" --max-bandwidth "$bw"
	wait_mig_active "$(side_sock "$src")" 20 $((16 * 1024 * 1024)) >/dev/null || {
		ferry_migrate_wait 1
		ferry_mig_report
		ferry_fail "$tag: the migration did not become active with data flowing"
	}
	# ferryctl --max-bandwidth reached the source QEMU
	got=$(qmp_get "$(side_sock "$src")" query-migrate-parameters max-bandwidth)
	[ "$got" = "$bw" ] || ferry_fail "$tag: the source QEMU's max-bandwidth is '$got', not --max-bandwidth $bw"
}

# ferry_source_intact SRC SRCRAM TAG WHEN: after a migration broke off, the
# guest on SRC still makes progress and, paused, its RAM passes `ramcheck
# pattern`; SRC runs again afterwards. WHEN ("after the cancel") goes into
# the failure messages.
ferry_source_intact() {
	local src=$1 srcram=$2 tag=$3 when=$4 w1 w2 out
	w1=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	sleep 1
	w2=$(heartbeat_words "$srcram") || ferry_fail "no heartbeat in $srcram"
	[ "$w2" -gt "$w1" ] || ferry_fail "$tag: guest on the source makes no progress $when ($w1 -> $w2)"
	qmp "$(qemu_sock "$src")" stop >/dev/null || ferry_fail "stop on $src failed"
	wait_status "$(qemu_sock "$src")" paused 10 || ferry_fail "$src did not pause"
	out=$("$RAMCHECK" pattern "$srcram") || { echo "$out" >&2; ferry_fail "$tag: pattern broken on the source RAM"; }
	qmp "$(qemu_sock "$src")" cont >/dev/null || ferry_fail "cont on $src failed"
}

# ferry_pass SUMMARY: the test passed; print "PASS SUMMARY in Ns" and the
# lines the test collected in its REPORT array, then exit 0.
ferry_pass() {
	echo "PASS $1 in $(ferry_elapsed)s"
	local r
	for r in "${REPORT[@]}"; do echo "  $r"; done
	exit 0
}

# ferry_dpdk_tx_path DAEMON TUNNEL ref|copy PMD LABEL: a dpdk ferryd's transmit
# path is the expected one (docs/performance.md, "Transmit path"): its log
# names it for PMD, and TUNNEL's tunnel-status counts datagrams sent by
# reference (more than 0 for ref, 0 for copy).
ferry_dpdk_tx_path() {
	local d=$1 tid=$2 want=$3 pmd=$4 label=$5 st n how=copy
	[ "$want" = ref ] && how=reference
	grep -q "ferry dpdk: port [0-9]* ($pmd): transmit by $how" "${FERRY_LOG[$d]}" ||
		ferry_fail "$label: ferryd $d does not log its transmit path as by $how: $(grep -m1 "ferry dpdk:" "${FERRY_LOG[$d]}")"
	st=$(ferry_ctl "$d" tunnel-status "$tid") || ferry_fail "$label: tunnel-status $tid failed: $st"
	n=$(json_field stats.reliable.tx_by_ref <<<"$st")
	if [ "$want" = ref ]; then
		[ "${n:-0}" -gt 0 ] || ferry_fail "$label: no datagram went by reference (tx_by_ref ${n:-missing})"
	else
		[ "${n:-1}" = 0 ] || ferry_fail "$label: tx_by_ref is ${n:-missing}, expected 0 (copies)"
	fi
	echo "$label: transmit by $how, $n datagrams by reference"
}
