//! `ringvm run` flags that device crates declare ([`RunDevice`]), composed from the
//! [`REGISTRY`].
//!
//! argh derives [`RunArgs`](crate::cli::RunArgs) at compile time and has no flatten, so a
//! device's flags cannot be fields of it. Instead [`from_env`] claims them from a `ringvm run`
//! command line before argh parses the rest: each registered flag (`--vsock VALUE`) is taken
//! out with its value, wherever it stands before `--`, and handed to its device's
//! [`RunDevice::specs`]; `ringvm run --help` gets the registry's flags spliced into argh's
//! text (its usage line and its options). The devices that come out are type-erased
//! [`RunSpec`]s the VMM plans and spawns like any device process.
//!
//! A flag name is claimed wherever it stands, so a value of another option that is exactly a
//! device flag's name (`-p --cid`) is taken as that flag; kernel parameters never are.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use argh::FromArgs;
use virtio::process::{HostTask, MakeError, RunDevice, RunFlag};
use virtio::DeviceType;

use crate::cli::Args;
use crate::device::REGISTRY;
use crate::device_process;

/// The devices the `ringvm run` flags asked for, whatever their types.
pub type RunSpecs = Vec<Rc<dyn RunSpec>>;

/// What [`specs`] is for one registered device.
pub type SpecsFn = fn(&[(&'static str, String)]) -> Result<RunSpecs, String>;

/// One device the `ringvm run` flags asked for, whatever its type.
pub trait RunSpec: fmt::Debug {
    /// What it is.
    fn device_type(&self) -> DeviceType;
    /// Its process, right before the spawn: arguments, inherited descriptors (numbered from
    /// `first_fd`) and the VMM's task for it.
    fn plan(&self, first_fd: i32) -> Result<PlannedProcess, MakeError>;
}

/// A device process ready to spawn.
pub struct PlannedProcess {
    /// `ringvm device <name>` arguments after the name.
    pub args: Vec<OsString>,
    pub fds: Vec<OwnedFd>,
    pub host: Option<HostTask>,
}

struct Spec<P: RunDevice>(P::Spec);

impl<P: RunDevice> fmt::Debug for Spec<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", P::TYPE.name(), self.0)
    }
}

impl<P: RunDevice> RunSpec for Spec<P> {
    fn device_type(&self) -> DeviceType {
        P::TYPE
    }

    fn plan(&self, first_fd: i32) -> Result<PlannedProcess, MakeError> {
        let planned = P::plan(&self.0, first_fd)?;
        Ok(PlannedProcess {
            args: P::to_args(&planned.options),
            fds: planned.fds,
            host: planned.host,
        })
    }
}

/// [`RunDevice::specs`], type-erased for the registry.
pub fn specs<P: RunDevice + 'static>(given: &[(&'static str, String)]) -> Result<RunSpecs, String> {
    Ok(P::specs(given)?
        .into_iter()
        .map(|s| Rc::new(Spec::<P>(s)) as Rc<dyn RunSpec>)
        .collect())
}

/// The names of `devices` in order: their type's name, numbered (`vsock0`, `vsock1`) when
/// the flags gave more than one of a type.
pub fn names(devices: &[Rc<dyn RunSpec>]) -> Vec<String> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let kind = d.device_type();
            let of_kind =
                |s: &[Rc<dyn RunSpec>]| s.iter().filter(|e| e.device_type() == kind).count();
            match of_kind(devices) {
                1 => kind.name().to_owned(),
                _ => format!("{}{}", kind.name(), of_kind(&devices[..i])),
            }
        })
        .collect()
}

/// Plans `spec`'s process as device `name`: its arguments (after `ringvm device <name>`),
/// the descriptors it inherits, and the host task the VMM runs for it.
pub(crate) fn plan(spec: &dyn RunSpec, name: &str) -> anyhow::Result<PlannedProcess> {
    use anyhow::Context;
    spec.plan(device_process::FIRST_EXTRA_FD as i32)
        .map_err(anyhow::Error::from_boxed)
        .with_context(|| format!("device {name}"))
}

