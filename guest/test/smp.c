/* ringvm test guest: the smp scenario. Finds the Intel MP table (MP spec 1.4), starts every AP
 * listed there with INIT-SIPI-SIPI, and waits for each to check in from long mode. */
#include "test.h"

#define MP_SIG 0x5f504d5f   /* "_MP_" */
#define PCMP_SIG 0x504d4350 /* "PCMP" */
#define TRAMPOLINE 0x8000   /* SIPI vector 0x08 */

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1u << 11)
#define APIC_BASE_X2APIC (1u << 10)
#define APIC_ID 0x20
#define APIC_SVR 0xf0
#define APIC_ICR_LO 0x300
#define APIC_ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_INIT 0x00004500    /* INIT, level assert */
#define ICR_STARTUP 0x00004600 /* start-up, level assert | vector */

struct __attribute__((packed)) mp_fps {
	u32 sig;
	u32 physptr;
	u8 length, rev, checksum, feature[5];
};
struct __attribute__((packed)) mp_config {
	u32 sig;
	u16 length;
	u8 rev, checksum;
	char oem[8], product[12];
	u32 oem_table;
	u16 oem_size, count;
	u32 lapic;
	u16 ext_length;
	u8 ext_checksum, reserved;
};
struct __attribute__((packed)) mp_cpu {
	u8 type, apic_id, apic_ver, flags;
	u32 signature, features;
	u32 reserved[2];
};

/* Filled by the APs. */
static volatile u32 ap_online;
static volatile u32 ap_apic_ids[MAX_CPUS];

static u8 sum(const void *p, u32 n)
{
	const u8 *b = p;
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += b[i];
	return s;
}

static const struct mp_fps *scan(u64 start, u64 len)
{
	for (u64 a = start; a + 16 <= start + len; a += 16) {
		const struct mp_fps *f = (const void *)a;
		if (f->sig == MP_SIG && f->length == 1 && sum(f, 16) == 0)
			return f;
	}
	return 0;
}

/* MP spec 4: the first KiB of the EBDA, the last KiB of base memory, 0xF0000-0xFFFFF. */
static const struct mp_fps *find_fps(void)
{
	const struct mp_fps *f = 0;
	u64 ebda = (u64)*(volatile u16 *)phys(0x40e) << 4;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		f = scan(ebda, 1024);
	if (!f) {
		u64 base_kib = *(volatile u16 *)phys(0x413);
		u64 top = base_kib >= 512 && base_kib <= 640 ? base_kib << 10 : 0xa0000;
		f = scan(top - 1024, 1024);
		if (!f && top != 0xa0000)
			f = scan(0xa0000 - 1024, 1024);
	}
	if (!f)
		f = scan(0xf0000, 0x10000);
	return f;
}

/* ---- local APIC: xAPIC MMIO or x2APIC MSRs ---- */
static u64 lapic;
static int x2apic;

static u32 lapic_id(void)
{
	return x2apic ? (u32)rdmsr(0x802) : mmio_read32(lapic + APIC_ID) >> 24;
}

static int send_ipi(u32 dest, u32 cmd)
{
	if (x2apic) {
		wrmsr(0x830, ((u64)dest << 32) | cmd);
		return 1;
	}
	mmio_write32(lapic + APIC_ICR_HI, dest << 24);
	mmio_write32(lapic + APIC_ICR_LO, cmd);
	for (int i = 0; i < 10000; i++)
		if (!(mmio_read32(lapic + APIC_ICR_LO) & ICR_BUSY))
			return 1;
	return 0;
}

static void delay_us(u64 us)
{
	u64 t0 = rdtsc(), n = tsc_hz_or_guess() / 1000000 * us;
	while (rdtsc() - t0 < n)
		cpu_relax();
}

/* Runs on each AP once it reached long mode (boot.S ap_entry64), on its own stack. */
void ap_main(void)
{
	load_idt();
	u32 r[4];
	cpuid(1, 0, r);
	u32 slot = atomic_inc(&ap_online);
	if (slot < MAX_CPUS)
		ap_apic_ids[slot] = r[1] >> 24;
	for (;;)
		__asm__ volatile("cli; hlt");
}

