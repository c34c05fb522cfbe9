//! The console device: queue 0 (receiveq, port 0) carries input to the guest, queue 1
//! (transmitq, port 0) carries its output.
//!
//! # Data path
//! - **Output**: each transmit chain's readable bytes are copied out of guest memory (the
//!   guest may change them under us; the copy is what gets written), written to the output
//!   descriptor through io_uring (a short write is continued, a full pipe waits for room),
//!   and only then is the chain completed: a slow reader slows the guest, nothing is
//!   dropped. An output that fails (its reader went away) is logged once; later output is
//!   discarded and the guest keeps running.
//! - **Input**: up to [`INPUT_CHUNK`] bytes are read from the input descriptor before a
//!   receive chain is taken, so a read that never completes holds no guest buffer; what does
//!   not fit in one chain goes into the next. End of input ends reading; the guest's
//!   buffers stay posted.
//!
//! # Stop
//! Both tasks wait on the stop signal alongside their I/O: a blocked write or read is
//! dropped (the executor cancels it), a chain already taken is completed first.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::{pin, Pin};
use std::rc::Rc;

use executor::AsyncFd;
use futures::future::{select, Either};
use virtio::vhost_user::{Device, StopSignal};
use virtio::{AsyncQueue, DescriptorChain, DeviceType, Error, GuestLog};

/// The console size is in the configuration (cols, rows) (§5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// The most bytes one transmit chain may carry; the rest of a longer chain is not written.
pub const MAX_CHAIN_BYTES: usize = 64 << 10;
/// The queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// The most input bytes read at once.
pub const INPUT_CHUNK: usize = 4096;
/// Bytes of configuration: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_SIZE: usize = 12;
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;

/// The console's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSize {
    pub cols: u16,
    pub rows: u16,
}

/// A single-port virtio console.
#[derive(Debug)]
pub struct Console {
    output: AsyncFd,
    input: Option<AsyncFd>,
    size: Option<ConsoleSize>,
    /// The output failed once (logged); later output is discarded.
    output_gone: Cell<bool>,
    /// Malformed chains (rate-limited: the guest sends as many as it likes).
    errors: GuestLog,
}

/// How a wait against the stop signal ended.
enum Waited<T> {
    Done(T),
    Stopped,
}

async fn or_stop<T>(f: impl Future<Output = T>, stop: &StopSignal) -> Waited<T> {
    match select(pin!(f), stop.clone()).await {
        Either::Left((v, _)) => Waited::Done(v),
        Either::Right(((), _)) => Waited::Stopped,
    }
}

impl Console {
    /// A console writing the guest's output to `output` and, with `input`, reading its input.
    pub fn new(output: OwnedFd, input: Option<OwnedFd>, size: Option<ConsoleSize>) -> Console {
        Console {
            output: AsyncFd::new(output),
            input: input.map(AsyncFd::new),
            size,
            output_gone: Cell::new(false),
            errors: GuestLog::new("console"),
        }
    }

    fn log(&self, what: impl std::fmt::Display) {
        eprintln!("ringvm device console: {what}");
    }

    /// The next chain, or `None` once stopped (or the queue failed: logged, then stopped).
    async fn next_chain(&self, queue: &AsyncQueue, stop: &StopSignal) -> Option<DescriptorChain> {
        let next = queue.next_valid_chain(|head, reason| {
            self.errors
                .log(format_args!("invalid chain at head {head}: {reason}"));
        });
        match or_stop(next, stop).await {
            Waited::Done(Ok(chain)) => Some(chain),
            Waited::Done(Err(e)) => {
                self.fail(e, stop).await;
                None
            }
            Waited::Stopped => None,
        }
    }

    /// The transmit queue: the guest's output, in order.
    async fn transmit(self: Rc<Self>, queue: Rc<AsyncQueue>, stop: StopSignal) {
        while let Some(chain) = self.next_chain(&queue, &stop).await {
            let mut reader = chain.reader(queue.memory());
            let mut bytes = vec![0; reader.available_bytes().min(MAX_CHAIN_BYTES)];
            match reader.read_exact_bytes(&mut bytes) {
                Ok(()) => {
                    if let Waited::Stopped = or_stop(self.write_all(bytes), &stop).await {
                        // Completed below: the guest gets its buffer back.
                        let _ = queue.complete(chain.head_index(), 0);
                        break;
                    }
                }
                Err(e) => {
                    self.errors
                        .log(format_args!("chain {}: {e}", chain.head_index()));
                }
            }
            if let Err(e) = queue.complete(chain.head_index(), 0) {
                return self.fail(e, &stop).await;
            }
        }
        self.errors.flush();
    }

