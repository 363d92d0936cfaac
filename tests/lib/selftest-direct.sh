#!/usr/bin/env bash
# selftest-direct.sh - prove the test harness (qemu.sh, ramcheck, dirty.bin)
# with plain QEMU-to-QEMU migration over a unix socket, no ferry involved.
#
# usage: tests/lib/selftest-direct.sh [a] [b] [c]     (default: a b c)
#   a  stopped 1 GiB guest, RAM filled with random data, migrated; the two
#      RAM files must be byte-identical afterwards
#   b  the same with multifd (2 channels)
#   c  running dirty.bin guest (TCG, 256 MiB) migrated while it dirties
#      32 MiB; destination RAM must equal the source's at completion, pass
#      the pattern check, and keep running (heartbeat advancing)
#
# Environment:
#   RAMCHECK       ramcheck binary (default: built with cc into the work dir)
#   DIRTY_BIN      dirty.bin (default: built with tests/guest/build.sh)
#   STOPPED_ACCEL  accelerator for the stopped guests of a/b (default kvm
#                  when /dev/kvm is usable, else tcg)
#   STOPPED_RAM    RAM size for a/b (default 1G)
#   RUN_RAM        RAM size for c (default 256M)
#   MIG_TIMEOUT    seconds allowed for one migration (default 300)
#   DST_AUTOSTART=1  part c: destination without -S (resumes by itself; the
#                  source/destination RAM compare is then skipped)
#   QEMU_KEEP=1    keep the work dir (QEMU logs)
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=qemu.sh
. "$here/qemu.sh"

STOPPED_RAM=${STOPPED_RAM:-1G}
RUN_RAM=${RUN_RAM:-256M}
MIG_TIMEOUT=${MIG_TIMEOUT:-300}
MAX_BW=$((8 * 1024 * 1024 * 1024)) # bytes/s; QEMU 7.2 defaults to 32 MiB/s

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(a b c)
for p in "${parts[@]}"; do
	case $p in a | b | c) ;; *) echo "usage: $0 [a] [b] [c]" >&2; exit 2 ;; esac
done

qemu_init
declare -a REPORT=()
report() { REPORT+=("$*"); log "$*"; }

# --- tools ---------------------------------------------------------------
if [ -z "${RAMCHECK:-}" ]; then
	RAMCHECK=$QEMU_DIR/ramcheck
	"${CC:-cc}" -std=c11 -O2 -Wall -Wextra -Werror -o "$RAMCHECK" "$root/tests/tools/ramcheck.c" ||
		die "building ramcheck failed"
fi
[ -x "$RAMCHECK" ] || die "RAMCHECK=$RAMCHECK is not executable"
export RAMCHECK

if [ -z "${STOPPED_ACCEL:-}" ]; then
	if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then STOPPED_ACCEL=kvm; else STOPPED_ACCEL=tcg; fi
fi

# set_caps SOCK multifd(0|1): migration parameters/capabilities for one side
set_caps() {
	local sock=$1 multifd=$2
	local st=false
	[ "$multifd" = 1 ] && st=true
	qmp "$sock" \
		"{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"multifd\",\"state\":$st}]}}" \
		"{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":$MAX_BW,\"multifd-channels\":2}}" \
		>/dev/null
}

# migrate SRC_NAME DST_NAME SOCKPATH: start incoming + outgoing, wait for
# both ends; sets MIG_SUMMARY (source's query-migrate summary), MIG_WALL_MS
migrate() {
	local src=$1 dst=$2 path=$3 t0 out
	rm -f "$path"
	qmp "$(qemu_sock "$dst")" \
		"{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"unix:$path\"}}" >/dev/null ||
		die "migrate-incoming on $dst failed"
	t0=$(now_ms)
	qmp "$(qemu_sock "$src")" \
		"{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$path\"}}" >/dev/null ||
		die "migrate on $src failed"
	out=$(wait_migration "$(qemu_sock "$src")" "$MIG_TIMEOUT") || {
		qemu_dump_logs
		die "migration $src -> $dst did not complete: ${out:-see above}"
	}
	MIG_WALL_MS=$(($(now_ms) - t0))
	MIG_SUMMARY=$out
	wait_migration "$(qemu_sock "$dst")" 60 >/dev/null || {
		qemu_dump_logs
		die "destination $dst did not report the incoming migration completed"
	}
	rm -f "$path"
}

