/* ringvm test guest: shared declarations.
 *
 * Everything here runs at CPL0 unless noted. On kvm_pvm every CPL0 instruction is interpreted
 * (~1 us each), so kernel-mode code is kept short; hot loops run at CPL3 (compute.c).
 */
#ifndef RINGVM_TEST_H
#define RINGVM_TEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define PREFIX "ringvm-test: "

/* GDT selectors (boot.S). */
#define SEL_CODE32 0x08
#define SEL_DATA 0x10
#define SEL_CODE64 0x18
#define SEL_UDATA 0x23 /* 0x20 | RPL3 */
#define SEL_UCODE 0x2b /* 0x28 | RPL3 */
#define SEL_TSS 0x30

#define MAX_CPUS 64
#define MAX_E820 128
#define CMDLINE_MAX 1024

/* ---- PVH start_info (Xen public/arch-x86/hvm/start_info.h) ---- */
#define HVM_START_MAGIC 0x336ec578u
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr; /* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};
struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* What kmain copied out of start_info before anything could overwrite it. */
struct boot_info {
	u64 start_info_paddr;
	u32 version;
	int valid;
	char cmdline[CMDLINE_MAX];
	u32 nr_e820;      /* entries copied */
	u32 nr_e820_orig; /* entries the VMM reported */
	struct hvm_memmap_entry e820[MAX_E820];
	u64 rsdp_paddr;
};
extern struct boot_info boot;

/* ---- exceptions (boot.S pushes this frame) ---- */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

/* ---- boot.S ---- */
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];
extern char ap_tramp_start[], ap_tramp_end[];
extern u64 isr_table[32];
extern u64 gdt[];
extern char exc_stack_top[], user_stack_top[], ap_stacks[];
#define AP_STACK_SIZE 2048
extern volatile u64 ap_stack_top; /* stack the next AP takes */
extern char user_exit[];          /* CPL3 code that faults back to CPL0 */
/* Runs fn(arg) at CPL3 on user_rsp, port I/O allowed; returns the vector of the exception that
 * brought the CPU back to CPL0 (see trap()). */
u64 enter_user(void (*fn)(void *), void *arg, u64 user_rsp);
__attribute__((noreturn)) void user_return(u64 value);
/* enter_user(fn, arg) on user_stack_top, expecting fn to return into user_exit (its #GP brings the
 * CPU back); fails unless it did and *cs, the code segment fn recorded (read_cs), is at CPL3
 * ("the <what> ran with cs ..."). */
const char *run_user(void (*fn)(void *), void *arg, const u16 *cs, const char *what);
/* The current code segment selector (its low 2 bits: the privilege level). */
static inline u16 read_cs(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs;
}

/* ---- port and CPU helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/* A pointer to a fixed physical address (identity-mapped), hidden from gcc's bounds checks. */
static inline void *phys(u64 addr)
{
	__asm__("" : "+r"(addr));
	return (void *)addr;
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 atomic_inc(volatile u32 *p)
{
	u32 v = 1;
	__asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p)::"memory");
	return v;
}

/* ---- lib.c ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq_n(const char *a, const char *b, size_t n);
int vfmt(char *buf, size_t size, const char *fmt, va_list ap);
int fmt(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void serial_write(const char *s, size_t n);
/* One serial line: "ringvm-test: " + formatted text + "\n". Usable at CPL0 and CPL3. */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Formats a failure reason into a static buffer and returns it (scenarios return it). */
const char *failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
__attribute__((noreturn)) void machine_reset(void);
u64 tsc_hz_or_guess(void);
extern u64 tsc_hz; /* 0 until the rtc scenario calibrated it */

/* ---- main.c ---- */
void load_idt(void);
/* Value of `ringvm.<key>=...` on the cmdline (NUL-terminated copy), or NULL. */
const char *opt(const char *key);
/* Numeric option (decimal or 0x-hex); returns 1 and sets *out when present and valid. */
int opt_u64(const char *key, u64 *out);
/* A decimal or 0x-hex number at *s; advances *s. Returns 0 if there is none. */
int parse_u64(const char **s, u64 *out);
/* Installs a DPL0 interrupt gate for vector vec (IDT has 256 entries). */
void idt_set(u32 vec, u64 handler);
extern const char *current_scenario;

