//! The test guest's PCI enumeration and virtio-pci drivers (guest/test/pci.c, virtio*.c) run
//! against QEMU's virtio-rng-pci, virtio-blk-pci and virtio-net-pci (modern only), so the guest
//! side is known to work before ringvm's own PCI devices are tested with it.
//!
//! Two QEMU machines cover the two paths the guest has:
//! - `microvm,pcie=on`: ECAM at 0xe000_0000, no firmware assigns BARs, so the guest assigns
//!   them itself in microvm's 32-bit window 0xc000_0000..0xe000_0000 (0.3 s per boot);
//! - `pc` (SeaBIOS): configuration mechanism #1 at 0xCF8 and firmware-assigned BARs, the
//!   layout ringvm provides (about 3 s per boot here, SeaBIOS is slow on kvm_pvm).
//!
//! virtio-net runs QEMU inside a network namespace of its own with a tap device there (no
//! traffic leaves it), against a Python peer in the same namespace that echoes UDP and pings
//! the guest. These tests need root (`ip netns`, `/dev/net/tun`).

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::netns::{NetNs, GUEST_IP, GUEST_MAC, HOST_IP, UDP_PORT};
use tests::{qemu_available, run_guest, test_guest_path, GuestCmdline, GuestReport, GuestRun};

const LIMIT: Duration = Duration::from_secs(60);

/// A sparse raw disk image in the temporary directory, removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(name: &str, bytes: u64) -> Self {
        let path = std::env::temp_dir().join(format!(
            "ringvm-virtio-guest-{}-{name}.img",
            std::process::id()
        ));
        File::create(&path)
            .and_then(|f| f.set_len(bytes))
            .expect("create the disk image");
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn qemu(machine: &str, devices: &[String], cmdline: &GuestCmdline) -> GuestRun {
    qemu_in(None, machine, devices, cmdline)
}

