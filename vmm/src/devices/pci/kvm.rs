//! [`PciVm`] over a real VM: KVM ioeventfds, irqfds and the VM's one GSI routing table.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use super::{Error, PciVm, Result};
use crate::irq::{GsiRouting, MsiMessage};
use crate::sys;

/// [`PciVm`] over a real VM: KVM ioeventfds, irqfds and the shared routing table.
pub struct KvmPciVm {
    vm: Arc<VmFd>,
    routing: Arc<Mutex<GsiRouting>>,
}

impl KvmPciVm {
    pub fn new(vm: Arc<VmFd>, routing: Arc<Mutex<GsiRouting>>) -> KvmPciVm {
        KvmPciVm { vm, routing }
    }

    fn routing(&self) -> std::sync::MutexGuard<'_, GsiRouting> {
        self.routing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PciVm for KvmPciVm {
    fn allocate_gsi(&self) -> Result<u32> {
        Ok(self.routing().allocate()?)
    }

    fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<()> {
        Ok(self.routing().set_msi(routes)?)
    }

    fn register_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()> {
        let e = sys::kvm_eventfd(fd).map_err(Error::Dup)?;
        self.vm
            .register_irqfd(&e, gsi)
            .map_err(|e| Error::Irqfd(gsi, e))
    }

    fn unregister_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()> {
        let e = sys::kvm_eventfd(fd).map_err(Error::Dup)?;
        self.vm
            .unregister_irqfd(&e, gsi)
            .map_err(|e| Error::Irqfd(gsi, e))
    }

    fn register_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()> {
        let e = sys::kvm_eventfd(fd).map_err(Error::Dup)?;
        // NoDatamatch: length 0, any access size and value at `addr`.
        self.vm
            .register_ioevent(&e, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| Error::Ioeventfd(addr, e))
    }

    fn unregister_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()> {
        let e = sys::kvm_eventfd(fd).map_err(Error::Dup)?;
        self.vm
            .unregister_ioevent(&e, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| Error::Ioeventfd(addr, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::vm_with_irqchip;
    use crate::irq::FIRST_MSI_GSI;

    #[test]
    fn serial_irq_lines_still_route_after_msi_routes_are_installed() {
        let vm = vm_with_irqchip();
        let mut routing = GsiRouting::new(vm.clone()).expect("default routing");
        let gsi = routing.allocate().expect("gsi");
        assert_eq!(gsi, FIRST_MSI_GSI);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        routing.set_msi(&[(gsi, Some(msg))]).expect("msi route");
        assert_eq!(routing.msi(gsi), Some(msg));
        // KVM_IRQ_LINE on the COM1/COM2 lines goes through the routing table and reaches
        // both the IOAPIC and the PIC (the pins are masked, so the request stays in IRR).
        for irq in [3u32, 4] {
            vm.set_irq_line(irq, true).expect("irq line up");
            let (ioapic, pic) = sys::irqchip_irr(&vm).expect("irqchip state");
            assert_ne!(ioapic & 1 << irq, 0, "IOAPIC pin {irq}");
            assert_ne!(pic & 1 << irq, 0, "PIC pin {irq}");
            vm.set_irq_line(irq, false).expect("irq line down");
            let (ioapic, _) = sys::irqchip_irr(&vm).expect("irqchip state");
            assert_eq!(ioapic & 1 << irq, 0, "IOAPIC pin {irq} lowered");
        }
        // An irqfd on the MSI GSI and on a serial GSI registers.
        let pvm = KvmPciVm::new(vm.clone(), Arc::new(Mutex::new(routing)));
        let call = executor::EventFd::new().expect("eventfd");
        use std::os::fd::AsFd;
        pvm.register_irqfd(call.as_fd(), gsi).expect("irqfd");
        // The same eventfd twice is refused: the first registration is live.
        assert!(pvm.register_irqfd(call.as_fd(), gsi).is_err());
        pvm.unregister_irqfd(call.as_fd(), gsi).expect("unregister");
        pvm.register_irqfd(call.as_fd(), gsi).expect("irqfd again");
        // Removing the route keeps the irqfd registered and delivers nothing.
        pvm.set_msi_routes(&[(gsi, None)]).expect("route removed");
        call.write(1).expect("signal");
    }
}
