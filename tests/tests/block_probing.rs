//! Format probing cannot be turned against the host, through the real `ringvm device block`
//! process: a frontend racing the qcow2 magic into the first sector of a probed raw image never
//! gets it on disk, and a crafted qcow2 image whose backing file names a host file is refused
//! (or, with `format=raw`, read as the raw bytes it is). libblkio is the frontend.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use tests::{ringvm_bin, test_guest_path, BlockBackend, Scratch};

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Requests in flight at once: several writes of sector 0 race each other too.
const DEPTH: usize = 8;
const RACE: Duration = Duration::from_secs(10);
/// What a request the device failed (VIRTIO_BLK_S_IOERR) completes with.
const EIO: i32 = 5;

/// A connected libblkio frontend with one 1 MiB memory region.
struct Frontend {
    // Dropped in this order: the queue's device before the instance.
    started: blkio::BlkioStartOutcome,
    // Owns the connection the queue uses.
    _blkio: Blkio,
    region: blkio::MemoryRegion,
}

fn connect(socket: &Path) -> Frontend {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", socket.to_str().expect("utf-8 path"))
        .expect("path");
    b.connect()
        .unwrap_or_else(|e| panic!("connect: {}", e.message()));
    let started = b
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let region = b.alloc_mem_region(1 << 20).expect("alloc");
    b.map_mem_region(&region)
        .unwrap_or_else(|e| panic!("map: {}", e.message()));
    Frontend {
        started,
        _blkio: b,
        region,
    }
}

fn complete(q: &mut Blkioq, n: usize) -> Vec<i32> {
    let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut timeout = Duration::from_secs(10);
    let got = q.do_io(&mut c, n, Some(&mut timeout), None).expect("do_io");
    assert_eq!(got, n, "completions missing after 10 s");
    c.iter()
        // SAFETY: do_io initialised the first `got` (= n) completions.
        .map(|c| unsafe { c.assume_init_read() }.ret)
        .collect()
}

/// For [`RACE`], writes sector 0 from one guest buffer, [`DEPTH`] at a time, while another
/// thread flips that buffer's first byte between `Q` and `X` (so its first four bytes are the
/// qcow2 magic half of the time). Returns (writes done, writes refused).
fn race_magic_into_sector_0(image: &Path, file_spec: &str, dir: &Scratch) -> (u64, u64) {
    let socket = dir.path("blk.sock");
    let _backend = BlockBackend::start(file_spec, &socket);
    let mut f = connect(&socket);
    let buf = f.region.addr as *mut u8;
    let mut sector = [0u8; 4096];
    sector[..4].copy_from_slice(&MAGIC);
    // SAFETY: the region is 1 MiB of this process's memory, mapped for as long as `f` lives.
    unsafe { std::ptr::copy_nonoverlapping(sector.as_ptr(), buf, sector.len()) };

    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        let addr = buf as usize;
        std::thread::spawn(move || {
            let first = addr as *mut u8;
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let b = if flips.is_multiple_of(2) { b'X' } else { b'Q' };
                // SAFETY: the region outlives this thread (joined below, before `f` drops);
                // a volatile write is what a second vCPU does to guest memory.
                unsafe { first.write_volatile(b) };
                flips += 1;
            }
            flips
        })
    };
    let disk = File::open(image).expect("open the image");
    let q = &mut f.started.queues[0];
    let (mut done, mut refused) = (0u64, 0u64);
    let start = Instant::now();
    let mut head = [0u8; 4];
    let mut failed = None;
    // No assertion until the flipper has stopped: it must not outlive the mapping.
    while start.elapsed() < RACE && failed.is_none() {
        for _ in 0..DEPTH {
            q.write(0, buf, 4096, 0, ReqFlags::empty());
        }
        for ret in complete(q, DEPTH) {
            match ret {
                0 => done += 1,
                r if r == -EIO => refused += 1,
                r => failed = Some(format!("a write of sector 0 failed with {r}")),
            }
        }
        disk.read_exact_at(&mut head, 0).expect("read the image");
        if head == MAGIC {
            failed = Some(format!(
                "the qcow2 magic reached the disk after {done} writes ({refused} refused)"
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    drop(f);
    if let Some(why) = failed {
        panic!("{file_spec}: {why}");
    }
    assert!(flips > 1000, "the buffer hardly changed ({flips} flips)");
    (done, refused)
}

fn raw_image(path: &Path) {
    File::create(path)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create image");
}

#[test]
fn a_frontend_racing_the_qcow2_magic_into_a_probed_raw_image_never_gets_it_on_disk() {
    let dir = Scratch::new("probing", "race");
    for direct in [false, true] {
        let image = dir.path(if direct { "direct.raw" } else { "buffered.raw" });
        raw_image(&image);
        let spec = format!("{},direct={direct}", image.display());
        let (done, refused) = race_magic_into_sector_0(&image, &spec, &dir);
        // Both outcomes happen: the race is real, and the check decides on what is written.
        assert!(
            done > 0 && refused > 0,
            "direct={direct}: {done} writes done, {refused} refused"
        );
        let mut head = [0u8; 4];
        File::open(&image)
            .and_then(|f| f.read_exact_at(&mut head, 0))
            .expect("read the image");
        assert_ne!(
            head, MAGIC,
            "direct={direct}: the qcow2 magic reached the disk"
        );
        // Still raw at its next open: the guest sees what it wrote last, not a qcow2 disk.
        let socket = dir.path("check.sock");
        let _backend = BlockBackend::start(&image, &socket);
        let mut f = connect(&socket);
        let buf = f.region.addr as *mut u8;
        let q = &mut f.started.queues[0];
        q.read(0, buf, 4096, 0, ReqFlags::empty());
        assert_eq!(complete(q, 1), [0]);
        // SAFETY: the region is mapped while `f` lives; libblkio wrote 4096 bytes to it.
        let got = unsafe { std::slice::from_raw_parts(buf, 4) };
        assert_eq!(
            &got[1..],
            &MAGIC[1..],
            "direct={direct}: not the raw image's bytes"
        );
    }
}

#[test]
fn a_raw_image_given_as_raw_takes_the_magic_from_the_frontend() {
    let dir = Scratch::new("probing", "given-raw");
    let image = dir.path("disk.raw");
    raw_image(&image);
    let socket = dir.path("blk.sock");
    let _backend = BlockBackend::start(format!("{},format=raw", image.display()), &socket);
    let mut f = connect(&socket);
    let buf = f.region.addr as *mut u8;
    // SAFETY: the region is 1 MiB of this process's memory, mapped while `f` lives.
    unsafe { std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), buf, 4) };
    let q = &mut f.started.queues[0];
    q.write(0, buf, 512, 0, ReqFlags::empty());
    assert_eq!(complete(q, 1), [0]);
    let mut head = [0u8; 4];
    File::open(&image)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .expect("read the image");
    assert_eq!(head, MAGIC);
}

/// A qcow2 image whose backing file is `backing` (a raw host file).
fn crafted(image: &Path, backing: &str) {
    let ok = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
        ])
        .arg(image)
        .arg("1M")
        .status()
        .expect("qemu-img create");
    assert!(ok.success());
}

