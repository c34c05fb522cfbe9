//! PCI configuration mechanism #1 through the real `ringvm` binary: a guest of a few
//! hand-assembled instructions (64-bit entry through an ELF) reads the host bridge's identity
//! through ports 0xCF8/0xCFC and prints it on COM1.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RINGVM: &str = env!("CARGO_BIN_EXE_ringvm");
const LOAD: u64 = 0x20_0000;

/// An ELF64 x86-64 image with one PT_LOAD of `code` at 2 MiB, entered at its start.
fn elf(code: &[u8]) -> Vec<u8> {
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
fn print(text: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for byte in text.bytes() {
        c.extend([0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    c
}

const RESET: [u8; 6] = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]; // mov al,0xfe; out 0x64,al; jmp $

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ringvm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
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

fn ringvm(args: &[&str]) -> Command {
    let mut c = Command::new(RINGVM);
    c.args(args).stdin(Stdio::null());
    c
}

/// Runs to completion, failing the test (not hanging it) after `limit`.
fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm");
    wait_with_limit(&mut child, limit)
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Output {
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `mov dx, port; mov eax, value; out dx, eax`: sets CONFIG_ADDRESS.
fn set_address(value: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x0c]; // mov dx, 0xcf8
    c.push(0xb8); // mov eax, value
    c.extend(value.to_le_bytes());
    c.push(0xef); // out dx, eax
    c
}

/// Reads the dword at `address` into ESI.
fn read32(address: u32) -> Vec<u8> {
    let mut c = set_address(address);
    c.extend([0x66, 0xba, 0xfc, 0x0c]); // mov dx, 0xcfc
    c.push(0xed); // in eax, dx
    c.extend([0x89, 0xc6]); // mov esi, eax
    c
}

/// Reads the word at byte `offset` (0 or 2) of the dword at `address` into ESI's high half.
fn read16(address: u32, offset: u8) -> Vec<u8> {
    let mut c = set_address(address);
    c.extend([0x66, 0xba, 0xfc + offset, 0x0c]); // mov dx, 0xcfc + offset
    c.extend([0x66, 0xed]); // in ax, dx
    c.extend([0x0f, 0xb7, 0xf0]); // movzx esi, ax
    c.extend([0xc1, 0xe6, 0x10]); // shl esi, 16
    c
}

/// Prints the top `digits` hex digits of ESI on COM1.
fn print_hex(digits: u8) -> Vec<u8> {
    let mut c = vec![0xb9, digits, 0, 0, 0]; // mov ecx, digits
    let body = [
        0xc1, 0xc6, 0x04, // rol esi, 4
        0x89, 0xf0, // mov eax, esi
        0x24, 0x0f, // and al, 0xf
        0x04, 0x30, // add al, '0'
        0x3c, 0x39, // cmp al, '9'
        0x76, 0x02, // jbe +2
        0x04, 0x27, // add al, 'a' - '0' - 10
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xff, 0xc9, // dec ecx
    ];
    c.extend(body);
    c.extend([0x75, (-(body.len() as i8 + 2)) as u8]); // jnz back to the rol
    c
}

#[test]
fn guest_reads_the_host_bridge_through_config_mechanism_1() {
    let dir = TempDir::new("pci");
    let code = [
        print("00:00.0 "),
        read32(0x8000_0000), // vendor, device
        print_hex(8),
        print(" "),
        read32(0x8000_0008), // class, revision
        print_hex(8),
        print(" "),
        read16(0x8000_0000, 2), // device ID by a word access at 0xCFE
        print_hex(4),
        print("\nabsent "),
        read32(0x8000_2800), // 00:05.0
        print_hex(8),
        print(" "),
        read32(0x8001_0000), // bus 1
        print_hex(8),
        print(" "),
        read32(0x0000_0000), // enable bit clear
        print_hex(8),
        print("\n"),
        RESET.to_vec(),
    ]
    .concat();
    let kernel = dir.file("k.elf", &elf(&code));
    let out = run_with_limit(
        ringvm(&["run", "-m", "64", kernel.to_str().expect("utf-8")]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "00:00.0 0d578086 06000000 0d57\nabsent ffffffff ffffffff ffffffff\n"
    );
}
