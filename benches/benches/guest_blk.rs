//! The block data path as a guest sees it: the test guest's polling virtio-blk driver
//! (`ringvm.test=blk-bench`, guest/test/blk_bench.c) keeps 32 4 KiB requests in flight at
//! random offsets and counts the completions it sees in a fixed time, measured with the TSC.
//!
//! - Subject: `ringvm run --rwdisk IMG,direct=true --no-rng` (the block device in its jailed
//!   device process).
//! - Peer: QEMU with the same guest and image: `-drive ...,cache=none,aio=io_uring
//!   -device virtio-blk-pci,disable-legacy=on,num-queues=1`, on `-M microvm,pcie=on` (the guest
//!   reaches PCI through ECAM and assigns the BARs; boots in ~0.5 s), or on `-M pc` (SeaBIOS,
//!   the guest's 0xCF8 path as under ringvm; ~5 s per boot) with
//!   `RINGVM_BENCH_QEMU_MACHINE=pc`. The virtio-blk device and its data path (ioeventfd on the
//!   notify address, io_uring on the file) are the same on both machines.
//! - Workloads: `randread4k/qd32` and `randwrite4k/qd32` on one preallocated raw image filled
//!   with data (`<target>/bench/guest-blk-<size>M.img`, 1 GiB; 256 MiB with `--quick`), opened
//!   with O_DIRECT by both VMMs.
//!
//! Each round boots each VMM once (interleaved, rotating order) and takes the rate the guest
//! measured: its timed loop runs at CPL3 with interrupts off, polls the used ring and notifies
//! with one MMIO write per batch of refills, so nothing but the notification leaves the guest
//! while it is timed, and boot time does not count. The TSC rate is calibrated once, by the guest
//! against the RTC in a first ringvm boot, and passed to every later boot of both VMMs
//! (`ringvm.blkbench.tsc_khz`), so the ratio is exactly one of cycles. The guest's mean latency
//! per request (submission to the poll that saw it complete) goes to the JSON line
//! (`<target>/bench/guest_blk.jsonl`) as `lat_avg_us`, with `tsc_khz`.
//!
//! Host contention, which decides this bench on a busy machine: while the guest's timed loop
//! runs (from its `capacity=` line to its `completed=` line) the bench takes the
//! `/proc/<pid>/task/<tid>/schedstat` of the I/O path's threads (every thread of the VMM's
//! process tree but the vCPU's, which the polling guest keeps busy: ringvm's device processes,
//! QEMU's main loop and workers) and reports their CPU time per request
//! (`io_cpu_us_per_io`), the time they were runnable but waited for a CPU
//! (`runq_wait_ms_per_s`, summed over the threads) and the mean wait per wakeup
//! (`runq_wait_us_per_wakeup`), and how long the vCPU thread waited for a CPU
//! (`vcpu_runq_wait_ms_per_s`: the guest refills nothing meanwhile). A ratio measured while
//! the waits are high says more about the host's other load than about either VMM.
//!
//! The target, checked at the end (PASS/MISS lines): ringvm at 1.1x QEMU or more on both
//! workloads.
//!
//! Run with `cargo bench -p benches --bench guest_blk [-- --quick] [-- FILTER...]`. A full run
//! measures 1 s per boot in 10 rounds; `--quick` 0.25 s in 3. `RINGVM_BENCH_ROUNDS` overrides
//! the rounds, `RINGVM_BENCH_GUEST_MS` the guest's measured time per boot. ringvm is taken from
//! $RINGVM_BIN, else built as `<target>/release/ringvm`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benches::process::{process_tree, test_guest};
use benches::{bench_dir, target_dir, workspace_root, Config, Runner, Variant};

/// Guest RAM of every run, MiB.
const MEM_MIB: u64 = 256;
const QD: u32 = 32;
const BS: u32 = 4096;

/// One boot's result, as the guest printed it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ios: u64,
    cycles: u64,
    tsc_khz: u64,
    lat_avg_us: f64,
    wall: Duration,
    /// The VMM's threads during the guest's timed loop.
    host: Sched,
}

