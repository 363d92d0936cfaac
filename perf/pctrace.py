#!/usr/bin/env python3
"""pctrace.py - postcopy page-request latency from a destination QEMU's trace log.

The destination QEMU runs with `-msg timestamp=on -trace events=FILE,file=LOG`
and these events enabled (QEMU 7.2, migration/trace-events):
  postcopy_ram_fault_thread_request  the fault thread read a userfault and
                                     asked the source for the page (HVA=...)
  postcopy_place_page, postcopy_place_page_zero
                                     a page was placed (host=...)
With the log backend and timestamps on, each line reads
  TID@SECONDS.MICROSECONDS:EVENT ARGS
Latency of a fault = time of the first placement of the same host page at or
after the request - time of the request. A second request for a page whose
first request is still unanswered is counted as a repeat and not measured.

Usage:
  pctrace.py latency LOG [--page-size 4096] [--before-us T] [--latencies FILE] [--label k=v ...]
    prints one JSON object: faults, matched, unmatched, repeats, median_us,
    p90_us, p99_us, max_us, mean_us, placed (all placements).
  pctrace.py pace --src SOCK --pcbw B [--window S --lift-bw B] [--direct-dst SOCK --port P --after S]
    (perf/bench-postcopy.sh) sets the source's parameters and prints `ready`;
    with --direct-dst starts a direct migration and switches to postcopy;
    with --pcbw > 0 then waits for the postcopy phase, keeps the rate-limited
    window, lifts the limit and prints `lift T` (us since the epoch).
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMP, QMPError  # noqa: E402  (perf/qmp.py, beside this file)

LINE = re.compile(r"^\d+@(\d+)\.(\d{6}):(\w+) (.*)$")
HVA = re.compile(r"HVA=0x([0-9a-fA-F]+)")
HOST = re.compile(r"host=(?:0x)?([0-9a-fA-F]+)")


def percentile(xs, p):
    """Nearest-rank percentile of a sorted list (p in 0..100)."""
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


REQ = re.compile(r"HVA=0x([0-9a-fA-F]+) rb=(\S+) offset=0x([0-9a-fA-F]+)")
RP = re.compile(r"in (\S+) at 0x([0-9a-fA-F]+)")
QUEUED = re.compile(r"(\S+)/0x([0-9a-fA-F]+) ")


def parse(lines):
    """(time_us, event, args) for every trace line of the log backend."""
    for line in lines:
        m = LINE.match(line)
        if m:
            yield int(m.group(1)) * 1000000 + int(m.group(2)), m.group(3), m.group(4)


def analyse(lines, page_size, before_us=None):
    """Returns (summary, faults): one (latency_us, request time, rb, offset)
    per answered fault."""
    mask = ~(page_size - 1)
    pending = {}  # page -> (time, rb, offset) of its first unanswered request
    got = []
    faults = repeats = placed = 0
    for t, ev, args in parse(lines):
        if ev == "postcopy_ram_fault_thread_request":
            a = REQ.search(args)
            if not a or (before_us is not None and t >= before_us):
                continue
            page = int(a.group(1), 16) & mask
            faults += 1
            if page in pending:
                repeats += 1
            else:
                pending[page] = (t, a.group(2), int(a.group(3), 16) & mask)
        elif ev in ("postcopy_place_page", "postcopy_place_page_zero"):
            a = HOST.search(args)
            if not a:
                continue
            placed += 1
            req = pending.pop(int(a.group(1), 16) & mask, None)
            if req is not None:
                got.append((t - req[0],) + req)
    lat = sorted(g[0] for g in got)
    r = {"faults": faults, "matched": len(lat), "unmatched": len(pending), "repeats": repeats,
         "placed": placed}
    r.update(stats(lat, ""))
    return r, got


def stats(xs, prefix):
    xs = sorted(xs)
    if not xs:
        return {}
    return {prefix + "median_us": percentile(xs, 50), prefix + "p90_us": percentile(xs, 90),
            prefix + "p99_us": percentile(xs, 99), prefix + "max_us": xs[-1],
            prefix + "mean_us": round(sum(xs) / len(xs), 1)}


def split(got, src_lines):
    """Follow each answered fault through the source QEMU's trace (same host,
    same clock): its return-path thread reads the request
    (migrate_handle_rp_req_pages), then the migration thread takes it
    (get_queued_page: sent now) or finds the page already sent by the
    background push (get_queued_page_not_dirty). Returns per fault
    (kind, request_path_us, source_wait_us, page_path_us) and a summary."""
    rp, taken = {}, {}
    last_rb = None
    for t, ev, args in parse(src_lines):
        if ev == "migrate_handle_rp_req_pages":
            a = RP.search(args)
            if a:
                # a request in the same RAM block as the one before carries
                # no block name (REQ_PAGES, not REQ_PAGES_ID): "(null)"
                rb = last_rb if a.group(1) == "(null)" else a.group(1)
                last_rb = rb
                rp.setdefault((rb, int(a.group(2), 16)), []).append(t)
        elif ev in ("get_queued_page", "get_queued_page_not_dirty"):
            a = QUEUED.search(args)
            if a:
                taken.setdefault((a.group(1), int(a.group(2), 16)), []).append((t, ev == "get_queued_page"))
    out = []
    parts = {"req": [], "src": [], "page": [], "total": []}
    # no_request: nothing on the source. The destination QEMU sends no request
    # for a page it has just received (not yet placed): such faults last a
    # few microseconds.
    counts = {"by_request": 0, "already_sent": 0, "no_request": 0}
    for total, tf, rb, off in got:
        key = (rb, off)
        t_rp = next((t for t in rp.get(key, []) if t >= tf), None)
        tq = None if t_rp is None else next((x for x in taken.get(key, []) if x[0] >= t_rp), None)
        if tq is None:
            counts["no_request"] += 1
            out.append(("no_request", None, None, None))
        elif not tq[1]:
            counts["already_sent"] += 1
            out.append(("already_sent", t_rp - tf, None, None))
        else:
            counts["by_request"] += 1
            d = (t_rp - tf, tq[0] - t_rp, total - (tq[0] - tf))
            out.append(("by_request",) + d)
            for k, v in zip(("req", "src", "page", "total"), d + (total,)):
                parts[k].append(v)
    r = dict(counts)
    for k in ("total", "req", "src", "page"):
        r.update(stats(parts[k], "sent_" + k + "_" if k != "total" else "sent_"))
    return r, out


def cmd_latency(a):
    if a.page_size <= 0 or a.page_size & (a.page_size - 1):
        sys.exit("pctrace.py: --page-size must be a power of two, not %d" % a.page_size)
    try:
        with open(a.log, errors="replace") as f:
            r, got = analyse(f, a.page_size, a.before_us)
        parts = None
        if a.src_log:
            with open(a.src_log, errors="replace") as f:
                more, parts = split(got, f)
            r.update(more)
    except OSError as e:
        sys.exit("pctrace.py: %s" % e)
    for kv in a.label:
        k, sep, v = kv.partition("=")
        if not sep:
            sys.exit("pctrace.py: --label wants k=v, not %r" % kv)
        r[k] = int(v) if v.isdigit() else v
    if a.latencies:
        # latency, then with --src-log: how it was answered and its parts
        with open(a.latencies, "w") as f:
            for i, g in enumerate(got):
                cols = [str(g[0])]
                if parts:
                    cols += ["-" if x is None else str(x) for x in parts[i]]
                f.write("\t".join(cols) + "\n")
    print(json.dumps(r, sort_keys=True))


def cmd_pace(a):
    """Direct arm: start the migration and switch after --after s. Both arms:
    wait for postcopy-active on the source, keep the window, lift the limit,
    print the lift time (us since the epoch). One QMP connection per QEMU, so
    a loaded host does not add a process start per poll."""
    src = QMP(a.src, timeout=a.timeout)
    # downtime-limit 0: precopy must not converge before the switch
    src.execute("migrate-set-parameters", {"downtime-limit": 0, "max-postcopy-bandwidth": a.pcbw})
    print("ready", flush=True)
    if a.direct_dst:
        dst = QMP(a.direct_dst, timeout=a.timeout)
        caps = {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
        src.execute("migrate-set-capabilities", caps)
        dst.execute("migrate-set-capabilities", caps)
        src.execute("migrate-set-parameters", {"max-bandwidth": a.max_bw})
        uri = "tcp:127.0.0.1:%d" % a.port
        dst.execute("migrate-incoming", {"uri": uri})
        src.execute("migrate", {"uri": uri})
        # as ferryctl does: --after counts from the status "active"
        deadline = time.monotonic() + a.timeout
        while src.execute("query-migrate", timeout=10).get("status") in ("none", "setup"):
            if time.monotonic() > deadline:
                raise QMPError("the direct migration did not become active within %g s" % a.timeout)
            time.sleep(0.005)
        time.sleep(a.after)
        src.execute("migrate-start-postcopy")
        dst.close()
    if not a.pcbw:
        # no window: the whole postcopy phase is measured, QEMU's default pace
        src.close()
        return
    deadline = time.monotonic() + a.timeout
    while True:
        st = src.execute("query-migrate", timeout=10).get("status")
        if st == "postcopy-active":
            break
        if st in ("completed", "failed", "cancelled", "postcopy-paused"):
            raise QMPError("the source is '%s' before its postcopy phase was seen" % st)
        if time.monotonic() > deadline:
            raise QMPError("no postcopy within %g s (source status '%s')" % (a.timeout, st))
        time.sleep(0.01)
    time.sleep(a.window)
    lift = int(time.time() * 1000000)
    st = src.execute("query-migrate", timeout=10).get("status")
    if st != "postcopy-active":
        raise QMPError("the postcopy phase ended before the window did (source status '%s'): "
                       "lower --postcopy-bw or --window" % st)
    src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": a.lift_bw})
    src.close()
    print("lift %d" % lift, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="sub", required=True)
    s = sub.add_parser("latency", help="fault-to-placement latencies from a trace log")
    s.add_argument("log")
    s.add_argument("--page-size", type=int, default=4096)
    s.add_argument("--before-us", type=int,
                   help="count only requests made before this time (microseconds since the epoch)")
    s.add_argument("--label", action="append", default=[], help="k=v added to the output")
    s.add_argument("--src-log", help="the source QEMU's trace (migrate_handle_rp_req_pages, get_queued_page, "
                   "get_queued_page_not_dirty): split each latency into its parts")
    s.add_argument("--latencies", help="also write every answered fault, one a line, to this file: latency (us), "
                   "and with --src-log kind, request path, source wait, page path (us)")
    s.set_defaults(fn=cmd_latency)
    s = sub.add_parser("pace", help="drive the postcopy window on the source QEMU")
    s.add_argument("--src", required=True, help="a QMP socket of the source QEMU")
    s.add_argument("--window", type=float, default=0)
    s.add_argument("--pcbw", type=int, required=True, help="max-postcopy-bandwidth (bytes/s) in the window; 0: unlimited, no window")
    s.add_argument("--max-bw", type=int, default=100000000000,
                   help="with --direct-dst: max-bandwidth, as ferryctl sets it (controlplane/migrate.c)")
    s.add_argument("--lift-bw", type=int, default=0, help="bytes/s set when the window ends")
    s.add_argument("--direct-dst", help="start a direct TCP migration to this destination QMP socket")
    s.add_argument("--port", type=int, help="with --direct-dst: the TCP port on 127.0.0.1")
    s.add_argument("--after", type=float, default=0.2, help="with --direct-dst: seconds from 'active' to the switch")
    s.add_argument("--timeout", type=float, default=60)
    s.set_defaults(fn=cmd_pace)
    a = p.parse_args()
    if a.sub == "pace" and a.direct_dst and not a.port:
        sys.exit("pctrace.py pace: --direct-dst needs --port")
    if a.sub == "pace" and a.pcbw and (a.window <= 0 or not a.lift_bw):
        sys.exit("pctrace.py pace: --pcbw > 0 needs --window > 0 and --lift-bw")
    try:
        a.fn(a)
    except QMPError as e:
        sys.exit("pctrace.py: %s" % e)


if __name__ == "__main__":
    main()
