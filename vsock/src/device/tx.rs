//! The tx queue: packets from the guest, each checked and acted on at once, its chain
//! returned straight away.

use std::pin::pin;
use std::rc::Rc;

use futures::future::{select, Either};
use memory::GuestMemory;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use super::conn::{Conn, Key, State, Violation, GATHER_BELOW};
use super::{Entry, Shared, Slot, MAX_PACKET};
use crate::broker::Frame;
use crate::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};

/// The capacity of a buffer that short packets are gathered into.
const SHARED_BUF: usize = 4 * GATHER_BELOW;

/// Runs the tx queue until `stop` fires.
pub(super) async fn run(shared: Rc<Shared>, queue: Rc<AsyncQueue>, stop: StopSignal) {
    shared.start_channel();
    let mem = queue.memory();
    loop {
        let next = queue.next_valid_chain(|head, reason| {
            shared.count(|s| s.bad_chains += 1);
            virtio::stats::stats().error(1);
            shared
                .errors
                .log(format_args!("tx: invalid chain at head {head}: {reason}"));
        });
        let chain = match select(pin!(next), stop.clone()).await {
            Either::Left((Ok(chain), _)) => chain,
            Either::Left((Err(e), _)) => return fail(&shared, e, stop).await,
            Either::Right(_) => break,
        };
        shared.on_packet(&chain, mem);
        count_tx(&chain);
        if let Err(e) = queue.add_used(chain.head_index(), 0) {
            return fail(&shared, e, stop).await;
        }
        // Everything else already there goes in the same batch.
        loop {
            match queue.try_pop() {
                Ok(Some(chain)) => {
                    shared.on_packet(&chain, mem);
                    count_tx(&chain);
                    if let Err(e) = queue.add_used(chain.head_index(), 0) {
                        return fail(&shared, e, stop).await;
                    }
                }
                Ok(None) => break,
                Err(virtio::Error::InvalidChain { head, reason }) => {
                    shared.count(|s| s.bad_chains += 1);
                    virtio::stats::stats().error(1);
                    shared
                        .errors
                        .log(format_args!("tx: invalid chain at head {head}: {reason}"));
                    if let Err(e) = queue.add_used(head, 0) {
                        return fail(&shared, e, stop).await;
                    }
                }
                Err(e) => return fail(&shared, e, stop).await,
            }
        }
        if let Err(e) = queue.signal_used() {
            return fail(&shared, e, stop).await;
        }
    }
    shared.errors.flush();
}

/// Counts a transmitted packet in the statistics page: a request of the tx queue (1) with
/// its payload bytes.
fn count_tx(chain: &DescriptorChain) {
    let bytes: u64 = chain.readable().iter().map(|b| u64::from(b.len)).sum();
    virtio::stats::stats().request(1, bytes.saturating_sub(HEADER_SIZE as u64));
}

/// The queue cannot go on (its rings became inaccessible): wait to be stopped.
async fn fail(shared: &Shared, e: virtio::Error, stop: StopSignal) {
    eprintln!("ringvm device vsock: tx queue stopped: {e}");
    stop.await;
    shared.errors.flush();
}

impl Shared {
    /// Checks and acts on one guest packet. Its header is copied out first; every check is
    /// on the copy.
    fn on_packet(self: &Rc<Self>, chain: &DescriptorChain, mem: &GuestMemory) {
        let head = chain.head_index();
        let mut reader = chain.reader(mem);
        let mut raw = [0u8; HEADER_SIZE];
        if let Err(e) = reader.read_exact_bytes(&mut raw) {
            self.count(|s| s.bad_chains += 1);
            self.errors
                .log(format_args!("tx chain {head}: no packet header: {e}"));
            return;
        }
        let hdr = Header::decode(&raw);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            self.count(|s| s.bad_cids += 1);
            self.errors.log(format_args!(
                "tx chain {head}: packet from CID {} to CID {} dropped",
                hdr.src_cid, hdr.dst_cid
            ));
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        let op = match hdr.op() {
            Some(op) if hdr.kind == TYPE_STREAM => op,
            _ => return self.bad_packet(key, &hdr, "unknown type or op"),
        };
        let available = reader.available_bytes();
        if hdr.len > MAX_PACKET || hdr.len as usize > available {
            return self.bad_packet(key, &hdr, "length beyond the buffers or 64 KiB");
        }
        if op == Op::Request {
            return self.guest_connect(key, &hdr);
        }
        if op == Op::Rst {
            self.remove(key);
            return;
        }
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(&key) else {
            drop(conns);
            self.count(|s| s.unknown_connections += 1);
            self.errors.log(format_args!(
                "{op:?} for unknown connection host port {} guest port {}; reset",
                key.local, key.peer
            ));
            return self.reply_rst(&hdr);
        };
        if entry.conn.state == State::Reset {
            // The RST is on its way.
            return;
        }
        let result = entry
            .conn
            .peer_credit(hdr.buf_alloc, hdr.fwd_cnt)
            .and_then(|()| match op {
                Op::Response => {
                    entry.conn.accepted()?;
                    self.accept_host(key, entry);
                    Ok(())
                }
                Op::Shutdown => entry.conn.guest_shutdown(hdr.flags),
                // The length was checked against the chain's readable bytes.
                Op::Rw if (hdr.len as usize) < GATHER_BELOW => entry.conn.guest_bytes(
                    hdr.len as usize,
                    || self.spares.empty(SHARED_BUF),
                    |buf| reader.read_exact_bytes(buf).is_ok(),
                ),
                Op::Rw => {
                    let mut data = self.spares.get(hdr.len as usize);
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
            });
        match result {
            Ok(()) => self.settle(key, entry),
            Err(v) => {
                drop(conns);
                self.violation(key, v);
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
