//! Putting the virtio devices on the PCI bus: starting ringvm's own device processes (their
//! launches kept for restarts) or connecting to `--vhost-user` backends and virtiofsd, then
//! attaching each as a vhost-user device the VMM controls.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{anyhow, bail, Context, Result};
use virtio::{DeviceProcess, DeviceType};

use crate::cli::{self, SerialOut, SerialSpec};
use crate::control::{ControlledDevice, ProcessStats};
use crate::device_process::{self, DeviceProcesses, Launch};
use crate::devices::pci::VirtioDevice;
use crate::devices::vhost_user::{self, Origin};
use crate::devices::virtiofs;
use crate::sys;
use crate::vm::{Machine, VmConfig};

/// The device processes started so far, and what each of ringvm's own was started from
/// (slot N of the respawner is `launches[N]`).
#[derive(Default)]
pub(crate) struct Spawned {
    pub(crate) processes: DeviceProcesses,
    pub(crate) launches: Vec<Launch>,
    /// The mount namespace of each launch's process, for the respawner to hold.
    pub(crate) mount_namespaces: Vec<Option<std::fs::File>>,
}

/// A started backend: the VMM's end of its socket, its statistics, where it comes from.
type Attachable = (OwnedFd, Option<ProcessStats>, Origin);

/// Starts (or connects to) every virtio device's vhost-user backend and puts the devices on
/// the PCI bus: ringvm's own device processes first, then `--vhost-user` backends.
pub(crate) async fn add_devices(
    config: &VmConfig,
    machine: &Machine,
    processes: &mut Spawned,
    host_tasks: &mut Vec<virtio::process::HostTask>,
) -> Result<(Vec<vhost_user::Backend>, Vec<ControlledDevice>)> {
    let mut backends = Vec::new();
    let mut controlled = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("block{i}");
        let options = block::BlockArgs {
            file: disk.clone(),
            // One request queue per vCPU, like crosvm.
            queues: config.cpus,
            // A restarted process must find the writes its predecessor completed.
            metadata_write_through: config.restarts.max > 0,
        };
        let sock = spawn_device::<block::BlockProcess>(config, processes, &name, &options, &[])?;
        backends.push(attach(machine, &mut controlled, &name, DeviceType::Block, sock).await?);
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let name = format!("net{i}");
        let taps =
            cli::open_taps(&nic.tap, config.cpus).with_context(|| format!("device {name}"))?;
        let options = net::NetArgs {
            tap_fd: (0..taps.len())
                .map(|i| (device_process::FIRST_EXTRA_FD + i) as i32)
                .collect(),
            tap_name: None,
            queue_pairs: 1,
            mac: Some(nic.mac),
        };
        let borrowed: Vec<_> = taps.iter().map(|t| t.as_fd()).collect();
        let sock = spawn_device::<net::NetProcess>(config, processes, &name, &options, &borrowed)?;
        backends.push(attach(machine, &mut controlled, &name, DeviceType::Net, sock).await?);
    }
    if config.rng {
        let options = virtio::rng::RngOptions {};
        let sock = spawn_device::<virtio::RngProcess>(config, processes, "rng", &options, &[])?;
        backends.push(attach(machine, &mut controlled, "rng", DeviceType::Rng, sock).await?);
    }
    add_consoles(config, machine, processes, &mut backends, &mut controlled).await?;
    // Devices from their own `run` flags, each planned (its host side, in this process) right
    // before its process starts.
    let names = crate::run_flags::names(&config.devices);
    for (spec, name) in config.devices.iter().zip(names) {
        let planned = crate::run_flags::plan(spec.as_ref(), &name)?;
        let fds: Vec<_> = planned.fds.iter().map(|f| f.as_fd()).collect();
        let kind = spec.device_type();
        let sock = spawn_process(config, processes, &name, kind, planned.args, &fds)?;
        host_tasks.extend(planned.host);
        backends.push(attach(machine, &mut controlled, &name, kind, sock).await?);
    }
    for (i, dir) in config.shared_dirs.iter().enumerate() {
        let name = format!("fs{i}");
        let program = config
            .virtiofsd
            .as_deref()
            .context("--shared-dir without virtiofsd")?;
        let (process, sock) = virtiofs::start(program, &name, dir)?;
        let process = processes.processes.push(process);
        let origin = Origin::Program { process };
        let fs = attach_fs(machine, &mut controlled, &name, &dir.tag, sock, origin);
        backends.push(fs.await?);
    }
    for spec in &config.vhost_user {
        let name = format!("{} ({})", spec.kind.name(), spec.socket.display());
        let sock = vhost_user::connect_socket(&spec.socket)
            .await
            .with_context(|| format!("device {name}: cannot connect"))?
            .into_owned()
            .map_err(|_| anyhow!("device {name}: the socket is not a plain descriptor"))?;
        let origin = Origin::External {
            path: spec.socket.clone(),
        };
        match &spec.tag {
            Some(tag) => {
                let fs = attach_fs(machine, &mut controlled, &name, tag, sock, origin).await?;
                backends.push(fs);
            }
            None => {
                let started = (sock, None, origin);
                let device = attach(machine, &mut controlled, &name, spec.kind, started);
                backends.push(device.await?);
            }
        }
    }
    Ok((backends, controlled))
}

