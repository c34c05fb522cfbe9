//! `ringvm device ...`: one virtio device as a vhost-user backend process. ringvm spawns these
//! with a connected socket (`--fd`); any other vhost-user frontend can use them through
//! `--socket PATH`.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use executor::{opcode, AsyncFd};
use virtio::rng::Rng;
use virtio::vhost_user::backend::{self, Device};
use virtio::vhost_user::Connection;

use crate::cli::{self, DeviceArgs, DeviceCommand, Endpoint};
use crate::death::{self, DeathReport};
use crate::sys;

/// Descriptor limit inside a device process: its socket, kick/call eventfds, memory regions,
/// the ring and its backend files.
const DEVICE_NOFILE: u64 = 1024;
/// Locked memory an io_uring ring may need on kernels that still count it.
const DEVICE_MEMLOCK: u64 = 64 << 20;

/// Runs `ringvm device <type>` until its frontend disconnects.
pub fn run(args: DeviceArgs) -> Result<()> {
    end_plainly(match args.device {
        DeviceCommand::Rng(_) => "rng",
        DeviceCommand::Block(_) => "block",
        DeviceCommand::Net(_) => "net",
    });
    match args.device {
        DeviceCommand::Rng(a) => start(
            "rng",
            &a.socket,
            a.fd,
            Sandboxing::from_flags(a.disable_sandbox, a.seccomp_log_failures, a.report_fd),
            RNG_OPS,
            Forward::NONE(),
            || {
                let entropy = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
                Ok(Rng::new(entropy.into()))
            },
        ),
        DeviceCommand::Block(a) => {
            let spec = a.file;
            if a.queues == 0 || a.queues > MAX_BLOCK_QUEUES {
                bail!("--queues {}: expected 1 to {MAX_BLOCK_QUEUES}", a.queues);
            }
            start(
                "block",
                &a.socket,
                a.fd,
                Sandboxing::from_flags(a.disable_sandbox, a.seccomp_log_failures, a.report_fd),
                BLOCK_OPS,
                Forward::NONE(),
                || {
                    let disk =
                        block::Disk::open(&spec.path, spec.open_options()).with_context(|| {
                            format!("cannot open disk image {}", spec.path.display())
                        })?;
                    Ok(block::BlockDevice::new(
                        disk,
                        block::BlockOptions {
                            id: spec.id.clone(),
                            num_queues: a.queues,
                            queue_size: BLOCK_QUEUE_SIZE,
                        },
                    ))
                },
            )
        }
        DeviceCommand::Net(a) => {
            let mac = a.mac.unwrap_or(net::MacAddress::DEFAULT).0;
            let taps = open_taps(&a)?;
            let forward = Forward {
                fds: taps
                    .iter()
                    .map(|t| t.try_clone())
                    .collect::<std::io::Result<_>>()
                    .context("cannot duplicate a tap descriptor")?,
                flag: "--tap-fd",
                strip: NET_STRIP,
            };
            start(
                "net",
                &a.socket,
                a.fd,
                Sandboxing::from_flags(a.disable_sandbox, a.seccomp_log_failures, a.report_fd),
                NET_OPS,
                forward,
                || {
                    let queue_pairs = taps.len();
                    net::NetDevice::new(
                        taps,
                        net::NetOptions {
                            mac,
                            queue_pairs,
                            queue_size: NET_QUEUE_SIZE,
                        },
                    )
                    .context("cannot set up the virtio-net device")
                },
            )
        }
    }
}

/// Exit status of a device process that panicked (as Rust's own for a panic in `main`).
pub const PANIC_STATUS: i32 = 101;

/// Makes every way a device process ends work under its seccomp filter, whatever its
/// environment: called first, long before the filter.
///
/// - Errors: `anyhow` captures a backtrace with every error it makes when
///   `RUST_LIB_BACKTRACE`/`RUST_BACKTRACE` ask for one, and the unwinder that walks the
///   stack makes system calls (futex) no device policy lists: a protocol error would end the
///   device by SIGSYS instead of with its message and status 1. Backtraces are turned off
///   here, and one capture pins that (std reads the variables once per process).
///   ringvm's own devices get an empty environment anyway (`jail::spawn`); this covers a
///   device that another launcher starts with `--fd`.
/// - Panics: the hook writes `ringvm device NAME: panicked at ...` to stderr with one
///   write(2) and exits with [`PANIC_STATUS`]. std's default hook may print a backtrace and
///   unwinding may call into the unwinder; a panic in a device is a bug, and its message is
///   what is worth keeping.
fn end_plainly(name: &'static str) {
    // Single-threaded here (the first thing `ringvm device` does after parsing its
    // arguments), so changing the environment races with nothing.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    std::env::set_var("RUST_BACKTRACE", "0");
    let _pinned = std::backtrace::Backtrace::capture();
    std::panic::set_hook(Box::new(move |info| {
        let mut line = sys::StackText::<1024>::new();
        // A message longer than the buffer is cut; the write cannot fail otherwise.
        let _ = writeln!(line, "ringvm device {name}: {info}");
        sys::write_stderr_and_exit(line.as_bytes(), PANIC_STATUS)
    }));
}

