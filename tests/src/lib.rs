//! End-to-end tests of the real `ringvm` binary live in `tests/`; this library holds their
//! shared helpers.
//!
//! The purpose-built test guest (guest/test, see its README) is built by this crate's build
//! script: [`test_guest_path`] is the ELF to boot. Its serial output is lines
//! `ringvm-test: <scenario> ok`, `ringvm-test: <scenario> FAIL <reason>`, detail lines, and
//! finally `ringvm-test: done`, after which it resets the machine through the i8042 (exit
//! status 0). [`GuestReport`] parses that; [`GuestCmdline`] builds its command line;
//! [`run_guest`] runs a VMM with a time limit and collects the serial console.

mod gdb;
pub mod heal;
pub mod hostile;
pub mod netns;

use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub use gdb::{gdb_run, Step};

/// The test guest ELF (ELF64, PVH entry note, loaded at 1 MiB), built from guest/test.
pub fn test_guest_path() -> &'static Path {
    Path::new(env!("RINGVM_TEST_GUEST"))
}

/// Every serial line of the test guest starts with this.
pub const LINE_PREFIX: &str = "ringvm-test: ";

/// The scenarios `ringvm.test=all` runs, in its order.
pub const SCENARIOS: &[&str] = &["hello", "cpuid", "e820", "rtc", "smp", "compute"];

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// The `ringvm` binary beside the running test executable (`target/<profile>/ringvm`), or
/// `$RINGVM_BIN`. Panics with a hint when it is missing.
pub fn ringvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGVM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("ringvm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p vmm, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// The test guest's kernel command line: `ringvm.test=a,b ringvm.<key>=<value> ...`.
#[derive(Debug, Clone, Default)]
pub struct GuestCmdline {
    tests: Vec<String>,
    options: Vec<(String, String)>,
    extra: Vec<String>,
}

impl GuestCmdline {
    /// An empty command line (the guest then runs `all`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a scenario (`hello`, `cpuid`, `e820`, `rtc`, `smp`, `compute`, `all`, `ud2`).
    pub fn test(mut self, name: &str) -> Self {
        self.tests.push(name.to_owned());
        self
    }

    /// `ringvm.<key>=<value>`.
    pub fn option(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.options.push((key.to_owned(), value.to_string()));
        self
    }

    /// smp fails unless the MP table lists exactly `n` CPUs.
    pub fn expect_cpus(self, n: u32) -> Self {
        self.option("expect.cpus", n)
    }

    /// e820 fails unless the RAM entries add up to `mib` MiB, less at most 4 MiB of holes.
    pub fn expect_mem_mib(self, mib: u64) -> Self {
        self.option("expect.mem_mib", mib)
    }

    /// cpuid fails unless the hypervisor signature (leaf 0x4000_0000) is `sig`, e.g. `KVMKVMKVM`.
    pub fn expect_hypervisor(self, sig: &str) -> Self {
        self.option("expect.hv", sig)
    }

    /// Iterations of compute's xorshift loop (default 200 million; its result is only checked
    /// at the default).
    pub fn compute_iters(self, n: u64) -> Self {
        self.option("compute.iters", n)
    }

    /// Any other word, passed through unchanged (e.g. `console=ttyS0`).
    pub fn word(mut self, w: &str) -> Self {
        self.extra.push(w.to_owned());
        self
    }
}

impl fmt::Display for GuestCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = Vec::new();
        if !self.tests.is_empty() {
            words.push(format!("ringvm.test={}", self.tests.join(",")));
        }
        words.extend(self.options.iter().map(|(k, v)| format!("ringvm.{k}={v}")));
        words.extend(self.extra.iter().cloned());
        f.write_str(&words.join(" "))
    }
}

/// How one scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `ringvm-test: <name> ok`
    Ok,
    /// `ringvm-test: <name> FAIL <reason>`
    Fail(String),
}

/// The test guest's serial output, parsed.
#[derive(Debug, Clone, Default)]
pub struct GuestReport {
    /// Every `ringvm-test:` line with the prefix (and anything before it) removed.
    pub lines: Vec<String>,
    /// Scenario results in the order they were printed.
    pub results: Vec<(String, Outcome)>,
    /// `ringvm-test: done` was printed: the guest finished its list without crashing.
    pub done: bool,
    /// The `exception ...` line the guest printed on an unexpected exception, if any.
    pub exception: Option<String>,
    /// The whole output, for messages.
    pub raw: String,
}

