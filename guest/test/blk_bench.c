/* ringvm test guest: the blk-bench scenario. A polling virtio-blk driver that keeps
 * ringvm.blkbench.qd requests in flight (random block-aligned reads or writes of
 * ringvm.blkbench.bs bytes across the whole disk) for ringvm.blkbench.ms and reports the IOPS
 * it measured with the TSC.
 *
 * The device is set up at CPL0 (PCI, virtio init with MSI-X off, one queue of up to 256
 * entries); the measurement runs at CPL3 (native speed on kvm_pvm, where CPL0 is interpreted)
 * with IF=0: it polls the used ring and notifies by an MMIO write to the queue's notify address,
 * which a VMM serves with a KVM ioeventfd. Nothing else leaves the guest while it is timed.
 *
 * Every request is its own 3-descriptor chain (header, data, status) in a fixed slot: slot i
 * owns descriptors 3i..3i+2, prepared once; a refill only rewrites the header's sector. All
 * completions found in one look at the used ring are refilled, then one notification.
 *
 * TSC rate: ringvm.blkbench.tsc_khz=K if given, else the rtc scenario's calibration if it ran,
 * else the CPL3 code calibrates against the RTC around the measurement: it waits for a second
 * boundary before it starts and for the next one after it ends (CMOS reads happen only outside
 * the timed window) and divides the cycles by the whole seconds between them. */
#include "virtio.h"

#define BLK_F_RO (1ull << 5)
#define BLK_F_BLK_SIZE (1ull << 6)

#define T_IN 0
#define T_OUT 1


#define BB_QSIZE 256 /* largest queue we use */
#define BB_QD_MAX (BB_QSIZE / 3)
#define BB_BS_MAX 65536
/* Rings and data buffers live in RAM above the image, not in .bss (which the guest zeroes at
 * CPL0 on every boot): 3 ring pages at BB_MEM, then QD x BS of data. */
#define BB_MEM 0x2000000ull
#define BB_DATA (BB_MEM + 0x4000)
#define BB_MEM_END (BB_DATA + (u64)BB_QD_MAX * BB_BS_MAX)

struct bb_hdr {
	u32 type, reserved;
	u64 sector;
};
struct bb_avail {
	u16 flags, idx;
	u16 ring[BB_QSIZE];
};
struct bb_used {
	u16 flags, idx;
	struct vq_used_elem ring[BB_QSIZE];
};

struct bb_job {
	/* in */
	u32 qd, bs, write, qsize, verify;
	u64 ms, blocks; /* blocks of bs bytes on the disk */
	u64 tsc_khz;	/* 0: calibrate against the RTC */
	u64 notify;
	volatile struct vq_desc *desc;
	volatile struct bb_avail *avail;
	volatile struct bb_used *used;
	/* out */
	u64 ios, cycles, lat_cycles, kicks, ios_total;
	u64 bad_status, bad_id, stalled, rtc_seconds, verified, bad_data;
	u16 cs;
};

static struct bb_hdr hdrs[BB_QD_MAX];
static volatile u8 statuses[BB_QD_MAX];
static u64 submitted_at[BB_QD_MAX];
static struct bb_job job;
static struct virtio_dev v;

