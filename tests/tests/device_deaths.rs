//! How a jailed device process ends, through the real `ringvm` binary: each way out says
//! what happened, never a seccomp refusal that is not one.
//!
//! - A protocol error ends the device with its own message and status 1, whatever its
//!   environment (RUST_BACKTRACE would make the error capture a backtrace, whose unwinder
//!   calls futex).
//! - A panic ends it with its message and status 101 (std's default hook calls gettid, and
//!   may print a backtrace).
//! - A memory fault (SIGSEGV, SIGBUS) is reported as that signal and its address, not as
//!   the rt_sigaction std's handler makes to re-raise it; the same signal sent by another
//!   process is reported as sent.
//!
//! Faults and panics are injected with gdb (as in sandbox.rs): the device itself makes the
//! call, under its jail and filter.
//! - A guest that sends many bad chains gets a bounded number of log lines.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tests::{
    children_of, gdb_run, ringvm_bin, ringvm_run, wait_until, GuestCmdline, HaltedVm, Scratch, Step,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A VM with its jailed rng device and no restarts, whose device gdb makes do `steps`; the
/// device's pid, and the VM's exit code and stderr once it ended.
fn rng_device_made_to(steps: &[Step<'_>]) -> (u32, Option<i32>, String) {
    let vm = HaltedVm::start(&["--device-restarts", "0"]);
    let device = vm.device;
    let _ = gdb_run(device, steps);
    let (code, stderr) = vm.finish(LIMIT);
    (device, code, stderr)
}

/// The environment that asks Rust for backtraces everywhere.
const BACKTRACES_ON: [(&str, &str); 2] = [("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")];

/// A vhost-user message no backend knows: request 999, version 1, no body.
fn unknown_request() -> Vec<u8> {
    [999u32, 1, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Waits up to `limit` for `child` to end (killing it if it does not); its status, stdout
/// and stderr.
fn end(mut child: Child, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let ended = wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (ended.then_some(status), out, err)
}

/// `ringvm device rng --socket PATH` (it accepts, then serves from a jailed child), with
/// backtraces asked for in its environment, and a frontend connected to it.
fn standalone_rng(dir: &Scratch) -> (Child, UnixStream) {
    let sock = dir.path("rng.sock");
    let backend = Command::new(ringvm_bin())
        .args(["device", "rng", "--socket"])
        .arg(&sock)
        .envs(BACKTRACES_ON)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm device rng");
    assert!(
        wait_until(LIMIT, || sock.exists()),
        "the backend never listened"
    );
    let conn = UnixStream::connect(&sock).expect("connect to the backend");
    (backend, conn)
}

#[test]
fn protocol_error_ends_a_jailed_device_with_its_message_even_with_backtraces_on() {
    let dir = Scratch::new("deaths", "protocol");
    let (backend, mut conn) = standalone_rng(&dir);
    conn.write_all(&unknown_request()).expect("send");
    let (status, _, stderr) = end(backend, LIMIT);
    let status = status.expect("the device did not end after a protocol error");
    assert_eq!(status.code(), Some(1), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("ringvm: device rng: malformed message: unknown request code 999"),
        "the device did not give its own message:\n{stderr}"
    );
    assert!(
        stderr.contains("exited with status 1"),
        "the jailed device did not exit with status 1:\n{stderr}"
    );
    assert!(
        !stderr.contains("SIGSYS") && !stderr.contains("refused"),
        "the device died by its seccomp filter:\n{stderr}"
    );
}

/// `ringvm device rng --fd 3 --report-fd 4` started by another launcher that passes its
/// environment on: `unshare` makes the PID and mount namespaces the jail needs (the device
/// is their init), and the shell gives it the socket (its stdin) as 3 and the report pipe
/// (its stdout) as 4. With `env`, the device runs under the seccomp filter with that
/// environment, which `jail::spawn` would have cleared.
fn device_under_unshare(env: &[(&str, &str)], kind: &[&str]) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount", "--", "sh", "-c"])
        .arg(r#"exec "$0" device "$@" --fd 3 --report-fd 4 3<&0 4>&1 1>&2 </dev/null"#)
        .arg(ringvm_bin())
        .args(kind)
        .envs(env.iter().copied())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn unshare (util-linux)");
    (child, ours)
}

#[test]
fn protocol_error_ends_a_device_with_status_1_whatever_its_launcher_passes_in_the_environment() {
    let (child, mut conn) = device_under_unshare(&BACKTRACES_ON, &["rng"]);
    conn.write_all(&unknown_request()).expect("send");
    let (status, report, stderr) = end(child, LIMIT);
    let status = status.expect("the device did not end after a protocol error");
    assert_eq!(status.code(), Some(1), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("ringvm: device rng: malformed message: unknown request code 999"),
        "{stderr}"
    );
    assert!(
        report.is_empty() && !stderr.contains("seccomp refused"),
        "the device died by its seccomp filter (report {report:?}):\n{stderr}"
    );
}

#[test]
fn device_without_a_frontend_still_ends_cleanly() {
    // The frontend hangs up at once: the device's ordinary way out (status 0), under the
    // filter and with backtraces asked for.
    let (child, conn) = device_under_unshare(&BACKTRACES_ON, &["rng"]);
    drop(conn);
    let (status, report, stderr) = end(child, LIMIT);
    assert!(
        status.is_some_and(|s| s.success()) && report.is_empty(),
        "{status:?} {report:?}\n{stderr}"
    );
}

/// The descriptor of process `pid` open on `file`.
fn fd_of(pid: u32, file: &Path) -> u32 {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the device's fds");
    dir.flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.ends_with(file.file_name().expect("a file")))
        })
        .and_then(|e| e.file_name().to_string_lossy().parse().ok())
        .unwrap_or_else(|| panic!("the device holds no descriptor of {}", file.display()))
}

