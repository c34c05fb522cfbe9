//! Where the GDB session and the vCPU threads meet.
//!
//! The vCPU fds stay on their threads: the session asks a *parked* vCPU for registers and
//! memory through [`Debugger::request`], and the vCPU thread serves those requests in
//! [`Debugger::checkpoint`] until the session resumes it.
//!
//! All-stop: when one vCPU stops (a breakpoint, a step, a watchpoint) or GDB interrupts, every
//! vCPU is kicked out of `KVM_RUN` and parks at the top of its loop. The `halt` flag is the
//! only thing a running vCPU reads per loop turn. Resuming clears it: every vCPU GDB lets run
//! (all of them unless GDB locks the scheduler) leaves its park and loads the debug registers
//! and flags of the current breakpoints before it enters `KVM_RUN` again.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::VcpuFd;

use super::breakpoints::{Breakpoints, Slot};
use super::regs::Regs;
use crate::guest::GuestRam;
use crate::sys;

const PAGE: u64 = 4096;
/// DR6.BS: the debug exception came from the trap flag (a single step).
const DR6_BS: u64 = 1 << 14;

/// What the session asks a parked vCPU for.
pub enum Request {
    Regs,
    SetRegs(Box<Regs>),
    /// Read up to `len` bytes at a guest virtual address.
    Read {
        addr: u64,
        len: usize,
    },
    /// Write at a guest virtual address.
    Write {
        addr: u64,
        data: Vec<u8>,
    },
    /// Guest-physical address of a guest virtual one.
    Translate(u64),
}

/// A parked vCPU's answer.
pub enum Reply {
    Regs(Box<Regs>),
    /// The bytes read before the first page that is not mapped to RAM.
    Read(Vec<u8>),
    Done(bool),
    Gpa(Option<u64>),
}

pub type Stop = MultiThreadStopReason<u64>;

#[derive(Default)]
struct Parking {
    parked: bool,
    request: Option<Request>,
    reply: Option<Reply>,
}

#[derive(Default)]
struct State {
    vcpus: Vec<Parking>,
    threads: Vec<libc::pthread_t>,
    bps: Breakpoints,
    /// The vCPU that runs one instruction at the next resume.
    step: Option<usize>,
    /// Which vCPUs leave their park at the next resume (GDB's scheduler locking keeps the
    /// others stopped).
    runnable: Vec<bool>,
    halted: bool,
    /// Stops the session has not reported yet.
    stops: VecDeque<Stop>,
    /// The VM ended with this code; parked vCPUs leave and requests fail.
    ended: Option<u8>,
    /// A session is attached.
    session: bool,
}

/// The debugger's side of every vCPU.
pub struct Debugger {
    state: Mutex<State>,
    changed: Condvar,
    /// Whether vCPUs must park: one load per vCPU loop turn.
    halt: AtomicBool,
    /// A byte arrives on `stopped` when a vCPU reports a stop or the VM ends, for the
    /// session's poll (the other end of the pair is `notify`).
    pub(super) stopped: UnixStream,
    notify: UnixStream,
    pub(super) ram: GuestRam,
    /// The unix socket path `--gdb` listens on, removed when the VM ends.
    socket_path: Option<std::path::PathBuf>,
}

