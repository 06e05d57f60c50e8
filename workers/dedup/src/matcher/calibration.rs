//! Score calibration (score → false match rate) and ten-print fusion.
//!
//! **Calibration.** A raw comparator score means nothing to an adjudicator; a false match
//! rate does. [`Calibration::fit`] takes impostor scores (comparisons of different fingers)
//! and estimates `FMR(s) = P(impostor score ≥ s)`: the empirical survival function in the
//! body, and above the 99th percentile an exponential tail fitted by maximum likelihood to the
//! top 1 % (so scores beyond the largest observed impostor still get a finite, decreasing
//! FMR instead of 0). [`Calibration::synthetic`] is the default used by the gallery: it is
//! fitted once per process on ~15,000 impostor comparisons between impressions of distinct
//! synthetic master fingers (fixed seed, see [`crate::synth`]). Synthetic impostors are an
//! approximation of real ones, and a measurably kind one: on the FVC2002 templates real
//! impostor scores run about twice as high as synthetic ones at every quantile (99th
//! percentile 0.023 against 0.012), so at the score where the real FMR is 10⁻³ this
//! calibration predicts about 10⁻⁶. The benchmark reports that check on every run. For
//! production, fit the calibration on real impostor comparisons (e.g. a sample of the
//! enrolled gallery compared across different persons' fingers) with [`Calibration::fit`] and
//! pass it to [`super::Gallery::with_calibration`]; rankings do not depend on it, only the
//! FMR/FPIR reading of the scores does.
//!
//! **Fusion.** Each finger's FMR is a p-value under the impostor hypothesis. The fingers of a
//! ten-print are combined with Fisher's method: `X = −2 Σ ln pᵢ` follows χ² with 2k degrees
//! of freedom for k independent impostor fingers, whose survival function has the closed form
//! `e^{−X/2} Σ_{i<k} (X/2)^i / i!`. The fused score is `−log10` of that combined FMR. Fingers
//! missing on either side simply do not take part (k shrinks), so an amputee is not penalised
//! as a mismatch. Fingers of one person are not truly independent and tails are extrapolated,
//! so fused FMRs are best read as a ranking score with a sensible scale; thresholds for a
//! target FPIR should be checked on data (the benchmark does).

use std::sync::OnceLock;

use rand::SeedableRng;

use super::compare::compare;
use super::template::{Finger, FingerTemplate};
use crate::synth::PopulationSpec;

/// Per-finger FMRs are clamped to this floor so a single finger cannot dominate the fusion.
pub const FMR_FLOOR: f64 = 1e-9;

/// Impostor-score model mapping a comparator score to a false match rate.
#[derive(Clone)]
pub struct Calibration {
    sorted: Vec<f32>,
    tail_start: f32,
    tail_p: f64,
    tail_scale: f64,
}

impl std::fmt::Debug for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calibration")
            .field("impostor_scores", &self.sorted.len())
            .field("tail_start", &self.tail_start)
            .field("tail_p", &self.tail_p)
            .field("tail_scale", &self.tail_scale)
            .finish()
    }
}

impl Calibration {
    /// Fits the model to impostor scores. Needs at least 100 scores.
    pub fn fit(impostor_scores: &[f32]) -> Self {
        assert!(
            impostor_scores.len() >= 100,
            "too few impostor scores to calibrate"
        );
        let mut sorted = impostor_scores.to_vec();
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len();
        let k = (n / 100).max(10);
        let tail_start = sorted[n - k];
        let tail: Vec<f64> = sorted[n - k..]
            .iter()
            .map(|&s| f64::from(s - tail_start))
            .collect();
        let tail_scale = (tail.iter().sum::<f64>() / k as f64).max(1e-4);
        Calibration {
            tail_p: k as f64 / n as f64,
            sorted,
            tail_start,
            tail_scale,
        }
    }

    /// Estimated probability that an impostor comparison scores at least `score`.
    pub fn fmr(&self, score: f32) -> f64 {
        if score >= self.tail_start {
            let p = self.tail_p * (-f64::from(score - self.tail_start) / self.tail_scale).exp();
            return p.max(FMR_FLOOR);
        }
        let n = self.sorted.len();
        let below = self.sorted.partition_point(|&s| s < score);
        ((n - below) as f64 / n as f64).max(FMR_FLOOR)
    }

    /// The lowest score whose estimated FMR is at most `fmr`.
    pub fn threshold_for_fmr(&self, fmr: f64) -> f32 {
        if fmr >= self.tail_p {
            let n = self.sorted.len();
            let idx = ((1.0 - fmr) * n as f64).ceil() as usize;
            return self.sorted[idx.min(n - 1)];
        }
        self.tail_start + (self.tail_scale * (self.tail_p / fmr).ln()) as f32
    }

