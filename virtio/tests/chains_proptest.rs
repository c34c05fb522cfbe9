//! Property test: random descriptor tables, indirect tables and avail rings, popped by the
//! device-side queue and checked against a straightforward reference model of the spec's
//! rules. Every chain the queue accepts must be the one the model accepts (same buffers), every
//! chain it rejects must be invalid per the model, nothing may panic, and every accepted buffer
//! is then read and written in full through `Reader` / `Writer` (guest RAM is mapped with
//! guard pages, so an access outside it would crash the test).
//!
//! `PROPTEST_CASES` overrides the number of cases (default below).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use memory::{GuestAddress, GuestMemory};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio::queue::desc::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio::{Descriptor, Error, Queue, VIRTIO_F_INDIRECT_DESC};

const DEFAULT_CASES: u32 = 10_000;

/// RAM: two adjacent regions, a gap, a third region.
const REGIONS: [(u64, u64); 3] = [(0, 0x40000), (0x40000, 0x10000), (0x100000, 0x10000)];
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Where the generated indirect tables go (two of them).
const INDIRECT: [u64; 2] = [0x8000, 0x3ffc0]; // the second one spans two regions

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        let layout: Vec<(GuestAddress, u64)> =
            REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        GuestMemory::new(&layout).expect("guest memory")
    })
}

/// Whether every byte of `addr..addr + len` is RAM.
fn model_in_ram(addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    // Adjacent regions 0 and 1 form one range.
    let ranges = [(0u64, 0x50000u64), (0x100000, 0x110000)];
    ranges.iter().any(|&(s, e)| addr >= s && last < e)
}

fn read_desc(mem: &GuestMemory, addr: u64) -> Descriptor {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(addr))
        .expect("model reads checked descriptors");
    Descriptor::from_le_bytes(b)
}

/// The spec's rules, written out plainly: `Some(buffers)` for a valid chain. Reads the
/// descriptors from guest memory as they are just before the pop (a device's used-ring
/// writes may have changed tables the guest placed over the rings).
fn model_chain(
    mem: &GuestMemory,
    size: u16,
    indirect_ok: bool,
    head: u16,
) -> Option<Vec<(u64, u32, bool)>> {
    if head >= size {
        return None;
    }
    let mut table = DESC_TABLE;
    let mut entries = u64::from(size);
    let mut in_indirect = false;
    let mut visited = HashSet::new();
    let mut index = head;
    let mut out = Vec::new();
    let mut total: u64 = 0;
    let mut seen_writable = false;
    loop {
        if !visited.insert(index) {
            return None; // a loop
        }
        let d = read_desc(mem, table + 16 * u64::from(index));
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if in_indirect || !indirect_ok || d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return None;
            }
            if d.len == 0 || !d.len.is_multiple_of(16) || !model_in_ram(d.addr, u64::from(d.len)) {
                return None;
            }
            table = d.addr;
            entries = u64::from(d.len / 16);
            in_indirect = true;
            visited.clear();
            index = 0;
            continue;
        }
        if d.len == 0 || !model_in_ram(d.addr, u64::from(d.len)) {
            return None;
        }
        let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && seen_writable {
            return None;
        }
        seen_writable |= writable;
        total += u64::from(d.len);
        if total > u64::from(u32::MAX) {
            return None;
        }
        out.push((d.addr, d.len, writable));
        if out.len() > usize::from(size) {
            return None;
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Some(out);
        }
        if u64::from(d.next) >= entries {
            return None;
        }
        index = d.next;
    }
}

#[derive(Debug, Clone)]
struct Case {
    size_log2: u32,
    indirect_ok: bool,
    table: Vec<Descriptor>,
    indirect: Vec<Vec<Descriptor>>,
    heads: Vec<u16>,
    /// How far avail.idx is ahead of the device (may exceed the queue size).
    avail_ahead: u16,
    /// Where the device's indices start (wrap-around).
    start: u16,
}

fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0x10000u64..0x4ffff,              // ordinary RAM
        1 => 0x3ff00u64..0x40100,              // across the adjacent-region boundary
        1 => 0x4ff00u64..0x50100,              // running off into the gap
        1 => 0x50000u64..0x100000,             // in the gap
        1 => 0x10ff00u64..0x110100,            // end of the last region
        1 => (u64::MAX - 0x1000)..=u64::MAX,   // wrapping
        1 => any::<u64>(),
        1 => Just(INDIRECT[0]),
        1 => Just(INDIRECT[1]),
    ]
}

fn len_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        6 => 1u32..0x200,
        2 => (1u32..8).prop_map(|n| n * 16),  // indirect table sizes
        1 => 0x200u32..0x20000,
        1 => (u32::MAX - 0x100)..=u32::MAX,
        1 => any::<u32>(),
    ]
}

fn flags_strategy() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => prop::sample::select(vec![
            0,
            VIRTQ_DESC_F_NEXT,
            VIRTQ_DESC_F_WRITE,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        ]),
        1 => Just(VIRTQ_DESC_F_INDIRECT),
        1 => any::<u16>(),
    ]
}

