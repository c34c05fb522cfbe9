//! A small harness for ringvm's `cargo bench` targets.
//!
//! A bench compares *variants* of the same work: the ringvm code under test (the subject),
//! the fastest thing that could be written by hand (the limit) and what users would pick
//! otherwise (the peer). Absolute numbers on a shared machine are noise, so the harness
//! measures the variants of one bench side by side, in interleaved rounds, and reports
//! ratios:
//!
//! 1. every variant warms up (and calibrates how many operations fill a round);
//! 2. the variants run in short rounds, interleaved and in rotating order, so drift in the
//!    machine's load hits all of them alike;
//! 3. each variant's rate is the median of its rounds; a ratio is the median, over the
//!    rounds, of the ratio between the two variants' runs in that round (runs next to each
//!    other in time share the machine's load, so a burst of load from elsewhere skews one
//!    round's pair, not the median).
//!
//! [`Runner::finish`] prints a table per group and appends one JSON line per case to
//! `<target>/bench/<group>.jsonl`, for tooling that compares runs.
//!
//! Command line (after `cargo bench --bench NAME --`): `--quick` for a run of seconds (CI),
//! `--save-baseline NAME` to keep this run's cases (each round's rate) under
//! `<target>/bench/baselines/NAME/`, `--baseline NAME` to compare this run against them
//! (criterion's words; [`compare`] and [`stats`] do the comparison: head/base with a 95%
//! interval, a permutation p-value, and the limit's move), any other word filters the benches
//! by substring. The environment may set `RINGVM_BENCH_SECS` (measured seconds per case) and
//! `RINGVM_BENCH_ROUNDS`. `scripts/ab` compares two builds with the same statistics.

pub mod compare;
pub mod netns;
pub mod process;
pub mod stats;
pub mod vnet;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Measured seconds per case in a full run.
const DEFAULT_SECS: f64 = 2.5;
/// Measured rounds per case in a full run.
const DEFAULT_ROUNDS: usize = 15;
/// Measured seconds per case with `--quick`.
const QUICK_SECS: f64 = 0.06;
/// Measured rounds per case with `--quick`.
const QUICK_ROUNDS: usize = 3;

/// What a variant is, for the ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The ringvm code being measured.
    Subject,
    /// The limit: the same work driven by hand with nothing in between.
    Limit,
    /// The peer: what a user would pick instead of ringvm.
    Peer,
    /// Another hand-written way, shown for context (how far a mechanism itself goes).
    Reference,
}

impl Role {
    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Subject => "subject",
            Role::Limit => "limit",
            Role::Peer => "peer",
            Role::Reference => "ref",
        }
    }
}

/// Runs `iters` operations and returns the time they took (set-up excluded).
pub type RunFn<'a> = Box<dyn FnMut(u64) -> Duration + 'a>;

/// One way of doing a bench's work.
pub struct Variant<'a> {
    key: String,
    label: String,
    role: Role,
    run: RunFn<'a>,
}

impl fmt::Debug for Variant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Variant")
            .field("key", &self.key)
            .field("label", &self.label)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl<'a> Variant<'a> {
    /// A variant. `key` names it in JSON (short, stable), `label` in the table. `run(n)`
    /// performs `n` operations and returns the time they took, excluding its own set-up.
    pub fn new(
        role: Role,
        key: &str,
        label: &str,
        run: impl FnMut(u64) -> Duration + 'a,
    ) -> Variant<'a> {
        Variant {
            key: key.to_owned(),
            label: label.to_owned(),
            role,
            run: Box::new(run),
        }
    }

    /// The ringvm code under test.
    pub fn subject(key: &str, label: &str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Variant::new(Role::Subject, key, label, run)
    }

    /// The hand-written limit.
    pub fn limit(key: &str, label: &str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Variant::new(Role::Limit, key, label, run)
    }

    /// The peer users would pick.
    pub fn peer(key: &str, label: &str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Variant::new(Role::Peer, key, label, run)
    }

    /// A hand-written reference shown for context.
    pub fn reference(key: &str, label: &str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Variant::new(Role::Reference, key, label, run)
    }
}

