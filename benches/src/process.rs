//! Processes the benches start: vhost-user backends (ringvm's devices, qemu-storage-daemon)
//! waited for by their socket, killed with what they started, and their CPU time.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts a vhost-user backend and waits for its socket.
pub fn spawn_backend(mut cmd: Command, log: &Path, socket: &Path) -> Result<Child, String> {
    let log_file = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if socket.exists() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = fs::read_to_string(log).unwrap_or_default();
            return Err(format!("{cmd:?} exited ({status}): {}", out.trim()));
        }
        if Instant::now() > deadline {
            kill_tree(&mut child);
            return Err(format!("{cmd:?} made no socket in 10 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `child` and the processes it started (a sandboxed device forks into its jail).
pub fn kill_tree(child: &mut Child) {
    let tree = process_tree(child.id());
    for &pid in tree.iter().skip(1) {
        // SAFETY: plain syscall; the pids are descendants of a child this bench started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `root` and its descendants.
pub fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command name, which may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// The CPU time of every live thread of `pid` (`sum_exec_runtime`, nanoseconds).
pub fn process_cpu_time(pid: u32) -> Duration {
    let ns: u64 = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            let s = fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(ns)
}

/// The ringvm binary ([`ringvm_release`]) and the help text of its `device <kind>`, or why
/// it has no such device or the help does not mention `option`.
pub fn ringvm_device(kind: &str, option: &str) -> Result<(PathBuf, String), String> {
    let bin = ringvm_release()?;
    let help = Command::new(&bin)
        .args(["device", kind, "--help"])
        .output()
        .map_err(|e| format!("run {}: {e}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    if !help.status.success() || !text.contains(option) {
        return Err(format!(
            "{} has no `device {kind} {option}`: {}",
            bin.display(),
            text.lines().next().unwrap_or("").trim()
        ));
    }
    Ok((bin, text))
}

/// The ringvm binary to measure: $RINGVM_BIN, else `target/release/ringvm` built now (a bench
/// that measures the binary must measure the current one).
pub fn ringvm_release() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("RINGVM_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "vmm", "--bin", "ringvm"])
        .current_dir(crate::workspace_root())
        .status()
        .map_err(|e| format!("run cargo build: {e}"))?;
    if !status.success() {
        return Err("cargo build --release -p vmm failed".to_owned());
    }
    Ok(crate::target_dir().join("release/ringvm"))
}

/// Builds the purpose-built test guest into `out` with its own script (guest/test/build.sh);
/// returns the ELF.
pub fn test_guest(out: &Path) -> PathBuf {
    let status = Command::new("sh")
        .arg(crate::workspace_root().join("guest/test/build.sh"))
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("run guest/test/build.sh");
    assert!(status.success(), "building the test guest failed");
    out.join("ringvm-test-guest.elf")
}
