//! qcow2 with O_DIRECT: every operation done on a direct image and on a buffered twin must
//! leave the same bytes, and qemu-img must find the direct image's metadata clean.

mod common;

use std::path::{Path, PathBuf};

use block::{Disk, Error, Format, OpenOptions};
use common::*;
use memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn qcow2_opts(direct: bool) -> OpenOptions {
    OpenOptions {
        direct,
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    }
}

/// The alignment O_DIRECT needs in the test directory (what a direct disk reports).
fn block_size(dir: &TempDir) -> u64 {
    let probe = dir.path("probe.raw");
    std::fs::write(&probe, vec![0u8; 1 << 16]).expect("probe file");
    let disk = Disk::open(
        &probe,
        OpenOptions {
            direct: true,
            ..OpenOptions::default()
        },
    )
    .expect("O_DIRECT open (the test directory's file system must support O_DIRECT)");
    let bs = u64::from(disk.block_size());
    drop(disk);
    std::fs::remove_file(&probe).expect("remove probe");
    assert!(bs >= 512 && bs.is_power_of_two());
    bs
}

/// Guest buffers for `len` bytes at `BUF`: one aligned range, or three ranges at odd
/// addresses with odd lengths (which O_DIRECT cannot take: they are bounced).
fn guest_bufs(len: usize, aligned: bool) -> Vec<(GuestAddress, usize)> {
    if aligned || len < 3 {
        return vec![(GuestAddress(BUF), len)];
    }
    let a = len / 3 + 1;
    let b = len / 5 + 3;
    let second = BUF + (a as u64 + 1).next_multiple_of(4096) + 4096 + 7;
    let third = second + (b as u64).next_multiple_of(4096) + 4096 + 3;
    vec![
        (GuestAddress(BUF + 1), a),
        (GuestAddress(second), b),
        (GuestAddress(third), len - a - b),
    ]
}

fn write(vm: &Vm, disk: &Disk, offset: u64, data: &[u8], aligned: bool) -> block::Result<()> {
    let bufs = guest_bufs(data.len(), aligned);
    let mut done = 0;
    for &(a, n) in &bufs {
        vm.mem.write_slice(&data[done..done + n], a).expect("fill");
        done += n;
    }
    vm.ex.run_until(disk.write(offset, &bufs, &vm.mem))
}

fn read(vm: &Vm, disk: &Disk, offset: u64, len: usize, aligned: bool) -> block::Result<Vec<u8>> {
    let bufs = guest_bufs(len, aligned);
    for &(a, n) in &bufs {
        vm.mem.fill(a, n, 0x5a).expect("poison");
    }
    vm.ex.run_until(disk.read(offset, &bufs, &vm.mem))?;
    let mut out = vec![0u8; len];
    let mut done = 0;
    for &(a, n) in &bufs {
        vm.mem
            .read_slice(&mut out[done..done + n], a)
            .expect("read back");
        done += n;
    }
    Ok(out)
}

/// One request of a sequence.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Offset, length, aligned guest buffers.
    Write(u64, u64, bool),
    /// Offset, length, unmap.
    Zeroes(u64, u64, bool),
}

/// Requests in units of the block size `bs` (the size O_DIRECT requests are made of):
/// allocating whole-cluster and partial-cluster writes, cluster-spanning ones, rewrites in
/// place, write-zeroes and discards, from aligned and unaligned guest buffers.
fn ops(bs: u64, size: u64) -> Vec<Op> {
    vec![
        Op::Write(0, 64 * 1024, true),
        Op::Write(3 * bs, bs, false),
        Op::Write(64 * 1024 - bs, 2 * bs, true),
        Op::Write(MIB + bs, 5 * bs, false),
        Op::Write(3 * MIB, 300 * bs, false),
        Op::Write(3 * MIB + 7 * bs, 3 * bs, true),
        Op::Write(size - bs, bs, false),
        Op::Write(size / 2 + bs, 2 * MIB, true),
        Op::Zeroes(3 * MIB + 64 * 1024, 128 * 1024, false),
        Op::Zeroes(bs, bs, false),
        Op::Zeroes(size / 2, MIB, true),
        Op::Write(size / 2 + 64 * 1024, bs, false),
        Op::Zeroes(5 * MIB, 64 * 1024, false),
    ]
}

