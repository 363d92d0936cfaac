/* ferry-perf: raw data-plane throughput between two running ferryd.
 *
 *  stream mode: opens a tunnel of N streams from the source daemon to the
 *  destination daemon, pushes BYTES through each stream's unix socket on the
 *  source side and reads them back on the destination side (the path QEMU's
 *  migration channels take), optionally checking a CRC32C per stream.
 *  region mode: asks the source daemon to write a BYTES region into a
 *  pre-faulted region of the destination daemon (the raw page path).
 * Both report seconds, GB/s and each daemon's CPU seconds per GiB. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../controlplane/jsonline.h"
#include "../dataplane/dataplane.h"
#include "../drivers/size.h"

#define BUF_BYTES (1u << 20)
#define MAX_STREAMS 64

struct opts {
	const char *src_admin, *dst_admin;
	unsigned long long bytes;
	unsigned streams, lanes;
	bool stream_mode, region_mode, memcpy_mode, json, verify;
};

struct endpoint_pair {
	int tx_fd, rx_fd;
	unsigned long long bytes;
	bool verify;
	uint8_t *pattern;
	uint32_t crc_sent, crc_recv;
	unsigned long long received;
	int error;
};

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int admin_call(const char *admin, json_t *req, json_t **rep)
{
	struct ferry_jl jl;
	struct ferry_err err = { 0 };
	if (!req)
		return -ENOMEM;
	int rc = ferry_jl_connect_unix(admin, 5000, &jl, &err);
	if (rc == 0) {
		rc = ferry_jl_call(&jl, req, 900000, rep, &err);
		ferry_jl_close(&jl);
	}
	json_decref(req);
	if (rc)
		fprintf(stderr, "ferry-perf: %s: %s\n", admin, err.msg);
	return rc;
}

static double daemon_cpu(const char *admin)
{
	json_t *r = NULL;
	if (admin_call(admin, json_pack("{s:s}", "cmd", "stats"), &r))
		return -1;
	double v = json_number_value(json_object_get(r, "cpu_s"));
	json_decref(r);
	return v;
}

static void *writer(void *arg)
{
	struct endpoint_pair *p = arg;
	unsigned long long left = p->bytes;
	uint32_t crc = 0;
	while (left > 0) {
		size_t n = left < BUF_BYTES ? (size_t)left : BUF_BYTES;
		if (p->verify)
			crc = ferry_dp_checksum(crc, p->pattern, n);
		size_t off = 0;
		while (off < n) {
			ssize_t w = send(p->tx_fd, p->pattern + off, n - off, MSG_NOSIGNAL);
			if (w < 0) {
				if (errno == EINTR)
					continue;
				p->error = errno;
				return NULL;
			}
			off += (size_t)w;
		}
		left -= n;
	}
	p->crc_sent = crc;
	shutdown(p->tx_fd, SHUT_WR);
	return NULL;
}

static void *reader(void *arg)
{
	struct endpoint_pair *p = arg;
	uint8_t *buf = malloc(BUF_BYTES);
	uint32_t crc = 0;
	if (!buf) {
		p->error = ENOMEM;
		return NULL;
	}
	for (;;) {
		ssize_t r = recv(p->rx_fd, buf, BUF_BYTES, 0);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			p->error = errno;
			break;
		}
		if (r == 0)
			break;
		if (p->verify)
			crc = ferry_dp_checksum(crc, buf, (size_t)r);
		p->received += (unsigned long long)r;
	}
	p->crc_recv = crc;
	free(buf);
	return NULL;
}

static int unix_listen(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return -1;
	strcpy(sa.sun_path, path);
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, MAX_STREAMS)) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static int unix_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
		return fd;
	if (fd >= 0)
		close(fd);
	return -1;
}

static json_t *run_stream(const struct opts *o)
{
	json_t *ps = NULL, *pd = NULL, *tun = NULL, *result = NULL;
	int lfd = -1;
	char sink[256], src_sock[256];
	struct endpoint_pair pairs[MAX_STREAMS];
	pthread_t wt[MAX_STREAMS], rt[MAX_STREAMS];
	unsigned started = 0;
	uint8_t *pattern = NULL;
	memset(pairs, 0, sizeof(pairs));
	for (unsigned i = 0; i < MAX_STREAMS; i++)
		pairs[i].tx_fd = pairs[i].rx_fd = -1;

	if (admin_call(o->src_admin, json_pack("{s:s}", "cmd", "ping"), &ps) ||
	    admin_call(o->dst_admin, json_pack("{s:s}", "cmd", "ping"), &pd))
		goto out;
	/* Tunnel targets must lie in one of the destination's --allow-dir. */
	const char *sink_dir = json_string_value(json_array_get(json_object_get(pd, "allow_dirs"), 0));
	if (!sink_dir) {
		fprintf(stderr, "ferry-perf: the destination daemon has no --allow-dir for the stream sink; start it with one\n");
		goto out;
	}
	snprintf(sink, sizeof(sink), "%s/perf-%d-sink.sock", sink_dir, getpid());
	snprintf(src_sock, sizeof(src_sock), "%s/perf-%d-src.sock", json_string_value(json_object_get(ps, "run_dir")),
		 getpid());
	lfd = unix_listen(sink);
	if (lfd < 0) {
		fprintf(stderr, "ferry-perf: cannot listen on %s: %s\n", sink, strerror(errno));
		goto out;
	}
	if (admin_call(o->src_admin,
		       json_pack("{s:s, s:s, s:s, s:s, s:i, s:i}", "cmd", "tunnel-open", "peer",
				 json_string_value(json_object_get(pd, "listen")), "listen", src_sock, "target", sink,
				 "streams", (int)o->streams, "lanes", (int)o->lanes),
		       &tun))
		goto out;
	pattern = malloc(BUF_BYTES);
	if (!pattern)
		goto out;
	uint64_t x = 0x2545f4914f6cdd1dull ^ (uint64_t)getpid();
	for (size_t i = 0; i + 8 <= BUF_BYTES; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(pattern + i, &x, 8);
	}
	/* Connect in order; the destination side sees the same order. */
	for (unsigned i = 0; i < o->streams; i++) {
		pairs[i].tx_fd = unix_connect(src_sock);
		if (pairs[i].tx_fd < 0) {
			fprintf(stderr, "ferry-perf: cannot connect to %s: %s\n", src_sock, strerror(errno));
			goto out;
		}
		pairs[i].rx_fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (pairs[i].rx_fd < 0) {
			fprintf(stderr, "ferry-perf: accept: %s\n", strerror(errno));
			goto out;
		}
		pairs[i].bytes = o->bytes;
		pairs[i].verify = o->verify;
		pairs[i].pattern = pattern;
	}
	double c0s = daemon_cpu(o->src_admin), c0d = daemon_cpu(o->dst_admin);
	double t0 = now_s();
	for (; started < o->streams; started++) {
		if (pthread_create(&rt[started], NULL, reader, &pairs[started]))
			break;
		if (pthread_create(&wt[started], NULL, writer, &pairs[started])) {
			pthread_join(rt[started], NULL);
			break;
		}
	}
	for (unsigned i = 0; i < started; i++) {
		pthread_join(wt[i], NULL);
		pthread_join(rt[i], NULL);
	}
	double secs = now_s() - t0;
	double c1s = daemon_cpu(o->src_admin), c1d = daemon_cpu(o->dst_admin);
	unsigned long long total = 0;
	bool ok = started == o->streams, verified = o->verify;
	for (unsigned i = 0; i < o->streams; i++) {
		total += pairs[i].received;
		if (pairs[i].error || pairs[i].received != o->bytes) {
			fprintf(stderr, "ferry-perf: stream %u: %llu of %llu bytes arrived%s%s\n", i, pairs[i].received,
				o->bytes, pairs[i].error ? ": " : "", pairs[i].error ? strerror(pairs[i].error) : "");
			ok = false;
		}
		if (o->verify && pairs[i].crc_sent != pairs[i].crc_recv) {
			fprintf(stderr, "ferry-perf: stream %u: checksum mismatch\n", i);
			verified = false;
		}
	}
	double gib = (double)total / (1024.0 * 1024 * 1024);
	result = json_pack("{s:s, s:i, s:i, s:I, s:f, s:f, s:f, s:f, s:b, s:b}", "mode", "stream", "streams",
			   (int)o->streams, "lanes", (int)(o->lanes ? o->lanes : o->streams), "bytes", (json_int_t)total,
			   "seconds", secs, "gbs", (double)total / secs / 1e9, "src_cpu_s_per_gib",
			   gib > 0 ? (c1s - c0s) / gib : 0.0, "dst_cpu_s_per_gib", gib > 0 ? (c1d - c0d) / gib : 0.0,
			   "complete", ok, "verified", verified);
