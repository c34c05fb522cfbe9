//! The policy compiler: policy text to classic BPF for x86_64. Std only, no unsafe: build.rs
//! includes this file to compile the policies (`policies/*.policy`, `<crate>/src/*.policy`)
//! at build time, and the crate's unit tests include it to test the parser and the code
//! generator.
//!
//! # Policy format
//! One rule a line; `#` starts a comment. A rule is a system call name, optionally followed by
//! `:` and a condition on its arguments, and must end with a `# reason` comment (the reason
//! goes into the README table). Several rules for one system call are alternatives (OR).
//!
//! ```text
//! # what the whole policy is for (free comment)
//! @include device.inc                          # a file of seccomp's policies/, inlined
//! io_uring_enter                               # the executor's only wait
//! mmap: arg2 & PROT_EXEC == 0                  # map guest memory, never executable
//! ioctl: arg1 == TUNSETOFFLOAD                 # offloads the driver negotiated
//! socket: arg0 == AF_UNIX && arg1 & SOCK_TYPE_MASK == SOCK_STREAM # ...
//! ```
//!
//! Conditions: `alternative ('||' alternative)*`, an alternative is `test ('&&' test)*`, a test
//! is `argN [& MASK] (== | !=) VALUE` with N in 0..=5, comparing all 64 bits of the argument
//! (masked first). Values are numbers (decimal or 0x hex) or constant names, combined with
//! `|`, `~` and parentheses.

use std::collections::BTreeMap;
use std::fmt;

/// `struct seccomp_data` offsets.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARGS: u32 = 16;

/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// `__X32_SYSCALL_BIT`: x32 system calls have it set in their number.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
/// Deliver SIGSYS (si_syscall = the call) instead of running the call.
pub const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// `BPF_MAXINSNS`: the kernel refuses longer programs.
pub const BPF_MAXINSNS: usize = 4096;

// Classic BPF opcodes (linux/bpf_common.h).
pub const BPF_LD: u16 = 0x00;
pub const BPF_ALU: u16 = 0x04;
pub const BPF_JMP: u16 = 0x05;
pub const BPF_RET: u16 = 0x06;
pub const BPF_W: u16 = 0x00;
pub const BPF_ABS: u16 = 0x20;
pub const BPF_AND: u16 = 0x50;
pub const BPF_JA: u16 = 0x00;
pub const BPF_JEQ: u16 = 0x10;
pub const BPF_JGE: u16 = 0x30;
pub const BPF_K: u16 = 0x00;

/// One `struct sock_filter` instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    /// The 8 bytes of `struct sock_filter`, native endian.
    pub fn to_ne_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.code.to_ne_bytes());
        b[2] = self.jt;
        b[3] = self.jf;
        b[4..8].copy_from_slice(&self.k.to_ne_bytes());
        b
    }
}

/// `==` or `!=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
}

/// `argN & mask op value` (mask all ones when the rule has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Test {
    pub arg: u8,
    pub mask: u64,
    pub op: Op,
    pub value: u64,
}

impl Test {
    pub fn holds(&self, args: &[u64; 6]) -> bool {
        let v = args[usize::from(self.arg)] & self.mask;
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
        }
    }
}

/// One line of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub syscall: String,
    pub nr: u32,
    /// Alternatives, each a conjunction of tests; empty: the call is always allowed.
    pub alternatives: Vec<Vec<Test>>,
    /// The condition as written (empty without one).
    pub condition: String,
    pub reason: String,
}

/// A parsed policy: its rules in file order (includes inlined).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// What the compiler needs from outside: names to numbers, and included files.
pub trait Env {
    fn syscall(&self, name: &str) -> Option<u32>;
    fn constant(&self, name: &str) -> Option<u64>;
    fn include(&self, file: &str) -> Option<String>;
}

/// A policy error, with the file and line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Parses a policy file.
pub fn parse(file: &str, text: &str, env: &dyn Env) -> Result<Policy, ParseError> {
    let mut policy = Policy::default();
    parse_into(&mut policy, file, text, env, 0)?;
    check_rules(&policy, file)?;
    Ok(policy)
}

