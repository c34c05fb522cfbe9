//! The virtio-blk device behind the vhost-user backend, driven by ringvm's frontend and the
//! mock guest driver in one process: raw and qcow2 images, every request type, malformed
//! requests, many requests in flight, stop with requests in flight, two queues.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use block::device::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use block::{BlockDevice, BlockOptions, Disk, OpenOptions};
use common::{qemu_img, TempDir};
use executor::{EventFd, EventFdStream, Executor, Task};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue, MockUsed};
use virtio::vhost_user::{serve, Connection, Frontend, VringConfig};
use virtio::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

const TIMEOUT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 16 * MIB;
const VIRTIO_F_VERSION_1: u32 = 32;

fn raw_image(dir: &TempDir, size: u64) -> PathBuf {
    let p = dir.path("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn qcow2_image(dir: &TempDir, size: u64) -> PathBuf {
    let p = dir.path("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        &size.to_string(),
    ]);
    p
}

fn open(path: &Path, read_only: bool) -> Disk {
    Disk::open(
        path,
        OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&num_sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The guest side of one queue.
struct Queue {
    driver: MockSplitQueue,
    /// Used entries taken so far (the driver's `used_event` with EVENT_IDX).
    seen: u16,
    /// Calls (interrupts) counted so far.
    signals: u64,
    kick: EventFd,
    call: EventFd,
    calls: EventFdStream,
}

/// The guest: memory and its queues.
struct Guest {
    mem: GuestMemory,
    queues: Vec<Queue>,
}

impl Guest {
    fn new(num_queues: usize, size: u16) -> Guest {
        let mem = GuestMemory::new_x86(64 * MIB).unwrap();
        let queues = (0..num_queues as u64)
            .map(|i| {
                let driver = MockSplitQueue::with_data_area(
                    &mem,
                    GuestAddress(0x10_0000 + i * 0x10_0000),
                    size,
                    GuestAddress(8 * MIB + i * 24 * MIB),
                    24 * MIB,
                )
                .unwrap();
                let call = EventFd::new().unwrap();
                let calls = call.try_clone().unwrap().into_stream();
                Queue {
                    driver,
                    seen: 0,
                    signals: 0,
                    kick: EventFd::new().unwrap(),
                    call,
                    calls,
                }
            })
            .collect();
        Guest { mem, queues }
    }

    fn vrings(&self) -> Vec<VringConfig<'_>> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| VringConfig {
                index: i as u32,
                size: q.driver.size(),
                desc: q.driver.desc_table(),
                avail: q.driver.avail_addr(),
                used: q.driver.used_addr(),
                base: 0,
                kick: q.kick.as_fd(),
                call: Some(q.call.as_fd()),
            })
            .collect()
    }

    fn submit(&mut self, q: usize, bufs: &[MockBuf]) -> MockChain {
        self.queues[q].driver.add_chain(bufs).unwrap()
    }

    fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Waits for `n` used entries on queue `q`, in the order the device put them.
    async fn used(&mut self, q: usize, n: usize) -> Vec<MockUsed> {
        let queue = &mut self.queues[q];
        let mut used = Vec::new();
        while used.len() < n {
            while let Some(u) = queue.driver.next_used().unwrap() {
                queue.seen = queue.seen.wrapping_add(1);
                used.push(u);
            }
            // As a driver with EVENT_IDX does: ask to hear of the next entry, then look again.
            queue.driver.set_used_event(queue.seen).unwrap();
            while let Some(u) = queue.driver.next_used().unwrap() {
                queue.seen = queue.seen.wrapping_add(1);
                used.push(u);
            }
            if used.len() < n {
                queue.signals += executor::timeout(TIMEOUT, queue.calls.next_value())
                    .await
                    .expect("the device signals")
                    .unwrap();
            }
        }
        used
    }

    /// Submits one chain, kicks, waits for it; returns the used length and the writable
    /// bytes (the status byte last).
    async fn request(&mut self, q: usize, bufs: &[MockBuf]) -> (u32, Vec<u8>) {
        let sent = self.submit(q, bufs);
        self.kick(q);
        let used = self.used(q, 1).await;
        assert_eq!(used[0].id, u32::from(sent.head));
        (
            used[0].len,
            self.queues[q].driver.read_writable(&sent).unwrap(),
        )
    }

    /// A request whose writable part is only the status byte; returns the status.
    async fn status(&mut self, q: usize, readable: &[&[u8]]) -> u8 {
        let mut bufs: Vec<MockBuf> = readable
            .iter()
            .map(|b| MockBuf::Readable(b.to_vec()))
            .collect();
        bufs.push(MockBuf::Writable(1));
        let (len, w) = self.request(q, &bufs).await;
        assert_eq!(len, 1, "only the status byte is written");
        w[0]
    }

    async fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        self.status(q, &[&header(VIRTIO_BLK_T_OUT, sector), data])
            .await
    }

    /// Reads `len` bytes at `sector`; returns the status and the data.
    async fn read(&mut self, q: usize, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let (used, mut w) = self
            .request(
                q,
                &[
                    MockBuf::Readable(header(VIRTIO_BLK_T_IN, sector)),
                    MockBuf::Writable(len),
                    MockBuf::Writable(1),
                ],
            )
            .await;
        let status = w.pop().unwrap();
        if status == VIRTIO_BLK_S_OK {
            assert_eq!(used, len + 1);
        }
        (status, w)
    }
}

