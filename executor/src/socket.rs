//! Unix sockets: accept, connect, and messages carrying file descriptors (SCM_RIGHTS).

use std::any::Any;
use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use io_uring::opcode;

use crate::buf::{BufVec, IoBuf, IoBufMut, IoVecs, IoVecsMut};
use crate::fd::{submit, with_target, AsyncFd, Source};

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

/// What `recvmsg` received besides the bytes.
#[derive(Debug)]
pub struct RecvMsg {
    /// Bytes received into the buffer (0: the peer closed the connection).
    pub len: usize,
    /// Descriptors received with the message, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The peer sent more descriptors than there was room for (MSG_CTRUNC); the extra ones
    /// were closed by the kernel.
    pub fds_truncated: bool,
    /// The message was longer than the buffer (MSG_TRUNC, datagram sockets).
    pub truncated: bool,
}

/// A message header, its one iovec and its control buffer, boxed together so the pointers
/// between them stay valid while the kernel uses them.
struct MsgState {
    hdr: libc::msghdr,
    iov: libc::iovec,
    /// u64 elements keep the control buffer aligned for cmsghdr.
    control: Vec<u64>,
    /// Duplicates of the descriptors being sent, open until the send completes.
    fds: Vec<OwnedFd>,
}

impl MsgState {
    fn new(ptr: *mut u8, len: usize, nfds: usize) -> Box<MsgState> {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((nfds * size_of::<RawFd>()) as u32) } as usize;
        let control = vec![0u64; space.div_ceil(8)];
        let mut st = Box::new(MsgState {
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            hdr: unsafe { zeroed() },
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            control,
            fds: Vec::new(),
        });
        st.hdr.msg_iov = &mut st.iov;
        st.hdr.msg_iovlen = 1;
        if nfds > 0 {
            st.hdr.msg_control = st.control.as_mut_ptr().cast();
            st.hdr.msg_controllen = space as _;
        }
        st
    }

    /// Descriptors in the control messages the kernel filled in.
    ///
    /// # Safety
    /// The kernel must have completed a recvmsg on this header.
    unsafe fn take_fds(&mut self) -> Vec<OwnedFd> {
        let mut fds = Vec::new();
        if self.hdr.msg_controllen == 0 {
            return fds;
        }
        // SAFETY: the header and its control buffer were filled in by the kernel; the CMSG
        // macros walk it within `msg_controllen`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&self.hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    let n = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / size_of::<RawFd>();
                    for i in 0..n {
                        // Each descriptor was installed for us by the kernel: we own it.
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&self.hdr, cmsg);
            }
        }
        fds
    }
}

/// Closes descriptors received by a recvmsg whose future was dropped.
fn close_received<B: 'static>(data: &mut dyn Any, res: i32) {
    if res < 0 {
        return;
    }
    if let Some(data) = data.downcast_mut::<(Source, Box<MsgState>, B)>() {
        // SAFETY: `res >= 0`: the recvmsg on this header completed.
        drop(unsafe { data.1.take_fds() });
    }
}

