//! Statistics on real templates: per-database score matrices, held-out accuracy of the
//! comparator, cross-validation of the score calibration and of the ten-finger fusion, and
//! the synthetic-versus-real comparison. [`crate::bench`] prints them.
//!
//! Everything works on any directory of `DB*/NNN_K.iso` records ([`crate::bench::load_fvc`]),
//! with any number of databases: the calibration rotation needs at least two (fit on all
//! but one, test on the one left out), the two-way split needs at least two, accuracy over
//! all databases needs one.
//!
//! Protocol (that of `shared/data/README.md`): within each database, every ordered pair of
//! templates is compared; two impressions of the same finger are a genuine pair, two
//! different fingers an impostor pair; pairs never cross databases. Ordered pairs `(a, b)`
//! and `(b, a)` are both counted (the comparator is not exactly symmetric), so counts of
//! events are not independent draws; the binomial intervals below treat them as if they
//! were and are therefore somewhat narrower than the truth.

use rand::{Rng, SeedableRng};

use crate::bench::FvcTemplate;
use crate::matcher::calibration::{Calibration, TailSpec, fuse};
use crate::matcher::{FingerTemplate, MatchDetail, Normalisation, compare_detail};

/// All comparisons of one database.
#[derive(Debug, Clone)]
pub struct DbScores {
    /// Database name (its directory, e.g. `DB1_B`).
    pub name: String,
    /// (finger, impression) of each template, in matrix order.
    pub labels: Vec<(u32, u32)>,
    /// Row-major `n × n` scores, `matrix[i * n + j] = compare(template i, template j)`
    /// (diagonal unused, 0).
    pub matrix: Vec<f32>,
    /// The comparisons behind `matrix` (same order), for re-normalising without comparing
    /// again; empty when the scores did not come from [`compare_detail`].
    pub details: Vec<MatchDetail>,
}

impl DbScores {
    /// Number of templates.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the database holds no template.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Score of template `i` (probe) against template `j` (reference).
    pub fn score(&self, i: usize, j: usize) -> f32 {
        self.matrix[i * self.len() + j]
    }

    /// The same comparisons scored with another normalisation (needs `details`).
    pub fn rescored(&self, n: &Normalisation) -> DbScores {
        DbScores {
            name: self.name.clone(),
            labels: self.labels.clone(),
            matrix: self.details.iter().map(|d| d.rescored(n)).collect(),
            details: self.details.clone(),
        }
    }

    fn pairs(&self, genuine: bool) -> Vec<f32> {
        let n = self.len();
        let mut out = Vec::new();
        for i in 0..n {
            for j in 0..n {
                if i != j && (self.labels[i].0 == self.labels[j].0) == genuine {
                    out.push(self.score(i, j));
                }
            }
        }
        out
    }

    /// Scores of all ordered genuine pairs.
    pub fn genuine(&self) -> Vec<f32> {
        self.pairs(true)
    }

    /// Scores of all ordered impostor pairs.
    pub fn impostor(&self) -> Vec<f32> {
        self.pairs(false)
    }
}

