//! The virtio-net device (virtio 1.2 §5.1) over tap queues, one task per virtqueue.
//!
//! Queues are `rx0, tx0, rx1, tx1, ...` and, with several pairs, a control queue last.
//!
//! - Transmit: the task pops every available chain (up to [`TX_BATCH`]), checks each
//!   (`[virtio_net_hdr_v1][frame]`, readable only, sane header and length) and submits one
//!   `writev` per frame, all in the same turn of the executor (one `io_uring_enter` for the
//!   batch), straight from guest memory; a header the device had to rewrite (flags it
//!   ignores, an `hdr_len` the tap would refuse: [`VirtioNetHdr::for_tap`]) goes as a host
//!   copy before the frame. Checksum and segmentation offloads pass through to the tap. A malformed chain is counted as dropped, a failed
//!   write as an error; either way the chain is returned and the queue goes on.
//! - Receive: the task first holds guest buffers (waiting for a kick when there are none),
//!   then reads one frame from the tap straight into them with one `readv`. Without buffers
//!   it does not read the tap at all: frames wait in the kernel's tap queue (which drops, and
//!   counts, beyond its length), and the task sleeps until the driver kicks. With
//!   `MRG_RXBUF` a frame may span several chains: the task holds chains until they can take
//!   the largest frame the negotiated offloads allow (or the ring has no more), reads once,
//!   and returns the chains the frame filled with `num_buffers` set; the rest wait for the
//!   next frame. Each read ends in a host spill buffer one byte longer than the largest
//!   frame: a frame larger than the held chains lands partly there and is copied into the
//!   next chains the driver posts (`MRG_RXBUF`) or counted in `rx_errors` (one chain per
//!   frame without it), never handed over cut. Stopping cancels the pending read and
//!   delivers what it may have read; chains still held go back to the avail ring
//!   (`GET_VRING_BASE` reports them unconsumed). When every held chain takes a whole frame
//!   by itself (Linux posts 1536-byte mergeable buffers), reads go in rounds instead, one per
//!   chain: while the tap has frames, up to 32 reads per `io_uring_enter` that take only what
//!   it already has (`RWF_NOWAIT`) and complete in order as they are submitted; once it is
//!   empty, one read that waits. Frames go to the guest in read order, which is the tap's
//!   order. A chain whose first buffer is longer than the largest frame is read with a
//!   plain `read` into that buffer (no iovec array, no spill): a read that fills it is a
//!   frame the tap cut, counted in `rx_errors`.
//! - Several queue pairs (`MQ`): the control queue answers `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`
//!   by attaching the tap queues of the enabled pairs and detaching the others, so the
//!   kernel never steers a flow to a queue the driver does not serve; the receive tasks of
//!   disabled pairs sleep until they are enabled.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use executor::AsyncFd;
use futures::future::{select, Either};
use futures::FutureExt;
use virtio::vhost_user::{Device, StopSignal};
use virtio::{AsyncQueue, Buffer, DescriptorChain, GuestLog, Writer};

use crate::features::*;
use crate::hdr::{VirtioNetHdr, MAX_FRAME, MIN_FRAME, NUM_BUFFERS_OFFSET, VNET_HDR_SIZE};
use crate::sys;
use crate::tap::{self, Tap};
use crate::{Error, Result};

/// The virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// The queue size offered unless the options say otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The most queue pairs a device takes (the vhost-user limit of 256 queues, with room for
/// the control queue, would allow more; a tap allows 256 queues).
pub const MAX_QUEUE_PAIRS: usize = 64;
/// The most transmit chains submitted in one batch.
pub const TX_BATCH: usize = 64;
/// The most guest buffers one tap read covers: each may become two iovecs where it crosses
/// a memory region, plus the spill buffer, within the kernel's 1024 (`UIO_MAXIOV`).
pub const MAX_READ_BUFFERS: usize = 511;
/// The most tap reads a receive queue keeps in flight when every chain takes a whole frame.
const RX_READS: usize = 32;
/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The config space the device exposes: mac, status, max_virtqueue_pairs, mtu and the
/// speed/duplex/RSS fields (zero), as far as the VMM reads it.
pub const CONFIG_SIZE: usize = 20;

/// Control queue: class `VIRTIO_NET_CTRL_MQ`.
const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// Control queue: command `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

/// How the device is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The MAC address the guest gets (config space, `VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// Queue pairs: one tap queue each. More than one offers `MQ` and a control queue.
    pub queue_pairs: usize,
    /// The largest queue size (a power of two of at most 32768).
    pub queue_size: u16,
}

impl Default for NetOptions {
    fn default() -> NetOptions {
        NetOptions {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Frame and byte counts since the device was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Their bytes (without the vnet header).
    pub rx_bytes: u64,
    /// Frames the tap took from the guest.
    pub tx_packets: u64,
    /// Their bytes (without the vnet header).
    pub tx_bytes: u64,
    /// Transmit chains refused as malformed.
    pub tx_dropped: u64,
    /// Transmit frames the tap refused (a write error or a short write).
    pub tx_errors: u64,
    /// Frames read from the tap that could not be delivered (too big for the buffers the
    /// driver gave), and failed tap reads.
    pub rx_errors: u64,
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx_packets={} rx_bytes={} tx_packets={} tx_bytes={} tx_dropped={} tx_errors={} \
             rx_errors={}",
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.tx_dropped,
            self.tx_errors,
            self.rx_errors
        )
    }
}

/// One queue pair's tap queue.
struct Pair {
    tap: Tap,
    io: AsyncFd,
    /// Whether the tap queue is attached (only detached with several pairs).
    attached: Cell<bool>,
}

