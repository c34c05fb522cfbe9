//! KVM GSI routing: one table for the whole VM, holding the in-kernel irqchip's default
//! routes plus one MSI route per unmasked MSI-X vector.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every change goes through [`GsiRouting`],
//! which always re-sends the irqchip routes (the same as KVM's own default table, so
//! KVM_IRQ_LINE on the ISA lines — the serial ports — and the PIT keep working).

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;

/// IOAPIC pins; GSIs below this are the irqchip's.
pub const IOAPIC_PINS: u32 = 24;
/// The first GSI handed out for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no free GSI left for an MSI route")]
    GsiExhausted,
    #[error("GSI {0} was not allocated for MSI")]
    NotAllocated(u32),
    #[error("cannot build the GSI routing table")]
    Table(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_SET_GSI_ROUTING failed")]
    SetRouting(#[source] kvm_ioctls::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VM's GSI routing table.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    /// Allocated MSI GSIs and their current route (None: no route, nothing is delivered).
    msi: BTreeMap<u32, Option<MsiMessage>>,
    next_gsi: u32,
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

/// KVM's default table (virt/kvm/irqchip.c, arch/x86/kvm/irq_comm.c `default_routing`):
/// GSI n → IOAPIC pin n for n < 24, and GSI n → PIC master/slave pin n % 8 for n < 16
/// (GSI 2 included, as the kernel does).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_route(gsi, chip, gsi % 8));
        }
    }
    v
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

impl GsiRouting {
    /// Installs the default routes (the same as KVM's) and returns the table.
    pub fn new(vm: Arc<VmFd>) -> Result<GsiRouting> {
        let r = GsiRouting {
            vm,
            msi: BTreeMap::new(),
            next_gsi: FIRST_MSI_GSI,
        };
        r.apply()?;
        Ok(r)
    }

    /// A new GSI for an MSI route; it has no route (delivers nothing) until `set_msi`.
    pub fn allocate(&mut self) -> Result<u32> {
        // Both the GSI number and the table (defaults plus one route per GSI) must stay
        // within KVM's limit, even with every vector unmasked.
        let routes = default_routes().len() + self.msi.len() + 1;
        if self.next_gsi as usize >= KVM_MAX_IRQ_ROUTES || routes > KVM_MAX_IRQ_ROUTES {
            return Err(Error::GsiExhausted);
        }
        let gsi = self.next_gsi;
        self.next_gsi += 1;
        self.msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Sets or removes the MSI routes of allocated GSIs and applies the table once if
    /// anything changed.
    pub fn set_msi(&mut self, routes: &[(u32, Option<MsiMessage>)]) -> Result<()> {
        let mut changed = false;
        for &(gsi, msg) in routes {
            let slot = self.msi.get_mut(&gsi).ok_or(Error::NotAllocated(gsi))?;
            if *slot != msg {
                *slot = msg;
                changed = true;
            }
        }
        if changed {
            self.apply()?;
        }
        Ok(())
    }

    /// The current MSI route of `gsi`.
    pub fn msi(&self, gsi: u32) -> Option<MsiMessage> {
        self.msi.get(&gsi).copied().flatten()
    }

    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = default_routes();
        v.extend(
            self.msi
                .iter()
                .filter_map(|(&gsi, m)| m.map(|m| msi_route(gsi, m))),
        );
        v
    }

    fn apply(&self) -> Result<()> {
        let table = KvmIrqRouting::from_entries(&self.entries()).map_err(Error::Table)?;
        self.vm.set_gsi_routing(&table).map_err(Error::SetRouting)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// A VM with the in-kernel irqchip (the routing table needs one).
    pub(crate) fn vm_with_irqchip() -> Arc<VmFd> {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("create vm");
        vm.create_irq_chip().expect("irqchip");
        Arc::new(vm)
    }

    #[test]
    fn default_routes_match_kvm_default_table() {
        let r = default_routes();
        // GSIs 0-15: IOAPIC and PIC; 16-23: IOAPIC only.
        assert_eq!(r.len(), 40);
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        for gsi in 0..IOAPIC_PINS {
            let n = r.iter().filter(|e| e.gsi == gsi).count();
            assert_eq!(n, if gsi < 16 { 2 } else { 1 }, "gsi {gsi}");
        }
    }

    #[test]
    fn gsi_allocation_stops_where_a_full_table_would_exceed_kvm_limit() {
        let vm = vm_with_irqchip();
        let mut routing = GsiRouting::new(vm).expect("default routing");
        let mut n = 0;
        while routing.allocate().is_ok() {
            n += 1;
        }
        assert_eq!(n, KVM_MAX_IRQ_ROUTES - 40);
        assert!(matches!(routing.allocate(), Err(Error::GsiExhausted)));
        // Every allocated GSI routed at once still fits in one KVM table.
        let msg = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        });
        let all: Vec<_> = (FIRST_MSI_GSI..FIRST_MSI_GSI + n as u32)
            .map(|g| (g, msg))
            .collect();
        routing.set_msi(&all).expect("full table");
    }

    #[test]
    fn unallocated_gsi_is_rejected() {
        let vm = vm_with_irqchip();
        let mut routing = GsiRouting::new(vm).expect("default routing");
        assert!(matches!(
            routing.set_msi(&[(5, None)]),
            Err(Error::NotAllocated(5))
        ));
    }
}
