//! [`Disk`]: an image of either format, opened by probing its first bytes.

use std::fs::File;
use std::path::{Path, PathBuf};

use memory::{GuestAddress, GuestMemory};

use crate::direct::{direct_alignment, read_file};
use crate::file::{canonical_dir, image_dir, open_file, Format, Layer};
use crate::qcow2::{self, Backing, Qcow2};
use crate::raw::Raw;
#[cfg(doc)]
use crate::Error;
use crate::Result;

/// How to open a disk image.
///
/// # Formats and backing files
/// With `format` given, the image is opened in that format whatever its bytes say. Without
/// it the format is probed (`QFI\xfb` at offset 0 is qcow2, anything else raw), and then:
/// - a probed raw image refuses guest writes that would put the qcow2 magic in its first
///   bytes ([`Error::RawSignature`]), so it stays raw at its next open;
/// - a probed qcow2 image that names a backing file is refused ([`Error::ProbedBacking`]):
///   an image whose format nobody stated never makes the device open another file. The same
///   holds down a chain: a backing file whose format its overlay does not name is probed,
///   under the same rule.
///
/// Backing files are opened read-only, named relative to the directory of the image that
/// names them (or absolute), and must be regular files or block devices whose real path
/// (symlinks followed, checked on the open descriptor) lies inside the directory of the image
/// given to [`Disk::open`] or one of `backing_dirs` (subdirectories included); anything else
/// is refused ([`Error::BackingOutside`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse every request that would change the image (and open the file `O_RDONLY`).
    pub read_only: bool,
    /// Open with `O_DIRECT`. Requests whose offset or length is not a multiple of
    /// [`Disk::block_size`] (the alignment the kernel reports for the file) then fail with
    /// [`Error::Unaligned`]; guest buffers that are not aligned go through an aligned bounce
    /// buffer. qcow2 metadata I/O is aligned too, and a qcow2 image whose clusters are smaller
    /// than the alignment is refused ([`Error::DirectClusterSize`]). Backing files are opened
    /// buffered (see `qcow2::open_backing`).
    pub direct: bool,
    /// The image's format; `None` probes it.
    pub format: Option<Format>,
    /// Directories, besides the image's own, that backing files may be in.
    pub backing_dirs: Vec<PathBuf>,
}

/// A disk image: static dispatch over the formats.
// A disk is made once and lives as long as its device: the size difference costs nothing,
// while boxing the qcow2 state would cost an indirection per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Disk {
    /// A raw image (or block device): disk offset = file offset.
    Raw(Raw),
    /// A qcow2 image (versions 2 and 3).
    Qcow2(Qcow2<Disk>),
}

impl Disk {
    /// Opens an image, read-only or read-write, buffered or `O_DIRECT`, in the given format or
    /// a probed one (see [`OpenOptions`] for what probing allows). qcow2 metadata (header, L1
    /// and refcount tables, backing files) is read here, synchronously.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Disk> {
        let mut allowed = vec![canonical_dir(image_dir(path))?];
        for d in &options.backing_dirs {
            allowed.push(canonical_dir(d)?);
        }
        let file = open_file(path, options.read_only, options.direct)?;
        let layer = Layer {
            read_only: options.read_only,
            direct: options.direct,
            format: options.format,
            depth: 0,
            allowed: &allowed,
        };
        Disk::from_file(file, path, &layer)
    }

    /// Opens `file` (named `path`) as one layer of a chain.
    pub(crate) fn from_file(file: File, path: &Path, layer: &Layer<'_>) -> Result<Disk> {
        let format = match layer.format {
            Some(f) => f,
            None if probe_magic(&file, layer.direct)? == qcow2::MAGIC => Format::Qcow2,
            None => Format::Raw,
        };
        match format {
            Format::Qcow2 => Ok(Disk::Qcow2(Qcow2::from_file(file, path, layer)?)),
            Format::Raw => Ok(Disk::Raw(Raw::from_file(file, layer)?)),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw(d) => d.size(),
            Disk::Qcow2(d) => d.size(),
        }
    }

    /// Whether requests that change the disk are refused.
    pub fn read_only(&self) -> bool {
        match self {
            Disk::Raw(d) => d.read_only(),
            Disk::Qcow2(d) => d.read_only(),
        }
    }

    /// Logical block size: 512, or the alignment `O_DIRECT` needs on the image file.
    pub fn block_size(&self) -> u32 {
        match self {
            Disk::Raw(d) => d.block_size(),
            Disk::Qcow2(d) => d.block_size(),
        }
    }

    /// Reads `offset..offset + len(bufs)` into the guest buffers, in order.
    pub async fn read(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> Result<()> {
        match self {
            Disk::Raw(d) => d.read(offset, bufs, mem).await,
            Disk::Qcow2(d) => d.read(offset, bufs, mem).await,
        }
    }

    /// Writes the guest buffers, in order, at `offset`.
    pub async fn write(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> Result<()> {
        match self {
            Disk::Raw(d) => d.write(offset, bufs, mem).await,
            Disk::Qcow2(d) => d.write(offset, bufs, mem).await,
        }
    }

    /// qcow2: write metadata back before a write that changed it completes
    /// ([`Qcow2::set_metadata_write_through`]); raw has no metadata.
    pub fn set_metadata_write_through(&mut self, on: bool) {
        if let Disk::Qcow2(d) = self {
            d.set_metadata_write_through(on);
        }
    }

    /// Makes every completed write durable (qcow2: metadata written back first, then
    /// fdatasync).
    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Raw(d) => d.flush().await,
            Disk::Qcow2(d) => d.flush().await,
        }
    }

    /// Deallocates `offset..offset + len`; it reads back as zeros.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Raw(d) => d.discard(offset, len).await,
            Disk::Qcow2(d) => d.write_zeroes(offset, len, true).await,
        }
    }

    /// Zeroes `offset..offset + len`, deallocating it where possible when `unmap`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            Disk::Raw(d) => d.write_zeroes(offset, len, unmap).await,
            Disk::Qcow2(d) => d.write_zeroes(offset, len, unmap).await,
        }
    }

    /// Reads `offset..offset + len` into a new buffer; bytes past the end of the disk read
    /// as zeros (a backing file smaller than its overlay).
    pub(crate) async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self {
            Disk::Raw(d) => d.read_vec(offset, len).await,
            Disk::Qcow2(d) => Box::pin(d.read_vec(offset, len)).await,
        }
    }
}

/// The first four bytes of the file (zeros if it is shorter), read through an aligned block
/// for `O_DIRECT`.
fn probe_magic(file: &File, direct: bool) -> Result<[u8; 4]> {
    let align = if direct {
        u64::from(direct_alignment(file))
    } else {
        1
    };
    let first = read_file(file, align, 0, 4)?;
    let mut magic = [0u8; 4];
    magic[..first.len()].copy_from_slice(&first);
    Ok(magic)
}

impl Backing for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }

    fn read(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> impl std::future::Future<Output = Result<()>> {
        Disk::read(self, offset, bufs, mem)
    }

    fn read_vec(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = Result<Vec<u8>>> {
        Disk::read_vec(self, offset, len)
    }

    fn open(file: File, path: &Path, layer: &Layer<'_>) -> Result<Disk> {
        Disk::from_file(file, path, layer)
    }
}
