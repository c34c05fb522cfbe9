//! The virtio-pci modern transport (virtio 1.2 §4.1): vendor capabilities pointing into BAR0,
//! the common configuration state machine, notifications through KVM ioeventfds and
//! interrupts through MSI-X vectors routed to KVM irqfds.
//!
//! BAR0 layout (page-aligned regions):
//!
//! | offset   | region                                   |
//! | -------- | ---------------------------------------- |
//! | 0x0000   | common configuration                     |
//! | 0x1000   | ISR status (always 0: MSI-X only)        |
//! | 0x2000   | device configuration (0x1000 bytes)      |
//! | 0x3000   | notify: queue `n` at 0x3000 + 4n         |
//! | 0x4000   | MSI-X table (queues + 1 vectors)         |
//! | after    | MSI-X PBA                                |
//!
//! Interrupts need MSI-X: the function has no INTx pin, and a queue whose vector is
//! NO_VECTOR gets no call eventfd. A vector delivers while MSI-X is enabled and neither the
//! function nor the vector is masked: then its GSI has an MSI route and the call eventfds of
//! the queues using it are KVM irqfds on that GSI. Masking removes the irqfds (and the
//! route), so signals accumulate in the eventfd; the PBA bit reads as set while they wait,
//! and unmasking re-registers the irqfd, which KVM delivers at once if the eventfd is
//! signalled.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use executor::EventFd;

use super::config::{PciConfig, PciId, COMMAND, COMMAND_MEMORY};
use super::msix::{self, Msix, NO_VECTOR};
use super::{Error, PciDevice, PciVm, Result, MMIO_WINDOW_BASE, MMIO_WINDOW_SIZE};
use crate::irq::MsiMessage;
use crate::sys;

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bits 24 to 49 are the transport's (virtio 1.2 §6; the rest are the device
/// type's). Of these only what this transport and its split rings implement is offered,
/// whatever a device (a vhost-user backend, say) offers: INDIRECT_DESC (28), EVENT_IDX
/// (29), VERSION_1 (32), IN_ORDER (35) and ORDER_PLATFORM (36). Never: the legacy
/// NOTIFY_ON_EMPTY (24) and ANY_LAYOUT (27), ACCESS_PLATFORM (33: there is no IOMMU),
/// RING_PACKED (34: a restart reads the split layout), SR_IOV (37), NOTIFICATION_DATA (38),
/// NOTIF_CONFIG_DATA (39), RING_RESET (40), ADMIN_VQ (41), or a bit not defined yet.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 =
    (((1 << 50) - 1) & !((1 << 24) - 1)) & !(1 << 28 | 1 << 29 | 1 << 32 | 1 << 35 | 1 << 36);

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Most queues a device may have (notify area and MSI-X table stay within a few pages).
pub const MAX_QUEUES: usize = 1024;
pub const MAX_QUEUE_SIZE: u16 = 32768;

const VIRTIO_CAP_ID: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;
const NOTIFY_MULTIPLIER: u64 = 4;

const PAGE: u64 = 0x1000;
const COMMON_OFFSET: u64 = 0;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Size of `virtio_pci_common_cfg` including queue_notify_data and queue_reset.
const COMMON_LEN: usize = 0x3c;

/// A virtio device behind the transport (in ringvm: a vhost-user frontend to a device
/// process).
pub trait VirtioDevice: Send {
    /// "rng", "block0": for logs and errors.
    fn name(&self) -> &str;
    fn device_type(&self) -> u32;
    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> u16;
    /// Offered to the driver; the transport adds VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start the device with the negotiated features and the enabled queues.
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig<'_>],
    ) -> std::result::Result<(), String>;
    /// The driver wrote 0 to device_status (or the device must stop): stop all queues.
    fn reset(&mut self);
}

/// One enabled queue handed to [`VirtioDevice::activate`].
#[derive(Debug)]
pub struct QueueConfig<'a> {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Signalled when the driver notifies the queue (a KVM ioeventfd on its notify address).
    pub kick: BorrowedFd<'a>,
    /// Signal to interrupt the driver (a KVM irqfd on the queue's MSI-X vector); `None` if
    /// the driver gave the queue no vector.
    pub call: Option<BorrowedFd<'a>>,
}

fn class_of(device_type: u32) -> u32 {
    virtio::DeviceType::from_id(device_type).map_or(0xff_0000, virtio::DeviceType::pci_class)
}

/// Offsets of the regions that depend on the queue count.
#[derive(Debug, Clone, Copy)]
struct Layout {
    queues: usize,
    vectors: usize,
    notify_len: u64,
    pba: u64,
    pba_len: u64,
    size: u64,
}

fn page_align(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

fn layout(device: &dyn VirtioDevice) -> Result<Layout> {
    let bad = |why: String| Error::BadDevice {
        name: device.name().to_string(),
        why,
    };
    let queues = device.num_queues();
    if queues > MAX_QUEUES {
        return Err(bad(format!("{queues} queues (at most {MAX_QUEUES})")));
    }
    let qsize = device.max_queue_size();
    if !qsize.is_power_of_two() || qsize > MAX_QUEUE_SIZE {
        return Err(bad(format!(
            "maximum queue size {qsize} is not a power of two up to {MAX_QUEUE_SIZE}"
        )));
    }
    let device_type = device.device_type();
    if device_type > 0xffff - u32::from(VIRTIO_PCI_DEVICE_BASE) {
        return Err(bad(format!("device type {device_type}")));
    }
    let vectors = queues + 1;
    let notify_len = queues.max(1) as u64 * NOTIFY_MULTIPLIER;
    let pba = MSIX_TABLE_OFFSET + page_align(vectors as u64 * msix::ENTRY_SIZE);
    let pba_len = (vectors as u64).div_ceil(64) * 8;
    let size = (pba + page_align(pba_len)).next_power_of_two();
    Ok(Layout {
        queues,
        vectors,
        notify_len,
        pba,
        pba_len,
        size,
    })
}

/// The BAR0 size the transport needs for `device`.
pub fn bar0_size(device: &dyn VirtioDevice) -> Result<u64> {
    Ok(layout(device)?.size)
}

struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    kick: EventFd,
    call: EventFd,
    /// The GSI the call eventfd is an irqfd on.
    irqfd: Option<u32>,
    /// The address the kick eventfd is an ioeventfd on.
    ioeventfd: Option<u64>,
}

