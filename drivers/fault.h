/* Fault injection on a datagram path: drop, duplicate, reorder and corrupt
 * datagrams at configured rates, deterministically from a seed.
 *
 * It sits between the data plane's reliability layer (dataplane/reliable.h)
 * and a datagram driver, on either direction, so loss recovery can be
 * exercised on any fabric and in unit tests. Configured from a string such as
 * "drop=0.01,dup=0.01,reorder=0.02,corrupt=0.001,seed=42" (a driver passes
 * the value of its "fault=" option). Single-threaded: one injector per lane
 * direction. No clock of its own: calls take the current time in ns. */
#ifndef FERRY_FAULT_H
#define FERRY_FAULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define FERRY_FAULT_HOLD_MAX 64      /* datagrams held back at once for reordering */
#define FERRY_FAULT_DGRAM_MAX 65535  /* largest datagram the injector copies */

struct ferry_fault_config {
	double drop;             /* probability a datagram is lost */
	double dup;              /* ... is delivered twice */
	double reorder;          /* ... is held back and released after later ones */
	double corrupt;          /* ... has one byte changed */
	uint64_t seed;           /* same seed, same datagrams in: same faults out */
	unsigned reorder_depth;  /* a held datagram goes out after 1..depth later ones; 0 = 8 */
	uint64_t hold_ns;        /* ... or once held this long (see ferry_fault_poll); 0 = by count only */
};

struct ferry_fault_stats {
	uint64_t seen;           /* datagrams submitted */
	uint64_t emitted;        /* datagrams handed on, duplicates included */
	uint64_t dropped;
	uint64_t duplicated;
	uint64_t reordered;      /* held back, released later */
	uint64_t corrupted;
	unsigned held;           /* held right now */
};

struct ferry_fault;

/* Where datagrams go on: data is valid only during the call. Return 0, or a
 * negative errno to stop (the injector returns it). */
typedef int (*ferry_fault_emit_fn)(void *ctx, const void *data, size_t len);

/* Parse "key=value,..." (keys drop, dup, reorder, corrupt: a probability
 * 0..1 or a percentage "1%"; seed; depth; hold_us) over a zeroed config.
 * An empty string means no faults. */
int ferry_fault_parse(const char *spec, struct ferry_fault_config *cfg, struct ferry_err *err);

int ferry_fault_create(const struct ferry_fault_config *cfg, struct ferry_fault **out, struct ferry_err *err);
/* Datagrams still held are discarded. */
void ferry_fault_destroy(struct ferry_fault *f);

/* Pass one datagram through: emits it (possibly corrupted), twice, not at
 * all, or later; then any held datagram whose turn has come. */
int ferry_fault_submit(struct ferry_fault *f, const void *data, size_t len, uint64_t now_ns,
		       ferry_fault_emit_fn emit, void *ctx);
/* Release held datagrams held for hold_ns or longer (traffic may have stopped). */
int ferry_fault_poll(struct ferry_fault *f, uint64_t now_ns, ferry_fault_emit_fn emit, void *ctx);
/* Release every held datagram now. */
int ferry_fault_flush(struct ferry_fault *f, ferry_fault_emit_fn emit, void *ctx);
/* When ferry_fault_poll next has something to release; UINT64_MAX if never. */
uint64_t ferry_fault_next_release(const struct ferry_fault *f);

void ferry_fault_stats(const struct ferry_fault *f, struct ferry_fault_stats *st);

#endif
