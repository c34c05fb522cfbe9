//! One connection's state and credit (virtio 1.2 §5.10.6.3), without any I/O: what the
//! guest is owed next, how much each side may send, and what the guest may not do.

use super::chunks::Chunks;
use crate::packet::{Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The most bytes read from a host stream at once (into one packet for the guest).
pub(crate) const MAX_READ: usize = 64 << 10;
/// The most bytes written to a host stream at once (one message: all there is, up to the
/// default receive buffer, so a stream moves with few wakeups).
pub(crate) const MAX_WRITE: usize = 256 << 10;
/// The most buffers gathered into one write.
pub(crate) const MAX_WRITE_BUFS: usize = 64;
/// Guest packets shorter than this are copied into a shared buffer; longer ones keep the
/// buffer they were read into.
pub(crate) const GATHER_BELOW: usize = 4 << 10;

/// A connection's address: the host-side port and the guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// The host's port (the `PATH_<port>` listener, or the port the device gave a host
    /// process that connected to `PATH`).
    pub local: u32,
    /// The guest's port.
    pub peer: u32,
}

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// The guest asked to connect; the broker is connecting (request id).
    Connecting(u32),
    /// A host process asked to connect; the guest has not answered.
    Requesting,
    /// Both sides may send.
    Established,
    /// Reset: only the RST for the guest is left to send.
    Reset,
}

/// Something the guest may not do on a connection: the device resets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    /// More data than the credit the device gave.
    #[error("{len} bytes sent with {free} bytes of credit")]
    CreditExceeded {
        /// Payload length.
        len: u32,
        /// The device's free buffer space.
        free: u32,
    },
    /// A `fwd_cnt` that went back, or past the bytes the device sent.
    #[error("fwd_cnt {fwd_cnt} is not between {old} and {tx_cnt}")]
    BadFwdCnt {
        /// The new value.
        fwd_cnt: u32,
        /// The previous value.
        old: u32,
        /// Bytes the device sent.
        tx_cnt: u32,
    },
    /// An op the connection's state does not take.
    #[error("{op:?} in state {state:?}")]
    Unexpected {
        /// The op.
        op: Op,
        /// The state.
        state: State,
    },
}

/// A packet the device owes the guest: op and flags; for data (`Rw`), how many bytes it may
/// read from the host into it (the packet is sent only once [`Conn::delivered`] says how many
/// came).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub op: Op,
    pub flags: u32,
    pub read: usize,
}

/// One connection.
#[derive(Clone, Debug)]
pub(crate) struct Conn {
    /// Unique per device: tells a connection from a later one at the same key.
    pub id: u64,
    pub state: State,
    /// A REQUEST is owed (host-initiated).
    send_request: bool,
    /// A RESPONSE is owed (guest-initiated, once the host stream is there).
    send_response: bool,
    /// A credit update is owed (the guest asked, or its view of our buffer is stale).
    send_credit: bool,
    /// SHUTDOWN flags owed to the guest.
    shutdown_owed: u32,
    /// SHUTDOWN flags sent to the guest.
    shutdown_sent: u32,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host stream reached its end.
    pub host_eof: bool,
    /// The host stream's write side is shut.
    pub host_shut: bool,
    /// The guest's receive buffer, and what it forwarded of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Our receive buffer (advertised), and what we forwarded to the host.
    buf_alloc: u32,
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    fwd_cnt_sent: u32,
    /// Guest data not yet written to the host (with `writing`, at most `buf_alloc` bytes).
    pub to_host: Chunks,
    /// Guest data taken out of `to_host` by the host write in flight.
    writing: usize,
    /// Guest data the tx queue holds to send to the host straight from guest memory (it
    /// goes before `to_host`).
    direct: usize,
    /// The host stream has something to read (a poll said so): the rx queue reads it
    /// straight into the guest's buffers.
    pub readable: bool,
    /// In the device's list of connections with something for the guest.
    pub queued: bool,
}

