//! A single-threaded io_uring executor.
//!
//! Every ringvm device process runs one [`Executor`]: tasks are `!Send` and live on the thread
//! that spawned them, I/O is submitted to one io_uring per thread, and wakers may be fired from
//! any thread (an eventfd read sits in the ring to wake it).
//!
//! I/O takes ownership of its buffers and gives them back with the result, so the kernel never
//! writes into memory that was freed: dropping an in-flight operation cancels it, and its
//! buffers stay with the executor until the kernel reports the operation complete.
//!
//! An operation is queued when it is created inside a running executor (and reaches the
//! kernel at the loop's next submission, batched with the others). One created while no
//! executor runs on the thread — the argument of [`Executor::run_until`], say — is queued at
//! its first poll instead; polled outside any executor it resolves to an error.
//!
//! Dropping the executor drops every task it can reach, cancels every operation in flight and
//! waits for the kernel to finish with each: nothing is freed while the kernel may use it.
//!
//! ```
//! use executor::{AsyncFd, Executor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ex = Executor::new()?;
//! let file = AsyncFd::new(std::fs::File::open("/proc/self/stat")?.into());
//! let (res, buf) = ex.run_until(file.read_at(vec![0u8; 64], 0));
//! assert!(res? > 0 && !buf.is_empty());
//! # Ok(())
//! # }
//! ```

pub mod budget;
mod buf;
mod driver;
mod eventfd;
mod fd;
mod ring_fd;
mod runtime;
mod socket;
mod time;

pub use buf::{dio_alignment, AlignedBuf, IoBuf, IoBufMut, IoVecs, IoVecsMut};
pub use eventfd::{EventFd, EventFdStream};
pub use fd::{nop, AsyncFd};
pub use runtime::{
    block_on, is_supported, probe, spawn, submit_now, yield_now, Builder, Executor, Home, Task,
    ALWAYS_ALLOWED_OPS, DEFAULT_MAX_IO_WORKERS,
};
pub use socket::{connect_unix, listen_unix, socketpair, RecvMsg};
pub use time::{sleep, timeout, Elapsed};

/// The io_uring opcodes, re-exported for [`Builder::allow_ops`].
pub use io_uring::opcode;

use std::io;

/// Errors building an executor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// io_uring cannot be used on this system (kernel support, sysctl or seccomp).
    #[error("io_uring is not available on this system")]
    Unsupported(#[source] io::Error),
    /// Creating the ring failed.
    #[error("failed to create the io_uring")]
    Setup(#[source] io::Error),
    /// IORING_REGISTER_RESTRICTIONS failed.
    #[error("failed to register the io_uring opcode restrictions")]
    RegisterRestrictions(#[source] io::Error),
    /// IORING_REGISTER_IOWQ_MAX_WORKERS failed.
    #[error("failed to bound the io_uring worker threads")]
    MaxIoWorkers(#[source] io::Error),
    /// IORING_REGISTER_FILES failed.
    #[error("failed to register files with the io_uring")]
    RegisterFiles(#[source] io::Error),
    /// IORING_REGISTER_ENABLE_RINGS failed.
    #[error("failed to enable the io_uring")]
    Enable(#[source] io::Error),
    /// Creating the eventfd that wakes the ring failed.
    #[error("failed to create the wake eventfd")]
    WakeEventFd(#[source] io::Error),
    /// The allowlist holds an opcode that can open or name a path, or open a socket.
    #[error("io_uring opcode {0} can reach paths or open sockets and may not be allowed")]
    ForbiddenOpcode(u8),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
