//! The vhost-user frontend and backend together in one process, over a socketpair on one
//! executor: start/stop/start cycles of the rng device, REPLY_ACK, config space, and every
//! kind of bad input a frontend can send, each answered with a failure ack (REPLY_ACK) or a
//! clean close and the exact error from `serve`.

#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use executor::{EventFd, EventFdStream, Executor, Task};
use memory::{GuestAddress, GuestMemory, RegionFd};
use virtio::mock::{MockBuf, MockSplitQueue};
use virtio::vhost_user::message::{
    Body, Header, Inflight, MemTable, MemoryRegion, Message, MessageError, Request, VringAddr,
    VringFd, VringState, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, U64,
};
use virtio::vhost_user::{
    serve, Connection, Device, Error, Frontend, StopSignal, VringConfig, PROTOCOL_F_CONFIG,
    PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_RESET_DEVICE,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use virtio::{AsyncQueue, Rng, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

const TIMEOUT: Duration = Duration::from_secs(5);
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC);

fn urandom() -> OwnedFd {
    File::open("/dev/urandom").unwrap().into()
}

fn pair() -> (Connection, Connection) {
    let (a, b) = executor::socketpair().unwrap();
    (Connection::new(a), Connection::new(b))
}

/// The guest side of one queue: memory, the mock driver, kick and call eventfds.
struct Guest {
    mem: GuestMemory,
    driver: MockSplitQueue,
    kick: EventFd,
    call: EventFd,
    calls: EventFdStream,
}

impl Guest {
    fn new(size: u16) -> Guest {
        let mem = GuestMemory::new_x86(16 << 20).unwrap();
        let driver = MockSplitQueue::new(&mem, GuestAddress(0x10000), size).unwrap();
        let call = EventFd::new().unwrap();
        let calls = call.try_clone().unwrap().into_stream();
        Guest {
            mem,
            driver,
            kick: EventFd::new().unwrap(),
            call,
            calls,
        }
    }

    fn vring(&self, base: u16) -> VringConfig<'_> {
        VringConfig {
            index: 0,
            size: self.driver.size(),
            desc: self.driver.desc_table(),
            avail: self.driver.avail_addr(),
            used: self.driver.used_addr(),
            base,
            kick: self.kick.as_fd(),
            call: Some(self.call.as_fd()),
        }
    }

    /// Submits a chain of `bufs`, kicks, waits for the call and returns its used length and
    /// the bytes written.
    async fn request(&mut self, bufs: &[MockBuf]) -> (u32, Vec<u8>) {
        let sent = self.driver.add_chain(bufs).unwrap();
        self.kick.write(1).unwrap();
        self.used(&sent).await
    }

    async fn used(&mut self, sent: &virtio::mock::MockChain) -> (u32, Vec<u8>) {
        executor::timeout(TIMEOUT, self.calls.next_value())
            .await
            .expect("the device signals")
            .unwrap();
        let used = self.driver.next_used().unwrap().expect("a used entry");
        assert_eq!(used.id, u32::from(sent.head));
        (used.len, self.driver.read_writable(sent).unwrap())
    }
}

fn spawn_rng(conn: Connection) -> Task<virtio::vhost_user::Result<()>> {
    executor::spawn(serve(Rc::new(Rng::new(urandom())), conn))
}

#[test]
fn rng_start_stop_start_cycle_serves_entropy_and_reports_bases() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        assert_eq!(fe.queue_num(), Some(1));
        assert_eq!(
            fe.features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
        );
        assert_eq!(
            fe.protocol_features(),
            (1 << PROTOCOL_F_MQ)
                | (1 << PROTOCOL_F_REPLY_ACK)
                | (1 << PROTOCOL_F_CONFIG)
                | (1 << PROTOCOL_F_RESET_DEVICE)
        );
        let mut guest = Guest::new(64);
        fe.start(FEATURES, &guest.mem, &[guest.vring(0)])
            .await
            .unwrap();

        let (len, data) = guest.request(&[MockBuf::Writable(64)]).await;
        assert_eq!(len, 64);
        assert!(data.iter().any(|&b| b != 0), "entropy, not zeros");
        // A chain with no writable buffer gets nothing.
        let (len, _) = guest.request(&[MockBuf::Readable(vec![1; 8])]).await;
        assert_eq!(len, 0);
        // Several buffers, capped per chain.
        let (len, data) = guest
            .request(&[MockBuf::Writable(100), MockBuf::Writable(70_000)])
            .await;
        assert_eq!(len as usize, virtio::rng::MAX_CHAIN_BYTES);
        assert!(data[..100].iter().any(|&b| b != 0));

        assert_eq!(fe.stop(&[0]).await.unwrap(), vec![3]);

        // A chain submitted while the ring is stopped waits for the restart.
        let sent = guest.driver.add_chain(&[MockBuf::Writable(16)]).unwrap();
        guest.kick.write(1).unwrap();
        assert!(
            executor::timeout(Duration::from_millis(100), guest.calls.next_value())
                .await
                .is_err(),
            "a stopped ring is not processed"
        );
        fe.start(FEATURES, &guest.mem, &[guest.vring(3)])
            .await
            .unwrap();
        let (len, _) = guest.used(&sent).await;
        assert_eq!(len, 16);
        let (len, _) = guest.request(&[MockBuf::Writable(8)]).await;
        assert_eq!(len, 8);
        assert_eq!(fe.stop(&[0]).await.unwrap(), vec![5]);
        // Stopping a stopped ring reports the same base.
        assert_eq!(fe.stop(&[0]).await.unwrap(), vec![5]);

        drop(fe);
        executor::timeout(TIMEOUT, server)
            .await
            .expect("the server ends when the frontend closes")
            .unwrap();
    });
}

