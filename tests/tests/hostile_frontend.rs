//! The real device processes against a hostile vhost-user frontend ([`tests::hostile`]): each
//! test is one class of attack a compromised VMM (or any peer on the socket) can make, and
//! checks that the device neither dies nor wedges, and says what went wrong.
//!
//! The eight classes of the security review, and where each is driven through the real
//! process boundary:
//! 1. a guest racing the qcow2 magic into a probed raw image, and crafted backing files:
//!    `block_probing.rs` (libblkio as the frontend, a second thread flipping the buffer);
//! 2. errors and panics of a jailed device with backtraces asked for, 3. memory faults
//!    reported as what they are, 4. a flood of bad chains kept out of the host log:
//!    `device_deaths.rs`;
//! 5. guest memory shrunk under the device, 6. a saturated call eventfd, 7. GET_CONFIG
//!    outside the config space, 8. a kick without a descriptor: here (the harness also runs
//!    every device with `RUST_BACKTRACE=1`, class 2's trigger).
//!
//! Found later by fuzzing (`fuzz/fuzz_targets/vhost_user_backend.rs`), and here too: rings
//! laid over each other, so that the device always has one more malformed chain.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use executor::EventFd;
use tests::hostile::{vring, GuestRam, HostileFrontend};
use virtio::mock::MockBuf;
use virtio::vhost_user::{Body, Config, Error, Request, VringAddr, VringFd, VringState};
use virtio::VIRTIO_F_EVENT_IDX;

const EXIT_LIMIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
/// Guest RAM of every test: the queue's rings and its 1 MiB data area fit.
const RAM: u64 = 4 * MIB;

/// The features ringvm's frontend acknowledges, without EVENT_IDX: the device then signals
/// the call eventfd after every completion.
fn features_without_event_idx(h: &HostileFrontend) -> u64 {
    h.frontend().features() & !(1 << VIRTIO_F_EVENT_IDX)
}

/// Sets up ring 0 by hand, as `Frontend::start` would but at the addresses given (user
/// addresses): 16 entries from base 0, `kick` (`None`: the no-fd bit), `call`, enabled.
/// Returns the result of `SET_VRING_KICK`, which a device may refuse; the rest must succeed.
fn ring_by_hand(
    h: &HostileFrontend,
    desc: u64,
    used: u64,
    avail: u64,
    kick: Option<BorrowedFd<'_>>,
    call: BorrowedFd<'_>,
) -> Result<(), Error> {
    let state = |num| VringState { index: 0, num };
    h.request(Request::SetVringNum, &state(16), &[])
        .expect("SET_VRING_NUM");
    let addr = VringAddr {
        index: 0,
        flags: 0,
        desc,
        used,
        avail,
        log: 0,
    };
    h.request(Request::SetVringAddr, &addr, &[])
        .expect("SET_VRING_ADDR");
    h.request(Request::SetVringBase, &state(0), &[])
        .expect("SET_VRING_BASE");
    let kicked = match kick {
        Some(fd) => h.request(Request::SetVringKick, &VringFd::new(0, false), &[fd]),
        None => h.request(Request::SetVringKick, &VringFd::new(0, true), &[]),
    };
    h.request(Request::SetVringCall, &VringFd::new(0, false), &[call])
        .expect("SET_VRING_CALL");
    h.request(Request::SetVringEnable, &state(1), &[])
        .expect("SET_VRING_ENABLE");
    kicked
}

/// Class 5: the frontend shrinks a memory region's file after `SET_MEM_TABLE`. The device
/// must not die of SIGBUS when it next touches that memory: it ends with an error that says
/// what the frontend did.
#[test]
fn shrinking_guest_memory_after_set_mem_table_is_a_clear_error() {
    // Jailed, as ringvm runs devices, and without the sandbox (no seccomp to turn the death
    // into a SIGSYS: the plain SIGBUS).
    for args in [&[][..], &["--disable-sandbox"][..]] {
        let h = HostileFrontend::spawn("rng", args);
        let ram = GuestRam::unsealed(RAM);
        let mut queue = ram.queue(16);
        let (kick, call) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let features = features_without_event_idx(&h);
        h.block_on(h.frontend().start(
            features,
            &ram.mem,
            &[vring(0, &queue, kick.as_fd(), Some(call.as_fd()))],
        ))
        .expect("start");
        queue.add_chain(&[MockBuf::Writable(64)]).unwrap();
        // Everything the device maps is gone; the test touches the memory no more.
        ram.resize(0);
        kick.write(1).unwrap();
        // The device finds the hole when it reads the ring, and ends.
        let ended = tests::wait_until(EXIT_LIMIT, || !h.answers());
        let exit = h.disconnect(EXIT_LIMIT);
        assert!(ended, "{args:?}: the device went on as if nothing happened");
        assert!(
            exit.ended,
            "{args:?}: the device did not exit: {}",
            exit.stderr
        );
        assert_eq!(exit.status.signal(), None, "{args:?}: {}", exit.stderr);
        // A jailed device's death is reported by its parent: `killed by signal 7 (SIGBUS)`,
        // or SIGSYS when std's SIGBUS handler tries to reset itself under seccomp.
        assert!(
            !exit.stderr.contains("killed by signal"),
            "{args:?}: the jailed device died of a signal: {}",
            exit.stderr
        );
        assert!(
            exit.stderr
                .contains("the frontend shrank guest memory under the device")
                && exit
                    .stderr
                    .contains("the region at 0x0 needs 0x400000 bytes"),
            "{args:?}: no clear error about the shrunk memory: {}",
            exit.stderr
        );
    }
}

