/* ringvm test guest: the blk-verify scenario. A polling virtio-blk driver at CPL3 that keeps
 * ringvm.blkverify.qd requests in flight, each slot writing a block with a pattern that names
 * the block and a version, reading it back and checking it, or reading and checking a block
 * written earlier. Meant to run while the host kills the device process again and again: no
 * request may fail, none may complete twice (a used entry for a slot with nothing in flight),
 * none may be lost (no completion for 10 s), and every block read back must hold the last
 * version written. At the end every block written is read back once more.
 *
 * Layout: slot i owns descriptors 3i..3i+2 (header, 4 KiB of data, status). Slots never touch
 * the same block at once (a lock per block). Completions are polled from the used ring; a
 * refill notifies once per look at the ring. Rings, buffers and the block table live in RAM
 * at BV_MEM (not .bss).
 *
 * Output: `blk-verify running qd=N blocks=N` before the loop, then
 * `blk-verify writes=N reads=N checked=N final=N errors=N mismatches=N doubled=N bad_id=N
 * max_stall_us=N` (stall: the longest time without a completion while requests were in
 * flight, converted with the rtc scenario's TSC rate or an assumed 3 GHz). */
#include "virtio.h"

#define T_IN 0
#define T_OUT 1


#define BV_QSIZE 256
#define BV_QD_MAX 64
#define BV_BS 4096
#define BV_BLOCKS_MAX 4096
#define BV_GAPS 256
#define BV_GAP_US 5000 /* a gap between completions this long is a stall (a device restart) */
#define BV_MEM 0x3000000ull
#define BV_DATA (BV_MEM + 0x4000)
#define BV_TABLE (BV_DATA + (u64)BV_QD_MAX * BV_BS)
#define BV_MEM_END (BV_TABLE + (u64)BV_BLOCKS_MAX * 8)

struct bv_hdr {
	u32 type, reserved;
	u64 sector;
};
struct bv_avail {
	u16 flags, idx;
	u16 ring[BV_QSIZE];
};
struct bv_used {
	u16 flags, idx;
	struct vq_used_elem ring[BV_QSIZE];
};

enum { S_IDLE, S_WRITE, S_VERIFY, S_READ, S_FINAL };

struct bv_slot {
	u32 state, block, version;
};

struct bv_job {
	u32 qd, qsize, blocks;
	u64 ms, hz, notify;
	volatile struct vq_desc *desc;
	volatile struct bv_avail *avail;
	volatile struct bv_used *used;
	u64 writes, reads, checked, final, errors, mismatches, doubled, bad_id, stalled, max_stall;
	u32 gaps;	   /* gaps of more than BV_GAP_US between completions, recorded */
	u64 gap[BV_GAPS]; /* their lengths, in TSC cycles */
	u16 cs;
};

static struct bv_hdr hdrs[BV_QD_MAX];
static volatile u8 statuses[BV_QD_MAX];
static struct bv_slot slots[BV_QD_MAX];
static struct bv_job job;
static struct virtio_dev v;

/* ---- CPL3 from here ... ---- */
/* Per block: version (low 32 bits; 0 = never written) and a lock (bit 32). */
static volatile u64 *bv_table(void) { return (volatile u64 *)BV_TABLE; }

