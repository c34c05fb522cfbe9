//! Interop with an independent vhost-user frontend: libblkio's `virtio-blk-vhost-user` driver
//! (the `blkio` crate) against ringvm's block device served on a unix socket by its own
//! thread and executor.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use block::{BlockDevice, BlockOptions, Disk, OpenOptions};
use common::TempDir;
use executor::{AsyncFd, Executor};
use virtio::vhost_user::{serve, Connection};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 16 * MIB;

/// Serves a block device for `image` on `socket` from a thread: one connection, then the
/// thread ends with `serve`'s result.
fn spawn_backend(
    image: &Path,
    socket: &Path,
    num_queues: usize,
) -> std::thread::JoinHandle<Result<(), String>> {
    let listener = UnixListener::bind(socket).unwrap();
    let image = image.to_owned();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let ex = Executor::new().map_err(|e| e.to_string())?;
        let disk = Disk::open(&image, OpenOptions::default()).map_err(|e| e.to_string())?;
        let device = BlockDevice::new(
            disk,
            BlockOptions {
                id: Some("blkio".into()),
                num_queues,
                queue_size: 256,
            },
        );
        ex.run_until(serve(
            Rc::new(device),
            Connection::new(AsyncFd::new(stream.into())),
        ))
        .map_err(|e| e.to_string())
    })
}

/// The memfd behind a libblkio memory region, opened again so the test reads and writes it
/// with plain file I/O.
fn region_file(region: &MemoryRegion) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", region.fd))
        .unwrap()
}

/// Waits for one completion; returns its user data and result.
fn complete_one(q: &mut Blkioq) -> (usize, i32) {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(10);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).unwrap();
    assert_eq!(n, 1, "a completion within the timeout");
    // SAFETY: do_io initialized the first `n` (1) entries.
    let c = unsafe { c[0].assume_init_read() };
    (c.user_data, c.ret)
}

