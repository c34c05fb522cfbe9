//! Why the VM ends: reported once by whoever sees it first, waited for by the main thread.

use std::sync::Mutex;

use executor::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault): ringvm ends like crosvm does.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// `ringvm stop` on the control socket.
    Stopped,
    /// Something went wrong; the text names the cause.
    Failed(String),
}

impl ExitReason {
    pub fn is_success(&self) -> bool {
        !matches!(self, ExitReason::Failed(_))
    }
}

/// The first reported reason, and an eventfd that wakes the main thread.
#[derive(Debug)]
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl VmExit {
    pub fn new() -> std::io::Result<VmExit> {
        Ok(VmExit {
            reason: Mutex::new(None),
            event: EventFd::new()?,
        })
    }

    /// Records `reason` unless one was recorded already, and wakes the main thread.
    pub fn report(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        // Cannot fail short of a counter overflow; the reason is recorded either way.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A stream of the wake events, for the main thread's executor.
    pub fn events(&self) -> std::io::Result<executor::EventFdStream> {
        Ok(self.event.try_clone()?.into_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let e = VmExit::new().expect("eventfd");
        e.report(ExitReason::Reset);
        e.report(ExitReason::Failed("late".into()));
        assert_eq!(e.reason(), Some(ExitReason::Reset));
    }
}
