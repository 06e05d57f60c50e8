//! Benchmarks of the dedup matcher, printed by `cardpipe bench dedup` and the example
//! `bench_dedup` (`cargo run --release -p cardpipe-biometrics --example bench_dedup -- --help`); the criterion
//! benches reuse [`build_gallery`] and [`load_fvc`].
//!
//! [`run`] measures, in order:
//!
//! 1. **Real-template figures** ([`fvc_report`], any directory of `DB*/NNN_K.iso`, FVC2002
//!    by default) with exactly the protocol of `shared/data/README.md`: every ordered pair of
//!    templates within each database (FVC2002: 2,240 genuine and 23,040 impostor
//!    comparisons), one threshold across the databases of a set: EER and FNMR at FMR 0.1 % and
//!    0.01 % over all databases and per database; the held-out split (score normalisation
//!    tuned on one half of the databases, tested on the other, both ways); the
//!    leave-one-database-out calibration check, tail-model comparison and fusion check; the
//!    synthetic population beside the real one ([`crate::evaluation`] computes them all).
//!    The comparator's normalisation was tuned on FVC2002 DB1–2 only, its other constants
//!    predate that split (see [`crate::matcher::compare`]); the shipped calibration is fitted
//!    on all four databases' impostor scores ([`fit_calibration_text`]).
//! 2. **Precise comparator throughput** on one core over the same comparisons (templates
//!    expanded beforehand, as for a prepared probe), and the 1:N variant that also expands the
//!    reference template from compact storage for every comparison.
//! 3. **Candidate stage**: 768-bit codes scanned per second on one core with a batch of
//!    probes per pass, and the share of single-core streaming memory bandwidth
//!    (measured with a plain sequential read) that the gallery traffic represents.
//! 4. **Synthetic 1:N**: galleries of 10k and 100k generated subjects (1M on request),
//!    built through the production enrolment path ([`build_gallery`]): build time; memory
//!    per subject by the gallery's own accounting and by process RSS growth, and peak RSS;
//!    single-probe latency (mean, p50, p95) and batched throughput; candidate-stage recall at
//!    the configured shortlist and at [`RECALL_DEPTHS`]; rank-1; FNIR at FPIR 0.1 % from
//!    mated and non-mated searches.
//!
//! Per-core figures run on the calling thread and divide by that thread's CPU time (so a
//! machine shared with other work does not deflate them); latency figures are wall-clock
//! times using the rayon pool (all cores) and do suffer from sharing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::evaluation::{
    DbScores, FusionCheck, LevelCheck, PopulationStats, Quantiles, RotationCheck, SplitAccuracy,
    TailComparison, compare_tails, cross_validate, fusion_check, halves, pooled, population_stats,
    score_databases, split_accuracy, synthetic_fvc_like, tune_normalisation,
};
use crate::iso19794_2;
use crate::matcher::calibration::{TailModel, TailSpec};
use crate::matcher::{
    Calibration, Finger, FingerTemplate, Gallery, IdentifyOptions, MatchDetail, Normalisation,
    PreparedSubject, Probe, TenPrint, compare_detail,
};
use crate::synth::PopulationSpec;

/// CPU time consumed by the calling thread, in seconds. Per-core rates divide by this rather
/// than wall time so they stay meaningful on a machine shared with other work.
pub fn thread_cpu_secs() -> Option<f64> {
    Some(cardpipe_common::cpu::thread_cpu_seconds())
}

/// Measures a closure run on the calling thread: (wall seconds, CPU seconds or wall if unknown).
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let cpu0 = thread_cpu_secs();
    let start = Instant::now();
    let out = f();
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, thread_cpu_secs()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall,
    };
    (out, wall, cpu)
}

/// One FVC template: database name, finger number, impression number, finger, and the
/// qualities the record reports (for the synthetic-versus-real comparison).
#[derive(Debug, Clone)]
pub struct FvcTemplate {
    pub database: String,
    pub finger: u32,
    pub impression: u32,
    pub data: Finger,
    /// Finger (view) quality of the record, 0–100.
    pub finger_quality: u8,
    /// Quality of each minutia, 0–100 (0: not reported).
    pub minutia_quality: Vec<u8>,
}

impl FvcTemplate {
    /// From the first view of a parsed record.
    pub fn from_record(
        database: String,
        finger: u32,
        impression: u32,
        rec: &iso19794_2::FingerprintRecord,
    ) -> Self {
        let view = &rec.views[0];
        FvcTemplate {
            database,
            finger,
            impression,
            data: Finger::from_view(rec, view),
            finger_quality: view.quality,
            minutia_quality: view.minutiae.iter().map(|m| m.quality).collect(),
        }
    }
}

/// Errors of the benchmark data loaders.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("FVC data directory {0} not found or unreadable: {1}")]
    Data(PathBuf, std::io::Error),
    #[error("FVC template {0} refused: {1}")]
    Template(PathBuf, iso19794_2::IsoError),
    #[error("no FVC templates found under {0}")]
    Empty(PathBuf),
}

