# shellcheck shell=bash
# tests/lib/qemu.sh - helpers for tests that start QEMU guests and migrate them.
#
# Source it from bash, then call qemu_init once:
#
#   . tests/lib/qemu.sh
#   qemu_init                      # work dir + EXIT/INT/TERM trap (qemu_cleanup)
#   qemu_start src --ram 1G --stopped
#   qemu_start dst --ram 1G --incoming --prealloc
#   qmp "$(qemu_sock dst)" '{"execute":"migrate-incoming","arguments":{"uri":"unix:/tmp/x"}}'
#   qmp "$(qemu_sock src)" '{"execute":"migrate","arguments":{"uri":"unix:/tmp/x"}}'
#   wait_migration "$(qemu_sock src)" 120
#
# Every wait has a timeout; every QEMU runs under `timeout` (QEMU_LIFETIME
# seconds, default 900) so nothing survives a test killed with SIGKILL for
# long. Needs: qemu-system-x86_64, python3 (QMP client, stdlib only),
# coreutils; openssl is used by fill_random when present.
#
# Environment knobs:
#   QEMU_BIN        default qemu-system-x86_64
#   QEMU_LIFETIME   hard cap on each QEMU's life in seconds (default 900)
#   QEMU_VM_NAME    the guest name (-name) of every QEMU started (default ferry-vm):
#                   a migration's two QEMUs are one VM, and ferry checks they agree
#   QEMU_RAM_DIR    where RAM files go (default /dev/shm)
#   QMP_TIMEOUT     seconds for each QMP connect/reply (default 30)
#   QMP_VERBOSE=1   print QMP traffic and events on stderr

QEMU_BIN=${QEMU_BIN:-qemu-system-x86_64}
QEMU_LIFETIME=${QEMU_LIFETIME:-900}
QEMU_RAM_DIR=${QEMU_RAM_DIR:-/dev/shm}
QMP_TIMEOUT=${QMP_TIMEOUT:-30}
QEMU_DIR=${QEMU_DIR:-}
declare -gA QEMU_PIDS=()      # name -> pid of the `timeout` wrapping QEMU
declare -gA QEMU_RAMFILES=()  # name -> RAM file of that guest
declare -gA _qemu_ramfile_keep=()  # name -> 1 if the RAM file is the caller's
QEMU_CLEANUP_FILES=()         # extra files qemu_cleanup removes

_qemu_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
die() { printf '[%s] FAIL: %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; exit 1; }

# now: seconds since the epoch with ms, for timings (now_ms: integer ms)
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }

# size_bytes 1G|256M|4096K|12345 -> bytes (binary suffixes)
size_bytes() {
	local s=$1 n m=1
	case $s in
	*[kK]) n=${s%?}; m=1024 ;;
	*[mM]) n=${s%?}; m=$((1024 * 1024)) ;;
	*[gG]) n=${s%?}; m=$((1024 * 1024 * 1024)) ;;
	*) n=$s ;;
	esac
	[[ $n =~ ^[0-9]+$ ]] || { echo "size_bytes: bad size '$s'" >&2; return 1; }
	echo $((n * m))
}

# qemu_init: create the work dir (short path: it holds unix sockets) and
# install the cleanup trap. Call once per test script. If the script needs
# its own EXIT trap, make it call qemu_cleanup.
qemu_init() {
	if [ -z "$QEMU_DIR" ]; then
		QEMU_DIR=$(mktemp -d /tmp/ferry-qemu.XXXXXX) || die "mktemp failed"
		_qemu_dir_owned=1
	fi
	mkdir -p "$QEMU_DIR"
	trap 'qemu_cleanup' EXIT
	trap 'log "interrupted"; exit 130' INT
	trap 'log "terminated"; exit 143' TERM
	command -v "$QEMU_BIN" >/dev/null || die "$QEMU_BIN not found"
	command -v python3 >/dev/null || die "python3 not found (needed for QMP)"
}

qemu_sock() { echo "$QEMU_DIR/$1.qmp"; }
qemu_log() { echo "$QEMU_DIR/$1.log"; }
qemu_pid() { echo "${QEMU_PIDS[$1]:-}"; }
qemu_ramfile() { echo "${QEMU_RAMFILES[$1]:-$QEMU_RAM_DIR/ferry-test-$$-$1.ram}"; }

