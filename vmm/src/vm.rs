//! Assembling and running a VM: KVM, memory, kernel, devices, vCPU threads, and the main
//! thread's executor (control socket, serial input, the exit event).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use block::DiskSpec;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::boot;
use crate::cli::{self, NicSpec, RunArgs, SerialOut, SerialSpec, VhostUserSpec};
use crate::control::{self, ControlSocket, ControlTarget};
use crate::cpuid::{self, Toggle};
use crate::devices::attach::{add_devices, Spawned};
use crate::devices::cmos::Cmos;
use crate::devices::i8042::I8042;
use crate::devices::pci::KvmPciVm;
use crate::devices::pci::{
    self, PciConfigPort, PciDeviceInfo, PciMmioWindow, PciRoot, VirtioDevice,
};
use crate::devices::serial::Serial;
use crate::devices::vhost_user::Healing;
use crate::devices::virtiofs;
use crate::devices::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::guest::GuestRam;
use crate::irq::GsiRouting;
use crate::respawn::{Respawner, RestartBudget};
use crate::run_flags::RunSpecs;
use crate::sys;
use crate::vcpu::{self, FilterGate, VcpuContext, VcpuFilter};
use crate::vcpus::VcpuControl;

/// Everything `ringvm run` was asked for, validated.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_mib: u64,
    pub cpus: usize,
    pub cmdline: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub serials: Vec<SerialSpec>,
    pub cpu_toggles: Vec<Toggle>,
    pub kvm_pv: Option<bool>,
    /// Disk images, each served by a virtio-blk device process, in PCI order (root first).
    pub disks: Vec<DiskSpec>,
    /// virtio-net NICs, each served by a device process on its tap, in PCI order.
    pub nics: Vec<NicSpec>,
    /// Add ringvm's virtio-rng device process.
    pub rng: bool,
    /// Device processes from the devices' own `run` flags (`--vsock`), in registry order.
    pub devices: RunSpecs,
    /// Shared directories, each a virtio-fs device served by a virtiofsd process.
    pub shared_dirs: Vec<virtiofs::SharedDir>,
    /// The virtiofsd program (checked), when there are shared directories.
    pub virtiofsd: Option<PathBuf>,
    /// External vhost-user backends, in PCI slot order after ringvm's own devices.
    pub vhost_user: Vec<VhostUserSpec>,
    /// Jail the device processes; seccomp filters on them and on the VMM.
    pub sandbox: bool,
    /// Seccomp filters log what they do not allow instead of killing.
    pub seccomp_log_failures: bool,
    /// Serve GDB here (`--gdb`); the vCPUs wait for a client.
    pub gdb: Option<crate::gdb::GdbAddr>,
    /// `--log-level`, for the VMM and its device processes.
    pub log_level: virtio::log::Level,
    /// How often a device may be restarted (`--device-restarts`); 0 ends the VM at once.
    pub restarts: RestartBudget,
    /// How long an external backend may stay away (`--vhost-user-reconnect`).
    pub reconnect_timeout: Duration,
}

