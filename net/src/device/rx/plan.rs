//! How the receive task reads: [`RxPlan`], a value chosen from the chains it holds and the
//! largest frame the negotiated features allow ([`frame_space`]).

use virtio::DescriptorChain;

use super::MAX_READ_BUFFERS;
use crate::features::*;
use crate::hdr::{MAX_FRAME, VNET_HDR_SIZE};

/// How frames are read from the tap into a set of receive chains, from the cheapest to the
/// most careful (the order `Ord` follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum RxPlan {
    /// Every chain's first buffer is longer than the largest frame: rounds of plain `read`s,
    /// one per chain into that buffer, all submitted at once with one iovec each
    /// (`AsyncFd::read_each`, one memory handle per round); no spill: a read that fills its
    /// buffer is a frame the tap cut. Linux posts such buffers (1536 bytes with `MRG_RXBUF`,
    /// 1538 without) when no guest segmentation offload is on. A buffer that crosses two
    /// memory regions would take two iovecs: such a round goes as [`RxPlan::PerChain`].
    Plain,
    /// Every chain takes the largest frame across at most [`MAX_READ_BUFFERS`] buffers:
    /// rounds of `readv`s, one per chain into all its buffers and a spill byte.
    PerChain,
    /// Some chain is smaller than the largest frame, or has more buffers than one read
    /// takes: one `readv` at a time into held chains and then a host spill buffer. With
    /// `MRG_RXBUF` the read covers as many chains as take the largest frame (an overflow is
    /// copied into chains posted later); without it, the first chain alone (a frame that
    /// does not fit is counted, not delivered).
    Spill,
}

impl RxPlan {
    /// The plan for `chain` alone; `need` is the space the largest frame takes
    /// ([`frame_space`]).
    pub(super) fn for_chain(chain: &DescriptorChain, need: usize) -> RxPlan {
        let bufs = chain.writable();
        if chain.writable_len() < need || bufs.len() > MAX_READ_BUFFERS {
            RxPlan::Spill
        } else if bufs.first().is_some_and(|b| b.len as usize > need) {
            RxPlan::Plain
        } else {
            RxPlan::PerChain
        }
    }

    /// The plan for `chains` read together: the most careful of theirs.
    pub(super) fn choose<'c>(
        chains: impl IntoIterator<Item = &'c DescriptorChain>,
        need: usize,
    ) -> RxPlan {
        let mut plan = RxPlan::Plain;
        for chain in chains {
            plan = plan.max(RxPlan::for_chain(chain, need));
            if plan == RxPlan::Spill {
                break;
            }
        }
        plan
    }

    /// Whether a chain with this plan takes a whole frame by itself (is read in rounds).
    pub(super) fn takes_whole_frame(self) -> bool {
        self != RxPlan::Spill
    }
}

/// The buffer space the largest frame takes, vnet header included: with a guest
/// segmentation offload (`GUEST_TSO4`, `GUEST_TSO6`, `GUEST_UFO`) the largest frame the tap
/// gives, else the MTU with an Ethernet header and a VLAN tag.
pub(super) fn frame_space(acked: u64, mtu: u32) -> usize {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let gso =
        has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6) || has(VIRTIO_NET_F_GUEST_UFO);
    let max_frame = if gso {
        MAX_FRAME
    } else {
        // Ethernet header, a VLAN tag, the payload.
        (18 + mtu as usize).min(MAX_FRAME)
    };
    VNET_HDR_SIZE + max_frame
}

#[cfg(test)]
mod tests {
    use super::super::super::testing::rx_chains;
    use super::*;

    const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
    const TSO4: u64 = 1 << VIRTIO_NET_F_GUEST_TSO4;

    fn plans(chains: &[&[u32]], need: usize) -> Vec<RxPlan> {
        rx_chains(chains)
            .iter()
            .map(|c| RxPlan::for_chain(c, need))
            .collect()
    }

