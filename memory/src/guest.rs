//! The guest's RAM: a set of mapped regions at guest physical addresses.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::region::{MmapRegion, HOST_PAGE};
use crate::{ByteValued, Error, GuestAddress, GuestIoVecs, Result, VolatileSlice};

/// Guest page size: region starts and sizes created here are multiples of it.
pub const PAGE_SIZE: u64 = HOST_PAGE as u64;
/// Start of the x86 MMIO hole below 4 GiB (PCI BARs, IOAPIC, LAPIC): no RAM there.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the x86 MMIO hole: RAM past 3 GiB continues here.
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// The x86 layout of `size` bytes of RAM: up to 3 GiB from address 0, the rest from 4 GiB.
pub fn x86_layout(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut layout = vec![(GuestAddress(0), low)];
    if size > low {
        layout.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    layout
}

/// A region received from elsewhere (vhost-user `SET_MEM_TABLE`), to be mapped by
/// [`GuestMemory::from_regions`].
#[derive(Debug)]
pub struct RegionFd {
    /// The fd holding the region's memory.
    pub fd: OwnedFd,
    /// Offset of the region's first byte in `fd` (vhost-user `mmap_offset`).
    pub fd_offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Guest physical address of the first byte.
    pub guest_addr: GuestAddress,
    /// The sender's host address of the first byte (vhost-user `userspace_addr`), which
    /// vring addresses are given in; see [`GuestMemory::user_to_guest`].
    pub user_addr: u64,
}

/// A region as it is described to another process (the fields of vhost-user
/// `SET_MEM_TABLE`).
#[derive(Clone, Copy, Debug)]
pub struct RegionInfo<'a> {
    /// Guest physical address of the first byte.
    pub guest_addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
    /// The fd holding the region's memory.
    pub fd: BorrowedFd<'a>,
    /// Offset of the region's first byte in `fd`.
    pub fd_offset: u64,
    /// Host address of the first byte in the process that created the memory.
    pub user_addr: u64,
}

impl RegionInfo<'_> {
    /// The same region with a duplicate of its fd: what a process that receives this
    /// region (over vhost-user, or an in-process device in tests) passes to
    /// [`GuestMemory::from_regions`].
    pub fn to_region_fd(&self) -> std::io::Result<RegionFd> {
        Ok(RegionFd {
            fd: self.fd.try_clone_to_owned()?,
            fd_offset: self.fd_offset,
            size: self.size,
            guest_addr: self.guest_addr,
            user_addr: self.user_addr,
        })
    }
}

#[derive(Debug)]
struct GuestRegion {
    start: u64,
    /// One past the last byte (no region reaches 2^64: checked at creation).
    end: u64,
    user_addr: u64,
    mmap: MmapRegion,
}

/// The guest's RAM. A cheap clone (an `Arc` of the regions): every clone keeps every mapping
/// alive, so handing one to an in-flight io_uring operation keeps its buffers valid.
///
/// Every access is bounds-checked and fails with an error outside RAM: accesses may span
/// regions that are adjacent in guest address space, never a gap (the MMIO hole).
#[derive(Clone, Debug)]
pub struct GuestMemory {
    regions: Arc<[GuestRegion]>,
}

/// Checks that `(start, size)` ranges are non-empty, do not wrap, fit `usize`, and do not
/// overlap; returns them sorted by start.
fn check_layout(mut ranges: Vec<(GuestAddress, u64)>) -> Result<Vec<(GuestAddress, u64)>> {
    if ranges.is_empty() {
        return Err(Error::NoRegions);
    }
    for &(addr, size) in &ranges {
        if size == 0 {
            return Err(Error::EmptyRegion(addr));
        }
        if addr.checked_add(size).is_none() || usize::try_from(size).is_err() {
            return Err(Error::RegionOverflow { addr, size });
        }
    }
    ranges.sort_by_key(|&(addr, _)| addr);
    for pair in ranges.windows(2) {
        let (a, a_size) = pair[0];
        let (b, _) = pair[1];
        if a.0 + a_size > b.0 {
            return Err(Error::Overlap(a, b));
        }
    }
    Ok(ranges)
}

