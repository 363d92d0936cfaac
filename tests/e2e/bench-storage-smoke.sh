#!/usr/bin/env bash
# bench-storage-smoke.sh - perf/bench-storage.sh still produces numbers: one
# round of QEMU's own storage migration (direct) and of `ferryctl migrate
# --disk` over the tcp driver on a 64 MiB disk (real QEMU, real daemons);
# both runs must complete with the destination image identical (the bench's
# cmp) and the summary must give each arm a time and a ratio. No speed is
# asserted (figures live in docs/performance.md). A bad option is refused
# naming it.
#
# Exit: 0 pass, 1 fail, 77 skip (no KVM/TCG QEMU or qemu-img).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
bench=$root/perf/bench-storage.sh
work=$(mktemp -d /tmp/ferry-stsmoke.XXXXXX) || { echo "FAIL: mktemp"; exit 1; }
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; sed 's/^/  | /' "$work/out" 2>/dev/null | tail -n 40; exit 1; }
for t in qemu-system-x86_64 qemu-img; do
	command -v "$t" >/dev/null || { echo "SKIP: $t is not installed"; exit 77; }
done

out=$("$bench" --arms direct,telepathy 2>&1) && fail "an unknown arm was accepted"
grep -q "unknown arm 'telepathy'" <<<"$out" || fail "the unknown arm is not named: $out"
out=$("$bench" --size 3M 2>&1) && fail "--size 3M was accepted"
grep -q -- "--size must be" <<<"$out" || fail "the bad --size is not explained: $out"

t0=$(date +%s)
"$bench" --size 64M --runs 1 --arms direct,tcp --timeout 120 >"$work/out" 2>&1
rc=$?
grep -E '^  round|^(direct|ferry)' "$work/out"
echo "bench: exit $rc after $(($(date +%s) - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$rc" -eq 0 ] || fail "bench-storage.sh exited $rc"
for arm in direct ferry-tcp; do
	grep -Eq "^  round 1 $arm +storage [0-9.]+ s, whole [0-9.]+ s, verified" "$work/out" ||
		fail "no verified $arm run"
	grep -Eq "^$arm +1 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+" "$work/out" || fail "no summary row for $arm"
done
echo "PASS bench-storage-smoke"
