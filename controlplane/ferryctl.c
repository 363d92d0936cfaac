/* ferryctl: the command line for ferryd. Thin: it sends JSON requests to the
 * daemon's admin socket and renders the answers. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "drivers/size.h"
#include "jsonline.h"
#include "migrate.h"
#include "plan.h"
#include "qmp.h"

#define EXIT_FAILED 1
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted++;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ferryctl [--admin PATH] COMMAND [options]\n"
		"commands:\n"
		"  migrate VM --to HOST[:PORT] | migrate --src-qmp PATH --dst-qmp PATH --to HOST[:PORT]\n"
		"          [--channels N] [--lanes N]\n"
		"          [--stall-timeout S] [--no-handoff] [--transport auto|rdma|dpdk|tcp] [--require F]...\n"
		"          [--keep-source] [--postcopy [--force-postcopy] [--postcopy-after S|auto]] [--json] [--quiet]\n"
		"          [--disk NAME]... [--shared-dir DIR]... [--suspend] [--max-bandwidth RATE]\n"
		"        live-migrate the VM behind --src-qmp into the QEMU behind --dst-qmp (started with\n"
		"        -incoming defer) on the host whose ferryd listens at --to (port 7470 if omitted);\n"
		"        VM names both: VM.qmp in each daemon's run directory; with no QEMU there on the\n"
		"        destination, its ferryd starts one from the source's command line. Exits 0 only when both\n"
		"        QEMUs report the migration completed. Ctrl-C cancels (the source VM keeps running).\n"
		"        A single-channel migration over tcp hands ferry's authenticated connection to both\n"
		"        QEMUs (no copy in between); multifd channels over tcp go straight to a listener ferry\n"
		"        gives the destination QEMU, which admits only the source host; --no-handoff keeps ferry\n"
		"        relaying every byte. --max-bandwidth caps QEMU's rate in bytes/s (K, M, G: binary;\n"
		"        default: no cap).\n"
		"        The daemons swap migration cookies and pick the best plan both hosts and both QEMUs\n"
		"        support, falling back (and saying so) where one lacks a feature; --require F\n"
		"        (multifd, handoff, handoff-multifd, nbd, postcopy, postcopy-setup, postcopy-preempt)\n"
		"        makes a missing F\n"
		"        an error.\n"
		"        On success the source QEMU is ended (--keep-source leaves it paused). --postcopy switches\n"
		"        after S seconds (default 1; auto: once two passes over RAM did not converge); the\n"
		"        destination VM runs only once its daemon confirmed\n"
		"        every device loaded, and a destination failing before that gives the VM back to the\n"
		"        source. Where one side lacks that acknowledgement, --force-postcopy accepts the risk.\n"
		"        --disk NAME (device, qdev id or node name, as query-block shows it) mirrors that disk into\n"
		"        the destination QEMU's disk of the same name over ferry's NBD path before RAM moves; with\n"
		"        --disk or --shared-dir, any other writable disk whose image file is not under a --shared-dir\n"
		"        is refused. --suspend leaves the VM paused on the destination.\n"
		"  status [ID] [--json]    progress of migration ID; without ID every migration the daemon\n"
		"                          knows, and those its records say an earlier stop cut short\n"
		"  recover [ID] [--json]   settle migrations this daemon's last stop (or a lost peer) cut short:\n"
		"                          from both hosts' records, end the source VM if the destination runs it,\n"
		"                          resume it if the destination does not have it; undecided while the\n"
		"                          destination is unreachable (exit 1 then)\n"
		"  cancel ID               cancel migration ID\n"
		"  tunnel-open --to HOST:PORT --listen PATH --target PATH [--streams N | --standing] [--lanes N]\n"
		"        carry connections made to the local unix socket PATH to the peer's socket --target:\n"
		"        the first N connections (one session), or with --standing any number, one after\n"
		"        another or at once, until tunnel-close (each connection its own session, the\n"
		"        peer connecting them in the order they arrived)\n"
		"  tunnel-status ID | tunnel-close ID\n"
		"  nbd-open --to HOST:PORT --listen PATH --target NBDSOCK [--export NAME] [--lanes N]\n"
		"        serve the peer's NBD export (unix socket NBDSOCK, in its --allow-dir) as an NBD\n"
		"        server on the local unix socket PATH; requests travel as block messages over N\n"
		"        data-plane lanes (default 4) per client\n"
		"  nbd-status ID | nbd-close ID\n"
		"  perf-region --to HOST:PORT --bytes N [--lanes N]\n"
		"  ping | stats            daemon liveness and counters (JSON)\n"
		"  qmp SOCKET COMMAND [ARGS-JSON]   run one QMP command on a QEMU monitor\n"
		"--admin defaults to $FERRY_ADMIN or /run/ferry/ferryd.sock\n"
		"exit status: 0 done, 1 failed or cancelled, 2 usage, 3 daemon unreachable\n");
}

static int call(const char *admin, json_t *req, json_t **reply)
{
	struct ferry_jl jl;
	struct ferry_err err = { 0 };
	if (!req) {
		fprintf(stderr, "ferryctl: out of memory\n");
		return EXIT_FAILED;
	}
	if (ferry_jl_connect_unix(admin, 5000, &jl, &err)) {
		fprintf(stderr, "ferryctl: cannot reach ferryd at %s: %s\n", admin, err.msg);
		json_decref(req);
		return EXIT_UNREACHABLE;
	}
	int rc = ferry_jl_call(&jl, req, 600000, reply, &err);
	ferry_jl_close(&jl);
	json_decref(req);
	if (rc) {
		fprintf(stderr, "ferryctl: %s\n", err.msg);
		return rc == -EREMOTEIO ? EXIT_FAILED : EXIT_UNREACHABLE;
	}
	return 0;
}

static double mono_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void print_json(json_t *j)
{
	json_object_del(j, "ok");
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
	if (s) {
		puts(s);
		free(s);
	}
}

/* Send req (taken) and print the daemon's reply as JSON. */
static int call_and_print(const char *admin, json_t *req)
{
	json_t *rep = NULL;
	int rc = call(admin, req, &rep);
	if (rc)
		return rc;
	print_json(rep);
	json_decref(rep);
	return 0;
}

