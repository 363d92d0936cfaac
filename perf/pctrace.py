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


def analyse(lines, page_size, before_us=None):
    mask = ~(page_size - 1)
    pending = {}  # page -> request time (us) of its first unanswered request
    lat = []
    faults = repeats = placed = 0
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        t = int(m.group(1)) * 1000000 + int(m.group(2))
        ev, args = m.group(3), m.group(4)
        if ev == "postcopy_ram_fault_thread_request":
            a = HVA.search(args)
            if not a:
                continue
            if before_us is not None and t >= before_us:
                continue
            page = int(a.group(1), 16) & mask
            faults += 1
            if page in pending:
                repeats += 1
            else:
                pending[page] = t
        elif ev in ("postcopy_place_page", "postcopy_place_page_zero"):
            a = HOST.search(args)
            if not a:
                continue
            placed += 1
            page = int(a.group(1), 16) & mask
            t0 = pending.pop(page, None)
            if t0 is not None:
                lat.append(t - t0)
    lat.sort()
    r = {"faults": faults, "matched": len(lat), "unmatched": len(pending), "repeats": repeats,
         "placed": placed}
    if lat:
        r.update({"median_us": percentile(lat, 50), "p90_us": percentile(lat, 90),
                  "p99_us": percentile(lat, 99), "max_us": lat[-1],
                  "mean_us": round(sum(lat) / len(lat), 1)})
    return r, lat


def cmd_latency(a):
    if a.page_size <= 0 or a.page_size & (a.page_size - 1):
        sys.exit("pctrace.py: --page-size must be a power of two, not %d" % a.page_size)
    try:
        with open(a.log, errors="replace") as f:
            r, lat = analyse(f, a.page_size, a.before_us)
    except OSError as e:
        sys.exit("pctrace.py: %s" % e)
    for kv in a.label:
        k, sep, v = kv.partition("=")
        if not sep:
            sys.exit("pctrace.py: --label wants k=v, not %r" % kv)
        r[k] = int(v) if v.isdigit() else v
    if a.latencies:
        with open(a.latencies, "w") as f:
            f.writelines("%d\n" % x for x in lat)
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
    s.add_argument("--latencies", help="also write every matched latency (us), one a line, to this file")
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
    s.add_argument("--after", type=float, default=0.2, help="with --direct-dst: seconds before the switch")
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
