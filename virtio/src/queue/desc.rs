//! The split ring's wire formats (virtio 1.2 §2.7.5, §2.7.6, §2.7.8).

/// The buffer continues in the `next` descriptor.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// `avail.flags`: the driver asks for no used-buffer notifications (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device asks for no available-buffer notifications (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Feature bit: the driver may use indirect descriptors.
pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_F_EVENT_IDX: u32 = 29;

/// Size of a descriptor in bytes.
pub const DESC_SIZE: u64 = 16;
/// Largest queue size of a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of the descriptor table for `size` entries.
pub const fn desc_table_len(size: u16) -> u64 {
    DESC_SIZE * size as u64
}

/// Bytes of the available ring for `size` entries: flags, idx, ring, used_event.
pub const fn avail_ring_len(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring for `size` entries: flags, idx, ring, avail_event.
pub const fn used_ring_len(size: u16) -> u64 {
    6 + 8 * size as u64
}

/// A descriptor as it sits in a descriptor table (little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor, if `VIRTQ_DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// Decodes a descriptor from its 16 wire bytes.
    pub fn from_le_bytes(b: [u8; 16]) -> Descriptor {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
        Descriptor {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Encodes the descriptor as its 16 wire bytes.
    pub fn to_le_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Whether the chain continues at `next`.
    pub fn has_next(&self) -> bool {
        self.flags & VIRTQ_DESC_F_NEXT != 0
    }

    /// Whether the buffer is device-writable.
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether the buffer is a table of indirect descriptors.
    pub fn is_indirect(&self) -> bool {
        self.flags & VIRTQ_DESC_F_INDIRECT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_wire_format_is_little_endian() {
        let d = Descriptor {
            addr: 0x0102_0304_0506_0708,
            len: 0x1122_3344,
            flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            next: 0xabcd,
        };
        let b = d.to_le_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x44);
        assert_eq!(b[12], 3);
        assert_eq!(b[14], 0xcd);
        assert_eq!(Descriptor::from_le_bytes(b), d);
        assert!(d.has_next() && d.is_write_only() && !d.is_indirect());
    }

    #[test]
    fn ring_lengths_follow_the_spec() {
        assert_eq!(desc_table_len(256), 4096);
        assert_eq!(avail_ring_len(256), 518);
        assert_eq!(used_ring_len(256), 2054);
    }
}
