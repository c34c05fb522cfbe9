/* ringvm test guest: the gdb scenario, a small program for tests/tests/gdb.rs to debug through
 * `ringvm run --gdb`: a function to break on (gdb_step) and a variable to watch (gdb_counter).
 * It runs at CPL0: on kvm_pvm hosts, guest CPL3 runs natively and KVM's guest debugging sees
 * none of it (int3 goes to the guest, debug registers never fire), while CPL0 is interpreted by
 * KVM's instruction emulator, which checks the debug registers and the trap flag. */
#include "test.h"

#define GDB_ROUNDS 3

/* Bumped once per gdb_step call; a debugger may change it, so the end prints what it holds. */
volatile u64 gdb_counter;

struct gdb_job {
	u64 rounds;
	u64 sum;
};
static struct gdb_job gdb_job;

__attribute__((noinline)) u64 gdb_step(u64 x)
{
	gdb_counter = gdb_counter + 1;
	return x * 3 + 1;
}

static void run_job(struct gdb_job *j)
{
	u64 s = 0;
	for (u64 i = 0; i < j->rounds; i++)
		s += gdb_step(i);
	j->sum = s;
}

const char *scenario_gdb(void)
{
	gdb_job.rounds = GDB_ROUNDS;
	run_job(&gdb_job);
	say("gdb counter=%lu sum=%lu", gdb_counter, gdb_job.sum);
	/* sum of 3i+1 for i < 3 */
	if (gdb_job.sum != 12)
		return failf("sum %lu, expected 12", gdb_job.sum);
	return NULL;
}
