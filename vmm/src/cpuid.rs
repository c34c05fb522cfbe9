//! CPUID for each vCPU: what KVM supports, with topology, the hypervisor bit, and the features
//! the user asked to hide or show (`--cpu-features`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID feature bit by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features `--cpu-features` can name (the names of Linux's /proc/cpuinfo flags).
pub const FEATURES: &[Feature] = &[
    f("sse3", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("monitor", 1, 0, Reg::Ecx, 3),
    f("vmx", 1, 0, Reg::Ecx, 5),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("hypervisor", 1, 0, Reg::Ecx, 31),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("fsrm", 7, 0, Reg::Edx, 4),
    f("xsaveopt", 0xd, 1, Reg::Eax, 0),
    f("xsavec", 0xd, 1, Reg::Eax, 1),
    f("xsaves", 0xd, 1, Reg::Eax, 3),
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    f("xsaveerptr", 0x8000_0008, 0, Reg::Ebx, 2),
];

/// A request to clear (`-name`) or set (`+name`) a feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Toggle {
    pub feature: Feature,
    pub on: bool,
}

/// Special name: every KVM paravirtual feature (leaf 0x4000_0001), for hosts where PV
/// hypercalls misbehave.
pub const KVM_PV: &str = "kvm-pv";

/// Parses `-cx16,+xsaveerptr,-kvm-pv`. `kvm-pv` is reported as `None` in the feature slot.
pub fn parse_toggles(spec: &str) -> Result<(Vec<Toggle>, Option<bool>), String> {
    let mut toggles = Vec::new();
    let mut pv = None;
    let mut names = virtio::process::SpecKeys::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (on, name) = match item.split_at(1) {
            ("+", n) => (true, n),
            ("-", n) => (false, n),
            _ => return Err(format!("cpu feature '{item}' must start with + or -")),
        };
        names
            .once(name)
            .map_err(|_| format!("cpu feature '{name}' is given twice"))?;
        if name == KVM_PV {
            pv = Some(on);
            continue;
        }
        let feature = FEATURES
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("unknown cpu feature '{name}'"))?;
        toggles.push(Toggle {
            feature: *feature,
            on,
        });
    }
    Ok((toggles, pv))
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// The CPUID of vCPU `id` out of `count`, from KVM's supported set.
pub fn for_vcpu(
    supported: &CpuId,
    id: u8,
    count: u8,
    toggles: &[Toggle],
    kvm_pv: Option<bool>,
) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processors per package, CLFLUSH line size 8.
                e.ebx = (e.ebx & 0x0000_00ff)
                    | (u32::from(id) << 24)
                    | (u32::from(count) << 16)
                    | (8 << 8);
                e.ecx |= 1 << 31; // hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | ((u32::from(count).saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        // Core level: `count` cores.
                        e.eax = bits_for(count);
                        e.ebx = u32::from(count);
                        e.ecx = 0x200 | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            6 => {
                // No power management (APERF/MPERF, HWP...) to offer.
                e.eax = 0;
                e.ecx = 0;
            }
            0x8000_0008 => {
                // AMD: cores per package - 1.
                e.ecx = (e.ecx & !0xff) | u32::from(count.saturating_sub(1));
            }
            0x4000_0001 if kvm_pv == Some(false) => {
                e.eax = 0;
                e.edx = 0;
            }
            _ => {}
        }
        for t in toggles {
            let f = t.feature;
            if e.function == f.leaf && e.index == f.subleaf {
                let r = reg_mut(e, f.reg);
                if t.on {
                    *r |= 1 << f.bit;
                } else {
                    *r &= !(1 << f.bit);
                }
            }
        }
    }
    cpuid
}

/// Bits of the APIC id that number the cores of a package of `count`.
fn bits_for(count: u8) -> u32 {
    let n = u32::from(count.max(1));
    32 - (n - 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> CpuId {
        let mut e1 = kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        };
        e1.ecx = 1 << 13;
        let eb = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        };
        let e8 = kvm_cpuid_entry2 {
            function: 0x8000_0008,
            ..Default::default()
        };
        let pv = kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: 0xffff,
            ..Default::default()
        };
        CpuId::from_entries(&[e1, eb, e8, pv]).expect("fits")
    }

    #[test]
    fn topology_and_apic_ids_per_vcpu() {
        let c = for_vcpu(&entries(), 3, 4, &[], None);
        let e = &c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & (1 << 31), 0);
        let b = &c.as_slice()[1];
        assert_eq!((b.edx, b.ebx, b.eax), (3, 4, 2));
    }

    #[test]
    fn toggles_clear_and_set_bits() {
        let (t, pv) = parse_toggles("-cx16,+xsaveerptr,-kvm-pv").expect("valid");
        let c = for_vcpu(&entries(), 0, 1, &t, pv);
        assert_eq!(c.as_slice()[0].ecx & (1 << 13), 0);
        assert_eq!(c.as_slice()[2].ebx & (1 << 2), 4);
        assert_eq!(c.as_slice()[3].eax, 0);
    }

    #[test]
    fn bad_toggles_are_errors() {
        assert!(parse_toggles("cx16").is_err());
        assert!(parse_toggles("-nosuch").is_err());
        assert_eq!(parse_toggles("").expect("empty is fine").0.len(), 0);
    }
}