/// Wakes the receive tasks of pairs waiting to be enabled.
#[derive(Default)]
struct Changed {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Changed {
    fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` was called after `since` (a `generation` read earlier).
    fn after(&self, since: u64) -> ChangedAfter<'_> {
        ChangedAfter {
            changed: self,
            since,
        }
    }
}

struct ChangedAfter<'a> {
    changed: &'a Changed,
    since: u64,
}

impl Future for ChangedAfter<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.changed.generation.get() != self.since {
            return Poll::Ready(());
        }
        let mut wakers = self.changed.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A virtio-net device over one tap queue per queue pair.
pub struct NetDevice {
    pairs: Vec<Pair>,
    mac: [u8; 6],
    queue_size: u16,
    /// The tap's MTU when the device was made: the largest frame without offloads.
    mtu: u32,
    counters: Cell<Counters>,
    /// Queue tasks running; the counters are printed when the last one stops.
    running: Cell<usize>,
    /// Queue pairs the driver enabled (1 until it sets more through the control queue).
    active_pairs: Cell<usize>,
    pairs_changed: Changed,
    /// Bad guest input (rate-limited: the guest sends as much as it likes).
    errors: GuestLog,
}

impl fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetDevice")
            .field("tap", &self.pairs.first().map(|p| p.tap.name()))
            .field("pairs", &self.pairs.len())
            .field("mac", &self.mac)
            .field("counters", &self.counters.get())
            .finish_non_exhaustive()
    }
}

/// Why a queue task stopped before it was told to.
type QueueResult = std::result::Result<(), virtio::Error>;

impl NetDevice {
    /// A device over `taps` (one fd per queue pair, set up with [`Tap::create`] or
    /// [`Tap::from_fd`]). With several pairs, all but the first tap queue are detached
    /// until the driver enables them.
    pub fn new(taps: Vec<OwnedFd>, options: NetOptions) -> Result<NetDevice> {
        let pairs = options.queue_pairs;
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(Error::QueuePairs(pairs));
        }
        if taps.len() != pairs {
            return Err(Error::TapCount {
                taps: taps.len(),
                pairs,
            });
        }
        let size = options.queue_size;
        if size == 0 || size > 32768 || !size.is_power_of_two() {
            return Err(Error::QueueSize(size));
        }
        let pairs = taps
            .into_iter()
            .map(|fd| {
                let tap = Tap::from_fd(fd)?;
                let dup = tap.as_fd().try_clone_to_owned().map_err(Error::Dup)?;
                Ok(Pair {
                    tap,
                    io: AsyncFd::new(dup),
                    attached: Cell::new(true),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Without offloads the largest frame is the MTU plus Ethernet and VLAN headers.
        let mtu = pairs[0].tap.mtu().unwrap_or(1500);
        let dev = NetDevice {
            pairs,
            mac: options.mac,
            queue_size: size,
            mtu,
            counters: Cell::new(Counters::default()),
            running: Cell::new(0),
            active_pairs: Cell::new(options.queue_pairs),
            pairs_changed: Changed::default(),
            errors: GuestLog::new("net"),
        };
        dev.set_active_pairs(1)?;
        Ok(dev)
    }

    /// Counts so far.
    pub fn counters(&self) -> Counters {
        self.counters.get()
    }

    /// The tap interface name.
    pub fn tap_name(&self) -> &str {
        self.pairs[0].tap.name()
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    fn log(&self, what: impl fmt::Display) {
        eprintln!("ringvm device net: {what}");
    }

    /// Logs bad guest input under the devices' shared rate limit ([`GuestLog`]).
    fn log_guest(&self, what: impl fmt::Display) {
        self.errors.log(what);
    }

    fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Attaches the tap queues of the first `n` pairs and detaches the others.
    fn set_active_pairs(&self, n: usize) -> Result<()> {
        if self.num_pairs() > 1 {
            for (i, p) in self.pairs.iter().enumerate() {
                let attach = i < n;
                if p.attached.get() != attach {
                    tap::set_queue_attached(p.tap.as_fd(), p.tap.name(), i, attach)?;
                    p.attached.set(attach);
                }
            }
        }
        self.active_pairs.set(n);
        self.pairs_changed.notify();
        Ok(())
    }

    fn started(&self) {
        self.running.set(self.running.get() + 1);
    }

    fn stopped(&self) {
        let n = self.running.get().saturating_sub(1);
        self.running.set(n);
        if n == 0 {
            self.errors.flush();
            self.log(self.counters());
        }
    }

    /// The config space.
    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&(self.num_pairs() as u16).to_le_bytes());
        c
    }

    /// The queue cannot go on (its rings became inaccessible): wait to be stopped.
    async fn fail(&self, index: usize, e: virtio::Error, stop: StopSignal) {
        self.log(format_args!("queue {index} stopped: {e}"));
        stop.await;
    }

    async fn run(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        acked: u64,
        stop: StopSignal,
    ) {
        self.started();
        let pairs = self.num_pairs();
        let result = if index < 2 * pairs && index.is_multiple_of(2) {
            let mut rx = Rx::new(&self, index / 2, &queue, acked);
            let result = rx.run(&stop).await;
            rx.give_back();
            result
        } else if index < 2 * pairs {
            Tx {
                dev: &self,
                pair: &self.pairs[index / 2],
                queue: &queue,
                acked,
            }
            .run(&stop)
            .await
        } else {
            self.run_ctrl(&queue, acked, &stop).await
        };
        if let Err(e) = result {
            self.fail(index, e, stop).await;
        }
        self.stopped();
    }

    /// The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; every other command gets
    /// `VIRTIO_NET_ERR`.
    async fn run_ctrl(&self, queue: &AsyncQueue, acked: u64, stop: &StopSignal) -> QueueResult {
        loop {
            let next = pin!(queue.next_chain());
            let chain = match select(next, stop.clone()).await {
                Either::Left((Ok(chain), _)) => chain,
                Either::Left((Err(virtio::Error::InvalidChain { head, reason }), _)) => {
                    self.log_guest(format_args!(
                        "control queue: invalid chain {head}: {reason}"
                    ));
                    queue.complete(head, 0)?;
                    continue;
                }
                Either::Left((Err(e), _)) => return Err(e),
                Either::Right(((), _)) => return Ok(()),
            };
            let ack = self.ctrl_command(&chain, queue, acked);
            let mut w = chain.writer(queue.memory());
            let len = match w.write_obj(ack) {
                Ok(()) => 1,
                Err(_) => 0,
            };
            queue.complete(chain.head_index(), len)?;
        }
    }

    fn ctrl_command(&self, chain: &DescriptorChain, queue: &AsyncQueue, acked: u64) -> u8 {
        let mut r = chain.reader(queue.memory());
        let Ok([class, command]) = r.read_obj::<[u8; 2]>() else {
            return VIRTIO_NET_ERR;
        };
        if class != VIRTIO_NET_CTRL_MQ
            || command != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
            || acked & (1 << VIRTIO_NET_F_MQ) == 0
        {
            return VIRTIO_NET_ERR;
        }
        let Ok(n) = r.read_obj::<[u8; 2]>().map(u16::from_le_bytes) else {
            return VIRTIO_NET_ERR;
        };
        let n = usize::from(n);
        if n == 0 || n > self.num_pairs() {
            self.log_guest(format_args!("control queue: {n} queue pairs asked for"));
            return VIRTIO_NET_ERR;
        }
        match self.set_active_pairs(n) {
            Ok(()) => VIRTIO_NET_OK,
            Err(e) => {
                self.log(format_args!("enabling {n} queue pairs: {e}"));
                VIRTIO_NET_ERR
            }
        }
    }
}

/// What a transmit chain turned out to be.
enum TxFrame {
    /// To write: the whole readable part (header and frame).
    Write {
        iovecs: sys::HostIoVecs,
        total: usize,
    },
    /// Malformed: returned without writing.
    Drop(String),
}

struct Tx<'a> {
    dev: &'a NetDevice,
    pair: &'a Pair,
    queue: &'a AsyncQueue,
    acked: u64,
}

impl Tx<'_> {
    async fn run(&self, stop: &StopSignal) -> QueueResult {
        loop {
            let next = pin!(self.queue.next_chain());
            let first = match select(next, stop.clone()).await {
                Either::Left((r, _)) => r,
                Either::Right(((), _)) => return Ok(()),
            };
            let mut batch = Vec::with_capacity(TX_BATCH);
            let mut popped = Some(first);
            while let Some(r) = popped {
                match r {
                    Ok(chain) => batch.push(chain),
                    Err(virtio::Error::InvalidChain { head, reason }) => {
                        self.dev
                            .log_guest(format_args!("tx: invalid chain {head}: {reason}"));
                        self.dev.count(|c| c.tx_dropped += 1);
                        self.queue.add_used(head, 0)?;
                    }
                    Err(e) => return Err(e),
                }
                if batch.len() >= TX_BATCH {
                    break;
                }
                popped = self.queue.try_pop().transpose();
            }
            self.send(batch).await?;
        }
    }

    /// Writes a batch of chains to the tap, all in flight together, and returns them.
    async fn send(&self, batch: Vec<DescriptorChain>) -> QueueResult {
        // Every write is queued as it is made; the first await submits them all at once,
        // and they are collected in order.
        let writes: Vec<_> = batch
            .iter()
            .map(|chain| match self.frame(chain) {
                TxFrame::Write { iovecs, total } => {
                    Some((self.pair.io.write_mem_at(iovecs, 0), total))
                }
                TxFrame::Drop(why) => {
                    self.dev.log_guest(format_args!("tx: frame dropped: {why}"));
                    self.dev.count(|c| c.tx_dropped += 1);
                    None
                }
            })
            .collect();
        for (chain, write) in batch.iter().zip(writes) {
            let Some((write, total)) = write else {
                self.queue.add_used(chain.head_index(), 0)?;
                continue;
            };
            let (result, iovecs) = write.await;
            let result = match result {
                // Cancelled before it ran (a receive task on this tap stopping): write again.
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                    self.pair.io.write_mem_at(iovecs, 0).await.0
                }
                r => r,
            };
            match result {
                Ok(n) if n == total => self.dev.count(|c| {
                    c.tx_packets += 1;
                    c.tx_bytes += (total - VNET_HDR_SIZE) as u64;
                }),
                Ok(n) => {
                    self.dev
                        .log_guest(format_args!("tx: tap took {n} of {total} bytes"));
                    self.dev.count(|c| c.tx_errors += 1);
                }
                Err(e) => {
                    self.dev
                        .log_guest(format_args!("tx: tap write failed: {e}"));
                    self.dev.count(|c| c.tx_errors += 1);
                }
            }
            self.queue.add_used(chain.head_index(), 0)?;
        }
        self.queue.signal_used().map(drop)
    }

    /// Checks a transmit chain: readable buffers only, a whole header, a frame of sane
    /// length, a header the tap will take.
    fn frame(&self, chain: &DescriptorChain) -> TxFrame {
        if chain.writable_len() != 0 {
            return TxFrame::Drop(format!(
                "chain {} has {} device-writable bytes",
                chain.head_index(),
                chain.writable_len()
            ));
        }
        let total = chain.readable_len();
        if !(VNET_HDR_SIZE + MIN_FRAME..=VNET_HDR_SIZE + MAX_FRAME).contains(&total) {
            return TxFrame::Drop(format!(
                "chain {} holds {total} bytes; a header and a frame of {MIN_FRAME} to \
                 {MAX_FRAME} bytes are needed",
                chain.head_index()
            ));
        }
        let mut reader = chain.reader(self.queue.memory());
        let guest = match reader.read_obj::<[u8; VNET_HDR_SIZE]>() {
            Ok(b) => b,
            Err(e) => return TxFrame::Drop(e.to_string()),
        };
        let hdr = match VirtioNetHdr::from_bytes(&guest).for_tap(self.acked, total - VNET_HDR_SIZE)
        {
            Ok(hdr) => hdr.to_bytes(),
            Err(e) => return TxFrame::Drop(e.to_string()),
        };
        // The tap reads the header up to `num_buffers` and skips that. A header the device
        // left as it was goes straight from guest memory with the frame (usually one buffer:
        // one plain write); a rewritten one goes as a host copy before the frame. A guest
        // that changes its header after this check only spoils its own frame: the tap copies
        // the header once and checks that copy itself (a refusal counts in `tx_errors`).
        let as_is = hdr[..NUM_BUFFERS_OFFSET] == guest[..NUM_BUFFERS_OFFSET];
        let (host, iovecs) = if as_is {
            (Vec::new(), chain.reader(self.queue.memory()).iovecs(total))
        } else {
            (hdr.to_vec(), reader.iovecs(total - VNET_HDR_SIZE))
        };
        match iovecs {
            Ok(iovecs) => TxFrame::Write {
                iovecs: sys::HostIoVecs::header(host, iovecs),
                total,
            },
            Err(e) => TxFrame::Drop(e.to_string()),
        }
    }
}

struct Rx<'a> {
    dev: &'a NetDevice,
    index: usize,
    pair: &'a Pair,
    queue: &'a AsyncQueue,
    /// Chains popped and not yet used, in pop order.
    held: VecDeque<DescriptorChain>,
    /// Their writable bytes.
    held_len: usize,
    /// Whether the held chains are the last ones popped (no chain popped after the first of
    /// them was returned), so that stepping back over them gives them back.
    contiguous: bool,
    mrg: bool,
    guest_csum: bool,
    /// Buffer space to gather (with `MRG_RXBUF`) before reading: the largest frame.
    need: usize,
    /// Reads in the next round of [`Rx::run_batch`] that does not wait.
    burst: usize,
    /// Whether the tap had frames at the end of the last round: the next round's reads do
    /// not wait.
    busy: bool,
    /// One-byte spill buffers of the reads, reused.
    spills: Vec<Vec<u8>>,
    /// Whether the tap takes reads that do not wait (`RWF_NOWAIT`).
    nowait: bool,
}

impl<'a> Rx<'a> {
    fn new(dev: &'a NetDevice, index: usize, queue: &'a AsyncQueue, acked: u64) -> Rx<'a> {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let gso = has(VIRTIO_NET_F_GUEST_TSO4)
            || has(VIRTIO_NET_F_GUEST_TSO6)
            || has(VIRTIO_NET_F_GUEST_UFO);
        let max_frame = if gso {
            MAX_FRAME
        } else {
            // Ethernet header, a VLAN tag, the payload.
            (18 + dev.mtu as usize).min(MAX_FRAME)
        };
        let pair = &dev.pairs[index];
        if let Err(e) = tap::set_offloads(pair.tap.as_fd(), pair.tap.name(), acked) {
            dev.log(e);
        }
        Rx {
            dev,
            index,
            pair,
            queue,
            held: VecDeque::new(),
            held_len: 0,
            contiguous: true,
            mrg: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            need: VNET_HDR_SIZE + max_frame,
            burst: 2,
            busy: false,
            spills: Vec::new(),
            nowait: true,
        }
    }

    /// A chain returned without data (invalid, or too small for a header).
    fn reject(&mut self, head: u16) -> QueueResult {
        if !self.held.is_empty() {
            self.contiguous = false;
        }
        self.queue.complete(head, 0)
    }

    fn hold(&mut self, popped: virtio::Result<DescriptorChain>) -> QueueResult {
        match popped {
            Ok(chain) if chain.writable_len() >= VNET_HDR_SIZE => {
                self.held_len += chain.writable_len();
                self.held.push_back(chain);
                Ok(())
            }
            Ok(chain) => {
                self.dev.log_guest(format_args!(
                    "rx: chain {} has {} writable bytes, less than a header",
                    chain.head_index(),
                    chain.writable_len()
                ));
                self.reject(chain.head_index())
            }
            Err(virtio::Error::InvalidChain { head, reason }) => {
                self.dev
                    .log_guest(format_args!("rx: invalid chain {head}: {reason}"));
                self.reject(head)
            }
            Err(e) => Err(e),
        }
    }

    /// Receives until `stop` fires.
    async fn run(&mut self, stop: &StopSignal) -> QueueResult {
        let mut spill = Vec::new();
        loop {
            if self.index >= self.dev.active_pairs.get() {
                let since = self.dev.pairs_changed.generation.get();
                let changed = pin!(self.dev.pairs_changed.after(since));
                if let Either::Right(_) = select(changed, stop.clone()).await {
                    return Ok(());
                }
                continue;
            }
            if self.held.is_empty() {
                let next = pin!(self.queue.next_chain());
                match select(next, stop.clone()).await {
                    Either::Left((popped, _)) => self.hold(popped)?,
                    Either::Right(((), _)) => return Ok(()),
                }
                continue;
            }
            if self.can_batch() {
                if !self.run_batch(stop).await? {
                    return Ok(());
                }
                continue;
            }
            while self.mrg && self.held_len < self.need {
                match self.queue.try_pop().transpose() {
                    Some(popped) => self.hold(popped)?,
                    None => break,
                }
            }
            let (bufs, chains) = self.read_buffers();
            let capacity: usize = bufs.iter().map(|b| b.len as usize).sum();
            let writer = Writer::new(self.queue.memory().clone(), &bufs);
            // One byte more than the largest frame: a frame the tap had to cut shows.
            spill.resize(self.need.saturating_sub(capacity) + 1, 0);
            let iovecs =
                sys::HostIoVecs::spill(writer.iovecs(capacity)?, std::mem::take(&mut spill));
            let mut read = pin!(self.pair.io.read_mem_at(iovecs, 0));
            let result = match select(read.as_mut(), stop.clone()).await {
                Either::Left(((result, iovecs), _stop)) => Some((result, iovecs)),
                Either::Right(((), _read)) => None,
            };
            let Some((result, iovecs)) = result else {
                // Stopping: whatever the read took from the tap is delivered, never lost.
                if let Err(e) = self.pair.io.cancel_all().await {
                    self.dev.log(format_args!(
                        "rx {}: cancelling the tap read: {e}",
                        self.index
                    ));
                }
                if let (Ok(n), iovecs) = read.await {
                    if n > 0 {
                        let spill = iovecs.into_host();
                        self.received(n, chains, capacity, &spill, stop).await?;
                    }
                }
                return Ok(());
            };
            spill = iovecs.into_host();
            match result {
                Ok(n) => self.received(n, chains, capacity, &spill, stop).await?,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        let readable = pin!(self.pair.io.poll_readable());
                        if let Either::Right(_) = select(readable, stop.clone()).await {
                            return Ok(());
                        }
                    }
                    Some(libc::EINTR | libc::ECANCELED) => {}
                    // A detached tap queue: wait for the pairs to change.
                    Some(libc::EBADFD) => {
                        let since = self.dev.pairs_changed.generation.get();
                        let changed = pin!(self.dev.pairs_changed.after(since));
                        if let Either::Right(_) = select(changed, stop.clone()).await {
                            return Ok(());
                        }
                    }
                    _ => {
                        self.dev.count(|c| c.rx_errors += 1);
                        self.dev
                            .log(format_args!("rx {}: tap read failed: {e}", self.index));
                        // Not retried in a loop: wait to be stopped.
                        stop.clone().await;
                        return Ok(());
                    }
                },
            }
        }
    }

    /// Whether `chain` takes the largest frame by itself (one read, no spill into others).
    fn fits(&self, chain: &DescriptorChain) -> bool {
        chain.writable_len() >= self.need && chain.writable().len() <= MAX_READ_BUFFERS
    }

    /// Whether the next reads can go one per chain: every held chain takes a whole frame.
    fn can_batch(&self) -> bool {
        !self.held.is_empty() && self.held.iter().all(|c| self.fits(c))
    }

    /// One round of reads, one per chain, each chain taking a whole frame: the held chains
    /// and more popped. While the tap has frames (every read of the last round got one),
    /// a round is up to `burst` reads that do not wait (`RWF_NOWAIT`), all submitted at once:
    /// each completes as it is submitted, in order, with the tap's next frame or EAGAIN.
    /// Once the tap is found empty a round is one read that waits for the next frame. So
    /// the i-th read of a round holds its i-th frame, and frames are delivered in read order,
    /// one notification per round; chains left unused go back to `held` in pop order.
    /// Returns whether to go on (false: stopped, or the tap failed and the stop came).
    async fn run_batch(&mut self, stop: &StopSignal) -> std::result::Result<bool, virtio::Error> {
        if stop.clone().now_or_never().is_some() {
            return Ok(false);
        }
        let nowait_round = self.busy && self.nowait;
        let want = if nowait_round { self.burst } else { 1 };
        let mut chains: Vec<Option<DescriptorChain>> = Vec::with_capacity(want);
        while chains.len() < want {
            let chain = match self.held.pop_front() {
                Some(c) => {
                    self.held_len -= c.writable_len();
                    c
                }
                None => match self.queue.try_pop().transpose() {
                    None => break,
                    Some(Ok(c)) if self.fits(&c) => c,
                    Some(popped) => {
                        self.hold(popped)?;
                        if !self.held.is_empty() {
                            break;
                        }
                        // Returned at once: the chains popped before it are not the last.
                        if !chains.is_empty() {
                            self.contiguous = false;
                        }
                        continue;
                    }
                },
            };
            chains.push(Some(chain));
        }
        let (results, longest, stopped) = match self.plain_reads(&chains)? {
            Some((iov, longest)) => {
                let reads = self.pair.io.read_each(iov, nowait_round);
                let ((results, _), stopped) = self.await_reads(reads, nowait_round, stop).await;
                (results, longest, stopped)
            }
            None => self.chain_reads(&chains, nowait_round, stop).await?,
        };
        let mut readable = false;
        let mut detached = false;
        let mut failed = false;
        let mut empty = false;
        let mut frames = 0;
        for (i, res) in results.into_iter().enumerate() {
            let Some(chain) = chains[i].take() else {
                continue;
            };
            match res {
                Ok(n) if n >= VNET_HDR_SIZE && n <= longest[i] => {
                    // Chains popped before this one and not returned: no stepping back.
                    if chains[..i].iter().any(Option::is_some) {
                        self.contiguous = false;
                    }
                    self.deliver_chain(&chain, n)?;
                    frames += 1;
                }
                Ok(n) => {
                    // Cut by the tap: the chain stays held for the next frame.
                    self.dev.log_guest(format_args!(
                        "rx {}: a {n}-byte frame does not fit in {} bytes of buffers",
                        self.index,
                        chain.writable_len()
                    ));
                    self.dev.count(|c| c.rx_errors += 1);
                    chains[i] = Some(chain);
                }
                Err(e) => {
                    match e.raw_os_error() {
                        // A read without wait found the tap empty.
                        Some(libc::EAGAIN) if nowait_round => empty = true,
                        Some(libc::EAGAIN) => readable = true,
                        Some(libc::EINTR | libc::ECANCELED) => {}
                        Some(libc::EBADFD) => detached = true,
                        // RWF_NOWAIT refused (a kernel whose tap lacks it): one waiting read
                        // a round from now on.
                        _ if nowait_round => {
                            if self.nowait {
                                self.dev.log(format_args!(
                                    "rx {}: tap reads without wait fail ({e}): one read at \
                                     a time",
                                    self.index
                                ));
                            }
                            self.nowait = false;
                        }
                        _ => {
                            if !failed {
                                self.dev.count(|c| c.rx_errors += 1);
                                self.dev
                                    .log(format_args!("rx {}: tap read failed: {e}", self.index));
                            }
                            failed = true;
                        }
                    }
                    chains[i] = Some(chain);
                }
            }
        }
        if frames > 0 {
            self.queue.signal_used()?;
        }
        // Unused chains go back in pop order, before any held chain (popped after them).
        for c in chains.into_iter().rev().flatten() {
            self.held_len += c.writable_len();
            self.held.push_front(c);
        }
        if self.held.is_empty() {
            self.contiguous = true;
        }
        // Reads without wait while the tap has frames, more of them while every one gets a
        // frame; one waiting read once it is empty.
        if nowait_round {
            self.busy = !empty && self.nowait;
            self.burst = (2 * frames).clamp(2, RX_READS);
        } else {
            self.busy = frames > 0 && self.nowait;
        }
        if stopped {
            return Ok(false);
        }
        if failed {
            // Not retried in a loop: wait to be stopped.
            stop.clone().await;
            return Ok(false);
        }
        if detached {
            let since = self.dev.pairs_changed.generation.get();
            let changed = pin!(self.dev.pairs_changed.after(since));
            if let Either::Right(_) = select(changed, stop.clone()).await {
                return Ok(false);
            }
        } else if readable {
            let readable = pin!(self.pair.io.poll_readable());
            if let Either::Right(_) = select(readable, stop.clone()).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// When the first buffer of every chain of a round takes the largest frame and a byte
    /// more: those buffers, one region each for one plain read per chain, and the longest
    /// frame each read may bring (a read that fills its buffer was cut by the tap).
    fn plain_reads(
        &self,
        chains: &[Option<DescriptorChain>],
    ) -> std::result::Result<Option<(memory::GuestIoVecs, Vec<usize>)>, virtio::Error> {
        let mut ranges = Vec::with_capacity(chains.len());
        for chain in chains.iter().flatten() {
            match chain.writable().first() {
                Some(b) if b.len as usize > self.need => ranges.push((b.addr, b.len as usize)),
                _ => return Ok(None),
            }
        }
        let iov = self
            .queue
            .memory()
            .iovecs(&ranges)
            .map_err(virtio::Error::BufferAccess)?;
        // A buffer across two memory regions takes two iovecs: not one read per region.
        if iov.len() != ranges.len() {
            return Ok(None);
        }
        let longest = ranges.iter().map(|&(_, len)| len - 1).collect();
        Ok(Some((iov, longest)))
    }

    /// One read per chain, each into all of its buffers and a spill byte: the rounds whose
    /// chains [`Rx::plain_reads`] does not take. Returns each read's result, the longest
    /// frame each may bring, and whether the stop came.
    async fn chain_reads(
        &mut self,
        chains: &[Option<DescriptorChain>],
        nowait: bool,
        stop: &StopSignal,
    ) -> std::result::Result<(Vec<std::io::Result<usize>>, Vec<usize>, bool), virtio::Error> {
        let mut longest = Vec::with_capacity(chains.len());
        let mut reads = Vec::with_capacity(chains.len());
        for chain in chains.iter().flatten() {
            let mut spill = self.spills.pop().unwrap_or_default();
            // One byte more than the chain: a frame the tap had to cut shows.
            longest.push(chain.writable_len());
            spill.resize(1, 0);
            let iov = chain
                .writer(self.queue.memory())
                .iovecs(chain.writable_len())?;
            let iov = sys::HostIoVecs::spill(iov, spill);
            reads.push(if nowait {
                self.pair.io.read_mem_at_nowait(iov, 0).right_future()
            } else {
                self.pair.io.read_mem_at(iov, 0).left_future()
            });
        }
        let mut results = Vec::with_capacity(reads.len());
        let mut stopped = false;
        for read in reads {
            let ((res, iov), stop_came) = self.await_reads(read, nowait, stop).await;
            stopped |= stop_came;
            self.spills.push(iov.into_host());
            results.push(res);
        }
        Ok((results, longest, stopped))
    }

    /// Awaits `reads`: at once when they do not wait, else until they complete or `stop`
    /// fires. On a stop they are cancelled and awaited, so that whatever they took from the
    /// tap is delivered, never lost; the flag says the stop came.
    async fn await_reads<F: Future>(
        &self,
        reads: F,
        nowait: bool,
        stop: &StopSignal,
    ) -> (F::Output, bool) {
        let mut reads = pin!(reads);
        if nowait {
            return (reads.await, false);
        }
        if let Either::Left((done, _)) = select(reads.as_mut(), stop.clone()).await {
            return (done, false);
        }
        loop {
            if let Err(e) = self.pair.io.cancel_all().await {
                self.dev
                    .log(format_args!("rx {}: cancelling tap reads: {e}", self.index));
            }
            // A read the cancel missed (re-armed meanwhile) is cancelled again.
            let wait = std::time::Duration::from_millis(20);
            if let Ok(done) = executor::timeout(wait, reads.as_mut()).await {
                return (done, true);
            }
        }
    }

    /// Returns `chain`, which a frame of `n` bytes (header included) filled by itself.
    fn deliver_chain(&self, chain: &DescriptorChain, n: usize) -> QueueResult {
        self.finish_header(chain, 1)?;
        self.queue.add_used(chain.head_index(), n as u32)?;
        self.dev.count(|c| {
            c.rx_packets += 1;
            c.rx_bytes += (n - VNET_HDR_SIZE) as u64;
        });
        Ok(())
    }

    /// Sets what the device owns in the header the tap wrote at the start of `chain`:
    /// `num_buffers`, and zero flags without `GUEST_CSUM` (the tap may set `DATA_VALID`).
    fn finish_header(&self, chain: &DescriptorChain, num_buffers: u16) -> QueueResult {
        let mem = self.queue.memory();
        // The usual case: the first buffer holds the whole header, in one memory region.
        let first = chain.writable().first();
        if let Some(b) = first.filter(|b| b.len as usize >= VNET_HDR_SIZE) {
            if let Ok(hdr) = mem.get_slice(b.addr, VNET_HDR_SIZE) {
                let flags = if self.guest_csum {
                    Some(())
                } else {
                    hdr.write_obj(0u8, 0)
                };
                let oob = memory::Error::OutOfBounds {
                    addr: b.addr,
                    len: VNET_HDR_SIZE as u64,
                };
                return flags
                    .and_then(|()| hdr.write_obj(num_buffers.to_le(), NUM_BUFFERS_OFFSET))
                    .ok_or(virtio::Error::BufferAccess(oob));
            }
        }
        // A header split across buffers or memory regions.
        let mut w = chain.writer(mem);
        if !self.guest_csum {
            w.write_obj(0u8)?;
        } else {
            w.consume(1);
        }
        w.consume(NUM_BUFFERS_OFFSET - 1);
        w.write_obj(num_buffers.to_le())
    }

    /// The buffers the next read fills and how many chains they cover: with `MRG_RXBUF`
    /// the held chains that fit in [`MAX_READ_BUFFERS`], else the first chain (cut to that
    /// many buffers; a frame that does not fit is then counted, not delivered).
    fn read_buffers(&self) -> (Vec<Buffer>, usize) {
        let mut bufs = Vec::new();
        let mut chains = 0;
        for c in &self.held {
            let w = c.writable();
            if !self.mrg || chains == 0 && w.len() > MAX_READ_BUFFERS {
                bufs.extend_from_slice(&w[..w.len().min(MAX_READ_BUFFERS)]);
                return (bufs, 1);
            }
            if bufs.len() + w.len() > MAX_READ_BUFFERS {
                break;
            }
            bufs.extend_from_slice(w);
            chains += 1;
        }
        (bufs, chains)
    }

    /// A read of `n` bytes (header included) into `capacity` bytes of the first `chains` held
    /// chains and then `spill`: delivers the frame, copying an overflow into more chains with
    /// `MRG_RXBUF`
    /// (waiting for the driver to post them), or counts it as an error if it cannot fit.
    async fn received(
        &mut self,
        n: usize,
        chains: usize,
        capacity: usize,
        spill: &[u8],
        stop: &StopSignal,
    ) -> QueueResult {
        if n < VNET_HDR_SIZE || n >= capacity + spill.len() || (n > capacity && !self.mrg) {
            // Cut by the tap (larger than the largest frame we allowed for), or too big for
            // one buffer without MRG_RXBUF: the chains stay held for the next frame.
            self.dev.log_guest(format_args!(
                "rx {}: a {n}-byte frame does not fit in {capacity} bytes of buffers",
                self.index
            ));
            self.dev.count(|c| c.rx_errors += 1);
            return Ok(());
        }
        let mut overflow = &spill[..n.saturating_sub(capacity)];
        // The read filled the first `chains` held chains: the overflow goes into the next.
        let mut filled = chains;
        while !overflow.is_empty() {
            if filled == self.held.len() {
                let next = pin!(self.queue.next_chain());
                match select(next, stop.clone()).await {
                    Either::Left((popped, _)) => self.hold(popped)?,
                    Either::Right(((), _)) => {
                        self.dev.log(format_args!(
                            "rx {}: stopped while a {n}-byte frame waited for buffers",
                            self.index
                        ));
                        self.dev.count(|c| c.rx_errors += 1);
                        return Ok(());
                    }
                }
                continue;
            }
            let chain = &self.held[filled];
            let k = overflow.len().min(chain.writable_len());
            chain
                .writer(self.queue.memory())
                .write_all_bytes(&overflow[..k])?;
            overflow = &overflow[k..];
            filled += 1;
        }
        self.deliver(n)
    }

    /// Returns the chains a frame of `n` bytes (header included) filled, in order.
    fn deliver(&mut self, n: usize) -> QueueResult {
        let mut used = Vec::new();
        let mut left = n;
        for chain in &self.held {
            let take = left.min(chain.writable_len());
            used.push((chain.head_index(), take as u32));
            left -= take;
            if left == 0 || !self.mrg {
                break;
            }
        }
        let Some(first) = self.held.front() else {
            return Ok(());
        };
        // The header is in the first chain (it has at least VNET_HDR_SIZE bytes).
        self.finish_header(first, used.len() as u16)?;
        for &(head, len) in &used {
            self.queue.add_used(head, len)?;
            if let Some(c) = self.held.pop_front() {
                self.held_len -= c.writable_len();
            }
        }
        if self.held.is_empty() {
            self.contiguous = true;
        }
        self.dev.count(|c| {
            c.rx_packets += 1;
            c.rx_bytes += (n - VNET_HDR_SIZE) as u64;
        });
        self.queue.signal_used().map(drop)
    }

    /// Gives the held chains back: unconsumed if nothing was returned after them, else as
    /// empty used entries.
    fn give_back(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.held_len = 0;
        if self.contiguous {
            self.queue.with_queue(|q| {
                for _ in &held {
                    q.undo_pop();
                }
            });
            return;
        }
        for c in &held {
            if let Err(e) = self.queue.add_used(c.head_index(), 0) {
                self.dev.log(format_args!("rx {}: {e}", self.index));
                return;
            }
        }
        if let Err(e) = self.queue.signal_used() {
            self.dev.log(format_args!("rx {}: {e}", self.index));
        }
    }
}

impl Device for NetDevice {
    fn name(&self) -> &'static str {
        "net"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> usize {
        let pairs = self.num_pairs();
        if pairs > 1 {
            2 * pairs + 1
        } else {
            2
        }
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0u64, |f, &bit| f | (1 << bit));
        if self.num_pairs() > 1 {
            f |= (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
        }
        f
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let config = self.config();
        data.fill(0);
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = start.saturating_add(data.len()).min(CONFIG_SIZE);
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn run_queue(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(self.run(index, queue, acked_features, stop))
    }

    fn reset(&self) {
        if let Err(e) = self.set_active_pairs(1) {
            self.log(format_args!("reset: {e}"));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use executor::{EventFd, EventFdStream, Executor, Task};
    use memory::{GuestAddress, GuestMemory};
    use virtio::mock::{MockBuf, MockChain, MockSplitQueue};
    use virtio::vhost_user::{serve, Connection, Frontend, VringConfig, VIRTIO_F_VERSION_1};
    use virtio::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

    use super::*;
    use crate::hdr::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM};
    use crate::testing::*;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const BASE: u64 =
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX);
    const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    /// A receive buffer as Linux posts without MRG_RXBUF and without GSO.
    const RX_BUF: u32 = 1526 + 12;

    /// The driver side of one queue.
    struct Ring {
        driver: MockSplitQueue,
        kick: EventFd,
        call: EventFd,
        calls: EventFdStream,
        sent: HashMap<u16, MockChain>,
    }

    impl Ring {
        fn new(mem: &GuestMemory, base: u64, data: u64, data_len: u64) -> Ring {
            let driver = MockSplitQueue::with_data_area(
                mem,
                GuestAddress(base),
                256,
                GuestAddress(data),
                data_len,
            )
            .unwrap();
            let call = EventFd::new().unwrap();
            let calls = call.try_clone().unwrap().into_stream();
            Ring {
                driver,
                kick: EventFd::new().unwrap(),
                call,
                calls,
                sent: HashMap::new(),
            }
        }

        fn config(&self, index: u32) -> VringConfig<'_> {
            VringConfig {
                index,
                size: self.driver.size(),
                desc: self.driver.desc_table(),
                avail: self.driver.avail_addr(),
                used: self.driver.used_addr(),
                base: 0,
                kick: self.kick.as_fd(),
                call: Some(self.call.as_fd()),
            }
        }

        fn add(&mut self, bufs: &[MockBuf]) -> MockChain {
            let c = self.driver.add_chain(bufs).unwrap();
            self.sent.insert(c.head, c.clone());
            self.kick.write(1).unwrap();
            c
        }

        fn add_indirect(&mut self, bufs: &[MockBuf]) -> MockChain {
            let c = self.driver.add_indirect_chain(bufs).unwrap();
            self.sent.insert(c.head, c.clone());
            self.kick.write(1).unwrap();
            c
        }

        /// The next used chain and its length, waiting for the device's call.
        async fn used(&mut self) -> (MockChain, u32) {
            loop {
                if let Some(u) = self.driver.next_used().unwrap() {
                    let c = self.sent.remove(&(u.id as u16)).expect("a chain we sent");
                    return (c, u.len);
                }
                // EVENT_IDX: ask for a call once the device uses the next entry, then look
                // again (as a driver does before it sleeps).
                let seen = self.driver.used_idx().unwrap();
                self.driver.set_used_event(seen).unwrap();
                if self.driver.used_idx().unwrap() != seen {
                    continue;
                }
                executor::timeout(TIMEOUT, self.calls.next_value())
                    .await
                    .expect("the device signals")
                    .unwrap();
            }
        }
    }

    struct Guest {
        mem: GuestMemory,
        rx: Ring,
        tx: Ring,
        ctrl: Option<Ring>,
        /// The receive and transmit rings of the second queue pair, with two pairs.
        pair1: Option<(Ring, Ring)>,
        fe: Frontend,
        server: Task<virtio::vhost_user::Result<()>>,
        dev: Rc<NetDevice>,
        /// Receive chains posted again for each one used.
        repost: Option<u32>,
    }

    fn pair() -> (Connection, Connection) {
        let (a, b) = executor::socketpair().unwrap();
        (Connection::new(a), Connection::new(b))
    }

    impl Guest {
        async fn start(dev: Rc<NetDevice>, features: u64) -> Guest {
            let (front, back) = pair();
            let server = executor::spawn(serve(dev.clone(), back));
            let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
            assert_eq!(fe.features() & features, features, "features offered");
            let mem = GuestMemory::new_x86(128 << 20).unwrap();
            let rx = Ring::new(&mem, 0x10000, 0x100_0000, 16 << 20);
            let tx = Ring::new(&mem, 0x20000, 0x200_0000, 16 << 20);
            let mq = dev.num_pairs() > 1;
            let ctrl = mq.then(|| Ring::new(&mem, 0x30000, 0x300_0000, 1 << 20));
            let pair1 = mq.then(|| {
                (
                    Ring::new(&mem, 0x40000, 0x400_0000, 16 << 20),
                    Ring::new(&mem, 0x50000, 0x500_0000, 16 << 20),
                )
            });
            let mut rings = vec![rx.config(0), tx.config(1)];
            if let Some((rx1, tx1)) = &pair1 {
                rings.extend([rx1.config(2), tx1.config(3)]);
            }
            if let Some(c) = &ctrl {
                rings.push(c.config(2 * dev.num_pairs() as u32));
            }
            fe.start(BASE | features, &mem, &rings).await.unwrap();
            Guest {
                mem,
                rx,
                tx,
                ctrl,
                pair1,
                fe,
                server,
                dev,
                repost: None,
            }
        }

        /// Transmits `frame` with `hdr`, waiting for the chain to come back.
        async fn send(&mut self, hdr: VirtioNetHdr, frame: &[u8]) {
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(frame);
            self.send_chain(&[MockBuf::Readable(bytes)]).await;
        }

        async fn send_chain(&mut self, bufs: &[MockBuf]) {
            let sent = self.tx.add(bufs);
            let (used, len) = self.tx.used().await;
            assert_eq!((used.head, len), (sent.head, 0));
        }

        fn post_rx(&mut self, chains: usize, len: u32) {
            for _ in 0..chains {
                self.rx.add(&[MockBuf::Writable(len)]);
            }
        }

        /// The next received frame (all its buffers), with its header.
        async fn recv(&mut self) -> (VirtioNetHdr, Vec<u8>) {
            let (c, len) = self.rx.used().await;
            let mut data = self.rx.driver.read_writable(&c).unwrap();
            data.truncate(len as usize);
            let hdr = VirtioNetHdr::from_bytes(data[..VNET_HDR_SIZE].try_into().unwrap());
            let mut chains = 1;
            for _ in 1..hdr.num_buffers {
                let (c, len) = self.rx.used().await;
                let more = self.rx.driver.read_writable(&c).unwrap();
                data.extend_from_slice(&more[..len as usize]);
                chains += 1;
            }
            if let Some(len) = self.repost {
                self.post_rx(chains, len);
            }
            (hdr, data.split_off(VNET_HDR_SIZE))
        }

        /// The next received frame that `want` accepts (the kernel also sends IPv6 router
        /// solicitations and the like).
        async fn recv_where(&mut self, want: impl Fn(&Parsed) -> bool) -> (VirtioNetHdr, Parsed) {
            for _ in 0..50 {
                let (hdr, frame) = self.recv().await;
                let p = parse_ethernet(&frame);
                if want(&p) {
                    return (hdr, p);
                }
            }
            panic!("no matching frame");
        }

        /// ARP for the host side; returns its MAC.
        async fn resolve_host(&mut self) -> [u8; 6] {
            self.send(VirtioNetHdr::default(), &arp_request(HOST_IP))
                .await;
            let (_, p) = self
                .recv_where(|p| p.ethertype == 0x0806 && p.payload[7] == 2)
                .await;
            assert_eq!(p.dst_mac, GUEST_MAC);
            assert_eq!(&p.payload[14..18], &HOST_IP.octets());
            assert_eq!(&p.payload[18..24], &GUEST_MAC);
            p.src_mac
        }

        /// Stops both rings (returns their bases), closes the connection, checks the server
        /// ended.
        async fn stop(self) -> Vec<u16> {
            let mut rings = vec![0, 1];
            if self.pair1.is_some() {
                rings.extend([2, 3]);
            }
            if self.ctrl.is_some() {
                rings.push(2 * self.dev.num_pairs() as u32);
            }
            let bases = self.fe.stop(&rings).await.unwrap();
            drop(self.fe);
            executor::timeout(TIMEOUT, self.server)
                .await
                .unwrap()
                .unwrap();
            bases
        }
    }

    fn host_tap(name: &str) -> Tap {
        let tap = Tap::create(Some(name), 1).unwrap().pop().unwrap();
        tap.configure(HOST_IP, MASK).unwrap();
        let guest = GUEST_IP.to_string();
        let mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        ip(&[
            "neigh",
            "replace",
            &guest,
            "lladdr",
            &mac,
            "dev",
            name,
            "nud",
            "permanent",
        ]);
        tap
    }

    fn device(tap: Tap) -> Rc<NetDevice> {
        Rc::new(NetDevice::new(vec![tap.into_fd()], NetOptions::default()).unwrap())
    }

    /// The UDP payload of `p` if it is a datagram to `dport`; checks the IP header.
    fn udp_payload(p: &Parsed, dport: u16) -> Option<(Vec<u8>, u16)> {
        let ip = &p.payload;
        if p.ethertype != 0x0800 || ip.len() < 28 || ip[9] != 17 {
            return None;
        }
        let u = &ip[20..];
        if u16::from_be_bytes([u[2], u[3]]) != dport {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
        let csum = u16::from_be_bytes([u[6], u[7]]);
        Some((u[8..len].to_vec(), csum))
    }

    /// Whether the UDP checksum of the datagram in `p` verifies.
    fn udp_checksum_ok(p: &Parsed) -> bool {
        let ip = &p.payload;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let u = &ip[20..];
        let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
        checksum(&u[..len], pseudo_sum(src, dst, 17, len)) == 0
    }

    fn run<F: Future>(f: F) -> F::Output {
        Executor::new().unwrap().run_until(f)
    }

    #[test]
    fn arp_and_ping_to_the_host_side_are_answered() {
        in_netns(|| {
            let dev = device(host_tap("rvnet0"));
            run(async {
                let mut g = Guest::start(dev.clone(), 1 << VIRTIO_NET_F_MAC).await;
                let config = g.fe.get_config(0, CONFIG_SIZE as u32).await.unwrap();
                assert_eq!(&config[..8], &[0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
                g.repost = Some(RX_BUF);
                g.post_rx(8, RX_BUF);
                let host_mac = g.resolve_host().await;
                let data = b"ringvm ping payload";
                g.send(
                    VirtioNetHdr::default(),
                    &icmp_echo(host_mac, HOST_IP, 0x77, 1, data),
                )
                .await;
                let (hdr, p) = g
                    .recv_where(|p| p.ethertype == 0x0800 && p.payload[9] == 1)
                    .await;
                assert_eq!(hdr.flags, 0, "no GUEST_CSUM: flags are zero");
                assert_eq!(hdr.num_buffers, 1);
                let icmp = &p.payload[20..];
                assert_eq!(icmp[0], 0, "echo reply");
                assert_eq!(&icmp[4..8], &[0, 0x77, 0, 1]);
                assert_eq!(&icmp[8..], data);
                assert_eq!(checksum(icmp, 0), 0);
                g.stop().await;
            });
            let c = dev.counters();
            assert_eq!(
                (c.tx_packets, c.tx_dropped, c.tx_errors, c.rx_errors),
                (2, 0, 0, 0)
            );
            assert!(c.rx_packets >= 2);
            assert_eq!(c.tx_bytes as usize, 42 + 14 + 20 + 8 + 19);
        });
    }

    #[test]
    fn host_udp_to_the_guest_arrives_fully_checksummed() {
        in_netns(|| {
            let dev = device(host_tap("rvnet1"));
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 1 << VIRTIO_NET_F_MAC).await;
                g.repost = Some(RX_BUF);
                g.post_rx(4, RX_BUF);
                for i in 0..3u8 {
                    sock.send_to(&[i; 100], (GUEST_IP, 5555)).unwrap();
                    let (hdr, p) = g.recv_where(|p| udp_payload(p, 5555).is_some()).await;
                    assert_eq!(hdr.flags, 0);
                    assert_eq!(hdr.gso_type, 0);
                    assert_eq!(p.dst_mac, GUEST_MAC);
                    assert_eq!(udp_payload(&p, 5555).unwrap().0, [i; 100]);
                    assert!(udp_checksum_ok(&p));
                }
                g.stop().await;
            });
        });
    }

    #[test]
    fn guest_csum_offload_is_completed_by_the_kernel_and_bad_checksums_are_not() {
        in_netns(|| {
            let dev = device(host_tap("rvnet2"));
            let sock = UdpSocket::bind((HOST_IP, 6000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 1 << VIRTIO_NET_F_CSUM).await;
                g.repost = Some(RX_BUF);
                g.post_rx(4, RX_BUF);
                let host_mac = g.resolve_host().await;
                let offload = VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                    csum_start: 34,
                    csum_offset: 6,
                    ..VirtioNetHdr::default()
                };
                let partial = udp(
                    host_mac,
                    HOST_IP,
                    7000,
                    6000,
                    b"offloaded",
                    UdpCsum::Partial,
                );
                g.send(offload, &partial).await;
                let mut buf = [0u8; 64];
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"offloaded");
                assert_eq!(from, (GUEST_IP, 7000).into());
                // The same partial checksum without NEEDS_CSUM is wrong: the kernel drops it.
                g.send(VirtioNetHdr::default(), &partial).await;
                let bad = udp(host_mac, HOST_IP, 7000, 6000, b"bad", UdpCsum::Bad);
                g.send(VirtioNetHdr::default(), &bad).await;
                // DATA_VALID (which a driver must not send) and unknown flags are ignored:
                // the frame goes out (counted below) and the kernel drops it all the same.
                let claims_valid = VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_DATA_VALID | 0x10,
                    ..VirtioNetHdr::default()
                };
                g.send(claims_valid, &bad).await;
                assert!(
                    sock.recv_from(&mut buf).is_err(),
                    "bad checksums are dropped"
                );
                let full = udp(host_mac, HOST_IP, 7000, 6000, b"full", UdpCsum::Full);
                g.send(VirtioNetHdr::default(), &full).await;
                let (n, _) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"full");
                // An hdr_len hint the tap would refuse is rewritten, and the frame goes out.
                let bad_hint = VirtioNetHdr {
                    hdr_len: 5,
                    ..VirtioNetHdr::default()
                };
                g.send(bad_hint, &full).await;
                let (n, _) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"full");
                g.stop().await;
            });
            assert_eq!(dev.counters().tx_errors, 0);
            assert_eq!(
                dev.counters().tx_packets,
                7,
                "the tap took all; the kernel dropped three"
            );
        });
    }

    #[test]
    fn with_guest_csum_received_frames_carry_checksum_flags() {
        in_netns(|| {
            let dev = device(host_tap("rvnet3"));
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 1 << VIRTIO_NET_F_GUEST_CSUM).await;
                g.repost = Some(RX_BUF);
                g.post_rx(4, RX_BUF);
                sock.send_to(b"csum", (GUEST_IP, 5556)).unwrap();
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5556).is_some()).await;
                assert_ne!(
                    hdr.flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID),
                    0,
                    "{hdr:?}"
                );
                if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 6));
                }
                assert_eq!(udp_payload(&p, 5556).unwrap().0, b"csum");
                g.stop().await;
            });
        });
    }

    #[test]
    fn malformed_transmit_chains_are_dropped_and_counted_and_the_queue_goes_on() {
        in_netns(|| {
            let dev = device(host_tap("rvnet4"));
            let sock = UdpSocket::bind((HOST_IP, 6001)).unwrap();
            sock.set_read_timeout(Some(TIMEOUT)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 0).await;
                g.repost = Some(RX_BUF);
                g.post_rx(4, RX_BUF);
                let host_mac = g.resolve_host().await;
                // Oversized, a short header, a writable descriptor, an unknown GSO type,
                // checksum offload that was not negotiated.
                let mut big = VirtioNetHdr::default().to_bytes().to_vec();
                big.resize(12 + MAX_FRAME + 1, 0);
                g.send_chain(&[MockBuf::Readable(big)]).await;
                g.send_chain(&[MockBuf::Readable(vec![0; 8])]).await;
                let good = udp(host_mac, HOST_IP, 7000, 6001, b"good", UdpCsum::Full);
                let mut bytes = VirtioNetHdr::default().to_bytes().to_vec();
                bytes.extend_from_slice(&good);
                g.send_chain(&[MockBuf::Readable(bytes), MockBuf::Writable(16)])
                    .await;
                let gso = VirtioNetHdr {
                    gso_type: 2,
                    ..VirtioNetHdr::default()
                };
                g.send(gso, &good).await;
                let csum = VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                    csum_start: 34,
                    csum_offset: 6,
                    ..VirtioNetHdr::default()
                };
                g.send(csum, &good).await;
                // An invalid chain (a buffer outside guest memory).
                let bad = virtio::Descriptor {
                    addr: 0xffff_ffff_0000,
                    len: 64,
                    flags: 0,
                    next: 0,
                };
                g.tx.driver.write_desc(200, bad).unwrap();
                g.tx.driver.publish(200).unwrap();
                g.tx.kick.write(1).unwrap();
                let raw = MockChain {
                    head: 200,
                    readable: vec![],
                    writable: vec![],
                };
                g.tx.sent.insert(200, raw);
                let (c, len) = g.tx.used().await;
                assert_eq!((c.head, len), (200, 0));
                g.send(VirtioNetHdr::default(), &good).await;
                let mut buf = [0u8; 16];
                let (n, _) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"good");
                let c = dev.counters();
                assert_eq!((c.tx_dropped, c.tx_packets, c.tx_errors), (6, 2, 0), "{c}");
                g.stop().await;
            });
        });
    }

    #[test]
    fn without_receive_buffers_the_device_sleeps_and_frames_wait_for_buffers() {
        in_netns(|| {
            let dev = device(host_tap("rvnet5"));
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 0).await;
                let before = crate::sys::thread_cpu_time().unwrap();
                for i in 0..5u8 {
                    sock.send_to(&[i; 32], (GUEST_IP, 5557)).unwrap();
                }
                executor::sleep(Duration::from_millis(300)).await.unwrap();
                let spent = crate::sys::thread_cpu_time().unwrap() - before;
                assert!(
                    spent < Duration::from_millis(60),
                    "busy: {spent:?} of CPU in 300 ms"
                );
                assert_eq!(dev.counters().rx_packets, 0);
                g.repost = Some(RX_BUF);
                g.post_rx(8, RX_BUF);
                for i in 0..5u8 {
                    let (_, p) = g.recv_where(|p| udp_payload(p, 5557).is_some()).await;
                    assert_eq!(udp_payload(&p, 5557).unwrap().0, [i; 32]);
                }
                g.stop().await;
            });
        });
    }

    #[test]
    fn stopping_gives_held_receive_buffers_back_and_a_restart_uses_them() {
        in_netns(|| {
            let dev = device(host_tap("rvnet6"));
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let features = 1 << VIRTIO_NET_F_MRG_RXBUF;
                let mut g = Guest::start(dev.clone(), features).await;
                g.post_rx(8, RX_BUF);
                executor::sleep(Duration::from_millis(50)).await.unwrap();
                // The device held them (MRG_RXBUF); those the kernel's own frames (IPv6
                // solicitations and reports, a few) did not fill go back unconsumed.
                let base = g.fe.stop(&[0]).await.unwrap()[0];
                assert_eq!(
                    base,
                    g.rx.driver.used_idx().unwrap(),
                    "only used chains consumed"
                );
                assert!(base < 8);
                // Frames sent while the ring is stopped wait in the tap.
                sock.send_to(b"after restart", (GUEST_IP, 5558)).unwrap();
                g.fe.start(BASE | features, &g.mem, &[g.rx.config(0)])
                    .await
                    .unwrap();
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5558).is_some()).await;
                assert_eq!(hdr.num_buffers, 1);
                assert_eq!(udp_payload(&p, 5558).unwrap().0, b"after restart");
                g.stop().await;
            });
        });
    }

    #[test]
    fn mergeable_buffers_carry_a_jumbo_frame_across_chains() {
        in_netns(|| {
            let tap = host_tap("rvnet7");
            ip(&["link", "set", "dev", "rvnet7", "mtu", "9000"]);
            let dev = device(tap);
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let features = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_GUEST_CSUM);
                let mut g = Guest::start(dev.clone(), features).await;
                g.repost = Some(1536);
                g.post_rx(16, 1536);
                let data: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
                sock.send_to(&data, (GUEST_IP, 5559)).unwrap();
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5559).is_some()).await;
                assert_eq!(
                    usize::from(hdr.num_buffers),
                    (12 + 14 + 28 + 8000usize).div_ceil(1536)
                );
                assert_eq!(udp_payload(&p, 5559).unwrap().0, data);
                // Small frames still take one buffer each.
                sock.send_to(b"small", (GUEST_IP, 5559)).unwrap();
                let (hdr, _) = g.recv_where(|p| udp_payload(p, 5559).is_some()).await;
                assert_eq!(hdr.num_buffers, 1);
                g.stop().await;
            });
            assert_eq!(dev.counters().rx_errors, 0);
        });
    }

    #[test]
    fn mergeable_frame_overflowing_the_buffers_waits_for_more() {
        in_netns(|| {
            let tap = host_tap("rvnet10");
            ip(&["link", "set", "dev", "rvnet10", "mtu", "9000"]);
            let dev = device(tap);
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let features = 1 << VIRTIO_NET_F_MRG_RXBUF;
                let mut g = Guest::start(dev.clone(), features).await;
                g.repost = Some(1024);
                g.post_rx(2, 1024);
                executor::sleep(Duration::from_millis(20)).await.unwrap();
                let data: Vec<u8> = (0..6000u32).map(|i| (i % 253) as u8).collect();
                sock.send_to(&data, (GUEST_IP, 5561)).unwrap();
                // The frame is read into the two buffers and the spill; it waits for more.
                executor::sleep(Duration::from_millis(100)).await.unwrap();
                g.post_rx(8, 1024);
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5561).is_some()).await;
                assert_eq!(
                    usize::from(hdr.num_buffers),
                    (12 + 14 + 28 + 6000usize).div_ceil(1024)
                );
                assert_eq!(udp_payload(&p, 5561).unwrap().0, data);
                g.stop().await;
            });
            assert_eq!(dev.counters().rx_errors, 0);
        });
    }

    #[test]
    fn receive_chains_of_many_small_buffers_stay_within_the_iovec_limit() {
        in_netns(|| {
            let tap = host_tap("rvnet11");
            ip(&["link", "set", "dev", "rvnet11", "mtu", "9000"]);
            let dev = device(tap);
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let features = 1 << VIRTIO_NET_F_MRG_RXBUF;
                let mut g = Guest::start(dev.clone(), features).await;
                // Three chains of 200 16-byte buffers: 600 buffers, more than one read takes.
                g.repost = Some(3200);
                let small = vec![MockBuf::Writable(16); 200];
                for _ in 0..3 {
                    g.rx.add_indirect(&small);
                }
                let data: Vec<u8> = (0..7000u32).map(|i| (i % 241) as u8).collect();
                sock.send_to(&data, (GUEST_IP, 5562)).unwrap();
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5562).is_some()).await;
                assert!(hdr.num_buffers >= 3, "{hdr:?}");
                assert_eq!(udp_payload(&p, 5562).unwrap().0, data);
                g.stop().await;
            });
            assert_eq!(dev.counters().rx_errors, 0);
        });
    }

    #[test]
    fn a_receive_header_split_across_buffers_is_filled_in() {
        in_netns(|| {
            let dev = device(host_tap("rvnet21"));
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let features = 1 << VIRTIO_NET_F_MRG_RXBUF;
                let mut g = Guest::start(dev.clone(), features).await;
                // The 12-byte header lands in a 4- and an 8-byte buffer.
                let split = [
                    MockBuf::Writable(4),
                    MockBuf::Writable(8),
                    MockBuf::Writable(RX_BUF),
                ];
                for _ in 0..2 {
                    g.rx.add(&split);
                }
                sock.send_to(b"split", (GUEST_IP, 5563)).unwrap();
                let (hdr, p) = g.recv_where(|p| udp_payload(p, 5563).is_some()).await;
                assert_eq!((hdr.num_buffers, hdr.flags), (1, 0), "{hdr:?}");
                assert_eq!(udp_payload(&p, 5563).unwrap().0, b"split");
                g.stop().await;
            });
            assert_eq!(dev.counters().rx_errors, 0);
        });
    }

    /// Moves 20000 frames each way and prints the rates (the device and the mock driver
    /// share one thread here).
    #[test]
    fn bulk_frames_both_ways_are_all_sent_and_received_in_order() {
        const N: usize = 20_000;
        const SIZE: usize = 1400;
        in_netns(|| {
            let dev = device(host_tap("rvnet12"));
            let sink = UdpSocket::bind((HOST_IP, 6002)).unwrap();
            sink.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let receiver = std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let mut n = 0usize;
                while sink.recv(&mut buf).is_ok() {
                    n += 1;
                }
                n
            });
            let source = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 1 << VIRTIO_NET_F_MRG_RXBUF).await;
                g.repost = Some(RX_BUF);
                g.post_rx(128, RX_BUF);
                let host_mac = g.resolve_host().await;
                let frame = udp(host_mac, HOST_IP, 7000, 6002, &[0x5a; SIZE], UdpCsum::Full);
                let mut bytes = VirtioNetHdr::default().to_bytes().to_vec();
                bytes.extend_from_slice(&frame);
                let start = std::time::Instant::now();
                let mut sent = 0;
                while sent < N {
                    let batch = (N - sent).min(128);
                    for _ in 0..batch {
                        g.tx.add(&[MockBuf::Readable(bytes.clone())]);
                    }
                    for _ in 0..batch {
                        g.tx.used().await;
                    }
                    sent += batch;
                }
                let tx_time = start.elapsed();
                eprintln!(
                    "tx: {N} frames of {} bytes in {tx_time:?}: {:.0} frames/s",
                    frame.len(),
                    N as f64 / tx_time.as_secs_f64()
                );
                assert_eq!(dev.counters().tx_packets, N as u64 + 1);

                let sender = std::thread::spawn(move || {
                    for i in 0..N as u32 {
                        let mut d = [0u8; SIZE];
                        d[..4].copy_from_slice(&i.to_be_bytes());
                        source.send_to(&d, (GUEST_IP, 5563)).unwrap();
                        if i % 256 == 255 {
                            // Paced a little: the tap queue holds 1000 frames.
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                });
                let start = std::time::Instant::now();
                let mut rx_time = Duration::ZERO;
                let mut got = 0u32;
                let mut last = None;
                while got < N as u32 {
                    let wait = executor::timeout(
                        Duration::from_secs(2),
                        g.recv_where(|p| udp_payload(p, 5563).is_some()),
                    );
                    let Ok((_, p)) = wait.await else { break };
                    let (d, _) = udp_payload(&p, 5563).unwrap();
                    let i = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                    assert!(last.is_none_or(|l| i > l), "in order");
                    last = Some(i);
                    got += 1;
                    rx_time = start.elapsed();
                }
                sender.join().unwrap();
                eprintln!(
                    "rx: {got} of {N} frames in {rx_time:?}: {:.0} frames/s (the tap queue \
                     drops what the guest side does not keep up with)",
                    f64::from(got) / rx_time.as_secs_f64()
                );
                assert!(got > 0);
                g.stop().await;
            });
            let delivered = receiver.join().unwrap();
            eprintln!("host socket got {delivered} of {N}");
            assert_eq!(dev.counters().tx_errors, 0);
        });
    }

    #[test]
    fn arbitrary_transmit_chains_never_stop_the_queue_and_are_all_accounted_for() {
        in_netns(|| {
            let dev = device(host_tap("rvnet13"));
            run(async {
                let features = (1 << VIRTIO_NET_F_CSUM)
                    | (1 << VIRTIO_NET_F_HOST_TSO4)
                    | (1 << VIRTIO_NET_F_HOST_TSO6)
                    | (1 << VIRTIO_NET_F_HOST_ECN);
                let mut g = Guest::start(dev.clone(), features).await;
                let mut seed = 0x9e37_79b9_7f4a_7c15u64;
                let mut rand = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let total = 600;
                for round in 0..total / 30 {
                    for _ in 0..30 {
                        let mut hdr = [0u8; 12];
                        if rand(2) == 0 {
                            hdr.iter_mut().for_each(|b| *b = rand(256) as u8);
                        } else {
                            hdr[0] = rand(4) as u8;
                            hdr[1] = [0, 1, 3, 4, 0x81][rand(5) as usize];
                            hdr[4..6].copy_from_slice(&(rand(2000) as u16).to_le_bytes());
                            hdr[6..8].copy_from_slice(&(rand(80) as u16).to_le_bytes());
                            hdr[8..10].copy_from_slice(&(rand(20) as u16).to_le_bytes());
                        }
                        let len = match rand(20) {
                            0 => MAX_FRAME + rand(100) as usize,
                            1 => rand(20) as usize,
                            _ => rand(3000) as usize,
                        };
                        let mut bytes = hdr.to_vec();
                        bytes.extend((0..len).map(|_| rand(256) as u8));
                        // Cut into one to three readable buffers, sometimes with a
                        // writable one at the end, sometimes through an indirect table.
                        let cuts = 1 + rand(3) as usize;
                        let step = bytes.len().div_ceil(cuts).max(1);
                        let mut bufs: Vec<MockBuf> = bytes
                            .chunks(step)
                            .map(|c| MockBuf::Readable(c.to_vec()))
                            .collect();
                        if rand(10) == 0 {
                            bufs.push(MockBuf::Writable(8));
                        }
                        if rand(4) == 0 {
                            g.tx.add_indirect(&bufs);
                        } else {
                            g.tx.add(&bufs);
                        }
                    }
                    for _ in 0..30 {
                        let (_, len) = g.tx.used().await;
                        assert_eq!(len, 0);
                    }
                    let c = dev.counters();
                    assert_eq!(
                        c.tx_packets + c.tx_dropped + c.tx_errors,
                        30 * (round + 1),
                        "{c}"
                    );
                }
                // The queue still works.
                let c = dev.counters();
                g.post_rx(4, RX_BUF);
                g.resolve_host().await;
                assert_eq!(dev.counters().tx_packets, c.tx_packets + 1);
                g.stop().await;
            });
        });
    }

    /// A 4000-byte datagram to a guest posting whole-frame 1538-byte buffers, then a small
    /// one: the first is counted in `rx_errors`, never handed over cut; the second arrives.
    /// With `mtu_at_start` the tap has MTU 9000 before the device starts (the buffers are too
    /// small for its largest frame: a read spills); else it gets it afterwards (the buffers
    /// took the largest frame: one plain read each, which the long frame fills).
    fn cut_frame_is_counted_not_delivered(name: &str, mtu_at_start: bool) {
        let name = name.to_owned();
        in_netns(move || {
            let tap = host_tap(&name);
            let jumbo = || ip(&["link", "set", "dev", &name, "mtu", "9000"]);
            if mtu_at_start {
                jumbo();
            }
            let dev = device(tap);
            let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
            run(async {
                let mut g = Guest::start(dev.clone(), 0).await;
                g.repost = Some(RX_BUF);
                g.post_rx(2, RX_BUF);
                if !mtu_at_start {
                    jumbo();
                }
                sock.send_to(&[7; 4000], (GUEST_IP, 5560)).unwrap();
                sock.send_to(b"fits", (GUEST_IP, 5560)).unwrap();
                let (_, p) = g.recv_where(|p| udp_payload(p, 5560).is_some()).await;
                assert_eq!(udp_payload(&p, 5560).unwrap().0, b"fits");
                g.stop().await;
            });
            assert_eq!(dev.counters().rx_errors, 1);
        });
    }

    #[test]
    fn a_frame_larger_than_a_single_buffer_is_counted_not_delivered() {
        cut_frame_is_counted_not_delivered("rvnet8", true);
    }

    #[test]
    fn a_frame_cut_by_a_single_buffer_read_is_counted_not_delivered() {
        cut_frame_is_counted_not_delivered("rvnet20", false);
    }

    #[test]
    fn config_space_has_the_mac_link_up_and_pairs() {
        in_netns(|| {
            let dev = device(host_tap("rvnet9"));
            let mut c = [0u8; CONFIG_SIZE];
            dev.read_config(0, &mut c);
            assert_eq!(&c[..6], &GUEST_MAC);
            assert_eq!(&c[6..10], &[1, 0, 1, 0]);
            let mut tail = [9u8; 8];
            dev.read_config(16, &mut tail);
            assert_eq!(tail, [0; 8]);
            assert_eq!((dev.device_type(), dev.num_queues()), (1, 2));
            assert_eq!(dev.features() & (1 << VIRTIO_NET_F_MQ), 0);
        });
    }

    #[test]
    fn control_queue_sets_queue_pairs_and_refuses_the_rest() {
        in_netns(|| {
            let taps = Tap::create(Some("rvmq1"), 2).unwrap();
            taps[0].configure(HOST_IP, MASK).unwrap();
            let fds = taps.into_iter().map(Tap::into_fd).collect();
            let options = NetOptions {
                queue_pairs: 2,
                ..NetOptions::default()
            };
            let dev = Rc::new(NetDevice::new(fds, options).unwrap());
            assert_eq!(dev.num_queues(), 5);
            assert!(
                !dev.pairs[1].attached.get(),
                "one pair until the driver asks"
            );
            run(async {
                let features = (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
                let mut g = Guest::start(dev.clone(), features).await;
                let mut command = |class: u8, cmd: u8, data: &[u8]| {
                    let mut bytes = vec![class, cmd];
                    bytes.extend_from_slice(data);
                    let ctrl = g.ctrl.as_mut().unwrap();
                    ctrl.add(&[MockBuf::Readable(bytes), MockBuf::Writable(1)]);
                };
                command(
                    VIRTIO_NET_CTRL_MQ,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                    &2u16.to_le_bytes(),
                );
                let ctrl = g.ctrl.as_mut().unwrap();
                let (c, len) = ctrl.used().await;
                assert_eq!((len, ctrl.driver.read_writable(&c).unwrap()), (1, vec![0]));
                assert!(dev.pairs[1].attached.get());
                for (class, cmd, data) in [
                    (
                        VIRTIO_NET_CTRL_MQ,
                        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                        3u16.to_le_bytes(),
                    ),
                    (
                        VIRTIO_NET_CTRL_MQ,
                        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                        0u16.to_le_bytes(),
                    ),
                    (0, 0, [1, 0]),
                ] {
                    let mut bytes = vec![class, cmd];
                    bytes.extend_from_slice(&data);
                    let ctrl = g.ctrl.as_mut().unwrap();
                    ctrl.add(&[MockBuf::Readable(bytes), MockBuf::Writable(1)]);
                    let (c, len) = ctrl.used().await;
                    assert_eq!((len, ctrl.driver.read_writable(&c).unwrap()), (1, vec![1]));
                }
                assert_eq!(dev.active_pairs.get(), 2);
                g.stop().await;
            });
            dev.reset();
            assert!(!dev.pairs[1].attached.get());
        });
    }

    /// Sends a control command and returns the driver's ack byte.
    async fn control(g: &mut Guest, class: u8, command: u8, data: &[u8]) -> u8 {
        let mut bytes = vec![class, command];
        bytes.extend_from_slice(data);
        let ctrl = g.ctrl.as_mut().unwrap();
        ctrl.add(&[MockBuf::Readable(bytes), MockBuf::Writable(1)]);
        let (c, len) = ctrl.used().await;
        assert_eq!(len, 1);
        ctrl.driver.read_writable(&c).unwrap()[0]
    }

    /// Receives `n` datagrams to `port` on whichever of the two receive rings the tap's
    /// flow steering puts them; returns how many came on each.
    async fn recv_on_both(g: &mut Guest, port: u16, n: usize) -> [usize; 2] {
        let mut got = [0; 2];
        let deadline = std::time::Instant::now() + TIMEOUT;
        while got[0] + got[1] < n {
            assert!(std::time::Instant::now() < deadline, "got {got:?} of {n}");
            let mut idle = true;
            for (i, ring) in [&mut g.rx, &mut g.pair1.as_mut().unwrap().0]
                .into_iter()
                .enumerate()
            {
                let Some(u) = ring.driver.next_used().unwrap() else {
                    continue;
                };
                idle = false;
                let c = ring.sent.remove(&(u.id as u16)).unwrap();
                let data = ring.driver.read_writable(&c).unwrap();
                let p = parse_ethernet(&data[VNET_HDR_SIZE..u.len as usize]);
                if udp_payload(&p, port).is_some() {
                    got[i] += 1;
                }
                ring.add(&[MockBuf::Writable(RX_BUF)]);
            }
            if idle {
                executor::sleep(Duration::from_millis(1)).await.unwrap();
            }
        }
        got
    }

    #[test]
    fn two_queue_pairs_share_the_traffic_once_enabled_and_one_takes_it_all_after() {
        in_netns(|| {
            let taps = Tap::create(Some("rvmq2"), 2).unwrap();
            taps[0].configure(HOST_IP, MASK).unwrap();
            let mac = "52:54:00:12:34:56";
            ip(&[
                "neigh",
                "replace",
                "10.0.0.2",
                "lladdr",
                mac,
                "dev",
                "rvmq2",
                "nud",
                "permanent",
            ]);
            let fds = taps.into_iter().map(Tap::into_fd).collect();
            let options = NetOptions {
                queue_pairs: 2,
                ..NetOptions::default()
            };
            let dev = Rc::new(NetDevice::new(fds, options).unwrap());
            let socks: Vec<UdpSocket> = (0..32)
                .map(|_| UdpSocket::bind((HOST_IP, 0)).unwrap())
                .collect();
            run(async {
                let features = (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
                let mut g = Guest::start(dev.clone(), features).await;
                let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
                assert_eq!(control(&mut g, VIRTIO_NET_CTRL_MQ, set, &[2, 0]).await, 0);
                g.post_rx(16, RX_BUF);
                for _ in 0..16 {
                    g.pair1
                        .as_mut()
                        .unwrap()
                        .0
                        .add(&[MockBuf::Writable(RX_BUF)]);
                }
                for s in &socks {
                    s.send_to(b"flow", (GUEST_IP, 5564)).unwrap();
                }
                let got = recv_on_both(&mut g, 5564, 32).await;
                assert!(got[0] > 0 && got[1] > 0, "both pairs carry flows: {got:?}");

                // Transmit on the second pair works too.
                let link = ip(&["-o", "link", "show", "dev", "rvmq2"]);
                let ether = link.split("link/ether ").nth(1).unwrap();
                let mut host_mac = [0u8; 6];
                for (b, hex) in host_mac.iter_mut().zip(ether.split(':')) {
                    *b = u8::from_str_radix(&hex[..2], 16).unwrap();
                }
                let sink = UdpSocket::bind((HOST_IP, 6003)).unwrap();
                sink.set_read_timeout(Some(TIMEOUT)).unwrap();
                let frame = udp(host_mac, HOST_IP, 7000, 6003, b"pair1", UdpCsum::Full);
                let mut bytes = VirtioNetHdr::default().to_bytes().to_vec();
                bytes.extend_from_slice(&frame);
                let tx1 = &mut g.pair1.as_mut().unwrap().1;
                tx1.add(&[MockBuf::Readable(bytes)]);
                tx1.used().await;
                let mut buf = [0u8; 8];
                assert_eq!(sink.recv(&mut buf).unwrap(), 5);

                // Back to one pair: every flow comes on the first.
                assert_eq!(control(&mut g, VIRTIO_NET_CTRL_MQ, set, &[1, 0]).await, 0);
                for s in &socks {
                    s.send_to(b"flow", (GUEST_IP, 5565)).unwrap();
                }
                let got = recv_on_both(&mut g, 5565, 32).await;
                assert_eq!(got, [32, 0]);
                g.stop().await;
            });
        });
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(matches!(
            NetDevice::new(vec![], NetOptions::default()),
            Err(Error::TapCount { taps: 0, pairs: 1 })
        ));
        let o = NetOptions {
            queue_pairs: 0,
            ..NetOptions::default()
        };
        assert!(matches!(
            NetDevice::new(vec![], o),
            Err(Error::QueuePairs(0))
        ));
        let o = NetOptions {
            queue_size: 100,
            ..NetOptions::default()
        };
        in_netns(move || {
            let tap = Tap::create(None, 1).unwrap().pop().unwrap();
            assert!(matches!(
                NetDevice::new(vec![tap.into_fd()], o),
                Err(Error::QueueSize(100))
            ));
        });
    }
}
