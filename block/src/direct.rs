//! File I/O at the alignment `O_DIRECT` needs.
//!
//! An [`ImageFd`] is an image file and the alignment its I/O must keep: 1 for a buffered file,
//! the kernel's `O_DIRECT` alignment ([`direct_alignment`]) for a direct one. Its byte-range
//! reads and writes of device-owned bytes (qcow2 metadata, copy-on-write clusters, compressed
//! clusters) cover whole aligned blocks through aligned buffers: a read reads the blocks
//! around the range, a write that does not start or end on a block boundary reads the edge
//! blocks first and writes them back whole (read-modify-write, so callers make sure nothing
//! else writes those blocks meanwhile: qcow2 does such writes under its metadata lock, on
//! metadata clusters only). Its guest-memory transfers, whose offset and length the caller has
//! checked to be aligned, go straight between the file and guest memory when every guest
//! buffer is aligned too, and through an aligned bounce buffer otherwise. Guest data is never
//! read-modify-written: two requests to one block would race.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use executor::{AlignedBuf, AsyncFd, IoVecs};
use memory::GuestMemory;

use crate::file::sysfs_block_size;
use crate::io::{copy_from_guest, copy_to_guest, read_guest, total_len, write_guest, Bufs};
use crate::io::{read_vec, write_vec, GuestIoError};
use crate::{Error, Result};

/// Alignment assumed when neither the kernel nor sysfs reports one.
const FALLBACK_ALIGN: u32 = 4096;

/// The alignment (of offsets, lengths and buffer addresses) that `O_DIRECT` I/O on `file`
/// needs: what `statx(STATX_DIOALIGN)` reports, else the logical block size of the device
/// holding the file (sysfs), else 4096. Always a power of two in 512..=65536.
pub(crate) fn direct_alignment(file: &File) -> u32 {
    executor::dio_alignment(file.as_fd())
        .map(|a| a.max(512))
        .filter(|a| a.is_power_of_two() && *a <= 65536)
        .or_else(|| sysfs_block_size(file))
        .unwrap_or(FALLBACK_ALIGN)
}

