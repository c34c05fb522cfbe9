//! Boots the minimal Linux guest (scripts/build-guest-kernel) with the real `ringvm` binary.
//!
//! The kernel command line and `--cpu-features` carry workarounds for CI's nested kvm_pvm
//! host (guest kernel code is emulated there; see guest/linux/README.md). They are test
//! set-up: ringvm's defaults assume nothing of them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The `ringvm` binary `cargo test --workspace` built beside this test (vmm's integration
/// tests make cargo build it), or $RINGVM_BIN.
fn ringvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGVM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("ringvm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p vmm, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// Builds (or finds cached) vmlinux and initrd.
fn guest_kernel() -> PathBuf {
    let out = Command::new(root().join("scripts/build-guest-kernel"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-guest-kernel");
    assert!(out.status.success(), "building the guest kernel failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Workarounds for the nested kvm_pvm host; harmless on hardware KVM.
const HOST_PARAMS: &str = "noxsave nofsgsbase clearcpuid=popcnt,smap,erms,fsrm rodata=off";
const HOST_CPU_FEATURES: &str = "-cx16,+xsaveerptr";

#[test]
fn linux_boots_to_userspace_over_pvh_with_two_vcpus_and_exits_0() {
    let dir = guest_kernel();
    let params = format!("{HOST_PARAMS} quiet panic=-1 reboot=k");
    let mut child = Command::new(ringvm_bin())
        .args(["run", "-m", "128", "-c", "2", "-i"])
        .arg(dir.join("initrd.cpio"))
        .args(["-p", &params, "--cpu-features", HOST_CPU_FEATURES])
        .arg(dir.join("vmlinux"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm");
    let start = Instant::now();
    let limit = Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("Linux did not finish booting within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("stderr");
    eprintln!("booted and exited in {:?}", start.elapsed());
    assert!(
        stdout.contains("ringvm-guest: userspace up, kernel 6.1"),
        "no userspace line; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("2 cpu(s)"),
        "SMP did not come up:\n{stdout}"
    );
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
}
