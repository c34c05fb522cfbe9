//! The control queue and the queue pairs the driver enables.
//!
//! With several pairs (`MQ`) the device starts with one: the tap queues of the others are
//! detached, so the kernel steers no flow to them. `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` on the
//! control queue attaches the tap queues of the pairs it enables and detaches the rest;
//! receive tasks of disabled pairs wait on [`Changed`] until the pairs change. Every other
//! command gets `VIRTIO_NET_ERR`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use futures::future::{select, Either};
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use super::{NetDevice, QueueResult};
use crate::features::*;
use crate::tap;
use crate::Result;

/// Control queue: class `VIRTIO_NET_CTRL_MQ`.
const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// Control queue: command `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

/// Wakes the receive tasks of pairs waiting to be enabled.
#[derive(Default)]
pub(super) struct Changed {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Changed {
    pub(super) fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` was called after `since` (a `generation` read earlier).
    pub(super) fn after(&self, since: u64) -> ChangedAfter<'_> {
        ChangedAfter {
            changed: self,
            since,
        }
    }
}

pub(super) struct ChangedAfter<'a> {
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

impl NetDevice {
    /// Attaches the tap queues of the first `n` pairs and detaches the others (a queue
    /// already so is left alone: detaching a detached queue fails).
    pub(super) fn set_active_pairs(&self, n: usize) -> Result<()> {
        for (i, p) in self.pairs.iter().enumerate() {
            let attach = i < n;
            if p.attached.get() != attach {
                tap::set_queue_attached(p.tap.as_fd(), p.tap.name(), i, attach)?;
                p.attached.set(attach);
            }
        }
        self.active_pairs.set(n);
        self.pairs_changed.notify();
        Ok(())
    }

    /// Once, as the first queue starts: the pairs a resumed device finds attached (the
    /// driver's last `VQ_PAIRS_SET`, or one), else one pair (virtio 1.2 §5.1.6.5.5: a driver
    /// starts with one).
    pub(super) fn settle_pairs(&self) {
        if self.pairs_settled.replace(true) {
            return;
        }
        let n = if self.resumed.get() {
            self.found_pairs
        } else {
            1
        };
        if let Err(e) = self.set_active_pairs(n) {
            self.log(format_args!("enabling {n} queue pairs: {e}"));
        }
    }
    /// Waits until the driver changes the enabled pairs; false if `stop` came first.
    pub(super) async fn pairs_changed(&self, stop: &StopSignal) -> bool {
        let since = self.pairs_changed.generation.get();
        let changed = pin!(self.pairs_changed.after(since));
        matches!(select(changed, stop.clone()).await, Either::Left(_))
    }

    /// The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; every other command gets
    /// `VIRTIO_NET_ERR`.
    pub(super) async fn run_ctrl(
        &self,
        queue: &AsyncQueue,
        acked: u64,
        stop: &StopSignal,
    ) -> QueueResult {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::UdpSocket;
    use std::rc::Rc;
    use std::time::Duration;

    use virtio::mock::MockBuf;
    use virtio::vhost_user::Device;

    use super::super::testing::*;
    use super::super::{NetDevice, NetOptions};
    use super::*;
    use crate::hdr::{VirtioNetHdr, VNET_HDR_SIZE};
    use crate::testing::*;
    use crate::Tap;

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
                dev.pairs[1].attached.get(),
                "nothing changes before a queue starts"
            );
            run(async {
                let features = (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
                let mut g = Guest::start(dev.clone(), features).await;
                settled(&dev).await;
                assert!(
                    !dev.pairs[1].attached.get(),
                    "one pair until the driver asks"
                );
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

    /// Waits until the first queue to run has settled the enabled pairs.
    async fn settled(dev: &NetDevice) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !dev.pairs_settled.get() {
            assert!(std::time::Instant::now() < deadline, "no queue started");
            executor::sleep(Duration::from_millis(1)).await.unwrap();
        }
    }

    /// A device made in place of one that died, over the same tap files (as the VMM keeps
    /// them and the respawned process inherits them): the queue its predecessor detached is
    /// taken as it is (detaching it again failed with EINVAL, and every restart of a device
    /// with two pairs with it), and once resumed the device keeps the pairs the driver had
    /// enabled; a device not resumed starts a driver with one pair.
    #[test]
    fn a_device_in_place_of_a_dead_one_keeps_the_pairs_the_driver_enabled() {
        in_netns(|| {
            let taps = Tap::create(Some("rvmq3"), 2).unwrap();
            taps[0].configure(HOST_IP, MASK).unwrap();
            let kept: Vec<std::os::fd::OwnedFd> = taps.into_iter().map(Tap::into_fd).collect();
            let options = NetOptions {
                queue_pairs: 2,
                ..NetOptions::default()
            };
            let make = || {
                let fds = kept.iter().map(|f| f.try_clone().unwrap()).collect();
                Rc::new(NetDevice::new(fds, options).unwrap())
            };
            let features = (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
            let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
            // The first device: the driver uses one pair.
            let dev = make();
            run(async {
                let g = Guest::start(dev.clone(), features).await;
                settled(&dev).await;
                g.stop().await;
            });
            assert_eq!(dev.active_pairs.get(), 1);
            drop(dev);
            // Its successor finds the second tap queue detached and keeps it so; the driver
            // then enables both pairs.
            let dev = make();
            assert!(!dev.pairs[1].attached.get());
            dev.resumed();
            run(async {
                let mut g = Guest::start(dev.clone(), features).await;
                settled(&dev).await;
                assert_eq!(dev.active_pairs.get(), 1);
                assert_eq!(control(&mut g, VIRTIO_NET_CTRL_MQ, set, &[2, 0]).await, 0);
                g.stop().await;
            });
            drop(dev);
            // The next one, resumed, has both pairs from its first queue on.
            let dev = make();
            dev.resumed();
            run(async {
                let g = Guest::start(dev.clone(), features).await;
                settled(&dev).await;
                assert_eq!(dev.active_pairs.get(), 2);
                assert!(dev.pairs[1].attached.get());
                g.stop().await;
            });
            drop(dev);
            // A device that is not resumed (a new driver) starts with one pair.
            let dev = make();
            assert!(dev.pairs[1].attached.get());
            run(async {
                let g = Guest::start(dev.clone(), features).await;
                settled(&dev).await;
                assert_eq!(dev.active_pairs.get(), 1);
                assert!(!dev.pairs[1].attached.get());
                g.stop().await;
            });
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
}
