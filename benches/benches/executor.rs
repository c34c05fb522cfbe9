//! The executor beside its limit and its peers, in one run.
//!
//! - `nop/qd1`, `nop/qd32`: round trips through the ring with nothing to do in the kernel:
//!   the executor's own cost per operation. QD32 runs 32 tasks (`ringvm`) and, as the block
//!   device does, one task with a `FuturesUnordered` of 32 ops (`ringvm-fu`). The limit is a
//!   hand-written io_uring loop with the same queue depth, its ring registered with the
//!   thread as the executor's is (no descriptor lookup per `io_uring_enter`; the peers do
//!   not register theirs). The peers are the io_uring
//!   runtimes a user would pick instead: tokio-uring (`no_op`) and monoio (a 0-byte
//!   `read_at`: it has no NOP). A reference is tokio rescheduling a task through its driver
//!   (`yield_now`: one `epoll_wait(0)` per scheduler pass): no I/O at all, so even the limit
//!   stays below it.
//! - `read4k/qd1`, `read4k/qd32`: 4 KiB reads at random aligned offsets of a 64 MiB file in the
//!   page cache, so the comparison is about the runtime, not the disk. The executor reuses
//!   owned buffers (in 32 tasks, and in one task's `FuturesUnordered`); the limit is the
//!   hand-written loop; the peers are tokio-uring's and monoio's `read_at` in as many tasks;
//!   the reference is what a tokio user writes for positioned reads: `spawn_blocking` +
//!   `pread` on a multi-thread runtime (tokio::fs has no positioned read, and its `File`
//!   runs every call through `spawn_blocking` too).
//! - `eventfd/pingpong`: the kick path. Two threads bounce a counter over two eventfds; both
//!   sides use the variant's mechanism: executors awaiting an `EventFdStream`, blocking
//!   `read`/`write` (the limit), a hand-written io_uring READ per wait (a reference: what
//!   io_uring itself costs here), or tokio `AsyncFd` on non-blocking eventfds with a
//!   current-thread runtime per thread (the peer). One operation is one round trip.
//!
//! Run with `cargo bench -p benches --bench executor [-- --quick] [-- FILTER...]`; a filter
//! picks benches by substring (`nop`, `read4k/qd32`) or one variant (`nop/qd32/ringvm$`).

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use benches::{Role, Runner, Variant};
use executor::{AsyncFd, EventFd, Executor};
use futures::stream::{FuturesUnordered, StreamExt as _};
use io_uring::{opcode, squeue, types, IoUring};

/// Queue depth of the deep cases.
const QD: usize = 32;
/// Read size.
const BLOCK: usize = 4096;
/// Size of the file the reads hit.
const FILE_SIZE: u64 = 64 << 20;
/// Entries of every ring (the executor's default).
const RING_ENTRIES: u32 = 256;
/// Precomputed random offsets (a power of two: indexed with a mask).
const OFFSETS: usize = 1 << 16;