/// Groups templates by database (in order of first appearance) and compares every ordered
/// pair within each with [`compare_detail`] (the shipped comparator), on all cores.
pub fn score_databases(templates: &[FvcTemplate]) -> Vec<DbScores> {
    use rayon::prelude::*;
    let mut names: Vec<String> = Vec::new();
    for t in templates {
        if !names.contains(&t.database) {
            names.push(t.database.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let members: Vec<&FvcTemplate> =
                templates.iter().filter(|t| t.database == name).collect();
            let prepared: Vec<FingerTemplate> = members
                .iter()
                .map(|t| FingerTemplate::new(&t.data))
                .collect();
            let n = members.len();
            let details: Vec<MatchDetail> = (0..n * n)
                .into_par_iter()
                .map(|k| {
                    let (i, j) = (k / n, k % n);
                    if i == j {
                        MatchDetail::default()
                    } else {
                        compare_detail(&prepared[i], &prepared[j])
                    }
                })
                .collect();
            DbScores {
                name,
                labels: members.iter().map(|t| (t.finger, t.impression)).collect(),
                matrix: details.iter().map(|d| d.score).collect(),
                details,
            }
        })
        .collect()
}

/// The tuning objective: EER + FNMR at FMR 0.1 % + FNMR at FMR 0.01 % (lower is better),
/// weighting the high-security end twice as much as the equal-error point.
pub fn objective(a: &SplitAccuracy) -> f64 {
    a.eer + a.fnmr_at_fmr_1e3 + a.fnmr_at_fmr_1e4
}

/// The tuning procedure for the score normalisation (the only comparator constants tuned
/// since issue 13): the [`Normalisation::grid`] point minimising [`objective`] on the
/// databases `tune` (one threshold across them), first in grid order on ties. Returns it
/// with its accuracy on `tune`.
pub fn tune_normalisation(dbs: &[DbScores], tune: &[usize]) -> (Normalisation, SplitAccuracy) {
    let mut best: Option<(Normalisation, SplitAccuracy)> = None;
    for n in Normalisation::grid() {
        let scored: Vec<DbScores> = dbs.iter().map(|d| d.rescored(&n)).collect();
        let acc = split_accuracy(&scored, tune);
        if best
            .as_ref()
            .is_none_or(|(_, b)| objective(&acc) < objective(b) - 1e-12)
        {
            best = Some((n, acc));
        }
    }
    best.expect("the grid is not empty")
}

// ---- binomial statistics ------------------------------------------------------------------

/// `P(X ≤ k)` for `X ~ Binomial(n, p)`, summed in log space (exact up to rounding).
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    // ln C(n, i) built incrementally.
    let mut lc = 0.0f64;
    let mut total = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            lc += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (lc + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    total.min(1.0)
}

/// Exact (Clopper–Pearson) two-sided confidence interval for a binomial proportion with
/// `k` events in `n` trials at confidence `level` (e.g. 0.95), by bisection on the binomial
/// distribution function: the lower end is the `p` with `P(X ≥ k) = α/2`, the upper the `p`
/// with `P(X ≤ k) = α/2`.
pub fn clopper_pearson(k: u64, n: u64, level: f64) -> (f64, f64) {
    assert!(n > 0 && k <= n, "clopper_pearson needs 0 ≤ k ≤ n, n > 0");
    let alpha = 1.0 - level;
    let solve = |f: &dyn Fn(f64) -> f64, target: f64| {
        // f decreasing in p from 1 to 0: the p where f(p) = target.
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if f(mid) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo + hi) / 2.0
    };
    let lower = if k == 0 {
        0.0
    } else {
        // P(X ≥ k) = 1 − P(X ≤ k − 1) increases with p.
        solve(&|p| binomial_cdf(k - 1, n, p), 1.0 - alpha / 2.0)
    };
    let upper = if k == n {
        1.0
    } else {
        solve(&|p| binomial_cdf(k, n, p), alpha / 2.0)
    };
    (lower, upper)
}

// ---- accuracy -----------------------------------------------------------------------------

/// Accuracy over a set of databases, one threshold across them.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitAccuracy {
    pub databases: Vec<String>,
    pub genuine: usize,
    pub impostor: usize,
    pub eer: f64,
    pub fnmr_at_fmr_1e3: f64,
    pub fnmr_at_fmr_1e4: f64,
}

/// EER and FNMR at FMR 0.1 % / 0.01 % over the databases `pick` (indices into `dbs`).
pub fn split_accuracy(dbs: &[DbScores], pick: &[usize]) -> SplitAccuracy {
    let (mut g, mut i) = (Vec::new(), Vec::new());
    for &k in pick {
        g.extend(dbs[k].genuine());
        i.extend(dbs[k].impostor());
    }
    let (eer, fnmr) = crate::bench::error_rates(&g, &i, &[1e-3, 1e-4]);
    SplitAccuracy {
        databases: pick.iter().map(|&k| dbs[k].name.clone()).collect(),
        genuine: g.len(),
        impostor: i.len(),
        eer,
        fnmr_at_fmr_1e3: fnmr[0],
        fnmr_at_fmr_1e4: fnmr[1],
    }
}

