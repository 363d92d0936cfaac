#!/usr/bin/env bash
# fallback-matrix.sh - capability negotiation with two real daemons and real
# QEMUs, one side masking a feature by configuration (ferryd --disable):
# each row either falls back as documented (docs/protocol.md) and completes
# with the RAM intact, or, when the user insisted (--require, --transport) or
# the cookies must not be trusted (another VM, the same host), fails with a
# clear error and the source VM untouched.
#
# Every cookie the daemons send (ferryd --cookie-log) is checked against the
# schema, docs/cookie.rng, with xmllint.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=64M
ferry_init --shm 512M --timeout 280
ferry_need_ramcheck
command -v xmllint >/dev/null || ferry_skip "xmllint not found (./bootstrap.sh installs libxml2-utils)"
row=0

# daemons A_ARGS / B_ARGS: (re)start daemon a (source host) and b (destination)
daemons() {
	ferry_stop_daemon a
	ferry_stop_daemon b
	mkdir -p "$QEMU_DIR/cookies"
	# shellcheck disable=SC2086
	ferry_start_daemon a $1 --cookie-log "$QEMU_DIR/cookies" || ferry_fail "row $row: starting ferryd a ($1) failed"
	# shellcheck disable=SC2086
	ferry_start_daemon b $2 --cookie-log "$QEMU_DIR/cookies" || ferry_fail "row $row: starting ferryd b ($2) failed"
	FERRY_TO=${FERRY_LISTEN[b]}
}

guests() {
	qemu_start src$row --ram "$RAM" --stopped --accel kvm "${@}" || ferry_fail "row $row: starting the source failed"
	fill_guest_ram "src$row"
	qemu_start dst$row --ram "${DST_RAM:-$RAM}" --stopped --prealloc --incoming --accel kvm "${DST_EXTRA[@]}" ||
		ferry_fail "row $row: starting the destination failed"
}

# random bytes into the source guest's RAM file, so a comparison means something
fill_guest_ram() {
	python3 - "$(qemu_ramfile "$1")" <<-'PY' || ferry_fail "cannot fill $1's RAM"
		import os, sys
		with open(sys.argv[1], "r+b") as f:
		    f.write(os.urandom(os.fstat(f.fileno()).st_size))
	PY
}

# ok ROW-NAME WANT-PLAN WANT-FALLBACK-SUBSTRING [ferryctl args...]
ok() {
	local name=$1 plan=$2 fb=$3 got gotfb
	shift 3
	row=$((row + 1))
	guests
	ferry_migrate src$row dst$row 60 --json "$@"
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "row $row ($name): ferryctl exited $FERRY_MIG_RC, expected a fallback"; }
	got=$(json_field plan <"$FERRY_MIG_OUT")
	gotfb=$(json_field fallbacks <"$FERRY_MIG_OUT")
	[ "$got" = "$plan" ] || ferry_fail "row $row ($name): plan '$got', expected '$plan'"
	if [ -n "$fb" ]; then
		case "$gotfb" in *"$fb"*) ;; *) ferry_fail "row $row ($name): fallbacks '$gotfb' lack '$fb'" ;; esac
	else
		[ -z "$gotfb" ] || ferry_fail "row $row ($name): unexpected fallbacks '$gotfb'"
	fi
	[ "$(mig_field "$(qemu_sock dst$row)" status)" = completed ] || ferry_fail "row $row ($name): destination not completed"
	qemu_stop dst$row
	"$RAMCHECK" compare "$(qemu_ramfile src$row)" "$(qemu_ramfile dst$row)" >/dev/null ||
		ferry_fail "row $row ($name): destination RAM differs"
	qemu_stop src$row
	qemu_rm_ram src$row
	qemu_rm_ram dst$row
	echo "row $row ok: $name -> $got${gotfb:+ [fallback: $gotfb]}"
}