impl GuestMemory {
    /// New, zeroed guest RAM: one sealed memfd per `(guest address, size)` range, each
    /// page-aligned, none overlapping.
    pub fn new(layout: &[(GuestAddress, u64)]) -> Result<GuestMemory> {
        let layout = check_layout(layout.to_vec())?;
        let mut regions = Vec::with_capacity(layout.len());
        for (addr, size) in layout {
            if !addr.is_aligned(PAGE_SIZE) || size % PAGE_SIZE != 0 {
                return Err(Error::UnalignedRegion { addr, size });
            }
            // `check_layout` checked that `size` fits usize.
            let mmap = MmapRegion::create(addr, size as usize)?;
            regions.push(GuestRegion {
                start: addr.0,
                end: addr.0 + size,
                user_addr: mmap.host_addr(),
                mmap,
            });
        }
        Ok(GuestMemory {
            regions: regions.into(),
        })
    }

    /// New, zeroed guest RAM of `size` bytes in the [`x86_layout`].
    pub fn new_x86(size: u64) -> Result<GuestMemory> {
        GuestMemory::new(&x86_layout(size))
    }

    /// Guest RAM mapped from received fds (a device process, on vhost-user
    /// `SET_MEM_TABLE`). Fails, mapping nothing, on overlapping or wrapping regions and on
    /// fds too small for their region.
    pub fn from_regions(regions: Vec<RegionFd>) -> Result<GuestMemory> {
        let ranges = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
        check_layout(ranges)?;
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            // `check_layout` checked that the size fits usize.
            let mmap = MmapRegion::from_fd(r.guest_addr, r.fd, r.fd_offset, r.size as usize)?;
            mapped.push(GuestRegion {
                start: r.guest_addr.0,
                end: r.guest_addr.0 + r.size,
                user_addr: r.user_addr,
                mmap,
            });
        }
        mapped.sort_by_key(|r| r.start);
        Ok(GuestMemory {
            regions: mapped.into(),
        })
    }

    /// Checks that every region's file still holds the region ([`Error::FdTooSmall`] names
    /// the first that does not): a peer that sent the fd may have shrunk it since it was
    /// mapped (see [`crate::fault`]).
    pub fn check_backing(&self) -> Result<()> {
        for r in self.regions.iter() {
            let addr = GuestAddress(r.start);
            let actual = r.mmap.file_size().map_err(|e| Error::Fstat(addr, e))?;
            let needed = r.mmap.fd_offset() + (r.end - r.start);
            if actual < needed {
                return Err(Error::FdTooSmall {
                    addr,
                    needed,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// The regions, by guest address, as vhost-user `SET_MEM_TABLE` describes them.
    pub fn regions(&self) -> impl Iterator<Item = RegionInfo<'_>> {
        self.regions.iter().map(|r| RegionInfo {
            guest_addr: GuestAddress(r.start),
            size: r.end - r.start,
            fd: r.mmap.fd(),
            fd_offset: r.mmap.fd_offset(),
            user_addr: r.user_addr,
        })
    }

    /// Number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Total bytes of RAM.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.end - r.start).sum()
    }

    /// One past the highest guest address of RAM.
    pub fn end_addr(&self) -> GuestAddress {
        GuestAddress(self.regions.iter().map(|r| r.end).max().unwrap_or(0))
    }

    /// Whether two handles share the same mappings.
    pub fn ptr_eq(&self, other: &GuestMemory) -> bool {
        Arc::ptr_eq(&self.regions, &other.regions)
    }

    /// The guest address of a host address in the creating process's space (vhost-user
    /// vring addresses), if it falls inside a region.
    pub fn user_to_guest(&self, user_addr: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let off = user_addr.checked_sub(r.user_addr)?;
            // Lazily: `r.start + off` overflows for an `off` past the region.
            (off < r.end - r.start).then(|| GuestAddress(r.start + off))
        })
    }

    #[inline]
    fn region_index(&self, addr: GuestAddress) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| addr.0 >= r.start && addr.0 < r.end)
    }

    /// Whether `addr` is RAM.
    #[inline]
    pub fn address_in_range(&self, addr: GuestAddress) -> bool {
        self.region_index(addr).is_some()
    }

    /// Whether all of `addr..addr + len` is RAM (possibly across adjacent regions). An empty
    /// range is in range anywhere.
    #[inline]
    pub fn check_range(&self, addr: GuestAddress, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        // Fast path: all of it in the region holding `addr`.
        if let Some(i) = self.region_index(addr) {
            if len <= self.regions[i].end - addr.0 {
                return true;
            }
        }
        self.range_regions(addr, len).is_ok()
    }

    /// Checks `addr..addr + len`; returns the index of the region holding `addr` and whether
    /// the range runs on into following (adjacent) regions.
    fn range_regions(&self, addr: GuestAddress, len: u64) -> Result<Option<(usize, bool)>> {
        if len == 0 {
            return Ok(None);
        }
        let oob = Error::OutOfBounds { addr, len };
        let last = addr.0.checked_add(len - 1).ok_or(oob)?;
        let first = self
            .region_index(addr)
            .ok_or(Error::OutOfBounds { addr, len })?;
        let mut end = self.regions[first].end;
        let mut i = first;
        while last >= end {
            i += 1;
            match self.regions.get(i) {
                Some(r) if r.start == end => end = r.end,
                _ => return Err(Error::OutOfBounds { addr, len }),
            }
        }
        Ok(Some((first, i > first)))
    }

    /// A volatile view of `addr..addr + len`, which must lie inside one region (contiguous in
    /// host memory).
    #[inline]
    pub fn get_slice(&self, addr: GuestAddress, len: usize) -> Result<VolatileSlice<'_>> {
        let oob = || Error::OutOfBounds {
            addr,
            len: len as u64,
        };
        let r = &self.regions[self.region_index(addr).ok_or_else(oob)?];
        r.mmap
            .as_volatile_slice()
            .subslice((addr.0 - r.start) as usize, len)
            .ok_or_else(oob)
    }

    /// Calls `f(offset, slice)` for the pieces of `addr..addr + len` in each region, after
    /// checking that all of it is RAM (so nothing is touched when any of it is not).
    fn for_each_slice(
        &self,
        addr: GuestAddress,
        len: usize,
        mut f: impl FnMut(usize, VolatileSlice<'_>),
    ) -> Result<()> {
        let Some((first, spans)) = self.range_regions(addr, len as u64)? else {
            return Ok(());
        };
        let r = &self.regions[first];
        let off = (addr.0 - r.start) as usize;
        let whole = r.mmap.as_volatile_slice();
        if !spans {
            // `range_regions` checked the range lies inside region `first`.
            if let Some(s) = whole.subslice(off, len) {
                f(0, s);
            }
            return Ok(());
        }
        let mut done = 0;
        for r in &self.regions[first..] {
            if done == len {
                break;
            }
            let start = if done == 0 { off } else { 0 };
            let whole = r.mmap.as_volatile_slice();
            let take = (whole.len() - start).min(len - done);
            if let Some(s) = whole.subslice(start, take) {
                f(done, s);
            }
            done += take;
        }
        Ok(())
    }

    /// Splits `addr..addr + len` into host pieces, one per region it touches, after checking
    /// all of it is RAM.
    pub(crate) fn host_ranges(
        &self,
        addr: GuestAddress,
        len: usize,
        mut f: impl FnMut(*mut u8, usize),
    ) -> Result<()> {
        self.for_each_slice(addr, len, |_, s| f(s.as_ptr(), s.len()))
    }

    /// Fills `buf` from guest memory at `addr`.
    pub fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<()> {
        self.for_each_slice(addr, buf.len(), |off, s| {
            s.copy_to(&mut buf[off..off + s.len()]);
        })
    }

    /// Writes `buf` to guest memory at `addr`.
    pub fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<()> {
        self.for_each_slice(addr, buf.len(), |off, s| {
            s.copy_from(&buf[off..off + s.len()]);
        })
    }

    /// Sets `len` bytes at `addr` to `byte`.
    pub fn fill(&self, addr: GuestAddress, len: usize, byte: u8) -> Result<()> {
        self.for_each_slice(addr, len, |_, s| s.fill(byte))
    }

    /// Reads a `T` at `addr` (native byte order; virtio structures are little-endian).
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Result<T> {
        if let Ok(s) = self.get_slice(addr, size_of::<T>()) {
            if let Some(v) = s.read_obj(0) {
                return Ok(v);
            }
        }
        let mut v = T::zeroed();
        self.read_slice(v.as_bytes_mut(), addr)?;
        Ok(v)
    }

    /// Writes `val` at `addr` (native byte order).
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, val: T, addr: GuestAddress) -> Result<()> {
        if let Ok(s) = self.get_slice(addr, size_of::<T>()) {
            if s.write_obj(val, 0).is_some() {
                return Ok(());
            }
        }
        self.write_slice(val.as_bytes(), addr)
    }

    #[inline]
    fn atomic_slice(&self, addr: GuestAddress, size: usize) -> Result<VolatileSlice<'_>> {
        if !addr.is_aligned(size as u64) {
            return Err(Error::Misaligned { addr, align: size });
        }
        self.get_slice(addr, size)
    }

    /// Atomic load of the u16 at `addr` (native byte order), which must be 2-aligned: ring
    /// indices, with `Acquire` to order the reads of what they publish.
    #[inline]
    pub fn load_u16(&self, addr: GuestAddress, order: Ordering) -> Result<u16> {
        self.atomic_slice(addr, 2)?
            .load_u16(0, order)
            .ok_or(Error::Misaligned { addr, align: 2 })
    }

    /// Atomic store of a u16 at `addr` (native byte order), which must be 2-aligned: ring
    /// indices, with `Release` to publish the writes before them.
    #[inline]
    pub fn store_u16(&self, addr: GuestAddress, val: u16, order: Ordering) -> Result<()> {
        self.atomic_slice(addr, 2)?
            .store_u16(0, val, order)
            .ok_or(Error::Misaligned { addr, align: 2 })
    }

    /// Atomic load of the u32 at `addr` (native byte order), which must be 4-aligned.
    #[inline]
    pub fn load_u32(&self, addr: GuestAddress, order: Ordering) -> Result<u32> {
        self.atomic_slice(addr, 4)?
            .load_u32(0, order)
            .ok_or(Error::Misaligned { addr, align: 4 })
    }

    /// Atomic store of a u32 at `addr` (native byte order), which must be 4-aligned.
    #[inline]
    pub fn store_u32(&self, addr: GuestAddress, val: u32, order: Ordering) -> Result<()> {
        self.atomic_slice(addr, 4)?
            .store_u32(0, val, order)
            .ok_or(Error::Misaligned { addr, align: 4 })
    }

    /// iovecs for io_uring pointing straight at the guest ranges `(addr, len)`, in order,
    /// split where a range crosses from one region into the next; fails if any range is not
    /// all RAM. The result keeps this memory alive.
    pub fn iovecs(&self, ranges: &[(GuestAddress, usize)]) -> Result<GuestIoVecs> {
        let mut iov = GuestIoVecs::new(self.clone());
        for &(addr, len) in ranges {
            iov.push(addr, len)?;
        }
        Ok(iov)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn x86_layout_skips_the_mmio_hole() {
        assert_eq!(x86_layout(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(
            x86_layout(4096 * MIB),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(MMIO_HOLE_END), 4096 * MIB - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn access_across_the_mmio_hole_fails() {
        // 3 GiB + 1 MiB, reserved but only touched near the hole.
        let mem = GuestMemory::new_x86(MMIO_HOLE_START + MIB).expect("memory");
        assert_eq!(mem.num_regions(), 2);
        let below = GuestAddress(MMIO_HOLE_START - 4);
        assert!(mem.write_obj(1u32, below).is_ok());
        assert!(matches!(
            mem.write_obj(1u64, below),
            Err(Error::OutOfBounds { len: 8, .. })
        ));
        assert!(mem.read_obj::<u8>(GuestAddress(MMIO_HOLE_START)).is_err());
        assert!(mem.read_obj::<u8>(GuestAddress(MMIO_HOLE_END)).is_ok());
        assert!(mem
            .read_obj::<u8>(GuestAddress(MMIO_HOLE_END + MIB))
            .is_err());
        assert_eq!(mem.end_addr(), GuestAddress(MMIO_HOLE_END + MIB));
        assert_eq!(mem.total_size(), MMIO_HOLE_START + MIB);
    }

    #[test]
    fn access_spans_adjacent_regions() {
        let mem = GuestMemory::new(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .expect("memory");
        let data: Vec<u8> = (0..64).collect();
        mem.write_slice(&data, GuestAddress(0x1fe0)).expect("spans");
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(0x1fe0))
            .expect("spans");
        assert_eq!(&back[..], &data[..]);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1ffc)).expect("spans"),
            u64::from_ne_bytes([28, 29, 30, 31, 32, 33, 34, 35])
        );
        assert!(mem.get_slice(GuestAddress(0x1ffc), 8).is_err());
        assert!(mem.check_range(GuestAddress(0x1000), 0x2000));
        assert!(!mem.check_range(GuestAddress(0x1000), 0x2001));
    }

    #[test]
    fn wrapping_range_is_out_of_bounds() {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x1000)]).expect("memory");
        let mut buf = [0u8; 16];
        assert!(mem
            .read_slice(&mut buf, GuestAddress(u64::MAX - 4))
            .is_err());
        assert!(!mem.check_range(GuestAddress(8), u64::MAX));
    }

    #[test]
    fn layout_errors_are_reported() {
        assert!(matches!(GuestMemory::new(&[]), Err(Error::NoRegions)));
        assert!(matches!(
            GuestMemory::new(&[(GuestAddress(0), 0)]),
            Err(Error::EmptyRegion(_))
        ));
        assert!(matches!(
            GuestMemory::new(&[(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 0x1000)]),
            Err(Error::Overlap(_, _))
        ));
        assert!(matches!(
            GuestMemory::new(&[(GuestAddress(0x800), 0x1000)]),
            Err(Error::UnalignedRegion { .. })
        ));
        assert!(matches!(
            GuestMemory::new(&[(GuestAddress(u64::MAX - 0xfff), 0x1000)]),
            Err(Error::RegionOverflow { .. })
        ));
    }

    #[test]
    fn atomics_check_alignment() {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x1000)]).expect("memory");
        mem.store_u16(GuestAddress(2), 0xabcd, Ordering::Release)
            .expect("aligned");
        assert_eq!(
            mem.load_u16(GuestAddress(2), Ordering::Acquire)
                .expect("ok"),
            0xabcd
        );
        assert!(matches!(
            mem.load_u16(GuestAddress(3), Ordering::Acquire),
            Err(Error::Misaligned { align: 2, .. })
        ));
        assert!(matches!(
            mem.load_u32(GuestAddress(0x1000), Ordering::Acquire),
            Err(Error::OutOfBounds { .. })
        ));
        mem.store_u32(GuestAddress(8), 5, Ordering::Release)
            .expect("aligned");
        assert_eq!(
            mem.load_u32(GuestAddress(8), Ordering::Acquire).ok(),
            Some(5)
        );
    }

    fn received(mem: &GuestMemory) -> Vec<RegionFd> {
        mem.regions()
            .map(|r| r.to_region_fd().expect("dup"))
            .collect()
    }

    #[test]
    fn device_side_memory_shares_pages_with_the_vmm() {
        let vmm = GuestMemory::new(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10_0000), 0x2000)])
            .expect("memory");
        let dev = GuestMemory::from_regions(received(&vmm)).expect("device memory");
        vmm.write_obj(0x55aa_u16, GuestAddress(0x10_0010))
            .expect("write");
        assert_eq!(
            dev.read_obj::<u16>(GuestAddress(0x10_0010)).expect("read"),
            0x55aa
        );
        dev.write_obj(7u8, GuestAddress(0x3fff)).expect("write");
        assert_eq!(vmm.read_obj::<u8>(GuestAddress(0x3fff)).expect("read"), 7);
        // vring addresses come in the VMM's host address space.
        let user = vmm.regions().nth(1).expect("two regions").user_addr;
        assert_eq!(
            dev.user_to_guest(user + 0x10),
            Some(GuestAddress(0x10_0010))
        );
        assert_eq!(dev.user_to_guest(user + 0x2000), None);
    }

    #[test]
    fn user_addresses_far_past_a_high_region_are_not_translated() {
        // Found by the vhost_user_request fuzz target: the guest address was computed before
        // the bounds check, and overflowed.
        let mem = GuestMemory::new(&[(GuestAddress(u64::MAX - 0x1fff), 0x1000)]).expect("memory");
        assert_eq!(mem.user_to_guest(u64::MAX), None);
    }

    #[test]
    fn received_overlapping_regions_are_rejected() {
        let vmm = GuestMemory::new(&[(GuestAddress(0), 0x2000)]).expect("memory");
        let mut regions = received(&vmm);
        regions.extend(received(&vmm));
        regions[1].guest_addr = GuestAddress(0x1000);
        assert!(matches!(
            GuestMemory::from_regions(regions),
            Err(Error::Overlap(_, _))
        ));
    }

    #[test]
    fn received_region_larger_than_its_fd_is_rejected() {
        let vmm = GuestMemory::new(&[(GuestAddress(0), 0x2000)]).expect("memory");
        let mut regions = received(&vmm);
        regions[0].size = 0x3000;
        assert!(matches!(
            GuestMemory::from_regions(regions),
            Err(Error::FdTooSmall { .. })
        ));
    }

    #[test]
    fn clone_keeps_mappings_alive() {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x1000)]).expect("memory");
        let clone = mem.clone();
        mem.write_obj(9u32, GuestAddress(0)).expect("write");
        drop(mem);
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0)).expect("read"), 9);
    }
}
