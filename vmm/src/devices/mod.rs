//! Platform devices on the port I/O and MMIO buses.

pub mod attach;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod vhost_user;
pub mod virtiofs;

pub use bus::{Bus, BusDevice};
