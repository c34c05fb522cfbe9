//! The executor: run queues, the loop, and ring set-up.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, ThreadId};

use io_uring::{opcode, register::Restriction, squeue, IoUring};

use crate::budget;
use crate::driver::{Driver, DriverRef};
use crate::ring_fd;
use crate::{Error, Result};

/// A spawned task: await it for its output, `detach()` it to let it run on, or drop it to
/// cancel it.
pub type Task<T> = async_task::Task<T, Home>;

/// The executor a task belongs to, kept in the task itself (opaque).
///
/// There, and not in the task's schedule function, it leaves that function without data, and
/// a waker consumed by `wake` then hands its reference to the scheduled task. With data, the
/// task takes a new reference and the waker drops its own: two atomic operations more on
/// every wake, which is every completion an operation's task waits for.
pub struct Home(Arc<Shared>);

impl fmt::Debug for Home {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Home").field(&self.0.id).finish()
    }
}

type Runnable = async_task::Runnable<Home>;

/// Opcodes the executor itself uses, allowed in every restricted ring: the read that wakes
/// the ring from other threads, and the cancellation of dropped operations.
pub const ALWAYS_ALLOWED_OPS: [u8; 3] = [
    opcode::Read::CODE,
    opcode::AsyncCancel::CODE,
    opcode::Nop::CODE,
];

/// Opcodes that open or name a path, or open a socket or a connection: never allowed in a
/// restricted ring, whose purpose is that the process cannot reach anything new (seccomp does
/// not see io_uring operations, so a path op here would bypass the sandbox's syscall policy).
const FORBIDDEN_OPS: [u8; 15] = [
    opcode::OpenAt::CODE,
    opcode::OpenAt2::CODE,
    opcode::Statx::CODE,
    opcode::RenameAt::CODE,
    opcode::UnlinkAt::CODE,
    opcode::MkDirAt::CODE,
    opcode::SymlinkAt::CODE,
    opcode::LinkAt::CODE,
    opcode::GetXattr::CODE,
    opcode::SetXattr::CODE,
    opcode::Socket::CODE,
    opcode::Connect::CODE,
    opcode::Accept::CODE,
    opcode::Bind::CODE,
    opcode::Listen::CODE,
];

/// Default bound on the io-wq worker threads of the thread that builds an executor:
/// `[bounded, unbounded]`, see [`Builder::max_io_workers`].
///
/// Bounded workers run blocking work on regular files and block devices: a flush, a write
/// to a file system without NOWAIT support, a read or write the block layer could not queue.
/// Eight keep eight such operations of a device in the disk at once, which is what the kernel
/// itself gives a 2-CPU host (4 per CPU, at most the ring's size); on a 64-CPU host its
/// default is 256 threads per device process. Unbounded workers run operations on other
/// files that can neither complete at once nor wait on poll. Taps, sockets, pipes and
/// eventfds all wait on poll, so a device needs none in the common case; without a bound
/// their number follows RLIMIT_NPROC, and a guest that keeps such operations blocked could
/// make a device process grow a thread for each. Work beyond a bound waits in the io-wq
/// queue for a worker; it is not refused.
pub const DEFAULT_MAX_IO_WORKERS: [u32; 2] = [8, 8];

/// How many queued tasks run before the loop looks at the ring again.
const TASK_BUDGET: usize = 256;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// The part of an executor other threads can reach: the remote run queue and the eventfd
/// that wakes the ring.
struct Shared {
    id: usize,
    /// The thread the executor (and every task on it) belongs to.
    owner: ThreadId,
    /// Set when the executor is dropped: a task scheduled afterwards can never run again.
    closed: AtomicBool,
    remote: Mutex<VecDeque<Runnable>>,
    /// Set (under the lock) when `remote` gets a task, cleared when it is drained.
    remote_pending: AtomicBool,
    /// Set while the executor blocks in the ring: a remote wake must write the eventfd.
    sleeping: AtomicBool,
    /// Owned here, not by the driver: a waker on another thread may outlive the executor,
    /// and must never write to a closed (or reused) descriptor.
    wake_fd: OwnedFd,
}