# qemu_alive NAME: true while that QEMU process exists
qemu_alive() {
	local pid=${QEMU_PIDS[$1]:-}
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# qemu_start NAME [options] [-- extra qemu args]
#   --ram SIZE         guest RAM size (default 256M), e.g. 1G
#   --ram-file PATH    RAM backing file (default $QEMU_RAM_DIR/ferry-test-PID-NAME.ram);
#                      an existing file of exactly SIZE bytes keeps its contents
#   --prealloc         prealloc=on for the memory backend (destination)
#   --stopped          -S: the vCPU never runs until "cont"
#   --accel kvm|tcg    default tcg (kvm here can only host a stopped guest)
#   --boot FILE        boot FILE (raw disk image, e.g. dirty.bin) from IDE
#   --incoming         -incoming defer (then QMP migrate-incoming)
# Leaves QMP at $(qemu_sock NAME), log at $(qemu_log NAME). Returns once the
# QMP socket accepts connections (fails if QEMU exits first).
qemu_start() {
	local name=$1
	shift
	local ram=256M ramfile="" prealloc=off stopped=0 accel=tcg boot="" incoming=0
	local -a extra=()
	while [ $# -gt 0 ]; do
		case $1 in
		--ram) ram=$2; shift 2 ;;
		--ram-file) ramfile=$2; shift 2 ;;
		--prealloc) prealloc=on; shift ;;
		--stopped) stopped=1; shift ;;
		--accel) accel=$2; shift 2 ;;
		--boot) boot=$2; shift 2 ;;
		--incoming) incoming=1; shift ;;
		--) shift; extra=("$@"); break ;;
		*) echo "qemu_start: unknown option $1" >&2; return 1 ;;
		esac
	done
	[ -n "$QEMU_DIR" ] || { echo "qemu_start: call qemu_init first" >&2; return 1; }
	if qemu_alive "$name"; then
		echo "qemu_start: $name is already running" >&2
		return 1
	fi
	[ -n "$ramfile" ] || ramfile=$QEMU_RAM_DIR/ferry-test-$$-$name.ram
	QEMU_RAMFILES[$name]=$ramfile
	# a file that existed before belongs to the caller: never removed by us
	if [ -e "$ramfile" ]; then _qemu_ramfile_keep[$name]=1; else unset "_qemu_ramfile_keep[$name]"; fi
	local sock log
	sock=$(qemu_sock "$name")
	log=$(qemu_log "$name")
	rm -f "$sock"

	local -a cmd=(timeout -k 5 "$QEMU_LIFETIME" "$QEMU_BIN"
		-name "${QEMU_VM_NAME:-ferry-vm}" -nodefaults -no-user-config -display none
		-machine "pc,memory-backend=ram0" -accel "$accel" -m "$ram"
		-object "memory-backend-file,id=ram0,size=$ram,mem-path=$ramfile,share=on,prealloc=$prealloc"
		-qmp "unix:$sock,server=on,wait=off"
		-monitor none -serial none -parallel none)
	[ "$stopped" = 1 ] && cmd+=(-S)
	[ -n "$boot" ] && cmd+=(-drive "file=$boot,format=raw,if=ide,index=0" -boot c)
	[ "$incoming" = 1 ] && cmd+=(-incoming defer)
	cmd+=("${extra[@]}")
	echo "${cmd[*]}" >"$log.cmd"
	[ -n "${QMP_VERBOSE:-}" ] && log "start $name: ${cmd[*]}"
	"${cmd[@]}" </dev/null >"$log" 2>&1 &
	QEMU_PIDS[$name]=$!

	# prealloc of a large file can take a while: allow QEMU_START_TIMEOUT
	local deadline=$(($(now_ms) + ${QEMU_START_TIMEOUT:-120} * 1000))
	while :; do
		if ! qemu_alive "$name"; then
			wait "${QEMU_PIDS[$name]}" 2>/dev/null
			local rc=$?
			unset "QEMU_PIDS[$name]"
			echo "qemu_start: $name exited (status $rc) during startup; log:" >&2
			sed 's/^/  | /' "$log" >&2
			return 1
		fi
		if [ -S "$sock" ] && _qmp_py ping "$sock" >/dev/null 2>&1; then
			return 0
		fi
		if [ "$(now_ms)" -gt "$deadline" ]; then
			echo "qemu_start: $name: QMP socket not up after ${QEMU_START_TIMEOUT:-120}s" >&2
			sed 's/^/  | /' "$log" >&2
			return 1
		fi
		sleep 0.1
	done
}

