//! Tasks and the loop: spawning, awaiting, detaching, cancelling, fairness, scale.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use executor::{block_on, nop, sleep, spawn, yield_now, AsyncFd, Executor};

#[test]
fn run_until_returns_the_output() {
    let ex = Executor::new().unwrap();
    assert_eq!(ex.run_until(async { 7 }), 7);
    // The executor can run again.
    assert_eq!(ex.run_until(async { nop().await.map(|()| 8) }).unwrap(), 8);
}

#[test]
fn block_on_runs_a_future_with_ops() {
    let out = block_on(async {
        nop().await.unwrap();
        sleep(Duration::from_millis(1)).await.unwrap();
        42
    })
    .unwrap();
    assert_eq!(out, 42);
}

#[test]
fn spawned_task_is_awaitable() {
    let ex = Executor::new().unwrap();
    let task = ex.spawn(async {
        nop().await.unwrap();
        "done"
    });
    assert_eq!(ex.run_until(task), "done");
}

#[test]
fn spawn_from_inside_a_task() {
    let ex = Executor::new().unwrap();
    let out = ex.run_until(async {
        let outer = spawn(async {
            let inner = spawn(async {
                nop().await.unwrap();
                1
            });
            inner.await + 1
        });
        outer.await + 1
    });
    assert_eq!(out, 3);
}

#[test]
fn detached_task_runs_to_completion() {
    let ex = Executor::new().unwrap();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    ex.spawn(async move {
        sleep(Duration::from_millis(5)).await.unwrap();
        d.set(true);
    })
    .detach();
    ex.run_until(sleep(Duration::from_millis(50))).unwrap();
    assert!(done.get());
}

#[test]
fn tasks_run_only_while_the_executor_runs() {
    let ex = Executor::new().unwrap();
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let task = ex.spawn(async move { r.set(true) });
    assert!(!ran.get());
    ex.run_until(task);
    assert!(ran.get());
}

