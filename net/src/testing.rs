//! Test helpers: private network namespaces and hand-built frames.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

/// Runs `f` on a fresh thread moved into a new network namespace, so that everything it
/// creates and sends stays there; panics in `f` fail the caller.
pub fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        crate::sys::unshare_net().expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs `ip args...` (from the calling thread's namespace) and returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// The Internet checksum of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let hi = u32::from(c[0]) << 8;
        let lo = c.get(1).map_or(0, |&b| u32::from(b));
        sum += hi | lo;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The unfolded pseudo-header sum of an IPv4 datagram.
pub fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for o in [src.octets(), dst.octets()] {
        sum += u32::from(u16::from_be_bytes([o[0], o[1]]));
        sum += u32::from(u16::from_be_bytes([o[2], o[3]]));
    }
    sum + u32::from(proto) + len as u32
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A broadcast ARP request from the guest for `target`.
pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST_IP.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet([0xff; 6], GUEST_MAC, 0x0806, &a)
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An ICMP echo request frame from the guest to `dst_mac`/`dst`.
pub fn icmp_echo(dst_mac: [u8; 6], dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum(&m, 0);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ethernet(dst_mac, GUEST_MAC, 0x0800, &ipv4(GUEST_IP, dst, 1, &m))
}

/// How the UDP checksum field of [`udp`] is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCsum {
    /// The full checksum.
    Full,
    /// The pseudo-header sum only, for checksum offload (`NEEDS_CSUM`).
    Partial,
    /// Wrong on purpose.
    Bad,
}

/// A UDP frame from the guest to `dst_mac`/`dst`:`dport`.
pub fn udp(
    dst_mac: [u8; 6],
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
    csum: UdpCsum,
) -> Vec<u8> {
    let len = 8 + data.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let pseudo = pseudo_sum(GUEST_IP, dst, 17, len);
    let c = match csum {
        UdpCsum::Full => checksum(&u, pseudo),
        // The folded, uncomplemented pseudo-header sum, as Linux leaves it for offload.
        UdpCsum::Partial => !checksum(&[], pseudo),
        UdpCsum::Bad => checksum(&u, pseudo) ^ 0x5a5a,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ethernet(dst_mac, GUEST_MAC, 0x0800, &ipv4(GUEST_IP, dst, 17, &u))
}

/// A parsed IPv4 frame: (ethertype, source MAC, IP protocol, IP source, L4 bytes).
pub struct Parsed {
    pub ethertype: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub payload: Vec<u8>,
}

pub fn parse_ethernet(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= 14, "short frame {frame:?}");
    Parsed {
        dst_mac: frame[..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: frame[14..].to_vec(),
    }
}
