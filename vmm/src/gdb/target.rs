//! The gdbstub target: GDB's requests turned into [`Debugger`] requests to parked vCPUs.
//! Every address, length and thread id comes from the client: a bad one is a GDB error,
//! never a panic.

use std::sync::Arc;

use gdbstub::common::{Signal, Tid};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};

use super::breakpoints::{Patch, Slot};
use super::hub::{tid, Debugger, Reply, Request};
use super::regs::{Regs, X86_64Ringvm};

/// The int3 instruction.
const INT3: u8 = 0xcc;

pub struct VmTarget {
    pub dbg: Arc<Debugger>,
    /// The vCPU GDB asked to single-step at the next resume.
    step: Option<usize>,
    /// The vCPUs GDB named for the next resume, and whether only they run.
    named: Vec<usize>,
    locked: bool,
}

impl VmTarget {
    pub fn new(dbg: Arc<Debugger>) -> VmTarget {
        VmTarget {
            dbg,
            step: None,
            named: Vec::new(),
            locked: false,
        }
    }

    /// The vCPU of a GDB thread id, if it exists.
    fn vcpu(&self, tid: Tid) -> Result<usize, TargetError<&'static str>> {
        let id = tid.get() - 1;
        if id < self.dbg.cpus() {
            Ok(id)
        } else {
            Err(TargetError::NonFatal)
        }
    }

    fn ask(&self, tid: Tid, req: Request) -> Result<Reply, TargetError<&'static str>> {
        let id = self.vcpu(tid)?;
        self.dbg.request(id, req).ok_or(TargetError::NonFatal)
    }
}

impl Target for VmTarget {
    type Arch = X86_64Ringvm;
    type Error = &'static str;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for VmTarget {
    fn read_registers(&mut self, regs: &mut Regs, tid: Tid) -> TargetResult<(), Self> {
        match self.ask(tid, Request::Regs)? {
            Reply::Regs(r) => {
                *regs = *r;
                Ok(())
            }
            _ => Err(TargetError::NonFatal),
        }
    }

    fn write_registers(&mut self, regs: &Regs, tid: Tid) -> TargetResult<(), Self> {
        match self.ask(tid, Request::SetRegs(Box::new(regs.clone())))? {
            Reply::Done(true) => Ok(()),
            _ => Err(TargetError::NonFatal),
        }
    }

    fn read_addrs(&mut self, addr: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let len = data.len();
        match self.ask(tid, Request::Read { addr, len })? {
            // Nothing readable at the start: an error for GDB (E packet).
            Reply::Read(bytes) if !bytes.is_empty() && bytes.len() <= len => {
                data[..bytes.len()].copy_from_slice(&bytes);
                Ok(bytes.len())
            }
            _ => Err(TargetError::NonFatal),
        }
    }

    fn write_addrs(&mut self, addr: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let data = data.to_vec();
        match self.ask(tid, Request::Write { addr, data })? {
            Reply::Done(true) => Ok(()),
            _ => Err(TargetError::NonFatal),
        }
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), Self::Error> {
        (0..self.dbg.cpus()).for_each(|id| thread_is_active(tid(id)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for VmTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        let only = self.locked.then_some(self.named.as_slice());
        self.dbg.resume(self.step.take(), only);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.step = None;
        self.named.clear();
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        // Signals mean nothing to a VM; a thread that does not exist is not resumed.
        if let Ok(id) = self.vcpu(tid) {
            self.named.push(id);
        }
        Ok(())
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for VmTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Ok(id) = self.vcpu(tid) {
            self.step = Some(id);
            self.named.push(id);
        }
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for VmTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.locked = true;
        Ok(())
    }
}

impl Breakpoints for VmTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for VmTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.dbg.with_breakpoints(|b| b.sw.contains_key(&addr)) {
            return Ok(true);
        }
        // Page tables are per vCPU in principle; a kernel's text maps the same on all.
        let Reply::Gpa(Some(gpa)) = self.ask(tid(0), Request::Translate(addr))? else {
            return Ok(false);
        };
        // Another address may map to the same byte: it already holds the original.
        let shared = self
            .dbg
            .with_breakpoints(|b| b.sw.values().find(|p| p.gpa == gpa).map(|p| p.orig));
        let mut orig = [0u8];
        if let Some(o) = shared {
            orig[0] = o;
        } else if self.dbg.ram.read(gpa, &mut orig).is_err()
            || self.dbg.ram.write(gpa, &[INT3]).is_err()
        {
            return Ok(false);
        }
        let patch = Patch { gpa, orig: orig[0] };
        self.dbg.with_breakpoints(|b| b.sw.insert(addr, patch));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let removed = self.dbg.with_breakpoints(|b| {
            let p = b.sw.remove(&addr)?;
            // The int3 stays while another address still breaks on that byte.
            Some((p, b.sw.values().any(|q| q.gpa == p.gpa)))
        });
        match removed {
            None => Ok(false),
            Some((_, true)) => Ok(true),
            Some((p, false)) => Ok(self.dbg.ram.write(p.gpa, &[p.orig]).is_ok()),
        }
    }
}

impl HwBreakpoint for VmTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.dbg.with_breakpoints(|b| b.add_hw(addr, Slot::Exec, 1)))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self
            .dbg
            .with_breakpoints(|b| b.remove_hw(addr, Slot::Exec, 1)))
    }
}

impl HwWatchpoint for VmTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self
            .dbg
            .with_breakpoints(|b| b.add_hw(addr, Slot::Watch(kind), len)))
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self
            .dbg
            .with_breakpoints(|b| b.remove_hw(addr, Slot::Watch(kind), len)))
    }
}
