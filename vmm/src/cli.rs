//! Command-line interface (argh), with crosvm's flags and defaults as the reference.

use std::path::PathBuf;

use argh::FromArgs;

/// ringvm: an async-native virtual machine monitor for Linux/KVM.
#[derive(FromArgs, Debug)]
pub struct Args {
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunArgs),
    Stop(StopArgs),
}

/// Boot a Linux kernel (bzImage or ELF vmlinux) or any ELF kernel with a PVH note.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run")]
pub struct RunArgs {
    /// guest memory in MiB (default 256)
    #[argh(option, short = 'm', default = "256")]
    pub mem: u64,
    /// number of vCPUs (default 1)
    #[argh(option, short = 'c', default = "1")]
    pub cpus: usize,
    /// kernel command line parameters; repeat to append
    #[argh(option, short = 'p')]
    pub params: Vec<String>,
    /// initial ramdisk to load
    #[argh(option, short = 'i')]
    pub initrd: Option<PathBuf>,
    /// control socket path; a directory gets ringvm-<pid>.sock inside it
    #[argh(option, short = 's')]
    pub socket: Option<PathBuf>,
    /// serial port: type=stdout|file|sink[,path=P][,num=1-4][,console=BOOL][,stdin=BOOL];
    /// default type=stdout,num=1,console=true,stdin=true
    #[argh(option)]
    pub serial: Vec<String>,
    /// CPUID features to hide or show, e.g. -cx16,+xsaveerptr,-kvm-pv (names as in
    /// /proc/cpuinfo); for hosts that cannot run some instructions in guest kernel mode
    #[argh(option)]
    pub cpu_features: Option<String>,
    /// path of the kernel image
    #[argh(positional)]
    pub kernel: PathBuf,
}

/// Stop a VM through its control socket.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop")]
pub struct StopArgs {
    /// path of the VM's control socket
    #[argh(positional)]
    pub socket: PathBuf,
}

/// Where a serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    Stdout,
    File(PathBuf),
    Sink,
}

/// One `--serial` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSpec {
    pub out: SerialOut,
    /// COM number, 1 to 4.
    pub num: u8,
    pub console: bool,
    pub stdin: bool,
}

impl Default for SerialSpec {
    fn default() -> Self {
        SerialSpec {
            out: SerialOut::Stdout,
            num: 1,
            console: true,
            stdin: true,
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(format!("--serial {key}={v}: expected true or false")),
    }
}

/// Parses one `--serial` value.
pub fn parse_serial(spec: &str) -> Result<SerialSpec, String> {
    let mut kind = None;
    let mut path = None;
    let mut s = SerialSpec {
        console: false,
        stdin: false,
        ..SerialSpec::default()
    };
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--serial: '{kv}' is not key=value"))?;
        match k {
            "type" => kind = Some(v.to_string()),
            "path" => path = Some(PathBuf::from(v)),
            "num" => {
                s.num = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=4).contains(n))
                    .ok_or_else(|| format!("--serial num={v}: expected 1 to 4"))?
            }
            "console" => s.console = parse_bool(k, v)?,
            "stdin" => s.stdin = parse_bool(k, v)?,
            _ => return Err(format!("--serial: unknown key '{k}'")),
        }
    }
    s.out = match (kind.as_deref(), path) {
        (Some("stdout") | None, None) => SerialOut::Stdout,
        (Some("file"), Some(p)) => SerialOut::File(p),
        (Some("file"), None) => return Err("--serial type=file needs path=".into()),
        (Some("sink"), None) => SerialOut::Sink,
        (Some(t), Some(_)) if t != "file" => {
            return Err(format!("--serial type={t} takes no path"))
        }
        (Some(t), _) => return Err(format!("--serial type={t}: expected stdout, file or sink")),
        (None, Some(_)) => return Err("--serial path= needs type=file".into()),
    };
    Ok(s)
}

/// Checks `run` arguments that argh cannot.
pub fn validate(args: &RunArgs) -> Result<Vec<SerialSpec>, String> {
    if args.mem < 16 {
        return Err(format!("--mem {}: at least 16 MiB are needed", args.mem));
    }
    if args.mem > (1 << 30) {
        return Err(format!("--mem {}: more than 1 PiB", args.mem));
    }
    if args.cpus == 0 || args.cpus > 254 {
        return Err(format!("--cpus {}: expected 1 to 254", args.cpus));
    }
    let serials = if args.serial.is_empty() {
        vec![SerialSpec::default()]
    } else {
        args.serial
            .iter()
            .map(|s| parse_serial(s))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (i, a) in serials.iter().enumerate() {
        if serials[..i].iter().any(|b| b.num == a.num) {
            return Err(format!("--serial num={} given twice", a.num));
        }
    }
    if serials.iter().filter(|s| s.stdin).count() > 1 {
        return Err("--serial: only one port can read stdin".into());
    }
    Ok(serials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_specs_parse() {
        assert_eq!(
            parse_serial("type=file,path=/tmp/x,num=2").expect("valid"),
            SerialSpec {
                out: SerialOut::File("/tmp/x".into()),
                num: 2,
                console: false,
                stdin: false
            }
        );
        assert!(parse_serial("type=file").is_err());
        assert!(parse_serial("num=5").is_err());
        assert!(parse_serial("type=tcp").is_err());
        assert!(parse_serial("bogus").is_err());
        assert!(parse_serial("console=maybe").is_err());
    }

    #[test]
    fn run_args_are_validated() {
        let args = |mem, cpus| RunArgs {
            mem,
            cpus,
            params: vec![],
            initrd: None,
            socket: None,
            serial: vec![],
            cpu_features: None,
            kernel: "k".into(),
        };
        assert!(validate(&args(256, 1)).is_ok());
        assert!(validate(&args(1, 1)).is_err());
        assert!(validate(&args(256, 0)).is_err());
        assert!(validate(&args(256, 300)).is_err());
        let mut a = args(256, 1);
        a.serial = vec!["num=1".into(), "num=1".into()];
        assert!(validate(&a).is_err());
    }
}
