//! The filters in the kernel: this test binary re-executes itself with `SECCOMP_TEST_CHILD`
//! set to a scenario; the child installs a policy and makes a call, and the parent checks how
//! it ended (exit status, or killed by SIGSYS) and that the kill came at that call (the child
//! writes `calling <name>` just before the raw system call and `returned` after it). Where the
//! kernel logs the kill (audit record `type=1326` in dmesg, rate-limited), the logged syscall
//! number is checked too.
//!
//! `harness = false`: a child must be a single-threaded process, not a libtest worker thread.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use seccomp::{install, Error, Policy};

/// The policy compiled from `<name>.policy` (the VMM's in `policies/`, a device's in its crate).
fn named(name: &str) -> Policy {
    Policy::from_name(name).unwrap_or_else(|| panic!("no policy {name}"))
}

const CHILD_ENV: &str = "SECCOMP_TEST_CHILD";

/// How a scenario must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Exits with status 0.
    Ok,
    /// Killed by SIGSYS at system call `nr`.
    Killed(libc::c_long),
}

fn say(msg: &str) {
    // SAFETY: writes a live buffer to stdout; write is allowed by every policy.
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process (exit_group, allowed by every process-wide policy).
    unsafe { libc::_exit(code) }
}

fn must(r: seccomp::Result<()>) {
    if let Err(e) = r {
        say(&format!("install failed: {e}\n"));
        exit(2);
    }
}

/// Makes system call `nr` with `args`, announcing it; returns its result.
fn call(nr: libc::c_long, args: [libc::c_long; 6]) -> libc::c_long {
    say(&format!("calling {nr}\n"));
    // SAFETY: every scenario passes arguments the call cannot use to corrupt this process
    // (bad descriptors, null or live buffers, fresh anonymous mappings).
    let r = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    say("returned\n");
    r
}

