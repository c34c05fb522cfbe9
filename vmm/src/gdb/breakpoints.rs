//! Breakpoint bookkeeping: the four debug-register slots (hardware breakpoints and
//! watchpoints), the int3 bytes patched for software breakpoints, and what
//! `KVM_SET_GUEST_DEBUG` gets from them.

use std::collections::BTreeMap;

use gdbstub::target::ext::breakpoints::WatchKind;
use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};

/// What a debug-register slot watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Exec,
    Watch(WatchKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HwEntry {
    addr: u64,
    slot: Slot,
    len: u64,
}

/// Where a software breakpoint's int3 went and the byte it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    pub gpa: u64,
    pub orig: u8,
}

/// Every breakpoint GDB has set. The same on every vCPU, as GDB expects.
#[derive(Debug, Default)]
pub struct Breakpoints {
    hw: [Option<HwEntry>; 4],
    /// Software breakpoints by guest virtual address.
    pub sw: BTreeMap<u64, Patch>,
}

impl Breakpoints {
    /// Takes a free debug register; false if all four are used or the range cannot be
    /// watched (x86 watches 1, 2, 4 or 8 naturally aligned bytes).
    pub fn add_hw(&mut self, addr: u64, slot: Slot, len: u64) -> bool {
        let len = if slot == Slot::Exec { 1 } else { len };
        if !matches!(len, 1 | 2 | 4 | 8) || !addr.is_multiple_of(len) {
            return false;
        }
        // x86 has no read-only watchpoint: a read watch is a read/write one.
        let entry = HwEntry { addr, slot, len };
        if self.hw.contains(&Some(entry)) {
            return true;
        }
        match self.hw.iter_mut().find(|e| e.is_none()) {
            Some(free) => {
                *free = Some(entry);
                true
            }
            None => false,
        }
    }

    /// Frees the slot that holds exactly this breakpoint; false if none did.
    pub fn remove_hw(&mut self, addr: u64, slot: Slot, len: u64) -> bool {
        let len = if slot == Slot::Exec { 1 } else { len };
        let entry = Some(HwEntry { addr, slot, len });
        match self.hw.iter_mut().find(|e| **e == entry) {
            Some(e) => {
                *e = None;
                true
            }
            None => false,
        }
    }

    /// What the debug registers that DR6 says fired (its bits 0-3) were set for.
    pub fn hit(&self, dr6: u64) -> Option<(Slot, u64)> {
        (0..4)
            .filter(|i| dr6 & (1 << i) != 0)
            .find_map(|i| self.hw[i].map(|e| (e.slot, e.addr)))
    }

    /// The `KVM_SET_GUEST_DEBUG` argument for a vCPU; `step` sets the trap flag for one
    /// instruction. Without breakpoints or a step, guest debugging is off.
    pub fn guest_debug(&self, step: bool) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, e) in self.hw.iter().enumerate() {
            let Some(e) = e else { continue };
            let rw = match e.slot {
                Slot::Exec => 0b00,
                Slot::Watch(WatchKind::Write) => 0b01,
                Slot::Watch(_) => 0b11,
            };
            let len = match e.len {
                1 => 0b00,
                2 => 0b01,
                8 => 0b10,
                _ => 0b11,
            };
            dbg.arch.debugreg[i] = e.addr;
            // Global enable, then R/W and LEN in bits 16 + 4i.
            dr7 |= (0b10 << (2 * i)) | ((rw | (len << 2)) << (16 + 4 * i));
        }
        let hw = dr7 != 0;
        if hw {
            // GE: exact breakpoint detection, as Intel recommends.
            dr7 |= 1 << 9;
        }
        dbg.arch.debugreg[7] = dr7;
        if hw {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        }
        if !self.sw.is_empty() {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        if step {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        dbg
    }

    /// Forgets the hardware breakpoints and hands back the software ones to unpatch.
    pub fn clear(&mut self) -> BTreeMap<u64, Patch> {
        self.hw = [None; 4];
        std::mem::take(&mut self.sw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_encodes_exec_and_write_watch() {
        let mut b = Breakpoints::default();
        assert!(b.add_hw(0x1000, Slot::Exec, 1));
        assert!(b.add_hw(0x2000, Slot::Watch(WatchKind::Write), 4));
        let d = b.guest_debug(false);
        assert_eq!(d.arch.debugreg[0], 0x1000);
        assert_eq!(d.arch.debugreg[1], 0x2000);
        // G0, G1, GE; slot 1: R/W=01, LEN=11.
        assert_eq!(d.arch.debugreg[7], 0b1010 | (1 << 9) | (0b1101 << 20));
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(b.hit(0b10), Some((Slot::Watch(WatchKind::Write), 0x2000)));
        assert_eq!(b.hit(0b100), None);
    }

    #[test]
    fn only_four_slots_and_aligned_lengths() {
        let mut b = Breakpoints::default();
        for i in 0..4 {
            assert!(b.add_hw(0x1000 + i, Slot::Exec, 1));
        }
        assert!(!b.add_hw(0x5000, Slot::Exec, 1));
        assert!(b.remove_hw(0x1002, Slot::Exec, 1));
        assert!(!b.remove_hw(0x1002, Slot::Exec, 1));
        assert!(!b.add_hw(0x3001, Slot::Watch(WatchKind::Write), 4));
        assert!(!b.add_hw(0x3000, Slot::Watch(WatchKind::Write), 3));
        assert!(!b.add_hw(0x3000, Slot::Watch(WatchKind::Write), u64::MAX));
        assert!(b.add_hw(0x3000, Slot::Watch(WatchKind::ReadWrite), 8));
    }

    proptest::proptest! {
        /// Addresses and lengths come from the client: any pair is taken or refused, and
        /// the debug registers only ever hold what was taken.
        #[test]
        fn any_watch_is_taken_or_refused(addr: u64, len: u64, write: bool) {
            let mut b = Breakpoints::default();
            let kind = if write { WatchKind::Write } else { WatchKind::ReadWrite };
            let taken = b.add_hw(addr, Slot::Watch(kind), len);
            let d = b.guest_debug(false);
            proptest::prop_assert_eq!(taken, d.arch.debugreg[7] != 0);
            if taken {
                proptest::prop_assert_eq!(d.arch.debugreg[0], addr);
                proptest::prop_assert!(b.remove_hw(addr, Slot::Watch(kind), len));
            }
        }
    }

    #[test]
    fn nothing_set_turns_guest_debug_off() {
        let b = Breakpoints::default();
        assert_eq!(b.guest_debug(false).control, 0);
        assert_eq!(
            b.guest_debug(true).control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        );
    }
}
