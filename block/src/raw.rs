//! Raw images: disk offset = file offset.

use std::fs::File;
use std::io;

use executor::AlignedBuf;
use futures::lock::Mutex;
use memory::{GuestAddress, GuestMemory};

use crate::direct::{direct_alignment, ImageFd};
use crate::file::{check_range, check_request, file_size, Layer};
use crate::io::{copy_from_guest, sub_bufs, Bufs, GuestIoError};
use crate::qcow2::MAGIC;
use crate::{Error, Result};

/// Bytes of the qcow2 magic that probing looks at.
const SIGNATURE_LEN: u64 = 4;

/// Largest zero buffer written at once when the file system cannot zero a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// A raw image file or block device.
///
/// # The signature of a probed image
/// An image whose format was probed (not given) is opened as qcow2 next time if its first
/// bytes become the qcow2 magic, with a header, and a backing file, that the guest chose. So a
/// write that reaches those bytes goes through a device-owned copy: the part of it within the
/// first block is copied out of guest memory once, checked, and written from the copy (the
/// guest cannot change it between the check and the write; another vCPU may well try), and
/// such writes run one at a time (two of them cannot each pass with half of the magic). A
/// write that would make the magic fails with [`Error::RawSignature`]. An image opened with
/// its format given takes any bytes.
#[derive(Debug)]
pub struct Raw {
    fd: ImageFd,
    size: u64,
    read_only: bool,
    block_size: u32,
    direct: bool,
    /// The format was probed: the signature is guarded.
    probed: bool,
    /// Held by a write that reaches the signature, from its check to its completion.
    head: Mutex<()>,
}

impl Raw {
    pub(crate) fn from_file(file: File, layer: &Layer<'_>) -> Result<Raw> {
        let size = file_size(&file)?;
        let block_size = if layer.direct {
            direct_alignment(&file)
        } else {
            512
        };
        Ok(Raw {
            fd: ImageFd::new(file, layer.direct, block_size),
            size,
            read_only: layer.read_only,
            block_size,
            direct: layer.direct,
            probed: layer.format.is_none(),
            head: Mutex::new(()),
        })
    }

    /// Size in bytes (the file's size at open).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether requests that change the disk are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// 512, or the alignment `O_DIRECT` needs on the file.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Reads into guest memory.
    pub async fn read(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> Result<()> {
        let len = check_request(offset, bufs, self.size)?;
        self.fd.check_request(offset, len)?;
        self.fd
            .read_guest(offset, bufs, mem)
            .await
            .map_err(|e| match e {
                GuestIoError::Memory(e) => Error::GuestMemory(e),
                GuestIoError::Io(e) => Error::Read(offset, e),
            })
    }

    /// Writes from guest memory.
    pub async fn write(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> Result<()> {
        self.check_writable()?;
        let len = check_request(offset, bufs, self.size)?;
        self.fd.check_request(offset, len)?;
        if self.probed && offset < SIGNATURE_LEN && len > 0 {
            return self.write_head(offset, len, bufs, mem).await;
        }
        self.write_from_guest(offset, bufs, mem).await
    }

    async fn write_from_guest(&self, offset: u64, bufs: &Bufs, mem: &GuestMemory) -> Result<()> {
        self.fd
            .write_guest(offset, bufs, mem)
            .await
            .map_err(|e| match e {
                GuestIoError::Memory(e) => Error::GuestMemory(e),
                GuestIoError::Io(e) => Error::Write(offset, e),
            })
    }

    /// A write to a probed image that reaches its signature (see [`Raw`]): the part within the
    /// first block goes through a checked copy, the rest straight from guest memory.
    async fn write_head(
        &self,
        offset: u64,
        len: u64,
        bufs: &Bufs,
        mem: &GuestMemory,
    ) -> Result<()> {
        let _one_at_a_time = self.head.lock().await;
        // O_DIRECT requests are aligned: offset 0 and at least one whole block.
        let head = (u64::from(self.block_size) - offset).min(len);
        let mut copy = AlignedBuf::zeroed(head as usize, self.block_size as usize)
            .ok_or_else(|| Error::Write(offset, io::ErrorKind::OutOfMemory.into()))?;
        copy_from_guest(mem, bufs, copy.as_mut_slice()).map_err(Error::GuestMemory)?;
        // What the signature will be: the disk's bytes, where this write does not cover them
        // (they change only under the lock held here).
        let mut sig = if offset == 0 && head >= SIGNATURE_LEN {
            [0u8; SIGNATURE_LEN as usize]
        } else {
            let now = self.read_vec(0, SIGNATURE_LEN as usize).await?;
            let mut sig = [0u8; SIGNATURE_LEN as usize];
            sig.copy_from_slice(&now);
            sig
        };
        let at = offset as usize;
        let n = (SIGNATURE_LEN - offset).min(head) as usize;
        sig[at..at + n].copy_from_slice(&copy.as_slice()[..n]);
        if sig == MAGIC {
            return Err(Error::RawSignature);
        }
        let (res, copy) = self.fd.file().write_at(copy, offset).await;
        let done = res.map_err(|e| Error::Write(offset, e))? as u64;
        if done < head {
            // A short write: the rest of the copy (a buffered file; O_DIRECT writes whole
            // blocks or fail).
            let rest = copy.as_slice()[done as usize..].to_vec();
            self.fd
                .write_vec(offset + done, rest)
                .await
                .map_err(|e| Error::Write(offset + done, e))?;
        }
        if head < len {
            let rest = sub_bufs(bufs, head, len - head);
            self.write_from_guest(offset + head, &rest, mem).await?;
        }
        Ok(())
    }

    /// fdatasync.
    pub async fn flush(&self) -> Result<()> {
        self.fd.fdatasync().await.map_err(Error::Flush)
    }

    /// Punches a hole (falls back to writing zeros where the file system cannot).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true).await
    }

    /// Zeroes a range: `FALLOC_FL_PUNCH_HOLE` when `unmap`, else `FALLOC_FL_ZERO_RANGE`;
    /// where the file system supports neither, writes zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        self.fd.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let res = if unmap {
            self.fd.punch_hole(offset, len).await
        } else {
            self.fd.file().zero_range(offset, len).await
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) && !self.direct => {}
            Err(e) if unmap => return Err(Error::Discard(offset, len, e)),
            Err(e) => return Err(Error::WriteZeroes(offset, len, e)),
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.fd
                .write_vec(offset + done, vec![0u8; n as usize])
                .await
                .map_err(|e| Error::WriteZeroes(offset + done, n, e))?;
            done += n;
        }
        Ok(())
    }

    /// Reads into a new buffer; past the end of the disk reads zeros.
    pub(crate) async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let avail = self.size.saturating_sub(offset).min(len as u64) as usize;
        let mut out = self
            .fd
            .read_vec(offset, avail)
            .await
            .map_err(|e| Error::Read(offset, e))?;
        out.resize(len, 0);
        Ok(out)
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}
