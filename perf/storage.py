#!/usr/bin/env python3
"""One storage-migration run for perf/bench-storage.sh (stdlib only).

  storage.py run --arm direct --src SOCK --dst SOCK --disk NAME --nbd-port P --mig-port P
  storage.py run --arm ferry  --src SOCK --dst SOCK -- FERRYCTL ... migrate ...
  storage.py summarize RESULTS.jsonl

direct: QEMU's own flow, as a management layer drives it: the destination
QEMU serves its disk on TCP loopback (nbd-server-start + block-export-add,
writable); the source adds an nbd node on it and mirrors the disk into it
(blockdev-mirror sync=full); once the job is READY, RAM migrates straight
over TCP; after the source completed, block-job-cancel ends the ready mirror
(in sync: the source is stopped), and the destination stops its NBD server.
ferry: the command (ferryctl migrate --disk ...) does all of that itself.

Both arms are timed the same way from the source QEMU's own events (their
timestamps, so the script's polling does not matter): storage = the first
mirror job "created" until the last one "ready"; whole = the start of the
first command until the migration completed on both sides, the mirrors
concluded (and, for ferry, ferryctl exited). One JSON line is printed.
"""

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no perf/__pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMP, QMPError  # noqa: E402


def ev_time(ev):
    ts = ev.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


