//! Loading a kernel, initrd and command line, and the boot structures around them.

pub mod image;
pub mod layout;
pub mod regs;

use image::{Entry, Kernel};
use layout::*;

use crate::guest::{GuestRam, RamError};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("bad kernel image")]
    Image(#[from] image::ImageError),
    #[error("kernel segment at {addr:#x} ({size:#x} bytes) does not fit in guest RAM")]
    Segment {
        addr: u64,
        size: u64,
        #[source]
        source: RamError,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("initrd of {size} bytes does not fit in guest RAM below {limit:#x} after the kernel")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("writing boot structures to guest memory")]
    Write(#[source] RamError),
    #[error("{0} vCPUs do not fit in the MP table (at most 254)")]
    TooManyCpus(usize),
}

/// What was loaded, for the vCPU set-up.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: Entry,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Places kernel, initrd, command line and boot structures in guest memory.
pub fn load(
    ram: &GuestRam,
    kernel_image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    cpus: usize,
) -> Result<Loaded, BootError> {
    let kernel: Kernel = image::parse(kernel_image)?;
    if cmdline.len() > kernel.cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: kernel.cmdline_max,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    if cpus > 254 {
        return Err(BootError::TooManyCpus(cpus));
    }
    let mut kernel_end = 0;
    for s in &kernel.segments {
        let bytes = &kernel_image[s.file.clone()];
        let err = |source| BootError::Segment {
            addr: s.addr,
            size: s.mem_size,
            source,
        };
        ram.write(s.addr, bytes).map_err(err)?;
        let zero_from = s.addr + bytes.len() as u64;
        ram.fill_zero(zero_from, s.mem_size - bytes.len() as u64)
            .map_err(err)?;
        kernel_end = kernel_end.max(s.addr + s.mem_size);
    }

    let map = e820_map(ram.size());
    let initrd = match initrd {
        Some(data) => Some(place_initrd(
            ram,
            &map,
            data,
            kernel_end,
            kernel.initrd_addr_max,
        )?),
        None => None,
    };

    let w = |addr: u64, bytes: &[u8]| ram.write(addr, bytes).map_err(BootError::Write);
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    w(CMDLINE_ADDR, &cmd)?;
    w(GDT_ADDR, &gdt_bytes())?;
    w(IDT_ADDR, &[0u8; 8])?;
    w(MPTABLE_ADDR, &mptable(cpus as u8))?;
    match kernel.entry {
        Entry::Pvh(_) => {
            for (addr, blob) in pvh_start_info(initrd, &map) {
                w(addr, &blob)?;
            }
        }
        Entry::Linux64(_) => {
            for (addr, blob) in page_tables() {
                w(addr, &blob)?;
            }
            let zp = boot_params(kernel.setup_header.as_deref(), cmdline.len(), initrd, &map);
            w(ZERO_PAGE_ADDR, &zp)?;
        }
    }
    Ok(Loaded {
        entry: kernel.entry,
        kernel_end,
        initrd,
    })
}

/// Puts the initrd at the top of low RAM (below `limit`), page aligned, above the kernel.
fn place_initrd(
    ram: &GuestRam,
    map: &[MemRange],
    data: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = data.len() as u64;
    // The RAM range starting at 1 MiB holds the kernel; the initrd goes at its top.
    let top = map
        .iter()
        .find(|r| r.addr == HIMEM_START)
        .map(|r| r.addr + r.size)
        .unwrap_or(0)
        .min(limit.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end.max(HIMEM_START) => {
            ram.write(addr, data).map_err(BootError::Write)?;
            Ok((addr, size))
        }
        _ => Err(BootError::InitrdTooLarge { size, limit: top }),
    }
}