impl Queue {
    fn reset(&mut self, max_size: u16) {
        self.size = max_size;
        self.vector = NO_VECTOR;
        self.enabled = false;
        self.desc = 0;
        self.driver = 0;
        self.device = 0;
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    vm: Arc<dyn PciVm>,
    layout: Layout,
    max_queue_size: u16,
    msix: Msix,
    /// The GSI of each MSI-X vector, and the route last installed for it.
    gsis: Vec<u32>,
    routes: Vec<Option<MsiMessage>>,
    pci_cfg_cap: Option<usize>,
    // Common configuration.
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    /// Signals a configuration change on `config_vector`.
    config_call: EventFd,
    config_irqfd: Option<u32>,
    /// What the driver causes (a failed activation), under the guest-message rate limit.
    guest_log: virtio::GuestLog,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

impl VirtioPciDevice {
    /// The transport for `device` with BAR0 at `bar0` and memory decoding on (ringvm
    /// assigns BARs like firmware would).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        vm: Arc<dyn PciVm>,
        bar0: u64,
    ) -> Result<VirtioPciDevice> {
        let layout = layout(device.as_ref())?;
        let name = device.name().to_string();
        let bad = |why: &str| Error::BadDevice {
            name: name.clone(),
            why: why.to_string(),
        };
        let mut config = PciConfig::new(PciId {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device.device_type() as u16,
            class: class_of(device.device_type()),
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        let bar_addr = u32::try_from(bar0).map_err(|_| bad("BAR0 above 4 GiB"))?;
        config.add_bar32(0, layout.size, bar_addr);
        let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut b = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(length as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        let caps = [
            cap(CFG_COMMON, COMMON_OFFSET, PAGE, &[]),
            cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                layout.notify_len,
                &(NOTIFY_MULTIPLIER as u32).to_le_bytes(),
            ),
            cap(CFG_ISR, ISR_OFFSET, PAGE, &[]),
            cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_LEN, &[]),
        ];
        for body in caps {
            config
                .add_capability(VIRTIO_CAP_ID, &body)
                .ok_or_else(|| bad("config space full"))?;
        }
        let msix = Msix::new(
            &mut config,
            layout.vectors,
            0,
            MSIX_TABLE_OFFSET as u32,
            layout.pba as u32,
        )
        .ok_or_else(|| bad("config space full"))?;
        // VIRTIO_PCI_CAP_PCI_CFG: a window into BAR0 through config space.
        let pci_cfg_cap = config.add_capability(VIRTIO_CAP_ID, &cap(CFG_PCI, 0, 0, &[0; 4]));
        if let Some(at) = pci_cfg_cap {
            config.set_wmask(at + 4, &[0xff]); // bar
            config.set_wmask(at + 8, &[0xff; 12]); // offset, length, data
        }
        config.set_u16(COMMAND, COMMAND_MEMORY);

        let mut gsis = Vec::with_capacity(layout.vectors);
        for _ in 0..layout.vectors {
            gsis.push(vm.allocate_gsi()?);
        }
        let max_queue_size = device.max_queue_size();
        let mut queues = Vec::with_capacity(layout.queues);
        for _ in 0..layout.queues {
            let mut q = Queue {
                size: 0,
                vector: NO_VECTOR,
                enabled: false,
                desc: 0,
                driver: 0,
                device: 0,
                kick: EventFd::new().map_err(Error::EventFd)?,
                call: EventFd::new().map_err(Error::EventFd)?,
                irqfd: None,
                ioeventfd: None,
            };
            q.reset(max_queue_size);
            queues.push(q);
        }
        let mut dev = VirtioPciDevice {
            config,
            device,
            vm,
            layout,
            max_queue_size,
            msix,
            routes: vec![None; gsis.len()],
            gsis,
            pci_cfg_cap,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            config_call: EventFd::new().map_err(Error::EventFd)?,
            config_irqfd: None,
            guest_log: virtio::GuestLog::with_source(format!("ringvm: device {name}")),
        };
        dev.sync_notify();
        Ok(dev)
    }

    fn log(&self, what: &str) {
        eprintln!("ringvm: device {}: {what}", self.device.name());
    }

    fn log_error(&self, e: &Error) {
        self.log(&error_chain(e));
    }

    /// Features offered to the driver.
    fn offered(&self) -> u64 {
        (self.device.features() | VIRTIO_F_VERSION_1) & !UNSUPPORTED_TRANSPORT_FEATURES
    }

    /// The device configuration changed: a new config_generation, and an interrupt on the
    /// configuration vector (held in the eventfd if the driver has not given one yet).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            let _ = self.config_call.write(1);
        }
    }

