//! `ringvm device vsock`: the virtio-vsock device as a process of its own, and the spec of
//! `ringvm run --vsock`.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;

use argh::FromArgs;
use virtio::process::{
    flag_error, DeviceProcess, Forward, Made, MakeError, Planned, RunDevice, RunFlag, SpecKeys,
};
use virtio::DeviceType;

use crate::{Broker, VsockDevice, VsockOptions, BUF_ALLOC_RANGE};

/// The options a jailed child of a `--socket` device gets as `--broker-fd` instead.
const STRIP: &[&str] = &["--uds", "--broker-fd"];

/// virtio-vsock: stream sockets between the guest and host processes on unix sockets.
// Its field docs are argh's help text: <port> there is a placeholder, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(FromArgs, Debug, Clone, PartialEq, Eq)]
pub struct VsockArgs {
    /// the guest's context ID (3 and up)
    #[argh(option)]
    pub cid: u64,
    /// the host side: host processes connect to this unix socket (and write CONNECT
    /// <port>), guest connections to host port P reach PATH_P; this process runs the broker
    /// (with --socket and the sandbox on, its unjailed front does)
    #[argh(option)]
    pub uds: Option<PathBuf>,
    /// the broker channel, already open on this descriptor (the VMM runs the broker)
    #[argh(option)]
    pub broker_fd: Option<i32>,
    /// the receive buffer each connection advertises to the guest, in bytes (4096 to
    /// 16777216; default 262144): what a guest sender has in flight before it waits
    #[argh(option, from_str_fn(parse_buf_alloc))]
    pub buf_alloc: Option<u32>,
}

/// `--buf-alloc` and `buf_alloc=`: bytes, within [`BUF_ALLOC_RANGE`].
fn parse_buf_alloc(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|b| BUF_ALLOC_RANGE.contains(b))
        .ok_or_else(|| {
            format!(
                "buf_alloc={v}: expected {} to {} bytes",
                BUF_ALLOC_RANGE.start(),
                BUF_ALLOC_RANGE.end()
            )
        })
}

/// virtio-vsock as a device process.
#[derive(Debug)]
pub struct VsockProcess;

impl DeviceProcess for VsockProcess {
    const TYPE: DeviceType = DeviceType::Vsock;
    /// Broker frames and host streams move with RecvMsg, SendMsg and Read: the vhost-user
    /// opcodes and READ, which every ring allows (see [`crate::VSOCK_OPS`]).
    const OPS: &'static [u8] = &[];
    type Options = VsockArgs;
    type Device = VsockDevice;

    fn make(
        a: &VsockArgs,
        inherit: &mut dyn FnMut(i32) -> io::Result<OwnedFd>,
    ) -> Result<Made<VsockDevice>, MakeError> {
        let mut broker = None;
        let channel = match (&a.uds, a.broker_fd) {
            (Some(path), None) => {
                // Runs on its own thread until the device (or its jailed child) closes the
                // channel; it removes PATH then, and `after` waits for that.
                let (b, channel) = Broker::new(path)?;
                broker = Some(b.spawn()?);
                channel
            }
            (None, Some(fd)) => inherit(fd)
                .map_err(|e| format!("--broker-fd {fd} is not an open descriptor: {e}"))?,
            _ => return Err("give --uds PATH or --broker-fd N".into()),
        };
        let forward = Forward {
            fds: vec![channel.try_clone()?],
            flag: "--broker-fd",
            strip: STRIP,
            after: broker.map(|b| -> Box<dyn FnOnce()> {
                Box::new(move || {
                    if let Ok(Err(e)) = b.join() {
                        let what = format_args!("broker: {e}");
                        virtio::log::write("ringvm device vsock", virtio::log::Level::Error, what);
                    }
                })
            }),
        };
        let mut options = VsockOptions::new(a.cid);
        if let Some(b) = a.buf_alloc {
            options.buf_alloc = b;
        }
        let device = VsockDevice::new(options, channel)?;
        Ok(Made { device, forward })
    }

    fn to_args(a: &VsockArgs) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--cid".into(), a.cid.to_string().into()];
        if let Some(path) = &a.uds {
            args.extend(["--uds".into(), path.into()]);
        }
        if let Some(fd) = a.broker_fd {
            args.extend(["--broker-fd".into(), fd.to_string().into()]);
        }
        if let Some(b) = a.buf_alloc {
            args.extend(["--buf-alloc".into(), b.to_string().into()]);
        }
        args
    }
}

