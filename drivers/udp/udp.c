#include "udp.h"
#include "../hostport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 32
#define DEFAULT_QUEUES 8
#define MAX_QUEUES 64
#define DEFAULT_DGRAM 1472
#define MAX_DGRAM 65507
#define DEFAULT_SOCKBUF (4u << 20)
#define PORT_TRIES 64

struct udp_queue {
	int fd;
	/* tx: datagrams copied in by send, out with one sendmmsg */
	struct mmsghdr tx_msg[BATCH];
	struct iovec tx_iov[BATCH];
	struct ferry_dgram_addr tx_to[BATCH];
	uint8_t *tx_buf;           /* BATCH x dgram */
	unsigned tx_count, tx_sent;
	/* rx: buffers reused by every recv */
	struct mmsghdr rx_msg[BATCH];
	struct iovec rx_iov[BATCH];
	struct sockaddr_storage rx_from[BATCH];
	uint8_t *rx_buf;           /* BATCH x (dgram + 1): one spare byte shows truncation */
};

struct ferry_dgram_dev {
	int family;
	unsigned nq;
	size_t dgram;
	uint16_t port0;
	char host[INET6_ADDRSTRLEN];
	struct udp_queue q[];
};

static int resolve_host(const char *host, const char *port, bool passive, struct sockaddr_storage *ss,
			socklen_t *sl, struct ferry_err *err)
{
	struct addrinfo hints = { .ai_socktype = SOCK_DGRAM, .ai_flags = AI_NUMERICSERV };
	if (passive)
		hints.ai_flags |= AI_PASSIVE;
	struct addrinfo *res = NULL;
	int g = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
	if (g)
		return ferry_err_set(err, EHOSTUNREACH, "cannot resolve udp host '%s': %s", host, gai_strerror(g));
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*sl = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

static void set_port(struct sockaddr_storage *ss, uint16_t port)
{
	if (ss->ss_family == AF_INET6)
		((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
	else
		((struct sockaddr_in *)ss)->sin_port = htons(port);
}

static uint16_t get_port(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
	return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

/* The canonical address bytes: family, port and IP only, so addresses from
 * resolve and from recvmmsg compare equal with memcmp. */
static void to_addr(const struct sockaddr_storage *ss, struct ferry_dgram_addr *a)
{
	memset(a, 0, sizeof(*a));
	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
		struct sockaddr_in6 c = { .sin6_family = AF_INET6, .sin6_port = s6->sin6_port, .sin6_addr = s6->sin6_addr,
					  .sin6_scope_id = s6->sin6_scope_id };
		_Static_assert(sizeof(c) <= FERRY_DGRAM_ADDR_MAX, "sockaddr_in6 fits an address");
		memcpy(a->b, &c, sizeof(c));
		a->len = sizeof(c);
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
		struct sockaddr_in c = { .sin_family = AF_INET, .sin_port = s4->sin_port, .sin_addr = s4->sin_addr };
		memcpy(a->b, &c, sizeof(c));
		a->len = sizeof(c);
	}
}

static void udp_addr_str(const struct ferry_dgram_addr *a, char *buf, size_t len)
{
	char host[INET6_ADDRSTRLEN] = "?";
	struct sockaddr_storage ss = { 0 };
	memcpy(&ss, a->b, a->len < sizeof(ss) ? a->len : sizeof(ss));
	if (ss.ss_family == AF_INET6) {
		inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
		snprintf(buf, len, "[%s]:%u", host, get_port(&ss));
	} else {
		inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
		snprintf(buf, len, "%s:%u", host, get_port(&ss));
	}
}

static void tune_buffers(int fd, unsigned long bytes)
{
	int v = (int)bytes;
	/* FORCE passes net.core.[rw]mem_max when privileged; a window of
	 * datagrams must fit or the kernel drops what the lane just sent. */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &v, sizeof(v)))
		(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v));
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &v, sizeof(v)))
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
}

static void close_queues(struct ferry_dgram_dev *dev)
{
	for (unsigned i = 0; i < dev->nq; i++) {
		if (dev->q[i].fd >= 0)
			close(dev->q[i].fd);
		dev->q[i].fd = -1;
	}
}