#[test]
fn memory_fault_in_a_jailed_device_is_reported_with_its_address() {
    // What a device meets when a file it maps is shorter than its mapping (a memory file
    // shrunk by its frontend, an image truncated under it): the block device maps a page of
    // its disk image 64 GiB in, far past the end (its own mmap, which its policy allows),
    // and a strlen reads it: SIGBUS.
    let dir = Scratch::new("deaths", "sigbus");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write the disk image");
    let disk_arg = disk.to_string_lossy().into_owned();
    let vm = HaltedVm::start(&["--device-restarts", "0", "--no-rng", "--rwdisk", &disk_arg]);
    let device = vm.device;
    let fd = fd_of(device, &disk);
    let fd = fd.to_string();
    let values = gdb_run(
        device,
        &[
            Step::Call("mmap", &["0", "4096", "1", "1", &fd, "0x1000000000"]),
            Step::Print("(long)$ret"),
            Step::Jump("strlen", &["$ret"]),
        ],
    );
    let addr: i64 = values
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("mmap in the device: {values:?}"));
    assert!(addr > 0, "mmap in the device failed: {values:?}");
    let (code, stderr) = vm.finish(LIMIT);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device block0 (pid {device}) killed by signal 7 (SIGBUS) at address {addr:#x}: memory fault"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("refused system call"),
        "a fault reported as a seccomp refusal:\n{stderr}"
    );
}

#[test]
fn segfault_in_a_jailed_device_is_reported_with_its_address() {
    // Reads address 0x10, which nothing maps.
    let (device, code, stderr) = rng_device_made_to(&[Step::Jump("strlen", &["16"])]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device rng (pid {device}) killed by signal 11 (SIGSEGV) at address 0x10: memory fault (address not mapped)"
        )),
        "{stderr}"
    );
}

/// `kill -NAME` sends signal `sig` to the device of a halted VM, whose handler for it must
/// report the signal as sent (status 128 + `sig`), not as what the device did itself.
fn signal_sent_by_another_process_is_reported_as_sent(name: &str, sig: i32) {
    let vm = HaltedVm::start(&["--device-restarts", "0"]);
    let device = vm.device;
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &device.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let (code, stderr) = vm.finish(LIMIT);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device rng (pid {device}) exited with status {} after signal {sig} (SIG{name}) sent by another process",
            128 + sig
        )),
        "{stderr}"
    );
}

#[test]
fn sigbus_sent_by_another_process_is_not_called_a_fault() {
    signal_sent_by_another_process_is_reported_as_sent("BUS", 7);
}

#[test]
fn sigabrt_sent_by_another_process_is_not_called_an_abort() {
    signal_sent_by_another_process_is_reported_as_sent("ABRT", 6);
}