# --- a/b: stopped guest with random RAM ------------------------------------
stopped_migration() {
	local tag=$1 multifd=$2 t0 tfill tcmp srcram dstram out
	local src=src-$tag dst=dst-$tag
	srcram=$QEMU_RAM_DIR/ferry-selftest-$$-$src.ram
	dstram=$QEMU_RAM_DIR/ferry-selftest-$$-$dst.ram
	QEMU_CLEANUP_FILES+=("$srcram" "$dstram")
	rm -f "$srcram" "$dstram"

	t0=$(now_ms)
	fill_random "$srcram" "$STOPPED_RAM" || die "fill_random $srcram failed"
	tfill=$(($(now_ms) - t0))

	t0=$(now_ms)
	qemu_start "$src" --ram "$STOPPED_RAM" --ram-file "$srcram" --stopped --accel "$STOPPED_ACCEL" ||
		die "starting $src failed"
	qemu_start "$dst" --ram "$STOPPED_RAM" --ram-file "$dstram" --stopped --prealloc \
		--accel "$STOPPED_ACCEL" --incoming || die "starting $dst failed"
	local tstart=$(($(now_ms) - t0))
	set_caps "$(qemu_sock "$src")" "$multifd" || die "$src: setting migration parameters failed"
	set_caps "$(qemu_sock "$dst")" "$multifd" || die "$dst: setting migration parameters failed"

	migrate "$src" "$dst" "$QEMU_DIR/mig-$tag.sock"
	local st
	st=$(qmp_get "$(qemu_sock "$src")" query-status status)
	[ "$st" = postmigrate ] || die "$src status after migration: '$st', expected postmigrate"
	st=$(qmp_get "$(qemu_sock "$dst")" query-status status)
	case $st in paused | prelaunch) ;; *) die "$dst status after migration: '$st', expected paused" ;; esac

	qemu_stop "$src"
	qemu_stop "$dst"
	t0=$(now_ms)
	out=$("$RAMCHECK" compare "$srcram" "$dstram") || {
		echo "$out" >&2
		die "part $tag: destination RAM differs from source RAM"
	}
	tcmp=$(($(now_ms) - t0))
	rm -f "$srcram" "$dstram"
	report "part $tag ($([ "$multifd" = 1 ] && echo "multifd x2" || echo single), accel $STOPPED_ACCEL, $STOPPED_RAM): OK" \
		"- fill ${tfill}ms, qemu start ${tstart}ms, migration wall ${MIG_WALL_MS}ms, compare ${tcmp}ms;" \
		"src: $MIG_SUMMARY"
}

