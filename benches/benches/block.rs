//! The block data path: `ringvm device block` beside raw io_uring (the limit) and
//! qemu-storage-daemon (the peer), all driven by the same libblkio client in one run.
//!
//! - Workloads: 4 KiB random reads and writes at queue depth 1 and 32, and 128 KiB
//!   sequential reads and writes at queue depth 8, on one preallocated raw image
//!   (`<target>/bench/block-<size>M.img`, 1 GiB; 256 MiB with `--quick`) filled with data, so
//!   every read hits a real block.
//! - Subjects: libblkio's `virtio-blk-vhost-user` driver on the socket of
//!   `ringvm device block --socket S --file IMG` (jailed, and with `--disable-sandbox`).
//! - Limit: libblkio's `io_uring` driver on the image (`direct=true`): the kernel's cost with
//!   nothing in between.
//! - Peer: the `virtio-blk-vhost-user` driver on qemu-storage-daemon's vhost-user-blk export
//!   of the same file (`driver=file,cache.direct=on,aio=io_uring`).
//!
//! - Fast device (`fast/...`): 4 KiB random reads and writes at queue depth 32 on an image in
//!   tmpfs (`/dev/shm`, removed afterwards), every backend buffered (O_DIRECT is not there):
//!   what a user with NVMe feels, where the CPU time per I/O decides.
//!
//! Every backend opens the disk image with O_DIRECT, so the page cache flatters nobody. The client
//! waits for completions on its completion eventfd (`do_io` with `min_completions = 1`), as a
//! guest driver waits for an interrupt. Beside the rate and its ratios the bench reports each
//! case's mean and p99 latency per I/O, and the backend's CPU time per I/O (the
//! `sum_exec_runtime` of every thread of the backend's process tree, from
//! `/proc/<pid>/task/<tid>/schedstat`, before and after each measured round). These go to the
//! case's JSON line in `<target>/bench/block.jsonl` as `lat_mean_us`, `lat_p99_us`,
//! `mib_per_s`, `backend_cpu_us_per_io` and `client_cpu_us_per_io` (the bench process: the
//! libblkio client, and for io_uring also the kernel's side of the I/O, which a vhost-user
//! backend does in its own process).
//!
//! A case is measured for 10 s in 20 interleaved rounds (0.5 s in 3 with `--quick`;
//! `RINGVM_BENCH_SECS` / `RINGVM_BENCH_ROUNDS` override), after a warm-up of one round.
//! Backends and clients stay up for the whole run; the targets of the issue are checked at
//! the end (PASS/MISS lines) and any variant that could not run is named (NOT MEASURED).
//!
//! Statistics: `randread4k/qd32` also runs `ringvm-stats`, the jailed `ringvm` backend with
//! a statistics page (`--stats-fd`) that a thread of the bench reads 10 times a second, as
//! `ringvm stats` would have the VMM do (the page, then the process's /proc stat and
//! status); its rate over `ringvm`'s, per round, is checked against 0.98.
//!
//! Run with `cargo bench -p benches --bench block [-- --quick] [-- FILTER...]`; a filter picks
//! benches by substring (`qd32`, `randread`) or one variant (`randread4k/qd1/ringvm$`).
//! ringvm is taken from $RINGVM_BIN, else built as `target/release/ringvm`; a ringvm that
//! has no `device block`, or whose backend libblkio cannot use (libblkio needs the
//! `REPLY_ACK`, `CONFIG` and `CONFIGURE_MEM_SLOTS` protocol features), is reported and left
//! out. qemu-storage-daemon comes with
//! `qemu-system-common` (scripts/setup).

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{bench_dir, Role, Runner, Variant};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// The largest request.
const MAX_BLOCK: usize = 128 << 10;
/// The deepest queue.
const MAX_QD: usize = 32;
/// Precomputed random offsets (a power of two: indexed with a mask).
const OFFSETS: usize = 1 << 16;
/// Measured seconds per case (over all its rounds) and rounds, in a full and a quick run.
const FULL: (f64, usize) = (10.0, 20);
const QUICK: (f64, usize) = (0.5, 3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    op: Op,
    block: usize,
    qd: usize,
    random: bool,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread4k/qd1",
        op: Op::Read,
        block: 4096,
        qd: 1,
        random: true,
    },
    Workload {
        name: "randread4k/qd32",
        op: Op::Read,
        block: 4096,
        qd: 32,
        random: true,
    },
    Workload {
        name: "randwrite4k/qd1",
        op: Op::Write,
        block: 4096,
        qd: 1,
        random: true,
    },
    Workload {
        name: "randwrite4k/qd32",
        op: Op::Write,
        block: 4096,
        qd: 32,
        random: true,
    },
    Workload {
        name: "seqread128k/qd8",
        op: Op::Read,
        block: MAX_BLOCK,
        qd: 8,
        random: false,
    },
    Workload {
        name: "seqwrite128k/qd8",
        op: Op::Write,
        block: MAX_BLOCK,
        qd: 8,
        random: false,
    },
];

