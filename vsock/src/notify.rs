//! A one-waiter wake-up flag for tasks on one executor thread.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A level-triggered flag with one waiter: [`Notify::notify`] sets it and wakes the task in
/// [`Notify::wait`], which clears it. A task re-checks its condition after every wake-up, so
/// a wake-up from an earlier change is harmless and none is lost in between.
#[derive(Debug, Default)]
pub(crate) struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Sets the flag and wakes the waiter, if any.
    pub(crate) fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until the flag is set, and clears it.
    pub(crate) async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                return Poll::Ready(());
            }
            let mut waker = self.waker.borrow_mut();
            match waker.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;

    use super::*;

    #[test]
    fn a_notify_before_the_wait_is_kept_and_consumed_once() {
        let n = Notify::default();
        n.notify();
        futures::executor::block_on(n.wait());
        let mut again = pin!(n.wait());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(again.as_mut().poll(&mut cx).is_pending());
        n.notify();
        assert!(again.as_mut().poll(&mut cx).is_ready());
    }
}
