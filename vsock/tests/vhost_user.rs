//! The vsock device behind the vhost-user backend, driven by ringvm's frontend and the mock
//! guest driver, with a real [`Broker`] and host processes on unix sockets, in one process:
//! config space and features, a guest connect to `PATH_<port>`, a host connect through
//! `PATH`, and `RESET_DEVICE` followed by the transport reset event.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use executor::{EventFd, Executor};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue};
use virtio::vhost_user::{serve, Connection, Frontend, VringConfig};
use vsock::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use vsock::{Broker, VsockDevice, VsockOptions, VIRTIO_VSOCK_F_STREAM};

const TIMEOUT: Duration = Duration::from_secs(10);
const CID: u64 = 42;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest: memory, three queues, their kick and call eventfds.
struct Guest {
    mem: GuestMemory,
    queues: Vec<MockSplitQueue>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    rx: HashMap<u16, MockChain>,
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemory::new_x86(64 << 20).unwrap();
        let mut g = Guest {
            queues: Guest::layout(&mem),
            mem,
            kicks: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            calls: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            rx: HashMap::new(),
        };
        g.post_rx(32);
        g
    }

    fn layout(mem: &GuestMemory) -> Vec<MockSplitQueue> {
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

    fn vrings(&self) -> Vec<VringConfig<'_>> {
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

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let c = self.queues[0]
                .add_chain(&[MockBuf::Writable(HEADER_SIZE as u32 + 4096)])
                .unwrap();
            self.rx.insert(c.head, c);
        }
        self.kicks[0].write(1).unwrap();
    }

    fn send(&mut self, src_port: u32, dst_port: u32, op: Op, payload: &[u8]) {
        let hdr = Header {
            src_cid: CID,
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
    async fn recv(&mut self) -> (Header, Vec<u8>) {
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
async fn host_read(host: &mut UnixStream, n: usize) -> Vec<u8> {
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

#[test]
fn vsock_over_vhost_user_with_the_broker() {
    let dir = TempDir(std::env::temp_dir().join(format!("ringvm-vsock-vu-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("vsock.sock");
    let (broker, channel) = Broker::new(&path).unwrap();
    let listener = UnixListener::bind(broker.port_path(5000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let broker = broker.spawn().unwrap();

    let ex = Executor::new().unwrap();
    let device = Rc::new(VsockDevice::new(VsockOptions::new(CID), channel).unwrap());
    let mut guest = Guest::new();
    ex.run_until(async {
        let (a, b) = executor::socketpair().unwrap();
        let server = executor::spawn(serve(device.clone(), Connection::new(b)));
        let fe = Frontend::connect(Connection::new(a), TIMEOUT)
            .await
            .unwrap();
        assert_ne!(fe.features() & (1 << VIRTIO_VSOCK_F_STREAM), 0);
        let cid = fe.get_config(0, 8).await.unwrap();
        assert_eq!(u64::from_le_bytes(cid.try_into().unwrap()), CID);
        fe.start(fe.features(), &guest.mem, &guest.vrings())
            .await
            .unwrap();

        // The guest connects to host port 5000: the broker reaches PATH_5000.
        guest.send(1024, 5000, Op::Request, &[]);
        let (h, _) = guest.recv().await;
        assert_eq!(
            (h.op(), h.src_port, h.dst_port),
            (Some(Op::Response), 5000, 1024)
        );
        let (mut host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        guest.send(1024, 5000, Op::Rw, b"guest to host");
        assert_eq!(host_read(&mut host, 13).await, b"guest to host");
        host.write_all(b"host to guest").unwrap();
        let (h, data) = guest.recv().await;
        assert_eq!(
            (h.op(), data.as_slice()),
            (Some(Op::Rw), &b"host to guest"[..])
        );

        // A host process connects through PATH to guest port 52.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        client.set_nonblocking(true).unwrap();
        let (req, _) = guest.recv().await;
        assert_eq!((req.op(), req.dst_port), (Some(Op::Request), 52));
        guest.send(52, req.src_port, Op::Response, &[]);
        let ok = format!("OK {}\n", req.src_port);
        assert_eq!(host_read(&mut client, ok.len()).await, ok.as_bytes());

        // RESET_DEVICE: connections go; once the driver runs again, the event comes.
        fe.reset().await.unwrap();
        assert_eq!(device.connections(), 0);
        guest.queues = Guest::layout(&guest.mem);
        guest.rx.clear();
        guest.post_rx(4);
        let ev = guest.queues[2].add_chain(&[MockBuf::Writable(4)]).unwrap();
        fe.start(fe.features(), &guest.mem, &guest.vrings())
            .await
            .unwrap();
        guest.kicks[2].write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let used = loop {
            if let Some(u) = guest.queues[2].next_used().unwrap() {
                break u;
            }
            assert!(Instant::now() < deadline, "no transport reset event");
            executor::sleep(Duration::from_millis(1)).await.unwrap();
        };
        assert_eq!((used.id, used.len), (u32::from(ev.head), 4));
        assert_eq!(guest.queues[2].read_writable(&ev).unwrap(), [0, 0, 0, 0]);

        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
    drop(device);
    drop(ex);
    broker.join().unwrap().unwrap();
    assert!(!path.exists());
}