/// `ringvm device block --socket ... --file SPEC`: its exit status and stderr once it gave up
/// (an image it refuses fails before it listens).
fn refused(spec: &str, dir: &Scratch) -> String {
    let socket = dir.path("refused.sock");
    let out = Command::new(ringvm_bin())
        .args(["device", "block", "--socket"])
        .arg(&socket)
        .args(["--file", spec])
        .output()
        .expect("run ringvm device block");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!socket.exists(), "it listened: {err}");
    err
}

#[test]
fn a_crafted_image_naming_a_host_file_as_backing_file_is_refused_or_read_as_raw() {
    let dir = Scratch::new("probing", "crafted");
    let image = dir.path("crafted.qcow2");
    crafted(&image, "/etc/hostname");
    let path = image.to_string_lossy().into_owned();
    // Probed: a probed image never opens a backing file.
    let err = refused(&path, &dir);
    assert!(
        err.contains("probed as qcow2") && err.contains("/etc/hostname"),
        "{err}"
    );
    // Given as qcow2: the backing file is outside the image's directory.
    let err = refused(&format!("{path},format=qcow2"), &dir);
    assert!(
        err.contains("/etc/hostname") && err.contains("outside"),
        "{err}"
    );
    // Given as raw: the guest reads the image's own bytes, the qcow2 header.
    let socket = dir.path("raw.sock");
    let _backend = BlockBackend::start(format!("{path},format=raw"), &socket);
    let mut f = connect(&socket);
    let buf = f.region.addr as *mut u8;
    let q = &mut f.started.queues[0];
    q.read(0, buf, 4096, 0, ReqFlags::empty());
    assert_eq!(complete(q, 1), [0]);
    let mut want = [0u8; 4096];
    File::open(&image)
        .and_then(|f| f.read_exact_at(&mut want, 0))
        .expect("read the image");
    // SAFETY: the region is mapped while `f` lives; libblkio wrote 4096 bytes to it.
    let got = unsafe { std::slice::from_raw_parts(buf, 4096) };
    assert_eq!(got, &want[..]);
    // `ringvm run` refuses it before the VM starts, naming the disk.
    for flag in ["--rwdisk", "-d", "--rwroot", "-r"] {
        let out = Command::new(ringvm_bin())
            .args(["run", "--no-rng", flag, &path])
            .arg(test_guest_path())
            .output()
            .expect("run ringvm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert!(
            err.contains("block0") && err.contains("probed as qcow2"),
            "{flag}: {err}"
        );
    }
}
