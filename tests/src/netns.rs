//! A network namespace with a tap device and a Python peer, for the virtio-net tests under
//! QEMU and ringvm: no traffic leaves the namespace. Needs root (`ip netns`, `/dev/net/tun`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;

pub const GUEST_IP: &str = "10.0.2.15";
pub const HOST_IP: &str = "10.0.2.1";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const UDP_PORT: u16 = 7777;

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

/// A network namespace with `tap0` (HOST_IP/24, up) in it; deleting the namespace on drop
/// removes the tap too. The peer process, if any, is killed first.
pub struct NetNs {
    pub name: String,
    peer: Option<Child>,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        NetNs::with_tap(tag, false)
    }

    /// The same with a multi-queue `tap0` (`ringvm run -c N` opens N queues of it).
    pub fn multi_queue(tag: &str) -> Self {
        NetNs::with_tap(tag, true)
    }

    fn with_tap(tag: &str, multi_queue: bool) -> Self {
        let name = format!("ringvm-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]); // a leftover of a killed run
        let out = ip(&["netns", "add", &name]).expect("run `ip` (iproute2)");
        assert!(
            out.status.success(),
            "ip netns add {name} (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name, peer: None };
        let n = ns.name.as_str();
        let addr = format!("{HOST_IP}/24");
        let mut tuntap = vec![
            "netns", "exec", n, "ip", "tuntap", "add", "tap0", "mode", "tap",
        ];
        if multi_queue {
            tuntap.push("multi_queue");
        }
        for args in [
            &["-n", n, "link", "set", "lo", "up"][..],
            &tuntap,
            &["-n", n, "addr", "add", &addr, "dev", "tap0"],
            &["-n", n, "link", "set", "tap0", "up"],
        ] {
            let out = ip(args).expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }

    /// A namespace with only loopback up (for a VMM that creates its own tap there).
    pub fn empty(tag: &str) -> Self {
        let name = format!("ringvm-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        let out = ip(&["netns", "add", &name]).expect("run `ip` (iproute2)");
        assert!(
            out.status.success(),
            "ip netns add {name} (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name, peer: None };
        let out = ip(&["-n", &ns.name, "link", "set", "lo", "up"]).expect("run ip");
        assert!(out.status.success());
        ns
    }

    /// The host side's MAC (tap0's address).
    pub fn tap_mac(&self) -> String {
        let out = ip(&["-n", &self.name, "-br", "link", "show", "tap0"]).expect("run ip");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .find(|w| w.len() == 17 && w.matches(':').count() == 5)
            .unwrap_or_else(|| panic!("no MAC in {text:?}"))
            .to_owned()
    }

    /// Starts PEER in the namespace; returns once it is listening, and a receiver of its
    /// further output lines.
    pub fn start_peer(&mut self, pings: u32, secs: u32) -> mpsc::Receiver<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", PEER])
            .args([
                UDP_PORT.to_string(),
                GUEST_IP.to_owned(),
                pings.to_string(),
                secs.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 in the namespace");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        self.peer = Some(child);
        let first = lines.next().and_then(Result::ok);
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "the Python peer did not start"
        );
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(mut p) = self.peer.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The host-side peer: echoes UDP datagrams on PORT, and sends ICMP echo requests to GUEST
/// every 100 ms until WANT distinct replies came back (printing `ping-reply seq=N` for each)
/// or SECS passed; it keeps echoing until SECS pass.
const PEER: &str = r#"
import os, socket, struct, sys, threading, time
port, guest, want, secs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop = time.time() + secs
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port))
u.settimeout(0.2)
def echo():
    while time.time() < stop:
        try:
            d, a = u.recvfrom(2048)
        except socket.timeout:
            continue
        print("udp-echo %s:%d %s" % (a[0], a[1], d.decode(errors="replace")), flush=True)
        u.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
ic = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ic.settimeout(0.05)
ident, seq, got = os.getpid() & 0xffff, 0, set()
print("ready", flush=True)
while want and time.time() < stop and len(got) < want:
    data = b"ringvm-host-ping-%d" % seq
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    try:
        ic.sendto(struct.pack("!BBHHH", 8, 0, csum(h + data), ident, seq) + data, (guest, 0))
    except OSError:
        pass
    seq += 1
    end = time.time() + 0.1
    while time.time() < end:
        try:
            d, a = ic.recvfrom(2048)
        except (socket.timeout, OSError):
            continue
        n = (d[0] & 15) * 4
        t, _, _, i, s = struct.unpack("!BBHHH", d[n:n + 8])
        if a[0] == guest and t == 0 and i == ident and csum(d[n:]) == 0 and d[n + 8:] == b"ringvm-host-ping-%d" % s and s not in got:
            got.add(s)
            print("ping-reply seq=%d" % s, flush=True)
print("pings sent=%d replies=%d" % (seq, len(got)), flush=True)
while time.time() < stop:
    time.sleep(0.2)
"#;
