/* The data plane end to end inside one process: two data planes over the TCP
 * driver (and the udp one for lane counts), streams in both directions (splice and copy
 * paths), channel order, flow-control bounds, receiving in place from a driver's memory
 * (udp), regions, and hostile or vanishing peers. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>

#include "check.h"
#include "dataplane/dataplane.h"
#include "drivers/wire.h"

static char tmpdir[64];
static uint32_t next_session = 100;

static struct ferry_dp *open_dp_drv(const char *driver, bool no_splice, bool no_rx_peek, size_t window)
{
	static const char *opts[] = { "bind=127.0.0.1:0", NULL };
	struct ferry_dp_config cfg = { .driver = driver, .driver_options = opts, .no_splice = no_splice,
				       .no_rx_peek = no_rx_peek, .window = window };
	struct ferry_dp *dp = NULL;
	struct ferry_err err = { 0 };
	int rc = ferry_dp_open(&cfg, &dp, &err);
	CHECK(rc == 0, "data plane opens (%s)", rc ? err.msg : "ok");
	return dp;
}

/* A driver option no driver reads (a typo) or one that is not KEY=VALUE is
 * refused by name, not ignored; a datagram driver's options are its
 * backend's and the reliable shim's together. */
static void test_unknown_options(void)
{
	const struct {
		const char *driver, *opts[3], *want;
	} cases[] = {
		{ "tcp", { "bind=127.0.0.1:0", "queus=4", NULL }, "the tcp driver has no option 'queus'" },
		{ "udp", { "bind=127.0.0.1:0", "rl_windw=64", NULL }, "the udp driver has no option 'rl_windw'" },
		{ "tcp", { "=1", NULL }, "'=1' is not KEY=VALUE" },
		{ "tcp", { "bind=127.0.0.1:0", "bind=127.0.0.1:1", NULL }, "'bind' is given more than once" },
	};
	for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct ferry_dp_config cfg = { .driver = cases[i].driver, .driver_options = cases[i].opts };
		struct ferry_dp *dp = NULL;
		struct ferry_err err = { 0 };
		CHECK(ferry_dp_open(&cfg, &dp, &err) == -EINVAL && !dp, "%s with %s is refused", cases[i].driver,
		      cases[i].opts[1] ? cases[i].opts[1] : cases[i].opts[0]);
		CHECK_MSG(err, cases[i].want, "message: %s", err.msg);
	}
	const char *good[] = { "bind=127.0.0.1:0", "queues=2", "rl_window=64", "poll_us=100", NULL };
	struct ferry_dp_config cfg = { .driver = "udp", .driver_options = good };
	struct ferry_dp *dp = NULL;
	struct ferry_err err = { 0 };
	CHECK(ferry_dp_open(&cfg, &dp, &err) == 0, "backend and shim options together are taken (%s)", err.msg);
	ferry_dp_close(dp);
}

static struct ferry_dp *open_dp(bool no_splice, size_t window)
{
	return open_dp_drv("tcp", no_splice, false, window);
}

static struct ferry_dp *open_udp_dp(unsigned queues)
{
	char q[32];
	snprintf(q, sizeof(q), "queues=%u", queues);
	const char *opts[] = { "bind=127.0.0.1:0", q, NULL };
	struct ferry_dp_config cfg = { .driver = "udp", .driver_options = opts };
	struct ferry_dp *dp = NULL;
	struct ferry_err err = { 0 };
	int rc = ferry_dp_open(&cfg, &dp, &err);
	CHECK(rc == 0, "udp data plane with %u queues opens (%s)", queues, rc ? err.msg : "ok");
	return dp;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, path);
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 64))
		return -1;
	return fd;
}

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		close(fd);
		return -1;
	}
	return fd;
}

static int accept_timeout(int lfd, int ms)
{
	struct pollfd p = { .fd = lfd, .events = POLLIN };
	if (poll(&p, 1, ms) != 1)
		return -1;
	return accept(lfd, NULL, NULL);
}

struct session_pair {
	struct ferry_session *src, *dst;
	char src_path[128], dst_path[128];
	int target_lfd;
};

