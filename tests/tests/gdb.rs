//! `ringvm run --gdb`: the real `gdb` (batch mode) debugs guests through the real binary.
//!
//! What works on CI's nested kvm_pvm host is what these tests use (see README "Debugging the
//! guest with GDB"): guest CPL0 code is interpreted by KVM's emulator there, which honours
//! hardware breakpoints and the trap flag but not data breakpoints; so the test guest's
//! `gdb` scenario runs at CPL0 and the watchpoint is GDB's software one (single steps).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::{
    guest_kernel, lines_of, ringvm_bin, run_guest, test_guest_args, test_guest_path, GuestCmdline,
    Scratch, HOST_CPU_FEATURES, HOST_PARAMS,
};

/// A `ringvm run --gdb ...` whose stub is listening; killed when dropped.
struct DebuggedVm {
    child: Child,
    /// What GDB's `target remote` takes: `127.0.0.1:PORT` or the socket path.
    addr: String,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl DebuggedVm {
    /// Starts `ringvm run --gdb GDB ARGS...` and waits for the stub's "waiting" line.
    fn start(gdb: &str, args: Vec<std::ffi::OsString>) -> DebuggedVm {
        let mut cmd = Command::new(ringvm_bin());
        cmd.arg(&args[0]).args(["--gdb", gdb]).args(&args[1..]);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringvm");
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        let mut seen = String::new();
        let addr = loop {
            let line = stderr
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no gdb waiting line; stderr:\n{seen}"));
            seen += &line;
            seen.push('\n');
            if let Some(rest) = line.strip_prefix("ringvm: gdb: waiting for a client on ") {
                break rest.split(' ').next().expect("an address").to_string();
            }
        };
        DebuggedVm {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    /// Waits up to `limit` for ringvm to end; its exit code, stdout and stderr.
    fn wait(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait ringvm") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "ringvm did not end in {limit:?}; stderr:\n{}",
                self.stderr.try_iter().collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads end at EOF, which follows the exit.
        let collect = |rx: &mpsc::Receiver<String>| {
            let mut out = String::new();
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
                out += &l;
                out.push('\n');
            }
            out
        };
        (status.code(), collect(&self.stdout), collect(&self.stderr))
    }

    /// Waits up to `limit` for a stdout line containing `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut seen = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen += &(line + "\n"),
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?} in {limit:?}; stdout:\n{seen}");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for DebuggedVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gdb -batch -nx FILE` with these commands (each echoed with a `>>> ` marker first);
/// returns stdout + stderr.
fn gdb(file: &Path, commands: &[&str]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx"]);
    for c in commands {
        cmd.args(["-ex", &format!("echo >>> {c}\\n"), "-ex", c]);
    }
    cmd.arg(file);
    let run = run_guest(&mut cmd, Duration::from_secs(90)).expect("run gdb (apt package gdb)");
    assert!(
        run.status.is_some(),
        "gdb did not finish in 90 s:\n{}",
        run.stdout
    );
    format!("{}{}", run.stdout, run.stderr)
}

/// The output of command `c` in `out` (up to the next command's marker).
fn after<'a>(out: &'a str, c: &str) -> &'a str {
    let marker = format!(">>> {c}\n");
    let start = out
        .find(&marker)
        .unwrap_or_else(|| panic!("no output for {c:?}:\n{out}"))
        + marker.len();
    let rest = &out[start..];
    &rest[..rest.find(">>> ").unwrap_or(rest.len())]
}

fn assert_has(out: &str, c: &str, needle: &str) {
    let got = after(out, c);
    assert!(
        got.contains(needle),
        "{c:?} printed {got:?}, not {needle:?}; whole session:\n{out}"
    );
}