fn main() {
    let mut runner = Runner::new("executor");

    for qd in [1, QD] {
        let bench = format!("nop/qd{qd}");
        if !runner.enabled(&bench) {
            continue;
        }
        let ex = Executor::new().expect("io_uring is available on the bench machine");
        let mut ring = raw_ring();
        let tokio_rt = current_thread_runtime();
        let uring_rt = tokio_uring_runtime();
        let mut monoio_rt = monoio_runtime();
        let empty = empty_file();
        let mut variants = vec![Variant::subject(
            "ringvm",
            &format!("ringvm executor, nop() in {qd} task(s)"),
            |n| nop_executor(&ex, qd, n),
        )];
        if qd > 1 {
            variants.push(Variant::subject(
                "ringvm-fu",
                "ringvm executor, nop() in 1 task, FuturesUnordered",
                |n| nop_executor_unordered(&ex, qd, n),
            ));
        }
        variants.push(Variant::limit(
            "raw-uring",
            "hand-written io_uring loop, NOP, ring registered",
            |n| nop_raw(&mut ring, qd, n),
        ));
        variants.push(Variant::peer(
            "tokio-uring",
            &format!("tokio-uring, no_op() in {qd} task(s)"),
            |n| nop_tokio_uring(&uring_rt, qd, n),
        ));
        variants.push(Variant::peer(
            "monoio",
            &format!("monoio, read_at of 0 bytes in {qd} task(s) (it has no NOP)"),
            |n| nop_monoio(&mut monoio_rt, &empty, qd, n),
        ));
        variants.push(Variant::reference(
            "tokio",
            "tokio current_thread, yield_now() (no I/O)",
            |n| nop_tokio(&tokio_rt, qd, n),
        ));
        runner.compare(&bench, variants);
    }

    if ["read4k/qd1", "read4k/qd32"]
        .iter()
        .any(|b| runner.enabled(b))
    {
        let path = data_file().expect("cannot create the data file for the read benches");
        let file = Arc::new(File::open(&path).expect("the data file was just created"));
        let offsets = random_offsets();
        let tokio_rt = multi_thread_runtime();
        for qd in [1, QD] {
            let ex = Executor::new().expect("io_uring is available on the bench machine");
            let afd = AsyncFd::new(file.try_clone().expect("dup of the data file").into());
            let mut ring = raw_ring();
            let uring_rt = tokio_uring_runtime();
            let mut monoio_rt = monoio_runtime();
            let mut bufs = vec![vec![0u8; BLOCK]; qd];
            let mut variants = vec![Variant::subject(
                "ringvm",
                &format!("ringvm executor, read_at(Vec) in {qd} task(s)"),
                |n| read_executor(&ex, &afd, &offsets, qd, n),
            )];
            if qd > 1 {
                variants.push(Variant::subject(
                    "ringvm-fu",
                    "ringvm executor, read_at(Vec) in 1 task, FuturesUnordered",
                    |n| read_executor_unordered(&ex, &afd, &offsets, qd, n),
                ));
            }
            variants.push(Variant::limit(
                "raw-uring",
                "hand-written io_uring loop, READ, ring registered",
                |n| read_raw(&mut ring, &file, &mut bufs, &offsets, n),
            ));
            variants.push(Variant::peer(
                "tokio-uring",
                &format!("tokio-uring, File::read_at(Vec) in {qd} task(s)"),
                |n| read_tokio_uring(&uring_rt, &file, &offsets, qd, n),
            ));
            variants.push(Variant::peer(
                "monoio",
                &format!("monoio, File::read_at(Vec) in {qd} task(s)"),
                |n| read_monoio(&mut monoio_rt, &file, &offsets, qd, n),
            ));
            variants.push(Variant::reference(
                "tokio",
                "tokio multi_thread, spawn_blocking pread",
                |n| read_tokio(&tokio_rt, &file, &offsets, qd, n),
            ));
            runner.compare(&format!("read4k/qd{qd}"), variants);
        }
    }

    if runner.enabled("eventfd/pingpong") {
        let ex = Executor::new().expect("io_uring is available on the bench machine");
        let tokio_rt = current_thread_runtime();
        runner.compare(
            "eventfd/pingpong",
            vec![
                Variant::subject("ringvm", "ringvm executors, EventFdStream", |n| {
                    pingpong_executor(&ex, n)
                }),
                Variant::limit("blocking", "blocking read/write threads", pingpong_blocking),
                Variant::reference(
                    "raw-uring",
                    "hand-written io_uring READ + write(2) threads",
                    pingpong_raw_uring,
                ),
                Variant::peer("tokio", "tokio current_thread, AsyncFd", |n| {
                    pingpong_tokio(&tokio_rt, n)
                }),
            ],
        );
    }

    if let Err(e) = runner.finish() {
        eprintln!("cannot write the bench results: {e}");
    }
    println!();
    if runner.config().quick {
        println!("quick run: the checks below are rough, not a claim");
    }
    runner.check("nop/qd32", "ringvm", Role::Limit, 0.7);
    runner.check("read4k/qd32", "ringvm", Role::Limit, 0.9);
    // Against every io_uring runtime a user would pick: at least as fast as the best.
    for bench in ["nop/qd1", "nop/qd32", "read4k/qd1", "read4k/qd32"] {
        for peer in ["tokio-uring", "monoio"] {
            runner.check_against(bench, "ringvm", peer, 1.0);
        }
    }
    runner.check("eventfd/pingpong", "ringvm", Role::Peer, 1.5);
}

// ---- nop ----

