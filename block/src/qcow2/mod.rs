//! qcow2 images (versions 2 and 3).
//!
//! Supported: reads and writes of standard clusters, zero clusters (v3), deflate-compressed
//! clusters (read, and rewritten uncompressed on write), backing files (raw or qcow2, named
//! relative to the image, chains up to [`MAX_BACKING_DEPTH`]), cluster allocation with new
//! refcount blocks and refcount table growth, refcount widths of 1 to 64 bits, discard and
//! write-zeroes (zero flag on v3, deallocation on v2 without a backing file, zeros written
//! otherwise). Images with internal snapshots, or marked dirty or corrupt, open read-only
//! only (a dirty image's refcounts may be stale: repair it with `qemu-img check -r all`).
//! Autoclear features (bitmaps) are cleared on a read-write open, as QEMU does for features
//! it does not maintain.
//!
//! Refused at open: encryption, external data files, extended L2 entries, unknown
//! incompatible features, unsupported backing formats. Refused per request
//! ([`Error::Compressed`]): zstd-compressed clusters.
//!
//! `O_DIRECT` (`direct=on`): every metadata read and write goes through buffers, offsets and
//! lengths aligned to the file's `O_DIRECT` alignment (`crate::direct`; a partial block of
//! metadata is read, patched and written whole, under the metadata lock), guest data goes
//! straight to guest memory when its buffers are aligned and through an aligned bounce buffer
//! otherwise, and requests whose disk range is unaligned are refused ([`Error::Unaligned`]).
//! Images whose clusters are smaller than the alignment are refused at open. Backing files
//! stay buffered.
//!
//! Metadata caching: refcounts are written through, L2 tables and L1 entries are written back
//! at [`Qcow2::flush`] (see `meta.rs` for the ordering). **Call `flush` before dropping a
//! writable image**: updates since the last flush are otherwise lost (the image stays
//! consistent; `qemu-img check` may report leaked clusters). Run request futures to
//! completion: one dropped in the middle of an allocation may leak clusters.
//!
//! Concurrency: one async lock guards the metadata. Lookups and allocating writes
//! (copy-on-write of the untouched part of the cluster included) run under it, so two
//! requests never allocate the same cluster twice and no one sees a half-written cluster;
//! data I/O to clusters already allocated runs outside it, concurrently. Clusters freed by
//! discard are reused only after a flush and while no data I/O is in flight.

mod header;
mod inflate;
mod meta;
mod table;

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use futures::lock::Mutex;
use memory::{GuestAddress, GuestMemory};

pub(crate) use header::MAGIC;
use header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR};
use meta::Meta;
use table::L2Entry;

use crate::direct::{direct_alignment, read_file, write_file, ImageFd};
use crate::file::{
    check_range, check_request, file_size, image_dir, open_backing_file, Format, Layer,
    MAX_BACKING_DEPTH,
};
use crate::io::{copy_from_guest, copy_to_guest, sub_bufs, Bufs, GuestIoError};
use crate::{Error, Result};

/// What a qcow2 image reads through to where it has no data of its own: its backing file, a
/// disk of either format (`crate::Disk`). A trait, so that this module does not import the
/// one that composes the formats.
pub trait Backing: Sized {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads into guest memory.
    fn read(
        &self,
        offset: u64,
        bufs: &[(GuestAddress, usize)],
        mem: &GuestMemory,
    ) -> impl std::future::Future<Output = Result<()>>;
    /// Reads into a new buffer; past the end reads zeros.
    fn read_vec(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = Result<Vec<u8>>>;
    /// Opens `file` (named `path`, already checked to be an allowed backing file) as the
    /// layer `layer` describes.
    fn open(file: std::fs::File, path: &Path, layer: &Layer<'_>) -> Result<Self>;
}

/// A qcow2 image whose backing files are `B`s.
pub struct Qcow2<B> {
    fd: ImageFd,
    /// 512, or the `O_DIRECT` alignment.
    block_size: u32,
    size: u64,
    cluster_bits: u32,
    v3: bool,
    /// Compressed clusters use zstd (not supported) rather than deflate.
    zstd: bool,
    read_only: bool,
    backing: Option<Box<B>>,
    meta: Mutex<Meta>,
    /// Requests doing data I/O outside the lock (freed clusters are not reused meanwhile).
    inflight: Cell<usize>,
    /// Write metadata back before a write that changed it completes (see
    /// [`Qcow2::set_metadata_write_through`]).
    write_through: bool,
}

impl<B: fmt::Debug> fmt::Debug for Qcow2<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.size)
            .field("cluster_bits", &self.cluster_bits)
            .field("read_only", &self.read_only)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// Where a piece of a read comes from.
enum Source {
    /// Host file offset.
    Host(u64),
    /// A compressed cluster, read from `in_off` into it.
    Compressed {
        offset: u64,
        size: u64,
        in_off: u64,
    },
    Zero,
    Backing,
}

/// A piece of a request: `len` bytes at request offset `at`.
struct Piece {
    at: u64,
    len: u64,
    src: Source,
}

/// Data for an allocating write.
#[derive(Clone, Copy)]
enum Data<'a> {
    Guest(&'a Bufs, &'a GuestMemory),
    Zeros,
}

