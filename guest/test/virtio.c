/* ringvm test guest: virtio-pci modern transport (virtio 1.2 section 4.1), split virtqueues,
 * MSI-X. One queue for rng and blk, two for net (rx, tx), or two per queue pair and a control
 * queue with ringvm.net.pairs. */
#include "virtio.h"

#define NO_VECTOR 0xffff

const char *wait_mode_name(enum wait_mode m) { return m == WAIT_POLL ? "poll" : m == WAIT_SPIN ? "spin" : "hlt"; }

const char *virtio_mode(const char *key, enum wait_mode *mode)
{
	const char *m = opt(key);
	*mode = WAIT_HLT;
	if (!m || str_eq_n(m, "hlt", strlen(m)))
		return 0;
	if (str_eq_n(m, "spin", strlen(m)))
		*mode = WAIT_SPIN;
	else if (str_eq_n(m, "poll", strlen(m)))
		*mode = WAIT_POLL;
	else
		return failf("ringvm.%s=%s: want hlt, spin or poll", key, m);
	return 0;
}

u8 virtio_status(struct virtio_dev *v) { return mmio_read8(v->common + CC_STATUS); }

static void set_status(struct virtio_dev *v, u8 s) { mmio_write8(v->common + CC_STATUS, s); }

const char *virtio_reset(struct virtio_dev *v)
{
	set_status(v, 0);
	for (int i = 0; i < 100000; i++)
		if (virtio_status(v) == 0)
			return 0;
	return failf("device status reads %#x after reset, not 0", virtio_status(v));
}

const char *virtio_finish(struct virtio_dev *v, const char *why)
{
	if (v->common) {
		const char *r = virtio_reset(v);
		if (!why)
			why = r;
	}
	return why;
}

static struct pci_func funcs[PCI_MAX_FUNCS];

const char *virtio_open(struct virtio_dev *v, u16 type)
{
	int n = pci_scan(funcs, PCI_MAX_FUNCS);
	v->pci = 0;
	for (int i = 0; i < n && !v->pci; i++) {
		struct pci_func *f = &funcs[i];
		if (f->vendor != VIRTIO_VENDOR)
			continue;
		/* Modern ids, or a transitional device (0x1000-0x103f) whose subsystem id is the type. */
		if (f->device == 0x1040 + type ||
		    (f->device >= 0x1000 && f->device < 0x1040 && pci_read(f, 0x2e, 2) == type))
			v->pci = f;
	}
	if (!v->pci)
		return failf("no virtio device of type %u (%04x:%04x) on bus 0 (%d functions, config via %s)", type,
			     VIRTIO_VENDOR, 0x1040 + type, n, pci_mechanism());
	struct pci_func *f = v->pci;
	say("%s at 00:%02x.%u %04x:%04x rev %u", v->name, f->dev, f->fn, f->vendor, f->device, f->rev);
	const char *why = pci_enable(f, funcs, n, v->name);
	if (why)
		return why;

	char caps[160];
	int len = 0;
	caps[0] = 0;
	int guard = 0;
	for (u8 c = pci_next_cap(f, 0); c && guard < 48; c = pci_next_cap(f, c), guard++) {
		u8 id = (u8)pci_read(f, c, 1);
		if (id == 0x11 && !v->msix_cap) {
			v->msix_cap = c;
			v->msix_size = (u16)((pci_read(f, c + 2u, 2) & 0x7ff) + 1);
			u32 t = pci_read(f, c + 4u, 4);
			const struct pci_bar *b = &f->bar[t & 7];
			if ((t & 7) > 5 || (b->kind != BAR_MEM32 && b->kind != BAR_MEM64))
				return failf("MSI-X table in bar%u, which is not a memory BAR", t & 7);
			v->msix_table = b->addr + (t & ~7u);
			len += fmt(caps + len, sizeof(caps) - (size_t)len, " msix %u@bar%u+%#x", v->msix_size, t & 7,
				   t & ~7u);
			continue;
		}
		if (id != 0x09)
			continue;
		u8 cfg_type = (u8)pci_read(f, c + 3u, 1), bar = (u8)pci_read(f, c + 4u, 1);
		u32 off = pci_read(f, c + 8u, 4), clen = pci_read(f, c + 12u, 4);
		if (cfg_type < 1 || cfg_type > 4)
			continue; /* PCI cfg access, shared memory, vendor data: not used */
		if (bar > 5 || (f->bar[bar].kind != BAR_MEM32 && f->bar[bar].kind != BAR_MEM64))
			continue; /* the spec says: ignore it */
		if ((u64)off + clen > f->bar[bar].size)
			return failf("virtio cap type %u: %#x+%#x lies outside bar%u (%#lx bytes)", cfg_type, off, clen,
				     bar, f->bar[bar].size);
		u64 addr = f->bar[bar].addr + off;
		static const char *const names[] = {"", "common", "notify", "isr", "device"};
		u64 *slot = cfg_type == 1 ? &v->common : cfg_type == 2 ? &v->notify_base : cfg_type == 3 ? &v->isr : &v->device;
		if (*slot)
			continue; /* the first of each type is the preferred one */
		if (cfg_type == 1 && clen < CC_MIN_LEN)
			return failf("common configuration is %u bytes, less than %u", clen, CC_MIN_LEN);
		*slot = addr;
		if (cfg_type == 2)
			v->notify_mult = pci_read(f, c + 16u, 4);
		if (cfg_type == 4)
			v->device_len = clen;
		len += fmt(caps + len, sizeof(caps) - (size_t)len, " %s@bar%u+%#x", names[cfg_type], bar, off);
		if (cfg_type == 2)
			len += fmt(caps + len, sizeof(caps) - (size_t)len, "*%u", v->notify_mult);
	}
	say("%s caps%s", v->name, caps);
	if (!v->common || !v->notify_base || !v->isr)
		return failf("missing virtio capability: common %s, notify %s, isr %s", v->common ? "yes" : "no",
			     v->notify_base ? "yes" : "no", v->isr ? "yes" : "no");
	return 0;
}

