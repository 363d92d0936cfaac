#!/usr/bin/env python3
"""nbdcheck.py - checks of ferry's NBD endpoint from real clients.

  nbdcheck.py ops SOCKET IMAGE
      libnbd (python3-libnbd) against ferry's socket: unaligned writes up to
      the export's odd end, zeroes (with NO_HOLE and FAST_ZERO where offered),
      trim, flush, block status, a read past the end refused; after a flush
      the target IMAGE (the export's backing file) holds what was written.
  nbdcheck.py raw SOCKET CASE
      a hand-made client: fixed newstyle handshake with NBD_OPT_GO, then one
      malformed request; prints what the server answered. CASE: bad-magic,
      unknown-cmd, past-end, write-past-end, oversized-read, oversized-write,
      bad-flags, mid-write (disconnect inside a WRITE's payload),
      mid-read (disconnect with a READ in flight), bad-option.
  nbdcheck.py hold SOCKET SECONDS
      libnbd: write 64 KiB every 10 ms (with a flush every 50) until a
      request fails; prints "started" after the first one. Exit 0 when a
      request failed (the error printed), 1 when all of SECONDS passed.
  nbdcheck.py latefail SOCKET TRIGGER
      libnbd: a write and a flush succeed; then TRIGGER is created (the
      target starts failing writes: nbdkit's error filter) and one more
      write goes out: that write or, at the latest, the next flush must
      fail, and so must a read after it (ferry answers writes early,
      docs/nbd.md: a failure may not go unreported).
Exit 0 when every check held, 1 with the reason otherwise.
"""
import os
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
EINVAL, ENOSPC, EOVERFLOW = 22, 28, 75


def fail(msg):
    print("nbdcheck: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def ops(sock, image):
    import nbd
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_unix(sock)
    size = h.get_size()
    if size != os.path.getsize(image):
        fail("export size %d, image %d" % (size, os.path.getsize(image)))
    for what in ("can_flush", "can_trim", "can_zero", "can_fua", "can_df"):
        if not getattr(h, what)():
            fail("the export does not offer %s" % what)
    model = bytearray(size)
    with open(image, "rb") as f:
        model[:] = f.read()

    def write(off, data, flags=0):
        h.pwrite(data, off, flags)
        model[off:off + len(data)] = data

    # unaligned writes, one touching the last (odd) byte
    write(1, os.urandom(511))
    write(4097, os.urandom(3 * 4096 + 17))
    write(size - 777, os.urandom(777))
    write(12345, os.urandom(1000), nbd.CMD_FLAG_FUA)
    # many writes in flight at once (the async API keeps them outstanding)
    pending = []
    for i in range(64):
        off = (i * 65537) % (size - 70000)
        data = os.urandom(60000 + i)
        pending.append(h.aio_pwrite(data, off))
        model[off:off + len(data)] = data
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in pending:
        if not h.aio_command_completed(c):
            fail("an asynchronous write did not complete")
    # zeroes: plain, NO_HOLE, FAST_ZERO when offered
    h.zero(100000, 3333)
    model[3333:3333 + 100000] = bytes(100000)
    h.zero(50001, 200003, nbd.CMD_FLAG_NO_HOLE)
    model[200003:200003 + 50001] = bytes(50001)
    if h.can_fast_zero():
        try:
            h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
            model[8192:8192 + 4096] = bytes(4096)
        except nbd.Error as e:
            if e.errno != "ENOTSUP":
                raise
    # trim: the content after it is unspecified, write it again afterwards
    h.trim(65536, 1 << 20)
    write(1 << 20, os.urandom(65536))
    h.flush()
    got = h.pread(size, 0)
    if got != bytes(model):
        fail("reading the export back differs from what was written")
    # a read whose end is the export's end, and one across it
    if h.pread(1000, size - 1000) != bytes(model[size - 1000:]):
        fail("the tail read differs")
    try:
        h.pread(4096, size - 100)
        fail("a read past the end succeeded")
    except nbd.Error as e:
        if e.errno != "EINVAL":
            fail("a read past the end got %s, not EINVAL" % e.errno)
    # block status covers the export
    seen = []

    def extent(meta, offset, entries, err):
        seen.extend(entries)
        return 0
    h.block_status(size, 0, extent)
    if not seen or sum(seen[0::2]) < min(size, 1):
        fail("block status returned no extents: %r" % seen)
    h.shutdown()
    with open(image, "rb") as f:
        if f.read() != bytes(model):
            fail("the target image differs from what was written")
    print("ops: ok (%d bytes)" % size)


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        r = s.recv(n - len(b))
        if not r:
            raise EOFError("server closed after %d of %d bytes" % (len(b), n))
        b += r
    return b


def handshake(sock):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sock)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT or not flags & 1:
        fail("bad greeting")
    s.sendall(struct.pack(">I", 1 | (flags & 2)))
    name = b""
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    size = None
    while True:
        m, o, t, ln = struct.unpack(">QIII", recv_exact(s, 20))
        d = recv_exact(s, ln)
        if m != REPMAGIC:
            fail("bad option reply magic")
        if t == 3 and struct.unpack(">H", d[:2])[0] == 0:
            size = struct.unpack(">Q", d[2:10])[0]
        if t == 1:
            break
        if t & 0x80000000:
            fail("NBD_OPT_GO refused: %r" % d)
    return s, size


