//! Fuzzes the vhost-user backend as a state machine: a hostile frontend sends any sequence of
//! requests, with the descriptors each takes, to the real server (`serve_with_inflight`)
//! running the rng device, whose queue reads guest memory the input also fills. Memory tables
//! swapped while queues run, rings that start and stop, bases set and read back, inflight
//! regions of any shape, config reads and writes, resets and kicks, in any order. The
//! backend must answer or close, never panic, and never hang: once the frontend closes its
//! end, `serve` must end within a few seconds.
//!
//! Every device process serves its queues through this code, so what holds here holds for
//! block, net, vsock and console too; their own queue handling is fuzzed elsewhere
//! (`virtqueue`, `virtio_blk_request`, `virtio_net_hdr`, `vsock_packet`).
//!
//! Input layout: [length of the memory image (u16), the image (copied to guest address 0),
//! then 17-byte operations: kind, then 16 bytes of parameters].

#![no_main]

use std::fs::File;
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

use executor::{EventFd, Executor};
use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};
use virtio::vhost_user::message::{Body, Config, Header, Message, Request, FLAG_NEED_REPLY};
use virtio::vhost_user::{reserve_inflight, serve_with_inflight, Connection};
use virtio::Rng;

thread_local! {
    // Never dropped: `Executor`'s drop uses the executor's own thread-locals, which may be
    // gone when this one's destructor runs at exit.
    static EX: ManuallyDrop<Executor> =
        ManuallyDrop::new(Executor::new().expect("an io_uring executor"));
}

const MEM_SIZE: u64 = 0x10000;
/// How long the backend may take to end once the frontend closed.
const END: Duration = Duration::from_secs(5);

