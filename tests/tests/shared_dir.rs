//! Shared directories through the real `ringvm` binary: `--shared-dir` starts virtiofsd and
//! puts a virtio-fs device (1af4:105a) on the bus, `--vhost-user type=fs` connects to a
//! virtiofsd the user runs, virtiofsd's death is reported like a device process's, it is
//! reaped with the VM, and bad input is refused before the VM starts. (Files moving through
//! the share: tests/tests/linux.rs, which mounts it in Linux.)

use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{
    children_of, process_exists, ringvm_bin, ringvm_run, run_guest, wait_until, GuestCmdline,
    HaltedVm, Scratch,
};

const LIMIT: Duration = Duration::from_secs(60);

fn pci_lists_virtio_fs(extra: &[&str]) {
    let run = run_guest(
        &mut ringvm_run(extra, &GuestCmdline::new().test("pci")),
        LIMIT,
    )
    .expect("run ringvm");
    run.assert_clean();
    let report = run.report();
    report.assert_ok(&["pci"]);
    assert!(
        report
            .details("pci")
            .iter()
            .any(|l| l.contains("1af4:105a") && l.contains("msix 3")),
        "no virtio-fs device with two queues: {:?}",
        report.details("pci")
    );
}

#[test]
fn shared_dir_puts_a_virtio_fs_device_served_by_virtiofsd_on_the_bus() {
    let dir = Scratch::new("shared-dir", "bus");
    let share = format!("{}:share", dir.0.display());
    pci_lists_virtio_fs(&["--no-rng", "--shared-dir", &share]);
}

#[test]
fn vhost_user_type_fs_connects_to_a_virtiofsd_the_user_runs() {
    let dir = Scratch::new("shared-dir", "external");
    let sock = dir.path("fs.sock");
    let share = dir.path("share");
    std::fs::create_dir_all(&share).expect("create share");
    let mut virtiofsd = Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--log-level", "error"])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn virtiofsd (scripts/setup installs it)");
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "virtiofsd never listened"
    );
    let spec = format!("type=fs,socket={},tag=mine", sock.display());
    pci_lists_virtio_fs(&["--no-rng", "--vhost-user", &spec]);
    // virtiofsd ends once its frontend has gone.
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            virtiofsd.try_wait(),
            Ok(Some(_))
        )),
        "virtiofsd still runs after the VM ended"
    );
}

/// virtiofsd and what it forked (its sandbox) while the VM halts.
fn virtiofsd_tree(vm: &HaltedVm) -> Vec<u32> {
    let mut all = vec![vm.device];
    let mut i = 0;
    while i < all.len() {
        all.extend(children_of(all[i]));
        i += 1;
    }
    all
}

#[test]
fn virtiofsd_that_dies_ends_the_vm_with_the_device_report_and_nothing_is_left() {
    let dir = Scratch::new("shared-dir", "death");
    let share = format!("{}:share", dir.0.display());
    let vm = HaltedVm::start(&["--no-rng", "--shared-dir", &share]);
    let tree = virtiofsd_tree(&vm);
    assert!(
        tree.len() >= 2,
        "virtiofsd runs in its own sandbox: {tree:?}"
    );
    let pid = vm.device;
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let (code, stderr) = vm.finish(LIMIT);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "device fs0 (pid {pid}) killed by signal 9 (SIGKILL)"
        )),
        "{stderr}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || tree
            .iter()
            .all(|&p| !process_exists(p))),
        "virtiofsd's sandbox outlived it: {tree:?}"
    );
}

#[test]
fn virtiofsd_is_reaped_with_the_vm() {
    let dir = Scratch::new("shared-dir", "reap");
    let share = format!("{}:share", dir.0.display());
    let control = dir.path("vm.sock");
    let control = control.to_str().expect("utf-8 path");
    let vm = HaltedVm::start(&["--no-rng", "--shared-dir", &share, "-s", control]);
    let tree = virtiofsd_tree(&vm);
    let stop = Command::new(ringvm_bin())
        .args(["stop", control])
        .status()
        .expect("run ringvm stop");
    assert!(stop.success());
    let (code, stderr) = vm.finish(LIMIT);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        wait_until(Duration::from_secs(10), || tree
            .iter()
            .all(|&p| !process_exists(p))),
        "virtiofsd outlived the VM: {tree:?}"
    );
}

/// `ringvm run ARGS` on the test guest: its exit code and stderr (bad input ends it before
/// the VM starts).
fn refused(args: &[&str], path_env: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = ringvm_run(args, &GuestCmdline::new().test("hello"));
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let run = run_guest(&mut cmd, LIMIT).expect("run ringvm");
    // Refused before the VM started: the guest never printed anything.
    assert_eq!(run.stdout, "", "{args:?}: the VM started");
    (run.status.and_then(|s| s.code()), run.stderr)
}

#[test]
fn bad_shared_dirs_are_refused_before_the_vm_starts() {
    let dir = Scratch::new("shared-dir", "bad");
    let d = dir.0.display().to_string();
    let file = dir.path("file");
    std::fs::write(&file, b"x").expect("write file");
    let long = format!("{d}:{}", "t".repeat(37));
    let missing = format!("{d}/missing:t");
    let not_dir = format!("{}:t", file.display());
    let empty_tag = format!("{d}:");
    let a = format!("{d}:same");
    let b = format!("{d}:same:cache=never");
    let ok = format!("{d}:t");
    let fs_spec = "type=fs,socket=/nonexistent.sock,tag=same";
    for (args, says) in [
        (vec!["--shared-dir", &missing], "cannot use the directory"),
        (vec!["--shared-dir", &not_dir], "not a directory"),
        (vec!["--shared-dir", &empty_tag], "the tag is empty"),
        (vec!["--shared-dir", &long], "longer than virtio-fs's 36"),
        (
            vec!["--shared-dir", &a, "--shared-dir", &b],
            "tag 'same' is given twice",
        ),
        (
            vec!["--shared-dir", &a, "--vhost-user", fs_spec],
            "tag 'same' is given twice",
        ),
        (
            vec!["--vhost-user", "type=fs,socket=/x.sock"],
            "type=fs needs tag=",
        ),
        (
            vec!["--shared-dir", &ok, "--virtiofsd", "/nonexistent/virtiofsd"],
            "--virtiofsd /nonexistent/virtiofsd: not an executable file",
        ),
    ] {
        let (code, stderr) = refused(&args, None);
        assert!(
            code == Some(1) && stderr.contains(says) && !stderr.contains("panicked"),
            "{args:?}: {code:?} {stderr}"
        );
    }
    let (code, stderr) = refused(&["--shared-dir", &ok], Some("/nonexistent"));
    assert!(
        code == Some(1) && stderr.contains("needs virtiofsd, which is not in PATH"),
        "{code:?} {stderr}"
    );
}