static int make_pair(struct ferry_dp *sdp, struct ferry_dp *ddp, unsigned lanes, unsigned streams,
		     struct session_pair *sp, bool with_paths)
{
	struct ferry_err err = { 0 };
	uint32_t id = next_session++;
	memset(sp, 0, sizeof(*sp));
	sp->target_lfd = -1;
	if (with_paths) {
		snprintf(sp->src_path, sizeof(sp->src_path), "%s/s%u.sock", tmpdir, id);
		snprintf(sp->dst_path, sizeof(sp->dst_path), "%s/d%u.sock", tmpdir, id);
		sp->target_lfd = listen_unix(sp->dst_path);
	}
	struct ferry_session_params p = { .id = id, .lanes = lanes, .max_streams = streams, .timeout_ms = 5000,
					  .unix_path = with_paths ? sp->dst_path : NULL };
	for (int i = 0; i < FERRY_TOKEN_LEN; i++)
		p.token[i] = (uint8_t)(id * 31 + (unsigned)i);
	if (ferry_session_create_dst(ddp, &p, &sp->dst, &err)) {
		printf("# dst: %s\n", err.msg);
		return -1;
	}
	char ep[FERRY_DP_ENDPOINT_MAX];
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	p.unix_path = with_paths ? sp->src_path : NULL;
	if (ferry_session_create_src(sdp, &p, ep, &sp->src, &err)) {
		printf("# src: %s\n", err.msg);
		return -1;
	}
	return ferry_session_wait_active(sp->dst, 5000, &err);
}

static void close_pair(struct session_pair *sp)
{
	ferry_session_close(sp->src);
	ferry_session_close(sp->dst);
	if (sp->target_lfd >= 0)
		close(sp->target_lfd);
}

/* --- bulk streams, both directions ----------------------------------------- */

struct pump {
	int fd;
	size_t bytes;
	uint32_t seed;
	uint32_t crc_out, crc_in;
	size_t got;
	/* reader: with dst set, stop after pause_after bytes until dst's lanes
	 * have stopped moving bytes (its socket and ring are full), then go on */
	size_t pause_after;
	struct ferry_session *dst;
};

static void fill(uint8_t *b, size_t n, uint32_t *seed)
{
	for (size_t i = 0; i < n; i++) {
		*seed = *seed * 1103515245u + 12345u;
		b[i] = (uint8_t)(*seed >> 16);
	}
}

static void *pump_write(void *arg)
{
	struct pump *p = arg;
	uint8_t buf[65536];
	size_t left = p->bytes;
	uint32_t seed = p->seed, crc = 0;
	while (left) {
		size_t n = left < sizeof(buf) ? left : sizeof(buf);
		fill(buf, n, &seed);
		crc = ferry_dp_checksum(crc, buf, n);
		size_t off = 0;
		while (off < n) {
			ssize_t w = send(p->fd, buf + off, n - off, MSG_NOSIGNAL);
			if (w <= 0)
				goto out;
			off += (size_t)w;
		}
		left -= n;
	}
	shutdown(p->fd, SHUT_WR);
out:
	p->crc_out = crc;
	return NULL;
}

static void wait_lanes_still(struct ferry_session *s)
{
	uint64_t last = UINT64_MAX;
	for (int still = 0, i = 0; still < 5 && i < 500; i++) {
		struct ferry_session_stats st;
		ferry_session_stats(s, &st);
		still = st.rx_bytes == last ? still + 1 : 0;
		last = st.rx_bytes;
		usleep(20000);
	}
}

static void *pump_read(void *arg)
{
	struct pump *p = arg;
	uint8_t buf[65536];
	uint32_t crc = 0;
	bool paused = false;
	for (;;) {
		size_t want = sizeof(buf);
		if (p->dst && !paused && p->got >= p->pause_after) {
			paused = true;
			wait_lanes_still(p->dst);
		}
		if (p->dst && !paused && p->pause_after - p->got < want)
			want = p->pause_after - p->got;
		ssize_t r = recv(p->fd, buf, want, 0);
		if (r <= 0)
			break;
		crc = ferry_dp_checksum(crc, buf, (size_t)r);
		p->got += (size_t)r;
	}
	p->crc_in = crc;
	return NULL;
}

