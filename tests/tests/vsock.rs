//! `ringvm device vsock` through the real process boundary: the jailed device process, its
//! broker in the unjailed front process (`--uds`), ringvm's vhost-user frontend, and a mock
//! guest driver on memory shared with the device (memfds). Host processes are plain unix
//! sockets: a guest connect reaches the listener at `PATH_<port>`, a host process that
//! writes `CONNECT <port>` reaches the guest, and data crosses both ways intact.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use executor::Executor;
use tests::{ringvm_bin, wait_until, Scratch};
use virtio::vhost_user::{Connection, Frontend};
use vsock::packet::Op;
use vsock::testing::{host_read, hybrid_vsock_exchange, send_when_room, Guest, TIMEOUT};

const CID: u64 = 42;

/// The device's front process, killed on drop (its jailed child with it).
struct Device(Child);

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Scratch) -> (Device, std::path::PathBuf) {
    let sock = dir.path("vhost.sock");
    let uds = dir.path("vsock.sock");
    let child = Command::new(ringvm_bin())
        .args(["device", "vsock", "--socket"])
        .arg(&sock)
        .args(["--cid", &CID.to_string(), "--uds"])
        .arg(&uds)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ringvm device vsock");
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists() && uds.exists()),
        "the device never listened"
    );
    (Device(child), uds)
}

#[test]
fn guest_and_host_processes_reach_each_other_through_the_jailed_device() {
    let dir = Scratch::new("vsock", "e2e");
    let (mut device, uds) = start(&dir);
    let ex = Executor::new().expect("executor");
    let mut guest = Guest::new(CID);
    ex.run_until(async {
        let conn = executor::connect_unix(&dir.path("vhost.sock"))
            .await
            .expect("connect to the device");
        let fe = Frontend::connect(Connection::new(conn), TIMEOUT)
            .await
            .expect("vhost-user set-up");
        let cid = fe.get_config(0, 8).await.expect("config");
        assert_eq!(cid, CID.to_le_bytes());
        fe.start(fe.features(), &guest.mem, &guest.vrings())
            .await
            .expect("start");

        // The checks every hybrid-vsock device passes; ringvm's OK line names the host-side
        // port, as Firecracker's does.
        let mut host = hybrid_vsock_exchange(&mut guest, &uds).await;
        assert_eq!(host.ok_port, host.host_port, "OK names the host-side port");

        // Garbage from a host client ends only that client.
        let mut bad = UnixStream::connect(&uds).expect("connect to PATH");
        bad.write_all(b"HELLO\n").expect("write");
        let mut b = [0u8; 8];
        bad.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        assert_eq!(bad.read(&mut b).expect("closed, not an error"), 0);
        send_when_room(&mut guest, host.guest_port, host.host_port, Op::Rw, b"pong").await;
        assert_eq!(host_read(&mut host.client, 4).await, b"pong");
        drop(fe);
    });
    // The frontend went away: the device ends by itself, and the broker removed PATH.
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            device.0.try_wait(),
            Ok(Some(_))
        )),
        "the device did not end"
    );
    assert!(device.0.wait().expect("status").success());
    assert!(wait_until(Duration::from_secs(5), || !uds.exists()));
}

#[test]
fn bad_vsock_arguments_are_refused_before_listening() {
    let dir = Scratch::new("vsock", "bad");
    let sock = dir.path("vhost.sock");
    for (args, says) in [
        (vec!["--cid", "2", "--uds", "x.sock"], "CID 2"),
        (vec!["--cid", "3"], "give --uds PATH or --broker-fd N"),
        (vec!["--cid", "3", "--broker-fd", "9"], "--broker-fd 9"),
    ] {
        let out = Command::new(ringvm_bin())
            .args(["device", "vsock", "--socket"])
            .arg(&sock)
            .args(&args)
            .current_dir(&dir.0)
            .output()
            .expect("run ringvm device vsock");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!sock.exists());
    }
}

#[test]
fn ringvm_run_vsock_puts_the_device_on_the_bus_and_brokers_host_connections() {
    let dir = Scratch::new("vsock", "run");
    let uds = dir.path("vm.vsock");
    let spec = format!("cid=7,uds={}", uds.display());
    let vm = tests::StoppableVm::start(&dir, &["--no-rng", "--vsock", &spec]);
    vm.assert_on_bus("1af4:1053", "virtio-vsock");
    assert_eq!(
        tests::children_of(vm.live.child.id()).len(),
        1,
        "one device process"
    );
    // The host side is up, in the VMM (its seccomp filter on): a host process connects and
    // asks for guest port 80. The test guest has no vsock driver, so the connection waits
    // for one; when the VM ends, the host stream ends too.
    let mut client = UnixStream::connect(&uds).expect("connect to PATH");
    client.write_all(b"CONNECT 80\n").expect("write");
    vm.stop(Duration::from_secs(20));
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut b = [0u8; 16];
    // An end either way: EOF, or a reset when the broker closed the stream before it read
    // the CONNECT line (a unix socket closed with unread data resets its peer).
    match client.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the host stream did not end: {other:?}"),
    }
    assert!(!uds.exists(), "the host socket outlived the VM");
}

#[test]
fn ringvm_run_vsock_arguments_are_checked() {
    for (args, says) in [
        (vec!["--vsock", "cid=2"], "cid=2"),
        (vec!["--vsock", "uds=/tmp/x"], "cid= is missing"),
        (vec!["--vsock", "cid=3", "--cid", "4"], "not both"),
    ] {
        let out = Command::new(ringvm_bin())
            .arg("run")
            .args(&args)
            .arg(tests::test_guest_path())
            .output()
            .expect("run ringvm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The flags come from the vsock crate's registry entry; `run --help` lists them.
    let help = Command::new(ringvm_bin())
        .args(["run", "--help"])
        .output()
        .expect("run ringvm");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for flag in ["  --vsock           a virtio-vsock device", "  --cid "] {
        assert!(
            text.contains(flag),
            "{flag} is not in `ringvm run --help`:\n{text}"
        );
    }
}