const char *scenario_smp(void)
{
	const struct mp_fps *f = find_fps();
	if (!f)
		return failf("no MP floating pointer structure (_MP_) in the EBDA, base memory top or 0xf0000-0xfffff "
			     "(start_info rsdp %#lx)",
			     boot.rsdp_paddr);
	if (f->feature[0])
		return failf("MP default configuration %u (no table) is not supported", f->feature[0]);
	if (f->physptr == 0 || f->physptr >= 0xfffff000u)
		return failf("MP floating pointer at %p has no config table (physptr %#x)", (const void *)f,
			     f->physptr);
	const struct mp_config *c = (const void *)(u64)f->physptr;
	if (c->sig != PCMP_SIG)
		return failf("MP config table at %#x has signature %#x, not PCMP", f->physptr, c->sig);
	if (c->length < sizeof(*c) || sum(c, c->length) != 0)
		return failf("MP config table at %#x: bad length %u or checksum", f->physptr, c->length);

	/* Walk the entries by the table length, as Linux does: some firmware (qboot) leaves the
	 * header's entry count at 0. */
	u32 ids[MAX_CPUS], ncpu = 0, ndisabled = 0, nentries = 0, bsp_id = ~0u;
	const u8 *p = (const u8 *)c + sizeof(*c), *end = (const u8 *)c + c->length;
	while (p < end) {
		if (*p == 0) {
			const struct mp_cpu *cpu = (const void *)p;
			if (p + sizeof(*cpu) > end)
				return failf("MP processor entry %u is truncated", nentries);
			if (!(cpu->flags & 1)) {
				ndisabled++;
			} else {
				if (ncpu == MAX_CPUS)
					return failf("more than %u CPUs in the MP table", MAX_CPUS);
				ids[ncpu++] = cpu->apic_id;
				if (cpu->flags & 2) {
					if (bsp_id != ~0u)
						return failf("two BSPs in the MP table (APIC ids %u and %u)", bsp_id,
							     cpu->apic_id);
					bsp_id = cpu->apic_id;
				}
			}
			p += sizeof(*cpu);
		} else if (*p <= 4) {
			if (p + 8 > end)
				return failf("MP table entry %u is truncated", nentries);
			p += 8;
		} else {
			return failf("MP table entry %u has unknown type %u", nentries, *p);
		}
		nentries++;
	}
	if (c->count != nentries)
		say("smp warning: MP table header counts %u entries, its length holds %u", c->count, nentries);
	say("smp mp table at %#x (floating pointer %p, spec 1.%u, %u entries), lapic %#x, %u cpus, %u disabled",
	    f->physptr, (const void *)f, f->rev, nentries, c->lapic, ncpu, ndisabled);
	if (ncpu == 0)
		return failf("the MP table lists no enabled processor");

	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & APIC_BASE_ENABLE)) {
		base |= APIC_BASE_ENABLE;
		wrmsr(MSR_APIC_BASE, base);
	}
	x2apic = !!(base & APIC_BASE_X2APIC);
	lapic = base & 0xfffff000ull;
	if (!x2apic && lapic != c->lapic)
		return failf("APIC base MSR says %#lx, the MP table %#x", lapic, c->lapic);
	if (!x2apic && lapic >= 0x100000000ull)
		return failf("LAPIC at %#lx is outside the identity map", lapic);
	u32 me = lapic_id();
	if (me != bsp_id)
		return failf("this CPU has APIC id %u, but the MP table's BSP is %d", me, (int)bsp_id);
	if (x2apic)
		wrmsr(0x80f, 0x1ff);
	else
		mmio_write32(lapic + APIC_SVR, 0x1ff); /* software-enable, spurious vector 0xff */

	if (boot.nr_e820 && !e820_ram_covers(TRAMPOLINE, TRAMPOLINE + 0x1000))
		return failf("the AP trampoline page %#x is not RAM in the e820 map", TRAMPOLINE);
	memcpy((void *)TRAMPOLINE, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));

	/* Start the APs one by one; each takes the stack in ap_stack_top. (A second run re-INITs
	 * the APs the first one left halted, so count from here.) */
	u64 hz = tsc_hz_or_guess();
	u32 first_slot = ap_online;
	u32 started = 0;
	for (u32 i = 0; i < ncpu; i++) {
		if (ids[i] == me)
			continue;
		u32 before = ap_online;
		ap_stack_top = (u64)ap_stacks + (u64)(started + 1) * AP_STACK_SIZE;
		started++;
		u64 t0 = rdtsc();
		if (!send_ipi(ids[i], ICR_INIT))
			return failf("INIT IPI to APIC id %u never left the ICR", ids[i]);
		delay_us(10000);
		for (int sipi = 0; sipi < 2 && ap_online == before; sipi++) {
			if (!send_ipi(ids[i], ICR_STARTUP | (TRAMPOLINE >> 12)))
				return failf("SIPI to APIC id %u never left the ICR", ids[i]);
			delay_us(200);
		}
		while (ap_online == before && rdtsc() - t0 < hz) /* up to ~1 s per AP */
			cpu_relax();
		if (ap_online == before) {
			say("smp cpus %u online %u", ncpu, 1 + ap_online - first_slot);
			return failf("AP with APIC id %u did not check in within ~1 s", ids[i]);
		}
		say("smp apic id %u checked in after %lu us", ids[i], (rdtsc() - t0) / (hz / 1000000));
	}

	u32 online = 1 + ap_online - first_slot;
	say("smp cpus %u online %u", ncpu, online);
	for (u32 i = first_slot; i < ap_online && i < MAX_CPUS; i++) {
		int listed = 0;
		for (u32 j = 0; j < ncpu; j++)
			listed |= ids[j] == ap_apic_ids[i] && ids[j] != me;
		if (!listed)
			return failf("a CPU with APIC id %u checked in that the MP table does not list", ap_apic_ids[i]);
	}
	if (online != ncpu)
		return failf("%u cpus listed, %u online", ncpu, online);
	u64 want;
	if (opt_u64("expect.cpus", &want) && want != ncpu)
		return failf("%u cpus in the MP table, expected %lu", ncpu, want);
	return 0;
}