/// The fast-device workloads: the same I/O on an image in tmpfs, buffered.
const FAST_WORKLOADS: [Workload; 2] = [
    Workload {
        name: "fast/randread4k/qd32",
        op: Op::Read,
        block: 4096,
        qd: 32,
        random: true,
    },
    Workload {
        name: "fast/randwrite4k/qd32",
        op: Op::Write,
        block: 4096,
        qd: 32,
        random: true,
    },
];
/// Where the fast device's image lives: a tmpfs.
const FAST_DIR: &str = "/dev/shm";

fn main() {
    let config = benches::Config::from_env_with(FULL, QUICK);
    let mut runner = Runner::with_config("block", config);
    if !WORKLOADS
        .iter()
        .chain(&FAST_WORKLOADS)
        .any(|w| runner.enabled(w.name))
    {
        runner.finish().expect("write results");
        return;
    }
    let image_size: u64 = if runner.config().quick {
        256 << 20
    } else {
        1 << 30
    };
    let dir = bench_dir().expect("target/bench");

    // Backends stay up, and clients connected, for the whole run: a vhost-user backend may
    // serve only one connection.
    let mut left_out = Vec::new();
    let mut polled = None;
    let offsets = random_offsets(image_size);
    let disk: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| runner.enabled(w.name))
        .collect();
    if !disk.is_empty() {
        let image = dir.join(format!("block-{}M.img", image_size >> 20));
        prepare_image(&image, image_size).expect("cannot create the bench image");
        let mut b = Backends::start(&image, &dir, true, &mut left_out);
        if runner.enabled(POLLED_BENCH) {
            let direct = |(bin, has_direct): (PathBuf, bool)| {
                (bin, if has_direct { ",direct=true" } else { "" })
            };
            match ringvm_bin()
                .map(direct)
                .and_then(|(bin, direct)| StatsPoller::start(&bin, direct, &image, &dir))
            {
                Ok(p) => b.polled = Some(p),
                Err(e) => left_out.push(format!("subject ringvm-stats: {e}")),
            }
        }
        for w in disk {
            b.run(&mut runner, w, &offsets, image_size);
        }
        polled = b.polled.take().map(StatsPoller::stop);
    }
    // The fast device: the image in memory (tmpfs), every backend buffered. What a user with
    // NVMe feels, where the CPU time per I/O decides.
    let fast: Vec<&Workload> = FAST_WORKLOADS
        .iter()
        .filter(|w| runner.enabled(w.name))
        .collect();
    if !fast.is_empty() {
        let image = Path::new(FAST_DIR).join(format!(
            "ringvm-bench-{}-{}M.img",
            std::process::id(),
            image_size >> 20
        ));
        prepare_image(&image, image_size).expect("cannot create the tmpfs bench image");
        let mut b = Backends::start(&image, &dir, false, &mut left_out);
        for w in fast {
            b.run(&mut runner, w, &offsets, image_size);
        }
        drop(b);
        let _ = fs::remove_file(&image);
    }

    print_details(&runner);
    runner.finish_before_checks();
    if let Some(counts) = polled {
        check_polling(&runner, POLLED_BENCH, counts);
    }
    for bench in ["randread4k/qd32", "randwrite4k/qd32"] {
        runner.check(bench, "ringvm", Role::Limit, 0.95);
        runner.check(bench, "ringvm", Role::Peer, 1.15);
        check_cpu(&runner, bench);
    }
    for bench in ["fast/randread4k/qd32", "fast/randwrite4k/qd32"] {
        runner.check(bench, "ringvm", Role::Limit, 0.95);
        runner.check(bench, "ringvm", Role::Peer, 2.0);
        check_cpu(&runner, bench);
    }
    for bench in ["randread4k/qd1", "randwrite4k/qd1"] {
        check_latency(&runner, bench, 5.0);
    }

    for why in &left_out {
        println!("NOT MEASURED {why}");
    }
    // Every variant is installed by scripts/setup: one that could not run is a failure, not
    // a silent gap in the table (CI runs this).
    if !left_out.is_empty() {
        std::process::exit(1);
    }
}