/// `ringvm run --vsock cid=N[,uds=PATH]` and crosvm's `--cid N`: the broker runs in the VMM,
/// the device process gets its channel.
impl RunDevice for VsockProcess {
    const RUN_FLAGS: &'static [RunFlag] = &[
        RunFlag {
            name: "--vsock",
            value: "cid=N[,uds=PATH][,buf_alloc=BYTES]",
            help: "a virtio-vsock device: cid=N[,uds=PATH][,buf_alloc=BYTES]; host processes \
                   connect to PATH (and write CONNECT <port>), guest connections to host port \
                   P reach PATH_P (default PATH: a socket in the temporary directory, printed \
                   at start); buf_alloc: each connection's receive buffer (default 262144)",
        },
        RunFlag {
            name: "--cid",
            value: "N",
            help: "crosvm's spelling of --vsock cid=N",
        },
    ];
    type Spec = VsockSpec;

    fn specs(given: &[(&'static str, String)]) -> Result<Vec<VsockSpec>, String> {
        let mut specs = Vec::new();
        for (flag, value) in given {
            let spec = if *flag == "--cid" {
                format!("cid={value}").parse::<VsockSpec>()
            } else {
                value.parse()
            };
            specs.push(spec.map_err(|e| flag_error(flag, value, e))?);
        }
        if specs.len() > 1 {
            return Err(if given.iter().all(|(f, _)| *f == given[0].0) {
                format!(
                    "{} given more than once (one vsock device per VM)",
                    given[0].0
                )
            } else {
                "give --vsock or --cid, not both".into()
            });
        }
        Ok(specs)
    }

    fn plan(spec: &VsockSpec, first_fd: i32) -> Result<Planned<VsockArgs>, MakeError> {
        // The jailed device opens nothing: the VMM listens on PATH and connects to
        // PATH_<port> for it, with the broker on its main thread's executor.
        let path = match &spec.uds {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!("ringvm-{}.vsock", std::process::id()));
                virtio::log::write(
                    "ringvm",
                    virtio::log::Level::Info,
                    format_args!(
                        "vsock cid {}: host processes connect to {}",
                        spec.cid,
                        p.display()
                    ),
                );
                p
            }
        };
        let (broker, channel) = Broker::new(&path).map_err(|e| -> MakeError {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
            format!(
                "cannot set up its host side: {e}{}",
                cause.unwrap_or_default()
            )
            .into()
        })?;
        Ok(Planned {
            options: VsockArgs {
                cid: spec.cid,
                uds: None,
                broker_fd: Some(first_fd),
                buf_alloc: spec.buf_alloc,
            },
            fds: vec![channel],
            host: Some(Box::pin(async move {
                if let Err(e) = broker.serve().await {
                    virtio::log::write(
                        "ringvm",
                        virtio::log::Level::Error,
                        format_args!("vsock broker: {e}"),
                    );
                }
            })),
        })
    }
}

/// `ringvm run --vsock cid=N[,uds=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    /// Where host processes connect; `None`: a path ringvm picks and prints.
    pub uds: Option<PathBuf>,
    /// Each connection's receive buffer; `None`: [`crate::DEFAULT_BUF_ALLOC`].
    pub buf_alloc: Option<u32>,
}

impl FromStr for VsockSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<VsockSpec, String> {
        let (mut cid, mut uds, mut buf_alloc) = (None, None, None);
        let mut keys = SpecKeys::default();
        for kv in s.split(',').filter(|s| !s.is_empty()) {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            match kv.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse::<u64>()
                            .ok()
                            .filter(|c| (3..u64::from(u32::MAX)).contains(c))
                            .ok_or_else(|| format!("cid={v}: expected 3 to 4294967294"))?,
                    )
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                Some(("buf_alloc", v)) => buf_alloc = Some(parse_buf_alloc(v)?),
                _ => {
                    return Err(format!(
                        "unknown option '{kv}' (expected cid=N[,uds=PATH][,buf_alloc=BYTES])"
                    ))
                }
            }
            keys.once(key)?;
        }
        Ok(VsockSpec {
            cid: cid.ok_or("cid= is missing")?,
            uds,
            buf_alloc,
        })
    }
}