fn desc_strategy(next_max: u16) -> impl Strategy<Value = Descriptor> {
    (
        addr_strategy(),
        len_strategy(),
        flags_strategy(),
        0..next_max,
    )
        .prop_map(|(addr, len, flags, next)| Descriptor {
            addr,
            len,
            flags,
            next,
        })
}

/// A table of well-formed chains of `chain_len` descriptors (the first `readable` of each
/// device-readable), whose chain heads may instead point to a well-formed indirect table.
fn well_formed(
    n: usize,
    chain_len: usize,
    readable: usize,
    addrs: &[u64],
    lens: &[u32],
    indirect_head: bool,
    indirect_len: usize,
) -> (Vec<Descriptor>, Vec<Vec<Descriptor>>) {
    let desc = |i: usize, pos: usize, chain_len: usize, next: usize| Descriptor {
        addr: addrs[i % addrs.len()],
        len: lens[i % lens.len()],
        flags: if pos + 1 < chain_len {
            VIRTQ_DESC_F_NEXT
        } else {
            0
        } | if pos >= readable {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        },
        next: next as u16,
    };
    let mut table: Vec<Descriptor> = (0..n)
        .map(|i| desc(i, i % chain_len, chain_len, i + 1))
        .collect();
    let indirect: Vec<Descriptor> = (0..indirect_len)
        .map(|i| desc(i + 7, i, indirect_len, i + 1))
        .collect();
    if indirect_head && indirect_len > 0 {
        for (i, d) in table.iter_mut().enumerate().step_by(chain_len) {
            *d = Descriptor {
                addr: INDIRECT[i % 2],
                len: 16 * indirect_len as u32,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0,
            };
        }
    }
    (table, vec![indirect.clone(), indirect])
}

/// A random change to one field of one descriptor.
#[derive(Debug, Clone)]
struct Mutation {
    which: usize,
    field: u8,
    value: u64,
}

fn mutate(d: &mut Descriptor, m: &Mutation) {
    match m.field % 4 {
        0 => d.addr = m.value,
        1 => d.len = m.value as u32,
        2 => d.flags ^= 1 << (m.value % 4),
        _ => d.next = m.value as u16,
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1u32..=5, any::<bool>(), any::<bool>()).prop_flat_map(
        |(size_log2, indirect_ok, structured)| {
            let size = 1u16 << size_log2;
            let n = usize::from(size);
            let random_tables = (
                prop::collection::vec(desc_strategy(size + 2), n),
                prop::collection::vec(prop::collection::vec(desc_strategy(10), 0..8), 2),
            )
                .boxed();
            let tables = if structured {
                (
                    1..=n.min(4),
                    0..=4usize,
                    prop::collection::vec(0x10000u64..0x4f000, 1..8),
                    prop::collection::vec(1u32..0x400, 1..8),
                    any::<bool>(),
                    0..8usize,
                    prop::collection::vec(
                        (0..n + 9, any::<u8>(), addr_strategy()).prop_map(
                            |(which, field, value)| Mutation {
                                which,
                                field,
                                value,
                            },
                        ),
                        0..3,
                    ),
                )
                    .prop_map(
                        move |(chain_len, readable, addrs, lens, ind_head, ind_len, mutations)| {
                            let (mut table, mut indirect) = well_formed(
                                n, chain_len, readable, &addrs, &lens, ind_head, ind_len,
                            );
                            for m in &mutations {
                                if m.which < n {
                                    mutate(&mut table[m.which], m);
                                } else if let Some(d) = indirect[0].get_mut(m.which - n) {
                                    mutate(d, m);
                                }
                            }
                            (table, indirect)
                        },
                    )
                    .boxed()
            } else {
                random_tables
            };
            (
                Just(size_log2),
                Just(indirect_ok || structured),
                tables,
                prop::collection::vec(0..size + 2, n),
                prop_oneof![8 => 0..=size, 1 => size + 1..=u16::MAX],
                any::<u16>(),
            )
                .prop_map(
                    |(size_log2, indirect_ok, (table, indirect), heads, avail_ahead, start)| Case {
                        size_log2,
                        indirect_ok,
                        table,
                        indirect,
                        heads,
                        avail_ahead,
                        start,
                    },
                )
        },
    )
}

static VALID: AtomicUsize = AtomicUsize::new(0);
static INVALID: AtomicUsize = AtomicUsize::new(0);
static MULTI_VALID: AtomicUsize = AtomicUsize::new(0);
static INDIRECT_VALID: AtomicUsize = AtomicUsize::new(0);
static JUMPS: AtomicUsize = AtomicUsize::new(0);