impl GuestReport {
    /// Parses serial output. Lines not carrying [`LINE_PREFIX`] are ignored; `\r` is dropped.
    pub fn parse(serial: &str) -> Self {
        let mut r = GuestReport {
            raw: serial.to_owned(),
            ..Default::default()
        };
        for line in serial.lines() {
            let Some(pos) = line.find(LINE_PREFIX) else {
                continue;
            };
            let rest = line[pos + LINE_PREFIX.len()..].trim_end_matches(['\r', ' ']);
            r.lines.push(rest.to_owned());
            if rest == "done" {
                r.done = true;
                continue;
            }
            if let Some(e) = rest.strip_prefix("exception ") {
                r.exception = Some(e.to_owned());
                continue;
            }
            let Some((name, tail)) = rest.split_once(' ') else {
                continue;
            };
            if tail == "ok" {
                r.results.push((name.to_owned(), Outcome::Ok));
            } else if tail == "FAIL" {
                r.results
                    .push((name.to_owned(), Outcome::Fail(String::new())));
            } else if let Some(why) = tail.strip_prefix("FAIL ") {
                r.results
                    .push((name.to_owned(), Outcome::Fail(why.to_owned())));
            }
        }
        r
    }

    /// The outcome of `name` (its last one, if it ran more than once).
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.results
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, o)| o)
    }

    /// `(scenario, reason)` of every failure.
    pub fn failures(&self) -> Vec<(&str, &str)> {
        self.results
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Fail(why) => Some((n.as_str(), why.as_str())),
                Outcome::Ok => None,
            })
            .collect()
    }

    /// The guest finished, nothing failed, and every scenario in `names` reported ok.
    pub fn all_ok(&self, names: &[&str]) -> bool {
        self.done
            && self.exception.is_none()
            && self.failures().is_empty()
            && names.iter().all(|n| self.outcome(n) == Some(&Outcome::Ok))
    }

    /// Panics, showing the whole output, unless [`GuestReport::all_ok`].
    pub fn assert_ok(&self, names: &[&str]) {
        assert!(
            self.all_ok(names),
            "test guest: expected {names:?} ok and `done`; failures {:?}, exception {:?}, done {}\n--- serial ---\n{}",
            self.failures(),
            self.exception,
            self.done,
            self.raw
        );
    }

    /// Detail lines of a scenario (`<name> ...` lines other than its result), prefix removed.
    pub fn details(&self, name: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
                (rest != "ok" && !rest.starts_with("FAIL")).then_some(rest)
            })
            .collect()
    }

    /// The first `key=value` word in `name`'s detail lines, e.g. `value("cpuid", "vendor")`.
    pub fn value(&self, name: &str, key: &str) -> Option<&str> {
        self.details(name).into_iter().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        })
    }

    /// `(listed, online)` from smp's `cpus N online M` line.
    pub fn smp_cpus(&self) -> Option<(u32, u32)> {
        self.details("smp").into_iter().find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next()?, w.next()?, w.next()?, w.next()?) {
                ("cpus", n, "online", m) => Some((n.parse().ok()?, m.parse().ok()?)),
                _ => None,
            }
        })
    }
}

/// A finished (or killed) guest run.
#[derive(Debug)]
pub struct GuestRun {
    /// `None` when the run was killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl GuestRun {
    /// The guest report parsed from stdout (the serial console).
    pub fn report(&self) -> GuestReport {
        GuestReport::parse(&self.stdout)
    }

