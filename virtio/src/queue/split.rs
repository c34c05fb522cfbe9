//! The device side of a split virtqueue (virtio 1.2 §2.7): popping available chains,
//! pushing used entries, and notification suppression both ways.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use memory::{GuestAddress, GuestMemory, VolatileSlice};

use super::chain::DescriptorChain;
use super::desc::{
    avail_ring_len, desc_table_len, used_ring_len, MAX_QUEUE_SIZE, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY,
};
use super::inflight::InflightRing;
use crate::{Error, Result};

/// A split virtqueue's device-side state. Every method that touches the rings takes the
/// guest's memory: the queue holds only addresses and indices.
///
/// Configure it as the transport reports the driver's writes (`set_size`, the three
/// addresses, `set_features`), then [`activate`](Queue::activate) it, which validates the
/// layout against guest memory.
#[derive(Clone, Debug)]
pub struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// `next_used` when the driver was last considered for a notification.
    signalled_used: Wrapping<u16>,
    event_idx: bool,
    indirect: bool,
    /// Inflight I/O tracking (vhost-user `INFLIGHT_SHMFD`), when the frontend gave a region.
    /// Boxed so an untracked queue stays small and its hot paths test one pointer.
    inflight: Option<Box<InflightRing>>,
}

fn ring(
    mem: &GuestMemory,
    name: &'static str,
    addr: GuestAddress,
    align: u64,
    len: u64,
) -> Result<()> {
    if !addr.is_aligned(align) {
        return Err(Error::MisalignedRing {
            ring: name,
            addr,
            align,
        });
    }
    // One region: the hot path accesses each ring through one host view.
    if mem.get_slice(addr, len as usize).is_err() {
        return Err(Error::RingOutOfBounds {
            ring: name,
            addr,
            len,
        });
    }
    Ok(())
}

/// An access inside a validated ring that failed: only if the queue's layout was changed
/// without `activate`.
fn ring_error(addr: GuestAddress) -> Error {
    Error::RingAccess(memory::Error::OutOfBounds { addr, len: 2 })
}