fn write_descs(mem: &GuestMemory, at: u64, descs: &[Descriptor]) {
    for (i, d) in descs.iter().enumerate() {
        mem.write_slice(&d.to_le_bytes(), GuestAddress(at + 16 * i as u64))
            .expect("write descriptor");
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mem = memory();
    let size = 1u16 << case.size_log2;
    // Fresh rings and tables.
    mem.fill(GuestAddress(DESC_TABLE), 0x3000, 0)
        .expect("zero rings");
    for base in INDIRECT {
        mem.fill(GuestAddress(base), 0x80, 0).expect("zero tables");
    }
    write_descs(mem, DESC_TABLE, &case.table);
    for (&base, descs) in INDIRECT.iter().zip(&case.indirect) {
        write_descs(mem, base, descs);
    }
    for (i, &h) in case.heads.iter().enumerate() {
        let slot = (u64::from(case.start) + i as u64) % u64::from(size);
        mem.write_obj(h.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail entry");
    }
    let avail_idx = case.start.wrapping_add(case.avail_ahead);
    mem.store_u16(
        GuestAddress(AVAIL + 2),
        avail_idx.to_le(),
        Ordering::Release,
    )
    .expect("avail idx");

    let mut q = Queue::new(32).expect("queue");
    q.set_size(size);
    q.set_desc_table(GuestAddress(DESC_TABLE));
    q.set_avail_ring(GuestAddress(AVAIL));
    q.set_used_ring(GuestAddress(USED));
    q.set_features(if case.indirect_ok {
        1 << VIRTIO_F_INDIRECT_DESC
    } else {
        0
    });
    q.set_next_avail(case.start);
    q.set_next_used(case.start);
    q.activate(mem).expect("valid layout");

    if case.avail_ahead > size {
        JUMPS.fetch_add(1, Ordering::Relaxed);
        let r = q.pop(mem);
        prop_assert!(matches!(r, Err(Error::InvalidAvailIdx { .. })), "{r:?}");
        prop_assert_eq!(q.next_avail(), case.start);
        return Ok(());
    }
    for i in 0..case.avail_ahead {
        let slot = (u64::from(case.start) + u64::from(i)) % u64::from(size);
        let head = u16::from_le(
            mem.read_obj(GuestAddress(AVAIL + 4 + 2 * slot))
                .expect("avail entry"),
        );
        let expected = model_chain(mem, size, case.indirect_ok, head);
        let head_indirect = head < size
            && read_desc(mem, DESC_TABLE + 16 * u64::from(head)).flags & VIRTQ_DESC_F_INDIRECT != 0;
        match q.pop(mem) {
            Ok(Some(chain)) => {
                let Some(bufs) = expected else {
                    return Err(TestCaseError::fail(format!(
                        "queue accepted head {head} the model rejects: {chain:?}"
                    )));
                };
                prop_assert_eq!(chain.head_index(), head);
                let got: Vec<(u64, u32, bool)> = chain
                    .readable()
                    .iter()
                    .map(|b| (b.addr.0, b.len, false))
                    .chain(chain.writable().iter().map(|b| (b.addr.0, b.len, true)))
                    .collect();
                prop_assert_eq!(&got, &bufs);
                if chain.buffers().len() > 1 {
                    MULTI_VALID.fetch_add(1, Ordering::Relaxed);
                }
                if head_indirect {
                    INDIRECT_VALID.fetch_add(1, Ordering::Relaxed);
                }
                // Touch every byte the chain allows, and no more: read the readable
                // buffers, and write the writable ones back with what they hold (so tables
                // the guest placed there stay as the model sees them).
                let mut sink = Vec::new();
                let n = chain
                    .reader(mem)
                    .read_to_end(&mut sink)
                    .expect("read chain");
                prop_assert_eq!(n, chain.readable_len());
                let mut current = Vec::new();
                virtio::Reader::new(mem.clone(), chain.writable())
                    .read_to_end(&mut current)
                    .expect("read writable buffers");
                let mut w = chain.writer(mem);
                w.write_all(&current).expect("write chain");
                prop_assert_eq!(w.bytes_written(), chain.writable_len());
                prop_assert_eq!(w.write(&[1]).expect("full"), 0);
                q.add_used(mem, head, w.bytes_written() as u32)
                    .expect("used");
                VALID.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::InvalidChain { head: h, .. }) => {
                prop_assert_eq!(h, head);
                prop_assert!(
                    expected.is_none(),
                    "queue rejected head {} the model accepts: {:?}",
                    head,
                    expected
                );
                INVALID.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "unexpected pop result {other:?}"
                )))
            }
        }
    }
    prop_assert!(q.pop(mem).expect("pop").is_none());
    Ok(())
}

#[test]
fn random_descriptor_tables_match_the_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let result = runner.run(&case_strategy(), |case| run_case(&case));
    let (valid, invalid) = (
        VALID.load(Ordering::Relaxed),
        INVALID.load(Ordering::Relaxed),
    );
    println!(
        "{cases} cases: {valid} valid chains ({} of several buffers, {} indirect), {invalid} \
         invalid chains, {} avail-index jumps",
        MULTI_VALID.load(Ordering::Relaxed),
        INDIRECT_VALID.load(Ordering::Relaxed),
        JUMPS.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        valid > cases as usize / 10,
        "too few valid chains to mean much"
    );
    assert!(invalid > cases as usize / 10, "too few invalid chains");
}
