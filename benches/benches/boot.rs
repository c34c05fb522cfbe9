//! Boot: how fast `ringvm run` reaches the guest, and what the VMM costs in memory.
//!
//! - first-instruction: process start to the first byte a tiny PVH guest writes to COM1 with
//!   its first instruction; ringvm beside QEMU microvm booting the same ELF (the peer) and a
//!   hand-written in-process KVM boot of the same code (the limit: KVM's own cost, with no
//!   process start and no VMM).
//! - test-guest-first-byte / test-guest-run: the purpose-built test guest's first serial byte,
//!   and a whole `ringvm.test=hello` run to exit.
//! - rss: VMM resident memory excluding guest RAM (RssAnon + RssFile; guest RAM is memfd-backed
//!   in both VMMs and counts as RssShmem), measured once per VMM while the tiny guest spins.
//!
//! ringvm is taken from $RINGVM_BIN, else target/release/ringvm (built by `scripts/run` or
//! `cargo build --release -p vmm`); QEMU must be installed (scripts/setup).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::process::test_guest;
use benches::{bench_dir, json_str, target_dir, workspace_root, Runner, Variant};
use kvm_ioctls::{Kvm, VcpuExit};

/// Guest RAM of every run, MiB.
const MEM_MIB: u64 = 128;
const LOAD: u64 = 0x10_0000;

/// 32-bit code: `mov dx, 0x3f8; mov al, '!'; out dx, al; jmp $`.
const CODE: [u8; 9] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x21, 0xee, 0xeb, 0xfe];

/// An ELF64 whose one PT_LOAD holds CODE at 1 MiB, with a PVH entry note pointing at it.
fn tiny_pvh_elf() -> Vec<u8> {
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes());
    note.extend(8u32.to_le_bytes());
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend(LOAD.to_le_bytes());
    let code_off = 64 + 2 * 56;
    let note_off = code_off + 16;
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&LOAD.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&2u16.to_le_bytes());
    let ph = |kind: u32, flags: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&kind.to_le_bytes());
        p[4..8].copy_from_slice(&flags.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
        p
    };
    b.extend(ph(1, 5, code_off as u64, LOAD, 16));
    b.extend(ph(4, 4, note_off as u64, 0, note.len() as u64));
    let mut code = CODE.to_vec();
    code.resize(16, 0x90);
    b.extend(code);
    b.extend(note);
    b
}

fn ringvm_bin() -> PathBuf {
    let bin = std::env::var_os("RINGVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/ringvm"));
    if !bin.exists() {
        // Build it here: a bench that measures the binary must measure the current one.
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "vmm", "--bin", "ringvm"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p vmm failed");
    }
    bin
}

fn ringvm_cmd(bin: &Path, kernel: &Path, params: &str) -> Command {
    let mut c = Command::new(bin);
    c.args(["run", "-m", &MEM_MIB.to_string(), "-p", params])
        .arg(kernel);
    c
}

fn qemu_cmd(kernel: &Path, params: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,x-option-roms=off,rtc=on,memory-backend=ram"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=ram,size={MEM_MIB}M"),
        ])
        .args([
            "-device",
            "i8042",
            "-enable-kvm",
            "-cpu",
            "qemu64,-cx16,+xsaveerptr",
        ])
        .args(["-m", &format!("{MEM_MIB}M"), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", params]);
    c
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn VMM")
}

/// Spawns, waits for the first byte on stdout, and returns how long that took (and the child).
fn first_byte(cmd: Command) -> (Duration, Child) {
    let start = Instant::now();
    let mut child = spawn(cmd);
    let mut out = child.stdout.take().expect("piped");
    let mut b = [0u8; 1];
    let n = out.read(&mut b).expect("read the serial console");
    let elapsed = start.elapsed();
    assert_eq!(n, 1, "the VMM exited before the guest wrote a byte");
    child.stdout = Some(out);
    (elapsed, child)
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// n boots, each to the first serial byte; returns the summed time to that byte.
fn boots_to_first_byte(n: u64, mut make: impl FnMut() -> Command) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let (t, child) = first_byte(make());
        total += t;
        kill(child);
    }
    total
}

/// n whole runs to exit.
fn whole_runs(n: u64, mut make: impl FnMut() -> Command) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let status = make()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run VMM");
        assert!(status.success(), "a boot failed: {status}");
    }
    start.elapsed()
}

