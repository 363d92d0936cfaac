/* Unit tests for the XML migration cookie (controlplane/cookie.c).
 *
 * Usage: test-cookie [SCHEMA]   SCHEMA is docs/cookie.rng (meson passes it);
 * without it $FERRY_SRCDIR/docs/cookie.rng is used. Every cookie the
 * formatter produces here is validated against the schema. */
#include "controlplane/cookie.h"
#include "check.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libxml/parser.h>
#include <libxml/relaxng.h>

#define VM_UUID   "6f1c2a3b-4d5e-4f60-8172-93a4b5c6d7e8"
#define SRC_HUUID "11111111-2222-4333-8444-555555555555"
#define DST_HUUID "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"

#define HEAD "<ferry-migration><name>vm1</name><uuid>" VM_UUID "</uuid>" \
	     "<hostname>src.example</hostname><hostuuid>" SRC_HUUID "</hostuuid>"
#define TAIL "</ferry-migration>"
#define WITH_NAME_RNG(n) "<ferry-migration><name>" n "</name><uuid>" VM_UUID "</uuid>" \
	"<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL

static xmlRelaxNGPtr schema;
static struct ferry_err last_err; /* of the last rejects() */

/* ---- helpers ------------------------------------------------------------------ */

static void rng_error(void *ctx, xmlErrorPtr e)
{
	if (e && e->message)
		printf("    schema: %s", e->message);
}

/* Validate one document against docs/cookie.rng. */
static bool rng_valid(const char *xml)
{
	xmlDocPtr doc;
	xmlRelaxNGValidCtxtPtr v;
	int r;

	if (!schema)
		return false;
	doc = xmlReadMemory(xml, (int)strlen(xml), NULL, NULL, XML_PARSE_NONET);
	if (!doc)
		return false;
	v = xmlRelaxNGNewValidCtxt(schema);
	xmlRelaxNGSetValidStructuredErrors(v, rng_error, NULL);
	r = xmlRelaxNGValidateDoc(v, doc);
	xmlRelaxNGFreeValidCtxt(v);
	xmlFreeDoc(doc);
	return r == 0;
}

static int load_schema(const char *path)
{
	xmlRelaxNGParserCtxtPtr p = xmlRelaxNGNewParserCtxt(path);

	if (!p)
		return -1;
	schema = xmlRelaxNGParse(p);
	xmlRelaxNGFreeParserCtxt(p);
	return schema ? 0 : -1;
}

static int parse(const char *xml, struct ferry_cookie *c, struct ferry_err *e)
{
	ferry_err_clear(e);
	return ferry_cookie_parse(xml, strlen(xml), c, e);
}

static int format(const struct ferry_cookie *c, char **xml, struct ferry_err *e)
{
	ferry_err_clear(e);
	return ferry_cookie_format(c, xml, e);
}

static void base(struct ferry_cookie *c, const char *name, const char *uuid, const char *host,
		 const char *huuid)
{
	ferry_cookie_clear(c);
	snprintf(c->name, sizeof(c->name), "%s", name);
	snprintf(c->uuid, sizeof(c->uuid), "%s", uuid);
	snprintf(c->hostname, sizeof(c->hostname), "%s", host);
	snprintf(c->hostuuid, sizeof(c->hostuuid), "%s", huuid);
}

static void fill_full(struct ferry_cookie *c)
{
	base(c, "vm-1 <&>'\" caf\xc3\xa9", VM_UUID, "src.example", SRC_HUUID);
	c->features = FERRY_COOKIE_FEAT_ALL;
	c->flags = FERRY_COOKIE_FLAGS_ALL;
	c->ncaps = 3;
	strcpy(c->caps[0], "zero-copy");
	strcpy(c->caps[1], "future.cap_2");
	strcpy(c->caps[2], "x");
	c->ndrivers = 3;
	c->drivers[0] = (struct ferry_cookie_driver){ .kind = FERRY_COOKIE_DRIVER_TCP, .handoff = true };
	strcpy(c->drivers[0].endpoint, "[fe80::1%eth0]:7470");
	c->drivers[1] = (struct ferry_cookie_driver){ .kind = FERRY_COOKIE_DRIVER_RDMA };
	strcpy(c->drivers[1].endpoint, "mlx5_0:1&gid=\"fe80::2\"");
	c->drivers[2] = (struct ferry_cookie_driver){ .kind = FERRY_COOKIE_DRIVER_DPDK };
	strcpy(c->drivers[2].endpoint, "0000:3b:00.0");
	c->nbd.port = 10809;
	c->nbd.ndisks = 3;
	strcpy(c->nbd.disks[0].target, "vda");
	c->nbd.disks[0].capacity = 10737418240ull;
	strcpy(c->nbd.disks[1].target, "sdb_2-x");
	c->nbd.disks[1].capacity = 0;
	strcpy(c->nbd.disks[2].target, "vdc");
	c->nbd.disks[2].capacity = UINT64_MAX;
	c->stats = (struct ferry_cookie_stats){ .ram_total = 1ull << 30, .ram_transferred = 123456789,
						.total_time_ms = 4321, .setup_time_ms = 12, .downtime_ms = 37 };
	c->vm.memory = 1ull << 30;
	c->vm.vcpus = 4096;
	strcpy(c->vm.machine, "pc-i440fx-7.2-machine");
	c->vm.nblockdevs = 2;
	strcpy(c->vm.blockdevs[0].name, "ide0-hd0");
	c->vm.blockdevs[0].capacity = 512;
	strcpy(c->vm.blockdevs[1].name, "drive-virtio-disk0");
	c->vm.blockdevs[1].capacity = UINT64_MAX;
	static const char args[] = "qemu-system-x86_64\0-name\0vm-1 <&>'\" caf\xc3\xa9\0\0-drive\0"
				   "file=/a b/x.img,,y,format=raw";
	memcpy(c->vm.cmdline, args, sizeof(args));
	c->vm.cmdline_len = sizeof(args);
	c->vm.nargs = 6;
}

