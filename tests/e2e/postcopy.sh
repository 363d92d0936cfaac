#!/usr/bin/env bash
# postcopy.sh - postcopy through ferry with the set-up acknowledgement
# (controlplane/pcguard.h, docs/protocol.md "Postcopy"), real QEMU 7.2:
#  1. a running guest that keeps rewriting 32 MiB switches to postcopy 0.3 s
#     in: the plan says "postcopy (set-up acknowledged, preempt channel)" and
#     the preempt channel has a lane of its own, the destination
#     daemon logged that its QEMU loaded every device before the VM ran, the
#     guest runs on the destination with its memory consistent, the source
#     QEMU is ended;
#  2. the destination cannot load the device state (the source has a
#     virtio-rng device the destination lacks): the migration fails saying
#     so, and the source VM runs again with its memory consistent (plain
#     QEMU 7.2 would sit in postcopy-paused for good);
#  3. the destination QEMU is frozen before the switch and killed during the
#     set-up: the same, the source runs again;
#  4. a destination daemon that masks postcopy-setup (--disable): --postcopy
#     is refused saying why, the source runs on; --force-postcopy migrates
#     anyway (QEMU's own postcopy over the handed-over connection);
#  5. the data lanes are cut (ss -K) after the acknowledgement, while the VM
#     already runs on the destination: both QEMUs pause their postcopy, ferry
#     opens a new session, the destination listens again (migrate-recover),
#     the source resumes over it, and the migration completes with the
#     guest's memory consistent;
#  6. --postcopy-after auto with a guest that cannot converge (1 ms
#     downtime-limit): the switch comes once two passes over RAM did not
#     converge, and the migration completes.
#
# Exit: 0 pass, 1 fail, 77 skip. Environment: tests/lib/ferry.sh.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ferry.sh
. "$here/../lib/ferry.sh"

RAM=512M
SMALL=256M
ferry_init --shm 1200M --timeout 300
ferry_need_ramcheck
ferry_need_dirty_bin
ferry_start_daemons || ferry_fail "starting the daemons failed"
ferry_start_daemon c --disable postcopy-setup || ferry_fail "starting ferryd c failed"

# start_pair N RAM [SOURCE QEMU ARGS...]: a running source srcN (the dirty
# guest) and a destination dstN waiting for a migration, each on its own copy
# of the boot image.
start_pair() {
	local n=$1 ram=$2
	shift 2
	cp "$DIRTY_BIN" "$QEMU_DIR/src$n.img" && cp "$DIRTY_BIN" "$QEMU_DIR/dst$n.img" || ferry_fail "cannot copy the boot image"
	qemu_start "src$n" --ram "$ram" --boot "$QEMU_DIR/src$n.img" -- "$@" || ferry_fail "starting src$n failed"
	qemu_start "dst$n" --ram "$ram" --boot "$QEMU_DIR/dst$n.img" --incoming || ferry_fail "starting dst$n failed"
	wait_heartbeat "$(qemu_ramfile "src$n")" 3 60 >/dev/null || ferry_fail "the guest does not run on src$n"
}

# ---- 1. guarded postcopy completes
part1() {
	start_pair "" "$RAM"
	ferry_migrate src dst 90 --postcopy --postcopy-after 0.3 --json
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "guarded postcopy exited $FERRY_MIG_RC"; }
	plan=$(json_field plan <"$FERRY_MIG_OUT")
	[ "$plan" = "tcp relay, single channel, postcopy (set-up acknowledged, preempt channel)" ] || ferry_fail "plan '$plan'"
	tr=$(json_field transport <"$FERRY_MIG_OUT")
	[ "$tr" = "tcp relay, 2 lanes" ] || ferry_fail "the preempt channel has no lane of its own: '$tr'"
	at=$(json_field postcopy_at_s <"$FERRY_MIG_OUT")
	python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$at" ||
		ferry_fail "the migration never switched to postcopy (it converged first?)"
	grep -q "postcopy set-up: the destination QEMU loaded every device" "${FERRY_LOG[b]}" ||
		ferry_fail "the destination daemon did not acknowledge the set-up"
	[ "$(json_field src_vm_status <"$FERRY_MIG_OUT")" = ended ] || ferry_fail "the source was not ended"
	vm_runs_consistent dst "after postcopy"
	echo "1. guarded: $plan, $(json_field total_s <"$FERRY_MIG_OUT") s, switched at ${at}s"
	qemu_stop dst
}

