//! The vhost-user wire format (QEMU `docs/interop/vhost-user.rst`, "Message format").
//!
//! Every message is a 12-byte little-endian [`Header`] (`request: u32`, `flags: u32`,
//! `size: u32`) followed by `size` bytes of body. File descriptors travel as `SCM_RIGHTS`
//! ancillary data sent with the header; [`Message::decode`] takes how many arrived and checks
//! that the request expects exactly that many.
//!
//! Bodies are plain structs implementing [`Body`]: `decode` checks the length and then
//! [`Body::validate`], so a decoded body is always a valid one.

use thiserror::Error;

/// The size of a message header in bytes.
pub const HEADER_SIZE: usize = 12;
/// The protocol version this crate speaks, in bits 0-1 of [`Header::flags`].
pub const VERSION: u32 = 0x1;
/// The bits of [`Header::flags`] that hold the version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// Set in the header of a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// The frontend asks for a `REPLY_ACK` (only with `VHOST_USER_PROTOCOL_F_REPLY_ACK`).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Every flag bit this crate knows; the others are reserved and must be zero.
pub const FLAG_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;
/// The size of the largest virtio device config space a message may carry.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// The largest body accepted: a page plus a config body, above anything the base protocol sends.
pub const MAX_BODY_SIZE: u32 = 4096 + CONFIG_HEADER_SIZE as u32 + MAX_CONFIG_SIZE;
/// The most memory regions `SET_MEM_TABLE` may carry in the base protocol.
pub const MAX_MEM_REGIONS: usize = 8;
/// The most queues a vring fd body can name (its index is 8 bits wide).
pub const MAX_QUEUES: u32 = 256;
/// `VHOST_VRING_F_LOG`: the only defined bit of [`VringAddr::flags`].
pub const VRING_F_LOG: u32 = 0x1;
/// Bits 0-7 of a vring fd body: the queue index.
pub const VRING_FD_INDEX_MASK: u64 = 0xff;
/// Bit 8 of a vring fd body: no fd was sent (the queue is polled / has no notifier).
pub const VRING_FD_NOFD: u64 = 0x100;
/// `VHOST_SET_CONFIG_TYPE_MIGRATION`: the largest defined value of [`Config::flags`].
pub const CONFIG_FLAG_MIGRATION: u32 = 0x1;

const U64_SIZE: usize = 8;
const VRING_STATE_SIZE: usize = 8;
const VRING_ADDR_SIZE: usize = 40;
const MEM_TABLE_HEADER_SIZE: usize = 8;
const MEMORY_REGION_SIZE: usize = 32;
const CONFIG_HEADER_SIZE: usize = 12;

/// A malformed vhost-user message. The peer is untrusted: every way its bytes can be wrong
/// is one of these.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    /// Fewer bytes than the header or the body needs.
    #[error("message truncated: {needed} bytes needed, {got} received")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes there were.
        got: usize,
    },
    /// A header whose size field is above [`MAX_BODY_SIZE`].
    #[error("body size {0} is above the maximum")]
    Oversized(u32),
    /// More bytes after the body than the header's size field announced.
    #[error("{got} bytes received for a message of {expected}")]
    TrailingBytes {
        /// Header plus the header's size.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A header whose version bits are not 1.
    #[error("unsupported protocol version {0}")]
    BadVersion(u32),
    /// A header with reserved flag bits set.
    #[error("reserved flag bits set in {0:#x}")]
    ReservedFlags(u32),
    /// A request from the frontend with the REPLY flag set.
    #[error("request {0:?} has the reply flag set")]
    UnexpectedReply(Request),
    /// A request code this crate does not know.
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    /// A body whose length is not the one its request has.
    #[error("body of {got} bytes, {expected} expected")]
    BadBodySize {
        /// The body length the request has.
        expected: usize,
        /// The body length received.
        got: usize,
    },
    /// A request that came with a number of fds it does not take.
    #[error("request {request:?} takes {expected} fds, {got} received")]
    WrongFdCount {
        /// The request.
        request: Request,
        /// The fds it takes.
        expected: usize,
        /// The fds received.
        got: usize,
    },
    /// A memory table with more than [`MAX_MEM_REGIONS`] regions.
    #[error("{0} memory regions, at most 8 allowed")]
    TooManyRegions(u32),
    /// A memory table whose region count does not match its body (or its region list).
    #[error("memory table says {num_regions} regions but holds {regions}")]
    RegionCountMismatch {
        /// The count field.
        num_regions: u32,
        /// The regions present.
        regions: usize,
    },
    /// A memory region of size zero.
    #[error("memory region {0} has size zero")]
    ZeroSizeRegion(usize),
    /// A memory region whose guest, user or mmap range wraps around 2^64.
    #[error("memory region {0} wraps around the address space")]
    RegionWraps(usize),
    /// Two memory regions with overlapping guest-physical ranges.
    #[error("memory regions {0} and {1} overlap")]
    RegionOverlap(usize, usize),
    /// A config body whose size field does not match its payload.
    #[error("config size {size} does not match its payload of {payload} bytes")]
    ConfigSizeMismatch {
        /// The size field.
        size: u32,
        /// The payload length.
        payload: usize,
    },
    /// A config access beyond [`MAX_CONFIG_SIZE`].
    #[error("config access of {size} bytes at {offset} is outside the config space")]
    ConfigOutOfRange {
        /// Offset field.
        offset: u32,
        /// Size field.
        size: u32,
    },
    /// A config body with undefined flags.
    #[error("config flags {0:#x} are not defined")]
    ConfigFlags(u32),
    /// A queue index at or above [`MAX_QUEUES`].
    #[error("queue index {0} is out of range")]
    QueueIndex(u32),
    /// A vring address body with undefined flags.
    #[error("vring address flags {0:#x} are not defined")]
    VringAddrFlags(u32),
    /// A vring fd body with bits above 8 set.
    #[error("vring fd body {0:#x} has reserved bits set")]
    VringFdReserved(u64),
    /// `SET_VRING_ENABLE` with a value other than 0 or 1.
    #[error("vring enable value {0} is not 0 or 1")]
    EnableValue(u32),
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, MessageError>;

/// The frontend-to-backend requests of the base protocol this crate handles, with their codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Request {
    /// `VHOST_USER_GET_FEATURES`: no body; reply [`U64`].
    GetFeatures = 1,
    /// `VHOST_USER_SET_FEATURES`: [`U64`].
    SetFeatures = 2,
    /// `VHOST_USER_SET_OWNER`: no body.
    SetOwner = 3,
    /// `VHOST_USER_RESET_OWNER`: no body.
    ResetOwner = 4,
    /// `VHOST_USER_SET_MEM_TABLE`: [`MemTable`], one fd per region.
    SetMemTable = 5,
    /// `VHOST_USER_SET_VRING_NUM`: [`VringState`].
    SetVringNum = 8,
    /// `VHOST_USER_SET_VRING_ADDR`: [`VringAddr`].
    SetVringAddr = 9,
    /// `VHOST_USER_SET_VRING_BASE`: [`VringState`].
    SetVringBase = 10,
    /// `VHOST_USER_GET_VRING_BASE`: [`VringState`]; reply [`VringState`].
    GetVringBase = 11,
    /// `VHOST_USER_SET_VRING_KICK`: [`VringFd`], one fd unless it has the no-fd bit.
    SetVringKick = 12,
    /// `VHOST_USER_SET_VRING_CALL`: [`VringFd`], one fd unless it has the no-fd bit.
    SetVringCall = 13,
    /// `VHOST_USER_SET_VRING_ERR`: [`VringFd`], one fd unless it has the no-fd bit.
    SetVringErr = 14,
    /// `VHOST_USER_GET_PROTOCOL_FEATURES`: no body; reply [`U64`].
    GetProtocolFeatures = 15,
    /// `VHOST_USER_SET_PROTOCOL_FEATURES`: [`U64`].
    SetProtocolFeatures = 16,
    /// `VHOST_USER_GET_QUEUE_NUM`: no body; reply [`U64`].
    GetQueueNum = 17,
    /// `VHOST_USER_SET_VRING_ENABLE`: [`VringState`] whose `num` is 0 or 1.
    SetVringEnable = 18,
    /// `VHOST_USER_GET_CONFIG`: [`Config`]; reply [`Config`].
    GetConfig = 24,
    /// `VHOST_USER_SET_CONFIG`: [`Config`].
    SetConfig = 25,
    /// `VHOST_USER_GET_INFLIGHT_FD`: [`Inflight`] (queue count and size); reply [`Inflight`]
    /// (mmap size and offset) with one fd.
    GetInflightFd = 31,
    /// `VHOST_USER_SET_INFLIGHT_FD`: [`Inflight`], one fd.
    SetInflightFd = 32,
    /// `VHOST_USER_RESET_DEVICE`: no body.
    ResetDevice = 34,
    /// `VHOST_USER_GET_MAX_MEM_SLOTS`: no body; reply [`U64`].
    GetMaxMemSlots = 36,
    /// `VHOST_USER_ADD_MEM_REG`: [`SingleMemRegion`], one fd.
    AddMemReg = 37,
    /// `VHOST_USER_REM_MEM_REG`: [`SingleMemRegion`], no fd.
    RemMemReg = 38,
}

