//! The embedded programs, run by a small classic-BPF interpreter on synthetic `seccomp_data`:
//! for every system call number and many argument vectors, the program's action must be
//! exactly what the policy's rules say (`seccomp::allows`), and the architecture and x32
//! checks must kill. The rules themselves are checked for what must never be in them.

use seccomp::{allowed, allows, filter, logging_filter, rules, ArgOp, Policy, SockFilter};

/// The policy compiled from `<name>.policy` (the VMM's in `policies/`, a device's in its crate).
fn named(name: &str) -> Policy {
    Policy::from_name(name).unwrap_or_else(|| panic!("no policy {name}"))
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const KILL_PROCESS: u32 = 0x8000_0000;
const LOG: u32 = 0x7ffc_0000;
const ALLOW: u32 = 0x7fff_0000;

/// `struct seccomp_data`.
#[derive(Clone, Copy, Debug)]
struct Data {
    nr: u32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}

impl Data {
    fn x86_64(nr: u32, args: [u64; 6]) -> Data {
        Data {
            nr,
            arch: AUDIT_ARCH_X86_64,
            ip: 0x7f00_dead_beef,
            args,
        }
    }

    /// The 32-bit word at `offset`, as the kernel lays it out (little endian).
    fn word(&self, offset: u32) -> u32 {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&self.nr.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.arch.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.ip.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let o = offset as usize;
        assert!(
            o.is_multiple_of(4) && o + 4 <= 64,
            "load outside seccomp_data: {o}"
        );
        u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"))
    }
}

/// Runs a classic BPF program the way the kernel's seccomp does, for the opcodes the compiler
/// emits (and `ja`); panics on anything else, on a jump out of the program or a fall off its
/// end: all of those would make the kernel refuse the program.
fn run(program: &[SockFilter], data: &Data) -> u32 {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    loop {
        let i = program
            .get(pc)
            .unwrap_or_else(|| panic!("fell off the end at {pc}"));
        pc += 1;
        let jump = |cond: bool| {
            if cond {
                usize::from(i.jt)
            } else {
                usize::from(i.jf)
            }
        };
        match i.code {
            0x20 => a = data.word(i.k),       // ld [k]
            0x54 => a &= i.k,                 // and #k
            0x15 => pc += jump(a == i.k),     // jeq #k
            0x35 => pc += jump(a >= i.k),     // jge #k
            0x25 => pc += jump(a > i.k),      // jgt #k
            0x45 => pc += jump(a & i.k != 0), // jset #k
            0x05 => pc += i.k as usize,       // ja
            0x06 => return i.k,               // ret #k
            code => panic!("unexpected opcode {code:#x} at {}", pc - 1),
        }
        assert!(pc < program.len(), "jump out of the program to {pc}");
    }
}

/// Argument vectors that probe each condition of the policy: every tested value, with each
/// of its mask's bits flipped, in both halves, plus zeros and all ones.
fn probes(policy: Policy) -> Vec<[u64; 6]> {
    let mut out = vec![[0; 6], [u64::MAX; 6]];
    for rule in rules(policy) {
        for alternative in rule.alternatives {
            // An argument vector satisfying every test of the alternative.
            let mut base = [0u64; 6];
            for t in alternative.iter() {
                let arg = usize::from(t.arg);
                base[arg] = match t.op {
                    ArgOp::Eq => (base[arg] & !t.mask) | t.value,
                    // Any other value under the mask: flip its lowest bit.
                    ArgOp::Ne => {
                        (base[arg] & !t.mask) | (t.value ^ (t.mask & t.mask.wrapping_neg()))
                    }
                };
            }
            out.push(base);
            for t in alternative.iter() {
                let arg = usize::from(t.arg);
                let mut with = base;
                with[arg] = t.value;
                out.push(with);
                for bit in [0, 1, 2, 3, 8, 12, 31, 32, 33, 63] {
                    let mut flipped = base;
                    flipped[arg] ^= 1 << bit;
                    out.push(flipped);
                }
                // Bits outside the mask do not matter.
                let mut outside = base;
                outside[arg] |= !t.mask;
                out.push(outside);
            }
        }
    }
    out
}

#[test]
fn every_call_number_gets_exactly_the_policy_action() {
    for policy in Policy::all() {
        let probes = probes(policy);
        for (program, default) in [
            (filter(policy), KILL_PROCESS),
            (logging_filter(policy), LOG),
        ] {
            for nr in 0..512 {
                for args in &probes {
                    let want = if allows(policy, nr, args) {
                        ALLOW
                    } else {
                        default
                    };
                    let got = run(program, &Data::x86_64(nr, *args));
                    assert_eq!(got, want, "{policy:?} nr {nr} args {args:x?}");
                }
            }
        }
    }
}

#[test]
fn every_argument_condition_is_tested_both_ways() {
    for policy in Policy::all() {
        let probes = probes(policy);
        for rule in rules(policy).iter().filter(|r| !r.alternatives.is_empty()) {
            let mut allowed_seen = false;
            let mut denied_seen = false;
            for args in &probes {
                match run(filter(policy), &Data::x86_64(rule.nr, *args)) {
                    ALLOW => allowed_seen |= rule.allows(args),
                    KILL_PROCESS => denied_seen = true,
                    other => panic!("action {other:#x}"),
                }
            }
            assert!(
                allowed_seen,
                "{policy:?}: `{}: {}` never allowed",
                rule.syscall, rule.condition
            );
            assert!(
                denied_seen,
                "{policy:?}: `{}: {}` never denied",
                rule.syscall, rule.condition
            );
        }
    }
}

#[test]
fn random_arguments_agree_with_the_rules() {
    // xorshift64*: reproducible without a crate.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for policy in Policy::all() {
        let nrs: Vec<u32> = rules(policy).iter().map(|r| r.nr).collect();
        for _ in 0..20_000 {
            let nr = nrs[(next() as usize) % nrs.len()];
            // Mostly small values (flags, ioctl numbers' low bits), sometimes anything.
            let mut args = [0u64; 6];
            for a in &mut args {
                *a = match next() % 4 {
                    0 => next(),
                    1 => next() & 0xff,
                    2 => next() & 0xffff_ffff,
                    _ => 0,
                };
            }
            let want = if allows(policy, nr, &args) {
                ALLOW
            } else {
                KILL_PROCESS
            };
            assert_eq!(
                run(filter(policy), &Data::x86_64(nr, args)),
                want,
                "{policy:?} {nr} {args:x?}"
            );
        }
    }
}

