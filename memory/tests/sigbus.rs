//! The SIGBUS handler of device processes (`memory::fault`): a received region whose file
//! shrinks after it was mapped reads zeros where its pages went, and the fault is counted,
//! signalled and found by `check_backing`, instead of killing the process. Its own test
//! binary: the handler is process-wide.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use executor::{EventFdStream, Executor};
use memory::{fault, Error, GuestAddress, GuestMemory, RegionFd};

const SIZE: u64 = 0x10000;

/// Set in the child process of `a_fault_outside_guarded_memory_ends_the_process`.
const CHILD_ENV: &str = "RINGVM_SIGBUS_TEST_CHILD";

/// An unlinked tmpfs file of `SIZE` bytes, filled with 0xaa.
fn shm_file() -> File {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = format!("/dev/shm/ringvm-sigbus-test-{}-{n}", std::process::id());
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

/// Memory mapped before the handler was installed is not guarded: a fault there is not
/// survived, and the process dies by SIGBUS after a line on stderr (without calling
/// sigaction, which a device's seccomp policy refuses). Runs in a child process (this test
/// binary, running `unguarded_fault_child` only).
#[test]
fn a_fault_outside_guarded_memory_ends_the_process() {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "unguarded_fault_child", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{stderr}");
    assert!(
        stderr.contains("ringvm: SIGBUS outside guest memory a frontend sent"),
        "{stderr}"
    );
}

/// The child of `a_fault_outside_guarded_memory_ends_the_process`; does nothing elsewhere.
#[test]
fn unguarded_fault_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let file = shm_file();
    let mem = GuestMemory::from_regions(vec![RegionFd {
        fd: file.try_clone().expect("dup").into(),
        fd_offset: 0,
        size: SIZE,
        guest_addr: GuestAddress(0),
        user_addr: 0,
    }])
    .expect("map");
    fault::install_sigbus_handler().expect("install");
    file.set_len(0).expect("shrink");
    let _ = mem.read_obj::<u8>(GuestAddress(0));
    unreachable!("the read faults and the handler ends the process");
}
