//! In-memory ten-print gallery with two-stage 1:N search, shards and 1:1 verification.
//!
//! Storage per enrolled subject (struct-of-arrays, indexed by a dense slot number):
//! * 10 × 768-bit candidate codes, contiguous for all subjects (`codes`), their popcounts
//!   and each finger's gallery-side normalisation (mean and spread of its code similarity
//!   to a cohort of 1,024 other subjects, 8 B);
//! * the minutiae of the ten fingers in one boxed byte blob, bit-packed (x and y with the bit
//!   widths the finger needs, 8-bit angle: 26 bits per minutia at 500 dpi; [`pack_finger`]);
//! * the reference id and a hash-map entry from id to slot.
//!
//! That is 960 B of codes + 80 B of norms + ~1.05 KB of minutiae + ~150 B of bookkeeping per
//! subject
//! (`BENCH_DEDUP.md` has the measured figures).
//! Cylinders for the precise stage are rebuilt from the compact minutiae for the shortlisted
//! subjects only, and kept (about 40 KB a subject) up to a byte budget the search names
//! ([`IdentifyOptions::expanded_cache_bytes`]), so a subject shortlisted again is not
//! rebuilt again.
//!
//! **Enrolment** is split in two ([`PreparedSubject::new`], then [`Gallery::insert_ready`]):
//! deriving the candidate codes needs the cylinders of every finger and is by far the costly
//! part, but it reads nothing from the gallery, so it can run on any thread, in parallel and
//! before taking the gallery's lock; the append itself is cheap and stays sequential.
//!
//! **Search** ([`Gallery::identify_batch`]): the candidate stage scans every subject's ten
//! codes against every probe of a batch, block by block (a block of subjects stays in cache
//! while all probes of the batch are scored against it, so the gallery streams from memory
//! once per batch rather than once per probe), keeping the best `shortlist` subjects per
//! probe by a fusion of per-finger code correlations standardised on both sides (probe and
//! enrolled finger)
//! ([`Gallery::shortlist`]). Blocks are spread over threads with rayon. The precise
//! stage is a cascade: two fingers of every shortlisted subject, then all fingers of the best
//! few, and the per-finger scores are fused ([`super::fuse`]).
//!
//! **Sharding**: a [`Shard`] owns the reference ids whose stable hash falls in its bucket;
//! each shard answers a probe on its own and [`merge_candidates`] combines the per-shard lists
//! (scores are absolute, so merging is a sort and a cut).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use super::calibration::{Calibration, FusedScore, fuse};
use super::code::{CODE_BITS, CODE_WORDS, FingerCode, code_similarity, inverse_norms};
use super::compare::compare;
use super::template::{CanonMinutia, Finger, FingerTemplate};
use crate::iso19794_2::{self, IsoError};

const STRIDE: usize = 10 * CODE_WORDS;
/// Subjects per cache block of the candidate scan (256 × 640 B = 160 KiB of codes).
const BLOCK: usize = 256;

/// Why a ten-print could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenPrintError {
    #[error("fingerprint record {index} refused: {source}")]
    Iso {
        index: usize,
        #[source]
        source: IsoError,
    },
    #[error(
        "fingerprint record {index}: finger position 0 (unknown) cannot be placed in a ten-print"
    )]
    UnknownPosition { index: usize },
    #[error("fingerprint for position {position} refused: {source}")]
    Placement {
        position: u8,
        #[source]
        source: PlacementError,
    },
    #[error("finger position {position} appears more than once")]
    DuplicatePosition { position: u8 },
    #[error("no finger with minutiae in the ten-print")]
    Empty,
}

/// One enrolment template as the registry contract gives it: the finger position (1–10,
/// authoritative) and the ISO/IEC 19794-2 record.
#[derive(Clone, PartialEq, Eq)]
pub struct PositionedTemplate {
    pub position: u8,
    pub record: Vec<u8>,
}

impl fmt::Debug for PositionedTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PositionedTemplate {{ position: {}, record: <{} bytes> }}",
            self.position,
            self.record.len()
        )
    }
}

/// Why a record cannot be placed at a finger position. The texts name positions, view
/// counts and byte offsets, never a value of the biometric data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The contract's position is not a finger (1–10).
    #[error("finger position {position} is not 1–10")]
    BadPosition { position: u8 },
    /// The bytes are not a valid record.
    #[error("not a valid ISO/IEC 19794-2:2005 or :2011 minutiae record ({0})")]
    Iso(#[from] IsoError),
    /// No view of the record is for the position (or for position 0, "unknown").
    #[error(
        "the record is for finger position {}, not position {position} (a header position of 0 takes the contract's position; any other must agree with it)",
        list(.found)
    )]
    PositionMismatch { position: u8, found: Vec<u8> },
    /// Views for the position exist but none holds a minutia.
    #[error(
        "no usable finger view for position {position}: {views} view(s) for it, none with minutiae"
    )]
    NoMinutiae { position: u8, views: usize },
}

fn list(positions: &[u8]) -> String {
    let v: Vec<String> = positions.iter().map(u8::to_string).collect();
    v.join(", ")
}

/// Which view of a record was placed at a finger position, for the dedup history and logs:
/// header fields and counts only, no biometric content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewChoice {
    /// The contract's finger position (1–10).
    pub position: u8,
    /// Edition of the record.
    pub version: iso19794_2::IsoVersion,
    /// Views (2011: representations) in the record.
    pub views: usize,
    /// Views for this position (or 0, "unknown") that held minutiae: the ones compared.
    pub candidates: usize,
    /// Index of the chosen view in the record, from 0.
    pub index: usize,
    /// The chosen view's header position (0 or the contract's).
    pub header_position: u8,
    pub view_number: u8,
    pub impression_type: u8,
    pub quality: u8,
    pub minutiae: usize,
}

impl fmt::Display for ViewChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "position {}: view {} of {} (view number {}, impression type {}, quality {}, {} minutiae)",
            self.position,
            self.index + 1,
            self.views,
            self.view_number,
            self.impression_type,
            self.quality,
            self.minutiae
        )
    }
}

/// A finger placed at its contract position, and which view it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedFinger {
    pub choice: ViewChoice,
    pub finger: Finger,
}

/// THE rule for templates, from intake to dedup: turns (contract position, record bytes) into
/// the finger placed at that position. Intake validation, the dedup stage, adjudication, the
/// ABIS adapter and the pickup handover all go through it, so a template intake accepts is
/// never refused later for a reason that could have been checked here.
///
/// * the record must parse (ISO/IEC 19794-2:2005 or :2011, any valid impression type);
/// * the contract's `position` (1–10) is authoritative: a view whose header position is 0
///   ("unknown", as capture stations write it) takes it; views for other positions are
///   ignored when a view for `position` (or 0) exists, and the record is refused
///   ([`PlacementError::PositionMismatch`]) when none does;
/// * of the views for the position that hold minutiae, the best one is used: highest quality,
///   then most minutiae, then the first; none with minutiae is [`PlacementError::NoMinutiae`].
pub fn place_finger(position: u8, bytes: &[u8]) -> Result<PlacedFinger, PlacementError> {
    if !(1..=10).contains(&position) {
        return Err(PlacementError::BadPosition { position });
    }
    let record = iso19794_2::parse(bytes)?;
    let for_position: Vec<(usize, &iso19794_2::FingerView)> = record
        .views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.position == 0 || v.position == position)
        .collect();
    if for_position.is_empty() {
        let mut found: Vec<u8> = record.views.iter().map(|v| v.position).collect();
        found.sort_unstable();
        found.dedup();
        return Err(PlacementError::PositionMismatch { position, found });
    }
    let usable: Vec<(usize, &iso19794_2::FingerView)> = for_position
        .iter()
        .copied()
        .filter(|(_, v)| !v.minutiae.is_empty())
        .collect();
    // Best quality, then most minutiae, then the first (min_by_key keeps the first of equals).
    let Some(&(index, view)) = usable.iter().min_by_key(|(_, v)| {
        (
            std::cmp::Reverse(v.quality),
            std::cmp::Reverse(v.minutiae.len()),
        )
    }) else {
        return Err(PlacementError::NoMinutiae {
            position,
            views: for_position.len(),
        });
    };
    let geometry = record.view_geometry(view);
    let at_view_geometry = iso19794_2::FingerprintRecord {
        version: record.version,
        capture_equipment: record.capture_equipment,
        width: geometry.width,
        height: geometry.height,
        x_resolution: geometry.x_resolution,
        y_resolution: geometry.y_resolution,
        views: Vec::new(),
    };
    let finger = Finger::from_view(&at_view_geometry, view);
    Ok(PlacedFinger {
        choice: ViewChoice {
            position,
            version: record.version,
            views: record.views.len(),
            candidates: usable.len(),
            index,
            header_position: view.position,
            view_number: view.view_number,
            impression_type: view.impression_type,
            quality: view.quality,
            minutiae: view.minutiae.len(),
        },
        finger,
    })
}

/// Up to ten fingers indexed by ISO finger position − 1.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TenPrint {
    pub fingers: [Option<Finger>; 10],
}

impl fmt::Debug for TenPrint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present: Vec<usize> = (0..10)
            .filter(|&i| self.fingers[i].is_some())
            .map(|i| i + 1)
            .collect();
        write!(
            f,
            "TenPrint {{ positions: {present:?}, minutiae: <redacted> }}"
        )
    }
}

impl TenPrint {
    /// Builds a ten-print from ISO 19794-2 records that carry their own finger positions
    /// (generated populations, benchmarks), placing every view by its header position.
    /// Position 0 (unknown) and a position given twice are refused, as is a ten-print without
    /// any minutiae. Enrolment templates, whose position the registry contract gives, go
    /// through [`TenPrint::from_placed`] instead.
    pub fn from_iso<B: AsRef<[u8]>>(records: &[B]) -> Result<Self, TenPrintError> {
        let mut tp = TenPrint::default();
        for (index, bytes) in records.iter().enumerate() {
            let rec = iso19794_2::parse(bytes.as_ref())
                .map_err(|source| TenPrintError::Iso { index, source })?;
            for view in &rec.views {
                if view.position == 0 {
                    return Err(TenPrintError::UnknownPosition { index });
                }
                let slot = &mut tp.fingers[usize::from(view.position) - 1];
                if slot.is_some() {
                    return Err(TenPrintError::DuplicatePosition {
                        position: view.position,
                    });
                }
                *slot = Some(Finger::from_view(&rec, view));
            }
        }
        if tp.fingers.iter().flatten().all(|f| f.minutiae.is_empty()) {
            return Err(TenPrintError::Empty);
        }
        Ok(tp)
    }