/// Counts a request's data I/O in flight until dropped.
struct InFlight<'a>(&'a Cell<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn guest_err(at: u64, write: bool) -> impl Fn(GuestIoError) -> Error {
    move |e| match e {
        GuestIoError::Memory(e) => Error::GuestMemory(e),
        GuestIoError::Io(e) if write => Error::Write(at, e),
        GuestIoError::Io(e) => Error::Read(at, e),
    }
}

impl<B: Backing> Qcow2<B> {
    pub(crate) fn from_file(file: File, path: &Path, layer: &Layer<'_>) -> Result<Qcow2<B>> {
        let file_len = file_size(&file)?;
        let block_size = if layer.direct {
            direct_alignment(&file)
        } else {
            512
        };
        // The alignment of metadata I/O: none for a buffered file.
        let align = if layer.direct {
            u64::from(block_size)
        } else {
            1
        };
        let first = read_file(&file, align, 0, file_len.min(1 << 21) as usize)?;
        let h = Header::parse(&first, file_len)?;
        if layer.direct && h.cluster_size() < u64::from(block_size) {
            // A cluster smaller than a block: data and metadata would share blocks, which
            // O_DIRECT can only write whole.
            return Err(Error::DirectClusterSize {
                cluster_size: h.cluster_size(),
                block_size,
            });
        }
        if !layer.read_only {
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::MarkedCorrupt);
            }
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(Error::Dirty);
            }
            if h.nb_snapshots > 0 {
                return Err(Error::InternalSnapshots);
            }
        }
        let cs = h.cluster_size();
        let l1_len = h.l1_size as usize * 8;
        let l1 = read_file(&file, align, h.l1_table_offset, l1_len)?;
        if l1.len() != l1_len {
            return Err(Error::InvalidHeader("l1 table beyond the end of the file"));
        }
        let rt_len = (u64::from(h.refcount_table_clusters) * cs) as usize;
        let rt = read_file(&file, align, h.refcount_table_offset, rt_len)?;
        if rt.len() != rt_len {
            return Err(Error::InvalidHeader(
                "refcount table beyond the end of the file",
            ));
        }
        if !layer.read_only && h.autoclear != 0 {
            // Features this implementation does not maintain (bitmaps) become invalid.
            write_file(&file, align, OFF_AUTOCLEAR, &[0u8; 8])?;
        }
        let backing = match &h.backing_file {
            None => None,
            Some(name) => {
                let name = Path::new(std::ffi::OsStr::from_bytes(name));
                if layer.format.is_none() {
                    return Err(Error::ProbedBacking(name.to_owned()));
                }
                if layer.depth >= MAX_BACKING_DEPTH {
                    return Err(Error::BackingTooDeep);
                }
                let bpath = image_dir(path).join(name);
                let d =
                    open_backing(&bpath, h.backing_format.as_deref(), layer).map_err(
                        |e| match e {
                            Error::BackingTooDeep => Error::BackingTooDeep,
                            e => Error::Backing(bpath.clone(), Box::new(e)),
                        },
                    )?;
                Some(Box::new(d))
            }
        };
        Ok(Qcow2 {
            meta: Mutex::new(Meta::new(&h, &l1, &rt, file_len)),
            fd: ImageFd::new(file, layer.direct, block_size),
            block_size,
            size: h.size,
            cluster_bits: h.cluster_bits,
            v3: h.version == 3,
            zstd: h.compression_type != 0,
            read_only: layer.read_only,
            backing,
            inflight: Cell::new(0),
            write_through: false,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether requests that change the disk are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// 512, or the alignment `O_DIRECT` requests need.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn in_flight(&self) -> InFlight<'_> {
        self.inflight.set(self.inflight.get() + 1);
        InFlight(&self.inflight)
    }

    /// Splits `offset..offset + len` at cluster boundaries: (request offset, length).
    fn clusters(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let cs = self.cs();
        let mut at = 0u64;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let n = (cs - ((offset + at) & (cs - 1))).min(len - at);
            let item = (at, n);
            at += n;
            Some(item)
        })
    }

    /// The contents of the compressed cluster at guest offset `voff`, whose `size` bytes of
    /// deflate data start at host byte `offset`.
    async fn decompress(&self, voff: u64, offset: u64, size: u64) -> Result<Vec<u8>> {
        if self.zstd {
            return Err(Error::Compressed(voff));
        }
        let input = self
            .fd
            .read_vec(offset, size as usize)
            .await
            .map_err(|e| Error::Read(offset, e))?;
        let mut out = vec![0u8; self.cs() as usize];
        inflate::inflate(&input, &mut out).map_err(|_| Error::Corrupt {
            what: "compressed cluster does not decompress",
            offset,
        })?;
        Ok(out)
    }

    /// Maps a read of `offset..offset + len`, merging host-contiguous pieces.
    async fn map_read(&self, offset: u64, len: u64) -> Result<(Vec<Piece>, InFlight<'_>)> {
        let mut m = self.meta.lock().await;
        let mut pieces: Vec<Piece> = Vec::new();
        let cs = self.cs();
        for (at, n) in self.clusters(offset, len) {
            let voff = offset + at;
            let src = match m.entry(&self.fd, voff >> self.cluster_bits).await? {
                L2Entry::Normal { offset: h, .. } => Source::Host(h + (voff & (cs - 1))),
                L2Entry::Zero { .. } => Source::Zero,
                L2Entry::Unallocated if self.backing.is_some() => Source::Backing,
                L2Entry::Unallocated => Source::Zero,
                L2Entry::Compressed { offset, size } => Source::Compressed {
                    offset,
                    size,
                    in_off: voff & (cs - 1),
                },
            };
            if let Some(last) = pieces.last_mut() {
                let merge = match (&last.src, &src) {
                    (Source::Host(a), Source::Host(b)) => a + last.len == *b,
                    (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                    _ => false,
                };
                if merge {
                    last.len += n;
                    continue;
                }
            }
            pieces.push(Piece { at, len: n, src });
        }
        Ok((pieces, self.in_flight()))
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
        mem.iovecs(bufs).map_err(Error::GuestMemory)?;
        let (pieces, _inflight) = self.map_read(offset, len).await?;
        for p in pieces {
            let sub = sub_bufs(bufs, p.at, p.len);
            let voff = offset + p.at;
            match p.src {
                Source::Host(h) => self
                    .fd
                    .read_guest(h, &sub, mem)
                    .await
                    .map_err(guest_err(h, false))?,
                Source::Zero => zero_guest(&sub, mem)?,
                Source::Compressed {
                    offset: c,
                    size,
                    in_off,
                } => {
                    let data = self.decompress(voff, c, size).await?;
                    let range = in_off as usize..(in_off + p.len) as usize;
                    copy_to_guest(mem, &sub, &data[range]).map_err(Error::GuestMemory)?;
                }
                Source::Backing => {
                    let Some(b) = &self.backing else {
                        return Err(Error::Corrupt {
                            what: "backing read without a backing file",
                            offset: voff,
                        });
                    };
                    let avail = b.size().saturating_sub(voff).min(p.len);
                    if avail > 0 {
                        Box::pin(b.read(voff, &sub_bufs(&sub, 0, avail), mem)).await?;
                    }
                    zero_guest(&sub_bufs(&sub, avail, p.len - avail), mem)?;
                }
            }
        }
        Ok(())
    }

    /// Reads into a new buffer (copy-on-write from a backing chain); past the end of the disk
    /// reads zeros.
    pub(crate) async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let avail = self.size.saturating_sub(offset).min(len as u64);
        let (pieces, _inflight) = self.map_read(offset, avail).await?;
        for p in pieces {
            let range = p.at as usize..(p.at + p.len) as usize;
            let voff = offset + p.at;
            match p.src {
                Source::Host(h) => {
                    let data = self
                        .fd
                        .read_vec(h, p.len as usize)
                        .await
                        .map_err(|e| Error::Read(h, e))?;
                    out[range].copy_from_slice(&data);
                }
                Source::Zero => {}
                Source::Compressed {
                    offset: c,
                    size,
                    in_off,
                } => {
                    let data = self.decompress(voff, c, size).await?;
                    out[range].copy_from_slice(&data[in_off as usize..(in_off + p.len) as usize]);
                }
                Source::Backing => {
                    if let Some(b) = &self.backing {
                        let data = b.read_vec(voff, p.len as usize).await?;
                        out[range].copy_from_slice(&data);
                    }
                }
            }
        }
        Ok(out)
    }

    /// With `on`, a write or write-zeroes that changed the L2 tables or the L1 table writes
    /// them back (after an fdatasync, as a flush does) before it completes, instead of at the
    /// next flush: a completed write then survives the death of the process (a device process
    /// that is restarted), not only a flush. Each allocation costs an fdatasync.
    pub fn set_metadata_write_through(&mut self, on: bool) {
        self.write_through = on;
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
        mem.iovecs(bufs).map_err(Error::GuestMemory)?;
        let cs = self.cs();
        let mut m = self.meta.lock().await;
        // In-place pieces (request offset, host offset, length), host-contiguous merged.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for (at, n) in self.clusters(offset, len) {
            let voff = offset + at;
            match m.entry(&self.fd, voff >> self.cluster_bits).await? {
                L2Entry::Normal {
                    offset: h,
                    copied: true,
                } => {
                    let h = h + (voff & (cs - 1));
                    match runs.last_mut() {
                        Some(r) if r.1 + r.2 == h && r.0 + r.2 == at => r.2 += n,
                        _ => runs.push((at, h, n)),
                    }
                }
                _ => {
                    let sub = sub_bufs(bufs, at, n);
                    self.allocating_write(&mut m, voff, n, Data::Guest(&sub, mem))
                        .await?;
                }
            }
        }
        if self.write_through {
            m.write_back(&self.fd).await?;
        }
        let _inflight = self.in_flight();
        drop(m);
        for (at, h, n) in runs {
            self.fd
                .write_guest(h, &sub_bufs(bufs, at, n), mem)
                .await
                .map_err(guest_err(h, true))?;
        }
        Ok(())
    }

    /// Writes `len` bytes at `voff` (inside one cluster) to a cluster that cannot be written
    /// in place: allocates one (or takes the zero cluster's preallocated one), fills the rest
    /// of it from the old contents (backing file, zeros, or the shared cluster), then points
    /// the L2 entry at it. Runs under the metadata lock.
    async fn allocating_write(
        &self,
        m: &mut Meta,
        voff: u64,
        len: u64,
        data: Data<'_>,
    ) -> Result<()> {
        let cs = self.cs();
        let vc = voff >> self.cluster_bits;
        let in_off = voff & (cs - 1);
        let old = m.entry(&self.fd, vc).await?;
        // The whole new cluster, for a partial write: built before allocating, so a cluster
        // whose old contents cannot be read is not leaked.
        let cow = if in_off > 0 || len < cs {
            let cstart = vc << self.cluster_bits;
            let mut cluster = match old {
                L2Entry::Normal { offset, .. } => self
                    .fd
                    .read_vec(offset, cs as usize)
                    .await
                    .map_err(|e| Error::Read(offset, e))?,
                L2Entry::Compressed { offset, size } => self.decompress(voff, offset, size).await?,
                L2Entry::Unallocated => match &self.backing {
                    Some(b) => b.read_vec(cstart, cs as usize).await?,
                    None => vec![0u8; cs as usize],
                },
                L2Entry::Zero { .. } => vec![0u8; cs as usize],
            };
            let part = &mut cluster[in_off as usize..(in_off + len) as usize];
            match data {
                Data::Guest(bufs, mem) => {
                    copy_from_guest(mem, bufs, part).map_err(Error::GuestMemory)?
                }
                Data::Zeros => part.fill(0),
            }
            Some(cluster)
        } else {
            None
        };
        let target = match old {
            L2Entry::Zero { alloc: Some(o) }
            | L2Entry::Normal {
                offset: o,
                copied: true,
            } => o,
            L2Entry::Normal { copied: false, .. }
            | L2Entry::Compressed { .. }
            | L2Entry::Zero { alloc: None }
            | L2Entry::Unallocated => {
                let may_reuse = self.inflight.get() == 0;
                m.alloc_cluster(&self.fd, may_reuse).await?
            }
        };
        if let Some(cluster) = cow {
            self.fd
                .write_vec(target, cluster)
                .await
                .map_err(|e| Error::Write(target, e))?;
        } else {
            match data {
                Data::Guest(bufs, mem) => self
                    .fd
                    .write_guest(target, bufs, mem)
                    .await
                    .map_err(guest_err(target, true))?,
                Data::Zeros => self
                    .fd
                    .write_vec(target, vec![0u8; cs as usize])
                    .await
                    .map_err(|e| Error::Write(target, e))?,
            }
        }
        m.set_entry(
            &self.fd,
            vc,
            L2Entry::Normal {
                offset: target,
                copied: true,
            },
        )
        .await?;
        if target_differs(old, target) {
            release_old(m, old, self.cluster_bits);
        }
        Ok(())
    }

    /// Writes back the metadata caches, then fdatasync.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        m.flush(&self.fd).await
    }

    /// Zeroes `offset..offset + len`. Whole clusters: the zero flag (v3; with `unmap` the
    /// host cluster is freed, else kept preallocated) or deallocation (v2 without a backing
    /// file); v2 with a backing file, and partial clusters, get zeros written.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        self.fd.check_request(offset, len)?;
        let cs = self.cs();
        let mut m = self.meta.lock().await;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (at, n) in self.clusters(offset, len) {
            let voff = offset + at;
            let vc = voff >> self.cluster_bits;
            let old = m.entry(&self.fd, vc).await?;
            let reads_zero = match old {
                L2Entry::Zero { .. } => true,
                L2Entry::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if old == L2Entry::Unallocated && self.backing.is_none() {
                continue;
            }
            if n == cs && (self.v3 || self.backing.is_none()) {
                let new = match old {
                    _ if !self.v3 => L2Entry::Unallocated,
                    L2Entry::Normal {
                        offset,
                        copied: true,
                    } if !unmap => L2Entry::Zero {
                        alloc: Some(offset),
                    },
                    L2Entry::Zero { alloc: Some(o) } if !unmap => L2Entry::Zero { alloc: Some(o) },
                    _ => L2Entry::Zero { alloc: None },
                };
                if new == old {
                    continue;
                }
                let kept = match new {
                    L2Entry::Zero { alloc } => alloc,
                    _ => None,
                };
                m.set_entry(&self.fd, vc, new).await?;
                if kept.is_none() {
                    release_old(&mut m, old, self.cluster_bits);
                }
            } else if reads_zero {
                continue;
            } else if let L2Entry::Normal {
                offset: h,
                copied: true,
            } = old
            {
                runs.push((h + (voff & (cs - 1)), n));
            } else {
                self.allocating_write(&mut m, voff, n, Data::Zeros).await?;
            }
        }
        if self.write_through {
            m.write_back(&self.fd).await?;
        }
        let _inflight = self.in_flight();
        drop(m);
        for (h, n) in runs {
            self.fd
                .write_vec(h, vec![0u8; n as usize])
                .await
                .map_err(|e| Error::WriteZeroes(h, n, e))?;
        }
        Ok(())
    }
}