const COM_PORTS: [(u64, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];
/// Where KVM puts the TSS it needs on Intel (3 pages below the IOAPIC-free top of 4 GiB).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// `ringvm run`: builds the config from arguments, runs the VM, maps the exit reason.
pub fn run_from_args(args: RunArgs, devices: RunSpecs) -> Result<()> {
    let serials = cli::validate(&args).map_err(|e| anyhow!(e))?;
    let vhost_user = args.vhost_user.clone();
    let (cpu_toggles, kvm_pv) = args.cpu_features.clone().unwrap_or_default();
    let (disks, root) = cli::disks(&args).map_err(|e| anyhow!(e))?;
    let nics = cli::nics(&args).map_err(|e| anyhow!(e))?;
    let fs_tags: Vec<&str> = vhost_user.iter().filter_map(|v| v.tag.as_deref()).collect();
    let virtiofsd = virtiofs::check(&args.shared_dir, &fs_tags, args.virtiofsd.as_deref())?;
    let mut cmdline = args.params.join(" ");
    // crosvm's --root: the first disk is the root file system, unless the caller chose one.
    if let Some(root) = root {
        if !cmdline.split_whitespace().any(|p| p.starts_with("root=")) {
            let sep = if cmdline.is_empty() { "" } else { " " };
            cmdline = format!("{root}{sep}{cmdline}");
        }
    }
    if let Some(console) = serials.iter().find(|s| s.console) {
        if !cmdline
            .split_whitespace()
            .any(|p| p.starts_with("console="))
        {
            let sep = if cmdline.is_empty() { "" } else { " " };
            let tty = if console.virtio_console {
                "hvc"
            } else {
                "ttyS"
            };
            cmdline = format!("console={tty}{}{sep}{cmdline}", console.num - 1);
        }
    }
    let config = VmConfig {
        mem_mib: args.mem,
        cpus: args.cpus,
        cmdline,
        kernel: args.kernel,
        initrd: args.initrd,
        socket: args.socket,
        serials,
        cpu_toggles,
        kvm_pv,
        disks,
        nics,
        rng: !args.no_rng,
        devices,
        shared_dirs: args.shared_dir.clone(),
        virtiofsd,
        vhost_user,
        sandbox: !args.disable_sandbox,
        seccomp_log_failures: args.seccomp_log_failures,
        restarts: args.device_restarts.unwrap_or_default(),
        reconnect_timeout: Duration::from_secs(args.vhost_user_reconnect),
        gdb: args.gdb,
        log_level: args.log_level,
    };
    virtio::log::set_level(config.log_level);
    match run(&config)? {
        ExitReason::Failed(why) => bail!("{why}"),
        _ => Ok(()),
    }
}

fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => anyhow!("KVM is not available: /dev/kvm does not exist (is the kvm module loaded, is virtualization enabled?)"),
        libc::EACCES | libc::EPERM => anyhow!("no permission to open /dev/kvm (add the user to the kvm group)"),
        _ => anyhow!("cannot open /dev/kvm: {e}"),
    })
}

/// The VM's KVM objects and devices, before the vCPUs start.
/// Field order matters: everything holding the VM fd (the buses' interrupt closures) drops
/// before `ram`, so KVM never keeps a slot over memory that was unmapped.
pub(crate) struct Machine {
    vm: Arc<VmFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// PCI bus 0 (host bridge, virtio devices); also on `pio` (0xCF8) and `mmio` (its window).
    pci: Arc<Mutex<PciRoot>>,
    stdin_serial: Option<Arc<Mutex<Serial>>>,
    exit: Arc<VmExit>,
    /// Where the boot vCPU starts.
    entry: boot::image::Entry,
    ram: GuestRam,
}

impl Machine {
    /// Adds a virtio device in the next PCI slot (00:01.0, 00:02.0, ...) with its BAR0
    /// assigned in the PCI MMIO window. Call before the vCPUs start.
    pub(crate) fn add_virtio_device(&self, device: Box<dyn VirtioDevice>) -> Result<PciDeviceInfo> {
        let name = device.name().to_string();
        self.pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_virtio_device(device)
            .with_context(|| format!("cannot add virtio device {name}"))
    }
}

fn serial_output(spec: &SerialSpec) -> Result<Box<dyn Write + Send>> {
    Ok(match &spec.out {
        SerialOut::Stdout => Box::new(io::stdout()),
        SerialOut::Sink => Box::new(io::sink()),
        SerialOut::File(p) => Box::new(
            File::create(p)
                .with_context(|| format!("cannot create serial file {}", p.display()))?,
        ),
    })
}

/// A kernel or initrd, refused once it is larger than the guest's RAM (`ram` bytes), which it
/// could never fit in: a path such as /dev/zero, or a pipe that never ends, is an error
/// instead of the host's memory.
fn read_image(path: &std::path::Path, ram: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(ram.saturating_add(1))
        .read_to_end(&mut data)?;
    if data.len() as u64 > ram {
        return Err(std::io::Error::other(format!(
            "larger than the guest's {} MiB of memory",
            ram >> 20
        )));
    }
    Ok(data)
}

