//! The host bridge at 00:00.0: identity only (Linux's `pci_sanity_check` wants a host bridge
//! class or an Intel vendor on bus 0 before it trusts configuration mechanism #1).

use super::config::{PciConfig, PciId};
use super::PciDevice;

pub const VENDOR_INTEL: u16 = 0x8086;
/// An Intel host bridge device ID.
pub const DEVICE_HOST_BRIDGE: u16 = 0x0d57;
/// Bridge, host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_0000;

pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        HostBridge {
            config: PciConfig::new(PciId {
                vendor: VENDOR_INTEL,
                device: DEVICE_HOST_BRIDGE,
                class: CLASS_HOST_BRIDGE,
                revision: 0,
                subsystem_vendor: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
