//! Unix sockets: messages with descriptors (SCM_RIGHTS), accept and connect.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{memfd, pipe, socket_path, TrackedBuf};
use executor::{connect_unix, listen_unix, socketpair, spawn, yield_now, AsyncFd, Executor};

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

#[test]
fn sendmsg_and_recvmsg_pass_descriptors() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let files = [memfd(b"zero"), memfd(b"one"), memfd(b"two")];
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let msg = ex.run_until(async {
        let (res, buf) = a.sendmsg(b"three fds".to_vec(), &fds).await;
        assert_eq!(res.unwrap(), 9);
        assert_eq!(buf, b"three fds");
        let (res, buf) = b.recvmsg(Vec::with_capacity(64), 8).await;
        let msg = res.unwrap();
        assert_eq!(msg.len, 9);
        assert_eq!(buf, b"three fds");
        msg
    });
    assert!(!msg.fds_truncated);
    assert!(!msg.truncated);
    assert_eq!(msg.fds.len(), 3);
    for ((received, original), i) in msg.fds.into_iter().zip(&files).zip(0u8..) {
        assert_ne!(
            received.as_raw_fd(),
            original.as_raw_fd(),
            "a new descriptor"
        );
        // SAFETY: F_GETFD only inspects the descriptor.
        let flags = unsafe { libc::fcntl(received.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
        // Same open file: a write through the received descriptor is read by the original.
        let received = std::fs::File::from(received);
        received.write_all_at(&[b'0' + i], 100).unwrap();
        let mut got = [0u8; 1];
        original.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got[0], b'0' + i);
    }
}

#[test]
fn sent_descriptors_may_be_closed_while_the_send_is_in_flight() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let file = memfd(b"kept open by the send");
    let send = a.sendmsg(b"x".as_slice(), &[file.as_fd()]);
    drop(file);
    let (res, _) = ex.run_until(send);
    assert_eq!(res.unwrap(), 1);
    let (res, _) = ex.run_until(b.recvmsg(Vec::with_capacity(4), 1));
    let mut msg = res.unwrap();
    let mut f = std::fs::File::from(msg.fds.pop().unwrap());
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "kept open by the send");
}

#[test]
fn recvmsg_with_too_few_fd_slots_reports_truncation() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let files = [memfd(b"a"), memfd(b"b"), memfd(b"c")];
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    ex.run_until(async {
        a.sendmsg(b"m".as_slice(), &fds).await.0.unwrap();
        let (res, _) = b.recvmsg(Vec::with_capacity(4), 1).await;
        let msg = res.unwrap();
        assert_eq!(msg.len, 1);
        assert!(msg.fds_truncated);
        assert_eq!(msg.fds.len(), 1, "exactly as many as there was room for");
        // No room at all.
        a.sendmsg(b"n".as_slice(), &fds).await.0.unwrap();
        let (res, buf) = b.recvmsg(Vec::with_capacity(4), 0).await;
        let msg = res.unwrap();
        assert_eq!(buf, b"n");
        assert!(msg.fds.is_empty());
        assert!(msg.fds_truncated);
    });
}

#[test]
fn recvmsg_without_descriptors() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    ex.run_until(async {
        a.sendmsg(b"plain".as_slice(), &[]).await.0.unwrap();
        let (res, buf) = b.recvmsg(Vec::with_capacity(16), 4).await;
        let msg = res.unwrap();
        assert_eq!((msg.len, msg.fds.len(), msg.fds_truncated), (5, 0, false));
        assert_eq!(buf, b"plain");
    });
}

#[test]
fn recvmsg_on_a_closed_peer_returns_zero() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    drop(a);
    let (res, buf) = ex.run_until(b.recvmsg(Vec::with_capacity(16), 4));
    let msg = res.unwrap();
    assert_eq!(msg.len, 0);
    assert!(msg.fds.is_empty());
    assert!(buf.is_empty());
}

#[test]
fn sendmsg_to_a_closed_peer_is_epipe() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    drop(b);
    let (res, _) = ex.run_until(a.sendmsg(b"x".as_slice(), &[]));
    assert_eq!(errno(&res.unwrap_err()), libc::EPIPE);
}

#[test]
fn sendmsg_of_too_many_descriptors_is_refused() {
    let ex = Executor::new().unwrap();
    let (a, _b) = socketpair().unwrap();
    let file = memfd(b"");
    let fds = vec![file.as_fd(); 254];
    let (res, buf) = ex.run_until(a.sendmsg(b"x".to_vec(), &fds));
    assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(buf, b"x");
}

