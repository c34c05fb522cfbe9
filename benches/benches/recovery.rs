//! Self-healing, timed: how long a guest's block I/O waits when the block device process is
//! killed, from the kill to the first request the restarted process completes.
//!
//! One `ringvm run --rwdisk IMG --device-restarts 1000/1` of the test guest's `blk-verify`
//! scenario (guest/test/blk_verify.c: a CPL3 polling write/read-verify loop at QD 32 on a raw
//! 16 MiB image, buffered) while this bench kills the block device process with SIGKILL again
//! and again, 50–200 ms (random) after the previous recovery, 1 + N times (N = 50; 10 with
//! `--quick`; `RINGVM_BENCH_ROUNDS` sets N). The harness takes the first kill as its warm-up
//! and the others as its rounds (one kill each); the figures count every kill.
//!
//! Each recovery is timed on the host, from just before `kill(2)` to the first poll that sees
//! the device's completed-request counter move past its value at the old process's death.
//! The counter is queue 0's request count in the device's statistics page
//! (virtio/src/stats.rs), which the VMM keeps across restarts and every process of the device
//! counts in; the bench maps it read-only from `/proc/<device>/fd/<--stats-fd>` and polls it
//! every ~200 µs, at SCHED_FIFO priority so that a poll does not wait for a CPU behind what it
//! times (a short sleep, not a busy loop: the polling guest's vCPU already keeps one of the
//! machine's two cores busy, and the device needs the other). A request is counted when its
//! I/O is done, just before it goes into the used ring. Polling `ringvm stats --json` instead
//! would cost a process start and a control-socket round trip through the VMM's main thread,
//! which is the thread that restarts the device: milliseconds, and in the way of what it
//! measures. A poll that sees the old process's end only once its successor exists came too
//! late to take the old count, and fails the bench. Every ~1 ms the bench also stamps where
//! the time goes: the old process's end (its pidfd turns readable), the new process's clone (a
//! new child of the VMM's main thread) and its exec (its cmdline becomes `ringvm device
//! block`); what follows the exec is the device's start, the vhost-user replay and the
//! resubmission of the requests that were in flight.
//!
//! The guest reports the longest gap it saw between two completions (`max_stall_us`) and the
//! gaps over 5 ms (count, median, p99); a second VM then runs the same loop for as long without
//! kills, whose stalls are the host's scheduling alone (the `quiet_` figures), to read the
//! first against. The guest checks every block it wrote: any I/O error, mismatch, request
//! completed twice or lost (no completion for 10 s) fails the bench, as do a kill that was not
//! reported as a restart, a restarted process counting in another page, or an error counted by
//! the device.
//!
//! The table's ns/op is the rounds' median recovery; the JSON line
//! (`<target>/bench/recovery.jsonl`) carries the median, p99 (nearest rank: with 51 kills, the
//! largest) and max over every kill, the phases' medians, the guest's figures and the poll
//! interval; stderr has a line per kill. PASS/MISS lines check the goals of issue 16: median
//! <= 10 ms, p99 <= 50 ms.
//!
//! `cargo bench -p benches --bench recovery [-- --quick]`; ringvm is $RINGVM_BIN, else
//! `<target>/release/ringvm` built now.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead as _, BufReader};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use benches::process::{kill_tree, ringvm_release, test_guest};
use benches::{bench_dir, Config, Runner, Variant};
use memory::SharedCounters;
use virtio::stats::{Snapshot, COUNTERS};

const QD: u32 = 32;
const IMAGE_BYTES: u64 = 16 << 20;
/// Kills measured in a full run and with `--quick` (one more is the warm-up).
const KILLS: usize = 50;
const QUICK_KILLS: usize = 10;
/// The wait before each kill, after the previous recovery: uniform in this range, ms.
const GAP_MS: (u64, u64) = (50, 200);
/// The guest's timed loop lasts this long per kill, plus [`LOOP_SLACK`]: room for the gap
/// and a slow recovery, so the kills end before the loop does.
const LOOP_PER_KILL: Duration = Duration::from_millis(260);
const LOOP_SLACK: Duration = Duration::from_millis(1500);
/// A recovery slower than this fails the bench (the guest gives up after 10 s too).
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// The sleep between two polls of the counter.
const POLL: Duration = Duration::from_micros(200);
/// Every this many polls, the new process's clone and exec are looked for (~1 ms apart:
/// reading /proc costs more than a poll).
const PROBE_EVERY: u32 = 5;
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// Goals (issue 16).
const GOAL_MEDIAN_MS: f64 = 10.0;
const GOAL_P99_MS: f64 = 50.0;