// io_uring opcodes of every device: vhost-user messages with fds, timeouts on replies, kick
// eventfd reads and readiness polls (Read, AsyncCancel and Nop are always allowed), then the
// device's own data path.
/// virtio-rng: entropy read straight into guest buffers.
const RNG_OPS: &[u8] = &[
    opcode::RecvMsg::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
    opcode::Readv::CODE,
];
/// virtio-blk: reads and writes into guest memory, flush, discard and write-zeroes.
const BLOCK_OPS: &[u8] = &[
    opcode::RecvMsg::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// virtio-net: frames between the tap and guest memory.
const NET_OPS: &[u8] = &[
    opcode::RecvMsg::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Write::CODE,
];
/// Descriptors per net queue.
const NET_QUEUE_SIZE: u16 = 256;
/// The options a jailed net child gets as `--tap-fd` instead.
const NET_STRIP: &[&str] = &["--tap-fd", "--tap-name", "--queue-pairs"];

/// The tap queue descriptors of `ringvm device net`: inherited, or made by name.
fn open_taps(a: &cli::NetArgs) -> Result<Vec<OwnedFd>> {
    let mut numbers: Vec<i32> = a
        .tap_fd
        .iter()
        .copied()
        .chain(a.fd)
        .chain(a.report_fd)
        .collect();
    numbers.sort_unstable();
    if numbers.windows(2).any(|w| w[0] == w[1]) {
        bail!("a descriptor number is given twice (--fd, --tap-fd, --report-fd)");
    }
    match (&a.tap_name, a.tap_fd.is_empty()) {
        (Some(_), false) => bail!("give --tap-fd or --tap-name, not both"),
        (None, true) => bail!("give --tap-fd N (one per queue pair) or --tap-name NAME"),
        (Some(name), true) => {
            if a.queue_pairs == 0 || a.queue_pairs > MAX_NET_PAIRS {
                bail!(
                    "--queue-pairs {}: expected 1 to {MAX_NET_PAIRS}",
                    a.queue_pairs
                );
            }
            cli::open_taps(&cli::TapSource::Name(name.clone()), a.queue_pairs)
        }
        (None, false) => {
            let mut fds = Vec::new();
            for &fd in &a.tap_fd {
                fds.extend(cli::open_taps(&cli::TapSource::Fd(fd), 1)?);
            }
            Ok(fds)
        }
    }
}

/// Most queue pairs a NIC takes.
const MAX_NET_PAIRS: usize = 64;

/// Most request queues a block device takes (one per vCPU is the VMM's default).
const MAX_BLOCK_QUEUES: usize = 64;
/// Descriptors per block queue.
const BLOCK_QUEUE_SIZE: u16 = 256;

/// Descriptors a `--socket` device hands on to its jailed child (which cannot open them in
/// its own namespaces): they become `flag 4`, `flag 5`, ... after the connection on 3, and the
/// options in `strip` (each with its value) are dropped from the child's arguments.
struct Forward {
    fds: Vec<OwnedFd>,
    flag: &'static str,
    strip: &'static [&'static str],
}

impl Forward {
    const NONE: fn() -> Forward = || Forward {
        fds: Vec::new(),
        flag: "",
        strip: &[],
    };
}