/// Loads every `NNN_K.iso` under the database subdirectories of `dir`.
pub fn load_fvc(dir: &Path) -> Result<Vec<FvcTemplate>, BenchError> {
    let mut out = Vec::new();
    let mut dbs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| BenchError::Data(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dbs.sort();
    for db in dbs {
        let name = db
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&db)
            .map_err(|e| BenchError::Data(db.clone(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "iso"))
            .collect();
        files.sort();
        for f in files {
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((a, b)) = stem.split_once('_') else {
                continue;
            };
            let (Ok(finger), Ok(impression)) = (a.parse(), b.parse()) else {
                continue;
            };
            let bytes = std::fs::read(&f).map_err(|e| BenchError::Data(f.clone(), e))?;
            let rec = iso19794_2::parse(&bytes).map_err(|e| BenchError::Template(f.clone(), e))?;
            if rec.views.is_empty() {
                continue;
            }
            out.push(FvcTemplate::from_record(
                name.clone(),
                finger,
                impression,
                &rec,
            ));
        }
    }
    if out.is_empty() {
        return Err(BenchError::Empty(dir.to_path_buf()));
    }
    Ok(out)
}

/// Scores of the FVC protocol: all ordered pairs within each database.
pub fn fvc_scores(templates: &[FvcTemplate]) -> (Vec<MatchDetail>, Vec<MatchDetail>) {
    let prepared: Vec<FingerTemplate> = templates
        .iter()
        .map(|t| FingerTemplate::new(&t.data))
        .collect();
    let mut genuine = Vec::new();
    let mut impostor = Vec::new();
    for (i, a) in templates.iter().enumerate() {
        for (j, b) in templates.iter().enumerate() {
            if i == j || a.database != b.database {
                continue;
            }
            let d = compare_detail(&prepared[i], &prepared[j]);
            if a.finger == b.finger {
                genuine.push(d)
            } else {
                impostor.push(d)
            }
        }
    }
    (genuine, impostor)
}

/// Equal error rate and FNMR at given FMRs, from raw scores (higher = more similar).
pub fn error_rates(genuine: &[f32], impostor: &[f32], fmr_points: &[f64]) -> (f64, Vec<f64>) {
    let mut g = genuine.to_vec();
    let mut im = impostor.to_vec();
    g.sort_by(f32::total_cmp);
    im.sort_by(f32::total_cmp);
    let fnmr_at = |t: f32| g.partition_point(|&s| s < t) as f64 / g.len() as f64;
    let fmr_at = |t: f32| (im.len() - im.partition_point(|&s| s < t)) as f64 / im.len() as f64;
    let mut thresholds: Vec<f32> = g.iter().chain(im.iter()).copied().collect();
    thresholds.sort_by(f32::total_cmp);
    thresholds.dedup();
    let mut eer = 1.0;
    let mut best_gap = f64::INFINITY;
    for &t in &thresholds {
        let (a, b) = (fmr_at(t), fnmr_at(t));
        if (a - b).abs() < best_gap {
            best_gap = (a - b).abs();
            eer = (a + b) / 2.0;
        }
    }
    let fnmrs = fmr_points
        .iter()
        .map(|&p| {
            let allowed = (p * im.len() as f64).floor() as usize;
            if allowed >= im.len() {
                return 0.0;
            }
            let bar = im[im.len() - 1 - allowed];
            g.partition_point(|&s| s <= bar) as f64 / g.len() as f64
        })
        .collect();
    (eer, fnmrs)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Directory holding `DB1_B` … `DB4_B` of ISO templates.
    pub fvc_dir: PathBuf,
    /// Synthetic gallery sizes (subjects).
    pub gallery_sizes: Vec<usize>,
    /// Mated searches per gallery size (fresh impressions of enrolled subjects).
    pub mated_searches: usize,
    /// Non-mated searches per gallery size (subjects never enrolled).
    pub nonmated_searches: usize,
    /// Probes per candidate-stage pass in the throughput measurement.
    pub probes_per_pass: usize,
    /// Single-probe searches timed one after the other per gallery size (latency mean, p50,
    /// p95); they are the first mated probes, so at most `mated_searches`.
    pub single_searches: usize,
    pub search: IdentifyOptions,
    pub seed: u64,
}

impl BenchOptions {
    /// Defaults; `with_million` adds the 1M-subject gallery (peak RSS ≈ 2.5 GiB; its build
    /// takes tens of minutes on a 2-core machine).
    pub fn new(with_million: bool) -> Self {
        let mut gallery_sizes = vec![10_000, 100_000];
        if with_million {
            gallery_sizes.push(1_000_000);
        }
        BenchOptions {
            fvc_dir: default_shared_data().join("fvc2002-iso"),
            gallery_sizes,
            mated_searches: 300,
            nonmated_searches: 1000,
            probes_per_pass: 16,
            single_searches: 50,
            search: IdentifyOptions::default(),
            seed: 2026,
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self::new(false)
    }
}

/// `$CARDPIPE_SHARED_DATA`, else `../shared/data` from the working directory (the repository
/// root), else the location relative to this crate's sources.
pub fn default_shared_data() -> PathBuf {
    if let Some(p) = std::env::var_os("CARDPIPE_SHARED_DATA") {
        return PathBuf::from(p);
    }
    let cwd = PathBuf::from("../shared/data");
    if cwd.is_dir() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// Accuracy of one tuning direction: constants tuned on one half of the databases, tested on
/// the other half.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitRow {
    /// The normalisation the tuning procedure picks on `tune`.
    pub tuned: Normalisation,
    /// Its accuracy on the tuning databases and on the held-out ones.
    pub tune: SplitAccuracy,
    pub test: SplitAccuracy,
    /// The held-out databases scored with the comparator as it was before issue 13.
    pub before_test: SplitAccuracy,
}

/// FVC accuracy, calibration checks and comparator throughput.
#[derive(Debug, Clone, PartialEq)]
pub struct FvcReport {
    /// All databases, one threshold (the `shared/data/README.md` protocol), shipped
    /// comparator.
    pub all: SplitAccuracy,
    /// Each database on its own, shipped comparator.
    pub per_database: Vec<SplitAccuracy>,
    /// Tune on the first half of the databases, test on the second, and the other way
    /// round (empty with fewer than two databases).
    pub splits: Vec<SplitRow>,
    /// Leave-one-database-out check of the shipped calibration procedure at FMR 10⁻³ and
    /// 10⁻⁴, and the rotations pooled.
    pub calibration: Vec<RotationCheck>,
    pub calibration_pooled: Vec<LevelCheck>,
    /// Held-out error of candidate tail models.
    pub tails: Vec<TailComparison>,
    /// Fused FMR of pseudo persons of 2 and of 10 fingers per held-out database.
    pub fusion: Vec<FusionCheck>,
    /// FMR the shipped calibration ([`Calibration::fvc2002`]) and the synthetic one predict
    /// at the score where the measured FMR over all databases is 0.1 %.
    pub shipped_fmr_at_1e3: f64,
    pub synthetic_fmr_at_1e3: f64,
    /// Templates and scores of these databases beside a synthetic set of the same shape.
    pub real: PopulationStats,
    pub synthetic: PopulationStats,
    pub comparisons_per_sec_core: f64,
    pub comparisons_per_sec_core_with_expansion: f64,
}

/// Target FMRs of the calibration check.
pub const CALIBRATION_TARGETS: [f64; 2] = [1e-3, 1e-4];
/// Tail models compared by held-out error.
pub const TAIL_CANDIDATES: [TailSpec; 6] = [
    TailSpec {
        model: TailModel::Exponential,
        fraction: 0.01,
    },
    TailSpec {
        model: TailModel::Exponential,
        fraction: 0.05,
    },
    TailSpec {
        model: TailModel::Exponential,
        fraction: 0.10,
    },
    TailSpec {
        model: TailModel::Pareto,
        fraction: 0.01,
    },
    TailSpec {
        model: TailModel::Pareto,
        fraction: 0.05,
    },
    TailSpec {
        model: TailModel::Pareto,
        fraction: 0.10,
    },
];
/// Pseudo impostor comparisons drawn per held-out database and finger count.
pub const FUSION_SAMPLES: u64 = 200_000;

/// The text of the shipped calibration file fitted on the databases under `dir` (all
/// ordered impostor pairs within each database, [`TailSpec::DEFAULT`]); what
/// `--fit-calibration` writes and what `tests/calibration.rs` compares with the committed
/// file.
pub fn fit_calibration_text(dir: &Path) -> Result<String, BenchError> {
    let templates = load_fvc(dir)?;
    let dbs = score_databases(&templates);
    let impostors: Vec<f32> = dbs.iter().flat_map(|d| d.impostor()).collect();
    let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
    let cal = Calibration::fit_with(&impostors, TailSpec::DEFAULT);
    let comment = [
        "cardpipe-dedup shipped score calibration (impostor score -> FMR). Generated; do not edit."
            .to_owned(),
        "Regenerate from the repository root: cargo run --release -p cardpipe -- bench dedup"
            .to_owned(),
        "  --fit-calibration libs/biometrics/src/matcher/calibration_fvc2002.txt --fvc-dir ../shared/data/fvc2002-iso"
            .to_owned(),
        format!(
            "Source: {}: {} ordered impostor pairs within each database (FVC protocol).",
            names.join(", "),
            impostors.len()
        ),
        format!(
            "Body: empirical survival at {} knots, log-linear between; tail above the last knot: {}.",
            cal.knot_count(),
            TailSpec::DEFAULT.label()
        ),
    ]
    .join("\n");
    Ok(cal.to_text(&comment))
}

/// Candidate-stage throughput.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanReport {
    pub codes_per_sec_core: f64,
    pub probes_per_pass: usize,
    pub code_bytes: usize,
    pub memory_bandwidth_gb_s: f64,
    /// Gallery bytes streamed per second (codes/s × bytes / probes per pass) over bandwidth.
    pub bandwidth_share: f64,
}

/// One synthetic gallery size.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryReport {
    pub subjects: usize,
    /// Wall time of [`build_gallery`] (generation, ISO round trip, preparation, appends).
    pub build_secs: f64,
    /// [`Gallery::memory_bytes`] over the number of subjects.
    pub bytes_per_subject: f64,
    /// Process RSS (`VmRSS`) just before the gallery is generated and once it is built;
    /// `None` where `/proc/self/status` does not exist (non-Linux).
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// Process peak RSS (`VmHWM`, since the process started) after this gallery's searches.
    pub peak_rss: Option<u64>,
    /// Single-probe searches timed, and their mean, median and 95th percentile wall time
    /// ([`Gallery::identify`], all threads), ms.
    pub singles: usize,
    pub single_probe_ms: f64,
    pub single_p50_ms: f64,
    pub single_p95_ms: f64,
    /// Wall time of the batched searches (64 probes per [`Gallery::identify_batch`]) over
    /// the number of searches, ms, and its inverse in searches per second.
    pub batched_probe_ms: f64,
    pub batched_searches_per_sec: f64,
    /// Share of mated searches whose mate is in the candidate-stage shortlist the searches
    /// used: [`IdentifyOptions::shortlist_for`] this gallery's size (`shortlist`).
    pub candidate_recall: f64,
    /// The shortlist depth of this gallery's searches (`search.shortlist` scaled to the
    /// gallery size, at least `search.min_shortlist`).
    pub shortlist: usize,
    /// The same at each of [`RECALL_DEPTHS`]: (depth, recall).
    pub recall_at: Vec<(usize, f64)>,
    pub rank1_identification: f64,
    pub fnir_at_fpir_1e3: f64,
    pub threshold_at_fpir_1e3: f64,
    /// The `[dedup] target_fpir = 0.001` threshold on the fused score for this gallery size
    /// (`−log10(0.001 / N)`, [`crate::matcher::min_score_for`]), the share of non-mated
    /// searches whose top candidate reaches it (the FPIR the configuration promises to keep
    /// at or below 0.1 %), and the share of mated searches whose mate stays below it.
    pub target_threshold: f64,
    pub fpir_at_target: f64,
    pub fnir_at_target: f64,
    pub mated: usize,
    pub nonmated: usize,
}

