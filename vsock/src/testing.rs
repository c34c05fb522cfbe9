//! A mock guest driver for the vsock device's three queues, for tests in this crate and the
//! end-to-end tests of the real device process (`test-utils` feature). A test driver: what
//! goes wrong panics, and so fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use executor::EventFd;
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue};
use virtio::vhost_user::VringConfig;

use crate::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};

/// How long a wait for the device or a host stream may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The guest: memory, three queues, their kick and call eventfds.
pub struct Guest {
    pub mem: GuestMemory,
    pub queues: Vec<MockSplitQueue>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub rx: HashMap<u16, MockChain>,
    /// The guest's CID (the source of what it sends).
    pub cid: u64,
}

impl Guest {
    /// A guest with CID `cid`, 64 MiB of memory and 32 receive buffers posted.
    pub fn new(cid: u64) -> Guest {
        let mem = GuestMemory::new_x86(64 << 20).unwrap();
        let mut g = Guest {
            queues: Guest::layout(&mem),
            mem,
            kicks: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            calls: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            rx: HashMap::new(),
            cid,
        };
        g.post_rx(32);
        g
    }

    /// Three queues of 64 in `mem`, each with its own data area.
    pub fn layout(mem: &GuestMemory) -> Vec<MockSplitQueue> {
        (0..3u64)
            .map(|i| {
                MockSplitQueue::with_data_area(
                    mem,
                    GuestAddress(0x10_0000 + i * 0x10_0000),
                    64,
                    GuestAddress((8 + 8 * i) << 20),
                    8 << 20,
                )
                .unwrap()
            })
            .collect()
    }

    /// The rings as the frontend hands them to the device.
    pub fn vrings(&self) -> Vec<VringConfig<'_>> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| VringConfig {
                index: i as u32,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_addr(),
                used: q.used_addr(),
                base: 0,
                kick: self.kicks[i].as_fd(),
                call: Some(self.calls[i].as_fd()),
            })
            .collect()
    }

    /// Posts `n` receive buffers (a header and 4 KiB each) and kicks.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let c = self.queues[0]
                .add_chain(&[MockBuf::Writable(HEADER_SIZE as u32 + 4096)])
                .unwrap();
            self.rx.insert(c.head, c);
        }
        self.kicks[0].write(1).unwrap();
    }

    /// Sends one packet from guest port `src_port` to host port `dst_port`.
    pub fn send(&mut self, src_port: u32, dst_port: u32, op: Op, payload: &[u8]) {
        // Chains the device has used give their descriptors back.
        while self.queues[1].next_used().unwrap().is_some() {}
        let hdr = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op: op.to_u16(),
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        let mut bufs = vec![MockBuf::Readable(hdr.encode().to_vec())];
        if !payload.is_empty() {
            bufs.push(MockBuf::Readable(payload.to_vec()));
        }
        self.queues[1].add_chain(&bufs).unwrap();
        self.kicks[1].write(1).unwrap();
    }

    /// The next packet for the guest (polling the used ring).
    pub async fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            while self.queues[1].next_used().unwrap().is_some() {}
            if let Some(u) = self.queues[0].next_used().unwrap() {
                let chain = self.rx.remove(&(u.id as u16)).unwrap();
                let bytes = self.queues[0].read_writable(&chain).unwrap();
                let hdr = Header::decode(bytes[..HEADER_SIZE].try_into().unwrap());
                let data = bytes[HEADER_SIZE..HEADER_SIZE + hdr.len as usize].to_vec();
                self.post_rx(1);
                return (hdr, data);
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            executor::sleep(Duration::from_millis(1)).await.unwrap();
        }
    }
}