static void msix_program(struct virtio_dev *v, u32 nvec, u32 apic)
{
	struct pci_func *f = v->pci;
	u16 ctrl = (u16)pci_read(f, v->msix_cap + 2u, 2);
	pci_write(f, v->msix_cap + 2u, 2, ctrl | 0xc000); /* enable + function mask */
	for (u32 e = 0; e < nvec; e++) {
		u64 t = v->msix_table + 16 * e;
		mmio_write32(t + 0, 0xfee00000u | apic << 12);
		mmio_write32(t + 4, 0);
		mmio_write32(t + 8, v->vec_base + e);
		mmio_write32(t + 12, 0); /* unmask */
	}
	pci_write(f, v->msix_cap + 2u, 2, (ctrl | 0x8000) & ~0x4000);
	u16 cmd = (u16)pci_read(f, 0x04, 2);
	pci_write(f, 0x04, 2, cmd | 0x400); /* INTx off */
}

const char *virtio_init(struct virtio_dev *v, u64 want)
{
	const char *why = virtio_reset(v);
	if (why)
		return why;
	u8 s = VIRTIO_S_ACKNOWLEDGE;
	set_status(v, s);
	s |= VIRTIO_S_DRIVER;
	set_status(v, s);
	mmio_write32(v->common + CC_DFSELECT, 0);
	u64 lo = mmio_read32(v->common + CC_DF);
	mmio_write32(v->common + CC_DFSELECT, 1);
	u64 hi = mmio_read32(v->common + CC_DF);
	v->dev_features = hi << 32 | lo;
	if (!(v->dev_features & VIRTIO_F_VERSION_1))
		return failf("device features %#lx lack VIRTIO_F_VERSION_1", v->dev_features);
	v->drv_features = VIRTIO_F_VERSION_1 | (v->dev_features & (want | VIRTIO_F_ACCESS_PLATFORM));
	mmio_write32(v->common + CC_GFSELECT, 0);
	mmio_write32(v->common + CC_GF, (u32)v->drv_features);
	mmio_write32(v->common + CC_GFSELECT, 1);
	mmio_write32(v->common + CC_GF, (u32)(v->drv_features >> 32));
	s |= VIRTIO_S_FEATURES_OK;
	set_status(v, s);
	u8 got = virtio_status(v);
	say("%s features device %#lx driver %#lx, %u queues, mode %s", v->name, v->dev_features, v->drv_features,
	    mmio_read16(v->common + CC_NUMQ), wait_mode_name(v->mode));
	if (!(got & VIRTIO_S_FEATURES_OK))
		return failf("device cleared FEATURES_OK (status %#x)", got);

	if (v->mode == WAIT_POLL) {
		if (v->msix_cap) {
			u16 ctrl = (u16)pci_read(v->pci, v->msix_cap + 2u, 2);
			pci_write(v->pci, v->msix_cap + 2u, 2, ctrl & ~0x8000);
		}
		return 0;
	}
	if (!v->msix_cap)
		return failf("no MSI-X capability (use ringvm.<dev>.mode=poll)");
	u32 nvec = 1u + (v->nr_queues ? v->nr_queues : 1u);
	if (v->msix_size < nvec)
		return failf("MSI-X table has %u entries, need %u (config + %u queues)", v->msix_size, nvec, nvec - 1);
	u32 apic = irq_apic_id();
	msix_program(v, nvec, apic);
	mmio_write16(v->common + CC_MSIX, 0);
	u16 rb = mmio_read16(v->common + CC_MSIX);
	if (rb != 0)
		return failf("config_msix_vector reads %#x after writing 0", rb);
	return 0;
}

