//! The virtio-net device (virtio 1.2 §5.1) over tap queues, one task per virtqueue.
//!
//! Queues are `rx0, tx0, rx1, tx1, ...` and, with several pairs, a control queue last; each
//! pair has a tap queue of its own. [`NetDevice::run`] runs the task a queue's index names:
//! receive ([`rx`]), transmit ([`tx`]) or control ([`control`]).
//!
//! # Data path
//! Frames go between guest memory and the tap with io_uring reads and writes, never through
//! a device buffer: the guest's `virtio_net_hdr_v1` is the tap's vnet header, so frames and
//! their offload metadata pass without translation, and checksum and segmentation offloads
//! pass through (a receive queue sets the tap's offloads from the acked features as it
//! starts).
//! - Transmit: the task pops every available chain (up to [`tx::TX_BATCH`]), checks each and
//!   submits one write per frame, all in one turn of the executor: the header it checked as
//!   a host copy, then the frame (copied with it when small, else straight from guest
//!   memory).
//! - Receive: the task holds guest chains and reads frames into them as its plan says
//!   (`RxPlan`, in [`rx`]): rounds of reads, one per chain, when every chain takes a whole
//!   frame (plain `read`s into first buffers that do, as Linux posts them); else one
//!   `readv` at a time ending in a host spill buffer, a frame spanning chains with
//!   `MRG_RXBUF`. Without chains it does not read the tap: frames wait in the kernel's tap
//!   queue and the task sleeps until the driver kicks.
//!
//! # In flight
//! A transmit batch is in flight at once and collected in order; a write cancelled before
//! it ran (a receive task on the same tap cancelling its reads) is written again. A receive
//! round is up to 32 reads that do not wait while the tap has frames, one read that waits
//! once it is empty; frames go to the guest in read order, which is the tap's, one
//! notification per round or spill read.
//!
//! # Queue pairs
//! With several pairs (`MQ`) the control queue answers `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` by
//! attaching the tap queues of the enabled pairs and detaching the others, so the kernel
//! never steers a flow to a queue the driver does not serve; the receive tasks of disabled
//! pairs sleep until they are enabled. A reset goes back to one pair.
//!
//! Which tap queues are attached is also the record of the driver's choice across a restart:
//! the attachment belongs to the open tap file, which the VMM keeps, so a device process
//! started in place of one that died finds it as that one left it. Nothing changes the
//! attachments until the first queue starts (`NetDevice::settle_pairs`): then a device the
//! frontend resumed (`Device::resumed`: the rings of a device that went away) keeps the
//! attached pairs, and any other starts the driver with one pair.
//!
//! # Bad input
//! A malformed transmit chain is counted as dropped, a write the tap refuses as an error; a
//! receive chain that is invalid or too small for a header goes back empty; a frame larger
//! than the buffers is counted in `rx_errors`, never handed over cut. Either way the queue
//! goes on. A queue whose rings become inaccessible logs why and waits to be stopped.
//!
//! # Stop
//! When its [`StopSignal`] fires, a transmit task finishes the batch in flight; a receive
//! task cancels its reads, delivers what they took from the tap, and gives back the chains
//! it holds (unconsumed in the avail ring when they are the last popped). The counters are
//! logged when the last queue stops.

mod control;
mod rx;
#[cfg(test)]
mod testing;
mod tx;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;

use executor::AsyncFd;
use virtio::vhost_user::{Device, StopSignal};
use virtio::{AsyncQueue, GuestLog};

use control::Changed;
use rx::Rx;
use tx::Tx;

use crate::features::*;
use crate::tap::Tap;
use crate::{Error, Result, MAX_QUEUE_PAIRS};

