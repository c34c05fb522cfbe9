//! Descriptor chains, walked and validated in full when they are popped (virtio 1.2
//! §2.7.5, §2.7.5.3 for indirect tables).

use memory::{GuestAddress, GuestMemory, VolatileSlice};

use super::desc::{Descriptor, DESC_SIZE};
use crate::{Reader, Writer};

/// What is wrong with a descriptor chain the driver made.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The avail ring named a head index at or past the queue size.
    #[error("head index {0} is not below the queue size")]
    HeadOutOfRange(u16),
    /// A `next` index at or past the end of its table.
    #[error("next index {index} is outside its table of {entries} descriptors")]
    NextOutOfRange {
        /// The `next` field.
        index: u16,
        /// Entries in the table it indexes.
        entries: u32,
    },
    /// The chain comes back to a descriptor it already visited.
    #[error("the chain loops")]
    Loop,
    /// More buffers than the queue size (virtio 1.2 §2.7.5.3.1).
    #[error("the chain has more than queue-size ({0}) buffers")]
    TooLong(u16),
    /// More than 2^32 bytes in total (virtio 1.2 §2.7.5.2).
    #[error("the chain holds more than 4 GiB")]
    TooManyBytes,
    /// A buffer of length zero.
    #[error("a buffer has length zero")]
    ZeroLength,
    /// A buffer that is not all guest RAM (outside memory, across the MMIO hole, or
    /// wrapping the address space).
    #[error("buffer {addr}+{len:#x} is outside guest memory")]
    BufferOutOfBounds {
        /// Guest address of the buffer.
        addr: GuestAddress,
        /// Its length.
        len: u32,
    },
    /// An indirect descriptor although VIRTIO_F_INDIRECT_DESC was not negotiated.
    #[error("indirect descriptors were not negotiated")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has VIRTQ_DESC_F_NEXT.
    #[error("indirect descriptor with the NEXT flag")]
    IndirectWithNext,
    /// An indirect table whose length is zero or not a multiple of 16.
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    InvalidIndirectLen(u32),
    /// An indirect table that is not all guest RAM.
    #[error("indirect table {addr}+{len:#x} is outside guest memory")]
    IndirectTableOutOfBounds {
        /// Guest address of the table.
        addr: GuestAddress,
        /// Its length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one (virtio 1.2 §2.7.4.2).
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor could not be read.
    #[error("failed to read a descriptor")]
    ReadDescriptor(#[source] memory::Error),
}

/// One buffer of a validated chain: all of `addr..addr + len` is guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

const INLINE: usize = 4;

/// The first buffers of a chain being parsed, from the addresses and lengths kept apart
/// (see [`DescriptorChain::parse`]).
#[inline]
fn inline_buffers(addrs: &[u64; INLINE], lens: &[u32; INLINE]) -> [Buffer; INLINE] {
    std::array::from_fn(|i| Buffer {
        addr: GuestAddress(addrs[i]),
        len: lens[i],
    })
}

/// A list of buffers that stays on the stack for the usual short chains.
#[derive(Clone, Debug)]
pub(crate) enum BufList {
    Inline { len: usize, items: [Buffer; INLINE] },
    Heap(Vec<Buffer>),
}

impl BufList {
    pub(crate) fn from_slice(bufs: &[Buffer]) -> BufList {
        if bufs.len() <= INLINE {
            let mut items = [Buffer::default(); INLINE];
            items[..bufs.len()].copy_from_slice(bufs);
            BufList::Inline {
                len: bufs.len(),
                items,
            }
        } else {
            BufList::Heap(bufs.to_vec())
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[Buffer] {
        match self {
            BufList::Inline { len, items } => &items[..*len],
            BufList::Heap(v) => v,
        }
    }
}

/// A descriptor chain popped from the avail ring, validated in full: every buffer is
/// non-empty guest RAM, readable buffers come before writable ones, no loop, no more
/// buffers than the queue size, no more than 4 GiB.
#[derive(Clone, Debug)]
pub struct DescriptorChain {
    head: u16,
    bufs: BufList,
    readable: usize,
    readable_len: usize,
    writable_len: usize,
}

/// Where a chain's descriptors are read from.
struct Table<'m> {
    source: Source<'m>,
    entries: u32,
    visited: u32,
    indirect: bool,
}

enum Source<'m> {
    /// A table inside one region (the descriptor table, checked at activation; most
    /// indirect tables).
    Slice(VolatileSlice<'m>),
    /// An indirect table that spans adjacent regions, checked to be RAM.
    Guest(GuestAddress),
}

impl Table<'_> {
    /// Descriptor `index`, which the caller checked is below `entries`.
    #[inline]
    fn read(&self, mem: &GuestMemory, index: u16) -> Result<Descriptor, ChainError> {
        let offset = u64::from(index) * DESC_SIZE;
        let [lo, hi] = match self.source {
            Source::Slice(s) => {
                s.read_obj::<[u64; 2]>(offset as usize)
                    .ok_or(ChainError::ReadDescriptor(memory::Error::OutOfBounds {
                        addr: GuestAddress(offset),
                        len: DESC_SIZE,
                    }))?
            }
            Source::Guest(addr) => mem
                .read_obj::<[u64; 2]>(addr.wrapping_add(offset))
                .map_err(ChainError::ReadDescriptor)?,
        };
        let hi = u64::from_le(hi);
        Ok(Descriptor {
            addr: u64::from_le(lo),
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        })
    }
}

impl DescriptorChain {
    /// Walks and checks the chain at `head` of `desc_table` (the queue's descriptor table,
    /// `queue_size` entries).
    #[inline]
    pub(crate) fn parse(
        mem: &GuestMemory,
        desc_table: VolatileSlice<'_>,
        queue_size: u16,
        indirect_ok: bool,
        head: u16,
    ) -> Result<DescriptorChain, ChainError> {
        if head >= queue_size {
            return Err(ChainError::HeadOutOfRange(head));
        }
        let mut table = Table {
            source: Source::Slice(desc_table),
            entries: u32::from(queue_size),
            visited: 0,
            indirect: false,
        };
        // Kept in locals (registers, mostly) while walking; the chain is built once at the
        // end, which keeps the hot path free of loads of values just stored.
        // Addresses and lengths apart: a `Buffer` stored as two fields (8 + 4 bytes) and read
        // back whole right away cannot be forwarded from the store buffer, and stalls.
        let mut addrs = [0u64; INLINE];
        let mut lens = [0u32; INLINE];
        let mut n = 0usize;
        let mut spill: Vec<Buffer> = Vec::new();
        let (mut readable, mut readable_len, mut writable_len) = (0usize, 0usize, 0usize);
        let mut index = head;
        let mut count: u16 = 0;
        loop {
            // `index < entries` (checked at the head and for every `next`), so the read
            // stays inside the table, which the queue or the indirect check below validated.
            table.visited += 1;
            if table.visited > table.entries {
                return Err(ChainError::Loop);
            }
            let desc = table.read(mem, index)?;
            if desc.is_indirect() {
                if table.indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if !indirect_ok {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if desc.has_next() {
                    return Err(ChainError::IndirectWithNext);
                }
                if desc.len == 0 || u64::from(desc.len) % DESC_SIZE != 0 {
                    return Err(ChainError::InvalidIndirectLen(desc.len));
                }
                let addr = GuestAddress(desc.addr);
                let source = match mem.get_slice(addr, desc.len as usize) {
                    Ok(s) => Source::Slice(s),
                    Err(_) if mem.check_range(addr, u64::from(desc.len)) => Source::Guest(addr),
                    Err(_) => {
                        return Err(ChainError::IndirectTableOutOfBounds {
                            addr,
                            len: desc.len,
                        })
                    }
                };
                table = Table {
                    source,
                    entries: desc.len / DESC_SIZE as u32,
                    visited: 0,
                    indirect: true,
                };
                index = 0;
                continue;
            }
            count += 1;
            if count > queue_size {
                return Err(ChainError::TooLong(queue_size));
            }
            if desc.len == 0 {
                return Err(ChainError::ZeroLength);
            }
            let addr = GuestAddress(desc.addr);
            if !mem.check_range(addr, u64::from(desc.len)) {
                return Err(ChainError::BufferOutOfBounds {
                    addr,
                    len: desc.len,
                });
            }
            let len = desc.len as usize;
            if readable_len + writable_len + len > u32::MAX as usize {
                return Err(ChainError::TooManyBytes);
            }
            if desc.is_write_only() {
                writable_len += len;
            } else {
                if writable_len > 0 {
                    return Err(ChainError::ReadableAfterWritable);
                }
                readable += 1;
                readable_len += len;
            }
            let b = Buffer {
                addr,
                len: desc.len,
            };
            if n < INLINE {
                addrs[n] = b.addr.0;
                lens[n] = b.len;
            } else {
                if spill.is_empty() {
                    spill.reserve(2 * INLINE);
                    spill.extend_from_slice(&inline_buffers(&addrs, &lens));
                }
                spill.push(b);
            }
            n += 1;
            if !desc.has_next() {
                return Ok(DescriptorChain {
                    head,
                    bufs: if n <= INLINE {
                        BufList::Inline {
                            len: n,
                            items: inline_buffers(&addrs, &lens),
                        }
                    } else {
                        BufList::Heap(spill)
                    },
                    readable,
                    readable_len,
                    writable_len,
                });
            }
            if u32::from(desc.next) >= table.entries {
                return Err(ChainError::NextOutOfRange {
                    index: desc.next,
                    entries: table.entries,
                });
            }
            index = desc.next;
        }
    }

    /// Index of the chain's head descriptor: what goes back in the used ring.
    #[inline]
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// All buffers, readable ones first.
    #[inline]
    pub fn buffers(&self) -> &[Buffer] {
        self.bufs.as_slice()
    }

    /// The device-readable buffers.
    #[inline]
    pub fn readable(&self) -> &[Buffer] {
        &self.bufs.as_slice()[..self.readable]
    }

    /// The device-writable buffers.
    #[inline]
    pub fn writable(&self) -> &[Buffer] {
        &self.bufs.as_slice()[self.readable..]
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// A reader over the readable buffers.
    pub fn reader(&self, mem: &GuestMemory) -> Reader {
        Reader::new(mem.clone(), self.readable())
    }

    /// A writer over the writable buffers.
    pub fn writer(&self, mem: &GuestMemory) -> Writer {
        Writer::new(mem.clone(), self.writable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::desc::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use memory::{MMIO_HOLE_END, MMIO_HOLE_START};

    const TABLE: GuestAddress = GuestAddress(0x1000);
    const INDIRECT: GuestAddress = GuestAddress(0x2000);

    fn memory() -> GuestMemory {
        GuestMemory::new(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(MMIO_HOLE_START - 0x1000), 0x1000),
            (GuestAddress(MMIO_HOLE_END), 0x1000),
        ])
        .expect("memory")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    fn write(mem: &GuestMemory, table: GuestAddress, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            mem.write_slice(&d.to_le_bytes(), table.wrapping_add(16 * i as u64))
                .expect("write descriptor");
        }
    }

    fn parse_at(
        mem: &GuestMemory,
        size: u16,
        indirect: bool,
        head: u16,
    ) -> Result<DescriptorChain, ChainError> {
        let table = mem
            .get_slice(TABLE, 16 * usize::from(size))
            .expect("table in memory");
        DescriptorChain::parse(mem, table, size, indirect, head)
    }

    fn parse(mem: &GuestMemory, descs: &[Descriptor]) -> Result<DescriptorChain, ChainError> {
        write(mem, TABLE, descs);
        parse_at(mem, 8, true, 0)
    }

    #[test]
    fn splits_readable_and_writable_buffers() {
        let mem = memory();
        let c = parse(
            &mem,
            &[
                desc(0x4000, 16, VIRTQ_DESC_F_NEXT, 2),
                desc(0, 0, 0, 0),
                desc(0x5000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3),
                desc(0x6000, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        )
        .expect("valid");
        assert_eq!(c.head_index(), 0);
        assert_eq!(c.readable().len(), 1);
        assert_eq!(c.writable().len(), 2);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        assert_eq!(c.writable()[1].addr, GuestAddress(0x6000));
    }

    #[test]
    fn follows_an_indirect_table() {
        let mem = memory();
        write(
            &mem,
            INDIRECT,
            &[
                desc(0x4000, 8, VIRTQ_DESC_F_NEXT, 1),
                desc(0x5000, 8, VIRTQ_DESC_F_WRITE, 0),
            ],
        );
        let c = parse(
            &mem,
            &[desc(
                INDIRECT.0,
                32,
                VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE,
                0,
            )],
        )
        .expect("valid");
        assert_eq!(c.buffers().len(), 2);
        assert_eq!(c.readable()[0].addr, GuestAddress(0x4000));
    }

    #[test]
    fn long_chains_spill_to_the_heap() {
        let mem = memory();
        let descs: Vec<Descriptor> = (0..8)
            .map(|i| desc(0x4000 + 0x100 * i, 0x100, VIRTQ_DESC_F_NEXT, i as u16 + 1))
            .chain(std::iter::once(desc(0x9000, 1, 0, 0)))
            .collect();
        write(&mem, TABLE, &descs);
        let c = parse_at(&mem, 16, true, 0).expect("valid");
        assert_eq!(c.buffers().len(), 9);
        assert_eq!(c.readable_len(), 0x801);
        let want = descs.iter().map(|d| (d.addr, d.len));
        let got = c.buffers().iter().map(|b| (b.addr.0, b.len));
        assert!(got.eq(want), "every buffer, in order: {:?}", c.buffers());
        for n in 1..=4 {
            let mut short = descs[9 - n..].to_vec();
            for (i, d) in short.iter_mut().enumerate() {
                d.next = i as u16 + 1;
            }
            write(&mem, TABLE, &short);
            let c = parse_at(&mem, 16, true, 0).expect("valid");
            let want = short.iter().map(|d| (d.addr, d.len));
            let got = c.buffers().iter().map(|b| (b.addr.0, b.len));
            assert!(got.eq(want), "{n} inline buffers: {:?}", c.buffers());
        }
    }

    #[test]
    fn loop_is_an_error() {
        let mem = memory();
        let err = parse(
            &mem,
            &[
                desc(0x4000, 1, VIRTQ_DESC_F_NEXT, 1),
                desc(0x4000, 1, VIRTQ_DESC_F_NEXT, 0),
            ],
        );
        assert!(matches!(err, Err(ChainError::Loop)));
    }

    #[test]
    fn loop_inside_an_indirect_table_is_an_error() {
        let mem = memory();
        write(&mem, INDIRECT, &[desc(0x4000, 8, VIRTQ_DESC_F_NEXT, 0)]);
        let err = parse(&mem, &[desc(INDIRECT.0, 16, VIRTQ_DESC_F_INDIRECT, 0)]);
        assert!(matches!(err, Err(ChainError::Loop)));
    }

    #[test]
    fn indirect_chain_longer_than_the_queue_is_an_error() {
        let mem = memory();
        let table: Vec<Descriptor> = (0..9)
            .map(|i| desc(0x4000, 8, VIRTQ_DESC_F_NEXT, i + 1))
            .collect();
        write(&mem, INDIRECT, &table);
        let err = parse(&mem, &[desc(INDIRECT.0, 16 * 10, VIRTQ_DESC_F_INDIRECT, 0)]);
        assert!(matches!(err, Err(ChainError::TooLong(8))));
    }

    #[test]
    fn buffers_outside_memory_are_errors() {
        let mem = memory();
        for (addr, len) in [
            (0x10_0000 - 8, 16),             // runs off the end of RAM
            (MMIO_HOLE_START - 8, 16),       // runs into the MMIO hole
            (MMIO_HOLE_START, 1),            // inside the hole
            (u64::MAX - 3, 8),               // wraps the address space
            (MMIO_HOLE_END + 0x1000, 0x100), // past the last region
        ] {
            let err = parse(&mem, &[desc(addr, len, 0, 0)]);
            assert!(
                matches!(err, Err(ChainError::BufferOutOfBounds { .. })),
                "{addr:#x}+{len:#x}: {err:?}"
            );
        }
    }

    #[test]
    fn zero_length_buffer_is_an_error() {
        let mem = memory();
        assert!(matches!(
            parse(&mem, &[desc(0x4000, 0, 0, 0)]),
            Err(ChainError::ZeroLength)
        ));
    }

    #[test]
    fn nested_indirect_is_an_error() {
        let mem = memory();
        write(
            &mem,
            INDIRECT,
            &[desc(INDIRECT.0, 16, VIRTQ_DESC_F_INDIRECT, 0)],
        );
        let err = parse(&mem, &[desc(INDIRECT.0, 16, VIRTQ_DESC_F_INDIRECT, 0)]);
        assert!(matches!(err, Err(ChainError::NestedIndirect)));
    }

    #[test]
    fn malformed_indirect_descriptors_are_errors() {
        let mem = memory();
        let i = VIRTQ_DESC_F_INDIRECT;
        assert!(matches!(
            parse(&mem, &[desc(INDIRECT.0, 24, i, 0)]),
            Err(ChainError::InvalidIndirectLen(24))
        ));
        assert!(matches!(
            parse(&mem, &[desc(INDIRECT.0, 0, i, 0)]),
            Err(ChainError::InvalidIndirectLen(0))
        ));
        assert!(matches!(
            parse(&mem, &[desc(INDIRECT.0, 16, i | VIRTQ_DESC_F_NEXT, 1)]),
            Err(ChainError::IndirectWithNext)
        ));
        assert!(matches!(
            parse(&mem, &[desc(0x10_0000 - 16, 32, i, 0)]),
            Err(ChainError::IndirectTableOutOfBounds { .. })
        ));
        write(&mem, TABLE, &[desc(INDIRECT.0, 16, i, 0)]);
        assert!(matches!(
            parse_at(&mem, 8, false, 0),
            Err(ChainError::IndirectNotNegotiated)
        ));
    }

    #[test]
    fn out_of_range_indices_are_errors() {
        let mem = memory();
        assert!(matches!(
            parse_at(&mem, 8, true, 8),
            Err(ChainError::HeadOutOfRange(8))
        ));
        assert!(matches!(
            parse(&mem, &[desc(0x4000, 1, VIRTQ_DESC_F_NEXT, 8)]),
            Err(ChainError::NextOutOfRange {
                index: 8,
                entries: 8
            })
        ));
    }

    #[test]
    fn readable_after_writable_is_an_error() {
        let mem = memory();
        let err = parse(
            &mem,
            &[
                desc(0x4000, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1),
                desc(0x4000, 1, 0, 0),
            ],
        );
        assert!(matches!(err, Err(ChainError::ReadableAfterWritable)));
    }

    #[test]
    fn more_than_4_gib_is_an_error() {
        // Buffers may overlap: five of 1 GiB over the same RAM exceed 2^32 bytes.
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x4000_0000 + 0x2000)]).expect("memory");
        let big = 0x4000_0000;
        let descs: Vec<Descriptor> = (0..5)
            .map(|i| desc(0x2000, big, VIRTQ_DESC_F_NEXT, i + 1))
            .collect();
        write(&mem, TABLE, &descs);
        assert!(matches!(
            parse_at(&mem, 8, true, 0),
            Err(ChainError::TooManyBytes)
        ));
    }
}