/* Bind nq sockets on ports port0.. port0+nq-1; -EADDRINUSE to try another run. */
static int bind_run(struct ferry_dgram_dev *dev, struct sockaddr_storage *ss, socklen_t sl, uint16_t port0,
		    unsigned long sockbuf, struct ferry_err *err)
{
	for (unsigned i = 0; i < dev->nq; i++) {
		int fd = socket(ss->ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			close_queues(dev);
			return ferry_err_set(err, errno, "udp: socket: %s", strerror(errno));
		}
		set_port(ss, (uint16_t)(port0 + i));
		if (bind(fd, (struct sockaddr *)ss, sl)) {
			int e = errno;
			close(fd);
			close_queues(dev);
			if (e == EADDRINUSE)
				return -EADDRINUSE;
			return ferry_err_set(err, e, "udp: cannot bind %s port %u: %s", dev->host, port0 + i, strerror(e));
		}
		tune_buffers(fd, sockbuf);
		dev->q[i].fd = fd;
	}
	return 0;
}

static void udp_close(struct ferry_dgram_dev *dev)
{
	if (!dev)
		return;
	close_queues(dev);
	for (unsigned i = 0; i < dev->nq; i++) {
		free(dev->q[i].tx_buf);
		free(dev->q[i].rx_buf);
	}
	free(dev);
}

static int udp_open(const struct ferry_driver_config *cfg, struct ferry_dgram_dev **out, struct ferry_err *err)
{
	unsigned long nq, dgram, sockbuf;
	int rc;
	if ((rc = ferry_dgram_opt_uint(cfg, "queues", DEFAULT_QUEUES, 1, MAX_QUEUES, &nq, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "dgram", DEFAULT_DGRAM, 128, MAX_DGRAM, &dgram, err)) ||
	    (rc = ferry_dgram_opt_uint(cfg, "sockbuf", DEFAULT_SOCKBUF, 65536, 1ul << 30, &sockbuf, err)))
		return ferry_err_prefix(err, "udp driver");
	const char *bind_addr = ferry_driver_option(cfg, "bind");
	struct ferry_hostport hp;
	if ((rc = ferry_parse_hostport(bind_addr ? bind_addr : "127.0.0.1:0", FERRY_HP_PORT0, &hp, err)))
		return ferry_err_prefix(err, "udp driver: bind");
	unsigned long port = hp.first;
	if (port + nq - 1 > 65535)
		return ferry_err_set(err, EINVAL, "udp driver: %lu queues from port %lu run past 65535", nq, port);
	struct sockaddr_storage ss;
	socklen_t sl;
	if ((rc = resolve_host(hp.host, "0", true, &ss, &sl, err)))
		return ferry_err_prefix(err, "udp driver");

	struct ferry_dgram_dev *dev = calloc(1, sizeof(*dev) + nq * sizeof(struct udp_queue));
	if (!dev)
		return ferry_err_set(err, ENOMEM, "udp driver: out of memory");
	dev->nq = (unsigned)nq;
	dev->dgram = dgram;
	dev->family = ss.ss_family;
	for (unsigned i = 0; i < nq; i++) {
		struct udp_queue *q = &dev->q[i];
		q->fd = -1;
		q->tx_buf = malloc(BATCH * dgram);
		q->rx_buf = malloc(BATCH * (dgram + 1));
		if (!q->tx_buf || !q->rx_buf) {
			udp_close(dev);
			return ferry_err_set(err, ENOMEM, "udp driver: out of memory for %lu queues' buffers", nq);
		}
		for (unsigned k = 0; k < BATCH; k++) {
			q->rx_iov[k] = (struct iovec){ q->rx_buf + k * (dgram + 1), dgram + 1 };
			q->rx_msg[k].msg_hdr.msg_iov = &q->rx_iov[k];
			q->rx_msg[k].msg_hdr.msg_iovlen = 1;
			q->tx_iov[k] = (struct iovec){ q->tx_buf + k * dgram, 0 };
			q->tx_msg[k].msg_hdr.msg_iov = &q->tx_iov[k];
			q->tx_msg[k].msg_hdr.msg_iovlen = 1;
		}
	}
	if (ss.ss_family == AF_INET6)
		inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, dev->host, sizeof(dev->host));
	else
		inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, dev->host, sizeof(dev->host));

	if (port) {
		rc = bind_run(dev, &ss, sl, (uint16_t)port, sockbuf, err);
		if (rc == -EADDRINUSE)
			rc = ferry_err_set(err, EADDRINUSE, "udp driver: ports %lu-%lu on %s are not all free", port,
					   port + nq - 1, dev->host);
	} else {
		/* Any free run of nq ports: the kernel picks the first, the rest
		 * follow it; taken ones make us start again elsewhere. */
		rc = -EADDRINUSE;
		for (int t = 0; t < PORT_TRIES && rc == -EADDRINUSE; t++) {
			uint16_t r = 0;
			if (getrandom(&r, sizeof(r), 0) != sizeof(r))
				r = (uint16_t)(getpid() * 7919 + t * 104729);
			uint16_t p0 = (uint16_t)(20000 + r % (60000 - 20000 - nq));
			rc = bind_run(dev, &ss, sl, p0, sockbuf, err);
			if (rc == 0)
				port = p0;
		}
		if (rc == -EADDRINUSE)
			rc = ferry_err_set(err, EADDRINUSE, "udp driver: no run of %lu free ports on %s", nq, dev->host);
	}
	if (rc) {
		udp_close(dev);
		return rc;
	}
	dev->port0 = (uint16_t)port;
	*out = dev;
	return 0;
}

