//! Raw deflate (RFC 1951) decoding for compressed qcow2 clusters, after zlib's `puff.c`:
//! small and slow-ish, bounded by its output buffer, and an error (never a panic) on any
//! malformed input.

/// Why a stream could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// The input ended early.
    Truncated,
    /// A malformed block, code table or back-reference.
    Invalid,
    /// The stream ended before filling the output.
    Short,
}

/// Stops decoding (successfully) when the output is full.
enum Stop {
    Full,
    Err(InflateError),
}

impl From<InflateError> for Stop {
    fn from(e: InflateError) -> Stop {
        Stop::Err(e)
    }
}

const MAX_BITS: usize = 15;

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    cnt: u32,
}

impl Bits<'_> {
    fn bits(&mut self, need: u32) -> Result<u32, InflateError> {
        while self.cnt < need {
            let b = *self.data.get(self.pos).ok_or(InflateError::Truncated)?;
            self.pos += 1;
            self.buf |= u64::from(b) << self.cnt;
            self.cnt += 8;
        }
        let v = (self.buf & ((1u64 << need) - 1)) as u32;
        self.buf >>= need;
        self.cnt -= need;
        Ok(v)
    }
}

/// A canonical Huffman code: codes per length, symbols in code order.
struct Huffman {
    count: [u16; MAX_BITS + 1],
    symbol: Vec<u16>,
}

impl Huffman {
    /// Builds the code for `lengths` (one per symbol, 0 = unused); over-subscribed sets are
    /// refused, incomplete ones accepted (their unused codes fail to decode).
    fn new(lengths: &[u8]) -> Result<Huffman, InflateError> {
        let mut count = [0u16; MAX_BITS + 1];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        let mut left: i32 = 1;
        for &c in &count[1..] {
            left <<= 1;
            left -= i32::from(c);
            if left < 0 {
                return Err(InflateError::Invalid);
            }
        }
        let mut offs = [0u16; MAX_BITS + 2];
        for len in 1..=MAX_BITS {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                let o = &mut offs[usize::from(l)];
                symbol[usize::from(*o)] = sym as u16;
                *o += 1;
            }
        }
        Ok(Huffman { count, symbol })
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Result<u16, InflateError> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..=MAX_BITS {
            code |= bits.bits(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return self
                    .symbol
                    .get((index + code - first) as usize)
                    .copied()
                    .ok_or(InflateError::Invalid);
            }
            index += count;
            first += count;
            first <<= 1;
            code <<= 1;
        }
        Err(InflateError::Invalid)
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Out<'_> {
    fn push(&mut self, b: u8) -> Result<(), Stop> {
        let slot = self.buf.get_mut(self.len).ok_or(Stop::Full)?;
        *slot = b;
        self.len += 1;
        Ok(())
    }
}

fn stored(bits: &mut Bits<'_>, out: &mut Out<'_>) -> Result<(), Stop> {
    bits.buf = 0;
    bits.cnt = 0;
    let hdr = bits
        .data
        .get(bits.pos..bits.pos + 4)
        .ok_or(InflateError::Truncated)?;
    let len = u16::from_le_bytes([hdr[0], hdr[1]]);
    let nlen = u16::from_le_bytes([hdr[2], hdr[3]]);
    if len != !nlen {
        return Err(InflateError::Invalid.into());
    }
    bits.pos += 4;
    for _ in 0..len {
        let b = *bits.data.get(bits.pos).ok_or(InflateError::Truncated)?;
        bits.pos += 1;
        out.push(b)?;
    }
    Ok(())
}

fn codes(
    bits: &mut Bits<'_>,
    out: &mut Out<'_>,
    lencode: &Huffman,
    distcode: &Huffman,
) -> Result<(), Stop> {
    loop {
        let sym = lencode.decode(bits)?;
        match sym {
            0..=255 => out.push(sym as u8)?,
            256 => return Ok(()),
            _ => {
                let i = usize::from(sym - 257);
                let (Some(&base), Some(&extra)) = (LEN_BASE.get(i), LEN_EXTRA.get(i)) else {
                    return Err(InflateError::Invalid.into());
                };
                let len = usize::from(base) + bits.bits(u32::from(extra))? as usize;
                let d = usize::from(distcode.decode(bits)?);
                let (Some(&base), Some(&extra)) = (DIST_BASE.get(d), DIST_EXTRA.get(d)) else {
                    return Err(InflateError::Invalid.into());
                };
                let dist = usize::from(base) + bits.bits(u32::from(extra))? as usize;
                if dist > out.len {
                    return Err(InflateError::Invalid.into());
                }
                for _ in 0..len {
                    let b = out.buf[out.len - dist];
                    out.push(b)?;
                }
            }
        }
    }
}

