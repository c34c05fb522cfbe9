//! virtio-rng (virtio 1.2 §5.4): one queue whose writable buffers the device fills with
//! entropy, read by io_uring from an entropy fd (`/dev/urandom`, opened by the caller)
//! straight into guest memory.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::{pin, Pin};
use std::rc::Rc;

use executor::AsyncFd;
use futures::future::{select, Either};

use crate::process::{DeviceProcess, Made, MakeError};
use crate::vhost_user::{Device, StopSignal};
use crate::{AsyncQueue, DescriptorChain, DeviceType, Error, GuestLog};

/// The most bytes one chain gets.
pub const MAX_CHAIN_BYTES: usize = 64 << 10;
/// The queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio entropy device.
#[derive(Debug)]
pub struct Rng {
    entropy: AsyncFd,
    /// Malformed chains (rate-limited: the guest sends as many as it likes).
    errors: GuestLog,
}

impl Rng {
    /// A device reading from `entropy` (a blocking fd: `/dev/urandom`).
    pub fn new(entropy: OwnedFd) -> Rng {
        Rng {
            entropy: AsyncFd::new(entropy),
            errors: GuestLog::new("rng"),
        }
    }

    fn log(&self, what: impl std::fmt::Display) {
        crate::log::write("ringvm device rng", crate::log::Level::Error, what);
    }

    /// Fills the chain's writable buffers (up to [`MAX_CHAIN_BYTES`]); returns the used length.
    async fn fill(&self, queue: &AsyncQueue, chain: &DescriptorChain) -> u32 {
        let writer = chain.writer(queue.memory());
        let want = writer.available_bytes().min(MAX_CHAIN_BYTES);
        if want == 0 {
            return 0;
        }
        let iovecs = match writer.iovecs(want) {
            Ok(iovecs) => iovecs,
            Err(e) => {
                self.errors
                    .log(format_args!("chain {}: {e}", chain.head_index()));
                return 0;
            }
        };
        // Offset 0: a character device ignores it.
        match self.entropy.read_mem_at(iovecs, 0).await.0 {
            // At most `want`, which is at most MAX_CHAIN_BYTES.
            Ok(n) => n.min(want) as u32,
            Err(e) => {
                self.log(format_args!("reading entropy failed: {e}"));
                0
            }
        }
    }

    async fn run(self: Rc<Self>, queue: Rc<AsyncQueue>, stop: StopSignal) {
        loop {
            let next = pin!(queue.next_valid_chain(|head, reason| {
                self.errors
                    .log(format_args!("invalid chain at head {head}: {reason}"));
                crate::stats::stats().request(0, 0);
                crate::stats::stats().error(0);
            }));
            let chain = match select(next, stop.clone()).await {
                Either::Left((Ok(chain), _)) => chain,
                Either::Left((Err(e), _)) => return self.fail(e, stop).await,
                Either::Right(((), _)) => {
                    self.errors.flush();
                    return;
                }
            };
            let len = self.fill(&queue, &chain).await;
            crate::stats::stats().request(0, u64::from(len));
            if let Err(e) = queue.complete(chain.head_index(), len) {
                return self.fail(e, stop).await;
            }
        }
    }

    /// The queue cannot go on (its rings became inaccessible): wait to be stopped.
    async fn fail(&self, e: Error, stop: StopSignal) {
        self.log(format_args!("queue stopped: {e}"));
        stop.await;
        self.errors.flush();
    }
}

impl Device for Rng {
    fn name(&self) -> &'static str {
        DeviceType::Rng.name()
    }

    fn device_type(&self) -> u32 {
        DeviceType::Rng.id()
    }

    fn num_queues(&self) -> usize {
        DeviceType::Rng.default_queues()
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        0
    }

    fn run_queue(
        self: Rc<Self>,
        _index: usize,
        queue: Rc<AsyncQueue>,
        _acked_features: u64,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(self.run(queue, stop))
    }
}

