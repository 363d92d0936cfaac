/* The postcopy set-up guard between a stand-in QEMU (connections to the
 * guard's socket, as QEMU's migrate uri=unix: makes them) and a stand-in data
 * plane (the adopted socket ends): stream bytes pass, return-path messages
 * pass whole, the destination's SHUT waits for commit, a data plane that dies
 * before commit is never shown to QEMU, a rescue swallows QEMU's bytes on
 * every channel and answers with SHUT(0). */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "controlplane/pcguard.h"

static void msleep(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/* Read exactly len bytes within 2 s; returns bytes read. */
static size_t read_n(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		struct pollfd p = { fd, POLLIN, 0 };
		if (poll(&p, 1, 2000) <= 0)
			break;
		ssize_t n = read(fd, (uint8_t *)buf + got, len - got);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	return got;
}

/* Whether fd has bytes (or EOF) within ms. */
static bool readable(int fd, int ms)
{
	struct pollfd p = { fd, POLLIN, 0 };
	return poll(&p, 1, ms) > 0;
}

static void rp_msg(uint8_t *m, unsigned type, uint32_t value)
{
	uint8_t b[8] = { 0, (uint8_t)type, 0, 4, (uint8_t)(value >> 24), (uint8_t)(value >> 16), (uint8_t)(value >> 8),
			 (uint8_t)value };
	memcpy(m, b, 8);
}

/* The data plane's side of each channel, in arrival order. */
static int adopted[FERRY_PCGUARD_MAX_CHANNELS];
static unsigned nadopted;

static int adopt(void *arg, int dp_fd, struct ferry_err *err)
{
	(void)arg;
	(void)err;
	unsigned n = __atomic_load_n(&nadopted, __ATOMIC_ACQUIRE);
	adopted[n] = dp_fd;
	__atomic_store_n(&nadopted, n + 1, __ATOMIC_RELEASE);
	return 0;
}

/* QEMU connecting a channel; waits until the guard has adopted it. */
static int qemu_connect(const char *path, unsigned n)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		return -1;
	for (int i = 0; i < 200 && __atomic_load_n(&nadopted, __ATOMIC_ACQUIRE) < n; i++)
		msleep(10);
	return fd;
}

static bool write_all(int fd, const void *buf, size_t len)
{
	return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len;
}

