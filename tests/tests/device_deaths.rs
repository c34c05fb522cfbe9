//! How a jailed device process ends, through the real `ringvm` binary: each way out says
//! what happened, never a seccomp refusal that is not one.
//!
//! - A protocol error ends the device with its own message and status 1, whatever its
//!   environment (RUST_BACKTRACE would make the error capture a backtrace, whose unwinder
//!   calls futex).
//! - A memory fault (SIGSEGV, SIGBUS) is reported as that signal and its address, not as
//!   the rt_sigaction std's handler makes to re-raise it.
//! - A guest that sends many bad chains gets a bounded number of log lines.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tests::{ringvm_bin, wait_until, Scratch};

const LIMIT: Duration = Duration::from_secs(20);

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
