//! PCI: a root bus 0 behind configuration mechanism #1 (ports 0xCF8/0xCFC), a host bridge at
//! 00:00.0, virtio-pci devices at 00:01.0, 00:02.0, ... and one MMIO window in which the BARs
//! live.
//!
//! The window `[MMIO_WINDOW_BASE, MMIO_WINDOW_BASE + MMIO_WINDOW_SIZE)` is one range on the
//! MMIO bus; [`PciRoot`] dispatches each access to the BAR that decodes it at that moment,
//! so the guest may move BARs. BARs are pre-assigned by [`PciRoot::add_virtio_device`].
//!
//! Locking: vCPU threads reach the root through [`PciConfigPort`] and [`PciMmioWindow`],
//! under the root's mutex. Under it the transport takes the GSI routing lock (never the other
//! way round), and calls [`VirtioDevice`] methods — `activate` and `reset` included — on the
//! vCPU thread: they must not block without a bound (a vhost-user reply needs a timeout).

pub mod config;
pub mod host_bridge;
mod kvm;
pub mod msix;
pub mod virtio_pci;

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;
use crate::irq::{self, MsiMessage};

pub use config::PciConfig;
pub use host_bridge::HostBridge;
pub use kvm::KvmPciVm;
pub use virtio_pci::{QueueConfig, VirtioDevice, VirtioPciDevice};

/// Start of the 32-bit PCI MMIO window: the MMIO hole, where RAM below 4 GiB ends.
pub const MMIO_WINDOW_BASE: u64 = memory::MMIO_HOLE_START;
/// Size of the window; it ends below the IOAPIC (0xFEC00000) and the LAPIC (0xFEE00000).
pub const MMIO_WINDOW_SIZE: u64 = 0xfc00_0000 - MMIO_WINDOW_BASE;
const _: () = assert!(
    MMIO_WINDOW_BASE + MMIO_WINDOW_SIZE <= crate::boot::layout::IOAPIC_ADDR as u64,
    "the PCI window ends below the IOAPIC"
);
/// The configuration ports: address at 0xCF8, data at 0xCFC..0xCFF.
pub const CONFIG_PORT_BASE: u64 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;
/// Devices on bus 0 (slot 0 is the host bridge).
pub const MAX_SLOTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no free PCI slot on bus 0")]
    NoSlot,
    #[error("the PCI MMIO window has no room for a {0:#x}-byte BAR")]
    NoMmioSpace(u64),
    #[error("device {name}: {why}")]
    BadDevice { name: String, why: String },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot duplicate an eventfd")]
    Dup(#[source] std::io::Error),
    #[error("GSI routing")]
    Routing(#[from] irq::Error),
    #[error("irqfd on GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("ioeventfd at {0:#x}")]
    Ioeventfd(u64, #[source] kvm_ioctls::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What PCI devices need from the VM: MSI routes, irqfds and MMIO ioeventfds. The real one is
/// [`KvmPciVm`]; tests use a recording fake.
pub trait PciVm: Send + Sync {
    /// A GSI of its own for one MSI-X vector; it routes nowhere until `set_msi_routes`.
    fn allocate_gsi(&self) -> Result<u32>;
    /// Sets (Some) or removes (None) the routes of allocated GSIs, in one table update.
    fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<()>;
    fn register_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()>;
    /// An MMIO ioeventfd at `addr` for any access size and any value.
    fn register_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()>;
    fn unregister_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()>;
}

/// A function on bus 0. Config accesses are 1, 2 or 4 bytes inside one dword of the 256-byte
/// space (the root checks); BAR accesses are inside a BAR the config space decodes.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The virtio transport, if this function is one.
    fn as_virtio(&mut self) -> Option<&mut VirtioPciDevice> {
        None
    }
}

/// Bus/device/function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus, self.device, self.function
        )
    }
}

/// Where an added device ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub address: PciAddress,
    /// The pre-assigned guest-physical address of BAR0 (the guest may move it later).
    pub bar0: u64,
    pub bar0_size: u64,
}

