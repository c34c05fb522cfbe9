//! The net data path: `ringvm device net` beside raw tap I/O (the limit), in one run, in a
//! private network namespace.
//!
//! The "guest" is this process: a vhost-user frontend (`virtio::vhost_user::Frontend`, set
//! up by `benches::vnet`) on the device's socket, with its own guest memory (a memfd) and
//! split rings laid out by `virtio::mock::MockSplitQueue`, so nothing here depends on a
//! guest kernel's speed. It negotiates `VERSION_1`, `EVENT_IDX` and
//! `MRG_RXBUF`, no offloads: every frame is one descriptor (12-byte `virtio_net_hdr_v1` and
//! the Ethernet frame), kicks are eventfd writes when `avail_event` asks for them, and
//! completions are read from the used ring, sleeping on the call eventfd (with `used_event`
//! set half a batch ahead, as a NAPI driver batches) when there are none.
//!
//! - `tx/<size>` (guest -> tap): UDP frames from the guest to the tap's host address,
//!   posted on the TX ring as fast as the used entries come back. What counts is what the
//!   host stack delivered: datagrams read from a UDP socket on the host address (frames the
//!   kernel dropped do not count). Limit: the same frames, vnet header included, written
//!   with `write()` to a tap fd of its own, counted on the same kind of socket. Reference
//!   (`uring-tap`): the same writes through io_uring, 64 per `io_uring_enter` as the device
//!   submits the chains of a kick, with no virtqueue and no guest.
//! - `rx/<size>` (tap -> guest): a host-side sender thread sends the frames to the tap (an
//!   `AF_PACKET` socket bound to the tap, `PACKET_QDISC_BYPASS`, `sendmmsg` of 64) as fast
//!   as the receiver takes them: at most 256 in flight, below the tap's queue of 500, so
//!   the tap never runs dry while the receiver keeps up and the sender spends no CPU on
//!   frames that would be dropped (on 2 cores a flat-out sender steals the receiver's core;
//!   `RINGVM_NET_FLOOD=1` sends flat out anyway, the surplus dropped by the tap and counted
//!   for nobody). What counts is frames the device put in the guest's receive buffers (used
//!   entries of the frame's length), buffers replenished as they come back. Limit: `read()`
//!   from a tap fd with the same sender. Reference (`uring-tap`): the same tap reads made
//!   through io_uring the way the device makes them (rounds of reads that do not wait while
//!   the tap has frames, one read that waits once it is empty, into 256 buffers in turn),
//!   with no virtqueue and no guest: how far io_uring itself goes against `read()`.
//! - Sizes: 64-byte frames and full-MTU 1514-byte frames (a 1500-byte IP packet), without
//!   the vnet header; Gbit/s counts the Ethernet frame bytes.
//!
//! Subjects: `ringvm device net --socket S --tap-name T` jailed (`ringvm`) and with
//! `--disable-sandbox` (`ringvm-nosandbox`). Each gets its own tap and subnet, the limit a
//! third one and the reference a fourth; the bench process `unshare`s a new network namespace before it makes any of
//! them, so all traffic stays there and goes when the bench exits. Beside the rate each case
//! reports Gbit/s and CPU time per frame in `<target>/bench/net.jsonl`: `dev_cpu_us_per_pkt`
//! (every thread of the device's process tree, from `/proc/<pid>/task/*/schedstat`) and
//! `guest_cpu_us_per_pkt` (this process's main thread: the frontend or the raw-tap loop, and
//! for tx the UDP reader) and `bench_cpu_us_per_pkt` (the whole process: for rx also the
//! sender thread). The details table shows device, guest and sender CPU per frame.
//!
//! Run as root with `cargo bench -p benches --bench net [-- --quick] [-- FILTER...]`. ringvm
//! is taken from $RINGVM_BIN, else built as `target/release/ringvm`. TCP bulk throughput,
//! with offloads and without, is measured by the `tcp` bench (`benches/benches/tcp.rs`).

use std::fs;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use benches::vnet::{
    ip, main_thread_cpu_time, os_err, ringvm_bin, set_nonblocking, wait_readable, Dir, Guest,
    QUEUE_SIZE, VNET_HDR,
};
use benches::{bench_dir, Role, Runner, Variant};
use virtio::vhost_user::VIRTIO_F_VERSION_1;
use virtio::VIRTIO_F_EVENT_IDX;

/// Measured seconds per case (over all its rounds) and rounds, in a full and a quick run.
const FULL: (f64, usize) = (6.0, 12);
const QUICK: (f64, usize) = (0.3, 3);
/// Frame sizes (Ethernet header to payload end, no vnet header, no FCS).
const SIZES: [usize; 2] = [64, 1514];
/// `VIRTIO_NET_F_MRG_RXBUF`.
const MRG_RXBUF: u32 = 15;
/// Receive buffer size: a full-MTU frame and its header, as Linux posts mergeable buffers.
const RX_BUF: u32 = 1536;
/// Slot size of the fixed buffers in guest memory.
const SLOT: u64 = 2048;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const UDP_PORT: u16 = 9000;
/// `PACKET_QDISC_BYPASS` (linux/if_packet.h), not in the libc crate.
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// Frames per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 64;
/// A case that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(5);