impl Request {
    /// Every request, in code order.
    pub const ALL: [Request; 24] = [
        Request::GetFeatures,
        Request::SetFeatures,
        Request::SetOwner,
        Request::ResetOwner,
        Request::SetMemTable,
        Request::SetVringNum,
        Request::SetVringAddr,
        Request::SetVringBase,
        Request::GetVringBase,
        Request::SetVringKick,
        Request::SetVringCall,
        Request::SetVringErr,
        Request::GetProtocolFeatures,
        Request::SetProtocolFeatures,
        Request::GetQueueNum,
        Request::SetVringEnable,
        Request::GetConfig,
        Request::SetConfig,
        Request::GetInflightFd,
        Request::SetInflightFd,
        Request::ResetDevice,
        Request::GetMaxMemSlots,
        Request::AddMemReg,
        Request::RemMemReg,
    ];

    /// The request's code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Whether the backend always answers this request with a body (the `GET_*` requests).
    pub fn has_reply(self) -> bool {
        matches!(
            self,
            Request::GetFeatures
                | Request::GetProtocolFeatures
                | Request::GetQueueNum
                | Request::GetVringBase
                | Request::GetConfig
                | Request::GetInflightFd
                | Request::GetMaxMemSlots
        )
    }
}

impl TryFrom<u32> for Request {
    type Error = MessageError;

    fn try_from(code: u32) -> Result<Self> {
        Request::ALL
            .into_iter()
            .find(|r| r.code() == code)
            .ok_or(MessageError::UnknownRequest(code))
    }
}

/// Reads little-endian fields from a body, failing with [`MessageError::Truncated`].
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let end = self.pos + N;
        let bytes = self.buf.get(self.pos..end).ok_or(MessageError::Truncated {
            needed: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// Checks that a body is exactly `expected` bytes: shorter is truncated, longer is wrong.
fn check_len(body: &[u8], expected: usize) -> Result<()> {
    match body.len() {
        got if got < expected => Err(MessageError::Truncated {
            needed: expected,
            got,
        }),
        got if got > expected => Err(MessageError::BadBodySize { expected, got }),
        _ => Ok(()),
    }
}

fn check_queue_index(index: u32) -> Result<()> {
    if index >= MAX_QUEUES {
        return Err(MessageError::QueueIndex(index));
    }
    Ok(())
}

/// The 12-byte header of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The request this message is, or answers.
    pub request: Request,
    /// Version (bits 0-1), [`FLAG_REPLY`], [`FLAG_NEED_REPLY`].
    pub flags: u32,
    /// The body's size in bytes.
    pub size: u32,
}

impl Header {
    /// A version-1 header with extra `flags` (for example [`FLAG_REPLY`]).
    pub fn new(request: Request, flags: u32, size: u32) -> Self {
        Header {
            request,
            flags: (flags & !FLAG_VERSION_MASK) | VERSION,
            size,
        }
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Whether the frontend asks for a `REPLY_ACK`.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Appends the header's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.request.code().to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
    }

    /// Decodes and validates the header at the start of `buf` (which may hold more).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut cursor = Cursor::new(buf);
        let code = cursor.u32()?;
        let flags = cursor.u32()?;
        let size = cursor.u32()?;
        let header = Header {
            request: Request::try_from(code)?,
            flags,
            size,
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the version, the reserved flags and the size.
    pub fn validate(&self) -> Result<()> {
        let version = self.flags & FLAG_VERSION_MASK;
        if version != VERSION {
            return Err(MessageError::BadVersion(version));
        }
        if self.flags & !FLAG_KNOWN != 0 {
            return Err(MessageError::ReservedFlags(self.flags));
        }
        if self.size > MAX_BODY_SIZE {
            return Err(MessageError::Oversized(self.size));
        }
        Ok(())
    }
}

/// A message body: encoded little-endian, decoded with its length and contents checked.
pub trait Body: Sized {
    /// Appends the body's wire form to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Decodes a body that must fill `buf` exactly, then [validates](Body::validate) it.
    fn decode(buf: &[u8]) -> Result<Self>;

    /// Checks the fields' values.
    fn validate(&self) -> Result<()>;

    /// The body's wire form.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A `u64` body: feature bits, protocol feature bits, a queue count, a `REPLY_ACK` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U64(pub u64);

impl Body for U64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        check_len(buf, U64_SIZE)?;
        Cursor::new(buf).u64().map(U64)
    }

    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// A queue's index and a number: its size, its next avail index, or enabled (0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringState {
    /// The queue index.
    pub index: u32,
    /// The number.
    pub num: u32,
}

impl Body for VringState {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.num.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        check_len(buf, VRING_STATE_SIZE)?;
        let mut cursor = Cursor::new(buf);
        let state = VringState {
            index: cursor.u32()?,
            num: cursor.u32()?,
        };
        state.validate()?;
        Ok(state)
    }

    fn validate(&self) -> Result<()> {
        check_queue_index(self.index)
    }
}