/// The schedule function of every task: queues the task on its executor.
#[inline]
fn schedule(runnable: Runnable) {
    let shared = &runnable.metadata().0;
    if shared.closed.load(Ordering::Acquire) && thread::current().id() == shared.owner {
        // The executor is gone and will never run this task: drop its future now, on its
        // own thread (a `Task` handle dropped after the executor, say). Queued instead, the
        // task would keep its executor's `Shared` alive through its metadata, and leak both.
        drop(runnable);
        return;
    }
    let mut runnable = Some(runnable);
    // Fails only while this thread's locals are destroyed: it runs no executor then.
    let _ = CURRENT.try_with(|cur| {
        if let (Some(inner), Some(r)) = (&*cur.borrow(), &runnable) {
            if Arc::ptr_eq(&inner.shared, &r.metadata().0) {
                if let Some(r) = runnable.take() {
                    inner.local.borrow_mut().push_back(r);
                }
            }
        }
    });
    if let Some(runnable) = runnable {
        let shared = runnable.metadata().0.clone();
        let mut remote = shared.remote.lock().unwrap_or_else(|e| e.into_inner());
        remote.push_back(runnable);
        // SeqCst: ordered before `notify`'s swap of `sleeping` (see `Inner::park`).
        shared.remote_pending.store(true, Ordering::SeqCst);
        drop(remote);
        shared.notify();
    }
}

impl Shared {
    /// Wakes the ring if the executor is blocked in it.
    fn notify(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to the eventfd `self` owns.
            unsafe { libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

struct Inner {
    /// Declared first: the driver reads the wake eventfd that `shared` owns.
    driver: DriverRef,
    local: RefCell<VecDeque<Runnable>>,
    shared: Arc<Shared>,
    /// The io-wq worker limits the kernel reported once the bound was set.
    io_workers: Option<[u32; 2]>,
    /// Whether the ring was set up with COOP_TASKRUN (see [`Executor::coop_taskrun`]).
    coop_taskrun: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Inner>>> = const { RefCell::new(None) };
}

/// The driver of the executor running on this thread.
#[inline]
pub(crate) fn current_driver() -> io::Result<DriverRef> {
    // Fails only while this thread's locals are destroyed: no executor runs then.
    CURRENT
        .try_with(|cur| cur.borrow().as_ref().map(|inner| inner.driver.clone()))
        .ok()
        .flatten()
        .ok_or_else(|| io::Error::other("no executor is running on this thread"))
}

/// Hands the operations queued so far on this thread's executor to the kernel now, without
/// waiting for any. The executor does so anyway once its tasks have run; this is for a task
/// that queues many operations in one turn and wants the first ones started while it makes
/// the rest (a disk works on its first requests while the device reads the others). Does
/// nothing when none is queued or no executor runs on this thread (nor from code the
/// executor runs while it holds its ring: a waker, a drop of an operation). An error leaves
/// the operations queued for the executor's next submission.
pub fn submit_now() -> io::Result<()> {
    let Ok(driver) = current_driver() else {
        return Ok(());
    };
    let Ok(mut d) = driver.try_borrow_mut() else {
        return Ok(());
    };
    if d.has_queued() {
        d.submit()
    } else {
        Ok(())
    }
}

/// Makes `inner` the current executor until dropped; restores the previous one.
struct Enter {
    prev: Option<Rc<Inner>>,
    /// False when this thread's locals were already destroyed (an executor dropped from a
    /// thread-local's destructor): nothing was entered, and nothing is restored.
    entered: bool,
}

impl Enter {
    fn new(inner: &Rc<Inner>) -> Enter {
        match CURRENT.try_with(|cur| cur.borrow_mut().replace(inner.clone())) {
            Ok(prev) => Enter {
                prev,
                entered: true,
            },
            Err(_) => Enter {
                prev: None,
                entered: false,
            },
        }
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        if !self.entered {
            return;
        }
        let prev = self.prev.take();
        // The replaced executor is dropped after the borrow ends. Entered, the local
        // outlives this guard: it is destroyed only after the code that entered returns.
        drop(CURRENT.try_with(|cur| cur.replace(prev)));
    }
}

/// Builds an [`Executor`].
#[derive(Debug, Clone)]
pub struct Builder {
    entries: u32,
    allowed_ops: Option<Vec<u8>>,
    files: Vec<RawFd>,
    max_io_workers: Option<[u32; 2]>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            entries: 256,
            allowed_ops: None,
            files: Vec::new(),
            max_io_workers: Some(DEFAULT_MAX_IO_WORKERS),
        }
    }
}

impl Builder {
    /// A builder with 256 submission queue entries and no restrictions.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Submission queue size (rounded up to a power of two by the kernel).
    pub fn entries(mut self, entries: u32) -> Builder {
        self.entries = entries;
        self
    }

