/* ferry wire format: the fixed frame header every driver carries.
 * Documented in docs/wire-format.md. Drivers may use this module (it is the
 * wire, not the data plane); nothing else of the data plane. */
#ifndef FERRY_WIRE_H
#define FERRY_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define FERRY_WIRE_MAGIC       0x46525931u /* "FRY1" */
#define FERRY_WIRE_VERSION     1
#define FERRY_WIRE_HDR_LEN     32
#define FERRY_WIRE_MAX_PAYLOAD (1u << 20)  /* 1 MiB: large frames keep per-frame cost low */
#define FERRY_WIRE_MAX_CTRL    4096        /* control frames carry small payloads only */
#define FERRY_WIRE_REGION_KEY_LEN 16       /* REGION_KEY payload: be64 rkey, be64 region length */

enum ferry_frame_type {
	FERRY_FT_HELLO = 1,        /* lane handshake: stream = lane index, payload = session token */
	FERRY_FT_HELLO_ACK = 2,    /* receiver accepted the lane */
	FERRY_FT_OPEN = 3,         /* a stream starts (sent on the stream's lane before its data) */
	FERRY_FT_OPEN_ACK = 4,     /* destination connected the stream's local end */
	FERRY_FT_DATA = 5,         /* stream bytes; seq = stream offset of the first payload byte */
	FERRY_FT_CREDIT = 6,       /* seq = cumulative bytes the receiver has consumed */
	FERRY_FT_FIN = 7,          /* no more bytes in this direction; seq = final byte count */
	FERRY_FT_RESET = 8,        /* stream (stream != ANY) or session abort; payload = reason text */
	FERRY_FT_REGION_WRITE = 9, /* stream = region id, seq = byte offset in the region */
	FERRY_FT_REGION_FENCE = 10,/* seq = fence token; answered once all earlier writes landed */
	FERRY_FT_REGION_FENCE_ACK = 11,
	FERRY_FT_REGION_KEY = 12,  /* one-sided drivers: stream = region id, seq = its address, payload = rkey, length */
	FERRY_FT_MAX_
};

#define FERRY_STREAM_ANY 0xffffffffu

/* flags */
#define FERRY_FF_PAYLOAD_CRC 0x0001u /* header check also covers the payload (datagram drivers) */
#define FERRY_FF_HANDOFF     0x0002u /* HELLO only: after the handshake the connection is handed to QEMU */
#define FERRY_FF_KNOWN       (FERRY_FF_PAYLOAD_CRC | FERRY_FF_HANDOFF)

struct ferry_frame_hdr {
	uint8_t type;
	uint16_t flags;
	uint32_t session;
	uint32_t stream;
	uint64_t seq;
	uint32_t length;
};

/* Encode hdr into 32 bytes, big-endian, with a CRC32C over the header
 * (and over payload when FERRY_FF_PAYLOAD_CRC and payload given). */
void ferry_wire_encode(const struct ferry_frame_hdr *hdr, const void *payload,
		       uint8_t out[FERRY_WIRE_HDR_LEN]);

/* Decode and validate a header: magic, version, check, type, flags, length
 * bound for the type. Returns 0 or -EPROTO/-EBADMSG with a message naming the
 * field. Payload CRC (if flagged) is verified separately with
 * ferry_wire_check_payload once the payload is in memory. */
int ferry_wire_decode(const uint8_t in[FERRY_WIRE_HDR_LEN], struct ferry_frame_hdr *hdr,
		      struct ferry_err *err);

int ferry_wire_check_payload(const uint8_t in[FERRY_WIRE_HDR_LEN], const void *payload,
			     size_t len, struct ferry_err *err);

const char *ferry_wire_type_name(unsigned type);

uint32_t ferry_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
