#include "nbd.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- byte order ---- */

void ferry_nbd_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

void ferry_nbd_put32(uint8_t *p, uint32_t v)
{
	ferry_nbd_put16(p, (uint16_t)(v >> 16));
	ferry_nbd_put16(p + 2, (uint16_t)v);
}

void ferry_nbd_put64(uint8_t *p, uint64_t v)
{
	ferry_nbd_put32(p, (uint32_t)(v >> 32));
	ferry_nbd_put32(p + 4, (uint32_t)v);
}

uint16_t ferry_nbd_get16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

uint32_t ferry_nbd_get32(const uint8_t *p)
{
	return ((uint32_t)ferry_nbd_get16(p) << 16) | ferry_nbd_get16(p + 2);
}

uint64_t ferry_nbd_get64(const uint8_t *p)
{
	return ((uint64_t)ferry_nbd_get32(p) << 32) | ferry_nbd_get32(p + 4);
}

const char *ferry_nbd_cmd_name(uint16_t type)
{
	static const char *const names[] = { "READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES",
					     "BLOCK_STATUS" };
	return type < sizeof(names) / sizeof(names[0]) ? names[type] : "unknown";
}

/* ---- I/O ---- */

int ferry_nbd_read_full(int fd, void *buf, size_t n, struct ferry_err *err)
{
	uint8_t *p = buf;
	while (n > 0) {
		ssize_t r = read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return ferry_err_set(err, errno, "read: %s", strerror(errno));
		if (r == 0)
			return ferry_err_set(err, ECONNRESET, "connection closed by the peer");
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

int ferry_nbd_write_full(int fd, const void *buf, size_t n, struct ferry_err *err)
{
	const uint8_t *p = buf;
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return ferry_err_set(err, errno == EPIPE ? ECONNRESET : errno, "write: %s", strerror(errno));
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int ferry_nbd_skip(int fd, uint64_t n, struct ferry_err *err)
{
	uint8_t buf[4096];
	while (n > 0) {
		size_t k = n < sizeof(buf) ? (size_t)n : sizeof(buf);
		int rc = ferry_nbd_read_full(fd, buf, k, err);
		if (rc)
			return rc;
		n -= k;
	}
	return 0;
}

/* ---- server handshake ---- */

static int opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len, struct ferry_err *err)
{
	uint8_t h[20];
	ferry_nbd_put64(h, FERRY_NBD_OPT_REPLY_MAGIC);
	ferry_nbd_put32(h + 8, opt);
	ferry_nbd_put32(h + 12, type);
	ferry_nbd_put32(h + 16, len);
	int rc = ferry_nbd_write_full(fd, h, sizeof(h), err);
	return rc ? rc : ferry_nbd_write_full(fd, data, len, err);
}

/* An error reply whose text says why (clients show it to the user). */
static int opt_error(int fd, uint32_t opt, uint32_t type, const char *msg, struct ferry_err *err)
{
	return opt_reply(fd, opt, type, msg, (uint32_t)strlen(msg), err);
}

static bool name_matches(const char *want, const uint8_t *name, uint32_t len)
{
	/* "" is the default export: ours. */
	return len == 0 || (strlen(want) == len && memcmp(want, name, len) == 0);
}

static uint16_t export_flags(const struct ferry_nbd_export_info *exp, const struct ferry_nbd_neg *neg)
{
	uint16_t f = (uint16_t)(exp->flags | FERRY_NBD_FLAG_HAS_FLAGS);
	/* DF only means something with structured replies, which ferry reassembles itself. */
	if (neg->structured)
		f |= FERRY_NBD_FLAG_SEND_DF;
	else
		f &= (uint16_t)~FERRY_NBD_FLAG_SEND_DF;
	return f;
}

static int send_info(int fd, uint32_t opt, const char *name, const struct ferry_nbd_export_info *exp,
		     const struct ferry_nbd_neg *neg, bool want_name, struct ferry_err *err)
{
	uint8_t b[14];
	ferry_nbd_put16(b, FERRY_NBD_INFO_EXPORT);
	ferry_nbd_put64(b + 2, exp->size);
	ferry_nbd_put16(b + 10, export_flags(exp, neg));
	int rc = opt_reply(fd, opt, FERRY_NBD_REP_INFO, b, 12, err);
	if (rc)
		return rc;
	ferry_nbd_put16(b, FERRY_NBD_INFO_BLOCK_SIZE);
	uint32_t maxb = exp->max_block && exp->max_block < FERRY_NBD_MAX_PAYLOAD ? exp->max_block : FERRY_NBD_MAX_PAYLOAD;
	ferry_nbd_put32(b + 2, exp->min_block ? exp->min_block : 1);
	ferry_nbd_put32(b + 6, exp->pref_block ? exp->pref_block : 4096);
	ferry_nbd_put32(b + 10, maxb);
	if ((rc = opt_reply(fd, opt, FERRY_NBD_REP_INFO, b, 14, err)))
		return rc;
	if (want_name) {
		size_t n = strlen(name);
		uint8_t *nb = malloc(2 + n);
		if (!nb)
			return ferry_err_set(err, ENOMEM, "out of memory");
		ferry_nbd_put16(nb, FERRY_NBD_INFO_NAME);
		memcpy(nb + 2, name, n);
		rc = opt_reply(fd, opt, FERRY_NBD_REP_INFO, nb, (uint32_t)(2 + n), err);
		free(nb);
		if (rc)
			return rc;
	}
	return opt_reply(fd, opt, FERRY_NBD_REP_ACK, NULL, 0, err);
}

/* NBD_OPT_INFO / GO: u32 name length, name, u16 n, n x u16 info types. */
static int opt_info_go(int fd, uint32_t opt, const uint8_t *d, uint32_t len, const char *name,
		       const struct ferry_nbd_export_info *exp, const struct ferry_nbd_neg *neg, bool *ok,
		       struct ferry_err *err)
{
	*ok = false;
	if (len < 6)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "option too short", err);
	uint32_t nl = ferry_nbd_get32(d);
	if (nl > FERRY_NBD_MAX_STRING || nl > len - 6)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "export name length out of bounds", err);
	uint16_t nreq = ferry_nbd_get16(d + 4 + nl);
	if ((uint64_t)4 + nl + 2 + 2ull * nreq != len)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "information request count does not match the length", err);
	if (!name_matches(name, d + 4, nl))
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_UNKNOWN, "no such export", err);
	bool want_name = false;
	for (uint16_t i = 0; i < nreq; i++)
		if (ferry_nbd_get16(d + 4 + nl + 2 + 2 * i) == FERRY_NBD_INFO_NAME)
			want_name = true;
	*ok = true;
	return send_info(fd, opt, name, exp, neg, want_name, err);
}

