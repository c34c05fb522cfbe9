//! Spawning a device process in namespaces with pivot_root, rlimits and no capabilities.
//!
//! Two halves, one on each side of execve:
//!
//! - [`spawn`], in the VMM: clone3 with `CLONE_PIDFD` (and, sandboxed, new mount, PID, IPC,
//!   UTS and network namespaces, plus a user namespace when not root), then in the child,
//!   with raw system calls only: `PR_SET_PDEATHSIG(SIGKILL)` and a check that the parent is
//!   still alive, the passed descriptors installed as 3, 4, ..., stdin from `/dev/null`,
//!   every other descriptor closed, an empty signal mask, execve. A failing step is reported
//!   on a close-on-exec pipe, so `spawn` returns the cause (e.g. [`Error::Exec`]) instead
//!   of a dead child.
//! - [`enter`], in the device process after execve, once it has opened everything it needs:
//!   private mounts, an empty read-only tmpfs as root (pivot_root, old root detached),
//!   rlimits, no capabilities in any set, no_new_privs. A seccomp filter goes last, after
//!   `enter` returns (a later task).
//!
//! # Signals
//! A sandboxed child is PID 1 of its PID namespace. The kernel delivers no signal to a
//! namespace init for which it has no handler, except SIGKILL (and SIGSTOP) from an ancestor
//! namespace: `Child::kill` works, a SIGTERM or a terminal's SIGINT to a device without a
//! handler is ignored. When it exits, every other process in its namespace is killed.
//!
//! # Parent death
//! `PR_SET_PDEATHSIG` fires when the *thread* that called [`spawn`] exits, not the process:
//! call `spawn` from a thread that lives as long as its devices (the VMM's main thread).

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::num::ParseIntError;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sys::ChildStep;

