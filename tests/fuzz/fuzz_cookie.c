/* libFuzzer target for the migration cookie parser (controlplane/cookie.c).
 *
 * Parses arbitrary bytes. Whatever parses must format, and the formatted
 * cookie must parse back to the same struct (the parser and the formatter
 * agree on every rule). Build with clang -fsanitize=fuzzer,address; seeds in
 * tests/fuzz/cookie-corpus/. */
#include "controlplane/cookie.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct ferry_cookie c, back;
	struct ferry_err err = { 0 };
	char *xml = NULL;

	if (ferry_cookie_parse((const char *)data, size, &c, &err) < 0) {
		if (err.code == 0 || err.msg[0] == '\0' || strnlen(err.msg, sizeof(err.msg)) == sizeof(err.msg))
			abort(); /* every failure explains itself */
		return 0;
	}
	if (ferry_cookie_format(&c, &xml, &err) < 0)
		abort(); /* a parsed cookie is always formattable */
	if (ferry_cookie_parse(xml, strlen(xml), &back, &err) < 0 || memcmp(&c, &back, sizeof(c)) != 0)
		abort(); /* and reads back the same */
	free(xml);
	ferry_cookie_check_peer(&c, &back, &err); /* same host: refused, must not crash */
	return 0;
}
