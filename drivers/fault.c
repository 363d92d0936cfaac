#include "fault.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct held {
	uint8_t *data;
	size_t len;
	unsigned countdown;   /* later datagrams still to pass before this one goes */
	uint64_t due_ns;      /* or this time, when hold_ns is set */
};

struct ferry_fault {
	struct ferry_fault_config cfg;
	uint64_t s[4];        /* xoshiro256** state */
	uint8_t *scratch;     /* the corrupted copy of the current datagram */
	struct held held[FERRY_FAULT_HOLD_MAX];
	unsigned nheld;
	struct ferry_fault_stats st;
};

/* ---- deterministic randomness ------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t next_u64(struct ferry_fault *f)
{
	uint64_t *s = f->s;
	uint64_t r = rotl(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return r;
}

static double next_unit(struct ferry_fault *f)
{
	return (double)(next_u64(f) >> 11) * 0x1.0p-53;
}

/* ---- configuration ------------------------------------------------------ */

static int parse_rate(const char *key, const char *v, size_t n, double *out, struct ferry_err *err)
{
	char buf[64];
	if (n == 0 || n >= sizeof(buf))
		return ferry_err_set(err, EINVAL, "fault option %s: '%.*s' is not a rate", key, (int)n, v);
	memcpy(buf, v, n);
	buf[n] = '\0';
	bool percent = buf[n - 1] == '%';
	if (percent)
		buf[n - 1] = '\0';
	char *end;
	errno = 0;
	double d = strtod(buf, &end);
	if (errno || end == buf || *end || !isfinite(d))
		return ferry_err_set(err, EINVAL, "fault option %s: '%.*s' is not a rate", key, (int)n, v);
	if (percent)
		d /= 100.0;
	if (d < 0.0 || d > 1.0)
		return ferry_err_set(err, EINVAL, "fault option %s: %.*s is outside 0..1 (0%%..100%%)", key, (int)n, v);
	*out = d;
	return 0;
}

static int parse_uint(const char *key, const char *v, size_t n, uint64_t max, uint64_t *out,
		      struct ferry_err *err)
{
	char buf[32];
	if (n == 0 || n >= sizeof(buf) || v[0] == '-')
		return ferry_err_set(err, EINVAL, "fault option %s: '%.*s' is not a number", key, (int)n, v);
	memcpy(buf, v, n);
	buf[n] = '\0';
	char *end;
	errno = 0;
	unsigned long long u = strtoull(buf, &end, 0);
	if (errno || end == buf || *end)
		return ferry_err_set(err, EINVAL, "fault option %s: '%.*s' is not a number", key, (int)n, v);
	if (u > max)
		return ferry_err_set(err, EINVAL, "fault option %s: %llu is larger than %llu", key, u,
				     (unsigned long long)max);
	*out = u;
	return 0;
}

int ferry_fault_parse(const char *spec, struct ferry_fault_config *cfg, struct ferry_err *err)
{
	memset(cfg, 0, sizeof(*cfg));
	if (!spec)
		return 0;
	const char *p = spec;
	while (*p) {
		const char *item = p;
		size_t len = strcspn(p, ",");
		p += len;
		if (*p == ',')
			p++;
		/* tolerate spaces around items ("drop=0.01, dup=0.02") */
		while (len && (*item == ' ' || *item == '\t')) {
			item++;
			len--;
		}
		while (len && (item[len - 1] == ' ' || item[len - 1] == '\t'))
			len--;
		if (len == 0)
			continue;
		const char *eq = memchr(item, '=', len);
		if (!eq)
			return ferry_err_set(err, EINVAL, "fault option '%.*s' has no '=value'", (int)len, item);
		size_t klen = (size_t)(eq - item);
		const char *v = eq + 1;
		size_t vlen = len - klen - 1;
		uint64_t u;
		int rc;
#define KEY_IS(k) (klen == sizeof(k) - 1 && memcmp(item, k, klen) == 0)
		if (KEY_IS("drop"))
			rc = parse_rate("drop", v, vlen, &cfg->drop, err);
		else if (KEY_IS("dup"))
			rc = parse_rate("dup", v, vlen, &cfg->dup, err);
		else if (KEY_IS("reorder"))
			rc = parse_rate("reorder", v, vlen, &cfg->reorder, err);
		else if (KEY_IS("corrupt"))
			rc = parse_rate("corrupt", v, vlen, &cfg->corrupt, err);
		else if (KEY_IS("seed")) {
			rc = parse_uint("seed", v, vlen, UINT64_MAX, &u, err);
			cfg->seed = u;
		} else if (KEY_IS("depth")) {
			rc = parse_uint("depth", v, vlen, FERRY_FAULT_HOLD_MAX, &u, err);
			if (!rc && u == 0)
				rc = ferry_err_set(err, EINVAL, "fault option depth must be at least 1");
			cfg->reorder_depth = (unsigned)u;
		} else if (KEY_IS("hold_us")) {
			rc = parse_uint("hold_us", v, vlen, UINT64_MAX / 1000, &u, err);
			cfg->hold_ns = u * 1000;
		} else {
			return ferry_err_set(err, EINVAL, "unknown fault option '%.*s' (known: drop, dup, reorder, corrupt, seed, depth, hold_us)",
					     (int)klen, item);
		}
#undef KEY_IS
		if (rc)
			return rc;
	}
	return 0;
}

static bool rate_ok(double r)
{
	return r >= 0.0 && r <= 1.0; /* false for NaN too */
}