/// The bench whose `ringvm` case also runs with its statistics polled (`ringvm-stats`).
const POLLED_BENCH: &str = "randread4k/qd32";

/// The backends of one image: the limit, the peer and ringvm's subjects, up for as long as
/// this lives.
struct Backends {
    limit: Backend,
    peer: Option<Backend>,
    ringvm: Vec<Backend>,
    /// `ringvm-stats`, measured in `POLLED_BENCH` only.
    polled: Option<StatsPoller>,
}

impl Backends {
    /// Starts every backend on `image`, O_DIRECT or buffered; names those that could not
    /// start in `left_out`.
    fn start(image: &Path, dir: &Path, direct: bool, left_out: &mut Vec<String>) -> Backends {
        let limit = Backend::io_uring(image, direct).expect("libblkio io_uring on the image");
        let peer = match Backend::qsd(image, dir, direct) {
            Ok(b) => Some(b),
            Err(e) => {
                left_out.push(format!("peer qsd: {e}"));
                None
            }
        };
        let mut ringvm = Vec::new();
        match ringvm_bin() {
            Ok((bin, has_direct)) => {
                let opt = match (has_direct, direct) {
                    (false, _) => "",
                    (true, true) => ",direct=true",
                    (true, false) => ",direct=false",
                };
                for (key, sandbox) in [("ringvm", true), ("ringvm-nosandbox", false)] {
                    match Backend::ringvm(key, &bin, opt, sandbox, image, dir) {
                        Ok(b) => ringvm.push(b),
                        Err(e) => left_out.push(format!("subject {key}: {e}")),
                    }
                }
            }
            Err(e) => left_out.push(format!("subjects ringvm: {e}")),
        }
        Backends {
            limit,
            peer,
            ringvm,
            polled: None,
        }
    }

    /// Measures workload `w` on every backend, side by side.
    fn run(&mut self, runner: &mut Runner, w: &Workload, offsets: &[u64], image_size: u64) {
        let mut all: Vec<&mut Backend> = self.ringvm.iter_mut().collect();
        if w.name == POLLED_BENCH {
            all.extend(self.polled.as_mut().map(|p| &mut p.backend));
        }
        all.push(&mut self.limit);
        all.extend(self.peer.as_mut());
        for b in &mut all {
            b.calls.clear();
        }
        let variants = all
            .iter_mut()
            .map(|b| {
                let (role, key, label) = (b.role, b.key, b.label.clone());
                let b: &mut Backend = b;
                Variant::new(role, key, &label, move |n| {
                    b.run(w, offsets, image_size, n)
                        .unwrap_or_else(|e| panic!("{} {}: {e}", b.key, w.name))
                })
            })
            .collect();
        runner.compare(w.name, variants);
        let rounds = runner.config().rounds;
        for b in all {
            for (k, v) in b.stats(rounds) {
                runner.annotate(w.name, b.key, k, v);
            }
            if let Some(c) = runner.case(w.name, b.key) {
                let mib = c.ops_per_sec * w.block as f64 / f64::from(1u32 << 20);
                runner.annotate(w.name, b.key, "mib_per_s", mib);
            }
        }
    }
}

/// A figure of the JSON line of a case.
fn extra(runner: &Runner, bench: &str, name: &str, key: &str) -> Option<f64> {
    runner
        .case(bench, name)?
        .extra
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
}

