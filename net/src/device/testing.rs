//! The driver side for the device's tests: a guest with mock rings over vhost-user, and
//! the host side of its tap.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::Duration;

use executor::{EventFd, EventFdStream, Executor, Task};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue};
use virtio::vhost_user::{serve, Connection, Frontend, VringConfig, VIRTIO_F_VERSION_1};
use virtio::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

use super::*;
use crate::hdr::{VirtioNetHdr, VNET_HDR_SIZE};
use crate::testing::*;

pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const BASE: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX);
pub const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// A receive buffer as Linux posts without MRG_RXBUF and without GSO.
pub const RX_BUF: u32 = 1526 + 12;

/// The driver side of one queue.
pub struct Ring {
    pub driver: MockSplitQueue,
    pub kick: EventFd,
    pub call: EventFd,
    pub calls: EventFdStream,
    pub sent: HashMap<u16, MockChain>,
}

impl Ring {
    pub fn new(mem: &GuestMemory, base: u64, data: u64, data_len: u64) -> Ring {
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

    pub fn config(&self, index: u32) -> VringConfig<'_> {
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

    pub fn add(&mut self, bufs: &[MockBuf]) -> MockChain {
        let c = self.driver.add_chain(bufs).unwrap();
        self.sent.insert(c.head, c.clone());
        self.kick.write(1).unwrap();
        c
    }

    pub fn add_indirect(&mut self, bufs: &[MockBuf]) -> MockChain {
        let c = self.driver.add_indirect_chain(bufs).unwrap();
        self.sent.insert(c.head, c.clone());
        self.kick.write(1).unwrap();
        c
    }

    /// The next used chain and its length, waiting for the device's call.
    pub async fn used(&mut self) -> (MockChain, u32) {
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

pub struct Guest {
    pub mem: GuestMemory,
    pub rx: Ring,
    pub tx: Ring,
    pub ctrl: Option<Ring>,
    /// The receive and transmit rings of the second queue pair, with two pairs.
    pub pair1: Option<(Ring, Ring)>,
    pub fe: Frontend,
    pub server: Task<virtio::vhost_user::Result<()>>,
    pub dev: Rc<NetDevice>,
    /// Receive chains posted again for each one used.
    pub repost: Option<u32>,
}

pub fn pair() -> (Connection, Connection) {
    let (a, b) = executor::socketpair().unwrap();
    (Connection::new(a), Connection::new(b))
}

impl Guest {
    pub async fn start(dev: Rc<NetDevice>, features: u64) -> Guest {
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
    pub async fn send(&mut self, hdr: VirtioNetHdr, frame: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.send_chain(&[MockBuf::Readable(bytes)]).await;
    }

    pub async fn send_chain(&mut self, bufs: &[MockBuf]) {
        let sent = self.tx.add(bufs);
        let (used, len) = self.tx.used().await;
        assert_eq!((used.head, len), (sent.head, 0));
    }

    pub fn post_rx(&mut self, chains: usize, len: u32) {
        for _ in 0..chains {
            self.rx.add(&[MockBuf::Writable(len)]);
        }
    }

    /// The next received frame (all its buffers), with its header.
    pub async fn recv(&mut self) -> (VirtioNetHdr, Vec<u8>) {
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
    pub async fn recv_where(&mut self, want: impl Fn(&Parsed) -> bool) -> (VirtioNetHdr, Parsed) {
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
    pub async fn resolve_host(&mut self) -> [u8; 6] {
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
    pub async fn stop(self) -> Vec<u16> {
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

pub fn host_tap(name: &str) -> Tap {
    let tap = Tap::create(Some(name), 1).unwrap().pop().unwrap();
    // No IPv6 on the tap: its router solicitations and multicast reports would arrive at
    // random moments and take the few receive buffers a test posts (a test then waits for
    // its frame until it times out). Without IPv6 in the kernel there is nothing to turn off.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
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

pub fn device(tap: Tap) -> Rc<NetDevice> {
    Rc::new(NetDevice::new(vec![tap.into_fd()], NetOptions::default()).unwrap())
}

/// The UDP payload of `p` if it is a datagram to `dport`; checks the IP header.
pub fn udp_payload(p: &Parsed, dport: u16) -> Option<(Vec<u8>, u16)> {
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
pub fn udp_checksum_ok(p: &Parsed) -> bool {
    let ip = &p.payload;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let u = &ip[20..];
    let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
    checksum(&u[..len], pseudo_sum(src, dst, 17, len)) == 0
}

pub fn run<F: Future>(f: F) -> F::Output {
    Executor::new().unwrap().run_until(f)
}

/// Receive chains as a driver posts them, popped from a mock ring: one per list of
/// writable buffer lengths.
pub fn rx_chains(chains: &[&[u32]]) -> Vec<virtio::DescriptorChain> {
    let mem = GuestMemory::new(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let mut driver = MockSplitQueue::with_data_area(
        &mem,
        GuestAddress(0x1000),
        2048,
        GuestAddress(1 << 20),
        15 << 20,
    )
    .unwrap();
    for lens in chains {
        let bufs: Vec<MockBuf> = lens.iter().map(|&len| MockBuf::Writable(len)).collect();
        driver.add_chain(&bufs).unwrap();
    }
    let mut queue = driver.queue().unwrap();
    chains
        .iter()
        .map(|_| queue.pop(&mem).unwrap().unwrap())
        .collect()
}
