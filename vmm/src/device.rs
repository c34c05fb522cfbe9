//! `ringvm device ...`: one virtio device as a vhost-user backend process. ringvm spawns these
//! with a connected socket (`--fd`); any other vhost-user frontend can use them through
//! `--socket PATH`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
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
use crate::sys;

/// Descriptor limit inside a device process: its socket, kick/call eventfds, memory regions,
/// the ring and its backend files.
const DEVICE_NOFILE: u64 = 1024;
/// Locked memory an io_uring ring may need on kernels that still count it.
const DEVICE_MEMLOCK: u64 = 64 << 20;

/// Runs `ringvm device <type>` until its frontend disconnects.
pub fn run(args: DeviceArgs) -> Result<()> {
    match args.device {
        DeviceCommand::Rng(a) => start("rng", &a.socket, a.fd, a.disable_sandbox, RNG_OPS, || {
            let entropy = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
            Ok(Rng::new(entropy.into()))
        }),
        DeviceCommand::Block(a) => {
            let spec = cli::parse_disk(&a.file, false).map_err(|e| anyhow!("--file: {e}"))?;
            if a.queues == 0 || a.queues > MAX_BLOCK_QUEUES {
                bail!("--queues {}: expected 1 to {MAX_BLOCK_QUEUES}", a.queues);
            }
            start(
                "block",
                &a.socket,
                a.fd,
                a.disable_sandbox,
                BLOCK_OPS,
                || {
                    let options = block::OpenOptions {
                        read_only: spec.read_only,
                        direct: spec.direct,
                    };
                    let disk = block::Disk::open(&spec.path, options).with_context(|| {
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
    }
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

/// Most request queues a block device takes (one per vCPU is the VMM's default).
const MAX_BLOCK_QUEUES: usize = 64;
/// Descriptors per block queue.
const BLOCK_QUEUE_SIZE: u16 = 256;

/// Makes the device (opening its files while the whole file system is still visible), then
/// serves it: in this process, or with `--socket` and the sandbox on, in a jailed child.
fn start<D: Device>(
    name: &str,
    socket: &Option<std::path::PathBuf>,
    fd: Option<i32>,
    disable_sandbox: bool,
    ops: &[u8],
    make: impl FnOnce() -> Result<D>,
) -> Result<()> {
    let endpoint = cli::endpoint(socket, fd).map_err(|e| anyhow!(e))?;
    let sandbox = !disable_sandbox;
    // Made here even when a jailed child will serve: bad arguments fail before listening.
    let device = make().with_context(|| format!("device {name}"))?;
    if let (Endpoint::Socket(path), true) = (&endpoint, sandbox) {
        drop(device);
        return accept_then_jail(name, path);
    }
    serve(device, endpoint, sandbox, ops).with_context(|| format!("device {name}"))
}

/// `--socket` with the sandbox on: the jail needs a process spawned into new namespaces, so
/// this one accepts the frontend, then runs the same command jailed on the accepted
/// connection (`--fd 3`) and ends as it ends.
fn accept_then_jail(name: &str, path: &Path) -> Result<()> {
    let conn = accept_one(path)?;
    let args = jailed_args(std::env::args_os().skip(1).collect());
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let child = jail::spawn(
        Path::new("/proc/self/exe"),
        &args,
        &[conn.as_fd()],
        &jail::Sandbox { enabled: true },
    )
    .with_context(|| format!("cannot start the jailed device {name}"))?;
    drop(conn);
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for the jailed device {name}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(anyhow!("device {name} (pid {}) {status}", child.pid))
    }
}

/// This process's arguments with `--socket PATH` replaced by `--fd 3`.
fn jailed_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--socket" {
            it.next();
        } else {
            out.push(a);
        }
    }
    out.extend(["--fd".into(), "3".into()]);
    out
}

/// Gets the connection, creates the restricted ring, enters the jail, and serves the frontend
/// on the io_uring executor.
fn serve<D: Device>(device: D, endpoint: Endpoint, sandbox: bool, ops: &[u8]) -> Result<()> {
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
        &jail::Sandbox { enabled: sandbox },
        &jail::Limits {
            nofile: DEVICE_NOFILE,
            memlock: DEVICE_MEMLOCK,
        },
    )
    .context("cannot enter the device sandbox")?;
    ex.run_until(backend::serve(
        Rc::new(device),
        Connection::new(AsyncFd::new(sock)),
    ))
    .map_err(anyhow::Error::from)
}

/// Listens on `path`, accepts one frontend, and removes the socket file.
fn accept_one(path: &Path) -> Result<OwnedFd> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
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
        let args = ["device", "rng", "--socket", "/run/rng.sock"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            jailed_args(args),
            ["device", "rng", "--fd", "3"].map(OsString::from).to_vec()
        );
    }
}