def request(s, typ, off, length, flags=0, cookie=7, magic=REQ_MAGIC, payload=b""):
    s.sendall(struct.pack(">IHHQQI", magic, flags, typ, cookie, off, length) + payload)


def simple_reply(s):
    m, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    if m != SIMPLE_MAGIC:
        fail("expected a simple reply, got magic 0x%x" % m)
    return err, cookie


def expect_closed(s):
    try:
        r = s.recv(1)
    except ConnectionResetError:
        return
    if r:
        fail("the server did not close the connection")


def raw(sock, case):
    if case == "bad-option":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(sock)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 1))
        # an option whose length field lies past the limit
        s.sendall(struct.pack(">QII", IHAVEOPT, 7, 0x7FFFFFFF))
        expect_closed(s)
        print("bad-option: closed")
        return
    s, size = handshake(sock)
    if case == "bad-magic":
        request(s, 0, 0, 512, magic=0x12345678)
        expect_closed(s)
    elif case == "unknown-cmd":
        request(s, 99, 0, 512)
        err, c = simple_reply(s)
        if err != EINVAL or c != 7:
            fail("unknown command answered %d" % err)
    elif case == "past-end":
        request(s, 0, size, 512)
        err, _ = simple_reply(s)
        if err != EINVAL:
            fail("read past end answered %d" % err)
        request(s, 0, (1 << 64) - 256, 512)  # offset + length overflows
        err, _ = simple_reply(s)
        if err != EINVAL:
            fail("read at 2^64-256 answered %d" % err)
    elif case == "write-past-end":
        request(s, 1, size - 10, 512, payload=os.urandom(512))
        err, _ = simple_reply(s)
        if err != ENOSPC:
            fail("write past end answered %d" % err)
    elif case == "oversized-read":
        request(s, 0, 0, 0xFFFFFFFF)
        err, _ = simple_reply(s)
        if err != EOVERFLOW:
            fail("oversized read answered %d" % err)
    elif case == "oversized-write":
        request(s, 1, 0, 0xFFFFFFF0)
        expect_closed(s)
    elif case == "bad-flags":
        request(s, 0, 0, 512, flags=0x8000)
        err, _ = simple_reply(s)
        if err != EINVAL:
            fail("bad flags answered %d" % err)
    elif case == "mid-write":
        request(s, 1, 0, 1 << 20, payload=os.urandom(1000))
        s.close()
        print("mid-write: sent")
        return
    elif case == "mid-read":
        for i in range(16):
            request(s, 0, 0, min(size, 4 << 20), cookie=i)
        s.close()
        print("mid-read: sent")
        return
    else:
        fail("unknown case " + case)
    # after an error reply the connection still serves
    if case not in ("bad-magic", "oversized-write"):
        request(s, 0, 0, 512, cookie=42)
        err, c = simple_reply(s)
        if err or c != 42:
            fail("a good read after the bad request failed: %d" % err)
        recv_exact(s, 512)
        request(s, 2, 0, 0)
    print("%s: ok" % case)


def hold(sock, seconds):
    import time
    import nbd
    h = nbd.NBD()
    h.connect_unix(sock)
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            h.pwrite(os.urandom(65536), (n * 65536) % (h.get_size() - 65536))
            n += 1
            if n == 1:
                print("started", flush=True)
            if n % 50 == 0:
                h.flush()
            time.sleep(0.01)
    except nbd.Error as e:
        print("failed after %d writes: %s" % (n, e), flush=True)
        return
    fail("no request failed in %s s" % seconds)


def latefail(sock, trigger):
    import nbd
    h = nbd.NBD()
    h.connect_unix(sock)
    h.pwrite(b"a" * 65536, 0)
    h.flush()
    open(trigger, "w").close()
    try:
        h.pwrite(b"b" * 65536, 65536)
        how = "the write was answered early"
        try:
            h.flush()
        except nbd.Error as e:
            how += ", the flush failed (%s)" % e
        else:
            fail("a flush succeeded after a write the target failed")
        try:
            h.pread(4096, 0)
        except nbd.Error:
            pass
        else:
            fail("a read succeeded after a write answered early failed at the target")
    except nbd.Error as e:
        how = "the write failed (%s)" % e
    print("latefail: ok: %s" % how)


def main():
    if len(sys.argv) < 4:
        fail(__doc__)
    if sys.argv[1] == "ops":
        ops(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "latefail":
        latefail(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "raw":
        raw(sys.argv[2], sys.argv[3])
    else:
        fail("unknown mode " + sys.argv[1])


if __name__ == "__main__":
    main()
