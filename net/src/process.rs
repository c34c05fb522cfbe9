//! `ringvm device net`: the virtio-net device as a process of its own.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

use argh::FromArgs;
use executor::opcode;
use virtio::process::{DeviceProcess, Forward, Made, MakeError};
use virtio::DeviceType;

use crate::{Error, MacAddress, NetDevice, NetOptions, Tap, MAX_QUEUE_PAIRS};

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The options a jailed child of a `--socket` device gets as `--tap-fd` instead.
const STRIP: &[&str] = &["--tap-fd", "--tap-name", "--queue-pairs"];

/// virtio-net backend on a tap device (one tap queue per queue pair).
#[derive(FromArgs, Debug, Clone, PartialEq, Eq)]
pub struct NetArgs {
    /// an open tap queue descriptor (IFF_VNET_HDR); repeat for one per queue pair
    #[argh(option)]
    pub tap_fd: Vec<i32>,
    /// a tap device to create or attach to by name, instead of --tap-fd
    #[argh(option)]
    pub tap_name: Option<String>,
    /// queue pairs with --tap-name (default 1)
    #[argh(option, default = "1")]
    pub queue_pairs: usize,
    /// the guest's MAC address (default 52:54:00:12:34:56)
    #[argh(option)]
    pub mac: Option<MacAddress>,
}

/// virtio-net as a device process.
#[derive(Debug)]
pub struct NetProcess;

impl DeviceProcess for NetProcess {
    const TYPE: DeviceType = DeviceType::Net;
    /// Frames between the taps and guest memory (READ for frames in one buffer is always
    /// allowed).
    const OPS: &'static [u8] = &[
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Write::CODE,
    ];
    type Options = NetArgs;
    type Device = NetDevice;

    fn make(
        a: &NetArgs,
        inherit: &mut dyn FnMut(i32) -> io::Result<OwnedFd>,
    ) -> Result<Made<NetDevice>, MakeError> {
        let taps = match (&a.tap_name, a.tap_fd.is_empty()) {
            (Some(_), false) => return Err("give --tap-fd or --tap-name, not both".into()),
            (None, true) => {
                return Err("give --tap-fd N (one per queue pair) or --tap-name NAME".into())
            }
            (Some(name), true) => {
                if a.queue_pairs == 0 || a.queue_pairs > MAX_QUEUE_PAIRS {
                    return Err(Error::QueuePairs(a.queue_pairs).into());
                }
                Tap::create(Some(name), a.queue_pairs)?
            }
            (None, false) => {
                let mut taps = Vec::new();
                for &fd in &a.tap_fd {
                    let owned = inherit(fd)
                        .map_err(|e| format!("--tap-fd {fd} is not an open descriptor: {e}"))?;
                    taps.push(Tap::from_fd(owned)?);
                }
                taps
            }
        };
        let fds: Vec<OwnedFd> = taps.into_iter().map(Tap::into_fd).collect();
        let forward = Forward {
            fds: fds
                .iter()
                .map(|t| t.try_clone())
                .collect::<io::Result<_>>()
                .map_err(Error::Dup)?,
            flag: "--tap-fd",
            strip: STRIP,
            after: None,
        };
        let queue_pairs = fds.len();
        let device = NetDevice::new(
            fds,
            NetOptions {
                mac: a.mac.unwrap_or(MacAddress::DEFAULT).0,
                queue_pairs,
                queue_size: QUEUE_SIZE,
            },
        )?;
        Ok(Made { device, forward })
    }

    fn to_args(a: &NetArgs) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        for fd in &a.tap_fd {
            args.extend(["--tap-fd".into(), fd.to_string().into()]);
        }
        if let Some(name) = &a.tap_name {
            args.extend(["--tap-name".into(), name.into()]);
            args.extend(["--queue-pairs".into(), a.queue_pairs.to_string().into()]);
        }
        if let Some(mac) = a.mac {
            args.extend(["--mac".into(), mac.to_string().into()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(a: &NetArgs) -> NetArgs {
        let args: Vec<String> = NetProcess::to_args(a)
            .into_iter()
            .map(|s| s.into_string().expect("utf-8"))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NetArgs::from_args(&["net"], &args).expect("parses")
    }

    #[test]
    fn options_round_trip_across_exec() {
        for a in [
            NetArgs {
                tap_fd: vec![4, 5],
                tap_name: None,
                queue_pairs: 1,
                mac: Some("52:54:00:00:00:09".parse().expect("mac")),
            },
            NetArgs {
                tap_fd: Vec::new(),
                tap_name: Some("tap7".into()),
                queue_pairs: 3,
                mac: None,
            },
        ] {
            assert_eq!(round_trip(&a), a);
        }
    }

    #[test]
    fn taps_come_from_exactly_one_source() {
        let mut never = |_| -> io::Result<OwnedFd> { Err(io::ErrorKind::NotFound.into()) };
        let both = NetArgs {
            tap_fd: vec![4],
            tap_name: Some("t".into()),
            queue_pairs: 1,
            mac: None,
        };
        let err = NetProcess::make(&both, &mut never).err().expect("refused");
        assert!(err.to_string().contains("not both"), "{err}");
        let none = NetArgs {
            tap_fd: Vec::new(),
            tap_name: None,
            ..both.clone()
        };
        assert!(NetProcess::make(&none, &mut never).is_err());
        let closed = NetArgs {
            tap_name: None,
            ..both
        };
        let err = NetProcess::make(&closed, &mut never)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("--tap-fd 4"), "{err}");
    }
}
