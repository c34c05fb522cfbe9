//! Ring set-up: opcode restrictions, registered files, and the support probe.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;

use executor::opcode;
use executor::{
    is_supported, nop, probe, sleep, AsyncFd, Builder, Error, EventFd, Executor, ALWAYS_ALLOWED_OPS,
};

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

#[test]
fn io_uring_is_supported_here() {
    probe().unwrap();
    assert!(is_supported());
}

#[test]
fn ops_outside_the_allowlist_complete_with_eacces() {
    let ex = Builder::new()
        .allow_ops(&[opcode::Read::CODE])
        .build()
        .unwrap();
    let tmp = common::TempFile::new(b"restricted");
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(async {
        let (res, buf) = f.read_at(Vec::with_capacity(16), 0).await;
        assert_eq!(res.unwrap(), 10, "Read is allowed");
        assert_eq!(buf, b"restricted");
        let (res, _) = f.write_at(b"x".as_slice(), 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EACCES);
        assert_eq!(errno(&f.fsync().await.unwrap_err()), libc::EACCES);
        assert_eq!(errno(&f.poll_readable().await.unwrap_err()), libc::EACCES);
        // Two buffers make a READV (one would go as a READ, which is allowed).
        let two = vec![Vec::<u8>::with_capacity(4), Vec::<u8>::with_capacity(4)];
        let (res, _) = f.readv_at(two, 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EACCES);
        let (res, bufs) = f.readv_at(vec![Vec::<u8>::with_capacity(4)], 0).await;
        assert_eq!(res.unwrap(), 4, "one buffer goes as a READ");
        assert_eq!(bufs[0], b"rest");
        let err = sleep(std::time::Duration::from_millis(1))
            .await
            .unwrap_err();
        assert_eq!(errno(&err), libc::EACCES);
        // What the executor itself needs is always allowed.
        nop().await.unwrap();
    });
    assert_eq!(std::fs::read(tmp.path()).unwrap(), b"restricted");
}

#[test]
fn the_executor_works_inside_an_empty_allowlist() {
    // Only ALWAYS_ALLOWED_OPS: cancellation of dropped ops, the wake read, and remote wakes.
    let ex = Builder::new().allow_ops(&[]).build().unwrap();
    assert!(ALWAYS_ALLOWED_OPS.contains(&opcode::AsyncCancel::CODE));
    let efd = EventFd::new().unwrap();
    let writer = efd.try_clone().unwrap();
    let mut stream = efd.into_stream();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(10));
        writer.write(2).unwrap();
    });
    assert_eq!(ex.run_until(stream.next_value()).unwrap(), 2);
    t.join().unwrap();
    let (r, _w) = common::pipe();
    let r = AsyncFd::new(r);
    ex.run_until(async {
        let read = r.read(Vec::with_capacity(4));
        executor::yield_now().await;
        // Cancelled with ASYNC_CANCEL, which the restrictions allow.
        assert_eq!(r.cancel_all().await.unwrap(), 1);
        assert_eq!(errno(&read.await.0.unwrap_err()), libc::ECANCELED);
    });
    drop(ex);
}

#[test]
fn opcodes_that_open_files_or_sockets_are_refused() {
    for op in [
        opcode::OpenAt::CODE,
        opcode::OpenAt2::CODE,
        opcode::Socket::CODE,
        opcode::Accept::CODE,
        opcode::Connect::CODE,
    ] {
        match Builder::new().allow_ops(&[opcode::Read::CODE, op]).build() {
            Err(Error::ForbiddenOpcode(got)) => assert_eq!(got, op),
            other => panic!("opcode {op} was not refused: {other:?}"),
        }
    }
}

#[test]
fn opcodes_that_reach_paths_are_refused() {
    for op in [
        opcode::Statx::CODE,
        opcode::UnlinkAt::CODE,
        opcode::RenameAt::CODE,
        opcode::MkDirAt::CODE,
        opcode::SymlinkAt::CODE,
        opcode::LinkAt::CODE,
        opcode::GetXattr::CODE,
        opcode::SetXattr::CODE,
        opcode::Bind::CODE,
        opcode::Listen::CODE,
    ] {
        assert!(
            matches!(
                Builder::new().allow_ops(&[op]).build(),
                Err(Error::ForbiddenOpcode(got)) if got == op
            ),
            "opcode {op} was not refused"
        );
    }
}