    /// Ended by itself within the limit with exit status 0.
    pub fn exited_cleanly(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Asserts [`GuestRun::exited_cleanly`], showing the status and both outputs otherwise.
    pub fn assert_clean(&self) {
        assert!(
            self.exited_cleanly(),
            "ringvm status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// The arguments of `ringvm run ARGS -p CMDLINE <the test guest>`, after the binary.
pub fn test_guest_args(args: &[&str], cmdline: &GuestCmdline) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into()];
    v.extend(args.iter().map(OsString::from));
    v.extend(["-p".into(), cmdline.to_string().into()]);
    v.push(test_guest_path().into());
    v
}

/// `ringvm run ARGS -p CMDLINE <the test guest>`.
pub fn ringvm_run(args: &[&str], cmdline: &GuestCmdline) -> Command {
    let mut c = Command::new(ringvm_bin());
    c.args(test_guest_args(args, cmdline));
    c
}

/// The lines of `r` as they come, read on a thread of their own (until `r` ends or the
/// receiver is dropped).
pub fn lines_of<R: Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A running VMM whose stdout (the serial console) is read line by line as it comes; killed
/// when dropped, so a test that fails half-way leaves no VM (or device process) behind.
pub struct Live {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Live {
    /// Spawns `cmd` with stdin closed and stdout and stderr piped.
    pub fn start(cmd: &mut Command) -> Live {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringvm");
        let lines = lines_of(child.stdout.take().expect("piped stdout"));
        Live {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Waits up to `limit` for a stdout line containing `needle`; panics (killing the
    /// process) with the output so far when none comes.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no line with {needle:?}; stdout so far:\n{}", self.seen);
    }

    /// The stdout lines that come within `limit` (waiting all of it).
    pub fn lines_within(&mut self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    out.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(left);
                    break;
                }
            }
        }
        out
    }

    /// The stdout lines read so far, each ending in a newline.
    pub fn seen(&self) -> &str {
        &self.seen
    }

    /// Waits up to `limit` for the process to end and kills it if it has not; returns
    /// whether it ended by itself, its status and its stderr.
    pub fn end(mut self, limit: Duration) -> (bool, ExitStatus, String) {
        let ended = wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !ended {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait ringvm");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (ended, status, err)
    }

    /// [`Live::end`], asserting the process ended by itself within `limit`.
    pub fn finish(self, limit: Duration) -> (ExitStatus, String) {
        let (ended, status, err) = self.end(limit);
        assert!(ended, "ringvm did not end within {limit:?}; stderr:\n{err}");
        (status, err)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` (a VMM whose serial console is its stdout) with stdin closed, collecting stdout
/// and stderr as it goes (no pipe-buffer stalls), killing it after `limit`.
pub fn run_guest(cmd: &mut Command, limit: Duration) -> std::io::Result<GuestRun> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    Ok(GuestRun {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
    })
}

/// The minimal Linux guest (scripts/build-guest-kernel): builds (or finds cached) vmlinux,
/// bzImage and initrd; returns their directory.
/// Once per test binary: the tests run in parallel threads, and two builds at once would
/// share (and delete) one build directory.
pub fn guest_kernel() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(workspace_root().join("scripts/build-guest-kernel"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-guest-kernel");
        assert!(out.status.success(), "building the guest kernel failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The minimal Linux guest's workarounds for the nested kvm_pvm host (kernel parameters and
/// `--cpu-features`); harmless on hardware KVM.
pub const HOST_PARAMS: &str = "noxsave nofsgsbase clearcpuid=popcnt,smap,erms,fsrm rodata=off";
pub const HOST_CPU_FEATURES: &str = "-cx16,+xsaveerptr";

/// The reference run of the test guest under QEMU (the same PVH boot contract as ringvm):
/// microvm with the RTC and an i8042 added (microvm has neither by default), KVM, the CPU
/// flags the nested kvm_pvm host needs. Not available everywhere: check [`qemu_available`].
pub fn qemu_reference(guest: &Path, cmdline: &str, mem_mib: u64, cpus: u32) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,x-option-roms=off,rtc=on", "-device", "i8042"])
        .args(["-enable-kvm", "-cpu", "qemu64,-cx16,+xsaveerptr"])
        .args(["-m", &mem_mib.to_string(), "-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(guest)
        .args(["-append", cmdline]);
    c
}

/// `qemu-system-x86_64` runs and `/dev/kvm` exists.
pub fn qemu_available() -> bool {
    Path::new("/dev/kvm").exists()
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A scratch directory for one test (`ringvm-<tag>-<pid>-<name>` in the temporary
/// directory), emptied at creation and removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str, name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ringvm-{tag}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pids of `parent`'s children (from /proc): a VMM's device processes (its device
/// respawner, `ringvm-respawn`, left out).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        // The device respawner (`vmm::respawn`) is a helper, not a device.
        let respawner = stat.split_once(" (ringvm-respawn) ").is_some();
        if ppid == Some(parent) && !respawner {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` exists (a zombie counts: it was not reaped).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `done` every few milliseconds until it holds or `limit` passes; its last answer.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    done()
}

/// qemu-storage-daemon exporting `image` (raw, page cache) as a writable vhost-user-blk
/// device on `socket`, listening once this returns (the caller kills it).
pub fn start_qsd_blk(image: &Path, socket: &Path) -> Child {
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0,filename={},cache.direct=off",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon (apt package qemu-system-common)");
    assert!(
        wait_until(Duration::from_secs(20), || socket.exists()),
        "qemu-storage-daemon never listened"
    );
    qsd
}

/// `ringvm device block --socket SOCKET --file SPEC` (jailed: it accepts, then serves from a
/// jailed child), listening once `start` returns (or already serving: a frontend that waits
/// for the path may connect first, and the socket file goes once it is accepted); killed on
/// drop (the jailed child with it, by PR_SET_PDEATHSIG).
pub struct BlockBackend(pub Child);

impl BlockBackend {
    pub fn start(file_spec: impl AsRef<std::ffi::OsStr>, socket: &Path) -> BlockBackend {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(ringvm_bin())
            .args(["device", "block", "--socket"])
            .arg(socket)
            .arg("--file")
            .arg(file_spec)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ringvm device block");
        let pid = child.id();
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()
                || !children_of(pid).is_empty()),
            "the device never listened"
        );
        BlockBackend(child)
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VM whose test guest halts forever (`wait`), with its one jailed device process found;
/// killed when dropped ([`Live`]), so a test that fails half-way leaves no halted VM (or
/// device) behind.
pub struct HaltedVm {
    pub live: Live,
    /// The device process's pid.
    pub device: u32,
}

impl HaltedVm {
    /// `ringvm run EXTRA` with one device (rng unless `extra` says otherwise).
    pub fn start(extra: &[&str]) -> HaltedVm {
        let mut live = Live::start(&mut ringvm_run(extra, &GuestCmdline::new().test("wait")));
        live.wait_for("wait halting", Duration::from_secs(60));
        let devices = children_of(live.child.id());
        assert_eq!(devices.len(), 1, "one device process: {devices:?}");
        HaltedVm {
            device: devices[0],
            live,
        }
    }

    /// Waits up to `limit` for the VM to end by itself, then ends it; its exit code and
    /// stderr.
    pub fn end(self, limit: Duration) -> (Option<i32>, String) {
        let (_, status, err) = self.live.end(limit);
        (status.code(), err)
    }

    /// Waits for the VM to end by itself (failing the test after `limit`); its exit code and
    /// stderr.
    pub fn finish(self, limit: Duration) -> (Option<i32>, String) {
        let (status, err) = self.live.finish(limit);
        (status.code(), err)
    }
}

/// A VM whose test guest lists its PCI functions and halts (`pci`, `wait`), with a control
/// socket: to check a device on the bus, then end the VM with `ringvm stop`. Killed when
/// dropped ([`Live`]).
pub struct StoppableVm {
    pub live: Live,
    control: PathBuf,
}

impl StoppableVm {
    /// `ringvm run EXTRA -s DIR/vm.sock`, up to the guest's halt.
    pub fn start(dir: &Scratch, extra: &[&str]) -> StoppableVm {
        let control = dir.path("vm.sock");
        let control_arg = control.to_string_lossy().into_owned();
        let mut args = extra.to_vec();
        args.extend(["-s", &control_arg]);
        let cmdline = GuestCmdline::new().test("pci").test("wait");
        let mut live = Live::start(&mut ringvm_run(&args, &cmdline));
        live.wait_for("wait halting", Duration::from_secs(60));
        StoppableVm { live, control }
    }

    /// Fails the test unless the guest found PCI function `id` (`1af4:1053`), named `what`.
    pub fn assert_on_bus(&self, id: &str, what: &str) {
        assert!(
            self.live.seen().contains(id),
            "no {what} on the bus:\n{}",
            self.live.seen()
        );
    }

    /// `ringvm stop`, then the VM must end cleanly within `limit`; its stderr.
    pub fn stop(self, limit: Duration) -> String {
        let stop = Command::new(ringvm_bin())
            .arg("stop")
            .arg(&self.control)
            .status()
            .expect("ringvm stop");
        assert!(stop.success(), "ringvm stop failed");
        let (status, stderr) = self.live.finish(limit);
        assert!(status.success(), "ringvm {status:?}: {stderr}");
        stderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn guest_is_an_elf64_with_a_pvh_note_loaded_at_1_mib() {
        let elf = std::fs::read(test_guest_path()).expect("read the test guest");
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(&elf, 18), 62, "EM_X86_64");
        let (phoff, phentsize, phnum) = (
            u64_at(&elf, 32) as usize,
            u16_at(&elf, 54) as usize,
            u16_at(&elf, 56) as usize,
        );
        let mut lowest_load = u64::MAX;
        let mut pvh_entry = None;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..][..phentsize];
            let (p_type, p_offset, p_paddr, p_filesz) = (
                u32_at(ph, 0),
                u64_at(ph, 8) as usize,
                u64_at(ph, 24),
                u64_at(ph, 32) as usize,
            );
            if p_type == 1 {
                lowest_load = lowest_load.min(p_paddr);
            }
            if p_type == 4 {
                let notes = &elf[p_offset..p_offset + p_filesz];
                let mut o = 0;
                while o + 12 <= notes.len() {
                    let (namesz, descsz, ty) = (
                        u32_at(notes, o) as usize,
                        u32_at(notes, o + 4) as usize,
                        u32_at(notes, o + 8),
                    );
                    let name = &notes[o + 12..o + 12 + namesz];
                    let desc = o + 12 + namesz.next_multiple_of(4);
                    if name == b"Xen\0" && ty == 18 {
                        pvh_entry = Some(match descsz {
                            4 => u64::from(u32_at(notes, desc)),
                            _ => u64_at(notes, desc),
                        });
                    }
                    o = desc + descsz.next_multiple_of(4);
                }
            }
        }
        assert_eq!(lowest_load, 0x10_0000);
        let entry = pvh_entry.expect("XEN_ELFNOTE_PHYS32_ENTRY note");
        assert!(
            (0x10_0000..0x1_0000_0000).contains(&entry),
            "entry {entry:#x}"
        );
    }

    #[test]
    fn cmdline_words() {
        let c = GuestCmdline::new()
            .test("hello")
            .test("smp")
            .expect_cpus(2)
            .expect_mem_mib(128)
            .word("console=ttyS0");
        assert_eq!(
            c.to_string(),
            "ringvm.test=hello,smp ringvm.expect.cpus=2 ringvm.expect.mem_mib=128 console=ttyS0"
        );
        assert_eq!(GuestCmdline::new().to_string(), "");
    }

    const SAMPLE: &str = "\
ringvm-test: start (pvh start_info 0xf31e0 version 1, cmdline \"ringvm.test=all\")\r
ringvm-test: hello\r
ringvm-test: hello ok\r
ringvm-test: cpuid vendor=AuthenticAMD max_leaf=0xd max_ext_leaf=0x8000000a
ringvm-test: cpuid ok
ringvm-test: smp cpus 2 online 1
ringvm-test: smp FAIL AP with APIC id 1 did not check in within ~1 s
ringvm-test: summary ok=2 fail=1
ringvm-test: done
";

    #[test]
    fn parses_results_details_and_done() {
        let r = GuestReport::parse(SAMPLE);
        assert!(r.done);
        assert_eq!(r.outcome("hello"), Some(&Outcome::Ok));
        assert_eq!(r.outcome("cpuid"), Some(&Outcome::Ok));
        assert_eq!(
            r.failures(),
            vec![("smp", "AP with APIC id 1 did not check in within ~1 s")]
        );
        assert_eq!(r.outcome("summary"), None);
        assert_eq!(r.value("cpuid", "vendor"), Some("AuthenticAMD"));
        assert_eq!(r.smp_cpus(), Some((2, 1)));
        assert!(!r.all_ok(&["hello"]));
        assert!(r.details("hello").is_empty());
    }

    #[test]
    fn a_crash_is_not_done() {
        let r = GuestReport::parse(
            "ringvm-test: exception 6 (#UD) error=0x0 rip=0x101b50 cs=0x18\n\
             ringvm-test: ud2 FAIL unexpected exception 6 (#UD) at rip 0x101b50\n",
        );
        assert!(!r.done);
        assert!(r
            .exception
            .as_deref()
            .is_some_and(|e| e.starts_with("6 (#UD)")));
        assert!(matches!(r.outcome("ud2"), Some(Outcome::Fail(_))));
    }

    /// The reference run: the guest keeps the same boot contract under QEMU (scripts/setup
    /// installs it), so ringvm and QEMU can be compared booting it.
    #[test]
    fn all_scenarios_pass_under_qemu() {
        assert!(qemu_available(), "qemu-system-x86_64 or /dev/kvm missing");
        let cmdline = GuestCmdline::new()
            .test("all")
            .expect_cpus(2)
            .expect_mem_mib(128)
            .to_string();
        let run = run_guest(
            &mut qemu_reference(test_guest_path(), &cmdline, 128, 2),
            Duration::from_secs(60),
        )
        .expect("run qemu");
        run.report().assert_ok(SCENARIOS);
        assert!(run.exited_cleanly(), "{:?}\n{}", run.status, run.stderr);
        assert_eq!(run.report().smp_cpus(), Some((2, 2)));
    }
}
