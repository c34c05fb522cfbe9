//! Guest data packets held in the tx queue and sent to the host straight from guest memory,
//! so the device copies nothing of them: the host socket's `sendmsg` reads the guest's
//! buffers.
//!
//! A data packet of 4 KiB or more is held when its connection has a running host stream
//! whose writer sent its first line (a host-initiated connection's `OK <port>`) and nothing
//! of the guest's waits in the connection's buffer or in the host writer (so the bytes stay
//! in order: held data goes first, the buffer after it), while fewer than half the queue's
//! chains are held. Otherwise it is copied into the buffer, as before. Held bytes count
//! against the connection's credit until they are sent.
//!
//! The tx task sends each connection's held packets, up to [`MAX_WRITE`] bytes at a time, in
//! one `sendmsg` that never waits (`MSG_DONTWAIT`): what the socket took goes out of the
//! hold and fully sent chains go back to the guest; when the socket is full the task waits
//! for it to become writable, beside its other work. Nothing waits in the ring but that
//! poll, so the hold can always be ended at once:
//! - a connection that is reset or removed gets its chains back without sending (the tx
//!   task is woken for it);
//! - when the queue stops (a memory table change, a device reset), what is held is copied
//!   into the connections' buffers, in front of what waits there, and the chains go back:
//!   the connections outlive the queue, and the guest gets every chain it gave.
//!
//! The bound on held chains keeps half the queue for everything else: a host reader that
//! stops can hold its own connection's credit, never the whole queue.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use executor::AsyncFd;
use futures::future::join_all;
use memory::GuestIoVecs;
use virtio::{AsyncQueue, Reader};

use super::conn::{Key, State, Violation, MAX_WRITE, MAX_WRITE_BUFS};
use super::{Entry, Shared, Slot};

/// Most iovecs in one send (the kernel takes up to 1024).
const MAX_IOVECS: usize = 512;

/// One held packet: its chain, a reader at the payload bytes not yet sent, and how many.
struct Packet {
    head: u16,
    reader: Reader,
    len: usize,
}

/// A connection's held packets, in order.
struct Held {
    key: Key,
    id: u64,
    fd: AsyncFd,
    packets: VecDeque<Packet>,
    /// Unsent bytes of all the packets.
    bytes: usize,
    /// Set while the host socket is full: resolves when it is writable.
    writable: Option<Pin<Box<dyn Future<Output = io::Result<u32>>>>>,
}

/// The tx queue's held packets, by connection.
pub(super) struct HeldSet {
    conns: Vec<Held>,
    chains: usize,
    max_chains: usize,
}

impl HeldSet {
    /// Holds at most `max_chains` chains at once.
    pub fn new(max_chains: usize) -> HeldSet {
        HeldSet {
            conns: Vec::new(),
            chains: 0,
            max_chains,
        }
    }

    /// Whether a data packet of connection `key` may be held (see the module's rules).
    pub fn may_hold(&self, key: Key, entry: &Entry) -> bool {
        self.chains < self.max_chains
            && matches!(&entry.stream, Slot::Running(s) if s.opened.get())
            && entry.conn.buffered_for_host() == 0
            && self
                .conns
                .iter()
                .all(|h| h.key != key || h.id == entry.conn.id)
    }

    /// Holds a data packet (`len` bytes at `reader`, chain `head`) of connection `key`,
    /// within its credit. Only after [`may_hold`](Self::may_hold) said yes.
    pub fn hold(
        &mut self,
        key: Key,
        entry: &mut Entry,
        head: u16,
        reader: Reader,
        len: usize,
    ) -> Result<(), Violation> {
        entry.conn.guest_direct(len)?;
        let held = match self.conns.iter().position(|h| h.key == key) {
            Some(i) => &mut self.conns[i],
            None => {
                let Slot::Running(stream) = &entry.stream else {
                    unreachable!("may_hold checked the stream runs");
                };
                self.conns.push(Held {
                    key,
                    id: entry.conn.id,
                    fd: stream.fd.clone(),
                    packets: VecDeque::new(),
                    bytes: 0,
                    writable: None,
                });
                self.conns.last_mut().expect("just pushed")
            }
        };
        held.packets.push_back(Packet { head, reader, len });
        held.bytes += len;
        self.chains += 1;
        Ok(())
    }

