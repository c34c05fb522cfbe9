//! virtio-vsock end to end with a real guest driver: `ringvm run --vsock cid=42,uds=PATH`
//! boots the test guest (guest/test/virtio_vsock.c, a polling driver at CPL3; no Linux), and
//! the test is the host side of hybrid vsock: a unix listener at `PATH_<port>` for the
//! guest's connects, and a client of `PATH` (`CONNECT <port>`, `OK <hostport>`) for the
//! guest's listener. Data is checked on both sides: the guest checks its echo pattern and
//! prints FNV-1a hashes of what it sent and received; the host checks the pattern and the
//! hashes.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tests::{children_of, ringvm_run, GuestCmdline, GuestReport, Live, Scratch, LINE_PREFIX};

const CID: u32 = 42;
const SCENARIO: &str = "virtio-vsock";
/// Any one step on the host side (an accept, a read, a handshake).
const STEP: Duration = Duration::from_secs(30);
/// A whole guest run, boot to `done`.
const RUN: Duration = Duration::from_secs(120);

/// A VM with the vsock device and its host socket `uds`.
struct Vm {
    live: Live,
    uds: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

/// One guest at a time: the driver polls, so each guest keeps a host CPU busy, and the
/// timing checks (stalls, credit requests) should not measure the other tests.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn start(dir: &Scratch, options: &[(&str, String)]) -> Vm {
    let serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let uds = dir.path("vm.vsock");
    let mut cmdline = GuestCmdline::new().test(SCENARIO).option("vsock.cid", CID);
    for (k, v) in options {
        cmdline = cmdline.option(&format!("vsock.{k}"), v);
    }
    let spec = format!("cid={CID},uds={}", uds.display());
    let live = Live::start(&mut ringvm_run(&["--no-rng", "--vsock", &spec], &cmdline));
    Vm {
        live,
        uds,
        _serial: serial,
    }
}

impl Vm {
    /// Waits for the guest's `done`, checks that the VM ended cleanly and the scenario
    /// passed; returns the report.
    fn finish(mut self) -> GuestReport {
        self.live.wait_for(&format!("{LINE_PREFIX}done"), RUN);
        let report = GuestReport::parse(self.live.seen());
        let (status, stderr) = self.live.finish(Duration::from_secs(20));
        assert!(
            status.success(),
            "ringvm {status:?}: {stderr}\n{}",
            report.raw
        );
        report.assert_ok(&[SCENARIO]);
        for l in report.details(SCENARIO) {
            if l.starts_with("stats") || l.starts_with("credit") {
                eprintln!("guest: {l}");
            }
        }
        report
    }

    /// Waits for the guest's `done` and a clean exit; returns the report, whatever the
    /// scenario's outcome.
    fn finish_any(mut self) -> GuestReport {
        self.live.wait_for(&format!("{LINE_PREFIX}done"), RUN);
        let report = GuestReport::parse(self.live.seen());
        let (status, stderr) = self.live.finish(Duration::from_secs(20));
        assert!(
            status.success(),
            "ringvm {status:?}: {stderr}\n{}",
            report.raw
        );
        report
    }

    /// The device process (the VMM's only child).
    fn device_pid(&self) -> u32 {
        let kids = children_of(self.live.child.id());
        assert_eq!(kids.len(), 1, "one device process: {kids:?}");
        kids[0]
    }
}

/// `PATH_<port>`.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// The guest's echo pattern: byte `i` of connection `c` (virtio_vsock.c `pat`).
fn pat(c: u64, i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13)
        .wrapping_add(c * 7)
        .wrapping_add(i >> 12) as u8
}

/// FNV-1a 64, as the guest computes it.
fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn hex(h: u64) -> String {
    format!("{h:#x}")
}

/// Accepts one connection within `limit` (the listener is nonblocking).
fn accept_within(listener: &UnixListener, limit: Duration) -> UnixStream {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                s.set_read_timeout(Some(STEP)).expect("read timeout");
                s.set_write_timeout(Some(STEP)).expect("write timeout");
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no guest connection within {limit:?}: {e}"),
        }
    }
}

