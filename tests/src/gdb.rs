//! gdb makes a device process call what an attacker who took it over would (the sandbox and
//! device-death tests), without gdb's own inferior calls.
//!
//! gdb's `print f(x)` saves every register, runs the call, and writes them all back, the
//! extended (XSAVE) state included. On hosts whose XSAVE area is larger than gdb 13 knows
//! (Intel AMX: 11 KiB), the kernel refuses that write (`PTRACE_SETREGSET` with
//! `NT_X86_XSTATE` wants the whole area: EFAULT, "Couldn't write extended state status"),
//! the call errors out after it ran, and the process is left with its registers half
//! restored. So a call is made here by hand, with the general registers only (which gdb
//! writes with `PTRACE_SETREGS`): they are saved, the arguments go in `rdi`, `rsi`, ...,
//! the return address is 0, and `rip` is the function. The return to 0 stops the process
//! with a SIGSEGV that gdb keeps from it; `rax` is the result, and the saved registers are
//! written back. The floating-point state is not touched: the process was stopped in a
//! system call (its executor waiting in `io_uring_enter`), where no vector register is
//! live across the call.
//!
//! Strings passed as arguments are written below the stack first: the process's stack is
//! its `rsp` less 2 KiB and down, and [`SCRATCH`] bytes above that hold the strings (a step
//! may use `$scratch + 512` up to `$scratch + 1024` for memory of its own).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::ringvm_bin;

/// Bytes below `rsp` kept for arguments and a step's own data; calls run below them.
pub const SCRATCH: u64 = 2048;

/// One thing gdb does in the process.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Calls a function (its name, quoted for gdb if it has `::`) with arguments: gdb
    /// expressions without calls (`16`, `$1`, `$ret + 8`) or string literals (`"\"/\""`),
    /// which are written into the scratch area and passed by address. Its result (`rax`) is
    /// `$ret` afterwards.
    Call(&'a str, &'a [&'a str]),
    /// Calls a function as [`Step::Call`] does and lets the process run on without waiting
    /// for it to return: for a call that ends the process (a fault, a refused system call,
    /// a panic). The last step: gdb detaches.
    Jump(&'a str, &'a [&'a str]),
    /// `set var EXPR` (an assignment without calls: `$a = $ret`, `*(long*)$a = 0`).
    Set(&'a str),
    /// `print EXPR` (without calls): its value is one of what [`gdb_run`] returns.
    Print(&'a str),
}

/// The general registers a call changes, saved before it and written back after.
const SAVED: [&str; 19] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "eflags", "orig_rax", "rip",
];

/// The user-defined gdb commands the steps use: `rsave` (save the general registers, set
/// `$scratch`), `rsetup` (a stack for a call, no system call to restart), `rrestore` (`rip`
/// last).
fn prelude_text() -> String {
    let mut t = String::from(
        "set pagination off\nset confirm off\nhandle SIGSEGV stop print nopass\ndefine rsave\n",
    );
    for r in SAVED {
        t += &format!("  set $s_{r} = ${r}\n");
    }
    t += &format!("  set $scratch = ((long)$rsp - {SCRATCH}) & ~0xf\nend\n");
    t += "define rsetup\n  set $rsp = $scratch - 8\n  set {long}$rsp = 0\n  set $rax = 0\n  \
          set $orig_rax = -1\nend\ndefine rrestore\n";
    for r in SAVED {
        t += &format!("  set ${r} = $s_{r}\n");
    }
    t + "end\n"
}

/// The prelude as a file for `gdb -x`, written once per test process.
fn prelude() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ringvm-gdb-{}.gdb", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(prelude_text().as_bytes()))
            .expect("write the gdb prelude");
        path
    })
}

/// The gdb commands of a call to `func` with `args` (strings from `*strings` on in the
/// scratch area, which it advances).
fn call_setup(func: &str, args: &[&str], strings: &mut u64) -> Vec<String> {
    const REGS: [&str; 6] = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"];
    assert!(args.len() <= REGS.len(), "{func}: more than 6 arguments");
    let mut cmds = Vec::new();
    let mut values = Vec::new();
    for a in args {
        match a.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(s) => {
                let at = *strings;
                let len = s.len() as u64 + 1;
                assert!(at + len <= 512, "strings beyond the scratch area");
                cmds.push(format!("set var {{char[{len}]}}($scratch + {at}) = {a}"));
                values.push(format!("$scratch + {at}"));
                *strings = (at + len + 7) & !7;
            }
            None => values.push(a.to_string()),
        }
    }
    // Arguments are evaluated before the registers they may name change.
    for (i, v) in values.iter().enumerate() {
        cmds.push(format!("set var $a{i} = (long)({v})"));
    }
    cmds.push("rsetup".into());
    for (i, reg) in REGS.iter().take(values.len()).enumerate() {
        cmds.push(format!("set var ${reg} = $a{i}"));
    }
    cmds.push(format!("set var $rip = (long)&{func}"));
    cmds
}

/// Runs `steps` in process `pid` (attached as root from outside its jail; its binary and
/// libraries read from the host), then detaches; returns the values printed, in order.
pub fn gdb_run(pid: u32, steps: &[Step<'_>]) -> Vec<String> {
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch", "-ex", "set sysroot /", "-ex"])
        .arg(format!("file {}", ringvm_bin().display()))
        .arg("-x")
        .arg(prelude())
        .args(["-ex", &format!("attach {pid}"), "-ex", "set language c"])
        .args(["-ex", "rsave"]);
    let mut strings = 0;
    let mut jumped = false;
    for step in steps {
        assert!(!jumped, "a step after a Jump");
        let cmds = match *step {
            Step::Call(func, args) => {
                let mut c = call_setup(func, args, &mut strings);
                c.extend([
                    "continue".into(),
                    "set var $ret = $rax".into(),
                    "rrestore".into(),
                ]);
                c
            }
            Step::Jump(func, args) => {
                jumped = true;
                call_setup(func, args, &mut strings)
            }
            Step::Set(expr) => vec![format!("set var {expr}")],
            Step::Print(expr) => vec![format!("print {expr}")],
        };
        for c in cmds {
            cmd.args(["-ex", &c]);
        }
    }
    cmd.args(["-ex", "detach"]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run gdb (apt package gdb)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix('$'))
        .filter_map(|l| l.split_once(" = ").map(|(_, v)| v.to_string()))
        .collect()
}