static int udp_local_endpoint(struct ferry_dgram_dev *dev, char *buf, size_t len, struct ferry_err *err)
{
	int n;
	const char *l = dev->family == AF_INET6 ? "[" : "", *r = dev->family == AF_INET6 ? "]" : "";
	if (dev->nq == 1)
		n = snprintf(buf, len, "udp:%s%s%s:%u", l, dev->host, r, dev->port0);
	else
		n = snprintf(buf, len, "udp:%s%s%s:%u-%u", l, dev->host, r, dev->port0, dev->port0 + dev->nq - 1);
	if (n < 0 || (size_t)n >= len)
		return ferry_err_set(err, ENOSPC, "endpoint buffer too small");
	return 0;
}

static unsigned udp_queues(const struct ferry_dgram_dev *dev)
{
	return dev->nq;
}

static size_t udp_max_datagram(const struct ferry_dgram_dev *dev)
{
	return dev->dgram;
}

static int udp_resolve(struct ferry_dgram_dev *dev, const char *endpoint, unsigned queue,
		       struct ferry_dgram_addr *out, unsigned *peer_queues, struct ferry_err *err)
{
	if (strncmp(endpoint, "udp:", 4) != 0)
		return ferry_err_set(err, EINVAL, "udp driver cannot reach endpoint '%s' (want udp:HOST:PORT[-PORT])",
				     endpoint);
	struct ferry_hostport hp;
	int rc = ferry_parse_hostport(endpoint + 4, FERRY_HP_RANGE, &hp, err);
	if (rc)
		return ferry_err_prefix(err, "udp endpoint");
	unsigned long lo = hp.first, hi = hp.last;
	if (hi - lo >= MAX_QUEUES)
		return ferry_err_set(err, EINVAL, "udp endpoint '%s' has no valid port range (more than %d ports)", endpoint,
				     MAX_QUEUES);
	*peer_queues = (unsigned)(hi - lo + 1);
	if (queue >= *peer_queues)
		return -ERANGE;
	struct sockaddr_storage ss;
	socklen_t sl;
	char port[12];
	snprintf(port, sizeof(port), "%lu", lo + queue);
	if ((rc = resolve_host(hp.host, port, false, &ss, &sl, err)))
		return rc;
	if (ss.ss_family != dev->family)
		return ferry_err_set(err, EAFNOSUPPORT, "udp endpoint '%s' is %s but this device is bound to %s", endpoint,
				     ss.ss_family == AF_INET6 ? "IPv6" : "IPv4", dev->family == AF_INET6 ? "IPv6" : "IPv4");
	to_addr(&ss, out);
	return 0;
}

