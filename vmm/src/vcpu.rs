//! vCPU threads: blocking KVM_RUN loops that route exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::guest::GuestRam;
use crate::sys;

/// What a vCPU thread needs.
pub struct VcpuContext {
    pub id: usize,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<VmExit>,
    pub stopping: Arc<AtomicBool>,
    pub ram: GuestRam,
    /// Opened once the VMM's process-wide seccomp filter is on (or will not be).
    pub filters: Arc<FilterGate>,
    /// `--gdb`: where the vCPU parks while the debugger holds the VM.
    pub gdb: Option<Arc<crate::gdb::Debugger>>,
    /// Suspend/resume and exit counters (`crate::vcpus`).
    pub control: Arc<crate::vcpus::VcpuControl>,
}

/// The order of seccomp filters: the main thread installs the VMM's filter on every thread
/// (TSYNC), which the kernel refuses while a thread has a filter of its own; so each vCPU
/// thread waits here, then adds its narrower vCPU filter on top, then runs the guest.
#[derive(Debug, Default)]
pub struct FilterGate {
    /// `None` until opened; then whether vCPU threads install their filter, and in log mode.
    state: Mutex<Option<VcpuFilter>>,
    opened: Condvar,
}

/// What a vCPU thread does when the gate opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuFilter {
    None,
    Install { log_failures: bool },
}

impl FilterGate {
    /// Lets the vCPU threads go (the first call wins).
    pub fn open(&self, filter: VcpuFilter) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(filter);
        }
        self.opened.notify_all();
    }

    fn wait(&self) -> VcpuFilter {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = *s {
                return f;
            }
            s = self.opened.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Runs the vCPU until the VM stops. Every way out reports an exit reason.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    if let VcpuFilter::Install { log_failures } = ctx.filters.wait() {
        let installed = match seccomp::Policy::from_name(seccomp::Policy::VCPU) {
            Some(policy) => seccomp::install(policy, log_failures).map_err(|e| e.to_string()),
            None => Err("there is no vcpu policy".into()),
        };
        if let Err(e) = installed {
            ctx.exit.report(ExitReason::Failed(format!(
                "vCPU {}: cannot install its seccomp filter: {e}",
                ctx.id
            )));
            return;
        }
    }
    let guard = sys::VcpuKickGuard::new(&mut vcpu);
    let reason = run_loop(&mut vcpu, &ctx);
    drop(guard);
    if let Some(reason) = reason {
        ctx.exit.report(reason);
    }
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Option<ExitReason> {
    loop {
        if ctx.stopping.load(Ordering::Acquire) {
            return None;
        }
        if let Some(gdb) = &ctx.gdb {
            gdb.checkpoint(vcpu, ctx.id, None);
        }
        ctx.control.park_if_suspended(&ctx.stopping);
        let exit = vcpu.run();
        ctx.control.count(ctx.id, &exit);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            // With the in-kernel irqchip HLT stays in the kernel; an exit means the guest
            // halted with interrupts off, which nothing can end.
            Ok(VcpuExit::Hlt) => {
                return Some(ExitReason::Failed(format!(
                    "vCPU {} halted with interrupts disabled",
                    ctx.id
                )))
            }
            // Triple fault or a reset request: the VM ends like a reboot.
            Ok(VcpuExit::Shutdown) => {
                // Linux's reboot=t resets this way, so it is a reset; but an early crash
                // looks the same, so say where it happened.
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let what = format_args!("vCPU {} triple fault at rip {rip:#x}: resetting", ctx.id);
                virtio::log::write("ringvm", virtio::log::Level::Info, what);
                return Some(ExitReason::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    k => ExitReason::Failed(format!("vCPU {}: system event {k}", ctx.id)),
                })
            }
            Ok(VcpuExit::InternalError) => {
                if let Some(gdb) = &ctx.gdb {
                    if gdb.unemulated_breakpoint(vcpu, ctx.id) {
                        continue;
                    }
                }
                return Some(ExitReason::Failed(internal_error(vcpu, ctx)));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(ExitReason::Failed(format!(
                    "vCPU {}: KVM entry failed, hardware reason {reason:#x} on host cpu {cpu}",
                    ctx.id
                )))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Debug(debug)) if ctx.gdb.is_some() => {
                if let Some(gdb) = &ctx.gdb {
                    gdb.checkpoint(vcpu, ctx.id, Some(debug));
                }
            }
            Ok(other) => {
                return Some(ExitReason::Failed(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    ctx.id
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                return Some(ExitReason::Failed(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    ctx.id
                )))
            }
        }
    }
}

/// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, RIP and the instruction bytes there.
fn internal_error(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> String {
    let (suberror, data) = sys::internal_error(vcpu);
    let mut msg = format!(
        "vCPU {}: KVM internal error, suberror {suberror}{}",
        ctx.id,
        match suberror {
            1 => " (instruction emulation failed)",
            2 => " (simultaneous exceptions)",
            3 => " (delivery event failed)",
            _ => "",
        }
    );
    let extra: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
    if !extra.is_empty() {
        msg += &format!(", data [{}]", extra.join(", "));
    }
    if let Ok(regs) = vcpu.get_regs() {
        msg += &format!(", rip {:#x}", regs.rip);
        let gpa = vcpu
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address);
        if let Some(gpa) = gpa {
            let mut bytes = [0u8; 15];
            if ctx.ram.read(gpa, &mut bytes).is_ok() {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                msg += &format!(", instruction bytes {}", hex.join(" "));
            }
        }
    }
    msg
}
