//! Reading a chain's device-readable buffers and writing its device-writable ones, by copy
//! (`std::io::Read` / `Write`) or zero-copy (guest iovecs for io_uring).

use std::io;

use memory::{ByteValued, GuestAddress, GuestIoVecs, GuestMemory};

use crate::queue::BufList;
use crate::queue::Buffer;
use crate::{Error, Result};

/// A position in a list of buffers.
#[derive(Clone, Debug)]
struct Cursor {
    bufs: BufList,
    /// Buffer the position is in.
    index: usize,
    /// Offset in that buffer.
    offset: usize,
    available: usize,
    consumed: usize,
}

impl Cursor {
    fn new(bufs: &[Buffer]) -> Cursor {
        Cursor {
            bufs: BufList::from_slice(bufs),
            index: 0,
            offset: 0,
            available: bufs.iter().map(|b| b.len as usize).sum(),
            consumed: 0,
        }
    }

    /// Calls `f(addr, len)` for the pieces of the next `max` bytes (or fewer, if fewer are
    /// left), without consuming them.
    fn ranges<E>(
        &self,
        max: usize,
        mut f: impl FnMut(GuestAddress, usize) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut left = max.min(self.available);
        let mut offset = self.offset;
        for b in self.bufs.as_slice().iter().skip(self.index) {
            if left == 0 {
                break;
            }
            let n = (b.len as usize - offset).min(left);
            f(b.addr.wrapping_add(offset as u64), n)?;
            left -= n;
            offset = 0;
        }
        Ok(())
    }

    /// Moves past `n` bytes (or all that is left); returns how many.
    /// iovecs over the next `max` bytes (or all that is left), without consuming them.
    fn iovecs(&self, mem: &GuestMemory, max: usize) -> Result<GuestIoVecs> {
        let mut iov = GuestIoVecs::new(mem.clone());
        self.ranges(max, |addr, n| iov.push(addr, n))
            .map_err(Error::BufferAccess)?;
        Ok(iov)
    }

    fn consume(&mut self, n: usize) -> usize {
        let n = n.min(self.available);
        let mut left = n;
        let bufs = self.bufs.as_slice();
        while left > 0 {
            let in_buf = bufs[self.index].len as usize - self.offset;
            if left < in_buf {
                self.offset += left;
                left = 0;
            } else {
                left -= in_buf;
                self.index += 1;
                self.offset = 0;
            }
        }
        self.available -= n;
        self.consumed += n;
        n
    }

    /// Keeps the next `at` bytes and returns a cursor over the rest.
    fn split_at(&mut self, at: usize) -> Cursor {
        let mut head = Vec::new();
        let mut tail = Vec::new();
        let mut left = at;
        // The ranges left, split at `at`; every piece is a sub-range of a validated buffer.
        let _ = self.ranges(usize::MAX, |addr, len| -> std::result::Result<(), ()> {
            let keep = len.min(left);
            if keep > 0 {
                head.push(Buffer {
                    addr,
                    len: keep as u32,
                });
            }
            if len > keep {
                tail.push(Buffer {
                    addr: addr.wrapping_add(keep as u64),
                    len: (len - keep) as u32,
                });
            }
            left -= keep;
            Ok(())
        });
        let consumed = self.consumed;
        *self = Cursor::new(&head);
        self.consumed = consumed;
        Cursor::new(&tail)
    }
}

/// Reads the device-readable buffers of a chain, in order. Holds a clone of the guest memory
/// so it can live across awaits.
#[derive(Clone, Debug)]
pub struct Reader {
    mem: GuestMemory,
    cursor: Cursor,
}

impl Reader {
    /// A reader over `bufs` (buffers of a validated chain).
    pub fn new(mem: GuestMemory, bufs: &[Buffer]) -> Reader {
        Reader {
            mem,
            cursor: Cursor::new(bufs),
        }
    }

    /// Bytes left to read.
    pub fn available_bytes(&self) -> usize {
        self.cursor.available
    }

    /// Bytes read (or consumed) so far.
    pub fn bytes_read(&self) -> usize {
        self.cursor.consumed
    }

    /// Reads a `T` (native byte order; decode virtio fields as little-endian, or read a byte
    /// array and decode it).
    pub fn read_obj<T: ByteValued>(&mut self) -> Result<T> {
        let mut v = T::zeroed();
        self.read_exact_bytes(v.as_bytes_mut())?;
        Ok(v)
    }

