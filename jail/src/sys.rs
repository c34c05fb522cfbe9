//! The raw system calls of the jail: every `unsafe` block of the crate lives here.
//!
//! Each wrapper is one system call returning `io::Result`; the caller in `lib.rs` maps it to
//! the `Error` variant of its step. The child half of [`clone_child`] runs between clone and
//! execve and so only makes raw system calls on memory prepared by the parent.

use std::ffi::CStr;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_char, c_int, c_long};

/// `struct clone_args` of `<linux/sched.h>` (version 2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `_LINUX_CAPABILITY_VERSION_3` of `<linux/capability.h>`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0-31, 32-63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

fn cvt(ret: c_long) -> io::Result<c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_int(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor a system call just returned.
fn owned(fd: c_long) -> OwnedFd {
    let fd = RawFd::try_from(fd).expect("the kernel returns descriptors that fit in an int");
    // SAFETY: `fd` was just returned by a successful system call that creates a descriptor
    // (pipe2, fcntl(F_DUPFD_CLOEXEC), pidfd_open, clone3 with CLONE_PIDFD), so it is open
    // and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `pipe2(O_CLOEXEC)`: returns (read end, write end).
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
    cvt_int(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((owned(fds[0].into()), owned(fds[1].into())))
}

/// `fcntl(F_DUPFD_CLOEXEC)`: a close-on-exec duplicate of `fd` numbered `min` or higher.
pub(crate) fn dup_cloexec_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC reads no memory; `fd` is open for the borrow.
    let new = cvt_int(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    Ok(owned(new.into()))
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and reads no memory.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    Ok(owned(fd))
}

/// `pidfd_send_signal(pidfd, signal, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: c_int) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills one as for kill(2)); the pidfd is
    // open for the borrow.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// How a reaped child ended, as `waitid` reports it.
pub(crate) enum WaitStatus {
    Exited(c_int),
    Signaled(c_int),
}

/// `waitid(P_PIDFD, pidfd, WEXITED [| WNOHANG])`, retried on EINTR. `None` when `nohang`
/// and the child is still running.
pub(crate) fn waitid_pidfd(pidfd: BorrowedFd<'_>, nohang: bool) -> io::Result<Option<WaitStatus>> {
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: siginfo_t is plain data for which all-zero bytes are valid.
        let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; the pidfd is open for the borrow.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded with WEXITED, so `info` is zeroed (WNOHANG, nothing to
        // report: si_pid stays 0) or a SIGCHLD siginfo whose pid and status fields are set.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(if info.si_code == libc::CLD_EXITED {
            WaitStatus::Exited(status)
        } else {
            WaitStatus::Signaled(status)
        }));
    }
}

/// `geteuid()` and `getegid()`.
pub(crate) fn effective_ids() -> (libc::uid_t, libc::gid_t) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Everything the child needs between clone and execve, prepared by the parent so that the
/// child allocates nothing. Every descriptor here is close-on-exec and numbered at or above
/// `3 + fds.len()`, so installing `fds[i]` as `3 + i` clobbers none of them.
pub(crate) struct ChildPlan<'a> {
    /// Extra clone flags (namespaces).
    pub flags: u64,
    pub program: &'a CStr,
    /// Null-terminated array of pointers into live `CString`s.
    pub argv: &'a [*const c_char],
    /// Null-terminated array of pointers into live `CString`s.
    pub envp: &'a [*const c_char],
    /// Descriptors to install as 3, 4, ... in order.
    pub fds: &'a [RawFd],
    pub dev_null: RawFd,
    /// Write end of the status pipe: the child writes `[step, errno]` there when it fails.
    pub status_fd: RawFd,
    /// A pidfd of the parent process, to see whether it died before PR_SET_PDEATHSIG.
    pub parent_pidfd: RawFd,
    /// Read end of the start pipe: the child waits for one byte (its id maps are written).
    pub start_fd: Option<RawFd>,
}

