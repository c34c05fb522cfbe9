//! Command-line interface (argh), with crosvm's flags and defaults as the reference.

use std::path::PathBuf;

use argh::FromArgs;
use virtio::DeviceType;

/// ringvm: an async-native virtual machine monitor for Linux/KVM.
#[derive(FromArgs, Debug)]
pub struct Args {
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// read-only root disk image: the first virtio-blk disk, and root=/dev/vda ro on the
    /// kernel command line; PATH[,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]
    #[argh(option, short = 'r')]
    pub root: Option<String>,
    /// read-write root disk image: like --root, with root=/dev/vda rw
    #[argh(option)]
    pub rwroot: Option<String>,
    /// read-only disk image, after the root disk in the order given:
    /// PATH[,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]
    #[argh(option, short = 'd')]
    pub disk: Vec<String>,
    /// read-write disk image, after the root disk in the order given (with --disk)
    #[argh(option)]
    pub rwdisk: Vec<String>,
    /// IP address of the host side of a new tap device (with --netmask): adds a virtio-net NIC
    #[argh(option)]
    pub host_ip: Option<std::net::Ipv4Addr>,
    /// netmask of the host side of the new tap device
    #[argh(option)]
    pub netmask: Option<std::net::Ipv4Addr>,
    /// MAC address of the guest's NIC on the new tap device (default 52:54:00:12:34:56)
    #[argh(option)]
    pub mac: Option<String>,
    /// an existing (or new, unconfigured) tap device by name: adds a NIC; repeat for several
    #[argh(option)]
    pub tap_name: Vec<String>,
    /// an open tap descriptor inherited by ringvm: adds a NIC; repeat for several
    #[argh(option)]
    pub tap_fd: Vec<i32>,
    /// an external vhost-user device: type=blk|net|rng|vsock,socket=PATH (the backend
    /// listens on PATH); repeat for several
    #[argh(option)]
    pub vhost_user: Vec<String>,
    /// do not add the virtio-rng device (on by default)
    #[argh(switch)]
    pub no_rng: bool,
    /// run device processes without the jail (namespaces, seccomp), and the VMM without its
    /// seccomp filters
    #[argh(switch)]
    pub disable_sandbox: bool,
    /// log syscalls a seccomp policy does not allow (kernel audit log) instead of killing the
    /// process that made them (crosvm's flag, for finding a policy's gaps)
    #[argh(switch)]
    pub seccomp_log_failures: bool,
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
    Block(BlockArgs),
    Net(NetArgs),
}

/// virtio-net backend on a tap device (one tap queue per queue pair).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "net")]
pub struct NetArgs {
    /// listen on this unix socket path for one vhost-user frontend
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// serve the vhost-user connection already open on this descriptor
    #[argh(option)]
    pub fd: Option<i32>,
    /// an open tap queue descriptor (IFF_VNET_HDR); repeat for one per queue pair
    #[argh(option)]
    pub tap_fd: Vec<i32>,
    /// a tap device to create or attach to by name, instead of --tap-fd
    #[argh(option)]
    pub tap_name: Option<String>,
    /// queue pairs with --tap-name (default 1)
    #[argh(option, default = "1")]
    pub queue_pairs: usize,
    /// the guest's MAC address (default 52:54:00:12:34:56)
    #[argh(option)]
    pub mac: Option<String>,
    /// serve without the jail (namespaces, pivot_root, no capabilities, seccomp)
    #[argh(switch)]
    pub disable_sandbox: bool,
    /// log syscalls the seccomp policy does not allow (kernel audit log) instead of killing
    #[argh(switch)]
    pub seccomp_log_failures: bool,
    /// a pipe descriptor to which the process writes how it dies, before it does: a system
    /// call its seccomp policy refused, or a memory fault and its address (ringvm reads it)
    #[argh(option)]
    pub report_fd: Option<i32>,
}

