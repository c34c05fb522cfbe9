//! The ring and its table of in-flight operations.
//!
//! Every submitted operation has a slab entry, keyed by its `user_data`, that lives until the
//! kernel posts the operation's completion. A dropped operation future moves its resources
//! (buffers, iovecs, fds, memory handles) into its entry, so they outlive the kernel's use.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::ring_fd;

/// `user_data` of the persistent read on the wake eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// `user_data` of cancellation requests, whose completions need no handling.
const CANCEL_TOKEN: u64 = u64::MAX - 1;

/// What happens with an operation's completion.
enum Lifecycle {
    /// In the kernel; nobody polled it yet.
    Submitted,
    /// In the kernel; the future is waiting for it.
    Waiting(Waker),
    /// The future was dropped; the resources the kernel may use live here until completion.
    Ignored(Box<dyn Any>, Option<Cleanup>),
    /// Done; the future takes the result at its next poll.
    Completed(i32),
}

/// A CQE result: a count, or an OS error.
#[inline]
pub(crate) fn to_result(res: i32) -> io::Result<i32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
    }
}

/// Runs when an ignored operation completes: releases what the completion created (a received
/// fd, say) that would otherwise leak.
pub(crate) type Cleanup = fn(&mut dyn Any, i32);

pub(crate) struct Driver {
    /// Declared before `ops`: fields drop in order, and the ring must be gone (after
    /// `Driver::shutdown` reaped every completion) before the resources in `ops` are freed.
    ring: IoUring,
    ops: Slab<Lifecycle>,
    /// Generation of each op table slot, bumped when the slot is reused: an op's `user_data`
    /// is `generation << 32 | index`, so a cancel queued for a finished op can never hit a
    /// later op that reuses its slot.
    generations: Vec<u32>,
    /// Operations in the kernel, including ignored ones and the wake read.
    in_flight: usize,
    /// Eventfd that other threads write to wake the ring (owned by the executor's shared
    /// state, which outlives the driver), and the buffer its read fills.
    wake_fd: RawFd,
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Wakers collected while reaping, woken after the driver borrow ends.
    to_wake: Vec<Waker>,
    /// Resources of ignored operations that completed, dropped after the driver borrow ends:
    /// a buffer's drop may run arbitrary code, even code that uses the executor.
    garbage: Vec<Box<dyn Any>>,
    /// The ring's slot in this thread's table of registered rings, if it got one: entered
    /// through it (`ring_fd`), and given back on drop.
    registered: Option<u32>,
}

pub(crate) type DriverRef = Rc<RefCell<Driver>>;

/// io_uring_enter errors that pass: the kernel could not allocate requests right now.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOMEM))
}

impl Driver {
    /// A driver for `ring`, which has `registered` as its slot in this thread's table of
    /// registered rings (`ring_fd::register`), if any.
    pub(crate) fn new(ring: IoUring, wake_fd: RawFd, registered: Option<u32>) -> Driver {
        Driver {
            ring,
            ops: Slab::with_capacity(64),
            generations: Vec::with_capacity(64),
            in_flight: 0,
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            to_wake: Vec::new(),
            garbage: Vec::new(),
            registered,
        }
    }

    /// Whether the ring is entered through this thread's table of registered rings.
    pub(crate) fn registered(&self) -> bool {
        self.registered.is_some()
    }

    /// Submits what is queued and waits for `want` completions: one `io_uring_enter`, through
    /// the registered slot when there is one. Enters for completions (GETEVENTS) when it waits,
    /// and when completions wait in the kernel: an overflowed completion queue, or task work
    /// that COOP_TASKRUN held back (IORING_SQ_TASKRUN).
    fn enter(&mut self, want: u32) -> io::Result<usize> {
        let Some(index) = self.registered else {
            return self.ring.submit_and_wait(want as usize);
        };
        let sq = self.ring.submission();
        let flags = if want > 0 || sq.cq_overflow() || sq.taskrun() {
            ring_fd::ENTER_GETEVENTS
        } else {
            0
        };
        let to_submit = sq.len() as u32;
        drop(sq);
        ring_fd::enter(index, to_submit, want, flags)
    }

    /// The `user_data` of the op in slot `index`.
    #[inline]
    fn token(&self, index: usize) -> u64 {
        (u64::from(self.generations[index]) << 32) | index as u64
    }

