//! Dropped operations: their resources outlive them until the kernel is done, then are freed;
//! dropping the executor cancels and reaps everything, without leaks and without hanging.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{pipe, write_fd, Mapping, MemIovecs, TrackedBuf};
use executor::{sleep, spawn, yield_now, AsyncFd, EventFd, Executor};

/// Polls `fut` once, asserting it is pending (so its op is in flight).
fn poll_pending<F: Future + Unpin>(fut: &mut F) {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    assert!(Pin::new(fut).poll(&mut cx).is_pending());
}

#[test]
fn dont_drop_backing_mem_read() {
    let ex = Executor::new().unwrap();
    let mem = Mapping::new(4096);
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    ex.run_until(async {
        let mut read = Box::pin(r.read_mem_at(MemIovecs::new(&mem, &[(0, 4096)]), 0));
        poll_pending(&mut read);
        // One more turn of the loop: the read is now in the kernel.
        yield_now().await;
        assert_eq!(Arc::strong_count(&mem), 2);
        drop(read);
        // The future is gone but the kernel may still write into the mapping: the op table
        // holds it until the (cancelled) completion is reaped.
        assert_eq!(Arc::strong_count(&mem), 2);
    });
    // The cancellation completes on a later turn; then the mapping is released.
    ex.run_until(async {
        for _ in 0..1000 {
            if Arc::strong_count(&mem) == 1 {
                return;
            }
            sleep(Duration::from_millis(1)).await.unwrap();
        }
    });
    assert_eq!(Arc::strong_count(&mem), 1);
}

#[test]
fn dont_drop_backing_mem_write() {
    let ex = Executor::new().unwrap();
    let mem = Mapping::new(1 << 20);
    let (r, w) = pipe();
    let w = AsyncFd::new(w);
    ex.run_until(async {
        // 1 MiB into a 64 KiB pipe: the write stays in flight.
        let mut write = Box::pin(w.write_mem_at(MemIovecs::new(&mem, &[(0, 1 << 20)]), 0));
        poll_pending(&mut write);
        yield_now().await;
        drop(write);
        assert_eq!(Arc::strong_count(&mem), 2);
    });
    drop(ex);
    assert_eq!(Arc::strong_count(&mem), 1);
    drop(r);
}

#[test]
fn dropping_the_executor_releases_backing_mem_of_a_dropped_read() {
    let ex = Executor::new().unwrap();
    let mem = Mapping::new(4096);
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    ex.run_until(async {
        let read = r.read_mem_at(MemIovecs::new(&mem, &[(0, 4096)]), 0);
        yield_now().await;
        drop(read);
    });
    assert_eq!(Arc::strong_count(&mem), 2, "still in the kernel");
    drop(ex);
    assert_eq!(Arc::strong_count(&mem), 1);
}

#[test]
fn dropped_read_never_writes_into_a_reused_buffer() {
    // After a dropped read is cancelled, data sent later is not lost into its buffer: the
    // next read gets it.
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    let r = AsyncFd::new(r);
    let token = Arc::new(());
    ex.run_until(async {
        let read = r.read(TrackedBuf::new(8, &token));
        yield_now().await;
        drop(read);
        assert_eq!(Arc::strong_count(&token), 2);
        while Arc::strong_count(&token) > 1 {
            sleep(Duration::from_millis(1)).await.unwrap();
        }
        write_fd(&w, b"after");
        let (res, buf) = r.read(Vec::with_capacity(8)).await;
        assert_eq!(res.unwrap(), 5);
        assert_eq!(buf, b"after");
    });
}

#[test]
fn drop_in_flight_read_keeps_buffer() {
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    let token = Arc::new(());
    // Dropped before the loop ever submitted it: the SQE is queued, and the buffer must
    // still stay until the kernel has seen (and cancelled) it.
    ex.run_until(async {
        drop(r.read(TrackedBuf::new(64, &token)));
        assert_eq!(Arc::strong_count(&token), 2);
    });
    drop(ex);
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn dropped_op_that_already_completed_frees_its_buffer_at_once() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    write_fd(&w, b"data");
    let r = AsyncFd::new(r);
    let token = Arc::new(());
    ex.run_until(async {
        let read = r.read(TrackedBuf::new(4, &token));
        // Give the kernel time to complete it, without polling the read.
        sleep(Duration::from_millis(5)).await.unwrap();
        drop(read);
        // Completed: nothing in the kernel, so the buffer goes with the future.
        assert_eq!(Arc::strong_count(&token), 1);
    });
}