/// Reads until end of stream (each read bounded by the stream's timeout); returns the bytes.
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the stream ends (not an error or a timeout)");
    out
}

/// Connects to `PATH` and asks for guest port `port`; returns the stream and the line the
/// device answered (empty if it closed the stream instead).
fn host_connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).expect("connect to PATH");
    s.set_read_timeout(Some(STEP)).expect("read timeout");
    s.set_write_timeout(Some(STEP)).expect("write timeout");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("write CONNECT");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        match s.read(&mut b).expect("the answer to CONNECT") {
            0 => break,
            _ => line.push(b[0]),
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

/// xorshift64 bytes, for host-side data.
fn xorshift_bytes(n: usize, mut x: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// `key=value` of the guest's connection line for connection `num`.
fn conn_value(report: &GuestReport, num: u32, key: &str) -> String {
    let prefix = format!("conn {num} ");
    report
        .details(SCENARIO)
        .into_iter()
        .filter(|l| l.starts_with(&prefix))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no {key}= for connection {num}:\n{}", report.raw))
}

fn value_u64(report: &GuestReport, key: &str) -> u64 {
    report
        .value(SCENARIO, key)
        .and_then(|v| v.trim_end_matches("ms").parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}=:\n{}", report.raw))
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// RssAnon of a process in KiB: its heap and stacks, not the guest memory it maps (which
/// counts in RssShmem).
fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon")
}

#[test]
fn guest_connects_to_a_host_listener_and_its_bytes_come_back() {
    let dir = Scratch::new("vsockg", "echo");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5000)).expect("listen on PATH_5000");
    // Four times the device's buf_alloc: credit updates needed.
    let bytes = 4 * u64::from(vsock::DEFAULT_BUF_ALLOC);
    let vm = start(
        &dir,
        &[
            ("port", "5000".into()),
            ("app", "echo".into()),
            ("bytes", bytes.to_string()),
            // A request only after 8 s without credit: the device's updates must come first.
            ("credit_req_ms", "8000".into()),
        ],
    );
    let mut s = accept_within(&listener, STEP);
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.read(&mut buf).expect("read from the guest");
        if n == 0 {
            break;
        }
        for (k, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                pat(0, got + k as u64),
                "byte {} from the guest",
                got + k as u64
            );
        }
        s.write_all(&buf[..n]).expect("echo");
        got += n as u64;
    }
    assert_eq!(got, bytes, "the guest's stream ended after {got} bytes");
    let report = vm.finish();
    assert_eq!(report.value(SCENARIO, "guest-cid"), Some("42"));
    let want = hex(fnv(
        FNV_INIT,
        &(0..bytes).map(|i| pat(0, i)).collect::<Vec<_>>(),
    ));
    assert_eq!(conn_value(&report, 0, "sent"), bytes.to_string());
    assert_eq!(conn_value(&report, 0, "received"), bytes.to_string());
    assert_eq!(conn_value(&report, 0, "sent-hash"), want);
    assert_eq!(conn_value(&report, 0, "received-hash"), want);
    // The device told the guest of its freed buffer by itself.
    assert_eq!(value_u64(&report, "requests"), 0, "{}", report.raw);
    assert!(
        value_u64(&report, "updates-received") >= 1,
        "{}",
        report.raw
    );
}

