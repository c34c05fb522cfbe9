//! Waking the executor: eventfds written from other threads, wakers sent to other threads,
//! the persistent eventfd read, and timers.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};

use executor::{sleep, timeout, yield_now, Elapsed, EventFd, Executor};

#[test]
fn eventfd_written_from_another_thread_wakes_the_executor() {
    let ex = Executor::new().unwrap();
    let efd = EventFd::new().unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        writer.write(3).unwrap();
    });
    // Nothing else to do: the executor blocks in the ring until the write.
    let v = ex.run_until(stream.next_value()).unwrap();
    assert_eq!(v, 3);
    t.join().unwrap();
}

#[test]
fn eventfd_values_add_up_until_read() {
    let ex = Executor::new().unwrap();
    let efd = EventFd::new().unwrap();
    efd.write(1).unwrap();
    efd.write(2).unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    assert_eq!(ex.run_until(stream.next_value()).unwrap(), 3);
    writer.write(5).unwrap();
    assert_eq!(ex.run_until(stream.next()).unwrap().unwrap(), 5);
}

#[test]
fn eventfd_stream_loses_no_value_when_next_is_dropped_in_select() {
    const WRITES: u64 = 2000;
    let ex = Executor::new().unwrap();
    let efd = EventFd::new().unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    let t = thread::spawn(move || {
        for i in 0..WRITES {
            writer.write(1).unwrap();
            if i % 64 == 0 {
                thread::sleep(Duration::from_micros(200));
            }
        }
    });
    let (sum, dropped_nexts) = ex.run_until(async {
        let mut sum = 0;
        let mut dropped_nexts = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while sum < WRITES && Instant::now() < deadline {
            // A new `next_value()` future each time, dropped whenever the other branch wins:
            // the read it waits on must survive in the stream.
            futures::select! {
                v = stream.next_value().fuse() => sum += v.unwrap(),
                _ = yield_now().fuse() => dropped_nexts += 1,
            }
        }
        (sum, dropped_nexts)
    });
    t.join().unwrap();
    assert_eq!(sum, WRITES, "every write was seen exactly once");
    assert!(dropped_nexts > 0, "the select did drop pending reads");
}

#[test]
fn eventfd_stream_read_survives_a_timeout() {
    let ex = Executor::new().unwrap();
    let efd = EventFd::new().unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    ex.run_until(async {
        let r = timeout(Duration::from_millis(5), stream.next_value()).await;
        assert_eq!(r.unwrap_err(), Elapsed);
        writer.write(7).unwrap();
        assert_eq!(stream.next_value().await.unwrap(), 7);
    });
}

/// Pending until its flag is set; hands its waker to `tx` on the first poll.
struct WaitForFlag {
    flag: Arc<AtomicBool>,
    tx: Option<mpsc::Sender<Waker>>,
}

impl Future for WaitForFlag {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if let Some(tx) = self.tx.take() {
            tx.send(cx.waker().clone()).unwrap();
        }
        Poll::Pending
    }
}

/// A thread that waits for a waker, sleeps, sets the flag and wakes.
fn waker_thread(flag: Arc<AtomicBool>) -> (mpsc::Sender<Waker>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Waker>();
    let t = thread::spawn(move || {
        let waker = rx.recv().unwrap();
        thread::sleep(Duration::from_millis(20));
        flag.store(true, Ordering::SeqCst);
        waker.wake();
    });
    (tx, t)
}

#[test]
fn task_waker_woken_from_another_thread() {
    let ex = Executor::new().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, t) = waker_thread(flag.clone());
    let task = ex.spawn(WaitForFlag { flag, tx: Some(tx) });
    // The main future waits on the task; the executor blocks in the ring until the wake.
    ex.run_until(task);
    t.join().unwrap();
}

#[test]
fn main_future_waker_woken_from_another_thread() {
    let ex = Executor::new().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, t) = waker_thread(flag.clone());
    ex.run_until(WaitForFlag { flag, tx: Some(tx) });
    t.join().unwrap();
}

#[test]
fn many_remote_wakes_are_never_lost() {
    // Races remote wakes against the executor going to sleep.
    const ROUNDS: usize = 300;
    let ex = Executor::new().unwrap();
    let (wtx, wrx) = mpsc::channel::<(Waker, Arc<AtomicBool>)>();
    let t = thread::spawn(move || {
        for (i, (waker, flag)) in wrx.iter().enumerate() {
            if i % 3 == 0 {
                thread::sleep(Duration::from_micros(50));
            }
            flag.store(true, Ordering::SeqCst);
            waker.wake();
        }
    });
    let done = Rc::new(Cell::new(0));
    for _ in 0..ROUNDS {
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let fut = WaitForFlag {
            flag: flag.clone(),
            tx: Some(tx),
        };
        let d = done.clone();
        let task = ex.spawn(async move {
            fut.await;
            d.set(d.get() + 1);
        });
        let wtx = wtx.clone();
        ex.run_until(async move {
            // Forward the task's waker once it has polled.
            let fwd = async {
                loop {
                    if let Ok(w) = rx.try_recv() {
                        wtx.send((w, flag)).unwrap();
                        return;
                    }
                    yield_now().await;
                }
            };
            fwd.await;
            task.await;
        });
    }
    drop(wtx);
    t.join().unwrap();
    assert_eq!(done.get(), ROUNDS);
}

