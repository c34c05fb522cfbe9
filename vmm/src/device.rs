//! `ringvm device ...`: one virtio device as a vhost-user backend process. ringvm spawns these
//! with a connected socket (`--fd`); any other vhost-user frontend can use them through
//! `--socket PATH`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, Context, Result};
use executor::{AsyncFd, Executor};
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
        DeviceCommand::Rng(a) => {
            let endpoint = cli::endpoint(&a.socket, a.fd).map_err(|e| anyhow!(e))?;
            let sandbox = !a.disable_sandbox;
            if let (Endpoint::Socket(path), true) = (&endpoint, sandbox) {
                return accept_then_jail("rng", path);
            }
            let entropy = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
            serve(Rng::new(entropy.into()), endpoint, sandbox).context("device rng")
        }
    }
}

/// `--socket` with the sandbox on: the jail needs a process spawned into new namespaces, so
/// this one accepts the frontend, then runs the same command jailed on the accepted
/// connection (`--fd 3`) and ends as it ends.
fn accept_then_jail(name: &str, path: &Path) -> Result<()> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let accepted = listener.accept();
    let _ = std::fs::remove_file(path);
    let (conn, _) = accepted.with_context(|| format!("accept on {}", path.display()))?;
    drop(listener);
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

/// Gets the connection, enters the jail, and serves the frontend on an io_uring executor.
fn serve<D: Device>(device: D, endpoint: Endpoint, sandbox: bool) -> Result<()> {
    let ex = Executor::new().context("cannot start the device's io_uring executor")?;
    ex.run_until(async move {
        let sock = match endpoint {
            Endpoint::Fd(fd) => AsyncFd::new(
                sys::inherited_socket(fd)
                    .with_context(|| format!("--fd {fd} is not an open socket"))?,
            ),
            Endpoint::Socket(path) => accept_one(&path).await?,
        };
        jail::enter(
            &jail::Sandbox { enabled: sandbox },
            &jail::Limits {
                nofile: DEVICE_NOFILE,
                memlock: DEVICE_MEMLOCK,
            },
        )
        .context("cannot enter the device sandbox")?;
        backend::serve(Rc::new(device), Connection::new(sock))
            .await
            .map_err(anyhow::Error::from)
    })
}

/// Listens on `path`, accepts one frontend, and removes the socket file.
async fn accept_one(path: &Path) -> Result<AsyncFd> {
    let listener = executor::listen_unix(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let conn = listener.accept().await;
    let _ = std::fs::remove_file(path);
    conn.with_context(|| format!("accept on {}", path.display()))
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
