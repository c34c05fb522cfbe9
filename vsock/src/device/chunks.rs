//! A connection's byte queue for its host, kept as the buffers the bytes arrived in: a
//! guest packet goes in, and whole buffers come out for a write, without a copy.

use std::collections::VecDeque;

/// Bytes in order, in the buffers they came in.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chunks {
    bufs: VecDeque<Vec<u8>>,
    len: usize,
}

impl Chunks {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `buf` (kept as it is).
    pub fn push(&mut self, buf: Vec<u8>) {
        if !buf.is_empty() {
            self.len += buf.len();
            self.bufs.push_back(buf);
        }
    }

    /// Appends `len` bytes that `fill` writes in place: after the last buffer's bytes when it
    /// has room to spare, else into a new one from `spare`. Short packets so share buffers,
    /// and the buffers stay few whatever the packet sizes. When `fill` fails (returns false)
    /// nothing is appended.
    pub fn append_with(
        &mut self,
        len: usize,
        spare: impl FnOnce() -> Vec<u8>,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> bool {
        if len == 0 {
            return true;
        }
        let fits = self
            .bufs
            .back()
            .is_some_and(|b| b.capacity() - b.len() >= len);
        if !fits {
            let mut buf = spare();
            buf.clear();
            self.bufs.push_back(buf);
        }
        let Some(back) = self.bufs.back_mut() else {
            return false;
        };
        let start = back.len();
        back.resize(start + len, 0);
        if fill(&mut back[start..]) {
            self.len += len;
            return true;
        }
        back.truncate(start);
        if back.is_empty() {
            self.bufs.pop_back();
        }
        false
    }

    /// Takes whole buffers from the front for one write: at most `max_bufs` of them, and no
    /// more than `max` bytes unless the first alone is longer.
    pub fn take_bufs(&mut self, max: usize, max_bufs: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut total = 0;
        while out.len() < max_bufs {
            let Some(front) = self.bufs.front() else {
                break;
            };
            if !out.is_empty() && total + front.len() > max {
                break;
            }
            total += front.len();
            out.extend(self.bufs.pop_front());
        }
        self.len -= total;
        out
    }

    /// Puts `buf` back in front (what a write did not take).
    pub fn push_front(&mut self, buf: Vec<u8>) {
        if !buf.is_empty() {
            self.len += buf.len();
            self.bufs.push_front(buf);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn short_data_shares_buffers_and_a_write_takes_whole_buffers() {
        let mut c = Chunks::default();
        let put = |data: &'static [u8]| {
            move |b: &mut [u8]| {
                b.copy_from_slice(data);
                true
            }
        };
        assert!(c.append_with(2, || Vec::with_capacity(8), put(b"ab")));
        assert!(c.append_with(3, || panic!("room in the last buffer"), put(b"cde")));
        assert!(c.append_with(4, || Vec::with_capacity(8), put(b"fghi")));
        assert!(!c.append_with(1, || panic!("room in the last buffer"), |_| false));
        assert!(!c.append_with(9, || Vec::with_capacity(16), |_| false));
        c.push(vec![1; 20]);
        assert!(c.append_with(0, || panic!("nothing to append"), |_| false));
        assert_eq!(
            (c.len(), c.bufs.len()),
            (29, 3),
            "a failed fill appends nothing"
        );
        let first = c.take_bufs(10, 8);
        assert_eq!(
            first,
            [b"abcde".to_vec(), b"fghi".to_vec()],
            "no more than 10 bytes"
        );
        c.push(vec![2; 3]);
        assert_eq!(
            c.take_bufs(10, 8),
            [vec![1; 20]],
            "a longer first buffer goes alone"
        );
        c.push(vec![3; 1]);
        assert_eq!(c.take_bufs(100, 1), [vec![2; 3]], "at most max_bufs");
        c.push_front(vec![9]);
        c.push_front(Vec::new());
        assert_eq!(c.take_bufs(100, 8), [vec![9], vec![3]]);
        assert!(c.is_empty() && c.take_bufs(100, 8).is_empty());
    }
}