/// Everything [`run`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub fvc: FvcReport,
    pub scan: ScanReport,
    pub galleries: Vec<GalleryReport>,
    pub threads: usize,
    /// Candidate-stage shortlist at 1M subjects (`search.shortlist`; smaller galleries search
    /// [`IdentifyOptions::shortlist_for`] their size, [`GalleryReport::shortlist`]).
    pub shortlist: usize,
    /// Peak RSS of the process at the end of the run (`VmHWM`), if known.
    pub peak_rss: Option<u64>,
}

impl GalleryReport {
    /// RSS growth while the gallery was built, per subject (bytes), if RSS is known.
    pub fn rss_growth_per_subject(&self) -> Option<f64> {
        Some(self.rss_after?.saturating_sub(self.rss_before?) as f64 / self.subjects.max(1) as f64)
    }
}

/// FVC accuracy (protocol in the module docs), calibration checks, synthetic-versus-real
/// distributions and single-core comparator throughput.
pub fn fvc_report(dir: &Path) -> Result<FvcReport, BenchError> {
    let templates = load_fvc(dir)?;
    let ((g, i), _, secs) = timed(|| fvc_scores(&templates));
    let dbs = score_databases(&templates);
    let all: Vec<usize> = (0..dbs.len()).collect();
    let all = split_accuracy(&dbs, &all);
    let per_database = (0..dbs.len()).map(|k| split_accuracy(&dbs, &[k])).collect();
    let (first, second) = halves(dbs.len());
    let mut splits = Vec::new();
    if !second.is_empty() {
        let before: Vec<DbScores> = dbs
            .iter()
            .map(|d| d.rescored(&Normalisation::BEFORE_ISSUE_13))
            .collect();
        for (tune, test) in [(&first, &second), (&second, &first)] {
            let (tuned, tune_acc) = tune_normalisation(&dbs, tune);
            let rescored: Vec<DbScores> = dbs.iter().map(|d| d.rescored(&tuned)).collect();
            splits.push(SplitRow {
                tuned,
                tune: tune_acc,
                test: split_accuracy(&rescored, test),
                before_test: split_accuracy(&before, test),
            });
        }
    }
    let calibration = cross_validate(&dbs, TailSpec::DEFAULT, &CALIBRATION_TARGETS);
    let calibration_pooled = pooled(&calibration);
    let tails = compare_tails(&dbs, &TAIL_CANDIDATES, &CALIBRATION_TARGETS);
    let mut fusion = fusion_check(&dbs, 2, FUSION_SAMPLES, &CALIBRATION_TARGETS, 13);
    fusion.extend(fusion_check(
        &dbs,
        10,
        FUSION_SAMPLES,
        &CALIBRATION_TARGETS,
        13,
    ));
    let mut sorted: Vec<f32> = i.iter().map(|d| d.score).collect();
    sorted.sort_by(f32::total_cmp);
    let bar = sorted[sorted.len() - 1 - (sorted.len() as f64 * 0.001) as usize];
    let real = population_stats("FVC2002 (this directory)", &templates, &dbs);
    let syn_templates = synthetic_fvc_like(2026, dbs.len().max(1), 10, 8);
    let synthetic = population_stats(
        "synthetic (crate::synth)",
        &syn_templates,
        &score_databases(&syn_templates),
    );
    // 1:N style: the reference is expanded from compact storage for each comparison.
    let prepared: Vec<FingerTemplate> = templates
        .iter()
        .map(|t| FingerTemplate::new(&t.data))
        .collect();
    let ((n, sink), _, exp_secs) = timed(|| {
        let mut n = 0usize;
        let mut sink = 0f32;
        for (a, pa) in templates.iter().zip(&prepared).take(80) {
            for b in templates.iter().filter(|b| b.database == a.database) {
                sink += crate::matcher::compare(pa, &FingerTemplate::new(&b.data));
                n += 1;
            }
        }
        (n, sink)
    });
    let with_expansion = n as f64 / exp_secs;
    std::hint::black_box(sink);
    Ok(FvcReport {
        all,
        per_database,
        splits,
        calibration,
        calibration_pooled,
        tails,
        fusion,
        shipped_fmr_at_1e3: Calibration::fvc2002().fmr(bar),
        synthetic_fmr_at_1e3: Calibration::synthetic().fmr(bar),
        real,
        synthetic,
        comparisons_per_sec_core: (g.len() + i.len()) as f64 / secs,
        comparisons_per_sec_core_with_expansion: with_expansion,
    })
}

/// Single-core sequential read bandwidth in GB/s (sum of a 256 MiB buffer, best of 3).
pub fn memory_bandwidth() -> f64 {
    let words = 32 << 20;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let (acc, _, secs) = timed(|| {
            let mut acc = [0u64; 8];
            for c in buf.chunks_exact(8) {
                for k in 0..8 {
                    acc[k] = acc[k].wrapping_add(c[k]);
                }
            }
            acc
        });
        std::hint::black_box(acc);
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}

/// Subjects generated and prepared per parallel step of [`build_gallery`]: enough to keep
/// every core busy, small enough that the prepared chunk (≈ 0.7 KB of codes plus the blob
/// per subject, ≈ 45 MB) stays a small fraction of the gallery it is appended to.
pub const BUILD_CHUNK: usize = 20_000;

/// Generates subjects `range` of `spec` and prepares them for enrolment, on all cores:
/// ISO 19794-2 records → [`TenPrint::from_iso`] → [`PreparedSubject::new`] (cylinders and
/// candidate codes, compact blob). Returns (reference id, prepared subject) in index order.
fn generate_prepared<I>(spec: &PopulationSpec, subjects: I) -> Vec<(String, PreparedSubject)>
where
    I: rayon::iter::IntoParallelIterator<Item = usize>,
{
    use rayon::prelude::*;
    subjects
        .into_par_iter()
        .map(|i| {
            let s = spec.subject(i);
            let tp = TenPrint::from_iso(&s.templates).expect("generated records parse");
            (s.reference_id, PreparedSubject::new(&tp))
        })
        .collect()
}

