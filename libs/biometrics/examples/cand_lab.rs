//! Candidate-stage lab: projects candidate recall at 1M subjects from a small gallery.
//!
//! For each mated probe, counts the non-mated gallery subjects whose candidate score is at
//! least the mate's; that share × N is the mate's projected rank in a gallery of N subjects.
//! `cargo run --release -p cardpipe-biometrics --example cand_lab -- --n 40000 --mates 600`
//! (`--codes BITS:FUNCTIONS:CELLS[:SEED],...` lists the code variants; BENCH_DEDUP.md has the
//! method and the results).

#![allow(clippy::needless_range_loop, clippy::type_complexity)]

use cardpipe_biometrics::matcher::code::{CodeSpec, lab_code};
use cardpipe_biometrics::matcher::{FingerTemplate, TenPrint};
use cardpipe_biometrics::synth::PopulationSpec;
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Ten = Vec<Option<FingerTemplate>>;

fn templates(tp: &TenPrint) -> Ten {
    tp.fingers
        .iter()
        .map(|f| f.as_ref().map(FingerTemplate::new))
        .collect()
}

fn phi(a: &[u64], pa: u32, b: &[u64], pb: u32, bits: u32) -> f32 {
    let mut h = 0u32;
    for k in 0..a.len() {
        h += (a[k] ^ b[k]).count_ones();
    }
    let both = (pa + pb - h) / 2;
    let q = (pa as f32 * (bits - pa) as f32) * (pb as f32 * (bits - pb) as f32);
    if q <= 0.0 {
        return 0.0;
    }
    ((both * bits) as f32 - (pa * pb) as f32) / q.sqrt()
}

struct Codes {
    words: usize,
    bits: u32,
    w: Vec<u64>,
    p: Vec<u32>,
}

fn codes(ts: &[Ten], spec: &CodeSpec) -> Codes {
    let words = (spec.bits / 64) as usize;
    let per: Vec<(Vec<u64>, Vec<u32>)> = ts
        .par_iter()
        .map(|t| {
            let mut w = vec![0u64; 10 * words];
            let mut p = vec![0u32; 10];
            for f in 0..10 {
                if let Some(ft) = &t[f] {
                    lab_code(ft, spec, &mut w[f * words..(f + 1) * words]);
                    p[f] = w[f * words..(f + 1) * words]
                        .iter()
                        .map(|x| x.count_ones())
                        .sum();
                }
            }
            (w, p)
        })
        .collect();
    let mut c = Codes {
        words,
        bits: spec.bits,
        w: Vec::with_capacity(ts.len() * 10 * words),
        p: Vec::with_capacity(ts.len() * 10),
    };
    for (w, p) in per {
        c.w.extend(w);
        c.p.extend(p);
    }
    c
}

fn phis(a: &Codes, i: usize, b: &Codes, j: usize) -> [f32; 10] {
    let w = a.words;
    let mut out = [0f32; 10];
    for f in 0..10 {
        let (pa, pb) = (a.p[i * 10 + f], b.p[j * 10 + f]);
        out[f] = phi(
            &a.w[(i * 10 + f) * w..(i * 10 + f + 1) * w],
            pa,
            &b.w[(j * 10 + f) * w..(j * 10 + f + 1) * w],
            pb,
            a.bits,
        );
    }
    out
}

type Fusion = Box<dyn Fn(&[f32; 10], &[f32; 10], &[f32; 10]) -> f32 + Sync>;

