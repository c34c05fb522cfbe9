//! Corrupt and unsupported qcow2 images: the exact error, never a panic.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use block::{Disk, Error, OpenOptions};
use common::*;

const CS: u64 = 65536;
const COPIED: u64 = 1 << 63;

/// A 8 MiB image with 64 KiB clusters and data in its first cluster: header at 0, refcount
/// table, refcount block, L1 table, then the L2 table and the data cluster.
struct Image {
    _dir: TempDir,
    path: PathBuf,
}

impl Image {
    fn new(name: &str) -> Image {
        let dir = TempDir::new(name);
        let path = dir.path("disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&path), "8M"]);
        run("qemu-io", &["-c", "write -P 0x5a 0 64k", s(&path)]);
        Image { _dir: dir, path }
    }

    fn file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .expect("open image")
    }

    fn u64_at(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.file().read_exact_at(&mut b, at).expect("read");
        u64::from_be_bytes(b)
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        self.file().write_all_at(bytes, at).expect("write");
    }

    fn put_u64(&self, at: u64, v: u64) {
        self.put(at, &v.to_be_bytes());
    }

    fn put_u32(&self, at: u64, v: u32) {
        self.put(at, &v.to_be_bytes());
    }

    fn l1_offset(&self) -> u64 {
        self.u64_at(40)
    }

    fn reftable_offset(&self) -> u64 {
        self.u64_at(48)
    }

    fn l2_offset(&self) -> u64 {
        self.u64_at(self.l1_offset()) & !COPIED
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).expect("stat").len()
    }

    fn open(&self) -> block::Result<Disk> {
        Disk::open(&self.path, rw())
    }
}

fn what(r: block::Result<impl Sized>) -> &'static str {
    match r {
        Err(Error::Corrupt { what, .. }) => what,
        Err(e) => panic!("expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("expected Error::Corrupt, got Ok"),
    }
}

fn header_error(edit: impl Fn(&Image)) -> Error {
    let img = Image::new("hdr");
    edit(&img);
    img.open().expect_err("open must fail")
}

#[test]
fn pristine_image_reads_its_data() {
    let img = Image::new("pristine");
    let vm = Vm::new();
    let disk = img.open().expect("open");
    assert!(vm
        .read(&disk, 0, 65536)
        .expect("read")
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn header_fields_out_of_range_fail_open() {
    assert!(matches!(
        header_error(|i| i.put_u32(4, 1)),
        Error::UnsupportedVersion(1)
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(20, 8)),
        Error::InvalidClusterBits(8)
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(20, 40)),
        Error::InvalidClusterBits(40)
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(32, 2)),
        Error::Encrypted(2)
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(96, 9)),
        Error::UnsupportedRefcountOrder(9)
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(72, 1 << 4)),
        Error::ExtendedL2
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(72, 1 << 2)),
        Error::ExternalDataFile
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(72, 1 << 20)),
        Error::UnknownFeatures(_)
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(40, 1 << 40)),
        Error::InvalidHeader("l1 table beyond the end of the file")
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(40, i.l1_offset() + 512)),
        Error::InvalidHeader("l1 table offset unaligned")
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(40, 0)),
        Error::InvalidHeader("l1 table overlaps the header")
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(40, i.reftable_offset())),
        Error::InvalidHeader("l1 table overlaps the refcount table")
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(36, u32::MAX)),
        Error::InvalidHeader("l1 table too large")
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(36, 0)),
        Error::InvalidHeader("l1 table too small for the virtual size")
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(24, u64::MAX)),
        Error::InvalidHeader("virtual size too large")
    ));
    assert!(matches!(
        header_error(|i| i.put_u64(48, 1 << 50)),
        Error::InvalidHeader("refcount table beyond the end of the file")
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(56, u32::MAX)),
        Error::InvalidHeader("refcount table too large")
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(56, 0)),
        Error::InvalidHeader("empty refcount table")
    ));
    assert!(matches!(
        header_error(|i| i.put_u32(100, 100_000)),
        Error::InvalidHeader("header length beyond the first cluster")
    ));
    assert!(matches!(
        header_error(|i| {
            i.put_u64(8, 65000);
            i.put_u32(16, 1000);
        }),
        Error::InvalidHeader("backing file name outside the first cluster")
    ));
    assert!(matches!(
        header_error(|i| {
            // A header extension whose length runs past the first cluster.
            let at = i.u64_at(96) & 0xffff_ffff; // header_length
            i.put_u32(at, 0x1234_5678);
            i.put_u32(at + 4, 0x7fff_0000);
        }),
        Error::InvalidHeader("header extension beyond its area")
    ));
}

#[test]
fn truncated_image_fails_open() {
    let img = Image::new("truncated");
    img.file().set_len(100).expect("truncate");
    assert!(matches!(img.open(), Err(Error::InvalidHeader(_))));
}

