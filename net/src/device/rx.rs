//! The receive queue: tap frames to the guest.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::pin;

use futures::future::{select, Either};
use futures::FutureExt;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, Buffer, DescriptorChain, Writer};

use super::{NetDevice, Pair, QueueResult};
use crate::features::*;
use crate::hdr::{MAX_FRAME, NUM_BUFFERS_OFFSET, VNET_HDR_SIZE};
use crate::sys;
use crate::tap;

/// The most guest buffers one tap read covers: each may become two iovecs where it crosses
/// a memory region, plus the spill buffer, within the kernel's 1024 (`UIO_MAXIOV`).
pub const MAX_READ_BUFFERS: usize = 511;
/// The most tap reads a receive queue keeps in flight when every chain takes a whole frame.
const RX_READS: usize = 32;

pub(super) struct Rx<'a> {
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
    pub(super) fn new(
        dev: &'a NetDevice,
        index: usize,
        queue: &'a AsyncQueue,
        acked: u64,
    ) -> Rx<'a> {
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
    pub(super) async fn run(&mut self, stop: &StopSignal) -> QueueResult {
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
    pub(super) fn give_back(&mut self) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use virtio::mock::MockBuf;

    use super::super::testing::*;
    use super::*;
    use crate::hdr::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM};
    use crate::testing::*;

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
}
