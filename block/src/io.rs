//! Whole-range file I/O on the executor: loops over short transfers, guest buffer slicing.

use std::borrow::Cow;
use std::io;

use executor::AsyncFd;
use memory::{GuestAddress, GuestIoVecs, GuestMemory};

/// Most iovecs handed to one readv/writev (the kernel's UIO_MAXIOV is 1024).
const MAX_IOVECS: usize = 1024;

/// Guest buffers: `(address, length)` ranges, in order.
pub(crate) type Bufs = [(GuestAddress, usize)];

/// Total bytes of `bufs`, or `None` on overflow.
pub(crate) fn total_len(bufs: &Bufs) -> Option<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, &(_, n)| acc.checked_add(n as u64))
}

/// The bytes `skip..skip + len` of the concatenated `bufs`, as ranges.
pub(crate) fn sub_bufs(bufs: &Bufs, mut skip: u64, mut len: u64) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for &(addr, n) in bufs {
        if len == 0 {
            break;
        }
        let n = n as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(len);
        out.push((GuestAddress(addr.0.wrapping_add(skip)), take as usize));
        len -= take;
        skip = 0;
    }
    out
}

/// iovecs for the longest prefix of `ranges` that fits in `MAX_IOVECS` (at least one range).
fn iovecs(mem: &GuestMemory, ranges: &Bufs) -> memory::Result<GuestIoVecs> {
    let mut iov = GuestIoVecs::new(mem.clone());
    let mut bytes = 0usize;
    for &(addr, n) in ranges {
        let before = iov.len();
        iov.push(addr, n)?;
        if iov.len() > MAX_IOVECS && before > 0 {
            // This range goes in the next round.
            iov.truncate(bytes);
            break;
        }
        bytes += n;
        if iov.len() >= MAX_IOVECS {
            break;
        }
    }
    Ok(iov)
}

/// Errors of guest-memory I/O: the buffers or the file.
pub(crate) enum GuestIoError {
    Memory(memory::Error),
    Io(io::Error),
}

/// Reads `file[offset..]` into all of `bufs`; bytes past the end of the file read as zeros
/// (as QEMU's file driver does).
pub(crate) async fn read_guest(
    fd: &AsyncFd,
    offset: u64,
    bufs: &Bufs,
    mem: &GuestMemory,
) -> Result<(), GuestIoError> {
    transfer(fd, offset, bufs, mem, false).await
}

/// Writes all of `bufs` to the file at `offset`.
pub(crate) async fn write_guest(
    fd: &AsyncFd,
    offset: u64,
    bufs: &Bufs,
    mem: &GuestMemory,
) -> Result<(), GuestIoError> {
    transfer(fd, offset, bufs, mem, true).await
}

/// Reads into or writes from all of `bufs` at `offset`, going on after short transfers: a
/// read that meets the end of the file zeroes the rest, a write that moves nothing fails.
async fn transfer(
    fd: &AsyncFd,
    offset: u64,
    bufs: &Bufs,
    mem: &GuestMemory,
    write: bool,
) -> Result<(), GuestIoError> {
    let total = total_len(bufs).unwrap_or(u64::MAX);
    let mut done = 0u64;
    while done < total {
        // The usual request is one transfer of all its buffers, sliced by nothing.
        let rest = if done == 0 {
            Cow::Borrowed(bufs)
        } else {
            Cow::Owned(sub_bufs(bufs, done, total - done))
        };
        let iov = iovecs(mem, &rest).map_err(GuestIoError::Memory)?;
        let (res, _) = if write {
            fd.write_mem_at(iov, offset + done).await
        } else {
            fd.read_mem_at(iov, offset + done).await
        };
        match res {
            Ok(0) if write => return Err(GuestIoError::Io(io::ErrorKind::WriteZero.into())),
            Ok(0) => {
                for &(addr, n) in rest.iter() {
                    mem.fill(addr, n, 0).map_err(GuestIoError::Memory)?;
                }
                return Ok(());
            }
            Ok(n) => done += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(GuestIoError::Io(e)),
        }
    }
    Ok(())
}