const BENCH: &str = "kill-to-first-completion/raw-qd32";
const KEY: &str = "ringvm";

fn main() {
    let env = Config::from_env();
    let kills = std::env::var("RINGVM_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.trim().parse::<usize>().ok())
        .filter(|r| *r > 0)
        .unwrap_or(if env.quick { QUICK_KILLS } else { KILLS });
    // One kill per round; the warm-up is one kill (a warm-up of ~0 stops after one call).
    let config = Config {
        measure: Duration::from_nanos(kills as u64),
        warmup: Duration::from_nanos(1),
        rounds: kills,
        ..env
    };
    let mut r = Runner::with_config("recovery", config);
    if !r.enabled(BENCH) {
        r.finish_before_checks();
        return;
    }
    let dir = bench_dir().expect("target/bench");
    let bin = ringvm_release().unwrap_or_else(|e| panic!("{e}"));
    let guest = test_guest(&dir.join("test-guest-recovery"));
    let image = dir.join("recovery-16M.raw");
    File::create(&image)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .expect("create the bench image");

    // The same loop without kills, after: how long the guest's stalls are on this machine
    // anyway (the host's scheduling), to read the stalls with kills against.
    let runs = measure(&bin, &guest, &image, kills + 1, kills + 1).and_then(|run| {
        let quiet = measure(&bin, &guest, &image, kills + 1, 0)?;
        Ok((run, quiet.guest))
    });
    let _ = fs::remove_file(&image);
    let (run, quiet) = match runs {
        Ok(runs) => runs,
        Err(e) => {
            println!("FAIL {BENCH}: {e}");
            std::process::exit(1);
        }
    };
    let opt_ms =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64() * 1e3));
    for (i, k) in run.kills.iter().enumerate() {
        eprintln!(
            "recovery: kill {i:2}: ms from the kill: ended {}, reported {}, cloned {}, exec'd {}, \
             first completion {}",
            opt_ms(Some(k.dead)),
            opt_ms(k.noticed),
            opt_ms(k.cloned),
            opt_ms(k.execed),
            opt_ms(Some(k.recovery))
        );
    }

    // The harness takes one kill per call: the first is its warm-up, the rest its rounds.
    let samples = RefCell::new(
        run.kills
            .iter()
            .map(|k| k.recovery)
            .collect::<VecDeque<_>>(),
    );
    r.compare(
        BENCH,
        vec![Variant::subject(
            KEY,
            "SIGKILL of the block process -> the new one's first completed request",
            |n| {
                (0..n)
                    .map(|_| samples.borrow_mut().pop_front().expect("one kill per call"))
                    .sum()
            },
        )],
    );
    // Every kill counts in the figures, the first too (the table's rounds leave it out: it is
    // the harness's warm-up).
    let measured = &run.kills[..];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let recovery = Percentiles::of(measured.iter().map(|k| ms(k.recovery)).collect());
    let phase = |f: fn(&Kill) -> Option<Duration>| {
        Percentiles::of(measured.iter().filter_map(f).map(ms).collect())
    };
    let dead = phase(|k| Some(k.dead));
    let noticed = phase(|k| k.noticed);
    let cloned = phase(|k| k.cloned);
    let execed = phase(|k| k.execed);
    // The polling's own CPU time over the time it polled: what it took from the processes
    // it timed, at worst.
    let poll_cpu_share = measured
        .iter()
        .map(|k| k.poll_cpu.as_secs_f64())
        .sum::<f64>()
        / measured
            .iter()
            .map(|k| k.recovery.as_secs_f64())
            .sum::<f64>();
    let poll_gap = Percentiles::of(
        measured
            .iter()
            .map(|k| k.poll_gap.as_secs_f64() * 1e6)
            .collect(),
    );
    let g = &run.guest;
    let figures = [
        ("kills", measured.len() as f64),
        ("recovery_median_ms", recovery.median),
        ("recovery_p99_ms", recovery.p99),
        ("recovery_max_ms", recovery.max),
        ("recovery_min_ms", recovery.min),
        ("first_kill_ms", ms(run.kills[0].recovery)),
        ("dead_median_ms", dead.median),
        ("noticed_median_ms", noticed.median),
        ("cloned_median_ms", cloned.median),
        ("execed_median_ms", execed.median),
        ("poll_gap_median_us", poll_gap.median),
        ("poll_gap_max_us", poll_gap.max),
        ("poll_cpu_share", poll_cpu_share),
        ("guest_max_stall_ms", g.max_stall_us / 1e3),
        ("guest_stalls_over_5ms", g.stalls),
        ("guest_stall_median_ms", g.stall_median_us / 1e3),
        ("guest_stall_p99_ms", g.stall_p99_us / 1e3),
        ("guest_writes", g.writes),
        ("guest_reads", g.reads),
        ("guest_final_checked", g.final_checked),
        ("guest_errors", g.errors),
        ("guest_mismatches", g.mismatches),
        ("quiet_guest_max_stall_ms", quiet.max_stall_us / 1e3),
        ("quiet_guest_stalls_over_5ms", quiet.stalls),
        ("quiet_guest_stall_p99_ms", quiet.stall_p99_us / 1e3),
        ("qd", f64::from(QD)),
    ];
    for (key, value) in figures {
        r.annotate(BENCH, KEY, key, value);
    }
    r.finish_before_checks();
    println!(
        "{BENCH}: {} kills, kill -> first completed request: median \
         {:.2} ms, p99 {:.2} ms, max {:.2} ms, min {:.2} ms (polled every {:.0} us, median; \
         the polling took {:.1}% of a CPU)",
        measured.len(),
        recovery.median,
        recovery.p99,
        recovery.max,
        recovery.min,
        poll_gap.median,
        poll_cpu_share * 100.0
    );
    println!(
        "{BENCH}: medians from the kill: old process ended {:.2} ms, VMM reported the death \
         {:.2} ms, new process cloned {:.2} ms, exec'd {:.2} ms, first completion {:.2} ms",
        dead.median, noticed.median, cloned.median, execed.median, recovery.median
    );
    println!(
        "{BENCH}: guest: {}; writes {} reads {} final checks {}, errors {} mismatches {}",
        g.stalls_text(),
        g.writes,
        g.reads,
        g.final_checked,
        g.errors,
        g.mismatches
    );
    println!(
        "{BENCH}: guest without kills (the same loop, next): {}",
        quiet.stalls_text()
    );
    for (what, value, goal) in [
        ("median", recovery.median, GOAL_MEDIAN_MS),
        ("p99", recovery.p99, GOAL_P99_MS),
    ] {
        println!(
            "{} {BENCH}: {what} {value:.2} ms, target <= {goal:.0} ms",
            if value <= goal { "PASS" } else { "MISS" }
        );
    }
}