static int udp_flush(struct ferry_dgram_dev *dev, unsigned qi, struct ferry_err *err)
{
	struct udp_queue *q = &dev->q[qi];
	while (q->tx_sent < q->tx_count) {
		int n = sendmmsg(q->fd, q->tx_msg + q->tx_sent, q->tx_count - q->tx_sent, MSG_DONTWAIT);
		if (n < 0) {
			int e = errno;
			if (e == EINTR)
				continue;
			if (e == EAGAIN || e == ENOBUFS)
				return -EAGAIN;
			if (e == EMSGSIZE || e == EINVAL || e == EBADF || e == EFAULT || e == ENOTSOCK || e == EAFNOSUPPORT)
				return ferry_err_set(err, e, "udp queue %u: sendmmsg: %s", qi, strerror(e));
			/* A datagram the network refuses (unreachable, ICMP error
			 * reported late) is a lost datagram: the lane recovers. */
			q->tx_sent++;
			continue;
		}
		q->tx_sent += (unsigned)n;
	}
	q->tx_count = q->tx_sent = 0;
	return 0;
}

static int udp_send(struct ferry_dgram_dev *dev, unsigned qi, const struct ferry_dgram_addr *to,
		    const struct iovec *iov, unsigned iovcnt, size_t len, struct ferry_err *err)
{
	struct udp_queue *q = &dev->q[qi];
	if (len > dev->dgram)
		return ferry_err_set(err, EMSGSIZE, "udp queue %u: datagram of %zu bytes, at most %zu", qi, len, dev->dgram);
	if (q->tx_count == BATCH) {
		int rc = udp_flush(dev, qi, err);
		if (rc)
			return rc;
	}
	unsigned k = q->tx_count;
	uint8_t *p = q->tx_buf + k * dev->dgram;
	for (unsigned i = 0; i < iovcnt; i++) {
		memcpy(p, iov[i].iov_base, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	q->tx_iov[k].iov_len = len;
	q->tx_to[k] = *to;
	q->tx_msg[k].msg_hdr.msg_name = q->tx_to[k].b;
	q->tx_msg[k].msg_hdr.msg_namelen = to->len;
	q->tx_count++;
	return 0;
}

static int udp_recv(struct ferry_dgram_dev *dev, unsigned qi, struct ferry_dgram_buf *bufs, unsigned n,
		    struct ferry_err *err)
{
	struct udp_queue *q = &dev->q[qi];
	if (n > BATCH)
		n = BATCH;
	for (unsigned k = 0; k < n; k++) {
		q->rx_msg[k].msg_hdr.msg_name = &q->rx_from[k];
		q->rx_msg[k].msg_hdr.msg_namelen = sizeof(q->rx_from[k]);
		q->rx_msg[k].msg_hdr.msg_flags = 0;
	}
	int r;
	do {
		r = recvmmsg(q->fd, q->rx_msg, n, MSG_DONTWAIT, NULL);
	} while (r < 0 && errno == EINTR);
	if (r < 0) {
		if (errno == EAGAIN || errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH)
			return 0; /* nothing, or an ICMP error for a datagram we sent: a loss */
		return ferry_err_set(err, errno, "udp queue %u: recvmmsg: %s", qi, strerror(errno));
	}
	for (int k = 0; k < r; k++) {
		bufs[k].data = q->rx_iov[k].iov_base;
		/* A datagram longer than ours was cut: its check fails later. */
		bufs[k].len = q->rx_msg[k].msg_len;
		to_addr(&q->rx_from[k], &bufs[k].src);
		bufs[k].priv = NULL;
	}
	return r;
}

static void udp_release(struct ferry_dgram_dev *dev, unsigned q, struct ferry_dgram_buf *bufs, unsigned n)
{
	/* The buffers are the queue's own, reused by the next recv. */
}

static int udp_wakeup_fd(struct ferry_dgram_dev *dev, unsigned q, bool want_tx, short *events)
{
	*events = POLLIN;
	if (want_tx || dev->q[q].tx_count > 0)
		*events |= POLLOUT;
	return dev->q[q].fd;
}

const struct ferry_dgram_ops ferry_udp_dgram = {
	.name = "udp",
	.open = udp_open,
	.close = udp_close,
	.local_endpoint = udp_local_endpoint,
	.queues = udp_queues,
	.max_datagram = udp_max_datagram,
	.resolve = udp_resolve,
	.addr_str = udp_addr_str,
	.send = udp_send,
	.flush = udp_flush,
	.recv = udp_recv,
	.release = udp_release,
	.wakeup_fd = udp_wakeup_fd,
};
