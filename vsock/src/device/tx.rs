//! The tx queue: packets from the guest, each checked and acted on at once, so one
//! connection never holds up the queue for the others. A chain goes back straight away,
//! except a data packet held to be sent to the host straight from guest memory (`held`):
//! its chain goes back once its bytes are sent, or when the hold ends.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;

use memory::GuestMemory;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use super::conn::{Conn, Key, State, Violation, GATHER_BELOW};
use super::held::HeldSet;
use super::{Entry, Shared, Slot, MAX_PACKET, TX};
use crate::broker::Frame;
use crate::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};

/// The capacity of a buffer that short packets are gathered into.
const SHARED_BUF: usize = 4 * GATHER_BELOW;

/// What became of a guest packet.
enum Outcome {
    /// Acted on: its chain goes back now.
    Done,
    /// Held, to be sent from guest memory: its chain goes back later.
    Held,
}

/// What the tx task woke for.
enum Event {
    Chain(virtio::Result<DescriptorChain>),
    /// A host socket with held data became writable.
    Writable,
    /// A connection was reset or removed.
    Changed,
    Stop,
}

/// Runs the tx queue until `stop` fires.
pub(super) async fn run(shared: Rc<Shared>, queue: Rc<AsyncQueue>, stop: StopSignal) {
    shared.start_channel();
    let max_held = usize::from(queue.with_queue(|q| q.size())) / 2;
    let mut held = HeldSet::new(max_held);
    let result = serve(&shared, &queue, &stop, &mut held).await;
    match result {
        Ok(()) => {
            held.unhold_all(&shared, Some(&queue));
            // The guest hears of the chains given back; a queue that fails now is stopping.
            let _ = queue.signal_used();
        }
        Err(e) => {
            // The queue cannot go on (its rings became inaccessible): the held data goes to
            // the connections' buffers, and the task waits to be stopped.
            eprintln!("ringvm device vsock: tx queue stopped: {e}");
            held.unhold_all(&shared, None);
            stop.await;
        }
    }
    shared.errors.flush();
}

/// Serves the queue until `stop` fires (`Ok`) or the queue fails.
async fn serve(
    shared: &Rc<Shared>,
    queue: &AsyncQueue,
    stop: &StopSignal,
    held: &mut HeldSet,
) -> virtio::Result<()> {
    let mem = queue.memory();
    loop {
        let event = {
            let mut next = pin!(queue.next_valid_chain(|head, reason| {
                shared.count(|s| s.bad_chains += 1);
                virtio::stats::stats().error(1);
                shared
                    .errors
                    .log(format_args!("tx: invalid chain at head {head}: {reason}"));
            }));
            let mut writable = pin!(held.writable());
            let mut changed = pin!(shared.tx_wake.wait());
            let mut stop = stop.clone();
            poll_fn(|cx| {
                if let Poll::Ready(chain) = next.as_mut().poll(cx) {
                    return Poll::Ready(Event::Chain(chain));
                }
                if writable.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Writable);
                }
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Changed);
                }
                Pin::new(&mut stop).poll(cx).map(|()| Event::Stop)
            })
            .await
        };
        match event {
            Event::Chain(chain) => {
                // The chain that woke the task, then everything else already there.
                let mut next = Some(chain?);
                while let Some(chain) = next.take() {
                    let outcome = shared.on_packet(&chain, mem, held);
                    count_tx(&chain);
                    if let Outcome::Done = outcome {
                        queue.add_used(chain.head_index(), 0)?;
                    }
                    next = shared.pop_valid(queue, TX)?;
                }
                held.send(shared, queue).await?;
            }
            Event::Writable => held.send(shared, queue).await?,
            Event::Changed => held.sweep(shared, queue)?,
            Event::Stop => return Ok(()),
        }
        queue.signal_used()?;
    }
}

/// Counts a transmitted packet in the statistics page: a request of the tx queue (1) with
/// its payload bytes.
fn count_tx(chain: &DescriptorChain) {
    let bytes: u64 = chain.readable().iter().map(|b| u64::from(b.len)).sum();
    virtio::stats::stats().request(1, bytes.saturating_sub(HEADER_SIZE as u64));
}