impl fmt::Display for VsockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cid={}", self.cid)?;
        if let Some(p) = &self.uds {
            write!(f, ",uds={}", p.display())?;
        }
        if let Some(b) = self.buf_alloc {
            write!(f, ",buf_alloc={b}")?;
        }
        Ok(())
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
            VsockArgs {
                cid: 3,
                uds: Some("/run/v m.sock".into()),
                broker_fd: None,
                buf_alloc: None,
            },
            VsockArgs {
                cid: 77,
                uds: None,
                broker_fd: Some(4),
                buf_alloc: Some(1 << 20),
            },
        ] {
            assert_eq!(args_round_trip::<VsockProcess>(&a).unwrap(), a);
        }
    }

    #[test]
    fn run_specs_parse_and_print_back() {
        let s: VsockSpec = "cid=5,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((s.cid, s.uds.as_deref()), (5, Some("/tmp/v.sock".as_ref())));
        assert_eq!(s.to_string().parse::<VsockSpec>().unwrap(), s);
        let s: VsockSpec = "buf_alloc=65536,cid=6".parse().unwrap();
        assert_eq!(s.buf_alloc, Some(65536));
        assert_eq!(s.to_string().parse::<VsockSpec>().unwrap(), s);
        assert_eq!("cid=9".parse::<VsockSpec>().unwrap().uds, None);
        for bad in [
            "",
            "uds=/x",
            "cid=2",
            "cid=4294967295",
            "cid=x",
            "cid=3,port=1",
            "cid=3,buf_alloc=100",
            "cid=3,buf_alloc=x",
            "cid=3,buf_alloc=4294967295",
        ] {
            assert!(bad.parse::<VsockSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn run_flags_give_one_device_and_errors_name_their_flag() {
        let given = |g: &[(&'static str, &str)]| {
            let g: Vec<(&'static str, String)> =
                g.iter().map(|(f, v)| (*f, v.to_string())).collect();
            VsockProcess::specs(&g)
        };
        assert_eq!(given(&[]).unwrap(), vec![]);
        assert_eq!(
            given(&[("--cid", "9")]).unwrap(),
            vec!["cid=9".parse::<VsockSpec>().unwrap()]
        );
        assert_eq!(given(&[("--vsock", "cid=4,uds=/v")]).unwrap()[0].cid, 4);
        let err = given(&[("--vsock", "cid=2")]).unwrap_err();
        assert!(
            err.contains("option '--vsock'") && err.contains("cid=2"),
            "{err}"
        );
        let err = given(&[("--cid", "x")]).unwrap_err();
        assert!(err.contains("option '--cid'"), "{err}");
        assert!(given(&[("--vsock", "cid=3"), ("--cid", "4")])
            .unwrap_err()
            .contains("not both"));
        assert!(given(&[("--cid", "3"), ("--cid", "4")])
            .unwrap_err()
            .contains("more than once"));
        let names: Vec<&str> = VsockProcess::RUN_FLAGS.iter().map(|f| f.name).collect();
        assert_eq!(names, ["--vsock", "--cid"]);
    }

    #[test]
    fn a_planned_device_inherits_its_broker_channel_at_first_fd() {
        let dir = std::env::temp_dir().join(format!("vsock-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec: VsockSpec = format!("cid=5,uds={}", dir.join("v.sock").display())
            .parse()
            .unwrap();
        let planned = VsockProcess::plan(&spec, 4).unwrap();
        assert_eq!(
            planned.options,
            VsockArgs {
                cid: 5,
                uds: None,
                broker_fd: Some(4),
                buf_alloc: None,
            }
        );
        assert_eq!(planned.fds.len(), 1);
        assert!(planned.host.is_some());
        assert!(dir.join("v.sock").exists(), "the broker listens on PATH");
        // A second device on the same PATH is refused with the reason.
        let err = VsockProcess::plan(&spec, 4).err().unwrap().to_string();
        assert!(err.contains("host side"), "{err}");
        drop(planned);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_channel_comes_from_exactly_one_place() {
        let mut never = |_| -> io::Result<OwnedFd> { Err(io::ErrorKind::NotFound.into()) };
        let neither = VsockArgs {
            cid: 3,
            uds: None,
            broker_fd: None,
            buf_alloc: None,
        };
        assert!(VsockProcess::make(&neither, &mut never).is_err());
        let both = VsockArgs {
            uds: Some("/nonexistent/v.sock".into()),
            broker_fd: Some(4),
            ..neither
        };
        assert!(VsockProcess::make(&both, &mut never).is_err());
    }
}
