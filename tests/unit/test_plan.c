/* Capability negotiation: the fallback matrix in miniature (the e2e tests run
 * its rows with two real daemons), required features, transport choice, and
 * capabilities surviving a cookie round trip. */
#include <errno.h>
#include <stdlib.h>

#include "check.h"
#include "controlplane/plan.h"

#define TCP (1u << FERRY_COOKIE_DRIVER_TCP)
#define DPDK (1u << FERRY_COOKIE_DRIVER_DPDK)
#define RDMA (1u << FERRY_COOKIE_DRIVER_RDMA)
#define FULL \
	(FERRY_F_MULTIFD | FERRY_F_HANDOFF | FERRY_F_NBD | FERRY_F_POSTCOPY | FERRY_F_POSTCOPY_SETUP | \
	 FERRY_F_POSTCOPY_PREEMPT | FERRY_F_HANDOFF_MULTIFD)

static bool notes_mention(const struct ferry_plan *p, const char *needle)
{
	for (unsigned i = 0; i < p->nnotes; i++)
		if (strstr(p->notes[i], needle))
			return true;
	return false;
}

static struct ferry_err err;

/* Each call starts from a clear error: the first error set is kept. */
static int choose(const struct ferry_side_caps *src, const struct ferry_side_caps *dst,
		  const struct ferry_plan_request *req, struct ferry_plan *out, struct ferry_err *e)
{
	ferry_err_clear(e);
	return ferry_plan_choose(src, dst, req, out, e);
}

static int features(const char *list, uint32_t *out, struct ferry_err *e)
{
	ferry_err_clear(e);
	return ferry_feature_list_parse(list, out, e);
}