#[test]
fn l1_entry_beyond_the_file_or_unaligned_fails_the_request() {
    let vm = Vm::new();
    let img = Image::new("l1-eof");
    img.put_u64(img.l1_offset(), COPIED | (1 << 40));
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.read(&disk, 0, 512)),
        "l2 table outside the file or overlapping metadata"
    );
    assert_eq!(
        what(vm.write(&disk, 0, &[1; 512])),
        "l2 table outside the file or overlapping metadata"
    );

    let img = Image::new("l1-unaligned");
    img.put_u64(img.l1_offset(), COPIED | (img.l2_offset() + 512));
    let disk = img.open().expect("open");
    assert_eq!(what(vm.read(&disk, 0, 512)), "l2 table offset unaligned");

    let img = Image::new("l1-reserved");
    img.put_u64(img.l1_offset(), img.u64_at(img.l1_offset()) | 1 << 60);
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.read(&disk, 0, 512)),
        "reserved bits set in l1 entry"
    );

    let img = Image::new("l1-at-reftable");
    img.put_u64(img.l1_offset(), COPIED | img.reftable_offset());
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.read(&disk, 0, 512)),
        "l2 table outside the file or overlapping metadata"
    );
}

#[test]
fn l2_entry_into_metadata_or_beyond_the_file_fails_the_request() {
    let vm = Vm::new();
    let data_err = "data cluster outside the file or overlapping metadata";
    type Entry = fn(&Image) -> u64;
    let cases: [(&str, Entry, &str); 7] = [
        ("l2-self", |i: &Image| COPIED | i.l2_offset(), data_err),
        ("l2-l1", |i: &Image| COPIED | i.l1_offset(), data_err),
        (
            "l2-reftable",
            |i: &Image| COPIED | i.reftable_offset(),
            data_err,
        ),
        (
            "l2-eof",
            |i: &Image| COPIED | (i.len().div_ceil(CS) * CS + (1 << 30)),
            data_err,
        ),
        (
            "l2-unaligned",
            |i: &Image| COPIED | (i.l2_offset() + 1024),
            "l2 entry offset unaligned",
        ),
        (
            "l2-header",
            |_: &Image| COPIED,
            "copied flag on an unallocated l2 entry",
        ),
        (
            "l2-reserved",
            |i: &Image| COPIED | i.l2_offset() | 1 << 58,
            "reserved bits set in l2 entry",
        ),
    ];
    for (name, entry, want) in cases {
        let img = Image::new(name);
        let e = entry(&img);
        img.put_u64(img.l2_offset(), e);
        let disk = img.open().expect("open");
        assert_eq!(what(vm.read(&disk, 0, 512)), want, "{name} read");
        assert_eq!(what(vm.write(&disk, 0, &[1; 512])), want, "{name} write");
        assert_eq!(
            what(vm.ex.run_until(disk.write_zeroes(0, CS, true))),
            want,
            "{name} write_zeroes"
        );
        // The rest of the disk still works.
        assert!(vm.read(&disk, CS, 512).is_ok());
    }
}

#[test]
fn refcount_block_beyond_the_file_fails_allocation() {
    let vm = Vm::new();
    let img = Image::new("rb-eof");
    img.put_u64(img.reftable_offset(), 1 << 40);
    let disk = img.open().expect("open");
    assert!(vm.read(&disk, 0, 512).is_ok(), "reads need no refcounts");
    assert_eq!(
        what(vm.write(&disk, 4 * CS, &[1; 512])),
        "refcount block outside the file or overlapping metadata"
    );

    let img = Image::new("rb-unaligned");
    img.put_u64(img.reftable_offset(), img.u64_at(img.reftable_offset()) + 8);
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.write(&disk, 4 * CS, &[1; 512])),
        "refcount block offset unaligned"
    );

    let img = Image::new("rb-l2");
    img.put_u64(img.reftable_offset(), img.l2_offset());
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.write(&disk, 4 * CS, &[1; 512])),
        "refcount block outside the file or overlapping metadata"
    );

    let img = Image::new("rb-header");
    img.put_u64(img.reftable_offset(), img.l1_offset());
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.write(&disk, 4 * CS, &[1; 512])),
        "refcount block outside the file or overlapping metadata"
    );
}

#[test]
fn corrupt_and_dirty_bits_allow_read_only_opens_only() {
    let img = Image::new("corrupt-bit");
    img.put_u64(72, 1 << 1);
    assert!(matches!(img.open(), Err(Error::MarkedCorrupt)));
    assert!(Disk::open(&img.path, ro()).is_ok());
    let img = Image::new("dirty-bit");
    img.put_u64(72, 1 << 0);
    assert!(matches!(img.open(), Err(Error::Dirty)));
    assert!(Disk::open(&img.path, ro()).is_ok());
}

