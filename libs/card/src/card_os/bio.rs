//! Match-on-card for the fingerprint reference (reference `91`).
//!
//! The reference and the probe are ISO/IEC 19794-2:2005 finger minutiae records. The card
//! keeps the reference's minutiae and, on VERIFY (`00 21 00 91`), runs a deliberately simple
//! comparison: every (reference, probe) minutia pair of the same type is tried as an anchor
//! for a rigid alignment (rotation by the angle difference, translation onto the anchor);
//! under each alignment a probe minutia pairs with an unused reference minutia within
//! [`DIST_TOLERANCE`] pixels and [`ANGLE_TOLERANCE`] angle units. The best alignment's pair
//! count is the score; [`MATCH_THRESHOLD`] pairs is a match. This is a stand-in with the shape
//! of a real match-on-card applet (reference stays on the chip, only yes/no leaves it), not an
//! accuracy-rated matcher: the dedup stage owns the real one.

/// One minutia: position in pixels, angle in units of 360/256 degrees, ISO type bits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Minutia {
    x: i32,
    y: i32,
    angle: u8,
    kind: u8,
}

/// Largest distance in pixels for two aligned minutiae to pair.
pub const DIST_TOLERANCE: i32 = 14;
/// Largest angle difference (units of 1.40625°) for two aligned minutiae to pair.
pub const ANGLE_TOLERANCE: i32 = 14;
/// Pairs needed for a match.
pub const MATCH_THRESHOLD: usize = 12;

/// Parses an ISO/IEC 19794-2:2005 record and returns the minutiae of every finger view.
/// `None` if the record is malformed (header, lengths or truncated minutiae).
pub fn parse_iso19794_2(rec: &[u8]) -> Option<Vec<Minutia>> {
    if rec.len() < 24 || &rec[0..4] != b"FMR\0" || &rec[4..8] != b" 20\0" {
        return None;
    }
    // Record length: 4 bytes, big-endian (as written by the extractors of our test data).
    let len = u32::from_be_bytes([rec[8], rec[9], rec[10], rec[11]]) as usize;
    if len != rec.len() {
        return None;
    }
    let mut p = 12;
    p += 2 + 2 + 2 + 2 + 2; // capture equipment, size x, size y, resolution x, resolution y
    let views = *rec.get(p)?;
    p += 2; // number of views, reserved
    let mut out = Vec::new();
    for _ in 0..views {
        let hdr = rec.get(p..p + 4)?;
        let count = usize::from(hdr[3]);
        p += 4;
        for _ in 0..count {
            let m = rec.get(p..p + 6)?;
            out.push(Minutia {
                kind: m[0] >> 6,
                x: i32::from(u16::from_be_bytes([m[0] & 0x3F, m[1]])),
                y: i32::from(u16::from_be_bytes([m[2] & 0x3F, m[3]])),
                angle: m[4],
            });
            p += 6;
        }
        let ext = usize::from(u16::from_be_bytes(rec.get(p..p + 2)?.try_into().ok()?));
        p += 2 + ext;
    }
    if p != rec.len() || out.is_empty() {
        return None;
    }
    Some(out)
}

fn angle_diff(a: i32, b: i32) -> i32 {
    let d = (a - b).rem_euclid(256);
    d.min(256 - d)
}

/// The number of paired minutiae under the best rigid alignment.
pub fn score(reference: &[Minutia], probe: &[Minutia]) -> usize {
    let mut best = 0;
    let mut used = vec![false; reference.len()];
    for r in reference {
        for q in probe.iter().filter(|q| q.kind == r.kind) {
            let rot = i32::from(r.angle) - i32::from(q.angle);
            let theta = f64::from(rot) * std::f64::consts::TAU / 256.0;
            let (s, c) = theta.sin_cos();
            used.iter_mut().for_each(|u| *u = false);
            let mut pairs = 0;
            for m in probe {
                let dx = f64::from(m.x - q.x);
                let dy = f64::from(m.y - q.y);
                let tx = (c * dx - s * dy) as i32 + r.x;
                let ty = (s * dx + c * dy) as i32 + r.y;
                let ta = i32::from(m.angle) + rot;
                let hit = reference.iter().enumerate().position(|(i, n)| {
                    !used[i]
                        && (n.x - tx).abs() <= DIST_TOLERANCE
                        && (n.y - ty).abs() <= DIST_TOLERANCE
                        && angle_diff(i32::from(n.angle), ta) <= ANGLE_TOLERANCE
                });
                if let Some(i) = hit {
                    used[i] = true;
                    pairs += 1;
                }
            }
            best = best.max(pairs);
        }
    }
    best
}

