#include "plan.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
	uint32_t bit;
	const char *name;
} features[] = {
	{ FERRY_F_MULTIFD, "multifd" },
	{ FERRY_F_HANDOFF, "handoff" },
	{ FERRY_F_NBD, "nbd" },
	{ FERRY_F_POSTCOPY, "postcopy" },
	{ FERRY_F_POSTCOPY_SETUP, "postcopy-setup" },
	{ FERRY_F_POSTCOPY_PREEMPT, "postcopy-preempt" },
	{ FERRY_F_HANDOFF_MULTIFD, "handoff-multifd" },
};
#define NFEATURES (sizeof(features) / sizeof(features[0]))

/* Best first: what "auto" picks when both sides have it. */
static const enum ferry_cookie_driver_kind transport_order[] = {
	FERRY_COOKIE_DRIVER_RDMA,
	FERRY_COOKIE_DRIVER_DPDK,
	FERRY_COOKIE_DRIVER_TCP,
};

const char *ferry_feature_name(uint32_t feature)
{
	for (size_t i = 0; i < NFEATURES; i++)
		if (features[i].bit == feature)
			return features[i].name;
	return NULL;
}

uint32_t ferry_feature_parse(const char *name)
{
	for (size_t i = 0; i < NFEATURES; i++)
		if (strcmp(features[i].name, name) == 0)
			return features[i].bit;
	return 0;
}

json_t *ferry_features_json(uint32_t f)
{
	json_t *a = json_array();
	for (size_t i = 0; a && i < NFEATURES; i++)
		if (f & features[i].bit)
			json_array_append_new(a, json_string(features[i].name));
	return a;
}

int ferry_feature_list_parse(const char *list, uint32_t *out, struct ferry_err *err)
{
	*out = 0;
	char buf[256];
	if (strlen(list) >= sizeof(buf))
		return ferry_err_set(err, EINVAL, "feature list too long");
	strcpy(buf, list);
	char *save = NULL;
	for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		uint32_t f = ferry_feature_parse(tok);
		if (!f)
			return ferry_err_set(err, EINVAL,
					     "unknown feature '%s' (known: multifd, handoff, nbd, postcopy, postcopy-setup, postcopy-preempt, handoff-multifd)", tok);
		*out |= f;
	}
	return 0;
}

int ferry_caps_to_cookie(const struct ferry_side_caps *caps, struct ferry_cookie *c, struct ferry_err *err)
{
	c->flags |= FERRY_COOKIE_CAPS;
	c->ncaps = 0;
	for (size_t i = 0; i < NFEATURES; i++) {
		if (!(caps->features & features[i].bit))
			continue;
		if (c->ncaps >= FERRY_COOKIE_MAX_CAPS)
			return ferry_err_set(err, E2BIG, "too many capabilities for a cookie");
		snprintf(c->caps[c->ncaps++], sizeof(c->caps[0]), "%s", features[i].name);
	}
	return 0;
}

void ferry_caps_from_cookie(const struct ferry_cookie *c, struct ferry_side_caps *out)
{
	out->features = 0;
	out->drivers = 0;
	out->qemu = 0; /* a peer's cookie says only what it offers */
	if (c->flags & FERRY_COOKIE_CAPS)
		for (size_t i = 0; i < c->ncaps; i++)
			out->features |= ferry_feature_parse(c->caps[i]);
	if (c->flags & FERRY_COOKIE_TRANSPORT)
		for (size_t i = 0; i < c->ndrivers; i++)
			out->drivers |= 1u << c->drivers[i].kind;
}

static void note(struct ferry_plan *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct ferry_plan *p, const char *fmt, ...)
{
	if (p->nnotes >= FERRY_PLAN_MAX_NOTES)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(p->notes[p->nnotes++], sizeof(p->notes[0]), fmt, ap);
	va_end(ap);
}

/* Which side lacks a feature, for messages. */
static const char *lacking(uint32_t src, uint32_t dst, uint32_t bit)
{
	if (!(src & bit) && !(dst & bit))
		return "neither side supports it";
	return !(src & bit) ? "the source does not support it" : "the destination does not support it";
}

static const char *driver_name(enum ferry_cookie_driver_kind k)
{
	const char *n = ferry_cookie_driver_name(k);
	return n ? n : "?";
}