/// Makes the device (opening its files while the whole file system is still visible), then
/// serves it: in this process, or with `--socket` and the sandbox on, in a jailed child.
fn start<D: Device>(
    name: &str,
    socket: &Option<std::path::PathBuf>,
    fd: Option<i32>,
    sandbox: Sandboxing,
    ops: &[u8],
    forward: Forward,
    make: impl FnOnce() -> Result<D>,
) -> Result<()> {
    let endpoint = cli::endpoint(socket, fd).map_err(|e| anyhow!(e))?;
    // Made here even when a jailed child will serve: bad arguments fail before listening.
    let device = make().with_context(|| format!("device {name}"))?;
    if let (Endpoint::Socket(path), true) = (&endpoint, sandbox.enabled) {
        drop(device);
        return accept_then_jail(name, path, forward, sandbox.report_fd);
    }
    let policy = seccomp::Policy::from_name(name)
        .ok_or_else(|| anyhow!("device {name}: no seccomp policy"))?;
    serve(device, endpoint, sandbox, policy, ops).with_context(|| format!("device {name}"))
}

/// `--disable-sandbox`, `--seccomp-log-failures` and `--report-fd` of a device.
#[derive(Debug, Clone, Copy)]
struct Sandboxing {
    enabled: bool,
    log_failures: bool,
    report_fd: Option<i32>,
}

impl Sandboxing {
    fn from_flags(
        disable_sandbox: bool,
        seccomp_log_failures: bool,
        report_fd: Option<i32>,
    ) -> Sandboxing {
        Sandboxing {
            enabled: !disable_sandbox,
            log_failures: seccomp_log_failures,
            report_fd,
        }
    }
}

/// `--socket` with the sandbox on: the jail needs a process spawned into new namespaces, so
/// this one accepts the frontend, then runs the same command jailed on the accepted
/// connection (`--fd 3`) and ends as it ends.
///
/// The child reports how it died on a pipe of this process (`--report-fd` after the
/// forwarded descriptors); its record is passed on to this process's own `report_fd`.
fn accept_then_jail(
    name: &str,
    path: &Path,
    forward: Forward,
    report_fd: Option<i32>,
) -> Result<()> {
    let report_out = report_fd
        .map(|fd| sys::inherited_fd(fd).with_context(|| format!("--report-fd {fd} is not open")))
        .transpose()?;
    let conn = accept_one(path)?;
    // The child's death report (see `crate::death`), after the forwarded descriptors.
    let (mut report, report_tx) = std::io::pipe().context("cannot create the report pipe")?;
    let mut args = jailed_args(std::env::args_os().skip(1).collect(), &forward);
    args.extend([
        "--report-fd".into(),
        (4 + forward.fds.len()).to_string().into(),
    ]);
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut fds = vec![conn.as_fd()];
    fds.extend(forward.fds.iter().map(|f| f.as_fd()));
    fds.push(report_tx.as_fd());
    let child = jail::spawn(
        Path::new("/proc/self/exe"),
        &args,
        &fds,
        &jail::Sandbox { enabled: true },
    )
    .with_context(|| format!("cannot start the jailed device {name}"))?;
    drop(fds);
    drop(conn);
    drop(forward);
    // Only the child holds the write end now: the read below ends when it does.
    drop(report_tx);
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for the jailed device {name}"))?;
    if status.success() {
        return Ok(());
    }
    let mut record = Vec::new();
    // A report the child did not write is no report.
    let _ = report.read_to_end(&mut record);
    let death = DeathReport::from_bytes(&record);
    if let (Some(out), Some(d)) = (report_out, death) {
        // Best effort: the error below says the same.
        let _ = File::from(out).write_all(&d.to_bytes());
    }
    Err(anyhow!(
        "device {name} (pid {}) {}",
        child.pid,
        death::describe(&status.to_string(), death.as_ref())
    ))
}

/// This process's arguments with `--socket PATH` replaced by `--fd 3`, and the forwarded
/// descriptors' options in place of what they were opened from. `--report-fd N` is
/// dropped: N is this process's descriptor (the child gets its own report pipe).
fn jailed_args(args: Vec<OsString>, forward: &Forward) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--socket" || a == "--report-fd" || forward.strip.iter().any(|s| a == *s) {
            it.next();
        } else {
            out.push(a);
        }
    }
    out.extend(["--fd".into(), "3".into()]);
    for i in 0..forward.fds.len() {
        out.push(forward.flag.into());
        out.push((4 + i).to_string().into());
    }
    out
}