/* LIST/SET_META_CONTEXT: u32 name length, name, u32 n, n x (u32 length, query). */
static int opt_meta(int fd, uint32_t opt, const uint8_t *d, uint32_t len, const char *name,
		    const struct ferry_nbd_export_info *exp, struct ferry_nbd_neg *neg, struct ferry_err *err)
{
	bool set = opt == FERRY_NBD_OPT_SET_META_CONTEXT;
	if (set && !neg->structured)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "structured replies were not negotiated", err);
	if (len < 8)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "option too short", err);
	uint32_t nl = ferry_nbd_get32(d);
	if (nl > FERRY_NBD_MAX_STRING || nl > len - 8)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "export name length out of bounds", err);
	uint32_t nq = ferry_nbd_get32(d + 4 + nl);
	uint32_t pos = 8 + nl;
	bool match = false;
	for (uint32_t i = 0; i < nq; i++) {
		if (len - pos < 4)
			return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "query count exceeds the option", err);
		uint32_t ql = ferry_nbd_get32(d + pos);
		pos += 4;
		if (ql > FERRY_NBD_MAX_STRING || ql > len - pos)
			return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "query length out of bounds", err);
		const char *q = (const char *)d + pos;
		size_t bl = strlen(FERRY_NBD_META_BASE_ALLOCATION);
		if ((ql == bl && memcmp(q, FERRY_NBD_META_BASE_ALLOCATION, bl) == 0) ||
		    (!set && ql == 5 && memcmp(q, "base:", 5) == 0))
			match = true;
		pos += ql;
	}
	if (pos != len)
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "trailing bytes after the queries", err);
	if (!name_matches(name, d + 4, nl))
		return opt_error(fd, opt, FERRY_NBD_REP_ERR_UNKNOWN, "no such export", err);
	if (!set && nq == 0)
		match = true; /* list everything */
	match = match && exp->base_allocation;
	if (set) {
		neg->meta_alloc = match;
		neg->meta_id = 1;
	}
	if (match) {
		size_t bl = strlen(FERRY_NBD_META_BASE_ALLOCATION);
		uint8_t b[4 + 32];
		ferry_nbd_put32(b, 1);
		memcpy(b + 4, FERRY_NBD_META_BASE_ALLOCATION, bl);
		int rc = opt_reply(fd, opt, FERRY_NBD_REP_META_CONTEXT, b, (uint32_t)(4 + bl), err);
		if (rc)
			return rc;
	}
	return opt_reply(fd, opt, FERRY_NBD_REP_ACK, NULL, 0, err);
}

