#include "pinlisten.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../drivers/hostport.h"

/* addr: numeric IPv4 or IPv6 into a sockaddr with port 0 */
static int parse_ip(const char *ip, struct sockaddr_storage *ss, socklen_t *len, struct ferry_err *err)
{
	memset(ss, 0, sizeof(*ss));
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		*len = sizeof(*a4);
		return 0;
	}
	if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		*len = sizeof(*a6);
		return 0;
	}
	return ferry_err_set(err, EINVAL, "'%s' is not a numeric IP address", ip);
}

/* Classic BPF on the listener (and the connections it accepts, which inherit
 * it): the filter sees the transport header; the IP header lies at
 * SKF_NET_OFF. Keep a packet only if its source address is the peer's. */
static int pin_filter(int fd, const struct sockaddr_storage *peer, struct ferry_err *err)
{
	struct sock_filter prog[12];
	unsigned n = 0;
	if (peer->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)peer;
		prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)SKF_NET_OFF + 12);
		prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ntohl(a->sin_addr.s_addr), 0, 1);
	} else {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)peer;
		for (unsigned w = 0; w < 4; w++) {
			uint32_t word;
			memcpy(&word, a->sin6_addr.s6_addr + 4 * w, 4);
			prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)SKF_NET_OFF + 8 + 4 * w);
			/* a mismatch jumps to the drop at the end */
			prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ntohl(word), 0, (uint8_t)(7 - 2 * w));
		}
	}
	prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0xffffffffu);
	prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0);
	struct sock_fprog fp = { .len = (unsigned short)n, .filter = prog };
	if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &fp, sizeof(fp)) ||
	    setsockopt(fd, SOL_SOCKET, SO_LOCK_FILTER, &(int){ 1 }, sizeof(int)))
		return ferry_err_set(err, errno, "pinning the listener to the source host: %s", strerror(errno));
	return 0;
}

int ferry_pinned_listen(const char *bind_ip, const char *peer_ip, int backlog, int *fd_out, unsigned *port,
			struct ferry_err *err)
{
	struct sockaddr_storage local, peer;
	socklen_t llen, plen;
	if (parse_ip(bind_ip, &local, &llen, err) || parse_ip(peer_ip, &peer, &plen, err))
		return -EINVAL;
	if (local.ss_family != peer.ss_family)
		return ferry_err_set(err, EAFNOSUPPORT, "the data address %s and the source host %s are of two families",
				     bind_ip, peer_ip);
	int fd = socket(local.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return ferry_err_set(err, errno, "socket: %s", strerror(errno));
	/* The filter goes on before listen: no connection from elsewhere can
	 * slip in between. */
	int rc = pin_filter(fd, &peer, err);
	if (rc)
		goto fail;
	if (bind(fd, (struct sockaddr *)&local, llen) || listen(fd, backlog)) {
		rc = ferry_err_set(err, errno, "listening on %s: %s", bind_ip, strerror(errno));
		goto fail;
	}
	if (getsockname(fd, (struct sockaddr *)&local, &llen)) {
		rc = ferry_err_set(err, errno, "getsockname: %s", strerror(errno));
		goto fail;
	}
	*port = ntohs(local.ss_family == AF_INET ? ((struct sockaddr_in *)&local)->sin_port
						 : ((struct sockaddr_in6 *)&local)->sin6_port);
	*fd_out = fd;
	return 0;
fail:
	close(fd);
	return rc;
}

int ferry_route_source(const char *ip, char *out, size_t len, struct ferry_err *err)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	if (parse_ip(ip, &ss, &sl, err))
		return -EINVAL;
	/* connect() on a UDP socket sends nothing: it only asks the route. */
	((struct sockaddr_in *)&ss)->sin_port = htons(9);
	int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return ferry_err_set(err, errno, "socket: %s", strerror(errno));
	int rc = 0;
	if (connect(fd, (struct sockaddr *)&ss, sl) || getsockname(fd, (struct sockaddr *)&ss, &sl)) {
		rc = ferry_err_set(err, errno, "no route to %s: %s", ip, strerror(errno));
	} else {
		const void *a = ss.ss_family == AF_INET ? (const void *)&((struct sockaddr_in *)&ss)->sin_addr
							: (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr;
		if (!inet_ntop(ss.ss_family, a, out, (socklen_t)len))
			rc = ferry_err_set(err, errno, "inet_ntop: %s", strerror(errno));
	}
	close(fd);
	return rc;
}

int ferry_endpoint_host(const char *endpoint, char *out, size_t len, struct ferry_err *err)
{
	const char *h = strchr(endpoint, ':');
	struct ferry_hostport hp;
	if (!h)
		return ferry_err_set(err, EINVAL, "endpoint '%s' has no host:port", endpoint);
	if (ferry_parse_hostport(h + 1, FERRY_HP_PORT0 | FERRY_HP_RANGE, &hp, err))
		return ferry_err_prefix(err, "endpoint '%s'", endpoint);
	if (strlen(hp.host) >= len)
		return ferry_err_set(err, ENAMETOOLONG, "endpoint '%s': the host is longer than %zu characters", endpoint,
				     len - 1);
	strcpy(out, hp.host);
	return 0;
}
