//! Buffers that io_uring operations own while the kernel uses them.

/// A buffer the kernel may read from.
///
/// # Safety
/// `stable_ptr()` must point to `bytes_init()` initialised bytes that stay valid, at the same
/// address, for as long as the value is alive, even when the value itself is moved: an
/// operation moves its buffer into the executor and the kernel keeps using the pointer.
pub unsafe trait IoBuf: 'static {
    /// Start of the buffer.
    fn stable_ptr(&self) -> *const u8;
    /// Bytes that hold data (what a write sends).
    fn bytes_init(&self) -> usize;
    /// Bytes the buffer can hold (what a read may fill).
    fn bytes_total(&self) -> usize;
}

/// A buffer the kernel may write into.
///
/// # Safety
/// As for [`IoBuf`]; in addition `stable_mut_ptr()` must be valid for writes of
/// `bytes_total()` bytes, and `set_init(n)` must only record that `n` bytes are initialised.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the buffer, for writes.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Records that the first `n` bytes now hold data.
    ///
    /// # Safety
    /// The first `n` bytes must have been initialised (by the kernel).
    unsafe fn set_init(&mut self, n: usize);
}

// SAFETY: a Vec's heap buffer does not move when the Vec is moved, and is not reallocated
// unless the Vec is mutated, which the executor never does while the kernel holds it.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
}

// SAFETY: as for `IoBuf`; `set_len` only grows into capacity the kernel initialised.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, n: usize) {
        if n > self.len() {
            // SAFETY: the caller guarantees the first `n <= capacity` bytes are initialised.
            unsafe { self.set_len(n) };
        }
    }
}

// SAFETY: a boxed slice's heap buffer does not move when the box is moved.
unsafe impl IoBuf for Box<[u8]> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: as above; a boxed slice is always fully initialised.
unsafe impl IoBufMut for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, _n: usize) {}
}

// SAFETY: static data lives for the whole program and never moves.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: as for `&'static [u8]`.
unsafe impl IoBuf for &'static str {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

/// A list of memory regions the kernel may read from, for `writev`-style operations that go
/// straight from memory the caller owns (guest memory) without a bounce copy.
///
/// The implementor is usually a handle that keeps a mapping alive (an `Arc` of it) plus the
/// iovecs that point into it: the executor holds the value until the kernel is done.
///
/// # Safety
/// The slice returned by `iovecs()` and every region it describes must stay valid, at the same
/// addresses, for as long as the value is alive, even when the value is moved.
pub unsafe trait IoVecs: 'static {
    /// The regions, in order.
    fn iovecs(&self) -> &[libc::iovec];
}

/// A list of memory regions the kernel may write into (`readv`-style operations).
///
/// # Safety
/// As for [`IoVecs`]; in addition every region must be valid for writes, and nothing may hold
/// a Rust reference into a region while an operation on it is in flight.
pub unsafe trait IoVecsMut: IoVecs {}

/// Owned buffers, gathered into one vectored operation.
pub(crate) struct BufVec<B> {
    pub(crate) bufs: Vec<B>,
    pub(crate) iovecs: Vec<libc::iovec>,
}

impl<B: IoBuf> BufVec<B> {
    pub(crate) fn for_write(bufs: Vec<B>) -> Self {
        let iovecs = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.stable_ptr() as *mut libc::c_void,
                iov_len: b.bytes_init(),
            })
            .collect();
        BufVec { bufs, iovecs }
    }
}

impl<B: IoBufMut> BufVec<B> {
    pub(crate) fn for_read(mut bufs: Vec<B>) -> Self {
        let iovecs = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.stable_mut_ptr() as *mut libc::c_void,
                iov_len: b.bytes_total(),
            })
            .collect();
        BufVec { bufs, iovecs }
    }

    /// Marks the first `n` bytes across the buffers as initialised.
    ///
    /// # Safety
    /// The kernel must have written the first `n` bytes of the gathered regions.
    pub(crate) unsafe fn set_init(&mut self, mut n: usize) {
        for b in &mut self.bufs {
            let take = n.min(b.bytes_total());
            // SAFETY: the caller guarantees these bytes were written.
            unsafe { b.set_init(take) };
            n -= take;
        }
    }
}

// SAFETY: `iovecs` is a Vec (stable heap buffer) describing the heap buffers of `bufs`, which
// are `IoBuf` and therefore stable while `bufs` is alive.
unsafe impl<B: IoBuf> IoVecs for BufVec<B> {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_set_init_never_shrinks() {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&[1, 2, 3]);
        // SAFETY: 2 <= len, nothing is exposed.
        unsafe { v.set_init(2) };
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn vec_offers_its_capacity_to_reads_and_its_length_to_writes() {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(b"abc");
        assert_eq!((v.bytes_init(), v.bytes_total()), (3, v.capacity()));
        assert_eq!(v.stable_ptr(), v.as_ptr());
    }

    #[test]
    fn boxed_slice_is_always_fully_initialised() {
        let mut b: Box<[u8]> = vec![0u8; 5].into_boxed_slice();
        assert_eq!((b.bytes_init(), b.bytes_total()), (5, 5));
        // SAFETY: nothing is exposed; a no-op for a boxed slice.
        unsafe { b.set_init(2) };
        assert_eq!(b.len(), 5);
    }

    #[test]
    fn static_buffers_write_all_their_bytes() {
        assert_eq!("hello".bytes_init(), 5);
        assert_eq!(b"hi".as_slice().bytes_total(), 2);
    }

    #[test]
    fn bufvec_for_write_covers_the_initialised_bytes() {
        let mut a = Vec::with_capacity(8);
        a.extend_from_slice(b"xy");
        let bv = BufVec::for_write(vec![a, b"z".to_vec()]);
        let lens: Vec<usize> = bv.iovecs().iter().map(|i| i.iov_len).collect();
        assert_eq!(lens, [2, 1]);
        assert_eq!(bv.iovecs()[0].iov_base as *const u8, bv.bufs[0].as_ptr());
    }

    #[test]
    fn bufvec_iovecs_stay_put_when_it_moves() {
        let bv = BufVec::for_read(vec![Vec::<u8>::with_capacity(4)]);
        let before = bv.iovecs().as_ptr();
        let moved = Box::new(bv);
        assert_eq!(moved.iovecs().as_ptr(), before);
    }

    #[test]
    fn bufvec_spreads_init_over_buffers() {
        let mut bv = BufVec::for_read(vec![Vec::with_capacity(4), Vec::with_capacity(4)]);
        for iov in &bv.iovecs {
            // SAFETY: each iovec covers a Vec's capacity; we initialise all of it.
            unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 7, iov.iov_len) };
        }
        // SAFETY: 6 bytes of the 8 were written just above.
        unsafe { bv.set_init(6) };
        assert_eq!(bv.bufs[0], vec![7; 4]);
        assert_eq!(bv.bufs[1], vec![7; 2]);
    }
}
