/* The RDMA driver under the data plane, on real verbs: device choice, region
 * writes (one-sided) checked byte for byte, a destination region too small,
 * and a peer that closes mid-transfer. Needs an active RDMA port (soft-RoCE
 * in the test guest: tests/e2e/rdma-ferry.sh runs it there); exits 77 where
 * there is none. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "dataplane/dataplane.h"

static uint32_t next_session = 700;

static struct ferry_dp *open_rdma(const char *opt, struct ferry_err *err)
{
	const char *opts[] = { opt, NULL };
	struct ferry_dp_config cfg = { .driver = "rdma", .driver_options = opt ? opts : NULL };
	struct ferry_dp *dp = NULL;
	ferry_err_clear(err);
	return ferry_dp_open(&cfg, &dp, err) == 0 ? dp : NULL;
}

static int make_pair(struct ferry_dp *sdp, struct ferry_dp *ddp, unsigned lanes, struct ferry_session **src,
		     struct ferry_session **dst)
{
	struct ferry_err err = { 0 };
	uint32_t id = next_session++;
	struct ferry_session_params p = { .id = id, .lanes = lanes, .max_streams = 1, .timeout_ms = 10000 };
	for (int i = 0; i < FERRY_TOKEN_LEN; i++)
		p.token[i] = (uint8_t)(id * 17 + (unsigned)i);
	if (ferry_session_create_dst(ddp, &p, dst, &err)) {
		printf("# dst: %s\n", err.msg);
		return -1;
	}
	char ep[FERRY_DP_ENDPOINT_MAX];
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	if (ferry_session_create_src(sdp, &p, ep, src, &err)) {
		printf("# src: %s\n", err.msg);
		ferry_session_close(*dst);
		return -1;
	}
	return ferry_session_wait_active(*dst, 10000, &err);
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

static void test_device_choice(void)
{
	struct ferry_err err = { 0 };
	struct ferry_dp *dp = open_rdma("dev=no-such-device", &err);
	CHECK(!dp && strstr(err.msg, "no verbs device named 'no-such-device'"), "an unknown device is named: %s", err.msg);
	ferry_dp_close(dp);
	dp = open_rdma("gid=fe80::1", &err);
	CHECK(!dp && strstr(err.msg, "not IPv4-mapped"), "a GID rdma_cm cannot bind is refused: %s", err.msg);
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
	test_regions(sdp, ddp, (mb << 20) + 4096, 2);
	test_peer_region_too_small(sdp, ddp);
	test_peer_closes(sdp, ddp, (mb < 8 ? 8 : mb) << 20);
	ferry_dp_close(sdp);
	ferry_dp_close(ddp);
	CHECK_DONE();
}
