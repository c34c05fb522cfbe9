//! A page of counters shared between two processes: a sealed memfd the VMM creates and a
//! device process maps from the descriptor it inherits. One side writes, the other reads;
//! every access is a plain atomic (no system call), so counting costs the data path a load
//! and a store.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use crate::region::MmapRegion;
use crate::{Error, GuestAddress, Result};

/// `len` 64-bit counters in shared memory.
#[derive(Debug)]
pub struct SharedCounters {
    region: MmapRegion,
    len: usize,
}

impl SharedCounters {
    /// A new sealed memfd holding `len` zeroed counters, mapped.
    pub fn create(len: usize) -> Result<SharedCounters> {
        let size = bytes(len)?;
        Ok(SharedCounters {
            region: MmapRegion::create(GuestAddress(0), size)?,
            len,
        })
    }

    /// Maps `len` counters of a received memfd (refused if the file is smaller).
    pub fn from_fd(fd: OwnedFd, len: usize) -> Result<SharedCounters> {
        let size = bytes(len)?;
        Ok(SharedCounters {
            region: MmapRegion::from_fd(GuestAddress(0), fd, 0, size)?,
            len,
        })
    }

    /// The memfd, to pass to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    /// The counters.
    pub fn as_slice(&self) -> &[AtomicU64] {
        let ptr = self.region.as_volatile_slice().as_ptr();
        // SAFETY: the mapping starts page-aligned (so 8-byte aligned: `map` is called with
        // fd offset 0), is read-write and holds `len * 8` bytes (`bytes`), and lives until
        // `self` drops, which the returned borrow outlives not. `AtomicU64` has the layout of
        // `u64`, and every access through it is atomic, which is sound while the other
        // process writes the same memory (it only ever changes the values, never the
        // mapping: the memfd is sealed against shrinking). Tested by
        // `counters_written_through_one_mapping_are_read_through_another`.
        unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), self.len) }
    }
}

fn bytes(len: usize) -> Result<usize> {
    len.checked_mul(8)
        .filter(|&n| n > 0)
        .map(|n| n.next_multiple_of(crate::region::HOST_PAGE))
        .ok_or(Error::EmptyRegion(GuestAddress(0)))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn counters_written_through_one_mapping_are_read_through_another() {
        let a = SharedCounters::create(512).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let b = SharedCounters::from_fd(fd, 512).expect("map");
        a.as_slice()[0].store(7, Ordering::Relaxed);
        a.as_slice()[511].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(b.as_slice()[0].load(Ordering::Relaxed), 7);
        assert_eq!(b.as_slice()[511].load(Ordering::Relaxed), u64::MAX);
        assert_eq!(b.as_slice().len(), 512);
        assert!(b.fd().as_fd().try_clone_to_owned().is_ok());
    }

    #[test]
    fn a_file_too_small_is_refused() {
        let a = SharedCounters::create(8).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        assert!(SharedCounters::from_fd(fd, 1024).is_err());
        assert!(SharedCounters::create(0).is_err());
    }
}
