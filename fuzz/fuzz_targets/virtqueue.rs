//! Fuzzes the device side of a split virtqueue with guest-controlled bytes: the descriptor
//! table, an indirect table area, the avail ring and its index, the device's start index and
//! the negotiated features. Every chain the queue accepts is read and written in full through
//! `Reader` / `Writer` (guest RAM has guard pages: a stray access crashes), returned used, and
//! the notification logic is run; nothing may panic.
//!
//! Input layout: [size_log2, features, start_lo, start_hi, avail_lo, avail_hi,
//! descriptor table (size * 16), avail ring (size * 2), indirect area (rest, up to 512)].

#![no_main]

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};
use virtio::{Queue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Spans the boundary of the two adjacent regions.
const INDIRECT_AREA: u64 = 0x3ff00;

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemory::new(&[
            (GuestAddress(0), 0x40000),
            (GuestAddress(0x40000), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .expect("guest memory")
    })
}

fn run(data: &[u8]) -> Option<()> {
    let (&[size_log2, features, s0, s1, a0, a1], rest) = data.split_first_chunk::<6>()?;
    let size = 1u16 << (size_log2 % 6);
    let start = u16::from_le_bytes([s0, s1]);
    let avail_idx = u16::from_le_bytes([a0, a1]);
    let table_len = 16 * usize::from(size);
    let ring_len = 2 * usize::from(size);
    let table = rest.get(..table_len)?;
    let ring = rest.get(table_len..table_len + ring_len)?;
    let indirect = &rest[table_len + ring_len..];
    let indirect = &indirect[..indirect.len().min(512)];

    let mem = memory();
    mem.fill(GuestAddress(DESC_TABLE), 0x3000, 0).ok()?;
    mem.fill(GuestAddress(INDIRECT_AREA), 512, 0).ok()?;
    mem.write_slice(table, GuestAddress(DESC_TABLE)).ok()?;
    mem.write_slice(indirect, GuestAddress(INDIRECT_AREA))
        .ok()?;
    for (i, pair) in ring.chunks_exact(2).enumerate() {
        let slot = (usize::from(start) + i) % usize::from(size);
        mem.write_slice(pair, GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .ok()?;
    }
    mem.store_u16(
        GuestAddress(AVAIL + 2),
        avail_idx.to_le(),
        Ordering::Release,
    )
    .ok()?;

    let mut q = Queue::new(32).ok()?;
    q.set_size(size);
    q.set_desc_table(GuestAddress(DESC_TABLE));
    q.set_avail_ring(GuestAddress(AVAIL));
    q.set_used_ring(GuestAddress(USED));
    let mut f = 0u64;
    if features & 1 != 0 {
        f |= 1 << VIRTIO_F_INDIRECT_DESC;
    }
    if features & 2 != 0 {
        f |= 1 << VIRTIO_F_EVENT_IDX;
    }
    q.set_features(f);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.activate(mem).expect("the layout is valid");

    // At most one pass over the ring: pop stops at avail_idx, or fails on a jump.
    for _ in 0..=size {
        match q.pop(mem) {
            Ok(Some(chain)) => {
                let mut sink = Vec::new();
                chain
                    .reader(mem)
                    .read_to_end(&mut sink)
                    .expect("readable buffers");
                assert_eq!(sink.len(), chain.readable_len());
                let mut w = chain.writer(mem);
                let mut r2 = chain.reader(mem);
                let _ = r2
                    .split_at(sink.len() / 2)
                    .iovecs(usize::MAX)
                    .expect("iovecs");
                w.write_all(&vec![0x5a; chain.writable_len()])
                    .expect("writable buffers");
                assert_eq!(w.write(&[1]).expect("full"), 0);
                q.add_used(mem, chain.head_index(), w.bytes_written() as u32)
                    .expect("used");
            }
            Ok(None) => break,
            Err(virtio::Error::InvalidChain { head, .. }) => {
                if head < size {
                    q.add_used(mem, head, 0).expect("used");
                }
            }
            Err(virtio::Error::InvalidAvailIdx { .. }) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
        let _ = q.needs_notification(mem).expect("rings are valid");
    }
    let _ = q.enable_notification(mem);
    q.disable_notification(mem).expect("rings are valid");
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