fn parse_into(
    policy: &mut Policy,
    file: &str,
    text: &str,
    env: &dyn Env,
    depth: usize,
) -> Result<(), ParseError> {
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| ParseError {
            file: file.to_owned(),
            line: i + 1,
            message,
        };
        let (code, comment) = match raw.split_once('#') {
            Some((code, comment)) => (code.trim(), Some(comment.trim())),
            None => (raw.trim(), None),
        };
        if code.is_empty() {
            continue;
        }
        if let Some(name) = code.strip_prefix("@include") {
            let name = name.trim();
            if depth >= 4 {
                return Err(err(format!("@include {name}: nested too deep")));
            }
            let text = env
                .include(name)
                .ok_or_else(|| err(format!("@include {name}: no such file in policies/")))?;
            parse_into(policy, name, &text, env, depth + 1)?;
            continue;
        }
        let reason = comment
            .filter(|c| !c.is_empty())
            .ok_or_else(|| err(format!("`{code}`: every rule needs a `# reason`")))?;
        let (name, condition) = match code.split_once(':') {
            Some((name, cond)) => (name.trim(), cond.trim()),
            None => (code, ""),
        };
        let nr = env
            .syscall(name)
            .ok_or_else(|| err(format!("unknown system call `{name}`")))?;
        let alternatives = if condition.is_empty() {
            if code.contains(':') {
                return Err(err(format!("`{name}:` without a condition")));
            }
            Vec::new()
        } else {
            parse_condition(condition, env).map_err(err)?
        };
        policy.rules.push(Rule {
            syscall: name.to_owned(),
            nr,
            alternatives,
            condition: condition.to_owned(),
            reason: reason.to_owned(),
        });
    }
    Ok(())
}

