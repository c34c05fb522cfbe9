#!/bin/sh
# Builds the ringvm test guest: build.sh OUTDIR -> OUTDIR/ringvm-test-guest.elf
# The one recipe: tests/build.rs runs this script too. Needs gcc (or a compatible cc) and binutils.
# RINGVM_GUEST_CC overrides the compiler (default: cc).
set -eu

out=${1:?usage: build.sh OUTDIR}
src=$(cd "$(dirname "$0")" && pwd)
cc=${RINGVM_GUEST_CC:-cc}
objdump=${RINGVM_GUEST_OBJDUMP:-objdump}

# Freestanding x86-64, integer only: guest CPL0 code is interpreted by KVM's instruction emulator
# on kvm_pvm hosts, which lacks SSE/x87/popcnt/BMI/endbr64 and more (see guest/test/README.md).
cflags="-std=gnu11 -O2 -g -Wall -Wextra
	-ffreestanding -nostdlib -fno-pic -fno-pie -mcmodel=small
	-march=x86-64 -mtune=generic -mno-red-zone -mgeneral-regs-only
	-mno-mmx -mno-sse -mno-sse2 -mno-80387 -mno-avx -mno-popcnt -mno-bmi -mno-bmi2 -mno-lzcnt
	-fno-stack-protector -fcf-protection=none -fno-asynchronous-unwind-tables -fno-unwind-tables
	-fno-tree-loop-distribute-patterns"

mkdir -p "$out/obj"
objs=""
for f in "$src"/*.S "$src"/*.c; do
	o="$out/obj/$(basename "$f").o"
	# shellcheck disable=SC2086
	$cc $cflags -c "$f" -o "$o"
	objs="$objs $o"
done
elf="$out/ringvm-test-guest.elf"
# shellcheck disable=SC2086
$cc -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-n -Wl,-T,"$src/linker.ld" -o "$elf.tmp" $objs

# Refuse instructions the kvm_pvm emulator cannot run (they would end the VM with
# KVM_EXIT_INTERNAL_ERROR at CPL0). The CPL3 code is checked too: it is plain integer code.
if command -v "$objdump" >/dev/null 2>&1; then
	bad=$("$objdump" -d --no-show-raw-insn "$elf.tmp" |
		awk -F'\t' 'NF >= 2 { split($2, w, " "); print w[1] " " $2 }' |
		grep -E '^(int3|int|into|cmpxchg16b|xsave[a-z0-9]*|xrstor[a-z0-9]*|xgetbv|popcnt|tzcnt|lzcnt|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|sarx|shlx|shrx|rorx|rdtscp|stac|clac|fwait|wait|ldmxcsr|stmxcsr|invpcid|monitor|mwait|lsl|lar|endbr64|endbr32|f[a-z0-9]+) |%[xy]mm|%mm[0-7]|%st' || true)
	if [ -n "$bad" ]; then
		echo "build.sh: instructions the kvm_pvm emulator cannot run:" >&2
		echo "$bad" >&2
		exit 1
	fi
fi
mv "$elf.tmp" "$elf"
echo "$elf"
