//! A task's budget per poll: a task that always has work (a device whose guest keeps its
//! queue full of chains that need no I/O) goes back to the executor after its share, and
//! the others, and the ring's completions, get their turn.

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::rc::Rc;

use executor::{budget, Executor};

/// A task that spends its whole budget on every poll, forever, counting its polls (what
/// `virtio::AsyncQueue` makes of a device task whose queue always has a chain).
async fn spinner(polls: Rc<Cell<u32>>) {
    loop {
        std::future::poll_fn(budget::poll_left).await;
        polls.set(polls.get() + 1);
        while budget::left() {
            budget::spend();
        }
    }
}

#[test]
fn completions_are_not_held_back_by_a_task_that_always_has_work() {
    let ex = Executor::new().unwrap();
    let polls = Rc::new(Cell::new(0));
    ex.run_until(async {
        executor::spawn(spinner(polls.clone())).detach();
        for _ in 0..100 {
            executor::nop().await.unwrap();
        }
    });
    // Each NOP's completion is reaped after at most a round of the run queue: the spinner
    // runs once or twice per NOP, not for a whole batch of task polls (256) each time.
    let per_nop = f64::from(polls.get()) / 100.0;
    assert!(per_nop <= 4.0, "the spinner ran {per_nop} times per NOP");
}
