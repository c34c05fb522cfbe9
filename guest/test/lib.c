/* ringvm test guest: serial output, formatting, strings, reset. Runs at CPL0 and at CPL3. */
#include "test.h"

#define COM1 0x3f8
#define UART_LSR 5
#define LSR_THRE 0x20
#define I8042_STATUS 0x64
#define I8042_CMD 0x64
#define I8042_RESET 0xfe

u64 tsc_hz;

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n)::"memory");
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

/* a[0..n) == b exactly (b NUL-terminated). */
int str_eq_n(const char *a, const char *b, size_t n)
{
	size_t m = strlen(b);
	return m == n && memcmp(a, b, n) == 0;
}

/* ---- a small printf: %s %c %d %i %u %x %p %%, flags '0' '-' '#', width, .* for %s,
 * length l / ll / z ---- */
struct out {
	char *buf;
	size_t size, len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, u64 v, int neg, unsigned base, int width, int zero, int left,
		    const char *prefix)
{
	char tmp[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	int plen = (int)strlen(prefix) + (neg ? 1 : 0);
	int pad = width - n - plen;
	if (!left && !zero)
		for (; pad > 0; pad--)
			put(o, ' ');
	if (neg)
		put(o, '-');
	for (const char *p = prefix; *p; p++)
		put(o, *p);
	if (!left && zero)
		for (; pad > 0; pad--)
			put(o, '0');
	while (n)
		put(o, tmp[--n]);
	if (left)
		for (; pad > 0; pad--)
			put(o, ' ');
}

int vfmt(char *buf, size_t size, const char *f, va_list ap)
{
	struct out o = {buf, size, 0};
	for (; *f; f++) {
		if (*f != '%') {
			put(&o, *f);
			continue;
		}
		f++;
		int zero = 0, left = 0, alt = 0, width = 0, prec = -1, lng = 0;
		for (;; f++) {
			if (*f == '0')
				zero = 1;
			else if (*f == '-')
				left = 1;
			else if (*f == '#')
				alt = 1;
			else
				break;
		}
		while (*f >= '0' && *f <= '9')
			width = width * 10 + (*f++ - '0');
		if (*f == '.') {
			f++;
			if (*f == '*') {
				prec = va_arg(ap, int);
				f++;
			} else {
				prec = 0;
				while (*f >= '0' && *f <= '9')
					prec = prec * 10 + (*f++ - '0');
			}
		}
		while (*f == 'l' || *f == 'z') {
			lng = 1;
			f++;
		}
		switch (*f) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int n = 0;
			while (s[n] && (prec < 0 || n < prec))
				n++;
			int pad = width - n;
			if (!left)
				for (; pad > 0; pad--)
					put(&o, ' ');
			for (int i = 0; i < n; i++)
				put(&o, s[i]);
			for (; pad > 0; pad--)
				put(&o, ' ');
			break;
		}
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 'd':
		case 'i': {
			i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
			put_num(&o, v < 0 ? (u64)-v : (u64)v, v < 0, 10, width, zero, left, "");
			break;
		}
		case 'u':
			put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 0, 10, width, zero, left, "");
			break;
		case 'x':
			put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 0, 16, width, zero, left,
				alt ? "0x" : "");
			break;
		case 'p':
			put_num(&o, (u64)va_arg(ap, void *), 0, 16, width, zero, left, "0x");
			break;
		case '%':
			put(&o, '%');
			break;
		case 0:
			f--;
			break;
		default:
			put(&o, '%');
			put(&o, *f);
		}
	}
	if (o.size)
		o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
	return (int)o.len;
}

int fmt(char *buf, size_t size, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	int n = vfmt(buf, size, f, ap);
	va_end(ap);
	return n;
}

/* 8250 COM1, polled: wait (bounded) for THR empty, then write the byte. */
static void serial_putc(char c)
{
	for (int i = 0; i < 100000; i++)
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			break;
	outb(COM1, (u8)c);
}

void serial_write(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		serial_putc(s[i]);
}

void say(const char *f, ...)
{
	char buf[256];
	memcpy(buf, PREFIX, sizeof(PREFIX) - 1);
	va_list ap;
	va_start(ap, f);
	size_t room = sizeof(buf) - (sizeof(PREFIX) - 1) - 1; /* keep one byte for '\n' */
	int n = vfmt(buf + sizeof(PREFIX) - 1, room, f, ap);
	va_end(ap);
	size_t len = sizeof(PREFIX) - 1 + ((size_t)n < room ? (size_t)n : room - 1);
	buf[len++] = '\n';
	serial_write(buf, len);
}

const char *failf(const char *f, ...)
{
	static char reason[192];
	va_list ap;
	va_start(ap, f);
	vfmt(reason, sizeof(reason), f, ap);
	va_end(ap);
	return reason;
}

u64 tsc_hz_or_guess(void) { return tsc_hz ? tsc_hz : 3000000000ull; }

/* i8042 "pulse reset line" ends the VM under ringvm (and QEMU -no-reboot). If nothing happens,
 * force a triple fault: an empty IDT makes the next exception fatal. CPL0 only. */
void machine_reset(void)
{
	for (int i = 0; i < 1000 && (inb(I8042_STATUS) & 0x02); i++)
		;
	outb(I8042_CMD, I8042_RESET);
	u64 t0 = rdtsc();
	while (rdtsc() - t0 < tsc_hz_or_guess() / 2)
		cpu_relax();
	say("i8042 reset did not end the VM; forcing a triple fault");
	static const struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} no_idt = {0, 0};
	__asm__ volatile("lidt %0; ud2" ::"m"(no_idt));
	for (;;)
		__asm__ volatile("cli; hlt");
}
