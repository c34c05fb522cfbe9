//! The rx queue: packets for the guest, one per chain, from the replies to unknown
//! connections first and then the ready connections in turn.

use std::pin::pin;
use std::rc::Rc;

use futures::future::{select, Either};
use memory::GuestMemory;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use super::conn::Outgoing;
use super::{Shared, RX};
use crate::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};

/// What became of an rx chain.
enum Fill {
    /// Nothing to send: the chain is kept for later.
    Nothing,
    /// A packet of this many bytes went in.
    Used(u32),
    /// The chain cannot take a header: returned empty.
    Bad,
}

/// Runs the rx queue until `stop` fires. At most one chain is held while nothing is ready;
/// the queue steps back over it when it stops, so the guest gets it back unused.
pub(super) async fn run(shared: Rc<Shared>, queue: Rc<AsyncQueue>, stop: StopSignal) {
    shared.start_channel();
    let mem = queue.memory();
    let mut held: Option<DescriptorChain> = None;
    loop {
        if !shared.rx_pending() {
            match select(pin!(shared.rx_wake.wait()), stop.clone()).await {
                Either::Left(_) => continue,
                Either::Right(_) => break,
            }
        }
        let chain = match held.take() {
            Some(chain) => chain,
            None => match select(pin!(queue.next_chain()), stop.clone()).await {
                Either::Left((Ok(chain), _)) => chain,
                Either::Left((Err(virtio::Error::InvalidChain { head, reason }), _)) => {
                    shared.count(|s| s.bad_chains += 1);
                    virtio::stats::stats().error(0);
                    shared
                        .errors
                        .log(format_args!("rx: invalid chain at head {head}: {reason}"));
                    if let Err(e) = queue.complete(head, 0) {
                        return fail(&shared, e, stop).await;
                    }
                    continue;
                }
                Either::Left((Err(e), _)) => return fail(&shared, e, stop).await,
                Either::Right(_) => break,
            },
        };
        match shared.fill(&chain, mem) {
            Fill::Nothing => {
                held = Some(chain);
                continue;
            }
            Fill::Used(len) => {
                count_rx(len);
                if let Err(e) = queue.add_used(chain.head_index(), len) {
                    return fail(&shared, e, stop).await;
                }
            }
            Fill::Bad => {
                count_rx_bad();
                if let Err(e) = queue.add_used(chain.head_index(), 0) {
                    return fail(&shared, e, stop).await;
                }
            }
        }
        // Fill what else is there while packets are ready, then signal once.
        while shared.rx_pending() {
            let chain = match shared.pop_valid(&queue, RX) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return fail(&shared, e, stop).await,
            };
            let len = match shared.fill(&chain, mem) {
                Fill::Nothing => {
                    held = Some(chain);
                    break;
                }
                Fill::Used(len) => {
                    count_rx(len);
                    len
                }
                Fill::Bad => {
                    count_rx_bad();
                    0
                }
            };
            if let Err(e) = queue.add_used(chain.head_index(), len) {
                return fail(&shared, e, stop).await;
            }
        }
        if let Err(e) = queue.signal_used() {
            return fail(&shared, e, stop).await;
        }
    }
    if held.is_some() {
        queue.with_queue(|q| q.undo_pop());
    }
    shared.errors.flush();
}

/// The queue cannot go on (its rings became inaccessible): wait to be stopped.
async fn fail(shared: &Shared, e: virtio::Error, stop: StopSignal) {
    eprintln!("ringvm device vsock: rx queue stopped: {e}");
    stop.await;
    shared.errors.flush();
}

impl Shared {
    /// Writes the next packet for the guest into `chain`.
    fn fill(&self, chain: &DescriptorChain, mem: &GuestMemory) -> Fill {
        let mut writer = chain.writer(mem);
        let Some(room) = writer.available_bytes().checked_sub(HEADER_SIZE) else {
            self.count(|s| s.bad_chains += 1);
            self.errors.log(format_args!(
                "rx chain {}: {} writable bytes, no room for a header",
                chain.head_index(),
                writer.available_bytes()
            ));
            return Fill::Bad;
        };
        let reset = self.resets.borrow_mut().pop_front();
        let (hdr, data) = match reset {
            Some(hdr) => (hdr, Vec::new()),
            None => match self.next_ready(room) {
                Some(packet) => packet,
                None => return Fill::Nothing,
            },
        };
        let written = writer
            .write_all_bytes(&hdr.encode())
            .and_then(|()| writer.write_all_bytes(&data));
        match written {
            // At most HEADER_SIZE + 64 KiB.
            Ok(()) => Fill::Used((HEADER_SIZE + data.len()) as u32),
            Err(e) => {
                // The chain was validated: its memory went away. The packet is lost, and so
                // is the connection's byte count: reset it.
                self.errors
                    .log(format_args!("rx chain {}: {e}", chain.head_index()));
                let key = super::conn::Key {
                    local: hdr.src_port,
                    peer: hdr.dst_port,
                };
                let mut conns = self.conns.borrow_mut();
                if let Some(entry) = conns.get_mut(&key) {
                    self.reset_entry(entry);
                    self.settle(key, entry);
                }
                Fill::Bad
            }
        }
    }

    /// The next packet of the ready connections, in turn, with at most `room` payload bytes.
    fn next_ready(&self, room: usize) -> Option<(Header, Vec<u8>)> {
        loop {
            let key = self.ready.borrow_mut().pop_front()?;
            let mut conns = self.conns.borrow_mut();
            let Some(entry) = conns.get_mut(&key) else {
                continue;
            };
            entry.conn.queued = false;
            let Some(Outgoing { op, flags, data }) = entry.conn.next_packet(room) else {
                continue;
            };
            let (buf_alloc, fwd_cnt) = entry.conn.credit();
            let hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local,
                dst_port: key.peer,
                // At most 64 KiB.
                len: data.len() as u32,
                kind: TYPE_STREAM,
                op: op.to_u16(),
                flags,
                buf_alloc,
                fwd_cnt,
            };
            if op == Op::Rst {
                drop(conns);
                self.remove(key);
            } else {
                self.settle(key, entry);
            }
            return Some((hdr, data));
        }
    }
}

/// Counts a packet given to the guest in the statistics page: a request of the rx queue (0)
/// with its payload bytes.
fn count_rx(used: u32) {
    let payload = u64::from(used).saturating_sub(crate::packet::HEADER_SIZE as u64);
    virtio::stats::stats().request(0, payload);
}

/// A receive buffer returned unfilled (it could not take a packet): a request with an error.
fn count_rx_bad() {
    virtio::stats::stats().request(0, 0);
    virtio::stats::stats().error(0);
}
