//! The VMM's unsafe code, in one place: memory slots, vCPU kicks by signal, terminal modes,
//! and the signal handlers and plain exits of device processes.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Once;

use kvm_bindings::{kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::death::DeathReport;

/// Registers guest memory with KVM.
///
/// `host` must point to a mapping of `size` bytes that stays mapped for the VM's lifetime:
/// the caller passes a region of the VM's `GuestMemory`, which the VM keeps alive.
pub fn set_memory_slot(
    vm: &VmFd,
    slot: u32,
    guest: u64,
    size: u64,
    host: *mut u8,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the region describes a live mapping owned by the VM's GuestMemory, which
    // outlives the VM fd (the Vm struct drops the VmFd first); KVM validates the rest.
    unsafe { vm.set_user_memory_region(region) }
}

thread_local! {
    /// The kvm_run of the vCPU on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, registered by
        // `VcpuKickGuard::new` and cleared before that mapping goes away; a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed struct, a valid handler and an empty mask;
        // SA_RESTART is left out so KVM_RUN returns EINTR.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(io::Error::last_os_error());
        }
    });
    result
}

/// Registers the vCPU's kvm_run with the kick handler for as long as it lives.
pub struct VcpuKickGuard;

impl VcpuKickGuard {
    pub fn new(vcpu: &mut VcpuFd) -> VcpuKickGuard {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        VcpuKickGuard
    }
}

impl Drop for VcpuKickGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Sends the kick signal to a vCPU thread.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: the caller passes the pthread_t of a thread it has not joined yet.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// The calling thread's pthread_t.
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Clock ticks per second, the unit of CPU times in /proc/PID/stat.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; glibc answers _SC_CLK_TCK from the auxiliary
    // vector, without a system call.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

/// Puts a terminal in raw mode until dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode for `fd` if it is a terminal; `None` otherwise.
    pub fn new(fd: RawFd) -> io::Result<Option<RawTerminal>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it and its result is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct; tcsetattr's result is checked.
        if unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw)
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The size (columns, rows) of the terminal on `fd`; `None` if it is not a terminal or
/// does not know its size.
pub fn terminal_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data that TIOCGWINSZ fills; the result is checked, and the
    // ioctl only reads the descriptor's terminal state.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ws` outlives the call.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Suberror and data words of the KVM_EXIT_INTERNAL_ERROR the vCPU just returned.
pub fn internal_error(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the exit union; it is plain data.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    (internal.suberror, internal.data[..n].to_vec())
}

/// A KVM-ioctl handle on an eventfd: a duplicate of `fd` in the type kvm-ioctls takes for
/// irqfds and ioeventfds. KVM identifies the eventfd by the file, not by the descriptor, so
/// registering through a duplicate and closing it afterwards is fine.
pub fn kvm_eventfd(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<vmm_sys_util::eventfd::EventFd> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let owned = fd.try_clone_to_owned()?;
    // SAFETY: `owned` is a descriptor this function owns (just duplicated); into_raw_fd hands
    // that ownership to the EventFd, which closes it once. It refers to an eventfd because the
    // callers only pass eventfds (the transport's kick and call fds; see
    // `devices::pci::virtio_pci` tests `notify_write_signals_kick_through_kvm_ioeventfd`).
    Ok(unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(owned.into_raw_fd()) })
}

/// Whether `fd` is readable right now (an eventfd with a non-zero counter), without blocking.
pub fn fd_readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for a descriptor borrowed for the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
}

/// Waits until one of `fds` is readable (or hung up); returns which are. Retries on EINTR.
pub fn wait_readable(fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfds for descriptors borrowed for
        // the call; poll only writes their `revents`.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The IRR of the in-kernel IOAPIC and of the master PIC (tests check that an IRQ line
/// reached the irqchip through the routing table).
#[cfg(test)]
pub fn irqchip_irr(vm: &VmFd) -> Result<(u32, u8), kvm_ioctls::Error> {
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut ioapic)?;
    let mut pic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut pic)?;
    // SAFETY: KVM_GET_IRQCHIP fills the union member named by chip_id, set above; both
    // members are plain data.
    let irr = unsafe { (ioapic.chip.ioapic.irr, pic.chip.pic.irr) };
    Ok(irr)
}

/// Takes ownership of descriptor `fd` inherited from the parent, after checking that it is
/// an open socket; marks it close-on-exec.
pub fn inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    let owned = inherited_fd(fd)?;
    // SAFETY: fstat writes into a zeroed stat buffer we own; the descriptor is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(owned.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptor is not a socket",
        ));
    }
    Ok(owned)
}

