//! A single-threaded async vhost-user backend: [`serve`] answers a frontend's requests for a
//! [`Device`] and runs one executor task per started queue.
//!
//! Everything the frontend sends is checked before it acts: a malformed message, an index
//! beyond the device's queues, a queue size it cannot take, a memory table it cannot map or a
//! ring outside that memory fails the request. With `REPLY_ACK` negotiated and the request
//! asking for a reply, the failure is answered with a nonzero status and the connection goes
//! on; otherwise the backend logs it (`ringvm device <name>: ...` on stderr), stops its
//! queues, closes the connection and `serve` returns the error.
//!
//! A frontend may also shrink a memory region's file after `SET_MEM_TABLE`. In a device
//! process (which installs [`memory::fault::install_sigbus_handler`]) the access that finds
//! the hole survives, and the server ends with [`Error::MemoryShrunk`] naming the region.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use executor::{EventFd, EventFdStream, Task};
use futures::future::{self, Either};
use memory::{GuestAddress, GuestMemory, RegionFd};

use super::connection::Connection;
use super::message::{
    encode_ack, encode_reply, Config, Inflight, MemTable, MemoryRegion, Message, MessageError,
    Request, RequestBody, VringAddr, VringFd, VringState, MAX_CONFIG_SIZE, U64,
};
use super::{
    error_chain, Error, Result, PROTOCOL_F_CONFIG, PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_RESET_DEVICE,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use crate::queue::inflight::{queue_region_size, InflightRing};
use crate::{AsyncQueue, Queue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

/// The protocol features the backend offers.
pub const PROTOCOL_FEATURES: u64 = (1 << PROTOCOL_F_MQ)
    | (1 << PROTOCOL_F_REPLY_ACK)
    | (1 << PROTOCOL_F_CONFIG)
    | (1 << PROTOCOL_F_RESET_DEVICE)
    | (1 << PROTOCOL_F_CONFIGURE_MEM_SLOTS);

/// The largest inflight region a frontend may hand over (`SET_INFLIGHT_FD`).
const MAX_INFLIGHT_SIZE: u64 = 16 << 20;

/// Memory for the inflight region a frontend asks for with `GET_INFLIGHT_FD`, made before
/// the device's jail (whose policy has no memfd_create): enough for all of `device`'s queues
/// at their largest size. A backend given one offers `INFLIGHT_SHMFD`
/// ([`serve_with_inflight`]).
pub fn reserve_inflight(num_queues: usize, max_queue_size: u16) -> Result<GuestMemory> {
    let size = (num_queues as u64).max(1) * queue_region_size(max_queue_size);
    GuestMemory::new(&[(GuestAddress(0), size.next_multiple_of(4096))]).map_err(Error::MapInflight)
}

/// An inflight region the frontend set (`SET_INFLIGHT_FD`).
struct InflightRegion {
    mem: GuestMemory,
    num_queues: u16,
    queue_size: u16,
}

/// The most memory regions `ADD_MEM_REG` may build up (`GET_MAX_MEM_SLOTS`).
pub const MAX_MEM_SLOTS: usize = 32;

/// The ring feature bits a device supports unless it says otherwise.
pub const DEFAULT_TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC);

/// A virtio device served over vhost-user.
pub trait Device: 'static {
    /// Short name for log lines: "rng", "block".
    fn name(&self) -> &'static str;
    /// The virtio device id (rng = 4).
    fn device_type(&self) -> u32;
    /// The number of queues.
    fn num_queues(&self) -> usize;
    /// The largest queue size (a power of two of at most 32768).
    fn max_queue_size(&self) -> u16;
    /// The device feature bits. The server adds [`Device::transport_features`] and
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64;
    /// The ring and transport bits the device supports: `VIRTIO_F_VERSION_1`,
    /// `VIRTIO_RING_F_EVENT_IDX` and `VIRTIO_RING_F_INDIRECT_DESC` unless it forbids some.
    fn transport_features(&self) -> u64 {
        DEFAULT_TRANSPORT_FEATURES
    }
    /// The size of the config space in bytes.
    fn config_size(&self) -> usize {
        0
    }
    /// Reads `data.len()` bytes of config space at `offset` (inside `config_size`).
    fn read_config(&self, _offset: u32, data: &mut [u8]) {
        data.fill(0)
    }
    /// Writes config space at `offset` (inside `config_size`).
    fn write_config(&self, _offset: u32, _data: &[u8]) -> std::result::Result<(), String> {
        Err("read-only".into())
    }
    /// Runs one queue until `stop` fires, finishing requests in flight, then returns (and
    /// drops `queue`: the server takes the queue state back from its own handle).
    fn run_queue(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>>;
    /// Back to the state after creation (`RESET_DEVICE`), with every queue stopped.
    fn reset(&self) {}
    /// The frontend handed over the rings of an earlier backend that went away (an inflight
    /// region in use before this connection): what lived only in that backend (vsock
    /// connections, say) is gone, and the driver may need telling. Called once, before the
    /// first queue runs.
    fn resumed(&self) {}
}

#[derive(Default)]
struct StopInner {
    stopped: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

/// Fires once when a queue must stop. A cheap clone; every clone is a future that resolves
/// when the signal fires, and holds no I/O: a device may `select` a fresh clone against
/// [`AsyncQueue::next_chain`] on every turn of its loop (the queue keeps its one kick read
/// in flight across dropped waits).
#[derive(Clone, Default)]
pub struct StopSignal {
    inner: Rc<StopInner>,
}

impl fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopSignal")
            .field("stopped", &self.inner.stopped.get())
            .finish()
    }
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Fires the signal: every clone resolves.
    pub fn stop(&self) {
        self.inner.stopped.set(true);
        for waker in self.inner.wakers.take() {
            waker.wake();
        }
    }

    /// Whether the signal fired.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.get()
    }
}