#[test]
fn rng_with_event_idx_and_indirect_chains() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        let mut guest = Guest::new(16);
        let features = FEATURES | (1 << VIRTIO_F_EVENT_IDX);
        fe.start(features, &guest.mem, &[guest.vring(0)])
            .await
            .unwrap();
        for i in 0..40u16 {
            guest.driver.set_used_event(i).unwrap();
            let sent = guest
                .driver
                .add_indirect_chain(&[MockBuf::Writable(32)])
                .unwrap();
            guest.kick.write(1).unwrap();
            let (len, _) = guest.used(&sent).await;
            assert_eq!(len, 32);
        }
        assert_eq!(fe.stop(&[0]).await.unwrap(), vec![40]);
        fe.reset().await.unwrap();
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn reset_device_stops_the_ring_and_a_new_start_works() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        let mut guest = Guest::new(16);
        fe.start(FEATURES, &guest.mem, &[guest.vring(0)])
            .await
            .unwrap();
        let (len, _) = guest.request(&[MockBuf::Writable(4)]).await;
        assert_eq!(len, 4);
        fe.reset().await.unwrap();
        // The guest resets its queue too: a fresh layout from index 0.
        let mut guest = Guest::new(16);
        fe.start(FEATURES, &guest.mem, &[guest.vring(0)])
            .await
            .unwrap();
        let (len, _) = guest.request(&[MockBuf::Writable(4)]).await;
        assert_eq!(len, 4);
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

/// A two-queue device with 8 bytes of config space, whose queues only wait to be stopped.
#[derive(Default)]
struct ConfigDevice {
    config: RefCell<[u8; 8]>,
    resets: RefCell<u32>,
}

impl Device for ConfigDevice {
    fn name(&self) -> &'static str {
        "test"
    }
    fn device_type(&self) -> u32 {
        0xffff
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        16
    }
    fn features(&self) -> u64 {
        1 << 5
    }
    fn transport_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn config_size(&self) -> usize {
        8
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let config = self.config.borrow();
        data.copy_from_slice(&config[offset as usize..offset as usize + data.len()]);
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        if offset < 4 {
            return Err("bytes 0-3 are read-only".into());
        }
        self.config.borrow_mut()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
    fn run_queue(
        self: Rc<Self>,
        _index: usize,
        _queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(stop)
    }
    fn reset(&self) {
        *self.resets.borrow_mut() += 1;
    }
}

#[test]
fn config_space_reads_writes_and_refusals() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let device = Rc::new(ConfigDevice::default());
        *device.config.borrow_mut() = [1, 2, 3, 4, 5, 6, 7, 8];
        let server = executor::spawn(serve(device.clone(), back));
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        assert_eq!(fe.queue_num(), Some(2));
        assert_eq!(fe.features(), (1 << 5) | (1 << VIRTIO_F_VERSION_1));
        assert_eq!(fe.get_config(2, 4).await.unwrap(), [3, 4, 5, 6]);
        fe.set_config(4, &[9, 9]).await.unwrap();
        assert_eq!(fe.get_config(0, 8).await.unwrap(), [1, 2, 3, 4, 9, 9, 7, 8]);
        // Refused by the device: a failure ack, and the connection goes on.
        assert!(matches!(
            fe.set_config(0, &[0]).await,
            Err(Error::BackendFailed {
                request: Request::SetConfig,
                status: 1
            })
        ));
        // Outside the 8 bytes: a failure either way.
        assert!(matches!(
            fe.get_config(6, 4).await,
            Err(Error::BackendFailed {
                request: Request::GetConfig,
                ..
            })
        ));
        assert!(matches!(
            fe.set_config(7, &[0, 0]).await,
            Err(Error::BackendFailed {
                request: Request::SetConfig,
                ..
            })
        ));
        assert_eq!(fe.get_config(0, 2).await.unwrap(), [1, 2]);
        // Beyond what vhost-user carries: refused before anything is sent or allocated.
        assert!(matches!(
            fe.get_config(0, u32::MAX).await,
            Err(Error::Message(MessageError::ConfigOutOfRange { .. }))
        ));
        assert!(matches!(
            fe.set_config(250, &[0; 8]).await,
            Err(Error::Message(MessageError::ConfigOutOfRange { .. }))
        ));
        // A feature the backend did not offer is refused before anything is sent.
        let mem = GuestMemory::new_x86(1 << 20).unwrap();
        assert!(matches!(
            fe.start(1 << 6, &mem, &[]).await,
            Err(Error::FeaturesNotOffered { .. })
        ));
        fe.reset().await.unwrap();
        assert_eq!(*device.resets.borrow(), 1);
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn backend_that_never_replies_times_out_naming_the_request() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, _silent) = pair();
        let err = Frontend::connect(front, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Timeout(Request::GetFeatures, d) if d == Duration::from_millis(100)),
            "{err:?}"
        );
    });
}

/// A reply by hand: `request`'s, with `body`.
fn reply_by_hand(request: Request, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    Header::new(request, FLAG_REPLY | 1, body.len() as u32).encode(&mut bytes);
    bytes.extend_from_slice(body);
    bytes
}

/// A backend by hand, up to the end of the frontend's handshake: it offers the protocol
/// features `protocol`, and gives its end back once they are set.
async fn handshake_by_hand(back: Connection, protocol: u64) -> Connection {
    loop {
        let (msg, _) = back.recv().await.unwrap().unwrap();
        let offer = match msg.header.request {
            Request::GetFeatures => 1 << VHOST_USER_F_PROTOCOL_FEATURES,
            Request::GetProtocolFeatures => protocol,
            Request::SetProtocolFeatures => return back,
            _ => continue,
        };
        let reply = reply_by_hand(msg.header.request, &U64(offer).to_bytes());
        back.send(reply, &[]).await.unwrap();
    }
}

#[test]
fn an_inflight_region_for_other_queues_than_asked_is_refused() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let backend = executor::spawn(handshake_by_hand(back, 1 << PROTOCOL_F_INFLIGHT_SHMFD));
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        let back = backend.await;
        let answer = executor::spawn(async move {
            let (msg, _) = back.recv().await.unwrap().unwrap();
            assert_eq!(msg.header.request, Request::GetInflightFd);
            let region = Inflight {
                mmap_size: 4096,
                mmap_offset: 0,
                num_queues: 2,
                queue_size: 16,
            };
            let reply = reply_by_hand(Request::GetInflightFd, &region.to_bytes());
            let file = File::open("/dev/null").unwrap();
            back.send(reply, &[file.as_fd()]).await.unwrap();
            back
        });
        let err = fe.get_inflight(1, 16).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::MismatchedReply(Request::GetInflightFd, "a region for other queues")
            ),
            "{err:?}"
        );
        drop(answer.await);
    });
}

