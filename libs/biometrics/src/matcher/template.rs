//! Finger templates in matcher form.
//!
//! [`Finger`] is the compact, storable form: minutiae rescaled to 500 dpi (197 px/cm) with
//! integer coordinates and 8-bit angles (the gallery stores it bit-packed, about 3.25 bytes
//! per minutia), which is what keeps a million-subject gallery in a few GB. [`FingerTemplate`]
//! is the expanded form the precise comparator works on: float geometry plus one bit-packed cylinder (an MCC-style local
//! descriptor) per minutia. It is built on demand (for the probe once, for gallery candidates
//! only when the candidate stage selects them), so it never has to be stored.

use std::f32::consts::{PI, TAU};
use std::fmt;
use std::sync::OnceLock;

use crate::iso19794_2::{FingerView, FingerprintRecord};

/// Canonical resolution: 500 dpi expressed in pixels per centimetre.
pub const CANONICAL_PPCM: u16 = 197;

/// A minutia in canonical coordinates (500 dpi, y pointing down as in the image, angle in
/// 360/256 degree units counter-clockwise).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CanonMinutia {
    pub x: u16,
    pub y: u16,
    pub angle: u8,
}

impl fmt::Debug for CanonMinutia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CanonMinutia { <redacted> }")
    }
}

/// Compact storable finger: canonical minutiae only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Finger {
    pub minutiae: Vec<CanonMinutia>,
}

impl fmt::Debug for Finger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Finger {{ minutiae: <{} redacted> }}",
            self.minutiae.len()
        )
    }
}

impl Finger {
    /// Converts one view of a parsed record, rescaling to 500 dpi.
    pub fn from_view(record: &FingerprintRecord, view: &FingerView) -> Self {
        let sx = f32::from(CANONICAL_PPCM) / f32::from(record.x_resolution.max(1));
        let sy = f32::from(CANONICAL_PPCM) / f32::from(record.y_resolution.max(1));
        let minutiae = view
            .minutiae
            .iter()
            .map(|m| CanonMinutia {
                x: (f32::from(m.x) * sx).round().min(f32::from(u16::MAX)) as u16,
                y: (f32::from(m.y) * sy).round().min(f32::from(u16::MAX)) as u16,
                angle: m.angle,
            })
            .collect();
        Finger { minutiae }
    }
}

// ---- cylinder geometry -------------------------------------------------------------------

/// Cylinder radius in pixels (500 dpi).
pub(crate) const RADIUS: f32 = 70.0;
/// Spatial cells per side of the cylinder's square base; only the 52 inside the circle are used.
const NS: usize = 8;
/// Angular sections; each section's 52 cells live in one u64 word so a single spatial
/// validity word masks every section.
pub(crate) const ND: usize = 6;
const SIGMA_S: f32 = 9.0;
const SIGMA_D: f32 = 0.6;
/// Cell activation threshold on the summed Gaussian contributions.
const MU: f32 = 0.35;
/// Hull extension for cell validity.
const OMEGA: f32 = 40.0;
/// Minimum valid cells for a cylinder to be usable, and for a pair to be compared.
pub(crate) const MIN_VALID_CELLS: u32 = 30;
const MIN_NEIGHBOURS: usize = 2;
/// Mask with every one of the 52 disc cells valid.
pub(crate) const FULL_MASK: u64 = (1 << 52) - 1;

const DELTA: f32 = 2.0 * RADIUS / NS as f32;
/// Contributions beyond this distance from a cell centre are ignored (2 σ: a lone neighbour
/// contributes at most e⁻² ≈ 0.14 there, well under the activation threshold).
const CUTOFF: f32 = 2.0 * SIGMA_S;
/// Resolution of the spatial Gaussian table, entries per px².
const SPATIAL_STEPS: f32 = 2.0;

