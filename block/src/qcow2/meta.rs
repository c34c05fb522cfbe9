//! qcow2 metadata state: the L1 and refcount tables, L2 and refcount block caches, cluster
//! allocation, refcount table growth and write-back.
//!
//! Ordering (what keeps the image consistent on a crash, with no dirty bit):
//! - refcount blocks and the refcount table are written through: a cluster's refcount is on
//!   disk before anything points to it;
//! - L2 tables and L1 entries are written back: at flush, or when a dirty L2 table is evicted,
//!   after an fdatasync that makes the data and refcounts they point to durable first; L1
//!   entries are written only after every dirty L2 table;
//! - clusters that lose their last reference (discard, rewrite of a shared cluster) have their
//!   refcount dropped only at flush, after the L2 tables that no longer point to them are
//!   durable; only then may they be reused.
//!
//! A crash thus loses the writes since the last flush and may leak clusters, never corrupts.

use std::collections::{BTreeSet, HashMap};

use super::header::{in_file, overlaps, Header, MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::table::{
    decode_l1, decode_l2, decode_reftable, encode_l2, get_refcount, max_refcount, set_refcount,
    L2Entry, COPIED,
};
use crate::direct::ImageFd;
use crate::{Error, Result};

/// Bytes of cached tables of each kind (L2, refcount blocks).
const CACHE_BYTES: u64 = 4 << 20;

/// What a checked pointer points to.
#[derive(Clone, Copy)]
enum Ptr {
    L2,
    Refblock,
    Data,
}

/// A small LRU cache of tables keyed by file offset.
struct Cache<T> {
    cap: usize,
    tick: u64,
    slots: HashMap<u64, Slot<T>>,
}

struct Slot<T> {
    data: T,
    dirty: bool,
    used: u64,
}

impl<T> Cache<T> {
    fn new(cap: usize) -> Cache<T> {
        Cache {
            cap,
            tick: 0,
            slots: HashMap::new(),
        }
    }

    fn get(&mut self, off: u64) -> Option<&mut Slot<T>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(&off)?;
        slot.used = tick;
        Some(slot)
    }

    /// The least recently used entry, if the cache is full.
    fn victim(&self) -> Option<u64> {
        if self.slots.len() < self.cap {
            return None;
        }
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(&off, _)| off)
    }

    fn insert(&mut self, off: u64, data: T, dirty: bool) {
        self.tick += 1;
        self.slots.insert(
            off,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
    }
}

/// Mutable metadata of an open image. Lives behind the image's allocation lock.
pub(crate) struct Meta {
    cluster_bits: u32,
    cs: u64,
    v3: bool,
    refcount_order: u32,
    /// Refcount entries per refcount block.
    rb_entries: u64,
    /// Entries per L2 table.
    l2_entries: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable: Vec<u64>,
    l2: Cache<Vec<u64>>,
    rb: Cache<Vec<u8>>,
    /// Bytes of the file that metadata may point into (the file's size, grown as clusters
    /// are allocated).
    file_len: u64,
    /// The next cluster to try when appending.
    next_free: u64,
    /// Clusters with refcount zero that may be reused.
    free: Vec<u64>,
    /// Clusters whose refcount drops by one at the next flush.
    pending_free: Vec<u64>,
}

