//! One virtio-blk request (virtio 1.2 §5.2.6): parsed from a validated descriptor chain,
//! checked, executed against the [`Disk`], answered with a status byte.
//!
//! Everything in a request comes from the guest: a malformed one is an [`ExecuteError`] whose
//! [`status`](ExecuteError::status) goes back in the status byte, never a panic, and a refused
//! request never reaches the disk.

use memory::{GuestAddress, GuestMemory};
use virtio::{Buffer, DescriptorChain};

use crate::Disk;

/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_BLK_T_IN`: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: the device id string, up to [`ID_LEN`] bytes.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// The length of the `GET_ID` string.
pub const ID_LEN: usize = 20;
/// The size of the request header (type, reserved, sector).
pub const HEADER_SIZE: usize = 16;
/// The size of one discard / write-zeroes segment (sector, num_sectors, flags).
pub const SEGMENT_SIZE: usize = 16;
/// The unmap flag of a write-zeroes segment.
pub const SEGMENT_F_UNMAP: u32 = 1;
/// Segments one discard or write-zeroes request may carry (`max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_SEGMENTS: usize = 1;
/// Sectors one discard or write-zeroes segment may cover (`max_discard_sectors`,
/// `max_write_zeroes_sectors`).
pub const MAX_SEGMENT_SECTORS: u32 = u32::MAX;

