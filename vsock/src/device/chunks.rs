//! A connection's byte queue, kept as the buffers the bytes arrived in: a host read or a
//! guest packet goes in without a copy, and a whole buffer comes out without one.

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

    /// Takes the first `n` bytes (at most what there is): the first buffer itself when it is
    /// exactly that long, else a copy.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.len);
        if self.bufs.front().is_some_and(|b| b.len() == n) {
            self.len -= n;
            return self.bufs.pop_front().unwrap_or_default();
        }
        let mut out = Vec::with_capacity(n);
        self.copy_front(n, &mut out);
        self.drop_front(n);
        out
    }

    /// Copies the first `n` bytes (at most what there is) into `out`.
    pub fn copy_front(&self, n: usize, out: &mut Vec<u8>) {
        let mut left = n.min(self.len);
        for b in &self.bufs {
            if left == 0 {
                break;
            }
            let k = b.len().min(left);
            out.extend_from_slice(&b[..k]);
            left -= k;
        }
    }

    /// Drops the first `n` bytes (at most what there is).
    pub fn drop_front(&mut self, n: usize) {
        let mut left = n.min(self.len);
        self.len -= left;
        while left > 0 {
            let Some(front) = self.bufs.front_mut() else {
                return;
            };
            if front.len() <= left {
                left -= front.len();
                self.bufs.pop_front();
            } else {
                front.drain(..left);
                left = 0;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_whatever_the_cuts() {
        let mut c = Chunks::default();
        c.push(vec![1, 2, 3]);
        c.push(vec![]);
        c.push(vec![4, 5]);
        c.push(vec![6]);
        assert_eq!(c.len(), 6);
        assert_eq!(c.take(3), [1, 2, 3], "a whole buffer");
        assert_eq!(c.take(1), [4], "part of one");
        let mut out = Vec::new();
        c.copy_front(10, &mut out);
        assert_eq!(out, [5, 6]);
        c.drop_front(1);
        assert_eq!((c.len(), c.take(9)), (1, vec![6]));
        assert!(c.is_empty());
        assert_eq!(c.take(4), Vec::<u8>::new());
    }
}
