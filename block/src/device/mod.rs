//! The virtio-blk device (virtio 1.2 §5.2) over vhost-user: [`BlockDevice`] serves a [`Disk`]
//! on any number of queues, each run by its own executor task.
//!
//! # Data path
//! `IN` and `OUT` requests go straight between the guest's buffers and the disk: the chain's
//! data buffers (minus the header and the status byte) are handed to [`Disk::read`] /
//! [`Disk::write`] as guest ranges, which io_uring reads or writes in place. Nothing is copied
//! through the device.
//!
//! # In flight
//! A queue's task keeps up to a queue size of requests in flight (a `FuturesUnordered`),
//! pops new chains while others run, and completes each to the used ring as it finishes, in
//! any order; the driver is signalled once per batch of completions (EVENT_IDX honoured by
//! [`AsyncQueue::signal_used`]). The one [`AsyncQueue::next_chain`] future lives across
//! turns of the loop: the kick read is never recreated.
//!
//! # Submission
//! The requests of a kick reach the kernel [`SUBMIT_EVERY`] at a time
//! ([`executor::submit_now`]), not all at once when the task goes idle: the disk starts on
//! the first ones while the task reads the rest. A driver kicks once for the whole round of
//! completions it took, so a kick brings tens of requests; preparing and submitting all of
//! them before any reached the disk left the disk that many requests short in every round.
//!
//! # Stop
//! When its [`StopSignal`] fires, a queue pops nothing more, waits for every request in
//! flight, puts each in the used ring (with its status), signals, and returns: nothing the
//! device acknowledged is lost and no guest buffer is touched after the queue is handed back.
//!
//! # Flush ordering
//! A `FLUSH` covers every write the guest saw complete before it sent the flush (virtio
//! 1.2 §5.2.6.3): such a write has returned from [`Disk::write`], so its data is in the page
//! cache (and, for qcow2, its mapping in the metadata cache), and [`Disk::flush`] writes the
//! metadata back and fdatasyncs the file. Writes still in flight when a flush starts are not
//! covered, as the spec allows; flushes are not reordered or delayed.

mod request;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;

use futures::stream::{FuturesUnordered, StreamExt};
use memory::GuestMemory;
use virtio::vhost_user::{Device, StopSignal};
use virtio::{AsyncQueue, DescriptorChain, DeviceType, GuestLog};

use request::{execute, Limits, Parts};
pub use request::{
    ExecuteError, ID_LEN, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SECTOR_SIZE, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use crate::Disk;

/// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` is the largest data buffer.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is the most data buffers per request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// `VIRTIO_BLK_F_FLUSH`: the device takes `FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// `VIRTIO_BLK_F_MQ`: `num_queues` holds the queue count.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// `VIRTIO_BLK_F_DISCARD`: the device takes `DISCARD`.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// `VIRTIO_BLK_F_WRITE_ZEROES`: the device takes `WRITE_ZEROES`.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// The size of the config space the device serves (up to `write_zeroes_may_unmap` and its
/// padding; virtio 1.2 §5.2.4).
pub const CONFIG_SIZE: usize = 60;
/// The queue size offered unless [`BlockOptions::queue_size`] says otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// `size_max`: the largest data buffer a driver should send (the device takes larger ones).
pub const SIZE_MAX: u32 = 1 << 20;
/// Requests popped before the device hands the ones queued so far to the kernel (see
/// "Submission" above). Small enough that a disk is not kept waiting for a whole kick's
/// preparation; large enough that one `io_uring_enter` (and one doorbell of the disk) still
/// carries several requests (the block bench's disk-bound QD32 cases measure it).
pub const SUBMIT_EVERY: usize = 8;

/// The most queues a device has (vhost-user addresses 256).
pub const MAX_QUEUES: usize = 256;

/// How to serve a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOptions {
    /// The `GET_ID` string (serial number): its first 20 bytes are served, zero-padded.
    pub id: Option<String>,
    /// The number of queues, 1 to [`MAX_QUEUES`] (out-of-range values are clamped).
    pub num_queues: usize,
    /// The largest queue size, a power of two from 4 to 32768 (others are rounded down to a
    /// power of two and clamped).
    pub queue_size: u16,
}