    /// Fills `buf` completely, or fails without consuming anything.
    pub fn read_exact_bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() > self.cursor.available {
            return Err(Error::ChainTooShort {
                available: self.cursor.available,
                needed: buf.len(),
            });
        }
        let mut done = 0;
        let mem = &self.mem;
        self.cursor.ranges(buf.len(), |addr, n| {
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(Error::BufferAccess)?;
            done += n;
            Ok(())
        })?;
        self.cursor.consume(done);
        Ok(())
    }

    /// Skips `n` bytes (or all that is left); returns how many. After a zero-copy write from
    /// [`iovecs`](Reader::iovecs), consume what the kernel took.
    pub fn consume(&mut self, n: usize) -> usize {
        self.cursor.consume(n)
    }

    /// iovecs over the next `max` bytes (or all that is left), for an io_uring write straight
    /// from guest memory. Consumes nothing.
    pub fn iovecs(&self, max: usize) -> Result<GuestIoVecs> {
        self.cursor.iovecs(&self.mem, max)
    }

    /// Appends iovecs over the next `max` bytes (or all that is left) to `iov` (over the
    /// same guest memory), to gather several chains into one write; fails, appending nothing,
    /// when a range is outside `iov`'s memory. Consumes nothing.
    pub fn append_iovecs(&self, iov: &mut GuestIoVecs, max: usize) -> Result<()> {
        let before = iov.total_len();
        self.cursor
            .ranges(max, |addr, n| iov.push(addr, n))
            .map_err(|e| {
                iov.truncate(before);
                Error::BufferAccess(e)
            })
    }

    /// Keeps the next `offset` bytes in `self` and returns a reader over the rest.
    pub fn split_at(&mut self, offset: usize) -> Reader {
        Reader {
            mem: self.mem.clone(),
            cursor: self.cursor.split_at(offset),
        }
    }
}

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cursor.available);
        self.read_exact_bytes(&mut buf[..n])
            .map_err(io::Error::other)?;
        Ok(n)
    }
}

/// Writes the device-writable buffers of a chain, in order. Holds a clone of the guest
/// memory so it can live across awaits.
#[derive(Clone, Debug)]
pub struct Writer {
    mem: GuestMemory,
    cursor: Cursor,
}

impl Writer {
    /// A writer over `bufs` (buffers of a validated chain).
    pub fn new(mem: GuestMemory, bufs: &[Buffer]) -> Writer {
        Writer {
            mem,
            cursor: Cursor::new(bufs),
        }
    }

    /// Bytes of room left.
    pub fn available_bytes(&self) -> usize {
        self.cursor.available
    }

    /// Bytes written (or consumed) so far: the used length to report.
    pub fn bytes_written(&self) -> usize {
        self.cursor.consumed
    }

    /// Writes `val` (native byte order; encode virtio fields as little-endian).
    pub fn write_obj<T: ByteValued>(&mut self, val: T) -> Result<()> {
        self.write_all_bytes(val.as_bytes())
    }

    /// Writes all of `buf`, or fails without writing anything.
    pub fn write_all_bytes(&mut self, buf: &[u8]) -> Result<()> {
        if buf.len() > self.cursor.available {
            return Err(Error::ChainTooShort {
                available: self.cursor.available,
                needed: buf.len(),
            });
        }
        let mut done = 0;
        let mem = &self.mem;
        self.cursor.ranges(buf.len(), |addr, n| {
            mem.write_slice(&buf[done..done + n], addr)
                .map_err(Error::BufferAccess)?;
            done += n;
            Ok(())
        })?;
        self.cursor.consume(done);
        Ok(())
    }

    /// Skips `n` bytes (or all that is left); returns how many. After a zero-copy read into
    /// [`iovecs`](Writer::iovecs), consume what the kernel filled.
    pub fn consume(&mut self, n: usize) -> usize {
        self.cursor.consume(n)
    }

    /// iovecs over the next `max` bytes (or all that is left), for an io_uring read straight
    /// into guest memory. Consumes nothing.
    pub fn iovecs(&self, max: usize) -> Result<GuestIoVecs> {
        self.cursor.iovecs(&self.mem, max)
    }

