//! Guest memory: memfd-backed regions, bounds-checked access, volatile slices, and iovecs
//! for io_uring; the same type in the VMM and in device processes.
//!
//! A [`GuestMemory`] is a cheap-clone handle (an `Arc` of its regions): every clone keeps the
//! mappings alive, which is what lets an io_uring operation own a [`GuestIoVecs`] that points
//! straight into guest RAM while the kernel works on it.
//!
//! ```
//! use memory::{GuestAddress, GuestMemory};
//! # fn main() -> memory::Result<()> {
//! let mem = GuestMemory::new_x86(16 << 20)?;
//! mem.write_obj(0x1234_5678u32, GuestAddress(0x1000))?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000))?, 0x1234_5678);
//! assert!(mem.read_obj::<u32>(GuestAddress(16 << 20)).is_err());
//! # Ok(())
//! # }
//! ```
//!
//! Unsafe code lives only in the modules that are allowed it below (`bytes`, `counters`,
//! `fault`, `region`, `volatile`, `iovec`); everything else is checked by the compiler.

#![deny(unsafe_code)]

mod address;
#[allow(unsafe_code)]
mod bytes;
#[allow(unsafe_code)]
mod counters;
#[allow(unsafe_code)]
pub mod fault;
mod guest;
#[allow(unsafe_code)]
mod iovec;
#[allow(unsafe_code)]
mod region;
#[allow(unsafe_code)]
mod volatile;

pub use address::GuestAddress;
pub use bytes::ByteValued;
pub use counters::SharedCounters;
pub use guest::{
    x86_layout, GuestMemory, RegionFd, RegionInfo, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE,
};
pub use iovec::GuestIoVecs;
pub use volatile::VolatileSlice;

use std::io;

/// Errors of guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create failed.
    #[error("failed to create the memfd")]
    CreateMemfd(#[source] io::Error),
    /// ftruncate of a new memfd failed.
    #[error("failed to size the memfd")]
    SetSize(#[source] io::Error),
    /// F_ADD_SEALS failed.
    #[error("failed to seal the memfd")]
    Seal(#[source] io::Error),
    /// fstat of a region's fd failed.
    #[error("failed to stat the fd of the region at {0}")]
    Fstat(GuestAddress, #[source] io::Error),
    /// mmap failed.
    #[error("failed to map the region at {0}")]
    Mmap(GuestAddress, #[source] io::Error),
    /// A layout with no regions.
    #[error("guest memory has no regions")]
    NoRegions,
    /// A region of size zero.
    #[error("the region at {0} is empty")]
    EmptyRegion(GuestAddress),
    /// A region whose start or size is not a multiple of the page size.
    #[error("the region at {addr} of {size:#x} bytes is not page-aligned")]
    UnalignedRegion {
        /// Guest address of the region.
        addr: GuestAddress,
        /// Size of the region in bytes.
        size: u64,
    },
    /// A region that runs past the end of the guest address space or of `usize`.
    #[error("the region at {addr} of {size:#x} bytes wraps the address space")]
    RegionOverflow {
        /// Guest address of the region.
        addr: GuestAddress,
        /// Size of the region in bytes.
        size: u64,
    },
    /// Two regions that overlap in guest address space.
    #[error("the regions at {0} and {1} overlap")]
    Overlap(GuestAddress, GuestAddress),
    /// A received fd smaller than the region that should be mapped from it.
    #[error("the region at {addr} needs {needed:#x} bytes of its fd, which has {actual:#x}")]
    FdTooSmall {
        /// Guest address of the region.
        addr: GuestAddress,
        /// fd offset plus region size.
        needed: u64,
        /// The fd's size.
        actual: u64,
    },
    /// More received regions mapped at once than the SIGBUS handler can guard.
    #[error("more than {0} received memory regions mapped at once")]
    TooManyGuardedRegions(usize),
    /// An access to a guest range that is not entirely guest RAM (or not in one region, for
    /// accesses that must be contiguous in host memory).
    #[error("guest range {addr}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// First guest address of the access.
        addr: GuestAddress,
        /// Length of the access in bytes.
        len: u64,
    },
    /// An atomic access at an address that is not aligned to its size.
    #[error("guest address {addr} is not aligned for a {align}-byte atomic access")]
    Misaligned {
        /// Guest address of the access.
        addr: GuestAddress,
        /// Required alignment in bytes.
        align: usize,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