/// One kill, timed from just before `kill(2)` (`at`).
#[derive(Debug, Clone, Copy)]
struct Kill {
    at: Instant,
    /// The first poll that saw the counter past its value at the old process's end.
    recovery: Duration,
    /// The old process's pidfd turned readable.
    dead: Duration,
    /// The VMM's `restarting it` line reached this bench.
    noticed: Option<Duration>,
    /// A new child of the VMM was there / had exec'd `ringvm device block` (by the poll
    /// that saw it; `execed` alone when both happened between two polls).
    cloned: Option<Duration>,
    execed: Option<Duration>,
    /// The time between the poll that saw the completion and the one before it.
    poll_gap: Duration,
    /// The CPU time the polling took, from the kill to the completion.
    poll_cpu: Duration,
}

/// What the guest's blk-verify reported.
#[derive(Debug, Default)]
struct GuestFigures {
    writes: f64,
    reads: f64,
    final_checked: f64,
    errors: f64,
    mismatches: f64,
    max_stall_us: f64,
    stalls: f64,
    stall_median_us: f64,
    stall_p99_us: f64,
}

impl GuestFigures {
    /// The guest keeps the first this many stalls (guest/test/blk_verify.c, `BV_GAPS`): their
    /// median and p99 are of those.
    const STALLS_KEPT: f64 = 256.0;

