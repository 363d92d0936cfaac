#!/usr/bin/env bash
# rdma-verbs.sh - the sanity reference for the RDMA tests: boot the soft-RoCE
# guest (tests/lib/rdma-guest.sh) and run perftest's ib_write_bw loopback over
# rxe0 (RC, RDMA WRITE, 1 MiB messages). Passes when both ends finish and the
# client reports a bandwidth; the figure is printed, never asserted.
#
# Exit: 0 pass, 1 fail, 77 skip (no guest can boot here: the reason is printed).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/rdma-guest.sh
. "$here/../lib/rdma-guest.sh"
trap rdma_guest_cleanup EXIT

if ! rdma_guest_prepare; then
	echo "SKIP: $RDMA_GUEST_WHY"
	exit 77
fi
rdma_guest_run 180 "$(cat <<'CMD'
ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n 100 >/tmp/server.log 2>&1 &
server=$!
sleep 1
ib_write_bw -d rxe0 -x 1 -F -s 1048576 -n 100 198.18.0.1 >/tmp/client.log 2>&1
c=$?
wait $server
s=$?
cat /tmp/client.log
echo "client=$c server=$s"
[ $c = 0 ] && [ $s = 0 ]
CMD
)"
rc=$RDMA_GUEST_RC
cat "$RDMA_GUEST_OUT"
if [ "$rc" != 0 ]; then
	echo "FAIL: guest command exit $rc (124 = timeout, 125 = guest set-up)"
	cat "$RDMA_GUEST_ERR"
	tail -20 "$RDMA_GUEST_CONSOLE"
	exit 1
fi
bw=$(awk '$1 == 1048576 && NF >= 5 {print $4}' "$RDMA_GUEST_OUT")
[ -n "$bw" ] || { echo "FAIL: ib_write_bw printed no bandwidth line"; exit 1; }
echo "ib_write_bw over rxe0 in the guest: $bw MB/s (TCG: a ratio reference only)"
echo "PASS"
