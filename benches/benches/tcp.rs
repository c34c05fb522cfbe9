//! TCP bulk throughput through `ringvm device net`, with and without offloads, each way,
//! beside the same forwarding between two taps with nothing in between (the limit), in one
//! run.
//!
//! No guest kernel (too slow on a nested host): host TCP streams cross the device instead,
//! between network namespaces A and B that the bench makes:
//!
//! ```text
//!  B: stack <-> tap B <=read/write=> [this process] <-TX/RX rings-> ringvm device net <-> tap A <-> A: stack
//! ```
//!
//! This process is the guest NIC's driver (a vhost-user frontend, [`benches::vnet::Guest`])
//! and a forwarder between its rings and tap B (`IFF_VNET_HDR`, header size 12): frames
//! tap B hands out go on the TX ring (the device writes them to tap A), frames the device
//! puts on the RX ring (read from tap A) are written to tap B. The 12-byte
//! `virtio_net_hdr_v1` passes unchanged both ways: it is the tap's vnet header, so partial
//! checksums and GSO frames of up to 64 KiB cross whole. Frames are read from tap B straight
//! into the transmit buffers and written to tap B straight from the receive buffers. The
//! forwarder is one thread (the main one): `poll` on tap B and the rings' call eventfds,
//! `EVENT_IDX` both ways, a kick when `avail_event` asks for it.
//!
//! - `<mode>/tx` (guest -> tap): a stream from B to A; the data goes through the TX ring,
//!   the ACKs through the RX ring. `<mode>/rx` (tap -> guest): a stream from A to B, the
//!   other way round.
//! - `gso/*`: the frontend negotiates `VERSION_1`, `EVENT_IDX`, `CSUM`, `GUEST_CSUM`,
//!   `HOST_TSO4/6` and `GUEST_TSO4/6`; tap B has `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`
//!   (the device sets the same on tap A from the `GUEST_*` bits). Receive buffers are one
//!   68 KiB descriptor each (a 65550-byte frame and its header fit; no `MRG_RXBUF`), as are
//!   transmit buffers. `mtu/*`: no offloads (`VERSION_1`, `EVENT_IDX`), taps without
//!   offloads: 1514-byte frames, checksums computed by the stacks.
//!
//! Subjects: `ringvm device net --socket S --tap-name T` jailed (`ringvm`) and with
//! `--disable-sandbox` (`ringvm-nosandbox`), each started inside its namespace A. Limit
//! (`raw-tap`): the same forwarder loop between tap B' and tap A' read and written directly,
//! same offloads: what the kernel's TCP, the taps and the forwarding cost by themselves (one
//! thread does both taps' work, where ringvm's device process takes tap A's on the other
//! core, so ringvm may pass it when per-frame costs dominate, as without offloads). Each
//! variant has its own pair of namespaces (A 10.0.0.1, B 10.0.0.2 on /24) and one TCP
//! connection each way, kept across rounds (slow start after idle off). An operation is
//! 64 KiB of payload: a round asks the sender thread for `n` of them in 256 KiB writes and
//! forwards until the receiver thread read them all, which ends the timed part; the
//! forwarder then runs on until the sender has every byte acked, so no round leaves frames
//! behind.
//!
//! Reported per case (table and `<target>/bench/tcp.jsonl`): `gbit_per_s` (payload), the
//! ratio to the limit, the mean payload of the data frames (`frame_bytes`) and CPU time in
//! ms per GB of payload from `/proc/<pid>/task/*/schedstat`: `dev_cpu_ms_per_gb` (the
//! device's process tree), `fwd_cpu_ms_per_gb` (the forwarder thread), `tcp_cpu_ms_per_gb`
//! (the sender and receiver threads) and `total_cpu_ms_per_gb` (all of these). Softirq work
//! is charged to the thread it interrupts (no `IRQ_TIME_ACCOUNTING`): a receiving stack
//! mostly runs inside whoever writes its tap, i.e. partly in the device for ringvm and in
//! the forwarder for the limit, so compare totals.
//!
//! Run as root with `cargo bench -p benches --bench tcp [-- --quick] [-- FILTER...]`. ringvm
//! is taken from $RINGVM_BIN, else built as `target/release/ringvm`.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use benches::netns::Netns;
use benches::vnet::{
    eventfd_read, ip, main_thread_cpu_time, os_err, ringvm_bin, set_nonblocking, Dir, Guest,
    QUEUE_SIZE, VNET_HDR,
};
use benches::{bench_dir, Role, Runner, Variant};
use net::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use virtio::vhost_user::VIRTIO_F_VERSION_1;
use virtio::VIRTIO_F_EVENT_IDX;

