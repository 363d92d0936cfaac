#!/usr/bin/env bash
# perf/bench-postcopy.sh — postcopy page-request latency (fault to page
# arrival): QEMU's own postcopy over TCP (direct) against postcopy through
# ferry (two daemons, the set-up acknowledgement, the relay), same run, arms
# rotated, several rounds.
#
# Each run migrates the test guest (tests/guest/dirty.S: it keeps rewriting
# 32 MiB of its RAM, one 4 KiB page after another) between two TCG QEMUs and
# switches to postcopy as soon as the migration is active (--after 0; ferryctl
# --postcopy-after 0), so the destination guest faults on pages the source
# still has. Not later: a precopy that finishes its first pass before the
# switch converges and completes whatever the downtime-limit (seen here under
# load with 0.2 s, in both arms), and the run measures nothing. Both QEMUs run with
# `-msg timestamp=on -trace events=FILE,file=LOG` (QEMU's log trace backend,
# one clock for both: same host). perf/pctrace.py matches, on the destination,
# each postcopy_ram_fault_thread_request (the fault thread asks for a page) to
# the first later postcopy_place_page[_zero] of the same host page: latency =
# fault to page arrival. It then follows the request on the source:
# migrate_handle_rp_req_pages (the return-path thread read it) and
# get_queued_page (the migration thread takes it and sends the page) or
# get_queued_page_not_dirty (the page was already sent by the background
# push, the fault only waited for it). For pages sent on request the latency
# splits into request path (destination QEMU -> source QEMU), source wait
# and page path (source QEMU -> placed): the two paths are where a relay
# adds its hops; the source wait is QEMU's own.
#
# The same settings for both arms, on the source QEMU before the migration:
#  - downtime-limit 0, so a late switch is not overtaken by the usual
#    convergence test (a finished first pass still completes);
#  - max-bandwidth 100 GB/s (what ferryctl sets; QEMU 7.2's default is 32 MiB/s);
#  - max-postcopy-bandwidth 16M (--postcopy-bw) for 2 s (--window) after the
#    switch, then lifted; only requests made before the lift count. Why: QEMU
#    7.2 resumes its background push from the page last requested, so an
#    unlimited push streams the guest's pages just ahead of it: the guest
#    faults rarely and almost only on pages already on their way (measured:
#    46 of 48 faults "already sent"), which says little about the request
#    round trip. A slow push lets the guest overtake it again and again, so
#    most faults are real requests. Its cost: QEMU 7.2 serves no page request
#    while the rate limiter's 100 ms budget is spent (qemu_savevm_state_iterate
#    returns before RAM's iterate), so many requests wait up to ~100 ms in the
#    source QEMU in both arms. That shows in the source wait, and so in the
#    all-faults p90/p99, not in the two paths. --postcopy-bw 0 measures the
#    unlimited push instead (the whole postcopy phase).
# The destination RAM is pre-allocated (prealloc=on, as in the other benches).
#
# Usage: perf/bench-postcopy.sh [options]
#   --rounds N         rounds; each runs every arm once, order rotated (default 6)
#   --arms LIST        comma list of direct,ferry (default direct,ferry)
#   --ram SIZE         guest RAM (default 128M, at least 64M)
#   --after S          switch to postcopy S seconds after "active" (default 0)
#   --postcopy-bw SIZE max-postcopy-bandwidth during the window, bytes/s (default
#                      16M; 0: unlimited, no window, the whole postcopy phase)
#   --window S         seconds of the rate-limited window (default 2)
#   --json FILE        write every run and the summary as JSON lines
#   --retries N        extra attempts for a failed run (default 2)
#   --keep-logs        keep the work directory (traces, QEMU and ferryd logs)
#   -h, --help
# Environment: FERRYD, FERRYCTL, DIRTY_BIN, RAMCHECK, QEMU_BIN (tests/lib/ferry.sh).
#
# Output: one line per run and a table on stderr/stdout, then a last line
#   SUMMARY {"kind": "summary", "direct": {...}, "ferry": {...}, "ratio": {...}}
# (median_us, p99_us... pooled over all rounds' faults of an arm; sent_*: the
# faults whose page was sent on request, sent_req_* / sent_src_* /
# sent_page_*: their request path, source wait, page path; push_*: faults
# whose page the push had already sent; norq_*: faults for which the
# destination sent no request, the page having just arrived). Exit 0 when
# every arm produced numbers, 2 when a run failed after its retries, 77 when
# something the bench needs is missing.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source-path=SCRIPTDIR source=../tests/lib/ferry.sh
. "$ROOT/tests/lib/ferry.sh"