/* tunnel-open and nbd-open: no stray words, and the three paths given. */
static int check_path_args(const char *cmd, int argc, char **argv, const char *to, const char *listen,
			   const char *target)
{
	if (optind < argc) {
		fprintf(stderr, "ferryctl %s: unexpected argument '%s'\n", cmd, argv[optind]);
		return EXIT_USAGE;
	}
	if (!to || !listen || !target) {
		fprintf(stderr, "ferryctl %s: needs --to, --listen and --target\n", cmd);
		return EXIT_USAGE;
	}
	return 0;
}

static int parse_uint(const char *s, const char *what, unsigned long long max, unsigned long long *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || !*s || *end || s[0] == '-' || v > max) {
		fprintf(stderr, "ferryctl: %s '%s' is not a number from 0 to %llu\n", what, s, max);
		return -1;
	}
	*out = v;
	return 0;
}

/* A rate in bytes/s: a number, optionally K, M or G (binary), at least 1 MiB/s
 * (QEMU counts in bytes/s; below that a migration would never end). */
static int parse_rate(const char *s, unsigned long long *out)
{
	if (ferry_parse_size(s, 1ull << 20, 1ull << 50, out, NULL)) {
		fprintf(stderr, "ferryctl: --max-bandwidth '%s' is not a rate from 1M to 1P bytes/s (K, M, G suffixes)\n", s);
		return -1;
	}
	return 0;
}

static double num(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	return json_is_number(v) ? json_number_value(v) : 0.0;
}