#[test]
fn ignored_read_data_is_consumed_from_the_pipe() {
    // A read dropped after it completed still consumed its bytes; the executor does not
    // hand them to anyone else (documenting the cost of dropping a completed read).
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    let r = AsyncFd::new(r);
    ex.run_until(async {
        let read = r.read(Vec::with_capacity(2));
        yield_now().await;
        write_fd(&w, b"ab");
        sleep(Duration::from_millis(5)).await.unwrap();
        drop(read);
        write_fd(&w, b"cd");
        let (res, buf) = r.read(Vec::with_capacity(4)).await;
        assert_eq!(res.unwrap(), 2);
        assert_eq!(buf, b"cd");
    });
}

#[test]
fn executor_drop_with_ops_in_flight_in_detached_tasks() {
    let ex = Executor::new().unwrap();
    let mem = Mapping::new(4096);
    let token = Arc::new(());
    let (r, w) = pipe();
    let r = AsyncFd::new(r);
    let dropped = Rc::new(Cell::new(0));
    for i in 0..20 {
        let (r, mem, token, dropped) = (r.clone(), mem.clone(), token.clone(), dropped.clone());
        ex.spawn(async move {
            let _flag = OnDrop(dropped);
            if i % 2 == 0 {
                let _ = r.read_mem_at(MemIovecs::new(&mem, &[(0, 64)]), 0).await;
            } else {
                let _ = r.read(TrackedBuf::new(64, &token)).await;
            }
            let _ = sleep(Duration::from_secs(3600)).await;
        })
        .detach();
    }
    // Also tasks that are runnable when the executor drops, and one in a long sleep.
    ex.spawn(async { sleep(Duration::from_secs(3600)).await })
        .detach();
    for _ in 0..5 {
        ex.spawn(async {
            loop {
                yield_now().await;
            }
        })
        .detach();
    }
    ex.run_until(yield_now());
    assert!(Arc::strong_count(&mem) > 1);
    assert!(Arc::strong_count(&token) > 1);
    drop(r);
    drop(ex);
    assert_eq!(dropped.get(), 20, "every task's future was dropped");
    assert_eq!(Arc::strong_count(&mem), 1);
    assert_eq!(Arc::strong_count(&token), 1);
    drop(w);
}

struct OnDrop(Rc<Cell<usize>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

#[test]
fn executor_drop_with_task_handles_still_held() {
    let ex = Executor::new().unwrap();
    let token = Arc::new(());
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    let dropped = Rc::new(Cell::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (r, token, dropped) = (r.clone(), token.clone(), dropped.clone());
            ex.spawn(async move {
                let _flag = OnDrop(dropped);
                r.read(TrackedBuf::new(16, &token)).await.0.is_ok()
            })
        })
        .collect();
    ex.run_until(yield_now());
    assert_eq!(
        Arc::strong_count(&token),
        9,
        "4 buffers and 4 task futures hold it"
    );
    drop(ex);
    // The executor dropped the futures, though their handles remain.
    assert_eq!(dropped.get(), 4);
    assert_eq!(Arc::strong_count(&token), 1);
    for task in tasks {
        assert!(task.is_finished());
        drop(task);
    }
}