/// `ringvm device rng`: no options of its own.
#[derive(argh::FromArgs, Debug, PartialEq, Eq)]
#[argh(description = "virtio-rng: entropy from the host's /dev/urandom")]
pub struct RngOptions {}

/// virtio-rng as a device process.
#[derive(Debug)]
pub struct RngProcess;

impl DeviceProcess for RngProcess {
    const TYPE: DeviceType = DeviceType::Rng;
    /// Entropy is read straight into guest buffers.
    const OPS: &'static [u8] = &[executor::opcode::Readv::CODE];
    type Options = RngOptions;
    type Device = Rng;

    fn make(
        _options: &RngOptions,
        _inherit: &mut dyn FnMut(i32) -> std::io::Result<OwnedFd>,
    ) -> Result<Made<Rng>, MakeError> {
        let entropy = std::fs::File::open("/dev/urandom")
            .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
        Ok(Made::alone(Rng::new(entropy.into())))
    }

    fn to_args(_options: &RngOptions) -> Vec<std::ffi::OsString> {
        Vec::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::mock::{DeviceQueue, MockBuf};

    #[test]
    fn writable_buffers_get_exactly_the_entropy_fd_bytes() {
        let mut f = DeviceQueue::new();
        let (source, mut feed) = UnixStream::pair().unwrap();
        let rng = Rc::new(Rng::new(source.into()));
        let task = f.serve(rng, 0);
        let pattern: Vec<u8> = (0..48).collect();
        feed.write_all(&pattern).unwrap();
        let sent = f
            .driver
            .add_chain(&[
                MockBuf::Readable(vec![7; 4]),
                MockBuf::Writable(16),
                MockBuf::Writable(32),
            ])
            .unwrap();
        f.kick.write(1).unwrap();
        assert_eq!(f.wait_used(1), [(u32::from(sent.head), 48)]);
        assert_eq!(f.driver.read_writable(&sent).unwrap(), pattern);
        f.stop_and_join(task);
    }

    #[test]
    fn urandom_read_at_offset_zero_fills_chains_and_no_writable_buffer_gets_zero() {
        let mut f = DeviceQueue::new();
        let rng = Rc::new(Rng::new(File::open("/dev/urandom").unwrap().into()));
        let task = f.serve(rng, 0);
        let big = f.driver.add_chain(&[MockBuf::Writable(4096)]).unwrap();
        let none = f
            .driver
            .add_chain(&[MockBuf::Readable(vec![1; 16])])
            .unwrap();
        f.kick.write(1).unwrap();
        let used = f.wait_used(2);
        assert_eq!(
            used,
            [(u32::from(big.head), 4096), (u32::from(none.head), 0)]
        );
        f.stop_and_join(task);
    }

    #[test]
    fn invalid_chain_completes_empty_and_the_queue_goes_on() {
        let mut f = DeviceQueue::new();
        let rng = Rc::new(Rng::new(File::open("/dev/urandom").unwrap().into()));
        let task = f.serve(rng, 0);
        f.driver
            .write_desc(
                9,
                crate::Descriptor {
                    addr: 0xffff_ffff_0000,
                    len: 8,
                    flags: crate::queue::desc::VIRTQ_DESC_F_WRITE,
                    next: 0,
                },
            )
            .unwrap();
        f.driver.publish(9).unwrap();
        let good = f.driver.add_chain(&[MockBuf::Writable(8)]).unwrap();
        f.kick.write(1).unwrap();
        let used = f.wait_used(2);
        assert_eq!(used, [(9, 0), (u32::from(good.head), 8)]);
        f.stop_and_join(task);
    }

    #[test]
    fn device_identity() {
        let rng = Rng::new(File::open("/dev/urandom").unwrap().into());
        assert_eq!(
            (
                rng.name(),
                rng.device_type(),
                rng.num_queues(),
                rng.max_queue_size()
            ),
            ("rng", 4, 1, 256)
        );
        assert_eq!(rng.features(), 0);
        assert_eq!(rng.config_size(), 0);
    }
}
