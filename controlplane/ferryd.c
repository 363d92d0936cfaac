/* ferryd: the ferry daemon. Options in, ferry_daemon_run out. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../drivers/hostport.h"
#include "daemon.h"
#include "plan.h"

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ferryd [options]\n"
		"  --admin PATH        admin socket for ferryctl (default /run/ferry/ferryd.sock)\n"
		"  --listen HOST:PORT  control listener for peer daemons (default 127.0.0.1:7470)\n"
		"  --driver NAME       data-plane driver: tcp (default), udp, dpdk, rdma (where built); datagram\n"
		"                      drivers take --driver-opt (dpdk: eal=\"...\", vdev=..., queues=N, ip=...,\n"
		"                      dgram=BYTES; any: fault=drop=1%%,reorder=2%%,seed=N); rdma: dev=NAME or\n"
		"                      gid=GID picks the device (default: --data's address, else the first active port),\n"
		"                      keepalive_ms=N probes idle lanes (1000; 0 = off), dead_ms=N fails a lane whose peer\n"
		"                      sent nothing that long (15000)\n"
		"  --data HOST:PORT    where the driver listens for data lanes (default: --listen's host, any port)\n"
		"  --driver-opt K=V    driver option, repeatable\n"
		"  --poll MODE         adaptive (default: spin, yield, then sleep) or busy\n"
		"  --spin-us N         adaptive spin budget after work, microseconds (default 50)\n"
		"  --no-splice         copy stream bytes through user space even where the driver splices\n"
		"  --window BYTES      per-stream flow-control window (default 4194304)\n"
		"  --run-dir DIR       where stream sockets are made (default: the admin socket's directory)\n"
		"  --allow-dir DIR     a further directory peers may name sockets in, repeatable\n"
		"  --host-uuid UUID    this host's identity in migration cookies (default: from /etc/machine-id;\n"
		"                      two daemons on one machine need distinct ones)\n"
		"  --cookie-log DIR    keep a copy of every migration cookie this daemon sends (XML) in DIR\n"
		"  --state-dir DIR     durable migration records (default: RUN-DIR/state), read by ferryctl recover\n"
		"  --disable FEATURES  never offer these (comma-separated: multifd, handoff, nbd, postcopy,\n"
		"                      postcopy-setup, postcopy-preempt): migrations fall back as if this\n"
		"                      host lacked them;\n"
		"                      spawn: never start a destination QEMU (only attach to one that waits)\n"
		"destination QEMUs started from the source's description (migrate VM, no VM.qmp here):\n"
		"  --qemu PATH         the QEMU binary (default qemu-system-x86_64 on PATH)\n"
		"  --storage-dir DIR   disk images, found by the source's file name (default /var/lib/ferry/images)\n"
		"  --mem-dir DIR       RAM files for memory-backend-file (default: none; such VMs are refused)\n"
		"  --spawn-prealloc    fault the started QEMU's RAM in before the migration (prealloc=on)\n"
		"  --tunnel PEER,LISTEN,TARGET\n"
		"                      a standing tunnel from the start: connections to the local unix\n"
		"                      socket LISTEN are carried to TARGET on the daemon at PEER (HOST:PORT),\n"
		"                      one session each, in arrival order; repeatable (at most 16)\n"
		"control connection between daemons (TLS 1.3, both sides authenticated; one of these is required):\n"
		"  --tls-psk FILE      pre-shared keys, psktool's IDENTITY:HEXKEY lines, mode 0600: the first\n"
		"                      line is this daemon's own, every line names a peer that may connect\n"
		"  --tls-x509 DIR      DIR/ca-cert.pem, DIR/server-cert.pem, DIR/server-key.pem (mode 0600):\n"
		"                      both sides present the certificate and verify the peer's against the CA\n"
		"  --tls-no-name-check with --tls-x509: accept any certificate of the CA, whatever the name\n"
		"                      dialled (default: the peer's certificate must name the host or IP in --to)\n"
		"  --insecure-no-tls   plain TCP, no authentication: anyone who reaches --listen controls this daemon\n"
		"  --version, --help\n");
}

static int parse_uint(const char *s, const char *what, unsigned long long max, unsigned long long *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || !*s || *end || s[0] == '-' || v > max) {
		fprintf(stderr, "ferryd: %s '%s' is not a number from 0 to %llu\n", what, s, max);
		return -1;
	}
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "admin", required_argument, NULL, 'a' },   { "listen", required_argument, NULL, 'l' },
		{ "driver", required_argument, NULL, 'd' },  { "data", required_argument, NULL, 'D' },
		{ "driver-opt", required_argument, NULL, 'o' }, { "poll", required_argument, NULL, 'p' },
		{ "spin-us", required_argument, NULL, 's' }, { "no-splice", no_argument, NULL, 'n' },
		{ "window", required_argument, NULL, 'w' },  { "run-dir", required_argument, NULL, 'r' },
		{ "allow-dir", required_argument, NULL, 'A' }, { "version", no_argument, NULL, 'V' },
		{ "tunnel", required_argument, NULL, 'T' },  { "help", no_argument, NULL, 'h' },
		{ "tls-psk", required_argument, NULL, 'K' }, { "tls-x509", required_argument, NULL, 'C' },
		{ "tls-no-name-check", no_argument, NULL, 'N' }, { "insecure-no-tls", no_argument, NULL, 'I' },
		{ "host-uuid", required_argument, NULL, 'U' }, { "disable", required_argument, NULL, 'X' },
		{ "state-dir", required_argument, NULL, 'Z' }, { "cookie-log", required_argument, NULL, 'L' },
		{ "qemu", required_argument, NULL, 'Q' },     { "storage-dir", required_argument, NULL, 'G' },
		{ "mem-dir", required_argument, NULL, 'M' },  { "spawn-prealloc", no_argument, NULL, 'P' },
		{ NULL, 0, NULL, 0 },
	};
	struct ferry_daemon_config cfg = { .admin_path = "/run/ferry/ferryd.sock", .listen = "127.0.0.1:7470" };
	const char *dopts[18] = { 0 };
	unsigned ndopts = 0, nallow = 0, ntun = 0;
	const char *data = NULL;
	static char bindopt[300];
	unsigned long long v;
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'a': cfg.admin_path = optarg; break;
		case 'l': cfg.listen = optarg; break;
		case 'd': cfg.dp.driver = optarg; break;
		case 'D': data = optarg; break;
		case 'o':
			if (ndopts >= 16 || !strchr(optarg, '=')) {
				fprintf(stderr, "ferryd: --driver-opt wants KEY=VALUE (at most 16)\n");
				return 2;
			}
			dopts[ndopts++] = optarg;
			break;
		case 'p':
			if (strcmp(optarg, "adaptive") == 0)
				cfg.dp.poll_mode = FERRY_POLL_ADAPTIVE;
			else if (strcmp(optarg, "busy") == 0)
				cfg.dp.poll_mode = FERRY_POLL_BUSY;
			else {
				fprintf(stderr, "ferryd: --poll must be 'adaptive' or 'busy', not '%s'\n", optarg);
				return 2;
			}
			break;
		case 's':
			if (parse_uint(optarg, "--spin-us", 1000000, &v))
				return 2;
			cfg.dp.spin_us = (unsigned)v;
			break;
		case 'n': cfg.dp.no_splice = true; break;
		case 'w':
			if (parse_uint(optarg, "--window", 1ull << 30, &v) || v < 65536) {
				fprintf(stderr, "ferryd: --window must be 65536 .. 1073741824 bytes\n");
				return 2;
			}
			cfg.dp.window = (size_t)v;
			break;
		case 'r': cfg.run_dir = optarg; break;
		case 'A':
			if (nallow >= FERRY_MAX_ALLOW_DIRS) {
				fprintf(stderr, "ferryd: at most %d --allow-dir\n", FERRY_MAX_ALLOW_DIRS);
				return 2;
			}
			cfg.allow_dirs[nallow++] = optarg;
			break;
		case 'T': {
			char *a = optarg, *b = strchr(a, ','), *c2 = b ? strchr(b + 1, ',') : NULL;
			if (ntun >= FERRY_MAX_CONFIG_TUNNELS || !b || !c2 || b == a || c2 == b + 1 || !c2[1] ||
			    strchr(c2 + 1, ',')) {
				fprintf(stderr, "ferryd: --tunnel wants PEER,LISTEN,TARGET (at most %d), not '%s'\n",
					FERRY_MAX_CONFIG_TUNNELS, optarg);
				return 2;
			}
			*b = *c2 = '\0';
			cfg.tunnels[ntun++] = (struct ferry_tunnel_config){ .peer = a, .listen = b + 1, .target = c2 + 1 };
			break;
		}
		case 'U': cfg.host_uuid = optarg; break;
		case 'Z': cfg.state_dir = optarg; break;
		case 'L': cfg.cookie_log = optarg; break;
		case 'X': {
			/* "spawn" is this host's alone (no cookie capability): take it out first. */
			char list[256] = "";
			size_t o = 0;
			for (const char *t = optarg; *t;) {
				size_t n = strcspn(t, ",");
				if (n == 5 && strncmp(t, "spawn", 5) == 0)
					cfg.no_spawn = true;
				else if (n && o + n + 2 < sizeof(list))
					o += (size_t)snprintf(list + o, sizeof(list) - o, "%s%.*s", o ? "," : "", (int)n, t);
				t += n + (t[n] == ',');
			}
			struct ferry_err ferr = { 0 };
			uint32_t f;
			if (list[0] && ferry_feature_list_parse(list, &f, &ferr)) {
				fprintf(stderr, "ferryd: --disable: %s (or spawn)\n", ferr.msg);
				return 2;
			}
			cfg.disabled_features |= list[0] ? f : 0;
			break;
		}
		case 'Q': cfg.qemu = optarg; break;
		case 'G': cfg.storage_dir = optarg; break;
		case 'M': cfg.mem_dir = optarg; break;
		case 'P': cfg.spawn_prealloc = true; break;
		case 'K': cfg.tls.psk_file = optarg; break;
		case 'C': cfg.tls.x509_dir = optarg; break;
		case 'N': cfg.tls.no_name_check = true; break;
		case 'I': cfg.tls.insecure = true; break;
		case 'V': printf("ferryd 0.1.0\n"); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "ferryd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	/* No silent default: plain TCP lets anyone who reaches the port migrate VMs. */
	int ncred = (cfg.tls.psk_file != NULL) + (cfg.tls.x509_dir != NULL) + cfg.tls.insecure;
	if (ncred != 1) {
		fprintf(stderr, ncred ? "ferryd: give only one of --tls-psk FILE, --tls-x509 DIR and --insecure-no-tls\n"
				      : "ferryd: the control connection needs credentials: --tls-psk FILE or --tls-x509 DIR "
					"(or --insecure-no-tls for plain TCP, unauthenticated; see docs/security.md)\n");
		return 2;
	}
	if (cfg.tls.no_name_check && !cfg.tls.x509_dir) {
		fprintf(stderr, "ferryd: --tls-no-name-check goes with --tls-x509\n");
		return 2;
	}
	if (!data) {
		/* Data lanes listen on the control address's host, any free port. */
		struct ferry_hostport hp;
		struct ferry_err herr = { 0 };
		if (ferry_parse_hostport(cfg.listen, FERRY_HP_PORT0 | FERRY_HP_ANY_HOST, &hp, &herr)) {
			fprintf(stderr, "ferryd: --listen: %s\n", herr.msg);
			return 2;
		}
		snprintf(bindopt, sizeof(bindopt), strchr(hp.host, ':') ? "bind=[%s]:0" : "bind=%s:0", hp.host);
	} else {
		snprintf(bindopt, sizeof(bindopt), "bind=%s", data);
	}
	static const char *defaults[2];
	defaults[0] = bindopt;
	cfg.dp.driver_options = dopts;
	cfg.dp.driver_defaults = defaults;

	struct sigaction sa = { .sa_handler = on_signal };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	struct ferry_err err = { 0 };
	if (ferry_daemon_run(&cfg, &stop_flag, &err)) {
		fprintf(stderr, "ferryd: %s\n", err.msg);
		return 1;
	}
	return 0;
}
