//! Compact fixed-length binary codes for the candidate stage.
//!
//! Each finger becomes a 768-bit code built by locality-sensitive hashing of its minutia
//! cylinders (the same rotation- and translation-invariant local descriptors the precise
//! comparator uses): [`HASHES`] fixed hash functions each read [`HASH_BITS`] fixed cells of a
//! cylinder; if those cells are all valid and not all empty, the resulting key (with the
//! function's number) is hashed to one bit of the code. Two impressions of a finger have many
//! minutiae with near-identical cylinders, so they set many of the same bits; unrelated
//! fingers share bits only by chance. (An earlier variant hashed quantised neighbour-edge
//! invariants; measured on synthetic ten-prints it separated mates from non-mates clearly
//! worse: ten-print d′ 2.1 against 3.3.)
//!
//! Comparing codes is a XOR and a popcount per word. With the popcount of each code stored
//! alongside, the XOR popcount `H` yields the overlap `|a∧b| = (|a|+|b|−H)/2`, and the
//! candidate score is the phi correlation of the two bit sets,
//! `(|a∧b|·B − |a|·|b|) / √(|a|(B−|a|)·|b|(B−|b|))`: overlap in excess of chance, normalised
//! so that a template with many minutiae (a dense code overlapping everything) does not rank
//! first for every probe.

use std::fmt;
use std::sync::OnceLock;

use super::template::{FingerTemplate, ND};

/// 64-bit words per finger code.
pub const CODE_WORDS: usize = 12;
/// Bits per finger code.
pub const CODE_BITS: u32 = 64 * CODE_WORDS as u32;
/// Number of LSH functions applied to every cylinder.
pub const HASHES: usize = 96;
/// Cylinder cells read by each function.
pub const HASH_BITS: usize = 6;

/// A finger's candidate-stage code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FingerCode {
    pub words: [u64; CODE_WORDS],
}

impl fmt::Debug for FingerCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerCode { <redacted> }")
    }
}

impl Default for FingerCode {
    fn default() -> Self {
        FingerCode {
            words: [0; CODE_WORDS],
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixed LSH functions: (section, cell) positions, drawn once from a fixed seed.
fn functions() -> &'static Vec<[(u8, u8); HASH_BITS]> {
    static F: OnceLock<Vec<[(u8, u8); HASH_BITS]>> = OnceLock::new();
    F.get_or_init(|| {
        let mut state = 0x1234_5678_9abc_def0u64;
        (0..HASHES)
            .map(|_| {
                let mut f = [(0u8, 0u8); HASH_BITS];
                for slot in f.iter_mut() {
                    state = mix(state);
                    *slot = ((state % ND as u64) as u8, ((state >> 20) % 52) as u8);
                }
                f
            })
            .collect()
    })
}

/// 1/√(p(B−p)) for every popcount p (0 for empty or full codes).
pub(crate) fn inverse_norms() -> &'static [f32; CODE_BITS as usize + 1] {
    static T: OnceLock<[f32; CODE_BITS as usize + 1]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0f32; CODE_BITS as usize + 1];
        for (p, v) in t.iter_mut().enumerate() {
            let q = p as f32 * (CODE_BITS as f32 - p as f32);
            *v = if q > 0.0 { 1.0 / q.sqrt() } else { 0.0 };
        }
        t
    })
}

impl FingerCode {
    /// Builds the code of a finger from its expanded template.
    pub fn new(template: &FingerTemplate) -> Self {
        let mut words = [0u64; CODE_WORDS];
        hash_cylinders(template, functions(), CODE_BITS, &mut words);
        FingerCode { words }
    }

    /// Number of set bits.
    pub fn popcount(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }
}

/// Phi correlation of two codes given their popcounts (see the module docs).
#[inline(always)]
pub fn code_similarity(a: &[u64], pa: u32, b: &[u64], pb: u32) -> f32 {
    let mut h = 0u32;
    for k in 0..CODE_WORDS {
        h += (a[k] ^ b[k]).count_ones();
    }
    let both = (pa + pb - h) / 2;
    let norms = inverse_norms();
    let excess = (both * CODE_BITS) as f32 - (pa * pb) as f32;
    excess * norms[pa as usize] * norms[pb as usize]
}

/// Parameters of an experimental LSH code (the candidate-stage lab, `examples/cand_lab.rs`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeSpec {
    pub bits: u32,
    pub hashes: usize,
    pub hash_bits: usize,
    pub seed: u64,
}

/// Builds the code of `template` under `spec` into `out` (`spec.bits / 64` words).
#[doc(hidden)]
pub fn lab_code(template: &FingerTemplate, spec: &CodeSpec, out: &mut [u64]) {
    let mut state = spec.seed;
    let funcs: Vec<Vec<(u8, u8)>> = (0..spec.hashes)
        .map(|_| {
            (0..spec.hash_bits)
                .map(|_| {
                    state = mix(state);
                    ((state % ND as u64) as u8, ((state >> 20) % 52) as u8)
                })
                .collect()
        })
        .collect();
    out.iter_mut().for_each(|w| *w = 0);
    hash_cylinders(template, &funcs, spec.bits, out);
}

/// Sets, for every usable cylinder and every hash function whose cells are all valid and not
/// all empty, the bit its key hashes to (out of `bits`) in `out`.
fn hash_cylinders<F: AsRef<[(u8, u8)]>>(
    template: &FingerTemplate,
    functions: &[F],
    bits: u32,
    out: &mut [u64],
) {
    for &i in &template.valid {
        let cyl = &template.cyl[i as usize];
        let m = template.mask[i as usize];
        for (fi, f) in functions.iter().enumerate() {
            let mut key = 0u64;
            let mut usable = true;
            for &(k, c) in f.as_ref() {
                if m >> c & 1 == 0 {
                    usable = false;
                    break;
                }
                key = key << 1 | (cyl[k as usize] >> c & 1);
            }
            if !usable || key == 0 {
                continue;
            }
            let b = (mix(key ^ ((fi as u64) << 40)) % u64::from(bits)) as usize;
            out[b / 64] |= 1 << (b % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::matcher::Finger;
    use crate::synth::PopulationSpec;

    /// The candidate-stage lab measures the shipped code when given the shipped parameters.
    #[test]
    fn lab_code_with_the_shipped_parameters_is_the_shipped_code() {
        let spec = PopulationSpec {
            seed: 7,
            subjects: 4,
            duplicate_rate: 0.0,
        };
        let shipped = CodeSpec {
            bits: CODE_BITS,
            hashes: HASHES,
            hash_bits: HASH_BITS,
            seed: 0x1234_5678_9abc_def0,
        };
        for i in 0..4u64 {
            let master = spec.master(i, 1 + i as u8);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i);
            let rec = master.impression(&mut rng, 1 + i as u8);
            let template = FingerTemplate::new(&Finger::from_view(&rec, &rec.views[0]));
            let code = FingerCode::new(&template);
            assert!(code.popcount() > 0, "a real finger sets bits");
            let mut lab = [0u64; CODE_WORDS];
            lab_code(&template, &shipped, &mut lab);
            assert_eq!(lab, code.words, "finger {i}");
        }
    }
}
