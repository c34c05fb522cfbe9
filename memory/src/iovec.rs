//! iovecs that point straight into guest memory, for io_uring reads and writes.

use std::fmt;

use executor::{IoVecs, IoVecsMut};

use crate::{GuestAddress, GuestMemory, Result};

/// A list of guest memory ranges as host iovecs, holding a clone of the [`GuestMemory`] they
/// point into: an io_uring operation that owns this value keeps the mappings alive until the
/// kernel is done with them, even when the operation's future is dropped.
///
/// Built only from bounds-checked guest ranges (see [`GuestMemory::iovecs`]); a range that
/// crosses from one region into an adjacent one becomes two iovecs.
pub struct GuestIoVecs {
    mem: GuestMemory,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs only point into mappings owned by `mem`, which is `Send + Sync` (the
// mappings are shared memory, accessed only volatilely or by the kernel); the pointers carry
// no thread affinity.
unsafe impl Send for GuestIoVecs {}
// SAFETY: as for `Send`; `&GuestIoVecs` only exposes the pointers, never the memory.
unsafe impl Sync for GuestIoVecs {}

impl GuestIoVecs {
    /// An empty list over `mem`.
    pub fn new(mem: GuestMemory) -> GuestIoVecs {
        GuestIoVecs {
            mem,
            iovecs: Vec::new(),
        }
    }

    /// Appends `addr..addr + len`, split at region boundaries; fails, appending nothing,
    /// unless all of it is RAM. An empty range appends nothing.
    pub fn push(&mut self, addr: GuestAddress, len: usize) -> Result<()> {
        let iovecs = &mut self.iovecs;
        self.mem.host_ranges(addr, len, |ptr, n| {
            iovecs.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: n,
            })
        })
    }

    /// Number of iovecs.
    pub fn len(&self) -> usize {
        self.iovecs.len()
    }

    /// Whether there are no iovecs.
    pub fn is_empty(&self) -> bool {
        self.iovecs.is_empty()
    }

    /// Total bytes described.
    pub fn total_len(&self) -> usize {
        self.iovecs.iter().map(|v| v.iov_len).sum()
    }

    /// Keeps only the first `bytes` bytes.
    pub fn truncate(&mut self, mut bytes: usize) {
        let mut keep = 0;
        for v in &mut self.iovecs {
            if bytes == 0 {
                break;
            }
            v.iov_len = v.iov_len.min(bytes);
            bytes -= v.iov_len;
            keep += 1;
        }
        self.iovecs.truncate(keep);
    }

    /// The memory the iovecs point into.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }
}

impl fmt::Debug for GuestIoVecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iovecs.iter().map(|v| (v.iov_base as usize, v.iov_len)))
            .finish()
    }
}

// SAFETY: every iovec points into a mapping of `self.mem` (built only by `push` from
// bounds-checked ranges: `range_into_a_gap_is_rejected`), and `self.mem` keeps all of its
// mappings mapped for as long as this value lives (`dont_drop_backing_mem_read`); the iovec
// array is a Vec whose heap buffer does not move when the value moves
// and is not changed while an operation holds the value (it is owned by the operation).
unsafe impl IoVecs for GuestIoVecs {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

// SAFETY: guest memory is mapped read-write (`PROT_READ | PROT_WRITE`, see
// `region::MmapRegion::map`) and no Rust reference into it ever exists (all access is
// through `VolatileSlice`), so the kernel may write into it while the operation runs.
unsafe impl IoVecsMut for GuestIoVecs {}

#[cfg(test)]
mod tests {
    use super::*;
    use executor::{AsyncFd, Executor};

    fn memory() -> GuestMemory {
        GuestMemory::new(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .expect("memory")
    }

    #[test]
    fn range_across_adjacent_regions_splits() {
        let mem = memory();
        let iov = mem
            .iovecs(&[(GuestAddress(0x1ff0), 0x20), (GuestAddress(0x10000), 8)])
            .expect("in range");
        assert_eq!(iov.len(), 3);
        assert_eq!(iov.total_len(), 0x28);
        let lens: Vec<usize> = iov.iovecs().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [0x10, 0x10, 8]);
    }

    #[test]
    fn range_into_a_gap_is_rejected() {
        let mem = memory();
        assert!(mem.iovecs(&[(GuestAddress(0x3ff0), 0x20)]).is_err());
        assert!(mem.iovecs(&[(GuestAddress(u64::MAX), 2)]).is_err());
        let mut iov = GuestIoVecs::new(mem);
        iov.push(GuestAddress(0), 4).expect("in range");
        assert!(iov.push(GuestAddress(0x3fff), 2).is_err());
        assert_eq!(iov.len(), 1, "a failed push appends nothing");
    }

    #[test]
    fn truncate_cuts_at_a_byte_count() {
        let mem = memory();
        let mut iov = mem
            .iovecs(&[(GuestAddress(0), 10), (GuestAddress(0x100), 10)])
            .expect("in range");
        iov.truncate(15);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov.total_len(), 15);
        iov.truncate(0);
        assert!(iov.is_empty());
    }

    #[test]
    fn io_uring_reads_and_writes_guest_memory_directly() {
        let ex = Executor::new().expect("executor");
        let mem = memory();
        let file = tempfile();
        let fd = AsyncFd::new(file);
        mem.write_slice(b"hello, guest", GuestAddress(0x1ffa))
            .expect("write");
        let out = mem.iovecs(&[(GuestAddress(0x1ffa), 12)]).expect("in range");
        let (res, _) = ex.run_until(fd.write_mem_at(out, 0));
        assert_eq!(res.expect("write"), 12);
        let into = mem
            .iovecs(&[(GuestAddress(0x10000), 5), (GuestAddress(0x10100), 7)])
            .expect("in range");
        let (res, _) = ex.run_until(fd.read_mem_at(into, 0));
        assert_eq!(res.expect("read"), 12);
        let mut a = [0u8; 5];
        let mut b = [0u8; 7];
        mem.read_slice(&mut a, GuestAddress(0x10000)).expect("read");
        mem.read_slice(&mut b, GuestAddress(0x10100)).expect("read");
        assert_eq!(&a, b"hello");
        assert_eq!(&b, b", guest");
    }

    #[test]
    fn dont_drop_backing_mem_read() {
        // The op owns the iovecs (and so a memory clone): dropping every other handle while
        // the read is in flight must leave the mapping in place for the kernel.
        let ex = Executor::new().expect("executor");
        let file = tempfile();
        let fd = AsyncFd::new(file);
        let (res, _) = ex.run_until(fd.write_at(b"persist".to_vec(), 0));
        assert_eq!(res.expect("write"), 7);
        let mem = memory();
        let iov = mem.iovecs(&[(GuestAddress(0x10000), 7)]).expect("in range");
        let read = fd.read_mem_at(iov, 0);
        drop(mem);
        let (res, iov) = ex.run_until(read);
        assert_eq!(res.expect("read"), 7);
        let mut back = [0u8; 7];
        iov.memory()
            .read_slice(&mut back, GuestAddress(0x10000))
            .expect("read");
        assert_eq!(&back, b"persist");
    }

    fn tempfile() -> std::os::fd::OwnedFd {
        let path = std::env::temp_dir().join(format!(
            "memory-iovec-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        std::fs::remove_file(&path).expect("unlink");
        f.into()
    }
}
