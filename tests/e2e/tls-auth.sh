#!/usr/bin/env bash
# tls-auth.sh - the control connection between daemons is TLS and both ends
# prove who they are:
#  (0) ferryd refuses to start without credentials (naming --tls-psk,
#      --tls-x509 and --insecure-no-tls), or with a key file others can read
#  (1) two daemons with the same pre-shared key carry a tunnel
#  (2) a daemon with another key for the same identity, or with an identity
#      the far side does not list, is refused: tunnel-open says
#      "authentication failed", the refusing daemon logs the peer's address
#      and the reason; once listed, the identity is accepted
#  (3) a plain-TCP client (JSON lines, like a peer daemon without TLS) gets no
#      answer and is logged as refused; an --insecure-no-tls daemon warns at
#      start and cannot reach a TLS daemon
#  (4) two daemons with certificates of one CA carry a tunnel; a daemon with
#      a certificate of another CA, and a PSK daemon, are refused
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"
check=$here/../tools/streamcheck.py

ferry_init --timeout 150
command -v certtool >/dev/null || ferry_skip "certtool not found (Debian package gnutls-bin)"
allow=$QEMU_DIR/allowed
mkdir -p "$allow"
python3 "$check" serve "$allow/target.sock" "$QEMU_DIR/accepted.log" </dev/null >"$QEMU_DIR/serve.out" 2>&1 &
FERRY_EXTRA_PIDS+=("$!")
ntun=0

# tunnel_ok FROM TO: a two-stream tunnel from daemon FROM to daemon TO's
# target carries two connections whole
tunnel_ok() {
	local out listen=$QEMU_DIR/t$((++ntun)).sock
	out=$(ferry_ctl "$1" tunnel-open --to "${FERRY_LISTEN[$2]}" --listen "$listen" --target "$allow/target.sock" \
		--streams 2 2>&1) || ferry_fail "tunnel-open $1 -> $2 failed: $out"
	python3 "$check" client "$listen" "t${ntun}a,t${ntun}b" $((4 << 20)) 60 >/dev/null ||
		ferry_fail "the tunnel $1 -> $2 did not carry the connections"
	echo "  ok  tunnel $1 -> $2 carried 2 x 4 MiB"
}

# tunnel_refused FROM TO REGEX: tunnel-open from FROM to TO fails, saying REGEX
tunnel_refused() {
	local out
	out=$(ferry_ctl "$1" tunnel-open --to "${FERRY_LISTEN[$2]}" --listen "$QEMU_DIR/t$((++ntun)).sock" \
		--target "$allow/target.sock" --streams 1 2>&1) && ferry_fail "tunnel-open $1 -> $2 was accepted: $out"
	grep -Eq -- "$3" <<<"$out" || ferry_fail "tunnel-open $1 -> $2: the error does not match /$3/: $out"
	echo "  ok  tunnel $1 -> $2 refused: $(grep -Eo -- "$3.*" <<<"$out" | head -n 1 | cut -c1-150)"
}

# logged NAME REGEX: daemon NAME's log gets a line matching REGEX (within 5 s)
logged() {
	wait_file_line "${FERRY_LOG[$1]}" "$2" 5 || ferry_fail "ferryd $1 did not log /$2/"
	echo "  ok  ferryd $1 logged: $(grep -o -- "$2.*" "${FERRY_LOG[$1]}" | tail -n 1 | cut -c1-160)"
}

echo "(0) no start without credentials"
out=$("$FERRYD" --admin "$QEMU_DIR/x.sock" --listen 127.0.0.1:0 2>&1)
rc=$?
[ "$rc" -eq 2 ] || ferry_fail "ferryd without credentials exited $rc, expected 2: $out"
for opt in --tls-psk --tls-x509 --insecure-no-tls; do
	grep -q -- "$opt" <<<"$out" || ferry_fail "the refusal does not name $opt: $out"
done
echo "  ok  $out"
ferry_make_psk "$QEMU_DIR/open.psk" || ferry_fail "ferry_make_psk failed"
chmod 644 "$QEMU_DIR/open.psk"
out=$("$FERRYD" --admin "$QEMU_DIR/x.sock" --listen 127.0.0.1:0 --tls-psk "$QEMU_DIR/open.psk" 2>&1) &&
	ferry_fail "ferryd started with a key file others can read"
grep -q "chmod 600" <<<"$out" || ferry_fail "unclear refusal of a readable key file: $out"
echo "  ok  $out"
[ -e "$QEMU_DIR/x.sock" ] && ferry_fail "a refused ferryd left its admin socket"

echo "(1) pre-shared key: a pair that shares it talks"
ferry_start_daemon a || ferry_fail "starting ferryd a failed"
ferry_start_daemon b --allow-dir "$allow" || ferry_fail "starting ferryd b failed"
logged b "control connection: TLS 1.3, PSK identity 'ferry-test'"
tunnel_ok a b

