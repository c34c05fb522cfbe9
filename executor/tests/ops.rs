//! Every I/O operation on files and pipes, with its error paths.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use common::{memfd, pipe, write_fd, TempFile};
use executor::{nop, AsyncFd, Executor};

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

#[test]
fn nop_completes() {
    let ex = Executor::new().unwrap();
    ex.run_until(nop()).unwrap();
}

#[test]
fn write_at_then_read_at_round_trips() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(async {
        let (res, buf) = f.write_at(b"hello world".to_vec(), 100).await;
        assert_eq!(res.unwrap(), 11);
        assert_eq!(buf, b"hello world", "the buffer comes back");
        let (res, buf) = f.read_at(Vec::with_capacity(5), 106).await;
        assert_eq!(res.unwrap(), 5);
        assert_eq!(buf, b"world");
    });
    // Seen by ordinary I/O too.
    let mut got = [0u8; 11];
    tmp.ro().read_exact_at(&mut got, 100).unwrap();
    assert_eq!(&got, b"hello world");
}

#[test]
fn read_fills_a_buffer_from_its_start() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"abcdef").into());
    // A Vec with data already in it: the read overwrites from the start; the length never
    // shrinks.
    let (res, buf) = ex.run_until(f.read_at(vec![b'x'; 4], 2));
    assert_eq!(res.unwrap(), 4);
    assert_eq!(buf, b"cdef");
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(b"zzz");
    let (res, buf) = ex.run_until(f.read_at(v, 0));
    assert_eq!(res.unwrap(), 6);
    assert_eq!(buf, b"abcdef");
    // A boxed slice is read into in full.
    let (res, buf) = ex.run_until(f.read_at(vec![0u8; 3].into_boxed_slice(), 1));
    assert_eq!(res.unwrap(), 3);
    assert_eq!(&*buf, b"bcd");
}

#[test]
fn short_read_at_end_of_file() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"0123456789").into());
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(64), 6));
    assert_eq!(res.unwrap(), 4);
    assert_eq!(buf, b"6789");
}

#[test]
fn read_at_end_of_file_returns_zero() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"0123456789").into());
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(64), 10));
    assert_eq!(res.unwrap(), 0);
    assert!(buf.is_empty());
    let (res, _) = ex.run_until(f.read_at(Vec::with_capacity(64), 1 << 40));
    assert_eq!(res.unwrap(), 0);
}

#[test]
fn read_and_write_use_the_file_position() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(async {
        assert_eq!(f.write(b"abc".as_slice()).await.0.unwrap(), 3);
        assert_eq!(f.write("def").await.0.unwrap(), 3);
    });
    let f = AsyncFd::new(tmp.ro().into());
    ex.run_until(async {
        let (res, buf) = f.read(Vec::with_capacity(4)).await;
        assert_eq!(res.unwrap(), 4);
        assert_eq!(buf, b"abcd");
        let (res, buf) = f.read(Vec::with_capacity(4)).await;
        assert_eq!(res.unwrap(), 2);
        assert_eq!(buf, b"ef");
        let (res, _) = f.read(Vec::with_capacity(4)).await;
        assert_eq!(res.unwrap(), 0, "end of file");
    });
}

#[test]
fn read_and_write_on_a_pipe() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    let (r, w) = (AsyncFd::new(r), AsyncFd::new(w));
    ex.run_until(async {
        // The read is in flight before the data arrives.
        let read = r.read(Vec::with_capacity(16));
        let (res, _) = w.write(b"ping".to_vec()).await;
        assert_eq!(res.unwrap(), 4);
        let (res, buf) = read.await;
        assert_eq!(res.unwrap(), 4);
        assert_eq!(buf, b"ping");
    });
}