/// The second table: throughput, latency and backend CPU time per case.
fn print_details(runner: &Runner) {
    let limit = |bench: &str| {
        runner
            .cases()
            .iter()
            .find(|c| c.bench == bench && c.role == Role::Limit)
            .map(|c| c.name.clone())
    };
    println!(
        "\n{:17} {:17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "bench",
        "variant",
        "IOPS",
        "MiB/s",
        "mean us",
        "p99 us",
        "+mean us",
        "backend cpu",
        "client cpu"
    );
    println!("{:>105}", "(us per I/O)");
    println!("{}", "-".repeat(105));
    let mut last = "";
    for c in runner.cases() {
        let get = |k| extra(runner, &c.bench, &c.name, k);
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let delta = limit(&c.bench)
            .and_then(|l| extra(runner, &c.bench, &l, "lat_mean_us"))
            .zip(get("lat_mean_us"))
            .filter(|_| c.role != Role::Limit)
            .map(|(l, s)| s - l);
        let bench = if c.bench == last { "" } else { &c.bench };
        last = &c.bench;
        println!(
            "{bench:17} {:17} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12}",
            c.name,
            c.ops_per_sec,
            fmt(get("mib_per_s")),
            fmt(get("lat_mean_us")),
            fmt(get("lat_p99_us")),
            fmt(delta),
            fmt(get("backend_cpu_us_per_io")),
            fmt(get("client_cpu_us_per_io")),
        );
    }
}

/// PASS when ringvm's backend spends less CPU time per I/O than qemu-storage-daemon's.
fn check_cpu(runner: &Runner, bench: &str) {
    let cpu = |name| extra(runner, bench, name, "backend_cpu_us_per_io");
    if let (Some(s), Some(p)) = (cpu("ringvm"), cpu("qsd")) {
        println!(
            "{} {bench}: ringvm backend CPU {s:.2} us/IO, qsd {p:.2} us/IO ({:.2}x), target < 1x",
            if s < p { "PASS" } else { "MISS" },
            s / p
        );
    }
}

/// PASS when ringvm's mean latency is within `max_us` of the limit's.
fn check_latency(runner: &Runner, bench: &str, max_us: f64) {
    let lat = |name| extra(runner, bench, name, "lat_mean_us");
    if let (Some(s), Some(l)) = (lat("ringvm"), lat("io_uring")) {
        let peer = lat("qsd").map_or_else(String::new, |p| format!(" (qsd adds {:.1} us)", p - l));
        println!(
            "{} {bench}: ringvm adds {:.1} us mean latency to io_uring's {l:.1} us, target <= +{max_us:.0} us{peer}",
            if s - l <= max_us { "PASS" } else { "MISS" },
            s - l
        );
    }
}

// ---- the image ----

/// A raw image of `size` bytes filled with non-zero data (not sparse, no unwritten extents:
/// reads hit real blocks). Kept between runs.
fn prepare_image(path: &Path, size: u64) -> io::Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for word in chunk.chunks_exact_mut(8) {
        x = xorshift(x);
        word.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..size / chunk.len() as u64 {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, path)
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// 4 KiB-aligned random offsets inside the image.
fn random_offsets(size: u64) -> Vec<u64> {
    let blocks = size / 4096;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..OFFSETS)
        .map(|_| {
            x = xorshift(x);
            (x % blocks) * 4096
        })
        .collect()
}

// ---- backends ----

/// What one call of a variant measured.
struct Call {
    ops: u64,
    /// The backend's CPU time over the call.
    cpu: Option<Duration>,
    /// The bench process's CPU time over the call (the client, and for io_uring the kernel's
    /// work that the backend does elsewhere).
    client_cpu: Duration,
    /// Submission to completion of each I/O, in nanoseconds.
    latencies: Vec<u32>,
}

/// One libblkio client and, for vhost-user, the backend process serving it.
struct Backend {
    key: &'static str,
    label: String,
    role: Role,
    client: Client,
    /// The backend process (none for io_uring: the kernel does the work in the client).
    process: Option<Child>,
    /// The backend's process tree: the CPU time of every thread of these counts.
    pids: Vec<u32>,
    /// The calls of the current bench; the last `rounds` are the measured rounds.
    calls: Vec<Call>,
    /// Where the next I/O goes: an index into the random offsets or the sequential cursor.
    cursor: u64,
}

