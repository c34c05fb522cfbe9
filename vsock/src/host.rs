//! The broker: the unjailed side of hybrid vsock. It listens on `PATH`, reads each host
//! process's `CONNECT <port>\n` line and hands the stream to the device; it connects to
//! `PATH_<port>` when the guest asks, and hands that stream over too (see [`crate::broker`]
//! for the frames).
//!
//! # Threads
//! [`Broker::run`] blocks its thread on an executor of its own (an unrestricted ring: this
//! side may accept and connect); [`Broker::spawn`] runs it on a new thread. It returns when
//! the device closes the channel, and removes `PATH`.
//!
//! # Untrusted peers
//! A host process gets [`HANDSHAKE_TIMEOUT`] and [`MAX_CONNECT_LINE`] bytes for its line,
//! read one byte at a time so nothing after the newline is taken from the stream; garbage,
//! a line too long or a timeout closes that connection only, and at most [`MAX_HANDSHAKES`]
//! are read at once (more are closed at once). The device is untrusted too (the guest may
//! own it): a frame from it that fails its checks ends the channel, at most
//! [`MAX_CONNECTS`] of its connects run at once, until their answer is sent (more fail with
//! `EAGAIN`), and each gets [`CONNECT_TIMEOUT`]. A frame that waits [`SEND_TIMEOUT`] for
//! the device to read its channel ends the channel. It names only `PATH_<port>`, the port
//! printed in decimal.

use std::cell::Cell;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::Duration;

use executor::{AsyncFd, Executor};

use crate::broker::{parse_connect, Frame, To, FRAME_SIZE, MAX_CONNECT_LINE};
use crate::{Error, Result};

/// How long a host process has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Host connections whose `CONNECT` line is being read at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Guest connects in flight at once.
pub const MAX_CONNECTS: usize = 64;
/// How long a guest connect to `PATH_<port>` may take (a listener whose backlog is full
/// never finishes it); then it fails with `ETIMEDOUT`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frame to the device may wait for room in the channel: a device that stops
/// reading it ends the channel, rather than leaving each handshake or connect waiting for
/// ever with the stream it holds.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The host side of a vsock device (see the module docs).
#[derive(Debug)]
pub struct Broker {
    path: PathBuf,
    listener: UnixListener,
    channel: OwnedFd,
}

impl Broker {
    /// Listens on `path` (which must not exist) and makes the broker channel; returns the
    /// broker and the device's end of the channel.
    pub fn new(path: impl Into<PathBuf>) -> Result<(Broker, OwnedFd)> {
        let path = path.into();
        let listener = UnixListener::bind(&path).map_err(|e| Error::Bind(path.clone(), e))?;
        let (ours, device) = UnixStream::pair().map_err(Error::SocketPair)?;
        let broker = Broker {
            path,
            listener,
            channel: ours.into(),
        };
        Ok((broker, device.into()))
    }

    /// The path host processes connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the host listener for port `port`: `PATH_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        port_path(&self.path, port)
    }

    /// Serves until the device closes the channel (`Ok`) or it fails; removes `PATH`.
    pub fn run(self) -> Result<()> {
        let ex = Executor::new().map_err(Error::Executor)?;
        let result = ex.run_until(self.serve());
        drop(ex);
        result
    }

    /// [`Broker::run`] on a new thread.
    pub fn spawn(self) -> Result<JoinHandle<Result<()>>> {
        std::thread::Builder::new()
            .name("vsock-broker".into())
            .spawn(move || self.run())
            .map_err(Error::Thread)
    }

    /// [`Broker::run`] as a task of an executor that already runs (the VMM's main thread):
    /// serves until the device closes the channel or it fails. `PATH` is removed when it
    /// returns or is dropped.
    pub async fn serve(self) -> Result<()> {
        let _remove = RemoveOnDrop(self.path.clone());
        let state = Rc::new(State {
            path: self.path,
            channel: AsyncFd::new(self.channel),
            handshakes: Cell::new(0),
            connects: Cell::new(0),
        });
        let listener = AsyncFd::new(self.listener.into());
        let accept = executor::spawn(accept(state.clone(), listener));
        let result = requests(state).await;
        drop(accept);
        result
    }
}

/// Removes the broker's socket path when the broker goes, however it goes.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn port_path(path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(path.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

struct State {
    path: PathBuf,
    channel: AsyncFd,
    handshakes: Cell<usize>,
    connects: Cell<usize>,
}

