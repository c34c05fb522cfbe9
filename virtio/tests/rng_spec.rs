//! The rng backend driven by a frontend written from the specification (QEMU
//! `docs/interop/vhost-user.rst`), not through `virtio::vhost_user`: every header and body is
//! encoded by hand here and goes over the socket with `sendmsg` (fds as SCM_RIGHTS). The
//! guest is a MockSplitQueue-laid-out ring in a memfd guest memory whose fd goes with
//! SET_MEM_TABLE, under a made-up frontend address the backend must translate through the
//! table.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use executor::{AsyncFd, EventFd, Executor};
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockSplitQueue};
use virtio::vhost_user::{serve, Connection};
use virtio::Rng;

// Message codes (vhost-user.rst, "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
// Header flags: version 1 in bits 0-1, reply bit 2, need-reply bit 3.
const V1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
// Feature bits.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_MQ: u64 = 1 << 0;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

const FRONTEND_UADDR: u64 = 0x7f00_dead_0000;
const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: u64 = 4 << 20;

fn message(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// "A vring state description": index u32, num u32.
fn state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

struct SpecFrontend {
    sock: AsyncFd,
}

impl SpecFrontend {
    async fn send(&self, code: u32, flags: u32, body: &[u8], fds: &[BorrowedFd<'_>]) {
        let bytes = message(code, flags, body);
        let len = bytes.len();
        let (res, _) = self.sock.sendmsg(bytes, fds).await;
        assert_eq!(res.unwrap(), len);
    }

    async fn read_exact(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (res, buf) = self
                .sock
                .recvmsg(Vec::with_capacity(n - out.len()), 0)
                .await;
            let got = res.unwrap();
            assert!(got.len > 0, "the backend closed the connection");
            assert!(got.fds.is_empty());
            out.extend_from_slice(&buf[..got.len]);
        }
        out
    }

    /// Reads a reply: checks its code and flags, returns its body.
    async fn reply(&self, code: u32) -> Vec<u8> {
        let header = executor::timeout(Duration::from_secs(5), self.read_exact(12))
            .await
            .expect("a reply");
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), code, "the reply answers the request");
        assert_eq!(word(4), V1 | REPLY);
        self.read_exact(word(8) as usize).await
    }

    async fn get_u64(&self, code: u32) -> u64 {
        self.send(code, V1, &[], &[]).await;
        u64::from_le_bytes(self.reply(code).await.try_into().unwrap())
    }

    /// Sends with NEED_REPLY and checks the REPLY_ACK's u64 is 0 (success).
    async fn acked(&self, code: u32, body: &[u8], fds: &[BorrowedFd<'_>]) {
        self.send(code, V1 | NEED_REPLY, body, fds).await;
        assert_eq!(
            self.reply(code).await,
            0u64.to_le_bytes(),
            "request {code} acked"
        );
    }
}

#[test]
fn rng_backend_serves_entropy_to_a_frontend_written_from_the_spec() {
    let (front, back) = executor::socketpair().unwrap();
    let back = back.into_owned().unwrap();
    let backend = std::thread::spawn(move || {
        let entropy: OwnedFd = File::open("/dev/urandom").unwrap().into();
        let ex = Executor::new().unwrap();
        ex.run_until(serve(
            Rc::new(Rng::new(entropy)),
            Connection::new(AsyncFd::new(back)),
        ))
    });

    let ex = Executor::new().unwrap();
    let mem = GuestMemory::new(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut driver = MockSplitQueue::new(&mem, GuestAddress(0x1000), QUEUE_SIZE).unwrap();
    let kick = EventFd::new().unwrap();
    let call = EventFd::new().unwrap();
    let mut calls = call.try_clone().unwrap().into_stream();
    let fe = SpecFrontend { sock: front };

    ex.run_until(async {
        fe.send(SET_OWNER, V1, &[], &[]).await;
        let features = fe.get_u64(GET_FEATURES).await;
        assert_ne!(features & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        let protocol = fe.get_u64(GET_PROTOCOL_FEATURES).await;
        assert_ne!(protocol & PROTOCOL_F_REPLY_ACK, 0);
        assert_ne!(protocol & PROTOCOL_F_MQ, 0);
        fe.send(
            SET_PROTOCOL_FEATURES,
            V1,
            &u64_body(PROTOCOL_F_REPLY_ACK | PROTOCOL_F_MQ),
            &[],
        )
        .await;
        assert_eq!(fe.get_u64(GET_QUEUE_NUM).await, 1);
        fe.acked(
            SET_FEATURES,
            &u64_body(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES),
            &[],
        )
        .await;

        // "Memory regions description": num_regions u32, padding u32, then per region
        // guest address, size, user address, mmap offset (u64 each); one fd per region.
        let region = mem.regions().next().unwrap();
        let mut table = Vec::new();
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        for v in [0, MEM_SIZE, FRONTEND_UADDR, region.fd_offset] {
            table.extend_from_slice(&u64::to_le_bytes(v));
        }
        fe.acked(SET_MEM_TABLE, &table, &[region.fd]).await;

        fe.acked(SET_VRING_NUM, &state(0, u32::from(QUEUE_SIZE)), &[])
            .await;
        // "Vring address description": index u32, flags u32, descriptor, used, available,
        // log (u64 each), in the frontend's address space.
        let uaddr = |a: GuestAddress| FRONTEND_UADDR + a.0;
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            uaddr(driver.desc_table()),
            uaddr(driver.used_addr()),
            uaddr(driver.avail_addr()),
            0,
        ] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        fe.acked(SET_VRING_ADDR, &addr, &[]).await;
        fe.acked(SET_VRING_BASE, &state(0, 0), &[]).await;
        // u64: queue index in bits 0-7; bit 8 clear: an fd comes with it.
        fe.acked(SET_VRING_CALL, &u64_body(0), &[call.as_fd()])
            .await;
        fe.acked(SET_VRING_KICK, &u64_body(0), &[kick.as_fd()])
            .await;
        fe.acked(SET_VRING_ENABLE, &state(0, 1), &[]).await;

        for round in 0..3 {
            let sent = driver
                .add_chain(&[MockBuf::Writable(40), MockBuf::Writable(24)])
                .unwrap();
            kick.write(1).unwrap();
            executor::timeout(Duration::from_secs(5), calls.next_value())
                .await
                .expect("the backend signals the call fd")
                .unwrap();
            let used = driver.next_used().unwrap().expect("a used entry");
            assert_eq!(
                (used.id, used.len),
                (u32::from(sent.head), 64),
                "round {round}"
            );
            let entropy = driver.read_writable(&sent).unwrap();
            assert!(
                entropy.iter().filter(|&&b| b == 0).count() < 16,
                "random bytes"
            );
        }

        fe.send(GET_VRING_BASE, V1, &state(0, 0), &[]).await;
        assert_eq!(fe.reply(GET_VRING_BASE).await, state(0, 3));
    });
    drop(fe);
    let result = backend.join().unwrap();
    assert!(result.is_ok(), "{result:?}");
}
