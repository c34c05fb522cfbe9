//! Plain-old-data types that can be copied to and from guest memory byte for byte.

/// A type for which every byte pattern of its size is a valid value, with no padding bytes.
///
/// Guest memory reads produce such values from bytes the guest controls, and writes copy
/// their bytes out, so both directions need the two properties.
///
/// Device crates are `#![forbid(unsafe_code)]` and so do not implement this: they read wire
/// structs as byte arrays (`[u8; N]`, which is `ByteValued`) and decode the little-endian
/// fields explicitly, which is also what the virtio spec's byte order asks for.
///
/// # Safety
/// The implementing type must have no padding, no invalid bit patterns (no `bool`, `char`,
/// enums, references or pointers), and no interior mutability.
pub unsafe trait ByteValued: Copy + Send + Sync + 'static {
    /// The value's bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `self` is a live value of `size_of::<Self>()` bytes, all of them initialised
        // because the trait forbids padding; u8 has alignment 1 and the borrow is tied to
        // `self`.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// The value's bytes, writable: any bytes written leave a valid value.
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_bytes`; writes through the slice cannot create an invalid value
        // because the trait guarantees every bit pattern is valid, and the unique borrow of
        // `self` is carried by the slice.
        unsafe {
            std::slice::from_raw_parts_mut((self as *mut Self).cast::<u8>(), size_of::<Self>())
        }
    }

    /// A value of all-zero bytes.
    fn zeroed() -> Self {
        // SAFETY: every bit pattern, all zeroes included, is a valid value of a `ByteValued`
        // type.
        unsafe { std::mem::MaybeUninit::<Self>::zeroed().assume_init() }
    }
}

macro_rules! byte_valued {
    ($($t:ty),*) => {
        $(
            // SAFETY: primitive integers have no padding and every bit pattern is valid.
            unsafe impl ByteValued for $t {}
        )*
    };
}

byte_valued!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize);

// SAFETY: an array has no padding between elements of a padding-free type (its size is
// `N * size_of::<T>()`), and it is valid iff every element is.
unsafe impl<T: ByteValued, const N: usize> ByteValued for [T; N] {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_as_bytes_mut() {
        let mut v = 0u32;
        v.as_bytes_mut().copy_from_slice(&[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(u32::from_le(v), 0x1234_5678);
        assert_eq!(v.as_bytes(), &[0x78, 0x56, 0x34, 0x12]);
    }

    #[test]
    fn arrays_are_byte_valued() {
        let a: [u16; 3] = ByteValued::zeroed();
        assert_eq!(a, [0; 3]);
        assert_eq!(a.as_bytes().len(), 6);
    }
}
