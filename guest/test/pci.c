/* ringvm test guest: PCI bus 0 (configuration mechanism #1 at 0xCF8/0xCFC, or ECAM with
 * ringvm.pci.ecam=ADDR), BAR sizing and assignment, capabilities, the pci scenario, and the
 * interrupt plumbing the device drivers share: LAPIC, 8259 masking, counted vectors, waits. */
#include "test.h"

/* ---- configuration space ---- */
static u64 ecam;
static int ecam_read;

static u64 ecam_base(void)
{
	if (!ecam_read) {
		u64 v;
		if (opt_u64("pci.ecam", &v))
			ecam = v;
		ecam_read = 1;
	}
	return ecam;
}

const char *pci_mechanism(void)
{
	static char buf[32];
	if (!ecam_base())
		return "cf8";
	fmt(buf, sizeof(buf), "ecam %#lx", ecam);
	return buf;
}

u32 pci_read(const struct pci_func *f, u32 off, int size)
{
	u64 e = ecam_base();
	if (e) {
		u64 a = e + ((u64)f->dev << 15) + ((u64)f->fn << 12) + off;
		return size == 1 ? mmio_read8(a) : size == 2 ? mmio_read16(a) : mmio_read32(a);
	}
	outl(0xcf8, 0x80000000u | (u32)f->dev << 11 | (u32)f->fn << 8 | (off & 0xfc));
	return size == 1 ? inb((u16)(0xcfc + (off & 3))) : size == 2 ? inw((u16)(0xcfc + (off & 2))) : inl(0xcfc);
}

void pci_write(const struct pci_func *f, u32 off, int size, u32 v)
{
	u64 e = ecam_base();
	if (e) {
		u64 a = e + ((u64)f->dev << 15) + ((u64)f->fn << 12) + off;
		if (size == 1)
			mmio_write8(a, (u8)v);
		else if (size == 2)
			mmio_write16(a, (u16)v);
		else
			mmio_write32(a, v);
		return;
	}
	outl(0xcf8, 0x80000000u | (u32)f->dev << 11 | (u32)f->fn << 8 | (off & 0xfc));
	if (size == 1)
		outb((u16)(0xcfc + (off & 3)), (u8)v);
	else if (size == 2)
		outw((u16)(0xcfc + (off & 2)), (u16)v);
	else
		outl(0xcfc, v);
}

#define PCI_COMMAND 0x04
#define CMD_IO 0x1
#define CMD_MEM 0x2
#define CMD_MASTER 0x4
#define CMD_INTX_DISABLE 0x400

/* Sizes the six BARs of a type-0 header with decoding off (the standard all-ones probe). */
static void size_bars(struct pci_func *f)
{
	u16 cmd = (u16)pci_read(f, PCI_COMMAND, 2);
	pci_write(f, PCI_COMMAND, 2, cmd & ~(CMD_IO | CMD_MEM));
	for (int i = 0; i < 6; i++) {
		u32 off = 0x10 + 4 * (u32)i;
		u32 lo = pci_read(f, off, 4);
		pci_write(f, off, 4, ~0u);
		u32 mlo = pci_read(f, off, 4);
		pci_write(f, off, 4, lo);
		struct pci_bar *b = &f->bar[i];
		if (mlo == 0)
			continue;
		if (lo & 1) {
			b->kind = BAR_IO;
			b->addr = lo & ~3u;
			b->size = (u32)(~(mlo & ~3u) + 1) & 0xffff;
		} else if (((lo >> 1) & 3) == 2 && i < 5) {
			u32 hi = pci_read(f, off + 4, 4);
			pci_write(f, off + 4, 4, ~0u);
			u32 mhi = pci_read(f, off + 4, 4);
			pci_write(f, off + 4, 4, hi);
			b->kind = BAR_MEM64;
			b->prefetch = !!(lo & 8);
			b->addr = (u64)hi << 32 | (lo & ~0xfu);
			b->size = ~((u64)mhi << 32 | (mlo & ~0xfu)) + 1;
			i++; /* the upper half */
		} else {
			b->kind = BAR_MEM32;
			b->prefetch = !!(lo & 8);
			b->addr = lo & ~0xfu;
			b->size = (u32)(~(mlo & ~0xfu) + 1);
		}
	}
	pci_write(f, PCI_COMMAND, 2, cmd);
}