static u64 bv_rand(u64 *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static u64 bv_word(u32 block, u32 version, u32 i)
{
	return ((u64)block * 0x9e3779b97f4a7c15ull) ^ ((u64)version * 0xc2b2ae3d27d4eb4full) ^ i;
}

static u64 *bv_buf(u32 slot) { return (u64 *)(BV_DATA + (u64)slot * BV_BS); }

static void bv_submit(struct bv_job *j, u32 slot, u32 type, u16 *avail_idx)
{
	hdrs[slot] = (struct bv_hdr){type, 0, (u64)slots[slot].block * (BV_BS / 512)};
	j->desc[3 * slot + 1].flags = (u16)(VQ_F_NEXT | (type == T_IN ? VQ_F_WRITE : 0));
	statuses[slot] = 0xff;
	j->avail->ring[(*avail_idx)++ % j->qsize] = (u16)(3 * slot);
}

/* Starts the next request of an idle slot; 0 if it has nothing to do (final pass done). */
static int bv_start(struct bv_job *j, u32 slot, u64 *x, int final, u32 *cursor, u16 *avail_idx)
{
	volatile u64 *t = bv_table();
	struct bv_slot *s = &slots[slot];
	if (final) {
		while (*cursor < j->blocks && !(t[*cursor] & 0xffffffffu))
			(*cursor)++;
		if (*cursor >= j->blocks)
			return 0;
		s->block = (*cursor)++;
		s->version = (u32)t[s->block];
		s->state = S_FINAL;
		u64 *b = bv_buf(slot);
		for (u32 i = 0; i < BV_BS / 8; i++)
			b[i] = 0xaaaaaaaaaaaaaaaaull;
		bv_submit(j, slot, T_IN, avail_idx);
		return 1;
	}
	for (int tries = 0; tries < 64; tries++) {
		u32 b = (u32)(bv_rand(x) % j->blocks);
		u64 e = t[b];
		if (e >> 32)
			continue; /* another slot has it */
		int read_old = (e & 0xffffffffu) && (bv_rand(x) & 3) == 0;
		t[b] = e | (1ull << 32);
		s->block = b;
		u64 *buf = bv_buf(slot);
		if (read_old) {
			s->version = (u32)e;
			s->state = S_READ;
			for (u32 i = 0; i < BV_BS / 8; i++)
				buf[i] = 0xaaaaaaaaaaaaaaaaull;
			bv_submit(j, slot, T_IN, avail_idx);
		} else {
			s->version = (u32)e + 1;
			s->state = S_WRITE;
			for (u32 i = 0; i < BV_BS / 8; i++)
				buf[i] = bv_word(b, s->version, i);
			bv_submit(j, slot, T_OUT, avail_idx);
		}
		return 1;
	}
	return 0;
}

static int bv_check(u32 slot)
{
	u64 *b = bv_buf(slot);
	for (u32 i = 0; i < BV_BS / 8; i++)
		if (b[i] != bv_word(slots[slot].block, slots[slot].version, i))
			return 0;
	return 1;
}

static void bv_publish(struct bv_job *j, u16 avail_idx)
{
	if (j->avail->idx == avail_idx)
		return;
	__asm__ volatile("" ::: "memory");
	j->avail->idx = avail_idx;
	mb();
	mmio_write16(j->notify, 0);
}

/* Handles one used entry: the slot's request is done. A write is read back (unless
 * draining, when no request is started); reads are checked. */
static void bv_used(struct bv_job *j, u32 id, u32 *in_flight, u16 *avail_idx, int draining)
{
	u32 slot = id / 3;
	if (id % 3 || slot >= j->qd) {
		j->bad_id++;
		return;
	}
	struct bv_slot *s = &slots[slot];
	if (s->state == S_IDLE) {
		j->doubled++;
		return;
	}
	(*in_flight)--;
	volatile u64 *t = bv_table();
	if (statuses[slot] != 0) {
		j->errors++;
	} else if (s->state == S_WRITE) {
		j->writes++;
		t[s->block] = (1ull << 32) | s->version;
		if (!draining) {
			for (u32 i = 0; i < BV_BS / 8; i++)
				bv_buf(slot)[i] = 0xaaaaaaaaaaaaaaaaull;
			s->state = S_VERIFY;
			bv_submit(j, slot, T_IN, avail_idx);
			(*in_flight)++;
			return;
		}
	} else {
		if (s->state == S_FINAL)
			j->final++;
		else {
			j->reads++;
			j->checked++;
		}
		if (!bv_check(slot))
			j->mismatches++;
	}
	if (s->state != S_FINAL)
		t[s->block] &= 0xffffffffu;
	s->state = S_IDLE;
}

/* Waits for used entries past *used_seen and handles them; 0 after 10 s without one. */
static int bv_reap(struct bv_job *j, u16 *used_seen, u64 *last, u32 *in_flight, u16 *avail_idx, int draining)
{
	u16 used_idx;
	u64 now;
	for (;;) {
		used_idx = j->used->idx;
		now = rdtsc();
		if (used_idx != *used_seen)
			break;
		if (now - *last > 10 * j->hz) {
			j->stalled = 1;
			return 0;
		}
		cpu_relax();
	}
	__asm__ volatile("" ::: "memory");
	if (now - *last > j->max_stall)
		j->max_stall = now - *last;
	if (now - *last > BV_GAP_US * (j->hz / 1000000) && j->gaps < BV_GAPS)
		j->gap[j->gaps++] = now - *last;
	*last = now;
	while (*used_seen != used_idx) {
		u32 id = j->used->ring[*used_seen % j->qsize].id;
		(*used_seen)++;
		bv_used(j, id, in_flight, avail_idx, draining);
	}
	return 1;
}

static void user_blk_verify(void *arg)
{
	struct bv_job *j = arg;
	j->cs = read_cs();
	u32 qd = j->qd;
	u64 x = rdtsc() * 0x9e3779b97f4a7c15ull | 1;
	for (u32 i = 0; i < qd; i++) {
		volatile struct vq_desc *d = &j->desc[3 * i];
		d[0] = (struct vq_desc){(u64)&hdrs[i], sizeof(hdrs[i]), VQ_F_NEXT, (u16)(3 * i + 1)};
		d[1] = (struct vq_desc){(u64)bv_buf(i), BV_BS, VQ_F_NEXT, (u16)(3 * i + 2)};
		d[2] = (struct vq_desc){(u64)&statuses[i], 1, VQ_F_WRITE, 0};
		slots[i].state = S_IDLE;
	}
	u16 avail_idx = 0, used_seen = 0;
	u32 in_flight = 0, cursor = 0;
	int final = 0;
	u64 t0 = rdtsc(), t_end = t0 + j->ms * (j->hz / 1000), last = t0;
	for (;;) {
		/* Idle slots start their next request. */
		for (u32 i = 0; i < qd; i++)
			if (slots[i].state == S_IDLE && bv_start(j, i, &x, final, &cursor, &avail_idx))
				in_flight++;
		bv_publish(j, avail_idx);
		if (!in_flight) {
			if (final)
				break;
			final = 1; /* everything came back: check every block written */
			continue;
		}
		if (!bv_reap(j, &used_seen, &last, &in_flight, &avail_idx, 0))
			return;
		bv_publish(j, avail_idx);
		if (!final && rdtsc() >= t_end) {
			/* The timed part is over: no new requests until everything came back. */
			while (in_flight)
				if (!bv_reap(j, &used_seen, &last, &in_flight, &avail_idx, 1))
					return;
			final = 1;
		}
	}
}
/* ... to here. */

static const char *bv_queue(void)
{
	u32 max;
	const char *why = virtio_poll_queue(&v, BV_MEM, BV_QSIZE, &job.qsize, &max, &job.notify);
	if (why)
		return why;
	job.desc = phys(BV_MEM);
	job.avail = phys(BV_MEM + 0x1000);
	job.used = phys(BV_MEM + 0x2000);
	return 0;
}

static const char *bv_run(void)
{
	u64 qd = 32, ms = 5000;
	opt_u64("blkverify.qd", &qd);
	opt_u64("blkverify.ms", &ms);
	if (qd < 1 || qd > BV_QD_MAX)
		return failf("ringvm.blkverify.qd=%lu: want 1..%u", qd, BV_QD_MAX);
	if (ms < 1 || ms > 600000)
		return failf("ringvm.blkverify.ms=%lu: want 1..600000", ms);
	if (!e820_ram_covers(BV_MEM, BV_MEM_END))
		return failf("RAM %#llx-%#llx (rings, buffers, table) is not in the memory map", BV_MEM, BV_MEM_END);
	memset(&v, 0, sizeof(v));
	v.name = "blk-verify";
	v.mode = WAIT_POLL;
	const char *why = virtio_open(&v, VIRTIO_TYPE_BLK);
	if (!why && !v.device)
		why = failf("no device-specific configuration capability");
	if (!why)
		why = virtio_init(&v, 0);
	if (!why)
		why = bv_queue();
	if (!why)
		why = virtio_driver_ok(&v);
	if (why)
		return why;
	u64 capacity = virtio_cfg(&v, 0, 8);
	u64 blocks = capacity / (BV_BS / 512);
	if (blocks > BV_BLOCKS_MAX)
		blocks = BV_BLOCKS_MAX;
	if (blocks < 2 * qd)
		return failf("capacity %lu sectors: fewer than %lu blocks of 4 KiB", capacity, 2 * qd);
	if (3 * qd > job.qsize)
		qd = job.qsize / 3;
	job.qd = (u32)qd;
	job.blocks = (u32)blocks;
	job.ms = ms;
	job.hz = tsc_hz ? tsc_hz : 3000000000ull;
	memset((void *)BV_TABLE, 0, (u64)BV_BLOCKS_MAX * 8);
	say("blk-verify running qd=%lu blocks=%lu ms=%lu", qd, blocks, ms);

	const char *ran = run_user(user_blk_verify, &job, &job.cs, "loop");
	if (ran)
		return ran;
	say("blk-verify writes=%lu reads=%lu checked=%lu final=%lu errors=%lu mismatches=%lu doubled=%lu bad_id=%lu "
	    "max_stall_us=%lu",
	    job.writes, job.reads, job.checked, job.final, job.errors, job.mismatches, job.doubled, job.bad_id,
	    job.max_stall / (job.hz / 1000000));
	/* The stalls, sorted (insertion sort: at most BV_GAPS of them). */
	for (u32 i = 1; i < job.gaps; i++)
		for (u32 k = i; k > 0 && job.gap[k - 1] > job.gap[k]; k--) {
			u64 t = job.gap[k];
			job.gap[k] = job.gap[k - 1];
			job.gap[k - 1] = t;
		}
	if (job.gaps) {
		u64 us = job.hz / 1000000;
		say("blk-verify stalls over %u us: %u, median_us=%lu p99_us=%lu max_us=%lu", BV_GAP_US, job.gaps,
		    job.gap[job.gaps / 2] / us, job.gap[(job.gaps * 99) / 100] / us, job.gap[job.gaps - 1] / us);
	}
	if (job.stalled) {
		for (u32 i = 0; i < job.qd; i++)
			if (slots[i].state != S_IDLE)
				say("blk-verify waiting for slot %u (head %u, block %u, state %u, status %#x)", i, 3 * i,
				    slots[i].block, slots[i].state, statuses[i]);
		return failf("no completion for 10 s (avail idx %u, used idx %u)", job.avail->idx, job.used->idx);
	}
	if (job.errors || job.mismatches || job.doubled || job.bad_id)
		return failf("%lu errors, %lu mismatches, %lu completed twice, %lu bad ids", job.errors, job.mismatches,
			     job.doubled, job.bad_id);
	if (!job.writes || !job.final)
		return failf("nothing was written and checked");
	return 0;
}

const char *scenario_blk_verify(void)
{
	memset(&job, 0, sizeof(job));
	memset(slots, 0, sizeof(slots));
	return virtio_finish(&v, bv_run());
}
