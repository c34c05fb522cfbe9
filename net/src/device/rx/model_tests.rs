//! Random receive buffers, as any driver may post them, against a stream of datagrams of
//! random sizes from the host: with `MRG_RXBUF` every datagram must reach the guest whole and
//! in order, whatever plan each round of reads takes (plain reads, a read per chain, spills
//! across chains), across ring restarts.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::UdpSocket;
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use virtio::mock::MockBuf;
use virtio::vhost_user::VringConfig;

use super::super::testing::*;
use super::*;
use crate::hdr::VirtioNetHdr;
use crate::testing::*;

/// The largest UDP payload sent: a frame of 14 + 20 + 8 + 8900 bytes fits the tap's 9000 MTU.
const MAX_PAYLOAD: usize = 8900;
/// Receive room that takes the largest frame with its vnet header.
const ROOM: u64 = (VNET_HDR_SIZE + 14 + 20 + 8 + MAX_PAYLOAD) as u64;
/// The UDP port the guest's datagrams go to.
const PORT: u16 = 5600;

#[derive(Debug, Clone)]
enum Step {
    /// The driver posts chains of these buffer lengths (through indirect tables or not).
    Post {
        chains: Vec<Vec<u32>>,
        indirect: bool,
    },
    /// The host sends datagrams of these payload sizes.
    Send { sizes: Vec<usize> },
    /// The guest takes every datagram sent so far.
    Receive,
    /// The receive ring stops and starts again where it stopped.
    Restart,
    /// The device runs a while (20 ms) before the next step.
    Wait,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let len = prop_oneof![1 => 1u32..16, 4 => 16u32..2048, 2 => 2048u32..10_000];
    let chain = prop::collection::vec(len, 1..5);
    let step = prop_oneof![
        3 => (prop::collection::vec(chain, 1..6), any::<bool>())
            .prop_map(|(chains, indirect)| Step::Post { chains, indirect }),
        3 => prop::collection::vec(prop_oneof![0usize..64, 0usize..=MAX_PAYLOAD], 1..5)
            .prop_map(|sizes| Step::Send { sizes }),
        2 => Just(Step::Receive),
        1 => Just(Step::Restart),
        1 => Just(Step::Wait),
    ];
    prop::collection::vec(step, 1..25)
}

/// Datagram `n` of `len` bytes: its number, then a pattern that depends on it.
fn datagram(n: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| ((i as u32 * 7 + n) % 251) as u8).collect();
    let tag = n.to_le_bytes();
    let k = len.min(4);
    d[..k].copy_from_slice(&tag[..k]);
    d
}

/// Receive room the driver has posted and the device has not used.
fn posted_room(g: &Guest) -> u64 {
    g.rx.sent
        .values()
        .map(|c| c.writable.iter().map(|b| u64::from(b.len)).sum::<u64>())
        .sum()
}

/// Posts chains until the guest's posted receive room takes the largest frame: a frame
/// waits until the held chains take it (or the ring has no more).
fn ensure_room(g: &mut Guest) {
    while posted_room(g) < ROOM && g.rx.sent.len() < 240 {
        g.rx.add(&[MockBuf::Writable(1536)]);
    }
}

/// The next frame the device put in the guest's buffers, without its vnet header. Chains it
/// gave back empty (at a stop) are skipped, and the room they took is posted again.
async fn next_frame(g: &mut Guest) -> Vec<u8> {
    let (c, len) = loop {
        ensure_room(g);
        let (c, len) = g.rx.used().await;
        if len > 0 {
            break (c, len);
        }
    };
    let mut data = g.rx.driver.read_writable(&c).unwrap();
    data.truncate(len as usize);
    assert!(
        data.len() >= VNET_HDR_SIZE,
        "a frame's chain holds its header"
    );
    let hdr = VirtioNetHdr::from_bytes(data[..VNET_HDR_SIZE].try_into().unwrap());
    assert!(hdr.num_buffers >= 1);
    for _ in 1..hdr.num_buffers {
        let (c, len) = g.rx.used().await;
        assert!(len > 0, "a frame's later chain is not empty");
        let more = g.rx.driver.read_writable(&c).unwrap();
        data.extend_from_slice(&more[..len as usize]);
    }
    data.split_off(VNET_HDR_SIZE)
}

/// A datagram the host sent and the guest has not taken yet.
struct Pending {
    data: Vec<u8>,
    /// It was on its way at a stop.
    at_stop: bool,
}

/// The tag (first bytes) of a datagram.
fn tag(d: &[u8]) -> u32 {
    let mut t = [0u8; 4];
    let k = d.len().min(4);
    t[..k].copy_from_slice(&d[..k]);
    u32::from_le_bytes(t)
}

fn send(sock: &UdpSocket, pending: &mut VecDeque<Pending>, next: &mut u32, len: usize) {
    let data = datagram(*next, len);
    *next += 1;
    sock.send_to(&data, (GUEST_IP, PORT)).unwrap();
    pending.push_back(Pending {
        data,
        at_stop: false,
    });
}

