//! Fuzzes kernel loading: an ELF vmlinux (with or without a PVH note) or a bzImage, an
//! optional initrd and a command line, parsed by `vmm::boot::image::parse` and placed in a
//! small guest RAM by `vmm::boot::load`, as `ringvm run` does before the first vCPU runs.
//! A bad image must be an error before guest memory is touched; nothing may panic.
//!
//! Invariants checked: every segment's file range lies inside the image and is no longer
//! than its memory size; a bzImage keeps its setup header; a successful load put each
//! segment's bytes where it says (when no later segment overlaps it), reports the end of the
//! kernel, and placed the initrd page aligned, above the kernel, inside RAM and below the
//! kernel's `initrd_addr_max`, with its bytes intact.
//!
//! Input layout: [flags (bit 0: an initrd), vCPUs, command line length, initrd length
//! (le16), command line, initrd, kernel image].

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::boot::image::{self, Entry};
use vmm::boot::layout::HIMEM_START;
use vmm::guest::GuestRam;

/// Small enough that zero-filling a whole segment stays cheap; above 1 MiB for the kernel.
const RAM_SIZE: u64 = 2 << 20;

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(RAM_SIZE).expect("guest RAM"))
}

fn check_parse(kernel: &[u8]) {
    let Ok(k) = image::parse(kernel) else {
        return;
    };
    assert!(!k.segments.is_empty());
    for s in &k.segments {
        assert!(s.file.start <= s.file.end && s.file.end <= kernel.len());
        assert!((s.file.len() as u64) <= s.mem_size, "{s:?}");
    }
    match &k.setup_header {
        Some(h) => {
            assert_eq!(h.len(), 0x202 + usize::from(kernel[0x201]) - 0x1f1);
            assert!(matches!(k.entry, Entry::Linux64(_)));
        }
        None => assert!(kernel.starts_with(b"\x7fELF")),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, cpus, cmd_len, i0, i1], rest)) = data.split_first_chunk::<5>() else {
        return;
    };
    let (cmdline, rest) = rest.split_at(usize::from(cmd_len % 64).min(rest.len()));
    let initrd_len = usize::from(u16::from_le_bytes([i0, i1])).min(rest.len());
    let (initrd, kernel) = rest.split_at(initrd_len);
    let initrd = (flags & 1 != 0).then_some(initrd);
    let cmdline = String::from_utf8_lossy(cmdline);

    check_parse(kernel);

    let ram = ram();
    let Ok(loaded) = vmm::boot::load(ram, kernel, initrd, &cmdline, usize::from(cpus)) else {
        return;
    };
    let k = image::parse(kernel).expect("a loaded image parses");
    assert_eq!(loaded.entry, k.entry);
    let end = k
        .segments
        .iter()
        .map(|s| s.addr + s.mem_size)
        .max()
        .expect("a segment");
    assert_eq!(loaded.kernel_end, end);
    for (i, s) in k.segments.iter().enumerate() {
        let overwritten = k.segments[i + 1..]
            .iter()
            .any(|t| t.addr < s.addr + s.mem_size && s.addr < t.addr + t.mem_size);
        let initrd_over = loaded
            .initrd
            .is_some_and(|(a, n)| a < s.addr + s.mem_size && s.addr < a + n);
        // Boot structures live below 1 MiB; ELF segments may sit there too.
        if overwritten || initrd_over || s.addr < HIMEM_START {
            continue;
        }
        let mut got = vec![0u8; s.file.len()];
        ram.read(s.addr, &mut got).expect("the segment is in RAM");
        assert_eq!(got, kernel[s.file.clone()], "segment at {:#x}", s.addr);
    }
    match (initrd, loaded.initrd) {
        (None, None) => {}
        (Some(data), Some((addr, size))) => {
            assert_eq!(size, data.len() as u64);
            assert_eq!(addr % 4096, 0);
            assert!(addr >= end.max(HIMEM_START), "initrd below the kernel end");
            assert!(addr + size <= RAM_SIZE);
            assert!(addr + size <= k.initrd_addr_max.saturating_add(1));
            let mut got = vec![0u8; data.len()];
            ram.read(addr, &mut got).expect("the initrd is in RAM");
            assert_eq!(got, data);
        }
        (i, l) => panic!("initrd {:?} given, {l:?} placed", i.map(<[u8]>::len)),
    }
});