ROUNDS=6
ARMS=direct,ferry
RAM=128M
AFTER=0
WINDOW=2
PCBW_ARG=16M
JSON_OUT=
RETRIES=2
KEEP_LOGS=0

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
bad() { echo "bench-postcopy.sh: $*" >&2; exit 1; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || bad "$1 needs a value"; }
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) need_arg "$@"; ROUNDS=$2; shift 2 ;;
	--arms) need_arg "$@"; ARMS=$2; shift 2 ;;
	--ram) need_arg "$@"; RAM=$2; shift 2 ;;
	--after) need_arg "$@"; AFTER=$2; shift 2 ;;
	--window) need_arg "$@"; WINDOW=$2; shift 2 ;;
	--postcopy-bw) need_arg "$@"; PCBW_ARG=$2; shift 2 ;;
	--json) need_arg "$@"; JSON_OUT=$2; shift 2 ;;
	--retries) need_arg "$@"; RETRIES=$2; shift 2 ;;
	--keep-logs) KEEP_LOGS=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad "unknown option '$1' (see --help)" ;;
	esac
done

# ------------------------------------------------------------ validation
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || bad "--rounds wants a positive count, not '$ROUNDS'"
[[ $RETRIES =~ ^[0-9]+$ ]] || bad "--retries wants a count, not '$RETRIES'"
[[ $AFTER =~ ^[0-9]+(\.[0-9]+)?$ ]] || bad "--after wants seconds, not '$AFTER'"
[[ $WINDOW =~ ^[0-9]+(\.[0-9]+)?$ ]] && [[ $WINDOW =~ [1-9] ]] || bad "--window wants seconds > 0, not '$WINDOW'"
RAM_BYTES=$(size_bytes "$RAM" 2>/dev/null) || bad "--ram wants a size like 128M, not '$RAM'"
[ "$RAM_BYTES" -ge $((64 << 20)) ] && [ $((RAM_BYTES % (1 << 20))) -eq 0 ] ||
	bad "--ram must be a whole number of MiB, at least 64M (the guest writes 16..48 MiB), not '$RAM'"
PCBW=$(size_bytes "$PCBW_ARG" 2>/dev/null) ||
	bad "--postcopy-bw wants bytes/s like 16M (0: unlimited), not '$PCBW_ARG'"
IFS=, read -r -a ARM_LIST <<<"$ARMS"
[ ${#ARM_LIST[@]} -gt 0 ] || bad "--arms is empty"
for a in "${ARM_LIST[@]}"; do
	case $a in direct | ferry) ;; *) bad "unknown arm '$a' (direct, ferry)" ;; esac
done
if [ -n "$JSON_OUT" ]; then
	: >"$JSON_OUT" 2>/dev/null || bad "cannot write --json $JSON_OUT"
fi
MAX_BW=100000000000 # what ferryctl sets on the source (controlplane/migrate.c)
if [ "$PCBW" -gt 0 ]; then
	MODE="push held at $PCBW B/s for ${WINDOW}s"
else
	MODE="unlimited push, whole postcopy phase"
	WINDOW=0
fi