#[test]
fn gdb_breaks_reads_steps_watches_and_continues_to_the_end_of_the_test_guest() {
    let start = Instant::now();
    let args = test_guest_args(&["-m", "64", "-c", "2"], &GuestCmdline::new().test("gdb"));
    // A unix socket here (GDB's `target remote PATH`); the Linux test takes a TCP port.
    let scratch = Scratch::new("gdb", "guest");
    let sock = scratch.path("gdb.sock");
    let vm = DebuggedVm::start(sock.to_str().expect("utf-8 path"), args);
    let target = format!("target remote {}", vm.addr);
    let cmds = [
        target.as_str(),
        "info threads",
        // A software breakpoint (int3), at CPL0.
        "break gdb_step",
        "continue",
        "print $pc == gdb_step",
        "print $rdi",
        "print ($cr0 >> 31) & 1",
        "print $cr3 != 0",
        "print/x $efer & 0x500",
        "print gdb_counter",
        "stepi",
        "print $pc > gdb_step",
        "thread 2",
        "print $pc != 0",
        "thread 1",
        // The watch is GDB's software one: see the module comment.
        "set can-use-hw-watchpoints 0",
        "watch gdb_counter",
        "continue",
        "delete",
        // A hardware breakpoint (debug registers) on the next call.
        "hbreak gdb_step",
        "continue",
        "print x",
        "delete",
        "set var gdb_counter = 100",
        "continue",
    ];
    let out = gdb(test_guest_path(), &cmds);
    let (code, stdout, stderr) = vm.wait(Duration::from_secs(30));
    // Failures below show ringvm's side too.
    let out = format!("{out}\n--- ringvm stderr:\n{stderr}");
    assert_has(&out, "info threads", "Thread 1.2");
    assert_has(&out, "continue", "Breakpoint 1, gdb_step (x=x@entry=0)");
    assert_has(&out, "print $pc == gdb_step", "= 1");
    assert_has(&out, "print $rdi", "= 0");
    // Paging on, and long mode active in EFER (LME|LMA).
    assert_has(&out, "print ($cr0 >> 31) & 1", "= 1");
    assert_has(&out, "print $cr3 != 0", "= 1");
    assert_has(&out, "print/x $efer & 0x500", "= 0x500");
    assert_has(&out, "print gdb_counter", "= 0");
    assert_has(&out, "print $pc > gdb_step", "= 1");
    assert_has(&out, "watch gdb_counter", "Watchpoint 2: gdb_counter");
    assert_has(&out, "hbreak gdb_step", "Hardware assisted breakpoint 3");
    assert!(
        out.contains("hit Breakpoint 3, gdb_step (x=x@entry=1)"),
        "the hardware breakpoint did not stop the second call:\n{out}"
    );
    assert_has(&out, "print x", "= 1");
    assert!(
        out.contains("Old value = 0\nNew value = 1"),
        "the watchpoint did not see gdb_counter go from 0 to 1:\n{out}"
    );
    assert!(
        out.contains("[Inferior 1 (process 1) exited normally]"),
        "GDB did not see the VM end:\n{out}"
    );
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(!sock.exists(), "the socket outlived the VM");
    // GDB's write reached the guest: 100, then the two calls left.
    assert!(
        stdout.contains("ringvm-test: gdb counter=102 sum=12") && stdout.contains("gdb ok"),
        "stdout:\n{stdout}"
    );
    eprintln!("the gdb session took {:?}", start.elapsed());
}

/// A GDB remote packet with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Reads one reply packet's body (skipping acks), acknowledging it.
fn reply(s: &mut UnixStream) -> String {
    let mut body = Vec::new();
    let mut byte = [0u8];
    loop {
        s.read_exact(&mut byte).expect("a reply");
        if byte[0] == b'$' {
            break;
        }
    }
    loop {
        s.read_exact(&mut byte).expect("the reply's body");
        if byte[0] == b'#' {
            break;
        }
        body.push(byte[0]);
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).expect("the checksum");
    s.write_all(b"+").expect("ack");
    String::from_utf8_lossy(&body).into_owned()
}

/// Expands the protocol's run-length encoding: `X*N` is X repeated N - 29 more times.
fn unrle(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let n = chars.next().expect("a count") as usize - 29;
            let last = out.chars().last().expect("a repeated character");
            out.extend(std::iter::repeat_n(last, n));
        } else {
            out.push(c);
        }
    }
    out
}

