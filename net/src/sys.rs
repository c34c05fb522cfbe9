//! The tap and interface ioctls: the only unsafe code of the crate.
//!
//! Every call passes either an integer or a pointer to a `#[repr(C)]` [`IfReq`] that lives on
//! the caller's stack for the duration of the call, sized as the kernel's `struct ifreq`
//! (40 bytes on 64-bit Linux), so the kernel never reads or writes past it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `IFNAMSIZ`: interface names are at most 15 bytes plus a NUL.
pub const IFNAMSIZ: usize = 16;

pub const IFF_TAP: i16 = 0x0002;
pub const IFF_NO_PI: i16 = 0x1000;
pub const IFF_MULTI_QUEUE: i16 = 0x0100;
pub const IFF_VNET_HDR: i16 = 0x4000;
pub const IFF_ATTACH_QUEUE: i16 = 0x0200;
pub const IFF_DETACH_QUEUE: i16 = 0x0400;

pub const IFF_UP: i16 = 0x1;
pub const IFF_RUNNING: i16 = 0x40;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

// _IOW('T', n, int) and _IOR('T', n, unsigned int) from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
#[cfg(test)]
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
#[cfg(test)]
const SIOCGIFADDR: libc::c_ulong = 0x8915;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
#[cfg(test)]
const SIOCGIFNETMASK: libc::c_ulong = 0x891b;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCGIFMTU: libc::c_ulong = 0x8921;

/// `struct ifreq`: a name and a 24-byte union (flags, an address, an MTU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IfReq {
    pub name: [u8; IFNAMSIZ],
    pub data: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    /// A request for interface `name` (checked by the caller to fit with its NUL).
    pub fn with_name(name: &str) -> IfReq {
        let mut req = IfReq::default();
        let n = name.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    /// The name up to its NUL.
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    pub fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    /// Puts an AF_INET `sockaddr_in` with `addr` (port 0) in the union.
    pub fn set_ipv4(&mut self, addr: std::net::Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    #[cfg(test)]
    /// The IPv4 address of a `sockaddr_in` in the union.
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(self.data[4], self.data[5], self.data[6], self.data[7])
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl that reads and/or writes an `ifreq`.
fn ioctl_ifreq(fd: BorrowedFd<'_>, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid, exclusively borrowed 40-byte `struct ifreq` for the whole
    // call, and every request passed here (TUNSETIFF, TUNGETIFF, TUNSETQUEUE, SIOC[GS]IF*)
    // reads or writes at most one `struct ifreq` through the pointer. `fd` is open (borrowed).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut IfReq) })
}

/// An ioctl that takes a pointer to an `int`.
fn ioctl_int_ptr(
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    v: &mut libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` is a valid, exclusively borrowed `int` for the whole call;
    // TUN[GS]ETVNETHDRSZ read or write exactly one `int` through the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, v as *mut libc::c_int) })
}

/// TUNSETIFF: attaches the fresh `/dev/net/tun` fd to a new or existing interface; the
/// kernel writes the chosen name back into `req`.
pub fn tun_set_iff(fd: BorrowedFd<'_>, req: &mut IfReq) -> io::Result<()> {
    ioctl_ifreq(fd, TUNSETIFF, req)
}

/// TUNGETIFF: the interface name and its tun flags.
pub fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<IfReq> {
    let mut req = IfReq::default();
    ioctl_ifreq(fd, TUNGETIFF, &mut req)?;
    Ok(req)
}

/// TUNSETQUEUE: attaches (`IFF_ATTACH_QUEUE`) or detaches (`IFF_DETACH_QUEUE`) this queue.
pub fn tun_set_queue(fd: BorrowedFd<'_>, flags: i16) -> io::Result<()> {
    let mut req = IfReq::default();
    req.set_flags(flags);
    ioctl_ifreq(fd, TUNSETQUEUE, &mut req)
}

/// TUNSETVNETHDRSZ.
pub fn tun_set_vnet_hdr_size(fd: BorrowedFd<'_>, size: i32) -> io::Result<()> {
    let mut v = size;
    ioctl_int_ptr(fd, TUNSETVNETHDRSZ, &mut v)
}

#[cfg(test)]
/// TUNGETVNETHDRSZ.
pub fn tun_get_vnet_hdr_size(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut v = 0;
    ioctl_int_ptr(fd, TUNGETVNETHDRSZ, &mut v)?;
    Ok(v)
}

/// TUNSETOFFLOAD with `TUN_F_*` bits (passed by value).
pub fn tun_set_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value: no memory is passed. `fd` is open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) })
}

/// An AF_INET datagram socket for the SIOC*IF* requests.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` was just returned by socket(2), is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the IPv4 address and netmask of `name` and brings it up.
pub fn if_configure(
    name: &str,
    ip: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name);
    req.set_ipv4(ip);
    ioctl_ifreq(sock.as_fd(), SIOCSIFADDR, &mut req)?;
    let mut req = IfReq::with_name(name);
    req.set_ipv4(mask);
    ioctl_ifreq(sock.as_fd(), SIOCSIFNETMASK, &mut req)?;
    let mut req = IfReq::with_name(name);
    ioctl_ifreq(sock.as_fd(), SIOCGIFFLAGS, &mut req)?;
    req.set_flags(req.flags() | IFF_UP | IFF_RUNNING);
    ioctl_ifreq(sock.as_fd(), SIOCSIFFLAGS, &mut req)
}

#[cfg(test)]
/// The address, netmask and flags of `name`.
pub fn if_info(name: &str) -> io::Result<(std::net::Ipv4Addr, std::net::Ipv4Addr, i16)> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name);
    ioctl_ifreq(sock.as_fd(), SIOCGIFADDR, &mut req)?;
    let ip = req.ipv4();
    let mut req = IfReq::with_name(name);
    ioctl_ifreq(sock.as_fd(), SIOCGIFNETMASK, &mut req)?;
    let mask = req.ipv4();
    let mut req = IfReq::with_name(name);
    ioctl_ifreq(sock.as_fd(), SIOCGIFFLAGS, &mut req)?;
    Ok((ip, mask, req.flags()))
}

