//! Split-virtqueue device path: chains popped (and their descriptors walked) plus used
//! entries pushed per second, for 1- and 3-descriptor chains, ringvm's `virtio::Queue` beside
//! rust-vmm's `virtio-queue` (the field's standard implementation) on the same memfd-backed
//! guest memory, the same queue size and the same chain layout, in one run.
//!
//! Each round the (untimed) driver publishes a full ring of chains; the timed device part pops
//! every chain, walks its descriptors, pushes a used entry for it and asks once whether the
//! driver wants an interrupt (EVENT_IDX on, as devices run). Rounds of the two
//! implementations alternate, each on its own rings, so machine noise hits both alike.
//!
//! Runs on the benches' harness ([`benches::Runner`]): ringvm's queue is the subject,
//! virtio-queue the peer, one operation is one chain; the table and JSON lines are the other
//! benches' (`target/bench/virtqueue.jsonl`), so `scripts/ab` compares builds with it.
//! `-- --quick` runs a short version (for CI).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use benches::{Role, Runner, Variant};

use memory::{GuestAddress, GuestMemory};
use virtio::queue::desc::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use virtio::{Descriptor, Queue, VIRTIO_F_EVENT_IDX};
use virtio_queue::{Queue as VqQueue, QueueT};
use vm_memory::{FileOffset, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: u64 = 64 << 20;
const DATA: u64 = 0x10_0000;

/// Ring addresses of one queue.
#[derive(Clone, Copy)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Layout {
    fn at(base: u64) -> Layout {
        Layout {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }
}

/// The guest driver: descriptor table filled once with `QUEUE_SIZE / k` chains of `k`
/// descriptors (1: one 4 KiB writable buffer, like a net receive buffer; 3: a 16-byte
/// readable header, a 4 KiB writable data buffer and a 1-byte writable status, like a block
/// read), then whole rounds of them published.
struct Driver {
    mem: GuestMemory,
    layout: Layout,
    heads: Vec<u16>,
    avail_idx: u16,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

impl Driver {
    fn new(mem: &GuestMemory, layout: Layout, k: u16, data: u64) -> Res<Driver> {
        mem.fill(GuestAddress(layout.desc), 0x3000, 0)?;
        let chains = QUEUE_SIZE / k;
        let mut heads = Vec::new();
        for c in 0..chains {
            let head = c * k;
            heads.push(head);
            let shapes: &[(u32, u16)] = if k == 1 {
                &[(4096, VIRTQ_DESC_F_WRITE)]
            } else {
                &[(16, 0), (4096, VIRTQ_DESC_F_WRITE), (1, VIRTQ_DESC_F_WRITE)]
            };
            for (i, &(len, flags)) in shapes.iter().enumerate() {
                let idx = head + i as u16;
                let last = i + 1 == shapes.len();
                let d = Descriptor {
                    addr: data + u64::from(idx) * 0x2000,
                    len,
                    flags: flags | if last { 0 } else { VIRTQ_DESC_F_NEXT },
                    next: if last { 0 } else { idx + 1 },
                };
                mem.write_slice(
                    &d.to_le_bytes(),
                    GuestAddress(layout.desc + 16 * u64::from(idx)),
                )?;
            }
        }
        Ok(Driver {
            mem: mem.clone(),
            layout,
            heads,
            avail_idx: 0,
        })
    }

    /// Publishes one round: every chain once. Asks for an interrupt after the round's last
    /// entry (used_event), the way a busy driver does.
    fn publish_round(&mut self) -> Res<usize> {
        for &h in &self.heads {
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj(h.to_le(), GuestAddress(self.layout.avail + 4 + 2 * slot))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        let used_event = self.avail_idx.wrapping_sub(1);
        self.mem.store_u16(
            GuestAddress(self.layout.avail + 4 + 2 * u64::from(QUEUE_SIZE)),
            used_event.to_le(),
            Ordering::Relaxed,
        )?;
        self.mem.store_u16(
            GuestAddress(self.layout.avail + 2),
            self.avail_idx.to_le(),
            Ordering::Release,
        )?;
        Ok(self.heads.len())
    }
}

#[inline(never)]
fn ours_round(q: &mut Queue, mem: &GuestMemory) -> Res<(usize, bool)> {
    let mut n = 0;
    while let Some(chain) = q.pop(mem)? {
        let mut len = 0;
        for b in chain.writable() {
            len += b.len;
        }
        q.add_used(mem, chain.head_index(), len)?;
        n += 1;
    }
    Ok((n, q.needs_notification(mem)?))
}

#[inline(never)]
fn theirs_round(q: &mut VqQueue, mem: &GuestMemoryMmap) -> Res<(usize, bool)> {
    let mut n = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut len = 0;
        for d in chain {
            if d.is_write_only() {
                len += d.len();
            }
        }
        q.add_used(mem, head, len)?;
        n += 1;
    }
    Ok((n, q.needs_notification(mem)?))
}

/// The two queues of one chain shape, each on its own rings and driver.
struct Pair {
    drv_ours: Driver,
    drv_theirs: Driver,
    ours: Queue,
    theirs: VqQueue,
}

fn pair(k: u16, mem: &GuestMemory, vm: &GuestMemoryMmap) -> Res<Pair> {
    let (a, b) = (Layout::at(0x1_0000), Layout::at(0x2_0000));
    let drv_ours = Driver::new(mem, a, k, DATA)?;
    let drv_theirs = Driver::new(mem, b, k, DATA)?;

    let mut ours = Queue::new(QUEUE_SIZE)?;
    ours.set_desc_table(GuestAddress(a.desc));
    ours.set_avail_ring(GuestAddress(a.avail));
    ours.set_used_ring(GuestAddress(a.used));
    ours.set_features(1 << VIRTIO_F_EVENT_IDX);
    ours.activate(mem)?;

    let mut theirs = VqQueue::new(QUEUE_SIZE)?;
    theirs.set_size(QUEUE_SIZE);
    theirs.set_desc_table_address(Some(b.desc as u32), Some(0));
    theirs.set_avail_ring_address(Some(b.avail as u32), Some(0));
    theirs.set_used_ring_address(Some(b.used as u32), Some(0));
    theirs.set_event_idx(true);
    theirs.set_ready(true);
    if !theirs.is_valid(vm) {
        return Err("virtio-queue rejects the layout".into());
    }
    Ok(Pair {
        drv_ours,
        drv_theirs,
        ours,
        theirs,
    })
}

/// Runs whole rounds until `chains` chains went through `round`; the device part's time,
/// scaled to exactly `chains`.
fn timed(
    chains: u64,
    driver: &mut Driver,
    mut round: impl FnMut() -> Res<(usize, bool)>,
) -> Duration {
    let mut done = 0u64;
    let mut busy = Duration::ZERO;
    while done < chains {
        let want = driver.publish_round().expect("publish a round");
        let t = Instant::now();
        let (n, notify) = round().expect("a round");
        busy += t.elapsed();
        assert_eq!(n, want, "every published chain is popped");
        assert!(notify, "used_event is the round's last entry");
        done += n as u64;
    }
    busy.mul_f64(chains as f64 / done as f64)
}

fn main() -> Res<()> {
    let mut runner = Runner::new("virtqueue");
    let mem = GuestMemory::new(&[(GuestAddress(0), MEM_SIZE)])?;
    let region = mem.regions().next().ok_or("no region")?;
    let file = File::from(region.fd.as_fd().try_clone_to_owned()?);
    let vm = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0).into_vm(),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, region.fd_offset)),
    )])?;

    for k in [1u16, 3] {
        let bench = format!("chain{k}");
        if !runner.enabled(&bench) {
            continue;
        }
        let p = std::cell::RefCell::new(pair(k, &mem, &vm)?);
        runner.compare(
            &bench,
            vec![
                Variant::subject("ringvm", "virtio::Queue, pop + walk + add_used", |n| {
                    let p = &mut *p.borrow_mut();
                    timed(n, &mut p.drv_ours, || ours_round(&mut p.ours, &mem))
                }),
                Variant::peer("virtio-queue", "rust-vmm virtio-queue, the same", |n| {
                    let p = &mut *p.borrow_mut();
                    timed(n, &mut p.drv_theirs, || theirs_round(&mut p.theirs, &vm))
                }),
            ],
        );
    }
    runner.finish_before_checks();
    for k in [1, 3] {
        runner.check(&format!("chain{k}"), "ringvm", Role::Peer, 1.0);
    }
    Ok(())
}

/// Our guest address as vm-memory's.
trait IntoVm {
    fn into_vm(self) -> vm_memory::GuestAddress;
}

impl IntoVm for GuestAddress {
    fn into_vm(self) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.0)
    }
}