/// Bus 0: the functions, the config address register and the MMIO window allocator.
pub struct PciRoot {
    slots: Vec<Box<dyn PciDevice>>,
    config_address: u32,
    vm: Arc<dyn PciVm>,
    next_bar: u64,
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00:00.0.
    pub fn new(vm: Arc<dyn PciVm>) -> PciRoot {
        PciRoot {
            slots: vec![Box::new(HostBridge::new())],
            config_address: 0,
            vm,
            next_bar: MMIO_WINDOW_BASE,
        }
    }

    /// Adds a virtio device in the next slot with its BAR0 assigned in the MMIO window.
    /// Call before the vCPUs start.
    pub fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<PciDeviceInfo> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(Error::NoSlot);
        }
        let size = virtio_pci::bar0_size(device.as_ref())?;
        let bar0 = self.allocate_bar(size)?;
        let dev = VirtioPciDevice::new(device, self.vm.clone(), bar0)?;
        let address = PciAddress {
            bus: 0,
            device: self.slots.len() as u8,
            function: 0,
        };
        self.slots.push(Box::new(dev));
        self.next_bar = bar0 + size;
        Ok(PciDeviceInfo {
            address,
            bar0,
            bar0_size: size,
        })
    }

    /// The device configuration of the virtio device at `address` changed (a vhost-user
    /// CONFIG_CHANGE_MSG, say): bumps config_generation and interrupts the driver on its
    /// configuration vector. Returns false if no virtio device is there.
    pub fn virtio_config_changed(&mut self, address: PciAddress) -> bool {
        if address.bus != 0 || address.function != 0 {
            return false;
        }
        match self
            .slots
            .get_mut(usize::from(address.device))
            .and_then(|d| d.as_virtio())
        {
            Some(d) => {
                d.config_changed();
                true
            }
            None => false,
        }
    }

    fn allocate_bar(&self, size: u64) -> Result<u64> {
        // Naturally aligned, as BARs are.
        let base = self.next_bar.div_ceil(size) * size;
        match base.checked_add(size) {
            Some(end) if end <= MMIO_WINDOW_BASE + MMIO_WINDOW_SIZE => Ok(base),
            _ => Err(Error::NoMmioSpace(size)),
        }
    }

    /// The device addressed by CONFIG_ADDRESS and the register offset, if enabled and present.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.config_address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (a >> 16) & 0xff;
        let device = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        if bus != 0 || function != 0 || device >= self.slots.len() {
            return None;
        }
        Some((device, (a & 0xfc) as usize))
    }

    /// A config read on the data port: `offset` 0..4 within 0xCFC.
    fn config_data_read(&mut self, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        if offset + data.len() > 4 {
            return;
        }
        if let Some((slot, reg)) = self.selected() {
            self.slots[slot].config_read(reg + offset, data);
        }
    }

    fn config_data_write(&mut self, offset: usize, data: &[u8]) {
        if offset + data.len() > 4 {
            return;
        }
        if let Some((slot, reg)) = self.selected() {
            self.slots[slot].config_write(reg + offset, data);
        }
    }

    /// The device and BAR decoding `[addr, addr + len)`, and the offset in that BAR.
    fn decode(&self, addr: u64, len: usize) -> Option<(usize, usize, u64)> {
        self.slots.iter().enumerate().find_map(|(slot, d)| {
            d.config()
                .decode(addr, len as u64)
                .map(|(bar, off)| (slot, bar, off))
        })
    }

    /// An MMIO read at guest-physical `addr` inside the window.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.decode(addr, data.len()) {
            Some((slot, bar, off)) => self.slots[slot].bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    /// An MMIO write at guest-physical `addr` inside the window.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if let Some((slot, bar, off)) = self.decode(addr, data.len()) {
            self.slots[slot].bar_write(bar, off, data);
        }
    }
}

fn lock(root: &Mutex<PciRoot>) -> std::sync::MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|e| e.into_inner())
}

/// The config ports 0xCF8..0xCFF on the port I/O bus.
pub struct PciConfigPort(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = lock(&self.0);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&root.config_address.to_le_bytes()),
            4..=7 => root.config_data_read(offset as usize - 4, data),
            // Byte and word accesses to 0xCF8..0xCFB are not the address register (0xCF9 is
            // the reset control register on real chipsets): nothing here.
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.0);
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // Bits 1:0 are reserved and read as 0; 30:24 are reserved too.
                root.config_address = u32::from_le_bytes(b) & 0x80ff_fffc;
            }
            4..=7 => root.config_data_write(offset as usize - 4, data),
            _ => {}
        }
    }
}