/// Measured seconds per case (over all its rounds) and rounds, in a full and a quick run.
const FULL: (f64, usize) = (6.0, 12);
const QUICK: (f64, usize) = (0.3, 3);
/// Payload bytes per operation.
const UNIT: u64 = 64 << 10;
/// Bytes per `write()` of the sender.
const WRITE: usize = 256 << 10;
/// A buffer of either ring: the largest frame (65550 bytes) and its header, in pages.
const SLOT: u64 = 0x11000;
const TAP_A: &str = "rvtcpa";
const TAP_B: &str = "rvtcpb";
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
const PORT: u16 = 5201;
/// Frames moved per direction before the forwarder looks at the other one.
const BURST: usize = QUEUE_SIZE as usize;
/// A case that moves no frame for this long has failed.
const STALL: Duration = Duration::from_secs(5);

fn main() {
    let config = benches::Config::from_env_with(FULL, QUICK);
    let mut runner = Runner::with_config("tcp", config);
    let modes: Vec<(Mode, Vec<Dir>)> = [Mode::Gso, Mode::Mtu]
        .into_iter()
        .map(|m| {
            let dirs: Vec<Dir> = [Dir::Tx, Dir::Rx]
                .into_iter()
                .filter(|&d| runner.enabled(&bench_name(m, d)))
                .collect();
            (m, dirs)
        })
        .filter(|(_, dirs)| !dirs.is_empty())
        .collect();
    if modes.is_empty() {
        runner.finish().expect("write results");
        return;
    }
    let mut left_out = Vec::new();
    let mut notes = Vec::new();
    // Built before leaving the host's network namespace (cargo may want the network).
    let bin = ringvm_bin();
    let dir = bench_dir().expect("target/bench");
    // SAFETY: plain syscall, before this process starts any thread: whatever is not in one
    // of the bench's own namespaces is in this private one.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        println!("NOT MEASURED tcp: cannot unshare a network namespace (root needed): {e}");
        std::process::exit(1);
    }

    for (mode, dirs) in &modes {
        let mode = *mode;
        let mut endpoints = Vec::new();
        match &bin {
            Ok(bin) => {
                for (key, sandbox) in [("ringvm", true), ("ringvm-nosandbox", false)] {
                    match Endpoint::ringvm(key, bin, sandbox, mode, &dir) {
                        Ok(e) => endpoints.push(e),
                        Err(e) => left_out.push(format!("{} {key}: {e}", mode.name())),
                    }
                }
            }
            Err(e) => left_out.push(format!("{} subjects ringvm: {e}", mode.name())),
        }
        match Endpoint::raw(mode) {
            Ok(e) => endpoints.push(e),
            Err(e) => left_out.push(format!("{} limit raw-tap: {e}", mode.name())),
        }
        for &d in dirs {
            measure(&mut runner, &mut endpoints, &bench_name(mode, d), d);
        }
        for e in endpoints {
            if let Some(note) = e.close() {
                notes.push(format!("{} {note}", mode.name()));
            }
        }
    }

    print_details(&runner);
    runner.finish_before_checks();
    for (mode, dirs) in &modes {
        for &d in dirs {
            runner.check(&bench_name(*mode, d), "ringvm", Role::Limit, 0.9);
        }
    }
    for note in &notes {
        println!("NOTE {note}");
    }
    for why in &left_out {
        println!("NOT MEASURED {why}");
    }
    if !left_out.is_empty() {
        std::process::exit(1);
    }
}

