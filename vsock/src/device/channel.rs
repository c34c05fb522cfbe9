//! The device's end of the broker channel: one task receives host streams (a host process
//! connected, or a guest's connect was made or failed), one sends the guest's connect
//! requests. A frame that fails its checks, or the broker closing the channel, ends both:
//! connections already made go on, new ones are refused.

use std::os::fd::OwnedFd;
use std::rc::Rc;

use super::conn::{Conn, Key, State};
use super::{Entry, Shared, Slot};
use crate::broker::{ok_line, Frame, To, FRAME_SIZE};

/// Receives frames until the broker closes the channel or sends a bad one.
pub(super) async fn receive(shared: Rc<Shared>) {
    loop {
        let (res, buf) = shared
            .broker
            .recvmsg(vec![0u8; FRAME_SIZE].into_boxed_slice(), 1)
            .await;
        let msg = match res {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("ringvm device vsock: broker channel: receiving failed: {e}");
                return shared.channel_closed();
            }
        };
        if msg.len == 0 {
            eprintln!("ringvm device vsock: the broker closed its channel");
            return shared.channel_closed();
        }
        let frame = Frame::decode(&buf[..msg.len.min(buf.len())], msg.fds.len(), To::Device);
        match frame {
            Ok(frame) => shared.on_frame(frame, msg.fds.into_iter().next()),
            Err(e) => {
                eprintln!("ringvm device vsock: broker channel: {e}; closing it");
                shared.outbox_wake.notify();
                return shared.channel_closed();
            }
        }
    }
}

/// Sends the queued frames.
pub(super) async fn send(shared: Rc<Shared>) {
    while !shared.channel_closed.get() {
        let next = shared.outbox.borrow_mut().pop_front();
        let Some(frame) = next else {
            shared.outbox_wake.wait().await;
            continue;
        };
        let (res, _) = shared.broker.sendmsg(frame.encode().to_vec(), &[]).await;
        match res {
            Ok(n) if n == FRAME_SIZE => {}
            Ok(n) => {
                eprintln!("ringvm device vsock: broker channel: short send of {n} bytes");
                return shared.channel_closed();
            }
            Err(e) => {
                eprintln!("ringvm device vsock: broker channel: sending failed: {e}");
                return shared.channel_closed();
            }
        }
    }
}

/// Resets host-initiated connection `key` (`id`) if the guest has not answered in time. The
/// task is dropped (cancelled) when the guest answers.
async fn request_timer(shared: Rc<Shared>, key: Key, id: u64) {
    // A failed timer (the ring refused it) waits for the guest instead.
    if executor::sleep(shared.request_timeout).await.is_err() {
        return;
    }
    let mut conns = shared.conns.borrow_mut();
    let Some(entry) = conns.get_mut(&key).filter(|e| e.conn.id == id) else {
        return;
    };
    if entry.conn.state == State::Requesting {
        shared.count(|s| s.request_timeouts += 1);
        shared.errors.log(format_args!(
            "guest port {} did not answer host port {} in {:?}; reset",
            key.peer, key.local, shared.request_timeout
        ));
        shared.reset_entry(entry);
        shared.settle(key, entry);
    }
}

impl Shared {
    fn on_frame(self: &Rc<Self>, frame: Frame, fd: Option<OwnedFd>) {
        match (frame, fd) {
            (Frame::HostConnect { port }, Some(fd)) => self.host_connect(port, fd),
            (Frame::Connected { id }, Some(fd)) => self.connected(id, fd),
            (Frame::Failed { id, errno }, None) => self.connect_failed(id, errno),
            // `Frame::decode` checked the kinds and descriptor counts.
            _ => {}
        }
    }

    /// A host process wants guest port `port`: the guest gets a REQUEST; the stream waits.
    fn host_connect(self: &Rc<Self>, port: u32, fd: OwnedFd) {
        if self.conns.borrow().len() >= self.max_connections {
            self.count(|s| s.refused += 1);
            // Closing the stream tells the host process.
            return;
        }
        let key = Key {
            local: self.host_port(),
            peer: port,
        };
        let id = self.next_id();
        let timer = executor::spawn(request_timer(self.clone(), key, id));
        let mut entry = Entry {
            conn: Conn::host_initiated(id, self.buf_alloc),
            stream: Slot::Waiting(fd, timer),
        };
        self.settle(key, &mut entry);
        self.conns.borrow_mut().insert(key, entry);
        virtio::stats::stats().vsock_opened();
    }

    /// The broker connected request `id`: the guest gets a RESPONSE.
    fn connected(self: &Rc<Self>, id: u32, fd: OwnedFd) {
        let Some(key) = self.requests.borrow_mut().remove(&id) else {
            // The guest gave up (RST) meanwhile: the stream is closed.
            return;
        };
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state != State::Connecting(id) {
            return;
        }
        entry.conn.connected();
        self.start_stream(key, entry, fd, Vec::new());
        self.settle(key, entry);
    }

    /// The broker could not connect request `id`: the guest gets an RST.
    fn connect_failed(&self, id: u32, errno: u32) {
        let Some(key) = self.requests.borrow_mut().remove(&id) else {
            return;
        };
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state != State::Connecting(id) {
            return;
        }
        self.count(|s| s.connect_failures += 1);
        self.errors.log(format_args!(
            "guest port {} to host port {}: connecting failed: {}",
            key.peer,
            key.local,
            std::io::Error::from_raw_os_error(i32::try_from(errno).unwrap_or(i32::MAX))
        ));
        self.reset_entry(entry);
        self.settle(key, entry);
    }

    /// The guest accepted host-initiated connection `key`: its stream starts with `OK`.
    pub(super) fn accept_host(self: &Rc<Self>, key: Key, entry: &mut Entry) {
        if let Slot::Waiting(fd, _timer) = std::mem::replace(&mut entry.stream, Slot::None) {
            self.start_stream(key, entry, fd, ok_line(key.local));
        }
    }
}