/// Reads `len` bytes at `offset` into a new buffer; bytes past the end of the file are zeros.
pub(crate) async fn read_vec(fd: &AsyncFd, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let (res, buf) = fd
            .read_at(Vec::with_capacity(len - done), offset + done as u64)
            .await;
        match res {
            Ok(0) => break,
            Ok(n) => {
                out[done..done + n].copy_from_slice(&buf[..n]);
                done += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Writes all of `data` at `offset`.
pub(crate) async fn write_vec(fd: &AsyncFd, offset: u64, mut data: Vec<u8>) -> io::Result<()> {
    let mut at = offset;
    while !data.is_empty() {
        let (res, buf) = fd.write_at(data, at).await;
        data = buf;
        match res {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data.drain(..n);
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `data` into the guest `bufs` (which must hold at least `data.len()` bytes).
pub(crate) fn copy_to_guest(mem: &GuestMemory, bufs: &Bufs, data: &[u8]) -> memory::Result<()> {
    let mut done = 0usize;
    for &(addr, n) in bufs {
        let n = n.min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

/// Copies the guest `bufs` into `data` (which must be at most as long as they are).
pub(crate) fn copy_from_guest(
    mem: &GuestMemory,
    bufs: &Bufs,
    data: &mut [u8],
) -> memory::Result<()> {
    let mut done = 0usize;
    for &(addr, n) in bufs {
        let n = n.min(data.len() - done);
        mem.read_slice(&mut data[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sub_bufs_cuts_across_ranges() {
        let bufs = [(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 10)];
        assert_eq!(
            sub_bufs(&bufs, 5, 10),
            [(GuestAddress(0x1005), 5), (GuestAddress(0x2000), 5)]
        );
        assert_eq!(sub_bufs(&bufs, 10, 10), [(GuestAddress(0x2000), 10)]);
        assert!(sub_bufs(&bufs, 20, 5).is_empty());
    }

    fn temp_file(name: &str, contents: &[u8]) -> AsyncFd {
        let path = std::env::temp_dir().join(format!("block-io-{name}-{}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        AsyncFd::new(f.into())
    }

    #[test]
    fn reads_past_the_end_of_the_file_are_zeros() {
        let ex = executor::Executor::new().unwrap();
        let mem = GuestMemory::new_x86(1 << 20).unwrap();
        let fd = temp_file("eof", &[7u8; 100]);
        mem.fill(GuestAddress(0x1000), 300, 0xff).unwrap();
        let bufs = [(GuestAddress(0x1000), 50), (GuestAddress(0x1032), 250)];
        ex.run_until(read_guest(&fd, 0, &bufs, &mem)).ok().unwrap();
        let mut got = [0u8; 300];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert!(got[..100].iter().all(|&b| b == 7) && got[100..].iter().all(|&b| b == 0));
        let v = ex.run_until(read_vec(&fd, 90, 20)).unwrap();
        assert_eq!(
            v,
            [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn more_ranges_than_iov_max_are_split_into_rounds() {
        let ex = executor::Executor::new().unwrap();
        let mem = GuestMemory::new_x86(1 << 20).unwrap();
        let fd = temp_file("iov-max", &[]);
        // 1500 one-byte ranges, 2 bytes apart: 1500 iovecs.
        let bufs: Vec<_> = (0..1500u64)
            .map(|i| (GuestAddress(0x1000 + 2 * i), 1))
            .collect();
        for (i, &(a, _)) in bufs.iter().enumerate() {
            mem.write_slice(&[i as u8], a).unwrap();
        }
        ex.run_until(write_guest(&fd, 0, &bufs, &mem)).ok().unwrap();
        let v = ex.run_until(read_vec(&fd, 0, 1500)).unwrap();
        assert!(v.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    proptest! {
        #[test]
        fn sub_bufs_covers_exactly_the_asked_bytes(
            lens in proptest::collection::vec(0usize..100, 0..8),
            skip in 0u64..500,
            len in 0u64..500,
        ) {
            let bufs: Vec<_> = lens.iter().enumerate()
                .map(|(i, &n)| (GuestAddress(i as u64 * 0x1000), n)).collect();
            let total = total_len(&bufs).unwrap();
            let got = total_len(&sub_bufs(&bufs, skip, len)).unwrap();
            prop_assert_eq!(got, len.min(total.saturating_sub(skip)));
        }
    }
}
