/* The XML migration cookie: what the two daemons tell each other about a
 * migration (which VM, from which host, which mandatory features, optional
 * capabilities, the offered transports, the disks to copy, statistics).
 *
 * A cookie is a struct ferry_cookie: four mandatory identity fields, a set of
 * mandatory features, and optional parts whose presence is said by `flags`.
 * ferry_cookie_format() turns it into XML (root <ferry-migration>, see
 * docs/cookie.md and docs/cookie.rng); ferry_cookie_parse() reads one back.
 *
 * A cookie from the peer is untrusted input. The parser refuses anything over
 * FERRY_COOKIE_MAX_BYTES, any DOCTYPE (so no entities, internal or external),
 * never touches the network, bounds every string and count, and names the
 * offending element/attribute and value in its error message.
 *
 * Compatibility: unknown optional elements and attributes are ignored (an
 * older daemon reads a newer cookie); an unknown <feature> is rejected (the
 * writer said the reader must understand it); unknown <cap> names are kept.
 *
 * The struct holds no pointers (about 10 KiB): it can live on the stack,
 * be copied with memcpy, and ferry_cookie_clear() only zeroes it. */
#ifndef FERRY_COOKIE_H
#define FERRY_COOKIE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../drivers/err.h"

#define FERRY_COOKIE_MAX_BYTES     65536u /* whole XML document */
#define FERRY_COOKIE_NAME_MAX      256    /* VM name, in characters (UTF-8) */
#define FERRY_COOKIE_HOSTNAME_MAX  255    /* bytes, printable ASCII, no space */
#define FERRY_COOKIE_UUID_LEN      36     /* canonical 8-4-4-4-12 hex form */
#define FERRY_COOKIE_TOKEN_MAX     64     /* feature / capability name, bytes */
#define FERRY_COOKIE_ENDPOINT_MAX  256    /* driver endpoint, bytes */
#define FERRY_COOKIE_TARGET_MAX    32     /* disk target ("vda"), bytes */
#define FERRY_COOKIE_SOCKET_MAX    107    /* NBD unix socket path (fits sun_path) */
#define FERRY_COOKIE_MAX_FEATURES  32
#define FERRY_COOKIE_MAX_CAPS      64
#define FERRY_COOKIE_MAX_DRIVERS   8
#define FERRY_COOKIE_MAX_DISKS     64
#define FERRY_COOKIE_MAX_BLOCKDEVS 64
#define FERRY_COOKIE_MAX_VCPUS     4096
#define FERRY_COOKIE_MAX_ARGS      512    /* QEMU command line: arguments */
#define FERRY_COOKIE_ARG_MAX       4096   /* bytes of one argument */
#define FERRY_COOKIE_CMDLINE_MAX   16384  /* bytes of all arguments, each with its NUL */

/* Mandatory features (ferry_cookie.features): the reader must understand
 * every one the writer lists. */
enum {
	FERRY_COOKIE_FEAT_MULTIFD        = 1u << 0, /* "multifd" */
	FERRY_COOKIE_FEAT_NBD            = 1u << 1, /* "nbd" */
	FERRY_COOKIE_FEAT_POSTCOPY_SETUP = 1u << 2, /* "postcopy-setup" */
	FERRY_COOKIE_FEAT_TLS            = 1u << 3, /* "tls" */
};
#define FERRY_COOKIE_FEAT_ALL 0xfu

/* Optional parts present (ferry_cookie.flags). */
enum {
	FERRY_COOKIE_CAPS      = 1u << 0, /* <capabilities> */
	FERRY_COOKIE_TRANSPORT = 1u << 1, /* <transport> */
	FERRY_COOKIE_NBD       = 1u << 2, /* <nbd> */
	FERRY_COOKIE_STATS     = 1u << 3, /* <statistics> */
	FERRY_COOKIE_VM        = 1u << 4, /* <vm>: what the VM is made of */
};
#define FERRY_COOKIE_FLAGS_ALL 0x1fu

enum ferry_cookie_driver_kind {
	FERRY_COOKIE_DRIVER_TCP = 1,
	FERRY_COOKIE_DRIVER_DPDK,
	FERRY_COOKIE_DRIVER_RDMA,
};

struct ferry_cookie_driver {
	enum ferry_cookie_driver_kind kind;
	char endpoint[FERRY_COOKIE_ENDPOINT_MAX + 1]; /* printable ASCII, no space */
	bool handoff;
};

struct ferry_cookie_disk {
	char target[FERRY_COOKIE_TARGET_MAX + 1]; /* [A-Za-z0-9_-]+ */
	uint64_t capacity;                        /* bytes */
};

/* A block device of the VM: QEMU's device name and its size. */
struct ferry_cookie_blockdev {
	char name[FERRY_COOKIE_TOKEN_MAX + 1];    /* [A-Za-z0-9._-]{1,64} */
	uint64_t capacity;                        /* bytes */
};

/* FERRY_COOKIE_VM: the VM's shape, so a destination QEMU that is not the same
 * machine is refused before anything moves. */
struct ferry_cookie_vm {
	uint64_t memory;                          /* bytes of base RAM, > 0 */
	uint64_t vcpus;                           /* 1..FERRY_COOKIE_MAX_VCPUS */
	char machine[FERRY_COOKIE_TOKEN_MAX + 1]; /* QEMU machine type, [A-Za-z0-9._-] */
	size_t nblockdevs;
	struct ferry_cookie_blockdev blockdevs[FERRY_COOKIE_MAX_BLOCKDEVS]; /* unique names */
	/* <qemu-cmdline>: the source QEMU's argv (argv[0] first), so a
	 * destination can start its own QEMU from it. nargs == 0: absent. The
	 * arguments lie one after the other in cmdline, each ending in a NUL
	 * (cmdline_len bytes in all); each is UTF-8 without control characters.
	 * From the peer: a destination sanitizes it (spawn.h) before any use. */
	size_t nargs;
	size_t cmdline_len;
	char cmdline[FERRY_COOKIE_CMDLINE_MAX];
};

