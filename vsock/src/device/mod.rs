//! The virtio-vsock device (virtio 1.2 §5.10) over vhost-user: [`VsockDevice`] serves stream
//! connections between the guest and host processes on unix sockets, three queues (rx 0,
//! tx 1, event 2), each run by its own executor task.
//!
//! # Connections
//! A connection is keyed by (host port, guest port) and lives in the device, not in a
//! queue's task: it survives a queue being stopped and started again (a memory table
//! change). Its state machine and credit are in `conn` (no I/O); its host stream is driven
//! by two tasks of its own (`stream`: one watches it for something to read while the guest
//! has credit, one writes the guest's data to the host), and the broker channel by two more
//! (`channel`). None of those tasks touches guest memory: only the queue tasks do, and the
//! tx task ends every use of it when it stops (below), so stopping the queues is enough to
//! hand guest memory back. A host process's connection waits
//! [`VsockOptions::request_timeout`] for the guest to answer its REQUEST.
//!
//! # Data path
//! tx: the tx task copies each packet's header out of the chain, checks the copy, and acts
//! on it at once (a connect request goes to the broker, data goes to the host). A data
//! packet of 4 KiB or more on a connection with nothing else waiting for its host is held
//! in guest memory and sent from there by the tx task, in `sendmsg`s that never wait, many
//! packets in one (`held`): the device copies none of its bytes, and its chain goes back
//! once they are sent. At most half the queue is held, and a reset connection or a stopped
//! queue ends the hold at once (the unsent bytes of a stopped queue are copied into the
//! connection's buffer), so one connection never holds up the queue for the others. Any
//! other packet's chain is returned straight away: a data packet that is not held is
//! copied into the connection's buffer, behind the held ones, and the host writer sends
//! those buffers as they are, many in one `sendmsg`. A packet of 4 KiB or more gets a
//! buffer of its own (a spare one when there is, `spare`); shorter packets are gathered
//! into shared buffers, so a flood of tiny packets costs buffers by the bytes, not by the
//! packet. tx chains are returned out of order; a device process that dies holding some
//! leaves them in the inflight region, and the next one finishes them.
//!
//! rx: connections with something for the guest (a control packet, data within the guest's
//! credit) wait in a ready list, served round-robin, one packet per rx chain; the rx task
//! holds at most one chain while nothing is ready, and steps back over it when it stops. A
//! data packet's bytes are read from the host stream straight into its chain, with a
//! `recvmsg` that never waits (after the stream's watcher saw it readable): host data is
//! copied once, by the kernel, into guest memory, and waits in the host socket, not in the
//! device, until the guest has buffers and credit for it.
//!
//! # Flow control
//! The device never sends the guest more than its credit (`buf_alloc - (tx_cnt -
//! fwd_cnt)`), and reads a host stream only within that credit: a guest that stops reading
//! stops the host writer (the host socket fills). Each connection advertises
//! [`VsockOptions::buf_alloc`] bytes, and the guest data it buffers or holds for the host
//! never exceeds that: a guest that sends beyond its credit is reset. So a connection holds
//! at most `buf_alloc`, the device at most [`VsockOptions::max_connections`] of them, and the
//! queue of replies to unknown connections [`MAX_RESETS`] packets.
//!
//! # Bad input
//! Chains too short for a header, wrong CIDs, unknown types and ops, lengths beyond the
//! chain or 64 KiB, credit violations and packets for connections that do not exist are
//! answered with an RST (or dropped, for wrong CIDs and when the reply queue is full) and
//! counted in [`Stats`]; the log lines go through [`GuestLog`]. Nothing the guest sends
//! stops the other connections.
//!
//! # Reset
//! [`Device::reset`] drops every connection (closing its host stream) and queues a
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, sent on the event queue once it runs again.

mod channel;
mod chunks;
mod conn;
mod held;
mod rx;
mod spare;
mod stream;
mod tx;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::time::Duration;

use executor::{AsyncFd, Task};
use futures::future::{select, Either};
use virtio::vhost_user::{Device, StopSignal};
use virtio::{AsyncQueue, DeviceType, GuestLog};

use crate::broker::Frame;
use crate::notify::Notify;
use crate::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use crate::{Error, Result};
use conn::{Conn, Key, State, Violation};
use spare::Spares;
use stream::Stream;