/// Class 6: the frontend hands over a call eventfd it has saturated (a write of 1 would
/// block until someone reads it, and the frontend never does). Signalling the guest must not
/// block the device: it goes on answering its control socket, and exits when the frontend
/// disconnects.
#[test]
fn a_saturated_call_eventfd_does_not_block_the_device() {
    let h = HostileFrontend::spawn("rng", &[]);
    let ram = GuestRam::sealed(RAM);
    let mut queue = ram.queue(16);
    let (kick, call) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    call.write(0xffff_ffff_ffff_fffe).unwrap();
    let features = features_without_event_idx(&h);
    h.block_on(h.frontend().start(
        features,
        &ram.mem,
        &[vring(0, &queue, kick.as_fd(), Some(call.as_fd()))],
    ))
    .expect("start");
    for round in 0..3 {
        queue.add_chain(&[MockBuf::Writable(64)]).unwrap();
        kick.write(1).unwrap();
        let used = tests::wait_until(EXIT_LIMIT, || matches!(queue.next_used(), Ok(Some(_))));
        assert!(used, "round {round}: the request was not completed");
        assert!(h.answers(), "round {round}: the device stopped answering");
    }
    // Every signal found the counter full: it is as the frontend left it, and once the
    // frontend reads it the next completion signals again.
    let mut calls = call.try_clone().unwrap().into_stream();
    let read = |calls: &mut executor::EventFdStream| {
        h.block_on(executor::timeout(EXIT_LIMIT, calls.next_value()))
            .expect("the call eventfd is signalled")
            .unwrap()
    };
    assert_eq!(read(&mut calls), 0xffff_ffff_ffff_fffe);
    queue.add_chain(&[MockBuf::Writable(64)]).unwrap();
    kick.write(1).unwrap();
    assert_eq!(read(&mut calls), 1);
    drop(calls);
    let exit = h.disconnect(EXIT_LIMIT);
    assert!(
        exit.ended,
        "the device did not exit when the frontend disconnected: {}",
        exit.stderr
    );
    assert!(exit.status.success(), "{}: {}", exit.status, exit.stderr);
}

/// The reply to a `GET_CONFIG` of `offset`/`size`, sent raw (the frontend's own `get_config`
/// refuses such ranges before sending them).
fn get_config(h: &HostileFrontend, offset: u32, size: u32) -> Result<Config, Error> {
    let request = Config {
        offset,
        size,
        flags: 0,
        payload: vec![0; size as usize],
    };
    let reply = h.get(Request::GetConfig, &request)?;
    Config::decode_framed(&reply).map_err(|e| Error::BadReply(Request::GetConfig, e))
}

/// Class 7: `GET_CONFIG` outside the 256-byte config space, or with an offset and size whose
/// sum overflows 32 bits. vhost-user.rst: the back-end answers with a zero-length payload to
/// indicate an error; it must not drop the connection.
#[test]
fn get_config_outside_the_config_space_gets_a_zero_length_reply() {
    let dir = tests::Scratch::new("hostile", "config-disk");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; MIB as usize]).unwrap();
    let file = format!("{},ro", disk.display());
    let h = HostileFrontend::spawn("block", &["--file", &file]);
    // In range: the block device's config (capacity first).
    let ok = get_config(&h, 0, 8).expect("an in-range GET_CONFIG is answered");
    assert_eq!((ok.offset, ok.size, ok.payload.len()), (0, 8, 8));
    for (offset, size) in [
        (250, 8),
        (256, 1),
        (0, 300),
        (u32::MAX, 4),
        (u32::MAX - 3, 8),
        (u32::MAX, 0),
    ] {
        let reply = get_config(&h, offset, size)
            .unwrap_or_else(|e| panic!("GET_CONFIG {offset:#x}+{size}: no reply: {e:?}"));
        assert_eq!(reply.size, 0, "GET_CONFIG {offset:#x}+{size}");
        assert!(reply.payload.is_empty(), "GET_CONFIG {offset:#x}+{size}");
        assert!(h.answers(), "after GET_CONFIG {offset:#x}+{size}");
    }
    let exit = h.disconnect(EXIT_LIMIT);
    assert!(exit.ended, "{}", exit.stderr);
    assert!(exit.status.success(), "{}: {}", exit.status, exit.stderr);
}