/// Builds a gallery of `subjects` synthetic subjects (no planted duplicates inside it).
///
/// Every subject is generated in full (ten master fingers, ten impressions encoded as ISO
/// 19794-2 records and parsed back) and enrolled through the production path,
/// [`PreparedSubject::new`] then [`Gallery::insert_many`]. The per-subject work runs on all
/// cores, [`BUILD_CHUNK`] subjects at a time; the appends stay in index order, so the gallery
/// is identical to one built by calling [`Gallery::insert`] for each subject. Galleries of 200,000 subjects or more report progress
/// on stderr every 100,000 subjects.
pub fn build_gallery(seed: u64, subjects: usize) -> (Gallery, PopulationSpec) {
    let spec = PopulationSpec {
        seed,
        subjects,
        duplicate_rate: 0.0,
    };
    let mut gallery = Gallery::new();
    gallery.reserve(subjects);
    let began = Instant::now();
    let mut start = 0;
    while start < subjects {
        let end = (start + BUILD_CHUNK).min(subjects);
        gallery.insert_many(generate_prepared(&spec, start..end));
        if subjects >= 200_000 && (end / 100_000 > start / 100_000 || end == subjects) {
            eprintln!(
                "dedup bench:   {end}/{subjects} subjects enrolled ({:.0} s, RSS {})",
                began.elapsed().as_secs_f64(),
                gib(rss_bytes())
            );
        }
        start = end;
    }
    (gallery, spec)
}

/// Reads a `kB` field (e.g. `VmRSS:`) of a `/proc/<pid>/status` text, in bytes.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix(field))?;
    let mut parts = rest.split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

fn proc_self_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&status, field)
}

/// Resident set size of this process in bytes (`VmRSS`); `None` without `/proc` (non-Linux).
pub fn rss_bytes() -> Option<u64> {
    proc_self_status("VmRSS:")
}

/// Peak resident set size of this process in bytes (`VmHWM`, the high-water mark since it
/// started; what `/usr/bin/time -v` reports as maximum resident set size). `None` without
/// `/proc`.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_self_status("VmHWM:")
}

/// Bytes as GiB with two decimals, or `n/a`.
fn gib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".to_owned(),
        |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
    )
}

/// The `q` quantile (0 ≤ q ≤ 1) of unsorted samples by the nearest-rank method: the smallest
/// sample with at least a share `q` of the samples at or below it (q = 0.5 gives the lower
/// median of an even count). 0 for no samples.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Candidate-stage recall at each depth: the share of mated searches whose mate was at a
/// 0-based rank below the depth (`None` = not in the deepest shortlist computed).
pub fn recall_by_depth(mate_ranks: &[Option<usize>], depths: &[usize]) -> Vec<(usize, f64)> {
    depths
        .iter()
        .map(|&d| {
            let hits = mate_ranks
                .iter()
                .filter(|r| r.is_some_and(|r| r < d))
                .count();
            (d, hits as f64 / mate_ranks.len().max(1) as f64)
        })
        .collect()
}

/// FNIR at a given FPIR: the threshold is the top-candidate score of the non-mated searches
/// exceeded by at most a share `fpir` of them (the `floor(fpir × n) + 1`-th highest; 0 when
/// there are none); a mated search is missed if its mate scores at or below it (a mate
/// missing from the candidate list counts as score 0). Returns (FNIR, threshold).
pub fn fnir_at_fpir(mate_scores: &[f64], nonmated_top_scores: &[f64], fpir: f64) -> (f64, f64) {
    let mut non = nonmated_top_scores.to_vec();
    non.sort_by(f64::total_cmp);
    let allowed = (non.len() as f64 * fpir).floor() as usize;
    let threshold = non
        .get(non.len().saturating_sub(1 + allowed))
        .copied()
        .unwrap_or(0.0);
    let misses = mate_scores.iter().filter(|&&s| s <= threshold).count();
    (misses as f64 / mate_scores.len().max(1) as f64, threshold)
}

/// Candidate-stage throughput on one core.
pub fn scan_report(gallery: &Gallery, spec: &PopulationSpec, probes_per_pass: usize) -> ScanReport {
    let probes: Vec<Probe> = (0..probes_per_pass)
        .map(|k| Probe::new(&TenPrint::from_iso(&spec.impressions(k as u64, 77)).expect("parse")))
        .collect();
    let refs: Vec<&Probe> = probes.iter().collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let (out, _, secs) = timed(|| gallery.shortlist(&refs, 200, false));
        std::hint::black_box(out);
        best = best.max((gallery.len() * 10 * probes_per_pass) as f64 / secs);
    }
    let bw = memory_bandwidth();
    let code_bytes = crate::matcher::CODE_BITS as usize / 8;
    ScanReport {
        codes_per_sec_core: best,
        probes_per_pass,
        code_bytes,
        memory_bandwidth_gb_s: bw,
        bandwidth_share: best * code_bytes as f64 / probes_per_pass as f64 / (bw * 1e9),
    }
}

/// Shortlist depths at which candidate-stage recall is also reported.
pub const RECALL_DEPTHS: [usize; 6] = [50, 100, 200, 500, 1000, 2000];

/// How a gallery was built, measured by [`run`] around [`build_gallery`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildStats {
    pub secs: f64,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
}

/// The searches of a benchmark over a population of `population` enrolled subjects: mated
/// probes (fresh impressions, new capture session) of subjects spread evenly over the
/// population, and non-mated probes of subjects never enrolled. [`gallery_report`] and
/// [`shard_run`] search the same set, so single-gallery and sharded figures compare.
struct ProbeSet {
    mated: Vec<Probe>,
    nonmated: Vec<Probe>,
    /// Reference id of each mated probe's mate.
    mated_ids: Vec<String>,
}

impl ProbeSet {
    fn new(spec: &PopulationSpec, population: usize, opts: &BenchOptions) -> Self {
        use rayon::prelude::*;
        let mated_idx: Vec<usize> = (0..opts.mated_searches)
            .map(|k| k * population / opts.mated_searches.max(1))
            .collect();
        let probe = |records: Vec<Vec<u8>>| {
            Probe::new(&TenPrint::from_iso(&records).expect("generated records parse"))
        };
        ProbeSet {
            mated: mated_idx
                .par_iter()
                .map(|&i| probe(spec.impressions(spec.person_of(i), 9_000_000 + i as u64)))
                .collect(),
            nonmated: (0..opts.nonmated_searches)
                .into_par_iter()
                .map(|k| probe(spec.impressions((population + k) as u64, 1)))
                .collect(),
            mated_ids: mated_idx
                .iter()
                .map(|&i| spec.subject_reference_id(i))
                .collect(),
        }
    }
}