/// `VIRTIO_VSOCK_F_STREAM`: stream sockets (the only type offered).
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;
/// The queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// The largest payload of one packet, either way (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PACKET: u32 = 64 << 10;
/// Replies to packets of unknown connections waiting for an rx buffer; more are dropped.
pub const MAX_RESETS: usize = 64;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// The most connections [`VsockOptions::max_connections`] may allow.
pub const MAX_CONNECTIONS: usize = 1 << 16;
/// The receive buffer a connection advertises by default (Linux's default for its own
/// sockets): a guest sender has this much in flight before it waits for a credit update.
pub const DEFAULT_BUF_ALLOC: u32 = 256 << 10;
/// The range [`VsockOptions::buf_alloc`] may be set in.
pub const BUF_ALLOC_RANGE: std::ops::RangeInclusive<u32> = 4096..=(16 << 20);
/// The first port the device gives a host process that connects to `PATH`.
pub const FIRST_HOST_PORT: u32 = 1 << 30;

const RX: usize = 0;
const TX: usize = 1;

/// How to serve a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockOptions {
    /// The guest's CID (3 to `u32::MAX - 1`).
    pub guest_cid: u64,
    /// The most connections at once, 1 to [`MAX_CONNECTIONS`] (each costs up to
    /// `buf_alloc` of buffers).
    pub max_connections: usize,
    /// The receive buffer each connection advertises to the guest.
    pub buf_alloc: u32,
    /// How long a host process waits for the guest to accept (or refuse) its connection
    /// before the device gives up on it: reset for the guest, closed for the host.
    pub request_timeout: Duration,
}

impl VsockOptions {
    /// The defaults for `guest_cid`: 1024 connections of [`DEFAULT_BUF_ALLOC`], 2 s for the guest to
    /// answer a host connect (Firecracker's and Linux's connect timeout).
    pub fn new(guest_cid: u64) -> VsockOptions {
        VsockOptions {
            guest_cid,
            max_connections: 1024,
            buf_alloc: DEFAULT_BUF_ALLOC,
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// What the device refused or dropped, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chains that are malformed, too short for a header (tx), or without room for one
    /// (rx, event): returned empty.
    pub bad_chains: u64,
    /// Packets with a source CID other than the guest's or a destination other than the
    /// host (dropped).
    pub bad_cids: u64,
    /// Packets of an unknown type or op, or whose length exceeds their chain or 64 KiB.
    pub bad_packets: u64,
    /// Packets for connections that do not exist.
    pub unknown_connections: u64,
    /// Packets beyond the credit, or with a `fwd_cnt` that went back or ahead.
    pub credit_violations: u64,
    /// Ops the connection's state does not take.
    pub unexpected_ops: u64,
    /// Connections refused at the limit.
    pub refused: u64,
    /// Host connects the guest did not answer in time.
    pub request_timeouts: u64,
    /// Guest connects the broker could not make, or could not be asked for (its channel
    /// is closed).
    pub connect_failures: u64,
    /// Replies dropped because [`MAX_RESETS`] were waiting.
    pub dropped_resets: u64,
}

/// A connection and its host stream.
struct Entry {
    conn: Conn,
    stream: Slot,
}

/// A connection's host stream.
enum Slot {
    None,
    /// Handed over by the broker; the guest has not accepted yet. The task resets the
    /// connection when the guest does not answer in time.
    Waiting(OwnedFd, Task<()>),
    Running(Stream),
}

/// The device's state, shared by the queue, stream and channel tasks.
struct Shared {
    guest_cid: u64,
    max_connections: usize,
    buf_alloc: u32,
    request_timeout: Duration,
    conns: RefCell<HashMap<Key, Entry>>,
    /// Connections with something for the guest, in turn.
    ready: RefCell<VecDeque<Key>>,
    /// RSTs for packets of connections that do not exist.
    resets: RefCell<VecDeque<Header>>,
    /// Broker requests in flight: id to connection.
    requests: RefCell<HashMap<u32, Key>>,
    /// Frames for the broker.
    outbox: RefCell<VecDeque<Frame>>,
    next_request: Cell<u32>,
    next_port: Cell<u32>,
    next_id: Cell<u64>,
    rx_wake: Notify,
    /// Wakes the tx queue when a connection is reset or removed (to give back the chains
    /// it held for it).
    tx_wake: Notify,
    event_wake: Notify,
    outbox_wake: Notify,
    transport_reset: Cell<bool>,
    stats: Cell<Stats>,
    errors: GuestLog,
    broker: AsyncFd,
    /// The broker channel's tasks, started by the first queue that runs.
    channel: RefCell<Option<(Task<()>, Task<()>)>>,
    /// The broker channel failed or was closed: no more connects.
    channel_closed: Cell<bool>,
    /// Buffers for guest data, back from the host writes.
    spares: Spares,
}

/// A virtio-vsock device (see the module docs).
pub struct VsockDevice {
    shared: Rc<Shared>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.shared.guest_cid)
            .field("connections", &self.shared.conns.borrow().len())
            .finish_non_exhaustive()
    }
}

