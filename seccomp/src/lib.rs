//! Per-device syscall policies compiled to BPF and embedded in the binary.
//!
//! A policy lists what a process may call once it is set up, one system call a line, with
//! optional argument conditions and a reason each (format: `src/compiler.rs`). The VMM's
//! policies are in `policies/`; a device's is in its own crate, next to its code
//! (`block/src/block.policy`), and may `@include` the shared files of `policies/`.
//! build.rs compiles each policy to classic BPF for x86_64 — the architecture checked first
//! (anything else is killed), x32 calls killed, then one test per call in file order, then
//! the default action — and this crate embeds the programs with `include_bytes!`.
//!
//! [`install`] applies a policy to the calling process (or, for [`Policy::VCPU`], thread).
//! io_uring operations are not seen by seccomp: a device's ring must be restricted to its
//! opcodes before the filter goes on (`executor::Builder::allow_ops`).

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

#[cfg(test)]
#[allow(dead_code)]
mod compiler;

use std::io;

/// An error of [`install`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to set no_new_privs")]
    SetNoNewPrivs(#[source] io::Error),
    #[error("failed to install the {policy} seccomp filter")]
    Install {
        policy: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to install the {policy} seccomp filter on every thread: thread {tid} has its own filter")]
    ThreadSync { policy: &'static str, tid: i32 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A compiled policy: one of `policies/<name>.policy` (the VMM's) or a device crate's
/// `<crate>/src/<name>.policy`. Every such file is one; nothing in Rust names them, so a new
/// device's policy is one new file in its own crate.
#[derive(Clone, Copy)]
pub struct Policy(&'static generated::Entry);

impl PartialEq for Policy {
    fn eq(&self, other: &Policy) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Policy {}

impl std::hash::Hash for Policy {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state)
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Policy({})", self.0.name)
    }
}

impl Policy {
    /// The whole VMM process after set-up (main thread and, under their own filter, vCPUs).
    pub const VMM: &'static str = "vmm";
    /// A vCPU thread's KVM_RUN loop.
    pub const VCPU: &'static str = "vcpu";
    /// The VMM process serving GDB (`--gdb`): [`Policy::VMM`] plus the debugger's calls; its
    /// vCPU threads add no filter of their own.
    pub const VMM_GDB: &'static str = "vmm_gdb";

    /// Every policy, in name order.
    pub fn all() -> impl Iterator<Item = Policy> {
        generated::TABLE.iter().map(Policy)
    }

    /// The policy's file name, without `.policy`: a device type's name
    /// (`ringvm device <name>`), [`Policy::VMM`] or [`Policy::VCPU`].
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The policy named `name`.
    pub fn from_name(name: &str) -> Option<Policy> {
        Policy::all().find(|p| p.name() == name)
    }

    /// Whether [`install`] applies it to every thread of the process (TSYNC): all but the
    /// per-thread vCPU filter.
    pub fn process_wide(self) -> bool {
        self.0.name != Policy::VCPU
    }
}

/// One `struct sock_filter` instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// `==` or `!=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgOp {
    Eq,
    Ne,
}

/// `arg{arg} & mask <op> value`, on all 64 bits of the argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgTest {
    pub arg: u8,
    pub mask: u64,
    pub op: ArgOp,
    pub value: u64,
}

impl ArgTest {
    /// Whether the test holds for these arguments.
    pub fn holds(&self, args: &[u64; 6]) -> bool {
        let v = args[usize::from(self.arg)] & self.mask;
        match self.op {
            ArgOp::Eq => v == self.value,
            ArgOp::Ne => v != self.value,
        }
    }
}

/// One line of a policy (includes inlined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub syscall: &'static str,
    pub nr: u32,
    /// The condition as written; empty when the call is always allowed.
    pub condition: &'static str,
    /// Why the process needs it.
    pub reason: &'static str,
    /// The condition: any alternative whose tests all hold; none: always allowed.
    pub alternatives: &'static [&'static [ArgTest]],
}

