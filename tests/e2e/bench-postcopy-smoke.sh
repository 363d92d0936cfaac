#!/usr/bin/env bash
# bench-postcopy-smoke.sh - perf/bench-postcopy.sh still produces numbers:
# one short round of both arms (QEMU's direct postcopy over TCP and postcopy
# through ferry, real QEMU 7.2 TCG guests), then the summary must give each
# arm answered page faults with a median and a p99, and a ferry/direct ratio.
# No speed is asserted (figures live in docs/performance.md). Bad options are
# refused naming the option.
#
# Exit: 0 pass, 1 fail, 77 skip (whatever the bench skips for).
set -uo pipefail

# shellcheck source=tests/lib/bench-smoke.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/bench-smoke.sh"
smoke_init bench-postcopy.sh pcsmoke

# bad input: a clear error naming what was wrong, before anything starts
smoke_refuses "unknown arm 'telepathy'" --arms direct,telepathy
smoke_refuses "--postcopy-bw wants bytes/s" --postcopy-bw fast

smoke_run '^  (direct|ferry) +round|retrying' --rounds 1 --retries 1 --window 1 --json "$work/summary.jsonl"
line=$(grep '^SUMMARY ' "$work/out" | tail -n 1)
[ -n "$line" ] || fail "no SUMMARY line"
python3 - "${line#SUMMARY }" "$work/summary.jsonl" <<'PY' || fail "the summary lacks numbers"
import json, sys
s = json.loads(sys.argv[1])
for arm in ("direct", "ferry"):
    a = s.get(arm) or {}
    assert a.get("rounds") == 1 and a.get("faults", 0) > 0, (arm, a)
    assert 0 < a["median_us"] <= a["p99_us"] <= a["max_us"], (arm, a)
assert s["ratio"]["median_us"] > 0 and s["ratio"]["p99_us"] > 0, s.get("ratio")
lines = [json.loads(l) for l in open(sys.argv[2])]
assert lines[-1] == s, "the --json file's last line is not the summary"
assert {r["arm"] for r in lines[:-1] if r.get("ok") is not False} == {"direct", "ferry"}
print("direct: %d faults, median %d us, p99 %d us; ferry: %d faults, median %d us, p99 %d us" % (
    s["direct"]["faults"], s["direct"]["median_us"], s["direct"]["p99_us"],
    s["ferry"]["faults"], s["ferry"]["median_us"], s["ferry"]["p99_us"]))
PY
echo "PASS bench-postcopy-smoke"
