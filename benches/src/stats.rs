//! Statistics for telling a real change from noise: two sets of rates (operations per second,
//! higher is better) of one case, before (`base`) and after (`head`).
//!
//! - [`paired`]: runs that alternated (`scripts/ab`: base, head, head, base, ...), so round
//!   `i` of each side shared the machine's load. The estimate is the median of the per-round
//!   ratios; its confidence interval comes from a bootstrap of the rounds, and its p-value
//!   from the Wilcoxon signed-rank test (exact up to 16 rounds).
//! - [`unpaired`]: samples taken at different times (a stored baseline against this run). The
//!   estimate is the ratio of the medians; the interval is a bootstrap of each side, the
//!   p-value a permutation test of the difference of the medians of the logarithms.
//!
//! [`Gate::verdict`] then calls a case regressed only when it lost more than the threshold,
//! with significance, while the limit of the same bench (the hand-written path, which does
//! not change between the two builds) did not lose too: when it did, the machine got slower,
//! not ringvm ([`Verdict::Drift`]).
//!
//! Every resampling uses a fixed seed: the same samples always give the same answer.

/// Bootstrap resamples for a confidence interval.
const BOOTSTRAP: usize = 4000;
/// Random permutations when an exact test would take too many.
const PERMUTATIONS: usize = 20_000;
/// Up to this many pairs the signed-rank test enumerates every sign assignment (2^n).
const EXACT_PAIRS: usize = 16;

/// `head` against `base`: the ratio head/base with a 95% confidence interval and the p-value
/// of "no change".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Estimated head/base ratio of the rates (above 1: head is faster).
    pub ratio: f64,
    /// Lower end of the 95% confidence interval of `ratio`.
    pub low: f64,
    /// Upper end of the 95% confidence interval of `ratio`.
    pub high: f64,
    /// Two-sided p-value of the hypothesis that nothing changed.
    pub p: f64,
    /// Samples on each side.
    pub n: usize,
}

