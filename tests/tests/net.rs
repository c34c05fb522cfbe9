//! virtio-net through the real binary: the test guest's driver (guest/test/virtio_net.c) talks
//! to a host-side peer over a tap served by a jailed `ringvm device net` process. Everything
//! runs inside a network namespace the test creates (needs root).

use std::process::Command;
use std::time::Duration;

use tests::netns::{NetNs, GUEST_IP, GUEST_MAC, UDP_PORT};
use tests::{ringvm_bin, run_guest, test_guest_path, GuestCmdline, GuestRun};

const LIMIT: Duration = Duration::from_secs(90);

fn ringvm_in(netns: &str, args: &[&str], cmdline: &GuestCmdline) -> GuestRun {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns])
        .arg(ringvm_bin())
        .arg("run")
        .args(args)
        .args(["-p", &cmdline.to_string()])
        .arg(test_guest_path());
    let run = run_guest(&mut c, LIMIT).expect("run ringvm");
    assert!(
        run.exited_cleanly(),
        "ringvm status {:?}\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    run
}

fn detail(run: &GuestRun, prefix: &str) -> String {
    run.report()
        .details("virtio-net")
        .into_iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", run.stdout))
        .to_string()
}

/// The device's counters line on stderr (printed when its queues stop).
fn counters(run: &GuestRun) -> String {
    run.stderr
        .lines()
        .find(|l| l.starts_with("ringvm device net: rx_packets="))
        .unwrap_or_else(|| panic!("no counters line:\n{}", run.stderr))
        .to_string()
}

/// `--tap-name` on a tap the namespace set up: ARP, ICMP, UDP with the checksum offloaded to
/// the host (NEEDS_CSUM on the wire, completed by the tap), and the host pinging the guest.
#[test]
fn guest_arp_icmp_udp_and_host_ping_over_a_named_tap() {
    let mut ns = NetNs::new("rvm-net");
    let host_mac = ns.tap_mac();
    let peer = ns.start_peer(3, 40);
    let cmdline = GuestCmdline::new()
        .test("virtio-net")
        .option("net.ip", GUEST_IP)
        .option("net.peer", "10.0.2.1")
        .option("net.udp", UDP_PORT)
        .option("net.csum", 1)
        .option("net.serve_ms", 3000);
    let name = ns.name.clone();
    let run = ringvm_in(&name, &["--no-rng", "--tap-name", "tap0"], &cmdline);
    drop(ns);
    let peer_out: Vec<String> = peer.iter().collect();
    run.report().assert_ok(&["virtio-net"]);
    let mac = detail(&run, "mac ");
    assert!(
        mac.starts_with(&format!("mac {GUEST_MAC} link up")),
        "{mac}"
    );
    assert!(mac.contains("mrg-rxbuf=1 csum=1 guest-csum=1"), "{mac}");
    assert_eq!(
        detail(&run, "arp peer"),
        format!("arp peer 10.0.2.1 is {host_mac}")
    );
    assert_eq!(detail(&run, "ping "), "ping 3/3");
    assert!(
        detail(&run, "udp echo").contains("offloaded: NEEDS_CSUM"),
        "{}",
        run.stdout
    );
    // The datagram the guest sent with a partial checksum reached the peer's UDP socket: the
    // kernel drops UDP with a bad checksum, so the offload was completed on the way.
    assert!(
        peer_out
            .iter()
            .any(|l| l.starts_with("udp-echo 10.0.2.15:") && l.contains("ringvm-udp-")),
        "the peer got no datagram: {peer_out:?}"
    );
    assert!(
        peer_out.iter().any(|l| l.starts_with("ping-reply")),
        "the guest answered no host ping: {peer_out:?}"
    );
    let c = counters(&run);
    assert!(
        c.contains("tx_dropped=0") && c.contains("tx_errors=0") && c.contains("rx_errors=0"),
        "{c}"
    );
    assert!(!c.contains("rx_packets=0 "), "{c}");
}

/// `--host-ip/--netmask/--mac`: ringvm creates the tap (multi-queue with 2 vCPUs) and
/// configures its host side; the guest resolves and pings that address.
#[test]
fn host_ip_creates_a_configured_multi_queue_tap() {
    let ns = NetNs::empty("rvm-hostip");
    let cmdline = GuestCmdline::new()
        .test("virtio-net")
        .option("net.ip", "10.0.3.15")
        .option("net.peer", "10.0.3.1");
    let name = ns.name.clone();
    let run = ringvm_in(
        &name,
        &[
            "--no-rng",
            "-c",
            "2",
            "--host-ip",
            "10.0.3.1",
            "--netmask",
            "255.255.255.0",
            "--mac",
            "52:54:00:aa:bb:cc",
        ],
        &cmdline,
    );
    run.report().assert_ok(&["virtio-net"]);
    assert!(
        detail(&run, "mac ").starts_with("mac 52:54:00:aa:bb:cc link up"),
        "{}",
        run.stdout
    );
    assert_eq!(detail(&run, "ping "), "ping 3/3");
    // Two vCPUs: two queue pairs (and the control queue) on the PCI function.
    assert!(
        detail(&run, "features ").contains("5 queues"),
        "{}",
        run.stdout
    );
}