/// Accuracy and latency of 1:N search on a synthetic gallery.
///
/// Phases, in order: probes prepared (not timed); `single_searches` mated probes searched
/// one at a time with [`Gallery::identify`], each timed; all mated then all non-mated probes
/// searched in batches of 64 with [`Gallery::identify_batch`], only those calls timed; one
/// candidate-stage pass of the mated batches at the deepest of [`RECALL_DEPTHS`] (not timed)
/// gives the mate's candidate rank, hence recall at every depth. The shortlist order is
/// total (score, then slot), so the top `d` of the deep pass are the shortlist of depth `d`
/// up to exact score ties at its last place.
pub fn gallery_report(
    gallery: &Gallery,
    spec: &PopulationSpec,
    build: BuildStats,
    opts: &BenchOptions,
) -> GalleryReport {
    let n = gallery.len();
    let ProbeSet {
        mated,
        nonmated,
        mated_ids: wanted,
    } = ProbeSet::new(spec, n, opts);

    let singles = mated.len().min(opts.single_searches);
    let single_ms: Vec<f64> = mated[..singles]
        .iter()
        .map(|p| {
            let start = Instant::now();
            std::hint::black_box(gallery.identify(p, &opts.search, None));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();

    let mut batched_secs = 0f64;
    let mut rank1 = 0;
    let mut mate_scores = Vec::with_capacity(mated.len());
    for (chunk, want) in mated.chunks(64).zip(wanted.chunks(64)) {
        let refs: Vec<&Probe> = chunk.iter().collect();
        let start = Instant::now();
        let results = gallery.identify_batch(&refs, &opts.search);
        batched_secs += start.elapsed().as_secs_f64();
        for (r, want) in results.iter().zip(want) {
            if r.first().is_some_and(|c| &c.reference_id == want) {
                rank1 += 1;
            }
            mate_scores.push(
                r.iter()
                    .find(|c| &c.reference_id == want)
                    .map_or(0.0, |c| c.fused.score),
            );
        }
    }
    let mut non_scores = Vec::with_capacity(nonmated.len());
    for chunk in nonmated.chunks(64) {
        let refs: Vec<&Probe> = chunk.iter().collect();
        let start = Instant::now();
        let results = gallery.identify_batch(&refs, &opts.search);
        batched_secs += start.elapsed().as_secs_f64();
        non_scores.extend(
            results
                .iter()
                .map(|r| r.first().map_or(0.0, |c| c.fused.score)),
        );
    }
    let searches = (mated.len() + nonmated.len()).max(1);
    let batched_probe_ms = batched_secs * 1e3 / searches as f64;

    let depth = opts.search.shortlist_for(gallery.len());
    let deepest = RECALL_DEPTHS[RECALL_DEPTHS.len() - 1].max(depth);
    let mut mate_ranks: Vec<Option<usize>> = Vec::with_capacity(mated.len());
    for (chunk, want) in mated.chunks(64).zip(wanted.chunks(64)) {
        let refs: Vec<&Probe> = chunk.iter().collect();
        for (short, want) in gallery.shortlist(&refs, deepest, true).iter().zip(want) {
            mate_ranks.push(
                short
                    .iter()
                    .position(|&(_, slot)| gallery.reference_id(slot) == Some(want.as_str())),
            );
        }
    }
    let (fnir, threshold) = fnir_at_fpir(&mate_scores, &non_scores, 0.001);
    let target_threshold = crate::matcher::min_score_for(0.001, n);
    let fpir_at_target = non_scores
        .iter()
        .filter(|&&s| s >= target_threshold)
        .count() as f64
        / non_scores.len().max(1) as f64;
    let fnir_at_target = mate_scores
        .iter()
        .filter(|&&s| s < target_threshold)
        .count() as f64
        / mate_scores.len().max(1) as f64;
    GalleryReport {
        target_threshold,
        fpir_at_target,
        fnir_at_target,
        subjects: n,
        build_secs: build.secs,
        bytes_per_subject: gallery.memory_bytes() as f64 / n.max(1) as f64,
        rss_before: build.rss_before,
        rss_after: build.rss_after,
        peak_rss: peak_rss_bytes(),
        singles,
        single_probe_ms: single_ms.iter().sum::<f64>() / singles.max(1) as f64,
        single_p50_ms: percentile(&single_ms, 0.5),
        single_p95_ms: percentile(&single_ms, 0.95),
        batched_probe_ms,
        batched_searches_per_sec: searches as f64 / batched_secs.max(f64::MIN_POSITIVE),
        candidate_recall: recall_by_depth(&mate_ranks, &[depth])[0].1,
        shortlist: depth,
        recall_at: recall_by_depth(&mate_ranks, &RECALL_DEPTHS),
        rank1_identification: rank1 as f64 / mated.len().max(1) as f64,
        fnir_at_fpir_1e3: fnir,
        threshold_at_fpir_1e3: threshold,
        mated: mated.len(),
        nonmated: nonmated.len(),
    }
}

/// Runs everything (see the module docs). Progress goes to stderr. Each gallery is dropped
/// before the next is built, but its freed memory may be reused by the next one, so the RSS
/// growth of every gallery after the first in a process understates its footprint: measure
/// one size per process for clean RSS figures.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    eprintln!("dedup bench: FVC2002 accuracy and comparator throughput ...");
    let fvc = fvc_report(&opts.fvc_dir)?;
    let mut galleries = Vec::new();
    let mut scan = None;
    for &size in &opts.gallery_sizes {
        eprintln!("dedup bench: building a {size}-subject synthetic gallery ...");
        let rss_before = rss_bytes();
        let start = Instant::now();
        let (gallery, spec) = build_gallery(opts.seed, size);
        let build = BuildStats {
            secs: start.elapsed().as_secs_f64(),
            rss_before,
            rss_after: rss_bytes(),
        };
        eprintln!(
            "dedup bench: built in {:.1} s; gallery accounting {:.3} GiB; RSS {} -> {}",
            build.secs,
            gallery.memory_bytes() as f64 / (1u64 << 30) as f64,
            gib(build.rss_before),
            gib(build.rss_after)
        );
        if scan.is_none() && size >= 10_000 {
            eprintln!("dedup bench: candidate-stage throughput ...");
            scan = Some(scan_report(&gallery, &spec, opts.probes_per_pass));
        }
        eprintln!("dedup bench: searching the {size}-subject gallery ...");
        let report = gallery_report(&gallery, &spec, build, opts);
        eprintln!(
            "dedup bench: {size} subjects: p50 {:.1} ms, recall {:.2} %, FNIR {:.2} %",
            report.single_p50_ms,
            report.candidate_recall * 100.0,
            report.fnir_at_fpir_1e3 * 100.0
        );
        galleries.push(report);
    }
    let scan = match scan {
        Some(s) => s,
        None => {
            let (gallery, spec) = build_gallery(opts.seed, 10_000);
            scan_report(&gallery, &spec, opts.probes_per_pass)
        }
    };
    Ok(BenchReport {
        fvc,
        scan,
        galleries,
        threads: rayon::current_num_threads(),
        shortlist: opts.search.shortlist,
        peak_rss: peak_rss_bytes(),
    })
}

fn pct(x: f64) -> String {
    format!("{:.2} %", x * 100.0)
}

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".to_owned()
    } else {
        format!("{x:.2e}")
    }
}

fn accuracy_cells(a: &SplitAccuracy) -> String {
    format!(
        "{} | {} | {} | {} | {}/{}",
        a.databases.join("+"),
        pct(a.eer),
        pct(a.fnmr_at_fmr_1e3),
        pct(a.fnmr_at_fmr_1e4),
        a.genuine,
        a.impostor
    )
}

fn level_cells(l: &LevelCheck) -> String {
    format!(
        "{} | {:.5} | {} | {}/{} | {} | [{}, {}] | {:.2}",
        sci(l.target),
        l.threshold,
        sci(l.predicted),
        l.count,
        l.n,
        sci(l.measured()),
        sci(l.ci.0),
        sci(l.ci.1),
        l.measured() / l.predicted
    )
}

fn quantile_cells(q: &Quantiles, digits: usize) -> String {
    let mut out = String::new();
    for (_, v) in &q.at {
        out.push_str(&format!("{v:.digits$} | "));
    }
    out.push_str(&format!("{:.digits$} | {}", q.mean, q.n));
    out
}