/// In a span of time: the CPU time, run-queue wait and timeslices of a VMM's I/O-path
/// threads, and the run-queue wait of its vCPU threads.
#[derive(Debug, Clone, Copy, Default)]
struct Sched {
    run_ns: u64,
    wait_ns: u64,
    slices: u64,
    vcpu_wait_ns: u64,
    span: Duration,
}

/// `schedstat` (run ns, wait ns, timeslices) of every thread of `root`'s process tree, and
/// whether it is a vCPU thread (ringvm's `vcpuN`, QEMU's `CPU N/KVM`; 1) or on the I/O path
/// (device processes, QEMU's main loop and workers; 0).
fn tree_schedstat(root: u32) -> HashMap<u32, [u64; 4]> {
    let mut out = HashMap::new();
    for pid in process_tree(root) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let vcpu = u64::from(comm.starts_with("vcpu") || comm.starts_with("CPU "));
            let Ok(text) = fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            let v: Vec<u64> = text
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if let [run, wait, slices] = v[..] {
                out.insert(tid, [run, wait, slices, vcpu]);
            }
        }
    }
    out
}

/// What the threads alive at both snapshots did between them.
fn sched_between(a: &HashMap<u32, [u64; 4]>, b: &HashMap<u32, [u64; 4]>, span: Duration) -> Sched {
    let mut s = Sched {
        span,
        ..Sched::default()
    };
    for (tid, after) in b {
        let Some(before) = a.get(tid) else {
            continue;
        };
        if after[3] == 1 {
            s.vcpu_wait_ns += after[1].saturating_sub(before[1]);
            continue;
        }
        s.run_ns += after[0].saturating_sub(before[0]);
        s.wait_ns += after[1].saturating_sub(before[1]);
        s.slices += after[2].saturating_sub(before[2]);
    }
    s
}

impl Sample {
    fn seconds(&self) -> f64 {
        self.cycles as f64 / (self.tsc_khz as f64 * 1e3)
    }
    fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ringvm { sandbox: bool },
    Qemu { pc: bool },
}

struct Setup {
    bin: PathBuf,
    guest: PathBuf,
    image: PathBuf,
}

impl Setup {
    fn command(&self, vmm: Vmm, params: &str) -> Command {
        match vmm {
            Vmm::Ringvm { sandbox } => {
                let mut c = Command::new(&self.bin);
                c.args(["run", "-m", &MEM_MIB.to_string(), "--no-rng"]);
                if !sandbox {
                    c.arg("--disable-sandbox");
                }
                c.arg("--rwdisk")
                    .arg(format!("{},direct=true", self.image.display()))
                    .args(["-p", params])
                    .arg(&self.guest);
                c
            }
            Vmm::Qemu { pc } => {
                let mut c = Command::new("qemu-system-x86_64");
                let params = if pc {
                    c.args(["-M", "pc"]);
                    params.to_owned()
                } else {
                    c.args(["-M", "microvm,x-option-roms=off,rtc=on,pcie=on"])
                        .args(["-device", "i8042"]);
                    format!(
                        "{params} ringvm.pci.ecam=0xe0000000 ringvm.pci.mmio=0xc0000000-0xe0000000"
                    )
                };
                // Named threads: the vCPU's (`CPU 0/KVM`) is told apart from the I/O path's.
                c.args(["-name", "guest-blk,debug-threads=on"])
                    .args(["-enable-kvm", "-cpu", "qemu64,-cx16,+xsaveerptr"])
                    .args(["-m", &MEM_MIB.to_string(), "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", "stdio", "-no-reboot", "-kernel"])
                    .arg(&self.guest)
                    .args(["-append", &params])
                    .arg("-drive")
                    .arg(format!(
                        "if=none,id=d0,file={},format=raw,cache=none,aio=io_uring",
                        self.image.display()
                    ))
                    .args([
                        "-device",
                        "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=1",
                    ]);
                c
            }
        }
    }