impl AsyncFd {
    /// Sends the initialised bytes of `buf` and, with them, `fds` (SCM_RIGHTS).
    #[inline(always)]
    pub fn sendmsg<B: IoBuf>(
        &self,
        buf: B,
        fds: &[BorrowedFd<'_>],
    ) -> impl Future<Output = (io::Result<usize>, B)> + 'static {
        let mut st = MsgState::new(buf.stable_ptr().cast_mut(), buf.bytes_init(), fds.len());
        let dup: io::Result<Vec<OwnedFd>> = fds.iter().map(|fd| fd.try_clone_to_owned()).collect();
        let (st, op) = match dup {
            Err(e) => (None, Err(e)),
            Ok(_) if fds.len() > MAX_FDS => (
                None,
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many descriptors for one message",
                )),
            ),
            Ok(dup) => {
                if !dup.is_empty() {
                    // SAFETY: the control buffer has CMSG_SPACE for `dup.len()` descriptors,
                    // and msg_controllen says so; the macros stay inside it.
                    unsafe {
                        let cmsg = libc::CMSG_FIRSTHDR(&st.hdr);
                        (*cmsg).cmsg_level = libc::SOL_SOCKET;
                        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                        (*cmsg).cmsg_len =
                            libc::CMSG_LEN((dup.len() * size_of::<RawFd>()) as u32) as _;
                        let data = libc::CMSG_DATA(cmsg) as *mut RawFd;
                        for (i, fd) in dup.iter().enumerate() {
                            data.add(i).write_unaligned(fd.as_raw_fd());
                        }
                    }
                }
                st.fds = dup;
                (Some(st), Ok(()))
            }
        };
        let op = match (st, op) {
            (Some(st), Ok(())) => {
                let hdr: *const libc::msghdr = &st.hdr;
                let sqe = with_target!(&self.src, t => opcode::SendMsg::new(t, hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build());
                // SAFETY: the header, iovec, control buffer and descriptors are boxed in `st`;
                // the iovec points into `buf`'s stable memory; the op owns both.
                Ok(unsafe { submit(sqe, (self.src.clone(), st, buf), None) })
            }
            (_, Err(e)) => Err((e, buf)),
            (None, Ok(())) => unreachable!("a message state exists when set-up succeeded"),
        };
        async move {
            match op {
                Ok(op) => {
                    let (res, (_, _, buf)) = op.await;
                    (res.map(|n| n as usize), buf)
                }
                Err((e, buf)) => (Err(e), buf),
            }
        }
    }

    /// Sends the initialised bytes of `bufs`, in order, as one message (`MSG_NOSIGNAL`: a
    /// peer that closed its end gives EPIPE, never a SIGPIPE). A stream socket may take only
    /// a first part; the result says how many bytes.
    #[inline(always)]
    pub fn send_vectored<B: IoBuf>(
        &self,
        bufs: Vec<B>,
    ) -> impl Future<Output = (io::Result<usize>, Vec<B>)> + 'static {
        let bv = BufVec::for_write(bufs);
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        hdr.msg_iov = bv.iovecs.as_ptr().cast_mut();
        hdr.msg_iovlen = bv.iovecs.len() as _;
        let sqe = with_target!(&self.src, t => opcode::SendMsg::new(t, &*hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build());
        // SAFETY: the header is boxed and its iovecs live in `bv`'s Vec, both owned by the
        // op, as are the buffers the iovecs point into (stable while `bv` lives: `IoBuf`).
        let op = unsafe { submit(sqe, (self.src.clone(), hdr, bv), None) };
        async move {
            let (res, (_, _, bv)) = op.await;
            (res.map(|n| n as usize), bv.bufs)
        }
    }

    /// Sends the regions of `mem` (guest memory, say), in order, as one message, taking only
    /// what the socket has room for now: `MSG_DONTWAIT` makes the operation complete when it
    /// is submitted, with the bytes taken (a stream socket may take a first part) or
    /// EWOULDBLOCK when there is no room, never waiting in the ring; `MSG_NOSIGNAL` makes a
    /// peer that closed its end EPIPE. The regions are only read.
    #[inline(always)]
    pub fn send_mem_nowait<M: IoVecs>(
        &self,
        mem: M,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: a send only reads the regions.
        unsafe { self.mem_msg_nowait(mem, false) }
    }

    /// Receives into the regions of `mem` (guest memory, say), in order, what the socket has
    /// now: `MSG_DONTWAIT` makes the operation complete when it is submitted, with the bytes
    /// received (0: the peer closed its end) or EWOULDBLOCK when there is nothing, never
    /// waiting in the ring.
    #[inline(always)]
    pub fn recv_mem_nowait<M: IoVecsMut>(
        &self,
        mem: M,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: `IoVecsMut` regions are writable.
        unsafe { self.mem_msg_nowait(mem, true) }
    }

    /// One message over the regions of `mem` that never waits: a receive into them
    /// (`recv`), else a send from them.
    ///
    /// # Safety
    /// With `recv`, every region must be writable (the `IoVecsMut` contract).
    unsafe fn mem_msg_nowait<M: IoVecs>(
        &self,
        mem: M,
        recv: bool,
    ) -> impl Future<Output = (io::Result<usize>, M)> + 'static {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        let iovecs = mem.iovecs();
        hdr.msg_iov = iovecs.as_ptr().cast_mut();
        hdr.msg_iovlen = iovecs.len() as _;
        let sqe = if recv {
            with_target!(&self.src, t => opcode::RecvMsg::new(t, &mut *hdr)
                .flags(libc::MSG_DONTWAIT as u32)
                .build())
        } else {
            with_target!(&self.src, t => opcode::SendMsg::new(t, &*hdr)
                .flags((libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) as u32)
                .build())
        };
        // SAFETY: the header is boxed and owned by the op; its iovec array is `mem`'s, which
        // stays at the same address while `mem` lives (the `IoVecs` contract), and so do the
        // regions it describes, writable for a receive (the caller's promise); the op owns
        // `mem` until the completion.
        let op = unsafe { submit(sqe, (self.src.clone(), hdr, mem), None) };
        async move {
            let (res, (_, _, mem)) = op.await;
            (res.map(|n| n as usize), mem)
        }
    }

    /// Receives into `buf`, accepting up to `max_fds` descriptors with the message.
    #[inline(always)]
    pub fn recvmsg<B: IoBufMut>(
        &self,
        mut buf: B,
        max_fds: usize,
    ) -> impl Future<Output = (io::Result<RecvMsg>, B)> + 'static {
        let max_fds = max_fds.min(MAX_FDS);
        let mut st = MsgState::new(buf.stable_mut_ptr(), buf.bytes_total(), max_fds);
        if max_fds > 0 {
            // The kernel installs as many descriptors as fit after the header: with the
            // padded CMSG_SPACE it could install one more than `max_fds`.
            // SAFETY: CMSG_LEN only computes a size.
            st.hdr.msg_controllen =
                unsafe { libc::CMSG_LEN((max_fds * size_of::<RawFd>()) as u32) } as _;
        }
        let hdr: *mut libc::msghdr = &mut st.hdr;
        let sqe = with_target!(&self.src, t => opcode::RecvMsg::new(t, hdr)
            .flags(libc::MSG_CMSG_CLOEXEC as u32)
            .build());
        // SAFETY: header, iovec and control buffer are boxed in `st`; the iovec points into
        // `buf`'s stable writable memory; the op owns both. A dropped op's received
        // descriptors are closed by `close_received`.
        let op = unsafe {
            submit(
                sqe,
                (self.src.clone(), st, buf),
                Some(close_received::<B> as _),
            )
        };
        async move {
            let (res, (_, mut st, mut buf)) = op.await;
            match res {
                Ok(n) => {
                    let n = n as usize;
                    // SAFETY: the kernel wrote `n` bytes into the buffer.
                    unsafe { buf.set_init(n) };
                    // SAFETY: the recvmsg completed.
                    let fds = unsafe { st.take_fds() };
                    let flags = st.hdr.msg_flags;
                    let msg = RecvMsg {
                        len: n,
                        fds,
                        fds_truncated: flags & libc::MSG_CTRUNC != 0,
                        truncated: flags & libc::MSG_TRUNC != 0,
                    };
                    (Ok(msg), buf)
                }
                Err(e) => (Err(e), buf),
            }
        }
    }

    /// Accepts a connection on a listening socket.
    pub fn accept(&self) -> impl Future<Output = io::Result<AsyncFd>> + 'static {
        let sqe = with_target!(&self.src, t => opcode::Accept::new(t, std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build());
        // SAFETY: a null address is allowed and nothing else is referenced; an accepted
        // socket of a dropped op is closed by `close_accepted`.
        let op = unsafe { submit(sqe, self.src.clone(), Some(close_accepted)) };
        async move {
            let (res, _) = op.await;
            // SAFETY: a non-negative result is a new descriptor we own.
            res.map(|fd| AsyncFd::new(unsafe { OwnedFd::from_raw_fd(fd) }))
        }
    }
}