fn main() {
    let config = benches::Config::from_env_with(FULL, QUICK);
    let mut runner = Runner::with_config("net", config);
    let benches: Vec<(Dir, usize, String)> = [Dir::Tx, Dir::Rx]
        .into_iter()
        .flat_map(|d| SIZES.map(|s| (d, s, format!("{}/{s}", d.name()))))
        .filter(|(_, _, name)| runner.enabled(name))
        .collect();
    if benches.is_empty() {
        runner.finish().expect("write results");
        return;
    }
    let mut left_out = Vec::new();
    // Built before leaving the host's network namespace (cargo may want the network).
    let bin = ringvm_bin();
    let dir = bench_dir().expect("target/bench");

    // SAFETY: plain syscall, before this process starts any thread: every thread and child
    // made from here on lives in the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        println!("NOT MEASURED net: cannot unshare a network namespace (root needed): {e}");
        std::process::exit(1);
    }
    // No IPv6 chatter (router solicitations, MLD) on the taps.
    for conf in ["all", "default"] {
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }

    let mut endpoints: Vec<Endpoint> = Vec::new();
    match &bin {
        Ok(bin) => {
            for (i, (key, sandbox)) in [("ringvm", true), ("ringvm-nosandbox", false)]
                .into_iter()
                .enumerate()
            {
                match Endpoint::ringvm(key, bin, sandbox, i as u8, &dir) {
                    Ok(e) => endpoints.push(e),
                    Err(e) => left_out.push(format!("subject {key}: {e}")),
                }
            }
        }
        Err(e) => left_out.push(format!("subjects ringvm: {e}")),
    }
    match Endpoint::raw(2) {
        Ok(e) => endpoints.push(e),
        Err(e) => left_out.push(format!("limit raw-tap: {e}")),
    }
    match Endpoint::uring(3) {
        Ok(e) => endpoints.push(e),
        Err(e) => left_out.push(format!("reference uring-tap: {e}")),
    }

    for (d, size, name) in &benches {
        let (d, size) = (*d, *size);
        for e in &mut endpoints {
            e.calls.clear();
            if let Err(err) = e.prepare(d, size) {
                panic!("{} {name}: {err}", e.key);
            }
        }
        let sender = (d == Dir::Rx).then(|| Sender::start(&endpoints, size));
        let variants = endpoints
            .iter_mut()
            .enumerate()
            .map(|(i, e)| {
                let (role, key, label) = (e.role, e.key, e.label(d));
                let sender = sender.as_ref();
                Variant::new(role, key, &label, move |n| {
                    let r = match d {
                        Dir::Tx => e.run_tx(n, size),
                        Dir::Rx => e.run_rx(n, size, i, sender.expect("sender")),
                    };
                    r.unwrap_or_else(|err| panic!("{key} {d:?} {size}: {err}"))
                })
            })
            .collect();
        runner.compare(name, variants);
        drop(sender);
        let rounds = runner.config().rounds;
        for e in &endpoints {
            for (k, v) in e.stats(rounds) {
                runner.annotate(name, e.key, k, v);
            }
            if let Some(c) = runner.case(name, e.key) {
                let gbit = c.ops_per_sec * size as f64 * 8.0 / 1e9;
                runner.annotate(name, e.key, "gbit_per_s", gbit);
            }
        }
    }

    print_details(&runner);
    runner.finish_before_checks();
    for (_, _, name) in &benches {
        runner.check(name, "ringvm", Role::Limit, 0.9);
    }
    for why in &left_out {
        println!("NOT MEASURED {why}");
    }
    drop(endpoints);
    if !left_out.is_empty() {
        std::process::exit(1);
    }
}

/// A figure of the JSON line of a case.
fn extra(runner: &Runner, bench: &str, name: &str, key: &str) -> Option<f64> {
    runner.case(bench, name)?.figure(key)
}

/// The second table: pps, Gbit/s, ratio and CPU per frame.
fn print_details(runner: &Runner) {
    println!(
        "\n{:8} {:17} {:>8} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8}",
        "bench", "variant", "pps", "Gbit/s", "xlimit", "deliv", "device", "guest", "sender"
    );
    println!("{:>84}", "(CPU us per frame)");
    println!("{}", "-".repeat(84));
    let mut last = "";
    for c in runner.cases() {
        let get = |k| extra(runner, &c.bench, &c.name, k);
        let fmt =
            |v: Option<f64>, p: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.p$}"));
        let bench = if c.bench == last { "" } else { &c.bench };
        last = &c.bench;
        let sender = get("bench_cpu_us_per_pkt")
            .zip(get("guest_cpu_us_per_pkt"))
            .map(|(b, g)| b - g)
            .filter(|_| c.bench.starts_with("rx"));
        println!(
            "{bench:8} {:17} {:>8.0} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8}",
            c.name,
            c.ops_per_sec,
            fmt(get("gbit_per_s"), 3),
            fmt(runner.ratio(c, Role::Limit), 2),
            get("delivered_frac").map_or_else(|| "-".to_owned(), |f| format!("{:.0}%", f * 100.0)),
            fmt(get("dev_cpu_us_per_pkt"), 2),
            fmt(get("guest_cpu_us_per_pkt"), 2),
            fmt(sender, 2),
        );
    }
}