#[test]
fn backend_that_stops_reading_makes_a_send_time_out_and_the_connection_broken() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        // CONFIG, no REPLY_ACK: config writes get no reply. Then nothing more is read.
        let backend = executor::spawn(handshake_by_hand(back, 1 << PROTOCOL_F_CONFIG));
        let wait = Duration::from_millis(100);
        let fe = Frontend::connect(front, wait).await.unwrap();
        let _back = backend.await;
        let mut sent = 0;
        let writes = async {
            loop {
                match fe.set_config(0, &[0; 200]).await {
                    Ok(()) => sent += 1,
                    Err(e) => break e,
                }
                assert!(sent < 100_000, "the socket never filled");
            }
        };
        let err = executor::timeout(TIMEOUT, writes)
            .await
            .expect("a send to a backend that does not read never ended");
        assert!(
            matches!(err, Error::SendTimeout(Request::SetConfig, d) if d == wait),
            "{err:?} after {sent} writes"
        );
        // Part of a message may have gone: nothing more is sent on this connection.
        assert!(matches!(fe.set_config(0, &[0]).await, Err(Error::Broken)));
    });
}

#[test]
fn backend_that_closes_or_answers_another_request_is_an_error() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        drop(back);
        let err = Frontend::connect(front, TIMEOUT).await.unwrap_err();
        // SET_OWNER may or may not reach the closed socket; GET_FEATURES finds it closed.
        assert!(matches!(err, Error::PeerClosed | Error::Send(_)), "{err:?}");

        let (front, back) = pair();
        let fake = executor::spawn(async move {
            let (m, _) = back.recv().await.unwrap().unwrap();
            assert_eq!(m.header.request, Request::SetOwner);
            let (m, _) = back.recv().await.unwrap().unwrap();
            assert_eq!(m.header.request, Request::GetFeatures);
            let wrong = virtio::vhost_user::encode_reply(Request::GetProtocolFeatures, &U64(0));
            back.send(wrong, &[]).await.unwrap();
            back
        });
        let err = Frontend::connect(front, TIMEOUT).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnexpectedReply {
                    expected: Request::GetFeatures,
                    got: Request::GetProtocolFeatures,
                    reply: true
                }
            ),
            "{err:?}"
        );
        drop(fake.await);
    });
}

/// A frontend that sends whatever a test asks, through the connection's framing.
struct Raw {
    conn: Connection,
}

impl Raw {
    async fn send(&self, request: Request, flags: u32, body: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut bytes = Vec::new();
        Header::new(request, flags, body.len() as u32).encode(&mut bytes);
        bytes.extend_from_slice(body);
        self.conn.send(bytes, fds).await.unwrap();
    }

    async fn reply(&self) -> Message {
        let (m, fds) = executor::timeout(TIMEOUT, self.conn.recv())
            .await
            .expect("a reply")
            .unwrap()
            .expect("not closed");
        assert!(m.header.is_reply());
        assert!(fds.is_empty());
        m
    }

    async fn get_u64(&self, request: Request) -> u64 {
        self.send(request, 0, &[], &[]).await;
        let m = self.reply().await;
        assert_eq!(m.header.request, request);
        U64::decode(&m.body).unwrap().0
    }

    /// Sends a request with NEED_REPLY; returns the ack status.
    async fn acked(&self, request: Request, body: &[u8], fds: &[BorrowedFd<'_>]) -> u64 {
        self.send(request, FLAG_NEED_REPLY, body, fds).await;
        let m = self.reply().await;
        assert_eq!(m.header.request, request);
        U64::decode(&m.body).unwrap().0
    }

    /// SET_OWNER, the features offered but EVENT_IDX (so every used entry is signalled),
    /// and `protocol` (REPLY_ACK or nothing).
    async fn negotiate(&self, protocol: u64) {
        self.send(Request::SetOwner, 0, &[], &[]).await;
        let features = self.get_u64(Request::GetFeatures).await & !(1 << VIRTIO_F_EVENT_IDX);
        self.send(Request::SetFeatures, 0, &U64(features).to_bytes(), &[])
            .await;
        self.get_u64(Request::GetProtocolFeatures).await;
        self.send(
            Request::SetProtocolFeatures,
            0,
            &U64(protocol).to_bytes(),
            &[],
        )
        .await;
    }

    /// The server answers: it is still serving.
    async fn alive(&self) {
        assert_ne!(self.get_u64(Request::GetFeatures).await, 0);
    }

    /// The server closed the connection.
    async fn closed(&self) {
        let end = executor::timeout(TIMEOUT, self.conn.recv())
            .await
            .expect("the server closes");
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
}

/// A memfd guest memory of 1 MiB at 0, and its region as the frontend describes it.
fn memory() -> (GuestMemory, MemoryRegion) {
    let mem = GuestMemory::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let r = mem.regions().next().unwrap();
    let region = MemoryRegion {
        guest_phys_addr: 0,
        memory_size: r.size,
        userspace_addr: r.user_addr,
        mmap_offset: 0,
    };
    (mem, region)
}

fn state(index: u32, num: u32) -> Vec<u8> {
    VringState { index, num }.to_bytes()
}

/// Runs the rng server against a raw frontend; returns what `serve` returned.
fn with_raw_rng<F, Fut>(test: F) -> virtio::vhost_user::Result<()>
where
    F: FnOnce(Raw) -> Fut,
    Fut: Future<Output = ()>,
{
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        test(Raw { conn: front }).await;
        executor::timeout(TIMEOUT, server)
            .await
            .expect("the server ends")
    })
}

