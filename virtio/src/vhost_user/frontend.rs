//! The VMM side of vhost-user: negotiates with a backend, hands it guest memory and rings,
//! and takes them back.
//!
//! Requests go one at a time; every reply (and every `REPLY_ACK`, once negotiated, which
//! the frontend asks for on every request without a reply of its own) is awaited with the
//! reply timeout. A timeout, a closed connection or a reply that does not answer the request
//! is an error naming the request, and leaves the connection [broken](Error::Broken): the
//! two sides are out of step, so later requests fail at once.

use std::cell::Cell;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use memory::{GuestAddress, GuestMemory};

use super::connection::Connection;
use super::message::{
    Body, Config, Header, Inflight, MemTable, MemoryRegion, MessageError, Request, VringAddr,
    VringFd, VringState, FLAG_NEED_REPLY, MAX_CONFIG_SIZE, MAX_MEM_REGIONS, MAX_QUEUES, U64,
};
use super::{
    Error, Result, PROTOCOL_F_CONFIG, PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK, PROTOCOL_F_RESET_DEVICE, VHOST_USER_F_PROTOCOL_FEATURES,
};

/// The protocol features the frontend uses when the backend offers them.
pub const PROTOCOL_FEATURES: u64 = (1 << PROTOCOL_F_MQ)
    | (1 << PROTOCOL_F_REPLY_ACK)
    | (1 << PROTOCOL_F_CONFIG)
    | (1 << PROTOCOL_F_RESET_DEVICE)
    | (1 << PROTOCOL_F_INFLIGHT_SHMFD);

/// One ring to hand to the backend, in guest addresses.
#[derive(Clone, Copy, Debug)]
pub struct VringConfig<'a> {
    /// The queue index.
    pub index: u32,
    /// The queue size the driver set.
    pub size: u16,
    /// The descriptor table.
    pub desc: GuestAddress,
    /// The available ring.
    pub avail: GuestAddress,
    /// The used ring.
    pub used: GuestAddress,
    /// The next avail index the backend starts at.
    pub base: u16,
    /// The kick eventfd (KVM ioeventfd).
    pub kick: BorrowedFd<'a>,
    /// The call eventfd (KVM irqfd); `None`: the backend signals nobody.
    pub call: Option<BorrowedFd<'a>>,
}

/// A connection to a vhost-user backend. `!Send`: it lives on the VMM's executor.
#[derive(Debug)]
pub struct Frontend {
    conn: Connection,
    reply_timeout: Duration,
    /// What the backend offers, with `VHOST_USER_F_PROTOCOL_FEATURES`.
    offered: u64,
    /// The protocol features in use.
    protocol: u64,
    queue_num: Option<u32>,
    /// Held from a request's send to its reply: requests from several tasks take turns.
    turn: futures::lock::Mutex<()>,
    broken: Cell<bool>,
}

/// Sets `broken` unless the exchange finished in step (it failed, or its future was dropped
/// between the send and the reply).
struct Exchange<'a> {
    frontend: &'a Frontend,
    in_step: bool,
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !self.in_step {
            self.frontend.broken.set(true);
        }
    }
}

