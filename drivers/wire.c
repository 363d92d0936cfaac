#include "wire.h"

#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>

static const char *const type_names[FERRY_FT_MAX_] = {
	[FERRY_FT_HELLO] = "HELLO",
	[FERRY_FT_HELLO_ACK] = "HELLO_ACK",
	[FERRY_FT_OPEN] = "OPEN",
	[FERRY_FT_OPEN_ACK] = "OPEN_ACK",
	[FERRY_FT_DATA] = "DATA",
	[FERRY_FT_CREDIT] = "CREDIT",
	[FERRY_FT_FIN] = "FIN",
	[FERRY_FT_RESET] = "RESET",
	[FERRY_FT_REGION_WRITE] = "REGION_WRITE",
	[FERRY_FT_REGION_FENCE] = "REGION_FENCE",
	[FERRY_FT_REGION_FENCE_ACK] = "REGION_FENCE_ACK",
	[FERRY_FT_REGION_KEY] = "REGION_KEY",
};

const char *ferry_wire_type_name(unsigned type)
{
	if (type < FERRY_FT_MAX_ && type_names[type])
		return type_names[type];
	return "UNKNOWN";
}

/* CRC32C (Castagnoli). The SSE4.2 instruction when the CPU has it, a table otherwise. */
static uint32_t crc_table[256];

static void crc_table_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

#if defined(__x86_64__)
/*
 * The crc32 instruction has a latency of three cycles and a throughput of
 * one, so a single dependency chain runs at a third of what the unit can do.
 * Long buffers are cut into three blocks whose CRCs run side by side, then
 * joined: a block's CRC is carried over the bytes that follow it by a
 * "append N zero bytes" operator (linear over GF(2)), kept as four byte
 * tables per block size.
 */
enum { CRC_LONG = 2048, CRC_SHORT = 256 };
static uint32_t crc_shift_long[4][256], crc_shift_short[4][256];
static pthread_once_t crc_shift_once = PTHREAD_ONCE_INIT;

/* mat: 32 columns, the operator's image of each bit of the register */
static uint32_t gf2_apply(const uint32_t *mat, uint32_t vec)
{
	uint32_t sum = 0;
	for (; vec; vec >>= 1, mat++)
		if (vec & 1)
			sum ^= *mat;
	return sum;
}

static void gf2_compose(uint32_t *out, const uint32_t *a, const uint32_t *b) /* out = a after b */
{
	uint32_t tmp[32];
	for (int n = 0; n < 32; n++)
		tmp[n] = gf2_apply(a, b[n]);
	memcpy(out, tmp, sizeof(tmp));
}

static void crc_shift_table(uint32_t table[4][256], size_t nbytes)
{
	uint32_t step[32], op[32];
	/* one zero bit on the reflected register: bit 0 folds in the polynomial */
	step[0] = 0x82f63b78u;
	for (int n = 1; n < 32; n++)
		step[n] = 1u << (n - 1);
	for (int i = 0; i < 3; i++) /* 1 bit -> 8 bits */
		gf2_compose(step, step, step);
	for (int n = 0; n < 32; n++)
		op[n] = 1u << n;
	for (; nbytes; nbytes >>= 1) { /* op = step^nbytes by squaring */
		if (nbytes & 1)
			gf2_compose(op, step, op);
		gf2_compose(step, step, step);
	}
	for (int k = 0; k < 4; k++)
		for (uint32_t i = 0; i < 256; i++)
			table[k][i] = gf2_apply(op, i << (8 * k));
}

static void crc_shift_init(void)
{
	crc_shift_table(crc_shift_long, CRC_LONG);
	crc_shift_table(crc_shift_short, CRC_SHORT);
}