/// The two halves of `n` databases in order (the first `n / 2`, the rest); empty halves
/// when `n < 2`. With FVC2002 DB1–4: (DB1, DB2) and (DB3, DB4).
pub fn halves(n: usize) -> (Vec<usize>, Vec<usize>) {
    if n < 2 {
        return ((0..n).collect(), Vec::new());
    }
    ((0..n / 2).collect(), (n / 2..n).collect())
}

// ---- calibration cross-validation ---------------------------------------------------------

/// One target FMR checked on held-out impostor scores.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelCheck {
    /// FMR the model was asked for.
    pub target: f64,
    /// Score threshold the model gives for it.
    pub threshold: f32,
    /// FMR the model predicts at that threshold (the target, up to f32 rounding).
    pub predicted: f64,
    /// Held-out impostor scores at or above the threshold, out of `n`.
    pub count: u64,
    pub n: u64,
    /// 95 % Clopper–Pearson interval of the measured FMR `count / n`.
    pub ci: (f64, f64),
}

impl LevelCheck {
    /// Measured FMR.
    pub fn measured(&self) -> f64 {
        self.count as f64 / self.n.max(1) as f64
    }

    /// Expected number of events under the model.
    pub fn expected(&self) -> f64 {
        self.predicted * self.n as f64
    }
}

/// A calibration fitted on every database but one and checked on that one.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationCheck {
    pub held_out: String,
    pub train_impostors: usize,
    pub levels: Vec<LevelCheck>,
}

fn level_check(cal: &Calibration, test: &[f32], target: f64) -> LevelCheck {
    let threshold = cal.threshold_for_fmr(target);
    let count = test.iter().filter(|&&s| s >= threshold).count() as u64;
    let n = test.len() as u64;
    LevelCheck {
        target,
        threshold,
        predicted: cal.fmr(threshold),
        count,
        n,
        ci: clopper_pearson(count, n.max(1), 0.95),
    }
}

/// Leave-one-database-out check of [`Calibration::fit_with`] (`spec`) at `targets`: for
/// each database, fit on the impostor scores of all the others, set the threshold for each
/// target FMR, count the held-out database's impostor scores at or above it. Empty with
/// fewer than two databases.
pub fn cross_validate(dbs: &[DbScores], spec: TailSpec, targets: &[f64]) -> Vec<RotationCheck> {
    if dbs.len() < 2 {
        return Vec::new();
    }
    (0..dbs.len())
        .map(|h| {
            let train: Vec<f32> = (0..dbs.len())
                .filter(|&k| k != h)
                .flat_map(|k| dbs[k].impostor())
                .collect();
            let cal = Calibration::fit_with(&train, spec);
            let test = dbs[h].impostor();
            RotationCheck {
                held_out: dbs[h].name.clone(),
                train_impostors: train.len(),
                levels: targets
                    .iter()
                    .map(|&t| level_check(&cal, &test, t))
                    .collect(),
            }
        })
        .collect()
}

/// The rotations pooled per target: every held-out score judged by the model that did not
/// see its database. `predicted` is the mean predicted FMR, `threshold` that of the first
/// rotation (they differ per rotation).
pub fn pooled(rotations: &[RotationCheck]) -> Vec<LevelCheck> {
    let Some(first) = rotations.first() else {
        return Vec::new();
    };
    (0..first.levels.len())
        .map(|l| {
            let count: u64 = rotations.iter().map(|r| r.levels[l].count).sum();
            let n: u64 = rotations.iter().map(|r| r.levels[l].n).sum();
            let expected: f64 = rotations.iter().map(|r| r.levels[l].expected()).sum();
            LevelCheck {
                target: first.levels[l].target,
                threshold: first.levels[l].threshold,
                predicted: expected / n.max(1) as f64,
                count,
                n,
                ci: clopper_pearson(count, n.max(1), 0.95),
            }
        })
        .collect()
}

/// Poisson deviance `2 Σ (O ln(O/E) − (O − E))` of observed counts against expected ones:
/// 0 for a perfect model, larger the worse; the held-out error used to choose the tail.
pub fn poisson_deviance(levels: &[LevelCheck]) -> f64 {
    levels
        .iter()
        .map(|l| {
            let (o, e) = (l.count as f64, l.expected().max(1e-12));
            let t = if o > 0.0 { o * (o / e).ln() } else { 0.0 };
            2.0 * (t - (o - e))
        })
        .sum()
}