static const char *str(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static void human_bytes(double b, char *out, size_t n)
{
	if (b >= 1024.0 * 1024 * 1024)
		snprintf(out, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
	else
		snprintf(out, n, "%.1f MiB", b / (1024.0 * 1024));
}

static void progress_line(json_t *st, bool tty)
{
	double total = num(st, "ram_total"), rem = num(st, "ram_remaining");
	double pct = total > 0 ? 100.0 * (total - rem) / total : 0.0;
	if (pct < 0)
		pct = 0;
	char rb[32];
	human_bytes(rem, rb, sizeof(rb));
	const char *storage = str(st, "storage");
	/* datagram lanes: how much repair the transport is doing */
	char rel[96] = "";
	json_t *r = json_object_get(st, "reliable");
	if (r)
		snprintf(rel, sizeof(rel), "  retx %.0f corrupt %.0f dup %.0f", num(r, "retransmits"), num(r, "corrupt_drops"),
			 num(r, "dup_drops"));
	fprintf(stderr, "%s%5.1f%%  %5.2f GB/s  remaining %s  dirty %.1f MB/s  %.1fs  [%s/%s]%s%s%s%s", tty ? "\r\033[K" : "",
		pct, num(st, "throughput_gbs"), rb, num(st, "dirty_rate_bps") / 1e6, num(st, "elapsed_s"),
		str(st, "state"), str(st, "qemu_status"), rel, storage[0] ? "  disks: " : "", storage, tty ? "" : "\n");
	fflush(stderr);
}

/* migrate's options and run; disks and shared collect --disk and
 * --shared-dir (the caller owns and frees them). */
static int run_migrate(const char *admin, int argc, char **argv, json_t *disks, json_t *shared)
{
	static const struct option opts[] = {
		{ "src-qmp", required_argument, NULL, 's' }, { "dst-qmp", required_argument, NULL, 'd' },
		{ "to", required_argument, NULL, 't' },      { "channels", required_argument, NULL, 'c' },
		{ "lanes", required_argument, NULL, 'l' },   { "stall-timeout", required_argument, NULL, 'S' },
		{ "json", no_argument, NULL, 'j' },          { "quiet", no_argument, NULL, 'q' },
		{ "no-handoff", no_argument, NULL, 'H' },    { "require", required_argument, NULL, 'r' },
		{ "transport", required_argument, NULL, 'T' }, { "keep-source", no_argument, NULL, 'k' },
		{ "postcopy", no_argument, NULL, 'P' },      { "force-postcopy", no_argument, NULL, 'F' },
		{ "postcopy-after", required_argument, NULL, 'A' },
		{ "disk", required_argument, NULL, 'D' },    { "shared-dir", required_argument, NULL, 'R' },
		{ "suspend", no_argument, NULL, 'U' },       { "max-bandwidth", required_argument, NULL, 'B' },
		{ NULL, 0, NULL, 0 },
	};
	const char *src = NULL, *dst = NULL, *to = NULL, *transport = "auto";
	bool handoff = true, keep_source = false, postcopy = false, force_postcopy = false, suspend = false;
	unsigned long long postcopy_after_ms = 1000;
	const char *required[8];
	unsigned nrequired = 0;
	unsigned long long channels = 0, lanes = 0, stall = 0, max_bw = 0;
	bool json = false, quiet = false;
	/* CLOCK_MONOTONIC: comparable with the daemon's t0_mono on this host. */
	double t_start = mono_s();
	int c;
	optind = 1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 's': src = optarg; break;
		case 'd': dst = optarg; break;
		case 't': to = optarg; break;
		case 'c': if (parse_uint(optarg, "--channels", 63, &channels)) return EXIT_USAGE; break;
		case 'l': if (parse_uint(optarg, "--lanes", 64, &lanes)) return EXIT_USAGE; break;
		case 'S': if (parse_uint(optarg, "--stall-timeout", 86400, &stall)) return EXIT_USAGE; break;
		case 'j': json = true; break;
		case 'q': quiet = true; break;
		case 'H': handoff = false; break;
		case 'k': keep_source = true; break;
		case 'U': suspend = true; break;
		case 'B': if (parse_rate(optarg, &max_bw)) return EXIT_USAGE; break;
		case 'D': json_array_append_new(disks, json_string(optarg)); break;
		case 'R': json_array_append_new(shared, json_string(optarg)); break;
		case 'P': postcopy = true; break;
		case 'F': postcopy = force_postcopy = true; break;
		case 'A': {
			postcopy = true;
			if (strcmp(optarg, "auto") == 0) {
				postcopy_after_ms = FERRY_POSTCOPY_AFTER_AUTO;
				break;
			}
			char *end;
			double sec = strtod(optarg, &end);
			if (end == optarg || *end || sec < 0 || sec > 86400) {
				fprintf(stderr, "ferryctl migrate: --postcopy-after wants seconds (0..86400) or auto, not '%s'\n",
					optarg);
				return EXIT_USAGE;
			}
			postcopy_after_ms = (unsigned long long)(sec * 1000.0);
			break;
		}
		case 'T':
			if (strcmp(optarg, "auto") && strcmp(optarg, "tcp") && strcmp(optarg, "dpdk") && strcmp(optarg, "rdma")) {
				fprintf(stderr, "ferryctl migrate: --transport must be auto, rdma, dpdk or tcp, not '%s'\n", optarg);
				return EXIT_USAGE;
			}
			transport = optarg;
			break;
		case 'r': {
			if (!ferry_feature_parse(optarg)) {
				fprintf(stderr, "ferryctl migrate: --require takes one of multifd, handoff, handoff-multifd, nbd, "
						"postcopy, postcopy-setup, postcopy-preempt, not '%s'\n", optarg);
				return EXIT_USAGE;
			}
			if (nrequired == sizeof(required) / sizeof(required[0])) {
				fprintf(stderr, "ferryctl migrate: too many --require\n");
				return EXIT_USAGE;
			}
			required[nrequired++] = optarg;
			break;
		}
		default: usage(stderr); return EXIT_USAGE;
		}
	}
	/* "migrate VM --to HOST": the VM's monitors are VM.qmp in each daemon's
	 * run directory, where the management layer started the two QEMUs. */
	const char *vm = optind < argc ? argv[optind++] : NULL;
	char vmsock[300], tobuf[300];
	if (vm && (src || dst)) {
		fprintf(stderr, "ferryctl migrate: give a VM name or --src-qmp and --dst-qmp, not both ('%s')\n", vm);
		return EXIT_USAGE;
	}
	if (vm) {
		size_t n = strlen(vm);
		if (n == 0 || n > 200 || strspn(vm, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") != n ||
		    vm[0] == '.') {
			fprintf(stderr, "ferryctl migrate: VM name '%s' must be 1-200 of [A-Za-z0-9._-], not starting with '.'\n",
				vm);
			return EXIT_USAGE;
		}
		snprintf(vmsock, sizeof(vmsock), "%s.qmp", vm);
		if (!src)
			src = vmsock;
		if (!dst)
			dst = vmsock;
	}
	if (to && !strchr(to, ':')) {
		snprintf(tobuf, sizeof(tobuf), "%s:7470", to); /* ferryd's default control port */
		to = tobuf;
	}
	if (!src || !dst || !to || optind < argc) {
		fprintf(stderr, "ferryctl migrate: needs VM (or --src-qmp and --dst-qmp) and --to (and nothing else)\n");
		return EXIT_USAGE;
	}
	json_t *require = json_array();
	for (unsigned i = 0; require && i < nrequired; i++)
		json_array_append_new(require, json_string(required[i]));
	json_t *rep = NULL;
	int rc = call(admin, json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:b, s:o, s:s, s:b, s:b, s:b, s:I, s:o, s:o, s:b, s:I}", "cmd",
				       "migrate", "src_qmp", src, "dst_qmp", dst, "peer", to, "channels", (json_int_t)channels,
				       "lanes", (json_int_t)lanes, "stall_timeout", (json_int_t)stall, "handoff", handoff,
				       "require", require, "transport", transport, "keep_source", keep_source, "postcopy",
				       postcopy, "force_postcopy", force_postcopy, "postcopy_after_ms",
				       (json_int_t)postcopy_after_ms, "disks", json_incref(disks), "shared_dirs",
				       json_incref(shared), "suspend", suspend, "max_bandwidth", (json_int_t)max_bw), &rep);
	if (rc)
		return rc;
	json_int_t id = json_integer_value(json_object_get(rep, "migration"));
	json_decref(rep);
	double t_started = mono_s();
	if (!quiet)
		fprintf(stderr, "ferryctl: migration %lld started (ferryctl cancel %lld, or Ctrl-C, cancels it)\n",
			(long long)id, (long long)id);

	struct sigaction sa = { .sa_handler = on_sigint };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	bool tty = isatty(STDERR_FILENO) && !json;
	int cancel_sent = 0;
	bool plan_said = false;
	double last_draw = 0; /* monotonic seconds: far past 0, so the first look draws */
	for (;;) {
		if (interrupted && cancel_sent < interrupted) {
			cancel_sent = interrupted;
			if (!quiet)
				fprintf(stderr, "%sferryctl: cancelling migration %lld ...\n", tty ? "\n" : "", (long long)id);
			json_t *cr = NULL;
			if (call(admin, json_pack("{s:s, s:I}", "cmd", "migrate-cancel", "migration", id), &cr) == 0)
				json_decref(cr);
		}
		json_t *st = NULL;
		/* The daemon answers when the migration ends or after 100 ms
		 * (the terminal's redraw), whichever comes first. */
		rc = call(admin, json_pack("{s:s, s:I, s:i}", "cmd", "migrate-status", "migration", id, "wait_ms", 100), &st);
		if (rc)
			return rc;
		const char *state = str(st, "state");
		if (!plan_said && !quiet && !json && str(st, "plan")[0]) {
			plan_said = true;
			fprintf(stderr, "%sferryctl: plan: %s\n", tty ? "\r\033[K" : "", str(st, "plan"));
			if (str(st, "fallbacks")[0])
				fprintf(stderr, "ferryctl: fallback: %s\n", str(st, "fallbacks"));
		}
		bool done = strcmp(state, "completed") == 0 || strcmp(state, "failed") == 0 ||
			    strcmp(state, "cancelled") == 0;
		/* a terminal is redrawn every 100 ms, a log gets a line a second */
		if (!quiet && !json && (mono_s() - last_draw >= (tty ? 0.1 : 1.0) || done)) {
			progress_line(st, tty);
			last_draw = mono_s();
		}
		if (done) {
			if (tty && !quiet)
				fputc('\n', stderr);
			bool ok = strcmp(state, "completed") == 0;
			if (json) {
				json_object_set_new(st, "migration", json_integer(id));
				/* For the benchmark's phase breakdown: this command's start,
				 * the daemon's acceptance, and when it saw the end. */
				json_object_set_new(st, "ctl", json_pack("{s:f, s:f, s:f}", "start_mono", t_start,
									 "started_mono", t_started, "seen_mono", mono_s()));
				print_json(st);
			} else if (ok) {
				char tb[32];
				human_bytes(num(st, "ram_transferred"), tb, sizeof(tb));
				printf("migration %lld completed over %s: %s in %.2f s (%.2f GB/s after %.2f s set-up), downtime %.0f ms; destination %s; source %s\n",
				       (long long)id, str(st, "transport"), tb, num(st, "total_s"), num(st, "throughput_gbs"),
				       num(st, "setup_s"), num(st, "downtime_ms"), str(st, "dst_status"),
				       str(st, "src_vm_status")[0] ? str(st, "src_vm_status") : "postmigrate (kept)");
			} else {
				fprintf(stderr, "ferryctl: migration %lld %s: %s\n", (long long)id, state, str(st, "error"));
				const char *srcvm = str(st, "src_vm_status");
				fprintf(stderr, "ferryctl: source VM is %s%s\n", srcvm[0] ? srcvm : "in an unknown state",
					strcmp(srcvm, "running") == 0 ? " (nothing was lost)" : "");
			}
			json_decref(st);
			return ok ? 0 : EXIT_FAILED;
		}
		/* A daemon from before "wait_ms" answers at once: look again in 20 ms. */
		if (!json_is_true(json_object_get(st, "waited")))
			usleep(20000);
		json_decref(st);
	}
}

