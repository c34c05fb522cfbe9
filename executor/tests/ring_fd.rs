//! The ring registered with its thread: entered by its slot, given back on drop, and entered by
//! descriptor when the thread's 16 slots are taken.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use executor::{nop, opcode, AsyncFd, Builder, EventFd, Executor};

/// Rings a thread can register (`IO_RINGFD_REG_MAX`).
const SLOTS: usize = 16;

/// Reads, writes and waits through `ex`: a NOP, a file round trip, and a cross-thread wake
/// that finds the executor blocked in the ring.
fn exercise(ex: &Executor) {
    let tmp = common::TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    let ev = EventFd::new().unwrap();
    let remote = ev.try_clone().unwrap();
    let mut stream = ev.into_stream();
    ex.run_until(async {
        nop().await.unwrap();
        let (res, _) = f.write_at(b"registered".as_slice(), 0).await;
        assert_eq!(res.unwrap(), 10);
        let (res, buf) = f.read_at(Vec::with_capacity(16), 0).await;
        assert_eq!(res.unwrap(), 10);
        assert_eq!(buf, b"registered");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote.write(1).unwrap();
        });
        assert_eq!(stream.next_value().await.unwrap(), 1);
        writer.join().unwrap();
    });
}

#[test]
fn a_new_executor_enters_its_ring_by_its_slot() {
    let ex = Executor::new().unwrap();
    assert!(
        ex.ring_registered(),
        "this kernel (>= 5.18) registers rings"
    );
    exercise(&ex);
}

#[test]
fn dropped_executors_give_their_slot_back() {
    // Three times as many as the thread has slots, one after the other: each finds one free.
    for i in 0..3 * SLOTS {
        let ex = if i % 2 == 0 {
            Executor::new().unwrap()
        } else {
            // A restricted ring too: it still allows giving its slot back.
            Builder::new()
                .allow_ops(&[opcode::Read::CODE, opcode::Write::CODE])
                .build()
                .unwrap()
        };
        assert!(ex.ring_registered(), "executor {i} found no free slot");
        exercise(&ex);
    }
}

#[test]
fn executors_beyond_the_threads_slots_enter_by_descriptor() {
    let all: Vec<Executor> = (0..SLOTS + 4).map(|_| Executor::new().unwrap()).collect();
    let registered = all.iter().filter(|ex| ex.ring_registered()).count();
    assert_eq!(registered, SLOTS, "a fresh thread has every slot free");
    assert!(
        !all[SLOTS].ring_registered(),
        "slots go in order of building"
    );
    for ex in &all {
        exercise(ex);
    }
    // Slots are per thread: another thread has all of its own.
    std::thread::spawn(|| assert!(Executor::new().unwrap().ring_registered()))
        .join()
        .unwrap();
    // Once some are dropped, a new executor gets a slot again.
    drop(all);
    assert!(Executor::new().unwrap().ring_registered());
}

#[test]
fn a_dropped_executor_lets_go_of_its_registered_files() {
    // A ring still held by its slot would keep the write end open (it is one of the ring's
    // registered files) until this thread exits, and the read end would never see its end.
    let (r, w) = common::pipe();
    let ex = Builder::new()
        .register_files(&[w.as_raw_fd()])
        .build()
        .unwrap();
    assert!(ex.ring_registered());
    let (res, _) = ex.run_until(AsyncFd::fixed(0).write_at(b"x".as_slice(), 0));
    assert_eq!(res.unwrap(), 1);
    drop(w);
    drop(ex);
    let mut buf = [0u8; 8];
    assert_eq!(read_some(&r, &mut buf), 1, "the byte the ring wrote");
    // The kernel tears a ring down in a worker, shortly after its last reference goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pfd = libc::pollfd {
        fd: r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polls one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n == 1 && pfd.revents & libc::POLLHUP != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pipe's write end is still open 10 s after the executor dropped"
        );
    }
    assert_eq!(read_some(&r, &mut buf), 0, "end of file");
}

fn read_some(fd: &impl AsRawFd, buf: &mut [u8]) -> isize {
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "read: {}", std::io::Error::last_os_error());
    n
}
