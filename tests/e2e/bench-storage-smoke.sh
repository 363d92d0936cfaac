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

# shellcheck source=tests/lib/bench-smoke.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/bench-smoke.sh"
smoke_init bench-storage.sh stsmoke
for t in qemu-system-x86_64 qemu-img; do
	command -v "$t" >/dev/null || { echo "SKIP: $t is not installed"; exit 77; }
done

smoke_refuses "unknown arm 'telepathy'" --arms direct,telepathy
smoke_refuses "--size must be" --size 3M

smoke_run '^  round|^(direct|ferry)' --size 64M --runs 1 --arms direct,tcp --timeout 120
for arm in direct ferry-tcp; do
	grep -Eq "^  round 1 $arm +storage [0-9.]+ s, whole [0-9.]+ s, verified" "$work/out" ||
		fail "no verified $arm run"
	grep -Eq "^$arm +1 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+" "$work/out" || fail "no summary row for $arm"
done
echo "PASS bench-storage-smoke"
