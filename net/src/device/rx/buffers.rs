//! The receive chains a queue holds: popped, not yet used.

use std::collections::VecDeque;

use virtio::DescriptorChain;

/// Receive chains popped and not yet used, in pop order, with their writable bytes and
/// whether stepping back over them in the avail ring gives them back.
pub(super) struct RxBuffers {
    chains: VecDeque<DescriptorChain>,
    /// Their writable bytes.
    bytes: usize,
    /// Whether the held chains are the last ones popped (no chain popped after the first of
    /// them was returned), so that stepping back over them gives them back.
    contiguous: bool,
}

impl Default for RxBuffers {
    fn default() -> RxBuffers {
        RxBuffers {
            chains: VecDeque::new(),
            bytes: 0,
            contiguous: true,
        }
    }
}

impl RxBuffers {
    pub(super) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// How many chains are held.
    pub(super) fn len(&self) -> usize {
        self.chains.len()
    }

    /// Their writable bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn iter(&self) -> std::collections::vec_deque::Iter<'_, DescriptorChain> {
        self.chains.iter()
    }

    pub(super) fn front(&self) -> Option<&DescriptorChain> {
        self.chains.front()
    }

    /// Holds a chain just popped.
    pub(super) fn push_back(&mut self, chain: DescriptorChain) {
        self.bytes += chain.writable_len();
        self.chains.push_back(chain);
    }

    /// Holds again a chain taken with [`RxBuffers::pop_front`] and not used.
    pub(super) fn push_front(&mut self, chain: DescriptorChain) {
        self.bytes += chain.writable_len();
        self.chains.push_front(chain);
    }

    /// The oldest chain held. Taking every chain does not make the next held ones
    /// contiguous: those taken may come back ([`RxBuffers::reset_if_empty`] says when
    /// they will not).
    pub(super) fn pop_front(&mut self) -> Option<DescriptorChain> {
        let chain = self.chains.pop_front()?;
        self.bytes -= chain.writable_len();
        Some(chain)
    }

    /// A chain popped after the first held one went back to the used ring: stepping back
    /// over the held chains would now give back the wrong ones.
    pub(super) fn not_contiguous(&mut self) {
        self.contiguous = false;
    }

    /// Whether the held chains are the last ones popped.
    pub(super) fn contiguous(&self) -> bool {
        self.contiguous
    }

    /// With no chain held (and none taken to come back), the next ones held are the last
    /// popped.
    pub(super) fn reset_if_empty(&mut self) {
        if self.chains.is_empty() {
            self.contiguous = true;
        }
    }
}

impl std::ops::Index<usize> for RxBuffers {
    type Output = DescriptorChain;

    fn index(&self, i: usize) -> &DescriptorChain {
        &self.chains[i]
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testing::rx_chains;
    use super::*;

    fn hold(held: &mut RxBuffers, chains: Vec<DescriptorChain>) {
        for c in chains {
            held.push_back(c);
        }
    }

    fn heads(held: &RxBuffers) -> Vec<u16> {
        held.iter().map(DescriptorChain::head_index).collect()
    }

    #[test]
    fn held_bytes_and_order_follow_pushes_and_pops() {
        let mut held = RxBuffers::default();
        let chains = rx_chains(&[&[100], &[200, 50], &[300]]);
        let popped: Vec<u16> = chains.iter().map(DescriptorChain::head_index).collect();
        hold(&mut held, chains);
        assert_eq!((held.len(), held.bytes()), (3, 650));
        assert_eq!(heads(&held), popped);
        let a = held.pop_front().expect("a chain");
        let b = held.pop_front().expect("a chain");
        assert_eq!((held.len(), held.bytes()), (1, 300));
        held.push_front(b);
        held.push_front(a);
        assert_eq!((held.len(), held.bytes()), (3, 650));
        assert_eq!(heads(&held), popped);
        assert_eq!(held[1].writable_len(), 250);
        assert_eq!(held.front().map(DescriptorChain::writable_len), Some(100));
    }

    #[test]
    fn held_chains_are_contiguous_again_only_once_none_is_held() {
        let mut held = RxBuffers::default();
        assert!(held.contiguous());
        hold(&mut held, rx_chains(&[&[100], &[100]]));
        held.not_contiguous();
        held.reset_if_empty();
        assert!(!held.contiguous());
        // Taken for a read, then back unused: still not contiguous.
        let a = held.pop_front().expect("a chain");
        let b = held.pop_front().expect("a chain");
        assert!(!held.contiguous());
        held.push_front(b);
        held.push_front(a);
        held.reset_if_empty();
        assert!(!held.contiguous());
        while held.pop_front().is_some() {}
        held.reset_if_empty();
        assert!(held.contiguous() && held.is_empty() && held.bytes() == 0);
    }
}