    /// Takes a slot for a new op, in the `Submitted` state.
    #[inline]
    fn insert(&mut self) -> usize {
        // A constant, not the variant itself: `Lifecycle::Submitted` passed by value is built
        // on the stack as a 4-byte tag and copied into the slot with 16-byte loads, which
        // the CPU cannot forward from the narrower store and waits for (half the time of
        // `register` on every submission, perf annotate). The constant's bytes are all
        // defined, and go to the slot directly as two 16-byte stores (1.5-2% less time per
        // NOP in a small program of 32 tasks; +1.5% in the executor bench, within its noise).
        const SUBMITTED: Lifecycle = Lifecycle::Submitted;
        let index = self.ops.insert(SUBMITTED);
        if self.generations.len() <= index {
            self.generations.resize(index + 1, 0);
        }
        self.generations[index] = self.generations[index].wrapping_add(1);
        index
    }

    /// Queues one SQE; submits the queue first when it is full.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until its completion is reaped.
    #[inline]
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the pointers in the entry stay valid.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Submits queued SQEs without waiting.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.enter(0) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue overflowed: make room, then try again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap();
                    if self.ring.submission().is_empty() {
                        return Ok(());
                    }
                }
                // The kernel is short of memory for requests: the SQEs stay queued and go
                // with the next submission.
                Err(e) if is_transient(&e) => {
                    self.reap();
                    std::thread::yield_now();
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits queued SQEs and blocks until at least one completion is ready.
    pub(crate) fn submit_and_wait(&mut self) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            return self.submit();
        }
        match self.enter(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || is_transient(&e) => {
                self.reap();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether SQEs are waiting to be submitted.
    pub(crate) fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Whether SQEs are waiting to be submitted, or completions wait in the kernel for this
    /// thread to enter it (IORING_SQ_TASKRUN: with COOP_TASKRUN the kernel does not interrupt
    /// a running thread to post them; `submit` enters the kernel and posts them).
    pub(crate) fn needs_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun()
    }

    /// Makes sure the wake eventfd has a read in the ring.
    pub(crate) fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let sqe = opcode::Read::new(
            types::Fd(self.wake_fd),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is boxed (stable) and owned by the driver, which reaps every
        // completion in `shutdown` before it drops.
        unsafe { self.push(&sqe)? };
        self.wake_armed = true;
        self.in_flight += 1;
        Ok(())
    }

    /// Moves completions from the ring into the op table. Returns how many were reaped;
    /// the wakers to wake are left in `to_wake`.
    pub(crate) fn reap(&mut self) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            n += 1;
            let token = cqe.user_data();
            if token == CANCEL_TOKEN {
                continue;
            }
            self.in_flight -= 1;
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                continue;
            }
            let index = (token & 0xffff_ffff) as usize;
            if self.generations.get(index).map(|g| u64::from(*g)) != Some(token >> 32) {
                continue;
            }
            let Some(state) = self.ops.get_mut(index) else {
                continue;
            };
            match std::mem::replace(state, Lifecycle::Completed(cqe.result())) {
                Lifecycle::Submitted => {}
                Lifecycle::Waiting(waker) => self.to_wake.push(waker),
                Lifecycle::Ignored(data, cleanup) => {
                    self.ops.remove(index);
                    let mut data = data;
                    if let Some(cleanup) = cleanup {
                        cleanup(&mut *data, cqe.result());
                    }
                    self.garbage.push(data);
                }
                Lifecycle::Completed(_) => {}
            }
        }
        n
    }

    /// Takes the wakers collected by `reap`, and the resources of completed ignored ops; the
    /// caller wakes and drops them once the driver is no longer borrowed.
    pub(crate) fn take_ready(&mut self, wakers: &mut Vec<Waker>, garbage: &mut Vec<Box<dyn Any>>) {
        wakers.append(&mut self.to_wake);
        garbage.append(&mut self.garbage);
    }

    /// Whether `reap` left wakers or garbage for `take_ready`.
    pub(crate) fn has_ready(&self) -> bool {
        !self.to_wake.is_empty() || !self.garbage.is_empty()
    }

    /// The result of op `index` if it completed (its slot freed); else `Pending`, with
    /// `waker` stored to be woken at the completion. A state it replaces (a waker of an
    /// earlier poll, say) goes to the garbage, dropped once the driver is released: a
    /// waker's drop may run arbitrary code.
    #[inline]
    fn poll_op(&mut self, index: usize, waker: &Waker) -> Poll<i32> {
        let state = self
            .ops
            .get_mut(index)
            .expect("an in-flight op keeps its slab entry");
        match state {
            Lifecycle::Completed(res) => {
                let res = *res;
                self.ops.remove(index);
                Poll::Ready(res)
            }
            Lifecycle::Submitted => {
                *state = Lifecycle::Waiting(waker.clone());
                Poll::Pending
            }
            Lifecycle::Waiting(w) if w.will_wake(waker) => Poll::Pending,
            _ => {
                let old = std::mem::replace(state, Lifecycle::Waiting(waker.clone()));
                self.garbage.push(Box::new(old));
                Poll::Pending
            }
        }
    }

    fn cancel(&mut self, index: usize) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(self.token(index))
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: a cancel request holds no pointers.
        unsafe { self.push(&sqe) }
    }

    /// Takes every waker out of the op table (their operations stay in flight), so that the
    /// tasks they keep alive can be dropped.
    pub(crate) fn take_waiting_wakers(&mut self) -> Vec<Waker> {
        let mut wakers = Vec::new();
        for (_, state) in self.ops.iter_mut() {
            if let Lifecycle::Waiting(_) = state {
                if let Lifecycle::Waiting(w) = std::mem::replace(state, Lifecycle::Submitted) {
                    wakers.push(w);
                }
            }
        }
        wakers
    }

    /// Cancels every operation in the kernel and waits for all of their completions.
    /// Afterwards the kernel holds no pointer into memory of this process.
    pub(crate) fn shutdown(&mut self) {
        let pending: Vec<usize> = self
            .ops
            .iter()
            .filter(|(_, s)| !matches!(s, Lifecycle::Completed(_)))
            .map(|(i, _)| i)
            .collect();
        for index in pending {
            // A cancel that cannot even be queued leaves us waiting for the op's own completion.
            let _ = self.cancel(index);
        }
        if self.wake_armed {
            let sqe = opcode::AsyncCancel::new(WAKE_TOKEN)
                .build()
                .user_data(CANCEL_TOKEN);
            // SAFETY: a cancel request holds no pointers.
            let _ = unsafe { self.push(&sqe) };
        }
        while self.in_flight > 0 {
            if let Err(e) = self.submit_and_wait() {
                // Without a working ring nothing more will complete; freeing the resources
                // now could let the kernel write freed memory, so leak them instead.
                eprintln!("executor: cannot reap in-flight io_uring operations: {e}");
                std::mem::forget(std::mem::take(&mut self.ops));
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
                return;
            }
            self.reap();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Before the ring's descriptor closes: the slot holds the ring, which would otherwise
        // live on, with its registered files, until the thread exits.
        if let Some(index) = self.registered.take() {
            if let Err(e) = ring_fd::unregister(self.ring.as_raw_fd(), index) {
                eprintln!("executor: cannot give back the ring's registered slot {index}: {e}");
            }
        }
    }
}

