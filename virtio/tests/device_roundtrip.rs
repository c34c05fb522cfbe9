//! The data path the way a device process runs it, in one test process: the "VMM" owns
//! guest memory and plays the guest driver with the mock; the "device" thread maps the same
//! memory from duplicated fds (as after vhost-user SET_MEM_TABLE), runs an `AsyncQueue` on its
//! own executor, and answers each request by writing it back reversed, half by copy and half
//! by a zero-copy io_uring read into the chain's writable buffers. Kicks and calls cross the
//! threads on eventfds, with EVENT_IDX on.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use executor::{AsyncFd, EventFd, Executor};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockSplitQueue};
use virtio::{AsyncQueue, Queue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};

const REQUESTS: usize = 200;

fn device_memory(vmm: &GuestMemory) -> GuestMemory {
    let regions = vmm
        .regions()
        .map(|r| r.to_region_fd().expect("dup"))
        .collect();
    GuestMemory::from_regions(regions).expect("device memory")
}

/// The device: reverse each request into its writable buffers; the second half of the reply
/// comes from a socket through io_uring straight into guest memory.
fn device(mem: GuestMemory, queue: Queue, kick: EventFd, call: EventFd, peer: UnixStream) {
    let ex = Executor::new().expect("executor");
    let q = AsyncQueue::new(queue, mem, kick.into_stream(), call);
    let sock = AsyncFd::new(peer.into());
    ex.run_until(async {
        for _ in 0..REQUESTS {
            let chain = q.next_chain().await.expect("valid chain");
            let mut request = Vec::new();
            chain
                .reader(q.memory())
                .read_to_end(&mut request)
                .expect("read request");
            request.reverse();
            let half = request.len() / 2;
            let mut w = chain.writer(q.memory());
            w.write_all_bytes(&request[..half]).expect("copy half");
            let iov = w.iovecs(request.len() - half).expect("iovecs");
            let (res, _) = sock.read_mem_at(iov, 0).await;
            let n = res.expect("zero-copy half");
            assert_eq!(n, request.len() - half);
            w.consume(n);
            q.complete(chain.head_index(), w.bytes_written() as u32)
                .expect("used");
        }
    });
}

#[test]
fn device_process_answers_over_shared_memory() {
    let vmm = GuestMemory::new_x86(64 << 20).expect("memory");
    let mut driver = MockSplitQueue::new(&vmm, GuestAddress(0x10000), 64).expect("mock");
    let features = (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC);
    let queue = driver.queue_with_features(features).expect("queue");
    let kick = EventFd::new().expect("kick");
    let call = EventFd::new().expect("call");
    let (mut vmm_sock, dev_sock) = UnixStream::pair().expect("socket pair");

    let dev_mem = device_memory(&vmm);
    let (dev_kick, dev_call) = (
        kick.try_clone().expect("dup"),
        call.try_clone().expect("dup"),
    );
    let dev = std::thread::spawn(move || device(dev_mem, queue, dev_kick, dev_call, dev_sock));

    let mut calls = EventFd::from(std::os::fd::OwnedFd::from(call)).into_stream();
    let ex = Executor::new().expect("executor");
    for i in 0..REQUESTS {
        let request: Vec<u8> = (0..(i % 50 + 2) as u8).collect();
        let mut reversed = request.clone();
        reversed.reverse();
        let half = request.len() / 2;
        let bufs = [
            MockBuf::Readable(request[..3.min(request.len())].to_vec()),
            MockBuf::Readable(request[3.min(request.len())..].to_vec()),
            MockBuf::Writable(1),
            MockBuf::Writable(request.len() as u32 - 1),
        ];
        let bufs: Vec<MockBuf> = bufs
            .into_iter()
            .filter(|b| !matches!(b, MockBuf::Readable(d) if d.is_empty()))
            .collect();
        let old = driver.avail_idx();
        let sent = if i % 2 == 0 {
            driver.add_chain(&bufs)
        } else {
            driver.add_indirect_chain(&bufs)
        }
        .expect("submit");
        if driver.needs_kick(true, old).expect("kick check") {
            kick.write(1).expect("kick");
        }
        std::io::Write::write_all(&mut vmm_sock, &reversed[half..]).expect("second half");
        driver
            .set_used_event(driver.avail_idx().wrapping_sub(1))
            .expect("used_event");
        let used = loop {
            if let Some(u) = driver.next_used().expect("used ring") {
                break u;
            }
            ex.run_until(executor::timeout(
                Duration::from_secs(10),
                calls.next_value(),
            ))
            .expect("a call within 10 s")
            .expect("call eventfd");
        };
        assert_eq!(used.id, u32::from(sent.head));
        assert_eq!(used.len as usize, request.len());
        assert_eq!(driver.read_writable(&sent).expect("reply"), reversed);
    }
    dev.join().expect("device thread");
}
