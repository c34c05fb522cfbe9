//! The transmit queue: guest frames to the tap.
//!
//! The task pops every available chain (up to [`TX_BATCH`]), checks each
//! (`[virtio_net_hdr_v1][frame]`, readable only, sane header and length) and submits one
//! write per frame, all in the same turn of the executor (one `io_uring_enter` for the
//! batch). The header is always the host copy the device checked (and rewrote where the tap
//! would refuse it or a flag is one it ignores: [`VirtioNetHdr::for_tap`]); a small frame
//! ([`COPY_MAX`]) is copied after it into one buffer and written with `write`, a larger one
//! goes straight from guest memory after it, with `writev`. Checksum and segmentation
//! offloads pass through to the tap. A malformed chain is counted as dropped, a failed write as an error; either way the chain
//! is returned and the queue goes on.

use std::pin::pin;

use futures::future::{select, Either};
use futures::FutureExt;
use memory::GuestMemory;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use super::{NetDevice, Pair, QueueResult};
use crate::hdr::{VirtioNetHdr, MAX_FRAME, MIN_FRAME, VNET_HDR_SIZE};
use crate::sys;

/// The most transmit chains submitted in one batch.
pub const TX_BATCH: usize = 64;

/// Frames of at most this many bytes, header included, are copied into one host buffer and
/// written with a plain `write`: cheaper than a `writev` of the header and the guest's
/// buffers (no iovec array to build and for the kernel to import), and the kernel then reads
/// no guest memory at all.
pub const COPY_MAX: usize = 256;

/// What a transmit chain turned out to be.
enum TxFrame {
    /// To write: `total` bytes, header and frame.
    Write { data: TapData, total: usize },
    /// Malformed: returned without writing.
    Drop(String),
}

/// What a write to the tap writes, given back when it completes (to write it again).
enum TapData {
    /// The checked header, then the frame from guest memory (`writev`).
    Mem(sys::HostIoVecs),
    /// The checked header and a copy of the frame, in one buffer (`write`).
    Copy(Vec<u8>),
}

/// Queues the write of `data` to the tap (at once: the batch's writes go to the kernel
/// together); it completes with the result and `data` back.
fn write_to_tap(
    tap: &executor::AsyncFd,
    data: TapData,
) -> impl std::future::Future<Output = (std::io::Result<usize>, TapData)> {
    match data {
        TapData::Mem(iovecs) => Either::Left(
            tap.write_mem_at(iovecs, 0)
                .map(|(r, v)| (r, TapData::Mem(v))),
        ),
        TapData::Copy(buf) => Either::Right(tap.write(buf).map(|(r, b)| (r, TapData::Copy(b)))),
    }
}

pub(super) struct Tx<'a> {
    pub(super) dev: &'a NetDevice,
    pub(super) pair: &'a Pair,
    pub(super) queue: &'a AsyncQueue,
    pub(super) acked: u64,
}

impl Tx<'_> {
    pub(super) async fn run(&self, stop: &StopSignal) -> QueueResult {
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
                        self.dev.count(self.pair, |c| c.tx_dropped += 1);
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
                TxFrame::Write { data, total } => Some((write_to_tap(&self.pair.io, data), total)),
                TxFrame::Drop(why) => {
                    self.dev.log_guest(format_args!("tx: frame dropped: {why}"));
                    self.dev.count(self.pair, |c| c.tx_dropped += 1);
                    None
                }
            })
            .collect();
        for (chain, write) in batch.iter().zip(writes) {
            let Some((write, total)) = write else {
                self.queue.add_used(chain.head_index(), 0)?;
                continue;
            };
            let (result, data) = write.await;
            let result = match result {
                // Cancelled before it ran (a receive task on this tap stopping): write again.
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                    write_to_tap(&self.pair.io, data).await.0
                }
                r => r,
            };
            match result {
                Ok(n) if n == total => self.dev.count(self.pair, |c| {
                    c.tx_packets += 1;
                    c.tx_bytes += (total - VNET_HDR_SIZE) as u64;
                }),
                Ok(n) => {
                    self.dev
                        .log_guest(format_args!("tx: tap took {n} of {total} bytes"));
                    self.dev.count(self.pair, |c| c.tx_errors += 1);
                }
                Err(e) => {
                    self.dev
                        .log_guest(format_args!("tx: tap write failed: {e}"));
                    self.dev.count(self.pair, |c| c.tx_errors += 1);
                }
            }
            self.queue.add_used(chain.head_index(), 0)?;
        }
        self.queue.signal_used().map(drop)
    }

    fn frame(&self, chain: &DescriptorChain) -> TxFrame {
        tap_frame(chain, self.queue.memory(), self.acked)
    }
}