static int cmd_migrate(const char *admin, int argc, char **argv)
{
	json_t *disks = json_array(), *shared = json_array();
	int rc = EXIT_FAILURE;
	if (disks && shared)
		rc = run_migrate(admin, argc, argv, disks, shared);
	else
		fprintf(stderr, "ferryctl migrate: out of memory\n");
	json_decref(disks);
	json_decref(shared);
	return rc;
}

/* "status" without an ID: every migration the daemon knows. */
static int cmd_list(const char *admin, bool json)
{
	json_t *rep = NULL;
	int rc = call(admin, json_pack("{s:s}", "cmd", "migrate-list"), &rep);
	if (rc)
		return rc;
	if (json) {
		print_json(rep);
		json_decref(rep);
		return 0;
	}
	size_t i;
	json_t *it;
	json_t *live = json_object_get(rep, "migrations"), *rec = json_object_get(rep, "unfinished");
	json_array_foreach(live, i, it)
		printf("migration %lld: %s%s%s, %.1f s%s%s\n", (long long)json_integer_value(json_object_get(it, "migration")),
		       str(it, "state"), str(it, "plan")[0] ? ", " : "", str(it, "plan"), num(it, "elapsed_s"),
		       str(it, "error")[0] ? ": " : "", str(it, "error"));
	json_array_foreach(rec, i, it)
		printf("migration %lld (%s, to %s): cut short in phase '%s' by an earlier stop of this daemon: "
		       "ferryctl recover %lld\n",
		       (long long)json_integer_value(json_object_get(it, "migration")), str(it, "vm"), str(it, "peer"),
		       str(it, "phase"), (long long)json_integer_value(json_object_get(it, "migration")));
	if (json_array_size(live) == 0 && json_array_size(rec) == 0)
		printf("no migrations\n");
	json_decref(rep);
	return 0;
}

