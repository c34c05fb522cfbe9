//! Initial vCPU state: segments and control registers for the PVH (32-bit) and Linux 64-bit
//! entries, FPU, boot MSRs, and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::image::Entry;
use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {0} of {1} MSRs")]
    ShortMsrs(usize, usize),
    #[error("KVM_GET_LAPIC/KVM_SET_LAPIC failed")]
    Lapic(#[source] kvm_ioctls::Error),
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment register from a GDT entry, as the CPU's descriptor cache would hold it.
fn segment(selector: u16) -> kvm_segment {
    let e = GDT[(selector >> 3) as usize];
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn sregs_for(entry: Entry, mut sregs: kvm_sregs) -> kvm_sregs {
    let (code, cr0, cr4, efer) = match entry {
        Entry::Pvh(_) => (SEL_CODE32, CR0_PE | CR0_ET, 0, 0),
        Entry::Linux64(_) => (
            SEL_CODE64,
            CR0_PE | CR0_ET | CR0_PG,
            CR4_PAE,
            EFER_LME | EFER_LMA,
        ),
    };
    sregs.cs = segment(code);
    let data = segment(SEL_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SEL_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = cr0;
    sregs.cr4 = cr4;
    sregs.efer = efer;
    if let Entry::Linux64(_) = entry {
        sregs.cr3 = PML4_ADDR;
    }
    sregs
}

/// Puts the boot vCPU at the kernel's entry.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: Entry) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&sregs_for(entry, sregs))
        .map_err(RegsError::SetSregs)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh(rip) => {
            regs.rip = rip;
            regs.rbx = PVH_INFO_ADDR;
        }
        Entry::Linux64(rip) => {
            regs.rip = rip;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// State every vCPU starts with: FPU defaults, boot MSRs, LINT0 = ExtINT, LINT1 = NMI.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)?;

    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(0x174, 0),               // IA32_SYSENTER_CS
        msr(0x175, 0),               // IA32_SYSENTER_ESP
        msr(0x176, 0),               // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),         // STAR
        msr(0xc000_0082, 0),         // LSTAR
        msr(0xc000_0083, 0),         // CSTAR
        msr(0xc000_0102, 0),         // KERNEL_GS_BASE
        msr(0xc000_0084, 0),         // SYSCALL_MASK
        msr(0x10, 0),                // IA32_TSC
        msr(0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
        msr(0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, write-back
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::ShortMsrs(0, entries.len()))?;
    let n = vcpu.set_msrs(&msrs).map_err(RegsError::SetMsrs)?;
    if n != entries.len() {
        return Err(RegsError::ShortMsrs(n, entries.len()));
    }

    let mut lapic = vcpu.get_lapic().map_err(RegsError::Lapic)?;
    let set_mode = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(&regs[off..off + 4]) {
            *d = *s as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (d, s) in regs[off..off + 4].iter_mut().zip(val.to_le_bytes()) {
            *d = s as libc::c_char;
        }
    };
    set_mode(&mut lapic.regs, 0x350, 0b111); // LVT0: ExtINT
    set_mode(&mut lapic.regs, 0x360, 0b100); // LVT1: NMI
    vcpu.set_lapic(&lapic).map_err(RegsError::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_is_flat_64_bit() {
        let s = sregs_for(Entry::Linux64(0x100200), kvm_sregs::default());
        assert_eq!((s.cs.l, s.cs.db, s.cs.g, s.cs.present), (1, 0, 1, 1));
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
    }

    #[test]
    fn pvh_enters_flat_32_bit_protected_mode_without_paging() {
        let s = sregs_for(Entry::Pvh(0x1000), kvm_sregs::default());
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_), (0, 1, 0xb));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, 1);
        assert_eq!(s.efer, 0);
        assert_eq!((s.tr.type_, s.tr.present, s.tr.s), (0xb, 1, 0));
    }
}