#[test]
fn read_of_a_pipe_whose_writer_closed_returns_zero() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    write_fd(&w, b"x");
    drop(w);
    let r = AsyncFd::new(r);
    let (res, buf) = ex.run_until(r.read(Vec::with_capacity(4)));
    assert_eq!(res.unwrap(), 1);
    assert_eq!(buf, b"x");
    let (res, _) = ex.run_until(r.read(Vec::with_capacity(4)));
    assert_eq!(res.unwrap(), 0);
}

#[test]
fn write_to_a_pipe_whose_reader_closed_is_epipe() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    drop(r);
    let w = AsyncFd::new(w);
    let (res, _) = ex.run_until(w.write(b"x".as_slice()));
    assert_eq!(errno(&res.unwrap_err()), libc::EPIPE);
}

/// A descriptor number that is not open (far above anything this process opens).
fn closed_fd() -> AsyncFd {
    // SAFETY: 1_000_000 is not an open descriptor here; `forget_closed` keeps it from being
    // closed, so the wrapper owns nothing.
    AsyncFd::new(unsafe { OwnedFd::from_raw_fd(1_000_000) })
}

fn forget_closed(fd: AsyncFd) {
    std::mem::forget(fd.into_owned().unwrap());
}

#[test]
fn ops_on_a_bad_fd_fail_with_ebadf() {
    let ex = Executor::new().unwrap();
    let fd = closed_fd();
    ex.run_until(async {
        let (res, buf) = fd.read_at(vec![7u8; 4], 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
        assert_eq!(buf, [7; 4], "a failed read leaves the buffer alone");
        let (res, _) = fd.write_at(b"x".as_slice(), 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
        let (res, _) = fd.readv_at(vec![Vec::<u8>::with_capacity(4)], 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
        let (res, _) = fd.writev_at(vec![b"x".as_slice()], 0).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
        assert_eq!(errno(&fd.fsync().await.unwrap_err()), libc::EBADF);
        assert_eq!(errno(&fd.fdatasync().await.unwrap_err()), libc::EBADF);
        assert_eq!(
            errno(&fd.punch_hole(0, 4096).await.unwrap_err()),
            libc::EBADF
        );
        assert_eq!(errno(&fd.poll_readable().await.unwrap_err()), libc::EBADF);
    });
    forget_closed(fd);
}

#[test]
fn write_to_a_read_only_fd_is_ebadf() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"data");
    let f = AsyncFd::new(tmp.ro().into());
    let (res, _) = ex.run_until(f.write_at(b"xx".as_slice(), 0));
    assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
    assert_eq!(std::fs::read(tmp.path()).unwrap(), b"data");
}

#[test]
fn read_from_a_write_only_fd_is_ebadf() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"data");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp.path())
        .unwrap();
    let f = AsyncFd::new(f.into());
    let (res, _) = ex.run_until(f.read_at(Vec::with_capacity(4), 0));
    assert_eq!(errno(&res.unwrap_err()), libc::EBADF);
}

#[test]
fn read_at_on_a_pipe_with_an_offset_is_espipe_or_ignored() {
    // Positional I/O on a pipe: the kernel ignores the offset of stream files.
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    write_fd(&w, b"abc");
    let r = AsyncFd::new(r);
    let (res, buf) = ex.run_until(r.read_at(Vec::with_capacity(8), 0));
    match res {
        Ok(n) => assert_eq!(&buf[..n], b"abc"),
        Err(e) => assert_eq!(errno(&e), libc::ESPIPE),
    }
}

#[test]
fn readv_at_scatters_over_owned_buffers() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"abcdefghij").into());
    let bufs = vec![
        Vec::with_capacity(3),
        Vec::with_capacity(0),
        Vec::with_capacity(4),
        Vec::with_capacity(8),
    ];
    let (res, bufs) = ex.run_until(f.readv_at(bufs, 1));
    assert_eq!(res.unwrap(), 9);
    assert_eq!(bufs[0], b"bcd");
    assert!(bufs[1].is_empty());
    assert_eq!(bufs[2], b"efgh");
    assert_eq!(
        bufs[3], b"ij",
        "the last buffer is filled only as far as the data"
    );
}

