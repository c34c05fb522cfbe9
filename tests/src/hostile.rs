//! A hostile vhost-user frontend: drives the real `ringvm device <kind> --socket PATH` process
//! the way a compromised or buggy VMM could, through the real process boundary.
//!
//! [`HostileFrontend::spawn`] starts the device binary on a socket in a scratch directory and
//! connects to it. It then holds two views of the one connection:
//!
//! - [`HostileFrontend::frontend`]: ringvm's own well-behaved [`Frontend`], already connected
//!   (`SET_OWNER`, features, protocol features with `REPLY_ACK`). Use it for the set-up a test
//!   is not about (`start` sends the features, the memory table and whole rings).
//! - [`HostileFrontend::send`], [`HostileFrontend::request`], [`HostileFrontend::get`]: raw
//!   messages, any bytes with any descriptors (`SCM_RIGHTS`), for the part a test is about.
//!
//! Requests go one at a time from the test thread, so the two views never interleave.
//! Guest memory is a [`GuestRam`] (sealed like ringvm's own, or an unsealed tmpfs file the
//! test may shrink) and rings are laid out by virtio's [`MockSplitQueue`] guest driver.
//! Every wait has a limit: a device that stops answering fails the test instead of hanging it,
//! and [`HostileFrontend::disconnect`] reports whether the device then exited by itself.
//!
//! A new class of attack is one test in `tests/tests/hostile_frontend.rs`: set up with the
//! well-behaved view, attack with the raw one, then check the device's answer, that it still
//! [answers](HostileFrontend::answers) (or ended with a clear error on stderr), and that it
//! exited by itself, never by a signal, once disconnected.
//!
//! ```no_run
//! use tests::hostile::{GuestRam, HostileFrontend};
//! let h = HostileFrontend::spawn("rng", &[]);
//! let ram = GuestRam::sealed(4 << 20);
//! let features = h.frontend().features();
//! h.block_on(h.frontend().start(features, &ram.mem, &[])).expect("start");
//! assert!(h.answers());
//! let exit = h.disconnect(std::time::Duration::from_secs(10));
//! assert!(exit.ended, "{}", exit.stderr);
//! ```

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use executor::{AsyncFd, Executor};
use memory::{GuestAddress, GuestMemory, RegionFd};
use virtio::mock::MockSplitQueue;
use virtio::vhost_user::message::Body;
use virtio::vhost_user::{
    Connection, Error, Frontend, Header, Message, Request, VringConfig, PROTOCOL_F_REPLY_ACK, U64,
};

use crate::{ringvm_bin, wait_until, Live, Scratch};

/// How long a reply (or an acknowledgement) may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The `userspace_addr` [`GuestRam::unsealed`] announces for guest address 0: any value
/// works, the device only uses it to translate ring addresses, which [`Frontend`] derives
/// from it. ([`GuestRam::sealed`] announces its mapping's address, as ringvm's VMM does.)
pub const USER_BASE: u64 = 0x7f00_0000_0000;

/// A device process driven by a hostile frontend.
pub struct HostileFrontend {
    // Declared before the executor: both hold io_uring handles of it.
    frontend: Frontend,
    conn: Connection,
    ex: Executor,
    device: Option<Live>,
    _dir: Scratch,
}

/// How a device process ended after [`HostileFrontend::disconnect`].
#[derive(Debug)]
pub struct DeviceExit {
    /// Whether it exited by itself within the limit (else it was killed).
    pub ended: bool,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote on stderr.
    pub stderr: String,
}

impl HostileFrontend {
    /// Starts `ringvm device <kind> --socket <scratch>/vhost.sock <args>` (sandbox on, as in
    /// production) and connects ringvm's [`Frontend`] to it.
    pub fn spawn(kind: &str, args: &[&str]) -> HostileFrontend {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Scratch::new("hostile", &format!("{kind}-{n}"));
        let sock = dir.path("vhost.sock");
        let mut cmd = Command::new(ringvm_bin());
        cmd.args(["device", kind, "--socket"]).arg(&sock).args(args);
        // As developers run tests: a device must still end with its own error (no backtrace
        // capture may trip its seccomp filter).
        cmd.env("RUST_BACKTRACE", "1");
        let device = Live::start(&mut cmd);
        if !wait_until(Duration::from_secs(10), || sock.exists()) {
            let (_, status, stderr) = device.end(Duration::ZERO);
            panic!("ringvm device {kind} did not listen ({status}): {stderr}");
        }
        let stream = UnixStream::connect(&sock).expect("connect to the device socket");
        let ex = Executor::new().expect("executor");
        let conn = Connection::new(AsyncFd::new(stream.into()));
        let frontend = ex
            .run_until(Frontend::connect(conn.clone(), REPLY_TIMEOUT))
            .expect("the device negotiates with a well-behaved frontend");
        HostileFrontend {
            frontend,
            conn,
            ex,
            device: Some(device),
            _dir: dir,
        }
    }

