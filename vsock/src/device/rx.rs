//! The rx queue: packets for the guest, one per chain, from the replies to unknown
//! connections first and then the ready connections in turn. A data packet's payload is
//! read from the host stream straight into the chain (`recvmsg` that never waits), so host
//! data is copied once, by the kernel, into guest memory.

use std::pin::pin;
use std::rc::Rc;

use futures::future::{select, Either};
use memory::GuestMemory;
use virtio::vhost_user::StopSignal;
use virtio::{AsyncQueue, DescriptorChain};

use std::io;

use executor::AsyncFd;

use super::conn::{Key, Outgoing};
use super::{Shared, Slot, RX};
use crate::packet::{Header, Op, HEADER_SIZE};

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
        match shared.fill(&chain, mem).await {
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
            let len = match shared.fill(&chain, mem).await {
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

/// The next packet for the guest, from [`Shared::next_ready`].
enum Next {
    /// A control packet, whole.
    Packet(Header),
    /// Data: read at most `max` bytes of connection `key` (`id`) from `fd`.
    Read {
        key: Key,
        id: u64,
        fd: AsyncFd,
        max: usize,
    },
}

impl Shared {
    /// Writes the next packet for the guest into `chain`.
    async fn fill(&self, chain: &DescriptorChain, mem: &GuestMemory) -> Fill {
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
        let hdr = match reset.map(Next::Packet).or_else(|| self.next_ready(room)) {
            None => return Fill::Nothing,
            Some(Next::Packet(hdr)) => hdr,
            Some(Next::Read { key, id, fd, max }) => {
                let mut payload = chain.writer(mem);
                payload.consume(HEADER_SIZE);
                match self.read_host(key, id, &fd, &payload, max).await {
                    Some(hdr) => hdr,
                    None => return Fill::Nothing,
                }
            }
        };
        match writer.write_all_bytes(&hdr.encode()) {
            // At most HEADER_SIZE + 64 KiB.
            Ok(()) => Fill::Used((HEADER_SIZE + hdr.len as usize) as u32),
            Err(e) => {
                // The chain was validated: its memory went away. The packet is lost, and so
                // is the connection's byte count: reset it.
                self.errors
                    .log(format_args!("rx chain {}: {e}", chain.head_index()));
                let key = Key {
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

    /// Reads at most `max` bytes of connection `key` (`id`) from its host stream `fd`
    /// straight into `payload` (a chain after its header). Returns the data packet's header
    /// when bytes came; `None` when none did (the stream ended, had nothing after all, or
    /// failed: the connection learns which) or the connection is gone.
    async fn read_host(
        &self,
        key: Key,
        id: u64,
        fd: &AsyncFd,
        payload: &virtio::Writer,
        max: usize,
    ) -> Option<Header> {
        let res = match payload.iovecs(max) {
            Ok(iov) => fd.recv_mem_nowait(iov).await.0,
            Err(e) => Err(io::Error::other(e)),
        };
        let res = match res {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return None,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                // A host end that reset, or guest memory that cannot take the bytes: the
                // connection cannot go on whole.
                self.host_failed(key, id, "reading", Some(&e));
                return None;
            }
            res => res,
        };
        self.with_conn(key, id, |c| match res {
            Ok(0) => {
                c.readable = false;
                c.host_eof();
                None
            }
            Ok(n) => {
                // At most `max`, which is at most 64 KiB.
                let n = n.min(max);
                c.delivered(n);
                // A short read took all there was: the watcher polls again rather than the
                // next packet reading nothing.
                if n < max {
                    c.readable = false;
                }
                Some(self.header(key, Op::Rw, 0, n as u32, c.credit()))
            }
            // Nothing there after all: the watcher polls again.
            Err(_) => {
                c.readable = false;
                None
            }
        })
        .flatten()
    }

    /// The next packet of the ready connections, in turn, with at most `room` payload bytes.
    fn next_ready(&self, room: usize) -> Option<Next> {
        loop {
            let key = self.ready.borrow_mut().pop_front()?;
            let mut conns = self.conns.borrow_mut();
            let Some(entry) = conns.get_mut(&key) else {
                continue;
            };
            entry.conn.queued = false;
            let Some(Outgoing { op, flags, read }) = entry.conn.next_packet(room) else {
                continue;
            };
            if op == Op::Rw {
                let Slot::Running(stream) = &entry.stream else {
                    // Readable only comes from a running stream's watcher.
                    entry.conn.readable = false;
                    continue;
                };
                return Some(Next::Read {
                    key,
                    id: entry.conn.id,
                    fd: stream.fd.clone(),
                    max: read,
                });
            }
            let hdr = self.header(key, op, flags, 0, entry.conn.credit());
            if op == Op::Rst {
                drop(conns);
                self.remove(key);
            } else {
                self.settle(key, entry);
            }
            return Some(Next::Packet(hdr));
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
