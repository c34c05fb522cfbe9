//! Property test: random sequences of guest memory accesses, at addresses biased towards
//! region edges, the gap between regions and the top of the address space, checked against a
//! byte-array model. Every access inside RAM must succeed and see the model's bytes; every
//! access that is not must fail and change nothing. Regions are mapped with guard pages, so a
//! stray access outside them would crash the test rather than pass unnoticed.
//!
//! `PROPTEST_CASES` overrides the number of cases (default below).

use std::sync::atomic::Ordering;

use executor::IoVecs;
use memory::{Error, GuestAddress, GuestMemory};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const DEFAULT_CASES: u32 = 5_000;

/// Two adjacent regions, a gap, a third region.
const REGIONS: [(u64, u64); 3] = [(0, 0x4000), (0x4000, 0x2000), (0x10000, 0x1000)];

struct Model {
    bytes: Vec<Vec<u8>>,
}

impl Model {
    fn new() -> Model {
        Model {
            bytes: REGIONS.iter().map(|&(_, s)| vec![0; s as usize]).collect(),
        }
    }

    fn region_of(addr: u64) -> Option<usize> {
        REGIONS.iter().position(|&(s, n)| addr >= s && addr - s < n)
    }

    /// All of `addr..addr + len` is RAM (adjacent regions count as one).
    fn in_ram(addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = addr.checked_add(len - 1) else {
            return false;
        };
        [(0u64, 0x6000u64), (0x10000, 0x11000)]
            .iter()
            .any(|&(s, e)| addr >= s && last < e)
    }

    /// All of it in one region.
    fn in_one_region(addr: u64, len: u64) -> bool {
        match Self::region_of(addr) {
            Some(r) => len <= REGIONS[r].0 + REGIONS[r].1 - addr,
            None => false,
        }
    }

    fn byte(&mut self, addr: u64) -> &mut u8 {
        let r = Self::region_of(addr).expect("model address in RAM");
        &mut self.bytes[r][(addr - REGIONS[r].0) as usize]
    }

    fn read(&mut self, addr: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| *self.byte(addr + i)).collect()
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            *self.byte(addr + i as u64) = b;
        }
    }

    /// Number of host pieces `addr..addr + len` splits into.
    fn pieces(addr: u64, len: u64) -> usize {
        if len == 0 {
            return 0;
        }
        let last = addr + len - 1;
        REGIONS
            .iter()
            .filter(|&&(s, n)| addr < s + n && last >= s)
            .count()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    ReadU64(u64),
    WriteU32(u64, u32),
    Fill(u64, usize, u8),
    Slice(u64, usize),
    Load16(u64),
    Store16(u64, u16),
    IoVecs(Vec<(u64, usize)>),
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..0x6000,
        2 => 0x3fe0u64..0x4020,
        2 => 0x5fe0u64..0x6020,
        1 => 0x6000u64..0x10000,
        2 => 0xffe0u64..0x10020,
        2 => 0x10fe0u64..0x11020,
        1 => (u64::MAX - 0x40)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        6 => 1usize..64,
        1 => 64usize..0x3000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (addr(), len()).prop_flat_map(|(a, n)| {
            prop::collection::vec(any::<u8>(), n).prop_map(move |d| Op::Write(a, d))
        }),
        (addr(), len()).prop_map(|(a, n)| Op::Read(a, n)),
        addr().prop_map(Op::ReadU64),
        (addr(), any::<u32>()).prop_map(|(a, v)| Op::WriteU32(a, v)),
        (addr(), len(), any::<u8>()).prop_map(|(a, n, b)| Op::Fill(a, n, b)),
        (addr(), len()).prop_map(|(a, n)| Op::Slice(a, n)),
        addr().prop_map(Op::Load16),
        (addr(), any::<u16>()).prop_map(|(a, v)| Op::Store16(a, v)),
        prop::collection::vec((addr(), len()), 0..4).prop_map(Op::IoVecs),
    ]
}

