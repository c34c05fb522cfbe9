//! Rounds of reads, one per chain, when every held chain takes a whole frame by itself
//! ([`RxPlan::Plain`], [`RxPlan::PerChain`]).

use std::future::Future;
use std::pin::pin;

use futures::future::{select, Either};
use futures::FutureExt;
use virtio::vhost_user::StopSignal;
use virtio::DescriptorChain;

use super::plan::RxPlan;
use super::Rx;
use crate::hdr::VNET_HDR_SIZE;
use crate::sys;

/// The most tap reads a receive queue keeps in flight when every chain takes a whole frame.
const RX_READS: usize = 32;

/// Where a receive queue's rounds of reads stand.
pub(super) struct Rounds {
    /// Reads in the next round that does not wait.
    burst: usize,
    /// Whether the tap had frames at the end of the last round: the next round's reads do
    /// not wait.
    busy: bool,
    /// One-byte spill buffers of the reads, reused.
    spills: Vec<Vec<u8>>,
    /// Whether the tap takes reads that do not wait (`RWF_NOWAIT`).
    nowait: bool,
}

impl Default for Rounds {
    fn default() -> Rounds {
        Rounds {
            burst: 2,
            busy: false,
            spills: Vec::new(),
            nowait: true,
        }
    }
}

impl Rx<'_> {
    /// One round of reads, one per chain, each chain taking a whole frame: the held chains
    /// and more popped. While the tap has frames (every read of the last round got one),
    /// a round is up to `burst` reads that do not wait (`RWF_NOWAIT`), all submitted at once:
    /// each completes as it is submitted, in order, with the tap's next frame or EAGAIN.
    /// Once the tap is found empty a round is one read that waits for the next frame. So
    /// the i-th read of a round holds its i-th frame, and frames are delivered in read order,
    /// one notification per round; chains left unused go back to `held` in pop order.
    /// Returns whether to go on (false: stopped, or the tap failed and the stop came).
    pub(super) async fn read_round(
        &mut self,
        stop: &StopSignal,
    ) -> std::result::Result<bool, virtio::Error> {
        if stop.clone().now_or_never().is_some() {
            return Ok(false);
        }
        let nowait_round = self.rounds.busy && self.rounds.nowait;
        let want = if nowait_round { self.rounds.burst } else { 1 };
        let mut chains: Vec<Option<DescriptorChain>> = Vec::with_capacity(want);
        while chains.len() < want {
            let chain = match self.held.pop_front() {
                Some(c) => c,
                None => match self.queue.try_pop().transpose() {
                    None => break,
                    Some(Ok(c)) if RxPlan::for_chain(&c, self.need).takes_whole_frame() => c,
                    Some(popped) => {
                        self.hold(popped)?;
                        if !self.held.is_empty() {
                            break;
                        }
                        // Returned at once: the chains popped before it are not the last.
                        if !chains.is_empty() {
                            self.held.not_contiguous();
                        }
                        continue;
                    }
                },
            };
            chains.push(Some(chain));
        }
        // Every chain of a round takes a whole frame: never `Spill`.
        let plain = match RxPlan::choose(chains.iter().flatten(), self.need) {
            RxPlan::Plain => self.plain_reads(&chains)?,
            RxPlan::PerChain | RxPlan::Spill => None,
        };
        let (results, longest, stopped) = match plain {
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
                        self.held.not_contiguous();
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
                    self.dev.count(self.pair, |c| c.rx_errors += 1);
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
                            if self.rounds.nowait {
                                self.dev.log(format_args!(
                                    "rx {}: tap reads without wait fail ({e}): one read at \
                                     a time",
                                    self.index
                                ));
                            }
                            self.rounds.nowait = false;
                        }
                        _ => {
                            if !failed {
                                self.dev.count(self.pair, |c| c.rx_errors += 1);
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
            self.held.push_front(c);
        }
        self.held.reset_if_empty();
        // Reads without wait while the tap has frames, more of them while every one gets a
        // frame; one waiting read once it is empty.
        if nowait_round {
            self.rounds.busy = !empty && self.rounds.nowait;
            self.rounds.burst = (2 * frames).clamp(2, RX_READS);
        } else {
            self.rounds.busy = frames > 0 && self.rounds.nowait;
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
            return Ok(self.dev.pairs_changed(stop).await);
        }
        if readable {
            return Ok(self.readable(stop).await);
        }
        Ok(true)
    }

    /// For a round planned [`RxPlan::Plain`]: the first buffer of each chain, one region
    /// each for one plain read per chain, and the longest frame each read may bring (a read
    /// that fills its buffer was cut by the tap); `None` when a buffer crosses memory
    /// regions (the round goes [`RxPlan::PerChain`]).
    fn plain_reads(
        &self,
        chains: &[Option<DescriptorChain>],
    ) -> std::result::Result<Option<(memory::GuestIoVecs, Vec<usize>)>, virtio::Error> {
        let mut ranges = Vec::with_capacity(chains.len());
        for chain in chains.iter().flatten() {
            match chain.writable().first() {
                Some(b) => ranges.push((b.addr, b.len as usize)),
                None => return Ok(None),
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

    /// One read per chain, each into all of its buffers and a spill byte: the rounds planned
    /// [`RxPlan::PerChain`] (or [`RxPlan::Plain`] with a buffer across memory regions).
    /// Returns each read's result, the longest frame each may bring, and whether the stop
    /// came.
    async fn chain_reads(
        &mut self,
        chains: &[Option<DescriptorChain>],
        nowait: bool,
        stop: &StopSignal,
    ) -> std::result::Result<(Vec<std::io::Result<usize>>, Vec<usize>, bool), virtio::Error> {
        let mut longest = Vec::with_capacity(chains.len());
        let mut reads = Vec::with_capacity(chains.len());
        for chain in chains.iter().flatten() {
            let mut spill = self.rounds.spills.pop().unwrap_or_default();
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
            self.rounds.spills.push(iov.into_host());
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
}