#[test]
fn writev_at_gathers_owned_buffers() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    let bufs = vec![
        b"one ".to_vec(),
        Vec::new(),
        b"two ".to_vec(),
        b"three".to_vec(),
    ];
    let (res, bufs) = ex.run_until(f.writev_at(bufs, 2));
    assert_eq!(res.unwrap(), 13);
    assert_eq!(bufs.len(), 4, "every buffer comes back");
    assert_eq!(std::fs::read(tmp.path()).unwrap(), b"\0\0one two three");
}

#[test]
fn readv_at_end_of_file_returns_zero() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"abc").into());
    let (res, bufs) =
        ex.run_until(f.readv_at(vec![Vec::with_capacity(4), Vec::with_capacity(4)], 3));
    assert_eq!(res.unwrap(), 0);
    assert!(bufs.iter().all(Vec::is_empty));
}

#[test]
fn read_mem_at_and_write_mem_at_use_caller_memory() {
    let ex = Executor::new().unwrap();
    let mem = common::Mapping::new(4096);
    mem.fill(0);
    let f = AsyncFd::new(memfd(&[0u8; 64]).into());
    // Write two regions of the mapping, gathered.
    let regions = common::MemIovecs::new(&mem, &[(0, 4), (100, 4)]);
    ex.run_until(async {
        let src = common::MemIovecs::new(&mem, &[(1000, 8)]);
        // Fill the source through the file first: read "ABCDEFGH" into mem[1000..1008].
        let (res, _) = f.write_at(b"ABCDEFGH".as_slice(), 0).await;
        assert_eq!(res.unwrap(), 8);
        let (res, src) = f.read_mem_at(src, 0).await;
        assert_eq!(res.unwrap(), 8);
        assert_eq!(std::sync::Arc::strong_count(&src.mem), 3);
        // Now scatter the file's bytes 2..10 over two regions.
        let (res, _) = f.read_mem_at(regions, 2).await;
        assert_eq!(res.unwrap(), 8);
        // And write two regions back out, gathered, at 32.
        let out = common::MemIovecs::new(&mem, &[(100, 4), (0, 4)]);
        let (res, _) = f.write_mem_at(out, 32).await;
        assert_eq!(res.unwrap(), 8);
    });
    let bytes = mem.to_vec();
    assert_eq!(&bytes[1000..1008], b"ABCDEFGH");
    assert_eq!(&bytes[0..4], b"CDEF");
    assert_eq!(&bytes[100..104], b"GH\0\0");
    let mut got = [0u8; 8];
    let file = f.into_owned().unwrap();
    std::fs::File::from(file)
        .read_exact_at(&mut got, 32)
        .unwrap();
    assert_eq!(&got, b"GH\0\0CDEF");
    assert_eq!(std::sync::Arc::strong_count(&mem), 1);
}

#[test]
fn fsync_and_fdatasync_succeed_on_a_file() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(async {
        f.write_at(vec![1u8; 4096], 0).await.0.unwrap();
        f.fsync().await.unwrap();
        f.write_at(vec![2u8; 4096], 4096).await.0.unwrap();
        f.fdatasync().await.unwrap();
    });
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 8192);
}

#[test]
fn fsync_of_a_pipe_is_einval() {
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    assert_eq!(errno(&ex.run_until(r.fsync()).unwrap_err()), libc::EINVAL);
}

#[test]
fn punch_hole_reads_back_zeros_and_keeps_the_size() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(&[0xffu8; 3 * 4096]);
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(f.punch_hole(4096, 4096)).unwrap();
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(3 * 4096), 0));
    assert_eq!(res.unwrap(), 3 * 4096);
    assert!(buf[..4096].iter().all(|&b| b == 0xff));
    assert!(buf[4096..8192].iter().all(|&b| b == 0));
    assert!(buf[8192..].iter().all(|&b| b == 0xff));
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 3 * 4096);
}