fn build(config: &VmConfig, kvm: &Kvm) -> Result<Machine> {
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM failed")?);
    let size = config.mem_mib << 20;
    let ram = GuestRam::new(size).map_err(|e| {
        anyhow!(
            "out of memory: cannot allocate {} MiB of guest RAM: {e}",
            config.mem_mib
        )
    })?;
    for (slot, (guest, len, host)) in ram.slots().into_iter().enumerate() {
        sys::set_memory_slot(&vm, slot as u32, guest, len, host)
            .with_context(|| format!("KVM_SET_USER_MEMORY_REGION {guest:#x}+{len:#x}"))?;
    }
    vm.set_tss_address(KVM_TSS_ADDR)
        .context("KVM_SET_TSS_ADDR failed")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP failed")?;
    // One routing table for the VM: KVM's default irqchip routes plus MSI-X routes.
    let routing = GsiRouting::new(vm.clone()).context("cannot set up GSI routing")?;
    let pci_vm = Arc::new(KvmPciVm::new(vm.clone(), Arc::new(Mutex::new(routing))));
    let pci = Arc::new(Mutex::new(PciRoot::new(pci_vm)));
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).context("KVM_CREATE_PIT2 failed")?;

    let kernel = read_image(&config.kernel, size)
        .with_context(|| format!("cannot read kernel {}", config.kernel.display()))?;
    let initrd = match &config.initrd {
        Some(p) => Some(
            read_image(p, size).with_context(|| format!("cannot read initrd {}", p.display()))?,
        ),
        None => None,
    };
    // The kernel is read and parsed here, once: the boot vCPU's entry comes from this load.
    let loaded = boot::load(
        &ram,
        &kernel,
        initrd.as_deref(),
        &config.cmdline,
        config.cpus,
    )
    .with_context(|| format!("cannot boot {}", config.kernel.display()))?;

    let exit = Arc::new(VmExit::new().context("cannot create an eventfd")?);
    let mut pio = Bus::default();
    let mut stdin_serial = None;
    for spec in config.serials.iter().filter(|s| !s.virtio_console) {
        let (port, irq) = COM_PORTS[spec.num as usize - 1];
        let vm_irq = vm.clone();
        let pulse = Box::new(move || {
            // An edge on the ISA line; failures here cannot be reported to the guest.
            let _ = vm_irq.set_irq_line(irq, true);
            let _ = vm_irq.set_irq_line(irq, false);
        });
        let serial = Arc::new(Mutex::new(Serial::new(serial_output(spec)?, pulse)));
        pio.insert(serial.clone(), port, 8)?;
        if spec.stdin {
            stdin_serial = Some(serial);
        }
    }
    let on_reset = {
        let exit = exit.clone();
        Box::new(move || exit.report(ExitReason::Reset))
    };
    pio.insert(Arc::new(Mutex::new(I8042::new(on_reset))), 0x60, 5)?;
    let (below, above) = ram.split_at_4g();
    pio.insert(Arc::new(Mutex::new(Cmos::new(below, above))), 0x70, 2)?;
    pio.insert(
        Arc::new(Mutex::new(PciConfigPort(pci.clone()))),
        pci::CONFIG_PORT_BASE,
        pci::CONFIG_PORT_LEN,
    )?;
    let mut mmio = Bus::default();
    mmio.insert(
        Arc::new(Mutex::new(PciMmioWindow(pci.clone()))),
        pci::MMIO_WINDOW_BASE,
        pci::MMIO_WINDOW_SIZE,
    )?;
    Ok(Machine {
        vm,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        pci,
        stdin_serial,
        exit,
        entry: loaded.entry,
        ram,
    })
}

struct VcpuThread {
    handle: JoinHandle<()>,
    pthread: libc::pthread_t,
}

