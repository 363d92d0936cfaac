# shellcheck shell=bash
# tests/lib/bench-smoke.sh - the frame of the tests/e2e/bench-*-smoke.sh tests,
# which run one perf/ bench once, briefly, and check its output has numbers.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib/bench-smoke.sh"
#   smoke_init bench-storage.sh stsmoke       # $bench, $work (removed on exit)
#   smoke_refuses "unknown arm 'telepathy'" --arms direct,telepathy
#   smoke_run '^  round' --runs 1             # output in $work/out; SKIP/FAIL handled
#
# fail MESSAGE prints FAIL and the tail of the bench's output, exits 1.

# smoke_init BENCH TAG: the bench under test and a work dir for its output.
smoke_init() {
	bench=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/perf/$1
	work=$(mktemp -d "/tmp/ferry-$2.XXXXXX") || { echo "FAIL: mktemp"; exit 1; }
	trap 'rm -rf "$work"' EXIT
}

fail() { echo "FAIL: $*"; sed 's/^/  | /' "$work/out" 2>/dev/null | tail -n 40; exit 1; }

# smoke_refuses WANT ARGS...: the bench refuses ARGS before it starts
# anything, with a message that contains WANT (what was wrong).
smoke_refuses() {
	local want=$1 out
	shift
	out=$("$bench" "$@" 2>&1) && fail "'$*' was accepted"
	grep -q -- "$want" <<<"$out" || fail "'$*' is refused without saying '$want': $out"
}

# smoke_run SHOW ARGS...: run the bench with ARGS into $work/out, show its
# lines matching the regex SHOW and how long it took under what load; exit
# 77 if the bench skipped, fail unless it exited 0.
smoke_run() {
	local show=$1 t0 rc=0
	shift
	t0=$(date +%s)
	"$bench" "$@" >"$work/out" 2>&1 || rc=$?
	grep -E "$show" "$work/out" | cut -c1-160
	echo "bench: exit $rc after $(($(date +%s) - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
	[ "$rc" -eq 77 ] && { grep -m1 '^SKIP' "$work/out"; exit 77; }
	[ "$rc" -eq 0 ] || fail "$(basename "$bench") exited $rc"
}
