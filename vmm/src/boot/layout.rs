//! Where boot structures go in guest memory, and the bytes they hold.
//!
//! Everything here builds byte blobs at guest physical addresses; `boot::load` writes them
//! through the bounds-checked guest memory API.

/// GDT: null, code32 (0x08), code64 (0x10 = Linux's __BOOT_CS), data (0x18 = __BOOT_DS),
/// TSS (0x20).
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x560;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
pub const PVH_MODLIST_ADDR: u64 = 0x6400;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of conventional memory: [MPTABLE_ADDR, 1 MiB) is not RAM in the e820 map.
pub const EBDA_START: u64 = MPTABLE_ADDR;
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole (PCI, LAPIC, IOAPIC) and high RAM after it: the memory crate lays
/// guest RAM out around it, and defines it.
pub use memory::{MMIO_HOLE_END, MMIO_HOLE_START};
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

pub const SEL_CODE32: u16 = 0x08;
pub const SEL_CODE64: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

pub const E820_RAM: u32 = 1;

/// A range of the guest physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The RAM ranges of a guest with `mem_size` bytes, as e820 reports them: conventional
/// memory below the MP table, RAM from 1 MiB to the MMIO hole, and the rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<MemRange> {
    let ram = |addr, size| MemRange {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA_START)];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end - HIMEM_START));
    }
    if mem_size > MMIO_HOLE_START {
        map.push(ram(MMIO_HOLE_END, mem_size - MMIO_HOLE_START));
    }
    map
}

/// GDT entry from flags (access byte and flags nibble, as in Linux's GDT_ENTRY), base, limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

pub const GDT: [u64; 5] = [
    0,
    gdt_entry_const(0xc09b, 0, 0xfffff), // code32: present, ring 0, exec/read, 4 KiB pages, 32-bit
    gdt_entry_const(0xa09b, 0, 0xfffff), // code64: present, ring 0, exec/read, long mode
    gdt_entry_const(0xc093, 0, 0xfffff), // data: present, ring 0, read/write
    gdt_entry_const(0x008b, 0, 0x67),    // TSS: present, busy 32/64-bit TSS
];