#[test]
fn executor_drop_with_a_task_waiting_on_another_task() {
    let ex = Executor::new().unwrap();
    let token = Arc::new(());
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    let t = token.clone();
    ex.spawn(async move {
        let inner = spawn(async move { r.read(TrackedBuf::new(16, &t)).await.0.is_ok() });
        inner.await
    })
    .detach();
    ex.run_until(yield_now());
    assert_eq!(Arc::strong_count(&token), 3);
    drop(ex);
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn executor_drop_with_a_task_waiting_on_a_channel() {
    let ex = Executor::new().unwrap();
    let token = Arc::new(());
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    let t = token.clone();
    ex.spawn(async move {
        let _t = t;
        let _ = rx.await;
    })
    .detach();
    ex.run_until(yield_now());
    drop(ex);
    // The task is parked on the channel, out of the executor's sight; it goes when the
    // sender wakes it.
    drop(tx);
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn task_handle_dropped_after_the_executor_frees_the_future() {
    let ex = Executor::new().unwrap();
    let token = Arc::new(());
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    let t = token.clone();
    let task = ex.spawn(async move {
        let _t = t;
        let _ = rx.await;
    });
    ex.run_until(yield_now());
    drop(ex);
    assert_eq!(
        Arc::strong_count(&token),
        2,
        "parked on a channel the executor cannot see"
    );
    drop(task);
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "no cycle through the dead executor's queue"
    );
    drop(tx);
}

#[test]
fn executor_drop_with_an_eventfd_stream_pending() {
    let ex = Executor::new().unwrap();
    let efd = EventFd::new().unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    ex.run_until(async {
        let mut next = pin!(stream.next_value());
        poll_pending(&mut next);
    });
    drop(ex);
    writer.write(1).unwrap();
    drop(stream);
}

#[test]
fn executor_drop_cancels_long_waits_without_hanging() {
    // A timer of an hour and a read that will never complete: both are cancelled.
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    ex.spawn(async move { r.read(vec![0u8; 4]).await.0.map(drop) })
        .detach();
    ex.spawn(async { sleep(Duration::from_secs(3600)).await })
        .detach();
    ex.run_until(yield_now());
    let start = std::time::Instant::now();
    drop(ex);
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
#[allow(clippy::async_yields_async)] // The op is returned unfinished on purpose.
fn op_future_polled_after_executor_drop_reports_ecanceled() {
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    let token = Arc::new(());
    let mut read = ex.run_until(async {
        let mut read = Box::pin(r.read(TrackedBuf::new(4, &token)));
        poll_pending(&mut read);
        yield_now().await;
        read
    });
    drop(ex);
    let waker = futures::task::noop_waker();
    match read.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready((res, buf)) => {
            assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
            drop(buf);
        }
        Poll::Pending => panic!("the executor reaped the cancelled read"),
    }
    drop(read);
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn timeout_drops_the_losing_read_and_keeps_its_buffer_alive() {
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    let token = Arc::new(());
    let res = ex.run_until(executor::timeout(
        Duration::from_millis(5),
        r.read(TrackedBuf::new(8, &token)),
    ));
    assert!(res.is_err());
    drop(ex);
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn dropped_read_each_keeps_backing_mem_until_every_read_is_reaped_and_loses_nothing() {
    let ex = Executor::new().unwrap();
    let mem = Mapping::new(4096);
    mem.fill(0);
    let (r, w) = pipe();
    write_fd(&w, b"x");
    let r = AsyncFd::new(r);
    ex.run_until(async {
        // The first read takes the byte there is; the other two wait in the kernel.
        let regions = MemIovecs::new(&mem, &[(0, 1), (8, 1), (16, 1)]);
        let mut reads = Box::pin(r.read_each(regions, false));
        poll_pending(&mut reads);
        yield_now().await;
        poll_pending(&mut reads);
        assert_eq!(Arc::strong_count(&mem), 2);
        drop(reads);
        // Cancelled, not yet reaped: the waiting reads still hold the mapping.
        assert_eq!(Arc::strong_count(&mem), 2);
        for _ in 0..1000 {
            if Arc::strong_count(&mem) == 1 {
                break;
            }
            sleep(Duration::from_millis(1)).await.unwrap();
        }
        assert_eq!(Arc::strong_count(&mem), 1);
        // The cancelled reads took nothing: what comes next goes to the next read.
        write_fd(&w, b"y");
        let (res, got) = r.read(Vec::with_capacity(1)).await;
        assert_eq!(res.unwrap(), 1);
        assert_eq!(got, b"y");
    });
    let bytes = mem.to_vec();
    assert_eq!((bytes[0], bytes[8], bytes[16]), (b'x', 0, 0));
}