/* The selected queue's descriptor table, avail (driver) and used (device) ring addresses. */
static void set_queue_rings(struct virtio_dev *v, u64 d, u64 a, u64 u)
{
	mmio_write32(v->common + CC_QDESC, (u32)d);
	mmio_write32(v->common + CC_QDESC + 4, (u32)(d >> 32));
	mmio_write32(v->common + CC_QDRIVER, (u32)a);
	mmio_write32(v->common + CC_QDRIVER + 4, (u32)(a >> 32));
	mmio_write32(v->common + CC_QDEVICE, (u32)u);
	mmio_write32(v->common + CC_QDEVICE + 4, (u32)(u >> 32));
}

const char *virtio_queue(struct virtio_dev *v, u16 qi, void *mem)
{
	if (qi > 1)
		return failf("queue %u: the driver keeps at most 2 queues", qi);
	return virtio_queue_at(v, qi ? &v->q1 : &v->q, qi, v->q_entry[qi] ? v->q_entry[qi] : (u16)(1 + qi), mem);
}

const char *virtio_queue_at(struct virtio_dev *v, struct virtq *q, u16 qi, u16 entry, void *mem)
{
	u16 nq = mmio_read16(v->common + CC_NUMQ);
	if (qi >= nq)
		return failf("queue %u requested, the device has %u", qi, nq);
	mmio_write16(v->common + CC_QSELECT, qi);
	u16 max = mmio_read16(v->common + CC_QSIZE);
	if (!max)
		return failf("queue %u has size 0", qi);
	u16 size = VQ_MAX;
	while (size > max)
		size >>= 1;
	mmio_write16(v->common + CC_QSIZE, size);
	memset(mem, 0, 3 * 4096);
	memset(q, 0, sizeof(*q));
	q->index = qi;
	q->size = size;
	q->irq_slot = (u8)((v->vec_base + entry - IRQ_BASE) & 15);
	q->desc = mem;
	q->avail = (void *)((u8 *)mem + 4096);
	q->used = (void *)((u8 *)mem + 8192);
	set_queue_rings(v, (u64)q->desc, (u64)q->avail, (u64)q->used);
	if (v->mode != WAIT_POLL) {
		u16 e = entry;
		mmio_write16(v->common + CC_QMSIX, e);
		u16 rb = mmio_read16(v->common + CC_QMSIX);
		if (rb != e)
			return failf("queue %u: queue_msix_vector reads %#x after writing %u", qi, rb, e);
	}
	u16 noff = mmio_read16(v->common + CC_QNOFF);
	q->notify = v->notify_base + (u64)noff * v->notify_mult;
	mmio_write16(v->common + CC_QENABLE, 1);
	u16 en = mmio_read16(v->common + CC_QENABLE);
	say("%s queue %u size %u (max %u) notify %#lx%s", v->name, qi, size, max, q->notify,
	    en == 1 ? "" : " ENABLE DID NOT STICK");
	if (en != 1)
		return failf("queue %u: queue_enable reads %u after writing 1", qi, en);
	return 0;
}