int ferry_plan_choose(const struct ferry_side_caps *src, const struct ferry_side_caps *dst,
		      const struct ferry_plan_request *req, struct ferry_plan *out, struct ferry_err *err)
{
	memset(out, 0, sizeof(*out));
	uint32_t both = src->features & dst->features;

	/* Required features first: the user would rather fail than do without. */
	for (size_t i = 0; i < NFEATURES; i++) {
		uint32_t bit = features[i].bit;
		if ((req->require & bit) && !(both & bit))
			return ferry_err_set(err, ENOTSUP, "required feature '%s' is not available: %s", features[i].name,
					     lacking(src->features, dst->features, bit));
	}

	uint32_t common = src->drivers & dst->drivers;
	if (req->transport) {
		uint32_t bit = 1u << req->transport;
		if (!(common & bit)) {
			const char *tn = driver_name(req->transport);
			if (!(src->drivers & bit) && !(dst->drivers & bit))
				return ferry_err_set(err, ENOTSUP, "transport '%s' was asked for but neither side has the %s driver",
						     tn, tn);
			return ferry_err_set(err, ENOTSUP, "transport '%s' was asked for but the %s has no %s driver", tn,
					     !(src->drivers & bit) ? "source" : "destination", tn);
		}
		out->transport = req->transport;
	} else {
		for (size_t i = 0; i < sizeof(transport_order) / sizeof(transport_order[0]); i++) {
			if (common & (1u << transport_order[i])) {
				out->transport = transport_order[i];
				break;
			}
			if ((src->drivers | dst->drivers) & (1u << transport_order[i]))
				note(out, "transport %s: only the %s has it", driver_name(transport_order[i]),
				     (src->drivers & (1u << transport_order[i])) ? "source" : "destination");
		}
		if (!out->transport)
			return ferry_err_set(err, ENOTSUP, "the two sides have no transport driver in common");
	}

	if (req->channels > 0) {
		if (both & FERRY_F_MULTIFD) {
			out->channels = req->channels;
			out->features |= FERRY_F_MULTIFD;
		} else {
			note(out, "multifd: %s; migrating over a single channel",
			     lacking(src->features, dst->features, FERRY_F_MULTIFD));
		}
	}

	if (req->postcopy) {
		if (both & FERRY_F_POSTCOPY) {
			out->features |= FERRY_F_POSTCOPY;
			if (both & FERRY_F_POSTCOPY_SETUP)
				out->features |= FERRY_F_POSTCOPY_SETUP;
			/* QEMU 7.2 opens the preempt channel only to a socket
			 * address: ferry's guard is one (handoff gives an fd). */
			if ((both & FERRY_F_POSTCOPY_PREEMPT) && (both & FERRY_F_POSTCOPY_SETUP))
				out->features |= FERRY_F_POSTCOPY_PREEMPT;
			else if (both & FERRY_F_POSTCOPY_SETUP)
				note(out, "postcopy-preempt: %s; requested pages share the main channel",
				     lacking(src->features, dst->features, FERRY_F_POSTCOPY_PREEMPT));
			if (!(both & FERRY_F_POSTCOPY_SETUP))
				note(out, "postcopy-setup: %s; postcopy without the set-up acknowledgement",
				     lacking(src->features, dst->features, FERRY_F_POSTCOPY_SETUP));
		} else
			note(out, "postcopy: %s; migrating in precopy", lacking(src->features, dst->features, FERRY_F_POSTCOPY));
	}

	/* Disks can move only over NBD: without it on both sides there is no
	 * way to carry them, and a VM whose disks stay behind must not move. */
	if (req->nbd) {
		if (!(both & FERRY_F_NBD))
			return ferry_err_set(err, ENOTSUP, "storage migration (--disk) needs NBD on both sides and %s; the "
					     "listed disks cannot move otherwise, so the migration is refused",
					     lacking(src->features, dst->features, FERRY_F_NBD));
		out->features |= FERRY_F_NBD;
	}

	/* Over kernel TCP ferry gets out of QEMU's way, which saves every copy:
	 * one stream is handed over; multifd channels (which QEMU 7.2 opens
	 * only to an address) go to a listener pinned to the source host. */
	/* The set-up acknowledgement needs ferry to hold QEMU's channel. */
	bool guarded = out->features & FERRY_F_POSTCOPY_SETUP;
	if (out->transport == FERRY_COOKIE_DRIVER_TCP && !req->no_handoff && !guarded) {
		uint32_t need = FERRY_F_HANDOFF | (out->channels ? FERRY_F_HANDOFF_MULTIFD : 0);
		if ((both & need) == need) {
			out->handoff = true;
			out->features |= need;
		} else {
			uint32_t missing = !(both & FERRY_F_HANDOFF) ? FERRY_F_HANDOFF : FERRY_F_HANDOFF_MULTIFD;
			note(out, "%s: %s; ferry relays the stream%s", ferry_feature_name(missing),
			     lacking(src->features, dst->features, missing), out->channels ? "s" : "");
		}
	}
	if ((req->require & FERRY_F_HANDOFF) && !out->handoff)
		return ferry_err_set(err, ENOTSUP, "required feature 'handoff' needs kernel tcp on both sides%s",
				     guarded ? " and no postcopy set-up acknowledgement (ferry holds that channel)" : "");
	return 0;
}

unsigned ferry_plan_streams(const struct ferry_plan *p)
{
	return 1 + p->channels + ((p->features & FERRY_F_POSTCOPY_PREEMPT) ? 1 : 0);
}

bool ferry_plan_equal(const struct ferry_plan *a, const struct ferry_plan *b)
{
	return a->transport == b->transport && a->channels == b->channels && a->handoff == b->handoff &&
	       a->features == b->features;
}

void ferry_plan_describe(const struct ferry_plan *p, char *buf, size_t len)
{
	const char *pc = !(p->features & FERRY_F_POSTCOPY)            ? ""
			 : (p->features & FERRY_F_POSTCOPY_PREEMPT) ? ", postcopy (set-up acknowledged, preempt channel)"
			 : (p->features & FERRY_F_POSTCOPY_SETUP)   ? ", postcopy (set-up acknowledged)"
								    : ", postcopy";
	const char *disks = (p->features & FERRY_F_NBD) ? ", disks over nbd" : "";
	if (p->channels)
		snprintf(buf, len, "%s %s, %u multifd channel%s%s%s", driver_name(p->transport),
			 p->handoff ? "handoff" : "relay", p->channels, p->channels == 1 ? "" : "s", pc, disks);
	else
		snprintf(buf, len, "%s %s, single channel%s%s", driver_name(p->transport), p->handoff ? "handoff" : "relay",
			 pc, disks);
}
