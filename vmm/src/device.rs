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
use argh::FromArgs;
use executor::AsyncFd;
use virtio::process::{DeviceProcess, Forward, RunDevice, VHOST_USER_OPS};
use virtio::vhost_user::backend::{self, Device};
use virtio::vhost_user::Connection;
use virtio::DeviceType;

use crate::cli::{self, Endpoint};
use crate::death::{self, DeathReport};
use crate::sys;

/// Descriptor limit inside a device process: its socket, kick/call eventfds, memory regions,
/// the ring and its backend files.
const DEVICE_NOFILE: u64 = 1024;
/// Locked memory an io_uring ring may need on kernels that still count it.
const DEVICE_MEMLOCK: u64 = 64 << 20;

/// A device process: its type, its entry, and its `ringvm run` flags if it has its own.
pub struct Registered {
    pub device_type: DeviceType,
    entry: fn(&[String]) -> Result<()>,
    /// `None` for the devices `ringvm run` adds from flags of its own (rng, block, net).
    pub run: Option<RunFlags>,
}

/// Every device ringvm runs as a process of its own: `ringvm device <name>`, and for those
/// registered with `register_run`, `ringvm run` flags (see [`crate::run_flags`]).
pub const REGISTRY: &[Registered] = &[
    register::<virtio::RngProcess>(),
    register::<block::BlockProcess>(),
    register::<net::NetProcess>(),
    register_run::<vsock::VsockProcess>(),
    register::<console::ConsoleProcess>(),
];

const fn register<P: DeviceProcess>() -> Registered {
    Registered {
        device_type: P::TYPE,
        entry: run_process::<P>,
        run: None,
    }
}

/// A device that brings its own `ringvm run` flags ([`RunDevice`]).
const fn register_run<P: RunDevice + 'static>() -> Registered {
    Registered {
        run: Some(RunFlags {
            flags: P::RUN_FLAGS,
            specs: crate::run_flags::specs::<P>,
        }),
        ..register::<P>()
    }
}

/// A registered device's `ringvm run` flags, and what their values become.
pub struct RunFlags {
    pub flags: &'static [virtio::process::RunFlag],
    pub specs: crate::run_flags::SpecsFn,
}

/// Runs `ringvm device <name> [options...]` (`args` after `device`) until its frontend
/// disconnects. The arguments come straight from the command line: argh cannot take the
/// shared options and the device's own in one pass, so `run_process` parses them.
pub fn run(args: &[String]) -> Result<()> {
    let names: Vec<&str> = REGISTRY.iter().map(|r| r.device_type.name()).collect();
    match args.first().map(String::as_str) {
        None | Some("--help" | "-h" | "help") => {
            print!(
                "Usage: ringvm device <{}> [options]\n\n\
                 Run a device as a vhost-user backend, for ringvm or any vhost-user frontend.\n\
                 `ringvm device NAME --help` lists its options.\n",
                names.join("|")
            );
            Ok(())
        }
        Some(name) => match REGISTRY.iter().find(|r| r.device_type.name() == name) {
            Some(r) => (r.entry)(&args[1..]),
            None => bail!("unknown device {name} (expected {})", names.join(", ")),
        },
    }
}