/// A device served over a socketpair, the frontend connected and started.
struct Served {
    fe: Frontend,
    server: Task<virtio::vhost_user::Result<()>>,
}

async fn serve_device(device: BlockDevice, guest: &Guest, event_idx: bool) -> Served {
    let (a, b) = executor::socketpair().unwrap();
    let device = Rc::new(device);
    let server = executor::spawn(serve(device, Connection::new(b)));
    let fe = Frontend::connect(Connection::new(a), TIMEOUT)
        .await
        .unwrap();
    let mut features = fe.features();
    if !event_idx {
        features &= !(1 << VIRTIO_F_EVENT_IDX);
    }
    fe.start(features, &guest.mem, &guest.vrings())
        .await
        .unwrap();
    Served { fe, server }
}

impl Served {
    async fn shut_down(self) {
        drop(self.fe);
        executor::timeout(TIMEOUT, self.server)
            .await
            .expect("the server ends when the frontend closes")
            .unwrap();
    }
}

fn options() -> BlockOptions {
    BlockOptions {
        id: Some("ringvm-test-disk".into()),
        num_queues: 1,
        queue_size: 256,
    }
}

/// Writes with the header split over two buffers and the data over three, reads back over
/// four buffers, and checks the image file.
async fn write_read_back_multi_descriptor(guest: &mut Guest) {
    let data = pattern(3 * 4096, 7);
    let h = header(VIRTIO_BLK_T_OUT, 8);
    let (len, w) = guest
        .request(
            0,
            &[
                MockBuf::Readable(h[..5].to_vec()),
                MockBuf::Readable(h[5..].to_vec()),
                MockBuf::Readable(data[..1000].to_vec()),
                MockBuf::Readable(data[1000..9000].to_vec()),
                MockBuf::Readable(data[9000..].to_vec()),
                MockBuf::Writable(1),
            ],
        )
        .await;
    assert_eq!((len, w[0]), (1, VIRTIO_BLK_S_OK));
    // Header and data in one buffer; data and status in one buffer.
    let mut first = header(VIRTIO_BLK_T_IN, 8);
    first.truncate(16);
    let (len, w) = guest
        .request(
            0,
            &[
                MockBuf::Readable(first),
                MockBuf::Writable(512),
                MockBuf::Writable(4096),
                MockBuf::Writable(3584),
                MockBuf::Writable(4096 + 1),
            ],
        )
        .await;
    assert_eq!(len, 3 * 4096 + 1);
    assert_eq!(w[3 * 4096], VIRTIO_BLK_S_OK);
    assert_eq!(&w[..3 * 4096], &data[..]);
}