// ---- frames ----

fn ip_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(c[0]) << 8 | c.get(1).map_or(0, |&b| u32::from(b));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A `len`-byte Ethernet frame carrying a UDP datagram (no UDP checksum, which IPv4 allows).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    len: usize,
) -> Vec<u8> {
    assert!(len >= 14 + 20 + 8);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(len, 0x5a);
    f
}

/// The MAC address of interface `name` (`SIOCGIFHWADDR`: /sys shows the host's namespace).
fn if_mac(name: &str) -> Result<[u8; 6], String> {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return os_err("socket(AF_INET)");
    }
    // SAFETY: a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(format!("interface name {name:?} too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return os_err(&format!("MAC of {name}"));
    }
    // SAFETY: SIOCGIFHWADDR set the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

// ---- host-side sockets ----

/// A UDP socket on the tap's host address that counts what the stack delivered.
struct UdpCounter {
    sock: UdpSocket,
    bufs: Vec<[u8; 64]>,
}

impl UdpCounter {
    fn bind(addr: Ipv4Addr) -> Result<UdpCounter, String> {
        let sock = UdpSocket::bind((addr, UDP_PORT)).map_err(|e| format!("bind {addr}: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let size: libc::c_int = 64 << 20;
        // SAFETY: setsockopt with a c_int option on our socket.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return os_err("SO_RCVBUFFORCE");
        }
        Ok(UdpCounter {
            sock,
            bufs: vec![[0; 64]; BATCH],
        })
    }

    /// Reads every queued datagram (cut to 64 bytes: only the count matters); returns how
    /// many.
    fn drain(&mut self) -> u64 {
        let mut total = 0;
        loop {
            let mut iov: Vec<libc::iovec> = self
                .bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // The iovecs point at our buffers.
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    // SAFETY: an all-zero mmsghdr is valid.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = v;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: msgs and the buffers they point at outlive the call.
            let n = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    msgs.len() as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                return total;
            }
            total += n as u64;
        }
    }
}

/// An `AF_PACKET` socket bound to interface `name` that sends past the qdisc.
fn packet_socket(name: &str) -> Result<OwnedFd, String> {
    // SAFETY: plain syscalls; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return os_err("socket(AF_PACKET)");
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return os_err(&format!("if_nametoindex {name}"));
    }
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return os_err(&format!("bind AF_PACKET to {name}"));
    }
    let one: libc::c_int = 1;
    // SAFETY: a c_int option.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r != 0 {
        return os_err("PACKET_QDISC_BYPASS");
    }
    Ok(fd)
}

/// The host-side sender of the rx benches: sends its frame to the tap of endpoint
/// `target - 1` while `target` is non-zero, and sleeps otherwise. It keeps at most
/// [`WINDOW`] frames in flight (sent and not yet delivered: below the tap's queue of 500,
/// so the tap drops nothing and the sender burns no CPU on frames nobody reads), or with
/// `RINGVM_NET_FLOOD=1` sends flat out (the surplus is dropped by the tap).
struct Sender {
    target: Arc<AtomicUsize>,
    /// Frames the sender may still send.
    credit: Arc<AtomicI64>,
    thread: Option<JoinHandle<()>>,
}

/// Frames in flight from the sender to the receiver.
const WINDOW: i64 = 256;

const STOP: usize = usize::MAX;

impl Sender {
    fn start(endpoints: &[Endpoint], size: usize) -> Sender {
        let jobs: Vec<(OwnedFd, Vec<u8>)> = endpoints
            .iter()
            .map(|e| {
                let frame = udp_frame(GUEST_MAC, e.tap_mac, e.host_ip, e.guest_ip, size);
                (e.psock.try_clone().expect("dup AF_PACKET socket"), frame)
            })
            .collect();
        let target = Arc::new(AtomicUsize::new(0));
        let credit = Arc::new(AtomicI64::new(0));
        let flood = std::env::var_os("RINGVM_NET_FLOOD").is_some_and(|v| v == "1");
        let (t, c) = (target.clone(), credit.clone());
        let batch = BATCH as i64;
        let thread = std::thread::spawn(move || loop {
            match t.load(Ordering::Acquire) {
                STOP => return,
                0 => std::thread::park_timeout(Duration::from_millis(5)),
                i if flood => {
                    let (fd, frame) = &jobs[i - 1];
                    send_batch(fd.as_raw_fd(), frame);
                }
                i if c.load(Ordering::Acquire) >= batch => {
                    c.fetch_sub(batch, Ordering::AcqRel);
                    let (fd, frame) = &jobs[i - 1];
                    let sent = send_batch(fd.as_raw_fd(), frame) as i64;
                    c.fetch_add(batch - sent, Ordering::AcqRel);
                }
                _ => std::thread::sleep(Duration::from_micros(20)),
            }
        });
        Sender {
            target,
            credit,
            thread: Some(thread),
        }
    }