fn fixed(bits: &mut Bits<'_>, out: &mut Out<'_>) -> Result<(), Stop> {
    let mut lengths = [0u8; 288];
    lengths[..144].fill(8);
    lengths[144..256].fill(9);
    lengths[256..280].fill(7);
    lengths[280..].fill(8);
    let lencode = Huffman::new(&lengths)?;
    let distcode = Huffman::new(&[5u8; 30])?;
    codes(bits, out, &lencode, &distcode)
}

fn dynamic(bits: &mut Bits<'_>, out: &mut Out<'_>) -> Result<(), Stop> {
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let nlen = bits.bits(5)? as usize + 257;
    let ndist = bits.bits(5)? as usize + 1;
    let ncode = bits.bits(4)? as usize + 4;
    if nlen > 286 || ndist > 30 {
        return Err(InflateError::Invalid.into());
    }
    let mut lengths = [0u8; 320];
    for &o in &ORDER[..ncode] {
        lengths[o] = bits.bits(3)? as u8;
    }
    let lencode = Huffman::new(&lengths[..19])?;
    let mut index = 0;
    while index < nlen + ndist {
        let sym = lencode.decode(bits)?;
        if sym < 16 {
            lengths[index] = sym as u8;
            index += 1;
            continue;
        }
        let (value, repeat) = match sym {
            16 => {
                if index == 0 {
                    return Err(InflateError::Invalid.into());
                }
                (lengths[index - 1], 3 + bits.bits(2)? as usize)
            }
            17 => (0, 3 + bits.bits(3)? as usize),
            _ => (0, 11 + bits.bits(7)? as usize),
        };
        if index + repeat > nlen + ndist {
            return Err(InflateError::Invalid.into());
        }
        lengths[index..index + repeat].fill(value);
        index += repeat;
    }
    if lengths[256] == 0 {
        return Err(InflateError::Invalid.into());
    }
    let lencode = Huffman::new(&lengths[..nlen])?;
    let distcode = Huffman::new(&lengths[nlen..nlen + ndist])?;
    codes(bits, out, &lencode, &distcode)
}

/// Decodes the raw deflate stream `input` into all of `out` (as QEMU does: the stream may go
/// on past a full output, but must not end before it).
pub(crate) fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), InflateError> {
    let mut bits = Bits {
        data: input,
        pos: 0,
        buf: 0,
        cnt: 0,
    };
    let mut o = Out { buf: out, len: 0 };
    let res = (|| -> Result<(), Stop> {
        loop {
            let last = bits.bits(1)?;
            match bits.bits(2)? {
                0 => stored(&mut bits, &mut o)?,
                1 => fixed(&mut bits, &mut o)?,
                2 => dynamic(&mut bits, &mut o)?,
                _ => return Err(InflateError::Invalid.into()),
            }
            if last == 1 {
                return Ok(());
            }
        }
    })();
    match res {
        Err(Stop::Full) => Ok(()),
        Err(Stop::Err(e)) => Err(e),
        Ok(()) if o.len == o.buf.len() => Ok(()),
        Ok(()) => Err(InflateError::Short),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stored_block_decodes() {
        let mut out = [0u8; 5];
        inflate(
            &[0x01, 5, 0, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o'],
            &mut out,
        )
        .unwrap();
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn fixed_block_with_back_reference_decodes() {
        // zlib.compress(b"abcabcabcabc", wbits=-15)
        let input = [0x4b, 0x4c, 0x4a, 0x4e, 0x84, 0x21, 0x00];
        let mut out = [0u8; 12];
        inflate(&input, &mut out).unwrap();
        assert_eq!(&out, b"abcabcabcabc");
    }

    #[test]
    fn short_stream_is_an_error() {
        let mut out = [0u8; 6];
        assert_eq!(
            inflate(
                &[0x01, 5, 0, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o'],
                &mut out
            ),
            Err(InflateError::Short)
        );
        assert_eq!(inflate(&[], &mut out), Err(InflateError::Truncated));
    }

    proptest! {
        #[test]
        fn random_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = vec![0u8; 4096];
            let _ = inflate(&input, &mut out);
        }
    }
}
