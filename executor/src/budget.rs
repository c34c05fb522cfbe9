//! How much queue work a task may do in one poll (cooperative scheduling).
//!
//! A task that finds its next piece of work always ready never returns `Pending`, and then
//! the executor runs nothing else: not the task that serves the frontend's messages, not
//! the other queues, not the stop of its own queue. A guest can make that happen on purpose:
//! a ring whose used entries land on its own avail index hands the device a new malformed
//! chain for every one it gives back, none of them needing I/O. So each time the executor
//! polls a task it gives it [`PER_POLL`] units; `virtio::AsyncQueue` spends one per chain it
//! pops. With none left, the queue says nothing is available now ([`left`]) or wakes the
//! task and returns `Pending` ([`poll_left`]), so the task goes back to the executor, which
//! runs the others before it polls this one again with a new budget. Outside a task (no
//! executor on the thread) the budget is unlimited.

use std::cell::Cell;
use std::task::{Context, Poll};

/// Units a task gets each time the executor polls it: chains popped, with
/// `virtio::AsyncQueue`. One extra trip through the run queue per this many costs a device
/// well under a nanosecond per chain.
pub const PER_POLL: u32 = 128;

const UNLIMITED: u32 = u32::MAX;

thread_local! {
    static LEFT: Cell<u32> = const { Cell::new(UNLIMITED) };
}

/// Sets the budget for the task about to be polled; returns the one it replaces.
#[inline]
pub(crate) fn set(units: u32) -> u32 {
    // Fails only while this thread's locals are destroyed: nothing is polled then.
    LEFT.try_with(|l| l.replace(units)).unwrap_or(UNLIMITED)
}

/// A fresh budget for one poll.
pub(crate) fn fresh() -> u32 {
    set(PER_POLL)
}

/// Whether the running task has budget left.
#[inline]
pub fn left() -> bool {
    LEFT.try_with(|l| l.get() > 0).unwrap_or(true)
}

/// Spends one unit of the running task's budget (none left: nothing happens).
#[inline]
pub fn spend() {
    let _ = LEFT.try_with(|l| l.set(l.get().saturating_sub(1)));
}

/// `Ready` while the running task has budget left; otherwise wakes it and returns `Pending`,
/// so that it yields to the executor, which polls it again with a new budget after the
/// other tasks ran. Spends nothing.
#[inline]
pub fn poll_left(cx: &mut Context<'_>) -> Poll<()> {
    if left() {
        Poll::Ready(())
    } else {
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_task_the_budget_is_unlimited() {
        for _ in 0..1000 {
            assert!(left());
            spend();
        }
    }
}