/// The default MAC of the first NIC (QEMU's); later NICs count up in the last byte.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses (a NIC's own address is unicast).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC {s}: expected six hex bytes like 52:54:00:12:34:56"
        ));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC {s}: '{p}' is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s}: a multicast address"));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where a NIC's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// A new tap, its host side configured with this address and netmask.
    Create {
        ip: std::net::Ipv4Addr,
        netmask: std::net::Ipv4Addr,
    },
    /// A tap created or attached to by name.
    Name(String),
    /// An inherited tap descriptor.
    Fd(i32),
}

/// One virtio-net NIC of `ringvm run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub tap: TapSource,
    pub mac: [u8; 6],
}

/// The NICs of `run` in PCI order: the --host-ip one, then --tap-name, then --tap-fd.
pub fn nics(args: &RunArgs) -> Result<Vec<NicSpec>, String> {
    let mut taps = Vec::new();
    match (args.host_ip, args.netmask) {
        (Some(ip), Some(netmask)) => taps.push(TapSource::Create { ip, netmask }),
        (None, None) => {
            if args.mac.is_some() {
                return Err("--mac needs --host-ip and --netmask".into());
            }
        }
        _ => return Err("--host-ip and --netmask go together".into()),
    }
    taps.extend(args.tap_name.iter().map(|n| TapSource::Name(n.clone())));
    for (i, &fd) in args.tap_fd.iter().enumerate() {
        if fd <= 2 {
            return Err(format!("--tap-fd {fd}: expected a descriptor above 2"));
        }
        if args.tap_fd[..i].contains(&fd) {
            return Err(format!("--tap-fd {fd} given twice"));
        }
        taps.push(TapSource::Fd(fd));
    }
    let first = match &args.mac {
        Some(m) => parse_mac(m)?,
        None => DEFAULT_MAC,
    };
    Ok(taps
        .into_iter()
        .enumerate()
        .map(|(i, tap)| {
            let mut mac = first;
            if i > 0 {
                mac[5] = DEFAULT_MAC[5].wrapping_add(i as u8);
            }
            NicSpec { tap, mac }
        })
        .collect())
}

/// virtio-blk backend for a raw or qcow2 image.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "block")]
pub struct BlockArgs {
    /// listen on this unix socket path for one vhost-user frontend
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// serve the vhost-user connection already open on this descriptor
    #[argh(option)]
    pub fd: Option<i32>,
    /// the image: PATH[,ro][,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]...
    /// (format probed when not given; a probed image may not open a backing file; direct=true
    /// opens it with O_DIRECT, bypassing the host page cache; id is what GET_ID returns, 20
    /// bytes max; backing-dir allows backing files from DIR besides the image's directory)
    #[argh(option)]
    pub file: String,
    /// number of request queues (default 1)
    #[argh(option, default = "1")]
    pub queues: usize,
    /// serve without the jail (namespaces, pivot_root, no capabilities, seccomp)
    #[argh(switch)]
    pub disable_sandbox: bool,
    /// log syscalls the seccomp policy does not allow (kernel audit log) instead of killing
    #[argh(switch)]
    pub seccomp_log_failures: bool,
    /// a pipe descriptor to which the process writes how it dies, before it does: a system
    /// call its seccomp policy refused, or a memory fault and its address (ringvm reads it)
    #[argh(option)]
    pub report_fd: Option<i32>,
}

/// A disk image and how to open it:
/// `PATH[,ro|rw][,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub direct: bool,
    pub id: Option<String>,
    /// `None`: probed.
    pub format: Option<block::Format>,
    /// Directories besides the image's own that backing files may be in.
    pub backing_dirs: Vec<PathBuf>,
}

impl DiskSpec {
    /// The spec as `ringvm device block --file` takes it.
    pub fn to_arg(&self) -> String {
        let mut s = self.path.to_string_lossy().into_owned();
        if self.read_only {
            s.push_str(",ro");
        }
        if let Some(f) = self.format {
            s.push_str(",format=");
            s.push_str(f.name());
        }
        if self.direct {
            s.push_str(",direct=true");
        }
        if let Some(id) = &self.id {
            s.push_str(",id=");
            s.push_str(id);
        }
        for d in &self.backing_dirs {
            s.push_str(",backing-dir=");
            s.push_str(&d.to_string_lossy());
        }
        s
    }

