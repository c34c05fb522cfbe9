//! Fuzzes the frontend -> backend direction of vhost-user: what a device process decodes from
//! the VMM (or from any other frontend on its socket). A message is the header, its body and
//! the number of fds that came with it; [`Message::decode`] must refuse every malformed one
//! with an error and accept only messages whose body decodes and validates.
//!
//! Invariants checked on what is accepted: the message re-encodes to the same bytes, its body
//! re-encodes to the same body bytes and validates again, it came with exactly the fds its
//! body takes, and a memory table has at most 8 regions, none empty, none wrapping, no two
//! overlapping (checked here independently of `MemTable::validate`). Every body type is also
//! decoded from the raw bytes directly, so each `Body::decode` sees every input.
//!
//! An accepted `SET_MEM_TABLE` or `ADD_MEM_REG` is then mapped as the backend maps it
//! (`GuestMemory::from_regions`), each region from one of a few memfds of different sizes:
//! a mapping that succeeds must lie inside its fd, and the first and last byte of every
//! region must be readable (a mapping past the end of its fd would raise SIGBUS here).
//!
//! Input layout: [fd count (mod 10), message bytes].

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory, RegionFd};
use virtio::vhost_user::message::{
    FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE, MAX_BODY_SIZE, VERSION,
};
use virtio::vhost_user::{Body, Header, MemTable, MemoryRegion, Message, Request, RequestBody};

/// A region's guest range as [first, last], without overflow.
fn guest_range(r: &MemoryRegion) -> (u128, u128) {
    let first = u128::from(r.guest_phys_addr);
    (first, first + u128::from(r.memory_size) - 1)
}

fn check_region(r: &MemoryRegion) {
    assert!(r.memory_size > 0, "empty region accepted: {r:?}");
    let last = u128::from(r.memory_size) - 1;
    for base in [r.guest_phys_addr, r.userspace_addr, r.mmap_offset] {
        assert!(
            u128::from(base) + last <= u128::from(u64::MAX),
            "wrapping region accepted: {r:?}"
        );
    }
}

fn check_mem_table(t: &MemTable) {
    assert!(t.regions.len() <= 8, "{} regions accepted", t.regions.len());
    assert_eq!(t.num_regions as usize, t.regions.len());
    t.regions.iter().for_each(check_region);
    let mut ranges: Vec<_> = t.regions.iter().map(guest_range).collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].1 < w[1].0, "overlapping regions accepted: {t:?}");
    }
    // What validated once validates again when rebuilt from its regions.
    MemTable::new(t.regions.clone())
        .validate()
        .expect("a valid table's regions make a valid table");
}

/// The memfds regions are mapped from: one per region of this memory, of these sizes.
const FD_SIZES: [u64; 4] = [0x1000, 0x3000, 0x1_0000, 0x10_0000];

fn fd_pool() -> &'static GuestMemory {
    static POOL: OnceLock<GuestMemory> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut at = 0;
        let layout: Vec<_> = FD_SIZES
            .iter()
            .map(|&size| {
                let region = (GuestAddress(at), size);
                at += size;
                region
            })
            .collect();
        GuestMemory::new(&layout).expect("memfd pool")
    })
}

/// Maps `regions` as the backend does, region `i` from memfd `i % 4`.
fn map_regions(regions: &[MemoryRegion]) {
    let pool: Vec<_> = fd_pool().regions().collect();
    let fds = regions.iter().enumerate().map(|(i, r)| {
        let fd = pool[i % pool.len()].fd.try_clone_to_owned().expect("dup");
        RegionFd {
            fd,
            fd_offset: r.mmap_offset,
            size: r.memory_size,
            guest_addr: GuestAddress(r.guest_phys_addr),
            user_addr: r.userspace_addr,
        }
    });
    let Ok(mem) = GuestMemory::from_regions(fds.collect()) else {
        return;
    };
    assert_eq!(mem.num_regions(), regions.len());
    for (i, r) in regions.iter().enumerate() {
        let fd_size = FD_SIZES[i % FD_SIZES.len()];
        assert!(
            u128::from(r.mmap_offset) + u128::from(r.memory_size) <= u128::from(fd_size),
            "region {r:?} mapped past the end of its {fd_size:#x}-byte fd"
        );
        let first = GuestAddress(r.guest_phys_addr);
        let last = GuestAddress(r.guest_phys_addr + (r.memory_size - 1));
        let mut byte = [0u8];
        mem.read_slice(&mut byte, first)
            .expect("first byte of a region");
        mem.read_slice(&mut byte, last)
            .expect("last byte of a region");
        // Userspace ranges may overlap (only guest ranges are checked): some region has it.
        assert!(mem.user_to_guest(r.userspace_addr).is_some());
    }
}

