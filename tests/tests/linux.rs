//! Boots the minimal Linux guest (scripts/build-guest-kernel) with the real `ringvm` binary.
//!
//! The kernel command line and `--cpu-features` carry workarounds for CI's nested kvm_pvm
//! host (guest kernel code is emulated there; see guest/linux/README.md). They are test
//! set-up: ringvm's defaults assume nothing of them.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::NetNs;
use tests::{
    guest_kernel, ringvm_bin, run_guest, workspace_root, Live, Scratch, HOST_CPU_FEATURES,
    HOST_PARAMS,
};

#[test]
fn linux_boots_to_userspace_over_pvh_with_two_vcpus_and_exits_0() {
    let dir = guest_kernel();
    let params = format!("{HOST_PARAMS} quiet panic=-1 reboot=k");
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "-m", "128", "-c", "2", "-i"])
        .arg(dir.join("initrd.cpio"))
        .args(["-p", &params, "--cpu-features", HOST_CPU_FEATURES])
        .arg(dir.join("vmlinux"));
    let run = run_guest(&mut cmd, Duration::from_secs(240)).expect("run ringvm");
    eprintln!("booted and exited in {:?}", run.elapsed);
    assert!(
        run.stdout
            .contains("ringvm-guest: userspace up, kernel 6.1"),
        "no userspace line; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    // ringvm's default virtio-rng (a jailed device process over vhost-user, on virtio-pci
    // with MSI-X): Linux picked it as its hardware RNG and read from it.
    let hwrng = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("ringvm-guest: hwrng virtio_rng.0 "));
    assert!(
        hwrng.is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())),
        "Linux did not read 16 bytes from the virtio-rng device:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("2 cpu(s)"),
        "SMP did not come up:\n{}",
        run.stdout
    );
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
}

/// A root file system image made by `mkfs.ext4 -d` from busybox and the same /init.
fn root_image(dir: &std::path::Path) -> PathBuf {
    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).expect("create image tree");
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("symlink sh");
    std::fs::copy(workspace_root().join("guest/linux/init"), tree.join("init")).expect("copy init");
    std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755))
        .expect("make init executable");
    let img = dir.join("root.ext4");
    let _ = std::fs::remove_file(&img);
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M")
        .status()
        .expect("run mkfs.ext4 (apt package e2fsprogs)");
    assert!(mkfs.success(), "mkfs.ext4 failed");
    img
}

/// One Linux boot for the disk and the network (boots are slow on nested hosts): the root
/// file system is a read-only ext4 disk (`-r`), eth0 is a virtio-net NIC on a tap ringvm
/// creates (`--host-ip`), configured by the kernel from `ip=`, and the host pings it.
#[test]
fn linux_mounts_an_ext4_root_disk_with_dash_r_and_answers_ping_on_virtio_net() {
    let dir = guest_kernel();
    let scratch = Scratch::new("linux", "root");
    let img = root_image(&scratch.0);
    let before = std::fs::read(&img).expect("read image");
    let mut netns = NetNs::empty("linux");
    let params = format!(
        "{HOST_PARAMS} quiet panic=-1 reboot=k init=/init rootfstype=ext4 \
         ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off ringvm.wait=15"
    );
    let start = Instant::now();
    let limit = Duration::from_secs(300);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns.name])
        .arg(ringvm_bin())
        .args(["run", "-m", "128", "-c", "1", "-r"])
        .arg(&img)
        .args(["--host-ip", "10.0.2.1", "--netmask", "255.255.255.0"])
        .args(["-p", &params, "--cpu-features", HOST_CPU_FEATURES])
        .arg(dir.join("vmlinux"));
    let mut live = Live::start(&mut cmd);
    live.wait_for("ringvm-guest: waiting", limit);
    let seen = live.seen().to_owned();
    // The peer pings the guest (10.0.2.15) until 3 replies came back or 12 s passed.
    let peer = netns.start_peer(3, 12);
    let ping = peer
        .iter()
        .find(|l| l.starts_with("pings sent="))
        .unwrap_or_default();
    let (status, stderr) = live.finish(limit.saturating_sub(start.elapsed()));
    let after = std::fs::read(&img).expect("read image");
    assert!(
        seen.contains("ringvm-guest: root /dev/root ext4 ro"),
        "the root file system is not the read-only ext4 disk; stdout:\n{seen}\nstderr:\n{stderr}"
    );
    assert!(
        seen.contains("ringvm-guest: eth0 52:54:00:12:34:56 10.0.2.15 up"),
        "eth0 is not configured from ip=:\n{seen}"
    );
    let replies: u32 = ping
        .rsplit_once("replies=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0);
    assert!(
        replies >= 3,
        "the guest did not answer the host's pings: {ping:?}"
    );
    assert!(status.success(), "status {status:?}: {stderr}");
    assert!(before == after, "a read-only root disk changed");
}

