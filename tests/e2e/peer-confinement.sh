#!/usr/bin/env bash
# peer-confinement.sh - a peer daemon (anyone with credentials for the
# control port: here a TLS client with a certificate of the daemon's CA) must
# not point this daemon at sockets outside its --allow-dir (above all its own
# admin socket, directly, by name or through a symbolic link), and must not
# act on sessions another connection opened.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

ferry_init --shm 16M --timeout 60
allow=$QEMU_DIR/allowed
mkdir -p "$allow"
ferry_make_x509 "$QEMU_DIR/x509/b" "$QEMU_DIR/x509/ca" host-b || ferry_fail "making b's certificate failed"
ferry_make_x509 "$QEMU_DIR/x509/peer" "$QEMU_DIR/x509/ca" peer || ferry_fail "making the peer's certificate failed"
ferry_start_daemon b --allow-dir "$allow" --tls-x509 "$QEMU_DIR/x509/b" || ferry_fail "starting ferryd b failed"
admin=${FERRY_ADMIN[b]}
ln -s "$admin" "$allow/innocent.sock"

# talk JSON lines to the control port the way a peer daemon would
results=$(python3 - "${FERRY_LISTEN[b]}" "$admin" "$allow" "$QEMU_DIR/x509/peer" <<'PY'
import json, socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
admin, allow, cred = sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cred + "/ca-cert.pem")
ctx.load_cert_chain(cred + "/server-cert.pem", cred + "/server-key.pem")
def conn():
    s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host)
    return s, s.makefile("rw")
def call(f, req):
    f.write(json.dumps(req) + "\n"); f.flush()
    return json.loads(f.readline())
s1, f1 = conn()
# (a bare name resolves inside the first --allow-dir, so it cannot reach the admin socket)
for name, target in [("admin-by-path", admin),
                     ("symlink-to-admin", allow + "/innocent.sock"), ("outside", "/etc/x.sock"),
                     ("dotdot", allow + "/../admin.sock")]:
    r = call(f1, {"cmd": "session-open", "target": target, "streams": 1})
    print(name, "refused" if not r["ok"] else "ACCEPTED", r.get("error", ""))
ok = call(f1, {"cmd": "session-open", "target": allow + "/fine.sock", "streams": 1})
print("allowed-target", "accepted" if ok["ok"] else "REFUSED", ok.get("error", ""))
s2, f2 = conn()
for cmd in ("session-close", "migrate-abort", "migrate-finish", "migrate-handoff"):
    r = call(f2, {"cmd": cmd, "session": ok.get("session", 0)})
    print("foreign-" + cmd, "refused" if not r["ok"] else "ACCEPTED", r.get("error", ""))
r = call(f1, {"cmd": "session-close", "session": ok.get("session", 0)})
print("own-session-close", "accepted" if r["ok"] else "REFUSED", r.get("error", ""))
PY
) || ferry_fail "control-port client failed"
echo "$results"
bad=$(echo "$results" | grep -E " (ACCEPTED|REFUSED) ")
[ -z "$bad" ] || ferry_fail "wrong answers: $bad"
[ "$(echo "$results" | wc -l)" -eq 10 ] || ferry_fail "expected 10 answers"
echo "$results" | grep -q "^symlink-to-admin refused .*symbolic link" || ferry_fail "the symlink was not refused as a link"
echo "$results" | grep -q "^foreign-session-close refused .*not opened on this connection" || ferry_fail "ownership message missing"
ferry_ping b || ferry_fail "ferryd b does not answer ping afterwards"
echo "PASS peer-confinement in $(ferry_elapsed)s"
exit 0
