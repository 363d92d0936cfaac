/* The TCP driver through the ops table: lanes, control frames, spliced and
 * copied payloads, back-pressure, and a peer that sends garbage or dies. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "check.h"
#include "drivers/driver.h"

static const struct ferry_driver_ops *ops;

static void lane_pair(struct ferry_device *dev, struct ferry_lane_drv **a, struct ferry_lane_drv **b)
{
	struct ferry_err err = { 0 };
	char ep[FERRY_ENDPOINT_MAX];
	ops->local_endpoint(dev, ep, sizeof(ep), &err);
	int rc = ops->lane_connect(dev, ep, 0, 2000, a, &err);
	CHECK(rc == 0, "lane_connect to %s: %s", ep, err.msg);
	struct pollfd p = { .fd = ops->listen_fd(dev), .events = POLLIN };
	poll(&p, 1, 2000);
	rc = ops->lane_accept(dev, b, &err);
	CHECK(rc == 0, "lane_accept: %s", err.msg);
}

static int flush_all(struct ferry_lane_drv *l, struct ferry_err *err)
{
	for (int i = 0; i < 10000; i++) {
		int rc = ops->tx_flush(l, err);
		if (rc != -EAGAIN)
			return rc;
		usleep(100);
	}
	return -ETIMEDOUT;
}

static int recv_one(struct ferry_lane_drv *l, struct ferry_rx_frame *f, struct ferry_err *err)
{
	for (int i = 0; i < 20000; i++) {
		int n = ops->rx_burst(l, f, 1, err);
		if (n != 0)
			return n;
		usleep(100);
	}
	return 0;
}

/* What rx_burst reports once the peer's bytes arrived (a frame or an error),
 * within about a second. */
static int rx_outcome(struct ferry_lane_drv *l, struct ferry_rx_frame *f, struct ferry_err *err)
{
	int n = 0;
	for (int i = 0; i < 2000 && n == 0; i++) {
		n = ops->rx_burst(l, f, 1, err);
		if (n == 0)
			usleep(500);
	}
	return n;
}

static int raw_connect(struct ferry_device *dev)
{
	char ep[FERRY_ENDPOINT_MAX];
	struct ferry_err err = { 0 };
	ops->local_endpoint(dev, ep, sizeof(ep), &err);
	int port = atoi(strrchr(ep, ':') + 1);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		return -1;
	return fd;
}

static struct ferry_lane_drv *accept_raw(struct ferry_device *dev)
{
	struct ferry_lane_drv *l = NULL;
	struct ferry_err err = { 0 };
	struct pollfd p = { .fd = ops->listen_fd(dev), .events = POLLIN };
	poll(&p, 1, 2000);
	ops->lane_accept(dev, &l, &err);
	return l;
}