impl Shared {
    /// Checks and acts on one guest packet. Its header is copied out first; every check is
    /// on the copy.
    fn on_packet(
        self: &Rc<Self>,
        chain: &DescriptorChain,
        mem: &GuestMemory,
        held: &mut HeldSet,
    ) -> Outcome {
        let head = chain.head_index();
        let mut reader = chain.reader(mem);
        let mut raw = [0u8; HEADER_SIZE];
        if let Err(e) = reader.read_exact_bytes(&mut raw) {
            self.count(|s| s.bad_chains += 1);
            self.errors
                .log(format_args!("tx chain {head}: no packet header: {e}"));
            return Outcome::Done;
        }
        let hdr = Header::decode(&raw);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            self.count(|s| s.bad_cids += 1);
            self.errors.log(format_args!(
                "tx chain {head}: packet from CID {} to CID {} dropped",
                hdr.src_cid, hdr.dst_cid
            ));
            return Outcome::Done;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        let len = hdr.len as usize;
        let available = reader.available_bytes();
        let op = match hdr.op() {
            Some(op) if hdr.kind == TYPE_STREAM => op,
            _ => {
                self.bad_packet(key, &hdr, "unknown type or op");
                return Outcome::Done;
            }
        };
        if hdr.len > MAX_PACKET || len > available {
            self.bad_packet(key, &hdr, "length beyond the buffers or 64 KiB");
            return Outcome::Done;
        }
        match op {
            Op::Request => {
                self.guest_connect(key, &hdr);
                return Outcome::Done;
            }
            Op::Rst => {
                self.remove(key);
                return Outcome::Done;
            }
            _ => {}
        }
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(&key) else {
            drop(conns);
            self.count(|s| s.unknown_connections += 1);
            self.errors.log(format_args!(
                "{op:?} for unknown connection host port {} guest port {}; reset",
                key.local, key.peer
            ));
            self.reply_rst(&hdr);
            return Outcome::Done;
        };
        if entry.conn.state == State::Reset {
            // The RST is on its way.
            return Outcome::Done;
        }
        let mut outcome = Outcome::Done;
        let result = match entry.conn.peer_credit(hdr.buf_alloc, hdr.fwd_cnt) {
            Err(v) => Err(v),
            Ok(()) => match op {
                Op::Response => entry.conn.accepted().map(|()| self.accept_host(key, entry)),
                Op::Shutdown => entry.conn.guest_shutdown(hdr.flags),
                // The length was checked against the chain's readable bytes.
                Op::Rw if len < GATHER_BELOW => entry.conn.guest_bytes(
                    len,
                    || self.spares.empty(SHARED_BUF),
                    |buf| reader.read_exact_bytes(buf).is_ok(),
                ),
                Op::Rw if held.may_hold(key, entry) => {
                    outcome = Outcome::Held;
                    held.hold(key, entry, head, reader, len)
                }
                Op::Rw => {
                    let mut data = self.spares.get(len);
                    match reader.read_exact_bytes(&mut data) {
                        Ok(()) => entry.conn.guest_data(data),
                        Err(_) => {
                            self.spares.put(data);
                            Err(entry.conn.unexpected(op))
                        }
                    }
                }
                Op::CreditUpdate => Ok(()),
                Op::CreditRequest => {
                    entry.conn.credit_requested();
                    Ok(())
                }
                Op::Request | Op::Rst => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                self.settle(key, entry);
                outcome
            }
            Err(v) => {
                drop(conns);
                self.violation(key, v);
                // A packet that broke the credit was not held.
                Outcome::Done
            }
        }
    }

    /// A packet that makes no sense: counted, and its connection (or the sender) reset.
    fn bad_packet(&self, key: Key, hdr: &Header, what: &str) {
        self.count(|s| s.bad_packets += 1);
        self.errors.log(format_args!(
            "packet type {} op {} len {} from guest port {} to host port {}: {what}; reset",
            hdr.kind, hdr.op, hdr.len, key.peer, key.local
        ));
        let mut conns = self.conns.borrow_mut();
        match conns.get_mut(&key) {
            Some(entry) => {
                self.reset_entry(entry);
                self.settle(key, entry);
            }
            None => {
                drop(conns);
                self.reply_rst(hdr);
            }
        }
    }

    /// The guest connects to host port `key.local`: the broker is asked for `PATH_<port>`.
    fn guest_connect(&self, key: Key, hdr: &Header) {
        let existing = self.conns.borrow().get(&key).map(|e| e.conn.state);
        if let Some(state) = existing {
            let v = Violation::Unexpected {
                op: Op::Request,
                state,
            };
            return self.violation(key, v);
        }
        // Frames of connections the guest already gave up on may still wait for the broker.
        let busy = self.outbox.borrow().len() >= self.max_connections;
        if busy || self.conns.borrow().len() >= self.max_connections {
            self.count(|s| s.refused += 1);
            self.errors.log(format_args!(
                "guest port {} to host port {}: {} connections already; refused",
                key.peer, key.local, self.max_connections
            ));
            return self.reply_rst(hdr);
        }
        if self.channel_closed.get() {
            self.count(|s| s.connect_failures += 1);
            self.errors.log(format_args!(
                "guest port {} to host port {}: the broker channel is closed; refused",
                key.peer, key.local
            ));
            return self.reply_rst(hdr);
        }
        let request = self.next_request.get();
        self.next_request.set(request.wrapping_add(1));
        let mut conn = Conn::guest_initiated(self.next_id(), request, self.buf_alloc);
        if let Err(v) = conn.peer_credit(hdr.buf_alloc, hdr.fwd_cnt) {
            self.count(|s| s.credit_violations += 1);
            self.errors.log(format_args!(
                "guest port {} to host port {}: {v}; refused",
                key.peer, key.local
            ));
            return self.reply_rst(hdr);
        }
        self.requests.borrow_mut().insert(request, key);
        self.conns.borrow_mut().insert(
            key,
            Entry {
                conn,
                stream: Slot::None,
            },
        );
        virtio::stats::stats().vsock_opened();
        self.outbox.borrow_mut().push_back(Frame::ConnectHost {
            id: request,
            port: key.local,
        });
        self.outbox_wake.notify();
    }
}
