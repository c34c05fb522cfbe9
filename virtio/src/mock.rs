//! A mock guest driver for device tests: lays out a split virtqueue in guest memory, submits
//! descriptor chains (direct or indirect), and reads back used entries and written data.
//!
//! For malformed input it also writes raw descriptors and ring indices; mixing those with
//! `add_chain` on the same descriptor slots is up to the test.

use std::collections::{BTreeMap, HashMap};
use std::num::Wrapping;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use executor::{EventFd, EventFdStream, Executor, Task};
use memory::{GuestAddress, GuestMemory};

use crate::queue::desc::{
    avail_ring_len, desc_table_len, used_ring_len, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use crate::vhost_user::{Device, StopSignal};
use crate::{AsyncQueue, Buffer, Descriptor, Error, Queue, Result, VIRTIO_F_INDIRECT_DESC};

/// One buffer of a chain to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MockBuf {
    /// A device-readable buffer holding these bytes.
    Readable(Vec<u8>),
    /// A device-writable buffer of this many bytes (zeroed).
    Writable(u32),
}

/// A chain the mock submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockChain {
    /// Head descriptor index (what the device returns in the used ring).
    pub head: u16,
    /// The device-readable buffers.
    pub readable: Vec<Buffer>,
    /// The device-writable buffers.
    pub writable: Vec<Buffer>,
}

/// A used ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MockUsed {
    /// The head index the device returned.
    pub id: u32,
    /// The byte count the device reported.
    pub len: u32,
}

/// Data-area allocations: (start, length).
type Allocs = Vec<(u64, u64)>;

#[derive(Debug)]
struct InFlight {
    descs: Vec<u16>,
    allocs: Allocs,
}

/// The driver side of one split virtqueue in guest memory.
#[derive(Debug)]
pub struct MockSplitQueue {
    mem: GuestMemory,
    size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Free ranges of the data area, start -> length.
    free_data: BTreeMap<u64, u64>,
    free_descs: Vec<u16>,
    in_flight: HashMap<u16, InFlight>,
    avail_idx: Wrapping<u16>,
    used_seen: Wrapping<u16>,
}

fn mock_err(what: impl std::fmt::Display) -> Error {
    Error::Mock(what.to_string())
}

const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

impl MockSplitQueue {
    /// A queue of `size` entries with its rings at `base` (16-aligned) and a 1 MiB data area
    /// after them.
    pub fn new(mem: &GuestMemory, base: GuestAddress, size: u16) -> Result<MockSplitQueue> {
        let rings_end = Self::rings_end(base, size);
        Self::with_data_area(
            mem,
            base,
            size,
            GuestAddress(align_up(rings_end, 4096)),
            1 << 20,
        )
    }

    fn rings_end(base: GuestAddress, size: u16) -> u64 {
        let avail = base.0 + desc_table_len(size);
        let used = align_up(avail + avail_ring_len(size), 4);
        used + used_ring_len(size)
    }