/// The queue size offered unless the options say otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The config space the device exposes: mac, status, max_virtqueue_pairs, mtu and the
/// speed/duplex/RSS fields (zero), as far as the VMM reads it.
pub const CONFIG_SIZE: usize = 20;

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
    /// Its number: its receive queue is `2 * index`, its transmit queue `2 * index + 1`.
    index: usize,
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
    /// The attached pairs found when the device was made (leading ones, at least 1).
    found_pairs: usize,
    /// Whether the frontend handed over the rings of a device that went away.
    resumed: Cell<bool>,
    /// Whether the first queue to start has set the enabled pairs.
    pairs_settled: Cell<bool>,
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
    /// [`Tap::from_fd`]). Their queues may be detached (left so by a device that died);
    /// nothing is attached or detached until the first queue starts (see "Queue pairs"
    /// above): then, unless resumed, all but the first tap queue are detached until the
    /// driver enables them.
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
            .enumerate()
            .map(|(index, fd)| {
                let tap = Tap::from_fd(fd)?;
                let dup = tap.as_fd().try_clone_to_owned().map_err(Error::Dup)?;
                Ok(Pair {
                    attached: Cell::new(tap.attached()),
                    tap,
                    io: AsyncFd::new(dup),
                    index,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Without offloads the largest frame is the MTU plus Ethernet and VLAN headers.
        let mtu = pairs[0].tap.mtu().unwrap_or(1500);
        let found_pairs = pairs.iter().take_while(|p| p.attached.get()).count().max(1);
        Ok(NetDevice {
            pairs,
            mac: options.mac,
            queue_size: size,
            mtu,
            counters: Cell::new(Counters::default()),
            running: Cell::new(0),
            active_pairs: Cell::new(found_pairs),
            pairs_changed: Changed::default(),
            found_pairs,
            resumed: Cell::new(false),
            pairs_settled: Cell::new(false),
            errors: GuestLog::new("net"),
        })
    }

    /// Counts so far.
    pub fn counters(&self) -> Counters {
        self.counters.get()
    }

    /// The tap interface name.
    pub fn tap_name(&self) -> &str {
        self.pairs[0].tap.name()
    }

    /// Counts on `pair`, and in the shared statistics page (`virtio::stats`): a frame
    /// delivered or sent is a request of its queue with its bytes; a dropped or failed one
    /// a request with an error.
    fn count(&self, pair: &Pair, f: impl FnOnce(&mut Counters)) {
        use virtio::stats::Stats;
        let old = self.counters.get();
        let mut c = old;
        f(&mut c);
        self.counters.set(c);
        let s = virtio::stats::stats();
        let (rxq, txq) = (2 * pair.index, 2 * pair.index + 1);
        let done = |q: usize, (from, to): (u64, u64), bytes: u64, net: fn(&Stats, u64)| {
            for _ in from..to {
                s.request(q, bytes);
                net(&s, bytes);
            }
        };
        let failed = |q: usize, (from, to): (u64, u64), net: fn(&Stats)| {
            for _ in from..to {
                s.request(q, 0);
                s.error(q);
                net(&s);
            }
        };
        let rx_bytes = c.rx_bytes.wrapping_sub(old.rx_bytes);
        done(rxq, (old.rx_packets, c.rx_packets), rx_bytes, Stats::net_rx);
        failed(rxq, (old.rx_errors, c.rx_errors), Stats::net_rx_error);
        let tx_bytes = c.tx_bytes.wrapping_sub(old.tx_bytes);
        done(txq, (old.tx_packets, c.tx_packets), tx_bytes, Stats::net_tx);
        failed(txq, (old.tx_dropped, c.tx_dropped), Stats::net_tx_drop);
        failed(txq, (old.tx_errors, c.tx_errors), Stats::net_tx_error);
    }

    fn log(&self, what: impl fmt::Display) {
        virtio::log::write("ringvm device net", virtio::log::Level::Error, what);
    }

    /// Logs bad guest input under the devices' shared rate limit ([`GuestLog`]).
    fn log_guest(&self, what: impl fmt::Display) {
        self.errors.log(what);
    }

    fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    fn started(&self) {
        self.running.set(self.running.get() + 1);
    }

    fn stopped(&self) {
        let n = self.running.get().saturating_sub(1);
        self.running.set(n);
        if n == 0 {
            self.errors.flush();
            virtio::log::write(
                "ringvm device net",
                virtio::log::Level::Info,
                self.counters(),
            );
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
        self.settle_pairs();
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
}

impl Device for NetDevice {
    fn name(&self) -> &'static str {
        virtio::DeviceType::Net.name()
    }

    fn device_type(&self) -> u32 {
        virtio::DeviceType::Net.id()
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
        self.pairs_settled.set(true);
        if let Err(e) = self.set_active_pairs(1) {
            self.log(format_args!("reset: {e}"));
        }
    }

    fn resumed(&self) {
        self.resumed.set(true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use virtio::mock::MockBuf;

    use super::testing::*;
    use super::*;
    use crate::hdr::VirtioNetHdr;
    use crate::testing::*;

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