/* Format, check against the schema, parse back, compare. */
static void round_trip(const struct ferry_cookie *c, const char *what, bool print)
{
	struct ferry_cookie back;
	struct ferry_err e;
	char *xml = NULL;
	int r = format(c, &xml, &e);

	CHECK(r == 0 && xml, "%s: format (%d %s)", what, r, e.msg);
	if (r < 0)
		return;
	if (print)
		printf("%s", xml);
	CHECK(rng_valid(xml), "%s: formatted cookie is valid against docs/cookie.rng", what);
	r = parse(xml, &back, &e);
	CHECK(r == 0, "%s: parse back (%d %s)", what, r, e.msg);
	CHECK(memcmp(c, &back, sizeof(back)) == 0, "%s: parsed cookie equals the original", what);
	free(xml);
}

/* Parse must fail with code and a message containing needle. */
static void rejects(const char *xml, size_t len, int code, const char *needle, const char *what)
{
	struct ferry_cookie c;
	struct ferry_err e;
	int r;

	ferry_err_clear(&e);
	memset(&c, 0xa5, sizeof(c));
	r = ferry_cookie_parse(xml, len, &c, &e);
	CHECK(r == code, "%s: rejected with %d (got %d: %s)", what, code, r, e.msg);
	CHECK_MSG(e, needle, "%s: message names '%s' (%s)", what, needle, e.msg);
	CHECK(c.name[0] == 0 && c.flags == 0 && c.features == 0, "%s: output cleared", what);
	last_err = e;
}

#define REJECTS(xml, code, needle, what) rejects((xml), strlen(xml), (code), (needle), (what))

static void accepts(const char *xml, struct ferry_cookie *c, const char *what)
{
	struct ferry_err e;
	int r = parse(xml, c, &e);

	CHECK(r == 0, "%s: accepted (%d %s)", what, r, e.msg);
}