    /// Restricts the ring to these opcodes (plus [`ALWAYS_ALLOWED_OPS`]) with
    /// IORING_REGISTER_RESTRICTIONS; no registration is allowed once the ring is enabled.
    /// Opcodes that open or name paths, or open sockets or connections, are refused by
    /// `build` ([`crate::Error::ForbiddenOpcode`]).
    pub fn allow_ops(mut self, ops: &[u8]) -> Builder {
        self.allowed_ops = Some(ops.to_vec());
        self
    }

    /// Bounds the io-wq worker threads that run operations which cannot complete at once:
    /// `[bounded, unbounded]` (IORING_REGISTER_IOWQ_MAX_WORKERS, registered before the
    /// restrictions, which allow no registration afterwards); `None` keeps the kernel's
    /// defaults. The io-wq belongs to the thread, so the bound holds for every ring of the
    /// thread that builds this one. Default: [`DEFAULT_MAX_IO_WORKERS`].
    pub fn max_io_workers(mut self, max: Option<[u32; 2]>) -> Builder {
        self.max_io_workers = max;
        self
    }

    /// Registers these files; [`crate::AsyncFd::fixed`] then refers to them by index.
    pub fn register_files(mut self, fds: &[RawFd]) -> Builder {
        self.files = fds.to_vec();
        self
    }

    /// Creates the ring (disabled when restricted), registers the restrictions and the files,
    /// enables it, and arms the wake eventfd.
    pub fn build(self) -> Result<Executor> {
        if let Some(ops) = &self.allowed_ops {
            if let Some(op) = ops.iter().find(|op| FORBIDDEN_OPS.contains(op)) {
                return Err(Error::ForbiddenOpcode(*op));
            }
        }
        let mut b = IoUring::<squeue::Entry>::builder();
        if self.allowed_ops.is_some() {
            b.setup_r_disabled();
        }
        // COOP_TASKRUN: a completion of work the kernel finished elsewhere (an io-wq worker, a
        // poll that fired) waits for this thread's next entry into the kernel instead of an
        // interrupt (a reschedule IPI) that stops it wherever it runs. A thread that sleeps
        // in the ring is still woken. TASKRUN_FLAG says in the SQ flags that some wait, so a
        // busy executor enters to post them (`Driver::needs_enter`). The IPIs cost a device
        // half its CPU per request on fast disks (the block bench's `fast/` cases).
        let (ring, coop_taskrun) = match b
            .clone()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(self.entries)
        {
            Ok(ring) => (ring, true),
            // Kernels before 5.19 know neither flag: the ring works without them.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                b.build(self.entries)
                    .map_err(|e| classify_setup_error(e, Error::Setup))?,
                false,
            ),
            Err(e) => return Err(classify_setup_error(e, Error::Setup)),
        };
        let submitter = ring.submitter();
        let io_workers = match self.max_io_workers {
            Some(max) => {
                // A zero leaves a limit as it is: the kernel would read it as "unchanged".
                let mut limits = max.map(|m| m.max(1));
                submitter
                    .register_iowq_max_workers(&mut limits)
                    .map_err(Error::MaxIoWorkers)?;
                // Zeroes change nothing and read the limits back as the kernel holds them.
                let mut now = [0; 2];
                submitter
                    .register_iowq_max_workers(&mut now)
                    .map_err(Error::MaxIoWorkers)?;
                Some(now)
            }
            None => None,
        };
        if let Some(ops) = &self.allowed_ops {
            let mut res: Vec<Restriction> = ops
                .iter()
                .chain(ALWAYS_ALLOWED_OPS.iter())
                .map(|op| Restriction::sqe_op(*op))
                .collect();
            res.push(Restriction::sqe_flags_allowed(
                (squeue::Flags::FIXED_FILE | squeue::Flags::ASYNC | squeue::Flags::IO_LINK).bits(),
            ));
            // The driver gives the ring's slot in the thread's table back when it drops.
            res.push(Restriction::register_op(ring_fd::UNREGISTER_RING_FDS as u8));
            submitter
                .register_restrictions(&mut res)
                .map_err(Error::RegisterRestrictions)?;
        }
        if !self.files.is_empty() {
            submitter
                .register_files(&self.files)
                .map_err(Error::RegisterFiles)?;
        }
        // Blocking on purpose: on some kernels io_uring completes reads of O_NONBLOCK files
        // with EAGAIN instead of waiting for data.
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::WakeEventFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Registered with this thread before the ring is enabled, while a restricted ring
        // still allows it; the driver gives the slot back. Without a slot (all 16 taken, or a
        // kernel before 5.18) the ring is entered by its descriptor.
        let registered = ring_fd::register(ring.as_raw_fd());
        if self.allowed_ops.is_some() {
            if let Err(e) = submitter.register_enable_rings() {
                if let Some(index) = registered {
                    // Best effort: the error below is what the caller needs to know.
                    let _ = ring_fd::unregister(ring.as_raw_fd(), index);
                }
                return Err(Error::Enable(e));
            }
        }
        let driver = Rc::new(RefCell::new(Driver::new(
            ring,
            wake_fd.as_raw_fd(),
            registered,
        )));
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            owner: thread::current().id(),
            closed: AtomicBool::new(false),
            remote: Mutex::new(VecDeque::new()),
            remote_pending: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            wake_fd,
        });
        Ok(Executor {
            inner: Rc::new(Inner {
                driver,
                local: RefCell::new(VecDeque::new()),
                shared,
                io_workers,
                coop_taskrun,
            }),
        })
    }
}

