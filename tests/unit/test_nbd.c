/* dataplane/nbd.c: our client against our server over a socketpair, request
 * checks at every bound, malformed options answered, block message framing. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../dataplane/nbd.h"
#include "check.h"

static const struct ferry_nbd_export_info EXP = {
	.size = 10 * 1048576 + 1000,
	.flags = FERRY_NBD_FLAG_HAS_FLAGS | FERRY_NBD_FLAG_SEND_FLUSH | FERRY_NBD_FLAG_SEND_FUA |
		 FERRY_NBD_FLAG_SEND_TRIM | FERRY_NBD_FLAG_SEND_WRITE_ZEROES,
	.base_allocation = true,
};

struct srv {
	int fd;
	int rc;
	struct ferry_nbd_neg neg;
	struct ferry_err err;
};

static void *serve(void *arg)
{
	struct srv *s = arg;
	s->rc = ferry_nbd_server_handshake(s->fd, "vda", &EXP, &s->neg, &s->err);
	return NULL;
}

static void test_handshake(void)
{
	int sp[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0, "socketpair");
	struct srv s = { .fd = sp[0] };
	pthread_t t;
	pthread_create(&t, NULL, serve, &s);
	struct ferry_nbd_export_info info;
	struct ferry_nbd_neg neg;
	struct ferry_err err = { 0 };
	int rc = ferry_nbd_client_handshake(sp[1], "vda", &info, &neg, &err);
	pthread_join(t, NULL);
	CHECK(rc == 0 && s.rc == 0, "client and server agree (%s / %s)", err.msg, s.err.msg);
	CHECK(info.size == EXP.size, "size %llu travels", (unsigned long long)info.size);
	CHECK(info.flags & FERRY_NBD_FLAG_SEND_DF, "DF offered with structured replies");
	CHECK(neg.structured && s.neg.structured, "structured replies negotiated");
	CHECK(neg.meta_alloc && s.neg.meta_alloc && neg.meta_id == s.neg.meta_id, "base:allocation selected");
	CHECK(info.max_block == FERRY_NBD_MAX_PAYLOAD && info.min_block == 1, "block sizes");

	/* a request and a simple reply round trip */
	struct ferry_nbd_request q = { .type = FERRY_NBD_CMD_READ, .cookie = 77, .offset = 5, .length = 9 }, r;
	uint8_t b[FERRY_NBD_REQUEST_LEN];
	ferry_nbd_request_encode(&q, b);
	CHECK(write(sp[1], b, sizeof(b)) == (ssize_t)sizeof(b), "request written");
	CHECK(ferry_nbd_read_request(sp[0], &r, &err) == 0 && r.cookie == 77 && r.length == 9, "request read back");
	uint8_t h[FERRY_NBD_SIMPLE_LEN];
	ferry_nbd_simple_reply_encode(77, FERRY_NBD_EIO, h);
	CHECK(write(sp[0], h, sizeof(h)) == (ssize_t)sizeof(h), "reply written");
	struct ferry_nbd_reply rep;
	CHECK(ferry_nbd_read_reply(sp[1], &rep, &err) == 0 && !rep.structured && rep.error == FERRY_NBD_EIO &&
		      rep.cookie == 77, "simple reply read back");
	/* a bad magic is refused */
	b[0] ^= 0xff;
	CHECK(write(sp[1], b, sizeof(b)) == (ssize_t)sizeof(b), "bad request written");
	memset(&err, 0, sizeof(err));
	CHECK(ferry_nbd_read_request(sp[0], &r, &err) == -EPROTO, "bad magic: -EPROTO");
	CHECK_MSG(err, "bad magic", "the message names the magic: %s", err.msg);
	/* a structured chunk too large is refused before its payload is read */
	uint8_t c[FERRY_NBD_CHUNK_LEN];
	ferry_nbd_chunk_encode(0, FERRY_NBD_REPLY_TYPE_OFFSET_DATA, 1, 0xfffffff0u, c);
	CHECK(write(sp[0], c, sizeof(c)) == (ssize_t)sizeof(c), "chunk written");
	memset(&err, 0, sizeof(err));
	CHECK(ferry_nbd_read_reply(sp[1], &rep, &err) == -EPROTO, "oversized chunk refused: %s", err.msg);
	close(sp[0]);
	close(sp[1]);
}