/* lanes asked for; want: what the session must open (fewer over a datagram
 * device with fewer queues, on both ends, with a note saying why); kib: KiB
 * per stream forward (a quarter of that back). */
static void test_streams(struct ferry_dp *sdp, struct ferry_dp *ddp, const char *what, unsigned lanes, unsigned want,
			 unsigned kib)
{
	enum { S = 4 };
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, lanes, S, &sp, true) == 0, "%s: 4-stream session asking for %u lanes is up", what,
	      lanes);
	struct ferry_session_stats sst, dst;
	ferry_session_stats(sp.src, &sst);
	ferry_session_stats(sp.dst, &dst);
	CHECK(sst.lanes == want && dst.lanes == want && sst.lanes_up == want && dst.lanes_up == want,
	      "%s: %u lanes open on both ends (source %u, destination %u)", what, want, sst.lanes, dst.lanes);
	if (want < lanes)
		CHECK(strstr(sst.lanes_note, "4 streams on ") && strstr(sst.lanes_note, "queues)") &&
			      strstr(dst.lanes_note, "4 streams on "),
		      "%s: both ends say why (source '%s', destination '%s')", what, sst.lanes_note, dst.lanes_note);
	else
		CHECK(!sst.lanes_note[0] && !dst.lanes_note[0], "%s: no lane note when every lane opened ('%s')", what,
		      sst.lanes_note);
	int sfd[S], dfd[S];
	int order_ok = 1;
	for (int i = 0; i < S; i++) {
		sfd[i] = connect_unix(sp.src_path);
		/* first byte names the stream: the destination must accept in source order */
		uint8_t tag = (uint8_t)i;
		if (send(sfd[i], &tag, 1, 0) != 1)
			order_ok = 0;
	}
	for (int i = 0; i < S; i++) {
		dfd[i] = accept_timeout(sp.target_lfd, 5000);
		uint8_t tag = 0xff;
		if (dfd[i] < 0 || recv(dfd[i], &tag, 1, MSG_WAITALL) != 1 || tag != i)
			order_ok = 0;
	}
	CHECK(order_ok, "%s: destination connections arrive in the source's order", what);

	struct pump fwd[S], back[S];
	pthread_t t[4 * S];
	for (int i = 0; i < S; i++) {
		fwd[i] = (struct pump){ .bytes = ((size_t)kib << 10) + (unsigned)i * 4097, .seed = 1u + (unsigned)i };
		back[i] = (struct pump){ .bytes = ((size_t)kib << 8) + 13, .seed = 100u + (unsigned)i };
	}
	struct pump fwd_rx[S], back_rx[S];
	for (int i = 0; i < S; i++) {
		fwd[i].fd = sfd[i];
		fwd_rx[i] = (struct pump){ .fd = dfd[i] };
		back[i].fd = dfd[i];
		back_rx[i] = (struct pump){ .fd = sfd[i] };
		pthread_create(&t[4 * i], NULL, pump_write, &fwd[i]);
		pthread_create(&t[4 * i + 1], NULL, pump_read, &fwd_rx[i]);
		pthread_create(&t[4 * i + 2], NULL, pump_write, &back[i]);
		pthread_create(&t[4 * i + 3], NULL, pump_read, &back_rx[i]);
	}
	for (int i = 0; i < 4 * S; i++)
		pthread_join(t[i], NULL);
	int ok = 1;
	for (int i = 0; i < S; i++) {
		if (fwd_rx[i].got != fwd[i].bytes || fwd_rx[i].crc_in != fwd[i].crc_out)
			ok = 0;
		if (back_rx[i].got != back[i].bytes || back_rx[i].crc_in != back[i].crc_out)
			ok = 0;
	}
	CHECK(ok, "%s: 4 x %u KiB forward and 4 x %u KiB back arrive intact, EOF propagates both ways", what, kib,
	      kib / 4);
	struct ferry_session_stats st;
	for (int i = 0; i < 100; i++) {
		ferry_session_stats(sp.src, &st);
		if (st.streams_closed == S)
			break;
		usleep(20000);
	}
	CHECK(st.state == FERRY_SESSION_ACTIVE && st.streams_opened == S && st.streams_closed == S,
	      "%s: all streams closed cleanly, session still healthy (%s)", what, st.error);
	for (int i = 0; i < S; i++) {
		close(sfd[i]);
		close(dfd[i]);
	}
	close_pair(&sp);
}