/* A dynamically built document: HEAD + body repeated n times + TAIL. */
static char *repeat_doc(const char *before, const char *fmt, int n, const char *after)
{
	size_t cap = strlen(HEAD) + strlen(before) + strlen(after) + strlen(TAIL) +
		     (size_t)n * (strlen(fmt) + 24) + 1;
	char *s = malloc(cap);
	size_t o = (size_t)snprintf(s, cap, "%s%s", HEAD, before);

	for (int i = 0; i < n; i++)
		o += (size_t)snprintf(s + o, cap - o, fmt, i);
	snprintf(s + o, cap - o, "%s%s", after, TAIL);
	return s;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_round_trip(void)
{
	struct ferry_cookie c;

	fill_full(&c);
	round_trip(&c, "full cookie", true);

	base(&c, "vm1", VM_UUID, "src.example", SRC_HUUID);
	round_trip(&c, "minimal cookie", false);

	/* Empty optional parts are kept as present (<vm> has mandatory
	 * attributes: the smallest one). */
	base(&c, "vm1", VM_UUID, "h", SRC_HUUID);
	c.flags = FERRY_COOKIE_FLAGS_ALL;
	c.vm.memory = c.vm.vcpus = 1;
	strcpy(c.vm.machine, "m");
	round_trip(&c, "empty optional parts", false);

	/* 256 two-byte characters: the limit is in characters. */
	char name[600] = "";
	for (int i = 0; i < 256; i++)
		strcat(name, "\xc3\xa9");
	base(&c, name, VM_UUID, "h", SRC_HUUID);
	round_trip(&c, "256-character UTF-8 name", false);

	/* NBD over a unix socket, 64 disks (the maximum). */
	fill_full(&c);
	c.nbd.port = 0;
	strcpy(c.nbd.socket, "/run/ferry/nbd-vm1.sock");
	memset(c.nbd.disks, 0, sizeof(c.nbd.disks));
	memset(c.caps, 0, sizeof(c.caps));
	c.nbd.ndisks = FERRY_COOKIE_MAX_DISKS;
	for (int i = 0; i < FERRY_COOKIE_MAX_DISKS; i++) {
		snprintf(c.nbd.disks[i].target, sizeof(c.nbd.disks[i].target), "vd%d", i);
		c.nbd.disks[i].capacity = (uint64_t)i << 30;
	}
	c.ncaps = FERRY_COOKIE_MAX_CAPS;
	for (int i = 0; i < FERRY_COOKIE_MAX_CAPS; i++)
		snprintf(c.caps[i], sizeof(c.caps[i]), "cap-%d", i);
	round_trip(&c, "nbd socket, 64 disks, 64 caps", false);

	/* Upper-case UUIDs are accepted and written in lower case. */
	struct ferry_cookie back;
	struct ferry_err e;
	char *xml = NULL;
	base(&c, "vm1", "6F1C2A3B-4D5E-4F60-8172-93A4B5C6D7E8", "h", "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE");
	CHECK(format(&c, &xml, &e) == 0 && strstr(xml, VM_UUID) && strstr(xml, DST_HUUID),
	      "upper-case UUIDs are written in lower case");
	free(xml);
	accepts("<ferry-migration><name>vm1</name><uuid>6F1C2A3B-4D5E-4F60-8172-93A4B5C6D7E8</uuid>"
		"<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL, &back, "upper-case uuid");
	CHECK(strcmp(back.uuid, VM_UUID) == 0, "parsed uuid is lower case (%s)", back.uuid);

	/* Any order of the elements; comments, PIs, CDATA, whitespace. */
	accepts("<?xml version='1.0' encoding='UTF-8'?>\n<!-- hi -->\n<ferry-migration>\n"
		"  <hostuuid>" SRC_HUUID "</hostuuid><?pi x?>\n  <feature name='tls'/>\n"
		"  <name><![CDATA[v<m]]>1<!-- c --></name>\n  <hostname>h</hostname>\n"
		"  <uuid>" VM_UUID "</uuid>\n</ferry-migration>\n", &back, "any order, comments, CDATA");
	CHECK(strcmp(back.name, "v<m1") == 0 && back.features == FERRY_COOKIE_FEAT_TLS,
	      "name from CDATA and text ('%s'), feature tls", back.name);

	/* The schema is not vacuous: it refuses what the parser refuses. */
	CHECK(rng_valid(HEAD TAIL), "schema accepts a minimal cookie");
	CHECK(!rng_valid(HEAD "<feature name='teleport'/>" TAIL), "schema refuses an unknown feature");
	CHECK(!rng_valid(WITH_NAME_RNG("a/b")), "schema refuses a name with '/'");
	CHECK(!rng_valid(HEAD "<nbd><disk target='vda' capacity='12x'/></nbd>" TAIL),
	      "schema refuses a non-numeric capacity");
	CHECK(!rng_valid(HEAD "<nbd port='1' socket='/x'/>" TAIL), "schema refuses port and socket");
	CHECK(!rng_valid("<ferry-migration><name>v</name><uuid>" VM_UUID "</uuid><hostname>h</hostname>"
			 "</ferry-migration>"), "schema refuses a cookie without hostuuid");

	CHECK(strcmp(ferry_cookie_feature_name(FERRY_COOKIE_FEAT_POSTCOPY_SETUP), "postcopy-setup") == 0 &&
	      ferry_cookie_feature_name(3) == NULL && ferry_cookie_feature_name(1u << 4) == NULL,
	      "ferry_cookie_feature_name");
	CHECK(strcmp(ferry_cookie_driver_name(FERRY_COOKIE_DRIVER_DPDK), "dpdk") == 0 &&
	      ferry_cookie_driver_name(0) == NULL && ferry_cookie_driver_name(99) == NULL,
	      "ferry_cookie_driver_name");
}

static void test_compat(void)
{
	struct ferry_cookie c;

	/* Unknown mandatory feature: rejected, named; reported before any
	 * other problem of the (newer) cookie. */
	REJECTS(HEAD "<feature name='nbd'/><feature name='teleport-v2'/>" TAIL, -EOPNOTSUPP,
		"unknown feature 'teleport-v2'", "unknown mandatory feature");
	REJECTS(HEAD "<nbd><disk target='vda' capacity='lots'/></nbd><feature name='warp'/>" TAIL,
		-EOPNOTSUPP, "'warp'", "unknown feature reported before other errors");
	REJECTS(HEAD "<feature name='a b'/>" TAIL, -EPROTO, "<feature name='a b'>", "malformed feature name");
	REJECTS(HEAD "<feature/>" TAIL, -EPROTO, "<feature> has no name", "feature without name");
	REJECTS(HEAD "<feature name='tls'/><feature name='tls'/>" TAIL, -EPROTO, "'tls'> twice",
		"duplicate feature");
	char *doc = repeat_doc("", "<feature name='f%d'/>", 33, "");
	REJECTS(doc, -EPROTO, "more than 32 <feature>", "33 features");
	free(doc);

	/* Unknown optional elements and attributes: ignored everywhere. */
	accepts(HEAD "<future a='1'><deep><deeper/></deep>text</future>"
		"<x:name xmlns:x='urn:other'>not-the-name</x:name>"
		"<capabilities extra='1'><cap name='zero-copy'/><cap name='from-the-future'/><thing/></capabilities>"
		"<transport><driver name='tcp' endpoint='h:1' mtu='9000'/><quantum-link/>"
		"<driver name='ucx' endpoint='anything at all'/></transport>"
		"<nbd tls='yes'><frob/><disk target='vda' capacity='1' format='raw'/></nbd>"
		"<statistics><new-stat>x</new-stat><downtime-ms>5</downtime-ms></statistics>"
		"<vm memory='1' vcpus='1' machine='pc' numa='no'><gpu/><blockdev name='a' capacity='2' ro='1'/></vm>"
		"<!-- comment --><?pi data?>" TAIL, &c, "unknown optional elements and attributes");
	CHECK(strcmp(c.name, "vm1") == 0, "namespaced <x:name> ignored");
	CHECK(c.flags == FERRY_COOKIE_FLAGS_ALL && c.ndrivers == 1 &&
	      c.drivers[0].kind == FERRY_COOKIE_DRIVER_TCP && !c.drivers[0].handoff,
	      "unknown driver kind skipped, handoff defaults to no");
	CHECK(c.nbd.ndisks == 1 && c.nbd.disks[0].capacity == 1 && c.stats.downtime_ms == 5 &&
	      c.stats.ram_total == 0, "nbd and statistics read around unknown children");
	CHECK(ferry_cookie_has_cap(&c, "from-the-future") && ferry_cookie_has_cap(&c, "zero-copy") &&
	      !ferry_cookie_has_cap(&c, "nope") && c.ncaps == 2, "unknown capability kept");
}

static void test_identity(void)
{
	char name[300];

	REJECTS("<ferry-migration><name>vm1</name><uuid>not-a-uuid</uuid><hostname>h</hostname>"
		"<hostuuid>" SRC_HUUID "</hostuuid>" TAIL, -EPROTO, "<uuid> 'not-a-uuid'", "bad uuid");
	REJECTS("<ferry-migration><name>vm1</name><uuid>6f1c2a3b4-d5e-4f60-8172-93a4b5c6d7e8</uuid>"
		"<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL, -EPROTO,
		"not a canonical UUID", "misplaced dash in uuid");
	REJECTS("<ferry-migration><name>vm1</name><uuid>" VM_UUID "</uuid><hostname>h</hostname>"
		"<hostuuid>g1111111-2222-4333-8444-555555555555</hostuuid>" TAIL, -EPROTO,
		"<hostuuid> 'g111", "non-hex hostuuid");
	REJECTS("<ferry-migration><name>vm1</name><uuid> " VM_UUID "</uuid><hostname>h</hostname>"
		"<hostuuid>" SRC_HUUID "</hostuuid>" TAIL, -EPROTO, "<uuid>", "uuid with a space");

	memset(name, 'n', 257);
	name[257] = 0;
	char doc[1024];
	snprintf(doc, sizeof(doc), "<ferry-migration><name>%s</name><uuid>" VM_UUID "</uuid>"
		 "<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL, name);
	REJECTS(doc, -EPROTO, "longer than 256 characters", "257-character name");
	name[256] = 0;
	snprintf(doc, sizeof(doc), "<ferry-migration><name>%s</name><uuid>" VM_UUID "</uuid>"
		 "<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL, name);
	struct ferry_cookie c;
	accepts(doc, &c, "256-character name");

#define WITH_NAME(n) "<ferry-migration><name>" n "</name><uuid>" VM_UUID "</uuid>" \
	"<hostname>h</hostname><hostuuid>" SRC_HUUID "</hostuuid>" TAIL
	REJECTS(WITH_NAME("a/b"), -EPROTO, "<name> 'a/b' contains '/'", "name with '/'");
	REJECTS(WITH_NAME("a&#x7f;b"), -EPROTO, "'a\\x7fb' contains a control character", "name with DEL");
	REJECTS(WITH_NAME("a&#x85;b"), -EPROTO, "'a\\xc2\\x85b' contains a control character",
		"name with a C1 control");
	REJECTS(WITH_NAME("a&#x9;b"), -EPROTO, "control character", "name with a tab");
	REJECTS(WITH_NAME(""), -EPROTO, "<name> '' is empty", "empty name");
	REJECTS(WITH_NAME("a<b/>c"), -EPROTO, "<name> must contain only text", "element inside <name>");
	accepts(WITH_NAME("caf&#xe9; &amp; co"), &c, "name with character and entity references");
	CHECK(strcmp(c.name, "caf\xc3\xa9 & co") == 0, "name decoded ('%s')", c.name);

	REJECTS("<ferry-migration><name>vm1</name><uuid>" VM_UUID "</uuid><hostname>a host</hostname>"
		"<hostuuid>" SRC_HUUID "</hostuuid>" TAIL, -EPROTO, "<hostname> 'a host' contains a space",
		"hostname with a space");

	/* Mandatory elements, duplicates, root. */
	REJECTS("<ferry-migration><uuid>" VM_UUID "</uuid><hostname>h</hostname><hostuuid>" SRC_HUUID
		"</hostuuid>" TAIL, -EPROTO, "no <name> element", "missing name");
	REJECTS("<ferry-migration><name>v</name><hostname>h</hostname><hostuuid>" SRC_HUUID
		"</hostuuid>" TAIL, -EPROTO, "no <uuid> element", "missing uuid");
	REJECTS("<ferry-migration><name>v</name><uuid>" VM_UUID "</uuid><hostuuid>" SRC_HUUID
		"</hostuuid>" TAIL, -EPROTO, "no <hostname> element", "missing hostname");
	REJECTS("<ferry-migration><name>v</name><uuid>" VM_UUID "</uuid><hostname>h</hostname>" TAIL,
		-EPROTO, "no <hostuuid> element", "missing hostuuid");
	REJECTS(HEAD "<name>vm2</name>" TAIL, -EPROTO, "more than one <name>", "duplicate name");
	REJECTS(HEAD "<nbd/><nbd/>" TAIL, -EPROTO, "more than one <nbd>", "duplicate nbd");
	REJECTS(HEAD "<vm memory='0' vcpus='1' machine='pc'/>" TAIL, -EPROTO, "<vm> attribute memory='0' is out of range",
		"vm with no memory");
	REJECTS(HEAD "<vm memory='1' vcpus='4097' machine='pc'/>" TAIL, -EPROTO, "vcpus='4097' is out of range",
		"vm with too many vcpus");
	REJECTS(HEAD "<vm memory='1' vcpus='1'/>" TAIL, -EPROTO, "<vm> has no machine attribute", "vm without machine");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc q35'/>" TAIL, -EPROTO, "machine='pc q35'", "machine with a space");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'><blockdev name='a' capacity='1'/>"
		"<blockdev name='a' capacity='2'/></vm>" TAIL, -EPROTO, "<blockdev name='a'> twice", "blockdev twice");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'/><vm memory='1' vcpus='1' machine='pc'/>" TAIL, -EPROTO,
		"more than one <vm>", "duplicate vm");
	{
		char *many = repeat_doc("<vm memory='1' vcpus='1' machine='pc'>", "<blockdev name='d%d' capacity='1'/>", 65,
					"</vm>");
		REJECTS(many, -EPROTO, "more than 64 <blockdev>", "65 block devices");
		free(many);
	}
	{
		/* <qemu-cmdline>: bounded in count, length and total, no control characters. */
		char *many = repeat_doc("<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline>", "<arg>a%d</arg>", 513,
					"</qemu-cmdline></vm>");
		REJECTS(many, -EPROTO, "more than 512 <arg>", "513 arguments");
		free(many);
		char arg[4200];
		memset(arg, 'x', sizeof(arg));
		arg[4097] = '\0';
		many = repeat_doc("<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline><arg>", arg, 1,
				  "</arg></qemu-cmdline></vm>");
		REJECTS(many, -EPROTO, "longer than 4096 bytes", "an argument of 4097 bytes");
		free(many);
		arg[4000] = '\0';
		size_t cap = 5 * 4100 + 200, o = 0;
		many = malloc(cap);
		CHECK(many != NULL, "malloc");
		o += (size_t)snprintf(many + o, cap - o, "%s<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline>", HEAD);
		for (int i = 0; i < 5; i++)
			o += (size_t)snprintf(many + o, cap - o, "<arg>%s</arg>", arg);
		snprintf(many + o, cap - o, "</qemu-cmdline></vm>%s", TAIL);
		REJECTS(many, -EPROTO, "<qemu-cmdline> is longer than 16384 bytes", "20000 bytes of arguments");
		free(many);
	}
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline><arg>a&#127;b</arg></qemu-cmdline></vm>" TAIL,
		-EPROTO, "<arg> 'a\\x7fb' contains a control character", "an argument with DEL");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline><arg>a</arg></qemu-cmdline>"
		"<qemu-cmdline><arg>b</arg></qemu-cmdline></vm>" TAIL, -EPROTO, "more than one <qemu-cmdline>",
		"two command lines");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline/>"
		"<qemu-cmdline><arg>b</arg></qemu-cmdline></vm>" TAIL, -EPROTO, "more than one <qemu-cmdline>",
		"an empty command line, then another");
	REJECTS(HEAD "<vm memory='1' vcpus='1' machine='pc'><qemu-cmdline><arg><b/></arg></qemu-cmdline></vm>" TAIL,
		-EPROTO, "<arg> must contain only text", "an argument with an element");
	{
		/* The shape check between the two sides' cookies. */
		struct ferry_cookie a, b;
		struct ferry_err se;
		fill_full(&a);
		fill_full(&b);
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == 0, "same shape accepted");
		b.vm.memory /= 2;
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == -EINVAL && strstr(se.msg, "536870912 bytes of memory, the source 1073741824"),
		      "memory differs: %s", se.msg);
		fill_full(&b);
		b.vm.vcpus = 2;
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == -EINVAL && strstr(se.msg, "2 vCPUs"), "vcpus differ: %s", se.msg);
		fill_full(&b);
		strcpy(b.vm.machine, "q35");
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == -EINVAL && strstr(se.msg, "machine type 'q35'"),
		      "machine differs: %s", se.msg);
		fill_full(&b);
		b.vm.nblockdevs = 1;
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == -EINVAL && strstr(se.msg, "no block device 'drive-virtio-disk0'"),
		      "a missing disk: %s", se.msg);
		fill_full(&b);
		b.vm.blockdevs[0].capacity = 511;
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == -EINVAL && strstr(se.msg, "'ide0-hd0' holds 511 bytes"),
		      "a smaller disk: %s", se.msg);
		b.vm.blockdevs[0].capacity = 4096;
		b.vm.nblockdevs = 2;
		ferry_err_clear(&se);
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == 0, "a larger destination disk is fine");
		b.flags &= ~FERRY_COOKIE_VM;
		b.vm.memory = 1;
		CHECK(ferry_cookie_check_shape(&a, &b, &se) == 0, "a peer without <vm> (older): nothing to compare");
	}
	REJECTS("<ferry><name>v</name></ferry>", -EPROTO, "root element is <ferry>", "wrong root");
	REJECTS("<ferry-migration xmlns='urn:x'><name>v</name></ferry-migration>", -EPROTO,
		"root element is <namespaced ferry-migration>", "namespaced root");
}

