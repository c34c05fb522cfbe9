//! Eventfds: the kick and call paths of virtqueues.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

use crate::fd::AsyncFd;

/// An eventfd counter. `Send`: it can be written from any thread; read it on an executor
/// through [`EventFdStream`].
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with a zero counter (blocking, close-on-exec).
    pub fn new() -> io::Result<EventFd> {
        // Blocking on purpose: on some kernels io_uring completes reads of O_NONBLOCK files
        // with EAGAIN instead of waiting for data.
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Adds `value` to the counter (wakes a reader). Blocks while the counter cannot take
    /// `value` without passing its maximum (`u64::MAX - 1`), unless the eventfd is
    /// [nonblocking](EventFd::set_nonblocking), where that fails with `WouldBlock`. An eventfd
    /// from another process may be full on purpose: signal those with [`EventFd::notify`].
    pub fn write(&self, value: u64) -> io::Result<()> {
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&value as *const u64).cast(), 8) };
        if n == 8 {
            Ok(())
        } else if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Err(io::Error::other("short eventfd write"))
        }
    }

    /// Makes the eventfd nonblocking: a write that would block fails with `WouldBlock`
    /// instead. This sets `O_NONBLOCK` on the open file description, which every holder of
    /// the eventfd shares (the peer that sent it, too; readers that wait with poll, io_uring
    /// or a KVM irqfd are unaffected). The other `F_SETFL` flags mean nothing to an eventfd, so
    /// the call sets exactly `O_NONBLOCK` (device seccomp policies allow only that value).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: F_SETFL on a descriptor we own changes only its status flags; checked.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes the reader without ever blocking, on a [nonblocking](EventFd::set_nonblocking)
    /// eventfd: adds 1 to the counter and returns `Ok(true)`, or returns `Ok(false)` when the
    /// counter is already at its maximum. A full counter is nonzero, so its reader has a
    /// wake-up pending anyway: nothing is lost. (On a blocking eventfd a full counter blocks,
    /// as [`EventFd::write`] does.)
    pub fn notify(&self) -> io::Result<bool> {
        match self.write(1) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Another handle on the same counter.
    pub fn try_clone(&self) -> io::Result<EventFd> {
        Ok(EventFd {
            fd: self.fd.try_clone()?,
        })
    }

    /// A stream of counter values on the current executor.
    pub fn into_stream(self) -> EventFdStream {
        EventFdStream::new(self.fd)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<OwnedFd> for EventFd {
    /// Wraps an eventfd received from elsewhere (a vhost-user peer).
    fn from(fd: OwnedFd) -> EventFd {
        EventFd { fd }
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.fd
    }
}

type ReadFuture = Pin<Box<dyn Future<Output = (io::Result<usize>, Box<[u8]>)>>>;

/// Reads of an eventfd as a stream, with one persistent read in flight: a read survives the
/// drop of the `next()` future that waited on it (in `select!`, say), so no wake is lost and
/// no read is cancelled and resubmitted on every turn.
pub struct EventFdStream {
    fd: AsyncFd,
    pending: Option<ReadFuture>,
}

impl std::fmt::Debug for EventFdStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFdStream")
            .field("fd", &self.fd)
            .field("in_flight", &self.pending.is_some())
            .finish()
    }
}

impl EventFdStream {
    /// A stream over an eventfd (which must be blocking; see [`AsyncFd::new`]).
    pub fn new(fd: OwnedFd) -> EventFdStream {
        EventFdStream {
            fd: AsyncFd::new(fd),
            pending: None,
        }
    }

    /// Waits for the counter to become non-zero; resolves to its value (and resets it).
    pub async fn next_value(&mut self) -> io::Result<u64> {
        std::future::poll_fn(|cx| self.poll_value(cx)).await
    }

    fn poll_value(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let fd = &self.fd;
        let read = self
            .pending
            .get_or_insert_with(|| Box::pin(fd.read(vec![0u8; 8].into_boxed_slice())));
        let (res, buf) = futures::ready!(read.as_mut().poll(cx));
        self.pending = None;
        match res {
            Ok(8) => {
                let mut v = [0u8; 8];
                v.copy_from_slice(&buf);
                Poll::Ready(Ok(u64::from_ne_bytes(v)))
            }
            Ok(n) => Poll::Ready(Err(io::Error::other(format!("eventfd read {n} bytes")))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Stream for EventFdStream {
    type Item = io::Result<u64>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_value(cx).map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read_counter(fd: &EventFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        v
    }

    #[test]
    fn writes_add_to_the_counter_and_a_read_resets_it() {
        let e = EventFd::new().unwrap();
        e.write(2).unwrap();
        e.try_clone().unwrap().write(3).unwrap();
        assert_eq!(read_counter(&e), 5);
        e.write(1).unwrap();
        assert_eq!(read_counter(&e), 1);
    }

    #[test]
    fn new_eventfd_is_blocking_and_close_on_exec() {
        let e = EventFd::new().unwrap();
        // SAFETY: F_GETFL and F_GETFD only inspect the descriptor.
        let (fl, fd) = unsafe {
            (
                libc::fcntl(e.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(e.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fd & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn writing_the_maximum_value_is_refused() {
        // u64::MAX is not a valid eventfd value: EINVAL, not a block.
        let e = EventFd::new().unwrap();
        let err = e.write(u64::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn notify_on_a_full_nonblocking_eventfd_returns_at_once() {
        let e = EventFd::new().unwrap();
        let peer = e.try_clone().unwrap();
        peer.write(u64::MAX - 1).unwrap();
        e.set_nonblocking().unwrap();
        // The flag is on the shared open file description.
        // SAFETY: F_GETFL only inspects the descriptor.
        let fl = unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        // A blocking write(1) would wait here for a reader forever.
        assert!(!e.notify().unwrap());
        assert_eq!(read_counter(&peer), u64::MAX - 1);
        assert!(e.notify().unwrap());
        assert_eq!(read_counter(&peer), 1);
    }

    #[test]
    fn converts_to_and_from_owned_fd() {
        let e = EventFd::new().unwrap();
        let raw = e.as_raw_fd();
        let owned = OwnedFd::from(e);
        assert_eq!(owned.as_raw_fd(), raw);
        let e = EventFd::from(owned);
        assert_eq!(e.as_fd().as_raw_fd(), raw);
    }

    #[test]
    fn stream_outside_an_executor_reports_an_error() {
        let e = EventFd::new().unwrap();
        e.write(1).unwrap();
        let mut s = e.into_stream();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(res) = s.poll_value(&mut cx) else {
            panic!("no executor: resolves at once");
        };
        assert!(res.is_err());
        assert!(format!("{s:?}").contains("in_flight: false"));
    }
}
