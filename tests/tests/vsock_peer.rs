//! ringvm's vhost-user frontend against rust-vmm's `vhost-device-vsock` (installed by
//! `scripts/setup`), a vsock backend ringvm did not write, through real processes: the
//! frontend connects the way the VMM does for `--vhost-user type=vsock,socket=PATH`, a mock
//! guest driver runs the same protocol checks as `tests/vsock.rs` runs on ringvm's own device,
//! and `ringvm run` puts the device on a real guest's PCI bus.
//!
//! Where the two devices differ: `vhost-device-vsock` answers a host `CONNECT <port>` with
//! `OK <guest port>\n` where ringvm (like Firecracker and Cloud Hypervisor) answers with the
//! host-side port the connection got; it offers neither `RESET_DEVICE` (so a reset is
//! `GET_VRING_BASE` alone) nor anything ringvm's frontend does not speak; it returns used
//! descriptors from another thread, after their data went out; and a host stream that closes
//! while its rings are stopped ends its data path (see the restart below).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use executor::Executor;
use tests::{wait_until, Scratch};
use virtio::vhost_user::{
    Connection, Frontend, PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK,
};
use virtio::DeviceType;
use vsock::packet::Op;
use vsock::testing::{host_read, hybrid_vsock_exchange, send_when_room, Guest, TIMEOUT};

const CID: u64 = 42;
/// VIRTIO_F_VERSION_1: a modern device.
const VERSION_1: u64 = 1 << 32;

/// `vhost-device-vsock`: on PATH, else where `cargo install` puts it.
fn vhost_device_vsock() -> PathBuf {
    vsock::testing::vhost_device_vsock()
        .unwrap_or_else(|| panic!("vhost-device-vsock is not installed: run scripts/setup"))
}

/// A `vhost-device-vsock` process, killed on drop. It serves one frontend at a time and
/// listens again after each, so it never ends by itself.
struct Peer {
    child: Child,
    sock: PathBuf,
    uds: PathBuf,
}