static void test_parts(void)
{
	char *doc;

	/* Disks. */
	doc = repeat_doc("<nbd>", "<disk target='d%d' capacity='1'/>", 65, "</nbd>");
	REJECTS(doc, -EPROTO, "more than 64 <disk>", "65 disks");
	free(doc);
	REJECTS(HEAD "<nbd><disk target='vda' capacity='12x'/></nbd>" TAIL, -EPROTO,
		"<disk target='vda'> attribute capacity='12x' is not a decimal number", "non-numeric capacity");
	REJECTS(HEAD "<nbd><disk target='vda' capacity='-1'/></nbd>" TAIL, -EPROTO, "capacity='-1'",
		"negative capacity");
	REJECTS(HEAD "<nbd><disk target='vda' capacity=' 1'/></nbd>" TAIL, -EPROTO, "capacity=' 1'",
		"capacity with a space");
	REJECTS(HEAD "<nbd><disk target='vda' capacity=''/></nbd>" TAIL, -EPROTO, "capacity='' is empty",
		"empty capacity");
	REJECTS(HEAD "<nbd><disk target='vda' capacity='18446744073709551616'/></nbd>" TAIL, -EPROTO,
		"is larger than 18446744073709551615", "capacity overflow");
	struct ferry_cookie c;
	accepts(HEAD "<nbd><disk target='vda' capacity='18446744073709551615'/></nbd>" TAIL, &c,
		"capacity UINT64_MAX");
	CHECK(c.nbd.disks[0].capacity == UINT64_MAX, "capacity is UINT64_MAX");
	REJECTS(HEAD "<nbd><disk target='vda'/></nbd>" TAIL, -EPROTO, "<disk> has no capacity attribute",
		"missing capacity");
	REJECTS(HEAD "<nbd><disk target='../x' capacity='1'/></nbd>" TAIL, -EPROTO, "target='../x'",
		"bad target");
	REJECTS(HEAD "<nbd><disk target='vda' capacity='1'/><disk target='vda' capacity='2'/></nbd>" TAIL,
		-EPROTO, "<disk target='vda'> twice", "duplicate disk");
	REJECTS(HEAD "<nbd port='0'/>" TAIL, -EPROTO, "port='0' is not a port number", "port 0");
	REJECTS(HEAD "<nbd port='65536'/>" TAIL, -EPROTO, "port='65536'", "port 65536");
	REJECTS(HEAD "<nbd port='10809' socket='/run/x.sock'/>" TAIL, -EPROTO, "both a port and a socket",
		"port and socket");
	REJECTS(HEAD "<nbd socket='run/x.sock'/>" TAIL, -EPROTO, "socket='run/x.sock' is not an absolute path",
		"relative socket");

	/* Drivers. */
	doc = repeat_doc("<transport>", "<driver name='tcp%d' endpoint='e'/>", 9, "</transport>");
	REJECTS(doc, -EPROTO, "more than 8 <driver>", "9 drivers");
	free(doc);
	REJECTS(HEAD "<transport><driver name='tcp' endpoint='h:1' handoff='maybe'/></transport>" TAIL,
		-EPROTO, "handoff='maybe' is not 'yes' or 'no'", "bad handoff");
	REJECTS(HEAD "<transport><driver name='tcp'/></transport>" TAIL, -EPROTO,
		"<driver> has no endpoint attribute", "driver without endpoint");
	REJECTS(HEAD "<transport><driver endpoint='x'/></transport>" TAIL, -EPROTO,
		"<driver> has no name attribute", "driver without name");
	REJECTS(HEAD "<transport><driver name='tcp' endpoint='a:1'/><driver name='tcp' endpoint='b:1'/>"
		"</transport>" TAIL, -EPROTO, "<driver name='tcp'> twice", "duplicate driver");
	char ep[300];
	memset(ep, 'e', 257);
	ep[257] = 0;
	char buf[1024];
	snprintf(buf, sizeof(buf), HEAD "<transport><driver name='rdma' endpoint='%s'/></transport>" TAIL, ep);
	REJECTS(buf, -EPROTO, "endpoint='eeee", "257-byte endpoint");
	CHECK_MSG(last_err, "longer than 256 bytes", "257-byte endpoint: says why");

	/* Capabilities. */
	doc = repeat_doc("<capabilities>", "<cap name='c%d'/>", 65, "</capabilities>");
	REJECTS(doc, -EPROTO, "more than 64 <cap>", "65 caps");
	free(doc);
	REJECTS(HEAD "<capabilities><cap name='a'/><cap name='a'/></capabilities>" TAIL, -EPROTO,
		"<cap name='a'> twice", "duplicate cap");
	REJECTS(HEAD "<capabilities><cap name='a/b'/></capabilities>" TAIL, -EPROTO, "<cap name='a/b'>",
		"bad cap name");

	/* Statistics. */
	REJECTS(HEAD "<statistics><downtime-ms>soon</downtime-ms></statistics>" TAIL, -EPROTO,
		"<downtime-ms> 'soon' is not a decimal number", "non-numeric statistic");
	REJECTS(HEAD "<statistics><downtime-ms>1</downtime-ms><downtime-ms>2</downtime-ms></statistics>" TAIL,
		-EPROTO, "more than one <downtime-ms>", "duplicate statistic");
}

