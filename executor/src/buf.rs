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

/// A zeroed heap buffer whose start is aligned to a power of two: what `O_DIRECT` reads and
/// writes of a device-owned copy need (a `Vec<u8>` is only aligned to 1).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align`; `None` when `len` is 0, `align` is
    /// not a power of two, or the allocation fails.
    pub fn zeroed(len: usize, align: usize) -> Option<AlignedBuf> {
        if len == 0 {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(len, align).ok()?;
        // SAFETY: the layout's size is not zero (checked above).
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` bytes this value owns, initialised (zeroed at
        // allocation), and `&self` keeps them from being written meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

/// The alignment `O_DIRECT` I/O on `fd` needs, as the kernel reports it (`statx` with
/// `STATX_DIOALIGN`, Linux 6.1 and later): the larger of the buffer-address and the file-offset
/// alignment, which lengths must be multiples of too. `None` when the kernel or the file system
/// does not report it (or reports that the file does not support `O_DIRECT`).
pub fn dio_alignment(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: `statx` is plain old data, for which all zeros is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty, NUL-terminated path with AT_EMPTY_PATH makes statx look at `fd`
    // itself, which the borrow keeps open; the kernel writes only into `stx`, which lives
    // across the call.
    let res = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if res != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align))
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `zeroed` with this very layout and is freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

// SAFETY: the allocation belongs to the value alone and does not move when the value moves;
// it is freed only by `Drop`, which the executor delays until the kernel is done with it.
unsafe impl IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.layout.size()
    }
    fn bytes_total(&self) -> usize {
        self.layout.size()
    }
}

// SAFETY: as for `IoBuf`; the buffer is always fully initialised (zeroed at allocation).
unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, _n: usize) {}
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
    fn aligned_buf_starts_at_its_alignment_and_is_zeroed() {
        for align in [512, 4096] {
            let mut b = AlignedBuf::zeroed(3 * align, align).expect("alloc");
            assert_eq!(b.stable_ptr() as usize % align, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[align] = 7;
            assert_eq!((b.bytes_init(), b.as_slice()[align]), (3 * align, 7));
        }
        assert!(AlignedBuf::zeroed(0, 512).is_none());
        assert!(AlignedBuf::zeroed(512, 3).is_none());
    }

    #[test]
    fn dio_alignment_is_a_power_of_two_when_reported() {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(std::env::temp_dir()).expect("open temp dir");
        if let Some(a) = dio_alignment(f.as_fd()) {
            assert!(a.is_power_of_two(), "{a}");
        }
    }

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