    /// Builds a ten-print from enrolment templates, each placed at its contract position by
    /// [`place_finger`]; returns the view chosen for every template too. A position given
    /// twice and a ten-print without minutiae are refused.
    pub fn from_placed<B: AsRef<[u8]>>(
        templates: &[(u8, B)],
    ) -> Result<(Self, Vec<ViewChoice>), TenPrintError> {
        let mut tp = TenPrint::default();
        let mut choices = Vec::with_capacity(templates.len());
        for (position, bytes) in templates {
            let placed = place_finger(*position, bytes.as_ref()).map_err(|source| {
                TenPrintError::Placement {
                    position: *position,
                    source,
                }
            })?;
            let slot = &mut tp.fingers[usize::from(*position) - 1];
            if slot.is_some() {
                return Err(TenPrintError::DuplicatePosition {
                    position: *position,
                });
            }
            *slot = Some(placed.finger);
            choices.push(placed.choice);
        }
        if tp.fingers.iter().flatten().all(|f| f.minutiae.is_empty()) {
            return Err(TenPrintError::Empty);
        }
        Ok((tp, choices))
    }

    /// [`TenPrint::from_placed`] over [`PositionedTemplate`]s.
    pub fn from_templates(
        templates: &[PositionedTemplate],
    ) -> Result<(Self, Vec<ViewChoice>), TenPrintError> {
        let pairs: Vec<(u8, &[u8])> = templates
            .iter()
            .map(|t| (t.position, t.record.as_slice()))
            .collect();
        Self::from_placed(&pairs)
    }

    /// The compact storage form (see [`pack_finger`]): one packed finger after another.
    fn to_blob(&self) -> Box<[u8]> {
        let mut out = Vec::with_capacity(10 + 2 * 10 + 4 * 40 * 10);
        for f in &self.fingers {
            match f {
                Some(f) => pack_finger(f, &mut out),
                None => out.push(0),
            }
        }
        out.into_boxed_slice()
    }

    fn from_blob(blob: &[u8]) -> Self {
        let mut tp = TenPrint::default();
        let mut at = 0;
        for slot in tp.fingers.iter_mut() {
            let (f, used) = unpack_finger(&blob[at..]);
            at += used;
            if !f.minutiae.is_empty() {
                *slot = Some(f);
            }
        }
        tp
    }
}

/// Bits needed to write `v` (at least 1).
fn bit_width(v: u16) -> u32 {
    (16 - v.leading_zeros()).max(1)
}

/// Appends one finger in the gallery's storage form: the minutia count (u8; at most 255
/// minutiae are kept), then, if any, one byte giving the bit
/// widths `wx`, `wy` (1–16 each, stored minus one in the two nibbles) needed for the largest
/// x and y of this finger, then every minutia as `x` (`wx` bits), `y` (`wy` bits) and the
/// angle (8 bits), little-endian bit order, padded to a whole byte. Lossless for any
/// coordinates; a 500-dpi finger (coordinates below 512) takes 26 bits per minutia, i.e.
/// 3.25 bytes instead of 5 for a byte-aligned form (u16 x, u16 y, u8 angle).
fn pack_finger(f: &Finger, out: &mut Vec<u8>) {
    let m = &f.minutiae[..f.minutiae.len().min(255)];
    out.push(m.len() as u8);
    if m.is_empty() {
        return;
    }
    let wx = bit_width(m.iter().map(|p| p.x).max().unwrap_or(0));
    let wy = bit_width(m.iter().map(|p| p.y).max().unwrap_or(0));
    out.push(((wx - 1) | (wy - 1) << 4) as u8);
    let mut acc = 0u64;
    let mut bits = 0u32;
    for p in m {
        acc |= (u64::from(p.x) | u64::from(p.y) << wx | u64::from(p.angle) << (wx + wy)) << bits;
        bits += wx + wy + 8;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
}

/// Reads one finger written by [`pack_finger`]; returns it and the bytes used.
fn unpack_finger(data: &[u8]) -> (Finger, usize) {
    let n = usize::from(data[0]);
    if n == 0 {
        return (Finger::default(), 1);
    }
    let wx = u32::from(data[1] & 15) + 1;
    let wy = u32::from(data[1] >> 4) + 1;
    let per = wx + wy + 8;
    let len = (n * per as usize).div_ceil(8);
    let body = &data[2..2 + len];
    let mut minutiae = Vec::with_capacity(n);
    let (mut acc, mut bits, mut at) = (0u64, 0u32, 0usize);
    for _ in 0..n {
        while bits < per {
            acc |= u64::from(body[at]) << bits;
            at += 1;
            bits += 8;
        }
        let v = acc & ((1u64 << per) - 1);
        acc >>= per;
        bits -= per;
        minutiae.push(CanonMinutia {
            x: (v & ((1 << wx) - 1)) as u16,
            y: (v >> wx & ((1 << wy) - 1)) as u16,
            angle: (v >> (wx + wy)) as u8,
        });
    }
    (Finger { minutiae }, 2 + len)
}

/// A ten-print prepared for searching: codes and expanded templates, built once per probe.
///
/// It also keeps the ten-print's compact storage form, so that an applicant found to be new
/// is enrolled from its probe ([`Gallery::insert_probe`]) without expanding its fingers
/// again: the codes are the probe's, and the expanded templates can seed the gallery's
/// expanded-template cache.
#[derive(Clone)]
pub struct Probe {
    codes: [u64; STRIDE],
    pops: [u32; 10],
    templates: [Option<FingerTemplate>; 10],
    blob: Box<[u8]>,
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probe { <redacted> }")
    }
}

impl Probe {
    /// Prepares a probe.
    pub fn new(tp: &TenPrint) -> Self {
        let mut codes = [0u64; STRIDE];
        let mut pops = [0u32; 10];
        let mut templates: [Option<FingerTemplate>; 10] = Default::default();
        for (i, f) in tp.fingers.iter().enumerate() {
            if let Some(f) = f {
                let t = FingerTemplate::new(f);
                let c = FingerCode::new(&t);
                codes[i * CODE_WORDS..(i + 1) * CODE_WORDS].copy_from_slice(&c.words);
                pops[i] = c.popcount();
                templates[i] = Some(t);
            }
        }
        Probe {
            codes,
            pops,
            templates,
            blob: tp.to_blob(),
        }
    }

    /// The subject this probe enrols as: the same codes and storage form as
    /// [`PreparedSubject::new`] of the probe's ten-print, without expanding a finger.
    pub fn prepared_subject(&self) -> PreparedSubject {
        let mut pops = [0u16; 10];
        for (p, &q) in pops.iter_mut().zip(&self.pops) {
            *p = q as u16;
        }
        PreparedSubject {
            codes: self.codes,
            pops,
            blob: self.blob.clone(),
        }
    }
}

/// A ten-print ready to be appended to a gallery: its ten candidate codes with their
/// popcounts and its compact minutiae blob.
///
/// Building one is pure per-subject work (cylinders of every finger → 768-bit codes, plus the
/// bit-packed minutiae storage form) that needs no gallery. That is why it is a type of its
/// own: enrolment can prepare subjects on many threads, off the gallery's lock, and keep only
/// the cheap append ([`Gallery::insert_ready`]) sequential. [`Gallery::insert`] is exactly
/// `insert_ready(id, PreparedSubject::new(tenprint))`.
#[derive(Clone, PartialEq, Eq)]
pub struct PreparedSubject {
    codes: [u64; STRIDE],
    pops: [u16; 10],
    blob: Box<[u8]>,
}

impl fmt::Debug for PreparedSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Codes and minutiae are biometric data: never printed.
        let present = self.pops.iter().filter(|&&p| p > 0).count();
        write!(
            f,
            "PreparedSubject {{ coded_fingers: {present}, data: <redacted> }}"
        )
    }
}

impl PreparedSubject {
    /// Computes the candidate codes and the storage blob of `tenprint`. Deterministic and
    /// independent of any gallery, so it may run on any thread.
    pub fn new(tenprint: &TenPrint) -> Self {
        let mut codes = [0u64; STRIDE];
        let mut pops = [0u16; 10];
        for (i, f) in tenprint.fingers.iter().enumerate() {
            if let Some(f) = f {
                let c = FingerCode::new(&FingerTemplate::new(f));
                codes[i * CODE_WORDS..(i + 1) * CODE_WORDS].copy_from_slice(&c.words);
                pops[i] = c.popcount() as u16;
            }
        }
        PreparedSubject {
            codes,
            pops,
            blob: tenprint.to_blob(),
        }
    }

    /// The ten-print as it will be stored (decoded from the compact blob).
    pub fn tenprint(&self) -> TenPrint {
        TenPrint::from_blob(&self.blob)
    }
}

/// Gallery subjects sampled to standardise a probe's code similarities ([`Gallery::code_norm`]).
pub const COHORT: usize = 1024;

/// Per-finger standardisation of a probe's code similarities against the gallery (Z-norm
/// with a cohort of the gallery itself): `z_f = (phi_f − mu[f]) · inv_sd[f]`. Fingers with few
/// or dense minutiae have impostor similarities with their own mean and spread; expressing
/// each finger's similarity in its own impostor standard deviations puts the ten on one
/// scale before they are fused. `inv_sd` is 0 for fingers the probe lacks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CodeNorm {
    pub mu: [f32; 10],
    pub inv_sd: [f32; 10],
}

/// Gallery size at which [`IdentifyOptions::shortlist`] applies in full: a smaller gallery
/// (or shard) gets a proportionally shorter shortlist ([`IdentifyOptions::shortlist_for`]).
pub const SHORTLIST_REFERENCE_SUBJECTS: usize = 1_000_000;

/// Search parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentifyOptions {
    /// Candidate-stage shortlist size per probe (subjects sent to the precise stage) in a
    /// gallery of [`SHORTLIST_REFERENCE_SUBJECTS`] or more; see [`Self::shortlist_for`].
    pub shortlist: usize,
    /// The shortest shortlist of a small gallery ([`Self::shortlist_for`]).
    pub min_shortlist: usize,
    /// Fingers compared per shortlisted subject in the first precise pass.
    pub lead_fingers: usize,
    /// Subjects compared on all fingers in the second precise pass.
    pub full_compare: usize,
    /// Maximum candidates returned.
    pub max_results: usize,
    /// Minimum fused score (−log10 FMR) for a candidate to be returned.
    pub min_score: f64,
    /// Bytes of expanded templates a gallery (each shard) may keep for later searches: the
    /// cylinders of every subject the precise stage compared, built once instead of at every
    /// search that shortlists the subject (see [`Gallery::expanded_cache_bytes`]). 0 keeps
    /// none.
    pub expanded_cache_bytes: usize,
}

impl Default for IdentifyOptions {
    fn default() -> Self {
        IdentifyOptions {
            // Deep enough for the candidate stage at a million subjects (BENCH_DEDUP.md:
            // recall by shortlist depth); the precise cascade compares 2 fingers of each.
            shortlist: 2000,
            // Candidate recall at 500 equals recall at 2,000 at 10k, 100k and 1M
            // (BENCH_DEDUP.md), and at 100k a depth of 500 reaches as deep into the impostor
            // distribution as 5,000 would at 1M.
            min_shortlist: 500,
            lead_fingers: 2,
            full_compare: 12,
            max_results: 10,
            min_score: 0.0,
            // A library gallery stays at its compact size unless asked; the dedup stage
            // configures this (`[dedup] expanded_cache_mib`).
            expanded_cache_bytes: 0,
        }
    }
}

