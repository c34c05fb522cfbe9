//! Images made by qemu-img, driven by ringvm, checked by qemu-img.

mod common;

use block::{Disk, Error, OpenOptions};
use common::*;
use memory::GuestAddress;

const MIB: u64 = 1 << 20;

/// Writes a spread of requests (partial clusters, cluster-spanning, unaligned) and mirrors
/// them in `model`.
fn write_pattern(vm: &Vm, disk: &Disk, model: &mut [u8], rng: &mut Rng) {
    let size = model.len() as u64;
    let spots = [
        (0u64, 512usize),
        (512, 4096),
        (65536 - 700, 1400),
        (3 * MIB + 17, 200_000),
        (size - 4096, 4096),
        (size / 2, 3 * MIB as usize),
        (7 * MIB + 1, 1),
    ];
    for (off, len) in spots {
        let data = rng.bytes(len);
        vm.write(disk, off, &data).expect("write");
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

fn qcow2_write_then_check(cluster_size: &str, compat: &str) {
    qcow2_write_then_check_opts(&format!("cluster_size={cluster_size},compat={compat}"));
}

fn qcow2_write_then_check_opts(opts: &str) {
    let dir = TempDir::new("qcow2-write");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "16M"]);
    let vm = Vm::new();
    let mut model = vec![0u8; 16 << 20];
    let mut rng = Rng(0x1234_5678);
    {
        let disk = Disk::open(&img, rw()).expect("open");
        assert!(matches!(disk, Disk::Qcow2(_)));
        assert_eq!(disk.size(), 16 << 20);
        write_pattern(&vm, &disk, &mut model, &mut rng);
        // Read back before the flush (from the caches) and after.
        assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
        vm.flush(&disk);
        assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
    }
    assert_check_clean(&img);
    assert!(qemu_contents(&img) == model, "qemu-img sees other bytes");
    // Reopened, ringvm reads the same.
    let disk = Disk::open(&img, ro()).expect("reopen");
    assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
}

#[test]
fn qcow2_v3_64k_writes_pass_qemu_img_check() {
    qcow2_write_then_check("65536", "1.1");
}

#[test]
fn qcow2_v3_512b_clusters_writes_pass_qemu_img_check() {
    qcow2_write_then_check("512", "1.1");
}

#[test]
fn qcow2_v3_2m_clusters_writes_pass_qemu_img_check() {
    qcow2_write_then_check("2M", "1.1");
}

#[test]
fn qcow2_preallocated_metadata_writes_pass_qemu_img_check() {
    qcow2_write_then_check_opts("preallocation=metadata");
}

#[test]
fn qcow2_lazy_refcounts_image_writes_pass_qemu_img_check() {
    qcow2_write_then_check_opts("lazy_refcounts=on,cluster_size=16384");
}

#[test]
fn dropping_without_flush_may_leak_but_never_corrupts() {
    let dir = TempDir::new("no-flush");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let vm = Vm::new();
    {
        let disk = Disk::open(&img, rw()).expect("open");
        vm.write(&disk, 0, &[1; 512]).expect("write");
        vm.flush(&disk);
        vm.write(&disk, 8 << 20, &[2; 512]).expect("write");
        // Dropped with the second write's L2 update unflushed (as a crash would).
    }
    let out = std::process::Command::new("qemu-img")
        .args(["check", s(&img)])
        .output()
        .expect("qemu-img");
    // 0: clean, 3: leaked clusters only; 2 would be corruption.
    assert!(matches!(out.status.code(), Some(0) | Some(3)), "{out:?}");
    assert_eq!(
        qemu_contents(&img)[..512],
        [1; 512],
        "flushed data survives"
    );
}

#[test]
fn qcow2_v2_writes_pass_qemu_img_check() {
    qcow2_write_then_check("65536", "0.10");
}

#[test]
fn qcow2_converted_from_raw_reads_the_same_bytes() {
    let dir = TempDir::new("qcow2-convert");
    let raw = dir.path("src.raw");
    let mut rng = Rng(99);
    let mut data = vec![0u8; 8 << 20];
    // Data with holes, so the image has unallocated clusters too.
    for chunk in data.chunks_mut(300_000).step_by(2) {
        let n = chunk.len();
        chunk.copy_from_slice(&rng.bytes(n));
    }
    std::fs::write(&raw, &data).expect("write raw");
    let vm = Vm::new();
    for cs in ["512", "65536", "2M"] {
        let img = dir.path(&format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&raw),
            s(&img),
        ]);
        let disk = Disk::open(&img, ro()).expect("open");
        assert!(
            vm.read(&disk, 0, data.len()).expect("read") == data,
            "cluster size {cs}"
        );
        let mid = vm.read(&disk, 123_457, 777_777).expect("read");
        assert!(mid[..] == data[123_457..123_457 + 777_777]);
    }
    // And raw itself.
    let disk = Disk::open(&raw, ro()).expect("open raw");
    assert!(matches!(disk, Disk::Raw(_)));
    assert!(vm.read(&disk, 0, data.len()).expect("read") == data);
}

