/* ringvm test guest: kmain, IDT/TSS, start_info, cmdline, scenario dispatch, exceptions. */
#include "test.h"

struct boot_info boot;
const char *current_scenario;

/* ---- IDT and TSS ---- */
struct idt_gate {
	u16 off_lo, sel;
	u8 ist, type;
	u16 off_mid;
	u32 off_hi, zero;
};
/* 256 gates: 0-31 exceptions (boot.S), the rest empty until idt_set (pci.c installs the interrupt
 * vectors its drivers use); an interrupt on an empty gate raises #NP, which trap() reports. */
static struct idt_gate idt[256] __attribute__((aligned(16)));

struct __attribute__((packed)) tss64 {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
	u8 iomap[65536 / 8 + 1]; /* all zero (every port allowed) + the 0xff terminator */
};
static struct tss64 tss __attribute__((aligned(16)));

struct __attribute__((packed)) dtr {
	u16 limit;
	u64 base;
};

void load_idt(void)
{
	struct dtr d = {sizeof(idt) - 1, (u64)idt};
	__asm__ volatile("lidt %0" ::"m"(d));
}

void idt_set(u32 vec, u64 a)
{
	idt[vec & 255] = (struct idt_gate){(u16)a, SEL_CODE64, 0, 0x8e /* present, DPL0, interrupt gate */,
					   (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void cpu_tables_init(void)
{
	for (int i = 0; i < 32; i++)
		idt_set((u32)i, isr_table[i]);
	load_idt();

	tss.rsp[0] = (u64)exc_stack_top;
	/* CPL3 port I/O: IOPL=3 (enter_user) is enough on hardware, but kvm_pvm runs CPL3 natively
	 * and checks only this bitmap. */
	tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
	tss.iomap[sizeof(tss.iomap) - 1] = 0xff;
	u64 base = (u64)&tss, limit = sizeof(tss) - 1;
	gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
			   ((limit >> 16 & 0xf) << 48) | ((base >> 24 & 0xff) << 56);
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" ::"r"(SEL_TSS));
}

/* ---- exceptions ---- */
static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "coproc", "#TS", "#NP", "#SS", "#GP",
	"#PF", "rsvd", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "rsvd", "rsvd", "rsvd", "rsvd", "rsvd",
	"rsvd", "#HV", "#VC", "#SX", "rsvd"};

struct trap_frame user_fault;

void trap(struct trap_frame *f)
{
	/* The expected way back from CPL3 (compute.c): any exception from user mode ends the
	 * user run; the caller of enter_user inspects user_fault. */
	if ((f->cs & 3) == 3 && user_active) {
		user_active = 0;
		user_fault = *f;
		user_return(f->vector);
	}
	static volatile u32 in_trap;
	if (atomic_inc(&in_trap) != 0)
		machine_reset();
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	say("exception %lu (%s) error=%#lx rip=%#lx cs=%#lx rflags=%#lx rsp=%#lx cr2=%#lx",
	    f->vector, exc_names[f->vector & 31], f->error, f->rip, f->cs, f->rflags, f->rsp, cr2);
	say("%s FAIL unexpected exception %lu (%s) at rip %#lx", current_scenario ? current_scenario : "boot",
	    f->vector, exc_names[f->vector & 31], f->rip);
	machine_reset();
}

const char *run_user(void (*fn)(void *), void *arg, const u16 *cs, const char *what)
{
	user_active = 1;
	u64 vec = enter_user(fn, arg, (u64)user_stack_top);
	if (vec != 13 || user_fault.rip != (u64)user_exit)
		return failf("the CPL3 run ended with exception %lu error %#lx at rip %#lx", vec, user_fault.error,
			     user_fault.rip);
	if ((*cs & 3) != 3)
		return failf("the %s ran with cs %#x, not at CPL3", what, *cs);
	return 0;
}

/* ---- start_info ---- */
#define FOUR_GIB 0x100000000ull

static void read_start_info(u64 paddr)
{
	boot.start_info_paddr = paddr;
	if (paddr == 0 || paddr + sizeof(struct hvm_start_info) > FOUR_GIB) {
		say("boot FAIL start_info address %#lx unusable", paddr);
		return;
	}
	const struct hvm_start_info *si = (const void *)paddr;
	if (si->magic != HVM_START_MAGIC) {
		say("boot FAIL start_info magic %#x at %#lx (want %#x)", si->magic, paddr, HVM_START_MAGIC);
		return;
	}
	boot.valid = 1;
	boot.version = si->version;
	boot.rsdp_paddr = si->rsdp_paddr;
	if (si->cmdline_paddr && si->cmdline_paddr < FOUR_GIB) {
		const char *c = (const char *)si->cmdline_paddr;
		size_t i = 0;
		while (i < CMDLINE_MAX - 1 && si->cmdline_paddr + i < FOUR_GIB && c[i]) {
			boot.cmdline[i] = c[i];
			i++;
		}
		boot.cmdline[i] = 0;
	}
	if (si->version >= 1 && si->memmap_paddr && si->memmap_entries) {
		u32 n = si->memmap_entries;
		boot.nr_e820_orig = n;
		if (n > MAX_E820)
			n = MAX_E820;
		if (si->memmap_paddr + (u64)n * sizeof(struct hvm_memmap_entry) <= FOUR_GIB) {
			memcpy(boot.e820, (const void *)si->memmap_paddr, n * sizeof(struct hvm_memmap_entry));
			boot.nr_e820 = n;
		}
	}
}

/* ---- cmdline: space-separated words; ours are `ringvm.<key>=<value>` ---- */
static char words[CMDLINE_MAX]; /* cmdline with spaces turned into NULs */
static size_t words_len;

static const char *const known_keys[] = {"test", "expect.cpus", "expect.mem_mib", "expect.hv",
					 "compute.iters", "pci.ecam", "pci.mmio", "pci.reassign",
					 "rng.mode", "rng.bufs", "blk.mode", "blk.sector",
					 "blk.expect", "blk.id", "net.ip", "net.peer", "net.udp",
					 "net.mode", "net.csum", "net.serve_ms", "net.bad", "net.pairs",
					 "blkbench.qd", "blkbench.ms", "blkbench.op", "blkbench.bs",
					 "blkbench.tsc_khz", "blkverify.qd", "blkverify.ms", "net.stream_ms", "vsock.app", "vsock.port", "vsock.listen",
					 "vsock.conns", "vsock.bytes", "vsock.idle_ms", "vsock.seed", "vsock.cid",
					 "vsock.credit_req_ms", "vsock.pause_ms", "vsock.pause_at", "vsock.check", "vsock.buf_alloc",
					 "vsock.reset_stall_ms", "vsock.resets", "console.echo", "console.idle_ms", "console.bench",
					 "count.lines", "count.step", "blkbench.verify"};

const char *opt(const char *key)
{
	size_t klen = strlen(key);
	const char *found = 0;
	for (size_t i = 0; i < words_len;) {
		if (!words[i]) {
			i++;
			continue;
		}
		const char *w = &words[i];
		size_t n = strlen(w);
		if (n > 7 + klen && memcmp(w, "ringvm.", 7) == 0 && memcmp(w + 7, key, klen) == 0 &&
		    w[7 + klen] == '=')
			found = w + 8 + klen; /* the last occurrence wins */
		i += n;
	}
	return found;
}

/* A decimal or 0x-hex number at *s; advances *s past it. Returns 0 if there is no digit. */
int parse_u64(const char **s, u64 *out)
{
	const char *v = *s;
	u64 x = 0;
	int n = 0;
	if (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
		for (v += 2;; v++, n++) {
			char c = *v;
			u64 d = c >= '0' && c <= '9' ? (u64)(c - '0')
				: c >= 'a' && c <= 'f' ? (u64)(c - 'a' + 10)
				: c >= 'A' && c <= 'F' ? (u64)(c - 'A' + 10)
						       : 16;
			if (d == 16)
				break;
			x = x << 4 | d;
		}
	} else {
		for (; *v >= '0' && *v <= '9'; v++, n++)
			x = x * 10 + (u64)(*v - '0');
	}
	if (!n)
		return 0;
	*s = v;
	*out = x;
	return 1;
}

/* Numeric option (decimal, or hex with 0x). */
int opt_u64(const char *key, u64 *out)
{
	const char *v = opt(key);
	u64 x;
	if (!v || !parse_u64(&v, &x) || *v)
		return 0;
	*out = x;
	return 1;
}

static void parse_cmdline(void)
{
	size_t n = strlen(boot.cmdline);
	words_len = n;
	for (size_t i = 0; i < n; i++)
		words[i] = boot.cmdline[i] == ' ' || boot.cmdline[i] == '\t' ? 0 : boot.cmdline[i];
	/* Warn about ringvm.* words we do not understand (typos would silently drop checks). */
	for (size_t i = 0; i < n;) {
		if (!words[i]) {
			i++;
			continue;
		}
		const char *w = &words[i];
		size_t len = strlen(w);
		if (len > 7 && memcmp(w, "ringvm.", 7) == 0) {
			int ok = 0;
			for (size_t k = 0; k < sizeof(known_keys) / sizeof(known_keys[0]); k++) {
				size_t kl = strlen(known_keys[k]);
				if (len > 7 + kl && memcmp(w + 7, known_keys[k], kl) == 0 && w[7 + kl] == '=')
					ok = 1;
			}
			if (!ok)
				say("warning: unknown option %s", w);
		}
		i += len;
	}
}

/* ---- scenarios ---- */
struct scenario {
	const char *name;
	const char *(*run)(void);
};
/* `all` runs them in this order (rtc calibrates the TSC for smp and compute). */
static const struct scenario scenarios[] = {
	{"hello", scenario_hello},
	{"cpuid", scenario_cpuid},
	{"e820", scenario_e820},
	{"rtc", scenario_rtc},
	{"smp", scenario_smp},
	{"compute", scenario_compute},
};
#define NR_SCENARIOS (sizeof(scenarios) / sizeof(scenarios[0]))

/* Not part of `all`: checks the crash path (exception report, FAIL line, reset, no `done`). */
static const char *scenario_ud2(void)
{
	say("ud2 raising #UD at CPL0");
	__asm__ volatile("ud2");
	return failf("ud2 did not fault");
}
/* Not part of `all`: says so, then halts with interrupts off until the VM is ended from
 * outside (control socket, a killed device process). */
static const char *scenario_wait(void)
{
	say("wait halting until the VM is stopped");
	for (;;)
		__asm__ volatile("cli; hlt");
	return 0;
}
static const struct scenario extra_scenarios[] = {
	{"ud2", scenario_ud2},
	{"wait", scenario_wait},
	{"gdb", scenario_gdb},
	{"pci", scenario_pci},
	{"virtio-rng", scenario_virtio_rng},
	{"virtio-blk", scenario_virtio_blk},
	{"virtio-net", scenario_virtio_net},
	{"blk-bench", scenario_blk_bench},
	{"blk-verify", scenario_blk_verify},
	{"count", scenario_count},
	{"virtio-vsock", scenario_virtio_vsock},
	{"virtio-console", scenario_virtio_console},
};

static int nr_ok, nr_fail;

static void run_one(const struct scenario *s)
{
	current_scenario = s->name;
	const char *why = s->run();
	current_scenario = 0;
	if (why) {
		say("%s FAIL %s", s->name, why);
		nr_fail++;
	} else {
		say("%s ok", s->name);
		nr_ok++;
	}
}

static void run_by_name(const char *name, size_t n)
{
	if (str_eq_n(name, "all", n)) {
		for (size_t i = 0; i < NR_SCENARIOS; i++)
			run_one(&scenarios[i]);
		return;
	}
	for (size_t i = 0; i < NR_SCENARIOS; i++) {
		if (str_eq_n(name, scenarios[i].name, n)) {
			run_one(&scenarios[i]);
			return;
		}
	}
	for (size_t i = 0; i < sizeof(extra_scenarios) / sizeof(extra_scenarios[0]); i++) {
		if (str_eq_n(name, extra_scenarios[i].name, n)) {
			run_one(&extra_scenarios[i]);
			return;
		}
	}
	say("%.*s FAIL unknown scenario", (int)n, name);
	nr_fail++;
}

const char *scenario_hello(void)
{
	say("hello");
	return 0;
}

void kmain(u32 start_info)
{
	cpu_tables_init();
	read_start_info(start_info);
	say("start (pvh start_info %#x version %u, cmdline \"%s\")", start_info, boot.version, boot.cmdline);
	parse_cmdline();

	const char *list = opt("test");
	if (!list || !*list)
		list = "all";
	while (*list) {
		size_t n = 0;
		while (list[n] && list[n] != ',')
			n++;
		if (n)
			run_by_name(list, n);
		list += n;
		if (*list == ',')
			list++;
	}
	say("summary ok=%d fail=%d", nr_ok, nr_fail);
	say("done");
	machine_reset();
}