int ferry_nbd_server_handshake(int fd, const char *name, const struct ferry_nbd_export_info *exp,
			       struct ferry_nbd_neg *neg, struct ferry_err *err)
{
	memset(neg, 0, sizeof(*neg));
	uint8_t h[18];
	ferry_nbd_put64(h, FERRY_NBD_MAGIC);
	ferry_nbd_put64(h + 8, FERRY_NBD_IHAVEOPT);
	ferry_nbd_put16(h + 16, FERRY_NBD_FLAG_FIXED_NEWSTYLE | FERRY_NBD_FLAG_NO_ZEROES);
	int rc = ferry_nbd_write_full(fd, h, sizeof(h), err);
	if (rc)
		return rc;
	uint8_t cf[4];
	if ((rc = ferry_nbd_read_full(fd, cf, 4, err)))
		return ferry_err_prefix(err, "client flags");
	uint32_t cflags = ferry_nbd_get32(cf);
	if (cflags & ~(uint32_t)(FERRY_NBD_FLAG_FIXED_NEWSTYLE | FERRY_NBD_FLAG_NO_ZEROES))
		return ferry_err_set(err, EPROTO, "client sent unknown handshake flags 0x%x", cflags);
	if (!(cflags & FERRY_NBD_FLAG_FIXED_NEWSTYLE))
		return ferry_err_set(err, EPROTO, "client does not speak fixed newstyle");
	neg->no_zeroes = cflags & FERRY_NBD_FLAG_NO_ZEROES;
	uint8_t *d = NULL;
	for (;;) {
		uint8_t oh[16];
		if ((rc = ferry_nbd_read_full(fd, oh, 16, err))) {
			ferry_err_prefix(err, "option header");
			break;
		}
		if (ferry_nbd_get64(oh) != FERRY_NBD_IHAVEOPT) {
			rc = ferry_err_set(err, EPROTO, "option without the IHAVEOPT magic");
			break;
		}
		uint32_t opt = ferry_nbd_get32(oh + 8), len = ferry_nbd_get32(oh + 12);
		if (len > FERRY_NBD_MAX_OPTION) {
			/* Drop a modestly oversized option and say so; a huge one ends the connection. */
			if (len > (1u << 20)) {
				rc = ferry_err_set(err, EPROTO, "option %u of %u bytes is too large", opt, len);
				break;
			}
			if ((rc = ferry_nbd_skip(fd, len, err)) ||
			    (rc = opt_error(fd, opt, FERRY_NBD_REP_ERR_TOO_BIG, "option too large", err)))
				break;
			continue;
		}
		free(d);
		d = malloc(len ? len : 1);
		if (!d) {
			rc = ferry_err_set(err, ENOMEM, "out of memory");
			break;
		}
		if ((rc = ferry_nbd_read_full(fd, d, len, err)))
			break;
		bool ok = false;
		switch (opt) {
		case FERRY_NBD_OPT_EXPORT_NAME: {
			if (len > FERRY_NBD_MAX_STRING || !name_matches(name, d, len)) {
				rc = ferry_err_set(err, ENOENT, "client asked for an unknown export");
				goto out;
			}
			uint8_t r[10 + 124] = { 0 };
			ferry_nbd_put64(r, exp->size);
			ferry_nbd_put16(r + 8, export_flags(exp, neg));
			rc = ferry_nbd_write_full(fd, r, neg->no_zeroes ? 10 : sizeof(r), err);
			goto out;
		}
		case FERRY_NBD_OPT_ABORT:
			(void)opt_reply(fd, opt, FERRY_NBD_REP_ACK, NULL, 0, err);
			rc = ferry_err_set(err, ECONNABORTED, "client aborted the handshake");
			goto out;
		case FERRY_NBD_OPT_LIST:
			if (len) {
				rc = opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data", err);
				break;
			}
			{
				size_t n = strlen(name);
				uint8_t *b = malloc(4 + n);
				if (!b) {
					rc = ferry_err_set(err, ENOMEM, "out of memory");
					goto out;
				}
				ferry_nbd_put32(b, (uint32_t)n);
				memcpy(b + 4, name, n);
				rc = opt_reply(fd, opt, FERRY_NBD_REP_SERVER, b, (uint32_t)(4 + n), err);
				free(b);
				if (!rc)
					rc = opt_reply(fd, opt, FERRY_NBD_REP_ACK, NULL, 0, err);
			}
			break;
		case FERRY_NBD_OPT_STRUCTURED_REPLY:
			if (len)
				rc = opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data", err);
			else if (neg->structured)
				rc = opt_error(fd, opt, FERRY_NBD_REP_ERR_INVALID, "structured replies already negotiated", err);
			else {
				neg->structured = true;
				rc = opt_reply(fd, opt, FERRY_NBD_REP_ACK, NULL, 0, err);
			}
			break;
		case FERRY_NBD_OPT_INFO:
		case FERRY_NBD_OPT_GO:
			rc = opt_info_go(fd, opt, d, len, name, exp, neg, &ok, err);
			if (!rc && ok && opt == FERRY_NBD_OPT_GO)
				goto out;
			break;
		case FERRY_NBD_OPT_LIST_META_CONTEXT:
		case FERRY_NBD_OPT_SET_META_CONTEXT:
			rc = opt_meta(fd, opt, d, len, name, exp, neg, err);
			break;
		default:
			rc = opt_error(fd, opt, FERRY_NBD_REP_ERR_UNSUP, "option not supported", err);
			break;
		}
		if (rc)
			break;
	}
out:
	free(d);
	return rc;
}

