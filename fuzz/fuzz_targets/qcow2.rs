//! Fuzzes qcow2 images: the fuzz bytes are an image file opened with `block::Disk::open`
//! (header, header extensions, backing file name, L1 and refcount tables), then read,
//! written, zeroed, discarded and flushed on the io_uring executor, which walks the L2 tables
//! and refcount blocks and allocates clusters. The image is untrusted: every corruption must
//! be an error, never a panic, a hang or an allocation sized by a header field.
//!
//! Backing files: a name made of `[A-Za-z0-9._-]` is kept and resolves next to the image,
//! where `base.raw` (a 64 KiB raw image) and the image itself (a loop) are; any other name,
//! which could reach any file of the host, is dropped by zeroing the backing file offset.
//!
//! Invariants checked: requests past the virtual size fail; a read-only image's file is never
//! changed; a write that succeeded reads back as written, and zeroes read back as zeros.
//!
//! Input layout: [flags (bit 0: read-only), 4 operations of 3 bytes (kind, offset in
//! 512-byte units, length in 512-byte units, modulo 65), image file].

#![no_main]

use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::OnceLock;

use block::{Disk, OpenOptions};
use executor::Executor;
use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};

const OPS: usize = 4;
const PREFIX: usize = 1 + 3 * OPS;
/// Guest buffers: data to write at `SRC`, reads land at `DST`.
const SRC: GuestAddress = GuestAddress(0);
const DST: GuestAddress = GuestAddress(0x20_0000);
/// Requests span up to 64 sectors: 64 clusters of the smallest size, a few of the largest.
const MAX_SECTORS: u64 = 64;

thread_local! {
    // Never dropped: `Executor`'s drop uses the executor's own thread-locals, which may be
    // gone when this one's destructor runs at exit.
    static EX: ManuallyDrop<Executor> =
        ManuallyDrop::new(Executor::new().expect("an io_uring executor"));
}

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| GuestMemory::new(&[(GuestAddress(0), 0x40_0000)]).expect("guest memory"))
}

/// A private directory with `base.raw`; the image goes at `img.qcow2`.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let root = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("ringvm-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz directory");
        let base: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("base.raw"), base).expect("backing image");
        dir
    })
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Drops a backing file name that could name a file outside the fuzz directory.
fn confine_backing(image: &mut [u8]) {
    let (Some(offset), Some(len)) = (be64(image, 8), be32(image, 16)) else {
        return;
    };
    if offset == 0 {
        return;
    }
    let name = usize::try_from(offset)
        .ok()
        .and_then(|o| image.get(o..o.checked_add(len as usize)?));
    let safe = |n: &[u8]| {
        !n.is_empty()
            && n.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
    };
    if !name.is_some_and(safe) {
        image[8..16].fill(0);
    }
}

async fn exercise(disk: &Disk, ops: &[u8], read_only: bool) {
    let mem = memory();
    let size = disk.size();
    for (i, op) in ops.chunks_exact(3).enumerate() {
        let offset = u64::from(op[1]) * 512;
        let len = (u64::from(op[2]) % (MAX_SECTORS + 1)) * 512;
        let beyond = offset.checked_add(len).is_none_or(|e| e > size);
        let bufs = |at: GuestAddress| vec![(at, len as usize)];
        let ok = match op[0] % 6 {
            0 => disk.read(offset, &bufs(DST), mem).await.is_ok(),
            1 => {
                let pattern = vec![0x11 * (i as u8 + 1); len as usize];
                mem.write_slice(&pattern, SRC).expect("guest memory");
                let ok = disk.write(offset, &bufs(SRC), mem).await.is_ok();
                if ok {
                    mem.fill(DST, len as usize, 0xee).expect("guest memory");
                    if disk.read(offset, &bufs(DST), mem).await.is_ok() {
                        let mut got = vec![0u8; len as usize];
                        mem.read_slice(&mut got, DST).expect("guest memory");
                        assert!(got == pattern, "a write did not read back");
                    }
                }
                ok
            }
            2 | 3 => {
                let unmap = op[0] % 6 == 3;
                let ok = disk.write_zeroes(offset, len, unmap).await.is_ok();
                if ok {
                    mem.fill(DST, len as usize, 0xee).expect("guest memory");
                    if disk.read(offset, &bufs(DST), mem).await.is_ok() {
                        let mut got = vec![0u8; len as usize];
                        mem.read_slice(&mut got, DST).expect("guest memory");
                        assert!(got.iter().all(|&b| b == 0), "zeroes did not read back");
                    }
                }
                ok
            }
            4 => disk.discard(offset, len).await.is_ok(),
            _ => disk.flush().await.is_ok(),
        };
        if ok && op[0] % 6 != 5 {
            assert!(
                !beyond,
                "request {offset:#x}+{len:#x} past the size {size:#x}"
            );
            assert!(!read_only || op[0] % 6 == 0, "a read-only disk was changed");
        }
    }
    // Whatever happened above, the metadata cache goes back to the file.
    let _ = disk.flush().await;
}

fuzz_target!(|data: &[u8]| {
    let Some((prefix, image)) = data.split_first_chunk::<PREFIX>() else {
        return;
    };
    let read_only = prefix[0] & 1 != 0;
    let mut image = image.to_vec();
    confine_backing(&mut image);
    let path = dir().join("img.qcow2");
    std::fs::write(&path, &image).expect("write the image");
    // The format given (the backing chain's formats are the header's): a probed image with a
    // backing file is refused before anything else, which would hide the chain from the
    // fuzzer.
    let options = OpenOptions {
        read_only,
        format: Some(block::Format::Qcow2),
        ..OpenOptions::default()
    };
    if let Ok(disk) = Disk::open(&path, options) {
        EX.with(|ex| ex.run_until(exercise(&disk, &prefix[1..], read_only)));
    }
    if read_only {
        let after = std::fs::read(&path).expect("read the image back");
        assert!(after == image, "a read-only image's file changed");
    }
});
