//! virtio-vsock between the test guest and a host process: stream throughput and
//! request/response latency, timed on the host side.
//!
//! The guest is the purpose-built test guest's polling virtio-vsock driver at CPL3
//! (`ringvm.test=virtio-vsock`, guest/test/virtio_vsock.c); the host side is this bench, a
//! plain unix-socket client of hybrid vsock (`CONNECT <port>` on the device's socket, or a
//! listener on `PATH_<port>` for the guest's connect).
//!
//! - Subject: `ringvm run --vsock cid=42,uds=PATH`: ringvm's device in its jailed device
//!   process (host streams handed to it by the VMM's broker).
//! - Peer: `ringvm run --vhost-user type=vsock,socket=S` with rust-vmm's
//!   `vhost-device-vsock --vm guest-cid=42,socket=S,uds-path=PATH` behind ringvm's frontend
//!   (same guest, same VMM, same host client; only the device differs).
//! - Limit: a unix socketpair between two host threads doing the same work with nothing in
//!   between (no guest, no device).
//!
//! Cases (one operation = one 64 KiB write, or one round trip):
//! - `stream/64k/h2g`: the host writes 64 KiB at a time to the guest's `sink`
//!   (`vsock.check=0`: it counts, no per-byte work; `vsock.buf_alloc` 4 MiB, the guest's 64
//!   receive buffers of 64 KiB, so its credit is not the bottleneck). Timed from the first
//!   write to the end of the host stream, which comes only after the guest consumed every
//!   byte and closed (its SHUTDOWN); the guest's own count is checked against what was sent.
//! - `stream/64k/g2h`: the guest's `source` sends exactly n x 64 KiB in its largest packets
//!   (32 KiB payloads, `vsock.check=0`: the tx slots' bytes as they are) and closes; the host
//!   reads 64 KiB at a time. Timed from the host's accept of the guest's connection to the end
//!   of the stream, every byte counted.
//! - `rr/64`: the host writes 64 bytes and reads the guest's `echo` of them (checked), one at
//!   a time. Every round trip is timed; p50/p99/p99.9 (µs) go to the JSON line.
//!
//! Each call of a variant boots one VM (the guest polls: one VM keeps a host CPU busy, so never
//! two at once), runs the operations and lets the guest end; only the operations are timed,
//! on the host (`Instant`), so boot does not count. The device's CPU time per operation (the
//! jailed device process, or vhost-device-vsock) goes to the JSON line as
//! `dev_cpu_us_per_op`.
//!
//! Reading the numbers: the guest polls, so its vCPU keeps one host CPU busy for the whole
//! run; on a 2-CPU host the device, the VMM's broker and the bench's host thread share the
//! other, while the limit's two threads have both. The limit is what the host itself does
//! with one copy per byte; the VM variants copy at least twice (host socket → device → guest
//! memory), so the ratio to the limit says how far the device's data path is from free.
//!
//! Run with `cargo bench -p benches --bench vsock [-- --quick] [-- FILTER...]`. ringvm is taken
//! from $RINGVM_BIN, else built as `<target>/release/ringvm`; vhost-device-vsock from PATH or
//! `~/.cargo/bin` (scripts/setup installs it).

use std::cell::RefCell;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use benches::process::{
    kill_tree, process_cpu_time, process_tree, ringvm_release, spawn_backend, test_guest,
};
use benches::{bench_dir, Config, Role, Runner, Variant};

const CID: u32 = 42;
/// The guest's listening port (host connects to it).
const GUEST_PORT: u32 = 52;
/// The host port the guest's `source` connects to.
const HOST_PORT: u32 = 5000;
/// Host write (and read) size of the stream cases.
const CHUNK: usize = 64 << 10;
/// Request and response size of `rr/64`.
const MSG: usize = 64;
/// The receive buffer the guest's sink advertises.
const SINK_BUF_ALLOC: u32 = 4 << 20;
/// Guest RAM, MiB (the driver's rings and buffers are at 64 MiB).
const MEM_MIB: u32 = 256;
/// Boot to the guest's listener or connect; a step of the host side; the guest's end.
const STEP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    /// ringvm's own device (`--vsock`).
    Ringvm,
    /// vhost-device-vsock behind ringvm's frontend.
    Vhost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Host → guest sink, 64 KiB writes.
    H2g,
    /// Guest source → host, 64 KiB reads.
    G2h,
    /// 64-byte ping-pong with the guest's echo.
    Rr,
}