# qemu_stop NAME [TIMEOUT=10]: quit via QMP, then TERM, then KILL.
qemu_stop() {
	local name=$1 t=${2:-10} pid
	pid=${QEMU_PIDS[$name]:-}
	[ -n "$pid" ] || return 0
	if kill -0 "$pid" 2>/dev/null; then
		QMP_TIMEOUT=5 _qmp_py cmd "$(qemu_sock "$name")" quit >/dev/null 2>&1
		local deadline=$(($(now_ms) + t * 1000))
		while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			# $pid is `timeout`; QEMU is its child
			local child
			child=$(pgrep -P "$pid" 2>/dev/null)
			kill -TERM "$pid" 2>/dev/null
			deadline=$(($(now_ms) + 3000))
			while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
				sleep 0.1
			done
			for c in $child; do kill -KILL "$c" 2>/dev/null; done
			kill -KILL "$pid" 2>/dev/null
		fi
	fi
	wait "$pid" 2>/dev/null
	unset "QEMU_PIDS[$name]"
	return 0
}

# qemu_rm_ram NAME: delete the RAM file qemu_start created for NAME (not one
# passed with --ram-file that existed before).
qemu_rm_ram() {
	local name=$1 f=${QEMU_RAMFILES[$1]:-}
	[ -n "$f" ] || return 0
	[ -z "${_qemu_ramfile_keep[$name]:-}" ] && rm -f "$f"
	unset "QEMU_RAMFILES[$name]"
}

# qemu_cleanup: stop every QEMU, remove RAM files and the work dir. Installed
# as EXIT trap by qemu_init; safe to call twice. Set QEMU_KEEP=1 to keep the
# work dir (logs) for debugging.
qemu_cleanup() {
	local rc=$? name f
	trap - EXIT
	for name in "${!QEMU_PIDS[@]}"; do
		qemu_stop "$name" 3
	done
	for name in "${!QEMU_RAMFILES[@]}"; do
		qemu_rm_ram "$name"
	done
	for f in "${QEMU_CLEANUP_FILES[@]}"; do
		rm -f "$f"
	done
	QEMU_CLEANUP_FILES=()
	if [ -n "${_qemu_dir_owned:-}" ] && [ -d "$QEMU_DIR" ]; then
		if [ -n "${QEMU_KEEP:-}" ] || [ "$rc" -ne 0 ]; then
			log "QEMU logs kept in $QEMU_DIR"
		else
			rm -rf "$QEMU_DIR"
		fi
	fi
	return "$rc"
}