impl Debugger {
    /// A debugger for `cpus` vCPUs that starts halted: no guest instruction runs until a
    /// session resumes the VM.
    pub fn new(
        cpus: usize,
        ram: GuestRam,
        socket_path: Option<std::path::PathBuf>,
    ) -> std::io::Result<Debugger> {
        let state = State {
            vcpus: (0..cpus).map(|_| Parking::default()).collect(),
            runnable: vec![true; cpus],
            halted: true,
            ..Default::default()
        };
        let (stopped, notify) = UnixStream::pair()?;
        stopped.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        Ok(Debugger {
            state: Mutex::new(state),
            changed: Condvar::new(),
            halt: AtomicBool::new(true),
            stopped,
            notify,
            ram,
            socket_path,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    pub fn cpus(&self) -> usize {
        self.lock().vcpus.len()
    }

    /// The vCPU threads, to kick them out of `KVM_RUN`.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        self.lock().threads = threads;
    }

    /// Called by a vCPU thread before every `KVM_RUN` (`debug` = None: parks only if the VM
    /// is halted) and on `KVM_EXIT_DEBUG`; returns once the vCPU may run again.
    pub fn checkpoint(&self, vcpu: &mut VcpuFd, id: usize, debug: Option<kvm_debug_exit_arch>) {
        if debug.is_none() && !self.halt.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if id >= s.vcpus.len() || s.ended.is_some() {
            return;
        }
        if let Some(d) = debug {
            let stop = classify(&d, &s, id);
            s.stops.push_back(stop);
            self.halt_locked(&mut s);
            self.wake_session();
        }
        s.vcpus[id].parked = true;
        self.changed.notify_all();
        while (s.halted || !s.runnable[id]) && s.ended.is_none() {
            if let Some(req) = s.vcpus[id].request.take() {
                drop(s);
                let reply = self.serve(vcpu, req);
                s = self.lock();
                s.vcpus[id].reply = Some(reply);
                self.changed.notify_all();
                continue;
            }
            s = self.wait(s);
        }
        s.vcpus[id].parked = false;
        let dbg = s.bps.guest_debug(s.step == Some(id) && s.ended.is_none());
        drop(s);
        if let Err(e) = vcpu.set_guest_debug(&dbg) {
            eprintln!("ringvm: gdb: vCPU {id}: KVM_SET_GUEST_DEBUG failed: {e}");
        }
    }

    /// kvm_pvm interprets guest CPL0 code and its emulator cannot run int3: a software
    /// breakpoint there ends in `KVM_EXIT_INTERNAL_ERROR` (emulation failed) at the patched
    /// byte instead of `KVM_EXIT_DEBUG`. Reports that as the breakpoint and returns true;
    /// false for every other internal error. (On hardware KVM this never matches.)
    pub fn unemulated_breakpoint(&self, vcpu: &mut VcpuFd, id: usize) -> bool {
        let (suberror, _) = sys::internal_error(vcpu);
        let Ok(regs) = vcpu.get_regs() else {
            return false;
        };
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
            || !self.lock().bps.sw.contains_key(&regs.rip)
        {
            return false;
        }
        let debug = kvm_debug_exit_arch {
            exception: 3,
            pc: regs.rip,
            ..Default::default()
        };
        self.checkpoint(vcpu, id, Some(debug));
        true
    }

    fn serve(&self, vcpu: &mut VcpuFd, req: Request) -> Reply {
        match req {
            Request::Regs => {
                let regs = (|| {
                    Ok::<_, kvm_ioctls::Error>(Regs::from_kvm(
                        &vcpu.get_regs()?,
                        &vcpu.get_sregs()?,
                        &vcpu.get_fpu()?,
                    ))
                })();
                match regs {
                    Ok(r) => Reply::Regs(Box::new(r)),
                    Err(_) => Reply::Done(false),
                }
            }
            Request::SetRegs(new) => {
                let done = (|| {
                    let (mut r, mut s, mut f) =
                        (vcpu.get_regs()?, vcpu.get_sregs()?, vcpu.get_fpu()?);
                    new.to_kvm(&mut r, &mut s, &mut f);
                    vcpu.set_regs(&r)?;
                    vcpu.set_sregs(&s)?;
                    vcpu.set_fpu(&f)
                })();
                Reply::Done(done.is_ok())
            }
            Request::Read { addr, len } => {
                let mut out = Vec::with_capacity(len);
                self.walk(vcpu, addr, len, |gpa, n| {
                    let start = out.len();
                    out.resize(start + n, 0);
                    let ok = self.ram.read(gpa, &mut out[start..]).is_ok();
                    if !ok {
                        out.truncate(start);
                    }
                    ok
                });
                Reply::Read(out)
            }
            Request::Write { addr, data } => {
                let mut done = 0;
                let all = self.walk(vcpu, addr, data.len(), |gpa, n| {
                    let ok = self.ram.write(gpa, &data[done..done + n]).is_ok();
                    done += n;
                    ok
                });
                Reply::Done(all)
            }
            Request::Translate(addr) => Reply::Gpa(translate(vcpu, addr)),
        }
    }

    /// Calls `f(gpa, len)` for each page-sized piece of `len` bytes at `addr` until a piece
    /// is not mapped or `f` fails; true if every piece went through.
    fn walk(
        &self,
        vcpu: &VcpuFd,
        addr: u64,
        len: usize,
        mut f: impl FnMut(u64, usize) -> bool,
    ) -> bool {
        let mut done = 0usize;
        while done < len {
            let Some(va) = addr.checked_add(done as u64) else {
                return false;
            };
            let n = (PAGE - va % PAGE).min((len - done) as u64) as usize;
            match translate(vcpu, va) {
                Some(gpa) if f(gpa, n) => done += n,
                _ => return false,
            }
        }
        true
    }

    /// Wakes the session's poll. A full socket buffer already holds a wake-up.
    fn wake_session(&self) {
        let _ = (&self.notify).write(&[1]);
    }

    /// Takes the pending wake-ups (the queue, not their count, says what happened).
    pub fn drain_wakeups(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.stopped).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Stops every vCPU: sets the flag, kicks the threads. Call with the state locked.
    fn halt_locked(&self, s: &mut State) {
        s.halted = true;
        self.halt.store(true, Ordering::Release);
        // Once the VM ended, the threads may be joined: never signal those.
        if s.ended.is_none() {
            for t in &s.threads {
                sys::kick_thread(*t);
            }
        }
    }

    /// Stops every vCPU and waits until all are parked; false if the VM ended.
    pub fn halt_all(&self) -> bool {
        let mut s = self.lock();
        if !s.halted {
            self.halt_locked(&mut s);
        }
        loop {
            if s.ended.is_some() {
                return false;
            }
            if s.vcpus.iter().all(|v| v.parked) {
                return true;
            }
            // Kicks can arrive while a thread is between exits; repeat them until it parks.
            let (g, timeout) = self
                .changed
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
            if timeout.timed_out() && s.ended.is_none() {
                for t in &s.threads {
                    sys::kick_thread(*t);
                }
            }
        }
    }

    /// Lets the vCPUs run (`only`: just these); `step` runs one instruction on that vCPU.
    pub fn resume(&self, step: Option<usize>, only: Option<&[usize]>) {
        let mut s = self.lock();
        s.step = step;
        let n = s.vcpus.len();
        s.runnable = match only {
            Some(ids) => (0..n).map(|i| ids.contains(&i)).collect(),
            None => vec![true; n],
        };
        s.halted = false;
        self.halt.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Sends a request to parked vCPU `id` and waits for the answer; None if the VM ended
    /// or there is no such vCPU.
    pub fn request(&self, id: usize, req: Request) -> Option<Reply> {
        let mut s = self.lock();
        if id >= s.vcpus.len() {
            return None;
        }
        while !s.vcpus[id].parked || s.vcpus[id].request.is_some() {
            if s.ended.is_some() || !s.halted {
                return None;
            }
            s = self.wait(s);
        }
        s.vcpus[id].reply = None;
        s.vcpus[id].request = Some(req);
        self.changed.notify_all();
        loop {
            if let Some(r) = s.vcpus[id].reply.take() {
                return Some(r);
            }
            if s.ended.is_some() {
                return None;
            }
            s = self.wait(s);
        }
    }

    /// The next stop to report, or the VM's exit code once it ended.
    pub fn next_stop(&self) -> Option<Stop> {
        let mut s = self.lock();
        if let Some(stop) = s.stops.pop_front() {
            return Some(stop);
        }
        s.ended.map(MultiThreadStopReason::Exited)
    }

    pub fn with_breakpoints<R>(&self, f: impl FnOnce(&mut Breakpoints) -> R) -> R {
        f(&mut self.lock().bps)
    }

    /// Marks a session attached; false if one already is.
    pub fn begin_session(&self) -> bool {
        let mut s = self.lock();
        if s.session {
            return false;
        }
        s.session = true;
        true
    }

    /// The session ended: the guest loses every breakpoint and runs on.
    pub fn end_session(&self) {
        if self.halt_all() {
            let patches = self.lock().bps.clear();
            for p in patches.values() {
                // The byte was RAM when it was patched and RAM does not move.
                let _ = self.ram.write(p.gpa, &[p.orig]);
            }
            self.lock().stops.clear();
            self.resume(None, None);
        }
        let mut s = self.lock();
        s.session = false;
        self.changed.notify_all();
    }

    /// The VM ended: parked vCPUs leave, and an attached GDB is told. Waits up to a second
    /// for the session to end (it does once it has sent GDB the exit), so GDB sees the exit
    /// rather than a closed connection.
    pub fn end(&self, code: u8) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
        let mut s = self.lock();
        s.ended = Some(code);
        self.changed.notify_all();
        self.wake_session();
        let deadline = Instant::now() + Duration::from_secs(1);
        while s.session {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The guest-physical address of `addr` through vCPU's page tables.
fn translate(vcpu: &VcpuFd, addr: u64) -> Option<u64> {
    vcpu.translate_gva(addr)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| t.physical_address)
}

/// What a `KVM_EXIT_DEBUG` means to GDB.
fn classify(d: &kvm_debug_exit_arch, s: &State, id: usize) -> Stop {
    let tid = tid(id);
    match d.exception {
        3 if s.bps.sw.contains_key(&d.pc) => MultiThreadStopReason::SwBreak(tid),
        1 => match s.bps.hit(d.dr6) {
            Some((Slot::Exec, _)) => MultiThreadStopReason::HwBreak(tid),
            Some((Slot::Watch(kind), addr)) => MultiThreadStopReason::Watch { tid, kind, addr },
            // A finished step is a SIGTRAP on the stepping thread, as GDB expects.
            None if d.dr6 & DR6_BS != 0 || s.step == Some(id) => {
                MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGTRAP,
                }
            }
            None => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
        },
        _ => MultiThreadStopReason::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        },
    }
}

/// vCPU `id` is GDB thread `id + 1` (thread ids start at 1).
pub fn tid(id: usize) -> Tid {
    Tid::new(id + 1).expect("id + 1 is never zero")
}