impl IdentifyOptions {
    /// The shortlist of a search in a gallery (or shard) of `subjects`: `shortlist` scaled by
    /// `subjects / SHORTLIST_REFERENCE_SUBJECTS`, never below `min_shortlist` nor above
    /// `shortlist`.
    ///
    /// Why scale: a mate is lost by the candidate stage when more impostors outscore it than
    /// the shortlist holds, and the expected number of impostors above a given score is
    /// proportional to the gallery size. A depth of `d` in a gallery of `N` therefore keeps
    /// the mate as often as a depth of `d × 1M / N` does at 1M, and the full `shortlist`
    /// over a small gallery buys no recall, only precise comparisons: at 20,000 subjects the
    /// full 2,000 is a tenth of the gallery (0.3 core-s per search), which made the cost per
    /// application of a night grow with the night (issue 16). With the scaled depth the
    /// precise stage costs at most `min_shortlist` subjects per search below
    /// `min_shortlist × 1M / shortlist` subjects (250,000 by default) and the configured
    /// depth at 1M, where recall was measured.
    pub fn shortlist_for(&self, subjects: usize) -> usize {
        let scaled = (self.shortlist as u128 * subjects as u128)
            .div_ceil(SHORTLIST_REFERENCE_SUBJECTS as u128);
        let scaled = usize::try_from(scaled).unwrap_or(usize::MAX);
        scaled.clamp(self.min_shortlist.min(self.shortlist), self.shortlist)
    }
}

/// A gallery subject returned by a search, with evidence for adjudication.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub reference_id: String,
    /// Fused score and per-finger scores.
    pub fused: FusedScore,
    /// Candidate-stage score (sum over fingers of the positive standardised code correlation
    /// to the power 1.5, × 10⁶; see [`Gallery::shortlist`]).
    pub prefilter: i64,
}

/// Outcome of a 1:1 verification.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verification {
    pub fused: FusedScore,
    /// Whether the fused FMR is at or below the requested FMR.
    pub is_match: bool,
}

/// Precise scores of each finger position present in both.
fn finger_scores(probe: &Probe, reference: &TenPrint) -> [Option<f32>; 10] {
    let mut scores = [None; 10];
    for (slot, (p, r)) in scores
        .iter_mut()
        .zip(probe.templates.iter().zip(&reference.fingers))
    {
        if let (Some(p), Some(r)) = (p, r) {
            *slot = Some(compare(p, &FingerTemplate::new(r)));
        }
    }
    scores
}

/// 1:1 comparison of a probe against a stored ten-print (pickup handover).
pub fn verify(
    probe: &Probe,
    reference: &TenPrint,
    target_fmr: f64,
    calibration: &Calibration,
) -> Verification {
    verification(finger_scores(probe, reference), target_fmr, calibration)
}

/// The fused verdict of per-finger scores at `target_fmr`.
fn verification(
    scores: [Option<f32>; 10],
    target_fmr: f64,
    calibration: &Calibration,
) -> Verification {
    let fused = fuse(scores, calibration);
    Verification {
        is_match: fused.fmr <= target_fmr,
        fused,
    }
}

/// A shortlisted subject after the first precise pass: (partial fused score, prefilter
/// score, slot, its templates, finger scores so far).
type Partial<'a> = (f64, i64, u32, Reference<'a>, [Option<f32>; 10]);

/// A subject's ten fingers in expanded form (geometry and cylinders), kept by the gallery's
/// expanded-template cache.
struct ExpandedSubject {
    fingers: [Option<FingerTemplate>; 10],
    /// What keeping it costs ([`FingerTemplate::memory_bytes`] of each finger and the box).
    bytes: usize,
}

impl ExpandedSubject {
    fn new(tenprint: &TenPrint) -> Self {
        Self::of(std::array::from_fn(|f| {
            tenprint.fingers[f].as_ref().map(FingerTemplate::new)
        }))
    }

    fn of(fingers: [Option<FingerTemplate>; 10]) -> Self {
        let bytes = std::mem::size_of::<Self>()
            + fingers
                .iter()
                .flatten()
                .map(|t| t.memory_bytes() - std::mem::size_of::<FingerTemplate>())
                .sum::<usize>();
        ExpandedSubject { fingers, bytes }
    }
}

/// A shortlisted subject's fingers as the precise stage reads them: expanded once and kept
/// by the gallery, or the stored compact form, expanded for each comparison.
enum Reference<'a> {
    Expanded(&'a ExpandedSubject),
    Compact(Box<TenPrint>),
}

impl Reference<'_> {
    fn has(&self, f: usize) -> bool {
        match self {
            Reference::Expanded(e) => e.fingers[f].is_some(),
            Reference::Compact(tp) => tp.fingers[f].is_some(),
        }
    }

    /// Score of finger `f` against the probe's template of it (`None` if the subject lacks it).
    fn compare(&self, probe: &FingerTemplate, f: usize) -> Option<f32> {
        match self {
            Reference::Expanded(e) => e.fingers[f].as_ref().map(|r| compare(probe, r)),
            Reference::Compact(tp) => tp.fingers[f]
                .as_ref()
                .map(|r| compare(probe, &FingerTemplate::new(r))),
        }
    }
}

/// The in-memory gallery.
pub struct Gallery {
    ids: Vec<String>,
    index: HashMap<String, u32>,
    codes: Vec<u64>,
    pops: Vec<u16>,
    /// Gallery-side normalisation of every enrolled finger (10 per slot): mean and inverse
    /// spread of its code similarity against the cohort ([`GalleryCohort`]); an inverse
    /// spread of 0 means "not known yet" (galleries smaller than [`MIN_COHORT`]).
    finger_norms: Vec<FingerNorm>,
    cohort: GalleryCohort,
    blobs: Vec<Box<[u8]>>,
    /// The expanded-template cache, one cell per slot: filled the first time the precise
    /// stage compares the subject while [`Self::expanded_bytes`] is under the search's
    /// [`IdentifyOptions::expanded_cache_bytes`], emptied when the subject is re-enrolled or
    /// deleted. Rebuilding cylinders from the compact minutiae is four fifths of the precise
    /// stage's cost (BENCH_DEDUP.md), and in a gallery of up to a few hundred thousand
    /// subjects every subject is shortlisted again and again (a 500-subject shortlist is a
    /// quarter of a 2,000-subject gallery).
    expanded: Vec<OnceLock<Box<ExpandedSubject>>>,
    /// Bytes held by `expanded`.
    expanded_bytes: AtomicUsize,
    calibration: Arc<Calibration>,
}

/// The probe's side of the candidate score ([`Gallery::shortlist`]), worked out once per search
/// instead of once per enrolled finger.
struct ScanProbe<'a> {
    codes: &'a [u64; STRIDE],
    pops: [u32; 10],
    /// 1/√(p(B−p)) of each finger's popcount. Lanes 10 and 11 are 0 (see `slot_score`).
    inverse_norm: [f32; 12],
    mu: [f32; 12],
    inv_sd: [f32; 12],
    table: &'static [f32; CODE_BITS as usize + 1],
}

impl<'a> ScanProbe<'a> {
    fn new(probe: &'a Probe, norm: &CodeNorm) -> Self {
        let table = inverse_norms();
        ScanProbe {
            codes: &probe.codes,
            pops: probe.pops,
            inverse_norm: pad(probe.pops.map(|p| table[p.min(CODE_BITS) as usize])),
            mu: pad(norm.mu),
            inv_sd: pad(norm.inv_sd),
            table,
        }
    }
}

/// Ten per-finger values and two zeros.
fn pad(ten: [f32; 10]) -> [f32; 12] {
    let mut twelve = [0f32; 12];
    twelve[..10].copy_from_slice(&ten);
    twelve
}

/// The best `k` (score, slot) pairs of a scan, exactly (by score, then slot).
///
/// Pairs at or above the floor are appended; whenever `2k` have gathered, the best `k` are
/// selected (`select_nth_unstable`, linear) and the floor rises to the lowest score kept. A
/// pair below the floor cannot make the shortlist, and after the first few thousand slots
/// most of a gallery scores below it, so a slot costs one comparison. (A bounded binary heap,
/// before 8 December, paid a push and a pop for every slot above its floor: in a gallery of
/// 20,000 split in eight chunks, about half the slots of every chunk with a shortlist of 500.)
struct TopK {
    k: usize,
    kept: Vec<(i64, u32)>,
    floor: i64,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            kept: Vec::with_capacity(2 * k),
            floor: i64::MIN,
        }
    }

    #[inline(always)]
    fn admit(&mut self, score: i64, slot: u32) {
        self.kept.push((score, slot));
        if self.kept.len() >= 2 * self.k {
            self.compact();
        }
    }

    /// Keeps the best `k` and raises the floor to the lowest score among them.
    fn compact(&mut self) {
        if self.kept.len() > self.k {
            self.kept
                .select_nth_unstable_by(self.k - 1, |a, b| b.cmp(a));
            self.kept.truncate(self.k);
        }
        if self.kept.len() == self.k {
            self.floor = self.kept.iter().map(|e| e.0).min().unwrap_or(i64::MIN);
        }
    }

    /// The best `k`, best first.
    fn into_sorted(mut self) -> Vec<(i64, u32)> {
        self.compact();
        self.kept.sort_unstable_by(|a, b| b.cmp(a));
        self.kept
    }
}

/// Mean and inverse standard deviation of one enrolled finger's code similarity to unrelated
/// subjects (the cohort).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct FingerNorm {
    mu: f32,
    inv_sd: f32,
}

/// Smallest cohort against which gallery-side norms are computed.
pub const MIN_COHORT: usize = 16;

/// The reference population of the gallery-side normalisation: copies of the codes of the
/// first [`COHORT`] subjects ever enrolled (kept when they are deleted or re-enrolled, so a
/// norm never changes under a subject's feet once the cohort is complete).
///
/// While the cohort fills, the norms of every enrolled subject are recomputed each time it
/// doubles (16, 32, …, 1,024 subjects: a few million code comparisons in all); in between, a
/// new subject is normalised against the cohort as it stood at the last doubling. Once it
/// is complete a subject's norm depends only on its own codes, so enrolment can compute it
/// on any thread ([`Gallery::insert_many`]).
#[derive(Debug)]
struct GalleryCohort {
    codes: Vec<u64>,
    pops: Vec<u16>,
    /// Members the current norms were computed against (a prefix of the cohort).
    normed_against: usize,
    /// Members when complete ([`COHORT`]; smaller in unit tests).
    size: usize,
}

impl Default for GalleryCohort {
    fn default() -> Self {
        GalleryCohort {
            codes: Vec::new(),
            pops: Vec::new(),
            normed_against: 0,
            size: COHORT,
        }
    }
}

impl GalleryCohort {
    fn len(&self) -> usize {
        self.pops.len() / 10
    }

    fn is_complete(&self) -> bool {
        self.normed_against >= self.size
    }

