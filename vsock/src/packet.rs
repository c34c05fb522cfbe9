//! The virtio-vsock packet header (virtio 1.2 §5.10.6): 44 little-endian bytes in front of
//! every packet on the rx and tx queues, and the values of its fields.
//!
//! A header is copied out of guest memory into a [`Header`] before anything looks at it, so
//! a guest that changes its buffers meanwhile changes nothing the device checked.

/// The size of the header in bytes.
pub const HEADER_SIZE: usize = 44;
/// The CID of the host (the device's side of every connection).
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET` (not offered).
pub const TYPE_SEQPACKET: u16 = 2;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A packet operation (`op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `VIRTIO_VSOCK_OP_REQUEST`: connect.
    Request,
    /// `VIRTIO_VSOCK_OP_RESPONSE`: the connection is accepted.
    Response,
    /// `VIRTIO_VSOCK_OP_RST`: the connection is refused or ended.
    Rst,
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`: one or both directions end (`flags`).
    Shutdown,
    /// `VIRTIO_VSOCK_OP_RW`: `len` bytes of data follow.
    Rw,
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's `buf_alloc` / `fwd_cnt`.
    CreditUpdate,
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks for a credit update.
    CreditRequest,
}

impl Op {
    /// The op of a wire value, if it is one.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A packet header, decoded (every field, as the guest wrote it: nothing is validated here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub kind: u16,
    /// Operation (see [`Op`]).
    pub op: u16,
    /// Op-specific flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its wire bytes.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The decoded op, if it is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn header_layout_is_the_specs() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x0102_0304,
            dst_port: 5,
            len: 6,
            kind: TYPE_STREAM,
            op: Op::Rw.to_u16(),
            flags: 7,
            buf_alloc: 8,
            fwd_cnt: 9,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[9, 0, 0, 0]);
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn ops_round_trip_and_unknown_values_are_none() {
        for v in 1..=7 {
            assert_eq!(Op::from_u16(v).unwrap().to_u16(), v);
        }
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
        assert_eq!(Op::from_u16(u16::MAX), None);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_and_encode_back(bytes in prop::array::uniform32(any::<u8>()),
                                            tail in prop::array::uniform12(any::<u8>())) {
            let mut b = [0u8; HEADER_SIZE];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&tail);
            prop_assert_eq!(Header::decode(&b).encode(), b);
        }
    }
}