#[test]
fn compressed_images_read_and_rewrite() {
    let dir = TempDir::new("compressed");
    let raw = dir.path("src.raw");
    // Compressible but irregular (dynamic Huffman blocks), with a hole.
    let mut rng = Rng(21);
    let mut model: Vec<u8> = (0..4 << 20)
        .map(|_| b"abcdefgh \n"[rng.below(10) as usize])
        .collect();
    model[1 << 20..(1 << 20) + 300_000].fill(0);
    std::fs::write(&raw, &model).expect("raw");
    let vm = Vm::new();
    for cs in ["4096", "65536", "2M"] {
        let img = dir.path(&format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&raw),
            s(&img),
        ]);
        let mut model = model.clone();
        {
            let disk = Disk::open(&img, rw()).expect("open");
            assert!(
                vm.read(&disk, 0, model.len()).expect("read") == model,
                "cluster size {cs}"
            );
            // Partial rewrites (decompress, copy on write), whole-cluster discards.
            for (off, len) in [(10u64, 100usize), (70_000, 5000), (3 << 20, 1 << 20)] {
                let data = rng.bytes(len);
                vm.write(&disk, off, &data).expect("write");
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            vm.ex
                .run_until(disk.discard(2 << 20, 1 << 20))
                .expect("discard");
            model[2 << 20..3 << 20].fill(0);
            vm.flush(&disk);
            assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
        }
        assert_check_clean(&img);
        assert!(qemu_contents(&img) == model, "cluster size {cs}");
    }
}

#[test]
fn qcow2_reads_data_qemu_io_wrote() {
    let dir = TempDir::new("qemu-io");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 4096 1M",
            "-c",
            "write -z 65536 65536",
            s(&img),
        ],
    );
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    let got = vm.read(&disk, 0, 2 << 20).expect("read");
    for (i, &b) in got.iter().enumerate() {
        let want = if (4096..4096 + (1 << 20)).contains(&i) && !(65536..131072).contains(&i) {
            0xab
        } else {
            0
        };
        assert_eq!(b, want, "byte {i}");
    }
    // Overwrite part of the zero cluster and of a data cluster.
    vm.write(&disk, 65536 + 100, &[7u8; 10]).expect("write");
    vm.write(&disk, 4096 + 10, &[9u8; 10]).expect("write");
    vm.flush(&disk);
    drop(disk);
    assert_check_clean(&img);
    let c = qemu_contents(&img);
    assert_eq!(
        &c[65536 + 98..65536 + 112],
        &[0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0, 0]
    );
    assert_eq!(
        &c[4096 + 8..4096 + 22],
        &[0xab, 0xab, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0xab, 0xab]
    );
}

