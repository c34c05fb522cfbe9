//! Data integrity of `ringvm device block` across kill -9: writes acknowledged before an
//! acknowledged FLUSH survive the device process being killed, round after round, on raw and
//! qcow2 images. libblkio (the `blkio` crate's virtio-blk-vhost-user driver) is the frontend.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use tests::{children_of, BlockBackend, Scratch};

const DISK: u64 = 16 << 20;
/// Writes after the last flush of a round go here; what survives of them is not checked.
const UNFLUSHED_AREA: u64 = DISK - (1 << 20);

/// xorshift: reproducible offsets, lengths and bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn complete_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(10);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
    assert_eq!(n, 1, "no completion within 10 s");
    // SAFETY: do_io initialised the first `n` (1) completions.
    unsafe { c[0].assume_init_read() }.ret
}

/// One round: random writes, FLUSH, more writes that are never flushed, then kill -9 of the
/// process serving the connection while they may still be in flight.
fn round(image: &Path, socket: &Path, rng: &mut Rng, model: &mut [u8]) {
    let mut parent = BlockBackend::start(image, socket);
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", socket.to_str().expect("utf-8 path"))
        .expect("path");
    b.connect()
        .unwrap_or_else(|e| panic!("connect: {}", e.message()));
    let mut started = b
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let region = b.alloc_mem_region(1 << 20).expect("alloc");
    b.map_mem_region(&region)
        .unwrap_or_else(|e| panic!("map: {}", e.message()));
    let mem = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", region.fd))
        .expect("reopen the region's memfd");
    let buf = region.addr as *mut u8;
    let q = &mut started.queues[0];

    for _ in 0..8 {
        let len = ((rng.next() % 16 + 1) * 4096) as usize;
        let at = (rng.next() % ((UNFLUSHED_AREA - len as u64) / 4096)) * 4096;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        mem.write_all_at(&data, region.fd_offset as u64)
            .expect("fill buffer");
        q.write(at, buf, len, 0, ReqFlags::empty());
        assert_eq!(complete_one(q), 0, "write");
        model[at as usize..at as usize + len].copy_from_slice(&data);
    }
    q.flush(0, ReqFlags::empty());
    assert_eq!(complete_one(q), 0, "flush");
    // Unflushed writes, still in flight when the process dies.
    for i in 0..4 {
        let at = UNFLUSHED_AREA + i * 65536;
        q.write(at, buf, 65536, 0, ReqFlags::empty());
    }
    // Submit them without waiting for their completions.
    let mut none: [MaybeUninit<Completion>; 0] = [];
    q.do_io(&mut none, 0, None, None).expect("submit");
    let server = children_of(parent.0.id())
        .first()
        .copied()
        .unwrap_or(parent.0.id());
    let killed = Command::new("kill")
        .args(["-9", &server.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let _ = parent.0.wait();
    drop(started);
    drop(b);
}

fn check(image: &Path, model: &[u8], qcow2: bool, scratch: &Path) {
    let raw = if qcow2 {
        let check = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(image)
            .output()
            .expect("qemu-img check");
        // 0: clean; 3: leaked clusters only (allowed after a crash, no corruption).
        let code = check.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "qemu-img check: {code:?} {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let out = scratch.join("converted.raw");
        let convert = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&out)
            .status()
            .expect("qemu-img convert");
        assert!(convert.success());
        out
    } else {
        image.to_path_buf()
    };
    let mut disk = vec![0u8; UNFLUSHED_AREA as usize];
    File::open(&raw)
        .and_then(|f| f.read_exact_at(&mut disk, 0))
        .expect("read the image");
    if let Some(i) = (0..disk.len()).find(|&i| disk[i] != model[i]) {
        panic!("byte {i} differs from what was flushed before the kill");
    }
}

fn kill_rounds(qcow2: bool, rounds: usize) {
    let dir = Scratch::new("integrity", if qcow2 { "qcow2" } else { "raw" });
    let image = dir.0.join(if qcow2 { "disk.qcow2" } else { "disk.raw" });
    if qcow2 {
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&image)
            .arg(DISK.to_string())
            .status()
            .expect("qemu-img create");
        assert!(ok.success());
    } else {
        File::create(&image)
            .and_then(|f| f.set_len(DISK))
            .expect("create image");
    }
    let socket = dir.0.join("blk.sock");
    let mut model = vec![0u8; DISK as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..rounds {
        round(&image, &socket, &mut rng, &mut model);
        check(&image, &model, qcow2, &dir.0);
    }
}

#[test]
fn flushed_writes_survive_kill_9_of_the_device_process_raw_20_rounds() {
    kill_rounds(false, 20);
}

#[test]
fn flushed_writes_survive_kill_9_of_the_device_process_qcow2_20_rounds() {
    kill_rounds(true, 20);
}