static void test_hostile(void)
{
	/* DTDs and entities of any kind are refused before anything expands or
	 * is loaded. */
	static const char laughs[] =
		"<?xml version='1.0'?>\n<!DOCTYPE ferry-migration [\n"
		" <!ENTITY a 'lollollollollollollollollollol'>\n"
		" <!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>\n"
		" <!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>\n"
		" <!ENTITY d '&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;'>\n"
		" <!ENTITY e '&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;'>\n"
		" <!ENTITY f '&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;'>\n"
		" <!ENTITY g '&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;'>\n"
		" <!ENTITY h '&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;'>\n"
		" <!ENTITY i '&h;&h;&h;&h;&h;&h;&h;&h;&h;&h;'>\n"
		"]>\n<ferry-migration><name>&i;</name><uuid>" VM_UUID "</uuid><hostname>h</hostname>"
		"<hostuuid>" SRC_HUUID "</hostuuid></ferry-migration>\n";
	double t0 = now_s();
	REJECTS(laughs, -EPROTO, "DOCTYPE", "billion laughs");
	CHECK(now_s() - t0 < 1.0, "billion laughs refused quickly (%.3f s)", now_s() - t0);

	REJECTS("<!DOCTYPE ferry-migration [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
		"<ferry-migration><name>&xxe;</name><uuid>" VM_UUID "</uuid><hostname>h</hostname>"
		"<hostuuid>" SRC_HUUID "</hostuuid></ferry-migration>", -EPROTO, "DOCTYPE",
		"external entity (XXE)");
	REJECTS("<!DOCTYPE ferry-migration [<!ENTITY % p SYSTEM 'http://127.0.0.1:1/x.dtd'> %p;]>"
		HEAD TAIL, -EPROTO, "DOCTYPE", "external parameter entity");
	REJECTS("<!DOCTYPE ferry-migration SYSTEM 'http://127.0.0.1:1/cookie.dtd'>" HEAD TAIL, -EPROTO,
		"DOCTYPE", "external DTD");
	REJECTS("<!DOCTYPE ferry-migration>" HEAD TAIL, -EPROTO, "DOCTYPE", "bare DOCTYPE");
	REJECTS(HEAD "<x>&undefined;</x>" TAIL, -EPROTO, "not well-formed XML", "undefined entity");
	REJECTS("<?xml version='1.0'?><?xml-stylesheet href='http://127.0.0.1:1/x'?>" HEAD
		"<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='file:///etc/passwd'/>" TAIL
		"<!DOCTYPE x>", -EPROTO, "not well-formed XML", "DOCTYPE after the root");
	struct ferry_cookie c;
	accepts(HEAD "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='file:///etc/passwd'/>"
		TAIL, &c, "XInclude is not processed (an unknown element)");

	/* Size. */
	size_t big = FERRY_COOKIE_MAX_BYTES + 1;
	char *s = malloc(big + 1);
	size_t head = strlen(HEAD "<!--"), tail = strlen("-->" TAIL);
	memcpy(s, HEAD "<!--", head);
	memset(s + head, 'x', big - head - tail);
	memcpy(s + big - tail, "-->" TAIL, tail + 1);
	rejects(s, big, -EMSGSIZE, "cookie larger than 65536 bytes", "65537-byte cookie");
	struct ferry_err e;
	ferry_err_clear(&e);
	memmove(s + head, s + head + 1, big - head); /* now exactly 65536 bytes */
	CHECK(ferry_cookie_parse(s, big - 1, &c, &e) == 0, "65536-byte cookie accepted (%s)", e.msg);
	free(s);

	/* Truncation: no prefix of a cookie is a cookie. */
	struct ferry_cookie full;
	char *xml = NULL;
	fill_full(&full);
	CHECK(format(&full, &xml, &e) == 0, "format for truncation");
	size_t end = (size_t)(strstr(xml, "</ferry-migration>") - xml) + strlen("</ferry-migration>");
	size_t accepted = 0, unnamed = 0;
	for (size_t n = 0; n < end; n++) {
		ferry_err_clear(&e);
		if (ferry_cookie_parse(xml, n, &c, &e) == 0)
			accepted++;
		else if (strncmp(e.msg, "cookie", 6) != 0)
			unnamed++;
	}
	CHECK(accepted == 0 && unnamed == 0, "all %zu truncations rejected with a message (%zu accepted)",
	      end, accepted);
	REJECTS("<ferry-migration><name>vm1</na", -EPROTO, "not well-formed XML: line 1", "truncated XML");
	free(xml);

	/* Bytes that are not a UTF-8 document. */
	rejects(HEAD "\0" TAIL, strlen(HEAD) + 1 + strlen(TAIL), -EPROTO, "NUL byte (at byte", "NUL byte");
	REJECTS(HEAD "<x>\xff</x>" TAIL, -EPROTO, "not valid UTF-8 (at byte", "invalid UTF-8");
	REJECTS(HEAD "<x>\xc0\xae</x>" TAIL, -EPROTO, "not valid UTF-8", "overlong UTF-8");
	REJECTS(HEAD "<x>\xed\xa0\x80</x>" TAIL, -EPROTO, "not valid UTF-8", "UTF-8 surrogate");
	static const char utf16[] = "\xff\xfe<\0f\0/\0>\0";
	rejects(utf16, sizeof(utf16) - 1, -EPROTO, "cookie", "UTF-16");
	accepts("<?xml version='1.0' encoding='ISO-8859-1'?>" WITH_NAME("caf\xc3\xa9"), &c,
		"encoding declaration ignored, bytes read as UTF-8");
	CHECK(strcmp(c.name, "caf\xc3\xa9") == 0, "name read as UTF-8 ('%s')", c.name);
	rejects("", 0, -EPROTO, "cookie is empty", "empty input");
	REJECTS("not xml at all", -EPROTO, "not well-formed XML", "not XML");
	REJECTS("<a>", -EPROTO, "not well-formed XML", "unclosed element");
	ferry_err_clear(&e);
	CHECK(ferry_cookie_parse(NULL, 5, &c, &e) == -EINVAL && ferry_cookie_parse("<a/>", 4, NULL, NULL) == -EINVAL,
	      "NULL arguments: -EINVAL");

	/* Deep nesting stops at libxml2's depth limit. */
	s = malloc(60000);
	strcpy(s, HEAD);
	for (int i = 0; i < 5000; i++)
		memcpy(s + strlen(HEAD) + (size_t)i * 3, "<x>", 4);
	REJECTS(s, -EPROTO, "not well-formed XML", "5000 nested elements");
	free(s);

	/* Error messages stay bounded and printable, the value cut with "...". */
	size_t n = 20000;
	s = malloc(n + 512);
	size_t o = (size_t)sprintf(s, "<ferry-migration><name>");
	for (size_t i = 0; i < n; i++)
		s[o++] = i % 2 ? '/' : 'a';
	o += (size_t)sprintf(s + o, "</name><uuid>" VM_UUID "</uuid><hostname>h</hostname><hostuuid>"
			     SRC_HUUID "</hostuuid>" TAIL);
	rejects(s, o, -EPROTO, "...' contains '/'", "20000-byte bad name");
	free(s);
}

