//! Self-healing virtio-net with several queue pairs, through the real binary: `ringvm run -c 2`
//! on a multi-queue tap gives the NIC two pairs (VIRTIO_NET_F_MQ, a control queue), the test
//! guest enables both with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (`ringvm.net.pairs=2`) and streams
//! UDP on both while the net process is killed 10 times. A restarted process must take the
//! tap queues as its predecessor left them and keep the pairs the driver enabled (the guest
//! does not send the command again): frames in flight may be lost, as on a wire, but every
//! tx chain posted on either pair comes back used, and both pairs' rx queues keep their
//! buffers and go on receiving. The single-pair case is in self_heal.rs.

use tests::heal::NetStreamKills;

/// The `pair K ...` detail line of the guest's virtio-net scenario that starts with `what`.
fn pair_line<'a>(lines: &[&'a str], k: u32, what: &str) -> &'a str {
    let prefix = format!("pair {k} {what}");
    lines
        .iter()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
}

fn value(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

#[test]
fn udp_stream_on_two_queue_pairs_keeps_flowing_across_net_process_kills() {
    const PAIRS: u32 = 2;
    let run = NetStreamKills {
        tag: "rvm-heal-mq",
        pairs: PAIRS,
        kills: 10,
        stream_ms: 7000,
        // Spinning with interrupts on: ~100 datagrams a second rather than ~5 (`hlt` sleeps
        // until the watchdog when an MSI came while interrupts were off, see guest/test/README.md).
        mode: "spin",
    }
    .run();
    let lines = run.report.details("virtio-net");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("queue pairs 2 of 2 enabled")),
        "{lines:#?}"
    );
    for k in 0..PAIRS {
        // Every tx chain the guest posted on the pair was used.
        let stats = pair_line(&lines, k, "rx=");
        let tx_used = value(stats, "tx-used");
        let (used, avail) = tx_used.split_once('/').expect("used/avail");
        assert_eq!(used, avail, "pair {k}: tx chains never used: {stats}");
        // The pair carried the stream both ways, to the end: its datagrams reached the host
        // after the last kill, and the burst after the stream filled every rx buffer it had
        // posted (none lost by a dead process).
        let sent: u64 = value(stats, "stream-sent").parse().expect("a number");
        let echoed: u64 = value(stats, "stream-echoed").parse().expect("a number");
        assert!(sent > 0 && echoed > 0, "pair {k}: {stats}");
        pair_line(&lines, k, "rx buffers 8 of 8 filled");
        let mine: Vec<u64> = run
            .at_host
            .iter()
            .copied()
            .filter(|n| n % u64::from(PAIRS) == u64::from(k))
            .collect();
        assert!(
            mine.last()
                .is_some_and(|&last| last + 2 * u64::from(PAIRS) + 5 >= run.sent),
            "pair {k}: its datagrams stopped reaching the host (last {:?} of {})",
            mine.last(),
            run.sent
        );
        eprintln!(
            "pair {k}: {sent} sent, {} reached the host ({} lost), {echoed} echoes came on it",
            mine.len(),
            sent.saturating_sub(mine.len() as u64)
        );
    }
    eprintln!("echoes in all: {} of {}", run.echoed, run.sent);
}
