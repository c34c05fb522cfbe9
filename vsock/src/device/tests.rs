//! The device driven by a mock guest driver on its three queues, with the test as the
//! broker (or a real [`crate::Broker`]) and unix socketpairs as host streams.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use executor::{EventFd, Executor};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue};

use super::*;
use crate::broker::{To, FRAME_SIZE};
use crate::packet::{HEADER_SIZE, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_SEQPACKET};

const CID: u64 = 3;
const RX_BUF: u32 = 4096;

/// The guest's side of the three queues, the test's end of the broker channel, and the
/// device running on them.
struct Guest {
    device: Rc<VsockDevice>,
    mem: GuestMemory,
    queues: [MockSplitQueue; 3],
    kicks: [EventFd; 3],
    stops: Vec<StopSignal>,
    tasks: Vec<Task<()>>,
    /// The queues the device runs now.
    running: Vec<Rc<AsyncQueue>>,
    rx_posted: HashMap<u16, MockChain>,
    /// The test's end of the broker channel.
    broker: AsyncFd,
    /// Received packets not yet looked at.
    inbox: VecDeque<(Header, Vec<u8>)>,
    /// Post rx buffers as a header buffer and a data buffer (older Linux drivers).
    rx_split: bool,
    /// tx chains the device has not given back.
    tx_out: usize,
    /// Last, so the device and its tasks go first.
    ex: Executor,
}