static void test_format_errors(void)
{
	struct ferry_cookie c;
	struct ferry_err e;
	char *xml = (char *)"sentinel";

#define FORMAT_FAILS(needle, what) do { \
	xml = (char *)"sentinel"; \
	int r_ = format(&c, &xml, &e); \
	CHECK(r_ == -EINVAL && xml == NULL, "format refuses %s (%d)", (what), r_); \
	CHECK_MSG(e, (needle), "format refuses %s: '%s' in '%s'", (what), (needle), e.msg); \
} while (0)

	base(&c, "", VM_UUID, "h", SRC_HUUID);
	FORMAT_FAILS("<name> '' is empty", "empty name");
	base(&c, "a/b", VM_UUID, "h", SRC_HUUID);
	FORMAT_FAILS("contains '/'", "name with '/'");
	base(&c, "vm1", VM_UUID, "h", SRC_HUUID);
	memset(c.name, 'a', sizeof(c.name));
	FORMAT_FAILS("not NUL-terminated", "unterminated name");
	base(&c, "vm1", "nope", "h", SRC_HUUID);
	FORMAT_FAILS("<uuid> 'nope'", "bad uuid");
	base(&c, "vm1", VM_UUID, "", SRC_HUUID);
	FORMAT_FAILS("<hostname> '' is empty", "empty hostname");
	base(&c, "vm1", VM_UUID, "h", SRC_HUUID);
	c.features = 1u << 7;
	FORMAT_FAILS("unknown feature bits 0x80", "unknown feature bit");
	base(&c, "vm1", VM_UUID, "h", SRC_HUUID);
	c.flags = 1u << 9;
	FORMAT_FAILS("unknown flag bits", "unknown flag bit");
	fill_full(&c);
	c.vm.nargs = 7;
	FORMAT_FAILS("holds fewer than 7 arguments", "a command line shorter than its count");
	fill_full(&c);
	c.vm.nargs = 5;
	FORMAT_FAILS("holds more than 5 arguments", "a command line longer than its count");
	fill_full(&c);
	c.vm.cmdline[0] = '\t';
	FORMAT_FAILS("contains a control character", "an argument with a tab");
	fill_full(&c);
	c.nbd.ndisks = 65;
	FORMAT_FAILS("65 disks", "65 disks");
	fill_full(&c);
	strcpy(c.nbd.disks[1].target, "vda");
	FORMAT_FAILS("disk 'vda' twice", "duplicate disk");
	fill_full(&c);
	strcpy(c.nbd.socket, "/x");
	FORMAT_FAILS("both a port and a socket", "port and socket");
	fill_full(&c);
	c.drivers[1].kind = 0;
	FORMAT_FAILS("unknown kind 0", "driver kind 0");
	fill_full(&c);
	c.drivers[1].kind = FERRY_COOKIE_DRIVER_TCP;
	FORMAT_FAILS("driver 'tcp' twice", "duplicate driver");
	fill_full(&c);
	strcpy(c.drivers[0].endpoint, "a b");
	FORMAT_FAILS("<driver endpoint> 'a b'", "endpoint with a space");
	fill_full(&c);
	strcpy(c.caps[1], "a b");
	FORMAT_FAILS("<cap name> 'a b'", "bad capability");
	fill_full(&c);
	c.ncaps = 65;
	FORMAT_FAILS("65 capabilities", "65 capabilities");

	/* Parts not flagged are not written (nor validated). */
	base(&c, "vm1", VM_UUID, "h", SRC_HUUID);
	c.nbd.ndisks = 1000;
	xml = NULL;
	CHECK(format(&c, &xml, &e) == 0 && !strstr(xml, "<nbd"), "unflagged nbd not written");
	free(xml);

	ferry_err_clear(&e);
	CHECK(ferry_cookie_format(NULL, &xml, &e) == -EINVAL && xml == NULL &&
	      ferry_cookie_format(&c, NULL, NULL) == -EINVAL, "format NULL arguments: -EINVAL");
}