/// Runs bench `name` (direction `d`) over `endpoints` and annotates its cases.
fn measure(runner: &mut Runner, endpoints: &mut [Endpoint], name: &str, d: Dir) {
    for e in endpoints.iter_mut() {
        e.calls.clear();
        e.counts = Counts::default();
    }
    let variants = endpoints
        .iter_mut()
        .map(|e| {
            let (role, key, label) = (e.role, e.key, e.label.clone());
            Variant::new(role, key, &label, move |n| {
                e.run(d, n)
                    .unwrap_or_else(|err| panic!("{name} {key}: {err}"))
            })
        })
        .collect();
    runner.compare(name, variants);
    let rounds = runner.config().rounds;
    for e in endpoints.iter() {
        for (k, v) in e.stats(d, rounds) {
            runner.annotate(name, e.key, k, v);
        }
        if let Some(c) = runner.case(name, e.key) {
            let gbit = c.ops_per_sec * UNIT as f64 * 8.0 / 1e9;
            runner.annotate(name, e.key, "gbit_per_s", gbit);
        }
    }
}

/// The second table: Gbit/s, ratio to the limit, then these figures: heading, key,
/// decimals.
const DETAILS: [(&str, &str, usize); 6] = [
    ("frame", "frame_bytes", 0),
    ("device", "dev_cpu_ms_per_gb", 0),
    ("fwd", "fwd_cpu_ms_per_gb", 0),
    ("tcp", "tcp_cpu_ms_per_gb", 0),
    ("total", "total_cpu_ms_per_gb", 0),
    ("errors", "write_errors", 0),
];

fn print_details(runner: &Runner) {
    let cell = |v: Option<f64>, p: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.p$}"));
    let mut line = format!(
        "\n{:9} {:17} {:>7} {:>6}",
        "bench", "variant", "Gbit/s", "xlimit"
    );
    for (heading, _, _) in DETAILS {
        line += &format!(" {heading:>7}");
    }
    let width = line.len() - 1;
    println!("{line}");
    println!("{:>w$}", "(frame: payload bytes; CPU ms per GB)", w = width);
    println!("{}", "-".repeat(width));
    let mut last = "";
    for c in runner.cases() {
        let bench = if c.bench == last { "" } else { &c.bench };
        last = &c.bench;
        let mut line = format!(
            "{bench:9} {:17} {:>7} {:>6}",
            c.name,
            cell(c.figure("gbit_per_s"), 2),
            cell(runner.ratio(c, Role::Limit), 2)
        );
        for (_, key, decimals) in DETAILS {
            line += &format!(" {:>7}", cell(c.figure(key), decimals));
        }
        println!("{line}");
    }
}

/// With offloads or without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Checksum offload and TSO both ways: GSO frames of up to 64 KiB.
    Gso,
    /// No offloads: MTU-sized frames.
    Mtu,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Gso => "gso",
            Mode::Mtu => "mtu",
        }
    }

    /// The features the frontend negotiates; their `GUEST_*` bits are also the taps'
    /// offloads ([`net::Tap::set_offloads`]).
    fn features(self) -> u64 {
        let base = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX);
        match self {
            Mode::Gso => [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
            ]
            .iter()
            .fold(base, |f, &bit| f | (1 << bit)),
            Mode::Mtu => base,
        }
    }
}

fn bench_name(m: Mode, d: Dir) -> String {
    format!("{}/{}", m.name(), d.name())
}

// ---- taps ----

/// A tap of our own in the calling thread's namespace: `addr`/24, up, the offloads of
/// `mode`, non-blocking.
fn own_tap(name: &str, addr: Ipv4Addr, mode: Mode) -> Result<OwnedFd, String> {
    let tap = net::Tap::create(Some(name), 1)
        .map_err(|e| format!("tap {name}: {e}"))?
        .pop()
        .ok_or("no tap")?;
    tap.configure(addr, MASK)
        .map_err(|e| format!("configure {name}: {e}"))?;
    tap.set_offloads(mode.features())
        .map_err(|e| format!("offloads of {name}: {e}"))?;
    let fd = tap.into_fd();
    set_nonblocking(fd.as_fd())?;
    Ok(fd)
}

