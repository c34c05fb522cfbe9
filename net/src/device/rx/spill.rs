//! One read at a time into held chains and a host spill buffer, when some chain is smaller
//! than the largest frame ([`RxPlan::Spill`](super::plan::RxPlan::Spill)).

use std::pin::pin;

use futures::future::{select, Either};
use virtio::vhost_user::StopSignal;
use virtio::{Buffer, Writer};

use super::{Rx, MAX_READ_BUFFERS};
use crate::device::QueueResult;
use crate::hdr::VNET_HDR_SIZE;
use crate::sys;

impl Rx<'_> {
    /// One read into the held chains and a spill buffer: with `MRG_RXBUF` into as many held
    /// chains as take the largest frame, popping more first while the ring has them; else
    /// into the first. Returns whether to go on (false: stopped, or the tap failed and the
    /// stop came).
    pub(super) async fn read_spill(
        &mut self,
        stop: &StopSignal,
    ) -> std::result::Result<bool, virtio::Error> {
        while self.mrg && self.held.bytes() < self.need {
            match self.queue.try_pop().transpose() {
                Some(popped) => self.hold(popped)?,
                None => break,
            }
        }
        let (bufs, chains) = self.read_buffers();
        let capacity: usize = bufs.iter().map(|b| b.len as usize).sum();
        let writer = Writer::new(self.queue.memory().clone(), &bufs);
        // One byte more than the largest frame: a frame the tap had to cut shows.
        self.spill.resize(self.need.saturating_sub(capacity) + 1, 0);
        let iovecs =
            sys::HostIoVecs::spill(writer.iovecs(capacity)?, std::mem::take(&mut self.spill));
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
                    // Stopped either way: whether it waited for buffers does not matter.
                    self.received(n, chains, capacity, &spill, stop).await?;
                }
            }
            return Ok(false);
        };
        let spill = iovecs.into_host();
        let go_on = match result {
            // False when the stop came while the frame waited for buffers: no more reads,
            // or the next would take a frame from the tap only to drop it.
            Ok(n) => self.received(n, chains, capacity, &spill, stop).await?,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => self.readable(stop).await,
                Some(libc::EINTR | libc::ECANCELED) => true,
                // A detached tap queue: wait for the pairs to change.
                Some(libc::EBADFD) => self.dev.pairs_changed(stop).await,
                _ => {
                    self.dev.count(self.pair, |c| c.rx_errors += 1);
                    self.dev
                        .log(format_args!("rx {}: tap read failed: {e}", self.index));
                    // Not retried in a loop: wait to be stopped.
                    stop.clone().await;
                    false
                }
            },
        };
        self.spill = spill;
        Ok(go_on)
    }

    /// The buffers the next read fills and how many chains they cover: with `MRG_RXBUF`
    /// the held chains that fit in [`MAX_READ_BUFFERS`], else the first chain (cut to that
    /// many buffers; a frame that does not fit is then counted, not delivered).
    fn read_buffers(&self) -> (Vec<Buffer>, usize) {
        let mut bufs = Vec::new();
        let mut chains = 0;
        for c in self.held.iter() {
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
    /// `MRG_RXBUF` (waiting for the driver to post them), or counts it as an error if it
    /// cannot fit. False when `stop` came while the frame waited for buffers (the frame is
    /// counted as an error and dropped).
    async fn received(
        &mut self,
        n: usize,
        chains: usize,
        capacity: usize,
        spill: &[u8],
        stop: &StopSignal,
    ) -> std::result::Result<bool, virtio::Error> {
        if n < VNET_HDR_SIZE || n >= capacity + spill.len() || (n > capacity && !self.mrg) {
            // Cut by the tap (larger than the largest frame we allowed for), or too big for
            // one buffer without MRG_RXBUF: the chains stay held for the next frame.
            self.dev.log_guest(format_args!(
                "rx {}: a {n}-byte frame does not fit in {capacity} bytes of buffers",
                self.index
            ));
            self.dev.count(self.pair, |c| c.rx_errors += 1);
            return Ok(true);
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
                        self.dev.count(self.pair, |c| c.rx_errors += 1);
                        return Ok(false);
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
        self.deliver(n)?;
        Ok(true)
    }

    /// Returns the chains a frame of `n` bytes (header included) filled, in order.
    fn deliver(&mut self, n: usize) -> QueueResult {
        let mut used = Vec::new();
        let mut left = n;
        for chain in self.held.iter() {
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
            self.held.pop_front();
        }
        self.held.reset_if_empty();
        self.dev.count(self.pair, |c| {
            c.rx_packets += 1;
            c.rx_bytes += (n - VNET_HDR_SIZE) as u64;
        });
        self.queue.signal_used().map(drop)
    }
}
