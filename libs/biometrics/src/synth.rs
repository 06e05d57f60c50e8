//! Seeded synthetic populations for tests, demos and benchmarks.
//!
//! Real ten-prints of a population cannot be used to develop or demonstrate a deduplication
//! system, so the pipeline runs on generated ones. The generator models what the matcher has
//! to cope with, not what fingerprints look like as images:
//!
//! * **Master fingers** — a finger-shaped elliptical area, a ridge-flow orientation field
//!   from a zero-pole model (cores and deltas placed per pattern class: loop, whorl or arch),
//!   and 28–75 minutiae placed with a minimum spacing (Poisson-disc) and snapped across the
//!   flow to the ridge period, each pointing along the local ridge flow in one of its two
//!   senses. Neighbouring minutiae therefore have locally
//!   coherent directions, as in real prints.
//! * **Impressions** of a master — global rotation and translation, a smooth non-linear skin
//!   distortion, a partial contact area, positional and angular jitter, and quality-dependent
//!   missing and spurious minutiae and type flips.
//! * **Subjects** — ten masters per person (positions 1–10), one enrolment = one impression of
//!   each; a share of subjects are **planted duplicates**: a person already in the population
//!   enrolled again under another reference id with fresh impressions.
//! * **Faces** — a small distinct portrait JPEG per person (shapes and colours from the
//!   person's seed), enough for adjudication screens and the chip image slot.
//!
//! Everything derives from `(seed, index)` through ChaCha8, so subject *i* can be produced
//! on its own ([`PopulationSpec::subject`]) — a million-subject gallery is streamed, never
//! held as ISO bytes.

use std::f32::consts::{PI, TAU};
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::iso19794_2::{FingerView, FingerprintRecord, Minutia, MinutiaKind};
use crate::matcher::template::CANONICAL_PPCM;

/// Canvas of generated impressions (500 dpi pixels).
pub const IMAGE_WIDTH: u16 = 352;
pub const IMAGE_HEIGHT: u16 = 448;
/// Ridge period at 500 dpi, pixels.
const RIDGE_PERIOD: f32 = 9.0;
/// Minimum distance between two minutiae of a master finger.
const MIN_SPACING: f32 = 10.0;
/// Face image size.
pub const FACE_WIDTH: u16 = 240;
pub const FACE_HEIGHT: u16 = 320;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(parts: &[u64]) -> ChaCha8Rng {
    let mut h = 0x5EED_u64;
    for &p in parts {
        h = mix(h ^ p);
    }
    ChaCha8Rng::seed_from_u64(h)
}

fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Ridge-flow orientation field (zero-pole model).
#[derive(Clone)]
struct OrientationField {
    base: f32,
    cores: Vec<(f32, f32)>,
    deltas: Vec<(f32, f32)>,
    arch_amp: f32,
}

impl OrientationField {
    fn at(&self, x: f32, y: f32) -> f32 {
        let mut t = self.base;
        for &(cx, cy) in &self.cores {
            t += 0.5 * (-(y - cy)).atan2(x - cx);
        }
        for &(dx, dy) in &self.deltas {
            t -= 0.5 * (-(y - dy)).atan2(x - dx);
        }
        if self.cores.is_empty() {
            t += self.arch_amp * (x / 120.0).sin() * (-(y - 150.0) / 200.0).exp().min(1.5);
        }
        t
    }
}

/// A synthetic finger: the ground truth all impressions derive from.
#[derive(Clone)]
pub struct MasterFinger {
    centre: (f32, f32),
    radii: (f32, f32),
    field: OrientationField,
    /// (x, y, direction radians counter-clockwise, is bifurcation)
    minutiae: Vec<(f32, f32, f32, bool)>,
}

impl fmt::Debug for MasterFinger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MasterFinger {{ minutiae: <{} redacted> }}",
            self.minutiae.len()
        )
    }
}