/// The MTU of `name`.
pub fn if_mtu(name: &str) -> io::Result<i32> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name);
    ioctl_ifreq(sock.as_fd(), SIOCGIFMTU, &mut req)?;
    Ok(req.int())
}

/// Moves the calling thread into a new network namespace (tests only: every test's traffic
/// stays in a namespace it made).
#[cfg(test)]
pub fn unshare_net() -> io::Result<()> {
    // SAFETY: plain syscall with a constant flag; it affects only the calling thread, whose
    // open fds and memory are unchanged.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })
}

/// CPU time (user + system) the calling thread has used.
#[cfg(test)]
pub fn thread_cpu_time() -> io::Result<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec the call writes.
    check(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) })?;
    Ok(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}

/// Guest buffers and a host buffer in one tap read or write.
///
/// - Read ([`HostIoVecs::spill`]): the host buffer comes last and takes what does not fit
///   in the guest's: the tap reports a frame it had to cut as if it fit, so the device reads
///   into one byte more than the largest frame and copies an overflow into later buffers
///   (or counts the frame as too big) instead of handing the guest a truncated frame.
/// - Write ([`HostIoVecs::header`]): the host buffer comes first and holds the vnet header
///   the device checked (the guest's own never goes to the tap: it could change after the
///   check).
pub struct HostIoVecs {
    /// The guest iovecs; keeps the guest mappings they point into alive.
    guest: memory::GuestIoVecs,
    host: Vec<u8>,
    /// The guest iovecs and the host one, in order; empty (and unused) without a host
    /// buffer, when `guest`'s own serve.
    iovecs: Vec<libc::iovec>,
}

impl HostIoVecs {
    /// `guest`'s iovecs, then all of `spill` (its length, not its capacity).
    pub fn spill(guest: memory::GuestIoVecs, spill: Vec<u8>) -> HostIoVecs {
        HostIoVecs::new(guest, spill, false)
    }

    /// All of `header`, then `guest`'s iovecs.
    pub fn header(header: Vec<u8>, guest: memory::GuestIoVecs) -> HostIoVecs {
        HostIoVecs::new(guest, header, true)
    }

    fn new(guest: memory::GuestIoVecs, mut host: Vec<u8>, host_first: bool) -> HostIoVecs {
        use executor::IoVecs;
        let mut iovecs = Vec::new();
        if !host.is_empty() {
            let host_iovec = libc::iovec {
                iov_base: host.as_mut_ptr().cast(),
                iov_len: host.len(),
            };
            iovecs.reserve_exact(guest.iovecs().len() + 1);
            if host_first {
                iovecs.push(host_iovec);
            }
            iovecs.extend_from_slice(guest.iovecs());
            if !host_first {
                iovecs.push(host_iovec);
            }
        }
        HostIoVecs {
            guest,
            host,
            iovecs,
        }
    }

    /// The host buffer back, with whatever a read put in it.
    pub fn into_host(self) -> Vec<u8> {
        self.host
    }
}

// SAFETY: without a host buffer these are `guest`'s own iovecs (its `IoVecs` contract: owned
// here and never changed). Otherwise the guest iovecs in `iovecs` are copies of `guest`'s,
// which stay valid while `guest` is alive; the host one points at `host`'s heap buffer,
// which does not move when this value moves and is neither resized nor referenced until
// `into_host` consumes the value; `iovecs` is a Vec whose heap buffer is stable and
// unchanged after `new`. Checked by
// `device::rx::tests::a_frame_larger_than_a_single_buffer_is_counted_not_delivered`,
// `mergeable_frame_overflowing_the_buffers_waits_for_more` and the transmit tests.
unsafe impl executor::IoVecs for HostIoVecs {
    fn iovecs(&self) -> &[libc::iovec] {
        if self.host.is_empty() {
            self.guest.iovecs()
        } else {
            &self.iovecs
        }
    }
}

// SAFETY: guest memory is writable and only accessed volatilely (`GuestIoVecs` is
// `IoVecsMut`); `host` is an owned, initialised Vec<u8> nothing borrows while the value is
// alive.
unsafe impl executor::IoVecsMut for HostIoVecs {}