echo "(2) pre-shared key: a wrong key or an unknown identity is refused"
ferry_make_psk "$QEMU_DIR/c.psk" ferry-test || ferry_fail "ferry_make_psk failed"
ferry_start_daemon c --tls-psk "$QEMU_DIR/c.psk" || ferry_fail "starting ferryd c failed"
tunnel_refused c b "authentication failed: the peer has a different key for our PSK identity 'ferry-test'"
logged b "peer 127\.0\.0\.1:[0-9]* refused: TLS handshake failed: authentication failed: PSK identity 'ferry-test' used a different key"
ferry_make_psk "$QEMU_DIR/d.psk" host-d || ferry_fail "ferry_make_psk failed"
ferry_start_daemon d --tls-psk "$QEMU_DIR/d.psk" || ferry_fail "starting ferryd d failed"
tunnel_refused d b "authentication failed: the peer does not know our PSK identity 'host-d'"
logged b "peer 127\.0\.0\.1:[0-9]* refused: TLS handshake failed: authentication failed: unknown PSK identity 'host-d'"
# a daemon that lists both identities accepts both (its own is its first line)
(umask 077 && cat "$QEMU_DIR/ferry.psk" "$QEMU_DIR/d.psk" >"$QEMU_DIR/e.psk") || ferry_fail "cannot write e.psk"
ferry_start_daemon e --tls-psk "$QEMU_DIR/e.psk" --allow-dir "$allow" || ferry_fail "starting ferryd e failed"
tunnel_ok d e
tunnel_ok a e

echo "(3) plain TCP against the TLS control port"
res=$(python3 - "${FERRY_LISTEN[b]}" <<'PY'
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
print("local", s.getsockname()[1])
s.sendall(json.dumps({"cmd": "session-open", "target": "target.sock", "streams": 1}).encode() + b"\n")
buf = b""
try:
    while True:
        r = s.recv(4096)
        if not r:
            break
        buf += r
except (ConnectionResetError, socket.timeout) as e:
    print("error", type(e).__name__)
try:
    json.loads(buf.split(b"\n")[0])
    print("ANSWERED", buf[:200])
except ValueError:
    print("no answer", len(buf), "bytes")
PY
) || ferry_fail "the plain-TCP client failed: $res"
grep -q ANSWERED <<<"$res" && ferry_fail "ferryd b answered a plain-TCP client: $res"
lport=$(sed -n 's/^local //p' <<<"$res")
echo "  ok  plain-TCP client (port $lport): $(tail -n 1 <<<"$res")"
logged b "peer 127\.0\.0\.1:$lport refused: TLS handshake failed: the peer does not speak TLS"
ferry_start_daemon p --insecure-no-tls || ferry_fail "starting ferryd p failed"
logged p "WARNING: --insecure-no-tls: the control connection is plain TCP"
tunnel_refused p b "the peer speaks TLS and this end is plain TCP"
logged b "peer 127\.0\.0\.1:[0-9]* refused: TLS handshake failed: the peer does not speak TLS"
ferry_start_daemon q --insecure-no-tls --allow-dir "$allow" || ferry_fail "starting ferryd q failed"
tunnel_refused b q "TLS handshake with ${FERRY_LISTEN[q]} failed: the peer does not speak TLS"
logged q "peer connection: the peer speaks TLS and this end is plain TCP"

echo "(4) X.509: certificates of one CA talk, another CA's do not"
ferry_make_x509 "$QEMU_DIR/x509/f" "$QEMU_DIR/x509/ca1" host-f || ferry_fail "making f's certificate failed"
ferry_make_x509 "$QEMU_DIR/x509/g" "$QEMU_DIR/x509/ca1" host-g || ferry_fail "making g's certificate failed"
ferry_make_x509 "$QEMU_DIR/x509/h" "$QEMU_DIR/x509/ca2" host-h || ferry_fail "making h's certificate failed"
ferry_start_daemon f --tls-x509 "$QEMU_DIR/x509/f" || ferry_fail "starting ferryd f failed"
ferry_start_daemon g --tls-x509 "$QEMU_DIR/x509/g" --allow-dir "$allow" || ferry_fail "starting ferryd g failed"
logged g "control connection: TLS 1.3, X.509 certificate 'CN=host-g'"
tunnel_ok f g
ferry_start_daemon h --tls-x509 "$QEMU_DIR/x509/h" || ferry_fail "starting ferryd h failed"
tunnel_refused h g "authentication failed: the peer's certificate is refused: The certificate is NOT trusted. The certificate issuer is unknown"
logged g "peer 127\.0\.0\.1:[0-9]* refused: TLS handshake failed: authentication failed: the peer refused us"
tunnel_refused a g "authentication failed: the peer wants other credentials"
logged g "peer 127\.0\.0\.1:[0-9]* refused: TLS handshake failed: authentication failed: the peer refused us"

for d in a b e g; do ferry_ping "$d" || ferry_fail "ferryd $d does not answer ping afterwards"; done
echo "PASS tls-auth in $(ferry_elapsed)s"
exit 0
