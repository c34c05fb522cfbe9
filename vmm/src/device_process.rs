//! ringvm's own device processes: spawned (jailed unless `--disable-sandbox`), connected by a
//! socketpair, watched through their pidfds, and never left behind.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::death::{self, DeathReport};
use crate::exit::{ExitReason, VmExit};

/// The descriptor number the first of `spawn`'s `fds` gets in the child (the socket is 3).
pub const FIRST_EXTRA_FD: usize = 4;

/// How long [`DeviceProcess::watch`] waits for the status of a process that has ended.
const STATUS_POLLS: u32 = 100;
const STATUS_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// A running device process.
pub struct DeviceProcess {
    name: String,
    child: jail::Child,
    /// The read end of the pipe its signal handlers report its death on (`crate::death`).
    report: std::io::PipeReader,
}

/// Starts `ringvm device <kind> --fd 3 [extra...]` with its end of a new socketpair as fd 3
/// (and `fds` as 4, 5, ...); returns the process and the VMM's end of the socket.
pub fn spawn(
    name: &str,
    kind: &str,
    extra: &[&OsStr],
    fds: &[std::os::fd::BorrowedFd<'_>],
    sandbox: bool,
    seccomp_log_failures: bool,
) -> Result<(DeviceProcess, OwnedFd)> {
    let (ours, theirs) =
        UnixStream::pair().with_context(|| format!("device {name}: socketpair failed"))?;
    let exe = Path::new("/proc/self/exe");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("device"),
        OsStr::new(kind),
        OsStr::new("--fd"),
        OsStr::new("3"),
    ];
    if !sandbox {
        args.push(OsStr::new("--disable-sandbox"));
    }
    if seccomp_log_failures {
        args.push(OsStr::new("--seccomp-log-failures"));
    }
    args.extend_from_slice(extra);
    // Descriptors in the child: 3 the socket, FIRST_EXTRA_FD.. `fds`, then the report pipe.
    let (report, report_tx) =
        std::io::pipe().with_context(|| format!("device {name}: pipe failed"))?;
    let report_fd = (FIRST_EXTRA_FD + fds.len()).to_string();
    args.extend([OsStr::new("--report-fd"), OsStr::new(&report_fd)]);
    let mut all = vec![theirs.as_fd()];
    all.extend_from_slice(fds);
    all.push(report_tx.as_fd());
    let child = jail::spawn(exe, &args, &all, &jail::Sandbox { enabled: sandbox })
        .with_context(|| format!("cannot start device {name}"))?;
    // Only the child may hold the write end: the read sees end-of-file once it is gone.
    drop(report_tx);
    Ok((
        DeviceProcess {
            name: name.to_string(),
            child,
            report,
        },
        ours.into(),
    ))
}

/// Starts an external backend program (virtiofsd) with `fds` as descriptors 3, 4, ...,
/// unjailed (it brings its own sandbox), an empty environment and PR_SET_PDEATHSIG; watched,
/// reported and reaped like ringvm's own device processes (it writes no death report).
pub fn spawn_program(
    name: &str,
    program: &Path,
    args: &[&OsStr],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<DeviceProcess> {
    let (report, report_tx) =
        std::io::pipe().with_context(|| format!("device {name}: pipe failed"))?;
    // Nobody writes a report: the read end sees end-of-file.
    drop(report_tx);
    let child = jail::spawn(program, args, fds, &jail::Sandbox { enabled: false })
        .with_context(|| format!("cannot start device {name} ({})", program.display()))?;
    Ok(DeviceProcess {
        name: name.to_string(),
        child,
        report,
    })
}

/// The VM's device processes; dropping it kills and reaps those still running, so no path
/// out of `ringvm run` leaves one behind (and PR_SET_PDEATHSIG covers a VMM that is killed).
#[derive(Default)]
pub struct DeviceProcesses(Vec<Rc<DeviceProcess>>);

impl DeviceProcesses {
    pub fn push(&mut self, p: DeviceProcess) {
        self.0.push(Rc::new(p));
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rc<DeviceProcess>> {
        self.0.iter()
    }
}

impl Drop for DeviceProcesses {
    fn drop(&mut self) {
        for p in &self.0 {
            p.stop();
        }
    }
}

impl DeviceProcess {
    /// Waits (on the executor) until the process ends, then reports it: a device that
    /// ends while the VM runs is a failure.
    pub async fn watch(self: Rc<Self>, exit: Arc<VmExit>) {
        let pidfd = match self.child.pidfd.try_clone() {
            Ok(fd) => executor::AsyncFd::new(fd),
            Err(e) => {
                eprintln!("ringvm: device {}: cannot watch its pidfd: {e}", self.name);
                return;
            }
        };
        if pidfd.poll_readable().await.is_err() {
            return;
        }
        let status = self.exit_status().await;
        let report = self.death_report().await;
        exit.report(ExitReason::Failed(format!(
            "device {} (pid {}) {}",
            self.name,
            self.child.pid,
            death::describe(&status, report.as_ref())
        )));
    }

    /// The status of the process, whose pidfd says it has ended. A tracer (a debugger) is
    /// told first, and the status is ours only once it has let go: poll a little.
    async fn exit_status(&self) -> String {
        for _ in 0..STATUS_POLLS {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) => {
                    let _ = executor::sleep(STATUS_POLL_INTERVAL).await;
                }
                Err(e) => return format!("ended (cannot get its status: {e})"),
            }
        }
        "ended".to_string()
    }

    /// What the ended process's signal handlers reported of its death (a refused system
    /// call, a memory fault), if it died that way. Read through the ring: the VMM's own
    /// seccomp policy has no read(2).
    async fn death_report(&self) -> Option<DeathReport> {
        let fd: OwnedFd = self.report.try_clone().ok()?.into();
        let pipe = executor::AsyncFd::new(fd);
        // The process has ended, so this completes at once: its record, or end-of-file.
        let (res, buf) = pipe.read(Vec::with_capacity(DeathReport::LEN)).await;
        match res {
            Ok(DeathReport::LEN) => DeathReport::from_bytes(&buf),
            _ => None,
        }
    }

    /// Its pid (in the VMM's PID namespace).
    pub fn pid(&self) -> i32 {
        self.child.pid
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn stop(&self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