static int cmd_recover(const char *admin, int argc, char **argv)
{
	bool json = false;
	unsigned long long id = 0;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			json = true;
		else if (parse_uint(argv[i], "ID", 0xffffffffull, &id))
			return EXIT_USAGE;
	}
	json_t *req = json_pack("{s:s}", "cmd", "recover");
	if (req && id)
		json_object_set_new(req, "migration", json_integer((json_int_t)id));
	json_t *rep = NULL;
	int rc = call(admin, req, &rep);
	if (rc)
		return rc;
	json_t *items = json_object_get(rep, "migrations");
	bool undecided = false;
	size_t i;
	json_t *it;
	json_array_foreach(items, i, it) {
		const char *dec = json_string_value(json_object_get(it, "decision"));
		if (dec && (strcmp(dec, "undecided") == 0 || strcmp(dec, "lost") == 0))
			undecided = true;
		if (!json)
			printf("migration %lld (%s), was %s: %s: %s\n",
			       (long long)json_integer_value(json_object_get(it, "migration")),
			       json_string_value(json_object_get(it, "vm")), json_string_value(json_object_get(it, "was")),
			       dec ? dec : "?", json_string_value(json_object_get(it, "detail")));
	}
	if (json)
		print_json(rep);
	else if (json_array_size(items) == 0)
		printf("nothing to recover\n");
	json_decref(rep);
	return undecided ? EXIT_FAILED : 0;
}

