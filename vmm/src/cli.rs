//! Command-line interface (argh), with crosvm's flags and defaults as the reference.

use std::path::PathBuf;

use argh::FromArgs;
use block::DiskSpec;
use net::MacAddress;
use virtio::process::SpecKeys;
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
    Suspend(SuspendArgs),
    Resume(ResumeArgs),
    Stats(StatsArgs),
    Device(DeviceArgs),
}

/// Boot a Linux kernel (bzImage or ELF vmlinux) or any ELF kernel with a PVH note.
// Its field docs are argh's help text, written for the terminal: brackets there mean
// optional parts and <pid> a placeholder, not rustdoc links and HTML.
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
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
    /// serial port: type=stdout|file|sink[,path=P][,num=1-4][,console=BOOL][,stdin=BOOL]
    /// [,hardware=serial|virtio-console]; default type=stdout,num=1,console=true,stdin=true;
    /// type=virtio-console is hardware=virtio-console,type=stdout (the guest's hvcN)
    #[argh(option, from_str_fn(parse_serial))]
    pub serial: Vec<SerialSpec>,
    /// CPUID features to hide or show, e.g. -cx16,+xsaveerptr,-kvm-pv (names as in
    /// /proc/cpuinfo); for hosts that cannot run some instructions in guest kernel mode
    #[argh(option, from_str_fn(parse_cpu_features))]
    pub cpu_features: Option<CpuFeatures>,
    /// read-only root disk image: the first virtio-blk disk, and root=/dev/vda ro on the
    /// kernel command line; PATH[,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]
    #[argh(option, short = 'r', from_str_fn(read_only_disk))]
    pub root: Option<DiskSpec>,
    /// read-write root disk image: like --root, with root=/dev/vda rw
    #[argh(option)]
    pub rwroot: Option<DiskSpec>,
    /// read-only disk image, after the root disk in the order given:
    /// PATH[,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]
    #[argh(option, short = 'd', from_str_fn(read_only_disk))]
    pub disk: Vec<DiskSpec>,
    /// read-write disk image, after the root disk in the order given (with --disk)
    #[argh(option)]
    pub rwdisk: Vec<DiskSpec>,
    /// IP address of the host side of a new tap device (with --netmask): adds a virtio-net NIC
    #[argh(option)]
    pub host_ip: Option<std::net::Ipv4Addr>,
    /// netmask of the host side of the new tap device
    #[argh(option)]
    pub netmask: Option<std::net::Ipv4Addr>,
    /// MAC address of the guest's NIC on the new tap device (default 52:54:00:12:34:56)
    #[argh(option)]
    pub mac: Option<MacAddress>,
    /// an existing (or new, unconfigured) tap device by name: adds a NIC; repeat for several
    #[argh(option)]
    pub tap_name: Vec<String>,
    /// an open tap descriptor inherited by ringvm: adds a NIC; repeat for several
    #[argh(option)]
    pub tap_fd: Vec<i32>,
    /// an external vhost-user device: type=blk|net|rng|vsock|console|fs,socket=PATH[,tag=TAG] (the
    /// backend listens on PATH; fs takes the tag the guest mounts); repeat for several
    #[argh(option, from_str_fn(parse_vhost_user))]
    pub vhost_user: Vec<VhostUserSpec>,
    /// a host directory shared with the guest (virtio-fs through virtiofsd; in the guest
    /// `mount -t virtiofs TAG DIR`): PATH:TAG[:type=fs][:cache=auto|always|never]
    /// [:writeback=BOOL]; repeat for several
    #[argh(option)]
    pub shared_dir: Vec<crate::devices::virtiofs::SharedDir>,
    /// the virtiofsd program that serves --shared-dir (default: virtiofsd in PATH)
    #[argh(option)]
    pub virtiofsd: Option<PathBuf>,
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
    /// serve GDB on 127.0.0.1:PORT or on a unix socket PATH; the guest waits for the first
    /// client before its first instruction
    #[argh(option)]
    pub gdb: Option<crate::gdb::GdbAddr>,
    /// least severe messages written, by the VMM and its device processes: error, warn,
    /// info (the default) or debug
    #[argh(option, default = "virtio::log::Level::Info")]
    pub log_level: virtio::log::Level,
    /// restart a device process that dies, at most N times within SECS seconds (default
    /// 5/60) without resetting the guest; past that (or with 0) its death ends the VM
    #[argh(option)]
    pub device_restarts: Option<crate::respawn::RestartBudget>,
    /// seconds to wait for an external vhost-user backend (--vhost-user) whose socket hung
    /// up to listen on its path again, then reconnect (default 30)
    #[argh(option, default = "30")]
    pub vhost_user_reconnect: u64,
    /// path of the kernel image
    #[argh(positional)]
    pub kernel: PathBuf,
}