const REPLY_ACK: u64 = 1 << PROTOCOL_F_REPLY_ACK;

#[test]
fn bad_queue_sizes_and_indices_get_failure_acks_with_reply_ack() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        for size in [0, 3, 100, 512, 65536] {
            assert_eq!(
                raw.acked(Request::SetVringNum, &state(0, size), &[]).await,
                1
            );
        }
        assert_eq!(
            raw.acked(Request::SetVringNum, &state(0, 256), &[]).await,
            0
        );
        assert_eq!(raw.acked(Request::SetVringNum, &state(1, 16), &[]).await, 1);
        assert_eq!(raw.acked(Request::SetVringBase, &state(1, 0), &[]).await, 1);
        assert_eq!(
            raw.acked(Request::SetVringBase, &state(0, 0x1_0000), &[])
                .await,
            1
        );
        let kick = EventFd::new().unwrap();
        assert_eq!(
            raw.acked(
                Request::SetVringKick,
                &VringFd::new(7, false).to_bytes(),
                &[kick.as_fd()]
            )
            .await,
            1
        );
        assert_eq!(
            raw.acked(Request::SetVringEnable, &state(3, 1), &[]).await,
            1
        );
        // SET_VRING_ADDR before any memory table.
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc: 0,
            used: 0,
            avail: 0,
            log: 0,
        };
        assert_eq!(
            raw.acked(Request::SetVringAddr, &addr.to_bytes(), &[])
                .await,
            1
        );
        // Features beyond the offer.
        assert_eq!(
            raw.acked(Request::SetFeatures, &U64(1 << 60).to_bytes(), &[])
                .await,
            1
        );
        raw.alive().await;
    });
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn bad_queue_size_without_reply_ack_closes_with_the_error() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        raw.send(Request::SetVringNum, 0, &state(0, 3), &[]).await;
        raw.closed().await;
    });
    assert!(
        matches!(result, Err(Error::QueueSize { size: 3, max: 256 })),
        "{result:?}"
    );
}

#[test]
fn queue_index_beyond_the_device_closes_with_the_error() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        raw.send(Request::GetVringBase, 0, &state(1, 0), &[]).await;
        raw.closed().await;
    });
    assert!(
        matches!(
            result,
            Err(Error::QueueIndex {
                index: 1,
                num_queues: 1
            })
        ),
        "{result:?}"
    );
}

#[test]
fn kick_without_an_fd_is_refused_with_a_failure_ack_or_a_close() {
    let nofd = VringFd::new(0, true).to_bytes();
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        assert_eq!(raw.acked(Request::SetVringKick, &nofd, &[]).await, 1);
        raw.alive().await;
    });
    assert!(result.is_ok(), "{result:?}");
    let nofd = VringFd::new(0, true).to_bytes();
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        raw.send(Request::SetVringKick, 0, &nofd, &[]).await;
        raw.closed().await;
    });
    assert!(matches!(result, Err(Error::PolledRing(0))), "{result:?}");
}

#[test]
fn need_reply_without_reply_ack_negotiated_gets_no_ack() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        raw.send(Request::SetVringNum, FLAG_NEED_REPLY, &state(0, 16), &[])
            .await;
        // The next message on the wire answers GET_FEATURES, not the SET_VRING_NUM.
        raw.alive().await;
    });
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn unmappable_memory_table_gets_a_failure_ack_or_closes() {
    // The region claims 1 MiB of a 4 KiB memfd.
    fn short_region() -> (OwnedFd, MemoryRegion) {
        let small = GuestMemory::new(&[(GuestAddress(0), 0x1000)]).unwrap();
        let r = small.regions().next().unwrap();
        let fd = r.fd.try_clone_to_owned().unwrap();
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: 0x7000_0000_0000,
            mmap_offset: 0,
        };
        (fd, region)
    }
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        let (fd, region) = short_region();
        let table = MemTable::new(vec![region]).to_bytes();
        assert_eq!(
            raw.acked(Request::SetMemTable, &table, &[fd.as_fd()]).await,
            1
        );
        // The offset runs past the end of the fd.
        let (mem, mut region) = memory();
        region.mmap_offset = 1 << 30;
        let fd = mem.regions().next().unwrap().fd;
        let table = MemTable::new(vec![region]).to_bytes();
        assert_eq!(raw.acked(Request::SetMemTable, &table, &[fd]).await, 1);
        raw.alive().await;
    });
    assert!(result.is_ok(), "{result:?}");

    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        let (fd, region) = short_region();
        let table = MemTable::new(vec![region]).to_bytes();
        raw.send(Request::SetMemTable, 0, &table, &[fd.as_fd()])
            .await;
        raw.closed().await;
    });
    assert!(
        matches!(
            result,
            Err(Error::MapMemory(memory::Error::FdTooSmall { .. }))
        ),
        "{result:?}"
    );
}

#[test]
fn overlapping_memory_regions_close_with_the_error() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        let (mem, region) = memory();
        let mut second = region;
        second.guest_phys_addr = 0x8_0000;
        let fd = mem.regions().next().unwrap().fd;
        let table = MemTable::new(vec![region, second]).to_bytes();
        raw.send(Request::SetMemTable, FLAG_NEED_REPLY, &table, &[fd, fd])
            .await;
        raw.closed().await;
    });
    assert!(
        matches!(
            result,
            Err(Error::Message(MessageError::RegionOverlap(0, 1)))
        ),
        "{result:?}"
    );
}

/// Memory table, size and the three ring addresses of queue 0 (offsets in the region).
async fn set_up_ring(raw: &Raw, mem: &GuestMemory, region: MemoryRegion, desc: u64) {
    let fd = mem.regions().next().unwrap().fd;
    let table = MemTable::new(vec![region]).to_bytes();
    assert_eq!(raw.acked(Request::SetMemTable, &table, &[fd]).await, 0);
    assert_eq!(
        raw.acked(Request::SetVringNum, &state(0, 256), &[]).await,
        0
    );
    let user = region.userspace_addr;
    let addr = VringAddr {
        index: 0,
        flags: 0,
        desc: user + desc,
        avail: user + 0x1000,
        used: user + 0x2000,
        log: 0,
    };
    assert_eq!(
        raw.acked(Request::SetVringAddr, &addr.to_bytes(), &[])
            .await,
        0
    );
}

