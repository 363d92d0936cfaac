/* The pinned listener of multifd handoff: a real TCP listener on loopback,
 * pinned to one address of 127/8, connected to from that address and from
 * another one; the helpers that name addresses. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "controlplane/pinlisten.h"

/* Connect from src_ip to 127.0.0.1:port; true if the handshake completes
 * within wait_ms (a dropped SYN is retried only after a second). */
static bool connects_from(const char *src_ip, unsigned port, int wait_ms, int *fd_out)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct sockaddr_in src = { .sin_family = AF_INET }, dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, src_ip, &src.sin_addr);
	inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
	if (fd < 0 || bind(fd, (struct sockaddr *)&src, sizeof(src)))
		return false;
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) && errno != EINPROGRESS) {
		close(fd);
		return false;
	}
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	int soerr = -1;
	socklen_t sl = sizeof(soerr);
	bool ok = poll(&p, 1, wait_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0;
	if (ok && fd_out)
		*fd_out = fd;
	else
		close(fd);
	return ok;
}

int main(void)
{
	struct ferry_err err = { 0 };
	int lfd = -1;
	unsigned port = 0;
	CHECK(ferry_pinned_listen("127.0.0.1", "127.0.0.2", 4, &lfd, &port, &err) == 0 && port > 0,
	      "a listener on 127.0.0.1 pinned to 127.0.0.2 (port %u) %s", port, err.msg);

	CHECK(!connects_from("127.0.0.3", port, 400, NULL), "a connection from 127.0.0.3 never completes");
	int cfd = -1;
	CHECK(connects_from("127.0.0.2", port, 2000, &cfd), "a connection from 127.0.0.2 completes");
	struct sockaddr_in peer;
	socklen_t pl = sizeof(peer);
	int afd = accept(lfd, (struct sockaddr *)&peer, &pl);
	char who[INET_ADDRSTRLEN] = "";
	if (afd >= 0)
		inet_ntop(AF_INET, &peer.sin_addr, who, sizeof(who));
	CHECK(afd >= 0 && strcmp(who, "127.0.0.2") == 0, "the listener accepts exactly it (%s), and only it", who);
	if (afd >= 0) {
		int fl = fcntl(lfd, F_GETFL);
		fcntl(lfd, F_SETFL, fl | O_NONBLOCK);
		int other = accept(lfd, NULL, NULL);
		CHECK(other < 0 && errno == EAGAIN, "nothing from 127.0.0.3 waits in the accept queue");
		if (other >= 0)
			close(other);
		/* bytes flow on the accepted connection (it inherits the filter) */
		char b[4] = "";
		CHECK(write(cfd, "pin", 3) == 3 && read(afd, b, 3) == 3 && memcmp(b, "pin", 3) == 0,
		      "bytes from the admitted peer arrive");
		close(afd);
	}
	if (cfd >= 0)
		close(cfd);
	if (lfd >= 0)
		close(lfd);

	ferry_err_clear(&err);
	CHECK(ferry_pinned_listen("127.0.0.1", "::1", 4, &lfd, &port, &err) == -EAFNOSUPPORT,
	      "two address families refused: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_pinned_listen("127.0.0.1", "host.example", 4, &lfd, &port, &err) == -EINVAL &&
	      strstr(err.msg, "host.example"), "a name is not an address: %s", err.msg);
	ferry_err_clear(&err);
	int v6 = -1;
	if (ferry_pinned_listen("::1", "::1", 4, &v6, &port, &err) == 0) {
		int c6 = socket(AF_INET6, SOCK_STREAM, 0);
		struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT };
		CHECK(c6 >= 0 && connect(c6, (struct sockaddr *)&a6, sizeof(a6)) == 0, "IPv6: the pinned peer ::1 connects");
		if (c6 >= 0)
			close(c6);
		close(v6);
	} else {
		printf("# IPv6 loopback unavailable here (%s): IPv6 check skipped\n", err.msg);
	}

	char src[64] = "";
	ferry_err_clear(&err);
	CHECK(ferry_route_source("127.0.0.1", src, sizeof(src), &err) == 0 && strcmp(src, "127.0.0.1") == 0,
	      "the route to 127.0.0.1 leaves from %s", src);
	char host[64] = "";
	CHECK(ferry_endpoint_host("tcp:10.0.0.2:7471", host, sizeof(host), &err) == 0 && strcmp(host, "10.0.0.2") == 0,
	      "endpoint host of tcp:10.0.0.2:7471 is %s", host);
	CHECK(ferry_endpoint_host("tcp:[fe80::1]:7471", host, sizeof(host), &err) == 0 && strcmp(host, "fe80::1") == 0,
	      "endpoint host of tcp:[fe80::1]:7471 is %s", host);
	ferry_err_clear(&err);
	CHECK(ferry_endpoint_host("tcp", host, sizeof(host), &err) == -EINVAL, "an endpoint without host: %s", err.msg);
	CHECK_DONE();
}