#[test]
fn raw_write_read_back_and_the_file_holds_the_data() {
    let dir = TempDir::new("raw-rw");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        write_read_back_multi_descriptor(&mut guest).await;
        assert_eq!(
            guest.status(0, &[&header(VIRTIO_BLK_T_FLUSH, 0)]).await,
            VIRTIO_BLK_S_OK
        );
        served.shut_down().await;
    });
    let file = std::fs::read(&path).unwrap();
    assert_eq!(
        &file[8 * 512..8 * 512 + 3 * 4096],
        &pattern(3 * 4096, 7)[..]
    );
    assert!(file[..8 * 512].iter().all(|&b| b == 0));
}

#[test]
fn qcow2_write_read_back_and_qemu_img_sees_the_data() {
    let dir = TempDir::new("qcow2-rw");
    let path = qcow2_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        write_read_back_multi_descriptor(&mut guest).await;
        // A write across a cluster boundary (64 KiB clusters).
        let data = pattern(8192, 3);
        assert_eq!(guest.write(0, 124, &data).await, VIRTIO_BLK_S_OK);
        assert_eq!(guest.read(0, 124, 8192).await, (VIRTIO_BLK_S_OK, data));
        assert_eq!(
            guest.status(0, &[&header(VIRTIO_BLK_T_FLUSH, 0)]).await,
            VIRTIO_BLK_S_OK
        );
        served.shut_down().await;
    });
    qemu_img(&["check", "-q", path.to_str().unwrap()]);
    let raw = dir.path("out.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let file = std::fs::read(&raw).unwrap();
    assert_eq!(
        &file[8 * 512..8 * 512 + 3 * 4096],
        &pattern(3 * 4096, 7)[..]
    );
    assert_eq!(&file[124 * 512..124 * 512 + 8192], &pattern(8192, 3)[..]);
}

#[test]
fn requests_spanning_many_segments_go_straight_to_the_disk() {
    let dir = TempDir::new("segments");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        // seg_max (254) data buffers of 512 bytes each, and odd-sized ones summing to sectors.
        let data = pattern(254 * 512, 11);
        let mut bufs = vec![MockBuf::Readable(header(VIRTIO_BLK_T_OUT, 100))];
        bufs.extend(data.chunks(512).map(|c| MockBuf::Readable(c.to_vec())));
        bufs.push(MockBuf::Writable(1));
        let (len, w) = guest.request(0, &bufs).await;
        assert_eq!((len, w[0]), (1, VIRTIO_BLK_S_OK));
        let mut bufs = vec![MockBuf::Readable(header(VIRTIO_BLK_T_IN, 100))];
        let sizes = [100u32, 412, 1, 1023, 512 * 250];
        bufs.extend(sizes.iter().map(|&n| MockBuf::Writable(n)));
        bufs.push(MockBuf::Writable(513)); // 512 data + status.
        let (len, w) = guest.request(0, &bufs).await;
        assert_eq!(len as usize, data.len() + 1);
        assert_eq!(w[data.len()], VIRTIO_BLK_S_OK);
        assert_eq!(&w[..data.len()], &data[..]);
        served.shut_down().await;
    });
}

