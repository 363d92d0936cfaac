# shellcheck shell=bash
# tests/lib/nbd.sh - helpers for the NBD path tests (source after ferry.sh).
#
#   nbd_init TOOL...          skip (77) unless every TOOL and python3-libnbd are
#                             here; sets NBD_PY (a python3 that imports nbd),
#                             NBD_CHECK (tests/tools/nbdcheck.py), NBD_ALLOW (the
#                             destination's --allow-dir); starts daemons a, b
#   nbdkit_start FILE SOCK    serve FILE with nbdkit on SOCK (killed on exit)

NBD_CHECK=$(cd "$(dirname "${BASH_SOURCE[0]}")/../tools" && pwd)/nbdcheck.py

nbd_init() {
	local t p
	for t in "$@"; do
		command -v "$t" >/dev/null || ferry_skip "$t is not installed (bootstrap.sh installs it)"
	done
	# python3-libnbd installs for the system python, which a pyenv python3 is not
	NBD_PY=
	for p in /usr/bin/python3 python3; do
		"$p" -c 'import nbd' 2>/dev/null && { NBD_PY=$p; break; }
	done
	[ -n "$NBD_PY" ] || ferry_skip "python3-libnbd is not installed (bootstrap.sh installs it)"
	NBD_ALLOW=$QEMU_DIR/b-allowed
	mkdir -p "$NBD_ALLOW"
	ferry_start_daemon a || ferry_fail "starting ferryd a failed"
	ferry_start_daemon b --allow-dir "$NBD_ALLOW" || ferry_fail "starting ferryd b failed"
}

# wait_sock PATH: wait until a server listens on PATH (5 s).
wait_sock() {
	local _
	for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done
	ferry_fail "nothing listens on $1"
}

nbdkit_start() {
	nbdkit -f --unix "$2" -t 16 file "$1" </dev/null >>"$QEMU_DIR/nbdkit.log" 2>&1 &
	FERRY_EXTRA_PIDS+=("$!")
	wait_sock "$2"
}