/// Checks a transmit chain: readable buffers only, a whole header, a frame of sane length,
/// a header the tap will take (features `acked`). The header goes to the tap as the host
/// copy that was checked, never from guest memory: the tap reads what it is given when the
/// write runs, so a guest that rewrote its header after the check (a flag or a GSO type the
/// device refuses, `DATA_VALID` to pass a bad checksum as verified) would get past the check.
fn tap_frame(chain: &DescriptorChain, mem: &GuestMemory, acked: u64) -> TxFrame {
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
    let mut reader = chain.reader(mem);
    let guest = match reader.read_obj::<[u8; VNET_HDR_SIZE]>() {
        Ok(b) => b,
        Err(e) => return TxFrame::Drop(e.to_string()),
    };
    let hdr = match VirtioNetHdr::from_bytes(&guest).for_tap(acked, total - VNET_HDR_SIZE) {
        Ok(hdr) => hdr.to_bytes(),
        Err(e) => return TxFrame::Drop(e.to_string()),
    };
    if total <= COPY_MAX {
        let mut buf = Vec::with_capacity(total);
        buf.extend_from_slice(&hdr);
        buf.resize(total, 0);
        return match reader.read_exact_bytes(&mut buf[VNET_HDR_SIZE..]) {
            Ok(()) => TxFrame::Write {
                data: TapData::Copy(buf),
                total,
            },
            Err(e) => TxFrame::Drop(e.to_string()),
        };
    }
    match reader.iovecs(total - VNET_HDR_SIZE) {
        Ok(iovecs) => TxFrame::Write {
            data: TapData::Mem(sys::HostIoVecs::header(hdr.to_vec(), iovecs)),
            total,
        },
        Err(e) => TxFrame::Drop(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use virtio::mock::{MockBuf, MockChain};

    use super::super::testing::*;
    use super::*;
    use crate::features::*;
    use crate::hdr::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM};
    use crate::testing::*;

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
    fn the_tap_gets_the_header_that_was_checked_not_what_the_guest_wrote_after() {
        use std::io::Read;

        use memory::GuestAddress;
        use virtio::mock::MockSplitQueue;

        // A small frame (copied) and a large one (written from guest memory).
        for len in [60, 1000] {
            let mem = GuestMemory::new(&[(GuestAddress(0), 16 << 20)]).unwrap();
            let mut driver = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
            let frame = vec![0xab; len];
            // One buffer, header and frame together: the layout a header read in place
            // would send straight from guest memory.
            let mut bytes = VirtioNetHdr::default().to_bytes().to_vec();
            bytes.extend_from_slice(&frame);
            let sent = driver.add_chain(&[MockBuf::Readable(bytes)]).unwrap();
            let chain = driver.queue().unwrap().pop(&mem).unwrap().unwrap();
            let checked = tap_frame(&chain, &mem, 0);
            // Checked; now, before the write runs, the guest claims a verified checksum and
            // offloads it never negotiated, and changes its frame.
            let rewritten = VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: 1,
                gso_size: 1000,
                csum_start: 14,
                csum_offset: 16,
                ..VirtioNetHdr::default()
            };
            mem.write_slice(&rewritten.to_bytes(), sent.readable[0].addr)
                .unwrap();
            let (mut out, tap) = std::io::pipe().unwrap();
            let tap = executor::AsyncFd::new(tap.into());
            let written = match checked {
                TxFrame::Write { data, total } => {
                    let copied = matches!(data, TapData::Copy(_));
                    assert_eq!(copied, len + VNET_HDR_SIZE <= COPY_MAX, "{len}");
                    (run(write_to_tap(&tap, data)).0.unwrap(), total)
                }
                TxFrame::Drop(why) => panic!("a plain header and a {len}-byte frame: {why}"),
            };
            assert_eq!(written, (VNET_HDR_SIZE + len, VNET_HDR_SIZE + len));
            let mut got = vec![0; VNET_HDR_SIZE + len];
            out.read_exact(&mut got).unwrap();
            assert_eq!(
                got[..VNET_HDR_SIZE],
                VirtioNetHdr::default().to_bytes(),
                "{len}: the tap got the guest's rewritten header"
            );
            assert_eq!(got[VNET_HDR_SIZE..], frame);
        }
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
}