int pci_scan(struct pci_func *out, int max)
{
	int n = 0;
	for (u8 dev = 0; dev < 32; dev++) {
		for (u8 fn = 0; fn < 8; fn++) {
			struct pci_func f;
			memset(&f, 0, sizeof(f));
			f.dev = dev;
			f.fn = fn;
			u32 id = pci_read(&f, 0, 4);
			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
				if (fn == 0)
					break;
				continue;
			}
			f.vendor = (u16)id;
			f.device = (u16)(id >> 16);
			u32 cr = pci_read(&f, 8, 4);
			f.rev = (u8)cr;
			f.class = cr >> 8;
			f.hdr = (u8)pci_read(&f, 0x0e, 1);
			if ((f.hdr & 0x7f) == 0)
				size_bars(&f);
			if (n < max)
				out[n++] = f;
			if (fn == 0 && !(f.hdr & 0x80))
				break;
		}
	}
	return n;
}

u8 pci_next_cap(const struct pci_func *f, u8 prev)
{
	if (!prev)
		return (pci_read(f, 0x06, 2) & 0x10) ? (u8)(pci_read(f, 0x34, 1) & 0xfc) : 0;
	return (u8)(pci_read(f, prev + 1u, 1) & 0xfc);
}

/* The window for BARs the guest assigns itself: ringvm.pci.mmio=START-END (END exclusive). */
static void mmio_window(u64 *start, u64 *end)
{
	*start = 0xc0000000ull;
	*end = 0xfc000000ull;
	const char *v = opt("pci.mmio");
	u64 a, b;
	if (v && parse_u64(&v, &a) && *v == '-' && (v++, parse_u64(&v, &b)) && !*v && a < b) {
		*start = a;
		*end = b;
	} else if (v) {
		say("warning: ringvm.pci.mmio wants START-END, e.g. 0xc0000000-0xe0000000; using the default");
	}
}

const char *pci_enable(struct pci_func *f, struct pci_func *all, int n, const char *who)
{
	u64 start, end, next;
	mmio_window(&start, &end);
	next = start;
	for (int i = 0; i < n; i++)
		for (int j = 0; j < 6; j++) {
			const struct pci_bar *b = &all[i].bar[j];
			if ((b->kind == BAR_MEM32 || b->kind == BAR_MEM64) && b->addr && b->addr >= start &&
			    b->addr < end && b->addr + b->size > next)
				next = b->addr + b->size;
		}
	u64 reassign = 0;
	opt_u64("pci.reassign", &reassign);
	u16 cmd = (u16)pci_read(f, PCI_COMMAND, 2);
	for (int i = 0; i < 6; i++) {
		struct pci_bar *b = &f->bar[i];
		if ((b->kind != BAR_MEM32 && b->kind != BAR_MEM64) || !b->size)
			continue;
		if (b->size & (b->size - 1))
			return failf("bar%d size %#lx is not a power of two", i, b->size);
		if (!reassign && b->addr && b->addr + b->size <= 0x100000000ull)
			continue;
		u64 align = b->size < 4096 ? 4096 : b->size;
		u64 a = (next + align - 1) & ~(align - 1);
		if (a + b->size > end)
			return failf("no room for bar%d (%#lx bytes) in the window %#lx-%#lx", i, b->size, start, end);
		pci_write(f, PCI_COMMAND, 2, cmd & ~CMD_MEM);
		u32 off = 0x10 + 4 * (u32)i;
		u32 lo = pci_read(f, off, 4);
		pci_write(f, off, 4, (u32)a | (lo & 0xf));
		if (b->kind == BAR_MEM64)
			pci_write(f, off + 4, 4, 0);
		u64 got = pci_read(f, off, 4) & ~0xfu;
		if (b->kind == BAR_MEM64)
			got |= (u64)pci_read(f, off + 4, 4) << 32;
		say("%s assigned bar%d %#lx/%#lx (was %#lx)", who, i, a, b->size, b->addr);
		if (got != a)
			return failf("bar%d reads back %#lx after writing %#lx", i, got, a);
		b->addr = a;
		next = a + b->size;
	}
	u16 want = cmd | CMD_MEM | CMD_MASTER;
	pci_write(f, PCI_COMMAND, 2, want);
	u16 got = (u16)pci_read(f, PCI_COMMAND, 2);
	if ((got & (CMD_MEM | CMD_MASTER)) != (CMD_MEM | CMD_MASTER))
		return failf("command register reads %#x after writing %#x (memory space / bus master lost)", got, want);
	return 0;
}