const fn gdt_entry_const(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// GDT bytes.
pub fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Identity-mapped page tables for the first 4 GiB with 2 MiB pages: PML4, PDPT, 4 PDs.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | 0x3).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 4096;
        pdpt[i as usize * 8..][..8].copy_from_slice(&(pd | 0x3).to_le_bytes());
    }
    let mut pd = vec![0u8; 4 * 4096];
    for i in 0..2048u64 {
        // Present, writable, 2 MiB page.
        pd[i as usize * 8..][..8].copy_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    vec![(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The Linux `boot_params` (zero page) for the 64-bit boot protocol.
pub fn boot_params(
    setup_header: Option<&[u8]>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    map: &[MemRange],
) -> Vec<u8> {
    let mut zp = vec![0u8; 4096];
    if let Some(hdr) = setup_header {
        let n = hdr.len().min(0x290 - 0x1f1);
        put(&mut zp, 0x1f1, &hdr[..n]);
    } else {
        put(&mut zp, 0x1fe, &0xaa55u16.to_le_bytes());
        put(&mut zp, 0x202, b"HdrS");
        // kernel_alignment, as the kernel's own default (16 MiB).
        put(&mut zp, 0x230, &0x0100_0000u32.to_le_bytes());
    }
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x01; // loadflags: LOADED_HIGH
    put(&mut zp, 0x228, &(CMDLINE_ADDR as u32).to_le_bytes());
    put(&mut zp, 0x238, &(cmdline_len as u32).to_le_bytes());
    if let Some((addr, size)) = initrd {
        put(&mut zp, 0x218, &(addr as u32).to_le_bytes());
        put(&mut zp, 0x21c, &(size as u32).to_le_bytes());
        put(&mut zp, 0x0c0, &((addr >> 32) as u32).to_le_bytes());
        put(&mut zp, 0x0c4, &((size >> 32) as u32).to_le_bytes());
    }
    let n = map.len().min(128);
    zp[0x1e8] = n as u8;
    for (i, r) in map.iter().take(n).enumerate() {
        let off = 0x2d0 + i * 20;
        put(&mut zp, off, &r.addr.to_le_bytes());
        put(&mut zp, off + 8, &r.size.to_le_bytes());
        put(&mut zp, off + 16, &r.kind.to_le_bytes());
    }
    zp
}

/// The PVH `hvm_start_info` (version 1), its memory map and module list.
pub fn pvh_start_info(initrd: Option<(u64, u64)>, map: &[MemRange]) -> Vec<(u64, Vec<u8>)> {
    let mut info = vec![0u8; 56];
    put(&mut info, 0, &0x336e_c578u32.to_le_bytes());
    put(&mut info, 4, &1u32.to_le_bytes());
    if initrd.is_some() {
        put(&mut info, 12, &1u32.to_le_bytes());
        put(&mut info, 16, &PVH_MODLIST_ADDR.to_le_bytes());
    }
    put(&mut info, 24, &CMDLINE_ADDR.to_le_bytes());
    put(&mut info, 40, &PVH_MEMMAP_ADDR.to_le_bytes());
    put(&mut info, 48, &(map.len() as u32).to_le_bytes());
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for r in map {
        memmap.extend(r.addr.to_le_bytes());
        memmap.extend(r.size.to_le_bytes());
        memmap.extend(r.kind.to_le_bytes());
        memmap.extend(0u32.to_le_bytes());
    }
    let mut blobs = vec![(PVH_INFO_ADDR, info), (PVH_MEMMAP_ADDR, memmap)];
    if let Some((addr, size)) = initrd {
        let mut m = vec![0u8; 32];
        put(&mut m, 0, &addr.to_le_bytes());
        put(&mut m, 8, &size.to_le_bytes());
        blobs.push((PVH_MODLIST_ADDR, m));
    }
    blobs
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// An Intel MP table (spec 1.4) for `cpus` processors, an ISA bus and one IOAPIC with the 16
/// legacy interrupts identity-routed, as Linux expects without ACPI.
pub fn mptable(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if id == 0 { 0x02 } else { 0 }; // enabled, BSP
        put(&mut e, 4, &0x0600u32.to_le_bytes()); // signature: family 6
        put(&mut e, 8, &0x0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend(e);
        count += 1;
    }
    entries.extend([1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend([2, ioapic_id, 0x11, 0x01]); // IOAPIC, enabled
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming polarity/trigger, ISA irq -> IOAPIC pin irq.
        entries.extend([3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every CPU.
    entries.extend([4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut hdr = vec![0u8; 44];
    put(&mut hdr, 0, b"PCMP");
    put(&mut hdr, 4, &((44 + entries.len()) as u16).to_le_bytes());
    hdr[6] = 4; // spec 1.4
    put(&mut hdr, 8, b"RINGVM  ");
    put(&mut hdr, 16, b"000000000000");
    put(&mut hdr, 34, &count.to_le_bytes());
    put(&mut hdr, 36, &LAPIC_ADDR.to_le_bytes());
    let mut table = [hdr, entries].concat();
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    put(&mut fp, 0, b"_MP_");
    put(&mut fp, 4, &table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);
    [fp, table].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_mmio_hole() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_HOLE_START);
        assert_eq!(map[2].addr, MMIO_HOLE_END);
        assert_eq!(map[2].size, 1 << 30);
        let total: u64 = map.iter().map(|r| r.size).sum();
        assert_eq!(total, (4 << 30) - (HIMEM_START - EBDA_START));
        assert_eq!(e820_map(128 << 20).len(), 2);
    }

    #[test]
    fn mptable_checksums_add_up() {
        let t = mptable(4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(t.len(), 16 + len);
        assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(MPTABLE_ADDR + t.len() as u64 <= 0xa0000);
    }

    #[test]
    fn gdt_entries_match_linux_encoding() {
        // Linux's GDT_ENTRY_INIT(0xa09b, 0, 0xfffff) for __KERNEL_CS in 64-bit mode.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[(SEL_CODE64 >> 3) as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[(SEL_DATA >> 3) as usize], gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!(GDT[(SEL_TSS >> 3) as usize], gdt_entry(0x008b, 0, 0x67));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let pts = page_tables();
        let pd = &pts[2].1;
        let last = u64::from_le_bytes(pd[2047 * 8..2048 * 8].try_into().expect("8 bytes"));
        assert_eq!(last & !0xfff, 0xffe0_0000);
    }
}
