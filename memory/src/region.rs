//! Host mappings of guest RAM: memfd creation and sealing, fd checks, mmap with guard pages.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

use crate::fault::{self, Guard};
use crate::{Error, GuestAddress, Result, VolatileSlice};

/// The host page size (x86_64).
pub(crate) const HOST_PAGE: usize = 4096;

/// One region of guest RAM mapped into this process: `size` bytes of `fd` from `fd_offset`,
/// shared (writes reach every other mapping of the fd), with an inaccessible guard page on
/// each side so that an access past either end faults instead of touching other memory.
#[derive(Debug)]
pub(crate) struct MmapRegion {
    fd: OwnedFd,
    fd_offset: u64,
    size: usize,
    /// Start of the whole reservation, guard pages included (what `munmap` gets).
    reservation: *mut u8,
    reservation_len: usize,
    /// First byte of the region itself.
    host: *mut u8,
    /// The registration of a received fd's mapping with the SIGBUS handler.
    guard: Option<Guard>,
}

// SAFETY: the mapping is plain shared memory owned by this value until `Drop`; nothing in it
// is tied to the creating thread, and every access to it goes through `VolatileSlice`'s
// raw-pointer operations (volatile, atomic, or a payload's memcpy), which are sound from
// several threads at once (the guest writes the same memory concurrently anyway).
unsafe impl Send for MmapRegion {}
// SAFETY: as for `Send`: `&MmapRegion` only hands out volatile views and fd borrows.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// A new memfd of `size` bytes, sealed against shrinking and growing, and mapped.
    pub(crate) fn create(addr: GuestAddress, size: usize) -> Result<MmapRegion> {
        let name: &CStr = c"ringvm-guest-ram";
        // SAFETY: plain syscall with a valid NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(Error::CreateMemfd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just created by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(size).map_err(|_| Error::RegionOverflow {
            addr,
            size: size as u64,
        })?;
        // SAFETY: plain syscall on an fd we own; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
            return Err(Error::SetSize(io::Error::last_os_error()));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: plain syscall on an fd we own; the result is checked.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(Error::Seal(io::Error::last_os_error()));
        }
        Self::map(addr, fd, 0, size)
    }

    /// Maps `size` bytes of a received `fd` from `fd_offset` (any offset, page-aligned or
    /// not), after checking that the fd holds them (a mapping past the end of a file would
    /// raise SIGBUS on access instead of an error).
    pub(crate) fn from_fd(
        addr: GuestAddress,
        fd: OwnedFd,
        fd_offset: u64,
        size: usize,
    ) -> Result<MmapRegion> {
        let needed = fd_offset
            .checked_add(size as u64)
            .ok_or(Error::RegionOverflow {
                addr,
                size: size as u64,
            })?;
        let actual = fd_size(fd.as_fd()).map_err(|e| Error::Fstat(addr, e))?;
        if actual < needed {
            return Err(Error::FdTooSmall {
                addr,
                needed,
                actual,
            });
        }
        let mut region = Self::map(addr, fd, fd_offset, size)?;
        // The sender may shrink the file later: a fault in this mapping is survived.
        let mapping = region.host as usize - (fd_offset % HOST_PAGE as u64) as usize;
        region.guard = fault::guard(mapping, region.reservation_len - 2 * HOST_PAGE)?;
        Ok(region)
    }

    fn map(addr: GuestAddress, fd: OwnedFd, fd_offset: u64, size: usize) -> Result<MmapRegion> {
        let overflow = || Error::RegionOverflow {
            addr,
            size: size as u64,
        };
        // mmap needs a page-aligned file offset: map from the page below and skip `delta`.
        let delta = (fd_offset % HOST_PAGE as u64) as usize;
        let map_offset = libc::off_t::try_from(fd_offset - delta as u64).map_err(|_| overflow())?;
        let map_len = size
            .checked_add(delta)
            .and_then(|n| n.checked_next_multiple_of(HOST_PAGE))
            .ok_or_else(overflow)?;
        let reservation_len = map_len.checked_add(2 * HOST_PAGE).ok_or_else(overflow)?;
        // SAFETY: an anonymous PROT_NONE reservation at an address of the kernel's choosing
        // touches no existing mapping; the result is checked.
        let reservation = unsafe {
            libc::mmap(
                ptr::null_mut(),
                reservation_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reservation == libc::MAP_FAILED {
            return Err(Error::Mmap(addr, io::Error::last_os_error()));
        }
        let reservation = reservation.cast::<u8>();
        // SAFETY: `HOST_PAGE < reservation_len`, inside the reservation just made.
        let inner = unsafe { reservation.add(HOST_PAGE) };
        // SAFETY: MAP_FIXED replaces only pages of our own reservation (`inner..inner +
        // map_len` lies inside it, one guard page left on each side:
        // `guard_pages_surround_each_region`); the fd is ours to map.
        let mapped = unsafe {
            libc::mmap(
                inner.cast(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                map_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: unmaps exactly the reservation made above, which nothing else uses.
            unsafe { libc::munmap(reservation.cast(), reservation_len) };
            return Err(Error::Mmap(addr, err));
        }
        Ok(MmapRegion {
            fd,
            fd_offset,
            size,
            reservation,
            reservation_len,
            // SAFETY: `delta < HOST_PAGE <= map_len`, inside the mapping.
            host: unsafe { inner.add(delta) },
            guard: None,
        })
    }

    /// The whole region as a volatile view.
    #[inline]
    pub(crate) fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        // SAFETY: `host..host + size` is mapped read-write until `Drop`, which cannot run
        // while `&self` is borrowed; no Rust reference into it is ever created.
        unsafe { VolatileSlice::new(self.host, self.size) }
    }

    /// The backing fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Offset of the region's first byte in the fd.
    pub(crate) fn fd_offset(&self) -> u64 {
        self.fd_offset
    }

    /// The current size of the backing file (a peer may have resized it since `from_fd`).
    pub(crate) fn file_size(&self) -> io::Result<u64> {
        fd_size(self.fd.as_fd())
    }

    /// Host address of the first byte (for vhost-user's `userspace_addr`).
    pub(crate) fn host_addr(&self) -> u64 {
        self.host as u64
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // No longer the SIGBUS handler's to repair once it is unmapped.
        drop(self.guard.take());
        // SAFETY: unmaps exactly the reservation made in `map` (mapping and guard pages);
        // every `VolatileSlice` into it borrowed `self` and is gone, and `GuestIoVecs` keep
        // the owning `GuestMemory` (and so this value) alive while the kernel uses them
        // (`iovec::tests::dont_drop_backing_mem_read`).
        unsafe { libc::munmap(self.reservation.cast(), self.reservation_len) };
    }
}

/// Size of the file behind `fd`.
fn fd_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into the buffer we pass; the result is checked
    // before the buffer is read.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    Ok(st.st_size.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_memfd_is_sealed_against_resizing() {
        let r = MmapRegion::create(GuestAddress(0), 2 * HOST_PAGE).expect("create");
        // SAFETY: plain syscall on an fd the region owns.
        let shrink = unsafe { libc::ftruncate(r.fd().as_raw_fd(), HOST_PAGE as libc::off_t) };
        assert!(shrink < 0);
        // SAFETY: as above.
        let grow = unsafe { libc::ftruncate(r.fd().as_raw_fd(), 4 * HOST_PAGE as libc::off_t) };
        assert!(grow < 0);
    }

    /// Whether this process can read one byte at `addr` (process_vm_readv on ourselves
    /// reports EFAULT instead of faulting).
    fn readable(addr: usize) -> bool {
        let mut byte = 0u8;
        let local = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: the kernel writes at most one byte into `byte`, which outlives the call,
        // and checks the remote address itself.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == 1
    }

    #[test]
    fn guard_pages_surround_each_region() {
        let r = MmapRegion::create(GuestAddress(0), 2 * HOST_PAGE).expect("create");
        let start = r.host_addr() as usize;
        assert!(readable(start));
        assert!(readable(start + 2 * HOST_PAGE - 1));
        assert!(!readable(start - 1), "guard page below");
        assert!(!readable(start + 2 * HOST_PAGE), "guard page above");
    }

    #[test]
    fn unaligned_fd_offset_maps_the_right_bytes() {
        let a = MmapRegion::create(GuestAddress(0), 2 * HOST_PAGE).expect("create");
        a.as_volatile_slice()
            .write_obj(0xdead_beefu32, HOST_PAGE + 12)
            .expect("in range");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let b = MmapRegion::from_fd(GuestAddress(0), fd, HOST_PAGE as u64 + 12, 100)
            .expect("map received fd");
        assert_eq!(b.as_volatile_slice().read_obj::<u32>(0), Some(0xdead_beef));
    }

    #[test]
    fn fd_smaller_than_region_is_rejected() {
        let a = MmapRegion::create(GuestAddress(0), HOST_PAGE).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let err = MmapRegion::from_fd(GuestAddress(0x1000), fd, 1, HOST_PAGE).unwrap_err();
        assert!(matches!(
            err,
            Error::FdTooSmall {
                needed: 4097,
                actual: 4096,
                ..
            }
        ));
    }

    #[test]
    fn wrapping_fd_range_is_rejected() {
        let a = MmapRegion::create(GuestAddress(0), HOST_PAGE).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let err = MmapRegion::from_fd(GuestAddress(0), fd, u64::MAX, HOST_PAGE).unwrap_err();
        assert!(matches!(err, Error::RegionOverflow { .. }));
    }
}