/// Whether an allocating write moved the cluster away from `old`'s host cluster.
fn target_differs(old: L2Entry, target: u64) -> bool {
    match old {
        L2Entry::Normal { offset, .. }
        | L2Entry::Zero {
            alloc: Some(offset),
        } => offset != target,
        _ => true,
    }
}

/// Drops the references `old` held: its host cluster, or every host cluster its compressed
/// data touches.
fn release_old(m: &mut Meta, old: L2Entry, cluster_bits: u32) {
    match old {
        L2Entry::Normal { offset, .. }
        | L2Entry::Zero {
            alloc: Some(offset),
        } => m.release(offset),
        L2Entry::Compressed { offset, size } => {
            let first = offset >> cluster_bits;
            let last = (offset + size.max(1) - 1) >> cluster_bits;
            for c in first..=last {
                m.release(c << cluster_bits);
            }
        }
        L2Entry::Zero { alloc: None } | L2Entry::Unallocated => {}
    }
}

fn zero_guest(bufs: &Bufs, mem: &GuestMemory) -> Result<()> {
    for &(addr, n) in bufs {
        mem.fill(addr, n, 0).map_err(Error::GuestMemory)?;
    }
    Ok(())
}

/// Opens the backing file of the image `overlay` describes: read-only, within the chain's
/// allowed directories, in the format the overlay names (probed when it names none).
fn open_backing<B: Backing>(path: &Path, format: Option<&str>, overlay: &Layer<'_>) -> Result<B> {
    let format = match format {
        None | Some("") => None,
        Some(f) => Some(
            f.parse::<Format>()
                .map_err(|_| Error::InvalidHeader("unsupported backing file format"))?,
        ),
    };
    let file = open_backing_file(path, overlay.allowed)?;
    // Buffered even under a direct overlay: a backing file is only read (O_DIRECT would buy
    // no durability), it is often shared by many overlays, which its page cache then serves
    // once, and any of its layouts (512-byte clusters, unaligned compressed data) stays
    // readable without a block-sized bounce for every small read.
    let layer = Layer {
        read_only: true,
        direct: false,
        format,
        depth: overlay.depth + 1,
        allowed: overlay.allowed,
    };
    B::open(file, path, &layer)
}
