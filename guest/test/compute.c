/* ringvm test guest: the compute scenario. Integer loops run at CPL3 (native speed on kvm_pvm,
 * where CPL0 is interpreted); the user code prints its own result through COM1 (port I/O allowed), then
 * returns into user_exit, whose `hlt` raises #GP and brings the CPU back to CPL0. */
#include "test.h"

#define DEFAULT_ITERS 200000000ull
#define XS_EXPECTED 0xeef4ecb01c6ba1bfull /* xorshift64 below after DEFAULT_ITERS */
#define PRIME_LIMIT 1000000u
#define PRIMES_EXPECTED 78498u /* primes below 10^6 */

volatile int user_active;
extern struct trap_frame user_fault;

struct compute_job {
	u64 iters;
	u64 xs;
	u32 primes;
	u16 cs;
	u64 cyc_xs, cyc_primes;
};
static struct compute_job job;

static void per_iter(u64 cycles, u64 n, u64 *whole, u64 *hundredths)
{
	*whole = n ? cycles / n : 0;
	*hundredths = n ? cycles * 100 / n % 100 : 0;
}

/* CPL3 from here ... */
static void user_compute(void *arg)
{
	struct compute_job *j = arg;
	u16 cs = read_cs();
	j->cs = cs;

	u64 t0 = rdtsc();
	u64 x = 0x9e3779b97f4a7c15ull, s = 0;
	for (u64 i = 0; i < j->iters; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		s += x;
	}
	j->xs = x ^ s;
	u64 t1 = rdtsc();
	u32 count = 1; /* 2 */
	for (u32 n = 3; n < PRIME_LIMIT; n += 2) {
		u32 prime = 1;
		for (u32 d = 3; d * d <= n; d += 2) {
			if (n % d == 0) {
				prime = 0;
				break;
			}
		}
		count += prime;
	}
	j->primes = count;
	u64 t2 = rdtsc();
	j->cyc_xs = t1 - t0;
	j->cyc_primes = t2 - t1;

	u64 w, h;
	per_iter(j->cyc_xs, j->iters, &w, &h);
	say("compute cpl=%u (cs=%#x) xorshift64 iters=%lu result=%#lx cycles=%lu (%lu.%02lu/iter)", cs & 3, cs,
	    j->iters, j->xs, j->cyc_xs, w, h);
	say("compute cpl=%u primes below %u: %u cycles=%lu", cs & 3, PRIME_LIMIT, count, j->cyc_primes);
}
/* ... to here. */

const char *scenario_compute(void)
{
	job.iters = DEFAULT_ITERS;
	u64 v;
	if (opt_u64("compute.iters", &v))
		job.iters = v;

	user_active = 1;
	u64 vec = enter_user(user_compute, &job, (u64)user_stack_top);
	if (vec != 13 || user_fault.rip != (u64)user_exit)
		return failf("the CPL3 run ended with exception %lu error %#lx at rip %#lx (expected #GP at %p)", vec,
			     user_fault.error, user_fault.rip, (void *)user_exit);
	say("compute back at CPL0 after #GP(%#lx) from hlt at CPL3 rip %#lx", user_fault.error, user_fault.rip);

	if ((job.cs & 3) != 3)
		return failf("the user code ran with cs %#x, not at CPL3", job.cs);
	if (job.iters == DEFAULT_ITERS && job.xs != XS_EXPECTED)
		return failf("xorshift64 result %#lx, expected %#llx", job.xs, XS_EXPECTED);
	if (job.primes != PRIMES_EXPECTED)
		return failf("counted %u primes below %u, expected %u", job.primes, PRIME_LIMIT, PRIMES_EXPECTED);
	if (tsc_hz) {
		u64 total = job.cyc_xs + job.cyc_primes;
		say("compute took %lu ms at CPL3 (tsc %lu MHz)", total / (tsc_hz / 1000), tsc_hz / 1000000);
	}
	return 0;
}