#[test]
fn ring_addresses_outside_memory_are_refused() {
    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        let (mem, region) = memory();
        let fd = mem.regions().next().unwrap().fd;
        let table = MemTable::new(vec![region]).to_bytes();
        assert_eq!(raw.acked(Request::SetMemTable, &table, &[fd]).await, 0);
        let user = region.userspace_addr;
        for (desc, avail, used) in [
            (user - 0x1000, user, user),
            (user, user + (1 << 20), user),
            (user, user, 0),
        ] {
            let addr = VringAddr {
                index: 0,
                flags: 0,
                desc,
                used,
                avail,
                log: 0,
            };
            assert_eq!(
                raw.acked(Request::SetVringAddr, &addr.to_bytes(), &[])
                    .await,
                1
            );
        }
        // In memory, but the descriptor table runs past its end: refused when the ring
        // would start (at the kick), and the ring does not start.
        set_up_ring(&raw, &mem, region, (1 << 20) - 0x800).await;
        let kick = EventFd::new().unwrap();
        let body = VringFd::new(0, false).to_bytes();
        assert_eq!(
            raw.acked(Request::SetVringKick, &body, &[kick.as_fd()])
                .await,
            0,
            "protocol features negotiated: the ring waits for SET_VRING_ENABLE"
        );
        assert_eq!(
            raw.acked(Request::SetVringEnable, &state(0, 1), &[]).await,
            1
        );
        raw.alive().await;
    });
    assert!(result.is_ok(), "{result:?}");

    let result = with_raw_rng(|raw| async move {
        raw.negotiate(REPLY_ACK).await;
        let (mem, region) = memory();
        set_up_ring(&raw, &mem, region, (1 << 20) - 0x800).await;
        let kick = EventFd::new().unwrap();
        let body = VringFd::new(0, false).to_bytes();
        assert_eq!(
            raw.acked(Request::SetVringKick, &body, &[kick.as_fd()])
                .await,
            0
        );
        raw.send(Request::SetVringEnable, 0, &state(0, 1), &[])
            .await;
        raw.closed().await;
    });
    assert!(
        matches!(
            result,
            Err(Error::QueueSetup {
                index: 0,
                source: virtio::Error::RingOutOfBounds { .. }
            })
        ),
        "{result:?}"
    );

    let result = with_raw_rng(|raw| async move {
        raw.negotiate(0).await;
        let (mem, region) = memory();
        let fd = mem.regions().next().unwrap().fd;
        let table = MemTable::new(vec![region]).to_bytes();
        raw.send(Request::SetMemTable, 0, &table, &[fd]).await;
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc: 0x1000,
            used: region.userspace_addr,
            avail: region.userspace_addr,
            log: 0,
        };
        raw.send(Request::SetVringAddr, 0, &addr.to_bytes(), &[])
            .await;
        raw.closed().await;
    });
    assert!(
        matches!(
            result,
            Err(Error::VringAddress {
                index: 0,
                ring: "descriptor table",
                addr: 0x1000
            })
        ),
        "{result:?}"
    );
}

#[test]
fn without_protocol_features_the_kick_starts_the_ring() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let raw = Raw { conn: front };
        raw.send(Request::SetOwner, 0, &[], &[]).await;
        raw.get_u64(Request::GetFeatures).await;
        raw.send(Request::SetFeatures, 0, &U64(FEATURES).to_bytes(), &[])
            .await;
        let mut guest = Guest::new(16);
        let r = guest.mem.regions().next().unwrap();
        let region = MemoryRegion {
            guest_phys_addr: r.guest_addr.0,
            memory_size: r.size,
            userspace_addr: r.user_addr,
            mmap_offset: r.fd_offset,
        };
        let table = MemTable::new(vec![region]).to_bytes();
        raw.send(Request::SetMemTable, 0, &table, &[r.fd]).await;
        raw.send(Request::SetVringNum, 0, &state(0, 16), &[]).await;
        let user = |a: GuestAddress| r.user_addr + a.0;
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc: user(guest.driver.desc_table()),
            used: user(guest.driver.used_addr()),
            avail: user(guest.driver.avail_addr()),
            log: 0,
        };
        raw.send(Request::SetVringAddr, 0, &addr.to_bytes(), &[])
            .await;
        raw.send(Request::SetVringBase, 0, &state(0, 0), &[]).await;
        raw.send(
            Request::SetVringCall,
            0,
            &VringFd::new(0, false).to_bytes(),
            &[guest.call.as_fd()],
        )
        .await;
        raw.send(
            Request::SetVringKick,
            0,
            &VringFd::new(0, false).to_bytes(),
            &[guest.kick.as_fd()],
        )
        .await;
        let (len, _) = guest.request(&[MockBuf::Writable(10)]).await;
        assert_eq!(len, 10);
        // A new call fd while running: the ring goes on, and signals the new one.
        let call2 = EventFd::new().unwrap();
        let mut calls2 = call2.try_clone().unwrap().into_stream();
        raw.send(
            Request::SetVringCall,
            0,
            &VringFd::new(0, false).to_bytes(),
            &[call2.as_fd()],
        )
        .await;
        // Messages are handled in order: once this is answered, the new call fd is in use.
        raw.alive().await;
        let sent = guest.driver.add_chain(&[MockBuf::Writable(3)]).unwrap();
        guest.kick.write(1).unwrap();
        executor::timeout(TIMEOUT, calls2.next_value())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            guest.driver.next_used().unwrap().unwrap().id,
            u32::from(sent.head)
        );
        raw.send(Request::GetVringBase, 0, &state(0, 0), &[]).await;
        let m = raw.reply().await;
        assert_eq!(
            VringState::decode(&m.body).unwrap(),
            VringState { index: 0, num: 2 }
        );
        drop(raw);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

