//! What the control socket does to the vCPU threads: suspend them (out of KVM_RUN, parked
//! until resumed) and read their exit counters.
//!
//! Suspending sets `requested`, then kicks every thread with the signal whose handler sets
//! `kvm_run.immediate_exit` (so a signal that lands just before KVM_RUN is not lost); each
//! thread sees the request at the top of its loop and parks on a condition variable until
//! the request is withdrawn or the VM stops. The main thread never blocks: it polls the count
//! of parked threads between executor sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use crate::sys;

/// Exit reasons counted per vCPU, in counter order.
pub const EXIT_REASONS: [&str; 11] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "shutdown",
    "system_event",
    "internal_error",
    "fail_entry",
    "interrupted",
    "other",
];

/// How long a suspend waits for every vCPU to leave KVM_RUN.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a vCPU that has not parked yet is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// How often a parked vCPU looks whether the VM is stopping.
const PARK_POLL: Duration = Duration::from_millis(20);

/// The vCPUs' shared control state.
#[derive(Debug)]
pub struct VcpuControl {
    requested: AtomicBool,
    parked: Mutex<usize>,
    resumed: Condvar,
    /// Per vCPU, its exit counters (written only by its own thread).
    exits: Vec<[AtomicU64; EXIT_REASONS.len()]>,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// vCPU threads that have ended (they never park).
    ended: AtomicUsize,
}

impl VcpuControl {
    pub fn new(cpus: usize) -> VcpuControl {
        VcpuControl {
            requested: AtomicBool::new(false),
            parked: Mutex::new(0),
            resumed: Condvar::new(),
            exits: (0..cpus)
                .map(|_| [const { AtomicU64::new(0) }; EXIT_REASONS.len()])
                .collect(),
            threads: Mutex::new(Vec::new()),
            ended: AtomicUsize::new(0),
        }
    }

    /// The threads to kick (their pthread_t, valid until they are joined: after the main
    /// thread's executor, which runs every caller of `suspend`, has ended).
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
    }

    /// A vCPU thread has ended.
    pub fn thread_ended(&self) {
        self.ended.fetch_add(1, Ordering::AcqRel);
    }

    fn running(&self) -> usize {
        self.cpus()
            .saturating_sub(self.ended.load(Ordering::Acquire))
    }

    pub fn cpus(&self) -> usize {
        self.exits.len()
    }

    /// Counts an exit of vCPU `id` (its own thread: a load and a store).
    #[inline]
    pub fn count(&self, id: usize, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let reason = match exit {
            Ok(VcpuExit::IoIn(..)) => 0,
            Ok(VcpuExit::IoOut(..)) => 1,
            Ok(VcpuExit::MmioRead(..)) => 2,
            Ok(VcpuExit::MmioWrite(..)) => 3,
            Ok(VcpuExit::Hlt) => 4,
            Ok(VcpuExit::Shutdown) => 5,
            Ok(VcpuExit::SystemEvent(..)) => 6,
            Ok(VcpuExit::InternalError) => 7,
            Ok(VcpuExit::FailEntry(..)) => 8,
            Ok(VcpuExit::Intr) => 9,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => 9,
            _ => 10,
        };
        if let Some(c) = self.exits.get(id).map(|c| &c[reason]) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// vCPU `id`'s exit counts, in [`EXIT_REASONS`] order.
    pub fn exits(&self, id: usize) -> [u64; EXIT_REASONS.len()] {
        std::array::from_fn(|i| self.exits[id][i].load(Ordering::Relaxed))
    }

    /// On a vCPU thread, outside KVM_RUN: parks while a suspend is requested (and the VM is
    /// not stopping).
    #[inline]
    pub fn park_if_suspended(&self, stopping: &AtomicBool) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked += 1;
        while self.requested.load(Ordering::Acquire) && !stopping.load(Ordering::Acquire) {
            parked = self
                .resumed
                .wait_timeout(parked, PARK_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *parked -= 1;
    }

    /// Takes every vCPU out of KVM_RUN and waits (on the executor) until all are parked.
    pub async fn suspend(&self) -> Result<(), String> {
        self.requested.store(true, Ordering::Release);
        let start = Instant::now();
        let mut last_kick: Option<Instant> = None;
        loop {
            let parked = *self.parked.lock().unwrap_or_else(|e| e.into_inner());
            if parked >= self.running() {
                return Ok(());
            }
            if start.elapsed() > SUSPEND_TIMEOUT {
                self.resume();
                return Err(format!(
                    "only {parked} of {} vCPUs left KVM_RUN within {SUSPEND_TIMEOUT:?}",
                    self.running()
                ));
            }
            if last_kick.is_none_or(|t| t.elapsed() >= KICK_INTERVAL) {
                for t in self
                    .threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                {
                    sys::kick_thread(*t);
                }
                last_kick = Some(Instant::now());
            }
            let _ = executor::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.requested.store(false, Ordering::Release);
        self.resumed.notify_all();
    }
}
