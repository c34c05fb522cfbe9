//! ringvm's own device processes: spawned (jailed unless `--disable-sandbox`), connected by a
//! socketpair, watched through their pidfds, and never left behind.
//!
//! A [`Launch`] is everything a device process is started from: its kind, its arguments and
//! duplicates of the descriptors it is given (tap queues, the vsock broker's channel). The
//! VMM starts each device from its launch once; the respawner (`crate::respawn`) keeps the
//! launches and starts a device again from the same one after it died.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};

use crate::death::{self, DeathReport};

/// The descriptor number the first of a launch's `fds` gets in the child (the socket is 3).
pub const FIRST_EXTRA_FD: usize = 4;

/// How long [`DeviceProcess::death`] waits for the status of a process that has ended.
const STATUS_POLLS: u32 = 100;
const STATUS_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);
/// How long the death record of an ended process may take to read (it is there at once).
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// What a device process is started from, again and again.
#[derive(Debug)]
pub struct Launch {
    /// The device's name in reports (`block0`).
    pub name: String,
    /// `ringvm device <kind>`.
    pub kind: String,
    /// Its own options, as arguments.
    pub args: Vec<OsString>,
    /// Descriptors it gets as 4, 5, ... (duplicates this launch owns).
    pub fds: Vec<OwnedFd>,
    pub sandbox: bool,
    pub seccomp_log_failures: bool,
}

/// A running device process.
#[derive(Debug)]
pub struct DeviceProcess {
    name: String,
    child: jail::Child,
    /// The read end of the pipe its signal handlers report its death on (`crate::death`).
    report: OwnedFd,
}

/// A started device: the process, the VMM's end of its vhost-user socket.
pub type Started = (DeviceProcess, OwnedFd);

impl Launch {
    /// Starts `ringvm device <kind> --fd 3 [args...]` with its end of a new socketpair as
    /// fd 3 (and `fds` as 4, 5, ...). With `sibling` the process becomes a child of this
    /// process's parent (the respawner starts devices for the VMM): the returned process's
    /// `child` is then only good for handing its pidfd over.
    pub fn spawn(&self, sibling: bool) -> Result<Started> {
        let name = &self.name;
        let (ours, theirs) =
            UnixStream::pair().with_context(|| format!("device {name}: socketpair failed"))?;
        let exe = Path::new("/proc/self/exe");
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("device"),
            OsStr::new(&self.kind),
            OsStr::new("--fd"),
            OsStr::new("3"),
        ];
        if !self.sandbox {
            args.push(OsStr::new("--disable-sandbox"));
        }
        if self.seccomp_log_failures {
            args.push(OsStr::new("--seccomp-log-failures"));
        }
        args.extend(self.args.iter().map(|a| a.as_os_str()));
        // Descriptors in the child: 3 the socket, FIRST_EXTRA_FD.. `fds`, then the report pipe.
        let (report, report_tx) =
            std::io::pipe().with_context(|| format!("device {name}: pipe failed"))?;
        let report_fd = (FIRST_EXTRA_FD + self.fds.len()).to_string();
        args.extend([OsStr::new("--report-fd"), OsStr::new(&report_fd)]);
        let mut all = vec![theirs.as_fd()];
        all.extend(self.fds.iter().map(|f| f.as_fd()));
        all.push(report_tx.as_fd());
        let sandbox = jail::Sandbox {
            enabled: self.sandbox,
        };
        let child = if sibling {
            jail::spawn_sibling(exe, &args, &all, &sandbox)
        } else {
            jail::spawn(exe, &args, &all, &sandbox)
        }
        .with_context(|| format!("cannot start device {name}"))?;
        // Only the child may hold the write end: the read sees end-of-file once it is gone.
        drop(report_tx);
        Ok((
            DeviceProcess {
                name: name.clone(),
                child,
                report: report.into(),
            },
            ours.into(),
        ))
    }
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
        report: report.into(),
    })
}

/// The VM's device processes (every one ever started); dropping the last handle kills and
/// reaps those still running, so no path out of `ringvm run` leaves one behind (and
/// PR_SET_PDEATHSIG covers a VMM that is killed). Cheap to clone: the respawner's tasks add
/// the processes they start.
#[derive(Clone, Default)]
pub struct DeviceProcesses(Rc<Registry>);

#[derive(Default)]
struct Registry(RefCell<Vec<Rc<DeviceProcess>>>);

impl DeviceProcesses {
    pub fn push(&self, p: DeviceProcess) -> Rc<DeviceProcess> {
        let p = Rc::new(p);
        let mut all = self.0 .0.borrow_mut();
        // Reaped processes have nothing left to stop.
        all.retain(|q| !q.reaped());
        all.push(p.clone());
        p
    }

    pub fn all(&self) -> Vec<Rc<DeviceProcess>> {
        self.0 .0.borrow().clone()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for p in self.0.get_mut().iter() {
            p.stop();
        }
    }
}

