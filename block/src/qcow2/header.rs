//! The qcow2 header: parsing and validation against the image file.

use crate::{Error, Result};

/// "QFI\xfb".
pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Bytes of a version 2 header; version 3 headers are at least `V3_LEN`.
pub(crate) const V2_LEN: usize = 72;
pub(crate) const V3_LEN: usize = 104;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = (1 << 5) - 1;

/// Largest L1 table QEMU creates or opens (32 MiB).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens (8 MiB).
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
const MAX_BACKING_NAME: u32 = 1023;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Byte offsets of the header fields the image writes back.
pub(crate) const OFF_REFTABLE: u64 = 48;
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// A validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<Vec<u8>>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Whether `a..a + alen` and `b..b + blen` overlap.
pub(crate) fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Whether `offset..offset + len` lies inside a file of `file_len` bytes.
pub(crate) fn in_file(offset: u64, len: u64, file_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= file_len)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses the header from `buf`, the image's first bytes (its first cluster, or the whole
    /// file if shorter), and checks it against a file of `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_LEN || buf[..4] != MAGIC {
            return Err(Error::InvalidHeader("truncated header"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::InvalidClusterBits(cluster_bits));
        }
        let cs = 1u64 << cluster_bits;
        let buf = &buf[..buf.len().min(cs as usize)];
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(Error::Encrypted(crypt_method));
        }
        let (incompatible, autoclear, refcount_order, header_length) = if version == 3 {
            if buf.len() < V3_LEN {
                return Err(Error::InvalidHeader("truncated header"));
            }
            (be64(buf, 72), be64(buf, 88), be32(buf, 96), be32(buf, 100))
        } else {
            (0, 0, 4, V2_LEN as u32)
        };
        if version == 3 {
            if (header_length as usize) < V3_LEN || header_length % 8 != 0 {
                return Err(Error::InvalidHeader("bad header length"));
            }
            if u64::from(header_length) > cs || header_length as usize > buf.len() {
                return Err(Error::InvalidHeader(
                    "header length beyond the first cluster",
                ));
            }
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(Error::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::ExternalDataFile);
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::ExtendedL2);
        }
        let compression_type = if header_length as usize > V3_LEN {
            buf[V3_LEN]
        } else {
            0
        };
        match (incompatible & INCOMPAT_COMPRESSION != 0, compression_type) {
            (false, 0) | (true, 1) => {}
            (true, 0) | (false, _) => {
                return Err(Error::InvalidHeader(
                    "compression type bit and field disagree",
                ))
            }
            (true, _) => return Err(Error::InvalidHeader("unknown compression type")),
        }
        if refcount_order > 6 {
            return Err(Error::UnsupportedRefcountOrder(refcount_order));
        }

        let size = be64(buf, 24);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        // One L1 entry maps cs / 8 clusters of cs bytes.
        let l1_span = cs * (cs / 8);
        if size > i64::MAX as u64 {
            return Err(Error::InvalidHeader("virtual size too large"));
        }
        let l1_needed = size.div_ceil(l1_span);
        if l1_needed * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidHeader("virtual size too large"));
        }
        if u64::from(l1_size) < l1_needed {
            return Err(Error::InvalidHeader(
                "l1 table too small for the virtual size",
            ));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidHeader("l1 table too large"));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_size > 0 {
            if !l1_table_offset.is_multiple_of(cs) {
                return Err(Error::InvalidHeader("l1 table offset unaligned"));
            }
            if l1_table_offset < cs {
                return Err(Error::InvalidHeader("l1 table overlaps the header"));
            }
            if !in_file(l1_table_offset, l1_bytes, file_len) {
                return Err(Error::InvalidHeader("l1 table beyond the end of the file"));
            }
        }

        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let rt_bytes = u64::from(refcount_table_clusters) * cs;
        if refcount_table_clusters == 0 {
            return Err(Error::InvalidHeader("empty refcount table"));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::InvalidHeader("refcount table too large"));
        }
        if !refcount_table_offset.is_multiple_of(cs) {
            return Err(Error::InvalidHeader("refcount table offset unaligned"));
        }
        if refcount_table_offset < cs {
            return Err(Error::InvalidHeader("refcount table overlaps the header"));
        }
        if !in_file(refcount_table_offset, rt_bytes, file_len) {
            return Err(Error::InvalidHeader(
                "refcount table beyond the end of the file",
            ));
        }
        if overlaps(l1_table_offset, l1_bytes, refcount_table_offset, rt_bytes) {
            return Err(Error::InvalidHeader("l1 table overlaps the refcount table"));
        }

        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);
        if nb_snapshots > 0
            && (!snapshots_offset.is_multiple_of(cs) || snapshots_offset >= file_len)
        {
            return Err(Error::InvalidHeader("snapshot table offset invalid"));
        }

        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let backing_file = if backing_file_offset == 0 {
            None
        } else {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(Error::InvalidHeader("bad backing file name length"));
            }
            let end = backing_file_offset.checked_add(u64::from(backing_file_size));
            match end {
                Some(end)
                    if backing_file_offset >= u64::from(header_length)
                        && end <= buf.len() as u64 =>
                {
                    Some(buf[backing_file_offset as usize..end as usize].to_vec())
                }
                _ => {
                    return Err(Error::InvalidHeader(
                        "backing file name outside the first cluster",
                    ))
                }
            }
        };

        // Header extensions: from the end of the header to the backing file name (or the end
        // of the first cluster).
        let ext_end = if backing_file_offset == 0 {
            buf.len()
        } else {
            backing_file_offset as usize
        };
        let backing_format = parse_extensions(&buf[..ext_end], header_length as usize)?;

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            autoclear,
            refcount_order,
            header_length,
            compression_type,
            backing_file,
            backing_format,
        })
    }
}