#[test]
fn get_id_writes_up_to_twenty_bytes() {
    let dir = TempDir::new("id");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let options = BlockOptions {
            id: Some("0123456789abcdefghijKLMN".into()),
            ..options()
        };
        let served =
            serve_device(BlockDevice::new(open(&path, false), options), &guest, false).await;
        let (len, w) = guest
            .request(
                0,
                &[
                    MockBuf::Readable(header(VIRTIO_BLK_T_GET_ID, 0)),
                    MockBuf::Writable(20),
                    MockBuf::Writable(1),
                ],
            )
            .await;
        assert_eq!(len, 21);
        assert_eq!(&w[..20], b"0123456789abcdefghij");
        assert_eq!(w[20], VIRTIO_BLK_S_OK);
        // A short buffer gets what fits.
        let (len, w) = guest
            .request(
                0,
                &[
                    MockBuf::Readable(header(VIRTIO_BLK_T_GET_ID, 0)),
                    MockBuf::Writable(4 + 1),
                ],
            )
            .await;
        assert_eq!((len, &w[..]), (5, &b"0123\0"[..]));
        served.shut_down().await;
    });
}

#[test]
fn discard_and_write_zeroes_read_back_zeros_on_raw_and_qcow2() {
    for qcow2 in [false, true] {
        let dir = TempDir::new("zeroes");
        let path = if qcow2 {
            qcow2_image(&dir, DISK_SIZE)
        } else {
            raw_image(&dir, DISK_SIZE)
        };
        let ex = Executor::new().unwrap();
        ex.run_until(async {
            let mut guest = Guest::new(1, 256);
            let served = serve_device(
                BlockDevice::new(open(&path, false), options()),
                &guest,
                false,
            )
            .await;
            let data = pattern(1 << 20, 5);
            assert_eq!(guest.write(0, 0, &data).await, VIRTIO_BLK_S_OK);
            // Discard 128 KiB at 64 KiB; write zeroes (unmap and not) at 512 KiB and 768 KiB.
            let discard = [header(VIRTIO_BLK_T_DISCARD, 0), segment(128, 256, 0)];
            assert_eq!(
                guest.status(0, &[&discard[0], &discard[1]]).await,
                VIRTIO_BLK_S_OK
            );
            for (sector, flags) in [(1024u64, 1u32), (1536, 0)] {
                let wz = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                let seg = segment(sector, 8 + 1, flags);
                assert_eq!(guest.status(0, &[&wz, &seg]).await, VIRTIO_BLK_S_OK);
            }
            let (status, back) = guest.read(0, 0, 1 << 20).await;
            assert_eq!(status, VIRTIO_BLK_S_OK);
            let mut expect = data.clone();
            expect[128 * 512..384 * 512].fill(0);
            expect[1024 * 512..1033 * 512].fill(0);
            expect[1536 * 512..1545 * 512].fill(0);
            assert!(back == expect, "qcow2 {qcow2}: zeros where discarded");
            served.shut_down().await;
        });
    }
}

#[test]
fn read_only_device_refuses_changes_with_ioerr_and_the_file_is_unchanged() {
    let dir = TempDir::new("ro");
    let path = raw_image(&dir, DISK_SIZE);
    let before = pattern(DISK_SIZE as usize, 9);
    std::fs::write(&path, &before).unwrap();
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let device = BlockDevice::new(open(&path, true), options());
        let served = serve_device(device, &guest, false).await;
        assert_ne!(served.fe.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO");
        assert_eq!(guest.write(0, 0, &[0xaa; 4096]).await, VIRTIO_BLK_S_IOERR);
        let seg = segment(0, 64, 0);
        assert_eq!(
            guest
                .status(0, &[&header(VIRTIO_BLK_T_DISCARD, 0), &seg])
                .await,
            VIRTIO_BLK_S_IOERR
        );
        let seg = segment(0, 64, 1);
        assert_eq!(
            guest
                .status(0, &[&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), &seg])
                .await,
            VIRTIO_BLK_S_IOERR
        );
        // Reads and flushes work.
        let (status, data) = guest.read(0, 2, 1024).await;
        assert_eq!((status, &data[..]), (VIRTIO_BLK_S_OK, &before[1024..2048]));
        assert_eq!(
            guest.status(0, &[&header(VIRTIO_BLK_T_FLUSH, 0)]).await,
            VIRTIO_BLK_S_OK
        );
        served.shut_down().await;
    });
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the file is unchanged"
    );
}

