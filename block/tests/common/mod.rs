//! Helpers for the block integration tests: temp dirs, qemu-img, an executor with guest RAM.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use block::{Disk, OpenOptions};
use executor::Executor;
use memory::{GuestAddress, GuestMemory};

/// Where request buffers start in guest memory.
pub const BUF: u64 = 0x10_0000;
/// Guest RAM size.
pub const RAM: u64 = 64 << 20;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ringvm-block-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs qemu-img (or qemu-io) and asserts it succeeded; returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed (scripts/setup installs qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-img check` must report no errors and no leaks (exit status 0).
pub fn assert_check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().expect("utf-8 path")])
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {} (status {:?}):\n{}{}",
        img.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's guest-visible bytes, as `qemu-img convert -O raw` sees them.
pub fn qemu_contents(img: &Path) -> Vec<u8> {
    let out = img.with_extension("converted.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
    let data = std::fs::read(&out).expect("read converted");
    std::fs::remove_file(&out).expect("remove converted");
    data
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// An executor and guest RAM to drive a disk with.
pub struct Vm {
    pub ex: Executor,
    pub mem: GuestMemory,
}

impl Vm {
    pub fn new() -> Vm {
        Vm {
            ex: Executor::new().expect("executor"),
            mem: GuestMemory::new_x86(RAM).expect("guest memory"),
        }
    }

    /// Guest buffers for `len` bytes at `at` in RAM, split in two uneven pieces with a gap.
    pub fn bufs(at: u64, len: usize) -> Vec<(GuestAddress, usize)> {
        let first = len / 3;
        let mut v = vec![(GuestAddress(at), first)];
        if len > first {
            v.push((GuestAddress(at + first as u64 + 4096), len - first));
        }
        v
    }

    pub fn write(&self, disk: &Disk, offset: u64, data: &[u8]) -> block::Result<()> {
        let bufs = Vm::bufs(BUF, data.len());
        let mut done = 0;
        for &(a, n) in &bufs {
            self.mem
                .write_slice(&data[done..done + n], a)
                .expect("guest write");
            done += n;
        }
        self.ex.run_until(disk.write(offset, &bufs, &self.mem))
    }

    pub fn read(&self, disk: &Disk, offset: u64, len: usize) -> block::Result<Vec<u8>> {
        let bufs = Vm::bufs(BUF, len);
        for &(a, n) in &bufs {
            self.mem.fill(a, n, 0x5a).expect("guest fill");
        }
        self.ex.run_until(disk.read(offset, &bufs, &self.mem))?;
        let mut out = vec![0u8; len];
        let mut done = 0;
        for &(a, n) in &bufs {
            self.mem
                .read_slice(&mut out[done..done + n], a)
                .expect("guest read");
            done += n;
        }
        Ok(out)
    }

    pub fn flush(&self, disk: &Disk) {
        self.ex.run_until(disk.flush()).expect("flush");
    }
}

pub fn rw() -> OpenOptions {
    OpenOptions::default()
}

pub fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

/// Read-write, format qcow2 given (a probed image may not open a backing file).
pub fn qcow2_rw() -> OpenOptions {
    OpenOptions {
        format: Some(block::Format::Qcow2),
        ..OpenOptions::default()
    }
}

/// A backing chain in `dir`, names relative: `base.raw` (6 MiB from `rng`), `mid.qcow2` over
/// it (64 KiB of 0x11 at 1 MiB of its own), `top.qcow2` (`top_cluster` bytes a cluster) over
/// that, 8 MiB.
/// Returns the base's path and bytes, the top's path and what it reads as.
pub fn backing_chain(
    dir: &TempDir,
    rng: &mut Rng,
    top_cluster: u32,
) -> (PathBuf, Vec<u8>, PathBuf, Vec<u8>) {
    let base = dir.path("base.raw");
    let base_data = rng.bytes(6 << 20);
    std::fs::write(&base, &base_data).expect("write base");
    let mid = dir.path("mid.qcow2");
    let over = |img: &Path, backing: &str, format: &str, opts: &str| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            backing,
            "-F",
            format,
            s(img),
            "8M",
        ]);
    };
    over(&mid, "base.raw", "raw", "cluster_size=65536");
    run("qemu-io", &["-c", "write -P 0x11 1M 64k", s(&mid)]);
    let top = dir.path("top.qcow2");
    over(
        &top,
        "mid.qcow2",
        "qcow2",
        &format!("cluster_size={top_cluster}"),
    );
    let mut model = base_data.clone();
    model.resize(8 << 20, 0);
    model[1 << 20..(1 << 20) + 65536].fill(0x11);
    (base, base_data, top, model)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
