//! `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): the 12 bytes in front of every frame, in
//! the guest's buffers and on the tap alike.

use crate::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
};

/// The header size with `VIRTIO_F_VERSION_1` (or `MRG_RXBUF`): the tap's vnet header size.
pub const VNET_HDR_SIZE: usize = 12;

/// `flags`: the checksum from `csum_start` + `csum_offset` is still to be computed.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was validated (device -> driver).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: no segmentation.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type` bit: TCP with ECN.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Byte offset of `num_buffers` in the header.
pub(crate) const NUM_BUFFERS_OFFSET: usize = 10;

/// The largest frame (without the header) the driver may send or the device may deliver:
/// a 64 KiB TSO/UFO packet with its Ethernet and VLAN headers (virtio 1.2 §5.1.6.3).
pub const MAX_FRAME: usize = 65550;
/// The shortest frame the device sends: an Ethernet header.
pub const MIN_FRAME: usize = ETH_HLEN;
/// An Ethernet header's length.
const ETH_HLEN: usize = 14;

/// A decoded `virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts (with `NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers the frame spans (receive, with `MRG_RXBUF`).
    pub num_buffers: u16,
}

/// Why a transmitted header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    /// `NEEDS_CSUM` without `VIRTIO_NET_F_CSUM` negotiated.
    #[error("checksum offload was not negotiated")]
    CsumNotNegotiated,
    /// A checksum position beyond the frame.
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame")]
    CsumOutOfFrame {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame length.
        len: usize,
    },
    /// A `gso_type` the spec does not define.
    #[error("unknown gso type {0:#x}")]
    GsoType(u8),
    /// A GSO type whose `HOST_*` feature was not negotiated.
    #[error("gso type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    /// GSO whose headers, up to the end of the checksum, do not fit the 16-bit `hdr_len`
    /// (frames may be longer than 65535 bytes; the tap would truncate the length).
    #[error("gso headers up to the checksum at {start}+{offset} are longer than 65535 bytes")]
    GsoHeadersTooLong {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
    },
    /// GSO without `NEEDS_CSUM`, or with a zero segment size.
    #[error("gso type {gso_type:#x} with segment size {gso_size} and flags {flags:#x}")]
    GsoInvalid {
        /// `gso_type`.
        gso_type: u8,
        /// `gso_size`.
        gso_size: u16,
        /// `flags`.
        flags: u8,
    },
}

