//! virtio-net through the real binary: the test guest's driver (guest/test/virtio_net.c) talks
//! to a host-side peer over a tap served by a jailed `ringvm device net` process. Everything
//! runs inside a network namespace the test creates (needs root).

use std::process::Command;
use std::time::Duration;

use tests::netns::{NetNs, GUEST_IP, GUEST_MAC, HOST_IP, UDP_PORT};
use tests::{ringvm_bin, run_guest, test_guest_args, GuestCmdline, GuestRun};

const LIMIT: Duration = Duration::from_secs(90);

fn ringvm_in(netns: &str, args: &[&str], cmdline: &GuestCmdline) -> GuestRun {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns])
        .arg(ringvm_bin())
        .args(test_guest_args(args, cmdline));
    let run = run_guest(&mut c, LIMIT).expect("run ringvm");
    run.assert_clean();
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
        .find(|l| l.starts_with("ringvm device net: info: rx_packets="))
        .unwrap_or_else(|| panic!("no counters line:\n{}", run.stderr))
        .to_string()
}

/// One number from the device's counters line.
fn counter(run: &GuestRun, key: &str) -> u64 {
    let line = counters(run);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
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

/// The malformed transmit chains the guest sends with `ringvm.net.bad=1`, in its order (see
/// guest/test/virtio_net.c): one byte over the largest frame, shorter than the header, shorter
/// than an Ethernet header, device-writable, a buffer outside guest RAM, an undefined GSO type,
/// a GSO type that was not negotiated, a checksum position past the end of the frame.
const MALFORMED: [&str; 8] = [
    "oversized",
    "short",
    "runt",
    "writable",
    "out-of-ram",
    "gso-type",
    "gso-feature",
    "csum-range",
];

/// Malformed frames from the guest, each alone and then all in one notification with a valid
/// datagram among them: every chain comes back, each is counted once in `tx_dropped` (none as
/// a tap error), none reaches the host, and the device goes on: a frame of exactly the largest
/// size, the batch's valid datagram and the UDP echo after them all go out.
#[test]
fn malformed_guest_frames_are_dropped_and_counted_while_the_device_goes_on() {
    let mut ns = NetNs::new("rvm-badtx");
    let peer = ns.start_peer(0, 40);
    let cmdline = GuestCmdline::new()
        .test("virtio-net")
        .option("net.ip", GUEST_IP)
        .option("net.peer", HOST_IP)
        .option("net.udp", UDP_PORT)
        .option("net.bad", 1);
    let name = ns.name.clone();
    let run = ringvm_in(&name, &["--no-rng", "--tap-name", "tap0"], &cmdline);
    drop(ns);
    let peer_out: Vec<String> = peer.iter().collect();
    let report = run.report();
    report.assert_ok(&["virtio-net"]);

    let returned: Vec<&str> = report
        .details("virtio-net")
        .into_iter()
        .filter_map(|l| l.strip_prefix("bad ")?.split_once(':').map(|(k, _)| k))
        .collect();
    assert_eq!(returned, MALFORMED, "{}", run.stdout);
    // 12-byte header + 65551-byte frame; the largest frame the device takes is 65550 bytes.
    assert_eq!(
        detail(&run, "bad oversized:"),
        "bad oversized: 65563 bytes in 2 buffers returned"
    );
    assert_eq!(
        detail(&run, "max-frame:"),
        "max-frame: 65562 bytes in 2 buffers returned"
    );
    assert_eq!(
        detail(&run, "batch:"),
        "batch: 8 malformed chains and 1 datagram in one notification returned"
    );
    assert!(
        detail(&run, "udp echo").starts_with("udp echo \"ringvm-udp-"),
        "{}",
        run.stdout
    );

    // Each malformed chain carries a datagram to the peer's echo port naming its case: none
    // arrived. The valid frames did, in the order the guest sent them, the last after every
    // malformed chain.
    assert!(
        !peer_out.iter().any(|l| l.contains("ringvm-bad-")),
        "a malformed frame reached the host: {peer_out:?}"
    );
    let arrived = |payload: &str| {
        peer_out
            .iter()
            .position(|l| l.starts_with(&format!("udp-echo {GUEST_IP}:")) && l.contains(payload))
            .unwrap_or_else(|| panic!("the peer got no {payload:?}: {peer_out:?}"))
    };
    let max = arrived("ringvm-max-frame");
    let batch = arrived("ringvm-batch-valid");
    let last = arrived("ringvm-udp-");
    assert!(max < batch && batch < last, "{peer_out:?}");

    let c = counters(&run);
    let malformed = 2 * MALFORMED.len() as u64;
    assert_eq!(counter(&run, "tx_dropped"), malformed, "{c}");
    assert_eq!(counter(&run, "tx_errors"), 0, "{c}");
    assert_eq!(counter(&run, "rx_errors"), 0, "{c}");
    // Every frame the guest counted as sent went out, and nothing else.
    let sent: u64 = report
        .value("virtio-net", "tx")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tx= in the stats line:\n{}", run.stdout));
    assert_eq!(counter(&run, "tx_packets"), sent, "{c}");
}