/// Queues `sqe` (whose `user_data` is set here) for the op table entry it gets.
///
/// # Safety
/// Every pointer in `sqe` must stay valid until the completion is reaped.
#[inline]
unsafe fn register(driver: &DriverRef, sqe: &squeue::Entry) -> io::Result<usize> {
    let mut d = driver.borrow_mut();
    let index = d.insert();
    let sqe = sqe.clone().user_data(d.token(index));
    // SAFETY: forwarded from the caller.
    match unsafe { d.push(&sqe) } {
        Ok(()) => {
            d.in_flight += 1;
            Ok(index)
        }
        Err(e) => {
            d.ops.remove(index);
            Err(e)
        }
    }
}

/// Submits `sqe` (whose `user_data` is set here) for an operation that owns `data`.
///
/// # Safety
/// Every pointer in `sqe` must point into `data` (valid at the same address even when `data`
/// moves) or into memory that outlives the operation.
#[inline(always)]
pub(crate) unsafe fn submit<T: 'static>(
    driver: DriverRef,
    sqe: squeue::Entry,
    data: T,
    cleanup: Option<Cleanup>,
) -> Op<T> {
    // SAFETY: forwarded from the caller; `data` moves into the op, which keeps it (or hands
    // it to the op table) until the completion is reaped.
    let state = match unsafe { register(&driver, &sqe) } {
        Ok(index) => State::InFlight { driver, index },
        Err(e) => State::Failed(e),
    };
    Op {
        state,
        data: Some(data),
        cleanup,
    }
}

