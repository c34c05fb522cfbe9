//! The VMM's view of guest RAM: the memory crate's `GuestMemory` in the x86 layout, plus what
//! boot loading, error reports and KVM memory slots need.

use memory::{GuestAddress, GuestMemory};

use crate::boot::layout::MMIO_HOLE_START;

pub use memory::Error as RamError;

/// Guest RAM in the x86 layout (RAM below the 3 GiB MMIO hole, the rest above 4 GiB).
#[derive(Clone, Debug)]
pub struct GuestRam {
    mem: GuestMemory,
}

impl GuestRam {
    /// `size` bytes of memfd-backed RAM.
    pub fn new(size: u64) -> Result<GuestRam, RamError> {
        Ok(GuestRam {
            mem: GuestMemory::new_x86(size)?,
        })
    }

    /// The shared guest memory (for virtqueues and device processes).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.total_size()
    }

    /// RAM below and above 4 GiB.
    pub fn split_at_4g(&self) -> (u64, u64) {
        let below = self.size().min(MMIO_HOLE_START);
        (below, self.size() - below)
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), RamError> {
        self.mem.write_slice(bytes, GuestAddress(addr))
    }

    pub fn read(&self, addr: u64, bytes: &mut [u8]) -> Result<(), RamError> {
        self.mem.read_slice(bytes, GuestAddress(addr))
    }

    pub fn fill_zero(&self, addr: u64, len: u64) -> Result<(), RamError> {
        let len = usize::try_from(len).map_err(|_| RamError::OutOfBounds {
            addr: GuestAddress(addr),
            len,
        })?;
        self.mem.fill(GuestAddress(addr), len, 0)
    }

    /// (guest address, size, host address) of each region, for KVM memory slots. The memory
    /// was created in this process, so `user_addr` is its mapping here.
    pub fn slots(&self) -> Vec<(u64, u64, *mut u8)> {
        self.mem
            .regions()
            .map(|r| (r.guest_addr.0, r.size, r.user_addr as *mut u8))
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
        assert_eq!(ram.slots().len(), 1);
    }
}