int main(void)
{
	/* splice() has no MSG_NOSIGNAL: like ferryd, ignore SIGPIPE. */
	signal(SIGPIPE, SIG_IGN);
	struct ferry_err err = { 0 };
	struct ferry_pcguard *g;
	char path[64];
	snprintf(path, sizeof(path), "/tmp/ferry-test-pcguard-%d.sock", (int)getpid());
	CHECK(ferry_pcguard_start(&g, path, 1, adopt, NULL, &err) == 0, "guard listens: %s", err.msg);
	int qemu = qemu_connect(path, 1), dp = nadopted == 1 ? adopted[0] : -1;
	CHECK(qemu >= 0 && dp >= 0, "QEMU's main channel is accepted and adopted");

	/* QEMU's stream reaches the data plane unchanged (an odd length). */
	size_t len = (256u << 10) + 13; /* fits the sockets and the pipe: no reader thread needed */
	uint8_t *out = malloc(len), *in = malloc(len);
	for (size_t i = 0; i < len; i++)
		out[i] = (uint8_t)(i * 7 + 3);
	CHECK(write_all(qemu, out, len), "QEMU writes %zu bytes", len);
	CHECK(read_n(dp, in, len) == len && memcmp(in, out, len) == 0, "the data plane reads them unchanged");

	/* Return path: a PONG split in two writes arrives whole. */
	uint8_t m[8], r[8];
	rp_msg(m, 2, 3);
	CHECK(write_all(dp, m, 3) && (msleep(20), write_all(dp, m + 3, 5)), "a PONG arrives in two pieces");
	CHECK(read_n(qemu, r, 8) == 8 && memcmp(r, m, 8) == 0, "QEMU gets the PONG whole");

	/* The destination's SHUT before commit waits; commit lets it through. */
	rp_msg(m, 1, 0);
	CHECK(write_all(dp, m, 8), "the destination sends SHUT before commit");
	CHECK(!readable(qemu, 200), "QEMU does not see it yet");
	struct ferry_pcguard_state st;
	ferry_pcguard_state(g, &st);
	CHECK(st.shut_held && !st.committed, "the guard holds it");
	CHECK(ferry_pcguard_commit(g) == 0, "commit");
	CHECK(read_n(qemu, r, 8) == 8 && memcmp(r, m, 8) == 0, "after commit QEMU gets the SHUT");
	CHECK(ferry_pcguard_rescue(g) == -EPERM, "no rescue after commit");
	close(qemu);
	close(dp);
	ferry_pcguard_stop(g);

	CHECK(access(path, F_OK) != 0, "the guard's socket is gone after stop");

	/* Main and preempt channel. A data plane that dies before commit: QEMU
	 * keeps writing into the sink on both, sees no error and no EOF; the
	 * rescue's SHUT(0) is all it gets. */
	nadopted = 0;
	CHECK(ferry_pcguard_start(&g, path, 2, adopt, NULL, &err) == 0, "second guard listens: %s", err.msg);
	qemu = qemu_connect(path, 1);
	int preempt = qemu_connect(path, 2);
	dp = adopted[0];
	int dp2 = nadopted == 2 ? adopted[1] : -1;
	CHECK(qemu >= 0 && preempt >= 0 && dp2 >= 0, "main and preempt channels adopted in arrival order");
	CHECK(write_all(preempt, "page", 4) && read_n(dp2, in, 4) == 4 && memcmp(in, "page", 4) == 0,
	      "the preempt channel carries bytes too");
	CHECK(write_all(qemu, out, 4096), "QEMU writes");
	CHECK(read_n(dp, in, 4096) == 4096, "the data plane reads");
	rp_msg(m, 1, 1);
	CHECK(write_all(dp, m, 8), "the destination reports an error with SHUT(1)");
	close(dp);
	close(dp2);
	msleep(100);
	CHECK(write_all(qemu, out, len), "QEMU can still write %zu bytes after the data plane died", len);
	CHECK(write_all(preempt, out, len), "and on its preempt channel");
	out[len - 1] = 0; /* QEMU_VM_EOF as the last byte */
	CHECK(write_all(qemu, out + len - 1, 1), "QEMU writes its last byte");
	CHECK(!readable(qemu, 200), "QEMU sees neither the SHUT(1) nor an EOF");
	ferry_pcguard_state(g, &st);
	CHECK(st.dp_broken && !st.rescuing, "the guard noticed the broken data plane by itself");
	CHECK(ferry_pcguard_commit(g) == -EPIPE, "commit refused: bytes were lost on the way");
	CHECK(ferry_pcguard_send_shut(g, &err) == -EPERM, "no SHUT of ours before rescue");
	CHECK(ferry_pcguard_rescue(g) == 0, "rescue");
	for (int i = 0; i < 50; i++) {
		ferry_pcguard_state(g, &st);
		if (st.quiet_s > 0.2)
			break;
		msleep(20);
	}
	CHECK(st.rescuing && st.peer_closed && st.last_sunk_byte == 0 && st.quiet_s > 0.2,
	      "state: rescuing, peer closed, last byte 0, quiet (sunk %llu, last %d)", (unsigned long long)st.sunk_bytes,
	      st.last_sunk_byte);
	CHECK(ferry_pcguard_commit(g) == -EPIPE, "commit is refused once rescuing");
	ferry_err_clear(&err);
	CHECK(ferry_pcguard_send_shut(g, &err) == 0, "SHUT(0) sent: %s", err.msg);
	rp_msg(m, 1, 0);
	CHECK(read_n(qemu, r, 8) == 8 && memcmp(r, m, 8) == 0, "QEMU reads SHUT(0)");
	CHECK(!readable(preempt, 100), "nothing arrives on the preempt channel");
	close(qemu);
	close(preempt);
	ferry_pcguard_stop(g);
	free(out);
	free(in);
	CHECK_DONE();
}