/// An error of a jail step; each system call step has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("program or argument contains a nul byte")]
    NulByte,
    #[error("failed to open /dev/null")]
    OpenDevNull(#[source] io::Error),
    #[error("failed to create the status pipe")]
    StatusPipe(#[source] io::Error),
    #[error("failed to create the start pipe")]
    StartPipe(#[source] io::Error),
    #[error("failed to open a pidfd of this process")]
    ParentPidfd(#[source] io::Error),
    #[error("failed to duplicate descriptor {fd}")]
    DupFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("failed to clone the child")]
    Clone(#[source] io::Error),
    #[error("failed to write setgroups of the child")]
    Setgroups(#[source] io::Error),
    #[error("failed to write uid_map of the child")]
    UidMap(#[source] io::Error),
    #[error("failed to write gid_map of the child")]
    GidMap(#[source] io::Error),
    #[error("failed to start the child")]
    StartChild(#[source] io::Error),
    #[error("failed to read the status pipe")]
    ReadStatus(#[source] io::Error),
    #[error("child failed to set its parent-death signal")]
    ChildDeathSignal(#[source] io::Error),
    #[error("child failed to wait for its start")]
    ChildWaitStart(#[source] io::Error),
    #[error("child failed to install the passed descriptors")]
    ChildInstallFds(#[source] io::Error),
    #[error("child failed to redirect stdin")]
    ChildStdin(#[source] io::Error),
    #[error("child failed to close inherited descriptors")]
    ChildCloseFds(#[source] io::Error),
    #[error("child failed to reset its signal mask")]
    ChildSignalMask(#[source] io::Error),
    #[error("child reported unknown step {0}")]
    ChildUnknownStep(u32),
    #[error("failed to execute {}", program.display())]
    Exec {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to wait for the child")]
    Wait(#[source] io::Error),
    #[error("failed to kill the child")]
    Kill(#[source] io::Error),
    #[error("not the init of a new PID namespace: start the process with spawn and a sandbox")]
    NotSpawnedSandboxed,
    #[error("failed to read /proc/sys/kernel/cap_last_cap")]
    ReadCapLastCap(#[source] io::Error),
    #[error("failed to parse /proc/sys/kernel/cap_last_cap")]
    ParseCapLastCap(#[source] ParseIntError),
    #[error("failed to make mounts private")]
    MakeMountsPrivate(#[source] io::Error),
    #[error("failed to mount the new root tmpfs")]
    MountTmpfs(#[source] io::Error),
    #[error("failed to change to the new root")]
    ChdirNewRoot(#[source] io::Error),
    #[error("failed to pivot_root")]
    PivotRoot(#[source] io::Error),
    #[error("failed to detach the old root")]
    UnmountOldRoot(#[source] io::Error),
    #[error("failed to change to /")]
    ChdirRoot(#[source] io::Error),
    #[error("failed to remount the new root read-only")]
    RemountRootReadOnly(#[source] io::Error),
    #[error("failed to set rlimit {resource}")]
    SetRlimit {
        resource: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to set securebits")]
    SetSecurebits(#[source] io::Error),
    #[error("failed to drop capability {cap} from the bounding set")]
    DropBoundingCap {
        cap: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to clear ambient capabilities")]
    ClearAmbientCaps(#[source] io::Error),
    #[error("failed to clear capabilities")]
    ClearCaps(#[source] io::Error),
    #[error("failed to set no_new_privs")]
    SetNoNewPrivs(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How a device process is confined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub enabled: bool,
}

/// Resource limits a device process sets in [`enter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Ceilings: a value above the process's current hard limit leaves that hard limit (soft and
/// hard both set to it) instead of failing, since raising a limit needs CAP_SYS_RESOURCE.
pub struct Limits {
    /// RLIMIT_NOFILE, soft and hard.
    pub nofile: u64,
    /// RLIMIT_MEMLOCK in bytes, soft and hard (what its io_uring rings need).
    pub memlock: u64,
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Exited(i32),
    /// A signal of this number killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signaled(sig) => match signal_name(sig) {
                Some(name) => write!(f, "killed by signal {sig} ({name})"),
                None => write!(f, "killed by signal {sig}"),
            },
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// A child started by [`spawn`].
///
/// Dropping it closes the pidfd but neither kills nor reaps the child: `kill` and `wait` it
/// first, or it stays a zombie until this process exits.
#[derive(Debug)]
pub struct Child {
    /// Its pid in the caller's PID namespace.
    pub pid: i32,
    /// From `CLONE_PIDFD`: readable once the child has exited (for the executor).
    pub pidfd: OwnedFd,
    /// Set once reaped: the kernel reports a status only once.
    status: OnceLock<ExitStatus>,
}

impl Child {
    /// A child of this process known by its pid and a pidfd (one that
    /// [`spawn_sibling`] started for this process in another).
    pub fn from_pidfd(pid: i32, pidfd: OwnedFd) -> Child {
        Child {
            pid,
            pidfd,
            status: OnceLock::new(),
        }
    }

    /// Non-blocking: `Some(status)` once the child has ended, reaping it.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.wait_inner(true)
    }

    /// Blocks until the child has ended and reaps it.
    pub fn wait(&self) -> Result<ExitStatus> {
        self.wait_inner(false)?
            .ok_or_else(|| Error::Wait(io::Error::other("waitid returned no child")))
    }

    /// Sends SIGKILL through the pidfd. Ok when the child has already ended.
    pub fn kill(&self) -> Result<()> {
        if self.status.get().is_some() {
            return Ok(());
        }
        match sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL) {
            // ESRCH: it has exited (a zombie or already reaped).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r.map_err(Error::Kill),
        }
    }

    fn wait_inner(&self, nohang: bool) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status.get() {
            return Ok(Some(*status));
        }
        let status = match sys::waitid_pidfd(self.pidfd.as_fd(), nohang).map_err(Error::Wait)? {
            None => return Ok(None),
            Some(sys::WaitStatus::Exited(code)) => ExitStatus::Exited(code),
            Some(sys::WaitStatus::Signaled(sig)) => ExitStatus::Signaled(sig),
        };
        Ok(Some(*self.status.get_or_init(|| status)))
    }
}

/// The namespaces of a sandboxed child.
const SANDBOX_CLONE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET) as u64;

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::NulByte)
}

/// Starts `program args...` (`program` is a path: no PATH search) with `fds` installed as
/// descriptors 3, 4, ... in order, stdin from /dev/null, stdout and stderr inherited, every
/// other descriptor closed, an empty signal mask, an empty environment, and
/// `PR_SET_PDEATHSIG(SIGKILL)`.
///
/// # Environment
/// The child gets none of this process's environment: what it does is given by its
/// arguments and descriptors alone. An inherited environment reaches code that runs before
/// and inside the sandbox without being asked for: the dynamic loader (`LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `GLIBC_TUNABLES`), the allocator (`MALLOC_*`), and Rust's runtime
/// (`RUST_BACKTRACE`/`RUST_LIB_BACKTRACE` make every error and panic capture a backtrace,
/// whose unwinder makes system calls a seccomp policy refuses). A device process needs none
/// of it: its paths come as arguments, it has no locale, home or PATH (it never executes
/// anything), and its messages go to the inherited stderr.
///
/// With `sandbox.enabled` the child starts in new mount, PID, IPC, UTS and network
/// namespaces, and when this process is not root also in a new user namespace where it is
/// root (uid and gid 0 mapped to this process's effective ids, setgroups denied).
///
/// Returns once the child has executed `program` (it blocks the caller until then, about a
/// millisecond), or with the error of the step that failed (a missing program is
/// [`Error::Exec`] with ENOENT); a child that failed is reaped before returning.
///
/// Notes: the user-namespace maps are written through `/proc/<pid>`, which needs this
/// process to be dumpable (not after `PR_SET_DUMPABLE(0)` or a uid change). Signal
/// dispositions set to ignore (Rust ignores SIGPIPE) survive execve, as usual. The
/// pidfd, the status pipe and the other helpers are close-on-exec, so a concurrent
/// fork+exec in another thread holds them at most until its execve.
pub fn spawn(
    program: &Path,
    args: &[&OsStr],
    fds: &[BorrowedFd<'_>],
    sandbox: &Sandbox,
) -> Result<Child> {
    spawn_inner(program, args, fds, sandbox, false)
}

/// [`spawn`], but the child is a child of this process's parent (`CLONE_PARENT`), not of
/// this process: a helper forked by the VMM before the VMM's seccomp filter starts device
/// processes that the VMM reaps through their pidfds. `PR_SET_PDEATHSIG` then fires when the
/// parent's thread that forked the caller exits, and the child's liveness check looks at
/// the parent. The returned [`Child`] cannot be waited for here: hand its pidfd to the
/// parent ([`Child::from_pidfd`]). A child that fails before its execve stays a zombie of the
/// parent until the parent ends.
pub fn spawn_sibling(
    program: &Path,
    args: &[&OsStr],
    fds: &[BorrowedFd<'_>],
    sandbox: &Sandbox,
) -> Result<Child> {
    spawn_inner(program, args, fds, sandbox, true)
}

fn spawn_inner(
    program: &Path,
    args: &[&OsStr],
    fds: &[BorrowedFd<'_>],
    sandbox: &Sandbox,
    sibling: bool,
) -> Result<Child> {
    // Everything the child touches is prepared here: it may not allocate.
    let program_c = cstring(program.as_os_str().as_bytes())?;
    let args_c = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let argv: Vec<*const libc::c_char> = std::iter::once(program_c.as_ptr())
        .chain(args_c.iter().map(|a| a.as_ptr()))
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The empty environment (see "Environment" above).
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];

    // Every descriptor the child holds before its dups sits at or above 3 + n, so that
    // installing fds[i] as 3 + i clobbers none (a source may itself be in 3..3+n).
    let floor = RawFd::try_from(fds.len())
        .ok()
        .and_then(|n| n.checked_add(3))
        .ok_or(Error::DupFd {
            fd: -1,
            source: io::Error::from_raw_os_error(libc::EMFILE),
        })?;
    let high = |fd: BorrowedFd<'_>| {
        sys::dup_cloexec_at_least(fd, floor).map_err(|source| Error::DupFd {
            fd: fd.as_raw_fd(),
            source,
        })
    };
    let sources = fds.iter().map(|&fd| high(fd)).collect::<Result<Vec<_>>>()?;
    let source_raw: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let dev_null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(Error::OpenDevNull)
        .and_then(|file| high(file.as_fd()))?;
    // Shadowing would keep the originals open: the low write end must not outlive this.
    let (status_read, status_write_low) = sys::pipe_cloexec().map_err(Error::StatusPipe)?;
    let status_write = high(status_write_low.as_fd())?;
    drop(status_write_low);
    let parent = if sibling {
        std::os::unix::process::parent_id()
    } else {
        std::process::id()
    };
    let parent_pidfd = sys::pidfd_open(parent as libc::pid_t)
        .map_err(Error::ParentPidfd)
        .and_then(|fd| high(fd.as_fd()))?;

    let (euid, egid) = sys::effective_ids();
    let user_ns = sandbox.enabled && euid != 0;
    let start_pipe = if user_ns {
        let (read, write) = sys::pipe_cloexec().map_err(Error::StartPipe)?;
        Some((high(read.as_fd())?, write))
    } else {
        None
    };

    let mut flags = 0;
    if sandbox.enabled {
        flags |= SANDBOX_CLONE_FLAGS;
    }
    if user_ns {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    if sibling {
        flags |= libc::CLONE_PARENT as u64;
    }
    let plan = sys::ChildPlan {
        flags,
        program: &program_c,
        argv: &argv,
        envp: &envp,
        fds: &source_raw,
        dev_null: dev_null.as_raw_fd(),
        status_fd: status_write.as_raw_fd(),
        parent_pidfd: parent_pidfd.as_raw_fd(),
        start_fd: start_pipe.as_ref().map(|(read, _)| read.as_raw_fd()),
    };
    let (pid, pidfd) = sys::clone_child(&plan).map_err(Error::Clone)?;
    let child = Child {
        pid,
        pidfd,
        status: OnceLock::new(),
    };
    // Only the child may hold the write end now: EOF on the read end means it executed.
    drop(status_write);

    if let Some((start_read, start_write)) = start_pipe {
        drop(start_read);
        if let Err(e) = write_id_maps(pid, euid, egid).and_then(|()| {
            File::from(start_write)
                .write_all(&[0])
                .map_err(Error::StartChild)
        }) {
            abandon(&child);
            return Err(e);
        }
    }

    match read_status(status_read) {
        Ok(None) => Ok(child),
        Ok(Some((step, errno))) => {
            // The child has _exit()ed or is about to: reap it.
            let _ = child.wait();
            Err(child_error(step, errno, program))
        }
        Err(e) => {
            abandon(&child);
            Err(e)
        }
    }
}

/// Kills and reaps a child that `spawn` gives up on.
fn abandon(child: &Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn write_id_maps(pid: i32, euid: libc::uid_t, egid: libc::gid_t) -> Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("setgroups"), "deny").map_err(Error::Setgroups)?;
    std::fs::write(proc.join("uid_map"), format!("0 {euid} 1\n")).map_err(Error::UidMap)?;
    std::fs::write(proc.join("gid_map"), format!("0 {egid} 1\n")).map_err(Error::GidMap)?;
    Ok(())
}

/// Reads the status pipe to EOF: `None` when the child executed its program, else the
/// `(step, errno)` it reported.
fn read_status(read: OwnedFd) -> Result<Option<(u32, i32)>> {
    let mut file = File::from(read);
    let mut record = [0u8; sys::STATUS_LEN];
    let mut len = 0;
    while len < record.len() {
        match file.read(&mut record[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::ReadStatus(e)),
        }
    }
    if len == 0 {
        return Ok(None);
    }
    if len < record.len() {
        return Err(Error::ReadStatus(io::ErrorKind::UnexpectedEof.into()));
    }
    let (step, errno) = record.split_at(4);
    let step = u32::from_ne_bytes(step.try_into().expect("STATUS_LEN is 4 + 4 bytes"));
    let errno = i32::from_ne_bytes(errno.try_into().expect("STATUS_LEN is 4 + 4 bytes"));
    Ok(Some((step, errno)))
}

/// The error of the step the child reported.
fn child_error(step: u32, errno: i32, program: &Path) -> Error {
    let source = io::Error::from_raw_os_error(errno);
    match ChildStep::from_u32(step) {
        Some(ChildStep::DeathSignal) => Error::ChildDeathSignal(source),
        Some(ChildStep::WaitStart) => Error::ChildWaitStart(source),
        Some(ChildStep::InstallFds) => Error::ChildInstallFds(source),
        Some(ChildStep::Stdin) => Error::ChildStdin(source),
        Some(ChildStep::CloseFds) => Error::ChildCloseFds(source),
        Some(ChildStep::SignalMask) => Error::ChildSignalMask(source),
        Some(ChildStep::Exec) => Error::Exec {
            program: program.to_owned(),
            source,
        },
        None => Error::ChildUnknownStep(step),
    }
}

/// Where the new root tmpfs is mounted before pivot_root; it must exist on the host.
const NEW_ROOT: &CStr = c"/tmp";

/// tmpfs options of the new root: tiny, and mode 0 (nobody without capabilities may look).
const NEW_ROOT_OPTIONS: &CStr = c"size=16k,nr_inodes=16,mode=0";

/// `SECBIT_NOROOT`, `SECBIT_NO_SETUID_FIXUP`, `SECBIT_NO_CAP_AMBIENT_RAISE`, each locked,
/// and `SECBIT_KEEP_CAPS_LOCKED` (with keep-caps off): uid 0 never regains capabilities.
const SECUREBITS: libc::c_ulong = 0b1110_1111;

/// Confines the calling (device) process: call it after execve, once everything it needs is
/// open (files, /dev/urandom, its io_uring ring), and before its seccomp filter, which goes
/// last.
///
/// With `sandbox.enabled` (the process must have been started by [`spawn`] with a sandbox,
/// in its own mount namespace), in this order:
/// 0. checks that it is PID 1 (of the PID namespace `spawn` made, which comes with a new
///    mount namespace): else [`Error::NotSpawnedSandboxed`], so that a device run by hand
///    on the host never makes the host's mounts private or pivots the host's root;
/// 1. reads /proc/sys/kernel/cap_last_cap (before /proc goes away);
/// 2. makes every mount private (`MS_REC|MS_PRIVATE` on /);
/// 3. mounts an empty tmpfs (16 KiB, mode 0, nosuid, nodev, noexec) on /tmp;
/// 4. chdir into it, `pivot_root(".", ".")`, `umount2(".", MNT_DETACH)` (the old root),
///    chdir("/"), and remounts / read-only;
/// 5. rlimits: NOFILE `limits.nofile`, MEMLOCK `limits.memlock`, CORE 0, NPROC 0 (NPROC 0
///    blocks fork for every uid but real root: the kernel does not enforce it for uid 0 of
///    the initial user namespace);
/// 6. securebits (noroot, no-setuid-fixup, no-ambient-raise, all locked);
/// 7. drops every capability up to cap_last_cap from the bounding set, clears the ambient
///    set, then the effective, permitted and inheritable sets (capset);
/// 8. no_new_privs.
///
/// Without sandbox it only sets RLIMIT_CORE to 0 and no_new_privs: the process keeps the
/// host's view, its capabilities and the other limits.
pub fn enter(sandbox: &Sandbox, limits: &Limits) -> Result<()> {
    if !sandbox.enabled {
        set_rlimit(libc::RLIMIT_CORE, "core", 0)?;
        return sys::set_no_new_privs().map_err(Error::SetNoNewPrivs);
    }

    // pivot_root changes the root of every process of the mount namespace: refuse to run
    // anywhere but in the namespaces `spawn` made (we are the init of a new PID namespace).
    if std::process::id() != 1 {
        return Err(Error::NotSpawnedSandboxed);
    }
    let cap_last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(Error::ReadCapLastCap)?
        .trim()
        .parse()
        .map_err(Error::ParseCapLastCap)?;

    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(Error::MakeMountsPrivate)?;
    sys::mount(
        Some(c"tmpfs"),
        NEW_ROOT,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(NEW_ROOT_OPTIONS),
    )
    .map_err(Error::MountTmpfs)?;
    std::env::set_current_dir(OsStr::from_bytes(NEW_ROOT.to_bytes()))
        .map_err(Error::ChdirNewRoot)?;
    // The new root becomes / and the old root is stacked on top of it, at ".".
    sys::pivot_root(c".", c".").map_err(Error::PivotRoot)?;
    sys::umount2(c".", libc::MNT_DETACH).map_err(Error::UnmountOldRoot)?;
    std::env::set_current_dir("/").map_err(Error::ChdirRoot)?;
    sys::mount(
        None,
        c"/",
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
    .map_err(Error::RemountRootReadOnly)?;

    // Raising a hard limit needs CAP_SYS_RESOURCE: before the capabilities go.
    set_rlimit(libc::RLIMIT_NOFILE, "nofile", limits.nofile)?;
    set_rlimit(libc::RLIMIT_MEMLOCK, "memlock", limits.memlock)?;
    set_rlimit(libc::RLIMIT_CORE, "core", 0)?;
    set_rlimit(libc::RLIMIT_NPROC, "nproc", 0)?;

    // Securebits and the bounding set need CAP_SETPCAP: before capset clears it.
    sys::set_securebits(SECUREBITS).map_err(Error::SetSecurebits)?;
    for cap in 0..=cap_last_cap {
        sys::capbset_drop(cap).map_err(|source| Error::DropBoundingCap { cap, source })?;
    }
    sys::cap_ambient_clear_all().map_err(Error::ClearAmbientCaps)?;
    sys::capset([sys::CapData::default(); 2]).map_err(Error::ClearCaps)?;

    sys::set_no_new_privs().map_err(Error::SetNoNewPrivs)?;
    // A seccomp filter, when there is one, is installed here: last.
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, name: &'static str, limit: u64) -> Result<()> {
    sys::setrlimit(resource, limit).map_err(|source| Error::SetRlimit {
        resource: name,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_display_names_the_signal() {
        assert_eq!(ExitStatus::Exited(1).to_string(), "exited with status 1");
        assert_eq!(
            ExitStatus::Signaled(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(ExitStatus::Signaled(64).to_string(), "killed by signal 64");
        assert!(ExitStatus::Exited(0).success());
        assert!(!ExitStatus::Signaled(9).success());
    }

    #[test]
    fn child_step_round_trips() {
        for v in 1..=7 {
            let step = ChildStep::from_u32(v).unwrap();
            assert_eq!(step as u32, v);
        }
        assert_eq!(ChildStep::from_u32(0), None);
        assert_eq!(ChildStep::from_u32(8), None);
    }
}
