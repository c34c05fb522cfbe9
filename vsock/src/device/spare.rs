//! Spare buffers for guest data on its way to the host: a buffer written out comes back for
//! the next guest packet, so the steady stream neither allocates nor zeroes nor faults in
//! fresh pages per packet.

use std::cell::RefCell;

/// The most spare buffers kept. Each holds at most one packet or one write (64 KiB), so the
/// spares never hold more than 1 MiB.
const MAX_SPARES: usize = 16;

/// The largest buffer kept for reuse.
const MAX_SPARE_CAPACITY: usize = 64 << 10;

/// A bounded stack of buffers, kept with their length (their bytes are initialised), so a
/// buffer of at most that length is handed out again without being zeroed.
#[derive(Default)]
pub(crate) struct Spares {
    bufs: RefCell<Vec<Vec<u8>>>,
}

impl Spares {
    /// A buffer of exactly `len` bytes (their contents unspecified, but initialised).
    pub fn get(&self, len: usize) -> Vec<u8> {
        let spare = self.bufs.borrow_mut().pop();
        let mut buf = spare.unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// An empty buffer for appending up to `cap` bytes.
    pub fn empty(&self, cap: usize) -> Vec<u8> {
        let mut buf = self.bufs.borrow_mut().pop().unwrap_or_default();
        buf.clear();
        buf.reserve(cap);
        buf
    }

    /// Keeps `buf` for reuse, when there is room and it is not too big to keep.
    pub fn put(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < MAX_SPARES && buf.capacity() <= MAX_SPARE_CAPACITY && buf.capacity() > 0 {
            bufs.push(buf);
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.bufs.borrow().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_at_the_asked_length_and_the_spares_stay_bounded() {
        let s = Spares::default();
        let a = s.get(100);
        assert_eq!(a.len(), 100);
        let ptr = a.as_ptr();
        s.put(a);
        let b = s.get(40);
        assert_eq!((b.len(), b.as_ptr()), (40, ptr), "the same buffer, shorter");
        s.put(b);
        let c = s.get(200);
        assert_eq!(c.len(), 200, "grown to the length asked");
        s.put(c);
        let e = s.empty(10);
        assert!(e.is_empty() && e.capacity() >= 10);
        for _ in 0..2 * MAX_SPARES {
            s.put(vec![1; 8]);
        }
        assert_eq!(s.count(), MAX_SPARES);
        s.put(vec![0; MAX_SPARE_CAPACITY + 1]);
        s.put(Vec::new());
        assert_eq!(
            s.count(),
            MAX_SPARES,
            "nothing too big, nothing without capacity"
        );
    }
}