impl Peer {
    fn start(dir: &Scratch, cid: u64) -> Peer {
        let sock = dir.path("vhost.sock");
        let uds = dir.path("vsock.sock");
        let child = Command::new(vhost_device_vsock())
            .arg("--vm")
            .arg(format!(
                "guest-cid={cid},socket={},uds-path={}",
                sock.display(),
                uds.display()
            ))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vhost-device-vsock");
        let mut peer = Peer { child, sock, uds };
        assert!(
            wait_until(Duration::from_secs(10), || peer.sock.exists()
                && peer.uds.exists()),
            "vhost-device-vsock never listened"
        );
        assert!(
            matches!(peer.child.try_wait(), Ok(None)),
            "vhost-device-vsock ended"
        );
        peer
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects as the VMM does (`vmm::devices::vhost_user::connect`): SET_OWNER, features,
/// protocol features, the queue count (MQ) and the whole config space.
async fn connect(sock: &Path) -> (Frontend, usize, Vec<u8>) {
    let conn = executor::connect_unix(sock)
        .await
        .expect("connect to vhost-device-vsock");
    let fe = Frontend::connect(Connection::new(conn), TIMEOUT)
        .await
        .expect("vhost-user set-up");
    let queues = match fe.queue_num() {
        Some(n) => n as usize,
        None => DeviceType::Vsock.default_queues(),
    };
    let config = fe
        .get_config(0, DeviceType::Vsock.config_size())
        .await
        .expect("GET_CONFIG");
    (fe, queues, config)
}

#[test]
fn ringvm_frontend_drives_vhost_device_vsock() {
    let dir = Scratch::new("vsock-peer", "frontend");
    let peer = Peer::start(&dir, CID);
    let ex = Executor::new().expect("executor");
    let mut guest = Guest::new(CID);
    ex.run_until(async {
        let (fe, queues, config) = connect(&peer.sock).await;
        // What the transport would present: three queues (from GET_QUEUE_NUM, as ringvm's
        // own default), the CID in config space, a modern device; the protocol features
        // are the ones both sides speak.
        assert_eq!(queues, 3);
        assert_eq!(queues, DeviceType::Vsock.default_queues());
        assert_eq!(config, CID.to_le_bytes());
        assert_ne!(fe.features() & VERSION_1, 0, "{:#x}", fe.features());
        assert_eq!(
            fe.protocol_features(),
            (1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK) | (1 << PROTOCOL_F_CONFIG),
        );
        // Out of range: an empty reply, which the frontend turns into an error.
        assert!(fe.get_config(4, 8).await.is_err());
        fe.start(fe.features(), &guest.mem, &guest.vrings())
            .await
            .expect("start");

        let mut host = hybrid_vsock_exchange(&mut guest, &peer.uds).await;
        // vhost-device-vsock's OK line names the guest port (ringvm's and Firecracker's
        // name the host-side port).
        assert_eq!(host.ok_port, host.guest_port);
        assert_ne!(host.host_port, host.guest_port);

        // Garbage from a host client ends only that client.
        let mut bad = UnixStream::connect(&peer.uds).expect("connect to PATH");
        bad.write_all(b"HELLO\n").expect("write");
        let mut b = [0u8; 8];
        bad.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        assert_eq!(bad.read(&mut b).expect("closed, not an error"), 0);
        send_when_room(&mut guest, host.guest_port, host.host_port, Op::Rw, b"pong").await;
        assert_eq!(host_read(&mut host.client, 4).await, b"pong");
        // The device has taken and returned everything the guest sent: wait for the used
        // ring of tx to catch up, then stop the rings as the VMM does on a reset.
        let sent = guest.queues[1].avail_idx();
        let deadline = Instant::now() + TIMEOUT;
        while guest.queues[1].used_idx().expect("used idx") != sent {
            assert!(Instant::now() < deadline, "tx never caught up");
            executor::sleep(Duration::from_millis(1))
                .await
                .expect("sleep");
        }
        // GET_VRING_BASE: tx stopped after all the guest sent, the event queue untouched,
        // and every rx buffer the device took comes back in the used ring (it adds used
        // entries from another thread, so that may follow the reply).
        let bases = fe.stop(&[0, 1, 2]).await.expect("GET_VRING_BASE");
        assert_eq!(bases[1..], [sent, 0]);
        let deadline = Instant::now() + TIMEOUT;
        while guest.queues[0].used_idx().expect("used idx") != bases[0] {
            assert!(
                Instant::now() < deadline,
                "rx stopped at {} but the used ring is at {}",
                bases[0],
                guest.queues[0].used_idx().expect("used idx")
            );
            executor::sleep(Duration::from_millis(1))
                .await
                .expect("sleep");
        }
        fe.reset().await.expect("reset (nothing to send)");
        // Kept open until the rings run again: vhost-device-vsock 0.3.0 loses its data path
        // for good when a host stream closes while its rings are stopped (the event runs its
        // tx loop on a ring that is not ready, the error ends its `vring_worker` thread, and
        // its control plane goes on answering).
        let first = host;

        // The driver starts again, as after a driver reload: the VMM's next activation on
        // the same connection (SET_FEATURES, a new SET_MEM_TABLE, rings from base 0) gets a
        // working device again.
        let mut again = Guest::new(CID);
        fe.start(fe.features(), &again.mem, &again.vrings())
            .await
            .expect("start again");
        let mut host = hybrid_vsock_exchange(&mut again, &peer.uds).await;
        assert_eq!(host.ok_port, host.guest_port);
        send_when_room(
            &mut again,
            host.guest_port,
            host.host_port,
            Op::Rw,
            b"again",
        )
        .await;
        assert_eq!(host_read(&mut host.client, 5).await, b"again");
        drop(first);
        drop(fe);
    });
    drop(guest);

    // The frontend went away: vhost-device-vsock serves the next one.
    assert_serves_again(&peer, CID);
}

/// The peer is still running and a new frontend gets its set-up and config: the last one
/// left it in a state it recovers from.
fn assert_serves_again(peer: &Peer, cid: u64) {
    let ex = Executor::new().expect("executor");
    let deadline = Instant::now() + Duration::from_secs(10);
    ex.run_until(async {
        loop {
            // It listens again once it has torn the last connection down.
            if peer.sock.exists() {
                if let Ok(conn) = executor::connect_unix(&peer.sock).await {
                    let fe = Frontend::connect(Connection::new(conn), TIMEOUT)
                        .await
                        .expect("vhost-user set-up again");
                    let config = fe.get_config(0, 8).await.expect("GET_CONFIG again");
                    assert_eq!(config, cid.to_le_bytes());
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "vhost-device-vsock stopped serving"
            );
            executor::sleep(Duration::from_millis(10))
                .await
                .expect("sleep");
        }
    });
}

#[test]
fn ringvm_run_with_vhost_device_vsock_puts_it_on_the_bus() {
    let dir = Scratch::new("vsock-peer", "run");
    let peer = Peer::start(&dir, 7);
    let spec = format!("type=vsock,socket={}", peer.sock.display());
    let vm = tests::StoppableVm::start(&dir, &["--no-rng", "--vhost-user", &spec]);
    vm.assert_on_bus("1af4:1053", "virtio-vsock");
    vm.stop(Duration::from_secs(20));
    // The VMM left the backend as a VMM should: ready for the next VM.
    assert_serves_again(&peer, 7);
}

#[test]
fn ringvm_run_ends_naming_vhost_device_vsock_when_it_dies() {
    use tests::{ringvm_run, GuestCmdline, Live};
    let dir = Scratch::new("vsock-peer", "dies");
    let mut peer = Peer::start(&dir, 9);
    let spec = format!("type=vsock,socket={}", peer.sock.display());
    let cmdline = GuestCmdline::new().test("pci").test("wait");
    let mut live = Live::start(&mut ringvm_run(
        &["--device-restarts", "0", "--no-rng", "--vhost-user", &spec],
        &cmdline,
    ));
    live.wait_for("wait halting", Duration::from_secs(60));
    peer.child.kill().expect("kill vhost-device-vsock");
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("device vsock ({})", peer.sock.display()))
            && stderr.contains("hung up"),
        "no line naming the backend:\n{stderr}"
    );
}
