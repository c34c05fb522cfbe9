//! The VMM's unsafe code, in one place: memory slots, vCPU kicks by signal, terminal modes.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::Once;

use kvm_bindings::{kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};

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

/// Suberror and data words of the KVM_EXIT_INTERNAL_ERROR the vCPU just returned.
pub fn internal_error(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the exit union; it is plain data.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    (internal.suberror, internal.data[..n].to_vec())
}

/// A shared memfd mapping of guest RAM.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    _fd: std::os::fd::OwnedFd,
}

// SAFETY: the mapping is plain shared memory; concurrent access from vCPUs (and the guest) is
// inherent to guest RAM, and every host-side access goes through copies with bounds checks.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn memfd(len: u64) -> io::Result<Mapping> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ringvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is ours.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscall on our fd; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole memfd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            _fd: fd,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len, "checked by the caller");
        // SAFETY: the range is inside the live mapping (asserted); volatile copies because
        // the guest may access the same memory concurrently.
        unsafe {
            for (i, b) in bytes.iter().enumerate() {
                self.ptr.add(off + i).write_volatile(*b);
            }
        }
    }

    pub fn read(&self, off: usize, bytes: &mut [u8]) {
        assert!(off + bytes.len() <= self.len, "checked by the caller");
        // SAFETY: as for `write`.
        unsafe {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = self.ptr.add(off + i).read_volatile();
            }
        }
    }

    pub fn fill(&self, off: usize, value: u8, len: usize) {
        assert!(off + len <= self.len, "checked by the caller");
        // SAFETY: the range is inside the live mapping (asserted).
        unsafe { std::ptr::write_bytes(self.ptr.add(off), value, len) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `memfd`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