/// Checks a decoded body and that it re-encodes to `raw`.
fn check_body(request: Request, body: &RequestBody, raw: &[u8]) {
    let bytes = match body {
        RequestBody::Empty => Vec::new(),
        RequestBody::U64(b) => b.to_bytes(),
        RequestBody::VringState(b) => {
            assert!(b.index < 256);
            b.to_bytes()
        }
        RequestBody::VringAddr(b) => {
            b.validate().expect("decoded bodies are valid");
            b.to_bytes()
        }
        RequestBody::MemTable(t) => {
            check_mem_table(t);
            t.to_bytes()
        }
        RequestBody::VringFd(b) => {
            b.validate().expect("decoded bodies are valid");
            assert!(b.fd_count() <= 1);
            b.to_bytes()
        }
        RequestBody::Config(c) => {
            // GET_CONFIG needs only its framing: a range or flags the device cannot serve get
            // the spec's empty reply. SET_CONFIG is checked whole.
            assert_eq!(c.payload.len(), c.size as usize);
            if request != Request::GetConfig {
                c.validate().expect("decoded bodies are valid");
                assert!(u64::from(c.offset) + u64::from(c.size) <= 256);
            }
            c.to_bytes()
        }
        RequestBody::AddMemReg(b) | RequestBody::RemMemReg(b) => {
            check_region(&b.region);
            b.to_bytes()
        }
        RequestBody::Inflight(b) => {
            b.validate().expect("decoded bodies are valid");
            b.to_bytes()
        }
    };
    // Padding of memory tables is kept; the single-region padding and the inflight body's
    // trailing padding are written back as zero.
    match body {
        RequestBody::AddMemReg(_) | RequestBody::RemMemReg(_) => {
            assert_eq!(bytes[8..], raw[8..]);
        }
        RequestBody::Inflight(_) => assert_eq!(bytes[..20], raw[..20]),
        _ => assert_eq!(bytes, raw, "{body:?} does not re-encode to its bytes"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&fds, buf)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 10);

    if let Ok(h) = Header::decode(buf) {
        assert_eq!(h.flags & FLAG_VERSION_MASK, VERSION);
        assert!(h.size <= MAX_BODY_SIZE);
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out, buf[..HEADER_SIZE]);
    }

    if let Ok(msg) = Message::decode(buf, fds) {
        assert_eq!(
            msg.encode(),
            buf,
            "a decoded message re-encodes to its bytes"
        );
        assert_eq!(msg.header.flags & FLAG_REPLY, 0);
        assert_eq!(msg.body.len(), msg.header.size as usize);
        let body = msg
            .parse_body()
            .expect("the body of a decoded message parses");
        let rem_with_fd = msg.header.request == Request::RemMemReg && fds == 1;
        // `SET_INFLIGHT_FD` brings the region's fd with the same body that `GET_INFLIGHT_FD`
        // sends without one: the body alone does not say.
        let expected = match msg.header.request {
            Request::SetInflightFd => 1,
            _ => body.fd_count(),
        };
        assert!(
            expected == fds || rem_with_fd,
            "{:?} accepted with {fds} fds",
            msg.header.request
        );
        check_body(msg.header.request, &body, &msg.body);
        match &body {
            RequestBody::MemTable(t) => map_regions(&t.regions),
            RequestBody::AddMemReg(b) => map_regions(&[b.region]),
            _ => {}
        }
    }

    // Every body decoder on the raw bytes, whatever the header would have said.
    let body = buf.get(HEADER_SIZE..).unwrap_or(buf);
    for request in Request::ALL {
        if let Ok(decoded) = RequestBody::decode(request, body) {
            check_body(request, &decoded, body);
        }
    }
});