fn classify_setup_error(e: io::Error, other: fn(io::Error) -> Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) => Error::Unsupported(e),
        _ => other(e),
    }
}

/// Checks that io_uring can be used here: the sysctl allows it and a ring can be created.
pub fn probe() -> Result<()> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if s.trim() == "2" {
            return Err(Error::Unsupported(io::Error::other(
                "disabled by kernel.io_uring_disabled=2",
            )));
        }
    }
    IoUring::<squeue::Entry>::new(2)
        .map(drop)
        .map_err(|e| classify_setup_error(e, Error::Unsupported))
}

/// Whether io_uring can be used here (see [`probe`] for the reason when it cannot).
pub fn is_supported() -> bool {
    probe().is_ok()
}

/// A single-threaded io_uring executor. See the crate documentation.
pub struct Executor {
    inner: Rc<Inner>,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("id", &self.inner.shared.id)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor with default settings.
    pub fn new() -> Result<Executor> {
        Builder::new().build()
    }

    /// The io-wq worker limits `[bounded, unbounded]` of the thread that built this
    /// executor, as the kernel reported them right after [`Builder::max_io_workers`] set
    /// them; `None` when the builder kept the kernel's defaults.
    pub fn max_io_workers(&self) -> Option<[u32; 2]> {
        self.inner.io_workers
    }

    /// Whether the ring runs with COOP_TASKRUN (kernels from 5.19): completions never
    /// interrupt the thread, they wait for its next entry into the kernel.
    pub fn coop_taskrun(&self) -> bool {
        self.inner.coop_taskrun
    }

    /// Whether the ring is registered with this thread (Linux 5.18, and a free slot among
    /// the thread's 16): then every `io_uring_enter` names it by that slot, which spares the
    /// kernel a descriptor lookup per entry. The slot is given back when the executor drops.
    pub fn ring_registered(&self) -> bool {
        self.inner.driver.borrow().registered()
    }

    /// Spawns a task on this executor. It runs when the executor runs.
    pub fn spawn<F>(&self, future: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        spawn_on(&self.inner, future)
    }

