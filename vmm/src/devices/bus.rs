//! Routes port I/O and MMIO exits to devices by address range.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device or is empty")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Overlap> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let clash = |r: &Range| base < r.base + r.len && r.base < base + len;
        if end.is_none() || self.ranges.iter().any(clash) {
            return Err(Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        let off = addr - r.base;
        (off + size as u64 <= r.len).then_some((r, off))
    }

    /// Reads from the device at `addr`; returns false (and leaves `data` as all ones, like an
    /// empty ISA bus) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x3f8, 8)
            .expect("free");
        bus.insert(Arc::new(Mutex::new(Reg(20))), 0x70, 2)
            .expect("free");
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x3fc, 8).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x10, 0).is_err());
        let mut b = [0u8];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.write(0x71, &[5]));
        assert!(bus.read(0x70, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b[0], 0xff);
        // An access running past the end of a range is not routed.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
    }
}