const char *virtio_driver_ok(struct virtio_dev *v)
{
	set_status(v, virtio_status(v) | VIRTIO_S_DRIVER_OK);
	u8 s = virtio_status(v);
	if (s & VIRTIO_S_NEEDS_RESET)
		return failf("DEVICE_NEEDS_RESET after DRIVER_OK (status %#x)", s);
	if (!(s & VIRTIO_S_DRIVER_OK))
		return failf("status %#x after setting DRIVER_OK", s);
	return 0;
}

u64 virtio_cfg(struct virtio_dev *v, u32 off, int size)
{
	u64 x;
	u8 gen;
	int tries = 0;
	do {
		gen = mmio_read8(v->common + CC_CFGGEN);
		u64 a = v->device + off;
		if (size == 1)
			x = mmio_read8(a);
		else if (size == 2)
			x = mmio_read16(a);
		else if (size == 4)
			x = mmio_read32(a);
		else
			x = mmio_read32(a) | (u64)mmio_read32(a + 4) << 32;
	} while (gen != mmio_read8(v->common + CC_CFGGEN) && ++tries < 100);
	return x;
}

int vq_add(struct virtq *q, const struct vq_buf *b, int n)
{
	if (n < 1 || q->in_flight + n > q->size)
		return -1;
	u16 head = q->next_desc;
	for (int i = 0; i < n; i++) {
		u16 d = q->next_desc;
		q->next_desc = (u16)((d + 1) % q->size);
		q->desc[d].addr = (u64)b[i].addr;
		q->desc[d].len = b[i].len;
		q->desc[d].flags = (u16)((b[i].write ? VQ_F_WRITE : 0) | (i + 1 < n ? VQ_F_NEXT : 0));
		q->desc[d].next = q->next_desc;
	}
	q->in_flight = (u16)(q->in_flight + n);
	q->chain_len[head] = (u8)n;
	q->avail->ring[q->avail_idx % q->size] = head;
	q->avail_idx++;
	return head;
}

void vq_kick(struct virtq *q)
{
	mb();
	q->avail->idx = q->avail_idx;
	mb();
	q->irq_at_kick = irq_count[q->irq_slot];
	mmio_write16(q->notify, q->index);
	q->kicks++;
}

const char *vq_wait(struct virtio_dev *v, struct vq_done *done, int max, int *ndone)
{
	return vq_wait_q(v, &v->q, done, max, ndone);
}

int vq_pop(struct virtq *q, struct vq_done *d)
{
	if (q->used->idx == q->used_seen)
		return 0;
	mb();
	volatile struct vq_used_elem *e = &q->used->ring[q->used_seen % q->size];
	u32 id = e->id, len = e->len;
	q->used_seen++;
	if (id >= q->size || !q->chain_len[id])
		return -1;
	q->in_flight = (u16)(q->in_flight - q->chain_len[id]);
	q->chain_len[id] = 0;
	d->head = (u16)id;
	d->len = len;
	return 1;
}