fn nop_executor(ex: &Executor, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    ex.run_until(async {
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                executor::spawn(async move {
                    for _ in (k..n).step_by(qd) {
                        executor::nop().await.expect("a NOP cannot fail");
                    }
                })
            })
            .collect();
        for w in workers {
            w.await;
        }
    });
    start.elapsed()
}

fn nop_executor_unordered(ex: &Executor, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    ex.run_until(async {
        let mut in_flight = FuturesUnordered::new();
        let mut issued = 0;
        while issued < n.min(qd as u64) {
            in_flight.push(executor::nop());
            issued += 1;
        }
        while let Some(res) = in_flight.next().await {
            res.expect("a NOP cannot fail");
            if issued < n {
                in_flight.push(executor::nop());
                issued += 1;
            }
        }
    });
    start.elapsed()
}

fn nop_raw(ring: &mut IoUring, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    // SAFETY: a NOP holds no pointers.
    unsafe {
        raw_loop(
            ring,
            qd,
            n,
            |_, _| opcode::Nop::new().build(),
            |res| assert_eq!(res, 0, "NOP failed"),
        );
    }
    start.elapsed()
}

fn nop_tokio(rt: &tokio::runtime::Runtime, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                tokio::spawn(async move {
                    for _ in (k..n).step_by(qd) {
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.expect("the worker does not panic");
        }
    });
    start.elapsed()
}

fn nop_tokio_uring(rt: &tokio_uring::Runtime, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                tokio_uring::spawn(async move {
                    for _ in (k..n).step_by(qd) {
                        tokio_uring::no_op().await.expect("a NOP cannot fail");
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.expect("the worker does not panic");
        }
    });
    start.elapsed()
}

/// monoio has no NOP: the nearest is a read of 0 bytes, which the kernel ends at once (after
/// looking up the file, a little more than a NOP does).
fn nop_monoio(rt: &mut MonoioRuntime, file: &File, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let file = std::rc::Rc::new(monoio_file(file));
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                let file = file.clone();
                monoio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in (k..n).step_by(qd) {
                        let (res, b) = file.read_at(buf, 0).await;
                        assert_eq!(res.expect("a read of 0 bytes"), 0);
                        buf = b;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await;
        }
    });
    start.elapsed()
}

// ---- 4 KiB reads ----

fn read_executor(ex: &Executor, fd: &AsyncFd, offsets: &Arc<[u64]>, qd: usize, n: u64) -> Duration {
    let start = Instant::now();
    ex.run_until(async {
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                let fd = fd.clone();
                let offsets = offsets.clone();
                executor::spawn(async move {
                    let mut buf = Vec::with_capacity(BLOCK);
                    for i in (k..n).step_by(qd) {
                        let (res, b) = fd.read_at(buf, offset(&offsets, i)).await;
                        assert_eq!(res.expect("read of the data file"), BLOCK, "short read");
                        buf = b;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await;
        }
    });
    start.elapsed()
}

fn read_executor_unordered(
    ex: &Executor,
    fd: &AsyncFd,
    offsets: &[u64],
    qd: usize,
    n: u64,
) -> Duration {
    let start = Instant::now();
    ex.run_until(async {
        let mut in_flight = FuturesUnordered::new();
        let mut issued = 0;
        while issued < n.min(qd as u64) {
            in_flight.push(fd.read_at(Vec::with_capacity(BLOCK), offset(offsets, issued)));
            issued += 1;
        }
        while let Some((res, buf)) = in_flight.next().await {
            assert_eq!(res.expect("read of the data file"), BLOCK, "short read");
            if issued < n {
                in_flight.push(fd.read_at(buf, offset(offsets, issued)));
                issued += 1;
            }
        }
    });
    start.elapsed()
}

fn read_raw(
    ring: &mut IoUring,
    file: &File,
    bufs: &mut [Vec<u8>],
    offsets: &[u64],
    n: u64,
) -> Duration {
    let fd = types::Fd(file.as_raw_fd());
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let start = Instant::now();
    // SAFETY: each read targets the buffer of its slot, `BLOCK` bytes long; `bufs` is
    // borrowed mutably for the whole call, and `raw_loop` reaps every completion before it
    // returns, so the kernel is done with the buffers by then.
    unsafe {
        raw_loop(
            ring,
            ptrs.len(),
            n,
            |slot, i| {
                opcode::Read::new(fd, ptrs[slot], BLOCK as u32)
                    .offset(offset(offsets, i))
                    .build()
            },
            |res| assert_eq!(res, BLOCK as i32, "short or failed read"),
        );
    }
    start.elapsed()
}

fn read_tokio(
    rt: &tokio::runtime::Runtime,
    file: &Arc<File>,
    offsets: &Arc<[u64]>,
    qd: usize,
    n: u64,
) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                let file = file.clone();
                let offsets = offsets.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; BLOCK];
                    for i in (k..n).step_by(qd) {
                        let file = file.clone();
                        let off = offset(&offsets, i);
                        let (res, b) = tokio::task::spawn_blocking(move || {
                            let res = file.read_at(&mut buf, off);
                            (res, buf)
                        })
                        .await
                        .expect("the blocking read does not panic");
                        assert_eq!(res.expect("read of the data file"), BLOCK, "short read");
                        buf = b;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.expect("the worker does not panic");
        }
    });
    start.elapsed()
}