/// A queue's ring addresses, in the frontend's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    /// The queue index.
    pub index: u32,
    /// [`VRING_F_LOG`] or 0.
    pub flags: u32,
    /// The descriptor table.
    pub desc: u64,
    /// The used ring.
    pub used: u64,
    /// The available ring.
    pub avail: u64,
    /// The guest address for dirty logging of the used ring.
    pub log: u64,
}

impl Body for VringAddr {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        for v in [self.desc, self.used, self.avail, self.log] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        check_len(buf, VRING_ADDR_SIZE)?;
        let mut cursor = Cursor::new(buf);
        let addr = VringAddr {
            index: cursor.u32()?,
            flags: cursor.u32()?,
            desc: cursor.u64()?,
            used: cursor.u64()?,
            avail: cursor.u64()?,
            log: cursor.u64()?,
        };
        addr.validate()?;
        Ok(addr)
    }

    fn validate(&self) -> Result<()> {
        check_queue_index(self.index)?;
        if self.flags & !VRING_F_LOG != 0 {
            return Err(MessageError::VringAddrFlags(self.flags));
        }
        Ok(())
    }
}

/// One region of a memory table; its fd arrives as ancillary data, in region order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// The guest-physical address of the region.
    pub guest_phys_addr: u64,
    /// Its size in bytes.
    pub memory_size: u64,
    /// Its address in the frontend's address space (to translate ring addresses).
    pub userspace_addr: u64,
    /// Where the region starts in its fd.
    pub mmap_offset: u64,
}

impl MemoryRegion {
    fn read(cursor: &mut Cursor<'_>) -> Result<Self> {
        Ok(MemoryRegion {
            guest_phys_addr: cursor.u64()?,
            memory_size: cursor.u64()?,
            userspace_addr: cursor.u64()?,
            mmap_offset: cursor.u64()?,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
            self.mmap_offset,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// The last guest-physical address of the region, if it does not wrap.
    fn guest_last(&self) -> Option<u64> {
        self.guest_phys_addr
            .checked_add(self.memory_size.saturating_sub(1))
    }

    /// Checks the size and that none of its three ranges wraps; `index` names it in errors.
    fn validate(&self, index: usize) -> Result<()> {
        if self.memory_size == 0 {
            return Err(MessageError::ZeroSizeRegion(index));
        }
        let last = self.memory_size - 1;
        if self.guest_last().is_none()
            || self.userspace_addr.checked_add(last).is_none()
            || self.mmap_offset.checked_add(last).is_none()
        {
            return Err(MessageError::RegionWraps(index));
        }
        Ok(())
    }
}

/// The body of `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD` (`VhostUserInflight`, 24 bytes with
/// its trailing padding): the shared region that tracks requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    /// The region's size (in a request to get one: 0).
    pub mmap_size: u64,
    /// Where it starts in the fd.
    pub mmap_offset: u64,
    /// Queues the region covers.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

const INFLIGHT_SIZE: usize = 24;

impl Body for Inflight {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mmap_size.to_le_bytes());
        out.extend_from_slice(&self.mmap_offset.to_le_bytes());
        out.extend_from_slice(&self.num_queues.to_le_bytes());
        out.extend_from_slice(&self.queue_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        check_len(buf, INFLIGHT_SIZE)?;
        let mut cursor = Cursor::new(buf);
        let mmap_size = cursor.u64()?;
        let mmap_offset = cursor.u64()?;
        let counts = cursor.u32()?;
        let body = Inflight {
            mmap_size,
            mmap_offset,
            num_queues: counts as u16,
            queue_size: (counts >> 16) as u16,
        };
        body.validate()?;
        Ok(body)
    }

    fn validate(&self) -> Result<()> {
        if u32::from(self.num_queues) > MAX_QUEUES {
            return Err(MessageError::QueueIndex(u32::from(self.num_queues)));
        }
        Ok(())
    }
}

/// The body of `ADD_MEM_REG` and `REM_MEM_REG`: 8 bytes of padding and one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleMemRegion {
    /// The region.
    pub region: MemoryRegion,
}

const SINGLE_MEM_REGION_SIZE: usize = 8 + MEMORY_REGION_SIZE;

impl Body for SingleMemRegion {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&0u64.to_le_bytes());
        self.region.encode(out);
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        check_len(buf, SINGLE_MEM_REGION_SIZE)?;
        let mut cursor = Cursor::new(buf);
        cursor.u64()?;
        let body = SingleMemRegion {
            region: MemoryRegion::read(&mut cursor)?,
        };
        body.validate()?;
        Ok(body)
    }

    fn validate(&self) -> Result<()> {
        self.region.validate(0)
    }
}

/// The body of `SET_MEM_TABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemTable {
    /// The number of regions (and of fds).
    pub num_regions: u32,
    /// Padding, ignored.
    pub padding: u32,
    /// The regions.
    pub regions: Vec<MemoryRegion>,
}

impl MemTable {
    /// A table of `regions`, with the count filled in.
    pub fn new(regions: Vec<MemoryRegion>) -> Self {
        MemTable {
            num_regions: u32::try_from(regions.len()).unwrap_or(u32::MAX),
            padding: 0,
            regions,
        }
    }
}

