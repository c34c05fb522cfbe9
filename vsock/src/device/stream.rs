//! A connection's host stream: one task watches it for something to read while the guest
//! has credit (the rx queue then reads it straight into the guest's buffers), one writes
//! what the guest sent to the host and returns the credit.
//!
//! Writes are `sendmsg` with `MSG_NOSIGNAL` (a host process that closed its end gives EPIPE,
//! the connection is reset, never a SIGPIPE), each gathering all the guest data there is (up
//! to [`MAX_WRITE`](super::conn::MAX_WRITE)) in the buffers it arrived in: one copy per byte
//! from guest memory to the host, and one write and one wakeup of the host reader for many
//! packets.
//!
//! Both tasks look their connection up by key and id on every step and end when it is
//! gone; dropping a [`Stream`] cancels them (and their I/O) and closes the descriptor.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use executor::{AsyncFd, Task};

use super::conn::Key;
use super::Shared;
use crate::notify::Notify;

/// The running tasks of one host stream.
pub(super) struct Stream {
    /// The host stream, for the tx queue's sends straight from guest memory.
    pub fd: AsyncFd,
    /// Set once the writer sent the preamble: only then may others write to `fd`.
    pub opened: Rc<Cell<bool>>,
    pub read_wake: Rc<Notify>,
    pub write_wake: Rc<Notify>,
    _reader: Task<()>,
    _writer: Task<()>,
}

impl Stream {
    /// Starts the tasks of connection `key` (`id`) on `fd`; the writer sends `preamble`
    /// first (the `OK <port>` line of a host-initiated connection).
    pub fn start(
        shared: Rc<Shared>,
        key: Key,
        id: u64,
        fd: OwnedFd,
        preamble: Vec<u8>,
    ) -> io::Result<Stream> {
        // A second handle for shutdown(2), which io_uring is not asked for here.
        let control = UnixStream::from(fd.try_clone()?);
        let fd = AsyncFd::new(fd);
        let read_wake = Rc::new(Notify::default());
        let write_wake = Rc::new(Notify::default());
        let host = Host {
            shared,
            key,
            id,
            fd,
        };
        let fd_for_tx = host.fd.clone();
        let opened = Rc::new(Cell::new(preamble.is_empty()));
        let reader = executor::spawn(host.clone().read(read_wake.clone()));
        let writer =
            executor::spawn(host.write(control, write_wake.clone(), preamble, opened.clone()));
        Ok(Stream {
            fd: fd_for_tx,
            opened,
            read_wake,
            write_wake,
            _reader: reader,
            _writer: writer,
        })
    }
}

/// What a stream task works on.
#[derive(Clone)]
struct Host {
    shared: Rc<Shared>,
    key: Key,
    id: u64,
    fd: AsyncFd,
}

enum Job {
    Idle,
    Shut,
    Write(Vec<Vec<u8>>),
}

impl Host {
    /// The host failed (closed, reset): the connection is reset. Closing is how a host
    /// process ends a connection, so that is not logged.
    fn failed(&self, what: &str, e: io::Error) {
        self.shared.host_failed(self.key, self.id, what, Some(&e));
    }

    /// Watches the host stream for something to read while the guest has credit: the rx
    /// queue reads it, straight into the guest's buffers, once this says it is there.
    async fn read(self, wake: Rc<Notify>) {
        loop {
            let Some(wants) = self.shared.with_conn(self.key, self.id, |c| c.wants_poll()) else {
                return;
            };
            if !wants {
                wake.wait().await;
                continue;
            }
            // Readable also means the end of the stream or an error: the rx queue's read
            // finds out which.
            if let Err(e) = self.fd.poll_readable().await {
                return self.failed("polling", e);
            }
            if self
                .shared
                .with_conn(self.key, self.id, |c| c.readable = true)
                .is_none()
            {
                return;
            }
        }
    }

    async fn write(
        self,
        control: UnixStream,
        wake: Rc<Notify>,
        preamble: Vec<u8>,
        opened: Rc<Cell<bool>>,
    ) {
        let mut preamble = preamble;
        while !preamble.is_empty() {
            match self.fd.sendmsg(preamble, &[]).await {
                (Ok(n), buf) if n > 0 => preamble = buf[n.min(buf.len())..].to_vec(),
                (Ok(_), _) => return self.failed("writing", io::ErrorKind::WriteZero.into()),
                (Err(e), _) => return self.failed("writing", e),
            }
        }
        opened.set(true);
        loop {
            let job = self.shared.with_conn(self.key, self.id, |c| {
                if c.should_shut_host() {
                    Job::Shut
                } else if !c.has_host_write() {
                    Job::Idle
                } else {
                    Job::Write(c.write_bufs())
                }
            });
            match job {
                None => return,
                Some(Job::Idle) => wake.wait().await,
                Some(Job::Shut) => {
                    // The host may be gone already; its end is then closed anyway.
                    let _ = control.shutdown(Shutdown::Write);
                    self.shared
                        .with_conn(self.key, self.id, |c| c.host_shut = true);
                }
                Some(Job::Write(bufs)) => {
                    let (res, bufs) = self.fd.send_vectored(bufs).await;
                    let n = match res {
                        Ok(n) if n > 0 => n,
                        Ok(_) => return self.failed("writing", io::ErrorKind::WriteZero.into()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Err(e) = self.fd.poll_writable().await {
                                return self.failed("polling", e);
                            }
                            0
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                        Err(e) => return self.failed("writing", e),
                    };
                    let done = self
                        .shared
                        .with_conn(self.key, self.id, |c| c.host_wrote(n, bufs));
                    for buf in done.into_iter().flatten() {
                        self.shared.spares.put(buf);
                    }
                }
            }
        }
    }
}
