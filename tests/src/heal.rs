//! Helpers of the self-healing tests (`tests/tests/self_heal*.rs`): random kill times, the
//! device process under a VMM, and a UDP stream through a tap across kills of the net process.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::{NetNs, GUEST_IP, HOST_IP, UDP_PORT};
use crate::{children_of, wait_until, GuestCmdline, GuestReport, Live};

/// How long the test guest may take to reach its loop.
pub const BOOT: Duration = Duration::from_secs(60);
/// How long it may take to finish after that.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A small xorshift, seeded from the clock (the seed is printed for a rerun).
pub struct Rand(u64);

impl Rand {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Rand {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("random seed {seed:#x}");
        Rand(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The VMM's one device process, waiting for it to be there (a restart may be under way;
/// the processes in `dead` were killed and may not be reaped yet).
pub fn device_of(vmm: u32, dead: &[u32]) -> u32 {
    let mut found = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            found = children_of(vmm);
            found.retain(|p| !dead.contains(p));
            found.len() == 1
        }),
        "no single device process under the VMM: {found:?}"
    );
    found[0]
}

pub fn kill(pid: u32, signal: &str) {
    // The device may be gone already (a restart under way): that kill just does nothing.
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// The test guest's virtio-net scenario streams numbered UDP datagrams (`net.stream_ms`) to
/// a peer in a network namespace of its own, which echoes them, on `pairs` queue pairs
/// (`ringvm run -c PAIRS` on a multi-queue tap, `ringvm.net.pairs`), while the net process is
/// killed `kills` times, 250-500 ms apart. The guest waits for every tx chain it posts to be
/// used (a leaked one fails it) and, at the end, checks that every rx buffer is still posted.
pub struct NetStreamKills {
    /// Names the namespace.
    pub tag: &'static str,
    pub pairs: u32,
    pub kills: usize,
    pub stream_ms: u64,
    /// `ringvm.net.mode`: how the guest waits (`hlt`, `spin`, `poll`).
    pub mode: &'static str,
}

/// What a [`NetStreamKills`] run saw.
pub struct NetStream {
    pub report: GuestReport,
    /// Datagrams the guest sent, and echoes it got back.
    pub sent: u64,
    pub echoed: u64,
    /// The sequence numbers that reached the peer, sorted, each once.
    pub at_host: Vec<u64>,
}

impl NetStreamKills {
    /// Runs it and checks what every such run must show: the guest's scenario passed, each
    /// kill was a restart, datagrams and echoes kept flowing to the end, at most half were
    /// lost. Prints the loss.
    pub fn run(&self) -> NetStream {
        let mut ns = if self.pairs > 1 {
            NetNs::multi_queue(self.tag)
        } else {
            NetNs::new(self.tag)
        };
        let peer = ns.start_peer(0, 60);
        let mut cmdline = GuestCmdline::new()
            .test("virtio-net")
            .option("net.ip", GUEST_IP)
            .option("net.peer", HOST_IP)
            .option("net.udp", UDP_PORT)
            .option("net.stream_ms", self.stream_ms)
            .option("net.mode", self.mode);
        if self.pairs > 1 {
            cmdline = cmdline.option("net.pairs", self.pairs);
        }
        let cpus = self.pairs.to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(crate::ringvm_bin())
            .args(crate::test_guest_args(
                &[
                    "--no-rng",
                    "-c",
                    &cpus,
                    "--tap-name",
                    "tap0",
                    "--device-restarts",
                    "100/60",
                ],
                &cmdline,
            ));
        let mut live = Live::start(&mut cmd);
        live.wait_for("virtio-net stream to", BOOT);
        let vmm = live.child.id();
        let mut rand = Rand::new();
        let mut killed = Vec::new();
        let mut kill_times = Vec::new();
        let t0 = Instant::now();
        while killed.len() < self.kills {
            std::thread::sleep(Duration::from_millis(250 + rand.below(250)));
            let device = device_of(vmm, &killed);
            kill(device, "KILL");
            kill_times.push(t0.elapsed());
            killed.push(device);
        }
        live.wait_for("ringvm-test: done", LIMIT);
        let seen = live.seen().to_string();
        let (status, stderr) = live.finish(Duration::from_secs(10));
        drop(ns);
        let report = GuestReport::parse(&seen);
        assert!(
            report.all_ok(&["virtio-net"]),
            "virtio-net failed:\n{seen}\nstderr:\n{stderr}"
        );
        assert!(status.success(), "{status:?}\n{stderr}");
        assert_eq!(
            stderr.matches("; restarting it (").count(),
            self.kills,
            "{stderr}"
        );
        let stream = report
            .details("virtio-net")
            .into_iter()
            .find(|l| l.starts_with("stream sent="))
            .unwrap_or_else(|| panic!("no stream line:\n{seen}"))
            .to_string();
        let number = |key: &str| -> u64 {
            stream
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {stream:?}"))
        };
        let (sent, echoed) = (number("sent="), number("echoed="));
        // What reached the host, by sequence number.
        let mut at_host: Vec<u64> = peer
            .try_iter()
            .filter_map(|l| {
                l.split("ringvm-stream-")
                    .nth(1)
                    .and_then(|n| n.trim().parse().ok())
            })
            .collect();
        at_host.sort_unstable();
        at_host.dedup();
        let got = at_host.len() as u64;
        eprintln!(
            "udp stream on {} pair(s): {sent} sent, {got} reached the host ({} lost), {echoed} \
             echoes back; kills at {kill_times:?}",
            self.pairs,
            sent.saturating_sub(got)
        );
        assert!(got > 0 && echoed > 0, "{stream}");
        // The stream went on after the last kill: the last datagrams reached the host.
        assert!(
            at_host.last().is_some_and(|&last| last + 5 >= sent),
            "the stream stopped reaching the host (last {:?} of {sent})",
            at_host.last()
        );
        assert!(
            got * 2 >= sent,
            "more than half the stream was lost: {got} of {sent}"
        );
        NetStream {
            report,
            sent,
            echoed,
            at_host,
        }
    }
}