    fn stalls_text(&self) -> String {
        let (count, of) = if self.stalls >= Self::STALLS_KEPT {
            ("at least 256".to_owned(), " of the first 256")
        } else {
            (self.stalls.to_string(), "")
        };
        format!(
            "longest stall {:.2} ms; stalls over 5 ms: {count} (median {:.2} ms, p99 {:.2} ms{of})",
            self.max_stall_us / 1e3,
            self.stall_median_us / 1e3,
            self.stall_p99_us / 1e3
        )
    }
}

struct Run {
    kills: Vec<Kill>,
    guest: GuestFigures,
}

/// Boots the guest with a loop long enough for `room` kills, kills its block process `kills`
/// times (0 or `room`) and waits for its verdict.
fn measure(
    bin: &Path,
    guest: &Path,
    image: &Path,
    room: usize,
    kills: usize,
) -> Result<Run, String> {
    let room = u32::try_from(room).map_err(|_| "too many kills".to_owned())?;
    let loop_ms = (LOOP_PER_KILL * room + LOOP_SLACK).as_millis();
    let params = format!(
        "ringvm.test=rtc,blk-verify ringvm.blkverify.qd={QD} ringvm.blkverify.ms={loop_ms}"
    );
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--device-restarts", "1000/1", "--no-rng", "--rwdisk"])
        .arg(image)
        .args(["-p", &params])
        .arg(guest);
    let mut vm = Vm::start(cmd)?;
    vm.wait_for("blk-verify running", BOOT_LIMIT)?;
    let vmm = vm.child.id();
    // Not device processes: the respawner, and the killed ones (until they are reaped).
    let mut skip: Vec<u32> = children(vmm)
        .into_iter()
        .filter(|p| comm(*p).as_deref() == Some("ringvm-respawn"))
        .collect();
    let mut killed = Vec::with_capacity(kills);
    let mut device = single_device(vmm, &skip)?;
    let page = StatsPage::of_device(device)?;
    set_timer_slack();
    let mut out = Vec::with_capacity(kills);
    // The polls must not wait for a CPU behind the processes they time (on a busy machine a
    // poll that comes late times the recovery too long).
    let realtime = (kills > 0).then(Realtime::enter).transpose()?;
    for n in 0..kills {
        std::thread::sleep(Duration::from_millis(
            GAP_MS.0 + random_below(GAP_MS.1 - GAP_MS.0),
        ));
        if let Some(line) = vm.ended_line() {
            return Err(format!(
                "the guest's loop ended after {n} of {kills} kills ({line})\n{}",
                vm.output()
            ));
        }
        let kill = kill_once(vmm, &page, device, &skip)
            .map_err(|e| format!("kill {}: {e}\n{}", n + 1, vm.output()))?;
        skip.push(device);
        killed.push(device);
        device = single_device(vmm, &skip)?;
        // The new process counts in the same page (the same memfd).
        if StatsPage::ino_of_device(device)? != page.ino {
            return Err(format!(
                "the restarted process {device} counts in another statistics page"
            ));
        }
        out.push(kill);
    }
    drop(realtime);
    let counted = page.snapshot()?.queues[0];
    vm.wait_for("ringvm-test: done", LOOP_PER_KILL * room + BOOT_LIMIT)?;
    let status = vm.finish(Duration::from_secs(20))?;
    let guest = guest_figures(&vm.seen).map_err(|e| format!("{e}\n{}", vm.output()))?;
    let stderr = vm.stderr_text();
    if !status.success() {
        return Err(format!("ringvm ended with {status}:\n{stderr}"));
    }
    // Every kill was seen as a death and restarted.
    let restarts = stderr.matches("; restarting it (").count();
    if restarts != kills {
        return Err(format!("{kills} kills, {restarts} restarts:\n{stderr}"));
    }
    if counted.errors != 0 {
        return Err(format!(
            "the device counted {} failed requests",
            counted.errors
        ));
    }
    for (pid, k) in killed.iter().zip(&mut out) {
        let line = format!("(pid {pid}) killed by signal 9 (SIGKILL); restarting it");
        let Some(seen) = vm.stderr_at(&line) else {
            return Err(format!("no restart reported for pid {pid}:\n{stderr}"));
        };
        k.noticed = seen.checked_duration_since(k.at);
    }
    Ok(Run { kills: out, guest })
}