#[test]
fn malformed_requests_get_ioerr_or_unsupp_and_never_reach_the_disk() {
    let dir = TempDir::new("bad");
    let path = raw_image(&dir, DISK_SIZE);
    let sectors = DISK_SIZE / 512;
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        let ones = [1u8; 1024];
        // Beyond the capacity, ending just past it, and overflowing u64.
        assert_eq!(
            guest.write(0, sectors, &ones[..512]).await,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(guest.write(0, sectors - 1, &ones).await, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            guest.write(0, u64::MAX, &ones[..512]).await,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(guest.read(0, sectors - 1, 1024).await.0, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            guest.read(0, u64::MAX / 256, 512).await.0,
            VIRTIO_BLK_S_IOERR
        );
        // The last sector itself is fine.
        assert_eq!(
            guest.write(0, sectors - 1, &ones[..512]).await,
            VIRTIO_BLK_S_OK
        );
        // Not whole sectors.
        assert_eq!(guest.write(0, 0, &ones[..100]).await, VIRTIO_BLK_S_IOERR);
        assert_eq!(guest.read(0, 0, 513).await.0, VIRTIO_BLK_S_IOERR);
        // A header shorter than 16 bytes.
        assert_eq!(
            guest
                .status(0, &[&header(VIRTIO_BLK_T_FLUSH, 0)[..12]])
                .await,
            VIRTIO_BLK_S_IOERR
        );
        // Unknown types: GET_LIFETIME (10), SECURE_ERASE (14), garbage.
        for kind in [10, 14, 0xdead_beef] {
            assert_eq!(
                guest.status(0, &[&header(kind, 0)]).await,
                VIRTIO_BLK_S_UNSUPP
            );
        }
        let discard = header(VIRTIO_BLK_T_DISCARD, 0);
        let wz = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        // Discard with the unmap flag, reserved flag bits: UNSUPP.
        assert_eq!(
            guest.status(0, &[&discard, &segment(0, 8, 1)]).await,
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(
            guest.status(0, &[&wz, &segment(0, 8, 2)]).await,
            VIRTIO_BLK_S_UNSUPP
        );
        // No segment, a partial segment, two segments, a segment past the end: IOERR.
        assert_eq!(guest.status(0, &[&discard]).await, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            guest.status(0, &[&discard, &segment(0, 8, 0)[..12]]).await,
            VIRTIO_BLK_S_IOERR
        );
        let two = [segment(0, 8, 0), segment(16, 8, 0)].concat();
        assert_eq!(guest.status(0, &[&wz, &two]).await, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            guest.status(0, &[&wz, &segment(sectors - 4, 8, 0)]).await,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            guest.status(0, &[&discard, &segment(u64::MAX, 1, 0)]).await,
            VIRTIO_BLK_S_IOERR
        );
        served.shut_down().await;
    });
    let file = std::fs::read(&path).unwrap();
    let last = file.len() - 512;
    assert!(
        file[..last].iter().all(|&b| b == 0),
        "nothing refused reached the disk"
    );
    assert!(file[last..].iter().all(|&b| b == 1));
}

#[test]
fn chain_without_a_status_byte_completes_with_len_zero_and_the_queue_goes_on() {
    let dir = TempDir::new("nostatus");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        for _ in 0..20 {
            let (len, _) = guest
                .request(
                    0,
                    &[
                        MockBuf::Readable(header(VIRTIO_BLK_T_OUT, 0)),
                        MockBuf::Readable(vec![0xee; 512]),
                    ],
                )
                .await;
            assert_eq!(len, 0);
        }
        assert_eq!(guest.read(0, 0, 512).await, (VIRTIO_BLK_S_OK, vec![0; 512]));
        served.shut_down().await;
    });
}

/// Makes the file's page cache dirty so that a FLUSH (fdatasync) takes a while.
fn dirty(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let chunk = vec![0x5a; MIB as usize];
    for i in 0..12 {
        f.write_all_at(&chunk, 4 * MIB + i * MIB).unwrap();
    }
}

