//! Random reads, writes, discards and write-zeroes, many in flight at once, against an
//! in-memory reference; then everything compared, and qemu-img check on qcow2.

mod common;

use std::path::Path;

use block::Disk;
use common::*;
use futures::future::join_all;
use memory::GuestAddress;

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Discard,
    Zeroes { unmap: bool },
    Flush,
}

/// Runs `rounds` batches of up to 16 non-overlapping random requests, all in flight together,
/// mirroring them in `model`; flushes now and then. Returns the model.
fn soak(disk: &Disk, vm: &Vm, mut model: Vec<u8>, seed: u64, rounds: usize) -> Vec<u8> {
    let size = model.len() as u64;
    // BLOCK_SOAK_SEED=N varies every run's seed (to hunt for rare interleavings).
    let seed = std::env::var("BLOCK_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(seed, |v| seed ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let mut batch: Vec<(Op, u64, u64, u64)> = Vec::new(); // op, offset, len, guest addr
        let mut guest_at = BUF;
        for _ in 0..1 + rng.below(16) {
            // Mostly small, some cluster-crossing, a few large.
            let len = match rng.below(10) {
                0..=5 => 1 + rng.below(8192),
                6..=8 => 1 + rng.below(200_000),
                _ => 1 + rng.below(2 << 20),
            }
            .min(size);
            let mut off = rng.below(size - len + 1);
            if rng.below(3) == 0 {
                off &= !511;
            }
            let op = match rng.below(11) {
                0..=3 => Op::Write,
                4..=6 => Op::Read,
                7 => Op::Discard,
                8 => Op::Flush,
                _ => Op::Zeroes {
                    unmap: rng.below(2) == 0,
                },
            };
            if let Op::Flush = op {
                // In flight with the others: it orders nothing, so the model ignores it.
                batch.push((op, 0, 0, 0));
                continue;
            }
            if batch
                .iter()
                .any(|&(_, o, l, _)| off < o + l && o < off + len)
            {
                continue;
            }
            if let Op::Write = op {
                let data = rng.bytes(len as usize);
                vm.mem
                    .write_slice(&data, GuestAddress(guest_at))
                    .expect("guest write");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            batch.push((op, off, len, guest_at));
            guest_at += len.div_ceil(4096) * 4096 + 4096;
        }
        let mem = &vm.mem;
        let futs = batch.iter().map(|&(op, off, len, at)| async move {
            let bufs = Vm::bufs(at, len as usize);
            match op {
                Op::Read => disk.read(off, &bufs, mem).await,
                Op::Write => {
                    // Vm::bufs leaves a 4 KiB gap: the data was written contiguously, so
                    // write from one buffer.
                    disk.write(off, &[(GuestAddress(at), len as usize)], mem)
                        .await
                }
                Op::Discard => disk.discard(off, len).await,
                Op::Zeroes { unmap } => disk.write_zeroes(off, len, unmap).await,
                Op::Flush => disk.flush().await,
            }
        });
        for (r, (op, off, len, _)) in vm.ex.run_until(join_all(futs)).into_iter().zip(&batch) {
            r.unwrap_or_else(|e| panic!("round {round}: {op:?} {off:#x}+{len:#x}: {e}"));
        }
        for &(op, off, len, at) in &batch {
            let range = off as usize..(off + len) as usize;
            match op {
                Op::Read => {
                    let bufs = Vm::bufs(at, len as usize);
                    let mut got = vec![0u8; len as usize];
                    let mut done = 0;
                    for (a, n) in bufs {
                        vm.mem
                            .read_slice(&mut got[done..done + n], a)
                            .expect("guest read");
                        done += n;
                    }
                    assert!(
                        got[..] == model[range],
                        "round {round}: read {off:#x}+{len:#x} differs"
                    );
                }
                Op::Write | Op::Flush => {}
                Op::Discard | Op::Zeroes { .. } => model[range].fill(0),
            }
        }
        if rng.below(8) == 0 {
            vm.flush(disk);
        }
    }
    vm.flush(disk);
    let got = vm.read(disk, 0, size as usize).expect("final read");
    assert!(got == model, "final contents differ");
    model
}

fn soak_qcow2(name: &str, create: &[&str], seed: u64, backing: Option<&Path>) {
    let dir = TempDir::new(name);
    let img = dir.path("disk.qcow2");
    let mut model = vec![0u8; 32 << 20];
    if let Some(b) = backing {
        let base = dir.path("base.raw");
        std::fs::copy(b, &base).expect("copy base");
        let data = std::fs::read(&base).expect("base");
        model[..data.len()].copy_from_slice(&data);
    }
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    if backing.is_some() {
        args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
    }
    args.extend_from_slice(&[s(&img), "32M"]);
    qemu_img(&args);
    let vm = Vm::new();
    let model = {
        let disk = Disk::open(&img, qcow2_rw()).expect("open");
        soak(&disk, &vm, model, seed, 150)
    };
    assert_check_clean(&img);
    assert!(qemu_contents(&img) == model, "qemu-img sees other bytes");
}

#[test]
fn soak_raw() {
    let dir = TempDir::new("soak-raw");
    let img = dir.path("disk.raw");
    std::fs::write(&img, vec![0u8; 32 << 20]).expect("raw");
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    let model = soak(&disk, &vm, vec![0u8; 32 << 20], 1, 150);
    drop(disk);
    assert!(std::fs::read(&img).expect("read") == model);
}

#[test]
fn soak_qcow2_64k() {
    soak_qcow2("soak-64k", &[], 2, None);
}

#[test]
fn soak_qcow2_4k_v2() {
    soak_qcow2(
        "soak-4k-v2",
        &["-o", "cluster_size=4096,compat=0.10"],
        3,
        None,
    );
}

#[test]
fn soak_qcow2_512_with_backing() {
    let dir = TempDir::new("soak-base");
    let base = dir.path("base.raw");
    std::fs::write(&base, Rng(77).bytes(20 << 20)).expect("base");
    soak_qcow2(
        "soak-512-backing",
        &["-o", "cluster_size=512"],
        4,
        Some(&base),
    );
}

#[test]
fn soak_qcow2_64k_with_backing_v2() {
    let dir = TempDir::new("soak-base2");
    let base = dir.path("base.raw");
    std::fs::write(&base, Rng(78).bytes(32 << 20)).expect("base");
    soak_qcow2(
        "soak-64k-backing-v2",
        &["-o", "compat=0.10"],
        5,
        Some(&base),
    );
}

#[test]
fn soak_qcow2_compressed() {
    let dir = TempDir::new("soak-compressed");
    let raw = dir.path("src.raw");
    let mut rng = Rng(6);
    let model: Vec<u8> = (0..32 << 20)
        .map(|_| b"ringvm qcow2 "[rng.below(13) as usize])
        .collect();
    std::fs::write(&raw, &model).expect("raw");
    let img = dir.path("disk.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16384",
        s(&raw),
        s(&img),
    ]);
    let vm = Vm::new();
    let model = {
        let disk = Disk::open(&img, rw()).expect("open");
        soak(&disk, &vm, model, 7, 150)
    };
    assert_check_clean(&img);
    assert!(qemu_contents(&img) == model, "qemu-img sees other bytes");
}