    /// Boots `vmm` once with the blk-bench scenario; the guest's result or why there is none.
    fn boot(&self, vmm: Vmm, op: &str, ms: u64, tsc_khz: Option<u64>) -> Result<Sample, String> {
        let mut params = format!(
            "ringvm.test=blk-bench ringvm.blkbench.op={op} ringvm.blkbench.qd={QD} \
             ringvm.blkbench.bs={BS} ringvm.blkbench.ms={ms}"
        );
        if let Some(k) = tsc_khz {
            params.push_str(&format!(" ringvm.blkbench.tsc_khz={k}"));
        }
        let start = Instant::now();
        let mut child = self
            .command(vmm, &params)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {vmm:?}: {e}"))?;
        let mut err_pipe = child.stderr.take().ok_or("no stderr pipe")?;
        let err_reader = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = err_pipe.read_to_end(&mut text);
            text
        });
        // The serial console, line by line: the guest's timed loop runs between its
        // `capacity=` and `completed=` lines, and the VMM's threads are measured across it.
        let mut stdout = String::new();
        let mut timed: Option<(Instant, HashMap<u32, [u64; 4]>)> = None;
        let mut host = Sched::default();
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout pipe")?);
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line);
            if text.contains("blk-bench capacity=") {
                timed = Some((Instant::now(), tree_schedstat(child.id())));
            } else if text.contains("blk-bench completed=") {
                if let Some((at, before)) = timed.take() {
                    host = sched_between(&before, &tree_schedstat(child.id()), at.elapsed());
                }
            }
            stdout.push_str(&text);
            line.clear();
        }
        let status = child
            .wait()
            .map_err(|e| format!("cannot wait for {vmm:?}: {e}"))?;
        let wall = start.elapsed();
        let stderr_bytes = err_reader.join().unwrap_or_default();
        let stderr = String::from_utf8_lossy(&stderr_bytes);
        let tail = || {
            let text: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
            text[text.len().saturating_sub(8)..].join("\n    ")
        };
        if !stdout.contains("ringvm-test: blk-bench ok") {
            return Err(format!(
                "{vmm:?} ({}): no `blk-bench ok`:\n    {}",
                status,
                tail()
            ));
        }
        let line = stdout
            .lines()
            .find(|l| l.starts_with("ringvm-test: blk-bench op="))
            .ok_or_else(|| format!("{vmm:?}: no result line:\n    {}", tail()))?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("{vmm:?}: no {name}= in {line:?}"))
        };
        let num = |name: &str| -> Result<u64, String> {
            field(name)?
                .parse()
                .map_err(|e| format!("{vmm:?}: {name} in {line:?}: {e}"))
        };
        let s = Sample {
            ios: num("ios")?,
            cycles: num("cycles")?,
            tsc_khz: num("tsc_khz")?,
            lat_avg_us: field("lat_avg_us")?
                .parse()
                .map_err(|e| format!("{vmm:?}: lat_avg_us in {line:?}: {e}"))?,
            wall,
            host,
        };
        if s.ios == 0 || s.cycles == 0 || s.tsc_khz == 0 {
            return Err(format!("{vmm:?}: empty result {line:?}"));
        }
        Ok(s)
    }
}

