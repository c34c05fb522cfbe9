//! The broker channel: how the jailed device gets connected host streams without opening
//! anything itself, and the host's `CONNECT <port>` handshake.
//!
//! # Why a broker
//! Hybrid vsock (the Firecracker and rust-vmm `vhost-device-vsock` convention) puts the host
//! side on unix sockets: a host process connects to `PATH` and writes `CONNECT <port>\n` to
//! reach the guest's listener on `port`; a guest connecting to host port `P` reaches the unix
//! listener at `PATH_P`. A jailed device may not accept on a path or connect to one, so the
//! unjailed [`Broker`](crate::Broker) does both and passes the connected streams to the
//! device over a unix socketpair (SCM_RIGHTS).
//!
//! # Frames
//! Every message is one [`FRAME_SIZE`]-byte frame of four little-endian `u32`s,
//! `kind, id, port, status`, sent by one `sendmsg`, with at most one descriptor:
//!
//! | kind | direction | id | port | status | fd |
//! | --- | --- | --- | --- | --- | --- |
//! | 1 `HostConnect` | broker → device | 0 | guest port | 0 | the host stream |
//! | 2 `ConnectHost` | device → broker | request id | host port | 0 | none |
//! | 3 `Connected` | broker → device | request id | 0 | 0 | the stream to `PATH_<port>` |
//! | 4 `Failed` | broker → device | request id | 0 | errno (nonzero) | none |
//!
//! A `HostConnect` stream has had its `CONNECT` line read (and nothing more); the device
//! writes `OK <host port>\n` on it once the guest accepts, or closes it. A `Failed` answer
//! makes the device reset the guest's connection.
//!
//! Each side checks every frame ([`Frame::decode`]): its size, a kind that may travel in
//! that direction, the fields that must be zero, and the descriptor count. A frame that
//! fails ends the channel: on a stream socket a bad frame leaves no boundary to resume at.

use crate::{Error, Result};

/// The size of a frame on the broker channel.
pub const FRAME_SIZE: usize = 16;
/// The longest `CONNECT <port>\n` line a host process may send, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

const KIND_HOST_CONNECT: u32 = 1;
const KIND_CONNECT_HOST: u32 = 2;
const KIND_CONNECTED: u32 = 3;
const KIND_FAILED: u32 = 4;

/// Who receives a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum To {
    /// The device (it takes `HostConnect`, `Connected`, `Failed`).
    Device,
    /// The broker (it takes `ConnectHost`).
    Broker,
}

/// A frame on the broker channel (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A host process connected for guest port `port`; its stream comes with the frame.
    HostConnect {
        /// The guest port to connect to.
        port: u32,
    },
    /// The guest connects to host port `port`: connect to `PATH_<port>`.
    ConnectHost {
        /// The device's request id, echoed in the answer.
        id: u32,
        /// The host port.
        port: u32,
    },
    /// Request `id` is connected; the stream comes with the frame.
    Connected {
        /// The request id.
        id: u32,
    },
    /// Request `id` failed.
    Failed {
        /// The request id.
        id: u32,
        /// The errno of the failed connect (nonzero).
        errno: u32,
    },
}