/// Reads `n` bytes from a nonblocking host stream, letting the executor run meanwhile.
pub async fn host_read(host: &mut UnixStream, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        let mut buf = [0u8; 4096];
        match host.read(&mut buf) {
            Ok(0) => panic!("end of file"),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no host data");
                executor::sleep(Duration::from_millis(1)).await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    got
}

pub use hybrid::{
    host_accept, host_eof, hybrid_vsock_exchange, next_packet, send_when_room, HostConnection,
};

/// Helpers and the protocol checks shared by the end-to-end tests of hybrid-vsock devices.
mod hybrid {
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::{host_read, Guest, TIMEOUT};
    use crate::packet::{Header, Op, HOST_CID};

    /// The next packet for the guest that is not a credit update (devices send those whenever
    /// they like).
    pub async fn next_packet(guest: &mut Guest) -> (Header, Vec<u8>) {
        loop {
            let (h, data) = guest.recv().await;
            if h.op() != Some(Op::CreditUpdate) {
                return (h, data);
            }
        }
    }

    /// [`Guest::send`] once the transmit queue has room for the packet, as a real driver
    /// waits: a device may hand used descriptors back some time after it has forwarded their
    /// data (`vhost-device-vsock` adds them to the used ring from another thread).
    pub async fn send_when_room(
        guest: &mut Guest,
        src_port: u32,
        dst_port: u32,
        op: Op,
        payload: &[u8],
    ) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let q = &guest.queues[1];
            // Chains in flight take at most two descriptors each; `send` takes two.
            let in_flight = q.avail_idx().wrapping_sub(q.used_idx().unwrap());
            if 2 * u32::from(in_flight) + 2 <= u32::from(q.size()) {
                guest.send(src_port, dst_port, op, payload);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the device never returned tx descriptors"
            );
            executor::sleep(Duration::from_millis(1)).await.unwrap();
        }
    }

    /// Accepts one connection on a nonblocking listener, letting the executor run meanwhile;
    /// the stream comes back nonblocking.
    pub async fn host_accept(listener: &UnixListener) -> UnixStream {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true).unwrap();
                    return s;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    executor::sleep(Duration::from_millis(1)).await.unwrap();
                }
                Err(e) => panic!("no host connection: {e}"),
            }
        }
    }

    /// Waits for the end of a nonblocking host stream; data before the end fails the test.
    pub async fn host_eof(host: &mut UnixStream) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut b = [0u8; 16];
            match host.read(&mut b) {
                Ok(0) => return,
                Ok(n) => panic!("{n} bytes where the stream should end"),
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    executor::sleep(Duration::from_millis(1)).await.unwrap();
                }
                Err(e) => panic!("the host stream did not end: {e}"),
            }
        }
    }

    /// A host process connected to a guest port through `PATH`, as
    /// [`hybrid_vsock_exchange`] leaves it.
    pub struct HostConnection {
        /// The host process's stream (nonblocking), past the `OK` line.
        pub client: UnixStream,
        /// The guest port it asked for.
        pub guest_port: u32,
        /// The host-side port the device gave the connection (the request's source port).
        pub host_port: u32,
        /// The port number in the device's `OK <port>\n` line.
        pub ok_port: u32,
    }

    /// The checks every hybrid-vsock device passes (ringvm's, Firecracker's convention, rust-vmm's
    /// `vhost-device-vsock`), with `guest` started on a device whose host socket is `uds`:
    /// - a guest connect to host port 5000 reaches a listener at `uds_5000` and gets a
    ///   response; 1 MiB from the guest (in 4 KiB packets) arrives intact, host data reaches
    ///   the guest; the guest's reset ends the host stream;
    /// - a host process that writes `CONNECT 52\n` to `uds` makes the device ask guest port 52,
    ///   gets nothing before the guest accepts and `OK <port>\n` after; data then crosses from
    ///   host to guest.
    ///
    /// Returns that last connection, still open, for checks of the device's own.
    pub async fn hybrid_vsock_exchange(guest: &mut Guest, uds: &Path) -> HostConnection {
        let mut port_path = uds.as_os_str().to_os_string();
        port_path.push("_5000");
        let listener = UnixListener::bind(&port_path).unwrap();
        listener.set_nonblocking(true).unwrap();

        // The guest connects to host port 5000: the device reaches PATH_5000.
        send_when_room(guest, 1024, 5000, Op::Request, &[]).await;
        let (h, _) = next_packet(guest).await;
        assert_eq!(
            (h.op(), h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (Some(Op::Response), HOST_CID, guest.cid, 5000, 1024)
        );
        let mut host = host_accept(&listener).await;
        // 1 MiB from the guest, in 4 KiB packets within any device's credit, arrives intact.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut got = Vec::new();
        for chunk in data.chunks(4096) {
            send_when_room(guest, 1024, 5000, Op::Rw, chunk).await;
            got.extend(host_read(&mut host, chunk.len()).await);
        }
        assert!(got == data, "the host read other bytes than the guest sent");
        host.write_all(b"host to guest").unwrap();
        let (h, bytes) = next_packet(guest).await;
        assert_eq!(
            (h.op(), h.src_port, h.dst_port, bytes.as_slice()),
            (Some(Op::Rw), 5000, 1024, &b"host to guest"[..])
        );
        // The guest resets its connection: the host stream ends.
        send_when_room(guest, 1024, 5000, Op::Rst, &[]).await;
        host_eof(&mut host).await;
        drop(listener);
        let _ = std::fs::remove_file(&port_path);

        // A host process connects through PATH to guest port 52.
        let mut client = UnixStream::connect(uds).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        client.set_nonblocking(true).unwrap();
        let (req, _) = next_packet(guest).await;
        assert_eq!(
            (req.op(), req.src_cid, req.dst_cid, req.dst_port),
            (Some(Op::Request), HOST_CID, guest.cid, 52)
        );
        // Nothing for the host process until the guest accepts.
        let mut b = [0u8; 16];
        match client.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the host process got {other:?} before the guest accepted"),
        }
        send_when_room(guest, 52, req.src_port, Op::Response, &[]).await;
        let mut line = Vec::new();
        while line.last() != Some(&b'\n') {
            line.extend(host_read(&mut client, 1).await);
            assert!(line.len() <= 16, "no OK line: {line:?}");
        }
        let text = String::from_utf8(line).unwrap();
        let ok_port = text
            .strip_prefix("OK ")
            .and_then(|rest| rest.strip_suffix('\n'))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("not an OK line: {text:?}"));
        client.write_all(b"ping").unwrap();
        let (h, bytes) = next_packet(guest).await;
        assert_eq!(
            (h.op(), h.src_port, h.dst_port, bytes.as_slice()),
            (Some(Op::Rw), req.src_port, 52, &b"ping"[..])
        );
        HostConnection {
            client,
            guest_port: 52,
            host_port: req.src_port,
            ok_port,
        }
    }
}

/// rust-vmm's `vhost-device-vsock` (the peer of the tests and the bench): on PATH, else in
/// cargo's bin directory (`scripts/setup` installs it there).
pub fn vhost_device_vsock() -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    const NAME: &str = "vhost-device-vsock";
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    on_path
        .chain(cargo_home.map(|c| c.join("bin")))
        .map(|dir| dir.join(NAME))
        .find(|p| p.is_file())
}