int main(void)
{
	struct ferry_plan p;
	struct ferry_side_caps full = { .features = FULL, .drivers = TCP }, src, dst;
	struct ferry_plan_request req = { 0 };
	char desc0[128];

	/* Single channel over tcp, both can hand over: handoff. */
	CHECK(choose(&full, &full, &req, &p, &err) == 0, "a plan for two full sides");
	CHECK(p.transport == FERRY_COOKIE_DRIVER_TCP && p.handoff && p.channels == 0 && p.nnotes == 0,
	      "single channel over tcp is handed over, no fallback noted");
	req.no_handoff = true;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && !p.handoff && p.nnotes == 0,
	      "--no-handoff keeps ferry relaying, without a fallback note (the user asked)");
	req.no_handoff = false;

	/* Storage migration: nbd only when disks are listed, and no fallback
	 * (the disks could not move otherwise). */
	CHECK(!(p.features & FERRY_F_NBD), "no disks listed: no nbd in the plan");
	req.nbd = true;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && (p.features & FERRY_F_NBD) && p.handoff,
	      "disks listed, both sides have nbd: nbd beside the RAM plan");
	ferry_plan_describe(&p, desc0, sizeof(desc0));
	CHECK(strstr(desc0, "disks over nbd") != NULL, "the plan says so: %s", desc0);
	dst = full;
	dst.features &= ~FERRY_F_NBD;
	CHECK(choose(&full, &dst, &req, &p, &err) == -ENOTSUP, "disks listed, no nbd on the destination: refused");
	CHECK(strstr(err.msg, "the destination does not support it") && strstr(err.msg, "cannot move otherwise"),
	      "the refusal says why: %s", err.msg);
	req.nbd = false;

	/* Rows of the matrix: one side masks a feature. */
	dst = full;
	dst.features &= ~FERRY_F_HANDOFF;
	CHECK(choose(&full, &dst, &req, &p, &err) == 0 && !p.handoff, "no handoff on the destination: relay");
	CHECK(notes_mention(&p, "handoff: the destination does not support it"), "the fallback is noted: %s", p.notes[0]);
	src = full;
	src.features &= ~FERRY_F_HANDOFF;
	CHECK(choose(&src, &full, &req, &p, &err) == 0 && !p.handoff &&
		      notes_mention(&p, "the source does not support it"),
	      "no handoff on the source (an older source): relay, noted");

	req.channels = 4;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && p.channels == 4 && p.handoff &&
		      (p.features & FERRY_F_MULTIFD) && (p.features & FERRY_F_HANDOFF_MULTIFD) && p.nnotes == 0,
	      "4 multifd channels when both have multifd, handed over to a pinned listener");
	ferry_plan_describe(&p, desc0, sizeof(desc0));
	CHECK(strcmp(desc0, "tcp handoff, 4 multifd channels") == 0, "described as: %s", desc0);
	req.no_handoff = true;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && p.channels == 4 && !p.handoff &&
		      !(p.features & FERRY_F_HANDOFF_MULTIFD) && p.nnotes == 0,
	      "--no-handoff: multifd relayed through ferry's lanes, nothing noted");
	req.no_handoff = false;
	dst = full;
	dst.features &= ~FERRY_F_HANDOFF_MULTIFD;
	CHECK(choose(&full, &dst, &req, &p, &err) == 0 && p.channels == 4 && !p.handoff &&
		      notes_mention(&p, "handoff-multifd: the destination does not support it; ferry relays the streams"),
	      "a destination without handoff-multifd: multifd relayed, noted (%s)", p.notes[0]);
	src = full;
	src.features &= ~FERRY_F_HANDOFF;
	CHECK(choose(&src, &full, &req, &p, &err) == 0 && !p.handoff &&
		      notes_mention(&p, "handoff: the source does not support it; ferry relays the streams"),
	      "a source without handoff at all: multifd relayed, noted (%s)", p.notes[0]);
	req.channels = 0;
	CHECK(choose(&full, &dst, &req, &p, &err) == 0 && p.handoff && p.nnotes == 0,
	      "handoff-multifd missing does not matter to a single channel");
	req.channels = 4;
	dst = full;
	dst.features &= ~FERRY_F_MULTIFD;
	CHECK(choose(&full, &dst, &req, &p, &err) == 0 && p.channels == 0,
	      "the destination (or its QEMU) lacks multifd: single channel");
	CHECK(p.handoff, "...and that single channel is handed over again");
	CHECK(notes_mention(&p, "multifd: the destination does not support it; migrating over a single channel"),
	      "the multifd fallback is noted: %s", p.notes[0]);

	req.require = FERRY_F_MULTIFD;
	CHECK(choose(&full, &dst, &req, &p, &err) == -ENOTSUP, "--require multifd: no fallback, an error");
	CHECK_MSG(err, "required feature 'multifd' is not available: the destination does not support it", "it says: %s",
		  err.msg);
	src = dst;
	CHECK(choose(&src, &dst, &req, &p, &err) == -ENOTSUP, "neither side: still an error");
	CHECK_MSG(err, "neither side supports it", "it says: %s", err.msg);
	req.require = FERRY_F_HANDOFF;
	req.channels = 2;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && p.handoff, "--require handoff with multifd is met");
	req.postcopy = true;
	CHECK(choose(&full, &full, &req, &p, &err) == -ENOTSUP,
	      "--require handoff with guarded postcopy cannot be met (ferry holds that channel)");
	CHECK_MSG(err, "handoff' needs kernel tcp on both sides and no postcopy set-up", "it says: %s", err.msg);
	memset(&req, 0, sizeof(req));

	/* Transports: the best common one; an explicit one is a requirement. */
	struct ferry_side_caps all = { .features = FULL, .drivers = TCP | DPDK | RDMA }, tcp_dpdk = { .features = FULL, .drivers = TCP | DPDK };
	CHECK(choose(&all, &all, &req, &p, &err) == 0 && p.transport == FERRY_COOKIE_DRIVER_RDMA && !p.handoff,
	      "rdma beats dpdk and tcp (and is never handed over)");
	CHECK(choose(&all, &tcp_dpdk, &req, &p, &err) == 0 && p.transport == FERRY_COOKIE_DRIVER_DPDK,
	      "the destination has no rdma device: dpdk");
	CHECK(notes_mention(&p, "transport rdma: only the source has it"), "noted: %s", p.notes[0]);
	CHECK(choose(&full, &tcp_dpdk, &req, &p, &err) == 0 && p.transport == FERRY_COOKIE_DRIVER_TCP && p.handoff,
	      "only tcp in common: tcp with handoff");
	req.transport = FERRY_COOKIE_DRIVER_RDMA;
	CHECK(choose(&all, &tcp_dpdk, &req, &p, &err) == -ENOTSUP, "--transport rdma without rdma on the destination");
	CHECK_MSG(err, "transport 'rdma' was asked for but the destination has no rdma driver", "it says: %s", err.msg);
	req.transport = FERRY_COOKIE_DRIVER_TCP;
	CHECK(choose(&all, &all, &req, &p, &err) == 0 && p.transport == FERRY_COOKIE_DRIVER_TCP,
	      "--transport tcp is honoured even when rdma is there");
	memset(&req, 0, sizeof(req));
	struct ferry_side_caps none = { .features = FULL };
	CHECK(choose(&full, &none, &req, &p, &err) == -ENOTSUP, "no common transport is an error");

	/* Postcopy when both sides (and QEMUs) can; precopy with a note otherwise. */
	memset(&req, 0, sizeof(req));
	req.postcopy = true;
	CHECK(choose(&full, &full, &req, &p, &err) == 0 && (p.features & FERRY_F_POSTCOPY) && p.nnotes == 0,
	      "postcopy when both have it");
	ferry_plan_describe(&p, desc0, sizeof(desc0));
	CHECK(strcmp(desc0, "tcp relay, single channel, postcopy (set-up acknowledged, preempt channel)") == 0,
	      "described: %s", desc0);
	CHECK(ferry_plan_streams(&p) == 2, "guarded postcopy with preempt: two streams (main + preempt)");
	struct ferry_side_caps nopre = full;
	nopre.features &= ~FERRY_F_POSTCOPY_PREEMPT;
	CHECK(choose(&full, &nopre, &req, &p, &err) == 0 && !(p.features & FERRY_F_POSTCOPY_PREEMPT) &&
		      ferry_plan_streams(&p) == 1 &&
		      notes_mention(&p, "postcopy-preempt: the destination does not support it"),
	      "no preempt on the destination: requested pages on the main channel, noted");
	CHECK(choose(&full, &full, &req, &p, &err) == 0, "again with both");
	CHECK((p.features & FERRY_F_POSTCOPY_SETUP) && !p.handoff,
	      "guarded postcopy: ferry keeps QEMU's channel (no handoff)");
	struct ferry_side_caps noack = full;
	noack.features &= ~FERRY_F_POSTCOPY_SETUP;
	CHECK(choose(&full, &noack, &req, &p, &err) == 0 && (p.features & FERRY_F_POSTCOPY) &&
		      !(p.features & FERRY_F_POSTCOPY_SETUP) && p.handoff &&
		      notes_mention(&p, "postcopy-setup: the destination does not support it"),
	      "no set-up acknowledgement on the destination: plain postcopy, noted");
	ferry_plan_describe(&p, desc0, sizeof(desc0));
	CHECK(strcmp(desc0, "tcp handoff, single channel, postcopy") == 0, "described: %s", desc0);
	struct ferry_side_caps nopc = full;
	nopc.features &= ~FERRY_F_POSTCOPY;
	CHECK(choose(&full, &nopc, &req, &p, &err) == 0 && !(p.features & FERRY_F_POSTCOPY) &&
		      notes_mention(&p, "postcopy: the destination does not support it; migrating in precopy"),
	      "no postcopy on the destination: precopy, noted");
	req.require = FERRY_F_POSTCOPY;
	CHECK(choose(&full, &nopc, &req, &p, &err) == -ENOTSUP, "--require postcopy: an error instead");
	memset(&req, 0, sizeof(req));

	/* Both sides compute the same plan. */
	struct ferry_plan a, b;
	req.channels = 2;
	ferry_plan_choose(&full, &dst, &req, &a, &err);
	ferry_plan_choose(&full, &dst, &req, &b, &err);
	CHECK(ferry_plan_equal(&a, &b), "deterministic");
	b.channels = 2;
	CHECK(!ferry_plan_equal(&a, &b), "a different plan is told apart");
	char desc[128];
	ferry_plan_describe(&a, desc, sizeof(desc));
	CHECK(strcmp(desc, "tcp handoff, single channel") == 0, "described: %s", desc);

	/* Capabilities through a cookie, unknown names ignored. */
	struct ferry_cookie c;
	ferry_cookie_clear(&c);
	struct ferry_side_caps in = { .features = FERRY_F_MULTIFD | FERRY_F_POSTCOPY_SETUP }, back;
	CHECK(ferry_caps_to_cookie(&in, &c, &err) == 0 && c.ncaps == 2, "caps written as two <cap> names");
	snprintf(c.caps[c.ncaps++], sizeof(c.caps[0]), "teleport");
	c.flags |= FERRY_COOKIE_TRANSPORT;
	c.ndrivers = 1;
	c.drivers[0].kind = FERRY_COOKIE_DRIVER_DPDK;
	ferry_caps_from_cookie(&c, &back);
	CHECK(back.features == in.features, "read back the same, the unknown 'teleport' ignored");
	CHECK(back.drivers == DPDK, "drivers come from <transport>");

	uint32_t f;
	CHECK(features("multifd,handoff", &f, &err) == 0 && f == (FERRY_F_MULTIFD | FERRY_F_HANDOFF),
	      "feature list parsed");
	CHECK(features("multifd,warp", &f, &err) == -EINVAL, "an unknown feature is refused");
	CHECK_MSG(err, "unknown feature 'warp'", "it says: %s", err.msg);
	CHECK_DONE();
}