/// Runs `ops` on `disk` and on `model` (what the disk must read as afterwards).
fn apply(vm: &Vm, disk: &Disk, ops: &[Op], model: &mut [u8], seed: u64) {
    let mut rng = Rng(seed);
    for &op in ops {
        match op {
            Op::Write(off, len, aligned) => {
                let data = rng.bytes(len as usize);
                write(vm, disk, off, &data, aligned).unwrap_or_else(|e| panic!("{op:?}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zeroes(off, len, unmap) => {
                vm.ex
                    .run_until(disk.write_zeroes(off, len, unmap))
                    .unwrap_or_else(|e| panic!("{op:?}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
}

/// Two copies of `img`: (buffered, direct).
fn twins(img: &Path) -> (PathBuf, PathBuf) {
    let direct = img.with_extension("direct.qcow2");
    std::fs::copy(img, &direct).expect("copy image");
    (img.to_owned(), direct)
}

/// Runs the request sequence on a buffered and a direct copy of `img` (whose guest-visible
/// bytes are `model`): both read the same before and after a flush, and after reopening; both
/// pass `qemu-img check`, and qemu-img reads the same bytes from both.
fn same_as_buffered(img: &Path, model: Vec<u8>, bs: u64, extra: &[Op]) {
    let (buffered, direct) = twins(img);
    let vm = Vm::new();
    let size = model.len() as u64;
    let mut list = ops(bs, size);
    list.extend_from_slice(extra);
    let mut results = Vec::new();
    for (path, is_direct) in [(&buffered, false), (&direct, true)] {
        let mut m = model.clone();
        let disk = Disk::open(path, qcow2_opts(is_direct)).expect("open");
        assert_eq!(disk.block_size() as u64, if is_direct { bs } else { 512 });
        // Every cluster read before any write: unallocated ones come from the backing file
        // (or read zeros), the rest from the image.
        assert!(read(&vm, &disk, 0, size as usize, true).expect("read") == m);
        apply(&vm, &disk, &list, &mut m, 42);
        for aligned in [true, false] {
            let got = read(&vm, &disk, 0, size as usize, aligned).expect("read");
            assert!(got == m, "direct={is_direct}: bytes differ from the model");
        }
        vm.flush(&disk);
        drop(disk);
        let disk = Disk::open(path, qcow2_opts(is_direct)).expect("reopen");
        assert!(read(&vm, &disk, 0, size as usize, false).expect("read") == m);
        drop(disk);
        assert_check_clean(path);
        results.push(qemu_contents(path));
        assert!(results.last() == Some(&m), "qemu-img reads other bytes");
    }
    assert!(results[0] == results[1]);
}

/// A new image of `mib` MiB made with `qemu-img create -o OPTS` (`opts` gets the block size)
/// through [`same_as_buffered`] (16 MiB and more: with 9 MiB more written); returns the first
/// 512 bytes of the direct copy (its header).
fn new_image_same_as_buffered(name: &str, opts: impl Fn(u64) -> String, mib: usize) -> Vec<u8> {
    let dir = TempDir::new(name);
    let bs = block_size(&dir);
    let img = dir.path("disk.qcow2");
    let size = format!("{mib}M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts(bs),
        s(&img),
        &size,
    ]);
    // More than 8 MiB of new clusters when there is room (see the small-cluster test).
    let extra = if mib >= 16 {
        vec![Op::Write(6 * MIB, 9 * MIB, false)]
    } else {
        Vec::new()
    };
    same_as_buffered(&img, vec![0u8; mib << 20], bs, &extra);
    let header = std::fs::read(img.with_extension("direct.qcow2")).expect("read");
    header[..512].to_vec()
}

#[test]
fn direct_qcow2_v3_does_what_buffered_does() {
    new_image_same_as_buffered("direct-v3", |_| "compat=1.1".into(), 8);
}

#[test]
fn direct_qcow2_v2_does_what_buffered_does() {
    new_image_same_as_buffered("direct-v2", |_| "compat=0.10".into(), 8);
}

#[test]
fn direct_qcow2_with_block_sized_clusters_grows_its_refcount_table() {
    // Clusters as small as O_DIRECT allows: with 512 bytes the 16 MiB of data outgrow the
    // first refcount table cluster (8 MiB), which moves, rewriting the header's pointer to it.
    let header = new_image_same_as_buffered("direct-small", |bs| format!("cluster_size={bs}"), 16);
    let cluster_bits = u32::from_be_bytes(header[20..24].try_into().expect("4 bytes"));
    if cluster_bits == 9 {
        let clusters = u32::from_be_bytes(header[56..60].try_into().expect("4 bytes"));
        assert!(
            clusters > 1,
            "the refcount table grew ({clusters} clusters)"
        );
    }
}

#[test]
fn direct_qcow2_over_backing_files_copies_on_write_as_buffered_does() {
    let dir = TempDir::new("direct-backing");
    let bs = block_size(&dir);
    let (base, base_data, top, model) = backing_chain(&dir, &mut Rng(9), 65536);
    same_as_buffered(&top, model, bs, &[]);
    assert!(
        std::fs::read(&base).expect("base") == base_data,
        "base untouched"
    );
}

#[test]
fn direct_qcow2_reads_and_rewrites_compressed_clusters() {
    let dir = TempDir::new("direct-compressed");
    let bs = block_size(&dir);
    let raw = dir.path("src.raw");
    // Compressible data: runs of a byte, different per 4 KiB.
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i / 4096 % 251) as u8).collect();
    std::fs::write(&raw, &data).expect("write raw");
    let img = dir.path("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&img)]);
    same_as_buffered(&img, data, bs, &[]);
}

#[test]
fn direct_qcow2_refuses_unaligned_requests_and_too_small_clusters() {
    let dir = TempDir::new("direct-refuse");
    let bs = block_size(&dir);
    let img = dir.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let vm = Vm::new();
    let disk = Disk::open(&img, qcow2_opts(true)).expect("open");
    assert!(matches!(
        read(&vm, &disk, 1, bs as usize, true),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        write(&vm, &disk, bs, &vec![1u8; bs as usize + 1], true),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        vm.ex.run_until(disk.write_zeroes(bs / 2, bs, false)),
        Err(Error::Unaligned { .. })
    ));
    drop(disk);
    assert_check_clean(&img);
    let small = dir.path("small.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&small),
        "1M",
    ]);
    let opened = Disk::open(&small, qcow2_opts(true));
    if bs > 512 {
        assert!(matches!(
            opened,
            Err(Error::DirectClusterSize {
                cluster_size: 512,
                ..
            })
        ));
    } else {
        assert!(opened.is_ok());
    }
}

#[test]
fn direct_qcow2_with_metadata_write_through_keeps_completed_writes_without_a_flush() {
    let dir = TempDir::new("direct-wt");
    let bs = block_size(&dir);
    let img = dir.path("wt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let vm = Vm::new();
    let mut model = vec![0u8; 8 << 20];
    {
        let mut disk = Disk::open(&img, qcow2_opts(true)).expect("open");
        disk.set_metadata_write_through(true);
        let list: Vec<Op> = ops(bs, 8 << 20)
            .into_iter()
            .filter(|op| matches!(op, Op::Write(..)))
            .collect();
        apply(&vm, &disk, &list, &mut model, 7);
        // Dropped without a flush, as a killed process would leave it.
    }
    assert_check_clean(&img);
    assert!(qemu_contents(&img) == model, "a completed write was lost");
}