    /// The receiver got `frames` frames: as many more may be sent.
    fn delivered(&self, frames: u64) {
        self.credit.fetch_add(frames as i64, Ordering::AcqRel);
    }

    /// Floods endpoint `index`, or stops flooding (`None`).
    fn aim(&self, index: Option<usize>) {
        if index.is_some() {
            self.credit.store(WINDOW, Ordering::Release);
        }
        self.target
            .store(index.map_or(0, |i| i + 1), Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.target.store(STOP, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// One `sendmmsg` of [`BATCH`] copies of `frame`; returns how many the tap took.
fn send_batch(fd: RawFd, frame: &[u8]) -> usize {
    let mut iov = [libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    }; BATCH];
    // SAFETY: an all-zero mmsghdr is valid; each points at one iovec of the frame.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the messages and the frame outlive the call; the socket is bound.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
    n.max(0) as usize
}

// ---- the endpoints: ringvm's guest, or the raw tap ----

/// What one call of a variant measured.
struct Call {
    /// Frames delivered.
    frames: u64,
    /// Frames sent (tx; 0 for rx, where the sender's surplus is dropped by design).
    offered: u64,
    /// The device's CPU time over the call.
    dev_cpu: Option<Duration>,
    /// This process's CPU time over the call.
    bench_cpu: Duration,
    /// This process's main thread's CPU time over the call: the guest (frontend) or the
    /// raw-tap loop, with the UDP reader (tx).
    guest_cpu: Duration,
}

enum Kind {
    Ringvm(Box<Guest>),
    /// A tap fd of our own (non-blocking).
    Raw(OwnedFd),
    /// A tap fd of our own read through io_uring (rx only).
    Uring(Box<UringReader>),
}

/// One tap with what drives it: the host side (address, UDP counter, packet socket) and
/// the guest side (ringvm's device and our frontend, or a raw tap fd).
struct Endpoint {
    key: &'static str,
    role: Role,
    kind: Kind,
    tap: String,
    tap_mac: [u8; 6],
    host_ip: Ipv4Addr,
    guest_ip: Ipv4Addr,
    udp: UdpCounter,
    psock: OwnedFd,
    /// The device process (for ringvm).
    process: Option<Child>,
    pids: Vec<u32>,
    calls: Vec<Call>,
    /// The transmit frame of the current bench, with its vnet header (raw tap).
    tx_frame: Vec<u8>,
}

impl Endpoint {
    /// `ringvm device net` on tap `rvnb<net>`, host side 10.0.<net>.1/24, and our frontend.
    fn ringvm(
        key: &'static str,
        bin: &Path,
        sandbox: bool,
        net: u8,
        dir: &Path,
    ) -> Result<Endpoint, String> {
        let tap = format!("rvnb{net}");
        let socket = dir.join(format!("net-{key}.sock"));
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(bin);
        cmd.args(["device", "net", "--socket"])
            .arg(&socket)
            .args(["--tap-name", &tap]);
        if !sandbox {
            cmd.arg("--disable-sandbox");
        }
        let mut child =
            benches::process::spawn_backend(cmd, &dir.join(format!("net-{key}.log")), &socket)?;
        let host_ip = Ipv4Addr::new(10, 0, net, 1);
        let setup = || -> Result<(Box<Guest>, UdpCounter, OwnedFd, [u8; 6]), String> {
            // The device made the tap before it listened.
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &tap])?;
            ip(&["link", "set", &tap, "up"])?;
            let features =
                (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << MRG_RXBUF);
            let guest = Guest::connect(&socket, features, SLOT, RX_BUF)?;
            Ok((
                guest,
                UdpCounter::bind(host_ip)?,
                packet_socket(&tap)?,
                if_mac(&tap)?,
            ))
        };
        let (guest, udp, psock, tap_mac) = match setup() {
            Ok(s) => s,
            Err(e) => {
                benches::process::kill_tree(&mut child);
                return Err(e);
            }
        };
        // After the connection: a sandboxed device has forked into its jail by now.
        let pids = benches::process::process_tree(child.id());
        Ok(Endpoint {
            key,
            role: Role::Subject,
            kind: Kind::Ringvm(guest),
            tap,
            tap_mac,
            host_ip,
            guest_ip: Ipv4Addr::new(10, 0, net, 2),
            udp,
            psock,
            process: Some(child),
            pids,
            calls: Vec::new(),
            tx_frame: Vec::new(),
        })
    }

    /// A tap `rvnb<net>` of our own, host side 10.0.<net>.1/24, read and written with
    /// `read()`/`write()`: the limit.
    fn raw(net: u8) -> Result<Endpoint, String> {
        Endpoint::own_tap(net, "raw-tap", Role::Limit, |fd| {
            set_nonblocking(fd.as_fd())?;
            Ok(Kind::Raw(fd))
        })
    }

    /// A tap of our own read through io_uring (blocking: a read that waits is the ring's).
    fn uring(net: u8) -> Result<Endpoint, String> {
        Endpoint::own_tap(net, "uring-tap", Role::Reference, |fd| {
            Ok(Kind::Uring(Box::new(UringReader::new(fd)?)))
        })
    }

    /// A tap `rvnb<net>` of our own, host side 10.0.<net>.1/24, driven as `kind` makes.
    fn own_tap(
        net: u8,
        key: &'static str,
        role: Role,
        kind: impl FnOnce(OwnedFd) -> Result<Kind, String>,
    ) -> Result<Endpoint, String> {
        let name = format!("rvnb{net}");
        let tap = net::Tap::create(Some(&name), 1)
            .map_err(|e| format!("tap {name}: {e}"))?
            .pop()
            .ok_or("no tap")?;
        let host_ip = Ipv4Addr::new(10, 0, net, 1);
        tap.configure(host_ip, Ipv4Addr::new(255, 255, 255, 0))
            .map_err(|e| format!("configure {name}: {e}"))?;
        Ok(Endpoint {
            key,
            role,
            kind: kind(tap.into_fd())?,
            tap_mac: if_mac(&name)?,
            udp: UdpCounter::bind(host_ip)?,
            psock: packet_socket(&name)?,
            tap: name,
            host_ip,
            guest_ip: Ipv4Addr::new(10, 0, net, 2),
            process: None,
            pids: Vec::new(),
            calls: Vec::new(),
            tx_frame: Vec::new(),
        })
    }

    fn label(&self, d: Dir) -> String {
        match (&self.kind, d) {
            (Kind::Ringvm(_), _) => format!(
                "ringvm device net --tap-name {}{}",
                self.tap,
                if self.key.ends_with("nosandbox") {
                    " --disable-sandbox"
                } else {
                    ""
                }
            ),
            (Kind::Raw(_), Dir::Tx) => "write() to a tap fd".to_owned(),
            (Kind::Raw(_), Dir::Rx) => "read() from a tap fd".to_owned(),
            (Kind::Uring(_), Dir::Tx) => {
                format!("io_uring WRITEs to a tap fd, {URING_TX_BATCH} per enter")
            }
            (Kind::Uring(_), Dir::Rx) => "io_uring reads from a tap fd".to_owned(),
        }
    }

    /// Lays out the transmit frames of a `size`-byte bench.
    fn prepare(&mut self, d: Dir, size: usize) -> Result<(), String> {
        let frame = udp_frame(self.tap_mac, GUEST_MAC, self.guest_ip, self.host_ip, size);
        let mut with_hdr = vec![0u8; VNET_HDR];
        with_hdr.extend_from_slice(&frame);
        if let (Kind::Ringvm(g), Dir::Tx) = (&mut self.kind, d) {
            prepare_tx(g, &with_hdr)?;
        }
        self.tx_frame = with_hdr;
        Ok(())
    }

    fn cpu_time(&self) -> Option<Duration> {
        self.process.as_ref()?;
        Some(
            self.pids
                .iter()
                .map(|&p| benches::process::process_cpu_time(p))
                .sum(),
        )
    }

    /// Measures `f`, which returns the time taken and the frames delivered; records the call
    /// and returns the time scaled to `n` frames at the measured rate.
    fn measure(
        &mut self,
        n: u64,
        offered: u64,
        f: impl FnOnce(&mut Self) -> Result<(Duration, u64), String>,
    ) -> Result<Duration, String> {
        let dev_before = self.cpu_time();
        let bench_before = benches::process::process_cpu_time(std::process::id());
        let guest_before = main_thread_cpu_time();
        let (elapsed, frames) = f(self)?;
        let bench_cpu =
            benches::process::process_cpu_time(std::process::id()).saturating_sub(bench_before);
        let guest_cpu = main_thread_cpu_time().saturating_sub(guest_before);
        let dev_cpu = self
            .cpu_time()
            .zip(dev_before)
            .map(|(a, b)| a.saturating_sub(b));
        self.calls.push(Call {
            frames,
            offered,
            dev_cpu,
            bench_cpu,
            guest_cpu,
        });
        if frames == 0 {
            return Err(format!("no frame delivered in {elapsed:?}"));
        }
        Ok(elapsed.mul_f64(n as f64 / frames as f64))
    }

    /// Transmits `n` frames; the rate counts the ones the host's UDP socket got.
    fn run_tx(&mut self, n: u64, _size: usize) -> Result<Duration, String> {
        self.measure(n, n, |e| {
            let start = Instant::now();
            let sent = match &mut e.kind {
                Kind::Ringvm(g) => transmit(g, n, &mut e.udp)?,
                Kind::Uring(r) => r.transmit(&e.tx_frame, n, &mut e.udp)?,
                Kind::Raw(fd) => {
                    let mut got = 0;
                    for i in 0..n {
                        // SAFETY: writes from our buffer.
                        let r = unsafe {
                            libc::write(
                                fd.as_raw_fd(),
                                e.tx_frame.as_ptr().cast(),
                                e.tx_frame.len(),
                            )
                        };
                        if r < 0 {
                            return os_err("tap write");
                        }
                        if i % BATCH as u64 == BATCH as u64 - 1 {
                            got += e.udp.drain();
                        }
                    }
                    got
                }
            };
            let got = sent + e.udp.drain();
            Ok((start.elapsed(), got))
        })
    }

    /// Receives until `n` frames of `size` bytes arrived, with the sender flooding this
    /// endpoint's tap; then lets the tap queue run dry (uncounted).
    fn run_rx(
        &mut self,
        n: u64,
        size: usize,
        index: usize,
        sender: &Sender,
    ) -> Result<Duration, String> {
        let want = VNET_HDR + size;
        self.measure(n, 0, |e| {
            let start = Instant::now();
            sender.aim(Some(index));
            let got = match &mut e.kind {
                Kind::Ringvm(g) => receive(g, n, want, true, sender),
                Kind::Raw(fd) => raw_receive(fd.as_fd(), n, want, true, sender),
                Kind::Uring(r) => r.receive(n, want, true, sender),
            };
            let elapsed = start.elapsed();
            sender.aim(None);
            let got = got?;
            match &mut e.kind {
                Kind::Ringvm(g) => receive(g, u64::MAX, want, false, sender)?,
                Kind::Raw(fd) => raw_receive(fd.as_fd(), u64::MAX, want, false, sender)?,
                Kind::Uring(r) => r.receive(u64::MAX, want, false, sender)?,
            };
            Ok((elapsed, got))
        })
    }

    /// The figures of the last `rounds` calls (the measured rounds) for the JSON line.
    fn stats(&self, rounds: usize) -> Vec<(&'static str, f64)> {
        let measured = &self.calls[self.calls.len().saturating_sub(rounds)..];
        let frames: u64 = measured.iter().map(|c| c.frames).sum();
        let mut out = Vec::new();
        if frames == 0 {
            return out;
        }
        let offered: u64 = measured.iter().map(|c| c.offered).sum();
        if offered > 0 {
            out.push(("delivered_frac", frames as f64 / offered as f64));
        }
        let guest: Duration = measured.iter().map(|c| c.guest_cpu).sum();
        out.push(("guest_cpu_us_per_pkt", benches::us_per(guest, frames)));
        let bench: Duration = measured.iter().map(|c| c.bench_cpu).sum();
        out.push(("bench_cpu_us_per_pkt", benches::us_per(bench, frames)));
        let dev: Option<Duration> = measured.iter().map(|c| c.dev_cpu).sum();
        if let Some(dev) = dev {
            out.push(("dev_cpu_us_per_pkt", benches::us_per(dev, frames)));
        }
        out
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(child) = &mut self.process {
            benches::process::kill_tree(child);
        }
    }
}

/// How long a receive loop has gone without a frame.
#[derive(Default)]
struct Idle(Option<Instant>);

impl Idle {
    /// A frame came.
    fn reset(&mut self) {
        self.0 = None;
    }