impl MasterFinger {
    /// Generates a master finger from `rng`.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let cx = f32::from(IMAGE_WIDTH) / 2.0 + normal(rng) * 8.0;
        let cy = f32::from(IMAGE_HEIGHT) / 2.0 + normal(rng) * 8.0;
        let rx = rng.random_range(105.0..130.0);
        let ry = rng.random_range(145.0..180.0);
        let class: f32 = rng.random();
        let core = (cx + normal(rng) * 20.0, cy - 30.0 + normal(rng) * 20.0);
        let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
        let field = if class < 0.6 {
            OrientationField {
                base: normal(rng) * 0.15,
                cores: vec![core],
                deltas: vec![(
                    core.0 + side * rng.random_range(50.0..110.0),
                    core.1 + rng.random_range(80.0..140.0),
                )],
                arch_amp: 0.0,
            }
        } else if class < 0.9 {
            OrientationField {
                base: normal(rng) * 0.15,
                cores: vec![(core.0 - 10.0, core.1), (core.0 + 10.0, core.1 + 12.0)],
                deltas: vec![
                    (
                        core.0 - rng.random_range(70.0..110.0),
                        core.1 + rng.random_range(80.0..130.0),
                    ),
                    (
                        core.0 + rng.random_range(70.0..110.0),
                        core.1 + rng.random_range(80.0..130.0),
                    ),
                ],
                arch_amp: 0.0,
            }
        } else {
            OrientationField {
                base: normal(rng) * 0.1,
                cores: Vec::new(),
                deltas: Vec::new(),
                arch_amp: rng.random_range(0.4..0.9),
            }
        };
        let target = (48.0 + normal(rng) * 10.0).clamp(28.0, 75.0) as usize;
        let mut minutiae: Vec<(f32, f32, f32, bool)> = Vec::with_capacity(target);
        let mut attempts = 0;
        while minutiae.len() < target && attempts < target * 60 {
            attempts += 1;
            let (u, v): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
            if u * u + v * v > 1.0 {
                continue;
            }
            let (x, y) = (cx + u * rx, cy + v * ry);
            // Minutiae sit on ridges: snap the position across the local flow to the ridge
            // period, which gives neighbouring minutiae the quantised relative positions of
            // real prints (and impostor comparisons their chance agreement).
            let flow = field.at(x, y);
            let (nx, ny) = (-flow.sin(), -flow.cos());
            let across = x * nx + y * ny;
            let shift = (across / RIDGE_PERIOD).round() * RIDGE_PERIOD - across;
            let (x, y) = (x + shift * nx, y + shift * ny);
            if minutiae
                .iter()
                .any(|m| (m.0 - x).powi(2) + (m.1 - y).powi(2) < MIN_SPACING * MIN_SPACING)
            {
                continue;
            }
            let sense = if rng.random::<bool>() { 0.0 } else { PI };
            let dir = (flow + sense + normal(rng) * 0.08).rem_euclid(TAU);
            minutiae.push((x, y, dir, rng.random_bool(0.45)));
        }
        MasterFinger {
            centre: (cx, cy),
            radii: (rx, ry),
            field,
            minutiae,
        }
    }

    /// Number of true minutiae.
    pub fn len(&self) -> usize {
        self.minutiae.len()
    }

    /// Whether the master has no minutiae.
    pub fn is_empty(&self) -> bool {
        self.minutiae.is_empty()
    }

    /// One impression as a single-view ISO record for finger `position`.
    pub fn impression(&self, rng: &mut impl Rng, position: u8) -> FingerprintRecord {
        let quality: f32 = rng.random_range(30.0..100.0);
        let bad = 1.0 - quality / 100.0;
        let rot = (normal(rng) * 0.20).clamp(-0.6, 0.6);
        let (tx, ty) = (normal(rng) * 18.0, normal(rng) * 18.0);
        // Smooth non-linear distortion: a low-frequency wave plus a radial stretch around
        // the contact centre.
        let amp = rng.random_range(1.5..6.0);
        let (wx, wy) = (
            TAU / rng.random_range(220.0..400.0),
            TAU / rng.random_range(220.0..400.0),
        );
        let (p1, p2) = (rng.random_range(0.0..TAU), rng.random_range(0.0..TAU));
        let stretch = normal(rng) * 0.04;
        let contact = (
            self.centre.0 + normal(rng) * 25.0,
            self.centre.1 + normal(rng) * 30.0,
        );
        let visible = (
            self.radii.0 * rng.random_range(0.75..1.0),
            self.radii.1 * rng.random_range(0.7..1.0),
        );
        let inside = |x: f32, y: f32| {
            ((x - contact.0) / visible.0).powi(2) + ((y - contact.1) / visible.1).powi(2) <= 1.0
        };
        let (cx, cy) = self.centre;
        let (c, s) = (rot.cos(), rot.sin());
        let place = |x: f32, y: f32| -> (f32, f32) {
            let r = ((x - contact.0).powi(2) + (y - contact.1).powi(2)).sqrt();
            let k = stretch * r / 150.0;
            let dx = x + amp * (wy * y + p1).sin() + k * (x - contact.0);
            let dy = y + amp * (wx * x + p2).cos() + k * (y - contact.1);
            // Rotation is counter-clockwise in the y-up frame, i.e. clockwise in image rows.
            let (ux, uy) = (dx - cx, dy - cy);
            (cx + ux * c + uy * s + tx, cy - ux * s + uy * c + ty)
        };
        let mut out: Vec<Minutia> = Vec::with_capacity(self.minutiae.len() + 8);
        let push = |x: f32, y: f32, dir: f32, bif: bool, q: f32, out: &mut Vec<Minutia>| {
            let (x, y) = (x.round(), y.round());
            if x < 0.0 || y < 0.0 || x >= f32::from(IMAGE_WIDTH) || y >= f32::from(IMAGE_HEIGHT) {
                return;
            }
            let angle = ((dir + rot).rem_euclid(TAU) * 256.0 / TAU).round() as u32 % 256;
            out.push(Minutia {
                kind: if bif {
                    MinutiaKind::Bifurcation
                } else {
                    MinutiaKind::RidgeEnding
                },
                x: x as u16,
                y: y as u16,
                angle: angle as u8,
                quality: q.clamp(1.0, 100.0) as u8,
            });
        };
        let p_missing = 0.06 + 0.25 * bad;
        for &(x, y, dir, bif) in &self.minutiae {
            if !inside(x, y) || rng.random::<f32>() < p_missing {
                continue;
            }
            let (px, py) = place(x + normal(rng) * 2.0, y + normal(rng) * 2.0);
            let bif = if rng.random::<f32>() < 0.1 + 0.1 * bad {
                !bif
            } else {
                bif
            };
            push(
                px,
                py,
                dir + normal(rng) * 0.10,
                bif,
                quality + normal(rng) * 10.0,
                &mut out,
            );
        }
        let spurious =
            (self.minutiae.len() as f32 * (0.03 + 0.15 * bad) + normal(rng)).max(0.0) as usize;
        for _ in 0..spurious {
            let (u, v): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
            if u * u + v * v > 1.0 {
                continue;
            }
            let (x, y) = (contact.0 + u * visible.0, contact.1 + v * visible.1);
            let dir = self.field.at(x, y) + if rng.random::<bool>() { 0.0 } else { PI };
            let (px, py) = place(x, y);
            push(
                px,
                py,
                dir + normal(rng) * 0.2,
                rng.random(),
                quality * 0.5,
                &mut out,
            );
        }
        // Extractors report minutiae in their own order; do not leak the master's order.
        for i in (1..out.len()).rev() {
            out.swap(i, rng.random_range(0..=i));
        }
        out.truncate(255);
        FingerprintRecord {
            version: crate::iso19794_2::IsoVersion::V2005,
            capture_equipment: 0,
            width: IMAGE_WIDTH,
            height: IMAGE_HEIGHT,
            x_resolution: CANONICAL_PPCM,
            y_resolution: CANONICAL_PPCM,
            views: vec![FingerView {
                position,
                view_number: 0,
                impression_type: 0,
                quality: quality as u8,
                minutiae: out,
                extended_data: Vec::new(),
                geometry: None,
            }],
        }
    }
}