fn child(name: &str) -> ! {
    let prot_rw = (libc::PROT_READ | libc::PROT_WRITE) as libc::c_long;
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as libc::c_long;
    match name {
        "rng_allowed_calls" | "block_allowed_calls" | "net_allowed_calls" => {
            let policy = Policy::from_name(name.split('_').next().unwrap_or("")).expect("policy");
            must(install(policy, false));
            // io_uring_enter on a bad descriptor: allowed, fails with EBADF.
            assert_eq!(call(libc::SYS_io_uring_enter, [-1, 0, 0, 0, 0, 0]), -1);
            let dup = call(libc::SYS_fcntl, [1, libc::F_DUPFD_CLOEXEC as _, 3, 0, 0, 0]);
            assert!(dup >= 3);
            assert_eq!(call(libc::SYS_close, [dup, 0, 0, 0, 0, 0]), 0);
            let p = call(libc::SYS_mmap, [0, 8192, prot_rw, anon, -1, 0]);
            assert!(p > 0);
            assert_eq!(call(libc::SYS_munmap, [p, 8192, 0, 0, 0, 0]), 0);
            // The allocator still works.
            let v: Vec<u8> = vec![7; 1 << 20];
            drop(v);
            exit(0)
        }
        "rng_openat" => {
            must(install(named("rng"), false));
            call(
                libc::SYS_openat,
                [libc::AT_FDCWD as _, c"/".as_ptr() as _, 0, 0, 0, 0],
            );
        }
        "rng_socket_unix" => {
            must(install(named("rng"), false));
            call(
                libc::SYS_socket,
                [libc::AF_UNIX as _, libc::SOCK_STREAM as _, 0, 0, 0, 0],
            );
        }
        "block_socket_inet" => {
            must(install(named("block"), false));
            call(
                libc::SYS_socket,
                [libc::AF_INET as _, libc::SOCK_STREAM as _, 0, 0, 0, 0],
            );
        }
        "rng_execve" => {
            must(install(named("rng"), false));
            call(
                libc::SYS_execve,
                [c"/bin/true".as_ptr() as _, 0, 0, 0, 0, 0],
            );
        }
        "rng_ptrace" => {
            must(install(named("rng"), false));
            call(libc::SYS_ptrace, [libc::PTRACE_TRACEME as _, 0, 0, 0, 0, 0]);
        }
        "block_hashmap_after_the_filter" => {
            must(install(named("block"), false));
            // The first HashMap of the process seeds its keys with getrandom.
            let mut m = std::collections::HashMap::new();
            m.insert(1u8, 2u8);
            exit(i32::from(m.len() != 1))
        }
        "block_mount" => {
            must(install(named("block"), false));
            call(libc::SYS_mount, [0, 0, 0, 0, 0, 0]);
        }
        "rng_clone3" => {
            must(install(named("rng"), false));
            call(libc::SYS_clone3, [0, 0, 0, 0, 0, 0]);
        }
        "block_mmap_exec" => {
            must(install(named("block"), false));
            let prot = (libc::PROT_READ | libc::PROT_EXEC) as libc::c_long;
            call(libc::SYS_mmap, [0, 4096, prot, anon, -1, 0]);
        }
        "block_mmap_read_then_mprotect" => {
            must(install(named("block"), false));
            let p = call(libc::SYS_mmap, [0, 4096, libc::PROT_READ as _, anon, -1, 0]);
            assert!(p > 0);
            // Device processes never change protections.
            call(libc::SYS_mprotect, [p, 4096, prot_rw, 0, 0, 0]);
        }
        "rng_fcntl_setfl" => {
            must(install(named("rng"), false));
            call(libc::SYS_fcntl, [1, libc::F_SETFL as _, 0, 0, 0, 0]);
        }
        "rng_fcntl_setfl_nonblock" => {
            must(install(named("rng"), false));
            // Allowed (call eventfds are made nonblocking); fails on a bad descriptor.
            let nonblock = libc::O_NONBLOCK as libc::c_long;
            assert_eq!(
                call(libc::SYS_fcntl, [-1, libc::F_SETFL as _, nonblock, 0, 0, 0]),
                -1
            );
            // Any other F_SETFL value is still refused.
            call(
                libc::SYS_fcntl,
                [-1, libc::F_SETFL as _, nonblock | 0x400, 0, 0, 0],
            );
        }
        "net_ioctl_tunsetoffload" => {
            must(install(named("net"), false));
            // Allowed; fails on a bad descriptor.
            assert_eq!(
                call(libc::SYS_ioctl, [-1, libc::TUNSETOFFLOAD as _, 0, 0, 0, 0]),
                -1
            );
            exit(0)
        }
        "net_ioctl_tcgets" => {
            must(install(named("net"), false));
            call(libc::SYS_ioctl, [0, libc::TCGETS as _, 0, 0, 0, 0]);
        }
        "rng_x32_call_even_when_logging" => {
            must(install(named("rng"), true));
            call(libc::SYS_getpid | 0x4000_0000, [0; 6]);
        }
        "rng_i386_call_even_when_logging" => {
            must(install(named("rng"), true));
            say("calling 20\n");
            // i386 getpid (20) through int 0x80: seccomp sees AUDIT_ARCH_I386.
            // SAFETY: int 0x80 with eax = 20 only reads the pid (were it allowed); it clobbers
            // eax, and r8-r11 are declared clobbered too.
            unsafe {
                std::arch::asm!(
                    "int 0x80",
                    inout("eax") 20u32 => _,
                    out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                );
            }
            say("returned\n");
        }
        "rng_log_failures_runs_the_call" => {
            must(install(named("rng"), true));
            // getppid is not in the policy: logged, then run.
            let ppid = call(libc::SYS_getppid, [0; 6]);
            assert!(ppid > 0);
            exit(0)
        }
        "vcpu_thread_kvm_run" | "vcpu_thread_kvm_create_vm" => {
            let request = if name.ends_with("kvm_run") {
                0xae80
            } else {
                0xae01
            };
            let t = std::thread::spawn(move || {
                must(install(named("vcpu"), false));
                // Allowed or not by number; fails on a bad descriptor when allowed.
                assert_eq!(call(libc::SYS_ioctl, [-1, request, 0, 0, 0, 0]), -1);
                // The thread then ends under its filter (munmap, sigaltstack, madvise, exit).
            });
            if t.join().is_err() {
                exit(3);
            }
            exit(0)
        }
        "vcpu_filter_stays_on_its_thread" => {
            let t = std::thread::spawn(|| must(install(named("vcpu"), false)));
            if t.join().is_err() {
                exit(3);
            }
            // The main thread has no filter: getppid (in no VMM policy) works.
            assert!(call(libc::SYS_getppid, [0; 6]) > 0);
            exit(0)
        }
        "vmm_filter_reaches_every_thread" => {
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            let _t = std::thread::spawn(move || {
                let _ = ready_tx.send(());
                let _ = go_rx.recv();
                call(libc::SYS_getppid, [0; 6]);
            });
            let _ = ready_rx.recv();
            must(install(named("vmm"), false));
            let _ = go_tx.send(());
            // Wait (futex) for the thread to be killed with the process.
            std::thread::sleep(std::time::Duration::from_secs(5));
            exit(4)
        }
        "vmm_filter_then_vcpu_filters" => {
            // The order the VMM uses: vCPU threads started and waiting, the VMM filter on
            // every thread (TSYNC), then each vCPU thread narrows itself.
            // The thread has started (as start_vcpus waits for each thread's pthread_t):
            // its start-up calls (rseq, set_robust_list, the name) are in no policy.
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _ = ready_tx.send(());
                let _ = go_rx.recv();
                must(install(named("vcpu"), false));
                assert_eq!(call(libc::SYS_ioctl, [-1, 0xae80, 0, 0, 0, 0]), -1);
            });
            let _ = ready_rx.recv();
            must(install(named("vmm"), false));
            let _ = go_tx.send(());
            if t.join().is_err() {
                exit(3);
            }
            exit(0)
        }
        "vmm_filter_fails_after_a_vcpu_filter" => {
            let (tx, rx) = mpsc::channel::<()>();
            let (hold_tx, hold_rx) = mpsc::channel::<()>();
            let _t = std::thread::spawn(move || {
                must(install(named("vcpu"), false));
                let _ = tx.send(());
                let _ = hold_rx.recv();
            });
            let _ = rx.recv();
            match install(named("vmm"), false) {
                Err(Error::ThreadSync { tid, .. }) if tid > 0 => exit(0),
                other => {
                    say(&format!("unexpected {other:?}\n"));
                    drop(hold_tx);
                    exit(5)
                }
            }
        }
        other => {
            say(&format!("unknown scenario {other}\n"));
            exit(100)
        }
    }
    // The forbidden call returned.
    exit(1)
}