/* ---- transmission: requests and replies ---- */

void ferry_nbd_request_encode(const struct ferry_nbd_request *r, uint8_t out[FERRY_NBD_REQUEST_LEN])
{
	ferry_nbd_put32(out, FERRY_NBD_REQUEST_MAGIC);
	ferry_nbd_put16(out + 4, r->flags);
	ferry_nbd_put16(out + 6, r->type);
	ferry_nbd_put64(out + 8, r->cookie);
	ferry_nbd_put64(out + 16, r->offset);
	ferry_nbd_put32(out + 24, r->length);
}

int ferry_nbd_read_request(int fd, struct ferry_nbd_request *r, struct ferry_err *err)
{
	uint8_t h[FERRY_NBD_REQUEST_LEN];
	int rc = ferry_nbd_read_full(fd, h, sizeof(h), err);
	if (rc)
		return rc;
	uint32_t magic = ferry_nbd_get32(h);
	if (magic != FERRY_NBD_REQUEST_MAGIC)
		return ferry_err_set(err, EPROTO, "request with bad magic 0x%08x", magic);
	r->flags = ferry_nbd_get16(h + 4);
	r->type = ferry_nbd_get16(h + 6);
	r->cookie = ferry_nbd_get64(h + 8);
	r->offset = ferry_nbd_get64(h + 16);
	r->length = ferry_nbd_get32(h + 24);
	return 0;
}