/// Why a request fails; each maps to the status byte the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The readable buffers end before the 16-byte header does.
    #[error("the request header is {0} bytes, 16 needed")]
    ShortHeader(usize),
    /// Reading the header or a segment from guest memory failed.
    #[error("failed to read the request from guest memory")]
    ReadRequest(#[source] virtio::Error),
    /// Writing the id or the status to guest memory failed.
    #[error("failed to write to guest memory")]
    WriteGuest(#[source] memory::Error),
    /// A request type the device does not know.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A data length that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// A range that ends beyond the disk's capacity or overflows.
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A request that would change a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A discard / write-zeroes payload that is empty, not whole segments, or more segments
    /// than [`MAX_SEGMENTS`].
    #[error("discard / write-zeroes payload of {0} bytes is not 1 to {MAX_SEGMENTS} segments")]
    BadSegments(usize),
    /// A segment with undefined flag bits, or the unmap flag on a discard.
    #[error("segment flags {0:#x} are not supported")]
    SegmentFlags(u32),
    /// The disk failed the request.
    #[error("disk request failed")]
    Disk(#[source] crate::Error),
}

impl ExecuteError {
    /// The virtio-blk status byte for the failure.
    pub fn status(&self) -> u8 {
        match self {
            ExecuteError::Unsupported(_) | ExecuteError::SegmentFlags(_) => VIRTIO_BLK_S_UNSUPP,
            ExecuteError::ShortHeader(_)
            | ExecuteError::ReadRequest(_)
            | ExecuteError::WriteGuest(_)
            | ExecuteError::UnalignedLength(_)
            | ExecuteError::OutOfRange { .. }
            | ExecuteError::ReadOnly
            | ExecuteError::BadSegments(_)
            | ExecuteError::Disk(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What the device knows that a request is checked against.
#[derive(Debug)]
pub(crate) struct Limits<'a> {
    /// Capacity in sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// The `GET_ID` string, zero-padded.
    pub id: &'a [u8; ID_LEN],
}

/// A chain taken apart: header bytes, data buffers, and where the status byte goes.
#[derive(Debug)]
pub(crate) struct Parts {
    /// The readable bytes after the header.
    pub readable: Vec<(GuestAddress, usize)>,
    /// The writable bytes before the status byte.
    pub writable: Vec<(GuestAddress, usize)>,
    /// The last writable byte.
    pub status: GuestAddress,
}

impl Parts {
    /// Splits `chain`: `None` when it has no writable byte for the status.
    pub fn new(chain: &DescriptorChain) -> Option<Parts> {
        let (last, data) = chain.writable().split_last()?;
        // Validated buffers are non-empty and inside guest memory: `len - 1` cannot wrap.
        let status = last.addr.wrapping_add(u64::from(last.len) - 1);
        let mut writable: Vec<_> = data.iter().map(range).collect();
        if last.len > 1 {
            writable.push((last.addr, last.len as usize - 1));
        }
        Some(Parts {
            readable: skip(chain.readable(), HEADER_SIZE),
            writable,
            status,
        })
    }
}

fn range(b: &Buffer) -> (GuestAddress, usize) {
    (b.addr, b.len as usize)
}

/// The bytes of `bufs` after the first `n`.
fn skip(bufs: &[Buffer], mut n: usize) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        let len = b.len as usize;
        if n >= len {
            n -= len;
            continue;
        }
        out.push((b.addr.wrapping_add(n as u64), len - n));
        n = 0;
    }
    out
}

/// Total bytes of `bufs` (each below 4 GiB, a chain at most 4 GiB: no overflow in u64).
fn total(bufs: &[(GuestAddress, usize)]) -> u64 {
    bufs.iter().map(|&(_, n)| n as u64).sum()
}

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u32,
    pub sector: u64,
}

impl Header {
    /// Reads the header from the first readable bytes of `chain` (it may span buffers).
    pub fn read(chain: &DescriptorChain, mem: &GuestMemory) -> Result<Header, ExecuteError> {
        let mut reader = chain.reader(mem);
        if reader.available_bytes() < HEADER_SIZE {
            return Err(ExecuteError::ShortHeader(reader.available_bytes()));
        }
        let mut bytes = [0u8; HEADER_SIZE];
        reader
            .read_exact_bytes(&mut bytes)
            .map_err(ExecuteError::ReadRequest)?;
        // type (le32), reserved (le32), sector (le64).
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&bytes[..4]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&bytes[8..]);
        Ok(Header {
            kind: u32::from_le_bytes(kind),
            sector: u64::from_le_bytes(sector),
        })
    }
}

/// Checks that `len` bytes at `sector` are whole sectors inside the disk; returns the byte
/// offset.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<u64, ExecuteError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ExecuteError::UnalignedLength(len));
    }
    let sectors = len / SECTOR_SIZE;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(ExecuteError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

fn read_segments(chain: &DescriptorChain, mem: &GuestMemory) -> Result<Vec<Segment>, ExecuteError> {
    let mut reader = chain.reader(mem);
    // Past the header, which `Header::read` checked is there.
    reader.consume(HEADER_SIZE);
    let len = reader.available_bytes();
    if len == 0 || !len.is_multiple_of(SEGMENT_SIZE) || len / SEGMENT_SIZE > MAX_SEGMENTS {
        return Err(ExecuteError::BadSegments(len));
    }
    let mut segments = Vec::with_capacity(len / SEGMENT_SIZE);
    for _ in 0..len / SEGMENT_SIZE {
        let mut b = [0u8; SEGMENT_SIZE];
        reader
            .read_exact_bytes(&mut b)
            .map_err(ExecuteError::ReadRequest)?;
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&b[..8]);
        let mut num = [0u8; 4];
        num.copy_from_slice(&b[8..12]);
        let mut flags = [0u8; 4];
        flags.copy_from_slice(&b[12..]);
        segments.push(Segment {
            sector: u64::from_le_bytes(sector),
            num_sectors: u32::from_le_bytes(num),
            flags: u32::from_le_bytes(flags),
        });
    }
    Ok(segments)
}

