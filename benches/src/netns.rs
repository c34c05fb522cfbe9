//! Network namespaces a bench makes for itself, held by an fd (no name under /var/run, so
//! nothing is left behind when the bench dies), and threads that work inside them.
//!
//! A namespace is per thread: [`Netns::enter`] moves only the calling thread, and what that
//! thread creates (sockets, taps opened from `/dev/net/tun`, child processes such as `ip` or
//! a device) belongs to the namespace it is in at that moment.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::thread::JoinHandle;

use crate::vnet::os_err;

/// A private network namespace: only `lo` (down), IPv6 off, TCP without slow start after
/// idle (a connection that waits between rounds starts the next one at full speed). It
/// lives as long as this value or anything inside it.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    /// Makes a new namespace (on a short-lived thread, so the caller stays where it is).
    pub fn new() -> Result<Netns, String> {
        std::thread::spawn(|| {
            // SAFETY: plain syscall; it moves only this thread, which ends below.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return os_err("unshare(CLONE_NEWNET) (root needed)");
            }
            // /proc/sys/net shows the namespace of the thread that opens it.
            for (path, value) in [
                ("ipv6/conf/all/disable_ipv6", "1"),
                ("ipv6/conf/default/disable_ipv6", "1"),
                ("ipv4/tcp_slow_start_after_idle", "0"),
            ] {
                fs::write(format!("/proc/sys/net/{path}"), value)
                    .map_err(|e| format!("{path} = {value}: {e}"))?;
            }
            let fd = fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
            Ok(Netns { fd: fd.into() })
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<(), String> {
        // SAFETY: plain syscall on a namespace fd we own.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return os_err("setns(CLONE_NEWNET)");
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| "a thread in the namespace panicked".to_owned())?
        })
    }

    /// Starts a thread inside the namespace; `f` runs only once it is there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<JoinHandle<Result<T, String>>, String> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| format!("dup a namespace fd: {e}"))?;
        Ok(std::thread::spawn(move || {
            Netns { fd }.enter()?;
            f()
        }))
    }
}
