//! A model of two connections under random traffic from both ends, queue restarts, host
//! closes and guest resets: the device must keep every byte of an open connection, in
//! order, and give back every chain it held.

use super::*;

/// Byte `i` of the stream of connection `c` in direction `dir` (distinct per connection and
/// direction, so bytes that cross over show).
fn stream_byte(c: usize, dir: usize, i: usize) -> u8 {
    ((i + 31 * c + 101 * dir) % 251) as u8
}

fn stream(c: usize, dir: usize, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| stream_byte(c, dir, i)).collect()
}

/// One connection of the random model: what each side sent and saw.
struct Model {
    port: u32,
    /// The host's end; `None` once the host closed it.
    host: Option<UnixStream>,
    /// The guest sent an RST, or got one.
    reset: bool,
    /// The host's stream saw end-of-file (after a guest RST).
    host_eof: bool,
    /// Guest to host: bytes the guest sent, bytes the host read, the device's `fwd_cnt`.
    up_sent: usize,
    up_read: usize,
    fwd_cnt: u32,
    /// Host to guest: bytes the host wrote, bytes the guest received.
    down_sent: usize,
    down_got: usize,
}

impl Model {
    /// Neither side ended the connection.
    fn open(&self) -> bool {
        self.host.is_some() && !self.reset
    }
}

/// What the random test does next.
#[derive(Debug, Clone)]
enum Step {
    /// The guest sends `len` bytes (cut to its credit) on a connection, in one buffer or
    /// with the header apart.
    Send {
        conn: usize,
        len: usize,
        apart: bool,
    },
    /// The host reads up to `max` bytes.
    HostRead { conn: usize, max: usize },
    /// The host writes `len` bytes (what its socket takes).
    HostWrite { conn: usize, len: usize },
    /// The guest asks for the device's credit.
    CreditRequest { conn: usize },
    /// The host closes its end.
    HostClose { conn: usize },
    /// The guest resets the connection.
    GuestRst { conn: usize },
    /// The executor runs a little.
    Turn,
    /// The queues stop and start again where they were (a memory table change).
    Restart,
}

const MODEL_CONNS: usize = 2;
/// The host writes at most this much per connection: below the guest's `buf_alloc`, so the
/// guest never has to give credit back.
const MODEL_DOWN_MAX: usize = 512 << 10;

impl Guest {
    /// Takes the packets that came for the model's connections: data is checked and
    /// counted, credit noted; on an open connection anything else fails the test. A
    /// connection the host closed gets its SHUTDOWN or RST; the guest answers a SHUTDOWN
    /// with an RST, as Linux does.
    fn model_inbox(&mut self, conns: &mut [Model]) {
        while let Some((h, data)) = self.inbox.pop_front() {
            let Some((c, m)) = conns
                .iter_mut()
                .enumerate()
                .find(|(_, m)| m.port == h.dst_port)
            else {
                panic!("a packet for no connection of the model: {h:?}");
            };
            assert_eq!(h.src_port, 80);
            m.fwd_cnt = h.fwd_cnt;
            match h.op() {
                Some(Op::Rw) => {
                    assert!(
                        data == stream(c, 1, m.down_got, data.len()),
                        "host data reaches the guest in order"
                    );
                    m.down_got += data.len();
                    assert!(m.down_got <= m.down_sent, "more than the host wrote");
                }
                Some(Op::CreditUpdate) => {}
                Some(Op::Rst) if !m.open() => m.reset = true,
                Some(Op::Shutdown) if !m.open() => {
                    if !m.reset {
                        self.send(header(m.port, 80, Op::Rst), &[]);
                        m.reset = true;
                    }
                }
                other => panic!("open connection {c} got {other:?}: {h:?}"),
            }
        }
    }

    fn model_step(&mut self, conns: &mut [Model], step: &Step, buf_alloc: u32) {
        match *step {
            Step::Send { conn, len, apart } => {
                let m = &mut conns[conn];
                let in_flight = (m.up_sent as u32).wrapping_sub(m.fwd_cnt);
                let credit = buf_alloc.saturating_sub(in_flight) as usize;
                let len = len.min(credit);
                // A packet never waits for a free tx descriptor: the mock has 256.
                if len == 0 || m.reset || self.tx_out >= 200 {
                    return;
                }
                let mut hdr = header(m.port, 80, Op::Rw);
                hdr.len = len as u32;
                hdr.fwd_cnt = m.down_got as u32;
                let payload = stream(conn, 0, m.up_sent, len);
                let bufs = if apart {
                    vec![
                        MockBuf::Readable(hdr.encode().to_vec()),
                        MockBuf::Readable(payload),
                    ]
                } else {
                    vec![MockBuf::Readable([&hdr.encode()[..], &payload].concat())]
                };
                self.send_bufs(&bufs);
                m.up_sent += len;
            }
            Step::HostRead { conn, max } => {
                let m = &mut conns[conn];
                let Some(host) = m.host.as_mut() else {
                    return;
                };
                let mut buf = vec![0u8; max.max(1)];
                match host.read(&mut buf) {
                    Ok(0) => {
                        assert!(m.reset, "connection {conn}: the host stream ended");
                        m.host_eof = true;
                    }
                    Ok(n) => {
                        assert!(
                            buf[..n] == stream(conn, 0, m.up_read, n)[..],
                            "guest data reaches the host in order"
                        );
                        m.up_read += n;
                        assert!(m.up_read <= m.up_sent, "more than the guest sent");
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) if m.reset => m.host_eof = true,
                    Err(e) => panic!("connection {conn}: {e}"),
                }
            }
            Step::HostWrite { conn, len } => {
                let m = &mut conns[conn];
                let len = len.min(MODEL_DOWN_MAX - m.down_sent);
                let Some(host) = m.host.as_mut() else {
                    return;
                };
                if len == 0 || m.reset {
                    return;
                }
                match host.write(&stream(conn, 1, m.down_sent, len)) {
                    Ok(n) => m.down_sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("connection {conn}: {e}"),
                }
            }
            Step::CreditRequest { conn } => {
                if conns[conn].reset {
                    return;
                }
                let mut hdr = header(conns[conn].port, 80, Op::CreditRequest);
                hdr.fwd_cnt = conns[conn].down_got as u32;
                self.send(hdr, &[]);
            }
            Step::HostClose { conn } => conns[conn].host = None,
            Step::GuestRst { conn } => {
                if !conns[conn].reset {
                    self.send(header(conns[conn].port, 80, Op::Rst), &[]);
                    conns[conn].reset = true;
                }
            }
            Step::Turn => self.turn(),
            Step::Restart => self.restart(),
        }
        self.turn();
        self.model_inbox(conns);
        assert!(
            self.device.buffered() <= buf_alloc as usize * MODEL_CONNS,
            "the device buffers beyond the credit"
        );
    }
}