/* --- flow control: a destination that does not read bounds what is taken -- */

static void test_backpressure(void)
{
	const size_t window = 256u << 10;
	struct ferry_dp *sdp = open_dp(false, window), *ddp = open_dp(false, window);
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, 1, 1, &sp, true) == 0, "backpressure: session up with a 256 KiB window");
	int s = connect_unix(sp.src_path);
	int d = accept_timeout(sp.target_lfd, 5000);
	fcntl(s, F_SETFL, O_NONBLOCK);
	static uint8_t buf[1 << 16];
	size_t written = 0;
	for (int idle = 0; idle < 50;) {
		ssize_t w = send(s, buf, sizeof(buf), MSG_NOSIGNAL);
		if (w > 0) {
			written += (size_t)w;
			idle = 0;
		} else {
			idle++;
			usleep(10000);
		}
	}
	struct ferry_session_stats st;
	ferry_session_stats(sp.src, &st);
	int queued = 0;
	ioctl(d, SIOCINQ, &queued);
	printf("# written %zu, framed by ferry %llu, waiting at the destination socket %d\n", written,
	       (unsigned long long)st.tx_bytes, queued);
	CHECK(st.tx_bytes <= window + (uint64_t)queued,
	      "ferry never has more than one window in flight beyond what the destination accepted");
	CHECK(written < (64u << 20), "the source writer is held back (%zu bytes accepted in total)", written);
	/* now drain: everything written must arrive */
	fcntl(s, F_SETFL, 0);
	shutdown(s, SHUT_WR);
	size_t got = 0;
	for (;;) {
		ssize_t r = recv(d, buf, sizeof(buf), 0);
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	CHECK(got == written, "after the destination reads again all %zu bytes arrive", written);
	close(s);
	close(d);
	close_pair(&sp);
	ferry_dp_close(sdp);
	ferry_dp_close(ddp);
}

/* --- receive in place: a target socket that fills half way --------------------
 * Over a driver that lends its receive memory (udp through the reliable
 * shim), payload goes from the driver's buffers straight into the target
 * socket while the stream's ring is empty; what the socket does not take is
 * copied into the ring, which then keeps the order until it drains. The
 * target stops reading part way, so both paths and the switches between them
 * run; every byte must arrive once, in order (CRC over the whole stream), and
 * the credit accounting must let the whole stream through a small window. */

static void test_rx_in_place(bool no_rx_peek)
{
	const char *what = no_rx_peek ? "udp, copy into the ring" : "udp, receive in place";
	const size_t window = 1u << 20;
	struct ferry_dp *sdp = open_dp_drv("udp", false, no_rx_peek, window);
	struct ferry_dp *ddp = open_dp_drv("udp", false, no_rx_peek, window);
	if (!sdp || !ddp)
		return;
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, 1, 1, &sp, true) == 0, "%s: session up with a 1 MiB window", what);
	int s = connect_unix(sp.src_path);
	int d = accept_timeout(sp.target_lfd, 5000);
	/* After the pause, more than the socket (ferry's 2 MiB send buffer, which
	 * the kernel doubles) and the ring (the window) can hold together. */
	struct pump w = { .fd = s, .bytes = (10u << 20) + 4093, .seed = 77 };
	struct pump r = { .fd = d, .pause_after = (3u << 19) + 17, .dst = sp.dst };
	pthread_t tw, tr;
	pthread_create(&tw, NULL, pump_write, &w);
	pthread_create(&tr, NULL, pump_read, &r);
	pthread_join(tw, NULL);
	pthread_join(tr, NULL);
	CHECK(r.got == w.bytes && r.crc_in == w.crc_out,
	      "%s: %zu bytes through a target that stopped after 1.5 MiB arrive whole and in order (got %zu)", what,
	      w.bytes, r.got);
	struct ferry_session_stats st;
	ferry_session_stats(sp.dst, &st);
	printf("# %s: %llu bytes received, %llu of them written in place\n", what, (unsigned long long)st.rx_bytes,
	       (unsigned long long)st.rx_direct_bytes);
	if (no_rx_peek)
		CHECK(st.rx_direct_bytes == 0, "%s: nothing written in place when it is turned off", what);
	else
		CHECK(st.rx_direct_bytes > 0 && st.rx_direct_bytes < st.rx_bytes,
		      "%s: part went straight from the driver to the socket, part through the ring", what);
	CHECK(st.state == FERRY_SESSION_ACTIVE, "%s: session healthy (%s)", what, st.error);
	close(s);
	close(d);
	close_pair(&sp);
	ferry_dp_close(sdp);
	ferry_dp_close(ddp);
}

