// Constant names a policy may use, each value taken from libc or computed from kvm-bindings at
// build time (never typed by hand). Included by build.rs only.

/// KVM ioctl numbers, as linux/kvm.h (and kvm-ioctls) define them.
fn kvm_ioctls() -> Vec<(&'static str, u64)> {
    use kvm_bindings::*;
    use std::mem::size_of;
    let io = |nr: u32| u64::from(ioc(0, nr, 0));
    let ior = |nr: u32, size: usize| u64::from(ioc(2, nr, size));
    let iow = |nr: u32, size: usize| u64::from(ioc(1, nr, size));
    let iowr = |nr: u32, size: usize| u64::from(ioc(3, nr, size));
    vec![
        ("KVM_RUN", io(0x80)),
        ("KVM_GET_REGS", ior(0x81, size_of::<kvm_regs>())),
        ("KVM_SET_REGS", iow(0x82, size_of::<kvm_regs>())),
        ("KVM_GET_SREGS", ior(0x83, size_of::<kvm_sregs>())),
        ("KVM_SET_SREGS", iow(0x84, size_of::<kvm_sregs>())),
        ("KVM_TRANSLATE", iowr(0x85, size_of::<kvm_translation>())),
        ("KVM_IRQ_LINE", iow(0x61, size_of::<kvm_irq_level>())),
        ("KVM_SET_GSI_ROUTING", iow(0x6a, size_of::<kvm_irq_routing>())),
        ("KVM_IRQFD", iow(0x76, size_of::<kvm_irqfd>())),
        ("KVM_IOEVENTFD", iow(0x79, size_of::<kvm_ioeventfd>())),
        ("KVM_SIGNAL_MSI", iow(0xa5, size_of::<kvm_msi>())),
        ("KVM_GET_FPU", ior(0x8c, size_of::<kvm_fpu>())),
        ("KVM_SET_FPU", iow(0x8d, size_of::<kvm_fpu>())),
        ("KVM_SET_GUEST_DEBUG", iow(0x9b, size_of::<kvm_guest_debug>())),
    ]
}

/// `_IOC(dir, KVMIO, nr, size)` with the asm-generic layout (x86_64): nr 0-7, type 8-15,
/// size 16-29, direction 30-31.
fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    let size = u32::try_from(size).expect("ioctl argument size fits 14 bits");
    assert!(size < (1 << 14), "ioctl argument size fits 14 bits");
    (dir << 30) | (size << 16) | (kvm_bindings::KVMIO << 8) | nr
}

/// Every constant a policy may name.
pub fn constants() -> Vec<(&'static str, u64)> {
    macro_rules! libc_consts {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name), libc::$name as u64)),*]
        };
    }
    let mut v = libc_consts![
        PROT_NONE,
        PROT_READ,
        PROT_WRITE,
        PROT_EXEC,
        MAP_SHARED,
        MAP_PRIVATE,
        MAP_ANONYMOUS,
        MAP_FIXED,
        MAP_NORESERVE,
        MAP_STACK,
        MADV_DONTNEED,
        MREMAP_MAYMOVE,
        F_DUPFD_CLOEXEC,
        F_GETFL,
        F_SETFL,
        F_GETFD,
        F_SETFD,
        O_NONBLOCK,
        AT_EMPTY_PATH,
        AF_UNIX,
        SOCK_STREAM,
        SOCK_SEQPACKET,
        SOCK_CLOEXEC,
        P_PIDFD,
        WEXITED,
        WNOHANG,
        SS_DISABLE,
        SIG_BLOCK,
        SIG_UNBLOCK,
        SIG_SETMASK,
        FUTEX_WAIT,
        FUTEX_WAKE,
        FUTEX_WAIT_BITSET,
        FUTEX_WAKE_BITSET,
        FUTEX_PRIVATE_FLAG,
        FUTEX_CLOCK_REALTIME,
        CLOCK_MONOTONIC,
        CLOCK_REALTIME,
        TCGETS,
        TCSETS,
        FIONBIO,
        FIOCLEX,
        TUNSETOFFLOAD,
        TUNSETVNETHDRSZ,
        TUNSETVNETLE,
        TUNSETQUEUE,
        GRND_NONBLOCK,
        SIGKILL,
        SIGABRT,
        PR_SET_NO_NEW_PRIVS,
        SECCOMP_SET_MODE_FILTER,
        IPPROTO_TCP,
        TCP_NODELAY,
    ];
    // glibc's SIGRTMIN (34: NPTL keeps 32 and 33), the signal that kicks a vCPU.
    v.push(("SIGRTMIN", libc::SIGRTMIN() as u64));
    v.extend(kvm_ioctls());
    v
}