#[test]
fn internal_snapshots_allow_read_only_opens_only() {
    let img = Image::new("snapshots");
    qemu_img(&["snapshot", "-c", "snap1", s(&img.path)]);
    assert!(matches!(img.open(), Err(Error::InternalSnapshots)));
    let vm = Vm::new();
    let disk = Disk::open(&img.path, ro()).expect("open ro");
    assert!(vm
        .read(&disk, 0, 65536)
        .expect("read")
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn undecodable_or_zstd_compressed_clusters_fail_the_request() {
    let dir = TempDir::new("compressed");
    let raw = dir.path("src.raw");
    let text: Vec<u8> = (0..1 << 20).map(|i| b"qcow2 "[i % 6]).collect();
    std::fs::write(&raw, &text).expect("raw");
    let vm = Vm::new();

    let zstd = dir.path("zstd.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&raw),
        s(&zstd),
    ]);
    let disk = Disk::open(&zstd, rw()).expect("open");
    assert!(matches!(
        vm.read(&disk, 100, 512),
        Err(Error::Compressed(_))
    ));
    assert!(matches!(
        vm.write(&disk, 100, &[1; 512]),
        Err(Error::Compressed(_))
    ));

    let img = Image {
        path: dir.path("deflate.qcow2"),
        _dir: TempDir::new("unused"),
    };
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&img.path)]);
    // Garbage in the first compressed cluster's data.
    let l2 = img.l2_offset();
    let entry = img.u64_at(l2);
    assert!(entry & (1 << 62) != 0, "compressed");
    let data_at = entry & ((1 << 54) - 1);
    img.put(data_at, &[0xff; 64]);
    let disk = img.open().expect("open");
    assert_eq!(
        what(vm.read(&disk, 0, 512)),
        "compressed cluster does not decompress"
    );
    assert_eq!(
        what(vm.write(&disk, 0, &[1; 512])),
        "compressed cluster does not decompress"
    );
    assert!(vm.read(&disk, CS, 512).expect("next cluster") == text[CS as usize..CS as usize + 512]);
}

#[test]
fn backing_loops_and_missing_backing_files_fail_open() {
    let dir = TempDir::new("backing-loop");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    let c = dir.path("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    for overlay in [&b, &c] {
        let args = [
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
        ];
        let mut args = args.to_vec();
        args.extend([s(overlay), "1M"]);
        qemu_img(&args);
    }
    // a -> b -> a -> ...
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    assert!(matches!(
        Disk::open(&b, qcow2_rw()),
        Err(Error::BackingTooDeep)
    ));

    std::fs::remove_file(&a).expect("remove");
    match Disk::open(&c, qcow2_rw()) {
        Err(Error::Backing(p, e)) => {
            assert_eq!(p, dir.path("a.qcow2"));
            assert!(matches!(*e, Error::Open(..)));
        }
        other => panic!("expected Error::Backing, got {other:?}"),
    }
}

/// Flips random bits in the metadata of an image, `rounds` times, and drives each copy that
/// opens (`direct`: with O_DIRECT, requests in whole blocks): errors, never a panic.
fn corrupt_and_drive(direct: bool, rounds: usize) {
    let img = Image::new(if direct { "fuzz-direct" } else { "fuzz" });
    // Some more metadata to hit: a second L2 table and a zero cluster.
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 4M 128k",
            "-c",
            "write -z 64k 64k",
            s(&img.path),
        ],
    );
    let pristine = std::fs::read(&img.path).expect("read");
    let meta_end = (6 * CS) as usize;
    let vm = Vm::new();
    let mut rng = Rng(if direct { 0xd1ec } else { 0xfeed });
    let mut opened = 0;
    let options = OpenOptions {
        direct,
        ..OpenOptions::default()
    };
    for _ in 0..rounds {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(meta_end as u64) as usize;
            // Mostly flip bits in table entries and header fields.
            bytes[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&img.path, &bytes).expect("write");
        let Ok(disk) = Disk::open(&img.path, options.clone()) else {
            continue;
        };
        opened += 1;
        // Unaligned for buffered images, whole blocks for direct ones.
        let bs = u64::from(disk.block_size());
        let (at, len) = if direct {
            (4 * CS + bs, 17 * bs as usize)
        } else {
            (4 * CS + 100, 70_000)
        };
        let _ = vm.read(&disk, 0, 8 << 20);
        let _ = vm.write(&disk, at, &vec![7; len]);
        let _ = vm.ex.run_until(disk.write_zeroes(4 << 20, 3 * CS, true));
        let _ = vm.ex.run_until(disk.flush());
        let _ = vm.read(&disk, 0, 8 << 20);
    }
    assert!(opened > 0);
}

#[test]
fn random_metadata_corruption_never_panics() {
    corrupt_and_drive(false, 300);
}

#[test]
fn random_metadata_corruption_never_panics_with_o_direct() {
    corrupt_and_drive(true, 40);
}
