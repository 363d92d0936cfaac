/* The XML migration cookie: format and parse. See cookie.h and docs/cookie.md.
 *
 * Parsing is done in two steps: libxml2 builds a tree from the untrusted
 * bytes (no DTD, no entities, no network, bounded size), then the tree is
 * walked part by part, each part with its own parse function, validating
 * every string and count. Formatting validates the struct with the same rules
 * and builds the document with libxml2's tree API, which does the escaping. */
#include "cookie.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/parserInternals.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>
#include <libxml/xmlversion.h>

#define ROOT_NAME "ferry-migration"

/* Options for the untrusted document: never touch the network, keep
 * libxml2's own limits (no XML_PARSE_HUGE), do not substitute entities or
 * load a DTD (no XML_PARSE_NOENT / DTDLOAD / DTDATTR / DTDVALID / XINCLUDE),
 * ignore the encoding declaration (the bytes were checked to be UTF-8), and
 * report errors to us rather than to stderr. */
#if LIBXML_VERSION >= 21300
#define PARSE_NO_XXE XML_PARSE_NO_XXE
#else
#define PARSE_NO_XXE 0 /* a DOCTYPE is refused anyway: nothing to load */
#endif
#define PARSE_OPTIONS (XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING | \
		       XML_PARSE_IGNORE_ENC | XML_PARSE_NOCDATA | PARSE_NO_XXE)

/* Indexed by bit number of FERRY_COOKIE_FEAT_*. */
static const char *const feature_names[] = { "multifd", "nbd", "postcopy-setup", "tls" };
#define NFEATURES (sizeof(feature_names) / sizeof(feature_names[0]))

static const char *const driver_names[] = {
	[FERRY_COOKIE_DRIVER_TCP] = "tcp",
	[FERRY_COOKIE_DRIVER_DPDK] = "dpdk",
	[FERRY_COOKIE_DRIVER_RDMA] = "rdma",
};
#define NDRIVER_NAMES (sizeof(driver_names) / sizeof(driver_names[0]))

static const struct {
	const char *name;
	size_t off;
} stat_fields[] = {
	{ "ram-total", offsetof(struct ferry_cookie_stats, ram_total) },
	{ "ram-transferred", offsetof(struct ferry_cookie_stats, ram_transferred) },
	{ "total-time-ms", offsetof(struct ferry_cookie_stats, total_time_ms) },
	{ "setup-time-ms", offsetof(struct ferry_cookie_stats, setup_time_ms) },
	{ "downtime-ms", offsetof(struct ferry_cookie_stats, downtime_ms) },
};
#define NSTATS (sizeof(stat_fields) / sizeof(stat_fields[0]))

static pthread_once_t xml_once = PTHREAD_ONCE_INIT;

/* ---- messages -------------------------------------------------------------- */

/* A value from the peer, fit to be put between single quotes in a message:
 * at most QUOTE_BYTES bytes of it, anything but printable ASCII (and the
 * quote and backslash) as \xNN, "..." when cut. */
#define QUOTE_BYTES 48
struct quoted {
	char s[QUOTE_BYTES * 4 + 4];
};

static const char *quote_n(struct quoted *q, const char *s, size_t n)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (i == QUOTE_BYTES) {
			memcpy(q->s + o, "...", 4);
			return q->s;
		}
		if (ch >= 0x20 && ch < 0x7f && ch != '\'' && ch != '\\') {
			q->s[o++] = (char)ch;
		} else {
			static const char hex[] = "0123456789abcdef";
			q->s[o++] = '\\';
			q->s[o++] = 'x';
			q->s[o++] = hex[ch >> 4];
			q->s[o++] = hex[ch & 15];
		}
	}
	q->s[o] = '\0';
	return q->s;
}

/* A field of a caller's struct: bounded even if not NUL-terminated. */
#define QUOTE_FIELD(q, field) quote_n((q), (field), strnlen((field), sizeof(field)))

static const char *quote(struct quoted *q, const char *s)
{
	return quote_n(q, s, strlen(s));
}

static int fail(struct ferry_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct ferry_err *err, int code, const char *fmt, ...)
{
	char msg[FERRY_ERR_MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return ferry_err_set(err, code, "%s", msg);
}

#define bad(err, ...) fail((err), EPROTO, __VA_ARGS__)
#define nomem(err) ferry_err_set((err), ENOMEM, "cookie: out of memory")

/* ---- validation (shared by parse and format) --------------------------------- */

/* One strictly decoded UTF-8 sequence (no overlong forms, no surrogates,
 * nothing above U+10FFFF): its length, or 0 if invalid. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
	size_t len;
	uint32_t v, min;

	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	} else if ((s[0] & 0xe0) == 0xc0) {
		len = 2, v = s[0] & 0x1f, min = 0x80;
	} else if ((s[0] & 0xf0) == 0xe0) {
		len = 3, v = s[0] & 0x0f, min = 0x800;
	} else if ((s[0] & 0xf8) == 0xf0) {
		len = 4, v = s[0] & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return len;
}

/* Each check returns NULL when the value is fine, else what is wrong with it
 * (completing "<what> '<value>' ..."). */

/* UTF-8 text without control characters or non-characters; *chars gets
 * its length in characters. */
static const char *check_text(const char *s, size_t n, size_t *chars)
{
	*chars = 0;
	for (size_t i = 0; i < n; (*chars)++) {
		uint32_t cp;
		size_t k = utf8_decode((const unsigned char *)s + i, n - i, &cp);

		if (k == 0)
			return "is not valid UTF-8";
		if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0))
			return "contains a control character";
		if (cp == 0xfffe || cp == 0xffff)
			return "contains a non-character";
		i += k;
	}
	return NULL;
}

static const char *check_name(const char *s, size_t n)
{
	size_t chars;
	const char *why;

	if (n == 0)
		return "is empty";
	if ((why = check_text(s, n, &chars)))
		return why;
	if (memchr(s, '/', n))
		return "contains '/'";
	if (chars > FERRY_COOKIE_NAME_MAX)
		return "is longer than 256 characters";
	return NULL;
}

static int hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

static const char *check_uuid(const char *s, size_t n)
{
	if (n != FERRY_COOKIE_UUID_LEN)
		return "is not a canonical UUID (8-4-4-4-12 hex digits)";
	for (size_t i = 0; i < n; i++) {
		bool dash = i == 8 || i == 13 || i == 18 || i == 23;

		if (dash ? s[i] != '-' : hexval(s[i]) < 0)
			return "is not a canonical UUID (8-4-4-4-12 hex digits)";
	}
	return NULL;
}

