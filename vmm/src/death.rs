//! How a device process died, in its own words: the record its signal handlers write to
//! ringvm's report pipe (`--report-fd`) just before it dies, and the text ringvm makes of it
//! and the process's exit status.
//!
//! The handlers (`sys::install_death_reporters`) write one record of [`DeathReport::LEN`]
//! bytes: the signal, then a value and an address whose meaning depends on it.
//! - SIGSYS (the seccomp filter refused a call): the call's number, and where it was made.
//! - SIGSEGV, SIGBUS (a memory fault): the `si_code`, and the faulting address. A code of 0 or
//!   less means another process sent the signal: there was no fault and no address.
//! - SIGABRT: [`ABORTED`] when the process aborted itself (abort()), else the `si_code` of
//!   the sender's signal (0 or less).

/// The value of a SIGABRT report whose process aborted itself.
pub const ABORTED: i32 = 1;

/// One report of a dying device process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeathReport {
    /// The signal that is ending the process.
    pub signal: i32,
    /// SIGSYS: the refused system call's number; SIGSEGV, SIGBUS: the `si_code`.
    pub value: i32,
    /// SIGSYS: the address of the call; SIGSEGV, SIGBUS: the faulting address.
    pub addr: u64,
}

impl DeathReport {
    /// Bytes of one record: signal, value (native-endian i32 each), address (u64).
    pub const LEN: usize = 16;

    /// The record's bytes (no allocation: the handlers call this).
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.signal.to_ne_bytes());
        b[4..8].copy_from_slice(&self.value.to_ne_bytes());
        b[8..].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }

    /// The report in `bytes`, if they are a whole record.
    pub fn from_bytes(bytes: &[u8]) -> Option<DeathReport> {
        let b: &[u8; Self::LEN] = bytes.get(..Self::LEN)?.try_into().ok()?;
        let word = |at: usize| i32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[8..]);
        Some(DeathReport {
            signal: word(0),
            value: word(4),
            addr: u64::from_ne_bytes(addr),
        })
    }

    /// What ringvm adds after the exit status (`killed by signal 7 (SIGBUS)`): ` at address
    /// 0x...: memory fault (...)` for a fault, `: its seccomp policy refused system call N
    /// (name)` for a refused call. Written without allocating (the handlers print it too).
    pub fn suffix(&self) -> Suffix<'_> {
        Suffix(self)
    }

    /// Whether another process sent the signal (no fault happened): the handler then exits
    /// with status 128 + the signal.
    pub fn sent(&self) -> bool {
        self.value <= 0 && self.signal != libc::SIGSYS
    }

    /// Whether the process could have ended with `status` after its handler wrote this: by
    /// the reported signal (a refused call, a fault), or by the handler's exit with 128 + the
    /// signal (an abort, a signal sent). The record is the device's own word, written by a
    /// process the guest may have taken over: one that does not fit how the process really
    /// ended (a SIGKILL, a plain exit) is not believed.
    fn fits(&self, status: &jail::ExitStatus) -> bool {
        match *status {
            jail::ExitStatus::Exited(code) => {
                (self.sent() || self.signal == libc::SIGABRT)
                    && Some(code) == self.signal.checked_add(128)
            }
            jail::ExitStatus::Signaled(sig) => {
                !self.sent() && self.signal != libc::SIGABRT && sig == self.signal
            }
        }
    }

    /// The report in what a process's report pipe held once it ended with `status`, if it is
    /// to be believed: exactly one record (the handlers write one), which fits
    /// the status.
    pub fn believed(bytes: &[u8], status: &jail::ExitStatus) -> Option<DeathReport> {
        if bytes.len() != Self::LEN {
            return None;
        }
        Self::from_bytes(bytes).filter(|r| r.fits(status))
    }
}

/// [`DeathReport::suffix`].
pub struct Suffix<'a>(&'a DeathReport);

