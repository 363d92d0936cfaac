/* NBD protocol (fixed newstyle), both sides, and ferry's block messages.
 *
 * Pure protocol over file descriptors: no threads, no data plane. The
 * server half serves one export to a client (handshake, request headers,
 * simple and structured replies); the client half talks to a real NBD
 * server (QEMU's export, qemu-nbd, nbdkit). Every length and offset read
 * from a peer is bounded before use.
 *
 * Block messages (docs/nbd.md) carry NBD requests and their replies between
 * two ferry daemons on data-plane streams: a fixed header, WRITE payload
 * only for writes, READ data only for the parts that are not holes. */
#ifndef FERRY_NBD_H
#define FERRY_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../drivers/err.h"

/* Handshake */
#define FERRY_NBD_MAGIC            0x4e42444d41474943ull /* "NBDMAGIC" */
#define FERRY_NBD_IHAVEOPT         0x49484156454f5054ull
#define FERRY_NBD_OPT_REPLY_MAGIC  0x0003e889045565a9ull
#define FERRY_NBD_FLAG_FIXED_NEWSTYLE 1u
#define FERRY_NBD_FLAG_NO_ZEROES      2u

enum {
	FERRY_NBD_OPT_EXPORT_NAME = 1,
	FERRY_NBD_OPT_ABORT = 2,
	FERRY_NBD_OPT_LIST = 3,
	FERRY_NBD_OPT_STARTTLS = 5,
	FERRY_NBD_OPT_INFO = 6,
	FERRY_NBD_OPT_GO = 7,
	FERRY_NBD_OPT_STRUCTURED_REPLY = 8,
	FERRY_NBD_OPT_LIST_META_CONTEXT = 9,
	FERRY_NBD_OPT_SET_META_CONTEXT = 10,
};

#define FERRY_NBD_REP_ERR(n) (0x80000000u | (n))
enum {
	FERRY_NBD_REP_ACK = 1,
	FERRY_NBD_REP_SERVER = 2,
	FERRY_NBD_REP_INFO = 3,
	FERRY_NBD_REP_META_CONTEXT = 4,
	FERRY_NBD_REP_ERR_UNSUP = FERRY_NBD_REP_ERR(1),
	FERRY_NBD_REP_ERR_POLICY = FERRY_NBD_REP_ERR(2),
	FERRY_NBD_REP_ERR_INVALID = FERRY_NBD_REP_ERR(3),
	FERRY_NBD_REP_ERR_UNKNOWN = FERRY_NBD_REP_ERR(6),
	FERRY_NBD_REP_ERR_TOO_BIG = FERRY_NBD_REP_ERR(9),
};

enum { FERRY_NBD_INFO_EXPORT = 0, FERRY_NBD_INFO_NAME = 1, FERRY_NBD_INFO_DESCRIPTION = 2, FERRY_NBD_INFO_BLOCK_SIZE = 3 };

/* Transmission flags */
#define FERRY_NBD_FLAG_HAS_FLAGS         (1u << 0)
#define FERRY_NBD_FLAG_READ_ONLY         (1u << 1)
#define FERRY_NBD_FLAG_SEND_FLUSH        (1u << 2)
#define FERRY_NBD_FLAG_SEND_FUA          (1u << 3)
#define FERRY_NBD_FLAG_ROTATIONAL        (1u << 4)
#define FERRY_NBD_FLAG_SEND_TRIM         (1u << 5)
#define FERRY_NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define FERRY_NBD_FLAG_SEND_DF           (1u << 7)
#define FERRY_NBD_FLAG_CAN_MULTI_CONN    (1u << 8)
#define FERRY_NBD_FLAG_SEND_FAST_ZERO    (1u << 11)

/* Transmission */
#define FERRY_NBD_REQUEST_MAGIC    0x25609513u
#define FERRY_NBD_SIMPLE_MAGIC     0x67446698u
#define FERRY_NBD_STRUCTURED_MAGIC 0x668e33efu
#define FERRY_NBD_REQUEST_LEN      28
#define FERRY_NBD_SIMPLE_LEN       16
#define FERRY_NBD_CHUNK_LEN        20