    /// Norms of one subject's fingers against the first `normed_against` members; a member
    /// with exactly the subject's codes (the subject itself, or an exact copy) is skipped.
    fn norms_of(&self, codes: &[u64], pops: &[u16]) -> [FingerNorm; 10] {
        let mut out = [FingerNorm::default(); 10];
        let members = self.normed_against;
        if members < MIN_COHORT {
            return out;
        }
        let own: Vec<bool> = (0..members)
            .map(|c| self.codes[c * STRIDE..(c + 1) * STRIDE] == *codes)
            .collect();
        for (f, norm) in out.iter_mut().enumerate() {
            if pops[f] == 0 {
                continue;
            }
            let others = own
                .iter()
                .enumerate()
                .filter(|(_, own)| !**own)
                .map(|(c, _)| {
                    let at = c * STRIDE + f * CODE_WORDS;
                    (&self.codes[at..at + CODE_WORDS], self.pops[c * 10 + f])
                });
            let code = &codes[f * CODE_WORDS..(f + 1) * CODE_WORDS];
            if let Some((mu, sd)) =
                similarity_stats(code, u32::from(pops[f]), others, MIN_COHORT as u32 / 2)
            {
                *norm = FingerNorm {
                    mu: mu as f32,
                    inv_sd: (1.0 / sd) as f32,
                };
            }
        }
        out
    }
}

/// Mean and spread of the code similarity of `code` (popcount `pop`) to `others` (codes of
/// the same finger position with their popcounts; empty ones are skipped), or `None` when
/// fewer than `min` were compared. The spread is never below that of two independent random
/// codes (1/√B), so a small or peculiar cohort cannot blow a finger's weight up.
fn similarity_stats<'a>(
    code: &[u64],
    pop: u32,
    others: impl Iterator<Item = (&'a [u64], u16)>,
    min: u32,
) -> Option<(f64, f64)> {
    let (mut k, mut s1, mut s2) = (0u32, 0f64, 0f64);
    for (other, other_pop) in others {
        if other_pop == 0 {
            continue;
        }
        let v = f64::from(code_similarity(code, pop, other, u32::from(other_pop)));
        k += 1;
        s1 += v;
        s2 += v * v;
    }
    if k < min {
        return None;
    }
    let mu = s1 / f64::from(k);
    let sd = (s2 / f64::from(k) - mu * mu)
        .max(0.0)
        .sqrt()
        .max(1.0 / f64::from(CODE_BITS).sqrt());
    Some((mu, sd))
}

impl fmt::Debug for Gallery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gallery")
            .field("subjects", &self.ids.len())
            .finish()
    }
}

impl Default for Gallery {
    fn default() -> Self {
        Self::new()
    }
}

impl Gallery {
    /// An empty gallery using the shipped calibration fitted on real impostor scores
    /// ([`Calibration::fvc2002`]).
    pub fn new() -> Self {
        Self::with_calibration(Arc::new(Calibration::fvc2002().clone()))
    }

    /// An empty gallery with a given calibration.
    pub fn with_calibration(calibration: Arc<Calibration>) -> Self {
        Gallery {
            ids: Vec::new(),
            index: HashMap::new(),
            codes: Vec::new(),
            pops: Vec::new(),
            finger_norms: Vec::new(),
            cohort: GalleryCohort::default(),
            blobs: Vec::new(),
            expanded: Vec::new(),
            expanded_bytes: AtomicUsize::new(0),
            calibration,
        }
    }

    /// The calibration in use.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// Replaces the calibration (e.g. one fitted on real impostor comparisons).
    pub fn set_calibration(&mut self, calibration: Arc<Calibration>) {
        self.calibration = calibration;
    }

    /// Number of enrolled subjects.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the gallery is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `reference_id` is enrolled.
    pub fn contains(&self, reference_id: &str) -> bool {
        self.index.contains_key(reference_id)
    }

    /// Reserves room for `additional` subjects.
    pub fn reserve(&mut self, additional: usize) {
        self.ids.reserve(additional);
        self.index.reserve(additional);
        self.codes.reserve(additional * STRIDE);
        self.pops.reserve(additional * 10);
        self.finger_norms.reserve(additional * 10);
        self.blobs.reserve(additional);
    }

    /// Enrols (or re-enrols, replacing the data) `reference_id`. Returns `true` if the id was
    /// new. Idempotent: inserting the same id twice leaves one entry.
    ///
    /// Prepares the subject on the calling thread ([`PreparedSubject::new`]) then appends it
    /// ([`Gallery::insert_ready`]); callers enrolling many subjects, or holding a lock on the
    /// gallery, should prepare first and call `insert_ready` so the costly part runs outside.
    pub fn insert(&mut self, reference_id: &str, tenprint: &TenPrint) -> bool {
        self.insert_ready(reference_id, PreparedSubject::new(tenprint))
    }

    /// Enrols (or re-enrols, replacing the data) a subject prepared beforehand. Returns `true`
    /// if the id was new; same result as [`Gallery::insert`] on the original ten-print. Copies
    /// the codes into the contiguous code array, the blob and the id into their slot, and
    /// normalises the subject's fingers against the cohort (10 × up to [`COHORT`] code
    /// comparisons, ≈ 0.1 ms; see [`Gallery::shortlist`]).
    pub fn insert_ready(&mut self, reference_id: &str, subject: PreparedSubject) -> bool {
        let grows_cohort =
            !self.index.contains_key(reference_id) && self.cohort.len() < self.cohort.size;
        if grows_cohort {
            self.cohort.codes.extend_from_slice(&subject.codes);
            self.cohort.pops.extend_from_slice(&subject.pops);
        }
        let len = self.cohort.len();
        if grows_cohort && len >= MIN_COHORT && (len.is_power_of_two() || len == self.cohort.size) {
            // The cohort doubled: every norm is recomputed against it, this subject's too.
            self.cohort.normed_against = len;
            let norms = self.cohort.norms_of(&subject.codes, &subject.pops);
            let new = self.append(reference_id, subject, norms);
            self.renormalise_all();
            return new;
        }
        let norms = self.cohort.norms_of(&subject.codes, &subject.pops);
        self.append(reference_id, subject, norms)
    }

    /// Enrols (or re-enrols) the subject a probe was built from: the same gallery as
    /// [`Gallery::insert`] of its ten-print, without expanding its fingers again. While the
    /// expanded-template cache holds less than `cache_budget` bytes
    /// ([`IdentifyOptions::expanded_cache_bytes`]), the probe's expanded templates are kept
    /// for the searches that will shortlist this subject. Returns `true` if the id was new.
    pub fn insert_probe(&mut self, reference_id: &str, probe: &Probe, cache_budget: usize) -> bool {
        let new = self.insert_ready(reference_id, probe.prepared_subject());
        let s = self.index[reference_id] as usize;
        if self.cache_has_room(cache_budget) {
            let kept = ExpandedSubject::of(probe.templates.clone());
            let bytes = kept.bytes;
            // The cell is empty: a new slot, or a re-enrolment whose old expansion `append`
            // dropped.
            if self.expanded[s].set(Box::new(kept)).is_ok() {
                *self.expanded_bytes.get_mut() += bytes;
            }
        }
        new
    }

    /// Enrols many prepared subjects; the same gallery as [`Gallery::insert_ready`] called for
    /// each in order, but once the cohort is complete the normalisation of the subjects runs
    /// on all cores.
    pub fn insert_many(&mut self, subjects: Vec<(String, PreparedSubject)>) {
        let mut rest = subjects.into_iter();
        while !self.cohort.is_complete() {
            match rest.next() {
                Some((id, subject)) => {
                    self.insert_ready(&id, subject);
                }
                None => return,
            }
        }
        let rest: Vec<(String, PreparedSubject)> = rest.collect();
        let cohort = &self.cohort;
        let norms: Vec<[FingerNorm; 10]> = rest
            .par_iter()
            .map(|(_, s)| cohort.norms_of(&s.codes, &s.pops))
            .collect();
        for ((id, subject), norms) in rest.into_iter().zip(norms) {
            self.append(&id, subject, norms);
        }
    }

    fn append(
        &mut self,
        reference_id: &str,
        subject: PreparedSubject,
        norms: [FingerNorm; 10],
    ) -> bool {
        let PreparedSubject { codes, pops, blob } = subject;
        if let Some(&slot) = self.index.get(reference_id) {
            let s = slot as usize;
            self.forget_expansion(s);
            self.codes[s * STRIDE..(s + 1) * STRIDE].copy_from_slice(&codes);
            self.pops[s * 10..(s + 1) * 10].copy_from_slice(&pops);
            self.finger_norms[s * 10..(s + 1) * 10].copy_from_slice(&norms);
            self.blobs[s] = blob;
            return false;
        }
        let slot = self.ids.len() as u32;
        self.ids.push(reference_id.to_owned());
        self.index.insert(reference_id.to_owned(), slot);
        self.codes.extend_from_slice(&codes);
        self.pops.extend_from_slice(&pops);
        self.finger_norms.extend_from_slice(&norms);
        self.blobs.push(blob);
        self.expanded.push(OnceLock::new());
        true
    }

    /// Drops the kept expansion of slot `s`, if any (its subject changes or leaves).
    fn forget_expansion(&mut self, s: usize) {
        if let Some(gone) = self.expanded[s].take() {
            *self.expanded_bytes.get_mut() -= gone.bytes;
        }
    }

    /// The expanded templates of slot `s`: kept from an earlier search, or built now and kept
    /// while the cache holds less than `budget` bytes (it may end up to one subject per
    /// searching thread over). `None` over budget: the caller expands only the fingers it
    /// compares, as with no cache.
    fn expansion(&self, s: usize, budget: usize) -> Option<&ExpandedSubject> {
        let cell = &self.expanded[s];
        if let Some(kept) = cell.get() {
            return Some(kept);
        }
        if !self.cache_has_room(budget) {
            return None;
        }
        Some(cell.get_or_init(|| {
            let e = ExpandedSubject::new(&TenPrint::from_blob(&self.blobs[s]));
            self.expanded_bytes.fetch_add(e.bytes, Ordering::Relaxed);
            Box::new(e)
        }))
    }

    /// Whether the expanded-template cache may keep one more subject under `budget` bytes.
    fn cache_has_room(&self, budget: usize) -> bool {
        budget > 0 && self.expanded_bytes.load(Ordering::Relaxed) < budget
    }

    /// Drops every kept expansion (benchmarks comparing with and without the cache).
    pub fn clear_expanded_cache(&mut self) {
        for cell in &mut self.expanded {
            cell.take();
        }
        *self.expanded_bytes.get_mut() = 0;
    }

    /// Bytes of expanded templates the gallery keeps ([`IdentifyOptions::expanded_cache_bytes`]).
    pub fn expanded_cache_bytes(&self) -> usize {
        self.expanded_bytes.load(Ordering::Relaxed)
    }

    /// Recomputes every subject's norms against the current cohort (it doubled).
    fn renormalise_all(&mut self) {
        let cohort = &self.cohort;
        let codes = &self.codes;
        let pops = &self.pops;
        self.finger_norms
            .par_chunks_mut(10)
            .enumerate()
            .for_each(|(s, out)| {
                out.copy_from_slice(&cohort.norms_of(
                    &codes[s * STRIDE..(s + 1) * STRIDE],
                    &pops[s * 10..(s + 1) * 10],
                ));
            });
    }