#[test]
fn punch_hole_on_a_memfd() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(&[1u8; 8192]).into());
    ex.run_until(f.punch_hole(0, 4096)).unwrap();
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(8192), 0));
    assert_eq!(res.unwrap(), 8192);
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 1));
}

#[test]
fn zero_range_reads_back_zeros_and_keeps_the_size() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(&[0xaau8; 4 * 4096]);
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(f.zero_range(100, 5000)).unwrap();
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(4 * 4096), 0));
    assert_eq!(res.unwrap(), 4 * 4096);
    assert!(buf[..100].iter().all(|&b| b == 0xaa));
    assert!(buf[100..5100].iter().all(|&b| b == 0));
    assert!(buf[5100..].iter().all(|&b| b == 0xaa));
    // Past the end: the size stays.
    ex.run_until(f.zero_range(4 * 4096, 4096)).unwrap();
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 4 * 4096);
}

#[test]
fn fallocate_extends_a_file() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(b"");
    let f = AsyncFd::new(tmp.rw().into());
    ex.run_until(f.fallocate(0, 0, 8192)).unwrap();
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 8192);
}

#[test]
fn fallocate_on_a_read_only_fd_is_ebadf() {
    let ex = Executor::new().unwrap();
    let tmp = TempFile::new(&[1u8; 4096]);
    let f = AsyncFd::new(tmp.ro().into());
    let err = ex.run_until(f.punch_hole(0, 4096)).unwrap_err();
    assert_eq!(errno(&err), libc::EBADF);
}

#[test]
fn poll_readable_waits_for_data() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    let r = AsyncFd::new(r);
    let w = AsyncFd::new(w);
    ex.run_until(async {
        let readable = r.poll_readable();
        w.write(b"x".as_slice()).await.0.unwrap();
        let revents = readable.await.unwrap();
        assert_ne!(revents & libc::POLLIN as u32, 0);
        // Polling does not consume the data.
        let (res, buf) = r.read(Vec::with_capacity(4)).await;
        assert_eq!(res.unwrap(), 1);
        assert_eq!(buf, b"x");
    });
}

#[test]
fn poll_readable_reports_hangup() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    drop(w);
    let r = AsyncFd::new(r);
    let revents = ex.run_until(r.poll_readable()).unwrap();
    assert_ne!(revents & libc::POLLHUP as u32, 0);
}

#[test]
fn poll_writable_on_an_empty_pipe() {
    let ex = Executor::new().unwrap();
    let (_r, w) = pipe();
    let w = AsyncFd::new(w);
    let revents = ex.run_until(w.poll_writable()).unwrap();
    assert_ne!(revents & libc::POLLOUT as u32, 0);
}

#[test]
fn poll_writable_waits_for_room_in_a_full_pipe() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    // SAFETY: F_GETPIPE_SZ on a pipe we own.
    let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(size > 0);
    write_fd(&w, &vec![0u8; size as usize]);
    let w = AsyncFd::new(w);
    let mut r = std::fs::File::from(r);
    ex.run_until(async {
        let writable = w.poll_writable();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut buf = vec![0u8; 8192];
            r.read_exact(&mut buf).unwrap();
            r
        });
        let revents = writable.await.unwrap();
        assert_ne!(revents & libc::POLLOUT as u32, 0);
        t.join().unwrap();
    });
}

#[test]
fn cancel_all_makes_pending_ops_fail_with_ecanceled() {
    let ex = Executor::new().unwrap();
    let (r, _w) = pipe();
    let r = AsyncFd::new(r);
    ex.run_until(async {
        let read = r.read(vec![9u8; 8]);
        let poll = r.poll_readable();
        // Let both reach the kernel.
        executor::yield_now().await;
        assert_eq!(r.cancel_all().await.unwrap(), 2);
        let (res, buf) = read.await;
        assert_eq!(errno(&res.unwrap_err()), libc::ECANCELED);
        assert_eq!(buf, [9; 8]);
        assert_eq!(errno(&poll.await.unwrap_err()), libc::ECANCELED);
        // Nothing left to cancel.
        assert_eq!(r.cancel_all().await.unwrap(), 0);
    });
}