/* --- regions ----------------------------------------------------------------- */

static void test_regions(struct ferry_dp *sdp, struct ferry_dp *ddp)
{
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, 2, 1, &sp, false) == 0, "region session over 2 lanes is up");
	size_t len = (24u << 20) + 4096;
	uint8_t *a = malloc(len), *b = calloc(1, len);
	uint32_t seed = 7;
	fill(a, len, &seed);
	struct ferry_err err = { 0 };
	CHECK(ferry_region_add(sp.src, 5, a, len, &err) == 0 && ferry_region_add(sp.dst, 5, b, len, &err) == 0,
	      "regions registered on both sides");
	CHECK(ferry_region_add(sp.src, 5, a, len, &err) == -EEXIST, "the same region id twice is refused");
	CHECK(ferry_region_write(sp.src, 5, 0, len, &err) == 0, "write queued");
	CHECK(ferry_region_fence(sp.src, 10000, &err) == 0, "fence returns once every write landed (%s)", err.msg);
	CHECK(memcmp(a, b, len) == 0, "destination memory equals the source, byte for byte");
	memset(b + 4096, 0, 8192);
	CHECK(ferry_region_write(sp.src, 5, 4096, 8192, &err) == 0 && ferry_region_fence(sp.src, 10000, &err) == 0 &&
	      memcmp(a, b, len) == 0, "a partial rewrite at an offset lands exactly there");
	ferry_err_clear(&err);
	CHECK(ferry_region_write(sp.src, 5, len - 10, 11, &err) == -ERANGE, "a write past the region end is refused");
	CHECK_MSG(err, "outside region 5", "message: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_region_write(sp.src, 9, 0, 1, &err) == -ENOENT, "a write to an unknown region is refused");
	close_pair(&sp);
	free(a);
	free(b);
}

/* --- hostile peers ------------------------------------------------------------ */

static int raw_lane(struct ferry_dp *ddp)
{
	char ep[FERRY_DP_ENDPOINT_MAX];
	struct ferry_err err = { 0 };
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(strrchr(ep, ':') + 1)) };
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		return -1;
	return fd;
}

static void send_frame(int fd, const struct ferry_frame_hdr *h, const void *payload)
{
	uint8_t hb[FERRY_WIRE_HDR_LEN];
	ferry_wire_encode(h, payload, hb);
	if (write(fd, hb, sizeof(hb)) != (ssize_t)sizeof(hb) || (h->length && write(fd, payload, h->length) < 0))
		printf("# short write\n");
}