    /// A queue of `size` entries with its rings at `base` and buffers allocated from
    /// `data..data + data_len`. Zeroes the rings.
    pub fn with_data_area(
        mem: &GuestMemory,
        base: GuestAddress,
        size: u16,
        data: GuestAddress,
        data_len: u64,
    ) -> Result<MockSplitQueue> {
        let avail = GuestAddress(base.0 + desc_table_len(size));
        let used = GuestAddress(align_up(avail.0 + avail_ring_len(size), 4));
        let rings_len = Self::rings_end(base, size) - base.0;
        mem.fill(base, rings_len as usize, 0).map_err(mock_err)?;
        if !mem.check_range(data, data_len) {
            return Err(mock_err("data area outside guest memory"));
        }
        Ok(MockSplitQueue {
            mem: mem.clone(),
            size,
            desc_table: base,
            avail,
            used,
            free_data: BTreeMap::from([(data.0, data_len)]),
            free_descs: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: Wrapping(0),
            used_seen: Wrapping(0),
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Guest address of the available ring.
    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// A device-side queue over this layout, activated, with indirect descriptors on and
    /// EVENT_IDX off.
    pub fn queue(&self) -> Result<Queue> {
        self.queue_with_features(1 << VIRTIO_F_INDIRECT_DESC)
    }

    /// A device-side queue over this layout, activated, with these feature bits.
    pub fn queue_with_features(&self, features: u64) -> Result<Queue> {
        let mut q = Queue::new(self.size)?;
        q.set_desc_table(self.desc_table);
        q.set_avail_ring(self.avail);
        q.set_used_ring(self.used);
        q.set_features(features);
        q.activate(&self.mem)?;
        Ok(q)
    }

    fn alloc(&mut self, len: u64) -> Result<u64> {
        let len = align_up(len.max(1), 8);
        let (&start, &free) = self
            .free_data
            .iter()
            .find(|(_, &free)| free >= len)
            .ok_or_else(|| mock_err("data area full"))?;
        self.free_data.remove(&start);
        if free > len {
            self.free_data.insert(start + len, free - len);
        }
        Ok(start)
    }

    fn free(&mut self, start: u64, len: u64) {
        let mut start = start;
        let mut len = align_up(len.max(1), 8);
        if let Some((&prev, &prev_len)) = self.free_data.range(..start).next_back() {
            if prev + prev_len == start {
                self.free_data.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(next_len) = self.free_data.remove(&(start + len)) {
            len += next_len;
        }
        self.free_data.insert(start, len);
    }

    /// Allocates and fills the buffers; returns their descriptors (not yet linked) and the
    /// data allocations.
    fn buffers(&mut self, bufs: &[MockBuf]) -> Result<(Vec<Descriptor>, Allocs)> {
        let mut descs = Vec::with_capacity(bufs.len());
        let mut allocs = Vec::with_capacity(bufs.len());
        for b in bufs {
            let (len, flags) = match b {
                MockBuf::Readable(data) => {
                    let len = u32::try_from(data.len()).map_err(mock_err)?;
                    (len, 0)
                }
                MockBuf::Writable(len) => (*len, VIRTQ_DESC_F_WRITE),
            };
            let addr = self.alloc(u64::from(len))?;
            allocs.push((addr, u64::from(len)));
            match b {
                MockBuf::Readable(data) => self.mem.write_slice(data, GuestAddress(addr)),
                MockBuf::Writable(len) => self.mem.fill(GuestAddress(addr), *len as usize, 0),
            }
            .map_err(mock_err)?;
            descs.push(Descriptor {
                addr,
                len,
                flags,
                next: 0,
            });
        }
        Ok((descs, allocs))
    }

    fn chain_of(head: u16, descs: &[Descriptor]) -> MockChain {
        let buf = |d: &Descriptor| Buffer {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        MockChain {
            head,
            readable: descs
                .iter()
                .filter(|d| !d.is_write_only())
                .map(buf)
                .collect(),
            writable: descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(buf)
                .collect(),
        }
    }

    /// Submits a chain of direct descriptors and makes it available.
    pub fn add_chain(&mut self, bufs: &[MockBuf]) -> Result<MockChain> {
        if bufs.is_empty() || bufs.len() > self.free_descs.len() {
            return Err(mock_err("no room for the chain in the descriptor table"));
        }
        let (mut descs, allocs) = self.buffers(bufs)?;
        let slots: Vec<u16> = (0..descs.len())
            .filter_map(|_| self.free_descs.pop())
            .collect();
        for i in 0..descs.len() {
            if let Some(&next) = slots.get(i + 1) {
                descs[i].flags |= VIRTQ_DESC_F_NEXT;
                descs[i].next = next;
            }
            self.write_desc(slots[i], descs[i])?;
        }
        let head = slots[0];
        self.in_flight.insert(
            head,
            InFlight {
                descs: slots,
                allocs,
            },
        );
        self.publish(head)?;
        Ok(Self::chain_of(head, &descs))
    }

    /// Submits a chain as one indirect descriptor pointing to a table of `bufs`.
    pub fn add_indirect_chain(&mut self, bufs: &[MockBuf]) -> Result<MockChain> {
        let head = self
            .free_descs
            .pop()
            .ok_or_else(|| mock_err("descriptor table full"))?;
        let (mut descs, mut allocs) = self.buffers(bufs)?;
        let table_len = 16 * descs.len() as u64;
        let table = self.alloc(table_len)?;
        allocs.push((table, table_len));
        let n = descs.len();
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= VIRTQ_DESC_F_NEXT;
                d.next = i as u16 + 1;
            }
            self.write_desc_at(GuestAddress(table + 16 * i as u64), *d)?;
        }
        self.write_desc(
            head,
            Descriptor {
                addr: table,
                len: table_len as u32,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        self.in_flight.insert(
            head,
            InFlight {
                descs: vec![head],
                allocs,
            },
        );
        self.publish(head)?;
        Ok(Self::chain_of(head, &descs))
    }

    /// Writes descriptor `index` of the descriptor table as given (no bookkeeping).
    pub fn write_desc(&self, index: u16, desc: Descriptor) -> Result<()> {
        self.write_desc_at(self.desc_table.wrapping_add(16 * u64::from(index)), desc)
    }

    /// Writes a descriptor at any guest address (an indirect table).
    pub fn write_desc_at(&self, addr: GuestAddress, desc: Descriptor) -> Result<()> {
        self.mem
            .write_slice(&desc.to_le_bytes(), addr)
            .map_err(mock_err)
    }

    /// Puts `head` in the next avail ring slot and publishes it (`avail.idx`, release).
    pub fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx.0 % self.size);
        self.mem
            .write_obj(head.to_le(), self.avail.wrapping_add(4 + 2 * slot))
            .map_err(mock_err)?;
        self.avail_idx += 1;
        self.store(self.avail.wrapping_add(2), self.avail_idx.0)
    }

    /// Writes `avail.idx` directly (to test a driver that jumps it).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.avail_idx = Wrapping(idx);
        self.store(self.avail.wrapping_add(2), idx)
    }

    /// Writes `avail.flags`.
    pub fn set_avail_flags(&self, flags: u16) -> Result<()> {
        self.store(self.avail, flags)
    }

    /// Writes `used_event` (EVENT_IDX: notify me once this used index is passed).
    pub fn set_used_event(&self, idx: u16) -> Result<()> {
        self.store(self.avail.wrapping_add(4 + 2 * u64::from(self.size)), idx)
    }

    /// Reads `avail_event` (EVENT_IDX: the device wants a kick once this avail index is
    /// passed).
    pub fn avail_event(&self) -> Result<u16> {
        self.load(self.used.wrapping_add(4 + 8 * u64::from(self.size)))
    }

    /// Reads `used.flags`.
    pub fn used_flags(&self) -> Result<u16> {
        self.load(self.used)
    }

    /// Reads `used.idx`.
    pub fn used_idx(&self) -> Result<u16> {
        self.load(self.used.wrapping_add(2))
    }

    /// Whether the driver would kick after publishing up to `avail.idx` from `old`: with
    /// EVENT_IDX per `avail_event`, without it unless the device set NO_NOTIFY.
    pub fn needs_kick(&self, event_idx: bool, old: u16) -> Result<bool> {
        if event_idx {
            let event = Wrapping(self.avail_event()?);
            let new = self.avail_idx;
            Ok(new - event - Wrapping(1) < new - Wrapping(old))
        } else {
            Ok(self.used_flags()? & crate::queue::desc::VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// The driver's avail index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }

    /// The next used entry, if the device published one; frees the chain's descriptors and
    /// buffers when it was submitted by `add_chain` or `add_indirect_chain`.
    pub fn next_used(&mut self) -> Result<Option<MockUsed>> {
        let idx = self
            .mem
            .load_u16(self.used.wrapping_add(2), Ordering::Acquire)
            .map_err(mock_err)?;
        if u16::from_le(idx) == self.used_seen.0 {
            return Ok(None);
        }
        let slot = u64::from(self.used_seen.0 % self.size);
        let [id, len] = self
            .mem
            .read_obj::<[u32; 2]>(self.used.wrapping_add(4 + 8 * slot))
            .map_err(mock_err)?;
        self.used_seen += 1;
        let used = MockUsed {
            id: u32::from_le(id),
            len: u32::from_le(len),
        };
        if let Some(f) = u16::try_from(used.id)
            .ok()
            .and_then(|h| self.in_flight.remove(&h))
        {
            self.free_descs.extend(f.descs.iter().rev());
            for (start, len) in f.allocs {
                self.free(start, len);
            }
        }
        Ok(Some(used))
    }

    /// The bytes in a chain's writable buffers, concatenated.
    pub fn read_writable(&self, chain: &MockChain) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for b in &chain.writable {
            let start = out.len();
            out.resize(start + b.len as usize, 0);
            self.mem
                .read_slice(&mut out[start..], b.addr)
                .map_err(mock_err)?;
        }
        Ok(out)
    }

    fn store(&self, addr: GuestAddress, val: u16) -> Result<()> {
        self.mem
            .store_u16(addr, val.to_le(), Ordering::Release)
            .map_err(mock_err)
    }

    fn load(&self, addr: GuestAddress) -> Result<u16> {
        self.mem
            .load_u16(addr, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mock_err)
    }
}

/// One queue of a device under test, driven from the driver's side: 4 MiB of guest memory
/// with the queue at 0x1000 (16 entries), its kick and call eventfds, an executor to run the
/// device's queue task on, and the signal that stops it. Panics (it is for tests) when the
/// set-up fails or the device does not answer within 5 s.
pub struct DeviceQueue {
    pub ex: Executor,
    pub driver: MockSplitQueue,
    pub kick: EventFd,
    /// The call eventfd, as the driver waits on it.
    pub calls: EventFdStream,
    pub queue: Rc<AsyncQueue>,
    pub stop: StopSignal,
}

impl DeviceQueue {
    pub fn new() -> DeviceQueue {
        let mem = GuestMemory::new_x86(4 << 20).expect("guest memory");
        let driver = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).expect("mock queue");
        let kick = EventFd::new().expect("kick eventfd");
        let call = EventFd::new().expect("call eventfd");
        let calls = call.try_clone().expect("call eventfd").into_stream();
        let queue = Rc::new(AsyncQueue::new(
            driver.queue().expect("queue"),
            mem,
            kick.try_clone().expect("kick eventfd").into_stream(),
            call,
        ));
        DeviceQueue {
            ex: Executor::new().expect("executor"),
            driver,
            kick,
            calls,
            queue,
            stop: StopSignal::new(),
        }
    }

    /// `device` serves its queue `index` on this queue (no features acked) until the stop.
    pub fn serve<D: Device + 'static>(&self, device: Rc<D>, index: usize) -> Task<()> {
        self.ex
            .spawn(device.run_queue(index, self.queue.clone(), 0, self.stop.clone()))
    }

    /// Waits for calls until at least `n` used entries came: their `(id, len)`.
    pub fn wait_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let mut used = Vec::new();
        while used.len() < n {
            self.ex
                .run_until(executor::timeout(
                    Duration::from_secs(5),
                    self.calls.next_value(),
                ))
                .expect("a call within 5 s")
                .expect("call eventfd");
            while let Some(u) = self.driver.next_used().expect("used ring") {
                used.push((u.id, u.len));
            }
        }
        used
    }

    /// Stops the queue; its task must end within 5 s.
    pub fn stop_and_join(&self, task: Task<()>) {
        self.stop.stop();
        self.ex
            .run_until(executor::timeout(Duration::from_secs(5), task))
            .expect("the queue task ends within 5 s");
    }
}

impl Default for DeviceQueue {
    fn default() -> DeviceQueue {
        DeviceQueue::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemory {
        GuestMemory::new(&[(GuestAddress(0), 0x40_0000)]).expect("memory")
    }

    #[test]
    fn lays_out_rings_with_spec_alignment() {
        let mem = memory();
        let m = MockSplitQueue::new(&mem, GuestAddress(0x1000), 8).expect("mock");
        assert_eq!(m.avail_addr(), GuestAddress(0x1080));
        assert_eq!(m.used_addr(), GuestAddress(0x1098));
    }

    #[test]
    fn used_entries_free_descriptors_and_data() {
        let mem = memory();
        let mut m = MockSplitQueue::new(&mem, GuestAddress(0x1000), 2).expect("mock");
        let mut q = m.queue().expect("queue");
        for _ in 0..100 {
            let a = m
                .add_chain(&[MockBuf::Readable(vec![7; 100]), MockBuf::Writable(3000)])
                .expect("room");
            assert!(m.add_chain(&[MockBuf::Writable(1)]).is_err(), "table full");
            let c = q.pop(&mem).expect("pop").expect("chain");
            q.add_used(&mem, c.head_index(), 0).expect("used");
            assert_eq!(
                m.next_used().expect("used").map(|u| u.id),
                Some(a.head.into())
            );
        }
        assert_eq!(m.free_data.len(), 1, "data area coalesced");
    }

    #[test]
    fn indirect_chain_round_trip() {
        let mem = memory();
        let mut m = MockSplitQueue::new(&mem, GuestAddress(0x1000), 4).expect("mock");
        let mut q = m.queue().expect("queue");
        let sent = m
            .add_indirect_chain(&[
                MockBuf::Readable(b"in".to_vec()),
                MockBuf::Writable(2),
                MockBuf::Writable(2),
            ])
            .expect("add");
        let c = q.pop(&mem).expect("pop").expect("chain");
        assert_eq!(c.readable(), &sent.readable[..]);
        assert_eq!(c.writable(), &sent.writable[..]);
        c.writer(&mem).write_all_bytes(b"out!").expect("write");
        assert_eq!(m.read_writable(&sent).expect("read"), b"out!");
    }
}