/// The measured result of one variant of one bench.
#[derive(Debug, Clone)]
pub struct Case {
    /// The group (one table, one JSON file): `executor`, `block`, ...
    pub group: String,
    /// The bench inside the group, e.g. `nop/qd32`.
    pub bench: String,
    /// The variant's key, e.g. `ringvm`.
    pub name: String,
    /// The variant's description for the table.
    pub label: String,
    /// Subject, limit or peer.
    pub role: Role,
    /// Operations per second: the median of the rounds.
    pub ops_per_sec: f64,
    /// Mean time per operation in the median round, in nanoseconds.
    pub mean_ns: f64,
    /// Slowest round, operations per second.
    pub min_ops_per_sec: f64,
    /// Fastest round, operations per second.
    pub max_ops_per_sec: f64,
    /// Measured rounds.
    pub rounds: usize,
    /// Operations measured over all rounds.
    pub ops: u64,
    /// Operations per second of each round, in the order they ran.
    pub round_ops_per_sec: Vec<f64>,
    /// Further figures a bench measured beside the rate (name, value), added to the JSON line
    /// by [`Runner::annotate`]: latency percentiles, CPU time per operation, ...
    pub extra: Vec<(String, f64)>,
}

impl Case {
    /// The figure `key` added by [`Runner::annotate`].
    pub fn figure(&self, key: &str) -> Option<f64> {
        self.extra.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Half the range of the rounds relative to the median: a rough noise figure.
    pub fn spread(&self) -> f64 {
        (self.max_ops_per_sec - self.min_ops_per_sec) / 2.0 / self.ops_per_sec
    }
}

/// How long and what to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Measured time per case, over all its rounds.
    pub measure: Duration,
    /// Warm-up (and calibration) time per case.
    pub warmup: Duration,
    /// Measured rounds per case.
    pub rounds: usize,
    /// A quick run (CI): numbers are rough.
    pub quick: bool,
    /// Only benches whose name contains one of these run (all when empty).
    pub filters: Vec<String>,
    /// `--save-baseline NAME`: keep this run's cases under that name.
    pub save_baseline: Option<String>,
    /// `--baseline NAME`: compare this run against the cases kept under that name.
    pub baseline: Option<String>,
}

impl Config {
    /// Reads the command line and `RINGVM_BENCH_SECS` / `RINGVM_BENCH_ROUNDS`.
    ///
    /// `cargo bench` passes `--bench`; without it (`cargo test --benches`, a direct run) the
    /// run is quick, as a smoke test.
    pub fn from_env() -> Config {
        let mut quick = false;
        let mut saw_bench = false;
        let mut filters = Vec::new();
        let (mut save_baseline, mut baseline) = (None, None);
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--bench" => saw_bench = true,
                "--save-baseline" => save_baseline = args.next().filter(|n| baseline_name_ok(n)),
                "--baseline" => baseline = args.next().filter(|n| baseline_name_ok(n)),
                a if a.starts_with('-') => {}
                a => filters.push(a.to_owned()),
            }
        }
        let quick = quick || !saw_bench;
        let (mut secs, mut rounds) = if quick {
            (QUICK_SECS, QUICK_ROUNDS)
        } else {
            (DEFAULT_SECS, DEFAULT_ROUNDS)
        };
        if let Some(s) = env_parse::<f64>("RINGVM_BENCH_SECS").filter(|s| *s > 0.0) {
            secs = s;
        }
        if let Some(r) = env_parse::<usize>("RINGVM_BENCH_ROUNDS").filter(|r| *r > 0) {
            rounds = r;
        }
        Config {
            measure: Duration::from_secs_f64(secs),
            warmup: Duration::from_secs_f64(secs / 8.0),
            rounds,
            quick,
            filters,
            save_baseline,
            baseline,
        }
    }
}

