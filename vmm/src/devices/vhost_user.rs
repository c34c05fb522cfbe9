//! Virtio devices whose backend is a vhost-user process: ringvm's own device processes and
//! external backends given with `--vhost-user`.
//!
//! The PCI transport runs on vCPU threads; the vhost-user connection lives on the main
//! thread's executor. [`VhostUserDevice`] (the transport's side) sends each request to the
//! device's [`Backend::serve`] task and blocks its vCPU until the backend has answered.
//!
//! # Healing
//! The backend remembers what it handed over: the acknowledged features, the rings (sizes,
//! addresses, duplicates of the kick and call eventfds; the KVM ioeventfds and irqfds stay
//! registered on the same eventfds) and the config writes. When the backend goes away (its
//! process died, for any reason, or its socket hung up) it is started again: ringvm's own
//! device processes by the respawner (`crate::respawn`), jailed, with the same options and
//! descriptors; an external backend by connecting again once its socket path answers
//! (`--vhost-user-reconnect`). Then the state is replayed: the protocol negotiation, the
//! config writes, and for a started device the features, the memory table, the inflight
//! region (`INFLIGHT_SHMFD`) and every ring, each from the used index in guest memory, and a
//! signal on every call eventfd (the dead process may have used buffers it did not signal).
//! The inflight region is what makes that exact: the new backend resubmits the chains the
//! dead one took and did not use, and pops after them. A backend without it (an external one
//! that does not offer it, like qemu-storage-daemon) pops from the used index again, which is
//! exact only for a backend that completes in order; its restarts are reported with a
//! warning saying so. The guest is not reset. Each restart is reported on stderr with its
//! cause and counted ([`VhostUserDevice::restarts`]); a device past its budget
//! (`--device-restarts`) ends the VM as a death did before: the same report.
//! A backend that fails a request or does not answer in time still ends the VM.

use std::cell::RefCell;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either};
use futures::StreamExt;
use memory::{GuestAddress, GuestMemory};
use virtio::vhost_user::frontend::{Frontend, VringConfig};
use virtio::vhost_user::{Connection, Error as VhostError, Inflight};
use virtio::DeviceType;

use crate::control::stats::ProcFiles;
use crate::device_process::{DeviceProcess, DeviceProcesses};
use crate::devices::pci::{QueueConfig, VirtioDevice};
use crate::exit::{ExitReason, VmExit};
use crate::respawn::{Respawner, RestartBudget, Restarts};

/// How long the VMM waits for any reply of a backend before declaring it hung.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connect to a backend's socket may take: one whose listener never accepts (a
/// full backlog) would otherwise hold the connect for ever.
pub const CONNECT_TIMEOUT: Duration = REPLY_TIMEOUT;
/// How long a process whose socket hung up may take to end before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How often an external backend's socket is tried while it is away.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(20);
/// When the rings of a restarted backend are kicked again (see `kick_after_restart`).
const RESTART_KICKS: [Duration; 4] = [
    Duration::from_millis(0),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];
/// Largest queue the transport offers for a vhost-user device.
const MAX_QUEUE_SIZE: u16 = 256;
/// The wait before another restart when the last one failed (a device that cannot start
/// again, say its image is gone), doubled after each failure up to [`RETRY_MAX`]: the budget
/// is spent over a moment rather than in a tight loop. A first restart does not wait.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The wait before the restart after `previous` (none before the first).
fn retry_delay(previous: Option<Duration>) -> Duration {
    previous.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// A vring as the transport handed it over, with descriptors this side owns.
struct Vring {
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: OwnedFd,
    call: Option<OwnedFd>,
}

impl Vring {
    /// The ring as the frontend hands it over, starting at `base`.
    fn config(&self, base: u16) -> VringConfig<'_> {
        VringConfig {
            index: self.index,
            size: self.size,
            desc: GuestAddress(self.desc),
            avail: GuestAddress(self.avail),
            used: GuestAddress(self.used),
            base,
            kick: self.kick.as_fd(),
            call: self.call.as_ref().map(|c| c.as_fd()),
        }
    }
}