/// Where an [`Op`] stands.
enum State {
    /// Made while no executor ran on this thread: submitted at the first poll, on the executor
    /// running then (or resolved to an error if there is none).
    /// Boxed: the rare path should not make every op future 64 bytes larger.
    Deferred(Box<squeue::Entry>),
    /// In the op table of this driver.
    InFlight { driver: DriverRef, index: usize },
    /// The SQE could not be queued: resolve to this error.
    Failed(io::Error),
    /// Resolved (or never in a ring): nothing in the kernel refers to the op.
    Done,
}

/// An operation in flight. Resolves to the kernel's result (`res` of the CQE) and the data it
/// owned. Dropping it before completion cancels the operation.
pub(crate) struct Op<T: 'static> {
    state: State,
    data: Option<T>,
    cleanup: Option<Cleanup>,
}

impl<T: 'static> Op<T> {
    /// An operation made outside any executor: it enters the ring of the executor that first
    /// polls it.
    ///
    /// # Safety
    /// As for [`submit`]: every pointer in `sqe` points into `data` (stable when `data` moves)
    /// or into memory that outlives the operation.
    pub(crate) unsafe fn deferred(sqe: squeue::Entry, data: T, cleanup: Option<Cleanup>) -> Op<T> {
        Op {
            state: State::Deferred(Box::new(sqe)),
            data: Some(data),
            cleanup,
        }
    }
}

impl<T: 'static> Op<T> {
    /// The op with `f` applied to its output: a small named future, where an `async` block
    /// around the op would store it twice.
    pub(crate) fn map<F, O>(self, f: F) -> Map<T, F>
    where
        F: FnOnce(io::Result<i32>, T) -> O + Unpin,
    {
        Map {
            op: self,
            f: Some(f),
        }
    }
}

/// See [`Op::map`].
pub(crate) struct Map<T: 'static, F> {
    op: Op<T>,
    f: Option<F>,
}

impl<T: 'static, F, O> Future for Map<T, F>
where
    F: FnOnce(io::Result<i32>, T) -> O + Unpin,
{
    type Output = O;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let this = &mut *self;
        let (res, data) = std::task::ready!(Pin::new(&mut this.op).poll(cx));
        let f = this
            .f
            .take()
            .expect("a mapped op is polled after completion");
        Poll::Ready(f(res, data))
    }
}

impl<T: 'static> Unpin for Op<T> {}

impl<T: 'static> Future for Op<T> {
    type Output = (io::Result<i32>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let State::Deferred(sqe) = &this.state {
            this.state = match crate::runtime::current_driver() {
                // SAFETY: `deferred`'s caller guaranteed the pointers in the entry point into
                // `data`, which this op owns from now until the completion is reaped.
                Ok(driver) => match unsafe { register(&driver, sqe.as_ref()) } {
                    Ok(index) => State::InFlight { driver, index },
                    Err(e) => State::Failed(e),
                },
                Err(e) => State::Failed(e),
            };
        }
        let (driver, index) = match &this.state {
            State::InFlight { driver, index } => (driver, *index),
            State::Failed(_) => {
                let State::Failed(e) = std::mem::replace(&mut this.state, State::Done) else {
                    unreachable!("matched just above");
                };
                let data = this.data.take().expect("an op is polled after completion");
                return Poll::Ready((Err(e), data));
            }
            State::Deferred(_) | State::Done => panic!("an op is polled after completion"),
        };
        let res = std::task::ready!(driver.borrow_mut().poll_op(index, cx.waker()));
        this.state = State::Done;
        let data = this.data.take().expect("an op completes once");
        Poll::Ready((to_result(res), data))
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let State::InFlight { driver, index } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        let Ok(mut d) = driver.try_borrow_mut() else {
            // Only reachable if an op is dropped from inside the driver (a cleanup or a
            // waker drop): keep the resources rather than risk freeing them early.
            std::mem::forget(self.data.take());
            return;
        };
        let Some(state) = d.ops.get_mut(index) else {
            // Only after a failed `shutdown` gave up on the ring: the kernel may still use
            // the resources, so leak them.
            std::mem::forget(self.data.take());
            return;
        };
        match state {
            Lifecycle::Completed(res) => {
                let res = *res;
                d.ops.remove(index);
                drop(d);
                if let (Some(cleanup), Some(data)) = (self.cleanup, self.data.as_mut()) {
                    cleanup(data, res);
                }
            }
            _ => {
                let data: Box<dyn Any> = match self.data.take() {
                    Some(data) => Box::new(data),
                    None => Box::new(()),
                };
                let old = std::mem::replace(state, Lifecycle::Ignored(data, self.cleanup));
                // If the cancel cannot be queued the op still completes on its own.
                let _ = d.cancel(index);
                drop(d);
                drop(old);
            }
        }
    }
}

