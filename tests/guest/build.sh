#!/usr/bin/env bash
# Build the dirty.bin boot sector: tests/guest/build.sh OUTDIR [as --defsym args...]
# e.g. tests/guest/build.sh build/tests --defsym AREA_SIZE=0x800000
set -euo pipefail
if [ $# -lt 1 ]; then
	echo "usage: $0 OUTDIR [--defsym NAME=VALUE ...]" >&2
	exit 2
fi
out=$1
shift
src_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"
as --32 "$@" -o "$out/dirty.o" "$src_dir/dirty.S"
ld -m elf_i386 -Ttext 0x7c00 -e _start --oformat binary -o "$out/dirty.bin" "$out/dirty.o"
size=$(stat -c %s "$out/dirty.bin")
if [ "$size" -ne 512 ]; then
	echo "dirty.bin is $size bytes, expected 512" >&2
	exit 1
fi
sig=$(od -An -tx1 -j510 -N2 "$out/dirty.bin" | tr -d ' \n')
if [ "$sig" != "55aa" ]; then
	echo "dirty.bin lacks the 0x55AA boot signature (got $sig)" >&2
	exit 1
fi
echo "$out/dirty.bin"
