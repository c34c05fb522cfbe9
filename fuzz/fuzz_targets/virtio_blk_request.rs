//! Fuzzes virtio-blk requests: a chain whose readable bytes (request header, discard /
//! write-zeroes segments, data), their split into buffers and the sizes of its writable
//! buffers all come from the fuzz bytes, laid out by the mock guest driver, popped from the
//! queue and served by `BlockDevice::process_chain` (the device's own request path) against a
//! raw disk, read-write or read-only. Descriptor-level malformations are the `virtqueue`
//! target's; this one is about what the device makes of a well-formed chain's contents.
//!
//! Invariants checked: the used length is 0 without a writable byte, otherwise it counts the
//! status byte and at most the writable bytes; the status is OK, IOERR or UNSUPP; an unknown
//! type is UNSUPP; a successful read fills every data byte, a successful GET_ID at most 20;
//! requests that would change a read-only disk fail, and its file never changes.
//!
//! Input layout: [flags (bit 0: read-only disk, bits 1-2: writable buffer count), two split
//! points, 3 writable lengths (le16), readable bytes].

#![no_main]

use std::mem::ManuallyDrop;
use std::path::PathBuf;

use block::device::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use block::{BlockDevice, BlockOptions, Disk, OpenOptions};
use executor::Executor;
use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockSplitQueue};

const RO_IMAGE: &[u8] = &[0x5a; 16 * 512];

struct Fixture {
    ex: Executor,
    mem: GuestMemory,
    rw: BlockDevice,
    ro: BlockDevice,
    ro_path: PathBuf,
}

fn fixture() -> Fixture {
    let shm = PathBuf::from("/dev/shm");
    let root = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    let dir = root.join(format!("ringvm-fuzz-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("fuzz directory");
    let rw_path = dir.join("rw.raw");
    let ro_path = dir.join("ro.raw");
    std::fs::write(&rw_path, vec![0u8; 64 * 1024]).expect("rw image");
    std::fs::write(&ro_path, RO_IMAGE).expect("ro image");
    let open = |path: &PathBuf, read_only| {
        let disk = Disk::open(
            path,
            OpenOptions {
                read_only,
                ..OpenOptions::default()
            },
        )
        .expect("open the image");
        let options = BlockOptions {
            id: Some("fuzz-serial-0123456789abcdef".into()),
            ..BlockOptions::default()
        };
        BlockDevice::new(disk, options)
    };
    Fixture {
        ex: Executor::new().expect("an io_uring executor"),
        mem: GuestMemory::new_x86(4 << 20).expect("guest memory"),
        rw: open(&rw_path, false),
        ro: open(&ro_path, true),
        ro_path,
    }
}

thread_local! {
    // Never dropped: `Executor`'s drop uses the executor's own thread-locals, which may be
    // gone when this one's destructor runs at exit.
    static FIXTURE: ManuallyDrop<Fixture> = ManuallyDrop::new(fixture());
}

fn run(f: &Fixture, data: &[u8]) -> Option<()> {
    let (&[flags, s0, s1, w0, w1, w2, w3, w4, w5], readable) = data.split_first_chunk::<9>()?;
    let read_only = flags & 1 != 0;
    let n_writable = usize::from((flags >> 1) & 3);
    let writable: Vec<u32> = [[w0, w1], [w2, w3], [w4, w5]][..n_writable]
        .iter()
        .map(|w| u32::from(u16::from_le_bytes(*w)) % 8193 + 1)
        .collect();
    let readable = &readable[..readable.len().min(4096)];
    let (s0, s1) = (usize::from(s0), usize::from(s1));
    let (a, b) = (s0.min(readable.len()), (s0 + s1).min(readable.len()));
    let mut bufs: Vec<MockBuf> = [&readable[..a], &readable[a..b], &readable[b..]]
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| MockBuf::Readable(r.to_vec()))
        .collect();
    bufs.extend(writable.iter().map(|&n| MockBuf::Writable(n)));
    if bufs.is_empty() {
        return None;
    }

    let mem = &f.mem;
    let mut driver = MockSplitQueue::new(mem, GuestAddress(0x1000), 16).expect("mock queue");
    let mut queue = driver.queue().expect("queue");
    let sent = driver
        .add_chain(&bufs)
        .expect("a chain of at most 6 buffers");
    let chain = queue
        .pop(mem)
        .expect("a well-formed chain")
        .expect("one chain");
    let device = if read_only { &f.ro } else { &f.rw };
    let (head, len) = f.ex.run_until(device.process_chain(mem, chain));
    assert_eq!(head, sent.head);

    let total: u32 = writable.iter().sum();
    if writable.is_empty() {
        assert_eq!(len, 0, "used length without a status byte");
        return Some(());
    }
    assert!(len >= 1 && len <= total, "used length {len} of {total}");
    let status = *driver
        .read_writable(&sent)
        .expect("writable bytes")
        .last()
        .expect("a status byte");
    assert!(status <= VIRTIO_BLK_S_UNSUPP, "status {status}");
    if readable.len() < 16 {
        assert_ne!(
            status, VIRTIO_BLK_S_OK,
            "a request without a header succeeded"
        );
        return Some(());
    }
    let kind = u32::from_le_bytes(readable[..4].try_into().expect("4 bytes"));
    let known = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ];
    if !known.contains(&kind) {
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP, "unknown type {kind}");
    }
    let changes = [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ];
    if read_only && changes.contains(&kind) {
        assert_ne!(status, VIRTIO_BLK_S_OK, "a read-only disk took type {kind}");
    }
    if status == VIRTIO_BLK_S_OK {
        match kind {
            VIRTIO_BLK_T_IN => assert_eq!(len, total, "a read left data bytes unwritten"),
            VIRTIO_BLK_T_GET_ID => assert_eq!(len - 1, (total - 1).min(20)),
            _ => assert_eq!(len, 1),
        }
    } else {
        assert_eq!(len, 1, "a failed request reports data written");
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|f| {
        let _ = run(f, data);
        if data.first().is_some_and(|flags| flags & 1 != 0) {
            let image = std::fs::read(&f.ro_path).expect("read the read-only image");
            assert!(image == RO_IMAGE, "the read-only image changed");
        }
    });
});