impl Conn {
    fn new(id: u64, state: State, buf_alloc: u32) -> Conn {
        Conn {
            id,
            state,
            send_request: false,
            send_response: false,
            send_credit: false,
            shutdown_owed: 0,
            shutdown_sent: 0,
            peer_shutdown: 0,
            host_eof: false,
            host_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            buf_alloc,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: Chunks::default(),
            writing: 0,
            direct: 0,
            readable: false,
            queued: false,
        }
    }

    /// A connection the guest asked for, waiting for request `request` of the broker.
    pub fn guest_initiated(id: u64, request: u32, buf_alloc: u32) -> Conn {
        Conn::new(id, State::Connecting(request), buf_alloc)
    }

    /// A connection a host process asked for: a REQUEST is owed to the guest.
    pub fn host_initiated(id: u64, buf_alloc: u32) -> Conn {
        let mut c = Conn::new(id, State::Requesting, buf_alloc);
        c.send_request = true;
        c
    }

    /// The host stream of a guest-initiated connection is there: a RESPONSE is owed.
    pub fn connected(&mut self) {
        self.state = State::Established;
        self.send_response = true;
    }

    /// The guest accepted a host-initiated connection.
    pub fn accepted(&mut self) -> Result<(), Violation> {
        if self.state != State::Requesting || self.send_request {
            return Err(self.unexpected(Op::Response));
        }
        self.state = State::Established;
        Ok(())
    }

    /// Resets the connection: everything buffered is dropped, an RST is owed.
    pub fn reset(&mut self) {
        self.state = State::Reset;
        self.to_host = Chunks::default();
        // The write in flight is cancelled with the stream; a send straight from guest
        // memory ends on its own, and what it did not send is dropped.
        self.writing = 0;
        self.direct = 0;
    }

    pub fn unexpected(&self, op: Op) -> Violation {
        Violation::Unexpected {
            op,
            state: self.state,
        }
    }

