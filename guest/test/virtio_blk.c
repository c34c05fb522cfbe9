/* ringvm test guest: the virtio-blk scenario. Negotiates the features below, reads the
 * capacity, writes a pattern (two blocks at ringvm.blk.sector, one at the last block), reads it
 * back, reads past the end (IOERR), flushes, asks for the id, write-zeroes and discards if
 * offered; on a read-only device checks that a write fails with IOERR instead. */
#include "virtio.h"

#define BLK_F_SIZE_MAX (1ull << 1)
#define BLK_F_SEG_MAX (1ull << 2)
#define BLK_F_GEOMETRY (1ull << 4)
#define BLK_F_RO (1ull << 5)
#define BLK_F_BLK_SIZE (1ull << 6)
#define BLK_F_FLUSH (1ull << 9)
#define BLK_F_TOPOLOGY (1ull << 10)
#define BLK_F_DISCARD (1ull << 13)
#define BLK_F_WRITE_ZEROES (1ull << 14)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define S_UNSET 0xff

#define MAX_UNIT 4096
#define DEFAULT_SECTOR 8

struct blk_hdr {
	u32 type, reserved;
	u64 sector;
};
struct blk_seg {
	u64 sector;
	u32 num, flags;
};

#define SLOTS 4
static struct blk_hdr hdrs[SLOTS];
static u8 statuses[SLOTS];
static struct blk_seg segs[SLOTS];
static u8 blk_ring[3 * 4096] __attribute__((aligned(4096)));
static u8 wbuf[3 * MAX_UNIT] __attribute__((aligned(4096))); /* two blocks at S, one at the last */
static u8 rbuf[3 * MAX_UNIT] __attribute__((aligned(4096)));
static char idbuf[20];

static struct virtio_dev v;
static u32 unit, nreq, seg_max, len_warnings;
static u64 capacity, nonce;

/* One request per slot: header, data buffers, status. Returns 0 or a failure. */
struct req {
	u32 type;
	u64 sector;
	struct vq_buf data[2];
	int ndata;
	u32 len; /* from the used ring */
};

static const char *submit(struct req *r, int n)
{
	int slot_of_head[VQ_MAX];
	for (int i = 0; i < n; i++) {
		hdrs[i] = (struct blk_hdr){r[i].type, 0, r[i].sector};
		statuses[i] = S_UNSET;
		struct vq_buf b[4];
		int nb = 0;
		b[nb++] = (struct vq_buf){&hdrs[i], sizeof(hdrs[i]), 0};
		for (int j = 0; j < r[i].ndata; j++)
			b[nb++] = r[i].data[j];
		b[nb++] = (struct vq_buf){&statuses[i], 1, 1};
		int head = vq_add(&v.q, b, nb);
		if (head < 0)
			return failf("queue full");
		slot_of_head[head] = i;
		nreq++;
	}
	vq_kick(&v.q);
	struct vq_done done[VQ_MAX];
	int nd;
	const char *why = vq_wait(&v, done, VQ_MAX, &nd);
	if (why)
		return why;
	for (int i = 0; i < nd; i++) {
		struct req *q = &r[slot_of_head[done[i].head]];
		q->len = done[i].len;
		u32 want = 1;
		for (int j = 0; j < q->ndata; j++)
			if (q->data[j].write)
				want += q->data[j].len;
		if (q->len != want && statuses[slot_of_head[done[i].head]] == S_OK && len_warnings++ < 3)
			say("warning: virtio-blk request type %u: used len %u, expected %u", q->type, q->len, want);
	}
	return 0;
}

static u64 pattern(u64 sector, u32 word) { return (sector << 32 | word) ^ nonce; }

static void fill(u8 *buf, u64 sector, u32 units)
{
	u64 *w = (u64 *)buf;
	for (u32 u = 0; u < units * unit / 512; u++)
		for (u32 i = 0; i < 64; i++)
			w[u * 64 + i] = pattern(sector + u, i);
}

/* Index of the first differing 512-byte sector, or -1. */
static int check(const u8 *buf, u64 sector, u32 units)
{
	const u64 *w = (const u64 *)buf;
	for (u32 u = 0; u < units * unit / 512; u++)
		for (u32 i = 0; i < 64; i++)
			if (w[u * 64 + i] != pattern(sector + u, i))
				return (int)u;
	return -1;
}

static const char *status_fail(const char *what, u8 s)
{
	return failf("%s: status %u (%s)", what, s,
		     s == S_IOERR ? "IOERR" : s == S_UNSUPP ? "UNSUPP" : s == S_UNSET ? "never written" : "bad");
}

/* Reads `units` blocks at sector into rbuf (one descriptor). */
static const char *read_blocks(u64 sector, u32 units)
{
	memset(rbuf, 0xa5, (size_t)units * unit);
	struct req r = {T_IN, sector, {{rbuf, units * unit, 1}}, 1, 0};
	const char *why = submit(&r, 1);
	if (!why && statuses[0] != S_OK)
		why = status_fail("read", statuses[0]);
	return why;
}