/* ---- the pci scenario ---- */
static struct pci_func scan_buf[PCI_MAX_FUNCS];

const char *scenario_pci(void)
{
	int n = pci_scan(scan_buf, PCI_MAX_FUNCS);
	say("pci bus 0 via %s: %d functions", pci_mechanism(), n);
	int bridge = 0;
	for (int i = 0; i < n; i++) {
		const struct pci_func *f = &scan_buf[i];
		char line[224];
		int len = fmt(line, sizeof(line), "00:%02x.%u %04x:%04x rev %02x class %06x", f->dev, f->fn, f->vendor,
			      f->device, f->rev, f->class);
		if ((f->hdr & 0x7f) != 0)
			len += fmt(line + len, sizeof(line) - (size_t)len, " hdr %02x", f->hdr & 0x7f);
		for (int j = 0; j < 6 && len < (int)sizeof(line); j++) {
			const struct pci_bar *b = &f->bar[j];
			if (b->kind == BAR_NONE)
				continue;
			len += fmt(line + len, sizeof(line) - (size_t)len, " bar%d %s%s %lx/%lx", j,
				   b->kind == BAR_IO ? "io" : b->kind == BAR_MEM32 ? "mem32" : "mem64",
				   b->prefetch ? "pf" : "", b->addr, b->size);
		}
		int guard = 0;
		for (u8 c = pci_next_cap(f, 0); c && guard < 48 && len < (int)sizeof(line); c = pci_next_cap(f, c), guard++)
			if (pci_read(f, c, 1) == 0x11)
				len += fmt(line + len, sizeof(line) - (size_t)len, " msix %u",
					   (pci_read(f, c + 2u, 2) & 0x7ff) + 1);
		say("pci %s", line);
		if (f->dev == 0 && f->fn == 0 && (f->class >> 8) == 0x0600)
			bridge = 1;
	}
	if (n == 0)
		return failf("no PCI function on bus 0 (config via %s)", pci_mechanism());
	if (!bridge)
		return failf("00:00.0 is not a host bridge (class 0600xx)");
	/* Assigned memory BARs must be aligned to their size and must not overlap. */
	for (int i = 0; i < n; i++)
		for (int j = 0; j < 6; j++) {
			const struct pci_bar *a = &scan_buf[i].bar[j];
			if (a->kind < BAR_MEM32 || !a->addr || !a->size)
				continue;
			if (a->addr & (a->size - 1))
				return failf("00:%02x.%u bar%d %#lx is not aligned to its size %#lx", scan_buf[i].dev,
					     scan_buf[i].fn, j, a->addr, a->size);
			for (int k = 0; k < n; k++)
				for (int l = 0; l < 6; l++) {
					const struct pci_bar *b = &scan_buf[k].bar[l];
					if ((k == i && l == j) || b->kind < BAR_MEM32 || !b->addr || !b->size)
						continue;
					if (a->addr < b->addr + b->size && b->addr < a->addr + a->size)
						return failf("00:%02x.%u bar%d and 00:%02x.%u bar%d overlap", scan_buf[i].dev,
							     scan_buf[i].fn, j, scan_buf[k].dev, scan_buf[k].fn, l);
				}
		}
	return 0;
}

/* ---- interrupts: LAPIC, 8259, counted vectors ---- */
#define MSR_APIC_BASE 0x1b
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED 0x10000

volatile u32 irq_count[16], irq_legacy, irq_spurious;
static u64 lapic_base;
static int x2apic_mode, irq_ready;

static u32 lapic_rd(u32 reg)
{
	return x2apic_mode ? (u32)rdmsr(0x800 + (reg >> 4)) : mmio_read32(lapic_base + reg);
}