/// One Linux boot for virtio-console and virtio-fs: the console is hvc0 alone (`--serial
/// type=virtio-console,console=true`: no 8250, ringvm adds console=hvc0), so every line of
/// /init reaches stdout through the console device process; and /init mounts the shared
/// directory (`--shared-dir PATH:TAG`, virtiofsd), prints the file the test wrote there and
/// writes one back.
#[test]
fn linux_on_hvc0_mounts_a_shared_dir_reads_the_hosts_file_and_writes_one_back() {
    let dir = guest_kernel();
    let scratch = Scratch::new("linux", "virtiofs");
    let share = scratch.path("share");
    std::fs::create_dir_all(&share).expect("create the shared directory");
    std::fs::write(share.join("from-host.txt"), "host says 0xfeed\n").expect("write file");
    let params = format!("{HOST_PARAMS} quiet panic=-1 reboot=k ringvm.virtiofs=hostshare");
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "-m", "128", "-i"])
        .arg(dir.join("initrd.cpio"))
        .args(["--serial", "type=virtio-console,console=true"])
        .arg("--shared-dir")
        .arg(format!("{}:hostshare", share.display()))
        .args(["-p", &params, "--cpu-features", HOST_CPU_FEATURES])
        .arg(dir.join("vmlinux"));
    let run = run_guest(&mut cmd, Duration::from_secs(480)).expect("run ringvm");
    eprintln!("booted and exited in {:?}", run.elapsed);
    let shown = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("ringvm-guest: userspace up, kernel 6.1"),
        "no userspace line on hvc0; {shown}"
    );
    assert!(
        run.stdout
            .contains("ringvm-guest: virtiofs hostshare read 'host says 0xfeed'"),
        "the guest did not read the host's file; {shown}"
    );
    assert!(
        run.stdout
            .contains("ringvm-guest: virtiofs hostshare wrote from-guest.txt"),
        "the guest did not write its file; {shown}"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).ok(),
        Some("written by the guest on hostshare\n".to_owned()),
        "{shown}"
    );
    assert!(run.exited_cleanly(), "status {:?}; {shown}", run.status);
}

/// virtio-vsock with Linux's own driver (CONFIG_VIRTIO_VSOCKETS) through `ringvm run --vsock`:
/// the initramfs's static `vsock-hello` connects to the host (CID 2) on a port, which the
/// hybrid-vsock convention routes to the listener at `PATH_<port>`; it sends a line, and
/// prints the line the host answers on the same stream.
#[test]
fn linux_guest_connects_to_a_host_listener_over_virtio_vsock() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    const PORT: u32 = 5123;
    let dir = guest_kernel();
    let scratch = Scratch::new("linux", "vsock");
    let uds = scratch.path("vsock.sock");
    let listener = UnixListener::bind(scratch.path(&format!("vsock.sock_{PORT}")))
        .expect("listen on PATH_PORT");
    let host = std::thread::spawn(move || -> std::io::Result<String> {
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(b"hello from the host\n")?;
        Ok(line)
    });
    let params = format!("{HOST_PARAMS} quiet panic=-1 reboot=k ringvm.vsock={PORT}");
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "-m", "128", "-c", "1", "-i"])
        .arg(dir.join("initrd.cpio"))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .args(["-p", &params, "--cpu-features", HOST_CPU_FEATURES])
        .arg(dir.join("vmlinux"));
    let run = run_guest(&mut cmd, Duration::from_secs(240)).expect("run ringvm");
    eprintln!(
        "booted, said hello over vsock and exited in {:?}",
        run.elapsed
    );
    assert!(
        host.is_finished(),
        "the guest never connected to PATH_{PORT}; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let line = host.join().expect("host thread").expect("host side");
    assert_eq!(line, format!("hello from the guest to port {PORT}\n"));
    assert!(
        run.stdout
            .contains("ringvm-guest: vsock reply hello from the host"),
        "the guest did not read the host's answer; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
}