fn close_accepted(_: &mut dyn Any, res: i32) {
    if res >= 0 {
        // SAFETY: the completed accept installed this descriptor for us and nobody saw it.
        drop(unsafe { OwnedFd::from_raw_fd(res) });
    }
}

fn sockaddr_un(path: &Path) -> io::Result<(Box<libc::sockaddr_un>, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: Box<libc::sockaddr_un> = Box::new(unsafe { zeroed() });
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = OsStr::as_bytes(path.as_os_str());
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unix socket path is too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}

/// Connects to the unix stream socket at `path`. The future does not borrow `path`.
pub fn connect_unix(path: impl AsRef<Path>) -> impl Future<Output = io::Result<AsyncFd>> + 'static {
    let addr = sockaddr_un(path.as_ref());
    async move {
        let (addr, len) = addr?;
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is ours.
        let sock = AsyncFd::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let ptr: *const libc::sockaddr = (&*addr as *const libc::sockaddr_un).cast();
        let sqe = with_target!(&sock.src, t => opcode::Connect::new(t, ptr, len).build());
        // SAFETY: the address is boxed and owned by the op.
        let op = unsafe { submit(sqe, (sock.src.clone(), addr), None) };
        op.await.0?;
        Ok(sock)
    }
}

/// Binds and listens on a unix stream socket at `path`.
pub fn listen_unix(path: impl AsRef<Path>) -> io::Result<AsyncFd> {
    let listener = UnixListener::bind(path)?;
    Ok(AsyncFd::new(listener.into()))
}