impl Future for StopSignal {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.stopped.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.inner.wakers.borrow_mut();
        // One entry per task: a device polls a fresh clone on every turn of its loop.
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A started queue: its task, the signal that stops it, and the server's handle on it.
struct Running {
    stop: StopSignal,
    task: Task<()>,
    queue: Rc<AsyncQueue>,
}

/// What the frontend set up for one queue.
struct Vring {
    /// The queue state while it is not running (size, next avail index).
    queue: Queue,
    /// Ring addresses, in the frontend's address space.
    addr: Option<VringAddr>,
    kick: Option<OwnedFd>,
    /// `None`: no call fd (NOFD); the device signals nobody.
    call: Option<OwnedFd>,
    /// Kept for the frontend; the backend reports no ring errors through it.
    err: Option<OwnedFd>,
    enabled: bool,
    running: Option<Running>,
}

struct Server<D: Device> {
    device: Rc<D>,
    conn: Connection,
    offered: u64,
    acked: u64,
    protocol: u64,
    mem: Option<GuestMemory>,
    vrings: Vec<Vring>,
    /// The protocol features offered: [`PROTOCOL_FEATURES`], with `INFLIGHT_SHMFD` when a
    /// region was reserved.
    protocol_offered: u64,
    /// Memory reserved for `GET_INFLIGHT_FD`.
    inflight_pool: Option<GuestMemory>,
    /// The region `SET_INFLIGHT_FD` gave.
    inflight: Option<InflightRegion>,
    /// Descriptors to send with the next reply.
    reply_fds: Vec<OwnedFd>,
    /// Whether a queue has started on this connection (`Device::resumed` comes before).
    started_once: bool,
}

/// Serves `device` on `conn` until the frontend closes the connection (`Ok`) or sends
/// something that cannot be answered (`Err`, logged on stderr). Every started queue is
/// stopped before it returns.
pub async fn serve<D: Device>(device: Rc<D>, conn: Connection) -> Result<()> {
    serve_with_inflight(device, conn, None).await
}

/// [`serve`], offering inflight I/O tracking in `inflight` (from [`reserve_inflight`]).
pub async fn serve_with_inflight<D: Device>(
    device: Rc<D>,
    conn: Connection,
    inflight: Option<GuestMemory>,
) -> Result<()> {
    let name = device.name();
    let mut server = match Server::new(device, conn, inflight) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("ringvm device {name}: {}", error_chain(&e));
            return Err(e);
        }
    };
    let result = server.run().await;
    server.stop_all().await;
    if let Err(e) = &result {
        eprintln!("ringvm device {name}: {}", error_chain(e));
    }
    result
}

