/* ringvm test guest: virtio 1.x over PCI (modern transport, virtio 1.2 section 4.1), split
 * virtqueues, MSI-X. Shared by virtio_rng.c and virtio_blk.c; the polled queues and set-up at the
 * end by the CPL3 drivers (virtio_console.c, virtio_vsock.c). */
#ifndef RINGVM_VIRTIO_H
#define RINGVM_VIRTIO_H

#include "test.h"

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_TYPE_NET 1
#define VIRTIO_TYPE_BLK 2
#define VIRTIO_TYPE_RNG 4

#define VIRTIO_S_ACKNOWLEDGE 0x01
#define VIRTIO_S_DRIVER 0x02
#define VIRTIO_S_DRIVER_OK 0x04
#define VIRTIO_S_FEATURES_OK 0x08
#define VIRTIO_S_NEEDS_RESET 0x40
#define VIRTIO_S_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ull << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1ull << 33)

/* common configuration structure (offsets) */
#define CC_DFSELECT 0
#define CC_DF 4
#define CC_GFSELECT 8
#define CC_GF 12
#define CC_MSIX 16
#define CC_NUMQ 18
#define CC_STATUS 20
#define CC_CFGGEN 21
#define CC_QSELECT 22
#define CC_QSIZE 24
#define CC_QMSIX 26
#define CC_QENABLE 28
#define CC_QNOFF 30
#define CC_QDESC 32
#define CC_QDRIVER 40
#define CC_QDEVICE 48
#define CC_MIN_LEN 56

#define VQ_MAX 16 /* descriptors per queue we use (at most) */
#define VQ_F_NEXT 1
#define VQ_F_WRITE 2
#define VQ_TIMEOUT_MS 5000

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};
struct vq_avail {
	u16 flags, idx;
	u16 ring[VQ_MAX];
};
struct vq_used_elem {
	u32 id, len;
};
struct vq_used {
	u16 flags, idx;
	struct vq_used_elem ring[VQ_MAX];
};

/* One buffer of a chain: device-writable if write. */
struct vq_buf {
	const void *addr;
	u32 len;
	int write;
};
struct vq_done {
	u16 head;
	u32 len;
};

struct virtq {
	u16 index, size;
	u16 avail_idx; /* next free avail slot (free-running) */
	u16 used_seen; /* used entries consumed (free-running) */
	u16 next_desc; /* descriptors are handed out round-robin */
	u16 in_flight; /* descriptors */
	u8 chain_len[VQ_MAX]; /* per head, 0 = not in flight */
	volatile struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
	u64 notify;
	u32 kicks;
	u32 irq_at_kick; /* queue interrupts counted when last kicked */
	u8 irq_slot;	  /* irq_count[] index of the queue's vector */
};

struct virtio_dev {
	const char *name;
	struct pci_func *pci;
	u64 common, isr, device, notify_base;
	u32 notify_mult, device_len;
	u8 msix_cap;
	u16 msix_size;
	u64 msix_table;
	enum wait_mode mode;
	u8 vec_base; /* MSI-X entry e -> vector vec_base + e; entry 0 = config, 1 + q = queue q (or q_entry) */
	u64 dev_features, drv_features;
	u8 nr_queues; /* queues that get an MSI-X entry (0 counts as 1); at most 2 */
	u8 q_entry[2]; /* MSI-X entry of queue i; 0 = the default 1 + i */
	struct virtq q;  /* queue 0 */
	struct virtq q1; /* queue 1 (virtio-net tx) */
};

/* "hlt" (default), "spin" or "poll" from ringvm.<key>. */
const char *virtio_mode(const char *key, enum wait_mode *mode);
const char *wait_mode_name(enum wait_mode m);
/* Finds the first function of this virtio type on bus 0, enables its BARs and parses its
 * capabilities. */
const char *virtio_open(struct virtio_dev *v, u16 type);
/* Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 | (device & want)), FEATURES_OK,
 * and MSI-X (unless mode is poll): entry 0 = config vector. */
