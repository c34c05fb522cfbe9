//! The broker against real host processes (unix sockets) and a test device end.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;

struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    thread: Option<JoinHandle<Result<()>>>,
    device: Option<AsyncFd>,
    port_path: PathBuf,
    ex: Executor,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("ringvm-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let (broker, device) = Broker::new(&path).unwrap();
        assert_eq!(broker.path(), path);
        let port_path = broker.port_path(80);
        assert_eq!(port_path, dir.join("v.sock_80"));
        Fixture {
            thread: Some(broker.spawn().unwrap()),
            device: Some(AsyncFd::new(device)),
            dir,
            path,
            port_path,
            ex: Executor::new().unwrap(),
        }
    }

    /// The next frame for the device, with its descriptor.
    fn frame(&self) -> (Frame, Option<OwnedFd>) {
        let device = self.device.as_ref().unwrap();
        let recv = device.recvmsg(vec![0u8; FRAME_SIZE].into_boxed_slice(), 1);
        let (res, buf) = self
            .ex
            .run_until(executor::timeout(Duration::from_secs(10), recv))
            .unwrap();
        let msg = res.unwrap();
        let frame = Frame::decode(&buf[..msg.len], msg.fds.len(), To::Device).unwrap();
        (frame, msg.fds.into_iter().next())
    }

    fn send(&self, frame: Frame) {
        let device = self.device.as_ref().unwrap();
        let (res, _) = self
            .ex
            .run_until(device.sendmsg(frame.encode().to_vec(), &[]));
        assert_eq!(res.unwrap(), FRAME_SIZE);
    }

    fn client(&self, first: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(&self.path).unwrap();
        c.write_all(first).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Closes the device end; the broker must end cleanly and remove its path.
    fn finish(mut self) {
        self.device = None;
        self.thread.take().unwrap().join().unwrap().unwrap();
        assert!(!self.path.exists());
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads until end-of-file (or a reset).
fn closed(c: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(c.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn a_good_connect_line_hands_the_stream_over_and_nothing_after_it() {
    let f = Fixture::new("good");
    let mut client = f.client(b"CONNECT 52\nfirst bytes");
    let (frame, fd) = f.frame();
    assert_eq!(frame, Frame::HostConnect { port: 52 });
    let mut stream = UnixStream::from(fd.unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 11];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"first bytes");
    stream.write_all(b"OK 1073741824\n").unwrap();
    let mut ok = [0u8; 14];
    client.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 1073741824\n");
    f.finish();
}

#[test]
fn garbage_and_long_lines_close_only_their_connection() {
    let f = Fixture::new("garbage");
    let mut garbage = f.client(b"GET / HTTP/1.1\n");
    let mut long = f.client(&[b'1'; 100]);
    let mut no_port = f.client(b"CONNECT x\n");
    assert!(closed(&mut garbage));
    assert!(closed(&mut long));
    assert!(closed(&mut no_port));
    // The broker goes on.
    let _good = f.client(b"CONNECT 7\n");
    assert_eq!(f.frame().0, Frame::HostConnect { port: 7 });
    f.finish();
}

#[test]
fn a_client_that_closes_before_its_line_is_forgotten() {
    let f = Fixture::new("early-close");
    drop(f.client(b"CONN"));
    let _good = f.client(b"CONNECT 8\n");
    assert_eq!(f.frame().0, Frame::HostConnect { port: 8 });
    f.finish();
}

#[test]
fn a_guest_connect_reaches_path_port() {
    let f = Fixture::new("path-port");
    let listener = UnixListener::bind(&f.port_path).unwrap();
    f.send(Frame::ConnectHost { id: 5, port: 80 });
    let (frame, fd) = f.frame();
    assert_eq!(frame, Frame::Connected { id: 5 });
    let (mut accepted, _) = listener.accept().unwrap();
    UnixStream::from(fd.unwrap()).write_all(b"hi").unwrap();
    let mut buf = [0u8; 2];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    f.finish();
}

#[test]
fn a_missing_listener_is_an_error_answer() {
    let f = Fixture::new("missing");
    f.send(Frame::ConnectHost { id: 9, port: 81 });
    let (frame, fd) = f.frame();
    assert_eq!(
        frame,
        Frame::Failed {
            id: 9,
            errno: libc::ENOENT as u32
        }
    );
    assert!(fd.is_none());
    f.finish();
}

#[test]
fn a_device_that_stops_reading_its_channel_ends_it_instead_of_piling_up_connects() {
    // Connects to a port nobody listens on fail at once; their answers fill the channel,
    // which the device never reads.
    let mut f = Fixture::new("flood");
    let device = f.device.take().unwrap();
    let mut sent = 0;
    loop {
        let frame = Frame::ConnectHost { id: sent, port: 81 }.encode().to_vec();
        let send = executor::timeout(Duration::from_millis(200), device.sendmsg(frame, &[]));
        match f.ex.run_until(send) {
            Ok((Ok(FRAME_SIZE), _)) => sent += 1,
            // The broker stopped reading: it waits for room for an answer.
            Err(_) => break,
            Ok((res, _)) => panic!("send: {res:?}"),
        }
        assert!(sent < 100_000, "the broker read every request");
    }
    // At most MAX_CONNECTS answers wait in tasks; the next waits in the request loop,
    // which gives up after SEND_TIMEOUT and ends the channel.
    let thread = f.thread.take().unwrap();
    let deadline = std::time::Instant::now() + SEND_TIMEOUT + Duration::from_secs(5);
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        thread.is_finished(),
        "the broker still waits after {sent} requests"
    );
    let result = thread.join().unwrap();
    assert!(
        matches!(&result, Err(Error::Channel(e)) if e.kind() == io::ErrorKind::TimedOut),
        "{result:?}"
    );
    assert!(!f.path.exists());
    drop(device);
}

#[test]
fn a_bad_frame_from_the_device_ends_the_channel() {
    let mut f = Fixture::new("bad-frame");
    let device = f.device.take().unwrap();
    let (res, _) =
        f.ex.run_until(device.sendmsg(Frame::Connected { id: 1 }.encode().to_vec(), &[]));
    res.unwrap();
    let result = f.thread.take().unwrap().join().unwrap();
    assert!(matches!(result, Err(Error::FrameKind(3))), "{result:?}");
    assert!(!f.path.exists());
}

#[test]
fn port_paths_append_the_port() {
    assert_eq!(
        port_path(Path::new("/run/v.sock"), 4294967295),
        PathBuf::from("/run/v.sock_4294967295")
    );
}

#[test]
fn an_existing_path_is_refused() {
    let dir = std::env::temp_dir().join(format!("ringvm-vsock-exists-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(Broker::new(&path), Err(Error::Bind(..))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_client_does_not_hold_up_the_others() {
    let f = Fixture::new("silent");
    let _silent = f.client(b"");
    let _partial = f.client(b"CONNECT 1");
    let _good = f.client(b"CONNECT 9\n");
    assert_eq!(f.frame().0, Frame::HostConnect { port: 9 });
    f.finish();
}