/// Sets its flag when dropped.
struct DropFlag(Rc<Cell<bool>>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

#[test]
fn dropping_a_task_cancels_it() {
    let ex = Executor::new().unwrap();
    let (r, _w) = common::pipe();
    let reader = AsyncFd::new(r);
    let dropped = Rc::new(Cell::new(false));
    let finished = Rc::new(Cell::new(false));
    let (d, f) = (dropped.clone(), finished.clone());
    let task = ex.spawn(async move {
        let _flag = DropFlag(d);
        // Never completes: nobody writes to the pipe.
        let _ = reader.read(vec![0u8; 8]).await;
        f.set(true);
    });
    ex.run_until(yield_now());
    assert!(!dropped.get(), "the task is parked on its read");
    drop(task);
    ex.run_until(yield_now());
    assert!(dropped.get(), "dropping the Task dropped its future");
    assert!(!finished.get());
}

#[test]
fn cancel_returns_none_for_an_unfinished_task() {
    let ex = Executor::new().unwrap();
    let (r, _w) = common::pipe();
    let reader = AsyncFd::new(r);
    let task = ex.spawn(async move { reader.read(vec![0u8; 8]).await.0.is_ok() });
    ex.run_until(yield_now());
    assert_eq!(ex.run_until(task.cancel()), None);
}

#[test]
fn run_until_stalled_runs_ready_tasks_and_returns() {
    let ex = Executor::new().unwrap();
    let count = Rc::new(Cell::new(0));
    for _ in 0..10 {
        let c = count.clone();
        ex.spawn(async move {
            yield_now().await;
            yield_now().await;
            c.set(c.get() + 1);
        })
        .detach();
    }
    // Also a task that never finishes: run_until_stalled must not wait for it.
    let (r, _w) = common::pipe();
    let reader = AsyncFd::new(r);
    ex.spawn(async move { reader.read(vec![0u8; 1]).await.0.map(drop) })
        .detach();
    ex.run_until_stalled();
    assert_eq!(count.get(), 10);
}

#[test]
fn run_until_stalled_with_nothing_to_do_returns() {
    let ex = Executor::new().unwrap();
    ex.run_until_stalled();
}

#[test]
fn yield_now_lets_the_other_tasks_run() {
    let ex = Executor::new().unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tasks = Vec::new();
    for id in 0..3 {
        let log = log.clone();
        tasks.push(ex.spawn(async move {
            for _ in 0..4 {
                log.borrow_mut().push(id);
                yield_now().await;
            }
        }));
    }
    ex.run_until(futures::future::join_all(tasks));
    let log = log.borrow();
    assert_eq!(*log, [0, 1, 2].repeat(4), "tasks take turns");
}

#[test]
fn a_busy_task_does_not_starve_io() {
    // A task that yields forever must not keep completions from being reaped.
    let ex = Executor::new().unwrap();
    let stop = Rc::new(Cell::new(false));
    let s = stop.clone();
    ex.spawn(async move {
        while !s.get() {
            yield_now().await;
        }
    })
    .detach();
    ex.run_until(async {
        for _ in 0..100 {
            nop().await.unwrap();
        }
        sleep(Duration::from_millis(2)).await.unwrap();
    });
    stop.set(true);
    ex.run_until(yield_now());
}

#[test]
fn ten_thousand_tasks_each_doing_an_op() {
    const N: usize = 10_000;
    let ex = Executor::new().unwrap();
    let file = AsyncFd::new(common::memfd(&[0x5a; 4096]).into());
    let done = Rc::new(Cell::new(0usize));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (file, done) = (file.clone(), done.clone());
            ex.spawn(async move {
                let (res, buf) = file.read_at(Vec::with_capacity(16), (i % 256) as u64).await;
                assert_eq!(res.unwrap(), 16);
                assert_eq!(buf, [0x5a; 16]);
                done.set(done.get() + 1);
                i
            })
        })
        .collect();
    let sum: usize = ex.run_until(futures::future::join_all(tasks)).iter().sum();
    assert_eq!(done.get(), N);
    assert_eq!(sum, N * (N - 1) / 2);
}

#[test]
fn ten_thousand_ops_in_flight_at_once() {
    // More ops than submission and completion queue entries, all pending together.
    const N: usize = 10_000;
    let ex = Executor::new().unwrap();
    let ops = (0..N).map(|_| nop());
    let results = ex.run_until(futures::future::join_all(ops));
    let errs: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errs.is_empty(),
        "{} errors, first {:?}",
        errs.len(),
        errs.first()
    );
    let timers = (0..N).map(|_| sleep(Duration::from_millis(1)));
    let results = ex.run_until(futures::future::join_all(timers));
    assert!(results.iter().all(|r| r.is_ok()));
}

#[test]
fn ops_outside_an_executor_fail_with_an_io_error() {
    let (r, w) = common::pipe();
    let reader = AsyncFd::new(r);
    let writer = AsyncFd::new(w);
    let poll_once = |fut: &mut Pin<Box<dyn Future<Output = std::io::Result<()>>>>| {
        let waker = futures::task::noop_waker();
        match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("an op outside an executor must resolve at once"),
        }
    };
    let mut futs: Vec<Pin<Box<dyn Future<Output = std::io::Result<()>>>>> = vec![
        Box::pin(nop()),
        Box::pin(sleep(Duration::from_secs(1))),
        Box::pin(async move { reader.read(vec![0u8; 4]).await.0.map(drop) }),
        Box::pin(async move { writer.write(b"x".as_slice()).await.0.map(drop) }),
    ];
    for fut in &mut futs {
        let err = poll_once(fut).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Other, "{err}");
    }
}

#[test]
fn op_made_outside_runs_on_the_executor_that_polls_it() {
    let (r, w) = common::pipe();
    common::write_fd(&w, b"abc");
    let reader = AsyncFd::new(r);
    // Made before any executor runs: submitted at its first poll, inside `run_until`.
    let fut = reader.read(Vec::with_capacity(8));
    let ex = Executor::new().unwrap();
    let (res, buf) = ex.run_until(fut);
    assert_eq!(res.unwrap(), 3);
    assert_eq!(buf, b"abc");
    ex.run_until(nop()).unwrap();
}