    /// Runs the executor, with every spawned task, until `future` completes.
    pub fn run_until<F: Future>(&self, future: F) -> F::Output {
        let _enter = Enter::new(&self.inner);
        let inner = &*self.inner;
        let main = Arc::new(MainWaker {
            woken: AtomicBool::new(true),
            shared: inner.shared.clone(),
        });
        let waker = Waker::from(main.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        let mut wakers = Vec::new();
        let mut garbage = Vec::new();
        let outer = budget::fresh();
        loop {
            // A plain load first: the locked swap only when the flag is set.
            if main.woken.load(Ordering::Acquire) && main.woken.swap(false, Ordering::AcqRel) {
                budget::set(budget::PER_POLL);
                if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                    budget::set(outer);
                    return out;
                }
            }
            inner.run_tasks();
            let has_work =
                inner.reap_and_wake(&mut wakers, &mut garbage) || !inner.local.borrow().is_empty();
            if has_work || main.woken.load(Ordering::Acquire) {
                let mut d = inner.driver.borrow_mut();
                if d.needs_enter() {
                    if let Err(e) = d.submit() {
                        panic!("io_uring submission failed: {e}");
                    }
                }
            } else {
                inner.park(&main);
                // What the wait brought goes to the run queue now, not one turn later.
                inner.reap_and_wake(&mut wakers, &mut garbage);
            }
        }
    }

    /// Spawns nothing; runs queued tasks until none is runnable, and returns.
    pub fn run_until_stalled(&self) {
        let _enter = Enter::new(&self.inner);
        let mut wakers = Vec::new();
        let mut garbage = Vec::new();
        loop {
            self.inner.run_tasks();
            {
                let mut d = self.inner.driver.borrow_mut();
                if d.needs_enter() {
                    // An op the kernel did not take stays queued for the next turn.
                    let _ = d.submit();
                }
                d.reap();
                d.take_ready(&mut wakers, &mut garbage);
            }
            garbage.clear();
            let idle = wakers.is_empty()
                && self.inner.local.borrow().is_empty()
                && self
                    .inner
                    .shared
                    .remote
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty();
            for w in wakers.drain(..) {
                w.wake();
            }
            if idle {
                return;
            }
        }
    }
}

impl Inner {
    /// Takes the completions from the ring and wakes their tasks (with the driver released:
    /// a waker may run any code); frees what completed ignored ops held. Whether any task
    /// was woken.
    fn reap_and_wake(
        &self,
        wakers: &mut Vec<Waker>,
        garbage: &mut Vec<Box<dyn std::any::Any>>,
    ) -> bool {
        {
            let mut d = self.driver.borrow_mut();
            d.reap();
            d.take_ready(wakers, garbage);
        }
        garbage.clear();
        let woke = !wakers.is_empty();
        for w in wakers.drain(..) {
            w.wake();
        }
        woke
    }

    /// Runs up to TASK_BUDGET queued tasks, taking in the remote queue first.
    fn run_tasks(&self) {
        // The flag spares the lock on the common path, where no other thread woke anything.
        if self.shared.remote_pending.load(Ordering::Acquire) {
            let mut remote = self.shared.remote.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.remote_pending.store(false, Ordering::Release);
            self.local.borrow_mut().extend(remote.drain(..));
        }
        let outer = budget::fresh();
        for _ in 0..TASK_BUDGET {
            let Some(runnable) = self.local.borrow_mut().pop_front() else {
                break;
            };
            budget::set(budget::PER_POLL);
            runnable.run();
            if !budget::left() {
                // It spent its whole share and is queued again, behind the others: look at
                // the ring before the next round, so I/O completions are not held back by a
                // task that always has work (a guest that keeps a queue full of chains).
                break;
            }
        }
        budget::set(outer);
    }