/// Precomputed geometry and Gaussian tables shared by all templates.
struct Tables {
    /// Centres of the cells inside the circle, in the minutia frame.
    centres: Vec<(f32, f32)>,
    /// Grid position (i·NS + j) → cell index, or u8::MAX outside the circle.
    grid: [u8; NS * NS],
    /// exp(−d²/2σs²) sampled at d² = k / SPATIAL_STEPS, up to the cutoff.
    spatial: Vec<f32>,
    /// Angular weights of each section for each relative direction (360/256 units).
    direction: Vec<[f32; ND]>,
    /// The 16-gon of radius OMEGA the validity hull is expanded by (cosine and sine computed
    /// once here rather than for every hull vertex of every template).
    expansion: [(f32, f32); 16],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut centres = Vec::new();
        let mut grid = [u8::MAX; NS * NS];
        for i in 0..NS {
            for j in 0..NS {
                let cx = (i as f32 - (NS as f32 - 1.0) / 2.0) * DELTA;
                let cy = (j as f32 - (NS as f32 - 1.0) / 2.0) * DELTA;
                if cx * cx + cy * cy <= RADIUS * RADIUS {
                    grid[i * NS + j] = centres.len() as u8;
                    centres.push((cx, cy));
                }
            }
        }
        assert_eq!(centres.len(), 52, "FULL_MASK assumes 52 disc cells");
        let inv2s = 1.0 / (2.0 * SIGMA_S * SIGMA_S);
        let spatial = (0..=((CUTOFF * CUTOFF * SPATIAL_STEPS) as usize))
            .map(|k| (-(k as f32 + 0.5) / SPATIAL_STEPS * inv2s).exp())
            .collect();
        let inv2d = 1.0 / (2.0 * SIGMA_D * SIGMA_D);
        let direction = (0..256)
            .map(|a| {
                let dphi = angle_diff(a as f32 * (TAU / 256.0), 0.0);
                let mut w = [0f32; ND];
                for (k, g) in w.iter_mut().enumerate() {
                    let centre = -PI + (k as f32 + 0.5) * (TAU / ND as f32);
                    let dd = angle_diff(dphi, centre);
                    *g = (-dd * dd * inv2d).exp();
                }
                w
            })
            .collect();
        let expansion = std::array::from_fn(|k| {
            let a = k as f32 * (TAU / 16.0);
            (OMEGA * a.cos(), OMEGA * a.sin())
        });
        Tables {
            centres,
            grid,
            spatial,
            direction,
            expansion,
        }
    })
}

/// "Within OMEGA of the minutiae hull", as one x-interval per 4-pixel row of the hull
/// expanded by OMEGA (the expansion is approximated by a 16-gon around every hull vertex).
/// Cheap to build (the exact point-to-polygon distance per cell dominated template
/// expansion) and O(1) to query.
struct ValidityGrid {
    y0: f32,
    rows: Vec<(f32, f32)>,
}

const VGRID: f32 = 4.0;

impl ValidityGrid {
    fn new(hull: &[(f32, f32)]) -> Self {
        let expansion = &tables().expansion;
        let mut pts = Vec::with_capacity(hull.len() * 16);
        for &(px, py) in hull {
            for &(ox, oy) in expansion {
                pts.push((px + ox, py + oy));
            }
        }
        let poly = convex_hull(&pts);
        if poly.len() < 3 {
            return ValidityGrid {
                y0: 0.0,
                rows: Vec::new(),
            };
        }
        let ymin = poly.iter().map(|p| p.1).fold(f32::MAX, f32::min);
        let ymax = poly.iter().map(|p| p.1).fold(f32::MIN, f32::max);
        let nrows = ((ymax - ymin) / VGRID).ceil() as usize + 1;
        let mut rows = vec![(f32::MAX, f32::MIN); nrows];
        let centre = |r: usize| ymin + (r as f32 + 0.5) * VGRID;
        // Edge by edge, over the rows whose centre line it can cross (one row of margin each
        // side for rounding; the exact test decides): each row meets only its two edges,
        // instead of every row testing every edge.
        for k in 0..poly.len() {
            let (a, b) = (poly[k], poly[(k + 1) % poly.len()]);
            if a.1 == b.1 {
                continue;
            }
            let first = ((a.1.min(b.1) - ymin) / VGRID - 1.5).max(0.0) as usize;
            let last = (((a.1.max(b.1) - ymin) / VGRID + 1.5).max(0.0) as usize).min(nrows - 1);
            for (r, row) in rows.iter_mut().enumerate().take(last + 1).skip(first) {
                let yc = centre(r);
                if (a.1 - yc) * (b.1 - yc) <= 0.0 {
                    let x = a.0 + (yc - a.1) * (b.0 - a.0) / (b.1 - a.1);
                    row.0 = row.0.min(x);
                    row.1 = row.1.max(x);
                }
            }
        }
        ValidityGrid { y0: ymin, rows }
    }

