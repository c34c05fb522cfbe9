//! Shared by the integration tests of the `ringvm` binary: tiny hand-assembled guests in an
//! ELF, running the binary with a time limit, a scratch directory.
#![allow(dead_code)] // each test file uses its own subset

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RINGVM: &str = env!("CARGO_BIN_EXE_ringvm");
pub const LOAD: u64 = 0x20_0000;

/// An ELF64 x86-64 image with one PT_LOAD of `code` at 2 MiB, entered at its start.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&LOAD.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let mut ph = vec![0u8; 56];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD.to_le_bytes());
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b.extend(ph);
    b.extend_from_slice(code);
    b
}

/// Machine code that prints `text` on COM1.
pub fn print(text: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for byte in text.bytes() {
        c.extend([0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    c
}

pub const RESET: [u8; 6] = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]; // mov al,0xfe; out 0x64,al; jmp $
pub const SPIN: [u8; 2] = [0xeb, 0xfe]; // jmp $

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ringvm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn ringvm(args: &[&str]) -> Command {
    let mut c = Command::new(RINGVM);
    c.args(args).stdin(Stdio::null());
    c
}

/// Runs to completion, failing the test (not hanging it) after `limit`.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm");
    wait_with_limit(&mut child, limit)
}

pub fn wait_with_limit(child: &mut Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = child.stdout.take() {
                o.read_to_end(&mut stdout).expect("read stdout");
            }
            if let Some(mut e) = child.stderr.take() {
                e.read_to_end(&mut stderr).expect("read stderr");
            }
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("ringvm did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