fn read_tokio_uring(
    rt: &tokio_uring::Runtime,
    file: &File,
    offsets: &Arc<[u64]>,
    qd: usize,
    n: u64,
) -> Duration {
    let file = file.try_clone().expect("dup of the data file");
    let start = Instant::now();
    rt.block_on(async {
        let file = std::rc::Rc::new(tokio_uring::fs::File::from_std(file));
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                let file = file.clone();
                let offsets = offsets.clone();
                tokio_uring::spawn(async move {
                    let mut buf = Vec::with_capacity(BLOCK);
                    for i in (k..n).step_by(qd) {
                        let (res, b) = file.read_at(buf, offset(&offsets, i)).await;
                        assert_eq!(res.expect("read of the data file"), BLOCK, "short read");
                        buf = b;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.expect("the worker does not panic");
        }
    });
    start.elapsed()
}

fn read_monoio(
    rt: &mut MonoioRuntime,
    file: &File,
    offsets: &Arc<[u64]>,
    qd: usize,
    n: u64,
) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let file = std::rc::Rc::new(monoio_file(file));
        let workers: Vec<_> = (0..qd as u64)
            .map(|k| {
                let file = file.clone();
                let offsets = offsets.clone();
                monoio::spawn(async move {
                    let mut buf = Vec::with_capacity(BLOCK);
                    for i in (k..n).step_by(qd) {
                        let (res, b) = file.read_at(buf, offset(&offsets, i)).await;
                        assert_eq!(res.expect("read of the data file"), BLOCK, "short read");
                        buf = b;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await;
        }
    });
    start.elapsed()
}

fn offset(offsets: &[u64], i: u64) -> u64 {
    offsets[i as usize & (OFFSETS - 1)]
}

/// Random block-aligned offsets into the data file, the same for every variant.
fn random_offsets() -> Arc<[u64]> {
    let blocks = FILE_SIZE / BLOCK as u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..OFFSETS)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * BLOCK as u64
        })
        .collect()
}

/// The file the reads hit, under `<target>/bench/`: written once, then read through so
/// that it sits in the page cache.
fn data_file() -> io::Result<PathBuf> {
    let path = benches::bench_dir()?.join("executor-read-64m.dat");
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(FILE_SIZE) {
        write_data_file(&path)?;
    }
    let mut f = File::open(&path)?;
    let mut chunk = vec![0u8; 1 << 20];
    while f.read(&mut chunk)? > 0 {}
    Ok(path)
}

fn write_data_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..FILE_SIZE / chunk.len() as u64 {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize ^ j ^ (j >> 8)) as u8;
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

// ---- eventfd ping-pong ----

/// Runs `n` round trips between two threads, each holding one end of a `ping` eventfd and
/// one of a `pong` eventfd: `active` writes ping and waits for pong, `partner` the reverse.
/// Returns the time `active` measured, from when both sides are set up.
fn pingpong<F, P, A>(partner_fds: (F, F), active_fds: (F, F), partner: P, active: A) -> Duration
where
    F: Send,
    P: FnOnce(F, F, &Barrier) + Send,
    A: FnOnce(F, F, &Barrier) -> Duration,
{
    let barrier = Barrier::new(2);
    thread::scope(|s| {
        let barrier = &barrier;
        let partner = s.spawn(move || partner(partner_fds.0, partner_fds.1, barrier));
        let d = active(active_fds.0, active_fds.1, barrier);
        partner.join().expect("the partner thread does not panic");
        d
    })
}