/// Whether the probe matches the reference.
pub fn matches(reference: &[Minutia], probe: &[Minutia]) -> bool {
    score(reference, probe) >= MATCH_THRESHOLD
}

/// A synthetic but well-formed ISO/IEC 19794-2:2005 record with `n` pseudo-random minutiae
/// from `seed`, shifted by `shift` pixels (test images, benchmarks).
pub fn synthetic_record(seed: u32, n: usize, shift: (i32, i32)) -> Vec<u8> {
    let mut body = Vec::new();
    let mut s = seed;
    for _ in 0..n {
        s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let x = (40 + (s >> 8) % 300) as i32 + shift.0;
        let y = (40 + (s >> 18) % 350) as i32 + shift.1;
        let a = (s >> 3) as u8;
        body.extend_from_slice(&[
            (1 << 6) | ((x >> 8) as u8),
            x as u8,
            (y >> 8) as u8,
            y as u8,
            a,
            60,
        ]);
    }
    let mut rec = b"FMR\0 20\0".to_vec();
    let total = 24 + 4 + body.len() + 2;
    rec.extend_from_slice(&(total as u32).to_be_bytes());
    rec.extend_from_slice(&[0, 0, 0x01, 0xF4, 0x01, 0xF4, 0, 197, 0, 197, 1, 0]);
    rec.extend_from_slice(&[1, 0, 80, n as u8]);
    rec.extend_from_slice(&body);
    rec.extend_from_slice(&[0, 0]);
    assert_eq!(rec.len(), total);
    rec
}

/// The fingerprint reference of [`crate::script::sample_image`].
pub fn example_record() -> Vec<u8> {
    synthetic_record(1, 30, (0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_genuine_and_impostor() {
        let reference = parse_iso19794_2(&synthetic_record(1, 30, (0, 0))).unwrap();
        let shifted = parse_iso19794_2(&synthetic_record(1, 30, (9, -7))).unwrap();
        let other = parse_iso19794_2(&synthetic_record(2, 30, (0, 0))).unwrap();
        assert!(matches(&reference, &shifted));
        assert!(
            !matches(&reference, &other),
            "score {}",
            score(&reference, &other)
        );
    }

    #[test]
    fn malformed_records_are_rejected() {
        let rec = synthetic_record(1, 10, (0, 0));
        assert!(parse_iso19794_2(&rec[..rec.len() - 1]).is_none());
        assert!(parse_iso19794_2(b"FMR\0 20\0").is_none());
        let mut bad = rec.clone();
        bad[0] = b'X';
        assert!(parse_iso19794_2(&bad).is_none());
    }

    #[test]
    fn fvc2002_genuine_pair_matches_and_impostor_does_not() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let load = |n: &str| {
            parse_iso19794_2(&std::fs::read(dir.join(n)).expect("FVC2002 test data"))
                .expect("valid record")
        };
        let a = load("101_1.iso");
        let b = load("101_2.iso");
        let c = load("102_1.iso");
        assert!(matches(&a, &a));
        let genuine = score(&a, &b);
        let impostor = score(&a, &c);
        println!(
            "FVC2002 DB1_B 101_1 vs 101_2 (genuine): {genuine} pairs; vs 102_1 (impostor): {impostor} pairs"
        );
        assert!(genuine > impostor, "genuine {genuine} impostor {impostor}");
        assert!(!matches(&a, &c), "impostor scored {impostor}");
    }
}