/// Every registered device's flags, with the index of its registry entry.
fn registered_flags() -> impl Iterator<Item = (usize, &'static RunFlag)> {
    REGISTRY.iter().enumerate().flat_map(|(i, r)| {
        r.run
            .as_ref()
            .map(|run| run.flags)
            .unwrap_or_default()
            .iter()
            .map(move |f| (i, f))
    })
}

/// Takes the registry's flags out of `args` (the arguments after `run`); returns the
/// arguments left for argh, and the devices the flags give, in registry order.
pub fn claim(args: &[String]) -> Result<(Vec<String>, RunSpecs), String> {
    let mut given: Vec<Vec<(&'static str, String)>> = vec![Vec::new(); REGISTRY.len()];
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            rest.push(a.clone());
            rest.extend(it.by_ref().cloned());
            break;
        }
        match registered_flags().find(|(_, f)| f.name == a) {
            Some((i, flag)) => {
                let value = it
                    .next()
                    .ok_or_else(|| format!("No value provided for option '{}'.", flag.name))?;
                given[i].push((flag.name, value.clone()));
            }
            None => rest.push(a.clone()),
        }
    }
    let mut devices = Vec::new();
    for (r, given) in REGISTRY.iter().zip(&given) {
        if let (Some(run), false) = (&r.run, given.is_empty()) {
            devices.extend((run.specs)(given)?);
        }
    }
    Ok((rest, devices))
}

/// argh's help column: options start at 2, their descriptions at 20, lines end by 80.
const DESCRIPTION_COLUMN: usize = 20;
const WRAP: usize = 80;