#[test]
fn host_connects_to_the_guest_listener_through_path() {
    let dir = Scratch::new("vsockg", "listen");
    let mut vm = start(&dir, &[("listen", "52".into()), ("app", "echo".into())]);
    vm.live.wait_for("listening port=52", RUN);
    // Nobody listens on guest port 99: the guest answers RST, the device closes the stream.
    let (mut refused, line) = host_connect(&vm.uds, 99);
    assert_eq!(line, "", "a connect to a closed guest port got {line:?}");
    assert!(read_to_eof(&mut refused).is_empty());

    let (mut s, line) = host_connect(&vm.uds, 52);
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("CONNECT 52 got {line:?}"));
    let data = xorshift_bytes(300_000, 0x1234_5678);
    let mut writer = s.try_clone().expect("clone");
    let sent = data.clone();
    let w = thread::spawn(move || {
        writer.write_all(&sent).expect("write to the guest");
        writer.shutdown(Shutdown::Write).expect("shutdown");
    });
    let back = read_to_eof(&mut s);
    w.join().expect("writer");
    assert!(
        back == data,
        "the guest echoed {} bytes, not the {} sent",
        back.len(),
        data.len()
    );
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "host-port"), port.to_string());
    assert_eq!(
        conn_value(&report, 0, "received-hash"),
        hex(fnv(FNV_INIT, &data))
    );
    assert_eq!(value_u64(&report, "accepted"), 1);
    assert_eq!(value_u64(&report, "unknown-rsts"), 1, "the refused connect");
}

#[test]
fn sixty_four_mib_from_the_guest_arrive_with_the_guests_hash() {
    let dir = Scratch::new("vsockg", "g2h");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5001)).expect("listen on PATH_5001");
    let bytes: u64 = 64 << 20;
    let vm = start(
        &dir,
        &[
            ("port", "5001".into()),
            ("app", "source".into()),
            ("bytes", bytes.to_string()),
        ],
    );
    let mut s = accept_within(&listener, STEP);
    let t0 = Instant::now();
    let (mut n, mut h) = (0u64, FNV_INIT);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = s.read(&mut buf).expect("read from the guest");
        if k == 0 {
            break;
        }
        h = fnv(h, &buf[..k]);
        n += k as u64;
    }
    let took = t0.elapsed();
    eprintln!("64 MiB guest to host: {took:?}");
    assert_eq!(n, bytes);
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "sent"), bytes.to_string());
    assert_eq!(conn_value(&report, 0, "sent-hash"), hex(h));
}

#[test]
fn sixty_four_mib_to_the_guest_arrive_with_the_hosts_hash() {
    let dir = Scratch::new("vsockg", "h2g");
    let mut vm = start(&dir, &[("listen", "53".into()), ("app", "sink".into())]);
    vm.live.wait_for("listening port=53", RUN);
    let data = xorshift_bytes(64 << 20, 0xfeed_f00d);
    let h = fnv(FNV_INIT, &data);
    let (mut s, line) = host_connect(&vm.uds, 53);
    assert!(line.starts_with("OK "), "CONNECT 53 got {line:?}");
    let t0 = Instant::now();
    s.write_all(&data).expect("write to the guest");
    s.shutdown(Shutdown::Write).expect("shutdown");
    // The guest closes once it has everything: the stream ends.
    assert!(read_to_eof(&mut s).is_empty());
    eprintln!("64 MiB host to guest: {:?}", t0.elapsed());
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "received"), data.len().to_string());
    assert_eq!(conn_value(&report, 0, "received-hash"), hex(h));
}

#[test]
fn sixty_four_guest_connections_at_once_each_echo_intact() {
    let dir = Scratch::new("vsockg", "many");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5002)).expect("listen on PATH_5002");
    let bytes: u64 = 192 << 10;
    let vm = start(
        &dir,
        &[
            ("port", "5002".into()),
            ("app", "echo".into()),
            ("conns", "64".into()),
            ("bytes", bytes.to_string()),
        ],
    );
    // All 64 are open before any is served: the guest holds them at once.
    let streams: Vec<UnixStream> = (0..64).map(|_| accept_within(&listener, STEP)).collect();
    let echoers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let (mut got, mut num) = (0u64, None);
                loop {
                    let n = s.read(&mut buf).expect("read from the guest");
                    if n == 0 {
                        return (num, got);
                    }
                    // Pattern byte 0 is 7 * num (mod 256), and 7 is odd: it names the connection.
                    let c = *num.get_or_insert_with(|| {
                        (0..64u64)
                            .find(|&c| pat(c, 0) == buf[0])
                            .expect("a first byte naming a connection")
                    });
                    for (k, &b) in buf[..n].iter().enumerate() {
                        assert_eq!(
                            b,
                            pat(c, got + k as u64),
                            "connection {c} byte {}",
                            got + k as u64
                        );
                    }
                    s.write_all(&buf[..n]).expect("echo");
                    got += n as u64;
                }
            })
        })
        .collect();
    let mut nums: Vec<u64> = echoers
        .into_iter()
        .map(|t| {
            let (num, got) = t.join().expect("an echo thread");
            assert_eq!(got, bytes);
            num.expect("data on every connection")
        })
        .collect();
    nums.sort_unstable();
    assert_eq!(nums, (0..64).collect::<Vec<_>>(), "every connection once");
    let report = vm.finish();
    assert_eq!(value_u64(&report, "bytes-sent"), 64 * bytes);
    assert_eq!(value_u64(&report, "bytes-received"), 64 * bytes);
}