/* Printable ASCII without space, 1..max bytes. */
static const char *check_graph(const char *s, size_t n, size_t max, const char *toolong)
{
	if (n == 0)
		return "is empty";
	if (n > max)
		return toolong;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
			return "contains a space, control or non-ASCII character";
	return NULL;
}

static const char *check_hostname(const char *s, size_t n)
{
	return check_graph(s, n, FERRY_COOKIE_HOSTNAME_MAX, "is longer than 255 bytes");
}

static const char *check_endpoint(const char *s, size_t n)
{
	return check_graph(s, n, FERRY_COOKIE_ENDPOINT_MAX, "is longer than 256 bytes");
}

static const char *check_socket(const char *s, size_t n)
{
	const char *why = check_graph(s, n, FERRY_COOKIE_SOCKET_MAX, "is longer than 107 bytes");

	if (!why && s[0] != '/')
		why = "is not an absolute path";
	return why;
}

static bool is_alnum(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
}

/* Feature and capability names: [A-Za-z0-9._-]{1,64}. */
static const char *check_token(const char *s, size_t n)
{
	if (n == 0)
		return "is empty";
	if (n > FERRY_COOKIE_TOKEN_MAX)
		return "is longer than 64 bytes";
	for (size_t i = 0; i < n; i++)
		if (!is_alnum(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
			return "has a character other than A-Z a-z 0-9 . _ -";
	return NULL;
}

/* Disk targets: [A-Za-z0-9_-]{1,32}. */
static const char *check_target(const char *s, size_t n)
{
	if (n == 0)
		return "is empty";
	if (n > FERRY_COOKIE_TARGET_MAX)
		return "is longer than 32 bytes";
	for (size_t i = 0; i < n; i++)
		if (!is_alnum(s[i]) && s[i] != '_' && s[i] != '-')
			return "has a character other than A-Z a-z 0-9 _ -";
	return NULL;
}

/* One QEMU argument: any UTF-8 text without control characters, bounded. */
static const char *check_arg(const char *s, size_t n)
{
	size_t chars;

	if (n > FERRY_COOKIE_ARG_MAX)
		return "is longer than 4096 bytes";
	return check_text(s, n, &chars);
}

bool ferry_cookie_arg_ok(const char *s, size_t n)
{
	return s && check_arg(s, n) == NULL;
}

/* A decimal uint64: digits only (no sign, no space), no overflow. */
static const char *parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return "is empty";
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return "is not a decimal number";
		unsigned d = (unsigned)(*s - '0');
		if (v > (UINT64_MAX - d) / 10)
			return "is larger than 18446744073709551615";
		v = v * 10 + d;
	}
	*out = v;
	return NULL;
}

/* ---- parse: tree helpers --------------------------------------------------- */

static bool is_elem(const xmlNode *n, const char *name)
{
	return n->type == XML_ELEMENT_NODE && n->ns == NULL &&
	       strcmp((const char *)n->name, name) == 0;
}

/* An attribute without namespace: 0 with *out NULL when absent, 0 with a
 * string to free() when present, -ENOMEM. */
static int get_attr(xmlNode *n, const char *name, char **out, struct ferry_err *err)
{
	*out = NULL;
	if (!xmlHasNsProp(n, (const xmlChar *)name, NULL))
		return 0;
	xmlChar *v = xmlGetNoNsProp(n, (const xmlChar *)name);
	if (!v)
		return nomem(err);
	*out = strdup((const char *)v);
	xmlFree(v);
	return *out ? 0 : nomem(err);
}

/* A mandatory attribute. */
static int need_attr(xmlNode *n, const char *name, const char *ctx, char **out,
		     struct ferry_err *err)
{
	int r = get_attr(n, name, out, err);

	if (r == 0 && !*out)
		r = bad(err, "cookie %s has no %s attribute", ctx, name);
	return r;
}

/* The text of an element that must hold only text (comments and processing
 * instructions are skipped): a string to free(). */
static int elem_text(const xmlNode *n, char **out, struct ferry_err *err)
{
	size_t total = 0;
	char *s;

	*out = NULL;
	for (const xmlNode *k = n->children; k; k = k->next) {
		if (k->type == XML_TEXT_NODE || k->type == XML_CDATA_SECTION_NODE)
			total += k->content ? strlen((const char *)k->content) : 0;
		else if (k->type != XML_COMMENT_NODE && k->type != XML_PI_NODE)
			return bad(err, "cookie <%s> must contain only text", (const char *)n->name);
	}
	s = malloc(total + 1);
	if (!s)
		return nomem(err);
	total = 0;
	for (const xmlNode *k = n->children; k; k = k->next) {
		if ((k->type == XML_TEXT_NODE || k->type == XML_CDATA_SECTION_NODE) && k->content) {
			size_t l = strlen((const char *)k->content);
			memcpy(s + total, k->content, l);
			total += l;
		}
	}
	s[total] = '\0';
	*out = s;
	return 0;
}

/* ---- parse: the parts ------------------------------------------------------- */

static int parse_feature(xmlNode *n, struct ferry_cookie *c, struct ferry_err *err)
{
	struct quoted q;
	const char *why;
	char *v;
	int r = need_attr(n, "name", "<feature>", &v, err);

	if (r < 0)
		return r;
	if ((why = check_token(v, strlen(v)))) {
		r = bad(err, "cookie <feature name='%s'>: name %s", quote(&q, v), why);
		goto out;
	}
	for (size_t i = 0; i < NFEATURES; i++) {
		if (strcmp(v, feature_names[i]) == 0) {
			if (c->features & (1u << i))
				r = bad(err, "cookie lists <feature name='%s'> twice", v);
			c->features |= 1u << i;
			goto out;
		}
	}
	r = fail(err, EOPNOTSUPP,
		 "cookie requires unknown feature '%s' (this ferry knows multifd, nbd, postcopy-setup, tls)",
		 quote(&q, v));
out:
	free(v);
	return r;
}

static int parse_text_field(xmlNode *n, char *dst, size_t dstsize,
			    const char *(*check)(const char *, size_t), struct ferry_err *err)
{
	struct quoted q;
	const char *why;
	char *v;
	int r = elem_text(n, &v, err);

	if (r < 0)
		return r;
	size_t len = strlen(v);
	if ((why = check(v, len)))
		r = bad(err, "cookie <%s> '%s' %s", (const char *)n->name, quote_n(&q, v, len), why);
	else if (len >= dstsize) /* cannot happen: every check bounds the length */
		r = bad(err, "cookie <%s> is too long", (const char *)n->name);
	else
		memcpy(dst, v, len + 1);
	free(v);
	return r;
}