/// Runs `steps`, then takes every datagram sent; returns the datagrams lost at stops.
async fn run_case(dev: &Rc<NetDevice>, sock: &UdpSocket, steps: &[Step]) -> Vec<u32> {
    let features = 1 << VIRTIO_NET_F_MRG_RXBUF;
    let mut g = Guest::start(dev.clone(), features).await;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next = 0;
    let mut lost = Vec::new();
    // A stop drops the frame the device had read but could not place yet (it waited for
    // more buffers; the device logs it): one datagram on its way at a stop may be lost.
    let mut losses_allowed = 0usize;
    for step in steps.iter().chain([Step::Receive].iter()) {
        match step {
            Step::Post { chains, indirect } => {
                for lens in chains {
                    if g.rx.sent.len() >= 200 {
                        break;
                    }
                    let bufs: Vec<MockBuf> = lens.iter().map(|&l| MockBuf::Writable(l)).collect();
                    if *indirect {
                        g.rx.add_indirect(&bufs);
                    } else {
                        g.rx.add(&bufs);
                    }
                }
            }
            Step::Send { sizes } => {
                for &len in sizes {
                    send(sock, &mut pending, &mut next, len);
                }
            }
            Step::Receive => {
                if pending.iter().any(|p| p.at_stop) {
                    // A datagram behind those shows whether one of them was lost.
                    send(sock, &mut pending, &mut next, 1);
                }
                while let Some(mut want) = pending.pop_front() {
                    let got = loop {
                        let frame = next_frame(&mut g).await;
                        let p = parse_ethernet(&frame);
                        if let Some((payload, _)) = udp_payload(&p, PORT) {
                            break payload;
                        }
                    };
                    assert!(
                        !lost.contains(&tag(&got)),
                        "datagram {} came after later ones (lost: {lost:?})",
                        tag(&got)
                    );
                    while got != want.data && want.at_stop && losses_allowed > 0 {
                        losses_allowed -= 1;
                        lost.push(tag(&want.data));
                        want = pending
                            .pop_front()
                            .expect("the last datagram is never lost");
                    }
                    if got != want.data {
                        let first = got.iter().zip(&want.data).position(|(a, b)| a != b);
                        panic!(
                            "datagram {} ({} bytes) came as {} bytes tagged {}, first difference at {first:?}",
                            tag(&want.data),
                            want.data.len(),
                            got.len(),
                            tag(&got)
                        );
                    }
                }
            }
            Step::Wait => executor::sleep(Duration::from_millis(20)).await.unwrap(),
            Step::Restart => {
                if !pending.is_empty() {
                    losses_allowed += 1;
                    for p in pending.iter_mut() {
                        p.at_stop = true;
                    }
                }
                let base = g.fe.stop(&[0]).await.unwrap()[0];
                let config = VringConfig {
                    base,
                    ..g.rx.config(0)
                };
                g.fe.start(BASE | features, &g.mem, &[config])
                    .await
                    .unwrap();
            }
        }
    }
    g.stop().await;
    lost
}

#[test]
fn random_receive_buffers_carry_every_datagram_whole_and_in_order() {
    // `PROPTEST_CASES` overrides the number of cases.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    TestRunner::new(Config::with_cases(cases))
        .run(&steps(), |steps| {
            run_steps(steps);
            Ok(())
        })
        .unwrap();
}

/// Runs `steps` on a device of its own, checks that the device counted each frame it dropped
/// at a stop, and returns the datagrams lost.
fn run_steps(steps: Vec<Step>) -> Vec<u32> {
    // In a network namespace of its own: nothing a failed case left in its tap reaches
    // another.
    in_netns(move || {
        let tap = host_tap("rvnet30");
        ip(&["link", "set", "dev", "rvnet30", "mtu", "9000"]);
        let dev = device(tap);
        let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
        let lost = run(run_case(&dev, &sock, &steps));
        let counters = dev.counters();
        assert_eq!(counters.rx_errors, lost.len() as u64, "{counters:?}");
        lost
    })
}

#[test]
fn a_stop_while_a_frame_waits_for_buffers_drops_that_frame_and_no_other() {
    // Three small frames fill the first chains; the fourth (938 bytes with its header) waits
    // in a 12-byte chain and the spill for more buffers when the ring stops; the fifth is
    // still in the tap. The stop drops the fourth (counted); the fifth arrives after the
    // restart. (The device used to read the fifth too, after the stop, and drop it.)
    let lost = run_steps(vec![
        Step::Send {
            sizes: vec![0, 0, 0],
        },
        Step::Post {
            chains: vec![vec![54]],
            indirect: false,
        },
        Step::Send {
            sizes: vec![884, 884],
        },
        Step::Post {
            chains: vec![vec![54], vec![54], vec![12]],
            indirect: false,
        },
        Step::Wait,
        Step::Restart,
    ]);
    assert_eq!(lost, vec![3]);
}

#[test]
fn a_restart_drops_only_the_frame_that_waited_at_the_stop() {
    // The second frame (2239 bytes with its header) waits in chains of 2238 bytes and the
    // spill when the ring stops; the third is read after the restart into the same chains
    // and waits too. The restart's new call fd (`SET_VRING_CALL` after the kick) must not
    // stop the ring again: the third arrives once buffers come. (A call fd swap used to
    // restart the ring, which dropped the third as well.)
    let lost = run_steps(vec![
        Step::Send {
            sizes: vec![0, 2185, 2185],
        },
        Step::Post {
            chains: vec![vec![68], vec![106, 1650, 482]],
            indirect: false,
        },
        Step::Wait,
        Step::Restart,
    ]);
    assert_eq!(lost, vec![1]);
}