    /// Removes `reference_id`; returns whether it was present. O(1): the last slot moves in.
    pub fn delete(&mut self, reference_id: &str) -> bool {
        let Some(slot) = self.index.remove(reference_id) else {
            return false;
        };
        let s = slot as usize;
        let last = self.ids.len() - 1;
        self.forget_expansion(s);
        self.expanded.swap(s, last);
        self.expanded.pop();
        if s != last {
            self.codes
                .copy_within(last * STRIDE..(last + 1) * STRIDE, s * STRIDE);
            self.pops.copy_within(last * 10..(last + 1) * 10, s * 10);
            self.finger_norms
                .copy_within(last * 10..(last + 1) * 10, s * 10);
            self.ids.swap(s, last);
            self.blobs.swap(s, last);
            self.index.insert(self.ids[s].clone(), slot);
        }
        self.ids.pop();
        self.blobs.pop();
        self.codes.truncate(last * STRIDE);
        self.pops.truncate(last * 10);
        self.finger_norms.truncate(last * 10);
        true
    }

    /// The stored ten-print of `reference_id`.
    pub fn get(&self, reference_id: &str) -> Option<TenPrint> {
        self.index
            .get(reference_id)
            .map(|&s| TenPrint::from_blob(&self.blobs[s as usize]))
    }

    /// Approximate heap bytes held (capacities of all containers, blobs and ids).
    pub fn memory_bytes(&self) -> usize {
        let blobs: usize = self.blobs.iter().map(|b| b.len() + 16).sum();
        let ids: usize = self.ids.iter().map(|s| s.capacity()).sum();
        self.codes.capacity() * 8
            + self.pops.capacity() * 2
            + self.finger_norms.capacity() * std::mem::size_of::<FingerNorm>()
            + self.cohort.codes.capacity() * 8
            + self.cohort.pops.capacity() * 2
            + self.blobs.capacity() * 16
            + blobs
            + self.ids.capacity() * 24
            + 2 * ids
            // hashbrown: key (24 B) + value (4 B, padded to 8) + 1 control byte per bucket
            + self.index.capacity() * 33
            + self.expanded.capacity() * std::mem::size_of::<OnceLock<Box<ExpandedSubject>>>()
            + self.expanded_cache_bytes()
    }

    /// Cohort normalisation of a probe's code similarities (see [`CodeNorm`]): for every
    /// finger present in the probe, the mean and spread of its code similarity against up to
    /// [`COHORT`] gallery subjects spread evenly over the slots (all of them in a smaller
    /// gallery). Deterministic for a given gallery content.
    pub fn code_norm(&self, probe: &Probe) -> CodeNorm {
        let n = self.ids.len();
        let take = n.min(COHORT);
        let mut norm = CodeNorm::default();
        for f in 0..10 {
            if probe.pops[f] == 0 {
                continue;
            }
            let pc = &probe.codes[f * CODE_WORDS..(f + 1) * CODE_WORDS];
            let sample = (0..take).map(|c| {
                let slot = c * n / take;
                let at = slot * STRIDE + f * CODE_WORDS;
                (&self.codes[at..at + CODE_WORDS], self.pops[slot * 10 + f])
            });
            // Too small a gallery: no centring, and the spread of random codes.
            let (mu, sd) = similarity_stats(pc, probe.pops[f], sample, 16)
                .unwrap_or((0.0, 1.0 / f64::from(CODE_BITS).sqrt()));
            norm.mu[f] = mu as f32;
            norm.inv_sd[f] = (1.0 / sd) as f32;
        }
        norm
    }

    /// Candidate stage only: best `shortlist` slots per probe, as (prefilter score, slot),
    /// best first. `parallel = false` runs on the calling thread (for per-core figures).
    ///
    /// The candidate score of a subject is `Σ_f max(0, z_f)^1.5` over the fingers present in
    /// both, with `z_f` the mean of two standard scores of the finger's code similarity: one
    /// against the probe's impostor distribution ([`CodeNorm`], a cohort of the gallery
    /// measured per search) and one against the enrolled finger's own impostor distribution
    /// (its [`FingerNorm`], measured against the cohort at enrolment) (× 10⁶, as an integer).
    ///
    /// Both sides matter: some enrolled fingers have codes that correlate with almost every
    /// probe (dense or common bit patterns — "hubs"), and a probe-side norm alone ranks those
    /// above a true mate whose every finger correlates at 0.3–0.5; normalising each enrolled
    /// finger by its own impostor spread (the T-norm of speaker verification, used together
    /// with the probe-side Z-norm as a symmetric normalisation) removes the hubs. Measured
    /// with `examples/cand_lab.rs` (projected recall at 1M from a 40k gallery): 96.5 % → 99.8 %
    /// in the top 200 (BENCH_DEDUP.md).
    ///
    /// The convex transform of the positive excess makes the score behave more like a
    /// likelihood ratio than a plain sum: a few fingers far above chance (a mate whose other
    /// impressions are poor) outweigh many fingers slightly above it (an unrelated subject),
    /// and fingers at or below chance add nothing instead of dragging a mate down. The plain
    /// sum of correlations, top-k sums, squares and cubes of the excess all did worse.
    pub fn shortlist(
        &self,
        probes: &[&Probe],
        shortlist: usize,
        parallel: bool,
    ) -> Vec<Vec<(i64, u32)>> {
        let norms: Vec<CodeNorm> = probes.iter().map(|p| self.code_norm(p)).collect();
        self.shortlist_normed(probes, &norms, shortlist, parallel)
    }

    fn shortlist_normed(
        &self,
        probes: &[&Probe],
        norms: &[CodeNorm],
        shortlist: usize,
        parallel: bool,
    ) -> Vec<Vec<(i64, u32)>> {
        let n = self.ids.len();
        if shortlist == 0 || probes.is_empty() {
            return vec![Vec::new(); probes.len()];
        }
        let sides: Vec<ScanProbe<'_>> = probes
            .iter()
            .zip(norms)
            .map(|(p, norm)| ScanProbe::new(p, norm))
            .collect();
        let scan = |range: std::ops::Range<usize>| -> Vec<TopK> {
            let mut tops: Vec<TopK> = (0..probes.len()).map(|_| TopK::new(shortlist)).collect();
            let mut start = range.start;
            while start < range.end {
                let end = (start + BLOCK).min(range.end);
                for (side, top) in sides.iter().zip(tops.iter_mut()) {
                    for s in start..end {
                        let score = self.slot_score(side, s);
                        if score >= top.floor {
                            top.admit(score, s as u32);
                        }
                    }
                }
                start = end;
            }
            tops
        };
        let tops: Vec<TopK> = if parallel && n > 4 * BLOCK {
            let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(BLOCK);
            let parts: Vec<Vec<TopK>> = (0..n.div_ceil(chunk))
                .into_par_iter()
                .map(|c| scan(c * chunk..((c + 1) * chunk).min(n)))
                .collect();
            let mut merged: Vec<TopK> = (0..probes.len()).map(|_| TopK::new(shortlist)).collect();
            for part in parts {
                for (m, top) in merged.iter_mut().zip(part) {
                    m.kept.extend(top.kept);
                    m.compact();
                }
            }
            merged
        } else {
            scan(0..n)
        };
        tops.into_iter().map(TopK::into_sorted).collect()
    }

    /// Candidate score of slot `s` (see [`Gallery::shortlist`]), × 10⁶ as an integer. The
    /// same arithmetic, in the same order, as [`Self::code_score`], with the probe's side
    /// worked out once per search ([`ScanProbe`]) and the slot's codes, popcounts and norms
    /// read as fixed-size arrays: the scan runs it once per probe and enrolled subject.
    #[inline(always)]
    fn slot_score(&self, p: &ScanProbe<'_>, s: usize) -> i64 {
        let codes: &[u64; STRIDE] = self.codes[s * STRIDE..(s + 1) * STRIDE]
            .try_into()
            .expect("a slot holds STRIDE code words");
        let pops: &[u16; 10] = self.pops[s * 10..(s + 1) * 10]
            .try_into()
            .expect("a slot holds ten popcounts");
        let gallery_norms: &[FingerNorm; 10] = self.finger_norms[s * 10..(s + 1) * 10]
            .try_into()
            .expect("a slot holds ten norms");
        let mut distance = [0u32; 10];
        for (f, d) in distance.iter_mut().enumerate() {
            let a = &p.codes[f * CODE_WORDS..(f + 1) * CODE_WORDS];
            let b = &codes[f * CODE_WORDS..(f + 1) * CODE_WORDS];
            *d = a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum();
        }
        // Each finger's term first, with selects instead of branches, so that the ten run
        // side by side in vector registers; then their sum in finger order, as before.
        // Lanes 10 and 11 pad the ten fingers to three vectors of four; they stay 0.
        let mut pb = [0f32; 12];
        let mut excess = [0f32; 12];
        let mut gallery_mu = [0f32; 12];
        let mut gallery_inv_sd = [0f32; 12];
        let mut scale = [0f32; 12];
        for f in 0..10 {
            // Popcounts are at most B = 768 and products at most B², exact in i32 and in f32.
            let a = p.pops[f] as i32;
            let b = i32::from(pops[f]);
            let both = (a + b - distance[f] as i32) / 2;
            excess[f] = (both * CODE_BITS as i32) as f32 - (a * b) as f32;
            pb[f] = b as f32;
            scale[f] = p.table[usize::from(pops[f]).min(CODE_BITS as usize)];
            gallery_mu[f] = gallery_norms[f].mu;
            gallery_inv_sd[f] = gallery_norms[f].inv_sd;
        }
        let mut terms = [0f32; 12];
        for f in 0..12 {
            let phi = excess[f] * p.inverse_norm[f] * scale[f];
            let probe_z = (phi - p.mu[f]) * p.inv_sd[f];
            let gallery_z = if gallery_inv_sd[f] > 0.0 {
                (phi - gallery_mu[f]) * gallery_inv_sd[f]
            } else {
                probe_z
            };
            let z = 0.5 * (probe_z + gallery_z);
            // A finger missing on either side adds nothing.
            let z = if z > 0.0 && p.inv_sd[f] > 0.0 && pb[f] > 0.0 {
                z
            } else {
                0.0
            };
            terms[f] = z * z.sqrt();
        }
        let mut sum = 0f32;
        for term in &terms[..10] {
            sum += term;
        }
        (sum * 1e6) as i64
    }

