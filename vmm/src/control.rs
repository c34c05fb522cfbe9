//! The control socket: one request per line, one reply per line.
//!
//! Requests: `stop`. Replies: `ok` or `error: <why>`. Malformed requests (not UTF-8, longer
//! than a line may be, or unknown) get an error reply; the VM keeps running.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use executor::AsyncFd;

use crate::exit::{ExitReason, VmExit};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

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
    pub async fn serve(self: Rc<Self>, exit: Rc<VmExitHandle>) {
        loop {
            match self.listener.accept().await {
                Ok(conn) => {
                    let exit = exit.clone();
                    executor::spawn(async move {
                        if let Err(e) = handle(conn, &exit).await {
                            eprintln!("ringvm: control connection: {e}");
                        }
                    })
                    .detach();
                }
                Err(e) => {
                    eprintln!("ringvm: control socket accept: {e}");
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
#[derive(Debug)]
pub struct VmExitHandle(pub std::sync::Arc<VmExit>);

async fn handle(conn: AsyncFd, exit: &VmExitHandle) -> io::Result<()> {
    let mut request = Vec::new();
    loop {
        let (res, buf) = conn.read(Vec::with_capacity(512)).await;
        let n = res?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.contains(&b'\n') || request.len() > MAX_REQUEST {
            break;
        }
    }
    let reply = match parse(&request) {
        Ok(Request::Stop) => {
            exit.0.report(ExitReason::Stopped);
            "ok\n".to_string()
        }
        Err(e) => format!("error: {e}\n"),
    };
    let (res, _) = conn.write(reply.into_bytes()).await;
    res.map(drop)
}

#[derive(Debug, PartialEq, Eq)]
enum Request {
    Stop,
}

fn parse(raw: &[u8]) -> Result<Request, String> {
    let line = match raw.iter().position(|b| *b == b'\n') {
        Some(i) => &raw[..i],
        None if raw.len() > MAX_REQUEST => {
            return Err(format!("request longer than {MAX_REQUEST} bytes"))
        }
        None => raw,
    };
    let line = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    match line.trim() {
        "stop" => Ok(Request::Stop),
        "" => Err("empty request".into()),
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(format!("unknown command '{shown}' (known: stop)"))
        }
    }
}

/// Client side: sends `command` and returns the reply line.
pub fn request(socket: &Path, command: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_junk() {
        assert_eq!(parse(b"stop\n"), Ok(Request::Stop));
        assert_eq!(parse(b"stop"), Ok(Request::Stop));
        assert!(parse(b"\xff\xfe\n").unwrap_err().contains("UTF-8"));
        assert!(parse(b"reboot\n").unwrap_err().contains("unknown command"));
        assert!(parse(b"\n").unwrap_err().contains("empty"));
        assert!(parse(&vec![b'a'; MAX_REQUEST + 1])
            .unwrap_err()
            .contains("longer"));
    }

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
