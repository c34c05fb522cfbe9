//! Device process start: from `jail::spawn` (as `ringvm run` does it) of `ringvm device rng
//! --fd 3` to its first vhost-user reply (GET_FEATURES), then its exit when the connection
//! closes. Jailed (namespaces, pivot_root, capabilities dropped, restricted ring, seccomp)
//! beside the same process with `--disable-sandbox`: the difference is what the sandbox costs
//! at start.
//!
//! `cargo bench -p benches --bench spawn [-- --quick]`; ringvm is $RINGVM_BIN or
//! target/release/ringvm (built if missing).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use benches::{target_dir, workspace_root, Runner, Variant};

fn ringvm_bin() -> PathBuf {
    let bin = std::env::var_os("RINGVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/ringvm"));
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "vmm", "--bin", "ringvm"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p vmm failed");
    }
    bin
}

/// One device start: spawn, GET_FEATURES and its reply, close, reap.
fn start_device(bin: &Path, sandbox: bool) -> Duration {
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut args = vec![
        OsStr::new("device"),
        OsStr::new("rng"),
        OsStr::new("--fd"),
        OsStr::new("3"),
    ];
    if !sandbox {
        args.push(OsStr::new("--disable-sandbox"));
    }
    let start = Instant::now();
    let child = jail::spawn(
        bin,
        &args,
        &[theirs.as_fd()],
        &jail::Sandbox { enabled: sandbox },
    )
    .expect("spawn ringvm device rng");
    drop(theirs);
    // GET_FEATURES (1), version 1, no body.
    let mut request = Vec::new();
    for word in [1u32, 1, 0] {
        request.extend_from_slice(&word.to_le_bytes());
    }
    ours.write_all(&request).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    ours.read_exact(&mut reply).expect("GET_FEATURES reply");
    let elapsed = start.elapsed();
    drop(ours);
    let status = child.wait().expect("reap the device");
    assert!(status.success(), "device ended with {status}");
    elapsed
}

fn main() {
    let bin = ringvm_bin();
    let mut runner = Runner::new("spawn");
    runner.compare(
        "rng-start-to-first-reply",
        vec![
            Variant::subject("jailed", "ringvm device rng, sandbox on", |n| {
                (0..n).map(|_| start_device(&bin, true)).sum()
            }),
            Variant::limit("unjailed", "ringvm device rng --disable-sandbox", |n| {
                (0..n).map(|_| start_device(&bin, false)).sum()
            }),
        ],
    );
    if let Err(e) = runner.finish() {
        eprintln!("spawn bench: cannot write results: {e}");
        std::process::exit(1);
    }
}