/// Run a device as a vhost-user backend, for ringvm or any vhost-user frontend:
/// `ringvm device NAME [--socket PATH | --fd N] [--disable-sandbox] [--seccomp-log-failures]
/// [--report-fd N] [the device's own options]`; `ringvm device NAME --help` lists them.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "device")]
pub struct DeviceArgs {
    /// the device: rng, block or net
    #[argh(positional)]
    pub name: String,
    /// the options every device takes (above) and the device's own
    #[argh(positional, greedy)]
    pub args: Vec<String>,
}

/// The options every device process takes.
#[derive(FromArgs, Debug, Default, PartialEq, Eq)]
#[argh(description = "options every device process takes")]
pub struct CommonArgs {
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
    /// a memfd holding the device's statistics page, which it counts in (ringvm passes it
    /// and reads it for `ringvm stats`)
    #[argh(option)]
    pub stats_fd: Option<i32>,
    /// least severe messages written: error, warn, info (the default) or debug
    #[argh(option, default = "virtio::log::Level::Info")]
    pub log_level: virtio::log::Level,
}

/// The options of [`CommonArgs`] that take a value.
const COMMON_VALUED: &[&str] = &[
    "--socket",
    "--fd",
    "--report-fd",
    "--stats-fd",
    "--log-level",
];
/// The switches of [`CommonArgs`].
const COMMON_SWITCHES: &[&str] = &["--disable-sandbox", "--seccomp-log-failures"];