static uint32_t crc_shift(uint32_t table[4][256], uint32_t crc)
{
	return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^
	       table[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw3(uint32_t crc, const uint8_t **pp, size_t *lenp, size_t block, uint32_t table[4][256])
{
	const uint8_t *p = *pp;
	size_t len = *lenp;
	while (len >= 3 * block) {
		uint64_t c0 = crc, c1 = 0, c2 = 0;
		for (size_t i = 0; i < block; i += 8) {
			uint64_t v0, v1, v2;
			memcpy(&v0, p + i, 8);
			memcpy(&v1, p + block + i, 8);
			memcpy(&v2, p + 2 * block + i, 8);
			c0 = __builtin_ia32_crc32di(c0, v0);
			c1 = __builtin_ia32_crc32di(c1, v1);
			c2 = __builtin_ia32_crc32di(c2, v2);
		}
		crc = crc_shift(table, (uint32_t)c0) ^ (uint32_t)c1;
		crc = crc_shift(table, crc) ^ (uint32_t)c2;
		p += 3 * block;
		len -= 3 * block;
	}
	*pp = p;
	*lenp = len;
	return crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len)
{
	if (len >= 3 * CRC_SHORT) {
		pthread_once(&crc_shift_once, crc_shift_init);
		crc = crc32c_hw3(crc, &p, &len, CRC_LONG, crc_shift_long);
		crc = crc32c_hw3(crc, &p, &len, CRC_SHORT, crc_shift_short);
	}
	uint64_t c = crc;
	while (len >= 8) {
		uint64_t v;
		memcpy(&v, p, 8);
		c = __builtin_ia32_crc32di(c, v);
		p += 8;
		len -= 8;
	}
	uint32_t c32 = (uint32_t)c;
	while (len--)
		c32 = __builtin_ia32_crc32qi(c32, *p++);
	return c32;
}
#endif

uint32_t ferry_crc32c(uint32_t crc, const void *buf, size_t len)
{
	static int mode_cache; /* 0 unknown, 1 sw, 2 hw; racing initialisers agree */
	int mode = __atomic_load_n(&mode_cache, __ATOMIC_ACQUIRE);
	crc = ~crc;
	if (!mode) {
#if defined(__x86_64__)
		__builtin_cpu_init();
		if (__builtin_cpu_supports("sse4.2")) {
			mode = 2;
		} else
#endif
		{
			crc_table_init();
			mode = 1;
		}
		__atomic_store_n(&mode_cache, mode, __ATOMIC_RELEASE);
	}
#if defined(__x86_64__)
	if (mode == 2)
		return ~crc32c_hw(crc, buf, len);
#endif
	return ~crc32c_sw(crc, buf, len);
}

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* Layout: magic 0-3, version 4, type 5, flags 6-7, session 8-11, stream 12-15,
 * seq 16-23, length 24-27, check 28-31. */
void ferry_wire_encode(const struct ferry_frame_hdr *hdr, const void *payload,
		       uint8_t out[FERRY_WIRE_HDR_LEN])
{
	put32(out, FERRY_WIRE_MAGIC);
	out[4] = FERRY_WIRE_VERSION;
	out[5] = hdr->type;
	put16(out + 6, hdr->flags);
	put32(out + 8, hdr->session);
	put32(out + 12, hdr->stream);
	put64(out + 16, hdr->seq);
	put32(out + 24, hdr->length);
	uint32_t crc = ferry_crc32c(0, out, 28);
	if ((hdr->flags & FERRY_FF_PAYLOAD_CRC) && payload)
		crc = ferry_crc32c(crc, payload, hdr->length);
	put32(out + 28, crc);
}

static uint32_t max_len_for(unsigned type)
{
	switch (type) {
	case FERRY_FT_DATA:
	case FERRY_FT_REGION_WRITE:
		return FERRY_WIRE_MAX_PAYLOAD;
	case FERRY_FT_HELLO:
	case FERRY_FT_RESET:
		return FERRY_WIRE_MAX_CTRL;
	case FERRY_FT_REGION_KEY:
		return FERRY_WIRE_REGION_KEY_LEN;
	default:
		return 0;
	}
}

int ferry_wire_decode(const uint8_t in[FERRY_WIRE_HDR_LEN], struct ferry_frame_hdr *hdr,
		      struct ferry_err *err)
{
	uint32_t magic = get32(in);
	if (magic != FERRY_WIRE_MAGIC)
		return ferry_err_set(err, EPROTO, "bad frame magic 0x%08x (expected 0x%08x): peer is not ferry or the stream is out of sync",
				     magic, FERRY_WIRE_MAGIC);
	if (in[4] != FERRY_WIRE_VERSION)
		return ferry_err_set(err, EPROTO, "unsupported frame version %u (this ferry speaks %u)",
				     in[4], FERRY_WIRE_VERSION);
	hdr->type = in[5];
	hdr->flags = get16(in + 6);
	hdr->session = get32(in + 8);
	hdr->stream = get32(in + 12);
	hdr->seq = get64(in + 16);
	hdr->length = get32(in + 24);
	if (!(hdr->flags & FERRY_FF_PAYLOAD_CRC)) {
		uint32_t want = get32(in + 28);
		uint32_t got = ferry_crc32c(0, in, 28);
		if (want != got)
			return ferry_err_set(err, EBADMSG, "frame header checksum mismatch (0x%08x != 0x%08x)", got, want);
	}
	if (hdr->type == 0 || hdr->type >= FERRY_FT_MAX_)
		return ferry_err_set(err, EPROTO, "unknown frame type %u", hdr->type);
	if (hdr->flags & ~FERRY_FF_KNOWN)
		return ferry_err_set(err, EPROTO, "%s frame has unknown flags 0x%04x",
				     ferry_wire_type_name(hdr->type), hdr->flags & ~FERRY_FF_KNOWN);
	if ((hdr->flags & FERRY_FF_HANDOFF) && hdr->type != FERRY_FT_HELLO)
		return ferry_err_set(err, EPROTO, "%s frame carries the HELLO-only handoff flag",
				     ferry_wire_type_name(hdr->type));
	uint32_t max = max_len_for(hdr->type);
	if (hdr->length > max)
		return ferry_err_set(err, EMSGSIZE, "%s frame length %u exceeds the limit %u",
				     ferry_wire_type_name(hdr->type), hdr->length, max);
	if (hdr->type == FERRY_FT_DATA && hdr->length == 0)
		return ferry_err_set(err, EPROTO, "DATA frame with zero length");
	return 0;
}

int ferry_wire_check_payload(const uint8_t in[FERRY_WIRE_HDR_LEN], const void *payload,
			     size_t len, struct ferry_err *err)
{
	if (!(get16(in + 6) & FERRY_FF_PAYLOAD_CRC))
		return 0;
	uint32_t want = get32(in + 28);
	uint32_t got = ferry_crc32c(ferry_crc32c(0, in, 28), payload, len);
	if (want != got)
		return ferry_err_set(err, EBADMSG, "frame checksum mismatch over header and payload");
	return 0;
}