uint32_t ferry_nbd_check_request(const struct ferry_nbd_request *r, const struct ferry_nbd_export_info *exp,
				 const struct ferry_nbd_neg *neg, char *why, size_t whylen)
{
#define BAD(code, ...) do { snprintf(why, whylen, __VA_ARGS__); return (code); } while (0)
	uint16_t allowed = 0;
	bool writes = false, ranged = true;
	switch (r->type) {
	case FERRY_NBD_CMD_READ:
		allowed = neg->structured ? FERRY_NBD_CMD_FLAG_DF : 0;
		break;
	case FERRY_NBD_CMD_WRITE:
		allowed = FERRY_NBD_CMD_FLAG_FUA;
		writes = true;
		break;
	case FERRY_NBD_CMD_WRITE_ZEROES:
		if (!(exp->flags & FERRY_NBD_FLAG_SEND_WRITE_ZEROES))
			BAD(FERRY_NBD_EINVAL, "WRITE_ZEROES was not advertised");
		allowed = FERRY_NBD_CMD_FLAG_FUA | FERRY_NBD_CMD_FLAG_NO_HOLE |
			  (exp->flags & FERRY_NBD_FLAG_SEND_FAST_ZERO ? FERRY_NBD_CMD_FLAG_FAST_ZERO : 0);
		writes = true;
		break;
	case FERRY_NBD_CMD_TRIM:
		if (!(exp->flags & FERRY_NBD_FLAG_SEND_TRIM))
			BAD(FERRY_NBD_EINVAL, "TRIM was not advertised");
		allowed = FERRY_NBD_CMD_FLAG_FUA;
		writes = true;
		break;
	case FERRY_NBD_CMD_FLUSH:
		if (!(exp->flags & FERRY_NBD_FLAG_SEND_FLUSH))
			BAD(FERRY_NBD_EINVAL, "FLUSH was not advertised");
		ranged = false;
		break;
	case FERRY_NBD_CMD_DISC:
		ranged = false;
		break;
	case FERRY_NBD_CMD_BLOCK_STATUS:
		if (!neg->meta_alloc)
			BAD(FERRY_NBD_EINVAL, "BLOCK_STATUS without a negotiated meta context");
		allowed = FERRY_NBD_CMD_FLAG_REQ_ONE;
		break;
	default:
		BAD(FERRY_NBD_EINVAL, "unknown command %u", r->type);
	}
	if (!(exp->flags & FERRY_NBD_FLAG_SEND_FUA))
		allowed &= (uint16_t)~FERRY_NBD_CMD_FLAG_FUA;
	if (r->flags & ~allowed)
		BAD(FERRY_NBD_EINVAL, "flags 0x%x not valid for %s", r->flags & ~allowed, ferry_nbd_cmd_name(r->type));
	if (writes && (exp->flags & FERRY_NBD_FLAG_READ_ONLY))
		BAD(FERRY_NBD_EPERM, "%s on a read-only export", ferry_nbd_cmd_name(r->type));
	if (!ranged) {
		if (r->type == FERRY_NBD_CMD_FLUSH && (r->offset || r->length))
			BAD(FERRY_NBD_EINVAL, "FLUSH with a non-zero offset or length");
		return 0;
	}
	if (r->length == 0)
		BAD(FERRY_NBD_EINVAL, "%s of length 0", ferry_nbd_cmd_name(r->type));
	if ((r->type == FERRY_NBD_CMD_READ || r->type == FERRY_NBD_CMD_WRITE) && r->length > FERRY_NBD_MAX_PAYLOAD)
		BAD(r->type == FERRY_NBD_CMD_READ ? FERRY_NBD_EOVERFLOW : FERRY_NBD_EINVAL,
		    "%s of %u bytes is over the %u byte maximum", ferry_nbd_cmd_name(r->type), r->length,
		    FERRY_NBD_MAX_PAYLOAD);
	if (r->offset > exp->size || r->length > exp->size - r->offset)
		BAD(writes ? FERRY_NBD_ENOSPC : FERRY_NBD_EINVAL,
		    "%s of %u bytes at %llu is past the end of the export (%llu bytes)", ferry_nbd_cmd_name(r->type),
		    r->length, (unsigned long long)r->offset, (unsigned long long)exp->size);
	return 0;
#undef BAD
}

void ferry_nbd_simple_reply_encode(uint64_t cookie, uint32_t error, uint8_t out[FERRY_NBD_SIMPLE_LEN])
{
	ferry_nbd_put32(out, FERRY_NBD_SIMPLE_MAGIC);
	ferry_nbd_put32(out + 4, error);
	ferry_nbd_put64(out + 8, cookie);
}

void ferry_nbd_chunk_encode(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length,
			    uint8_t out[FERRY_NBD_CHUNK_LEN])
{
	ferry_nbd_put32(out, FERRY_NBD_STRUCTURED_MAGIC);
	ferry_nbd_put16(out + 4, flags);
	ferry_nbd_put16(out + 6, type);
	ferry_nbd_put64(out + 8, cookie);
	ferry_nbd_put32(out + 16, length);
}

/* ---- client ---- */

static int send_opt(int fd, uint32_t opt, const void *data, uint32_t len, struct ferry_err *err)
{
	uint8_t h[16];
	ferry_nbd_put64(h, FERRY_NBD_IHAVEOPT);
	ferry_nbd_put32(h + 8, opt);
	ferry_nbd_put32(h + 12, len);
	int rc = ferry_nbd_write_full(fd, h, sizeof(h), err);
	return rc ? rc : ferry_nbd_write_full(fd, data, len, err);
}