static void lapic_wr(u32 reg, u32 v)
{
	if (x2apic_mode)
		wrmsr(0x800 + (reg >> 4), v);
	else
		mmio_write32(lapic_base + reg, v);
}

void irq_init(void)
{
	if (irq_ready)
		return;
	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & (1u << 11))) {
		base |= 1u << 11;
		wrmsr(MSR_APIC_BASE, base);
	}
	x2apic_mode = !!(base & (1u << 10));
	lapic_base = base & 0xfffff000ull;
	/* 8259s (if any): firmware may have left IRQ0 unmasked at a real-mode vector. Remap them to
	 * 0x30-0x3f, then mask every line. */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x30);
	outb(0xa1, 0x38);
	outb(0x21, 4);
	outb(0xa1, 2);
	outb(0x21, 1);
	outb(0xa1, 1);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	for (u32 i = 0; i < 16; i++) {
		idt_set(IRQ_BASE + i, irq_stubs[i]);
		idt_set(0x30 + i, irq_stubs[16 + i]);
	}
	idt_set(0xff, irq_stubs[32]);
	lapic_wr(LAPIC_TPR, 0);
	lapic_wr(LAPIC_SVR, 0x1ff); /* software-enable, spurious vector 0xff */
	lapic_wr(LAPIC_LVT_TIMER, LVT_MASKED | IRQ_TIMER);
	irq_ready = 1;
}

u32 irq_apic_id(void)
{
	irq_init();
	u32 id = lapic_rd(LAPIC_ID);
	return x2apic_mode ? id : id >> 24;
}

int irq_is_pending(u32 vec)
{
	irq_init();
	return lapic_rd(0x200 + (vec / 32) * 0x10) >> (vec % 32) & 1; /* IRR */
}

void irq_handler(u64 vec)
{
	if (vec == 0xff) {
		irq_spurious++; /* no EOI for spurious interrupts */
		return;
	}
	if (vec >= 0x30 && vec < 0x40) {
		irq_legacy++;
		if (vec >= 0x38)
			outb(0xa0, 0x20);
		outb(0x20, 0x20);
		return;
	}
	irq_count[(vec - IRQ_BASE) & 15]++;
	lapic_wr(LAPIC_EOI, 0);
}

int wait_cond(int (*cond)(void *), void *arg, enum wait_mode mode, u64 timeout_ms)
{
	u64 t0 = rdtsc(), limit = tsc_hz_or_guess() / 1000 * timeout_ms;
	int ok = 0;
	if (mode == WAIT_HLT) {
		irq_init();
		lapic_wr(LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
		lapic_wr(LAPIC_LVT_TIMER, IRQ_TIMER); /* one-shot, unmasked */
	}
	for (;;) {
		if (cond(arg)) {
			ok = 1;
			break;
		}
		if (rdtsc() - t0 > limit)
			break;
		if (mode == WAIT_POLL) {
			cpu_relax();
		} else if (mode == WAIT_SPIN) {
			__asm__ volatile("sti; pause; cli" ::: "memory");
		} else {
			/* A watchdog tick (~0.27 s at KVM's 1 GHz APIC bus) in case no interrupt comes. */
			lapic_wr(LAPIC_TIMER_INIT, 0x1000000);
			__asm__ volatile("sti; hlt; cli" ::: "memory");
		}
	}
	if (mode == WAIT_HLT) {
		lapic_wr(LAPIC_TIMER_INIT, 0);
		lapic_wr(LAPIC_LVT_TIMER, LVT_MASKED | IRQ_TIMER);
	}
	return ok;
}

struct u16_wait {
	volatile u16 *p;
	u16 want;
	const volatile u32 *irq;
	u32 irq_min;
};

static int u16_reached(void *arg)
{
	struct u16_wait *w = arg;
	return *w->p == w->want && (!w->irq || *w->irq >= w->irq_min);
}

int wait_u16(volatile u16 *p, u16 want, enum wait_mode mode, u64 timeout_ms, const volatile u32 *irq, u32 irq_min)
{
	struct u16_wait w = {p, want, irq, irq_min};
	return wait_cond(u16_reached, &w, mode, timeout_ms);
}
