//! virtio-console through the real `ringvm` binary: `--serial hardware=virtio-console` starts
//! a jailed console device process, and the test guest's CPL3 driver (guest/test/
//! virtio_console.c) writes through it and echoes a line it reads from ringvm's stdin.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::{test_guest_args, GuestCmdline, GuestReport, Scratch};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs ringvm with `input` on its stdin (kept open until ringvm ends); returns its status
/// (`None`: killed at the limit), stdout and stderr.
fn run_with_input(
    args: &[&str],
    cmdline: &GuestCmdline,
    input: &[u8],
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child: Child = Command::new(tests::ringvm_bin())
        .args(test_guest_args(args, cmdline))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write ringvm's stdin");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

#[test]
fn guest_writes_through_virtio_console_and_echoes_a_line_from_stdin() {
    let dir = Scratch::new("console", "echo");
    let out = dir.path("hvc0.txt");
    let spec = format!(
        "hardware=virtio-console,type=file,path={},stdin=true",
        out.display()
    );
    let cmdline = GuestCmdline::new()
        .test("virtio-console")
        .option("console.echo", 1);
    let (status, stdout, stderr) = run_with_input(
        &["--serial", "type=stdout,num=1", "--serial", &spec],
        &cmdline,
        b"typed on the host 4711\n",
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "status {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report = GuestReport::parse(&stdout);
    report.assert_ok(&["virtio-console"]);
    assert!(
        report
            .details("virtio-console")
            .iter()
            .any(|l| l.contains("line \"typed on the host 4711\" (22 bytes)")),
        "the guest did not read the line: {:?}",
        report.details("virtio-console")
    );
    let written = std::fs::read_to_string(&out).expect("read the console's file");
    assert_eq!(
        written,
        "ringvm-console: hello from hvc0\nringvm-console: type a line\n\
         ringvm-console: echo typed on the host 4711\n"
    );
}

#[test]
fn virtio_console_on_stdout_without_input_and_a_bad_hardware_is_refused() {
    // Console output on stdout next to COM1's report; no input: the guest only writes.
    let cmdline = GuestCmdline::new().test("virtio-console");
    let (status, stdout, stderr) = run_with_input(
        &[
            "--serial",
            "type=stdout,num=1",
            "--serial",
            "type=virtio-console",
        ],
        &cmdline,
        b"",
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "status {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    GuestReport::parse(&stdout).assert_ok(&["virtio-console"]);
    assert!(
        stdout.contains("ringvm-console: hello from hvc0\n"),
        "{stdout}"
    );
    let (status, _, stderr) = run_with_input(&["--serial", "hardware=debugcon"], &cmdline, b"");
    assert!(
        status.is_some_and(|s| s.code() == Some(1))
            && stderr.contains("hardware=debugcon: expected serial or virtio-console"),
        "{status:?}: {stderr}"
    );
}

#[test]
fn a_terminal_on_stdout_gives_the_guest_its_size() {
    // script(1) (util-linux) runs ringvm on a pseudo-terminal sized 100x30.
    let cmdline = GuestCmdline::new().test("virtio-console");
    let args: Vec<String> = test_guest_args(
        &[
            "--serial",
            "type=stdout,num=1",
            "--serial",
            "type=virtio-console",
        ],
        &cmdline,
    )
    .into_iter()
    .map(|a| {
        let a = a.into_string().expect("utf-8 argument");
        format!("'{}'", a.replace('\'', r"'\''"))
    })
    .collect();
    let shell = format!(
        "stty cols 100 rows 30 && '{}' {}",
        tests::ringvm_bin().display(),
        args.join(" ")
    );
    let out = Command::new("script")
        .args(["-qec", &shell, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script(1)");
    let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success(), "{:?}\n{stdout}", out.status);
    let report = GuestReport::parse(&stdout);
    report.assert_ok(&["virtio-console"]);
    assert!(
        stdout.contains("ringvm-test: virtio-console size cols=100 rows=30\n"),
        "{stdout}"
    );
}

#[test]
fn standalone_console_device_serves_ringvm_over_a_socket_from_its_jail() {
    // `ringvm device console --socket`: it accepts, then serves from a jailed child that
    // gets the two streams forwarded; ringvm connects with --vhost-user type=console.
    let dir = Scratch::new("console", "standalone");
    let sock = dir.path("console.sock");
    let out = dir.path("out.txt");
    let input = dir.path("in.txt");
    std::fs::write(&input, "over the socket\n").expect("write input");
    let shell = format!(
        "exec '{}' device console --socket '{}' --stream-fd 5 --stream-fd 6 5>'{}' 6<'{}'",
        tests::ringvm_bin().display(),
        sock.display(),
        out.display(),
        input.display()
    );
    let mut backend = Command::new("sh")
        .args(["-c", &shell])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm device console");
    assert!(
        tests::wait_until(Duration::from_secs(10), || sock.exists()),
        "the backend never listened"
    );
    let spec = format!("type=console,socket={}", sock.display());
    let cmdline = GuestCmdline::new()
        .test("virtio-console")
        .option("console.echo", 1);
    let (status, stdout, stderr) =
        run_with_input(&["--no-rng", "--vhost-user", &spec], &cmdline, b"");
    assert!(
        status.is_some_and(|s| s.success()),
        "status {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    GuestReport::parse(&stdout).assert_ok(&["virtio-console"]);
    let ended = tests::wait_until(Duration::from_secs(10), || {
        matches!(backend.try_wait(), Ok(Some(_)))
    });
    assert!(
        ended,
        "the console backend still runs after its frontend left"
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("read output"),
        "ringvm-console: hello from hvc0\nringvm-console: type a line\n\
         ringvm-console: echo over the socket\n"
    );
}