fn check(mem: &GuestMemory, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Write(a, data) => {
            let r = mem.write_slice(data, GuestAddress(*a));
            prop_assert_eq!(r.is_ok(), Model::in_ram(*a, data.len() as u64), "{:?}", r);
            if r.is_ok() {
                model.write(*a, data);
            }
        }
        Op::Read(a, n) => {
            let mut buf = vec![0u8; *n];
            let r = mem.read_slice(&mut buf, GuestAddress(*a));
            prop_assert_eq!(r.is_ok(), Model::in_ram(*a, *n as u64));
            if r.is_ok() {
                prop_assert_eq!(buf, model.read(*a, *n));
            }
        }
        Op::ReadU64(a) => {
            let r = mem.read_obj::<u64>(GuestAddress(*a));
            prop_assert_eq!(r.is_ok(), Model::in_ram(*a, 8));
            if let Ok(v) = r {
                prop_assert_eq!(v.to_ne_bytes().to_vec(), model.read(*a, 8));
            }
        }
        Op::WriteU32(a, v) => {
            let r = mem.write_obj(*v, GuestAddress(*a));
            prop_assert_eq!(r.is_ok(), Model::in_ram(*a, 4));
            if r.is_ok() {
                model.write(*a, &v.to_ne_bytes());
            }
        }
        Op::Fill(a, n, b) => {
            let r = mem.fill(GuestAddress(*a), *n, *b);
            prop_assert_eq!(r.is_ok(), Model::in_ram(*a, *n as u64));
            if r.is_ok() {
                model.write(*a, &vec![*b; *n]);
            }
        }
        Op::Slice(a, n) => {
            let r = mem.get_slice(GuestAddress(*a), *n);
            prop_assert_eq!(r.is_ok(), Model::in_one_region(*a, *n as u64));
            if let Ok(s) = r {
                prop_assert_eq!(s.len(), *n);
                let mut buf = vec![0u8; *n];
                s.copy_to(&mut buf);
                prop_assert_eq!(buf, model.read(*a, *n));
            }
        }
        Op::Load16(a) => {
            let r = mem.load_u16(GuestAddress(*a), Ordering::Acquire);
            let ok = a % 2 == 0 && Model::in_one_region(*a, 2);
            prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
            if a % 2 != 0 {
                let misaligned = matches!(r, Err(Error::Misaligned { .. }));
                prop_assert!(misaligned);
            }
            if let Ok(v) = r {
                prop_assert_eq!(v.to_ne_bytes().to_vec(), model.read(*a, 2));
            }
        }
        Op::Store16(a, v) => {
            let r = mem.store_u16(GuestAddress(*a), *v, Ordering::Release);
            prop_assert_eq!(r.is_ok(), a % 2 == 0 && Model::in_one_region(*a, 2));
            if r.is_ok() {
                model.write(*a, &v.to_ne_bytes());
            }
        }
        Op::IoVecs(ranges) => {
            let list: Vec<(GuestAddress, usize)> =
                ranges.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
            let r = mem.iovecs(&list);
            let ok = ranges.iter().all(|&(a, n)| Model::in_ram(a, n as u64));
            prop_assert_eq!(r.is_ok(), ok);
            if let Ok(iov) = r {
                let total: usize = ranges.iter().map(|&(_, n)| n).sum();
                let pieces: usize = ranges
                    .iter()
                    .map(|&(a, n)| Model::pieces(a, n as u64))
                    .sum();
                prop_assert_eq!(iov.total_len(), total);
                prop_assert_eq!(iov.iovecs().len(), pieces);
                prop_assert!(iov.iovecs().iter().all(|v| v.iov_len > 0));
            }
        }
    }
    Ok(())
}

#[test]
fn random_accesses_match_the_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let layout: Vec<(GuestAddress, u64)> =
        REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let mem = GuestMemory::new(&layout).expect("memory");
        let mut model = Model::new();
        for op in &ops {
            check(&mem, &mut model, op)?;
        }
        Ok(())
    });
    println!("{cases} cases of up to 39 accesses each");
    if let Err(e) = result {
        panic!("{e}");
    }
}
