//! virtio-pci devices backed by vhost-user processes, through the real `ringvm` binary and
//! the test guest's drivers (guest/test/pci.c, virtio*.c): ringvm's own rng device process
//! (jailed and not), `ringvm device rng --socket` under ringvm's frontend, an independent
//! backend (qemu-storage-daemon's vhost-user-blk), and backends that die or misbehave.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::{
    children_of, process_exists, ringvm_bin, ringvm_run, run_guest, wait_until, GuestCmdline,
    GuestRun, Live, Scratch,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn rng_device_process_feeds_the_guest_in_its_sandbox() {
    let cmdline = GuestCmdline::new().test("pci").test("virtio-rng");
    let run = run_guest(&mut ringvm_run(&[], &cmdline), LIMIT).expect("run ringvm");
    run.assert_clean();
    let report = run.report();
    report.assert_ok(&["pci", "virtio-rng"]);
    assert!(
        report
            .details("pci")
            .iter()
            .any(|l| l.contains("1af4:1044")),
        "no virtio-rng on the bus: {:?}",
        report.details("pci")
    );
    assert!(
        report
            .value("virtio-rng", "interrupts")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n > 0),
        "no MSI-X interrupts: {:?}",
        report.details("virtio-rng")
    );
}

#[test]
fn rng_device_process_works_without_the_sandbox() {
    let cmdline = GuestCmdline::new().test("virtio-rng");
    let run = run_guest(&mut ringvm_run(&["--disable-sandbox"], &cmdline), LIMIT).expect("run");
    run.assert_clean();
    run.report().assert_ok(&["virtio-rng"]);
}

#[test]
fn no_rng_leaves_only_the_host_bridge() {
    let cmdline = GuestCmdline::new().test("pci");
    let run = run_guest(&mut ringvm_run(&["--no-rng"], &cmdline), LIMIT).expect("run");
    run.assert_clean();
    let report = run.report();
    report.assert_ok(&["pci"]);
    assert!(
        !report.details("pci").iter().any(|l| l.contains("1af4:")),
        "a virtio device is present: {:?}",
        report.details("pci")
    );
}

