//! `ab`: compares the benches of two builds, run alternately on this machine, and fails on a
//! significant regression. `scripts/ab` runs it; see its usage below.
//!
//! Both revisions are checked out in their own worktrees under `target/ab/` (the head may be
//! the working tree as it is) and built in their own target folders, both with one codegen
//! unit per crate: with the default sixteen, a change anywhere in a crate can reshuffle which
//! functions share a unit, and so what gets inlined into code the change never touched (the
//! unchanged rust-vmm peer of the virtqueue bench moved by 15% that way). Then every chosen bench
//! runs in rounds: base then head, head then base, and so on, so that both sides see the same
//! drift of the machine's load. Each run gives one rate per case, and its ratio to its bench's
//! limit in that run; the rounds give paired samples, compared with `benches::stats::paired`
//! (median of head/base, bootstrap 95% interval, exact Wilcoxon signed-rank p-value). A
//! subject case regressed when it lost more than the threshold, significantly — judged on its
//! ratio to the limit (the hand-written path, the same code on both sides) where its bench has
//! one, so that a machine that got slower for a run is not taken for ringvm: "drift".
//!
//! Exit status: 1 when a case regressed, 0 when none did, 2 when the comparison could not run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use benches::compare::{self, Samples};
use benches::stats::Gate;

const USAGE: &str = "\
usage: scripts/ab [OPTIONS] [BASE] [HEAD] [-- BENCH[,BENCH...] [FILTER...]]

Builds BASE and HEAD (git revisions; BASE defaults to the merge-base with main, HEAD to the
working tree as it is), runs the benches alternately for N rounds, and reports head/base per
case with a 95% confidence interval and a p-value. Exits 1 when a case regressed beyond the
threshold with significance while its bench's limit did not move, 0 otherwise, 2 when it
could not run. BENCH defaults to executor,virtqueue; FILTERs select cases as in cargo bench.

options:
  --rounds N         alternating rounds (default 10)
  --threshold PCT    loss that counts as a regression, in percent (default 5)
  --alpha P          significance level (default 0.01)
  --secs S           measured seconds per case in each run (default 0.5)
  --bench-rounds N   rounds inside each run (default 5)
  --repeat N         build once, then make N independent comparisons (the rounds each
                     time) and say in how many a regression was flagged (default 1)
  --json FILE        write the (last) comparison as JSON
  --bmf FILE         write the head's rates (of the last comparison) in the Bencher Metric
                     Format
";

#[derive(Debug)]
struct Options {
    base: Option<String>,
    head: Option<String>,
    benches: Vec<String>,
    filters: Vec<String>,
    rounds: usize,
    gate: Gate,
    secs: f64,
    bench_rounds: usize,
    repeat: usize,
    json: Option<PathBuf>,
    bmf: Option<PathBuf>,
}

fn parse(args: Vec<String>) -> Result<Options, String> {
    let mut o = Options {
        base: None,
        head: None,
        benches: vec!["executor".into(), "virtqueue".into()],
        filters: Vec::new(),
        rounds: 10,
        gate: Gate::default(),
        secs: 0.5,
        bench_rounds: 5,
        repeat: 1,
        json: None,
        bmf: None,
    };
    let mut revs = Vec::new();
    let mut it = args.into_iter();
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--rounds" => o.rounds = num("--rounds", it.next())?,
            "--threshold" => o.gate.threshold = num::<f64>("--threshold", it.next())? / 100.0,
            "--alpha" => o.gate.alpha = num("--alpha", it.next())?,
            "--secs" => o.secs = num("--secs", it.next())?,
            "--bench-rounds" => o.bench_rounds = num("--bench-rounds", it.next())?,
            "--repeat" => o.repeat = num("--repeat", it.next())?,
            "--json" => o.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--bmf" => o.bmf = Some(it.next().ok_or("--bmf needs a file")?.into()),
            "--" => {
                if let Some(b) = it.next() {
                    o.benches = b
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(Into::into)
                        .collect();
                }
                o.filters = it.by_ref().collect();
            }
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            rev => revs.push(rev.to_owned()),
        }
    }
    if revs.len() > 2 {
        return Err("at most two revisions: BASE and HEAD".into());
    }
    let mut revs = revs.into_iter();
    o.base = revs.next();
    o.head = revs.next();
    if o.rounds < 2 || o.bench_rounds == 0 || o.repeat == 0 || o.secs <= 0.0 || o.benches.is_empty()
    {
        return Err(
            "--rounds needs at least 2, --bench-rounds, --repeat and --secs more than 0".into(),
        );
    }
    if !(0.0..1.0).contains(&o.gate.threshold) || !(0.0..1.0).contains(&o.gate.alpha) {
        return Err("--threshold is a percentage below 100, --alpha below 1".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args().skip(1).collect()) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("ab: {e}");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::from(1),
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ab: {e}");
            ExitCode::from(2)
        }
    }
}