enum Request {
    Start {
        features: u64,
        vrings: Vec<Vring>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    SetConfig {
        offset: u32,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The control socket's `suspend` (true) or `resume` (false).
    Suspend {
        suspend: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The transport's handle on a vhost-user device.
pub struct VhostUserDevice {
    name: String,
    device_type: u32,
    features: u64,
    num_queues: usize,
    config: Vec<u8>,
    /// Set by [`VhostUserDevice::set_config_space`]: the backend has no config space.
    config_read_only: bool,
    requests: mpsc::UnboundedSender<Request>,
    restarts: Arc<AtomicU32>,
}

/// Where a backend comes from, and so how it is brought back.
pub enum Origin {
    /// One of ringvm's own device processes: slot `slot` of the respawner.
    Own {
        process: Rc<DeviceProcess>,
        slot: u32,
    },
    /// `--vhost-user`: a backend listening on `path`.
    External { path: PathBuf },
    /// A backend program ringvm started but cannot start again (virtiofsd): its death ends
    /// the VM, reported as the death of a device process.
    Program { process: Rc<DeviceProcess> },
}

/// What every backend shares for healing.
pub struct Healing {
    /// `None` when restarts are off or there are no own devices.
    pub respawner: Option<Respawner>,
    pub processes: DeviceProcesses,
    pub budget: RestartBudget,
    /// How long an external backend may stay away.
    pub reconnect_timeout: Duration,
}

/// What the backend was asked to run, to replay after a restart.
struct Started {
    features: u64,
    vrings: Vec<Vring>,
}

/// The main thread's half: the connection and the requests from the transport.
pub struct Backend {
    name: String,
    frontend: Frontend,
    hangup: executor::AsyncFd,
    requests: mpsc::UnboundedReceiver<Request>,
    origin: Origin,
    /// The backend's offer when it first connected: a restarted one must make the same.
    offered: (u64, u64, Option<u32>),
    started: Option<Started>,
    /// Config writes the device accepted, in order, to replay on a restart
    /// ([`note_config_write`]).
    config_writes: Vec<(u32, Vec<u8>)>,
    /// While suspended (the control socket), where each started ring stopped.
    suspended: Option<Vec<u16>>,
    /// The inflight region the backend gave for the started rings (`INFLIGHT_SHMFD`): kept
    /// across its restarts, so a new backend finds what the dead one had in flight.
    inflight: Option<(Inflight, OwnedFd)>,
    restarts: Arc<AtomicU32>,
    /// Its process's /proc files for `ringvm stats`, replaced on a restart.
    proc_files: Option<Rc<RefCell<ProcFiles>>>,
}

/// Connects to a backend on the socket `sock` and reads what the transport needs to present
/// the device: its features, queue count and configuration space.
pub async fn connect(
    name: &str,
    device_type: DeviceType,
    sock: OwnedFd,
    origin: Origin,
) -> Result<(VhostUserDevice, Backend)> {
    let (frontend, hangup) = handshake(name, sock).await?;
    let num_queues = match frontend.queue_num() {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => device_type.default_queues(),
    };
    if num_queues == 0 || num_queues > virtio::vhost_user::message::MAX_QUEUES as usize {
        return Err(anyhow!(
            "device {name}: the backend reports {num_queues} queues"
        ));
    }
    let size = device_type.config_size();
    // virtio-fs: the frontend holds the configuration (the tag), see `super::virtiofs`.
    let config = if device_type == DeviceType::Fs {
        Vec::new()
    } else if size > 0 {
        frontend
            .get_config(0, size)
            .await
            .with_context(|| format!("device {name}: cannot read its configuration"))?
    } else {
        Vec::new()
    };
    let (tx, rx) = mpsc::unbounded();
    let restarts = Arc::new(AtomicU32::new(0));
    let device = VhostUserDevice {
        name: name.to_string(),
        device_type: device_type.id(),
        features: frontend.features(),
        num_queues,
        config,
        config_read_only: false,
        requests: tx,
        restarts: restarts.clone(),
    };
    let backend = Backend {
        name: name.to_string(),
        offered: offer(&frontend),
        frontend,
        hangup,
        requests: rx,
        origin,
        started: None,
        config_writes: Vec::new(),
        suspended: None,
        inflight: None,
        restarts,
        proc_files: None,
    };
    Ok((device, backend))
}

fn offer(frontend: &Frontend) -> (u64, u64, Option<u32>) {
    (
        frontend.features(),
        frontend.protocol_features(),
        frontend.queue_num(),
    )
}

/// The vhost-user set-up on `sock`; the frontend and a watch on the socket.
async fn handshake(name: &str, sock: OwnedFd) -> Result<(Frontend, executor::AsyncFd)> {
    let watch = sock
        .try_clone()
        .with_context(|| format!("device {name}: cannot duplicate its socket"))?;
    let conn = Connection::new(executor::AsyncFd::new(sock));
    let frontend = Frontend::connect(conn, REPLY_TIMEOUT)
        .await
        .with_context(|| format!("device {name}: vhost-user set-up failed"))?;
    Ok((frontend, executor::AsyncFd::new(watch)))
}

/// Whether a frontend error means the backend went away (rather than refused or hung).
fn hung_up(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::PeerClosed
            | VhostError::Send(_)
            | VhostError::Recv(_)
            | VhostError::ClosedMidMessage { .. }
            | VhostError::Broken
    )
}

/// Why a restart failed: the new backend went away too (another restart may follow), or
/// something that ends the VM.
enum RestartError {
    Gone(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Resolves when the backend is gone: its socket is readable, or its process ended.
async fn gone(hangup: &executor::AsyncFd, origin: &Origin) {
    let hangup = Box::pin(hangup.poll_readable());
    match origin {
        Origin::Own { process, .. } | Origin::Program { process } => {
            let Ok(fd) = process.pidfd() else {
                return hangup.await.map(drop).unwrap_or(());
            };
            let pidfd = executor::AsyncFd::new(fd);
            let ended = Box::pin(pidfd.poll_readable());
            let _ = select(hangup, ended).await;
        }
        Origin::External { .. } => {
            let _ = hangup.await;
        }
    }
}

impl Backend {
    /// Keeps `files` (what `ringvm stats` reads of the device's process) on the process a
    /// restart starts.
    pub fn track_process(&mut self, files: Rc<RefCell<ProcFiles>>) {
        self.proc_files = Some(files);
    }

    /// Serves the transport's requests until the VM ends; brings the backend back when it
    /// goes away (within the budget), reports a failure to `exit` and returns otherwise.
    pub async fn serve(mut self, mem: GuestMemory, exit: Arc<VmExit>, heal: Rc<Healing>) {
        let mut restarts = Restarts::new(heal.budget);
        loop {
            // While idle the backend has nothing to say on this socket: readable means it
            // hung up (or sent something unasked for), either way it is gone. A process
            // that ends is seen by its pidfd.
            let next = {
                let gone = Box::pin(gone(&self.hangup, &self.origin));
                match select(self.requests.next(), gone).await {
                    Either::Left((r, _)) => Some(r),
                    Either::Right(_) => None,
                }
            };
            let ok = match next {
                None => self.recover(&mem, &exit, &heal, &mut restarts).await,
                Some(None) => return,
                Some(Some(request)) => {
                    self.handle(request, &mem, &exit, &heal, &mut restarts)
                        .await
                }
            };
            if !ok {
                return;
            }
        }
    }

    /// Handles one request of the transport; false when the VM ends.
    async fn handle(
        &mut self,
        request: Request,
        mem: &GuestMemory,
        exit: &Arc<VmExit>,
        heal: &Rc<Healing>,
        restarts: &mut Restarts,
    ) -> bool {
        match request {
            Request::Start {
                features,
                vrings,
                reply,
            } => {
                self.started = Some(Started { features, vrings });
                let res = self.start_rings(mem, false).await;
                match res {
                    Ok(()) => {
                        let _ = reply.send(Ok(()));
                        true
                    }
                    // The restart replays the start.
                    Err(e) if hung_up(&e) => {
                        let ok = self.recover(mem, exit, heal, restarts).await;
                        let _ = reply.send(if ok {
                            Ok(())
                        } else {
                            Err(format!("device {}: gone", self.name))
                        });
                        ok
                    }
                    Err(e) => {
                        let why = format!("device {}: cannot start: {e:#}", self.name);
                        let _ = reply.send(Err(why.clone()));
                        exit.report(ExitReason::Failed(why));
                        false
                    }
                }
            }
            Request::Stop { reply } => {
                // A reset device starts with a new inflight region.
                self.inflight = None;
                self.suspended = None;
                let indices: Vec<u32> = self
                    .started
                    .take()
                    .map(|s| s.vrings.iter().map(|v| v.index).collect())
                    .unwrap_or_default();
                let res = match self.frontend.stop(&indices).await {
                    Ok(_) => self.frontend.reset().await,
                    Err(e) => Err(e),
                };
                let ok = match res {
                    Ok(()) => true,
                    // A backend that is gone is stopped; the restart starts nothing.
                    Err(e) if hung_up(&e) => self.recover(mem, exit, heal, restarts).await,
                    Err(e) => {
                        let why = format!("device {}: cannot stop: {e:#}", self.name);
                        exit.report(ExitReason::Failed(why));
                        false
                    }
                };
                let _ = reply.send(());
                ok
            }
            Request::SetConfig {
                offset,
                data,
                reply,
            } => {
                let mut res = self.frontend.set_config(offset, &data).await;
                let mut ok = true;
                if matches!(&res, Err(e) if hung_up(e)) {
                    ok = self.recover(mem, exit, heal, restarts).await;
                    if ok {
                        res = self.frontend.set_config(offset, &data).await;
                    }
                }
                if res.is_ok() {
                    note_config_write(&mut self.config_writes, offset, data);
                }
                let _ = reply.send(res.map_err(|e| format!("{e:#}")));
                ok
            }
            Request::Suspend { suspend, reply } => {
                let res = self.suspend(suspend, mem).await;
                if let Err(why) = &res {
                    exit.report(ExitReason::Failed(why.clone()));
                }
                let ok = res.is_ok();
                let _ = reply.send(res);
                ok
            }
        }
    }

    /// Suspends (stops every started ring with GET_VRING_BASE, which returns once the
    /// backend has finished what it had in flight) or resumes (sets each ring up again from
    /// where it stopped) the device. A failure is a backend failure: it ends the VM.
    async fn suspend(&mut self, suspend: bool, mem: &GuestMemory) -> Result<(), String> {
        let what = if suspend { "suspend" } else { "resume" };
        let active: &[Vring] = self.started.as_ref().map_or(&[], |s| &s.vrings);
        let res = match (suspend, self.suspended.take()) {
            (true, None) => {
                let indices: Vec<u32> = active.iter().map(|v| v.index).collect();
                match self.frontend.stop(&indices).await {
                    Ok(bases) => {
                        self.suspended = Some(bases);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            (false, Some(bases)) => {
                let configs: Vec<VringConfig<'_>> = active
                    .iter()
                    .zip(bases)
                    .map(|(v, base)| v.config(base))
                    .collect();
                self.frontend.restart(mem, &configs).await
            }
            // Already as asked.
            (_, bases) => {
                self.suspended = bases;
                Ok(())
            }
        };
        res.map_err(|e| format!("device {}: cannot {what}: {e:#}", self.name))
    }

    /// Hands the started rings to the backend; after a restart each ring starts at the used
    /// index in guest memory and its call eventfd is signalled once.
    async fn start_rings(
        &mut self,
        mem: &GuestMemory,
        restarted: bool,
    ) -> std::result::Result<(), VhostError> {
        let Some(started) = &self.started else {
            return Ok(());
        };
        if self.frontend.tracks_inflight() && self.inflight.is_none() {
            let queues = started
                .vrings
                .iter()
                .map(|v| v.index + 1)
                .max()
                .unwrap_or(1);
            let size = started.vrings.iter().map(|v| v.size).max().unwrap_or(1);
            let queues = u16::try_from(queues).unwrap_or(u16::MAX);
            self.inflight = Some(self.frontend.get_inflight(queues, size).await?);
        }
        let mut configs = Vec::with_capacity(started.vrings.len());
        for v in &started.vrings {
            let base = if restarted {
                // What the guest has seen used; chains after it are done again.
                mem.load_u16(GuestAddress(v.used.wrapping_add(2)), Ordering::Acquire)
                    .map(u16::from_le)
                    .unwrap_or(0)
            } else {
                0
            };
            configs.push(v.config(base));
        }
        let inflight = self.inflight.as_ref().map(|(r, fd)| (r, fd.as_fd()));
        self.frontend
            .start_with_inflight(started.features, mem, &configs, inflight)
            .await?;
        if restarted {
            for call in started.vrings.iter().filter_map(|v| v.call.as_ref()) {
                // A spurious interrupt is harmless; a lost one would stall the guest.
                if let Ok(fd) = call.try_clone() {
                    let fd = executor::AsyncFd::new(fd);
                    let _ = fd.write(1u64.to_ne_bytes().to_vec()).await;
                }
            }
        }
        Ok(())
    }

    /// Brings the backend back after it went away, as often as the budget allows; false
    /// (with the VM's exit reported) when it cannot.
    async fn recover(
        &mut self,
        mem: &GuestMemory,
        exit: &Arc<VmExit>,
        heal: &Rc<Healing>,
        restarts: &mut Restarts,
    ) -> bool {
        let mut wait: Option<Duration> = None;
        loop {
            let why = self.why_gone().await;
            let allowed = match (&self.origin, &heal.respawner) {
                (Origin::Own { .. }, None) | (Origin::Program { .. }, _) => None,
                _ => restarts.take(Instant::now()),
            };
            let Some(n) = allowed else {
                exit.report(ExitReason::Failed(why));
                return false;
            };
            let budget = restarts.budget();
            eprintln!(
                "ringvm: {why}; restarting it ({n} of {} within {} s)",
                budget.max,
                budget.window.as_secs()
            );
            if let Some(delay) = wait {
                let _ = executor::sleep(delay).await;
            }
            match self.restart(mem, heal).await {
                Ok(()) => {
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    self.kick_after_restart();
                    return true;
                }
                Err(RestartError::Gone(e)) => {
                    let delay = retry_delay(wait);
                    eprintln!(
                        "ringvm: device {}: its restart failed: {e:#}; the next try in {} ms",
                        self.name,
                        delay.as_millis()
                    );
                    wait = Some(delay);
                }
                Err(RestartError::Fatal(e)) => {
                    exit.report(ExitReason::Failed(format!(
                        "device {}: cannot restart it: {e:#}",
                        self.name
                    )));
                    return false;
                }
            }
        }
    }

    /// Kicks every started ring a few times in the first moments after a restart. The dead
    /// process's io_uring is torn down by the kernel after the process has ended, and until
    /// then a read it had armed on a kick eventfd can still take a kick the guest sends to
    /// the new process, which would then wait for a kick that never comes (a guest that
    /// kicks only for new buffers would stall). A spare kick only makes the device look at
    /// its ring again.
    fn kick_after_restart(&self) {
        let Some(started) = &self.started else {
            return;
        };
        let kicks: Vec<OwnedFd> = started
            .vrings
            .iter()
            .filter_map(|v| v.kick.try_clone().ok())
            .collect();
        executor::spawn(async move {
            let fds: Vec<executor::AsyncFd> =
                kicks.into_iter().map(executor::AsyncFd::new).collect();
            for delay in RESTART_KICKS {
                let _ = executor::sleep(delay).await;
                for fd in &fds {
                    let _ = fd.write(1u64.to_ne_bytes().to_vec()).await;
                }
            }
        })
        .detach();
    }

    /// Why the backend is gone, as the VM's report says it: how its process died, or that
    /// its socket hung up.
    async fn why_gone(&self) -> String {
        match &self.origin {
            Origin::Own { process, .. } | Origin::Program { process } => {
                if let Ok(fd) = process.pidfd() {
                    let pidfd = executor::AsyncFd::new(fd);
                    if executor::timeout(EXIT_GRACE, pidfd.poll_readable())
                        .await
                        .is_err()
                    {
                        // Hung up but lingering: it is not coming back.
                        process.kill();
                        let _ = pidfd.poll_readable().await;
                    }
                }
                process.death().await
            }
            Origin::External { .. } => format!("device {}: the backend hung up", self.name),
        }
    }

    /// A new backend in place of the one that went away, given the same state.
    async fn restart(
        &mut self,
        mem: &GuestMemory,
        heal: &Rc<Healing>,
    ) -> std::result::Result<(), RestartError> {
        let (frontend, hangup) = match &mut self.origin {
            Origin::Own { process, slot } => {
                let respawner = heal
                    .respawner
                    .as_ref()
                    .ok_or_else(|| RestartError::Fatal(anyhow!("restarts are off")))?;
                let ((p, sock), files) = respawner
                    .respawn(*slot, &self.name)
                    .await
                    .map_err(RestartError::Fatal)?;
                *process = heal.processes.push(p);
                if let Some(current) = &self.proc_files {
                    *current.borrow_mut() = files;
                }
                handshake(&self.name, sock)
                    .await
                    .map_err(RestartError::Gone)?
            }
            Origin::External { path } => reconnect(&self.name, path, heal.reconnect_timeout)
                .await
                .map_err(RestartError::Fatal)?,
            Origin::Program { .. } => {
                return Err(RestartError::Fatal(anyhow!("it cannot be started again")))
            }
        };
        if offer(&frontend) != self.offered {
            return Err(RestartError::Fatal(anyhow!(
                "it came back with other features (features, protocol features, queues: \
                 {:?}, before {:?})",
                offer(&frontend),
                self.offered
            )));
        }
        self.frontend = frontend;
        self.hangup = hangup;
        let classify = |e: VhostError, what: &str| {
            let gone = hung_up(&e);
            let e = anyhow::Error::new(e).context(what.to_string());
            if gone {
                RestartError::Gone(e)
            } else {
                RestartError::Fatal(e)
            }
        };
        for (offset, data) in &self.config_writes {
            self.frontend
                .set_config(*offset, data)
                .await
                .map_err(|e| classify(e, "replaying a config write"))?;
        }
        self.start_rings(mem, true)
            .await
            .map_err(|e| classify(e, "replaying its rings"))?;
        if self.started.is_some() && !self.frontend.tracks_inflight() {
            // Without an inflight region the used index is all there is to start from.
            virtio::log::write(
                "ringvm",
                virtio::log::Level::Warn,
                format_args!(
                    "device {}: the backend does not track requests in flight (no vhost-user \
                     INFLIGHT_SHMFD): its rings start again at the used index, so a request \
                     it had completed out of order may be done twice and one it had in flight \
                     lost",
                    self.name
                ),
            );
        }
        if self.suspended.is_some() {
            // Restarted while suspended: stopped again, where the replay left each ring.
            let indices: Vec<u32> = self
                .started
                .as_ref()
                .map(|s| s.vrings.iter().map(|v| v.index).collect())
                .unwrap_or_default();
            let bases = self
                .frontend
                .stop(&indices)
                .await
                .map_err(|e| classify(e, "suspending it again"))?;
            self.suspended = Some(bases);
        }
        Ok(())
    }
}

/// Connects to a backend's socket at `path`, within [`CONNECT_TIMEOUT`].
pub async fn connect_socket(path: &std::path::Path) -> std::io::Result<executor::AsyncFd> {
    executor::timeout(CONNECT_TIMEOUT, executor::connect_unix(path))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not accepted within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
}

/// Connects to `path` again and sets the connection up, trying until `limit` has passed: the
/// socket may not be there yet, or still be the old backend's, which resets the connection.
async fn reconnect(
    name: &str,
    path: &std::path::Path,
    limit: Duration,
) -> Result<(Frontend, executor::AsyncFd)> {
    let deadline = Instant::now() + limit;
    loop {
        let attempt = async {
            let fd = connect_socket(path).await?;
            let fd = fd
                .into_owned()
                .map_err(|_| anyhow!("the socket is not a plain descriptor"))?;
            handshake(name, fd).await
        };
        match attempt.await {
            Ok(connected) => return Ok(connected),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "it did not come back at {} within {} s: {e:#}",
                    path.display(),
                    limit.as_secs()
                )
            }
            Err(_) => {
                let _ = executor::sleep(RECONNECT_INTERVAL).await;
            }
        }
    }
}

/// The control socket's handle on a vhost-user device: suspend and resume.
#[derive(Clone)]
pub struct DeviceControl {
    requests: mpsc::UnboundedSender<Request>,
}

impl DeviceControl {
    /// Suspends (`true`) or resumes the device; returns once the backend has answered.
    pub async fn suspend(&self, suspend: bool) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .unbounded_send(Request::Suspend { suspend, reply })
            .map_err(|_| "the device's task has ended".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the device's task has ended".to_string()))
    }
}

impl VhostUserDevice {
    /// How many times the device's backend was restarted (for stats).
    pub fn restarts(&self) -> Arc<AtomicU32> {
        self.restarts.clone()
    }

    /// The device's configuration space as this side supplies it (virtio-fs: its tag);
    /// the guest's writes to it are ignored.
    pub fn set_config_space(&mut self, config: Vec<u8>) {
        self.config = config;
        self.config_read_only = true;
    }

    /// A handle for the control socket.
    pub fn control(&self) -> DeviceControl {
        DeviceControl {
            requests: self.requests.clone(),
        }
    }

    /// Sends `request` to the main thread and blocks this (vCPU) thread for the answer.
    fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.requests.unbounded_send(make(tx)).ok()?;
        // Ends with Canceled when the VM is shutting down and the main task is gone.
        futures::executor::block_on(rx).ok()
    }
}

impl VirtioDevice for VhostUserDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if end > self.config.len() || self.config_read_only {
            return;
        }
        let done = self.call(|reply| Request::SetConfig {
            offset: start as u32,
            data: data.to_vec(),
            reply,
        });
        if let Some(Ok(())) = done {
            self.config[start..end].copy_from_slice(data);
        }
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig<'_>]) -> Result<(), String> {
        let mut vrings = Vec::with_capacity(queues.len());
        for q in queues {
            let dup = |fd: std::os::fd::BorrowedFd<'_>| {
                fd.try_clone_to_owned()
                    .map_err(|e| format!("cannot duplicate an eventfd: {e}"))
            };
            vrings.push(Vring {
                index: q.index as u32,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: dup(q.kick)?,
                call: q.call.map(dup).transpose()?,
            });
        }
        self.call(|reply| Request::Start {
            features,
            vrings,
            reply,
        })
        .unwrap_or_else(|| Err("the VM is shutting down".into()))
    }

    fn reset(&mut self) {
        let _ = self.call(|reply| Request::Stop { reply });
    }
}

/// Adds an accepted config write to those a restart replays. A write over all the bytes of
/// an earlier one makes that one moot and takes its place, so the list holds one entry per
/// byte range the backend took, however often the guest writes.
fn note_config_write(writes: &mut Vec<(u32, Vec<u8>)>, offset: u32, data: Vec<u8>) {
    let end = u64::from(offset) + data.len() as u64;
    writes.retain(|(o, d)| !(offset <= *o && u64::from(*o) + d.len() as u64 <= end));
    writes.push((offset, data));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_writes_to_replay_stay_one_per_range_however_many_the_guest_makes() {
        let mut writes = Vec::new();
        for i in 0..10_000u32 {
            note_config_write(&mut writes, 0x20, vec![i as u8]);
        }
        assert_eq!(writes, [(0x20, vec![0x0f])]);
        // Earlier writes not wholly covered stay, in order; a covering one replaces them.
        note_config_write(&mut writes, 0x21, vec![1, 2]);
        note_config_write(&mut writes, 0x1f, vec![3]);
        assert_eq!(
            writes,
            [(0x20, vec![0x0f]), (0x21, vec![1, 2]), (0x1f, vec![3])]
        );
        note_config_write(&mut writes, 0x1e, vec![5; 8]);
        assert_eq!(writes, [(0x1e, vec![5; 8])]);
    }

    #[test]
    fn failed_restarts_wait_longer_each_time_up_to_a_second() {
        let mut wait = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let d = retry_delay(wait);
            seen.push(d.as_millis());
            wait = Some(d);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }
}
