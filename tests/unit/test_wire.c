/* Framing: encode/decode round trips and every validation on receipt. */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "drivers/wire.h"

/* bit at a time, the definition itself: the reference for the fast paths */
static uint32_t crc32c_reference(const uint8_t *p, size_t len)
{
	uint32_t c = ~0u;
	while (len--) {
		c ^= *p++;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
	}
	return ~c;
}

/* lengths around every block boundary of the interleaved path, whole and split */
static void check_crc32c_lengths(void)
{
	static uint8_t buf[3 * 2048 * 2 + 3 * 256 + 100];
	uint32_t x = 12345;
	for (size_t i = 0; i < sizeof(buf); i++) {
		x = x * 1103515245u + 12345u;
		buf[i] = (uint8_t)(x >> 16);
	}
	static const size_t lens[] = { 0, 1, 7, 8, 767, 768, 769, 1000, 6143, 6144, 6145, 6144 + 768,
				       9000 - 3 * 2048 - 1, 8972, sizeof(buf) };
	int bad = 0;
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		size_t len = lens[i] <= sizeof(buf) ? lens[i] : sizeof(buf);
		for (size_t off = 0; off < 3; off++) { /* unaligned starts too */
			if (off + len > sizeof(buf))
				continue;
			uint32_t want = crc32c_reference(buf + off, len);
			if (ferry_crc32c(0, buf + off, len) != want)
				bad++;
			size_t cut = len / 3;
			if (ferry_crc32c(ferry_crc32c(0, buf + off, cut), buf + off + cut, len - cut) != want)
				bad++;
		}
	}
	CHECK(bad == 0, "crc32c equals the bitwise definition for every length and split (%d wrong)", bad);
}

static void reseal(uint8_t *b)
{
	/* recompute the header check after tampering with a field */
	uint32_t c = htobe32(ferry_crc32c(0, b, 28));
	memcpy(b + 28, &c, 4);
}

int main(void)
{
	struct ferry_err err = { 0 };
	struct ferry_frame_hdr in = { .type = FERRY_FT_DATA, .session = 0xdeadbeef, .stream = 3,
				      .seq = 0x0102030405060708ull, .length = 65536 };
	struct ferry_frame_hdr out;
	uint8_t b[FERRY_WIRE_HDR_LEN];

	/* CRC32C reference value ("123456789" -> 0xe3069283) */
	CHECK(ferry_crc32c(0, "123456789", 9) == 0xe3069283u, "crc32c matches the Castagnoli check value");
	CHECK(ferry_crc32c(ferry_crc32c(0, "12345", 5), "6789", 4) == 0xe3069283u, "crc32c continues across pieces");
	check_crc32c_lengths();

	ferry_wire_encode(&in, NULL, b);
	CHECK(ferry_wire_decode(b, &out, &err) == 0, "valid DATA header decodes");
	CHECK(out.type == in.type && out.session == in.session && out.stream == in.stream && out.seq == in.seq &&
	      out.length == in.length && out.flags == 0, "all fields round-trip");
	CHECK(b[0] == 'F' && b[1] == 'R' && b[2] == 'Y' && b[3] == '1', "magic is FRY1 on the wire (big-endian)");

	uint8_t t[FERRY_WIRE_HDR_LEN];
	memcpy(t, b, sizeof(t)); t[0] ^= 0xff;
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "bad magic rejected");
	CHECK_MSG(err, "magic", "message names the magic: %s", err.msg);

	memcpy(t, b, sizeof(t)); t[4] = 9; reseal(t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "unknown version rejected");
	CHECK_MSG(err, "version 9", "message names the version: %s", err.msg);

	memcpy(t, b, sizeof(t)); t[20] ^= 1; /* flip a seq bit, no reseal */
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EBADMSG, "corrupted header caught by its checksum");
	CHECK_MSG(err, "checksum", "message names the checksum: %s", err.msg);

	memcpy(t, b, sizeof(t)); t[5] = 200; reseal(t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "unknown type rejected");
	CHECK_MSG(err, "type 200", "message names the type: %s", err.msg);

	memcpy(t, b, sizeof(t)); t[5] = 0; reseal(t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "type 0 rejected");

	memcpy(t, b, sizeof(t)); t[6] = 0x80; reseal(t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "unknown flags rejected");
	CHECK_MSG(err, "flags", "message names the flags: %s", err.msg);

	struct ferry_frame_hdr big = in;
	big.length = FERRY_WIRE_MAX_PAYLOAD + 1;
	ferry_wire_encode(&big, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EMSGSIZE, "oversized DATA rejected");
	CHECK_MSG(err, "exceeds the limit", "message names the limit: %s", err.msg);

	big.length = FERRY_WIRE_MAX_PAYLOAD;
	ferry_wire_encode(&big, NULL, t);
	CHECK(ferry_wire_decode(t, &out, &err) == 0, "DATA of exactly the maximum accepted");

	struct ferry_frame_hdr credit = { .type = FERRY_FT_CREDIT, .session = 1, .stream = 1, .seq = 5, .length = 1 };
	ferry_wire_encode(&credit, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EMSGSIZE, "CREDIT with a payload rejected");

	struct ferry_frame_hdr reset = { .type = FERRY_FT_RESET, .session = 1, .stream = FERRY_STREAM_ANY,
					 .length = FERRY_WIRE_MAX_CTRL + 1 };
	ferry_wire_encode(&reset, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EMSGSIZE, "RESET reason over the control limit rejected");

	struct ferry_frame_hdr empty = { .type = FERRY_FT_DATA, .session = 1, .stream = 0, .length = 0 };
	ferry_wire_encode(&empty, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "zero-length DATA rejected");

	/* payload checksum for datagram drivers */
	uint8_t payload[100];
	for (unsigned i = 0; i < sizeof(payload); i++)
		payload[i] = (uint8_t)(i * 7);
	struct ferry_frame_hdr pc = { .type = FERRY_FT_DATA, .flags = FERRY_FF_PAYLOAD_CRC, .session = 9, .stream = 2,
				      .length = sizeof(payload) };
	ferry_wire_encode(&pc, payload, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == 0, "payload-checked header decodes");
	CHECK(ferry_wire_check_payload(t, payload, sizeof(payload), &err) == 0, "intact payload verifies");
	payload[50] ^= 4;
	CHECK(ferry_wire_check_payload(t, payload, sizeof(payload), &err) == -EBADMSG, "corrupted payload detected");

	struct ferry_frame_hdr ho = { .type = FERRY_FT_HELLO, .flags = FERRY_FF_HANDOFF, .session = 3, .length = 16 };
	ferry_wire_encode(&ho, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == 0 && (out.flags & FERRY_FF_HANDOFF), "HELLO may carry the handoff flag");
	ho.type = FERRY_FT_DATA;
	ferry_wire_encode(&ho, NULL, t);
	ferry_err_clear(&err);
	CHECK(ferry_wire_decode(t, &out, &err) == -EPROTO, "the handoff flag on any other frame is rejected");
	CHECK_MSG(err, "HELLO-only", "message: %s", err.msg);

	CHECK(strcmp(ferry_wire_type_name(FERRY_FT_REGION_WRITE), "REGION_WRITE") == 0, "type names");
	CHECK(strcmp(ferry_wire_type_name(250), "UNKNOWN") == 0, "unknown type name");
	CHECK_DONE();
}