    /// Blocks in the ring until a completion or a wake arrives.
    fn park(&self, main: &MainWaker) {
        let mut d = self.driver.borrow_mut();
        if let Err(e) = d.arm_wake() {
            panic!("io_uring submission failed: {e}");
        }
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // A full submission queue makes `push` submit, which may have reaped completions.
        // The remote queue's flag, not its lock: a task queued before `sleeping` was set is
        // seen here (both SeqCst), one queued after it writes the eventfd.
        let woken = d.has_ready()
            || main.woken.load(Ordering::SeqCst)
            || self.shared.remote_pending.load(Ordering::SeqCst);
        let res = if woken {
            d.submit()
        } else {
            d.submit_and_wait()
        };
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = res {
            panic!("io_uring wait failed: {e}");
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _enter = Enter::new(&self.inner);
        // From now on a task scheduled on this thread is dropped at once (see `schedule`).
        self.inner.shared.closed.store(true, Ordering::SeqCst);
        loop {
            self.inner.drop_tasks();
            // Afterwards the kernel holds no pointer into this process.
            self.inner.driver.borrow_mut().shutdown();
            let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
            self.inner
                .driver
                .borrow_mut()
                .take_ready(&mut wakers, &mut garbage);
            if wakers.is_empty() && garbage.is_empty() {
                break;
            }
            // Either may run code that spawns or submits again: go round once more.
            for waker in wakers {
                waker.wake();
            }
            drop(garbage);
        }
    }
}

impl Inner {
    /// Drops every task of a closed executor: queued ones directly; those waiting on an
    /// operation by waking them, which schedules them, which drops them. A task that waits on
    /// another task is woken when that one is dropped, so chains unwind too; waking rather
    /// than dropping the wakers also reaches tasks whose `Task` handle is still held. Their
    /// operations become ignored.
    fn drop_tasks(&self) {
        loop {
            let mut runnables: Vec<Runnable> = self.local.borrow_mut().drain(..).collect();
            runnables.extend(
                self.shared
                    .remote
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..),
            );
            let wakers = self.driver.borrow_mut().take_waiting_wakers();
            if runnables.is_empty() && wakers.is_empty() {
                break;
            }
            drop(runnables);
            for waker in wakers {
                waker.wake();
            }
        }
    }
}

fn spawn_on<F>(inner: &Rc<Inner>, future: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let home = Home(inner.shared.clone());
    let (runnable, task) = async_task::Builder::new()
        .metadata(home)
        .spawn_local(move |_| future, schedule);
    runnable.schedule();
    task
}

/// Spawns a task on the executor running on this thread.
///
/// # Panics
/// When no executor runs on this thread: spawning is only meaningful from inside one.
pub fn spawn<F>(future: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let inner = CURRENT
        .try_with(|cur| cur.borrow().clone())
        .ok()
        .flatten()
        .expect("executor::spawn called outside a running executor");
    spawn_on(&inner, future)
}

/// Runs `future` to completion on a new executor with default settings.
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    Ok(Executor::new()?.run_until(future))
}

