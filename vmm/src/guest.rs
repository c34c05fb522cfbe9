//! The VMM's view of guest RAM: bounds-checked byte access for loading and for error reports,
//! and the host mappings KVM needs for its memory slots.

use std::sync::Arc;

use crate::boot::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use crate::sys::Mapping;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("cannot create guest memory")]
    Create(#[source] std::io::Error),
    #[error("guest range {addr:#x}+{len:#x} is outside RAM")]
    OutOfRange { addr: u64, len: u64 },
}

#[derive(Debug)]
struct Region {
    guest: u64,
    map: Mapping,
}

/// Guest RAM in the x86 layout (RAM below the 3 GiB MMIO hole, the rest above 4 GiB).
#[derive(Clone, Debug)]
pub struct GuestRam {
    regions: Arc<Vec<Region>>,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of memfd-backed RAM.
    pub fn new(size: u64) -> Result<GuestRam, RamError> {
        let below = size.min(MMIO_HOLE_START);
        let mut regions = vec![Region {
            guest: 0,
            map: Mapping::memfd(below).map_err(RamError::Create)?,
        }];
        if size > below {
            regions.push(Region {
                guest: MMIO_HOLE_END,
                map: Mapping::memfd(size - below).map_err(RamError::Create)?,
            });
        }
        Ok(GuestRam {
            regions: Arc::new(regions),
            size,
        })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// RAM below and above 4 GiB.
    pub fn split_at_4g(&self) -> (u64, u64) {
        let below = self.size.min(MMIO_HOLE_START);
        (below, self.size - below)
    }

    fn locate(&self, addr: u64, len: u64) -> Result<(&Region, usize), RamError> {
        let err = RamError::OutOfRange { addr, len };
        let end = addr.checked_add(len).ok_or(RamError::OutOfRange { addr, len })?;
        self.regions
            .iter()
            .find(|r| addr >= r.guest && end <= r.guest + r.map.len() as u64)
            .map(|r| (r, (addr - r.guest) as usize))
            .ok_or(err)
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), RamError> {
        let (r, off) = self.locate(addr, bytes.len() as u64)?;
        r.map.write(off, bytes);
        Ok(())
    }

    pub fn read(&self, addr: u64, bytes: &mut [u8]) -> Result<(), RamError> {
        let (r, off) = self.locate(addr, bytes.len() as u64)?;
        r.map.read(off, bytes);
        Ok(())
    }

    pub fn fill_zero(&self, addr: u64, len: u64) -> Result<(), RamError> {
        let (r, off) = self.locate(addr, len)?;
        r.map.fill(off, 0, len as usize);
        Ok(())
    }

    /// (guest address, size, host address) of each region, for KVM memory slots.
    pub fn slots(&self) -> Vec<(u64, u64, *mut u8)> {
        self.regions
            .iter()
            .map(|r| (r.guest, r.map.len() as u64, r.map.ptr()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked_and_skip_the_hole() {
        let ram = GuestRam::new(16 << 20).expect("16 MiB");
        ram.write(0x1000, b"abc").expect("in range");
        let mut b = [0u8; 3];
        ram.read(0x1000, &mut b).expect("in range");
        assert_eq!(&b, b"abc");
        assert!(ram.write((16 << 20) - 1, b"ab").is_err());
        assert!(ram.read(u64::MAX, &mut b).is_err());
        assert!(ram.fill_zero(MMIO_HOLE_START, 1).is_err());
    }
}