/// Blocking ping and pong eventfds, a handle on each for each side.
fn eventfds() -> ((EventFd, EventFd), (EventFd, EventFd)) {
    let ping = EventFd::new().expect("eventfd");
    let pong = EventFd::new().expect("eventfd");
    let dup = |e: &EventFd| e.try_clone().expect("dup eventfd");
    ((dup(&ping), dup(&pong)), (ping, pong))
}

fn pingpong_blocking(n: u64) -> Duration {
    let (partner_fds, active_fds) = eventfds();
    pingpong(
        partner_fds,
        active_fds,
        |ping, pong, barrier| {
            barrier.wait();
            for _ in 0..n {
                read_blocking(ping.as_raw_fd());
                pong.write(1).expect("eventfd write");
            }
        },
        |ping, pong, barrier| {
            barrier.wait();
            let start = Instant::now();
            for _ in 0..n {
                ping.write(1).expect("eventfd write");
                read_blocking(pong.as_raw_fd());
            }
            start.elapsed()
        },
    )
}

fn pingpong_executor(ex: &Executor, n: u64) -> Duration {
    let (partner_fds, active_fds) = eventfds();
    pingpong(
        partner_fds,
        active_fds,
        |ping, pong, barrier| {
            let ex = Executor::new().expect("io_uring is available on the bench machine");
            let mut kicks = ping.into_stream();
            barrier.wait();
            ex.run_until(async {
                for _ in 0..n {
                    kicks.next_value().await.expect("eventfd read");
                    pong.write(1).expect("eventfd write");
                }
            });
        },
        |ping, pong, barrier| {
            let mut calls = pong.into_stream();
            barrier.wait();
            let start = Instant::now();
            ex.run_until(async {
                for _ in 0..n {
                    ping.write(1).expect("eventfd write");
                    calls.next_value().await.expect("eventfd read");
                }
            });
            start.elapsed()
        },
    )
}

fn pingpong_raw_uring(n: u64) -> Duration {
    /// Waits for the counter with an io_uring READ, as the executor does, minus the executor.
    fn wait(ring: &mut IoUring, fd: &EventFd) {
        let mut v: u64 = 0;
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), (&mut v as *mut u64).cast(), 8)
            .build()
            .user_data(0);
        // SAFETY: `v` outlives the read: this function returns only after reaping it.
        unsafe { ring.submission().push(&sqe) }.expect("the ring is empty");
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            if let Some(cqe) = ring.completion().next() {
                assert_eq!(cqe.result(), 8, "eventfd read");
                return;
            }
        }
    }
    let (partner_fds, active_fds) = eventfds();
    pingpong(
        partner_fds,
        active_fds,
        |ping, pong, barrier| {
            let mut ring = raw_ring();
            barrier.wait();
            for _ in 0..n {
                wait(&mut ring, &ping);
                pong.write(1).expect("eventfd write");
            }
        },
        |ping, pong, barrier| {
            let mut ring = raw_ring();
            barrier.wait();
            let start = Instant::now();
            for _ in 0..n {
                ping.write(1).expect("eventfd write");
                wait(&mut ring, &pong);
            }
            start.elapsed()
        },
    )
}

fn pingpong_tokio(rt: &tokio::runtime::Runtime, n: u64) -> Duration {
    // Non-blocking eventfds of their own: O_NONBLOCK belongs to the open file.
    let ping = nonblocking_eventfd();
    let pong = nonblocking_eventfd();
    let dup = |fd: &OwnedFd| fd.try_clone().expect("dup eventfd");
    pingpong(
        (dup(&ping), dup(&pong)),
        (ping, pong),
        |ping, pong, barrier| {
            let rt = current_thread_runtime();
            let kicks = register(&rt, ping);
            barrier.wait();
            rt.block_on(async {
                for _ in 0..n {
                    read_async(&kicks).await;
                    write_raw(pong.as_raw_fd());
                }
            });
        },
        |ping, pong, barrier| {
            let calls = register(rt, pong);
            barrier.wait();
            let start = Instant::now();
            rt.block_on(async {
                for _ in 0..n {
                    write_raw(ping.as_raw_fd());
                    read_async(&calls).await;
                }
            });
            start.elapsed()
        },
    )
}

