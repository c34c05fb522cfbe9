//! Formats given or probed, and where backing files may come from.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use block::{Disk, Error, Format, OpenOptions};
use common::*;

fn with_format(format: Format) -> OpenOptions {
    OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    }
}

/// A qcow2 overlay at `img` whose backing file is `backing`, in `backing_format` (or none).
fn overlay(img: &Path, backing: &str, backing_format: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-u", "-b", backing];
    if let Some(f) = backing_format {
        args.extend(["-F", f]);
    }
    args.extend([s(img), "1M"]);
    qemu_img(&args);
}

/// Turns the backing-format header extension of a qcow2 image into one readers ignore (qemu-img
/// no longer makes images without it).
fn forget_backing_format(img: &Path) {
    let mut bytes = std::fs::read(img).expect("read image");
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&0x0bad_0badu32.to_be_bytes());
    std::fs::write(img, bytes).expect("write image");
}

fn backing_error(r: block::Result<Disk>) -> Error {
    match r {
        Err(Error::Backing(_, e)) => *e,
        other => panic!("expected Error::Backing, got {other:?}"),
    }
}

#[test]
fn format_names_parse_and_print() {
    for f in [Format::Raw, Format::Qcow2] {
        assert_eq!(f.name().parse::<Format>().expect("parse"), f);
        assert_eq!(f.to_string(), f.name());
    }
    assert!(matches!(
        "vmdk".parse::<Format>(),
        Err(Error::UnknownFormat(s)) if s == "vmdk"
    ));
}

#[test]
fn a_probed_qcow2_image_never_opens_its_backing_file() {
    let dir = TempDir::new("probed-backing");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![0x5au8; 1 << 20]).expect("base");
    let img = dir.path("top.qcow2");
    overlay(&img, "base.raw", Some("raw"));
    match Disk::open(&img, rw()) {
        Err(Error::ProbedBacking(name)) => assert_eq!(name, Path::new("base.raw")),
        other => panic!("expected Error::ProbedBacking, got {other:?}"),
    }
    assert!(matches!(
        Disk::open(&img, ro()),
        Err(Error::ProbedBacking(_))
    ));
    // Given as qcow2, the chain opens and reads through to the backing file.
    let vm = Vm::new();
    let disk = Disk::open(&img, with_format(Format::Qcow2)).expect("qcow2");
    assert_eq!(vm.read(&disk, 4096, 16).expect("read"), [0x5a; 16]);
    // Given as raw, the image is its own bytes: the guest sees the qcow2 header.
    let disk = Disk::open(&img, with_format(Format::Raw)).expect("raw");
    assert!(matches!(disk, Disk::Raw(_)));
    assert_eq!(&vm.read(&disk, 0, 4).expect("read")[..], b"QFI\xfb");
    // A qcow2 image with no backing file still opens probed.
    let plain = dir.path("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]);
    assert!(matches!(Disk::open(&plain, rw()), Ok(Disk::Qcow2(_))));
}

#[test]
fn a_backing_file_whose_format_is_not_recorded_is_probed_under_the_same_rule() {
    let dir = TempDir::new("probed-chain");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).expect("base");
    let mid = dir.path("mid.qcow2");
    overlay(&mid, "base.raw", Some("raw"));
    let top = dir.path("top.qcow2");
    // No backing format recorded: mid is probed (qcow2), and it names a backing file.
    overlay(&top, "mid.qcow2", Some("qcow2"));
    forget_backing_format(&top);
    let e = backing_error(Disk::open(&top, with_format(Format::Qcow2)));
    assert!(matches!(e, Error::ProbedBacking(_)), "{e:?}");
    // Recorded: the chain opens.
    qemu_img(&["rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", s(&top)]);
    let vm = Vm::new();
    let disk = Disk::open(&top, with_format(Format::Qcow2)).expect("chain");
    assert_eq!(vm.read(&disk, 0, 4).expect("read"), [1; 4]);
}

#[test]
fn a_backing_file_outside_the_allowed_directories_is_refused() {
    let dir = TempDir::new("outside");
    let elsewhere = TempDir::new("outside-base");
    let base = elsewhere.path("base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).expect("base");
    std::fs::create_dir(dir.path("sub")).expect("sub");
    std::fs::write(dir.path("sub/inside.raw"), vec![8u8; 1 << 20]).expect("inside");
    symlink(&base, dir.path("link.raw")).expect("symlink");
    let top = dir.path("top.qcow2");
    let qcow2 = with_format(Format::Qcow2);
    let base_abs = s(&base).to_owned();
    let relative = format!(
        "../{}/base.raw",
        elsewhere
            .0
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
    );
    for name in [
        "/etc/hostname",
        base_abs.as_str(),
        relative.as_str(),
        "link.raw",
    ] {
        overlay(&top, name, Some("raw"));
        let e = backing_error(Disk::open(&top, qcow2.clone()));
        assert!(matches!(e, Error::BackingOutside(_)), "{name}: {e:?}");
    }
    // The image's own directory (subdirectories too) is allowed...
    overlay(&top, "sub/inside.raw", Some("raw"));
    let vm = Vm::new();
    let disk = Disk::open(&top, qcow2.clone()).expect("inside");
    assert_eq!(vm.read(&disk, 0, 2).expect("read"), [8, 8]);
    // ...and so are the directories given, symlinks resolved.
    overlay(&top, "link.raw", Some("raw"));
    let allowed = OpenOptions {
        backing_dirs: vec![elsewhere.0.clone()],
        ..qcow2.clone()
    };
    let disk = Disk::open(&top, allowed).expect("allowed directory");
    assert_eq!(vm.read(&disk, 0, 2).expect("read"), [7, 7]);
    let missing = OpenOptions {
        backing_dirs: vec![dir.path("no-such-dir")],
        ..qcow2
    };
    assert!(matches!(
        Disk::open(&top, missing),
        Err(Error::BackingDir(..))
    ));
}

#[test]
fn a_backing_file_that_is_not_a_file_is_refused_without_opening_it() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path("base.raw");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let top = dir.path("top.qcow2");
    overlay(&top, "base.raw", Some("raw"));
    // Opening a FIFO for reading would block the device until a writer came.
    let e = backing_error(Disk::open(&top, with_format(Format::Qcow2)));
    assert!(matches!(e, Error::BackingNotFile(_)), "{e:?}");
}

#[test]
fn a_raw_image_given_as_raw_takes_any_first_bytes() {
    let dir = TempDir::new("raw-given");
    let img = dir.path("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    let disk = Disk::open(&img, with_format(Format::Raw)).expect("open");
    let mut sector = vec![0u8; 512];
    sector[..4].copy_from_slice(b"QFI\xfb");
    vm.write(&disk, 0, &sector)
        .expect("a stated raw format takes the magic");
    drop(disk);
    assert!(matches!(
        Disk::open(&img, with_format(Format::Raw)).expect("reopen"),
        Disk::Raw(_)
    ));
}

#[test]
fn a_probed_raw_image_keeps_the_rest_of_a_first_sector_write() {
    let dir = TempDir::new("raw-head");
    let img = dir.path("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    // Crosses the first block: the head goes through the checked copy, the rest straight.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
    vm.write(&disk, 2, &data).expect("write");
    assert_eq!(vm.read(&disk, 2, data.len()).expect("read"), data);
    assert_eq!(vm.read(&disk, 0, 2).expect("read"), [0, 0]);
}