#[test]
fn forty_requests_in_flight_complete_out_of_order_in_batches() {
    let dir = TempDir::new("inflight");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        // The reads hit the page cache (io_uring completes them inline); the flush has 12 MiB
        // of dirty pages to write back (an io-wq worker, milliseconds).
        std::fs::write(&path, pattern(DISK_SIZE as usize, 2)).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let _ = std::fs::read(&path).unwrap();
        dirty(&path);
        // A slow FLUSH first, then 40 small reads, all in one kick.
        let flush = guest.submit(
            0,
            &[
                MockBuf::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                MockBuf::Writable(1),
            ],
        );
        let reads: Vec<MockChain> = (0..40)
            .map(|i| {
                guest.submit(
                    0,
                    &[
                        MockBuf::Readable(header(VIRTIO_BLK_T_IN, i * 8)),
                        MockBuf::Writable(4096 + 1),
                    ],
                )
            })
            .collect();
        guest.kick(0);
        let used = guest.used(0, 41).await;
        let order: Vec<u32> = used.iter().map(|u| u.id).collect();
        assert_ne!(order[0], u32::from(flush.head), "reads overtake the flush");
        let queue = &mut guest.queues[0];
        if let Ok(late) =
            executor::timeout(Duration::from_millis(50), queue.calls.next_value()).await
        {
            queue.signals += late.unwrap();
        }
        assert!(
            queue.signals < 20,
            "completions are signalled in batches ({} calls for 41)",
            queue.signals
        );
        for u in &used {
            let expect = if u.id == u32::from(flush.head) {
                1
            } else {
                4097
            };
            assert_eq!(u.len, expect);
        }
        assert_eq!(
            guest.queues[0].driver.read_writable(&flush).unwrap(),
            [VIRTIO_BLK_S_OK]
        );
        for r in &reads {
            assert_eq!(
                guest.queues[0].driver.read_writable(r).unwrap()[4096],
                VIRTIO_BLK_S_OK
            );
        }
        served.shut_down().await;
    });
}

#[test]
fn stop_with_requests_in_flight_completes_them_all_before_the_base_is_returned() {
    let dir = TempDir::new("stop");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        dirty(&path);
        guest.submit(
            0,
            &[
                MockBuf::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                MockBuf::Writable(1),
            ],
        );
        let data = pattern(64 * 1024, 1);
        let writes: Vec<MockChain> = (0..32u64)
            .map(|i| {
                guest.submit(
                    0,
                    &[
                        MockBuf::Readable(header(VIRTIO_BLK_T_OUT, i * 128)),
                        MockBuf::Readable(data.clone()),
                        MockBuf::Writable(1),
                    ],
                )
            })
            .collect();
        guest.kick(0);
        // Let the device pop and submit them, then stop the ring at once.
        executor::sleep(Duration::from_millis(2)).await.unwrap();
        let bases = served.fe.stop(&[0]).await.unwrap();
        assert_eq!(bases, [33], "every request was taken");
        // Everything is in the used ring already: no waiting for a call.
        let mut used = Vec::new();
        while let Some(u) = guest.queues[0].driver.next_used().unwrap() {
            used.push(u);
        }
        assert_eq!(used.len(), 33, "nothing taken is left unanswered");
        assert!(used.iter().all(|u| u.len == 1));
        for w in &writes {
            assert_eq!(
                guest.queues[0].driver.read_writable(w).unwrap(),
                [VIRTIO_BLK_S_OK]
            );
        }
        served.shut_down().await;
    });
    let file = std::fs::read(&path).unwrap();
    for i in 0..32 {
        let at = i * 64 * 1024;
        assert_eq!(&file[at..at + 64 * 1024], &pattern(64 * 1024, 1)[..]);
    }
}