/// The virtio consoles (`--serial hardware=virtio-console`), hvc0 first: each a device
/// process given its output (and, for the one reading stdin, its input) by this process.
async fn add_consoles(
    config: &VmConfig,
    machine: &Machine,
    processes: &mut Spawned,
    backends: &mut Vec<vhost_user::Backend>,
    controlled: &mut Vec<ControlledDevice>,
) -> Result<()> {
    let mut consoles: Vec<&SerialSpec> =
        config.serials.iter().filter(|s| s.virtio_console).collect();
    consoles.sort_by_key(|s| s.num);
    for spec in consoles {
        let name = format!("console{}", spec.num - 1);
        let output: OwnedFd = match &spec.out {
            SerialOut::Stdout => io::stdout().as_fd().try_clone_to_owned()?,
            SerialOut::Sink => File::options().write(true).open("/dev/null")?.into(),
            SerialOut::File(p) => File::create(p)
                .with_context(|| format!("cannot create console file {}", p.display()))?
                .into(),
        };
        let size = match spec.out {
            SerialOut::Stdout => sys::terminal_size(1),
            _ => None,
        };
        let mut fds = vec![output];
        if spec.stdin {
            fds.push(io::stdin().as_fd().try_clone_to_owned()?);
        }
        let options = console::ConsoleArgs {
            stream_fd: (0..fds.len())
                .map(|i| (device_process::FIRST_EXTRA_FD + i) as i32)
                .collect(),
            cols: size.map(|s| s.0),
            rows: size.map(|s| s.1),
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let sock =
            spawn_device::<console::ConsoleProcess>(config, processes, &name, &options, &borrowed)?;
        backends.push(attach(machine, controlled, &name, DeviceType::Console, sock).await?);
    }
    Ok(())
}

/// Starts `ringvm device <P's name> <options>` for device `name` (kept in `processes`, its
/// launch too, for restarts), with `fds` as descriptors 4, 5, ...; returns the VMM's end of
/// its vhost-user socket, its statistics and where it comes from.
fn spawn_device<P: DeviceProcess>(
    config: &VmConfig,
    processes: &mut Spawned,
    name: &str,
    options: &P::Options,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Attachable> {
    spawn_process(config, processes, name, P::TYPE, P::to_args(options), fds)
}

/// [`spawn_device`] for a device of type `kind` whose arguments are already made (a device
/// from its own `run` flags).
fn spawn_process(
    config: &VmConfig,
    processes: &mut Spawned,
    name: &str,
    kind: DeviceType,
    mut args: Vec<std::ffi::OsString>,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Attachable> {
    // Its statistics page goes after its own descriptors (`ringvm stats` reads it).
    let page = ProcessStats::page().with_context(|| format!("device {name}: statistics page"))?;
    let mut fds = fds.to_vec();
    args.extend([
        "--stats-fd".into(),
        (device_process::FIRST_EXTRA_FD + fds.len())
            .to_string()
            .into(),
        "--log-level".into(),
        config.log_level.name().into(),
    ]);
    fds.push(page.fd());
    let fds = fds
        .iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("device {name}: cannot duplicate its descriptors"))?;
    let launch = Launch {
        name: name.to_string(),
        kind: kind.name().to_string(),
        args,
        fds,
        sandbox: config.sandbox,
        seccomp_log_failures: config.seccomp_log_failures,
    };
    let (process, sock) = launch.spawn(false)?;
    let pid = process.pid();
    let process = processes.processes.push(process);
    let slot = u32::try_from(processes.launches.len()).context("too many devices")?;
    processes.launches.push(launch);
    // Held by the respawner, which runs only with restarts on.
    let mount_namespace = (config.restarts.max > 0)
        .then(|| crate::respawn::mount_namespace(pid))
        .flatten();
    processes.mount_namespaces.push(mount_namespace);
    let stats = ProcessStats::new(pid, page)
        .with_context(|| format!("device {name}: cannot open /proc/{pid}"))?;
    Ok((sock, Some(stats), Origin::Own { process, slot }))
}

/// Sets up the vhost-user backend on `sock` and puts its device on the PCI bus.
async fn attach(
    machine: &Machine,
    controlled: &mut Vec<ControlledDevice>,
    name: &str,
    device_type: DeviceType,
    (sock, stats, origin): Attachable,
) -> Result<vhost_user::Backend> {
    let (device, mut backend) = vhost_user::connect(name, device_type, sock, origin).await?;
    if let Some(stats) = &stats {
        backend.track_process(stats.proc_files());
    }
    controlled.push(ControlledDevice {
        name: name.to_string(),
        kind: device_type,
        queues: device.num_queues(),
        control: device.control(),
        restarts: device.restarts(),
        process: stats,
    });
    machine.add_virtio_device(Box::new(device))?;
    Ok(backend)
}

/// [`attach`] for a virtio-fs backend: the configuration space (tag, request queues) is
/// this side's.
async fn attach_fs(
    machine: &Machine,
    controlled: &mut Vec<ControlledDevice>,
    name: &str,
    tag: &str,
    sock: OwnedFd,
    origin: Origin,
) -> Result<vhost_user::Backend> {
    let (mut device, backend) = vhost_user::connect(name, DeviceType::Fs, sock, origin).await?;
    if device.num_queues() < 2 {
        bail!(
            "device {name}: the backend has {} queue(s); virtio-fs needs a high-priority \
             queue and a request queue",
            device.num_queues()
        );
    }
    device.set_config_space(virtiofs::config(tag, device.num_queues()));
    controlled.push(ControlledDevice {
        name: name.to_string(),
        kind: DeviceType::Fs,
        queues: device.num_queues(),
        control: device.control(),
        restarts: device.restarts(),
        process: None,
    });
    machine.add_virtio_device(Box::new(device))?;
    Ok(backend)
}