impl Default for BlockOptions {
    fn default() -> BlockOptions {
        BlockOptions {
            id: None,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// A virtio-blk device serving one [`Disk`].
#[derive(Debug)]
pub struct BlockDevice {
    disk: Disk,
    id: [u8; ID_LEN],
    num_queues: usize,
    queue_size: u16,
    /// Capacity in 512-byte sectors (a partial last sector is not served).
    capacity: u64,
    config: [u8; CONFIG_SIZE],
    /// Malformed chains and failed requests (rate-limited: the guest sends as many as it
    /// likes).
    errors: GuestLog,
}

impl BlockDevice {
    /// A device serving `disk` with `options`.
    pub fn new(disk: Disk, options: BlockOptions) -> BlockDevice {
        let mut id = [0u8; ID_LEN];
        if let Some(s) = &options.id {
            let n = s.len().min(ID_LEN);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let num_queues = options.num_queues.clamp(1, MAX_QUEUES);
        let queue_size = match options.queue_size.clamp(4, 1 << 15) {
            s if s.is_power_of_two() => s,
            // The largest power of two below s.
            s => 1 << (15 - s.leading_zeros()),
        };
        let capacity = disk.size() / SECTOR_SIZE;
        let mut device = BlockDevice {
            id,
            num_queues,
            queue_size,
            capacity,
            config: [0; CONFIG_SIZE],
            errors: GuestLog::new("block"),
            disk,
        };
        device.config = device.build_config();
        device
    }

    /// The disk the device serves.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The config space (virtio 1.2 §5.2.4), little-endian.
    fn build_config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.capacity.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &u32::from(self.seg_max()).to_le_bytes());
        // 16: geometry (cylinders, heads, sectors) stays zero.
        put(20, &self.disk.block_size().to_le_bytes());
        // 24: topology stays zero; 32: writeback 0 (no CONFIG_WCE).
        // num_queues <= MAX_QUEUES (256): fits in u16.
        put(34, &(self.num_queues as u16).to_le_bytes());
        put(36, &MAX_SEGMENT_SECTORS.to_le_bytes());
        put(40, &(MAX_SEGMENTS as u32).to_le_bytes());
        let alignment = (u64::from(self.disk.block_size()) / SECTOR_SIZE).max(1) as u32;
        put(44, &alignment.to_le_bytes());
        put(48, &MAX_SEGMENT_SECTORS.to_le_bytes());
        put(52, &(MAX_SEGMENTS as u32).to_le_bytes());
        put(56, &[1]);
        c
    }

    /// Data buffers per request: a chain has at most a queue size of buffers, two of them the
    /// header and the status.
    fn seg_max(&self) -> u16 {
        self.queue_size - 2
    }

    fn limits(&self) -> Limits<'_> {
        Limits {
            capacity: self.capacity,
            read_only: self.disk.read_only(),
            id: &self.id,
        }
    }

    /// Serves the request of `chain`; returns its head and used length (the bytes written to
    /// the guest, status included; 0 when the chain has no status byte).
    ///
    /// Counted in the device's statistics (`virtio::stats`) as a request of queue `index`:
    /// its data bytes (read into or written from the guest's buffers), its latency, and an
    /// error unless it ends OK.
    async fn process(&self, index: usize, mem: &GuestMemory, chain: DescriptorChain) -> (u16, u32) {
        let head = chain.head_index();
        let stats = virtio::stats::stats();
        let Some(parts) = Parts::new(&chain) else {
            self.errors.log(format_args!(
                "request at head {head} has no writable status byte"
            ));
            stats.request(index, 0);
            stats.error(index);
            return (head, 0);
        };
        let start = std::time::Instant::now();
        let (status, written) = match execute(&self.disk, &self.limits(), &chain, &parts, mem).await
        {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                self.errors
                    .log(format_args!("request at head {head}: {}", error_chain(&e)));
                (e.status(), 0)
            }
        };
        stats.latency(start.elapsed());
        if status == VIRTIO_BLK_S_OK {
            let sent: usize = if written == 0 {
                parts.readable.iter().map(|r| r.1).sum()
            } else {
                0
            };
            stats.request(index, u64::from(written) + sent as u64);
        } else {
            stats.request(index, 0);
            stats.error(index);
        }
        match mem.write_slice(&[status], parts.status) {
            Ok(()) => (head, written.saturating_add(1)),
            Err(e) => {
                self.errors.log(format_args!(
                    "request at head {head}: writing its status: {e}"
                ));
                (head, 0)
            }
        }
    }

