/* ringvm test guest: the virtio-rng scenario. Posts N 64-byte device-writable buffers over a few
 * notifications, waits for them (MSI-X + hlt by default), checks the lengths and that the bytes
 * look random (not all zero, not all equal), then resets the device. With ringvm.rng.bad=N it
 * first posts N malformed chains (one zero-length buffer each), a queue's worth at a time, and
 * checks that each comes back used with length 0. */
#include "virtio.h"

#define RNG_BUF 64
#define RNG_BATCH 3

static u8 rng_ring[3 * 4096] __attribute__((aligned(4096)));
static u8 rng_buf[VQ_MAX][RNG_BUF];

static const char *rng_run(struct virtio_dev *v)
{
	u64 nbufs = 8;
	if (opt_u64("rng.bufs", &nbufs) && (nbufs < 1 || nbufs > VQ_MAX))
		return failf("ringvm.rng.bufs=%lu: want 1..%u", nbufs, VQ_MAX);
	const char *why = virtio_open(v, VIRTIO_TYPE_RNG);
	if (!why)
		why = virtio_init(v, 0);
	if (!why)
		why = virtio_queue(v, 0, rng_ring);
	if (!why)
		why = virtio_driver_ok(v);
	if (why)
		return why;
	if (nbufs > v->q.size)
		return failf("ringvm.rng.bufs=%lu exceeds the queue size %u", nbufs, v->q.size);

	u64 nbad = 0;
	if (opt_u64("rng.bad", &nbad) && nbad > 1000000)
		return failf("ringvm.rng.bad=%lu: want at most 1000000", nbad);
	for (u64 k = 0; k < nbad;) {
		u32 batch = 0;
		for (; batch < v->q.size && k < nbad; batch++, k++) {
			struct vq_buf b = {rng_buf[0], 0, 1};
			if (vq_add(&v->q, &b, 1) < 0)
				return failf("queue full at bad chain %lu", k);
		}
		vq_kick(&v->q);
		for (u32 got = 0; got < batch;) {
			struct vq_done done[VQ_MAX];
			int n;
			why = vq_wait(v, done, VQ_MAX, &n);
			if (why)
				return why;
			for (int i = 0; i < n; i++)
				if (done[i].len)
					return failf("a malformed chain came back with used len %u", done[i].len);
			got += (u32)n;
		}
	}
	if (nbad)
		say("virtio-rng bad chains=%lu returned", nbad);

	memset(rng_buf, 0, sizeof(rng_buf));
	u32 irq0 = irq_count[(v->vec_base + 1) & 15], cfg0 = irq_count[v->vec_base & 15];
	u8 buf_of_head[VQ_MAX], seen[VQ_MAX];
	u32 lens[VQ_MAX];
	memset(seen, 0, sizeof(seen));
	u64 t0 = rdtsc(), total = 0;
	for (u32 k = 0; k < nbufs;) {
		u32 batch = 0;
		for (; batch < RNG_BATCH && k < nbufs; batch++, k++) {
			struct vq_buf b = {rng_buf[k], RNG_BUF, 1};
			int head = vq_add(&v->q, &b, 1);
			if (head < 0)
				return failf("queue full at buffer %u", k);
			buf_of_head[head] = (u8)k;
		}
		vq_kick(&v->q);
		struct vq_done done[VQ_MAX];
		int n;
		why = vq_wait(v, done, VQ_MAX, &n);
		if (why)
			return why;
		for (int i = 0; i < n; i++) {
			u32 k2 = buf_of_head[done[i].head];
			if (done[i].len < 1 || done[i].len > RNG_BUF)
				return failf("buffer %u came back with used len %u (want 1..%u)", k2, done[i].len, RNG_BUF);
			if (seen[k2]++)
				return failf("buffer %u came back twice", k2);
			lens[k2] = done[i].len;
			total += done[i].len;
		}
	}
	u64 us = (rdtsc() - t0) / (tsc_hz_or_guess() / 1000000);
	u32 nonzero = 0, equal = 1;
	for (u32 k = 0; k < nbufs; k++)
		for (u32 i = 0; i < lens[k]; i++) {
			nonzero += rng_buf[k][i] != 0;
			equal &= rng_buf[k][i] == rng_buf[0][0];
		}
	u32 irqs = irq_count[(v->vec_base + 1) & 15] - irq0, cfg = irq_count[v->vec_base & 15] - cfg0;
	say("virtio-rng sample %02x %02x %02x %02x %02x %02x %02x %02x", rng_buf[0][0], rng_buf[0][1], rng_buf[0][2],
	    rng_buf[0][3], rng_buf[0][4], rng_buf[0][5], rng_buf[0][6], rng_buf[0][7]);
	say("virtio-rng stats bytes=%lu buffers=%lu kicks=%u interrupts=%u config-interrupts=%u mode=%s time=%luus", total,
	    nbufs, v->q.kicks, irqs, cfg, wait_mode_name(v->mode), us);
	if (!nonzero)
		return failf("all %lu bytes are zero", total);
	if (equal && total > 1)
		return failf("all %lu bytes are %#x", total, rng_buf[0][0]);
	if (v->mode != WAIT_POLL && irqs == 0)
		return failf("no MSI-X interrupt on vector %#x", v->vec_base + 1);
	if (v->mode == WAIT_POLL && irqs)
		return failf("%u interrupts in poll mode", irqs);
	return 0;
}

const char *scenario_virtio_rng(void)
{
	static struct virtio_dev v;
	memset(&v, 0, sizeof(v));
	v.name = "virtio-rng";
	v.vec_base = IRQ_BASE; /* 0x40 config, 0x41 queue 0 */
	const char *why = virtio_mode("rng.mode", &v.mode);
	if (why)
		return why;
	why = rng_run(&v);
	return virtio_finish(&v, why);
}