    /// The candidate scan as it was before 8 December: a bounded heap per probe and chunk.
    /// Kept to check [`Self::shortlist`] against (its tests) and to measure the two in one
    /// run (`examples/scan_speed.rs`); the shortlists agree except for which of several
    /// subjects tied on the last score are kept.
    #[doc(hidden)]
    pub fn shortlist_heap_reference(
        &self,
        probes: &[&Probe],
        shortlist: usize,
        parallel: bool,
    ) -> Vec<Vec<(i64, u32)>> {
        let norms: Vec<CodeNorm> = probes.iter().map(|p| self.code_norm(p)).collect();
        let n = self.ids.len();
        let scan = |range: std::ops::Range<usize>| -> Vec<BinaryHeap<Reverse<(i64, u32)>>> {
            let mut heaps: Vec<BinaryHeap<Reverse<(i64, u32)>>> = (0..probes.len())
                .map(|_| BinaryHeap::with_capacity(shortlist + 1))
                .collect();
            let mut floors = vec![i64::MIN; probes.len()];
            let mut start = range.start;
            while start < range.end {
                let end = (start + BLOCK).min(range.end);
                for (p, probe) in probes.iter().enumerate() {
                    let heap = &mut heaps[p];
                    let norm = &norms[p];
                    for s in start..end {
                        let score = (self.code_score(probe, norm, s) * 1e6) as i64;
                        if score > floors[p] || heap.len() < shortlist {
                            heap.push(Reverse((score, s as u32)));
                            if heap.len() > shortlist {
                                heap.pop();
                            }
                            if heap.len() == shortlist {
                                floors[p] = heap.peek().map_or(i64::MIN, |r| r.0.0);
                            }
                        }
                    }
                }
                start = end;
            }
            heaps
        };
        let heaps: Vec<BinaryHeap<Reverse<(i64, u32)>>> = if parallel && n > 4 * BLOCK {
            let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(BLOCK);
            let parts: Vec<_> = (0..n.div_ceil(chunk))
                .into_par_iter()
                .map(|c| scan(c * chunk..((c + 1) * chunk).min(n)))
                .collect();
            let mut merged: Vec<BinaryHeap<Reverse<(i64, u32)>>> =
                (0..probes.len()).map(|_| BinaryHeap::new()).collect();
            for part in parts {
                for (p, h) in part.into_iter().enumerate() {
                    for e in h {
                        merged[p].push(e);
                        if merged[p].len() > shortlist {
                            merged[p].pop();
                        }
                    }
                }
            }
            merged
        } else {
            scan(0..n)
        };
        heaps
            .into_iter()
            .map(|h| {
                let mut v: Vec<(i64, u32)> = h.into_iter().map(|r| r.0).collect();
                v.sort_unstable_by(|a, b| b.cmp(a));
                v
            })
            .collect()
    }

    /// Candidate score of one slot (see [`Gallery::shortlist`]), before fixed-point scaling.
    #[inline(always)]
    fn code_score(&self, probe: &Probe, norm: &CodeNorm, slot: usize) -> f32 {
        let mut sum = 0f32;
        for f in 0..10 {
            let z = self.finger_z(probe, norm, slot, f);
            // A finger missing on either side adds nothing.
            let z = if z > 0.0 && norm.inv_sd[f] > 0.0 && self.pops[slot * 10 + f] > 0 {
                z
            } else {
                0.0
            };
            sum += z * z.sqrt();
        }
        sum
    }

    /// Standardised code similarity of finger `f` between a probe and a slot: the mean of
    /// the probe-side ([`CodeNorm`]) and the gallery-side ([`FingerNorm`]) standard scores
    /// (the probe-side one alone while the gallery-side norm is unknown).
    #[inline(always)]
    fn finger_z(&self, probe: &Probe, norm: &CodeNorm, slot: usize, f: usize) -> f32 {
        let at = slot * STRIDE + f * CODE_WORDS;
        let phi = code_similarity(
            &probe.codes[f * CODE_WORDS..(f + 1) * CODE_WORDS],
            probe.pops[f],
            &self.codes[at..at + CODE_WORDS],
            u32::from(self.pops[slot * 10 + f]),
        );
        let probe_z = (phi - norm.mu[f]) * norm.inv_sd[f];
        let g = self.finger_norms[slot * 10 + f];
        let gallery_z = if g.inv_sd > 0.0 {
            (phi - g.mu) * g.inv_sd
        } else {
            probe_z
        };
        0.5 * (probe_z + gallery_z)
    }

    /// Per-finger standardised code similarity between a probe and a slot (`f32::MIN` where
    /// a side lacks the finger).
    fn finger_code_similarities(&self, probe: &Probe, norm: &CodeNorm, slot: usize) -> [f32; 10] {
        let mut out = [f32::MIN; 10];
        for (f, o) in out.iter_mut().enumerate() {
            if probe.templates[f].is_some() && self.pops[slot * 10 + f] > 0 {
                *o = self.finger_z(probe, norm, slot, f);
            }
        }
        out
    }

    /// Precise stage for one probe over shortlisted slots, as a cascade: every shortlisted
    /// subject is first compared on its `lead_fingers` best-agreeing fingers (by code
    /// similarity); only the `full_compare` best of those are compared on all fingers. Most
    /// shortlisted subjects are unrelated and two fingers are enough to see it, which lets the
    /// shortlist be several times longer for the same cost.
    fn rank(
        &self,
        probe: &Probe,
        short: &[(i64, u32)],
        norm: &CodeNorm,
        opts: &IdentifyOptions,
        exclude: Option<&str>,
    ) -> Vec<Candidate> {
        let mut partial: Vec<Partial> = short
            .par_iter()
            .filter(|(_, s)| exclude != Some(self.ids[*s as usize].as_str()))
            .map(|&(pre, s)| {
                let reference = match self.expansion(s as usize, opts.expanded_cache_bytes) {
                    Some(kept) => Reference::Expanded(kept),
                    None => {
                        Reference::Compact(Box::new(TenPrint::from_blob(&self.blobs[s as usize])))
                    }
                };
                let sims = self.finger_code_similarities(probe, norm, s as usize);
                let mut order: Vec<usize> = (0..10)
                    .filter(|&f| sims[f] > f32::MIN && reference.has(f))
                    .collect();
                order.sort_by(|&x, &y| sims[y].total_cmp(&sims[x]));
                let mut scores = [None; 10];
                for &f in order.iter().take(opts.lead_fingers) {
                    if let Some(p) = &probe.templates[f] {
                        scores[f] = reference.compare(p, f);
                    }
                }
                (
                    fuse(scores, &self.calibration).score,
                    pre,
                    s,
                    reference,
                    scores,
                )
            })
            .collect();
        partial.sort_by(|a, b| b.0.total_cmp(&a.0));
        partial.truncate(opts.full_compare);
        let mut out: Vec<Candidate> = partial
            .into_par_iter()
            .map(|(_, pre, s, reference, mut scores)| {
                for (f, slot) in scores.iter_mut().enumerate() {
                    if slot.is_none()
                        && let Some(p) = &probe.templates[f]
                    {
                        *slot = reference.compare(p, f);
                    }
                }
                Candidate {
                    reference_id: self.ids[s as usize].clone(),
                    fused: fuse(scores, &self.calibration),
                    prefilter: pre,
                }
            })
            .filter(|c| c.fused.score >= opts.min_score)
            .collect();
        out.sort_by(|a, b| {
            b.fused
                .score
                .total_cmp(&a.fused.score)
                .then_with(|| a.reference_id.cmp(&b.reference_id))
        });
        out.truncate(opts.max_results);
        out
    }

    /// Two-stage search of one probe. `exclude` drops one reference id (the probe's own
    /// enrolment when searching an already inserted subject).
    pub fn identify(
        &self,
        probe: &Probe,
        opts: &IdentifyOptions,
        exclude: Option<&str>,
    ) -> Vec<Candidate> {
        let norm = self.code_norm(probe);
        let short = self.shortlist_normed(
            &[probe],
            std::slice::from_ref(&norm),
            opts.shortlist_for(self.len()) + usize::from(exclude.is_some()),
            true,
        );
        self.rank(probe, &short[0], &norm, opts, exclude)
    }

    /// Two-stage search of many probes in one candidate-stage pass.
    pub fn identify_batch(&self, probes: &[&Probe], opts: &IdentifyOptions) -> Vec<Vec<Candidate>> {
        let norms: Vec<CodeNorm> = probes.iter().map(|p| self.code_norm(p)).collect();
        let short = self.shortlist_normed(probes, &norms, opts.shortlist_for(self.len()), true);
        probes
            .par_iter()
            .zip(short.par_iter().zip(&norms))
            .map(|(p, (s, norm))| self.rank(p, s, norm, opts, None))
            .collect()
    }

    /// 1:1 verification against an enrolled reference: the same result as [`verify`] with
    /// its ten-print, read from the expanded-template cache when the subject's expansion is
    /// kept (no cylinder rebuilt).
    pub fn verify(
        &self,
        probe: &Probe,
        reference_id: &str,
        target_fmr: f64,
    ) -> Option<Verification> {
        let s = *self.index.get(reference_id)? as usize;
        let reference = match self.expanded[s].get() {
            Some(kept) => Reference::Expanded(kept),
            None => Reference::Compact(Box::new(TenPrint::from_blob(&self.blobs[s]))),
        };
        let scores = std::array::from_fn(|f| {
            probe.templates[f]
                .as_ref()
                .and_then(|p| reference.compare(p, f))
        });
        Some(verification(scores, target_fmr, &self.calibration))
    }

    /// Reference id of a slot returned by [`Gallery::shortlist`].
    pub fn reference_id(&self, slot: u32) -> Option<&str> {
        self.ids.get(slot as usize).map(String::as_str)
    }
}

/// Stable 64-bit FNV-1a hash of a reference id (identical on every process and version).
pub fn reference_hash(reference_id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in reference_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Error of shard operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("reference id belongs to shard {owner}, not to shard {this}")]
    NotOwned { owner: u32, this: u32 },
}

/// One shard of a distributed gallery: the subjects whose [`reference_hash`] modulo `count`
/// equals `index`.
#[derive(Debug)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
    pub gallery: Gallery,
}

impl Shard {
    /// An empty shard `index` of `count`.
    pub fn new(index: u32, count: u32) -> Self {
        assert!(count > 0 && index < count, "shard index out of range");
        Shard {
            index,
            count,
            gallery: Gallery::new(),
        }
    }

    /// Which shard of `count` owns `reference_id`.
    pub fn owner_of(reference_id: &str, count: u32) -> u32 {
        (reference_hash(reference_id) % u64::from(count)) as u32
    }

    /// Whether this shard owns `reference_id`.
    pub fn owns(&self, reference_id: &str) -> bool {
        Self::owner_of(reference_id, self.count) == self.index
    }

    /// Inserts if owned.
    pub fn insert(&mut self, reference_id: &str, tenprint: &TenPrint) -> Result<bool, ShardError> {
        let owner = Self::owner_of(reference_id, self.count);
        if owner != self.index {
            return Err(ShardError::NotOwned {
                owner,
                this: self.index,
            });
        }
        Ok(self.gallery.insert(reference_id, tenprint))
    }

    /// Answers a probe over this shard only.
    pub fn identify(
        &self,
        probe: &Probe,
        opts: &IdentifyOptions,
        exclude: Option<&str>,
    ) -> Vec<Candidate> {
        self.gallery.identify(probe, opts, exclude)
    }
}