/// Writes raw bytes (and fds) on the socket, then half-closes or closes.
fn raw_bytes_result(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> virtio::vhost_user::Result<()> {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        front.send(bytes, &borrowed).await.unwrap();
        drop(front);
        executor::timeout(TIMEOUT, server)
            .await
            .expect("the server ends")
    })
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [code, flags, size] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[test]
fn malformed_messages_close_with_the_exact_error() {
    let r = raw_bytes_result(header(1, 2, 0), vec![]);
    assert!(
        matches!(r, Err(Error::Message(MessageError::BadVersion(2)))),
        "{r:?}"
    );
    let r = raw_bytes_result(header(1, 1, 1 << 20), vec![]);
    assert!(
        matches!(r, Err(Error::Message(MessageError::Oversized(0x10_0000)))),
        "{r:?}"
    );
    let r = raw_bytes_result(header(99, 1, 0), vec![]);
    assert!(
        matches!(r, Err(Error::Message(MessageError::UnknownRequest(99)))),
        "{r:?}"
    );
    // A reply where a request belongs.
    let r = raw_bytes_result(header(1, 1 | 4, 0), vec![]);
    assert!(
        matches!(
            r,
            Err(Error::Message(MessageError::UnexpectedReply(
                Request::GetFeatures
            )))
        ),
        "{r:?}"
    );
    // SET_FEATURES with a 4-byte body.
    let mut bytes = header(2, 1, 4);
    bytes.extend_from_slice(&[0; 4]);
    let r = raw_bytes_result(bytes, vec![]);
    assert!(
        matches!(
            r,
            Err(Error::Message(MessageError::Truncated {
                needed: 8,
                got: 4
            }))
        ),
        "{r:?}"
    );
    // SET_FEATURES with an fd.
    let mut bytes = header(2, 1, 8);
    bytes.extend_from_slice(&[0; 8]);
    let r = raw_bytes_result(bytes, vec![urandom()]);
    assert!(
        matches!(
            r,
            Err(Error::Message(MessageError::WrongFdCount {
                request: Request::SetFeatures,
                expected: 0,
                got: 1
            }))
        ),
        "{r:?}"
    );
    // SET_VRING_KICK without its fd.
    let mut bytes = header(12, 1, 8);
    bytes.extend_from_slice(&VringFd::new(0, false).to_bytes());
    let r = raw_bytes_result(bytes, vec![]);
    assert!(
        matches!(
            r,
            Err(Error::Message(MessageError::WrongFdCount {
                request: Request::SetVringKick,
                expected: 1,
                got: 0
            }))
        ),
        "{r:?}"
    );
    // Nine fds: more than any message takes.
    let mut bytes = header(2, 1, 8);
    bytes.extend_from_slice(&[0; 8]);
    let r = raw_bytes_result(bytes, (0..9).map(|_| urandom()).collect());
    assert!(matches!(r, Err(Error::TooManyFds(8))), "{r:?}");
}

#[test]
fn peer_closing_mid_message_is_an_error_and_between_messages_is_not() {
    let r = raw_bytes_result(header(2, 1, 8)[..7].to_vec(), vec![]);
    assert!(
        matches!(
            r,
            Err(Error::ClosedMidMessage {
                got: 7,
                expected: HEADER_SIZE
            })
        ),
        "{r:?}"
    );
    let mut bytes = header(2, 1, 8);
    bytes.extend_from_slice(&[0; 3]);
    let r = raw_bytes_result(bytes, vec![]);
    assert!(
        matches!(
            r,
            Err(Error::ClosedMidMessage {
                got: 15,
                expected: 20
            })
        ),
        "{r:?}"
    );
    let r = raw_bytes_result(header(3, 1, 0), vec![]);
    assert!(r.is_ok(), "{r:?}");
    let r = raw_bytes_result(Vec::new(), vec![]);
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn region_fd_helper_round_trips_through_the_backend_mapping() {
    // The backend maps with from_regions what the frontend describes with regions().
    let (mem, region) = memory();
    mem.write_slice(b"ring", GuestAddress(0x100)).unwrap();
    let fd = mem
        .regions()
        .next()
        .unwrap()
        .fd
        .try_clone_to_owned()
        .unwrap();
    let mapped = GuestMemory::from_regions(vec![RegionFd {
        fd,
        fd_offset: region.mmap_offset,
        size: region.memory_size,
        guest_addr: GuestAddress(region.guest_phys_addr),
        user_addr: region.userspace_addr,
    }])
    .unwrap();
    let mut buf = [0u8; 4];
    mapped.read_slice(&mut buf, GuestAddress(0x100)).unwrap();
    assert_eq!(&buf, b"ring");
    assert_eq!(
        mapped.user_to_guest(region.userspace_addr + 0x100),
        Some(GuestAddress(0x100))
    );
}

mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// Sends `bytes` to a fresh rng server, closes, and checks the server ends.
    fn server_ends(ex: &Executor, bytes: Vec<u8>) -> Result<(), TestCaseError> {
        let ended = ex.run_until(async {
            let (front, back) = pair();
            let server = spawn_rng(back);
            // The server may close first; what it does with the bytes is what matters.
            let _ = front.send(bytes, &[]).await;
            drop(front);
            executor::timeout(TIMEOUT, server).await
        });
        prop_assert!(ended.is_ok(), "the server did not end");
        Ok(())
    }

    /// Messages with known request codes, mostly valid flags and size fields, and bodies of
    /// the lengths requests take, mostly small values (queue 0, size 1, ...), so that streams
    /// get past the header checks into the handlers.
    fn plausible_stream() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => any::<u8>()];
        let len = prop_oneof![
            Just(0usize),
            Just(8),
            Just(40),
            Just(12),
            Just(16),
            0usize..64
        ];
        let message = (
            prop::sample::select(Request::ALL.to_vec()),
            prop_oneof![6 => Just(1u32), 3 => Just(1 | FLAG_NEED_REPLY), 1 => any::<u32>()],
            len.prop_flat_map(move |n| prop::collection::vec(byte.clone(), n)),
            prop_oneof![9 => Just(None), 1 => (0u32..100).prop_map(Some)],
        )
            .prop_map(|(request, flags, body, size)| {
                let mut out = header(request.code(), flags, size.unwrap_or(body.len() as u32));
                out.extend_from_slice(&body);
                out
            });
        prop::collection::vec(message, 0..16).prop_map(|m| m.concat())
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_server_and_it_ends() {
        let ex = Executor::new().unwrap();
        let mut runner = TestRunner::new(Config::with_cases(300));
        runner
            .run(&prop::collection::vec(any::<u8>(), 0..600), |bytes| {
                server_ends(&ex, bytes)
            })
            .unwrap();
        let mut runner = TestRunner::new(Config::with_cases(500));
        runner
            .run(&plausible_stream(), |bytes| server_ends(&ex, bytes))
            .unwrap();
    }
}