fn start_vcpus(
    config: &VmConfig,
    kvm: &Kvm,
    m: &Machine,
    stopping: &Arc<AtomicBool>,
    filters: &Arc<FilterGate>,
    gdb: &Option<Arc<crate::gdb::Debugger>>,
    control: &Arc<VcpuControl>,
) -> Result<Vec<VcpuThread>> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID failed")?;
    sys::install_kick_handler().context("cannot install the vCPU kick signal handler")?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let vcpu =
            m.vm.create_vcpu(id as u64)
                .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
        let cpuid = cpuid::for_vcpu(
            &supported,
            id as u8,
            config.cpus as u8,
            &config.cpu_toggles,
            config.kvm_pv,
        );
        vcpu.set_cpuid2(&cpuid)
            .with_context(|| format!("KVM_SET_CPUID2 on vCPU {id}"))?;
        boot::regs::setup_common(&vcpu).with_context(|| format!("set-up of vCPU {id}"))?;
        vcpus.push(vcpu);
    }
    boot::regs::setup_boot_cpu(&vcpus[0], m.entry).context("set-up of the boot vCPU")?;

    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let ctx = VcpuContext {
            id,
            pio: m.pio.clone(),
            mmio: m.mmio.clone(),
            exit: m.exit.clone(),
            stopping: stopping.clone(),
            ram: m.ram.clone(),
            filters: filters.clone(),
            gdb: gdb.clone(),
            control: control.clone(),
        };
        let ended = control.clone();
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _ = tx.send(sys::current_thread());
                vcpu::run(vcpu, ctx);
                ended.thread_ended();
            })
            .with_context(|| format!("cannot start the thread of vCPU {id}"))?;
        let pthread = rx
            .recv()
            .map_err(|_| anyhow!("vCPU {id} thread died at start"))?;
        threads.push(VcpuThread { handle, pthread });
    }
    Ok(threads)
}