static int cmd_id(const char *admin, const char *cmd, const char *key, int argc, char **argv)
{
	unsigned long long id;
	if (argc < 2 || parse_uint(argv[1], "ID", 0xffffffffull, &id)) {
		fprintf(stderr, "ferryctl: %s needs an ID\n", argv[0]);
		return EXIT_USAGE;
	}
	return call_and_print(admin, json_pack("{s:s, s:I}", "cmd", cmd, key, (json_int_t)id));
}

static int cmd_tunnel_open(const char *admin, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "to", required_argument, NULL, 't' },      { "listen", required_argument, NULL, 'L' },
		{ "target", required_argument, NULL, 'T' },  { "streams", required_argument, NULL, 's' },
		{ "lanes", required_argument, NULL, 'l' },   { "standing", no_argument, NULL, 'S' },
		{ NULL, 0, NULL, 0 },
	};
	const char *to = NULL, *listen = NULL, *target = NULL;
	unsigned long long streams = 1, lanes = 0;
	bool standing = false, streams_given = false;
	int c;
	optind = 1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 't': to = optarg; break;
		case 'L': listen = optarg; break;
		case 'T': target = optarg; break;
		case 's':
			if (parse_uint(optarg, "--streams", 64, &streams))
				return EXIT_USAGE;
			streams_given = true;
			break;
		case 'l': if (parse_uint(optarg, "--lanes", 64, &lanes)) return EXIT_USAGE; break;
		case 'S': standing = true; break;
		default: usage(stderr); return EXIT_USAGE;
		}
	}
	int bad = check_path_args("tunnel-open", argc, argv, to, listen, target);
	if (bad)
		return bad;
	if (standing && streams_given) {
		fprintf(stderr, "ferryctl tunnel-open: --standing takes any number of connections; drop --streams\n");
		return EXIT_USAGE;
	}
	return call_and_print(admin, json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:b}", "cmd", "tunnel-open", "peer", to, "listen",
				       listen, "target", target, "streams", (json_int_t)streams, "lanes", (json_int_t)lanes,
				       "standing", standing));
}