/// The step at which the child failed, as written to the status pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum ChildStep {
    DeathSignal = 1,
    WaitStart = 2,
    InstallFds = 3,
    Stdin = 4,
    CloseFds = 5,
    SignalMask = 6,
    Exec = 7,
}

impl ChildStep {
    pub(crate) fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::DeathSignal,
            2 => Self::WaitStart,
            3 => Self::InstallFds,
            4 => Self::Stdin,
            5 => Self::CloseFds,
            6 => Self::SignalMask,
            7 => Self::Exec,
            _ => return None,
        })
    }
}

/// Size of one status record: the step and the errno, native-endian u32 and i32.
pub(crate) const STATUS_LEN: usize = 8;

/// clone3 with `CLONE_PIDFD | plan.flags`; the child runs [`child_after_clone`] and never
/// returns. Returns the child's pid (in the caller's PID namespace) and its pidfd.
pub(crate) fn clone_child(plan: &ChildPlan<'_>) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64 | plan.flags,
        pidfd: &mut pidfd as *mut c_int as u64,
        // With CLONE_PARENT the kernel refuses an exit signal: the child takes the caller's
        // (SIGCHLD for a forked helper).
        exit_signal: if plan.flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed, and `pidfd` outlives the call.
    // Without CLONE_VM and with a zero stack the child gets a copy-on-write copy of this
    // thread's memory and stack, as fork(2) does, so it may return from this call. The child
    // branch only runs `child_after_clone`, which makes raw, async-signal-safe system calls
    // on memory already prepared in `plan`, and ends in execve or _exit: it takes no lock
    // another thread of the parent may have held and allocates nothing (tests/jail.rs:
    // spawn_from_many_threads, passed_fds_land_in_order_even_when_numbers_collide).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => child_after_clone(plan),
        pid => {
            let pid = libc::pid_t::try_from(pid).expect("clone3 returns a pid");
            Ok((pid, owned(pidfd.into())))
        }
    }
}

/// The child between clone and execve. Async-signal-safe only: raw system calls, no
/// allocation, no locks, no panics.
fn child_after_clone(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: every call below is a plain system call (through libc's thin wrappers, which
    // only set errno) on integers, on locals, or on memory the parent prepared in `plan` and
    // that this copy-on-write child still holds; the function ends in execve or _exit.
    unsafe {
        // 1. Die with the parent...
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) == -1
        {
            child_fail(plan.status_fd, ChildStep::DeathSignal);
        }
        // ...and if it died before that took effect, end now: nobody will read the status
        // pipe. (getppid() cannot tell: in a new PID namespace it is 0.)
        let mut parent = libc::pollfd {
            fd: plan.parent_pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        match libc::poll(&mut parent, 1, 0) {
            0 => {}
            -1 => child_fail(plan.status_fd, ChildStep::DeathSignal),
            _ => libc::_exit(127),
        }
        // 2. In a new user namespace, wait until the parent has written the id maps.
        if let Some(start_fd) = plan.start_fd {
            let mut byte = 0u8;
            loop {
                let n = libc::read(start_fd, (&mut byte as *mut u8).cast(), 1);
                if n == 1 {
                    break;
                }
                if n == -1 && errno() == libc::EINTR {
                    continue;
                }
                // EOF: the parent gave up on this child.
                child_fail(plan.status_fd, ChildStep::WaitStart);
            }
        }
        // 3. Install fds[i] as 3 + i (dup3 clears close-on-exec). No source can be
        // clobbered: the parent put every source and helper at or above 3 + n.
        for (i, &fd) in plan.fds.iter().enumerate() {
            let target = 3 + i as c_int;
            if libc::dup3(fd, target, 0) == -1 {
                child_fail(plan.status_fd, ChildStep::InstallFds);
            }
        }
        // 4. stdin from /dev/null.
        if libc::dup3(plan.dev_null, 0, 0) == -1 {
            child_fail(plan.status_fd, ChildStep::Stdin);
        }
        // 5. Close every other descriptor but the status pipe (close-on-exec, closed by a
        // successful execve). It is at or above 3 + n, so two ranges cover the rest.
        let first = 3 + plan.fds.len() as libc::c_uint;
        let status = plan.status_fd as libc::c_uint;
        if status > first && libc::syscall(libc::SYS_close_range, first, status - 1, 0) == -1 {
            child_fail(plan.status_fd, ChildStep::CloseFds);
        }
        if libc::syscall(libc::SYS_close_range, status + 1, libc::c_uint::MAX, 0) == -1 {
            child_fail(plan.status_fd, ChildStep::CloseFds);
        }
        // 6. The signal mask survives execve: start the program with nothing blocked.
        let empty: u64 = 0;
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            mem::size_of::<u64>(),
        ) == -1
        {
            child_fail(plan.status_fd, ChildStep::SignalMask);
        }
        // 7. execve; it only returns on failure.
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        child_fail(plan.status_fd, ChildStep::Exec)
    }
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Reports `[step, errno]` on the status pipe and exits with 127. Async-signal-safe.
fn child_fail(status_fd: RawFd, step: ChildStep) -> ! {
    let err = errno();
    let mut record = [0u8; STATUS_LEN];
    record[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    record[4..].copy_from_slice(&err.to_ne_bytes());
    // SAFETY: `record` is a valid buffer of STATUS_LEN bytes; a pipe write of 8 bytes is
    // atomic. _exit ends the process without running any user-space clean-up.
    unsafe {
        libc::write(status_fd, record.as_ptr().cast(), STATUS_LEN);
        libc::_exit(127)
    }
}

/// `mount(2)`.
pub(crate) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a valid nul-terminated string that lives across the
    // call; the kernel reads `data` as a string for tmpfs and ignores it otherwise.
    cvt_int(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })?;
    Ok(())
}