/// One option's help lines, as argh lays out its own.
fn describe(out: &mut String, name: &str, help: &str) {
    out.push_str("  ");
    out.push_str(name);
    let mut col = 2 + name.len();
    if col + 2 > DESCRIPTION_COLUMN {
        out.push('\n');
        col = 0;
    }
    out.extend(std::iter::repeat_n(' ', DESCRIPTION_COLUMN - col));
    col = DESCRIPTION_COLUMN;
    for (i, word) in help.split_whitespace().enumerate() {
        if i > 0 && col + 1 + word.len() > WRAP {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', DESCRIPTION_COLUMN));
            col = DESCRIPTION_COLUMN;
        } else if i > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out.push('\n');
}

/// argh's `ringvm run --help` text with the registry's flags in its usage line (before the
/// kernel) and its options (before `--help`).
pub fn run_help(argh_help: &str) -> String {
    let usage: String = registered_flags()
        .map(|(_, f)| format!(" [{} <{}>]", f.name, f.value))
        .collect();
    let mut options = String::new();
    for (_, f) in registered_flags() {
        describe(&mut options, f.name, f.help);
    }
    let mut out = String::with_capacity(argh_help.len() + usage.len() + options.len());
    let (mut usage_done, mut options_done) = (false, false);
    for line in argh_help.split_inclusive('\n') {
        if !usage_done && line.starts_with("Usage:") {
            usage_done = true;
            let at = line
                .rfind(" [--] ")
                .or_else(|| line.rfind(" <"))
                .unwrap_or(line.trim_end().len());
            out.push_str(&line[..at]);
            out.push_str(&usage);
            out.push_str(&line[at..]);
            continue;
        }
        if !options_done && line.starts_with("  --help") {
            options_done = true;
            out.push_str(&options);
        }
        out.push_str(line);
    }
    if !options_done {
        out.push_str(&options);
    }
    out
}

/// `argh::from_env` for ringvm: the same parse, errors and help, with the registry's `run`
/// flags claimed first; returns the arguments and the devices those flags give.
pub fn from_env() -> (Args, RunSpecs) {
    let strings: Vec<String> = std::env::args_os()
        .map(|s| s.into_string())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|arg| {
            eprintln!("Invalid utf8: {}", arg.to_string_lossy());
            std::process::exit(1)
        });
    let cmd = strings
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|a| a.to_str())
        .unwrap_or("ringvm")
        .to_owned();
    let fail = |output: &str| -> ! {
        eprintln!("{output}\nRun {cmd} --help for more information.");
        std::process::exit(1)
    };
    let args = strings.get(1..).unwrap_or_default();
    let is_run = args.first().is_some_and(|a| a == "run");
    let (rest, devices) = if is_run {
        match claim(&args[1..]) {
            Ok((rest, devices)) => (
                std::iter::once(args[0].clone()).chain(rest).collect(),
                devices,
            ),
            Err(e) => fail(&e),
        }
    } else {
        (args.to_vec(), Vec::new())
    };
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    match Args::from_args(&[&cmd], &rest) {
        Ok(parsed) => (parsed, devices),
        Err(early) if early.status.is_ok() => {
            if is_run && early.output.starts_with("Usage:") {
                println!("{}", run_help(&early.output));
            } else {
                println!("{}", early.output);
            }
            std::process::exit(0)
        }
        Err(early) => fail(&early.output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn device_flags_are_claimed_with_their_values_and_the_rest_is_left_in_order() {
        let (rest, devices) = claim(&strings(&[
            "-m", "64", "--vsock", "cid=5", "-p", "quiet", "--", "--cid", "k",
        ]))
        .expect("valid");
        assert_eq!(
            rest,
            strings(&["-m", "64", "-p", "quiet", "--", "--cid", "k"])
        );
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].device_type(), DeviceType::Vsock);
        let (rest, devices) = claim(&strings(&["--cid", "7", "k"])).expect("valid");
        assert_eq!((rest, devices.len()), (strings(&["k"]), 1));
        assert!(claim(&strings(&["k"])).expect("valid").1.is_empty());
    }

    #[test]
    fn a_device_flag_error_names_its_flag() {
        let err = claim(&strings(&["--vsock", "cid=2", "k"])).expect_err("cid 2");
        assert!(err.contains("option '--vsock'"), "{err}");
        let err = claim(&strings(&["k", "--cid"])).expect_err("no value");
        assert!(err.contains("'--cid'"), "{err}");
        let err = claim(&strings(&["--vsock", "cid=3", "--cid", "4", "k"])).expect_err("both");
        assert!(err.contains("not both"), "{err}");
    }

    #[derive(Debug)]
    struct Kind(DeviceType);

    impl RunSpec for Kind {
        fn device_type(&self) -> DeviceType {
            self.0
        }

        fn plan(&self, _: i32) -> Result<PlannedProcess, MakeError> {
            Err("not planned here".into())
        }
    }

    #[test]
    fn devices_are_named_by_type_and_numbered_when_there_are_several() {
        let of = |t: &[DeviceType]| -> Vec<String> {
            let specs: Vec<Rc<dyn RunSpec>> = t
                .iter()
                .map(|&t| Rc::new(Kind(t)) as Rc<dyn RunSpec>)
                .collect();
            names(&specs)
        };
        assert_eq!(of(&[DeviceType::Vsock]), ["vsock"]);
        assert_eq!(
            of(&[DeviceType::Vsock, DeviceType::Rng, DeviceType::Vsock]),
            ["vsock0", "rng", "vsock1"]
        );
    }

    #[test]
    fn run_help_lists_the_device_flags_with_argh_s_own() {
        let argh = match Args::from_args(&["ringvm"], &["run", "--help"]) {
            Err(e) if e.status.is_ok() => e.output,
            _ => panic!("no help"),
        };
        let help = run_help(&argh);
        let usage = help.lines().next().expect("usage");
        assert!(
            usage.contains(
                " [--vsock <cid=N[,uds=PATH][,buf_alloc=BYTES]>] [--cid <N>] [--] <kernel>"
            ),
            "{usage}"
        );
        // Every line of argh's is still there, in order, and the flags come before --help.
        let mut lines = help.lines();
        for line in argh.lines().skip(1) {
            assert!(
                lines.any(|l| l == line),
                "{line:?} is missing or out of order"
            );
        }
        let vsock = help
            .find("\n  --vsock           a virtio-vsock device")
            .expect("--vsock");
        let cid = help
            .find("\n  --cid             crosvm's spelling")
            .expect("--cid");
        let end = help.find("\n  --help, help").expect("--help");
        assert!(vsock < cid && cid < end, "{help}");
        assert!(help[vsock..end].lines().all(|l| l.len() <= WRAP), "{help}");
    }
}
