/* ringvm test guest: the rtc scenario (MC146818 CMOS clock at ports 0x70/0x71).
 * Also calibrates the TSC against two RTC second ticks (used by smp and compute). */
#include "test.h"

#define RTC_SEC 0x00
#define RTC_MIN 0x02
#define RTC_HOUR 0x04
#define RTC_DAY 0x07
#define RTC_MON 0x08
#define RTC_YEAR 0x09
#define RTC_A 0x0a
#define RTC_B 0x0b
#define RTC_CENTURY 0x32
#define A_UIP 0x80
#define B_24H 0x02
#define B_BINARY 0x04

static u8 cmos(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

struct raw {
	u8 sec, min, hour, day, mon, year, century;
};

static int wait_not_updating(void)
{
	for (int i = 0; i < 100000; i++)
		if (!(cmos(RTC_A) & A_UIP))
			return 1;
	return 0;
}

static int read_raw(struct raw *r)
{
	if (!wait_not_updating())
		return 0;
	r->sec = cmos(RTC_SEC);
	r->min = cmos(RTC_MIN);
	r->hour = cmos(RTC_HOUR);
	r->day = cmos(RTC_DAY);
	r->mon = cmos(RTC_MON);
	r->year = cmos(RTC_YEAR);
	r->century = cmos(RTC_CENTURY);
	return 1;
}

static int binary; /* register B: values are binary, not BCD */

static u32 dec(u8 v) { return binary ? v : (u32)(v >> 4) * 10 + (v & 0xf); }

/* Waits for the seconds register to change from `from`; returns 1 and the TSC at the change. */
static int wait_tick(u8 from, u8 *to, u64 *at)
{
	u64 t0 = rdtsc(), limit = 2 * tsc_hz_or_guess(); /* a tick comes within 1 s */
	for (u32 i = 0; i < 2000000; i++) {
		u8 s = cmos(RTC_SEC);
		u64 t = rdtsc();
		if (s != from) {
			*to = s;
			*at = t;
			return 1;
		}
		if (t - t0 > limit)
			break;
	}
	return 0;
}

const char *scenario_rtc(void)
{
	u8 a = cmos(RTC_A), b = cmos(RTC_B);
	if (a == 0xff && b == 0xff)
		return failf("no CMOS/RTC (ports 0x70/0x71 read 0xff)");

	struct raw r1, r2;
	int stable = 0;
	for (int attempt = 0; attempt < 5 && !stable; attempt++) {
		if (!read_raw(&r1) || !read_raw(&r2))
			return failf("RTC update-in-progress bit never clears (register A %#x)", cmos(RTC_A));
		stable = memcmp(&r1, &r2, sizeof(r1)) == 0;
	}
	if (!stable)
		return failf("RTC registers keep changing between reads");

	binary = b & B_BINARY;
	int h24 = b & B_24H;
	u32 sec = dec(r1.sec), min = dec(r1.min), day = dec(r1.day), mon = dec(r1.mon), yy = dec(r1.year);
	u32 hour = dec(r1.hour & 0x7f);
	if (!h24)
		hour = hour % 12 + ((r1.hour & 0x80) ? 12 : 0);
	u32 cent = dec(r1.century);
	int have_century = r1.century != 0xff && r1.century != 0 && cent >= 19 && cent <= 30;
	u32 year = (have_century ? cent : 20) * 100 + yy;
	say("rtc %04u-%02u-%02uT%02u:%02u:%02u (%s, %s, century register %s, A=%#x B=%#x)", year, mon, day, hour,
	    min, sec, binary ? "binary" : "bcd", h24 ? "24h" : "12h", have_century ? "set" : "absent", a, b);

	static const u8 mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	if (year < 2024 || year > 2199)
		return failf("implausible year %u", year);
	if (mon < 1 || mon > 12 || day < 1 || day > mdays[mon - 1] || hour > 23 || min > 59 || sec > 59)
		return failf("implausible date/time %04u-%02u-%02uT%02u:%02u:%02u", year, mon, day, hour, min, sec);

	/* The clock must tick: two second boundaries, exactly one second apart on the TSC. */
	u8 s0 = cmos(RTC_SEC), s1, s2;
	u64 t1, t2;
	if (!wait_tick(s0, &s1, &t1))
		return failf("seconds did not advance within ~2 s (stuck at %#x)", s0);
	if (!wait_tick(s1, &s2, &t2))
		return failf("seconds advanced once (%#x -> %#x) but not again within ~2 s", s0, s1);
	u32 d1 = (dec(s1) + 60 - dec(s0)) % 60, d2 = (dec(s2) + 60 - dec(s1)) % 60;
	u64 hz = t2 - t1;
	say("rtc ticked %02u -> %02u -> %02u; one second = %lu TSC cycles (~%lu MHz)", dec(s0), dec(s1),
	    dec(s2), hz, hz / 1000000);
	if (d1 != 1 || d2 != 1)
		return failf("seconds did not advance by one per tick");
	if (hz < 100000000ull || hz > 10000000000ull)
		return failf("an RTC second took %lu TSC cycles", hz);
	tsc_hz = hz;
	return 0;
}
