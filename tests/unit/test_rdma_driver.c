/* The RDMA driver on real verbs: device choice; the driver alone with a
 * one-sided write under a bogus key (remote access error on both ends); under
 * the data plane, region writes (one-sided) checked byte for byte, streams
 * both ways at once, a destination region too small, and a peer that closes
 * mid-transfer; a CQ overrun provoked for real (the test-only option
 * test_cq_entries= gives a lane a CQ too small for the work posted). Needs an active RDMA port (soft-RoCE
 * in the test guest: tests/e2e/rdma-ferry.sh runs it there); exits 77 where
 * there is none. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "dataplane/dataplane.h"
#include "drivers/driver.h"

static uint32_t next_session = 700;

static struct ferry_dp *open_rdma(const char *opt, struct ferry_err *err)
{
	const char *opts[] = { opt, NULL };
	struct ferry_dp_config cfg = { .driver = "rdma", .driver_options = opt ? opts : NULL };
	struct ferry_dp *dp = NULL;
	ferry_err_clear(err);
	return ferry_dp_open(&cfg, &dp, err) == 0 ? dp : NULL;
}

/* A session over 'lanes' lanes; with paths, streams go from the source's
 * listening socket src_path to the destination's dst_path. */
static int make_pair_paths(struct ferry_dp *sdp, struct ferry_dp *ddp, unsigned lanes, const char *src_path,
			   const char *dst_path, struct ferry_session **src, struct ferry_session **dst)
{
	struct ferry_err err = { 0 };
	uint32_t id = next_session++;
	struct ferry_session_params p = { .id = id, .lanes = lanes, .max_streams = lanes, .timeout_ms = 10000,
					  .unix_path = dst_path };
	for (int i = 0; i < FERRY_TOKEN_LEN; i++)
		p.token[i] = (uint8_t)(id * 17 + (unsigned)i);
	if (ferry_session_create_dst(ddp, &p, dst, &err)) {
		printf("# dst: %s\n", err.msg);
		return -1;
	}
	char ep[FERRY_DP_ENDPOINT_MAX];
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	p.unix_path = src_path;
	if (ferry_session_create_src(sdp, &p, ep, src, &err)) {
		printf("# src: %s\n", err.msg);
		ferry_session_close(*dst);
		return -1;
	}
	return ferry_session_wait_active(*dst, 10000, &err);
}

static int make_pair(struct ferry_dp *sdp, struct ferry_dp *ddp, unsigned lanes, struct ferry_session **src,
		     struct ferry_session **dst)
{
	return make_pair_paths(sdp, ddp, lanes, NULL, NULL, src, dst);
}

