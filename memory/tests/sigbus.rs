//! The SIGBUS handler of device processes (`memory::fault`): a received region whose file
//! shrinks after it was mapped reads zeros where its pages went, and the fault is counted,
//! signalled and found by `check_backing`, instead of killing the process. Its own test
//! binary: the handler is process-wide.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use executor::{EventFdStream, Executor};
use memory::{fault, Error, GuestAddress, GuestMemory, RegionFd};

const SIZE: u64 = 0x10000;

/// An unlinked tmpfs file of `SIZE` bytes, filled with 0xaa.
fn shm_file() -> File {
    let path = format!("/dev/shm/ringvm-sigbus-test-{}", std::process::id());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create a tmpfs file");
    std::fs::remove_file(&path).expect("unlink");
    file.write_all_at(&[0xaa; SIZE as usize], 0).expect("fill");
    file
}

#[test]
fn a_shrunk_region_reads_zeros_and_the_fault_is_reported() {
    fault::install_sigbus_handler().expect("install");
    let file = shm_file();
    let mem = GuestMemory::from_regions(vec![RegionFd {
        fd: file.try_clone().expect("dup").into(),
        fd_offset: 0,
        size: SIZE,
        guest_addr: GuestAddress(0x10_0000),
        user_addr: 0x7f00_0000_0000,
    }])
    .expect("map");
    mem.check_backing().expect("intact");
    assert_eq!(fault::faults(), 0);

    file.set_len(0x4000).expect("shrink");
    // What is left is still the file's.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_3fff)).unwrap(), 0xaa);
    assert_eq!(fault::faults(), 0);
    // What went reads zeros, one fault per page touched.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_8000)).unwrap(), 0);
    assert_eq!(fault::faults(), 1);
    mem.write_obj(7u32, GuestAddress(0x10_c004)).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x10_c004)).unwrap(), 7);
    assert_eq!(fault::faults(), 2);
    assert!(
        matches!(
            mem.check_backing(),
            Err(Error::FdTooSmall {
                addr: GuestAddress(0x10_0000),
                needed: SIZE,
                actual: 0x4000
            })
        ),
        "{:?}",
        mem.check_backing()
    );

    // The notifier counted both faults.
    let notifier = fault::notifier().expect("installed").try_clone_to_owned();
    let mut stream = EventFdStream::new(notifier.expect("dup"));
    let ex = Executor::new().expect("executor");
    let count = ex
        .run_until(executor::timeout(
            Duration::from_secs(5),
            stream.next_value(),
        ))
        .expect("the handler wrote the notifier")
        .expect("read");
    assert_eq!(count, 2);
}