int main(void)
{
	struct ferry_err err = { 0 };
	ops = ferry_driver_find("tcp");
	CHECK(ops && strcmp(ops->name, "tcp") == 0, "tcp driver is registered");
	CHECK(ferry_driver_find("nosuch") == NULL, "unknown driver name finds nothing");
	CHECK((ops->caps & FERRY_DRV_RELIABLE) && (ops->caps & FERRY_DRV_SPLICE), "tcp is reliable and splices");

	const char *bad_opts[] = { "bind=127.0.0.1:notaport", NULL };
	struct ferry_driver_config bad = { .options = bad_opts };
	struct ferry_device *dev = NULL;
	CHECK(ops->open(&bad, &dev, &err) == -EINVAL, "a malformed bind option is refused");
	CHECK_MSG(err, "notaport", "message names the bad port: %s", err.msg);

	ferry_err_clear(&err);
	const char *opts[] = { "bind=127.0.0.1:0", NULL };
	struct ferry_driver_config cfg = { .options = opts };
	CHECK(ops->open(&cfg, &dev, &err) == 0, "open on an ephemeral port");
	char ep[FERRY_ENDPOINT_MAX];
	CHECK(ops->local_endpoint(dev, ep, sizeof(ep), &err) == 0 && strncmp(ep, "tcp:127.0.0.1:", 14) == 0,
	      "endpoint describes the bound address: %s", ep);

	struct ferry_lane_drv *ln = NULL;
	CHECK(ops->lane_connect(dev, "rdma:gid", 0, 100, &ln, &err) == -EINVAL, "a foreign endpoint is refused");

	struct ferry_lane_drv *a = NULL, *b = NULL;
	lane_pair(dev, &a, &b);

	/* control frame with a small payload */
	const char reason[] = "testing";
	struct iovec iov = { .iov_base = (void *)reason, .iov_len = 7 };
	struct ferry_tx_frame f = { .hdr = { .type = FERRY_FT_RESET, .session = 7, .stream = FERRY_STREAM_ANY, .length = 7 },
				    .iov = &iov, .iovcnt = 1, .cookie = (void *)0x1234 };
	CHECK(ops->tx_burst(a, &f, 1, &err) == 1, "tx_burst takes a frame");
	CHECK(flush_all(a, &err) == 0, "tx_flush pushes it out");
	void *done[4];
	CHECK(ops->poll_completions(a, done, 4) == 1 && done[0] == (void *)0x1234, "completion hands the cookie back");
	struct ferry_rx_frame r;
	CHECK(recv_one(b, &r, &err) == 1 && r.hdr.type == FERRY_FT_RESET && !r.pending && r.hdr.length == 7 &&
	      memcmp(r.payload, "testing", 7) == 0, "control frame arrives with its payload");
	ops->rx_release(b, &r, 1);

	/* a bad length in tx_burst is the caller's bug, reported */
	struct ferry_tx_frame lie = f;
	lie.hdr.length = 9;
	ferry_err_clear(&err);
	CHECK(ops->tx_burst(a, &lie, 1, &err) == -EINVAL, "header length not matching the payload is refused");

	/* spliced DATA: 3 MiB through a pipe and back out through a pipe */
	size_t total = 3u << 20;
	uint8_t *src = malloc(total), *dst = malloc(total);
	for (size_t i = 0; i < total; i++)
		src[i] = (uint8_t)(i * 2654435761u >> 13);
	int tp[2], rp[2];
	CHECK(pipe2(tp, O_NONBLOCK) == 0 && pipe2(rp, O_NONBLOCK) == 0, "pipes");
	fcntl(tp[1], F_SETPIPE_SZ, 1 << 20);
	fcntl(rp[1], F_SETPIPE_SZ, 1 << 20);
	size_t sent = 0, got = 0;
	uint64_t seq = 0;
	int ok = 1;
	while (got < total && ok) {
		if (sent < total) {
			ssize_t w = write(tp[1], src + sent, total - sent < 65536 ? total - sent : 65536);
			if (w > 0) {
				struct ferry_frame_hdr h = { .type = FERRY_FT_DATA, .session = 7, .stream = 1, .seq = seq,
							     .length = (uint32_t)w };
				if (ops->tx_splice(a, &h, tp[0], &err) == 0) {
					sent += (size_t)w;
					seq += (uint64_t)w;
				} else {
					ok = 0;
				}
			}
		}
		int fr = ops->tx_flush(a, &err);
		if (fr != 0 && fr != -EAGAIN)
			ok = 0;
		int n = ops->rx_burst(b, &r, 1, &err);
		if (n < 0)
			ok = 0;
		if (n == 1) {
			if (r.hdr.type != FERRY_FT_DATA || !r.pending || r.hdr.seq != got) {
				ok = 0;
				break;
			}
			size_t left = r.hdr.length;
			while (left > 0 && ok) {
				ssize_t m = ops->rx_splice(b, rp[1], left, &err);
				if (m < 0)
					ok = 0;
				if (m > 0)
					left -= (size_t)m;
				ssize_t k;
				while ((k = read(rp[0], dst + got, total - got)) > 0)
					got += (size_t)k;
			}
		}
	}
	CHECK(ok && got == total && memcmp(src, dst, total) == 0, "3 MiB spliced through the lane arrive intact (%zu bytes)", got);

	/* b answers right away, as credits do: the kernel now delays b's ACKs
	 * (interactive "pingpong" mode) unless the receive path undoes it */
	f.cookie = (void *)0x5678;
	CHECK(ops->tx_burst(b, &f, 1, &err) == 1 && flush_all(b, &err) == 0 && ops->poll_completions(b, done, 4) == 1 &&
	      recv_one(a, &r, &err) == 1 && r.hdr.type == FERRY_FT_RESET, "a frame back from b");
	ops->rx_release(a, &r, 1);

	/* copied payload via rx_payload (the region path) */
	struct iovec piov[2] = { { src, 1000 }, { src + 1000, 24 } };
	struct ferry_tx_frame rf = { .hdr = { .type = FERRY_FT_REGION_WRITE, .session = 7, .stream = 0, .seq = 4096,
					      .length = 1024 }, .iov = piov, .iovcnt = 2 };
	CHECK(ops->tx_burst(a, &rf, 1, &err) == 1 && flush_all(a, &err) == 0, "region frame with two pieces sent");
	CHECK(recv_one(b, &r, &err) == 1 && r.pending && r.hdr.seq == 4096, "region header arrives, payload pending");
	CHECK(ops->rx_burst(b, &r, 1, &err) == 0, "no next frame until the payload is consumed");
	memset(dst, 0, 1024);
	size_t pgot = 0;
	for (int i = 0; i < 1000 && pgot < 1024; i++) {
		ssize_t m = ops->rx_payload(b, dst + pgot, 1024 - pgot, &err);
		if (m > 0)
			pgot += (size_t)m;
		else
			usleep(100);
	}
	CHECK(pgot == 1024 && memcmp(dst, src, 1024) == 0, "rx_payload copies exactly the frame's payload");
	short bev;
	int qa = 0;
	socklen_t ql = sizeof(qa);
	CHECK(getsockopt(ops->wakeup_fd(b, &bev, false), IPPROTO_TCP, TCP_QUICKACK, &qa, &ql) == 0 && qa == 1,
	      "after payload, the receiver ACKs at once, not delayed (quickack %d)", qa);

	/* back-pressure: the peer never reads; tx_burst eventually takes nothing */
	int taken_total = 0, refused = 0;
	struct iovec biov = { src, 1u << 20 };
	struct ferry_tx_frame bf = { .hdr = { .type = FERRY_FT_REGION_WRITE, .session = 7, .length = 1u << 20 },
				     .iov = &biov, .iovcnt = 1 };
	for (int i = 0; i < 400 && !refused; i++) {
		int n = ops->tx_burst(a, &bf, 1, &err);
		if (n == 0)
			refused = 1;
		taken_total += n;
		(void)ops->tx_flush(a, &err);
		void *c[64];
		ops->poll_completions(a, c, 64);
	}
	CHECK(refused && taken_total < 400, "a peer that does not read makes tx_burst refuse (after %d MiB)", taken_total);
	short ev = 0;
	int wfd = ops->wakeup_fd(a, &ev, true);
	CHECK(wfd >= 0 && (ev & POLLOUT), "wakeup fd asks for POLLOUT while tx is pending");

	/* peer closes mid-frame: a truncated payload is an error naming it */
	ops->lane_close(a);
	ssize_t m = 0;
	ferry_err_clear(&err);
	size_t drained = 0;
	for (int i = 0; i < 100000; i++) {
		if (r.pending || drained == 0) {
			int n = ops->rx_burst(b, &r, 1, &err);
			if (n < 0) {
				m = n;
				break;
			}
		}
		m = ops->rx_payload(b, dst, 1u << 20, &err);
		if (m < 0)
			break;
		drained += m > 0 ? (size_t)m : 0;
	}
	CHECK(m == -ECONNRESET, "peer gone mid-transfer gives ECONNRESET");
	CHECK(strstr(err.msg, "truncated") || strstr(err.msg, "closed"), "message says what happened: %s", err.msg);
	ops->lane_close(b);

	/* garbage instead of frames */
	int raw = raw_connect(dev);
	struct ferry_lane_drv *g = accept_raw(dev);
	const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n.....";
	CHECK(write(raw, junk, 32) == 32, "sent 32 bytes of garbage");
	ferry_err_clear(&err);
	int n = rx_outcome(g, &r, &err);
	CHECK(n == -EPROTO, "garbage is a protocol error, not a crash");
	CHECK_MSG(err, "magic", "message: %s", err.msg);
	ops->lane_close(g);
	close(raw);

	/* a valid header announcing an oversized payload */
	raw = raw_connect(dev);
	g = accept_raw(dev);
	uint8_t hb[FERRY_WIRE_HDR_LEN];
	struct ferry_frame_hdr over = { .type = FERRY_FT_DATA, .session = 1, .stream = 0, .length = 0x7fffffff };
	ferry_wire_encode(&over, NULL, hb);
	CHECK(write(raw, hb, sizeof(hb)) == (ssize_t)sizeof(hb), "sent an oversized header");
	ferry_err_clear(&err);
	n = rx_outcome(g, &r, &err);
	CHECK(n == -EMSGSIZE, "an oversized length is refused before any payload is read");
	ops->lane_close(g);
	close(raw);

	/* truncated header */
	raw = raw_connect(dev);
	g = accept_raw(dev);
	CHECK(write(raw, hb, 10) == 10, "sent 10 of 32 header bytes");
	close(raw);
	ferry_err_clear(&err);
	n = rx_outcome(g, &r, &err);
	CHECK(n == -ECONNRESET, "a truncated header is reported");
	CHECK_MSG(err, "truncated frame header", "message: %s", err.msg);
	ops->lane_close(g);

	close(tp[0]); close(tp[1]); close(rp[0]); close(rp[1]);
	free(src);
	free(dst);
	ops->close(dev);
	CHECK_DONE();
}
