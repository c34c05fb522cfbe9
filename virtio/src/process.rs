//! What makes a device a process: `ringvm device <name>`.
//!
//! A device crate implements [`DeviceProcess`] next to its [`Device`]: its type (and so its
//! name and seccomp policy, `seccomp/policies/<name>.policy`), the io_uring opcodes its data
//! path needs, its own command-line options, the constructor that opens what those options
//! name before the jail, and the way back from options to arguments for the exec of a device
//! process (tested as a round trip in each crate). The VMM's one generic entry parses the
//! options every device shares (endpoint, sandbox, death report), then the device's own with
//! [`DeviceProcess::Options`], and serves the device; its registry maps names to
//! implementations.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

use executor::opcode;

use crate::types::DeviceType;
use crate::vhost_user::Device;

/// io_uring opcodes every device process uses: vhost-user messages with descriptors, reply
/// timeouts, and readiness polls (READ, ASYNC_CANCEL and NOP are always allowed: kick
/// eventfd reads and cancellation).
pub const VHOST_USER_OPS: &[u8] = &[
    opcode::RecvMsg::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
];

/// Boxed errors of a device's constructor, with their chain of causes.
pub type MakeError = Box<dyn std::error::Error + Send + Sync>;

/// A device as a process of its own.
pub trait DeviceProcess {
    /// What it serves: `ringvm device <TYPE.name()>`, seccomp policy `<TYPE.name()>`.
    const TYPE: DeviceType;
    /// io_uring opcodes of its data path, on top of [`VHOST_USER_OPS`] (nothing that opens
    /// a path, a socket or a connection).
    const OPS: &'static [u8];
    /// Its own options.
    type Options: argh::FromArgs;
    /// The device.
    type Device: Device;

    /// Makes the device before the jail: opens what `options` name while the whole file
    /// system is visible. `inherit` turns a descriptor number from the command line into
    /// the descriptor (refusing one that is not open, or already taken).
    fn make(
        options: &Self::Options,
        inherit: &mut dyn FnMut(i32) -> io::Result<OwnedFd>,
    ) -> Result<Made<Self::Device>, MakeError>;

    /// The arguments that give `options` back (what the VMM passes when it spawns the
    /// device): `Options::from_args` of them equals `options`.
    fn to_args(options: &Self::Options) -> Vec<OsString>;
}

/// A device, and what a jailed child serving it in its place needs.
pub struct Made<D> {
    pub device: D,
    /// Descriptors a `--socket` device hands its jailed child, which cannot open them in its
    /// own namespaces.
    pub forward: Forward,
}

impl<D> Made<D> {
    /// A device that needs nothing handed on.
    pub fn alone(device: D) -> Made<D> {
        Made {
            device,
            forward: Forward::default(),
        }
    }
}

/// Descriptors handed to a jailed child: they become `flag 4`, `flag 5`, ... (after the
/// connection on 3), in place of the options in `strip` (each with its value); and what to do
/// once the device has ended, whoever served it.
#[derive(Default)]
pub struct Forward {
    pub fds: Vec<OwnedFd>,
    pub flag: &'static str,
    pub strip: &'static [&'static str],
    /// Run once the device, or the jailed child serving it, has ended: e.g. wait for a
    /// helper thread of this process to finish its own cleaning up before the process exits.
    pub after: Option<Box<dyn FnOnce()>>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("fds", &self.fds)
            .field("flag", &self.flag)
            .field("strip", &self.strip)
            .field("after", &self.after.is_some())
            .finish()
    }
}