#[test]
fn a_stalled_host_reader_stalls_the_guest_by_credit_and_loses_nothing() {
    let dir = Scratch::new("vsockg", "stall");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5003)).expect("listen on PATH_5003");
    let bytes: u64 = 16 << 20;
    let vm = start(
        &dir,
        &[
            ("port", "5003".into()),
            ("app", "source".into()),
            ("bytes", bytes.to_string()),
            // No CREDIT_REQUEST during the stall: only the device's own update resumes it.
            ("credit_req_ms", "8000".into()),
        ],
    );
    let mut s = accept_within(&listener, STEP);
    let device = vm.device_pid();
    let cmd = std::fs::read(format!("/proc/{device}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmd).contains("vsock"),
        "pid {device} is not the vsock device: {cmd:?}"
    );
    let (mut n, mut h) = (0u64, FNV_INIT);
    let mut buf = vec![0u8; 1 << 20];
    let mut read = |s: &mut UnixStream, n: &mut u64, h: &mut u64| -> usize {
        let k = s.read(&mut buf).expect("read from the guest");
        *h = fnv(*h, &buf[..k]);
        *n += k as u64;
        k
    };
    while n < 1 << 20 {
        assert!(read(&mut s, &mut n, &mut h) > 0, "the stream ended early");
    }
    let before = rss_anon_kib(device);
    // Stop reading for 3 s.
    let (mut peak, mut peak_rss) = (before, 0);
    let stall = Instant::now();
    while stall.elapsed() < Duration::from_secs(3) {
        peak = peak.max(rss_anon_kib(device));
        peak_rss = peak_rss.max(status_kib(device, "VmRSS"));
        thread::sleep(Duration::from_millis(100));
    }
    loop {
        if read(&mut s, &mut n, &mut h) == 0 {
            break;
        }
    }
    eprintln!(
        "device RssAnon: {before} KiB before the stall, at most {peak} KiB during it; VmRSS {} KiB, VmHWM {} KiB",
        status_kib(device, "VmRSS"),
        status_kib(device, "VmHWM")
    );
    assert_eq!(n, bytes);
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "sent-hash"), hex(h));
    // The guest waited for credit through the stall in one stretch, and the device's own
    // credit update (no request) let it go on when the host read again (the guest's clock
    // is a guessed 3 GHz TSC, which reads ~13% low on this 2.6 GHz host: 3 s read as
    // ~2.6 s).
    let stalled = value_u64(&report, "max-stall-ms");
    assert!(
        stalled >= 2000,
        "the guest stalled {stalled} ms at most:\n{}",
        report.raw
    );
    assert_eq!(value_u64(&report, "requests"), 0, "{}", report.raw);
    // The device buffered no more than its credit: 16 MiB did not pile up in it.
    assert!(
        peak < before + 8 * 1024 && peak_rss < 64 * 1024,
        "device RssAnon grew from {before} to {peak} KiB (VmRSS at most {peak_rss} KiB) while the host did not read"
    );
}

