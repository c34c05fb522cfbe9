//! An 8250/16550A UART (COM1): output to a writer, input queued by the VMM, interrupts.

use std::collections::VecDeque;
use std::io::Write;

use super::BusDevice;

const DATA: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Input bytes kept at most; more is dropped (a guest that never reads cannot grow us).
const INPUT_MAX: usize = 64 * 1024;

/// Raises the UART's interrupt line (an edge on its GSI).
pub type Interrupt = Box<dyn Fn() + Send>;

pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo: bool,
    thre_pending: bool,
    input: VecDeque<u8>,
    out: Box<dyn Write + Send>,
    irq: Interrupt,
}

impl Serial {
    pub fn new(out: Box<dyn Write + Send>, irq: Interrupt) -> Serial {
        Serial {
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scr: 0,
            dll: 0x0c, // 9600 baud
            dlm: 0,
            fifo: false,
            thre_pending: false,
            input: VecDeque::new(),
            out,
            irq,
        }
    }

    /// Bytes from the host side (stdin); raises the interrupt if the guest asked for it.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = INPUT_MAX.saturating_sub(self.input.len());
        let was_empty = self.input.is_empty();
        self.input.extend(bytes.iter().take(room));
        if was_empty && !self.input.is_empty() && self.ier & IER_RDA != 0 {
            (self.irq)();
        }
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fifo { IIR_FIFO } else { 0 };
        if self.ier & IER_RDA != 0 && !self.input.is_empty() {
            IIR_RDA | fifo
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE | fifo
        } else {
            IIR_NONE | fifo
        }
    }

    fn msr(&self) -> u8 {
        if self.mcr & MCR_LOOP == 0 {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        let mut msr = 0;
        if self.mcr & 0x01 != 0 {
            msr |= MSR_DSR;
        }
        if self.mcr & 0x02 != 0 {
            msr |= MSR_CTS;
        }
        if self.mcr & 0x04 != 0 {
            msr |= MSR_RI;
        }
        if self.mcr & 0x08 != 0 {
            msr |= MSR_DCD;
        }
        msr
    }

    fn transmit(&mut self, byte: u8) {
        if self.mcr & MCR_LOOP != 0 {
            self.queue_input(&[byte]);
        } else {
            // The console is best effort: a closed stdout must not stop the guest.
            let _ = self.out.write_all(&[byte]);
            if byte == b'\n' || !self.fifo {
                let _ = self.out.flush();
            }
        }
        if self.ier & IER_THRE != 0 {
            self.thre_pending = true;
            (self.irq)();
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let dlab = self.lcr & LCR_DLAB != 0;
        data[0] = match offset {
            DATA if dlab => self.dll,
            DATA => self.input.pop_front().unwrap_or(0),
            IER if dlab => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRE {
                    self.thre_pending = false;
                }
                iir
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let dr = if self.input.is_empty() { 0 } else { LSR_DR };
                LSR_THRE | LSR_TEMT | dr
            }
            MSR => self.msr(),
            SCR => self.scr,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.dll = v,
            DATA => self.transmit(v),
            IER if dlab => self.dlm = v,
            IER => {
                let newly_thre = v & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = v & 0x0f;
                // Enabling THRE interrupts with an empty transmitter interrupts at once.
                if newly_thre {
                    self.thre_pending = true;
                    (self.irq)();
                }
                if v & IER_RDA != 0 && !self.input.is_empty() {
                    (self.irq)();
                }
            }
            IIR_FCR => {
                self.fifo = v & 0x01 != 0;
                if v & 0x02 != 0 {
                    self.input.clear();
                }
            }
            LCR => self.lcr = v,
            MCR => self.mcr = v & 0x1f,
            SCR => self.scr = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, Sink, Arc<AtomicUsize>) {
        let sink = Sink::default();
        let irqs = Arc::new(AtomicUsize::new(0));
        let i = irqs.clone();
        let s = Serial::new(
            Box::new(sink.clone()),
            Box::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (s, sink, irqs)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn output_goes_to_the_writer() {
        let (mut s, sink, _) = uart();
        for b in b"hi\n" {
            s.write(DATA, &[*b]);
        }
        assert_eq!(&*sink.0.lock().expect("not poisoned"), b"hi\n");
        assert_eq!(rd(&mut s, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn input_raises_rda_interrupt_and_reads_back() {
        let (mut s, _, irqs) = uart();
        s.write(IER, &[IER_RDA]);
        s.queue_input(b"ab");
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut s, IIR_FCR) & 0x0f, IIR_RDA);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, DATA), b'a');
        assert_eq!(rd(&mut s, DATA), b'b');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut s, IIR_FCR) & 0x0f, IIR_NONE);
    }

    #[test]
    fn loopback_passes_the_linux_probe() {
        let (mut s, sink, _) = uart();
        s.write(MCR, &[MCR_LOOP | 0x0a]);
        assert_eq!(rd(&mut s, MSR) & 0xf0, MSR_CTS | MSR_DCD);
        s.write(DATA, &[0x55]);
        assert_eq!(rd(&mut s, DATA), 0x55);
        assert!(sink.0.lock().expect("not poisoned").is_empty());
        s.write(SCR, &[0xa5]);
        assert_eq!(rd(&mut s, SCR), 0xa5);
    }

    #[test]
    fn divisor_latch_is_separate_from_data() {
        let (mut s, sink, _) = uart();
        s.write(LCR, &[LCR_DLAB | 3]);
        s.write(DATA, &[1]);
        s.write(IER, &[0]);
        assert_eq!(rd(&mut s, DATA), 1);
        s.write(LCR, &[3]);
        assert!(sink.0.lock().expect("not poisoned").is_empty());
    }

    #[test]
    fn thre_interrupt_is_cleared_by_reading_iir() {
        let (mut s, _, irqs) = uart();
        s.write(IER, &[IER_THRE]);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut s, IIR_FCR) & 0x0f, IIR_THRE);
        assert_eq!(rd(&mut s, IIR_FCR) & 0x0f, IIR_NONE);
    }

    #[test]
    fn input_is_bounded() {
        let (mut s, _, _) = uart();
        s.queue_input(&vec![0u8; INPUT_MAX + 100]);
        assert_eq!(s.input.len(), INPUT_MAX);
    }
}
