//! A virtqueue driven by its kick eventfd on the executor.

use std::cell::{Cell, RefCell};

use executor::{EventFd, EventFdStream};
use memory::GuestMemory;

use crate::{ChainError, DescriptorChain, Error, Queue, Result};

/// A queue, the guest memory it lives in, its kick stream and its call eventfd, for a
/// device's single-threaded executor. Methods take `&self`, so a device can share it
/// (`Rc<AsyncQueue>`) between the task that pops chains and the tasks that complete them.
///
/// ```no_run
/// # async fn serve(q: &virtio::AsyncQueue) -> virtio::Result<()> {
/// loop {
///     let chain = match q.next_chain().await {
///         Ok(chain) => chain,
///         // A malformed chain: give it back empty and go on (or ask for a reset).
///         Err(virtio::Error::InvalidChain { head, .. }) => {
///             q.complete(head, 0)?;
///             continue;
///         }
///         Err(e) => return Err(e),
///     };
///     let written = 0; // ... handle the request ...
///     q.complete(chain.head_index(), written)?;
/// }
/// # }
/// ```
pub struct AsyncQueue {
    queue: RefCell<Queue>,
    mem: GuestMemory,
    /// Taken by the one `next_chain` that waits on it, put back when it stops waiting.
    kick: Cell<Option<EventFdStream>>,
    /// Replaced while the queue runs by [`AsyncQueue::set_call`].
    call: RefCell<EventFd>,
}

/// Holds the kick stream while a `next_chain` waits, and puts it back even when that future
/// is dropped mid-wait (so its in-flight eventfd read, and any kick it catches, survive).
struct KickGuard<'a> {
    slot: &'a Cell<Option<EventFdStream>>,
    stream: Option<EventFdStream>,
}

impl std::fmt::Debug for AsyncQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncQueue")
            .field("queue", &self.queue)
            .field("mem", &self.mem)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

impl Drop for KickGuard<'_> {
    fn drop(&mut self) {
        self.slot.set(self.stream.take());
    }
}