impl State {
    /// Sends a frame to the device, within [`SEND_TIMEOUT`]. (A frame is one small message on
    /// a stream socket: it is queued whole or not at all, so a send given up leaves no part
    /// of one in the channel.)
    async fn send(&self, frame: Frame, fd: Option<&OwnedFd>) -> Result<()> {
        let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
        let send = self.channel.sendmsg(frame.encode().to_vec(), &fds);
        match executor::timeout(SEND_TIMEOUT, send).await {
            Ok((Ok(FRAME_SIZE), _)) => Ok(()),
            Ok((Ok(_), _)) => Err(Error::Channel(io::ErrorKind::WriteZero.into())),
            Ok((Err(e), _)) => Err(Error::Channel(e)),
            Err(_) => Err(Error::Channel(io::ErrorKind::TimedOut.into())),
        }
    }
}

/// One of the places a counter of the state counts (handshakes, connects), taken by the
/// spawner and given back when the task that got it ends, however it ends.
struct Place {
    state: Rc<State>,
    count: fn(&State) -> &Cell<usize>,
}

impl Place {
    fn take(state: &Rc<State>, count: fn(&State) -> &Cell<usize>) -> Place {
        let c = count(state);
        c.set(c.get() + 1);
        Place {
            state: state.clone(),
            count,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let c = (self.count)(&self.state);
        c.set(c.get() - 1);
    }
}

/// Accepts host connections; each gets a task that reads its line.
async fn accept(state: Rc<State>, listener: AsyncFd) {
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("ringvm vsock broker: {}", Error::Accept(e));
                // Out of descriptors, say: give the others a moment.
                let _ = executor::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if state.handshakes.get() >= MAX_HANDSHAKES {
            continue;
        }
        let place = Place::take(&state, |s| &s.handshakes);
        executor::spawn(handshake(place, conn)).detach();
    }
}

/// Reads a host process's `CONNECT` line and hands its stream to the device, holding its
/// place among the handshakes until then.
async fn handshake(place: Place, conn: AsyncFd) {
    let state = &place.state;
    let line = executor::timeout(HANDSHAKE_TIMEOUT, read_line(&conn)).await;
    let Ok(Ok(line)) = line else {
        return;
    };
    let Ok(port) = parse_connect(&line) else {
        return;
    };
    // The reads are done: this is the only handle left.
    let Ok(fd) = conn.into_owned() else {
        return;
    };
    if let Err(e) = state.send(Frame::HostConnect { port }, Some(&fd)).await {
        eprintln!("ringvm vsock broker: {e}");
    }
}

/// Reads up to a newline, one byte at a time, at most [`MAX_CONNECT_LINE`] bytes.
async fn read_line(conn: &AsyncFd) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE);
    while line.len() < MAX_CONNECT_LINE && line.last() != Some(&b'\n') {
        let (res, byte) = conn.read(vec![0u8; 1].into_boxed_slice()).await;
        if res? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    Ok(line)
}

/// Serves the device's connect requests until it closes the channel.
async fn requests(state: Rc<State>) -> Result<()> {
    loop {
        let (res, buf) = state
            .channel
            .recvmsg(vec![0u8; FRAME_SIZE].into_boxed_slice(), 0)
            .await;
        let msg = res.map_err(Error::Channel)?;
        if msg.len == 0 {
            return Ok(());
        }
        let fds = msg.fds.len() + usize::from(msg.fds_truncated);
        let Frame::ConnectHost { id, port } =
            Frame::decode(&buf[..msg.len.min(buf.len())], fds, To::Broker)?
        else {
            // `decode` for the broker gives nothing else.
            continue;
        };
        if state.connects.get() >= MAX_CONNECTS {
            let errno = libc::EAGAIN as u32;
            state.send(Frame::Failed { id, errno }, None).await?;
            continue;
        }
        let place = Place::take(&state, |s| &s.connects);
        executor::spawn(connect(place, id, port)).detach();
    }
}

/// Connects request `id` to `PATH_<port>` and answers the device, holding its place among
/// the connects until the answer is sent.
async fn connect(place: Place, id: u32, port: u32) {
    let state = &place.state;
    let connect = executor::connect_unix(port_path(&state.path, port));
    let connected = match executor::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(connected) => connected,
        // A listener that does not accept (its backlog full).
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    };
    let fd = connected.and_then(|fd| {
        fd.into_owned()
            .map_err(|_| io::Error::other("connected socket still in use"))
    });
    let sent = match fd {
        Ok(fd) => state.send(Frame::Connected { id }, Some(&fd)).await,
        Err(e) => {
            let errno = match e.kind() {
                io::ErrorKind::TimedOut => libc::ETIMEDOUT,
                _ => e.raw_os_error().unwrap_or(libc::EIO).max(1),
            } as u32;
            state.send(Frame::Failed { id, errno }, None).await
        }
    };
    if let Err(e) = sent {
        eprintln!("ringvm vsock broker: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