    /// ringvm's own frontend on the same connection, for the well-behaved part of a test.
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }

    /// Runs `future` (a [`Frontend`] call, say) on this frontend's executor.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.ex.run_until(future)
    }

    /// Whether `REPLY_ACK` was negotiated (then [`HostileFrontend::request`] asks for acks).
    pub fn reply_ack(&self) -> bool {
        self.frontend.protocol_features() & (1 << PROTOCOL_F_REPLY_ACK) != 0
    }

    /// Sends `bytes` as they are (one message, or a malformed one) with `fds`.
    pub fn send(&self, bytes: Vec<u8>, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        self.ex.run_until(self.conn.send(bytes, fds))
    }

    /// Sends `request` with `body` and `fds` and, when `REPLY_ACK` was negotiated, asks for an
    /// acknowledgement and waits for it: `Err(Error::BackendFailed)` if the device refused.
    pub fn request(
        &self,
        request: Request,
        body: &impl Body,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let ack = self.reply_ack();
        self.send(Message::request(request, body, ack).encode(), fds)?;
        if !ack {
            return Ok(());
        }
        let status = U64::decode(&self.recv_reply(request)?)
            .map_err(|e| Error::BadReply(request, e))?
            .0;
        if status != 0 {
            return Err(Error::BackendFailed { request, status });
        }
        Ok(())
    }

    /// Sends `request` (one that has a reply) with `body`; returns the reply's body.
    pub fn get(&self, request: Request, body: &impl Body) -> Result<Vec<u8>, Error> {
        self.send(Message::request(request, body, false).encode(), &[])?;
        self.recv_reply(request)
    }

    /// Waits up to [`REPLY_TIMEOUT`] for the reply to `request`; returns its body.
    pub fn recv_reply(&self, request: Request) -> Result<Vec<u8>, Error> {
        let got = self
            .ex
            .run_until(executor::timeout(REPLY_TIMEOUT, self.conn.recv()))
            .map_err(|_| Error::Timeout(request, REPLY_TIMEOUT))??;
        let (reply, fds) = got.ok_or(Error::PeerClosed)?;
        if !reply.header.is_reply() || reply.header.request != request {
            return Err(Error::UnexpectedReply {
                expected: request,
                got: reply.header.request,
                reply: reply.header.is_reply(),
            });
        }
        if !fds.is_empty() {
            return Err(Error::ReplyFds(request, fds.len()));
        }
        Ok(reply.body)
    }

    /// Whether the device still answers its control socket (`GET_FEATURES` within
    /// [`REPLY_TIMEOUT`]).
    pub fn answers(&self) -> bool {
        let mut bytes = Vec::new();
        Header::new(Request::GetFeatures, 0, 0).encode(&mut bytes);
        self.send(bytes, &[]).is_ok() && self.recv_reply(Request::GetFeatures).is_ok()
    }

    /// Closes the connection and waits up to `limit` for the device to exit (killing it
    /// after that).
    pub fn disconnect(mut self, limit: Duration) -> DeviceExit {
        let device = self
            .device
            .take()
            .expect("the device runs until disconnect");
        // Drops every handle on the socket (the frontend's and the raw view's).
        drop(self);
        let (ended, status, stderr) = device.end(limit);
        DeviceExit {
            ended,
            status,
            stderr,
        }
    }
}

/// Guest RAM of a test frontend: one region at guest address 0, mapped in the test process
/// too (so [`MockSplitQueue`] can lay out rings in it) and sent to the device by
/// [`Frontend::start`].
pub struct GuestRam {
    /// The memory, as ringvm's frontend describes it in `SET_MEM_TABLE`.
    pub mem: GuestMemory,
    /// The backing file, when the test may resize it.
    file: Option<File>,
}

impl GuestRam {
    /// `size` bytes the way ringvm's VMM makes them: a memfd sealed against shrinking and
    /// growing.
    pub fn sealed(size: u64) -> GuestRam {
        GuestRam {
            mem: GuestMemory::new(&[(GuestAddress(0), size)]).expect("guest memory"),
            file: None,
        }
    }

    /// `size` bytes in an unlinked tmpfs file without seals, as a frontend that does not
    /// seal its memory (or a hostile one) sends them: [`GuestRam::resize`] can shrink it.
    pub fn unsealed(size: u64) -> GuestRam {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = format!("/dev/shm/ringvm-hostile-{}-{n}", std::process::id());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create a tmpfs file");
        let _ = std::fs::remove_file(&path);
        file.set_len(size).expect("size the tmpfs file");
        let region = RegionFd {
            fd: file.try_clone().expect("dup").into(),
            fd_offset: 0,
            size,
            guest_addr: GuestAddress(0),
            user_addr: USER_BASE,
        };
        GuestRam {
            mem: GuestMemory::from_regions(vec![region]).expect("map the tmpfs file"),
            file: Some(file),
        }
    }

    /// Resizes the backing file under everyone's mappings (the test process's too: touch no
    /// memory past the new end afterwards). Panics for [`GuestRam::sealed`] memory.
    pub fn resize(&self, len: u64) {
        let file = self
            .file
            .as_ref()
            .expect("only unsealed memory can be resized");
        file.set_len(len).expect("resize the guest memory file");
    }

    /// The address the frontend gives for guest address `addr` (ring addresses are sent in
    /// it): the region's `userspace_addr` plus the offset.
    pub fn user_addr(&self, addr: GuestAddress) -> u64 {
        let region = self.mem.regions().next().expect("one region");
        region.user_addr + (addr.0 - region.guest_addr.0)
    }

    /// A split queue of `size` entries with its rings at guest address 0 and its buffers
    /// after them.
    pub fn queue(&self, size: u16) -> MockSplitQueue {
        MockSplitQueue::new(&self.mem, GuestAddress(0), size).expect("lay out the queue")
    }
}

/// The [`Frontend::start`] description of queue `index` laid out by `queue`.
pub fn vring<'a>(
    index: u32,
    queue: &MockSplitQueue,
    kick: BorrowedFd<'a>,
    call: Option<BorrowedFd<'a>>,
) -> VringConfig<'a> {
    VringConfig {
        index,
        size: queue.size(),
        desc: queue.desc_table(),
        avail: queue.avail_addr(),
        used: queue.used_addr(),
        base: 0,
        kick,
        call,
    }
}
