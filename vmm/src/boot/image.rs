//! Kernel images: ELF (vmlinux, with or without a PVH note) and bzImage.
//!
//! Parsing is separate from loading: an image becomes a list of segments (guest physical
//! address, bytes from the file, zero fill) and an entry point, all bounds-checked here, so a
//! malformed image gets a clear error before any guest memory is touched.

use std::ops::Range;

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, RSI = `boot_params`.
    Linux64(u64),
}

/// A piece of the image to place in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Bytes of the image file copied there.
    pub file: Range<usize>,
    /// Total size in memory; bytes past the file part are zeroed.
    pub mem_size: u64,
}

/// A parsed kernel image.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub entry: Entry,
    pub segments: Vec<Segment>,
    /// For bzImage: the setup header bytes to copy into `boot_params` (at 0x1f1).
    pub setup_header: Option<Vec<u8>>,
    /// Highest address an initrd may end at (bzImage `initrd_addr_max`).
    pub initrd_addr_max: u64,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_max: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not a kernel image: neither ELF nor bzImage (no ELF magic, no HdrS setup header)")]
    UnknownFormat,
    #[error("ELF image is truncated or has an out-of-range {0}")]
    ElfBounds(&'static str),
    #[error("ELF image is not little-endian x86 (class {class}, data {data}, machine {machine})")]
    ElfNotX86 { class: u8, data: u8, machine: u16 },
    #[error("ELF image has no loadable segment")]
    ElfNoLoad,
    #[error(
        "ELF segment at {addr:#x} has file size {filesz:#x} larger than memory size {memsz:#x}"
    )]
    ElfSegmentSize { addr: u64, filesz: u64, memsz: u64 },
    #[error("32-bit ELF image without a PVH entry note cannot be booted")]
    Elf32NoPvh,
    #[error("bzImage setup header is truncated or invalid: {0}")]
    BzBounds(&'static str),
    #[error("bzImage boot protocol {0:#x} is too old (2.06 or newer needed)")]
    BzProtocol(u16),
    #[error("bzImage does not support the 64-bit entry (XLF_KERNEL_64 not set)")]
    BzNot64,
}

const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// Where a bzImage's protected-mode kernel is loaded (its decompressor relocates itself).
pub const BZIMAGE_LOAD_ADDR: u64 = 0x10_0000;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Parses `image` as ELF or bzImage.
pub fn parse(image: &[u8]) -> Result<Kernel, ImageError> {
    if image.starts_with(b"\x7fELF") {
        parse_elf(image)
    } else if image.get(0x202..0x206) == Some(b"HdrS") {
        parse_bzimage(image)
    } else {
        Err(ImageError::UnknownFormat)
    }
}

struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn parse_elf(b: &[u8]) -> Result<Kernel, ImageError> {
    let bounds = ImageError::ElfBounds;
    let class = *b.get(4).ok_or(bounds("header"))?;
    let data = *b.get(5).ok_or(bounds("header"))?;
    let machine = u16_at(b, 18).ok_or(bounds("header"))?;
    let is64 = class == 2;
    // EM_X86_64 = 62, EM_386 = 3.
    if data != 1 || !((is64 && machine == 62) || (class == 1 && (machine == 3 || machine == 62))) {
        return Err(ImageError::ElfNotX86 {
            class,
            data,
            machine,
        });
    }
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            u64_at(b, 24).ok_or(bounds("header"))?,
            u64_at(b, 32).ok_or(bounds("header"))?,
            u16_at(b, 54).ok_or(bounds("header"))?,
            u16_at(b, 56).ok_or(bounds("header"))?,
        )
    } else {
        (
            u32_at(b, 24).ok_or(bounds("header"))? as u64,
            u32_at(b, 28).ok_or(bounds("header"))? as u64,
            u16_at(b, 42).ok_or(bounds("header"))?,
            u16_at(b, 44).ok_or(bounds("header"))?,
        )
    };
    let min_ph = if is64 { 56 } else { 32 };
    if (phentsize as usize) < min_ph {
        return Err(bounds("program header size"));
    }
    let mut phdrs = Vec::new();
    for i in 0..phnum as u64 {
        let off = phoff
            .checked_add(i * phentsize as u64)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(bounds("program header offset"))?;
        // The header's bytes first: field offsets are then small, whatever `off` is.
        let h = b
            .get(off..)
            .and_then(|h| h.get(..min_ph))
            .ok_or(bounds("program header"))?;
        let ph = if is64 {
            Phdr {
                kind: u32_at(h, 0).ok_or(bounds("program header"))?,
                offset: u64_at(h, 8).ok_or(bounds("program header"))?,
                paddr: u64_at(h, 24).ok_or(bounds("program header"))?,
                filesz: u64_at(h, 32).ok_or(bounds("program header"))?,
                memsz: u64_at(h, 40).ok_or(bounds("program header"))?,
            }
        } else {
            Phdr {
                kind: u32_at(h, 0).ok_or(bounds("program header"))?,
                offset: u32_at(h, 4).ok_or(bounds("program header"))? as u64,
                paddr: u32_at(h, 12).ok_or(bounds("program header"))? as u64,
                filesz: u32_at(h, 16).ok_or(bounds("program header"))? as u64,
                memsz: u32_at(h, 20).ok_or(bounds("program header"))? as u64,
            }
        };
        phdrs.push(ph);
    }
    let mut segments = Vec::new();
    let mut pvh = None;
    for ph in &phdrs {
        let file = file_range(b, ph.offset, ph.filesz)?;
        match ph.kind {
            PT_LOAD => {
                if ph.filesz > ph.memsz {
                    return Err(ImageError::ElfSegmentSize {
                        addr: ph.paddr,
                        filesz: ph.filesz,
                        memsz: ph.memsz,
                    });
                }
                segments.push(Segment {
                    addr: ph.paddr,
                    file,
                    mem_size: ph.memsz,
                });
            }
            PT_NOTE => {
                if let Some(e) = find_pvh_note(&b[file]) {
                    pvh = Some(e);
                }
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(ImageError::ElfNoLoad);
    }
    let entry = match pvh {
        Some(e) => Entry::Pvh(e),
        None if is64 => Entry::Linux64(entry),
        None => return Err(ImageError::Elf32NoPvh),
    };
    Ok(Kernel {
        entry,
        segments,
        setup_header: None,
        initrd_addr_max: u64::MAX,
        cmdline_max: 4095,
    })
}

fn file_range(b: &[u8], offset: u64, len: u64) -> Result<Range<usize>, ImageError> {
    let end = offset
        .checked_add(len)
        .filter(|e| *e <= b.len() as u64)
        .ok_or(ImageError::ElfBounds("segment file range"))?;
    Ok(offset as usize..end as usize)
}

/// Finds XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment.
fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = u32_at(notes, off)? as usize;
        let descsz = u32_at(notes, off + 4)? as usize;
        let kind = u32_at(notes, off + 8)?;
        let name_start = off + 12;
        let desc_start = name_start.checked_add(align4(namesz)?)?;
        let next = desc_start.checked_add(align4(descsz)?)?;
        let name = notes.get(name_start..name_start.checked_add(namesz)?)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
            return match descsz {
                4 => u32_at(notes, desc_start).map(u64::from),
                8 => u64_at(notes, desc_start),
                _ => None,
            };
        }
        off = next;
    }
    None
}