/// Walks the header extensions in `buf[start..]`; returns the backing format, if named.
fn parse_extensions(buf: &[u8], start: usize) -> Result<Option<String>> {
    let mut at = start;
    let mut backing_format = None;
    // Fewer than 8 bytes left: no room for another extension, as for an end marker.
    while at + 8 <= buf.len() {
        let ty = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let data = at + 8;
        let Some(end) = data.checked_add(len).filter(|&e| e <= buf.len()) else {
            return Err(Error::InvalidHeader("header extension beyond its area"));
        };
        if ty == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(&buf[data..end])
                .map_err(|_| Error::InvalidHeader("backing format not utf-8"))?;
            backing_format = Some(name.trim_end_matches('\0').to_owned());
        }
        at = data + len.div_ceil(8) * 8;
    }
    Ok(backing_format)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A v3 header (64 KiB clusters, 1 GiB, L1 at 3 clusters, refcount table at 1 cluster)
    /// in a first cluster of `cs` bytes.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    const FILE_LEN: u64 = 4 << 16;

    #[test]
    fn valid_v3_header_parses() {
        let h = Header::parse(&v3_header(), FILE_LEN).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn bad_fields_give_their_errors() {
        let mut b = v3_header();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::UnsupportedVersion(4))
        ));
        let mut b = v3_header();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidClusterBits(22))
        ));
        let mut b = v3_header();
        b[72..80].copy_from_slice(&INCOMPAT_EXTL2.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::ExtendedL2)
        ));
        let mut b = v3_header();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::UnknownFeatures(_))
        ));
        let mut b = v3_header();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::Encrypted(1))
        ));
        let mut b = v3_header();
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::UnsupportedRefcountOrder(7))
        ));
    }

    #[test]
    fn tables_outside_the_file_or_overlapping_are_refused() {
        let mut b = v3_header();
        b[40..48].copy_from_slice(&(100u64 << 16).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidHeader("l1 table beyond the end of the file"))
        ));
        let mut b = v3_header();
        b[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidHeader("l1 table offset unaligned"))
        ));
        let mut b = v3_header();
        b[48..56].copy_from_slice(&(3u64 << 16).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidHeader("l1 table overlaps the refcount table"))
        ));
        let mut b = v3_header();
        b[24..32].copy_from_slice(&(1u64 << 50).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidHeader(_))
        ));
    }

    #[test]
    fn extensions_are_walked_with_bounds() {
        let mut b = v3_header();
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&3u32.to_be_bytes());
        b[112..115].copy_from_slice(b"raw");
        assert_eq!(
            Header::parse(&b, FILE_LEN)
                .unwrap()
                .backing_format
                .as_deref(),
            Some("raw")
        );
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE_LEN),
            Err(Error::InvalidHeader("header extension beyond its area"))
        ));
    }

    proptest! {
        #[test]
        fn random_header_bytes_never_panic(
            edits in proptest::collection::vec((0usize..200, any::<u8>()), 0..16),
            file_len in 0u64..(1 << 24),
        ) {
            let mut b = v3_header();
            for (at, v) in edits {
                b[at] = v;
            }
            if let Ok(h) = Header::parse(&b, file_len) {
                let cs = h.cluster_size();
                prop_assert!(in_file(h.refcount_table_offset,
                    u64::from(h.refcount_table_clusters) * cs, file_len));
                prop_assert!(in_file(h.l1_table_offset, u64::from(h.l1_size) * 8, file_len));
                prop_assert!(u64::from(h.l1_size) * 8 <= MAX_L1_BYTES);
            }
        }

        #[test]
        fn random_extension_areas_never_panic(area in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_extensions(&area, 0);
        }
    }
}
