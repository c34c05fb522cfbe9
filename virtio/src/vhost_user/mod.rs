//! vhost-user: the protocol between a VMM (the frontend) and an out-of-process device (the
//! backend), as specified in QEMU's `docs/interop/vhost-user.rst`.
//!
//! [`message`] is the wire layer: message headers, request codes, the bodies of the base
//! protocol, and a decoder that checks every byte and the number of file descriptors a peer
//! sent before anything acts on a message. A malformed message is a [`MessageError`], never a
//! panic.
//!
//! [`connection`] frames messages on a unix stream socket, [`backend`] serves a [`Device`]
//! to a frontend, and [`frontend`] drives a backend from the VMM.
//!
//! ```no_run
//! # async fn vmm_and_device() -> Result<(), Box<dyn std::error::Error>> {
//! use std::os::fd::AsFd;
//! use std::rc::Rc;
//! use std::time::Duration;
//! use executor::EventFd;
//! use memory::{GuestAddress, GuestMemory};
//! use virtio::vhost_user::{serve, Connection, Frontend, VringConfig};
//!
//! let (vmm_end, device_end) = executor::socketpair()?;
//! // The device process (here a task on the same executor).
//! let entropy = std::fs::File::open("/dev/urandom")?.into();
//! let device = executor::spawn(serve(Rc::new(virtio::Rng::new(entropy)), Connection::new(device_end)));
//!
//! // The VMM.
//! let mem = GuestMemory::new_x86(256 << 20)?;
//! let frontend = Frontend::connect(Connection::new(vmm_end), Duration::from_secs(5)).await?;
//! let (kick, call) = (EventFd::new()?, EventFd::new()?);
//! let ring = VringConfig {
//!     index: 0,
//!     size: 256,
//!     desc: GuestAddress(0x10_0000),
//!     avail: GuestAddress(0x10_1000),
//!     used: GuestAddress(0x10_2000),
//!     base: 0,
//!     kick: kick.as_fd(),
//!     call: Some(call.as_fd()),
//! };
//! frontend.start(frontend.features(), &mem, &[ring]).await?;
//! // ... the guest uses the device; on a driver reset:
//! let bases = frontend.stop(&[0]).await?;
//! frontend.reset().await?;
//! drop(frontend);
//! device.await?;
//! # let _ = bases;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod connection;
pub mod frontend;
pub mod message;

pub use backend::{reserve_inflight, serve, serve_with_inflight, Device, StopSignal};
pub use connection::Connection;
pub use frontend::{Frontend, VringConfig};
pub use message::{
    encode_ack, encode_reply, Body, Config, Header, Inflight, MemTable, MemoryRegion, Message,
    MessageError, Request, RequestBody, VringAddr, VringFd, VringState, U64,
};

use std::io;
use std::time::Duration;

use memory::GuestAddress;

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: the feature bit that enables protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Protocol feature: `GET_QUEUE_NUM` (multiple queues).
pub const PROTOCOL_F_MQ: u32 = 0;
/// Protocol feature: `FLAG_NEED_REPLY` is answered with a `REPLY_ACK`.
pub const PROTOCOL_F_REPLY_ACK: u32 = 3;
/// Protocol feature: `GET_CONFIG` and `SET_CONFIG`.
pub const PROTOCOL_F_CONFIG: u32 = 9;
/// Protocol feature: `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD` (inflight I/O tracking).
pub const PROTOCOL_F_INFLIGHT_SHMFD: u32 = 12;
/// Protocol feature: `RESET_DEVICE`.
pub const PROTOCOL_F_RESET_DEVICE: u32 = 13;
/// Protocol feature: `GET_MAX_MEM_SLOTS`, `ADD_MEM_REG` and `REM_MEM_REG`.
pub const PROTOCOL_F_CONFIGURE_MEM_SLOTS: u32 = 15;

