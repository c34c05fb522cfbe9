//! The sandbox of device processes, tested against the real jailed `ringvm device rng` of a
//! running VM: gdb attaches from the host (root, outside the jail) and makes the device
//! process itself call what an attacker who took it over would try.
//!
//! - With `--seccomp-log-failures` the filter lets every call through (and logs it), so what
//!   stops them is the jail: empty read-only root, no capabilities, own PID and network
//!   namespaces.
//! - With the filter on (the default), the first refused call kills the device by SIGSYS, and
//!   ringvm ends the VM naming the device and the call.

use std::path::Path;
use std::time::Duration;

use tests::{gdb_prints, HaltedVm};

/// `expr` as a call that returns -1 or a value, followed by errno.
fn with_errno(call: &str) -> [String; 2] {
    [call.to_string(), "*(int*)__errno_location()".to_string()]
}

const EACCES: &str = "13";
const ENOENT: &str = "2";
const EPERM: &str = "1";
const ESRCH: &str = "3";
const ENETUNREACH: &str = "101";

#[test]
fn jailed_device_cannot_reach_the_host_even_with_seccomp_logging_only() {
    let vm = HaltedVm::start(&["--seccomp-log-failures"]);
    let vmm = vm.live.child.id();
    let probes: Vec<(&str, String, &[&str])> = vec![
        (
            "open a host path",
            r#"(int)open("/etc/hostname", 0)"#.into(),
            &[EACCES, ENOENT],
        ),
        ("list /", r#"(int)open("/", 0x10000)"#.into(), &[EACCES]),
        (
            "execve a shell",
            r#"(int)execve("/bin/sh", 0, 0)"#.into(),
            &[EACCES, ENOENT],
        ),
        (
            "ptrace the VMM",
            format!("(long)ptrace(16, {vmm}, 0, 0)"),
            &[ESRCH, EPERM],
        ),
        (
            "mount",
            r#"(int)mount("none", "/", "tmpfs", 0, 0)"#.into(),
            &[EPERM],
        ),
        (
            "raise CAP_SYS_ADMIN into the ambient set",
            "(int)prctl(47, 2, 21, 0, 0)".into(),
            &[EPERM],
        ),
    ];
    let mut exprs = Vec::new();
    for (_, call, _) in &probes {
        exprs.extend(with_errno(call));
    }
    let refs: Vec<&str> = exprs.iter().map(String::as_str).collect();
    let values = gdb_prints(vm.device, &refs);
    assert_eq!(
        values.len(),
        exprs.len(),
        "gdb printed {values:?} for {exprs:?}"
    );
    for (i, (what, _, errnos)) in probes.iter().enumerate() {
        let (ret, errno) = (&values[2 * i], &values[2 * i + 1]);
        assert_eq!(ret, "-1", "{what}: succeeded inside the jail");
        assert!(
            errnos.contains(&errno.as_str()),
            "{what}: errno {errno}, expected one of {errnos:?}"
        );
    }
    // A socket can be made (socket(2) is logged, not refused, here) but goes nowhere: the
    // device's network namespace has no interface up and no route. 1.1.1.1:80, AF_INET.
    let connect = gdb_prints(
        vm.device,
        &[
            "$a = (long)malloc(16)",
            "*(long*)$a = 0x0101010150000002",
            "*(long*)($a + 8) = 0",
            "$s = (int)socket(2, 1, 0)",
            "(int)syscall(42, $s, $a, 16)",
            "*(int*)__errno_location()",
        ],
    );
    assert_eq!(
        connect[connect.len().saturating_sub(2)..],
        ["-1".to_string(), ENETUNREACH.to_string()],
        "connect to the outside: {connect:?}"
    );
    // The bounding set is empty: CAP_SYS_ADMIN cannot come back through exec either.
    let caps = gdb_prints(vm.device, &["(int)prctl(23, 21, 0, 0, 0)"]);
    assert_eq!(caps, ["0"], "CAP_SYS_ADMIN is still in the bounding set");
    // Logged, not killed: the device process is still there; then the VM is ended.
    assert!(
        Path::new(&format!("/proc/{}", vm.device)).exists(),
        "the device died although seccomp only logged"
    );
    let _ = vm.end(Duration::ZERO);
}

#[test]
fn refused_syscall_kills_only_the_device_and_the_vmm_names_it() {
    let vm = HaltedVm::start(&["--device-restarts", "0"]);
    let device = vm.device;
    // socket(2) is in no device policy: the filter refuses it and the device dies by SIGSYS.
    let _ = gdb_prints(device, &["(int)socket(2, 1, 0)"]);
    let (code, stderr) = vm.end(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device rng (pid {device}) killed by signal 31 (SIGSYS): its seccomp policy refused system call 41 (socket)"
        )),
        "{stderr}"
    );
    assert!(
        !Path::new(&format!("/proc/{device}")).exists(),
        "device process left behind"
    );
}

#[test]
fn a_new_io_uring_is_refused_in_a_device() {
    // The device's own ring is restricted (no opcode that opens a path); a new, unrestricted
    // ring would bypass that, so io_uring_setup is refused.
    let vm = HaltedVm::start(&["--device-restarts", "0"]);
    let device = vm.device;
    let _ = gdb_prints(device, &["(long)syscall(425, 8, (long)malloc(120))"]);
    let (code, stderr) = vm.end(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refused system call 425 (io_uring_setup)"),
        "{stderr}"
    );
}
