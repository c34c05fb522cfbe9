//! [`Disk`]: an image of either format, opened by probing its first bytes.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memory::{GuestAddress, GuestMemory};

use crate::io::{total_len, Bufs};
use crate::qcow2::{self, Qcow2};
use crate::raw::Raw;
use crate::{Error, Result};

/// How deep a chain of backing files may be (the image itself not counted); deeper chains,
/// and loops, fail to open with [`Error::BackingTooDeep`].
pub const MAX_BACKING_DEPTH: u32 = 16;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Disk offset = file offset.
    Raw,
    /// qcow2, versions 2 and 3.
    Qcow2,
}

impl Format {
    /// The format's name, as `format=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::UnknownFormat(s.to_owned())),
        }
    }
}

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
    /// Open with `O_DIRECT` (raw images only: qcow2 refuses it with
    /// [`Error::DirectUnsupported`]). Requests whose offset, length or guest buffers are not
    /// multiples of [`Disk::block_size`] then fail with [`Error::Unaligned`]; nothing is
    /// bounced.
    pub direct: bool,
    /// The image's format; `None` probes it.
    pub format: Option<Format>,
    /// Directories, besides the image's own, that backing files may be in.
    pub backing_dirs: Vec<PathBuf>,
}

/// One image of a chain being opened.
pub(crate) struct Layer<'a> {
    pub(crate) read_only: bool,
    pub(crate) direct: bool,
    /// `None`: probed.
    pub(crate) format: Option<Format>,
    /// Backing files above this image (0 for the image given to [`Disk::open`]).
    pub(crate) depth: u32,
    /// Canonical directories the chain's backing files must be in.
    pub(crate) allowed: &'a [PathBuf],
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
    Qcow2(Qcow2),
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
            None if probe_magic(&file)? == qcow2::MAGIC => Format::Qcow2,
            None => Format::Raw,
        };
        match format {
            Format::Qcow2 if layer.direct => Err(Error::DirectUnsupported),
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

    /// Logical block size: 512, or the device's logical block size for `O_DIRECT`.
    pub fn block_size(&self) -> u32 {
        match self {
            Disk::Raw(d) => d.block_size(),
            Disk::Qcow2(_) => 512,
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

/// Checks that `offset..offset + len` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Checks a guest-buffer request: its total length and its range.
pub(crate) fn check_request(offset: u64, bufs: &Bufs, size: u64) -> Result<u64> {
    let len = total_len(bufs).ok_or(Error::OutOfRange {
        offset,
        len: u64::MAX,
        size,
    })?;
    check_range(offset, len, size)?;
    Ok(len)
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| Error::Open(path.to_owned(), e))
}

/// The directory `path` is named relative to: its parent, or `.` for a bare file name.
pub(crate) fn image_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn canonical_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(dir).map_err(|e| Error::BackingDir(dir.to_owned(), e))
}

/// Opens a backing file read-only: a regular file or block device whose real path lies in
/// one of the `allowed` directories.
///
/// The type is checked before the open (a FIFO would block it), and the path the open
/// descriptor really names is checked after it, so a symlink or a rename in between cannot
/// lead outside.
pub(crate) fn open_backing_file(path: &Path, allowed: &[PathBuf]) -> Result<File> {
    let not_file = || Error::BackingNotFile(path.to_owned());
    let is_file = |t: std::fs::FileType| t.is_file() || t.is_block_device();
    let meta = std::fs::metadata(path).map_err(|e| Error::Open(path.to_owned(), e))?;
    if !is_file(meta.file_type()) {
        return Err(not_file());
    }
    let file = open_file(path, true, false)?;
    let opened = file.metadata().map_err(Error::Stat)?;
    if !is_file(opened.file_type()) {
        return Err(not_file());
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let real = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| Error::Open(path.to_owned(), e))?;
    if !allowed.iter().any(|dir| real.starts_with(dir)) {
        return Err(Error::BackingOutside(real));
    }
    Ok(file)
}

/// The first four bytes of the file (zeros if it is shorter). The read goes through a
/// 4 KiB-aligned buffer of 4 KiB, which `O_DIRECT` accepts on 512-byte and 4K devices alike.
fn probe_magic(file: &File) -> Result<[u8; 4]> {
    const ALIGN: usize = 4096;
    let mut buf = vec![0u8; 2 * ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
    let block = &mut buf[start..start + ALIGN];
    // One read: a second one, after a short first, would be unaligned for O_DIRECT.
    loop {
        match file.read_at(block, 0) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::ReadMetadata(0, e)),
        }
    }
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&block[..4]);
    Ok(magic)
}

/// Reads what there is of `buf.len()` bytes at `offset`; returns the count.
pub(crate) fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::ReadMetadata(offset, e)),
        }
    }
    Ok(done)
}

/// Size in bytes of a regular file or block device.
pub(crate) fn file_size(file: &File) -> Result<u64> {
    let meta = file.metadata().map_err(Error::Stat)?;
    if meta.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        return f.seek(SeekFrom::End(0)).map_err(Error::Stat);
    }
    Ok(meta.len())
}

/// The logical block size that `O_DIRECT` requests to `file` must be aligned to, from sysfs
/// (the device itself, or the device holding the file system); 4096 when unknown.
pub(crate) fn direct_block_size(file: &File) -> u32 {
    let Ok(meta) = file.metadata() else {
        return 4096;
    };
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let base = format!("/sys/dev/block/{major}:{minor}");
    for p in [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ] {
        if let Some(n) = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|n| n.is_power_of_two() && (512..=65536).contains(n))
        {
            return n;
        }
    }
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(matches!(
            check_range(1, 512, 512),
            Err(Error::OutOfRange { offset: 1, .. })
        ));
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