/// The PCI MMIO window on the MMIO bus; offsets are relative to [`MMIO_WINDOW_BASE`].
pub struct PciMmioWindow(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).mmio_read(MMIO_WINDOW_BASE + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).mmio_write(MMIO_WINDOW_BASE + offset, data);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// What a fake VM saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Routes(Vec<(u32, Option<MsiMessage>)>),
        Irqfd(i32, u32),
        NoIrqfd(i32, u32),
        Ioeventfd(i32, u64),
        NoIoeventfd(i32, u64),
    }

    /// A PciVm that records calls; fds are recorded by their inode-independent raw number.
    #[derive(Default)]
    pub struct FakeVm {
        pub calls: Mutex<Vec<Call>>,
        next_gsi: Mutex<u32>,
    }

    impl FakeVm {
        pub fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().expect("lock"))
        }
        fn push(&self, c: Call) {
            self.calls.lock().expect("lock").push(c);
        }
    }

    impl PciVm for FakeVm {
        fn allocate_gsi(&self) -> Result<u32> {
            let mut n = self.next_gsi.lock().expect("lock");
            *n += 1;
            Ok(irq::FIRST_MSI_GSI + *n - 1)
        }
        fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<()> {
            self.push(Call::Routes(routes.to_vec()));
            Ok(())
        }
        fn register_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()> {
            self.push(Call::Irqfd(fd.as_raw_fd(), gsi));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> Result<()> {
            self.push(Call::NoIrqfd(fd.as_raw_fd(), gsi));
            Ok(())
        }
        fn register_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()> {
            self.push(Call::Ioeventfd(fd.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> Result<()> {
            self.push(Call::NoIoeventfd(fd.as_raw_fd(), addr));
            Ok(())
        }
    }

    fn root() -> Arc<Mutex<PciRoot>> {
        Arc::new(Mutex::new(PciRoot::new(Arc::new(FakeVm::default()))))
    }

    fn cfg_read(port: &mut PciConfigPort, bdf_reg: u32, offset: u64, len: usize) -> u32 {
        port.write(0, &bdf_reg.to_le_bytes());
        let mut b = [0u8; 4];
        port.read(4 + offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_answers_at_00_00_0_and_absent_functions_read_all_ones() {
        let mut port = PciConfigPort(root());
        assert_eq!(cfg_read(&mut port, 0x8000_0000, 0, 4), 0x0d57_8086);
        assert_eq!(cfg_read(&mut port, 0x8000_0008, 0, 4) >> 8, 0x06_0000);
        // Word and byte reads at the low bits of the data port.
        assert_eq!(cfg_read(&mut port, 0x8000_0000, 2, 2), 0x0d57);
        assert_eq!(cfg_read(&mut port, 0x8000_0008, 3, 1), 0x06);
        // Device 1, function 1 of device 0, bus 1, and the enable bit off.
        assert_eq!(cfg_read(&mut port, 0x8000_0800, 0, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut port, 0x8000_0100, 0, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut port, 0x8001_0000, 0, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut port, 0x0000_0000, 0, 4), 0xffff_ffff);
        // The address register reads back without its reserved bits.
        port.write(0, &0x8000_0803u32.to_le_bytes());
        let mut b = [0u8; 4];
        port.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
    }

    #[test]
    fn junk_accesses_to_the_config_ports_do_not_panic() {
        let mut port = PciConfigPort(root());
        port.write(0, &0x8000_00fcu32.to_le_bytes());
        for off in 0..8u64 {
            for len in [1usize, 2, 4, 8] {
                let mut b = vec![0u8; len];
                port.read(off, &mut b);
                port.write(off, &[0xff; 8][..len]);
            }
        }
        port.write(1, &[0xfe]); // 0xCF9: reset control, ignored
        assert_eq!(cfg_read(&mut port, 0x8000_0000, 0, 4), 0x0d57_8086);
    }

    #[test]
    fn mmio_outside_any_bar_reads_all_ones() {
        let r = root();
        let mut w = PciMmioWindow(r.clone());
        let mut b = [0u8; 4];
        w.read(0x1234, &mut b);
        assert_eq!(b, [0xff; 4]);
        w.write(0x1234, &[1, 2, 3, 4]);
    }
}
