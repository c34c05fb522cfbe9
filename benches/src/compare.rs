//! Two sets of bench results side by side: read back from the JSON lines the harness writes,
//! compared case by case with [`crate::stats`], and reported as a table, as JSON and in the
//! Bencher Metric Format. Used by `--baseline NAME` and by `scripts/ab`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::json_str;
use crate::stats::{self, Comparison, Gate, Verdict};

/// One case of one run, as its JSON line gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub group: String,
    pub bench: String,
    pub variant: String,
    /// `subject`, `limit`, `peer` or `ref`.
    pub role: String,
    /// The run's rate: the median of its rounds.
    pub ops_per_s: f64,
    /// Each round's rate (empty from a harness that did not write them).
    pub rounds: Vec<f64>,
    /// The run's rate over its bench's limit in the same run (the median of the per-round
    /// ratios), when the bench has a limit.
    pub vs_limit: Option<f64>,
}

impl Record {
    /// Reads one JSON line; `None` for a line that is not a bench case.
    pub fn parse(line: &str) -> Option<Record> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let s = |k: &str| v.get(k)?.as_str().map(str::to_owned);
        Some(Record {
            group: s("group")?,
            bench: s("bench")?,
            variant: s("variant")?,
            role: s("role")?,
            ops_per_s: v.get("ops_per_s")?.as_f64()?,
            rounds: v
                .get("round_ops_per_s")
                .and_then(|r| r.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default(),
            vs_limit: v.get("ratio_vs_limit").and_then(|r| r.as_f64()),
        })
    }

    /// The key that matches a case across runs.
    pub fn key(&self) -> Key {
        (self.group.clone(), self.bench.clone(), self.variant.clone())
    }
}

/// (group, bench, variant).
pub type Key = (String, String, String);

/// Every record of a JSON lines file (lines that are not cases are skipped).
pub fn read_jsonl(path: &Path) -> io::Result<Vec<Record>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(Record::parse)
        .collect())
}

/// The samples of one case on one side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// `subject`, `limit`, `peer` or `ref`.
    pub role: String,
    /// Rates.
    pub rates: Vec<f64>,
    /// Each sample's rate over its bench's limit in the same run; empty when the bench has no
    /// limit (or a sample lacked it).
    pub vs_limit: Vec<f64>,
}

/// The samples of each case on one side.
pub type Samples = BTreeMap<Key, Series>;

/// Adds one run's records to `samples`, one sample per case (its run's rate, and its ratio to
/// the limit).
pub fn add_run(samples: &mut Samples, run: &[Record]) {
    for r in run {
        let s = samples.entry(r.key()).or_insert_with(|| Series {
            role: r.role.clone(),
            ..Series::default()
        });
        s.rates.push(r.ops_per_s);
        if let Some(v) = r.vs_limit.filter(|v| *v > 0.0) {
            s.vs_limit.push(v);
        }
    }
}

/// The samples of one run with many rounds: each case's round rates.
pub fn rounds_of(run: &[Record]) -> Samples {
    run.iter()
        .map(|r| {
            let s = Series {
                role: r.role.clone(),
                rates: r.rounds.clone(),
                vs_limit: Vec::new(),
            };
            (r.key(), s)
        })
        .collect()
}

/// One case compared.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Key,
    pub role: String,
    /// Head's rates against base's.
    pub cmp: Comparison,
    /// The same comparison for the limit of the same bench, if it ran.
    pub limit: Option<Comparison>,
    /// Head's ratio to the limit against base's (each measured within one run, so a machine
    /// that is slower for one run moves both and cancels out), when the bench has a limit.
    pub vs_limit: Option<Comparison>,
    /// For subject cases: what the gate says. Other roles are shown, not judged.
    pub verdict: Option<Verdict>,
}

/// Compares every case found on both sides; `paired` when sample `i` of each side ran next to
/// each other (alternating runs).
///
/// A subject is judged on its ratio to the limit when every sample has one (machine drift
/// within a run moves both and cancels), else on its rates with the limit's move as the
/// drift check ([`Gate::verdict`]); a rate loss that the ratio to the limit does not show is
/// reported as drift.
pub fn compare(base: &Samples, head: &Samples, paired: bool, gate: Gate) -> Vec<Row> {
    let cmp = |b: &[f64], h: &[f64]| {
        if paired {
            stats::paired(b, h)
        } else {
            stats::unpaired(b, h)
        }
    };
    let limit_of = |group: &str, bench: &str| {
        base.iter()
            .find(|((g, b, _), s)| g == group && b == bench && s.role == "limit")
            .and_then(|(k, s)| cmp(&s.rates, &head.get(k)?.rates))
    };
    let mut rows = Vec::new();
    for (key, b) in base {
        let Some(h) = head.get(key) else {
            continue;
        };
        let Some(c) = cmp(&b.rates, &h.rates) else {
            continue;
        };
        let (limit, vs_limit) = if b.role == "limit" {
            (None, None)
        } else {
            let whole = |s: &Series| s.vs_limit.len() == s.rates.len();
            let vs = (whole(b) && whole(h))
                .then(|| cmp(&b.vs_limit, &h.vs_limit))
                .flatten();
            (limit_of(&key.0, &key.1), vs)
        };
        let verdict = (b.role == "subject").then(|| match &vs_limit {
            Some(v) => match (gate.verdict(v, None), gate.verdict(&c, None)) {
                (Verdict::Unchanged, Verdict::Regressed) => Verdict::Drift,
                (v, _) => v,
            },
            None => gate.verdict(&c, limit.as_ref()),
        });
        rows.push(Row {
            key: key.clone(),
            role: b.role.clone(),
            cmp: c,
            limit,
            vs_limit,
            verdict,
        });
    }
    rows
}

