//! Surviving a peer that shrinks the file behind guest memory it sent.
//!
//! A device process maps the regions a vhost-user frontend sends ([`GuestMemory::from_regions`]
//! checks their files are large enough then). A frontend that truncates a region's file
//! afterwards takes the pages past the new end away: the device's next access to them raises
//! SIGBUS, whose default action kills the device. Seals cannot be required (libblkio's memfds
//! cannot be sealed; QEMU's file-backed memory is not), so a device process installs
//! [`install_sigbus_handler`] before its jail:
//!
//! - a SIGBUS at an address inside a mapping of received guest memory maps a private zero
//!   page over the faulting page and returns, so the access completes (it reads zeros, and a
//!   write reaches nobody); it counts the fault ([`faults`]) and wakes [`notifier`]. The
//!   device then finds the region whose file shrank ([`GuestMemory::check_backing`]) and
//!   ends with an error naming it, instead of dying.
//! - any other SIGBUS (and one in a region backed by huge pages, hugetlbfs, where one 4 KiB
//!   page cannot be mapped over part of a huge one) writes a line on stderr and goes to the
//!   handler that was installed before this one, if any (the device's death reporter, which
//!   records the signal and address); then the handler repeats the access while
//!   SIGBUS is blocked in it, and the kernel, finding a fault signal blocked, restores the
//!   default action and kills the process by SIGBUS. No `sigaction` is needed for that, so it
//!   works under a seccomp policy that refuses it. A SIGBUS sent by another process (no
//!   access to repeat) ends the process with status 128 + 7 if the previous handler did not.
//!
//! I/O the kernel does into such pages (io_uring reads and writes) fails with EFAULT and
//! raises no signal. Regions are guarded only once the handler is installed, and only those
//! mapped from received fds: memory ringvm creates is sealed against shrinking.
//!
//! [`GuestMemory::from_regions`]: crate::GuestMemory::from_regions
//! [`GuestMemory::check_backing`]: crate::GuestMemory::check_backing

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::region::HOST_PAGE;
use crate::{Error, Result};

/// Mappings guarded at once: a device's memory table (at most 32 regions with
/// `ADD_MEM_REG`) twice over, while a new table replaces the old one, with room to spare.
const SLOTS: usize = 128;

/// One guarded mapping, `start..end`; free when `end` is 0. Written under `REGISTER`, read
/// by the handler without a lock (plain atomic loads are async-signal-safe).
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
}

static GUARDED: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
    }
}; SLOTS];
/// Serialises registrations and the installation (never taken by the handler).
static REGISTER: Mutex<()> = Mutex::new(());
static INSTALLED: AtomicBool = AtomicBool::new(false);
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The eventfd the handler writes to (raw, for the handler); owned by `NOTIFIER`.
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
static NOTIFIER: OnceLock<OwnedFd> = OnceLock::new();
/// The `SA_SIGINFO` handler installed for SIGBUS before [`install_sigbus_handler`]'s (0: none).
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);

/// A mapping registered with the handler; unregistered on drop.
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &GUARDED[self.slot];
        slot.end.store(0, Ordering::Release);
        slot.start.store(0, Ordering::Release);
    }
}

/// Registers `start..start + len` (a mapping of a received fd) with the handler, if it is
/// installed. Must be dropped before the mapping is unmapped.
pub(crate) fn guard(start: usize, len: usize) -> Result<Option<Guard>> {
    if !INSTALLED.load(Ordering::Acquire) {
        return Ok(None);
    }
    let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    let slot = GUARDED
        .iter()
        .position(|s| s.end.load(Ordering::Acquire) == 0)
        .ok_or(Error::TooManyGuardedRegions(SLOTS))?;
    GUARDED[slot].start.store(start, Ordering::Release);
    GUARDED[slot].end.store(start + len, Ordering::Release);
    Ok(Some(Guard { slot }))
}

/// Whether `addr` lies in a guarded mapping.
fn is_guarded(addr: usize) -> bool {
    GUARDED.iter().any(|s| {
        let end = s.end.load(Ordering::Acquire);
        end != 0 && s.start.load(Ordering::Acquire) <= addr && addr < end
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only async-signal-safe work below: atomic loads and stores, mmap, write and _exit.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGBUS
    // si_addr is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && is_guarded(addr) {
        let page = addr & !(HOST_PAGE - 1);
        // SAFETY: MAP_FIXED replaces one page inside a guarded mapping, which this process
        // owns (a `MmapRegion`, whose `Drop` unregisters it before unmapping) and whose file
        // no longer backs that page; every access to guest memory goes through volatile
        // views, so no Rust reference depends on the page's contents.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                HOST_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            let fd = NOTIFY_FD.load(Ordering::Relaxed);
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to the eventfd `NOTIFIER` keeps open.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            return;
        }
    }
    // Outside received guest memory, or a page that could not be replaced (a huge page).
    let line = b"ringvm: SIGBUS outside guest memory a frontend sent, or not survivable there\n";
    // SAFETY: writes a static buffer to stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    let previous = PREVIOUS.load(Ordering::Relaxed);
    if previous != 0 {
        // SAFETY: `previous` is the address of the SA_SIGINFO handler `sigaction` returned
        // when this one was installed (only such handlers are kept), called as the kernel
        // would call it, with this signal's own arguments.
        unsafe {
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(previous);
            handler(sig, info, ctx);
        }
    }
    if code > 0 {
        // A fault: repeat the access. SIGBUS is blocked while this handler runs (no
        // SA_NODEFER), and a fault signal that is blocked makes the kernel reset its action
        // to the default and deliver it: the process dies by SIGBUS at this address.
        // SAFETY: the read faults (the reason this handler runs); it returns only if the
        // page came back meanwhile, and then reads one byte of mapped memory.
        let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
    }
    // Sent by another process, or the page came back: end the process.
    // SAFETY: ends the process.
    unsafe { libc::_exit(128 + libc::SIGBUS) }
}

/// Installs the SIGBUS handler (see the module documentation) and creates its notifier.
/// Call it once, before mapping received memory and before a seccomp filter (it calls
/// `sigaction`), and after the handler that should hear of the faults it does not survive;
/// a second call does nothing.
pub fn install_sigbus_handler() -> io::Result<()> {
    let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let fd = match NOTIFIER.get() {
        Some(fd) => fd,
        None => {
            // SAFETY: plain syscall; the result is checked.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` was just created and is owned by nobody else.
            NOTIFIER.get_or_init(|| unsafe { OwnedFd::from_raw_fd(raw) })
        }
    };
    NOTIFY_FD.store(fd.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; the fields set below make it an SA_SIGINFO
    // handler with an empty mask (SIGBUS itself stays blocked while it runs).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: a zeroed sigaction is valid, for the kernel to fill in.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `sa` is initialised; the handler only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, &mut old) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Only a handler that takes siginfo can be called with it (std's stack-overflow handler
    // is one too; SIG_DFL and SIG_IGN are not handlers).
    if old.sa_flags & libc::SA_SIGINFO != 0
        && old.sa_sigaction != libc::SIG_DFL
        && old.sa_sigaction != libc::SIG_IGN
    {
        PREVIOUS.store(old.sa_sigaction, Ordering::Relaxed);
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// An eventfd whose counter the handler increments on every fault it survives; `None` until
/// [`install_sigbus_handler`]. Read it (a duplicate) to learn that guest memory shrank.
pub fn notifier() -> Option<BorrowedFd<'static>> {
    NOTIFIER.get().map(|fd| fd.as_fd())
}

/// The number of faults in guest memory the handler survived.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}
