//! The i8042 keyboard controller, as much as guests use: the reset line (command 0xFE to
//! port 0x64) ends the VM, and reads report an empty controller.

use super::BusDevice;

/// Called on a CPU reset request.
pub type OnReset = Box<dyn Fn() + Send>;

pub struct I8042 {
    on_reset: OnReset,
    command: u8,
}

impl I8042 {
    pub fn new(on_reset: OnReset) -> I8042 {
        I8042 {
            on_reset,
            command: 0,
        }
    }
}

impl BusDevice for I8042 {
    /// Mapped at port 0x60 with length 5: offset 0 is data, offset 4 is status/command.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 4 {
            // Status: output buffer empty, input buffer empty, self-test passed (system flag).
            data[0] = 0x04;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            (self.on_reset)();
        } else if offset == 4 {
            self.command = data.first().copied().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn fe_on_command_port_resets() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let mut dev = I8042::new(Box::new(move || h.store(true, Ordering::SeqCst)));
        dev.write(0, &[0xfe]);
        assert!(!hit.load(Ordering::SeqCst));
        dev.write(4, &[0xfe]);
        assert!(hit.load(Ordering::SeqCst));
    }
}