#[test]
fn registered_files_are_read_by_index() {
    let a = common::memfd(b"first file");
    let b = common::memfd(b"second file");
    let ex = Builder::new()
        .register_files(&[a.as_raw_fd(), b.as_raw_fd()])
        .build()
        .unwrap();
    // The ring holds its own references: the descriptors may be closed.
    drop((a, b));
    let f0 = AsyncFd::fixed(0);
    let f1 = AsyncFd::fixed(1);
    assert_eq!(f0.as_raw_fd(), None);
    ex.run_until(async {
        let (res, buf) = f0.read_at(Vec::with_capacity(5), 0).await;
        assert_eq!(res.unwrap(), 5);
        assert_eq!(buf, b"first");
        let (res, buf) = f1.read_at(Vec::with_capacity(4), 7).await;
        assert_eq!(res.unwrap(), 4);
        assert_eq!(buf, b"file");
        let (res, _) = f1.write_at(b"SECOND".as_slice(), 0).await;
        assert_eq!(res.unwrap(), 6);
        let (res, buf) = f1.read_at(Vec::with_capacity(11), 0).await;
        assert_eq!(res.unwrap(), 11);
        assert_eq!(buf, b"SECOND file");
        f1.fsync().await.unwrap();
    });
}

#[test]
fn registered_files_work_in_a_restricted_ring() {
    let tmp = common::TempFile::new(b"fixed and restricted");
    let file = tmp.ro();
    let ex = Builder::new()
        .allow_ops(&[opcode::Read::CODE])
        .register_files(&[file.as_raw_fd()])
        .build()
        .unwrap();
    let f = AsyncFd::fixed(0);
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(5), 0));
    assert_eq!(res.unwrap(), 5);
    assert_eq!(buf, b"fixed");
    let (res, _) = ex.run_until(f.write_at(b"x".as_slice(), 0));
    assert_eq!(errno(&res.unwrap_err()), libc::EACCES);
}

#[test]
fn an_unregistered_fixed_index_is_ebadf() {
    let ex = Executor::new().unwrap();
    let (res, _) = ex.run_until(AsyncFd::fixed(3).read_at(Vec::with_capacity(4), 0));
    assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
    let f = common::memfd(b"x");
    let ex = Builder::new()
        .register_files(&[f.as_raw_fd()])
        .build()
        .unwrap();
    let (res, _) = ex.run_until(AsyncFd::fixed(1).read_at(Vec::with_capacity(4), 0));
    assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
}

#[test]
fn cancel_all_on_a_fixed_file() {
    let (r, _w) = common::pipe();
    let ex = Builder::new()
        .register_files(&[r.as_raw_fd()])
        .build()
        .unwrap();
    let f = AsyncFd::fixed(0);
    ex.run_until(async {
        let read = f.read(Vec::with_capacity(4));
        executor::yield_now().await;
        assert_eq!(f.cancel_all().await.unwrap(), 1);
        assert_eq!(errno(&read.await.0.unwrap_err()), libc::ECANCELED);
    });
    drop(r);
}

#[test]
fn registering_a_bad_fd_fails() {
    // Not an open descriptor; only its number is passed.
    let bad = 1_000_000;
    match Builder::new().register_files(&[bad]).build() {
        Err(e @ Error::RegisterFiles(_)) => assert!(!e.to_string().is_empty()),
        other => panic!("expected RegisterFiles, got {other:?}"),
    }
}

#[test]
fn a_zero_entry_ring_is_a_setup_error() {
    assert!(matches!(
        Builder::new().entries(0).build(),
        Err(Error::Setup(_))
    ));
}

#[test]
fn a_small_ring_handles_many_ops() {
    let ex = Builder::new().entries(2).build().unwrap();
    let results = ex.run_until(futures::future::join_all((0..1000).map(|_| nop())));
    assert!(results.iter().all(|r| r.is_ok()));
}

#[test]
fn a_small_ring_survives_completion_queue_overflow() {
    // 200 timers firing together into a 4-entry completion queue: the kernel keeps the
    // overflow, and the executor must flush it rather than sleep on an empty queue.
    let ex = Builder::new().entries(2).build().unwrap();
    let timers = (0..200).map(|_| sleep(std::time::Duration::from_millis(2)));
    let results = ex.run_until(futures::future::join_all(timers));
    assert!(results.iter().all(|r| r.is_ok()));
    // And pipe reads that complete at once when data arrives.
    let (r, w) = common::pipe();
    let r = AsyncFd::new(r);
    let reads: Vec<_> = (0..100).map(|_| r.read(Vec::with_capacity(1))).collect();
    ex.run_until(executor::yield_now());
    common::write_fd(&w, &[7u8; 100]);
    let results = ex.run_until(futures::future::join_all(reads));
    assert!(results
        .iter()
        .all(|(res, buf)| res.as_ref().unwrap() == &1 && buf == &[7]));
}
