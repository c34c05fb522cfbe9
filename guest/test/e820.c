/* ringvm test guest: the e820 scenario (the PVH memory map from start_info). */
#include "test.h"

#define E820_RAM 1
#define MIB ((u64)1 << 20)
#define MEM_TOLERANCE (4 * MIB)

static const char *type_name(u32 t)
{
	switch (t) {
	case 1: return "ram";
	case 2: return "reserved";
	case 3: return "acpi";
	case 4: return "nvs";
	case 5: return "unusable";
	case 6: return "disabled";
	case 7: return "pmem";
	default: return "unknown";
	}
}

/* Is [start, end) covered by RAM entries (possibly several adjacent ones)? */
int e820_ram_covers(u64 start, u64 end)
{
	u64 cur = start;
	for (u32 pass = 0; cur < end && pass <= boot.nr_e820; pass++) {
		for (u32 i = 0; i < boot.nr_e820; i++) {
			const struct hvm_memmap_entry *e = &boot.e820[i];
			if (e->type == E820_RAM && e->addr <= cur && cur < e->addr + e->size) {
				cur = e->addr + e->size;
				break;
			}
		}
	}
	return cur >= end;
}

const char *scenario_e820(void)
{
	if (!boot.valid)
		return failf("no valid start_info");
	if (boot.version < 1 || boot.nr_e820_orig == 0)
		return failf("no memory map in start_info (version %u, %u entries)", boot.version,
			     boot.nr_e820_orig);
	if (boot.nr_e820 == 0)
		return failf("memory map at an unusable address");

	u64 total = 0;
	int sorted = 1;
	for (u32 i = 0; i < boot.nr_e820; i++) {
		const struct hvm_memmap_entry *e = &boot.e820[i];
		say("e820 %#018lx-%#018lx %s (type %u, %lu KiB)", e->addr, e->addr + e->size - !!e->size,
		    type_name(e->type), e->type, e->size >> 10);
		if (e->type == E820_RAM)
			total += e->size;
		if (i && e->addr < boot.e820[i - 1].addr)
			sorted = 0;
	}
	say("e820 %u entries%s, ram %lu KiB (%lu MiB)", boot.nr_e820_orig, sorted ? "" : " (unsorted)", total >> 10,
	    total / MIB);
	if (boot.nr_e820_orig > MAX_E820)
		return failf("%u entries, more than the %u this guest checks", boot.nr_e820_orig, MAX_E820);

	for (u32 i = 0; i < boot.nr_e820; i++) {
		const struct hvm_memmap_entry *a = &boot.e820[i];
		if (a->size == 0) { /* qboot appends one; Linux drops them too */
			say("e820 warning: entry %u (type %u at %#lx) has size 0, ignored", i, a->type, a->addr);
			continue;
		}
		if (a->addr + a->size < a->addr)
			return failf("entry %u at %#lx wraps around", i, a->addr);
		for (u32 j = i + 1; j < boot.nr_e820; j++) {
			const struct hvm_memmap_entry *b = &boot.e820[j];
			if (b->size && a->addr < b->addr + b->size && b->addr < a->addr + a->size)
				return failf("entries %u [%#lx+%#lx] and %u [%#lx+%#lx] overlap", i, a->addr, a->size, j,
					     b->addr, b->size);
		}
	}

	/* Conventional memory: RAM at 0, ending at or below 640 KiB; nothing in the legacy hole. */
	int low = 0;
	for (u32 i = 0; i < boot.nr_e820; i++) {
		const struct hvm_memmap_entry *e = &boot.e820[i];
		if (e->type != E820_RAM)
			continue;
		if (e->addr == 0)
			low = 1;
		if (e->addr < 0x100000 && e->addr + e->size > 0xa0000)
			return failf("RAM entry %#lx+%#lx overlaps the legacy hole 0xa0000-0xfffff", e->addr, e->size);
	}
	if (!low)
		return failf("no RAM entry at address 0");

	u64 img0 = (u64)__image_start, img1 = (u64)__image_end;
	if (!e820_ram_covers(img0, img1))
		return failf("the guest image %#lx-%#lx is not inside RAM", img0, img1);

	u64 want;
	if (opt_u64("expect.mem_mib", &want)) {
		want *= MIB;
		if (total > want || total + MEM_TOLERANCE < want)
			return failf("ram %lu KiB, expected %lu MiB minus at most %lu MiB of holes", total >> 10,
				     want / MIB, MEM_TOLERANCE / MIB);
	}
	return 0;
}