/// `umount2(2)`.
pub(crate) fn umount2(target: &CStr, flags: c_int) -> io::Result<()> {
    // SAFETY: `target` is a valid nul-terminated string.
    cvt_int(unsafe { libc::umount2(target.as_ptr(), flags) })?;
    Ok(())
}

/// `pivot_root(2)`.
pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both are valid nul-terminated strings.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })?;
    Ok(())
}

/// `setrlimit(2)` with the soft and the hard limit both `limit`, or both the current hard
/// limit when that is lower: a limit here is a ceiling and never raises what the process may
/// already use (raising needs CAP_SYS_RESOURCE, which a container may not grant even root).
pub(crate) fn setrlimit(resource: libc::__rlimit_resource_t, limit: u64) -> io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `current` is a valid rlimit the call writes.
    cvt_int(unsafe { libc::getrlimit(resource, &mut current) })?;
    let limit = limit.min(current.rlim_max);
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rlim` is a valid rlimit read by the call.
    cvt_int(unsafe { libc::setrlimit(resource, &rlim) })?;
    Ok(())
}

/// `prctl(2)` with integer arguments only.
fn prctl(option: c_int, arg2: libc::c_ulong) -> io::Result<c_int> {
    // SAFETY: callers only pass options whose arguments are integers (no pointers).
    cvt_int(unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

/// `prctl(PR_SET_SECUREBITS, bits)`.
pub(crate) fn set_securebits(bits: libc::c_ulong) -> io::Result<()> {
    prctl(libc::PR_SET_SECUREBITS, bits).map(drop)
}

/// `prctl(PR_CAPBSET_DROP, cap)`.
pub(crate) fn capbset_drop(cap: u32) -> io::Result<()> {
    prctl(libc::PR_CAPBSET_DROP, cap.into()).map(drop)
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
pub(crate) fn cap_ambient_clear_all() -> io::Result<()> {
    // SAFETY: integer arguments only; the unused ones must be zero.
    cvt_int(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    Ok(())
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map(drop)
}

/// `capset(2)` of this thread: effective, permitted and inheritable sets to `data`.
pub(crate) fn capset(data: [CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: `header` is a valid version-3 header and `data` the two structs version 3 reads.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })?;
    Ok(())
}
