//! Fuzzes what reaches the vsock device and its broker from outside: the 44-byte packet
//! header a guest puts in front of every packet, the frames on the broker channel, and the
//! `CONNECT <port>` line a host process sends.
//!
//! Invariants: a header decodes from any bytes and encodes back to the same bytes, and its
//! op is known exactly when its value names one; a frame the broker channel accepts for a
//! direction encodes back to the same 16 bytes and carries the descriptor count its kind
//! says; an accepted `CONNECT` line is exactly `CONNECT `, 1 to 10 digits that fit a `u32`
//! and a newline, within 32 bytes, and its port prints back to the same digits (no leading
//! zeros) or it had leading zeros.
//!
//! Input layout: [selector byte, then the header, the frame (with a descriptor count), or
//! the line].

#![no_main]

use libfuzzer_sys::fuzz_target;
use vsock::broker::{parse_connect, Frame, To, FRAME_SIZE, MAX_CONNECT_LINE};
use vsock::packet::{Header, Op, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let Some(bytes) = rest.first_chunk::<HEADER_SIZE>() else {
                return;
            };
            let h = Header::decode(bytes);
            assert_eq!(&h.encode(), bytes, "a header encodes back to its bytes");
            assert_eq!(h.op().map(Op::to_u16), Op::from_u16(h.op).map(Op::to_u16));
            if let Some(op) = h.op() {
                assert_eq!(op.to_u16(), h.op);
            }
        }
        1 => {
            let Some((&fds, bytes)) = rest.split_first() else {
                return;
            };
            let fds = usize::from(fds % 3);
            for to in [To::Device, To::Broker] {
                if let Ok(frame) = Frame::decode(bytes, fds, to) {
                    assert_eq!(bytes.len(), FRAME_SIZE);
                    assert_eq!(&frame.encode()[..], bytes, "a frame encodes back");
                    assert_eq!(frame.fds(), fds, "the descriptor count its kind says");
                    // A frame goes one way only.
                    let other = if to == To::Device {
                        To::Broker
                    } else {
                        To::Device
                    };
                    assert!(Frame::decode(bytes, fds, other).is_err());
                }
            }
        }
        _ => {
            if let Ok(port) = parse_connect(rest) {
                assert!(rest.len() <= MAX_CONNECT_LINE);
                let digits = &rest[b"CONNECT ".len()..rest.len() - 1];
                assert!(rest.starts_with(b"CONNECT ") && rest.ends_with(b"\n"));
                assert!((1..=10).contains(&digits.len()));
                assert!(digits.iter().all(u8::is_ascii_digit));
                let printed = port.to_string();
                assert!(
                    printed.as_bytes() == digits || digits[0] == b'0',
                    "the port reads back as its digits"
                );
            }
        }
    }
});