fn model_steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    use proptest::prelude::*;
    let conn = 0..MODEL_CONNS;
    let step = prop_oneof![
        12 => (
            conn.clone(),
            prop_oneof![1 => 1usize..64, 3 => 4096usize..=MAX_PACKET as usize],
            any::<bool>()
        )
            .prop_map(|(conn, len, apart)| Step::Send { conn, len, apart }),
        2 => (conn.clone(), prop_oneof![1usize..100, 1usize..300_000])
            .prop_map(|(conn, max)| Step::HostRead { conn, max }),
        4 => (conn.clone(), 1usize..100_000).prop_map(|(conn, len)| Step::HostWrite { conn, len }),
        2 => conn.clone().prop_map(|conn| Step::CreditRequest { conn }),
        1 => conn.clone().prop_map(|conn| Step::HostClose { conn }),
        1 => conn.prop_map(|conn| Step::GuestRst { conn }),
        2 => Just(Step::Turn),
        2 => Just(Step::Restart),
    ];
    prop::collection::vec(step, 1..120)
}

#[test]
fn random_traffic_keeps_both_streams_whole_and_in_order_and_every_chain_comes_back() {
    use proptest::prelude::any;
    use proptest::test_runner::{Config, TestRunner};

    // Steps the guest, the host and the queues take in any order: sends within the credit
    // (short ones copied, long ones held in guest memory while the host socket takes
    // them), host reads and writes of any size (a host that stops reading fills its
    // socket), credit requests, host closes, guest resets, and queue restarts (held data
    // moves into the device). The device must keep both directions of every open
    // connection whole and in order, end the others, never buffer beyond the credit, and
    // give every tx chain back.
    // Several times what a unix socket takes (about 200 KiB): a host that does not read
    // leaves the rest with the device, held or buffered.
    let buf_alloc = 1 << 20;
    // `PROPTEST_CASES` overrides the number of cases (2000 ran clean when this was written).
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    TestRunner::new(Config::with_cases(cases))
        .run(&(model_steps(), any::<bool>()), |(steps, rx_split)| {
            let mut g = Guest::with_buf_alloc(buf_alloc);
            if rx_split {
                g.split_rx();
            }
            let mut conns: Vec<Model> = (0..MODEL_CONNS)
                .map(|c| Model {
                    port: 5000 + c as u32,
                    host: Some(g.connect(5000 + c as u32, 80)),
                    reset: false,
                    host_eof: false,
                    up_sent: 0,
                    up_read: 0,
                    fwd_cnt: 0,
                    down_sent: 0,
                    down_got: 0,
                })
                .collect();
            for step in &steps {
                g.model_step(&mut conns, step, buf_alloc);
            }
            // The host reads everything and the guest receives everything the open
            // connections carry; the others end: the host sees end-of-file after a guest
            // RST, the guest gets an RST or SHUTDOWN after a host close.
            g.until("every connection whole or ended", |g| {
                for c in 0..MODEL_CONNS {
                    let max = 1 << 20;
                    g.model_step(&mut conns, &Step::HostRead { conn: c, max }, buf_alloc);
                }
                conns
                    .iter()
                    .all(|m| {
                        if m.open() {
                            m.up_read == m.up_sent && m.down_got == m.down_sent
                        } else if m.host.is_some() {
                            m.host_eof
                        } else {
                            m.reset
                        }
                    })
                    .then_some(())
            });
            g.until("every tx chain back", |g| (g.tx_out == 0).then_some(()));
            let open = conns.iter().filter(|m| m.open()).count();
            g.until("ended connections gone", |g| {
                (g.device.connections() == open).then_some(())
            });
            let stats = g.device.stats();
            assert_eq!(stats.credit_violations, 0);
            assert_eq!(stats.bad_packets, 0);
            Ok(())
        })
        .unwrap();
}
