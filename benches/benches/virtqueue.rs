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
//! Prints a table and appends one JSON line to `target/bench/virtio.jsonl`.
//! `-- --quick` runs a short version (for CI).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

struct Row {
    name: &'static str,
    ours: f64,
    theirs: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(
    k: u16,
    mem: &GuestMemory,
    vm: &GuestMemoryMmap,
    trials: usize,
    per_trial: Duration,
    min_batches: usize,
) -> Res<Row> {
    let (a, b) = (Layout::at(0x1_0000), Layout::at(0x2_0000));
    let mut drv_ours = Driver::new(mem, a, k, DATA)?;
    let mut drv_theirs = Driver::new(mem, b, k, DATA)?;

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

    let mut ours_rates = Vec::new();
    let mut theirs_rates = Vec::new();
    for _ in 0..trials {
        for side in 0..2 {
            let mut chains = 0usize;
            let mut busy = Duration::ZERO;
            let start = Instant::now();
            let mut batches = 0;
            while start.elapsed() < per_trial || batches < min_batches {
                batches += 1;
                for _ in 0..64 {
                    let t;
                    let (n, notify) = if side == 0 {
                        let want = drv_ours.publish_round()?;
                        t = Instant::now();
                        let r = ours_round(&mut ours, mem)?;
                        busy += t.elapsed();
                        assert_eq!(r.0, want);
                        r
                    } else {
                        let want = drv_theirs.publish_round()?;
                        t = Instant::now();
                        let r = theirs_round(&mut theirs, vm)?;
                        busy += t.elapsed();
                        assert_eq!(r.0, want);
                        r
                    };
                    assert!(notify, "used_event is the round's last entry");
                    chains += n;
                }
            }
            let rate = chains as f64 / busy.as_secs_f64();
            if side == 0 {
                ours_rates.push(rate);
            } else {
                theirs_rates.push(rate);
            }
        }
    }
    Ok(Row {
        name: if k == 1 {
            "1-descriptor chains"
        } else {
            "3-descriptor chains"
        },
        ours: median(&mut ours_rates),
        theirs: median(&mut theirs_rates),
    })
}

fn jsonl_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench").join("virtio.jsonl")
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--batches N`: a fixed amount of work per trial (for instruction counts under
    // callgrind), on top of the time per trial.
    let args: Vec<String> = std::env::args().collect();
    let min_batches = args
        .iter()
        .position(|a| a == "--batches")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (trials, per_trial) = if min_batches > 0 {
        (1, Duration::ZERO)
    } else if quick {
        (3, Duration::from_millis(50))
    } else {
        (15, Duration::from_millis(200))
    };

    let mem = GuestMemory::new(&[(GuestAddress(0), MEM_SIZE)])?;
    let region = mem.regions().next().ok_or("no region")?;
    let file = File::from(region.fd.as_fd().try_clone_to_owned()?);
    let vm = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0).into_vm(),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, region.fd_offset)),
    )])?;

    let rows = [
        run(1, &mem, &vm, trials, per_trial, min_batches)?,
        run(3, &mem, &vm, trials, per_trial, min_batches)?,
    ];

    println!(
        "split virtqueue, queue size {QUEUE_SIZE}, EVENT_IDX on, pop + walk + add_used \
         (median of {trials} alternating trials)"
    );
    println!(
        "{:<22} {:>16} {:>18} {:>7}",
        "chain", "ringvm Mchain/s", "virtio-queue Mch/s", "ratio"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let ratio = r.ours / r.theirs;
        println!(
            "{:<22} {:>16.2} {:>18.2} {:>6.2}x",
            r.name,
            r.ours / 1e6,
            r.theirs / 1e6,
            ratio
        );
        json_rows.push(format!(
            "{{\"chain\":\"{}\",\"ringvm_chains_per_s\":{:.0},\"virtio_queue_chains_per_s\":{:.0},\"ratio\":{:.3}}}",
            r.name, r.ours, r.theirs, ratio
        ));
    }
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let line = format!(
        "{{\"bench\":\"virtio_queue\",\"unix_time\":{unix},\"quick\":{quick},\"queue_size\":{QUEUE_SIZE},\"rows\":[{}]}}",
        json_rows.join(",")
    );
    let path = jsonl_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    writeln!(f, "{line}")?;
    println!("appended to {}", path.display());
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
