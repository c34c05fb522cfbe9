//! A mock guest driver for the vsock device's three queues, for tests in this crate and the
//! end-to-end tests of the real device process (`test-utils` feature). A test driver: what
//! goes wrong panics, and so fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use executor::EventFd;
use memory::{GuestAddress, GuestMemory};
use virtio::mock::{MockBuf, MockChain, MockSplitQueue};
use virtio::vhost_user::VringConfig;

use crate::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};

/// How long a wait for the device or a host stream may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The guest: memory, three queues, their kick and call eventfds.
pub struct Guest {
    pub mem: GuestMemory,
    pub queues: Vec<MockSplitQueue>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub rx: HashMap<u16, MockChain>,
    /// The guest's CID (the source of what it sends).
    pub cid: u64,
}

impl Guest {
    /// A guest with CID `cid`, 64 MiB of memory and 32 receive buffers posted.
    pub fn new(cid: u64) -> Guest {
        let mem = GuestMemory::new_x86(64 << 20).unwrap();
        let mut g = Guest {
            queues: Guest::layout(&mem),
            mem,
            kicks: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            calls: (0..3).map(|_| EventFd::new().unwrap()).collect(),
            rx: HashMap::new(),
            cid,
        };
        g.post_rx(32);
        g
    }

    /// Three queues of 64 in `mem`, each with its own data area.
    pub fn layout(mem: &GuestMemory) -> Vec<MockSplitQueue> {
        (0..3u64)
            .map(|i| {
                MockSplitQueue::with_data_area(
                    mem,
                    GuestAddress(0x10_0000 + i * 0x10_0000),
                    64,
                    GuestAddress((8 + 8 * i) << 20),
                    8 << 20,
                )
                .unwrap()
            })
            .collect()
    }

    /// The rings as the frontend hands them to the device.
    pub fn vrings(&self) -> Vec<VringConfig<'_>> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| VringConfig {
                index: i as u32,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_addr(),
                used: q.used_addr(),
                base: 0,
                kick: self.kicks[i].as_fd(),
                call: Some(self.calls[i].as_fd()),
            })
            .collect()
    }

    /// Posts `n` receive buffers (a header and 4 KiB each) and kicks.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let c = self.queues[0]
                .add_chain(&[MockBuf::Writable(HEADER_SIZE as u32 + 4096)])
                .unwrap();
            self.rx.insert(c.head, c);
        }
        self.kicks[0].write(1).unwrap();
    }

    /// Sends one packet from guest port `src_port` to host port `dst_port`.
    pub fn send(&mut self, src_port: u32, dst_port: u32, op: Op, payload: &[u8]) {
        // Chains the device has used give their descriptors back.
        while self.queues[1].next_used().unwrap().is_some() {}
        let hdr = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op: op.to_u16(),
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        let mut bufs = vec![MockBuf::Readable(hdr.encode().to_vec())];
        if !payload.is_empty() {
            bufs.push(MockBuf::Readable(payload.to_vec()));
        }
        self.queues[1].add_chain(&bufs).unwrap();
        self.kicks[1].write(1).unwrap();
    }

    /// The next packet for the guest (polling the used ring).
    pub async fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            while self.queues[1].next_used().unwrap().is_some() {}
            if let Some(u) = self.queues[0].next_used().unwrap() {
                let chain = self.rx.remove(&(u.id as u16)).unwrap();
                let bytes = self.queues[0].read_writable(&chain).unwrap();
                let hdr = Header::decode(bytes[..HEADER_SIZE].try_into().unwrap());
                let data = bytes[HEADER_SIZE..HEADER_SIZE + hdr.len as usize].to_vec();
                self.post_rx(1);
                return (hdr, data);
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            executor::sleep(Duration::from_millis(1)).await.unwrap();
        }
    }
}

/// Reads `n` bytes from a nonblocking host stream, letting the executor run meanwhile.
pub async fn host_read(host: &mut UnixStream, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        let mut buf = [0u8; 4096];
        match host.read(&mut buf) {
            Ok(0) => panic!("end of file"),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no host data");
                executor::sleep(Duration::from_millis(1)).await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    got
}