    /// No frame came (`got` of `n` so far): whether to stop, draining (not `counting`) and
    /// quiet for 2 ms; an error when counting and quiet for [`STALL`].
    fn stop(&mut self, counting: bool, got: u64, n: u64) -> Result<bool, String> {
        let quiet = self.0.get_or_insert_with(Instant::now).elapsed();
        if counting && quiet > STALL {
            return Err(format!("{got} of {n} frames in {STALL:?}"));
        }
        Ok(!counting && quiet > Duration::from_millis(2))
    }
}

/// Reads frames from a non-blocking tap fd until `n` of `want` bytes came (`counting`), or
/// until none came for a while (not `counting`: draining). Returns the frames of `want`
/// bytes read.
fn raw_receive(
    fd: std::os::fd::BorrowedFd<'_>,
    n: u64,
    want: usize,
    counting: bool,
    sender: &Sender,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    let mut idle = Idle::default();
    while got < n {
        // SAFETY: reads into our buffer.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            idle.reset();
            got += u64::from(r as usize == want);
            sender.delivered(1);
            continue;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(format!("tap read: {e}"));
        }
        if idle.stop(counting, got, n)? {
            break;
        }
        let timeout = if counting { 100 } else { 1 };
        wait_readable(fd.as_raw_fd(), timeout);
    }
    Ok(got)
}

