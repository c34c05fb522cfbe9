//! The virtio-blk device and its disk backends (raw, qcow2).
//!
//! [`Disk`] opens an image file (raw or qcow2, probed from its first bytes) and serves reads
//! and writes straight between the file and guest memory on ringvm's io_uring executor. Every
//! method takes `&self`, so one disk serves many requests in flight on one executor.
//!
//! A disk image is untrusted input: corrupt headers and tables give an [`Error`] at open or per
//! request, never a panic, never an access outside the image file, and never an allocation
//! sized by a header field beyond what the file itself holds.
//!
//! ```no_run
//! use block::{Disk, OpenOptions};
//! use memory::{GuestAddress, GuestMemory};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ex = executor::Executor::new()?;
//! let mem = GuestMemory::new_x86(1 << 20)?;
//! let disk = Disk::open("disk.qcow2".as_ref(), OpenOptions::default())?;
//! ex.run_until(async {
//!     disk.write(0, &[(GuestAddress(0x1000), 4096)], &mem).await?;
//!     disk.flush().await
//! })?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod device;
mod direct;
mod disk;
mod file;
mod io;
pub mod process;
mod qcow2;
mod raw;
mod spec;

pub use device::{BlockDevice, BlockOptions};
pub use disk::{Disk, OpenOptions};
pub use file::{Format, MAX_BACKING_DEPTH};
pub use process::{BlockArgs, BlockProcess};
pub use qcow2::Qcow2;
pub use raw::Raw;
pub use spec::{DiskSpec, MAX_DISK_ID};

use std::io as stdio;
use std::path::PathBuf;