/// Submits `sqes` (their `user_data` set here), each an operation of its own in the op
/// table, that together own `data`. Resolves to their results in order once all completed.
///
/// # Safety
/// Every pointer in every entry must point into `data` (valid at the same address even when
/// `data` moves) or into memory that outlives the operations.
pub(crate) unsafe fn submit_all<T: 'static>(
    driver: DriverRef,
    sqes: impl IntoIterator<Item = squeue::Entry>,
    data: T,
) -> Ops<T> {
    let slots = sqes
        .into_iter()
        // SAFETY: forwarded from the caller; `data` moves into the ops, which keep it (or
        // hand it, shared, to the op table) until every completion is reaped.
        .map(|sqe| match unsafe { register(&driver, &sqe) } {
            Ok(index) => Slot::InFlight(index),
            Err(e) => Slot::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
        })
        .collect();
    Ops {
        driver,
        slots,
        data: Some(Rc::new(data)),
    }
}

/// Where one of the [`Ops`] stands.
enum Slot {
    /// In the op table at this index.
    InFlight(usize),
    /// Completed with this result (`res` of the CQE).
    Done(i32),
}

/// Operations submitted at once that share what they own: one future for a batch (the reads
/// of a round, say) instead of one per operation. Resolves, once every one completed, to
/// their results (`res` of each CQE) in submission order and the data. Dropping it first
/// cancels those still in the kernel; the data lives on, shared, in their op table entries
/// until the last completion is reaped.
pub(crate) struct Ops<T: 'static> {
    driver: DriverRef,
    slots: Vec<Slot>,
    /// `None` once resolved.
    data: Option<Rc<T>>,
}

impl<T: 'static> Unpin for Ops<T> {}

impl<T: 'static> Future for Ops<T> {
    type Output = (Vec<i32>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        assert!(this.data.is_some(), "ops are polled after completion");
        let mut d = this.driver.borrow_mut();
        for slot in &mut this.slots {
            let Slot::InFlight(index) = *slot else {
                continue;
            };
            // Only the first one still in the kernel wakes the task: the batch is done no
            // sooner than it is.
            match d.poll_op(index, cx.waker()) {
                Poll::Ready(res) => *slot = Slot::Done(res),
                Poll::Pending => return Poll::Pending,
            }
        }
        drop(d);
        let results = this
            .slots
            .iter()
            .map(|s| match s {
                Slot::Done(res) => *res,
                Slot::InFlight(_) => unreachable!("every op completed"),
            })
            .collect();
        let data = this.data.take().expect("checked above");
        let data = Rc::try_unwrap(data)
            .unwrap_or_else(|_| unreachable!("only dropped ops share their data"));
        Poll::Ready((results, data))
    }
}