/// Held-out error of one tail model: pooled levels and their deviance.
#[derive(Debug, Clone, PartialEq)]
pub struct TailComparison {
    pub spec: TailSpec,
    pub pooled: Vec<LevelCheck>,
    pub deviance: f64,
}

/// [`cross_validate`] for each of `specs`, pooled (empty with fewer than two databases).
pub fn compare_tails(dbs: &[DbScores], specs: &[TailSpec], targets: &[f64]) -> Vec<TailComparison> {
    if dbs.len() < 2 {
        return Vec::new();
    }
    specs
        .iter()
        .map(|&spec| {
            let pooled = pooled(&cross_validate(dbs, spec, targets));
            TailComparison {
                spec,
                deviance: poisson_deviance(&pooled),
                pooled,
            }
        })
        .collect()
}

// ---- fusion check -------------------------------------------------------------------------

/// Fused FMR of pseudo multi-finger impostor comparisons in one held-out database.
#[derive(Debug, Clone, PartialEq)]
pub struct FusionCheck {
    pub held_out: String,
    /// Fingers per pseudo person.
    pub fingers: usize,
    /// Pseudo impostor comparisons drawn.
    pub samples: u64,
    /// Per target fused FMR: comparisons whose fused FMR (Fisher's method over the
    /// per-finger calibration fitted without this database) is at or below the target.
    pub levels: Vec<LevelCheck>,
}

/// Checks the fusion on pseudo persons built from real fingers: for each held-out database
/// (calibration fitted on the others), `samples` random impostor comparisons of pseudo
/// persons of `fingers` distinct fingers of that database (one random impression per
/// finger), the reference person's finger at each position a different finger than the
/// probe's. Measured: the share of comparisons whose fused FMR is at or below each target.
/// Fingers of one real person are correlated; these pseudo persons have independent fingers,
/// so this checks the per-finger calibration as fused, not the independence assumption.
/// Databases with fewer than `fingers` (or two) distinct fingers are skipped; empty with fewer
/// than two databases.
pub fn fusion_check(
    dbs: &[DbScores],
    fingers: usize,
    samples: u64,
    targets: &[f64],
    seed: u64,
) -> Vec<FusionCheck> {
    let fingers = fingers.min(10);
    if dbs.len() < 2 || fingers == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for h in 0..dbs.len() {
        let db = &dbs[h];
        let mut ids: Vec<u32> = db.labels.iter().map(|l| l.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < fingers.max(2) {
            continue;
        }
        let by_finger: Vec<Vec<usize>> = ids
            .iter()
            .map(|&f| (0..db.len()).filter(|&i| db.labels[i].0 == f).collect())
            .collect();
        let train: Vec<f32> = (0..dbs.len())
            .filter(|&k| k != h)
            .flat_map(|k| dbs[k].impostor())
            .collect();
        let cal = Calibration::fit(&train);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h as u64);
        let mut counts = vec![0u64; targets.len()];
        for _ in 0..samples {
            let a = sample_distinct(&mut rng, ids.len(), fingers);
            let b = loop {
                let b = sample_distinct(&mut rng, ids.len(), fingers);
                if a.iter().zip(&b).all(|(x, y)| x != y) {
                    break b;
                }
            };
            let mut scores = [None; 10];
            for (pos, (&fa, &fb)) in a.iter().zip(&b).enumerate() {
                let ia = by_finger[fa][rng.random_range(0..by_finger[fa].len())];
                let ib = by_finger[fb][rng.random_range(0..by_finger[fb].len())];
                scores[pos] = Some(db.score(ia, ib));
            }
            let fmr = fuse(scores, &cal).fmr;
            for (c, &t) in counts.iter_mut().zip(targets) {
                if fmr <= t {
                    *c += 1;
                }
            }
        }
        out.push(FusionCheck {
            held_out: db.name.clone(),
            fingers,
            samples,
            levels: targets
                .iter()
                .zip(&counts)
                .map(|(&t, &c)| LevelCheck {
                    target: t,
                    threshold: (-t.log10()) as f32,
                    predicted: t,
                    count: c,
                    n: samples,
                    ci: clopper_pearson(c, samples.max(1), 0.95),
                })
                .collect(),
        });
    }
    out
}