const SCENARIOS: &[(&str, Expect)] = &[
    ("rng_allowed_calls", Expect::Ok),
    ("block_allowed_calls", Expect::Ok),
    ("net_allowed_calls", Expect::Ok),
    ("rng_openat", Expect::Killed(libc::SYS_openat)),
    ("rng_socket_unix", Expect::Killed(libc::SYS_socket)),
    ("block_socket_inet", Expect::Killed(libc::SYS_socket)),
    ("rng_execve", Expect::Killed(libc::SYS_execve)),
    ("rng_ptrace", Expect::Killed(libc::SYS_ptrace)),
    ("block_hashmap_after_the_filter", Expect::Ok),
    ("block_mount", Expect::Killed(libc::SYS_mount)),
    ("rng_clone3", Expect::Killed(libc::SYS_clone3)),
    ("block_mmap_exec", Expect::Killed(libc::SYS_mmap)),
    (
        "block_mmap_read_then_mprotect",
        Expect::Killed(libc::SYS_mprotect),
    ),
    ("rng_fcntl_setfl", Expect::Killed(libc::SYS_fcntl)),
    ("rng_fcntl_setfl_nonblock", Expect::Killed(libc::SYS_fcntl)),
    ("net_ioctl_tunsetoffload", Expect::Ok),
    ("net_ioctl_tcgets", Expect::Killed(libc::SYS_ioctl)),
    (
        "rng_x32_call_even_when_logging",
        Expect::Killed(libc::SYS_getpid | 0x4000_0000),
    ),
    // i386's getpid is 20.
    ("rng_i386_call_even_when_logging", Expect::Killed(20)),
    ("rng_log_failures_runs_the_call", Expect::Ok),
    ("vcpu_thread_kvm_run", Expect::Ok),
    ("vcpu_thread_kvm_create_vm", Expect::Killed(libc::SYS_ioctl)),
    ("vcpu_filter_stays_on_its_thread", Expect::Ok),
    (
        "vmm_filter_reaches_every_thread",
        Expect::Killed(libc::SYS_getppid),
    ),
    ("vmm_filter_then_vcpu_filters", Expect::Ok),
    ("vmm_filter_fails_after_a_vcpu_filter", Expect::Ok),
];

/// When an audit line was logged: the seconds of its `audit(SECONDS.MS:SERIAL):` stamp.
fn audit_time(line: &str) -> Option<f64> {
    let stamp = line.split("audit(").nth(1)?;
    stamp.split(':').next()?.parse().ok()
}

/// The syscall numbers the kernel logged for `pid` (audit type=1326 lines in dmesg) at or
/// after `since` (seconds since the epoch). The ring buffer keeps lines of earlier runs, and
/// a pid is reused: a child whose own line was rate-limited must not be judged by the line
/// of an older process that had its pid.
fn logged_syscalls(pid: u32, since: f64) -> Option<Vec<String>> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = format!(" pid={pid} ");
    Some(
        text.lines()
            .filter(|l| l.contains("type=1326") && l.contains(&pid))
            .filter(|l| audit_time(l).is_some_and(|t| t >= since))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("syscall=")))
            .map(str::to_owned)
            .collect(),
    )
}

fn parent() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut failed = Vec::new();
    for &(name, expect) in SCENARIOS {
        // A second of slack: the audit stamp and this clock are both CLOCK_REALTIME, read
        // at different moments.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() - 1.0);
        let child = Command::new(&exe)
            .env(CHILD_ENV, name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the child");
        let pid = child.id();
        let out = child.wait_with_output().expect("wait for the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let status = out.status;
        let mut ok = match expect {
            Expect::Ok => status.success(),
            Expect::Killed(nr) => {
                // Killed at that call: it was announced, and it never returned.
                let last = stdout.lines().last().unwrap_or("");
                status.signal() == Some(libc::SIGSYS) && last == format!("calling {nr}")
            }
        };
        let mut note = String::new();
        if let Expect::Killed(nr) = expect {
            match logged_syscalls(pid, since).as_deref() {
                Some([]) | None => note = " (no kernel record: rate-limited)".to_owned(),
                Some(logged) => {
                    note = format!(" (kernel: {})", logged.join(" "));
                    ok &= logged.last() == Some(&format!("syscall={nr}"));
                }
            }
        }
        println!(
            "scenario {name}: {}{note}",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            println!(
                "  expected {expect:?}, got {status:?}\n  stdout:\n{stdout}\n  stderr:\n{stderr}"
            );
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        panic!("failed scenarios: {failed:?}");
    }
    println!("test result: ok. {} scenarios", SCENARIOS.len());
}

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(name) => child(&name),
        Err(_) => parent(),
    }
}