/// A baseline name is one plain path component; another is refused with a message.
fn baseline_name_ok(name: &str) -> bool {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        eprintln!("ignoring baseline name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    ok
}

impl Config {
    /// [`Config::from_env`] with a bench's own measured seconds and rounds per case, `full`
    /// or `quick` as (seconds, rounds), and a round's time of warm-up;
    /// `RINGVM_BENCH_SECS` and `RINGVM_BENCH_ROUNDS` still win.
    pub fn from_env_with(full: (f64, usize), quick: (f64, usize)) -> Config {
        let mut config = Config::from_env();
        let (secs, rounds) = if config.quick { quick } else { full };
        if std::env::var_os("RINGVM_BENCH_SECS").is_none() {
            config.measure = Duration::from_secs_f64(secs);
            config.warmup = Duration::from_secs_f64(secs / rounds as f64);
        }
        if std::env::var_os("RINGVM_BENCH_ROUNDS").is_none() {
            config.rounds = rounds;
        }
        config
    }
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            eprintln!("ignoring {name}={v:?}: not a number");
            None
        }
    }
}

/// Runs the benches of one group and reports them.
#[derive(Debug)]
pub struct Runner {
    group: String,
    config: Config,
    cases: Vec<Case>,
    started: SystemTime,
}

impl Runner {
    /// A runner for `group`, configured from the command line and environment.
    pub fn new(group: &str) -> Runner {
        Runner::with_config(group, Config::from_env())
    }

    /// A runner with an explicit configuration.
    pub fn with_config(group: &str, config: Config) -> Runner {
        let mode = if config.quick { " (quick)" } else { "" };
        eprintln!(
            "{group}: {} rounds, {:.2} s measured per case{mode}",
            config.rounds,
            config.measure.as_secs_f64()
        );
        Runner {
            group: group.to_owned(),
            config,
            cases: Vec::new(),
            started: SystemTime::now(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `bench` passes the filters; check before an expensive set-up. A filter
    /// selects the benches whose name contains it, or one variant as `bench/variant`.
    pub fn enabled(&self, bench: &str) -> bool {
        self.config.filters.is_empty()
            || self
                .config
                .filters
                .iter()
                .any(|f| bench.contains(f.as_str()) || f.starts_with(&format!("{bench}/")))
    }

    /// Whether variant `key` of `bench` passes the filters (a filter ending in `$` must match
    /// the end of `bench/key`).
    fn variant_enabled(&self, bench: &str, key: &str) -> bool {
        let full = format!("{bench}/{key}");
        self.config.filters.is_empty()
            || self
                .config
                .filters
                .iter()
                .any(|f| match f.strip_suffix('$') {
                    Some(f) => full.ends_with(f),
                    None => bench.contains(f.as_str()) || full.contains(f.as_str()),
                })
    }

    /// The results so far.
    pub fn cases(&self) -> &[Case] {
        &self.cases
    }

    /// Runs the variants of `bench` side by side (see the crate documentation).
    pub fn compare(&mut self, bench: &str, mut variants: Vec<Variant<'_>>) {
        variants.retain(|v| self.variant_enabled(bench, &v.key));
        if variants.is_empty() {
            return;
        }
        let rounds = self.config.rounds;
        let round_time = self.config.measure.as_secs_f64() / rounds as f64;
        let mut per_round_iters = Vec::with_capacity(variants.len());
        for v in &mut variants {
            eprint!("{}/{bench}/{}: warming up", self.group, v.key);
            let ns = calibrate(&mut v.run, self.config.warmup);
            let iters = (round_time * 1e9 / ns).ceil().max(1.0) as u64;
            eprintln!(", {ns:.0} ns/op, {iters} ops per round");
            per_round_iters.push(iters);
        }
        let mut rates: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); variants.len()];
        for round in 0..rounds {
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let iters = per_round_iters[i];
                let d = (variants[i].run)(iters).as_secs_f64().max(1e-9);
                rates[i].push(iters as f64 / d);
            }
        }
        for ((v, in_order), iters) in variants.into_iter().zip(rates).zip(per_round_iters) {
            let mut r = in_order.clone();
            r.sort_by(f64::total_cmp);
            let median = median(&r);
            self.cases.push(Case {
                group: self.group.clone(),
                bench: bench.to_owned(),
                name: v.key,
                label: v.label,
                role: v.role,
                ops_per_sec: median,
                mean_ns: 1e9 / median,
                min_ops_per_sec: r[0],
                max_ops_per_sec: r[r.len() - 1],
                rounds,
                ops: iters * rounds as u64,
                round_ops_per_sec: in_order,
                extra: Vec::new(),
            });
        }
    }