/// `k` distinct indices out of `0..n` in random order (partial Fisher–Yates).
fn sample_distinct(rng: &mut impl Rng, n: usize, k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = rng.random_range(i..n);
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

// ---- synthetic versus real ----------------------------------------------------------------

/// Quantiles (nearest rank) of a sample, for the side-by-side tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantiles {
    pub n: usize,
    pub mean: f64,
    /// (q, value) pairs.
    pub at: Vec<(f64, f64)>,
}

impl Quantiles {
    pub fn of(samples: &[f64], qs: &[f64]) -> Self {
        Quantiles {
            n: samples.len(),
            mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
            at: qs
                .iter()
                .map(|&q| (q, crate::bench::percentile(samples, q)))
                .collect(),
        }
    }
}

/// Template and score distributions of one population (FVC2002 or synthetic).
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationStats {
    pub label: String,
    pub minutiae: Quantiles,
    /// Minutia quality (ISO 0–100; 0 = not reported).
    pub minutia_quality: Quantiles,
    /// Finger (view) quality (ISO 0–100).
    pub finger_quality: Quantiles,
    pub genuine: Quantiles,
    pub impostor: Quantiles,
}

/// Quantiles printed for counts and qualities.
pub const COUNT_QS: [f64; 5] = [0.05, 0.25, 0.5, 0.75, 0.95];
/// Quantiles printed for genuine scores (the low end matters: misses).
pub const GENUINE_QS: [f64; 5] = [0.01, 0.05, 0.1, 0.25, 0.5];
/// Quantiles printed for impostor scores (the high end matters: false matches).
pub const IMPOSTOR_QS: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// Distributions of a template set and its scores.
pub fn population_stats(
    label: &str,
    templates: &[FvcTemplate],
    dbs: &[DbScores],
) -> PopulationStats {
    let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let minutiae: Vec<f64> = templates
        .iter()
        .map(|t| t.data.minutiae.len() as f64)
        .collect();
    let mq: Vec<f64> = templates
        .iter()
        .flat_map(|t| t.minutia_quality.iter().map(|&q| f64::from(q)))
        .collect();
    let fq: Vec<f64> = templates
        .iter()
        .map(|t| f64::from(t.finger_quality))
        .collect();
    PopulationStats {
        label: label.to_owned(),
        minutiae: Quantiles::of(&minutiae, &COUNT_QS),
        minutia_quality: Quantiles::of(&mq, &COUNT_QS),
        finger_quality: Quantiles::of(&fq, &COUNT_QS),
        genuine: Quantiles::of(
            &f(dbs.iter().flat_map(|d| d.genuine()).collect()),
            &GENUINE_QS,
        ),
        impostor: Quantiles::of(
            &f(dbs.iter().flat_map(|d| d.impostor()).collect()),
            &IMPOSTOR_QS,
        ),
    }
}