    /// Takes the credit fields of a guest packet: `fwd_cnt` may only move forward, and not
    /// past what the device sent.
    pub fn peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) -> Result<(), Violation> {
        let advanced = fwd_cnt.wrapping_sub(self.peer_fwd_cnt);
        let outstanding = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if advanced > outstanding {
            return Err(Violation::BadFwdCnt {
                fwd_cnt,
                old: self.peer_fwd_cnt,
                tx_cnt: self.tx_cnt,
            });
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        Ok(())
    }

    /// Bytes the guest can take now (0 when it shrank its buffer below what is in flight).
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Free space in our receive buffer: the credit the guest has.
    pub fn free(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(u32::try_from(self.for_host()).unwrap_or(u32::MAX))
    }

    /// Guest data not yet written to the host, with what a write in flight holds.
    pub fn for_host(&self) -> usize {
        self.to_host.len() + self.writing + self.direct
    }

    /// Guest data for the host in the device's own buffers (not held in guest memory).
    pub fn buffered_for_host(&self) -> usize {
        self.to_host.len() + self.writing
    }

    /// Takes `len` bytes from the guest for the host, within the credit, that the tx queue
    /// sends straight from guest memory; [`direct_sent`](Self::direct_sent) ends that.
    pub fn guest_direct(&mut self, len: usize) -> Result<(), Violation> {
        self.may_take(len)?;
        self.direct += len;
        Ok(())
    }

    /// `len` bytes taken by [`guest_direct`](Self::guest_direct) are no longer held, of which
    /// `sent` reached the host.
    pub fn direct_sent(&mut self, len: usize, sent: usize) {
        self.direct = self.direct.saturating_sub(len);
        if self.state != State::Reset {
            self.wrote(sent);
        }
    }

    /// Whether the host writer has something to write: `to_host`, once no held guest data
    /// (which goes first, sent by the tx queue) is left.
    pub fn has_host_write(&self) -> bool {
        !self.to_host.is_empty() && self.direct == 0
    }

    /// The `len` held bytes taken by [`guest_direct`](Self::guest_direct), copied into
    /// `bufs`, go in front of what waits for the host (the hold ended unsent).
    pub fn unhold(&mut self, bufs: Vec<Vec<u8>>, len: usize) {
        self.direct = self.direct.saturating_sub(len);
        if self.state != State::Reset {
            for buf in bufs.into_iter().rev() {
                self.to_host.push_front(buf);
            }
        }
    }

    /// Takes `data` from the guest for the host, within the credit (in the buffer it came in).
    pub fn guest_data(&mut self, data: impl Into<Vec<u8>>) -> Result<(), Violation> {
        let data = data.into();
        self.may_take(data.len())?;
        self.to_host.push(data);
        Ok(())
    }

    /// Takes a short packet's `len` bytes from the guest for the host, within the credit:
    /// `fill` writes them in place, after the data before them or into a buffer from
    /// `spare`; when it fails nothing is taken.
    pub fn guest_bytes(
        &mut self,
        len: usize,
        spare: impl FnOnce() -> Vec<u8>,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Result<(), Violation> {
        self.may_take(len)?;
        if self.to_host.append_with(len, spare, fill) {
            Ok(())
        } else {
            Err(self.unexpected(Op::Rw))
        }
    }

    fn may_take(&self, len: usize) -> Result<(), Violation> {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(self.unexpected(Op::Rw));
        }
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let free = self.free();
        if len > free {
            return Err(Violation::CreditExceeded { len, free });
        }
        Ok(())
    }

    /// Takes the guest's SHUTDOWN flags.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), Violation> {
        if self.state != State::Established {
            return Err(self.unexpected(Op::Shutdown));
        }
        // After SHUTDOWN(RCV) nothing more is read for the guest (`read_size`).
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        Ok(())
    }

    /// The guest asked for our credit.
    pub fn credit_requested(&mut self) {
        self.send_credit = true;
    }

    /// How much the guest may take from the host now, within its credit (0: nothing).
    pub fn read_size(&self) -> usize {
        let open = self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0;
        if !open {
            return 0;
        }
        (self.peer_free() as usize).min(MAX_READ)
    }

    /// Whether the host stream should be polled for something to read: the guest has credit
    /// and no poll said so yet.
    pub fn wants_poll(&self) -> bool {
        !self.readable && self.read_size() > 0
    }

    /// `n` bytes read from the host went to the guest in a data packet (from
    /// [`next_packet`](Self::next_packet)'s plan), which carries our credit.
    pub fn delivered(&mut self, n: usize) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        self.send_credit = false;
        self.fwd_cnt_sent = self.fwd_cnt;
    }

    /// The host stream ended: once its data is out, the guest hears SHUTDOWN(SEND).
    pub fn host_eof(&mut self) {
        self.host_eof = true;
        self.shutdown_owed |= SHUTDOWN_SEND & !self.shutdown_sent;
    }

    /// The next buffers to write to the host (see [`MAX_WRITE`], [`MAX_WRITE_BUFS`]), out of
    /// the queue until [`host_wrote`](Self::host_wrote) takes them back.
    pub fn write_bufs(&mut self) -> Vec<Vec<u8>> {
        let bufs = self.to_host.take_bufs(MAX_WRITE, MAX_WRITE_BUFS);
        self.writing += bufs.iter().map(Vec::len).sum::<usize>();
        bufs
    }

    /// A write of `bufs` (from [`write_bufs`](Self::write_bufs)) took their first `n` bytes
    /// to the host; the rest goes back in front. Returns the buffers written out, for reuse.
    /// The guest hears of the bytes when its view of our free space fell below half (or to
    /// nothing, where it waits).
    pub fn host_wrote(&mut self, n: usize, bufs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut left = n;
        let mut done = Vec::with_capacity(bufs.len());
        let mut rest = Vec::new();
        for mut buf in bufs {
            self.writing = self.writing.saturating_sub(buf.len());
            if left >= buf.len() {
                left -= buf.len();
                done.push(buf);
            } else {
                buf.drain(..left);
                left = 0;
                rest.push(buf);
            }
        }
        if self.state != State::Reset {
            for buf in rest.into_iter().rev() {
                self.to_host.push_front(buf);
            }
        }
        self.wrote(n - left);
        done
    }

    fn wrote(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let unheard = self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent);
        let in_flight_as_guest_sees = unheard.saturating_add(self.buf_alloc - self.free());
        if self.buf_alloc.saturating_sub(in_flight_as_guest_sees) < self.buf_alloc / 2 {
            self.send_credit = true;
        }
    }

    /// Whether the host's write side should be shut now (the guest will send no more and
    /// everything it sent is written).
    pub fn should_shut_host(&self) -> bool {
        self.state == State::Established
            && self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.for_host() == 0
            && !self.host_shut
    }

    /// Whether the connection is done: the guest shut both directions and everything it
    /// sent reached the host. The device then resets it (the guest waits for that RST).
    pub fn finished(&self) -> bool {
        self.state == State::Established
            && self.peer_shutdown == SHUTDOWN_BOTH
            && self.for_host() == 0
    }

    /// Whether a packet is owed to the guest now.
    pub fn has_output(&self) -> bool {
        match self.state {
            State::Reset => true,
            State::Connecting(_) => false,
            State::Requesting => self.send_request,
            State::Established => {
                self.send_response
                    || (self.readable && self.read_size() > 0)
                    || self.shutdown_owed != 0
                    || self.send_credit
            }
        }
    }

    /// The next packet owed to the guest, with at most `room` payload bytes. A control
    /// packet is taken as sent; it carries our credit, so a separate update is no longer
    /// owed. A data packet is a plan: read at most `read` bytes from the host into the
    /// guest's buffer, then [`delivered`](Self::delivered) (or nothing, if none came).
    pub fn next_packet(&mut self, room: usize) -> Option<Outgoing> {
        let (op, flags) = match self.state {
            State::Reset => (Op::Rst, 0),
            State::Requesting if self.send_request => {
                self.send_request = false;
                (Op::Request, 0)
            }
            State::Established if self.send_response => {
                self.send_response = false;
                (Op::Response, 0)
            }
            State::Established if self.readable && self.read_size() > 0 && room > 0 => {
                let read = self.read_size().min(room);
                return Some(Outgoing {
                    op: Op::Rw,
                    flags: 0,
                    read,
                });
            }
            State::Established if self.shutdown_owed != 0 => {
                let flags = self.shutdown_owed;
                self.shutdown_sent |= flags;
                self.shutdown_owed = 0;
                (Op::Shutdown, flags)
            }
            State::Established if self.send_credit => (Op::CreditUpdate, 0),
            _ => return None,
        };
        self.send_credit = false;
        self.fwd_cnt_sent = self.fwd_cnt;
        Some(Outgoing { op, flags, read: 0 })
    }

    /// Our credit fields for an outgoing header: `(buf_alloc, fwd_cnt)`.
    pub fn credit(&self) -> (u32, u32) {
        (self.buf_alloc, self.fwd_cnt)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn established(peer_buf: u32) -> Conn {
        let mut c = Conn::guest_initiated(1, 0, 1024);
        c.peer_credit(peer_buf, 0).unwrap();
        c.connected();
        assert_eq!(c.next_packet(4096).unwrap().op, Op::Response);
        c
    }

    #[test]
    fn the_device_never_sends_more_than_the_guests_credit() {
        let mut c = established(100);
        assert_eq!(c.read_size(), 100);
        assert!(c.wants_poll() && !c.has_output(), "nothing to read yet");
        c.readable = true;
        assert!(!c.wants_poll());
        let p = c.next_packet(30).unwrap();
        assert_eq!((p.op, p.read), (Op::Rw, 30));
        assert_eq!(c.peer_free(), 100, "a plan until the bytes came");
        c.delivered(30);
        let p = c.next_packet(4096).unwrap();
        assert_eq!(p.read, 70);
        c.delivered(70);
        assert_eq!(c.peer_free(), 0);
        assert_eq!(c.read_size(), 0, "no credit: nothing is read");
        assert!(!c.has_output(), "no credit: nothing is sent");
        assert_eq!(c.next_packet(4096), None);
        c.peer_credit(100, 40).unwrap();
        assert_eq!(c.next_packet(4096).unwrap().read, 40);
        c.delivered(10);
        assert_eq!(c.peer_free(), 30);
    }

    #[test]
    fn a_shrunk_guest_buffer_leaves_no_credit_instead_of_wrapping() {
        let mut c = established(100);
        c.readable = true;
        c.next_packet(4096).unwrap();
        c.delivered(100);
        c.peer_credit(10, 0).unwrap();
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn fwd_cnt_may_not_go_back_or_past_what_was_sent() {
        let mut c = established(100);
        c.readable = true;
        c.next_packet(4096).unwrap();
        c.delivered(50);
        assert!(matches!(
            c.peer_credit(100, 51),
            Err(Violation::BadFwdCnt { .. })
        ));
        c.peer_credit(100, 50).unwrap();
        assert!(matches!(
            c.peer_credit(100, 49),
            Err(Violation::BadFwdCnt { .. })
        ));
        assert!(c.peer_credit(100, u32::MAX).is_err());
    }

    #[test]
    fn guest_data_beyond_the_credit_is_a_violation() {
        let mut c = established(100);
        c.guest_data([0; 1000]).unwrap();
        assert_eq!(c.free(), 24);
        assert_eq!(
            c.guest_data([0; 25]),
            Err(Violation::CreditExceeded { len: 25, free: 24 })
        );
        let bufs = c.write_bufs();
        assert_eq!(bufs, [vec![0; 1000]]);
        assert_eq!(c.free(), 24, "a write in flight still holds its bytes");
        assert_eq!(
            c.host_wrote(1000, bufs).len(),
            1,
            "written out: back for reuse"
        );
        assert_eq!(c.free(), 1024);
        assert!(c.has_output(), "a credit update is owed");
        let p = c.next_packet(0).unwrap();
        assert_eq!(p.op, Op::CreditUpdate);
        assert_eq!(c.credit(), (1024, 1000));
    }

    #[test]
    fn host_eof_becomes_shutdown_send_after_the_data() {
        let mut c = established(100);
        c.readable = true;
        assert_eq!(c.next_packet(4096).unwrap().op, Op::Rw);
        c.delivered(3);
        // The next read finds the end.
        c.host_eof();
        let p = c.next_packet(4096).unwrap();
        assert_eq!((p.op, p.flags), (Op::Shutdown, SHUTDOWN_SEND));
        assert_eq!(c.next_packet(4096), None);
        assert_eq!(c.read_size(), 0);
    }

    #[test]
    fn guest_shutdown_shuts_the_host_then_finishes() {
        let mut c = established(100);
        c.guest_data(b"xy").unwrap();
        c.guest_shutdown(SHUTDOWN_BOTH).unwrap();
        assert!(!c.should_shut_host() && !c.finished());
        assert!(c.guest_data(b"z").is_err(), "no data after SHUTDOWN(SEND)");
        c.guest_bytes(1, || panic!("refused before the copy"), |_| true)
            .unwrap_err();
        let bufs = c.write_bufs();
        assert!(
            !c.should_shut_host() && !c.finished(),
            "not while the write is in flight"
        );
        assert!(c.host_wrote(1, bufs).is_empty(), "a short write");
        assert!(!c.should_shut_host() && !c.finished());
        let bufs = c.write_bufs();
        assert_eq!(bufs, [b"y".to_vec()]);
        c.host_wrote(1, bufs);
        assert!(c.should_shut_host() && c.finished());
    }

    #[test]
    fn host_initiated_needs_the_request_sent_before_a_response() {
        let mut c = Conn::host_initiated(1, 1024);
        assert!(
            c.accepted().is_err(),
            "response before the request went out"
        );
        assert_eq!(c.next_packet(0).unwrap().op, Op::Request);
        c.accepted().unwrap();
        assert_eq!(c.state, State::Established);
        assert!(c.accepted().is_err());
    }

    #[derive(Clone, Debug)]
    enum Step {
        PeerCredit(u32, u32),
        GuestData(usize),
        GuestBytes(usize),
        HostReadable,
        HostWrite,
        HostWrote(usize),
        Next(usize, usize),
        GuestShutdown(u32),
        HostEof,
        CreditRequested,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (prop_oneof![Just(4096u32), any::<u32>()], 0u32..20000)
                .prop_map(|(b, f)| Step::PeerCredit(b, f)),
            (0usize..3000).prop_map(Step::GuestData),
            (0usize..300).prop_map(Step::GuestBytes),
            Just(Step::HostReadable),
            Just(Step::HostWrite),
            (0usize..5000).prop_map(Step::HostWrote),
            (0usize..5000, 0usize..100_000).prop_map(|(r, g)| Step::Next(r, g)),
            (0u32..4).prop_map(Step::GuestShutdown),
            Just(Step::HostEof),
            Just(Step::CreditRequested),
        ]
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_the_credit_and_the_buffers_bounded(
            steps in prop::collection::vec(step(), 1..200),
        ) {
            let mut c = established(4096);
            // What the guest has acknowledged, as the device checks it.
            let mut sent = 0u32;
            // The host write in flight.
            let mut writing: Option<Vec<Vec<u8>>> = None;
            for s in steps {
                match s {
                    Step::PeerCredit(b, f) => {
                        if c.peer_credit(b, f).is_ok() {
                            prop_assert!(f <= sent);
                        }
                    }
                    Step::GuestData(n) => {
                        let free = c.free() as usize;
                        let r = c.guest_data(vec![0; n]);
                        if n > free {
                            prop_assert!(r.is_err());
                        }
                    }
                    Step::GuestBytes(n) => {
                        let free = c.free() as usize;
                        let r = c.guest_bytes(n, || Vec::with_capacity(512), |b| {
                            b.fill(2);
                            true
                        });
                        if n > free {
                            prop_assert!(r.is_err());
                        }
                    }
                    Step::HostReadable => c.readable = true,
                    Step::HostWrite => {
                        if writing.is_none() && !c.to_host.is_empty() {
                            let bufs = c.write_bufs();
                            let len: usize = bufs.iter().map(Vec::len).sum();
                            prop_assert!(len > 0 && bufs.len() <= MAX_WRITE_BUFS);
                            prop_assert!(len <= MAX_WRITE || bufs.len() == 1);
                            writing = Some(bufs);
                        }
                    }
                    Step::HostWrote(n) => {
                        if let Some(bufs) = writing.take() {
                            let lens: Vec<usize> = bufs.iter().map(Vec::len).collect();
                            let back = c.host_wrote(n, bufs);
                            let whole = lens.iter().scan(0, |t, l| { *t += l; Some(*t) })
                                .take_while(|t| *t <= n).count();
                            prop_assert_eq!(back.len(), whole);
                        }
                    }
                    // A data packet reads up to its plan; nothing there ends the readable
                    // state, as EAGAIN does.
                    Step::Next(room, there) => {
                        let free = c.peer_free();
                        if let Some(p) = c.next_packet(room) {
                            prop_assert!(p.read <= room);
                            prop_assert!(p.read as u32 <= free, "beyond the credit");
                            if p.op == Op::Rw {
                                prop_assert!(p.read > 0);
                                let n = p.read.min(there);
                                if n == 0 {
                                    c.readable = false;
                                } else {
                                    c.delivered(n);
                                    sent += n as u32;
                                }
                            }
                        }
                    }
                    Step::GuestShutdown(f) => {
                        let _ = c.guest_shutdown(f);
                    }
                    Step::HostEof => c.host_eof(),
                    Step::CreditRequested => c.credit_requested(),
                }
                prop_assert!(c.for_host() <= 1024);
                if writing.is_some() {
                    prop_assert!(!c.finished() && !c.should_shut_host());
                }
                // `has_output` says exactly whether `next_packet` has something.
                prop_assert_eq!(c.has_output(), c.clone().next_packet(usize::MAX).is_some());
            }
        }
    }

    #[test]
    fn a_reset_connection_owes_only_an_rst() {
        let mut c = established(100);
        c.readable = true;
        c.reset();
        assert_eq!(c.next_packet(4096).unwrap().op, Op::Rst);
        assert_eq!(c.read_size(), 0);
    }
}