impl<T: 'static> Drop for Ops<T> {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else {
            return;
        };
        let Ok(mut d) = self.driver.try_borrow_mut() else {
            // Only reachable from inside the driver (a cleanup or a waker drop): keep the
            // resources rather than risk freeing them early.
            std::mem::forget(data);
            return;
        };
        let mut old = Vec::new();
        for slot in &self.slots {
            let Slot::InFlight(index) = *slot else {
                continue;
            };
            match d.ops.get_mut(index) {
                Some(Lifecycle::Completed(_)) => {
                    d.ops.remove(index);
                }
                Some(state) => {
                    let shared: Box<dyn Any> = Box::new(data.clone());
                    old.push(std::mem::replace(state, Lifecycle::Ignored(shared, None)));
                    // If the cancel cannot be queued the op still completes on its own.
                    let _ = d.cancel(index);
                }
                None => {
                    // Only after a failed `shutdown` gave up on the ring: the kernel may
                    // still use the resources, so leak them.
                    std::mem::forget(data.clone());
                }
            }
        }
        drop(d);
        drop(old);
        drop(data);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;

    use super::*;

    /// A driver on a small ring, with an eventfd standing in for the executor's wake fd.
    fn driver() -> (DriverRef, OwnedFd) {
        // SAFETY: plain syscall; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let ring = IoUring::new(8).unwrap();
        (
            Rc::new(RefCell::new(Driver::new(ring, wake.as_raw_fd(), None))),
            wake,
        )
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are new and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn reused_slot_gets_a_new_token() {
        let (d, _wake) = driver();
        let mut d = d.borrow_mut();
        let a = d.insert();
        let first = d.token(a);
        d.ops.remove(a);
        let b = d.insert();
        assert_eq!(a, b, "the slab reuses the slot");
        assert_ne!(
            d.token(b),
            first,
            "a cancel aimed at the old op cannot match the new one"
        );
        assert_eq!(d.token(b) & 0xffff_ffff, b as u64);
    }

    /// A read of `buf` (owned by the op, with a token to watch its lifetime) on `fd`.
    fn read_op(d: &DriverRef, fd: &OwnedFd, token: &Arc<()>) -> Op<(Box<[u8]>, Arc<()>)> {
        let mut buf = vec![0u8; 16].into_boxed_slice();
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), 16).build();
        // SAFETY: the entry points into the boxed slice the op owns.
        unsafe { submit(d.clone(), sqe, (buf, token.clone()), None) }
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = futures::task::noop_waker();
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn dropped_op_keeps_its_data_until_the_completion_is_reaped() {
        let (d, _wake) = driver();
        let (r, _w) = pipe();
        let token = Arc::new(());
        let mut op = read_op(&d, &r, &token);
        assert!(poll_once(&mut op).is_pending());
        d.borrow_mut().submit().unwrap();
        drop(op);
        assert!(matches!(
            d.borrow().ops.get(0),
            Some(Lifecycle::Ignored(..))
        ));
        assert_eq!(Arc::strong_count(&token), 2);
        // The cancel is queued; submit it and reap the read's completion.
        while !d.borrow().ops.is_empty() {
            d.borrow_mut().submit_and_wait().unwrap();
            d.borrow_mut().reap();
        }
        assert_eq!(d.borrow().in_flight, 0);
        // Reaped, but dropped only by whoever takes the garbage (outside the borrow).
        assert_eq!(Arc::strong_count(&token), 2);
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        d.borrow_mut().take_ready(&mut wakers, &mut garbage);
        assert_eq!(garbage.len(), 1);
        drop(garbage);
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn completed_op_resolves_with_its_data() {
        let (d, _wake) = driver();
        let (r, w) = pipe();
        // SAFETY: writes 3 bytes from a live array to a pipe we own.
        let n = unsafe { libc::write(w.as_raw_fd(), b"abc".as_ptr().cast(), 3) };
        assert_eq!(n, 3);
        let token = Arc::new(());
        let mut op = read_op(&d, &r, &token);
        d.borrow_mut().submit_and_wait().unwrap();
        d.borrow_mut().reap();
        let Poll::Ready((res, (buf, _))) = poll_once(&mut op) else {
            panic!("the read completed");
        };
        assert_eq!(res.unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert!(d.borrow().ops.is_empty());
    }

    #[test]
    fn negative_results_become_os_errors() {
        let (d, _wake) = driver();
        let token = Arc::new(());
        let (r, w) = pipe();
        drop(w);
        // Writing to the read end of a pipe: EBADF.
        let mut buf = vec![0u8; 4].into_boxed_slice();
        let sqe = opcode::Write::new(types::Fd(r.as_raw_fd()), buf.as_mut_ptr(), 4).build();
        // SAFETY: the entry points into the boxed slice the op owns.
        let mut op = unsafe { submit(d.clone(), sqe, (buf, token), None) };
        d.borrow_mut().submit_and_wait().unwrap();
        d.borrow_mut().reap();
        let Poll::Ready((res, _)) = poll_once(&mut op) else {
            panic!("the write completed");
        };
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn shutdown_cancels_and_reaps_everything() {
        let (d, _wake) = driver();
        let (r, _w) = pipe();
        let token = Arc::new(());
        // More ops than ring entries, some dropped, some still owned by their futures.
        let mut kept: Vec<_> = (0..10).map(|_| read_op(&d, &r, &token)).collect();
        for op in &mut kept {
            assert!(poll_once(op).is_pending());
        }
        for _ in 0..10 {
            drop(read_op(&d, &r, &token));
        }
        d.borrow_mut().arm_wake().unwrap();
        d.borrow_mut().shutdown();
        assert_eq!(d.borrow().in_flight, 0);
        assert!(!d.borrow().wake_armed);
        for mut op in kept {
            let Poll::Ready((res, _)) = poll_once(&mut op) else {
                panic!("shut down: every op completed");
            };
            assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
        }
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        d.borrow_mut().take_ready(&mut wakers, &mut garbage);
        drop(garbage);
        assert_eq!(Arc::strong_count(&token), 1);
        assert!(d.borrow().ops.is_empty());
    }

    #[test]
    fn waiting_op_wakes_its_task_once_reaped() {
        let (d, _wake) = driver();
        let (r, w) = pipe();
        let token = Arc::new(());
        let mut op = read_op(&d, &r, &token);
        assert!(poll_once(&mut op).is_pending());
        assert!(matches!(d.borrow().ops.get(0), Some(Lifecycle::Waiting(_))));
        // SAFETY: writes 1 byte from a live array to a pipe we own.
        let n = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(n, 1);
        while !d.borrow().has_ready() {
            d.borrow_mut().submit_and_wait().unwrap();
            d.borrow_mut().reap();
        }
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        d.borrow_mut().take_ready(&mut wakers, &mut garbage);
        assert_eq!((wakers.len(), garbage.len()), (1, 0));
        assert!(matches!(poll_once(&mut op), Poll::Ready((Ok(1), _))));
    }

    /// A waker that counts its wakes and its live clones.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn repoll_with_a_new_waker_wakes_only_the_new_one_and_drops_the_old_outside_the_borrow() {
        let (d, _wake) = driver();
        let (r, w) = pipe();
        let token = Arc::new(());
        let mut op = read_op(&d, &r, &token);
        let (a, b) = (
            Arc::new(Counting(Default::default())),
            Arc::new(Counting(Default::default())),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(Pin::new(&mut op)
            .poll(&mut Context::from_waker(&wa))
            .is_pending());
        // The same waker again: kept, not cloned.
        assert!(Pin::new(&mut op)
            .poll(&mut Context::from_waker(&wa))
            .is_pending());
        assert_eq!(Arc::strong_count(&a), 3);
        assert!(Pin::new(&mut op)
            .poll(&mut Context::from_waker(&wb))
            .is_pending());
        // The old clone waits in the garbage: its drop may run code that needs the driver.
        assert_eq!(Arc::strong_count(&a), 3);
        assert_eq!(Arc::strong_count(&b), 3);
        assert!(d.borrow().has_ready());
        // SAFETY: writes 1 byte from a live array to a pipe we own.
        let n = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(n, 1);
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        while wakers.is_empty() {
            d.borrow_mut().submit_and_wait().unwrap();
            d.borrow_mut().reap();
            d.borrow_mut().take_ready(&mut wakers, &mut garbage);
        }
        drop(garbage);
        assert_eq!(Arc::strong_count(&a), 2, "the replaced clone is dropped");
        for waker in wakers.drain(..) {
            waker.wake();
        }
        let wakes = |c: &Counting| c.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((wakes(&a), wakes(&b)), (0, 1));
        assert!(matches!(
            Pin::new(&mut op).poll(&mut Context::from_waker(&wb)),
            Poll::Ready((Ok(1), _))
        ));
    }

    #[test]
    fn deferred_op_polled_outside_an_executor_fails() {
        let token = Arc::new(());
        // SAFETY: a NOP holds no pointers.
        let mut op = unsafe { Op::deferred(opcode::Nop::new().build(), token.clone(), None) };
        let Poll::Ready((res, _)) = poll_once(&mut op) else {
            panic!("no executor: resolves at once");
        };
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::Other);
        drop(op);
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