#[test]
fn two_queues_are_served_concurrently() {
    let dir = TempDir::new("mq");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(2, 64);
        let options = BlockOptions {
            num_queues: 2,
            queue_size: 64,
            ..options()
        };
        let served =
            serve_device(BlockDevice::new(open(&path, false), options), &guest, true).await;
        assert_eq!(served.fe.queue_num(), Some(2));
        // A slow flush on queue 0 does not hold up queue 1.
        dirty(&path);
        let flush = guest.submit(
            0,
            &[
                MockBuf::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                MockBuf::Writable(1),
            ],
        );
        for q in 0..2 {
            for i in 0..16u64 {
                let sector = 2048 * q as u64 + i * 8;
                let data = pattern(4096, (q * 16 + i as usize) as u8);
                guest.submit(
                    q,
                    &[
                        MockBuf::Readable(header(VIRTIO_BLK_T_OUT, sector)),
                        MockBuf::Readable(data),
                        MockBuf::Writable(1),
                    ],
                );
            }
        }
        guest.kick(0);
        guest.kick(1);
        let used1 = guest.used(1, 16).await;
        assert!(used1.iter().all(|u| u.len == 1));
        let used0 = guest.used(0, 17).await;
        assert!(used0.iter().any(|u| u.id == u32::from(flush.head)));
        for q in 0..2 {
            for i in 0..16u64 {
                let sector = 2048 * q as u64 + i * 8;
                let (status, data) = guest.read(q, sector, 4096).await;
                assert_eq!(status, VIRTIO_BLK_S_OK);
                assert!(data == pattern(4096, (q * 16 + i as usize) as u8));
            }
        }
        let bases = served.fe.stop(&[0, 1]).await.unwrap();
        assert_eq!(bases, [33, 32]);
        served.shut_down().await;
    });
}

fn le32(c: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
}

#[test]
fn config_space_and_features() {
    let dir = TempDir::new("config");
    let path = raw_image(&dir, DISK_SIZE + 700);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let options = BlockOptions {
            num_queues: 3,
            queue_size: 128,
            ..options()
        };
        let device = BlockDevice::new(open(&path, false), options);
        let (a, b) = executor::socketpair().unwrap();
        let server = executor::spawn(serve(Rc::new(device), Connection::new(b)));
        let fe = Frontend::connect(Connection::new(a), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(fe.queue_num(), Some(3));
        let blk: u64 = [1, 2, 6, 9, 12, 13, 14].iter().map(|b| 1u64 << b).sum();
        assert_eq!(
            fe.features(),
            blk | (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_F_EVENT_IDX)
                | (1 << VIRTIO_F_INDIRECT_DESC)
        );
        let c = fe.get_config(0, 60).await.unwrap();
        assert_eq!(
            u64::from_le_bytes(c[..8].try_into().unwrap()),
            (DISK_SIZE + 700) / 512,
            "capacity in whole sectors"
        );
        assert_eq!(le32(&c, 8), 1 << 20, "size_max");
        assert_eq!(le32(&c, 12), 126, "seg_max");
        assert_eq!(le32(&c, 16), 0, "geometry");
        assert_eq!(le32(&c, 20), 512, "blk_size");
        assert_eq!(&c[24..34], &[0; 10], "topology, writeback");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
        assert_eq!(le32(&c, 36), u32::MAX, "max_discard_sectors");
        assert_eq!(le32(&c, 40), 1, "max_discard_seg");
        assert_eq!(le32(&c, 44), 1, "discard_sector_alignment");
        assert_eq!(le32(&c, 48), u32::MAX, "max_write_zeroes_sectors");
        assert_eq!(le32(&c, 52), 1, "max_write_zeroes_seg");
        assert_eq!(&c[56..60], &[1, 0, 0, 0], "write_zeroes_may_unmap");
        // Parts of it, and nothing past it.
        assert_eq!(fe.get_config(34, 2).await.unwrap(), [3, 0]);
        assert!(fe.get_config(56, 8).await.is_err());
        assert!(fe.set_config(0, &[1]).await.is_err(), "config is read-only");
        drop(fe);
        executor::timeout(TIMEOUT, server).await.unwrap().unwrap();
    });
}