impl CommonArgs {
    /// Takes the shared options out of `args` (wherever they stand, each with its value);
    /// returns them parsed, and the rest, in order, for the device's own options.
    pub fn split(args: &[String]) -> Result<(CommonArgs, Vec<String>), String> {
        let (mut common, mut own) = (Vec::new(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if COMMON_VALUED.contains(&a.as_str()) {
                common.push(a.as_str());
                common.push(it.next().ok_or_else(|| format!("{a} needs a value"))?);
            } else if COMMON_SWITCHES.contains(&a.as_str()) {
                common.push(a.as_str());
            } else {
                own.push(a.clone());
            }
        }
        let parsed = CommonArgs::from_args(&["ringvm device"], &common)
            .map_err(|e| e.output.trim_end().to_owned())?;
        Ok((parsed, own))
    }

    /// The shared options' help text.
    pub fn help() -> String {
        match CommonArgs::from_args(&["ringvm device NAME"], &["--help"]) {
            Err(e) => e.output,
            Ok(_) => String::new(),
        }
    }
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

/// The tap queue descriptors of a NIC, for `ringvm run` and `ringvm device net` alike:
/// `queues` of them for a tap ringvm creates or opens by name (multi-queue), the one
/// inherited descriptor for `Fd`.
pub fn open_taps(source: &TapSource, queues: usize) -> anyhow::Result<Vec<std::os::fd::OwnedFd>> {
    use anyhow::Context;
    let taps = match source {
        TapSource::Create { ip, netmask } => {
            let taps = net::Tap::create(None, queues).context("cannot create a tap device")?;
            taps[0].configure(*ip, *netmask).with_context(|| {
                format!("cannot configure tap {} as {ip}/{netmask}", taps[0].name())
            })?;
            taps
        }
        TapSource::Name(name) => net::Tap::create(Some(name), queues)
            .with_context(|| format!("cannot open tap {name}"))?,
        TapSource::Fd(fd) => {
            let owned = crate::sys::inherited_fd(*fd)
                .with_context(|| format!("--tap-fd {fd} is not an open descriptor"))?;
            vec![net::Tap::from_fd(owned)
                .with_context(|| format!("--tap-fd {fd} is not a usable tap"))?]
        }
    };
    Ok(taps.into_iter().map(net::Tap::into_fd).collect())
}

/// One virtio-net NIC of `ringvm run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub tap: TapSource,
    pub mac: MacAddress,
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
    let first = args.mac.unwrap_or(MacAddress::DEFAULT);
    Ok(taps
        .into_iter()
        .enumerate()
        .map(|(i, tap)| NicSpec {
            tap,
            mac: first.nth(i),
        })
        .collect())
}

/// `--root` and `--disk`: read-only unless the spec says `rw`.
fn read_only_disk(spec: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(spec, true)
}

/// `--cpu-features`: the CPUID toggles, and whether to show the KVM paravirtual leaves.
pub type CpuFeatures = (Vec<crate::cpuid::Toggle>, Option<bool>);

fn parse_cpu_features(spec: &str) -> Result<CpuFeatures, String> {
    crate::cpuid::parse_toggles(spec)
}

/// The disks of `run` in PCI order (root first), and the root= parameter it implies.
pub fn disks(args: &RunArgs) -> Result<(Vec<DiskSpec>, Option<&'static str>), String> {
    let mut disks = Vec::new();
    let root = match (&args.root, &args.rwroot) {
        (Some(_), Some(_)) => return Err("give --root or --rwroot, not both".into()),
        (Some(r), None) => {
            disks.push(r.clone());
            Some("root=/dev/vda ro")
        }
        (None, Some(r)) => {
            disks.push(r.clone());
            Some("root=/dev/vda rw")
        }
        (None, None) => None,
    };
    disks.extend(args.disk.iter().cloned());
    disks.extend(args.rwdisk.iter().cloned());
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
pub const VHOST_USER_TYPES: [DeviceType; 6] = [
    DeviceType::Block,
    DeviceType::Net,
    DeviceType::Rng,
    DeviceType::Vsock,
    DeviceType::Console,
    DeviceType::Fs,
];

/// One `--vhost-user` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserSpec {
    pub kind: DeviceType,
    pub socket: PathBuf,
    /// virtio-fs: the tag the guest mounts.
    pub tag: Option<String>,
}

/// Parses one `--vhost-user` value.
pub fn parse_vhost_user(spec: &str) -> Result<VhostUserSpec, String> {
    let mut kind = None;
    let mut socket = None;
    let mut tag = None;
    let mut keys = SpecKeys::default();
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("'{kv}' is not key=value"))?;
        match k {
            "type" => {
                kind = Some(
                    DeviceType::from_name(v)
                        .filter(|t| VHOST_USER_TYPES.contains(t))
                        .ok_or_else(|| {
                            format!("type={v}: expected blk, net, rng, vsock, console or fs")
                        })?,
                )
            }
            "tag" => {
                crate::devices::virtiofs::check_tag(v)?;
                tag = Some(v.to_owned());
            }
            "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            "socket" => return Err("socket= is empty".into()),
            _ => return Err(format!("unknown key '{k}'")),
        }
        keys.once(k)?;
    }
    let kind = kind.ok_or("type= is missing")?;
    match (kind, &tag) {
        (DeviceType::Fs, None) => return Err("type=fs needs tag=".into()),
        (DeviceType::Fs, Some(_)) | (_, None) => {}
        (_, Some(_)) => return Err("tag= is for type=fs only".into()),
    }
    Ok(VhostUserSpec {
        kind,
        socket: socket.ok_or("socket= is missing")?,
        tag,
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

/// Suspend a VM through its control socket: its vCPUs stop and its devices finish what they
/// have in flight and take no more requests until `ringvm resume`.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "suspend")]
pub struct SuspendArgs {
    /// path of the VM's control socket
    #[argh(positional)]
    pub socket: PathBuf,
}

/// Resume a suspended VM through its control socket.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "resume")]
pub struct ResumeArgs {
    /// path of the VM's control socket
    #[argh(positional)]
    pub socket: PathBuf,
}

/// Print a VM's statistics (vCPU exits, device queues, device processes) as a table.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stats")]
pub struct StatsArgs {
    /// print the raw JSON response instead of a table
    #[argh(switch)]
    pub json: bool,
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
    /// COM number, 1 to 4 (of a virtio console: hvc0 to hvc3).
    pub num: u8,
    pub console: bool,
    pub stdin: bool,
    /// An 8250 UART, or a virtio-console device process.
    pub virtio_console: bool,
}

impl Default for SerialSpec {
    fn default() -> Self {
        SerialSpec {
            out: SerialOut::Stdout,
            num: 1,
            console: true,
            stdin: true,
            virtio_console: false,
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected true or false")),
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
    let mut keys = SpecKeys::default();
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("'{kv}' is not key=value"))?;
        match k {
            // crosvm's `hardware=`; ringvm also takes the device as the type (and so gives
            // both).
            "type" if v == "virtio-console" => {
                keys.once("hardware")?;
                s.virtio_console = true
            }
            "hardware" => {
                s.virtio_console = match v {
                    "serial" => false,
                    "virtio-console" => true,
                    _ => return Err(format!("hardware={v}: expected serial or virtio-console")),
                }
            }
            "type" => kind = Some(v.to_string()),
            "path" => path = Some(PathBuf::from(v)),
            "num" => {
                s.num = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=4).contains(n))
                    .ok_or_else(|| format!("num={v}: expected 1 to 4"))?
            }
            "console" => s.console = parse_bool(k, v)?,
            "stdin" => s.stdin = parse_bool(k, v)?,
            _ => return Err(format!("unknown key '{k}'")),
        }
        keys.once(k)?;
    }
    s.out = match (kind.as_deref(), path) {
        (Some("stdout") | None, None) => SerialOut::Stdout,
        (Some("file"), Some(p)) => SerialOut::File(p),
        (Some("file"), None) => return Err("type=file needs path=".into()),
        (Some("sink"), None) => SerialOut::Sink,
        (Some(t), Some(_)) if t != "file" => return Err(format!("type={t} takes no path")),
        (Some(t), _) => return Err(format!("type={t}: expected stdout, file or sink")),
        (None, Some(_)) => return Err("path= needs type=file".into()),
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
        args.serial.clone()
    };
    for (i, a) in serials.iter().enumerate() {
        if serials[..i]
            .iter()
            .any(|b| b.num == a.num && b.virtio_console == a.virtio_console)
        {
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
                stdin: false,
                virtio_console: false,
            }
        );
        for spec in [
            "type=virtio-console,stdin=true",
            "hardware=virtio-console,type=stdout,stdin=true",
        ] {
            let s = parse_serial(spec).expect(spec);
            assert!(s.virtio_console && s.stdin && s.out == SerialOut::Stdout);
        }
        let to_file = parse_serial("hardware=virtio-console,type=file,path=/tmp/c").expect("valid");
        assert_eq!(to_file.out, SerialOut::File("/tmp/c".into()));
        assert!(parse_serial("hardware=debugcon").is_err());
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
            shared_dir: vec![],
            virtiofsd: None,
            no_rng: false,
            disable_sandbox: false,
            seccomp_log_failures: false,
            gdb: None,
            log_level: virtio::log::Level::Info,
            device_restarts: None,
            vhost_user_reconnect: 30,
            kernel: "k".into(),
        };
        assert!(validate(&args(256, 1)).is_ok());
        assert!(validate(&args(1, 1)).is_err());
        assert!(validate(&args(256, 0)).is_err());
        assert!(validate(&args(256, 300)).is_err());
        let mut a = args(256, 1);
        a.serial = vec![
            parse_serial("num=1").expect("valid"),
            parse_serial("num=1").expect("valid"),
        ];
        assert!(validate(&a).is_err());
    }

    #[test]
    fn vhost_user_specs_parse() {
        assert_eq!(
            parse_vhost_user("type=blk,socket=/run/b.sock").expect("valid"),
            VhostUserSpec {
                kind: DeviceType::Block,
                socket: "/run/b.sock".into(),
                tag: None,
            }
        );
        let fs = parse_vhost_user("type=fs,socket=/run/fs.sock,tag=share").expect("valid");
        assert_eq!(
            (fs.kind, fs.tag.as_deref()),
            (DeviceType::Fs, Some("share"))
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
            "type=fs,socket=s",
            "type=fs,socket=s,tag=",
            "type=blk,socket=s,tag=t",
        ] {
            assert!(parse_vhost_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_specs_are_refused_by_the_flag_that_gave_them() {
        for (flag, value, says) in [
            (
                "--rwdisk",
                "a.img,direct=maybe",
                "direct=maybe: expected true or false",
            ),
            ("-d", "a.img,format=vmdk", "unknown image format 'vmdk'"),
            (
                "--serial",
                "console=maybe",
                "console=maybe: expected true or false",
            ),
            ("--mac", "01:00:5e:00:00:01", "a multicast address"),
            (
                "--vhost-user",
                "type=gpu,socket=s",
                "type=gpu: expected blk",
            ),
            ("--cpu-features", "+nosuchflag", "nosuchflag"),
        ] {
            let err = RunArgs::from_args(&["run"], &[flag, value, "k"])
                .expect_err(value)
                .output;
            assert!(
                err.contains(&format!("option '{flag}'")) && err.contains(says),
                "{flag} {value}: {err}"
            );
        }
        // Read-only by the flag's default, read-write by the spec's word.
        let args = RunArgs::from_args(&["run"], &["-d", "a,rw", "-r", "b", "--rwdisk", "c", "k"])
            .expect("valid");
        assert!(!args.disk[0].read_only && args.root.as_ref().expect("root").read_only);
        assert!(!args.rwdisk[0].read_only);
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
        args.rwroot = Some("z".parse().expect("valid"));
        assert!(disks(&args).is_err());
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
        assert_eq!(nics[0].mac, MacAddress::DEFAULT);
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