/// Merges per-shard candidate lists into one list of at most `max_results`, best first.
/// A reference id appearing twice (e.g. during a resharding overlap) is kept once, with its
/// best score.
pub fn merge_candidates<I: IntoIterator<Item = Vec<Candidate>>>(
    lists: I,
    max_results: usize,
) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = lists.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        b.fused
            .score
            .total_cmp(&a.fused.score)
            .then_with(|| a.reference_id.cmp(&b.reference_id))
    });
    let mut seen = std::collections::HashSet::new();
    all.retain(|c| seen.insert(c.reference_id.clone()));
    all.truncate(max_results);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::PopulationSpec;

    /// The shortlist follows the gallery size between the floor and the configured depth,
    /// so the precise stage's work per search stops growing once the floor is reached.
    #[test]
    fn shortlist_scales_with_the_gallery_between_floor_and_depth() {
        let opts = IdentifyOptions::default();
        assert_eq!((opts.shortlist, opts.min_shortlist), (2000, 500));
        assert_eq!(opts.shortlist_for(0), 500);
        assert_eq!(opts.shortlist_for(2_000), 500);
        assert_eq!(opts.shortlist_for(20_000), 500);
        assert_eq!(opts.shortlist_for(250_000), 500);
        assert_eq!(opts.shortlist_for(250_001), 501);
        assert_eq!(opts.shortlist_for(600_000), 1200);
        assert_eq!(opts.shortlist_for(SHORTLIST_REFERENCE_SUBJECTS), 2000);
        assert_eq!(opts.shortlist_for(50_000_000), 2000);
        assert_eq!(opts.shortlist_for(usize::MAX), 2000);
        // A floor above the depth is the depth (a small configured shortlist is kept).
        let small = IdentifyOptions {
            shortlist: 5,
            ..IdentifyOptions::default()
        };
        assert_eq!(small.shortlist_for(10), 5);
    }

    fn subjects(n: usize) -> Vec<(String, TenPrint)> {
        let spec = PopulationSpec {
            seed: 11,
            subjects: n,
            duplicate_rate: 0.0,
        };
        (0..n)
            .map(|i| {
                let s = spec.subject(i);
                let tp = TenPrint::from_iso(&s.templates).expect("generated records parse");
                (s.reference_id, tp)
            })
            .collect()
    }

    /// The storage of two galleries, slot by slot.
    fn same_storage(a: &Gallery, b: &Gallery) -> bool {
        a.ids == b.ids
            && a.codes == b.codes
            && a.pops == b.pops
            && a.blobs == b.blobs
            && a.finger_norms == b.finger_norms
    }

    /// Mated probes: fresh impressions (session 1) of the first `n` subjects of `subjects`.
    fn fresh_probes(n: usize) -> Vec<Probe> {
        let spec = PopulationSpec {
            seed: 11,
            subjects: n,
            duplicate_rate: 0.0,
        };
        (0..n)
            .map(|i| {
                let records = spec.impressions(spec.person_of(i), 1);
                Probe::new(&TenPrint::from_iso(&records).expect("generated records parse"))
            })
            .collect()
    }

    fn kept_subjects(g: &Gallery) -> usize {
        g.expanded.iter().filter(|c| c.get().is_some()).count()
    }

    /// What the kept expansions weigh, counted one by one (the gallery keeps a running sum).
    fn kept_bytes(g: &Gallery) -> usize {
        g.expanded
            .iter()
            .filter_map(|c| c.get())
            .map(|e| e.bytes)
            .sum()
    }

    /// Keeping expanded templates changes no score: the same candidates, scores and order as
    /// expanding every reference at every search, on the first search (cache filling) and on
    /// the next (cache read).
    #[test]
    fn expanded_cache_changes_no_result() {
        let mut g = Gallery::new();
        for (id, tp) in subjects(40) {
            g.insert(&id, &tp);
        }
        let probes = fresh_probes(6);
        let refs: Vec<&Probe> = probes.iter().collect();
        let plain = IdentifyOptions::default();
        let cached = IdentifyOptions {
            expanded_cache_bytes: 1 << 30,
            ..plain
        };
        let expected = g.identify_batch(&refs, &plain);
        assert_eq!(g.expanded_cache_bytes(), 0, "no budget, nothing kept");
        assert!(expected.iter().all(|c| !c.is_empty()), "mates are found");
        assert_eq!(g.identify_batch(&refs, &cached), expected, "filling");
        assert_eq!(kept_subjects(&g), 40, "all shortlisted subjects kept");
        let bytes = g.expanded_cache_bytes();
        assert!(bytes > 40 * 10 * 1000, "{bytes} B for 400 fingers");
        assert_eq!(g.identify_batch(&refs, &cached), expected, "reading");
        assert_eq!(g.expanded_cache_bytes(), bytes, "nothing kept twice");
        // Read-only use of what is kept, under a zero budget, is still the same.
        assert_eq!(g.identify_batch(&refs, &plain), expected);
        for p in &refs {
            assert_eq!(g.identify(p, &cached, None), g.identify(p, &plain, None));
        }
    }

    /// The budget bounds what is kept (up to one subject per searching thread over it).
    #[test]
    fn expanded_cache_stays_within_its_budget() {
        let mut g = Gallery::new();
        for (id, tp) in subjects(40) {
            g.insert(&id, &tp);
        }
        let probes = fresh_probes(3);
        let refs: Vec<&Probe> = probes.iter().collect();
        let tight = IdentifyOptions {
            expanded_cache_bytes: 1,
            ..IdentifyOptions::default()
        };
        let expected = g.identify_batch(&refs, &IdentifyOptions::default());
        assert_eq!(g.identify_batch(&refs, &tight), expected);
        let kept = kept_subjects(&g);
        assert!(
            (1..=rayon::current_num_threads()).contains(&kept),
            "{kept} subjects kept under a 1-byte budget"
        );
        assert_eq!(g.expanded_cache_bytes(), kept_bytes(&g));
    }

    /// A re-enrolled or deleted subject's kept templates go with it: searches after either
    /// answer as a gallery that never kept anything.
    #[test]
    fn expanded_cache_follows_re_enrolment_and_deletion() {
        let people = subjects(30);
        let mut g = Gallery::new();
        for (id, tp) in &people {
            g.insert(id, tp);
        }
        let probes = fresh_probes(4);
        let refs: Vec<&Probe> = probes.iter().collect();
        let cached = IdentifyOptions {
            expanded_cache_bytes: 1 << 30,
            ..IdentifyOptions::default()
        };
        g.identify_batch(&refs, &cached);
        assert_eq!(kept_subjects(&g), 30);
        // Subject 0 re-enrolled with subject 1's fingers; subject 2 deleted (the last slot
        // moves into its place).
        g.insert(&people[0].0, &people[1].1);
        assert!(g.delete(&people[2].0));
        assert_eq!(kept_subjects(&g), 28);
        let mut fresh = Gallery::new();
        for (id, tp) in &people {
            fresh.insert(id, tp);
        }
        fresh.insert(&people[0].0, &people[1].1);
        fresh.delete(&people[2].0);
        let expected = fresh.identify_batch(&refs, &IdentifyOptions::default());
        assert_eq!(g.identify_batch(&refs, &cached), expected);
        assert_eq!(kept_subjects(&g), 29);
        assert_eq!(g.expanded_cache_bytes(), kept_bytes(&g));
    }

    /// Enrolling from the probe a search used stores what enrolling the ten-print stores,
    /// and the expansions it keeps are those a search would have built: same answers.
    #[test]
    fn enrolling_from_the_probe_equals_enrolling_the_tenprint() {
        let people = subjects(36);
        let budget = 1 << 30;
        let mut from_tenprints = Gallery::new();
        let mut from_probes = Gallery::new();
        for (id, tp) in &people {
            assert!(from_tenprints.insert(id, tp));
            assert!(from_probes.insert_probe(id, &Probe::new(tp), budget));
        }
        assert!(same_storage(&from_tenprints, &from_probes));
        assert_eq!(
            kept_subjects(&from_probes),
            36,
            "every probe's expansion kept"
        );
        assert_eq!(from_probes.expanded_cache_bytes(), kept_bytes(&from_probes));
        let probes = fresh_probes(5);
        let refs: Vec<&Probe> = probes.iter().collect();
        let cached = IdentifyOptions {
            expanded_cache_bytes: budget,
            ..IdentifyOptions::default()
        };
        let expected = from_tenprints.identify_batch(&refs, &IdentifyOptions::default());
        assert!(expected.iter().all(|c| !c.is_empty()), "mates are found");
        assert_eq!(from_probes.identify_batch(&refs, &cached), expected);
        // The searches would have kept the same subjects (the probes' copies weigh a little
        // less: a clone holds no spare vector capacity).
        from_tenprints.identify_batch(&refs, &cached);
        assert_eq!(kept_subjects(&from_tenprints), kept_subjects(&from_probes));
        assert!(from_probes.expanded_cache_bytes() <= from_tenprints.expanded_cache_bytes());
        // Re-enrolment from a probe replaces the data and the kept expansion; without a
        // budget nothing is kept.
        assert!(!from_probes.insert_probe(&people[0].0, &Probe::new(&people[1].1), budget));
        from_tenprints.insert(&people[0].0, &people[1].1);
        assert!(same_storage(&from_tenprints, &from_probes));
        assert_eq!(from_probes.expanded_cache_bytes(), kept_bytes(&from_probes));
        let mut uncached = Gallery::new();
        uncached.insert_probe(&people[0].0, &Probe::new(&people[0].1), 0);
        assert_eq!(uncached.expanded_cache_bytes(), 0);
        assert_eq!(kept_subjects(&uncached), 0);
    }

    /// 1:1 verification reads kept expansions and answers as the stored ten-print does.
    #[test]
    fn verify_with_a_kept_expansion_equals_verify_of_the_tenprint() {
        let people = subjects(12);
        let mut g = Gallery::new();
        for (id, tp) in &people {
            g.insert_probe(id, &Probe::new(tp), 1 << 30);
        }
        assert_eq!(kept_subjects(&g), 12);
        let probes = fresh_probes(3);
        for probe in &probes {
            for (id, tp) in &people {
                let kept = g.verify(probe, id, 1e-3).expect("enrolled");
                let plain = verify(probe, tp, 1e-3, g.calibration());
                assert_eq!(kept.fused.score, plain.fused.score, "{id}");
                assert_eq!(kept.fused.fingers, plain.fused.fingers, "{id}");
                assert_eq!(kept.is_match, plain.is_match, "{id}");
            }
        }
        // Mates verify (the probes are fresh impressions of the first subjects).
        assert!(g.verify(&probes[0], &people[0].0, 1e-3).unwrap().is_match);
        g.clear_expanded_cache();
        let again = g.verify(&probes[0], &people[0].0, 1e-3).unwrap();
        assert_eq!(
            again.fused.score,
            verify(&probes[0], &people[0].1, 1e-3, g.calibration())
                .fused
                .score
        );
        assert!(g.verify(&probes[0], "nobody", 1e-3).is_none());
    }

    #[test]
    fn gallery_side_norms_follow_the_cohort_as_it_doubles_then_freeze() {
        let subjects = subjects(48);
        let mut gallery = Gallery::new();
        gallery.cohort.size = 32;
        for (id, tp) in &subjects[..15] {
            gallery.insert(id, tp);
        }
        // Fewer than MIN_COHORT subjects: no gallery-side norm yet (probe side only).
        assert!(gallery.finger_norms.iter().all(|n| n.inv_sd == 0.0));
        gallery.insert(&subjects[15].0, &subjects[15].1);
        let at_16 = gallery.finger_norms[..10].to_vec();
        for (f, n) in at_16.iter().enumerate() {
            assert_eq!(n.inv_sd > 0.0, gallery.pops[f] > 0, "finger {f}");
            assert!(n.mu.abs() < 1.0 && n.inv_sd <= (CODE_BITS as f32).sqrt() * 1.0001);
        }
        for (id, tp) in &subjects[16..32] {
            gallery.insert(id, tp);
        }
        // The cohort doubled (and is now complete): subject 0 was renormalised against all 32.
        assert_ne!(gallery.finger_norms[..10], at_16[..]);
        assert_eq!(
            gallery.finger_norms[..10],
            gallery
                .cohort
                .norms_of(&gallery.codes[..STRIDE], &gallery.pops[..10])[..]
        );
        let complete = gallery.finger_norms.clone();
        // Deleting a cohort member changes no norm; later subjects use the frozen cohort.
        assert!(gallery.delete(&subjects[5].0));
        for (id, tp) in &subjects[32..] {
            gallery.insert(id, tp);
        }
        assert_eq!(gallery.cohort.len(), 32);
        let slot0 = gallery.finger_norms[..10].to_vec();
        assert_eq!(slot0, complete[..10]);
    }

    /// The exact top `k` of `(score, slot)` pairs, best first, by sorting them all.
    fn top_by_sorting(mut all: Vec<(i64, u32)>, k: usize) -> Vec<(i64, u32)> {
        all.sort_unstable_by(|a, b| b.cmp(a));
        all.truncate(k);
        all
    }

    /// `TopK` keeps exactly what sorting everything would, ties included, for shortlists
    /// shorter than, equal to and longer than the input, and whatever the order of arrival.
    #[test]
    fn top_k_equals_sorting_everything() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        for (n, spread) in [(0usize, 10u64), (1, 10), (5_000, 40), (5_000, 1_000_000)] {
            // A narrow spread of scores makes ties the rule, as zero scores are in a scan.
            let all: Vec<(i64, u32)> = (0..n as u32)
                .map(|slot| ((next() % spread) as i64 - 5, slot))
                .collect();
            for k in [1, 3, 500, 4_999, 5_000, 9_000] {
                let mut top = TopK::new(k);
                for &(score, slot) in &all {
                    if score >= top.floor {
                        top.admit(score, slot);
                    }
                }
                assert_eq!(
                    top.into_sorted(),
                    top_by_sorting(all.clone(), k),
                    "n {n} k {k}"
                );
                // Two halves kept apart then merged, as the parallel scan does.
                let (a, b) = all.split_at(n / 3);
                let mut merged = TopK::new(k);
                for part in [a, b] {
                    let mut top = TopK::new(k);
                    for &(score, slot) in part.iter().rev() {
                        if score >= top.floor {
                            top.admit(score, slot);
                        }
                    }
                    merged.kept.extend(top.kept);
                    merged.compact();
                }
                assert_eq!(merged.into_sorted(), top_by_sorting(all.clone(), k));
            }
        }
    }

    /// The candidate scan gives the scores the bounded-heap scan gave, for the same subjects
    /// (up to which of several subjects tied on the last score are kept), the same on one
    /// thread as on all, and the score of `code_score` for every slot it keeps.
    #[test]
    fn candidate_scan_equals_the_heap_scan_it_replaced() {
        let mut g = Gallery::new();
        let enrolled = subjects(1_300);
        let mut prepared: Vec<(String, PreparedSubject)> = enrolled
            .iter()
            .map(|(id, tp)| (id.clone(), PreparedSubject::new(tp)))
            .collect();
        // One subject with a finger missing, so that the "missing on a side" rule is crossed.
        prepared[7].1.pops[3] = 0;
        prepared[7].1.codes[3 * CODE_WORDS..4 * CODE_WORDS].fill(0);
        g.insert_many(prepared);
        let mut probes = fresh_probes(6);
        probes.extend(
            subjects(1_310)[1_300..]
                .iter()
                .map(|(_, tp)| Probe::new(tp)),
        );
        let refs: Vec<&Probe> = probes.iter().collect();
        for k in [1, 5, 500, 1_300, 2_000] {
            let new = g.shortlist(&refs, k, true);
            assert_eq!(new, g.shortlist(&refs, k, false), "k {k}: one thread");
            let old = g.shortlist_heap_reference(&refs, k, true);
            for (p, (new, old)) in new.iter().zip(&old).enumerate() {
                assert_eq!(new.len(), k.min(1_300), "k {k} probe {p}");
                let scores = |v: &Vec<(i64, u32)>| v.iter().map(|e| e.0).collect::<Vec<_>>();
                assert_eq!(scores(new), scores(old), "k {k} probe {p}: scores");
                let last = new.last().map_or(i64::MIN, |e| e.0);
                let above = |v: &Vec<(i64, u32)>| {
                    let mut s: Vec<u32> = v.iter().filter(|e| e.0 > last).map(|e| e.1).collect();
                    s.sort_unstable();
                    s
                };
                assert_eq!(above(new), above(old), "k {k} probe {p}: subjects");
                let norm = g.code_norm(refs[p]);
                for &(score, slot) in new {
                    let expected = (g.code_score(refs[p], &norm, slot as usize) * 1e6) as i64;
                    assert_eq!(score, expected, "k {k} probe {p} slot {slot}");
                }
            }
        }
    }

    #[test]
    fn insert_many_equals_sequential_inserts() {
        let subjects = subjects(60);
        let prepared: Vec<(String, PreparedSubject)> = subjects
            .iter()
            .map(|(id, tp)| (id.clone(), PreparedSubject::new(tp)))
            .collect();
        let mut sequential = Gallery::new();
        sequential.cohort.size = 24;
        for (id, p) in prepared.clone() {
            sequential.insert_ready(&id, p);
        }
        let mut many = Gallery::new();
        many.cohort.size = 24;
        many.insert_many(prepared);
        assert_eq!(many.len(), 60);
        assert!(same_storage(&sequential, &many));
        assert!(many.finger_norms.iter().any(|n| n.inv_sd > 0.0));
    }

    #[test]
    fn insert_ready_stores_exactly_what_insert_stores() {
        let subjects = subjects(6);
        let mut direct = Gallery::new();
        let mut prepared = Gallery::new();
        // Prepared on other threads, appended here: the parallel enrolment path.
        let ready: Vec<PreparedSubject> = subjects
            .par_iter()
            .map(|(_, tp)| PreparedSubject::new(tp))
            .collect();
        for ((id, tp), p) in subjects.iter().zip(ready) {
            assert!(direct.insert(id, tp));
            assert!(prepared.insert_ready(id, p));
        }
        assert_eq!(prepared.len(), 6);
        assert!(same_storage(&direct, &prepared));
        assert!(direct.codes.iter().any(|&w| w != 0), "codes were computed");
        assert_eq!(prepared.memory_bytes(), direct.memory_bytes());
        for (id, tp) in &subjects {
            assert_eq!(prepared.get(id).as_ref(), Some(tp));
        }
        let probe = Probe::new(&subjects[3].1);
        let opts = IdentifyOptions::default();
        assert_eq!(
            prepared.identify(&probe, &opts, None),
            direct.identify(&probe, &opts, None)
        );
        assert_eq!(
            prepared.identify(&probe, &opts, None)[0].reference_id,
            subjects[3].0
        );
    }

    #[test]
    fn insert_ready_re_enrols_in_place() {
        let subjects = subjects(3);
        let mut gallery = Gallery::new();
        for (id, tp) in &subjects {
            gallery.insert(id, tp);
        }
        // Subject 0's id now carries subject 2's ten-print: same slot, data replaced.
        let replacement = PreparedSubject::new(&subjects[2].1);
        assert_eq!(replacement.tenprint(), subjects[2].1);
        assert!(!gallery.insert_ready(&subjects[0].0, replacement));
        assert_eq!(gallery.len(), 3);
        assert_eq!(gallery.reference_id(0), Some(subjects[0].0.as_str()));
        assert_eq!(gallery.get(&subjects[0].0).as_ref(), Some(&subjects[2].1));
        assert_eq!(
            gallery.codes[..STRIDE],
            gallery.codes[2 * STRIDE..3 * STRIDE]
        );
    }

    #[test]
    fn packed_minutiae_round_trip_losslessly() {
        let finger = |pts: &[(u16, u16, u8)]| Finger {
            minutiae: pts
                .iter()
                .map(|&(x, y, angle)| CanonMinutia { x, y, angle })
                .collect(),
        };
        let cases = [
            finger(&[]),
            finger(&[(0, 0, 0)]),
            finger(&[(351, 447, 255), (1, 2, 3), (200, 17, 128)]),
            // Widest coordinates: 16 bits each.
            finger(&[(u16::MAX, 0, 7), (0, u16::MAX, 250), (4095, 4095, 1)]),
        ];
        for f in &cases {
            let mut out = Vec::new();
            pack_finger(f, &mut out);
            out.extend_from_slice(&[0xAA; 3]); // the next finger's bytes are not read
            let (back, used) = unpack_finger(&out);
            assert_eq!(&back, f);
            assert_eq!(used, out.len() - 3);
        }
        // 26 bits per minutia at 500 dpi: 40 minutiae in 2 + 130 bytes.
        let big = finger(
            &(0..40u16)
                .map(|i| (i * 8, 447 - i, i as u8))
                .collect::<Vec<_>>(),
        );
        let mut out = Vec::new();
        pack_finger(&big, &mut out);
        assert_eq!(out.len(), 2 + 130);
        // More than 255 minutiae: the first 255 are kept.
        let many = finger(&(0..300u16).map(|i| (i, i, 9)).collect::<Vec<_>>());
        let mut out = Vec::new();
        pack_finger(&many, &mut out);
        assert_eq!(unpack_finger(&out).0.minutiae, many.minutiae[..255]);
        // A whole ten-print through the blob.
        let subjects = subjects(2);
        for (_, tp) in &subjects {
            assert_eq!(&TenPrint::from_blob(&tp.to_blob()), tp);
        }
    }

    #[test]
    fn code_norm_standardises_against_the_gallery() {
        let subjects = subjects(40);
        let mut gallery = Gallery::new();
        for (id, tp) in &subjects[1..] {
            gallery.insert(id, tp);
        }
        let probe = Probe::new(&subjects[0].1);
        let norm = gallery.code_norm(&probe);
        for ((&inv_sd, &mu), &pop) in norm.inv_sd.iter().zip(&norm.mu).zip(&probe.pops) {
            assert_eq!(inv_sd > 0.0, pop > 0);
            assert!(inv_sd <= (CODE_BITS as f32).sqrt() * 1.0001);
            assert!(mu.abs() < 1.0, "a correlation");
        }
        // An empty probe finger carries no weight; the score of a slot is finite and ≥ 0.
        assert!((0..gallery.len()).all(|s| {
            let v = gallery.code_score(&probe, &norm, s);
            v.is_finite() && v >= 0.0
        }));
    }

    #[test]
    fn prepared_subject_debug_hides_biometrics() {
        let subjects = subjects(1);
        let p = PreparedSubject::new(&subjects[0].1);
        let coded = p.pops.iter().filter(|&&n| n > 0).count();
        assert!(coded > 0);
        assert_eq!(
            format!("{p:?}"),
            format!("PreparedSubject {{ coded_fingers: {coded}, data: <redacted> }}")
        );
    }
}
