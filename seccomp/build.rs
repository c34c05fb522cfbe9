//! Compiles every policy — the VMM's in `policies/<name>.policy`, each device's next to its
//! code in its crate, `<crate>/src/<name>.policy` — to classic BPF for x86_64 and writes, to
//! OUT_DIR,
//! `<name>.bpf` (default action KILL_PROCESS), `<name>.log.bpf` (default action LOG) and
//! `policies.rs` (each policy's rules, for `rules()`, `allowed()` and the tests).
//! A bad policy fails the build with `file:line: message`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[path = "src/compiler.rs"]
#[allow(dead_code)]
mod compiler;

mod constants {
    include!("src/constants.rs");
}

/// Every `SYS_*` number of libc for x86_64, by name.
fn syscalls() -> HashMap<&'static str, u32> {
    macro_rules! syscall_table {
        ($($name:ident => $sys:ident),* $(,)?) => {
            [$((
                stringify!($name),
                u32::try_from(libc::$sys).expect("syscall numbers are small and positive"),
            )),*]
            .into_iter()
            .collect()
        };
    }
    include!("src/syscalls.rs")
}

struct Env {
    syscalls: HashMap<&'static str, u32>,
    constants: HashMap<&'static str, u64>,
    dir: PathBuf,
}

impl compiler::Env for Env {
    fn syscall(&self, name: &str) -> Option<u32> {
        self.syscalls.get(name).copied()
    }
    fn constant(&self, name: &str) -> Option<u64> {
        self.constants.get(name).copied()
    }
    fn include(&self, file: &str) -> Option<String> {
        if file.contains('/') {
            return None;
        }
        std::fs::read_to_string(self.dir.join(file)).ok()
    }
}

/// The policies, in name order: every `policies/<name>.policy` (the VMM's, and the files
/// they include) and every `<crate>/src/<name>.policy` of the workspace's other crates (a
/// device's, next to its code). Adding a file adds a policy; nothing in Rust names them.
fn policy_files(manifest: &Path) -> Vec<(String, PathBuf)> {
    let mut dirs = vec![manifest.join("policies")];
    let workspace = manifest.parent().expect("the crate is in the workspace");
    let mut crates: Vec<PathBuf> = std::fs::read_dir(workspace)
        .unwrap_or_else(|e| panic!("seccomp: cannot list {}: {e}", workspace.display()))
        .filter_map(|e| {
            let src = e.ok()?.path().join("src");
            (src.is_dir() && src.parent()?.join("Cargo.toml").is_file()).then_some(src)
        })
        .collect();
    crates.sort();
    dirs.extend(crates);
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for dir in dirs {
        println!("cargo::rerun-if-changed={}", dir.display());
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("seccomp: cannot list {}: {e}", dir.display()));
        for e in entries.filter_map(|e| e.ok()) {
            let file = e.file_name();
            let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".policy")) else {
                continue;
            };
            if let Some((_, other)) = files.iter().find(|(n, _)| n == name) {
                panic!(
                    "seccomp: two policies named {name}: {} and {}",
                    other.display(),
                    e.path().display()
                );
            }
            files.push((name.to_owned(), e.path()));
        }
    }
    files.sort();
    files
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = manifest.join("policies");
    // A new crate (which may bring a policy) is a new member in the workspace's manifest.
    println!("cargo::rerun-if-changed=../Cargo.toml");
    println!("cargo::rerun-if-changed=src/compiler.rs");
    println!("cargo::rerun-if-changed=src/constants.rs");
    println!("cargo::rerun-if-changed=src/syscalls.rs");

    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    assert!(
        arch == "x86_64" && cfg!(target_arch = "x86_64"),
        "seccomp: the policies are written for x86_64 (host and target), not {arch}"
    );

    let env = Env {
        syscalls: syscalls(),
        constants: constants::constants().into_iter().collect(),
        dir: dir.clone(),
    };
    let mut rules_rs = String::new();
    let mut table = String::from("pub(crate) static TABLE: &[Entry] = &[\n");
    let workspace = manifest.parent().expect("in the workspace").to_owned();
    for (name, path) in &policy_files(&manifest) {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "seccomp: policy file names are lowercase letters, digits and '_': {name}"
        );
        let file = path
            .strip_prefix(&workspace)
            .unwrap_or(path)
            .display()
            .to_string();
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("seccomp: cannot read {}: {e}", path.display()));
        let policy = compiler::parse(&file, &text, &env)
            .unwrap_or_else(|e| panic!("seccomp: bad policy {e}"));
        for (suffix, action) in [
            ("bpf", compiler::SECCOMP_RET_KILL_PROCESS),
            ("log.bpf", compiler::SECCOMP_RET_LOG),
            ("trap.bpf", compiler::SECCOMP_RET_TRAP),
        ] {
            let program = compiler::compile(&policy, action)
                .unwrap_or_else(|e| panic!("seccomp: cannot compile {file}: {e}"));
            let bytes: Vec<u8> = program.iter().flat_map(|i| i.to_ne_bytes()).collect();
            write(&out.join(format!("{name}.{suffix}")), &bytes);
            let upper = format!(
                "{}_{}",
                name.to_uppercase(),
                suffix.replace('.', "_").to_uppercase()
            );
            let _ = writeln!(
                rules_rs,
                "static {upper}: [SockFilter; {}] = decode(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.{suffix}\")));",
                program.len()
            );
        }
        write_rules(&mut rules_rs, name, &policy);
        let upper = name.to_uppercase();
        let _ = writeln!(
            table,
            "    Entry {{ name: {name:?}, kill: &{upper}_BPF, log: &{upper}_LOG_BPF, trap: &{upper}_TRAP_BPF, rules: {upper}_RULES }},"
        );
    }
    table.push_str("];\n");
    rules_rs.push_str(&table);
    write(&out.join("policies.rs"), rules_rs.as_bytes());
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes)
        .unwrap_or_else(|e| panic!("seccomp: cannot write {}: {e}", path.display()));
}

/// `pub(crate) static <NAME>_RULES: &[Rule] = &[...];`
fn write_rules(out: &mut String, name: &str, policy: &compiler::Policy) {
    let upper = name.to_uppercase();
    let _ = writeln!(out, "pub(crate) static {upper}_RULES: &[Rule] = &[");
    for rule in &policy.rules {
        let _ = writeln!(
            out,
            "    Rule {{ syscall: {:?}, nr: {}, condition: {:?}, reason: {:?}, alternatives: &[",
            rule.syscall, rule.nr, rule.condition, rule.reason
        );
        for alternative in &rule.alternatives {
            let _ = write!(out, "        &[");
            for t in alternative {
                let op = match t.op {
                    compiler::Op::Eq => "Eq",
                    compiler::Op::Ne => "Ne",
                };
                let _ = write!(
                    out,
                    "ArgTest {{ arg: {}, mask: {:#x}, op: ArgOp::{op}, value: {:#x} }}, ",
                    t.arg, t.mask, t.value
                );
            }
            let _ = writeln!(out, "],");
        }
        let _ = writeln!(out, "    ] }},");
    }
    let _ = writeln!(out, "];");
}