    /// The case `name` of `bench`.
    pub fn case(&self, bench: &str, name: &str) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.bench == bench && c.name == name)
    }

    /// Adds a figure `key` = `value` to the JSON line of case `name` of `bench` (a name
    /// already there is replaced). Does nothing when that case did not run.
    pub fn annotate(&mut self, bench: &str, name: &str, key: &str, value: f64) {
        if let Some(case) = self
            .cases
            .iter_mut()
            .find(|c| c.bench == bench && c.name == name)
        {
            case.extra.retain(|(k, _)| k != key);
            case.extra.push((key.to_owned(), value));
        }
    }

    /// The baseline of `bench` with `role` (its first variant with that role).
    fn baseline(&self, bench: &str, role: Role) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.bench == bench && c.role == role)
    }

    /// `case`'s rate over the rate of the baseline with `role` in the same bench: the median
    /// of the per-round ratios.
    pub fn ratio(&self, case: &Case, role: Role) -> Option<f64> {
        self.baseline(&case.bench, role)
            .map(|b| paired_ratio(case, b))
    }

    /// Prints whether case `name` of `bench` reaches `min` times the baseline with `role`,
    /// as a PASS or MISS line. Returns `None` (and prints nothing) when either did not run.
    pub fn check(&self, bench: &str, name: &str, role: Role, min: f64) -> Option<bool> {
        let case = self.case(bench, name)?;
        let base = self.baseline(bench, role)?;
        let ratio = paired_ratio(case, base);
        let pass = ratio >= min;
        // Against the peer, say where the limit stands: a target above it is out of reach.
        let context = match (role, self.baseline(bench, Role::Limit)) {
            (Role::Peer, Some(limit)) => format!(
                " (the limit, {}, is at {:.2}x)",
                limit.name,
                paired_ratio(limit, base)
            ),
            _ => String::new(),
        };
        println!(
            "{} {bench}: {name} at {ratio:.2}x {} ({}), target >= {min:.2}x{context}",
            if pass { "PASS" } else { "MISS" },
            base.name,
            role.as_str(),
        );
        Some(pass)
    }

    /// Prints whether case `name` of `bench` reaches `min` times case `other` of the same
    /// bench (one of several peers, say), as a PASS or MISS line. Returns `None` (and prints
    /// nothing) when either did not run.
    pub fn check_against(&self, bench: &str, name: &str, other: &str, min: f64) -> Option<bool> {
        let case = self.case(bench, name)?;
        let base = self.case(bench, other)?;
        let ratio = paired_ratio(case, base);
        let pass = ratio >= min;
        println!(
            "{} {bench}: {name} at {ratio:.2}x {other} ({}), target >= {min:.2}x",
            if pass { "PASS" } else { "MISS" },
            base.role.as_str(),
        );
        Some(pass)
    }

    /// Prints the table and appends the JSON lines. Returns the JSON file written.
    pub fn finish(&self) -> io::Result<Option<PathBuf>> {
        if self.cases.is_empty() {
            println!("{}: no bench matched the filters", self.group);
            return Ok(None);
        }
        let rev = git_rev();
        print!("{}", self.table(rev.as_deref()));
        let dir = bench_dir()?;
        let path = dir.join(format!("{}.jsonl", self.group));
        let mut out = String::new();
        for case in &self.cases {
            out.push_str(&self.json_line(case, rev.as_deref()));
            out.push('\n');
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?
            .write_all(out.as_bytes())?;
        println!(
            "wrote {} JSON lines to {}",
            self.cases.len(),
            path.display()
        );
        if let Some(name) = &self.config.baseline {
            self.compare_with_baseline(name, &dir);
        }
        if let Some(name) = &self.config.save_baseline {
            let saved = self.save_baseline(name, &dir, &out)?;
            println!("saved baseline {name} to {}", saved.display());
        }
        Ok(Some(path))
    }

    /// Keeps this run's lines as baseline `name` of this group; cases of the group that this
    /// run did not measure (filtered out) keep their earlier lines.
    fn save_baseline(&self, name: &str, dir: &Path, lines: &str) -> io::Result<PathBuf> {
        let bdir = dir.join("baselines").join(name);
        fs::create_dir_all(&bdir)?;
        let path = bdir.join(format!("{}.jsonl", self.group));
        let mut kept = String::new();
        if let Ok(old) = fs::read_to_string(&path) {
            for line in old.lines() {
                let ran = compare::Record::parse(line)
                    .is_some_and(|r| self.case(&r.bench, &r.variant).is_some());
                if !ran {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        kept.push_str(lines);
        fs::write(&path, kept)?;
        Ok(path)
    }

    /// Prints this run against baseline `name`: each case's rounds against the baseline's.
    fn compare_with_baseline(&self, name: &str, dir: &Path) {
        let path = dir
            .join("baselines")
            .join(name)
            .join(format!("{}.jsonl", self.group));
        let base = match compare::read_jsonl(&path) {
            Ok(b) => compare::rounds_of(&b),
            Err(e) => {
                println!(
                    "no baseline {name} for {} ({}: {e})",
                    self.group,
                    path.display()
                );
                return;
            }
        };
        let head: compare::Samples = self
            .cases
            .iter()
            .map(|c| {
                let series = compare::Series {
                    role: c.role.as_str().to_owned(),
                    rates: c.round_ops_per_sec.clone(),
                    vs_limit: Vec::new(),
                };
                ((c.group.clone(), c.bench.clone(), c.name.clone()), series)
            })
            .collect();
        let rows = compare::compare(&base, &head, false, stats::Gate::default());
        println!(
            "\n{} against baseline {name} (this run / baseline):",
            self.group
        );
        print!("{}", compare::table(&rows));
    }

    /// The human table: one section per bench, ratios against its limit and peer.
    pub fn table(&self, rev: Option<&str>) -> String {
        let mut s = String::new();
        let when = unix_secs(self.started);
        s.push_str(&format!(
            "\n{} — {} — rev {} — median of {} rounds, {:.2} s per case{}\n",
            self.group,
            iso8601(when),
            rev.unwrap_or("unknown"),
            self.config.rounds,
            self.config.measure.as_secs_f64(),
            if self.config.quick {
                " (quick: rough)"
            } else {
                ""
            },
        ));
        let label_w = self
            .cases
            .iter()
            .map(|c| c.label.chars().count() + c.role.as_str().len() + 3)
            .max()
            .unwrap_or(0)
            .max(8);
        let bench_w = self
            .cases
            .iter()
            .map(|c| c.bench.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let header = format!(
            "{:bench_w$}  {:label_w$}  {:>10}  {:>9}  {:>7}  {:>7}  {:>7}\n",
            "bench", "case", "ops/s", "ns/op", "spread", "xlimit", "xpeer"
        );
        s.push_str(&header);
        s.push_str(&"-".repeat(header.chars().count() - 1));
        s.push('\n');
        let mut last_bench = "";
        for c in &self.cases {
            let bench = if c.bench == last_bench { "" } else { &c.bench };
            last_bench = &c.bench;
            let label = format!("{} ({})", c.label, c.role.as_str());
            s.push_str(&format!(
                "{bench:bench_w$}  {label:label_w$}  {:>10}  {:>9.1}  {:>6.1}%  {:>7}  {:>7}\n",
                si(c.ops_per_sec),
                c.mean_ns,
                c.spread() * 100.0,
                fmt_ratio(self.ratio(c, Role::Limit)),
                fmt_ratio(self.ratio(c, Role::Peer)),
            ));
        }
        s
    }

    /// [`Runner::finish`] (a failure to write the JSON lines is printed), then a blank line
    /// and, in a quick run, a word that the PASS/MISS checks that follow are rough.
    pub fn finish_before_checks(&self) {
        if let Err(e) = self.finish() {
            eprintln!("cannot write the bench results: {e}");
        }
        println!();
        if self.config.quick {
            println!("quick run: the checks below are rough, not a claim");
        }
    }

    /// One case as a JSON object on one line.
    pub fn json_line(&self, c: &Case, rev: Option<&str>) -> String {
        let when = unix_secs(self.started);
        let extra: String = c
            .extra
            .iter()
            .map(|(k, v)| {
                let v = if v.is_finite() {
                    format!("{v:.4}")
                } else {
                    "null".to_owned()
                };
                format!(",{}:{v}", json_str(k))
            })
            .collect();
        let rounds: Vec<String> = c
            .round_ops_per_sec
            .iter()
            .map(|r| format!("{r:.1}"))
            .collect();
        format!(
            concat!(
                "{{\"group\":{},\"bench\":{},\"case\":{},\"variant\":{},\"label\":{},",
                "\"role\":{},\"ops_per_s\":{:.1},\"ns_per_op\":{:.2},\"min_ops_per_s\":{:.1},",
                "\"max_ops_per_s\":{:.1},\"rounds\":{},\"ops\":{},\"ratio_vs_limit\":{},",
                "\"ratio_vs_peer\":{},\"quick\":{},\"timestamp\":{},\"time\":{},\"git_rev\":{},",
                "\"kernel\":{},\"cpus\":{},\"round_ops_per_s\":[{}]{}}}"
            ),
            json_str(&c.group),
            json_str(&c.bench),
            json_str(&format!("{}/{}", c.bench, c.name)),
            json_str(&c.name),
            json_str(&c.label),
            json_str(c.role.as_str()),
            c.ops_per_sec,
            c.mean_ns,
            c.min_ops_per_sec,
            c.max_ops_per_sec,
            c.rounds,
            c.ops,
            json_ratio(self.ratio(c, Role::Limit)),
            json_ratio(self.ratio(c, Role::Peer)),
            self.config.quick,
            when,
            json_str(&iso8601(when)),
            rev.map_or_else(|| "null".to_owned(), json_str),
            kernel_release().map_or_else(|| "null".to_owned(), |k| json_str(&k)),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            rounds.join(","),
            extra,
        )
    }
}

/// Runs `run` with growing counts for about `warmup`; returns nanoseconds per operation
/// from the last (largest) call.
fn calibrate(run: &mut RunFn<'_>, warmup: Duration) -> f64 {
    let start = Instant::now();
    let mut iters: u64 = 1;
    loop {
        let d = run(iters).max(Duration::from_nanos(1));
        let ns = d.as_nanos() as f64 / iters as f64;
        if start.elapsed() >= warmup && d >= warmup / 16 {
            return ns;
        }
        // Grow towards calls of about a quarter of the warm-up, at most 8x at a time.
        let want = (warmup.as_nanos() as f64 / 4.0 / ns).max(1.0) as u64;
        iters = want.clamp(iters, iters.saturating_mul(8));
    }
}

/// The median over rounds of `a`'s rate over `b`'s in the same round; the ratio of the
/// medians when the round counts differ.
pub fn paired_ratio(a: &Case, b: &Case) -> f64 {
    if a.round_ops_per_sec.len() != b.round_ops_per_sec.len() || a.round_ops_per_sec.is_empty() {
        return a.ops_per_sec / b.ops_per_sec;
    }
    let mut r: Vec<f64> = a
        .round_ops_per_sec
        .iter()
        .zip(&b.round_ops_per_sec)
        .map(|(a, b)| a / b)
        .collect();
    r.sort_by(f64::total_cmp);
    median(&r)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A rate with an SI suffix: `1.23 M`.
fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.1}  ")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
}

fn json_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "null".to_owned(), |r| format!("{r:.4}"))
}

/// CPU time `d` spread over `n` operations, in microseconds each.
pub fn us_per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The workspace root (this crate's parent folder).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target folder: `CARGO_TARGET_DIR`, else the one this binary was built in
/// (`<target>/<profile>/deps/<bench>`), else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        let deps = exe.parent();
        if let Some(target) = deps
            .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            return target.to_path_buf();
        }
    }
    workspace_root().join("target")
}