#[test]
fn libblkio_writes_reads_flushes_and_discards_through_the_device() {
    let dir = TempDir::new("rw");
    let image = dir.path("disk.raw");
    File::create(&image).unwrap().set_len(DISK_SIZE).unwrap();
    let socket = dir.path("blk.sock");
    let backend = spawn_backend(&image, &socket, 2);

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect()
        .unwrap_or_else(|e| panic!("connect: {}", e.message()));
    assert_eq!(b.get_u64("capacity").unwrap(), DISK_SIZE);
    assert_eq!(b.get_i32("max-queues").unwrap(), 2);
    b.set_i32("num-queues", 2).unwrap();
    let mut started = b
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let region = b.alloc_mem_region(2 * MIB as usize).unwrap();
    b.map_mem_region(&region)
        .unwrap_or_else(|e| panic!("map_mem_region: {}", e.message()));
    let mem = region_file(&region);
    let buf = region.addr as *mut u8;
    let half = MIB as usize;

    let data: Vec<u8> = (0..half).map(|i| (i % 251) as u8).collect();
    mem.write_all_at(&data, region.fd_offset as u64).unwrap();
    let q = &mut started.queues[0];
    q.write(4096, buf, half, 1, ReqFlags::empty());
    assert_eq!(complete_one(q), (1, 0), "write");
    q.flush(2, ReqFlags::empty());
    assert_eq!(complete_one(q), (2, 0), "flush");
    // Read back through the second queue into the second half of the region.
    let q1 = &mut started.queues[1];
    q1.read(4096, buf.wrapping_add(half), half, 3, ReqFlags::empty());
    assert_eq!(complete_one(q1), (3, 0), "read");
    let mut back = vec![0u8; half];
    mem.read_exact_at(&mut back, region.fd_offset as u64 + half as u64)
        .unwrap();
    assert!(back == data, "read back what was written");

    // 32 writes in flight at once, then 32 reads, each of its own 4 KiB.
    let q = &mut started.queues[0];
    let blocks: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i ^ 0xa5; 4096]).collect();
    for (i, b) in blocks.iter().enumerate() {
        mem.write_all_at(b, region.fd_offset as u64 + (i * 4096) as u64)
            .unwrap();
    }
    let base = 8 * MIB;
    for i in 0..32 {
        let at = (i * 4096) as u64;
        q.write(
            base + at,
            buf.wrapping_add(i * 4096),
            4096,
            100 + i,
            ReqFlags::empty(),
        );
    }
    let mut done: Vec<(usize, i32)> = (0..32).map(|_| complete_one(q)).collect();
    done.sort();
    assert_eq!(done, (100..132).map(|i| (i, 0)).collect::<Vec<_>>());
    for i in 0..32 {
        let at = (i * 4096) as u64;
        let dst = buf.wrapping_add(half + i * 4096);
        q.read(base + at, dst, 4096, 200 + i, ReqFlags::empty());
    }
    let mut done: Vec<(usize, i32)> = (0..32).map(|_| complete_one(q)).collect();
    done.sort();
    assert_eq!(done, (200..232).map(|i| (i, 0)).collect::<Vec<_>>());
    for (i, b) in blocks.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        mem.read_exact_at(
            &mut back,
            region.fd_offset as u64 + (half + i * 4096) as u64,
        )
        .unwrap();
        assert!(&back == b, "block {i} read back");
    }

    q.discard(8192, 65536, 4, ReqFlags::empty());
    assert_eq!(complete_one(q), (4, 0), "discard");
    q.write_zeroes(4096 + 131072, 4096, 5, ReqFlags::empty());
    assert_eq!(complete_one(q), (5, 0), "write zeroes");
    // Out of range: an error, not a hang.
    q.read(DISK_SIZE, buf, 4096, 6, ReqFlags::empty());
    let (id, ret) = complete_one(q);
    assert_eq!(id, 6);
    assert!(ret < 0, "reading past the end fails");

    drop(started);
    b.unmap_mem_region(&region);
    drop(b);
    backend
        .join()
        .unwrap()
        .expect("the backend ends cleanly when libblkio disconnects");

    let file = std::fs::read(&image).unwrap();
    let mut expect = vec![0u8; DISK_SIZE as usize];
    expect[4096..4096 + half].copy_from_slice(&data);
    expect[8192..8192 + 65536].fill(0);
    expect[4096 + 131072..4096 + 131072 + 4096].fill(0);
    for (i, b) in blocks.iter().enumerate() {
        let at = (8 * MIB) as usize + i * 4096;
        expect[at..at + 4096].copy_from_slice(b);
    }
    assert!(
        file == expect,
        "the image holds the writes, discards and zeroes"
    );
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn libblkio_on_a_qcow2_image_leaves_an_image_qemu_img_reads_back() {
    let dir = TempDir::new("qcow2");
    let image = dir.path("disk.qcow2");
    let image_s = image.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image_s,
        &DISK_SIZE.to_string(),
    ]);
    let socket = dir.path("blk.sock");
    let backend = spawn_backend(&image, &socket, 1);

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect()
        .unwrap_or_else(|e| panic!("connect: {}", e.message()));
    let mut started = b
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let len = 256 * 1024;
    let region = b.alloc_mem_region(len).unwrap();
    b.map_mem_region(&region)
        .unwrap_or_else(|e| panic!("map_mem_region: {}", e.message()));
    let mem = region_file(&region);
    let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8 ^ 0x3c).collect();
    mem.write_all_at(&data, region.fd_offset as u64).unwrap();
    let q = &mut started.queues[0];
    // Across cluster boundaries (64 KiB clusters), then flushed.
    let at = 3 * 65536 - 4096;
    q.write(at, region.addr as *const u8, len, 1, ReqFlags::empty());
    assert_eq!(complete_one(q), (1, 0), "write");
    q.flush(2, ReqFlags::empty());
    assert_eq!(complete_one(q), (2, 0), "flush");

    drop(started);
    b.unmap_mem_region(&region);
    drop(b);
    backend
        .join()
        .unwrap()
        .expect("the backend ends cleanly when libblkio disconnects");

    qemu_img(&["check", "-q", image_s]);
    let raw = dir.path("out.raw");
    qemu_img(&["convert", "-O", "raw", image_s, raw.to_str().unwrap()]);
    let file = std::fs::read(&raw).unwrap();
    let at = at as usize;
    assert!(
        file[at..at + len] == data[..],
        "qemu-img reads the data back"
    );
    assert!(file[..at].iter().all(|&b| b == 0));
    assert!(file[at + len..].iter().all(|&b| b == 0));
}
