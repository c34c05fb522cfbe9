//! The two system calls that install a filter: prctl(PR_SET_NO_NEW_PRIVS) and
//! seccomp(SECCOMP_SET_MODE_FILTER).

use std::io;

use crate::SockFilter;

// `SockFilter` is passed to the kernel as `struct sock_filter`.
const _: () =
    assert!(std::mem::size_of::<SockFilter>() == std::mem::size_of::<libc::sock_filter>());
const _: () =
    assert!(std::mem::align_of::<SockFilter>() == std::mem::align_of::<libc::sock_filter>());

pub enum InstallError {
    Os(io::Error),
    /// TSYNC could not apply the filter to this thread (it has diverged).
    ThreadSync(i32),
}

pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only; the result is checked.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// seccomp(SECCOMP_SET_MODE_FILTER, TSYNC when `all_threads`, program).
pub fn seccomp_set_mode_filter(
    program: &'static [SockFilter],
    all_threads: bool,
) -> Result<(), InstallError> {
    let len = u16::try_from(program.len())
        .map_err(|_| InstallError::Os(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads the program (copy_from_user); `*mut` is the C declaration.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    let flags: libc::c_ulong = if all_threads {
        libc::SECCOMP_FILTER_FLAG_TSYNC
    } else {
        0
    };
    // SAFETY: `prog` points to `len` instructions of `program`, a static slice of
    // `#[repr(C)]` `SockFilter`, which has the size and alignment of `struct sock_filter`
    // (asserted above) and the same field order; the kernel copies the program before
    // returning and writes nothing. Tests: tests/install.rs runs every policy through the
    // kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    match r {
        0 => Ok(()),
        r if r < 0 => Err(InstallError::Os(io::Error::last_os_error())),
        // With TSYNC, a positive result is the id of a thread that could not be synchronized.
        tid => Err(InstallError::ThreadSync(
            i32::try_from(tid).unwrap_or(i32::MAX),
        )),
    }
}
