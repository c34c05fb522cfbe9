/* ringvm test guest: the count scenario (not in `all`), for suspend/resume. A CPL3 loop counts in
 * memory and prints progress: `count step=N value=V tsc=T` every count.step increments, for
 * count.lines lines. A suspended VM prints nothing; after a resume the steps go on from where they
 * stopped (no step skipped or repeated), and the TSC difference across the pause shows what the
 * guest's clock did. */
#include "test.h"

struct count_job {
	u64 lines, step;
	volatile u64 value;
	u64 max_gap; /* the longest TSC gap between two lines */
	u16 cs;
};
static struct count_job cjob;

/* CPL3 from here ... */
static void user_count(void *arg)
{
	struct count_job *j = arg;
	j->cs = read_cs();
	u64 last = rdtsc();
	for (u64 line = 1; line <= j->lines; line++) {
		for (u64 i = 0; i < j->step; i++)
			j->value++;
		u64 now = rdtsc();
		if (now - last > j->max_gap)
			j->max_gap = now - last;
		last = now;
		say("count step=%lu value=%lu tsc=%lu", line, j->value, now);
	}
}
/* ... to here. */

const char *scenario_count(void)
{
	cjob.lines = 40;
	cjob.step = 20000000;
	cjob.value = 0;
	cjob.max_gap = 0;
	opt_u64("count.lines", &cjob.lines);
	opt_u64("count.step", &cjob.step);
	const char *ran = run_user(user_count, &cjob, &cjob.cs, "loop");
	if (ran)
		return ran;
	if (cjob.value != cjob.lines * cjob.step)
		return failf("counted %lu, expected %lu", cjob.value, cjob.lines * cjob.step);
	say("count done value=%lu max-gap-tsc=%lu", cjob.value, cjob.max_gap);
	return 0;
}