static int parse_caps(xmlNode *caps, struct ferry_cookie *c, struct ferry_err *err)
{
	struct quoted q;
	size_t count = 0;

	for (xmlNode *n = caps->children; n; n = n->next) {
		const char *why;
		char *v;
		int r;

		if (!is_elem(n, "cap"))
			continue;
		if (++count > FERRY_COOKIE_MAX_CAPS)
			return bad(err, "cookie has more than %d <cap> elements", FERRY_COOKIE_MAX_CAPS);
		if ((r = need_attr(n, "name", "<cap>", &v, err)) < 0)
			return r;
		if ((why = check_token(v, strlen(v)))) {
			r = bad(err, "cookie <cap name='%s'>: name %s", quote(&q, v), why);
		} else {
			for (size_t i = 0; i < c->ncaps; i++)
				if (strcmp(c->caps[i], v) == 0)
					r = bad(err, "cookie lists <cap name='%s'> twice", v);
			if (r == 0)
				memcpy(c->caps[c->ncaps++], v, strlen(v) + 1);
		}
		free(v);
		if (r < 0)
			return r;
	}
	c->flags |= FERRY_COOKIE_CAPS;
	return 0;
}

static int parse_driver(xmlNode *n, struct ferry_cookie *c, struct ferry_err *err)
{
	struct ferry_cookie_driver *d = &c->drivers[c->ndrivers];
	char *name = NULL, *endpoint = NULL, *handoff = NULL;
	struct quoted q;
	const char *why;
	size_t kind = 0;
	int r;

	if ((r = need_attr(n, "name", "<driver>", &name, err)) < 0)
		return r;
	for (size_t i = 1; i < NDRIVER_NAMES; i++)
		if (strcmp(name, driver_names[i]) == 0)
			kind = i;
	if (kind == 0)
		goto out; /* a driver this version does not know: not offered to us */
	for (size_t i = 0; i < c->ndrivers; i++)
		if (c->drivers[i].kind == (enum ferry_cookie_driver_kind)kind) {
			r = bad(err, "cookie lists <driver name='%s'> twice", name);
			goto out;
		}
	if ((r = need_attr(n, "endpoint", "<driver>", &endpoint, err)) < 0)
		goto out;
	if ((why = check_endpoint(endpoint, strlen(endpoint)))) {
		r = bad(err, "cookie <driver name='%s'> attribute endpoint='%s' %s", name,
			quote(&q, endpoint), why);
		goto out;
	}
	if ((r = get_attr(n, "handoff", &handoff, err)) < 0)
		goto out;
	if (handoff && strcmp(handoff, "yes") != 0 && strcmp(handoff, "no") != 0) {
		r = bad(err, "cookie <driver name='%s'> attribute handoff='%s' is not 'yes' or 'no'",
			name, quote(&q, handoff));
		goto out;
	}
	d->kind = (enum ferry_cookie_driver_kind)kind;
	memcpy(d->endpoint, endpoint, strlen(endpoint) + 1);
	d->handoff = handoff && strcmp(handoff, "yes") == 0;
	c->ndrivers++;
out:
	free(name);
	free(endpoint);
	free(handoff);
	return r;
}

static int parse_transport(xmlNode *t, struct ferry_cookie *c, struct ferry_err *err)
{
	size_t count = 0;

	for (xmlNode *n = t->children; n; n = n->next) {
		if (!is_elem(n, "driver"))
			continue;
		/* Counts every <driver>, known or not: the limit bounds the work. */
		if (++count > FERRY_COOKIE_MAX_DRIVERS)
			return bad(err, "cookie has more than %d <driver> elements", FERRY_COOKIE_MAX_DRIVERS);
		int r = parse_driver(n, c, err);
		if (r < 0)
			return r;
	}
	c->flags |= FERRY_COOKIE_TRANSPORT;
	return 0;
}

static int parse_disk(xmlNode *n, struct ferry_cookie *c, struct ferry_err *err)
{
	struct ferry_cookie_disk *d = &c->nbd.disks[c->nbd.ndisks];
	char *target = NULL, *capacity = NULL;
	struct quoted q, q2;
	const char *why;
	int r;

	if ((r = need_attr(n, "target", "<disk>", &target, err)) < 0)
		return r;
	if ((why = check_target(target, strlen(target)))) {
		r = bad(err, "cookie <disk> attribute target='%s' %s", quote(&q, target), why);
		goto out;
	}
	for (size_t i = 0; i < c->nbd.ndisks; i++)
		if (strcmp(c->nbd.disks[i].target, target) == 0) {
			r = bad(err, "cookie lists <disk target='%s'> twice", target);
			goto out;
		}
	if ((r = need_attr(n, "capacity", "<disk>", &capacity, err)) < 0)
		goto out;
	if ((why = parse_u64(capacity, &d->capacity))) {
		r = bad(err, "cookie <disk target='%s'> attribute capacity='%s' %s", quote(&q, target),
			quote(&q2, capacity), why);
		goto out;
	}
	memcpy(d->target, target, strlen(target) + 1);
	c->nbd.ndisks++;
out:
	if (r < 0)
		memset(d, 0, sizeof(*d));
	free(target);
	free(capacity);
	return r;
}

static int parse_nbd(xmlNode *nbd, struct ferry_cookie *c, struct ferry_err *err)
{
	char *port = NULL, *sock = NULL;
	struct quoted q;
	const char *why;
	size_t count = 0;
	uint64_t v;
	int r;

	if ((r = get_attr(nbd, "port", &port, err)) < 0 ||
	    (r = get_attr(nbd, "socket", &sock, err)) < 0)
		goto out;
	if (port && sock) {
		r = bad(err, "cookie <nbd> has both a port and a socket attribute");
		goto out;
	}
	if (port) {
		if (!(why = parse_u64(port, &v)) && (v == 0 || v > 65535))
			why = "is not a port number (1..65535)";
		if (why) {
			r = bad(err, "cookie <nbd> attribute port='%s' %s", quote(&q, port), why);
			goto out;
		}
		c->nbd.port = (uint16_t)v;
	}
	if (sock) {
		if ((why = check_socket(sock, strlen(sock)))) {
			r = bad(err, "cookie <nbd> attribute socket='%s' %s", quote(&q, sock), why);
			goto out;
		}
		memcpy(c->nbd.socket, sock, strlen(sock) + 1);
	}
	for (xmlNode *n = nbd->children; n; n = n->next) {
		if (!is_elem(n, "disk"))
			continue;
		if (++count > FERRY_COOKIE_MAX_DISKS) {
			r = bad(err, "cookie has more than %d <disk> elements", FERRY_COOKIE_MAX_DISKS);
			goto out;
		}
		if ((r = parse_disk(n, c, err)) < 0)
			goto out;
	}
	c->flags |= FERRY_COOKIE_NBD;
out:
	free(port);
	free(sock);
	return r;
}