# refused ROW-NAME WANT-ERROR-SUBSTRING [ferryctl args...]: the migration must
# fail at once, saying why, with the source VM as it was (paused here) and the
# destination still waiting; a plain retry to the same destination then works.
refused() {
	local name=$1 want=$2 err st
	shift 2
	row=$((row + 1))
	guests
	ferry_migrate src$row dst$row 60 "$@"
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "row $row ($name): ferryctl exited $FERRY_MIG_RC, expected 1"; }
	err=$(cat "$FERRY_MIG_ERR")
	case "$err" in *"$want"*) ;; *) ferry_mig_report; ferry_fail "row $row ($name): the error lacks '$want'" ;; esac
	st=$(qmp_get "$(qemu_sock src$row)" query-status status)
	[ "$st" = prelaunch ] || [ "$st" = paused ] || ferry_fail "row $row ($name): source is '$st' afterwards"
	[ "$(mig_field "$(qemu_sock src$row)" status)" != completed ] || ferry_fail "row $row ($name): the source migrated anyway"
	st=$(qmp_get "$(qemu_sock dst$row)" query-status status)
	[ "$st" = inmigrate ] || ferry_fail "row $row ($name): destination is '$st', expected still inmigrate"
	qemu_stop src$row
	qemu_stop dst$row
	qemu_rm_ram src$row
	qemu_rm_ram dst$row
	echo "row $row refused as it must: $name: $(grep -o "$want.*" <<<"$err" | head -n 1)"
}

DST_EXTRA=()
daemons "" ""
ok "both full, one stream" "tcp handoff, single channel" ""
ok "both full, 2 channels" "tcp handoff, 2 multifd channels" "" --channels 2
refused "--transport rdma, no rdma anywhere" "transport 'rdma' was asked for but neither side has the rdma driver" --transport rdma

daemons "" "--disable multifd"
ok "destination masks multifd" "tcp handoff, single channel" \
	"multifd: the destination does not support it; migrating over a single channel" --channels 2
refused "destination masks multifd, --require multifd" \
	"required feature 'multifd' is not available: the destination does not support it" --channels 2 --require multifd

daemons "--disable multifd,handoff" ""
ok "source masks multifd and handoff" "tcp relay, single channel" "handoff: the source does not support it" --channels 4
refused "source masks handoff, --require handoff" "required feature 'handoff' is not available: the source does not support it" \
	--require handoff

daemons "" "--disable handoff"
ok "destination masks handoff" "tcp relay, single channel" "handoff: the destination does not support it"

daemons "" "--disable handoff-multifd"
ok "destination masks handoff-multifd" "tcp relay, 2 multifd channels" \
	"handoff-multifd: the destination does not support it; ferry relays the streams" --channels 2

# Untrusted cookies: another VM behind the destination's monitor, or a
# "destination" that is this very host.
daemons "" ""
DST_EXTRA=(-- -name other-vm)
refused "the destination QEMU is another VM" "cookie is for VM 'ferry-vm'"
DST_EXTRA=()
# A destination QEMU that is not the same machine: refused before anything moves.
DST_RAM=32M
refused "the destination QEMU has half the memory" "the destination VM has 33554432 bytes of memory, the source 67108864"
DST_RAM=
DST_EXTRA=(-- -smp 2)
refused "the destination QEMU has another vCPU count" "the destination VM has 2 vCPUs, the source 1"
DST_EXTRA=()
FERRY_HOST_UUID[b]=${FERRY_HOST_UUID[a]}
daemons "" ""
refused "both daemons claim the same host" "to the same host"

# every cookie the daemons sent in these rows is valid against the schema
rng=$FERRY_ROOT/docs/cookie.rng
n=0
for c in "$QEMU_DIR"/cookies/*.xml; do
	[ -e "$c" ] || continue
	n=$((n + 1))
	xmllint --noout --relaxng "$rng" "$c" 2>"$QEMU_DIR/xmllint.err" ||
		{ cat "$QEMU_DIR/xmllint.err" "$c" >&2; ferry_fail "cookie $(basename "$c") does not validate against docs/cookie.rng"; }
done
for kind in begin prepare perform; do
	ls "$QEMU_DIR"/cookies/*-"$kind".xml >/dev/null 2>&1 || ferry_fail "no '$kind' cookie was kept"
done
echo "$n cookies sent (begin, prepare, perform) validate against docs/cookie.rng"
echo "PASS fallback-matrix: $row rows in $(ferry_elapsed)s"
exit 0