/// Yields once to the other runnable tasks.
pub async fn yield_now() {
    let yielded = Cell::new(false);
    std::future::poll_fn(|cx| {
        if yielded.replace(true) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Waker of the future passed to `run_until`.
struct MainWaker {
    woken: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.shared.notify();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Whether `fd` has something to read, without reading it.
    fn readable(fd: &OwnedFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        assert!(unsafe { libc::poll(&mut pfd, 1, 0) } >= 0);
        pfd.revents & libc::POLLIN != 0
    }

    /// Whether the running kernel is at least `major.minor`.
    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
        let (Some(Ok(ma)), Some(Ok(mi))) = (parts.next(), parts.next()) else {
            panic!("unparsed kernel release {release:?}");
        };
        (ma, mi) >= (major, minor)
    }

    #[test]
    fn rings_run_with_coop_taskrun_where_the_kernel_has_it() {
        let plain = Executor::new().unwrap();
        let restricted = Builder::new()
            .allow_ops(&[io_uring::opcode::Read::CODE])
            .build()
            .unwrap();
        let expected = kernel_at_least(5, 19);
        assert_eq!(plain.coop_taskrun(), expected);
        assert_eq!(restricted.coop_taskrun(), expected);
        // Work still completes: a read of an eventfd another thread writes.
        let fd = crate::EventFd::new().unwrap();
        let writer = fd.try_clone().unwrap();
        let mut stream = fd.into_stream();
        let t = std::thread::spawn(move || writer.write(7).unwrap());
        assert_eq!(restricted.run_until(stream.next_value()).unwrap(), 7);
        t.join().unwrap();
    }

    #[test]
    fn forbidden_ops_are_never_always_allowed() {
        for op in ALWAYS_ALLOWED_OPS {
            assert!(!FORBIDDEN_OPS.contains(&op));
        }
    }

    #[test]
    fn notify_writes_the_eventfd_only_while_sleeping() {
        let ex = Executor::new().unwrap();
        let shared = &ex.inner.shared;
        shared.notify();
        assert!(!readable(&shared.wake_fd), "awake: no syscall");
        shared.sleeping.store(true, Ordering::SeqCst);
        shared.notify();
        assert!(readable(&shared.wake_fd));
        assert!(
            !shared.sleeping.load(Ordering::SeqCst),
            "one write per sleep"
        );
    }

    #[test]
    fn remote_wake_reaches_an_executor_blocked_in_the_ring() {
        let ex = Executor::new().unwrap();
        let shared = ex.inner.shared.clone();
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let f = flag.clone();
        let t = thread::spawn(move || {
            let waker = rx.recv().unwrap();
            // Wait until the executor is parked in io_uring_enter, then wake it.
            while !shared.sleeping.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            f.store(true, Ordering::SeqCst);
            waker.wake();
        });
        let mut tx = Some(tx);
        let task = ex.spawn(std::future::poll_fn(move |cx| {
            if flag.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            if let Some(tx) = tx.take() {
                tx.send(cx.waker().clone()).unwrap();
            }
            Poll::Pending
        }));
        ex.run_until(task);
        t.join().unwrap();
    }

    #[test]
    fn schedule_from_another_thread_goes_to_the_remote_queue() {
        let ex = Executor::new().unwrap();
        let task = ex.spawn(async { 5 });
        // Spawned outside `run_until`: nothing is current, so it was queued remotely.
        assert_eq!(ex.inner.shared.remote.lock().unwrap().len(), 1);
        let shared = ex.inner.shared.clone();
        let ran = ex.run_until(async move {
            let (runnable, task) = async_task::Builder::new()
                .metadata(Home(shared.clone()))
                .spawn(|_| async { 6 }, schedule);
            std::thread::spawn(move || runnable.schedule())
                .join()
                .unwrap();
            task.await
        });
        assert_eq!(ran, 6);
        assert_eq!(ex.run_until(task), 5);
        assert!(ex.inner.local.borrow().is_empty());
    }

    #[test]
    fn tasks_scheduled_after_the_executor_is_dropped_are_dropped() {
        let ex = Executor::new().unwrap();
        let shared = ex.inner.shared.clone();
        let token = Arc::new(());
        let t = token.clone();
        let (runnable, task) = async_task::Builder::new()
            .metadata(Home(shared.clone()))
            .spawn_local(move |_| async move { drop(t) }, schedule);
        drop(ex);
        assert!(shared.closed.load(Ordering::SeqCst));
        runnable.schedule();
        assert_eq!(Arc::strong_count(&token), 1, "dropped, not queued");
        assert!(shared.remote.lock().unwrap().is_empty());
        drop(task);
    }

    #[test]
    fn yield_now_is_pending_exactly_once() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut y = Box::pin(yield_now());
        assert!(y.as_mut().poll(&mut cx).is_pending());
        assert!(y.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn current_driver_is_set_only_inside_the_executor() {
        assert!(current_driver().is_err());
        let ex = Executor::new().unwrap();
        ex.run_until(async { assert!(current_driver().is_ok()) });
        assert!(current_driver().is_err());
    }

    #[test]
    fn nested_enter_restores_the_outer_executor() {
        let a = Executor::new().unwrap();
        let b = Executor::new().unwrap();
        a.run_until(async {
            let outer = current_driver().unwrap();
            b.run_until(async {
                assert!(!Rc::ptr_eq(&current_driver().unwrap(), &outer));
            });
            assert!(Rc::ptr_eq(&current_driver().unwrap(), &outer));
        });
    }
}
