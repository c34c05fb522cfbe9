//! Volatile views of guest memory.
//!
//! Guest RAM is shared with the guest (and, in device processes, with the VMM), which may
//! change it at any time. No Rust reference to it is ever created: every access goes through
//! a raw pointer with volatile or atomic operations (or, for a payload of at least [`BULK`]
//! bytes, one `memcpy` into or out of memory we own, as rust-vmm's vm-memory does), and the
//! bytes read are treated as untrusted values.

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use crate::ByteValued;

/// A bounded view of guest memory, valid for `'a` (the borrow of the
/// [`GuestMemory`](crate::GuestMemory) it came from). Accesses are bounds-checked against the
/// view and never form Rust references into the memory.
#[derive(Clone, Copy, Debug)]
pub struct VolatileSlice<'a> {
    ptr: *mut u8,
    len: usize,
    _memory: PhantomData<&'a [std::cell::UnsafeCell<u8>]>,
}

impl<'a> VolatileSlice<'a> {
    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped, readable and writable for all of `'a`, and must not
    /// be covered by any Rust reference during `'a`.
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize) -> VolatileSlice<'a> {
        VolatileSlice {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// Length of the view in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the first byte. Using it is up to the caller's own `unsafe`.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The view of `len` bytes at `offset`, or `None` if that is not inside this view.
    #[inline]
    pub fn subslice(&self, offset: usize, len: usize) -> Option<VolatileSlice<'a>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` lies inside this view (checked just above), which is mapped
        // for 'a by the invariant of `new`.
        Some(unsafe { VolatileSlice::new(self.ptr.add(offset), len) })
    }

    /// Host pointer to `size` bytes at `offset`, if they are inside the view.
    #[inline]
    fn checked_ptr(&self, offset: usize, size: usize) -> Option<*mut u8> {
        let end = offset.checked_add(size)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset <= len`, so the result is inside (or one past) the mapping.
        Some(unsafe { self.ptr.add(offset) })
    }

    /// Copies the first `buf.len()` bytes of the view (or all of it, if shorter) into `buf`;
    /// returns the number of bytes copied.
    #[inline]
    pub fn copy_to(&self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.len);
        // SAFETY: `self.ptr` is valid for reads of `self.len >= n` bytes (invariant of `new`).
        unsafe { copy_from_guest(self.ptr, &mut buf[..n]) };
        n
    }

    /// Copies `buf` (or as much as fits) into the start of the view; returns the number of
    /// bytes copied.
    #[inline]
    pub fn copy_from(&self, buf: &[u8]) -> usize {
        let n = buf.len().min(self.len);
        // SAFETY: `self.ptr` is valid for writes of `self.len >= n` bytes (invariant of
        // `new`), and no Rust reference covers them.
        unsafe { copy_to_guest(&buf[..n], self.ptr) };
        n
    }

    /// Copies from this view into `dst` as many bytes as both hold; returns the count.
    pub fn copy_to_volatile(&self, dst: VolatileSlice<'_>) -> usize {
        let n = self.len.min(dst.len);
        let mut bounce = [0u8; 512];
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(bounce.len());
            // Both subslices are in range: `done + chunk <= n <= len` of each view.
            if let (Some(src), Some(d)) = (self.subslice(done, chunk), dst.subslice(done, chunk)) {
                src.copy_to(&mut bounce[..chunk]);
                d.copy_from(&bounce[..chunk]);
            }
            done += chunk;
        }
        n
    }

    /// Sets every byte of the view to `byte`.
    pub fn fill(&self, byte: u8) {
        let chunk = [byte; 256];
        let mut done = 0;
        while done < self.len {
            let n = (self.len - done).min(chunk.len());
            // SAFETY: `done + n <= len`, so the range is inside the mapping (invariant of
            // `new`), which no Rust reference covers.
            unsafe { copy_to_guest(&chunk[..n], self.ptr.add(done)) };
            done += n;
        }
    }

    /// Reads a `T` at `offset`, or `None` if it does not fit in the view.
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, offset: usize) -> Option<T> {
        let p = self.checked_ptr(offset, size_of::<T>())?;
        if p.align_offset(align_of::<T>()) == 0 {
            // SAFETY: `p` is valid for reads of `size_of::<T>()` bytes (checked above) and
            // aligned for `T`; every bit pattern is a valid `T` (`ByteValued`).
            Some(unsafe { ptr::read_volatile(p.cast::<T>()) })
        } else {
            let mut v = T::zeroed();
            // SAFETY: `p` is valid for reads of `size_of::<T>()` bytes (checked above).
            unsafe { copy_from_guest(p, v.as_bytes_mut()) };
            Some(v)
        }
    }

    /// Writes `val` at `offset`; `None` if it does not fit in the view.
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, val: T, offset: usize) -> Option<()> {
        let p = self.checked_ptr(offset, size_of::<T>())?;
        if p.align_offset(align_of::<T>()) == 0 {
            // SAFETY: `p` is valid for writes of `size_of::<T>()` bytes (checked above),
            // aligned for `T`, and no Rust reference covers guest memory.
            unsafe { ptr::write_volatile(p.cast::<T>(), val) };
        } else {
            // SAFETY: `p` is valid for writes of `size_of::<T>()` bytes (checked above).
            unsafe { copy_to_guest(val.as_bytes(), p) };
        }
        Some(())
    }

    /// Atomic load of the u16 at `offset` (native byte order); `None` if out of the view or
    /// not 2-byte aligned.
    #[inline]
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Option<u16> {
        let p = self.checked_ptr(offset, 2)?;
        if p.align_offset(2) != 0 {
            return None;
        }
        // SAFETY: `p` is inside the mapping for 'a and 2-aligned (checked above); the memory
        // is only ever accessed by us through raw pointers (volatile, atomic, or a payload's
        // memcpy), never through a Rust reference.
        Some(unsafe { AtomicU16::from_ptr(p.cast()) }.load(order))
    }

    /// Atomic store of a u16 at `offset` (native byte order); `None` if out of the view or
    /// not 2-byte aligned.
    #[inline]
    pub fn store_u16(&self, offset: usize, val: u16, order: Ordering) -> Option<()> {
        let p = self.checked_ptr(offset, 2)?;
        if p.align_offset(2) != 0 {
            return None;
        }
        // SAFETY: as in `load_u16`.
        unsafe { AtomicU16::from_ptr(p.cast()) }.store(val, order);
        Some(())
    }

    /// Atomic load of the u32 at `offset` (native byte order); `None` if out of the view or
    /// not 4-byte aligned.
    #[inline]
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Option<u32> {
        let p = self.checked_ptr(offset, 4)?;
        if p.align_offset(4) != 0 {
            return None;
        }
        // SAFETY: `p` is inside the mapping for 'a and 4-aligned (checked above); the memory
        // is only ever accessed by us through raw pointers (volatile, atomic, or a payload's
        // memcpy), never through a Rust reference.
        Some(unsafe { AtomicU32::from_ptr(p.cast()) }.load(order))
    }

    /// Atomic store of a u32 at `offset` (native byte order); `None` if out of the view or
    /// not 4-byte aligned.
    #[inline]
    pub fn store_u32(&self, offset: usize, val: u32, order: Ordering) -> Option<()> {
        let p = self.checked_ptr(offset, 4)?;
        if p.align_offset(4) != 0 {
            return None;
        }
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p.cast()) }.store(val, order);
        Some(())
    }
}

/// Copies of at least this many bytes (payloads, not structures) go through the platform's
/// `memcpy`, which moves 32 or 64 bytes per instruction where the volatile loop moves eight.
const BULK: usize = 128;

/// Copies `dst.len()` bytes from guest memory at `src`: a structure with volatile loads, eight
/// bytes at a time where `src` is aligned; a payload of [`BULK`] bytes or more with one
/// `memcpy`.
///
/// Either way each byte is read once into memory we own, through a raw pointer (no Rust
/// reference to guest memory); the guest may change the source meanwhile, so the copy may
/// mix old and new bytes, and callers check and use only the copy.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes.
unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    if len >= BULK {
        // SAFETY: `src` is valid for `len` bytes (the caller's word) and `dst` is ours for
        // `len` bytes; they cannot overlap, as `dst` is a Rust reference and guest memory is
        // never covered by one.
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), len) };
        return;
    }
    let head = src.align_offset(8).min(len);
    let mut i = 0;
    while i < len {
        if i >= head && i + 8 <= len {
            // SAFETY: `i + 8 <= len`, inside the range the caller vouches for; `src + i` is
            // 8-aligned because `src + head` is and `i - head` is a multiple of 8 (every
            // offset and alignment: `copies_at_every_alignment_round_trip`).
            let v = unsafe { ptr::read_volatile(src.add(i).cast::<u64>()) };
            dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: `i < len`, inside the range the caller vouches for.
            dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
            i += 1;
        }
    }
}

/// Copies `src` into guest memory at `dst`: a structure with volatile stores, eight bytes at
/// a time where `dst` is aligned; a payload of [`BULK`] bytes or more with one `memcpy`.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes, not covered by any Rust reference.
unsafe fn copy_to_guest(src: &[u8], dst: *mut u8) {
    let len = src.len();
    if len >= BULK {
        // SAFETY: `dst` is valid for `len` bytes and not covered by a Rust reference (the
        // caller's word), so it cannot overlap `src`, which is one.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
        return;
    }
    let head = dst.align_offset(8).min(len);
    let mut i = 0;
    while i < len {
        if i >= head && i + 8 <= len {
            let mut w = [0u8; 8];
            w.copy_from_slice(&src[i..i + 8]);
            // SAFETY: `i + 8 <= len`, inside the range the caller vouches for; `dst + i` is
            // 8-aligned because `dst + head` is and `i - head` is a multiple of 8.
            unsafe { ptr::write_volatile(dst.add(i).cast::<u64>(), u64::from_ne_bytes(w)) };
            i += 8;
        } else {
            // SAFETY: `i < len`, inside the range the caller vouches for.
            unsafe { ptr::write_volatile(dst.add(i), src[i]) };
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_slice(len: usize, f: impl FnOnce(VolatileSlice<'_>)) {
        let mut backing = vec![0u64; len.div_ceil(8) + 1];
        // SAFETY: the Vec outlives `f`, which only uses the slice; no reference into the
        // backing is held while it runs.
        let s = unsafe { VolatileSlice::new(backing.as_mut_ptr().cast(), len) };
        f(s);
        drop(backing);
    }

    #[test]
    fn copies_at_every_alignment_round_trip() {
        with_slice(64, |s| {
            for off in 0..9 {
                for len in 0..30 {
                    let data: Vec<u8> = (0..len as u8).map(|b| b ^ off as u8).collect();
                    let sub = s.subslice(off, len).expect("in range");
                    assert_eq!(sub.copy_from(&data), len);
                    let mut back = vec![0u8; len];
                    assert_eq!(sub.copy_to(&mut back), len);
                    assert_eq!(back, data);
                }
            }
        });
    }

    #[test]
    fn payload_copies_round_trip_at_every_alignment() {
        with_slice(BULK * 3, |s| {
            for off in 0..9 {
                for len in [BULK - 1, BULK, BULK + 1, BULK + 7, 2 * BULK + 3] {
                    let wide = s.subslice(off, len + 2).expect("in range");
                    assert_eq!(wide.copy_from(&vec![0xee; len + 2]), len + 2);
                    let data: Vec<u8> = (0..len).map(|b| (b * 7 + off) as u8).collect();
                    let sub = s.subslice(off, len).expect("in range");
                    assert_eq!(sub.copy_from(&data), len);
                    let mut back = vec![0u8; len + 2];
                    assert_eq!(wide.copy_to(&mut back), len + 2);
                    assert_eq!(&back[..len], &data[..]);
                    assert_eq!(&back[len..], &[0xee, 0xee], "nothing past the copy moved");
                }
            }
        });
    }

    #[test]
    fn subslice_rejects_ranges_past_the_end() {
        with_slice(16, |s| {
            assert!(s.subslice(16, 0).is_some());
            assert!(s.subslice(8, 9).is_none());
            assert!(s.subslice(usize::MAX, 2).is_none());
        });
    }

    #[test]
    fn objects_read_back_at_unaligned_offsets() {
        with_slice(32, |s| {
            s.write_obj(0x1122_3344_5566_7788u64, 3).expect("fits");
            assert_eq!(s.read_obj::<u64>(3), Some(0x1122_3344_5566_7788));
            assert_eq!(s.read_obj::<u64>(25), None);
        });
    }

    #[test]
    fn atomics_require_alignment_and_bounds() {
        with_slice(8, |s| {
            assert_eq!(s.store_u16(2, 7, Ordering::Release), Some(()));
            assert_eq!(s.load_u16(2, Ordering::Acquire), Some(7));
            assert_eq!(s.load_u16(1, Ordering::Acquire), None);
            assert_eq!(s.load_u16(7, Ordering::Acquire), None);
            assert_eq!(s.store_u32(4, 9, Ordering::Release), Some(()));
            assert_eq!(s.load_u32(4, Ordering::Acquire), Some(9));
            assert_eq!(s.load_u32(6, Ordering::Acquire), None);
        });
    }

    #[test]
    fn copy_between_views_and_fill() {
        with_slice(2048, |s| {
            let a = s.subslice(0, 1024).expect("in range");
            let b = s.subslice(1024, 1024).expect("in range");
            a.fill(0xab);
            assert_eq!(a.copy_to_volatile(b), 1024);
            let mut back = vec![0u8; 1024];
            b.copy_to(&mut back);
            assert!(back.iter().all(|&x| x == 0xab));
        });
    }
}