/// One enrolment: a reference id and ten ISO 19794-2 records (index 0 = position 1).
#[derive(Clone)]
pub struct Subject {
    /// Opaque reference id (no personal data).
    pub reference_id: String,
    /// Index of the subject in its population.
    pub index: usize,
    /// Ground truth: the person enrolled. Duplicates share it with their original.
    pub person: u64,
    /// One 2005-format record per finger position 1..=10.
    pub templates: Vec<Vec<u8>>,
    seed: u64,
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subject")
            .field("reference_id", &self.reference_id)
            .field("index", &self.index)
            .field(
                "templates",
                &format_args!("<{} redacted>", self.templates.len()),
            )
            .finish()
    }
}

impl Subject {
    /// A portrait JPEG of this subject's person (same for a duplicate and its original).
    pub fn face_jpeg(&self) -> Vec<u8> {
        face_jpeg(self.seed, self.person)
    }
}

/// Parameters of a population; subjects are derived from them one by one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PopulationSpec {
    pub seed: u64,
    pub subjects: usize,
    /// Share of subjects that re-enrol an earlier person under a new reference id.
    pub duplicate_rate: f64,
}

impl PopulationSpec {
    /// Whether subject `i` is a planted duplicate, and of which earlier subject.
    pub fn duplicate_of(&self, i: usize) -> Option<usize> {
        if i == 0 {
            return None;
        }
        let mut rng = rng_for(&[self.seed, 1, i as u64]);
        if rng.random_bool(self.duplicate_rate.clamp(0.0, 1.0)) {
            Some(rng.random_range(0..i))
        } else {
            None
        }
    }

