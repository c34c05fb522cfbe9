//! `ringvm device console`: the console as a process of its own.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

use argh::FromArgs;
use virtio::process::{DeviceProcess, Forward, Made, MakeError};
use virtio::DeviceType;

use crate::{Console, ConsoleSize};

/// virtio-console (one port): the guest's hvc0.
#[derive(FromArgs, Debug, Clone, PartialEq, Eq)]
pub struct ConsoleArgs {
    /// the console's streams, already open: the first descriptor takes the guest's output,
    /// a second (if given) gives the guest's input
    #[argh(option)]
    pub stream_fd: Vec<i32>,
    /// the console's width in characters (with --rows): offered to the guest
    #[argh(option)]
    pub cols: Option<u16>,
    /// the console's height in characters (with --cols)
    #[argh(option)]
    pub rows: Option<u16>,
}

/// virtio-console as a device process.
#[derive(Debug)]
pub struct ConsoleProcess;

impl DeviceProcess for ConsoleProcess {
    const TYPE: DeviceType = DeviceType::Console;
    /// Output is written with WRITE; input is read with READ, which every ring allows, and
    /// waited for with POLL_ADD (a vhost-user opcode).
    const OPS: &'static [u8] = &[executor::opcode::Write::CODE];
    type Options = ConsoleArgs;
    type Device = Console;

    fn make(
        a: &ConsoleArgs,
        inherit: &mut dyn FnMut(i32) -> io::Result<OwnedFd>,
    ) -> Result<Made<Console>, MakeError> {
        let size = match (a.cols, a.rows) {
            (Some(cols), Some(rows)) => Some(ConsoleSize { cols, rows }),
            (None, None) => None,
            _ => return Err("give --cols and --rows together".into()),
        };
        let mut fds = match a.stream_fd.as_slice() {
            [_] | [_, _] => a
                .stream_fd
                .iter()
                .map(|&fd| {
                    inherit(fd)
                        .map_err(|e| format!("--stream-fd {fd} is not an open descriptor: {e}"))
                })
                .collect::<Result<Vec<OwnedFd>, String>>()?,
            _ => return Err("give --stream-fd OUT, and optionally a second for input".into()),
        };
        let forward = Forward {
            fds: fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
            flag: "--stream-fd",
            strip: &["--stream-fd"],
            after: None,
        };
        let input = (fds.len() == 2).then(|| fds.remove(1));
        let output = fds.remove(0);
        Ok(Made {
            device: Console::new(output, input, size),
            forward,
        })
    }

    fn to_args(a: &ConsoleArgs) -> Vec<OsString> {
        let mut args = Vec::new();
        for fd in &a.stream_fd {
            args.extend(["--stream-fd".into(), fd.to_string().into()]);
        }
        if let Some(cols) = a.cols {
            args.extend(["--cols".into(), cols.to_string().into()]);
        }
        if let Some(rows) = a.rows {
            args.extend(["--rows".into(), rows.to_string().into()]);
        }
        args
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use virtio::process::args_round_trip;

    #[test]
    fn options_round_trip_across_exec() {
        for a in [
            ConsoleArgs {
                stream_fd: vec![4],
                cols: None,
                rows: None,
            },
            ConsoleArgs {
                stream_fd: vec![4, 5],
                cols: Some(80),
                rows: Some(25),
            },
        ] {
            assert_eq!(args_round_trip::<ConsoleProcess>(&a).unwrap(), a);
        }
    }

    #[test]
    fn streams_and_size_are_checked() {
        let mut never = |_| -> io::Result<OwnedFd> { Err(io::ErrorKind::NotFound.into()) };
        for bad in [
            ConsoleArgs {
                stream_fd: vec![],
                cols: None,
                rows: None,
            },
            ConsoleArgs {
                stream_fd: vec![4, 5, 6],
                cols: None,
                rows: None,
            },
            ConsoleArgs {
                stream_fd: vec![4],
                cols: Some(80),
                rows: None,
            },
            ConsoleArgs {
                stream_fd: vec![4],
                cols: None,
                rows: None,
            },
        ] {
            assert!(ConsoleProcess::make(&bad, &mut never).is_err(), "{bad:?}");
        }
    }
}