out:
	for (unsigned i = 0; i < MAX_STREAMS; i++) {
		if (pairs[i].tx_fd >= 0)
			close(pairs[i].tx_fd);
		if (pairs[i].rx_fd >= 0)
			close(pairs[i].rx_fd);
	}
	if (tun) {
		json_t *r = NULL;
		if (admin_call(o->src_admin, json_pack("{s:s, s:O}", "cmd", "tunnel-close", "tunnel",
						       json_object_get(tun, "tunnel")), &r) == 0)
			json_decref(r);
	}
	if (lfd >= 0) {
		close(lfd);
		unlink(sink);
	}
	free(pattern);
	json_decref(ps);
	json_decref(pd);
	json_decref(tun);
	return result;
}

static json_t *run_region(const struct opts *o)
{
	json_t *pd = NULL, *r = NULL, *result = NULL;
	if (admin_call(o->dst_admin, json_pack("{s:s}", "cmd", "ping"), &pd))
		return NULL;
	if (admin_call(o->src_admin, json_pack("{s:s, s:s, s:I, s:i}", "cmd", "perf-region", "peer",
					       json_string_value(json_object_get(pd, "listen")), "bytes",
					       (json_int_t)o->bytes, "lanes", (int)(o->lanes ? o->lanes : 1)), &r) == 0) {
		double gib = (double)o->bytes / (1024.0 * 1024 * 1024);
		double secs = json_number_value(json_object_get(r, "seconds"));
		/* Both daemons report CPU for the transfer itself: allocating,
		 * pre-faulting and checksumming the regions stay out. */
		result = json_pack("{s:s, s:i, s:I, s:f, s:f, s:f, s:f, s:b, s:b}", "mode", "region", "lanes",
				   (int)(o->lanes ? o->lanes : 1), "bytes", (json_int_t)o->bytes, "seconds", secs, "gbs",
				   (double)o->bytes / secs / 1e9, "src_cpu_s_per_gib",
				   json_number_value(json_object_get(r, "src_cpu_s")) / gib, "dst_cpu_s_per_gib",
				   json_number_value(json_object_get(r, "dst_cpu_s")) / gib, "complete", 1, "verified",
				   json_is_true(json_object_get(r, "verified")));
	}
	json_decref(pd);
	json_decref(r);
	return result;
}