    /// Resolves when a held connection's host socket became writable.
    pub async fn writable(&mut self) {
        poll_fn(|cx| {
            if self.poll_writable(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Polls the sockets waited on; those that became writable are waited on no more.
    /// Whether any did.
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> bool {
        let mut any = false;
        for held in &mut self.conns {
            if held
                .writable
                .as_mut()
                .is_some_and(|w| w.as_mut().poll(cx).is_ready())
            {
                held.writable = None;
                any = true;
            }
        }
        any
    }

    /// Gives back the chains of connections that are gone, reset or replaced, unsent.
    pub fn sweep(&mut self, shared: &Shared, queue: &AsyncQueue) -> virtio::Result<()> {
        let mut i = 0;
        while i < self.conns.len() {
            let held = &self.conns[i];
            let alive = shared
                .conns
                .borrow()
                .get(&held.key)
                .is_some_and(|e| e.conn.id == held.id && e.conn.state != State::Reset);
            if alive {
                i += 1;
                continue;
            }
            let held = self.conns.swap_remove(i);
            self.release(shared, held, queue)?;
        }
        Ok(())
    }

    /// Sends what each connection holds, as far as its host socket takes it without waiting;
    /// gives back the chains sent, and waits for the sockets that are full to be writable.
    pub async fn send(&mut self, shared: &Shared, queue: &AsyncQueue) -> virtio::Result<()> {
        self.sweep(shared, queue)?;
        // Sockets that became writable while the task was busy with chains (which the task's
        // wait looks at first) go now too.
        poll_fn(|cx| {
            self.poll_writable(cx);
            Poll::Ready(())
        })
        .await;
        loop {
            let mut sends = Vec::new();
            for (i, held) in self.conns.iter().enumerate() {
                if held.writable.is_some() || held.packets.is_empty() {
                    continue;
                }
                let mut iov = GuestIoVecs::new(queue.memory().clone());
                let mut bytes = 0;
                for p in held.packets.iter().take(MAX_WRITE_BUFS) {
                    if bytes >= MAX_WRITE || iov.len() >= MAX_IOVECS {
                        break;
                    }
                    if p.reader.append_iovecs(&mut iov, p.len).is_err() {
                        break;
                    }
                    bytes += p.len;
                }
                let send = held.fd.send_mem_nowait(iov);
                sends.push(async move { (i, bytes, send.await.0) });
            }
            if sends.is_empty() {
                return Ok(());
            }
            let mut again = false;
            let mut failed = Vec::new();
            for (i, bytes, res) in join_all(sends).await {
                let held = &mut self.conns[i];
                match res {
                    Ok(n) if n > 0 && bytes > 0 => {
                        let n = n.min(bytes);
                        self.chains -= sent(shared, held, n, queue)?;
                        if n == bytes {
                            again |= !held.packets.is_empty();
                        } else {
                            held.writable = Some(Box::pin(held.fd.poll_writable()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        held.writable = Some(Box::pin(held.fd.poll_writable()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => again = true,
                    res => failed.push((i, res.err())),
                }
            }
            // Highest index first: swap_remove leaves the lower ones where they are.
            failed.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (i, err) in failed {
                // Nothing taken of something: a host end that failed, or guest memory that
                // cannot be read (no error then). The connection cannot go on whole.
                let held = self.conns.swap_remove(i);
                shared.host_failed(held.key, held.id, "writing", err.as_ref());
                self.release(shared, held, queue)?;
            }
            self.conns.retain(|h| !h.packets.is_empty());
            if !again {
                return Ok(());
            }
        }
    }

    /// Ends every hold (the queue stops): the unsent bytes are copied into their
    /// connections' buffers, in front of what waits there, and the chains go back (to
    /// `queue`, unless it failed).
    pub fn unhold_all(&mut self, shared: &Shared, queue: Option<&AsyncQueue>) {
        for held in std::mem::take(&mut self.conns) {
            let mut bufs = Vec::with_capacity(held.packets.len());
            let mut whole = true;
            for p in &held.packets {
                let mut reader = p.reader.clone();
                let mut buf = shared.spares.get(p.len);
                whole &= reader.read_exact_bytes(&mut buf).is_ok();
                bufs.push(buf);
            }
            shared.with_conn(held.key, held.id, |c| {
                if whole {
                    c.unhold(bufs, held.bytes);
                } else {
                    c.direct_sent(held.bytes, 0);
                    c.reset();
                }
            });
            for p in held.packets {
                if let Some(q) = queue {
                    // A queue that cannot take it back is failing anyway.
                    let _ = q.add_used(p.head, 0);
                }
            }
        }
        self.chains = 0;
    }

    /// Gives back `held`'s chains unsent (its connection is gone, reset or failed).
    fn release(&mut self, shared: &Shared, held: Held, queue: &AsyncQueue) -> virtio::Result<()> {
        shared.with_conn(held.key, held.id, |c| c.direct_sent(held.bytes, 0));
        for p in held.packets {
            self.chains -= 1;
            queue.add_used(p.head, 0)?;
        }
        Ok(())
    }
}

/// The host socket took the first `n` held bytes of `held`: the chains wholly sent go back;
/// returns how many.
fn sent(shared: &Shared, held: &mut Held, n: usize, queue: &AsyncQueue) -> virtio::Result<usize> {
    let mut left = n;
    let mut done = 0;
    while left > 0 {
        let Some(p) = held.packets.front_mut() else {
            break;
        };
        if p.len <= left {
            left -= p.len;
            let head = p.head;
            held.packets.pop_front();
            done += 1;
            queue.add_used(head, 0)?;
        } else {
            p.reader.consume(left);
            p.len -= left;
            left = 0;
        }
    }
    held.bytes -= n;
    shared.with_conn(held.key, held.id, |c| c.direct_sent(n, n));
    Ok(done)
}