#[test]
fn two_queues_start_and_stop_with_their_own_bases() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = executor::spawn(serve(Rc::new(ConfigDevice::default()), back));
        let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
        let mem = GuestMemory::new_x86(16 << 20).unwrap();
        let q0 = MockSplitQueue::new(&mem, GuestAddress(0x10000), 16).unwrap();
        let q1 = MockSplitQueue::new(&mem, GuestAddress(0x20_0000), 8).unwrap();
        let (kick0, kick1) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        fn vring<'a>(
            index: u32,
            q: &MockSplitQueue,
            base: u16,
            kick: &'a EventFd,
        ) -> VringConfig<'a> {
            VringConfig {
                index,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_addr(),
                used: q.used_addr(),
                base,
                kick: kick.as_fd(),
                call: None,
            }
        }
        let rings = [vring(0, &q0, 0, &kick0), vring(1, &q1, 5, &kick1)];
        fe.start(1 << VIRTIO_F_VERSION_1, &mem, &rings)
            .await
            .unwrap();
        assert_eq!(fe.stop(&[1, 0]).await.unwrap(), vec![5, 0]);
        // Started again after the stop; a third queue does not exist.
        fe.start(1 << VIRTIO_F_VERSION_1, &mem, &rings)
            .await
            .unwrap();
        let bad = [vring(2, &q1, 0, &kick1)];
        assert!(matches!(
            fe.start(1 << VIRTIO_F_VERSION_1, &mem, &bad).await,
            Err(Error::BackendFailed {
                request: Request::SetVringNum,
                status: 1
            })
        ));
        // Ring layout changes while the rings run are refused.
        assert!(matches!(
            fe.start(1 << VIRTIO_F_VERSION_1, &mem, &rings).await,
            Err(Error::BackendFailed {
                request: Request::SetVringNum,
                ..
            })
        ));
        assert_eq!(fe.stop(&[0, 1]).await.unwrap(), vec![0, 5]);
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn a_new_memory_table_moves_running_rings_or_fails_their_restart() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let server = spawn_rng(back);
        let raw = Raw { conn: front };
        raw.negotiate(REPLY_ACK).await;
        let mut guest = Guest::new(16);
        let mem = guest.mem.clone();
        let r = mem.regions().next().unwrap();
        let region = MemoryRegion {
            guest_phys_addr: r.guest_addr.0,
            memory_size: r.size,
            userspace_addr: r.user_addr,
            mmap_offset: r.fd_offset,
        };
        let table = MemTable::new(vec![region]).to_bytes();
        assert_eq!(raw.acked(Request::SetMemTable, &table, &[r.fd]).await, 0);
        assert_eq!(raw.acked(Request::SetVringNum, &state(0, 16), &[]).await, 0);
        let user = |a: GuestAddress| r.user_addr + a.0;
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc: user(guest.driver.desc_table()),
            used: user(guest.driver.used_addr()),
            avail: user(guest.driver.avail_addr()),
            log: 0,
        };
        assert_eq!(
            raw.acked(Request::SetVringAddr, &addr.to_bytes(), &[])
                .await,
            0
        );
        let fd_body = VringFd::new(0, false).to_bytes();
        assert_eq!(
            raw.acked(Request::SetVringCall, &fd_body, &[guest.call.as_fd()])
                .await,
            0
        );
        assert_eq!(
            raw.acked(Request::SetVringKick, &fd_body, &[guest.kick.as_fd()])
                .await,
            0
        );
        assert_eq!(
            raw.acked(Request::SetVringEnable, &state(0, 1), &[]).await,
            0
        );
        let (len, _) = guest.request(&[MockBuf::Writable(8)]).await;
        assert_eq!(len, 8);

        // The same memory again, as a new table: the ring restarts on it and goes on.
        assert_eq!(raw.acked(Request::SetMemTable, &table, &[r.fd]).await, 0);
        let (len, _) = guest.request(&[MockBuf::Writable(8)]).await;
        assert_eq!(len, 8);

        // A table in which the ring's addresses are nowhere: the restart fails.
        let mut moved = region;
        moved.userspace_addr += 1 << 40;
        let table = MemTable::new(vec![moved]).to_bytes();
        assert_eq!(raw.acked(Request::SetMemTable, &table, &[r.fd]).await, 1);
        raw.send(Request::GetVringBase, 0, &state(0, 0), &[]).await;
        let m = raw.reply().await;
        assert_eq!(
            VringState::decode(&m.body).unwrap(),
            VringState { index: 0, num: 2 }
        );
        drop(raw);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn requests_from_several_tasks_take_turns() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        let device = Rc::new(ConfigDevice::default());
        *device.config.borrow_mut() = [1, 2, 3, 4, 5, 6, 7, 8];
        let server = executor::spawn(serve(device, back));
        let fe = Rc::new(Frontend::connect(front, TIMEOUT).await.unwrap());
        let readers: Vec<_> = (0..8u32)
            .map(|i| {
                let fe = fe.clone();
                executor::spawn(async move { fe.get_config(i, 1).await.unwrap() })
            })
            .collect();
        for (i, r) in readers.into_iter().enumerate() {
            assert_eq!(r.await, [i as u8 + 1]);
        }
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn a_timed_out_frontend_is_broken_for_later_requests() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let (front, back) = pair();
        // A backend that negotiates, then stops answering.
        let fake = executor::spawn(async move {
            let mut held = Vec::new();
            while let Ok(Some((m, _))) = back.recv().await {
                let reply = match m.header.request {
                    Request::GetFeatures => Some(1u64 << 32),
                    _ => None,
                };
                if let Some(v) = reply {
                    let bytes = virtio::vhost_user::encode_reply(m.header.request, &U64(v));
                    back.send(bytes, &[]).await.unwrap();
                }
                held.push(m);
            }
            held
        });
        let fe = Frontend::connect(front, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(fe.queue_num(), None);
        assert_eq!(fe.protocol_features(), 0);
        // No protocol features: nothing to reset, and config space is not available.
        fe.reset().await.unwrap();
        assert!(matches!(
            fe.get_config(0, 4).await,
            Err(Error::NotNegotiated(_))
        ));
        assert!(matches!(
            fe.stop(&[0]).await,
            Err(Error::Timeout(Request::GetVringBase, _))
        ));
        assert!(matches!(fe.stop(&[0]).await, Err(Error::Broken)));
        drop(fe);
        let held = fake.await;
        assert_eq!(
            held.iter().map(|m| m.header.request).collect::<Vec<_>>(),
            [
                Request::SetOwner,
                Request::GetFeatures,
                Request::GetVringBase
            ]
        );
    });
}