/// The one entry of every device process: the shared options, the device's own, the device
/// made before the jail, then served.
fn run_process<P: DeviceProcess>(args: &[String]) -> Result<()> {
    let name = P::TYPE.name();
    end_plainly(name);
    let (common, own) = cli::CommonArgs::split(args).map_err(|e| anyhow!(e))?;
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let command = format!("ringvm device {name}");
    let options = match P::Options::from_args(&[command.as_str()], &own) {
        Ok(o) => o,
        Err(early) if early.status.is_ok() => {
            // --help: the device's own options, then the shared ones.
            print!("{}\n{}", early.output, cli::CommonArgs::help());
            return Ok(());
        }
        Err(early) => bail!("{}", early.output.trim_end()),
    };
    let endpoint = cli::endpoint(&common.socket, common.fd).map_err(|e| anyhow!(e))?;
    let sandbox = Sandboxing::from_flags(
        common.disable_sandbox,
        common.seccomp_log_failures,
        common.report_fd,
    );
    // Every inherited descriptor number once: the connection, the report pipe, the device's.
    let mut taken: Vec<i32> = common.fd.into_iter().chain(common.report_fd).collect();
    if taken.len() == 2 && taken[0] == taken[1] {
        bail!("--report-fd {} is also the connection's --fd", taken[0]);
    }
    let mut inherit = |fd: i32| -> std::io::Result<OwnedFd> {
        if taken.contains(&fd) {
            return Err(std::io::Error::other(format!(
                "descriptor {fd} is given twice (--fd, --report-fd and the device's own)"
            )));
        }
        taken.push(fd);
        sys::inherited_fd(fd)
    };
    virtio::log::set_level(common.log_level);
    virtio::log::write(
        &format!("ringvm device {name}"),
        virtio::log::Level::Debug,
        format_args!(
            "starting (pid {}, log level {})",
            std::process::id(),
            common.log_level.name()
        ),
    );
    let stats = common
        .stats_fd
        .map(|fd| inherit(fd).with_context(|| format!("--stats-fd {fd}")))
        .transpose()?;
    // Made here even when a jailed child will serve: bad arguments fail before listening.
    let made = P::make(&options, &mut inherit)
        .map_err(anyhow::Error::from_boxed)
        .with_context(|| format!("device {name}"))?;
    let mut forward = made.forward;
    let after = forward.after.take();
    let result = if let (Endpoint::Socket(path), true) = (&endpoint, sandbox.enabled) {
        drop(made.device);
        accept_then_jail(name, path, forward, stats, sandbox.report_fd)
    } else {
        drop(forward);
        if let Some(page) = stats {
            let page = memory::SharedCounters::from_fd(page, virtio::stats::COUNTERS)
                .context("--stats-fd is not a statistics page")?;
            virtio::stats::install(page);
        }
        let policy = seccomp::Policy::from_name(name)
            .ok_or_else(|| anyhow!("device {name}: no seccomp policy"))?;
        let ops: Vec<u8> = VHOST_USER_OPS.iter().chain(P::OPS).copied().collect();
        serve(made.device, endpoint, sandbox, policy, &ops)
            .with_context(|| format!("device {name}"))
    };
    // The device has ended (here, or in the jailed child): helpers of this process finish.
    if let Some(after) = after {
        after();
    }
    result
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
/// - Aborts (a failed allocation prints its message and calls abort()): the SIGABRT
///   reporter of `sys::install_death_reporters`, installed with the others after the jail.
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
/// forwarded descriptors and the statistics page); its record is passed on to this
/// process's own `report_fd`.
fn accept_then_jail(
    name: &str,
    path: &Path,
    forward: Forward,
    stats: Option<OwnedFd>,
    report_fd: Option<i32>,
) -> Result<()> {
    let report_out = report_fd
        .map(|fd| sys::inherited_fd(fd).with_context(|| format!("--report-fd {fd} is not open")))
        .transpose()?;
    let conn = accept_one(path)?;
    // The child's death report (see `crate::death`), after the forwarded descriptors.
    let (mut report, report_tx) = std::io::pipe().context("cannot create the report pipe")?;
    let mut args = jailed_args(std::env::args_os().skip(1).collect(), &forward);
    let mut next = 4 + forward.fds.len();
    if stats.is_some() {
        args.extend(["--stats-fd".into(), next.to_string().into()]);
        next += 1;
    }
    args.extend(["--report-fd".into(), next.to_string().into()]);
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut fds = vec![conn.as_fd()];
    fds.extend(forward.fds.iter().map(|f| f.as_fd()));
    fds.extend(stats.as_ref().map(|f| f.as_fd()));
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
    // A report the child did not write is no report, and one that does not fit how it
    // ended is not believed (`DeathReport::believed`). Read only what is there: the record is
    // in the pipe once the child has ended, but the pipe ends only when every write end
    // is closed, and the child may have passed one on to keep it open.
    let mut record = Vec::new();
    let mut chunk = [0u8; 2 * DeathReport::LEN];
    while record.len() <= DeathReport::LEN && sys::fd_readable(report.as_fd()).unwrap_or(false) {
        match report.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => record.extend_from_slice(&chunk[..n]),
        }
    }
    let death = DeathReport::believed(&record, &status);
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
/// descriptors' options in place of what they were opened from. `--report-fd N` and
/// `--stats-fd N` are dropped: N is this process's descriptor (the child gets its own
/// report pipe, and the statistics page at a number of its own).
fn jailed_args(args: Vec<OsString>, forward: &Forward) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--socket"
            || a == "--report-fd"
            || a == "--stats-fd"
            || forward.strip.iter().any(|s| a == *s)
        {
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
    // Its io-wq workers are bounded (executor::DEFAULT_MAX_IO_WORKERS) before the restriction.
    let ex = executor::Builder::new()
        .allow_ops(ops)
        .build()
        .context("cannot start the device's io_uring executor")?;
    // The inflight region a frontend may ask for (memfd_create is not in the policies): with
    // it the device's chains in flight survive its death (vmm::respawn).
    let inflight = backend::reserve_inflight(device.num_queues(), device.max_queue_size())
        .context("cannot reserve an inflight region")?;
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
    ex.run_until(backend::serve_with_inflight(
        Rc::new(device),
        Connection::new(AsyncFd::new(sock)),
        Some(inflight),
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
            "--stats-fd",
            "9",
            "--log-level",
            "debug",
        ]
        .map(OsString::from)
        .to_vec();
        assert_eq!(
            jailed_args(args, &Forward::default()),
            ["device", "rng", "--log-level", "debug", "--fd", "3"]
                .map(OsString::from)
                .to_vec()
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
            strip: &["--tap-fd", "--tap-name", "--queue-pairs"],
            after: None,
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