class Watch:
    """Mirror-job and migration state from the source's and destination's events."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.created = {}  # job id -> wall time of "created"
        self.ready = {}
        self.concluded = {}
        self.job_error = None
        self.mig = {"source": None, "destination": None}
        self.failed = None

    def pump(self, timeout):
        # ferryctl ends the source QEMU after the switch-over: a closed
        # monitor is the end of its events, not a failure by itself
        live = [q for q in (self.src, self.dst) if not q.closed]
        r = select.select([q.sock for q in live], [], [], timeout)[0] if live else []
        for q in live:
            if q.sock in r:
                try:
                    q.pump()
                except QMPError:
                    if not q.closed:
                        raise
        for ev in self.src.take_events("JOB_STATUS_CHANGE"):
            d = ev.get("data", {})
            jid, st = d.get("id"), d.get("status")
            if st == "created":
                self.created.setdefault(jid, ev_time(ev))
            elif st == "ready":
                self.ready.setdefault(jid, ev_time(ev))
            elif st in ("concluded", "null"):
                self.concluded.setdefault(jid, ev_time(ev))
        for ev in self.src.take_events("BLOCK_JOB_ERROR") + self.src.take_events("BLOCK_JOB_COMPLETED"):
            if ev.get("data", {}).get("error"):
                self.job_error = "%s: %s" % (ev["data"].get("device"), ev["data"]["error"])
        for q, side in ((self.src, "source"), (self.dst, "destination")):
            for ev in q.take_events("MIGRATION"):
                st = ev.get("data", {}).get("status")
                if st == "completed" and self.mig[side] is None:
                    self.mig[side] = ev_time(ev)
                elif st in ("failed", "cancelled"):
                    self.failed = "%s reported migration %s" % (side, st)

    def all_ready(self):
        return self.created and all(j in self.ready for j in self.created)

    def all_concluded(self):
        return self.created and all(j in self.concluded for j in self.created)


def wait(w, cond, deadline, what):
    while not cond():
        if w.failed or w.job_error:
            raise QMPError(w.failed or "mirror failed: " + w.job_error)
        if time.monotonic() > deadline:
            try:
                jobs = [(j["id"], j["status"]) for j in w.src.execute("query-jobs", timeout=5)]
            except QMPError as e:
                jobs = str(e)
            raise QMPError("timed out waiting for %s (jobs created %s, ready %s, concluded %s; source %s, "
                           "destination %s; query-jobs %s)" % (what, sorted(w.created), sorted(w.ready),
                                                               sorted(w.concluded), w.mig["source"],
                                                               w.mig["destination"], jobs))
        w.pump(0.05)


def run_direct(a, w, deadline):
    src, dst = w.src, w.dst
    if a.nbd_unix:  # a diagnostic variant: the same over a unix socket
        addr = {"type": "unix", "data": {"path": a.nbd_unix}}
        server = {"type": "unix", "path": a.nbd_unix}
    else:
        addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(a.nbd_port)}}
        server = dict(addr["data"], type="inet")
    dst.execute("nbd-server-start", {"addr": addr})
    dst.execute("block-export-add", {"type": "nbd", "id": "bench-" + a.disk, "node-name": a.dst_node,
                                     "name": a.disk, "writable": True})
    src.execute("blockdev-add", {"driver": "nbd", "node-name": "bench-tgt", "export": a.disk,
                                 "server": server})
    src.execute("blockdev-mirror", {"job-id": "bench-mirror", "device": a.disk, "target": "bench-tgt",
                                    "sync": "full"})
    wait(w, w.all_ready, deadline, "the mirror to get ready")
    dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:%d" % a.mig_port})
    src.execute("migrate", {"uri": "tcp:127.0.0.1:%d" % a.mig_port})
    wait(w, lambda: w.mig["source"] is not None, deadline, "the source to complete")
    src.execute("block-job-cancel", {"device": "bench-mirror"})

    # The job's last events were missed in ~1 run of 10 (query-jobs already
    # empty: auto-dismissed); its absence from query-jobs ends it just as well.
    def mirror_gone():
        if w.all_concluded():
            return True
        if any(j.get("id") == "bench-mirror" for j in src.execute("query-jobs")):
            return False
        w.concluded.setdefault("bench-mirror", time.time())
        return True
    wait(w, lambda: mirror_gone() and w.mig["destination"] is not None, deadline,
         "the mirror to end and the destination to complete")
    dst.execute("nbd-server-stop")
    src.execute("blockdev-del", {"node-name": "bench-tgt"})


def run_ferry(a, w, deadline, rec):
    log = open(a.exec_log, "w") if a.exec_log else subprocess.DEVNULL
    proc = subprocess.Popen(a.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise QMPError("ferryctl did not end within %d s" % a.timeout)
            w.pump(0.1)
        w.pump(0)
        rec["exec_rc"] = proc.returncode
        if proc.returncode != 0:
            raise QMPError("ferryctl exited %d" % proc.returncode)
        wait(w, lambda: w.mig["source"] is not None and w.mig["destination"] is not None, deadline,
             "both sides to report completed")
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def cmd_run(a):
    rec = {"arm": a.label or a.arm, "ok": False}
    src = dst = None
    try:
        src = QMP(a.src, name="source")
        dst = QMP(a.dst, name="destination")
        for q in (src, dst):
            q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        # QEMU 7.2 caps migration at 32 MiB/s by default
        src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        w = Watch(src, dst)
        t0_wall, t0 = time.time(), time.monotonic()
        deadline = t0 + a.timeout
        if a.arm == "direct":
            run_direct(a, w, deadline)
        else:
            run_ferry(a, w, deadline, rec)
        t1 = time.monotonic()
        if not w.all_ready() or not w.all_concluded():
            raise QMPError("not every mirror job went ready and concluded (%s)" % sorted(w.created))
        rec["storage_s"] = round(max(w.ready.values()) - min(w.created.values()), 3)
        rec["mirror_start_s"] = round(min(w.created.values()) - t0_wall, 3)
        rec["whole_s"] = round(t1 - t0, 3)
        if not src.closed:
            rec["downtime_ms"] = src.execute("query-migrate").get("downtime")
        rec["ok"] = True
    except QMPError as e:
        rec["error"] = str(e)
    for q in (src, dst):
        if q is not None:
            q.close()
    print(json.dumps(rec, sort_keys=True))
    return 0 if rec["ok"] else 3


def cmd_summarize(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    arms = []
    for r in rows:
        if r["arm"] not in arms:
            arms.append(r["arm"])
    med = {}
    for arm in arms:
        ok = [r for r in rows if r["arm"] == arm and r.get("ok")]
        if ok:
            med[arm] = (statistics.median(r["storage_s"] for r in ok), statistics.median(r["whole_s"] for r in ok),
                        len(ok))
    base = med.get("direct")
    print("%-12s %6s %10s %8s %10s %8s %10s" % ("arm", "runs", "storage_s", "ratio", "whole_s", "ratio", "disk_MB/s"))
    for arm in arms:
        if arm not in med:
            print("%-12s %6s %s" % (arm, 0, "FAILED: " + next(r.get("error", "?") for r in rows if r["arm"] == arm)))
            continue
        s, t, n = med[arm]
        # ratio = how many times faster than direct (direct time / this time): > 1 beats it
        rs = "%.2f" % (base[0] / s) if base else "-"
        rt = "%.2f" % (base[1] / t) if base else "-"
        print("%-12s %6d %10.2f %8s %10.2f %8s %10.0f" % (arm, n, s, rs, t, rt, a.size / 1e6 / s))
    return 0 if len(med) == len(arms) else 2


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sub", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arm", choices=("direct", "ferry"), required=True)
    r.add_argument("--label")
    r.add_argument("--src", required=True)
    r.add_argument("--dst", required=True)
    r.add_argument("--disk", default="vda")
    r.add_argument("--dst-node", default="vda-fmt")
    r.add_argument("--nbd-port", type=int)
    r.add_argument("--nbd-unix", help="direct: the NBD server on this unix socket instead of TCP")
    r.add_argument("--mig-port", type=int)
    r.add_argument("--timeout", type=int, default=600)
    r.add_argument("--exec-log")
    r.add_argument("cmd", nargs="*")
    s = sub.add_parser("summarize")
    s.add_argument("results")
    s.add_argument("--size", type=int, required=True)
    a = p.parse_args()
    if a.sub == "run":
        if a.arm == "direct" and not (a.nbd_port and a.mig_port):
            p.error("--arm direct needs --nbd-port and --mig-port")
        if a.arm == "ferry" and not a.cmd:
            p.error("--arm ferry needs the ferryctl command after --")
        return cmd_run(a)
    return cmd_summarize(a)


if __name__ == "__main__":
    sys.exit(main())
