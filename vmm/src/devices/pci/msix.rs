//! MSI-X: the capability (enable and function mask in its message control) and the vector
//! table and pending bit array, which live in a BAR.

use super::config::PciConfig;
use crate::irq::MsiMessage;

pub const CAP_ID: u8 = 0x11;
/// "No vector" in virtio's vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// The architectural maximum table size.
pub const MAX_VECTORS: usize = 2048;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    /// Reset state: every vector masked.
    fn default() -> Self {
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

pub struct Msix {
    entries: Vec<Entry>,
    /// Offset of the capability in config space.
    cap: usize,
}

impl Msix {
    /// Adds the capability for `vectors` entries (1..=2048) with the table and PBA at the
    /// given offsets of BAR `bir`. `None` if config space is full or the size is out of range.
    pub fn new(
        config: &mut PciConfig,
        vectors: usize,
        bir: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Option<Msix> {
        if !(1..=MAX_VECTORS).contains(&vectors) || bir > 5 {
            return None;
        }
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&((vectors - 1) as u16).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        let cap = config.add_capability(CAP_ID, &body)?;
        config.set_wmask_u16(cap + 2, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        Some(Msix {
            entries: vec![Entry::default(); vectors],
            cap,
        })
    }

    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    fn control(&self, config: &PciConfig) -> u16 {
        config.u16_at(self.cap + 2)
    }

    pub fn enabled(&self, config: &PciConfig) -> bool {
        self.control(config) & CONTROL_ENABLE != 0
    }

    /// Whether `offset..offset+len` of config space touches the message control word.
    pub fn touches_control(&self, offset: usize, len: usize) -> bool {
        offset < self.cap + 4 && self.cap + 2 < offset + len
    }

    /// The message vector `v` delivers now: MSI-X enabled, function and vector unmasked.
    pub fn deliverable(&self, config: &PciConfig, v: usize) -> Option<MsiMessage> {
        let control = self.control(config);
        let e = self.entries.get(v)?;
        let on = control & CONTROL_ENABLE != 0
            && control & CONTROL_FUNCTION_MASK == 0
            && e.control & VECTOR_MASKED == 0;
        on.then(|| MsiMessage {
            address: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
            data: e.data,
        })
    }

    fn table_byte(&self, off: u64) -> u8 {
        let Some(e) = self.entries.get((off / ENTRY_SIZE) as usize) else {
            return 0xff;
        };
        let word = match (off % ENTRY_SIZE) / 4 {
            0 => e.addr_lo,
            1 => e.addr_hi,
            2 => e.data,
            _ => e.control,
        };
        word.to_le_bytes()[(off % 4) as usize]
    }

    /// Reads the table at `offset` (any size; bytes past the table read as all ones).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0xff, |o| self.table_byte(o));
        }
    }

    /// Writes the table at `offset`; returns whether an entry changed.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> bool {
        let mut changed = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                break;
            };
            let Some(e) = self.entries.get_mut((off / ENTRY_SIZE) as usize) else {
                break;
            };
            let word = match (off % ENTRY_SIZE) / 4 {
                0 => &mut e.addr_lo,
                1 => &mut e.addr_hi,
                2 => &mut e.data,
                _ => &mut e.control,
            };
            let mut bytes = word.to_le_bytes();
            bytes[(off % 4) as usize] = b;
            let mut new = u32::from_le_bytes(bytes);
            if (off % ENTRY_SIZE) / 4 == 3 {
                new &= VECTOR_MASKED; // the other control bits are reserved
            }
            changed |= *word != new;
            *word = new;
        }
        changed
    }

    /// Reads the pending bit array; `pending(v)` says whether vector `v` has a message
    /// waiting.
    pub fn pba_read(&self, offset: u64, data: &mut [u8], pending: impl Fn(usize) -> bool) {
        for (i, b) in data.iter_mut().enumerate() {
            let Some(byte) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            *b = (0..8)
                .filter(|bit| {
                    let v = byte.saturating_mul(8).saturating_add(*bit);
                    (v as usize) < self.entries.len() && pending(v as usize)
                })
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::PciId;

    fn setup(vectors: usize) -> (PciConfig, Msix) {
        let mut c = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff_0000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem_id: 0x40,
        });
        let m = Msix::new(&mut c, vectors, 0, 0x4000, 0x5000).expect("fits");
        (c, m)
    }

    #[test]
    fn capability_encodes_size_and_table_and_pba_locations() {
        let (mut c, m) = setup(3);
        let cap = c.u16_at(0x34) as usize & 0xff;
        assert_eq!(c.u16_at(cap), 0x0011); // id, next = 0
        assert_eq!(c.u16_at(cap + 2), 2); // table size - 1, disabled
        assert_eq!(c.u32_at(cap + 4), 0x4000);
        assert_eq!(c.u32_at(cap + 8), 0x5000);
        // Only enable and function mask are writable.
        c.write(cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(cap + 2), 0xc002);
        c.write(cap + 4, &[0xff; 8]);
        assert_eq!(c.u32_at(cap + 4), 0x4000);
        assert!(m.enabled(&c));
        assert!(m.touches_control(cap + 3, 1));
        assert!(!m.touches_control(cap + 4, 4));
    }

    #[test]
    fn vectors_start_masked_and_deliver_only_when_enabled_and_unmasked() {
        let (mut c, mut m) = setup(2);
        let cap = 0x40;
        assert!(m.table_write(0, &0xfee0_0000u32.to_le_bytes()));
        m.table_write(8, &0x4021u32.to_le_bytes());
        assert_eq!(m.deliverable(&c, 0), None); // disabled, vector masked
        c.write(cap + 2, &0x8000u16.to_le_bytes());
        assert_eq!(m.deliverable(&c, 0), None); // vector masked
        m.table_write(12, &0u32.to_le_bytes());
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4021,
        };
        assert_eq!(m.deliverable(&c, 0), Some(msg));
        c.write(cap + 2, &0xc000u16.to_le_bytes());
        assert_eq!(m.deliverable(&c, 0), None); // function mask
        assert_eq!(m.deliverable(&c, 7), None); // no such vector
        let mut b = [0u8; 4];
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        m.table_read(16 + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        // Reserved control bits stay 0; writes past the table are dropped.
        m.table_write(12, &0xffff_fffeu32.to_le_bytes());
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        assert!(!m.table_write(32, &[1; 8]));
        m.table_read(30, &mut b);
        assert_eq!(&b[2..], &[0xff, 0xff]);
        m.table_write(u64::MAX, &[1; 4]);
    }

    #[test]
    fn pba_reports_pending_vectors() {
        let (_c, m) = setup(10);
        let mut b = [0u8; 8];
        m.pba_read(0, &mut b, |v| v == 1 || v == 9 || v == 12);
        assert_eq!(b[0], 0b10);
        assert_eq!(b[1], 0b10); // 12 is beyond the table
        m.pba_read(u64::MAX, &mut b[..1], |_| true);
    }
}