impl std::fmt::Display for Suffix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.0;
        match r.signal {
            libc::SIGSYS => write!(
                f,
                ": its seccomp policy refused system call {} ({})",
                r.value,
                seccomp::syscall_name(i64::from(r.value)).unwrap_or("unknown")
            ),
            libc::SIGABRT if !r.sent() => {
                write!(
                    f,
                    ": it aborted (SIGABRT; its last words, if any, are above)"
                )
            }
            _ if r.sent() => write!(
                f,
                " after signal {} ({}) sent by another process",
                r.signal,
                signal_name(r.signal)
            ),
            sig => {
                write!(f, " at address {:#x}: memory fault", r.addr)?;
                match fault_code(sig, r.value) {
                    Some(why) => write!(f, " ({why})"),
                    None => write!(f, " (code {})", r.value),
                }
            }
        }
    }
}

/// The names of the signals a report can carry.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGSYS => "SIGSYS",
        libc::SIGABRT => "SIGABRT",
        _ => "?",
    }
}

/// The kernel's `si_code`s of SIGSEGV and SIGBUS, in words.
fn fault_code(sig: i32, code: i32) -> Option<&'static str> {
    Some(match (sig, code) {
        (libc::SIGSEGV, 1) => "address not mapped",
        (libc::SIGSEGV, 2) => "access not permitted by the mapping",
        (libc::SIGSEGV, 3) => "bounds check failed",
        (libc::SIGSEGV, 4) => "protection key check failed",
        (libc::SIGSEGV, 128) => "general protection fault",
        (libc::SIGBUS, 1) => "misaligned address",
        (libc::SIGBUS, 2) => "no page behind the address: beyond the end of a mapped file?",
        (libc::SIGBUS, 3) => "hardware error",
        (libc::SIGBUS, 4) | (libc::SIGBUS, 5) => "hardware memory error",
        _ => return None,
    })
}

/// How ringvm says a device process ended: its exit status, then what its report adds.
pub fn describe(status: &str, report: Option<&DeathReport>) -> String {
    match report {
        None => status.to_string(),
        Some(r) => format!("{status}{}", r.suffix()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_its_bytes() {
        let r = DeathReport {
            signal: libc::SIGBUS,
            value: 2,
            addr: 0x7f12_3456_7000,
        };
        assert_eq!(DeathReport::from_bytes(&r.to_bytes()), Some(r));
        assert_eq!(DeathReport::from_bytes(&r.to_bytes()[..15]), None);
    }

    #[test]
    fn reports_read_as_what_happened() {
        let sys = DeathReport {
            signal: libc::SIGSYS,
            value: 41,
            addr: 0x1234,
        };
        assert_eq!(
            describe("killed by signal 31 (SIGSYS)", Some(&sys)),
            "killed by signal 31 (SIGSYS): its seccomp policy refused system call 41 (socket)"
        );
        let bus = DeathReport {
            signal: libc::SIGBUS,
            value: 2,
            addr: 0x7f00_0000_1000,
        };
        assert_eq!(
            describe("killed by signal 7 (SIGBUS)", Some(&bus)),
            "killed by signal 7 (SIGBUS) at address 0x7f0000001000: memory fault (no page \
             behind the address: beyond the end of a mapped file?)"
        );
        let sent = DeathReport {
            signal: libc::SIGSEGV,
            value: 0,
            addr: 0,
        };
        assert_eq!(
            describe("exited with status 139", Some(&sent)),
            "exited with status 139 after signal 11 (SIGSEGV) sent by another process"
        );
        let aborted = DeathReport {
            signal: libc::SIGABRT,
            value: ABORTED,
            addr: 0,
        };
        assert_eq!(
            describe("exited with status 134", Some(&aborted)),
            "exited with status 134: it aborted (SIGABRT; its last words, if any, are above)"
        );
        let sent_abort = DeathReport {
            signal: libc::SIGABRT,
            value: -6,
            addr: 0,
        };
        assert_eq!(
            describe("exited with status 134", Some(&sent_abort)),
            "exited with status 134 after signal 6 (SIGABRT) sent by another process"
        );
        assert_eq!(
            describe("exited with status 1", None),
            "exited with status 1"
        );
    }
}