/// Registers an eventfd with `rt`'s reactor for reading.
fn register(rt: &tokio::runtime::Runtime, fd: OwnedFd) -> tokio::io::unix::AsyncFd<OwnedFd> {
    let _guard = rt.enter();
    // SAFETY: an `OwnedFd` stays open until it is dropped and always returns the same
    // descriptor; the `AsyncFd` owns it from here on.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .expect("register eventfd with the tokio reactor")
}

async fn read_async(fd: &tokio::io::unix::AsyncFd<OwnedFd>) {
    loop {
        let mut guard = fd.readable().await.expect("eventfd readiness");
        match guard.try_io(|fd| read_raw_eventfd(fd.as_raw_fd())) {
            Ok(res) => {
                res.expect("eventfd read");
                return;
            }
            Err(_would_block) => continue,
        }
    }
}

/// Reads an eventfd counter; on a non-blocking one, `WouldBlock` when it is zero.
fn read_raw_eventfd(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        Ok(v)
    } else if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::other("short eventfd read"))
    }
}

fn read_blocking(fd: RawFd) -> u64 {
    read_raw_eventfd(fd).expect("blocking eventfd read")
}

fn write_raw(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    assert_eq!(n, 8, "eventfd write: {}", io::Error::last_os_error());
}

fn nonblocking_eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// ---- shared pieces ----

fn raw_ring() -> IoUring {
    IoUring::new(RING_ENTRIES).expect("io_uring is available on the bench machine")
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

type MonoioRuntime = monoio::Runtime<monoio::IoUringDriver>;

/// monoio on io_uring, with as many entries as the other rings.
fn monoio_runtime() -> MonoioRuntime {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(RING_ENTRIES)
        .build()
        .expect("monoio runtime")
}

/// A monoio file on a duplicate of `file` (monoio closes its files through its ring).
fn monoio_file(file: &File) -> monoio::fs::File {
    monoio::fs::File::from_std(file.try_clone().expect("dup of the data file"))
        .expect("monoio file from a std file")
}

fn tokio_uring_runtime() -> tokio_uring::Runtime {
    tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES))
        .expect("tokio-uring runtime")
}

/// An empty file under `<target>/bench/`: what monoio's 0-byte reads read. A file system
/// file, whose reads complete inline (a memfd's would go to an io-wq worker).
fn empty_file() -> File {
    let path = benches::bench_dir()
        .expect("target/bench")
        .join("executor-empty.dat");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the empty file")
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The limit: keeps `qd` operations in flight, `n` in all, with one `io_uring_enter` per
/// batch of completions. `prep(slot, i)` builds operation `i` in slot `slot < qd`; `check`
/// sees every result. Returns once every completion is reaped. The ring is registered with
/// the thread for the call (IORING_REGISTER_RING_FDS), as the executor registers its own:
/// each entry then skips the kernel's descriptor lookup (about 45 ns here), and the limit
/// pays no more per entry than the subject.
///
/// # Safety
/// Every pointer in an entry `prep` builds must stay valid, and its memory untouched by
/// anyone else, until this function returns.
unsafe fn raw_loop(
    ring: &mut IoUring,
    qd: usize,
    n: u64,
    mut prep: impl FnMut(usize, u64) -> squeue::Entry,
    mut check: impl FnMut(i32),
) {
    let (mut submitter, mut sq, mut cq) = ring.split();
    // Kernels before 5.18 cannot: the loop enters by descriptor then.
    let registered = submitter.register_ring_fd().is_ok();
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let (mut issued, mut done) = (0u64, 0u64);
    while done < n {
        while issued < n {
            let Some(slot) = free.pop() else { break };
            let sqe = prep(slot, issued).user_data(slot as u64);
            // SAFETY: forwarded from the caller.
            unsafe { sq.push(&sqe) }.expect("the ring holds `qd` <= RING_ENTRIES entries");
            issued += 1;
        }
        sq.sync();
        match submitter.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        cq.sync();
        for cqe in &mut cq {
            check(cqe.result());
            free.push(cqe.user_data() as usize);
            done += 1;
        }
        // Hands the entries back before the next wait, which counts what is left unread.
        cq.sync();
    }
    if registered {
        submitter
            .unregister_ring_fd()
            .expect("give the ring's slot back");
    }
}