enum {
	FERRY_NBD_CMD_READ = 0,
	FERRY_NBD_CMD_WRITE = 1,
	FERRY_NBD_CMD_DISC = 2,
	FERRY_NBD_CMD_FLUSH = 3,
	FERRY_NBD_CMD_TRIM = 4,
	FERRY_NBD_CMD_CACHE = 5,
	FERRY_NBD_CMD_WRITE_ZEROES = 6,
	FERRY_NBD_CMD_BLOCK_STATUS = 7,
};

#define FERRY_NBD_CMD_FLAG_FUA       (1u << 0)
#define FERRY_NBD_CMD_FLAG_NO_HOLE   (1u << 1)
#define FERRY_NBD_CMD_FLAG_DF        (1u << 2)
#define FERRY_NBD_CMD_FLAG_REQ_ONE   (1u << 3)
#define FERRY_NBD_CMD_FLAG_FAST_ZERO (1u << 4)

#define FERRY_NBD_REPLY_FLAG_DONE 1u
enum {
	FERRY_NBD_REPLY_TYPE_NONE = 0,
	FERRY_NBD_REPLY_TYPE_OFFSET_DATA = 1,
	FERRY_NBD_REPLY_TYPE_OFFSET_HOLE = 2,
	FERRY_NBD_REPLY_TYPE_BLOCK_STATUS = 5,
	FERRY_NBD_REPLY_TYPE_ERROR = 0x8001,
	FERRY_NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002,
};

/* Error values on the wire (not the host's errno numbers, though Linux agrees). */
enum {
	FERRY_NBD_EPERM = 1,
	FERRY_NBD_EIO = 5,
	FERRY_NBD_ENOMEM = 12,
	FERRY_NBD_EINVAL = 22,
	FERRY_NBD_ENOSPC = 28,
	FERRY_NBD_EOVERFLOW = 75,
	FERRY_NBD_ENOTSUP = 95,
	FERRY_NBD_ESHUTDOWN = 108,
};

#define FERRY_NBD_STATE_HOLE 1u /* base:allocation */
#define FERRY_NBD_STATE_ZERO 2u
#define FERRY_NBD_META_BASE_ALLOCATION "base:allocation"

#define FERRY_NBD_MAX_STRING   4096          /* names, messages: the spec's limit */
#define FERRY_NBD_MAX_OPTION   65536         /* option payloads this side reads */
#define FERRY_NBD_MAX_PAYLOAD  (32u << 20)   /* largest READ/WRITE ferry accepts (QEMU's default too) */
#define FERRY_NBD_MAX_EXTENTS  65536         /* block-status descriptors per reply kept */

/* What one export looks like to clients. */
struct ferry_nbd_export_info {
	uint64_t size;
	uint16_t flags;            /* transmission flags, HAS_FLAGS included */
	uint32_t min_block, pref_block, max_block;
	bool base_allocation;      /* the export answers base:allocation */
};

/* What one connection's handshake agreed. */
struct ferry_nbd_neg {
	bool structured;           /* structured replies */
	bool meta_alloc;           /* base:allocation selected */
	uint32_t meta_id;          /* its context id */
	bool no_zeroes;
};

/* ---- I/O helpers (blocking fds; EINTR retried) ---- */
int ferry_nbd_read_full(int fd, void *buf, size_t n, struct ferry_err *err);
int ferry_nbd_write_full(int fd, const void *buf, size_t n, struct ferry_err *err);
/* Read and drop n bytes. */
int ferry_nbd_skip(int fd, uint64_t n, struct ferry_err *err);

/* ---- server ---- */

/* Run the fixed newstyle handshake on fd for one export called name (""
 * and any name are accepted as that export). 0: transmission begins with
 * *neg agreed; -ECONNABORTED: the client aborted or only listed (clean);
 * else an error naming what the client did wrong. */
int ferry_nbd_server_handshake(int fd, const char *name, const struct ferry_nbd_export_info *exp,
			       struct ferry_nbd_neg *neg, struct ferry_err *err);

struct ferry_nbd_request {
	uint16_t flags, type;
	uint64_t cookie, offset;
	uint32_t length;
};

/* Read one 28-byte request header. -EPROTO for a bad magic (the stream is
 * lost: disconnect); -ECONNRESET at a clean end of stream. */