static int parse_u64_attr(xmlNode *n, const char *attr, const char *ctx, uint64_t min, uint64_t max, uint64_t *out,
			  struct ferry_err *err)
{
	char *v = NULL;
	struct quoted q;
	const char *why;
	int r = need_attr(n, attr, ctx, &v, err);
	if (r < 0)
		return r;
	if (!(why = parse_u64(v, out)) && (*out < min || *out > max))
		why = "is out of range";
	if (why)
		r = bad(err, "cookie %s attribute %s='%s' %s", ctx, attr, quote(&q, v), why);
	free(v);
	return r;
}

static int parse_blockdev(xmlNode *n, struct ferry_cookie *c, struct ferry_err *err)
{
	struct ferry_cookie_blockdev *b = &c->vm.blockdevs[c->vm.nblockdevs];
	char *name = NULL;
	struct quoted q;
	const char *why;
	int r;

	if ((r = need_attr(n, "name", "<blockdev>", &name, err)) < 0)
		return r;
	if ((why = check_token(name, strlen(name)))) {
		r = bad(err, "cookie <blockdev> attribute name='%s' %s", quote(&q, name), why);
		goto out;
	}
	for (size_t i = 0; i < c->vm.nblockdevs; i++)
		if (strcmp(c->vm.blockdevs[i].name, name) == 0) {
			r = bad(err, "cookie lists <blockdev name='%s'> twice", name);
			goto out;
		}
	if ((r = parse_u64_attr(n, "capacity", "<blockdev>", 0, UINT64_MAX, &b->capacity, err)) < 0)
		goto out;
	memcpy(b->name, name, strlen(name) + 1);
	c->vm.nblockdevs++;
out:
	if (r < 0)
		memset(b, 0, sizeof(*b));
	free(name);
	return r;
}

/* <qemu-cmdline><arg>..</arg>..</qemu-cmdline> into vm->cmdline. */
static int parse_cmdline(xmlNode *cl, struct ferry_cookie_vm *vm, struct ferry_err *err)
{
	struct quoted q;
	const char *why;
	int r = 0;

	for (xmlNode *n = cl->children; n; n = n->next) {
		char *v;

		if (!is_elem(n, "arg"))
			continue;
		if (vm->nargs == FERRY_COOKIE_MAX_ARGS) {
			r = bad(err, "cookie has more than %d <arg> elements", FERRY_COOKIE_MAX_ARGS);
			break;
		}
		if ((r = elem_text(n, &v, err)) < 0)
			break;
		size_t len = strlen(v);
		if ((why = check_arg(v, len)))
			r = bad(err, "cookie <arg> '%s' %s", quote(&q, v), why);
		else if (vm->cmdline_len + len + 1 > FERRY_COOKIE_CMDLINE_MAX)
			r = bad(err, "cookie <qemu-cmdline> is longer than %d bytes", FERRY_COOKIE_CMDLINE_MAX);
		if (r == 0) {
			memcpy(vm->cmdline + vm->cmdline_len, v, len + 1);
			vm->cmdline_len += len + 1;
			vm->nargs++;
		}
		free(v);
		if (r < 0)
			break;
	}
	if (r < 0) {
		vm->nargs = vm->cmdline_len = 0;
		memset(vm->cmdline, 0, sizeof(vm->cmdline));
	}
	return r;
}

static int parse_vm(xmlNode *vm, struct ferry_cookie *c, struct ferry_err *err)
{
	char *machine = NULL;
	struct quoted q;
	const char *why;
	size_t count = 0;
	int r;

	if ((r = parse_u64_attr(vm, "memory", "<vm>", 1, UINT64_MAX, &c->vm.memory, err)) < 0 ||
	    (r = parse_u64_attr(vm, "vcpus", "<vm>", 1, FERRY_COOKIE_MAX_VCPUS, &c->vm.vcpus, err)) < 0 ||
	    (r = need_attr(vm, "machine", "<vm>", &machine, err)) < 0)
		goto out;
	if ((why = check_token(machine, strlen(machine)))) {
		r = bad(err, "cookie <vm> attribute machine='%s' %s", quote(&q, machine), why);
		goto out;
	}
	memcpy(c->vm.machine, machine, strlen(machine) + 1);
	bool cmdline = false;
	for (xmlNode *n = vm->children; n; n = n->next) {
		if (is_elem(n, "qemu-cmdline")) {
			if (cmdline) {
				r = bad(err, "cookie has more than one <qemu-cmdline>");
				goto out;
			}
			cmdline = true;
			if ((r = parse_cmdline(n, &c->vm, err)) < 0)
				goto out;
		}
		if (!is_elem(n, "blockdev"))
			continue;
		if (++count > FERRY_COOKIE_MAX_BLOCKDEVS) {
			r = bad(err, "cookie has more than %d <blockdev> elements", FERRY_COOKIE_MAX_BLOCKDEVS);
			goto out;
		}
		if ((r = parse_blockdev(n, c, err)) < 0)
			goto out;
	}
	c->flags |= FERRY_COOKIE_VM;
out:
	free(machine);
	return r;
}

static int parse_stats(xmlNode *st, struct ferry_cookie *c, struct ferry_err *err)
{
	unsigned seen = 0;

	for (xmlNode *n = st->children; n; n = n->next) {
		for (size_t i = 0; i < NSTATS; i++) {
			struct quoted q;
			const char *why;
			char *v;
			int r;

			if (!is_elem(n, stat_fields[i].name))
				continue;
			if (seen & (1u << i))
				return bad(err, "cookie has more than one <%s> in <statistics>",
					   stat_fields[i].name);
			seen |= 1u << i;
			if ((r = elem_text(n, &v, err)) < 0)
				return r;
			uint64_t *dst = (uint64_t *)((char *)&c->stats + stat_fields[i].off);
			if ((why = parse_u64(v, dst)))
				r = bad(err, "cookie <%s> '%s' %s", stat_fields[i].name, quote(&q, v), why);
			free(v);
			if (r < 0)
				return r;
		}
	}
	c->flags |= FERRY_COOKIE_STATS;
	return 0;
}

/* The elements of <ferry-migration> that may appear at most once; the first
 * four must appear. */
enum { E_NAME, E_UUID, E_HOSTNAME, E_HOSTUUID, E_CAPS, E_TRANSPORT, E_NBD, E_STATS, E_VM, E_COUNT };
static const char *const single_elems[E_COUNT] = {
	[E_NAME] = "name", [E_UUID] = "uuid", [E_HOSTNAME] = "hostname", [E_HOSTUUID] = "hostuuid",
	[E_CAPS] = "capabilities", [E_TRANSPORT] = "transport", [E_NBD] = "nbd",
	[E_STATS] = "statistics", [E_VM] = "vm",
};

