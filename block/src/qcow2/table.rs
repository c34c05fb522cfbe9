//! L1/L2 table entries and refcount block entries: decoding, encoding, validation.

/// Host offset bits of L1 and standard L2 entries (9..=55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the cluster may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// Compressed cluster descriptor.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Reads as zeros (version 3).
pub(crate) const ZERO: u64 = 1;
/// L1 bits that must be zero: 1..=8 and 56..=62 (bit 0 too).
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Standard L2 bits that must be zero: 1..=8 and 56..=61.
const L2_RESERVED: u64 = !(OFFSET_MASK | COPIED | COMPRESSED | ZERO);

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L2Entry {
    /// Not allocated: the backing file's data, or zeros.
    Unallocated,
    /// Reads as zeros; `alloc` is a preallocated host cluster kept for later writes.
    Zero { alloc: Option<u64> },
    /// Data at a host cluster; `copied` when its refcount is one (writable in place).
    Normal { offset: u64, copied: bool },
    /// A compressed cluster: `size` bytes of compressed data at host byte `offset`.
    Compressed { offset: u64, size: u64 },
}

/// Decodes an L2 entry of an image with `cluster_bits`; `v3` allows the zero flag.
pub(crate) fn decode_l2(raw: u64, cluster_bits: u32, v3: bool) -> Result<L2Entry, &'static str> {
    if raw & COMPRESSED != 0 {
        // Bits 0..x: host offset; x..62: additional 512-byte sectors.
        let x = 62 - (cluster_bits - 8);
        let offset = raw & ((1 << x) - 1);
        let sectors = ((raw >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1;
        return Ok(L2Entry::Compressed {
            offset,
            size: sectors * 512 - (offset & 511),
        });
    }
    if raw & L2_RESERVED != 0 {
        return Err("reserved bits set in l2 entry");
    }
    let offset = raw & OFFSET_MASK;
    let copied = raw & COPIED != 0;
    if offset & ((1 << cluster_bits) - 1) != 0 {
        return Err("l2 entry offset unaligned");
    }
    if raw & ZERO != 0 {
        if !v3 {
            return Err("zero flag in a version 2 image");
        }
        return Ok(L2Entry::Zero {
            alloc: (offset != 0).then_some(offset),
        });
    }
    if offset == 0 {
        if copied {
            return Err("copied flag on an unallocated l2 entry");
        }
        return Ok(L2Entry::Unallocated);
    }
    Ok(L2Entry::Normal { offset, copied })
}

/// Encodes an L2 entry (compressed entries are never written: they encode as unallocated).
pub(crate) fn encode_l2(e: L2Entry) -> u64 {
    match e {
        L2Entry::Unallocated | L2Entry::Compressed { .. } => 0,
        L2Entry::Zero { alloc: None } => ZERO,
        L2Entry::Zero { alloc: Some(o) } => o | COPIED | ZERO,
        L2Entry::Normal { offset, copied } => offset | if copied { COPIED } else { 0 },
    }
}

/// Decodes an L1 entry: the L2 table's offset and whether it is writable in place (None: no
/// table), checked for alignment.
pub(crate) fn decode_l1(raw: u64, cluster_bits: u32) -> Result<Option<(u64, bool)>, &'static str> {
    if raw & L1_RESERVED != 0 {
        return Err("reserved bits set in l1 entry");
    }
    let offset = raw & OFFSET_MASK;
    if offset & ((1 << cluster_bits) - 1) != 0 {
        return Err("l2 table offset unaligned");
    }
    if offset == 0 {
        return Ok(None);
    }
    Ok(Some((offset, raw & COPIED != 0)))
}

/// Decodes a refcount table entry: the refcount block's offset (None: no block).
pub(crate) fn decode_reftable(raw: u64, cluster_bits: u32) -> Result<Option<u64>, &'static str> {
    if raw & ((1 << cluster_bits) - 1) != 0 {
        return Err("refcount block offset unaligned");
    }
    Ok((raw != 0).then_some(raw))
}

/// The refcount at `index` in a refcount block of `2^order`-bit entries.
pub(crate) fn get_refcount(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let mask = (1u64 << bits) - 1;
        (u64::from(block[bit / 8]) >> (bit % 8)) & mask
    } else {
        let bytes = bits / 8;
        let at = index * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Sets the refcount at `index`; `value` must fit in `2^order` bits.
pub(crate) fn set_refcount(block: &mut [u8], index: usize, order: u32, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let mask = ((1u16 << bits) - 1) as u8;
        let b = &mut block[bit / 8];
        *b = (*b & !(mask << (bit % 8))) | (((value as u8) & mask) << (bit % 8));
    } else {
        let bytes = bits / 8;
        let at = index * bytes;
        for (i, b) in block[at..at + bytes].iter_mut().enumerate() {
            *b = (value >> (8 * (bytes - 1 - i))) as u8;
        }
    }
}

/// Largest refcount of `2^order`-bit entries.
pub(crate) fn max_refcount(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn l2_entry_kinds_decode() {
        assert_eq!(decode_l2(0, 16, true), Ok(L2Entry::Unallocated));
        assert_eq!(decode_l2(ZERO, 16, true), Ok(L2Entry::Zero { alloc: None }));
        assert_eq!(
            decode_l2(COPIED | 0x30000, 16, true),
            Ok(L2Entry::Normal {
                offset: 0x30000,
                copied: true
            })
        );
        assert_eq!(
            decode_l2(COMPRESSED | (3 << 54) | 0x1_0010, 16, true),
            Ok(L2Entry::Compressed {
                offset: 0x1_0010,
                size: 4 * 512 - 0x10
            })
        );
        assert!(decode_l2(ZERO, 16, false).is_err());
        assert!(decode_l2(0x30200, 16, true).is_err(), "unaligned");
        assert!(decode_l2(1 << 57, 16, true).is_err(), "reserved");
    }

    #[test]
    fn refcounts_pack_as_qemu_does() {
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 1, 4, 0x1234);
        assert_eq!(b[2..4], [0x12, 0x34]);
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 3, 0, 1);
        assert_eq!(b[0], 0b1000);
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 1, 2, 0xf);
        assert_eq!(b[0], 0xf0);
    }

    proptest! {
        #[test]
        fn l2_entries_round_trip(raw in any::<u64>(), bits in 9u32..=21) {
            if let Ok(e) = decode_l2(raw, bits, true) {
                if !matches!(e, L2Entry::Compressed { .. }) {
                    prop_assert_eq!(decode_l2(encode_l2(e), bits, true), Ok(e));
                }
            }
            let _ = decode_l1(raw, bits);
            let _ = decode_reftable(raw, bits);
        }

        #[test]
        fn refcounts_round_trip(order in 0u32..=6, index in 0usize..64, value in any::<u64>()) {
            let mut b = vec![0u8; 512];
            let v = value & max_refcount(order);
            set_refcount(&mut b, index, order, v);
            prop_assert_eq!(get_refcount(&b, index, order), v);
            for other in 0..64 {
                if other != index {
                    prop_assert_eq!(get_refcount(&b, other, order), 0);
                }
            }
        }
    }
}