#[test]
fn standalone_rng_backend_serves_ringvm_over_a_socket() {
    let dir = Scratch::new("virtio", "standalone");
    let sock = dir.path("rng.sock");
    let mut backend = Command::new(ringvm_bin())
        .args(["device", "rng", "--socket"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm device rng");
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "the backend never listened"
    );
    let spec = format!("type=rng,socket={}", sock.display());
    let cmdline = GuestCmdline::new().test("pci").test("virtio-rng");
    let run = run_guest(
        &mut ringvm_run(&["--no-rng", "--vhost-user", &spec], &cmdline),
        LIMIT,
    )
    .expect("run");
    run.assert_clean();
    run.report().assert_ok(&["pci", "virtio-rng"]);
    // The frontend went away: the backend ends by itself, successfully.
    let ended = wait_until(Duration::from_secs(10), || {
        matches!(backend.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = backend.kill();
    }
    let status = backend.wait().expect("wait backend");
    let mut err = String::new();
    if let Some(mut e) = backend.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(ended && status.success(), "backend {status:?}: {err}");
}

#[test]
fn killed_device_process_ends_the_vm_with_its_name_and_leaves_no_orphan() {
    let cmdline = GuestCmdline::new().test("virtio-rng").test("wait");
    // Restarts off: the death ends the VM (tests/tests/self_heal.rs has the restarts).
    let mut live = Live::start(&mut ringvm_run(&["--device-restarts", "0"], &cmdline));
    live.wait_for("wait halting", LIMIT);
    let devices = children_of(live.child.id());
    assert_eq!(devices.len(), 1, "expected one device process: {devices:?}");
    let pid = devices[0];
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(!status.success(), "ringvm exited 0 after its device died");
    assert!(
        stderr.contains("device rng") && stderr.contains("signal 9"),
        "the failure does not name the device and the signal:\n{stderr}"
    );
    assert!(!process_exists(pid), "device process {pid} left behind");
}

#[test]
fn killed_vmm_takes_its_device_processes_with_it() {
    let cmdline = GuestCmdline::new().test("wait");
    let mut live = Live::start(&mut ringvm_run(&[], &cmdline));
    live.wait_for("wait halting", LIMIT);
    let devices = children_of(live.child.id());
    assert_eq!(devices.len(), 1, "expected one device process: {devices:?}");
    live.child.kill().expect("kill ringvm");
    let _ = live.child.wait();
    assert!(
        wait_until(Duration::from_secs(10), || !process_exists(devices[0])),
        "device process {} outlived the VMM",
        devices[0]
    );
}

#[test]
fn stop_on_the_control_socket_ends_vm_and_device_processes() {
    let dir = Scratch::new("virtio", "stop");
    let sock = dir.path("vm.sock");
    let cmdline = GuestCmdline::new().test("wait");
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut live = Live::start(&mut ringvm_run(&["-s", &sock_arg], &cmdline));
    live.wait_for("wait halting", LIMIT);
    let devices = children_of(live.child.id());
    assert_eq!(devices.len(), 1, "expected one device process: {devices:?}");
    let stop = Command::new(ringvm_bin())
        .arg("stop")
        .arg(&sock)
        .status()
        .expect("ringvm stop");
    assert!(stop.success());
    let (status, stderr) = live.finish(Duration::from_secs(20));
    assert!(status.success(), "ringvm {status:?}: {stderr}");
    assert!(!process_exists(devices[0]), "device process left behind");
}

/// A vhost-user "backend" that accepts one connection and runs `behave` on it.
fn fake_backend(
    path: &Path,
    behave: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind fake backend");
    std::thread::spawn(move || {
        if let Ok((conn, _)) = listener.accept() {
            behave(conn);
        }
    })
}

fn run_with_backend(sock: &Path) -> GuestRun {
    let spec = format!("type=rng,socket={}", sock.display());
    let cmdline = GuestCmdline::new().test("virtio-rng");
    run_guest(
        &mut ringvm_run(&["--no-rng", "--vhost-user", &spec], &cmdline),
        LIMIT,
    )
    .expect("run")
}

#[test]
fn backend_answering_garbage_is_reported_by_name() {
    let dir = Scratch::new("virtio", "garbage");
    let sock = dir.path("bad.sock");
    let t = fake_backend(&sock, |mut conn| {
        let mut header = [0u8; 12];
        // SET_OWNER, then GET_FEATURES: answer the second with a reply to request 99.
        for _ in 0..2 {
            if conn.read_exact(&mut header).is_err() {
                return;
            }
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&99u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&[0xff; 8]);
        let _ = conn.write_all(&reply);
        let _ = conn.read(&mut header);
    });
    let run = run_with_backend(&sock);
    let _ = t.join();
    assert_eq!(run.status.and_then(|s| s.code()), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("device rng") && run.stderr.contains("bad.sock"),
        "the error does not name the device:\n{}",
        run.stderr
    );
}

#[test]
fn backend_that_never_answers_times_out_instead_of_hanging() {
    let dir = Scratch::new("virtio", "silent");
    let sock = dir.path("silent.sock");
    let (tx, rx) = mpsc::channel::<()>();
    let t = fake_backend(&sock, move |conn| {
        // Hold the connection open and say nothing until the test is done.
        let _ = rx.recv_timeout(LIMIT);
        drop(conn);
    });
    let start = Instant::now();
    let run = run_with_backend(&sock);
    let _ = tx.send(());
    let _ = t.join();
    assert_eq!(run.status.and_then(|s| s.code()), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("device rng")
            && run.stderr.contains("no reply to GetFeatures within 10s"),
        "no timeout error naming the device:\n{}",
        run.stderr
    );
    assert!(start.elapsed() < Duration::from_secs(40));
}

#[test]
fn backend_whose_listener_never_accepts_times_out_instead_of_hanging() {
    let dir = Scratch::new("virtio", "backlog");
    let sock = dir.path("full.sock");
    // A listener with a backlog of 0 that one queued connection fills, and that never
    // accepts: a connect to it waits until the connect gives up.
    const FULL: &str = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0)\n\
        c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])\n\
        print('full', flush=True); time.sleep(120)\n";
    let mut listener = Command::new("python3")
        .args(["-c", FULL])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut ready = [0u8; 5];
    listener
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut ready)
        .expect("the listener's line");
    assert_eq!(&ready, b"full\n");
    let start = Instant::now();
    let run = run_with_backend(&sock);
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(run.status.and_then(|s| s.code()), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot connect") && run.stderr.contains("not accepted within 10 s"),
        "no timeout error naming the connect:\n{}",
        run.stderr
    );
    assert!(start.elapsed() < Duration::from_secs(40));
}

#[test]
fn guest_reads_and_writes_a_disk_exported_by_qemu_storage_daemon() {
    let dir = Scratch::new("virtio", "qsd");
    let img = dir.path("disk.img");
    let sock = dir.path("blk.sock");
    const SECTORS: u64 = 16384;
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SECTORS * 512))
        .expect("create image");
    let mut qsd = tests::start_qsd_blk(&img, &sock);
    let spec = format!("type=blk,socket={}", sock.display());
    let cmdline = GuestCmdline::new().test("pci").test("virtio-blk");
    let run = run_guest(
        &mut ringvm_run(&["--no-rng", "--vhost-user", &spec], &cmdline),
        LIMIT,
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
    let run = run.expect("run");
    run.assert_clean();
    let report = run.report();
    report.assert_ok(&["pci", "virtio-blk"]);
    assert!(
        report
            .details("virtio-blk")
            .iter()
            .any(|l| l.contains(&format!("capacity={SECTORS}"))),
        "{:?}",
        report.details("virtio-blk")
    );
    // The guest's last write (the last sector) reached the file: word i of sector s is
    // (s << 32 | i) ^ nonce, with the nonce recovered from word 0.
    let file = std::fs::File::open(&img).expect("open image");
    let mut sector = [0u8; 512];
    let last = SECTORS - 1;
    file.read_exact_at(&mut sector, last * 512)
        .expect("read last sector");
    let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let nonce = word(0) ^ (last << 32);
    for i in 0..64 {
        assert_eq!(
            word(i),
            (last << 32 | i as u64) ^ nonce,
            "word {i} of the last sector is not what the guest wrote"
        );
    }
}
