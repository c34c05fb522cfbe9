//! virtio-console (virtio 1.2 §5.3) with a single port, as a device process of its own
//! (`ringvm device console`).
//!
//! The guest sees `hvc0`. What it writes on the transmit queue goes to an output descriptor
//! (the VMM's stdout, a file it opened, or /dev/null); what arrives on an optional input
//! descriptor (the VMM's stdin) fills the receive queue's buffers. Both descriptors are
//! opened by the VMM and passed in: the device opens nothing. Multiport is not offered; the
//! console size (`VIRTIO_CONSOLE_F_SIZE`) is, when the VMM knows it.

#![forbid(unsafe_code)]

mod device;
mod process;

pub use device::{Console, ConsoleSize, MAX_CHAIN_BYTES, QUEUE_SIZE, VIRTIO_CONSOLE_F_SIZE};
pub use process::{ConsoleArgs, ConsoleProcess};
