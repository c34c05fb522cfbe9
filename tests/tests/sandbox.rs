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

use tests::{gdb_run, HaltedVm, Step};

/// A call to `func` with `args`, its result (as an int) printed, then errno.
fn with_errno<'a>(func: &'a str, args: &'a [&'a str]) -> [Step<'a>; 4] {
    [
        Step::Call(func, args),
        Step::Print("(int)$ret"),
        Step::Call("__errno_location", &[]),
        Step::Print("*(int*)$ret"),
    ]
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
    let vmm = vmm.to_string();
    let probes: Vec<(&str, &str, Vec<&str>, &[&str])> = vec![
        (
            "open a host path",
            "open",
            vec![r#""/etc/hostname""#, "0"],
            &[EACCES, ENOENT],
        ),
        ("list /", "open", vec![r#""/""#, "0x10000"], &[EACCES]),
        (
            "execve a shell",
            "execve",
            vec![r#""/bin/sh""#, "0", "0"],
            &[EACCES, ENOENT],
        ),
        (
            "ptrace the VMM",
            "ptrace",
            vec!["16", &vmm, "0", "0"],
            &[ESRCH, EPERM],
        ),
        (
            "mount",
            "mount",
            vec![r#""none""#, r#""/""#, r#""tmpfs""#, "0", "0"],
            &[EPERM],
        ),
        (
            "raise CAP_SYS_ADMIN into the ambient set",
            "prctl",
            vec!["47", "2", "21", "0", "0"],
            &[EPERM],
        ),
    ];
    let mut steps = Vec::new();
    for (_, func, args, _) in &probes {
        steps.extend(with_errno(func, args));
    }
    let values = gdb_run(vm.device, &steps);
    assert_eq!(
        values.len(),
        2 * probes.len(),
        "gdb printed {values:?} for {steps:?}"
    );
    for (i, (what, _, _, errnos)) in probes.iter().enumerate() {
        let (ret, errno) = (&values[2 * i], &values[2 * i + 1]);
        assert_eq!(ret, "-1", "{what}: succeeded inside the jail");
        assert!(
            errnos.contains(&errno.as_str()),
            "{what}: errno {errno}, expected one of {errnos:?}"
        );
    }
    // A socket can be made (socket(2) is logged, not refused, here) but goes nowhere: the
    // device's network namespace has no interface up and no route. 1.1.1.1:80, AF_INET.
    let connect = gdb_run(
        vm.device,
        &[
            Step::Set("*(long*)($scratch + 512) = 0x0101010150000002"),
            Step::Set("*(long*)($scratch + 520) = 0"),
            Step::Call("socket", &["2", "1", "0"]),
            Step::Set("$s = (int)$ret"),
            Step::Call("syscall", &["42", "$s", "$scratch + 512", "16"]),
            Step::Print("(int)$ret"),
            Step::Call("__errno_location", &[]),
            Step::Print("*(int*)$ret"),
        ],
    );
    assert_eq!(
        connect[connect.len().saturating_sub(2)..],
        ["-1".to_string(), ENETUNREACH.to_string()],
        "connect to the outside: {connect:?}"
    );
    // The bounding set is empty: CAP_SYS_ADMIN cannot come back through exec either.
    let caps = gdb_run(
        vm.device,
        &[
            Step::Call("prctl", &["23", "21", "0", "0", "0"]),
            Step::Print("(int)$ret"),
        ],
    );
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
    let _ = gdb_run(device, &[Step::Jump("socket", &["2", "1", "0"])]);
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
    let _ = gdb_run(
        device,
        &[
            Step::Call("malloc", &["120"]),
            Step::Jump("syscall", &["425", "8", "$ret"]),
        ],
    );
    let (code, stderr) = vm.end(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refused system call 425 (io_uring_setup)"),
        "{stderr}"
    );
}
