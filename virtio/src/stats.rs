//! Device statistics in a page of shared memory: the layout, the device's writer and the
//! VMM's reader.
//!
//! ringvm creates a sealed memfd for each device process ([`memory::SharedCounters`]) and
//! passes it like the process's other descriptors (`--stats-fd`); the device maps it and
//! [`install`]s it. Each device crate counts in its own code through [`stats`]: plain
//! atomics with `Relaxed` ordering, written by the device's one thread (a load and a store,
//! no locked instruction, no system call), read by the VMM when a client asks
//! (`ringvm stats`). Without an installed page (a device serving `--socket`, unit tests)
//! the counts go to a page of this process that nobody reads.
//!
//! # Layout (64-bit counters, one 4 KiB page)
//! | index | what |
//! | --- | --- |
//! | 0 | [`MAGIC`] (layout version), written by the VMM |
//! | 8 + 4q .. 8 + 4q + 3 | queue `q` (< [`MAX_QUEUES`]): requests, bytes, errors, (reserved) |
//! | 136 + i | block latency histogram: requests that took `[2^i, 2^(i+1))` µs (bucket 0 also < 1 µs; the last also longer) |
//! | 168 .. 175 | net: rx packets, rx bytes, rx drops, rx errors, tx packets, tx bytes, tx drops, tx errors |
//! | 176 .. 177 | vsock: connections opened, connections closed |
//!
//! A request is a chain the device took from a queue and completed (put in the used ring);
//! its bytes are the payload it moved (data read or written for a block request, the frame
//! for net, the packet's payload for vsock); an error is a request that completed with a
//! failure status or was refused as malformed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use memory::SharedCounters;

/// Counters in the page.
pub const COUNTERS: usize = 512;
/// Index 0 holds this: "RVSTATS" and the layout version (1).
pub const MAGIC: u64 = 0x5256_5354_4154_5301;
/// Queues with counters of their own; higher queues are not counted.
pub const MAX_QUEUES: usize = 32;
/// Buckets of the latency histogram.
pub const LATENCY_BUCKETS: usize = 32;

const QUEUE_BASE: usize = 8;
const QUEUE_STRIDE: usize = 4;
const LATENCY_BASE: usize = QUEUE_BASE + MAX_QUEUES * QUEUE_STRIDE;
const NET_BASE: usize = LATENCY_BASE + LATENCY_BUCKETS;
const VSOCK_BASE: usize = NET_BASE + 8;
const END: usize = VSOCK_BASE + 2;
const _: () = assert!(END <= COUNTERS);

/// What net counts, in layout order after `NET_BASE`.
pub const NET_COUNTERS: [&str; 8] = [
    "rx_packets",
    "rx_bytes",
    "rx_drops",
    "rx_errors",
    "tx_packets",
    "tx_bytes",
    "tx_drops",
    "tx_errors",
];

static INSTALLED: OnceLock<SharedCounters> = OnceLock::new();
static UNREAD: [AtomicU64; COUNTERS] = [const { AtomicU64::new(0) }; COUNTERS];

/// Makes `page` the page this process counts in (the first call wins; it returns whether
/// `page` was taken).
pub fn install(page: SharedCounters) -> bool {
    if page.as_slice().len() < COUNTERS {
        return false;
    }
    INSTALLED.set(page).is_ok()
}

/// This process's counters.
pub fn stats() -> Stats {
    Stats {
        c: INSTALLED.get().map_or(&UNREAD[..], |p| p.as_slice()),
    }
}

/// The writer: a cheap copy, for the device's one thread.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    c: &'static [AtomicU64],
}

impl Stats {
    /// Adds `n` to counter `i`: one writer, so a load and a store suffice.
    #[inline]
    fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.c.get(i) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    #[inline]
    fn queue_counter(q: usize, field: usize) -> usize {
        if q < MAX_QUEUES {
            QUEUE_BASE + q * QUEUE_STRIDE + field
        } else {
            usize::MAX
        }
    }

    /// Queue `q` completed a request that moved `bytes` of payload.
    #[inline]
    pub fn request(&self, q: usize, bytes: u64) {
        self.add(Self::queue_counter(q, 0), 1);
        self.add(Self::queue_counter(q, 1), bytes);
    }

    /// Queue `q` completed a request with an error (counted as a request too, with
    /// [`Stats::request`]) or refused a malformed one.
    #[inline]
    pub fn error(&self, q: usize) {
        self.add(Self::queue_counter(q, 2), 1);
    }