/// Whether any subject case regressed.
pub fn regressed(rows: &[Row]) -> bool {
    rows.iter().any(|r| r.verdict == Some(Verdict::Regressed))
}

/// The readable table: head/base per case with its interval and p-value, the limit's move,
/// head/base of the ratio to the limit (what a subject with a limit is judged on), and the
/// verdict.
pub fn table(rows: &[Row]) -> String {
    let case_w = rows
        .iter()
        .map(|r| r.key.0.len() + r.key.1.len() + r.key.2.len() + r.role.len() + 5)
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!(
        "{:case_w$}  {:>9}  {:>17}  {:>7}  {:>3}  {:>6}  {:>9}  {:>7}  verdict\n",
        "case", "head/base", "95% CI", "p", "n", "limit", "vs limit", "p"
    );
    for r in rows {
        let case = format!("{}/{}/{} ({})", r.key.0, r.key.1, r.key.2, r.role);
        let limit = r
            .limit
            .map_or_else(|| "-".to_owned(), |l| format!("{:.3}", l.ratio));
        let (vs, vs_p) = r.vs_limit.map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |v| (format!("{:.3}", v.ratio), format!("{:.4}", v.p)),
        );
        let _ = writeln!(
            s,
            "{case:case_w$}  {:>9.3}  [{:>6.3}, {:>6.3}]  {:>7.4}  {:>3}  {:>6}  {:>9}  {:>7}  {}",
            r.cmp.ratio,
            r.cmp.low,
            r.cmp.high,
            r.cmp.p,
            r.cmp.n,
            limit,
            vs,
            vs_p,
            r.verdict.map_or("", Verdict::as_str),
        );
    }
    s
}

/// The rows as one JSON document.
pub fn json(rows: &[Row], gate: Gate) -> String {
    let mut s = format!(
        "{{\"threshold\":{},\"alpha\":{},\"regressed\":{},\"cases\":[",
        gate.threshold,
        gate.alpha,
        regressed(rows)
    );
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let limit = r.limit.map_or_else(
            || "null".to_owned(),
            |l| format!("{{\"ratio\":{:.5},\"p\":{:.5}}}", l.ratio, l.p),
        );
        let vs_limit = r.vs_limit.map_or_else(
            || "null".to_owned(),
            |v| {
                format!(
                    "{{\"ratio\":{:.5},\"ci_low\":{:.5},\"ci_high\":{:.5},\"p\":{:.5}}}",
                    v.ratio, v.low, v.high, v.p
                )
            },
        );
        let _ = write!(
            s,
            "{{\"case\":{},\"role\":{},\"ratio\":{:.5},\"ci_low\":{:.5},\"ci_high\":{:.5},\"p\":{:.5},\"n\":{},\"limit\":{limit},\"vs_limit\":{vs_limit},\"verdict\":{}}}",
            json_str(&format!("{}/{}/{}", r.key.0, r.key.1, r.key.2)),
            json_str(&r.role),
            r.cmp.ratio,
            r.cmp.low,
            r.cmp.high,
            r.cmp.p,
            r.cmp.n,
            r.verdict
                .map_or_else(|| "null".to_owned(), |v| json_str(v.as_str())),
        );
    }
    s.push_str("]}\n");
    s
}

