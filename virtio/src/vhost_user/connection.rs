//! Message framing on a unix stream socket: one [`Message`] at a time, its file descriptors
//! received with its first bytes.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use executor::AsyncFd;

use super::message::{Header, Message, MessageError, HEADER_SIZE, MAX_MEM_REGIONS};
use super::{Error, Result};

/// How long the rest of a message may take once its first bytes arrived.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// One end of a vhost-user connection (a unix stream socket).
///
/// [`recv`](Connection::recv) reads a whole message: the header first, with at most
/// [`MAX_MEM_REGIONS`] file descriptors, its size checked before the body is read, then the
/// body. Requests are fully decoded ([`Message::decode`]); replies (with `FLAG_REPLY`) have
/// their header checked and their body left to the requester, which knows what it asked.
#[derive(Clone, Debug)]
pub struct Connection {
    fd: AsyncFd,
    message_timeout: Duration,
}

/// A message's bytes and the descriptors that came with them so far.
struct Partial {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Connection {
    /// A connection over a connected unix stream socket.
    pub fn new(fd: AsyncFd) -> Connection {
        Connection {
            fd,
            message_timeout: MESSAGE_TIMEOUT,
        }
    }

    /// The same connection with another limit on how long the rest of a message may take
    /// once its first bytes arrived (default [`MESSAGE_TIMEOUT`]).
    pub fn with_message_timeout(self, timeout: Duration) -> Connection {
        Connection {
            message_timeout: timeout,
            ..self
        }
    }

    /// The socket.
    pub fn fd(&self) -> &AsyncFd {
        &self.fd
    }

    /// Sends `bytes` (one encoded message) with `fds`, which go with the first chunk;
    /// short sends are continued until every byte is sent.
    pub async fn send(&self, mut bytes: Vec<u8>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        let mut fds = fds;
        while !bytes.is_empty() {
            let (res, buf) = self.fd.sendmsg(bytes, fds).await;
            let n = res.map_err(Error::Send)?;
            if n == 0 {
                return Err(Error::Send(std::io::ErrorKind::WriteZero.into()));
            }
            fds = &[];
            bytes = buf;
            bytes.drain(..n.min(bytes.len()));
        }
        Ok(())
    }

    /// Receives one message and its descriptors. `None`: the peer closed the connection
    /// cleanly, between messages.
    pub async fn recv(&self) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut msg = Partial {
            buf: Vec::with_capacity(HEADER_SIZE),
            fds: Vec::new(),
        };
        // The first bytes: a peer may stay quiet between messages as long as it likes.
        if !self.fill(&mut msg, HEADER_SIZE).await? {
            return Ok(None);
        }
        if msg.buf.len() < HEADER_SIZE {
            let rest = self.fill_until(&mut msg, HEADER_SIZE);
            executor::timeout(self.message_timeout, rest)
                .await
                .map_err(|_| Error::MessageTimeout(self.message_timeout))??;
        }
        // Version, flags, request code and the size limit, before any body byte is read.
        let header = Header::decode(&msg.buf).map_err(Error::Message)?;
        let total = HEADER_SIZE + header.size as usize;
        if msg.buf.len() < total {
            msg.buf.reserve_exact(total - msg.buf.len());
            let rest = self.fill_until(&mut msg, total);
            executor::timeout(self.message_timeout, rest)
                .await
                .map_err(|_| Error::MessageTimeout(self.message_timeout))??;
        }
        let Partial { buf, fds } = msg;
        if header.is_reply() {
            return Ok(Some((
                Message {
                    header,
                    body: buf[HEADER_SIZE..].to_vec(),
                },
                fds,
            )));
        }
        let message = Message::decode(&buf, fds.len()).map_err(Error::Message)?;
        Ok(Some((message, fds)))
    }

    /// Reads until `msg` holds `target` bytes (the message's size, or the header's).
    async fn fill_until(&self, msg: &mut Partial, target: usize) -> Result<()> {
        while msg.buf.len() < target {
            // `msg` is not empty here, so `fill` fails at EOF rather than returning false.
            self.fill(msg, target).await?;
        }
        Ok(())
    }

    /// One recvmsg of up to `target - len` bytes; false at EOF with nothing received yet,
    /// an error at EOF after part of a message.
    async fn fill(&self, msg: &mut Partial, target: usize) -> Result<bool> {
        let want = target - msg.buf.len();
        let room = MAX_MEM_REGIONS - msg.fds.len();
        let (res, chunk) = self.fd.recvmsg(Vec::with_capacity(want), room).await;
        let got = res.map_err(Error::Recv)?;
        msg.fds.extend(got.fds);
        if got.fds_truncated || msg.fds.len() > MAX_MEM_REGIONS {
            return Err(Error::TooManyFds(MAX_MEM_REGIONS));
        }
        if got.len == 0 {
            if msg.buf.is_empty() {
                return Ok(false);
            }
            return Err(Error::ClosedMidMessage {
                got: msg.buf.len(),
                expected: target,
            });
        }
        msg.buf
            .extend_from_slice(&chunk[..got.len.min(chunk.len())]);
        Ok(true)
    }
}

impl From<MessageError> for Error {
    fn from(e: MessageError) -> Error {
        Error::Message(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use executor::{EventFd, Executor};
    use proptest::prelude::*;

    use super::*;
    use crate::vhost_user::message::{
        encode_reply, Body, MemTable, MemoryRegion, Request, VringFd, VringState, MAX_BODY_SIZE,
        U64,
    };

    /// A connection and the raw other end, for writing bytes in arbitrary pieces.
    fn raw_pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(AsyncFd::new(a.into())), b)
    }