fn header(src_port: u32, dst_port: u32, op: Op) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: TYPE_STREAM,
        op: op.to_u16(),
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new() -> Guest {
        Guest::with_options(VsockOptions::new(CID))
    }

    /// With connections that advertise `buf_alloc`.
    fn with_buf_alloc(buf_alloc: u32) -> Guest {
        Guest::with_options(VsockOptions {
            buf_alloc,
            ..VsockOptions::new(CID)
        })
    }

    fn with_options(options: VsockOptions) -> Guest {
        let (ours, theirs) = UnixStream::pair().unwrap();
        Guest::with_channel(options, ours.into(), theirs.into())
    }

    fn with_channel(options: VsockOptions, ours: OwnedFd, device_end: OwnedFd) -> Guest {
        Guest::on(Executor::new().unwrap(), options, ours, device_end)
    }

    /// On a ring restricted to [`crate::VSOCK_OPS`], as in the device process.
    fn restricted() -> Guest {
        let ex = executor::Builder::new()
            .allow_ops(crate::VSOCK_OPS)
            .build()
            .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        Guest::on(ex, VsockOptions::new(CID), ours.into(), theirs.into())
    }

    fn on(ex: Executor, options: VsockOptions, ours: OwnedFd, device_end: OwnedFd) -> Guest {
        let mem = GuestMemory::new_x86(64 << 20).unwrap();
        let kicks = [(); 3].map(|()| EventFd::new().unwrap());
        let device = Rc::new(VsockDevice::new(options, device_end).unwrap());
        let mut g = Guest {
            queues: Guest::layout(&mem),
            device,
            mem,
            kicks,
            stops: Vec::new(),
            tasks: Vec::new(),
            running: Vec::new(),
            rx_posted: HashMap::new(),
            broker: AsyncFd::new(ours),
            inbox: VecDeque::new(),
            rx_split: false,
            tx_out: 0,
            ex,
        };
        g.start();
        g
    }

    /// Fresh rings for the three queues (zeroed, as a driver sets them up).
    fn layout(mem: &GuestMemory) -> [MockSplitQueue; 3] {
        let queue = |base: u64, size: u16, data: u64| {
            MockSplitQueue::with_data_area(
                mem,
                GuestAddress(base),
                size,
                GuestAddress(data),
                8 << 20,
            )
            .unwrap()
        };
        [
            queue(0x1_0000, 256, 0x10_0000),
            queue(0x2_0000, 256, 0x100_0000),
            queue(0x3_0000, 16, 0x200_0000),
        ]
    }

    /// Starts the device's queues on the current rings and posts rx buffers.
    fn start(&mut self) {
        self.running.clear();
        self.start_at([None; 3]);
        self.post_rx(64);
    }

    /// Stops the queues and starts them again where they stopped (`GET_VRING_BASE`, then
    /// `SET_VRING_BASE`, as around a memory table change).
    fn restart(&mut self) {
        self.stop();
        let bases = self
            .running
            .drain(..)
            .map(|q| Some(q.with_queue(|q| (q.next_avail(), q.next_used()))))
            .collect::<Vec<_>>();
        self.start_at(bases.try_into().unwrap());
    }

    fn start_at(&mut self, bases: [Option<(u16, u16)>; 3]) {
        for (i, base) in bases.into_iter().enumerate() {
            let mut q = self.queues[i].queue().unwrap();
            if let Some((avail, used)) = base {
                q.set_next_avail(avail);
                q.set_next_used(used);
            }
            let queue = Rc::new(AsyncQueue::new(
                q,
                self.mem.clone(),
                self.kicks[i].try_clone().unwrap().into_stream(),
                EventFd::new().unwrap(),
            ));
            self.running.push(queue.clone());
            let stop = StopSignal::new();
            let task = self
                .ex
                .spawn(self.device.clone().run_queue(i, queue, 0, stop.clone()));
            self.stops.push(stop);
            self.tasks.push(task);
        }
    }

    /// Starts over on fresh rings whose receive buffers put the header apart from the data,
    /// as older Linux drivers post them.
    fn split_rx(&mut self) {
        self.stop();
        self.queues = Guest::layout(&self.mem);
        self.rx_posted.clear();
        self.rx_split = true;
        self.start();
    }

    fn stop(&mut self) {
        for s in self.stops.drain(..) {
            s.stop();
        }
        for t in self.tasks.drain(..) {
            self.ex
                .run_until(executor::timeout(Duration::from_secs(5), t))
                .unwrap();
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let bufs = if self.rx_split {
                vec![
                    MockBuf::Writable(HEADER_SIZE as u32),
                    MockBuf::Writable(RX_BUF),
                ]
            } else {
                vec![MockBuf::Writable(HEADER_SIZE as u32 + RX_BUF)]
            };
            let c = self.queues[RX].add_chain(&bufs).unwrap();
            self.rx_posted.insert(c.head, c);
        }
        self.kicks[RX].write(1).unwrap();
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        if hdr.len == 0 {
            hdr.len = payload.len() as u32;
        }
        let mut bufs = vec![MockBuf::Readable(hdr.encode().to_vec())];
        if !payload.is_empty() {
            bufs.push(MockBuf::Readable(payload.to_vec()));
        }
        self.send_bufs(&bufs);
    }

    fn send_bufs(&mut self, bufs: &[MockBuf]) {
        self.queues[TX].add_chain(bufs).unwrap();
        self.tx_out += 1;
        self.kicks[TX].write(1).unwrap();
    }

    /// Runs the executor a little, collects rx packets and frees tx chains.
    fn turn(&mut self) {
        self.ex
            .run_until(executor::sleep(Duration::from_millis(1)))
            .unwrap();
        while let Some(u) = self.queues[TX].next_used().unwrap() {
            assert_eq!(u.len, 0);
            self.tx_out -= 1;
        }
        let mut reposts = 0;
        while let Some(u) = self.queues[RX].next_used().unwrap() {
            let chain = self.rx_posted.remove(&(u.id as u16)).unwrap();
            let bytes = self.queues[RX].read_writable(&chain).unwrap();
            let hdr = Header::decode(bytes[..HEADER_SIZE].try_into().unwrap());
            let end = HEADER_SIZE + hdr.len as usize;
            assert_eq!(u.len as usize, end, "used length is header + payload");
            self.inbox
                .push_back((hdr, bytes[HEADER_SIZE..end].to_vec()));
            reposts += 1;
        }
        if reposts > 0 {
            self.post_rx(reposts);
        }
    }

    /// Turns until `f` gives something (5 s at most).
    fn until<T>(&mut self, what: &str, mut f: impl FnMut(&mut Guest) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.turn();
            if let Some(t) = f(self) {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
        }
    }

    /// The next packet for the guest.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.until("an rx packet", |g| g.inbox.pop_front())
    }

    /// The next packet for the guest, which must have `op`.
    fn expect(&mut self, op: Op) -> (Header, Vec<u8>) {
        let (h, data) = self.recv();
        assert_eq!(h.op(), Some(op), "{h:?}");
        assert_eq!((h.src_cid, h.dst_cid, h.kind), (HOST_CID, CID, TYPE_STREAM));
        (h, data)
    }

    /// Nothing reaches the guest for a while.
    fn quiet(&mut self) {
        for _ in 0..30 {
            self.turn();
        }
        assert!(self.inbox.is_empty(), "unexpected {:?}", self.inbox);
    }

    /// The next frame from the device, on the broker channel.
    fn frame(&mut self) -> Frame {
        let recv = self
            .broker
            .recvmsg(vec![0u8; FRAME_SIZE].into_boxed_slice(), 1);
        let (res, buf) = self
            .ex
            .run_until(executor::timeout(Duration::from_secs(5), recv))
            .unwrap();
        let msg = res.unwrap();
        Frame::decode(&buf[..msg.len], msg.fds.len(), To::Broker).unwrap()
    }

    fn tell_device(&mut self, frame: Frame, fd: Option<&OwnedFd>) {
        let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
        let (res, _) = self
            .ex
            .run_until(self.broker.sendmsg(frame.encode().to_vec(), &fds));
        assert_eq!(res.unwrap(), FRAME_SIZE);
    }

    /// The guest connects from `guest_port` to host port `port`; the test, as the broker,
    /// connects it to a socketpair and returns the host's end (nonblocking).
    fn connect(&mut self, guest_port: u32, port: u32) -> UnixStream {
        self.send(header(guest_port, port, Op::Request), &[]);
        // Requests of other ports may wait unanswered (random packets sent them).
        let id = loop {
            match self.frame() {
                Frame::ConnectHost { id, port: p } if p == port => break id,
                Frame::ConnectHost { .. } => continue,
                other => panic!("not a connect request: {other:?}"),
            }
        };
        let (host, device_end) = UnixStream::pair().unwrap();
        self.tell_device(Frame::Connected { id }, Some(&device_end.into()));
        let (h, _) = self.expect(Op::Response);
        assert_eq!((h.src_port, h.dst_port), (port, guest_port));
        assert_eq!(h.buf_alloc, self.device.shared.buf_alloc);
        host.set_nonblocking(true).unwrap();
        host
    }

    /// A host process connects to guest port `port` (the test, as the broker, hands the
    /// device a socketpair): returns the host's end (nonblocking) and the device's REQUEST.
    fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let (host, device_end) = UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        self.tell_device(Frame::HostConnect { port }, Some(&device_end.into()));
        let (req, _) = self.expect(Op::Request);
        (host, req)
    }

    /// Reads what the host has, until `n` bytes came.
    fn host_read(&mut self, host: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        self.until("host data", |_| {
            let mut buf = [0u8; 65536];
            loop {
                match host.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            (got.len() >= n).then_some(())
        });
        got
    }

    /// Reads what the host gets until its end sees end-of-file.
    fn host_read_to_eof(&mut self, host: &mut UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        self.until("host eof", |_| {
            let mut buf = [0u8; 65536];
            loop {
                match host.read(&mut buf) {
                    Ok(0) => return Some(()),
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        got
    }

    /// Waits for the host's end to see end-of-file.
    fn host_eof(&mut self, host: &mut UnixStream) {
        self.until("host eof", |_| {
            let mut buf = [0u8; 64];
            match host.read(&mut buf) {
                Ok(0) => Some(()),
                Ok(_) => panic!("data instead of eof"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                // A reset connection ends with ECONNRESET on some kernels.
                Err(_) => Some(()),
            }
        });
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn device_identity_and_config() {
    let (_, theirs) = UnixStream::pair().unwrap();
    let d = VsockDevice::new(
        VsockOptions::new(0x1_2345_6789 & 0xffff_ffff),
        theirs.into(),
    )
    .unwrap();
    assert_eq!(
        (d.name(), d.device_type(), d.num_queues(), d.features()),
        ("vsock", 19, 3, 1)
    );
    assert_eq!(d.config_size(), 8);
    let mut cfg = [0u8; 8];
    d.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x2345_6789);
    let mut hi = [0u8; 4];
    d.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut ops = crate::VSOCK_OPS.to_vec();
    let mut vhost_user = virtio::process::VHOST_USER_OPS.to_vec();
    ops.sort_unstable();
    vhost_user.push(executor::opcode::Read::CODE);
    vhost_user.sort_unstable();
    assert_eq!(
        ops, vhost_user,
        "the vhost-user opcodes and Read, nothing else"
    );
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let (_, theirs) = UnixStream::pair().unwrap();
        assert!(matches!(
            VsockDevice::new(VsockOptions::new(cid), theirs.into()),
            Err(Error::InvalidCid(_))
        ));
    }
}

#[test]
fn guest_connects_to_host_and_echoes_then_closes() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    g.send(header(1000, 80, Op::Rw), b"hello");
    assert_eq!(g.host_read(&mut host, 5), b"hello");
    host.write_all(b"world").unwrap();
    let (h, data) = g.expect(Op::Rw);
    assert_eq!(
        (h.src_port, h.dst_port, data.as_slice()),
        (80, 1000, &b"world"[..])
    );
    // The guest closes: SHUTDOWN(both); the host sees EOF and the guest gets its RST.
    let mut shut = header(1000, 80, Op::Shutdown);
    shut.flags = SHUTDOWN_BOTH;
    shut.fwd_cnt = 5;
    g.send(shut, &[]);
    g.host_eof(&mut host);
    g.expect(Op::Rst);
    g.until("the connection to go", |g| {
        (g.device.connections() == 0).then_some(())
    });
    assert_eq!(g.device.stats(), Stats::default());
}

#[test]
fn host_eof_reaches_the_guest_as_shutdown_send_after_the_data() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    host.write_all(b"bye").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (_, data) = g.expect(Op::Rw);
    assert_eq!(data, b"bye");
    let (h, _) = g.expect(Op::Shutdown);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    // Half-closed: the guest may still send.
    let mut rw = header(1000, 80, Op::Rw);
    rw.fwd_cnt = 3;
    g.send(rw, b"still here");
    assert_eq!(g.host_read(&mut host, 10), b"still here");
}

#[test]
fn host_connects_to_a_guest_listener() {
    let mut g = Guest::new();
    let (mut host, req) = g.host_connect(1234);
    assert_eq!(req.dst_port, 1234);
    assert_eq!(req.src_port, FIRST_HOST_PORT);
    g.send(header(1234, req.src_port, Op::Response), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(g.host_read(&mut host, ok.len()), ok.as_bytes());
    host.write_all(b"ping").unwrap();
    let (_, data) = g.expect(Op::Rw);
    assert_eq!(data, b"ping");
    g.send(header(1234, req.src_port, Op::Rw), b"pong");
    assert_eq!(g.host_read(&mut host, 4), b"pong");
}

#[test]
fn a_host_connect_gets_its_ok_line_before_data_that_came_with_the_response() {
    let mut g = Guest::new();
    let (mut host, req) = g.host_connect(1234);
    // The RESPONSE and a large data packet in one kick: the data may not pass the OK line
    // the host writer owes first.
    let mut resp = header(1234, req.src_port, Op::Response);
    resp.len = 0;
    let data = numbered(0, 32 << 10);
    g.queues[TX]
        .add_chain(&[MockBuf::Readable(resp.encode().to_vec())])
        .unwrap();
    g.queues[TX]
        .add_chain(&data_packet(1234, req.src_port, &data))
        .unwrap();
    g.tx_out += 2;
    g.kicks[TX].write(1).unwrap();
    let ok = format!("OK {}\n", req.src_port);
    let got = g.host_read(&mut host, ok.len() + data.len());
    assert_eq!(&got[..ok.len()], ok.as_bytes());
    assert!(got[ok.len()..] == data[..], "the data after the OK line");
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
}

#[test]
fn a_refused_host_connection_closes_the_host_stream() {
    let mut g = Guest::new();
    let (mut host, req) = g.host_connect(1234);
    g.send(header(1234, req.src_port, Op::Rst), &[]);
    g.host_eof(&mut host);
    assert_eq!(g.device.connections(), 0);
    g.quiet();
}

#[test]
fn sixty_four_connections_at_once() {
    let mut g = Guest::new();
    let mut hosts: Vec<UnixStream> = (0..64).map(|i| g.connect(2000 + i, 80)).collect();
    for i in 0..64u32 {
        g.send(
            header(2000 + i, 80, Op::Rw),
            format!("from guest {i}").as_bytes(),
        );
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        let want = format!("from guest {i}");
        assert_eq!(g.host_read(host, want.len()), want.as_bytes());
        host.write_all(format!("from host {i}").as_bytes()).unwrap();
    }
    let mut seen = HashMap::new();
    while seen.len() < 64 {
        let (h, data) = g.expect(Op::Rw);
        seen.insert(h.dst_port, data);
    }
    for i in 0..64u32 {
        assert_eq!(seen[&(2000 + i)], format!("from host {i}").as_bytes());
    }
    assert_eq!(g.device.connections(), 64);
}

#[test]
fn a_stalled_host_reader_stalls_the_guest_sender_through_credit() {
    let buf_alloc = 64 << 10;
    let mut g = Guest::with_buf_alloc(buf_alloc);
    let mut host = g.connect(1000, 80);
    // The guest sends within the credit the device gives, as a driver does, until no more
    // comes: the host reads nothing (the device's buffers stay within the credit).
    let mut tx = Sender::new(1000);
    let sent = tx.until_stalled(&mut g, buf_alloc, &[4096], 64);
    assert_eq!(g.device.stats(), Stats::default(), "no credit was exceeded");
    // Everything the host did not take waits in the device (at most buf_alloc) or its
    // socket; now the host reads it all, and the guest may go on.
    let got = g.host_read(&mut host, sent);
    assert!(got == numbered(0, sent), "the bytes came in order");
    g.until("a credit update", |g| {
        while let Some((h, _)) = g.inbox.pop_front() {
            tx.fwd_cnt = h.fwd_cnt;
        }
        (buf_alloc - (sent as u32 - tx.fwd_cnt) > 0).then_some(())
    });
    g.send(header(1000, 80, Op::Rw), b"more");
    assert_eq!(g.host_read(&mut host, 4), b"more");
}

#[test]
fn a_guest_that_stops_reading_stalls_the_host_writer() {
    let mut g = Guest::new();
    // The guest's receive buffer is 8 KiB and it never says it read anything.
    let mut req = header(1000, 80, Op::Request);
    req.buf_alloc = 8192;
    g.send(req, &[]);
    let Frame::ConnectHost { id, .. } = g.frame() else {
        panic!("not a connect request");
    };
    let (host, device_end) = UnixStream::pair().unwrap();
    g.tell_device(Frame::Connected { id }, Some(&device_end.into()));
    g.expect(Op::Response);
    host.set_nonblocking(true).unwrap();
    let mut host = host;
    let mut written = 0usize;
    let mut received = 0usize;
    let block = vec![1u8; 65536];
    for _ in 0..200 {
        match host.write(&block) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.turn();
        while let Some((h, data)) = g.inbox.pop_front() {
            assert_eq!(h.op(), Some(Op::Rw));
            received += data.len();
        }
        assert_eq!(g.device.buffered(), 0, "host data waits in the host socket");
    }
    assert_eq!(received, 8192, "exactly the guest's credit");
    assert!(written > received, "the host wrote more than went through");
    assert!(
        matches!(host.write(&block), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the host writer is stalled"
    );
    // The guest reads: the rest flows.
    let mut update = header(1000, 80, Op::CreditUpdate);
    update.buf_alloc = 8192;
    update.fwd_cnt = 8192;
    g.send(update, &[]);
    let (_, data) = g.expect(Op::Rw);
    assert!(!data.is_empty() && data.len() <= 8192);
}

#[test]
fn guest_rst_closes_the_host_stream() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    g.send(header(1000, 80, Op::Rst), &[]);
    g.host_eof(&mut host);
    assert_eq!(g.device.connections(), 0);
    g.quiet();
}

#[test]
fn reset_drops_connections_and_sends_a_transport_reset_event() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    g.queues[2].add_chain(&[MockBuf::Writable(4)]).unwrap();
    g.kicks[2].write(1).unwrap();
    g.quiet();
    assert_eq!(
        g.queues[2].next_used().unwrap(),
        None,
        "no event before a reset"
    );
    g.stop();
    g.device.reset();
    assert_eq!(g.device.connections(), 0);
    g.host_eof(&mut host);
    // The driver sets the queues up again and runs them.
    g.queues = Guest::layout(&g.mem);
    g.rx_posted.clear();
    g.start();
    expect_transport_reset(&mut g);
    // Connections work again afterwards.
    let mut host = g.connect(1001, 80);
    g.send(header(1001, 80, Op::Rw), b"again");
    assert_eq!(g.host_read(&mut host, 5), b"again");
}

#[test]
fn chains_without_a_whole_header_are_counted_and_others_go_on() {
    let mut g = Guest::new();
    g.send_bufs(&[MockBuf::Readable(vec![0; HEADER_SIZE - 1])]);
    g.send_bufs(&[MockBuf::Writable(64)]);
    let mut host = g.connect(1000, 80);
    assert_eq!(g.device.stats().bad_chains, 2);
    // A header split over two buffers is fine.
    let h = {
        let mut h = header(1000, 80, Op::Rw);
        h.len = 2;
        h.encode()
    };
    g.send_bufs(&[
        MockBuf::Readable(h[..10].to_vec()),
        MockBuf::Readable(h[10..].to_vec()),
        MockBuf::Readable(b"ok".to_vec()),
    ]);
    assert_eq!(g.host_read(&mut host, 2), b"ok");
}

#[test]
fn wrong_cids_are_dropped_and_counted() {
    let mut g = Guest::new();
    let mut spoofed = header(1000, 80, Op::Request);
    spoofed.src_cid = 4;
    g.send(spoofed, &[]);
    let mut elsewhere = header(1000, 80, Op::Request);
    elsewhere.dst_cid = 5;
    g.send(elsewhere, &[]);
    g.quiet();
    assert_eq!(g.device.stats().bad_cids, 2);
    assert_eq!(g.device.connections(), 0);
}

#[test]
fn unknown_ops_and_types_get_an_rst() {
    let mut g = Guest::new();
    let mut bad_op = header(1000, 80, Op::Request);
    bad_op.op = 99;
    g.send(bad_op, &[]);
    let (h, _) = g.expect(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (80, 1000));
    let mut seqpacket = header(1001, 80, Op::Request);
    seqpacket.kind = TYPE_SEQPACKET;
    g.send(seqpacket, &[]);
    let (h, _) = g.expect(Op::Rst);
    assert_eq!(h.dst_port, 1001);
    // On an open connection it is reset.
    let mut host = g.connect(1002, 80);
    let mut bad = header(1002, 80, Op::Rw);
    bad.op = 0;
    g.send(bad, &[]);
    g.expect(Op::Rst);
    g.host_eof(&mut host);
    assert_eq!(g.device.stats().bad_packets, 3);
}

#[test]
fn a_length_beyond_the_buffers_resets_the_connection() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    let mut lying = header(1000, 80, Op::Rw);
    lying.len = 100;
    g.send(lying, b"only ten b");
    g.expect(Op::Rst);
    g.host_eof(&mut host);
    let mut huge = header(1001, 80, Op::Rw);
    huge.len = u32::MAX;
    g.send(huge, &[]);
    g.expect(Op::Rst);
    assert_eq!(g.device.stats().bad_packets, 2);
    // Another connection is unaffected.
    let mut other = g.connect(1002, 80);
    g.send(header(1002, 80, Op::Rw), b"fine");
    assert_eq!(g.host_read(&mut other, 4), b"fine");
}

#[test]
fn data_beyond_the_credit_resets_the_connection() {
    let mut g = Guest::with_options(VsockOptions {
        buf_alloc: 1024,
        ..VsockOptions::new(CID)
    });
    let mut host = g.connect(1000, 80);
    let mut neighbour = g.connect(1001, 80);
    // The host reads nothing, so the device buffer is what the guest may fill: 1024 bytes,
    // but the device writes to the host at once; a packet beyond 1024 exceeds it alone.
    g.send(header(1000, 80, Op::Rw), &[7; 1025]);
    g.expect(Op::Rst);
    g.host_eof(&mut host);
    assert_eq!(g.device.stats().credit_violations, 1);
    // A fwd_cnt ahead of what was sent, too.
    let mut ahead = header(1001, 80, Op::CreditUpdate);
    ahead.fwd_cnt = 10;
    g.send(ahead, &[]);
    g.expect(Op::Rst);
    g.host_eof(&mut neighbour);
    assert_eq!(g.device.stats().credit_violations, 2);
}

#[test]
fn packets_for_unknown_connections_get_an_rst_and_rsts_get_nothing() {
    let mut g = Guest::new();
    for op in [
        Op::Rw,
        Op::Response,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ] {
        g.send(header(1000, 80, op), &[]);
        let (h, _) = g.expect(Op::Rst);
        assert_eq!((h.src_port, h.dst_port), (80, 1000));
    }
    g.send(header(1000, 80, Op::Rst), &[]);
    g.quiet();
    assert_eq!(g.device.stats().unknown_connections, 5);
}

#[test]
fn a_flood_of_bad_packets_without_rx_buffers_stays_bounded() {
    let mut g = Guest::new();
    // 64 rx buffers are posted and never given back; the guest floods the tx queue.
    let flood = MAX_RESETS as u64 + 64 + 100;
    for i in 0..flood as u32 {
        g.send(header(5000 + i, 80, Op::Rw), &[]);
        if i % 64 == 0 {
            g.ex.run_until(executor::sleep(Duration::from_millis(1)))
                .unwrap();
            while g.queues[TX].next_used().unwrap().is_some() {}
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.device.stats().unknown_connections < flood {
        assert!(Instant::now() < deadline, "the flood was not taken");
        g.ex.run_until(executor::sleep(Duration::from_millis(1)))
            .unwrap();
        while g.queues[TX].next_used().unwrap().is_some() {}
    }
    assert!(g.device.shared.resets.borrow().len() <= MAX_RESETS);
    assert!(g.device.stats().dropped_resets >= 100);
    // The guest reads again: the queued replies go, and the device still serves.
    g.until("the replies to go", |g| {
        g.device.shared.resets.borrow().is_empty().then_some(())
    });
    g.quiet_drain();
    let mut host = g.connect(1, 80);
    g.send(header(1, 80, Op::Rw), b"x");
    assert_eq!(g.host_read(&mut host, 1), b"x");
}

impl Guest {
    /// Turns a while and forgets what the guest received.
    fn quiet_drain(&mut self) {
        for _ in 0..10 {
            self.turn();
        }
        self.inbox.clear();
    }
}

#[test]
fn duplicate_request_resets_the_connection() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    g.send(header(1000, 80, Op::Request), &[]);
    g.expect(Op::Rst);
    g.host_eof(&mut host);
    assert_eq!(g.device.stats().unexpected_ops, 1);
}

#[test]
fn a_failed_broker_connect_resets_the_guest() {
    let mut g = Guest::new();
    g.send(header(1000, 81, Op::Request), &[]);
    let Frame::ConnectHost { id, port } = g.frame() else {
        panic!("not a connect request");
    };
    assert_eq!(port, 81);
    g.tell_device(
        Frame::Failed {
            id,
            errno: libc::ECONNREFUSED as u32,
        },
        None,
    );
    let (h, _) = g.expect(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (81, 1000));
    assert_eq!(g.device.stats().connect_failures, 1);
    assert_eq!(g.device.connections(), 0);
}

#[test]
fn a_broker_answer_after_the_guest_gave_up_closes_the_stream() {
    let mut g = Guest::new();
    g.send(header(1000, 80, Op::Request), &[]);
    let Frame::ConnectHost { id, .. } = g.frame() else {
        panic!("not a connect request");
    };
    g.send(header(1000, 80, Op::Rst), &[]);
    g.quiet();
    let (host, device_end) = UnixStream::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut host = host;
    g.tell_device(Frame::Connected { id }, Some(&device_end.into()));
    g.host_eof(&mut host);
    g.quiet();
}

#[test]
fn the_connection_limit_refuses_with_an_rst() {
    let mut g = Guest::with_options(VsockOptions {
        max_connections: 2,
        ..VsockOptions::new(CID)
    });
    let _a = g.connect(1, 80);
    let _b = g.connect(2, 80);
    g.send(header(3, 80, Op::Request), &[]);
    g.expect(Op::Rst);
    let (host, device_end) = UnixStream::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut host = host;
    g.tell_device(Frame::HostConnect { port: 7 }, Some(&device_end.into()));
    g.host_eof(&mut host);
    assert_eq!(g.device.stats().refused, 2);
}

#[test]
fn with_the_real_broker_guest_connects_reach_path_port_or_get_an_rst() {
    let dir = std::env::temp_dir().join(format!("ringvm-vsock-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let (broker, device_end) = crate::Broker::new(&path).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(broker.port_path(80)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let thread = broker.spawn().unwrap();
    let (ours, _) = UnixStream::pair().unwrap();
    let mut g = Guest::with_channel(VsockOptions::new(CID), ours.into(), device_end);
    g.send(header(1000, 80, Op::Request), &[]);
    g.expect(Op::Response);
    let mut host = g
        .until("the broker's connect", |_| listener.accept().ok())
        .0;
    host.set_nonblocking(true).unwrap();
    g.send(header(1000, 80, Op::Rw), b"via broker");
    assert_eq!(g.host_read(&mut host, 10), b"via broker");
    // No listener at PATH_81: the guest gets an RST.
    g.send(header(1001, 81, Op::Request), &[]);
    let (h, _) = g.expect(Op::Rst);
    assert_eq!(h.dst_port, 1001);
    // A host process connects to PATH for guest port 1234.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = g.expect(Op::Request);
    assert_eq!(req.dst_port, 1234);
    g.send(header(1234, req.src_port, Op::Response), &[]);
    client.set_nonblocking(true).unwrap();
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(g.host_read(&mut client, ok.len()), ok.as_bytes());
    // The device goes: the broker ends and removes PATH.
    drop(g);
    thread.join().unwrap().unwrap();
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_closed_broker_channel_resets_waiting_connects_and_refuses_new_ones() {
    let mut g = Guest::new();
    g.send(header(1000, 80, Op::Request), &[]);
    let Frame::ConnectHost { .. } = g.frame() else {
        panic!("not a connect request");
    };
    // The broker goes away before it answers.
    g.broker = AsyncFd::new(UnixStream::pair().unwrap().0.into());
    let (h, _) = g.expect(Op::Rst);
    assert_eq!(h.dst_port, 1000);
    g.send(header(1001, 80, Op::Request), &[]);
    let (h, _) = g.expect(Op::Rst);
    assert_eq!(h.dst_port, 1001);
    assert_eq!(g.device.stats().connect_failures, 2);
    assert_eq!(g.device.connections(), 0);
}

#[test]
fn rx_chains_without_room_for_a_header_are_returned_empty() {
    let mut g = Guest::new();
    g.stop();
    g.queues = Guest::layout(&g.mem);
    g.rx_posted.clear();
    // Only a tiny rx buffer first, then the normal ones.
    let tiny = g.queues[RX].add_chain(&[MockBuf::Writable(8)]).unwrap();
    g.start();
    g.send(header(1000, 80, Op::Rw), &[]);
    g.ex.run_until(executor::sleep(Duration::from_millis(20)))
        .unwrap();
    assert_eq!(
        g.queues[RX].next_used().unwrap().map(|u| (u.id, u.len)),
        Some((u32::from(tiny.head), 0))
    );
    g.expect(Op::Rst);
    assert_eq!(g.device.stats().bad_chains, 1);
}

#[test]
fn guest_shutdown_rcv_stops_host_data_for_the_guest() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    let mut shut = header(1000, 80, Op::Shutdown);
    shut.flags = crate::packet::SHUTDOWN_RCV;
    g.send(shut, &[]);
    g.quiet();
    host.write_all(b"nobody reads this").unwrap();
    g.quiet();
    // The other direction still works.
    g.send(header(1000, 80, Op::Rw), b"up");
    assert_eq!(g.host_read(&mut host, 2), b"up");
}

#[test]
fn the_device_runs_on_a_ring_restricted_to_vsock_ops() {
    let mut g = Guest::restricted();
    let mut host = g.connect(1000, 80);
    g.send(header(1000, 80, Op::Rw), b"restricted");
    assert_eq!(g.host_read(&mut host, 10), b"restricted");
    host.write_all(b"ring").unwrap();
    let (_, data) = g.expect(Op::Rw);
    assert_eq!(data, b"ring");
    let (other, device_end) = UnixStream::pair().unwrap();
    other.set_nonblocking(true).unwrap();
    let mut other = other;
    g.tell_device(Frame::HostConnect { port: 9 }, Some(&device_end.into()));
    let (req, _) = g.expect(Op::Request);
    g.send(header(9, req.src_port, Op::Response), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(g.host_read(&mut other, ok.len()), ok.as_bytes());
    let mut shut = header(1000, 80, Op::Shutdown);
    shut.flags = SHUTDOWN_BOTH;
    shut.fwd_cnt = 4;
    g.send(shut, &[]);
    g.host_eof(&mut host);
    g.expect(Op::Rst);
    assert_eq!(g.device.stats(), Stats::default());
}

#[test]
fn random_packets_never_panic_and_the_device_keeps_serving() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let guest = std::cell::RefCell::new(Guest::new());
    let host = guest.borrow_mut().connect(1000, 80);
    let strategy = (
        (
            prop_oneof![Just(CID), any::<u64>()],
            prop_oneof![Just(HOST_CID), any::<u64>()],
            prop_oneof![Just(1000u32), 0u32..4, any::<u32>()],
            prop_oneof![Just(80u32), 0u32..4, any::<u32>()],
            prop_oneof![Just(None), Just(Some(u32::MAX)), (0u32..200).prop_map(Some)],
        ),
        (
            prop_oneof![Just(TYPE_STREAM), any::<u16>()],
            0u16..10,
            any::<u32>(),
            prop_oneof![Just(1u32 << 20), any::<u32>()],
            prop_oneof![Just(0u32), any::<u32>()],
        ),
        prop::collection::vec(any::<u8>(), 0..128),
        0usize..HEADER_SIZE,
    );
    TestRunner::new(Config::with_cases(256))
        .run(
            &strategy,
            |(
                (src_cid, dst_cid, src_port, dst_port, len),
                (kind, op, flags, buf_alloc, fwd_cnt),
                payload,
                split,
            )| {
                let mut g = guest.borrow_mut();
                let hdr = Header {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len: len.unwrap_or(payload.len() as u32),
                    kind,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
                .encode();
                // The header split over two buffers at a random point (or cut short).
                let mut bufs = vec![MockBuf::Readable(hdr[..split.max(1)].to_vec())];
                if split % 7 != 3 {
                    bufs.push(MockBuf::Readable(hdr[split.max(1)..].to_vec()));
                }
                if !payload.is_empty() {
                    bufs.push(MockBuf::Readable(payload));
                }
                g.send_bufs(&bufs);
                g.turn();
                g.inbox.clear();
                let conns = g.device.connections();
                prop_assert!(g.device.buffered() <= conns * (128 << 10));
                prop_assert!(g.device.shared.resets.borrow().len() <= MAX_RESETS);
                Ok(())
            },
        )
        .unwrap();
    drop(host);
    let mut g = guest.into_inner();
    let stats = g.device.stats();
    assert!(stats.bad_cids > 0 && stats.bad_packets > 0, "{stats:?}");
    g.quiet_drain();
    let mut host = g.connect(4242, 77777);
    g.send(header(4242, 77777, Op::Rw), b"still serving");
    assert_eq!(g.host_read(&mut host, 13), b"still serving");
}

#[test]
fn a_guest_that_never_answers_a_host_connect_times_out() {
    let mut g = Guest::with_options(VsockOptions {
        request_timeout: Duration::from_millis(50),
        ..VsockOptions::new(CID)
    });
    let (mut host, req) = g.host_connect(1234);
    let (rst, _) = g.expect(Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 1234));
    g.host_eof(&mut host);
    assert_eq!(g.device.stats().request_timeouts, 1);
    assert_eq!(g.device.connections(), 0);
    // An answer in time cancels the timer.
    let (host, device_end) = UnixStream::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut host = host;
    g.tell_device(Frame::HostConnect { port: 1235 }, Some(&device_end.into()));
    let (req, _) = g.expect(Op::Request);
    g.send(header(1235, req.src_port, Op::Response), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(g.host_read(&mut host, ok.len()), ok.as_bytes());
    g.ex.run_until(executor::sleep(Duration::from_millis(100)))
        .unwrap();
    g.quiet();
    assert_eq!(g.device.stats().request_timeouts, 1);
}

#[test]
fn rx_buffers_with_the_header_apart_from_the_data_like_older_linux() {
    let mut g = Guest::new();
    g.split_rx();
    let mut host = g.connect(1000, 80);
    let data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let (_, d) = g.expect(Op::Rw);
        assert!(d.len() <= RX_BUF as usize);
        got.extend_from_slice(&d);
    }
    assert_eq!(got, data);
}

#[test]
fn bulk_data_both_ways_on_four_connections_with_a_small_guest_buffer() {
    const SIZE: usize = 256 << 10;
    const GUEST_BUF: u32 = 16 << 10;
    let mut g = Guest::new();
    let pattern = |seed: u8| -> Vec<u8> {
        (0..SIZE)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    };
    struct Side {
        port: u32,
        host: UnixStream,
        to_guest: Vec<u8>,
        host_written: usize,
        from_host: Vec<u8>,
        to_host: Vec<u8>,
        guest_sent: usize,
        from_guest: Vec<u8>,
        // The device's credit as the guest knows it.
        dev_buf: u32,
        dev_fwd: u32,
    }
    let mut sides: Vec<Side> = (0..4u32)
        .map(|i| {
            let port = 3000 + i;
            let mut req = header(port, 80, Op::Request);
            req.buf_alloc = GUEST_BUF;
            g.send(req, &[]);
            let id = loop {
                if let Frame::ConnectHost { id, .. } = g.frame() {
                    break id;
                }
            };
            let (host, device_end) = UnixStream::pair().unwrap();
            g.tell_device(Frame::Connected { id }, Some(&device_end.into()));
            let (h, _) = g.expect(Op::Response);
            host.set_nonblocking(true).unwrap();
            Side {
                port,
                host,
                to_guest: pattern(i as u8),
                host_written: 0,
                from_host: Vec::new(),
                to_host: pattern(100 + i as u8),
                guest_sent: 0,
                from_guest: Vec::new(),
                dev_buf: h.buf_alloc,
                dev_fwd: h.fwd_cnt,
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = |s: &Side| s.from_host.len() == SIZE && s.from_guest.len() == SIZE;
    while !sides.iter().all(done) {
        assert!(Instant::now() < deadline, "bulk transfer stalled");
        for s in sides.iter_mut() {
            // The host writes what its socket takes and reads what came.
            if s.host_written < SIZE {
                match s.host.write(&s.to_guest[s.host_written..]) {
                    Ok(n) => s.host_written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            let mut buf = [0u8; 65536];
            match s.host.read(&mut buf) {
                Ok(n) => s.from_guest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            // The guest sends within the device's credit, 4 KiB at a time.
            let credit = s.dev_buf - (s.guest_sent as u32 - s.dev_fwd);
            let n = (credit as usize).min(4096).min(SIZE - s.guest_sent);
            if n > 0 {
                let mut h = header(s.port, 80, Op::Rw);
                h.buf_alloc = GUEST_BUF;
                h.fwd_cnt = s.from_host.len() as u32;
                g.send(h, &s.to_host[s.guest_sent..s.guest_sent + n]);
                s.guest_sent += n;
            }
        }
        g.turn();
        while let Some((h, data)) = g.inbox.pop_front() {
            let s = sides.iter_mut().find(|s| s.port == h.dst_port).unwrap();
            s.dev_buf = h.buf_alloc;
            s.dev_fwd = h.fwd_cnt;
            match h.op() {
                Some(Op::Rw) => {
                    s.from_host.extend_from_slice(&data);
                    // The guest application reads at once and says so.
                    let mut update = header(s.port, 80, Op::CreditUpdate);
                    update.buf_alloc = GUEST_BUF;
                    update.fwd_cnt = s.from_host.len() as u32;
                    g.send(update, &[]);
                }
                Some(Op::CreditUpdate) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(g.device.buffered() <= 4 * (64 << 10) * 2);
    }
    for (i, s) in sides.iter().enumerate() {
        assert!(s.from_host == pattern(i as u8), "host to guest {i}");
        assert!(s.from_guest == pattern(100 + i as u8), "guest to host {i}");
    }
    assert_eq!(g.device.stats(), Stats::default());
}

#[test]
fn a_device_that_replaces_a_dead_one_sends_a_transport_reset_event() {
    let mut g = Guest::new();
    g.stop();
    // The backend server calls this before the first queue of a process that took over the
    // rings (and inflight region) of one that died: the guest's connections lived there.
    g.device.resumed();
    g.start();
    expect_transport_reset(&mut g);
}

/// Posts an event buffer and expects a transport reset event in it.
fn expect_transport_reset(g: &mut Guest) {
    let ev = g.queues[2].add_chain(&[MockBuf::Writable(4)]).unwrap();
    g.kicks[2].write(1).unwrap();
    let used = g.until("the event", |g| g.queues[2].next_used().unwrap());
    assert_eq!((used.id, used.len), (u32::from(ev.head), 4));
    assert_eq!(
        g.queues[2].read_writable(&ev).unwrap(),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
}

/// A data packet in one buffer (header and payload), as a driver may lay it out: a chain of
/// one descriptor.
fn data_packet(src_port: u32, dst_port: u32, payload: &[u8]) -> Vec<MockBuf> {
    let mut hdr = header(src_port, dst_port, Op::Rw);
    hdr.len = payload.len() as u32;
    vec![MockBuf::Readable([&hdr.encode()[..], payload].concat())]
}

/// Bytes `from..from + len` of a stream that numbers its bytes (mod 251).
fn numbered(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i % 251) as u8).collect()
}

/// The guest's side of one connection's numbered stream.
struct Sender {
    port: u32,
    /// Bytes sent so far, and the device's `fwd_cnt` as last heard.
    sent: usize,
    fwd_cnt: u32,
}

impl Sender {
    fn new(port: u32) -> Sender {
        Sender {
            port,
            sent: 0,
            fwd_cnt: 0,
        }
    }

    /// Sends packets of `sizes` in turn within the credit `buf_alloc` (and with at most
    /// `max_out` chains out), until the device stops giving credit: the host reads nothing.
    /// Returns the bytes sent.
    fn until_stalled(
        &mut self,
        g: &mut Guest,
        buf_alloc: u32,
        sizes: &[usize],
        max_out: usize,
    ) -> usize {
        let start = self.sent;
        let mut idle = 0;
        let mut k = 0;
        while idle < 50 {
            let credit = buf_alloc.wrapping_sub((self.sent as u32).wrapping_sub(self.fwd_cnt));
            if credit > 0 && g.tx_out < max_out {
                let n = (credit as usize).min(sizes[k % sizes.len()]);
                k += 1;
                g.send_bufs(&data_packet(self.port, 80, &numbered(self.sent, n)));
                self.sent += n;
                idle = 0;
            } else {
                idle += 1;
            }
            g.turn();
            // Credit updates of connections that stalled before are not needed any more.
            while let Some((h, _)) = g.inbox.pop_front() {
                assert_eq!(h.op(), Some(Op::CreditUpdate));
                if h.dst_port == self.port {
                    self.fwd_cnt = h.fwd_cnt;
                }
            }
            let bound = buf_alloc as usize * g.device.connections();
            assert!(
                g.device.buffered() <= bound,
                "the device buffers beyond the credit"
            );
            assert!(self.sent - start < 64 << 20, "the guest was never stopped");
        }
        self.sent - start
    }
}

#[test]
fn data_goes_to_the_host_from_guest_memory_in_order_its_chains_back_once_sent() {
    let buf_alloc = 1 << 20;
    let mut g = Guest::with_buf_alloc(buf_alloc);
    let mut host = g.connect(1000, 80);
    // Large packets: the host socket fills, and what it cannot take is held in guest
    // memory, none of it copied into the device.
    let mut tx = Sender::new(1000);
    let sent = tx.until_stalled(&mut g, buf_alloc, &[32 << 10, 60 << 10], 64);
    assert!(g.tx_out > 0, "chains are held while the host reads nothing");
    assert_eq!(g.device.buffered(), 0, "nothing was copied");
    assert_eq!(g.device.stats(), Stats::default());
    // The host reads it all, in order, and every chain comes back.
    let got = g.host_read(&mut host, sent);
    assert!(got == numbered(0, sent), "the bytes came in order");
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
    // Short packets between large ones are copied, and go after the held data.
    let more = tx.until_stalled(&mut g, buf_alloc, &[32 << 10, 100, 4096], 64);
    let got = g.host_read(&mut host, more);
    assert!(got == numbered(sent, more), "the bytes came in order");
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
    assert_eq!(g.device.buffered(), 0);
}

#[test]
fn a_reset_connection_gives_back_the_chains_held_for_it() {
    let mut g = Guest::new();
    let mut host = g.connect(1000, 80);
    let buf_alloc = g.device.shared.buf_alloc;
    Sender::new(1000).until_stalled(&mut g, buf_alloc, &[16 << 10], 64);
    assert!(g.tx_out > 0, "chains are held while the host reads nothing");
    // The guest resets the connection: the held chains come back unsent, and the host's
    // stream ends after what the socket already had.
    g.send(header(1000, 80, Op::Rst), &[]);
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
    let got = g.host_read_to_eof(&mut host);
    assert!(
        got == numbered(0, got.len()),
        "what came is the stream's start"
    );
    assert_eq!(g.device.connections(), 0);
}

#[test]
fn a_queue_stop_moves_held_data_into_the_buffer_and_gives_back_every_chain() {
    let buf_alloc = 512 << 10;
    let mut g = Guest::with_buf_alloc(buf_alloc);
    let mut host = g.connect(1000, 80);
    let sent = Sender::new(1000).until_stalled(&mut g, buf_alloc, &[8 << 10], 64);
    assert!(g.tx_out > 0, "chains are held while the host reads nothing");
    // A memory table change stops the queues: the connection lives on, its held data
    // copied into its buffer, and the guest gets every chain back.
    g.restart();
    while let Some(u) = g.queues[TX].next_used().unwrap() {
        assert_eq!(u.len, 0);
        g.tx_out -= 1;
    }
    assert_eq!(g.tx_out, 0, "every tx chain came back at the stop");
    assert!(g.device.buffered() > 0, "the held data waits in the device");
    let got = g.host_read(&mut host, sent);
    assert!(got == numbered(0, sent), "the bytes came in order");
    // The connection goes on.
    g.send_bufs(&data_packet(1000, 80, b"after"));
    assert_eq!(g.host_read(&mut host, 5), b"after");
}

#[test]
fn at_most_half_the_queue_is_held_and_other_connections_go_on() {
    // Twenty stalled connections would hold more than half the tx queue (256): past 128
    // chains their data is copied into their buffers instead.
    let mut g = Guest::new();
    let buf_alloc = g.device.shared.buf_alloc;
    let mut hosts = Vec::new();
    let mut sent = Vec::new();
    for i in 0..20 {
        let port = 2000 + i;
        hosts.push(g.connect(port, 80));
        // Chains of one descriptor: the mock's 256 are enough for 128 held and more.
        sent.push(Sender::new(port).until_stalled(&mut g, buf_alloc, &[4096], 250));
        assert!(g.tx_out <= 128, "{} chains held", g.tx_out);
    }
    assert_eq!(g.tx_out, 128, "half the queue is held");
    assert!(g.device.buffered() > 0, "the rest was copied");
    // Another connection still moves data both ways.
    let mut other = g.connect(3000, 80);
    g.send_bufs(&data_packet(3000, 80, b"ping"));
    assert_eq!(g.host_read(&mut other, 4), b"ping");
    // Every stalled stream arrives whole once its host reads.
    for (host, n) in hosts.iter_mut().zip(&sent) {
        let got = g.host_read(host, *n);
        assert!(got == numbered(0, *n), "the bytes came in order");
    }
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
}

#[test]
fn a_held_packet_beyond_the_credit_resets_the_connection_and_every_chain_comes_back() {
    let buf_alloc = 64 << 10;
    let mut g = Guest::with_buf_alloc(buf_alloc);
    let mut host = g.connect(1000, 80);
    let mut neighbour = g.connect(1001, 80);
    let mut tx = Sender::new(1000);
    tx.until_stalled(&mut g, buf_alloc, &[8 << 10], 64);
    assert!(g.tx_out > 0, "chains are held while the host reads nothing");
    // One more packet, of the whole buffer while some of it is held: beyond the credit.
    // The connection is reset, and the chains held for it come back with the bad one.
    g.send_bufs(&data_packet(1000, 80, &numbered(tx.sent, 64 << 10)));
    g.until("the RST", |g| {
        g.inbox
            .iter()
            .any(|(h, _)| h.op() == Some(Op::Rst) && h.dst_port == 1000)
            .then_some(())
    });
    g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
    assert_eq!(g.device.stats().credit_violations, 1);
    // The host's stream ends after what its socket already had, in order.
    let got = g.host_read_to_eof(&mut host);
    assert!(
        got == numbered(0, got.len()),
        "what came is the stream's start"
    );
    // The other connection is unaffected.
    g.send_bufs(&data_packet(1001, 80, &numbered(0, 8 << 10)));
    assert!(g.host_read(&mut neighbour, 8 << 10) == numbered(0, 8 << 10));
}

mod model;