    #[test]
    fn the_largest_frame_follows_the_guest_offloads_and_the_mtu() {
        assert_eq!(frame_space(0, 1500), 12 + 1518);
        assert_eq!(
            frame_space(MRG | (1 << VIRTIO_NET_F_GUEST_CSUM), 9000),
            12 + 9018
        );
        // Host-side offloads do not make received frames larger.
        assert_eq!(frame_space(1 << VIRTIO_NET_F_HOST_TSO4, 1500), 12 + 1518);
        for gso in [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ] {
            assert_eq!(frame_space(1 << gso, 1500), 12 + MAX_FRAME);
        }
        assert_eq!(frame_space(0, 100_000), 12 + MAX_FRAME);
    }

    #[test]
    fn a_first_buffer_longer_than_the_largest_frame_is_read_plain() {
        let need = 1530;
        assert_eq!(
            plans(&[&[1531], &[1536, 64], &[1530], &[1530, 1]], need),
            [
                RxPlan::Plain,
                RxPlan::Plain,
                // A buffer of exactly the largest frame: filling it is no sign of a cut.
                RxPlan::PerChain,
                RxPlan::PerChain,
            ]
        );
    }

    #[test]
    fn a_chain_taking_the_largest_frame_across_buffers_is_read_by_itself() {
        let need = 12 + MAX_FRAME;
        let pages = [4096; 17];
        let mut header_then_pages = vec![12];
        header_then_pages.extend_from_slice(&pages);
        assert_eq!(
            plans(&[&header_then_pages, &pages[..16], &[4, 8, 65550]], need),
            [RxPlan::PerChain, RxPlan::Spill, RxPlan::PerChain]
        );
    }

    #[test]
    fn a_chain_too_small_or_of_too_many_buffers_spills() {
        let need = 1530;
        let many = vec![16; MAX_READ_BUFFERS + 1];
        let most = vec![16; MAX_READ_BUFFERS];
        assert_eq!(
            plans(&[&[1529], &[12, 1517], &many, &most], need),
            [
                RxPlan::Spill,
                RxPlan::Spill,
                RxPlan::Spill,
                RxPlan::PerChain
            ]
        );
    }

    #[test]
    fn chains_read_together_take_the_most_careful_plan() {
        let need = 1530;
        let chains = rx_chains(&[&[1536], &[1536], &[12, 1524], &[1024], &[1536]]);
        assert_eq!(RxPlan::choose(&chains[..2], need), RxPlan::Plain);
        assert_eq!(RxPlan::choose(&chains[..3], need), RxPlan::PerChain);
        assert_eq!(
            RxPlan::choose(chains[1..3].iter().rev(), need),
            RxPlan::PerChain
        );
        assert_eq!(RxPlan::choose(&chains, need), RxPlan::Spill);
        assert_eq!(RxPlan::choose(&chains[3..], need), RxPlan::Spill);
        assert!(RxPlan::Plain.takes_whole_frame() && RxPlan::PerChain.takes_whole_frame());
        assert!(!RxPlan::Spill.takes_whole_frame());
    }

    #[test]
    fn linux_buffers_are_read_plain_unless_segmentation_offloads_make_frames_larger() {
        // Mergeable buffers: 1536 bytes each.
        let mergeable = rx_chains(&[&[1536][..]; 4]);
        assert_eq!(
            RxPlan::choose(&mergeable, frame_space(MRG, 1500)),
            RxPlan::Plain
        );
        assert_eq!(
            RxPlan::choose(&mergeable, frame_space(MRG | TSO4, 1500)),
            RxPlan::Spill
        );
        assert_eq!(
            RxPlan::choose(&mergeable, frame_space(MRG, 9000)),
            RxPlan::Spill
        );
        // Without MRG_RXBUF or GSO: one 1538-byte buffer each.
        let small = rx_chains(&[&[1526 + 12][..]; 4]);
        assert_eq!(RxPlan::choose(&small, frame_space(0, 1500)), RxPlan::Plain);
        // "Big packets" (GSO without MRG_RXBUF): a header buffer and pages.
        let mut big: Vec<u32> = vec![12];
        big.extend([4096; 17]);
        let big = rx_chains(&[&big, &big]);
        assert_eq!(
            RxPlan::choose(&big, frame_space(TSO4, 1500)),
            RxPlan::PerChain
        );
    }
}
