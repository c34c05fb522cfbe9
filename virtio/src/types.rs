//! The device-type vocabulary: what the transport, the vhost-user frontend, `--vhost-user` and
//! the backends all call a virtio device type, in one place (virtio 1.2 §5).

use std::fmt;

/// A virtio device type ringvm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// Network card (§5.1).
    Net,
    /// Block device (§5.2).
    Block,
    /// Console (§5.3).
    Console,
    /// Entropy source (§5.4).
    Rng,
    /// Socket device (§5.10).
    Vsock,
    /// File system device (§5.11).
    Fs,
}

impl DeviceType {
    /// Every type, in device-ID order.
    pub const ALL: [DeviceType; 6] = [
        DeviceType::Net,
        DeviceType::Block,
        DeviceType::Console,
        DeviceType::Rng,
        DeviceType::Vsock,
        DeviceType::Fs,
    ];

    /// The virtio device ID (§5).
    pub const fn id(self) -> u32 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Block => 2,
            DeviceType::Console => 3,
            DeviceType::Rng => 4,
            DeviceType::Vsock => 19,
            DeviceType::Fs => 26,
        }
    }

    /// The type with device ID `id`.
    pub fn from_id(id: u32) -> Option<DeviceType> {
        DeviceType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The type's name: in device names (`block0`), `ringvm device <name>`, seccomp policies,
    /// and `--vhost-user type=`.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceType::Net => "net",
            DeviceType::Block => "block",
            DeviceType::Console => "console",
            DeviceType::Rng => "rng",
            DeviceType::Vsock => "vsock",
            DeviceType::Fs => "fs",
        }
    }

    /// The type named `name` (`blk` too, QEMU's and crosvm's word for block).
    pub fn from_name(name: &str) -> Option<DeviceType> {
        match name {
            "blk" => Some(DeviceType::Block),
            _ => DeviceType::ALL.into_iter().find(|t| t.name() == name),
        }
    }

    /// The PCI class code (class, subclass, interface) a virtio-pci function of this type
    /// reports.
    pub const fn pci_class(self) -> u32 {
        match self {
            DeviceType::Net => 0x02_0000,     // network controller, ethernet
            DeviceType::Block => 0x01_8000,   // mass storage, other
            DeviceType::Console => 0x07_8000, // communication controller, other
            _ => 0xff_0000,                   // unassigned class
        }
    }

    /// Bytes of device-specific configuration space (the fields ringvm's transport reads
    /// from a backend).
    pub const fn config_size(self) -> u32 {
        match self {
            DeviceType::Net => 20, // mac, status, max_virtqueue_pairs, mtu, speed, duplex
            DeviceType::Block => 60, // capacity ... write_zeroes_may_unmap
            DeviceType::Console => 12, // cols, rows, max_nr_ports, emerg_wr
            DeviceType::Rng => 0,
            DeviceType::Vsock => 8, // guest_cid
            DeviceType::Fs => 40,   // tag[36], num_request_queues
        }
    }

    /// Queues of the type when a backend does not say (no MQ protocol feature).
    pub const fn default_queues(self) -> usize {
        match self {
            DeviceType::Net => 2,     // one rx/tx pair
            DeviceType::Block => 1,   // one request queue
            DeviceType::Console => 2, // receiveq, transmitq of port 0
            DeviceType::Rng => 1,     // requestq
            DeviceType::Vsock => 3,   // rx, tx, event
            DeviceType::Fs => 2,      // hiprio, one request queue
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceType {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceType, String> {
        DeviceType::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = DeviceType::ALL.iter().map(|t| t.name()).collect();
            format!("unknown device type '{s}' (expected {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for t in DeviceType::ALL {
            assert_eq!(DeviceType::from_id(t.id()), Some(t));
            assert_eq!(t.name().parse::<DeviceType>(), Ok(t));
        }
        assert_eq!("blk".parse::<DeviceType>(), Ok(DeviceType::Block));
        assert_eq!(DeviceType::from_id(5), None);
        assert!("disk".parse::<DeviceType>().is_err());
    }

    #[test]
    fn queue_and_config_facts_match_the_spec() {
        assert_eq!(DeviceType::Vsock.id(), 19);
        assert_eq!(DeviceType::Vsock.default_queues(), 3);
        assert_eq!(DeviceType::Vsock.config_size(), 8);
        assert_eq!(DeviceType::Net.pci_class(), 0x02_0000);
        assert_eq!(DeviceType::Fs.config_size(), 40);
    }
}
