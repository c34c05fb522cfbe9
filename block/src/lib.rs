//! The virtio-blk device and its disk backends (raw, qcow2).

#![forbid(unsafe_code)]