/// Buffers of the io_uring reference, as many as the guest's receive ring has.
const URING_BUFS: usize = QUEUE_SIZE as usize;
/// Most reads of one round of the io_uring reference (the device's `RX_READS`).
const URING_BURST: usize = 32;
/// WRITEs per `io_uring_enter` of the tx reference: the device's most chains per batch.
const URING_TX_BATCH: usize = 64;
/// `user_data` bit of the read that waits.
const WAITING: u64 = 1 << 32;

/// The reference of the rx benches: a tap fd read through io_uring the way ringvm's device
/// reads its tap, and nothing else (no virtqueue, no guest thread). While the tap has frames,
/// rounds of up to [`URING_BURST`] reads that do not wait (`RWF_NOWAIT`), submitted at once;
/// once a round finds it empty, one read that waits (the kernel polls the tap). Reads go
/// into [`URING_BUFS`] buffers in turn, as the device's go into the guest's ring.
struct UringReader {
    /// Before `bufs`: dropped first, after `Drop` took back the read that waits.
    ring: io_uring::IoUring,
    fd: OwnedFd,
    bufs: Vec<u8>,
    /// The next buffer.
    next: usize,
    /// Whether the read that waits is in the ring.
    waiting: bool,
    /// Whether the last round found frames: the next round's reads do not wait.
    busy: bool,
    burst: usize,
}

