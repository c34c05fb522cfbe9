//! The control socket through the real binary, with the CPL3 test guest as the VM: the JSON
//! protocol and what bad clients get, suspend/resume of a counting guest and of a guest doing
//! block I/O, and statistics that match what the guest did.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::netns::{NetNs, GUEST_IP, HOST_IP, UDP_PORT};
use tests::{ringvm_bin, ringvm_run, test_guest_args, GuestCmdline, Live, Scratch};

const BOOT: Duration = Duration::from_secs(60);

/// `ringvm ARGS SOCKET`: its stdout, asserting success.
fn ringvm(args: &[&str], socket: &Path) -> String {
    let out = Command::new(ringvm_bin())
        .args(args)
        .arg(socket)
        .output()
        .expect("run ringvm");
    assert!(
        out.status.success(),
        "ringvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stats(socket: &Path) -> Value {
    let out = ringvm(&["stats", "--json"], socket);
    let v: Value = serde_json::from_str(out.trim()).expect("stats --json is JSON");
    assert_eq!(v["ok"], true, "{v}");
    v["stats"].clone()
}

fn device<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no device {name} in {stats}"))
}

/// A connection speaking the protocol line by line.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("send");
    }

    /// The next response line, parsed; `None` when the VMM closed the connection.
    fn response(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("a response is one line of JSON")),
        }
    }

    fn ask(&mut self, raw: &str) -> Value {
        self.send(format!("{raw}\n").as_bytes());
        self.response().expect("a response")
    }

    /// Whether the VMM has closed the connection (end of file, or reset).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(_) | Err(_)) && rest.is_empty()
    }
}

fn assert_error(v: &Value, needle: &str) {
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["version"], 1, "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "error {msg:?} does not say {needle:?}"
    );
}