impl Body for MemTable {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.num_regions.to_le_bytes());
        out.extend_from_slice(&self.padding.to_le_bytes());
        for region in &self.regions {
            region.encode(out);
        }
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut cursor = Cursor::new(buf);
        let num_regions = cursor.u32()?;
        let padding = cursor.u32()?;
        if num_regions as usize > MAX_MEM_REGIONS {
            return Err(MessageError::TooManyRegions(num_regions));
        }
        // The cursor read the table header, so `buf` is at least that long.
        let rest = buf.len() - MEM_TABLE_HEADER_SIZE;
        if rest != num_regions as usize * MEMORY_REGION_SIZE {
            return Err(MessageError::RegionCountMismatch {
                num_regions,
                regions: rest / MEMORY_REGION_SIZE,
            });
        }
        let regions = (0..num_regions)
            .map(|_| MemoryRegion::read(&mut cursor))
            .collect::<Result<Vec<_>>>()?;
        let table = MemTable {
            num_regions,
            padding,
            regions,
        };
        table.validate()?;
        Ok(table)
    }

    fn validate(&self) -> Result<()> {
        if self.regions.len() > MAX_MEM_REGIONS {
            return Err(MessageError::TooManyRegions(self.num_regions));
        }
        if self.num_regions as usize != self.regions.len() {
            return Err(MessageError::RegionCountMismatch {
                num_regions: self.num_regions,
                regions: self.regions.len(),
            });
        }
        for (i, region) in self.regions.iter().enumerate() {
            region.validate(i)?;
        }
        for (i, a) in self.regions.iter().enumerate() {
            for (j, b) in self.regions.iter().enumerate().skip(i + 1) {
                // Both validated above: neither is empty and neither wraps.
                let (a_last, b_last) = (a.guest_last(), b.guest_last());
                if a_last >= Some(b.guest_phys_addr) && b_last >= Some(a.guest_phys_addr) {
                    return Err(MessageError::RegionOverlap(i, j));
                }
            }
        }
        Ok(())
    }
}

/// The body of `GET_CONFIG` and `SET_CONFIG` and of the `GET_CONFIG` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Offset into the device's config space.
    pub offset: u32,
    /// Number of bytes.
    pub size: u32,
    /// 0, or [`CONFIG_FLAG_MIGRATION`].
    pub flags: u32,
    /// The bytes (zeros in a `GET_CONFIG` request).
    pub payload: Vec<u8>,
}

impl Config {
    /// Decodes a config body checking only its framing: the 12-byte header and a payload of
    /// `size` bytes. This is what a `GET_CONFIG` request must be to be answered: a range or
    /// flags the device cannot serve get the spec's failure reply (an empty payload), not a
    /// closed connection. [`Body::decode`] also checks the range and the flags.
    pub fn decode_framed(buf: &[u8]) -> Result<Self> {
        let mut cursor = Cursor::new(buf);
        let config = Config {
            offset: cursor.u32()?,
            size: cursor.u32()?,
            flags: cursor.u32()?,
            payload: cursor.rest().to_vec(),
        };
        if config.size as usize != config.payload.len() {
            return Err(MessageError::ConfigSizeMismatch {
                size: config.size,
                payload: config.payload.len(),
            });
        }
        Ok(config)
    }

    /// Checks that the range lies inside the largest config space ([`MAX_CONFIG_SIZE`]) and
    /// that the flags are defined.
    pub fn check_range_and_flags(&self) -> Result<()> {
        if u64::from(self.offset) + u64::from(self.size) > u64::from(MAX_CONFIG_SIZE) {
            return Err(MessageError::ConfigOutOfRange {
                offset: self.offset,
                size: self.size,
            });
        }
        if self.flags > CONFIG_FLAG_MIGRATION {
            return Err(MessageError::ConfigFlags(self.flags));
        }
        Ok(())
    }
}

impl Body for Config {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let config = Config::decode_framed(buf)?;
        config.check_range_and_flags()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.size as usize != self.payload.len() {
            return Err(MessageError::ConfigSizeMismatch {
                size: self.size,
                payload: self.payload.len(),
            });
        }
        self.check_range_and_flags()
    }
}

/// The `u64` body of `SET_VRING_KICK`, `SET_VRING_CALL` and `SET_VRING_ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringFd(pub u64);

impl VringFd {
    /// The body for queue `index`; `nofd` says no fd is sent with it.
    pub fn new(index: u8, nofd: bool) -> Self {
        VringFd(u64::from(index) | if nofd { VRING_FD_NOFD } else { 0 })
    }

    /// The queue index (bits 0-7).
    pub fn index(&self) -> u8 {
        (self.0 & VRING_FD_INDEX_MASK) as u8
    }

    /// Whether no fd comes with the message (bit 8): the queue has no notifier and is polled.
    pub fn nofd(&self) -> bool {
        self.0 & VRING_FD_NOFD != 0
    }

    /// The number of fds the message carries.
    pub fn fd_count(&self) -> usize {
        usize::from(!self.nofd())
    }
}

impl Body for VringFd {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let body = VringFd(U64::decode(buf)?.0);
        body.validate()?;
        Ok(body)
    }

    fn validate(&self) -> Result<()> {
        if self.0 & !(VRING_FD_INDEX_MASK | VRING_FD_NOFD) != 0 {
            return Err(MessageError::VringFdReserved(self.0));
        }
        Ok(())
    }
}

/// The decoded, validated body of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// No body.
    Empty,
    /// `SET_FEATURES`, `SET_PROTOCOL_FEATURES`.
    U64(U64),
    /// `SET_VRING_NUM`, `SET_VRING_BASE`, `GET_VRING_BASE`, `SET_VRING_ENABLE`.
    VringState(VringState),
    /// `SET_VRING_ADDR`.
    VringAddr(VringAddr),
    /// `SET_MEM_TABLE`.
    MemTable(MemTable),
    /// `SET_VRING_KICK`, `SET_VRING_CALL`, `SET_VRING_ERR`.
    VringFd(VringFd),
    /// `GET_CONFIG` (only its framing checked: see [`Config::decode_framed`]), `SET_CONFIG`.
    Config(Config),
    /// `ADD_MEM_REG`.
    AddMemReg(SingleMemRegion),
    /// `REM_MEM_REG`.
    RemMemReg(SingleMemRegion),
    /// `GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`.
    Inflight(Inflight),
}

