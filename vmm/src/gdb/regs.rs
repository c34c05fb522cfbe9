//! The x86-64 register file GDB sees: gdbstub_arch's core and SSE registers, then FS/GS base
//! and the control registers, described by our own target XML so GDB knows their names.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::id::X86_64CoreRegId;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// The architecture ringvm's stub speaks: `i386:x86-64` with the registers of [`Regs`].
pub enum X86_64Ringvm {}

impl Arch for X86_64Ringvm {
    type Usize = u64;
    type Registers = Regs;
    type RegId = X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// Registers after the core and SSE ones, in the order of [`TARGET_XML`].
const EXTRA: [&str; 8] = [
    "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
];
/// Bytes of gdbstub_arch's core + SSE block in a `g` packet.
const CORE_LEN: usize = 0x218;

/// The register file of one vCPU as GDB orders it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Regs {
    pub core: X86_64CoreRegs,
    /// fs_base, gs_base, cr0, cr2, cr3, cr4, cr8, efer.
    pub extra: [u64; EXTRA.len()],
}

impl Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for r in self.extra {
            r.to_le_bytes()
                .into_iter()
                .for_each(|b| write_byte(Some(b)));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != CORE_LEN + 8 * EXTRA.len() {
            return Err(());
        }
        let (core, extra) = bytes.split_at(CORE_LEN);
        self.core.gdb_deserialize(core)?;
        for (r, b) in self.extra.iter_mut().zip(extra.chunks_exact(8)) {
            *r = u64::from_le_bytes(b.try_into().map_err(|_| ())?);
        }
        Ok(())
    }
}

impl Regs {
    /// The GDB view of KVM's registers.
    pub fn from_kvm(r: &kvm_regs, s: &kvm_sregs, f: &kvm_fpu) -> Regs {
        let mut core = X86_64CoreRegs {
            regs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            // RFLAGS bits 32-63 are reserved (zero).
            eflags: r.rflags as u32,
            rip: r.rip,
            ..Default::default()
        };
        core.segments.cs = u32::from(s.cs.selector);
        core.segments.ss = u32::from(s.ss.selector);
        core.segments.ds = u32::from(s.ds.selector);
        core.segments.es = u32::from(s.es.selector);
        core.segments.fs = u32::from(s.fs.selector);
        core.segments.gs = u32::from(s.gs.selector);
        for (st, fpr) in core.st.iter_mut().zip(f.fpr.iter()) {
            st.copy_from_slice(&fpr[..10]);
        }
        core.fpu.fctrl = u32::from(f.fcw);
        core.fpu.fstat = u32::from(f.fsw);
        core.fpu.ftag = u32::from(f.ftwx);
        core.fpu.fop = u32::from(f.last_opcode);
        core.fpu.fioff = f.last_ip as u32;
        core.fpu.fooff = f.last_dp as u32;
        for (x, b) in core.xmm.iter_mut().zip(f.xmm.iter()) {
            *x = u128::from_le_bytes(*b);
        }
        core.mxcsr = f.mxcsr;
        Regs {
            core,
            extra: [
                s.fs.base, s.gs.base, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
            ],
        }
    }

    /// Puts GDB's values into KVM's structures. Segment selectors are left alone: loading one
    /// needs its descriptor, which GDB does not send.
    pub fn to_kvm(&self, r: &mut kvm_regs, s: &mut kvm_sregs, f: &mut kvm_fpu) {
        let g = &self.core.regs;
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ] = *g;
        r.rip = self.core.rip;
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(self.core.eflags);
        [
            s.fs.base, s.gs.base, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
        ] = self.extra;
        for (fpr, st) in f.fpr.iter_mut().zip(self.core.st.iter()) {
            fpr[..10].copy_from_slice(st);
        }
        f.fcw = self.core.fpu.fctrl as u16;
        f.fsw = self.core.fpu.fstat as u16;
        f.ftwx = self.core.fpu.ftag as u8;
        f.last_opcode = self.core.fpu.fop as u16;
        for (b, x) in f.xmm.iter_mut().zip(self.core.xmm.iter()) {
            *b = x.to_le_bytes();
        }
        f.mxcsr = self.core.mxcsr;
    }
}