static void fill(uint8_t *b, size_t n, uint32_t seed)
{
	for (size_t i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		b[i] = (uint8_t)(seed >> 16);
	}
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One direction of a stream: write 'bytes' of a seeded pattern into fd (then
 * half-close), or read to EOF; either way a CRC32C of what passed. */
struct flow {
	int fd;
	bool writer;
	size_t bytes, moved;
	uint32_t seed, crc;
	/* reader: with dst set, stop after pause_after bytes until dst's lane 0
	 * stops moving bytes (the target socket and the stream's ring full) */
	size_t pause_after;
	struct ferry_session *dst;
};

static void wait_lane_still(struct ferry_session *s)
{
	uint64_t last = UINT64_MAX;
	for (int still = 0, i = 0; still < 4 && i < 100; i++) {
		struct ferry_session_stats st;
		ferry_session_stats(s, &st);
		still = st.lane[0].rx_bytes == last ? still + 1 : 0;
		last = st.lane[0].rx_bytes;
		usleep(50000);
	}
}

static void *flow_main(void *arg)
{
	struct flow *f = arg;
	static __thread uint8_t buf[1 << 16];
	while (f->writer ? f->moved < f->bytes : true) {
		size_t n = sizeof(buf);
		ssize_t r;
		if (f->dst && f->moved >= f->pause_after) {
			wait_lane_still(f->dst);
			f->dst = NULL;
		}
		if (f->dst && n > f->pause_after - f->moved)
			n = f->pause_after - f->moved;
		if (f->writer) {
			if (n > f->bytes - f->moved)
				n = f->bytes - f->moved;
			fill(buf, n, f->seed + (uint32_t)f->moved);
			r = send(f->fd, buf, n, MSG_NOSIGNAL);
		} else {
			r = recv(f->fd, buf, n, 0);
		}
		if (r <= 0)
			break;
		f->crc = ferry_dp_checksum(f->crc, buf, (size_t)r);
		f->moved += (size_t)r;
	}
	if (f->writer)
		shutdown(f->fd, SHUT_WR);
	return NULL;
}

static int unix_socket(const char *path, bool listening)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	if (listening ? bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 8)
		      : connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Two streams over two lanes, both directions at once, checked by CRC32C;
 * one target pauses part way. */
static void test_streams(struct ferry_dp *sdp, struct ferry_dp *ddp, size_t bytes)
{
	char dir[] = "/tmp/ferry-rdma-XXXXXX", sp[64], dp[64];
	if (!mkdtemp(dir))
		return;
	snprintf(sp, sizeof(sp), "%s/s", dir);
	snprintf(dp, sizeof(dp), "%s/d", dir);
	int lfd = unix_socket(dp, true);
	struct ferry_session *src, *dst;
	CHECK(lfd >= 0 && make_pair_paths(sdp, ddp, 2, sp, dp, &src, &dst) == 0, "stream session over 2 lanes is up");
	struct flow fl[8];
	pthread_t t[8];
	for (int i = 0; i < 2; i++) {
		int a = unix_socket(sp, false);
		struct pollfd p = { .fd = lfd, .events = POLLIN };
		int b = poll(&p, 1, 20000) == 1 ? accept(lfd, NULL, NULL) : -1;
		CHECK(a >= 0 && b >= 0, "stream %d connected end to end", i);
		/* forward: bytes (+ an odd tail), backward: 1 MiB + 13 */
		fl[4 * i + 0] = (struct flow){ .fd = a, .writer = true, .bytes = bytes + 4097u * (unsigned)i, .seed = 5u + (unsigned)i };
		/* stream 0's target stops an eighth of the way: the payload goes
		 * into the target socket in place until the socket (~4 MiB) is
		 * full, then into the ring (4 MiB): the rest exceeds both even
		 * with the sanitizer build's 8 MiB */
		fl[4 * i + 1] = (struct flow){ .fd = b, .pause_after = i ? 0 : bytes / 8, .dst = i ? NULL : dst };
		fl[4 * i + 2] = (struct flow){ .fd = b, .writer = true, .bytes = (1u << 20) + 13, .seed = 50u + (unsigned)i };
		fl[4 * i + 3] = (struct flow){ .fd = a };
	}
	double t0 = now_s();
	for (int i = 0; i < 8; i++)
		pthread_create(&t[i], NULL, flow_main, &fl[i]);
	for (int i = 0; i < 8; i++)
		pthread_join(t[i], NULL);
	double dt = now_s() - t0;
	for (int i = 0; i < 8; i += 2)
		CHECK(fl[i].moved == fl[i].bytes && fl[i + 1].moved == fl[i].bytes && fl[i].crc == fl[i + 1].crc,
		      "stream %d %s: %zu bytes sent, %zu arrived, CRC32C %08x / %08x", i / 4, i % 4 ? "backward" : "forward",
		      fl[i].moved, fl[i + 1].moved, fl[i].crc, fl[i + 1].crc);
	printf("# streams: %.1f MB/s forward over 2 lanes\n", (double)(fl[0].bytes + fl[4].bytes) / dt / 1e6);
	struct ferry_session_stats st;
	ferry_session_stats(dst, &st);
	CHECK(st.rx_direct_bytes > 0 && st.rx_direct_bytes < st.rx_bytes,
	      "of %llu bytes received, %llu went from the receive buffers straight into the target sockets, "
	      "the rest through the streams' rings", (unsigned long long)st.rx_bytes, (unsigned long long)st.rx_direct_bytes);
	for (int i = 0; i < 2; i++) {
		close(fl[4 * i].fd);
		close(fl[4 * i + 1].fd);
	}
	ferry_session_close(src);
	ferry_session_close(dst);
	close(lfd);
	unlink(dp);
	rmdir(dir);
}

static void test_device_choice(void)
{
	struct ferry_err err = { 0 };
	struct ferry_dp *dp = open_rdma("dev=no-such-device", &err);
	CHECK(!dp && strstr(err.msg, "no verbs device named 'no-such-device'"), "an unknown device is named: %s", err.msg);
	ferry_dp_close(dp);
	dp = open_rdma("gid=fe80::1", &err);
	CHECK(!dp && strstr(err.msg, "not IPv4-mapped"), "a GID rdma_cm cannot bind is refused: %s", err.msg);
	ferry_dp_close(dp);
	dp = open_rdma("keepalive_ms=soon", &err);
	CHECK(!dp && strstr(err.msg, "keepalive_ms=soon is not a number"), "a bad keepalive is named: %s", err.msg);
	ferry_dp_close(dp);
	dp = open_rdma("dead_ms=500", &err);
	CHECK(!dp && strstr(err.msg, "dead_ms=500 must exceed keepalive_ms=1000"),
	      "a peer deadline shorter than the probes' period is refused: %s", err.msg);
	ferry_dp_close(dp);
	dp = open_rdma("bind=127.0.0.1:0", &err);
	char ep[FERRY_DP_ENDPOINT_MAX] = "";
	if (dp)
		ferry_dp_endpoint(dp, ep, sizeof(ep), &err);
	CHECK(dp && strncmp(ep, "rdma:", 5) == 0 && !strstr(ep, "127.0.0.1"),
	      "a loopback bind means the first active port: %s", dp ? ep : err.msg);
	ferry_dp_close(dp);
}

static void test_regions(struct ferry_dp *sdp, struct ferry_dp *ddp, size_t len, unsigned lanes)
{
	struct ferry_session *src, *dst;
	CHECK(make_pair(sdp, ddp, lanes, &src, &dst) == 0, "region session over %u lanes is up", lanes);
	uint8_t *a = malloc(len), *b = calloc(1, len);
	fill(a, len, 11);
	struct ferry_err err = { 0 };
	CHECK(ferry_region_add(src, 3, a, len, &err) == 0 && ferry_region_add(dst, 3, b, len, &err) == 0,
	      "regions of %zu bytes registered on both sides (%s)", len, err.msg);
	double t0 = now_s();
	CHECK(ferry_region_write(src, 3, 0, len, &err) == 0, "write queued");
	CHECK(ferry_region_fence(src, 120000, &err) == 0, "fence returns once every write landed (%s)", err.msg);
	double dt = now_s() - t0;
	CHECK(memcmp(a, b, len) == 0, "destination memory equals the source, byte for byte (%.1f MB/s one-sided)",
	      (double)len / dt / 1e6);
	fill(a + 4096, 8192, 99);
	CHECK(ferry_region_write(src, 3, 4096, 8192, &err) == 0 && ferry_region_fence(src, 30000, &err) == 0 &&
	      memcmp(a, b, len) == 0, "a partial rewrite at an offset lands exactly there");
	struct ferry_session_stats st;
	ferry_session_stats(dst, &st);
	CHECK(st.rx_bytes == 0 && st.lane[0].rx_bytes == 0,
	      "the destination's CPU moved none of it (lane rx bytes %llu): the writes were one-sided",
	      (unsigned long long)st.lane[0].rx_bytes);
	ferry_session_close(src);
	ferry_session_close(dst);
	free(a);
	free(b);
}

static void test_peer_region_too_small(struct ferry_dp *sdp, struct ferry_dp *ddp)
{
	struct ferry_session *src, *dst;
	CHECK(make_pair(sdp, ddp, 1, &src, &dst) == 0, "small-region session is up");
	size_t len = 4u << 20;
	uint8_t *a = calloc(1, len), *b = calloc(1, len / 2);
	struct ferry_err err = { 0 };
	CHECK(ferry_region_add(src, 1, a, len, &err) == 0 && ferry_region_add(dst, 1, b, len / 2, &err) == 0,
	      "source region 4 MiB, destination 2 MiB");
	ferry_region_write(src, 1, 0, len, &err);
	int rc = ferry_region_fence(src, 30000, &err);
	CHECK(rc != 0 && strstr(err.msg, "overruns the peer's region"), "writing past the peer's region fails the session: %s",
	      err.msg);
	ferry_session_close(src);
	ferry_session_close(dst);
	free(a);
	free(b);
}

static void test_peer_closes(struct ferry_dp *sdp, struct ferry_dp *ddp, size_t len)
{
	struct ferry_session *src, *dst;
	CHECK(make_pair(sdp, ddp, 2, &src, &dst) == 0, "vanish: session up");
	uint8_t *a = calloc(1, len), *b = calloc(1, len);
	struct ferry_err err = { 0 };
	CHECK(ferry_region_add(src, 1, a, len, &err) == 0 && ferry_region_add(dst, 1, b, len, &err) == 0, "%zu MiB regions",
	      len >> 20);
	ferry_region_write(src, 1, 0, len, &err);
	usleep(300000);
	ferry_session_close(dst); /* disconnects its lanes, deregisters its region */
	double t0 = now_s();
	int rc = ferry_region_fence(src, 60000, &err);
	double dt = now_s() - t0;
	CHECK(rc != 0 && strstr(err.msg, "rdma lane"), "the source fails with the lane's reason in %.1f s: %s", dt, err.msg);
	ferry_session_close(src);
	free(a);
	free(b);
}

/* ---- the driver alone, below the data plane ------------------------------- */

struct acceptor {
	const struct ferry_driver_ops *ops;
	struct ferry_device *dev;
	struct ferry_lane_drv *lane;
};

static void *accept_main(void *arg)
{
	struct acceptor *a = arg;
	struct ferry_err err = { 0 };
	for (int i = 0; i < 1000 && !a->lane; i++) {
		struct pollfd p = { .fd = a->ops->listen_fd(a->dev), .events = POLLIN };
		poll(&p, 1, 20);
		if (a->ops->lane_accept(a->dev, &a->lane, &err) != -EAGAIN && !a->lane)
			break;
	}
	return NULL;
}

/* Drive a lane until it fails or timeout_ms passes; returns the error. */
static int until_failed(const struct ferry_driver_ops *ops, struct ferry_lane_drv *l, int timeout_ms,
			struct ferry_err *err)
{
	double end = now_s() + timeout_ms / 1000.0;
	while (now_s() < end) {
		struct ferry_rx_frame f;
		int rc = ops->tx_flush(l, err);
		if (rc && rc != -EAGAIN)
			return rc;
		rc = ops->rx_burst(l, &f, 1, err);
		if (rc < 0)
			return rc;
		if (rc > 0)
			ops->rx_release(l, &f, 1);
		short ev;
		struct pollfd p = { .fd = ops->wakeup_fd(l, &ev, true), .events = POLLIN };
		poll(&p, 1, 50);
	}
	return 0;
}

/* The device's verbs resource counts (pd, cq, qp, cm_id, mr, ...) from
 * iproute2's `rdma resource show`: equal before and after a lane's life
 * means its close freed everything. */
static void rdma_resources(char *buf, size_t len)
{
	buf[0] = '\0';
	FILE *p = popen("rdma resource show 2>&1", "r");
	if (!p)
		return;
	size_t n = fread(buf, 1, len - 1, p);
	buf[n] = '\0';
	pclose(p);
}

/* A receiver whose CQ holds a handful of entries, and a sender that posts
 * forty messages while the receiver does not poll: the device overruns the
 * CQ and raises IBV_EVENT_CQ_ERR; the lane must fail with that reason. */
static void test_cq_overrun(void)
{
	const struct ferry_driver_ops *ops = ferry_driver_find("rdma");
	if (!ops)
		return;
	struct ferry_err err = { 0 };
	const char *small[] = { "test_cq_entries=4", NULL };
	struct ferry_driver_config cfg = { 0 }, cfg_small = { .options = small };
	struct ferry_device *da = NULL, *db = NULL;
	CHECK(ops->open(&cfg, &da, &err) == 0 && ops->open(&cfg_small, &db, &err) == 0, "CQ overrun: devices open (%s)",
	      err.msg);
	if (!da || !db)
		goto out_dev;
	char before[4096], during[4096], after[4096], ep[FERRY_ENDPOINT_MAX];
	rdma_resources(before, sizeof(before));
	ops->local_endpoint(db, ep, sizeof(ep), &err);
	struct acceptor acc = { ops, db, NULL };
	struct ferry_lane_drv *la = NULL;
	pthread_t t;
	pthread_create(&t, NULL, accept_main, &acc);
	int rc = ops->lane_connect(da, ep, 0, 10000, &la, &err);
	pthread_join(t, NULL);
	CHECK(rc == 0 && acc.lane, "CQ overrun: a lane to a 4-entry CQ connects (%s)", err.msg);
	if (rc || !acc.lane)
		goto out;
	rdma_resources(during, sizeof(during));
	CHECK(strcmp(before, during) != 0, "the device counts the lanes' resources: %s", during);
	static uint8_t payload[4096];
	struct iovec iov = { .iov_base = payload, .iov_len = sizeof(payload) };
	unsigned sent = 0;
	for (int i = 0; i < 40; i++) {
		struct ferry_tx_frame f = { .hdr = { .type = FERRY_FT_DATA, .session = 1, .stream = 1, .length = sizeof(payload) },
					    .iov = &iov, .iovcnt = 1 };
		if (ops->tx_burst(la, &f, 1, &err) == 1)
			sent++;
		ops->tx_flush(la, &err);
	}
	CHECK(sent >= 16, "CQ overrun: %u messages posted to a receiver that does not poll", sent);
	usleep(500000); /* let the device deliver them into the small CQ */
	double t0 = now_s();
	ferry_err_clear(&err);
	rc = until_failed(ops, acc.lane, 20000, &err);
	CHECK(rc < 0 && strstr(err.msg, "CQ overrun"), "the receiver's lane fails with the overrun in %.1f s: %s",
	      now_s() - t0, err.msg);
out:
	ops->lane_close(la);
	ops->lane_close(acc.lane);
	rdma_resources(after, sizeof(after));
	CHECK(before[0] && strcmp(before, after) == 0, "both lanes' verbs resources are freed: %s / %s", before, after);
out_dev:
	ops->close(da);
	ops->close(db);
}

static void test_driver_errors(void)
{
	const struct ferry_driver_ops *ops = ferry_driver_find("rdma");
	CHECK(ops && (ops->caps & FERRY_DRV_ONESIDED) && ops->write_remote, "the rdma driver is built and one-sided");
	if (!ops)
		return;
	struct ferry_err err = { 0 };
	struct ferry_driver_config cfg = { 0 };
	struct ferry_device *da = NULL, *db = NULL;
	CHECK(ops->open(&cfg, &da, &err) == 0 && ops->open(&cfg, &db, &err) == 0, "two devices open (%s)", err.msg);
	char ep[FERRY_ENDPOINT_MAX];
	ops->local_endpoint(db, ep, sizeof(ep), &err);
	ferry_err_clear(&err);
	struct ferry_lane_drv *la = NULL;
	CHECK(ops->lane_connect(da, "rdma:198.18.0.1:", 0, 1000, &la, &err) == -EINVAL && strstr(err.msg, "IP:PORT"),
	      "a malformed endpoint is refused: %s", err.msg);

	struct acceptor acc = { ops, db, NULL };
	pthread_t t;
	pthread_create(&t, NULL, accept_main, &acc);
	ferry_err_clear(&err);
	int rc = ops->lane_connect(da, ep, 0, 10000, &la, &err);
	pthread_join(t, NULL);
	CHECK(rc == 0 && acc.lane, "a lane connects to %s (%s)", ep, err.msg);
	if (rc || !acc.lane)
		goto out;

	/* A one-sided write with a key the peer never gave: the peer's device refuses it. */
	size_t len = 1u << 20;
	uint8_t *buf = calloc(1, len);
	struct ferry_mr mr = { 0 };
	CHECK(ops->mem_register(da, buf, len, &mr, &err) == 0, "1 MiB registered once");
	ferry_err_clear(&err);
	CHECK(ops->write_remote(la, &mr, 0, mr.rkey ^ 0x5a5a00, 4096, len, 1, NULL, &err) == 0, "a write with a bogus key is posted");
	double t0 = now_s();
	rc = until_failed(ops, la, 20000, &err);
	CHECK(rc == -EACCES && strstr(err.msg, "remote access error"),
	      "the lane fails with the device's reason in %.1f s: %s", now_s() - t0, err.msg);
	ferry_err_clear(&err);
	struct ferry_tx_frame f = { .hdr = { .type = FERRY_FT_CREDIT, .session = 1, .stream = 0 } };
	CHECK(ops->tx_burst(la, &f, 1, &err) < 0 && strstr(err.msg, "rdma lane"), "and refuses more work: %s", err.msg);
	/* The peer's queue pair went to error too (RC): it fails rather than hangs. */
	ferry_err_clear(&err);
	rc = until_failed(ops, acc.lane, 20000, &err);
	CHECK(rc < 0 && strstr(err.msg, "rdma lane"), "the peer's lane fails as well: %s", err.msg);
	ops->mem_deregister(da, &mr);
	free(buf);
out:
	ops->lane_close(la);
	ops->lane_close(acc.lane);
	ops->close(da);
	ops->close(db);
}

int main(int argc, char **argv)
{
	struct ferry_err err = { 0 };
	struct ferry_dp *sdp = open_rdma(NULL, &err);
	if (!sdp) {
		printf("SKIP: no RDMA data plane here: %s\n", err.msg);
		return 77;
	}
	struct ferry_dp *ddp = open_rdma(NULL, &err);
	CHECK(ddp != NULL, "a second data plane on the same device (%s)", ddp ? "ok" : err.msg);
	if (!ddp)
		CHECK_DONE();
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
	test_device_choice();
	test_driver_errors();
	test_cq_overrun();
	test_regions(sdp, ddp, (mb << 20) + 4096, 2);
	test_streams(sdp, ddp, mb << 20);
	test_peer_region_too_small(sdp, ddp);
	test_peer_closes(sdp, ddp, (mb < 8 ? 8 : mb) << 20);
	ferry_dp_close(sdp);
	ferry_dp_close(ddp);
	CHECK_DONE();
}
