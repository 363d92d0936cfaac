/* ramcheck - inspect guest RAM images written by the ferry migration tests.
 *
 * The test guests keep their RAM in a memory-backend-file (share=on), so the
 * file is the guest RAM: on the pc machine guest physical address A is file
 * offset A for the low RAM (up to 3 GiB).
 *
 *   ramcheck pattern FILE [OFFSET SIZE [HB_OFFSET]]
 *       Check the invariant kept by tests/guest/dirty.S over SIZE bytes at
 *       OFFSET: a prefix of 32-bit words equal to G followed by words equal
 *       to G-1 (either part may be empty). When the heartbeat block (default
 *       at 0x7e00) is present and describes the same area, its counters are
 *       cross-checked too. Without OFFSET SIZE the area is taken from the
 *       heartbeat block.
 *   ramcheck heartbeat FILE [HB_OFFSET]
 *       Print the heartbeat block: "done=N cur=N words=N base=0x.. size=0x..".
 *   ramcheck compare FILE1 FILE2
 *       Byte compare; report the first differing offset, the number of
 *       differing 4 KiB pages and the first few differing page ranges.
 *
 * Numbers accept C syntax (0x..., decimal) and a K/M/G suffix (binary).
 * Exit status: 0 ok / identical, 1 check failed / files differ, 2 usage or
 * I/O error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXIT_BAD 1
#define EXIT_ERR 2

#define HB_DEFAULT_OFFSET 0x7e00u
#define HB_MAGIC 0x59525246u /* "FRRY" little endian */
#define HB_BYTES 28u
#define CMP_PAGE 4096u
#define CMP_SHOW_RANGES 8

static const char *prog = "ramcheck";

struct image {
	const char *path;
	int fd;
	uint64_t size;
	const unsigned char *map; /* NULL for an empty file */
};

struct heartbeat {
	uint32_t magic, done, cur, base, size;
	uint64_t words;
};

static void fail_io(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail_io(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(EXIT_ERR);
}

static void usage(void) __attribute__((noreturn));

static void usage(void)
{
	fprintf(stderr,
		"usage: %s pattern FILE [OFFSET SIZE [HB_OFFSET]]\n"
		"       %s heartbeat FILE [HB_OFFSET]\n"
		"       %s compare FILE1 FILE2\n"
		"numbers: decimal or 0x hex, optional K/M/G suffix\n",
		prog, prog, prog);
	exit(EXIT_ERR);
}

static uint64_t parse_num(const char *what, const char *s)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	errno = 0;
	if (*s == '-' || *s == '\0')
		fail_io("bad %s '%s'", what, s);
	v = strtoull(s, &end, 0);
	if (errno || end == s)
		fail_io("bad %s '%s'", what, s);
	switch (*end) {
	case '\0':
		break;
	case 'k': case 'K':
		shift = 10;
		end++;
		break;
	case 'm': case 'M':
		shift = 20;
		end++;
		break;
	case 'g': case 'G':
		shift = 30;
		end++;
		break;
	default:
		fail_io("bad %s '%s'", what, s);
	}
	if (*end != '\0' || (shift && v > (UINT64_MAX >> shift)))
		fail_io("bad %s '%s'", what, s);
	return (uint64_t)v << shift;
}