/// Kicks every vCPU out of KVM_RUN until all threads have ended.
fn stop_vcpus(threads: Vec<VcpuThread>, stopping: &AtomicBool) {
    stopping.store(true, Ordering::Release);
    let mut last_kick = Instant::now() - Duration::from_secs(1);
    while threads.iter().any(|t| !t.handle.is_finished()) {
        if last_kick.elapsed() >= Duration::from_millis(10) {
            for t in threads.iter().filter(|t| !t.handle.is_finished()) {
                sys::kick_thread(t.pthread);
            }
            last_kick = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        if t.handle.join().is_err() {
            eprintln!("ringvm: a vCPU thread panicked");
        }
    }
}

/// Feeds stdin to the serial port until EOF.
async fn pump_stdin(serial: Arc<Mutex<Serial>>) {
    // A duplicate, so the AsyncFd owning it never closes the process's fd 0.
    let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() else {
        return;
    };
    let stdin = executor::AsyncFd::new(fd);
    loop {
        let (res, buf) = stdin.read(Vec::with_capacity(256)).await;
        match res {
            Ok(0) => return,
            Ok(n) => serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if stdin.poll_readable().await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Opens the gate (without vCPU filters) if nothing opened it: a failed set-up must not
/// leave vCPU threads waiting when they are stopped.
struct OpenOnDrop(Arc<FilterGate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open(VcpuFilter::None);
    }
}

/// Boots the VM and runs it until it ends; returns why it ended.
pub fn run(config: &VmConfig) -> Result<ExitReason> {
    let kvm = open_kvm()?;
    let machine = build(config, &kvm)?;
    let ex =
        executor::Executor::new().context("cannot start the main thread's io_uring executor")?;
    // Declared before anything that can fail, so every path out kills the device processes.
    let mut spawned = Spawned::default();
    let mut host_tasks = Vec::new();
    let (backends, controlled) =
        ex.run_until(add_devices(config, &machine, &mut spawned, &mut host_tasks))?;
    let Spawned {
        processes,
        launches,
        mount_namespaces,
    } = spawned;
    // Forked while this process has one thread, before its seccomp filter: the respawner
    // starts devices again after they die (`respawn`).
    let respawner = if config.restarts.max > 0 && !launches.is_empty() {
        Some(Respawner::start(launches, mount_namespaces)?)
    } else {
        drop((launches, mount_namespaces));
        None
    };
    let heal = Rc::new(Healing {
        respawner,
        processes: processes.clone(),
        budget: config.restarts,
        reconnect_timeout: config.reconnect_timeout,
    });
    let control = match &config.socket {
        Some(p) => {
            let path = control::socket_path(p);
            Some(Rc::new(ControlSocket::bind(&path).with_context(|| {
                format!("cannot bind control socket {}", path.display())
            })?))
        }
        None => None,
    };
    let mut events = machine.exit.events()?;
    let _raw = match config.serials.iter().any(|s| s.stdin) {
        true => sys::RawTerminal::new(0).context("cannot put the terminal in raw mode")?,
        false => None,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let filters = Arc::new(FilterGate::default());
    let vcpu_control = Arc::new(VcpuControl::new(config.cpus));
    // Whatever happens below, the vCPU threads are never left waiting for their filter.
    let _gate = OpenOnDrop(filters.clone());
    let gdb = match &config.gdb {
        Some(addr) => Some(crate::gdb::start(addr, config.cpus, machine.ram.clone())?),
        None => None,
    };
    let threads = start_vcpus(
        config,
        &kvm,
        &machine,
        &stopping,
        &filters,
        &gdb,
        &vcpu_control,
    )?;
    vcpu_control.set_threads(threads.iter().map(|t| t.pthread).collect());
    if let Some(g) = &gdb {
        g.set_threads(threads.iter().map(|t| t.pthread).collect());
    }
    if config.sandbox {
        // After set-up (memory, devices, threads): the VMM's own filter on every thread, then
        // each vCPU thread its narrower one.
        // With --gdb, one policy covers the debugger's calls, the vCPUs' included.
        let name = match gdb {
            Some(_) => seccomp::Policy::VMM_GDB,
            None => seccomp::Policy::VMM,
        };
        let policy = seccomp::Policy::from_name(name).context("the VMM has no seccomp policy")?;
        seccomp::install(policy, config.seccomp_log_failures)
            .context("cannot install the VMM's seccomp filter")?;
        filters.open(match gdb {
            Some(_) => VcpuFilter::None,
            None => VcpuFilter::Install {
                log_failures: config.seccomp_log_failures,
            },
        });
    } else {
        filters.open(VcpuFilter::None);
    }

    let target = Rc::new(ControlTarget::new(
        machine.exit.clone(),
        vcpu_control.clone(),
        controlled,
    ));
    ex.run_until(async {
        if let Some(serial) = machine.stdin_serial.clone() {
            executor::spawn(pump_stdin(serial)).detach();
        }
        if let Some(c) = &control {
            executor::spawn(c.clone().serve(target.clone())).detach();
        }
        for backend in backends {
            let mem = machine.ram.memory().clone();
            executor::spawn(backend.serve(mem, machine.exit.clone(), heal.clone())).detach();
        }
        for task in host_tasks {
            executor::spawn(task).detach();
        }
        // A failed control socket only ends its task; the VM runs until it ends.
        while machine.exit.reason().is_none() {
            if events.next_value().await.is_err() {
                break;
            }
        }
    });
    // Dropping the executor drops the devices' tasks first: a vCPU waiting for a backend's
    // answer gets an error instead of waiting forever.
    drop(ex);
    if let Some(g) = &gdb {
        g.end(u8::from(matches!(
            machine.exit.reason(),
            Some(ExitReason::Failed(_))
        )));
    }
    stop_vcpus(threads, &stopping);
    drop(heal);
    drop(processes);
    Ok(machine
        .exit
        .reason()
        .unwrap_or_else(|| ExitReason::Failed("the VM ended without a reason".into())))
}
