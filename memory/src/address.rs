//! Guest physical addresses.

use std::fmt;

/// A guest physical address. A newtype so that guest and host addresses cannot be mixed up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// The address as a number.
    pub const fn raw_value(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` if that wraps past the end of the address space.
    pub const fn checked_add(self, offset: u64) -> Option<GuestAddress> {
        match self.0.checked_add(offset) {
            Some(a) => Some(GuestAddress(a)),
            None => None,
        }
    }

    /// `self - other`, or `None` if `other` is above `self`.
    pub const fn checked_offset_from(self, other: GuestAddress) -> Option<u64> {
        self.0.checked_sub(other.0)
    }

    /// `self + offset`, wrapping at the end of the address space (for ring arithmetic that
    /// is validated elsewhere).
    pub const fn wrapping_add(self, offset: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(offset))
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_add_reports_wrap() {
        assert_eq!(GuestAddress(1).checked_add(2), Some(GuestAddress(3)));
        assert_eq!(GuestAddress(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn offset_from_lower_address_only() {
        assert_eq!(
            GuestAddress(0x1010).checked_offset_from(GuestAddress(0x1000)),
            Some(0x10)
        );
        assert_eq!(GuestAddress(1).checked_offset_from(GuestAddress(2)), None);
    }

    #[test]
    fn displays_as_hex() {
        assert_eq!(GuestAddress(0xc000_0000).to_string(), "0xc0000000");
    }
}