    /// The person enrolled as subject `i` (follows duplicate links to the original).
    pub fn person_of(&self, mut i: usize) -> u64 {
        while let Some(j) = self.duplicate_of(i) {
            i = j;
        }
        i as u64
    }

    /// Master finger of `person` at `position` (1..=10).
    pub fn master(&self, person: u64, position: u8) -> MasterFinger {
        MasterFinger::generate(&mut rng_for(&[self.seed, 2, person, u64::from(position)]))
    }

    /// Ten fresh impressions of `person` for capture session `session` (ISO bytes).
    pub fn impressions(&self, person: u64, session: u64) -> Vec<Vec<u8>> {
        (1..=10u8)
            .map(|pos| {
                let master = self.master(person, pos);
                let mut rng = rng_for(&[self.seed, 3, person, session, u64::from(pos)]);
                master
                    .impression(&mut rng, pos)
                    .to_bytes()
                    .expect("generated records are always encodable")
            })
            .collect()
    }

    /// Reference id of subject `i` (cheap: no biometrics generated).
    pub fn subject_reference_id(&self, i: usize) -> String {
        format!("ref-{:016x}", mix(self.seed ^ mix(i as u64 + 1)))
    }

    /// Subject `i`, generated independently of every other subject.
    pub fn subject(&self, i: usize) -> Subject {
        let person = self.person_of(i);
        Subject {
            reference_id: self.subject_reference_id(i),
            index: i,
            person,
            templates: self.impressions(person, i as u64),
            seed: self.seed,
        }
    }
}

/// A fully materialised population (use [`PopulationSpec`] directly for large sizes).
#[derive(Debug, Clone)]
pub struct Population {
    pub spec: PopulationSpec,
    pub subjects: Vec<Subject>,
    /// Planted duplicates as (duplicate subject index, original subject index).
    pub duplicates: Vec<(usize, usize)>,
}

impl Population {
    /// Generates `subjects` subjects, of which about `duplicate_rate` are planted duplicates.
    pub fn generate(seed: u64, subjects: usize, duplicate_rate: f64) -> Self {
        use rayon::prelude::*;
        let spec = PopulationSpec {
            seed,
            subjects,
            duplicate_rate,
        };
        let list: Vec<Subject> = (0..subjects)
            .into_par_iter()
            .map(|i| spec.subject(i))
            .collect();
        let duplicates = (0..subjects)
            .filter_map(|i| spec.duplicate_of(i).map(|j| (i, j)))
            .collect();
        Population {
            spec,
            subjects: list,
            duplicates,
        }
    }

    /// Ten fresh impressions of the person enrolled as subject `index` (a new capture session,
    /// e.g. a pickup verification or a re-enrolment probe).
    pub fn fresh_impressions(&self, index: usize, session: u64) -> Vec<Vec<u8>> {
        let person = self.subjects[index].person;
        self.spec.impressions(person, 1_000_000_007 + session)
    }
}