    #[test]
    fn fds_arrive_with_their_message() {
        let ex = Executor::new().unwrap();
        let (a, b) = executor::socketpair().unwrap();
        let (a, b) = (Connection::new(a), Connection::new(b));
        let kick = EventFd::new().unwrap();
        let msg = Message::request(Request::SetVringKick, &VringFd::new(3, false), false);
        ex.run_until(async {
            a.send(msg.encode(), &[kick.as_fd()]).await.unwrap();
            a.send(Message::empty(Request::GetFeatures).encode(), &[])
                .await
                .unwrap();
            let (got, fds) = b.recv().await.unwrap().unwrap();
            assert_eq!((got, fds.len()), (msg, 1));
            let (got, fds) = b.recv().await.unwrap().unwrap();
            assert_eq!(got.header.request, Request::GetFeatures);
            assert!(fds.is_empty());
            drop(a);
            assert!(b.recv().await.unwrap().is_none());
        });
    }

    #[test]
    fn oversized_size_is_refused_before_the_body_is_read() {
        let ex = Executor::new().unwrap();
        let (conn, mut peer) = raw_pair();
        let mut header = Vec::new();
        Header {
            request: Request::SetFeatures,
            flags: 1,
            size: MAX_BODY_SIZE + 1,
        }
        .encode(&mut header);
        // No body follows and the peer stays open: a reader waiting for it would hang.
        peer.write_all(&header).unwrap();
        let got = ex.run_until(executor::timeout(Duration::from_secs(5), conn.recv()));
        assert!(matches!(
            got,
            Ok(Err(Error::Message(MessageError::Oversized(s)))) if s == MAX_BODY_SIZE + 1
        ));
    }

    #[test]
    fn replies_are_framed_and_left_undecoded() {
        let ex = Executor::new().unwrap();
        let (conn, mut peer) = raw_pair();
        peer.write_all(&encode_reply(Request::GetFeatures, &U64(7)))
            .unwrap();
        let (msg, fds) = ex.run_until(conn.recv()).unwrap().unwrap();
        assert!(msg.header.is_reply() && fds.is_empty());
        assert_eq!(U64::decode(&msg.body), Ok(U64(7)));
    }

    #[test]
    fn a_message_that_stops_half_way_times_out() {
        let ex = Executor::new().unwrap();
        let (conn, mut peer) = raw_pair();
        let conn = conn.with_message_timeout(Duration::from_millis(50));
        peer.write_all(&[2, 0, 0]).unwrap();
        let got = ex.run_until(conn.recv());
        assert!(matches!(got, Err(Error::MessageTimeout(d)) if d == Duration::from_millis(50)));
        let mut header = Vec::new();
        Header::new(Request::SetFeatures, 0, 8).encode(&mut header);
        let (conn, mut peer) = raw_pair();
        let conn = conn.with_message_timeout(Duration::from_millis(50));
        peer.write_all(&header).unwrap();
        let got = ex.run_until(conn.recv());
        assert!(matches!(got, Err(Error::MessageTimeout(_))));
        drop(peer);
    }

    #[test]
    fn eof_inside_the_header_is_an_error() {
        let ex = Executor::new().unwrap();
        let (conn, mut peer) = raw_pair();
        peer.write_all(&[2, 0, 0]).unwrap();
        drop(peer);
        let got = ex.run_until(conn.recv());
        assert!(matches!(
            got,
            Err(Error::ClosedMidMessage {
                got: 3,
                expected: HEADER_SIZE
            })
        ));
    }

    fn messages() -> impl Strategy<Value = Vec<Message>> {
        let one = prop_oneof![
            Just(Message::empty(Request::GetFeatures)),
            any::<u64>().prop_map(|v| Message::request(Request::SetFeatures, &U64(v), true)),
            (0u32..256, any::<u32>()).prop_map(|(index, num)| Message::request(
                Request::SetVringNum,
                &VringState { index, num },
                false
            )),
            Just(Message::request(
                Request::SetMemTable,
                &MemTable::new(Vec::<MemoryRegion>::new()),
                false
            )),
        ];
        prop::collection::vec(one, 1..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn messages_split_at_any_points_are_reassembled(
            msgs in messages(),
            cuts in prop::collection::vec(1usize..40, 0..20),
        ) {
            let ex = Executor::new().unwrap();
            let (conn, mut peer) = raw_pair();
            let bytes: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
            let writer = std::thread::spawn(move || {
                let mut rest = &bytes[..];
                for cut in cuts {
                    let n = cut.min(rest.len());
                    peer.write_all(&rest[..n]).unwrap();
                    rest = &rest[n..];
                    std::thread::yield_now();
                }
                peer.write_all(rest).unwrap();
            });
            let got = ex.run_until(async {
                let mut got = Vec::new();
                while let Some((m, _)) = conn.recv().await.unwrap() {
                    got.push(m);
                }
                got
            });
            writer.join().unwrap();
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn arbitrary_bytes_end_in_messages_an_error_or_a_clean_close(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let ex = Executor::new().unwrap();
            let (conn, mut peer) = raw_pair();
            peer.write_all(&bytes).unwrap();
            drop(peer);
            ex.run_until(async {
                let mut consumed = 0;
                loop {
                    match conn.recv().await {
                        Ok(Some((m, _))) => consumed += HEADER_SIZE + m.body.len(),
                        Ok(None) => {
                            assert_eq!(consumed, bytes.len());
                            break;
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    }
}