/// GDB's amd64 features (core, SSE, segment bases) plus a feature of our own for the control
/// registers; the register order is that of [`Regs`]' `g` packet.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/>
</flags>
<reg name="rax" bitsize="64" type="int64" regnum="0"/>
<reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/>
<reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/>
<reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/>
<reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/>
<reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/>
<reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/>
<reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/>
<reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="i386_eflags"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128">
<field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/>
</union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
</flags>
<reg name="xmm0" bitsize="128" type="vec128" regnum="40"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/>
<reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/>
<reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/>
<reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/>
<reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int"/>
<reg name="gs_base" bitsize="64" type="int"/>
</feature>
<feature name="org.ringvm.x86.control">
<reg name="cr0" bitsize="64" type="int64" group="system"/>
<reg name="cr2" bitsize="64" type="int64" group="system"/>
<reg name="cr3" bitsize="64" type="int64" group="system"/>
<reg name="cr4" bitsize="64" type="int64" group="system"/>
<reg name="cr8" bitsize="64" type="int64" group="system"/>
<reg name="efer" bitsize="64" type="int64" group="system"/>
</feature>
</target>"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(r: &Regs) -> Vec<u8> {
        let mut out = Vec::new();
        r.gdb_serialize(|b| out.push(b.unwrap_or(0)));
        out
    }

    #[test]
    fn g_packet_round_trips_with_extra_registers() {
        let mut r = Regs::default();
        r.core.rip = 0x1234;
        r.extra = [1, 2, 3, 4, 5, 6, 7, 8];
        let bytes = serialize(&r);
        assert_eq!(bytes.len(), CORE_LEN + 64);
        let mut back = Regs::default();
        back.gdb_deserialize(&bytes).expect("round trip");
        assert_eq!(back, r);
    }

    proptest::proptest! {
        /// A client's `G` block: any bytes are taken or refused, never a panic, and what is
        /// taken serializes back to the same bytes.
        #[test]
        fn any_g_block_is_taken_whole_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..0x300)) {
            let mut r = Regs::default();
            if r.gdb_deserialize(&bytes).is_ok() {
                proptest::prop_assert_eq!(serialize(&r), bytes);
            }
        }

        #[test]
        fn any_full_size_g_block_round_trips(bytes in proptest::collection::vec(proptest::num::u8::ANY, CORE_LEN + 64)) {
            let mut r = Regs::default();
            proptest::prop_assert!(r.gdb_deserialize(&bytes).is_ok());
            proptest::prop_assert_eq!(serialize(&r), bytes);
        }
    }

    #[test]
    fn wrong_length_g_packet_is_refused() {
        let mut r = Regs::default();
        assert!(r.gdb_deserialize(&[0; CORE_LEN]).is_err());
        assert!(r.gdb_deserialize(&[0; CORE_LEN + 65]).is_err());
        assert!(r.gdb_deserialize(&[]).is_err());
    }

    #[test]
    fn kvm_round_trip_keeps_every_register() {
        let regs = kvm_regs {
            rax: 1,
            rsp: 7,
            r15: 15,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr3: 0x1000,
            ..Default::default()
        };
        sregs.fs.base = 0xdead;
        sregs.cs.selector = 0x10;
        let g = Regs::from_kvm(&regs, &sregs, &kvm_fpu::default());
        assert_eq!(g.core.segments.cs, 0x10);
        assert_eq!(g.extra[0], 0xdead);
        assert_eq!(g.extra[4], 0x1000);
        let (mut r2, mut s2, mut f2) = (kvm_regs::default(), sregs, kvm_fpu::default());
        g.to_kvm(&mut r2, &mut s2, &mut f2);
        assert_eq!(r2, regs);
        assert_eq!(s2, sregs);
    }
}