impl Backend {
    /// `direct`: O_DIRECT, else buffered (the fast-device case, an image on tmpfs).
    fn io_uring(image: &Path, direct: bool) -> Result<Backend, String> {
        let client = Client::new(
            "io_uring",
            |b| {
                b.set_str("path", &image.to_string_lossy())?;
                b.set_bool("direct", direct)
            },
            |b| b.set_i32("num-entries", 128),
        )?;
        Ok(Backend::new(
            "io_uring",
            format!(
                "libblkio io_uring driver, {} (no backend)",
                if direct { "O_DIRECT" } else { "buffered" }
            ),
            Role::Limit,
            client,
            None,
        ))
    }

    fn qsd(image: &Path, dir: &Path, direct: bool) -> Result<Backend, String> {
        let socket = dir.join("block-qsd.sock");
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-storage-daemon");
        let cache = if direct { "on" } else { "off" };
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct={cache},aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ));
        let child = benches::process::spawn_backend(cmd, &dir.join("block-qsd.log"), &socket)?;
        Backend::vhost_user(
            "qsd",
            format!(
                "qemu-storage-daemon vhost-user-blk, file aio=io_uring{}",
                if direct { " direct" } else { "" }
            ),
            Role::Peer,
            child,
            &socket,
        )
    }

    fn ringvm(
        key: &'static str,
        bin: &Path,
        direct: &str,
        sandbox: bool,
        image: &Path,
        dir: &Path,
    ) -> Result<Backend, String> {
        let extra: &[&str] = if sandbox { &[] } else { &["--disable-sandbox"] };
        Self::ringvm_with(key, bin, direct, image, dir, extra)
    }

    /// `ringvm device block --socket S --file IMG EXTRA...`.
    fn ringvm_with(
        key: &'static str,
        bin: &Path,
        direct: &str,
        image: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Backend, String> {
        let socket = dir.join(format!("block-{key}.sock"));
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(bin);
        cmd.args(["device", "block", "--socket"])
            .arg(&socket)
            .arg("--file")
            .arg(format!("{}{direct}", image.display()))
            .args(extra);
        let child =
            benches::process::spawn_backend(cmd, &dir.join(format!("block-{key}.log")), &socket)?;
        let label = format!("ringvm device block --file IMG{direct} {}", extra.join(" "));
        Backend::vhost_user(
            key,
            label.trim_end().to_owned(),
            Role::Subject,
            child,
            &socket,
        )
    }

    fn vhost_user(
        key: &'static str,
        label: String,
        role: Role,
        mut child: Child,
        socket: &Path,
    ) -> Result<Backend, String> {
        let client = Client::new(
            "virtio-blk-vhost-user",
            |b| b.set_str("path", &socket.to_string_lossy()),
            |b| {
                b.set_i32("num-queues", 1)?;
                b.set_i32("queue-size", 256)
            },
        );
        match client {
            Ok(client) => Ok(Backend::new(key, label, role, client, Some(child))),
            Err(e) => {
                benches::process::kill_tree(&mut child);
                Err(e)
            }
        }
    }

    fn new(
        key: &'static str,
        label: String,
        role: Role,
        client: Client,
        process: Option<Child>,
    ) -> Backend {
        // After the connection: a sandboxed backend has forked into its jail by now.
        let pids = process
            .as_ref()
            .map_or_else(Vec::new, |c| benches::process::process_tree(c.id()));
        Backend {
            key,
            label,
            role,
            client,
            process,
            pids,
            calls: Vec::new(),
            cursor: 0,
        }
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

    /// Runs `n` I/Os of `w` and records the call; returns the time they took.
    fn run(
        &mut self,
        w: &Workload,
        offsets: &[u64],
        size: u64,
        n: u64,
    ) -> Result<Duration, String> {
        let cpu_before = self.cpu_time();
        let client_before = benches::process::process_cpu_time(std::process::id());
        let mut latencies = Vec::with_capacity(n as usize);
        let cursor = &mut self.cursor;
        let mut next = || {
            let off = if w.random {
                offsets[*cursor as usize % offsets.len()]
            } else {
                *cursor * w.block as u64 % size
            };
            *cursor += 1;
            off
        };
        let elapsed = self.client.run(w, n, &mut next, &mut latencies)?;
        let client_cpu =
            benches::process::process_cpu_time(std::process::id()).saturating_sub(client_before);
        let cpu = self
            .cpu_time()
            .zip(cpu_before)
            .map(|(a, b)| a.saturating_sub(b));
        self.calls.push(Call {
            ops: n,
            cpu,
            client_cpu,
            latencies,
        });
        Ok(elapsed)
    }

    /// The figures of the last `rounds` calls (the measured rounds) for the JSON line.
    fn stats(&self, rounds: usize) -> Vec<(&'static str, f64)> {
        let measured = &self.calls[self.calls.len().saturating_sub(rounds)..];
        let mut lat: Vec<u32> = measured
            .iter()
            .flat_map(|c| c.latencies.iter().copied())
            .collect();
        let mut out = Vec::new();
        if lat.is_empty() {
            return out;
        }
        lat.sort_unstable();
        let ops: u64 = measured.iter().map(|c| c.ops).sum();
        let mean = lat.iter().map(|&l| f64::from(l)).sum::<f64>() / lat.len() as f64;
        let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
        out.push(("lat_mean_us", mean / 1e3));
        out.push(("lat_p99_us", f64::from(p99) / 1e3));
        let client: Duration = measured.iter().map(|c| c.client_cpu).sum();
        out.push(("client_cpu_us_per_io", benches::us_per(client, ops)));
        let cpu: Option<Duration> = measured.iter().map(|c| c.cpu).sum();
        if let Some(cpu) = cpu {
            out.push(("backend_cpu_us_per_io", benches::us_per(cpu, ops)));
        }
        out
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(child) = &mut self.process {
            benches::process::kill_tree(child);
        }
    }
}

/// The ringvm binary, and whether its `--file` takes `direct=` (older ones open every image
/// with O_DIRECT); or why there is none that can serve a block device.
fn ringvm_bin() -> Result<(PathBuf, bool), String> {
    let (bin, text) = benches::process::ringvm_device("block", "--socket")?;
    Ok((bin, text.contains("direct=")))
}

// ---- the libblkio client ----

/// A started libblkio instance with one queue and a buffer region (fd-backed, as vhost-user
/// needs: the backend maps it).
struct Client {
    // The queue goes before the instance it came from, which is kept for as long.
    queue: Blkioq,
    _blkio: Blkio,
    region: MemoryRegion,
    completions: Vec<MaybeUninit<Completion>>,
}

impl Client {
    fn new(
        driver: &str,
        configure: impl FnOnce(&mut Blkio) -> blkio::Result<()>,
        configure_connected: impl FnOnce(&mut Blkio) -> blkio::Result<()>,
    ) -> Result<Client, String> {
        let err = |what: &str| {
            let what = what.to_owned();
            move |e: blkio::Error| format!("{driver}: {what}: {}", e.message())
        };
        let mut b = Blkio::new(driver).map_err(err("new"))?;
        configure(&mut b).map_err(err("configure"))?;
        b.connect().map_err(err("connect"))?;
        configure_connected(&mut b).map_err(err("configure queues"))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(err("alignment"))? as usize;
        let len = (MAX_QD * MAX_BLOCK).next_multiple_of(align.max(4096));
        let region = b.alloc_mem_region(len).map_err(err("alloc_mem_region"))?;
        let mut started = b.start().map_err(err("start"))?;
        b.map_mem_region(&region).map_err(err("map_mem_region"))?;
        let queue = started.queues.pop().ok_or(format!("{driver}: no queue"))?;
        // Writes carry a pattern, not zeros.
        // SAFETY: the region is `len` bytes mapped read-write by alloc_mem_region, and no I/O
        // is in flight yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };
        Ok(Client {
            queue,
            _blkio: b,
            region,
            completions: (0..MAX_QD).map(|_| MaybeUninit::uninit()).collect(),
        })
    }

    /// Runs `n` I/Os of `w` at its queue depth, one buffer slot per in-flight request;
    /// records each I/O's latency. Returns the time they took.
    fn run(
        &mut self,
        w: &Workload,
        n: u64,
        next_offset: &mut dyn FnMut() -> u64,
        latencies: &mut Vec<u32>,
    ) -> Result<Duration, String> {
        assert!(w.qd <= MAX_QD && w.block <= MAX_BLOCK);
        let mut submitted = [Instant::now(); MAX_QD];
        let start = Instant::now();
        let mut issued = 0u64;
        let mut done = 0u64;
        for (slot, at) in submitted.iter_mut().enumerate().take(w.qd.min(n as usize)) {
            *at = Instant::now();
            self.submit(w, slot, next_offset());
            issued += 1;
        }
        while done < n {
            let got = self
                .queue
                .do_io(&mut self.completions, 1, None, None)
                .map_err(|e| format!("do_io: {}", e.message()))?;
            let now = Instant::now();
            for i in 0..got {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { self.completions[i].assume_init_read() };
                if c.ret != 0 {
                    return Err(format!(
                        "I/O failed: {}",
                        io::Error::from_raw_os_error(-c.ret)
                    ));
                }
                let slot = c.user_data;
                let ns = now.duration_since(submitted[slot]).as_nanos();
                latencies.push(u32::try_from(ns).unwrap_or(u32::MAX));
                done += 1;
                if issued < n {
                    submitted[slot] = Instant::now();
                    self.submit(w, slot, next_offset());
                    issued += 1;
                }
            }
        }
        Ok(start.elapsed())
    }

    fn submit(&mut self, w: &Workload, slot: usize, offset: u64) {
        let buf = (self.region.addr + slot * MAX_BLOCK) as *mut u8;
        // The buffer of `slot` lies in the mapped region and is used by this request alone
        // until its completion comes back.
        match w.op {
            Op::Read => self
                .queue
                .read(offset, buf, w.block, slot, ReqFlags::empty()),
            Op::Write => self
                .queue
                .write(offset, buf, w.block, slot, ReqFlags::empty()),
        }
    }
}

/// The `ringvm-stats` backend and the thread that polls its statistics 10 times a second.
struct StatsPoller {
    backend: Backend,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl StatsPoller {
    fn start(bin: &Path, direct: &str, image: &Path, dir: &Path) -> Result<StatsPoller, String> {
        let page = memory::SharedCounters::create(virtio::stats::COUNTERS)
            .map_err(|e| format!("statistics page: {e}"))?;
        virtio::stats::init_page(page.as_slice());
        // An inheritable duplicate for the backend (the page's own descriptor is close-on-exec).
        let raw = std::os::fd::AsRawFd::as_raw_fd(&page.fd());
        // SAFETY: F_DUPFD on a descriptor this process owns makes a new one (no close-on-exec)
        // that nothing else uses; the result is checked.
        let inherited = unsafe { libc::fcntl(raw, libc::F_DUPFD, 3) };
        if inherited < 0 {
            return Err(format!("dup: {}", io::Error::last_os_error()));
        }
        let backend = Backend::ringvm_with(
            "ringvm-stats",
            bin,
            direct,
            image,
            dir,
            &["--stats-fd", &inherited.to_string()],
        );
        // SAFETY: `inherited` was made above and is closed once, here: the backend has it.
        unsafe { libc::close(inherited) };
        let backend = backend?;
        let pids = backend.pids.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut polls, mut requests) = (0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                // What the VMM reads for `stats`: the page, then each process's /proc files.
                if let Some(s) = virtio::stats::Snapshot::read(page.as_slice(), 1) {
                    requests = s.queues[0].requests;
                }
                for pid in &pids {
                    let _ = fs::read_to_string(format!("/proc/{pid}/stat"));
                    let _ = fs::read_to_string(format!("/proc/{pid}/status"));
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (polls, requests)
        });
        Ok(StatsPoller {
            backend,
            stop,
            thread,
        })
    }

    /// Stops polling: how many polls, and the requests the page counted.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let counts = self.thread.join().unwrap_or((0, 0));
        drop(self.backend);
        counts
    }
}

/// PASS when the backend whose statistics are polled keeps at least 0.98 of the rate of the
/// same backend unpolled (the median of the per-round ratios).
fn check_polling(runner: &Runner, bench: &str, (polls, requests): (u64, u64)) {
    let (Some(polled), Some(plain)) = (
        runner.case(bench, "ringvm-stats"),
        runner.case(bench, "ringvm"),
    ) else {
        return;
    };
    let ratio = benches::paired_ratio(polled, plain);
    println!(
        "{} {bench}: ringvm with its statistics polled 10/s ({polls} polls, {requests} requests counted) at {ratio:.3}x the unpolled rate, target >= 0.98x",
        if ratio >= 0.98 { "PASS" } else { "MISS" }
    );
}