/// Errors of the disk backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the image file failed.
    #[error("failed to open {0}")]
    Open(PathBuf, #[source] stdio::Error),
    /// fstat of the image failed.
    #[error("failed to stat the image")]
    Stat(#[source] stdio::Error),
    /// Reading the image's metadata (header, tables) failed.
    #[error("failed to read image metadata at {0:#x}")]
    ReadMetadata(u64, #[source] stdio::Error),
    /// Writing the image's metadata (header, tables) failed.
    #[error("failed to write image metadata at {0:#x}")]
    WriteMetadata(u64, #[source] stdio::Error),
    /// A request to a read-only disk that would change it.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A request that runs past the end of the disk (or overflows).
    #[error("request at {offset:#x}+{len:#x} is beyond the disk size {size:#x}")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// A request to an O_DIRECT disk whose offset or length is not a multiple of the block
    /// size (unaligned guest buffers are bounced, unaligned disk ranges refused).
    #[error("request at {offset:#x}+{len:#x} is not aligned to the {block_size}-byte block size")]
    Unaligned {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Required alignment.
        block_size: u32,
    },
    /// A write that would give a probed raw image a qcow2 signature: the image would be
    /// opened as qcow2 next time, with a header (and backing file name) the guest chose.
    #[error("refusing to write a qcow2 signature to the first sector of a probed raw image")]
    RawSignature,
    /// A format name other than `raw` and `qcow2`.
    #[error("unknown image format '{0}' (expected raw or qcow2)")]
    UnknownFormat(String),
    /// A qcow2 image whose format was probed, not given, names a backing file: a probed image
    /// never makes the device open another file (its first bytes may be a guest's doing).
    #[error("the image was probed as qcow2 and names a backing file ({0}); give its format (qcow2) to open the backing file")]
    ProbedBacking(PathBuf),
    /// A backing file whose real path is outside the directories a chain may use.
    #[error(
        "backing file {0} is outside the image's directory and the allowed backing directories"
    )]
    BackingOutside(PathBuf),
    /// A backing file that is neither a regular file nor a block device.
    #[error("backing file {0} is not a regular file or block device")]
    BackingNotFile(PathBuf),
    /// A directory allowed for backing files that cannot be resolved.
    #[error("cannot resolve backing directory {0}")]
    BackingDir(PathBuf, #[source] stdio::Error),
    /// A request buffer that is not guest RAM.
    #[error("request buffer is outside guest memory")]
    GuestMemory(#[source] memory::Error),
    /// Reading data from the image failed.
    #[error("failed to read at {0:#x}")]
    Read(u64, #[source] stdio::Error),
    /// Writing data to the image failed.
    #[error("failed to write at {0:#x}")]
    Write(u64, #[source] stdio::Error),
    /// fdatasync of the image failed.
    #[error("failed to sync the image")]
    Flush(#[source] stdio::Error),
    /// Deallocating a range of the image file failed.
    #[error("failed to discard {0:#x}+{1:#x}")]
    Discard(u64, u64, #[source] stdio::Error),
    /// Zeroing a range of the image file failed.
    #[error("failed to zero {0:#x}+{1:#x}")]
    WriteZeroes(u64, u64, #[source] stdio::Error),
    /// O_DIRECT was asked for a qcow2 image whose clusters are smaller than the alignment
    /// O_DIRECT needs: data and metadata would share blocks that can only be written whole.
    #[error("O_DIRECT needs qcow2 clusters of at least {block_size} bytes; this image has {cluster_size}-byte clusters (convert it with a larger cluster_size, or open it without direct)")]
    DirectClusterSize {
        /// The image's cluster size.
        cluster_size: u64,
        /// The alignment O_DIRECT needs on this file.
        block_size: u32,
    },
    /// A qcow2 version other than 2 and 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// A qcow2 cluster size outside 512 B ..= 2 MiB.
    #[error("invalid qcow2 cluster_bits {0}")]
    InvalidClusterBits(u32),
    /// A qcow2 refcount width above 64 bits.
    #[error("unsupported qcow2 refcount_order {0}")]
    UnsupportedRefcountOrder(u32),
    /// An encrypted qcow2 image.
    #[error("encrypted qcow2 images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// A qcow2 image with an external data file.
    #[error("qcow2 images with an external data file are not supported")]
    ExternalDataFile,
    /// A qcow2 image with extended L2 entries (subclusters).
    #[error("qcow2 images with extended l2 entries are not supported")]
    ExtendedL2,
    /// Incompatible qcow2 feature bits this implementation does not know.
    #[error("unknown incompatible qcow2 features {0:#x}")]
    UnknownFeatures(u64),
    /// A qcow2 image marked corrupt, opened read-write.
    #[error(
        "the image is marked corrupt (repair it with qemu-img check -r all, or open it read-only)"
    )]
    MarkedCorrupt,
    /// A qcow2 image with the dirty bit set (refcounts may be stale), opened read-write.
    #[error("the image is dirty (repair its refcounts with qemu-img check -r all, or open it read-only)")]
    Dirty,
    /// A qcow2 image with internal snapshots, opened read-write.
    #[error("images with internal snapshots can only be opened read-only")]
    InternalSnapshots,
    /// A qcow2 header field that is out of range or inconsistent.
    #[error("invalid qcow2 header: {0}")]
    InvalidHeader(&'static str),
    /// A qcow2 table entry (L1, L2, refcount) that is corrupt, found while serving a request.
    #[error("corrupt qcow2 metadata: {what} (at {offset:#x})")]
    Corrupt {
        /// What is wrong.
        what: &'static str,
        /// The offending file offset or entry value.
        offset: u64,
    },
    /// A request touching a compressed cluster of a kind not supported (zstd).
    #[error("zstd-compressed qcow2 clusters are not supported (guest offset {0:#x})")]
    Compressed(u64),
    /// The image would grow past what its metadata can describe.
    #[error("the image cannot grow further: {0}")]
    ImageFull(&'static str),
    /// Opening a backing file failed.
    #[error("failed to open backing file {0}")]
    Backing(PathBuf, #[source] Box<Error>),
    /// Opening the image a device process serves failed.
    #[error("cannot open disk image {0}")]
    Image(PathBuf, #[source] Box<Error>),
    /// A device process asked for a queue count it does not take.
    #[error("--queues {0}: expected 1 to {max}", max = process::MAX_PROCESS_QUEUES)]
    Queues(usize),
    /// A backing chain longer than [`MAX_BACKING_DEPTH`] (or a loop).
    #[error("backing chain is deeper than {MAX_BACKING_DEPTH} images")]
    BackingTooDeep,
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