    /// Keeps the next `offset` bytes in `self` and returns a writer over the rest (the
    /// status byte at the end of a block request, say).
    pub fn split_at(&mut self, offset: usize) -> Writer {
        Writer {
            mem: self.mem.clone(),
            cursor: self.cursor.split_at(offset),
        }
    }
}

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cursor.available);
        self.write_all_bytes(&buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use executor::{AsyncFd, IoVecs};
    use std::io::{Read, Write};

    fn memory() -> GuestMemory {
        GuestMemory::new(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .expect("memory")
    }

    fn bufs() -> Vec<Buffer> {
        vec![
            Buffer {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Buffer {
                addr: GuestAddress(0xfffe),
                len: 4, // crosses into the second region
            },
            Buffer {
                addr: GuestAddress(0x3000),
                len: 5,
            },
        ]
    }

    #[test]
    fn writes_then_reads_back_across_buffers() {
        let mem = memory();
        let mut w = Writer::new(mem.clone(), &bufs());
        assert_eq!(w.available_bytes(), 12);
        w.write_all(b"hello, world").expect("fits");
        assert_eq!(w.bytes_written(), 12);
        assert_eq!(w.write(b"!").expect("full"), 0);
        let mut r = Reader::new(mem, &bufs());
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello, world");
        assert_eq!(r.bytes_read(), 12);
    }

    #[test]
    fn read_obj_past_the_end_fails_without_consuming() {
        let mem = memory();
        mem.write_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0], GuestAddress(0))
            .expect("write");
        let mut r = Reader::new(
            mem,
            &[Buffer {
                addr: GuestAddress(0),
                len: 10,
            }],
        );
        assert_eq!(u32::from_le(r.read_obj::<u32>().expect("u32")), 1);
        assert_eq!(r.read_obj::<[u8; 4]>().expect("bytes"), [2, 0, 0, 0]);
        assert!(matches!(
            r.read_obj::<u32>(),
            Err(Error::ChainTooShort {
                available: 2,
                needed: 4
            })
        ));
        assert_eq!(r.available_bytes(), 2);
    }

    #[test]
    fn split_writer_keeps_the_status_byte_apart() {
        let mem = memory();
        let mut data = Writer::new(mem.clone(), &bufs());
        let mut status = data.split_at(11);
        assert_eq!((data.available_bytes(), status.available_bytes()), (11, 1));
        status.write_obj(0u8).expect("status");
        data.write_all(&[9; 11]).expect("data");
        let mut all = [0u8; 12];
        Reader::new(mem, &bufs())
            .read_exact(&mut all)
            .expect("read");
        assert_eq!(all, [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
    }

    #[test]
    fn split_reader_after_a_partial_read() {
        let mem = memory();
        mem.write_slice(b"abc", GuestAddress(0x1000))
            .expect("write");
        mem.write_slice(b"defg", GuestAddress(0xfffe))
            .expect("write");
        let mut r = Reader::new(mem, &bufs());
        assert_eq!(r.read_obj::<[u8; 2]>().expect("two"), *b"ab");
        let mut rest = r.split_at(3);
        assert_eq!(r.read_obj::<[u8; 3]>().expect("three"), *b"cde");
        assert_eq!(r.available_bytes(), 0);
        assert_eq!(r.bytes_read(), 5);
        assert_eq!(rest.read_obj::<[u8; 2]>().expect("two"), *b"fg");
        assert_eq!(rest.available_bytes(), 5);
    }

    #[test]
    fn iovecs_cover_the_next_bytes_and_split_at_regions() {
        let mem = memory();
        let mut w = Writer::new(mem, &bufs());
        w.consume(1);
        let iov = w.iovecs(8).expect("iovecs");
        let lens: Vec<usize> = iov.iovecs().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [2, 2, 2, 2], "the buffer at 0xfffe splits at 0x10000");
        assert_eq!(w.iovecs(usize::MAX).expect("all").total_len(), 11);
        assert_eq!(w.bytes_written(), 1, "iovecs consume nothing");
    }

    #[test]
    fn appended_iovecs_gather_chains_and_a_bad_range_appends_nothing() {
        let mem = memory();
        let mut r = Reader::new(mem.clone(), &bufs());
        r.consume(3);
        let mut iov = GuestIoVecs::new(mem.clone());
        r.append_iovecs(&mut iov, 4).expect("first chain");
        Reader::new(mem.clone(), &bufs())
            .append_iovecs(&mut iov, 2)
            .expect("second chain");
        assert_eq!(iov.total_len(), 6);
        assert_eq!(r.bytes_read(), 3, "appending consumes nothing");
        let outside = [
            Buffer {
                addr: GuestAddress(0),
                len: 2,
            },
            Buffer {
                addr: GuestAddress(1 << 40),
                len: 2,
            },
        ];
        let before = iov.len();
        assert!(Reader::new(mem, &outside)
            .append_iovecs(&mut iov, 4)
            .is_err());
        assert_eq!(
            (iov.len(), iov.total_len()),
            (before, 6),
            "nothing appended"
        );
    }

    #[test]
    fn zero_copy_read_into_the_writer_iovecs() {
        let ex = executor::Executor::new().expect("executor");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        (&a).write_all(b"0123456789ab").expect("send");
        let fd = AsyncFd::new(b.into());
        let mem = memory();
        let mut w = Writer::new(mem.clone(), &bufs());
        let (res, _) = ex.run_until(fd.read_mem_at(w.iovecs(12).expect("iovecs"), 0));
        let n = res.expect("readv");
        assert_eq!(w.consume(n), 12);
        let mut back = Vec::new();
        Reader::new(mem, &bufs())
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, b"0123456789ab");
    }
}