struct ferry_cookie_stats {
	uint64_t ram_total;        /* bytes */
	uint64_t ram_transferred;  /* bytes */
	uint64_t total_time_ms;
	uint64_t setup_time_ms;
	uint64_t downtime_ms;
};

struct ferry_cookie {
	/* Mandatory identity. */
	char name[FERRY_COOKIE_NAME_MAX * 4 + 1];      /* UTF-8, no control chars, no '/' */
	char uuid[FERRY_COOKIE_UUID_LEN + 1];          /* VM UUID (parse: lower case) */
	char hostname[FERRY_COOKIE_HOSTNAME_MAX + 1];
	char hostuuid[FERRY_COOKIE_UUID_LEN + 1];      /* host UUID (parse: lower case) */

	uint32_t features;  /* FERRY_COOKIE_FEAT_* */
	uint32_t flags;     /* FERRY_COOKIE_CAPS etc.: which parts below are present */

	/* FERRY_COOKIE_CAPS: capability names, [A-Za-z0-9._-]{1,64}, unique;
	 * names this version does not know are kept. */
	size_t ncaps;
	char caps[FERRY_COOKIE_MAX_CAPS][FERRY_COOKIE_TOKEN_MAX + 1];

	/* FERRY_COOKIE_TRANSPORT: the offered drivers, one per kind at most. */
	size_t ndrivers;
	struct ferry_cookie_driver drivers[FERRY_COOKIE_MAX_DRIVERS];

	/* FERRY_COOKIE_NBD: where the NBD server listens (a TCP port, or a unix
	 * socket path, or neither) and the disks to copy (unique targets). A
	 * socket path comes from the peer: confine it before using it. */
	struct {
		uint16_t port;                              /* 0 = none */
		char socket[FERRY_COOKIE_SOCKET_MAX + 1];   /* "" = none; absolute */
		size_t ndisks;
		struct ferry_cookie_disk disks[FERRY_COOKIE_MAX_DISKS];
	} nbd;

	/* FERRY_COOKIE_STATS: fields absent from a parsed cookie read as 0. */
	struct ferry_cookie_stats stats;

	/* FERRY_COOKIE_VM */
	struct ferry_cookie_vm vm;
};

/* Refuse a destination VM whose shape differs from the source's (both
 * cookies carry <vm>): memory, vCPUs, machine type, and every source block
 * device present with at least its size. -EINVAL naming the difference; 0
 * when either cookie lacks <vm> (an older peer: nothing to compare). */
int ferry_cookie_check_shape(const struct ferry_cookie *src, const struct ferry_cookie *dst, struct ferry_err *err);

/* Whether n bytes at s may be one <arg> of <qemu-cmdline>. */
bool ferry_cookie_arg_ok(const char *s, size_t n);

/* Zero the cookie (an empty cookie: no features, no optional parts). */
void ferry_cookie_clear(struct ferry_cookie *c);

/* Serialize c as a <ferry-migration> document (NUL-terminated UTF-8, no XML
 * declaration). *xml_out is malloc'ed; the caller frees it. Only the parts
 * in c->flags are written (and validated). Every field is validated with the
 * parser's rules first, so the output always parses back to the same cookie
 * (UUIDs are written in lower case): an invalid field is -EINVAL naming it;
 * out of memory is -ENOMEM. On error *xml_out is NULL. */
int ferry_cookie_format(const struct ferry_cookie *c, char **xml_out, struct ferry_err *err);

/* Parse len bytes of untrusted XML (need not be NUL-terminated) into *out.
 * Errors: -EMSGSIZE over FERRY_COOKIE_MAX_BYTES ("cookie larger than 65536
 * bytes"); -EOPNOTSUPP for an unknown mandatory feature (the message names
 * it); -EPROTO for anything else malformed (not UTF-8, not well-formed XML,
 * a DOCTYPE, a missing/duplicate/invalid element or attribute, a count over
 * its limit), naming what was wrong; -ENOMEM; -EINVAL for NULL arguments.
 * On error *out is cleared. */
int ferry_cookie_parse(const char *xml, size_t len, struct ferry_cookie *out, struct ferry_err *err);

/* Refuse to go on with a peer's cookie: -EINVAL if it is for another VM
 * (uuid or name differs: "cookie is for VM X ..., this migration is for Y
 * ...") or comes from this very host (same hostuuid). */
int ferry_cookie_check_peer(const struct ferry_cookie *mine, const struct ferry_cookie *theirs,
			    struct ferry_err *err);

/* Keep a copy of a cookie this daemon sent, as DIR/NAME.xml (mode 0600), for
 * an operator who wants to see what the daemons told each other (ferryd
 * --cookie-log). */
int ferry_cookie_save(const char *dir, const char *name, const char *xml, struct ferry_err *err);

/* Whether the cookie has the optional part <capabilities> listing name. */
bool ferry_cookie_has_cap(const struct ferry_cookie *c, const char *name);

/* "multifd" for FERRY_COOKIE_FEAT_MULTIFD etc.; NULL for anything else. */
const char *ferry_cookie_feature_name(uint32_t feature);

/* "tcp", "dpdk", "rdma"; NULL for anything else. */
const char *ferry_cookie_driver_name(enum ferry_cookie_driver_kind kind);
/* The kind named "tcp", "dpdk" or "rdma"; 0 for anything else (or NULL). */
enum ferry_cookie_driver_kind ferry_cookie_driver_kind(const char *name);

#endif
