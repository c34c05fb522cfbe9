//! File descriptors and the operations on them.
//!
//! The data-path operations (and [`nop`]) are `#[inline(always)]`: inlined, the future they
//! return is built where the task keeps it. Called, it is built in the callee's frame and
//! copied into the task right away, and that copy reads back fields just stored in smaller
//! pieces (the one-byte tags of `Option`s), which the store buffer cannot forward: a stall
//! on every operation. Inlining took the `executor` bench's nop/qd32 from 0.58x to 0.63x
//! the hand-written loop.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use crate::buf::{BufVec, IoBuf, IoBufMut, IoVecs, IoVecsMut};
use crate::driver::{self, to_result, Cleanup, Op};
use crate::runtime::current_driver;

/// Offset that makes read and write use (and advance) the file position, as read(2) and
/// write(2) do; for pipes and sockets any offset means the same.
pub(crate) const CURRENT_POSITION: u64 = u64::MAX;

/// What an operation addresses: a descriptor it keeps open, or a registered file.
#[derive(Clone)]
pub(crate) enum Source {
    Owned(Rc<OwnedFd>),
    Fixed(u32),
}

/// Builds an SQE for either kind of source.
macro_rules! with_target {
    ($src:expr, $t:ident => $build:expr) => {
        match $src {
            $crate::fd::Source::Owned(fd) => {
                let $t = ::io_uring::types::Fd(fd.as_raw_fd());
                $build
            }
            $crate::fd::Source::Fixed(i) => {
                let $t = ::io_uring::types::Fixed(*i);
                $build
            }
        }
    };
}
pub(crate) use with_target;

/// A file descriptor for io_uring operations, cheap to clone.
///
/// Every operation keeps the descriptor open until the kernel completes it, so closing the
/// last handle never redirects queued I/O to whatever file reuses the number.
#[derive(Clone)]
pub struct AsyncFd {
    pub(crate) src: Source,
}

impl fmt::Debug for AsyncFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.src {
            Source::Owned(fd) => write!(f, "AsyncFd({})", fd.as_raw_fd()),
            Source::Fixed(i) => write!(f, "AsyncFd(fixed {i})"),
        }
    }
}

impl From<OwnedFd> for AsyncFd {
    fn from(fd: OwnedFd) -> AsyncFd {
        AsyncFd::new(fd)
    }
}

/// Turns a CQE result into a byte count.
fn to_len(res: io::Result<i32>) -> io::Result<usize> {
    res.map(|n| n as usize)
}

/// Submits `sqe` on the current executor. Outside one, the op waits for its first poll and
/// enters the ring of the executor running then; polled outside any executor, it resolves to
/// an error.
///
/// # Safety
/// As for `driver::submit`: every pointer in `sqe` points into `data` (at the same address
/// when `data` moves) or outlives the op.
#[inline(always)]
pub(crate) unsafe fn submit<T: 'static>(
    sqe: squeue::Entry,
    data: T,
    cleanup: Option<Cleanup>,
) -> Op<T> {
    match current_driver() {
        // SAFETY: forwarded from the caller.
        Ok(d) => unsafe { driver::submit(d, sqe, data, cleanup) },
        // SAFETY: forwarded from the caller.
        Err(_) => unsafe { Op::deferred(sqe, data, cleanup) },
    }
}

impl AsyncFd {
    /// Wraps a descriptor. Prefer blocking descriptors: on some kernels io_uring completes
    /// reads of an O_NONBLOCK descriptor with EAGAIN instead of waiting (6.18 waits); callers
    /// that take descriptors from elsewhere should handle EAGAIN with `poll_readable`.
    pub fn new(fd: OwnedFd) -> AsyncFd {
        AsyncFd {
            src: Source::Owned(Rc::new(fd)),
        }
    }

    /// The file registered at `index` with [`crate::Builder::register_files`].
    pub fn fixed(index: u32) -> AsyncFd {
        AsyncFd {
            src: Source::Fixed(index),
        }
    }

    /// The raw descriptor, unless this is a registered file.
    pub fn as_raw_fd(&self) -> Option<RawFd> {
        match &self.src {
            Source::Owned(fd) => Some(fd.as_raw_fd()),
            Source::Fixed(_) => None,
        }
    }

    /// The descriptor back, when no clone and no operation holds it any more.
    pub fn into_owned(self) -> Result<OwnedFd, AsyncFd> {
        match self.src {
            Source::Owned(fd) => Rc::try_unwrap(fd).map_err(|fd| AsyncFd {
                src: Source::Owned(fd),
            }),
            src => Err(AsyncFd { src }),
        }
    }