impl Queue {
    /// A queue whose size may be set up to `max_size` (a power of two, at most 32768).
    pub fn new(max_size: u16) -> Result<Queue> {
        if max_size == 0 || max_size > MAX_QUEUE_SIZE || !max_size.is_power_of_two() {
            return Err(Error::InvalidMaxSize(max_size));
        }
        Ok(Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            signalled_used: Wrapping(0),
            event_idx: false,
            indirect: false,
            inflight: None,
        })
    }

    /// Back to the state after `new` (device reset).
    pub fn reset(&mut self) {
        *self = Queue {
            max_size: self.max_size,
            size: self.max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            signalled_used: Wrapping(0),
            event_idx: false,
            indirect: false,
            inflight: None,
        };
    }

    /// Tracks the chains in flight in `region` (vhost-user inflight I/O tracking). Call it on
    /// an activated queue before its first pop: it reads the region, lines up the chains a
    /// dead backend had in flight to be popped first, and moves the next avail index past
    /// them (whatever `SET_VRING_BASE` said). Fails on a region that does not check out.
    /// Returns whether the region was in use already (see [`InflightRing::was_in_use`]).
    pub fn track_inflight(&mut self, mem: &GuestMemory, mut region: InflightRing) -> Result<bool> {
        self.check_ready()?;
        let used = self.used_idx(mem)?;
        let avail = self.avail_idx(mem)?;
        let next = region.recover(used, avail).map_err(Error::Inflight)?;
        self.next_avail = Wrapping(next);
        self.next_used = Wrapping(used);
        self.signalled_used = Wrapping(used);
        let in_use = region.was_in_use();
        self.inflight = Some(Box::new(region));
        Ok(in_use)
    }

    /// The largest size the driver may set.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The size the driver set (`max_size` until it sets one).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Records the driver's queue size; checked by `activate`.
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Records the descriptor table address; checked by `activate`.
    pub fn set_desc_table(&mut self, addr: GuestAddress) {
        self.desc_table = addr;
    }

    /// Guest address of the available (driver) ring.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Records the available ring address; checked by `activate`.
    pub fn set_avail_ring(&mut self, addr: GuestAddress) {
        self.avail_ring = addr;
    }

    /// Guest address of the used (device) ring.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// Records the used ring address; checked by `activate`.
    pub fn set_used_ring(&mut self, addr: GuestAddress) {
        self.used_ring = addr;
    }

    /// Takes the negotiated feature bits: VIRTIO_F_INDIRECT_DESC and VIRTIO_F_EVENT_IDX.
    pub fn set_features(&mut self, features: u64) {
        self.indirect = features & (1 << VIRTIO_F_INDIRECT_DESC) != 0;
        self.event_idx = features & (1 << VIRTIO_F_EVENT_IDX) != 0;
    }

    /// Whether VIRTIO_F_EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Whether VIRTIO_F_INDIRECT_DESC is in use.
    pub fn indirect(&self) -> bool {
        self.indirect
    }

    /// Whether the queue was activated (and not reset since).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Index of the next avail ring entry the device will pop (vhost-user
    /// `GET_VRING_BASE`).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Sets where popping resumes (vhost-user `SET_VRING_BASE`).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = Wrapping(idx);
    }

    /// Index of the next used ring entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Sets where used entries resume (a device taking over a running queue sets it from
    /// [`used_idx`](Queue::used_idx)).
    pub fn set_next_used(&mut self, idx: u16) {
        self.next_used = Wrapping(idx);
        self.signalled_used = Wrapping(idx);
    }

    /// Checks the size and ring layout against `mem` and makes the queue ready: the size is
    /// a power of two no larger than the maximum, the descriptor table is 16-aligned, the
    /// avail ring 2-aligned, the used ring 4-aligned, and all three lie in guest RAM.
    pub fn activate(&mut self, mem: &GuestMemory) -> Result<()> {
        self.validate(mem)?;
        self.ready = true;
        Ok(())
    }

    /// The checks of [`activate`](Queue::activate), without changing the queue.
    pub fn validate(&self, mem: &GuestMemory) -> Result<()> {
        let size = self.size;
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(Error::InvalidSize {
                size,
                max: self.max_size,
            });
        }
        ring(
            mem,
            "descriptor table",
            self.desc_table,
            16,
            desc_table_len(size),
        )?;
        ring(
            mem,
            "available ring",
            self.avail_ring,
            2,
            avail_ring_len(size),
        )?;
        ring(mem, "used ring", self.used_ring, 4, used_ring_len(size))
    }

    #[inline]
    fn check_ready(&self) -> Result<()> {
        if self.ready {
            Ok(())
        } else {
            Err(Error::NotReady)
        }
    }

    fn load(mem: &GuestMemory, addr: GuestAddress, order: Ordering) -> Result<u16> {
        mem.load_u16(addr, order)
            .map(u16::from_le)
            .map_err(Error::RingAccess)
    }

    fn store(mem: &GuestMemory, addr: GuestAddress, val: u16, order: Ordering) -> Result<()> {
        mem.store_u16(addr, val.to_le(), order)
            .map_err(Error::RingAccess)
    }

    /// The driver's `avail.idx`, read with `Acquire` so the ring entries and descriptors it
    /// publishes are read after it.
    pub fn avail_idx(&self, mem: &GuestMemory) -> Result<u16> {
        Self::load(mem, self.avail_ring.wrapping_add(2), Ordering::Acquire)
    }

    /// The device's `used.idx` as it is in guest memory.
    pub fn used_idx(&self, mem: &GuestMemory) -> Result<u16> {
        Self::load(mem, self.used_ring.wrapping_add(2), Ordering::Acquire)
    }

    /// How many chains the driver has made available and the device not yet popped.
    pub fn pending(&self, mem: &GuestMemory) -> Result<u16> {
        self.check_ready()?;
        let avail = self.avail_idx(mem)?;
        let pending = (Wrapping(avail) - self.next_avail).0;
        if pending > self.size {
            return Err(Error::InvalidAvailIdx {
                avail,
                next: self.next_avail.0,
                size: self.size,
            });
        }
        Ok(pending)
    }

    /// The host view of a ring (validated by `activate` to lie in one region).
    #[inline]
    fn ring_slice<'m>(
        mem: &'m GuestMemory,
        addr: GuestAddress,
        len: u64,
    ) -> Result<VolatileSlice<'m>> {
        mem.get_slice(addr, len as usize).map_err(Error::RingAccess)
    }

    /// Pops the next available chain, validated in full, or `None` if there is none.
    ///
    /// An invalid chain is consumed (the avail index moves past it) and reported as
    /// [`Error::InvalidChain`] with its head, so the device can return it used or fail.
    /// An avail index more than the queue size ahead is [`Error::InvalidAvailIdx`] and
    /// consumes nothing.
    #[inline]
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        self.check_ready()?;
        // One way to the chain, wherever the head came from. With a second (a tracked pop
        // that returned a whole chain), the chain was copied where the two joined, right
        // after it was built: loads of fields just stored, which stall (30% of the time of a
        // one-buffer pop in the virtqueue bench).
        let head = if self.inflight.is_some() {
            self.take_tracked(mem)?
        } else {
            self.take_avail(mem)?
        };
        let Some(head) = head else {
            return Ok(None);
        };
        // The table and the parse spelled out here: out of line, they cost 3-descriptor
        // chains about 8% in the virtqueue bench (scripts/ab).
        let table = Self::ring_slice(mem, self.desc_table, desc_table_len(self.size))?;
        DescriptorChain::parse(mem, table, self.size, self.indirect, head)
            .map(Some)
            .map_err(|reason| Error::InvalidChain { head, reason })
    }

    /// The next head with inflight tracking: the chains a dead backend had in flight first,
    /// then each head taken from the avail ring is marked in the region. Out of line, so
    /// that queues without tracking (nearly all) keep a lean pop.
    #[inline(never)]
    fn take_tracked(&mut self, mem: &GuestMemory) -> Result<Option<u16>> {
        if let Some(head) = self.inflight.as_mut().and_then(|r| r.next_resubmit()) {
            // A chain a dead backend had in flight: still marked in the region.
            return Ok(Some(head));
        }
        let Some(head) = self.take_avail(mem)? else {
            return Ok(None);
        };
        if head < self.size {
            if let Some(region) = self.inflight.as_mut() {
                region.taken(head).map_err(Error::Inflight)?;
            }
        }
        Ok(Some(head))
    }

    /// Takes the next head from the available ring, moving past it; `None` if there is none.
    #[inline]
    fn take_avail(&mut self, mem: &GuestMemory) -> Result<Option<u16>> {
        let avail = Self::ring_slice(mem, self.avail_ring, avail_ring_len(self.size))?;
        let avail_idx = avail
            .load_u16(2, Ordering::Acquire)
            .map(u16::from_le)
            .ok_or_else(|| ring_error(self.avail_ring))?;
        let pending = (Wrapping(avail_idx) - self.next_avail).0;
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(Error::InvalidAvailIdx {
                avail: avail_idx,
                next: self.next_avail.0,
                size: self.size,
            });
        }
        // `size` is a power of two (checked at activation), so this is `% size`.
        let slot = usize::from(self.next_avail.0 & (self.size - 1));
        let head = avail
            .load_u16(4 + 2 * slot, Ordering::Relaxed)
            .map(u16::from_le)
            .ok_or_else(|| ring_error(self.avail_ring))?;
        self.next_avail += 1;
        Ok(Some(head))
    }

    /// Steps back over the last popped chain, so the next `pop` returns it again (a device
    /// that could not take it yet, such as net receive without a packet).
    pub fn undo_pop(&mut self) {
        if self.inflight.as_mut().is_some_and(|r| r.undo_resubmit()) {
            return;
        }
        self.next_avail -= 1;
    }

    /// Puts `(head, len)` in the used ring and publishes it with a `Release` store of
    /// `used.idx`. `len` is the number of bytes written into the chain's buffers.
    #[inline]
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<()> {
        self.check_ready()?;
        if head >= self.size {
            return Err(Error::InvalidUsedHead {
                head,
                size: self.size,
            });
        }
        if self.inflight.is_some() {
            return self.add_used_tracked(mem, head, len);
        }
        self.put_used(mem, head, len)
    }

    /// [`Queue::add_used`] with inflight tracking: the region learns of the entry before it
    /// goes in the used ring and after (so a restart can tell which side it died on).
    #[inline(never)]
    fn add_used_tracked(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<()> {
        if let Some(region) = &self.inflight {
            region.before_use(head).map_err(Error::Inflight)?;
        }
        self.put_used(mem, head, len)?;
        if let Some(region) = &self.inflight {
            region
                .after_use(head, self.next_used.0)
                .map_err(Error::Inflight)?;
        }
        Ok(())
    }

    /// Writes `(head, len)` in the next used slot and publishes it.
    #[inline]
    fn put_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<()> {
        let used = Self::ring_slice(mem, self.used_ring, used_ring_len(self.size))?;
        let slot = usize::from(self.next_used.0 & (self.size - 1));
        used.write_obj([u32::from(head).to_le(), len.to_le()], 4 + 8 * slot)
            .ok_or_else(|| ring_error(self.used_ring))?;
        self.next_used += 1;
        used.store_u16(2, self.next_used.0.to_le(), Ordering::Release)
            .ok_or_else(|| ring_error(self.used_ring))
    }

    /// Whether the driver wants a used-buffer notification for the entries added since the
    /// last call: with EVENT_IDX, whether `used_event` lies among them; without it, unless
    /// the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.check_ready()?;
        // Order the used-ring writes before the read of the driver's suppression state
        // (the driver has the mirror-image fence between its used-ring read and that write).
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let old = std::mem::replace(&mut self.signalled_used, new);
        if !self.event_idx {
            let flags = Self::load(mem, self.avail_ring, Ordering::Relaxed)?;
            return Ok(new != old && flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0);
        }
        let slot = 4 + 2 * u64::from(self.size);
        let used_event = Wrapping(Self::load(
            mem,
            self.avail_ring.wrapping_add(slot),
            Ordering::Relaxed,
        )?);
        // vring_need_event: notify iff used_event is in [old, new).
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    /// Asks the driver to notify on new available chains (before the device waits for a
    /// kick): with EVENT_IDX writes `avail_event = next_avail`, otherwise clears
    /// VIRTQ_USED_F_NO_NOTIFY. Returns whether chains are already available, in which case
    /// the device must pop them rather than wait (they may have been added before the driver
    /// saw the request).
    pub fn enable_notification(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.check_ready()?;
        if self.event_idx {
            let slot = 4 + 8 * u64::from(self.size);
            Self::store(
                mem,
                self.used_ring.wrapping_add(slot),
                self.next_avail.0,
                Ordering::Relaxed,
            )?;
        } else {
            Self::store(mem, self.used_ring, 0, Ordering::Relaxed)?;
        }
        // Order that write before the avail index read below (store-load).
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }

    /// Tells the driver it need not notify while the device is busy. Without EVENT_IDX sets
    /// VIRTQ_USED_F_NO_NOTIFY; with EVENT_IDX nothing is needed, since `avail_event` stays
    /// at the index the device last asked for.
    pub fn disable_notification(&mut self, mem: &GuestMemory) -> Result<()> {
        self.check_ready()?;
        if !self.event_idx {
            Self::store(
                mem,
                self.used_ring,
                VIRTQ_USED_F_NO_NOTIFY,
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockBuf, MockSplitQueue};
    use crate::ChainError;

    const BASE: GuestAddress = GuestAddress(0x1000);

    fn setup(size: u16) -> (GuestMemory, MockSplitQueue, Queue) {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x40_0000)]).expect("memory");
        let mock = MockSplitQueue::new(&mem, BASE, size).expect("mock");
        let q = mock.queue().expect("queue");
        (mem, mock, q)
    }

    #[test]
    fn pops_chains_in_avail_order_and_returns_them_used() {
        let (mem, mut mock, mut q) = setup(16);
        let a = mock.add_chain(&[MockBuf::Readable(vec![1])]).expect("add");
        let b = mock.add_chain(&[MockBuf::Writable(8)]).expect("add");
        let ca = q.pop(&mem).expect("pop").expect("a");
        let cb = q.pop(&mem).expect("pop").expect("b");
        assert!(q.pop(&mem).expect("pop").is_none());
        assert_eq!((ca.head_index(), cb.head_index()), (a.head, b.head));
        q.add_used(&mem, cb.head_index(), 8).expect("used");
        q.add_used(&mem, ca.head_index(), 0).expect("used");
        let u = mock.next_used().expect("used ring").expect("entry");
        assert_eq!((u.id, u.len), (u32::from(b.head), 8));
        let u = mock.next_used().expect("used ring").expect("entry");
        assert_eq!(u.id, u32::from(a.head));
        assert_eq!(q.used_idx(&mem).expect("idx"), 2);
    }

    #[test]
    fn indices_wrap_around_u16() {
        let (mem, mut mock, mut q) = setup(4);
        for _ in 0..70_000u32 {
            mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
            let c = q.pop(&mem).expect("pop").expect("chain");
            q.add_used(&mem, c.head_index(), 4).expect("used");
            assert!(mock.next_used().expect("used").is_some());
        }
        assert_eq!(q.next_avail(), (70_000u32 % 65_536) as u16);
    }

    #[test]
    fn avail_index_jumping_past_the_queue_size_is_an_error() {
        let (mem, mut mock, mut q) = setup(8);
        mock.set_avail_idx(9).expect("write");
        assert!(matches!(
            q.pop(&mem),
            Err(Error::InvalidAvailIdx {
                avail: 9,
                next: 0,
                size: 8
            })
        ));
        assert_eq!(q.next_avail(), 0, "nothing consumed");
        mock.set_avail_idx(u16::MAX).expect("write");
        assert!(q.pop(&mem).is_err());
    }

    #[test]
    fn invalid_chain_is_consumed_and_names_its_head() {
        let (mem, mut mock, mut q) = setup(8);
        mock.write_desc(
            3,
            crate::Descriptor {
                addr: 0x1000,
                len: 0,
                flags: 0,
                next: 0,
            },
        )
        .expect("write");
        mock.publish(3).expect("publish");
        assert!(matches!(
            q.pop(&mem),
            Err(Error::InvalidChain {
                head: 3,
                reason: ChainError::ZeroLength
            })
        ));
        assert_eq!(q.next_avail(), 1);
        q.add_used(&mem, 3, 0).expect("returned");
    }

    #[test]
    fn head_out_of_range_in_the_avail_ring_is_an_error() {
        let (mem, mut mock, mut q) = setup(8);
        mock.publish(8).expect("publish");
        assert!(matches!(
            q.pop(&mem),
            Err(Error::InvalidChain {
                head: 8,
                reason: ChainError::HeadOutOfRange(8)
            })
        ));
    }

    #[test]
    fn undo_pop_returns_the_same_chain() {
        let (mem, mut mock, mut q) = setup(8);
        let a = mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        q.pop(&mem).expect("pop").expect("chain");
        q.undo_pop();
        assert_eq!(
            q.pop(&mem).expect("pop").expect("again").head_index(),
            a.head
        );
    }

    #[test]
    fn a_chain_in_flight_at_a_restart_comes_first_and_an_undone_pop_returns_it() {
        let (mem, mut mock, mut q) = setup(8);
        let inflight = GuestMemory::new(&[(GuestAddress(0), 0x1000)]).expect("region");
        let region = InflightRing::new(inflight, GuestAddress(0x40), 8);
        q.track_inflight(&mem, region.clone()).expect("track");
        let a = mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        let b = mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        q.pop(&mem).expect("pop").expect("a");
        q.pop(&mem).expect("pop").expect("b");
        q.add_used(&mem, a.head, 4).expect("used");
        // The backend dies with b in flight; its successor takes over the rings.
        let mut q = mock.queue().expect("queue");
        assert!(q.track_inflight(&mem, region).expect("track again"));
        let c = mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        let again = q.pop(&mem).expect("pop").expect("b again");
        assert_eq!(again.head_index(), b.head);
        q.undo_pop();
        assert_eq!(q.pop(&mem).expect("pop").expect("b").head_index(), b.head);
        assert_eq!(q.pop(&mem).expect("pop").expect("c").head_index(), c.head);
        q.undo_pop();
        assert_eq!(q.pop(&mem).expect("pop").expect("c").head_index(), c.head);
        assert!(q.pop(&mem).expect("pop").is_none());
    }

    #[test]
    fn activation_validates_size_and_layout() {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x10000)]).expect("memory");
        assert!(matches!(Queue::new(0), Err(Error::InvalidMaxSize(0))));
        assert!(matches!(Queue::new(100), Err(Error::InvalidMaxSize(100))));
        assert!(Queue::new(32768).is_ok());
        assert!(matches!(Queue::new(65535), Err(Error::InvalidMaxSize(_))));
        let mut q = Queue::new(256).expect("queue");
        q.set_desc_table(GuestAddress(0x1000));
        q.set_avail_ring(GuestAddress(0x2000));
        q.set_used_ring(GuestAddress(0x3000));
        for bad in [0, 3, 512] {
            q.set_size(bad);
            assert!(matches!(q.activate(&mem), Err(Error::InvalidSize { .. })));
        }
        q.set_size(256);
        q.set_desc_table(GuestAddress(0x1008));
        assert!(matches!(
            q.activate(&mem),
            Err(Error::MisalignedRing { align: 16, .. })
        ));
        q.set_desc_table(GuestAddress(0x1000));
        q.set_avail_ring(GuestAddress(0x2001));
        assert!(matches!(
            q.activate(&mem),
            Err(Error::MisalignedRing { align: 2, .. })
        ));
        q.set_avail_ring(GuestAddress(0x2000));
        q.set_used_ring(GuestAddress(0x3002));
        assert!(matches!(
            q.activate(&mem),
            Err(Error::MisalignedRing { align: 4, .. })
        ));
        q.set_used_ring(GuestAddress(0x10000 - 0x100));
        assert!(matches!(
            q.activate(&mem),
            Err(Error::RingOutOfBounds { .. })
        ));
        assert!(matches!(q.pop(&mem), Err(Error::NotReady)));
        q.set_used_ring(GuestAddress(0x3000));
        q.activate(&mem).expect("valid layout");
        assert!(q.ready());
        q.reset();
        assert!(!q.ready() && q.size() == 256);
    }

    #[test]
    fn used_head_beyond_the_queue_is_an_error() {
        let (mem, _mock, mut q) = setup(8);
        assert!(matches!(
            q.add_used(&mem, 8, 0),
            Err(Error::InvalidUsedHead { head: 8, size: 8 })
        ));
    }

    #[test]
    fn event_idx_notifies_only_when_used_event_is_crossed() {
        let (mem, mut mock, mut q) = setup(16);
        q.set_features(1 << VIRTIO_F_EVENT_IDX);
        // The driver wants an interrupt once entry 2 (the third) is used.
        mock.set_used_event(2).expect("write");
        let mut notified = Vec::new();
        for _ in 0..4 {
            mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
            let c = q.pop(&mem).expect("pop").expect("chain");
            q.add_used(&mem, c.head_index(), 1).expect("used");
            notified.push(q.needs_notification(&mem).expect("check"));
        }
        assert_eq!(notified, [false, false, true, false]);
        // Entries added in a batch: one check covers all of them.
        mock.set_used_event(5).expect("write");
        for _ in 0..3 {
            mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
            let c = q.pop(&mem).expect("pop").expect("chain");
            q.add_used(&mem, c.head_index(), 1).expect("used");
        }
        assert!(q.needs_notification(&mem).expect("check"));
        assert!(!q.needs_notification(&mem).expect("nothing new"));
    }

    #[test]
    fn event_idx_asks_for_a_kick_at_next_avail() {
        let (mem, mut mock, mut q) = setup(16);
        q.set_features(1 << VIRTIO_F_EVENT_IDX);
        mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        assert!(q.enable_notification(&mem).expect("enable"), "one pending");
        q.pop(&mem).expect("pop").expect("chain");
        assert!(!q.enable_notification(&mem).expect("enable"));
        assert_eq!(mock.avail_event().expect("read"), 1);
    }

    #[test]
    fn without_event_idx_flags_suppress_notifications() {
        let (mem, mut mock, mut q) = setup(16);
        q.disable_notification(&mem).expect("disable");
        assert_eq!(mock.used_flags().expect("read"), VIRTQ_USED_F_NO_NOTIFY);
        assert!(!q.enable_notification(&mem).expect("enable"));
        assert_eq!(mock.used_flags().expect("read"), 0);

        mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        let c = q.pop(&mem).expect("pop").expect("chain");
        q.add_used(&mem, c.head_index(), 1).expect("used");
        assert!(q.needs_notification(&mem).expect("check"));
        assert!(!q.needs_notification(&mem).expect("nothing new"));
        mock.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
            .expect("write");
        mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        let c = q.pop(&mem).expect("pop").expect("chain");
        q.add_used(&mem, c.head_index(), 1).expect("used");
        assert!(!q.needs_notification(&mem).expect("suppressed"));
    }

    #[test]
    fn resuming_from_a_saved_base() {
        let (mem, mut mock, mut q) = setup(8);
        for _ in 0..3 {
            mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        }
        let c = q.pop(&mem).expect("pop").expect("chain");
        q.add_used(&mem, c.head_index(), 1).expect("used");
        let (avail, used) = (q.next_avail(), q.used_idx(&mem).expect("idx"));
        let mut q2 = mock.queue().expect("queue");
        q2.set_next_avail(avail);
        q2.set_next_used(used);
        assert_eq!(q2.pending(&mem).expect("pending"), 2);
        let c = q2.pop(&mem).expect("pop").expect("chain");
        q2.add_used(&mem, c.head_index(), 1).expect("used");
        assert_eq!(q2.used_idx(&mem).expect("idx"), 2);
    }
}