impl Work {
    fn bench(self) -> &'static str {
        match self {
            Work::H2g => "stream/64k/h2g",
            Work::G2h => "stream/64k/g2h",
            Work::Rr => "rr/64",
        }
    }
}

struct Setup {
    bin: PathBuf,
    guest: PathBuf,
    vhost: Option<PathBuf>,
    /// Sockets and logs (short: unix socket paths are at most 107 bytes).
    dir: PathBuf,
}

/// A booted VM (and its vhost-device-vsock), killed with what it started when dropped.
struct Vm {
    child: Child,
    peer: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: String,
    uds: PathBuf,
    /// The device's process(es), for CPU time.
    dev_pids: Vec<u32>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        kill_tree(&mut self.child);
        if let Some(p) = &mut self.peer {
            kill_tree(p);
        }
    }
}

impl Vm {
    /// Waits for a serial line containing `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if hit {
                        return Ok(());
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "no {needle:?} from the guest (ringvm {status:?}); serial:\n{}",
                        tail(&self.seen)
                    ));
                }
            }
        }
    }

    /// The guest's `done`, a passed scenario and a clean exit; the guest's connection line.
    fn finish(mut self) -> Result<String, String> {
        self.wait_for("ringvm-test: done", STEP)?;
        if !self.seen.contains("ringvm-test: virtio-vsock ok") {
            return Err(format!("the guest failed:\n{}", tail(&self.seen)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => break,
                Ok(Some(s)) => return Err(format!("ringvm ended with {s}")),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                _ => return Err("ringvm did not end after the guest's done".to_owned()),
            }
        }
        Ok(self
            .seen
            .lines()
            .find(|l| l.contains("virtio-vsock conn 0 "))
            .unwrap_or("")
            .to_owned())
    }

    fn dev_cpu(&self) -> Duration {
        self.dev_pids.iter().map(|&p| process_cpu_time(p)).sum()
    }
}

fn tail(s: &str) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(12)..].join("\n    ")
}

/// `key=value` of a guest line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