/// QEMU, inside network namespace `netns` if given (`ip netns exec`).
fn qemu_in(
    netns: Option<&str>,
    machine: &str,
    devices: &[String],
    cmdline: &GuestCmdline,
) -> GuestRun {
    assert!(qemu_available(), "qemu-system-x86_64 or /dev/kvm missing");
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    c.args(["-M", machine])
        .args(["-enable-kvm", "-cpu", "qemu64,-cx16,+xsaveerptr"])
        .args(["-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(test_guest_path())
        .args(["-append", &cmdline.to_string()]);
    if machine.starts_with("microvm") {
        c.args(["-device", "i8042"]);
    }
    for d in devices {
        c.arg(d);
    }
    let run = run_guest(&mut c, LIMIT).expect("run qemu");
    assert!(
        run.exited_cleanly(),
        "status {:?}\n{}\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    run
}

fn devices(disk: &Disk, drive_opts: &str, blk_opts: &str) -> Vec<String> {
    [
        "-device".to_owned(),
        "virtio-rng-pci,disable-legacy=on".to_owned(),
        "-drive".to_owned(),
        format!(
            "if=none,id=d0,format=raw,file={}{drive_opts}",
            disk.0.display()
        ),
        "-device".to_owned(),
        format!("virtio-blk-pci,drive=d0,disable-legacy=on{blk_opts}"),
    ]
    .into()
}

const MICROVM_PCIE: &str = "microvm,x-option-roms=off,rtc=on,pcie=on";

fn microvm_cmdline() -> GuestCmdline {
    GuestCmdline::new()
        .option("pci.ecam", "0xe0000000")
        .option("pci.mmio", "0xc0000000-0xe0000000")
}

fn detail<'a>(r: &'a GuestReport, name: &str, prefix: &str) -> &'a str {
    r.details(name)
        .into_iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{name} {prefix}...` line:\n{}", r.raw))
}

#[test]
fn ecam_self_assigned_bars_rng_and_blk_with_msix() {
    let disk = Disk::new("rw", 8 << 20);
    let cmdline = microvm_cmdline()
        .test("pci")
        .test("virtio-rng")
        .test("virtio-blk")
        .option("blk.expect", "rw")
        .option("blk.id", "ringvm-test");
    let run = qemu(
        MICROVM_PCIE,
        &devices(&disk, "", ",serial=ringvm-test"),
        &cmdline,
    );
    let r = run.report();
    r.assert_ok(&["pci", "virtio-rng", "virtio-blk"]);
    // The host bridge and both virtio functions, modern ids.
    assert!(r.details("pci").iter().any(|l| l.contains("1af4:1044")));
    assert!(r.details("pci").iter().any(|l| l.contains("1af4:1042")));
    // No firmware assigned the BARs here: the guest did.
    assert!(detail(&r, "virtio-rng", "assigned bar").contains("0xc0"));
    assert_eq!(r.value("virtio-rng", "bytes"), Some("512"));
    let irqs: u32 = r
        .value("virtio-rng", "interrupts")
        .and_then(|v| v.parse().ok())
        .expect("interrupts=");
    assert!(irqs >= 3, "one MSI-X interrupt per notification at least");
    assert_eq!(r.value("virtio-blk", "capacity"), Some("16384"));
    assert_eq!(detail(&r, "virtio-blk", "id "), "id \"ringvm-test\"");
    for step in ["wrote and read back", "flush ok", "write-zeroes", "discard"] {
        assert!(
            r.details("virtio-blk").iter().any(|l| l.contains(step)),
            "{step}:\n{}",
            r.raw
        );
    }
}

#[test]
fn read_only_blk_and_polling_under_microvm() {
    let disk = Disk::new("ro", 1 << 20);
    let cmdline = microvm_cmdline()
        .test("virtio-rng")
        .test("virtio-blk")
        .option("rng.mode", "poll")
        .option("blk.mode", "spin")
        .option("blk.expect", "ro");
    let run = qemu(MICROVM_PCIE, &devices(&disk, ",readonly=on", ""), &cmdline);
    let r = run.report();
    r.assert_ok(&["virtio-rng", "virtio-blk"]);
    assert_eq!(r.value("virtio-rng", "interrupts"), Some("0"));
    assert!(detail(&r, "virtio-blk", "read-only ok").contains("IOERR"));
    assert_eq!(r.value("virtio-blk", "capacity"), Some("2048"));
}

/// The layout ringvm provides: 0xCF8 config access and BARs assigned before the guest runs.
/// With `pci.reassign=1` the guest then moves every BAR of the two devices, and the second
/// `pci` run must see them at their new addresses.
#[test]
fn cf8_firmware_bars_4k_blocks_and_reassignment_under_pc() {
    let disk = Disk::new("pc", 8 << 20);
    let cmdline = GuestCmdline::new()
        .test("pci")
        .test("virtio-rng")
        .test("virtio-blk")
        .option("blk.sector", 100);
    let blk = ",logical_block_size=4096,physical_block_size=4096";
    let run = qemu("pc", &devices(&disk, "", blk), &cmdline);
    let r = run.report();
    r.assert_ok(&["pci", "virtio-rng", "virtio-blk"]);
    assert!(detail(&r, "pci", "bus 0 via cf8").ends_with("functions"));
    assert!(!r.raw.contains("assigned bar"), "SeaBIOS assigned them");
    assert_eq!(r.value("virtio-blk", "blk-size"), Some("4096"));

    let cmdline = cmdline.option("pci.reassign", 1).test("pci");
    let run = qemu("pc", &devices(&disk, "", ""), &cmdline);
    let r = run.report();
    r.assert_ok(&["pci", "virtio-rng", "virtio-blk"]);
    assert!(detail(&r, "virtio-blk", "assigned bar4").contains("0xc0"));
    let last_pci = r
        .lines
        .iter()
        .rev()
        .find(|l| l.contains("1af4:1042"))
        .expect("the second pci listing");
    assert!(last_pci.contains("mem64pf c0"), "{last_pci}");
}

// ---- virtio-net ----

fn net_device(props: &str) -> Vec<String> {
    vec![
        "-netdev".to_owned(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off".to_owned(),
        "-device".to_owned(),
        format!("virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC}{props}"),
    ]
}

fn net_cmdline(base: GuestCmdline) -> GuestCmdline {
    base.test("virtio-net")
        .option("net.ip", GUEST_IP)
        .option("net.peer", HOST_IP)
        .option("net.udp", UDP_PORT)
}

/// ARP, ping, UDP echo with the checksum offloaded (QEMU's tap has a vnet header, so the device
/// offers CSUM/GUEST_CSUM and MRG_RXBUF), MSI-X with hlt; the host pings the guest while it
/// serves for 3 s.
#[test]
fn net_arp_ping_udp_csum_offload_and_host_ping_under_microvm() {
    let mut ns = NetNs::new("net");
    let host_mac = ns.tap_mac();
    let peer = ns.start_peer(3, 30);
    let cmdline = net_cmdline(microvm_cmdline())
        .option("net.csum", 1)
        .option("net.serve_ms", 3000);
    let run = qemu_in(Some(&ns.name), MICROVM_PCIE, &net_device(""), &cmdline);
    drop(ns); // kills the peer, removes the namespace and the tap
    let peer_out: Vec<String> = peer.iter().collect(); // ends when the peer is gone
    let r = run.report();
    r.assert_ok(&["virtio-net"]);
    let mac = detail(&r, "virtio-net", "mac ");
    assert!(
        mac.starts_with(&format!("mac {GUEST_MAC} link up")),
        "{mac}"
    );
    assert!(mac.contains("mrg-rxbuf=1 csum=1 guest-csum=1"), "{mac}");
    assert_eq!(
        detail(&r, "virtio-net", "arp peer"),
        format!("arp peer {HOST_IP} is {host_mac}")
    );
    assert_eq!(detail(&r, "virtio-net", "ping "), "ping 3/3");
    let udp = detail(&r, "virtio-net", "udp echo");
    assert!(udp.contains("offloaded: NEEDS_CSUM"), "{udp}");
    assert!(
        peer_out
            .iter()
            .any(|l| l.starts_with("udp-echo 10.0.2.15:") && l.contains("ringvm-udp-")),
        "the peer echoed no datagram: {peer_out:?}"
    );
    // The host's pings were answered while the guest served (halted, woken by rx MSI-X).
    let replies = peer_out
        .iter()
        .filter(|l| l.starts_with("ping-reply"))
        .count();
    assert!(replies >= 1, "no ping replies: {peer_out:?}\n{}", r.raw);
    let served: u32 = r
        .value("virtio-net", "echo-replies")
        .and_then(|v| v.parse().ok())
        .expect("echo-replies=");
    assert!(
        served as usize >= replies,
        "served {served}, host saw {replies}"
    );
    let rx_irqs: u32 = r
        .value("virtio-net", "rx-irq")
        .and_then(|v| v.parse().ok())
        .expect("rx-irq=");
    assert!(rx_irqs >= 1, "no rx interrupt:\n{}", r.raw);
    assert_eq!(r.value("virtio-net", "bad"), Some("0"));
}

/// No offloads, no MRG_RXBUF, no STATUS, polling without MSI-X: the plain path.
#[test]
fn net_without_offloads_polling_under_microvm() {
    let mut ns = NetNs::new("net-poll");
    let _peer = ns.start_peer(0, 30);
    let cmdline = net_cmdline(microvm_cmdline()).option("net.mode", "poll");
    let props = ",csum=off,guest_csum=off,mrg_rxbuf=off,status=off";
    let run = qemu_in(Some(&ns.name), MICROVM_PCIE, &net_device(props), &cmdline);
    drop(ns);
    let r = run.report();
    r.assert_ok(&["virtio-net"]);
    let mac = detail(&r, "virtio-net", "mac ");
    assert!(mac.contains("mrg-rxbuf=0 csum=0 guest-csum=0"), "{mac}");
    assert_eq!(detail(&r, "virtio-net", "ping "), "ping 3/3");
    assert!(detail(&r, "virtio-net", "udp echo").contains("in software"));
    assert_eq!(r.value("virtio-net", "interrupts"), Some("0"));
}

/// Two queue pairs on QEMU's virtio-net (`mq=on`, a multi-queue tap): the reference for the
/// guest's MQ driver (`ringvm.net.pairs=2`: MQ and CTRL_VQ, the control queue,
/// VQ_PAIRS_SET), which tests/tests/self_heal_net.rs runs under ringvm. A short stream goes
/// out on both pairs; each pair's echoes come back on its own receive queue (the tap steers
/// a flow's replies to the queue it came from) and fill all its buffers at the end.
#[test]
fn net_two_queue_pairs_under_microvm() {
    let mut ns = NetNs::multi_queue("net-mq");
    let _peer = ns.start_peer(0, 30);
    let cmdline = net_cmdline(microvm_cmdline())
        .option("net.pairs", 2)
        .option("net.stream_ms", 1000)
        .option("net.mode", "spin");
    let mut devices = net_device(",mq=on,vectors=6");
    devices[1].push_str(",queues=2");
    let run = qemu_in(Some(&ns.name), MICROVM_PCIE, &devices, &cmdline);
    drop(ns);
    let r = run.report();
    r.assert_ok(&["virtio-net"]);
    detail(&r, "virtio-net", "queue pairs 2 of 2 enabled");
    for k in 0..2 {
        detail(
            &r,
            "virtio-net",
            &format!("pair {k} rx buffers 8 of 8 filled"),
        );
        let stats = detail(&r, "virtio-net", &format!("pair {k} rx="));
        let echoed = stats
            .split_whitespace()
            .find_map(|w| w.strip_prefix("stream-echoed="))
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no stream-echoed= in {stats:?}"));
        assert!(echoed > 0, "pair {k}: {stats}");
    }
}