#[test]
fn wake_after_the_executor_is_dropped_is_harmless() {
    let ex = Executor::new().unwrap();
    let (tx, rx) = mpsc::channel::<Waker>();
    let task = ex.spawn(WaitForFlag {
        flag: Arc::new(AtomicBool::new(false)),
        tx: Some(tx),
    });
    ex.run_until(yield_now());
    let waker = rx.recv().unwrap();
    drop(ex);
    thread::spawn(move || waker.wake()).join().unwrap();
    drop(task);
}

#[test]
fn sleep_lasts_at_least_its_duration() {
    let ex = Executor::new().unwrap();
    let start = Instant::now();
    ex.run_until(sleep(Duration::from_millis(30))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(30));
}

#[test]
fn shorter_sleeps_finish_first() {
    let ex = Executor::new().unwrap();
    let order = Rc::new(std::cell::RefCell::new(Vec::new()));
    let tasks: Vec<_> = [40u64, 0, 20, 5]
        .into_iter()
        .map(|ms| {
            let order = order.clone();
            ex.spawn(async move {
                sleep(Duration::from_millis(ms)).await.unwrap();
                order.borrow_mut().push(ms);
            })
        })
        .collect();
    ex.run_until(futures::future::join_all(tasks));
    assert_eq!(*order.borrow(), [0, 5, 20, 40]);
}

#[test]
fn timeout_elapses_when_the_deadline_passes() {
    let ex = Executor::new().unwrap();
    let start = Instant::now();
    let r = ex.run_until(timeout(
        Duration::from_millis(20),
        futures::future::pending::<()>(),
    ));
    assert_eq!(r, Err(Elapsed));
    assert!(start.elapsed() >= Duration::from_millis(20));
    let e: std::io::Error = Elapsed.into();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn timeout_returns_the_output_when_the_future_wins() {
    let ex = Executor::new().unwrap();
    let start = Instant::now();
    let r = ex.run_until(timeout(Duration::from_secs(60), async {
        sleep(Duration::from_millis(5)).await.unwrap();
        9
    }));
    assert_eq!(r, Ok(9));
    // The losing timer was cancelled, not waited for.
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn timeout_of_a_ready_future() {
    let ex = Executor::new().unwrap();
    assert_eq!(ex.run_until(timeout(Duration::ZERO, async { 1 })), Ok(1));
}

#[test]
fn zero_sleep_completes() {
    let ex = Executor::new().unwrap();
    ex.run_until(sleep(Duration::ZERO)).unwrap();
}

#[test]
fn concurrent_remote_wakes_from_several_threads() {
    const TASKS: usize = 2000;
    const THREADS: usize = 4;
    let ex = Executor::new().unwrap();
    let mut senders: Vec<Vec<futures::channel::oneshot::Sender<usize>>> =
        (0..THREADS).map(|_| Vec::new()).collect();
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (tx, rx) = futures::channel::oneshot::channel();
            senders[i % THREADS].push(tx);
            ex.spawn(async move { rx.await.unwrap() })
        })
        .collect();
    // Every task is parked before any sender runs.
    ex.run_until_stalled();
    let threads: Vec<_> = senders
        .into_iter()
        .map(|txs| {
            thread::spawn(move || {
                for (k, tx) in txs.into_iter().enumerate() {
                    tx.send(k).unwrap();
                    if k % 50 == 0 {
                        thread::sleep(Duration::from_micros(100));
                    }
                }
            })
        })
        .collect();
    let all = ex.run_until(timeout(
        Duration::from_secs(10),
        futures::future::join_all(tasks),
    ));
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(all.expect("no wake was lost").len(), TASKS);
}

#[test]
fn wake_while_the_executor_is_not_running_is_kept() {
    let ex = Executor::new().unwrap();
    let (tx, rx) = futures::channel::oneshot::channel::<u8>();
    let task = ex.spawn(async move { rx.await.unwrap() });
    ex.run_until_stalled();
    thread::spawn(move || tx.send(4).unwrap()).join().unwrap();
    assert_eq!(ex.run_until(task), 4);
}