static int read_frame(int fd, struct ferry_frame_hdr *h, char *payload, size_t cap)
{
	uint8_t hb[FERRY_WIRE_HDR_LEN];
	struct ferry_err err = { 0 };
	struct timeval tv = { 3, 0 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (recv(fd, hb, sizeof(hb), MSG_WAITALL) != (ssize_t)sizeof(hb) || ferry_wire_decode(hb, h, &err))
		return -1;
	if (h->length > cap || (h->length && recv(fd, payload, h->length, MSG_WAITALL) != (ssize_t)h->length))
		return -1;
	payload[h->length < cap ? h->length : cap - 1] = '\0';
	return 0;
}

static void test_hostile(struct ferry_dp *sdp, struct ferry_dp *ddp)
{
	struct ferry_err err = { 0 };
	uint64_t rejected0 = ferry_dp_rejected_lanes(ddp);

	/* plain garbage on the data port */
	int fd = raw_lane(ddp);
	CHECK(write(fd, "\x16\x03\x01 this is not ferry at all, 32+ bytes", 40) == 40, "garbage sent to the data port");
	char buf[256];
	struct ferry_frame_hdr h;
	int r = read_frame(fd, &h, buf, sizeof(buf));
	CHECK(r == 0 && h.type == FERRY_FT_RESET, "garbage is answered with a RESET, not a crash");
	close(fd);
	for (int i = 0; i < 100 && ferry_dp_rejected_lanes(ddp) == rejected0; i++)
		usleep(10000);
	CHECK(ferry_dp_rejected_lanes(ddp) > rejected0, "the rejected lane is counted");

	/* a lane with a wrong token */
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, 1, 1, &sp, true) == 0, "a real session exists");
	fd = raw_lane(ddp);
	uint8_t bad_token[FERRY_TOKEN_LEN] = { 0 };
	struct ferry_frame_hdr hello = { .type = FERRY_FT_HELLO, .session = next_session - 1, .stream = 0, .seq = 1,
					 .length = FERRY_TOKEN_LEN };
	send_frame(fd, &hello, bad_token);
	r = read_frame(fd, &h, buf, sizeof(buf));
	CHECK(r == 0 && h.type == FERRY_FT_RESET && strstr(buf, "token"), "a wrong token is refused: \"%s\"", buf);
	close(fd);
	close_pair(&sp);

	/* a source that refuses to be refused: create_src reports the reason */
	struct ferry_session *s = NULL;
	char ep[FERRY_DP_ENDPOINT_MAX];
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	struct ferry_session_params p = { .id = 999999, .lanes = 1, .max_streams = 1, .timeout_ms = 3000 };
	ferry_err_clear(&err);
	CHECK(ferry_session_create_src(sdp, &p, ep, &s, &err) == -ECONNREFUSED, "unknown session id refused");
	CHECK_MSG(err, "unknown session", "message: %s", err.msg);

	/* a peer that authenticates, then sends frames for a stream it never opened */
	CHECK(make_pair(sdp, ddp, 2, 2, &sp, true) == 0, "second session for the forged-lane test");
	ferry_session_close(sp.src); /* we replace the source with a hand-made lane */
	sp.src = NULL;
	/* the destination session is active with its lanes gone; make a new one */
	ferry_session_close(sp.dst);
	uint32_t id = next_session++;
	struct ferry_session_params dp = { .id = id, .lanes = 1, .max_streams = 1, .timeout_ms = 3000,
					   .unix_path = sp.dst_path };
	for (int i = 0; i < FERRY_TOKEN_LEN; i++)
		dp.token[i] = (uint8_t)(0xa0 + i);
	CHECK(ferry_session_create_dst(ddp, &dp, &sp.dst, &err) == 0, "destination session for a forged lane");
	fd = raw_lane(ddp);
	hello.session = id;
	send_frame(fd, &hello, dp.token);
	r = read_frame(fd, &h, buf, sizeof(buf));
	CHECK(r == 0 && h.type == FERRY_FT_HELLO_ACK, "a correct HELLO is acknowledged");
	uint8_t data[16] = { 0 };
	struct ferry_frame_hdr d = { .type = FERRY_FT_DATA, .session = id, .stream = 0, .seq = 0, .length = 16 };
	send_frame(fd, &d, data);
	struct ferry_session_stats st;
	for (int i = 0; i < 200; i++) {
		ferry_session_stats(sp.dst, &st);
		if (st.state == FERRY_SESSION_FAILED)
			break;
		usleep(10000);
	}
	CHECK(st.state == FERRY_SESSION_FAILED && strstr(st.error, "not open"),
	      "DATA for an unopened stream fails the session with a reason: %s", st.error);
	r = read_frame(fd, &h, buf, sizeof(buf));
	CHECK(r == 0 && h.type == FERRY_FT_RESET, "the offending peer is told why: \"%s\"", buf);
	close(fd);
	ferry_session_close(sp.dst);
	sp.dst = NULL;

	/* out-of-order DATA and an out-of-bounds region write from an authenticated peer */
	id = next_session++;
	dp.id = id;
	uint8_t *region = calloc(1, 65536);
	CHECK(ferry_session_create_dst(ddp, &dp, &sp.dst, &err) == 0 && ferry_region_add(sp.dst, 1, region, 65536, &err) == 0,
	      "destination with a 64 KiB region");
	fd = raw_lane(ddp);
	hello.session = id;
	send_frame(fd, &hello, dp.token);
	read_frame(fd, &h, buf, sizeof(buf));
	struct ferry_frame_hdr w = { .type = FERRY_FT_REGION_WRITE, .session = id, .stream = 1, .seq = 65536 - 8,
				     .length = 16 };
	send_frame(fd, &w, data);
	for (int i = 0; i < 200; i++) {
		ferry_session_stats(sp.dst, &st);
		if (st.state == FERRY_SESSION_FAILED)
			break;
		usleep(10000);
	}
	CHECK(st.state == FERRY_SESSION_FAILED && strstr(st.error, "overruns region"),
	      "a region write past the end is refused, memory untouched: %s", st.error);
	close(fd);
	ferry_session_close(sp.dst);
	free(region);
	if (sp.target_lfd >= 0)
		close(sp.target_lfd);
}

