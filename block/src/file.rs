//! The files of a disk: formats, how one image of a chain is opened, where a backing file may
//! come from, and range checks. Shared by the formats (`raw`, `qcow2`) and `disk`, which
//! composes them; it imports none of them.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::io::{total_len, Bufs};
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

/// One image of a chain being opened.
pub struct Layer<'a> {
    pub(crate) read_only: bool,
    pub(crate) direct: bool,
    /// `None`: probed.
    pub(crate) format: Option<Format>,
    /// Backing files above this image (0 for the image given to [`Disk::open`]).
    pub(crate) depth: u32,
    /// Canonical directories the chain's backing files must be in.
    pub(crate) allowed: &'a [PathBuf],
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

pub(crate) fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File> {
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

pub(crate) fn canonical_dir(dir: &Path) -> Result<PathBuf> {
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

/// The logical block size of the device holding `file` (or of `file`, a block device), from
/// sysfs; `None` when unknown.
pub(crate) fn sysfs_block_size(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let base = format!("/sys/dev/block/{major}:{minor}");
    [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ]
    .into_iter()
    .find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|n| n.is_power_of_two() && (512..=65536).contains(n))
    })
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