fn main() {
    let env = Config::from_env();
    let quick = env.quick;
    let rounds = std::env::var("RINGVM_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.trim().parse::<usize>().ok())
        .filter(|r| *r > 0)
        .unwrap_or(if quick { 3 } else { 10 });
    let ms = std::env::var("RINGVM_BENCH_GUEST_MS")
        .ok()
        .and_then(|r| r.trim().parse::<u64>().ok())
        .filter(|m| (1..=30_000).contains(m))
        .unwrap_or(if quick { 250 } else { 1000 });
    // One boot per variant and round: the harness's "time" is the guest's measured time, and
    // its warm-up is one boot (a warm-up of ~0 makes it stop after the first call).
    let config = Config {
        measure: Duration::from_millis(ms * rounds as u64),
        warmup: Duration::from_nanos(1),
        rounds,
        quick,
        ..env
    };
    let mut r = Runner::with_config("guest_blk", config);

    let benches = [
        ("randread4k/qd32", "randread"),
        ("randwrite4k/qd32", "randwrite"),
    ];
    if !benches.iter().any(|(b, _)| r.enabled(b)) {
        r.finish().expect("write results");
        return;
    }

    let dir = bench_dir().expect("target/bench");
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let image = dir.join(format!("guest-blk-{}M.img", size >> 20));
    prepare_image(&image, size).expect("cannot create the bench image");
    let setup = Setup {
        bin: ringvm_bin(),
        guest: test_guest(&dir.join("test-guest-blk")),
        image,
    };
    let pc = std::env::var("RINGVM_BENCH_QEMU_MACHINE").is_ok_and(|m| m == "pc");

    // A first boot of each VMM: does it work at all, and the guest's TSC rate (calibrated
    // against the RTC once, then given to every boot).
    let probe_ms = 100;
    let ringvm = Vmm::Ringvm { sandbox: true };
    let first = setup
        .boot(ringvm, "randread", probe_ms, None)
        .unwrap_or_else(|e| panic!("ringvm cannot run the blk-bench guest: {e}"));
    let khz = first.tsc_khz;
    eprintln!(
        "guest_blk: TSC {:.1} MHz (guest, against the RTC); ringvm boot to exit {:.2} s",
        khz as f64 / 1e3,
        first.wall.as_secs_f64()
    );
    let qemu = Vmm::Qemu { pc };
    let qemu_ok = match setup.boot(qemu, "randread", probe_ms, None) {
        Ok(s) => {
            let diff = (s.tsc_khz as f64 / khz as f64 - 1.0).abs();
            eprintln!(
                "guest_blk: QEMU guest's TSC {:.1} MHz ({:.2}% apart); boot to exit {:.2} s",
                s.tsc_khz as f64 / 1e3,
                diff * 100.0,
                s.wall.as_secs_f64()
            );
            true
        }
        Err(e) => {
            println!("NOT MEASURED qemu: {e}");
            false
        }
    };
    let (rkey, rlabel) = (
        "ringvm",
        "ringvm run --rwdisk IMG,direct=true (jailed device process)",
    );
    let qlabel = if pc {
        "qemu -M pc, virtio-blk-pci, cache=none,aio=io_uring"
    } else {
        "qemu -M microvm,pcie=on, virtio-blk-pci, cache=none,aio=io_uring"
    };

    for (bench, op) in benches {
        if !r.enabled(bench) {
            continue;
        }
        let samples: RefCell<Vec<(&str, Sample)>> = RefCell::new(Vec::new());
        let run = |key: &'static str, vmm: Vmm| {
            let samples = &samples;
            let setup = &setup;
            move |n: u64| {
                let s = setup
                    .boot(vmm, op, ms, Some(khz))
                    .unwrap_or_else(|e| panic!("{bench}: {e}"));
                samples.borrow_mut().push((key, s));
                // The harness's rate is n / time: report the guest's own rate.
                Duration::from_secs_f64(n as f64 / s.iops())
            }
        };
        let mut variants = vec![Variant::subject(rkey, rlabel, run(rkey, ringvm))];
        if qemu_ok {
            variants.push(Variant::peer("qemu", qlabel, run("qemu", qemu)));
        }
        r.compare(bench, variants);
        // The first sample of each variant is its warm-up boot.
        let all = samples.into_inner();
        for key in [rkey, "qemu"] {
            let mine: Vec<&Sample> = all
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, s)| s)
                .skip(1)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let n = mine.len() as f64;
            let lat = mine.iter().map(|s| s.lat_avg_us).sum::<f64>() / n;
            let wall = mine.iter().map(|s| s.wall.as_secs_f64()).sum::<f64>() / n;
            let ios: u64 = mine.iter().map(|s| s.ios).sum();
            r.annotate(bench, key, "lat_avg_us", lat);
            let run_ns: u64 = mine.iter().map(|s| s.host.run_ns).sum();
            let wait_ns: u64 = mine.iter().map(|s| s.host.wait_ns).sum();
            let slices: u64 = mine.iter().map(|s| s.host.slices).sum();
            let span: f64 = mine.iter().map(|s| s.host.span.as_secs_f64()).sum();
            let host_ios: u64 = mine
                .iter()
                .filter(|s| s.host.span > Duration::ZERO)
                .map(|s| s.ios)
                .sum();
            if span > 0.0 && host_ios > 0 {
                r.annotate(
                    bench,
                    key,
                    "io_cpu_us_per_io",
                    run_ns as f64 / 1e3 / host_ios as f64,
                );
                r.annotate(
                    bench,
                    key,
                    "runq_wait_ms_per_s",
                    wait_ns as f64 / 1e6 / span,
                );
                let vcpu_wait: u64 = mine.iter().map(|s| s.host.vcpu_wait_ns).sum();
                r.annotate(
                    bench,
                    key,
                    "vcpu_runq_wait_ms_per_s",
                    vcpu_wait as f64 / 1e6 / span,
                );
                r.annotate(
                    bench,
                    key,
                    "runq_wait_us_per_wakeup",
                    wait_ns as f64 / 1e3 / slices.max(1) as f64,
                );
            }
            r.annotate(bench, key, "tsc_khz", khz as f64);
            r.annotate(bench, key, "guest_ios", ios as f64);
            r.annotate(bench, key, "boot_to_exit_s", wall);
            r.annotate(bench, key, "qd", f64::from(QD));
            r.annotate(bench, key, "guest_ms", ms as f64);
        }
    }
    r.finish().expect("write results");
    // QEMU is installed by scripts/setup: a peer that could not run fails the bench (CI),
    // after the table of what did run.
    let qemu_missing = !qemu_ok;
    for (bench, _) in benches {
        let Some(c) = r.case(bench, rkey) else {
            continue;
        };
        let lat = |k: &str| {
            r.case(bench, k)
                .and_then(|c| c.extra.iter().find(|(n, _)| n == "lat_avg_us"))
                .map_or(f64::NAN, |(_, v)| *v)
        };
        for k in [rkey, "qemu"] {
            let x = |n: &str| {
                r.case(bench, k)
                    .and_then(|c| c.extra.iter().find(|(name, _)| name == n))
                    .map(|(_, v)| *v)
            };
            if let (Some(cpu), Some(wait), Some(per_wake), Some(vcpu)) = (
                x("io_cpu_us_per_io"),
                x("runq_wait_ms_per_s"),
                x("runq_wait_us_per_wakeup"),
                x("vcpu_runq_wait_ms_per_s"),
            ) {
                println!(
                    "{bench}: {k} while timed: I/O path {cpu:.1} us CPU per I/O, waited for a CPU \
                     {wait:.0} ms/s ({per_wake:.0} us per wakeup); vCPU waited {vcpu:.0} ms/s"
                );
            }
        }
        match r.case(bench, "qemu") {
            Some(q) => println!(
                "{bench}: guest-measured IOPS ringvm {:.0} (lat {:.0} us), qemu {:.0} (lat {:.0} us), \
                 ringvm/qemu {:.2}x",
                c.ops_per_sec,
                lat(rkey),
                q.ops_per_sec,
                lat("qemu"),
                r.ratio(c, benches::Role::Peer).unwrap_or(f64::NAN)
            ),
            None => println!(
                "{bench}: guest-measured IOPS ringvm {:.0} (lat {:.0} us); qemu NOT MEASURED",
                c.ops_per_sec,
                lat(rkey)
            ),
        }
    }
    // The target: ahead of QEMU's in-process I/O thread on both workloads.
    for (bench, _) in benches {
        r.check(bench, rkey, benches::Role::Peer, 1.1);
    }
    if qemu_missing {
        std::process::exit(1);
    }
}

/// ringvm from $RINGVM_BIN, else built here (a bench of the binary measures the current one).
fn ringvm_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("RINGVM_BIN") {
        return PathBuf::from(bin);
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "vmm", "--bin", "ringvm"])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release -p vmm failed");
    target_dir().join("release/ringvm")
}

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
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
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