    /// A (block) request took `took`.
    #[inline]
    pub fn latency(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = if us <= 1 {
            0
        } else {
            (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
        };
        self.add(LATENCY_BASE + bucket, 1);
    }

    /// A frame of `bytes` went to the guest.
    #[inline]
    pub fn net_rx(&self, bytes: u64) {
        self.add(NET_BASE, 1);
        self.add(NET_BASE + 1, bytes);
    }

    /// A frame for the guest was dropped (no room, too big).
    #[inline]
    pub fn net_rx_drop(&self) {
        self.add(NET_BASE + 2, 1);
    }

    /// Receiving failed (the tap, a bad buffer).
    #[inline]
    pub fn net_rx_error(&self) {
        self.add(NET_BASE + 3, 1);
    }

    /// A frame of `bytes` from the guest went out.
    #[inline]
    pub fn net_tx(&self, bytes: u64) {
        self.add(NET_BASE + 4, 1);
        self.add(NET_BASE + 5, bytes);
    }

    /// A frame from the guest was dropped (malformed, refused).
    #[inline]
    pub fn net_tx_drop(&self) {
        self.add(NET_BASE + 6, 1);
    }

    /// Sending failed (the tap).
    #[inline]
    pub fn net_tx_error(&self) {
        self.add(NET_BASE + 7, 1);
    }

    /// A vsock connection was set up.
    #[inline]
    pub fn vsock_opened(&self) {
        self.add(VSOCK_BASE, 1);
    }

    /// A vsock connection ended.
    #[inline]
    pub fn vsock_closed(&self) {
        self.add(VSOCK_BASE + 1, 1);
    }
}

/// One queue's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// What the VMM reads of a device's page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per queue, for the device's queues (at most [`MAX_QUEUES`]).
    pub queues: Vec<QueueCounts>,
    /// Block request latencies, log2 µs buckets.
    pub latency_us_log2: [u64; LATENCY_BUCKETS],
    /// [`NET_COUNTERS`] in order.
    pub net: [u64; 8],
    pub vsock_opened: u64,
    pub vsock_closed: u64,
}

impl Snapshot {
    /// Reads `page` (a device's [`COUNTERS`]) for a device with `queues` queues; `None` if
    /// the page does not carry this layout.
    pub fn read(page: &[AtomicU64], queues: usize) -> Option<Snapshot> {
        if page.len() < COUNTERS || page[0].load(Ordering::Relaxed) != MAGIC {
            return None;
        }
        let at = |i: usize| page[i].load(Ordering::Relaxed);
        let queues = (0..queues.min(MAX_QUEUES))
            .map(|q| QueueCounts {
                requests: at(Stats::queue_counter(q, 0)),
                bytes: at(Stats::queue_counter(q, 1)),
                errors: at(Stats::queue_counter(q, 2)),
            })
            .collect();
        Some(Snapshot {
            queues,
            latency_us_log2: std::array::from_fn(|i| at(LATENCY_BASE + i)),
            net: std::array::from_fn(|i| at(NET_BASE + i)),
            vsock_opened: at(VSOCK_BASE),
            vsock_closed: at(VSOCK_BASE + 1),
        })
    }
}

/// Writes the layout's mark into a new page (the VMM, before the device maps it).
pub fn init_page(page: &[AtomicU64]) {
    if let Some(c) = page.first() {
        c.store(MAGIC, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> &'static [AtomicU64] {
        let p: &'static [AtomicU64] = Box::leak(Box::new([const { AtomicU64::new(0) }; COUNTERS]));
        init_page(p);
        p
    }

    #[test]
    fn counts_land_where_the_reader_looks() {
        let p = page();
        let s = Stats { c: p };
        s.request(0, 4096);
        s.request(0, 512);
        s.request(1, 0);
        s.error(1);
        s.request(MAX_QUEUES, 1); // not counted, no panic
        s.net_rx(60);
        s.net_tx(42);
        s.net_tx_drop();
        s.vsock_opened();
        let snap = Snapshot::read(p, 2).expect("layout");
        assert_eq!(
            snap.queues,
            [
                QueueCounts {
                    requests: 2,
                    bytes: 4608,
                    errors: 0
                },
                QueueCounts {
                    requests: 1,
                    bytes: 0,
                    errors: 1
                },
            ]
        );
        assert_eq!(snap.net, [1, 60, 0, 0, 1, 42, 1, 0]);
        assert_eq!((snap.vsock_opened, snap.vsock_closed), (1, 0));
    }

    #[test]
    fn latencies_fall_in_log2_microsecond_buckets() {
        let p = page();
        let s = Stats { c: p };
        for us in [0, 1, 2, 3, 4, 1000, 1023, 1024] {
            s.latency(Duration::from_micros(us));
        }
        s.latency(Duration::from_secs(1 << 40));
        let h = Snapshot::read(p, 0).expect("layout").latency_us_log2;
        assert_eq!(h[0], 2, "0 and 1 µs");
        assert_eq!(h[1], 2, "2 and 3 µs");
        assert_eq!(h[2], 1, "4 µs");
        assert_eq!(h[9], 2, "1000 and 1023 µs");
        assert_eq!(h[10], 1, "1024 µs");
        assert_eq!(h[LATENCY_BUCKETS - 1], 1, "the last bucket takes the rest");
    }

    #[test]
    fn a_page_without_the_mark_is_not_read() {
        let p: &'static [AtomicU64] = Box::leak(Box::new([const { AtomicU64::new(0) }; COUNTERS]));
        assert_eq!(Snapshot::read(p, 1), None);
        assert_eq!(Snapshot::read(&p[..10], 1), None);
    }
}