/* Feed raw option bytes to the server; return the first reply's type. */
static uint32_t option_reply(const uint8_t *opt, size_t len)
{
	int sp[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp))
		return 0;
	struct srv s = { .fd = sp[0] };
	pthread_t t;
	pthread_create(&t, NULL, serve, &s);
	uint8_t greet[18], cf[4];
	struct ferry_err err = { 0 };
	uint32_t type = 0;
	if (ferry_nbd_read_full(sp[1], greet, sizeof(greet), &err) == 0) {
		ferry_nbd_put32(cf, FERRY_NBD_FLAG_FIXED_NEWSTYLE);
		uint8_t h[20];
		if (write(sp[1], cf, 4) == 4 && write(sp[1], opt, len) == (ssize_t)len &&
		    ferry_nbd_read_full(sp[1], h, sizeof(h), &err) == 0)
			type = ferry_nbd_get32(h + 12);
	}
	shutdown(sp[1], SHUT_RDWR);
	pthread_join(t, NULL);
	close(sp[0]);
	close(sp[1]);
	return type;
}

static size_t opt_header(uint8_t *b, uint32_t opt, uint32_t len)
{
	ferry_nbd_put64(b, FERRY_NBD_IHAVEOPT);
	ferry_nbd_put32(b + 8, opt);
	ferry_nbd_put32(b + 12, len);
	return 16;
}

static void test_bad_options(void)
{
	uint8_t b[128];
	/* GO whose name length runs past the option */
	size_t n = opt_header(b, FERRY_NBD_OPT_GO, 6);
	ferry_nbd_put32(b + n, 1000);
	ferry_nbd_put16(b + n + 4, 0);
	CHECK(option_reply(b, n + 6) == FERRY_NBD_REP_ERR_INVALID, "GO with a name past its end: ERR_INVALID");
	/* GO with an unknown export */
	n = opt_header(b, FERRY_NBD_OPT_GO, 9);
	ferry_nbd_put32(b + n, 3);
	memcpy(b + n + 4, "xyz", 3);
	ferry_nbd_put16(b + n + 7, 0);
	CHECK(option_reply(b, n + 9) == FERRY_NBD_REP_ERR_UNKNOWN, "GO for an unknown export: ERR_UNKNOWN");
	/* SET_META_CONTEXT before structured replies */
	n = opt_header(b, FERRY_NBD_OPT_SET_META_CONTEXT, 8);
	memset(b + n, 0, 8);
	CHECK(option_reply(b, n + 8) == FERRY_NBD_REP_ERR_INVALID, "meta context without structured replies refused");
	/* LIST_META_CONTEXT whose query count lies */
	n = opt_header(b, FERRY_NBD_OPT_LIST_META_CONTEXT, 8);
	ferry_nbd_put32(b + n, 0);
	ferry_nbd_put32(b + n + 4, 100000);
	CHECK(option_reply(b, n + 8) == FERRY_NBD_REP_ERR_INVALID, "query count past the option: ERR_INVALID");
	/* an unknown option */
	n = opt_header(b, 4242, 0);
	CHECK(option_reply(b, n) == FERRY_NBD_REP_ERR_UNSUP, "unknown option: ERR_UNSUP");
	/* LIST with data */
	n = opt_header(b, FERRY_NBD_OPT_LIST, 1);
	b[n] = 0;
	CHECK(option_reply(b, n + 1) == FERRY_NBD_REP_ERR_INVALID, "LIST with data: ERR_INVALID");
}

