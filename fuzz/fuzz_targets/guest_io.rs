//! Fuzzes what a guest reaches from its vCPUs: every port and MMIO access goes through the
//! VMM's two buses as a vCPU's exit does, to the 8250 serial port, the i8042, the CMOS/RTC,
//! the PCI configuration ports (0xCF8..0xCFF) and the PCI MMIO window. Behind the window two
//! virtio-pci devices (different queue counts) decode their BAR0: common configuration,
//! notify, ISR, device configuration, the MSI-X table and PBA, and the
//! `VIRTIO_PCI_CAP_PCI_CFG` window in configuration space. The guest may move BARs, turn
//! decoding and MSI-X on and off, mask vectors, size and enable queues, and drive the device
//! status, all on the real `Bus`, `PciRoot` and `VirtioPciDevice`. Nothing may panic.
//!
//! Invariants checked, by a fake VM that plays KVM's side:
//! - an ioeventfd is registered only inside the MMIO window, never twice for one eventfd
//!   and address, and taken off only when it is on;
//! - an irqfd goes on only for an allocated GSI whose MSI route is installed, never twice,
//!   and comes off only when it is on; a route goes away only once no irqfd uses it;
//! - the device is activated with enabled queues only: each index below its queue count,
//!   in order, each size a power of two within its maximum.
//!
//! The fake VM fails calls as the input says, so the error paths run too (a failed call
//! leaves nothing behind, as KVM's do).
//!
//! Input layout: [failures (bitmap), then 14-byte operations: kind, length, offset (u32),
//! value (u64)].

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmm::devices::bus::{Bus, BusDevice};
use vmm::devices::cmos::Cmos;
use vmm::devices::i8042::I8042;
use vmm::devices::pci::{
    self, PciAddress, PciConfigPort, PciMmioWindow, PciRoot, PciVm, QueueConfig, VirtioDevice,
    CONFIG_PORT_BASE, CONFIG_PORT_LEN, MMIO_WINDOW_BASE, MMIO_WINDOW_SIZE,
};
use vmm::devices::serial::Serial;
use vmm::irq::{self, MsiMessage};

/// Which of the fake VM's calls fail (bits of the input's first byte).
#[derive(Default)]
struct Failures(u8);

impl Failures {
    const GSI: u8 = 1;
    const ROUTES: u8 = 2;
    const IRQFD: u8 = 4;
    const IOEVENTFD: u8 = 8;
    const ACTIVATE: u8 = 16;