    /// Serves the request of `chain` as a queue's task does (status byte written); returns
    /// its head and used length. For the fuzz targets, which pop chains themselves.
    #[cfg(feature = "fuzzing")]
    pub async fn process_chain(&self, mem: &GuestMemory, chain: DescriptorChain) -> (u16, u32) {
        self.process(0, mem, chain).await
    }

    async fn run(self: Rc<Self>, index: usize, queue: Rc<AsyncQueue>, mut stop: StopSignal) {
        let mem = queue.memory();
        let cap = usize::from(queue.with_queue(|q| q.size())).max(1);
        let mut in_flight = FuturesUnordered::new();
        let mut failed = false;
        // Requests popped since the last submission; their SQEs are queued once `in_flight`
        // has polled them, which the loop does before it looks at the next chain.
        let mut unsubmitted = 0;
        {
            // The one wait for a chain, kept across turns (and its kick read with it).
            let mut next = pin!(queue.next_chain());
            loop {
                let event = poll_fn(|cx| {
                    if Pin::new(&mut stop).poll(cx).is_ready() {
                        return Poll::Ready(Event::Stop);
                    }
                    if let Poll::Ready(Some(done)) = in_flight.poll_next_unpin(cx) {
                        return Poll::Ready(Event::Done(done));
                    }
                    if !failed && in_flight.len() < cap {
                        if let Poll::Ready(chain) = next.as_mut().poll(cx) {
                            next.set(queue.next_chain());
                            return Poll::Ready(Event::Chain(chain));
                        }
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    Event::Stop => break,
                    Event::Chain(Ok(chain)) => {
                        if unsubmitted >= SUBMIT_EVERY {
                            // An error leaves them queued for the executor's own submission.
                            let _ = executor::submit_now();
                            unsubmitted = 0;
                        }
                        in_flight.push(self.process(index, mem, chain));
                        unsubmitted += 1;
                        // Take what else is there now, without waiting, up to the next
                        // submission.
                        while in_flight.len() < cap && unsubmitted < SUBMIT_EVERY {
                            match queue.try_pop() {
                                Ok(Some(chain)) => {
                                    in_flight.push(self.process(index, mem, chain));
                                    unsubmitted += 1;
                                }
                                // The task goes idle: the executor submits.
                                Ok(None) => {
                                    unsubmitted = 0;
                                    break;
                                }
                                Err(e) => {
                                    failed |= self.chain_error(index, &queue, e);
                                    break;
                                }
                            }
                        }
                    }
                    Event::Chain(Err(e)) => failed |= self.chain_error(index, &queue, e),
                    Event::Done((head, len)) => {
                        failed |= !self.add_used(index, &queue, head, len);
                        // Everything else already finished goes in the same batch.
                        while let Some(Some((head, len))) =
                            futures::FutureExt::now_or_never(in_flight.next())
                        {
                            failed |= !self.add_used(index, &queue, head, len);
                        }
                        failed |= !self.signal(index, &queue);
                    }
                }
            }
        }
        // Stopped: the wait for a chain is gone (its kick read stays with the queue); what is
        // in flight finishes and is returned to the guest.
        while let Some((head, len)) = in_flight.next().await {
            self.add_used(index, &queue, head, len);
        }
        self.signal(index, &queue);
        self.errors.flush();
    }

    /// A chain that could not be popped. A malformed one is returned empty and the queue
    /// goes on (false); anything else means the rings are gone (true: pop no more).
    fn chain_error(&self, index: usize, queue: &AsyncQueue, e: virtio::Error) -> bool {
        match e {
            virtio::Error::InvalidChain { head, reason } => {
                self.errors.log(format_args!(
                    "queue {index}: invalid chain at head {head}: {reason}"
                ));
                virtio::stats::stats().error(index);
                !(self.add_used(index, queue, head, 0) && self.signal(index, queue))
            }
            e => {
                eprintln!(
                    "ringvm device block: queue {index} stops taking requests: {}",
                    error_chain(&e)
                );
                true
            }
        }
    }

    fn add_used(&self, index: usize, queue: &AsyncQueue, head: u16, len: u32) -> bool {
        match queue.add_used(head, len) {
            Ok(()) => true,
            Err(e) => {
                self.errors.log(format_args!(
                    "queue {index}: used ring: {}",
                    error_chain(&e)
                ));
                false
            }
        }
    }

    fn signal(&self, index: usize, queue: &AsyncQueue) -> bool {
        match queue.signal_used() {
            Ok(_) => true,
            Err(e) => {
                self.errors.log(format_args!(
                    "queue {index}: signalling: {}",
                    error_chain(&e)
                ));
                false
            }
        }
    }
}

enum Event {
    Stop,
    Chain(virtio::Result<DescriptorChain>),
    Done((u16, u32)),
}

/// `e: cause: cause`, for log lines.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl Device for BlockDevice {
    fn name(&self) -> &'static str {
        DeviceType::Block.name()
    }

