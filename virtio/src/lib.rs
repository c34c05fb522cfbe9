//! Split virtqueues, device traits, the virtio-pci transport, and vhost-user.
//!
//! The device side of the split virtqueue (virtio 1.2 §2.7): [`Queue`] holds a queue's
//! state and takes the guest's memory as an argument to every method (so the same queue
//! works across a memory-table change); [`Queue::pop`] returns a fully validated
//! [`DescriptorChain`], whose [`Reader`] and [`Writer`] copy to and from the chain's buffers or
//! hand out [`GuestIoVecs`](memory::GuestIoVecs) for zero-copy io_uring I/O.
//! [`AsyncQueue`] drives a queue from its kick eventfd on the executor.
//!
//! Everything the guest controls is checked: a malformed chain is an [`Error::InvalidChain`]
//! naming its head, never a panic or an access outside guest memory.
//!
//! ```
//! # #[cfg(feature = "test-utils")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::io::{Read, Write};
//! use memory::{GuestAddress, GuestMemory};
//! use virtio::mock::{MockBuf, MockSplitQueue};
//!
//! let mem = GuestMemory::new_x86(4 << 20)?;
//! let mut driver = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16)?;
//! let mut queue = driver.queue()?;
//! let sent = driver.add_chain(&[MockBuf::Readable(b"ping".to_vec()), MockBuf::Writable(4)])?;
//!
//! let chain = queue.pop(&mem)?.expect("one chain");
//! let mut request = Vec::new();
//! chain.reader(&mem).read_to_end(&mut request)?;
//! let mut writer = chain.writer(&mem);
//! writer.write_all(b"pong")?;
//! queue.add_used(&mem, chain.head_index(), writer.bytes_written() as u32)?;
//!
//! assert_eq!(request, b"ping");
//! assert_eq!(driver.next_used()?.map(|u| u.len), Some(4));
//! assert_eq!(driver.read_writable(&sent)?, b"pong");
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "test-utils"))]
//! # fn main() {}
//! ```

#![forbid(unsafe_code)]

mod async_queue;
pub mod log;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod process;
pub mod queue;
mod reader_writer;
pub mod rng;
pub mod stats;
pub mod types;
pub mod vhost_user;

pub use async_queue::AsyncQueue;
pub use log::GuestLog;
pub use process::DeviceProcess;
pub use queue::{
    Buffer, ChainError, Descriptor, DescriptorChain, Queue, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
};
pub use reader_writer::{Reader, Writer};
pub use rng::{Rng, RngProcess};
pub use types::DeviceType;

use std::io;

use memory::GuestAddress;

/// Errors of virtqueue set-up and processing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A maximum queue size that is zero, above 32768 or not a power of two.
    #[error("maximum queue size {0} is not a power of two of at most 32768")]
    InvalidMaxSize(u16),
    /// The driver set a queue size that is zero, above the maximum or not a power of two.
    #[error("queue size {size} is not a power of two of at most {max}")]
    InvalidSize {
        /// The size the driver set.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// A ring address without the alignment the spec requires (16, 2, 4).
    #[error("the {ring} at {addr} is not {align}-byte aligned")]
    MisalignedRing {
        /// Which ring ("descriptor table", "available ring", "used ring").
        ring: &'static str,
        /// Its guest address.
        addr: GuestAddress,
        /// The required alignment.
        align: u64,
    },
    /// A ring that is not entirely in guest RAM.
    #[error("the {ring} at {addr} of {len:#x} bytes is outside guest memory")]
    RingOutOfBounds {
        /// Which ring.
        ring: &'static str,
        /// Its guest address.
        addr: GuestAddress,
        /// Its length in bytes for the queue size.
        len: u64,
    },
    /// A queue operation before the queue was activated.
    #[error("the queue is not ready")]
    NotReady,
    /// The driver's avail index ran ahead of the device by more than the queue size.
    #[error("avail index {avail} is more than the queue size {size} ahead of {next}")]
    InvalidAvailIdx {
        /// The index the driver published.
        avail: u16,
        /// The device's next avail index.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// Reading or writing the rings failed (they moved out of guest memory).
    #[error("access to the rings failed")]
    RingAccess(#[source] memory::Error),
    /// A descriptor chain the driver made is malformed. The chain was consumed from the avail
    /// ring: the device may return it with a zero-length used entry or ask for a reset.
    #[error("invalid descriptor chain at head {head}")]
    InvalidChain {
        /// Head index of the chain.
        head: u16,
        /// What is wrong with it.
        #[source]
        reason: ChainError,
    },
    /// The device returned a head index beyond the queue size.
    #[error("used head {head} is out of range for queue size {size}")]
    InvalidUsedHead {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain's buffers ended before an object could be read or written whole.
    #[error("the chain has {available} bytes left, {needed} needed")]
    ChainTooShort {
        /// Bytes still available.
        available: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Access to a chain's buffers failed.
    #[error("access to a chain buffer failed")]
    BufferAccess(#[source] memory::Error),
    /// Reading the kick eventfd failed.
    #[error("failed to read the kick eventfd")]
    Kick(#[source] io::Error),
    /// Writing the call eventfd failed.
    #[error("failed to write the call eventfd")]
    Call(#[source] io::Error),
    /// `next_chain` was called while another call on the same queue was waiting.
    #[error("another task is already waiting for a chain on this queue")]
    PopInProgress,
    /// The inflight region (vhost-user inflight I/O tracking) cannot be used.
    #[error("inflight tracking")]
    Inflight(#[source] queue::inflight::InflightError),
    /// The mock driver could not do what a test asked.
    #[cfg(any(test, feature = "test-utils"))]
    #[error("mock driver: {0}")]
    Mock(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