/// `<target>/bench/`, created if missing: the JSON lines and bench data files live here.
pub fn bench_dir() -> io::Result<PathBuf> {
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace's git revision (`RINGVM_GIT_REV` overrides), `-dirty` when tracked files
/// changed; `None` outside a repository or before the first commit.
pub fn git_rev() -> Option<String> {
    if let Ok(rev) = std::env::var("RINGVM_GIT_REV") {
        return Some(rev);
    }
    let root = workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_str_escapes_quotes_and_controls() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn median_of_even_count_averages_the_middle() {
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert_eq!(median(&[1.0, 2.0, 3.0]), 2.0);
    }

    #[test]
    fn compare_computes_ratios_against_limit_and_peer() {
        let config = Config {
            measure: Duration::from_millis(3),
            warmup: Duration::from_millis(1),
            rounds: 3,
            quick: true,
            filters: Vec::new(),
            save_baseline: None,
            baseline: None,
        };
        let mut r = Runner::with_config("test", config);
        // Fake clocks: each variant reports a fixed time per operation.
        let fixed = |ns: u64| move |n: u64| Duration::from_nanos(ns * n);
        r.compare(
            "b",
            vec![
                Variant::subject("s", "subject", fixed(100)),
                Variant::limit("l", "limit", fixed(80)),
                Variant::peer("p", "peer", fixed(400)),
            ],
        );
        let s = r.case("b", "s").expect("subject ran");
        assert!((r.ratio(s, Role::Limit).expect("limit ran") - 0.8).abs() < 1e-9);
        assert!((r.ratio(s, Role::Peer).expect("peer ran") - 4.0).abs() < 1e-9);
        let line = r.json_line(s, Some("abc"));
        assert!(line.contains("\"case\":\"b/s\""), "{line}");
        assert!(line.contains("\"ratio_vs_limit\":0.8000"), "{line}");
        assert!(line.contains("\"git_rev\":\"abc\""), "{line}");
    }

    #[test]
    fn annotate_adds_figures_to_the_json_line() {
        let config = Config {
            measure: Duration::from_millis(2),
            warmup: Duration::from_millis(1),
            rounds: 2,
            quick: true,
            filters: Vec::new(),
            save_baseline: None,
            baseline: None,
        };
        let mut r = Runner::with_config("test", config);
        r.compare(
            "b",
            vec![Variant::subject("s", "subject", |n| {
                Duration::from_nanos(100 * n)
            })],
        );
        r.annotate("b", "s", "lat_p99_us", 12.5);
        r.annotate("b", "s", "lat_p99_us", 13.0);
        r.annotate("b", "s", "cpu", f64::NAN);
        r.annotate("b", "missing", "cpu", 1.0);
        let line = r.json_line(r.case("b", "s").expect("ran"), None);
        assert!(
            line.ends_with(",\"lat_p99_us\":13.0000,\"cpu\":null}"),
            "{line}"
        );
    }

    #[test]
    fn filters_select_benches_by_substring() {
        let config = Config {
            measure: Duration::from_millis(1),
            warmup: Duration::from_millis(1),
            rounds: 1,
            quick: true,
            filters: vec!["qd32".to_owned()],
            save_baseline: None,
            baseline: None,
        };
        let r = Runner::with_config("test", config);
        assert!(r.enabled("nop/qd32"));
        assert!(!r.enabled("nop/qd1"));
        assert!(r.variant_enabled("nop/qd32", "tokio"));
    }

    #[test]
    fn a_filter_can_name_one_variant() {
        let config = Config {
            measure: Duration::from_millis(1),
            warmup: Duration::from_millis(1),
            rounds: 1,
            quick: true,
            filters: vec!["nop/qd32/ringvm$".to_owned()],
            save_baseline: None,
            baseline: None,
        };
        let r = Runner::with_config("test", config);
        assert!(r.enabled("nop/qd32"));
        assert!(!r.enabled("nop/qd1"));
        assert!(r.variant_enabled("nop/qd32", "ringvm"));
        assert!(!r.variant_enabled("nop/qd32", "raw-uring"));
        assert!(!r.variant_enabled("nop/qd32", "ringvm-fu"));
    }
}
