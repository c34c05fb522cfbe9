//! The virtio-net device, tap set-up and tap I/O.