fn start(scratch: &Scratch, extra: &[&str], cmdline: &GuestCmdline) -> (Live, std::path::PathBuf) {
    let sock = scratch.path("vm.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut args = vec!["-s", sock_arg.as_str()];
    args.extend_from_slice(extra);
    let live = Live::start(&mut ringvm_run(&args, cmdline));
    (live, sock)
}

#[test]
fn bad_clients_get_json_errors_or_a_closed_connection_and_the_vm_runs_on() {
    let dir = Scratch::new("control", "bad");
    let (mut live, sock) = start(&dir, &[], &GuestCmdline::new().test("wait"));
    live.wait_for("wait halting", BOOT);

    // A client that connects and never sends: it holds up nobody, and is told, then closed.
    let silent_since = Instant::now();
    let mut silent = Client::connect(&sock);

    let mut c = Client::connect(&sock);
    let ok = c.ask(r#"{"version":1,"command":"status"}"#);
    assert_eq!(
        (ok["ok"].clone(), ok["state"].clone()),
        (Value::from(true), Value::from("running"))
    );
    assert!(
        silent_since.elapsed() < Duration::from_secs(5),
        "served beside a silent client"
    );
    // Malformed requests: an error each, and the connection goes on.
    assert_error(&c.ask("{\"command\":"), "not JSON");
    assert_error(&c.ask("stop"), "not JSON");
    assert_error(&c.ask("[]"), "not a JSON object");
    assert_error(
        &c.ask(r#"{"command":"reboot"}"#),
        "unknown command \"reboot\"",
    );
    assert_error(&c.ask(r#"{"version":9,"command":"stop"}"#), "version 9");
    assert_error(&c.ask(""), "empty");
    c.send(b"\xff\xfe\n");
    assert_error(&c.response().expect("a response"), "UTF-8");
    assert_eq!(c.ask(r#"{"command":"status"}"#)["ok"], true);

    // A line over 64 KiB: an error, then the connection is closed.
    let mut long = Client::connect(&sock);
    let line = format!(
        r#"{{"command":"status","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    // The VMM may close before it has read everything: a failed write is fine.
    let _ = long.stream.write_all(line.as_bytes());
    assert_error(
        &long.response().expect("a response"),
        "longer than 65536 bytes",
    );
    assert!(long.closed());

    // 100 clients at once, each answered.
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock);
                c.ask(r#"{"command":"stats"}"#)
            })
        })
        .collect();
    for t in clients {
        let v = t.join().expect("client thread");
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["stats"]["vcpus"].is_array(), "{v}");
    }

    // Clients that leave mid-response: with their request sent, and with half a request.
    for _ in 0..20 {
        let mut gone = Client::connect(&sock);
        gone.send(b"{\"command\":\"stats\"}\n{\"command\":\"stats\"}\n");
        drop(gone);
        let mut half = Client::connect(&sock);
        half.send(b"{\"command\":\"sta");
        drop(half);
    }

    // The silent client was told and closed after the idle timeout (10 s).
    assert_error(
        &silent.response().expect("a response"),
        "no request within 10s",
    );
    assert!(silent.closed());
    assert!(silent_since.elapsed() >= Duration::from_secs(9));

    // The first client idled past the timeout too; the VM was never touched, and the
    // socket still serves: the CLI stops it.
    assert_error(&c.response().expect("a response"), "no request within 10s");
    let mut fresh = Client::connect(&sock);
    assert_eq!(fresh.ask(r#"{"command":"status"}"#)["state"], "running");
    ringvm(&["stop"], &sock);
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
    assert!(!sock.exists(), "the socket file is removed");
}

/// The `count step=N ... tsc=T` lines among `lines`: (N, T).
fn steps(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("count step=")? + "count step=".len()..];
            let mut words = rest.split_whitespace();
            let step = words.next()?.parse().ok()?;
            let tsc = words.find_map(|w| w.strip_prefix("tsc="))?.parse().ok()?;
            Some((step, tsc))
        })
        .collect()
}

#[test]
fn a_suspended_guest_makes_no_progress_and_resumes_where_it_stopped() {
    let dir = Scratch::new("control", "count");
    let cmdline = GuestCmdline::new().test("count").option("count.lines", 30);
    let (mut live, sock) = start(&dir, &["--cpus", "2"], &cmdline);
    live.wait_for("count step=3 ", BOOT);
    ringvm(&["suspend"], &sock);
    let suspended_at = Instant::now();
    // Lines already on their way may still arrive; then nothing for the pause.
    live.lines_within(Duration::from_millis(200));
    let during = live.lines_within(Duration::from_millis(1500));
    assert!(during.is_empty(), "progress while suspended: {during:?}");
    let s = stats(&sock);
    assert_eq!(s["state"], "suspended");
    let before: Vec<u64> = (0..2)
        .map(|i| s["vcpus"][i]["exits"]["io_out"].as_u64().expect("io_out"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let after = stats(&sock);
    let again: Vec<u64> = (0..2)
        .map(|i| {
            after["vcpus"][i]["exits"]["io_out"]
                .as_u64()
                .expect("io_out")
        })
        .collect();
    assert_eq!(before, again, "vCPUs ran while suspended");
    assert!(
        before[0] > 0,
        "the guest's serial output counts as port exits"
    );
    let paused = suspended_at.elapsed();
    ringvm(&["resume"], &sock);
    live.wait_for("count done", Duration::from_secs(30));
    live.wait_for("ringvm-test: done", Duration::from_secs(30));
    let seen: Vec<String> = live.seen().lines().map(str::to_string).collect();
    let steps = steps(&seen);
    let numbers: Vec<u64> = steps.iter().map(|s| s.0).collect();
    assert_eq!(
        numbers,
        (1..=30).collect::<Vec<_>>(),
        "steps lost or repeated"
    );
    // The guest's clock (TSC) ran on while suspended: the gap across the pause is the pause.
    let gaps: Vec<u64> = steps.windows(2).map(|w| w[1].1 - w[0].1).collect();
    let mut sorted = gaps.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2].max(1);
    let longest = *sorted.last().expect("gaps");
    eprintln!(
        "count: median step {median} cycles, longest gap {longest} cycles ({}x) over a pause of {paused:?}",
        longest / median
    );
    assert!(
        longest > 10 * median,
        "the TSC stood still across the pause: gaps {gaps:?}"
    );
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
}

/// A raw image whose every 8 bytes hold their own offset (what blk-bench's verify checks).
fn offset_image(path: &Path, size: u64) {
    let mut data = Vec::with_capacity(size as usize);
    for at in (0..size).step_by(8) {
        data.extend_from_slice(&at.to_le_bytes());
    }
    std::fs::write(path, data).expect("write the image");
}

/// `key=N` in `line`.
fn value(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 2..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {key} in {line}"))
}

/// The test guest's blk-bench (verifying every read) then `wait`.
fn blk_bench_cmdline() -> GuestCmdline {
    GuestCmdline::new()
        .test("blk-bench")
        .test("wait")
        .option("blkbench.qd", 32)
        .option("blkbench.ms", 2500)
        .option("blkbench.verify", 1)
        .option("blkbench.tsc_khz", 2_000_000)
}

/// Checks blk-bench ended OK with every read verified; how many requests it completed.
fn blk_bench_completed(seen: &str) -> u64 {
    assert!(seen.contains("ringvm-test: blk-bench ok"), "{seen}");
    let line = seen
        .lines()
        .find(|l| l.contains("blk-bench completed="))
        .expect("completed line");
    let completed = value(line, "completed");
    assert_eq!(value(line, "bad-data"), 0, "{line}");
    assert_eq!(value(line, "verified"), completed, "{line}");
    completed
}

#[test]
fn suspend_during_block_io_completes_nothing_and_loses_nothing() {
    let dir = Scratch::new("control", "blk");
    let img = dir.path("disk.img");
    offset_image(&img, 16 << 20);
    let disk = img.to_string_lossy().into_owned();
    let (mut live, sock) = start(&dir, &["--no-rng", "--disk", &disk], &blk_bench_cmdline());
    live.wait_for("blk-bench capacity=", BOOT);
    std::thread::sleep(Duration::from_millis(300));
    ringvm(&["suspend"], &sock);
    // Every request in flight finished before suspend returned: the counts stand still.
    let first = stats(&sock);
    let q0 = |s: &Value| {
        device(s, "block0")["queues"][0]["requests"]
            .as_u64()
            .expect("requests")
    };
    std::thread::sleep(Duration::from_millis(1000));
    let second = stats(&sock);
    assert_eq!(q0(&first), q0(&second), "completions while suspended");
    assert!(q0(&first) > 0, "no block I/O before the suspend: {first}");
    ringvm(&["resume"], &sock);
    live.wait_for("blk-bench completed=", Duration::from_secs(30));
    live.wait_for("wait halting", Duration::from_secs(30));
    let completed = blk_bench_completed(live.seen());
    assert!(completed > q0(&first), "nothing completed after the resume");

    // The statistics are exactly what the guest did: every request once, 4 KiB each.
    let end = stats(&sock);
    let block = device(&end, "block0");
    let q = &block["queues"][0];
    assert_eq!(q["requests"].as_u64(), Some(completed), "{block}");
    assert_eq!(q["bytes"].as_u64(), Some(completed * 4096), "{block}");
    assert_eq!(q["errors"].as_u64(), Some(0), "{block}");
    let histogram: u64 = block["latency_us_log2"]
        .as_array()
        .expect("histogram")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(histogram, completed, "one latency per request: {block}");
    assert!(
        block["memory_kib"]["rss"].as_u64().is_some_and(|k| k > 0),
        "{block}"
    );
    assert!(block["cpu_ms"]["user"].is_u64(), "{block}");
    assert_eq!(block["restarts"], 0);
    // The readable table has it too.
    let table = ringvm(&["stats"], &sock);
    assert!(
        table.contains("block0") && table.contains(&completed.to_string()),
        "{table}"
    );
    ringvm(&["stop"], &sock);
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
}

/// `key=N` in the test guest's `virtio-net stats` line.
fn net_stat(seen: &str, key: &str) -> u64 {
    let line = seen
        .lines()
        .find(|l| l.contains("virtio-net stats "))
        .unwrap_or_else(|| panic!("no virtio-net stats line:\n{seen}"));
    value(line, key)
}

#[test]
fn net_statistics_match_what_the_guest_sent_and_received() {
    let dir = Scratch::new("control", "net");
    let sock = dir.path("vm.sock");
    let mut ns = NetNs::new("rvm-ctl");
    // No IPv6 chatter from the host side: every frame is one the guest asked for.
    let quiet = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
        .arg("net.ipv6.conf.tap0.disable_ipv6=1")
        .status()
        .expect("sysctl");
    assert!(quiet.success());
    let _peer = ns.start_peer(0, 40);
    let cmdline = GuestCmdline::new()
        .test("virtio-net")
        .test("wait")
        .option("net.ip", GUEST_IP)
        .option("net.peer", HOST_IP)
        .option("net.udp", UDP_PORT);
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(ringvm_bin())
        .args(test_guest_args(
            &["-s", &sock_arg, "--no-rng", "--tap-name", "tap0"],
            &cmdline,
        ));
    let mut live = Live::start(&mut cmd);
    live.wait_for("wait halting", BOOT);
    assert!(
        live.seen().contains("ringvm-test: virtio-net ok"),
        "{}",
        live.seen()
    );
    let seen = live.seen().to_string();
    let (rx, tx) = (net_stat(&seen, "rx"), net_stat(&seen, "tx"));
    let (rx_bytes, tx_bytes) = (net_stat(&seen, "rx-bytes"), net_stat(&seen, "tx-bytes"));
    let s = stats(&sock);
    let net = device(&s, "net0");
    let q = |i: usize, k: &str| net["queues"][i][k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        (q(0, "requests"), q(0, "bytes")),
        (rx, rx_bytes),
        "rx queue: {net}"
    );
    assert_eq!(
        (q(1, "requests"), q(1, "bytes")),
        (tx, tx_bytes),
        "tx queue: {net}"
    );
    assert_eq!((q(0, "errors"), q(1, "errors")), (0, 0), "{net}");
    let n = &net["net"];
    assert_eq!(n["rx_packets"].as_u64(), Some(rx), "{net}");
    assert_eq!(n["rx_bytes"].as_u64(), Some(rx_bytes), "{net}");
    assert_eq!(n["tx_packets"].as_u64(), Some(tx), "{net}");
    assert_eq!(n["tx_bytes"].as_u64(), Some(tx_bytes), "{net}");
    assert!(rx > 0 && tx > 0, "{seen}");
    ringvm(&["stop"], &sock);
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
}

/// `--log-level` reaches the VMM and its device processes, and every line has one format.
#[test]
fn log_level_filters_the_vmm_and_its_devices_alike() {
    let run = |level: &str| {
        let dir = Scratch::new("control", &format!("log-{level}"));
        let (mut live, sock) = start(
            &dir,
            &["--log-level", level],
            &GuestCmdline::new().test("virtio-rng").test("wait"),
        );
        live.wait_for("wait halting", BOOT);
        ringvm(&["suspend"], &sock);
        if level == "debug" {
            ringvm(&["resume"], &sock);
        }
        // A suspended VM stops as well as a running one.
        ringvm(&["stop"], &sock);
        let (status, stderr) = live.finish(Duration::from_secs(20));
        assert!(status.success(), "ringvm {status:?}: {stderr}");
        stderr
    };
    let debug = run("debug");
    for line in debug.lines() {
        assert!(
            line.starts_with("ringvm: ") || line.starts_with("ringvm device "),
            "a line in another format: {line:?}"
        );
    }
    assert!(debug.contains("ringvm: debug: control: Suspend"), "{debug}");
    assert!(debug.contains("ringvm: info: suspended in "), "{debug}");
    assert!(
        debug.contains("ringvm device rng: debug: starting (pid "),
        "{debug}"
    );
    let quiet = run("warn");
    assert!(
        !quiet.contains("debug:") && !quiet.contains("info:"),
        "{quiet}"
    );
    let bad = Command::new(ringvm_bin())
        .args(["run", "--log-level", "loud", "k"])
        .output()
        .expect("run ringvm");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected error, warn, info or debug"));
}

/// Suspend and resume speak plain vhost-user (GET_VRING_BASE, then the rings set up again), so
/// an external backend goes through them too: qemu-storage-daemon's vhost-user-blk export.
#[test]
fn suspend_and_resume_work_with_an_external_vhost_user_backend() {
    let dir = Scratch::new("control", "qsd");
    let img = dir.path("disk.img");
    offset_image(&img, 16 << 20);
    let qsd_sock = dir.path("qsd.sock");
    let mut qsd = tests::start_qsd_blk(&img, &qsd_sock);
    let spec = format!("type=blk,socket={}", qsd_sock.display());
    let (mut live, sock) = start(
        &dir,
        &["--no-rng", "--vhost-user", &spec],
        &blk_bench_cmdline(),
    );
    live.wait_for("blk-bench capacity=", BOOT);
    std::thread::sleep(Duration::from_millis(300));
    ringvm(&["suspend"], &sock);
    let s = stats(&sock);
    assert_eq!(s["state"], "suspended");
    assert_eq!(s["devices"][0]["pid"], Value::Null, "{s}");
    std::thread::sleep(Duration::from_millis(500));
    ringvm(&["resume"], &sock);
    live.wait_for("wait halting", Duration::from_secs(30));
    blk_bench_completed(live.seen());
    ringvm(&["stop"], &sock);
    let (status, stderr) = live.finish(Duration::from_secs(20));
    let _ = qsd.kill();
    let _ = qsd.wait();
    assert!(status.success(), "ringvm {status:?}: {stderr}");
}

/// vsock counts its connections: the guest's echo connection to a host listener opens one
/// and ends it.
#[test]
fn vsock_statistics_count_the_guests_connections() {
    let dir = Scratch::new("control", "vsock");
    let uds = dir.path("vm.vsock");
    let mut port = uds.as_os_str().to_owned();
    port.push("_5000");
    let listener = std::os::unix::net::UnixListener::bind(&port).expect("listen on PATH_5000");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("the guest connects");
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).expect("echo"),
            }
        }
    });
    let spec = format!("cid=42,uds={}", uds.display());
    let cmdline = GuestCmdline::new()
        .test("virtio-vsock")
        .test("wait")
        .option("vsock.cid", 42)
        .option("vsock.port", 5000)
        .option("vsock.app", "echo")
        .option("vsock.bytes", 4096);
    let (mut live, sock) = start(&dir, &["--no-rng", "--vsock", &spec], &cmdline);
    live.wait_for("wait halting", BOOT);
    assert!(
        live.seen().contains("ringvm-test: virtio-vsock ok"),
        "{}",
        live.seen()
    );
    echo.join().expect("echo thread");
    let s = stats(&sock);
    let v = &device(&s, "vsock")["vsock"];
    assert_eq!(v["connections_opened"].as_u64(), Some(1), "{s}");
    assert_eq!(v["connections_closed"].as_u64(), Some(1), "{s}");
    assert_eq!(v["connections"].as_u64(), Some(0), "{s}");
    // The payload both ways: the guest's 4096 bytes, and their echo.
    let q = &device(&s, "vsock")["queues"];
    assert_eq!(q[1]["bytes"].as_u64(), Some(4096), "tx: {s}");
    assert_eq!(q[0]["bytes"].as_u64(), Some(4096), "rx: {s}");
    assert_eq!(
        (q[0]["errors"].as_u64(), q[1]["errors"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    ringvm(&["stop"], &sock);
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
}