    /// The process-wide default, fitted on synthetic impostors (see the module docs).
    pub fn synthetic() -> &'static Calibration {
        static CAL: OnceLock<Calibration> = OnceLock::new();
        CAL.get_or_init(|| Calibration::fit(&synthetic_impostor_scores(0xCA11_B8A7E, 124)))
    }
}

/// Impostor scores between one impression each of `fingers` distinct synthetic fingers
/// (all ordered pairs).
pub fn synthetic_impostor_scores(seed: u64, fingers: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let spec = PopulationSpec {
        seed,
        subjects: fingers,
        duplicate_rate: 0.0,
    };
    let templates: Vec<FingerTemplate> = (0..fingers)
        .into_par_iter()
        .map(|i| {
            let master = spec.master(i as u64, (i % 10) as u8 + 1);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ i as u64);
            let rec = master.impression(&mut rng, (i % 10) as u8 + 1);
            FingerTemplate::new(&Finger::from_view(&rec, &rec.views[0]))
        })
        .collect();
    (0..fingers)
        .into_par_iter()
        .flat_map_iter(|i| {
            let t = &templates;
            (0..fingers)
                .filter(move |&j| j != i)
                .map(move |j| compare(&t[i], &t[j]))
        })
        .collect()
}

/// Fused ten-print score with the per-finger evidence kept for adjudication.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedScore {
    /// `−log10` of the fused false match rate; higher is stronger evidence of a match.
    pub score: f64,
    /// Fused false match rate (Fisher's method over the compared fingers).
    pub fmr: f64,
    /// Raw comparator score per finger position 1..=10 (`None`: not compared).
    pub fingers: [Option<f32>; 10],
}

/// Fuses per-finger comparator scores (see the module docs).
pub fn fuse(fingers: [Option<f32>; 10], calibration: &Calibration) -> FusedScore {
    let mut x = 0.0f64;
    let mut k = 0;
    for s in fingers.iter().flatten() {
        x += -2.0 * calibration.fmr(*s).ln();
        k += 1;
    }
    if k == 0 {
        return FusedScore {
            score: 0.0,
            fmr: 1.0,
            fingers,
        };
    }
    // Survival function of χ²(2k) at x, computed in log space to avoid underflow.
    let half = x / 2.0;
    let mut term = 1.0f64;
    let mut sum = 1.0f64;
    for i in 1..k {
        term *= half / i as f64;
        sum += term;
    }
    let log_p = -half + sum.ln();
    let fmr = log_p.exp().min(1.0);
    FusedScore {
        score: (-log_p / std::f64::consts::LN_10).max(0.0),
        fmr,
        fingers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Calibration {
        // Impostor scores 0.000, 0.001, … 0.999 (uniform).
        Calibration::fit(&(0..1000).map(|i| i as f32 / 1000.0).collect::<Vec<_>>())
    }

    #[test]
    fn fmr_is_the_impostor_survival_function_with_a_decreasing_tail() {
        let c = toy();
        assert!((c.fmr(0.5) - 0.5).abs() < 0.01);
        assert!((c.fmr(0.9) - 0.1).abs() < 0.01);
        let (a, b, d) = (c.fmr(0.995), c.fmr(1.05), c.fmr(1.5));
        assert!(a > b && b > d && d >= FMR_FLOOR, "{a} {b} {d}");
        for target in [0.1, 0.01, 1e-4] {
            let t = c.threshold_for_fmr(target);
            assert!(
                (c.fmr(t) / target - 1.0).abs() < 0.2,
                "{target}: {}",
                c.fmr(t)
            );
        }
    }

    #[test]
    fn fisher_fusion() {
        let c = toy();
        let none = fuse([None; 10], &c);
        assert_eq!((none.fmr, none.score), (1.0, 0.0));
        // One finger: the fused FMR is that finger's FMR.
        let mut one = [None; 10];
        one[3] = Some(0.9);
        assert!((fuse(one, &c).fmr - c.fmr(0.9)).abs() < 1e-9);
        // Ten unremarkable fingers stay unremarkable; ten strong ones are overwhelming.
        let weak = fuse([Some(0.5); 10], &c);
        let strong = fuse([Some(1.2); 10], &c);
        assert!(weak.fmr > 0.3, "{weak:?}");
        assert!(strong.score > 30.0, "{strong:?}");
    }

    #[test]
    fn synthetic_calibration_orders_fvc_like_scores() {
        let c = Calibration::synthetic();
        assert!(c.fmr(0.001) > 0.5);
        assert!(c.fmr(0.05) < 1e-3);
        assert!(c.fmr(0.3) < c.fmr(0.05));
    }
}