/// One side of the comparison: where its source is, what it is, its bench executables.
struct Side {
    name: &'static str,
    label: String,
    src: PathBuf,
    worktree: bool,
    exes: Vec<(String, PathBuf)>,
    samples: Samples,
}

fn run(o: &Options) -> Result<bool, String> {
    let started = Instant::now();
    let root = benches::workspace_root();
    let work = benches::target_dir().join("ab");
    let base_rev = match &o.base {
        Some(r) => rev_parse(&root, r)?,
        None => git(&root, &["merge-base", "HEAD", "main"])
            .map_err(|e| format!("no BASE given and no merge-base with main: {e}"))?,
    };
    let mut base = Side {
        name: "base",
        label: short(&base_rev),
        src: work.join("src-base"),
        worktree: true,
        exes: Vec::new(),
        samples: Samples::new(),
    };
    let mut head = match &o.head {
        Some(r) => {
            let rev = rev_parse(&root, r)?;
            Side {
                name: "head",
                label: short(&rev),
                src: work.join("src-head"),
                worktree: true,
                exes: Vec::new(),
                samples: Samples::new(),
            }
        }
        None => Side {
            name: "head",
            label: "working tree".into(),
            src: root.clone(),
            worktree: false,
            exes: Vec::new(),
            samples: Samples::new(),
        },
    };
    add_worktree(&root, &base.src, &base_rev)?;
    if let Some(r) = &o.head {
        add_worktree(&root, &head.src, &rev_parse(&root, r)?)?;
    }
    let result = build_and_compare(o, &work, &mut base, &mut head);
    for side in [&base, &head] {
        if side.worktree {
            let _ = git(
                &root,
                &["worktree", "remove", "--force", &side.src.to_string_lossy()],
            );
        }
    }
    let flagged = result?;
    if o.repeat > 1 {
        println!(
            "\nregression flagged in {flagged} of {} comparisons ({} rounds each, {:.0} s in all)",
            o.repeat,
            o.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(flagged > 0)
}

/// Builds both sides, then makes `o.repeat` comparisons; returns how many flagged a
/// regression.
fn build_and_compare(
    o: &Options,
    work: &Path,
    base: &mut Side,
    head: &mut Side,
) -> Result<usize, String> {
    base.exes = build(&base.src, &work.join("target-base"), &o.benches)?;
    // The working tree gets a folder of its own: cargo judges freshness by modification
    // times, and a worktree's fresh checkout would make the older files here look built.
    let head_target = work.join(if head.worktree {
        "target-head"
    } else {
        "target-work"
    });
    head.exes = build(&head.src, &head_target, &o.benches)?;
    let mut flagged = 0;
    for rep in 0..o.repeat {
        let started = Instant::now();
        base.samples.clear();
        head.samples.clear();
        measure(o, work, base, head)?;
        let rows = compare::compare(&base.samples, &head.samples, true, o.gate);
        println!(
            "\nA/B{}: head {} / base {}, {} alternating rounds, {:.1} s per case per run, threshold {:.1}%, alpha {}",
            if o.repeat > 1 { format!(" {}/{}", rep + 1, o.repeat) } else { String::new() },
            head.label,
            base.label,
            o.rounds,
            o.secs,
            o.gate.threshold * 100.0,
            o.gate.alpha
        );
        print!("{}", compare::table(&rows));
        if rows.is_empty() {
            return Err("no case ran on both sides (check the bench names and filters)".into());
        }
        let regressed = compare::regressed(&rows);
        println!(
            "{} ({} cases, {:.0} s)",
            if regressed {
                "REGRESSION: a case lost beyond the threshold while its limit held"
            } else {
                "no regression"
            },
            rows.len(),
            started.elapsed().as_secs_f64()
        );
        flagged += usize::from(regressed);
        if let Some(p) = &o.json {
            std::fs::write(p, compare::json(&rows, o.gate))
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        if let Some(p) = &o.bmf {
            std::fs::write(p, compare::bmf(&head.samples))
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
    }
    Ok(flagged)
}

/// The alternating rounds: base then head, head then base, ...
fn measure(o: &Options, work: &Path, base: &mut Side, head: &mut Side) -> Result<(), String> {
    let runs = work.join("runs");
    let _ = std::fs::remove_dir_all(&runs);
    for round in 0..o.rounds {
        let order: [&mut Side; 2] = if round % 2 == 0 {
            [&mut *base, &mut *head]
        } else {
            [&mut *head, &mut *base]
        };
        for side in order {
            let dir = runs.join(format!("{}-{round}", side.name));
            let records = run_benches(o, side, &dir)?;
            compare::add_run(&mut side.samples, &records);
        }
        eprintln!("ab: round {}/{} done", round + 1, o.rounds);
    }
    Ok(())
}

/// `cargo bench --no-run` of the chosen benches in `src`, into `target`; their executables.
fn build(src: &Path, target: &Path, benches: &[String]) -> Result<Vec<(String, PathBuf)>, String> {
    eprintln!("ab: building {} in {}", benches.join(","), src.display());
    let mut cmd = Command::new("cargo");
    cmd.current_dir(src)
        .env("CARGO_TARGET_DIR", target)
        // One codegen unit on both sides (see the module's documentation).
        .env("CARGO_PROFILE_BENCH_CODEGEN_UNITS", "1")
        .args([
            "bench",
            "-p",
            "benches",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit());
    for b in benches {
        cmd.args(["--bench", b]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the benches in {} failed", src.display()));
    }
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_bench = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"));
        if let (true, Some(name), Some(exe)) = (
            v["reason"] == "compiler-artifact" && is_bench,
            v["target"]["name"].as_str(),
            v["executable"].as_str(),
        ) {
            exes.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    benches
        .iter()
        .map(|b| {
            exes.remove(b)
                .map(|e| (b.clone(), e))
                .ok_or_else(|| format!("{} has no bench named {b}", src.display()))
        })
        .collect()
}

/// One run of every bench of `side`; its JSON lines go under `dir`.
fn run_benches(o: &Options, side: &Side, dir: &Path) -> Result<Vec<compare::Record>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, exe) in &side.exes {
        let log = dir.join(format!("{name}.log"));
        // A run that crashed measured nothing: it runs again once (its lines of the failed
        // attempt are not kept), and a second failure ends the comparison.
        // Each bench writes its JSON lines under its own folder, so a failed attempt's lines
        // go with it and never mix with another bench's.
        let out = dir.join(name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let _ = std::fs::remove_dir_all(&out);
            let log_file = std::fs::File::create(&log)
                .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
            let err_file = log_file
                .try_clone()
                .map_err(|e| format!("cannot duplicate {}: {e}", log.display()))?;
            let status = Command::new(exe)
                .current_dir(&side.src)
                .arg("--bench")
                .args(&o.filters)
                .env("CARGO_TARGET_DIR", &out)
                .env("RINGVM_BENCH_SECS", o.secs.to_string())
                .env("RINGVM_BENCH_ROUNDS", o.bench_rounds.to_string())
                .env("RINGVM_GIT_REV", &side.label)
                .stdout(log_file)
                .stderr(err_file)
                .status()
                .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
            if status.success() {
                break;
            }
            if attempt == 2 {
                return Err(format!(
                    "{} bench {name} failed twice ({status}); see {}",
                    side.name,
                    log.display()
                ));
            }
            eprintln!(
                "ab: {} bench {name} failed ({status}), running it again; its output: {}",
                side.name,
                log.display()
            );
            let kept = dir.join(format!("{name}.failed.log"));
            let _ = std::fs::rename(&log, kept);
        }
    }
    let mut records = Vec::new();
    for (name, _) in &side.exes {
        let jsonl = dir.join(name).join("bench");
        if !jsonl.exists() {
            // The filters matched none of this bench's cases: it wrote nothing.
            continue;
        }
        for entry in std::fs::read_dir(&jsonl).map_err(|e| format!("{}: {e}", jsonl.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                records.extend(
                    compare::read_jsonl(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                );
            }
        }
    }
    Ok(records)
}

fn add_worktree(root: &Path, at: &Path, rev: &str) -> Result<(), String> {
    let at_s = at.to_string_lossy();
    let _ = git(root, &["worktree", "remove", "--force", &at_s]);
    let _ = std::fs::remove_dir_all(at);
    let _ = git(root, &["worktree", "prune"]);
    git(
        root,
        &["worktree", "add", "--detach", "--force", &at_s, rev],
    )
    .map(|_| ())
}

fn rev_parse(root: &Path, rev: &str) -> Result<String, String> {
    git(
        root,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .map_err(|e| format!("{rev} is not a revision: {e}"))
}

fn short(rev: &str) -> String {
    rev.chars().take(12).collect()
}

fn git(root: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_take_revisions_benches_and_filters() {
        let o = parse(args(&[
            "--rounds",
            "6",
            "--threshold",
            "3",
            "main",
            "HEAD",
            "--",
            "executor,block",
            "qd32",
        ]))
        .expect("valid");
        assert_eq!(
            (o.base.as_deref(), o.head.as_deref()),
            (Some("main"), Some("HEAD"))
        );
        assert_eq!(o.benches, ["executor", "block"]);
        assert_eq!(o.filters, ["qd32"]);
        assert_eq!(o.rounds, 6);
        assert!((o.gate.threshold - 0.03).abs() < 1e-12);
        let d = parse(Vec::new()).expect("defaults");
        assert_eq!((d.base, d.head, d.rounds), (None, None, 10));
        assert_eq!(d.benches, ["executor", "virtqueue"]);
        for bad in [
            &["a", "b", "c"][..],
            &["--rounds", "1"],
            &["--rounds", "x"],
            &["--threshold", "150"],
            &["--frobnicate"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
    }
}
