//! `ringvm run` and `ringvm stop` through the real binary, with guests of a few hand-assembled
//! instructions (entered in 64-bit mode through an ELF without a PVH note), and bad input.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn guest_prints_on_com1_and_reset_ends_the_vm_with_status_0() {
    let dir = TempDir::new("reset");
    let code = [print("hello from the guest\n"), RESET.to_vec()].concat();
    let kernel = dir.file("k.elf", &elf(&code));
    let out = run_with_limit(
        ringvm(&["run", "-m", "64", kernel.to_str().expect("utf-8")]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from the guest\n");
}

/// A bzImage (boot protocol 2.15, 64-bit entry) whose startup_64 is `code`.
fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 5 * 512];
    b[0x1f1] = 4; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x201] = 0x66; // the header runs to 0x268
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    // The protected-mode kernel: startup_64 is 0x200 bytes in.
    b.extend(vec![0x90u8; 0x200]);
    b.extend_from_slice(code);
    b
}

#[test]
fn bzimage_enters_startup_64_with_boot_params() {
    let dir = TempDir::new("bzimage");
    // cmp rsi, 0x7000 (boot_params); jne +N over the "ok" print: prints "bz ok" only if
    // RSI holds the zero page, "bz" otherwise.
    let ok = print(" ok");
    let mut code = print("bz");
    code.extend([0x48, 0x81, 0xfe, 0x00, 0x70, 0x00, 0x00]); // cmp rsi, 0x7000
    code.extend([0x75, ok.len() as u8]); // jne past the "ok"
    code.extend(ok);
    code.extend(print("\n"));
    code.extend(RESET);
    let kernel = dir.file("bzImage", &bzimage(&code));
    let out = run_with_limit(
        ringvm(&["run", "-m", "64", kernel.to_str().expect("utf-8")]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bz ok\n");
}

#[test]
fn stdin_reaches_the_guest_through_com1() {
    let dir = TempDir::new("stdin");
    // Poll LSR.DR, read RBR, echo it to THR; reset after 'q'.
    let code = [
        0x66, 0xba, 0xfd, 0x03, // 0: mov dx, 0x3fd
        0xec, // 4: in al, dx
        0xa8, 0x01, // test al, 1
        0x74, 0xfb, // jz 4
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, b'q', // cmp al, 'q'
        0x74, 0x02, // je reset
        0xeb, 0xeb, // jmp 0
        0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe, // reset
    ];
    let kernel = dir.file("k.elf", &elf(&code));
    let mut child = Command::new(RINGVM)
        .args(["run", kernel.to_str().expect("utf-8")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(b"echo me q").expect("write stdin");
    }
    let out = wait_with_limit(&mut child, Duration::from_secs(60));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "echo me q");
}

#[test]
fn serial_to_a_file_and_two_vcpus() {
    let dir = TempDir::new("serialfile");
    let code = [print("to a file"), RESET.to_vec()].concat();
    let kernel = dir.file("k.elf", &elf(&code));
    let log = dir.0.join("com1.log");
    let serial = format!("type=file,path={}", log.display());
    let out = run_with_limit(
        ringvm(&[
            "run",
            "-c",
            "2",
            "--serial",
            &serial,
            kernel.to_str().expect("utf-8"),
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "to a file");
    assert!(out.stdout.is_empty());
}

#[test]
fn stop_through_the_control_socket_ends_a_spinning_guest() {
    let dir = TempDir::new("stop");
    let code = [print("up\n"), SPIN.to_vec()].concat();
    let kernel = dir.file("k.elf", &elf(&code));
    // A directory: the socket is named by the VM's pid inside it.
    let mut child = ringvm(&[
        "run",
        "-s",
        dir.0.to_str().expect("utf-8"),
        kernel.to_str().expect("utf-8"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    let sock = dir.0.join(format!("ringvm-{}.sock", child.id()));
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Junk and unknown commands get a JSON error and leave the VM running.
    let junk = raw_request(&sock, b"\xff\xfe\n");
    assert!(
        junk.contains(r#""ok":false"#) && junk.contains("UTF-8"),
        "{junk}"
    );
    let unknown = raw_request(&sock, b"{\"command\":\"reboot\"}\n");
    assert!(unknown.contains("unknown command"), "{unknown}");
    assert!(child.try_wait().expect("wait").is_none());

    let stop = ringvm(&["stop", sock.to_str().expect("utf-8")])
        .output()
        .expect("ringvm stop");
    assert!(stop.status.success(), "stop: {}", text(&stop.stderr));
    let out = wait_with_limit(&mut child, Duration::from_secs(30));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "up\n");
    assert!(!sock.exists(), "the socket file is removed at exit");
}

fn raw_request(sock: &Path, bytes: &[u8]) -> String {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.write_all(bytes).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    reply
}

#[test]
fn executing_from_mmio_reports_an_internal_error_with_rip() {
    let dir = TempDir::new("internal");
    // mov eax, 0xd0000000; jmp rax: instruction fetch from the MMIO hole.
    let code = [0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0];
    let kernel = dir.file("k.elf", &elf(&code));
    let out = run_with_limit(
        ringvm(&["run", kernel.to_str().expect("utf-8")]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("internal error"), "{err}");
    assert!(err.contains("rip 0xd0000000"), "{err}");
}

#[test]
fn bad_kernel_images_are_named_errors() {
    let dir = TempDir::new("badimg");
    let garbage = dir.file("garbage", b"this is not a kernel");
    let out = run_with_limit(
        ringvm(&["run", garbage.to_str().expect("utf-8")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bad kernel image"),
        "{}",
        text(&out.stderr)
    );

    let mut truncated = elf(&RESET);
    truncated.truncate(100);
    let t = dir.file("truncated", &truncated);
    let out = run_with_limit(
        ringvm(&["run", t.to_str().expect("utf-8")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("truncated"),
        "{}",
        text(&out.stderr)
    );

    // A segment that lands in the MMIO hole, outside RAM.
    let mut outside = elf(&RESET);
    outside[64 + 24..64 + 32].copy_from_slice(&0xd000_0000u64.to_le_bytes());
    let o = dir.file("outside", &outside);
    let out = run_with_limit(
        ringvm(&["run", o.to_str().expect("utf-8")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not fit in guest RAM"),
        "{}",
        text(&out.stderr)
    );

    // A kernel or initrd that never ends is refused once it outgrows the guest's RAM.
    let k = t.to_str().expect("utf-8");
    for (args, needle) in [
        (
            vec!["run", "-m", "16", "/dev/zero"],
            "cannot read kernel /dev/zero: larger than the guest's 16 MiB of memory",
        ),
        (
            vec!["run", "-m", "16", "-i", "/dev/zero", k],
            "cannot read initrd /dev/zero: larger than the guest's 16 MiB of memory",
        ),
    ] {
        let out = run_with_limit(ringvm(&args), Duration::from_secs(30));
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
    }

    let out = run_with_limit(
        ringvm(&["run", "/nonexistent/kernel"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot read kernel"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_arguments_are_rejected_before_booting() {
    let dir = TempDir::new("badargs");
    let kernel = dir.file("k.elf", &elf(&RESET));
    let k = kernel.to_str().expect("utf-8");
    for (args, needle) in [
        (vec!["run", "-m", "1", k], "at least 16 MiB"),
        (vec!["run", "-c", "0", k], "--cpus 0"),
        (vec!["run", "--serial", "type=tcp", k], "type=tcp"),
        (
            vec!["run", "--cpu-features", "-nosuchflag", k],
            "unknown cpu feature",
        ),
        (vec!["run", "-m", "many", k], "many"),
        // A setting given twice in one value is refused, as a flag given twice is.
        (
            vec!["run", "--serial", "num=1,num=2", k],
            "'--serial' with value 'num=1,num=2': num= is given twice",
        ),
        (
            vec!["run", "--serial", "type=virtio-console,hardware=serial", k],
            "hardware= is given twice",
        ),
        (
            vec!["run", "-d", "/dev/null,ro,rw", k],
            "ro= is given twice",
        ),
        (
            vec!["run", "--vsock", "cid=3,cid=4", k],
            "'--vsock' with value 'cid=3,cid=4': cid= is given twice",
        ),
        (
            vec!["run", "--vhost-user", "type=rng,socket=/a,socket=/b", k],
            "socket= is given twice",
        ),
        (
            vec!["run", "--shared-dir", "/tmp:t:cache=auto:cache=never", k],
            "cache= is given twice",
        ),
        (
            vec!["run", "--cpu-features", "+avx,-avx", k],
            "cpu feature 'avx' is given twice",
        ),
    ] {
        let out = run_with_limit(ringvm(&args), Duration::from_secs(30));
        assert!(!out.status.success(), "{args:?} succeeded");
        let all = text(&out.stderr) + &text(&out.stdout);
        assert!(all.contains(needle), "{args:?}: {all}");
    }
    let long = "x".repeat(5000);
    let out = run_with_limit(ringvm(&["run", "-p", &long, k]), Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("command line"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stop_without_a_vm_is_an_error() {
    let out = run_with_limit(
        ringvm(&["stop", "/nonexistent/ringvm.sock"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot reach the control socket"));
}