/* ---- scenarios: each returns NULL on success or a failure reason ---- */
const char *scenario_hello(void);
const char *scenario_cpuid(void);
const char *scenario_e820(void);
const char *scenario_rtc(void);
const char *scenario_smp(void);
const char *scenario_compute(void);
const char *scenario_gdb(void);
const char *scenario_pci(void);        /* pci.c, not in `all` */
const char *scenario_virtio_rng(void); /* virtio_rng.c, not in `all` */
const char *scenario_virtio_blk(void); /* virtio_blk.c, not in `all` */
const char *scenario_virtio_net(void); /* virtio_net.c, not in `all` */
const char *scenario_blk_bench(void);  /* blk_bench.c, not in `all` */
const char *scenario_blk_verify(void); /* blk_verify.c, not in `all` */
const char *scenario_count(void);      /* count.c, not in `all` */
const char *scenario_virtio_vsock(void); /* virtio_vsock.c, not in `all` */
const char *scenario_virtio_console(void); /* virtio_console.c, not in `all` */

/* e820.c */
int e820_ram_covers(u64 start, u64 end);
/* smp.c */
void ap_main(void);
/* compute.c */
extern volatile int user_active;

/* ---- pci.c: PCI bus 0 (0xCF8/0xCFC, or ECAM with ringvm.pci.ecam=ADDR) ---- */
#define PCI_MAX_FUNCS 64
enum { BAR_NONE, BAR_IO, BAR_MEM32, BAR_MEM64 };
struct pci_bar {
	u64 addr, size;
	u8 kind, prefetch;
};
struct pci_func {
	u8 dev, fn, hdr, rev;
	u16 vendor, device;
	u32 class; /* class << 16 | subclass << 8 | prog-if */
	struct pci_bar bar[6];
};
u32 pci_read(const struct pci_func *f, u32 off, int size);
void pci_write(const struct pci_func *f, u32 off, int size, u32 v);
/* Enumerates bus 0 and sizes every BAR (decoding is off while sizing). Returns the count. */
int pci_scan(struct pci_func *out, int max);
/* Config access mechanism, for messages: "cf8" or "ecam 0x...". */
const char *pci_mechanism(void);
/* Gives every memory BAR of f an address in the ringvm.pci.mmio window if it has none (or one
 * above 4 GiB, or always with ringvm.pci.reassign=1), then enables memory decoding and bus
 * mastering. all[0..n) is the scan (to avoid the BARs already in use). */
const char *pci_enable(struct pci_func *f, struct pci_func *all, int n, const char *who);
/* Offset of the next capability after prev (0: the first), or 0. */
u8 pci_next_cap(const struct pci_func *f, u8 prev);

/* Interrupts (pci.c + irq.S): vectors IRQ_BASE..IRQ_BASE+15 count in irq_count[] and EOI the
 * LAPIC; IRQ_TIMER is the LAPIC one-shot timer that bounds hlt waits. */
#define IRQ_BASE 0x40
#define IRQ_TIMER (IRQ_BASE + 15)
extern volatile u32 irq_count[16];
extern volatile u32 irq_legacy, irq_spurious;
extern u64 irq_stubs[16 + 16 + 1]; /* IRQ_BASE.., 0x30.. (8259), 0xff (spurious) */
/* Software-enables the LAPIC, remaps and masks the 8259s, installs the vectors. Idempotent. */
void irq_init(void);
u32 irq_apic_id(void);
/* The LAPIC has vec requested but not yet delivered (its IRR bit). */
int irq_is_pending(u32 vec);
void irq_handler(u64 vec);
enum wait_mode { WAIT_HLT, WAIT_SPIN, WAIT_POLL };
/* Waits until *p == want and (if irq) *irq >= irq_min: WAIT_POLL spins with IF=0, WAIT_SPIN
 * spins with interrupts enabled, WAIT_HLT does sti;hlt with the LAPIC timer as a watchdog.
 * Returns 1 when reached, 0 after timeout_ms. Interrupts are off again on return. */
int wait_u16(volatile u16 *p, u16 want, enum wait_mode mode, u64 timeout_ms, const volatile u32 *irq,
	     u32 irq_min);
/* The same for any condition: waits until cond(arg) returns nonzero (checked with IF=0). */
int wait_cond(int (*cond)(void *), void *arg, enum wait_mode mode, u64 timeout_ms);

#endif
