//! Starting ringvm's device processes again after they died, once the VMM runs under its own
//! seccomp filter (which has no clone3, execve, pipe or socketpair, and whose children would
//! inherit it).
//!
//! Before that filter, `vm::run` forks a helper, the respawner (`ringvm-respawn` in `ps`):
//! it keeps every device's `Launch` (kind, arguments, duplicates of its descriptors) and
//! nothing else of the VMM (it closes every other descriptor it inherited), and serves one
//! request on a socketpair: "start slot N again". It starts that device exactly as the VMM
//! did, jailed, as a child of the VMM (`CLONE_PARENT`, so the VMM reaps it and
//! `PR_SET_PDEATHSIG` ties it to the VMM), and sends back its pid, its pidfd, the VMM's end
//! of its new vhost-user socket and the read end of its death-report pipe (SCM_RIGHTS). A
//! request can only name a launch made before the fork: a VMM that is taken over cannot
//! make it start anything else.
//!
//! It holds the mount namespace of each slot's live process (the VMM hands over those of the
//! first ones) until it starts the next one, so that a dying device does not tear its
//! namespace down in its exit (an RCU grace period, which the restart would wait for:
//! `benches/benches/recovery.rs`).
//!
//! The respawner dies with the VMM (`PR_SET_PDEATHSIG`), and ends on its own when its socket
//! closes.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::control::stats::{open_proc_files, ProcFiles};
use crate::device_process::{DeviceProcess, Launch, Started};
use crate::sys;

/// The respawner's name in `/proc/PID/comm` (tests tell it from device processes by it).
pub const COMM: &CStr = c"ringvm-respawn";

/// The most bytes of a reply (an error message is cut to fit).
const MAX_REPLY: usize = 4096;

/// The VMM's handle on the respawner.
pub struct Respawner {
    sock: executor::AsyncFd,
    helper: jail::Child,
    /// One request at a time: devices that die together take turns.
    turn: futures::lock::Mutex<()>,
}

impl Respawner {
    /// Forks the respawner with `launches` (slot N is `launches[N]`) and the mount namespaces
    /// of the processes started from them ([`mount_namespace`]; the respawner holds them, this
    /// process lets go of them). Call it while the process has one thread.
    pub fn start(
        launches: Vec<Launch>,
        mount_namespaces: Vec<Option<std::fs::File>>,
    ) -> Result<Respawner> {
        let (ours, theirs) = UnixStream::pair().context("device respawner: socketpair failed")?;
        match sys::fork_single_threaded().context("device respawner: fork failed")? {
            None => {
                drop(ours);
                let code = match helper(theirs, &launches, mount_namespaces) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("ringvm: device respawner: {e:#}");
                        1
                    }
                };
                sys::exit_helper(code)
            }
            Some((pid, pidfd)) => Ok(Respawner {
                sock: executor::AsyncFd::new(ours.into()),
                helper: jail::Child::from_pidfd(pid, pidfd),
                turn: futures::lock::Mutex::new(()),
            }),
        }
    }

    /// Starts the device of `slot` again; returns the process (a child of this process), the
    /// VMM's end of its vhost-user socket, and its open /proc files (for `ringvm stats`).
    pub async fn respawn(&self, slot: u32, name: &str) -> Result<(Started, ProcFiles)> {
        let _turn = self.turn.lock().await;
        let (res, _) = self.sock.sendmsg(slot.to_le_bytes().to_vec(), &[]).await;
        res.context("device respawner: cannot send a request")?;
        let (res, buf) = self.sock.recvmsg(Vec::with_capacity(MAX_REPLY), 5).await;
        let msg = res.context("device respawner: no reply")?;
        let mut fds = msg.fds.into_iter();
        let reply = &buf[..msg.len.min(buf.len())];
        match reply.first() {
            Some(0) if reply.len() >= 5 => {
                let pid = i32::from_le_bytes([reply[1], reply[2], reply[3], reply[4]]);
                let (Some(sock), Some(pidfd), Some(report), Some(stat), Some(status)) =
                    (fds.next(), fds.next(), fds.next(), fds.next(), fds.next())
                else {
                    bail!("device respawner: a reply without its descriptors");
                };
                let process = DeviceProcess::adopt(name, pid, pidfd, report);
                Ok(((process, sock), ProcFiles::new(pid, stat, status)))
            }
            Some(1) => Err(anyhow!("{}", String::from_utf8_lossy(&reply[1..]))),
            None => bail!("device respawner: it has ended"),
            Some(_) => bail!("device respawner: a malformed reply"),
        }
    }
}

