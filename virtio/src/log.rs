//! Messages a guest causes (malformed chains, failed requests, frames that do not fit), under
//! one rate limit shared by every device: a guest can make a device log as often as it can
//! notify it, and the host's log must not grow with that.
//!
//! # Policy
//! [`GuestLog`] writes the first [`GuestLog::BURST`] messages in full. After that a message
//! is only counted, except the one that brings the count to a power of two (16, 32, 64,
//! ...), which is written with a summary of what was not: how many messages since the last
//! line, and how many in all. [`GuestLog::flush`] (called when a device's queues stop, and
//! on drop) writes the count left over. So `n` messages make at most
//! `BURST + log2(n) + 1` lines (1024 make 15), a burst is always seen in full, and the
//! counts are never lost. Counting, not time, decides: a device reads no clock (its
//! seccomp policy has no clock_gettime for when the vDSO cannot answer).
//!
//! Errors that are not the guest's (the host's disk or tap failing, a queue's rings gone)
//! are not rate-limited: a device logs those directly.

use std::cell::Cell;
use std::fmt;

/// The log of guest-caused messages of one device (see the module docs).
#[derive(Debug)]
pub struct GuestLog {
    /// `ringvm device rng`: what every line starts with.
    prefix: &'static str,
    /// Messages so far.
    count: Cell<u64>,
    /// Messages counted but not written since the last line.
    suppressed: Cell<u64>,
}

impl GuestLog {
    /// Messages written in full before the limit starts.
    pub const BURST: u64 = 8;

    /// The log of `ringvm device <device>`.
    pub fn new(device: &'static str) -> GuestLog {
        GuestLog {
            prefix: device,
            count: Cell::new(0),
            suppressed: Cell::new(0),
        }
    }

    /// Writes `what` to stderr, or counts it; returns whether a line was written.
    pub fn log(&self, what: impl fmt::Display) -> bool {
        match self.line(what) {
            Some(line) => {
                eprintln!("{line}");
                true
            }
            None => false,
        }
    }

    /// Writes how many messages were counted but not written since the last line, if any.
    pub fn flush(&self) {
        if let Some(line) = self.flush_line() {
            eprintln!("{line}");
        }
    }

    /// Messages so far, written or not.
    pub fn count(&self) -> u64 {
        self.count.get()
    }

    /// The line `log` writes for `what`, if any.
    fn line(&self, what: impl fmt::Display) -> Option<String> {
        let n = self.count.get().saturating_add(1);
        self.count.set(n);
        if n <= Self::BURST {
            return Some(format!("ringvm device {}: {what}", self.prefix));
        }
        if !n.is_power_of_two() {
            self.suppressed.set(self.suppressed.get().saturating_add(1));
            return None;
        }
        let skipped = self.suppressed.replace(0);
        Some(format!(
            "ringvm device {}: {what} (guest errors: {skipped} not logged since the last \
             line, {n} in all)",
            self.prefix
        ))
    }

    fn flush_line(&self) -> Option<String> {
        let skipped = self.suppressed.replace(0);
        (skipped > 0).then(|| {
            format!(
                "ringvm device {}: guest errors: {skipped} not logged since the last line, {} \
                 in all",
                self.prefix,
                self.count.get()
            )
        })
    }
}

impl Drop for GuestLog {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_only_powers_of_two_with_what_was_skipped() {
        let log = GuestLog::new("test");
        let written: Vec<u64> = (1..=100u64)
            .filter(|_| log.line("bad chain").is_some())
            .collect();
        assert_eq!(written, [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]);
        assert_eq!(log.count(), 100);
        // 65..=100 were counted since the line at 64.
        assert_eq!(
            log.flush_line().as_deref(),
            Some("ringvm device test: guest errors: 36 not logged since the last line, 100 in all")
        );
        assert_eq!(log.flush_line(), None, "flushed once");
    }

    #[test]
    fn a_summary_line_says_what_it_skipped() {
        let log = GuestLog::new("rng");
        for _ in 0..15 {
            log.line("x");
        }
        assert_eq!(
            log.line("invalid chain at head 3").as_deref(),
            Some(
                "ringvm device rng: invalid chain at head 3 (guest errors: 7 not logged since \
                 the last line, 16 in all)"
            )
        );
    }

    #[test]
    fn lines_grow_with_the_log_of_the_count() {
        let log = GuestLog::new("test");
        let lines = (0..1024).filter(|_| log.line("x").is_some()).count();
        assert_eq!(lines as u64, GuestLog::BURST + 7, "8 + 16, 32, ..., 1024");
        assert_eq!(
            log.flush_line(),
            None,
            "1024 was written: nothing left over"
        );
    }
}