const char *vq_wait_q(struct virtio_dev *v, struct virtq *q, struct vq_done *done, int max, int *ndone)
{
	*ndone = 0;
	volatile u32 *irq = v->mode == WAIT_POLL ? 0 : &irq_count[q->irq_slot];
	if (!wait_u16(&q->used->idx, q->avail_idx, v->mode, VQ_TIMEOUT_MS, irq, q->irq_at_kick + 1)) {
		u8 s = virtio_status(v);
		if (q->used->idx == q->avail_idx)
			return failf("queue %u: requests done, but no interrupt on vector %#x within %u ms (mode %s)",
				     q->index, IRQ_BASE + q->irq_slot, VQ_TIMEOUT_MS, wait_mode_name(v->mode));
		return failf("queue %u: used idx %u, want %u after %u ms (mode %s, status %#x%s)", q->index, q->used->idx,
			     q->avail_idx, VQ_TIMEOUT_MS, wait_mode_name(v->mode), s,
			     s & VIRTIO_S_NEEDS_RESET ? " NEEDS_RESET" : "");
	}
	mb();
	while (q->used_seen != q->avail_idx) {
		volatile struct vq_used_elem *e = &q->used->ring[q->used_seen % q->size];
		u32 id = e->id, len = e->len;
		q->used_seen++;
		if (id >= q->size || !q->chain_len[id])
			return failf("queue %u: used ring returned id %u, which is not a chain in flight", q->index, id);
		q->in_flight = (u16)(q->in_flight - q->chain_len[id]);
		q->chain_len[id] = 0;
		if (*ndone < max) {
			done[*ndone].head = (u16)id;
			done[*ndone].len = len;
			(*ndone)++;
		}
	}
	u8 s = virtio_status(v);
	if (s & VIRTIO_S_NEEDS_RESET)
		return failf("DEVICE_NEEDS_RESET set (status %#x)", s);
	return 0;
}

/* Queue 0 for a polling driver (blk-bench, blk-verify): at most `want` entries (fewer if the
 * device's maximum is smaller), the descriptor table, avail and used rings at mem, mem+0x1000
 * and mem+0x2000, the driver asking for no interrupts. Returns the size, the device's maximum
 * and the notify address. */
const char *virtio_poll_queue(struct virtio_dev *v, u64 mem, u32 want, u32 *size, u32 *max, u64 *notify)
{
	if (mmio_read16(v->common + CC_NUMQ) < 1)
		return failf("the device has no queue");
	mmio_write16(v->common + CC_QSELECT, 0);
	*max = mmio_read16(v->common + CC_QSIZE);
	if (!*max)
		return failf("queue 0 has size 0");
	u32 n = want;
	while (n > *max)
		n >>= 1;
	mmio_write16(v->common + CC_QSIZE, (u16)n);
	*size = n;
	volatile u16 *avail = phys(mem + 0x1000), *used = phys(mem + 0x2000);
	avail[0] = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: the driver polls */
	avail[1] = 0;
	used[0] = 0;
	used[1] = 0;
	set_queue_rings(v, mem, mem + 0x1000, mem + 0x2000);
	*notify = v->notify_base + (u64)mmio_read16(v->common + CC_QNOFF) * v->notify_mult;
	mmio_write16(v->common + CC_QENABLE, 1);
	if (mmio_read16(v->common + CC_QENABLE) != 1)
		return failf("queue 0: queue_enable does not read 1");
	return 0;
}

const char *virtio_poll_open(struct virtio_dev *v, const char *name, u16 type, u64 mem, u64 end)
{
	if (!e820_ram_covers(mem, end))
		return failf("RAM %#lx-%#lx (rings and buffers) is not in the memory map", mem, end);
	memset(v, 0, sizeof(*v));
	v->name = name;
	v->mode = WAIT_POLL;
	const char *why = virtio_open(v, type);
	if (!why && !v->device)
		why = failf("no device-specific configuration capability");
	if (why)
		return why;
	if (v->msix_cap) { /* polling: no interrupts */
		u16 ctrl = (u16)pci_read(v->pci, v->msix_cap + 2u, 2);
		pci_write(v->pci, v->msix_cap + 2u, 2, ctrl & ~0x8000);
	}
	return 0;
}

