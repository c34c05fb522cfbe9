//! Real processes, nothing mocked: this test binary (`harness = false`) re-executes itself as
//! the child (`<exe> jail-child MODE ARGS...`), which calls `jail::enter` and reports probes
//! through a pipe passed as descriptor 3.
//!
//! Run one test: `cargo test -p jail --test jail -- NAME` (a substring filter).

// A test binary: with `harness = false` clippy's allow-unwrap-in-tests does not see it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jail::{spawn, Child, Error, ExitStatus, Limits, Sandbox};

const CHILD_MARK: &str = "jail-child";
/// `CAP_SYS_ADMIN` of `<linux/capability.h>`.
const CAP_SYS_ADMIN: u32 = 21;
const JAILED: Sandbox = Sandbox { enabled: true };
const UNJAILED: Sandbox = Sandbox { enabled: false };
const LIMITS: Limits = Limits {
    nofile: 64,
    memlock: 8 << 20,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_MARK) {
        child_main(&args[2..]);
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests: &[(&str, fn())] = &[
        ("jailed_probes_are_denied", jailed_probes_are_denied),
        ("unjailed_probes_succeed", unjailed_probes_succeed),
        (
            "passed_fds_land_in_order_even_when_numbers_collide",
            passed_fds_land_in_order_even_when_numbers_collide,
        ),
        (
            "missing_program_is_exec_enoent",
            missing_program_is_exec_enoent,
        ),
        ("exit_status_is_reported", exit_status_is_reported),
        (
            "child_environment_is_empty_in_and_out_of_the_jail",
            child_environment_is_empty_in_and_out_of_the_jail,
        ),
        (
            "kill_try_wait_and_wait_report_sigkill",
            kill_try_wait_and_wait_report_sigkill,
        ),
        (
            "pid_namespace_init_ignores_sigterm",
            pid_namespace_init_ignores_sigterm,
        ),
        (
            "parent_death_kills_jailed_child",
            parent_death_kills_jailed_child,
        ),
        (
            "spawning_thread_exit_kills_child",
            spawning_thread_exit_kills_child,
        ),
        ("spawn_from_many_threads", spawn_from_many_threads),
        ("user_namespace_when_not_root", user_namespace_when_not_root),
        (
            "enter_refuses_outside_spawned_namespaces",
            enter_refuses_outside_spawned_namespaces,
        ),
        ("measure_spawn_and_enter", measure_spawn_and_enter),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let ok = std::panic::catch_unwind(test).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!();
    println!(
        "test result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    std::process::exit(i32::from(failed != 0));
}

// ---------------------------------------------------------------- parent side helpers

/// The environment spawned children see.
fn child_environment(sandbox: &Sandbox) -> String {
    let (r, w) = pipe();
    let child = spawn_mode(&["env"], &[w.as_fd()], sandbox);
    drop(w);
    let mut seen = String::new();
    BufReader::new(r).read_to_string(&mut seen).unwrap();
    assert!(child.wait().unwrap().success());
    seen
}

fn child_environment_is_empty_in_and_out_of_the_jail() {
    // This process has an environment (cargo sets several variables); RUST_BACKTRACE would
    // make every error of a jailed device capture a backtrace.
    assert!(
        std::env::vars_os().next().is_some(),
        "the test has no environment"
    );
    for sandbox in [JAILED, UNJAILED] {
        let seen = child_environment(&sandbox);
        assert_eq!(seen, "", "{sandbox:?}: the child inherited an environment");
    }
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn spawn_mode(mode: &[&str], fds: &[BorrowedFd<'_>], sandbox: &Sandbox) -> Child {
    let mut args: Vec<&OsStr> = vec![OsStr::new(CHILD_MARK)];
    args.extend(mode.iter().map(OsStr::new));
    spawn(&exe(), &args, fds, sandbox).unwrap()
}

fn pipe() -> (File, File) {
    let (r, w) = sys::pipe();
    (File::from(r), File::from(w))
}

/// Runs the probe child and returns its `key=value` report.
fn run_probes(sandbox: &Sandbox, port: u16) -> BTreeMap<String, String> {
    let (report_r, report_w) = pipe();
    let (extra_r, _extra_w) = pipe();
    let enabled = if sandbox.enabled { "1" } else { "0" };
    let host_path = exe();
    let child = spawn_mode(
        &[
            "probe",
            enabled,
            host_path.to_str().unwrap(),
            &port.to_string(),
            &std::process::id().to_string(),
        ],
        &[report_w.as_fd(), extra_r.as_fd()],
        sandbox,
    );
    drop(report_w);
    let mut report = String::new();
    BufReader::new(report_r)
        .read_to_string(&mut report)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status,
        ExitStatus::Exited(0),
        "probe child {status}: {report}"
    );
    let map: BTreeMap<String, String> = report
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    println!("probes (sandbox {}): {map:?}", sandbox.enabled);
    map
}

fn get<'a>(map: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    map.get(key)
        .unwrap_or_else(|| panic!("no probe {key} in {map:?}"))
}

fn errno_of(value: &str) -> i32 {
    value
        .strip_prefix("err:")
        .unwrap_or_else(|| panic!("expected an error, got {value}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------- tests

fn jailed_probes_are_denied() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let p = run_probes(&JAILED, port);
    // An empty root: host paths are gone, / is unreadable (mode 0) or empty, read-only.
    assert!(get(&p, "open_host").starts_with("err:"));
    let list = get(&p, "list_root");
    assert!(
        list == "entries=0" || list == format!("err:{}", libc::EACCES),
        "{list}"
    );
    assert!(get(&p, "create_in_root").starts_with("err:"));
    // New network namespace: lo is down.
    assert_eq!(errno_of(get(&p, "connect_loopback")), libc::ENETUNREACH);
    assert_eq!(errno_of(get(&p, "mount")), libc::EPERM);
    assert_eq!(get(&p, "caps"), "0,0,0");
    assert_eq!(get(&p, "bounding_cap_sys_admin"), "0");
    assert_eq!(get(&p, "bounding_count"), "0");
    assert_eq!(get(&p, "no_new_privs"), "1");
    assert_eq!(get(&p, "securebits"), "239");
    assert_eq!(errno_of(get(&p, "setuid_nobody")), libc::EPERM);
    assert_eq!(errno_of(get(&p, "capset_raise")), libc::EPERM);
    assert!(get(&p, "ptrace_parent").starts_with("err:"));
    assert_eq!(get(&p, "getpid"), "1");
    assert_eq!(get(&p, "open_fds"), "0,1,2,3,4");
    assert_eq!(get(&p, "stdin_dev_null"), "1");
    assert_eq!(get(&p, "rlimit_nofile"), "64");
    assert_eq!(get(&p, "rlimit_core"), "0");
    assert_eq!(get(&p, "rlimit_nproc"), "0");
    assert_eq!(get(&p, "rlimit_memlock"), (8u64 << 20).to_string());
    // Not asserted: RLIMIT_NPROC is not enforced for uid 0 of the initial user namespace.
    println!("fork in jail (uid 0): {}", get(&p, "fork"));
}

fn unjailed_probes_succeed() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let p = run_probes(&UNJAILED, port);
    assert_eq!(get(&p, "open_host"), "ok");
    assert!(get(&p, "list_root").starts_with("entries="));
    assert_ne!(get(&p, "list_root"), "entries=0");
    assert_eq!(get(&p, "connect_loopback"), "ok");
    assert_ne!(get(&p, "caps"), "0,0,0");
    assert_eq!(get(&p, "bounding_cap_sys_admin"), "1");
    assert_ne!(get(&p, "getpid"), "1");
    assert_eq!(get(&p, "no_new_privs"), "1");
    assert_eq!(get(&p, "rlimit_core"), "0");
    assert_eq!(get(&p, "open_fds"), "0,1,2,3,4");
    assert_eq!(get(&p, "stdin_dev_null"), "1");
}

fn passed_fds_land_in_order_even_when_numbers_collide() {
    // 16 pipes: their write ends are low numbers, so passing them reversed makes sources
    // and targets 3..19 overlap.
    let pipes: Vec<(File, File)> = (0..16).map(|_| pipe()).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().rev().map(|(_, w)| w.as_fd()).collect();
    for sandbox in [JAILED, UNJAILED] {
        let child = spawn_mode(&["fdmap", "16"], &fds, &sandbox);
        assert_eq!(child.wait().unwrap(), ExitStatus::Exited(0));
        for (i, (r, _)) in pipes.iter().rev().enumerate() {
            let mut byte = [0u8];
            (&*r).read_exact(&mut byte).unwrap();
            assert_eq!(
                byte[0] as usize,
                i,
                "descriptor {} got the wrong pipe",
                3 + i
            );
        }
    }
}

fn missing_program_is_exec_enoent() {
    for sandbox in [JAILED, UNJAILED] {
        let err = spawn(
            std::path::Path::new("/nonexistent/ringvm-device"),
            &[],
            &[],
            &sandbox,
        )
        .unwrap_err();
        match &err {
            Error::Exec { program, source } => {
                assert_eq!(program, std::path::Path::new("/nonexistent/ringvm-device"));
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("expected Error::Exec, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "failed to execute /nonexistent/ringvm-device"
        );
    }
}

fn exit_status_is_reported() {
    for sandbox in [JAILED, UNJAILED] {
        let child = spawn_mode(&["exit", "3"], &[], &sandbox);
        let status = child.wait().unwrap();
        assert_eq!(status, ExitStatus::Exited(3));
        assert_eq!(status.to_string(), "exited with status 3");
        // Reaped once; later calls return the same status.
        assert_eq!(child.try_wait().unwrap(), Some(ExitStatus::Exited(3)));
        child.kill().unwrap();
    }
}

fn kill_try_wait_and_wait_report_sigkill() {
    for sandbox in [JAILED, UNJAILED] {
        let child = spawn_mode(&["sleep"], &[], &sandbox);
        assert_eq!(child.try_wait().unwrap(), None);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status, ExitStatus::Signaled(libc::SIGKILL));
        assert_eq!(status.to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(child.try_wait().unwrap(), Some(status));
        child.kill().unwrap();
    }
}

fn pid_namespace_init_ignores_sigterm() {
    let child = spawn_mode(&["sleep"], &[], &JAILED);
    sys::kill(child.pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "PID-namespace init died of SIGTERM"
    );
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap(), ExitStatus::Signaled(libc::SIGKILL));

    // Unjailed, the same signal kills it.
    let child = spawn_mode(&["sleep"], &[], &UNJAILED);
    sys::kill(child.pid, libc::SIGTERM);
    assert_eq!(child.wait().unwrap(), ExitStatus::Signaled(libc::SIGTERM));
}

fn parent_death_kills_jailed_child() {
    for jailed in ["1", "0"] {
        let (pid_r, pid_w) = pipe();
        let middle = spawn_mode(&["middle", jailed], &[pid_w.as_fd()], &UNJAILED);
        drop(pid_w);
        let mut line = String::new();
        BufReader::new(pid_r).read_line(&mut line).unwrap();
        let pid: i32 = line.trim().parse().unwrap();
        let grandchild = sys::pidfd_open(pid);
        assert!(
            !sys::poll_readable(grandchild.as_fd(), 0),
            "grandchild ended early"
        );
        middle.kill().unwrap();
        assert_eq!(middle.wait().unwrap(), ExitStatus::Signaled(libc::SIGKILL));
        assert!(
            sys::poll_readable(grandchild.as_fd(), 5000),
            "grandchild (jailed {jailed}) outlived its parent"
        );
    }
}

/// PR_SET_PDEATHSIG follows the spawning *thread*: documents why `spawn` belongs on a
/// long-lived thread.
fn spawning_thread_exit_kills_child() {
    let child = std::thread::spawn(|| spawn_mode(&["sleep"], &[], &UNJAILED))
        .join()
        .unwrap();
    assert_eq!(child.wait().unwrap(), ExitStatus::Signaled(libc::SIGKILL));
}

fn spawn_from_many_threads() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..5 {
                    let code = t * 10 + i;
                    let sandbox = if i % 2 == 0 { JAILED } else { UNJAILED };
                    let child = spawn_mode(&["exit", &code.to_string()], &[], &sandbox);
                    assert_eq!(child.wait().unwrap(), ExitStatus::Exited(code));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A non-root parent (an intermediate process that dropped to nobody) gets a user namespace
/// in which the device is root, and `enter` still confines it.
fn user_namespace_when_not_root() {
    let (report_r, report_w) = pipe();
    let middle = spawn_mode(&["as-nobody-probe"], &[report_w.as_fd()], &UNJAILED);
    drop(report_w);
    let mut report = String::new();
    BufReader::new(report_r)
        .read_to_string(&mut report)
        .unwrap();
    let status = middle.wait().unwrap();
    assert_eq!(status, ExitStatus::Exited(0), "{report}");
    println!("user namespace probes: {report:?}");
    let p: BTreeMap<String, String> = report
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(get(&p, "getpid"), "1");
    assert_eq!(get(&p, "caps"), "0,0,0");
    assert_eq!(get(&p, "bounding_count"), "0");
    assert!(get(&p, "open_host").starts_with("err:"));
    assert_eq!(errno_of(get(&p, "mount")), libc::EPERM);
    assert_eq!(errno_of(get(&p, "connect_loopback")), libc::ENETUNREACH);
    assert_eq!(get(&p, "open_fds"), "0,1,2,3");
    assert!(get(&p, "setuid_nobody").starts_with("err:"));
    // Real uid is nobody: RLIMIT_NPROC 0 is enforced.
    assert_eq!(errno_of(get(&p, "fork")), libc::EAGAIN);
}

/// A sandboxed `enter` in a process that was spawned without a sandbox (host namespaces)
/// must fail before touching any mount.
fn enter_refuses_outside_spawned_namespaces() {
    let child = spawn_mode(&["enter-host"], &[], &UNJAILED);
    assert_eq!(child.wait().unwrap(), ExitStatus::Exited(0));
}

fn measure_spawn_and_enter() {
    for sandbox in [JAILED, UNJAILED] {
        let mut spawned = Vec::new();
        let mut entered = Vec::new();
        for _ in 0..20 {
            let (ready_r, ready_w) = pipe();
            let enabled = if sandbox.enabled { "1" } else { "0" };
            let start = Instant::now();
            let child = spawn_mode(&["ready", enabled], &[ready_w.as_fd()], &sandbox);
            spawned.push(start.elapsed());
            drop(ready_w);
            let mut byte = [0u8];
            (&ready_r).read_exact(&mut byte).unwrap();
            entered.push(start.elapsed());
            assert_eq!(child.wait().unwrap(), ExitStatus::Exited(0));
        }
        spawned.sort();
        entered.sort();
        println!(
            "sandbox {}: spawn returned (execve done) median {:?} min {:?}; \
             after enter median {:?} min {:?} max {:?} (20 runs)",
            sandbox.enabled, spawned[10], spawned[0], entered[10], entered[0], entered[19]
        );
    }
}

// ---------------------------------------------------------------- child side

fn child_main(args: &[String]) -> ! {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let sandbox = |s: &str| Sandbox { enabled: s == "1" };
    match arg(0) {
        "exit" => std::process::exit(arg(1).parse().unwrap()),
        "sleep" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "fdmap" => {
            let n: usize = arg(1).parse().unwrap();
            for i in 0..n {
                let mut f = sys::file_from_fd(3 + i as i32);
                f.write_all(&[i as u8]).unwrap();
                std::mem::forget(f);
            }
            std::process::exit(0)
        }
        "env" => {
            // Reports every environment variable it sees, one per line, on fd 3.
            let mut out = sys::file_from_fd(3);
            for (k, v) in std::env::vars_os() {
                writeln!(out, "{}={}", k.to_string_lossy(), v.to_string_lossy()).unwrap();
            }
            std::process::exit(0)
        }
        "ready" => {
            jail::enter(&sandbox(arg(1)), &LIMITS).unwrap();
            sys::file_from_fd(3).write_all(&[1]).unwrap();
            std::process::exit(0)
        }
        "probe" => {
            let host_path = arg(2).to_owned();
            let port: u16 = arg(3).parse().unwrap();
            let parent: i32 = arg(4).parse().unwrap();
            let jailed = arg(1) == "1";
            jail::enter(&sandbox(arg(1)), &LIMITS).unwrap();
            let report = probes(jailed, &host_path, port, parent);
            sys::file_from_fd(3).write_all(report.as_bytes()).unwrap();
            std::process::exit(0)
        }
        "enter-host" => match jail::enter(&JAILED, &LIMITS) {
            Err(jail::Error::NotSpawnedSandboxed) => std::process::exit(0),
            other => {
                eprintln!("enter on the host: {other:?}");
                std::process::exit(1)
            }
        },
        "middle" => {
            // Spawns a sleeper, reports its pid on fd 3, then sleeps until killed.
            let child = spawn_mode(&["sleep"], &[], &sandbox(arg(1)));
            let mut out = sys::file_from_fd(3);
            writeln!(out, "{}", child.pid).unwrap();
            drop(out);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "as-nobody-probe" => {
            // Become an unprivileged user, then spawn the jailed probe: the jail must add a
            // user namespace. The report pipe (fd 3) is passed on.
            sys::become_nobody();
            let report = sys::file_from_fd(3);
            let parent = std::process::id().to_string();
            let probe = ["probe", "1", "/etc", "1", &parent];
            let child = spawn_mode(&probe, &[report.as_fd()], &JAILED);
            drop(report);
            let status = child.wait().unwrap();
            std::process::exit(if status.success() { 0 } else { 1 })
        }
        other => {
            eprintln!("unknown child mode {other:?}");
            std::process::exit(2)
        }
    }
}

fn result<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("err:{}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// Runs every probe and returns `key=value` lines. Probes with side effects on the host
/// (mount, ptrace, setuid, capset, fork, create) run only when jailed.
fn probes(jailed: bool, host_path: &str, port: u16, parent: i32) -> String {
    let mut out = String::new();
    let mut put = |k: &str, v: String| out.push_str(&format!("{k}={v}\n"));
    put("open_host", result(File::open(host_path)));
    put(
        "list_root",
        match std::fs::read_dir("/") {
            Ok(entries) => format!("entries={}", entries.count()),
            Err(e) => format!("err:{}", e.raw_os_error().unwrap_or(-1)),
        },
    );
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    put(
        "connect_loopback",
        result(TcpStream::connect_timeout(&addr, Duration::from_secs(2))),
    );
    let (e, p, i) = sys::capget();
    put("caps", format!("{e:x},{p:x},{i:x}"));
    put(
        "bounding_cap_sys_admin",
        sys::capbset_read(CAP_SYS_ADMIN).to_string(),
    );
    let last: u32 = 40;
    put(
        "bounding_count",
        (0..=last)
            .filter(|&c| sys::capbset_read(c) == 1)
            .count()
            .to_string(),
    );
    put("no_new_privs", sys::no_new_privs().to_string());
    put("securebits", sys::securebits().to_string());
    put("getpid", std::process::id().to_string());
    put("open_fds", sys::open_fds());
    put("stdin_dev_null", sys::stdin_is_dev_null().to_string());
    put(
        "rlimit_nofile",
        sys::getrlimit(libc::RLIMIT_NOFILE).to_string(),
    );
    put("rlimit_core", sys::getrlimit(libc::RLIMIT_CORE).to_string());
    put(
        "rlimit_nproc",
        sys::getrlimit(libc::RLIMIT_NPROC).to_string(),
    );
    put(
        "rlimit_memlock",
        sys::getrlimit(libc::RLIMIT_MEMLOCK).to_string(),
    );
    if jailed {
        put("create_in_root", result(File::create("/probe")));
        put("mount", result(sys::mount_tmpfs_on_root()));
        put("ptrace_parent", result(sys::ptrace_attach(parent)));
        put("capset_raise", result(sys::capset_raise_sys_admin()));
        put("fork", result(sys::fork_and_reap()));
        // Last: on success it would change who runs the probes above.
        put("setuid_nobody", result(sys::setuid(65534)));
    }
    out
}

/// The unsafe calls of the tests, each a thin wrapper over one system call.
mod sys {
    use std::fs::File;
    use std::io;
    use std::mem;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    pub fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a writable array of two ints.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A `File` over an inherited descriptor (3, 4, ...) that `jail::spawn` installed.
    pub fn file_from_fd(fd: i32) -> File {
        // SAFETY: fcntl(F_GETFD) reads no memory.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags, -1, "fd {fd} is not open");
        // SAFETY: the descriptor is open (checked above) and was passed to this process for
        // it alone to use; each mode wraps it once.
        unsafe { File::from_raw_fd(fd) }
    }

    pub fn pidfd_open(pid: i32) -> OwnedFd {
        // SAFETY: integer arguments only.
        let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }).unwrap();
        // SAFETY: pidfd_open succeeded: the descriptor is open and ours.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    pub fn kill(pid: i32, sig: i32) {
        // SAFETY: integer arguments only; `pid` is our live, unreaped child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    pub fn capget() -> (u32, u32, u32) {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [[0u32; 3]; 2];
        // SAFETY: a version-3 header and the two data structs (3 u32 each) it writes.
        cvt(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) }).unwrap();
        // Union of the low and high halves, enough to tell zero from non-zero.
        (
            data[0][0] | data[1][0],
            data[0][1] | data[1][1],
            data[0][2] | data[1][2],
        )
    }

    pub fn capset_raise_sys_admin() -> io::Result<()> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let bit = 1u32 << super::CAP_SYS_ADMIN;
        let data = [[bit, bit, 0u32], [0, 0, 0]];
        // SAFETY: a version-3 header and the two data structs it reads.
        cvt(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }).map(drop)
    }

    fn prctl_get(option: libc::c_int, arg: libc::c_ulong) -> i32 {
        // SAFETY: the options used take integer arguments only.
        unsafe { libc::prctl(option, arg, 0, 0, 0) }
    }

    pub fn capbset_read(cap: u32) -> i32 {
        prctl_get(libc::PR_CAPBSET_READ, cap.into())
    }

    pub fn no_new_privs() -> i32 {
        prctl_get(libc::PR_GET_NO_NEW_PRIVS, 0)
    }

    pub fn securebits() -> i32 {
        prctl_get(libc::PR_GET_SECUREBITS, 0)
    }

    pub fn open_fds() -> String {
        (0..1024)
            // SAFETY: fcntl(F_GETFD) reads no memory.
            .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn stdin_is_dev_null() -> i32 {
        // SAFETY: libc::stat is plain data; all-zero bytes are valid.
        let mut st: libc::stat = unsafe { mem::zeroed() };
        // SAFETY: `st` is a writable stat.
        if unsafe { libc::fstat(0, &mut st) } != 0 {
            return -1;
        }
        i32::from(st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3))
    }

    pub fn getrlimit(resource: libc::__rlimit_resource_t) -> u64 {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `rlim` is a writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(resource, &mut rlim) }, 0);
        rlim.rlim_cur
    }

    pub fn mount_tmpfs_on_root() -> io::Result<()> {
        // SAFETY: valid nul-terminated strings and a null data pointer.
        let ret = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        cvt(ret.into()).map(drop)
    }

    /// PTRACE_ATTACH to the parent's pid as the host sees it (in a PID namespace that
    /// number names no process, or another one: either way it must fail).
    pub fn ptrace_attach(target: i32) -> io::Result<()> {
        // SAFETY: PTRACE_ATTACH takes no memory arguments.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_ATTACH,
                target,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        cvt(ret).map(drop)
    }

    pub fn fork_and_reap() -> io::Result<()> {
        // SAFETY: this probe process is single-threaded, so the child may run anything; it
        // only calls _exit.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            // SAFETY: _exit ends the forked child at once.
            0 => unsafe { libc::_exit(0) },
            pid => {
                let mut status = 0;
                // SAFETY: `status` is a writable int; `pid` is our child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                Ok(())
            }
        }
    }

    pub fn setuid(uid: u32) -> io::Result<()> {
        // SAFETY: integer argument only.
        cvt(unsafe { libc::setuid(uid) }.into()).map(drop)
    }

    /// Drops this (intermediate, single-threaded) process to uid/gid 65534, no groups, and
    /// makes it dumpable again (the uid change cleared it) so that it owns the /proc files
    /// of its children, as a VMM started by a user does.
    pub fn become_nobody() {
        // SAFETY: integer and null arguments only; order: groups, gid, then uid.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
            assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0), 0);
        }
    }
}
