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
//!
//! # One line format, one level
//! Every line ringvm and its device processes write is `SOURCE: [LEVEL: ]MESSAGE` on
//! stderr, in one write(2): `SOURCE` is `ringvm` or `ringvm device NAME`, `LEVEL` is absent
//! for errors and `warning`, `info` or `debug` otherwise (as compilers write theirs).
//! `--log-level error|warn|info|debug` ([`set_level`], default `info`) drops what is less
//! severe; guest-caused messages are warnings, and are counted by [`GuestLog`] whether they
//! are written or not.

use std::cell::Cell;
use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

/// How severe a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    Error = 0,
    Warn = 1,
    #[default]
    Info = 2,
    Debug = 3,
}

impl Level {
    /// What a line of this level says after its source.
    fn tag(self) -> &'static str {
        match self {
            Level::Error => "",
            Level::Warn => "warning: ",
            Level::Info => "info: ",
            Level::Debug => "debug: ",
        }
    }

    /// The name `--log-level` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Level, String> {
        Ok(match s {
            "error" => Level::Error,
            "warn" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            other => return Err(format!("{other}: expected error, warn, info or debug")),
        })
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Lines less severe than `level` are dropped from now on (for the whole process).
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The current level.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Level::Error,
        1 => Level::Warn,
        2 => Level::Info,
        _ => Level::Debug,
    }
}

/// Whether a line of `level` is written.
pub fn enabled(level: Level) -> bool {
    level <= self::level()
}

/// The line for `what` from `source` at `level` (without its newline).
pub fn format_line(source: &str, level: Level, what: impl fmt::Display) -> String {
    format!("{source}: {}{what}", level.tag())
}

/// Writes `what` from `source` (`ringvm`, `ringvm device block`) at `level`, if enabled: one
/// line, one write.
pub fn write(source: &str, level: Level, what: impl fmt::Display) {
    if enabled(level) {
        let mut line = format_line(source, level, what);
        line.push('\n');
        // Nothing to do if stderr is gone.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// The log of guest-caused messages of one device (see the module docs).
#[derive(Debug)]
pub struct GuestLog {
    /// `ringvm device rng`: what every line starts with.
    source: String,
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
        GuestLog::with_source(format!("ringvm device {device}"))
    }

    /// The log of lines that start with `source` (`ringvm: device block0` in the VMM).
    pub fn with_source(source: String) -> GuestLog {
        GuestLog {
            source,
            count: Cell::new(0),
            suppressed: Cell::new(0),
        }
    }

    /// Writes `what` to stderr as a warning, or counts it; returns whether a line was
    /// written (a line the log level drops still counts as written for the rate limit).
    pub fn log(&self, what: impl fmt::Display) -> bool {
        if !enabled(Level::Warn) {
            self.count.set(self.count.get().saturating_add(1));
            return false;
        }
        match self.line(what) {
            Some(line) => {
                let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
                true
            }
            None => false,
        }
    }

    /// Writes how many messages were counted but not written since the last line, if any.
    pub fn flush(&self) {
        if let Some(line) = self.flush_line() {
            if enabled(Level::Warn) {
                let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
            }
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
            return Some(format_line(&self.source, Level::Warn, what));
        }
        if !n.is_power_of_two() {
            self.suppressed.set(self.suppressed.get().saturating_add(1));
            return None;
        }
        let skipped = self.suppressed.replace(0);
        Some(format_line(
            &self.source,
            Level::Warn,
            format_args!(
                "{what} (guest errors: {skipped} not logged since the last line, {n} in all)"
            ),
        ))
    }

    fn flush_line(&self) -> Option<String> {
        let skipped = self.suppressed.replace(0);
        (skipped > 0).then(|| {
            format_line(
                &self.source,
                Level::Warn,
                format_args!(
                    "guest errors: {skipped} not logged since the last line, {} in all",
                    self.count.get()
                ),
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
            Some("ringvm device test: warning: guest errors: 36 not logged since the last line, 100 in all")
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
                "ringvm device rng: warning: invalid chain at head 3 (guest errors: 7 not logged since \
                 the last line, 16 in all)"
            )
        );
    }

    #[test]
    fn levels_parse_and_order_and_lines_carry_them() {
        let levels: Vec<Level> = ["error", "warn", "info", "debug"]
            .iter()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(
            levels,
            [Level::Error, Level::Warn, Level::Info, Level::Debug]
        );
        assert!(Level::Error < Level::Warn && Level::Info < Level::Debug);
        assert!("loud"
            .parse::<Level>()
            .unwrap_err()
            .contains("expected error"));
        assert_eq!(format_line("ringvm", Level::Error, "gone"), "ringvm: gone");
        assert_eq!(
            format_line("ringvm device net", Level::Info, "rx_packets=1"),
            "ringvm device net: info: rx_packets=1"
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