    fn has(&self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

#[derive(Default)]
struct KvmState {
    next_gsi: u32,
    routes: BTreeMap<u32, MsiMessage>,
    irqfds: BTreeSet<(i32, u32)>,
    ioeventfds: BTreeSet<(i32, u64)>,
}

/// KVM's side of the PCI devices, checked.
struct FakeVm {
    fail: Failures,
    /// Calls before GSI allocation starts failing (when it fails at all).
    gsis_left: Mutex<u32>,
    state: Mutex<KvmState>,
}

fn failed() -> pci::Error {
    pci::Error::EventFd(std::io::Error::other("the fake VM refuses"))
}

impl PciVm for FakeVm {
    fn allocate_gsi(&self) -> pci::Result<u32> {
        let mut left = self.gsis_left.lock().unwrap();
        if self.fail.has(Failures::GSI) {
            if *left == 0 {
                return Err(failed());
            }
            *left -= 1;
        }
        let mut s = self.state.lock().unwrap();
        let gsi = irq::FIRST_MSI_GSI + s.next_gsi;
        s.next_gsi += 1;
        Ok(gsi)
    }

    fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> pci::Result<()> {
        let mut s = self.state.lock().unwrap();
        for (gsi, _) in routes {
            assert!(
                *gsi >= irq::FIRST_MSI_GSI && *gsi < irq::FIRST_MSI_GSI + s.next_gsi,
                "a route for GSI {gsi}, never allocated"
            );
        }
        if self.fail.has(Failures::ROUTES) && routes.len() % 2 == 1 {
            return Err(failed());
        }
        for (gsi, route) in routes {
            match route {
                Some(m) => {
                    s.routes.insert(*gsi, *m);
                }
                None => {
                    assert!(
                        !s.irqfds.iter().any(|&(_, g)| g == *gsi),
                        "the route of GSI {gsi} went while an irqfd used it"
                    );
                    s.routes.remove(gsi);
                }
            }
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> pci::Result<()> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.routes.contains_key(&gsi),
            "an irqfd on GSI {gsi}, which has no route"
        );
        if self.fail.has(Failures::IRQFD) && gsi.is_multiple_of(3) {
            return Err(failed());
        }
        assert!(
            s.irqfds.insert((fd.as_raw_fd(), gsi)),
            "an irqfd registered twice on GSI {gsi}"
        );
        Ok(())
    }

    fn unregister_irqfd(&self, fd: BorrowedFd<'_>, gsi: u32) -> pci::Result<()> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.irqfds.remove(&(fd.as_raw_fd(), gsi)),
            "an irqfd taken off GSI {gsi}, where it was not"
        );
        Ok(())
    }

    fn register_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> pci::Result<()> {
        let mut s = self.state.lock().unwrap();
        assert!(
            (MMIO_WINDOW_BASE..MMIO_WINDOW_BASE + MMIO_WINDOW_SIZE).contains(&addr),
            "an ioeventfd at {addr:#x}, outside the PCI window"
        );
        if self.fail.has(Failures::IOEVENTFD) && addr.is_multiple_of(3) {
            return Err(failed());
        }
        assert!(
            s.ioeventfds.insert((fd.as_raw_fd(), addr)),
            "an ioeventfd registered twice at {addr:#x}"
        );
        Ok(())
    }

    fn unregister_ioeventfd(&self, fd: BorrowedFd<'_>, addr: u64) -> pci::Result<()> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.ioeventfds.remove(&(fd.as_raw_fd(), addr)),
            "an ioeventfd taken off {addr:#x}, where it was not"
        );
        Ok(())
    }
}

/// A device on the port bus: the device, its first port, how many.
type PortDevice = (Arc<Mutex<dyn BusDevice>>, u64, u64);

const CONFIG_LEN: usize = 24;

/// A virtio device with a configuration space of its own, that checks what it is activated
/// with.
struct FakeDevice {
    name: String,
    queues: usize,
    max_queue_size: u16,
    config: [u8; CONFIG_LEN],
    fail_activate: bool,
}

impl VirtioDevice for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }
    fn features(&self) -> u64 {
        1 << 1 | 1 << 6 | 1 << 28 | 1 << 29
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .and_then(|end| self.config.get(start..end))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(dst) = start
            .checked_add(data.len())
            .and_then(|end| self.config.get_mut(start..end))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        _features: u64,
        queues: &[QueueConfig<'_>],
    ) -> std::result::Result<(), String> {
        let mut last = None;
        for q in queues {
            assert!(q.index < self.queues, "queue {} activated", q.index);
            assert!(last < Some(q.index), "queues out of order or twice");
            last = Some(q.index);
            assert!(
                q.size.is_power_of_two() && q.size <= self.max_queue_size,
                "queue size {}",
                q.size
            );
        }
        if self.fail_activate {
            return Err("the fake device refuses".into());
        }
        Ok(())
    }
    fn reset(&mut self) {}
}