fn ask(s: &mut UnixStream, body: &str) -> String {
    s.write_all(&packet(body)).expect("send");
    reply(s)
}

#[test]
fn a_second_client_is_refused_garbage_is_survived_and_a_disconnect_leaves_the_vm_running() {
    let scratch = Scratch::new("gdb", "refuse");
    let sock: PathBuf = scratch.path("gdb.sock");
    let args = test_guest_args(
        &["-m", "64"],
        &GuestCmdline::new().test("hello").test("wait"),
    );
    let mut vm = DebuggedVm::start(sock.to_str().expect("utf-8 path"), args);
    assert_eq!(vm.addr, sock.display().to_string());

    let mut first = UnixStream::connect(&sock).expect("connect the first client");
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The VM waits for GDB: the boot vCPU is at the kernel's entry.
    let regs = unrle(&ask(&mut first, "g"));
    assert_eq!(regs.len(), 2 * (0x218 + 64), "g reply: {regs}");

    let mut second = UnixStream::connect(&sock).expect("connect a second client");
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    second.write_all(&packet("g")).ok();
    let mut buf = [0u8; 16];
    assert_eq!(
        second.read(&mut buf).unwrap_or(0),
        0,
        "the second client got an answer"
    );

    // Reads outside RAM, across the top of the address space, of absurd lengths; writes to
    // nowhere; registers of vCPUs that do not exist; bad register blocks: errors, and the
    // session goes on.
    for (body, want) in [
        ("mffffffffffff0000,10", "E"),
        ("mffffffffffffffff,ffff", "E"),
        ("mfffffffffffff000,2000", "E"),
        ("M4000000000,2:abcd", "E"),
        // gdbstub takes any thread id; what it then asks of vCPU 8 fails.
        ("Hg9", "OK"),
        ("g", "E"),
        ("mf0000,4", "E"),
        ("Hg1", "OK"),
        ("Z1,100020,1", "OK"),
        ("Z2,100020,3", "E"),
        ("z1,100020,1", "OK"),
    ] {
        let r = ask(&mut first, body);
        assert!(r.starts_with(want), "{body:?} gave {r:?}, not {want}...");
    }
    // Memory that is there: the first bytes of the guest's entry point (paging is off).
    assert_eq!(unrle(&ask(&mut first, "m100000,2")).len(), 4);
    // Garbage: bytes that are no packet, bad checksums, malformed packets (a register block
    // of the wrong size among them). gdbstub ends a session on a malformed packet; the VM
    // must not notice.
    first
        .write_all(b"\x00\xff$zz#00$m#00+-+--$qSupported:#ffgarbage\x03$\x7f\x80#zz")
        .expect("send garbage");
    for body in ["G00", "m ffff,10", "vCont;x", "Z9,0,0", "mzz", "vCont;c:99"] {
        let _ = first.write_all(&packet(body));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(vm.alive(), "ringvm died of garbage");
    drop(first);

    // The next client gets a session (once the last one is over) with the VM still halted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        let mut c = UnixStream::connect(&sock).expect("connect again");
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        c.write_all(&packet("g")).expect("send");
        let mut b = [0u8];
        if c.read(&mut b).unwrap_or(0) == 1 {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no new session after the garbage"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(unrle(&reply(&mut third)).len(), 2 * (0x218 + 64));

    // The client goes away: its session ends and the guest runs on.
    drop(third);
    vm.wait_for("wait halting", Duration::from_secs(30));
    assert!(vm.alive(), "ringvm ended");
    let _ = vm.child.kill();
    let (_, _, stderr) = vm.wait(Duration::from_secs(10));
    assert!(
        stderr.contains("refused a second client"),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

#[test]
fn gdb_stops_linux_at_start_kernel_reads_init_task_breaks_and_interrupts() {
    let dir = guest_kernel();
    let vmlinux = dir.join("vmlinux");
    let params = format!("{HOST_PARAMS} quiet panic=-1 reboot=k");
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "-m".into(),
        "128".into(),
        "-c".into(),
        "2".into(),
        "-i".into(),
        dir.join("initrd.cpio").into(),
        "-p".into(),
        params.into(),
        "--cpu-features".into(),
        HOST_CPU_FEATURES.into(),
        vmlinux.clone().into(),
    ];
    let start = Instant::now();
    let vm = DebuggedVm::start("0", args);
    let target = format!("target remote {}", vm.addr);
    // crosvm's recipe, then more: a software breakpoint in the kernel, and a Ctrl-C (SIGINT
    // to gdb, which sends the interrupt byte) while the kernel runs.
    let cmds = [
        target.as_str(),
        "hbreak start_kernel",
        "continue",
        "print init_task.pid",
        "print init_task.comm",
        "print $_streq(init_task.comm, \"swapper\")",
        "print ($cr0 >> 31) & 1",
        "break setup_arch",
        "continue",
        "delete",
        "info threads",
        "continue",
        "print $pc >= (long)_text && $pc < (long)_end",
    ];
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx"]);
    for c in cmds {
        cmd.args(["-ex", &format!("echo >>> {c}\\n"), "-ex", c]);
    }
    let mut child = cmd
        .arg(&vmlinux)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gdb (apt package gdb)");
    let stdout = lines_of(child.stdout.take().expect("piped stdout"));
    let stderr = lines_of(child.stderr.take().expect("piped stderr"));
    // The last continue: let the kernel run a little, then interrupt it.
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut continues = 0;
    while continues < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match stdout.recv_timeout(left) {
            Ok(line) => {
                continues += usize::from(line == ">>> continue");
                out += &(line + "\n");
            }
            Err(_) => panic!("gdb did not get to its last continue:\n{out}"),
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(interrupted.success());
    let ended = tests::wait_until(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = child.kill();
    }
    let _ = child.wait();
    while let Ok(line) = stdout.recv_timeout(Duration::from_secs(5)) {
        out += &(line + "\n");
    }
    out.extend(stderr.try_iter().map(|l| l + "\n"));
    assert!(ended, "gdb did not end after the interrupt:\n{out}");
    assert_has(&out, "continue", "hit Breakpoint 1, start_kernel ()");
    assert_has(&out, "print init_task.pid", "= 0");
    assert_has(&out, "print init_task.comm", "= \"swapper");
    assert_has(&out, "print $_streq(init_task.comm, \"swapper\")", "= 1");
    assert_has(&out, "print ($cr0 >> 31) & 1", "= 1");
    assert!(
        out.contains("hit Breakpoint 2, setup_arch ("),
        "the software breakpoint did not stop setup_arch:\n{out}"
    );
    assert_has(&out, "info threads", "Thread 1.2");
    assert!(
        out.contains("received signal SIGINT"),
        "the interrupt did not stop the kernel:\n{out}"
    );
    assert_has(&out, "print $pc >= (long)_text && $pc < (long)_end", "= 1");
    eprintln!("the Linux gdb session took {:?}", start.elapsed());
    // gdb detached at its end and left the kernel running; the test is done with it.
    drop(vm);
}

#[test]
fn a_gdb_address_that_cannot_be_served_is_refused_before_the_vm_starts() {
    let scratch = Scratch::new("gdb", "taken");
    let taken = scratch.path("taken");
    std::fs::write(&taken, b"").expect("create a file");
    for (addr, want) in [
        (taken.to_str().expect("utf-8 path"), "gdb: cannot listen on"),
        ("70000", "is not in 0..65535"),
        ("", "--gdb needs a port or a socket path"),
    ] {
        let mut cmd = Command::new(ringvm_bin());
        cmd.args(["run", "--gdb", addr, "-m", "64"])
            .arg(test_guest_path());
        let run = run_guest(&mut cmd, Duration::from_secs(30)).expect("run ringvm");
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(1),
            "--gdb {addr:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(want), "--gdb {addr:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
}
