//! Fuzzes the virtio-net header a guest puts in front of every frame it transmits: decoded
//! with [`VirtioNetHdr::from_bytes`] and checked against the acked features and the frame's
//! length by [`VirtioNetHdr::for_tap`], as the device's transmit path does, before the header
//! goes to the tap (which would refuse, or worse, take, what it does not expect).
//!
//! Invariants checked on a header handed to the tap: `num_buffers` is 0, the only flag is
//! `NEEDS_CSUM` and only with `VIRTIO_NET_F_CSUM` acked, the checksum lies inside the frame,
//! a GSO type is a defined one whose `HOST_*` feature was acked, with `NEEDS_CSUM` and a
//! segment size, `hdr_len` is 0 or an Ethernet header up to the whole frame (for the frame
//! lengths the device lets through), and checking the result again gives it back unchanged.
//! Headers round-trip through `to_bytes`.
//!
//! Input layout: [12 header bytes, features (le64), frame length (le32)].

#![no_main]

use libfuzzer_sys::fuzz_target;
use net::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
};
use net::hdr::{
    MAX_FRAME, MIN_FRAME, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};
use net::{VirtioNetHdr, VNET_HDR_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((bytes, rest)) = data.split_first_chunk::<VNET_HDR_SIZE>() else {
        return;
    };
    let Some((f, rest)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let features = u64::from_le_bytes(*f);
    let frame_len = match rest.first_chunk::<4>() {
        Some(l) => u32::from_le_bytes(*l) as usize % (MAX_FRAME + 64),
        None => MIN_FRAME + rest.len(),
    };

    let hdr = VirtioNetHdr::from_bytes(bytes);
    assert_eq!(&hdr.to_bytes(), bytes, "the header round-trips");

    let Ok(tap) = hdr.for_tap(features, frame_len) else {
        return;
    };
    let has = |bit: u32| features & (1 << bit) != 0;
    assert_eq!(tap.num_buffers, 0);
    assert_eq!(tap.flags, hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
    assert_eq!(
        (tap.gso_type, tap.gso_size, tap.csum_start, tap.csum_offset),
        (hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset)
    );
    let needs_csum = tap.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    let csum_end = usize::from(tap.csum_start) + usize::from(tap.csum_offset) + 2;
    if needs_csum {
        assert!(has(VIRTIO_NET_F_CSUM), "checksum offload not acked");
        assert!(csum_end <= frame_len, "checksum outside the frame");
    }
    if tap.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        let feature = match tap.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            t => panic!("undefined gso type {t:#x} accepted"),
        };
        assert!(has(feature), "gso type {:#x} not acked", tap.gso_type);
        if tap.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
            assert!(has(VIRTIO_NET_F_HOST_ECN));
            assert_ne!(
                tap.gso_type & !VIRTIO_NET_HDR_GSO_ECN,
                VIRTIO_NET_HDR_GSO_UDP
            );
        }
        assert!(needs_csum && tap.gso_size > 0);
    }
    if (MIN_FRAME..=MAX_FRAME).contains(&frame_len) {
        let hint = usize::from(tap.hdr_len);
        assert!(
            hint == 0 || (MIN_FRAME..=frame_len).contains(&hint),
            "hdr_len {hint} for a {frame_len}-byte frame"
        );
    }
    assert_eq!(
        tap.for_tap(features, frame_len),
        Ok(tap),
        "a header for the tap checks as itself"
    );
});