impl Frontend {
    /// Takes ownership of the backend (`SET_OWNER`), reads its features and negotiates the
    /// protocol features ringvm uses (`REPLY_ACK`, `CONFIG`, `MQ`, `RESET_DEVICE`, as
    /// offered), then reads the queue count if `MQ` was negotiated.
    pub async fn connect(conn: Connection, reply_timeout: Duration) -> Result<Frontend> {
        let mut frontend = Frontend {
            conn,
            reply_timeout,
            offered: 0,
            protocol: 0,
            queue_num: None,
            turn: futures::lock::Mutex::new(()),
            broken: Cell::new(false),
        };
        frontend.transact(Request::SetOwner, &[], &[]).await?;
        frontend.offered = frontend.get_u64(Request::GetFeatures).await?;
        if frontend.offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = frontend.get_u64(Request::GetProtocolFeatures).await?;
            let protocol = offered & PROTOCOL_FEATURES;
            frontend
                .transact(Request::SetProtocolFeatures, &U64(protocol).to_bytes(), &[])
                .await?;
            frontend.protocol = protocol;
            if protocol & (1 << PROTOCOL_F_MQ) != 0 {
                let num = frontend.get_u64(Request::GetQueueNum).await?;
                let num = u32::try_from(num).ok().filter(|&n| n <= MAX_QUEUES).ok_or(
                    Error::MismatchedReply(
                        Request::GetQueueNum,
                        "more queues than vhost-user can address",
                    ),
                )?;
                frontend.queue_num = Some(num);
            }
        }
        Ok(frontend)
    }

    /// The feature bits the backend offers, without `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub fn features(&self) -> u64 {
        self.offered & !(1 << VHOST_USER_F_PROTOCOL_FEATURES)
    }

    /// The protocol features in use.
    pub fn protocol_features(&self) -> u64 {
        self.protocol
    }

    /// The backend's queue count, if `MQ` was negotiated.
    pub fn queue_num(&self) -> Option<u32> {
        self.queue_num
    }

    /// Reads `size` bytes of the device's config space at `offset`.
    pub async fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>> {
        self.need_protocol(PROTOCOL_F_CONFIG, "VHOST_USER_PROTOCOL_F_CONFIG")?;
        if u64::from(offset) + u64::from(size) > u64::from(MAX_CONFIG_SIZE) {
            return Err(Error::Message(MessageError::ConfigOutOfRange {
                offset,
                size,
            }));
        }
        let request = Config {
            offset,
            size,
            flags: 0,
            payload: vec![0; size as usize],
        };
        request.validate().map_err(Error::Message)?;
        let reply = self
            .transact(Request::GetConfig, &request.to_bytes(), &[])
            .await?;
        let reply = Config::decode(&reply).map_err(|e| Error::BadReply(Request::GetConfig, e))?;
        if reply.size == 0 && size != 0 {
            return Err(Error::BackendFailed {
                request: Request::GetConfig,
                status: 1,
            });
        }
        if reply.offset != offset || reply.size != size {
            return Err(Error::MismatchedReply(
                Request::GetConfig,
                "a different config range",
            ));
        }
        Ok(reply.payload)
    }

    /// Writes `data` into the device's config space at `offset`.
    pub async fn set_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        self.need_protocol(PROTOCOL_F_CONFIG, "VHOST_USER_PROTOCOL_F_CONFIG")?;
        let request = Config {
            offset,
            size: u32::try_from(data.len()).unwrap_or(u32::MAX),
            flags: 0,
            payload: data.to_vec(),
        };
        request.validate().map_err(Error::Message)?;
        self.transact(Request::SetConfig, &request.to_bytes(), &[])
            .await
            .map(drop)
    }

    /// Starts the device: acknowledges `features` (a subset of [`Frontend::features`]),
    /// sends the memory table of `mem` and sets up and enables each ring.
    pub async fn start(
        &self,
        features: u64,
        mem: &GuestMemory,
        vrings: &[VringConfig<'_>],
    ) -> Result<()> {
        self.start_with_inflight(features, mem, vrings, None).await
    }

    /// Whether the backend tracks requests in flight (`INFLIGHT_SHMFD` negotiated).
    pub fn tracks_inflight(&self) -> bool {
        self.protocol & (1 << PROTOCOL_F_INFLIGHT_SHMFD) != 0
    }

    /// `GET_INFLIGHT_FD`: a new, cleared inflight region for `num_queues` queues of up to
    /// `queue_size` entries, from the backend; keep it across the backend's restarts.
    pub async fn get_inflight(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Inflight, OwnedFd)> {
        self.need_protocol(
            PROTOCOL_F_INFLIGHT_SHMFD,
            "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD",
        )?;
        let request = Inflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let (reply, mut fds) = self
            .transact_fds(Request::GetInflightFd, &request.to_bytes(), &[], 1)
            .await?;
        let reply =
            Inflight::decode(&reply).map_err(|e| Error::BadReply(Request::GetInflightFd, e))?;
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            (_, _) => return Err(Error::ReplyFds(Request::GetInflightFd, fds.len())),
        };
        if reply.mmap_size == 0 {
            return Err(Error::MismatchedReply(
                Request::GetInflightFd,
                "an empty inflight region",
            ));
        }
        if (reply.num_queues, reply.queue_size) != (num_queues, queue_size) {
            return Err(Error::MismatchedReply(
                Request::GetInflightFd,
                "a region for other queues",
            ));
        }
        Ok((reply, fd))
    }

    /// [`Frontend::start`], handing over the inflight region `inflight` (from
    /// [`Frontend::get_inflight`], possibly of an earlier backend) before the rings.
    pub async fn start_with_inflight(
        &self,
        features: u64,
        mem: &GuestMemory,
        vrings: &[VringConfig<'_>],
        inflight: Option<(&Inflight, BorrowedFd<'_>)>,
    ) -> Result<()> {
        if features & !self.features() != 0 {
            return Err(Error::FeaturesNotOffered {
                acked: features,
                offered: self.features(),
            });
        }
        let protocol = self.offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        self.transact(
            Request::SetFeatures,
            &U64(features | protocol).to_bytes(),
            &[],
        )
        .await?;

        let regions: Vec<_> = mem.regions().collect();
        if regions.len() > MAX_MEM_REGIONS {
            return Err(Error::TooManyRegions(regions.len()));
        }
        let table = MemTable::new(
            regions
                .iter()
                .map(|r| MemoryRegion {
                    guest_phys_addr: r.guest_addr.0,
                    memory_size: r.size,
                    userspace_addr: r.user_addr,
                    mmap_offset: r.fd_offset,
                })
                .collect(),
        );
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|r| r.fd).collect();
        self.transact(Request::SetMemTable, &table.to_bytes(), &fds)
            .await?;
        if let Some((region, fd)) = inflight {
            self.need_protocol(
                PROTOCOL_F_INFLIGHT_SHMFD,
                "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD",
            )?;
            self.transact(Request::SetInflightFd, &region.to_bytes(), &[fd])
                .await?;
        }

        for vring in vrings {
            self.start_vring(mem, vring).await?;
        }
        Ok(())
    }

    async fn start_vring(&self, mem: &GuestMemory, vring: &VringConfig<'_>) -> Result<()> {
        let index = vring.index;
        let fd_index = u8::try_from(index).map_err(|_| Error::QueueIndex {
            index,
            num_queues: MAX_QUEUES as usize,
        })?;
        let state = |num| VringState { index, num }.to_bytes();
        self.transact(Request::SetVringNum, &state(u32::from(vring.size)), &[])
            .await?;
        let addr = VringAddr {
            index,
            flags: 0,
            desc: guest_to_user(mem, vring.desc)?,
            used: guest_to_user(mem, vring.used)?,
            avail: guest_to_user(mem, vring.avail)?,
            log: 0,
        };
        self.transact(Request::SetVringAddr, &addr.to_bytes(), &[])
            .await?;
        self.transact(Request::SetVringBase, &state(u32::from(vring.base)), &[])
            .await?;
        self.transact(
            Request::SetVringKick,
            &VringFd::new(fd_index, false).to_bytes(),
            &[vring.kick],
        )
        .await?;
        match vring.call {
            Some(call) => {
                self.transact(
                    Request::SetVringCall,
                    &VringFd::new(fd_index, false).to_bytes(),
                    &[call],
                )
                .await?
            }
            None => {
                self.transact(
                    Request::SetVringCall,
                    &VringFd::new(fd_index, true).to_bytes(),
                    &[],
                )
                .await?
            }
        };
        if self.offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            self.transact(Request::SetVringEnable, &state(1), &[])
                .await?;
        }
        Ok(())
    }

    /// Starts rings stopped by [`Frontend::stop`] again (each from its `base`), on the
    /// memory table and features already sent.
    pub async fn restart(&self, mem: &GuestMemory, vrings: &[VringConfig<'_>]) -> Result<()> {
        for vring in vrings {
            self.start_vring(mem, vring).await?;
        }
        Ok(())
    }

    /// Stops the rings `indices` (`GET_VRING_BASE`); returns where each stopped: the next
    /// avail index to start it again from.
    pub async fn stop(&self, indices: &[u32]) -> Result<Vec<u16>> {
        let mut bases = Vec::with_capacity(indices.len());
        for &index in indices {
            let reply = self
                .transact(
                    Request::GetVringBase,
                    &VringState { index, num: 0 }.to_bytes(),
                    &[],
                )
                .await?;
            let state = VringState::decode(&reply)
                .map_err(|e| Error::BadReply(Request::GetVringBase, e))?;
            if state.index != index {
                return Err(Error::MismatchedReply(
                    Request::GetVringBase,
                    "the base of another queue",
                ));
            }
            let base = u16::try_from(state.num).map_err(|_| {
                Error::MismatchedReply(Request::GetVringBase, "a base above 16 bits")
            })?;
            bases.push(base);
        }
        Ok(bases)
    }

    /// Resets the device (`RESET_DEVICE`) if the backend supports it; otherwise does nothing.
    pub async fn reset(&self) -> Result<()> {
        if self.protocol & (1 << PROTOCOL_F_RESET_DEVICE) == 0 {
            return Ok(());
        }
        self.transact(Request::ResetDevice, &[], &[])
            .await
            .map(drop)
    }

    fn need_protocol(&self, bit: u32, name: &'static str) -> Result<()> {
        if self.protocol & (1 << bit) == 0 {
            return Err(Error::NotNegotiated(name));
        }
        Ok(())
    }

    async fn get_u64(&self, request: Request) -> Result<u64> {
        let reply = self.transact(request, &[], &[]).await?;
        U64::decode(&reply)
            .map(|v| v.0)
            .map_err(|e| Error::BadReply(request, e))
    }

    /// Sends `request` with `body` and `fds`; returns the reply's body (empty for requests
    /// without a reply). Acks are checked here.
    async fn transact(
        &self,
        request: Request,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u8>> {
        self.transact_fds(request, body, fds, 0)
            .await
            .map(|(body, _)| body)
    }

    /// [`Frontend::transact`], accepting up to `max_reply_fds` descriptors with the reply.
    async fn transact_fds(
        &self,
        request: Request,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        max_reply_fds: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        // Requests take `&self`: one at a time, or their replies would interleave.
        let _turn = self.turn.lock().await;
        if self.broken.get() {
            return Err(Error::Broken);
        }
        let mut exchange = Exchange {
            frontend: self,
            in_step: false,
        };
        let ack = !request.has_reply() && self.protocol & (1 << PROTOCOL_F_REPLY_ACK) != 0;
        let flags = if ack { FLAG_NEED_REPLY } else { 0 };
        let size = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut bytes = Vec::with_capacity(body.len() + 12);
        Header::new(request, flags, size).encode(&mut bytes);
        bytes.extend_from_slice(body);
        // A backend that stops reading fills the socket, and the send would wait for ever:
        // it gets as long as a reply does.
        executor::timeout(self.reply_timeout, self.conn.send(bytes, fds))
            .await
            .map_err(|_| Error::SendTimeout(request, self.reply_timeout))??;
        if !ack && !request.has_reply() {
            exchange.in_step = true;
            return Ok((Vec::new(), Vec::new()));
        }
        let reply = executor::timeout(self.reply_timeout, self.conn.recv())
            .await
            .map_err(|_| Error::Timeout(request, self.reply_timeout))??;
        let (reply, reply_fds) = reply.ok_or(Error::PeerClosed)?;
        if !reply.header.is_reply() || reply.header.request != request {
            return Err(Error::UnexpectedReply {
                expected: request,
                got: reply.header.request,
                reply: reply.header.is_reply(),
            });
        }
        if reply_fds.len() > max_reply_fds {
            return Err(Error::ReplyFds(request, reply_fds.len()));
        }
        exchange.in_step = true;
        if ack {
            let status = U64::decode(&reply.body)
                .map_err(|e| Error::BadReply(request, e))?
                .0;
            if status != 0 {
                return Err(Error::BackendFailed { request, status });
            }
            return Ok((Vec::new(), Vec::new()));
        }
        Ok((reply.body, reply_fds))
    }
}

/// The VMM's host address of guest address `addr` (what vring addresses are given in).
fn guest_to_user(mem: &GuestMemory, addr: GuestAddress) -> Result<u64> {
    mem.regions()
        .find_map(|r| {
            let off = addr.0.checked_sub(r.guest_addr.0)?;
            (off < r.size).then(|| r.user_addr + off)
        })
        .ok_or(Error::GuestAddress(addr))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn guest_addresses_translate_to_the_vmm_user_addresses() {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
            .unwrap();
        let regions: Vec<_> = mem.regions().collect();
        assert_eq!(
            guest_to_user(&mem, GuestAddress(0x123)).unwrap(),
            regions[0].user_addr + 0x123
        );
        assert_eq!(
            guest_to_user(&mem, GuestAddress(0x2ffff)).unwrap(),
            regions[1].user_addr + 0xffff
        );
        for hole in [0x10000, 0x1ffff, 0x30000, u64::MAX] {
            assert!(matches!(
                guest_to_user(&mem, GuestAddress(hole)),
                Err(Error::GuestAddress(GuestAddress(a))) if a == hole
            ));
        }
    }
}