fn fusions() -> Vec<(&'static str, Fusion)> {
    // args: raw phi, z-normalised phi (probe-finger cohort), z-normalised phi (gallery-finger
    // cohort)
    fn topk(v: &[f32; 10], k: usize) -> f32 {
        let mut s = *v;
        s.sort_by(|a, b| b.total_cmp(a));
        s[..k].iter().sum()
    }
    vec![
        ("sum", Box::new(|r, _, _| r.iter().sum())),
        ("top8", Box::new(|r, _, _| topk(r, 8))),
        ("top6", Box::new(|r, _, _| topk(r, 6))),
        ("top4", Box::new(|r, _, _| topk(r, 4))),
        (
            "sum_pos",
            Box::new(|r, _, _| r.iter().map(|x| x.max(0.0)).sum()),
        ),
        (
            "sum_sq",
            Box::new(|r, _, _| r.iter().map(|x| x * x.abs()).sum()),
        ),
        ("z_sum", Box::new(|_, z, _| z.iter().sum())),
        ("z_top6", Box::new(|_, z, _| topk(z, 6))),
        (
            "z_sum_pos",
            Box::new(|_, z, _| z.iter().map(|x| x.max(0.0)).sum()),
        ),
        (
            "z_sq",
            Box::new(|_, z, _| z.iter().map(|x| x.max(0.0).powi(2)).sum()),
        ),
        (
            "z_p15",
            Box::new(|_, z, _| z.iter().map(|x| x.max(0.0).powf(1.5)).sum()),
        ),
        (
            "z_p3",
            Box::new(|_, z, _| z.iter().map(|x| x.max(0.0).powi(3)).sum()),
        ),
        (
            "z_sq_top8",
            Box::new(|_, z, _| {
                let mut q = [0f32; 10];
                for f in 0..10 {
                    q[f] = z[f].max(0.0).powi(2);
                }
                topk(&q, 8)
            }),
        ),
        (
            "z_sp1",
            Box::new(|_, z, _| z.iter().map(|x| (x - 1.0).max(0.0).powi(2)).sum()),
        ),
        (
            "max",
            Box::new(|_, z, _| z.iter().copied().fold(f32::MIN, f32::max)),
        ),
        ("z_top2", Box::new(|_, z, _| topk(z, 2))),
        ("z_top3", Box::new(|_, z, _| topk(z, 3))),
        (
            "sym_p15",
            Box::new(|_, z, g| {
                (0..10)
                    .map(|f| (0.5 * (z[f] + g[f])).max(0.0).powf(1.5))
                    .sum()
            }),
        ),
        (
            "min_p15",
            Box::new(|_, z, g| (0..10).map(|f| z[f].min(g[f]).max(0.0).powf(1.5)).sum()),
        ),
        (
            "g_p15",
            Box::new(|_, _, g| g.iter().map(|x| x.max(0.0).powf(1.5)).sum()),
        ),
        (
            "z_sp2",
            Box::new(|_, z, _| z.iter().map(|x| (x - 2.0).max(0.0).powi(2)).sum()),
        ),
    ]
}