    /// How the block device opens the image.
    pub fn open_options(&self) -> block::OpenOptions {
        block::OpenOptions {
            read_only: self.read_only,
            direct: self.direct,
            format: self.format,
            backing_dirs: self.backing_dirs.clone(),
        }
    }
}

/// Longest GET_ID string (virtio 1.2 §5.2.6: 20 bytes).
pub const MAX_DISK_ID: usize = 20;

/// Parses a disk spec; `read_only` is the flag's default (`--disk`, `--root`).
pub fn parse_disk(spec: &str, read_only: bool) -> Result<DiskSpec, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("disk: empty path")?;
    let mut d = DiskSpec {
        path: PathBuf::from(path),
        read_only,
        direct: false,
        id: None,
        format: None,
        backing_dirs: Vec::new(),
    };
    for kv in parts.filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            None if kv == "ro" => d.read_only = true,
            None if kv == "rw" => d.read_only = false,
            Some(("ro", v)) => d.read_only = parse_bool("ro", v)?,
            Some(("direct", v)) => d.direct = parse_bool("direct", v)?,
            Some(("format", v)) => {
                d.format = Some(v.parse().map_err(|e| format!("disk {path}: {e}"))?)
            }
            Some(("backing-dir", v)) if !v.is_empty() => d.backing_dirs.push(PathBuf::from(v)),
            Some(("id", v)) if v.len() <= MAX_DISK_ID && v.is_ascii() => d.id = Some(v.to_string()),
            Some(("id", v)) => {
                return Err(format!(
                    "disk id={v}: at most {MAX_DISK_ID} ASCII characters"
                ))
            }
            _ => return Err(format!("disk {path}: unknown option '{kv}'")),
        }
    }
    Ok(d)
}