# --- c: running guest dirtying memory ------------------------------------
running_migration() {
	local src=src-c dst=dst-c srcram dstram t0 hb0 hb1 hb2 out
	if [ -z "${DIRTY_BIN:-}" ]; then
		DIRTY_BIN=$("$root/tests/guest/build.sh" "$QEMU_DIR/guest") || die "building dirty.bin failed"
	fi
	[ -r "$DIRTY_BIN" ] || die "DIRTY_BIN=$DIRTY_BIN not readable"
	srcram=$QEMU_RAM_DIR/ferry-selftest-$$-$src.ram
	dstram=$QEMU_RAM_DIR/ferry-selftest-$$-$dst.ram
	QEMU_CLEANUP_FILES+=("$srcram" "$dstram")
	rm -f "$srcram" "$dstram"

	t0=$(now_ms)
	qemu_start "$src" --ram "$RUN_RAM" --ram-file "$srcram" --accel tcg --boot "$DIRTY_BIN" ||
		die "starting $src failed"
	# By default -S on the destination: it stays paused after the migration
	# so its RAM can be compared with the (stopped) source's before we let it
	# run. DST_AUTOSTART=1: no -S, the destination must resume by itself.
	local -a dst_stop=(--stopped)
	[ "${DST_AUTOSTART:-0}" = 1 ] && dst_stop=()
	qemu_start "$dst" --ram "$RUN_RAM" --ram-file "$dstram" --accel tcg --boot "$DIRTY_BIN" \
		--prealloc --incoming "${dst_stop[@]}" || die "starting $dst failed"
	hb0=$(wait_heartbeat "$srcram" 3 60) || { qemu_dump_logs; die "guest on $src does not run (no heartbeat)"; }
	local tboot=$(($(now_ms) - t0))
	set_caps "$(qemu_sock "$src")" 0 || die "$src: setting migration parameters failed"
	set_caps "$(qemu_sock "$dst")" 0 || die "$dst: setting migration parameters failed"

	local hbm
	hbm=$(heartbeat_done "$srcram") || die "no heartbeat in $srcram"
	migrate "$src" "$dst" "$QEMU_DIR/mig-c.sock"
	local st
	st=$(qmp_get "$(qemu_sock "$src")" query-status status)
	[ "$st" = postmigrate ] || die "$src status after migration: '$st', expected postmigrate"
	hb1=$(heartbeat_done "$srcram") || die "no heartbeat in $srcram after migration"
	# the guest must have kept dirtying while RAM was being sent
	[ "$hb1" -gt "$hbm" ] || die "source guest did not run during the migration (heartbeat $hbm -> $hb1)"
	local during=$((hb1 - hbm))

	# source stopped; compare, unless the destination already runs
	out=$("$RAMCHECK" pattern "$srcram") || {
		echo "$out" >&2
		die "part c: pattern broken on the source after migration (guest bug?)"
	}
	if [ "${DST_AUTOSTART:-0}" != 1 ]; then
		out=$("$RAMCHECK" compare "$srcram" "$dstram") || {
			echo "$out" >&2
			die "part c: destination RAM differs from the source's at migration completion"
		}
		out=$("$RAMCHECK" pattern "$dstram") || {
			echo "$out" >&2
			die "part c: pattern broken on the destination right after migration"
		}
		log "after migration: $out"
		qmp "$(qemu_sock "$dst")" cont >/dev/null || die "cont on $dst failed"
	fi
	qemu_stop "$src"

	wait_status "$(qemu_sock "$dst")" running 10 || die "$dst is not running after the migration"
	local w1 w2
	hb1=$(heartbeat_done "$dstram") && w1=$(heartbeat_words "$dstram") || die "no heartbeat on $dst"
	sleep 2
	st=$(qmp_get "$(qemu_sock "$dst")" query-status status)
	[ "$st" = running ] || die "$dst status '$st' 2s after it started, expected running"
	hb2=$(heartbeat_done "$dstram") && w2=$(heartbeat_words "$dstram") || die "no heartbeat on $dst"
	[ "$w2" -gt "$w1" ] || die "guest on $dst makes no progress: words written $w1 -> $w2 in 2s (passes $hb1 -> $hb2)"

	qmp "$(qemu_sock "$dst")" stop >/dev/null || die "stop on $dst failed"
	wait_status "$(qemu_sock "$dst")" paused 10 || die "$dst did not pause"
	out=$("$RAMCHECK" pattern "$dstram") || {
		echo "$out" >&2
		die "part c: pattern broken on the destination after it ran"
	}
	log "after running on the destination: $out"
	qemu_stop "$dst"
	rm -f "$srcram" "$dstram"
	report "part c (running TCG guest, $RUN_RAM, 32 MiB dirtied per pass): OK" \
		"- boot to heartbeat>=3 ${tboot}ms (pass $hb0), migration wall ${MIG_WALL_MS}ms," \
		"$during passes during it, dst heartbeat $hb1 -> $hb2 in 2s; src: $MIG_SUMMARY"
}

tall=$(now_ms)
for p in "${parts[@]}"; do
	case $p in
	a) stopped_migration a 0 ;;
	b) stopped_migration b 1 ;;
	c) running_migration ;;
	esac
done
echo
echo "selftest-direct: all passed in $(($(now_ms) - tall))ms"
for r in "${REPORT[@]}"; do echo "  $r"; done