    fn near(&self, x: f32, y: f32) -> bool {
        let r = ((y - self.y0) / VGRID).floor();
        if r < 0.0 || r as usize >= self.rows.len() {
            return false;
        }
        let (lo, hi) = self.rows[r as usize];
        x >= lo && x <= hi
    }
}

/// Signed smallest difference between two angles, in (-π, π].
#[inline]
pub(crate) fn angle_diff(a: f32, b: f32) -> f32 {
    let mut d = (a - b) % TAU;
    if d > PI {
        d -= TAU;
    } else if d <= -PI {
        d += TAU;
    }
    d
}

/// Full adder over bit vectors: (sum, carry).
#[inline(always)]
fn full_add(a: u64, b: u64, c: u64) -> (u64, u64) {
    let u = a ^ b;
    (u ^ c, (a & b) | (u & c))
}

/// Bit-sliced per-cell sum of six words: planes of weight 1, 2 and 4.
#[inline(always)]
pub(crate) fn bit_planes(w: &[u64; ND]) -> [u64; 3] {
    let (s1, c1) = full_add(w[0], w[1], w[2]);
    let (s2, c2) = full_add(w[3], w[4], w[5]);
    let ones = s1 ^ s2;
    let k = s1 & s2;
    let (twos, fours) = full_add(c1, c2, k);
    [ones, twos, fours]
}

/// Masked popcount of a bit-plane triple.
#[inline(always)]
pub(crate) fn plane_count(p: &[u64; 3], m: u64) -> u32 {
    (p[0] & m).count_ones() + 2 * (p[1] & m).count_ones() + 4 * (p[2] & m).count_ones()
}

/// Expanded finger template for the precise comparator.
///
/// Geometry uses a y-up frame (`y = -image_y`) so ISO angles (counter-clockwise) are
/// ordinary mathematical angles.
#[derive(Clone)]
pub struct FingerTemplate {
    pub(crate) x: Vec<f32>,
    pub(crate) y: Vec<f32>,
    pub(crate) theta: Vec<f32>,
    pub(crate) angle8: Vec<u8>,
    /// One cylinder per minutia: ND words of 52 cell bits.
    pub(crate) cyl: Vec<[u64; ND]>,
    /// Per-cell count of active sections as three bit planes (1s, 2s, 4s), so the masked
    /// popcount of a whole cylinder costs three popcounts instead of ND.
    pub(crate) planes: Vec<[u64; 3]>,
    /// Spatial validity of each cylinder's cells.
    pub(crate) mask: Vec<u64>,
    /// Indices of minutiae whose cylinder is usable.
    pub(crate) valid: Vec<u16>,
    /// Active bits of each cylinder over all its cells: the masked count whenever the pair
    /// mask is the full disc (interior minutiae), saving six popcounts per pair.
    pub(crate) count: Vec<u32>,
}

impl fmt::Debug for FingerTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FingerTemplate {{ minutiae: <{} redacted>, usable: {} }}",
            self.x.len(),
            self.valid.len()
        )
    }
}

/// Convex hull (counter-clockwise) by Andrew's monotone chain.
fn convex_hull(pts: &[(f32, f32)]) -> Vec<(f32, f32)> {
    let mut p: Vec<(f32, f32)> = pts.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    p.dedup();
    if p.len() < 3 {
        return p;
    }
    let cross = |o: (f32, f32), a: (f32, f32), b: (f32, f32)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut h: Vec<(f32, f32)> = Vec::with_capacity(2 * p.len());
    for &q in &p {
        while h.len() >= 2 && cross(h[h.len() - 2], h[h.len() - 1], q) <= 0.0 {
            h.pop();
        }
        h.push(q);
    }
    let lower = h.len() + 1;
    for &q in p.iter().rev().skip(1) {
        while h.len() >= lower && cross(h[h.len() - 2], h[h.len() - 1], q) <= 0.0 {
            h.pop();
        }
        h.push(q);
    }
    h.pop();
    h
}