/// A device that takes chains and, with `complete`, uses each at once (len 1); without it,
/// holds them forever (a device that will die with requests in flight). It counts the
/// chains it took and the `resumed` calls.
struct Tracker {
    complete: bool,
    taken: Rc<std::cell::Cell<u32>>,
    resumed: Rc<std::cell::Cell<u32>>,
}

impl Device for Tracker {
    fn name(&self) -> &'static str {
        "tracker"
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        16
    }
    fn features(&self) -> u64 {
        0
    }
    fn run_queue(
        self: Rc<Self>,
        _index: usize,
        queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            let mut held = Vec::new();
            loop {
                let next = std::pin::pin!(queue.next_chain());
                match futures::future::select(next, stop.clone()).await {
                    futures::future::Either::Left((Ok(chain), _)) => {
                        self.taken.set(self.taken.get() + 1);
                        if self.complete {
                            queue.complete(chain.head_index(), 1).unwrap();
                        } else {
                            held.push(chain);
                        }
                    }
                    _ => return,
                }
            }
        })
    }
    fn resumed(&self) {
        self.resumed.set(self.resumed.get() + 1);
    }
}

type Counter = Rc<std::cell::Cell<u32>>;

/// A [`Tracker`] served with an inflight region of its own to offer, and a frontend on it;
/// its counters of chains taken and `resumed` calls.
async fn tracker_backend(
    complete: bool,
) -> (
    Frontend,
    Task<virtio::vhost_user::Result<()>>,
    Counter,
    Counter,
) {
    let (front, back) = pair();
    let t = Tracker {
        complete,
        taken: Rc::default(),
        resumed: Rc::default(),
    };
    let (taken, resumed) = (t.taken.clone(), t.resumed.clone());
    let pool = virtio::vhost_user::reserve_inflight(1, 16).unwrap();
    let server = executor::spawn(virtio::vhost_user::serve_with_inflight(
        Rc::new(t),
        back,
        Some(pool),
    ));
    let fe = Frontend::connect(front, TIMEOUT).await.unwrap();
    (fe, server, taken, resumed)
}

/// Starts the guest's ring on `fe` with the inflight region `region` (in `fd`).
async fn start_on(
    fe: &Frontend,
    guest: &Guest,
    region: &virtio::vhost_user::Inflight,
    fd: BorrowedFd<'_>,
) {
    fe.start_with_inflight(FEATURES, &guest.mem, &[guest.vring(0)], Some((region, fd)))
        .await
        .unwrap();
}

#[test]
fn a_backend_that_takes_over_an_inflight_region_finishes_what_the_dead_one_held() {
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(16);
        // The first backend takes three chains and holds them.
        let (fe, server, taken, resumed) = tracker_backend(false).await;
        assert!(fe.tracks_inflight());
        let (region, fd) = fe.get_inflight(1, 16).await.unwrap();
        start_on(&fe, &guest, &region, fd.as_fd()).await;
        let sent: Vec<_> = (0..3)
            .map(|_| guest.driver.add_chain(&[MockBuf::Writable(8)]).unwrap())
            .collect();
        guest.kick.write(1).unwrap();
        for _ in 0..100 {
            if taken.get() == 3 {
                break;
            }
            executor::sleep(Duration::from_millis(5)).await.unwrap();
        }
        assert_eq!(taken.get(), 3);
        assert_eq!(resumed.get(), 0, "a fresh region is no takeover");
        // It dies with them in flight.
        drop(server);
        drop(fe);

        // The next backend gets the same region and the rings, from the used index (0).
        let (fe, server, taken, resumed) = tracker_backend(true).await;
        start_on(&fe, &guest, &region, fd.as_fd()).await;
        // No new kick: the chains in flight are submitted again by themselves, oldest first
        // (one call may cover them all).
        let mut used = Vec::new();
        for _ in 0..200 {
            while let Some(u) = guest.driver.next_used().unwrap() {
                used.push((u.id, u.len));
            }
            if used.len() == 3 {
                break;
            }
            executor::sleep(Duration::from_millis(5)).await.unwrap();
        }
        let heads: Vec<_> = sent.iter().map(|s| (u32::from(s.head), 1)).collect();
        assert_eq!(used, heads);
        executor::timeout(TIMEOUT, guest.calls.next_value())
            .await
            .expect("the device signals")
            .unwrap();
        assert_eq!(taken.get(), 3);
        assert_eq!(resumed.get(), 1);
        // And new chains go on after them.
        let (len, _) = guest.request(&[MockBuf::Writable(8)]).await;
        assert_eq!(len, 1);
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}