/// The head side's rates in the Bencher Metric Format (`{"bench": {"throughput": {"value":
/// ..., "lower_value": ..., "upper_value": ...}}}`), which CI benchmark trackers read.
pub fn bmf(head: &Samples) -> String {
    let mut s = String::from("{");
    for (key, series) in head.iter() {
        if series.rates.is_empty() {
            continue;
        }
        let mut sorted = series.rates.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        if s.len() > 1 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{}:{{\"throughput\":{{\"value\":{median:.2},\"lower_value\":{:.2},\"upper_value\":{:.2}}}}}",
            json_str(&format!("{}/{}/{}", key.0, key.1, key.2)),
            sorted[0],
            sorted[n - 1],
        );
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(bench: &str, variant: &str, role: &str, ops: f64, rounds: &[f64]) -> String {
        let rounds: Vec<String> = rounds.iter().map(|r| r.to_string()).collect();
        format!(
            "{{\"group\":\"g\",\"bench\":\"{bench}\",\"variant\":\"{variant}\",\"role\":\"{role}\",\"ops_per_s\":{ops},\"round_ops_per_s\":[{}]}}",
            rounds.join(",")
        )
    }

    /// A run of a subject and its limit, as the harness writes it (the subject's ratio to the
    /// limit included).
    fn run(subject: f64, limit: f64) -> Vec<Record> {
        let s = format!(
            "{{\"group\":\"g\",\"bench\":\"nop\",\"variant\":\"ringvm\",\"role\":\"subject\",\"ops_per_s\":{subject},\"ratio_vs_limit\":{}}}",
            subject / limit
        );
        let l = line("nop", "raw", "limit", limit, &[]);
        [s, l].iter().filter_map(|l| Record::parse(l)).collect()
    }

    fn subject_verdict(base: &[(f64, f64)], head: &[(f64, f64)]) -> Option<Verdict> {
        let (mut b, mut h) = (Samples::new(), Samples::new());
        for &(s, l) in base {
            add_run(&mut b, &run(s, l));
        }
        for &(s, l) in head {
            add_run(&mut h, &run(s, l));
        }
        compare(&b, &h, true, Gate::default())
            .into_iter()
            .find(|r| r.role == "subject")
            .and_then(|r| r.verdict)
    }

    #[test]
    fn subjects_are_judged_on_their_ratio_to_the_limit_of_the_same_run() {
        let wobble = |i: usize| 1.0 + (i % 3) as f64 * 0.01;
        let steady: Vec<(f64, f64)> = (0..10).map(|i| (1000.0 * wobble(i), 2000.0)).collect();
        // The machine got 15% slower for the head's runs: subject and limit alike.
        let slower: Vec<(f64, f64)> = (0..10).map(|i| (850.0 * wobble(i), 1700.0)).collect();
        assert_eq!(subject_verdict(&steady, &slower), Some(Verdict::Drift));
        // The subject lost 15% in runs where the limit held.
        let lost: Vec<(f64, f64)> = (0..10).map(|i| (850.0 * wobble(i), 2000.0)).collect();
        assert_eq!(subject_verdict(&steady, &lost), Some(Verdict::Regressed));
        // A noisy machine (every run at another speed) with no change in the code.
        let noisy = |seed: usize| -> Vec<(f64, f64)> {
            (0..10)
                .map(|i| {
                    let m = 0.7 + ((i * 7 + seed * 3) % 10) as f64 * 0.06;
                    (1000.0 * m * wobble(i + seed), 2000.0 * m)
                })
                .collect()
        };
        assert_eq!(
            subject_verdict(&noisy(0), &noisy(5)),
            Some(Verdict::Unchanged)
        );
    }

    #[test]
    fn records_read_back_from_the_harness_lines() {
        let r = Record::parse(&line("nop", "ringvm", "subject", 5.0, &[4.0, 6.0])).expect("ok");
        assert_eq!(
            (r.bench.as_str(), r.role.as_str(), r.ops_per_s, r.rounds),
            ("nop", "subject", 5.0, vec![4.0, 6.0])
        );
        assert!(Record::parse("not json").is_none());
        assert!(Record::parse("{\"group\":\"g\"}").is_none());
    }

    #[test]
    fn a_regressed_subject_is_flagged_and_reported_in_every_format() {
        let (mut base, mut head) = (Samples::new(), Samples::new());
        for i in 0..10 {
            let wobble = 1.0 + (i % 3) as f64 * 0.01;
            let run = |subject: f64| {
                [
                    line("nop", "ringvm", "subject", subject * wobble, &[]),
                    line("nop", "raw", "limit", 2000.0 * wobble, &[]),
                ]
                .iter()
                .filter_map(|l| Record::parse(l))
                .collect::<Vec<_>>()
            };
            add_run(&mut base, &run(1000.0));
            add_run(&mut head, &run(850.0));
        }
        let rows = compare(&base, &head, true, Gate::default());
        assert_eq!(rows.len(), 2);
        let subject = rows.iter().find(|r| r.role == "subject").expect("subject");
        assert_eq!(subject.verdict, Some(Verdict::Regressed));
        assert!((subject.limit.expect("limit").ratio - 1.0).abs() < 1e-9);
        assert!(regressed(&rows));
        assert!(table(&rows).contains("REGRESSED"));
        let j: serde_json::Value =
            serde_json::from_str(&json(&rows, Gate::default())).expect("json");
        assert_eq!(j["regressed"], true);
        let b: serde_json::Value = serde_json::from_str(&bmf(&head)).expect("bmf");
        assert!(
            b["g/nop/ringvm"]["throughput"]["value"]
                .as_f64()
                .expect("value")
                > 800.0
        );
    }
}