/// Executes the request of `chain`; returns the bytes written to the guest before the
/// status byte.
pub(crate) async fn execute(
    disk: &Disk,
    limits: &Limits<'_>,
    chain: &DescriptorChain,
    parts: &Parts,
    mem: &GuestMemory,
) -> Result<u32, ExecuteError> {
    let header = Header::read(chain, mem)?;
    match header.kind {
        VIRTIO_BLK_T_IN => {
            let len = total(&parts.writable);
            let offset = check_range(header.sector, len, limits.capacity)?;
            disk.read(offset, &parts.writable, mem)
                .await
                .map_err(ExecuteError::Disk)?;
            // At most the chain's 4 GiB.
            Ok(u32::try_from(len).unwrap_or(u32::MAX))
        }
        VIRTIO_BLK_T_OUT => {
            let len = total(&parts.readable);
            let offset = check_range(header.sector, len, limits.capacity)?;
            if limits.read_only {
                return Err(ExecuteError::ReadOnly);
            }
            disk.write(offset, &parts.readable, mem)
                .await
                .map_err(ExecuteError::Disk)?;
            Ok(0)
        }
        // Covers every write that completed (reached the used ring) before it: the guest
        // flushes only what it saw complete, and a completed write is in the disk's hands
        // (page cache, qcow2 metadata cache) that `Disk::flush` writes back and syncs.
        VIRTIO_BLK_T_FLUSH => {
            disk.flush().await.map_err(ExecuteError::Disk)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut done = 0usize;
            for &(addr, n) in &parts.writable {
                if done == ID_LEN {
                    break;
                }
                let take = n.min(ID_LEN - done);
                mem.write_slice(&limits.id[done..done + take], addr)
                    .map_err(ExecuteError::WriteGuest)?;
                done += take;
            }
            Ok(done as u32)
        }
        kind @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let segments = read_segments(chain, mem)?;
            // Every segment is checked before any reaches the disk.
            for s in &segments {
                let allowed = if discard { 0 } else { SEGMENT_F_UNMAP };
                if s.flags & !allowed != 0 {
                    return Err(ExecuteError::SegmentFlags(s.flags));
                }
                check_range(
                    s.sector,
                    u64::from(s.num_sectors) * SECTOR_SIZE,
                    limits.capacity,
                )?;
            }
            if limits.read_only {
                return Err(ExecuteError::ReadOnly);
            }
            for s in segments {
                let offset = s.sector * SECTOR_SIZE;
                let len = u64::from(s.num_sectors) * SECTOR_SIZE;
                let res = if discard {
                    disk.discard(offset, len).await
                } else {
                    disk.write_zeroes(offset, len, s.flags & SEGMENT_F_UNMAP != 0)
                        .await
                };
                res.map_err(ExecuteError::Disk)?;
            }
            Ok(0)
        }
        kind => Err(ExecuteError::Unsupported(kind)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_of_each_failure() {
        assert_eq!(ExecuteError::Unsupported(99).status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(ExecuteError::SegmentFlags(2).status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(ExecuteError::ReadOnly.status(), VIRTIO_BLK_S_IOERR);
        assert_eq!(ExecuteError::ShortHeader(3).status(), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            ExecuteError::UnalignedLength(100).status(),
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn ranges_must_be_whole_sectors_inside_the_capacity() {
        assert_eq!(check_range(0, 1024, 2).unwrap(), 0);
        assert_eq!(check_range(1, 512, 2).unwrap(), 512);
        assert_eq!(check_range(2, 0, 2).unwrap(), 1024);
        assert!(matches!(
            check_range(0, 511, 2),
            Err(ExecuteError::UnalignedLength(511))
        ));
        assert!(matches!(
            check_range(2, 512, 2),
            Err(ExecuteError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX, 512, u64::MAX),
            Err(ExecuteError::OutOfRange { .. })
        ));
    }

    #[test]
    fn skip_drops_the_header_across_buffers() {
        let b = |addr, len| Buffer {
            addr: GuestAddress(addr),
            len,
        };
        assert_eq!(
            skip(&[b(0x1000, 10), b(0x2000, 10), b(0x3000, 4)], 16),
            [(GuestAddress(0x2006), 4), (GuestAddress(0x3000), 4)]
        );
        assert_eq!(skip(&[b(0x1000, 16)], 16), []);
        assert_eq!(skip(&[b(0x1000, 8)], 16), []);
    }
}
