//! Helpers shared by the integration tests: pipes, files, and buffers whose lifetime a test
//! can observe.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use executor::{IoBuf, IoBufMut, IoVecs, IoVecsMut};

/// A pipe: (read end, write end), both blocking and close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both descriptors are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// An anonymous memory file holding `contents`.
pub fn memfd(contents: &[u8]) -> File {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"executor-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is ours.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(contents).unwrap();
    f
}

/// A file under the temporary directory, removed when dropped.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(contents: &[u8]) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "executor-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile { path }
    }

    pub fn rw(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    pub fn ro(&self) -> File {
        File::open(&self.path).unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A unique path for a unix socket, removed when dropped.
pub fn socket_path() -> TempFile {
    let f = TempFile::new(b"");
    std::fs::remove_file(&f.path).unwrap();
    f
}

/// An anonymous shared mapping: stands in for guest memory.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Arc<Mapping> {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Arc::new(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies the mapping out (no op may be in flight on it).
    pub fn to_vec(&self) -> Vec<u8> {
        // SAFETY: the mapping is `len` readable bytes, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }

    /// Fills the mapping (no op may be in flight on it).
    pub fn fill(&self, byte: u8) {
        // SAFETY: the mapping is `len` writable bytes, alive while `self` is.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }
}

// SAFETY: the mapping is plain shared memory, valid on every thread until unmapped in drop;
// the methods only copy in or out of it.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` exposes no reference into the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Regions of a [`Mapping`], holding the mapping alive: like a guest-memory iovec list.
pub struct MemIovecs {
    pub mem: Arc<Mapping>,
    iovecs: Vec<libc::iovec>,
}

impl MemIovecs {
    /// `ranges` of (offset, len) inside the mapping.
    pub fn new(mem: &Arc<Mapping>, ranges: &[(usize, usize)]) -> MemIovecs {
        let iovecs = ranges
            .iter()
            .map(|&(off, len)| {
                assert!(off + len <= mem.len);
                libc::iovec {
                    // SAFETY: checked just above to stay inside the mapping.
                    iov_base: unsafe { mem.ptr.add(off) }.cast(),
                    iov_len: len,
                }
            })
            .collect();
        MemIovecs {
            mem: mem.clone(),
            iovecs,
        }
    }
}

// SAFETY: the iovecs point into the mapping, which the Arc keeps mapped while the value is
// alive; the Vec of iovecs does not move when the value moves.
unsafe impl IoVecs for MemIovecs {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

// SAFETY: the mapping is writable and the tests hold no reference into it during an op.
unsafe impl IoVecsMut for MemIovecs {}

/// A buffer carrying a token whose strong count shows whether the buffer is still alive.
pub struct TrackedBuf {
    data: Box<[u8]>,
    pub token: Arc<()>,
}

impl TrackedBuf {
    pub fn new(len: usize, token: &Arc<()>) -> TrackedBuf {
        TrackedBuf {
            data: vec![0u8; len].into_boxed_slice(),
            token: token.clone(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

// SAFETY: a boxed slice's heap buffer does not move when the value moves.
unsafe impl IoBuf for TrackedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.data.len()
    }
    fn bytes_total(&self) -> usize {
        self.data.len()
    }
}

// SAFETY: as above; the slice is always initialised.
unsafe impl IoBufMut for TrackedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, _n: usize) {}
}

/// Writes all of `data` to a descriptor with write(2).
pub fn write_fd(fd: &OwnedFd, data: &[u8]) {
    let mut f = File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}