#[test]
fn qcow2_with_backing_files_copies_on_write() {
    let dir = TempDir::new("backing");
    let mut rng = Rng(5);
    let (base, base_data, top, mut model) = backing_chain(&dir, &mut rng, 4096);
    let vm = Vm::new();
    {
        let disk = Disk::open(&top, qcow2_rw()).expect("open");
        assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
        for (off, len) in [
            (100u64, 10usize),
            ((1 << 20) + 4000, 300),
            ((6 << 20) - 50, 100),
            (7 << 20, 4096),
        ] {
            let data = rng.bytes(len);
            vm.write(&disk, off, &data).expect("write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
        vm.flush(&disk);
    }
    assert_check_clean(&top);
    assert!(qemu_contents(&top) == model);
    assert!(
        std::fs::read(&base).expect("base") == base_data,
        "backing file untouched"
    );
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let dir = TempDir::new("zeroes");
    let vm = Vm::new();
    for compat in ["1.1", "0.10"] {
        let img = dir.path(&format!("z{compat}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            s(&img),
            "4M",
        ]);
        let mut rng = Rng(7);
        let mut model = rng.bytes(4 << 20);
        {
            let disk = Disk::open(&img, rw()).expect("open");
            vm.write(&disk, 0, &model).expect("fill");
            for (off, len, op) in [
                (0u64, 65536u64, 0),
                (65536 + 512, 200_000, 1),
                (1 << 20, 1 << 20, 2),
                (3 << 20, 1000, 0),
            ] {
                let f = match op {
                    0 => vm.ex.run_until(disk.discard(off, len)),
                    1 => vm.ex.run_until(disk.write_zeroes(off, len, false)),
                    _ => vm.ex.run_until(disk.write_zeroes(off, len, true)),
                };
                f.expect("zeroing");
                model[off as usize..(off + len) as usize].fill(0);
            }
            assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
            // Rewrite into a discarded region: clusters are reused after the flush.
            vm.flush(&disk);
            let data = rng.bytes(70_000);
            vm.write(&disk, 1 << 20, &data).expect("write");
            model[1 << 20..(1 << 20) + 70_000].copy_from_slice(&data);
            vm.flush(&disk);
            assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
        }
        assert_check_clean(&img);
        assert!(qemu_contents(&img) == model, "compat {compat}");
    }
}

#[test]
fn raw_discard_and_write_zeroes() {
    let dir = TempDir::new("raw-zeroes");
    let img = dir.path("disk.raw");
    let mut rng = Rng(3);
    let mut model = rng.bytes(1 << 20);
    std::fs::write(&img, &model).expect("write");
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    vm.ex.run_until(disk.discard(4096, 8192)).expect("discard");
    vm.ex
        .run_until(disk.write_zeroes(100_000, 5000, false))
        .expect("zero");
    model[4096..12288].fill(0);
    model[100_000..105_000].fill(0);
    vm.flush(&disk);
    assert!(vm.read(&disk, 0, model.len()).expect("read") == model);
    assert!(std::fs::read(&img).expect("read") == model);
}

#[test]
fn raw_images_refuse_a_qcow2_signature_in_their_first_sector() {
    let dir = TempDir::new("raw-signature");
    let img = dir.path("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    let mut sector = vec![0u8; 512];
    sector[..4].copy_from_slice(b"QFI\xfb");
    assert!(matches!(
        vm.write(&disk, 0, &sector),
        Err(Error::RawSignature)
    ));
    // Byte by byte does not get around it.
    vm.write(&disk, 1, b"FI\xfb").expect("no signature yet");
    assert!(matches!(vm.write(&disk, 0, b"Q"), Err(Error::RawSignature)));
    // Elsewhere, and other first bytes, are fine.
    vm.write(&disk, 512, &sector).expect("second sector");
    sector[0] = b'X';
    vm.write(&disk, 0, &sector).expect("no signature");
    drop(disk);
    assert!(matches!(
        Disk::open(&img, rw()).expect("reopen"),
        Disk::Raw(_)
    ));
}

#[test]
fn concurrent_writes_to_one_new_cluster_allocate_it_once() {
    let dir = TempDir::new("concurrent");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let vm = Vm::new();
    let disk = Disk::open(&img, rw()).expect("open");
    // 128 sector writes into clusters 0 and 1, all in flight at once.
    for i in 0..128u64 {
        vm.mem
            .fill(GuestAddress(BUF + i * 512), 512, i as u8 + 1)
            .expect("fill");
    }
    let mem = &vm.mem;
    let disk_ref = &disk;
    let writes = (0..128u64).map(|i| async move {
        let bufs = [(GuestAddress(BUF + i * 512), 512usize)];
        disk_ref.write(i * 512, &bufs, mem).await
    });
    let results = vm.ex.run_until(futures::future::join_all(writes));
    assert!(results.iter().all(|r| r.is_ok()));
    vm.flush(&disk);
    let got = vm.read(&disk, 0, 128 * 512).expect("read");
    for i in 0..128usize {
        assert!(
            got[i * 512..(i + 1) * 512]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "sector {i}"
        );
    }
    drop(disk);
    assert_check_clean(&img);
    let map = qemu_img(&["map", "--output=json", s(&img)]);
    assert!(map.contains("\"data\": true"));
}

#[test]
fn refcount_table_grows_for_small_clusters() {
    let dir = TempDir::new("grow");
    let img = dir.path("disk.qcow2");
    // 512-byte clusters: one refcount table cluster covers 64 blocks of 256 clusters (8 MiB).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&img),
        "64M",
    ]);
    let vm = Vm::new();
    let mut rng = Rng(11);
    let mut model = vec![0u8; 64 << 20];
    {
        let disk = Disk::open(&img, rw()).expect("open");
        let data = rng.bytes(20 << 20);
        vm.write(&disk, 40 << 20, &data).expect("write");
        model[40 << 20..60 << 20].copy_from_slice(&data);
        vm.flush(&disk);
        assert!(vm.read(&disk, 40 << 20, 20 << 20).expect("read") == data);
    }
    let header = std::fs::read(&img).expect("read image");
    let clusters = u32::from_be_bytes(header[56..60].try_into().expect("4 bytes"));
    assert!(
        clusters > 1,
        "the refcount table grew ({clusters} clusters)"
    );
    assert_check_clean(&img);
    assert!(qemu_contents(&img) == model);
}

#[test]
fn refcount_widths_other_than_16_bits_work() {
    let dir = TempDir::new("refbits");
    let vm = Vm::new();
    for bits in ["1", "8", "64"] {
        let img = dir.path(&format!("r{bits}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("refcount_bits={bits}"),
            s(&img),
            "8M",
        ]);
        let mut model = vec![0u8; 8 << 20];
        let mut rng = Rng(bits.len() as u64 + 1);
        {
            let disk = Disk::open(&img, rw()).expect("open");
            write_pattern(&vm, &disk, &mut model, &mut rng);
            vm.flush(&disk);
        }
        assert_check_clean(&img);
        assert!(qemu_contents(&img) == model, "refcount_bits {bits}");
    }
}

#[test]
fn read_only_disks_refuse_changes() {
    let dir = TempDir::new("ro");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let raw = dir.path("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    for p in [&img, &raw] {
        let disk = Disk::open(p, ro()).expect("open");
        assert!(disk.read_only());
        assert!(matches!(
            vm.write(&disk, 0, &[1; 512]),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(
            vm.ex.run_until(disk.discard(0, 512)),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(
            vm.ex.run_until(disk.write_zeroes(0, 512, false)),
            Err(Error::ReadOnly)
        ));
        assert!(vm.read(&disk, 0, 512).is_ok());
    }
}

#[test]
fn requests_past_the_end_are_refused_before_any_io() {
    let dir = TempDir::new("range");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let raw = dir.path("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    for p in [&img, &raw] {
        let disk = Disk::open(p, rw()).expect("open");
        assert!(matches!(
            vm.write(&disk, (1 << 20) - 511, &[1; 512]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            vm.read(&disk, 1 << 20, 1),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            vm.ex.run_until(disk.discard(u64::MAX - 10, 20)),
            Err(Error::OutOfRange { .. })
        ));
        let bad = [(GuestAddress(RAM + (1 << 30)), 512usize)];
        assert!(matches!(
            vm.ex.run_until(disk.write(0, &bad, &vm.mem)),
            Err(Error::GuestMemory(_))
        ));
    }
    drop(vm);
    assert_check_clean(&img);
}

#[test]
fn direct_raw_refuses_unaligned_ranges_and_bounces_unaligned_buffers() {
    let dir = TempDir::new("direct");
    let raw = dir.path("disk.raw");
    std::fs::write(&raw, vec![3u8; 1 << 20]).expect("raw");
    let vm = Vm::new();
    let disk = Disk::open(
        &raw,
        OpenOptions {
            read_only: false,
            direct: true,
            ..OpenOptions::default()
        },
    )
    .expect("open");
    let bs = disk.block_size() as usize;
    assert!(bs >= 512 && bs.is_power_of_two());
    assert!(matches!(
        vm.read(&disk, 1, bs),
        Err(Error::Unaligned { .. })
    ));
    let bufs = [(GuestAddress(BUF), bs)];
    vm.mem.fill(GuestAddress(BUF), bs, 9).expect("fill");
    vm.ex
        .run_until(disk.write(bs as u64, &bufs, &vm.mem))
        .expect("aligned write");
    vm.ex
        .run_until(disk.read(0, &[(GuestAddress(BUF), 2 * bs)], &vm.mem))
        .expect("aligned read");
    let mut got = vec![0u8; 2 * bs];
    vm.mem
        .read_slice(&mut got, GuestAddress(BUF))
        .expect("read");
    assert!(got[..bs].iter().all(|&b| b == 3) && got[bs..].iter().all(|&b| b == 9));
    // Guest buffers at odd addresses with odd lengths are bounced, not refused.
    let odd = [
        (GuestAddress(BUF + 1), 100),
        (GuestAddress(BUF + 0x3003), bs - 100),
    ];
    vm.mem.fill(GuestAddress(BUF + 1), 100, 4).expect("fill");
    vm.mem
        .fill(GuestAddress(BUF + 0x3003), bs - 100, 5)
        .expect("fill");
    vm.ex
        .run_until(disk.write(2 * bs as u64, &odd, &vm.mem))
        .expect("bounced write");
    let back = vm.read(&disk, 2 * bs as u64, bs).expect("read");
    assert!(back[..100].iter().all(|&b| b == 4) && back[100..].iter().all(|&b| b == 5));
    vm.mem.fill(GuestAddress(BUF), 0x4000, 0).expect("clear");
    vm.ex
        .run_until(disk.read(2 * bs as u64, &odd, &vm.mem))
        .expect("bounced read");
    let mut head = [0u8; 100];
    vm.mem
        .read_slice(&mut head, GuestAddress(BUF + 1))
        .expect("read");
    assert!(head.iter().all(|&b| b == 4));
    drop(disk);
    let file = std::fs::read(&raw).expect("read file");
    assert!(file[2 * bs..2 * bs + 100].iter().all(|&b| b == 4));
    assert!(file[2 * bs + 100..3 * bs].iter().all(|&b| b == 5));
}
