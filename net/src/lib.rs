//! The virtio-net device, tap set-up and tap I/O.
//!
//! [`Tap`] opens and configures tap queues (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, optionally
//! `IFF_MULTI_QUEUE`) with a 12-byte vnet header, the layout of `virtio_net_hdr_v1`, so frames
//! and their offload metadata pass between guest memory and the tap without translation.
//! [`NetDevice`] is the virtio-net device (virtio 1.2 §5.1) served over vhost-user: one task
//! per queue, each moving frames between its ring and its tap queue with io_uring reads and
//! writes straight into and out of guest memory.
//!
//! What a device process needs once it is jailed: the tap fds (one per pair), io_uring with
//! `READV`, `WRITEV`, `READ` and `WRITE` (frames in one buffer; `READ` also for the kick
//! eventfds), `POLL_ADD` and `ASYNC_CANCEL`, and the
//! `ioctl`s `TUNSETOFFLOAD` (each receive queue start) and, with several pairs,
//! `TUNSETQUEUE` (the driver enabling pairs). [`NetDevice::new`] also uses `TUNGETIFF`,
//! `TUNSETVNETHDRSZ` and an `AF_INET` socket for `SIOCGIFMTU`: create the device before
//! the seccomp filter goes on (in another network namespace the MTU falls back to 1500).

#![deny(unsafe_code)]

mod device;
pub mod hdr;
mod mac;
pub mod process;
// Unsafe code lives here alone: the tap ioctls.
#[allow(unsafe_code)]
mod sys;
mod tap;
#[cfg(test)]
mod testing;

pub use device::{Counters, NetDevice, NetOptions, CONFIG_SIZE, DEFAULT_QUEUE_SIZE};
pub use hdr::{VirtioNetHdr, VNET_HDR_SIZE};
pub use mac::MacAddress;
pub use process::{NetArgs, NetProcess};
pub use tap::Tap;

use std::io;

/// The most queue pairs a device (and so a tap) takes: the vhost-user limit of 256 queues,
/// with room for the control queue, would allow more; a tap allows 256 queues. Defined here,
/// where both the device and the tap code see it.
pub const MAX_QUEUE_PAIRS: usize = 64;

/// Feature bits of virtio-net (virtio 1.2 §5.1.3).
pub mod features {
    /// The device handles packets with partial checksums (guest -> host).
    pub const VIRTIO_NET_F_CSUM: u32 = 0;
    /// The driver handles packets with partial checksums (host -> guest).
    pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
    /// Control channel offloads reconfiguration.
    pub const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: u32 = 2;
    /// The config space has an MTU.
    pub const VIRTIO_NET_F_MTU: u32 = 3;
    /// The config space has a MAC address.
    pub const VIRTIO_NET_F_MAC: u32 = 5;
    /// The driver takes TSOv4.
    pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
    /// The driver takes TSOv6.
    pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
    /// The driver takes TSO with ECN.
    pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
    /// The driver takes UFO.
    pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
    /// The device takes TSOv4.
    pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
    /// The device takes TSOv6.
    pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
    /// The device takes TSO with ECN.
    pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
    /// The device takes UFO.
    pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
    /// The driver can merge receive buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
    /// The config space has a link status.
    pub const VIRTIO_NET_F_STATUS: u32 = 16;
    /// There is a control virtqueue.
    pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
    /// Several queue pairs, enabled through the control virtqueue.
    pub const VIRTIO_NET_F_MQ: u32 = 22;
}

/// Errors of tap set-up and of creating the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening `/dev/net/tun` failed.
    #[error("failed to open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// An interface name that is empty, too long or has a NUL.
    #[error("invalid interface name {0:?} (1 to 15 bytes, no NUL)")]
    InvalidName(String),
    /// `TUNSETIFF` for several queues was refused by a tap that exists.
    #[error(
        "tap {name:?} refused {queues} queues (TUNSETIFF); a tap that exists takes several only \
         if it was created multi-queue (`ip tuntap add {name} mode tap multi_queue`)"
    )]
    MultiQueue {
        name: String,
        queues: usize,
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed.
    #[error("failed to create tap {name:?} (TUNSETIFF)")]
    CreateTap {
        /// The name asked for ("" for a kernel-chosen one).
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// `TUNGETIFF` failed: the fd is not a tun/tap fd.
    #[error("the fd is not an attached tun/tap fd (TUNGETIFF)")]
    GetIff(#[source] io::Error),
    /// The fd is a tun/tap fd without the flags the device needs.
    #[error("tap {name:?} has flags {flags:#x}; IFF_TAP, IFF_NO_PI and IFF_VNET_HDR are needed")]
    TapFlags {
        /// The interface.
        name: String,
        /// Its tun flags.
        flags: i16,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("failed to set the vnet header size of tap {0:?}")]
    VnetHdrSize(String, #[source] io::Error),
    /// `TUNSETOFFLOAD` failed.
    #[error("failed to set offloads {flags:#x} on tap {name:?}")]
    SetOffload {
        /// The interface.
        name: String,
        /// The `TUN_F_*` bits.
        flags: u32,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// Setting the host-side address or bringing the link up failed.
    #[error("failed to configure {name:?} as {ip}/{netmask}")]
    Configure {
        /// The interface.
        name: String,
        /// The address.
        ip: std::net::Ipv4Addr,
        /// The netmask.
        netmask: std::net::Ipv4Addr,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// Duplicating a tap fd failed.
    #[error("failed to duplicate a tap fd")]
    Dup(#[source] io::Error),
    /// Reading the interface MTU failed.
    #[error("failed to read the MTU of {0:?}")]
    Mtu(String, #[source] io::Error),
    /// Attaching or detaching a tap queue (`TUNSETQUEUE`) failed.
    #[error("failed to {} queue {queue} of tap {name:?}", if *.attach { "attach" } else { "detach" })]
    SetQueue {
        /// The interface.
        name: String,
        /// The queue pair.
        queue: usize,
        /// Attach or detach.
        attach: bool,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// `queues` or `queue_pairs` is zero or beyond what the device supports.
    #[error("{0} queue pairs: 1 to {MAX_QUEUE_PAIRS} are supported")]
    QueuePairs(usize),
    /// The number of taps differs from `queue_pairs`.
    #[error("{taps} tap fds for {pairs} queue pairs")]
    TapCount {
        /// Tap fds given.
        taps: usize,
        /// Queue pairs asked for.
        pairs: usize,
    },
    /// A queue size that is zero, not a power of two, or above 32768.
    #[error("queue size {0} is not a power of two of at most 32768")]
    QueueSize(u16),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