fn main() {
    let n: usize = arg("--n", 40_000);
    let mates: usize = arg("--mates", 600);
    let seed: u64 = arg("--seed", 2026);
    let variants: String = arg("--codes", "512:96:6".to_owned());
    let spec = PopulationSpec {
        seed,
        subjects: n,
        duplicate_rate: 0.0,
    };
    let t0 = std::time::Instant::now();
    let gallery: Vec<Ten> = (0..n)
        .into_par_iter()
        .map(|i| templates(&TenPrint::from_iso(&spec.subject(i).templates).unwrap()))
        .collect();
    let mate_idx: Vec<usize> = (0..mates).map(|k| k * n / mates).collect();
    let probes: Vec<Ten> = mate_idx
        .par_iter()
        .map(|&i| {
            templates(
                &TenPrint::from_iso(&spec.impressions(spec.person_of(i), 9_000_000 + i as u64))
                    .unwrap(),
            )
        })
        .collect();
    eprintln!("templates built in {:.1} s", t0.elapsed().as_secs_f64());
    let fus = fusions();
    for v in variants.split(',') {
        let parts: Vec<u64> = v.split(':').map(|x| x.parse().unwrap()).collect();
        let cs = CodeSpec {
            bits: parts[0] as u32,
            hashes: parts[1] as usize,
            hash_bits: parts[2] as usize,
            seed: parts.get(3).copied().unwrap_or(0x1234_5678_9abc_def0),
        };
        let t1 = std::time::Instant::now();
        let g = codes(&gallery, &cs);
        let p = codes(&probes, &cs);
        let mut pops: Vec<u32> = g.p.iter().copied().filter(|&x| x > 0).collect();
        pops.sort();
        let q = |f: f64| pops[((pops.len() - 1) as f64 * f) as usize];
        // gallery-finger cohort stats (T-norm side): each gallery finger against 512 other
        // gallery subjects
        let gcoh = 512.min(n - 1);
        let gstats: Vec<([f32; 10], [f32; 10])> = (0..n)
            .into_par_iter()
            .map(|j| {
                let mut s1 = [0f64; 10];
                let mut s2 = [0f64; 10];
                let mut k = 0f64;
                for c in 0..gcoh {
                    let o = (j + 1 + c * (n - 1) / gcoh) % n;
                    if o == j {
                        continue;
                    }
                    let r = phis(&g, j, &g, o);
                    for f in 0..10 {
                        s1[f] += r[f] as f64;
                        s2[f] += (r[f] as f64).powi(2);
                    }
                    k += 1.0;
                }
                let mut mu = [0f32; 10];
                let mut isd = [0f32; 10];
                for f in 0..10 {
                    let m1 = s1[f] / k;
                    mu[f] = m1 as f32;
                    let sd = ((s2[f] / k - m1 * m1).max(0.0))
                        .sqrt()
                        .max(1.0 / (cs.bits as f64).sqrt());
                    isd[f] = (1.0 / sd) as f32;
                }
                (mu, isd)
            })
            .collect();
        let zg = |r: &[f32; 10], j: usize| {
            let mut o = [0f32; 10];
            for f in 0..10 {
                o[f] = (r[f] - gstats[j].0[f]) * gstats[j].1[f];
            }
            o
        };
        // per-mate: counts of impostors >= mate for each fusion
        let cohort = n.min(3000);
        let res: Vec<Vec<usize>> = (0..mates)
            .into_par_iter()
            .map(|m| {
                let gm = mate_idx[m];
                // probe-finger cohort stats
                let mut s1 = [0f64; 10];
                let mut s2 = [0f64; 10];
                for j in (0..n).step_by((n / cohort).max(1)).take(cohort) {
                    let r = phis(&p, m, &g, j);
                    for f in 0..10 {
                        s1[f] += r[f] as f64;
                        s2[f] += (r[f] as f64).powi(2);
                    }
                }
                let mut mu = [0f32; 10];
                let mut sd = [1f32; 10];
                for f in 0..10 {
                    let m1 = s1[f] / cohort as f64;
                    mu[f] = m1 as f32;
                    sd[f] = ((s2[f] / cohort as f64 - m1 * m1).max(1e-8)).sqrt() as f32;
                }
                let z = |r: &[f32; 10]| {
                    let mut o = [0f32; 10];
                    for f in 0..10 {
                        o[f] = (r[f] - mu[f]) / sd[f];
                    }
                    o
                };
                let rm = phis(&p, m, &g, gm);
                let zm = z(&rm);
                let gm_z = zg(&rm, gm);
                let ms: Vec<f32> = fus.iter().map(|(_, f)| f(&rm, &zm, &gm_z)).collect();
                let mut cnt = vec![0usize; fus.len()];
                for j in 0..n {
                    if j == gm {
                        continue;
                    }
                    let r = phis(&p, m, &g, j);
                    let zr = z(&r);
                    let gr = zg(&r, j);
                    for (k, (_, f)) in fus.iter().enumerate() {
                        if f(&r, &zr, &gr) >= ms[k] {
                            cnt[k] += 1;
                        }
                    }
                }
                cnt
            })
            .collect();
        println!(
            "code {}:{}:{} popcount p5/p50/p95 {}/{}/{} ({:.1} s)",
            cs.bits,
            cs.hashes,
            cs.hash_bits,
            q(0.05),
            q(0.5),
            q(0.95),
            t1.elapsed().as_secs_f64()
        );
        println!(
            "  fusion      | r200@10k | r200@100k | r200@1M | r500@1M | r2000@1M | miss>2000@1M"
        );
        for (k, (name, _)) in fus.iter().enumerate() {
            let rec = |size: f64, depth: f64| {
                res.iter()
                    .filter(|c| (c[k] as f64) / ((n - 1) as f64) * size < depth)
                    .count() as f64
                    / mates as f64
                    * 100.0
            };
            println!(
                "  {:<11} | {:6.2} | {:6.2} | {:6.2} | {:6.2} | {:6.2} |",
                name,
                rec(1e4, 200.0),
                rec(1e5, 200.0),
                rec(1e6, 200.0),
                rec(1e6, 500.0),
                rec(1e6, 2000.0)
            );
        }
        // union of two rankings sharing the 2,000 budget
        let base = fus.iter().position(|(n, _)| *n == "z_p15").unwrap();
        let proj = |c: usize| c as f64 / ((n - 1) as f64) * 1e6;
        for (k, (name, _)) in fus.iter().enumerate() {
            if k == base {
                continue;
            }
            let mut line = format!("  union z_p15 + {name:<10}");
            for (da, db) in [(1500.0, 500.0), (1000.0, 1000.0), (1900.0, 100.0)] {
                let r = res
                    .iter()
                    .filter(|c| proj(c[base]) < da || proj(c[k]) < db)
                    .count() as f64
                    / mates as f64
                    * 100.0;
                line += &format!(" | {da}+{db}: {r:6.2}");
            }
            println!("{line}");
        }
        if std::env::args().any(|a| a == "--diagnose") {
            let cal = cardpipe_biometrics::matcher::Calibration::fvc2002();
            for (m, c) in res.iter().enumerate() {
                let rank = proj(c[base]);
                if rank < 2000.0 {
                    continue;
                }
                let gm = mate_idx[m];
                let rm = phis(&p, m, &g, gm);
                let mut scores = [None; 10];
                let mut line = format!("miss mate {m} rank@1M {rank:.0}:");
                for f in 0..10 {
                    let (Some(a), Some(b)) = (&probes[m][f], &gallery[gm][f]) else {
                        line += " --";
                        continue;
                    };
                    let sc = cardpipe_biometrics::matcher::compare(a, b);
                    scores[f] = Some(sc);
                    line += &format!(" [{}/{} phi {:.3} s {:.3}]", a.len(), b.len(), rm[f], sc);
                }
                let fused = cardpipe_biometrics::matcher::fuse(scores, cal);
                println!("{line} fused {:.2}", fused.score);
            }
        }
    }
}