impl Drop for Respawner {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// The mount namespace of process `pid`, opened (for [`Respawner::start`]).
pub fn mount_namespace(pid: i32) -> Option<std::fs::File> {
    std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok()
}

/// The respawner's side: serves requests on `sock` until it closes.
fn helper(
    sock: UnixStream,
    launches: &[Launch],
    mut held: Vec<Option<std::fs::File>>,
) -> Result<()> {
    sys::become_helper(COMM).context("prctl")?;
    let mut keep = vec![sock.as_raw_fd()];
    for l in launches {
        keep.extend(l.fds.iter().map(|f| f.as_raw_fd()));
    }
    // The mount namespace of each slot's live process, held until the next process of the
    // slot is started (see below).
    held.resize_with(launches.len(), || None);
    keep.extend(held.iter().flatten().map(|f| f.as_raw_fd()));
    sys::close_descriptors_except(&keep).context("closing the VMM's descriptors")?;
    let mut sock = sock;
    loop {
        let mut slot = [0u8; 4];
        match sock.read_exact(&mut slot) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a request"),
        }
        let slot = u32::from_le_bytes(slot) as usize;
        let started = match launches.get(slot) {
            Some(launch) => launch.spawn(true),
            None => Err(anyhow!("no device in slot {slot}")),
        };
        match started {
            Ok((process, vmm_end)) => {
                let (pid, pidfd, report) = process.into_fds();
                // The VMM cannot open files under its filter: its /proc files come from here.
                let (stat, status) = open_proc_files(pid)?;
                let mount_ns = mount_namespace(pid);
                let mut reply = vec![0u8];
                reply.extend_from_slice(&pid.to_le_bytes());
                send_with_fds(
                    &sock,
                    reply,
                    &[
                        vmm_end.as_fd(),
                        pidfd.as_fd(),
                        report.as_fd(),
                        stat.as_fd(),
                        status.as_fd(),
                    ],
                )?;
                // A dying process whose mount namespace it holds the last reference to tears
                // the namespace down in its exit, which waits for an RCU grace period (up to
                // hundreds of ms on a busy host), and the VMM waits for that exit before it
                // starts the next process. Held here, the dead process's namespace goes when
                // its successor's replaces it, after the reply: off the restart's path.
                if let Some(h) = held.get_mut(slot) {
                    *h = mount_ns;
                }
            }
            Err(e) => {
                let mut reply = vec![1u8];
                let text = format!("{e:#}");
                let text = &text.as_bytes()[..text.len().min(MAX_REPLY - 1)];
                reply.extend_from_slice(text);
                sock.write_all(&reply).context("sending a reply")?;
            }
        }
    }
}

/// Sends `bytes` with `fds` on the respawner's socket, through an executor of its own (the
/// VMM's ring is not the respawner's to use).
fn send_with_fds(
    sock: &UnixStream,
    bytes: Vec<u8>,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<()> {
    let dup: OwnedFd = sock.as_fd().try_clone_to_owned()?;
    let fd = executor::AsyncFd::new(dup);
    let (res, _) = executor::block_on(fd.sendmsg(bytes, fds)).context("executor")?;
    res.context("sending a reply")?;
    Ok(())
}

/// How many restarts a device may have within a window of time (`--device-restarts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartBudget {
    /// Restarts allowed within `window`; 0 turns restarts off.
    pub max: u32,
    pub window: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        RestartBudget {
            max: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl std::str::FromStr for RestartBudget {
    type Err = String;

    /// `N` or `N/SECS`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (n, secs) = match s.split_once('/') {
            Some((n, secs)) => (n, Some(secs)),
            None => (s, None),
        };
        let max = n
            .parse()
            .map_err(|_| format!("expected N or N/SECS (restarts within seconds), got {s:?}"))?;
        let window = match secs {
            None => RestartBudget::default().window,
            Some(secs) => match secs.parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => {
                    return Err(format!(
                        "expected a whole number of seconds above 0, got {secs:?}"
                    ))
                }
            },
        };
        Ok(RestartBudget { max, window })
    }
}

/// The restarts one device had within its budget's window.
#[derive(Debug)]
pub struct Restarts {
    budget: RestartBudget,
    times: Vec<Instant>,
}

impl Restarts {
    pub fn new(budget: RestartBudget) -> Restarts {
        Restarts {
            budget,
            times: Vec::new(),
        }
    }

    /// Counts a restart at `now` if the budget allows one; `Some(restarts within the window)`.
    pub fn take(&mut self, now: Instant) -> Option<usize> {
        let window = self.budget.window;
        self.times.retain(|t| now.duration_since(*t) < window);
        if self.times.len() >= self.budget.max as usize {
            return None;
        }
        self.times.push(now);
        Some(self.times.len())
    }

    pub fn budget(&self) -> RestartBudget {
        self.budget
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_and_without_a_window() {
        assert_eq!(
            "3".parse::<RestartBudget>().unwrap(),
            RestartBudget {
                max: 3,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(
            "10/5".parse::<RestartBudget>().unwrap(),
            RestartBudget {
                max: 10,
                window: Duration::from_secs(5)
            }
        );
        assert_eq!("0".parse::<RestartBudget>().unwrap().max, 0);
        for bad in ["", "x", "3/", "3/0", "-1", "3/x"] {
            assert!(bad.parse::<RestartBudget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_budget_allows_n_restarts_per_window() {
        let mut r = Restarts::new("2/10".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(r.take(t0), Some(1));
        assert_eq!(r.take(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(r.take(t0 + Duration::from_secs(2)), None);
        // The first restart leaves the window.
        assert_eq!(r.take(t0 + Duration::from_secs(10)), Some(2));
        let mut off = Restarts::new("0".parse().unwrap());
        assert_eq!(off.take(t0), None);
    }
}