# ---- 2. the destination fails to load the device state
part2() {
	start_pair "2" "$SMALL" -device virtio-rng-pci
	ferry_migrate src2 dst2 90 --postcopy --postcopy-after 0.1
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "a destination that cannot load exited $FERRY_MIG_RC"; }
	grep -q "postcopy set-up failed at the destination" "$FERRY_MIG_ERR" &&
		grep -q "taken back and runs again" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "2: the failure is not explained"; }
	vm_runs_consistent src2 "after the rescue"
	for _ in $(seq 50); do qemu_alive dst2 || break; sleep 0.1; done
	qemu_alive dst2 && ferry_fail "the destination QEMU that failed to load still runs"
	echo "2. device mismatch: $(grep -o 'postcopy set-up failed.*' "$FERRY_MIG_ERR" | head -c 200)"
	qemu_stop src2
}

# ---- 3. the destination QEMU dies during the set-up
part3() {
	# shellcheck disable=SC2046
	start_pair "3" "$SMALL" $(side_qmp_args src3)
	ferry_migrate_start src3 dst3 --postcopy --postcopy-after 0.5 --json
	# Frozen as soon as it listens, the destination cannot load anything.
	deadline=$(($(now_ms) + 20000))
	until grep -q "dst3.qmp listens on" "${FERRY_LOG[b]}"; do
		[ "$(now_ms)" -lt "$deadline" ] || { ferry_migrate_wait 1; ferry_mig_report; ferry_fail "3: no prepare for dst3"; }
		sleep 0.02
	done
	qemu_kill dst3 STOP
	id=$(ferry_mig_id) || ferry_fail "3: no migration id logged"
	deadline=$(($(now_ms) + 20000))
	while :; do
		at=$("$FERRYCTL" --admin "${FERRY_ADMIN[a]}" status "$id" --json 2>/dev/null | json_field postcopy_at_s 2>/dev/null)
		python3 -c "import sys; sys.exit(0 if float(sys.argv[1] or 0) > 0 else 1)" "${at:-0}" 2>/dev/null && break
		[ "$(now_ms)" -lt "$deadline" ] || ferry_fail "3: the source never asked for the switch"
		sleep 0.1
	done
	sleep 0.5
	qemu_kill dst3 KILL
	ferry_migrate_wait 120
	[ "$FERRY_MIG_RC" -eq 1 ] || {
		ferry_mig_report
		qmp "$(side_sock src3)" query-migrate query-status >&2
		ferry_fail "a destination killed during set-up: exit $FERRY_MIG_RC"
	}
	grep -q "postcopy set-up failed at the destination" "$FERRY_MIG_OUT" || { ferry_mig_report; ferry_fail "3: the failure is not explained"; }
	vm_runs_consistent src3 "after the rescue"
	echo "3. killed in set-up: $(grep -o 'postcopy set-up failed[^"]*' "$FERRY_MIG_OUT" | head -c 200)"
	qemu_stop src3
}

# ---- 5. lanes cut after the acknowledgement: postcopy recovers over new lanes
part5() {
	# shellcheck disable=SC2046
	start_pair "5" "$SMALL" $(side_qmp_args src5)
	# A slow background push keeps the postcopy phase long enough to cut it.
	qmp "$(side_sock src5)" '{"execute":"migrate-set-parameters","arguments":{"max-postcopy-bandwidth":16777216}}' >/dev/null ||
		ferry_fail "5: setting max-postcopy-bandwidth failed"
	data_port=$(ferry_endpoint b | sed 's/.*://')
	[ -n "$data_port" ] || ferry_fail "5: no data endpoint for ferryd b"
	gos=$(grep -c 'postcopy: the VM runs here now' "${FERRY_LOG[b]}")
	ferry_migrate_start src5 dst5 --postcopy --postcopy-after 0.3 --json
	deadline=$(($(now_ms) + 30000))
	until [ "$(grep -c 'postcopy: the VM runs here now' "${FERRY_LOG[b]}")" -gt "$gos" ]; do
		[ "$(now_ms)" -lt "$deadline" ] || { ferry_migrate_wait 1; ferry_mig_report; ferry_fail "5: no go on the destination"; }
		sleep 0.05
	done
	sleep 0.5
	ss -K "( dport = :$data_port or sport = :$data_port )" >/dev/null 2>&1 || ferry_fail "5: ss -K failed"
	ferry_migrate_wait 120
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "5: the cut postcopy did not complete (exit $FERRY_MIG_RC)"; }
	rec=$(json_field postcopy_recoveries <"$FERRY_MIG_OUT")
	[ "${rec:-0}" -ge 1 ] || { ferry_mig_report; ferry_fail "5: no recovery was needed: the cut came too late?"; }
	grep -q "postcopy recovery 1: the destination QEMU listens" "${FERRY_LOG[b]}" || ferry_fail "5: the destination did not recover"
	vm_runs_consistent dst5 "after the postcopy recovery"
	for _ in $(seq 50); do qemu_alive src5 || break; sleep 0.1; done
	qemu_alive src5 && ferry_fail "5: src5 still exists after the migration completed"
	echo "5. lanes cut after go: recovered $rec time(s), $(json_field total_s <"$FERRY_MIG_OUT") s"
	qemu_stop dst5
}