/// A connected pair of unix stream sockets.
pub fn socketpair() -> io::Result<(AsyncFd, AsyncFd)> {
    let (a, b) = UnixStream::pair()?;
    Ok((AsyncFd::new(a.into()), AsyncFd::new(b.into())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_un_length_counts_the_family_path_and_nul() {
        let (addr, len) = sockaddr_un(Path::new("/tmp/x.sock")).unwrap();
        assert_eq!(addr.sun_family, libc::AF_UNIX as libc::sa_family_t);
        assert_eq!(len as usize, size_of::<libc::sa_family_t>() + 11 + 1);
        assert_eq!(addr.sun_path[11], 0);
    }

    #[test]
    fn sockaddr_un_refuses_a_path_without_room_for_the_nul() {
        let max = {
            // SAFETY: plain data.
            let a: libc::sockaddr_un = unsafe { zeroed() };
            a.sun_path.len()
        };
        assert!(sockaddr_un(Path::new(&"p".repeat(max - 1))).is_ok());
        let err = sockaddr_un(Path::new(&"p".repeat(max))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn msg_state_points_at_its_own_iovec_and_control_buffer() {
        let mut buf = [0u8; 4];
        let st = MsgState::new(buf.as_mut_ptr(), 4, 3);
        assert_eq!(st.hdr.msg_iov as *const libc::iovec, &st.iov as *const _);
        assert_eq!(st.hdr.msg_iovlen, 1);
        assert_eq!(st.hdr.msg_control as *const u64, st.control.as_ptr());
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(3 * size_of::<RawFd>() as u32) } as usize;
        assert_eq!(st.hdr.msg_controllen as u64, space as u64);
        assert!(st.control.len() * 8 >= space);
        let none = MsgState::new(buf.as_mut_ptr(), 4, 0);
        assert!(none.hdr.msg_control.is_null());
        assert_eq!(none.hdr.msg_controllen, 0);
    }

    #[test]
    fn take_fds_of_an_empty_control_buffer_is_empty() {
        let mut buf = [0u8; 4];
        let mut st = MsgState::new(buf.as_mut_ptr(), 4, 2);
        st.hdr.msg_controllen = 0;
        // SAFETY: a zero control length: nothing is read from the buffer.
        assert!(unsafe { st.take_fds() }.is_empty());
    }
}