const char *virtio_init(struct virtio_dev *v, u64 want);
/* Queue qi (0 or 1: v->q or v->q1) with its rings in mem (3 zeroed-by-us pages, page aligned). */
const char *virtio_queue(struct virtio_dev *v, u16 qi, void *mem);
/* Queue qi of the device in *q, its interrupts on MSI-X entry `entry` (several queues may share
 * one), rings in mem as for virtio_queue. */
const char *virtio_queue_at(struct virtio_dev *v, struct virtq *q, u16 qi, u16 entry, void *mem);
const char *virtio_driver_ok(struct virtio_dev *v);
const char *virtio_poll_queue(struct virtio_dev *v, u64 mem, u32 want, u32 *size, u32 *max, u64 *notify);
/* Writes 0 to device_status and waits until it reads 0. */
const char *virtio_reset(struct virtio_dev *v);
/* A scenario's end: resets the device if it was found (v->common set); returns why, or the
 * reset's failure when why is 0. */
const char *virtio_finish(struct virtio_dev *v, const char *why);
u8 virtio_status(struct virtio_dev *v);
/* Device-specific configuration, read consistently with config_generation. */
u64 virtio_cfg(struct virtio_dev *v, u32 off, int size);

/* Adds a chain (not yet visible to the device); returns its head or -1 if the queue is full. */
int vq_add(struct virtq *q, const struct vq_buf *b, int n);
/* Publishes the added chains and notifies the device. */
void vq_kick(struct virtq *q);
/* Waits (v->mode) until every published chain is used and, unless polling, until the queue's
 * MSI-X vector fired at least once since the kick; fills done[] (up to max). */
const char *vq_wait(struct virtio_dev *v, struct vq_done *done, int max, int *ndone);
/* The same for another queue of v (e.g. &v->q1). */
const char *vq_wait_q(struct virtio_dev *v, struct virtq *q, struct vq_done *done, int max, int *ndone);
/* Takes one used entry, if the device published one: 1 (filled *d), 0 (none), -1 (the id is not a
 * chain in flight). For queues whose chains complete one by one (virtio-net rx). */
int vq_pop(struct virtq *q, struct vq_done *d);

/* A queue a CPL3 driver polls (avail flags NO_INTERRUPT): the driver fills desc[id] itself and
 * posts chains by descriptor id. */
struct vq_poll {
	u16 index, size, avail_idx, used_seen;
	volatile struct vq_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[] */
	volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[] */
	u64 notify;
	int pending; /* posted, not yet kicked */
};

/* Polling driver with its rings and buffers in RAM [mem, end) (checked against the memory map):
 * finds the device (virtio_open, mode poll), requires a device-specific configuration and turns
 * MSI-X off. CPL0. */
const char *virtio_poll_open(struct virtio_dev *v, const char *name, u16 type, u64 mem, u64 end);
/* Reset (waiting at most timeout cycles for status 0), ACKNOWLEDGE, DRIVER; *features = the
 * device's features. */
const char *virtio_poll_begin(struct virtio_dev *v, u64 timeout, u64 *features);
/* Writes the driver features, sets FEATURES_OK and checks it stuck; fails unless the device has
 * at least nq queues (what names them). */
const char *virtio_poll_features(struct virtio_dev *v, u64 want, u16 nq, const char *what);
/* Sets DRIVER_OK (after FEATURES_OK) and checks it. */
const char *virtio_poll_driver_ok(struct virtio_dev *v);
/* Queue qi with its rings in the 3 pages at mem (zeroed here), at most size_max entries. */
void vqp_setup(struct virtio_dev *v, struct vq_poll *q, u16 qi, u64 mem, u16 size_max);
/* Makes descriptor id available (seen by the device at the next vqp_kick). */
void vqp_post(struct vq_poll *q, u16 id);
/* Publishes the posted ids and notifies the device, if any were posted. */
void vqp_kick(struct vq_poll *q);
/* One used entry: 1 (filled id, len), 0 (none). */
int vqp_pop(struct vq_poll *q, u32 *id, u32 *len);

/* Keeps the first failure in *slot, copied (failf's buffer is reused by the next failf); returns
 * it. One slot per scenario (buf of n bytes). */
const char *fail_first(const char **slot, char *buf, size_t n, const char *why);

#endif