    fn device_type(&self) -> u32 {
        DeviceType::Block.id()
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0u64, |f, bit| f | (1 << bit));
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        // The server checked the range against `config_size`; anything else reads zeros.
        let start = offset as usize;
        match self.config.get(start..start.saturating_add(data.len())) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn run_queue(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(self.run(index, queue, stop))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use executor::Executor;
    use memory::GuestAddress;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use virtio::mock::{MockBuf, MockSplitQueue};

    use super::*;
    use crate::OpenOptions;

    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn image(name: &str, contents: &[u8]) -> TempFile {
        let p =
            std::env::temp_dir().join(format!("ringvm-blkdev-unit-{name}-{}", std::process::id()));
        std::fs::write(&p, contents).unwrap();
        TempFile(p)
    }

    fn request(
        kind: u32,
        sector: u64,
        split: usize,
        payload: Vec<u8>,
        writable: Vec<u32>,
    ) -> Vec<MockBuf> {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&sector.to_le_bytes());
        let mut bufs: Vec<MockBuf> = [&header[..split], &header[split..], &payload[..]]
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| MockBuf::Readable(b.to_vec()))
            .collect();
        bufs.extend(writable.into_iter().map(MockBuf::Writable));
        bufs
    }

    #[test]
    fn random_requests_get_a_valid_status_and_never_change_a_read_only_disk() {
        let contents: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
        let file = image("ro-fuzz", &contents);
        let disk = Disk::open(
            &file.0,
            OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let device = BlockDevice::new(disk, BlockOptions::default());
        let ex = Executor::new().unwrap();
        let mem = GuestMemory::new_x86(4 << 20).unwrap();
        let strategy = (
            prop_oneof![
                Just(VIRTIO_BLK_T_IN),
                Just(VIRTIO_BLK_T_OUT),
                Just(VIRTIO_BLK_T_FLUSH),
                Just(VIRTIO_BLK_T_GET_ID),
                Just(VIRTIO_BLK_T_DISCARD),
                Just(VIRTIO_BLK_T_WRITE_ZEROES),
                any::<u32>(),
            ],
            prop_oneof![0u64..160, Just(u64::MAX), any::<u64>()],
            0usize..=16,
            prop::collection::vec(any::<u8>(), 0..80),
            prop::collection::vec(1u32..3000, 0..4),
        );
        let mut runner = TestRunner::new(Config::with_cases(512));
        runner
            .run(&strategy, |(kind, sector, split, payload, writable)| {
                let mut driver = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
                let mut queue = driver.queue().unwrap();
                let total: u32 = writable.iter().sum();
                let has_status = !writable.is_empty();
                let sent = driver
                    .add_chain(&request(kind, sector, split, payload, writable))
                    .unwrap();
                let chain = queue.pop(&mem).unwrap().unwrap();
                let (head, len) = ex.run_until(device.process(0, &mem, chain));
                prop_assert_eq!(head, sent.head);
                if !has_status {
                    prop_assert_eq!(len, 0);
                    return Ok(());
                }
                prop_assert!(len >= 1 && len <= total);
                let status = *driver.read_writable(&sent).unwrap().last().unwrap();
                prop_assert!(status <= VIRTIO_BLK_S_UNSUPP);
                let known = [0, 1, 4, 8, 11, 13];
                if !known.contains(&kind) {
                    prop_assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
                }
                if [
                    VIRTIO_BLK_T_OUT,
                    VIRTIO_BLK_T_DISCARD,
                    VIRTIO_BLK_T_WRITE_ZEROES,
                ]
                .contains(&kind)
                {
                    prop_assert_ne!(status, VIRTIO_BLK_S_OK);
                }
                Ok(())
            })
            .unwrap();
        assert!(
            std::fs::read(&file.0).unwrap() == contents,
            "the read-only image is unchanged"
        );
    }
}
