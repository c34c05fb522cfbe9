//! The virtio-vsock device (virtio 1.2 §5.10), stream sockets only, with its host side on
//! unix sockets ("hybrid vsock", the Firecracker and rust-vmm `vhost-device-vsock`
//! convention), served over vhost-user from a jailed process.
//!
//! [`VsockDevice`] is the [`Device`](virtio::vhost_user::Device): three queues (rx, tx,
//! event), the guest's CID in config space, one connection state machine per (host port,
//! guest port) with credit-based flow control. It opens nothing: host streams come from a
//! [`Broker`] over the broker channel (see [`broker`] for the frames), which the VMM (or the
//! device's unjailed front process) runs next to it, listening on `PATH` and connecting to
//! `PATH_<port>`.
//!
//! Everything the guest writes is untrusted: a malformed packet gets a reset (or is dropped)
//! and counted in [`Stats`], never a panic, and the other connections go on. Everything a
//! host process writes before it is handed over is checked by the broker.
//!
//! # Wiring
//! The unjailed side makes the [`Broker`] (it binds `PATH`) and runs it on a thread of its
//! own; the device process gets the other end of the broker channel like any backend fd,
//! builds its ring restricted to [`VSOCK_OPS`], enters its jail and seccomp policy
//! (`vsock/vsock.policy`: the common device calls and `shutdown(SHUT_WR)`), and serves:
//!
//! ```no_run
//! use std::rc::Rc;
//! use vsock::{Broker, VsockDevice, VsockOptions, VSOCK_OPS};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Unjailed, before the device process starts:
//! let (broker, channel) = Broker::new("/run/ringvm/vm1.vsock")?;
//! let broker = broker.spawn()?;
//! // In the device process (channel inherited), before the jail:
//! let ex = executor::Builder::new().allow_ops(VSOCK_OPS).build()?;
//! let device = Rc::new(VsockDevice::new(VsockOptions::new(3), channel)?);
//! # let (_, vhost_user) = executor::socketpair()?;
//! // ... jail, seccomp, then:
//! ex.run_until(virtio::vhost_user::serve(device, virtio::vhost_user::Connection::new(vhost_user)))?;
//! # drop(broker);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod broker;
pub mod device;
mod host;
mod notify;
pub mod packet;
mod process;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use device::{
    Stats, VsockDevice, VsockOptions, BUF_ALLOC_RANGE, DEFAULT_BUF_ALLOC, VIRTIO_VSOCK_F_STREAM,
};
pub use host::Broker;
pub use process::{VsockArgs, VsockProcess, VsockSpec};

use std::io;
use std::path::PathBuf;

use executor::opcode;

/// The io_uring opcodes the device process needs (for its restricted ring; Read, AsyncCancel
/// and Nop are always allowed): vhost-user messages and broker frames with descriptors
/// (RecvMsg, SendMsg), readiness polls, reply timeouts and the host-connect timer (PollAdd,
/// Timeout); host streams are read with Read and written with SendMsg (`MSG_NOSIGNAL`).
/// Nothing here opens a path or a socket. These are exactly
/// [`virtio::process::VHOST_USER_OPS`]: as a `DeviceProcess` its own `OPS` are empty.
pub const VSOCK_OPS: &[u8] = &[
    opcode::RecvMsg::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
    opcode::Read::CODE,
];

/// Errors of the vsock device and its broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest CID that is reserved (0, 1, 2, `u32::MAX`) or does not fit 32 bits.
    #[error("guest CID {0} is reserved or does not fit 32 bits")]
    InvalidCid(u64),
    /// A broker frame that is not [`broker::FRAME_SIZE`] bytes.
    #[error("broker frame of {0} bytes")]
    FrameSize(usize),
    /// A broker frame kind that is unknown or may not travel in that direction.
    #[error("broker frame kind {0} is unknown here")]
    FrameKind(u32),
    /// A broker frame field with a value it may not have.
    #[error("broker frame kind {kind}: {field} may not be {value}")]
    FrameField {
        /// The frame kind.
        kind: u32,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u32,
    },
    /// A broker frame with the wrong number of descriptors.
    #[error("broker frame kind {kind} came with {got} descriptors, {expected} expected")]
    FrameFds {
        /// The frame kind.
        kind: u32,
        /// Descriptors the kind carries.
        expected: usize,
        /// Descriptors received.
        got: usize,
    },
    /// A host process's first line is not `CONNECT <port>\n`.
    #[error("bad CONNECT line: {0}")]
    ConnectLine(&'static str),
    /// Binding the host socket failed.
    #[error("failed to listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
    /// Creating the broker channel failed.
    #[error("failed to create the broker channel")]
    SocketPair(#[source] io::Error),
    /// Creating the broker's executor failed.
    #[error("failed to create the broker executor")]
    Executor(#[source] executor::Error),
    /// Accepting a host connection failed.
    #[error("failed to accept a host connection")]
    Accept(#[source] io::Error),
    /// Receiving or sending on the broker channel failed.
    #[error("broker channel i/o failed")]
    Channel(#[source] io::Error),
    /// Starting the broker thread failed.
    #[error("failed to start the broker thread")]
    Thread(#[source] io::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
