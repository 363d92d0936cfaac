/* Capability negotiation: from what each side (its daemon, its driver, its
 * QEMU, its configuration) can do and what the user asked for, the plan a
 * migration follows. Both daemons compute it with the same function from the
 * same two cookies, so they agree without another round trip; the
 * destination's reply carries the plan it set up, and the source checks that
 * it matches its own.
 *
 * A feature missing on either side falls back to the next best path and says
 * so in the plan's notes; only a feature the user required (--require) turns
 * a missing capability into an error. */
#ifndef FERRY_PLAN_H
#define FERRY_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "../drivers/err.h"
#include "cookie.h"

/* Optional features, by their cookie capability names. */
enum {
	FERRY_F_MULTIFD        = 1u << 0, /* "multifd": QEMU multifd channels, one stream each */
	FERRY_F_HANDOFF        = 1u << 1, /* "handoff": ferry's authenticated TCP connection given to QEMU */
	FERRY_F_NBD            = 1u << 2, /* "nbd": storage migration over NBD */
	FERRY_F_POSTCOPY       = 1u << 3, /* "postcopy" */
	FERRY_F_POSTCOPY_SETUP = 1u << 4, /* "postcopy-setup": set-up acknowledgement before the destination runs */
	FERRY_F_POSTCOPY_PREEMPT = 1u << 5, /* "postcopy-preempt": requested pages on their own channel and lane */
	/* "handoff-multifd": multifd channels straight from the source QEMU to a
	 * listener ferry gave the destination QEMU, pinned to the source host
	 * (controlplane/pinlisten.h) */
	FERRY_F_HANDOFF_MULTIFD = 1u << 6,
};
#define FERRY_F_ALL 0x7fu

#define FERRY_PLAN_MAX_NOTES 6

/* What one side can do. drivers: bit (1 << kind) per enum ferry_cookie_driver_kind. */
struct ferry_side_caps {
	uint32_t features;
	uint32_t drivers;
	uint32_t qemu; /* FERRY_F_* the QEMU itself offers, before the daemon's mask (local probes only) */
};

struct ferry_plan_request {
	enum ferry_cookie_driver_kind transport; /* 0: the best both sides have */
	unsigned channels;                       /* multifd channels wanted; 0: one stream */
	uint32_t require;                        /* FERRY_F_* the user insists on */
	bool no_handoff;                         /* keep ferry in the data path */
	bool postcopy;                           /* switch to postcopy during the migration */
	bool nbd;                                /* disks to migrate (--disk): storage migration over NBD */
};

struct ferry_plan {
	enum ferry_cookie_driver_kind transport;
	unsigned channels;   /* multifd channels used (0: single stream) */
	bool handoff;        /* QEMU's channels bypass ferry's lanes (one handed-over
	                      * connection, or multifd to a pinned listener) */
	uint32_t features;   /* FERRY_F_* in use */
	unsigned nnotes;
	char notes[FERRY_PLAN_MAX_NOTES][192]; /* each fallback taken, for the user */
};

/* How many streams the plan's migration opens: QEMU's main channel, its
 * multifd channels, and its postcopy-preempt channel. */
unsigned ferry_plan_streams(const struct ferry_plan *p);
/* "multifd" for FERRY_F_MULTIFD etc.; NULL for anything else. */
const char *ferry_feature_name(uint32_t feature);
/* The FERRY_F_* bit named name, or 0. */
uint32_t ferry_feature_parse(const char *name);
/* The FERRY_F_* bits as a JSON array of their names (new reference). */
json_t *ferry_features_json(uint32_t features);
/* Parse a comma-separated feature list ("multifd,handoff"); an unknown name
 * is -EINVAL naming it and the known ones. */
int ferry_feature_list_parse(const char *list, uint32_t *out, struct ferry_err *err);

/* Put caps into a cookie's <capabilities> (sets FERRY_COOKIE_CAPS). */
int ferry_caps_to_cookie(const struct ferry_side_caps *caps, struct ferry_cookie *c, struct ferry_err *err);
/* Read caps back from a peer's cookie: unknown capability names are ignored;
 * drivers come from its <transport>. */
void ferry_caps_from_cookie(const struct ferry_cookie *c, struct ferry_side_caps *out);

/* The best plan both sides support for the request, or an error naming the
 * required feature (or explicitly requested transport) that one side lacks,
 * and which side. */
int ferry_plan_choose(const struct ferry_side_caps *src, const struct ferry_side_caps *dst,
		      const struct ferry_plan_request *req, struct ferry_plan *out, struct ferry_err *err);

/* Whether two plans are the same choice (notes aside). */
bool ferry_plan_equal(const struct ferry_plan *a, const struct ferry_plan *b);

/* "tcp relay, 2 multifd channels" and the like. */
void ferry_plan_describe(const struct ferry_plan *p, char *buf, size_t len);

#endif