/// Class 8: `SET_VRING_KICK` with the no-fd bit ("polling should be used instead of waiting
/// for the kick"). The device must either poll the ring or refuse the request so the
/// frontend knows; acknowledging it and never processing the queue is neither.
#[test]
fn nofd_kick_is_refused_or_the_ring_is_polled() {
    let h = HostileFrontend::spawn("rng", &[]);
    assert!(h.reply_ack(), "the device offers REPLY_ACK");
    let ram = GuestRam::sealed(RAM);
    let mut queue = ram.queue(16);
    let call = EventFd::new().unwrap();
    let features = features_without_event_idx(&h);
    // Features and the memory table by the book; the ring by hand.
    h.block_on(h.frontend().start(features, &ram.mem, &[]))
        .expect("start");
    let user = |addr| ram.user_addr(addr);
    let kick = ring_by_hand(
        &h,
        user(queue.desc_table()),
        user(queue.used_addr()),
        user(queue.avail_addr()),
        None,
        call.as_fd(),
    );
    match kick {
        Err(Error::BackendFailed { .. }) => {}
        Ok(()) => {
            queue.add_chain(&[MockBuf::Writable(64)]).unwrap();
            let polled = tests::wait_until(
                EXIT_LIMIT,
                || matches!(queue.used_idx(), Ok(idx) if idx == 1),
            );
            assert!(
                polled,
                "SET_VRING_KICK without an fd was acknowledged, but the ring is never processed"
            );
        }
        Err(e) => panic!("SET_VRING_KICK without an fd: {e:?}"),
    }
    assert!(h.answers());
    let exit = h.disconnect(EXIT_LIMIT);
    assert!(exit.ended, "{}", exit.stderr);
}

/// A ring laid over itself: the descriptor table, the avail ring and the used ring at one
/// address, the used entries one ahead of the available ones. Every used entry the device
/// writes moves the shared index on by one and makes another malformed chain available, so
/// the device always has one more chain to skip, and none needs I/O. It must still answer
/// its socket and stop the ring when asked, not spin in one endless poll.
#[test]
fn rings_laid_over_each_other_do_not_wedge_the_device() {
    let h = HostileFrontend::spawn("rng", &[]);
    let ram = GuestRam::sealed(RAM);
    let queue = ram.queue(16);
    let (kick, call) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    let features = features_without_event_idx(&h);
    h.block_on(h.frontend().start(features, &ram.mem, &[]))
        .expect("start");
    let state = |num| VringState { index: 0, num };
    let at = queue.desc_table();
    let user = ram.user_addr(at);
    // The shared index is 1 when the ring starts: one chain available (from base 0), and
    // used entries that continue from 1, so each one the device adds makes one more
    // available. Head 0's descriptor has length zero.
    ram.mem
        .write_slice(&1u16.to_le_bytes(), memory::GuestAddress(at.0 + 2))
        .unwrap();
    ring_by_hand(&h, user, user, user, Some(kick.as_fd()), call.as_fd()).unwrap();
    kick.write(1).unwrap();
    // The device is skipping chains now, and keeps finding more: the shared index moves.
    let index_at = memory::GuestAddress(at.0 + 2);
    assert!(
        tests::wait_until(EXIT_LIMIT, || {
            matches!(ram.mem.read_obj::<u16>(index_at), Ok(i) if i > 2)
        }),
        "the device gives the chains back"
    );
    assert!(
        h.answers(),
        "the device answers while its ring feeds itself"
    );
    let base = h
        .get(Request::GetVringBase, &state(0))
        .expect("the ring stops when asked");
    let base = VringState::decode(&base).expect("a vring state");
    assert!(base.num > 1, "it skipped more than the one chain: {base:?}");
    assert!(h.answers());
    let exit = h.disconnect(EXIT_LIMIT);
    assert!(exit.ended, "{}", exit.stderr);
}