impl Setup {
    /// Boots the test guest with `params` on device `dev`; with `listen`, the host's
    /// listener for the guest's connect is bound first.
    fn boot(
        &self,
        dev: Dev,
        params: &str,
        listen: bool,
    ) -> Result<(Vm, Option<UnixListener>), String> {
        let tag = match dev {
            Dev::Ringvm => "r",
            Dev::Vhost => "v",
        };
        let uds = self.dir.join(format!("{tag}.vsock"));
        let sock = self.dir.join(format!("{tag}.vhost"));
        let port_path = PathBuf::from(format!("{}_{HOST_PORT}", uds.display()));
        for p in [&uds, &sock, &port_path] {
            let _ = std::fs::remove_file(p);
        }
        let listener = if listen {
            Some(
                UnixListener::bind(&port_path)
                    .map_err(|e| format!("bind {}: {e}", port_path.display()))?,
            )
        } else {
            None
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "-m", &MEM_MIB.to_string(), "--no-rng"]);
        let mut peer = None;
        match dev {
            Dev::Ringvm => {
                cmd.arg("--vsock")
                    .arg(format!("cid={CID},uds={}", uds.display()));
            }
            Dev::Vhost => {
                let bin = self
                    .vhost
                    .as_ref()
                    .ok_or("vhost-device-vsock is not installed")?;
                let mut c = Command::new(bin);
                c.arg("--vm").arg(format!(
                    "guest-cid={CID},socket={},uds-path={}",
                    sock.display(),
                    uds.display()
                ));
                let child = spawn_backend(c, &self.dir.join("vhost-device-vsock.log"), &sock)?;
                peer = Some(child);
                cmd.arg("--vhost-user")
                    .arg(format!("type=vsock,socket={}", sock.display()));
            }
        }
        cmd.args(["-p", params]).arg(&self.guest);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut vm = Vm {
            child,
            peer,
            lines,
            seen: String::new(),
            uds,
            dev_pids: Vec::new(),
        };
        vm.wait_for("virtio-vsock guest-cid=", STEP)?;
        vm.dev_pids = match &vm.peer {
            Some(p) => vec![p.id()],
            // The VMM's descendants: the device process (the vCPU spins in the VMM).
            None => process_tree(vm.child.id()).into_iter().skip(1).collect(),
        };
        Ok((vm, listener))
    }

    /// One call of a VM variant: boot, `n` operations of `work` (timed), the guest's end.
    /// Returns the timed span, the device's CPU time in it and, for `rr`, each round trip.
    fn run(&self, dev: Dev, work: Work, n: u64) -> Result<(Duration, Duration, Vec<u32>), String> {
        let base =
            format!("ringvm.test=virtio-vsock ringvm.vsock.cid={CID} ringvm.vsock.idle_ms=60000");
        let bytes = n * CHUNK as u64;
        let params = match work {
            Work::H2g => format!(
                "{base} ringvm.vsock.listen={GUEST_PORT} ringvm.vsock.app=sink ringvm.vsock.check=0 \
                 ringvm.vsock.buf_alloc={SINK_BUF_ALLOC}"
            ),
            Work::G2h => format!(
                "{base} ringvm.vsock.port={HOST_PORT} ringvm.vsock.app=source ringvm.vsock.check=0 \
                 ringvm.vsock.bytes={bytes}"
            ),
            Work::Rr => format!("{base} ringvm.vsock.listen={GUEST_PORT} ringvm.vsock.app=echo"),
        };
        let (mut vm, listener) = self.boot(dev, &params, work == Work::G2h)?;
        let mut lat = Vec::new();
        let (span, cpu) = match work {
            Work::G2h => {
                let listener = listener.ok_or("no listener")?;
                let mut s = accept_within(&listener, STEP)?;
                let cpu0 = vm.dev_cpu();
                let t0 = Instant::now();
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => got += k as u64,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(format!("read from the guest after {got} bytes: {e}"))
                        }
                    }
                }
                let span = t0.elapsed();
                let cpu = vm.dev_cpu().saturating_sub(cpu0);
                if got != bytes {
                    return Err(format!(
                        "the guest's stream ended after {got} of {bytes} bytes"
                    ));
                }
                (span, cpu)
            }
            Work::H2g | Work::Rr => {
                vm.wait_for("listening port=", STEP)?;
                let mut s = host_connect(&vm.uds, GUEST_PORT)?;
                let cpu0 = vm.dev_cpu();
                let t0 = Instant::now();
                if work == Work::H2g {
                    let buf = vec![0x5au8; CHUNK];
                    for i in 0..n {
                        s.write_all(&buf)
                            .map_err(|e| format!("write {i} of {n} to the guest: {e}"))?;
                    }
                    s.shutdown(Shutdown::Write)
                        .map_err(|e| format!("shutdown: {e}"))?;
                    read_to_eof(&mut s)?;
                } else {
                    let mut req = [0u8; MSG];
                    let mut resp = [0u8; MSG];
                    lat.reserve(n as usize);
                    for i in 0..n {
                        req[..8].copy_from_slice(&i.to_le_bytes());
                        let t = Instant::now();
                        s.write_all(&req).map_err(|e| format!("request {i}: {e}"))?;
                        s.read_exact(&mut resp)
                            .map_err(|e| format!("response {i}: {e}"))?;
                        lat.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                        if resp != req {
                            return Err(format!("response {i} differs from its request"));
                        }
                    }
                }
                let span = t0.elapsed();
                let cpu = vm.dev_cpu().saturating_sub(cpu0);
                if work == Work::Rr {
                    s.shutdown(Shutdown::Write)
                        .map_err(|e| format!("shutdown: {e}"))?;
                    read_to_eof(&mut s)?;
                }
                (span, cpu)
            }
        };
        let conn = vm.finish()?;
        if work == Work::H2g && field(&conn, "received") != Some(bytes) {
            return Err(format!(
                "the guest received other than {bytes} bytes: {conn:?}"
            ));
        }
        Ok((span, cpu, lat))
    }
}

/// Accepts one connection within `limit` (woken by the connect itself, not a poll interval).
fn accept_within(listener: &UnixListener, limit: Duration) -> Result<UnixStream, String> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the listener, which outlives the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    if ready != 1 {
        return Err(format!("no guest connection within {limit:?}"));
    }
    let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    s.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
    Ok(s)
}

