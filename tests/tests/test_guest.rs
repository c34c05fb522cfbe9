//! The purpose-built test guest (guest/test) booted by the real `ringvm` binary: serial
//! output, scenario selection from the command line, CPUID, e820, RTC, SMP start-up, CPL3
//! compute, and the exit through the i8042.

use std::process::Command;
use std::time::Duration;

use tests::{ringvm_bin, run_guest, test_guest_path, GuestCmdline, GuestRun, Outcome, SCENARIOS};

const LIMIT: Duration = Duration::from_secs(120);

fn boot(mem_mib: u64, cpus: u32, cmdline: &GuestCmdline, extra: &[&str]) -> GuestRun {
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "-m", &mem_mib.to_string(), "-c", &cpus.to_string()])
        .args(extra)
        .args(["-p", &cmdline.to_string()])
        .arg(test_guest_path());
    run_guest(&mut cmd, LIMIT).expect("run ringvm")
}

#[test]
fn every_scenario_passes_with_two_vcpus() {
    let cmdline = GuestCmdline::new()
        .test("all")
        .expect_cpus(2)
        .expect_mem_mib(128)
        .expect_hypervisor("KVMKVMKVM");
    let run = boot(128, 2, &cmdline, &[]);
    let report = run.report();
    report.assert_ok(SCENARIOS);
    assert!(report.done, "no done line:\n{}", run.stdout);
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
    assert_eq!(report.smp_cpus(), Some((2, 2)));
}

#[test]
fn four_vcpus_and_default_memory() {
    let cmdline = GuestCmdline::new()
        .test("smp")
        .test("e820")
        .expect_cpus(4)
        .expect_mem_mib(256);
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "-c", "4", "-p", &cmdline.to_string()])
        .arg(test_guest_path());
    let run = run_guest(&mut cmd, LIMIT).expect("run ringvm");
    let report = run.report();
    report.assert_ok(&["smp", "e820"]);
    assert_eq!(report.smp_cpus(), Some((4, 4)));
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
}

#[test]
fn memory_above_the_mmio_hole_is_in_the_e820_map() {
    // 3.5 GiB: 3 GiB below the hole, 512 MiB above 4 GiB. Untouched memory costs nothing.
    let cmdline = GuestCmdline::new().test("e820").expect_mem_mib(3584);
    let run = boot(3584, 1, &cmdline, &[]);
    let report = run.report();
    report.assert_ok(&["e820"]);
    assert!(
        run.stdout
            .contains("0x0000000100000000-0x000000011fffffff ram"),
        "{}",
        run.stdout
    );
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
}

#[test]
fn cpu_features_option_hides_and_shows_cpuid_bits() {
    let cmdline = GuestCmdline::new().test("cpuid");
    let plain = boot(64, 1, &cmdline, &[]).report();
    let hidden = boot(64, 1, &cmdline, &["--cpu-features", "-x2apic,-cx16"]).report();
    plain.assert_ok(&["cpuid"]);
    hidden.assert_ok(&["cpuid"]);
    assert_eq!(hidden.value("cpuid", "x2apic"), Some("0"));
    assert_eq!(hidden.value("cpuid", "cx16"), Some("0"));
    // ringvm always sets the hypervisor bit.
    assert_eq!(plain.value("cpuid", "hypervisor"), Some("1"));
}

#[test]
fn a_guest_exception_is_reported_and_the_vm_still_ends_cleanly() {
    let cmdline = GuestCmdline::new().test("hello").test("ud2");
    let run = boot(64, 1, &cmdline, &[]);
    let report = run.report();
    assert!(
        matches!(report.outcome("hello"), Some(Outcome::Ok)),
        "{}",
        run.stdout
    );
    assert!(matches!(report.outcome("ud2"), Some(Outcome::Fail(_))));
    let exception = report.exception.as_deref().unwrap_or_default();
    assert!(exception.starts_with("6 (#UD)"), "{}", run.stdout);
    assert!(!report.done);
    assert!(
        run.exited_cleanly(),
        "status {:?}: {}",
        run.status,
        run.stderr
    );
}
