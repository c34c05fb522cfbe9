//! The control socket (`ringvm run -s PATH`): a versioned JSON protocol, one request per
//! line and one response per line ([`protocol`]), served on the main thread's executor.
//!
//! Each client is a task of its own, so a client that is slow, silent or gone holds up
//! nobody else: it has [`IDLE_TIMEOUT`] to send each request and [`WRITE_TIMEOUT`] to take
//! each response, its request lines may be at most [`MAX_LINE`] bytes, and at most
//! [`MAX_CLIENTS`] are served at once. A malformed request gets a JSON error and the
//! connection goes on; a line that is too long, or a client that times out, gets a JSON error
//! and is disconnected. Nothing a client does reaches the VM except the commands themselves.

pub mod protocol;
pub mod stats;

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use executor::AsyncFd;
use serde_json::{json, Map, Value};
use virtio::log::Level;

use crate::exit::{ExitReason, VmExit};
use crate::vcpus::VcpuControl;
use protocol::Request;
pub use stats::{ControlledDevice, ProcessStats};

/// Longest request line accepted (its newline not counted).
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send a request (from connecting, or from the last response).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read a response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 256;

/// Where the socket goes: `path`, or `path/ringvm-<pid>.sock` if `path` is a directory.
pub fn socket_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(format!("ringvm-{}.sock", std::process::id()))
    } else {
        path.to_path_buf()
    }
}

/// A bound control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: AsyncFd,
}