impl<D: Device> Server<D> {
    fn new(
        device: Rc<D>,
        conn: Connection,
        inflight_pool: Option<GuestMemory>,
    ) -> Result<Server<D>> {
        let max = device.max_queue_size();
        let vrings = (0..device.num_queues())
            .map(|index| {
                let queue = Queue::new(max).map_err(|source| Error::QueueSetup {
                    index: index as u32,
                    source,
                })?;
                Ok(Vring {
                    queue,
                    addr: None,
                    kick: None,
                    call: None,
                    err: None,
                    enabled: false,
                    running: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let offered =
            device.features() | device.transport_features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        Ok(Server {
            device,
            conn,
            offered,
            acked: 0,
            protocol: 0,
            mem: None,
            vrings,
            protocol_offered: if inflight_pool.is_some() {
                PROTOCOL_FEATURES | (1 << PROTOCOL_F_INFLIGHT_SHMFD)
            } else {
                PROTOCOL_FEATURES
            },
            inflight_pool,
            inflight: None,
            reply_fds: Vec::new(),
            started_once: false,
        })
    }

    fn log(&self, what: impl fmt::Display) {
        eprintln!("ringvm device {}: {what}", self.device.name());
    }

    fn reply_ack(&self) -> bool {
        self.protocol & (1 << PROTOCOL_F_REPLY_ACK) != 0
    }

    /// Whether rings wait for `SET_VRING_ENABLE` (else they start with their kick fd).
    fn protocol_negotiated(&self) -> bool {
        self.acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0
    }

    async fn run(&mut self) -> Result<()> {
        // In a device process, the SIGBUS handler's notifier: the frontend shrank memory.
        let mut faults = match memory::fault::notifier() {
            Some(fd) => Some(EventFdStream::new(
                fd.try_clone_to_owned().map_err(Error::DupFd)?,
            )),
            None => None,
        };
        loop {
            let received = match faults.as_mut() {
                None => self.conn.recv().await?,
                Some(faults) => {
                    let recv = pin!(self.conn.recv());
                    let fault = pin!(faults.next_value());
                    match future::select(recv, fault).await {
                        Either::Left((received, _)) => received?,
                        // A part-received message is dropped with the connection.
                        Either::Right(_) => return Err(self.memory_fault()),
                    }
                }
            };
            let Some((msg, fds)) = received else {
                return Ok(());
            };
            if msg.header.is_reply() {
                return Err(Error::Message(MessageError::UnexpectedReply(
                    msg.header.request,
                )));
            }
            let request = msg.header.request;
            let ack = msg.header.need_reply() && self.reply_ack() && !request.has_reply();
            match self.handle(&msg, fds).await {
                Ok(Some(reply)) => {
                    let fds = std::mem::take(&mut self.reply_fds);
                    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                    self.conn.send(reply, &fds).await?
                }
                Ok(None) if ack => self.conn.send(encode_ack(request, true), &[]).await?,
                Ok(None) => {}
                Err(e @ Error::ConfigWrite(_)) => {
                    self.log(format_args!("{request:?}: {}", error_chain(&e)));
                    if ack {
                        self.conn.send(encode_ack(request, false), &[]).await?;
                    }
                }
                Err(e) if ack => {
                    self.log(format_args!("{request:?} failed: {}", error_chain(&e)));
                    self.conn.send(encode_ack(request, false), &[]).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The error for a fault in guest memory that the SIGBUS handler survived: the region
    /// whose file the frontend shrank, if it is in the current table.
    fn memory_fault(&self) -> Error {
        match self.mem.as_ref().map(GuestMemory::check_backing) {
            Some(Err(e)) => Error::MemoryShrunk(e),
            _ => Error::MemoryFault(memory::fault::faults()),
        }
    }

    fn vring_index(&self, index: u32) -> Result<usize> {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Err(Error::QueueIndex {
                index,
                num_queues: self.vrings.len(),
            });
        }
        Ok(i)
    }

    /// A ring's layout may only change while it is stopped.
    fn stopped_vring(&self, request: Request, index: u32) -> Result<usize> {
        let i = self.vring_index(index)?;
        if self.vrings[i].running.is_some() {
            return Err(Error::RingRunning { request, index });
        }
        Ok(i)
    }

    /// Handles one request; returns the reply to send, if the request has one.
    async fn handle(&mut self, msg: &Message, mut fds: Vec<OwnedFd>) -> Result<Option<Vec<u8>>> {
        let request = msg.header.request;
        let body = msg.parse_body().map_err(Error::Message)?;
        match (request, body) {
            (Request::SetOwner, _) => {}
            (Request::ResetOwner | Request::ResetDevice, _) => self.reset().await,
            (Request::GetFeatures, _) => {
                return Ok(Some(encode_reply(request, &U64(self.offered))))
            }
            (Request::SetFeatures, RequestBody::U64(U64(acked))) => {
                if acked & !self.offered != 0 {
                    return Err(Error::FeaturesNotOffered {
                        acked,
                        offered: self.offered,
                    });
                }
                self.acked = acked;
            }
            (Request::GetProtocolFeatures, _) => {
                return Ok(Some(encode_reply(request, &U64(self.protocol_offered))))
            }
            (Request::SetProtocolFeatures, RequestBody::U64(U64(acked))) => {
                if acked & !self.protocol_offered != 0 {
                    return Err(Error::ProtocolFeaturesNotOffered {
                        acked,
                        offered: self.protocol_offered,
                    });
                }
                self.protocol = acked;
            }
            (Request::GetInflightFd, RequestBody::Inflight(body)) => {
                return self.get_inflight(body).map(Some);
            }
            (Request::SetInflightFd, RequestBody::Inflight(body)) => {
                // `Message::decode` checked that one fd came.
                let fd = fds.pop().ok_or(Error::InflightNotNegotiated(request))?;
                self.set_inflight(body, fd)?;
            }
            (Request::GetQueueNum, _) => {
                return Ok(Some(encode_reply(request, &U64(self.vrings.len() as u64))))
            }
            (Request::SetMemTable, RequestBody::MemTable(table)) => {
                self.set_mem_table(table, fds).await?
            }
            (Request::GetMaxMemSlots, _) => {
                return Ok(Some(encode_reply(request, &U64(MAX_MEM_SLOTS as u64))))
            }
            (Request::AddMemReg, RequestBody::AddMemReg(body)) => {
                self.add_mem_region(body.region, fds).await?
            }
            (Request::RemMemReg, RequestBody::RemMemReg(body)) => {
                self.remove_mem_region(body.region).await?
            }
            (Request::SetVringNum, RequestBody::VringState(state)) => {
                let i = self.stopped_vring(request, state.index)?;
                let max = self.device.max_queue_size();
                let size = u16::try_from(state.num)
                    .ok()
                    .filter(|&s| s != 0 && s <= max && s.is_power_of_two());
                let size = size.ok_or(Error::QueueSize {
                    size: state.num,
                    max,
                })?;
                self.vrings[i].queue.set_size(size);
            }
            (Request::SetVringAddr, RequestBody::VringAddr(addr)) => {
                let i = self.stopped_vring(request, addr.index)?;
                let mem = self.mem.as_ref().ok_or(Error::NoMemoryTable(request))?;
                translate(mem, &addr)?;
                self.vrings[i].addr = Some(addr);
            }
            (Request::SetVringBase, RequestBody::VringState(state)) => {
                let i = self.stopped_vring(request, state.index)?;
                let base = u16::try_from(state.num).map_err(|_| Error::VringBase {
                    index: state.index,
                    base: state.num,
                })?;
                self.vrings[i].queue.set_next_avail(base);
            }
            (Request::GetVringBase, RequestBody::VringState(state)) => {
                let i = self.vring_index(state.index)?;
                self.stop_vring(i).await;
                let vring = &mut self.vrings[i];
                // A stopped ring starts again only with a new kick fd.
                vring.kick = None;
                let base = VringState {
                    index: state.index,
                    num: u32::from(vring.queue.next_avail()),
                };
                return Ok(Some(encode_reply(request, &base)));
            }
            (Request::SetVringKick, RequestBody::VringFd(body)) => {
                let i = self.vring_fd_index(body)?;
                // The no-fd bit asks the back-end to poll the ring instead of waiting for
                // kicks. Queues here run on the one executor that also serves this socket:
                // they wait for kicks and do not poll, so the request is refused (a failure
                // REPLY_ACK, or a closed connection) rather than acknowledged and the queue
                // never processed. The ring keeps its previous kick fd, if it had one.
                let kick = fds
                    .pop()
                    .ok_or(Error::PolledRing(u32::from(body.index())))?;
                self.stop_vring(i).await;
                self.vrings[i].kick = Some(kick);
                self.start_vring(i)?;
            }
            (Request::SetVringCall, RequestBody::VringFd(body)) => {
                let i = self.vring_fd_index(body)?;
                let vring = &mut self.vrings[i];
                vring.call = fds.pop();
                // A running ring goes on with the new fd: frontends swap it whenever the
                // guest masks or unmasks the queue's interrupt, and a restart would drain
                // the requests in flight and drop what a queue holds (a frame waiting for
                // receive buffers).
                if let Some(running) = &vring.running {
                    running.queue.set_call(call_eventfd(&vring.call)?);
                }
            }
            (Request::SetVringErr, RequestBody::VringFd(body)) => {
                let i = self.vring_fd_index(body)?;
                self.vrings[i].err = fds.pop();
            }
            (Request::SetVringEnable, RequestBody::VringState(state)) => {
                let i = self.vring_index(state.index)?;
                let enable = state.num == 1;
                self.vrings[i].enabled = enable;
                if enable {
                    self.start_vring(i)?;
                } else {
                    self.stop_vring(i).await;
                }
            }
            (Request::GetConfig, RequestBody::Config(config)) => {
                return Ok(Some(self.get_config(&config)));
            }
            (Request::SetConfig, RequestBody::Config(config)) => {
                self.config_range(&config)?;
                self.device
                    .write_config(config.offset, &config.payload)
                    .map_err(Error::ConfigWrite)?;
            }
            // `parse_body` returns the body type of each request: unreachable.
            (_, _) => {
                return Err(Error::Message(MessageError::BadBodySize {
                    expected: 0,
                    got: msg.body.len(),
                }))
            }
        }
        Ok(None)
    }

    fn inflight_negotiated(&self, request: Request) -> Result<()> {
        if self.protocol & (1 << PROTOCOL_F_INFLIGHT_SHMFD) == 0 {
            return Err(Error::InflightNotNegotiated(request));
        }
        Ok(())
    }

    /// `GET_INFLIGHT_FD`: the reserved region, cleared, for `body`'s queues.
    fn get_inflight(&mut self, body: Inflight) -> Result<Vec<u8>> {
        self.inflight_negotiated(Request::GetInflightFd)?;
        let pool = self
            .inflight_pool
            .as_ref()
            .ok_or(Error::InflightNotNegotiated(Request::GetInflightFd))?;
        let size = u64::from(body.num_queues) * queue_region_size(body.queue_size);
        let fits = body.num_queues as usize <= self.vrings.len()
            && body.queue_size <= self.device.max_queue_size()
            && body.num_queues > 0
            && body.queue_size > 0
            && size <= pool.total_size();
        if !fits {
            return Err(Error::InflightSize {
                size,
                offset: 0,
                num_queues: body.num_queues,
                queue_size: body.queue_size,
            });
        }
        pool.fill(GuestAddress(0), size as usize, 0)
            .map_err(Error::ClearInflight)?;
        let region = pool
            .regions()
            .next()
            .ok_or(Error::InflightNotNegotiated(Request::GetInflightFd))?;
        let fd = region.fd.try_clone_to_owned().map_err(Error::DupFd)?;
        self.reply_fds = vec![fd];
        let reply = Inflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: body.num_queues,
            queue_size: body.queue_size,
        };
        Ok(encode_reply(Request::GetInflightFd, &reply))
    }

    /// `SET_INFLIGHT_FD`: maps the region the frontend kept (rings started later track
    /// their chains in it, and take back what a dead backend left in flight).
    fn set_inflight(&mut self, body: Inflight, fd: OwnedFd) -> Result<()> {
        self.inflight_negotiated(Request::SetInflightFd)?;
        let needed = u64::from(body.num_queues) * queue_region_size(body.queue_size);
        let bad = body.num_queues == 0
            || body.queue_size == 0
            || body.queue_size > self.device.max_queue_size()
            || body.mmap_size < needed
            || body.mmap_size > MAX_INFLIGHT_SIZE;
        if bad {
            return Err(Error::InflightSize {
                size: body.mmap_size,
                offset: body.mmap_offset,
                num_queues: body.num_queues,
                queue_size: body.queue_size,
            });
        }
        let mem = GuestMemory::from_regions(vec![RegionFd {
            fd,
            fd_offset: body.mmap_offset,
            size: body.mmap_size,
            guest_addr: GuestAddress(0),
            user_addr: 0,
        }])
        .map_err(Error::MapInflight)?;
        self.inflight = Some(InflightRegion {
            mem,
            num_queues: body.num_queues,
            queue_size: body.queue_size,
        });
        Ok(())
    }

    fn vring_fd_index(&self, body: VringFd) -> Result<usize> {
        self.vring_index(u32::from(body.index()))
    }

    fn config_range(&self, config: &Config) -> Result<()> {
        let config_size = self.device.config_size().min(MAX_CONFIG_SIZE as usize);
        if u64::from(config.offset) + u64::from(config.size) > config_size as u64 {
            return Err(Error::ConfigRange {
                offset: config.offset,
                size: config.size,
                config_size,
            });
        }
        Ok(())
    }

    /// The `GET_CONFIG` reply: the bytes, or an empty payload if the range (or the flags)
    /// cannot be served: the spec's failure reply, sent for every well-framed request.
    fn get_config(&self, config: &Config) -> Vec<u8> {
        let mut reply = Config {
            offset: config.offset,
            size: config.size,
            flags: 0,
            payload: vec![0; config.size as usize],
        };
        let valid = config
            .check_range_and_flags()
            .map_err(Error::Message)
            .and_then(|()| self.config_range(config));
        match valid {
            Ok(()) => self.device.read_config(config.offset, &mut reply.payload),
            Err(e) => {
                self.log(format_args!("GetConfig failed: {}", error_chain(&e)));
                reply.size = 0;
                reply.payload.clear();
            }
        }
        encode_reply(Request::GetConfig, &reply)
    }

    async fn set_mem_table(&mut self, table: MemTable, fds: Vec<OwnedFd>) -> Result<()> {
        // `Message::decode` checked that one fd came per region.
        let regions = table
            .regions
            .iter()
            .zip(fds)
            .map(|(r, fd)| RegionFd {
                fd,
                fd_offset: r.mmap_offset,
                size: r.memory_size,
                guest_addr: GuestAddress(r.guest_phys_addr),
                user_addr: r.userspace_addr,
            })
            .collect();
        let mem = GuestMemory::from_regions(regions).map_err(Error::MapMemory)?;
        self.replace_memory(mem).await
    }

    /// `ADD_MEM_REG`: the current regions plus `region`.
    async fn add_mem_region(&mut self, region: MemoryRegion, mut fds: Vec<OwnedFd>) -> Result<()> {
        let mut regions = self.region_fds()?;
        if regions.len() >= MAX_MEM_SLOTS {
            return Err(Error::MemSlotsFull(MAX_MEM_SLOTS));
        }
        // `Message::decode` checked that exactly one fd came.
        let fd = fds.pop().ok_or(Error::Message(MessageError::WrongFdCount {
            request: Request::AddMemReg,
            expected: 1,
            got: 0,
        }))?;
        regions.push(RegionFd {
            fd,
            fd_offset: region.mmap_offset,
            size: region.memory_size,
            guest_addr: GuestAddress(region.guest_phys_addr),
            user_addr: region.userspace_addr,
        });
        let mem = GuestMemory::from_regions(regions).map_err(Error::MapMemory)?;
        self.replace_memory(mem).await
    }

    /// `REM_MEM_REG`: the current regions but the one at `region`'s guest address, user
    /// address and size (its mmap offset is ignored, as the spec says).
    async fn remove_mem_region(&mut self, region: MemoryRegion) -> Result<()> {
        let mut regions = self.region_fds()?;
        let before = regions.len();
        regions.retain(|r| {
            !(r.guest_addr.0 == region.guest_phys_addr
                && r.user_addr == region.userspace_addr
                && r.size == region.memory_size)
        });
        if regions.len() == before {
            return Err(Error::NoSuchRegion {
                guest_addr: region.guest_phys_addr,
                size: region.memory_size,
            });
        }
        let mem = GuestMemory::from_regions(regions).map_err(Error::MapMemory)?;
        self.replace_memory(mem).await
    }

    /// The current regions, with duplicated fds, to build a new table from.
    fn region_fds(&self) -> Result<Vec<RegionFd>> {
        match &self.mem {
            Some(mem) => mem
                .regions()
                .map(|r| r.to_region_fd().map_err(Error::DupFd))
                .collect(),
            None => Ok(Vec::new()),
        }
    }

    /// Switches to `mem`: running queues are stopped (finishing what they have in flight)
    /// and started again on the new table.
    async fn replace_memory(&mut self, mem: GuestMemory) -> Result<()> {
        // Running queues move to the new table (their ring addresses are translated again).
        let mut restart = Vec::new();
        for i in 0..self.vrings.len() {
            if self.vrings[i].running.is_some() {
                self.stop_vring(i).await;
                restart.push(i);
            }
        }
        self.mem = Some(mem);
        for i in restart {
            self.start_vring(i)?;
        }
        Ok(())
    }

    /// Starts queue `i` if it has everything it needs and is not running.
    fn start_vring(&mut self, i: usize) -> Result<()> {
        let enabled = self.vrings[i].enabled || !self.protocol_negotiated();
        let vring = &self.vrings[i];
        let (Some(mem), Some(addr), Some(kick)) = (&self.mem, &vring.addr, &vring.kick) else {
            return Ok(());
        };
        if vring.running.is_some() || !enabled {
            return Ok(());
        }
        let index = i as u32;
        let (desc, avail, used) = translate(mem, addr)?;
        let mut queue = vring.queue.clone();
        queue.set_desc_table(desc);
        queue.set_avail_ring(avail);
        queue.set_used_ring(used);
        queue.set_features(self.acked);
        let setup = |source| Error::QueueSetup { index, source };
        queue.activate(mem).map_err(setup)?;
        // Used entries continue where the ring says (0 for a fresh ring).
        let used_idx = queue.used_idx(mem).map_err(setup)?;
        queue.set_next_used(used_idx);
        if let Some(region) = &self.inflight {
            if i < usize::from(region.num_queues) && queue.size() <= region.queue_size {
                let base = GuestAddress(i as u64 * queue_region_size(region.queue_size));
                let ring = InflightRing::new(region.mem.clone(), base, queue.size());
                let in_use = queue.track_inflight(mem, ring).map_err(setup)?;
                if in_use && !self.started_once {
                    self.device.resumed();
                }
            }
        }
        self.started_once = true;
        let kick = EventFdStream::new(kick.try_clone().map_err(Error::DupFd)?);
        let call = call_eventfd(&vring.call)?;
        let queue = Rc::new(AsyncQueue::new(queue, mem.clone(), kick, call));
        let stop = StopSignal::new();
        let future = self
            .device
            .clone()
            .run_queue(i, queue.clone(), self.acked, stop.clone());
        let task = executor::spawn(future);
        self.vrings[i].running = Some(Running { stop, task, queue });
        Ok(())
    }

    /// Stops queue `i` if it runs: fires its signal, waits for its task, keeps its state.
    async fn stop_vring(&mut self, i: usize) {
        let Some(running) = self.vrings[i].running.take() else {
            return;
        };
        running.stop.stop();
        running.task.await;
        self.vrings[i].queue = running.queue.with_queue(|q| q.clone());
        if Rc::strong_count(&running.queue) > 1 {
            self.log(format_args!(
                "queue {i} is still referenced after its task ended; its kick read stays in flight"
            ));
        }
    }

    async fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i).await;
        }
    }

    /// `RESET_DEVICE`: every queue stopped and forgotten, features and memory dropped.
    async fn reset(&mut self) {
        self.stop_all().await;
        for vring in &mut self.vrings {
            vring.queue.reset();
            vring.addr = None;
            vring.kick = None;
            vring.call = None;
            vring.err = None;
            vring.enabled = false;
        }
        self.acked = 0;
        self.mem = None;
        self.inflight = None;
        self.device.reset();
    }
}

/// The eventfd a queue signals: a nonblocking copy of the frontend's `call` fd, or one of its
/// own that nobody reads (NOFD).
fn call_eventfd(call: &Option<OwnedFd>) -> Result<EventFd> {
    let call = match call {
        Some(fd) => EventFd::from(fd.as_fd().try_clone_to_owned().map_err(Error::DupFd)?),
        None => EventFd::new().map_err(Error::EventFd)?,
    };
    // The frontend's eventfd may be full and never read: signalling it must not block the
    // executor (and with it every queue and this socket). Nonblocking, a full counter is a
    // pending wake-up and `signal_used` goes on.
    call.set_nonblocking().map_err(Error::CallNonblocking)?;
    Ok(call)
}

/// The guest addresses of a ring's three parts, from the frontend's user addresses.
fn translate(
    mem: &GuestMemory,
    addr: &VringAddr,
) -> Result<(GuestAddress, GuestAddress, GuestAddress)> {
    let one = |ring: &'static str, user: u64| {
        mem.user_to_guest(user).ok_or(Error::VringAddress {
            index: addr.index,
            ring,
            addr: user,
        })
    };
    Ok((
        one("descriptor table", addr.desc)?,
        one("available ring", addr.avail)?,
        one("used ring", addr.used)?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::pin::pin;

    use executor::Executor;

    use super::*;

    #[test]
    fn stop_signal_resolves_every_clone_and_stays_fired() {
        let ex = Executor::new().unwrap();
        let stop = StopSignal::new();
        let waiters: Vec<_> = (0..3).map(|_| ex.spawn(stop.clone())).collect::<Vec<_>>();
        ex.run_until(executor::yield_now());
        assert!(!stop.is_stopped());
        stop.stop();
        ex.run_until(async {
            for w in waiters {
                w.await;
            }
        });
        assert!(stop.is_stopped());
        // A clone made after the stop resolves at once.
        ex.run_until(stop.clone());
    }

    #[test]
    fn polling_fresh_clones_from_one_task_keeps_one_waker() {
        let ex = Executor::new().unwrap();
        let stop = StopSignal::new();
        ex.run_until(async {
            for _ in 0..100 {
                let mut clone = pin!(stop.clone());
                assert!(futures::poll!(&mut clone).is_pending());
            }
        });
        assert_eq!(stop.inner.wakers.borrow().len(), 1);
    }
}