/// Kills `device` and polls until the process started in its place has completed a request.
fn kill_once(vmm: u32, page: &StatsPage, device: u32, skip: &[u32]) -> Result<Kill, String> {
    let pidfd = pidfd_open(device)?;
    let cpu_at = thread_cpu_time();
    let at = Instant::now();
    // SAFETY: a plain syscall on a process of the VM this bench started (its pidfd, just
    // opened, keeps the pid from being reused).
    if unsafe { libc::kill(device as libc::pid_t, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill {device}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // When the old process had ended, and its count then.
    let mut ended: Option<(Duration, u64)> = None;
    let (mut cloned, mut execed, mut new) = (None, None, None);
    let mut last = at;
    let mut polls = 0u32;
    loop {
        let now = Instant::now();
        let requests = page.snapshot()?.queues[0].requests;
        polls += 1;
        match ended {
            None => {
                if exited(&pidfd) {
                    // Nothing counts in the dead process any more: the next count is the new
                    // process's. (Its count now may include requests it finished after the
                    // kill() call: they are not the new process's.) A process already started
                    // in its place means this poll came late, and the new process may have
                    // counted already: the recovery would be timed too long. None there now,
                    // one started from here on cannot have counted by the read that follows.
                    if new_device(vmm, device, skip).is_some() {
                        return Err(format!(
                            "the bench saw the end of {device} {:?} after the kill, once its \
                             successor was there: it did not get the CPU to poll in time",
                            now - at
                        ));
                    }
                    ended = Some((now - at, page.snapshot()?.queues[0].requests));
                }
            }
            Some((dead, base)) if requests > base => {
                return Ok(Kill {
                    at,
                    recovery: now - at,
                    dead,
                    noticed: None,
                    cloned,
                    execed,
                    poll_gap: now - last,
                    poll_cpu: thread_cpu_time().saturating_sub(cpu_at),
                });
            }
            Some(_) if polls.is_multiple_of(PROBE_EVERY) => {
                if new.is_none() {
                    new = new_device(vmm, device, skip);
                    if new.is_some() {
                        cloned = Some(now - at);
                    }
                }
                if let (Some(pid), None) = (new, execed) {
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if cmdline.windows(13).any(|w| w == b"device\0block\0") {
                        execed = Some(now - at);
                    }
                }
            }
            Some(_) => {}
        }
        if now - at > RECOVERY_LIMIT {
            return Err(format!(
                "no request completed within {RECOVERY_LIMIT:?} of the kill of {device} \
                 (ended: {}, new process: {new:?})",
                ended.is_some()
            ));
        }
        last = now;
        std::thread::sleep(POLL);
    }
}

/// The guest's figures from its serial output; an error unless blk-verify (and rtc, whose TSC
/// rate converts its times) passed with no failed, mismatched, doubled or foreign request.
fn guest_figures(seen: &str) -> Result<GuestFigures, String> {
    for scenario in ["rtc", "blk-verify"] {
        if !seen.contains(&format!("ringvm-test: {scenario} ok")) {
            return Err(format!("the guest's {scenario} did not pass"));
        }
    }
    let line = |prefix: &str| seen.lines().find(|l| l.contains(prefix));
    let field = |line: &str, name: &str| -> Option<f64> {
        line.split([' ', ','])
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let counts = line("blk-verify writes=").ok_or("no blk-verify result line")?;
    let get = |name: &str| field(counts, name).ok_or_else(|| format!("no {name}= in {counts:?}"));
    let mut g = GuestFigures {
        writes: get("writes")?,
        reads: get("reads")?,
        final_checked: get("final")?,
        errors: get("errors")?,
        mismatches: get("mismatches")?,
        max_stall_us: get("max_stall_us")?,
        ..GuestFigures::default()
    };
    let failed = g.errors + g.mismatches + get("doubled")? + get("bad_id")?;
    if failed > 0.0 || g.writes == 0.0 || g.final_checked == 0.0 {
        return Err(format!("the guest's I/O went wrong: {counts}"));
    }
    if let Some(stalls) = line("blk-verify stalls over") {
        g.stalls = stalls
            .split_once(" us: ")
            .and_then(|(_, rest)| rest.split(',').next()?.trim().parse().ok())
            .ok_or_else(|| format!("no count in {stalls:?}"))?;
        g.stall_median_us = field(stalls, "median_us").unwrap_or(f64::NAN);
        g.stall_p99_us = field(stalls, "p99_us").unwrap_or(f64::NAN);
    }
    Ok(g)
}

/// Median, p99 (nearest rank), min and max; NaN when empty.
struct Percentiles {
    median: f64,
    p99: f64,
    min: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Percentiles {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Percentiles {
                median: f64::NAN,
                p99: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = ((n as f64 * 0.99).ceil() as usize).clamp(1, n);
        Percentiles {
            median,
            p99: v[rank - 1],
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// The running VM: its serial console read line by line, its stderr kept with the time each
/// line came; killed with its processes when dropped (every way out of the bench).
struct Vm {
    child: Child,
    ended: bool,
    lines: mpsc::Receiver<String>,
    seen: String,
    stderr: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Vm {
    fn start(mut cmd: Command) -> Result<Vm, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let (stdout, stderr_pipe) = (child.stdout.take(), child.stderr.take());
        let (tx, lines) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = stderr_pipe.map(|err| {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(err);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let at = Instant::now();
                    if let Ok(mut v) = keep.lock() {
                        v.push((at, std::mem::take(&mut line)));
                    }
                }
            })
        });
        Ok(Vm {
            child,
            ended: false,
            lines,
            seen: String::new(),
            stderr,
            stderr_reader,
        })
    }

    fn take(&mut self, line: String) {
        self.seen.push_str(&line);
        self.seen.push('\n');
    }

    /// Waits up to `limit` for a serial line containing `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.take(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => break,
            }
        }
        // Its console closed or the time is up: say whether it ended (give an exit a moment).
        let deadline = Instant::now() + Duration::from_secs(2);
        let state = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.ended = true;
                    break format!("ringvm ended with {status}");
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break "ringvm still runs".to_owned(),
            }
        };
        Err(format!(
            "no serial line with {needle:?} within {limit:?} ({state})\n{}",
            self.output()
        ))
    }

    /// A serial line that says the guest's loop is over, if one came.
    fn ended_line(&mut self) -> Option<String> {
        let mut ended = None;
        while let Ok(line) = self.lines.try_recv() {
            if ended.is_none()
                && (line.contains("blk-verify writes=")
                    || line.contains(" FAIL")
                    || line.contains("ringvm-test: done"))
            {
                ended = Some(line.clone());
            }
            self.take(line);
        }
        ended
    }

    /// Waits up to `limit` for ringvm to end by itself.
    fn finish(&mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.ended = true;
                    if let Some(reader) = self.stderr_reader.take() {
                        let _ = reader.join();
                    }
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => return Err(format!("ringvm did not end within {limit:?}")),
                Err(e) => return Err(format!("cannot wait for ringvm: {e}")),
            }
        }
    }

    /// When the first stderr line containing `needle` came.
    fn stderr_at(&self, needle: &str) -> Option<Instant> {
        let lines = self.stderr.lock().ok()?;
        lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(at, _)| *at)
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .map(|v| v.iter().map(|(_, l)| l.as_str()).collect())
            .unwrap_or_default()
    }

    /// The serial output so far and the last lines of stderr, for an error.
    fn output(&mut self) -> String {
        let _ = self.ended_line();
        let err = self.stderr_text();
        let tail: Vec<&str> = err.lines().collect();
        format!(
            "serial:\n{}stderr (last lines):\n{}",
            self.seen,
            tail[tail.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Once reaped, its pid may be another process's: only a live VM is killed.
        if !self.ended {
            kill_tree(&mut self.child);
        }
    }
}

/// A device's statistics page (virtio/src/stats.rs), mapped with `memory::SharedCounters`
/// from the memfd the device process holds as `--stats-fd N`.
struct StatsPage {
    counters: SharedCounters,
    ino: u64,
}

impl StatsPage {
    /// `/proc/<pid>/fd/<its --stats-fd>`.
    fn path_of_device(pid: u32) -> Result<PathBuf, String> {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| format!("/proc/{pid}/cmdline: {e}"))?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let fd = args
            .windows(2)
            .find(|w| w[0] == b"--stats-fd")
            .and_then(|w| std::str::from_utf8(w[1]).ok()?.parse::<u32>().ok())
            .ok_or_else(|| format!("device process {pid} has no --stats-fd"))?;
        Ok(PathBuf::from(format!("/proc/{pid}/fd/{fd}")))
    }

    fn ino_of_device(pid: u32) -> Result<u64, String> {
        let path = Self::path_of_device(pid)?;
        fs::metadata(&path)
            .map(|m| m.ino())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn of_device(pid: u32) -> Result<StatsPage, String> {
        let path = Self::path_of_device(pid)?;
        // Read and write, as the device maps it (memory::SharedCounters); only read here.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let ino = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .ino();
        let counters = SharedCounters::from_fd(file.into(), COUNTERS)
            .map_err(|e| format!("{}: not a statistics page: {e}", path.display()))?;
        let page = StatsPage { counters, ino };
        page.snapshot()?;
        Ok(page)
    }

    /// The page's counters now; an error if it does not carry the layout's mark.
    fn snapshot(&self) -> Result<Snapshot, String> {
        Snapshot::read(self.counters.as_slice(), 1)
            .ok_or_else(|| "the statistics page has no mark".to_owned())
    }
}

/// A child of the VMM that is neither `device` nor in `skip`: the process started in its
/// place. Read from the VMM's main thread, which starts every device process (the respawner
/// clones with `CLONE_PARENT`).
fn new_device(vmm: u32, device: u32, skip: &[u32]) -> Option<u32> {
    fs::read_to_string(format!("/proc/{vmm}/task/{vmm}/children"))
        .ok()?
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| *p != device && !skip.contains(p))
}

