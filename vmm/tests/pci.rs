//! PCI configuration mechanism #1 through the real `ringvm` binary: a guest of a few
//! hand-assembled instructions (64-bit entry through an ELF) reads the host bridge's identity
//! through ports 0xCF8/0xCFC and prints it on COM1.

use std::time::Duration;

mod common;

use common::*;

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