/* ---- CPL3 from here ... ---- */
static u8 bb_cmos(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static u32 bb_dec(u8 v, int binary) { return binary ? v : (u32)(v >> 4) * 10 + (v & 0xf); }

/* Waits for the RTC seconds to change; returns the TSC at the change and the new seconds, or 0
 * after ~3 s (guessing 4 GHz at most). */
static u64 bb_rtc_edge(u32 *sec, int binary)
{
	u8 s0 = bb_cmos(0x00);
	u64 t0 = rdtsc();
	for (;;) {
		u8 s = bb_cmos(0x00);
		u64 t = rdtsc();
		if (s != s0) {
			*sec = bb_dec(s, binary);
			return t;
		}
		if (t - t0 > 12000000000ull)
			return 0;
	}
}

static u64 bb_rand(u64 *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void user_blk_bench(void *arg)
{
	struct bb_job *j = arg;
	j->cs = read_cs();
	u32 qd = j->qd, qsize = j->qsize;
	u64 spb = j->bs / 512, x = rdtsc() * 0x9e3779b97f4a7c15ull | 1;

	/* The chains, one per slot. */
	for (u32 i = 0; i < qd; i++) {
		volatile struct vq_desc *d = &j->desc[3 * i];
		d[0] = (struct vq_desc){(u64)&hdrs[i], sizeof(hdrs[i]), VQ_F_NEXT, (u16)(3 * i + 1)};
		d[1] = (struct vq_desc){BB_DATA + (u64)i * j->bs, j->bs, (u16)(VQ_F_NEXT | (j->write ? 0 : VQ_F_WRITE)),
					(u16)(3 * i + 2)};
		d[2] = (struct vq_desc){(u64)&statuses[i], 1, VQ_F_WRITE, 0};
		hdrs[i] = (struct bb_hdr){j->write ? T_OUT : T_IN, 0, 0};
	}

	int binary = 0;
	u32 sec0 = 0, sec1 = 0;
	u64 edge0 = 0, hz_guess = j->tsc_khz ? j->tsc_khz * 1000 : 3000000000ull;
	if (!j->tsc_khz) {
		binary = bb_cmos(0x0b) & 0x04;
		edge0 = bb_rtc_edge(&sec0, binary);
	}

	u16 avail_idx = 0, used_seen = 0;
	u32 in_flight = 0;
	u64 t0 = rdtsc(), t_end = t0 + j->ms * (hz_guess / 1000), last_progress = t0, now = t0;
	int stopping = 0;
	for (u32 i = 0; i < qd; i++) {
		hdrs[i].sector = bb_rand(&x) % j->blocks * spb;
		statuses[i] = 0xff;
		j->avail->ring[avail_idx++ % qsize] = (u16)(3 * i);
		submitted_at[i] = t0;
	}
	in_flight = qd;
	__asm__ volatile("" ::: "memory");
	j->avail->idx = avail_idx;
	mb();
	mmio_write16(j->notify, 0);
	j->kicks++;

	while (in_flight) {
		u16 used_idx = j->used->idx;
		now = rdtsc();
		if (used_idx == used_seen) {
			if (now - last_progress > 5 * hz_guess) {
				j->stalled = 1;
				break;
			}
			cpu_relax();
			continue;
		}
		__asm__ volatile("" ::: "memory"); /* x86 does not reorder loads with loads */
		last_progress = now;
		int count = !stopping; /* completions after the crossing batch are drained, not counted */
		if (!stopping && now >= t_end) {
			stopping = 1;
			j->cycles = now - t0;
		}
		u32 refills = 0;
		while (used_seen != used_idx) {
			volatile struct vq_used_elem *e = &j->used->ring[used_seen % qsize];
			u32 id = e->id;
			used_seen++;
			in_flight--;
			u32 slot = id / 3;
			if (id % 3 || slot >= qd) {
				j->bad_id++;
				continue;
			}
			if (statuses[slot] != 0)
				j->bad_status++;
			else if (j->verify && !j->write) {
				/* The image holds its own byte offsets, one u64 per 8 bytes. */
				volatile u64 *data = (volatile u64 *)(BB_DATA + (u64)slot * j->bs);
				u64 at = hdrs[slot].sector * 512;
				if (data[0] != at || data[j->bs / 8 - 1] != at + j->bs - 8)
					j->bad_data++;
				else
					j->verified++;
				data[0] = ~0ull;
			}
			j->ios_total++;
			if (!count)
				continue;
			j->ios++;
			j->lat_cycles += now - submitted_at[slot];
			if (stopping)
				continue; /* the batch that crossed the end: counted, not refilled */
			hdrs[slot].sector = bb_rand(&x) % j->blocks * spb;
			statuses[slot] = 0xff;
			submitted_at[slot] = now;
			j->avail->ring[avail_idx++ % qsize] = (u16)(3 * slot);
			in_flight++;
			refills++;
		}
		if (refills) {
			__asm__ volatile("" ::: "memory");
			j->avail->idx = avail_idx;
			mb();
			mmio_write16(j->notify, 0);
			j->kicks++;
		}
	}
	if (!stopping)
		j->cycles = now - t0;

	if (!j->tsc_khz && !j->stalled) {
		u64 edge1 = bb_rtc_edge(&sec1, binary);
		j->rtc_seconds = (sec1 + 60 - sec0) % 60;
		if (edge0 && edge1 && j->rtc_seconds)
			j->tsc_khz = (edge1 - edge0) / j->rtc_seconds / 1000;
	}
	say("blk-bench completed=%lu verified=%lu bad-data=%lu kicks=%lu", j->ios_total, j->verified, j->bad_data,
	    j->kicks);
	if (!j->tsc_khz || !j->cycles || !j->ios)
		return;
	u64 iops = j->ios * j->tsc_khz * 1000 / j->cycles;
	u64 lat10 = j->lat_cycles * 10 / j->ios / (j->tsc_khz / 1000 ? j->tsc_khz / 1000 : 1);
	say("blk-bench op=%s qd=%u bs=%u ios=%lu cycles=%lu tsc_khz=%lu iops=%lu lat_avg_us=%lu.%lu",
	    j->write ? "randwrite" : "randread", qd, j->bs, j->ios, j->cycles, j->tsc_khz, iops, lat10 / 10,
	    lat10 % 10);
}
/* ... to here. */

static const char *bb_queue(void)
{
	u32 max;
	const char *why = virtio_poll_queue(&v, BB_MEM, BB_QSIZE, &job.qsize, &max, &job.notify);
	if (why)
		return why;
	job.desc = phys(BB_MEM);
	job.avail = phys(BB_MEM + 0x1000);
	job.used = phys(BB_MEM + 0x2000);
	say("blk-bench queue 0 size %u (max %u) notify %#lx", job.qsize, max, job.notify);
	return 0;
}

static const char *bb_run(void)
{
	u64 qd = 32, ms = 1000, bs = 4096, khz = 0;
	opt_u64("blkbench.qd", &qd);
	opt_u64("blkbench.ms", &ms);
	opt_u64("blkbench.bs", &bs);
	opt_u64("blkbench.tsc_khz", &khz);
	const char *op = opt("blkbench.op");
	int write = 0;
	if (op && str_eq_n(op, "randwrite", strlen(op)))
		write = 1;
	else if (op && !str_eq_n(op, "randread", strlen(op)))
		return failf("ringvm.blkbench.op=%s: want randread or randwrite", op);
	if (bs < 512 || bs > BB_BS_MAX || (bs & 511))
		return failf("ringvm.blkbench.bs=%lu: want a multiple of 512 up to %u", bs, BB_BS_MAX);
	if (ms < 1 || ms > 30000)
		return failf("ringvm.blkbench.ms=%lu: want 1..30000", ms);
	if (qd < 1)
		return failf("ringvm.blkbench.qd=%lu: want at least 1", qd);
	if (!e820_ram_covers(BB_MEM, BB_MEM_END))
		return failf("RAM %#llx-%#llx (rings and buffers) is not in the memory map", BB_MEM, BB_MEM_END);
	if (!khz && tsc_hz)
		khz = tsc_hz / 1000;

	memset(&v, 0, sizeof(v));
	v.name = "blk-bench";
	v.mode = WAIT_POLL; /* MSI-X off: no interrupts at all */
	const char *why = virtio_open(&v, VIRTIO_TYPE_BLK);
	if (!why && !v.device)
		why = failf("no device-specific configuration capability");
	if (!why)
		why = virtio_init(&v, BLK_F_RO | BLK_F_BLK_SIZE);
	if (!why)
		why = bb_queue();
	if (!why)
		why = virtio_driver_ok(&v);
	if (why)
		return why;
	u64 capacity = virtio_cfg(&v, 0, 8);
	if (write && (v.drv_features & BLK_F_RO))
		return failf("randwrite on a read-only device");
	if (qd > job.qsize / 3) {
		say("warning: blk-bench qd %lu needs %lu descriptors, the queue has %u: qd %u", qd, 3 * qd, job.qsize,
		    job.qsize / 3);
		qd = job.qsize / 3;
	}
	job.qd = (u32)qd;
	job.bs = (u32)bs;
	job.write = (u32)write;
	u64 verify = 0;
	opt_u64("blkbench.verify", &verify);
	job.verify = verify != 0;
	job.ms = ms;
	job.blocks = capacity / (bs / 512);
	job.tsc_khz = khz;
	if (job.blocks < 1)
		return failf("capacity %lu sectors is below one %lu-byte block", capacity, bs);
	say("blk-bench capacity=%lu sectors op=%s qd=%lu bs=%lu ms=%lu tsc %s", capacity,
	    write ? "randwrite" : "randread", qd, bs, ms, khz ? "given" : "from the rtc");

	const char *ran = run_user(user_blk_bench, &job, &job.cs, "loop");
	if (ran)
		return ran;
	if (job.stalled)
		return failf("no completion for 5 s (%lu ios done, %lu kicks, used idx %u)", job.ios_total, job.kicks,
			     job.used->idx);
	if (job.bad_id)
		return failf("%lu used entries named no request head", job.bad_id);
	if (job.bad_data)
		return failf("%lu of %lu reads returned other data than the image's offsets", job.bad_data,
			     job.ios_total);
	if (job.bad_status)
		return failf("%lu of %lu requests ended with a status other than OK", job.bad_status, job.ios_total);
	if (!job.ios)
		return failf("no request completed");
	if (!job.tsc_khz)
		return failf("could not calibrate the TSC against the RTC (%lu seconds)", job.rtc_seconds);
	return 0;
}

const char *scenario_blk_bench(void)
{
	memset(&job, 0, sizeof(job));
	return virtio_finish(&v, bb_run());
}