/* --- a peer that vanishes mid-transfer ---------------------------------------- */

static void test_peer_vanishes(struct ferry_dp *sdp, struct ferry_dp *ddp)
{
	struct session_pair sp;
	CHECK(make_pair(sdp, ddp, 1, 1, &sp, true) == 0, "vanish: session up");
	int s = connect_unix(sp.src_path);
	int d = accept_timeout(sp.target_lfd, 5000);
	static uint8_t buf[1 << 16];
	for (int i = 0; i < 16; i++)
		if (send(s, buf, sizeof(buf), MSG_NOSIGNAL) < 0)
			break;
	ferry_session_close(sp.dst); /* the destination daemon dies */
	sp.dst = NULL;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	struct ferry_session_stats st;
	for (int i = 0; i < 500; i++) {
		ferry_session_stats(sp.src, &st);
		if (st.state == FERRY_SESSION_FAILED)
			break;
		usleep(10000);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	CHECK(st.state == FERRY_SESSION_FAILED, "source notices the vanished peer (%.2f s): %s", secs, st.error);
	struct timeval tv = { 3, 0 };
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	ssize_t r = recv(s, buf, sizeof(buf), 0);
	CHECK(r <= 0 && !(r < 0 && errno == EAGAIN), "the local end (QEMU's socket) is closed too, no hang");
	close(s);
	close(d);
	close_pair(&sp);
}

/* --- handoff: ferry authenticates the connection, then gives it away ------ */

static void test_handoff(struct ferry_dp *sdp, struct ferry_dp *ddp)
{
	struct ferry_err err = { 0 };
	CHECK(ferry_dp_can_handoff(sdp), "the tcp driver can hand a connection over");
	uint32_t id = next_session++;
	struct ferry_session_params p = { .id = id, .lanes = 1, .max_streams = 1, .timeout_ms = 5000, .handoff = true };
	for (int i = 0; i < FERRY_TOKEN_LEN; i++)
		p.token[i] = (uint8_t)(0x55 ^ i);
	struct ferry_session *d = NULL, *s = NULL;
	char ep[FERRY_DP_ENDPOINT_MAX];
	ferry_dp_endpoint(ddp, ep, sizeof(ep), &err);
	CHECK(ferry_session_create_dst(ddp, &p, &d, &err) == 0, "handoff destination session");
	CHECK(ferry_session_create_src(sdp, &p, ep, &s, &err) == 0, "handoff source session: HELLO accepted (%s)", err.msg);
	int sfd = ferry_session_take_fd(s, 5000, &err);
	int dfd = ferry_session_take_fd(d, 5000, &err);
	CHECK(sfd >= 0 && dfd >= 0, "both ends take their connected socket (%s)", err.msg);
	CHECK(ferry_session_take_fd(s, 100, &err) == -EALREADY, "a connection is handed over only once");
	/* the HELLO exchange must not leave delayed ACKs on for QEMU's stream */
	int qa[2] = { 0, 0 };
	socklen_t ql = sizeof(int);
	CHECK(getsockopt(sfd, IPPROTO_TCP, TCP_QUICKACK, &qa[0], &ql) == 0 &&
	      getsockopt(dfd, IPPROTO_TCP, TCP_QUICKACK, &qa[1], &ql) == 0 && qa[0] == 1 && qa[1] == 1,
	      "both handed-over sockets ACK at once, not in interactive mode (quickack %d / %d)", qa[0], qa[1]);
	char msg[] = "QEMU-to-QEMU bytes, no ferry in between", got[64] = { 0 };
	CHECK(write(sfd, msg, sizeof(msg)) == (ssize_t)sizeof(msg) &&
	      recv(dfd, got, sizeof(msg), MSG_WAITALL) == (ssize_t)sizeof(msg) && memcmp(msg, got, sizeof(msg)) == 0,
	      "bytes written on one handed-over socket arrive intact on the other");
	CHECK(write(dfd, "r", 1) == 1 && recv(sfd, got, 1, MSG_WAITALL) == 1 && got[0] == 'r', "and the return path works");
	close(sfd);
	close(dfd);
	ferry_session_close(s);
	ferry_session_close(d);

	/* a relay source cannot join a handoff destination (nor the reverse) */
	p.id = next_session++;
	CHECK(ferry_session_create_dst(ddp, &p, &d, &err) == 0, "another handoff destination");
	p.handoff = false;
	ferry_err_clear(&err);
	CHECK(ferry_session_create_src(sdp, &p, ep, &s, &err) == -ECONNREFUSED, "a relay lane is refused by a handoff session");
	CHECK_MSG(err, "handoff mode does not match", "message: %s", err.msg);
	ferry_session_close(d);
	p.handoff = true;
	p.unix_path = "/tmp/x.sock";
	ferry_err_clear(&err);
	CHECK(ferry_session_create_src(sdp, &p, ep, &s, &err) == -EINVAL, "a handoff session with a local socket is refused");
}

int main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/ferry-dp-test.XXXXXX");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	struct ferry_dp *sdp = open_dp(false, 0), *ddp = open_dp(false, 0);
	test_streams(sdp, ddp, "splice path", 2, 2, 8192);
	/* tcp lanes are connections: as many as asked for, queues or not */
	test_streams(sdp, ddp, "tcp, 5 lanes", 5, 5, 256);
	struct ferry_dp *csdp = open_dp(true, 0), *cddp = open_dp(true, 0);
	test_streams(csdp, cddp, "copy path", 2, 2, 8192);
	ferry_dp_close(csdp);
	ferry_dp_close(cddp);
	/* datagram lanes: never more than both devices have queues */
	struct ferry_dp *usdp = open_udp_dp(3), *uddp = open_udp_dp(2);
	test_streams(usdp, uddp, "udp, 5 lanes, the peer has 2 queues", 5, 2, 512);
	test_streams(uddp, usdp, "udp, 5 lanes, this end has 2 queues", 5, 2, 256);
	ferry_dp_close(usdp);
	ferry_dp_close(uddp);
	test_backpressure();
	test_rx_in_place(false);
	test_rx_in_place(true);
	test_regions(sdp, ddp);
	test_hostile(sdp, ddp);
	test_peer_vanishes(sdp, ddp);
	test_handoff(sdp, ddp);
	test_unknown_options();
	ferry_dp_close(sdp);
	ferry_dp_close(ddp);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd))
		printf("# could not remove %s\n", tmpdir);
	CHECK_DONE();
}
