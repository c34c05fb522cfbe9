//! Virtio devices whose backend is a vhost-user process: ringvm's own device processes and
//! external backends given with `--vhost-user`.
//!
//! The PCI transport runs on vCPU threads; the vhost-user connection lives on the main
//! thread's executor. [`VhostUserDevice`] (the transport's side) sends each request to the
//! device's [`Backend::serve`] task and blocks its vCPU until the backend has answered. A
//! backend that fails, misbehaves, hangs up or stops answering ends the VM with its name.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either};
use futures::StreamExt;
use memory::{GuestAddress, GuestMemory};
use virtio::vhost_user::frontend::{Frontend, VringConfig};
use virtio::vhost_user::Connection;
use virtio::DeviceType;

use crate::devices::pci::{QueueConfig, VirtioDevice};
use crate::exit::{ExitReason, VmExit};

/// How long the VMM waits for any reply of a backend before declaring it hung.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hang-up waits before it is reported (see `Backend::serve`).
const HANGUP_GRACE: Duration = Duration::from_millis(250);
/// Largest queue the transport offers for a vhost-user device.
const MAX_QUEUE_SIZE: u16 = 256;

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
}

/// The main thread's half: the connection and the requests from the transport.
pub struct Backend {
    name: String,
    frontend: Frontend,
    hangup: executor::AsyncFd,
    requests: mpsc::UnboundedReceiver<Request>,
}

/// Connects to a backend on the socket `sock` and reads what the transport needs to present
/// the device: its features, queue count and configuration space.
pub async fn connect(
    name: &str,
    device_type: DeviceType,
    sock: OwnedFd,
) -> Result<(VhostUserDevice, Backend)> {
    let watch = sock
        .try_clone()
        .with_context(|| format!("device {name}: cannot duplicate its socket"))?;
    let conn = Connection::new(executor::AsyncFd::new(sock));
    let frontend = Frontend::connect(conn, REPLY_TIMEOUT)
        .await
        .with_context(|| format!("device {name}: vhost-user set-up failed"))?;
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
    let device = VhostUserDevice {
        name: name.to_string(),
        device_type: device_type.id(),
        features: frontend.features(),
        num_queues,
        config,
        config_read_only: false,
        requests: tx,
    };
    let backend = Backend {
        name: name.to_string(),
        frontend,
        hangup: executor::AsyncFd::new(watch),
        requests: rx,
    };
    Ok((device, backend))
}

impl Backend {
    /// Serves the transport's requests until the VM ends; reports a backend failure (an
    /// error reply, a hang-up, no reply in time) to `exit` and returns.
    pub async fn serve(mut self, mem: GuestMemory, exit: Arc<VmExit>) {
        let mut started: Vec<u32> = Vec::new();
        // The started rings (kept to restart them on resume) and, while suspended, where
        // each stopped.
        let mut active: Vec<Vring> = Vec::new();
        let mut suspended: Option<Vec<u16>> = None;
        loop {
            // While idle the backend has nothing to say on this socket: readable means it
            // hung up (or sent something unasked for), either way it is gone.
            let next = {
                let hangup = Box::pin(self.hangup.poll_readable());
                match select(self.requests.next(), hangup).await {
                    Either::Left((r, _)) => r,
                    Either::Right(_) => {
                        // A device process that died is reported by its watcher with how it
                        // ended (signal, refused system call); give that report the lead.
                        let _ = executor::sleep(HANGUP_GRACE).await;
                        let why = format!("device {}: the backend hung up", self.name);
                        exit.report(ExitReason::Failed(why));
                        return;
                    }
                }
            };
            let Some(request) = next else { return };
            match request {
                Request::Start {
                    features,
                    vrings,
                    reply,
                } => {
                    let configs: Vec<VringConfig<'_>> = vrings
                        .iter()
                        .map(|v| VringConfig {
                            index: v.index,
                            size: v.size,
                            desc: GuestAddress(v.desc),
                            avail: GuestAddress(v.avail),
                            used: GuestAddress(v.used),
                            base: 0,
                            kick: v.kick.as_fd(),
                            call: v.call.as_ref().map(|c| c.as_fd()),
                        })
                        .collect();
                    let res = self.frontend.start(features, &mem, &configs).await;
                    started = vrings.iter().map(|v| v.index).collect();
                    active = vrings;
                    if let Err(e) = res {
                        let why = format!("device {}: cannot start: {e:#}", self.name);
                        let _ = reply.send(Err(why.clone()));
                        exit.report(ExitReason::Failed(why));
                        return;
                    }
                    let _ = reply.send(Ok(()));
                }
                Request::Stop { reply } => {
                    let res = match self.frontend.stop(&started).await {
                        Ok(_) => self.frontend.reset().await,
                        Err(e) => Err(e),
                    };
                    started.clear();
                    active.clear();
                    suspended = None;
                    let _ = reply.send(());
                    if let Err(e) = res {
                        let why = format!("device {}: cannot stop: {e:#}", self.name);
                        exit.report(ExitReason::Failed(why));
                        return;
                    }
                }
                Request::SetConfig {
                    offset,
                    data,
                    reply,
                } => {
                    let res = self.frontend.set_config(offset, &data).await;
                    let _ = reply.send(res.map_err(|e| format!("{e:#}")));
                }
                Request::Suspend { suspend, reply } => {
                    let res = self.suspend(suspend, &mem, &active, &mut suspended).await;
                    if let Err(why) = &res {
                        exit.report(ExitReason::Failed(why.clone()));
                    }
                    let failed = res.is_err();
                    let _ = reply.send(res);
                    if failed {
                        return;
                    }
                }
            }
        }
    }
}

impl Backend {
    /// Suspends (stops every started ring with GET_VRING_BASE, which returns once the
    /// backend has finished what it had in flight) or resumes (sets each ring up again from
    /// where it stopped) the device. A failure is a backend failure: it ends the VM.
    async fn suspend(
        &self,
        suspend: bool,
        mem: &GuestMemory,
        active: &[Vring],
        suspended: &mut Option<Vec<u16>>,
    ) -> Result<(), String> {
        let what = if suspend { "suspend" } else { "resume" };
        let res = match (suspend, suspended.take()) {
            (true, None) => {
                let indices: Vec<u32> = active.iter().map(|v| v.index).collect();
                self.frontend.stop(&indices).await.map(|bases| {
                    *suspended = Some(bases);
                })
            }
            (false, Some(bases)) => {
                let configs: Vec<VringConfig<'_>> = active
                    .iter()
                    .zip(bases)
                    .map(|(v, base)| VringConfig {
                        index: v.index,
                        size: v.size,
                        desc: GuestAddress(v.desc),
                        avail: GuestAddress(v.avail),
                        used: GuestAddress(v.used),
                        base,
                        kick: v.kick.as_fd(),
                        call: v.call.as_ref().map(|c| c.as_fd()),
                    })
                    .collect();
                self.frontend.restart(mem, &configs).await
            }
            // Already as asked.
            (_, bases) => {
                *suspended = bases;
                Ok(())
            }
        };
        res.map_err(|e| format!("device {}: cannot {what}: {e:#}", self.name))
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