/// A call allowed unconditionally may have no other rule: the condition would be dead.
fn check_rules(policy: &Policy, file: &str) -> Result<(), ParseError> {
    let mut seen: BTreeMap<u32, bool> = BTreeMap::new();
    for rule in &policy.rules {
        let unconditional = rule.alternatives.is_empty();
        if let Some(prev) = seen.insert(rule.nr, unconditional) {
            if prev || unconditional {
                return Err(ParseError {
                    file: file.to_owned(),
                    line: 0,
                    message: format!(
                        "`{}` is allowed unconditionally and has another rule",
                        rule.syscall
                    ),
                });
            }
        }
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Num(u64),
    Name(String),
    OrOr,
    AndAnd,
    EqEq,
    NotEq,
    Or,
    And,
    Not,
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let two = |t: &[u8]| b[i..].starts_with(t);
        if c.is_ascii_whitespace() {
            i += 1;
        } else if two(b"||") {
            out.push(Token::OrOr);
            i += 2;
        } else if two(b"&&") {
            out.push(Token::AndAnd);
            i += 2;
        } else if two(b"==") {
            out.push(Token::EqEq);
            i += 2;
        } else if two(b"!=") {
            out.push(Token::NotEq);
            i += 2;
        } else if c == b'|' {
            out.push(Token::Or);
            i += 1;
        } else if c == b'&' {
            out.push(Token::And);
            i += 1;
        } else if c == b'~' {
            out.push(Token::Not);
            i += 1;
        } else if c == b'(' {
            out.push(Token::Open);
            i += 1;
        } else if c == b')' {
            out.push(Token::Close);
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &s[start..i];
            if c.is_ascii_digit() {
                let n = match word.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => word.parse(),
                }
                .map_err(|_| format!("bad number `{word}`"))?;
                out.push(Token::Num(n));
            } else {
                out.push(Token::Name(word.to_owned()));
            }
        } else {
            return Err(format!("unexpected `{}`", char::from(c)));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Token>,
    pos: usize,
    env: &'a dyn Env,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn test(&mut self) -> Result<Test, String> {
        let arg = match self.tokens.get(self.pos) {
            Some(Token::Name(n)) => n
                .strip_prefix("arg")
                .and_then(|d| d.parse::<u8>().ok())
                .filter(|&d| d <= 5)
                .ok_or_else(|| format!("expected arg0 to arg5, found `{n}`"))?,
            other => return Err(format!("expected an argument, found {other:?}")),
        };
        self.pos += 1;
        let mask = if self.eat(&Token::And) {
            self.value()?
        } else {
            u64::MAX
        };
        let op = if self.eat(&Token::EqEq) {
            Op::Eq
        } else if self.eat(&Token::NotEq) {
            Op::Ne
        } else {
            return Err(format!("expected == or != after arg{arg}"));
        };
        let value = self.value()?;
        if value & !mask != 0 {
            return Err(format!(
                "arg{arg} & {mask:#x} can never equal {value:#x}: the value has bits outside the mask"
            ));
        }
        Ok(Test {
            arg,
            mask,
            op,
            value,
        })
    }

    fn value(&mut self) -> Result<u64, String> {
        let mut v = self.unary()?;
        while self.eat(&Token::Or) {
            v |= self.unary()?;
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<u64, String> {
        let t = self.peek().cloned();
        self.pos += 1;
        match t {
            Some(Token::Not) => Ok(!self.unary()?),
            Some(Token::Open) => {
                let v = self.value()?;
                if !self.eat(&Token::Close) {
                    return Err("expected `)`".to_owned());
                }
                Ok(v)
            }
            Some(Token::Num(n)) => Ok(n),
            Some(Token::Name(n)) => self
                .env
                .constant(&n)
                .ok_or_else(|| format!("unknown constant `{n}`")),
            other => Err(format!("expected a value, found {other:?}")),
        }
    }
}

fn parse_condition(s: &str, env: &dyn Env) -> Result<Vec<Vec<Test>>, String> {
    let mut p = Parser {
        tokens: tokenize(s)?,
        pos: 0,
        env,
    };
    let mut alternatives = Vec::new();
    loop {
        let mut tests = vec![p.test()?];
        while p.eat(&Token::AndAnd) {
            tests.push(p.test()?);
        }
        alternatives.push(tests);
        if !p.eat(&Token::OrOr) {
            break;
        }
    }
    if let Some(t) = p.peek() {
        return Err(format!("unexpected {t:?} after the condition"));
    }
    Ok(alternatives)
}

/// A label in the program being assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

enum Item {
    Insn(Insn),
    /// `jeq #k` (or `jge`) with symbolic targets; `None` is the next instruction.
    Jump {
        code: u16,
        k: u32,
        jt: Option<Label>,
        jf: Option<Label>,
    },
    Bind(Label),
}

#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    fn bind(&mut self, l: Label) {
        self.items.push(Item::Bind(l));
    }

    fn ld(&mut self, offset: u32) {
        self.items.push(Item::Insn(Insn {
            code: BPF_LD | BPF_W | BPF_ABS,
            jt: 0,
            jf: 0,
            k: offset,
        }));
    }

    fn and(&mut self, k: u32) {
        self.items.push(Item::Insn(Insn {
            code: BPF_ALU | BPF_AND | BPF_K,
            jt: 0,
            jf: 0,
            k,
        }));
    }

    fn ret(&mut self, k: u32) {
        self.items.push(Item::Insn(Insn {
            code: BPF_RET | BPF_K,
            jt: 0,
            jf: 0,
            k,
        }));
    }

    fn jump(&mut self, op: u16, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.items.push(Item::Jump {
            code: BPF_JMP | op | BPF_K,
            k,
            jt,
            jf,
        });
    }

    fn finish(self) -> Result<Vec<Insn>, String> {
        let mut at = vec![usize::MAX; self.labels];
        let mut pc = 0;
        for item in &self.items {
            match item {
                Item::Bind(l) => at[l.0] = pc,
                _ => pc += 1,
            }
        }
        let mut out = Vec::with_capacity(pc);
        for item in self.items {
            match item {
                Item::Bind(_) => {}
                Item::Insn(i) => out.push(i),
                Item::Jump { code, k, jt, jf } => {
                    let next = out.len() + 1;
                    let off = |l: Option<Label>| -> Result<u8, String> {
                        let target = l.map_or(next, |l| at[l.0]);
                        let off = target
                            .checked_sub(next)
                            .ok_or("backward jump (a bug in the compiler)")?;
                        u8::try_from(off)
                            .map_err(|_| format!("jump of {off} instructions: split the rule"))
                    };
                    out.push(Insn {
                        code,
                        jt: off(jt)?,
                        jf: off(jf)?,
                        k,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

/// One test: falls through when it holds, jumps to `fail` when not.
fn emit_test(asm: &mut Asm, t: &Test, fail: Label) {
    let arg_lo = OFFSET_ARGS + 8 * u32::from(t.arg);
    let arg_hi = arg_lo + 4;
    // A mask without high bits and a value without high bits: the high word always matches.
    let check_hi = hi(t.mask) != 0 || hi(t.value) != 0;
    let load = |asm: &mut Asm, offset: u32, mask: u32| {
        asm.ld(offset);
        if mask != u32::MAX {
            asm.and(mask);
        }
    };
    load(asm, arg_lo, lo(t.mask));
    match (t.op, check_hi) {
        (Op::Eq, false) => asm.jump(BPF_JEQ, lo(t.value), None, Some(fail)),
        (Op::Eq, true) => {
            asm.jump(BPF_JEQ, lo(t.value), None, Some(fail));
            load(asm, arg_hi, hi(t.mask));
            asm.jump(BPF_JEQ, hi(t.value), None, Some(fail));
        }
        (Op::Ne, false) => asm.jump(BPF_JEQ, lo(t.value), Some(fail), None),
        (Op::Ne, true) => {
            let pass = asm.label();
            asm.jump(BPF_JEQ, lo(t.value), None, Some(pass));
            load(asm, arg_hi, hi(t.mask));
            asm.jump(BPF_JEQ, hi(t.value), Some(fail), None);
            asm.bind(pass);
        }
    }
}

/// Compiles a policy: the architecture check (anything but x86_64 is killed), x32 calls
/// killed, then one `jeq` per system call in file order (put hot calls first), each followed
/// by its argument checks; whatever matches no rule gets `default_action`.
pub fn compile(policy: &Policy, default_action: u32) -> Result<Vec<Insn>, String> {
    // Group the rules by call, keeping the order of first appearance.
    let mut groups: Vec<(u32, Vec<&Rule>)> = Vec::new();
    for rule in &policy.rules {
        match groups.iter_mut().find(|(nr, _)| *nr == rule.nr) {
            Some((_, rules)) => rules.push(rule),
            None => groups.push((rule.nr, vec![rule])),
        }
    }

    let mut asm = Asm::default();
    let arch_ok = asm.label();
    let nr_ok = asm.label();
    asm.ld(OFFSET_ARCH);
    asm.jump(BPF_JEQ, AUDIT_ARCH_X86_64, Some(arch_ok), None);
    asm.ret(SECCOMP_RET_KILL_PROCESS);
    asm.bind(arch_ok);
    asm.ld(OFFSET_NR);
    asm.jump(BPF_JGE, X32_SYSCALL_BIT, None, Some(nr_ok));
    asm.ret(SECCOMP_RET_KILL_PROCESS);
    asm.bind(nr_ok);
    for (nr, rules) in &groups {
        let next = asm.label();
        asm.jump(BPF_JEQ, *nr, None, Some(next));
        if rules.iter().any(|r| r.alternatives.is_empty()) {
            asm.ret(SECCOMP_RET_ALLOW);
        } else {
            for alternative in rules.iter().flat_map(|r| &r.alternatives) {
                let fail = asm.label();
                for t in alternative {
                    emit_test(&mut asm, t, fail);
                }
                asm.ret(SECCOMP_RET_ALLOW);
                asm.bind(fail);
            }
            asm.ret(default_action);
        }
        asm.bind(next);
    }
    asm.ret(default_action);
    let program = asm.finish()?;
    if program.len() > BPF_MAXINSNS {
        return Err(format!(
            "{} instructions, more than BPF_MAXINSNS",
            program.len()
        ));
    }
    Ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestEnv;

    impl Env for TestEnv {
        fn syscall(&self, name: &str) -> Option<u32> {
            match name {
                "read" => Some(0),
                "write" => Some(1),
                "mmap" => Some(9),
                "ioctl" => Some(16),
                _ => None,
            }
        }
        fn constant(&self, name: &str) -> Option<u64> {
            match name {
                "PROT_READ" => Some(1),
                "PROT_WRITE" => Some(2),
                "PROT_EXEC" => Some(4),
                _ => None,
            }
        }
        fn include(&self, file: &str) -> Option<String> {
            match file {
                "base.inc" => Some("read # the base\n".to_owned()),
                "loop.inc" => Some("@include loop.inc\n".to_owned()),
                _ => None,
            }
        }
    }

    fn parse_err(text: &str) -> String {
        let e = parse("t.policy", text, &TestEnv).expect_err("must fail");
        e.to_string()
    }

    #[test]
    fn parses_rules_conditions_and_includes() {
        let text = "# comment\n@include base.inc\nwrite # out\n\
                    mmap: arg2 & PROT_EXEC == 0 && arg3 != 0x10 # maps\n\
                    ioctl: arg1 == 0xae80 || arg1 == (PROT_READ|PROT_WRITE) # a\n\
                    ioctl: arg1 == ~0 # b\n";
        let p = parse("t.policy", text, &TestEnv).expect("parses");
        let names: Vec<_> = p.rules.iter().map(|r| r.syscall.as_str()).collect();
        assert_eq!(names, ["read", "write", "mmap", "ioctl", "ioctl"]);
        assert_eq!(p.rules[0].reason, "the base");
        assert_eq!(
            p.rules[2].alternatives,
            vec![vec![
                Test {
                    arg: 2,
                    mask: 4,
                    op: Op::Eq,
                    value: 0
                },
                Test {
                    arg: 3,
                    mask: u64::MAX,
                    op: Op::Ne,
                    value: 0x10
                },
            ]]
        );
        assert_eq!(p.rules[3].alternatives.len(), 2);
        assert_eq!(p.rules[3].alternatives[1][0].value, 3);
        assert_eq!(p.rules[4].alternatives[0][0].value, u64::MAX);
    }

    #[test]
    fn bad_policies_name_the_line() {
        assert_eq!(
            parse_err("read\n"),
            "t.policy:1: `read`: every rule needs a `# reason`"
        );
        assert_eq!(
            parse_err("\nopen # x\n"),
            "t.policy:2: unknown system call `open`"
        );
        assert!(parse_err("mmap: arg6 == 0 # x").contains("expected arg0 to arg5"));
        assert!(parse_err("mmap: arg2 == PROT_NONE # x").contains("unknown constant `PROT_NONE`"));
        assert!(parse_err("mmap: arg2 & 4 == 8 # x").contains("never equal"));
        assert!(parse_err("mmap: arg2 = 4 # x").contains("unexpected `=`"));
        assert!(parse_err("mmap: arg2 == 4 arg3 # x").contains("after the condition"));
        assert!(parse_err("mmap: # x").contains("without a condition"));
        assert!(parse_err("@include nope.inc").contains("no such file"));
        assert!(parse_err("@include loop.inc").contains("nested too deep"));
        assert!(parse_err("read # a\nread # b").contains("unconditionally"));
        assert!(parse_err("read # a\nread: arg0 == 1 # b").contains("unconditionally"));
    }

    #[test]
    fn long_rules_fail_instead_of_jumping_wrong() {
        let mut text = String::from("ioctl: arg1 == 0");
        for i in 1..100 {
            text += &format!(" || arg1 == {i}");
        }
        text += " # many\n";
        let p = parse("t.policy", &text, &TestEnv).expect("parses");
        let e = compile(&p, SECCOMP_RET_KILL_PROCESS).expect_err("jump too long");
        assert!(e.contains("split the rule"), "{e}");
    }

    #[test]
    fn constants_are_libcs() {
        assert_eq!(SECCOMP_RET_KILL_PROCESS, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(SECCOMP_RET_LOG, libc::SECCOMP_RET_LOG);
        assert_eq!(SECCOMP_RET_TRAP, libc::SECCOMP_RET_TRAP);
        assert_eq!(SECCOMP_RET_ALLOW, libc::SECCOMP_RET_ALLOW);
        assert_eq!(BPF_MAXINSNS, libc::BPF_MAXINSNS as usize);
        let ops = [
            (BPF_LD, libc::BPF_LD),
            (BPF_ALU, libc::BPF_ALU),
            (BPF_JMP, libc::BPF_JMP),
            (BPF_RET, libc::BPF_RET),
            (BPF_W, libc::BPF_W),
            (BPF_ABS, libc::BPF_ABS),
            (BPF_AND, libc::BPF_AND),
            (BPF_JA, libc::BPF_JA),
            (BPF_JEQ, libc::BPF_JEQ),
            (BPF_JGE, libc::BPF_JGE),
            (BPF_K, libc::BPF_K),
        ];
        for (ours, theirs) in ops {
            assert_eq!(u32::from(ours), theirs);
        }
        // AUDIT_ARCH_X86_64 = EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (linux/audit.h);
        // tests/install.rs shows the kernel agrees (allowed calls run, i386 calls die).
        assert_eq!(AUDIT_ARCH_X86_64 & 0xffff, u32::from(libc::EM_X86_64));
        // struct seccomp_data: nr, arch, instruction_pointer, args.
        assert_eq!(
            std::mem::offset_of!(libc::seccomp_data, nr),
            OFFSET_NR as usize
        );
        assert_eq!(
            std::mem::offset_of!(libc::seccomp_data, arch),
            OFFSET_ARCH as usize
        );
        assert_eq!(
            std::mem::offset_of!(libc::seccomp_data, args),
            OFFSET_ARGS as usize
        );
    }

    #[test]
    fn program_starts_with_the_arch_and_x32_checks() {
        let p = parse("t.policy", "read # r\n", &TestEnv).expect("parses");
        let prog = compile(&p, SECCOMP_RET_LOG).expect("compiles");
        let ret = BPF_RET | BPF_K;
        assert_eq!(
            prog[0],
            Insn {
                code: BPF_LD | BPF_W | BPF_ABS,
                jt: 0,
                jf: 0,
                k: OFFSET_ARCH
            }
        );
        assert_eq!(prog[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(
            prog[2],
            Insn {
                code: ret,
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_KILL_PROCESS
            }
        );
        assert_eq!(prog[4].k, X32_SYSCALL_BIT);
        assert_eq!(
            prog[5],
            Insn {
                code: ret,
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_KILL_PROCESS
            }
        );
        assert_eq!(
            prog.last(),
            Some(&Insn {
                code: ret,
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_LOG
            })
        );
    }
}