/// A synthetic stand-in for an FVC set: `databases` × `fingers` distinct synthetic fingers
/// × `impressions` impressions each, generated by [`crate::synth`] (master fingers of
/// distinct persons, impressions as ISO records parsed back), labelled like FVC templates so
/// the same protocol applies.
pub fn synthetic_fvc_like(
    seed: u64,
    databases: usize,
    fingers: usize,
    impressions: usize,
) -> Vec<FvcTemplate> {
    use crate::synth::PopulationSpec;
    let spec = PopulationSpec {
        seed,
        subjects: databases * fingers,
        duplicate_rate: 0.0,
    };
    let mut out = Vec::new();
    for d in 0..databases {
        for f in 0..fingers {
            let person = (d * fingers + f) as u64;
            let position = (f % 10) as u8 + 1;
            let master = spec.master(person, position);
            for k in 0..impressions {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    seed ^ (person << 16) ^ (k as u64) ^ 0x5EED_0000_0000,
                );
                let rec = master.impression(&mut rng, position);
                let bytes = rec.to_bytes().expect("synthetic record encodes");
                let rec = crate::iso19794_2::parse(&bytes).expect("synthetic record parses");
                out.push(FvcTemplate::from_record(
                    format!("SYN{}", d + 1),
                    101 + f as u32,
                    1 + k as u32,
                    &rec,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_cdf_matches_closed_forms() {
        // n = 3, p = 0.5: 1/8, 4/8, 7/8, 1.
        for (k, want) in [(0, 0.125), (1, 0.5), (2, 0.875), (3, 1.0)] {
            assert!((binomial_cdf(k, 3, 0.5) - want).abs() < 1e-12, "{k}");
        }
        // P(X = 0) = (1 − p)^n for a large n and a small p.
        let p0 = binomial_cdf(0, 23_040, 1e-3);
        assert!((p0 - (1.0f64 - 1e-3).powi(23_040)).abs() < 1e-15, "{p0}");
        // Poisson limit: n = 10⁶, p = 5·10⁻⁶ (mean 5): P(X ≤ 5) ≈ 0.61596.
        assert!((binomial_cdf(5, 1_000_000, 5e-6) - 0.615_96).abs() < 1e-4);
    }

    #[test]
    fn clopper_pearson_matches_published_values() {
        // 5 of 10 (R: binom.test(5, 10)$conf.int = 0.1870860 0.8129140).
        let (lo, hi) = clopper_pearson(5, 10, 0.95);
        assert!(
            (lo - 0.187_086).abs() < 1e-5 && (hi - 0.812_914).abs() < 1e-5,
            "{lo} {hi}"
        );
        // 0 events: [0, 1 − (α/2)^(1/n)] (the "rule of three" region).
        let (lo, hi) = clopper_pearson(0, 5760, 0.95);
        assert_eq!(lo, 0.0);
        assert!(
            (hi - (1.0 - 0.025f64.powf(1.0 / 5760.0))).abs() < 1e-9,
            "{hi}"
        );
        assert!((hi * 5760.0 - 3.69).abs() < 0.01, "{hi}");
        // n events: [(α/2)^(1/n), 1].
        let (lo, hi) = clopper_pearson(20, 20, 0.95);
        assert_eq!(hi, 1.0);
        assert!((lo - 0.025f64.powf(1.0 / 20.0)).abs() < 1e-9);
        // 6 of 5,760 (≈ an FMR of 10⁻³): the interval spans a factor ~6 around 1.04·10⁻³.
        let (lo, hi) = clopper_pearson(6, 5760, 0.95);
        assert!(lo < 6.0 / 5760.0 && hi > 6.0 / 5760.0);
        assert!(
            (lo * 5760.0 - 2.202).abs() < 0.01 && (hi * 5760.0 - 13.06).abs() < 0.05,
            "{lo} {hi}"
        );
    }

    fn toy_db(name: &str, fingers: u32, impressions: u32, seed: u64) -> DbScores {
        // Genuine scores 0.5 + noise, impostor scores uniform on [0, 0.1).
        let labels: Vec<(u32, u32)> = (0..fingers)
            .flat_map(|f| (0..impressions).map(move |k| (101 + f, 1 + k)))
            .collect();
        let n = labels.len();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let matrix = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                if i == j {
                    0.0
                } else if labels[i].0 == labels[j].0 {
                    0.5 + rng.random_range(0.0..0.1)
                } else {
                    rng.random_range(0.0..0.1)
                }
            })
            .collect();
        DbScores {
            name: name.to_owned(),
            labels,
            matrix,
            details: Vec::new(),
        }
    }

    #[test]
    fn pairs_follow_the_fvc_protocol() {
        let db = toy_db("DB1_B", 10, 8, 1);
        // 10 fingers × 8 impressions: 80 × 7 genuine, 80 × 72 impostor ordered pairs.
        assert_eq!(db.genuine().len(), 560);
        assert_eq!(db.impostor().len(), 5760);
        assert!(db.genuine().iter().all(|&s| s >= 0.5));
        assert!(db.impostor().iter().all(|&s| s < 0.1));
        let all = split_accuracy(std::slice::from_ref(&db), &[0]);
        assert_eq!((all.eer, all.fnmr_at_fmr_1e3), (0.0, 0.0));
    }

    #[test]
    fn split_halves_and_degrades_with_few_databases() {
        assert_eq!(halves(4), (vec![0, 1], vec![2, 3]));
        assert_eq!(halves(3), (vec![0], vec![1, 2]));
        assert_eq!(halves(2), (vec![0], vec![1]));
        assert_eq!(halves(1), (vec![0], vec![]));
        assert_eq!(halves(0), (vec![], vec![]));
        let dbs: Vec<DbScores> = (0..4)
            .map(|k| toy_db(&format!("DB{}", k + 1), 5, 4, k))
            .collect();
        let test = split_accuracy(&dbs, &halves(4).1);
        assert_eq!(test.databases, vec!["DB3", "DB4"]);
        assert_eq!(test.genuine, 2 * 20 * 3);
        assert_eq!(test.impostor, 2 * 20 * 16);
        // One database: no rotation, no fusion check, but accuracy still computes.
        assert!(cross_validate(&dbs[..1], TailSpec::DEFAULT, &[1e-3]).is_empty());
        assert!(fusion_check(&dbs[..1], 2, 100, &[1e-3], 1).is_empty());
        assert_eq!(split_accuracy(&dbs[..1], &[0]).genuine, 60);
    }

    #[test]
    fn rotation_on_identically_distributed_databases_is_calibrated() {
        // Four databases with the same impostor distribution: thresholds fitted on three
        // should give about the target FMR on the fourth at 1 %, and pooling adds the counts.
        let dbs: Vec<DbScores> = (0..4)
            .map(|k| toy_db(&format!("DB{}", k + 1), 10, 8, 10 + k))
            .collect();
        let rot = cross_validate(&dbs, TailSpec::DEFAULT, &[1e-2, 1e-3]);
        assert_eq!(rot.len(), 4);
        for r in &rot {
            assert_eq!(r.train_impostors, 3 * 5760);
            let l = &r.levels[0];
            assert_eq!(l.n, 5760);
            assert!((l.predicted / 1e-2 - 1.0).abs() < 1e-3, "{l:?}");
            assert!(l.ci.0 <= l.measured() && l.measured() <= l.ci.1);
            // 57.6 expected: a generous band.
            assert!((25..=100).contains(&l.count), "{l:?}");
        }
        let pooled = pooled(&rot);
        assert_eq!(pooled[0].n, 4 * 5760);
        assert_eq!(
            pooled[0].count,
            rot.iter().map(|r| r.levels[0].count).sum::<u64>()
        );
        assert!((pooled[0].expected() - 4.0 * 57.6).abs() < 0.5);
        // Deviance is zero for a perfect count and grows with the miss.
        let mut exact = pooled[0].clone();
        exact.count = exact.expected().round() as u64;
        let mut off = exact.clone();
        off.count *= 3;
        assert!(poisson_deviance(std::slice::from_ref(&exact)) < 0.01);
        assert!(poisson_deviance(&[off]) > 50.0);
    }

    #[test]
    fn fusion_check_draws_impostor_pseudo_persons() {
        let dbs: Vec<DbScores> = (0..2)
            .map(|k| toy_db(&format!("DB{}", k + 1), 10, 8, 20 + k))
            .collect();
        let checks = fusion_check(&dbs, 4, 2000, &[0.5, 1e-3], 7);
        assert_eq!(checks.len(), 2);
        for c in &checks {
            assert_eq!(c.fingers, 4);
            // Fused FMR ≤ 0.5 for roughly half of the impostor comparisons (uniform p-values
            // combined by Fisher's method stay uniform); genuine-level scores never occur.
            let half = c.levels[0].measured();
            assert!((0.4..0.6).contains(&half), "{half}");
            assert!(c.levels[1].count < 20, "{c:?}");
        }
        // Ten fingers of a ten-finger database: every position still compares two different
        // fingers; a five-finger database cannot hold a six-finger pseudo person.
        assert_eq!(fusion_check(&dbs, 10, 10, &[1e-3], 7).len(), 2);
        let small: Vec<DbScores> = (0..2).map(|k| toy_db("DBx", 5, 4, k)).collect();
        assert!(fusion_check(&small, 6, 10, &[1e-3], 7).is_empty());
    }

    #[test]
    fn sample_distinct_gives_distinct_indices() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..100 {
            let mut v = sample_distinct(&mut rng, 10, 10);
            v.sort_unstable();
            assert_eq!(v, (0..10).collect::<Vec<_>>());
        }
    }
}
