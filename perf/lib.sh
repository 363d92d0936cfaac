# perf/lib.sh — shell helpers for the perf scripts (sourced, not executed).
#
# Provides: logging (log, warn, die), process tracking with a cleanup that
# kills everything started through bg_start, bounded waits, size parsing.
# Callers set `set -euo pipefail` themselves and call lib_init_cleanup once.

# shellcheck shell=bash

LIB_PIDS=()          # processes started by bg_start (killed on exit)
LIB_RM_PATHS=()      # files/dirs removed on exit
LIB_CLEANUP_HOOKS=() # functions run on exit before the kills

log()  { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '%s WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '%s ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# usage: print the script's leading comment block (its --help).
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
# need_arg OPTION [VALUE...]: an option's value is there and not empty.
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
# bench_opt "$@": one of the options bench-migrate.sh and bench-storage.sh
# share (--size --runs --arms --verify --timeout --keep-logs --help), so they
# spell and check them alike. Sets the variable and OPT_SHIFT (the words it
# took); anything else is an unknown option.
bench_opt() {
	OPT_SHIFT=2
	case $1 in
	--size) need_arg "$@"; SIZE_ARG=$2 ;;
	--runs) need_arg "$@"; RUNS=$2 ;;
	--arms) need_arg "$@"; ARMS=$2 ;;
	--verify) need_arg "$@"; VERIFY=$2 ;;
	--timeout) need_arg "$@"; TIMEOUT=$2 ;;
	--keep-logs) KEEP_LOGS=1; OPT_SHIFT=1 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown option $1 (see --help)" ;;
	esac
}

# bg_start LOGFILE CMD ARGS... : start CMD in the background, stdin from
# /dev/null, stdout+stderr to LOGFILE; sets BG_PID and tracks it.
bg_start() {
	local logfile=$1
	shift
	"$@" </dev/null >>"$logfile" 2>&1 &
	BG_PID=$!
	LIB_PIDS+=("$BG_PID")
}

# run_wait OUTFILE CMD ARGS...: run CMD in the background with stdout to
# OUTFILE and stderr to OUTFILE.err and wait for it. Unlike a foreground
# command, the wait is cut short by SIGINT/SIGTERM, so cleanup runs at once.
run_wait() {
	local out=$1 pid rc=0
	shift
	"$@" </dev/null >"$out" 2>"$out.err" &
	pid=$!
	LIB_PIDS+=("$pid")
	wait "$pid" || rc=$?
	lib_untrack "$pid"
	return "$rc"
}

lib_untrack() {
	local p keep=()
	for p in "${LIB_PIDS[@]}"; do
		[ "$p" = "$1" ] || keep+=("$p")
	done
	LIB_PIDS=("${keep[@]}")
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# cpu_seconds PID...: CPU seconds (user + system, reaped children included)
# the processes have used so far; a vanished process counts 0.
cpu_seconds() {
	local p total=0 t
	for p in "$@"; do
		# fields after the ")" that ends comm: utime is the 12th, then
		# stime, cutime, cstime (proc(5))
		t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13 + $14 + $15}') || t=0
		total=$((total + ${t:-0}))
	done
	awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", t / hz}'
}

# stop_pid PID [GRACE_SECONDS]: SIGTERM the process and its direct children
# (by parent pid, e.g. socat's forked children), wait, then SIGKILL.
stop_pid() {
	local pid=$1 grace=${2:-5} kids i
	[ -n "$pid" ] || return 0
	if pid_alive "$pid"; then
		kids=$(pgrep -P "$pid" 2>/dev/null || true)
		kill -TERM "$pid" 2>/dev/null || true
		# shellcheck disable=SC2086
		[ -z "$kids" ] || kill -TERM $kids 2>/dev/null || true
		for ((i = 0; i < grace * 20; i++)); do
			pid_alive "$pid" || break
			sleep 0.05
		done
		if pid_alive "$pid"; then
			kill -KILL "$pid" 2>/dev/null || true
		fi
		# shellcheck disable=SC2086
		[ -z "$kids" ] || kill -KILL $kids 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
	lib_untrack "$pid"
}

lib_cleanup() {
	local rc=$? h p
	trap - EXIT INT TERM HUP
	for h in "${LIB_CLEANUP_HOOKS[@]}"; do
		"$h" || true
	done
	for p in "${LIB_PIDS[@]}"; do
		stop_pid "$p" 3
	done
	for p in "${LIB_RM_PATHS[@]}"; do
		[ -n "$p" ] && rm -rf -- "$p"
	done
	exit "$rc"
}

lib_init_cleanup() {
	trap lib_cleanup EXIT
	trap 'log "interrupted"; exit 130' INT TERM HUP
}

# bench_work SHM TAG: a bench's work dir WORK (/tmp/ferry-TAG.*, its logs)
# and RESULTS in it; SHM is removed on exit and the cleanup armed. WORK is
# kept with --keep-logs (KEEP_LOGS=1) or when a run failed (BENCH_FAILED=1).
bench_work() {
	WORK=$(mktemp -d "/tmp/ferry-$2.XXXXXX") || die "cannot make a work dir in /tmp"
	LIB_RM_PATHS+=("$1")
	lib_init_cleanup
	LIB_CLEANUP_HOOKS+=(bench_keep_or_remove_work)
	RESULTS=$WORK/results.jsonl
}
bench_keep_or_remove_work() {
	if [ "$KEEP_LOGS" = 1 ] || [ "${BENCH_FAILED:-0}" = 1 ]; then
		log "logs kept in $WORK"
	else
		rm -rf -- "$WORK"
	fi
}

# wait_for TIMEOUT_S DESCRIPTION CMD ARGS...: poll CMD every 50 ms.
wait_for() {
	local timeout=$1 what=$2 i
	shift 2
	for ((i = 0; i < timeout * 20; i++)); do
		"$@" && return 0
		sleep 0.05
	done
	warn "timed out after ${timeout}s waiting for $what"
	return 1
}

tcp_listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

# parse_size 2G|512M|4096K|12345 -> bytes (binary units)
parse_size() {
	local s=${1^^} n unit
	[[ $s =~ ^([0-9]+)([KMGT]?)(I?B)?$ ]] || return 1
	n=${BASH_REMATCH[1]}
	unit=${BASH_REMATCH[2]}
	case $unit in
	K) n=$((n << 10)) ;;
	M) n=$((n << 20)) ;;
	G) n=$((n << 30)) ;;
	T) n=$((n << 40)) ;;
	esac
	echo "$n"
}

# fill_random FILE BYTES: fast pseudo-random content (AES-CTR keystream when
# openssl exists, /dev/urandom otherwise).
fill_random() {
	local file=$1 bytes=$2
	if command -v openssl >/dev/null 2>&1; then
		openssl enc -aes-128-ctr -pass pass:ferry-bench -nosalt -pbkdf2 </dev/zero 2>/dev/null |
			head -c "$bytes" >"$file" || true
	else
		head -c "$bytes" /dev/urandom >"$file" || true
	fi
	[ "$(stat -c %s "$file")" = "$bytes" ] || die "could not write $bytes random bytes to $file"
}