#[test]
fn recvmsg_waits_for_a_message() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let (r, w) = pipe();
    ex.run_until(async {
        let recv = spawn(async move { b.recvmsg(Vec::with_capacity(8), 2).await });
        yield_now().await;
        a.sendmsg(b"late".as_slice(), &[r.as_fd(), w.as_fd()])
            .await
            .0
            .unwrap();
        let (res, buf) = recv.await;
        let msg = res.unwrap();
        assert_eq!(buf, b"late");
        assert_eq!(msg.fds.len(), 2);
        // The received write end feeds the original read end.
        let mut wf = std::fs::File::from(msg.fds.into_iter().nth(1).unwrap());
        wf.write_all(b"!").unwrap();
        let mut rf = std::fs::File::from(r);
        let mut got = [0u8; 1];
        rf.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"!");
    });
}

#[test]
fn dropped_recvmsg_closes_the_descriptors_it_received() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let token = Arc::new(());
    let (r, w) = pipe();
    ex.run_until(async {
        let recv = b.recvmsg(TrackedBuf::new(8, &token), 4);
        yield_now().await;
        // The message (with the pipe's write end) arrives while nobody awaits the recv.
        a.sendmsg(b"x".as_slice(), &[w.as_fd()]).await.0.unwrap();
        executor::sleep(std::time::Duration::from_millis(5))
            .await
            .unwrap();
        drop(recv);
    });
    drop(w);
    assert_eq!(Arc::strong_count(&token), 1);
    // If the received copy of the write end leaked, this read would block forever; with
    // every write end closed it reports end of file.
    let r = AsyncFd::new(r);
    let (res, _) = ex.run_until(r.read(Vec::with_capacity(1)));
    assert_eq!(res.unwrap(), 0);
}

#[test]
fn ignored_recvmsg_completing_later_closes_its_descriptors() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    let (r, w) = pipe();
    ex.run_until(async {
        let recv = b.recvmsg(Vec::with_capacity(8), 4);
        yield_now().await;
        drop(recv);
        // Sent after the drop: the cancel may lose the race and the recv complete; either
        // way no descriptor may leak.
        a.sendmsg(b"x".as_slice(), &[w.as_fd()]).await.0.unwrap();
        executor::sleep(std::time::Duration::from_millis(5))
            .await
            .unwrap();
    });
    drop(w);
    drop(a);
    drop(b);
    let r = AsyncFd::new(r);
    let (res, _) = ex.run_until(r.read(Vec::with_capacity(1)));
    assert_eq!(res.unwrap(), 0);
}

#[test]
fn accept_and_connect_on_a_unix_socket_path() {
    let ex = Executor::new().unwrap();
    let path = socket_path();
    let listener = listen_unix(path.path()).unwrap();
    ex.run_until(async {
        let server = spawn(async move {
            let conn = listener.accept().await.unwrap();
            let (res, buf) = conn.read(Vec::with_capacity(16)).await;
            assert_eq!(res.unwrap(), 5);
            let (res, _) = conn.write(buf).await;
            assert_eq!(res.unwrap(), 5);
        });
        let client = connect_unix(path.path()).await.unwrap();
        client.write(b"hello".as_slice()).await.0.unwrap();
        let (res, buf) = client.read(Vec::with_capacity(16)).await;
        assert_eq!(res.unwrap(), 5);
        assert_eq!(buf, b"hello");
        server.await;
    });
}

#[test]
fn accept_waits_for_a_connection_from_another_thread() {
    let ex = Executor::new().unwrap();
    let path = socket_path();
    let listener = listen_unix(path.path()).unwrap();
    let p = path.path().to_owned();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut s = std::os::unix::net::UnixStream::connect(p).unwrap();
        s.write_all(b"hi").unwrap();
    });
    let conn = ex.run_until(listener.accept()).unwrap();
    let (res, buf) = ex.run_until(conn.read(Vec::with_capacity(4)));
    assert_eq!(res.unwrap(), 2);
    assert_eq!(buf, b"hi");
    t.join().unwrap();
}

#[test]
fn connect_to_a_nonexistent_path_fails() {
    let ex = Executor::new().unwrap();
    let path = socket_path();
    let err = ex.run_until(connect_unix(path.path())).unwrap_err();
    assert_eq!(errno(&err), libc::ENOENT);
}