/// One guest memory, made once: its first bytes are the input's image.
fn memory() -> &'static GuestMemory {
    static MEM: std::sync::OnceLock<GuestMemory> = std::sync::OnceLock::new();
    MEM.get_or_init(|| GuestMemory::new(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"))
}

/// A request with `body` as it is (NEED_REPLY when asked), in the project's own encoding.
fn message(request: Request, need_reply: bool, body: Vec<u8>) -> Vec<u8> {
    let flags = if need_reply { FLAG_NEED_REPLY } else { 0 };
    let header = Header::new(request, flags, body.len() as u32);
    Message { header, body }.encode()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The memory's one region as `SET_MEM_TABLE` and `ADD_MEM_REG` describe it, with the guest
/// and user addresses and the size bent as the parameters say.
fn region(p: &[u8; 16]) -> Vec<u8> {
    let mem = memory().regions().next().expect("one region");
    let bend = p[8];
    let gpa = if bend & 1 == 0 {
        0
    } else {
        u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
    };
    let size = if bend & 2 == 0 {
        mem.size
    } else {
        u64::from(u16::from_le_bytes([p[4], p[5]])) << 4
    };
    let user = if bend & 4 == 0 {
        mem.user_addr
    } else {
        u64::from_le_bytes(*p.first_chunk().unwrap())
    };
    let offset = if bend & 8 == 0 {
        mem.fd_offset
    } else {
        u64::from(p[6]) << 12
    };
    cat(&[
        &gpa.to_le_bytes(),
        &size.to_le_bytes(),
        &user.to_le_bytes(),
        &offset.to_le_bytes(),
    ])
}

fn u16_at(p: &[u8; 16], at: usize) -> u16 {
    u16::from_le_bytes([p[at], p[at + 1]])
}

/// A memfd of `len` bytes, for an inflight region the frontend hands over.
fn memfd(len: u64) -> OwnedFd {
    // SAFETY: a plain system call with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone().expect("dup"))
        .set_len(len)
        .expect("ftruncate");
    fd
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let image_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (image, ops) = rest.split_at(image_len.min(rest.len()));
    let mem = memory();
    let mut start = vec![0u8; 0x4000];
    let n = image.len().min(start.len());
    start[..n].copy_from_slice(&image[..n]);
    mem.write_slice(&start, GuestAddress(0))
        .expect("guest memory");

    let (front, back) = UnixStream::pair().expect("socketpair");
    let entropy: OwnedFd = File::open("/dev/zero").expect("/dev/zero").into();
    let queues: Vec<(EventFd, EventFd)> = (0..2)
        .map(|_| {
            (
                EventFd::new().expect("eventfd"),
                EventFd::new().expect("eventfd"),
            )
        })
        .collect();

    EX.with(|ex| {
        ex.run_until(async {
            let front_fd = front.try_clone().expect("dup");
            let front = Rc::new(Connection::new(executor::AsyncFd::new(OwnedFd::from(
                front,
            ))));
            let back = Connection::new(executor::AsyncFd::new(OwnedFd::from(back)));
            let inflight = reserve_inflight(1, 256).expect("an inflight pool");
            let server = executor::spawn(serve_with_inflight(
                Rc::new(Rng::new(entropy)),
                back,
                Some(inflight),
            ));
            // Replies are read and dropped, so the backend never waits on a full socket.
            let reader = front.clone();
            let drain =
                executor::spawn(async move { while let Ok(Some(_)) = reader.recv().await {} });

            for op in ops.chunks_exact(17) {
                let p: [u8; 16] = op[1..].try_into().unwrap();
                let reply = p[15] & 0x80 != 0;
                let q = usize::from(p[0] % 2);
                let index = u32::from(p[0] % 3);
                let state = |num: u32| cat(&[&index.to_le_bytes(), &num.to_le_bytes()]);
                let region_fd = mem.regions().next().unwrap().fd;
                let inflight_fd;
                let (code, body, fds): (Request, Vec<u8>, Vec<BorrowedFd<'_>>) = match op[0] % 24 {
                    0 => (Request::SetOwner, vec![], vec![]),
                    1 => (Request::GetFeatures, vec![], vec![]),
                    2 => (Request::SetFeatures, p[..8].to_vec(), vec![]),
                    3 => (Request::GetProtocolFeatures, vec![], vec![]),
                    4 => (Request::SetProtocolFeatures, p[..8].to_vec(), vec![]),
                    5 => {
                        let table = cat(&[&1u32.to_le_bytes(), &0u32.to_le_bytes(), &region(&p)]);
                        (Request::SetMemTable, table, vec![region_fd])
                    }
                    6 => (
                        Request::AddMemReg,
                        cat(&[&[0; 8], &region(&p)]),
                        vec![region_fd],
                    ),
                    7 => (Request::RemMemReg, cat(&[&[0; 8], &region(&p)]), vec![]),
                    8 => (
                        Request::SetVringNum,
                        state(u32::from(u16_at(&p, 1))),
                        vec![],
                    ),
                    9 => {
                        // Rings at offsets into the image (or anywhere, as the flags say).
                        let user = mem.regions().next().unwrap().user_addr;
                        let at = |o: u16| {
                            if p[14] & 1 == 0 {
                                user + u64::from(o & 0x3ff0)
                            } else {
                                u64::from(o) << 16
                            }
                        };
                        let addr = cat(&[
                            &index.to_le_bytes(),
                            &u32::from(p[13] & 1).to_le_bytes(),
                            &at(u16_at(&p, 1)).to_le_bytes(),
                            &at(u16_at(&p, 3)).to_le_bytes(),
                            &at(u16_at(&p, 5)).to_le_bytes(),
                            &0u64.to_le_bytes(),
                        ]);
                        (Request::SetVringAddr, addr, vec![])
                    }
                    10 => (
                        Request::SetVringBase,
                        state(u32::from(u16_at(&p, 1))),
                        vec![],
                    ),
                    11 => (Request::GetVringBase, state(0), vec![]),
                    12 | 13 => {
                        let nofd = p[1] & 1 != 0;
                        let v = u64::from(index) | if nofd { 0x100 } else { 0 };
                        let (kick, call) = &queues[q];
                        let fd = if op[0] % 24 == 12 {
                            kick.as_fd()
                        } else {
                            call.as_fd()
                        };
                        let code = if op[0] % 24 == 12 {
                            Request::SetVringKick
                        } else {
                            Request::SetVringCall
                        };
                        (
                            code,
                            v.to_le_bytes().to_vec(),
                            if nofd { vec![] } else { vec![fd] },
                        )
                    }
                    14 => (Request::SetVringEnable, state(u32::from(p[1] & 1)), vec![]),
                    15 => (Request::GetQueueNum, vec![], vec![]),
                    16 | 17 => {
                        // GET_CONFIG asks with zeroes; SET_CONFIG brings bytes.
                        let get = op[0] % 24 == 16;
                        let size = if get { p[5] % 16 } else { p[5] % 9 };
                        let payload = if get {
                            vec![0; usize::from(size)]
                        } else {
                            p[6..6 + usize::from(size)].to_vec()
                        };
                        let config = Config {
                            offset: u32::from(p[1]),
                            size: u32::from(size),
                            flags: 0,
                            payload,
                        };
                        let code = if get {
                            Request::GetConfig
                        } else {
                            Request::SetConfig
                        };
                        (code, config.to_bytes(), vec![])
                    }
                    18 => (Request::ResetDevice, vec![], vec![]),
                    19 => (Request::GetMaxMemSlots, vec![], vec![]),
                    20 => {
                        let body = cat(&[
                            &[0; 16],
                            &u16::from(p[1] % 4).to_le_bytes(),
                            &u16_at(&p, 2).to_le_bytes(),
                            &[0; 4],
                        ]);
                        (Request::GetInflightFd, body, vec![])
                    }
                    21 => {
                        let size = u64::from(u16_at(&p, 4)) << 4;
                        let body = cat(&[
                            &size.to_le_bytes(),
                            &u64::from(p[6] & 0xf0).to_le_bytes(),
                            &u16::from(p[1] % 4).to_le_bytes(),
                            &u16_at(&p, 2).to_le_bytes(),
                            &[0; 4],
                        ]);
                        inflight_fd = memfd(u64::from(u16_at(&p, 7)) << 4);
                        (Request::SetInflightFd, body, vec![inflight_fd.as_fd()])
                    }
                    // A kick: the driver added something to the ring (in the image).
                    22 => {
                        let _ = queues[q].0.write(1);
                        executor::yield_now().await;
                        continue;
                    }
                    // Let the queue tasks run a while.
                    _ => {
                        let _ = executor::sleep(Duration::from_micros(u64::from(p[1]) * 10)).await;
                        continue;
                    }
                };
                if front.send(message(code, reply, body), &fds).await.is_err() {
                    break;
                }
                executor::yield_now().await;
            }
            // The frontend hangs up: the backend stops its queues and returns.
            front_fd.shutdown(Shutdown::Both).expect("shutdown");
            let ended = executor::timeout(END, server).await;
            assert!(
                ended.is_ok(),
                "the backend did not end within {END:?} of the hang-up"
            );
            drain.await;
        })
    });
});