# ---- 4. no acknowledgement on the destination: refused unless forced
part4() {
	FERRY_TO=${FERRY_LISTEN[c]}
	start_pair "4" "$RAM"
	ferry_migrate src4 dst4 60 --postcopy
	[ "$FERRY_MIG_RC" -eq 1 ] || { ferry_mig_report; ferry_fail "--postcopy without an acknowledgement exited $FERRY_MIG_RC"; }
	grep -q "postcopy-setup: the destination does not support it" "$FERRY_MIG_ERR" &&
		grep -q "add --force-postcopy to accept that risk" "$FERRY_MIG_ERR" || { ferry_mig_report; ferry_fail "4: the refusal does not say why"; }
	st=$(qmp_get "$(qemu_sock src4)" query-status status)
	[ "$st" = running ] || ferry_fail "the source is '$st' after the refusal"
	ferry_migrate src4 dst4 90 --force-postcopy --postcopy-after 0.3 --json
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "forced postcopy exited $FERRY_MIG_RC"; }
	plan=$(json_field plan <"$FERRY_MIG_OUT")
	[ "$plan" = "tcp handoff, single channel, postcopy" ] || ferry_fail "forced plan '$plan'"
	wait_status "$(qemu_sock dst4)" running 10 || ferry_fail "the VM does not run on dst4"
	qmp "$(qemu_sock dst4)" stop >/dev/null
	o=$("$RAMCHECK" pattern "$(qemu_ramfile dst4)") || { echo "$o" >&2; ferry_fail "dst4's memory is inconsistent after postcopy"; }
	echo "4. forced: $plan, $(json_field total_s <"$FERRY_MIG_OUT") s"
}

# ---- 6. --postcopy-after auto: the switch comes when precopy does not converge
part6() {
	# shellcheck disable=SC2046
	start_pair "6" "$SMALL" $(side_qmp_args src6)
	out=$("$FERRYCTL" --admin "${FERRY_ADMIN[a]}" migrate src6 --to "$FERRY_TO" --postcopy-after soon 2>&1)
	[ $? -eq 2 ] && echo "$out" | grep -q "seconds (0..86400) or auto, not 'soon'" ||
		ferry_fail "6: a bad --postcopy-after is not a usage error naming it: $out"
	# 1 ms of downtime: a guest rewriting 32 MiB never converges in precopy.
	qmp "$(side_sock src6)" '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1}}' >/dev/null ||
		ferry_fail "6: setting downtime-limit failed"
	ferry_migrate src6 dst6 120 --postcopy --postcopy-after auto --json
	[ "$FERRY_MIG_RC" -eq 0 ] || { ferry_mig_report; ferry_fail "6: auto postcopy exited $FERRY_MIG_RC"; }
	at=$(json_field postcopy_at_s <"$FERRY_MIG_OUT")
	python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$at" ||
		{ ferry_mig_report; ferry_fail "6: the migration never switched to postcopy"; }
	vm_runs_consistent dst6 "after auto postcopy"
	echo "6. auto: switched at ${at}s after two passes, $(json_field total_s <"$FERRY_MIG_OUT") s"
	qemu_stop dst6
}

# POSTCOPY_PARTS="3 5" runs only those (when chasing one case by hand).
for n in ${POSTCOPY_PARTS:-1 2 3 5 6 4}; do
	"part$n"
done
echo "PASS postcopy in $(ferry_elapsed)s"
exit 0
