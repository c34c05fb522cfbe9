//! What makes a device a process: `ringvm device <name>`.
//!
//! A device crate implements [`DeviceProcess`] next to its [`Device`]: its type (and so its
//! name and seccomp policy, `<crate>/src/<name>.policy`), the io_uring opcodes its data
//! path needs, its own command-line options, the constructor that opens what those options
//! name before the jail, and the way back from options to arguments for the exec of a device
//! process (tested as a round trip in each crate). The VMM's one generic entry parses the
//! options every device shares (endpoint, sandbox, death report), then the device's own with
//! [`DeviceProcess::Options`], and serves the device; its registry maps names to
//! implementations.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

use argh::FromArgs;
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

/// `options` as [`DeviceProcess::to_args`] prints them, parsed back as the spawned process
/// parses them: each crate's round-trip test compares the result with `options`.
pub fn args_round_trip<P: DeviceProcess>(options: &P::Options) -> Result<P::Options, String> {
    let args = P::to_args(options)
        .into_iter()
        .map(|s| s.into_string().map_err(|s| format!("{s:?} is not UTF-8")))
        .collect::<Result<Vec<String>, String>>()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    P::Options::from_args(&[P::TYPE.name()], &args).map_err(|e| e.output)
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

/// One `ringvm run` flag a device declares: `NAME VALUE`, given any number of times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFlag {
    /// The flag as written: `--vsock`.
    pub name: &'static str,
    /// Its value in the usage line: `cid=N[,uds=PATH]`.
    pub value: &'static str,
    /// Its help text, one paragraph (`ringvm run --help` wraps it).
    pub help: &'static str,
}

/// Work the VMM runs for a device on its main thread's executor while the VM runs: a host
/// side the jailed device cannot have itself (a broker that listens and connects for it).
pub type HostTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// One device process of `ringvm run`, before it is spawned.
pub struct Planned<O> {
    /// The process's options; the descriptors it inherits are numbered from the `first_fd`
    /// given to [`RunDevice::plan`], in the order of `fds`.
    pub options: O,
    /// What it inherits.
    pub fds: Vec<OwnedFd>,
    /// What the VMM runs for it, if anything.
    pub host: Option<HostTask>,
}

/// A device that `ringvm run` adds from flags of its own: the VMM claims these flags from
/// its command line (argh has no flatten), hands them here, and spawns a device process for
/// every spec they give, after its own devices and before `--vhost-user` backends.
pub trait RunDevice: DeviceProcess {
    /// Its `ringvm run` flags (each takes a value).
    const RUN_FLAGS: &'static [RunFlag];
    /// One device the flags ask for.
    type Spec: std::fmt::Debug + 'static;

    /// The devices `given` asks for: this device's flags as they came on the command line,
    /// in order, each with its value. Checked when ringvm starts; an error names its flag
    /// (see [`flag_error`]).
    fn specs(given: &[(&'static str, String)]) -> Result<Vec<Self::Spec>, String>;

    /// In the VMM (unjailed), right before the device process is spawned: its options, the
    /// descriptors it inherits (numbered from `first_fd`), and its host task.
    fn plan(spec: &Self::Spec, first_fd: i32) -> Result<Planned<Self::Options>, MakeError>;
}

/// The error of a flag whose value is wrong, worded as argh words its own.
pub fn flag_error(flag: &str, value: &str, why: impl std::fmt::Display) -> String {
    format!("Error parsing option '{flag}' with value '{value}': {why}")
}

/// The keys one option value has given so far (`key=value,key=value`): a key given twice is
/// refused, as argh refuses a flag given twice, instead of the last one silently winning.
#[derive(Debug, Default)]
pub struct SpecKeys<'a>(Vec<&'a str>);

impl<'a> SpecKeys<'a> {
    /// Notes `key`; an error if it was given before.
    pub fn once(&mut self, key: &'a str) -> Result<(), String> {
        if self.0.contains(&key) {
            return Err(format!("{key}= is given twice"));
        }
        self.0.push(key);
        Ok(())
    }
}