impl UringReader {
    fn new(fd: OwnedFd) -> Result<UringReader, String> {
        let ring =
            io_uring::IoUring::new(2 * URING_BURST as u32).map_err(|e| format!("io_uring: {e}"))?;
        Ok(UringReader {
            ring,
            fd,
            bufs: vec![0; URING_BUFS * SLOT as usize],
            next: 0,
            waiting: false,
            busy: false,
            burst: 2,
        })
    }

    /// Queues a read into the next buffer.
    fn queue_read(&mut self, nowait: bool) -> Result<(), String> {
        use io_uring::{opcode, types};
        let slot = self.next % URING_BUFS;
        self.next += 1;
        // SAFETY: in bounds of `bufs`, which outlives the ring (see `Drop`).
        let buf = unsafe { self.bufs.as_mut_ptr().add(slot * SLOT as usize) };
        let read = opcode::Read::new(types::Fd(self.fd.as_raw_fd()), buf, SLOT as u32);
        let sqe = if nowait {
            read.rw_flags(libc::RWF_NOWAIT).build().user_data(0)
        } else {
            read.build().user_data(WAITING)
        };
        // SAFETY: the buffer stays valid until the completion is reaped (`Drop` waits for
        // the read that waits).
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| "submission queue full".into())
    }

    /// Submits and waits for `want` completions, at most `timeout_ms`.
    fn submit_wait(&mut self, want: usize, timeout_ms: u32) -> Result<(), String> {
        let ts = io_uring::types::Timespec::new().nsec(timeout_ms * 1_000_000);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(e) => Err(format!("io_uring_enter: {e}")),
        }
    }

    /// Receives until `n` frames of `want` bytes came (`counting`), or until none came for a
    /// while (not `counting`: draining; the read that waits may stay in the ring for the next
    /// call). Returns the frames of `want` bytes read.
    fn receive(
        &mut self,
        n: u64,
        want: usize,
        counting: bool,
        sender: &Sender,
    ) -> Result<u64, String> {
        let mut got = 0;
        let mut idle = Idle::default();
        while got < n {
            let nowait = self.busy;
            let reads = if nowait { self.burst } else { 1 };
            if nowait {
                for _ in 0..reads {
                    self.queue_read(true)?;
                }
            } else if !self.waiting {
                self.queue_read(false)?;
                self.waiting = true;
            }
            let timeout = if counting { 100 } else { 1 };
            self.submit_wait(reads, timeout)?;
            let (mut frames, mut empty) = (0, false);
            for cqe in self.ring.completion() {
                if cqe.user_data() == WAITING {
                    self.waiting = false;
                }
                match cqe.result() {
                    r if r >= 0 => {
                        frames += 1;
                        got += u64::from(r as usize == want);
                    }
                    r if -r == libc::EAGAIN => empty = true,
                    r => return Err(format!("tap read: {}", io::Error::from_raw_os_error(-r))),
                }
            }
            sender.delivered(frames);
            if nowait {
                self.busy = !empty;
                self.burst = (2 * frames as usize).clamp(2, URING_BURST);
            } else {
                self.busy = frames > 0;
            }
            if frames > 0 {
                idle.reset();
                continue;
            }
            if idle.stop(counting, got, n)? {
                break;
            }
        }
        Ok(got)
    }
}