/// Takes ownership of descriptor `fd` inherited from the parent (a `--fd`/`--tap-fd`
/// argument), after checking that it is open; marks it close-on-exec.
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors 0 to 2 are stdin, stdout and stderr",
        ));
    }
    // SAFETY: fcntl on any number is safe; a closed one is an EBADF return.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (fcntl succeeded) and, by the command-line contract, was
    // handed to this process for this one use; nothing else in the process owns it. Callers
    // take each number once: `device::open_taps` refuses a number given twice (or equal to
    // `--fd`), and `--fd` is taken only by `device::serve`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where the death reporters of a device process write their [`DeathReport`] (ringvm's
/// pipe, `--report-fd`); -1 for none.
static REPORT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Writes `report` to the report descriptor (if any) and a line saying what happened to
/// stderr. Async-signal-safe: formatting into a stack buffer and write(2) only.
fn report_death(report: DeathReport) {
    let fd = REPORT_FD.load(std::sync::atomic::Ordering::Relaxed);
    let record = report.to_bytes();
    if fd >= 0 {
        // SAFETY: writes a live stack array of its own length to a descriptor this process
        // owns (kept open for its life by `install_death_reporters`).
        unsafe { libc::write(fd, record.as_ptr().cast(), record.len()) };
    }
    let mut line = StackText::<160>::new();
    // Cut short at worst; nothing here allocates.
    let _ = if report.sent() {
        writeln!(line, "ringvm device: exiting{}", report.suffix())
    } else {
        writeln!(
            line,
            "ringvm device: signal {} ({}){}",
            report.signal,
            crate::death::signal_name(report.signal),
            report.suffix()
        )
    };
    // SAFETY: writes a live stack buffer of its own length to stderr.
    unsafe { libc::write(2, line.as_bytes().as_ptr().cast(), line.as_bytes().len()) };
}

/// Offset of `si_syscall` in x86_64's `siginfo_t`: signo, errno, code, padding, then the
/// `_sigsys` member {void *_call_addr; int _syscall; unsigned _arch} at 16.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe calls below: loads, write(2), and system calls.
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for SA_SIGINFO handlers; for a
    // SIGSYS from seccomp, si_syscall is set at this offset (x86_64 ABI; the e2e test
    // `refused_syscall_kills_only_the_device_and_the_vmm_names_it` checks the number).
    let nr: i32 = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // SAFETY: as above; _call_addr is the first field of the union (offset 16, as si_addr).
    let addr = unsafe { (*info).si_addr() } as u64;
    report_death(DeathReport {
        signal: libc::SIGSYS,
        value: nr,
        addr,
    });
    // The handler was reset (SA_RESETHAND) and SIGSYS is not blocked in it (SA_NODEFER): the
    // next refused call kills the process with SIGSYS. getppid is in no device policy.
    // SAFETY: plain system calls.
    unsafe {
        libc::syscall(libc::SYS_getppid);
        libc::_exit(128 + libc::SIGSYS);
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; si_code is a
    // plain field, and si_addr (the faulting address of SIGSEGV and SIGBUS) is read as the
    // first word of the union whatever the code. Checked by the e2e tests
    // `memory_fault_in_a_jailed_device_is_reported_with_its_address` (device_deaths.rs).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    report_death(DeathReport {
        signal: sig,
        value: code,
        addr,
    });
    if code <= 0 {
        // Sent by a process (SI_USER, SI_TKILL, ...): there is no instruction to fault again.
        // SAFETY: ends the process; exit_group is in every device policy.
        unsafe { libc::_exit(128 + sig) };
    }
    // Returning (rt_sigreturn) runs the faulting instruction again; SA_RESETHAND has made the
    // action the default, so that fault kills the process by the same signal. No
    // rt_sigaction (std's own handler re-raises with one, which the seccomp filter refuses).
}

extern "C" fn on_abort(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SI_USER and
    // SI_TKILL (the codes of kill and tgkill) the sender's pid is at si_pid.
    let (code, from) = unsafe { ((*info).si_code, (*info).si_pid()) };
    // SAFETY: a plain system call (in every device policy, for abort()'s raise).
    let own = unsafe { libc::getpid() };
    // abort() raises SIGABRT with tgkill on itself; anything else was sent to it.
    let value = if code == libc::SI_TKILL && from == own {
        crate::death::ABORTED
    } else {
        code.min(0)
    };
    report_death(DeathReport {
        signal: sig,
        value,
        addr: 0,
    });
    // The device is the init of its PID namespace, where a SIGABRT left at its default
    // action is ignored: it ends here, with the status a death by SIGABRT would give.
    // SAFETY: ends the process; exit_group is in every device policy.
    unsafe { libc::_exit(128 + sig) };
}