static void image_open(struct image *img, const char *path)
{
	struct stat st;
	void *p;

	img->path = path;
	img->map = NULL;
	img->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (img->fd < 0)
		fail_io("%s: %s", path, strerror(errno));
	if (fstat(img->fd, &st) < 0)
		fail_io("%s: stat: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode))
		fail_io("%s: not a regular file", path);
	img->size = (uint64_t)st.st_size;
	if (img->size == 0)
		return;
	/* MAP_SHARED: a running guest's stores are visible (heartbeat) */
	p = mmap(NULL, img->size, PROT_READ, MAP_SHARED, img->fd, 0);
	if (p == MAP_FAILED)
		fail_io("%s: mmap %" PRIu64 " bytes: %s", path, img->size, strerror(errno));
	img->map = p;
}

static void image_close(struct image *img)
{
	if (img->map)
		munmap((void *)img->map, img->size);
	close(img->fd);
}

static uint32_t load32(const struct image *img, uint64_t off)
{
	uint32_t v;

	/* one aligned 32-bit load: atomic against a running guest */
	v = *(const volatile uint32_t *)(const void *)(img->map + off);
	return v; /* x86 host and guest: both little endian */
}

/* Returns false (with a message) when the block is out of the file. */
static bool heartbeat_read(const struct image *img, uint64_t hb_off, struct heartbeat *hb)
{
	if (hb_off % 4 || hb_off > img->size || img->size - hb_off < HB_BYTES) {
		fprintf(stderr, "%s: %s: heartbeat block at 0x%" PRIx64 " is outside the %" PRIu64
			"-byte file or misaligned\n", prog, img->path, hb_off, img->size);
		return false;
	}
	hb->magic = load32(img, hb_off);
	hb->done = load32(img, hb_off + 4);
	hb->cur = load32(img, hb_off + 8);
	hb->words = load32(img, hb_off + 12) | (uint64_t)load32(img, hb_off + 16) << 32;
	hb->base = load32(img, hb_off + 20);
	hb->size = load32(img, hb_off + 24);
	return true;
}

static int cmd_heartbeat(int argc, char **argv)
{
	struct image img;
	struct heartbeat hb;
	uint64_t hb_off = HB_DEFAULT_OFFSET;
	int rc = 0;

	if (argc < 1 || argc > 2)
		usage();
	if (argc == 2)
		hb_off = parse_num("HB_OFFSET", argv[1]);
	image_open(&img, argv[0]);
	if (!heartbeat_read(&img, hb_off, &hb)) {
		image_close(&img);
		return EXIT_ERR;
	}
	if (hb.magic != HB_MAGIC) {
		printf("magic=absent raw=0x%08" PRIx32 "\n", hb.magic);
		fprintf(stderr, "%s: %s: no heartbeat at 0x%" PRIx64
			" (guest not booted or not yet through its zeroing pass)\n",
			prog, img.path, hb_off);
		rc = EXIT_BAD;
	} else {
		printf("done=%" PRIu32 " cur=%" PRIu32 " words=%" PRIu64 " base=0x%" PRIx32
		       " size=0x%" PRIx32 "\n", hb.done, hb.cur, hb.words, hb.base, hb.size);
	}
	image_close(&img);
	return rc;
}

/* First index in [from, n) whose word differs from v, or n. */
static uint64_t scan_equal(const uint32_t *w, uint64_t from, uint64_t n, uint32_t v)
{
	uint64_t i = from;

	/* blocks of 8 first: keeps the common case a tight loop */
	while (n - i >= 8) {
		if ((w[i] ^ v) | (w[i + 1] ^ v) | (w[i + 2] ^ v) | (w[i + 3] ^ v) |
		    (w[i + 4] ^ v) | (w[i + 5] ^ v) | (w[i + 6] ^ v) | (w[i + 7] ^ v))
			break;
		i += 8;
	}
	while (i < n && w[i] == v)
		i++;
	return i;
}

static int cmd_pattern(int argc, char **argv)
{
	struct image img;
	struct heartbeat hb;
	uint64_t off, size, n, b, j, hb_off = HB_DEFAULT_OFFSET;
	bool have_hb;
	const uint32_t *w;
	uint32_t hi, lo;

	if (argc != 1 && argc != 3 && argc != 4)
		usage();
	if (argc == 4)
		hb_off = parse_num("HB_OFFSET", argv[3]);
	image_open(&img, argv[0]);
	have_hb = heartbeat_read(&img, hb_off, &hb) && hb.magic == HB_MAGIC;
	if (argc == 1) {
		if (!have_hb) {
			fprintf(stderr, "%s: %s: no heartbeat block at 0x%" PRIx64
				"; give OFFSET and SIZE\n", prog, img.path, hb_off);
			image_close(&img);
			return EXIT_ERR;
		}
		off = hb.base;
		size = hb.size;
	} else {
		off = parse_num("OFFSET", argv[1]);
		size = parse_num("SIZE", argv[2]);
	}
	if (size == 0 || off % 4 || size % 4)
		fail_io("OFFSET and SIZE must be multiples of 4 and SIZE > 0");
	if (off > img.size || img.size - off < size)
		fail_io("%s: area 0x%" PRIx64 "+0x%" PRIx64 " is beyond the end of the file (%"
			PRIu64 " bytes)", img.path, off, size, img.size);

	w = (const uint32_t *)(const void *)(img.map + off);
	n = size / 4;
	madvise((void *)((uintptr_t)(img.map + off) & ~(uintptr_t)(CMP_PAGE - 1)),
		size + ((uintptr_t)(img.map + off) & (CMP_PAGE - 1)), MADV_SEQUENTIAL);

	hi = w[0];
	b = scan_equal(w, 0, n, hi);
	if (b == n) {
		lo = hi - 1;
		printf("pattern: %s area 0x%" PRIx64 "+0x%" PRIx64 ": uniform generation %" PRIu32
		       " (%" PRIu64 " words)\n", img.path, off, size, hi, n);
	} else {
		lo = w[b];
		if (lo != hi - 1) {
			printf("pattern: %s: FAIL at file offset 0x%" PRIx64 " (word %" PRIu64
			       "): value %" PRIu32 " (0x%08" PRIx32 "), expected %" PRIu32
			       " (generation of the prefix from 0x%" PRIx64 ") or %" PRIu32 "\n",
			       img.path, off + b * 4, b, lo, lo, hi, off, hi - 1);
			image_close(&img);
			return EXIT_BAD;
		}
		j = scan_equal(w, b, n, lo);
		if (j != n) {
			printf("pattern: %s: FAIL at file offset 0x%" PRIx64 " (word %" PRIu64
			       "): value %" PRIu32 " (0x%08" PRIx32 "), expected %" PRIu32
			       " (second boundary: prefix of %" PRIu32 " ends at 0x%" PRIx64
			       ", then %" PRIu32 ")\n",
			       img.path, off + j * 4, j, w[j], w[j], lo, hi, off + b * 4, lo);
			image_close(&img);
			return EXIT_BAD;
		}
		printf("pattern: %s area 0x%" PRIx64 "+0x%" PRIx64 ": generation %" PRIu32
		       " up to 0x%" PRIx64 " (%" PRIu64 " words), generation %" PRIu32
		       " after (%" PRIu64 " words)\n",
		       img.path, off, size, hi, off + b * 4, b, lo, n - b);
	}

	if (!have_hb) {
		printf("heartbeat: absent at 0x%" PRIx64 ", not cross-checked\n", hb_off);
	} else if (hb.base != off || hb.size != size) {
		printf("heartbeat: describes area 0x%" PRIx32 "+0x%" PRIx32
		       ", not this one; not cross-checked\n", hb.base, hb.size);
	} else {
		bool ok;

		if (b == n) /* uniform hi: pass hi just ended, or pass hi+1 has not stored yet */
			ok = (hb.cur == hi && (hb.done == hi || hb.done == hi - 1)) ||
			     (hb.cur == hi + 1 && hb.done == hi);
		else
			ok = hb.cur == hi && hb.done == hi - 1;
		printf("heartbeat: done=%" PRIu32 " cur=%" PRIu32 " words=%" PRIu64 " %s\n",
		       hb.done, hb.cur, hb.words, ok ? "consistent" : "INCONSISTENT");
		if (!ok) {
			printf("pattern: %s: FAIL: heartbeat counters do not match the area\n",
			       img.path);
			image_close(&img);
			return EXIT_BAD;
		}
	}
	image_close(&img);
	return 0;
}

static int cmd_compare(int argc, char **argv)
{
	struct image a, b;
	uint64_t common, off, first = UINT64_MAX, pages = 0;
	uint64_t r_start = 0, r_end = 0;
	int shown = 0;
	bool in_range = false;

	if (argc != 2)
		usage();
	image_open(&a, argv[0]);
	image_open(&b, argv[1]);
	common = a.size < b.size ? a.size : b.size;
	if (common) {
		madvise((void *)a.map, common, MADV_SEQUENTIAL);
		madvise((void *)b.map, common, MADV_SEQUENTIAL);
	}
	for (off = 0; off < common; off += CMP_PAGE) {
		uint64_t len = common - off < CMP_PAGE ? common - off : CMP_PAGE;
		bool differ = memcmp(a.map + off, b.map + off, len) != 0;

		if (differ) {
			if (first == UINT64_MAX) {
				uint64_t i = off;

				while (a.map[i] == b.map[i])
					i++;
				first = i;
			}
			pages++;
			if (!in_range) {
				in_range = true;
				r_start = off;
			}
			r_end = off + len;
		}
		if (in_range && (!differ || off + len >= common)) {
			in_range = false;
			if (shown < CMP_SHOW_RANGES)
				printf("compare: differ in 0x%" PRIx64 "..0x%" PRIx64 " (%" PRIu64
				       " pages)\n", r_start, r_end, (r_end - r_start + CMP_PAGE - 1) / CMP_PAGE);
			else if (shown == CMP_SHOW_RANGES)
				printf("compare: ... more ranges\n");
			shown++;
		}
	}
	if (a.size != b.size)
		printf("compare: sizes differ: %s %" PRIu64 " bytes, %s %" PRIu64
		       " bytes (compared the first %" PRIu64 ")\n",
		       a.path, a.size, b.path, b.size, common);
	if (first != UINT64_MAX)
		printf("compare: %s %s differ: first at offset 0x%" PRIx64 " (%" PRIu64
		       "): 0x%02x vs 0x%02x; %" PRIu64 " of %" PRIu64 " 4 KiB pages differ\n",
		       a.path, b.path, first, first, a.map[first], b.map[first], pages,
		       (common + CMP_PAGE - 1) / CMP_PAGE);
	else if (a.size == b.size)
		printf("compare: %s %s identical (%" PRIu64 " bytes)\n", a.path, b.path, a.size);
	image_close(&a);
	image_close(&b);
	return first == UINT64_MAX && a.size == b.size ? 0 : EXIT_BAD;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "pattern") == 0)
		return cmd_pattern(argc - 2, argv + 2);
	if (strcmp(argv[1], "heartbeat") == 0)
		return cmd_heartbeat(argc - 2, argv + 2);
	if (strcmp(argv[1], "compare") == 0)
		return cmd_compare(argc - 2, argv + 2);
	usage();
}
