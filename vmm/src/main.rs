//! `ringvm`: run a VM, or control a running one.

use std::process::ExitCode;

use anyhow::Context;
use vmm::cli::Command;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = if argv.get(1).is_some_and(|a| a == "device") {
        // A device process parses its own arguments (the shared options and the device's).
        argv[2..]
            .iter()
            .map(|a| {
                a.clone()
                    .into_string()
                    .map_err(|a| anyhow::anyhow!("argument {a:?} is not UTF-8"))
            })
            .collect::<anyhow::Result<Vec<String>>>()
            .and_then(|args| vmm::device::run(&args))
    } else {
        // argh's parse, with the devices' own `run` flags claimed first.
        let (args, devices) = vmm::run_flags::from_env();
        match args.command {
            Command::Run(run) => vmm::vm::run_from_args(run, devices),
            Command::Stop(a) => control(&a.socket, "stop").map(drop),
            Command::Suspend(a) => control(&a.socket, "suspend").map(drop),
            Command::Resume(a) => control(&a.socket, "resume").map(drop),
            Command::Stats(a) => control(&a.socket, "stats").map(|reply| {
                if a.json {
                    println!("{reply}");
                } else {
                    print!("{}", vmm::control::stats::table(&reply["stats"]));
                }
            }),
            // Dispatched above; what argh parsed goes the same way.
            Command::Device(d) => {
                vmm::device::run(&std::iter::once(d.name).chain(d.args).collect::<Vec<_>>())
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sends `command` to the VM's control socket; its successful response.
fn control(socket: &std::path::Path, command: &str) -> anyhow::Result<serde_json::Value> {
    vmm::control::request(socket, command).with_context(|| format!("ringvm {command}"))
}
