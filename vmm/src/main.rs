//! `ringvm`: run a VM, or control a running one.

use std::process::ExitCode;

use anyhow::Context;
use vmm::cli::{Args, Command};

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let result = match args.command {
        Command::Run(run) => vmm::vm::run_from_args(run),
        Command::Stop(stop) => stop_vm(&stop.socket),
        Command::Device(device) => vmm::device::run(device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stop_vm(socket: &std::path::Path) -> anyhow::Result<()> {
    let reply = vmm::control::request(socket, "stop")
        .with_context(|| format!("cannot reach the control socket {}", socket.display()))?;
    if reply == "ok" {
        Ok(())
    } else {
        anyhow::bail!("the VM refused: {reply}")
    }
}