/// The disks of `run` in PCI order (root first), and the root= parameter it implies.
pub fn disks(args: &RunArgs) -> Result<(Vec<DiskSpec>, Option<&'static str>), String> {
    let mut disks = Vec::new();
    let root = match (&args.root, &args.rwroot) {
        (Some(_), Some(_)) => return Err("give --root or --rwroot, not both".into()),
        (Some(r), None) => {
            disks.push(parse_disk(r, true)?);
            Some("root=/dev/vda ro")
        }
        (None, Some(r)) => {
            disks.push(parse_disk(r, false)?);
            Some("root=/dev/vda rw")
        }
        (None, None) => None,
    };
    for d in &args.disk {
        disks.push(parse_disk(d, true)?);
    }
    for d in &args.rwdisk {
        disks.push(parse_disk(d, false)?);
    }
    Ok((disks, root))
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
    /// serve without the jail (namespaces, pivot_root, no capabilities, seccomp)
    #[argh(switch)]
    pub disable_sandbox: bool,
    /// log syscalls the seccomp policy does not allow (kernel audit log) instead of killing
    #[argh(switch)]
    pub seccomp_log_failures: bool,
    /// a pipe descriptor to which the process writes how it dies, before it does: a system
    /// call its seccomp policy refused, or a memory fault and its address (ringvm reads it)
    #[argh(option)]
    pub report_fd: Option<i32>,
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

/// The virtio device types `--vhost-user` accepts (the ones ringvm's transport tests).
pub const VHOST_USER_TYPES: [DeviceType; 4] = [
    DeviceType::Block,
    DeviceType::Net,
    DeviceType::Rng,
    DeviceType::Vsock,
];

/// One `--vhost-user` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserSpec {
    pub kind: DeviceType,
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
                kind = Some(
                    DeviceType::from_name(v)
                        .filter(|t| VHOST_USER_TYPES.contains(t))
                        .ok_or_else(|| {
                            format!("--vhost-user type={v}: expected blk, net, rng or vsock")
                        })?,
                )
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
            root: None,
            rwroot: None,
            host_ip: None,
            netmask: None,
            mac: None,
            tap_name: vec![],
            tap_fd: vec![],
            disk: vec![],
            rwdisk: vec![],
            vhost_user: vec![],
            no_rng: false,
            disable_sandbox: false,
            seccomp_log_failures: false,
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
                kind: DeviceType::Block,
                socket: "/run/b.sock".into()
            }
        );
        assert_eq!(
            parse_vhost_user("socket=s,type=rng").expect("valid").kind,
            DeviceType::Rng
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
    fn disk_specs_parse_with_flag_defaults() {
        assert_eq!(
            parse_disk("/img/a.qcow2,direct=true,id=disk-a", false).expect("valid"),
            DiskSpec {
                path: "/img/a.qcow2".into(),
                read_only: false,
                direct: true,
                id: Some("disk-a".into()),
                format: None,
                backing_dirs: Vec::new(),
            }
        );
        assert!(parse_disk("a.img", true).expect("valid").read_only);
        assert!(parse_disk("a.img,ro", false).expect("valid").read_only);
        assert!(!parse_disk("a.img,rw", true).expect("valid").read_only);
        for bad in [
            "",
            ",ro",
            "a,direct=maybe",
            "a,id=123456789012345678901",
            "a,cache=x",
            "a,format=vmdk",
            "a,format=",
            "a,backing-dir=",
        ] {
            assert!(parse_disk(bad, false).is_err(), "{bad}");
        }
        let d = parse_disk(
            "a b.img,ro,direct=true,id=x,format=qcow2,backing-dir=/b,backing-dir=c",
            false,
        )
        .expect("valid");
        assert_eq!(d.format, Some(block::Format::Qcow2));
        assert_eq!(d.backing_dirs, [PathBuf::from("/b"), PathBuf::from("c")]);
        assert_eq!(parse_disk(&d.to_arg(), false), Ok(d));
        let raw = parse_disk("a.img,format=raw", false).expect("valid");
        assert_eq!(raw.format, Some(block::Format::Raw));
        assert_eq!(parse_disk(&raw.to_arg(), false), Ok(raw));
    }

    #[test]
    fn root_disk_comes_first_and_sets_root() {
        let mut args = RunArgs::from_args(&["run"], &["--rwdisk", "c", "-d", "b", "-r", "a", "k"])
            .expect("valid");
        let (list, root) = disks(&args).expect("valid");
        let order: Vec<_> = list.iter().map(|d| (d.path.clone(), d.read_only)).collect();
        assert_eq!(
            order,
            [("a".into(), true), ("b".into(), true), ("c".into(), false)]
        );
        assert_eq!(root, Some("root=/dev/vda ro"));
        args.rwroot = Some("z".into());
        assert!(disks(&args).is_err());
    }

    #[test]
    fn macs_parse_and_multicast_is_refused() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
            "52:54:00:ab:cd:ef"
        );
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nics_come_in_order_with_distinct_macs() {
        let args = RunArgs::from_args(
            &["run"],
            &[
                "--tap-fd",
                "7",
                "--host-ip",
                "10.0.0.1",
                "--netmask",
                "255.255.255.0",
                "--tap-name",
                "t1",
                "k",
            ],
        )
        .expect("valid");
        let nics = nics(&args).expect("valid");
        assert_eq!(nics.len(), 3);
        assert!(matches!(nics[0].tap, TapSource::Create { .. }));
        assert_eq!(nics[1].tap, TapSource::Name("t1".into()));
        assert_eq!(nics[2].tap, TapSource::Fd(7));
        assert_eq!(nics[0].mac, DEFAULT_MAC);
        assert_ne!(nics[1].mac, nics[2].mac);
        let lone = RunArgs::from_args(&["run"], &["--host-ip", "10.0.0.1", "k"]).expect("valid");
        assert!(super::nics(&lone).is_err());
        let mac_only =
            RunArgs::from_args(&["run"], &["--mac", "52:54:00:00:00:01", "k"]).expect("valid");
        assert!(super::nics(&mac_only).is_err());
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
