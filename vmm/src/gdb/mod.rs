//! `ringvm run --gdb PORT|PATH`: a GDB Remote Serial Protocol server for the guest.
//!
//! # Threads
//! An acceptor thread takes connections on 127.0.0.1:PORT (or a unix socket) and hands the
//! first to the session thread; while a session is attached, further clients are refused
//! (accepted and closed at once). The session thread runs gdbstub's state machine over the
//! connection; it blocks in `poll` on the connection and the [`Debugger`]'s stop eventfd
//! while the guest runs.
//!
//! # vCPUs
//! The vCPU threads keep their fds: they park in [`Debugger::checkpoint`] and serve the
//! session's requests there (see `hub`). The VM starts halted, so no guest instruction
//! runs before a GDB client resumes it.
//!
//! # Ending
//! A client that detaches or disconnects takes its breakpoints with it and leaves the VM
//! running; the next client stops it again. When the VM ends, an attached GDB is told the
//! "process" exited.

mod breakpoints;
mod hub;
mod regs;
mod target;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use anyhow::{Context, Result};
use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};

pub use hub::Debugger;
use target::VmTarget;

use crate::guest::GuestRam;
use crate::sys;

/// Where `--gdb` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GdbAddr {
    /// TCP on 127.0.0.1 (0: any free port, printed at start).
    Port(u16),
    Unix(PathBuf),
}

impl std::str::FromStr for GdbAddr {
    type Err = String;

    /// A number is a TCP port; anything else is a unix socket path.
    fn from_str(s: &str) -> Result<GdbAddr, String> {
        if s.is_empty() {
            return Err("--gdb needs a port or a socket path".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(GdbAddr::Port)
                .map_err(|_| format!("--gdb port {s} is not in 0..65535"));
        }
        Ok(GdbAddr::Unix(PathBuf::from(s)))
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn bind(addr: &GdbAddr) -> Result<(Listener, String)> {
        Ok(match addr {
            GdbAddr::Port(p) => {
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, *p))
                    .with_context(|| format!("gdb: cannot listen on 127.0.0.1:{p}"))?;
                let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                (Listener::Tcp(l), at)
            }
            GdbAddr::Unix(path) => {
                let l = UnixListener::bind(path)
                    .with_context(|| format!("gdb: cannot listen on {}", path.display()))?;
                (Listener::Unix(l), path.display().to_string())
            }
        })
    }

    fn accept(&self) -> io::Result<Stream> {
        let inner = match self {
            Listener::Tcp(l) => {
                let (s, _): (TcpStream, SocketAddr) = l.accept()?;
                // Packets are small and interactive.
                s.set_nodelay(true)?;
                Inner::Tcp(s)
            }
            Listener::Unix(l) => Inner::Unix(l.accept()?.0),
        };
        Ok(Stream {
            inner,
            input: VecDeque::new(),
            output: Vec::new(),
        })
    }
}

enum Inner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A client connection, buffered both ways (gdbstub reads and writes a byte at a time).
struct Stream {
    inner: Inner,
    input: VecDeque<u8>,
    output: Vec<u8>,
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match &mut self.inner {
            Inner::Tcp(s) => s,
            Inner::Unix(s) => s,
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        let n = loop {
            match self.io().read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.input.extend(&buf[..n]);
        Ok(())
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Inner::Tcp(s) => s.as_fd(),
            Inner::Unix(s) => s.as_fd(),
        }
    }
}

impl Connection for Stream {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.output.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.output.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.output);
        self.io().write_all(&out)?;
        self.io().flush()
    }
}

impl ConnectionExt for Stream {
    fn read(&mut self) -> io::Result<u8> {
        if self.input.is_empty() {
            self.fill()?;
        }
        self.input
            .pop_front()
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.input.front().copied())
    }
}

