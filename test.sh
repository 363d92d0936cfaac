#!/usr/bin/env bash
# ferry's whole test suite, from a fresh Debian 12 machine: installs what it
# needs (bootstrap.sh), builds, then runs every test three ways:
#   1. the normal build (unit tests + end-to-end tests with real QEMU),
#   2. an ASan+UBSan build of the same suite but the libvirt tests and the
#      benchmark smoke tests (sanitizer reports fail the run),
#   3. the unit tests under valgrind,
#   4. a 30 s libFuzzer run of the cookie parser (clang).
# Ends with one line: "N passed, N failed[, N skipped]".
# Options: --quick (normal build only), --no-bootstrap.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")"

quick=0 bootstrap=1
for a in "$@"; do
	case "$a" in
	--quick) quick=1 ;;
	--no-bootstrap) bootstrap=0 ;;
	-h|--help) sed -n '2,10p' "$0"; exit 0 ;;
	*) echo "test.sh: unknown option '$a'" >&2; exit 2 ;;
	esac
done

if [ "$bootstrap" = 1 ]; then
	./bootstrap.sh || { echo "test.sh: bootstrap failed"; echo "0 passed, 1 failed"; exit 1; }
fi

passed=0 failed=0 skipped=0
failures=()

# count LOG.json LABEL: add one meson test run's results to the totals
count() {
	local log=$1 label=$2 p f s
	if [ ! -s "$log" ]; then
		failed=$((failed + 1)); failures+=("$label: no test results (build failed?)"); return
	fi
	read -r p f s < <(python3 - "$log" <<'PY'
import json, sys
p = f = s = 0
for line in open(sys.argv[1]):
    r = json.loads(line)["result"]
    if r in ("OK", "EXPECTEDFAIL"): p += 1
    elif r == "SKIP": s += 1
    else: f += 1
print(p, f, s)
PY
	)
	passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
	if [ "$f" -gt 0 ]; then
		while read -r name; do failures+=("$label: $name"); done < <(python3 - "$log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["result"] not in ("OK", "EXPECTEDFAIL", "SKIP"): print(r["name"], "->", r["result"])
PY
		)
	fi
}

build() { # build DIR [meson options]
	local dir=$1; shift
	if [ ! -f "$dir/build.ninja" ]; then
		meson setup "$dir" -Dwerror=true "$@" >"$dir.setup.log" 2>&1 || { cat "$dir.setup.log"; return 1; }
	fi
	ninja -C "$dir" >"$dir.ninja.log" 2>&1 || { tail -40 "$dir.ninja.log"; return 1; }
}

echo "== build (gcc, -Wall -Wextra -Werror)"
if build build; then
	echo "== tests: normal build"
	meson test -C build --print-errorlogs --num-processes 1 || true
	count build/meson-logs/testlog.json normal
else
	failed=$((failed + 1)); failures+=("normal build failed")
fi

if [ "$quick" = 0 ]; then
	echo "== build (ASan + UBSan)"
	if build build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug; then
		sanlog=$(mktemp -d /tmp/ferry-sanitizers.XXXXXX)
		echo "== tests: ASan + UBSan build (reports in $sanlog)"
		ASAN_OPTIONS="log_path=$sanlog/asan:detect_leaks=1:abort_on_error=0" \
		UBSAN_OPTIONS="log_path=$sanlog/ubsan:print_stacktrace=1:halt_on_error=1" \
			meson test -C build-asan --print-errorlogs --num-processes 1 --no-suite libvirt --no-suite bench || true
		count build-asan/meson-logs/testlog.json asan
		if compgen -G "$sanlog/*" >/dev/null; then
			failed=$((failed + 1)); failures+=("sanitizer reports: $(ls "$sanlog" | tr '\n' ' ')")
			head -60 "$sanlog"/*
		else
			rm -rf "$sanlog"
		fi
	else
		failed=$((failed + 1)); failures+=("ASan build failed")
	fi

	echo "== tests: unit tests under valgrind"
	rm -f build/meson-logs/valgrind*.json
	meson test -C build --suite unit --num-processes 1 --print-errorlogs \
		--wrapper 'valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --quiet' \
		--logbase valgrind || true
	# meson names the log <logbase>-<wrapper>.json; take whichever it wrote
	vlog=$(ls -t build/meson-logs/valgrind*.json 2>/dev/null | head -1)
	count "${vlog:-build/meson-logs/valgrind.json}" valgrind
fi

if [ "$quick" = 0 ]; then
	# The cookie parser takes untrusted XML from peers: a short libFuzzer run
	# (clang) on every CI run; docs/cookie.md has the longer one.
	echo "== fuzz: cookie parser, 30 s (clang, libFuzzer)"
	if ! command -v clang >/dev/null; then
		failed=$((failed + 1)); failures+=("fuzz: clang missing (bootstrap.sh installs it)")
	elif CC=clang build build-fuzz -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug &&
		[ -x build-fuzz/tests/fuzz-cookie ]; then
		corpus=$(mktemp -d /tmp/ferry-fuzz.XXXXXX)
		cp tests/fuzz/cookie-corpus/* "$corpus/"
		if build-fuzz/tests/fuzz-cookie -max_total_time=30 -rss_limit_mb=1024 -print_final_stats=1 \
			"$corpus" >build-fuzz/fuzz.log 2>&1; then
			passed=$((passed + 1))
			echo "fuzz-cookie: $(grep -o 'stat::number_of_executed_units: *[0-9]*' build-fuzz/fuzz.log | grep -o '[0-9]*$') inputs, no crash"
			rm -rf "$corpus"
		else
			failed=$((failed + 1)); failures+=("fuzz-cookie found a crash (build-fuzz/fuzz.log, inputs in $corpus)")
			tail -40 build-fuzz/fuzz.log
		fi
	else
		failed=$((failed + 1)); failures+=("fuzz build (clang) failed")
	fi
fi

echo
for f in "${failures[@]+"${failures[@]}"}"; do echo "FAILED: $f"; done
if [ "$skipped" -gt 0 ]; then
	echo "$passed passed, $failed failed, $skipped skipped"
else
	echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