/* Read one option reply; *data (malloc'd, NUL-terminated) holds its payload. */
static int read_opt_reply(int fd, uint32_t opt, uint32_t *type, uint8_t **data, uint32_t *len, struct ferry_err *err)
{
	uint8_t h[20];
	int rc = ferry_nbd_read_full(fd, h, sizeof(h), err);
	if (rc)
		return ferry_err_prefix(err, "option reply");
	if (ferry_nbd_get64(h) != FERRY_NBD_OPT_REPLY_MAGIC)
		return ferry_err_set(err, EPROTO, "server's option reply has a bad magic");
	if (ferry_nbd_get32(h + 8) != opt)
		return ferry_err_set(err, EPROTO, "server replied to option %u, not %u", ferry_nbd_get32(h + 8), opt);
	*type = ferry_nbd_get32(h + 12);
	*len = ferry_nbd_get32(h + 16);
	if (*len > FERRY_NBD_MAX_OPTION)
		return ferry_err_set(err, EPROTO, "server's option reply of %u bytes is too large", *len);
	*data = malloc(*len + 1);
	if (!*data)
		return ferry_err_set(err, ENOMEM, "out of memory");
	if ((rc = ferry_nbd_read_full(fd, *data, *len, err))) {
		free(*data);
		*data = NULL;
		return rc;
	}
	(*data)[*len] = 0;
	return 0;
}

static int opt_failed(uint32_t opt, uint32_t type, const uint8_t *data, struct ferry_err *err)
{
	return ferry_err_set(err, type == FERRY_NBD_REP_ERR_UNKNOWN ? ENOENT : EPROTO,
			     "server refused option %u (error 0x%x)%s%s", opt, type, data[0] ? ": " : "",
			     (const char *)data);
}

/* Old-style export selection, for servers without NBD_OPT_GO. */
static int client_export_name(int fd, const char *name, struct ferry_nbd_export_info *info, bool no_zeroes,
			      struct ferry_err *err)
{
	int rc = send_opt(fd, FERRY_NBD_OPT_EXPORT_NAME, name, (uint32_t)strlen(name), err);
	uint8_t r[10];
	if (rc || (rc = ferry_nbd_read_full(fd, r, 10, err)))
		return ferry_err_prefix(err, "NBD_OPT_EXPORT_NAME");
	info->size = ferry_nbd_get64(r);
	info->flags = ferry_nbd_get16(r + 8);
	return no_zeroes ? 0 : ferry_nbd_skip(fd, 124, err);
}

int ferry_nbd_client_handshake(int fd, const char *name, struct ferry_nbd_export_info *info,
			       struct ferry_nbd_neg *neg, struct ferry_err *err)
{
	memset(info, 0, sizeof(*info));
	memset(neg, 0, sizeof(*neg));
	size_t nl = strlen(name);
	if (nl > FERRY_NBD_MAX_STRING)
		return ferry_err_set(err, ENAMETOOLONG, "export name too long");
	uint8_t h[18];
	int rc = ferry_nbd_read_full(fd, h, sizeof(h), err);
	if (rc)
		return ferry_err_prefix(err, "NBD greeting");
	if (ferry_nbd_get64(h) != FERRY_NBD_MAGIC || ferry_nbd_get64(h + 8) != FERRY_NBD_IHAVEOPT)
		return ferry_err_set(err, EPROTO, "not a newstyle NBD server (bad greeting)");
	uint16_t sflags = ferry_nbd_get16(h + 16);
	if (!(sflags & FERRY_NBD_FLAG_FIXED_NEWSTYLE))
		return ferry_err_set(err, EPROTO, "the NBD server does not speak fixed newstyle");
	neg->no_zeroes = sflags & FERRY_NBD_FLAG_NO_ZEROES;
	uint8_t cf[4];
	ferry_nbd_put32(cf, FERRY_NBD_FLAG_FIXED_NEWSTYLE | (neg->no_zeroes ? FERRY_NBD_FLAG_NO_ZEROES : 0));
	if ((rc = ferry_nbd_write_full(fd, cf, 4, err)))
		return rc;

	uint32_t type, len;
	uint8_t *data = NULL;
	if ((rc = send_opt(fd, FERRY_NBD_OPT_STRUCTURED_REPLY, NULL, 0, err)) ||
	    (rc = read_opt_reply(fd, FERRY_NBD_OPT_STRUCTURED_REPLY, &type, &data, &len, err)))
		return rc;
	free(data);
	neg->structured = type == FERRY_NBD_REP_ACK;

