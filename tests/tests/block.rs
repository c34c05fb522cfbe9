//! virtio-blk through the real binary: `ringvm run --rwdisk/-d` with raw and qcow2 images,
//! driven by the test guest's virtio-blk driver (guest/test/virtio_blk.c), checked from the
//! host afterwards (the file itself, `qemu-img check`, `qemu-img convert`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{ringvm_bin, ringvm_run, run_guest, test_guest_path, GuestCmdline, GuestRun, Scratch};

const LIMIT: Duration = Duration::from_secs(60);
const SECTORS: u64 = 16384;

fn raw_image(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(SECTORS * 512))
        .expect("create raw image");
}

fn run(args: &[&str], cmdline: &GuestCmdline) -> GuestRun {
    let run = run_guest(&mut ringvm_run(args, cmdline), LIMIT).expect("run ringvm");
    run.assert_clean();
    run
}

/// Checks that `sector` (512 bytes of a disk) holds what the guest's pattern writes there:
/// word i is (sector << 32 | i) ^ nonce, the nonce recovered from word 0.
fn assert_guest_pattern(bytes: &[u8], sector: u64) {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let nonce = word(0) ^ (sector << 32);
    for i in 0..64 {
        assert_eq!(
            word(i),
            (sector << 32 | i as u64) ^ nonce,
            "word {i} of sector {sector} is not what the guest wrote"
        );
    }
}

fn last_sector(path: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, (SECTORS - 1) * 512))
        .expect("read the last sector");
    buf
}

#[test]
fn guest_writes_reads_flushes_discards_a_raw_disk() {
    let dir = Scratch::new("block", "raw");
    let img = dir.path("disk.img");
    raw_image(&img);
    let disk = format!("{},id=ringvm-test", img.display());
    let cmdline = GuestCmdline::new()
        .test("pci")
        .test("virtio-blk")
        .option("blk.id", "ringvm-test")
        .option("blk.expect", "rw");
    let run = run(&["--rwdisk", &disk], &cmdline);
    let report = run.report();
    report.assert_ok(&["pci", "virtio-blk"]);
    let details = report.details("virtio-blk");
    for needle in [
        &format!("capacity={SECTORS}") as &str,
        "flush ok",
        "write-zeroes",
        "discard",
    ] {
        assert!(
            details.iter().any(|l| l.contains(needle)),
            "{needle:?} missing: {details:?}"
        );
    }
    assert!(
        report
            .details("pci")
            .iter()
            .any(|l| l.contains("1af4:1042")),
        "{:?}",
        report.details("pci")
    );
    assert_guest_pattern(&last_sector(&img), SECTORS - 1);
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    let dir = Scratch::new("block", "ro");
    let img = dir.path("disk.img");
    raw_image(&img);
    std::fs::write(&img, vec![0x5a; (SECTORS * 512) as usize]).expect("fill image");
    let before = std::fs::read(&img).expect("read image");
    let cmdline = GuestCmdline::new()
        .test("virtio-blk")
        .option("blk.expect", "ro");
    let img_arg = img.to_string_lossy().into_owned();
    let run = run(&["-d", &img_arg], &cmdline);
    let report = run.report();
    report.assert_ok(&["virtio-blk"]);
    assert!(
        report
            .details("virtio-blk")
            .iter()
            .any(|l| l.contains("read-only ok")),
        "{:?}",
        report.details("virtio-blk")
    );
    assert!(
        std::fs::read(&img).expect("read image") == before,
        "a read-only disk changed"
    );
}

#[test]
fn guest_writes_to_a_qcow2_image_that_qemu_img_then_checks_and_converts() {
    let dir = Scratch::new("block", "qcow2");
    let img = dir.path("disk.qcow2");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg((SECTORS * 512).to_string())
        .status()
        .expect("qemu-img (apt package qemu-utils)");
    assert!(created.success());
    let cmdline = GuestCmdline::new().test("virtio-blk");
    let img_arg = img.to_string_lossy().into_owned();
    let run = run(&["--rwdisk", &img_arg, "--no-rng"], &cmdline);
    run.report().assert_ok(&["virtio-blk"]);

    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&img)
        .output()
        .expect("qemu-img check");
    assert!(
        check.status.success(),
        "qemu-img check failed: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = dir.path("converted.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&raw)
        .status()
        .expect("qemu-img convert");
    assert!(convert.success());
    assert_guest_pattern(&last_sector(&raw), SECTORS - 1);
}

#[test]
fn bad_disk_arguments_are_refused_before_the_vm_starts() {
    let dir = Scratch::new("block", "bad");
    let missing = dir.path("missing.img");
    let corrupt = dir.path("corrupt.qcow2");
    // A qcow2 magic with nothing valid after it.
    std::fs::write(&corrupt, b"QFI\xfb\0\0\0\x03garbage").expect("write corrupt image");
    for (arg, path, needle) in [
        ("--rwdisk", &missing, "missing.img"),
        ("--rwdisk", &corrupt, "corrupt.qcow2"),
    ] {
        let out = Command::new(ringvm_bin())
            .args(["run", arg])
            .arg(path)
            .arg(test_guest_path())
            .output()
            .expect("run ringvm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("block0") && err.contains(needle), "{err}");
    }
    let out = Command::new(ringvm_bin())
        .args(["run", "--rwdisk", "x.img,cache=none"])
        .arg(test_guest_path())
        .output()
        .expect("run ringvm");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
}

#[test]
fn polling_guest_without_interrupts_works_with_the_sandbox_on() {
    // No MSI-X vector for the queue: the device gets no call fd and makes its own stand-in
    // eventfd after the jail (its seccomp policy allows eventfd2 for that).
    let dir = Scratch::new("block", "poll");
    let img = dir.path("disk.img");
    raw_image(&img);
    let cmdline = GuestCmdline::new()
        .test("virtio-blk")
        .option("blk.mode", "poll");
    let img_arg = img.to_string_lossy().into_owned();
    let run = run(&["--rwdisk", &img_arg, "--no-rng"], &cmdline);
    run.report().assert_ok(&["virtio-blk"]);
    assert_eq!(run.report().value("virtio-blk", "interrupts"), Some("0"));
}