static void test_checks(void)
{
	struct ferry_nbd_neg neg = { .structured = true, .meta_alloc = true };
	struct ferry_nbd_neg plain = { 0 };
	char why[256];
	struct { struct ferry_nbd_request r; const struct ferry_nbd_neg *neg; uint32_t want; const char *what; } cases[] = {
		{ { .type = FERRY_NBD_CMD_READ, .offset = 0, .length = 4096 }, &neg, 0, "read" },
		{ { .type = FERRY_NBD_CMD_READ, .offset = EXP.size - 1, .length = 1 }, &neg, 0, "read of the last byte" },
		{ { .type = FERRY_NBD_CMD_READ, .offset = EXP.size, .length = 1 }, &neg, FERRY_NBD_EINVAL, "read past the end" },
		{ { .type = FERRY_NBD_CMD_READ, .offset = UINT64_MAX - 10, .length = 100 }, &neg, FERRY_NBD_EINVAL,
		  "read whose end overflows" },
		{ { .type = FERRY_NBD_CMD_READ, .length = FERRY_NBD_MAX_PAYLOAD + 1 }, &neg, FERRY_NBD_EOVERFLOW, "oversized read" },
		{ { .type = FERRY_NBD_CMD_READ, .length = 0 }, &neg, FERRY_NBD_EINVAL, "zero-length read" },
		{ { .type = FERRY_NBD_CMD_READ, .flags = FERRY_NBD_CMD_FLAG_DF, .length = 1 }, &plain, FERRY_NBD_EINVAL,
		  "DF without structured replies" },
		{ { .type = FERRY_NBD_CMD_WRITE, .offset = EXP.size - 10, .length = 20 }, &neg, FERRY_NBD_ENOSPC,
		  "write past the end" },
		{ { .type = FERRY_NBD_CMD_WRITE, .flags = FERRY_NBD_CMD_FLAG_FUA, .length = 1 }, &neg, 0, "FUA write" },
		{ { .type = FERRY_NBD_CMD_WRITE_ZEROES, .flags = FERRY_NBD_CMD_FLAG_FAST_ZERO, .length = 1 }, &neg,
		  FERRY_NBD_EINVAL, "FAST_ZERO not advertised" },
		{ { .type = FERRY_NBD_CMD_WRITE_ZEROES, .flags = FERRY_NBD_CMD_FLAG_NO_HOLE, .length = 4096 }, &neg, 0,
		  "NO_HOLE zeroes" },
		{ { .type = FERRY_NBD_CMD_TRIM, .offset = 0, .length = 0xffffffffu }, &neg, FERRY_NBD_ENOSPC, "huge trim" },
		{ { .type = FERRY_NBD_CMD_FLUSH }, &neg, 0, "flush" },
		{ { .type = FERRY_NBD_CMD_FLUSH, .length = 1 }, &neg, FERRY_NBD_EINVAL, "flush with a length" },
		{ { .type = FERRY_NBD_CMD_BLOCK_STATUS, .length = 1 << 30 }, &plain, FERRY_NBD_EINVAL,
		  "block status without a context" },
		{ { .type = FERRY_NBD_CMD_CACHE, .length = 1 }, &neg, FERRY_NBD_EINVAL, "CACHE" },
		{ { .type = 99, .length = 1 }, &neg, FERRY_NBD_EINVAL, "unknown command" },
		{ { .type = FERRY_NBD_CMD_READ, .flags = 0x8000, .length = 1 }, &neg, FERRY_NBD_EINVAL, "unknown flag" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		why[0] = 0;
		uint32_t e = ferry_nbd_check_request(&cases[i].r, &EXP, cases[i].neg, why, sizeof(why));
		CHECK(e == cases[i].want, "%s: %u (%s)", cases[i].what, e, why);
	}
	struct ferry_nbd_export_info ro = EXP;
	ro.flags |= FERRY_NBD_FLAG_READ_ONLY;
	struct ferry_nbd_request w = { .type = FERRY_NBD_CMD_WRITE, .length = 1 };
	CHECK(ferry_nbd_check_request(&w, &ro, &neg, why, sizeof(why)) == FERRY_NBD_EPERM, "write on read-only: EPERM");
}

static void test_blk(void)
{
	struct ferry_blk_req q = { .type = FERRY_NBD_CMD_WRITE, .flags = 1, .handle = 5, .offset = 1ull << 40,
				   .length = 4096 }, q2;
	uint8_t b[FERRY_BLK_REQ_LEN];
	struct ferry_err err = { 0 };
	ferry_blk_req_encode(&q, b);
	CHECK(ferry_blk_req_decode(b, &q2, &err) == 0 && q2.type == q.type && q2.flags == q.flags && q2.handle == q.handle &&
	      q2.offset == q.offset && q2.length == q.length, "block request round trip");
	q.length = FERRY_NBD_MAX_PAYLOAD + 1;
	ferry_blk_req_encode(&q, b);
	CHECK(ferry_blk_req_decode(b, &q2, &err) == -EPROTO, "oversized block WRITE refused");
	ferry_blk_req_encode(&q2, b);
	b[30] = 1;
	memset(&err, 0, sizeof(err));
	CHECK(ferry_blk_req_decode(b, &q2, &err) == -EPROTO, "non-zero reserved field refused: %s", err.msg);
	struct ferry_blk_rep r = { .error = 0, .handle = 3, .length = 12 }, r2;
	uint8_t rb[FERRY_BLK_REP_LEN];
	ferry_blk_rep_encode(&r, rb);
	CHECK(ferry_blk_rep_decode(rb, &r2, &err) == 0 && r2.handle == 3 && r2.length == 12, "block reply round trip");
	rb[0] = 0;
	CHECK(ferry_blk_rep_decode(rb, &r2, &err) == -EPROTO, "block reply with bad magic refused");
	r.length = 0xffffffffu;
	ferry_blk_rep_encode(&r, rb);
	CHECK(ferry_blk_rep_decode(rb, &r2, &err) == -EPROTO, "oversized block reply refused");
	uint8_t s[FERRY_BLK_SEG_LEN];
	uint32_t kind, len;
	ferry_blk_seg_encode(FERRY_BLK_SEG_HOLE, 65536, s);
	ferry_blk_seg_decode(s, &kind, &len);
	CHECK(kind == FERRY_BLK_SEG_HOLE && len == 65536, "segment round trip");
}

int main(void)
{
	/* the server half writes to clients these tests close early */
	signal(SIGPIPE, SIG_IGN);
	test_handshake();
	test_bad_options();
	test_checks();
	test_blk();
	CHECK_DONE();
}