#[test]
fn connect_to_a_path_that_is_too_long_fails() {
    let ex = Executor::new().unwrap();
    let long = "x".repeat(200);
    let err = ex.run_until(connect_unix(&long)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn listen_on_a_taken_path_fails() {
    let path = socket_path();
    let _l = listen_unix(path.path()).unwrap();
    assert!(listen_unix(path.path()).is_err());
}

#[test]
fn accept_on_a_non_socket_fails() {
    let ex = Executor::new().unwrap();
    let f = AsyncFd::new(memfd(b"").into());
    let err = ex.run_until(f.accept()).unwrap_err();
    assert_eq!(errno(&err), libc::ENOTSOCK);
}

#[test]
fn connect_future_is_static_and_spawnable() {
    let ex = Executor::new().unwrap();
    let path = socket_path();
    let listener = listen_unix(path.path()).unwrap();
    let p = path.path().to_string_lossy().into_owned();
    // Borrowed path: the future must not borrow it.
    let connect = ex.spawn(connect_unix(p.as_str()));
    drop(p);
    ex.run_until(async {
        let _conn = listener.accept().await.unwrap();
        connect.await.unwrap();
    });
}

#[test]
fn send_vectored_sends_the_buffers_in_order_and_a_closed_peer_is_epipe() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    ex.run_until(async {
        let bufs = vec![
            b"one ".to_vec(),
            Vec::new(),
            b"two ".to_vec(),
            b"three".to_vec(),
        ];
        let (res, bufs) = a.send_vectored(bufs).await;
        assert_eq!(res.unwrap(), 13);
        assert_eq!(bufs.len(), 4, "the buffers come back");
        let (res, buf) = b.read(Vec::with_capacity(64)).await;
        assert_eq!(res.unwrap(), 13);
        assert_eq!(buf, b"one two three");
        drop(b);
        let (res, _) = a.send_vectored(vec![b"late".to_vec()]).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EPIPE);
    });
}

/// Two regions of one buffer, as guest memory would be handed to the kernel.
struct Regions {
    buf: Box<[u8]>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into `_buf`'s heap allocation, which does not move and lives as
// long as the value.
unsafe impl executor::IoVecs for Regions {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

// SAFETY: `buf` is owned by the value, writable, and nothing borrows it while an operation
// holds the value.
unsafe impl executor::IoVecsMut for Regions {}

fn regions(data: &[u8], cut: usize) -> Regions {
    let mut buf: Box<[u8]> = data.into();
    let base = buf.as_mut_ptr();
    let iovecs = vec![
        libc::iovec {
            iov_base: base.cast(),
            iov_len: cut,
        },
        libc::iovec {
            // SAFETY: `cut <= data.len()`: inside the buffer.
            iov_base: unsafe { base.add(cut) }.cast(),
            iov_len: data.len() - cut,
        },
    ];
    Regions { buf, iovecs }
}

#[test]
fn send_mem_nowait_takes_what_fits_and_never_waits() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    ex.run_until(async {
        let (res, _) = a.send_mem_nowait(regions(b"hello world", 5)).await;
        assert_eq!(res.unwrap(), 11);
        let (res, buf) = b.read(Vec::with_capacity(64)).await;
        assert_eq!((res.unwrap(), &buf[..]), (11, &b"hello world"[..]));

        // Fill the socket: the send takes a first part, then nothing, and returns at once
        // each time (nobody reads b meanwhile).
        let big = vec![7u8; 1 << 20];
        let mut sent = 0;
        loop {
            match a.send_mem_nowait(regions(&big, 1000)).await.0 {
                Ok(n) => {
                    assert!(n > 0 && n <= big.len());
                    sent += n;
                }
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
        }
        assert!(sent > 0, "the socket took something before it filled");
        drop(b);
        let (res, _) = a.send_mem_nowait(regions(b"late", 2)).await;
        assert_eq!(errno(&res.unwrap_err()), libc::EPIPE);
    });
}

#[test]
fn recv_mem_nowait_takes_what_is_there_and_never_waits() {
    let ex = Executor::new().unwrap();
    let (a, b) = socketpair().unwrap();
    ex.run_until(async {
        let (res, _) = b.recv_mem_nowait(regions(&[0; 16], 4)).await;
        assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        let (res, _) = a.write(b"hello world".to_vec()).await;
        assert_eq!(res.unwrap(), 11);
        let (res, r) = b.recv_mem_nowait(regions(&[0; 16], 4)).await;
        assert_eq!(res.unwrap(), 11);
        assert_eq!(
            &r.buf[..11],
            b"hello world",
            "across both regions, in order"
        );
        drop(a);
        let (res, _) = b.recv_mem_nowait(regions(&[0; 16], 4)).await;
        assert_eq!(res.unwrap(), 0, "the peer closed its end");
    });
}