/// The children of `pid` (of any of its threads).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// The VMM's one device process that is not in `skip` (killed ones, which may not be reaped
/// yet, and the respawner), waiting for it to be there.
fn single_device(vmm: u32, skip: &[u32]) -> Result<u32, String> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        let found: Vec<u32> = children(vmm)
            .into_iter()
            .filter(|p| !skip.contains(p))
            .collect();
        if let [one] = found[..] {
            return Ok(one);
        }
        if Instant::now() > deadline {
            return Err(format!("no single device process under the VMM: {found:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, String> {
    // SAFETY: a plain syscall with no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(format!(
            "pidfd_open {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process of `pidfd` has ended (its pidfd is readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// This thread under SCHED_FIFO (priority 1) until dropped: it polls ahead of every ordinary
/// task. Each poll is a few microseconds of work, then a sleep.
struct Realtime;

impl Realtime {
    fn enter() -> Result<Realtime, String> {
        Self::set(libc::SCHED_FIFO, 1).map(|()| Realtime)
    }

    fn set(policy: libc::c_int, priority: libc::c_int) -> Result<(), String> {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: `param` is a valid sched_param that outlives the call.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            return Err(format!(
                "sched_setscheduler({policy}, {priority}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        let _ = Self::set(libc::SCHED_OTHER, 0);
    }
}

/// This thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Sleeps of this thread end within 1 µs of their time (the default slack is 50 µs).
fn set_timer_slack() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
}

/// A random number below `n` (std's per-map random hash keys: no seed to keep).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % n.max(1)
}