	uint8_t *b = malloc(4 + nl + 4 + 4 + 32 + 2);
	if (!b)
		return ferry_err_set(err, ENOMEM, "out of memory");
	if (neg->structured) {
		size_t ql = strlen(FERRY_NBD_META_BASE_ALLOCATION);
		ferry_nbd_put32(b, (uint32_t)nl);
		memcpy(b + 4, name, nl);
		ferry_nbd_put32(b + 4 + nl, 1);
		ferry_nbd_put32(b + 8 + nl, (uint32_t)ql);
		memcpy(b + 12 + nl, FERRY_NBD_META_BASE_ALLOCATION, ql);
		rc = send_opt(fd, FERRY_NBD_OPT_SET_META_CONTEXT, b, (uint32_t)(12 + nl + ql), err);
		while (!rc) {
			if ((rc = read_opt_reply(fd, FERRY_NBD_OPT_SET_META_CONTEXT, &type, &data, &len, err)))
				break;
			if (type == FERRY_NBD_REP_META_CONTEXT && len >= 4 && len - 4 == ql &&
			    memcmp(data + 4, FERRY_NBD_META_BASE_ALLOCATION, ql) == 0) {
				neg->meta_alloc = true;
				neg->meta_id = ferry_nbd_get32(data);
			}
			free(data);
			if (type != FERRY_NBD_REP_META_CONTEXT)
				break; /* ACK, or an error: then no context */
		}
		if (rc) {
			free(b);
			return rc;
		}
	}
	info->base_allocation = neg->meta_alloc;

	ferry_nbd_put32(b, (uint32_t)nl);
	memcpy(b + 4, name, nl);
	ferry_nbd_put16(b + 4 + nl, 1);
	ferry_nbd_put16(b + 6 + nl, FERRY_NBD_INFO_BLOCK_SIZE);
	rc = send_opt(fd, FERRY_NBD_OPT_GO, b, (uint32_t)(8 + nl), err);
	free(b);
	bool have_export = false;
	while (!rc) {
		if ((rc = read_opt_reply(fd, FERRY_NBD_OPT_GO, &type, &data, &len, err)))
			break;
		if (type == FERRY_NBD_REP_INFO && len >= 2) {
			uint16_t it = ferry_nbd_get16(data);
			if (it == FERRY_NBD_INFO_EXPORT && len == 12) {
				info->size = ferry_nbd_get64(data + 2);
				info->flags = ferry_nbd_get16(data + 10);
				have_export = true;
			} else if (it == FERRY_NBD_INFO_BLOCK_SIZE && len == 14) {
				info->min_block = ferry_nbd_get32(data + 2);
				info->pref_block = ferry_nbd_get32(data + 6);
				info->max_block = ferry_nbd_get32(data + 10);
			}
			free(data);
			continue;
		}
		if (type == FERRY_NBD_REP_ACK) {
			free(data);
			if (!have_export)
				rc = ferry_err_set(err, EPROTO, "server ended NBD_OPT_GO without the export's size");
			break;
		}
		if (type == FERRY_NBD_REP_ERR_UNSUP) {
			free(data);
			rc = client_export_name(fd, name, info, neg->no_zeroes, err);
			break;
		}
		if (type & 0x80000000u)
			rc = opt_failed(FERRY_NBD_OPT_GO, type, data, err);
		free(data);
	}
	if (!rc && !(info->flags & FERRY_NBD_FLAG_HAS_FLAGS))
		info->flags = FERRY_NBD_FLAG_HAS_FLAGS;
	return rc;
}

int ferry_nbd_read_reply(int fd, struct ferry_nbd_reply *r, struct ferry_err *err)
{
	uint8_t h[FERRY_NBD_CHUNK_LEN];
	int rc = ferry_nbd_read_full(fd, h, 4, err);
	if (rc)
		return rc;
	uint32_t magic = ferry_nbd_get32(h);
	memset(r, 0, sizeof(*r));
	if (magic == FERRY_NBD_SIMPLE_MAGIC) {
		if ((rc = ferry_nbd_read_full(fd, h + 4, FERRY_NBD_SIMPLE_LEN - 4, err)))
			return rc;
		r->error = ferry_nbd_get32(h + 4);
		r->cookie = ferry_nbd_get64(h + 8);
		return 0;
	}
	if (magic != FERRY_NBD_STRUCTURED_MAGIC)
		return ferry_err_set(err, EPROTO, "server reply with bad magic 0x%08x", magic);
	if ((rc = ferry_nbd_read_full(fd, h + 4, FERRY_NBD_CHUNK_LEN - 4, err)))
		return rc;
	r->structured = true;
	r->flags = ferry_nbd_get16(h + 4);
	r->type = ferry_nbd_get16(h + 6);
	r->cookie = ferry_nbd_get64(h + 8);
	r->length = ferry_nbd_get32(h + 16);
	if (r->length > FERRY_NBD_MAX_PAYLOAD + 64 && r->type != FERRY_NBD_REPLY_TYPE_BLOCK_STATUS)
		return ferry_err_set(err, EPROTO, "server reply chunk of %u bytes is too large", r->length);
	if (r->type == FERRY_NBD_REPLY_TYPE_BLOCK_STATUS && r->length > 4 + 8ull * FERRY_NBD_MAX_EXTENTS)
		return ferry_err_set(err, EPROTO, "server block status of %u bytes is too large", r->length);
	return 0;
}