/// Installs the handlers that report how a device process dies, to `report` (ringvm's
/// pipe, read when the process has ended; see [`DeathReport`]) and to stderr:
///
/// - SIGSEGV and SIGBUS (in place of std's, whose re-raise calls rt_sigaction, which the
///   seccomp filter refuses): the signal, its code and the faulting address, then the
///   handler returns and the fault, repeated, kills the process by that signal. They run on
///   the signal stack std set up for the main thread (SA_ONSTACK), so a stack overflow is
///   reported too.
/// - With `trap_sigsys` (the filter traps), SIGSYS: the refused call's number, then the
///   process dies by SIGSYS.
/// - SIGABRT: whether the process aborted itself (abort(): a failed allocation, a panic
///   while panicking) or another process sent it, then the process exits with status 134.
///   Without it an abort would read as the seccomp refusal of abort()'s first call, or, as
///   PID 1 of its namespace, as the SIGSEGV of glibc's last resort.
pub fn install_death_reporters(report: Option<OwnedFd>, trap_sigsys: bool) -> io::Result<()> {
    if let Some(fd) = report {
        // Kept open for the life of the process: a handler may run at any time.
        REPORT_FD.store(
            std::os::fd::IntoRawFd::into_raw_fd(fd),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let handlers: [(libc::c_int, usize); 4] = [
        (libc::SIGSEGV, on_fault as *const () as usize),
        (libc::SIGBUS, on_fault as *const () as usize),
        (libc::SIGSYS, on_sigsys as *const () as usize),
        (libc::SIGABRT, on_abort as *const () as usize),
    ];
    for (sig, handler) in handlers {
        if sig == libc::SIGSYS && !trap_sigsys {
            continue;
        }
        // SAFETY: a zeroed sigaction is valid; the fields set below make it a SA_SIGINFO
        // handler with an empty mask, reset to the default action when it runs.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER | libc::SA_ONSTACK;
        // SAFETY: `sa` is initialised; the handlers only make async-signal-safe calls
        // (`report_death`, _exit).
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Text formatted on the stack, for messages written where allocating or locking is unsafe
/// (signal handlers) or unwelcome (the panic hook of a device process). What does not fit
/// in `N` bytes is cut off.
pub struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    pub const fn new() -> StackText<N> {
        StackText {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for StackText<N> {
    fn default() -> StackText<N> {
        StackText::new()
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            return Err(std::fmt::Error);
        }
        Ok(())
    }
}

/// Writes `msg` to stderr with one write(2) and ends the process with `code` (exit_group):
/// the two system calls every device policy allows, and no lock, exit handler or unwinding.
pub fn write_stderr_and_exit(msg: &[u8], code: i32) -> ! {
    // SAFETY: writes a borrowed, live buffer of its own length to descriptor 2, then ends
    // the process without running anything else of it.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

/// Forks this process for the device respawner (`crate::respawn`): `Ok(None)` in the child,
/// `Ok(Some((pid, pidfd)))` in the parent.
///
/// Call it only while this process has one thread (before the vCPU threads start): the
/// child is a copy of the calling thread alone, so a lock another thread held would stay
/// held in it forever. With one thread the child may allocate and run ordinary code.
pub fn fork_single_threaded() -> io::Result<Option<(i32, OwnedFd)>> {
    // SAFETY: fork has no memory-safety preconditions of its own; the caller guarantees the
    // process is single-threaded (vm::run forks before start_vcpus), so the child inherits
    // no lock held by a thread that does not exist in it.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => {
            // SAFETY: a plain system call on an integer; the child is ours and unreaped, so
            // its pid cannot have been reused.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
            Ok(Some((pid, unsafe { OwnedFd::from_raw_fd(fd) })))
        }
    }
}

/// In a forked helper: die with SIGKILL when the thread that forked it exits, and take
/// `name` as the process's name (`/proc/PID/comm`, at most 15 bytes).
pub fn become_helper(name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_NAME reads a nul-terminated string (truncated to 16 bytes) that
    // outlives the call.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked helper: closes every descriptor above 2 but those in `keep` (what it
/// inherited of the VMM: KVM, guest memory, its io_uring ring).
pub fn close_descriptors_except(keep: &[RawFd]) -> io::Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a number: the helper never returns to the VMM code that owns
            // these descriptors, so nothing uses them again (the directory's own descriptor,
            // already closed, gives EBADF).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Ends a forked helper without running the VMM's exit handlers or destructors.
pub fn exit_helper(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; it has no preconditions.
    unsafe { libc::_exit(code) }
}