fn parse_bzimage(b: &[u8]) -> Result<Kernel, ImageError> {
    let bounds = ImageError::BzBounds;
    if u16_at(b, 0x1fe) != Some(0xaa55) {
        return Err(bounds("boot flag 0xaa55 missing"));
    }
    let version = u16_at(b, 0x206).ok_or(bounds("version"))?;
    if version < 0x206 {
        return Err(ImageError::BzProtocol(version));
    }
    // XLF_KERNEL_64 (bit 0 of xloadflags, protocol 2.12) says startup_64 is at +0x200.
    let xloadflags = u16_at(b, 0x236).ok_or(bounds("xloadflags"))?;
    if version < 0x20c || xloadflags & 1 == 0 {
        return Err(ImageError::BzNot64);
    }
    let setup_sects = match b[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let kernel_off = (setup_sects + 1) * 512;
    if kernel_off >= b.len() {
        return Err(bounds("no protected-mode kernel after the setup sectors"));
    }
    // The header ends at 0x202 + the byte at 0x201 (its jump offset).
    let hdr_end = 0x202 + b[0x201] as usize;
    let header = b
        .get(0x1f1..hdr_end)
        .ok_or(bounds("header length"))?
        .to_vec();
    let initrd_addr_max = u32_at(b, 0x22c).ok_or(bounds("initrd_addr_max"))? as u64;
    let cmdline_max = u32_at(b, 0x238).ok_or(bounds("cmdline_size"))? as usize;
    let len = (b.len() - kernel_off) as u64;
    Ok(Kernel {
        entry: Entry::Linux64(BZIMAGE_LOAD_ADDR + 0x200),
        segments: vec![Segment {
            addr: BZIMAGE_LOAD_ADDR,
            file: kernel_off..b.len(),
            mem_size: len,
        }],
        setup_header: Some(header),
        initrd_addr_max,
        cmdline_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf64(entry: u64, phdrs: &[(u32, u64, u64, u64, u64)], extra: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, off, paddr, filesz, memsz) in phdrs {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            b.extend(p);
        }
        b.extend_from_slice(extra);
        b
    }

    #[test]
    fn elf64_without_note_enters_in_long_mode() {
        let data_off = 64 + 56;
        let img = elf64(0x100000, &[(PT_LOAD, data_off, 0x100000, 4, 16)], b"abcd");
        let k = parse(&img).expect("valid image");
        assert_eq!(k.entry, Entry::Linux64(0x100000));
        assert_eq!(k.segments[0].file, data_off as usize..data_off as usize + 4);
        assert_eq!(k.segments[0].mem_size, 16);
    }

    #[test]
    fn elf_pvh_note_selects_pvh_entry() {
        let mut note = Vec::new();
        note.extend(4u32.to_le_bytes());
        note.extend(8u32.to_le_bytes());
        note.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend(b"Xen\0");
        note.extend(0x1234u64.to_le_bytes());
        let base = 64 + 2 * 56;
        let img = elf64(
            0x100000,
            &[
                (PT_LOAD, base, 0x100000, 4, 4),
                (PT_NOTE, base + 4, 0, note.len() as u64, 0),
            ],
            &[b"abcd".as_slice(), &note].concat(),
        );
        assert_eq!(parse(&img).expect("valid").entry, Entry::Pvh(0x1234));
    }

    #[test]
    fn elf_segment_past_end_of_file_is_rejected() {
        let img = elf64(0, &[(PT_LOAD, 64 + 56, 0x100000, 4096, 4096)], b"ab");
        assert_eq!(
            parse(&img).unwrap_err(),
            ImageError::ElfBounds("segment file range")
        );
    }

    #[test]
    fn elf_offset_overflow_is_rejected() {
        let img = elf64(0, &[(PT_LOAD, u64::MAX - 1, 0x100000, 4, 4)], b"");
        assert!(parse(&img).is_err());
    }

    #[test]
    fn elf_program_headers_at_the_top_of_the_address_space_are_rejected() {
        // Found by the kernel_image fuzz target: `phoff + 4` overflowed.
        for phoff in [u64::MAX - 3, u64::MAX - 8, usize::MAX as u64 - 40] {
            let mut img = elf64(0, &[(PT_LOAD, 64 + 56, 0x100000, 4, 4)], b"abcd");
            img[32..40].copy_from_slice(&phoff.to_le_bytes());
            assert_eq!(
                parse(&img).unwrap_err(),
                ImageError::ElfBounds("program header")
            );
        }
    }

    #[test]
    fn elf_filesz_larger_than_memsz_is_rejected() {
        let img = elf64(0, &[(PT_LOAD, 64 + 56, 0x100000, 4, 2)], b"abcd");
        assert!(matches!(
            parse(&img),
            Err(ImageError::ElfSegmentSize { .. })
        ));
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let img = elf64(0, &[(PT_LOAD, 64 + 56, 0x100000, 4, 4)], b"abcd");
        for n in 0..img.len() {
            let _ = parse(&img[..n]);
        }
        assert_eq!(parse(b"garbage").unwrap_err(), ImageError::UnknownFormat);
    }

    #[test]
    fn bzimage_header_is_parsed() {
        let mut b = vec![0u8; 5 * 512 + 100];
        b[0x1f1] = 4;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x201] = 0x6a;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        let k = parse(&b).expect("valid bzImage");
        assert_eq!(k.entry, Entry::Linux64(0x100200));
        assert_eq!(k.segments[0].file, 2560..b.len());
        assert_eq!(k.cmdline_max, 2047);
        assert_eq!(k.setup_header.expect("header").len(), 0x202 + 0x6a - 0x1f1);
        b[0x236] = 0;
        assert_eq!(parse(&b).unwrap_err(), ImageError::BzNot64);
    }
}