static int cmd_nbd_open(const char *admin, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "to", required_argument, NULL, 't' },     { "listen", required_argument, NULL, 'L' },
		{ "target", required_argument, NULL, 'T' }, { "export", required_argument, NULL, 'e' },
		{ "lanes", required_argument, NULL, 'l' },  { NULL, 0, NULL, 0 },
	};
	const char *to = NULL, *listen = NULL, *target = NULL, *export = "";
	unsigned long long lanes = 4;
	int c;
	optind = 1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 't': to = optarg; break;
		case 'L': listen = optarg; break;
		case 'T': target = optarg; break;
		case 'e': export = optarg; break;
		case 'l':
			if (parse_uint(optarg, "--lanes", 64, &lanes))
				return EXIT_USAGE;
			if (lanes == 0) {
				fprintf(stderr, "ferryctl nbd-open: --lanes must be at least 1\n");
				return EXIT_USAGE;
			}
			break;
		default: usage(stderr); return EXIT_USAGE;
		}
	}
	int bad = check_path_args("nbd-open", argc, argv, to, listen, target);
	if (bad)
		return bad;
	return call_and_print(admin, json_pack("{s:s, s:s, s:s, s:s, s:s, s:I}", "cmd", "nbd-open", "peer", to, "listen", listen,
				       "target", target, "export", export, "lanes", (json_int_t)lanes));
}

static int cmd_perf_region(const char *admin, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "to", required_argument, NULL, 't' }, { "bytes", required_argument, NULL, 'b' },
		{ "lanes", required_argument, NULL, 'l' }, { NULL, 0, NULL, 0 },
	};
	const char *to = NULL;
	unsigned long long bytes = 0, lanes = 1;
	int c;
	optind = 1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 't': to = optarg; break;
		case 'b': if (parse_uint(optarg, "--bytes", 1ull << 36, &bytes)) return EXIT_USAGE; break;
		case 'l': if (parse_uint(optarg, "--lanes", 64, &lanes)) return EXIT_USAGE; break;
		default: usage(stderr); return EXIT_USAGE;
		}
	}
	if (!to || !bytes) {
		fprintf(stderr, "ferryctl perf-region: needs --to and --bytes\n");
		return EXIT_USAGE;
	}
	return call_and_print(admin, json_pack("{s:s, s:s, s:I, s:I}", "cmd", "perf-region", "peer", to, "bytes",
				       (json_int_t)bytes, "lanes", (json_int_t)lanes));
}

