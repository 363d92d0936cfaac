#!/usr/bin/env python3
"""streamcheck.py - a unix-socket server and client that prove a tunnel carries
connections whole and in order (ferry's tunnel tests).

  streamcheck.py serve PATH LOG
      accept connections on PATH for ever; for each one read an 8-byte
      connection tag, then everything up to EOF, and answer
      "<tag> <bytes> <sha256>\\n" before closing. Appends "<accept#> <tag>" to
      LOG as each connection is accepted (the order the far side saw).
  streamcheck.py client PATH TAG1,TAG2,... BYTES [TIMEOUT]
      connect all tags in the order given, one right after the other (tag
      sent at once), then send BYTES random bytes on each (in parallel), half
      close, and check every answer: prints "ok TAG BYTES" or "BAD TAG why"
      per connection; exit status 0 only if all are ok.
"""
import hashlib, os, socket, sys, threading

def serve(path, log):
    if os.path.exists(path):
        os.unlink(path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(64)
    n = 0
    lock = threading.Lock()
    def one(c, k):
        try:
            tag = b""
            while len(tag) < 8:
                r = c.recv(8 - len(tag))
                if not r:
                    return
                tag += r
            with lock, open(log, "a") as f:
                f.write("%d %s\n" % (k, tag.decode(errors="replace").strip()))
            h = hashlib.sha256()
            total = 0
            while True:
                r = c.recv(1 << 20)
                if not r:
                    break
                h.update(r)
                total += len(r)
            c.sendall(("%s %d %s\n" % (tag.decode().strip(), total, h.hexdigest())).encode())
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = ls.accept()
        # read the tag in accept order, so the log shows the order connections arrived
        threading.Thread(target=one, args=(c, n), daemon=True).start()
        n += 1

def client(path, tags, nbytes, timeout):
    conns = []
    for t in tags:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(t.ljust(8)[:8].encode())
        conns.append(s)
    results = {}
    def run(t, s):
        try:
            h = hashlib.sha256()
            left = nbytes
            while left > 0:
                b = os.urandom(min(left, 1 << 20))
                h.update(b)
                s.sendall(b)
                left -= len(b)
            s.shutdown(socket.SHUT_WR)
            ans = b""
            while not ans.endswith(b"\n"):
                r = s.recv(4096)
                if not r:
                    break
                ans += r
            want = "%s %d %s" % (t, nbytes, h.hexdigest())
            got = ans.decode(errors="replace").strip()
            results[t] = "ok %s %d" % (t, nbytes) if got == want else "BAD %s answer %r, want %r" % (t, got, want)
        except OSError as e:
            results[t] = "BAD %s %s" % (t, e)
        finally:
            s.close()
    th = [threading.Thread(target=run, args=(t, s)) for t, s in zip(tags, conns)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    ok = True
    for t in tags:
        print(results.get(t, "BAD %s no result" % t))
        ok = ok and results.get(t, "").startswith("ok ")
    return 0 if ok else 1

if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 5 and sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]),
                        float(sys.argv[5]) if len(sys.argv) > 5 else 60))
    else:
        sys.exit(__doc__)
