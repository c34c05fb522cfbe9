//! The ringvm VMM: KVM VM and vCPUs, boot, platform devices, control socket.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`vm::run`].
//!
//! Unsafe code lives in `sys` alone (system calls, signal handlers, KVM memory slots).

#![deny(unsafe_code)]

pub mod boot;
pub mod cli;
pub mod control;
pub mod cpuid;
pub mod death;
pub mod device;
mod device_process;
pub mod devices;
pub mod exit;
pub mod gdb;
pub mod guest;
pub mod irq;
pub mod respawn;
pub mod run_flags;
#[allow(unsafe_code)]
mod sys;
pub mod vcpu;
pub mod vcpus;
pub mod vm;