int ferry_fault_create(const struct ferry_fault_config *cfg, struct ferry_fault **out, struct ferry_err *err)
{
	*out = NULL;
	if (!rate_ok(cfg->drop) || !rate_ok(cfg->dup) || !rate_ok(cfg->reorder) || !rate_ok(cfg->corrupt))
		return ferry_err_set(err, EINVAL, "fault rates must lie between 0 and 1");
	if (cfg->reorder_depth > FERRY_FAULT_HOLD_MAX)
		return ferry_err_set(err, EINVAL, "fault reorder depth %u exceeds %u", cfg->reorder_depth,
				     FERRY_FAULT_HOLD_MAX);
	struct ferry_fault *f = calloc(1, sizeof(*f));
	if (!f)
		return ferry_err_set(err, ENOMEM, "out of memory for the fault injector");
	f->scratch = malloc(FERRY_FAULT_DGRAM_MAX);
	if (!f->scratch) {
		free(f);
		return ferry_err_set(err, ENOMEM, "out of memory for the fault injector");
	}
	f->cfg = *cfg;
	if (!f->cfg.reorder_depth)
		f->cfg.reorder_depth = 8;
	uint64_t x = cfg->seed;
	for (int i = 0; i < 4; i++)
		f->s[i] = splitmix64(&x);
	*out = f;
	return 0;
}

void ferry_fault_destroy(struct ferry_fault *f)
{
	if (!f)
		return;
	for (unsigned i = 0; i < f->nheld; i++)
		free(f->held[i].data);
	free(f->scratch);
	free(f);
}

/* ---- the path ----------------------------------------------------------- */

static int emit_one(struct ferry_fault *f, const void *data, size_t len, ferry_fault_emit_fn emit, void *ctx)
{
	f->st.emitted++;
	return emit(ctx, data, len);
}

/* Emit and forget held datagram i, keeping the others in holding order. */
static int release(struct ferry_fault *f, unsigned i, ferry_fault_emit_fn emit, void *ctx)
{
	struct held h = f->held[i];
	memmove(&f->held[i], &f->held[i + 1], (f->nheld - i - 1) * sizeof(f->held[0]));
	f->nheld--;
	int rc = emit_one(f, h.data, h.len, emit, ctx);
	free(h.data);
	return rc;
}

int ferry_fault_submit(struct ferry_fault *f, const void *data, size_t len, uint64_t now_ns,
		       ferry_fault_emit_fn emit, void *ctx)
{
	const struct ferry_fault_config *c = &f->cfg;
	/* Four draws per datagram whatever happens, so one fault's decisions do
	 * not shift the others': each rate holds on its own. */
	double u_drop = next_unit(f), u_corrupt = next_unit(f), u_reorder = next_unit(f), u_dup = next_unit(f);
	unsigned already = f->nheld;  /* held before this datagram: they age by one */
	int rc = 0;

	f->st.seen++;
	if (u_drop < c->drop) {
		f->st.dropped++;
	} else {
		const uint8_t *p = data;
		if (u_corrupt < c->corrupt && len > 0 && len <= FERRY_FAULT_DGRAM_MAX) {
			memcpy(f->scratch, data, len);
			size_t pos = (size_t)(next_u64(f) % len);
			f->scratch[pos] ^= (uint8_t)(1 + next_u64(f) % 255); /* never a no-op */
			p = f->scratch;
			f->st.corrupted++;
		}
		unsigned copies = 1;
		if (u_dup < c->dup) {
			copies = 2;
			f->st.duplicated++;
		}
		if (u_reorder < c->reorder && len <= FERRY_FAULT_DGRAM_MAX) {
			uint8_t *copy = malloc(len ? len : 1);
			if (copy) { /* without memory it just goes out in order */
				if (f->nheld == FERRY_FAULT_HOLD_MAX) {
					if ((rc = release(f, 0, emit, ctx)))
						return rc;
					already--;
				}
				memcpy(copy, p, len);
				f->held[f->nheld++] = (struct held){
					.data = copy, .len = len,
					.countdown = 1 + (unsigned)(next_u64(f) % c->reorder_depth),
					.due_ns = now_ns + c->hold_ns,
				};
				f->st.reordered++;
				copies--;
			}
		}
		while (copies--)
			if ((rc = emit_one(f, p, len, emit, ctx)))
				return rc;
	}
	/* This datagram has passed the ones held before it: release those whose turn came. */
	for (unsigned i = 0; i < already; i++)
		f->held[i].countdown--;
	for (unsigned i = 0; i < already;) {
		if (f->held[i].countdown == 0) {
			if ((rc = release(f, i, emit, ctx)))
				return rc;
			already--;
		} else {
			i++;
		}
	}
	return 0;
}

int ferry_fault_poll(struct ferry_fault *f, uint64_t now_ns, ferry_fault_emit_fn emit, void *ctx)
{
	if (!f->cfg.hold_ns)
		return 0;
	for (unsigned i = 0; i < f->nheld;) {
		if (now_ns >= f->held[i].due_ns) {
			int rc = release(f, i, emit, ctx);
			if (rc)
				return rc;
		} else {
			i++;
		}
	}
	return 0;
}

int ferry_fault_flush(struct ferry_fault *f, ferry_fault_emit_fn emit, void *ctx)
{
	while (f->nheld) {
		int rc = release(f, 0, emit, ctx);
		if (rc)
			return rc;
	}
	return 0;
}

uint64_t ferry_fault_next_release(const struct ferry_fault *f)
{
	uint64_t t = UINT64_MAX;
	if (!f->cfg.hold_ns)
		return t;
	for (unsigned i = 0; i < f->nheld; i++)
		if (f->held[i].due_ns < t)
			t = f->held[i].due_ns;
	return t;
}

void ferry_fault_stats(const struct ferry_fault *f, struct ferry_fault_stats *st)
{
	*st = f->st;
	st->held = f->nheld;
}
