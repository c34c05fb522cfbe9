//! Fuzzes a restarted device's reading of its inflight region (vhost-user inflight I/O
//! tracking): the region is shared memory the dead process could have written anything to.
//!
//! Invariants: `recover` never panics and never reads or writes outside the region; when it
//! accepts the region, the chains it gives back to submit again are heads of the queue, each
//! at most once, no more than the available ring holds past the used index, and the index to
//! pop from next is the used index plus their count. A second `recover` of what the first
//! left accepts it too (when the indices are possible).
//!
//! Input layout: [queue size selector, used_idx (2), avail_idx (2), then the region's bytes].

#![no_main]

use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};
use virtio::queue::inflight::{queue_region_size, InflightRing};

const SIZES: [u16; 6] = [1, 2, 16, 64, 128, 256];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((idx, bytes)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let size = SIZES[usize::from(sel) % SIZES.len()];
    let used_idx = u16::from_le_bytes([idx[0], idx[1]]);
    let avail_idx = u16::from_le_bytes([idx[2], idx[3]]);
    let len = queue_region_size(size);
    // Regions are whole pages; the queue's part is at the start.
    let mem = GuestMemory::new(&[(GuestAddress(0), len.next_multiple_of(4096))]).expect("memory");
    let n = bytes.len().min(len as usize);
    mem.write_slice(&bytes[..n], GuestAddress(0))
        .expect("write");
    let mut ring = InflightRing::new(mem.clone(), GuestAddress(0), size);
    let Ok(next) = ring.recover(used_idx, avail_idx) else {
        return;
    };
    let mut heads = Vec::new();
    while let Some(h) = ring.next_resubmit() {
        assert!(h < size, "head {h} on a queue of {size}");
        assert!(!heads.contains(&h), "head {h} given back twice");
        heads.push(h);
    }
    let count = heads.len() as u16;
    assert!(
        count <= avail_idx.wrapping_sub(used_idx),
        "more in flight than pending"
    );
    assert_eq!(next, used_idx.wrapping_add(count));
    // What the first recovery left (a fresh region set up, the last batch settled) is a
    // region a second one takes, when the rings' indices are possible (a driver has at most
    // a queue's worth of chains past the used index).
    if avail_idx.wrapping_sub(used_idx) <= size {
        let mut again = InflightRing::new(mem, GuestAddress(0), size);
        assert!(again.recover(used_idx, avail_idx).is_ok());
    }
});