/// Checks that a request's offset and length are multiples of `block_size`.
fn check_aligned(offset: u64, len: u64, block_size: u32) -> Result<()> {
    let bs = u64::from(block_size);
    if offset.is_multiple_of(bs) && len.is_multiple_of(bs) {
        Ok(())
    } else {
        Err(Error::Unaligned {
            offset,
            len,
            block_size,
        })
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// `offset..offset + len` widened to whole blocks of `align`: (start, length).
fn widen(offset: u64, len: u64, align: u64) -> io::Result<(u64, usize)> {
    let start = offset / align * align;
    let end = offset
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(align))
        .ok_or_else(|| invalid("range overflows"))?;
    let n = usize::try_from(end - start).map_err(|_| invalid("range too large"))?;
    Ok((start, n))
}

fn aligned_buf(len: usize, align: u64) -> io::Result<AlignedBuf> {
    AlignedBuf::zeroed(len, align as usize).ok_or_else(|| io::ErrorKind::OutOfMemory.into())
}

/// An image file and the alignment its I/O keeps (see the module documentation).
#[derive(Debug)]
pub(crate) struct ImageFd {
    fd: AsyncFd,
    /// 1: buffered.
    align: u64,
}

impl ImageFd {
    /// `file`, opened with `O_DIRECT` when `direct`, I/O aligned to `align` then.
    pub(crate) fn new(file: File, direct: bool, align: u32) -> ImageFd {
        ImageFd {
            fd: AsyncFd::new(file.into()),
            align: if direct { u64::from(align) } else { 1 },
        }
    }

    /// The alignment kept: 1 for a buffered file.
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// With `O_DIRECT`, refuses requests whose disk range (offset or length) is not a
    /// multiple of the alignment; guest buffers need not be aligned (they are bounced).
    pub(crate) fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        if self.align == 1 {
            return Ok(());
        }
        check_aligned(offset, len, self.align as u32)
    }

    /// The descriptor, for operations of its own (unaligned only on a buffered file).
    pub(crate) fn file(&self) -> &AsyncFd {
        &self.fd
    }

    pub(crate) async fn fdatasync(&self) -> io::Result<()> {
        self.fd.fdatasync().await
    }

    /// Deallocates a range (aligned for `O_DIRECT`: qcow2 frees whole clusters only).
    pub(crate) async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fd.punch_hole(offset, len).await
    }

    /// Reads `len` bytes at `offset` into a new buffer; bytes past the end of the file are
    /// zeros.
    pub(crate) async fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.align == 1 {
            return read_vec(&self.fd, offset, len).await;
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let (start, n) = widen(offset, len as u64, self.align)?;
        let blocks = self.read_blocks(start, n).await?;
        let at = (offset - start) as usize;
        Ok(blocks.as_slice()[at..at + len].to_vec())
    }

    /// Writes all of `data` at `offset`, read-modify-writing partial edge blocks.
    pub(crate) async fn write_vec(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        if self.align == 1 {
            return write_vec(&self.fd, offset, data).await;
        }
        if data.is_empty() {
            return Ok(());
        }
        let a = self.align;
        let (start, n) = widen(offset, data.len() as u64, a)?;
        let mut blocks = aligned_buf(n, a)?;
        let at = (offset - start) as usize;
        let end = at + data.len();
        if at != 0 {
            let head = self.read_blocks(start, a as usize).await?;
            blocks.as_mut_slice()[..a as usize].copy_from_slice(head.as_slice());
        }
        if !end.is_multiple_of(a as usize) && (n > a as usize || at == 0) {
            let last = n - a as usize;
            let tail = self.read_blocks(start + last as u64, a as usize).await?;
            blocks.as_mut_slice()[last..].copy_from_slice(tail.as_slice());
        }
        blocks.as_mut_slice()[at..end].copy_from_slice(&data);
        self.write_blocks(start, blocks).await
    }

    /// Reads into all of the guest `bufs` from `offset` (aligned; the caller checked): straight
    /// into guest memory when its buffers are aligned too, else through a bounce buffer. Bytes
    /// past the end of the file read as zeros.
    pub(crate) async fn read_guest(
        &self,
        offset: u64,
        bufs: &Bufs,
        mem: &GuestMemory,
    ) -> std::result::Result<(), GuestIoError> {
        if self.goes_straight(bufs, mem)? {
            return read_guest(&self.fd, offset, bufs, mem).await;
        }
        let len = self.aligned_len(offset, bufs)?;
        let data = self
            .read_blocks(offset, len)
            .await
            .map_err(GuestIoError::Io)?;
        copy_to_guest(mem, bufs, data.as_slice()).map_err(GuestIoError::Memory)
    }

    /// Writes all of the guest `bufs` at `offset` (aligned; the caller checked): straight from
    /// guest memory when its buffers are aligned too, else from a bounce copy.
    pub(crate) async fn write_guest(
        &self,
        offset: u64,
        bufs: &Bufs,
        mem: &GuestMemory,
    ) -> std::result::Result<(), GuestIoError> {
        if self.goes_straight(bufs, mem)? {
            return write_guest(&self.fd, offset, bufs, mem).await;
        }
        let len = self.aligned_len(offset, bufs)?;
        let mut data = aligned_buf(len, self.align).map_err(GuestIoError::Io)?;
        copy_from_guest(mem, bufs, data.as_mut_slice()).map_err(GuestIoError::Memory)?;
        self.write_blocks(offset, data)
            .await
            .map_err(GuestIoError::Io)
    }

    /// Whether a transfer of `bufs` can go straight to guest memory: a buffered file, or every
    /// host range of the buffers starts and ends on the alignment.
    fn goes_straight(
        &self,
        bufs: &Bufs,
        mem: &GuestMemory,
    ) -> std::result::Result<bool, GuestIoError> {
        if self.align == 1 {
            return Ok(true);
        }
        let a = self.align as usize;
        let iov = mem.iovecs(bufs).map_err(GuestIoError::Memory)?;
        Ok(iov
            .iovecs()
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(a) && v.iov_len.is_multiple_of(a)))
    }

    /// The length of a bounced transfer: the buffers' total, which with `offset` must be
    /// aligned (guest data is never read-modify-written).
    fn aligned_len(&self, offset: u64, bufs: &Bufs) -> std::result::Result<usize, GuestIoError> {
        let bad = || GuestIoError::Io(invalid("unaligned O_DIRECT data transfer"));
        let len = total_len(bufs).ok_or_else(bad)?;
        if len == 0 || !offset.is_multiple_of(self.align) || !len.is_multiple_of(self.align) {
            return Err(bad());
        }
        usize::try_from(len).map_err(|_| bad())
    }

    /// Reads the `len` bytes (aligned) at `start` (aligned) into an aligned buffer; past the
    /// end of the file reads zeros.
    async fn read_blocks(&self, start: u64, len: usize) -> io::Result<AlignedBuf> {
        let a = self.align;
        let mut out = aligned_buf(len, a)?;
        let mut done = 0usize;
        while done < len {
            let res = if done == 0 {
                let (res, buf) = self.fd.read_at(out, start).await;
                out = buf;
                res
            } else {
                let (res, rest) = self
                    .fd
                    .read_at(aligned_buf(len - done, a)?, start + done as u64)
                    .await;
                if let Ok(n) = res {
                    out.as_mut_slice()[done..done + n].copy_from_slice(&rest.as_slice()[..n]);
                }
                res
            };
            match res {
                // A short read that is not a whole number of blocks met the end of the file
                // (another read would be unaligned).
                Ok(n) if n > 0 && (n as u64).is_multiple_of(a) => done += n,
                Ok(n) => {
                    out.as_mut_slice()[done + n..].fill(0);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Writes all of `blocks` (aligned length) at `start` (aligned).
    async fn write_blocks(&self, start: u64, mut blocks: AlignedBuf) -> io::Result<()> {
        let a = self.align;
        let len = blocks.as_slice().len();
        let mut done = 0usize;
        while done < len {
            let res = if done == 0 {
                let (res, buf) = self.fd.write_at(blocks, start).await;
                blocks = buf;
                res
            } else {
                let mut rest = aligned_buf(len - done, a)?;
                rest.as_mut_slice()
                    .copy_from_slice(&blocks.as_slice()[done..]);
                self.fd.write_at(rest, start + done as u64).await.0
            };
            match res {
                Ok(n) if n > 0 && (n as u64).is_multiple_of(a) => done += n,
                // Nothing, or part of a block: the rest cannot be written aligned.
                Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads up to `len` bytes at `offset` of `file` (synchronously, at open), through aligned
/// blocks when `align` > 1; shorter at the end of the file.
pub(crate) fn read_file(file: &File, align: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
    let err = |e| Error::ReadMetadata(offset, e);
    if len == 0 {
        return Ok(Vec::new());
    }
    let (start, n) = widen(offset, len as u64, align).map_err(err)?;
    let mut blocks = aligned_buf(n, align).map_err(err)?;
    let mut done = 0usize;
    while done < n {
        match file.read_at(&mut blocks.as_mut_slice()[done..], start + done as u64) {
            Ok(0) => break,
            Ok(k) => {
                done += k;
                if !(k as u64).is_multiple_of(align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    let at = (offset - start) as usize;
    let have = done.saturating_sub(at).min(len);
    Ok(blocks.as_slice()[at..at + have].to_vec())
}

/// Writes `data` at `offset` of `file` (synchronously, at open), read-modify-writing partial
/// edge blocks when `align` > 1.
pub(crate) fn write_file(file: &File, align: u64, offset: u64, data: &[u8]) -> Result<()> {
    let err = |e| Error::WriteMetadata(offset, e);
    let (start, n) = widen(offset, data.len() as u64, align).map_err(err)?;
    let mut blocks = aligned_buf(n, align).map_err(err)?;
    let at = (offset - start) as usize;
    if at != 0 || n != data.len() {
        let old = read_file(file, align, start, n)?;
        blocks.as_mut_slice()[..old.len()].copy_from_slice(&old);
    }
    blocks.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
    file.write_all_at(blocks.as_slice(), start).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::GuestAddress;
    use std::os::unix::fs::OpenOptionsExt;

    /// A temporary file of `len` bytes of `fill`, opened with `O_DIRECT` when `direct`.
    fn temp_file(name: &str, len: usize, fill: u8, direct: bool) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("block-direct-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![fill; len]).expect("create");
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        (o.open(&path).expect("open"), path)
    }

    #[test]
    fn widen_covers_whole_blocks_and_refuses_overflow() {
        assert_eq!(widen(4090, 20, 4096).unwrap(), (0, 8192));
        assert_eq!(widen(4096, 4096, 4096).unwrap(), (4096, 4096));
        assert_eq!(widen(5, 0, 512).unwrap(), (0, 512));
        assert!(widen(u64::MAX - 10, 20, 4096).is_err());
        assert!(
            widen(u64::MAX - 10, 5, 4096).is_err(),
            "end rounds past u64::MAX"
        );
    }

    /// Byte-range reads and writes at any offset, through blocks of 4 KiB and 64 KiB (larger
    /// than the 512 bytes O_DIRECT may need here, and as valid), read and write what a
    /// buffered file does; guest transfers bounce unaligned buffers.
    #[test]
    fn aligned_io_matches_buffered_io_at_any_offset() {
        let ex = executor::Executor::new().expect("executor");
        let mem = GuestMemory::new_x86(4 << 20).expect("memory");
        for align in [4096u32, 65536] {
            let len = 5 * align as usize + 100;
            let (file, path) = temp_file(&format!("rmw-{align}"), len, 0xee, true);
            let mut model = vec![0xeeu8; len];
            let fd = ImageFd::new(file, true, align);
            let a = u64::from(align);
            ex.run_until(async {
                // Inside one block, across a block boundary, whole blocks, past the end.
                for (i, (off, n)) in [
                    (100u64, 8usize),
                    (a - 6, 20),
                    (a, 2 * a as usize),
                    (4 * a + 50, a as usize + 200),
                ]
                .into_iter()
                .enumerate()
                {
                    let data = vec![i as u8 + 1; n];
                    fd.write_vec(off, data.clone()).await.expect("write");
                    let end = off as usize + n;
                    if end > model.len() {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                    let back = fd.read_vec(off - 3, n + 7).await.expect("read");
                    let mut want = model[off as usize - 3..].to_vec();
                    want.resize(n + 7, 0);
                    assert_eq!(back, want, "align {align}, write {i}");
                }
                // Guest transfers: aligned buffers go straight, unaligned ones bounce.
                for bufs in [
                    vec![(GuestAddress(0x10_0000), 2 * a as usize)],
                    vec![
                        (GuestAddress(0x10_0001), 100),
                        (GuestAddress(0x30_0003), 2 * a as usize - 100),
                    ],
                ] {
                    let data: Vec<u8> = (0..2 * a as usize).map(|i| (i % 253) as u8).collect();
                    copy_to_guest(&mem, &bufs, &data).expect("fill");
                    assert!(fd.write_guest(a, &bufs, &mem).await.is_ok());
                    model[a as usize..3 * a as usize].copy_from_slice(&data);
                    for &(addr, n) in &bufs {
                        mem.fill(addr, n, 0x77).expect("poison");
                    }
                    assert!(fd.read_guest(a, &bufs, &mem).await.is_ok());
                    let mut got = vec![0u8; data.len()];
                    copy_from_guest(&mem, &bufs, &mut got).expect("read back");
                    assert!(got == data, "align {align}: guest round trip");
                }
                // Guest data is never read-modify-written.
                let odd = [(GuestAddress(0x10_0001), 512)];
                assert!(matches!(
                    fd.write_guest(a + 512, &odd, &mem).await,
                    Err(GuestIoError::Io(_))
                ));
            });
            // A write past the end of the file leaves it a whole number of blocks long.
            let on_disk = std::fs::read(&path).expect("read file");
            model.resize(on_disk.len().max(model.len()), 0);
            assert!(
                on_disk == model,
                "align {align}: file differs from the model"
            );
            // The synchronous helpers used at open agree.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .expect("reopen");
            write_file(&file, a, 88, &[9u8; 8]).expect("write at open");
            model[88..96].fill(9);
            assert_eq!(
                read_file(&file, a, 80, 30).expect("read at open"),
                model[80..110]
            );
            let tail = read_file(&file, a, model.len() as u64 - 10, 100).expect("read at the end");
            assert_eq!(
                tail,
                model[model.len() - 10..],
                "short at the end of the file"
            );
            std::fs::remove_file(&path).expect("remove");
        }
    }
}