/// Gets the connection, creates the restricted ring, enters the jail, and serves the frontend
/// on the io_uring executor.
fn serve<D: Device>(
    device: D,
    endpoint: Endpoint,
    sandbox: Sandboxing,
    policy: seccomp::Policy,
    ops: &[u8],
) -> Result<()> {
    let report = match sandbox.report_fd {
        Some(fd) if Some(fd) == endpoint_fd(&endpoint) => {
            bail!("--report-fd {fd} is also the connection's --fd")
        }
        Some(fd) => {
            Some(sys::inherited_fd(fd).with_context(|| format!("--report-fd {fd} is not open"))?)
        }
        None => None,
    };
    let sock = match endpoint {
        Endpoint::Fd(fd) => {
            sys::inherited_socket(fd).with_context(|| format!("--fd {fd} is not an open socket"))?
        }
        Endpoint::Socket(path) => accept_one(&path)?,
    };
    // The ring exists and is restricted before the jail: io_uring operations are not seen by
    // seccomp, so the ring may only do what this device needs, and nothing that opens a path.
    let ex = executor::Builder::new()
        .allow_ops(ops)
        .build()
        .context("cannot start the device's io_uring executor")?;
    jail::enter(
        &jail::Sandbox {
            enabled: sandbox.enabled,
        },
        &jail::Limits {
            nofile: DEVICE_NOFILE,
            memlock: DEVICE_MEMLOCK,
        },
    )
    .context("cannot enter the device sandbox")?;
    // How the process dies is reported (to ringvm through --report-fd, and on stderr): a
    // memory fault with its signal and address, a refused call with its number.
    let trap = sandbox.enabled && !sandbox.log_failures;
    sys::install_death_reporters(report, trap)
        .context("cannot install the signal handlers that report a death")?;
    // Then, in front of the SIGBUS reporter (which it calls for a fault it cannot survive): a
    // frontend that shrinks the memory it sent makes the device end with an error naming the
    // region, not die of SIGBUS.
    memory::fault::install_sigbus_handler().context("cannot install the SIGBUS handler")?;
    // Last: from here on the process can only make the syscalls its policy lists. A refused
    // call raises SIGSYS, whose handler reports its number and ends the process by SIGSYS.
    if sandbox.enabled {
        let mode = if trap {
            seccomp::Mode::Trap
        } else {
            seccomp::Mode::Log
        };
        seccomp::install_mode(policy, mode)
            .context("cannot install the device's seccomp filter")?;
    }
    ex.run_until(backend::serve(
        Rc::new(device),
        Connection::new(AsyncFd::new(sock)),
    ))
    .map_err(anyhow::Error::from)
}

fn endpoint_fd(endpoint: &Endpoint) -> Option<i32> {
    match endpoint {
        Endpoint::Fd(fd) => Some(*fd),
        Endpoint::Socket(_) => None,
    }
}

/// Listens on `path`, accepts one frontend, and removes the socket file.
///
/// The socket is bound under a temporary name and linked to `path` once it listens: a
/// frontend that waits for `path` to appear never finds it between bind and listen (where a
/// connect is refused). Like a plain bind, an existing `path` is an error.
fn accept_one(path: &Path) -> Result<OwnedFd> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("cannot listen on {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.with_context(|| format!("cannot listen on {}", path.display()))?;
    let accepted = listener.accept();
    let _ = std::fs::remove_file(path);
    let (conn, _) = accepted.with_context(|| format!("accept on {}", path.display()))?;
    Ok(conn.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailed_args_trade_the_socket_for_the_inherited_fd() {
        let args = [
            "device",
            "rng",
            "--socket",
            "/run/rng.sock",
            "--report-fd",
            "7",
        ]
        .map(OsString::from)
        .to_vec();
        assert_eq!(
            jailed_args(args, &Forward::NONE()),
            ["device", "rng", "--fd", "3"].map(OsString::from).to_vec()
        );
    }

    #[test]
    fn jailed_args_replace_forwarded_taps() {
        let args = [
            "device",
            "net",
            "--tap-name",
            "t0",
            "--socket",
            "/s",
            "--queue-pairs",
            "2",
            "--mac",
            "52:54:00:00:00:01",
        ]
        .map(OsString::from)
        .to_vec();
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let forward = Forward {
            fds: vec![a.into(), b.into()],
            flag: "--tap-fd",
            strip: NET_STRIP,
        };
        assert_eq!(
            jailed_args(args, &forward),
            [
                "device",
                "net",
                "--mac",
                "52:54:00:00:00:01",
                "--fd",
                "3",
                "--tap-fd",
                "4",
                "--tap-fd",
                "5"
            ]
            .map(OsString::from)
            .to_vec()
        );
    }
}