    /// Registers the kick ioeventfds at the notify addresses of the current BAR0, or
    /// unregisters them when BAR0 moved, stopped decoding or left the MMIO window.
    fn sync_notify(&mut self) {
        let size = self.layout.size;
        let base = self
            .config
            .decoded_bar(0)
            .filter(|&b| b >= MMIO_WINDOW_BASE && b + size <= MMIO_WINDOW_BASE + MMIO_WINDOW_SIZE);
        let vm = self.vm.clone();
        let mut errors = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            let want = base.map(|b| b + NOTIFY_OFFSET + i as u64 * NOTIFY_MULTIPLIER);
            if q.ioeventfd == want {
                continue;
            }
            if let Some(old) = q.ioeventfd.take() {
                if let Err(e) = vm.unregister_ioeventfd(q.kick.as_fd(), old) {
                    errors.push(e);
                }
            }
            if let Some(addr) = want {
                match vm.register_ioeventfd(q.kick.as_fd(), addr) {
                    Ok(()) => q.ioeventfd = Some(addr),
                    // The MMIO exit path still kicks the queue.
                    Err(e) => errors.push(e),
                }
            }
        }
        for e in &errors {
            self.log_error(e);
        }
    }

    /// Brings MSI routes and irqfds in line with the MSI-X state and the vectors the driver
    /// assigned: irqfds come off before their route goes, and go on after it is installed.
    fn sync_interrupts(&mut self) {
        let want: Vec<Option<MsiMessage>> = (0..self.layout.vectors)
            .map(|v| self.msix.deliverable(&self.config, v))
            .collect();
        let gsis = &self.gsis;
        let target = |vector: u16| {
            let v = usize::from(vector);
            want.get(v).copied().flatten().map(|_| gsis[v])
        };
        let vm = self.vm.clone();
        let mut errors = Vec::new();
        let mut users: Vec<(&EventFd, Option<u32>, &mut Option<u32>)> = self
            .queues
            .iter_mut()
            .map(|q| (&q.call, target(q.vector), &mut q.irqfd))
            .collect();
        users.push((
            &self.config_call,
            target(self.config_vector),
            &mut self.config_irqfd,
        ));
        for (fd, want_gsi, cur) in users.iter_mut() {
            if let Some(gsi) = cur.filter(|g| Some(*g) != *want_gsi) {
                if let Err(e) = vm.unregister_irqfd(fd.as_fd(), gsi) {
                    errors.push(e);
                }
                **cur = None;
            }
        }
        let changed: Vec<(u32, Option<MsiMessage>)> = (0..want.len())
            .filter(|&v| want[v] != self.routes[v])
            .map(|v| (gsis[v], want[v]))
            .collect();
        let routed = changed.is_empty() || {
            match vm.set_msi_routes(&changed) {
                Ok(()) => true,
                Err(e) => {
                    errors.push(e);
                    false
                }
            }
        };
        for (fd, want_gsi, cur) in users.iter_mut() {
            if let (None, Some(gsi), true) = (**cur, *want_gsi, routed) {
                match vm.register_irqfd(fd.as_fd(), gsi) {
                    Ok(()) => **cur = Some(gsi),
                    Err(e) => errors.push(e),
                }
            }
        }
        drop(users);
        if routed {
            self.routes = want;
        }
        for e in &errors {
            self.log_error(e);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_image(&self) -> [u8; COMMON_LEN] {
        let mut b = [0u8; COMMON_LEN];
        let put = |b: &mut [u8; COMMON_LEN], at: usize, v: &[u8]| {
            b[at..at + v.len()].copy_from_slice(v);
        };
        let offered = self.offered();
        let window = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        put(
            &mut b,
            0x04,
            &window(offered, self.device_feature_select).to_le_bytes(),
        );
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        put(
            &mut b,
            0x0c,
            &window(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(&mut b, 0x10, &self.config_vector.to_le_bytes());
        put(&mut b, 0x12, &(self.layout.queues as u16).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.config_generation;
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(&mut b, 0x18, &q.size.to_le_bytes());
            put(&mut b, 0x1a, &q.vector.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.enabled).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc.to_le_bytes());
            put(&mut b, 0x28, &q.driver.to_le_bytes());
            put(&mut b, 0x30, &q.device.to_le_bytes());
        } else {
            // No such queue: size 0 says it is not available.
            put(&mut b, 0x1a, &NO_VECTOR.to_le_bytes());
        }
        b
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| image.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut image = self.common_image();
        let start = offset as usize;
        if offset >= COMMON_LEN as u64 {
            return;
        }
        let end = (start + data.len()).min(COMMON_LEN);
        image[start..end].copy_from_slice(&data[..end - start]);
        let u16_at = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        // Writable fields, in layout order; each one the write touched takes its new value.
        const FIELDS: [(usize, usize); 12] = [
            (0x00, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x14, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x20, 8),
            (0x28, 8),
            (0x30, 8),
        ];
        for (at, len) in FIELDS {
            if at >= end || start >= at + len {
                continue;
            }
            match at {
                0x00 => self.device_feature_select = u32_at(at),
                0x08 => self.driver_feature_select = u32_at(at),
                0x0c => self.write_driver_features(u32_at(at)),
                0x10 => {
                    self.config_vector = self.valid_vector(u16_at(at));
                    self.sync_interrupts();
                }
                0x14 => self.set_status(image[at]),
                0x16 => self.queue_select = u16_at(at),
                0x18 => self.write_queue_size(u16_at(at)),
                0x1a => {
                    let v = self.valid_vector(u16_at(at));
                    if let Some(q) = self.selected_queue() {
                        q.vector = v;
                        self.sync_interrupts();
                    }
                }
                0x1c => {
                    let live = self.status & STATUS_DRIVER_OK != 0;
                    if let Some(q) = self.selected_queue().filter(|_| !live) {
                        // Writing 0 is not allowed to the driver; only 1 enables.
                        if u16_at(at) == 1 {
                            q.enabled = true;
                        }
                    }
                }
                _ => {
                    let v = u64_at(at);
                    if let Some(q) = self.selected_queue().filter(|q| !q.enabled) {
                        match at {
                            0x20 => q.desc = v,
                            0x28 => q.driver = v,
                            _ => q.device = v,
                        }
                    }
                }
            }
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.layout.vectors {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let v = u64::from(v);
        self.driver_features = match self.driver_feature_select {
            0 => (self.driver_features & !0xffff_ffff) | v,
            1 => (self.driver_features & 0xffff_ffff) | v << 32,
            _ => return,
        };
    }

    fn write_queue_size(&mut self, v: u16) {
        let max = self.max_queue_size;
        let live = self.status & STATUS_DRIVER_OK != 0;
        if let Some(q) = self.selected_queue().filter(|q| !q.enabled && !live) {
            if v.is_power_of_two() && v <= max {
                q.size = v;
            }
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let protocol = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        // The driver only adds bits; a write that clears one is ignored.
        if old & protocol & !v != 0 {
            return;
        }
        // NEEDS_RESET is the device's, kept until reset.
        let mut new = v & !STATUS_NEEDS_RESET | old & STATUS_NEEDS_RESET;
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.offered();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                new &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 || old & STATUS_NEEDS_RESET != 0 {
                new &= !STATUS_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                self.guest_log.log(&e);
                new |= STATUS_NEEDS_RESET;
                // Tell the driver, if it gave the configuration a vector.
                let _ = self.config_call.write(1);
            }
        }
        self.status = new;
    }

    fn activate(&mut self) -> std::result::Result<(), String> {
        let configs: Vec<QueueConfig<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(index, q)| QueueConfig {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.driver,
                used: q.device,
                kick: q.kick.as_fd(),
                call: (q.vector != NO_VECTOR).then(|| q.call.as_fd()),
            })
            .collect();
        self.device.activate(self.driver_features, &configs)
    }

    fn reset(&mut self) {
        if self.status != 0 {
            self.device.reset();
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        let max = self.max_queue_size;
        for q in &mut self.queues {
            q.reset(max);
        }
        self.sync_interrupts();
    }

    /// Vector `v` has a signal waiting: it cannot deliver and a call eventfd using it is
    /// signalled.
    fn pending(&self, v: usize) -> bool {
        if self.msix.deliverable(&self.config, v).is_some() {
            return false;
        }
        let readable = |fd: &EventFd| sys::fd_readable(fd.as_fd()).unwrap_or(false);
        self.queues
            .iter()
            .filter(|q| usize::from(q.vector) == v)
            .any(|q| readable(&q.call))
            || (usize::from(self.config_vector) == v && readable(&self.config_call))
    }

    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let at = self.pci_cfg_cap?;
        let bar = self.config.u32_at(at + 4) & 0xff;
        let offset = u64::from(self.config.u32_at(at + 8));
        let len = self.config.u32_at(at + 12) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4)).then_some((at + 16, offset, len))
    }
}

fn overlaps(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    a < b + blen && b < a + alen
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if let Some((at, off, len)) = self.pci_cfg_window() {
            if overlaps(offset, data.len(), at, 4) {
                let mut buf = [0u8; 4];
                self.bar_read(0, off, &mut buf[..len]);
                self.config.set_bytes(at, &buf);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let msix_before = self.msix.enabled(&self.config);
        self.config.write(offset, data);
        if let Some((at, off, len)) = self.pci_cfg_window() {
            if overlaps(offset, data.len(), at, 4) {
                let mut buf = [0u8; 4];
                self.config.read(at, &mut buf);
                self.bar_write(0, off, &buf[..len]);
            }
        }
        if self.msix.touches_control(offset, data.len())
            || msix_before != self.msix.enabled(&self.config)
        {
            self.sync_interrupts();
        }
        // The command register or BAR0 may have changed.
        self.sync_notify();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if bar != 0 || end > self.layout.size {
            return;
        }
        let l = self.layout;
        let table_end = MSIX_TABLE_OFFSET + l.vectors as u64 * msix::ENTRY_SIZE;
        let within = |base: u64, size: u64| offset >= base && end <= base + size;
        if within(COMMON_OFFSET, PAGE) {
            self.common_read(offset - COMMON_OFFSET, data);
        } else if within(DEVICE_OFFSET, DEVICE_LEN) {
            self.device.read_config(offset - DEVICE_OFFSET, data);
        } else if within(MSIX_TABLE_OFFSET, table_end - MSIX_TABLE_OFFSET) {
            self.msix.table_read(offset - MSIX_TABLE_OFFSET, data);
        } else if within(l.pba, l.pba_len) {
            self.msix
                .pba_read(offset - l.pba, data, |v| self.pending(v));
        }
        // ISR (MSI-X only: nothing to report), notify and the gaps read as 0.
    }

    fn as_virtio(&mut self) -> Option<&mut VirtioPciDevice> {
        Some(self)
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if bar != 0 || end > self.layout.size {
            return;
        }
        let l = self.layout;
        let table_end = MSIX_TABLE_OFFSET + l.vectors as u64 * msix::ENTRY_SIZE;
        let within = |base: u64, size: u64| offset >= base && end <= base + size;
        if within(COMMON_OFFSET, PAGE) {
            self.common_write(offset - COMMON_OFFSET, data);
        } else if within(DEVICE_OFFSET, DEVICE_LEN) {
            self.device.write_config(offset - DEVICE_OFFSET, data);
        } else if within(NOTIFY_OFFSET, l.notify_len) {
            // Reached only when no ioeventfd caught the write (BAR just moved, say).
            let q = ((offset - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER) as usize;
            if let Some(q) = self.queues.get(q) {
                let _ = q.kick.write(1);
            }
        } else if within(MSIX_TABLE_OFFSET, table_end - MSIX_TABLE_OFFSET)
            && self.msix.table_write(offset - MSIX_TABLE_OFFSET, data)
        {
            self.sync_interrupts();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::{BAR0, CAP_POINTER, STATUS};
    use crate::devices::pci::tests::{Call, FakeVm};
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Activated {
        features: u64,
        queues: Vec<(usize, u16, u64, u64, u64, bool)>,
    }

    #[derive(Default)]
    struct Log {
        activated: Vec<Activated>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        /// Duplicates of the kick and call fds of the last activation.
        fds: Vec<(std::os::fd::OwnedFd, Option<std::os::fd::OwnedFd>)>,
    }

    struct FakeDevice {
        log: Arc<Mutex<Log>>,
        fail: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn name(&self) -> &str {
            "fake"
        }
        fn device_type(&self) -> u32 {
            4 // rng
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            // Device bits (3, 55), EVENT_IDX, and what the transport drops: ACCESS_PLATFORM,
            // RING_PACKED, RING_RESET and an undefined transport bit.
            1 << 3 | 1 << 55 | 1 << 29 | 1 << 33 | 1 << 34 | 1 << 40 | 1 << 45
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .expect("lock")
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            features: u64,
            queues: &[QueueConfig<'_>],
        ) -> std::result::Result<(), String> {
            let mut log = self.log.lock().expect("lock");
            log.fds = queues
                .iter()
                .map(|q| {
                    let kick = q.kick.try_clone_to_owned().expect("dup");
                    (kick, q.call.map(|c| c.try_clone_to_owned().expect("dup")))
                })
                .collect();
            log.activated.push(Activated {
                features,
                queues: queues
                    .iter()
                    .map(|q| (q.index, q.size, q.desc, q.avail, q.used, q.call.is_some()))
                    .collect(),
            });
            drop(log);
            if self.fail {
                Err("backend gone".into())
            } else {
                Ok(())
            }
        }
        fn reset(&mut self) {
            self.log.lock().expect("lock").resets += 1;
        }
    }

    const BAR: u64 = 0xc000_8000;

    fn device_with(fail: bool) -> (VirtioPciDevice, Arc<FakeVm>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let vm = Arc::new(FakeVm::default());
        let dev = VirtioPciDevice::new(
            Box::new(FakeDevice {
                log: log.clone(),
                fail,
            }),
            vm.clone(),
            BAR,
        )
        .expect("device");
        (dev, vm, log)
    }

    fn device() -> (VirtioPciDevice, Arc<FakeVm>, Arc<Mutex<Log>>) {
        device_with(false)
    }

    fn r32(d: &mut VirtioPciDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r16(d: &mut VirtioPciDevice, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.bar_read(0, off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r8(d: &mut VirtioPciDevice, off: u64) -> u8 {
        let mut b = [0u8; 1];
        d.bar_read(0, off, &mut b);
        b[0]
    }
    fn w32(d: &mut VirtioPciDevice, off: u64, v: u32) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w16(d: &mut VirtioPciDevice, off: u64, v: u16) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w8(d: &mut VirtioPciDevice, off: u64, v: u8) {
        d.bar_write(0, off, &[v]);
    }
    fn w64(d: &mut VirtioPciDevice, off: u64, v: u64) {
        w32(d, off, v as u32);
        w32(d, off + 4, (v >> 32) as u32);
    }
    fn cfg32(d: &mut VirtioPciDevice, off: usize) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Features, FEATURES_OK, queue 0 with vector 0 and queue 1 without one, enabled.
    fn negotiate(d: &mut VirtioPciDevice) {
        w8(d, 0x14, STATUS_ACKNOWLEDGE);
        w8(d, 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(d, 0x08, 0);
        w32(d, 0x0c, 1 << 3);
        w32(d, 0x08, 1);
        w32(d, 0x0c, 1);
        w8(
            d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r8(d, 0x14) & STATUS_FEATURES_OK, 0);
        for (q, vector) in [(0u16, 0u16), (1, NO_VECTOR)] {
            w16(d, 0x16, q);
            w16(d, 0x18, 64);
            w16(d, 0x1a, vector);
            w64(d, 0x20, 0x1000 * u64::from(q + 1));
            w64(d, 0x28, 0x1000 * u64::from(q + 1) + 0x400);
            w64(d, 0x30, 0x1000 * u64::from(q + 1) + 0x800);
            w16(d, 0x1c, 1);
        }
    }

    const LIVE: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identity_bar_and_capability_list_describe_the_layout() {
        let (mut d, _vm, _log) = device();
        assert_eq!(cfg32(&mut d, 0), 0x1044_1af4);
        assert_eq!(cfg32(&mut d, 0x08), 0xff00_0001);
        assert_eq!(cfg32(&mut d, 0x2c), 0x0040_1af4);
        assert_eq!(cfg32(&mut d, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
        assert_ne!(cfg32(&mut d, STATUS) >> 4 & 1, 0);
        // BAR0 sizing: 2 queues, 3 vectors: PBA at 0x5000, BAR 0x8000.
        assert_eq!(cfg32(&mut d, BAR0), BAR as u32);
        let mut caps = Vec::new();
        let mut p = cfg32(&mut d, CAP_POINTER) as usize & 0xff;
        while p != 0 {
            let head = cfg32(&mut d, p);
            let id = head & 0xff;
            if id == u32::from(VIRTIO_CAP_ID) {
                let cfg_type = head >> 24;
                let bar = cfg32(&mut d, p + 4) & 0xff;
                let offset = cfg32(&mut d, p + 8);
                let length = cfg32(&mut d, p + 12);
                let mult = if cfg_type == 2 {
                    cfg32(&mut d, p + 16)
                } else {
                    0
                };
                caps.push((id, cfg_type, bar, offset, length, mult));
            } else {
                caps.push((
                    id,
                    cfg32(&mut d, p) >> 16,
                    cfg32(&mut d, p + 4),
                    cfg32(&mut d, p + 8),
                    0,
                    0,
                ));
            }
            p = (head >> 8 & 0xff) as usize;
        }
        assert_eq!(
            caps,
            vec![
                (9, 1, 0, 0, 0x1000, 0),
                (9, 2, 0, 0x3000, 8, 4),
                (9, 3, 0, 0x1000, 0x1000, 0),
                (9, 4, 0, 0x2000, 0x1000, 0),
                (0x11, 2, 0x4000, 0x5000, 0, 0),
                (9, 5, 0, 0, 0, 0),
            ]
        );
        assert_eq!(d.layout.size, 0x8000);
    }

    #[test]
    fn feature_windows_offer_version_1_and_drop_unsupported_transport_bits() {
        let (mut d, _vm, _log) = device();
        assert_eq!(r32(&mut d, 0x04), 1 << 3 | 1 << 29);
        w32(&mut d, 0x00, 1);
        assert_eq!(
            r32(&mut d, 0x04),
            1 | 1 << (55 - 32),
            "VERSION_1 and the device's bit 55, without ACCESS_PLATFORM, RING_PACKED, \
             RING_RESET or bit 45"
        );
        w32(&mut d, 0x00, 7);
        assert_eq!(r32(&mut d, 0x04), 0);
        assert_eq!(r16(&mut d, 0x12), 2);
    }

    #[test]
    fn features_ok_is_refused_for_unoffered_bits_or_without_version_1() {
        let (mut d, _vm, _log) = device();
        w8(&mut d, 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut d, 0x0c, 1 << 3); // no VERSION_1
        w8(
            &mut d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r8(&mut d, 0x14), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut d, 0x08, 1);
        w32(&mut d, 0x0c, 1 | 1 << 8); // VERSION_1 and RING_RESET (not offered)
        w8(
            &mut d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r8(&mut d, 0x14) & STATUS_FEATURES_OK, 0);
        w32(&mut d, 0x0c, 1);
        w8(
            &mut d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r8(&mut d, 0x14) & STATUS_FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        w32(&mut d, 0x0c, 0);
        assert_eq!(r32(&mut d, 0x0c), 1);
    }

    #[test]
    fn driver_ok_activates_enabled_queues_and_reset_clears_everything() {
        let (mut d, _vm, log) = device();
        negotiate(&mut d);
        w16(&mut d, 0x16, 0);
        assert_eq!(r16(&mut d, 0x18), 64);
        assert_eq!(r16(&mut d, 0x1a), 0);
        assert_eq!(r16(&mut d, 0x1c), 1);
        assert_eq!(r16(&mut d, 0x1e), 0);
        w16(&mut d, 0x16, 1);
        assert_eq!(r16(&mut d, 0x1e), 1);
        assert_eq!(r32(&mut d, 0x20), 0x2000);
        // An enabled queue keeps its addresses; a queue past the end reads size 0.
        w64(&mut d, 0x20, 0xdead_0000);
        assert_eq!(r32(&mut d, 0x20), 0x2000);
        w16(&mut d, 0x16, 9);
        assert_eq!(r16(&mut d, 0x18), 0);
        assert_eq!(r16(&mut d, 0x1a), NO_VECTOR);
        w16(&mut d, 0x18, 8); // ignored
        w8(&mut d, 0x14, LIVE);
        assert_eq!(r8(&mut d, 0x14), LIVE);
        {
            let l = log.lock().expect("lock");
            assert_eq!(
                l.activated,
                vec![Activated {
                    features: 1 << 32 | 1 << 3,
                    queues: vec![
                        (0, 64, 0x1000, 0x1400, 0x1800, true),
                        (1, 64, 0x2000, 0x2400, 0x2800, false),
                    ],
                }]
            );
        }
        // Clearing a bit other than through reset is ignored.
        w8(&mut d, 0x14, STATUS_ACKNOWLEDGE);
        assert_eq!(r8(&mut d, 0x14), LIVE);
        w8(&mut d, 0x14, 0);
        assert_eq!(log.lock().expect("lock").resets, 1);
        assert_eq!(r8(&mut d, 0x14), 0);
        assert_eq!(r32(&mut d, 0x0c), 0);
        assert_eq!(r16(&mut d, 0x10), NO_VECTOR);
        assert_eq!(r16(&mut d, 0x16), 0);
        for q in 0..2 {
            w16(&mut d, 0x16, q);
            assert_eq!(r16(&mut d, 0x18), 256);
            assert_eq!(r16(&mut d, 0x1a), NO_VECTOR);
            assert_eq!(r16(&mut d, 0x1c), 0);
            assert_eq!(r32(&mut d, 0x20), 0);
        }
    }

    #[test]
    fn driver_ok_without_features_ok_does_not_activate() {
        let (mut d, _vm, log) = device();
        w8(
            &mut d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(r8(&mut d, 0x14) & STATUS_DRIVER_OK, 0);
        assert!(log.lock().expect("lock").activated.is_empty());
    }

    #[test]
    fn failed_activation_sets_needs_reset_until_reset() {
        let (mut d, _vm, log) = device_with(true);
        negotiate(&mut d);
        w8(&mut d, 0x14, LIVE);
        assert_eq!(log.lock().expect("lock").activated.len(), 1);
        let status = r8(&mut d, 0x14);
        assert_ne!(status & STATUS_NEEDS_RESET, 0);
        assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        w8(&mut d, 0x14, status | STATUS_FAILED);
        assert_ne!(r8(&mut d, 0x14) & STATUS_NEEDS_RESET, 0);
        w8(&mut d, 0x14, 0);
        assert_eq!(r8(&mut d, 0x14), 0);
    }

    #[test]
    fn device_config_goes_to_the_device() {
        let (mut d, _vm, log) = device();
        assert_eq!(r32(&mut d, 0x2004), u32::from_le_bytes([4, 5, 6, 7]));
        w16(&mut d, 0x2010, 0xabcd);
        assert_eq!(
            log.lock().expect("lock").config_writes,
            vec![(0x10, vec![0xcd, 0xab])]
        );
    }

    #[test]
    fn notify_ioeventfds_follow_bar_moves_and_memory_decoding() {
        let (mut d, vm, _log) = device();
        let k0 = d.queues[0].kick.as_raw_fd();
        let k1 = d.queues[1].kick.as_raw_fd();
        assert_eq!(
            vm.take(),
            vec![
                Call::Ioeventfd(k0, BAR + 0x3000),
                Call::Ioeventfd(k1, BAR + 0x3004)
            ]
        );
        // Linux sizes BARs with decoding off: unregister, size, restore, register again.
        d.config_write(COMMAND, &0u16.to_le_bytes());
        assert_eq!(
            vm.take(),
            vec![
                Call::NoIoeventfd(k0, BAR + 0x3000),
                Call::NoIoeventfd(k1, BAR + 0x3004)
            ]
        );
        d.config_write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(cfg32(&mut d, BAR0), 0xffff_8000);
        let new = 0xd000_0000u64;
        d.config_write(BAR0, &(new as u32).to_le_bytes());
        assert!(vm.take().is_empty());
        d.config_write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            vm.take(),
            vec![
                Call::Ioeventfd(k0, new + 0x3000),
                Call::Ioeventfd(k1, new + 0x3004)
            ]
        );
        // Moving with decoding on moves them directly; outside the window: none.
        d.config_write(BAR0, &0xffff_0000u32.to_le_bytes());
        assert_eq!(
            vm.take(),
            vec![
                Call::NoIoeventfd(k0, new + 0x3000),
                Call::NoIoeventfd(k1, new + 0x3004)
            ]
        );
        assert_eq!(d.config().decode(new, 4), None);
    }

    #[test]
    fn notify_write_without_an_ioeventfd_kicks_the_queue() {
        let (mut d, _vm, _log) = device();
        assert!(!sys::fd_readable(d.queues[1].kick.as_fd()).expect("poll"));
        w16(&mut d, 0x3004, 1);
        assert!(sys::fd_readable(d.queues[1].kick.as_fd()).expect("poll"));
        assert!(!sys::fd_readable(d.queues[0].kick.as_fd()).expect("poll"));
    }

    fn msix_control(d: &mut VirtioPciDevice, v: u16) {
        let cap = d.msix_cap();
        d.config_write(cap + 2, &v.to_le_bytes());
    }

    impl VirtioPciDevice {
        fn msix_cap(&self) -> usize {
            let mut p = self.config.u16_at(CAP_POINTER) as usize & 0xff;
            while self.config.u16_at(p) & 0xff != 0x11 {
                p = self.config.u16_at(p) as usize >> 8;
            }
            p
        }
    }

    #[test]
    fn unmasked_vector_gets_a_route_then_irqfds_and_masking_removes_them() {
        let (mut d, vm, _log) = device();
        let call0 = d.queues[0].call.as_raw_fd();
        let cfg = d.config_call.as_raw_fd();
        vm.take();
        negotiate(&mut d);
        w16(&mut d, 0x10, 2); // config vector
        assert_eq!(r16(&mut d, 0x10), 2);
        w16(&mut d, 0x10, 3); // no such vector: NO_VECTOR
        assert_eq!(r16(&mut d, 0x10), NO_VECTOR);
        w16(&mut d, 0x10, 2);
        // Vector 0 programmed but masked, MSI-X off: nothing yet.
        w32(&mut d, 0x4000, 0xfee0_0000);
        w32(&mut d, 0x4008, 0x4031);
        w32(&mut d, 0x4020, 0xfee0_1000);
        w32(&mut d, 0x4028, 0x4032);
        w32(&mut d, 0x402c, 0);
        msix_control(&mut d, 0x8000 | 0x4000); // enabled, function masked
        assert!(vm.take().is_empty());
        msix_control(&mut d, 0x8000);
        let m2 = MsiMessage {
            address: 0xfee0_1000,
            data: 0x4032,
        };
        assert_eq!(
            vm.take(),
            vec![Call::Routes(vec![(26, Some(m2))]), Call::Irqfd(cfg, 26)]
        );
        w32(&mut d, 0x400c, 0); // unmask vector 0
        let m0 = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4031,
        };
        assert_eq!(
            vm.take(),
            vec![Call::Routes(vec![(24, Some(m0))]), Call::Irqfd(call0, 24)]
        );
        // A new message while unmasked re-routes without touching the irqfd.
        w32(&mut d, 0x4008, 0x4041);
        let m0b = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        assert_eq!(vm.take(), vec![Call::Routes(vec![(24, Some(m0b))])]);
        // Mask: the irqfd comes off first, then the route.
        w32(&mut d, 0x400c, 1);
        assert_eq!(
            vm.take(),
            vec![Call::NoIrqfd(call0, 24), Call::Routes(vec![(24, None)])]
        );
        // A signal while masked is pending in the PBA.
        assert_eq!(r32(&mut d, 0x5000), 0);
        d.queues[0].call.write(1).expect("signal");
        assert_eq!(r32(&mut d, 0x5000), 1);
        // Moving queue 0 to vector 2 attaches it to that vector's irqfd.
        w16(&mut d, 0x16, 0);
        w16(&mut d, 0x1a, 2);
        assert_eq!(vm.take(), vec![Call::Irqfd(call0, 26)]);
        // Disabling MSI-X removes everything; reset drops the vectors.
        msix_control(&mut d, 0);
        assert_eq!(
            vm.take(),
            vec![
                Call::NoIrqfd(call0, 26),
                Call::NoIrqfd(cfg, 26),
                Call::Routes(vec![(26, None)])
            ]
        );
        w8(&mut d, 0x14, 0);
        assert!(vm.take().is_empty());
    }

    #[test]
    fn config_change_bumps_generation_and_signals_the_config_vector() {
        let log = Arc::new(Mutex::new(Log::default()));
        let vm = Arc::new(FakeVm::default());
        let mut root = crate::devices::pci::PciRoot::new(vm);
        let info = root
            .add_virtio_device(Box::new(FakeDevice { log, fail: false }))
            .expect("add");
        let host_bridge = crate::devices::pci::PciAddress {
            bus: 0,
            device: 0,
            function: 0,
        };
        assert!(!root.virtio_config_changed(host_bridge));
        let gen = |root: &mut crate::devices::pci::PciRoot| {
            let mut b = [0u8];
            root.mmio_read(info.bar0 + 0x15, &mut b);
            b[0]
        };
        assert_eq!(gen(&mut root), 0);
        assert!(root.virtio_config_changed(info.address));
        assert_eq!(gen(&mut root), 1);
    }

    #[test]
    fn pci_cfg_capability_reaches_bar0() {
        let (mut d, _vm, _log) = device();
        let mut p = cfg32(&mut d, CAP_POINTER) as usize & 0xff;
        while cfg32(&mut d, p) >> 24 != 5 || cfg32(&mut d, p) & 0xff != 9 {
            p = (cfg32(&mut d, p) >> 8 & 0xff) as usize;
        }
        d.config_write(p + 4, &[0]);
        d.config_write(p + 8, &0x12u32.to_le_bytes()); // num_queues
        d.config_write(p + 12, &2u32.to_le_bytes());
        assert_eq!(cfg32(&mut d, p + 16) & 0xffff, 2);
        d.config_write(p + 8, &0x14u32.to_le_bytes()); // device_status
        d.config_write(p + 12, &1u32.to_le_bytes());
        d.config_write(p + 16, &[STATUS_ACKNOWLEDGE]);
        assert_eq!(r8(&mut d, 0x14), STATUS_ACKNOWLEDGE);
    }

    #[test]
    fn junk_in_config_space_and_bar0_never_panics() {
        let (mut d, _vm, _log) = device();
        let mut x: u32 = 0x1234_5678;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20000 {
            let len = [1usize, 2, 3, 4, 8, 16][next() as usize % 6];
            let val = next().to_le_bytes().repeat(4);
            let r = next();
            if r % 3 == 0 {
                let off = next() as usize % 260;
                d.config_write(off, &val[..len]);
                let mut b = vec![0u8; len];
                d.config_read(off, &mut b);
            } else {
                let off = u64::from(next()) % 0x8010;
                d.bar_write(0, off, &val[..len]);
                let mut b = vec![0u8; len];
                d.bar_read(0, off, &mut b);
            }
        }
        d.bar_read(0, u64::MAX - 1, &mut [0u8; 4]);
        d.bar_write(0, u64::MAX - 1, &[0u8; 4]);
        d.bar_write(3, 0, &[0u8; 4]);
    }

    /// A 32-bit protected-mode vCPU over `ram` running `code` at 0x1000.
    fn vcpu_running(
        vm: &kvm_ioctls::VmFd,
        ram: &crate::guest::GuestRam,
        code: &[u8],
    ) -> kvm_ioctls::VcpuFd {
        ram.write(0x1000, code).expect("code");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = seg(0x08, 0xb);
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *s = seg(0x10, 0x3);
        }
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).expect("set sregs");
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rsp: 0x8000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).expect("set regs");
        vcpu
    }

    use crate::devices::pci::KvmPciVm;
    use crate::devices::pci::{
        PciConfigPort, PciDeviceInfo, PciMmioWindow, PciRoot, MMIO_WINDOW_BASE,
    };
    use crate::devices::BusDevice;
    use crate::irq::GsiRouting;

    /// A real VM with the fake device at 00:01.0, driven like a driver would: features
    /// negotiated, both queues on MSI-X vector 0 (addr 0xfee00000, data 0x31: fixed, vector
    /// 0x31 to APIC 0), MSI-X enabled, DRIVER_OK.
    struct KvmRig {
        vm: Arc<kvm_ioctls::VmFd>,
        ram: crate::guest::GuestRam,
        routing: Arc<Mutex<GsiRouting>>,
        pvm: Arc<KvmPciVm>,
        mmio: PciMmioWindow,
        info: PciDeviceInfo,
        /// Duplicates of the (kick, call) fds the device got.
        fds: Vec<(std::os::fd::OwnedFd, Option<std::os::fd::OwnedFd>)>,
    }

    impl KvmRig {
        fn new(vector0_masked: bool) -> KvmRig {
            let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
            let vm = Arc::new(kvm.create_vm().expect("vm"));
            let ram = crate::guest::GuestRam::new(16 << 20).expect("ram");
            for (slot, (guest, len, host)) in ram.slots().into_iter().enumerate() {
                sys::set_memory_slot(&vm, slot as u32, guest, len, host).expect("slot");
            }
            vm.set_tss_address(0xfffb_d000).expect("tss");
            vm.create_irq_chip().expect("irqchip");
            let routing = Arc::new(Mutex::new(GsiRouting::new(vm.clone()).expect("routing")));
            let pvm = Arc::new(KvmPciVm::new(vm.clone(), routing.clone()));
            let root = Arc::new(Mutex::new(PciRoot::new(pvm.clone())));
            let log = Arc::new(Mutex::new(Log::default()));
            let info = root
                .lock()
                .expect("lock")
                .add_virtio_device(Box::new(FakeDevice {
                    log: log.clone(),
                    fail: false,
                }))
                .expect("add");
            let mut port = PciConfigPort(root.clone());
            let mut mmio = PciMmioWindow(root.clone());
            let cfg_r32 = |port: &mut PciConfigPort, reg: u32| {
                port.write(0, &(0x8000_0800 | reg).to_le_bytes());
                let mut b = [0u8; 4];
                port.read(4, &mut b);
                u32::from_le_bytes(b)
            };
            assert_eq!(cfg_r32(&mut port, 0), 0x1044_1af4);
            let mut cap = cfg_r32(&mut port, 0x34) & 0xff;
            while cfg_r32(&mut port, cap) & 0xff != 0x11 {
                cap = cfg_r32(&mut port, cap) >> 8 & 0xff;
            }
            mmio.write(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
            mmio.write(0x08, &1u32.to_le_bytes());
            mmio.write(0x0c, &1u32.to_le_bytes());
            mmio.write(
                0x14,
                &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
            );
            for q in 0..2u16 {
                mmio.write(0x16, &q.to_le_bytes());
                mmio.write(0x1a, &0u16.to_le_bytes());
                mmio.write(0x1c, &1u16.to_le_bytes());
            }
            mmio.write(0x4000, &0xfee0_0000u32.to_le_bytes());
            mmio.write(0x4008, &0x31u32.to_le_bytes());
            mmio.write(0x400c, &u32::from(vector0_masked).to_le_bytes());
            // Message control: MSI-X enable, by a word write at the capability + 2.
            port.write(0, &(0x8000_0800 | cap).to_le_bytes());
            port.write(6, &0x8000u16.to_le_bytes());
            mmio.write(0x14, &[LIVE]);
            let mut status = [0u8];
            mmio.read(0x14, &mut status);
            assert_eq!(status[0], LIVE);
            let fds = std::mem::take(&mut log.lock().expect("lock").fds);
            assert_eq!(fds.len(), 2);
            KvmRig {
                vm,
                ram,
                routing,
                pvm,
                mmio,
                info,
                fds,
            }
        }

        fn call0(&self) -> BorrowedFd<'_> {
            self.fds[0].1.as_ref().expect("vector 0").as_fd()
        }
    }

    /// Runs the vCPU until a port write, returning the port.
    fn run_to_port_write(vcpu: &mut kvm_ioctls::VcpuFd) -> u16 {
        loop {
            match vcpu.run().expect("KVM_RUN") {
                kvm_ioctls::VcpuExit::IoOut(port, _) => return port,
                kvm_ioctls::VcpuExit::Intr => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    #[test]
    fn notify_write_signals_kick_through_kvm_ioeventfd_and_msix_programs_kvm_routes() {
        let rig = KvmRig::new(false);
        assert_eq!(rig.info.address.to_string(), "0000:00:01.0");
        assert_eq!(
            (rig.info.bar0, rig.info.bar0_size),
            (MMIO_WINDOW_BASE, 0x8000)
        );
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(rig.routing.lock().expect("lock").msi(24), Some(msg));
        // Each call fd is a live irqfd on GSI 24: KVM refuses the same eventfd twice.
        for (_, call) in &rig.fds {
            let call = call.as_ref().expect("vector 0");
            assert!(rig.pvm.register_irqfd(call.as_fd(), 24).is_err());
        }

        // The guest writes queue 1's notify address; KVM signals the kick eventfd without
        // an MMIO exit, and the next exit is the port write after it.
        let notify1 = (rig.info.bar0 + 0x3004) as u32;
        let mut code = vec![0xb8, 1, 0, 0, 0]; // mov eax, 1
        code.push(0xa3); // mov [notify1], eax
        code.extend(notify1.to_le_bytes());
        code.extend([0xe6, 0x80]); // out 0x80, al
        let mut vcpu = vcpu_running(&rig.vm, &rig.ram, &code);
        assert_eq!(run_to_port_write(&mut vcpu), 0x80);
        assert!(sys::fd_readable(rig.fds[1].0.as_fd()).expect("poll"));
        assert!(!sys::fd_readable(rig.fds[0].0.as_fd()).expect("poll"));
    }

    #[test]
    fn msix_message_reaches_the_guest_only_once_its_vector_is_unmasked() {
        let mut rig = KvmRig::new(true);
        // GDT (null, flat code 0x08, flat data 0x10) at 0x500; IDT at 0x2000 with vector
        // 0x31 -> handler at 0x1800, which writes port 0x81.
        let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        let gdt: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        rig.ram.write(0x500, &gdt).expect("gdt");
        let handler: u32 = 0x1800;
        let gate = u64::from(handler & 0xffff)
            | 0x08 << 16
            | 0x8e00u64 << 32
            | u64::from(handler >> 16) << 48;
        rig.ram
            .write(0x2000 + 0x31 * 8, &gate.to_le_bytes())
            .expect("idt");
        rig.ram
            .write(u64::from(handler), &[0xe6, 0x81, 0xeb, 0xfe])
            .expect("handler");
        // Software-enable the LAPIC (SVR = 0x1ff) and sti, report (0x80); a few
        // instructions later report again (0x82); then spin a while and report that no
        // interrupt came (0x83).
        let mut code = vec![0xc7, 0x05]; // mov dword [0xfee000f0], 0x1ff
        code.extend(0xfee0_00f0u32.to_le_bytes());
        code.extend(0x1ffu32.to_le_bytes());
        code.extend([0xfb, 0xe6, 0x80]); // sti; out 0x80, al
        code.extend([0x90, 0x90, 0x90, 0xe6, 0x82]); // nop x3; out 0x82, al
        code.extend([0xb9, 0xa0, 0x86, 0x01, 0x00]); // mov ecx, 100000
        code.extend([0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
        code.extend([0xe6, 0x83, 0xeb, 0xfe]); // out 0x83, al; jmp $
        let mut vcpu = vcpu_running(&rig.vm, &rig.ram, &code);
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 23;
        sregs.idt.base = 0x2000;
        sregs.idt.limit = 0x400 - 1;
        vcpu.set_sregs(&sregs).expect("sregs");

        assert_eq!(run_to_port_write(&mut vcpu), 0x80);
        // Signalled while masked (APIC on, interrupts enabled): no route, no irqfd, so
        // nothing is delivered; it waits in the eventfd and shows in the PBA.
        assert_eq!(rig.routing.lock().expect("lock").msi(24), None);
        executor::EventFd::from(rig.call0().try_clone_to_owned().expect("dup"))
            .write(1)
            .expect("signal");
        assert_eq!(run_to_port_write(&mut vcpu), 0x82, "delivered while masked");
        let mut pba = [0u8; 8];
        rig.mmio.read(0x5000, &mut pba);
        assert_eq!(pba[0] & 1, 1);
        // Unmasking installs the route and the irqfd, which delivers the waiting message.
        rig.mmio.write(0x400c, &0u32.to_le_bytes());
        assert_eq!(
            run_to_port_write(&mut vcpu),
            0x81,
            "not delivered on unmask"
        );
        rig.mmio.read(0x5000, &mut pba);
        assert_eq!(pba[0] & 1, 0);
    }
}