impl FingerTemplate {
    /// Bytes this template holds on the heap plus its own size (what keeping it costs; the
    /// gallery's expanded-template cache counts with it).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.x.capacity() * 4
            + self.y.capacity() * 4
            + self.theta.capacity() * 4
            + self.angle8.capacity()
            + self.cyl.capacity() * std::mem::size_of::<[u64; ND]>()
            + self.planes.capacity() * std::mem::size_of::<[u64; 3]>()
            + self.mask.capacity() * 8
            + self.valid.capacity() * 2
            + self.count.capacity() * 4
    }

    /// Builds geometry and cylinders. Cost is O(n·k·cells) with k the neighbours within reach.
    pub fn new(finger: &Finger) -> Self {
        let n = finger.minutiae.len();
        let x: Vec<f32> = finger.minutiae.iter().map(|m| f32::from(m.x)).collect();
        let y: Vec<f32> = finger.minutiae.iter().map(|m| -f32::from(m.y)).collect();
        let theta: Vec<f32> = finger
            .minutiae
            .iter()
            .map(|m| f32::from(m.angle) * (TAU / 256.0))
            .collect();
        let angle8: Vec<u8> = finger.minutiae.iter().map(|m| m.angle).collect();
        let pts: Vec<(f32, f32)> = x.iter().copied().zip(y.iter().copied()).collect();
        let validity = ValidityGrid::new(&convex_hull(&pts));
        let tables = tables();
        let reach = RADIUS + CUTOFF;
        let mut cyl = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n);
        let mut planes = Vec::with_capacity(n);
        let mut count = Vec::with_capacity(n);
        let mut valid = Vec::new();
        let mut acc = [[0f32; ND]; 64];
        for i in 0..n {
            let (c, s) = (theta[i].cos(), theta[i].sin());
            // Validity: cell centre (rotated into the image frame) near the minutiae hull.
            let mut m = 0u64;
            for (ci, &(cx, cy)) in tables.centres.iter().enumerate() {
                if validity.near(x[i] + cx * c - cy * s, y[i] + cx * s + cy * c) {
                    m |= 1 << ci;
                }
            }
            for a in acc.iter_mut() {
                *a = [0.0; ND];
            }
            let mut neighbours = 0;
            for t in 0..n {
                let (dx, dy) = (x[t] - x[i], y[t] - y[i]);
                if t == i || dx.abs() > reach || dy.abs() > reach {
                    continue;
                }
                let d2 = dx * dx + dy * dy;
                if d2 > reach * reach {
                    continue;
                }
                if d2 <= RADIUS * RADIUS {
                    neighbours += 1;
                }
                // Neighbour in the minutia's own frame, in cell units from the grid corner.
                let u = dx * c + dy * s;
                let v = -dx * s + dy * c;
                let gd = &tables.direction[angle8[t].wrapping_sub(angle8[i]) as usize];
                let off = (NS as f32 - 1.0) / 2.0;
                // Truncating casts of values shifted positive stand in for floor/ceil, which
                // are library calls on baseline x86-64.
                let first =
                    |w: f32| (((w - CUTOFF) / DELTA + off + 16.0) as isize - 15).max(0) as usize;
                let last = |w: f32| {
                    (((w + CUTOFF) / DELTA + off + 16.0) as isize - 16).min(NS as isize - 1)
                };
                let (hi_i, hi_j) = (last(u), last(v));
                for gi in first(u)..(hi_i + 1).max(0) as usize {
                    for gj in first(v)..(hi_j + 1).max(0) as usize {
                        let ci = tables.grid[gi * NS + gj];
                        if ci == u8::MAX {
                            continue;
                        }
                        let (cx, cy) = tables.centres[ci as usize];
                        let e2 = (u - cx) * (u - cx) + (v - cy) * (v - cy);
                        let k = (e2 * SPATIAL_STEPS) as usize;
                        if k >= tables.spatial.len() {
                            continue;
                        }
                        let gs = tables.spatial[k];
                        let a = &mut acc[ci as usize];
                        for kk in 0..ND {
                            a[kk] += gs * gd[kk];
                        }
                    }
                }
            }
            let mut words = [0u64; ND];
            for (ci, a) in acc.iter().take(tables.centres.len()).enumerate() {
                for k in 0..ND {
                    if a[k] > MU {
                        words[k] |= 1 << ci;
                    }
                }
            }
            if m.count_ones() >= MIN_VALID_CELLS && neighbours >= MIN_NEIGHBOURS {
                valid.push(i as u16);
            }
            let p = bit_planes(&words);
            count.push(plane_count(&p, FULL_MASK));
            planes.push(p);
            cyl.push(words);
            mask.push(m);
        }
        FingerTemplate {
            x,
            y,
            theta,
            angle8,
            cyl,
            planes,
            count,
            mask,
            valid,
        }
    }

    /// Number of minutiae.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// Whether the template has no minutiae.
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::synth::PopulationSpec;

    /// The validity rows as first written: every row against every edge, the 16-gon's
    /// cosines computed per vertex.
    fn reference_grid(hull: &[(f32, f32)]) -> ValidityGrid {
        let mut pts = Vec::with_capacity(hull.len() * 16);
        for &(px, py) in hull {
            for k in 0..16 {
                let a = k as f32 * (TAU / 16.0);
                pts.push((px + OMEGA * a.cos(), py + OMEGA * a.sin()));
            }
        }
        let poly = convex_hull(&pts);
        if poly.len() < 3 {
            return ValidityGrid {
                y0: 0.0,
                rows: Vec::new(),
            };
        }
        let ymin = poly.iter().map(|p| p.1).fold(f32::MAX, f32::min);
        let ymax = poly.iter().map(|p| p.1).fold(f32::MIN, f32::max);
        let nrows = ((ymax - ymin) / VGRID).ceil() as usize + 1;
        let mut rows = Vec::with_capacity(nrows);
        for r in 0..nrows {
            let yc = ymin + (r as f32 + 0.5) * VGRID;
            let (mut lo, mut hi) = (f32::MAX, f32::MIN);
            for k in 0..poly.len() {
                let (a, b) = (poly[k], poly[(k + 1) % poly.len()]);
                if (a.1 - yc) * (b.1 - yc) <= 0.0 && a.1 != b.1 {
                    let x = a.0 + (yc - a.1) * (b.0 - a.0) / (b.1 - a.1);
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
            }
            rows.push((lo, hi));
        }
        ValidityGrid { y0: ymin, rows }
    }

    /// Building the validity rows edge by edge gives the very same rows, bit for bit, as
    /// testing every row against every edge, on the hulls of 400 generated fingers (and of
    /// degenerate point sets).
    #[test]
    fn validity_rows_edge_by_edge_equal_the_row_by_row_rows() {
        let spec = PopulationSpec {
            seed: 3,
            subjects: 40,
            duplicate_rate: 0.0,
        };
        let mut checked = 0;
        for i in 0..40u64 {
            for finger in 1..=10u8 {
                let master = spec.master(i, finger);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i * 16 + u64::from(finger));
                let record = master.impression(&mut rng, finger);
                let f = Finger::from_view(&record, &record.views[0]);
                let pts: Vec<(f32, f32)> = f
                    .minutiae
                    .iter()
                    .map(|m| (f32::from(m.x), -f32::from(m.y)))
                    .collect();
                let hull = convex_hull(&pts);
                let (new, old) = (ValidityGrid::new(&hull), reference_grid(&hull));
                assert_eq!(new.y0.to_bits(), old.y0.to_bits());
                assert_eq!(new.rows.len(), old.rows.len());
                for (a, b) in new.rows.iter().zip(&old.rows) {
                    assert_eq!(
                        (a.0.to_bits(), a.1.to_bits()),
                        (b.0.to_bits(), b.1.to_bits())
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 400);
        for hull in [vec![], vec![(3.0, 4.0)], vec![(0.0, 0.0), (10.0, 0.0)]] {
            let (new, old) = (ValidityGrid::new(&hull), reference_grid(&hull));
            assert_eq!(new.rows, old.rows);
        }
    }
}
