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
    Device(DeviceArgs),
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
    /// an external vhost-user device: type=blk|net|rng|vsock,socket=PATH (the backend
    /// listens on PATH); repeat for several
    #[argh(option)]
    pub vhost_user: Vec<String>,
    /// do not add the virtio-rng device (on by default)
    #[argh(switch)]
    pub no_rng: bool,
    /// run device processes without the jail (namespaces, seccomp)
    #[argh(switch)]
    pub disable_sandbox: bool,
    /// path of the kernel image
    #[argh(positional)]
    pub kernel: PathBuf,
}

/// Run a device as a vhost-user backend, for ringvm or any vhost-user frontend.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "device")]
pub struct DeviceArgs {
    #[argh(subcommand)]
    pub device: DeviceCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum DeviceCommand {
    Rng(RngArgs),
}

/// Where a device backend gets its vhost-user connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Listen on a unix socket path and serve the first frontend that connects.
    Socket(PathBuf),
    /// An already connected socket inherited as this descriptor (how ringvm spawns devices).
    Fd(i32),
}

/// virtio-rng backend (entropy from /dev/urandom).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rng")]
pub struct RngArgs {
    /// listen on this unix socket path for one vhost-user frontend
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// serve the vhost-user connection already open on this descriptor
    #[argh(option)]
    pub fd: Option<i32>,
    /// serve without the jail (namespaces, pivot_root, no capabilities)
    #[argh(switch)]
    pub disable_sandbox: bool,
}

/// Picks the one endpoint out of `--socket` and `--fd`.
pub fn endpoint(socket: &Option<PathBuf>, fd: Option<i32>) -> Result<Endpoint, String> {
    match (socket, fd) {
        (Some(p), None) => Ok(Endpoint::Socket(p.clone())),
        (None, Some(fd)) if fd > 2 => Ok(Endpoint::Fd(fd)),
        (None, Some(fd)) => Err(format!("--fd {fd}: expected a descriptor above 2")),
        (Some(_), Some(_)) => Err("give either --socket or --fd, not both".into()),
        (None, None) => Err("give --socket PATH or --fd N".into()),
    }
}

/// The virtio device types `--vhost-user` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostUserType {
    Block,
    Net,
    Rng,
    Vsock,
}

impl VhostUserType {
    /// The virtio device ID.
    pub fn device_type(self) -> u32 {
        match self {
            VhostUserType::Net => 1,
            VhostUserType::Block => 2,
            VhostUserType::Rng => 4,
            VhostUserType::Vsock => 19,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VhostUserType::Net => "net",
            VhostUserType::Block => "blk",
            VhostUserType::Rng => "rng",
            VhostUserType::Vsock => "vsock",
        }
    }
}

/// One `--vhost-user` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserSpec {
    pub kind: VhostUserType,
    pub socket: PathBuf,
}

/// Parses one `--vhost-user` value.
pub fn parse_vhost_user(spec: &str) -> Result<VhostUserSpec, String> {
    let mut kind = None;
    let mut socket = None;
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--vhost-user: '{kv}' is not key=value"))?;
        match k {
            "type" => {
                kind = Some(match v {
                    "blk" | "block" => VhostUserType::Block,
                    "net" => VhostUserType::Net,
                    "rng" => VhostUserType::Rng,
                    "vsock" => VhostUserType::Vsock,
                    _ => {
                        return Err(format!(
                            "--vhost-user type={v}: expected blk, net, rng or vsock"
                        ))
                    }
                })
            }
            "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            "socket" => return Err("--vhost-user socket= is empty".into()),
            _ => return Err(format!("--vhost-user: unknown key '{k}'")),
        }
    }
    Ok(VhostUserSpec {
        kind: kind.ok_or("--vhost-user needs type=")?,
        socket: socket.ok_or("--vhost-user needs socket=")?,
    })
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
            vhost_user: vec![],
            no_rng: false,
            disable_sandbox: false,
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

    #[test]
    fn vhost_user_specs_parse() {
        assert_eq!(
            parse_vhost_user("type=blk,socket=/run/b.sock").expect("valid"),
            VhostUserSpec {
                kind: VhostUserType::Block,
                socket: "/run/b.sock".into()
            }
        );
        assert_eq!(
            parse_vhost_user("socket=s,type=rng").expect("valid").kind,
            VhostUserType::Rng
        );
        for bad in [
            "type=gpu,socket=s",
            "type=rng",
            "socket=s",
            "type=rng,socket=",
            "x",
        ] {
            assert!(parse_vhost_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_endpoint_needs_exactly_one_source() {
        assert_eq!(
            endpoint(&Some("p".into()), None),
            Ok(Endpoint::Socket("p".into()))
        );
        assert_eq!(endpoint(&None, Some(3)), Ok(Endpoint::Fd(3)));
        assert!(endpoint(&None, Some(1)).is_err());
        assert!(endpoint(&None, None).is_err());
        assert!(endpoint(&Some("p".into()), Some(3)).is_err());
    }
}