# qemu_dump_logs: print every QEMU log (for failure reports)
qemu_dump_logs() {
	local f
	for f in "$QEMU_DIR"/*.log; do
		[ -s "$f" ] || continue
		echo "--- $f" >&2
		tail -n 50 "$f" >&2
	done
}

# qmp SOCK CMD...: connect, negotiate (qmp_capabilities), run each CMD in
# order waiting for its reply, print each "return" value as one JSON line.
# CMD is a full QMP JSON object ('{"execute":"migrate","arguments":{...}}')
# or a bare command name without arguments ("stop", "query-status").
# An error reply is printed on stderr and makes qmp return 1 (later commands
# are not sent); a timeout (QMP_TIMEOUT per reply) or connection problem
# returns 2.
qmp() { _qmp_py cmd "$@"; }

# qmp_get SOCK CMD PATH: run CMD and print one field of its return value,
# PATH dotted ("status", "ram.transferred"). Missing field -> empty line, 3.
qmp_get() { _qmp_py get "$@"; }

# wait_migration SOCK TIMEOUT: poll query-migrate (every 0.2s) until
# "completed" (prints a one-line summary, returns 0), "failed"/"cancelled"
# (prints the error, returns 1) or TIMEOUT seconds (returns 2). Works on the
# source and on the destination.
wait_migration() { _qmp_py wait-migration "$@"; }

# wait_status SOCK STATUS TIMEOUT: poll query-status until its status is
# STATUS ("running", "paused", "postmigrate", ...). 0 / 2 on timeout.
wait_status() { _qmp_py wait-status "$@"; }

# fill_random FILE SIZE: create FILE of exactly SIZE bytes of random data.
# Fast path: AES-CTR keystream from a random key (openssl); else /dev/urandom.
fill_random() {
	local file=$1 size bytes mib rest
	size=$(size_bytes "$2") || return 1
	bytes=$size
	mib=$((bytes / 1048576))
	rest=$((bytes % 1048576))
	rm -f "$file"
	if command -v openssl >/dev/null; then
		local key iv
		key=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
		iv=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
		openssl enc -aes-128-ctr -nosalt -K "$key" -iv "$iv" -in /dev/zero 2>/dev/null |
			head -c "$bytes" >"$file"
	else
		{
			[ "$mib" -gt 0 ] && dd if=/dev/urandom bs=1M count="$mib" iflag=fullblock status=none
			[ "$rest" -gt 0 ] && dd if=/dev/urandom bs="$rest" count=1 iflag=fullblock status=none
		} >"$file"
	fi
	local got
	got=$(stat -c %s "$file" 2>/dev/null)
	if [ "$got" != "$bytes" ]; then
		echo "fill_random: $file has ${got:-no} bytes, wanted $bytes" >&2
		return 1
	fi
}

# heartbeat_done FILE: the dirty.bin guest's completed-pass counter read from
# its RAM file (empty + status 1 if the guest has not published it yet).
# Needs RAMCHECK (path of the ramcheck binary).
heartbeat_done() {
	local out
	out=$("${RAMCHECK:?RAMCHECK not set}" heartbeat "$1" 2>/dev/null) || return 1
	out=${out#*done=}
	echo "${out%% *}"
}

# heartbeat_words FILE: words written so far by the dirty.bin guest (advances
# every 4 KiB page, so it shows progress even on a very slow guest).
heartbeat_words() {
	local out
	out=$("${RAMCHECK:?RAMCHECK not set}" heartbeat "$1" 2>/dev/null) || return 1
	out=${out#*words=}
	echo "${out%% *}"
}

# wait_heartbeat FILE MIN TIMEOUT: wait until heartbeat_done FILE >= MIN.
wait_heartbeat() {
	local file=$1 min=$2 deadline v
	deadline=$(($(now_ms) + $3 * 1000))
	while :; do
		v=$(heartbeat_done "$file") && [ "$v" -ge "$min" ] && { echo "$v"; return 0; }
		[ "$(now_ms)" -gt "$deadline" ] && {
			echo "wait_heartbeat: $file: heartbeat ${v:-absent} < $min after $3s" >&2
			return 1
		}
		sleep 0.2
	done
}

_qmp_py() {
	python3 - "$@" <<'PY'
import json, os, socket, sys, time

TIMEOUT = float(os.environ.get("QMP_TIMEOUT", "30"))
VERBOSE = bool(os.environ.get("QMP_VERBOSE"))


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() > deadline:
                    raise QMPError("connect %s: %s" % (path, e))
                time.sleep(0.1)
        self.sock = s
        self.f = s.makefile("rb")
        self.next_id = 1
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError("%s: not a QMP greeting: %r" % (path, greeting))
        self.execute({"execute": "qmp_capabilities"})

    def _read(self):
        try:
            line = self.f.readline()
        except socket.timeout:
            raise QMPError("%s: no reply within %gs" % (self.path, self.timeout))
        if not line:
            raise QMPError("%s: QEMU closed the monitor" % self.path)
        if VERBOSE:
            sys.stderr.write("qmp< %s" % line.decode(errors="replace"))
        try:
            return json.loads(line)
        except ValueError:
            raise QMPError("%s: malformed reply %r" % (self.path, line))

    def execute(self, cmd):
        """Send cmd (dict), wait for the reply with our id; return the reply."""
        cmd = dict(cmd)
        cmd["id"] = self.next_id
        self.next_id += 1
        data = json.dumps(cmd)
        if VERBOSE:
            sys.stderr.write("qmp> %s\n" % data)
        self.sock.sendall(data.encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if msg.get("id") != cmd["id"]:
                continue
            return msg

    def run(self, cmd):
        """Return the 'return' value or raise QMPError naming the error."""
        reply = self.execute(cmd)
        if "error" in reply:
            e = reply["error"]
            raise QMPError("qmp %s: %s: %s" % (cmd.get("execute"), e.get("class"), e.get("desc")))
        return reply.get("return")


def parse_cmd(arg):
    arg = arg.strip()
    if arg.startswith("{"):
        try:
            c = json.loads(arg)
        except ValueError as e:
            raise QMPError("bad JSON command %r: %s" % (arg, e))
        if not isinstance(c, dict) or "execute" not in c:
            raise QMPError("command must be an object with \"execute\": %r" % arg)
        return c
    return {"execute": arg}


def dig(v, path):
    for k in path.split("."):
        if isinstance(v, dict) and k in v:
            v = v[k]
        elif isinstance(v, list) and k.isdigit() and int(k) < len(v):
            v = v[int(k)]
        else:
            return None
    return v


def fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def summary(m):
    ram = m.get("ram", {})
    t = m.get("total-time")
    tr = ram.get("transferred", 0)
    parts = ["status=%s" % m.get("status")]
    if t is not None:
        parts.append("total-time=%dms" % t)
    for k in ("setup-time", "downtime"):
        if k in m:
            parts.append("%s=%dms" % (k, m[k]))
    if ram:
        parts.append("transferred=%.1fMiB" % (tr / 1048576.0))
        if t:
            parts.append("avg=%.0fMiB/s" % (tr / 1048576.0 / (t / 1000.0)))
        for k in ("dirty-sync-count", "normal", "duplicate", "mbps", "pages-per-second"):
            if k in ram:
                v = ram[k]
                parts.append("%s=%s" % (k, int(v) if isinstance(v, float) else v))
    return " ".join(parts)


def main(argv):
    if len(argv) < 2:
        raise QMPError("usage: MODE SOCK ...")
    mode, path = argv[0], argv[1]
    if mode == "ping":
        QMP(path, min(TIMEOUT, 2.0))
        return 0
    if mode == "cmd":
        q = QMP(path, TIMEOUT)
        for a in argv[2:]:
            r = q.run(parse_cmd(a))
            print(json.dumps(r, separators=(",", ":")), flush=True)
        return 0
    if mode == "get":
        if len(argv) != 4:
            raise QMPError("usage: qmp_get SOCK CMD PATH")
        q = QMP(path, TIMEOUT)
        v = dig(q.run(parse_cmd(argv[2])), argv[3])
        print("" if v is None else fmt(v))
        return 3 if v is None else 0
    if mode in ("wait-migration", "wait-status"):
        want = None
        if mode == "wait-status":
            if len(argv) != 4:
                raise QMPError("usage: wait_status SOCK STATUS TIMEOUT")
            want, limit = argv[2], float(argv[3])
        else:
            if len(argv) != 3:
                raise QMPError("usage: wait_migration SOCK TIMEOUT")
            limit = float(argv[2])
        q = QMP(path, TIMEOUT)
        deadline = time.monotonic() + limit
        last = None
        while True:
            if want is None:
                m = q.run({"execute": "query-migrate"})
                st = m.get("status")
                if st == "completed":
                    # QEMU 7.2 flips the status before it fills in total-time
                    # and downtime: re-read briefly for the final numbers
                    for _ in range(10):
                        if m.get("total-time") or "ram" not in m:
                            break
                        time.sleep(0.05)
                        m = q.run({"execute": "query-migrate"})
                    print(summary(m), flush=True)
                    return 0
                if st in ("failed", "cancelled"):
                    sys.stderr.write("migration %s: %s\n" % (st, m.get("error-desc", "(no error-desc)")))
                    return 1
                last = summary(m)
            else:
                st = q.run({"execute": "query-status"}).get("status")
                if st == want:
                    return 0
                last = "status=%s" % st
            if time.monotonic() > deadline:
                sys.stderr.write("%s: timeout after %gs, last: %s\n" % (mode, limit, last))
                return 2
            time.sleep(0.2)
    raise QMPError("unknown mode %s" % mode)


try:
    sys.exit(main(sys.argv[1:]))
except QMPError as e:
    sys.stderr.write("%s\n" % e)
    sys.exit(1 if str(e).startswith("qmp ") else 2)
except OSError as e:
    sys.stderr.write("qmp: %s\n" % e)
    sys.exit(2)
PY
}
