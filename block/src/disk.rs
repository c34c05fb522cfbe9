//! [`Disk`]: an image of either format, opened by probing its first bytes.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use memory::{GuestAddress, GuestMemory};

use crate::io::{total_len, Bufs};
use crate::qcow2::{self, Qcow2};
use crate::raw::Raw;
use crate::{Error, Result};

/// How deep a chain of backing files may be (the image itself not counted); deeper chains,
/// and loops, fail to open with [`Error::BackingTooDeep`].
pub const MAX_BACKING_DEPTH: u32 = 16;

/// How to open a disk image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse every request that would change the image (and open the file `O_RDONLY`).
    pub read_only: bool,
    /// Open with `O_DIRECT` (raw images only: qcow2 refuses it with
    /// [`Error::DirectUnsupported`]). Requests whose offset, length or guest buffers are not
    /// multiples of [`Disk::block_size`] then fail with [`Error::Unaligned`]; nothing is
    /// bounced.
    pub direct: bool,
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
    /// Opens an image, read-only or read-write, buffered or `O_DIRECT`. The format is probed:
    /// a file that starts with `QFI\xfb` is qcow2, anything else raw. qcow2 metadata (header,
    /// L1 and refcount tables, backing files) is read here, synchronously.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Disk> {
        Disk::open_at_depth(path, options, 0)
    }

    pub(crate) fn open_at_depth(path: &Path, options: OpenOptions, depth: u32) -> Result<Disk> {
        let file = open_file(path, options)?;
        if probe_magic(&file)? == qcow2::MAGIC {
            if options.direct {
                return Err(Error::DirectUnsupported);
            }
            Ok(Disk::Qcow2(Qcow2::from_file(file, path, options, depth)?))
        } else {
            Ok(Disk::Raw(Raw::from_file(file, path, options)?))
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

fn open_file(path: &Path, options: OpenOptions) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!options.read_only);
    if options.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| Error::Open(path.to_owned(), e))
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