#[test]
fn options_are_clamped_to_what_vhost_user_and_the_ring_allow() {
    let dir = TempDir::new("clamp");
    let path = raw_image(&dir, DISK_SIZE);
    use virtio::vhost_user::Device;
    let d = BlockDevice::new(
        open(&path, false),
        BlockOptions {
            id: None,
            num_queues: 0,
            queue_size: 1000,
        },
    );
    assert_eq!((d.num_queues(), d.max_queue_size()), (1, 512));
    let d = BlockDevice::new(
        open(&path, false),
        BlockOptions {
            id: None,
            num_queues: 10_000,
            queue_size: 1,
        },
    );
    assert_eq!((d.num_queues(), d.max_queue_size()), (256, 4));
    assert_eq!((d.name(), d.device_type()), ("block", 2));
}

#[test]
fn invalid_chain_is_returned_empty_and_the_queue_goes_on() {
    let dir = TempDir::new("invalid");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 256);
        let served = serve_device(
            BlockDevice::new(open(&path, false), options()),
            &guest,
            false,
        )
        .await;
        // Descriptor 200: a buffer far outside guest memory.
        let driver = &mut guest.queues[0].driver;
        driver
            .write_desc(
                200,
                virtio::Descriptor {
                    addr: 0xffff_ffff_0000,
                    len: 17,
                    flags: virtio::queue::desc::VIRTQ_DESC_F_WRITE,
                    next: 0,
                },
            )
            .unwrap();
        driver.publish(200).unwrap();
        let good = guest.submit(
            0,
            &[
                MockBuf::Readable(header(VIRTIO_BLK_T_IN, 0)),
                MockBuf::Writable(513),
            ],
        );
        guest.kick(0);
        let used = guest.used(0, 2).await;
        let got: Vec<(u32, u32)> = used.iter().map(|u| (u.id, u.len)).collect();
        assert_eq!(got, [(200, 0), (u32::from(good.head), 513)]);
        served.shut_down().await;
    });
}

#[test]
fn indirect_chains_with_event_idx() {
    let dir = TempDir::new("indirect");
    let path = raw_image(&dir, DISK_SIZE);
    let ex = Executor::new().unwrap();
    ex.run_until(async {
        let mut guest = Guest::new(1, 16);
        let options = BlockOptions {
            queue_size: 16,
            ..options()
        };
        let served =
            serve_device(BlockDevice::new(open(&path, false), options), &guest, true).await;
        for i in 0..40u64 {
            let data = pattern(1024, i as u8);
            let mut h = header(VIRTIO_BLK_T_OUT, i * 2);
            h.extend_from_slice(&data[..100]);
            let sent = guest.queues[0]
                .driver
                .add_indirect_chain(&[
                    MockBuf::Readable(h),
                    MockBuf::Readable(data[100..].to_vec()),
                    MockBuf::Writable(1),
                ])
                .unwrap();
            guest.kick(0);
            let used = guest.used(0, 1).await;
            assert_eq!((used[0].id, used[0].len), (u32::from(sent.head), 1));
            let sent = guest.queues[0]
                .driver
                .add_indirect_chain(&[
                    MockBuf::Readable(header(VIRTIO_BLK_T_IN, i * 2)),
                    MockBuf::Writable(1025),
                ])
                .unwrap();
            guest.kick(0);
            let used = guest.used(0, 1).await;
            assert_eq!((used[0].id, used[0].len), (u32::from(sent.head), 1025));
            let back = guest.queues[0].driver.read_writable(&sent).unwrap();
            assert_eq!(back[1024], VIRTIO_BLK_S_OK);
            assert!(back[..1024] == data[..]);
        }
        assert_eq!(served.fe.stop(&[0]).await.unwrap(), [80]);
        served.shut_down().await;
    });
}