/* ---- block messages ---- */

void ferry_blk_req_encode(const struct ferry_blk_req *r, uint8_t out[FERRY_BLK_REQ_LEN])
{
	ferry_nbd_put32(out, FERRY_BLK_REQ_MAGIC);
	ferry_nbd_put16(out + 4, r->type);
	ferry_nbd_put16(out + 6, r->flags);
	ferry_nbd_put64(out + 8, r->handle);
	ferry_nbd_put64(out + 16, r->offset);
	ferry_nbd_put32(out + 24, r->length);
	ferry_nbd_put32(out + 28, 0);
}

int ferry_blk_req_decode(const uint8_t in[FERRY_BLK_REQ_LEN], struct ferry_blk_req *r, struct ferry_err *err)
{
	if (ferry_nbd_get32(in) != FERRY_BLK_REQ_MAGIC)
		return ferry_err_set(err, EPROTO, "block request with bad magic 0x%08x", ferry_nbd_get32(in));
	r->type = ferry_nbd_get16(in + 4);
	r->flags = ferry_nbd_get16(in + 6);
	r->handle = ferry_nbd_get64(in + 8);
	r->offset = ferry_nbd_get64(in + 16);
	r->length = ferry_nbd_get32(in + 24);
	if (ferry_nbd_get32(in + 28))
		return ferry_err_set(err, EPROTO, "block request with non-zero reserved field");
	if (r->type == FERRY_NBD_CMD_WRITE && r->length > FERRY_NBD_MAX_PAYLOAD)
		return ferry_err_set(err, EPROTO, "block WRITE of %u bytes is over the maximum", r->length);
	return 0;
}

void ferry_blk_rep_encode(const struct ferry_blk_rep *r, uint8_t out[FERRY_BLK_REP_LEN])
{
	ferry_nbd_put32(out, FERRY_BLK_REP_MAGIC);
	ferry_nbd_put32(out + 4, r->error);
	ferry_nbd_put64(out + 8, r->handle);
	ferry_nbd_put32(out + 16, r->length);
	ferry_nbd_put32(out + 20, 0);
}

int ferry_blk_rep_decode(const uint8_t in[FERRY_BLK_REP_LEN], struct ferry_blk_rep *r, struct ferry_err *err)
{
	if (ferry_nbd_get32(in) != FERRY_BLK_REP_MAGIC)
		return ferry_err_set(err, EPROTO, "block reply with bad magic 0x%08x", ferry_nbd_get32(in));
	r->error = ferry_nbd_get32(in + 4);
	r->handle = ferry_nbd_get64(in + 8);
	r->length = ferry_nbd_get32(in + 16);
	if (ferry_nbd_get32(in + 20))
		return ferry_err_set(err, EPROTO, "block reply with non-zero reserved field");
	/* READ data plus its segment headers, or block-status extents. */
	if (r->length > FERRY_NBD_MAX_PAYLOAD + 8ull * FERRY_NBD_MAX_EXTENTS + 8)
		return ferry_err_set(err, EPROTO, "block reply of %u bytes is over the maximum", r->length);
	return 0;
}

void ferry_blk_seg_encode(uint32_t kind, uint32_t length, uint8_t out[FERRY_BLK_SEG_LEN])
{
	ferry_nbd_put32(out, kind);
	ferry_nbd_put32(out + 4, length);
}

void ferry_blk_seg_decode(const uint8_t in[FERRY_BLK_SEG_LEN], uint32_t *kind, uint32_t *length)
{
	*kind = ferry_nbd_get32(in);
	*length = ferry_nbd_get32(in + 4);
}