/// `CONNECT <port>` on the device's socket; both devices answer `OK <n>`.
fn host_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("the answer to CONNECT: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "CONNECT {port} got {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(s)
}

/// Reads until the stream ends.
fn read_to_eof(s: &mut UnixStream) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for the guest's close: {e}")),
        }
    }
}

/// The limit: the same work between two host threads over a unix socketpair.
fn limit(work: Work, n: u64) -> (Duration, Vec<u32>) {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let mut lat = Vec::new();
    let t0;
    match work {
        Work::H2g | Work::G2h => {
            // One thread writes n x 64 KiB, the other reads 64 KiB at a time to the end.
            let reader = thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0u64;
                loop {
                    match b.read(&mut buf) {
                        Ok(0) => return got,
                        Ok(k) => got += k as u64,
                        Err(e) => panic!("limit reader: {e}"),
                    }
                }
            });
            let buf = vec![0x5au8; CHUNK];
            t0 = Instant::now();
            for _ in 0..n {
                a.write_all(&buf).expect("limit writer");
            }
            a.shutdown(Shutdown::Write).expect("shutdown");
            let got = reader.join().expect("limit reader thread");
            assert_eq!(got, n * CHUNK as u64, "limit: bytes read");
        }
        Work::Rr => {
            let echo = thread::spawn(move || {
                let mut m = [0u8; MSG];
                while b.read_exact(&mut m).is_ok() {
                    b.write_all(&m).expect("limit echo");
                }
            });
            let mut req = [0u8; MSG];
            let mut resp = [0u8; MSG];
            lat.reserve(n as usize);
            t0 = Instant::now();
            for i in 0..n {
                req[..8].copy_from_slice(&i.to_le_bytes());
                let t = Instant::now();
                a.write_all(&req).expect("limit request");
                a.read_exact(&mut resp).expect("limit response");
                lat.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                assert_eq!(req, resp, "limit echo");
            }
            let span = t0.elapsed();
            drop(a);
            echo.join().expect("limit echo thread");
            return (span, lat);
        }
    }
    (t0.elapsed(), lat)
}

/// Per variant: each call's round trips (ns) and (device CPU, operations).
#[derive(Default)]
struct Log {
    lat: Vec<Vec<u32>>,
    cpu: Vec<(Duration, u64)>,
}