impl Rule {
    /// Whether this rule allows the call with these arguments.
    pub fn allows(&self, args: &[u64; 6]) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|alt| alt.iter().all(|t| t.holds(args)))
    }
}

mod generated {
    use super::{decode, ArgOp, ArgTest, Rule, SockFilter};

    /// One compiled policy file.
    pub struct Entry {
        pub name: &'static str,
        pub kill: &'static [SockFilter],
        pub log: &'static [SockFilter],
        pub trap: &'static [SockFilter],
        pub rules: &'static [Rule],
    }

    include!(concat!(env!("OUT_DIR"), "/policies.rs"));
}

/// Decodes `struct sock_filter`s from native-endian bytes, at compile time.
const fn decode<const N: usize>(bytes: &[u8]) -> [SockFilter; N] {
    assert!(
        bytes.len() == N * 8,
        "a BPF program is a whole number of instructions"
    );
    let mut out = [SockFilter {
        code: 0,
        jt: 0,
        jf: 0,
        k: 0,
    }; N];
    let mut i = 0;
    while i < N {
        let b = i * 8;
        out[i] = SockFilter {
            code: u16::from_ne_bytes([bytes[b], bytes[b + 1]]),
            jt: bytes[b + 2],
            jf: bytes[b + 3],
            k: u32::from_ne_bytes([bytes[b + 4], bytes[b + 5], bytes[b + 6], bytes[b + 7]]),
        };
        i += 1;
    }
    out
}

/// The same program with SECCOMP_RET_TRAP as its default action: a call it does not allow
/// is not run and raises SIGSYS with the call's number in `si_syscall`, for a handler that
/// reports it and ends the process. A wrong architecture or an x32 call is still killed.
pub fn trapping_filter(policy: Policy) -> &'static [SockFilter] {
    policy.0.trap
}

/// What a filter does with a call its policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process (SECCOMP_RET_KILL_PROCESS).
    Kill,
    /// Raise SIGSYS (SECCOMP_RET_TRAP): the process's handler reports the call and exits.
    Trap,
    /// Log it and run it (SECCOMP_RET_LOG; `--seccomp-log-failures`).
    Log,
}

/// The name of x86_64 system call `nr` (`socket` for 41), if it has one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    macro_rules! syscall_table {
        ($($name:ident => $sys:ident),* $(,)?) => {
            [$((stringify!($name), libc::$sys)),*]
        };
    }
    const TABLE: &[(&str, i64)] = &include!("syscalls.rs");
    TABLE.iter().find(|(_, n)| *n == nr).map(|(name, _)| *name)
}

/// The policy's program: calls it does not allow kill the process (SECCOMP_RET_KILL_PROCESS).
pub fn filter(policy: Policy) -> &'static [SockFilter] {
    policy.0.kill
}

/// The same program with SECCOMP_RET_LOG as its default action: calls it does not allow are
/// logged by the kernel (audit, or dmesg `type=1326 ... syscall=N`) and then run. A wrong
/// architecture or an x32 call is still killed.
pub fn logging_filter(policy: Policy) -> &'static [SockFilter] {
    policy.0.log
}

/// The policy's rules, in file order.
pub fn rules(policy: Policy) -> &'static [Rule] {
    policy.0.rules
}

/// The names of the system calls the policy allows (some only with some arguments), in file
/// order, each once.
pub fn allowed(policy: Policy) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for rule in rules(policy) {
        if !names.contains(&rule.syscall) {
            names.push(rule.syscall);
        }
    }
    names
}

/// Whether the policy allows system call `nr` with these arguments (what its program
/// decides for an x86_64 call: the tests check that they agree).
pub fn allows(policy: Policy, nr: u32, args: &[u64; 6]) -> bool {
    rules(policy).iter().any(|r| r.nr == nr && r.allows(args))
}