#[test]
fn a_guest_rst_ends_the_host_stream() {
    let dir = Scratch::new("vsockg", "rst");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5004)).expect("listen on PATH_5004");
    let vm = start(&dir, &[("port", "5004".into()), ("app", "rst".into())]);
    let mut s = accept_within(&listener, STEP);
    let mut got = vec![0u8; 4096];
    s.read_exact(&mut got).expect("the guest's 4096 bytes");
    assert!(got.iter().enumerate().all(|(i, &b)| b == pat(0, i as u64)));
    // Any byte tells the guest to reset the connection.
    s.write_all(b"go").expect("write");
    let t0 = Instant::now();
    assert!(read_to_eof(&mut s).is_empty(), "data after the guest's RST");
    assert!(t0.elapsed() < STEP);
    let report = vm.finish();
    assert!(
        report
            .details(SCENARIO)
            .iter()
            .any(|l| l.starts_with("rst sent")),
        "{}",
        report.raw
    );
}

#[test]
fn a_device_reset_ends_connections_sends_transport_reset_and_the_device_works_again() {
    let dir = Scratch::new("vsockg", "reset");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5005)).expect("listen on PATH_5005");
    let vm = start(&dir, &[("port", "5005".into()), ("app", "reset".into())]);
    // Before the reset: an echo, then the connection stays open until the guest resets the
    // device, which ends it.
    let mut a = accept_within(&listener, STEP);
    let mut buf = vec![0u8; 4096];
    a.read_exact(&mut buf)
        .expect("the first connection's bytes");
    assert!(buf.iter().enumerate().all(|(i, &b)| b == pat(0, i as u64)));
    a.write_all(&buf).expect("echo");
    assert!(
        read_to_eof(&mut a).is_empty(),
        "data after the device reset"
    );
    // After: a new connection works.
    let mut b = accept_within(&listener, STEP);
    b.read_exact(&mut buf)
        .expect("the second connection's bytes");
    assert!(buf.iter().enumerate().all(|(i, &x)| x == pat(1, i as u64)));
    b.write_all(&buf).expect("echo");
    assert!(read_to_eof(&mut b).is_empty());
    let report = vm.finish();
    assert!(
        report
            .details(SCENARIO)
            .iter()
            .any(|l| l.starts_with("reset: transport-reset events=1")),
        "{}",
        report.raw
    );
    assert_eq!(value_u64(&report, "events"), 1);
    assert_eq!(value_u64(&report, "inits"), 2);
    assert_eq!(conn_value(&report, 1, "received"), "4096");
}

#[test]
fn sixty_four_host_connections_at_once_to_the_guest_listener_each_echo_intact() {
    let dir = Scratch::new("vsockg", "manyh");
    let mut vm = start(
        &dir,
        &[
            ("listen", "54".into()),
            ("app", "echo".into()),
            ("conns", "64".into()),
        ],
    );
    vm.live.wait_for("listening port=54", RUN);
    // Every handshake first: all 64 are accepted (OK) before any data moves.
    let clients: Vec<(UnixStream, u32)> = (0..64)
        .map(|_| {
            let (s, line) = host_connect(&vm.uds, 54);
            let port = line
                .strip_prefix("OK ")
                .and_then(|p| p.trim_end().parse().ok())
                .unwrap_or_else(|| panic!("CONNECT 54 got {line:?}"));
            (s, port)
        })
        .collect();
    let mut ports: Vec<u32> = clients.iter().map(|(_, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 64, "64 distinct host ports");
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, (mut s, _))| {
            thread::spawn(move || {
                let data = xorshift_bytes(100_000 + k * 1000, 0xabc0 + k as u64);
                let mut w = s.try_clone().expect("clone");
                let sent = data.clone();
                let writer = thread::spawn(move || {
                    w.write_all(&sent).expect("write to the guest");
                    w.shutdown(Shutdown::Write).expect("shutdown");
                });
                let back = read_to_eof(&mut s);
                writer.join().expect("writer");
                assert!(
                    back == data,
                    "connection {k}: {} bytes back of {}",
                    back.len(),
                    data.len()
                );
                data.len() as u64
            })
        })
        .collect();
    let total: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("a client"))
        .sum();
    let report = vm.finish();
    assert_eq!(value_u64(&report, "accepted"), 64);
    assert_eq!(value_u64(&report, "bytes-received"), total);
    assert_eq!(value_u64(&report, "bytes-sent"), total);
}