#[test]
#[should_panic(expected = "outside a running executor")]
fn spawn_outside_an_executor_panics() {
    drop(spawn(async {}));
}

#[test]
fn nested_executors_keep_their_own_ops() {
    let outer = Executor::new().unwrap();
    let out = outer.run_until(async {
        nop().await.unwrap();
        // A second executor on the same thread, run from inside the first.
        let inner = block_on(async {
            nop().await.unwrap();
            sleep(Duration::from_millis(1)).await.unwrap();
            5
        })
        .unwrap();
        nop().await.unwrap();
        inner + 1
    });
    assert_eq!(out, 6);
}

#[test]
fn executors_on_several_threads() {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                block_on(async move {
                    for _ in 0..100 {
                        nop().await.unwrap();
                    }
                    i
                })
                .unwrap()
            })
        })
        .collect();
    let ids: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
}

#[test]
fn executor_is_reusable_after_run_until_returns_with_tasks_pending() {
    let ex = Executor::new().unwrap();
    let count = Rc::new(Cell::new(0));
    let c = count.clone();
    ex.spawn(async move {
        loop {
            sleep(Duration::from_millis(1)).await.unwrap();
            c.set(c.get() + 1);
        }
    })
    .detach();
    ex.run_until(sleep(Duration::from_millis(20))).unwrap();
    let first = count.get();
    assert!(first > 0);
    ex.run_until(sleep(Duration::from_millis(20))).unwrap();
    assert!(count.get() > first);
}

/// Sets its flag when dropped, on any thread.
struct SendDropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SendDropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn executor_dropped_from_a_thread_local_destructor_drops_its_tasks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    thread_local! {
        static EX: RefCell<Option<Executor>> = const { RefCell::new(None) };
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    std::thread::spawn(move || {
        // Reached before the executor's own thread-local: destroyed after it, when the
        // executor can no longer make itself current.
        EX.with(|ex| *ex.borrow_mut() = Some(Executor::new().unwrap()));
        EX.with(|ex| {
            let ex = ex.borrow();
            let ex = ex.as_ref().unwrap();
            let (r, _w) = common::pipe();
            let r = AsyncFd::new(r);
            // A task left waiting on a read that never completes, its op in the kernel.
            ex.spawn(async move {
                let _flag = SendDropFlag(flag);
                let _ = r.read(vec![0u8; 8]).await;
                let _w = _w;
            })
            .detach();
            ex.run_until(yield_now());
        });
    })
    .join()
    .unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "the waiting task was dropped"
    );
}

#[test]
fn submit_now_hands_queued_ops_to_the_kernel_before_the_task_yields() {
    let (r, w) = common::pipe();
    let ex = Executor::new().unwrap();
    ex.run_until(async move {
        let w = AsyncFd::new(w);
        // Queued, not yet submitted: the executor submits when the task yields.
        let write = w.write(b"x".to_vec());
        let mut byte = [0u8; 1];
        let peek = |byte: &mut [u8; 1]| {
            let mut pfd = libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a zero timeout does not block.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
            ready == 1 && {
                // SAFETY: reads one byte into `byte`, which has room for it.
                unsafe { libc::read(r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) == 1 }
            }
        };
        assert!(
            !peek(&mut byte),
            "the write reached the pipe before any submission"
        );
        executor::submit_now().unwrap();
        // A pipe write completes as it is submitted.
        assert!(
            peek(&mut byte),
            "submit_now did not submit the queued write"
        );
        assert_eq!(&byte, b"x");
        let (res, _) = write.await;
        assert_eq!(res.unwrap(), 1);
        // Nothing queued: a no-op.
        executor::submit_now().unwrap();
    });
    // No executor on this thread: a no-op too.
    executor::submit_now().unwrap();
}