impl RequestBody {
    /// Decodes and validates the body of a `request` from the frontend.
    pub fn decode(request: Request, buf: &[u8]) -> Result<Self> {
        use Request::*;
        Ok(match request {
            GetFeatures | SetOwner | ResetOwner | GetProtocolFeatures | GetQueueNum
            | ResetDevice | GetMaxMemSlots => {
                check_len(buf, 0)?;
                RequestBody::Empty
            }
            SetFeatures | SetProtocolFeatures => RequestBody::U64(U64::decode(buf)?),
            SetMemTable => RequestBody::MemTable(MemTable::decode(buf)?),
            SetVringNum | SetVringBase | GetVringBase => {
                RequestBody::VringState(VringState::decode(buf)?)
            }
            SetVringEnable => {
                let state = VringState::decode(buf)?;
                if state.num > 1 {
                    return Err(MessageError::EnableValue(state.num));
                }
                RequestBody::VringState(state)
            }
            SetVringAddr => RequestBody::VringAddr(VringAddr::decode(buf)?),
            SetVringKick | SetVringCall | SetVringErr => {
                RequestBody::VringFd(VringFd::decode(buf)?)
            }
            // Answered even when the device cannot serve the range (see `decode_framed`).
            GetConfig => RequestBody::Config(Config::decode_framed(buf)?),
            SetConfig => RequestBody::Config(Config::decode(buf)?),
            AddMemReg => RequestBody::AddMemReg(SingleMemRegion::decode(buf)?),
            RemMemReg => RequestBody::RemMemReg(SingleMemRegion::decode(buf)?),
            GetInflightFd | SetInflightFd => RequestBody::Inflight(Inflight::decode(buf)?),
        })
    }

    /// The number of fds that must come with this body.
    pub fn fd_count(&self) -> usize {
        match self {
            RequestBody::MemTable(table) => table.regions.len(),
            RequestBody::VringFd(body) => body.fd_count(),
            RequestBody::AddMemReg(_) => 1,
            _ => 0,
        }
    }
}

/// One message: its header and its body's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The body, `header.size` bytes.
    pub body: Vec<u8>,
}

impl Message {
    /// A request from the frontend with `body`; `need_reply` sets [`FLAG_NEED_REPLY`].
    pub fn request(request: Request, body: &impl Body, need_reply: bool) -> Self {
        Self::with_flags(
            request,
            body.to_bytes(),
            if need_reply { FLAG_NEED_REPLY } else { 0 },
        )
    }

    /// A request from the frontend without a body.
    pub fn empty(request: Request) -> Self {
        Self::with_flags(request, Vec::new(), 0)
    }

    fn with_flags(request: Request, body: Vec<u8>, flags: u32) -> Self {
        let size = u32::try_from(body.len()).unwrap_or(u32::MAX);
        Message {
            header: Header::new(request, flags, size),
            body,
        }
    }

    /// The message's wire form (its fds are sent beside it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.body.len());
        self.header.encode(&mut out);
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes one request from the frontend: `buf` is exactly the bytes received for it and
    /// `fds` the number of fds that came with them. Checks the header, the body and that the
    /// request takes exactly `fds` fds.
    pub fn decode(buf: &[u8], fds: usize) -> Result<Self> {
        let header = Header::decode(buf)?;
        if header.is_reply() {
            return Err(MessageError::UnexpectedReply(header.request));
        }
        let expected = HEADER_SIZE + header.size as usize;
        if buf.len() < expected {
            return Err(MessageError::Truncated {
                needed: expected,
                got: buf.len(),
            });
        }
        if buf.len() > expected {
            return Err(MessageError::TrailingBytes {
                expected,
                got: buf.len(),
            });
        }
        let body = &buf[HEADER_SIZE..];
        let decoded = RequestBody::decode(header.request, body)?;
        // `SET_INFLIGHT_FD` carries the region's fd; `GET_INFLIGHT_FD`, the same body, none.
        let expected_fds = match header.request {
            Request::SetInflightFd => 1,
            _ => decoded.fd_count(),
        };
        // `REM_MEM_REG` takes no fd, but frontends that send one (the spec allows it for
        // compatibility) are accepted; the fd is closed unused.
        let rem_with_fd = header.request == Request::RemMemReg && fds == 1;
        if fds != expected_fds && !rem_with_fd {
            return Err(MessageError::WrongFdCount {
                request: header.request,
                expected: expected_fds,
                got: fds,
            });
        }
        Ok(Message {
            header,
            body: body.to_vec(),
        })
    }

    /// The decoded body. Always succeeds on a message from [`Message::decode`].
    pub fn parse_body(&self) -> Result<RequestBody> {
        RequestBody::decode(self.header.request, &self.body)
    }
}

/// The reply to `request` (a `GET_*` request) carrying `body`.
pub fn encode_reply(request: Request, body: &impl Body) -> Vec<u8> {
    Message::with_flags(request, body.to_bytes(), FLAG_REPLY).encode()
}