#[test]
fn a_guest_that_stops_reading_stops_the_host_writer_and_loses_nothing() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = Scratch::new("vsockg", "gstall");
    let mut vm = start(
        &dir,
        &[
            ("listen", "55".into()),
            ("app", "sink".into()),
            ("pause_ms", "3000".into()),
            ("pause_at", (1u32 << 20).to_string()),
        ],
    );
    vm.live.wait_for("listening port=55", RUN);
    let data = xorshift_bytes(16 << 20, 0x5151);
    let h = fnv(FNV_INIT, &data);
    let (mut s, line) = host_connect(&vm.uds, 55);
    assert!(line.starts_with("OK "), "CONNECT 55 got {line:?}");
    let written = Arc::new(AtomicU64::new(0));
    let mut w = s.try_clone().expect("clone");
    let (count, sent) = (written.clone(), data.clone());
    let writer = thread::spawn(move || {
        for chunk in sent.chunks(16 << 10) {
            w.write_all(chunk).expect("write to the guest");
            count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    vm.live.wait_for("sink pausing", RUN);
    let device = vm.device_pid();
    // The guest consumes nothing for 3 s: after the buffers fill, the host writer blocks
    // (the device reads the host only as far as the guest's credit goes).
    thread::sleep(Duration::from_millis(700));
    let (at_start, rss_start) = (written.load(Ordering::SeqCst), rss_anon_kib(device));
    thread::sleep(Duration::from_millis(1300));
    let (at_end, rss_end) = (written.load(Ordering::SeqCst), rss_anon_kib(device));
    eprintln!(
        "guest paused: host had written {at_start} then {at_end} bytes; device RssAnon {rss_start} -> {rss_end} KiB"
    );
    assert!(
        at_start < 4 << 20,
        "{at_start} bytes went through a guest that read 1 MiB"
    );
    assert_eq!(
        at_start, at_end,
        "the host writer moved while the guest did not read"
    );
    assert!(
        rss_end < rss_start + 8 * 1024,
        "device RssAnon {rss_start} -> {rss_end} KiB"
    );
    assert!(read_to_eof(&mut s).is_empty());
    writer.join().expect("writer");
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "received"), data.len().to_string());
    assert_eq!(conn_value(&report, 0, "received-hash"), hex(h));
    assert!(
        report
            .details(SCENARIO)
            .iter()
            .any(|l| l.starts_with("sink resuming")),
        "{}",
        report.raw
    );
}

#[test]
fn a_guest_half_close_ends_the_host_read_side_and_the_answer_still_arrives() {
    let dir = Scratch::new("vsockg", "half");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5006)).expect("listen on PATH_5006");
    let bytes: u64 = 100_000;
    let vm = start(
        &dir,
        &[
            ("port", "5006".into()),
            ("app", "request".into()),
            ("bytes", bytes.to_string()),
        ],
    );
    let mut s = accept_within(&listener, STEP);
    // The request ends with the guest's SHUTDOWN(SEND): end of stream here, not a close.
    let request = read_to_eof(&mut s);
    assert_eq!(request.len() as u64, bytes);
    assert!(request
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pat(0, i as u64)));
    let answer = xorshift_bytes(1 << 20, 0xa115);
    s.write_all(&answer)
        .expect("the answer goes to a half-closed guest");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let report = vm.finish();
    assert_eq!(conn_value(&report, 0, "received"), answer.len().to_string());
    assert_eq!(
        conn_value(&report, 0, "received-hash"),
        hex(fnv(FNV_INIT, &answer))
    );
}