impl fmt::Display for FvcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self;
        writeln!(
            f,
            "Real templates ({}): all ordered pairs within each database, one threshold across them",
            v.all.databases.join(", ")
        )?;
        writeln!(
            f,
            "({} genuine / {} impostor comparisons)",
            v.all.genuine, v.all.impostor
        )?;
        writeln!(
            f,
            "| matcher | EER | FNMR at FMR 0.1 % | FNMR at FMR 0.01 % | comparisons/s/core |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        writeln!(
            f,
            "| cardpipe-dedup | {} | {} | {} | {:.0} (1:N incl. expansion {:.0}) |",
            pct(v.all.eer),
            pct(v.all.fnmr_at_fmr_1e3),
            pct(v.all.fnmr_at_fmr_1e4),
            v.comparisons_per_sec_core,
            v.comparisons_per_sec_core_with_expansion
        )?;
        writeln!(
            f,
            "| SourceAFIS 3.18 (published, FVC2002 DB1-4_B) | 4.55 % | 9.42 % | 11.47 % | ≈ 10,600 |"
        )?;
        writeln!(
            f,
            "| openafis (published, FVC2002 DB1-4_B) | 10.13 % | 18.48 % | 23.21 % | ≈ 46,000 |"
        )?;
        writeln!(f)?;
        writeln!(f, "Per database (shipped comparator)")?;
        writeln!(
            f,
            "| databases | EER | FNMR at FMR 0.1 % | FNMR at FMR 0.01 % | genuine/impostor |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        for a in &v.per_database {
            writeln!(f, "| {} |", accuracy_cells(a))?;
        }
        writeln!(f)?;
        if v.splits.is_empty() {
            writeln!(
                f,
                "Held-out split: needs at least two databases (found {}).",
                v.all.databases.len()
            )?;
        } else {
            writeln!(
                f,
                "Held-out accuracy: the score normalisation tuned on one half of the databases \
                 (grid of Normalisation::grid, objective EER + FNMR@0.1 % + FNMR@0.01 %), tested on the other half"
            )?;
            writeln!(
                f,
                "(shipped constants: {:?}; tuned on FVC2002 DB1_B+DB2_B)",
                crate::matcher::NORMALISATION
            )?;
            writeln!(
                f,
                "| tuned on | chance sum / count offset | set | databases | EER | FNMR at FMR 0.1 % | FNMR at FMR 0.01 % | genuine/impostor |"
            )?;
            writeln!(f, "|---|---|---|---|---|---|---|---|")?;
            for r in &v.splits {
                let t = r.tune.databases.join("+");
                let c = format!("{} / {}", r.tuned.chance_sum, r.tuned.count_offset);
                writeln!(f, "| {t} | {c} | tuning | {} |", accuracy_cells(&r.tune))?;
                writeln!(
                    f,
                    "| {t} | {c} | **held out** | {} |",
                    accuracy_cells(&r.test)
                )?;
                writeln!(
                    f,
                    "| (before issue 13) | 0 / 0 | held out | {} |",
                    accuracy_cells(&r.before_test)
                )?;
            }
        }
        writeln!(f)?;
        if v.calibration.is_empty() {
            writeln!(
                f,
                "Calibration cross-validation: needs at least two databases (found {}).",
                v.all.databases.len()
            )?;
        } else {
            writeln!(
                f,
                "Calibration cross-validation ({}): fitted on the impostor scores of all databases but one, \
                 threshold where the fit predicts the target FMR, measured on the held-out database",
                TailSpec::DEFAULT.label()
            )?;
            writeln!(
                f,
                "| held out | target FMR | threshold | predicted FMR | held-out impostors ≥ threshold | measured FMR | 95 % CI (Clopper-Pearson) | measured / predicted |"
            )?;
            writeln!(f, "|---|---|---|---|---|---|---|---|")?;
            for r in &v.calibration {
                for l in &r.levels {
                    writeln!(f, "| {} | {} |", r.held_out, level_cells(l))?;
                }
            }
            for l in &v.calibration_pooled {
                writeln!(
                    f,
                    "| all rotations pooled | {} |",
                    level_cells(l).replacen(&format!("{:.5}", l.threshold), "per rotation", 1)
                )?;
            }
            writeln!(f)?;
            writeln!(
                f,
                "Tail models by held-out error (rotations pooled; observed/expected events at each target; Poisson deviance, lower is better)"
            )?;
            write!(f, "| tail model |")?;
            for t in CALIBRATION_TARGETS {
                write!(f, " FMR {} O/E |", sci(t))?;
            }
            writeln!(f, " deviance |")?;
            writeln!(f, "|---|{}---|", "---|".repeat(CALIBRATION_TARGETS.len()))?;
            for t in &v.tails {
                write!(f, "| {} |", t.spec.label())?;
                for l in &t.pooled {
                    write!(f, " {}/{:.1} |", l.count, l.expected())?;
                }
                writeln!(f, " {:.2} |", t.deviance)?;
            }
            writeln!(f)?;
            writeln!(
                f,
                "Ten-finger fusion (Fisher) on pseudo persons of distinct real fingers of the held-out database, \
                 per-finger calibration fitted without it ({FUSION_SAMPLES} random impostor comparisons each; the interval is Monte-Carlo only)"
            )?;
            writeln!(
                f,
                "| held out | fingers | target fused FMR | fused score threshold | predicted | comparisons with fused FMR ≤ target | measured | 95 % CI | measured / predicted |"
            )?;
            writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
            for c in &v.fusion {
                for l in &c.levels {
                    writeln!(f, "| {} | {} | {} |", c.held_out, c.fingers, level_cells(l))?;
                }
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "At the score where the measured FMR over all databases is 0.1 %: shipped calibration predicts {}, the synthetic one {}.",
            sci(v.shipped_fmr_at_1e3),
            sci(v.synthetic_fmr_at_1e3)
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Synthetic vs real, same protocol and shape ({} databases × 10 fingers × 8 impressions of synthetic fingers)",
            v.all.databases.len().max(1)
        )?;
        let qs = |q: &Quantiles| {
            q.at.iter()
                .map(|(p, _)| format!("p{}", p * 100.0))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        for (title, pick, digits) in [
            (
                "minutiae per finger",
                (|p: &PopulationStats| p.minutiae.clone()) as fn(&PopulationStats) -> Quantiles,
                0usize,
            ),
            ("minutia quality (0-100)", |p| p.minutia_quality.clone(), 0),
            ("finger quality (0-100)", |p| p.finger_quality.clone(), 0),
            ("genuine scores", |p| p.genuine.clone(), 4),
            ("impostor scores", |p| p.impostor.clone(), 4),
        ] {
            let (r, s) = (pick(&v.real), pick(&v.synthetic));
            writeln!(f, "| {title} | {} | mean | n |", qs(&r))?;
            writeln!(f, "|---|{}---|---|", "---|".repeat(r.at.len()))?;
            writeln!(f, "| {} | {} |", v.real.label, quantile_cells(&r, digits))?;
            writeln!(
                f,
                "| {} | {} |",
                v.synthetic.label,
                quantile_cells(&s, digits)
            )?;
            writeln!(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cardpipe-dedup benchmark ({} threads for latency figures; per-core figures on one thread)",
            self.threads
        )?;
        writeln!(f)?;
        write!(f, "{}", self.fvc)?;
        writeln!(f)?;
        let s = &self.scan;
        writeln!(
            f,
            "Candidate stage ({}-byte codes, {} probes per pass, one core)",
            s.code_bytes, s.probes_per_pass
        )?;
        writeln!(
            f,
            "| codes scanned/s/core | streaming read bandwidth | gallery traffic share of bandwidth |"
        )?;
        writeln!(f, "|---|---|---|")?;
        writeln!(
            f,
            "| {:.3e} | {:.1} GB/s | {:.1} % |",
            s.codes_per_sec_core,
            s.memory_bandwidth_gb_s,
            s.bandwidth_share * 100.0
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Synthetic ten-print 1:N (no planted duplicates in the gallery; mated = fresh impressions)"
        )?;
        writeln!(
            f,
            "FNIR at FPIR 0.1 %: threshold = fused score exceeded by the top candidate of at most 0.1 % of non-mated searches;"
        )?;
        writeln!(
            f,
            "a mated search fails if its mate is missing from the list or scores at or below it. Latencies are wall clock."
        )?;
        writeln!(
            f,
            "Single-probe latency: {} mated searches timed one by one; batched: 64 probes per pass, identify_batch calls only.",
            self.galleries.first().map_or(0, |g| g.singles)
        )?;
        writeln!(
            f,
            "| subjects | build s | bytes/subject (gallery) | RSS growth/subject | RSS after build | peak RSS so far | latency 1 probe ms mean / p50 / p95 | batched ms/probe | batched searches/s | candidate recall (gallery's shortlist; {} at 1M) | rank-1 | FNIR @ FPIR 0.1 % | searches (mated/non-mated) |",
            self.shortlist
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for g in &self.galleries {
            writeln!(
                f,
                "| {} | {:.1} | {:.0} | {} | {} | {} | {:.1} / {:.1} / {:.1} | {:.2} | {:.1} | {:.2} % (top {}) | {:.2} % | {:.2} % (threshold {:.2}) | {}/{} |",
                g.subjects,
                g.build_secs,
                g.bytes_per_subject,
                g.rss_growth_per_subject()
                    .map_or_else(|| "n/a".to_owned(), |b| format!("{b:.0}")),
                gib(g.rss_after),
                gib(g.peak_rss),
                g.single_probe_ms,
                g.single_p50_ms,
                g.single_p95_ms,
                g.batched_probe_ms,
                g.batched_searches_per_sec,
                g.candidate_recall * 100.0,
                g.shortlist,
                g.rank1_identification * 100.0,
                g.fnir_at_fpir_1e3 * 100.0,
                g.threshold_at_fpir_1e3,
                g.mated,
                g.nonmated
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Candidate-stage recall of the mated searches by shortlist depth (one deeper candidate pass)"
        )?;
        write!(f, "| subjects |")?;
        for d in RECALL_DEPTHS {
            write!(f, " top {d} |")?;
        }
        writeln!(f)?;
        writeln!(f, "|---|{}", "---|".repeat(RECALL_DEPTHS.len()))?;
        for g in &self.galleries {
            write!(f, "| {} |", g.subjects)?;
            for (_, r) in &g.recall_at {
                write!(f, " {:.2} % |", r * 100.0)?;
            }
            writeln!(f)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "The configured threshold ([dedup] target_fpir = 0.001: fused score ≥ -log10(0.001 / N)) on the same searches"
        )?;
        writeln!(
            f,
            "| subjects | threshold | measured FPIR (non-mated top candidate ≥ threshold) | FNIR at it |"
        )?;
        writeln!(f, "|---|---|---|---|")?;
        for g in &self.galleries {
            writeln!(
                f,
                "| {} | {:.2} | {} ({}/{}) | {} |",
                g.subjects,
                g.target_threshold,
                pct(g.fpir_at_target),
                (g.fpir_at_target * g.nonmated as f64).round(),
                g.nonmated,
                pct(g.fnir_at_target)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "Peak RSS of the process (VmHWM): {}", gib(self.peak_rss))?;
        Ok(())
    }
}

/// One shard process of a sharded gallery benchmark ([`shard_run`]): what it measured and
/// its unthresholded candidate lists, written as JSON and merged by [`merge_shard_runs`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardRun {
    pub index: u32,
    pub count: u32,
    /// Subjects of the whole population (all shards together).
    pub population: usize,
    /// Subjects this shard holds.
    pub subjects: usize,
    pub build_secs: f64,
    pub bytes_per_subject: f64,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub peak_rss: Option<u64>,
    /// Wall time of each single-probe search ([`crate::matcher::Shard::identify`]), ms.
    pub single_ms: Vec<f64>,
    /// Wall time of the batched searches (64 probes per pass) over all probes, s.
    pub batched_secs: f64,
    /// Reference id sought by each mated probe.
    pub mated_ids: Vec<String>,
    /// Candidate-stage rank of each mated probe's mate in this shard (deepest of
    /// [`RECALL_DEPTHS`] and the shortlist), `None` if absent or held by another shard.
    pub mate_ranks: Vec<Option<usize>>,
    /// Candidates of each mated probe, then of each non-mated probe: (id, fused score).
    pub mated: Vec<Vec<(String, f64)>>,
    pub nonmated: Vec<Vec<(String, f64)>>,
    pub shortlist: usize,
}

/// Builds shard `index` of `count` of a `population`-subject synthetic population (the
/// subjects whose reference id [`crate::matcher::Shard::owner_of`] assigns to it, through the
/// same enrolment path as [`build_gallery`]) and answers the probes of [`gallery_report`]
/// for the whole population: mated probes of subjects spread over all shards (a shard that
/// does not hold the mate answers with impostors only), non-mated probes of subjects never
/// enrolled. If `barrier` is given, the process writes `ready-<index>` there once built and
/// waits for all `count` files before searching, so that concurrently started shard
/// processes search at the same time (as the shards of one deployment would).
pub fn shard_run(
    opts: &BenchOptions,
    population: usize,
    index: u32,
    count: u32,
    barrier: Option<&Path>,
) -> ShardRun {
    use crate::matcher::Shard;
    use rayon::prelude::*;
    let spec = PopulationSpec {
        seed: opts.seed,
        subjects: population,
        duplicate_rate: 0.0,
    };
    let rss_before = rss_bytes();
    let start = Instant::now();
    let owned: Vec<usize> = (0..population)
        .filter(|&i| Shard::owner_of(&spec.subject_reference_id(i), count) == index)
        .collect();
    let mut gallery = Gallery::new();
    gallery.reserve(owned.len());
    for (c, chunk) in owned.chunks(BUILD_CHUNK).enumerate() {
        gallery.insert_many(generate_prepared(&spec, chunk.par_iter().copied()));
        if (c + 1) % 5 == 0 {
            eprintln!(
                "dedup shard {index}/{count}: {} of {} subjects ({:.0} s, RSS {})",
                ((c + 1) * BUILD_CHUNK).min(owned.len()),
                owned.len(),
                start.elapsed().as_secs_f64(),
                gib(rss_bytes())
            );
        }
    }
    let build_secs = start.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let ProbeSet {
        mated,
        nonmated,
        mated_ids,
    } = ProbeSet::new(&spec, population, opts);
    if let Some(dir) = barrier {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join(format!("ready-{index}")), b"");
        eprintln!(
            "dedup shard {index}/{count}: built in {build_secs:.0} s, waiting for the other shards"
        );
        while (0..count).any(|k| !dir.join(format!("ready-{k}")).exists()) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let shard = Shard {
        index,
        count,
        gallery,
    };
    let singles = mated.len().min(opts.single_searches);
    let single_ms: Vec<f64> = mated[..singles]
        .iter()
        .map(|p| {
            let t = Instant::now();
            std::hint::black_box(shard.identify(p, &opts.search, None));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let mut batched_secs = 0f64;
    let mut lists = |probes: &[Probe]| -> Vec<Vec<(String, f64)>> {
        let mut out = Vec::with_capacity(probes.len());
        for chunk in probes.chunks(64) {
            let refs: Vec<&Probe> = chunk.iter().collect();
            let t = Instant::now();
            let results = shard.gallery.identify_batch(&refs, &opts.search);
            batched_secs += t.elapsed().as_secs_f64();
            out.extend(results.into_iter().map(|r| {
                r.into_iter()
                    .map(|c| (c.reference_id, c.fused.score))
                    .collect::<Vec<_>>()
            }));
        }
        out
    };
    let mated_lists = lists(&mated);
    let nonmated_lists = lists(&nonmated);
    let depth = opts.search.shortlist_for(shard.gallery.len());
    let deepest = RECALL_DEPTHS[RECALL_DEPTHS.len() - 1].max(depth);
    let mut mate_ranks = Vec::with_capacity(mated.len());
    for (chunk, want) in mated.chunks(64).zip(mated_ids.chunks(64)) {
        let refs: Vec<&Probe> = chunk.iter().collect();
        for (short, want) in shard
            .gallery
            .shortlist(&refs, deepest, true)
            .iter()
            .zip(want)
        {
            mate_ranks.push(
                short
                    .iter()
                    .position(|&(_, slot)| shard.gallery.reference_id(slot) == Some(want.as_str())),
            );
        }
    }
    ShardRun {
        index,
        count,
        population,
        subjects: shard.gallery.len(),
        build_secs,
        bytes_per_subject: shard.gallery.memory_bytes() as f64 / shard.gallery.len().max(1) as f64,
        rss_before,
        rss_after,
        peak_rss: peak_rss_bytes(),
        single_ms,
        batched_secs,
        mated_ids,
        mate_ranks,
        mated: mated_lists,
        nonmated: nonmated_lists,
        shortlist: depth,
    }
}

/// Gathers shard runs of one population (scatter-gather as the broker path does it: each
/// probe's per-shard lists merged with [`crate::matcher::merge_candidates`]) and prints
/// accuracy, recall, memory and latency. The latency of a scattered single search is the
/// slowest shard's time for that probe (shards searching concurrently); broker transport and
/// the merge itself are not included.
pub fn merge_shard_runs(runs: &[ShardRun], max_results: usize) -> String {
    use crate::matcher::{Candidate, FusedScore, merge_candidates};
    use std::fmt::Write;
    let to_cands = |l: &[(String, f64)]| -> Vec<Candidate> {
        l.iter()
            .map(|(id, score)| Candidate {
                reference_id: id.clone(),
                fused: FusedScore {
                    score: *score,
                    fmr: 10f64.powf(-score),
                    fingers: [None; 10],
                },
                prefilter: 0,
            })
            .collect()
    };
    let mut out = String::new();
    let Some(first) = runs.first() else {
        return "no shard runs".to_owned();
    };
    let mated = first.mated.len();
    let mut rank1 = 0;
    let mut mate_scores = Vec::with_capacity(mated);
    for m in 0..mated {
        let merged = merge_candidates(runs.iter().map(|r| to_cands(&r.mated[m])), max_results);
        let want = &first.mated_ids[m];
        if merged.first().is_some_and(|c| &c.reference_id == want) {
            rank1 += 1;
        }
        mate_scores.push(
            merged
                .iter()
                .find(|c| &c.reference_id == want)
                .map_or(0.0, |c| c.fused.score),
        );
    }
    let non_scores: Vec<f64> = (0..first.nonmated.len())
        .map(|k| {
            merge_candidates(runs.iter().map(|r| to_cands(&r.nonmated[k])), max_results)
                .first()
                .map_or(0.0, |c| c.fused.score)
        })
        .collect();
    let (fnir, threshold) = fnir_at_fpir(&mate_scores, &non_scores, 0.001);
    let ranks: Vec<Option<usize>> = (0..mated)
        .map(|m| runs.iter().find_map(|r| r.mate_ranks[m]))
        .collect();
    let singles = runs.iter().map(|r| r.single_ms.len()).min().unwrap_or(0);
    let scattered: Vec<f64> = (0..singles)
        .map(|k| runs.iter().map(|r| r.single_ms[k]).fold(0.0, f64::max))
        .collect();
    let total: usize = runs.iter().map(|r| r.subjects).sum();
    let _ = writeln!(
        out,
        "Sharded gallery: {} shards, {} subjects in all (population {}), shortlist {} per shard",
        runs.len(),
        total,
        first.population,
        first.shortlist
    );
    let _ = writeln!(
        out,
        "| shard | subjects | build s | bytes/subject (gallery) | RSS growth/subject | peak RSS | latency 1 probe ms p50 / p95 | batched ms/probe |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in runs {
        let growth = match (r.rss_before, r.rss_after) {
            (Some(a), Some(b)) => format!(
                "{:.0}",
                b.saturating_sub(a) as f64 / r.subjects.max(1) as f64
            ),
            _ => "n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {}/{} | {} | {:.1} | {:.0} | {} | {} | {:.1} / {:.1} | {:.2} |",
            r.index,
            r.count,
            r.subjects,
            r.build_secs,
            r.bytes_per_subject,
            growth,
            gib(r.peak_rss),
            percentile(&r.single_ms, 0.5),
            percentile(&r.single_ms, 0.95),
            r.batched_secs * 1e3 / (r.mated.len() + r.nonmated.len()).max(1) as f64
        );
    }
    let _ = writeln!(
        out,
        "Scattered single search (slowest shard per probe, {} probes): p50 {:.1} ms, p95 {:.1} ms",
        singles,
        percentile(&scattered, 0.5),
        percentile(&scattered, 0.95)
    );
    let _ = write!(out, "Candidate recall (mate in its shard's shortlist):");
    for (d, r) in recall_by_depth(&ranks, &[50, 100, 200, 500, 1000, 2000, first.shortlist]) {
        let _ = write!(out, " top {d} {:.2} %;", r * 100.0);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Merged: rank-1 {:.2} %, FNIR at FPIR 0.1 % {:.2} % (threshold {:.2}); {} mated / {} non-mated searches",
        rank1 as f64 * 100.0 / mated.max(1) as f64,
        fnir * 100.0,
        threshold,
        mated,
        non_scores.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), 10.0);
        assert_eq!(percentile(&samples, 0.95), 19.0);
        assert_eq!(percentile(&samples, 1.0), 20.0);
        assert_eq!(percentile(&samples, 0.0), 1.0);
        // 50 samples (the bench's single searches): p95 is the 48th smallest.
        let fifty: Vec<f64> = (0..50).map(|i| f64::from(i) * 2.0).collect();
        assert_eq!(percentile(&fifty, 0.95), 94.0);
        assert_eq!(percentile(&fifty, 0.5), 48.0);
        assert_eq!(percentile(&[7.5], 0.95), 7.5);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn recall_counts_mates_ranked_below_each_depth() {
        // Ranks are 0-based: rank 49 is inside the top 50, rank 50 is not.
        let ranks = [Some(0), Some(49), Some(50), Some(199), Some(1999), None];
        assert_eq!(
            recall_by_depth(&ranks, &[1, 50, 200, 2000]),
            vec![
                (1, 1.0 / 6.0),
                (50, 2.0 / 6.0),
                (200, 4.0 / 6.0),
                (2000, 5.0 / 6.0)
            ]
        );
        assert_eq!(recall_by_depth(&[], &[200]), vec![(200, 0.0)]);
    }

    #[test]
    fn fnir_threshold_lets_at_most_the_fpir_share_of_non_mated_through() {
        // 1,000 non-mated top scores 0.000 … 0.999: at FPIR 0.1 % one may exceed the
        // threshold, so the threshold is the second highest score.
        let non: Vec<f64> = (0..1000).map(|i| f64::from(i) / 1000.0).collect();
        let mates = [0.5, 0.998, 0.9981, 2.0, 0.0];
        let (fnir, threshold) = fnir_at_fpir(&mates, &non, 0.001);
        assert_eq!(threshold, 0.998);
        // 0.5, 0.998 (at the threshold) and 0.0 (mate not returned) are misses.
        assert!((fnir - 3.0 / 5.0).abs() < 1e-12);
        // Fewer than 1,000 non-mated searches: none may exceed it, the highest is the bar.
        let (fnir, threshold) = fnir_at_fpir(&[0.5, 1.5], &[0.2, 1.0, 0.4], 0.001);
        assert_eq!((fnir, threshold), (0.5, 1.0));
    }

    #[test]
    fn proc_status_fields_are_read_in_bytes() {
        let status = "Name:\tbench_dedup\nVmPeak:\t 2700000 kB\nVmHWM:\t 2610212 kB\n\
                      VmRSS:\t   5120 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(5120 * 1024));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(2_610_212 * 1024));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
        assert_eq!(parse_status_kib("VmRSS:\t12 MB\n", "VmRSS:"), None);
        assert_eq!(parse_status_kib("VmRSS:\tlots kB\n", "VmRSS:"), None);
        if cfg!(target_os = "linux") {
            let rss = rss_bytes().expect("VmRSS on Linux");
            assert!(rss > 0);
            assert!(peak_rss_bytes().expect("VmHWM on Linux") >= rss);
        }
    }

    #[test]
    fn build_gallery_equals_sequential_inserts() {
        let (built, spec) = build_gallery(5, 40);
        let mut sequential = Gallery::new();
        for i in 0..40 {
            let s = spec.subject(i);
            sequential.insert(&s.reference_id, &TenPrint::from_iso(&s.templates).unwrap());
        }
        assert_eq!(built.len(), 40);
        for i in 0..40 {
            let id = spec.subject_reference_id(i);
            assert_eq!(built.reference_id(i as u32), Some(id.as_str()));
            assert_eq!(built.get(&id), sequential.get(&id));
        }
        let probe =
            Probe::new(&TenPrint::from_iso(&spec.impressions(spec.person_of(7), 3)).unwrap());
        let opts = IdentifyOptions::default();
        assert_eq!(
            built.identify(&probe, &opts, None),
            sequential.identify(&probe, &opts, None)
        );
    }
}