int ferry_nbd_read_request(int fd, struct ferry_nbd_request *r, struct ferry_err *err);
void ferry_nbd_request_encode(const struct ferry_nbd_request *r, uint8_t out[FERRY_NBD_REQUEST_LEN]);

/* Check a request against the export and the handshake: 0 if it may be
 * served, else the NBD error to answer with (why says what was wrong). */
uint32_t ferry_nbd_check_request(const struct ferry_nbd_request *r, const struct ferry_nbd_export_info *exp,
				 const struct ferry_nbd_neg *neg, char *why, size_t whylen);

/* Reply encoders: they fill a header buffer, the caller writes it with the payload. */
void ferry_nbd_simple_reply_encode(uint64_t cookie, uint32_t error, uint8_t out[FERRY_NBD_SIMPLE_LEN]);
void ferry_nbd_chunk_encode(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length,
			    uint8_t out[FERRY_NBD_CHUNK_LEN]);

/* ---- client ---- */

/* Negotiate with a real server on fd: structured replies and base:allocation
 * when it has them, then NBD_OPT_GO for export name. Fills *info, *neg. */
int ferry_nbd_client_handshake(int fd, const char *name, struct ferry_nbd_export_info *info,
			       struct ferry_nbd_neg *neg, struct ferry_err *err);

struct ferry_nbd_reply {
	bool structured;
	uint16_t flags, type;      /* structured only */
	uint64_t cookie;
	uint32_t error;            /* simple only */
	uint32_t length;           /* structured: payload bytes that follow */
};

/* Read a reply header (simple or structured); structured chunk payloads
 * over FERRY_NBD_MAX_PAYLOAD + 64 bytes are refused. */
int ferry_nbd_read_reply(int fd, struct ferry_nbd_reply *r, struct ferry_err *err);

/* ---- block messages between daemons ---- */

#define FERRY_BLK_REQ_MAGIC 0x46424b51u /* "FBKQ" */
#define FERRY_BLK_REP_MAGIC 0x46424b52u /* "FBKR" */
#define FERRY_BLK_REQ_LEN 32
#define FERRY_BLK_REP_LEN 24
#define FERRY_BLK_SEG_LEN 8
#define FERRY_BLK_MAX_SEGS 64   /* segments in one READ reply */
enum { FERRY_BLK_SEG_DATA = 0, FERRY_BLK_SEG_HOLE = 1 };

struct ferry_blk_req {
	uint16_t type, flags;      /* NBD command and command flags */
	uint64_t handle;
	uint64_t offset;
	uint32_t length;           /* WRITE: payload bytes that follow */
};

struct ferry_blk_rep {
	uint32_t error;            /* NBD error value, 0 = success */
	uint64_t handle;
	uint32_t length;           /* payload bytes that follow */
};

void ferry_blk_req_encode(const struct ferry_blk_req *r, uint8_t out[FERRY_BLK_REQ_LEN]);
int ferry_blk_req_decode(const uint8_t in[FERRY_BLK_REQ_LEN], struct ferry_blk_req *r, struct ferry_err *err);
void ferry_blk_rep_encode(const struct ferry_blk_rep *r, uint8_t out[FERRY_BLK_REP_LEN]);
int ferry_blk_rep_decode(const uint8_t in[FERRY_BLK_REP_LEN], struct ferry_blk_rep *r, struct ferry_err *err);
/* A READ reply's payload is segments, each an 8-byte header (kind, length)
 * followed by length bytes for DATA only. */
void ferry_blk_seg_encode(uint32_t kind, uint32_t length, uint8_t out[FERRY_BLK_SEG_LEN]);
void ferry_blk_seg_decode(const uint8_t in[FERRY_BLK_SEG_LEN], uint32_t *kind, uint32_t *length);

/* Big-endian helpers, shared by both daemons' NBD code. */
void ferry_nbd_put16(uint8_t *p, uint16_t v);
void ferry_nbd_put32(uint8_t *p, uint32_t v);
void ferry_nbd_put64(uint8_t *p, uint64_t v);
uint16_t ferry_nbd_get16(const uint8_t *p);
uint32_t ferry_nbd_get32(const uint8_t *p);
uint64_t ferry_nbd_get64(const uint8_t *p);

const char *ferry_nbd_cmd_name(uint16_t type);

#endif