static const char *blk_run(u64 *out_spu)
{
	enum wait_mode mode;
	const char *why = virtio_mode("blk.mode", &mode);
	if (why)
		return why;
	memset(&v, 0, sizeof(v));
	v.name = "virtio-blk";
	v.mode = mode;
	v.vec_base = IRQ_BASE + 4; /* 0x44 config, 0x45 queue 0 */
	why = virtio_open(&v, VIRTIO_TYPE_BLK);
	if (!why && !v.device)
		why = failf("no device-specific configuration capability");
	if (!why)
		why = virtio_init(&v, BLK_F_SIZE_MAX | BLK_F_SEG_MAX | BLK_F_GEOMETRY | BLK_F_RO | BLK_F_BLK_SIZE |
					      BLK_F_FLUSH | BLK_F_TOPOLOGY | BLK_F_DISCARD | BLK_F_WRITE_ZEROES);
	if (!why)
		why = virtio_queue(&v, 0, blk_ring);
	if (!why)
		why = virtio_driver_ok(&v);
	if (why)
		return why;

	u64 f = v.drv_features;
	int ro = !!(f & BLK_F_RO);
	capacity = virtio_cfg(&v, 0, 8);
	u32 blk_size = f & BLK_F_BLK_SIZE ? (u32)virtio_cfg(&v, 20, 4) : 512;
	seg_max = f & BLK_F_SEG_MAX ? (u32)virtio_cfg(&v, 12, 4) : 1;
	u32 max_discard = f & BLK_F_DISCARD ? (u32)virtio_cfg(&v, 36, 4) : 0;
	u32 discard_align = f & BLK_F_DISCARD ? (u32)virtio_cfg(&v, 44, 4) : 0;
	u32 max_wz = f & BLK_F_WRITE_ZEROES ? (u32)virtio_cfg(&v, 48, 4) : 0;
	say("virtio-blk capacity=%lu sectors blk-size=%u seg-max=%u ro=%d flush=%d discard=%d write-zeroes=%d",
	    capacity, blk_size, seg_max, ro, !!(f & BLK_F_FLUSH), !!(f & BLK_F_DISCARD), !!(f & BLK_F_WRITE_ZEROES));
	const char *expect = opt("blk.expect");
	if (expect) {
		if (!str_eq_n(expect, "ro", strlen(expect)) && !str_eq_n(expect, "rw", strlen(expect)))
			return failf("ringvm.blk.expect=%s: want ro or rw", expect);
		if ((expect[1] == 'o') != ro)
			return failf("expected a %s device, VIRTIO_BLK_F_RO is %s", expect, ro ? "offered" : "not offered");
	}

	unit = blk_size >= 512 && blk_size <= MAX_UNIT && !(blk_size & (blk_size - 1)) ? blk_size : 512;
	u64 spu = unit / 512;
	*out_spu = spu;
	u64 s = DEFAULT_SECTOR;
	opt_u64("blk.sector", &s);
	s &= ~(spu - 1);
	if (capacity < spu || capacity / spu < 3)
		return failf("capacity %lu sectors is too small", capacity);
	u64 last = (capacity / spu - 1) * spu;
	if (s + 2 * spu > last)
		return failf("ringvm.blk.sector=%lu: blocks %lu..%lu would reach the last block %lu", s, s, s + 2 * spu - 1,
			     last);
	nonce = rdtsc() * 0x9e3779b97f4a7c15ull;

	/* GET_ID (not a feature bit; a device may answer UNSUPP) */
	memset(idbuf, 0, sizeof(idbuf));
	struct req id = {T_GET_ID, 0, {{idbuf, sizeof(idbuf), 1}}, 1, 0};
	if ((why = submit(&id, 1)))
		return why;
	if (statuses[0] == S_OK) {
		char shown[21];
		u32 i = 0;
		for (; i < sizeof(idbuf) && idbuf[i]; i++)
			shown[i] = idbuf[i] >= 0x20 && idbuf[i] < 0x7f ? idbuf[i] : '?';
		shown[i] = 0;
		say("virtio-blk id \"%s\"", shown);
		const char *want = opt("blk.id");
		if (want && !str_eq_n(shown, want, strlen(want)))
			return failf("id \"%s\", expected \"%s\"", shown, want);
	} else if (statuses[0] == S_UNSUPP && !opt("blk.id")) {
		say("virtio-blk id unsupported");
	} else {
		return status_fail("GET_ID", statuses[0]);
	}

	if (ro) {
		if ((why = read_blocks(s, 1)))
			return why;
		fill(wbuf, s, 1);
		struct req w = {T_OUT, s, {{wbuf, unit, 0}}, 1, 0};
		if ((why = submit(&w, 1)))
			return why;
		if (statuses[0] != S_IOERR)
			return failf("write to a read-only device: status %u, expected IOERR (1)", statuses[0]);
		say("virtio-blk read-only ok (write to sector %lu failed with IOERR)", s);
	} else {
		/* Two requests in one notification: two blocks at s (two descriptors if seg_max
		 * allows), one block at the last sector. */
		fill(wbuf, s, 2);
		fill(wbuf + 2 * unit, last, 1);
		struct req w[2] = {{T_OUT, s, {{wbuf, unit, 0}, {wbuf + unit, unit, 0}}, 2, 0},
				   {T_OUT, last, {{wbuf + 2 * unit, unit, 0}}, 1, 0}};
		if (seg_max < 2) {
			w[0].data[0].len = 2 * unit;
			w[0].ndata = 1;
		}
		if ((why = submit(w, 2)))
			return why;
		for (int i = 0; i < 2; i++)
			if (statuses[i] != S_OK)
				return status_fail(i ? "write of the last block" : "write", statuses[i]);
		memset(rbuf, 0xa5, 3 * (size_t)unit);
		struct req r[2] = {{T_IN, s, {{rbuf, 2 * unit, 1}}, 1, 0}, {T_IN, last, {{rbuf + 2 * unit, unit, 1}}, 1, 0}};
		if ((why = submit(r, 2)))
			return why;
		for (int i = 0; i < 2; i++)
			if (statuses[i] != S_OK)
				return status_fail(i ? "read of the last block" : "read", statuses[i]);
		int bad = check(rbuf, s, 2);
		if (bad >= 0)
			return failf("sector %lu reads back different data", s + (u64)bad);
		bad = check(rbuf + 2 * unit, last, 1);
		if (bad >= 0)
			return failf("sector %lu (last block) reads back different data", last + (u64)bad);
		say("virtio-blk wrote and read back sectors %lu-%lu and %lu-%lu (%u-byte blocks, %s)", s, s + 2 * spu - 1,
		    last, last + spu - 1, unit, seg_max >= 2 ? "2 data descriptors" : "1 data descriptor");
	}

	/* A read that starts at the end of the disk must fail. */
	struct req past = {T_IN, capacity, {{rbuf, unit, 1}}, 1, 0};
	if ((why = submit(&past, 1)))
		return why;
	if (statuses[0] != S_IOERR)
		return failf("read at sector %lu (the capacity): status %u, expected IOERR", capacity, statuses[0]);
	say("virtio-blk read past the end: IOERR ok");

	if (f & BLK_F_FLUSH) {
		struct req fl = {T_FLUSH, 0, {{0, 0, 0}}, 0, 0};
		if ((why = submit(&fl, 1)))
			return why;
		if (statuses[0] != S_OK)
			return status_fail("flush", statuses[0]);
		say("virtio-blk flush ok");
	}
	if (ro)
		return 0;

	if ((f & BLK_F_WRITE_ZEROES) && max_wz >= 2 * spu) {
		segs[0] = (struct blk_seg){s, (u32)(2 * spu), 0};
		struct req wz = {T_WRITE_ZEROES, 0, {{&segs[0], sizeof(segs[0]), 0}}, 1, 0};
		if ((why = submit(&wz, 1)))
			return why;
		if (statuses[0] != S_OK)
			return status_fail("write-zeroes", statuses[0]);
		if ((why = read_blocks(s, 2)))
			return why;
		for (u32 i = 0; i < 2 * unit; i++)
			if (rbuf[i])
				return failf("byte %u after write-zeroes at sector %lu is %#x", i, s, rbuf[i]);
		say("virtio-blk write-zeroes sectors %lu-%lu ok", s, s + 2 * spu - 1);
	} else if (f & BLK_F_WRITE_ZEROES) {
		say("virtio-blk write-zeroes skipped (max %u sectors)", max_wz);
	}
	if (f & BLK_F_DISCARD) {
		u64 a = discard_align > spu ? discard_align : spu;
		u64 ds = (s + a - 1) / a * a;
		if (max_discard >= a && ds + a <= last) {
			segs[0] = (struct blk_seg){ds, (u32)a, 0};
			struct req d = {T_DISCARD, 0, {{&segs[0], sizeof(segs[0]), 0}}, 1, 0};
			if ((why = submit(&d, 1)))
				return why;
			if (statuses[0] != S_OK)
				return status_fail("discard", statuses[0]);
			say("virtio-blk discard sectors %lu-%lu ok", ds, ds + a - 1);
		} else {
			say("virtio-blk discard skipped (max %u sectors, alignment %u)", max_discard, discard_align);
		}
	}
	return 0;
}

const char *scenario_virtio_blk(void)
{
	u32 irq0 = irq_count[5], cfg0 = irq_count[4];
	u64 t0 = rdtsc(), spu = 1;
	nreq = 0;
	len_warnings = 0;
	const char *why = blk_run(&spu);
	if (!why)
		say("virtio-blk stats capacity=%lu requests=%u kicks=%u interrupts=%u config-interrupts=%u mode=%s "
		    "time=%luus",
		    capacity, nreq, v.q.kicks, irq_count[5] - irq0, irq_count[4] - cfg0, wait_mode_name(v.mode),
		    (rdtsc() - t0) / (tsc_hz_or_guess() / 1000000));
	if (!why && v.mode != WAIT_POLL && irq_count[5] == irq0)
		why = failf("no MSI-X interrupt on vector %#x", IRQ_BASE + 5);
	return virtio_finish(&v, why);
}
