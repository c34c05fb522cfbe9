//! The receive queue: frames from the tap straight into the guest's buffers.
//!
//! # Buffers
//! The task holds guest chains before it reads ([`RxBuffers`]), popping one (and waiting for
//! a kick) when it holds none. Without buffers it does not read the tap at all: frames wait
//! in the kernel's tap queue (which drops, and counts, beyond its length), and the task
//! sleeps until the driver kicks. A chain with less room than a vnet header goes back
//! empty.
//!
//! # Plan
//! How the held chains are read is a value, [`RxPlan`], chosen from the chains alone and the
//! space the largest frame takes with the negotiated offloads ([`plan::frame_space`]); the
//! loop in [`Rx::run`] matches on it:
//! - [`RxPlan::Plain`] and [`RxPlan::PerChain`], when every held chain takes a whole frame
//!   by itself: reads go in rounds, one read per chain ([`Rx::read_round`]). While the tap
//!   has frames, a round is up to 32 reads per `io_uring_enter` that take only what it
//!   already has (`RWF_NOWAIT`) and complete in order as they are submitted; once it is
//!   empty, one read that waits. Frames go to the guest in read order, which is the tap's
//!   order, one notification per round. With `Plain` (every chain's first buffer is longer
//!   than the largest frame, as Linux posts them) each read is a plain `read` into that
//!   buffer, no iovec array, no spill; with `PerChain` a `readv` into all of the chain's
//!   buffers and a spill byte.
//! - [`RxPlan::Spill`], when some chain is smaller than the largest frame: one `readv` at
//!   a time ([`Rx::read_spill`]). With `MRG_RXBUF` a frame may span several chains: the task
//!   holds chains until they can take the largest frame (or the ring has no more), reads
//!   once, and returns the chains the frame filled with `num_buffers` set; the rest wait
//!   for the next frame. Without it the read goes into the first chain.
//!
//! # Cut frames
//! A frame is never handed over cut. A `readv` ends in a host spill buffer one byte longer
//! than what the guest buffers miss of the largest frame: a frame larger than the held
//! chains lands partly there and is copied into the next chains the driver posts
//! (`MRG_RXBUF`) or counted in `rx_errors` (one chain per frame without it). A plain read
//! that fills its buffer is a frame the tap cut, counted in `rx_errors`; the chain stays
//! held for the next frame.
//!
//! # Stop
//! Stopping cancels the pending reads and delivers what they may have read; chains still
//! held go back to the avail ring when they are the last ones popped (`GET_VRING_BASE`
//! reports them unconsumed), else as empty used entries. The one frame that can be lost is
//! one that waits for more buffers (`MRG_RXBUF`) when the stop comes: it is counted in
//! `rx_errors`, and nothing more is read from the tap. A new call fd (`SET_VRING_CALL`, as a
//! frontend swaps it when the guest masks the queue's interrupt) does not stop the ring.

mod buffers;
mod plan;
mod rounds;
mod spill;

use std::os::fd::AsFd;
use std::pin::pin;

use futures::future::{select, Either};
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use buffers::RxBuffers;
use plan::RxPlan;
use rounds::Rounds;

use super::{NetDevice, Pair, QueueResult};
use crate::features::*;
use crate::hdr::{NUM_BUFFERS_OFFSET, VNET_HDR_SIZE};
use crate::tap;

/// The most guest buffers one tap read covers: each may become two iovecs where it crosses
/// a memory region, plus the spill buffer, within the kernel's 1024 (`UIO_MAXIOV`).
pub const MAX_READ_BUFFERS: usize = 511;

/// One receive queue's task.
pub(super) struct Rx<'a> {
    dev: &'a NetDevice,
    index: usize,
    pair: &'a Pair,
    queue: &'a AsyncQueue,
    /// Chains popped and not yet used.
    held: RxBuffers,
    mrg: bool,
    guest_csum: bool,
    /// Buffer space the largest frame takes, header included ([`plan::frame_space`]).
    need: usize,
    /// Where the rounds of reads stand ([`RxPlan::Plain`], [`RxPlan::PerChain`]).
    rounds: Rounds,
    /// The host buffer a [`RxPlan::Spill`] read ends in, reused.
    spill: Vec<u8>,
}

impl<'a> Rx<'a> {
    pub(super) fn new(
        dev: &'a NetDevice,
        index: usize,
        queue: &'a AsyncQueue,
        acked: u64,
    ) -> Rx<'a> {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let pair = &dev.pairs[index];
        if let Err(e) = tap::set_offloads(pair.tap.as_fd(), pair.tap.name(), acked) {
            dev.log(e);
        }
        Rx {
            dev,
            index,
            pair,
            queue,
            held: RxBuffers::default(),
            mrg: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            need: plan::frame_space(acked, dev.mtu),
            rounds: Rounds::default(),
            spill: Vec::new(),
        }
    }

    /// A chain returned without data (invalid, or too small for a header).
    fn reject(&mut self, head: u16) -> QueueResult {
        if !self.held.is_empty() {
            self.held.not_contiguous();
        }
        self.queue.complete(head, 0)
    }

    fn hold(&mut self, popped: virtio::Result<DescriptorChain>) -> QueueResult {
        match popped {
            Ok(chain) if chain.writable_len() >= VNET_HDR_SIZE => {
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
        loop {
            if self.index >= self.dev.active_pairs.get() {
                if !self.dev.pairs_changed(stop).await {
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
            let go_on = match RxPlan::choose(self.held.iter(), self.need) {
                RxPlan::Plain | RxPlan::PerChain => self.read_round(stop).await?,
                RxPlan::Spill => self.read_spill(stop).await?,
            };
            if !go_on {
                return Ok(());
            }
        }
    }

    /// Waits until the tap has a frame; false if `stop` came first.
    async fn readable(&self, stop: &StopSignal) -> bool {
        let readable = pin!(self.pair.io.poll_readable());
        matches!(select(readable, stop.clone()).await, Either::Left(_))
    }

    /// Returns `chain`, which a frame of `n` bytes (header included) filled by itself.
    fn deliver_chain(&self, chain: &DescriptorChain, n: usize) -> QueueResult {
        self.finish_header(chain, 1)?;
        self.queue.add_used(chain.head_index(), n as u32)?;
        self.dev.count(self.pair, |c| {
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

    /// Gives the held chains back: unconsumed if nothing was returned after them, else as
    /// empty used entries.
    pub(super) fn give_back(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        if held.contiguous() {
            self.queue.with_queue(|q| {
                for _ in held.iter() {
                    q.undo_pop();
                }
            });
            return;
        }
        for c in held.iter() {
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
mod model_tests;

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