impl ControlSocket {
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        let listener = executor::listen_unix(path)?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the executor stops polling it.
    pub async fn serve(self: Rc<Self>, vm: Rc<ControlTarget>) {
        let clients = Rc::new(Cell::new(0usize));
        loop {
            match self.listener.accept().await {
                Ok(conn) => {
                    let vm = vm.clone();
                    let clients = clients.clone();
                    executor::spawn(async move {
                        if clients.get() >= MAX_CLIENTS {
                            let line = protocol::error("too many control connections");
                            let _ = write_line(&conn, line).await;
                            return;
                        }
                        clients.set(clients.get() + 1);
                        serve_client(&conn, &vm).await;
                        clients.set(clients.get() - 1);
                    })
                    .detach();
                }
                Err(e) => {
                    log(Level::Error, format_args!("control socket accept: {e}"));
                    return;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What control requests act on.
pub struct ControlTarget {
    pub exit: Arc<VmExit>,
    pub vcpus: Arc<VcpuControl>,
    pub devices: Vec<ControlledDevice>,
    suspended: Cell<bool>,
    /// A suspend or resume is under way (they take turns).
    busy: Cell<bool>,
}

impl ControlTarget {
    pub fn new(
        exit: Arc<VmExit>,
        vcpus: Arc<VcpuControl>,
        devices: Vec<ControlledDevice>,
    ) -> ControlTarget {
        ControlTarget {
            exit,
            vcpus,
            devices,
            suspended: Cell::new(false),
            busy: Cell::new(false),
        }
    }

    fn state(&self) -> &'static str {
        if self.suspended.get() {
            "suspended"
        } else {
            "running"
        }
    }

    /// Answers one request line; `stop` is acted on by the caller once the answer is sent.
    async fn answer(&self, line: &[u8]) -> (String, bool) {
        let request = match protocol::parse(line) {
            Ok(r) => r,
            Err(e) => {
                log(
                    Level::Debug,
                    format_args!("control: refused a request: {e}"),
                );
                return (protocol::error(&e), false);
            }
        };
        log(Level::Debug, format_args!("control: {request:?}"));
        let result = match request {
            Request::Stop => Ok(Map::new()),
            Request::Suspend | Request::Resume => {
                self.suspend_or_resume(request == Request::Suspend).await
            }
            Request::Status => Ok(Map::new()),
            Request::Stats => {
                let stats = stats::collect(&self.vcpus, &self.devices, self.state()).await;
                Ok(Map::from_iter([("stats".to_string(), stats)]))
            }
        };
        let line = match result {
            Ok(mut fields) => {
                fields.insert("state".into(), json!(self.state()));
                protocol::ok(fields)
            }
            Err(e) => protocol::error(&e),
        };
        (line, request == Request::Stop)
    }

    /// Sends `reply`, then stops the VM if it answered `stop`.
    async fn reply(&self, conn: &AsyncFd, (reply, stop): (String, bool)) -> io::Result<()> {
        let sent = write_line(conn, reply).await;
        if stop {
            self.exit.report(ExitReason::Stopped);
        }
        sent
    }

    async fn suspend_or_resume(&self, suspend: bool) -> Result<Map<String, Value>, String> {
        if self.busy.replace(true) {
            return Err("another suspend or resume is under way".into());
        }
        let start = std::time::Instant::now();
        let res = if suspend == self.suspended.get() {
            Ok(())
        } else if suspend {
            self.suspend().await
        } else {
            self.resume().await
        };
        self.busy.set(false);
        match &res {
            Ok(()) => log(
                Level::Info,
                format_args!("{} in {:?}", self.state(), start.elapsed()),
            ),
            Err(e) => log(Level::Warn, format_args!("control: {e}")),
        }
        res.map(|()| Map::new())
    }

    /// vCPUs first (nothing new reaches the devices), then each device's rings: every
    /// request in flight completes before this returns.
    async fn suspend(&self) -> Result<(), String> {
        self.vcpus.suspend().await?;
        for (i, d) in self.devices.iter().enumerate() {
            if let Err(e) = d.control.suspend(true).await {
                for d in &self.devices[..i] {
                    let _ = d.control.suspend(false).await;
                }
                self.vcpus.resume();
                return Err(e);
            }
        }
        self.suspended.set(true);
        Ok(())
    }

    /// Devices first (their rings run again from where they stopped), then the vCPUs.
    async fn resume(&self) -> Result<(), String> {
        for d in &self.devices {
            d.control.suspend(false).await?;
        }
        self.vcpus.resume();
        self.suspended.set(false);
        Ok(())
    }
}

fn log(level: Level, what: std::fmt::Arguments<'_>) {
    virtio::log::write("ringvm", level, what);
}

/// Serves one client until it hangs up, times out, or sends a line that is too long.
async fn serve_client(conn: &AsyncFd, vm: &ControlTarget) {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let newline = pending.iter().position(|b| *b == b'\n');
        if let Some(i) = newline.filter(|&i| i <= MAX_LINE) {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let answer = vm.answer(&line[..i]).await;
            if vm.reply(conn, answer).await.is_err() {
                return;
            }
            continue;
        }
        if pending.len() > MAX_LINE {
            let msg = format!("request line longer than {MAX_LINE} bytes");
            let _ = write_line(conn, protocol::error(&msg)).await;
            return;
        }
        let read = executor::timeout(IDLE_TIMEOUT, conn.read(Vec::with_capacity(8192))).await;
        match read {
            Err(_) => {
                let msg = format!("no request within {}s", IDLE_TIMEOUT.as_secs());
                let _ = write_line(conn, protocol::error(&msg)).await;
                return;
            }
            Ok((Ok(0), _)) => {
                // The last request may end without its newline.
                if !pending.is_empty() {
                    let answer = vm.answer(&pending).await;
                    let _ = vm.reply(conn, answer).await;
                }
                return;
            }
            Ok((Ok(n), buf)) => pending.extend_from_slice(&buf[..n]),
            Ok((Err(_), _)) => return,
        }
    }
}

/// Writes `line` and a newline, within [`WRITE_TIMEOUT`].
async fn write_line(conn: &AsyncFd, line: String) -> io::Result<()> {
    let mut bytes = line.into_bytes();
    bytes.push(b'\n');
    let all = async {
        let mut at = 0;
        while at < bytes.len() {
            let (res, _) = conn.write(bytes[at..].to_vec()).await;
            match res? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => at += n,
            }
        }
        Ok(())
    };
    executor::timeout(WRITE_TIMEOUT, all)
        .await
        .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut)))
}

/// Client side: sends `command` and returns the response, checked to be a success.
pub fn request(socket: &Path, command: &str) -> anyhow::Result<Value> {
    use anyhow::Context;
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the control socket {}", socket.display()))?;
    // A suspend waits for every device's requests in flight.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("{}\n", protocol::request_line(command)).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let value: Value = serde_json::from_str(line.trim_end())
        .map_err(|e| anyhow::anyhow!("the VM answered something that is not JSON: {e}"))?;
    if value["ok"] != json!(true) {
        anyhow::bail!(
            "the VM refused: {}",
            value["error"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_gets_a_socket_named_by_pid() {
        let dir = std::env::temp_dir();
        let p = socket_path(&dir);
        assert_eq!(p.parent(), Some(dir.as_path()));
        assert!(p
            .to_string_lossy()
            .ends_with(&format!("ringvm-{}.sock", std::process::id())));
    }
}
