//! README.md's table of what device processes may call stays in step with the policies.

use seccomp::Policy;

#[test]
fn readme_sandbox_table_names_every_allowed_device_syscall() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md");
    let section = readme
        .split("## Sandbox")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Sandbox section in README.md");
    // Every device's policy: all but the VMM's own two.
    let devices =
        Policy::all().filter(|p| ![Policy::VMM, Policy::VMM_GDB, Policy::VCPU].contains(&p.name()));
    for policy in devices {
        for name in seccomp::allowed(policy) {
            let listed = section.lines().any(|l| {
                l.starts_with('|')
                    && l.split('|').nth(1).is_some_and(|cell| {
                        cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .any(|w| w == name)
                    })
            });
            assert!(listed, "README's sandbox table lacks {name} ({policy:?})");
        }
    }
}