    /// Reads into `buf` from `offset`; resolves to the bytes read (0 at end of file) and the
    /// buffer. The read fills the buffer from its start, up to its capacity (`bytes_total`):
    /// bytes already in a `Vec` are overwritten, and its length becomes at least the count
    /// read (it never shrinks).
    #[inline(always)]
    pub fn read_at<B: IoBufMut>(
        &self,
        mut buf: B,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, B)> + 'static {
        let ptr = buf.stable_mut_ptr();
        let len = buf.bytes_total().min(u32::MAX as usize) as u32;
        let sqe =
            with_target!(&self.src, t => opcode::Read::new(t, ptr, len).offset(offset).build());
        // SAFETY: `ptr` is the IoBufMut's stable pointer, valid for `len` bytes while the
        // buffer, which the op owns, is alive.
        let op = unsafe { submit(sqe, (self.src.clone(), buf), None) };
        op.map(|res, (_, mut buf): (Source, B)| {
            let res = to_len(res);
            if let Ok(n) = res {
                // SAFETY: the kernel wrote `n` bytes at the start of the buffer.
                unsafe { buf.set_init(n) };
            }
            (res, buf)
        })
    }

    /// Reads at the current position (pipes, sockets, eventfds, or files read in order).
    #[inline(always)]
    pub fn read<B: IoBufMut>(
        &self,
        buf: B,
    ) -> impl Future<Output = (io::Result<usize>, B)> + 'static {
        self.read_at(buf, CURRENT_POSITION)
    }

    /// Writes the initialised bytes of `buf` at `offset`; resolves to the bytes written.
    #[inline(always)]
    pub fn write_at<B: IoBuf>(
        &self,
        buf: B,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, B)> + 'static {
        let ptr = buf.stable_ptr();
        let len = buf.bytes_init().min(u32::MAX as usize) as u32;
        let sqe =
            with_target!(&self.src, t => opcode::Write::new(t, ptr, len).offset(offset).build());
        // SAFETY: `ptr` is the IoBuf's stable pointer to `len` initialised bytes.
        let op = unsafe { submit(sqe, (self.src.clone(), buf), None) };
        op.map(|res, (_, buf): (Source, B)| (to_len(res), buf))
    }

    /// Writes at the current position.
    #[inline(always)]
    pub fn write<B: IoBuf>(
        &self,
        buf: B,
    ) -> impl Future<Output = (io::Result<usize>, B)> + 'static {
        self.write_at(buf, CURRENT_POSITION)
    }

    /// Scatters a read over several owned buffers, in order, each filled from its start up to
    /// its capacity (as for [`AsyncFd::read_at`]).
    #[inline(always)]
    pub fn readv_at<B: IoBufMut>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, Vec<B>)> + 'static {
        let op = self.readv_op(BufVec::for_read(bufs), offset);
        async move {
            let (res, mut bv) = op.await;
            if let Ok(n) = res {
                // SAFETY: the kernel wrote `n` bytes across the gathered buffers, in order.
                unsafe { bv.set_init(n) };
            }
            (res, bv.bufs)
        }
    }

    /// Gathers a write from several owned buffers.
    #[inline(always)]
    pub fn writev_at<B: IoBuf>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, Vec<B>)> + 'static {
        let op = self.writev_op(BufVec::for_write(bufs), offset);
        async move {
            let (res, bv) = op.await;
            (res, bv.bufs)
        }
    }

    /// Reads straight into memory regions the caller owns (guest memory): no bounce copy.
    /// `mem` (a handle keeping the mapping alive, and its iovecs) is held until completion.
    #[inline(always)]
    pub fn read_mem_at<M: IoVecsMut>(
        &self,
        mem: M,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        self.readv_op(mem, offset)
    }

    /// [`read_mem_at`](Self::read_mem_at) that does not wait for data: with nothing to read
    /// it fails with EAGAIN at once (`RWF_NOWAIT`) instead of waiting in the ring.
    #[inline(always)]
    pub fn read_mem_at_nowait<M: IoVecsMut>(
        &self,
        mem: M,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: `IoVecsMut` regions are writable.
        unsafe { self.vectored_flags(mem, offset, false, libc::RWF_NOWAIT) }
    }

    /// One READ per region of `mem`, all submitted at once: each read takes what one read of
    /// the descriptor gives (a tap's next frame) into its own region. Resolves, once every one
    /// completed, to their results in region order and `mem`. With `nowait` a read that finds
    /// nothing fails with EAGAIN at once (`RWF_NOWAIT`) instead of waiting in the ring. One
    /// future for the batch: cheaper than a [`read_mem_at`](Self::read_mem_at) per region.
    /// The reads enter the ring when the future is first polled.
    #[inline(always)]
    pub fn read_each<M: IoVecsMut>(
        &self,
        mem: M,
        nowait: bool,
    ) -> impl Future<Output = (Vec<io::Result<usize>>, M)> + 'static {
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        let src = self.src.clone();
        async move {
            let d = match current_driver() {
                Ok(d) => d,
                Err(e) => {
                    let failed = (0..mem.iovecs().len())
                        .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                        .collect();
                    return (failed, mem);
                }
            };
            let sqes: Vec<_> = mem
                .iovecs()
                .iter()
                .map(|one| {
                    // A region over u32::MAX bytes is cut there, as a short read.
                    let len = one.iov_len.min(u32::MAX as usize) as u32;
                    with_target!(&src, t => opcode::Read::new(t, one.iov_base.cast(), len)
                        .rw_flags(flags)
                        .build())
                })
                .collect();
            // SAFETY: the regions are writable (`IoVecsMut`) and stay valid while `mem`,
            // owned by the ops, is alive (the `IoVecs` contract).
            let ops = unsafe { driver::submit_all(d, sqes, (src, mem)) };
            let (results, (_, mem)) = ops.await;
            let results = results.into_iter().map(|res| to_len(to_result(res)));
            (results.collect(), mem)
        }
    }

    /// Writes straight from memory regions the caller owns (guest memory).
    #[inline(always)]
    pub fn write_mem_at<M: IoVecs>(
        &self,
        mem: M,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        self.writev_op(mem, offset)
    }

    fn readv_op<M: IoVecs>(
        &self,
        mem: M,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: callers pass writable regions only (`IoVecsMut`, or `BufVec` of `IoBufMut`).
        unsafe { self.vectored(mem, offset, false) }
    }

    fn writev_op<M: IoVecs>(
        &self,
        mem: M,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: a write only reads the regions.
        unsafe { self.vectored(mem, offset, true) }
    }

    /// READV (the kernel writes the regions) or WRITEV (it reads them) over `mem`'s iovecs;
    /// READ or WRITE when there is one region (a restricted ring allows those too).
    ///
    /// # Safety
    /// For a read, every region must be writable memory nothing else references.
    unsafe fn vectored<M: IoVecs>(
        &self,
        mem: M,
        offset: u64,
        write: bool,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: forwarded from the caller.
        unsafe { self.vectored_flags(mem, offset, write, 0) }
    }

    /// [`vectored`](Self::vectored) with preadv2/pwritev2 flags (`RWF_*`).
    ///
    /// # Safety
    /// As for `vectored`.
    unsafe fn vectored_flags<M: IoVecs>(
        &self,
        mem: M,
        offset: u64,
        write: bool,
        rw_flags: i32,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        let iov = mem.iovecs();
        let (ptr, n) = (iov.as_ptr(), iov.len().min(u32::MAX as usize) as u32);
        let sqe = if let [one] = iov {
            // One region: READ/WRITE spare the kernel importing an iovec array (a 4 KiB
            // block request, a network frame). A region over u32::MAX bytes is cut there,
            // as a short transfer.
            let len = one.iov_len.min(u32::MAX as usize) as u32;
            if write {
                with_target!(&self.src, t => opcode::Write::new(t, one.iov_base.cast_const().cast(), len)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build())
            } else {
                with_target!(&self.src, t => opcode::Read::new(t, one.iov_base.cast(), len)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build())
            }
        } else if write {
            with_target!(&self.src, t => opcode::Writev::new(t, ptr, n)
                .offset(offset)
                .rw_flags(rw_flags)
                .build())
        } else {
            with_target!(&self.src, t => opcode::Readv::new(t, ptr, n)
                .offset(offset)
                .rw_flags(rw_flags)
                .build())
        };
        // SAFETY: the iovecs and their regions stay valid while `mem`, owned by the op, is
        // alive (the `IoVecs` contract); writability for reads is the caller's promise.
        let op = unsafe { submit(sqe, (self.src.clone(), mem), None) };
        op.map(|res, (_, mem): (Source, M)| (to_len(res), mem))
    }

    fn simple(&self, sqe: squeue::Entry) -> impl Future<Output = io::Result<i32>> + 'static {
        // SAFETY: callers pass SQEs that hold no pointers.
        let op = unsafe { submit(sqe, self.src.clone(), None) };
        op.map(|res, _| res)
    }

    /// Flushes data and metadata to stable storage (fsync(2)).
    pub fn fsync(&self) -> impl Future<Output = io::Result<()>> + 'static {
        let sqe = with_target!(&self.src, t => opcode::Fsync::new(t).build());
        let op = self.simple(sqe);
        async move { op.await.map(drop) }
    }

    /// Flushes data (and the metadata needed to read it) to stable storage (fdatasync(2)).
    pub fn fdatasync(&self) -> impl Future<Output = io::Result<()>> + 'static {
        let sqe = with_target!(&self.src, t => opcode::Fsync::new(t)
            .flags(types::FsyncFlags::DATASYNC)
            .build());
        let op = self.simple(sqe);
        async move { op.await.map(drop) }
    }

    /// fallocate(2) with `mode` (FALLOC_FL_* flags).
    pub fn fallocate(
        &self,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + 'static {
        let sqe = with_target!(&self.src, t => opcode::Fallocate::new(t, len)
            .offset(offset)
            .mode(mode)
            .build());
        let op = self.simple(sqe);
        async move { op.await.map(drop) }
    }

    /// Deallocates a range; it reads back as zeros and the file size is kept.
    pub fn punch_hole(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + 'static {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes a range, keeping it allocated and the file size unchanged.
    pub fn zero_range(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + 'static {
        self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Waits until the descriptor is readable; resolves to the poll(2) revents.
    #[inline(always)]
    pub fn poll_readable(&self) -> impl Future<Output = io::Result<u32>> + 'static {
        self.poll(libc::POLLIN as u32)
    }

    /// Waits until the descriptor is writable; resolves to the poll(2) revents.
    #[inline(always)]
    pub fn poll_writable(&self) -> impl Future<Output = io::Result<u32>> + 'static {
        self.poll(libc::POLLOUT as u32)
    }

    fn poll(&self, events: u32) -> impl Future<Output = io::Result<u32>> + 'static {
        let sqe = with_target!(&self.src, t => opcode::PollAdd::new(t, events).build());
        let op = self.simple(sqe);
        async move { op.await.map(|r| r as u32) }
    }

    /// Cancels every operation in flight on this descriptor: each completes with ECANCELED
    /// (or its own result, if it was already finishing). Resolves to how many were found.
    pub fn cancel_all(&self) -> impl Future<Output = io::Result<usize>> + 'static {
        let builder = match &self.src {
            Source::Owned(fd) => types::CancelBuilder::fd(types::Fd(fd.as_raw_fd())),
            Source::Fixed(i) => types::CancelBuilder::fd(types::Fixed(*i)),
        };
        let op = self.simple(opcode::AsyncCancel2::new(builder.all()).build());
        async move {
            match op.await {
                Ok(n) => Ok(n as usize),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(0),
                Err(e) => Err(e),
            }
        }
    }
}