impl VirtioNetHdr {
    /// Decodes the little-endian header.
    pub fn from_bytes(b: &[u8; VNET_HDR_SIZE]) -> VirtioNetHdr {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Encodes the header, little-endian.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_SIZE] {
        let mut b = [0; VNET_HDR_SIZE];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Checks a header the driver sent with a `frame_len`-byte frame against the acked
    /// `features`, and returns the header to hand the tap: what the tap would refuse (or the
    /// spec forbids) is refused here, so a bad frame is counted as dropped rather than as a
    /// tap error. Flags other than `NEEDS_CSUM` are ignored (virtio 1.2 §5.1.6.2.2: the
    /// device ignores flags it does not recognise; the driver must not set `DATA_VALID` or
    /// `RSC_INFO`, and the tap would take `DATA_VALID` as "checksum verified"); `hdr_len`,
    /// a hint, is kept when the tap takes it (0, or an Ethernet header to the whole frame)
    /// and else made one it takes (the checksum's end with GSO, else 0); `num_buffers` is 0.
    /// The tap gets this result, never the guest's bytes, which could change after the check.
    pub fn for_tap(&self, features: u64, frame_len: usize) -> Result<VirtioNetHdr, HdrError> {
        let has = |bit: u32| features & (1 << bit) != 0;
        let needs_csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let csum_end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        if needs_csum {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HdrError::CsumNotNegotiated);
            }
            if csum_end > frame_len {
                return Err(HdrError::CsumOutOfFrame {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        // The tap refuses a hint shorter than an Ethernet header (but for 0) or longer than
        // the frame.
        let hint_ok =
            self.hdr_len == 0 || (ETH_HLEN..=frame_len).contains(&usize::from(self.hdr_len));
        let tap = VirtioNetHdr {
            flags: self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
            hdr_len: if hint_ok { self.hdr_len } else { 0 },
            num_buffers: 0,
            ..*self
        };
        let base = self.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
        let feature = match base {
            VIRTIO_NET_HDR_GSO_NONE if self.gso_type == VIRTIO_NET_HDR_GSO_NONE => return Ok(tap),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(HdrError::GsoType(self.gso_type)),
        };
        let ecn_ok = self.gso_type & VIRTIO_NET_HDR_GSO_ECN == 0
            || (base != VIRTIO_NET_HDR_GSO_UDP && has(VIRTIO_NET_F_HOST_ECN));
        if !has(feature) || !ecn_ok {
            return Err(HdrError::GsoNotNegotiated(self.gso_type));
        }
        if !needs_csum || self.gso_size == 0 {
            return Err(HdrError::GsoInvalid {
                gso_type: self.gso_type,
                gso_size: self.gso_size,
                flags: self.flags,
            });
        }
        if csum_end > usize::from(u16::MAX) {
            return Err(HdrError::GsoHeadersTooLong {
                start: self.csum_start,
                offset: self.csum_offset,
            });
        }
        if hint_ok {
            return Ok(tap);
        }
        // csum_end <= frame_len (checked above: GSO needs NEEDS_CSUM), and frame_len >=
        // MIN_FRAME (the device's check) for the Ethernet header; the tap raises hdr_len to
        // csum_end by itself anyway.
        let hdr_len = csum_end.max(ETH_HLEN).min(frame_len);
        Ok(VirtioNetHdr {
            // hdr_len <= max(csum_end, ETH_HLEN) <= 65535 (checked above).
            hdr_len: hdr_len as u16,
            ..tap
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CSUM_TSO: u64 = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);

    #[test]
    fn gso_headers_longer_than_hdr_len_can_say_are_refused() {
        // Found by the virtio_net_hdr fuzz target: hdr_len became 65537 as u16 = 1.
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 3,
            gso_size: 1448,
            csum_start: u16::MAX,
            csum_offset: 0,
            num_buffers: 0,
        };
        assert_eq!(
            hdr.for_tap(CSUM_TSO, 65544),
            Err(HdrError::GsoHeadersTooLong {
                start: u16::MAX,
                offset: 0
            })
        );
        let fits = VirtioNetHdr {
            csum_start: u16::MAX - 2,
            ..hdr
        };
        assert_eq!(
            fits.for_tap(CSUM_TSO, 65544).map(|t| t.hdr_len),
            Ok(u16::MAX)
        );
    }

    #[test]
    fn round_trips_little_endian() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], &[1, 1, 2, 1]);
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
    }

    #[test]
    fn plain_frames_pass_and_offloads_need_their_features() {
        let plain = VirtioNetHdr::default();
        assert_eq!(plain.for_tap(0, 60), Ok(plain));
        let csum = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..plain
        };
        assert_eq!(csum.for_tap(0, 60), Err(HdrError::CsumNotNegotiated));
        assert_eq!(csum.for_tap(CSUM_TSO, 60), Ok(csum));
        assert!(matches!(
            csum.for_tap(CSUM_TSO, 40),
            Err(HdrError::CsumOutOfFrame { .. })
        ));
        let tso = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1448,
            ..csum
        };
        assert_eq!(tso.for_tap(CSUM_TSO, 9000), Ok(tso));
        assert_eq!(
            tso.for_tap(1 << VIRTIO_NET_F_CSUM, 9000),
            Err(HdrError::GsoNotNegotiated(1))
        );
        let ecn = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            ..tso
        };
        assert_eq!(
            ecn.for_tap(CSUM_TSO, 9000),
            Err(HdrError::GsoNotNegotiated(0x81))
        );
        assert_eq!(
            ecn.for_tap(CSUM_TSO | (1 << VIRTIO_NET_F_HOST_ECN), 9000),
            Ok(ecn)
        );
        let no_size = VirtioNetHdr { gso_size: 0, ..tso };
        assert!(matches!(
            no_size.for_tap(CSUM_TSO, 9000),
            Err(HdrError::GsoInvalid { .. })
        ));
        let bad = VirtioNetHdr { gso_type: 2, ..tso };
        assert_eq!(bad.for_tap(CSUM_TSO, 9000), Err(HdrError::GsoType(2)));
    }

    #[test]
    fn the_tap_gets_known_flags_a_sane_hdr_len_and_no_num_buffers() {
        // Unknown flags, DATA_VALID (the driver must not set it) and RSC_INFO are ignored.
        let plain = VirtioNetHdr {
            flags: 0x10 | VIRTIO_NET_HDR_F_DATA_VALID | 0x4,
            hdr_len: 9,
            num_buffers: 7,
            ..VirtioNetHdr::default()
        };
        assert_eq!(plain.for_tap(0, 60), Ok(VirtioNetHdr::default()));
        let sane_hint = VirtioNetHdr {
            hdr_len: 60,
            ..plain
        };
        assert_eq!(sane_hint.for_tap(0, 60).unwrap().hdr_len, 60);
        let tso = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 66,
            num_buffers: 0,
        };
        let tap = tso.for_tap(CSUM_TSO, 9000).unwrap();
        assert_eq!(tap.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(tap.hdr_len, 66, "a sane hint is kept");
        for (hint, kept) in [
            (0, 0),
            (1, 52),
            (13, 52),
            (14, 14),
            (9000, 9000),
            (9001, 52),
        ] {
            let h = VirtioNetHdr {
                hdr_len: hint,
                ..tso
            };
            assert_eq!(h.for_tap(CSUM_TSO, 9000).unwrap().hdr_len, kept, "{hint}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_headers_decode_and_check_without_panicking(
            bytes in prop::array::uniform12(any::<u8>()),
            features in any::<u64>(),
            len in 0usize..70_000,
        ) {
            let h = VirtioNetHdr::from_bytes(&bytes);
            prop_assert_eq!(h.to_bytes(), bytes);
            if let Ok(tap) = h.for_tap(features, len) {
                prop_assert_eq!(tap.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
                prop_assert!(usize::from(tap.hdr_len) <= len);
                prop_assert_eq!(tap.num_buffers, 0);
            }
        }
    }
}
