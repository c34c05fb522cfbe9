//! A type-0 configuration space: 256 bytes with a per-byte write mask, 32-bit memory BARs
//! (sizing by all-ones writes falls out of the mask) and a capability list.

/// Size of the (non-extended) configuration space.
pub const CONFIG_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CACHE_LINE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAP_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command bits the guest may set: I/O, memory, bus master, parity, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;
/// Status: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Capabilities start here, dword-aligned.
const FIRST_CAP: usize = 0x40;
pub const NUM_BARS: usize = 6;

/// The identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem_id: u16,
}

pub struct PciConfig {
    regs: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    /// Size of each implemented 32-bit memory BAR (a power of two ≥ 16), 0 if absent.
    bar_sizes: [u64; NUM_BARS],
    /// Where the next capability goes and the byte that points to it.
    next_cap: usize,
    last_next_ptr: usize,
}

impl PciConfig {
    pub fn new(id: PciId) -> PciConfig {
        let mut c = PciConfig {
            regs: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bar_sizes: [0; NUM_BARS],
            next_cap: FIRST_CAP,
            last_next_ptr: CAP_POINTER,
        };
        c.set_u16(VENDOR_ID, id.vendor);
        c.set_u16(DEVICE_ID, id.device);
        c.regs[REVISION] = id.revision;
        c.regs[REVISION + 1..REVISION + 4].copy_from_slice(&id.class.to_le_bytes()[..3]);
        c.regs[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR, id.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, id.subsystem_id);
        c.set_wmask_u16(COMMAND, COMMAND_WRITABLE);
        c.wmask[CACHE_LINE] = 0xff;
        c.wmask[CACHE_LINE + 1] = 0xff; // latency timer
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Reads `data.len()` bytes at `offset`; out of range bytes read as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Writes through the write mask; out of range bytes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                return;
            };
            let m = self.wmask[o];
            self.regs[o] = (self.regs[o] & !m) | (b & m);
        }
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets bytes directly, ignoring the write mask (device-side updates).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(r) = offset
            .checked_add(data.len())
            .and_then(|end| self.regs.get_mut(offset..end))
        {
            r.copy_from_slice(data);
        }
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_wmask(&mut self, offset: usize, mask: &[u8]) {
        if let Some(r) = offset
            .checked_add(mask.len())
            .and_then(|end| self.wmask.get_mut(offset..end))
        {
            r.copy_from_slice(mask);
        }
    }

    pub fn set_wmask_u16(&mut self, offset: usize, mask: u16) {
        self.set_wmask(offset, &mask.to_le_bytes());
    }

    /// A 32-bit non-prefetchable memory BAR of `size` (a power of two ≥ 16) at `addr`.
    pub fn add_bar32(&mut self, bar: usize, size: u64, addr: u32) {
        debug_assert!(bar < NUM_BARS && size.is_power_of_two() && size >= 16);
        if bar >= NUM_BARS || !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return;
        }
        self.bar_sizes[bar] = size;
        let off = BAR0 + 4 * bar;
        // Type bits 3:0 = 0: memory, 32-bit, not prefetchable; the address bits below the
        // size are hardwired to 0, so an all-ones write reads back as the size mask.
        self.set_wmask(off, &(!(size as u32 - 1)).to_le_bytes());
        self.set_u32(off, addr & !(size as u32 - 1));
    }

    /// The current address of a BAR (whatever the guest wrote, decoding or not).
    pub fn bar_addr(&self, bar: usize) -> Option<u64> {
        let size = *self.bar_sizes.get(bar)?;
        (size != 0).then(|| u64::from(self.u32_at(BAR0 + 4 * bar) & !0xf))
    }

    pub fn bar_size(&self, bar: usize) -> u64 {
        self.bar_sizes.get(bar).copied().unwrap_or(0)
    }

    pub fn memory_enabled(&self) -> bool {
        self.u16_at(COMMAND) & COMMAND_MEMORY != 0
    }

    /// The BAR address if memory decoding is on, `None` otherwise.
    pub fn decoded_bar(&self, bar: usize) -> Option<u64> {
        self.memory_enabled().then(|| self.bar_addr(bar)).flatten()
    }

    /// The BAR decoding all of `[addr, addr + len)` and the offset in it.
    pub fn decode(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        if !self.memory_enabled() {
            return None;
        }
        (0..NUM_BARS).find_map(|bar| {
            let base = self.bar_addr(bar)?;
            let off = addr.checked_sub(base)?;
            (off.checked_add(len)? <= self.bar_sizes[bar]).then_some((bar, off))
        })
    }

    /// Appends a capability (`body` follows the ID and next-pointer bytes) and returns its
    /// offset, or `None` if it does not fit.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<usize> {
        let at = self.next_cap;
        let len = 2 + body.len();
        if at + len > CONFIG_SIZE {
            return None;
        }
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + len].copy_from_slice(body);
        self.regs[self.last_next_ptr] = at as u8;
        self.last_next_ptr = at + 1;
        self.next_cap = (at + len + 3) & !3;
        let status = self.u16_at(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, status);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff_0000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    #[test]
    fn identity_reads_back_and_is_read_only() {
        let mut c = config();
        assert_eq!(c.u32_at(0), 0x1044_1af4);
        assert_eq!(c.u32_at(REVISION), 0xff00_0001);
        assert_eq!(c.u32_at(SUBSYSTEM_VENDOR), 0x0040_1af4);
        c.write(0, &[0; 4]);
        c.write(REVISION, &[0; 4]);
        assert_eq!(c.u32_at(0), 0x1044_1af4);
        assert_eq!(c.u32_at(REVISION), 0xff00_0001);
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_and_writes_move_the_bar() {
        let mut c = config();
        c.add_bar32(0, 0x4000, 0xc000_4000);
        assert_eq!(c.bar_addr(0), Some(0xc000_4000));
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.u32_at(BAR0), 0xffff_c000);
        c.write(BAR0, &0xd000_1234u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
        // Byte writes move the BAR too.
        c.write(BAR0 + 3, &[0xe0]);
        assert_eq!(c.bar_addr(0), Some(0xe000_0000));
        // Unimplemented BARs read 0 whatever is written.
        c.write(BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.u32_at(BAR0 + 4), 0);
        assert_eq!(c.bar_addr(1), None);
    }

    #[test]
    fn decoding_follows_the_command_memory_bit() {
        let mut c = config();
        c.add_bar32(0, 0x4000, 0xc000_0000);
        assert_eq!(c.decode(0xc000_0010, 4), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.decode(0xc000_0010, 4), Some((0, 0x10)));
        assert_eq!(c.decode(0xc000_3ffe, 4), None); // runs past the end
        assert_eq!(c.decode(0xbfff_fffe, 4), None);
        assert_eq!(c.decode(u64::MAX - 1, 4), None);
    }

    #[test]
    fn capability_list_links_in_order() {
        let mut c = config();
        let a = c.add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = c.add_capability(0x11, &[0; 10]);
        assert_eq!(a, Some(0x40));
        assert_eq!(b, Some(0x50));
        assert_ne!(c.u16_at(STATUS) & STATUS_CAP_LIST, 0);
        let mut walk = Vec::new();
        let mut p = c.regs[CAP_POINTER] as usize;
        while p != 0 {
            walk.push((p, c.regs[p]));
            p = c.regs[p + 1] as usize;
        }
        assert_eq!(walk, vec![(0x40, 0x09), (0x50, 0x11)]);
        // One that does not fit is refused.
        assert_eq!(c.add_capability(0x09, &[0; 200]), None);
    }

    #[test]
    fn out_of_range_accesses_are_ignored() {
        let mut c = config();
        let mut b = [0u8; 4];
        c.read(254, &mut b);
        assert_eq!(&b[2..], &[0xff, 0xff]);
        c.write(254, &[1, 2, 3, 4]);
        c.write(usize::MAX, &[1]);
        c.read(usize::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