fn device(name: &str, queues: usize, fail_activate: bool) -> Box<dyn VirtioDevice> {
    Box::new(FakeDevice {
        name: name.to_string(),
        queues,
        max_queue_size: 256,
        config: std::array::from_fn(|i| i as u8),
        fail_activate,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&fail, ops)) = data.split_first() else {
        return;
    };
    let vm = Arc::new(FakeVm {
        fail: Failures(fail),
        gsis_left: Mutex::new(u32::from(fail >> 5)),
        state: Mutex::new(KvmState::default()),
    });
    let mut root = PciRoot::new(vm.clone());
    let activate_fails = fail & Failures::ACTIVATE != 0;
    let mut devices = Vec::new();
    for (name, queues) in [("one", 1), ("three", 3)] {
        // Only GSI allocation fails here; the device is then left out, as the VMM would
        // refuse to start.
        if let Ok(info) = root.add_virtio_device(device(name, queues, activate_fails)) {
            devices.push(info.address);
        }
    }
    let root = Arc::new(Mutex::new(root));
    // The buses as `vm.rs` builds them (COM1 only).
    let mut pio = Bus::default();
    let serial = Serial::new(Box::new(std::io::sink()), Box::new(|| {}));
    let devices_on_ports: [PortDevice; 4] = [
        (Arc::new(Mutex::new(serial)), 0x3f8, 8),
        (Arc::new(Mutex::new(I8042::new(Box::new(|| {})))), 0x60, 5),
        (Arc::new(Mutex::new(Cmos::new(128 << 20, 0))), 0x70, 2),
        (
            Arc::new(Mutex::new(PciConfigPort(root.clone()))),
            CONFIG_PORT_BASE,
            CONFIG_PORT_LEN,
        ),
    ];
    for (dev, base, len) in devices_on_ports {
        pio.insert(dev, base, len).expect("the ports of vm.rs");
    }
    let mut mmio = Bus::default();
    mmio.insert(
        Arc::new(Mutex::new(PciMmioWindow(root.clone()))),
        MMIO_WINDOW_BASE,
        MMIO_WINDOW_SIZE,
    )
    .expect("the PCI window");
    let cfg = CONFIG_PORT_BASE;
    let window = MMIO_WINDOW_BASE;

    for op in ops.chunks_exact(14) {
        let kind = op[0];
        let len = usize::from(op[1] % 8) + 1;
        let offset = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        let value =
            u64::from_le_bytes([op[6], op[7], op[8], op[9], op[10], op[11], op[12], op[13]]);
        let bytes = value.to_le_bytes();
        let mut buf = [0u8; 8];
        match kind % 8 {
            // CONFIG_ADDRESS for a register of slot 0..3 (the slots that hold something).
            0 => {
                let slot = offset & 3;
                let reg = (offset >> 8) & 0xfc;
                pio.write(cfg, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
            }
            // CONFIG_ADDRESS as the guest wrote it, reserved bits and all.
            1 => {
                pio.write(cfg, &(value as u32).to_le_bytes());
            }
            // The data port, at 0xCFC..0xCFF with the guest's access size.
            2 => {
                pio.read(cfg + 4 + u64::from(offset & 3), &mut buf[..len.min(4)]);
            }
            3 => {
                pio.write(cfg + 4 + u64::from(offset & 3), &bytes[..len.min(4)]);
            }
            // The MMIO window near the BARs (the first 1 MiB, where they are assigned).
            4 => {
                mmio.read(window + u64::from(offset & 0xf_ffff), &mut buf[..len]);
            }
            5 => {
                mmio.write(window + u64::from(offset & 0xf_ffff), &bytes[..len]);
            }
            // Any port below 0x1000 (every device on ports is there) or anywhere, and
            // anywhere in the window, with any access size.
            6 => {
                let port = if value & 2 == 0 {
                    u64::from(offset & 0xfff)
                } else {
                    u64::from(offset)
                };
                let addr = window + u64::from(offset) % MMIO_WINDOW_SIZE;
                if value & 1 == 0 {
                    pio.read(port, &mut buf[..len]);
                    mmio.read(addr, &mut buf[..len]);
                } else {
                    pio.write(port, &bytes[..len]);
                    mmio.write(addr, &bytes[..len]);
                }
            }
            // The device's configuration changed (a backend's CONFIG_CHANGE_MSG).
            _ => {
                let address = devices
                    .get(offset as usize % devices.len().max(1))
                    .copied()
                    .unwrap_or(PciAddress {
                        bus: 0,
                        device: 9,
                        function: 0,
                    });
                root.lock().unwrap().virtio_config_changed(address);
            }
        }
    }
});
