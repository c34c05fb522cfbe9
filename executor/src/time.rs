//! Timers on the ring.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use futures::future::{select, Either};
use io_uring::{opcode, types};

use crate::fd::submit;

/// Error of [`timeout`]: the deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

impl From<Elapsed> for io::Error {
    fn from(_: Elapsed) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, Elapsed)
    }
}

/// Completes after `duration` (IORING_OP_TIMEOUT, on the monotonic clock).
pub fn sleep(duration: Duration) -> impl Future<Output = io::Result<()>> + 'static {
    let ts = Box::new(types::Timespec::from(duration));
    let sqe = opcode::Timeout::new(&*ts).build();
    // SAFETY: the timespec is boxed and owned by the op.
    let op = unsafe { submit(sqe, ts, None) };
    async move {
        match op.await.0 {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }
}

/// Runs `future` until it completes or `duration` passes, whichever is first. A timed-out
/// future is dropped (its operations cancelled).
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    let future = pin!(future);
    let timer = pin!(sleep(duration));
    match select(future, timer).await {
        Either::Left((out, _)) => Ok(out),
        // A timer that cannot be armed never fires: the future alone decides then.
        Either::Right((Err(_), future)) => Ok(future.await),
        Either::Right((Ok(()), _)) => Err(Elapsed),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_is_a_timed_out_io_error() {
        let e = io::Error::from(Elapsed);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "deadline elapsed");
    }

    #[test]
    fn sleep_outside_an_executor_fails() {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut s = std::pin::pin!(sleep(Duration::from_secs(60)));
        assert!(matches!(
            s.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Err(_))
        ));
    }

    #[test]
    fn timeout_without_a_timer_lets_the_future_decide() {
        // Outside an executor the timer cannot be armed: the future's output is returned.
        let out = futures::executor::block_on(timeout(Duration::ZERO, async { 3 }));
        assert_eq!(out, Ok(3));
    }
}