/* The physical ceiling of a copying driver on this host: one core copying
 * buffers far larger than its caches, 1 MiB at a time, as a lane would. */
#define MEMCPY_SPAN (256u << 20)
static json_t *run_memcpy(const struct opts *o)
{
	uint8_t *a = malloc(MEMCPY_SPAN), *b = malloc(MEMCPY_SPAN);
	json_t *result = NULL;
	if (!a || !b) {
		fprintf(stderr, "ferry-perf: cannot allocate 2 x %u MiB for the memcpy ceiling\n", MEMCPY_SPAN >> 20);
		goto out;
	}
	memset(a, 0x5a, MEMCPY_SPAN); /* fault both in before the clock starts */
	memset(b, 0, MEMCPY_SPAN);
	unsigned long long done = 0;
	double t0 = now_s();
	while (done < o->bytes) {
		for (size_t off = 0; off < MEMCPY_SPAN && done < o->bytes; off += BUF_BYTES, done += BUF_BYTES)
			memcpy(b + off, a + off, BUF_BYTES);
		__asm__ volatile("" : : "r"(b) : "memory"); /* keep the copies */
	}
	double secs = now_s() - t0;
	result = json_pack("{s:s, s:I, s:f, s:f}", "mode", "memcpy", "bytes", (json_int_t)done, "seconds", secs, "gbs",
			   (double)done / secs / 1e9);
out:
	free(a);
	free(b);
	return result;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: ferry-perf --src-admin PATH --dst-admin PATH [--mode stream|region|both]\n"
		   "                  [--bytes N[K|M|G]] [--streams N] [--lanes N] [--no-verify] [--json]\n"
		   "       ferry-perf --mode memcpy [--bytes N] [--json]\n"
		   "  --bytes is per stream in stream mode, the region size in region mode (default 1G)\n"
		   "  memcpy: this host's single-core copy bandwidth (the ceiling of a copying driver), no daemons\n");
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "src-admin", required_argument, NULL, 's' }, { "dst-admin", required_argument, NULL, 'd' },
		{ "mode", required_argument, NULL, 'm' },      { "bytes", required_argument, NULL, 'b' },
		{ "streams", required_argument, NULL, 'n' },   { "lanes", required_argument, NULL, 'l' },
		{ "no-verify", no_argument, NULL, 'V' },       { "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },            { NULL, 0, NULL, 0 },
	};
	struct opts o = { .bytes = 1ull << 30, .streams = 1, .stream_mode = true, .verify = true };
	unsigned long long v;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 's': o.src_admin = optarg; break;
		case 'd': o.dst_admin = optarg; break;
		case 'm':
			o.stream_mode = strcmp(optarg, "stream") == 0 || strcmp(optarg, "both") == 0;
			o.region_mode = strcmp(optarg, "region") == 0 || strcmp(optarg, "both") == 0;
			o.memcpy_mode = strcmp(optarg, "memcpy") == 0;
			if (!o.stream_mode && !o.region_mode && !o.memcpy_mode) {
				fprintf(stderr, "ferry-perf: --mode must be stream, region, both or memcpy\n");
				return 2;
			}
			break;
		case 'b':
			if (ferry_parse_size(optarg, 1, ~0ull, &o.bytes, NULL)) {
				fprintf(stderr, "ferry-perf: --bytes '%s' is not a size\n", optarg);
				return 2;
			}
			break;
		case 'n':
		case 'l':
			if (ferry_parse_size(optarg, 1, MAX_STREAMS, &v, NULL)) {
				fprintf(stderr, "ferry-perf: --%s must be 1..%d\n", c == 'n' ? "streams" : "lanes", MAX_STREAMS);
				return 2;
			}
			if (c == 'n')
				o.streams = (unsigned)v;
			else
				o.lanes = (unsigned)v;
			break;
		case 'V': o.verify = false; break;
		case 'j': o.json = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if ((!o.memcpy_mode && (!o.src_admin || !o.dst_admin)) || optind < argc) {
		usage(stderr);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	json_t *all = json_array();
	int rc = 0;
	if (o.memcpy_mode) {
		json_t *r = run_memcpy(&o);
		if (!r)
			rc = 1;
		else
			json_array_append_new(all, r);
	}
	if (o.stream_mode) {
		json_t *r = run_stream(&o);
		if (!r || !json_is_true(json_object_get(r, "complete")) ||
		    (o.verify && !json_is_true(json_object_get(r, "verified"))))
			rc = 1;
		if (r)
			json_array_append_new(all, r);
	}
	if (o.region_mode) {
		json_t *r = run_region(&o);
		if (!r || !json_is_true(json_object_get(r, "verified")))
			rc = 1;
		if (r)
			json_array_append_new(all, r);
	}
	size_t i;
	json_t *r;
	if (o.json) {
		char *s = json_dumps(all, JSON_INDENT(2));
		if (s) {
			puts(s);
			free(s);
		}
	} else {
		json_array_foreach(all, i, r) {
			if (strcmp(json_string_value(json_object_get(r, "mode")), "memcpy") == 0) {
				printf("memcpy, one core: %.2f GiB in %.3f s = %.2f GB/s\n",
				       (double)json_integer_value(json_object_get(r, "bytes")) / (1024.0 * 1024 * 1024),
				       json_number_value(json_object_get(r, "seconds")),
				       json_number_value(json_object_get(r, "gbs")));
				continue;
			}
			printf("%-6s %2lld lane(s) %2lld stream(s): %.2f GiB in %.3f s = %.2f GB/s; CPU s/GiB src %.3f dst %.3f; %s\n",
			       json_string_value(json_object_get(r, "mode")),
			       (long long)json_integer_value(json_object_get(r, "lanes")),
			       (long long)json_integer_value(json_object_get(r, "streams")),
			       (double)json_integer_value(json_object_get(r, "bytes")) / (1024.0 * 1024 * 1024),
			       json_number_value(json_object_get(r, "seconds")), json_number_value(json_object_get(r, "gbs")),
			       json_number_value(json_object_get(r, "src_cpu_s_per_gib")),
			       json_number_value(json_object_get(r, "dst_cpu_s_per_gib")),
			       json_is_true(json_object_get(r, "verified")) ? "verified" : "NOT verified");
		}
	}
	json_decref(all);
	return rc;
}