fn corrupt(what: &'static str, offset: u64) -> Error {
    Error::Corrupt { what, offset }
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

fn u64s_be(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

impl Meta {
    /// State for an image with `header`, whose L1 and refcount tables are `l1_bytes` and
    /// `reftable_bytes`, in a file of `file_len` bytes.
    pub(crate) fn new(h: &Header, l1_bytes: &[u8], reftable_bytes: &[u8], file_len: u64) -> Meta {
        let cs = h.cluster_size();
        let cap = (CACHE_BYTES / cs).clamp(4, 512) as usize;
        Meta {
            cluster_bits: h.cluster_bits,
            cs,
            v3: h.version == 3,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            l2_entries: cs / 8,
            l1_offset: h.l1_table_offset,
            l1: be_u64s(l1_bytes),
            l1_dirty: BTreeSet::new(),
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: u64::from(h.refcount_table_clusters),
            reftable: be_u64s(reftable_bytes),
            l2: Cache::new(cap),
            rb: Cache::new(cap),
            file_len,
            next_free: file_len.div_ceil(cs) * cs,
            free: Vec::new(),
            pending_free: Vec::new(),
        }
    }

    /// Checks that a table or data cluster at `offset` lies inside the file and clear of the
    /// header, the L1 table, the refcount table and the cached tables of the other kinds
    /// (`Ptr`): a pointer into metadata would let data writes overwrite it.
    fn check_ptr(&self, offset: u64, kind: Ptr, what: &'static str) -> Result<()> {
        if offset < self.cs {
            return Err(corrupt(what, offset));
        }
        if !in_file(offset, self.cs, self.file_len.div_ceil(self.cs) * self.cs) {
            return Err(corrupt(what, offset));
        }
        let l1_len = self.l1.len() as u64 * 8;
        let rt_len = self.reftable_clusters * self.cs;
        if overlaps(offset, self.cs, self.l1_offset, l1_len)
            || overlaps(offset, self.cs, self.reftable_offset, rt_len)
        {
            return Err(corrupt(what, offset));
        }
        let is_l2 = self.l2.slots.contains_key(&offset);
        let is_rb = self.rb.slots.contains_key(&offset);
        let clash = match kind {
            Ptr::L2 => is_rb,
            Ptr::Refblock => is_l2,
            Ptr::Data => is_l2 || is_rb,
        };
        if clash {
            return Err(corrupt(what, offset));
        }
        Ok(())
    }

    // ---- L2 tables ----

    /// Makes room in the L2 cache, writing back a dirty victim (after an fdatasync, so what
    /// it points to is durable first).
    async fn evict_l2(&mut self, fd: &ImageFd) -> Result<()> {
        let Some(off) = self.l2.victim() else {
            return Ok(());
        };
        if self.l2.slots.get(&off).is_some_and(|s| s.dirty) {
            fd.fdatasync().await.map_err(Error::Flush)?;
            let bytes = u64s_be(&self.l2.slots[&off].data);
            fd.write_vec(off, bytes)
                .await
                .map_err(|e| Error::WriteMetadata(off, e))?;
        }
        self.l2.slots.remove(&off);
        Ok(())
    }

    /// The offset of the L2 table for L1 index `l1i`, loaded into the cache; allocated (as
    /// an all-unallocated table) when missing and `allocate`.
    async fn l2_table(&mut self, fd: &ImageFd, l1i: usize, allocate: bool) -> Result<Option<u64>> {
        let Some(&raw) = self.l1.get(l1i) else {
            return Err(corrupt("l1 index beyond the l1 table", l1i as u64));
        };
        let entry = decode_l1(raw, self.cluster_bits).map_err(|what| corrupt(what, raw))?;
        let off = match entry {
            Some((off, copied)) => {
                if allocate && !copied {
                    return Err(corrupt("l2 table shared but not copied", raw));
                }
                off
            }
            None if !allocate => return Ok(None),
            None => {
                let off = self.alloc_cluster(fd, true).await?;
                self.evict_l2(fd).await?;
                self.l2
                    .insert(off, vec![0u64; self.l2_entries as usize], true);
                self.l1[l1i] = off | COPIED;
                self.l1_dirty.insert(l1i);
                return Ok(Some(off));
            }
        };
        if self.l2.get(off).is_some() {
            return Ok(Some(off));
        }
        self.check_ptr(
            off,
            Ptr::L2,
            "l2 table outside the file or overlapping metadata",
        )?;
        self.evict_l2(fd).await?;
        let bytes = fd
            .read_vec(off, self.cs as usize)
            .await
            .map_err(|e| Error::ReadMetadata(off, e))?;
        self.l2.insert(off, be_u64s(&bytes), false);
        Ok(Some(off))
    }

    /// The L2 entry of virtual cluster `vc`, validated.
    pub(crate) async fn entry(&mut self, fd: &ImageFd, vc: u64) -> Result<L2Entry> {
        let l1i = (vc / self.l2_entries) as usize;
        let Some(table) = self.l2_table(fd, l1i, false).await? else {
            return Ok(L2Entry::Unallocated);
        };
        let raw = self
            .l2
            .get(table)
            .map(|s| s.data[(vc % self.l2_entries) as usize])
            .ok_or(corrupt("l2 table vanished from the cache", table))?;
        let e = decode_l2(raw, self.cluster_bits, self.v3).map_err(|what| corrupt(what, raw))?;
        match e {
            L2Entry::Normal { offset, .. }
            | L2Entry::Zero {
                alloc: Some(offset),
            } => self.check_ptr(
                offset,
                Ptr::Data,
                "data cluster outside the file or overlapping metadata",
            )?,
            L2Entry::Compressed { offset, size } => {
                let l1_len = self.l1.len() as u64 * 8;
                let rt_len = self.reftable_clusters * self.cs;
                if offset < self.cs
                    || offset >= self.file_len
                    || overlaps(offset, size, self.l1_offset, l1_len)
                    || overlaps(offset, size, self.reftable_offset, rt_len)
                {
                    return Err(corrupt(
                        "compressed data outside the file or overlapping metadata",
                        offset,
                    ));
                }
            }
            _ => {}
        }
        Ok(e)
    }

    /// Sets the L2 entry of virtual cluster `vc` (in the cache; written back later).
    pub(crate) async fn set_entry(&mut self, fd: &ImageFd, vc: u64, e: L2Entry) -> Result<()> {
        let l1i = (vc / self.l2_entries) as usize;
        let table = self
            .l2_table(fd, l1i, true)
            .await?
            .ok_or(corrupt("l2 table missing after allocation", vc))?;
        let slot = self
            .l2
            .get(table)
            .ok_or(corrupt("l2 table vanished from the cache", table))?;
        slot.data[(vc % self.l2_entries) as usize] = encode_l2(e);
        slot.dirty = true;
        Ok(())
    }

    /// Drops one reference to host cluster `offset` at the next flush.
    pub(crate) fn release(&mut self, offset: u64) {
        self.pending_free.push(offset);
    }

    // ---- refcounts ----

    /// The offset of refcount block `bi`, loaded into the cache (None: no block).
    async fn refblock(&mut self, fd: &ImageFd, bi: u64) -> Result<Option<u64>> {
        let Some(&raw) = self.reftable.get(bi as usize) else {
            return Ok(None);
        };
        let Some(off) = decode_reftable(raw, self.cluster_bits).map_err(|w| corrupt(w, raw))?
        else {
            return Ok(None);
        };
        if self.rb.get(off).is_some() {
            return Ok(Some(off));
        }
        self.check_ptr(
            off,
            Ptr::Refblock,
            "refcount block outside the file or overlapping metadata",
        )?;
        if let Some(victim) = self.rb.victim() {
            // Refcount blocks are written through: never dirty.
            self.rb.slots.remove(&victim);
        }
        let bytes = fd
            .read_vec(off, self.cs as usize)
            .await
            .map_err(|e| Error::ReadMetadata(off, e))?;
        self.rb.insert(off, bytes, false);
        Ok(Some(off))
    }

    /// The refcount of the host cluster at `offset`.
    pub(crate) async fn refcount(&mut self, fd: &ImageFd, offset: u64) -> Result<u64> {
        let ci = offset >> self.cluster_bits;
        let Some(block) = self.refblock(fd, ci / self.rb_entries).await? else {
            return Ok(0);
        };
        let order = self.refcount_order;
        let idx = (ci % self.rb_entries) as usize;
        self.rb
            .get(block)
            .map(|s| get_refcount(&s.data, idx, order))
            .ok_or(corrupt("refcount block vanished from the cache", block))
    }

    /// Sets the refcount of the host cluster at `offset`, whose refcount block exists, and
    /// writes the sector holding it.
    async fn set_refcount(&mut self, fd: &ImageFd, offset: u64, value: u64) -> Result<()> {
        let ci = offset >> self.cluster_bits;
        let block = self
            .refblock(fd, ci / self.rb_entries)
            .await?
            .ok_or(corrupt("refcount block missing", offset))?;
        let order = self.refcount_order;
        let idx = (ci % self.rb_entries) as usize;
        let slot = self
            .rb
            .get(block)
            .ok_or(corrupt("refcount block vanished from the cache", block))?;
        set_refcount(&mut slot.data, idx, order, value);
        // The 512-byte sector holding the entry, or the O_DIRECT block (no larger than a
        // cluster: the image was refused at open otherwise).
        let unit = (fd.align() as usize).max(512);
        let byte = (idx << order) / 8;
        let sector = byte / unit * unit;
        let bytes = slot.data[sector..sector + unit].to_vec();
        let at = block + sector as u64;
        fd.write_vec(at, bytes)
            .await
            .map_err(|e| Error::WriteMetadata(at, e))
    }

    /// Allocates a host cluster (refcount 1, on disk before this returns). `may_reuse`:
    /// clusters freed earlier may be handed out (no data I/O to a freed cluster can still be
    /// in flight).
    pub(crate) async fn alloc_cluster(&mut self, fd: &ImageFd, may_reuse: bool) -> Result<u64> {
        if may_reuse {
            while let Some(c) = self.free.pop() {
                if self.refcount(fd, c).await? == 0 {
                    self.set_refcount(fd, c, 1).await?;
                    return Ok(c);
                }
            }
        }
        loop {
            let c = self.next_free;
            let ci = c >> self.cluster_bits;
            let bi = ci / self.rb_entries;
            if bi >= self.reftable.len() as u64 {
                self.grow_reftable(fd).await?;
                continue;
            }
            if self.refblock(fd, bi).await?.is_none() {
                // A new refcount block, placed at the first free cluster, which it covers.
                let mut block = vec![0u8; self.cs as usize];
                set_refcount(
                    &mut block,
                    (ci % self.rb_entries) as usize,
                    self.refcount_order,
                    1,
                );
                fd.write_vec(c, block.clone())
                    .await
                    .map_err(|e| Error::WriteMetadata(c, e))?;
                self.advance(c);
                self.rb.insert(c, block, false);
                self.set_reftable_entry(fd, bi, c).await?;
                continue;
            }
            self.advance(c);
            if self.refcount(fd, c).await? != 0 {
                continue;
            }
            self.set_refcount(fd, c, 1).await?;
            return Ok(c);
        }
    }

    fn advance(&mut self, c: u64) {
        self.next_free = c + self.cs;
        self.file_len = self.file_len.max(self.next_free);
    }

    async fn set_reftable_entry(&mut self, fd: &ImageFd, bi: u64, block: u64) -> Result<()> {
        self.reftable[bi as usize] = block;
        let at = self.reftable_offset + bi * 8;
        fd.write_vec(at, block.to_be_bytes().to_vec())
            .await
            .map_err(|e| Error::WriteMetadata(at, e))
    }

    /// Moves the refcount table to a larger one at the end of the file (with refcount blocks
    /// for its own clusters), switches the header to it and frees the old one.
    async fn grow_reftable(&mut self, fd: &ImageFd) -> Result<()> {
        let cs = self.cs;
        let rbe = self.rb_entries;
        let start = self.next_free / cs;
        let mut entries = (self.reftable.len() as u64 * 2).max(cs / 8);
        let (clusters, end) = loop {
            let clusters = (entries * 8).div_ceil(cs);
            // Refcount blocks for the table's own clusters, and for those blocks.
            let blocks = clusters.div_ceil(rbe) + 2;
            let end = start + clusters + blocks;
            if end.div_ceil(rbe) <= entries {
                break (clusters, end);
            }
            entries *= 2;
        };
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::ImageFull("refcount table at its maximum size"));
        }
        let mut table = self.reftable.clone();
        table.resize((clusters * cs / 8) as usize, 0);
        let mut next = start + clusters;
        let mut new_blocks: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        let mut c = start;
        while c < next {
            let bi = c / rbe;
            let Some(&e) = table.get(bi as usize) else {
                return Err(Error::ImageFull(
                    "refcount table growth overran its estimate",
                ));
            };
            if e == 0 {
                table[bi as usize] = next * cs;
                new_blocks.insert(bi, (next * cs, vec![0u8; cs as usize]));
                next += 1;
            }
            c += 1;
        }
        if next > end {
            return Err(Error::ImageFull(
                "refcount table growth overran its estimate",
            ));
        }
        // Refcounts of the new clusters: in the new blocks, or through the existing ones.
        for c in start..next {
            let bi = c / rbe;
            let idx = (c % rbe) as usize;
            if let Some((_, block)) = new_blocks.get_mut(&bi) {
                set_refcount(block, idx, self.refcount_order, 1);
            } else {
                if self.refcount(fd, c * cs).await? != 0 {
                    return Err(corrupt(
                        "refcount of a cluster past the end of the image",
                        c * cs,
                    ));
                }
                self.set_refcount(fd, c * cs, 1).await?;
            }
        }
        for (off, block) in new_blocks.values() {
            fd.write_vec(*off, block.clone())
                .await
                .map_err(|e| Error::WriteMetadata(*off, e))?;
        }
        let table_off = start * cs;
        fd.write_vec(table_off, u64s_be(&table))
            .await
            .map_err(|e| Error::WriteMetadata(table_off, e))?;
        fd.fdatasync().await.map_err(Error::Flush)?;
        let mut hdr = table_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(clusters as u32).to_be_bytes());
        fd.write_vec(OFF_REFTABLE, hdr)
            .await
            .map_err(|e| Error::WriteMetadata(OFF_REFTABLE, e))?;
        fd.fdatasync().await.map_err(Error::Flush)?;

        let (old_off, old_clusters) = (self.reftable_offset, self.reftable_clusters);
        self.reftable = table;
        self.reftable_offset = table_off;
        self.reftable_clusters = clusters;
        for (off, block) in new_blocks.into_values() {
            self.rb.insert(off, block, false);
        }
        self.next_free = next * cs;
        self.file_len = self.file_len.max(self.next_free);
        for i in 0..old_clusters {
            let c = old_off + i * cs;
            self.set_refcount(fd, c, 0).await?;
            self.free.push(c);
        }
        Ok(())
    }

    /// Writes back dirty L2 tables, then dirty L1 entries, then syncs, then drops the
    /// references released since the last flush (clusters left unreferenced join the free
    /// list; `alloc_cluster` reuses them only when no data I/O is in flight).
    pub(crate) async fn flush(&mut self, fd: &ImageFd) -> Result<()> {
        self.write_back(fd).await?;
        fd.fdatasync().await.map_err(Error::Flush)?;
        let max = max_refcount(self.refcount_order);
        for c in std::mem::take(&mut self.pending_free) {
            let rc = self.refcount(fd, c).await?;
            if rc == 0 || rc > max {
                return Err(corrupt("freeing a cluster with refcount zero", c));
            }
            self.set_refcount(fd, c, rc - 1).await?;
            if rc == 1 {
                // Best effort: the cluster is free whether or not the hole is punched.
                let _ = fd.punch_hole(c, self.cs).await;
                self.free.push(c);
            }
        }
        Ok(())
    }

    /// Writes back dirty L2 tables, then dirty L1 entries, after an fdatasync that makes the
    /// data and refcounts they point to durable first; nothing when nothing is dirty.
    pub(crate) async fn write_back(&mut self, fd: &ImageFd) -> Result<()> {
        let dirty: Vec<u64> = self
            .l2
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        if !dirty.is_empty() || !self.l1_dirty.is_empty() {
            // Data and refcounts before the tables that point to them.
            fd.fdatasync().await.map_err(Error::Flush)?;
            for off in dirty {
                let bytes = u64s_be(&self.l2.slots[&off].data);
                fd.write_vec(off, bytes)
                    .await
                    .map_err(|e| Error::WriteMetadata(off, e))?;
                if let Some(s) = self.l2.slots.get_mut(&off) {
                    s.dirty = false;
                }
            }
            if let (Some(&first), Some(&last)) = (self.l1_dirty.first(), self.l1_dirty.last()) {
                let at = self.l1_offset + first as u64 * 8;
                fd.write_vec(at, u64s_be(&self.l1[first..=last]))
                    .await
                    .map_err(|e| Error::WriteMetadata(at, e))?;
                self.l1_dirty.clear();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_the_least_recently_used_table() {
        let mut c: Cache<u8> = Cache::new(2);
        c.insert(0x1000, 1, false);
        c.insert(0x2000, 2, true);
        assert_eq!(c.victim(), Some(0x1000));
        assert!(c.get(0x1000).is_some());
        assert_eq!(c.victim(), Some(0x2000), "a hit refreshes an entry");
        c.slots.remove(&0x2000);
        assert_eq!(c.victim(), None, "room left");
    }

    #[test]
    fn big_endian_tables_round_trip() {
        let words = [0x0102_0304_0506_0708u64, u64::MAX, 0];
        assert_eq!(be_u64s(&u64s_be(&words)), words);
        assert_eq!(u64s_be(&[1])[7], 1);
    }
}
