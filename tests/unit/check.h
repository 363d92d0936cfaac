/* Minimal check macros for ferry's unit tests: every check prints a line,
 * failures are counted, main returns non-zero if any failed. */
#ifndef FERRY_TEST_CHECK_H
#define FERRY_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond, ...) do { \
	check_count++; \
	if (cond) { \
		printf("ok   %d - ", check_count); printf(__VA_ARGS__); printf("\n"); \
	} else { \
		check_failures++; \
		printf("FAIL %d - ", check_count); printf(__VA_ARGS__); \
		printf("  (%s:%d: %s)\n", __FILE__, __LINE__, #cond); \
	} \
	fflush(stdout); \
} while (0)

/* err.msg must mention every word of 'needle' in order. */
#define CHECK_MSG(err, needle, ...) CHECK(strstr((err).msg, (needle)) != NULL, __VA_ARGS__)

#define CHECK_DONE() do { \
	printf("%d checks, %d failed\n", check_count, check_failures); \
	return check_failures ? 1 : 0; \
} while (0)

#endif
