//! The bound on io-wq worker threads (IORING_REGISTER_IOWQ_MAX_WORKERS). Its own test binary:
//! it counts the worker threads of the process, which other tests' rings would add to.
#![allow(clippy::unwrap_used)]

mod common;

use std::thread;

use executor::{opcode, AsyncFd, Builder, DEFAULT_MAX_IO_WORKERS};
use futures::future::join_all;

/// The io-wq workers of the calling thread: the kernel names them `iou-wrk-<tid>`.
fn io_workers_of_this_thread() -> usize {
    // SAFETY: plain syscall without arguments.
    let tid = unsafe { libc::gettid() };
    let name = format!("iou-wrk-{tid}");
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Runs `n` fsyncs at once, each of a file with 1 MiB not yet written back (the kernel always
/// runs an fsync on an io-wq worker, a bounded one), on a new thread (a new io-wq) whose
/// executor bounds its workers to `max`. Returns the limits the executor reports and how many
/// workers the thread has right after the burst (idle workers live on for seconds).
fn fsync_burst(max: [u32; 2], n: usize) -> (Option<[u32; 2]>, usize) {
    thread::spawn(move || {
        let ex = Builder::new()
            .allow_ops(&[opcode::Fsync::CODE])
            .max_io_workers(Some(max))
            .build()
            .unwrap();
        let files: Vec<_> = (0..n)
            .map(|_| common::TempFile::new(&vec![7u8; 1 << 20]))
            .collect();
        let fds: Vec<_> = files.iter().map(|f| AsyncFd::new(f.rw().into())).collect();
        ex.run_until(async {
            for res in join_all(fds.iter().map(|fd| fd.fsync())).await {
                res.unwrap();
            }
        });
        (ex.max_io_workers(), io_workers_of_this_thread())
    })
    .join()
    .unwrap()
}

#[test]
fn io_workers_stay_within_the_bound_under_a_burst_of_blocking_io() {
    // The limits are read back from the kernel before the ring is restricted.
    let (limits, workers) = fsync_burst([1, 2], 16);
    assert_eq!(limits, Some([1, 2]));
    assert!(workers <= 1, "{workers} io-wq workers, bound 1");
    // The same burst with a looser bound does run in parallel: the count above is the
    // bound's doing, not a burst too small to need more than one worker.
    let (limits, workers) = fsync_burst([6, 2], 16);
    assert_eq!(limits, Some([6, 2]));
    assert!(
        (2..=6).contains(&workers),
        "{workers} io-wq workers, bound 6"
    );
}

#[test]
fn executors_bound_their_workers_by_default() {
    let limits = thread::spawn(|| Builder::new().build().unwrap().max_io_workers())
        .join()
        .unwrap();
    assert_eq!(limits, Some(DEFAULT_MAX_IO_WORKERS));
    let limits = thread::spawn(|| {
        Builder::new()
            .max_io_workers(None)
            .build()
            .unwrap()
            .max_io_workers()
    })
    .join()
    .unwrap();
    assert_eq!(limits, None);
}