/// The scenario's failure reason (panics if it did not fail).
fn failure(report: &GuestReport) -> String {
    match report.outcome(SCENARIO) {
        Some(tests::Outcome::Fail(why)) => why.clone(),
        other => panic!(
            "expected {SCENARIO} to fail, got {other:?}:\n{}",
            report.raw
        ),
    }
}

#[test]
fn a_guest_connect_to_a_port_nobody_listens_on_is_refused() {
    let dir = Scratch::new("vsockg", "refused");
    let vm = start(&dir, &[("port", "5007".into()), ("app", "echo".into())]);
    let report = vm.finish_any();
    let why = failure(&report);
    assert!(why.contains("connection refused (RST)"), "{why}");
}

#[test]
fn a_host_that_never_answers_fails_the_guest_in_time_not_hangs_it() {
    let dir = Scratch::new("vsockg", "silent");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5008)).expect("listen on PATH_5008");
    let vm = start(
        &dir,
        &[
            ("port", "5008".into()),
            ("app", "echo".into()),
            ("idle_ms", "1000".into()),
        ],
    );
    // Accepted, read, never echoed: the guest gives up after 1 s without progress.
    let mut s = accept_within(&listener, STEP);
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf).expect("the guest's bytes");
    let t0 = Instant::now();
    let report = vm.finish_any();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let why = failure(&report);
    assert!(why.contains("nothing moved for 1000 ms"), "{why}");
    assert!(
        report
            .details(SCENARIO)
            .iter()
            .any(|l| l.starts_with("stuck conn 0 open")),
        "{}",
        report.raw
    );
    drop(s);
}

#[test]
fn a_device_reset_with_the_host_writer_blocked_ends_the_stream_cleanly() {
    let dir = Scratch::new("vsockg", "resetload");
    let uds = dir.path("vm.vsock");
    let listener = UnixListener::bind(port_path(&uds, 5009)).expect("listen on PATH_5009");
    let mut vm = start(
        &dir,
        &[
            ("port", "5009".into()),
            ("app", "reset".into()),
            ("bytes", (64u32 << 20).to_string()),
            ("reset_stall_ms", "500".into()),
            ("credit_req_ms", "8000".into()),
        ],
    );
    // The first connection: the host reads 1 MiB, then nothing until the guest has reset the
    // device with the buffers full (a host write pending in the device) and had the event.
    let mut a = accept_within(&listener, STEP);
    let mut head = vec![0u8; 1 << 20];
    a.read_exact(&mut head).expect("the first MiB");
    vm.live.wait_for("reset: transport-reset events=1", RUN);
    let device = vm.device_pid();
    let rest = read_to_eof(&mut a);
    let got = head.len() + rest.len();
    assert!(got < 4 << 20, "{got} bytes passed a host that read 1 MiB");
    let bad = head
        .iter()
        .chain(&rest)
        .enumerate()
        .find(|&(i, &b)| b != pat(0, i as u64));
    assert_eq!(bad, None, "the stream is the guest's pattern up to its end");
    // The second works.
    let mut b = accept_within(&listener, STEP);
    let mut buf = vec![0u8; 4096];
    b.read_exact(&mut buf)
        .expect("the second connection's bytes");
    assert!(buf.iter().enumerate().all(|(i, &x)| x == pat(1, i as u64)));
    b.write_all(&buf).expect("echo");
    assert!(read_to_eof(&mut b).is_empty());
    let rss = status_kib(device, "VmRSS");
    let report = vm.finish();
    eprintln!("reset under load: the host got {got} bytes of the first connection; device VmRSS {rss} KiB");
    assert_eq!(value_u64(&report, "events"), 1);
    assert_eq!(conn_value(&report, 1, "received"), "4096");
    assert!(rss < 64 * 1024, "device VmRSS {rss} KiB");
    // What the device held for the host when it was reset is gone (not written late).
    let sent_a = conn_value(&report, 0, "sent")
        .parse::<usize>()
        .expect("a number");
    assert!(
        got < sent_a,
        "the host got {got} of {sent_a} bytes: nothing was pending"
    );
}
