//! The vsock device behind the vhost-user backend, driven by ringvm's frontend and the mock
//! guest driver, with a real [`Broker`] and host processes on unix sockets, in one process:
//! config space and features, a guest connect to `PATH_<port>`, a host connect through
//! `PATH`, and `RESET_DEVICE` followed by the transport reset event.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use executor::Executor;
use virtio::mock::MockBuf;
use virtio::vhost_user::{serve, Connection, Frontend};
use vsock::packet::Op;
use vsock::testing::{host_read, Guest, TIMEOUT};
use vsock::{Broker, VsockDevice, VsockOptions, VIRTIO_VSOCK_F_STREAM};

const CID: u64 = 42;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    let mut guest = Guest::new(CID);
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