impl Frame {
    /// How many descriptors travel with the frame.
    pub fn fds(&self) -> usize {
        match self {
            Frame::HostConnect { .. } | Frame::Connected { .. } => 1,
            Frame::ConnectHost { .. } | Frame::Failed { .. } => 0,
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; FRAME_SIZE] {
        let (kind, id, port, status) = match *self {
            Frame::HostConnect { port } => (KIND_HOST_CONNECT, 0, port, 0),
            Frame::ConnectHost { id, port } => (KIND_CONNECT_HOST, id, port, 0),
            Frame::Connected { id } => (KIND_CONNECTED, id, 0, 0),
            Frame::Failed { id, errno } => (KIND_FAILED, id, 0, errno),
        };
        let mut b = [0u8; FRAME_SIZE];
        for (i, v) in [kind, id, port, status].into_iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a frame received by `to` with `fds` descriptors.
    pub fn decode(bytes: &[u8], fds: usize, to: To) -> Result<Frame> {
        let b: &[u8; FRAME_SIZE] = bytes
            .try_into()
            .map_err(|_| Error::FrameSize(bytes.len()))?;
        let word =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (kind, id, port, status) = (word(0), word(1), word(2), word(3));
        let zero = |field: &'static str, value: u32| {
            if value == 0 {
                Ok(())
            } else {
                Err(Error::FrameField { kind, field, value })
            }
        };
        let frame = match (kind, to) {
            (KIND_HOST_CONNECT, To::Device) => {
                zero("id", id)?;
                zero("status", status)?;
                Frame::HostConnect { port }
            }
            (KIND_CONNECT_HOST, To::Broker) => {
                zero("status", status)?;
                Frame::ConnectHost { id, port }
            }
            (KIND_CONNECTED, To::Device) => {
                zero("port", port)?;
                zero("status", status)?;
                Frame::Connected { id }
            }
            (KIND_FAILED, To::Device) => {
                zero("port", port)?;
                if status == 0 {
                    return Err(Error::FrameField {
                        kind,
                        field: "status",
                        value: 0,
                    });
                }
                Frame::Failed { id, errno: status }
            }
            _ => return Err(Error::FrameKind(kind)),
        };
        if frame.fds() != fds {
            return Err(Error::FrameFds {
                kind,
                expected: frame.fds(),
                got: fds,
            });
        }
        Ok(frame)
    }
}

/// The port of a complete `CONNECT <port>\n` line (newline included): `CONNECT`, one space,
/// 1 to 10 decimal digits that fit a `u32`, and the newline; nothing else.
pub fn parse_connect(line: &[u8]) -> Result<u32> {
    if line.len() > MAX_CONNECT_LINE {
        return Err(Error::ConnectLine("too long"));
    }
    let rest = line
        .strip_prefix(b"CONNECT ")
        .ok_or(Error::ConnectLine("not a CONNECT command"))?;
    let digits = rest
        .strip_suffix(b"\n")
        .ok_or(Error::ConnectLine("no newline at the end"))?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Error::ConnectLine("the port is not a decimal number"));
    }
    digits
        .iter()
        .try_fold(0u32, |n, d| {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
        .ok_or(Error::ConnectLine("the port does not fit 32 bits"))
}

/// The reply the device writes on a host stream once the guest accepted: `OK <host port>\n`.
pub fn ok_line(host_port: u32) -> Vec<u8> {
    format!("OK {host_port}\n").into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn frames_round_trip_in_their_direction_only() {
        let cases = [
            (Frame::HostConnect { port: 1234 }, To::Device),
            (Frame::ConnectHost { id: 7, port: 80 }, To::Broker),
            (Frame::Connected { id: 7 }, To::Device),
            (Frame::Failed { id: 9, errno: 111 }, To::Device),
        ];
        for (frame, to) in cases {
            let b = frame.encode();
            assert_eq!(Frame::decode(&b, frame.fds(), to).unwrap(), frame);
            let other = if to == To::Device {
                To::Broker
            } else {
                To::Device
            };
            assert!(matches!(
                Frame::decode(&b, frame.fds(), other),
                Err(Error::FrameKind(_))
            ));
        }
    }

    #[test]
    fn frame_layout_is_four_le_words() {
        assert_eq!(
            Frame::ConnectHost {
                id: 0x0102_0304,
                port: 5
            }
            .encode(),
            [2, 0, 0, 0, 4, 3, 2, 1, 5, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let host = Frame::HostConnect { port: 1 }.encode();
        assert!(matches!(
            Frame::decode(&host[..15], 1, To::Device),
            Err(Error::FrameSize(15))
        ));
        assert!(matches!(
            Frame::decode(&host, 0, To::Device),
            Err(Error::FrameFds {
                expected: 1,
                got: 0,
                ..
            })
        ));
        let failed_ok = Frame::Failed { id: 1, errno: 0 }.encode();
        assert!(matches!(
            Frame::decode(&failed_ok, 0, To::Device),
            Err(Error::FrameField {
                field: "status",
                ..
            })
        ));
        let mut connected = Frame::Connected { id: 1 }.encode();
        connected[8] = 1;
        assert!(matches!(
            Frame::decode(&connected, 1, To::Device),
            Err(Error::FrameField { field: "port", .. })
        ));
        let mut unknown = host;
        unknown[0] = 9;
        assert!(matches!(
            Frame::decode(&unknown, 1, To::Device),
            Err(Error::FrameKind(9))
        ));
        let request = Frame::ConnectHost { id: 1, port: 2 }.encode();
        assert!(matches!(
            Frame::decode(&request, 1, To::Broker),
            Err(Error::FrameFds { .. })
        ));
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295\n").unwrap(), u32::MAX);
        assert_eq!(parse_connect(b"CONNECT 0\n").unwrap(), 0);
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT 52",
            b"CONNECT  52\n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 5 2\n",
            b"connect 52\n",
            b"CONNECT 52\r\n",
            b"GET / HTTP/1.1\n",
            b"",
        ] {
            assert!(
                parse_connect(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("CONNECT {}\n", "0".repeat(MAX_CONNECT_LINE));
        assert!(matches!(
            parse_connect(long.as_bytes()),
            Err(Error::ConnectLine("too long"))
        ));
        assert_eq!(ok_line(1 << 30), b"OK 1073741824\n");
    }

    proptest! {
        #[test]
        fn any_frame_bytes_decode_or_fail_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..24), fds in 0usize..3,
        ) {
            for to in [To::Device, To::Broker] {
                if let Ok(f) = Frame::decode(&bytes, fds, to) {
                    prop_assert_eq!(&f.encode()[..], &bytes[..]);
                }
            }
        }

        #[test]
        fn any_connect_line_parses_or_fails_without_panicking(
            line in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            if let Ok(port) = parse_connect(&line) {
                prop_assert_eq!(format!("CONNECT {port}\n").as_bytes().len() <= line.len(), true);
            }
        }

        #[test]
        fn every_port_round_trips(port in any::<u32>()) {
            prop_assert_eq!(parse_connect(format!("CONNECT {port}\n").as_bytes()).unwrap(), port);
        }
    }
}