/// Listens on `addr` and starts the acceptor and session threads; the returned debugger
/// holds the vCPUs until a client resumes them.
pub fn start(addr: &GdbAddr, cpus: usize, ram: GuestRam) -> Result<Arc<Debugger>> {
    let (listener, at) = Listener::bind(addr)?;
    let socket_path = match addr {
        GdbAddr::Unix(p) => Some(p.clone()),
        GdbAddr::Port(_) => None,
    };
    let dbg = Arc::new(
        Debugger::new(cpus, ram, socket_path)
            .context("gdb: cannot create its wake-up socket pair")?,
    );
    let (tx, rx) = mpsc::channel::<Stream>();
    // Each thread says when it runs its own code: the VMM's seccomp filter comes right after
    // set-up and would kill a thread still in its start-up calls (naming itself, ...).
    let (ready, started) = mpsc::channel::<()>();
    let session_ready = ready.clone();
    let session_dbg = dbg.clone();
    std::thread::Builder::new()
        .name("gdb".into())
        .spawn(move || {
            let _ = session_ready.send(());
            for stream in rx {
                run_session(&session_dbg, stream);
            }
        })
        .context("gdb: cannot start the session thread")?;
    let accept_dbg = dbg.clone();
    std::thread::Builder::new()
        .name("gdb-accept".into())
        .spawn(move || {
            let _ = ready.send(());
            loop {
                match listener.accept() {
                    Ok(stream) if accept_dbg.begin_session() => {
                        if tx.send(stream).is_err() {
                            return;
                        }
                    }
                    Ok(stream) => {
                        eprintln!("ringvm: gdb: refused a second client (one is attached)");
                        drop(stream);
                    }
                    // A client that went away before it was taken, or no descriptor left:
                    // the next one may do better.
                    Err(e) => {
                        eprintln!("ringvm: gdb: accept failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .context("gdb: cannot start the acceptor thread")?;
    for _ in 0..2 {
        started
            .recv()
            .map_err(|_| anyhow::anyhow!("gdb: a thread died at start"))?;
    }
    eprintln!("ringvm: gdb: waiting for a client on {at} before the first guest instruction");
    Ok(dbg)
}

/// One client, from connection to detach, disconnect or the end of the VM.
fn run_session(dbg: &Arc<Debugger>, stream: Stream) {
    // A client that arrives while the VM runs finds it stopped, as GDB expects.
    if dbg.halt_all() {
        let mut target = VmTarget::new(dbg.clone());
        match GdbStub::new(stream).run_blocking::<EventLoop>(&mut target) {
            Ok(DisconnectReason::Disconnect) => eprintln!("ringvm: gdb: client detached"),
            Ok(DisconnectReason::TargetExited(_)) => {}
            Ok(reason) => eprintln!("ringvm: gdb: session ended ({reason:?})"),
            Err(e) => eprintln!("ringvm: gdb: session ended: {e}"),
        }
    }
    dbg.end_session();
}

enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = VmTarget;
    type Connection = Stream;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut VmTarget,
        conn: &mut Stream,
    ) -> Result<Event<Self::StopReason>, WaitForStopReasonError<&'static str, io::Error>> {
        loop {
            if let Some(stop) = target.dbg.next_stop() {
                if !matches!(stop, MultiThreadStopReason::Exited(_)) {
                    target.dbg.halt_all();
                }
                return Ok(Event::TargetStopped(stop));
            }
            if !conn.input.is_empty() {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
            let ready = sys::wait_readable(&[conn.as_fd(), target.dbg.stopped.as_fd()])
                .map_err(WaitForStopReasonError::Connection)?;
            if ready[1] {
                target.dbg.drain_wakeups();
            }
            if ready[0] {
                conn.fill().map_err(WaitForStopReasonError::Connection)?;
            }
        }
    }

    fn on_interrupt(target: &mut VmTarget) -> Result<Option<Self::StopReason>, &'static str> {
        target.dbg.halt_all();
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: hub::tid(0),
            signal: Signal::SIGINT,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdb_addr_is_a_port_or_a_path() {
        assert_eq!("1234".parse(), Ok(GdbAddr::Port(1234)));
        assert_eq!("0".parse(), Ok(GdbAddr::Port(0)));
        assert_eq!(
            "/tmp/g.sock".parse(),
            Ok(GdbAddr::Unix(PathBuf::from("/tmp/g.sock")))
        );
        assert!("65536".parse::<GdbAddr>().is_err());
        assert!("".parse::<GdbAddr>().is_err());
    }
}