#[test]
fn other_architectures_and_x32_calls_are_killed_even_when_logging() {
    for policy in Policy::all() {
        for program in [filter(policy), logging_filter(policy)] {
            for nr in 0..512 {
                for arch in [AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64, 0] {
                    let d = Data {
                        arch,
                        ..Data::x86_64(nr, [0; 6])
                    };
                    assert_eq!(
                        run(program, &d),
                        KILL_PROCESS,
                        "{policy:?} arch {arch:#x} nr {nr}"
                    );
                }
                let d = Data::x86_64(nr | 0x4000_0000, [0; 6]);
                assert_eq!(run(program, &d), KILL_PROCESS, "{policy:?} x32 nr {nr}");
            }
            for nr in [0x4000_0000, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
                assert_eq!(
                    run(program, &Data::x86_64(nr, [0; 6])),
                    KILL_PROCESS,
                    "{policy:?} {nr:#x}"
                );
            }
        }
    }
}

const fn nr(n: libc::c_long) -> u32 {
    n as u32
}

/// Calls no policy may allow: paths, new programs, other processes, namespaces, sockets.
const NEVER: &[(&str, u32)] = &[
    ("open", nr(libc::SYS_open)),
    ("openat", nr(libc::SYS_openat)),
    ("openat2", nr(libc::SYS_openat2)),
    ("execve", nr(libc::SYS_execve)),
    ("execveat", nr(libc::SYS_execveat)),
    ("ptrace", nr(libc::SYS_ptrace)),
    ("process_vm_writev", nr(libc::SYS_process_vm_writev)),
    ("mount", nr(libc::SYS_mount)),
    ("umount2", nr(libc::SYS_umount2)),
    ("pivot_root", nr(libc::SYS_pivot_root)),
    ("chroot", nr(libc::SYS_chroot)),
    ("unshare", nr(libc::SYS_unshare)),
    ("setns", nr(libc::SYS_setns)),
    ("socket", nr(libc::SYS_socket)),
    ("connect", nr(libc::SYS_connect)),
    ("bind", nr(libc::SYS_bind)),
    ("io_uring_setup", nr(libc::SYS_io_uring_setup)),
    ("bpf", nr(libc::SYS_bpf)),
    ("setuid", nr(libc::SYS_setuid)),
    ("capset", nr(libc::SYS_capset)),
    ("init_module", nr(libc::SYS_init_module)),
    ("kexec_load", nr(libc::SYS_kexec_load)),
    ("userfaultfd", nr(libc::SYS_userfaultfd)),
    ("perf_event_open", nr(libc::SYS_perf_event_open)),
    ("keyctl", nr(libc::SYS_keyctl)),
    ("memfd_create", nr(libc::SYS_memfd_create)),
    ("kill", nr(libc::SYS_kill)),
];