/// Compares paired samples: `base[i]` and `head[i]` ran next to each other. `None` when there
/// are fewer than two pairs or a rate is not a positive number.
///
/// The estimate is the median of the per-pair ratios (robust to a round that a burst of load
/// hit), its interval a bootstrap of that median, and its p-value the Wilcoxon signed-rank
/// test's, exact (every sign assignment) up to 16 pairs.
pub fn paired(base: &[f64], head: &[f64]) -> Option<Comparison> {
    let n = base.len().min(head.len());
    if n < 2 || !positive(base) || !positive(head) {
        return None;
    }
    let d: Vec<f64> = base[..n]
        .iter()
        .zip(&head[..n])
        .map(|(b, h)| (h / b).ln())
        .collect();
    let observed = median_of(&d);
    let mut rng = Rng::new(0x5eed_0001);
    let mut resample = d.clone();
    let mut medians: Vec<f64> = (0..BOOTSTRAP)
        .map(|_| {
            resample.iter_mut().for_each(|v| *v = d[rng.below(n)]);
            median_in_place(&mut resample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    Some(Comparison {
        ratio: observed.exp(),
        low: quantile(&medians, 0.025).exp(),
        high: quantile(&medians, 0.975).exp(),
        p: signed_rank_p(&d, &mut rng),
        n,
    })
}

/// Two-sided p-value of the Wilcoxon signed-rank test that the differences `d` are
/// symmetric around 0 (zeros dropped, ties given their average rank).
fn signed_rank_p(d: &[f64], rng: &mut Rng) -> f64 {
    let mut nz: Vec<f64> = d.iter().copied().filter(|x| *x != 0.0).collect();
    let m = nz.len();
    if m == 0 {
        return 1.0;
    }
    nz.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    // Ranks 1..=m, ties averaged.
    let mut ranks = vec![0.0; m];
    let mut i = 0;
    while i < m {
        let mut j = i;
        while j + 1 < m && nz[j + 1].abs() == nz[i].abs() {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        ranks[i..=j].iter_mut().for_each(|x| *x = r);
        i = j + 1;
    }
    let centre = ranks.iter().sum::<f64>() / 2.0;
    let w: f64 = nz
        .iter()
        .zip(&ranks)
        .filter(|(x, _)| **x > 0.0)
        .map(|(_, r)| r)
        .sum();
    let far = (w - centre).abs() * (1.0 - 1e-12);
    let extreme = |mask: u64| {
        let w: f64 = (0..m)
            .filter(|i| mask >> i & 1 == 1)
            .map(|i| ranks[i])
            .sum();
        (w - centre).abs() >= far
    };
    if m <= EXACT_PAIRS {
        let total = 1u64 << m;
        (0..total).filter(|&mask| extreme(mask)).count() as f64 / total as f64
    } else {
        let hits = (0..PERMUTATIONS)
            .filter(|_| extreme(rng.next() & ((1u64 << m.min(63)) - 1)))
            .count();
        // The observed assignment counts as one of them.
        (hits + 1) as f64 / (PERMUTATIONS + 1) as f64
    }
}

/// Compares independent samples (taken at different times). `None` when a side has fewer
/// than two samples or a rate is not a positive number.
pub fn unpaired(base: &[f64], head: &[f64]) -> Option<Comparison> {
    if base.len() < 2 || head.len() < 2 || !positive(base) || !positive(head) {
        return None;
    }
    let x: Vec<f64> = base.iter().map(|v| v.ln()).collect();
    let y: Vec<f64> = head.iter().map(|v| v.ln()).collect();
    let observed = median_of(&y) - median_of(&x);
    let mut rng = Rng::new(0x5eed_0002);
    let (mut xs, mut ys) = (x.clone(), y.clone());
    let mut diffs: Vec<f64> = (0..BOOTSTRAP)
        .map(|_| {
            xs.iter_mut().for_each(|v| *v = x[rng.below(x.len())]);
            ys.iter_mut().for_each(|v| *v = y[rng.below(y.len())]);
            median_in_place(&mut ys) - median_in_place(&mut xs)
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    let mut pool: Vec<f64> = x.iter().chain(&y).copied().collect();
    let mut scratch = pool.clone();
    let hits = (0..PERMUTATIONS)
        .filter(|_| {
            rng.shuffle(&mut pool);
            scratch.copy_from_slice(&pool);
            let (a, b) = scratch.split_at_mut(x.len());
            (median_in_place(b) - median_in_place(a)).abs() >= observed.abs() * (1.0 - 1e-12)
        })
        .count();
    Some(Comparison {
        ratio: observed.exp(),
        low: quantile(&diffs, 0.025).exp(),
        high: quantile(&diffs, 0.975).exp(),
        p: (hits + 1) as f64 / (PERMUTATIONS + 1) as f64,
        n: x.len().min(y.len()),
    })
}

/// What a comparison says about a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Slower beyond the threshold, with significance, while the limit held.
    Regressed,
    /// Slower beyond the threshold, but the limit lost too: the machine, not the code.
    Drift,
    /// Faster beyond the threshold, with significance.
    Improved,
    /// Nothing beyond the noise and the threshold.
    Unchanged,
}

impl Verdict {
    /// The word in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Regressed => "REGRESSED",
            Verdict::Drift => "drift",
            Verdict::Improved => "improved",
            Verdict::Unchanged => "ok",
        }
    }
}

/// When a change counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// Relative loss that matters (0.05: 5%).
    pub threshold: f64,
    /// Significance level of the p-value.
    pub alpha: f64,
}

impl Default for Gate {
    /// 5% at p < 0.01: with 10 rounds, at least 9 of them must agree that head lost.
    fn default() -> Gate {
        Gate {
            threshold: 0.05,
            alpha: 0.01,
        }
    }
}

impl Gate {
    /// The verdict on `subject`, given how the bench's `limit` moved between the same runs.
    ///
    /// A regression needs all three: the estimate below `1 - threshold`, `p < alpha`, and the
    /// whole confidence interval below 1. The limit counts as having moved when it lost half
    /// the threshold or more, with significance.
    pub fn verdict(&self, subject: &Comparison, limit: Option<&Comparison>) -> Verdict {
        let significant = subject.p < self.alpha;
        if significant && subject.ratio < 1.0 - self.threshold && subject.high < 1.0 {
            let limit_moved = limit.is_some_and(|l| {
                l.p < self.alpha && l.ratio < 1.0 - self.threshold / 2.0 && l.high < 1.0
            });
            return if limit_moved {
                Verdict::Drift
            } else {
                Verdict::Regressed
            };
        }
        if significant && subject.ratio > 1.0 + self.threshold && subject.low > 1.0 {
            return Verdict::Improved;
        }
        Verdict::Unchanged
    }
}

fn positive(v: &[f64]) -> bool {
    v.iter().all(|x| x.is_finite() && *x > 0.0)
}

fn median_of(v: &[f64]) -> f64 {
    median_in_place(&mut v.to_vec())
}

/// The median of `s`, which it sorts.
fn median_in_place(s: &mut [f64]) -> f64 {
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// xorshift64*: reproducible resampling.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    #[cfg(test)]
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn shuffle(&mut self, v: &mut [f64]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rates around `mean` with relative noise `noise` (sum of uniforms: roughly normal),
    /// times a machine `drift` per round.
    fn samples(rng: &mut Rng, n: usize, mean: f64, noise: f64, drift: &[f64]) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let e: f64 = (0..4).map(|_| rng.unit() - 0.5).sum::<f64>() * noise;
                mean * (1.0 + e) * drift[i % drift.len()]
            })
            .collect()
    }

    #[test]
    fn a_known_10_percent_loss_is_detected_paired_and_unpaired() {
        let gate = Gate::default();
        for seed in 1..=20 {
            let mut rng = Rng::new(seed);
            // The machine's speed wanders from round to round; pairs share it.
            let drift: Vec<f64> = (0..10).map(|_| 0.8 + 0.4 * rng.unit()).collect();
            let base = samples(&mut rng, 10, 1000.0, 0.03, &drift);
            let head = samples(&mut rng, 10, 900.0, 0.03, &drift);
            let c = paired(&base, &head).expect("comparison");
            assert!((c.ratio - 0.9).abs() < 0.03, "seed {seed}: {c:?}");
            assert!(c.low < c.ratio && c.ratio < c.high, "seed {seed}: {c:?}");
            assert_eq!(
                gate.verdict(&c, None),
                Verdict::Regressed,
                "seed {seed}: {c:?}"
            );
            let base = samples(&mut rng, 15, 1000.0, 0.03, &[1.0]);
            let head = samples(&mut rng, 15, 900.0, 0.03, &[1.0]);
            let c = unpaired(&base, &head).expect("comparison");
            assert_eq!(
                gate.verdict(&c, None),
                Verdict::Regressed,
                "seed {seed}: {c:?}"
            );
        }
    }

    #[test]
    fn identical_distributions_are_not_flagged() {
        let gate = Gate::default();
        let mut flagged = 0;
        for seed in 1..=60 {
            let mut rng = Rng::new(seed);
            let drift: Vec<f64> = (0..10).map(|_| 0.7 + 0.6 * rng.unit()).collect();
            let base = samples(&mut rng, 10, 1000.0, 0.05, &drift);
            let head = samples(&mut rng, 10, 1000.0, 0.05, &drift);
            let c = paired(&base, &head).expect("comparison");
            if gate.verdict(&c, None) != Verdict::Unchanged {
                flagged += 1;
            }
            let base = samples(&mut rng, 15, 1000.0, 0.05, &[1.0]);
            let head = samples(&mut rng, 15, 1000.0, 0.05, &[1.0]);
            let c = unpaired(&base, &head).expect("comparison");
            if gate.verdict(&c, None) != Verdict::Unchanged {
                flagged += 1;
            }
        }
        // The threshold keeps noise within it from ever counting.
        assert_eq!(flagged, 0);
    }

    #[test]
    fn a_small_loss_within_the_threshold_is_not_flagged() {
        let mut rng = Rng::new(7);
        let base = samples(&mut rng, 20, 1000.0, 0.01, &[1.0]);
        let head = samples(&mut rng, 20, 980.0, 0.01, &[1.0]);
        let c = paired(&base, &head).expect("comparison");
        // Significant, but 2% is below the 5% that matters.
        assert!(c.p < 0.05 && c.ratio < 0.99, "{c:?}");
        assert_eq!(Gate::default().verdict(&c, None), Verdict::Unchanged);
    }

    #[test]
    fn a_limit_that_lost_too_turns_a_regression_into_drift() {
        let gate = Gate::default();
        let mut rng = Rng::new(11);
        // The machine got 15% slower for the head's rounds: subject and limit alike.
        let base = samples(&mut rng, 10, 1000.0, 0.02, &[1.0]);
        let head = samples(&mut rng, 10, 850.0, 0.02, &[1.0]);
        let limit_base = samples(&mut rng, 10, 2000.0, 0.02, &[1.0]);
        let limit_head = samples(&mut rng, 10, 1700.0, 0.02, &[1.0]);
        let subject = paired(&base, &head).expect("subject");
        let limit = paired(&limit_base, &limit_head).expect("limit");
        assert_eq!(gate.verdict(&subject, Some(&limit)), Verdict::Drift);
        // A limit that held leaves the regression standing.
        let steady = samples(&mut rng, 10, 2000.0, 0.02, &[1.0]);
        let limit = paired(&limit_base, &steady).expect("limit");
        assert_eq!(gate.verdict(&subject, Some(&limit)), Verdict::Regressed);
    }

    #[test]
    fn gains_are_reported_as_improvements() {
        let mut rng = Rng::new(3);
        let base = samples(&mut rng, 10, 1000.0, 0.02, &[1.0]);
        let head = samples(&mut rng, 10, 1200.0, 0.02, &[1.0]);
        let c = paired(&base, &head).expect("comparison");
        assert_eq!(Gate::default().verdict(&c, None), Verdict::Improved);
    }

    #[test]
    fn the_exact_signed_rank_test_gives_the_textbook_p_value() {
        // Every one of 8 pairs lost: only the all-lost and all-gained assignments are as
        // extreme.
        let base = [100.0; 8];
        let head = [90.0, 91.0, 89.0, 90.0, 92.0, 88.0, 90.0, 90.5];
        let c = paired(&base, &head).expect("comparison");
        assert!((c.p - 2.0 / 256.0).abs() < 1e-12, "{c:?}");
        // Identical samples: p = 1.
        assert_eq!(paired(&base, &base).expect("comparison").p, 1.0);
        // One gain among 8 (the smallest difference, rank 1): W+ = 1 of 36; as or more
        // extreme are W+ in {0, 1} and, on the other side, {35, 36}: 4 of 256.
        let head = [90.0, 91.0, 89.0, 90.0, 92.0, 88.0, 90.0, 100.5];
        let c = paired(&base, &head).expect("comparison");
        assert!((c.p - 4.0 / 256.0).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn too_few_or_bad_samples_give_no_comparison() {
        assert!(paired(&[1.0], &[1.0]).is_none());
        assert!(paired(&[1.0, 0.0], &[1.0, 1.0]).is_none());
        assert!(unpaired(&[1.0, f64::NAN], &[1.0, 1.0]).is_none());
        assert!(unpaired(&[1.0, 2.0], &[1.0]).is_none());
    }
}