# two RAM files at a time; watchdog: generous per run
per_run=$((60 + ${WINDOW%.*} * 2))
# shellcheck disable=SC2034 # QEMU_KEEP is read by tests/lib/qemu.sh at exit
[ "$KEEP_LOGS" = 1 ] && QEMU_KEEP=1
FERRY_TEST_TIMEOUT=${FERRY_TEST_TIMEOUT:-$((120 + ROUNDS * ${#ARM_LIST[@]} * (RETRIES + 1) * per_run))}
QEMU_LIFETIME=${QEMU_LIFETIME:-$FERRY_TEST_TIMEOUT}
ferry_init --shm $((2 * RAM_BYTES + (64 << 20))) --timeout "$FERRY_TEST_TIMEOUT"
ferry_need_ramcheck
ferry_need_dirty_bin
command -v ss >/dev/null || ferry_skip "ss not found (iproute2; run ./bootstrap.sh)"
# The log trace backend with timestamps is what the method needs.
"$QEMU_BIN" -trace help 2>/dev/null | grep -qx postcopy_ram_fault_thread_request ||
	ferry_skip "$QEMU_BIN has no postcopy_ram_fault_thread_request trace event"
qemu_path=$(command -v "$QEMU_BIN")
grep -qaF '@%zu.%06zu:postcopy_place_page ' "$qemu_path" ||
	ferry_skip "$qemu_path was built without QEMU's log trace backend (with timestamps), which this bench reads"
EVENTS=$QEMU_DIR/pc-events
printf '%s\n' postcopy_ram_fault_thread_request postcopy_place_page postcopy_place_page_zero >"$EVENTS"
SRC_EVENTS=$QEMU_DIR/pc-src-events
printf '%s\n' migrate_handle_rp_req_pages get_queued_page get_queued_page_not_dirty >"$SRC_EVENTS"
RESULTS=$QEMU_DIR/results.jsonl
: >"$RESULTS"
if [[ ,$ARMS, == *,ferry,* ]]; then
	ferry_start_daemons || ferry_fail "starting the ferry daemons failed"
fi

QEMU_VERSION=$("$QEMU_BIN" --version | head -n 1)
OTHER_QEMUS=$(pgrep -c -x "$(basename "$QEMU_BIN" | cut -c1-15)" || true)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
log "postcopy latency bench: arms $ARMS, $ROUNDS round(s), RAM $RAM, switch after ${AFTER}s," \
	"$MODE; $QEMU_VERSION; $(nproc) CPUs;" \
	"load $LOADAVG"
[ "${OTHER_QEMUS:-0}" = 0 ] || log "WARNING: $OTHER_QEMUS other QEMU process(es) on this host: figures may be noisy"

# run_once ARM ROUND ATTEMPT: one migration; appends a JSON line to RESULTS.
# Returns non-zero (with a reason on stderr) if the run produced no numbers.
# perf/pctrace.py pace sets the source's parameters, (direct arm) starts the
# migration and switches, keeps the window and lifts the limit.
run_once() {
	local arm=$1 round=$2 attempt=$3 tag src dst trace pace lift="" rc=0 pace_pid
	tag=r$round-$arm-a$attempt
	src=src-$tag
	dst=dst-$tag
	trace=$QEMU_DIR/$tag.trace
	pace=$QEMU_DIR/$tag.pace
	cp "$DIRTY_BIN" "$QEMU_DIR/$src.img" && cp "$DIRTY_BIN" "$QEMU_DIR/$dst.img" || return 1
	# shellcheck disable=SC2046
	qemu_start "$src" --ram "$RAM" --boot "$QEMU_DIR/$src.img" -- $(side_qmp_args "$src") \
		-msg timestamp=on -trace "events=$SRC_EVENTS,file=$trace.src" || return 1
	if ! qemu_start "$dst" --ram "$RAM" --prealloc --boot "$QEMU_DIR/$dst.img" --incoming -- \
		-msg timestamp=on -trace "events=$EVENTS,file=$trace"; then
		qemu_stop "$src"
		qemu_rm_ram "$src"
		return 1
	fi
	local -a pace_cmd=(python3 "$HERE/pctrace.py" pace --src "$(side_sock "$src")" --pcbw "$PCBW" --max-bw "$MAX_BW")
	[ "$PCBW" -gt 0 ] && pace_cmd+=(--window "$WINDOW" --lift-bw "$MAX_BW")
	[ "$arm" = direct ] && pace_cmd+=(--direct-dst "$(qemu_sock "$dst")" --port "$(ferry_free_port)" --after "$AFTER")
	wait_heartbeat "$(qemu_ramfile "$src")" 1 60 >/dev/null || rc=1 # its area written once: non-zero pages
	if [ "$rc" = 0 ]; then
		"${pace_cmd[@]}" </dev/null >"$pace" 2>"$pace.err" &
		pace_pid=$!
		FERRY_EXTRA_PIDS+=("$pace_pid")
		if [ "$arm" = ferry ]; then
			wait_file_line "$pace" '^ready$' 30 || rc=1
			[ "$rc" = 0 ] && ferry_migrate_start "$src" "$dst" --postcopy --postcopy-after "$AFTER" --json
		fi
		ferry_wait_pid "$pace_pid" 120 "the postcopy pacer" || { rc=1; sed 's/^/  pace| /' "$pace.err" >&2; }
		lift=$(sed -n 's/^lift \([0-9]*\)$/\1/p' "$pace")
		[ "$PCBW" = 0 ] || [ -n "$lift" ] || rc=1
	fi
	if [ "$arm" = direct ]; then
		[ "$rc" = 0 ] && { wait_migration "$(qemu_sock "$src")" 120 >/dev/null &&
			wait_status "$(qemu_sock "$dst")" running 30 || rc=1; }
	elif [ -n "$FERRY_MIG_PID" ]; then
		ferry_migrate_wait 180
		if [ "$FERRY_MIG_RC" != 0 ]; then
			ferry_mig_report
			rc=1
		fi
		[ "$rc" = 0 ] && { wait_status "$(qemu_sock "$dst")" running 30 || rc=1; }
	fi
	qemu_stop "$dst"
	qemu_stop "$src"
	qemu_rm_ram "$dst"
	qemu_rm_ram "$src"
	if [ "$rc" = 0 ]; then
		python3 "$HERE/pctrace.py" latency "$trace" ${lift:+--before-us "$lift"} --src-log "$trace.src" --latencies "$QEMU_DIR/$tag.lat" \
			--label "arm=$arm" --label "round=$round" --label "attempt=$attempt" >"$QEMU_DIR/$tag.json" || rc=1
	fi
	if [ "$rc" = 0 ] && ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("matched", 0) > 0 else 1)' \
		"$QEMU_DIR/$tag.json"; then
		echo "$arm round $round: the trace shows no answered page request" >&2
		rc=1
	fi
	if [ "$rc" = 0 ]; then
		cat "$QEMU_DIR/$tag.json" >>"$RESULTS"
		[ "$KEEP_LOGS" = 1 ] || rm -f "$trace" "$trace.src" # large; the latencies are kept
	else
		printf '{"arm":"%s","round":%d,"attempt":%d,"ok":false}\n' "$arm" "$round" "$attempt" >>"$RESULTS"
	fi
	return "$rc"
}

show_run() { # last line of RESULTS
	tail -n 1 "$RESULTS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
tag = "%-6s round %d" % (r["arm"], r["round"])
if r.get("attempt", 1) > 1: tag += " (attempt %d)" % r["attempt"]
if r.get("ok") is False:
    print("  %s: FAILED" % tag)
else:
    print("  %s: %4d faults  median %7.1f us  p90 %8.1f us  p99 %8.1f us  max %8.1f us;"
          " %d sent on request (median %s us), %d already sent by the push" % (tag,
        r["matched"], r["median_us"], r["p90_us"], r["p99_us"], r["max_us"],
        r.get("by_request", 0), r.get("sent_median_us", "-"), r.get("already_sent", 0)))' >&2
}

T0=$(date +%s)
FAILED=0
declare -A GOT=()
for ((round = 1; round <= ROUNDS; round++)); do
	# rotate: round r starts with arm (r-1) mod n
	n=${#ARM_LIST[@]}
	for ((i = 0; i < n; i++)); do
		arm=${ARM_LIST[$(((round - 1 + i) % n))]}
		for ((attempt = 1; attempt <= RETRIES + 1; attempt++)); do
			if run_once "$arm" "$round" "$attempt"; then
				show_run
				GOT[$arm]=1
				break
			fi
			show_run
			[ "$attempt" -le "$RETRIES" ] && log "retrying $arm round $round"
		done
		[ "$attempt" -le $((RETRIES + 1)) ] || FAILED=1
	done
done

echo
echo "postcopy page-request latency: RAM $RAM, switch after ${AFTER}s, $MODE," \
	"$ROUNDS round(s), $(nproc) CPUs, $(($(date +%s) - T0)) s"
python3 - "$QEMU_DIR" "$RESULTS" "$ARMS" "$QEMU_VERSION" "$RAM_BYTES" "$AFTER" "$WINDOW" "$PCBW" "${JSON_OUT:-}" \
	"$LOADAVG" "${OTHER_QEMUS:-0}" <<'PY'
import json, os, sys
wd, results, arms, qemu, ram, after, window, pcbw, json_out, loadavg, others = sys.argv[1:12]

def pct(xs, p):
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]

runs = [json.loads(l) for l in open(results) if l.strip()]
summary = {"kind": "summary", "qemu": qemu, "ram_bytes": int(ram), "postcopy_after_s": float(after),
           "window_s": float(window), "max_postcopy_bandwidth": int(pcbw), "cpus": os.cpu_count(),
           "loadavg_at_start": loadavg, "other_qemus_at_start": int(others or 0)}
COLS = ("median_us", "p90_us", "p99_us", "max_us")
print("%-7s %-28s %7s %10s %10s %10s %10s" % (("arm", "faults", "count") + tuple(c[:-3] + " us" for c in COLS)))
for arm in arms.split(","):
    ok = [r for r in runs if r.get("arm") == arm and r.get("ok") is not False]
    rows = []
    for r in ok:
        tag = "r%d-%s-a%d" % (r["round"], arm, r["attempt"])
        with open(os.path.join(wd, tag + ".lat")) as f:
            rows += [l.split("\t") for l in f.read().split("\n") if l.strip()]
    val = lambda x: None if x == "-" else int(x)
    groups = [("all", "every answered fault", [int(r[0]) for r in rows])]
    sent = [r for r in rows if len(r) == 5 and r[1] == "by_request"]
    groups += [("sent", "sent on request: total", [int(r[0]) for r in sent]),
               ("sent_req", "  request path (dst->src)", [val(r[2]) for r in sent]),
               ("sent_src", "  source QEMU wait", [val(r[3]) for r in sent]),
               ("sent_page", "  page path (src->dst)", [val(r[4]) for r in sent]),
               ("push", "already sent by the push", [int(r[0]) for r in rows if len(r) == 5 and r[1] == "already_sent"]),
               ("norq", "no request (page just in)", [int(r[0]) for r in rows if len(r) == 5 and r[1] == "no_request"])]
    a = {"rounds": len(ok), "faults": len(rows),
         "failed_runs": sum(1 for r in runs if r.get("arm") == arm and r.get("ok") is False),
         "round_medians_us": [r.get("median_us") for r in ok], "round_p99s_us": [r.get("p99_us") for r in ok]}
    for key, label, xs in groups:
        xs = sorted(x for x in xs if x is not None)
        pre = "" if key == "all" else key + "_"
        a[pre + "count"] = len(xs)
        if xs:
            for c, q in zip(COLS, (50, 90, 99, 100)):
                a[pre + c] = pct(xs, q)
            print("%-7s %-28s %7d %10d %10d %10d %10d" % ((arm if key == "all" else "", label, len(xs)) +
                                                           tuple(a[pre + c] for c in COLS)))
        else:
            print("%-7s %-28s %7d %10s %10s %10s %10s" % (arm if key == "all" else "", label, 0, "-", "-", "-", "-"))
    summary[arm] = a
d, f = summary.get("direct", {}), summary.get("ferry", {})
if d.get("faults") and f.get("faults"):
    ratio = {}
    for pre in ("", "sent_", "sent_req_", "sent_page_"):
        for c in ("median_us", "p99_us"):
            if d.get(pre + c) and f.get(pre + c) is not None:
                ratio[pre + c] = round(f[pre + c] / d[pre + c], 2)
    summary["ratio"] = ratio
    print("ferry/direct: all faults median x%s, p99 x%s; sent on request median x%s, p99 x%s" % (
        ratio.get("median_us"), ratio.get("p99_us"), ratio.get("sent_median_us"), ratio.get("sent_p99_us")))
line = json.dumps(summary, sort_keys=True)
if json_out:
    with open(json_out, "w") as out:
        for r in runs:
            out.write(json.dumps(r, sort_keys=True) + "\n")
        out.write(line + "\n")
print("SUMMARY " + line)
PY
for a in "${ARM_LIST[@]}"; do
	[ -n "${GOT[$a]:-}" ] || FAILED=1
done
[ "$FAILED" = 0 ] || { echo "some runs failed after $RETRIES retries (logs kept in $QEMU_DIR)" >&2; exit 2; }
exit 0
