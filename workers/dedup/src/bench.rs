//! Benchmarks behind `cardpipe bench dedup` (and the criterion benches).
//!
//! [`run`] measures, in order:
//!
//! 1. **FVC2002 accuracy** with exactly the protocol of `shared/data/README.md`: every ordered
//!    pair of templates within each of the four databases (2,240 genuine and 23,040 impostor
//!    comparisons), one threshold across all four: EER and FNMR at FMR 0.1 % and 0.01 %.
//!    Nothing is fitted on these files; the comparator's constants are fixed in the source.
//! 2. **Precise comparator throughput** on one core over the same comparisons (templates
//!    expanded beforehand, as for a prepared probe), and the 1:N variant that also expands the
//!    reference template from compact storage for every comparison.
//! 3. **Candidate stage**: 512-bit codes scanned per second on one core with a batch of
//!    probes per pass, and the share of single-core streaming memory bandwidth
//!    (measured with a plain sequential read) that the gallery traffic represents.
//! 4. **Synthetic 1:N**: galleries of 10k and 100k generated subjects (1M on request):
//!    memory per subject, search latency (single probe and batched), candidate-stage recall,
//!    and FNIR at FPIR 0.1 % from mated and non-mated searches.
//!
//! Per-core figures run on the calling thread and divide by that thread's CPU time (so a
//! machine shared with other work does not deflate them); latency figures are wall-clock
//! times using the rayon pool (all cores) and do suffer from sharing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::iso19794_2;
use crate::matcher::{
    Finger, FingerTemplate, Gallery, IdentifyOptions, MatchDetail, Probe, TenPrint, compare_detail,
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

/// One FVC template: database name, finger number, impression number, finger.
#[derive(Debug, Clone)]
pub struct FvcTemplate {
    pub database: String,
    pub finger: u32,
    pub impression: u32,
    pub data: Finger,
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
            let data = Finger::from_view(&rec, &rec.views[0]);
            out.push(FvcTemplate {
                database: name.clone(),
                finger,
                impression,
                data,
            });
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
    pub search: IdentifyOptions,
    pub seed: u64,
}

impl BenchOptions {
    /// Defaults; `with_million` adds the 1M-subject gallery (needs ~5 GB and several minutes).
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

/// FVC accuracy and comparator throughput.
#[derive(Debug, Clone, PartialEq)]
pub struct FvcReport {
    pub genuine: usize,
    pub impostor: usize,
    pub eer: f64,
    pub fnmr_at_fmr_1e3: f64,
    pub fnmr_at_fmr_1e4: f64,
    /// FMR the synthetic calibration predicts at the FVC threshold for FMR 0.1 %.
    pub calibrated_fmr_at_1e3: f64,
    pub comparisons_per_sec_core: f64,
    pub comparisons_per_sec_core_with_expansion: f64,
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
    pub build_secs: f64,
    pub bytes_per_subject: f64,
    pub single_probe_ms: f64,
    pub batched_probe_ms: f64,
    pub candidate_recall: f64,
    pub rank1_identification: f64,
    pub fnir_at_fpir_1e3: f64,
    pub threshold_at_fpir_1e3: f64,
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
}

/// FVC accuracy (protocol in the module docs) and single-core comparator throughput.
pub fn fvc_report(dir: &Path) -> Result<FvcReport, BenchError> {
    let templates = load_fvc(dir)?;
    let ((g, i), _, secs) = timed(|| fvc_scores(&templates));
    let gs: Vec<f32> = g.iter().map(|d| d.score).collect();
    let is: Vec<f32> = i.iter().map(|d| d.score).collect();
    let (eer, fnmr) = error_rates(&gs, &is, &[0.001, 0.0001]);
    let mut sorted = is.clone();
    sorted.sort_by(f32::total_cmp);
    let bar = sorted[sorted.len() - 1 - (sorted.len() as f64 * 0.001) as usize];
    let calibrated = crate::matcher::Calibration::synthetic().fmr(bar);
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
        genuine: g.len(),
        impostor: i.len(),
        eer,
        fnmr_at_fmr_1e3: fnmr[0],
        fnmr_at_fmr_1e4: fnmr[1],
        calibrated_fmr_at_1e3: calibrated,
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

/// Generates subjects `range` of `spec` in parallel as (reference id, ten-print).
fn generate(spec: &PopulationSpec, range: std::ops::Range<usize>) -> Vec<(String, TenPrint)> {
    use rayon::prelude::*;
    range
        .into_par_iter()
        .map(|i| {
            let s = spec.subject(i);
            let tp = TenPrint::from_iso(&s.templates).expect("generated records parse");
            (s.reference_id, tp)
        })
        .collect()
}

/// Builds a gallery of `subjects` synthetic subjects (no planted duplicates inside it).
pub fn build_gallery(seed: u64, subjects: usize) -> (Gallery, PopulationSpec) {
    let spec = PopulationSpec {
        seed,
        subjects,
        duplicate_rate: 0.0,
    };
    let mut gallery = Gallery::new();
    gallery.reserve(subjects);
    let mut start = 0;
    while start < subjects {
        let end = (start + 20_000).min(subjects);
        for (id, tp) in generate(&spec, start..end) {
            gallery.insert(&id, &tp);
        }
        start = end;
    }
    (gallery, spec)
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

/// Accuracy and latency of 1:N search on a synthetic gallery.
pub fn gallery_report(
    gallery: &Gallery,
    spec: &PopulationSpec,
    build_secs: f64,
    opts: &BenchOptions,
) -> GalleryReport {
    use rayon::prelude::*;
    let n = gallery.len();
    let mated_idx: Vec<usize> = (0..opts.mated_searches)
        .map(|k| k * n / opts.mated_searches.max(1))
        .collect();
    let mated: Vec<Probe> = mated_idx
        .par_iter()
        .map(|&i| {
            Probe::new(
                &TenPrint::from_iso(&spec.impressions(spec.person_of(i), 9_000_000 + i as u64))
                    .expect("parse"),
            )
        })
        .collect();
    let nonmated: Vec<Probe> = (0..opts.nonmated_searches)
        .into_par_iter()
        .map(|k| {
            Probe::new(&TenPrint::from_iso(&spec.impressions((n + k) as u64, 1)).expect("parse"))
        })
        .collect();
    let singles = mated.len().min(20);
    let start = Instant::now();
    for p in &mated[..singles] {
        std::hint::black_box(gallery.identify(p, &opts.search, None));
    }
    let single_probe_ms = start.elapsed().as_secs_f64() * 1e3 / singles.max(1) as f64;
    let mut recall = 0;
    let mut rank1 = 0;
    let mut mate_scores = Vec::with_capacity(mated.len());
    let start = Instant::now();
    for (chunk_idx, chunk) in mated.chunks(64).enumerate() {
        let refs: Vec<&Probe> = chunk.iter().collect();
        let short = gallery.shortlist(&refs, opts.search.shortlist, true);
        let results = gallery.identify_batch(&refs, &opts.search);
        for (k, (s, r)) in short.iter().zip(&results).enumerate() {
            let want = spec.subject_reference_id(mated_idx[chunk_idx * 64 + k]);
            if s.iter()
                .any(|&(_, slot)| gallery.reference_id(slot) == Some(want.as_str()))
            {
                recall += 1;
            }
            if r.first().is_some_and(|c| c.reference_id == want) {
                rank1 += 1;
            }
            mate_scores.push(
                r.iter()
                    .find(|c| c.reference_id == want)
                    .map_or(0.0, |c| c.fused.score),
            );
        }
    }
    let mut non_scores = Vec::with_capacity(nonmated.len());
    for chunk in nonmated.chunks(64) {
        let refs: Vec<&Probe> = chunk.iter().collect();
        for r in gallery.identify_batch(&refs, &opts.search) {
            non_scores.push(r.first().map_or(0.0, |c| c.fused.score));
        }
    }
    let batched_probe_ms =
        start.elapsed().as_secs_f64() * 1e3 / (mated.len() + nonmated.len()).max(1) as f64;
    non_scores.sort_by(f64::total_cmp);
    let allowed = (non_scores.len() as f64 * 0.001).floor() as usize;
    let threshold = non_scores
        .get(non_scores.len().saturating_sub(1 + allowed))
        .copied()
        .unwrap_or(0.0);
    let misses = mate_scores.iter().filter(|&&s| s <= threshold).count();
    GalleryReport {
        subjects: n,
        build_secs,
        bytes_per_subject: gallery.memory_bytes() as f64 / n.max(1) as f64,
        single_probe_ms,
        batched_probe_ms,
        candidate_recall: recall as f64 / mated.len().max(1) as f64,
        rank1_identification: rank1 as f64 / mated.len().max(1) as f64,
        fnir_at_fpir_1e3: misses as f64 / mate_scores.len().max(1) as f64,
        threshold_at_fpir_1e3: threshold,
        mated: mated.len(),
        nonmated: nonmated.len(),
    }
}

/// Runs everything (see the module docs). Progress goes to stderr.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    eprintln!("dedup bench: FVC2002 accuracy and comparator throughput ...");
    let fvc = fvc_report(&opts.fvc_dir)?;
    let mut galleries = Vec::new();
    let mut scan = None;
    for &size in &opts.gallery_sizes {
        eprintln!("dedup bench: building a {size}-subject synthetic gallery ...");
        let start = Instant::now();
        let (gallery, spec) = build_gallery(opts.seed, size);
        let build_secs = start.elapsed().as_secs_f64();
        if scan.is_none() && size >= 10_000 {
            eprintln!("dedup bench: candidate-stage throughput ...");
            scan = Some(scan_report(&gallery, &spec, opts.probes_per_pass));
        }
        eprintln!("dedup bench: searching the {size}-subject gallery ...");
        galleries.push(gallery_report(&gallery, &spec, build_secs, opts));
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
    })
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.fvc;
        writeln!(
            f,
            "cardpipe-dedup benchmark ({} threads for latency figures; per-core figures on one thread)",
            self.threads
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "FVC2002 DB1-4_B ISO templates, all ordered pairs within each database, one threshold"
        )?;
        writeln!(
            f,
            "({} genuine / {} impostor comparisons)",
            v.genuine, v.impostor
        )?;
        writeln!(
            f,
            "| matcher | EER | FNMR at FMR 0.1 % | FNMR at FMR 0.01 % | comparisons/s/core |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        writeln!(
            f,
            "| cardpipe-dedup | {:.2} % | {:.2} % | {:.2} % | {:.0} (1:N incl. expansion {:.0}) |",
            v.eer * 100.0,
            v.fnmr_at_fmr_1e3 * 100.0,
            v.fnmr_at_fmr_1e4 * 100.0,
            v.comparisons_per_sec_core,
            v.comparisons_per_sec_core_with_expansion
        )?;
        writeln!(
            f,
            "| SourceAFIS 3.18 (published) | 4.55 % | 9.42 % | 11.47 % | ≈ 10,600 |"
        )?;
        writeln!(
            f,
            "| openafis (published) | 10.13 % | 18.48 % | 23.21 % | ≈ 46,000 |"
        )?;
        writeln!(
            f,
            "Synthetic calibration predicts FMR {:.3} % at the FVC FMR-0.1 % threshold.",
            v.calibrated_fmr_at_1e3 * 100.0
        )?;
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
            "| subjects | build s | bytes/subject | latency 1 probe ms | batched ms/probe | candidate recall | rank-1 | FNIR @ FPIR 0.1 % | searches (mated/non-mated) |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
        for g in &self.galleries {
            writeln!(
                f,
                "| {} | {:.1} | {:.0} | {:.1} | {:.2} | {:.2} % | {:.2} % | {:.2} % (threshold {:.2}) | {}/{} |",
                g.subjects,
                g.build_secs,
                g.bytes_per_subject,
                g.single_probe_ms,
                g.batched_probe_ms,
                g.candidate_recall * 100.0,
                g.rank1_identification * 100.0,
                g.fnir_at_fpir_1e3 * 100.0,
                g.threshold_at_fpir_1e3,
                g.mated,
                g.nonmated
            )?;
        }
        Ok(())
    }
}