static void lower_hex(char *s)
{
	for (; *s; s++)
		if (*s >= 'A' && *s <= 'F')
			*s = (char)(*s - 'A' + 'a');
}

static int parse_root(xmlNode *root, struct ferry_cookie *c, struct ferry_err *err)
{
	unsigned seen = 0;
	size_t nfeatures = 0;
	int r;

	/* Mandatory features first: a cookie from a newer peer then fails on
	 * the feature it needs rather than on whatever comes with it. */
	for (xmlNode *n = root->children; n; n = n->next)
		if (is_elem(n, "feature") && ++nfeatures > FERRY_COOKIE_MAX_FEATURES)
			return bad(err, "cookie has more than %d <feature> elements", FERRY_COOKIE_MAX_FEATURES);
	for (xmlNode *n = root->children; n; n = n->next)
		if (is_elem(n, "feature") && (r = parse_feature(n, c, err)) < 0)
			return r;

	for (xmlNode *n = root->children; n; n = n->next) {
		int which;

		for (which = 0; which < E_COUNT; which++)
			if (is_elem(n, single_elems[which]))
				break;
		if (which == E_COUNT)
			continue; /* <feature>, text, comments, unknown elements */
		if (seen & (1u << which))
			return bad(err, "cookie has more than one <%s> element", single_elems[which]);
		seen |= 1u << which;

		switch (which) {
		case E_NAME:
			r = parse_text_field(n, c->name, sizeof(c->name), check_name, err);
			break;
		case E_UUID:
			r = parse_text_field(n, c->uuid, sizeof(c->uuid), check_uuid, err);
			break;
		case E_HOSTNAME:
			r = parse_text_field(n, c->hostname, sizeof(c->hostname), check_hostname, err);
			break;
		case E_HOSTUUID:
			r = parse_text_field(n, c->hostuuid, sizeof(c->hostuuid), check_uuid, err);
			break;
		case E_CAPS:
			r = parse_caps(n, c, err);
			break;
		case E_TRANSPORT:
			r = parse_transport(n, c, err);
			break;
		case E_NBD:
			r = parse_nbd(n, c, err);
			break;
		case E_VM:
			r = parse_vm(n, c, err);
			break;
		default:
			r = parse_stats(n, c, err);
			break;
		}
		if (r < 0)
			return r;
	}
	for (int i = E_NAME; i <= E_HOSTUUID; i++)
		if (!(seen & (1u << i)))
			return bad(err, "cookie has no <%s> element", single_elems[i]);
	lower_hex(c->uuid);
	lower_hex(c->hostuuid);
	return 0;
}

/* ---- parse: the document ---------------------------------------------------- */

struct xml_state {
	bool doctype;    /* saw a DOCTYPE or an entity declaration */
	bool nomem;
	bool have_error;
	int line;
	char msg[160];   /* libxml2's first error, sanitized */
};

static void on_doctype(void *ctx, const xmlChar *name, const xmlChar *ext_id, const xmlChar *sys_id)
{
	xmlParserCtxtPtr ctxt = ctx;
	struct xml_state *st = ctxt->_private;

	st->doctype = true;
	xmlStopParser(ctxt);
}

static void on_entity_decl(void *ctx, const xmlChar *name, int type, const xmlChar *public_id,
			   const xmlChar *system_id, xmlChar *content)
{
	on_doctype(ctx, name, public_id, system_id);
}