/// Errors of a vhost-user connection, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sending a message failed.
    #[error("failed to send a message")]
    Send(#[source] io::Error),
    /// Receiving a message failed.
    #[error("failed to receive a message")]
    Recv(#[source] io::Error),
    /// The peer closed the connection (while a reply was awaited, say).
    #[error("the peer closed the connection")]
    PeerClosed,
    /// The peer closed the connection part-way through a message.
    #[error("the peer closed the connection after {got} of {expected} bytes of a message")]
    ClosedMidMessage {
        /// Bytes of the message received.
        got: usize,
        /// Bytes the message has (the header's, until the header is complete).
        expected: usize,
    },
    /// The peer sent more file descriptors than a message may carry.
    #[error("the peer sent more than {0} file descriptors with a message")]
    TooManyFds(usize),
    /// The rest of a message did not arrive in time.
    #[error("the rest of a message did not arrive within {0:?}")]
    MessageTimeout(Duration),
    /// A malformed message.
    #[error("malformed message")]
    Message(#[source] MessageError),
    /// No reply to a request within the reply timeout.
    #[error("no reply to {0:?} within {1:?}")]
    Timeout(Request, Duration),
    /// A request could not be sent within the reply timeout: the peer does not read.
    #[error("{0:?} could not be sent within {1:?}: the backend does not read its socket")]
    SendTimeout(Request, Duration),
    /// A message that is not the reply to the request sent.
    #[error("expected a reply to {expected:?}, received {got:?} (reply flag {reply})")]
    UnexpectedReply {
        /// The request sent.
        expected: Request,
        /// The request code received.
        got: Request,
        /// Whether it had the reply flag.
        reply: bool,
    },
    /// A reply that came with file descriptors.
    #[error("the reply to {0:?} carried {1} file descriptors")]
    ReplyFds(Request, usize),
    /// A reply whose body is malformed.
    #[error("malformed reply to {0:?}")]
    BadReply(Request, #[source] MessageError),
    /// A reply whose contents do not answer the request.
    #[error("the reply to {0:?} does not match it: {1}")]
    MismatchedReply(Request, &'static str),
    /// The backend answered a request with a failure status.
    #[error("the backend failed {request:?} (status {status})")]
    BackendFailed {
        /// The request.
        request: Request,
        /// The nonzero status.
        status: u64,
    },
    /// An earlier failure left the connection out of step; it cannot be used any more.
    #[error("the connection failed earlier and is unusable")]
    Broken,
    /// A feature the operation needs was not negotiated.
    #[error("{0} was not negotiated")]
    NotNegotiated(&'static str),
    /// Feature bits that were not offered.
    #[error("features {acked:#x} are not all in the offered {offered:#x}")]
    FeaturesNotOffered {
        /// The bits acknowledged.
        acked: u64,
        /// The bits offered.
        offered: u64,
    },
    /// Protocol feature bits that were not offered.
    #[error("protocol features {acked:#x} are not all in the offered {offered:#x}")]
    ProtocolFeaturesNotOffered {
        /// The bits acknowledged.
        acked: u64,
        /// The bits offered.
        offered: u64,
    },
    /// A queue index at or above the device's number of queues.
    #[error("queue {index} does not exist (the device has {num_queues})")]
    QueueIndex {
        /// The index.
        index: u32,
        /// The device's queue count.
        num_queues: usize,
    },
    /// A queue size that is zero, not a power of two or above the maximum.
    #[error("queue size {size} is not a power of two of at most {max}")]
    QueueSize {
        /// The size requested.
        size: u32,
        /// The device's maximum.
        max: u16,
    },
    /// A `SET_VRING_BASE` index that does not fit a split ring's 16 bits.
    #[error("base {base} of queue {index} does not fit 16 bits")]
    VringBase {
        /// The queue.
        index: u32,
        /// The base.
        base: u32,
    },
    /// `SET_VRING_KICK` without an fd: the frontend asks for a polled ring, which this
    /// backend does not do.
    #[error("queue {0}: SET_VRING_KICK without an fd asks for polling, which is not supported")]
    PolledRing(u32),
    /// A ring's layout changed while it runs.
    #[error("{request:?} for queue {index} while it runs")]
    RingRunning {
        /// The request.
        request: Request,
        /// The queue.
        index: u32,
    },
    /// A request that needs the memory table before it was sent.
    #[error("{0:?} before SET_MEM_TABLE")]
    NoMemoryTable(Request),
    /// Mapping the memory table failed.
    #[error("failed to map the memory table")]
    MapMemory(#[source] memory::Error),
    /// The frontend shrank the file of a memory region after sending it; the device's
    /// access to the missing pages was survived ([`memory::fault`]).
    #[error("the frontend shrank guest memory under the device")]
    MemoryShrunk(#[source] memory::Error),
    /// An access to guest memory faulted, though the current table's files are intact (an
    /// older table's region shrank).
    #[error("{0} accesses to guest memory faulted: a region's file shrank")]
    MemoryFault(u64),
    /// A ring address that is in none of the memory table's regions.
    #[error("the {ring} of queue {index} at user address {addr:#x} is outside the memory table")]
    VringAddress {
        /// The queue.
        index: u32,
        /// Which ring.
        ring: &'static str,
        /// The frontend user address.
        addr: u64,
    },
    /// A ring layout that does not fit guest memory.
    #[error("invalid layout for queue {index}")]
    QueueSetup {
        /// The queue.
        index: u32,
        /// What is wrong.
        #[source]
        source: crate::Error,
    },
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] io::Error),
    /// Making a call eventfd nonblocking failed.
    #[error("failed to make the call eventfd nonblocking")]
    CallNonblocking(#[source] io::Error),
    /// Duplicating a file descriptor failed.
    #[error("failed to duplicate a file descriptor")]
    DupFd(#[source] io::Error),
    /// A config access beyond the device's config space.
    #[error(
        "config access of {size} bytes at {offset} is outside the {config_size}-byte config space"
    )]
    ConfigRange {
        /// The offset.
        offset: u32,
        /// The size.
        size: u32,
        /// The device's config size.
        config_size: usize,
    },
    /// The device refused a config write.
    #[error("config write refused: {0}")]
    ConfigWrite(String),
    /// Guest memory with more regions than `SET_MEM_TABLE` carries.
    #[error("guest memory has {0} regions, at most 8 can be sent")]
    TooManyRegions(usize),
    /// `REM_MEM_REG` of a region that is not in the memory table.
    #[error("no memory region at guest address {guest_addr:#x} of {size:#x} bytes to remove")]
    NoSuchRegion {
        /// The region's guest address.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// `ADD_MEM_REG` beyond the backend's memory slots.
    #[error("all {0} memory slots are in use")]
    MemSlotsFull(usize),
    /// An inflight request without `INFLIGHT_SHMFD` negotiated (or offered).
    #[error("{0:?} without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD")]
    InflightNotNegotiated(Request),
    /// An inflight region that cannot cover the queues asked for.
    #[error(
        "an inflight region of {size} bytes at {offset} for {num_queues} queues of {queue_size}"
    )]
    InflightSize {
        /// Its size.
        size: u64,
        /// Its offset in the fd.
        offset: u64,
        /// Queues.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// Creating or mapping an inflight region failed.
    #[error("failed to map an inflight region")]
    MapInflight(#[source] memory::Error),
    /// Zeroing a new inflight region failed.
    #[error("failed to clear an inflight region")]
    ClearInflight(#[source] memory::Error),
    /// A guest address in none of the guest memory's regions.
    #[error("guest address {0} is not in guest memory")]
    GuestAddress(GuestAddress),
}

/// The result type of vhost-user operations.
pub type Result<T> = std::result::Result<T, Error>;

/// `err` and its sources, joined by ": " (for log lines).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