fn main() {
    let config = Config::from_env_with((2.5, 15), (0.06, 3));
    let rounds = config.rounds;
    let mut r = Runner::with_config("vsock", config);
    let works = [Work::H2g, Work::G2h, Work::Rr];
    if !works.iter().any(|w| r.enabled(w.bench())) {
        r.finish().expect("write results");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ringvm-vsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let setup = Setup {
        bin: ringvm_release().unwrap_or_else(|e| panic!("ringvm: {e}")),
        guest: test_guest(&bench_dir().expect("target/bench").join("test-guest-vsock")),
        vhost: vsock::testing::vhost_device_vsock(),
        dir: dir.clone(),
    };
    let mut missing = Vec::new();
    if setup.vhost.is_none() {
        missing.push("vhost-device-vsock: not installed (scripts/setup)".to_owned());
    }

    for work in works {
        let bench = work.bench();
        if !r.enabled(bench) {
            continue;
        }
        let logs: [RefCell<Log>; 3] = Default::default();
        let vm = |dev: Dev, i: usize| {
            let setup = &setup;
            let log = &logs[i];
            move |n: u64| {
                let (span, cpu, lat) = setup
                    .run(dev, work, n)
                    .unwrap_or_else(|e| panic!("{bench} {dev:?}: {e}"));
                let mut log = log.borrow_mut();
                log.lat.push(lat);
                log.cpu.push((cpu, n));
                span
            }
        };
        let lim = |n: u64| {
            let (span, lat) = limit(work, n);
            logs[2].borrow_mut().lat.push(lat);
            span
        };
        let what = match work {
            Work::H2g => "host writes 64 KiB -> guest sink",
            Work::G2h => "guest source 32 KiB packets -> host reads 64 KiB",
            Work::Rr => "64 B request, 64 B echo",
        };
        let mut variants = vec![Variant::subject(
            "ringvm",
            &format!("ringvm --vsock (jailed device), {what}"),
            vm(Dev::Ringvm, 0),
        )];
        if setup.vhost.is_some() {
            variants.push(Variant::peer(
                "vhost-device-vsock",
                &format!("ringvm --vhost-user vhost-device-vsock 0.3, {what}"),
                vm(Dev::Vhost, 1),
            ));
        }
        variants.push(Variant::limit(
            "socketpair",
            "unix socketpair, two host threads",
            lim,
        ));
        r.compare(bench, variants);
        // The measured rounds are each variant's last `rounds` calls (the rest warmed up).
        for (i, key) in ["ringvm", "vhost-device-vsock", "socketpair"]
            .into_iter()
            .enumerate()
        {
            let log = logs[i].borrow();
            let from = log.lat.len().saturating_sub(rounds);
            if work == Work::Rr {
                let mut all: Vec<u32> = log.lat[from..].iter().flatten().copied().collect();
                all.sort_unstable();
                if !all.is_empty() {
                    for (name, q) in [
                        ("lat_p50_us", 0.5),
                        ("lat_p99_us", 0.99),
                        ("lat_p999_us", 0.999),
                    ] {
                        let k = ((all.len() - 1) as f64 * q).round() as usize;
                        r.annotate(bench, key, name, f64::from(all[k]) / 1e3);
                    }
                }
            }
            let from = log.cpu.len().saturating_sub(rounds);
            let (cpu, ops) = log.cpu[from..]
                .iter()
                .fold((Duration::ZERO, 0u64), |(c, o), (dc, n)| (c + *dc, o + n));
            if ops > 0 {
                r.annotate(bench, key, "dev_cpu_us_per_op", benches::us_per(cpu, ops));
            }
            if work != Work::Rr {
                if let Some(c) = r.case(bench, key) {
                    let mib = c.ops_per_sec * CHUNK as f64 / f64::from(1 << 20);
                    r.annotate(bench, key, "mib_per_s", mib);
                }
            }
        }
    }
    print_details(&r);
    r.finish_before_checks();
    for work in [Work::H2g, Work::G2h] {
        r.check(work.bench(), "ringvm", Role::Limit, 0.8);
        r.check(work.bench(), "ringvm", Role::Peer, 1.2);
    }
    check_latency(&r);
    let _ = std::fs::remove_dir_all(&dir);
    for why in &missing {
        println!("NOT MEASURED {why}");
    }
    if !missing.is_empty() {
        std::process::exit(1);
    }
}

/// Throughput in MiB/s, latency percentiles and device CPU per operation.
fn print_details(r: &Runner) {
    println!("\nvsock details (host-timed):");
    for c in r.cases() {
        let f = |k: &str| {
            c.figure(k)
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        };
        if c.bench.starts_with("stream") {
            println!(
                "  {:15} {:20} {:>9} MiB/s  device CPU {:>6} us per 64 KiB",
                c.bench,
                c.name,
                f("mib_per_s"),
                f("dev_cpu_us_per_op")
            );
        } else {
            println!(
                "  {:15} {:20} {:>9.0} rt/s  p50 {} us  p99 {} us  p99.9 {} us  device CPU {} us per rt",
                c.bench,
                c.name,
                c.ops_per_sec,
                f("lat_p50_us"),
                f("lat_p99_us"),
                f("lat_p999_us"),
                f("dev_cpu_us_per_op")
            );
        }
    }
}

/// PASS when ringvm's round trips are no slower than the peer's: rate, p50 and p99.
fn check_latency(r: &Runner) {
    let bench = Work::Rr.bench();
    let (Some(s), Some(p)) = (r.case(bench, "ringvm"), r.case(bench, "vhost-device-vsock")) else {
        return;
    };
    let fig = |c: &benches::Case, k: &str| c.figure(k).unwrap_or(f64::NAN);
    let ratio = r.ratio(s, Role::Peer).unwrap_or(f64::NAN);
    let (s50, p50, s99, p99) = (
        fig(s, "lat_p50_us"),
        fig(p, "lat_p50_us"),
        fig(s, "lat_p99_us"),
        fig(p, "lat_p99_us"),
    );
    let pass = ratio >= 1.0 && s50 <= p50 && s99 <= p99;
    println!(
        "{} {bench}: ringvm {ratio:.2}x the peer's round trips/s, p50 {s50:.1} us vs {p50:.1} us, \
         p99 {s99:.1} us vs {p99:.1} us, target no worse than the peer",
        if pass { "PASS" } else { "MISS" },
    );
}