/// Steps that make the process call `core::panicking::panic("boom from gdb")` with a
/// `Location` {file "gdb-injected", line 7, column 9} (a `&str` and two u32s), built in the
/// scratch area below its stack.
const INJECT_PANIC: [Step<'static>; 6] = [
    Step::Set(r#"{char[13]}($scratch + 600) = "gdb-injected""#),
    Step::Set("*(long*)($scratch + 512) = $scratch + 600"),
    Step::Set("*(long*)($scratch + 520) = 12"),
    Step::Set("*(int*)($scratch + 528) = 7"),
    Step::Set("*(int*)($scratch + 532) = 9"),
    Step::Jump(
        "'core::panicking::panic'",
        &[r#""boom from gdb""#, "13", "$scratch + 512"],
    ),
];

#[test]
fn panic_in_a_vm_device_ends_the_vm_with_the_device_message_and_status_101() {
    let (device, code, stderr) = rng_device_made_to(&INJECT_PANIC);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("ringvm device rng: panicked at gdb-injected:7:9:\nboom from gdb"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("device rng (pid {device}) exited with status 101")),
        "{stderr}"
    );
}

#[test]
fn panic_in_a_device_ends_it_with_its_message_whatever_its_environment() {
    // A device under its seccomp filter with backtraces asked for; gdb makes it panic.
    let (child, _conn) = device_under_unshare(&BACKTRACES_ON, &["rng"]);
    let unshare = child.id();
    let mut device = Vec::new();
    assert!(
        wait_until(LIMIT, || {
            device = children_of(unshare);
            // The device is jailed (and filtered) once its root is the empty tmpfs.
            device.len() == 1
                && std::fs::read_dir(format!("/proc/{}/root/", device[0]))
                    .is_ok_and(|d| d.count() == 0)
        }),
        "no jailed device under unshare"
    );
    let _ = gdb_run(device[0], &INJECT_PANIC);
    let (status, report, stderr) = end(child, LIMIT);
    let status = status.expect("the device did not end after its panic");
    assert_eq!(status.code(), Some(101), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("ringvm device rng: panicked at gdb-injected:7:9:\nboom from gdb"),
        "{stderr}"
    );
    assert!(
        report.is_empty(),
        "the device reported a death: {report:?}\n{stderr}"
    );
}

#[test]
fn a_flood_of_bad_chains_makes_a_bounded_log_with_a_summary() {
    // 1000 malformed chains (a zero-length buffer each), then the usual entropy check.
    const BAD: u64 = 1000;
    let cmdline = GuestCmdline::new()
        .test("virtio-rng")
        .option("rng.bad", BAD);
    let run = tests::run_guest(&mut ringvm_run(&[], &cmdline), Duration::from_secs(60))
        .expect("run ringvm");
    run.assert_clean();
    run.report().assert_ok(&["virtio-rng"]);
    assert!(
        run.report()
            .details("virtio-rng")
            .contains(&"bad chains=1000 returned"),
        "{}",
        run.stdout
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("ringvm device rng:"))
        .collect();
    // The shared policy (virtio::GuestLog): the first 8 in full, then one line at each power
    // of two (16 ... 512), and the rest counted when the queue stops: 15 lines.
    assert!(
        lines.len() <= 15,
        "{} lines for {BAD} bad chains:\n{}",
        lines.len(),
        run.stderr
    );
    assert!(
        lines[..8].iter().all(|l| l.contains("invalid chain")),
        "the first bad chains are logged in full:\n{}",
        run.stderr
    );
    assert!(
        lines[8].contains("guest errors: 7 not logged since the last line, 16 in all"),
        "no summary of what was not logged:\n{}",
        run.stderr
    );
    assert!(
        lines.last().is_some_and(
            |l| l.ends_with("guest errors: 488 not logged since the last line, 1000 in all")
        ),
        "no final count when the queue stopped:\n{}",
        run.stderr
    );
}

#[test]
fn abort_in_a_jailed_device_is_reported_as_an_abort() {
    let (device, code, stderr) = rng_device_made_to(&[Step::Jump("abort", &[])]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device rng (pid {device}) exited with status 134: it aborted (SIGABRT"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("SIGSYS") && !stderr.contains("SIGSEGV"),
        "{stderr}"
    );
}