static void test_check_peer(void)
{
	struct ferry_cookie mine, theirs;
	struct ferry_err e;
	char *xml;

	/* The source's own cookie; the destination's arrives as XML. */
	base(&mine, "vm1", VM_UUID, "src.example", SRC_HUUID);
	base(&theirs, "vm1", VM_UUID, "dst.example", DST_HUUID);
	CHECK(format(&theirs, &xml, &e) == 0, "format peer cookie");
	CHECK(parse(xml, &theirs, &e) == 0, "parse peer cookie");
	free(xml);
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(&mine, &theirs, &e) == 0, "matching VM, other host: ok (%s)", e.msg);

	struct ferry_cookie other = theirs;
	strcpy(other.uuid, "00000000-0000-4000-8000-000000000001");
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(&mine, &other, &e) == -EINVAL, "uuid mismatch refused");
	CHECK_MSG(e, "cookie is for VM 'vm1' (uuid 00000000-0000-4000-8000-000000000001), "
		  "this migration is for 'vm1' (uuid " VM_UUID ")", "uuid mismatch message: %s", e.msg);

	other = theirs;
	strcpy(other.name, "vm2");
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(&mine, &other, &e) == -EINVAL, "name mismatch refused");
	CHECK_MSG(e, "cookie is for VM 'vm2'", "name mismatch message: %s", e.msg);
	CHECK_MSG(e, "this migration is for 'vm1'", "name mismatch message names ours");

	other = theirs;
	strcpy(other.hostuuid, "11111111-2222-4333-8444-555555555555");
	for (char *p = other.hostuuid; *p; p++)
		if (*p >= 'a' && *p <= 'f')
			*p = (char)(*p - 'a' + 'A');
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(&mine, &other, &e) == -EINVAL, "same host refused");
	CHECK_MSG(e, "same host", "same host message: %s", e.msg);

	other = theirs;
	other.hostuuid[0] = 0;
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(&mine, &other, &e) == -EINVAL, "peer without hostuuid refused");
	CHECK_MSG(e, "(peer) <hostuuid>", "names the bad field: %s", e.msg);
	ferry_err_clear(&e);
	CHECK(ferry_cookie_check_peer(NULL, &theirs, &e) == -EINVAL, "NULL cookie: -EINVAL");
}

int main(int argc, char **argv)
{
	char path[4096];
	const char *schema_path = argc > 1 ? argv[1] : NULL;

	if (!schema_path && getenv("FERRY_SRCDIR")) {
		snprintf(path, sizeof(path), "%s/docs/cookie.rng", getenv("FERRY_SRCDIR"));
		schema_path = path;
	}
	CHECK(schema_path && load_schema(schema_path) == 0, "load RELAX NG schema %s",
	      schema_path ? schema_path : "(give docs/cookie.rng as argv[1] or set FERRY_SRCDIR)");

	test_round_trip();
	test_compat();
	test_identity();
	test_parts();
	test_hostile();
	test_format_errors();
	test_check_peer();

	xmlRelaxNGFree(schema);
	xmlCleanupParser();
	CHECK_DONE();
}