/// Reads one frame (vnet header included) into `buf`; `None` when the tap has none.
///
/// # Safety
/// `buf..buf + len` must be mapped, writable memory that nothing else uses during the call.
unsafe fn tap_read(fd: BorrowedFd<'_>, buf: *mut u8, len: usize) -> Result<Option<usize>, String> {
    // SAFETY: the caller vouches for `len` writable bytes at `buf`.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.cast(), len) };
    if r >= 0 {
        return Ok(Some(r as usize));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
        e => Err(format!("tap read: {e}")),
    }
}

/// Writes one frame (vnet header included); returns whether the tap took it whole.
///
/// # Safety
/// `buf..buf + len` must be mapped, readable memory.
unsafe fn tap_write(fd: BorrowedFd<'_>, buf: *const u8, len: usize) -> bool {
    // SAFETY: the caller vouches for `len` readable bytes at `buf`.
    let r = unsafe { libc::write(fd.as_raw_fd(), buf.cast(), len) };
    r == len as isize
}

/// Sleeps until one of `fds` is readable, 10 ms at most.
fn poll_readable(fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` holds `p.len()` pollfds for the call.
    if unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 10) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("poll: {e}"));
        }
    }
    Ok(())
}

// ---- the forwarder ----

/// Frames and bytes (vnet headers included) forwarded, each way.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// B -> A (TX ring).
    to_a: (u64, u64),
    /// A -> B (RX ring).
    to_b: (u64, u64),
    /// Frames a tap did not take whole.
    write_errors: u64,
}

/// What moves frames between tap B and A's side.
enum Forwarder {
    /// Our guest's rings, served by ringvm on tap A; `free` holds the transmit slots the
    /// device gave back.
    Ringvm {
        guest: Box<Guest>,
        tap_b: OwnedFd,
        free: Vec<u16>,
    },
    /// Tap A' and tap B' directly, through one buffer.
    Raw {
        tap_a: OwnedFd,
        tap_b: OwnedFd,
        buf: Vec<u8>,
    },
}

impl Forwarder {
    /// Forwards both ways until `done` says so (checked between passes); fails when
    /// nothing moved for [`STALL`].
    fn pump(
        &mut self,
        counts: &mut Counts,
        done: &mut dyn FnMut() -> Result<bool, String>,
    ) -> Result<(), String> {
        let mut last = Instant::now();
        while !done()? {
            let moved = match self {
                Forwarder::Ringvm { guest, tap_b, free } => {
                    ringvm_pass(guest, tap_b.as_fd(), free, counts)?
                }
                Forwarder::Raw { tap_a, tap_b, buf } => {
                    let (a, b) = (tap_a.as_fd(), tap_b.as_fd());
                    let to_a = copy_frames(b, a, buf, &mut counts.to_a, &mut counts.write_errors)?;
                    let to_b = copy_frames(a, b, buf, &mut counts.to_b, &mut counts.write_errors)?;
                    if to_a + to_b == 0 {
                        poll_readable(&[a, b])?;
                    }
                    to_a + to_b > 0
                }
            };
            if moved {
                last = Instant::now();
            } else if last.elapsed() > STALL {
                return Err(format!("no frame moved in {STALL:?} ({counts:?})"));
            }
        }
        Ok(())
    }
}

/// Up to [`BURST`] frames from `from` to `to`; returns how many.
fn copy_frames(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    buf: &mut [u8],
    count: &mut (u64, u64),
    errors: &mut u64,
) -> Result<usize, String> {
    for n in 0..BURST {
        // SAFETY: our buffer, borrowed mutably for the call.
        let Some(len) = (unsafe { tap_read(from, buf.as_mut_ptr(), buf.len()) })? else {
            return Ok(n);
        };
        // SAFETY: the first `len` bytes of our buffer (the tap wrote no more than it has).
        if !unsafe { tap_write(to, buf.as_ptr(), len) } {
            *errors += 1;
        }
        *count = (count.0 + 1, count.1 + len as u64);
    }
    Ok(BURST)
}

/// One pass of the ringvm forwarder: reaps transmit completions, moves what tap B has into
/// free transmit slots, writes what came on the receive ring to tap B; sleeps when nothing
/// moved. Returns whether anything moved.
fn ringvm_pass(
    g: &mut Guest,
    tap: BorrowedFd<'_>,
    free: &mut Vec<u16>,
    counts: &mut Counts,
) -> Result<bool, String> {
    let mut moved = false;
    while let Some((id, _)) = g.tx.used()? {
        if id >= QUEUE_SIZE {
            return Err(format!("the device used transmit descriptor {id}"));
        }
        free.push(id);
    }
    while let Some(&i) = free.last() {
        let slot = g
            .mem
            .get_slice(g.tx.slot(i), SLOT as usize)
            .map_err(|e| e.to_string())?;
        // SAFETY: the slice is mapped for as long as `g` lives, and slot `i` is on the free
        // list: the device gave it back and reads it again only once it is posted.
        let Some(len) = (unsafe { tap_read(tap, slot.as_ptr(), slot.len()) })? else {
            break;
        };
        free.pop();
        g.tx.set_desc(i, len as u32, 0)?;
        let old = g.tx.q.avail_idx();
        g.tx.post(i)?;
        g.tx.kick_since(old)?;
        counts.to_a = (counts.to_a.0 + 1, counts.to_a.1 + len as u64);
        moved = true;
    }
    let old = g.rx.q.avail_idx();
    while let Some((id, len)) = g.rx.used()? {
        if id >= QUEUE_SIZE || !(VNET_HDR as u64..=SLOT).contains(&u64::from(len)) {
            return Err(format!(
                "the device used receive descriptor {id} with {len} bytes"
            ));
        }
        let slot = g
            .mem
            .get_slice(g.rx.slot(id), len as usize)
            .map_err(|e| e.to_string())?;
        // SAFETY: the slice is mapped for as long as `g` lives (the device filled slot `id`
        // and gave it back: it writes it again only once it is posted).
        if !unsafe { tap_write(tap, slot.as_ptr(), slot.len()) } {
            counts.write_errors += 1;
        }
        counts.to_b = (counts.to_b.0 + 1, counts.to_b.1 + u64::from(len));
        g.rx.post(id)?;
        moved = true;
    }
    g.rx.kick_since(old)?;
    if moved {
        return Ok(true);
    }
    // Nothing moved: sleep until a frame comes on the receive ring, or tap B has frames
    // (while a transmit slot is free), or half the transmit slots in flight come back.
    if g.rx.arm(1)? {
        return Ok(false);
    }
    let wait_tx = free.is_empty();
    if wait_tx && g.tx.arm(QUEUE_SIZE / 2)? {
        return Ok(false);
    }
    let other = if wait_tx { g.tx.call() } else { tap };
    poll_readable(&[g.rx.call(), other])?;
    eventfd_read(g.rx.call());
    if wait_tx {
        eventfd_read(g.tx.call());
    }
    Ok(false)
}

// ---- the TCP stream ----

/// One TCP connection between two namespaces: a receiver thread counting what it reads
/// (its listening socket made in one namespace), a sender thread writing what it is told
/// to (in the other).
struct Stream {
    received: Arc<AtomicU64>,
    /// Bytes asked of the sender so far.
    asked: u64,
    orders: Option<mpsc::Sender<u64>>,
    /// The receiver's and the sender's sockets (shut down to stop the threads).
    socks: Vec<TcpStream>,
    receiver: Option<JoinHandle<()>>,
    sender: Option<JoinHandle<Result<(), String>>>,
}

/// A socket made in a thread, or why it could not be.
type Made = Result<TcpStream, String>;

impl Stream {
    /// Opens a connection from namespace `from` to `to_ip` in namespace `to`, forwarding
    /// with `fwd` for the handshake.
    fn open(
        to: &Netns,
        to_ip: Ipv4Addr,
        from: &Netns,
        fwd: &mut Forwarder,
        counts: &mut Counts,
    ) -> Result<Self, String> {
        let received = Arc::new(AtomicU64::new(0));
        // A socket stays in the namespace it was made in, whichever thread uses it.
        let listener = to.run(|| {
            TcpListener::bind((to_ip, PORT)).map_err(|e| format!("bind {to_ip}:{PORT}: {e}"))
        })?;
        let (accepted_tx, accepted) = mpsc::channel::<Made>();
        let count = received.clone();
        let receiver = std::thread::spawn(move || {
            let sock = listener.accept().map(|(s, _)| s);
            if let Some(mut sock) = hand_over(sock, "accept", &accepted_tx) {
                receive(&mut sock, &count);
            }
        });
        let (orders_tx, orders) = mpsc::channel::<u64>();
        let (connected_tx, connected) = mpsc::channel::<Made>();
        let sender = from.spawn(move || {
            let sock = TcpStream::connect_timeout(&SocketAddr::from((to_ip, PORT)), STALL);
            if let Some(mut sock) = hand_over(sock, "connect", &connected_tx) {
                send(&mut sock, &orders);
            }
            Ok(())
        })?;
        let mut socks = [None, None];
        let made = [&accepted, &connected];
        fwd.pump(counts, &mut || {
            for (sock, made) in socks.iter_mut().zip(made) {
                if sock.is_none() {
                    match made.try_recv() {
                        Ok(s) => *sock = Some(s?),
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => {
                            return Err("a TCP end did not start".into())
                        }
                    }
                }
            }
            Ok(socks.iter().all(Option::is_some))
        })?;
        Ok(Stream {
            received,
            asked: 0,
            orders: Some(orders_tx),
            socks: socks.into_iter().flatten().collect(),
            receiver: Some(receiver),
            sender: Some(sender),
        })
    }

    /// Asks the sender for `bytes` more.
    fn order(&mut self, bytes: u64) -> Result<(), String> {
        let orders = self.orders.as_ref().ok_or("stream closed")?;
        orders.send(bytes).map_err(|_| "the sender thread ended")?;
        self.asked += bytes;
        Ok(())
    }

    /// Whether the receiver has read all that was asked.
    fn all_received(&self) -> bool {
        self.received.load(Ordering::Acquire) >= self.asked
    }

    /// Whether the sender has every byte acked (`SIOCOUTQ`: unacked and unsent bytes).
    fn all_acked(&self) -> Result<bool, String> {
        let sock = self.socks.get(1).ok_or("no sender socket")?;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one c_int, ours for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
            return os_err("SIOCOUTQ");
        }
        Ok(queued == 0)
    }
}

/// Hands a clone of the socket `made` (or why there is none) to the bench; returns the
/// socket for the thread to use.
fn hand_over(
    made: std::io::Result<TcpStream>,
    what: &str,
    to: &mpsc::Sender<Made>,
) -> Option<TcpStream> {
    match made.and_then(|s| Ok((s.try_clone()?, s))) {
        Ok((clone, sock)) => to.send(Ok(clone)).ok().map(|()| sock),
        Err(e) => {
            let _ = to.send(Err(format!("{what}: {e}")));
            None
        }
    }
}

/// Reads until the connection ends, counting bytes.
fn receive(sock: &mut TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; WRITE];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::AcqRel);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes as many bytes as each order says, until the orders end.
fn send(sock: &mut TcpStream, orders: &Receiver<u64>) {
    let buf = vec![0x5au8; WRITE];
    for mut left in orders {
        while left > 0 {
            let k = left.min(WRITE as u64) as usize;
            if sock.write_all(&buf[..k]).is_err() {
                return;
            }
            left -= k as u64;
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.orders = None;
        for s in &self.socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
    }
}

// ---- the variants ----

/// A device process, killed when dropped.
struct Device {
    child: Child,
    pids: Vec<u32>,
    log: PathBuf,
}

impl Device {
    /// The device's CPU time so far (every process of its tree).
    fn cpu_time(&self) -> Duration {
        self.pids
            .iter()
            .map(|&p| benches::process::process_cpu_time(p))
            .sum()
    }

    /// Waits a moment for the device to exit by itself (its frontend hung up: it logs its
    /// counters), kills what is left, and returns its counters line when it dropped a frame
    /// or saw an error.
    fn close(mut self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = self.log.clone();
        drop(self);
        let log = fs::read_to_string(path).unwrap_or_default();
        let line = log.lines().rev().find(|l| l.contains("tx_dropped="))?;
        let bad = ["tx_dropped=", "tx_errors=", "rx_errors="].iter().any(|k| {
            line.split(k)
                .nth(1)
                .is_some_and(|v| !v.starts_with("0 ") && v != "0")
        });
        bad.then(|| line.trim().to_owned())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Not once reaped: its pid may be someone else's by now.
        if matches!(self.child.try_wait(), Ok(None)) {
            benches::process::kill_tree(&mut self.child);
        }
    }
}

/// What one call of a variant measured.
struct Call {
    bytes: u64,
    dev_cpu: Option<Duration>,
    fwd_cpu: Duration,
    bench_cpu: Duration,
}

/// One variant: its namespaces, forwarder, connection and (for ringvm) device. Fields drop
/// in order: the connection, the forwarder (our frontend: the device sees the hang-up),
/// the device, the namespaces.
struct Endpoint {
    key: &'static str,
    role: Role,
    label: String,
    /// The connections B -> A ([`Dir::Tx`]) and A -> B ([`Dir::Rx`]).
    streams: Vec<Stream>,
    fwd: Forwarder,
    device: Option<Device>,
    counts: Counts,
    calls: Vec<Call>,
    _ns: [Netns; 2],
}

impl Endpoint {
    /// `ringvm device net --tap-name rvtcpa` in a new namespace A, our guest on it, tap B in
    /// a new namespace B.
    fn ringvm(
        key: &'static str,
        bin: &Path,
        sandbox: bool,
        mode: Mode,
        dir: &Path,
    ) -> Result<Endpoint, String> {
        let (a, b) = (Netns::new()?, Netns::new()?);
        let socket = dir.join(format!("tcp-{}-{key}.sock", mode.name()));
        let log = dir.join(format!("tcp-{}-{key}.log", mode.name()));
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(bin);
        cmd.args(["device", "net", "--socket"])
            .arg(&socket)
            .args(["--tap-name", TAP_A]);
        if !sandbox {
            cmd.arg("--disable-sandbox");
        }
        let child = a.run(|| benches::process::spawn_backend(cmd, &log, &socket))?;
        let mut device = Device {
            child,
            pids: Vec::new(),
            log,
        };
        // The device made tap A before it listened.
        a.run(|| {
            ip(&["addr", "add", &format!("{A_IP}/24"), "dev", TAP_A])?;
            ip(&["link", "set", TAP_A, "up"])
        })?;
        let tap_b = b.run(|| own_tap(TAP_B, B_IP, mode))?;
        let guest = Guest::connect(&socket, mode.features(), SLOT, SLOT as u32)?;
        // After the connection: a sandboxed device has forked into its jail by now.
        device.pids = benches::process::process_tree(device.child.id());
        let fwd = Forwarder::Ringvm {
            guest,
            tap_b,
            free: (0..QUEUE_SIZE).rev().collect(),
        };
        let label = format!(
            "ringvm device net --tap-name {TAP_A}{}",
            if sandbox { "" } else { " --disable-sandbox" }
        );
        Endpoint::connect(key, Role::Subject, label, fwd, Some(device), [a, b])
    }

    /// Tap A' and tap B' of our own, each in a new namespace.
    fn raw(mode: Mode) -> Result<Endpoint, String> {
        let (a, b) = (Netns::new()?, Netns::new()?);
        let tap_a = a.run(|| own_tap(TAP_A, A_IP, mode))?;
        let tap_b = b.run(|| own_tap(TAP_B, B_IP, mode))?;
        let fwd = Forwarder::Raw {
            tap_a,
            tap_b,
            buf: vec![0; SLOT as usize],
        };
        let label = "read()/write() between two taps".to_owned();
        Endpoint::connect("raw-tap", Role::Limit, label, fwd, None, [a, b])
    }

    /// Opens the TCP connection through `fwd`.
    fn connect(
        key: &'static str,
        role: Role,
        label: String,
        mut fwd: Forwarder,
        device: Option<Device>,
        ns: [Netns; 2],
    ) -> Result<Endpoint, String> {
        let mut counts = Counts::default();
        let [a, b] = &ns;
        let streams = vec![
            Stream::open(a, A_IP, b, &mut fwd, &mut counts)?,
            Stream::open(b, B_IP, a, &mut fwd, &mut counts)?,
        ];
        Ok(Endpoint {
            key,
            role,
            label,
            streams,
            fwd,
            device,
            counts,
            calls: Vec::new(),
            _ns: ns,
        })
    }

    /// Moves `n` units through the connection of direction `d`; returns the time until the
    /// receiver had them all (the acks that follow are forwarded after, untimed).
    fn run(&mut self, d: Dir, n: u64) -> Result<Duration, String> {
        let stream = &mut self.streams[d as usize];
        let dev_before = self.device.as_ref().map(Device::cpu_time);
        let bench_before = benches::process::process_cpu_time(std::process::id());
        let fwd_before = main_thread_cpu_time();
        stream.order(n * UNIT)?;
        let start = Instant::now();
        self.fwd
            .pump(&mut self.counts, &mut || Ok(stream.all_received()))?;
        let elapsed = start.elapsed();
        self.fwd
            .pump(&mut self.counts, &mut || stream.all_acked())?;
        let dev_cpu = self
            .device
            .as_ref()
            .map(Device::cpu_time)
            .zip(dev_before)
            .map(|(a, b)| a.saturating_sub(b));
        self.calls.push(Call {
            bytes: n * UNIT,
            dev_cpu,
            fwd_cpu: main_thread_cpu_time().saturating_sub(fwd_before),
            bench_cpu: benches::process::process_cpu_time(std::process::id())
                .saturating_sub(bench_before),
        });
        Ok(elapsed)
    }

    /// The figures of the last `rounds` calls (the measured rounds) for the JSON line.
    fn stats(&self, d: Dir, rounds: usize) -> Vec<(&'static str, f64)> {
        let measured = &self.calls[self.calls.len().saturating_sub(rounds)..];
        let gb = measured.iter().map(|c| c.bytes).sum::<u64>() as f64 / 1e9;
        let mut out = Vec::new();
        let (frames, bytes) = match d {
            Dir::Tx => self.counts.to_a,
            Dir::Rx => self.counts.to_b,
        };
        if frames > 0 {
            let payload = bytes.saturating_sub(frames * VNET_HDR as u64);
            out.push(("frame_bytes", payload as f64 / frames as f64));
        }
        out.push(("write_errors", self.counts.write_errors as f64));
        if gb == 0.0 {
            return out;
        }
        let ms_per_gb = |d: Duration| d.as_secs_f64() * 1e3 / gb;
        let fwd: Duration = measured.iter().map(|c| c.fwd_cpu).sum();
        let bench: Duration = measured.iter().map(|c| c.bench_cpu).sum();
        let dev: Duration = measured.iter().filter_map(|c| c.dev_cpu).sum();
        out.push(("fwd_cpu_ms_per_gb", ms_per_gb(fwd)));
        out.push(("tcp_cpu_ms_per_gb", ms_per_gb(bench.saturating_sub(fwd))));
        if self.device.is_some() {
            out.push(("dev_cpu_ms_per_gb", ms_per_gb(dev)));
        }
        out.push(("total_cpu_ms_per_gb", ms_per_gb(bench + dev)));
        out
    }

    /// Tears down in order; returns a note when a tap refused frames or the device counted
    /// drops or errors.
    fn close(mut self) -> Option<String> {
        let mut notes = Vec::new();
        if self.counts.write_errors > 0 {
            notes.push(format!(
                "{}: taps refused {} frames",
                self.key, self.counts.write_errors
            ));
        }
        self.streams.clear();
        let device = self.device.take();
        let key = self.key;
        drop(self);
        if let Some(line) = device.and_then(Device::close) {
            notes.push(format!("{key}: the device counted {line}"));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}
