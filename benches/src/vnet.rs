//! The guest side of the net benches: this process as the driver of a virtio-net device
//! served by `ringvm device net`, with no guest kernel.
//!
//! [`Guest`] is a vhost-user frontend on the device's socket with guest memory of its own (a
//! memfd) and two split rings laid out by [`MockSplitQueue`]. Each [`Ring`] has fixed
//! descriptors: descriptor `i` always points at slot `i` of the ring's buffers and is
//! re-posted as it comes back. Kicks are eventfd writes when `avail_event` asks for them;
//! completions are read from the used ring, sleeping on the call eventfd with `used_event`
//! set when there are none.

use std::fs;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use executor::{AsyncFd, Executor};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::MockSplitQueue;
use virtio::queue::desc::VIRTQ_DESC_F_WRITE;
use virtio::vhost_user::{Connection, Frontend, VringConfig};
use virtio::Descriptor;

/// The `virtio_net_hdr_v1` in front of every frame (and the taps' vnet header size).
pub const VNET_HDR: usize = 12;
/// Entries of each ring.
pub const QUEUE_SIZE: u16 = 256;
/// Where the receive buffers start; the transmit buffers follow them.
const BUFFERS: u64 = 0x10_0000;

/// The driver side of one ring: fixed descriptors, descriptor `i` always on slot `i` of the
/// ring's buffers.
pub struct Ring {
    /// The ring in guest memory.
    pub q: MockSplitQueue,
    kick: OwnedFd,
    call: OwnedFd,
    buffers: GuestAddress,
    slot: u64,
    /// Used entries read so far.
    seen: Wrapping<u16>,
}

impl Ring {
    fn new(mem: &GuestMemory, base: u64, buffers: u64, slot: u64) -> Result<Ring, String> {
        let q = MockSplitQueue::with_data_area(
            mem,
            GuestAddress(base),
            QUEUE_SIZE,
            GuestAddress(buffers),
            slot * u64::from(QUEUE_SIZE),
        )
        .map_err(|e| e.to_string())?;
        Ok(Ring {
            q,
            kick: eventfd()?,
            call: eventfd()?,
            buffers: GuestAddress(buffers),
            slot,
            seen: Wrapping(0),
        })
    }

    fn config(&self, index: u32) -> VringConfig<'_> {
        VringConfig {
            index,
            size: QUEUE_SIZE,
            desc: self.q.desc_table(),
            avail: self.q.avail_addr(),
            used: self.q.used_addr(),
            base: 0,
            kick: self.kick.as_fd(),
            call: Some(self.call.as_fd()),
        }
    }

    /// The guest address of slot `i`.
    pub fn slot(&self, i: u16) -> GuestAddress {
        GuestAddress(self.buffers.0 + self.slot * u64::from(i))
    }

    /// Points descriptor `i` at `len` bytes of its slot.
    pub fn set_desc(&self, i: u16, len: u32, flags: u16) -> Result<(), String> {
        let desc = Descriptor {
            addr: self.slot(i).0,
            len,
            flags,
            next: 0,
        };
        self.q.write_desc(i, desc).map_err(|e| e.to_string())
    }

    /// Publishes descriptor `i`.
    pub fn post(&mut self, i: u16) -> Result<(), String> {
        self.q.publish(i).map_err(|e| e.to_string())
    }

    /// Kicks if the device asked for it since avail index `old`.
    pub fn kick_since(&self, old: u16) -> Result<(), String> {
        if self.q.avail_idx() == old {
            return Ok(());
        }
        // The avail index store must be visible before `avail_event` is read, or a device
        // going to sleep meanwhile is never kicked.
        fence(Ordering::SeqCst);
        if self.q.needs_kick(true, old).map_err(|e| e.to_string())? {
            eventfd_write(&self.kick);
        }
        Ok(())
    }

    /// The next used entry: (descriptor, length).
    pub fn used(&mut self) -> Result<Option<(u16, u32)>, String> {
        let u = self.q.next_used().map_err(|e| e.to_string())?;
        Ok(u.map(|u| {
            self.seen += 1;
            (u.id as u16, u.len)
        }))
    }

    /// Asks for a call once `ahead` more entries are used; returns whether entries came
    /// already (then the call may never come: do not sleep).
    pub fn arm(&self, ahead: u16) -> Result<bool, String> {
        let event = self.seen + Wrapping(ahead.max(1) - 1);
        self.q.set_used_event(event.0).map_err(|e| e.to_string())?;
        fence(Ordering::SeqCst);
        Ok(self.q.used_idx().map_err(|e| e.to_string())? != self.seen.0)
    }

    /// The call eventfd, to sleep on after [`Ring::arm`]; clear it with [`eventfd_read`].
    pub fn call(&self) -> BorrowedFd<'_> {
        self.call.as_fd()
    }

    /// Asks for a call once `ahead` more entries are used and sleeps for it (at most
    /// `timeout_ms`), unless entries came meanwhile.
    pub fn wait(&self, ahead: u16, timeout_ms: i32) -> Result<(), String> {
        if !self.arm(ahead)? && wait_readable(self.call.as_raw_fd(), timeout_ms) {
            eventfd_read(self.call.as_fd());
        }
        Ok(())
    }
}