static int cmd_qmp(int argc, char **argv)
{
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "ferryctl qmp: needs SOCKET COMMAND [ARGS-JSON]\n");
		return EXIT_USAGE;
	}
	json_t *args = NULL;
	if (argc == 4) {
		json_error_t je;
		args = json_loads(argv[3], 0, &je);
		if (!json_is_object(args)) {
			fprintf(stderr, "ferryctl qmp: arguments must be a JSON object (%s)\n", args ? "not an object" : je.text);
			json_decref(args);
			return EXIT_USAGE;
		}
	}
	struct ferry_err err = { 0 };
	struct ferry_qmp *q = NULL;
	json_t *res = NULL;
	int rc = ferry_qmp_connect(argv[1], 10000, &q, &err);
	if (rc == 0)
		rc = ferry_qmp_execute(q, argv[2], args, &res, &err);
	json_decref(args);
	ferry_qmp_close(q);
	if (rc) {
		fprintf(stderr, "ferryctl qmp: %s\n", err.msg);
		return EXIT_FAILED;
	}
	char *s = json_dumps(res, JSON_COMPACT | JSON_ENCODE_ANY);
	if (s) {
		puts(s);
		free(s);
	}
	json_decref(res);
	return 0;
}

int main(int argc, char **argv)
{
	const char *admin = getenv("FERRY_ADMIN");
	if (!admin)
		admin = "/run/ferry/ferryd.sock";
	int i = 1;
	while (i < argc && argv[i][0] == '-') {
		if (strcmp(argv[i], "--admin") == 0 && i + 1 < argc) {
			admin = argv[i + 1];
			i += 2;
		} else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
			usage(stdout);
			return 0;
		} else if (strcmp(argv[i], "--version") == 0) {
			printf("ferryctl 0.1.0\n");
			return 0;
		} else {
			fprintf(stderr, "ferryctl: unknown option '%s'\n", argv[i]);
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (i >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	signal(SIGPIPE, SIG_IGN);
	const char *cmd = argv[i];
	int sub_argc = argc - i;
	char **sub_argv = argv + i;
	if (strcmp(cmd, "migrate") == 0)
		return cmd_migrate(admin, sub_argc, sub_argv);
	if (strcmp(cmd, "status") == 0 && (sub_argc < 2 || strcmp(sub_argv[1], "--json") == 0))
		return cmd_list(admin, sub_argc > 1);
	/* commands that take one id and pass it to ferryd's admin command of that kind */
	static const struct { const char *name, *admin_cmd, *kind; } by_id[] = {
		{ "status", "migrate-status", "migration" },  { "cancel", "migrate-cancel", "migration" },
		{ "tunnel-status", "tunnel-status", "tunnel" }, { "tunnel-close", "tunnel-close", "tunnel" },
		{ "nbd-status", "nbd-status", "nbd" },          { "nbd-close", "nbd-close", "nbd" },
	};
	for (size_t k = 0; k < sizeof(by_id) / sizeof(by_id[0]); k++)
		if (strcmp(cmd, by_id[k].name) == 0)
			return cmd_id(admin, by_id[k].admin_cmd, by_id[k].kind, sub_argc, sub_argv);
	if (strcmp(cmd, "recover") == 0)
		return cmd_recover(admin, sub_argc, sub_argv);
	if (strcmp(cmd, "tunnel-open") == 0)
		return cmd_tunnel_open(admin, sub_argc, sub_argv);
	if (strcmp(cmd, "perf-region") == 0)
		return cmd_perf_region(admin, sub_argc, sub_argv);
	if (strcmp(cmd, "nbd-open") == 0)
		return cmd_nbd_open(admin, sub_argc, sub_argv);
	if (strcmp(cmd, "qmp") == 0)
		return cmd_qmp(sub_argc, sub_argv);
	if (strcmp(cmd, "ping") == 0 || strcmp(cmd, "stats") == 0) {
		return call_and_print(admin, json_pack("{s:s}", "cmd", cmd));
	}
	fprintf(stderr, "ferryctl: unknown command '%s'\n", cmd);
	usage(stderr);
	return EXIT_USAGE;
}