/// Renders a simple, distinct portrait and encodes it as a baseline JPEG.
pub fn face_jpeg(seed: u64, person: u64) -> Vec<u8> {
    let mut rng = rng_for(&[seed, 4, person]);
    let (w, h) = (usize::from(FACE_WIDTH), usize::from(FACE_HEIGHT));
    fn col(rng: &mut ChaCha8Rng, lo: u8, hi: u8) -> [u8; 3] {
        [
            rng.random_range(lo..hi),
            rng.random_range(lo..hi),
            rng.random_range(lo..hi),
        ]
    }
    let background = col(&mut rng, 150, 250);
    let tone: f32 = rng.random_range(0.0..1.0);
    let skin = [
        (235.0 - 120.0 * tone) as u8,
        (200.0 - 110.0 * tone) as u8,
        (170.0 - 100.0 * tone) as u8,
    ];
    let hair = col(&mut rng, 10, 120);
    let shirt = col(&mut rng, 20, 230);
    let (fx, fy) = (
        120.0 + rng.random_range(-8.0..8.0),
        150.0 + rng.random_range(-8.0..8.0),
    );
    let (frx, fry) = (rng.random_range(58.0..75.0), rng.random_range(75.0..95.0));
    let eye_dy = rng.random_range(-20.0..-8.0);
    let eye_dx = rng.random_range(20.0..30.0);
    let mouth_w = rng.random_range(14.0..30.0);
    let hair_h = rng.random_range(0.2..0.6);
    let mut img = vec![0u8; w * h * 3];
    for py in 0..h {
        for px in 0..w {
            let (x, y) = (px as f32, py as f32);
            let e = |cx: f32, cy: f32, rx: f32, ry: f32| {
                ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0
            };
            let mut c = background;
            if y > 250.0 && e(120.0, 340.0, 110.0, 95.0) {
                c = shirt;
            }
            if e(fx, fy, frx, fry) {
                c = skin;
                if y < fy - fry * (1.0 - hair_h) {
                    c = hair;
                }
                if e(fx - eye_dx, fy + eye_dy, 7.0, 4.5) || e(fx + eye_dx, fy + eye_dy, 7.0, 4.5) {
                    c = [40, 30, 30];
                }
                if e(fx, fy + 40.0, mouth_w, 5.0) {
                    c = [170, 60, 70];
                }
            } else if e(fx, fy - fry * 0.35, frx * 1.08, fry * 0.8) && y < fy {
                c = hair;
            }
            img[(py * w + px) * 3..(py * w + px) * 3 + 3].copy_from_slice(&c);
        }
    }
    let mut out = Vec::with_capacity(12_000);
    jpeg_encoder::Encoder::new(&mut out, 80)
        .encode(&img, FACE_WIDTH, FACE_HEIGHT, jpeg_encoder::ColorType::Rgb)
        .expect("encoding into a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso19794_2::parse;

    #[test]
    fn reproducible_and_valid() {
        let a = Population::generate(7, 12, 0.25);
        let b = Population::generate(7, 12, 0.25);
        for (x, y) in a.subjects.iter().zip(&b.subjects) {
            assert_eq!(x.templates, y.templates);
            assert_eq!(x.reference_id, y.reference_id);
        }
        for s in &a.subjects {
            assert_eq!(s.templates.len(), 10);
            for (k, t) in s.templates.iter().enumerate() {
                let rec = parse(t).expect("generated record parses");
                assert_eq!(rec.views[0].position as usize, k + 1);
                let n = rec.views[0].minutiae.len();
                assert!((10..=100).contains(&n), "{n} minutiae");
            }
        }
        let c = Population::generate(8, 12, 0.25);
        assert_ne!(a.subjects[0].templates, c.subjects[0].templates);
    }

    #[test]
    fn duplicates_share_person_but_not_impressions() {
        let p = Population::generate(3, 40, 0.3);
        assert!(!p.duplicates.is_empty());
        for &(d, o) in &p.duplicates {
            assert!(o < d);
            assert_eq!(p.subjects[d].person, p.subjects[o].person);
            assert_ne!(p.subjects[d].templates, p.subjects[o].templates);
            assert_ne!(p.subjects[d].reference_id, p.subjects[o].reference_id);
            assert_eq!(p.subjects[d].face_jpeg(), p.subjects[o].face_jpeg());
        }
    }

    #[test]
    fn faces_are_distinct_jpegs() {
        let a = face_jpeg(1, 1);
        let b = face_jpeg(1, 2);
        assert_eq!(&a[..2], &[0xFF, 0xD8]);
        assert_eq!(&a[a.len() - 2..], &[0xFF, 0xD9]);
        assert!(a.len() < 40_000);
        assert_ne!(a, b);
    }

    #[test]
    fn minutiae_directions_follow_local_flow() {
        // Neighbouring minutiae (within 25 px) should mostly have ridge orientations (mod π)
        // within 30°, unlike uniformly random directions (where only a third would).
        let spec = PopulationSpec {
            seed: 5,
            subjects: 1,
            duplicate_rate: 0.0,
        };
        let (mut close, mut total) = (0, 0);
        for pos in 1..=10 {
            let m = spec.master(0, pos);
            for a in &m.minutiae {
                for b in &m.minutiae {
                    let d2 = (a.0 - b.0).powi(2) + (a.1 - b.1).powi(2);
                    if d2 > 0.0 && d2 < 25.0 * 25.0 {
                        total += 1;
                        let d = (a.2 - b.2).rem_euclid(PI);
                        if d.min(PI - d) < PI / 6.0 {
                            close += 1;
                        }
                    }
                }
            }
        }
        assert!(total > 20 && close * 10 > total * 6, "{close}/{total}");
    }
}