const char *virtio_poll_begin(struct virtio_dev *v, u64 timeout, u64 *features)
{
	set_status(v, 0);
	u64 t0 = rdtsc();
	while (virtio_status(v) != 0)
		if (rdtsc() - t0 > timeout)
			return failf("device status reads %#x a second after reset", virtio_status(v));
	set_status(v, VIRTIO_S_ACKNOWLEDGE);
	set_status(v, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);
	mmio_write32(v->common + CC_DFSELECT, 0);
	u64 lo = mmio_read32(v->common + CC_DF);
	mmio_write32(v->common + CC_DFSELECT, 1);
	*features = (u64)mmio_read32(v->common + CC_DF) << 32 | lo;
	return 0;
}

const char *virtio_poll_features(struct virtio_dev *v, u64 want, u16 nq, const char *what)
{
	mmio_write32(v->common + CC_GFSELECT, 0);
	mmio_write32(v->common + CC_GF, (u32)want);
	mmio_write32(v->common + CC_GFSELECT, 1);
	mmio_write32(v->common + CC_GF, (u32)(want >> 32));
	set_status(v, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK);
	if (!(virtio_status(v) & VIRTIO_S_FEATURES_OK))
		return failf("device cleared FEATURES_OK");
	u16 have = mmio_read16(v->common + CC_NUMQ);
	if (have < nq)
		return failf("the device has %u queues, want %u (%s)", have, nq, what);
	return 0;
}

const char *virtio_poll_driver_ok(struct virtio_dev *v)
{
	set_status(v, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK | VIRTIO_S_DRIVER_OK);
	u8 s = virtio_status(v);
	if (!(s & VIRTIO_S_DRIVER_OK) || (s & VIRTIO_S_NEEDS_RESET))
		return failf("status %#x after DRIVER_OK", s);
	return 0;
}

void vqp_setup(struct virtio_dev *v, struct vq_poll *q, u16 qi, u64 mem, u16 size_max)
{
	mmio_write16(v->common + CC_QSELECT, qi);
	u16 max = mmio_read16(v->common + CC_QSIZE);
	u16 size = size_max;
	while (size > max)
		size >>= 1;
	mmio_write16(v->common + CC_QSIZE, size);
	memset(phys(mem), 0, 0x3000);
	q->index = qi;
	q->size = size;
	q->avail_idx = q->used_seen = 0;
	q->pending = 0;
	q->desc = phys(mem);
	q->avail = phys(mem + 0x1000);
	q->used = phys(mem + 0x2000);
	q->avail[0] = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
	set_queue_rings(v, mem, mem + 0x1000, mem + 0x2000);
	q->notify = v->notify_base + (u64)mmio_read16(v->common + CC_QNOFF) * v->notify_mult;
	mmio_write16(v->common + CC_QENABLE, 1);
}

void vqp_post(struct vq_poll *q, u16 id)
{
	q->avail[2 + q->avail_idx % q->size] = id;
	q->avail_idx++;
	q->pending = 1;
}

void vqp_kick(struct vq_poll *q)
{
	if (!q->pending)
		return;
	__asm__ volatile("" ::: "memory");
	q->avail[1] = q->avail_idx;
	mb();
	mmio_write16(q->notify, q->index);
	q->pending = 0;
}

int vqp_pop(struct vq_poll *q, u32 *id, u32 *len)
{
	if (q->used[1] == q->used_seen)
		return 0;
	__asm__ volatile("" ::: "memory"); /* x86 does not reorder loads with loads */
	volatile u32 *e = (volatile u32 *)(q->used + 2) + 2 * (q->used_seen % q->size);
	*id = e[0];
	*len = e[1];
	q->used_seen++;
	return 1;
}

const char *fail_first(const char **slot, char *buf, size_t n, const char *why)
{
	if (!*slot) {
		size_t k = strlen(why);
		if (k >= n)
			k = n - 1;
		memcpy(buf, why, k);
		buf[k] = 0;
		*slot = buf;
	}
	return *slot;
}