    /// Writes all of `bytes` to the output (unless it failed before).
    async fn write_all(&self, mut bytes: Vec<u8>) {
        while !bytes.is_empty() && !self.output_gone.get() {
            let (res, mut rest) = self.output.write(bytes).await;
            match res {
                Ok(0) => self.output_failed("it accepts no more bytes"),
                Ok(n) => {
                    rest.drain(..n.min(rest.len()));
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if let Err(e) = self.output.poll_writable().await {
                        self.output_failed(e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.output_failed(e),
            }
            bytes = rest;
        }
    }

    fn output_failed(&self, why: impl std::fmt::Display) {
        self.log(format_args!(
            "writing the output failed: {why}; the guest's output is discarded from now on"
        ));
        self.output_gone.set(true);
    }

    /// The receive queue: input bytes into the guest's buffers, in order.
    async fn receive(self: Rc<Self>, queue: Rc<AsyncQueue>, stop: StopSignal) {
        let Some(input) = &self.input else {
            // No input: the guest's buffers wait until the queue stops.
            stop.await;
            return;
        };
        let mut pending: Vec<u8> = Vec::new();
        loop {
            if pending.is_empty() {
                match or_stop(read_some(input), &stop).await {
                    Waited::Done(Ok(bytes)) if bytes.is_empty() => break,
                    Waited::Done(Ok(bytes)) => pending = bytes,
                    Waited::Done(Err(e)) => {
                        self.log(format_args!("reading the input failed: {e}"));
                        break;
                    }
                    Waited::Stopped => return self.errors.flush(),
                }
            }
            let Some(chain) = self.next_chain(&queue, &stop).await else {
                return self.errors.flush();
            };
            let mut writer = chain.writer(queue.memory());
            let n = writer.available_bytes().min(pending.len());
            let len = match writer.write_all_bytes(&pending[..n]) {
                Ok(()) => {
                    pending.drain(..n);
                    n as u32
                }
                Err(e) => {
                    self.errors
                        .log(format_args!("chain {}: {e}", chain.head_index()));
                    0
                }
            };
            if let Err(e) = queue.complete(chain.head_index(), len) {
                return self.fail(e, &stop).await;
            }
        }
        // End of input: nothing more will come.
        stop.await;
        self.errors.flush();
    }

    /// The queue cannot go on (its rings became inaccessible): wait to be stopped.
    async fn fail(&self, e: Error, stop: &StopSignal) {
        self.log(format_args!("queue stopped: {e}"));
        stop.clone().await;
        self.errors.flush();
    }
}

/// Up to [`INPUT_CHUNK`] bytes of input; empty at its end. A descriptor in non-blocking
/// mode (a terminal shared with a shell) is waited on for readiness.
async fn read_some(input: &AsyncFd) -> std::io::Result<Vec<u8>> {
    loop {
        let (res, bytes) = input.read(Vec::with_capacity(INPUT_CHUNK)).await;
        match res {
            Ok(n) => {
                let mut bytes = bytes;
                bytes.truncate(n);
                return Ok(bytes);
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                input.poll_readable().await?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl Device for Console {
    fn name(&self) -> &'static str {
        DeviceType::Console.name()
    }

    fn device_type(&self) -> u32 {
        DeviceType::Console.id()
    }

    fn num_queues(&self) -> usize {
        DeviceType::Console.default_queues()
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        if self.size.is_some() {
            VIRTIO_CONSOLE_F_SIZE
        } else {
            0
        }
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let size = self.size.unwrap_or(ConsoleSize { cols: 0, rows: 0 });
        let mut config = [0u8; CONFIG_SIZE];
        config[0..2].copy_from_slice(&size.cols.to_le_bytes());
        config[2..4].copy_from_slice(&size.rows.to_le_bytes());
        // max_nr_ports (valid with MULTIPORT only) and emerg_wr stay 0.
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn run_queue(
        self: Rc<Self>,
        index: usize,
        queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        match index {
            RECEIVEQ => Box::pin(self.receive(queue, stop)),
            TRANSMITQ => Box::pin(self.transmit(queue, stop)),
            // num_queues is 2: the server runs no other index.
            _ => Box::pin(stop),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use virtio::mock::{DeviceQueue, MockBuf};

    use super::*;

    #[test]
    fn transmit_chains_reach_the_output_in_order() {
        let mut f = DeviceQueue::new();
        let (out, mut host) = UnixStream::pair().unwrap();
        let console = Rc::new(Console::new(out.into(), None, None));
        let task = f.serve(console, TRANSMITQ);
        f.driver
            .add_chain(&[
                MockBuf::Readable(b"hello, ".to_vec()),
                MockBuf::Readable(b"hvc0".to_vec()),
            ])
            .unwrap();
        f.driver
            .add_chain(&[MockBuf::Readable(b"\r\n".to_vec())])
            .unwrap();
        f.kick.write(1).unwrap();
        let used = f.wait_used(2);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        let mut got = [0u8; 13];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, hvc0\r\n");
        f.stop_and_join(task);
    }

    #[test]
    fn input_fills_receive_buffers_and_what_does_not_fit_goes_to_the_next() {
        let mut f = DeviceQueue::new();
        let (out, _host_out) = UnixStream::pair().unwrap();
        let (input, mut host_in) = UnixStream::pair().unwrap();
        let console = Rc::new(Console::new(out.into(), Some(input.into()), None));
        let task = f.serve(console, RECEIVEQ);
        let a = f.driver.add_chain(&[MockBuf::Writable(4)]).unwrap();
        let b = f.driver.add_chain(&[MockBuf::Writable(16)]).unwrap();
        f.kick.write(1).unwrap();
        host_in.write_all(b"typed!").unwrap();
        let used = f.wait_used(2);
        assert_eq!(used, [(u32::from(a.head), 4), (u32::from(b.head), 2)]);
        assert_eq!(f.driver.read_writable(&a).unwrap(), b"type");
        assert_eq!(&f.driver.read_writable(&b).unwrap()[..2], b"d!");
        // End of input: the device stops reading, and stops when told to.
        drop(host_in);
        f.stop_and_join(task);
    }

    #[test]
    fn a_stop_while_input_is_awaited_ends_the_receive_task() {
        let f = DeviceQueue::new();
        let (out, _host_out) = UnixStream::pair().unwrap();
        let (input, _host_in) = UnixStream::pair().unwrap();
        let console = Rc::new(Console::new(out.into(), Some(input.into()), None));
        let task = f.serve(console, RECEIVEQ);
        f.ex.run_until(executor::sleep(Duration::from_millis(20)))
            .unwrap();
        f.stop_and_join(task);
    }

    #[test]
    fn a_gone_reader_discards_output_and_chains_still_complete() {
        let mut f = DeviceQueue::new();
        let (out, host) = UnixStream::pair().unwrap();
        drop(host);
        let console = Rc::new(Console::new(out.into(), None, None));
        let task = f.serve(console.clone(), TRANSMITQ);
        for _ in 0..3 {
            f.driver
                .add_chain(&[MockBuf::Readable(b"lost".to_vec())])
                .unwrap();
        }
        f.kick.write(1).unwrap();
        assert_eq!(f.wait_used(3).len(), 3);
        assert!(console.output_gone.get());
        f.stop_and_join(task);
    }

    #[test]
    fn a_malformed_chain_comes_back_empty_and_later_output_still_flows() {
        let mut f = DeviceQueue::new();
        let (out, mut host) = UnixStream::pair().unwrap();
        let console = Rc::new(Console::new(out.into(), None, None));
        let task = f.serve(console, TRANSMITQ);
        // A buffer outside guest memory.
        f.driver
            .write_desc(
                9,
                virtio::Descriptor {
                    addr: 0xffff_ffff_0000,
                    len: 8,
                    flags: 0,
                    next: 0,
                },
            )
            .unwrap();
        f.driver.publish(9).unwrap();
        let good = f
            .driver
            .add_chain(&[MockBuf::Readable(b"after".to_vec())])
            .unwrap();
        f.kick.write(1).unwrap();
        let used = f.wait_used(2);
        assert_eq!(used, [(9, 0), (u32::from(good.head), 0)]);
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after");
        f.stop_and_join(task);
    }

    #[test]
    fn size_is_offered_and_in_the_configuration_only_when_known() {
        let (out, _host) = UnixStream::pair().unwrap();
        let sized = Console::new(
            out.into(),
            None,
            Some(ConsoleSize {
                cols: 132,
                rows: 43,
            }),
        );
        assert_eq!(sized.features(), VIRTIO_CONSOLE_F_SIZE);
        let mut config = [0xffu8; 12];
        sized.read_config(0, &mut config);
        assert_eq!(config, [132, 0, 43, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut rows = [0u8; 2];
        sized.read_config(2, &mut rows);
        assert_eq!(u16::from_le_bytes(rows), 43);
        let (out, _host) = UnixStream::pair().unwrap();
        let plain = Console::new(out.into(), None, None);
        assert_eq!(plain.features(), 0);
        assert_eq!(
            (
                plain.name(),
                plain.device_type(),
                plain.num_queues(),
                plain.config_size()
            ),
            ("console", 3, 2, 12)
        );
    }
}