impl VsockDevice {
    /// A device for `options`, taking host streams from the broker channel `broker` (the
    /// device end of [`Broker::new`](crate::Broker::new)'s pair).
    pub fn new(options: VsockOptions, broker: OwnedFd) -> Result<VsockDevice> {
        let cid = options.guest_cid;
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(Error::InvalidCid(cid));
        }
        Ok(VsockDevice {
            shared: Rc::new(Shared {
                guest_cid: cid,
                max_connections: options.max_connections.clamp(1, MAX_CONNECTIONS),
                buf_alloc: options.buf_alloc,
                request_timeout: options.request_timeout,
                conns: RefCell::default(),
                ready: RefCell::default(),
                resets: RefCell::default(),
                requests: RefCell::default(),
                outbox: RefCell::default(),
                next_request: Cell::new(0),
                next_port: Cell::new(FIRST_HOST_PORT),
                next_id: Cell::new(0),
                rx_wake: Notify::default(),
                tx_wake: Notify::default(),
                event_wake: Notify::default(),
                outbox_wake: Notify::default(),
                transport_reset: Cell::new(false),
                stats: Cell::default(),
                errors: GuestLog::new("vsock"),
                broker: AsyncFd::new(broker),
                channel: RefCell::new(None),
                channel_closed: Cell::new(false),
                spares: Spares::default(),
            }),
        })
    }

    /// What the device refused or dropped so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats.get()
    }

    /// The number of connections (in any state).
    pub fn connections(&self) -> usize {
        self.shared.conns.borrow().len()
    }

    /// Bytes the device buffers for all connections, both ways (guest data it holds in
    /// guest memory to send to the host does not count: it is the guest's memory).
    pub fn buffered(&self) -> usize {
        self.shared
            .conns
            .borrow()
            .values()
            .map(|e| e.conn.buffered_for_host())
            .sum()
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        // The tasks hold the shared state: dropping them (cancelling their I/O) and the
        // connections that own them ends the cycle.
        let channel = self.shared.channel.take();
        let conns = self.shared.conns.take();
        drop((channel, conns));
    }
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Starts the broker channel's tasks, once.
    fn start_channel(self: &Rc<Self>) {
        let mut channel = self.channel.borrow_mut();
        if channel.is_none() {
            *channel = Some((
                executor::spawn(channel::receive(self.clone())),
                executor::spawn(channel::send(self.clone())),
            ));
        }
    }

    fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        id
    }

    /// Whether an rx buffer would be used now.
    fn rx_pending(&self) -> bool {
        !self.resets.borrow().is_empty() || !self.ready.borrow().is_empty()
    }

    /// Queues an RST answering `hdr` (a packet of no connection), unless `hdr` is an RST.
    fn reply_rst(&self, hdr: &Header) {
        if hdr.op == Op::Rst.to_u16() {
            return;
        }
        let mut resets = self.resets.borrow_mut();
        if resets.len() >= MAX_RESETS {
            self.count(|s| s.dropped_resets += 1);
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        resets.push_back(self.header(key, Op::Rst, 0, 0, (0, 0)));
        self.rx_wake.notify();
    }

    /// A packet header from the host side of connection `key` to the guest, with `credit`
    /// (`buf_alloc`, `fwd_cnt`).
    fn header(&self, key: Key, op: Op, flags: u32, len: u32, credit: (u32, u32)) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len,
            kind: TYPE_STREAM,
            op: op.to_u16(),
            flags,
            buf_alloc: credit.0,
            fwd_cnt: credit.1,
        }
    }

    /// The host stream of connection `key` (`id`) failed (`what`: reading, writing, ...):
    /// the connection is reset. Closing is how a host process ends a connection, so that,
    /// and a failure without an error, is not logged.
    fn host_failed(&self, key: Key, id: u64, what: &str, err: Option<&io::Error>) {
        let quiet = err.is_none_or(|e| {
            matches!(
                e.raw_os_error(),
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECANCELED)
            )
        });
        if let (false, Some(e)) = (quiet, err) {
            eprintln!(
                "ringvm device vsock: host port {} guest port {}: {what} failed: {e}",
                key.local, key.peer
            );
        }
        let mut conns = self.conns.borrow_mut();
        if let Some(entry) = conns.get_mut(&key).filter(|e| e.conn.id == id) {
            self.reset_entry(entry);
            self.settle(key, entry);
        }
    }

    /// Runs `f` on connection `key` if it is still connection `id`, then settles it.
    fn with_conn<R>(&self, key: Key, id: u64, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
        let mut conns = self.conns.borrow_mut();
        let entry = conns.get_mut(&key).filter(|e| e.conn.id == id)?;
        let r = f(&mut entry.conn);
        self.settle(key, entry);
        Some(r)
    }

    /// Resets connection `key`: its host stream is closed, an RST is owed to the guest.
    fn reset_entry(&self, entry: &mut Entry) {
        if let State::Connecting(request) = entry.conn.state {
            self.requests.borrow_mut().remove(&request);
        }
        entry.conn.reset();
        self.tx_wake.notify();
    }

    /// After a change to `entry`: resets a finished connection, closes the stream of a reset
    /// one, queues it for the guest, and wakes its stream tasks if they have work.
    fn settle(&self, key: Key, entry: &mut Entry) {
        if entry.conn.finished() {
            self.reset_entry(entry);
        }
        let c = &mut entry.conn;
        if c.state == State::Reset {
            entry.stream = Slot::None;
        }
        if c.has_output() && !c.queued {
            c.queued = true;
            self.ready.borrow_mut().push_back(key);
            self.rx_wake.notify();
        }
        if let Slot::Running(s) = &entry.stream {
            if c.wants_poll() {
                s.read_wake.notify();
            }
            if c.has_host_write() || c.should_shut_host() {
                s.write_wake.notify();
            }
        }
    }

    /// Removes connection `key` (closing its stream) without telling the guest.
    fn remove(&self, key: Key) {
        let entry = self.conns.borrow_mut().remove(&key);
        if let Some(mut entry) = entry {
            virtio::stats::stats().vsock_closed();
            if let State::Connecting(request) = entry.conn.state {
                self.requests.borrow_mut().remove(&request);
            }
            if entry.conn.queued {
                self.ready.borrow_mut().retain(|k| *k != key);
            }
            entry.stream = Slot::None;
            self.tx_wake.notify();
        }
    }

    /// A guest violation on connection `key`: logged, counted, the connection reset.
    fn violation(&self, key: Key, v: Violation) {
        self.count(|s| match v {
            Violation::CreditExceeded { .. } | Violation::BadFwdCnt { .. } => {
                s.credit_violations += 1
            }
            Violation::Unexpected { .. } => s.unexpected_ops += 1,
        });
        self.errors.log(format_args!(
            "connection host port {} guest port {}: {v}; reset",
            key.local, key.peer
        ));
        let mut conns = self.conns.borrow_mut();
        if let Some(entry) = conns.get_mut(&key) {
            self.reset_entry(entry);
            self.settle(key, entry);
        }
    }

    /// A port for a host process that connected to `PATH`, not in use by any connection.
    fn host_port(&self) -> u32 {
        let conns = self.conns.borrow();
        loop {
            let p = self.next_port.get();
            self.next_port.set(if p == u32::MAX {
                FIRST_HOST_PORT
            } else {
                p + 1
            });
            if !conns.keys().any(|k| k.local == p) {
                return p;
            }
        }
    }

    /// Starts the stream tasks of connection `key` on `fd`, writing `preamble` first.
    fn start_stream(self: &Rc<Self>, key: Key, entry: &mut Entry, fd: OwnedFd, preamble: Vec<u8>) {
        match Stream::start(self.clone(), key, entry.conn.id, fd, preamble) {
            Ok(s) => entry.stream = Slot::Running(s),
            Err(e) => {
                eprintln!("ringvm device vsock: starting a host stream failed: {e}");
                self.reset_entry(entry);
            }
        }
    }

    /// The broker channel is gone: the guest's connects waiting for it are reset, and
    /// later ones refused.
    fn channel_closed(&self) {
        self.channel_closed.set(true);
        self.outbox.borrow_mut().clear();
        let mut conns = self.conns.borrow_mut();
        for (key, entry) in conns.iter_mut() {
            if matches!(entry.conn.state, State::Connecting(_)) {
                self.count(|s| s.connect_failures += 1);
                self.reset_entry(entry);
                self.settle(*key, entry);
            }
        }
    }

    /// The next available chain of queue `index` (rx or tx), if any; a malformed one is
    /// counted, logged and given back.
    fn pop_valid(
        &self,
        queue: &AsyncQueue,
        index: usize,
    ) -> virtio::Result<Option<virtio::DescriptorChain>> {
        loop {
            match queue.try_pop() {
                Err(virtio::Error::InvalidChain { head, reason }) => {
                    self.count(|s| s.bad_chains += 1);
                    virtio::stats::stats().error(index);
                    let name = if index == RX { "rx" } else { "tx" };
                    self.errors.log(format_args!(
                        "{name}: invalid chain at head {head}: {reason}"
                    ));
                    queue.add_used(head, 0)?;
                }
                other => return other,
            }
        }
    }

    /// Drops every connection and queues a transport reset event.
    fn reset(&self) {
        let conns = self.conns.take();
        for _ in 0..conns.len() {
            virtio::stats::stats().vsock_closed();
        }
        self.ready.borrow_mut().clear();
        self.resets.borrow_mut().clear();
        self.requests.borrow_mut().clear();
        self.outbox.borrow_mut().clear();
        drop(conns);
        self.tx_wake.notify();
        self.transport_reset.set(true);
        self.event_wake.notify();
    }

    /// Sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` when one is owed.
    async fn run_event(self: Rc<Self>, queue: Rc<AsyncQueue>, stop: StopSignal) {
        self.start_channel();
        loop {
            if !self.transport_reset.get() {
                match select(pin!(self.event_wake.wait()), stop.clone()).await {
                    Either::Left(_) => continue,
                    Either::Right(_) => break,
                }
            }
            let chain = match select(pin!(queue.next_chain()), stop.clone()).await {
                Either::Left((Ok(chain), _)) => chain,
                Either::Left((Err(virtio::Error::InvalidChain { head, reason }), _)) => {
                    self.count(|s| s.bad_chains += 1);
                    self.errors.log(format_args!(
                        "event queue: invalid chain at head {head}: {reason}"
                    ));
                    if queue.complete(head, 0).is_err() {
                        break;
                    }
                    continue;
                }
                Either::Left((Err(e), _)) => {
                    eprintln!("ringvm device vsock: event queue stopped: {e}");
                    break;
                }
                Either::Right(_) => break,
            };
            let mut w = chain.writer(queue.memory());
            let len = match w.write_all_bytes(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => {
                    self.transport_reset.set(false);
                    4
                }
                Err(e) => {
                    self.count(|s| s.bad_chains += 1);
                    self.errors
                        .log(format_args!("event chain {}: {e}", chain.head_index()));
                    0
                }
            };
            if let Err(e) = queue.complete(chain.head_index(), len) {
                eprintln!("ringvm device vsock: event queue stopped: {e}");
                break;
            }
        }
        stop.await;
        self.errors.flush();
    }
}

impl Device for VsockDevice {
    fn name(&self) -> &'static str {
        DeviceType::Vsock.name()
    }

    fn device_type(&self) -> u32 {
        DeviceType::Vsock.id()
    }

    fn num_queues(&self) -> usize {
        DeviceType::Vsock.default_queues()
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_VSOCK_F_STREAM
    }

    fn config_size(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let config = self.shared.guest_cid.to_le_bytes();
        let start = offset as usize;
        match config.get(start..start.saturating_add(data.len())) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn run_queue(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        let shared = self.shared.clone();
        match index {
            RX => Box::pin(rx::run(shared, queue, stop)),
            TX => Box::pin(tx::run(shared, queue, stop)),
            _ => Box::pin(shared.run_event(queue, stop)),
        }
    }

    fn reset(&self) {
        self.shared.reset();
    }

    /// This process replaces one that died: the guest's connections lived there.
    fn resumed(&self) {
        self.shared.reset();
    }
}

#[cfg(test)]
mod tests;