impl UringReader {
    /// The reference of the tx benches: `n` frames written to the tap through io_uring,
    /// [`URING_TX_BATCH`] WRITEs per `io_uring_enter` (as the device submits the chains of a
    /// kick together), from one buffer; drains `udp` after each batch. Returns the datagrams
    /// it counted.
    fn transmit(&mut self, frame: &[u8], n: u64, udp: &mut UdpCounter) -> Result<u64, String> {
        use io_uring::{opcode, types};
        if self.waiting {
            return Err("a read is still in the ring".to_owned());
        }
        let (mut sent, mut got) = (0u64, 0u64);
        while sent < n {
            let batch = (n - sent).min(URING_TX_BATCH as u64) as usize;
            for _ in 0..batch {
                let write = opcode::Write::new(
                    types::Fd(self.fd.as_raw_fd()),
                    frame.as_ptr(),
                    frame.len() as u32,
                )
                .build()
                .user_data(0);
                // SAFETY: `frame` outlives the write: every completion is reaped below
                // before this function returns.
                unsafe { self.ring.submission().push(&write) }
                    .map_err(|_| "submission queue full".to_owned())?;
            }
            let mut done = 0;
            while done < batch {
                self.ring
                    .submit_and_wait(batch - done)
                    .map_err(|e| format!("io_uring_enter: {e}"))?;
                for cqe in self.ring.completion() {
                    done += 1;
                    if cqe.result() < 0 {
                        let e = io::Error::from_raw_os_error(-cqe.result());
                        return Err(format!("tap write: {e}"));
                    }
                }
            }
            sent += batch as u64;
            got += udp.drain();
        }
        Ok(got)
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        if !self.waiting {
            return;
        }
        let cancel = io_uring::opcode::AsyncCancel::new(WAITING)
            .build()
            .user_data(0);
        // SAFETY: a cancel request holds no pointers.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            std::mem::forget(std::mem::take(&mut self.bufs));
            return;
        }
        while self.waiting {
            if self.submit_wait(1, 100).is_err() {
                // The kernel may still write the buffers: leak them.
                std::mem::forget(std::mem::take(&mut self.bufs));
                return;
            }
            for cqe in self.ring.completion() {
                if cqe.user_data() == WAITING {
                    self.waiting = false;
                }
            }
        }
    }
}

// ---- the guest: our vhost-user frontend ([`vnet::Guest`]) ----

/// Writes `frame` (vnet header included) into every transmit slot.
fn prepare_tx(g: &mut Guest, frame: &[u8]) -> Result<(), String> {
    for i in 0..QUEUE_SIZE {
        g.mem
            .write_slice(frame, g.tx.slot(i))
            .map_err(|e| e.to_string())?;
        g.tx.set_desc(i, frame.len() as u32, 0)?;
    }
    Ok(())
}

/// Transmits `n` frames, keeping the ring full; drains `udp` as it goes. Returns the
/// datagrams it counted.
fn transmit(g: &mut Guest, n: u64, udp: &mut UdpCounter) -> Result<u64, String> {
    let mut free: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
    let (mut posted, mut done, mut got) = (0u64, 0u64, 0u64);
    let mut last = Instant::now();
    while done < n {
        let old = g.tx.q.avail_idx();
        while posted < n {
            let Some(i) = free.pop() else { break };
            g.tx.post(i)?;
            posted += 1;
        }
        g.tx.kick_since(old)?;
        let mut reaped = 0;
        while let Some((id, _)) = g.tx.used()? {
            free.push(id);
            reaped += 1;
        }
        done += reaped;
        got += udp.drain();
        if reaped == 0 {
            if last.elapsed() > STALL {
                return Err(format!("{done} of {n} frames sent in {STALL:?}"));
            }
            let in_flight = (posted - done) as u16;
            g.tx.wait((in_flight / 2).max(1), 10)?;
        } else {
            last = Instant::now();
        }
    }
    Ok(got)
}

/// Takes used receive entries and posts their buffers again until `n` frames of `want`
/// bytes came (`counting`), or until none came for a while (draining). Returns the
/// frames of `want` bytes.
fn receive(
    g: &mut Guest,
    n: u64,
    want: usize,
    counting: bool,
    sender: &Sender,
) -> Result<u64, String> {
    let mut got = 0u64;
    let mut idle = Idle::default();
    while got < n {
        let old = g.rx.q.avail_idx();
        let mut reaped = 0;
        while let Some((id, len)) = g.rx.used()? {
            got += u64::from(len as usize == want);
            g.rx.post(id)?;
            reaped += 1;
        }
        if reaped > 0 {
            idle.reset();
            g.rx.kick_since(old)?;
            sender.delivered(reaped);
            continue;
        }
        if idle.stop(counting, got, n)? {
            break;
        }
        let ahead = (n - got).min(u64::from(QUEUE_SIZE) / 4) as u16;
        g.rx.wait(ahead, if counting { 100 } else { 1 })?;
    }
    Ok(got)
}
