//! Builds the purpose-built test guest (guest/test) with its own script, guest/test/build.sh,
//! and hands its path to the tests as `RINGVM_TEST_GUEST`.
//!
//! Needs an x86-64 gcc (`cc`, or $RINGVM_GUEST_CC) and binutils; no Rust bare-metal target.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest
        .parent()
        .expect("tests/ is inside the workspace")
        .join("guest")
        .join("test");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("test-guest");

    println!("cargo:rerun-if-changed={}", guest_dir.display());
    println!("cargo:rerun-if-env-changed=RINGVM_GUEST_CC");
    println!("cargo:rerun-if-env-changed=RINGVM_GUEST_OBJDUMP");

    let script = guest_dir.join("build.sh");
    let output = Command::new("sh")
        .arg(&script)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}): {}\n{}{}\n\
             It needs an x86-64 gcc (set RINGVM_GUEST_CC to pick one) and binutils.",
            output.status,
            script.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    // gcc warnings are not fatal, but should not go unseen.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.contains("warning:") {
            println!("cargo:warning=test guest: {line}");
        }
    }
    let elf = out.join("ringvm-test-guest.elf");
    assert!(elf.is_file(), "{} was not produced", elf.display());
    println!("cargo:rustc-env=RINGVM_TEST_GUEST={}", elf.display());
}