/// Submits a NOP: the cheapest round trip through the ring (benchmarks, tests).
#[inline(always)]
pub fn nop() -> impl Future<Output = io::Result<()>> + 'static {
    // SAFETY: a NOP holds no pointers.
    let op = unsafe { submit(opcode::Nop::new().build(), (), None) };
    op.map(|res, ()| res.map(drop))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    #[test]
    fn current_position_is_the_kernels_minus_one() {
        assert_eq!(CURRENT_POSITION as i64, -1);
    }

    #[test]
    fn to_len_keeps_counts_and_errors() {
        assert_eq!(to_len(Ok(7)).unwrap(), 7);
        let e = to_len(Err(io::Error::from_raw_os_error(libc::EIO))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn debug_shows_the_descriptor_or_index() {
        // SAFETY: plain syscall; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created and ours.
        let f = AsyncFd::new(unsafe { OwnedFd::from_raw_fd(fd) });
        assert_eq!(format!("{f:?}"), format!("AsyncFd({fd})"));
        assert_eq!(format!("{:?}", AsyncFd::fixed(4)), "AsyncFd(fixed 4)");
        assert!(AsyncFd::fixed(4).into_owned().is_err());
    }

    #[test]
    fn ops_polled_outside_an_executor_give_their_buffers_back() {
        let f = AsyncFd::fixed(0);
        let (res, buf) = futures::executor::block_on(f.read_at(vec![1u8, 2], 0));
        assert!(res.is_err());
        assert_eq!(buf, [1, 2]);
        let (res, bufs) = futures::executor::block_on(f.writev_at(vec![b"a".as_slice()], 0));
        assert!(res.is_err());
        assert_eq!(bufs, [b"a"]);
        assert!(futures::executor::block_on(f.fsync()).is_err());
        assert!(futures::executor::block_on(nop()).is_err());
    }
}