/// The limit: the tiny guest booted in-process with bare KVM calls, to its first port write.
fn raw_kvm_boots(n: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let start = Instant::now();
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let size = (MEM_MIB << 20) as usize;
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"raw-kvm".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscall on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        // SAFETY: a new shared mapping of the whole memfd, checked below, unmapped at the end.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: CODE fits at LOAD inside the fresh mapping of `size` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                CODE.as_ptr(),
                mem.cast::<u8>().add(LOAD as usize),
                CODE.len(),
            )
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: mem as u64,
        };
        // SAFETY: the mapping outlives the VM (unmapped after the VM fd is dropped below).
        unsafe { vm.set_user_memory_region(region) }.expect("set memory");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.base = 0;
            seg.limit = 0xffff_ffff;
            seg.g = 1;
            seg.db = 1;
            seg.present = 1;
            seg.s = 1;
        }
        sregs.cs.type_ = 0xb;
        sregs.cs.selector = 0x8;
        sregs.cr0 = 0x11;
        vcpu.set_sregs(&sregs).expect("set sregs");
        let regs = kvm_bindings::kvm_regs {
            rip: LOAD,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).expect("set regs");
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x3f8, _) => break,
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
        total += start.elapsed();
        drop(vcpu);
        drop(vm);
        // SAFETY: the VM that used the mapping is gone.
        unsafe { libc::munmap(mem, size) };
    }
    total
}

/// RssAnon + RssFile of a live process, in KiB.
fn vmm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("RssAnon:") + field("RssFile:")
}

fn rss_of(cmd: Command) -> u64 {
    let (_, child) = first_byte(cmd);
    // Let the VMM finish whatever it does after the guest started.
    std::thread::sleep(Duration::from_millis(200));
    let kib = vmm_rss_kib(child.id());
    kill(child);
    kib
}

fn main() {
    let mut r = Runner::new("boot");
    let bin = ringvm_bin();
    let dir = bench_dir().expect("target/bench");
    let tiny = dir.join("tiny-pvh.elf");
    std::fs::write(&tiny, tiny_pvh_elf()).expect("write the tiny guest");
    let guest = test_guest(&target_dir().join("bench/test-guest"));
    let hello = "ringvm.test=hello";

    if r.enabled("first-instruction") {
        r.compare(
            "first-instruction",
            vec![
                Variant::subject(
                    "ringvm",
                    "ringvm run: process start -> first guest byte",
                    |n| boots_to_first_byte(n, || ringvm_cmd(&bin, &tiny, "")),
                ),
                Variant::limit(
                    "raw-kvm",
                    "bare KVM calls in-process (no exec, no VMM)",
                    raw_kvm_boots,
                ),
                Variant::peer(
                    "qemu",
                    "qemu-system-x86_64 -M microvm (qboot), same ELF",
                    |n| boots_to_first_byte(n, || qemu_cmd(&tiny, "")),
                ),
            ],
        );
    }
    if r.enabled("test-guest-first-byte") {
        r.compare(
            "test-guest-first-byte",
            vec![
                Variant::subject(
                    "ringvm",
                    "ringvm run: start -> test guest's first byte",
                    |n| boots_to_first_byte(n, || ringvm_cmd(&bin, &guest, hello)),
                ),
                Variant::peer(
                    "qemu",
                    "qemu microvm: start -> test guest's first byte",
                    |n| boots_to_first_byte(n, || qemu_cmd(&guest, hello)),
                ),
            ],
        );
    }
    if r.enabled("test-guest-run") {
        r.compare(
            "test-guest-run",
            vec![
                Variant::subject("ringvm", "ringvm run: whole hello scenario to exit", |n| {
                    whole_runs(n, || ringvm_cmd(&bin, &guest, hello))
                }),
                Variant::peer("qemu", "qemu microvm: whole hello scenario to exit", |n| {
                    whole_runs(n, || qemu_cmd(&guest, hello))
                }),
            ],
        );
    }
    let table = r.finish().expect("write results");
    if r.enabled("rss") {
        let ringvm_kib = rss_of(ringvm_cmd(&bin, &tiny, ""));
        let qemu_kib = rss_of(qemu_cmd(&tiny, ""));
        println!(
            "rss (VMM memory excluding guest RAM, {MEM_MIB} MiB guest): ringvm {:.1} MiB, \
             qemu microvm {:.1} MiB, ratio {:.2}x; target <= 5 MiB: {}",
            ringvm_kib as f64 / 1024.0,
            qemu_kib as f64 / 1024.0,
            ringvm_kib as f64 / qemu_kib as f64,
            if ringvm_kib <= 5 * 1024 {
                "PASS"
            } else {
                "MISS"
            }
        );
        let line = format!(
            "{{\"group\":{},\"case\":\"rss\",\"ringvm_kib\":{ringvm_kib},\"qemu_kib\":{qemu_kib},\"ratio_vs_peer\":{:.4}}}\n",
            json_str("boot"),
            ringvm_kib as f64 / qemu_kib as f64
        );
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("boot.jsonl"))
            .expect("open boot.jsonl");
        f.write_all(line.as_bytes()).expect("append");
    }
    if let Some(case) = r.case("first-instruction", "ringvm") {
        let ms = case.mean_ns / 1e6;
        println!(
            "first guest instruction: {ms:.2} ms (target <= 10 ms): {}",
            if ms <= 10.0 { "PASS" } else { "MISS" }
        );
    }
    let _ = table;
}