#[test]
fn cancel_all_leaves_other_fds_alone() {
    let ex = Executor::new().unwrap();
    let (r1, _w1) = pipe();
    let (r2, w2) = pipe();
    let (r1, r2) = (AsyncFd::new(r1), AsyncFd::new(r2));
    ex.run_until(async {
        let other = r2.read(Vec::with_capacity(4));
        let mine = r1.read(Vec::with_capacity(4));
        executor::yield_now().await;
        assert_eq!(r1.cancel_all().await.unwrap(), 1);
        assert_eq!(errno(&mine.await.0.unwrap_err()), libc::ECANCELED);
        write_fd(&w2, b"ok");
        let (res, buf) = other.await;
        assert_eq!(res.unwrap(), 2);
        assert_eq!(buf, b"ok");
    });
}

#[test]
fn an_async_fd_clone_shares_the_descriptor() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"shared").into());
    let g = f.clone();
    assert_eq!(f.as_raw_fd(), g.as_raw_fd());
    let f = f.into_owned().unwrap_err();
    drop(g);
    let (res, buf) = ex.run_until(f.read_at(Vec::with_capacity(6), 0));
    assert_eq!(res.unwrap(), 6);
    assert_eq!(buf, b"shared");
    assert!(
        f.into_owned().is_ok(),
        "no clone and no op holds it any more"
    );
}

#[test]
fn an_op_keeps_its_fd_open_after_the_handle_is_dropped() {
    let ex = Executor::new().unwrap();
    let (r, w) = pipe();
    let r = AsyncFd::new(r);
    let raw = r.as_raw_fd().unwrap();
    let read = r.read(Vec::with_capacity(4));
    drop(r);
    // SAFETY: F_GETFD only inspects the descriptor.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    assert!(flags >= 0, "still open");
    write_fd(&w, b"late");
    let (res, buf) = ex.run_until(read);
    assert_eq!(res.unwrap(), 4);
    assert_eq!(buf, b"late");
}

/// A datagram socket pair: each read takes one message, as from a tap.
fn datagram_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn read_each_gives_each_region_one_message_in_order() {
    let ex = Executor::new().unwrap();
    let mem = common::Mapping::new(4096);
    mem.fill(0);
    let (a, b) = datagram_pair();
    write_fd(&b, b"abc");
    write_fd(&b, b"defgh");
    let a = AsyncFd::new(a);
    let regions = common::MemIovecs::new(&mem, &[(0, 16), (100, 16), (200, 16)]);
    let (results, regions) = ex.run_until(a.read_each(regions, true));
    let results: Vec<_> = results
        .into_iter()
        .map(|r| r.map_err(|e| errno(&e)))
        .collect();
    assert_eq!(results, [Ok(3), Ok(5), Err(libc::EAGAIN)]);
    let bytes = mem.to_vec();
    assert_eq!(&bytes[0..4], b"abc\0");
    assert_eq!(&bytes[100..106], b"defgh\0");
    assert_eq!(bytes[200], 0);
    // Without `nowait` a read waits for its message.
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_fd(&b, b"late");
        b
    });
    let one = common::MemIovecs::new(&mem, &[(300, 16)]);
    let (results, _) = ex.run_until(a.read_each(one, false));
    assert_eq!(
        results.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
        [4]
    );
    assert_eq!(&mem.to_vec()[300..304], b"late");
    drop(writer.join().unwrap());
    drop(regions);
    assert_eq!(std::sync::Arc::strong_count(&mem), 1);
}