impl DeviceProcess {
    /// A process the respawner started for this process (its child, by `CLONE_PARENT`).
    pub fn adopt(name: &str, pid: i32, pidfd: OwnedFd, report: OwnedFd) -> DeviceProcess {
        DeviceProcess {
            name: name.to_string(),
            child: jail::Child::from_pidfd(pid, pidfd),
            report,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.pid
    }

    /// Its pidfd and report pipe, to hand to the VMM (the respawner's side).
    pub fn into_fds(self) -> (i32, OwnedFd, OwnedFd) {
        (self.child.pid, self.child.pidfd, self.report)
    }

    /// A pidfd of the process, readable once it has ended.
    pub fn pidfd(&self) -> std::io::Result<OwnedFd> {
        self.child.pidfd.try_clone()
    }

    fn reaped(&self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// How the process, which has ended (its pidfd is readable), died:
    /// `device NAME (pid N) killed by signal ...`.
    pub async fn death(&self) -> String {
        let (status, said) = match self.exit_status().await {
            Ok(status) => (Some(status), status.to_string()),
            Err(why) => (None, why),
        };
        // Only a record that fits the status is believed (and none without a status).
        let report = match status {
            Some(status) => DeathReport::believed(&self.death_report().await, &status),
            None => None,
        };
        format!(
            "device {} (pid {}) {}",
            self.name,
            self.child.pid,
            death::describe(&said, report.as_ref())
        )
    }

    /// The status of the process, whose pidfd says it has ended. A tracer (a debugger) is
    /// told first, and the status is ours only once it has let go: poll a little.
    async fn exit_status(&self) -> Result<jail::ExitStatus, String> {
        for _ in 0..STATUS_POLLS {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {
                    let _ = executor::sleep(STATUS_POLL_INTERVAL).await;
                }
                Err(e) => return Err(format!("ended (cannot get its status: {e})")),
            }
        }
        Err("ended".to_string())
    }

    /// What the ended process's signal handlers wrote of its death (a refused system call, a
    /// memory fault), if it died that way: up to two records' bytes. Read through the ring (the VMM's own seccomp policy has no read(2)), and given up after
    /// [`REPORT_WAIT`]: the record is in the pipe once the process has ended, but the pipe
    /// reaches its end only when every write end is closed, and the device may have passed
    /// one on (to this process, over its vhost-user socket) to keep it open.
    async fn death_report(&self) -> Vec<u8> {
        let Ok(fd) = self.report.try_clone() else {
            return Vec::new();
        };
        let pipe = executor::AsyncFd::new(fd);
        let read = pipe.read(Vec::with_capacity(2 * DeathReport::LEN));
        match executor::timeout(REPORT_WAIT, read).await {
            Ok((Ok(_), buf)) => buf,
            _ => Vec::new(),
        }
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn stop(&self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process if it still runs (a device that hung up but lingers), without
    /// reaping it.
    pub fn kill(&self) {
        let _ = self.child.kill();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// `sh -c script`, unjailed, as a device process whose report pipe is `report`.
    fn process(script: &str, report: std::io::PipeReader) -> DeviceProcess {
        let args = [OsStr::new("-c"), OsStr::new(script)];
        let child = jail::spawn(
            Path::new("/bin/sh"),
            &args,
            &[],
            &jail::Sandbox { enabled: false },
        )
        .unwrap();
        DeviceProcess {
            name: "test0".into(),
            child,
            report: report.into(),
        }
    }

    fn death_of(p: &DeviceProcess) -> String {
        let pidfd = executor::AsyncFd::new(p.pidfd().unwrap());
        executor::Executor::new().unwrap().run_until(async {
            pidfd.poll_readable().await.unwrap();
            executor::timeout(Duration::from_secs(10), p.death())
                .await
                .expect("the death of a process is not reported")
        })
    }

    #[test]
    fn a_report_pipe_kept_open_elsewhere_does_not_hold_up_the_death() {
        // The write end stays open here, as a device that passed it on (to the VMM, over
        // its socket) would keep it: the pipe never reaches its end.
        let (report, _kept) = std::io::pipe().unwrap();
        let p = process("exit 3", report);
        assert_eq!(
            death_of(&p),
            format!("device test0 (pid {}) exited with status 3", p.pid())
        );
    }

    #[test]
    fn a_report_that_does_not_fit_the_death_is_not_believed() {
        let record = |signal, value| {
            DeathReport {
                signal,
                value,
                addr: 0x1000,
            }
            .to_bytes()
            .to_vec()
        };
        for (script, rec, says) in [
            // A refused call claimed by a process that was killed.
            (
                "kill -9 $$",
                record(libc::SIGSYS, 59),
                "killed by signal 9 (SIGKILL)",
            ),
            // A fault claimed by a process that exited.
            ("exit 0", record(libc::SIGSEGV, 1), "exited with status 0"),
            (
                "exit 139",
                record(libc::SIGSEGV, 1),
                "exited with status 139",
            ),
            // Two records: the handlers write one.
            (
                "kill -11 $$",
                [record(libc::SIGSEGV, 1), record(libc::SIGSEGV, 1)].concat(),
                "killed by signal 11 (SIGSEGV)",
            ),
        ] {
            let (report, mut tx) = std::io::pipe().unwrap();
            tx.write_all(&rec).unwrap();
            let p = process(script, report);
            assert_eq!(
                death_of(&p),
                format!("device test0 (pid {}) {says}", p.pid()),
                "{script}"
            );
        }
    }

    #[test]
    fn a_report_that_fits_the_death_is_told() {
        let sent = DeathReport {
            signal: libc::SIGSEGV,
            value: 0,
            addr: 0,
        };
        let (report, mut tx) = std::io::pipe().unwrap();
        tx.write_all(&sent.to_bytes()).unwrap();
        drop(tx);
        let p = process("exit 139", report);
        assert_eq!(
            death_of(&p),
            format!(
                "device test0 (pid {}) exited with status 139 after signal 11 (SIGSEGV) sent by \
                 another process",
                p.pid()
            )
        );
    }
}