/// Our side of a vhost-user connection to `ringvm device net`: guest memory and the two
/// rings. Fields drop in order: the frontend before its executor.
pub struct Guest {
    _fe: Frontend,
    _ex: Executor,
    /// The guest memory the rings and buffers live in.
    pub mem: GuestMemory,
    /// The receive ring (queue 0): every slot posted, `rx_buf` bytes device-writable.
    pub rx: Ring,
    /// The transmit ring (queue 1).
    pub tx: Ring,
}

impl Guest {
    /// Connects to the device on `socket`, negotiates `features` (all of which it must
    /// offer), lays out both rings with `slot`-byte buffers and posts every receive buffer
    /// with `rx_buf` (at most `slot`) writable bytes.
    pub fn connect(
        socket: &Path,
        features: u64,
        slot: u64,
        rx_buf: u32,
    ) -> Result<Box<Guest>, String> {
        if u64::from(rx_buf) > slot {
            return Err(format!(
                "{rx_buf}-byte receive buffers in {slot}-byte slots"
            ));
        }
        let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        let ex = Executor::new().map_err(|e| format!("executor: {e}"))?;
        // Each ring's buffers take at least 1 MiB; the memory at least 16 MiB.
        let area = (slot * u64::from(QUEUE_SIZE)).max(1 << 20);
        let size = (BUFFERS + 2 * area).next_multiple_of(1 << 20).max(16 << 20);
        let mem = GuestMemory::new(&[(GuestAddress(0), size)]).map_err(|e| e.to_string())?;
        let rx = Ring::new(&mem, 0x1_0000, BUFFERS, slot)?;
        let tx = Ring::new(&mem, 0x2_0000, BUFFERS + area, slot)?;
        let fe = ex.run_until(async {
            let fe = Frontend::connect(
                Connection::new(AsyncFd::new(stream.into())),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| format!("vhost-user connect: {e}"))?;
            if fe.features() & features != features {
                return Err(format!(
                    "the device offers {:#x}, without all of {features:#x}",
                    fe.features()
                ));
            }
            fe.start(features, &mem, &[rx.config(0), tx.config(1)])
                .await
                .map_err(|e| format!("vhost-user start: {e}"))?;
            Ok(fe)
        })?;
        let mut g = Box::new(Guest {
            _fe: fe,
            _ex: ex,
            mem,
            rx,
            tx,
        });
        // Every receive buffer posted, for good.
        let old = g.rx.q.avail_idx();
        for i in 0..QUEUE_SIZE {
            g.rx.set_desc(i, rx_buf, VIRTQ_DESC_F_WRITE)?;
            g.rx.post(i)?;
        }
        g.rx.kick_since(old)?;
        Ok(g)
    }
}

/// Which way frames go, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Guest -> tap: the TX ring.
    Tx,
    /// Tap -> guest: the RX ring.
    Rx,
}

impl Dir {
    /// `tx` or `rx`, as in bench names.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable; returns whether it is.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, ours for the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// A non-blocking eventfd.
pub fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return os_err("eventfd");
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd_write(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a u64 that outlives the call.
    unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

/// Clears an eventfd.
pub fn eventfd_read(fd: BorrowedFd<'_>) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64 that outlives the call.
    unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), String> {
    // SAFETY: fcntl flag calls on an fd the caller holds open.
    let r = unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
    };
    if r != 0 {
        return os_err("O_NONBLOCK");
    }
    Ok(())
}

/// `what` failed with the last OS error.
pub fn os_err<T>(what: &str) -> Result<T, String> {
    Err(format!("{what}: {}", io::Error::last_os_error()))
}

/// Runs `ip args...` in the calling thread's network namespace.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The CPU time of this process's main thread.
pub fn main_thread_cpu_time() -> Duration {
    let pid = std::process::id();
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The ringvm binary, or why there is none with `device net --tap-name`.
pub fn ringvm_bin() -> Result<PathBuf, String> {
    crate::process::ringvm_device("net", "--tap-name").map(|(bin, _)| bin)
}