/// Installs the policy's filter on the calling process, last, once everything else is set up:
/// after it, a call the policy does not allow kills the whole process with SIGSYS (or, with
/// `log_failures`, is logged by the kernel and runs; for finding what a policy misses).
///
/// Sets no_new_privs first (the kernel requires it without CAP_SYS_ADMIN; jail::enter has
/// already set it in device processes; the VMM policy allows exactly this prctl and a
/// flag-less seccomp call, so that vCPU threads can add theirs under it). Process-wide
/// policies go on every thread at once (SECCOMP_FILTER_FLAG_TSYNC), which fails with
/// [`Error::ThreadSync`] if another thread has already installed a filter of its own: install
/// [`Policy::VMM`] before the vCPU threads install [`Policy::VCPU`], which goes on the
/// calling thread only. Filters stack: a later one can only take away. Threads must have
/// started before a process-wide install (their start-up calls are in no policy).
pub fn install(policy: Policy, log_failures: bool) -> Result<()> {
    install_mode(policy, if log_failures { Mode::Log } else { Mode::Kill })
}

/// [`install`] with any [`Mode`].
pub fn install_mode(policy: Policy, mode: Mode) -> Result<()> {
    let program = match mode {
        Mode::Kill => filter(policy),
        Mode::Trap => trapping_filter(policy),
        Mode::Log => logging_filter(policy),
    };
    sys::set_no_new_privs().map_err(Error::SetNoNewPrivs)?;
    match sys::seccomp_set_mode_filter(program, policy.process_wide()) {
        Ok(()) => Ok(()),
        Err(sys::InstallError::Os(source)) => Err(Error::Install {
            policy: policy.name(),
            source,
        }),
        Err(sys::InstallError::ThreadSync(tid)) => Err(Error::ThreadSync {
            policy: policy.name(),
            tid,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Policy {
        Policy::from_name(name).expect("a policy of that name")
    }

    #[test]
    fn syscall_names_come_from_the_table() {
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(
            syscall_name(libc::SYS_io_uring_enter),
            Some("io_uring_enter")
        );
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn every_policy_has_a_program_and_rules() {
        for p in Policy::all() {
            assert!(filter(p).len() > 6, "{p:?}");
            assert_eq!(filter(p).len(), logging_filter(p).len(), "{p:?}");
            assert!(!rules(p).is_empty(), "{p:?}");
            assert_eq!(Policy::from_name(p.name()), Some(p));
        }
    }

    #[test]
    fn every_policy_file_is_a_policy_and_nothing_else_is() {
        let seccomp = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut dirs = vec![seccomp.join("policies")];
        for e in std::fs::read_dir(seccomp.join("..")).expect("the workspace") {
            let src = e.expect("entry").path().join("src");
            if src.is_dir() && src.join("../Cargo.toml").is_file() {
                dirs.push(src);
            }
        }
        let mut files: Vec<String> = Vec::new();
        for dir in dirs {
            for e in std::fs::read_dir(&dir).expect("a crate's src/") {
                let name = e.expect("entry").file_name().into_string().expect("utf-8");
                files.extend(name.strip_suffix(".policy").map(str::to_owned));
            }
        }
        files.sort();
        let names: Vec<&str> = Policy::all().map(Policy::name).collect();
        assert_eq!(files, names);
        assert!(names.contains(&Policy::VMM) && names.contains(&Policy::VCPU));
        for device in ["block", "net", "rng", "vsock", "console"] {
            assert!(names.contains(&device), "{device}");
        }
        assert!(Policy::from_name("nosuch").is_none());
    }

    #[test]
    fn the_vmm_policy_holds_what_its_vcpu_threads_need() {
        // TSYNC puts the VMM filter on the vCPU threads too: both filters must allow a call.
        for rule in rules(named("vcpu")) {
            assert!(
                allowed(named("vmm")).contains(&rule.syscall),
                "{}",
                rule.syscall
            );
        }
    }
}