#if LIBXML_VERSION >= 21200
static void on_error(void *ctx, const xmlError *e)
#else
static void on_error(void *ctx, xmlErrorPtr e)
#endif
{
	xmlParserCtxtPtr ctxt = ctx;
	struct xml_state *st = ctxt->_private;

	if (!e || e->level < XML_ERR_ERROR || st->have_error)
		return;
	st->have_error = true;
	st->line = e->line;
	if (e->code == XML_ERR_NO_MEMORY)
		st->nomem = true;
	size_t o = 0;
	for (const char *m = e->message ? e->message : "unknown error"; *m && o < sizeof(st->msg) - 1; m++) {
		unsigned char ch = (unsigned char)*m;
		if (ch == '\n' && m[1] == '\0')
			break;
		st->msg[o++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
	}
	st->msg[o] = '\0';
}

/* Before libxml2 sees the bytes: UTF-8 only (this also rules out UTF-16 and
 * other encodings a declaration could switch to), no NUL. */
static int check_input(const char *xml, size_t len, struct ferry_err *err)
{
	for (size_t i = 0; i < len;) {
		uint32_t cp;
		size_t k = utf8_decode((const unsigned char *)xml + i, len - i, &cp);

		if (k == 0)
			return bad(err, "cookie is not valid UTF-8 (at byte %zu)", i);
		if (cp == 0)
			return bad(err, "cookie contains a NUL byte (at byte %zu)", i);
		i += k;
	}
	return 0;
}

int ferry_cookie_parse(const char *xml, size_t len, struct ferry_cookie *out, struct ferry_err *err)
{
	struct xml_state st = { 0 };
	xmlParserCtxtPtr ctxt;
	xmlDocPtr doc;
	xmlNode *root;
	int r;

	if (!out)
		return ferry_err_set(err, EINVAL, "ferry_cookie_parse: no output cookie");
	memset(out, 0, sizeof(*out));
	if (!xml)
		return ferry_err_set(err, EINVAL, "ferry_cookie_parse: no cookie");
	if (len > FERRY_COOKIE_MAX_BYTES)
		return ferry_err_set(err, EMSGSIZE, "cookie larger than %u bytes (%zu bytes)",
				     FERRY_COOKIE_MAX_BYTES, len);
	if (len == 0)
		return bad(err, "cookie is empty");
	if ((r = check_input(xml, len, err)) < 0)
		return r;

	pthread_once(&xml_once, xmlInitParser);
	ctxt = xmlCreateMemoryParserCtxt(xml, (int)len);
	if (!ctxt)
		return nomem(err);
	xmlCtxtUseOptions(ctxt, PARSE_OPTIONS);
	ctxt->_private = &st;
	ctxt->sax->internalSubset = on_doctype;
	ctxt->sax->externalSubset = NULL;
	ctxt->sax->entityDecl = on_entity_decl;
	ctxt->sax->serror = on_error;
	xmlParseDocument(ctxt);
	doc = ctxt->myDoc;
	ctxt->myDoc = NULL;
	bool wellformed = ctxt->wellFormed;
	xmlFreeParserCtxt(ctxt);

	if (st.doctype || (doc && (doc->intSubset || doc->extSubset)))
		r = bad(err, "cookie contains a DOCTYPE declaration (DTDs and entities are not allowed)");
	else if (st.nomem)
		r = nomem(err);
	else if (!wellformed || !doc)
		r = bad(err, "cookie is not well-formed XML: line %d: %s", st.line,
			st.have_error ? st.msg : "parse failed");
	else if (!(root = xmlDocGetRootElement(doc)))
		r = bad(err, "cookie has no root element");
	else if (!is_elem(root, ROOT_NAME)) {
		struct quoted q;
		r = bad(err, "cookie root element is <%s%s>, expected <" ROOT_NAME ">",
			root->ns ? "namespaced " : "", quote(&q, (const char *)root->name));
	} else
		r = parse_root(root, out, err);
	xmlFreeDoc(doc);
	if (r < 0)
		memset(out, 0, sizeof(*out));
	return r;
}

/* ---- format ------------------------------------------------------------------ */

/* A caller's string field: NUL-terminated within its array, then checked. */
static int check_field(const char *s, size_t size, const char *what,
		       const char *(*check)(const char *, size_t), struct ferry_err *err)
{
	struct quoted q;
	size_t n = strnlen(s, size);
	const char *why = n == size ? "is not NUL-terminated" : check(s, n);

	if (why)
		return ferry_err_set(err, EINVAL, "cookie %s '%s' %s", what, quote_n(&q, s, n), why);
	return 0;
}

#define CHECK_FIELD(field, what, check) \
	do { \
		int r_ = check_field((field), sizeof(field), (what), (check), err); \
		if (r_ < 0) \
			return r_; \
	} while (0)

static int validate(const struct ferry_cookie *c, struct ferry_err *err)
{
	CHECK_FIELD(c->name, "<name>", check_name);
	CHECK_FIELD(c->uuid, "<uuid>", check_uuid);
	CHECK_FIELD(c->hostname, "<hostname>", check_hostname);
	CHECK_FIELD(c->hostuuid, "<hostuuid>", check_uuid);
	if (c->features & ~FERRY_COOKIE_FEAT_ALL)
		return ferry_err_set(err, EINVAL, "cookie has unknown feature bits 0x%" PRIx32,
				     c->features & ~FERRY_COOKIE_FEAT_ALL);
	if (c->flags & ~FERRY_COOKIE_FLAGS_ALL)
		return ferry_err_set(err, EINVAL, "cookie has unknown flag bits 0x%" PRIx32,
				     c->flags & ~FERRY_COOKIE_FLAGS_ALL);
	if (c->flags & FERRY_COOKIE_CAPS) {
		if (c->ncaps > FERRY_COOKIE_MAX_CAPS)
			return ferry_err_set(err, EINVAL, "cookie has %zu capabilities (at most %d)",
					     c->ncaps, FERRY_COOKIE_MAX_CAPS);
		for (size_t i = 0; i < c->ncaps; i++) {
			CHECK_FIELD(c->caps[i], "<cap name>", check_token);
			for (size_t j = 0; j < i; j++)
				if (strcmp(c->caps[i], c->caps[j]) == 0)
					return ferry_err_set(err, EINVAL, "cookie lists capability '%s' twice",
							     c->caps[i]);
		}
	}
	if (c->flags & FERRY_COOKIE_TRANSPORT) {
		if (c->ndrivers > FERRY_COOKIE_MAX_DRIVERS)
			return ferry_err_set(err, EINVAL, "cookie has %zu drivers (at most %d)",
					     c->ndrivers, FERRY_COOKIE_MAX_DRIVERS);
		for (size_t i = 0; i < c->ndrivers; i++) {
			const struct ferry_cookie_driver *d = &c->drivers[i];

			if (!ferry_cookie_driver_name(d->kind))
				return ferry_err_set(err, EINVAL, "cookie driver %zu has unknown kind %d",
						     i, (int)d->kind);
			for (size_t j = 0; j < i; j++)
				if (c->drivers[j].kind == d->kind)
					return ferry_err_set(err, EINVAL, "cookie lists driver '%s' twice",
							     ferry_cookie_driver_name(d->kind));
			CHECK_FIELD(d->endpoint, "<driver endpoint>", check_endpoint);
		}
	}
	if (c->flags & FERRY_COOKIE_VM) {
		if (c->vm.memory == 0 || c->vm.vcpus == 0 || c->vm.vcpus > FERRY_COOKIE_MAX_VCPUS)
			return ferry_err_set(err, EINVAL, "cookie <vm> needs memory > 0 and 1..%d vcpus",
					     FERRY_COOKIE_MAX_VCPUS);
		CHECK_FIELD(c->vm.machine, "<vm machine>", check_token);
		if (c->vm.nblockdevs > FERRY_COOKIE_MAX_BLOCKDEVS)
			return ferry_err_set(err, EINVAL, "cookie has %zu block devices (at most %d)",
					     c->vm.nblockdevs, FERRY_COOKIE_MAX_BLOCKDEVS);
		for (size_t i = 0; i < c->vm.nblockdevs; i++) {
			CHECK_FIELD(c->vm.blockdevs[i].name, "<blockdev name>", check_token);
			for (size_t j = 0; j < i; j++)
				if (strcmp(c->vm.blockdevs[i].name, c->vm.blockdevs[j].name) == 0)
					return ferry_err_set(err, EINVAL, "cookie lists block device '%s' twice",
							     c->vm.blockdevs[i].name);
		}
		if (c->vm.nargs > FERRY_COOKIE_MAX_ARGS || c->vm.cmdline_len > FERRY_COOKIE_CMDLINE_MAX)
			return ferry_err_set(err, EINVAL, "cookie <qemu-cmdline> has %zu arguments in %zu bytes (at most "
					     "%d in %d)", c->vm.nargs, c->vm.cmdline_len, FERRY_COOKIE_MAX_ARGS,
					     FERRY_COOKIE_CMDLINE_MAX);
		size_t off = 0;
		for (size_t i = 0; i < c->vm.nargs; i++) {
			const char *a = c->vm.cmdline + off;
			size_t len = strnlen(a, c->vm.cmdline_len - off);
			const char *why;
			struct quoted q;

			if (off + len >= c->vm.cmdline_len)
				return ferry_err_set(err, EINVAL, "cookie <qemu-cmdline> holds fewer than %zu arguments",
						     c->vm.nargs);
			if ((why = check_arg(a, len)))
				return ferry_err_set(err, EINVAL, "cookie <arg> '%s' %s", quote_n(&q, a, len), why);
			off += len + 1;
		}
		if (off != c->vm.cmdline_len)
			return ferry_err_set(err, EINVAL, "cookie <qemu-cmdline> holds more than %zu arguments",
					     c->vm.nargs);
	}
	if (c->flags & FERRY_COOKIE_NBD) {
		if (c->nbd.port && c->nbd.socket[0])
			return ferry_err_set(err, EINVAL, "cookie <nbd> has both a port and a socket");
		if (c->nbd.socket[0])
			CHECK_FIELD(c->nbd.socket, "<nbd socket>", check_socket);
		if (c->nbd.ndisks > FERRY_COOKIE_MAX_DISKS)
			return ferry_err_set(err, EINVAL, "cookie has %zu disks (at most %d)",
					     c->nbd.ndisks, FERRY_COOKIE_MAX_DISKS);
		for (size_t i = 0; i < c->nbd.ndisks; i++) {
			CHECK_FIELD(c->nbd.disks[i].target, "<disk target>", check_target);
			for (size_t j = 0; j < i; j++)
				if (strcmp(c->nbd.disks[i].target, c->nbd.disks[j].target) == 0)
					return ferry_err_set(err, EINVAL, "cookie lists disk '%s' twice",
							     c->nbd.disks[i].target);
		}
	}
	return 0;
}

static xmlNode *add_elem(xmlNode *parent, const char *name)
{
	return xmlNewChild(parent, NULL, (const xmlChar *)name, NULL);
}

static bool add_prop(xmlNode *n, const char *name, const char *value)
{
	return xmlNewProp(n, (const xmlChar *)name, (const xmlChar *)value) != NULL;
}

/* Child element holding text (escaped by libxml2). */
static bool add_text(xmlNode *parent, const char *name, const char *text)
{
	return xmlNewTextChild(parent, NULL, (const xmlChar *)name, (const xmlChar *)text) != NULL;
}

static bool build(const struct ferry_cookie *c, xmlNode *root)
{
	char uuid[FERRY_COOKIE_UUID_LEN + 1], hostuuid[FERRY_COOKIE_UUID_LEN + 1];
	char num[24];
	xmlNode *n, *k;

	memcpy(uuid, c->uuid, sizeof(uuid)); /* validated: 36 chars and a NUL */
	memcpy(hostuuid, c->hostuuid, sizeof(hostuuid));
	lower_hex(uuid);
	lower_hex(hostuuid);
	if (!add_text(root, "name", c->name) || !add_text(root, "uuid", uuid) ||
	    !add_text(root, "hostname", c->hostname) || !add_text(root, "hostuuid", hostuuid))
		return false;
	for (size_t i = 0; i < NFEATURES; i++)
		if ((c->features & (1u << i)) &&
		    (!(n = add_elem(root, "feature")) || !add_prop(n, "name", feature_names[i])))
			return false;
	if (c->flags & FERRY_COOKIE_CAPS) {
		if (!(n = add_elem(root, "capabilities")))
			return false;
		for (size_t i = 0; i < c->ncaps; i++)
			if (!(k = add_elem(n, "cap")) || !add_prop(k, "name", c->caps[i]))
				return false;
	}
	if (c->flags & FERRY_COOKIE_TRANSPORT) {
		if (!(n = add_elem(root, "transport")))
			return false;
		for (size_t i = 0; i < c->ndrivers; i++) {
			const struct ferry_cookie_driver *d = &c->drivers[i];

			if (!(k = add_elem(n, "driver")) || !add_prop(k, "name", driver_names[d->kind]) ||
			    !add_prop(k, "endpoint", d->endpoint) ||
			    !add_prop(k, "handoff", d->handoff ? "yes" : "no"))
				return false;
		}
	}
	if (c->flags & FERRY_COOKIE_NBD) {
		if (!(n = add_elem(root, "nbd")))
			return false;
		if (c->nbd.port) {
			snprintf(num, sizeof(num), "%u", (unsigned)c->nbd.port);
			if (!add_prop(n, "port", num))
				return false;
		}
		if (c->nbd.socket[0] && !add_prop(n, "socket", c->nbd.socket))
			return false;
		for (size_t i = 0; i < c->nbd.ndisks; i++) {
			snprintf(num, sizeof(num), "%" PRIu64, c->nbd.disks[i].capacity);
			if (!(k = add_elem(n, "disk")) || !add_prop(k, "target", c->nbd.disks[i].target) ||
			    !add_prop(k, "capacity", num))
				return false;
		}
	}
	if (c->flags & FERRY_COOKIE_VM) {
		if (!(n = add_elem(root, "vm")))
			return false;
		snprintf(num, sizeof(num), "%" PRIu64, c->vm.memory);
		if (!add_prop(n, "memory", num))
			return false;
		snprintf(num, sizeof(num), "%" PRIu64, c->vm.vcpus);
		if (!add_prop(n, "vcpus", num) || !add_prop(n, "machine", c->vm.machine))
			return false;
		for (size_t i = 0; i < c->vm.nblockdevs; i++) {
			snprintf(num, sizeof(num), "%" PRIu64, c->vm.blockdevs[i].capacity);
			if (!(k = add_elem(n, "blockdev")) || !add_prop(k, "name", c->vm.blockdevs[i].name) ||
			    !add_prop(k, "capacity", num))
				return false;
		}
		if (c->vm.nargs) {
			if (!(k = add_elem(n, "qemu-cmdline")))
				return false;
			for (size_t i = 0, off = 0; i < c->vm.nargs; i++) {
				if (!add_text(k, "arg", c->vm.cmdline + off))
					return false;
				off += strlen(c->vm.cmdline + off) + 1;
			}
		}
	}
	if (c->flags & FERRY_COOKIE_STATS) {
		if (!(n = add_elem(root, "statistics")))
			return false;
		for (size_t i = 0; i < NSTATS; i++) {
			const uint64_t *v = (const uint64_t *)((const char *)&c->stats + stat_fields[i].off);

			snprintf(num, sizeof(num), "%" PRIu64, *v);
			if (!add_text(n, stat_fields[i].name, num))
				return false;
		}
	}
	return true;
}

int ferry_cookie_format(const struct ferry_cookie *c, char **xml_out, struct ferry_err *err)
{
	xmlBufferPtr buf = NULL;
	xmlDocPtr doc = NULL;
	xmlNode *root;
	int r;

	if (!xml_out)
		return ferry_err_set(err, EINVAL, "ferry_cookie_format: no output pointer");
	*xml_out = NULL;
	if (!c)
		return ferry_err_set(err, EINVAL, "ferry_cookie_format: no cookie");
	if ((r = validate(c, err)) < 0)
		return r;

	pthread_once(&xml_once, xmlInitParser);
	r = -ENOMEM;
	if (!(doc = xmlNewDoc((const xmlChar *)"1.0")) ||
	    !(root = xmlNewDocNode(doc, NULL, (const xmlChar *)ROOT_NAME, NULL)))
		goto out;
	xmlDocSetRootElement(doc, root);
	if (!build(c, root) || !(buf = xmlBufferCreate()) || xmlNodeDump(buf, doc, root, 0, 1) < 0)
		goto out;

	size_t len = (size_t)xmlBufferLength(buf);
	if (len + 1 > FERRY_COOKIE_MAX_BYTES) { /* cannot happen with the field limits */
		r = ferry_err_set(err, EMSGSIZE, "cookie larger than %u bytes", FERRY_COOKIE_MAX_BYTES);
		goto out;
	}
	char *s = malloc(len + 2);
	if (!s)
		goto out;
	memcpy(s, xmlBufferContent(buf), len);
	s[len] = '\n';
	s[len + 1] = '\0';
	*xml_out = s;
	r = 0;
out:
	if (r == -ENOMEM)
		nomem(err);
	xmlBufferFree(buf);
	xmlFreeDoc(doc);
	return r;
}

/* ---- the rest ------------------------------------------------------------------ */

void ferry_cookie_clear(struct ferry_cookie *c)
{
	if (c)
		memset(c, 0, sizeof(*c));
}

int ferry_cookie_check_peer(const struct ferry_cookie *mine, const struct ferry_cookie *theirs,
			    struct ferry_err *err)
{
	struct quoted q1, q2, q3;

	if (!mine || !theirs)
		return ferry_err_set(err, EINVAL, "ferry_cookie_check_peer: no cookie");
	if (check_field(mine->uuid, sizeof(mine->uuid), "(local) <uuid>", check_uuid, err) < 0 ||
	    check_field(mine->hostuuid, sizeof(mine->hostuuid), "(local) <hostuuid>", check_uuid, err) < 0 ||
	    check_field(theirs->uuid, sizeof(theirs->uuid), "(peer) <uuid>", check_uuid, err) < 0 ||
	    check_field(theirs->hostuuid, sizeof(theirs->hostuuid), "(peer) <hostuuid>", check_uuid, err) < 0)
		return -EINVAL;
	if (strcasecmp(mine->uuid, theirs->uuid) != 0 ||
	    strncmp(mine->name, theirs->name, sizeof(mine->name)) != 0)
		return ferry_err_set(err, EINVAL,
				     "cookie is for VM '%s' (uuid %s), this migration is for '%s' (uuid %s)",
				     QUOTE_FIELD(&q1, theirs->name), theirs->uuid,
				     QUOTE_FIELD(&q2, mine->name), mine->uuid);
	if (strcasecmp(mine->hostuuid, theirs->hostuuid) == 0)
		return ferry_err_set(err, EINVAL,
				     "cookie comes from host '%s' (hostuuid %s), which is this host ('%s'): "
				     "refusing to migrate VM '%s' to the same host",
				     QUOTE_FIELD(&q1, theirs->hostname), theirs->hostuuid,
				     QUOTE_FIELD(&q2, mine->hostname), QUOTE_FIELD(&q3, mine->name));
	return 0;
}

bool ferry_cookie_has_cap(const struct ferry_cookie *c, const char *name)
{
	if (!c || !name || !(c->flags & FERRY_COOKIE_CAPS))
		return false;
	for (size_t i = 0; i < c->ncaps && i < FERRY_COOKIE_MAX_CAPS; i++)
		if (strncmp(c->caps[i], name, sizeof(c->caps[i])) == 0)
			return true;
	return false;
}

const char *ferry_cookie_feature_name(uint32_t feature)
{
	for (size_t i = 0; i < NFEATURES; i++)
		if (feature == 1u << i)
			return feature_names[i];
	return NULL;
}

const char *ferry_cookie_driver_name(enum ferry_cookie_driver_kind kind)
{
	if ((size_t)kind > 0 && (size_t)kind < NDRIVER_NAMES)
		return driver_names[kind];
	return NULL;
}

int ferry_cookie_save(const char *dir, const char *name, const char *xml, struct ferry_err *err)
{
	char path[4096];
	if ((size_t)snprintf(path, sizeof(path), "%s/%s.xml", dir, name) >= sizeof(path))
		return ferry_err_set(err, ENAMETOOLONG, "cookie log path too long");
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return ferry_err_set(err, errno, "cannot write %s: %s", path, strerror(errno));
	size_t len = strlen(xml), off = 0;
	int rc = 0;
	while (off < len) {
		ssize_t w = write(fd, xml + off, len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			rc = ferry_err_set(err, errno ? errno : EIO, "cannot write %s: %s", path, strerror(errno));
			break;
		}
		off += (size_t)w;
	}
	if (close(fd) && !rc)
		rc = ferry_err_set(err, errno, "cannot write %s: %s", path, strerror(errno));
	return rc;
}

int ferry_cookie_check_shape(const struct ferry_cookie *src, const struct ferry_cookie *dst, struct ferry_err *err)
{
	if (!(src->flags & FERRY_COOKIE_VM) || !(dst->flags & FERRY_COOKIE_VM))
		return 0;
	const struct ferry_cookie_vm *a = &src->vm, *b = &dst->vm;
	if (a->memory != b->memory)
		return ferry_err_set(err, EINVAL, "the destination VM has %" PRIu64 " bytes of memory, the source %" PRIu64,
				     b->memory, a->memory);
	if (a->vcpus != b->vcpus)
		return ferry_err_set(err, EINVAL, "the destination VM has %" PRIu64 " vCPUs, the source %" PRIu64, b->vcpus,
				     a->vcpus);
	if (strcmp(a->machine, b->machine) != 0)
		return ferry_err_set(err, EINVAL, "the destination VM is machine type '%s', the source '%s'", b->machine,
				     a->machine);
	for (size_t i = 0; i < a->nblockdevs; i++) {
		size_t j;
		for (j = 0; j < b->nblockdevs && strcmp(a->blockdevs[i].name, b->blockdevs[j].name) != 0; j++)
			;
		if (j == b->nblockdevs)
			return ferry_err_set(err, EINVAL, "the destination VM has no block device '%s'", a->blockdevs[i].name);
		if (b->blockdevs[j].capacity < a->blockdevs[i].capacity)
			return ferry_err_set(err, EINVAL,
					     "the destination's block device '%s' holds %" PRIu64 " bytes, the source's %" PRIu64,
					     a->blockdevs[i].name, b->blockdevs[j].capacity, a->blockdevs[i].capacity);
	}
	return 0;
}

enum ferry_cookie_driver_kind ferry_cookie_driver_kind(const char *name)
{
	for (int k = FERRY_COOKIE_DRIVER_TCP; name && k <= FERRY_COOKIE_DRIVER_RDMA; k++)
		if (strcmp(name, driver_names[k]) == 0)
			return (enum ferry_cookie_driver_kind)k;
	return 0;
}