/// The `REPLY_ACK` to a `request` sent with [`FLAG_NEED_REPLY`]: `u64` 0 for success.
pub fn encode_ack(request: Request, success: bool) -> Vec<u8> {
    encode_reply(request, &U64(u64::from(!success)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(gpa: u64, size: u64) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: gpa.wrapping_add(0x7f00_0000_0000),
            mmap_offset: 0,
        }
    }

    fn raw(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    fn round_trip<B: Body + PartialEq + std::fmt::Debug>(body: B) {
        assert_eq!(B::decode(&body.to_bytes()).unwrap(), body);
    }

    #[test]
    fn every_request_code_round_trips() {
        for request in Request::ALL {
            assert_eq!(Request::try_from(request.code()), Ok(request));
        }
        assert_eq!(Request::try_from(5), Ok(Request::SetMemTable));
        assert_eq!(Request::try_from(34), Ok(Request::ResetDevice));
        assert_eq!(Request::GetConfig.code(), 24);
    }

    #[test]
    fn single_mem_region_round_trips_and_takes_its_fds() {
        let body = SingleMemRegion {
            region: region(0x7f12_3400_0000, 0x20_0000),
        };
        round_trip(body);
        assert_eq!(body.to_bytes().len(), 40);
        assert_eq!(&body.to_bytes()[..8], &[0; 8], "padding first");
        let add = Message::request(Request::AddMemReg, &body, true).encode();
        assert!(Message::decode(&add, 1).is_ok());
        assert_eq!(
            Message::decode(&add, 0),
            Err(MessageError::WrongFdCount {
                request: Request::AddMemReg,
                expected: 1,
                got: 0
            })
        );
        // REM_MEM_REG: no fd, or the one that some frontends (libblkio) send anyway.
        let rem = Message::request(Request::RemMemReg, &body, true).encode();
        assert!(Message::decode(&rem, 0).is_ok());
        assert!(Message::decode(&rem, 1).is_ok());
        assert!(Message::decode(&rem, 2).is_err());
        assert_eq!(
            SingleMemRegion::decode(
                &SingleMemRegion {
                    region: region(0, 0)
                }
                .to_bytes()
            ),
            Err(MessageError::ZeroSizeRegion(0))
        );
        assert!(Request::GetMaxMemSlots.has_reply());
        assert_eq!(Request::try_from(37), Ok(Request::AddMemReg));
    }

    #[test]
    fn header_round_trips_and_is_little_endian() {
        let header = Header::new(Request::SetVringAddr, FLAG_NEED_REPLY, 40);
        let mut bytes = Vec::new();
        header.encode(&mut bytes);
        assert_eq!(bytes, [9, 0, 0, 0, 0x9, 0, 0, 0, 40, 0, 0, 0]);
        assert_eq!(Header::decode(&bytes), Ok(header));
        assert!(header.need_reply());
        assert!(!header.is_reply());
    }

    #[test]
    fn bodies_round_trip() {
        round_trip(U64(0x1234_5678_9abc_def0));
        round_trip(VringState { index: 3, num: 256 });
        round_trip(VringAddr {
            index: 1,
            flags: VRING_F_LOG,
            desc: 0x1000,
            used: 0x2000,
            avail: 0x3000,
            log: 0x4000,
        });
        round_trip(MemTable::new(vec![
            region(0, 0xa_0000),
            region(0x10_0000, 0x1000_0000),
        ]));
        round_trip(MemTable::new(Vec::new()));
        round_trip(Config {
            offset: 4,
            size: 3,
            flags: CONFIG_FLAG_MIGRATION,
            payload: vec![1, 2, 3],
        });
        round_trip(VringFd::new(7, false));
        round_trip(VringFd::new(255, true));
    }

    #[test]
    fn vring_fd_helpers_read_index_and_nofd() {
        let body = VringFd::new(5, true);
        assert_eq!(body.0, 0x105);
        assert_eq!((body.index(), body.nofd(), body.fd_count()), (5, true, 0));
        let body = VringFd::new(200, false);
        assert_eq!(
            (body.index(), body.nofd(), body.fd_count()),
            (200, false, 1)
        );
    }

    #[test]
    fn messages_round_trip_through_encode_and_decode() {
        let table = MemTable::new(vec![region(0, 0x1000), region(0x2000, 0x1000)]);
        let cases = [
            (Message::empty(Request::GetFeatures), 0),
            (Message::empty(Request::ResetDevice), 0),
            (
                Message::request(Request::SetFeatures, &U64(1 << 32), false),
                0,
            ),
            (Message::request(Request::SetMemTable, &table, true), 2),
            (
                Message::request(
                    Request::SetVringEnable,
                    &VringState { index: 0, num: 1 },
                    false,
                ),
                0,
            ),
            (
                Message::request(Request::SetVringKick, &VringFd::new(1, false), false),
                1,
            ),
            (
                Message::request(Request::SetVringCall, &VringFd::new(1, true), false),
                0,
            ),
            (
                Message::request(
                    Request::GetConfig,
                    &Config {
                        offset: 0,
                        size: 8,
                        flags: 0,
                        payload: vec![0; 8],
                    },
                    false,
                ),
                0,
            ),
        ];
        for (message, fds) in cases {
            let decoded = Message::decode(&message.encode(), fds).unwrap();
            assert_eq!(decoded, message);
            decoded.parse_body().unwrap();
        }
        let message = Message::decode(
            &Message::request(Request::SetMemTable, &table, false).encode(),
            2,
        )
        .unwrap();
        assert_eq!(message.parse_body(), Ok(RequestBody::MemTable(table)));
    }

    #[test]
    fn replies_have_the_reply_flag_and_their_body() {
        let reply = encode_reply(Request::GetFeatures, &U64(0xff));
        let header = Header::decode(&reply).unwrap();
        assert!(header.is_reply());
        assert_eq!(header.request, Request::GetFeatures);
        assert_eq!(header.size, 8);
        assert_eq!(U64::decode(&reply[HEADER_SIZE..]), Ok(U64(0xff)));

        let reply = encode_reply(Request::GetVringBase, &VringState { index: 2, num: 77 });
        assert_eq!(
            VringState::decode(&reply[HEADER_SIZE..]),
            Ok(VringState { index: 2, num: 77 })
        );

        let ok = encode_ack(Request::SetMemTable, true);
        assert_eq!(Header::decode(&ok).unwrap().request, Request::SetMemTable);
        assert_eq!(U64::decode(&ok[HEADER_SIZE..]), Ok(U64(0)));
        let failed = encode_ack(Request::SetMemTable, false);
        assert_ne!(U64::decode(&failed[HEADER_SIZE..]), Ok(U64(0)));
    }

    #[test]
    fn a_reply_is_not_accepted_as_a_request() {
        let reply = encode_reply(Request::GetFeatures, &U64(0));
        assert_eq!(
            Message::decode(&reply, 0),
            Err(MessageError::UnexpectedReply(Request::GetFeatures))
        );
    }

    #[test]
    fn truncated_header_is_an_error() {
        let bytes = raw(1, 1, &[]);
        for len in 0..HEADER_SIZE {
            assert!(matches!(
                Message::decode(&bytes[..len], 0),
                Err(MessageError::Truncated { got, .. }) if got == len
            ));
        }
    }

    #[test]
    fn truncated_body_is_an_error() {
        let bytes = raw(2, 1, &[0; 8]);
        assert_eq!(
            Message::decode(&bytes[..HEADER_SIZE + 5], 0),
            Err(MessageError::Truncated {
                needed: HEADER_SIZE + 8,
                got: HEADER_SIZE + 5
            })
        );
        // The header agrees with the bytes, but the request needs a longer body.
        assert_eq!(
            Message::decode(&raw(2, 1, &[0; 4]), 0),
            Err(MessageError::Truncated { needed: 8, got: 4 })
        );
        assert!(matches!(
            Message::decode(&raw(9, 1, &[0; 39]), 0),
            Err(MessageError::Truncated {
                needed: 40,
                got: 39
            })
        ));
    }

    #[test]
    fn bytes_past_the_body_are_an_error() {
        let mut bytes = raw(3, 1, &[]);
        bytes.push(0);
        assert_eq!(
            Message::decode(&bytes, 0),
            Err(MessageError::TrailingBytes {
                expected: HEADER_SIZE,
                got: HEADER_SIZE + 1
            })
        );
    }

    #[test]
    fn body_longer_than_the_request_takes_is_an_error() {
        assert_eq!(
            Message::decode(&raw(1, 1, &[0; 8]), 0),
            Err(MessageError::BadBodySize {
                expected: 0,
                got: 8
            })
        );
        assert_eq!(
            Message::decode(&raw(8, 1, &[0; 12]), 0),
            Err(MessageError::BadBodySize {
                expected: 8,
                got: 12
            })
        );
    }

    #[test]
    fn oversized_size_field_is_an_error() {
        let mut bytes = raw(2, 1, &[]);
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Message::decode(&bytes, 0),
            Err(MessageError::Oversized(u32::MAX))
        );
        bytes[8..12].copy_from_slice(&(MAX_BODY_SIZE + 1).to_le_bytes());
        assert_eq!(
            Message::decode(&bytes, 0),
            Err(MessageError::Oversized(MAX_BODY_SIZE + 1))
        );
    }

    #[test]
    fn wrong_version_is_an_error() {
        for version in [0, 2, 3] {
            assert_eq!(
                Message::decode(&raw(1, version, &[]), 0),
                Err(MessageError::BadVersion(version))
            );
        }
    }

    #[test]
    fn reserved_flags_are_an_error() {
        assert_eq!(
            Message::decode(&raw(1, 1 | 0x10, &[]), 0),
            Err(MessageError::ReservedFlags(0x11))
        );
        assert_eq!(
            Message::decode(&raw(1, 1 | 0x8000_0000, &[]), 0),
            Err(MessageError::ReservedFlags(0x8000_0001))
        );
    }

    #[test]
    fn unknown_request_code_is_an_error() {
        for code in [0, 6, 7, 19, 23, 26, 33, 35, u32::MAX] {
            assert_eq!(
                Message::decode(&raw(code, 1, &[]), 0),
                Err(MessageError::UnknownRequest(code))
            );
        }
    }

    #[test]
    fn mem_table_count_mismatch_is_an_error() {
        let mut body = MemTable::new(vec![region(0, 0x1000), region(0x1000, 0x1000)]).to_bytes();
        body[0] = 3;
        assert_eq!(
            MemTable::decode(&body),
            Err(MessageError::RegionCountMismatch {
                num_regions: 3,
                regions: 2
            })
        );
        body[0] = 1;
        assert_eq!(
            Message::decode(&raw(5, 1, &body), 1),
            Err(MessageError::RegionCountMismatch {
                num_regions: 1,
                regions: 2
            })
        );
        body.truncate(MEM_TABLE_HEADER_SIZE + MEMORY_REGION_SIZE + 1);
        assert!(matches!(
            MemTable::decode(&body),
            Err(MessageError::RegionCountMismatch { num_regions: 1, .. })
        ));
        assert_eq!(
            MemTable::decode(&[1, 0, 0]),
            Err(MessageError::Truncated { needed: 4, got: 3 })
        );
        let mut table = MemTable::new(vec![region(0, 0x1000)]);
        table.num_regions = 2;
        assert!(matches!(
            table.validate(),
            Err(MessageError::RegionCountMismatch { .. })
        ));
    }

    #[test]
    fn too_many_regions_is_an_error() {
        let regions = (0..9).map(|i| region(i * 0x1000, 0x1000)).collect();
        let body = MemTable::new(regions).to_bytes();
        assert_eq!(
            MemTable::decode(&body),
            Err(MessageError::TooManyRegions(9))
        );
        let mut body = MemTable::new(Vec::new()).to_bytes();
        body[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            MemTable::decode(&body),
            Err(MessageError::TooManyRegions(u32::MAX))
        );
        let eight = (0..8).map(|i| region(i * 0x1000, 0x1000)).collect();
        round_trip(MemTable::new(eight));
    }

    #[test]
    fn zero_size_region_is_an_error() {
        let body = MemTable::new(vec![region(0, 0x1000), region(0x2000, 0)]).to_bytes();
        assert_eq!(
            MemTable::decode(&body),
            Err(MessageError::ZeroSizeRegion(1))
        );
    }

    #[test]
    fn wrapping_region_is_an_error() {
        let body = MemTable::new(vec![region(u64::MAX - 0xfff, 0x2000)]).to_bytes();
        assert_eq!(MemTable::decode(&body), Err(MessageError::RegionWraps(0)));
        let mut user = region(0, 0x2000);
        user.userspace_addr = u64::MAX;
        assert_eq!(
            MemTable::decode(&MemTable::new(vec![user]).to_bytes()),
            Err(MessageError::RegionWraps(0))
        );
        let mut offset = region(0, 0x2000);
        offset.mmap_offset = u64::MAX - 0x1000;
        assert_eq!(
            MemTable::decode(&MemTable::new(vec![offset]).to_bytes()),
            Err(MessageError::RegionWraps(0))
        );
        // A region that ends exactly at the top of the address space does not wrap.
        let mut top = region(u64::MAX - 0xfff, 0x1000);
        top.userspace_addr = 0;
        round_trip(MemTable::new(vec![top]));
    }

    #[test]
    fn overlapping_regions_are_an_error() {
        let cases = [
            (vec![region(0, 0x2000), region(0x1fff, 0x1000)], (0, 1)),
            (vec![region(0x1000, 0x1000), region(0, 0x4000)], (0, 1)),
            (
                vec![
                    region(0, 0x1000),
                    region(0x8000, 0x1000),
                    region(0x8800, 0x10),
                ],
                (1, 2),
            ),
        ];
        for (regions, (a, b)) in cases {
            let body = MemTable::new(regions).to_bytes();
            assert_eq!(
                MemTable::decode(&body),
                Err(MessageError::RegionOverlap(a, b))
            );
        }
        round_trip(MemTable::new(vec![
            region(0x1000, 0x1000),
            region(0, 0x1000),
        ]));
    }

    #[test]
    fn wrong_fd_counts_are_an_error() {
        let table = MemTable::new(vec![region(0, 0x1000), region(0x1000, 0x1000)]);
        let mem = Message::request(Request::SetMemTable, &table, false).encode();
        for fds in [0, 1, 3] {
            assert_eq!(
                Message::decode(&mem, fds),
                Err(MessageError::WrongFdCount {
                    request: Request::SetMemTable,
                    expected: 2,
                    got: fds
                })
            );
        }
        for request in [
            Request::SetVringKick,
            Request::SetVringCall,
            Request::SetVringErr,
        ] {
            let with_fd = Message::request(request, &VringFd::new(0, false), false).encode();
            assert_eq!(
                Message::decode(&with_fd, 0),
                Err(MessageError::WrongFdCount {
                    request,
                    expected: 1,
                    got: 0
                })
            );
            let nofd = Message::request(request, &VringFd::new(0, true), false).encode();
            assert_eq!(
                Message::decode(&nofd, 1),
                Err(MessageError::WrongFdCount {
                    request,
                    expected: 0,
                    got: 1
                })
            );
        }
        let features = Message::request(Request::SetFeatures, &U64(0), false).encode();
        assert_eq!(
            Message::decode(&features, 1),
            Err(MessageError::WrongFdCount {
                request: Request::SetFeatures,
                expected: 0,
                got: 1
            })
        );
    }

    #[test]
    fn config_size_mismatch_is_an_error() {
        let config = Config {
            offset: 0,
            size: 4,
            flags: 0,
            payload: vec![0; 4],
        };
        let mut body = config.to_bytes();
        body[4] = 5;
        assert_eq!(
            Config::decode(&body),
            Err(MessageError::ConfigSizeMismatch {
                size: 5,
                payload: 4
            })
        );
        assert_eq!(
            Message::decode(&raw(25, 1, &body), 0),
            Err(MessageError::ConfigSizeMismatch {
                size: 5,
                payload: 4
            })
        );
        assert!(matches!(
            Config::decode(&body[..10]),
            Err(MessageError::Truncated {
                needed: 12,
                got: 10
            })
        ));
    }

    #[test]
    fn config_outside_the_config_space_is_an_error() {
        let config = Config {
            offset: 250,
            size: 8,
            flags: 0,
            payload: vec![0; 8],
        };
        assert_eq!(
            Config::decode(&config.to_bytes()),
            Err(MessageError::ConfigOutOfRange {
                offset: 250,
                size: 8
            })
        );
        let huge = Config {
            offset: u32::MAX,
            size: 0,
            flags: 0,
            payload: Vec::new(),
        };
        assert_eq!(
            Config::decode(&huge.to_bytes()),
            Err(MessageError::ConfigOutOfRange {
                offset: u32::MAX,
                size: 0
            })
        );
        let full = Config {
            offset: 0,
            size: MAX_CONFIG_SIZE,
            flags: 0,
            payload: vec![0xaa; MAX_CONFIG_SIZE as usize],
        };
        round_trip(full.clone());
        let message = Message::request(Request::SetConfig, &full, false);
        assert_eq!(Message::decode(&message.encode(), 0), Ok(message));
    }

    #[test]
    fn get_config_of_any_range_is_a_request_set_config_is_not() {
        for (offset, size, flags) in [
            (250, 8, 0),
            (0, 300, 0),
            (u32::MAX, 4, 0),
            (u32::MAX, 0, 0),
            (0, 4, 7),
        ] {
            let config = Config {
                offset,
                size,
                flags,
                payload: vec![0; size as usize],
            };
            let get = Message::request(Request::GetConfig, &config, false);
            assert_eq!(Message::decode(&get.encode(), 0), Ok(get.clone()));
            assert_eq!(get.parse_body(), Ok(RequestBody::Config(config.clone())));
            let set = Message::request(Request::SetConfig, &config, false);
            assert!(Message::decode(&set.encode(), 0).is_err());
        }
        // A GET_CONFIG whose size does not match its payload is not well framed.
        let mut body = Config {
            offset: 0,
            size: 4,
            flags: 0,
            payload: vec![0; 4],
        }
        .to_bytes();
        body[4] = 5;
        assert_eq!(
            Message::decode(&raw(24, 1, &body), 0),
            Err(MessageError::ConfigSizeMismatch {
                size: 5,
                payload: 4
            })
        );
    }

    #[test]
    fn undefined_field_values_are_errors() {
        let config = Config {
            offset: 0,
            size: 0,
            flags: 2,
            payload: Vec::new(),
        };
        assert_eq!(
            Config::decode(&config.to_bytes()),
            Err(MessageError::ConfigFlags(2))
        );
        let addr = VringAddr {
            index: 0,
            flags: 2,
            desc: 0,
            used: 0,
            avail: 0,
            log: 0,
        };
        assert_eq!(
            VringAddr::decode(&addr.to_bytes()),
            Err(MessageError::VringAddrFlags(2))
        );
        assert_eq!(
            VringAddr::decode(
                &VringAddr {
                    index: 256,
                    flags: 0,
                    ..addr
                }
                .to_bytes()
            ),
            Err(MessageError::QueueIndex(256))
        );
        assert_eq!(
            VringState::decode(
                &VringState {
                    index: 1000,
                    num: 0
                }
                .to_bytes()
            ),
            Err(MessageError::QueueIndex(1000))
        );
        assert_eq!(
            VringFd::decode(&VringFd(0x200).to_bytes()),
            Err(MessageError::VringFdReserved(0x200))
        );
        let enable = Message::request(
            Request::SetVringEnable,
            &VringState { index: 0, num: 2 },
            false,
        );
        assert_eq!(
            Message::decode(&enable.encode(), 0),
            Err(MessageError::EnableValue(2))
        );
    }

    /// A header with a known request code and version 1, and a random body.
    fn plausible_message() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(Request::ALL.to_vec()),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(request, body)| raw(request.code(), VERSION, &body))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            fds in 0usize..16,
        ) {
            let _ = Message::decode(&bytes, fds);
            let _ = Header::decode(&bytes);
            for request in Request::ALL {
                let _ = RequestBody::decode(request, &bytes);
            }
        }

        #[test]
        fn decoding_plausible_messages_never_panics_and_round_trips(
            bytes in plausible_message(),
            fds in 0usize..10,
        ) {
            if let Ok(message) = Message::decode(&bytes, fds) {
                prop_assert_eq!(message.encode(), bytes);
                let body = message.parse_body().unwrap();
                prop_assert_eq!(body.fd_count(), fds);
            }
        }

        #[test]
        fn valid_mem_tables_round_trip(
            sizes in prop::collection::vec(1u64..0x10_0000, 0..=MAX_MEM_REGIONS),
        ) {
            let mut next = 0;
            let regions = sizes
                .into_iter()
                .map(|size| {
                    let r = region(next, size);
                    next += size + 0x1000;
                    r
                })
                .collect();
            let table = MemTable::new(regions);
            let fds = table.regions.len();
            let message = Message::request(Request::SetMemTable, &table, false);
            prop_assert_eq!(Message::decode(&message.encode(), fds), Ok(message));
        }
    }
}