impl AsyncQueue {
    /// Wraps an activated queue.
    pub fn new(queue: Queue, mem: GuestMemory, kick: EventFdStream, call: EventFd) -> AsyncQueue {
        AsyncQueue {
            queue: RefCell::new(queue),
            mem,
            kick: Cell::new(Some(kick)),
            call: RefCell::new(call),
        }
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Runs `f` on the queue (for `undo_pop`, `next_avail`, ...).
    pub fn with_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> R {
        f(&mut self.queue.borrow_mut())
    }

    /// Pops an available chain without waiting: `None` when there is none, or when the
    /// running task has popped its share for this poll ([`executor::budget`]; a malformed
    /// chain counts too). It gets more once it has gone back to the executor, and
    /// [`next_chain`](Self::next_chain) waits for that. So a driver that keeps the ring full
    /// (or a ring laid out so that every used entry makes a new available one) cannot keep
    /// the device's other tasks, or the stop of this queue, from running.
    pub fn try_pop(&self) -> Result<Option<DescriptorChain>> {
        if !executor::budget::left() {
            return Ok(None);
        }
        let popped = self.queue.borrow_mut().pop(&self.mem);
        if !matches!(popped, Ok(None)) {
            executor::budget::spend();
        }
        popped
    }

    /// The next available chain, waiting for a kick when there is none. While chains keep
    /// coming the driver is asked not to kick; before waiting the device asks for a kick again
    /// and re-checks the ring, so no chain added in between is missed. A task that has popped
    /// its share for this poll yields to the executor first (see [`try_pop`](Self::try_pop)).
    ///
    /// Only one call may wait at a time ([`Error::PopInProgress`] otherwise). Dropping the
    /// future is safe: the kick stream and its in-flight read are kept for the next call.
    pub async fn next_chain(&self) -> Result<DescriptorChain> {
        loop {
            // Out of budget for this poll: back to the executor first.
            std::future::poll_fn(executor::budget::poll_left).await;
            if let Some(chain) = self.try_pop()? {
                return Ok(chain);
            }
            let mut guard = KickGuard {
                slot: &self.kick,
                stream: Some(self.kick.take().ok_or(Error::PopInProgress)?),
            };
            {
                let mut q = self.queue.borrow_mut();
                if q.enable_notification(&self.mem)? {
                    // Chains came in meanwhile: back to popping, kicks off again.
                    q.disable_notification(&self.mem)?;
                    continue;
                }
            }
            if let Some(stream) = guard.stream.as_mut() {
                stream.next_value().await.map_err(Error::Kick)?;
            }
            drop(guard);
            self.queue.borrow_mut().disable_notification(&self.mem)?;
        }
    }

    /// The next well-formed chain: a malformed one is handed to `invalid` (to log and count
    /// it), given back with a zero-length used entry, and skipped. An error is one of
    /// [`next_chain`](Self::next_chain) or of giving a malformed chain back.
    pub async fn next_valid_chain(
        &self,
        mut invalid: impl FnMut(u16, &ChainError),
    ) -> Result<DescriptorChain> {
        loop {
            match self.next_chain().await {
                Err(Error::InvalidChain { head, reason }) => {
                    invalid(head, &reason);
                    self.complete(head, 0)?;
                }
                next => return next,
            }
        }
    }

    /// Puts `(head, len)` in the used ring, without notifying.
    pub fn add_used(&self, head: u16, len: u32) -> Result<()> {
        self.queue.borrow_mut().add_used(&self.mem, head, len)
    }

    /// Notifies the driver (writes the call eventfd) if it wants to hear about the used
    /// entries added since the last call; returns whether it did.
    pub fn signal_used(&self) -> Result<bool> {
        let notify = self.queue.borrow_mut().needs_notification(&self.mem)?;
        if notify {
            // Never blocks on a nonblocking call eventfd (the vhost-user backend makes every
            // one so): a counter the peer let fill up already wakes it.
            self.call.borrow().notify().map_err(Error::Call)?;
        }
        Ok(notify)
    }

    /// Signals the driver through `call` from now on (vhost-user `SET_VRING_CALL` on a
    /// running ring, as a frontend does when the guest masks or unmasks the queue's
    /// interrupt). The queue goes on: nothing held or in flight is touched.
    pub fn set_call(&self, call: EventFd) {
        *self.call.borrow_mut() = call;
    }

    /// `add_used` then `signal_used`.
    pub fn complete(&self, head: u16, len: u32) -> Result<()> {
        self.add_used(head, len)?;
        self.signal_used().map(drop)
    }

    /// The queue, the kick stream (absent only while a `next_chain` future is alive), and
    /// the call eventfd, to hand the queue back (vhost-user `GET_VRING_BASE`).
    pub fn into_parts(self) -> (Queue, Option<EventFdStream>, EventFd) {
        (
            self.queue.into_inner(),
            self.kick.into_inner(),
            self.call.into_inner(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockBuf, MockSplitQueue};
    use crate::VIRTIO_F_EVENT_IDX;
    use executor::Executor;
    use memory::GuestAddress;
    use std::time::Duration;

    struct Fixture {
        ex: Executor,
        mem: GuestMemory,
        mock: MockSplitQueue,
        kick: EventFd,
        call: EventFd,
    }

    fn fixture() -> Fixture {
        let ex = Executor::new().expect("executor");
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x40_0000)]).expect("memory");
        let mock = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).expect("mock");
        Fixture {
            ex,
            mem,
            mock,
            kick: EventFd::new().expect("kick"),
            call: EventFd::new().expect("call"),
        }
    }

    fn async_queue(f: &Fixture, features: u64) -> AsyncQueue {
        AsyncQueue::new(
            f.mock.queue_with_features(features).expect("queue"),
            f.mem.clone(),
            f.kick.try_clone().expect("dup").into_stream(),
            f.call.try_clone().expect("dup"),
        )
    }

    #[test]
    fn next_chain_waits_for_a_kick() {
        let mut f = fixture();
        let q = async_queue(&f, 1 << VIRTIO_F_EVENT_IDX);
        let waited =
            f.ex.run_until(executor::timeout(Duration::from_millis(20), q.next_chain()));
        assert!(waited.is_err(), "nothing available: still waiting");
        assert_eq!(
            f.mock.avail_event().expect("read"),
            0,
            "asked for a kick at 0"
        );

        let sent = f.mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        assert!(f.mock.needs_kick(true, 0).expect("check"));
        f.kick.write(1).expect("kick");
        let chain =
            f.ex.run_until(executor::timeout(Duration::from_secs(5), q.next_chain()))
                .expect("woken")
                .expect("chain");
        assert_eq!(chain.head_index(), sent.head);
    }

    #[test]
    fn chains_already_available_need_no_kick() {
        let mut f = fixture();
        let q = async_queue(&f, 0);
        for _ in 0..3 {
            f.mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        }
        let heads: Vec<u16> = f.ex.run_until(async {
            let mut heads = Vec::new();
            for _ in 0..3 {
                heads.push(q.next_chain().await.expect("chain").head_index());
            }
            heads
        });
        assert_eq!(heads.len(), 3);
    }

    #[test]
    fn complete_signals_the_call_eventfd() {
        let mut f = fixture();
        let q = async_queue(&f, 0);
        f.mock.add_chain(&[MockBuf::Writable(4)]).expect("add");
        let chain = q.try_pop().expect("pop").expect("chain");
        q.complete(chain.head_index(), 4).expect("complete");
        let mut call = f.call.try_clone().expect("dup").into_stream();
        let v = f.ex.run_until(call.next_value()).expect("signalled");
        assert_eq!(v, 1);
        assert_eq!(f.mock.next_used().expect("used").map(|u| u.len), Some(4));
        assert!(!q.signal_used().expect("nothing new"));
    }

    #[test]
    fn second_waiter_is_refused_and_a_dropped_wait_keeps_the_stream() {
        let mut f = fixture();
        let q = async_queue(&f, 0);
        let second = f.ex.run_until(async {
            let first = q.next_chain();
            futures::pin_mut!(first);
            assert!(futures::poll!(&mut first).is_pending());
            q.next_chain().await
        });
        assert!(matches!(second, Err(Error::PopInProgress)));
        // The first future was dropped mid-wait; a kick still reaches the next call.
        let sent = f.mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        f.kick.write(1).expect("kick");
        let chain =
            f.ex.run_until(executor::timeout(Duration::from_secs(5), q.next_chain()))
                .expect("woken")
                .expect("chain");
        assert_eq!(chain.head_index(), sent.head);
        let (_, kick, _) = q.into_parts();
        assert!(kick.is_some());
    }

    /// Publishes chain 5 (a buffer outside guest memory), then a good chain (returned).
    fn bad_chain_then_good(f: &mut Fixture) -> u16 {
        f.mock
            .write_desc(
                5,
                crate::Descriptor {
                    addr: 0xffff_ffff_0000,
                    len: 8,
                    flags: 0,
                    next: 0,
                },
            )
            .expect("write");
        f.mock.publish(5).expect("publish");
        f.mock.add_chain(&[MockBuf::Writable(1)]).expect("add").head
    }

    #[test]
    fn invalid_chain_is_reported_and_the_queue_goes_on() {
        let mut f = fixture();
        let q = async_queue(&f, 0);
        let sent = bad_chain_then_good(&mut f);
        f.ex.run_until(async {
            match q.next_chain().await {
                Err(Error::InvalidChain { head: 5, .. }) => q.complete(5, 0).expect("return"),
                other => panic!("expected an invalid chain, got {other:?}"),
            }
            let c = q.next_chain().await.expect("next");
            assert_eq!(c.head_index(), sent);
        });
    }

    #[test]
    fn a_stream_of_malformed_chains_lets_the_other_tasks_run() {
        // Chains that need no I/O never make the popping task wait: without a budget it
        // would skip all 200 before anything else on the executor ran (and never stop, for a
        // driver that keeps publishing them, or a ring laid over itself).
        let mut f = fixture();
        f.mock = MockSplitQueue::new(&f.mem, GuestAddress(0x1000), 256).expect("mock");
        let bad = crate::Descriptor {
            addr: 0xffff_ffff_0000,
            len: 8,
            flags: 0,
            next: 0,
        };
        f.mock.write_desc(5, bad).expect("write");
        for _ in 0..200 {
            f.mock.publish(5).expect("publish");
        }
        let q = async_queue(&f, 0);
        let witness = std::rc::Rc::new(Cell::new(false));
        let mut skipped = 0u32;
        let mut skipped_before_witness = None;
        f.ex.run_until(async {
            let w = witness.clone();
            executor::spawn(async move { w.set(true) }).detach();
            let next = q.next_valid_chain(|_, _| {
                if witness.get() && skipped_before_witness.is_none() {
                    skipped_before_witness = Some(skipped);
                }
                skipped += 1;
            });
            // Every chain is malformed: skipped until the ring is empty, then a wait.
            let _ = executor::timeout(Duration::from_millis(200), next).await;
        });
        assert_eq!(skipped, 200);
        let at = skipped_before_witness.expect("the other task ran while chains were left");
        assert!(at <= executor::budget::PER_POLL, "it ran after {at} chains");
    }

    #[test]
    fn try_pop_stops_at_the_budget_until_the_task_yields() {
        let mut f = fixture();
        f.mock = MockSplitQueue::new(&f.mem, GuestAddress(0x1000), 256).expect("mock");
        for _ in 0..200 {
            f.mock.add_chain(&[MockBuf::Writable(1)]).expect("add");
        }
        let q = async_queue(&f, 0);
        f.ex.run_until(async {
            let mut popped = 0;
            while q.try_pop().expect("pop").is_some() {
                popped += 1;
            }
            assert_eq!(popped, executor::budget::PER_POLL, "one poll's share");
            executor::yield_now().await;
            while q.try_pop().expect("pop").is_some() {
                popped += 1;
            }
            assert_eq!(popped, 200, "the rest after a yield");
        });
        // Outside a task there is no budget.
        assert!(q.try_pop().expect("pop").is_none());
    }

    #[test]
    fn next_valid_chain_gives_a_malformed_chain_back_empty_and_skips_it() {
        let mut f = fixture();
        let q = async_queue(&f, 0);
        let sent = bad_chain_then_good(&mut f);
        let mut invalid = Vec::new();
        let c =
            f.ex.run_until(q.next_valid_chain(|head, _| invalid.push(head)))
                .expect("next");
        assert_eq!((invalid, c.head_index()), (vec![5], sent));
        let used = f.mock.next_used().expect("used").expect("an entry");
        assert_eq!((used.id, used.len), (5, 0));
    }
}
