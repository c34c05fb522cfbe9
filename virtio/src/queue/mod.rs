//! Split virtqueues (virtio 1.2 §2.7): wire formats, descriptor chains, the queue itself.

mod chain;
pub mod desc;
pub mod inflight;
mod split;

pub(crate) use chain::BufList;
pub use chain::{Buffer, ChainError, DescriptorChain};
pub use desc::{Descriptor, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
pub use split::Queue;
