#!/usr/bin/env python3
"""Small QMP driver used by perf/bench-migrate.sh (stdlib only).

Subcommands:
  ready SOCK [--timeout S]
      Wait until SOCK accepts, read the greeting, negotiate, print query-status.
  cmd SOCK JSON [JSON ...]
      Run commands ({"execute":..,"arguments":..}) in order; print each
      "return" value as one JSON line. A QMP error exits 1 with the message.
  migrate --src SOCK --dst SOCK (--uri URI --incoming URI | --exec CMD ...)
      Configure both sides (capabilities, parameters), start the incoming
      side and the outgoing side (or run CMD, which is expected to do it,
      e.g. ferryctl), wait until both sides report "completed", and print
      one JSON record with timings and the source's query-migrate stats.
  freeports N
      Print N currently free TCP ports on 127.0.0.1, one per line.
  summarize RESULTS.jsonl [--json OUT]
      Print the table (median per arm/multifd setting, ratio vs direct) and
      optionally write every run plus the summary as JSON.

Every wait is bounded; failures exit non-zero with a one-line reason on stderr.
"""

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time


class QMPError(Exception):
    pass


def pid_alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X", "")


class QMP:
    """One QMP connection. Replies are matched by id; events are queued."""

    def __init__(self, path, timeout=30.0, name=None, pid=None):
        self.path = path
        self.pid = pid
        self.name = name or os.path.basename(path)
        self.sock = None
        self.buf = b""
        self.events = []
        self.next_id = 1
        self.closed = False
        self._connect(timeout)

    def _connect(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                self.sock = s
                break
            except OSError as e:
                s.close()
                last = e
            if self.pid and not pid_alive(self.pid):
                raise QMPError("%s: process %d exited before its monitor came up" % (self.name, self.pid))
            if time.monotonic() >= deadline:
                raise QMPError("%s: cannot connect to %s: %s" % (self.name, self.path, last))
            time.sleep(0.05)
        self.sock.setblocking(False)
        greeting = self._read_msg(deadline)
        if "QMP" not in greeting:
            raise QMPError("%s: not a QMP greeting: %r" % (self.name, greeting))
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _fill(self, deadline):
        """Read once (waiting until deadline). Returns False on timeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        r, _, _ = select.select([self.sock], [], [], remaining)
        if not r:
            return False
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError as e:
            self.closed = True
            raise QMPError("%s: monitor read failed: %s" % (self.name, e))
        if not data:
            self.closed = True
            raise QMPError("%s: QEMU closed the monitor (process exited?)" % self.name)
        self.buf += data
        return True

    def _pop_line(self):
        nl = self.buf.find(b"\n")
        if nl < 0:
            return None
        line, self.buf = self.buf[:nl], self.buf[nl + 1:]
        line = line.strip()
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise QMPError("%s: malformed QMP line: %r" % (self.name, line[:200]))

    def _read_msg(self, deadline):
        while True:
            while b"\n" in self.buf:
                msg = self._pop_line()
                if msg is not None:
                    return msg
            if not self._fill(deadline):
                raise QMPError("%s: timed out waiting for QEMU" % self.name)

    def pump(self):
        """Non-blocking: read whatever is there, queue events. Returns count."""
        n = 0
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                break
            self._fill(time.monotonic() + 0.001)
            while b"\n" in self.buf:
                msg = self._pop_line()
                if msg is None:
                    continue
                if "event" in msg:
                    msg["_t"] = time.monotonic()
                    self.events.append(msg)
                    n += 1
        return n

    def execute(self, command, arguments=None, timeout=30.0, fds=None):
        cid = self.next_id
        self.next_id += 1
        req = {"execute": command, "id": cid}
        if arguments:
            req["arguments"] = arguments
        data = (json.dumps(req) + "\n").encode()
        deadline = time.monotonic() + timeout
        self.sock.setblocking(True)
        try:
            self.sock.settimeout(timeout)
            if fds:  # getfd: the descriptor rides on the command's own bytes
                sent = socket.send_fds(self.sock, [data], fds)
                data = data[sent:]
            self.sock.sendall(data)
        except OSError as e:
            raise QMPError("%s: cannot send %s: %s" % (self.name, command, e))
        finally:
            self.sock.settimeout(None)
            self.sock.setblocking(False)
        while True:
            msg = self._read_msg(deadline)
            if "event" in msg:
                msg["_t"] = time.monotonic()
                self.events.append(msg)
                continue
            if msg.get("id") != cid:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError("%s: %s: %s: %s" % (self.name, command, err.get("class"), err.get("desc")))
            return msg.get("return")

    def take_events(self, name):
        hit = [e for e in self.events if e.get("event") == name]
        self.events = [e for e in self.events if e.get("event") != name]
        return hit


def die(msg, code=1):
    sys.stderr.write("qmp.py: %s\n" % msg)
    sys.exit(code)


# ---------------------------------------------------------------- subcommands

def cmd_ready(a):
    q = QMP(a.sock, timeout=a.timeout, pid=a.pid)
    st = q.execute("query-status")
    print(json.dumps({"status": st.get("status"), "running": st.get("running"), "qemu": q.version}))
    q.close()


def cmd_cmd(a):
    q = QMP(a.sock, timeout=a.timeout)
    for text in a.commands:
        try:
            req = json.loads(text)
        except ValueError as e:
            die("bad JSON command %r: %s" % (text, e))
        ret = q.execute(req["execute"], req.get("arguments"), timeout=a.timeout)
        print(json.dumps(ret))
    q.close()


def configure(q, multifd, max_bw, set_params=True):
    caps = [{"capability": "events", "state": True}]
    if set_params:
        caps.append({"capability": "multifd", "state": multifd > 0})
    q.execute("migrate-set-capabilities", {"capabilities": caps})
    if not set_params:
        return
    params = {}
    if multifd > 0:
        params["multifd-channels"] = multifd
    if max_bw:
        params["max-bandwidth"] = max_bw
    if params:
        q.execute("migrate-set-parameters", params)


def hand_over_tcp_pair(src, dst):
    """A loopback TCP connection made here, its ends given to the two QEMUs
    as "fd:mig" (what ferry's single-channel handoff does, without ferry)."""
    lst = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lst.getsockname())
    acc, _ = lst.accept()
    lst.close()
    try:
        dst.execute("getfd", {"fdname": "mig"}, fds=[acc.fileno()])
        src.execute("getfd", {"fdname": "mig"}, fds=[c.fileno()])
    finally:
        acc.close()
        c.close()


def migration_status(q):
    info = q.execute("query-migrate", timeout=10)
    return info.get("status", "none"), info


def cmd_migrate(a):
    t_start = time.monotonic()
    src = QMP(a.src, timeout=a.connect_timeout, name="source")
    dst = QMP(a.dst, timeout=a.connect_timeout, name="destination")
    # The destination never needs max-bandwidth; it must match multifd.
    configure(src, a.multifd, a.max_bandwidth, set_params=a.configure)
    configure(dst, a.multifd, 0, set_params=a.configure)

    proc = None
    proc_out = None
    if a.exec_cmd:
        t0 = time.monotonic()
        proc_out = open(a.exec_log, "w+") if a.exec_log else subprocess.DEVNULL
        proc = subprocess.Popen(a.exec_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=proc_out, start_new_session=True)
    else:
        if not a.uri or not a.incoming:
            die("migrate: need --uri and --incoming (or --exec)")
        # The clock starts where ferryctl's does: before the destination is
        # told to listen (ferry's Prepare does that inside its wall time).
        t0 = time.monotonic()
        if a.tcp_pair:
            hand_over_tcp_pair(src, dst)
        dst.execute("migrate-incoming", {"uri": a.incoming})
        t_incoming = time.monotonic()
        src.execute("migrate", {"uri": a.uri})
        t_migrate = time.monotonic()

    done = {"source": None, "destination": None}
    failed = None
    proc_rc = None
    proc_stdout = b""
    next_poll = time.monotonic() + a.poll
    deadline = t0 + a.timeout
    progress = [None, time.monotonic()]
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                failed = "timed out after %.0f s (source %s, destination %s)" % (
                    a.timeout, done["source"] or "not done", done["destination"] or "not done")
                break
            rlist = [src.sock, dst.sock]
            if proc is not None and proc.stdout is not None:
                rlist.append(proc.stdout)
            wait = max(0.0, min(next_poll, deadline) - now)
            r, _, _ = select.select(rlist, [], [], wait)
            if proc is not None and proc.stdout is not None and proc.stdout in r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if chunk:
                    proc_stdout += chunk
                else:
                    proc.stdout.close()
                    proc.stdout = None
            for q, side in ((src, "source"), (dst, "destination")):
                if q.sock in r:
                    q.pump()
                for ev in q.take_events("MIGRATION"):
                    st = ev.get("data", {}).get("status")
                    if st == "completed" and done[side] is None:
                        done[side] = ev["_t"]
                    elif st in ("failed", "cancelled"):
                        failed = "%s reported migration %s" % (side, st)
            if proc is not None and proc_rc is None and proc.stdout is None:
                proc_rc = proc.wait()
                t_proc = time.monotonic()
                if proc_rc != 0:
                    failed = failed or "command exited with status %d" % proc_rc
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + a.poll
                for q, side in ((src, "source"), (dst, "destination")):
                    if done[side] is None:
                        st, info = migration_status(q)
                        if st == "completed":
                            done[side] = time.monotonic()
                        elif st in ("failed", "cancelled"):
                            failed = failed or "%s reported migration %s" % (side, st)
                        elif side == "source" and a.stall > 0 and st != "none":
                            # A stream that stops moving (e.g. QEMU 7.2 took a
                            # multifd connection for the main channel) would
                            # otherwise sit until --timeout.
                            now = time.monotonic()
                            moved = (st, info.get("ram", {}).get("transferred", 0))
                            if moved != progress[0]:
                                progress[:] = [moved, now]
                            elif now - progress[1] > a.stall:
                                failed = "stalled: source %s, %d bytes sent, no progress for %.0f s" % (
                                    st, moved[1], a.stall)
            if failed:
                break
            if done["source"] and done["destination"] and (proc is None or proc_rc is not None):
                break
    except QMPError as e:
        failed = str(e)

    if proc is not None and proc_rc is None:
        # Migration done (or failed) but the command still runs: give it a
        # little time, then stop it.
        try:
            proc_rc = proc.wait(timeout=a.exec_grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc_rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc_rc = proc.wait()
            failed = failed or "command did not exit after the migration ended"
        if proc.stdout is not None:
            proc_stdout += proc.stdout.read()
        t_proc = time.monotonic()

    rec = {"ok": failed is None, "multifd": a.multifd}
    if failed:
        rec["error"] = failed
    info = {}
    try:
        # QEMU 7.2 flips the state to "completed" a moment before it fills
        # in total-time/downtime; query until they are there (bounded).
        for _ in range(100):
            _, info = migration_status(src)
            if info.get("status") != "completed" or info.get("total-time"):
                break
            time.sleep(0.02)
    except QMPError as e:
        rec.setdefault("error", str(e))
        rec["ok"] = False
    ends = [t for t in done.values() if t is not None]
    if proc is not None:
        ends.append(t_proc)
        rec["exec_rc"] = proc_rc
        text = proc_stdout.decode(errors="replace").strip()
        try:
            rec["exec_json"] = json.loads(text) if text else None
        except ValueError:
            rec["exec_stdout"] = text[-4000:]
    if rec["ok"] and ends:
        rec["wall_s"] = round(max(ends) - t0, 4)
        rec["src_done_s"] = round(done["source"] - t0, 4) if done["source"] else None
        rec["dst_done_s"] = round(done["destination"] - t0, 4) if done["destination"] else None
        rec["phases"] = phases(rec, t0, done, t_proc if proc is not None else None,
                               None if proc is not None else (t_incoming, t_migrate))
    ram = info.get("ram", {})
    rec["status"] = info.get("status")
    for k in ("total-time", "setup-time", "downtime"):
        if k in info:
            rec[k.replace("-", "_") + "_ms"] = info[k]
    for k in ("transferred", "total", "normal", "duplicate", "multifd-bytes", "mbps",
              "dirty-sync-count", "pages-per-second"):
        if k in ram:
            rec["ram_" + k.replace("-", "_")] = ram[k]
    tt, st = info.get("total-time"), info.get("setup-time", 0)
    if rec["ok"] and tt and ram.get("transferred") and tt - st > 0:
        rec["throughput_MiBps"] = round(ram["transferred"] / ((tt - st) / 1000.0) / 2**20, 1)
    if rec["ok"] and ram.get("total") and ram.get("transferred", 0) < 0.99 * ram.get("normal", 0) * 4096:
        rec["ok"] = False
        rec["error"] = "transferred %d bytes < normal pages" % ram.get("transferred", 0)
    rec["setup_s"] = round(t0 - t_start, 3)
    if a.verify and rec["ok"]:
        tv = time.monotonic()
        same, why = files_equal(*a.verify)
        rec["verified"] = same
        rec["verify_s"] = round(time.monotonic() - tv, 3)
        if not same:
            rec["ok"] = False
            rec["error"] = "destination RAM differs from source: " + why
    for kv in a.label:
        k, _, v = kv.partition("=")
        try:
            rec[k] = json.loads(v)
        except ValueError:
            rec[k] = v
    src.close()
    dst.close()
    if proc_out not in (None, subprocess.DEVNULL):
        proc_out.close()
    print(json.dumps(rec, sort_keys=True))
    sys.exit(0 if rec["ok"] else 3)


def phases(rec, t0, done, t_proc, direct_marks):
    """Where the wall time went, every moment in seconds since t0 (the
    start of the user's command), on one clock (CLOCK_MONOTONIC is shared
    by every process of the host). Direct: the two QMP commands. ferry:
    ferryctl's start, the source daemon's steps (migrate-status "phases"),
    ferryctl seeing the end. Both: each QEMU's MIGRATION completed event as
    this script saw it, and the end of the command."""
    ph = {}
    if direct_marks:
        ph["incoming"], ph["migrate"] = direct_marks[0] - t0, direct_marks[1] - t0
    j = rec.get("exec_json") or {}
    ctl = j.get("ctl") or {}
    if ctl.get("start_mono"):
        ph["ctl_start"] = ctl["start_mono"] - t0
    t0d = j.get("t0_mono")
    if t0d:
        ph["daemon_t0"] = t0d - t0
        for k, v in (j.get("phases") or {}).items():
            ph["d_" + k] = t0d + v - t0
    if ctl.get("seen_mono"):
        ph["ctl_seen"] = ctl["seen_mono"] - t0
    if t_proc is not None:
        ph["ctl_exit"] = t_proc - t0
    if done["source"]:
        ph["src_completed"] = done["source"] - t0
    if done["destination"]:
        ph["dst_completed"] = done["destination"] - t0
    return {k: round(v, 4) for k, v in sorted(ph.items(), key=lambda kv: kv[1])}


def files_equal(a, b, chunk=8 << 20):
    """Compare two files; returns (equal, reason)."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return False, "sizes %d != %d" % (sa, sb)
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                for i in range(0, len(x), 4096):
                    if x[i:i + 4096] != y[i:i + 4096]:
                        return False, "first difference in page at offset %#x" % (off + i)
                return False, "short read at %#x" % off
            if not x:
                return True, ""
            off += len(x)


def cmd_freeports(a):
    socks, ports = [], []
    try:
        while len(ports) < a.n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            if p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    print("\n".join(str(p) for p in ports))


# ---------------------------------------------------------------- summary

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def phase_medians(runs):
    """Median moment of every phase over the runs, in the order they happen,
    plus QEMU's own total-time (ms -> s) for comparison."""
    keys = {}
    for r in runs:
        for k in (r.get("phases") or {}):
            keys.setdefault(k, None)
    med = {k: median([(r.get("phases") or {}).get(k) for r in runs]) for k in keys}
    out = {k: v for k, v in sorted(med.items(), key=lambda kv: kv[1]) if v is not None}
    tt = median([r.get("total_time_ms") for r in runs])
    if tt:
        out["qemu_total"] = tt / 1000.0
    return out


def cmd_summarize(a):
    runs = []
    meta = {}
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("kind") == "meta":
                meta = r
            else:
                runs.append(r)
    groups = {}
    order = []
    for r in runs:
        key = (r["arm"], r["multifd"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    summary = []
    for key in order:
        rs = groups[key]
        ok = [r for r in rs if r.get("ok")]
        s = {
            "arm": key[0], "multifd": key[1], "runs": len(rs), "ok": len(ok),
            "skipped": all(r.get("skipped") for r in rs),
            "throughput_MiBps": median([r.get("throughput_MiBps") for r in ok]),
            "wall_s": median([r.get("wall_s") for r in ok]),
            "wall_min_s": min([r["wall_s"] for r in ok if r.get("wall_s")], default=None),
            "wall_max_s": max([r["wall_s"] for r in ok if r.get("wall_s")], default=None),
            "phases": phase_medians(ok),
            # The wall time beyond QEMU's own total-time: set-up before the
            # migrate command and the tail after QEMU's completion. Per run,
            # so it shows the transport's fixed cost even when the host's
            # load swings QEMU's own time from run to run.
            "extra_ms": median([1000 * r["wall_s"] - r["total_time_ms"] for r in ok
                                if r.get("wall_s") and r.get("total_time_ms")]),
            "total_time_ms": median([r.get("total_time_ms") for r in ok]),
            "retries": sum(r.get("attempt", 1) - 1 for r in rs),
            "cpu_s": {k: median([r.get("cpu_%s_s" % k) for r in ok])
                      for k in ("src_qemu", "dst_qemu", "helpers")},
        }
        summary.append(s)
    direct = {s["multifd"]: s for s in summary if s["arm"] == "direct" and s["ok"]}
    for s in summary:
        d = direct.get(s["multifd"])
        s["ratio_throughput"] = (round(s["throughput_MiBps"] / d["throughput_MiBps"], 3)
                                 if d and s["throughput_MiBps"] and d["throughput_MiBps"] else None)
        s["ratio_wall"] = (round(s["wall_s"] / d["wall_s"], 3)
                           if d and s["wall_s"] and d["wall_s"] else None)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    hdr = "%-8s %-8s %8s %12s %9s %9s %13s %9s %10s %10s" % (
        "arm", "multifd", "ok/tries", "MiB/s(med)", "Gbit/s", "wall s", "wall min-max", "extra ms", "thr/direct",
        "wall/direct")
    lines = [hdr, "-" * len(hdr)]
    for s in summary:
        if s["skipped"]:
            lines.append("%-8s %-8s %8s   (skipped: %s)" % (
                s["arm"], "off" if s["multifd"] == 0 else s["multifd"], "-",
                groups[(s["arm"], s["multifd"])][0].get("error", "")))
            continue
        thr = s["throughput_MiBps"]
        lines.append("%-8s %-8s %8s %12s %9s %9s %13s %9s %10s %10s" % (
            s["arm"], "off" if s["multifd"] == 0 else s["multifd"],
            "%d/%d" % (s["ok"], s["runs"]), fmt(thr, ".1f"),
            fmt(thr * 2**20 * 8 / 1e9 if thr else None, ".2f"),
            fmt(s["wall_s"], ".3f"),
            "-" if s["wall_min_s"] is None else "%.3f-%.3f" % (s["wall_min_s"], s["wall_max_s"]),
            fmt(s["extra_ms"], ".0f"), fmt(s["ratio_throughput"], ".3f"), fmt(s["ratio_wall"], ".3f")))
    print("\n".join(lines))
    print("extra ms: median over the runs of (wall - QEMU's total-time): what the path adds around QEMU's migration")
    ph_lines = []
    for s in summary:
        if s["phases"]:
            ph_lines.append("%-11s %-4s %s" % (s["arm"], "off" if s["multifd"] == 0 else s["multifd"],
                            "  ".join("%s %.0f" % (k, v * 1000) for k, v in s["phases"].items())))
    if ph_lines:
        print("\nphases (median ms since the command started; d_* = source ferryd's steps, "
              "*_completed = QEMU's event; qemu_total = QEMU's own total-time):")
        print("\n".join(ph_lines))
    cpu_lines = ["%-11s %-4s %8s %8s %8s" % (
        s["arm"], "off" if s["multifd"] == 0 else s["multifd"],
        *(fmt(s["cpu_s"][k], ".2f") for k in ("src_qemu", "dst_qemu", "helpers")))
        for s in summary if not s["skipped"] and any(v is not None for v in s["cpu_s"].values())]
    if cpu_lines:
        print("\nCPU seconds per run (median; QEMU's include start-up and the destination's prealloc;"
              " helpers = ferryd or socat):")
        print("%-11s %-4s %8s %8s %8s" % ("arm", "mf", "src QEMU", "dst QEMU", "helpers"))
        print("\n".join(cpu_lines))
    fails = [r for r in runs if not r.get("ok") and not r.get("skipped")]
    if fails:
        print("\nfailed runs:")
        for r in fails:
            print("  %s multifd=%s run %s attempt %s: %s" % (
                r["arm"], r["multifd"], r.get("run"), r.get("attempt"), r.get("error")))
    if any(r["arm"].startswith("socat") and r["multifd"] > 0 for r in fails):
        print("  note: QEMU 7.2 gives incoming connections their role by arrival order (first ="
              " main channel);\n  socat's forked children connect independently and can reorder"
              " them, which fails\n  or stalls such a run; it is retried and counted in ok/tries.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=2, sort_keys=True)
            f.write("\n")
        print("\nJSON written to %s" % a.json)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="sub", required=True)

    p = sub.add_parser("ready")
    p.add_argument("sock")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--pid", type=int, help="give up as soon as this process is gone")
    p.set_defaults(fn=cmd_ready)

    p = sub.add_parser("cmd")
    p.add_argument("sock")
    p.add_argument("commands", nargs="+")
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(fn=cmd_cmd)

    p = sub.add_parser("migrate")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--uri")
    p.add_argument("--incoming")
    p.add_argument("--tcp-pair", action="store_true",
                   help="make a loopback TCP connection and give its ends to both QEMUs as fd 'mig'")
    p.add_argument("--multifd", type=int, default=0)
    p.add_argument("--max-bandwidth", type=int, default=1 << 40)
    p.add_argument("--no-configure", dest="configure", action="store_false",
                   help="only enable the events capability; leave multifd/parameters to --exec")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--connect-timeout", type=float, default=30)
    p.add_argument("--poll", type=float, default=0.25)
    p.add_argument("--stall", type=float, default=10,
                   help="fail when the source sends nothing for this long (0: never)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="extra field for the record (value parsed as JSON if it can be)")
    p.add_argument("--verify", nargs=2, metavar=("SRC_FILE", "DST_FILE"),
                   help="after completion, compare the two RAM backing files")
    p.add_argument("exec_cmd", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS...: command that performs the migration (e.g. ferryctl)")
    p.add_argument("--exec-log", default=None, help="file for the command's stderr")
    p.add_argument("--exec-grace", type=float, default=10)
    p.set_defaults(fn=cmd_migrate)

    p = sub.add_parser("freeports")
    p.add_argument("n", type=int)
    p.set_defaults(fn=cmd_freeports)

    p = sub.add_parser("summarize")
    p.add_argument("results")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_summarize)

    a = ap.parse_args()
    if getattr(a, "exec_cmd", None) and a.exec_cmd[0] == "--":
        a.exec_cmd = a.exec_cmd[1:]
    try:
        a.fn(a)
    except QMPError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)


if __name__ == "__main__":
    main()
