//! vhost-user: the protocol between a VMM (the frontend) and an out-of-process device (the
//! backend), as specified in QEMU's `docs/interop/vhost-user.rst`.
//!
//! [`message`] is the wire layer: message headers, request codes, the bodies of the base
//! protocol, and a decoder that checks every byte and the number of file descriptors a peer
//! sent before anything acts on a message. A malformed message is a [`MessageError`], never a
//! panic.

pub mod message;

pub use message::{
    encode_ack, encode_reply, Body, Config, Header, MemTable, MemoryRegion, Message, MessageError,
    Request, RequestBody, VringAddr, VringFd, VringState, U64,
};