/// Device processes are single-threaded and never start anything.
const NEVER_IN_DEVICES: &[(&str, u32)] = &[
    ("clone", nr(libc::SYS_clone)),
    ("clone3", nr(libc::SYS_clone3)),
    ("fork", nr(libc::SYS_fork)),
    ("vfork", nr(libc::SYS_vfork)),
    ("mprotect", nr(libc::SYS_mprotect)),
    ("prctl", nr(libc::SYS_prctl)),
    ("seccomp", nr(libc::SYS_seccomp)),
    ("ioctl", nr(libc::SYS_ioctl)),
    ("read", nr(libc::SYS_read)),
    ("recvmsg", nr(libc::SYS_recvmsg)),
    ("sendmsg", nr(libc::SYS_sendmsg)),
];

#[test]
fn no_policy_allows_opening_executing_or_escaping() {
    for policy in Policy::all() {
        for &(name, n) in NEVER {
            if name == "socket" && [Policy::VMM, Policy::VMM_GDB].contains(&policy.name()) {
                // The VMM's vsock broker makes AF_UNIX sockets to connect guest connections
                // to PATH_<port>; nothing else, and no device ever.
                for domain in [
                    libc::AF_INET,
                    libc::AF_INET6,
                    libc::AF_NETLINK,
                    libc::AF_PACKET,
                ] {
                    let args = [domain as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
                    assert_eq!(
                        run(filter(policy), &Data::x86_64(n, args)),
                        KILL_PROCESS,
                        "vmm socket({domain})"
                    );
                }
                continue;
            }
            assert!(!allowed(policy).contains(&name), "{policy:?} allows {name}");
            for args in probes(policy) {
                assert_eq!(
                    run(filter(policy), &Data::x86_64(n, args)),
                    KILL_PROCESS,
                    "{policy:?} {name}"
                );
            }
        }
    }
    let devices =
        Policy::all().filter(|p| ![Policy::VMM, Policy::VMM_GDB, Policy::VCPU].contains(&p.name()));
    for policy in devices {
        for &(name, n) in NEVER_IN_DEVICES {
            if policy == named("net") && name == "ioctl" {
                continue;
            }
            assert_eq!(
                run(filter(policy), &Data::x86_64(n, [0; 6])),
                KILL_PROCESS,
                "{policy:?} {name}"
            );
        }
    }
}

#[test]
fn io_uring_register_only_gives_a_ring_slot_back() {
    // IORING_UNREGISTER_RING_FDS: an executor gives its ring's slot in the thread's table of
    // registered rings back as it drops. Every other registration (buffers, files,
    // restrictions, enabling, buffer rings, a ring slot taken) happens before the filter.
    const UNREGISTER_RING_FDS: u64 = 21;
    let n = nr(libc::SYS_io_uring_register);
    let with = |opcode: u64| [3, opcode, 0x1000, 1, 0, 0];
    for policy in Policy::all() {
        if policy == named("vcpu") {
            assert!(!allowed(policy).contains(&"io_uring_register"));
            continue;
        }
        assert_eq!(
            run(filter(policy), &Data::x86_64(n, with(UNREGISTER_RING_FDS))),
            ALLOW,
            "{policy:?}"
        );
        for opcode in [
            0,                               /* REGISTER_BUFFERS */
            2,                               /* REGISTER_FILES */
            11,                              /* REGISTER_RESTRICTIONS */
            12,                              /* REGISTER_ENABLE_RINGS */
            20,                              /* REGISTER_RING_FDS */
            22,                              /* REGISTER_PBUF_RING */
            UNREGISTER_RING_FDS | (1 << 31), /* by a registered ring */
            UNREGISTER_RING_FDS | (1 << 32),
            u64::MAX,
        ] {
            assert_eq!(
                run(filter(policy), &Data::x86_64(n, with(opcode))),
                KILL_PROCESS,
                "{policy:?} io_uring_register {opcode:#x}"
            );
        }
    }
}

#[test]
fn the_vmm_allows_prctl_and_seccomp_only_to_narrow_a_vcpu_thread() {
    let vmm = filter(named("vmm"));
    let (prctl, sc) = (nr(libc::SYS_prctl), nr(libc::SYS_seccomp));
    let nnp = libc::PR_SET_NO_NEW_PRIVS as u64;
    assert_eq!(run(vmm, &Data::x86_64(prctl, [nnp, 1, 0, 0, 0, 0])), ALLOW);
    for args in [
        [nnp, 0, 0, 0, 0, 0],
        [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0],
        [libc::PR_SET_SECCOMP as u64, 2, 0, 0, 0, 0],
        [libc::PR_CAPBSET_DROP as u64, 1, 0, 0, 0, 0],
    ] {
        assert_eq!(
            run(vmm, &Data::x86_64(prctl, args)),
            KILL_PROCESS,
            "{args:?}"
        );
    }
    let filter_mode = libc::SECCOMP_SET_MODE_FILTER as u64;
    assert_eq!(
        run(vmm, &Data::x86_64(sc, [filter_mode, 0, 0x1000, 0, 0, 0])),
        ALLOW
    );
    for flags in [
        libc::SECCOMP_FILTER_FLAG_TSYNC,
        8, /* NEW_LISTENER */
        2, /* LOG */
    ] {
        assert_eq!(
            run(
                vmm,
                &Data::x86_64(sc, [filter_mode, flags, 0x1000, 0, 0, 0])
            ),
            KILL_PROCESS
        );
    }
    assert_eq!(
        run(vmm, &Data::x86_64(sc, [0 /* STRICT */, 0, 0, 0, 0, 0])),
        KILL_PROCESS
    );
    for policy in [named("rng"), named("block"), named("net"), named("vcpu")] {
        assert!(!allowed(policy).contains(&"prctl") && !allowed(policy).contains(&"seccomp"));
    }
}

#[test]
fn memory_is_never_mapped_executable() {
    let (read, rw, exec) = (
        libc::PROT_READ as u64,
        (libc::PROT_READ | libc::PROT_WRITE) as u64,
        libc::PROT_EXEC as u64,
    );
    for policy in Policy::all() {
        for (call, n) in [
            ("mmap", nr(libc::SYS_mmap)),
            ("mprotect", nr(libc::SYS_mprotect)),
        ] {
            if !allowed(policy).contains(&call) {
                continue;
            }
            for prot in [0, read, rw] {
                let args = [0, 4096, prot, 0x22, u64::MAX, 0];
                assert_eq!(
                    run(filter(policy), &Data::x86_64(n, args)),
                    ALLOW,
                    "{policy:?} {call} {prot:#x}"
                );
            }
            for prot in [exec, read | exec, rw | exec, exec | (1 << 32)] {
                let args = [0, 4096, prot, 0x22, u64::MAX, 0];
                assert_eq!(
                    run(filter(policy), &Data::x86_64(n, args)),
                    KILL_PROCESS,
                    "{policy:?} {call} {prot:#x}"
                );
            }
        }
    }
}

#[test]
fn ioctls_are_allowed_by_number_only() {
    let ioctl = nr(libc::SYS_ioctl);
    let kvm_run = 0xae80;
    let kvm_create_vm = 0xae01;
    let vcpu = filter(named("vcpu"));
    assert_eq!(
        run(vcpu, &Data::x86_64(ioctl, [9, kvm_run, 0, 0, 0, 0])),
        ALLOW
    );
    // The high half of the request must be zero too.
    assert_eq!(
        run(
            vcpu,
            &Data::x86_64(ioctl, [9, kvm_run | 1 << 32, 0, 0, 0, 0])
        ),
        KILL_PROCESS
    );
    for request in [kvm_create_vm, libc::TCGETS, libc::TUNSETIFF, 0] {
        assert_eq!(
            run(vcpu, &Data::x86_64(ioctl, [9, request, 0, 0, 0, 0])),
            KILL_PROCESS,
            "{request:#x}"
        );
    }
    let vmm = filter(named("vmm"));
    assert_eq!(
        run(vmm, &Data::x86_64(ioctl, [0, libc::TCSETS, 0, 0, 0, 0])),
        ALLOW
    );
    assert_eq!(
        run(vmm, &Data::x86_64(ioctl, [0, libc::TIOCSTI, 0, 0, 0, 0])),
        KILL_PROCESS
    );
    let net = filter(named("net"));
    assert_eq!(
        run(
            net,
            &Data::x86_64(ioctl, [5, libc::TUNSETOFFLOAD, 0, 0, 0, 0])
        ),
        ALLOW
    );
    assert_eq!(
        run(net, &Data::x86_64(ioctl, [5, libc::TUNSETIFF, 0, 0, 0, 0])),
        KILL_PROCESS
    );
    assert_eq!(
        run(net, &Data::x86_64(ioctl, [5, kvm_run, 0, 0, 0, 0])),
        KILL_PROCESS
    );
}

#[test]
fn the_kvm_ioctl_numbers_are_the_kernels() {
    // From linux/kvm.h on x86_64 (sizes: kvm_regs 144, kvm_translation 24, kvm_irq_level 8,
    // kvm_irq_routing 8, kvm_irqfd 32, kvm_ioeventfd 64), checked against strace -X raw.
    let want = [
        ("KVM_RUN", 0xae80u64),
        ("KVM_GET_REGS", 0x8090_ae81),
        ("KVM_TRANSLATE", 0xc018_ae85),
        ("KVM_IRQ_LINE", 0x4008_ae61),
        ("KVM_SET_GSI_ROUTING", 0x4008_ae6a),
        ("KVM_IRQFD", 0x4020_ae76),
        ("KVM_IOEVENTFD", 0x4040_ae79),
    ];
    let ioctl = nr(libc::SYS_ioctl);
    for (name, number) in want {
        let rule = rules(named("vcpu"))
            .iter()
            .find(|r| r.condition.ends_with(name))
            .unwrap_or_else(|| panic!("no rule for {name}"));
        assert_eq!(rule.nr, ioctl);
        assert_eq!(rule.alternatives[0][0].value, number, "{name}");
    }
}

#[test]
fn every_rule_has_a_reason() {
    for policy in Policy::all() {
        for rule in rules(policy) {
            assert!(
                rule.reason.len() > 10,
                "{policy:?} {}: {:?}",
                rule.syscall,
                rule.reason
            );
        }
    }
}
