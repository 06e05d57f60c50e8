//! Shard ownership and scatter-gather of a 1:N search.
//!
//! The gallery is split into `count` shards by [`Shard::owner_of`] (a stable hash of the
//! application id). A [`ShardSet`] holds the shards this process owns. A search is scattered
//! to every shard — each answers its best candidates *without* a score threshold, together
//! with its size — and gathered by [`gather`]: the threshold for the target false positive
//! identification rate is computed over the total gallery size (the sum of the shard sizes),
//! then [`merge_candidates`] sorts and cuts.
//!
//! In-process (embedded mode, or one worker owning every shard) the scatter is a parallel
//! loop over the local shards ([`ShardSet::scatter_gather`]). Across processes
//! (`[dedup] scatter = "broker"`) each `dedup-shard-<k>` worker stores the same
//! [`ShardAnswer`] in `dedup_shard_answers` and the searching worker gathers them with the
//! same [`gather`] (see [`crate::distributed`]).

use std::sync::RwLock;

use rayon::prelude::*;

use cardpipe_biometrics::matcher::{
    Candidate, IdentifyOptions, PreparedSubject, Probe, Shard, TenPrint, merge_candidates,
};

/// One shard's answer to a scattered search.
#[derive(Debug, Clone)]
pub struct ShardAnswer {
    /// Which shard answered.
    pub shard: u32,
    /// Subjects enrolled in that shard when it answered.
    pub size: usize,
    /// Its best candidates, unthresholded, best first.
    pub candidates: Vec<Candidate>,
}

/// Gathers per-shard answers: threshold over the total size, then merge and cut.
pub fn gather(answers: Vec<ShardAnswer>, target_fpir: f64, max_results: usize) -> Vec<Candidate> {
    let total: usize = answers.iter().map(|a| a.size).sum();
    let min = cardpipe_biometrics::matcher::min_score_for(target_fpir, total);
    merge_candidates(
        answers.into_iter().map(|a| {
            a.candidates
                .into_iter()
                .filter(|c| c.fused.score >= min)
                .collect::<Vec<_>>()
        }),
        max_results,
    )
}

/// The shards one process owns.
#[derive(Debug)]
pub struct ShardSet {
    count: u32,
    local: Vec<RwLock<Shard>>,
    options: IdentifyOptions,
}

impl ShardSet {
    /// Shards `owned` (each < `count`) of a gallery split `count` ways.
    pub fn new(count: u32, owned: &[u32], options: IdentifyOptions) -> Self {
        assert!(count > 0, "at least one shard");
        let mut owned = owned.to_vec();
        owned.sort_unstable();
        owned.dedup();
        ShardSet {
            count,
            local: owned
                .into_iter()
                .map(|k| RwLock::new(Shard::new(k, count)))
                .collect(),
            options,
        }
    }

    /// Number of shards of the whole gallery.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every shard lives in this process (the in-process scatter is complete).
    pub fn is_complete(&self) -> bool {
        self.local.len() == self.count as usize
    }

    /// The shard indices held here.
    pub fn owned(&self) -> Vec<u32> {
        self.local.iter().map(|s| read(s).index).collect()
    }

    fn local_shard(&self, reference_id: &str) -> Option<&RwLock<Shard>> {
        let owner = Shard::owner_of(reference_id, self.count);
        self.local.iter().find(|s| read(s).index == owner)
    }

    /// Whether `reference_id` belongs to a shard held here.
    pub fn owns(&self, reference_id: &str) -> bool {
        self.local_shard(reference_id).is_some()
    }

    /// Whether `reference_id` is enrolled in a local shard.
    pub fn contains(&self, reference_id: &str) -> bool {
        self.local_shard(reference_id)
            .is_some_and(|s| read(s).gallery.contains(reference_id))
    }

    /// Enrols into the owning shard if it is held here (`None` otherwise); idempotent.
    pub fn insert(&self, reference_id: &str, tenprint: &TenPrint) -> Option<bool> {
        let shard = self.local_shard(reference_id)?;
        // The candidate codes are computed before the write lock is taken: searches of this
        // shard wait only for the append, not for the enrolment's work.
        let prepared = PreparedSubject::new(tenprint);
        let mut guard = shard.write().unwrap_or_else(|e| e.into_inner());
        Some(guard.gallery.insert_ready(reference_id, prepared))
    }

    /// Enrols the subject `probe` was built from into the owning shard if it is held here
    /// (`None` otherwise); idempotent. The same gallery as [`ShardSet::insert`] of its
    /// ten-print, without expanding its fingers again; the probe's expanded templates seed
    /// the shard's expanded-template cache while it has room.
    pub fn insert_probe(&self, reference_id: &str, probe: &Probe) -> Option<bool> {
        let shard = self.local_shard(reference_id)?;
        let mut guard = shard.write().unwrap_or_else(|e| e.into_inner());
        let budget = self.options.expanded_cache_bytes;
        Some(guard.gallery.insert_probe(reference_id, probe, budget))
    }

    /// 1:1 comparison of `probe` with `reference_id` if it is enrolled in a local shard
    /// (`None` otherwise), from the shard's kept expansion when there is one
    /// ([`Gallery::verify`](cardpipe_biometrics::matcher::Gallery::verify)).
    pub fn verify(&self, reference_id: &str, probe: &Probe) -> Option<Candidate> {
        let shard = read(self.local_shard(reference_id)?);
        let v = shard.gallery.verify(probe, reference_id, 1.0)?;
        Some(Candidate {
            reference_id: reference_id.to_owned(),
            fused: v.fused,
            prefilter: 0,
        })
    }

    /// Enrols many subjects (start-up load, catch-up after a gap): the candidate codes are
    /// computed on all cores before any lock is taken, then each local shard appends its
    /// subjects ([`Gallery::insert_many`](cardpipe_biometrics::matcher::Gallery::insert_many)).
    /// Subjects of shards not held here are skipped. Returns how many ids were new.
    pub fn insert_many(&self, subjects: &[(String, TenPrint)]) -> usize {
        let owned = self.owned();
        let prepared: Vec<(u32, String, PreparedSubject)> = subjects
            .par_iter()
            .filter_map(|(id, tp)| {
                let owner = Shard::owner_of(id, self.count);
                owned
                    .contains(&owner)
                    .then(|| (owner, id.clone(), PreparedSubject::new(tp)))
            })
            .collect();
        let mut by_shard: std::collections::BTreeMap<u32, Vec<(String, PreparedSubject)>> =
            Default::default();
        for (owner, id, p) in prepared {
            by_shard.entry(owner).or_default().push((id, p));
        }
        let mut added = 0;
        for shard in &self.local {
            let mut guard = shard.write().unwrap_or_else(|e| e.into_inner());
            let mine = by_shard.remove(&guard.index).unwrap_or_default();
            let before = guard.gallery.len();
            guard.gallery.insert_many(mine);
            added += guard.gallery.len() - before;
        }
        added
    }

    /// Subjects per local shard.
    pub fn sizes(&self) -> Vec<(u32, usize)> {
        self.local
            .iter()
            .map(|s| {
                let s = read(s);
                (s.index, s.gallery.len())
            })
            .collect()
    }

    /// Bytes of expanded templates kept per local shard
    /// ([`IdentifyOptions::expanded_cache_bytes`]).
    pub fn expanded_cache_bytes(&self) -> Vec<(u32, usize)> {
        self.local
            .iter()
            .map(|s| {
                let s = read(s);
                (s.index, s.gallery.expanded_cache_bytes())
            })
            .collect()
    }

    /// Subjects over the local shards.
    pub fn len(&self) -> usize {
        self.sizes().iter().map(|(_, n)| n).sum()
    }

    /// Whether no subject is enrolled locally.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers a probe over one local shard (the sub-request of a scatter).
    pub fn answer(
        &self,
        shard: u32,
        probe: &Probe,
        max_results: usize,
        exclude: Option<&str>,
    ) -> Option<ShardAnswer> {
        let s = self.local.iter().find(|s| read(s).index == shard)?;
        let s = read(s);
        let opts = IdentifyOptions {
            max_results,
            min_score: 0.0,
            ..self.options
        };
        Some(ShardAnswer {
            shard,
            size: s.gallery.len(),
            candidates: s.identify(probe, &opts, exclude),
        })
    }

    /// Answers many probes over every local shard in one candidate-stage pass per shard
    /// ([`Gallery::identify_batch`](cardpipe_biometrics::matcher::Gallery::identify_batch)):
    /// the gallery's codes are read once for the whole batch instead of once per probe.
    /// `excludes[i]` (probe `i`'s own id) is dropped from its answers, whose candidates are
    /// then what [`ShardSet::answer`] gives (the shortlist keeps one slot for it).
    /// Returns, per probe, one answer per local shard.
    pub fn answer_batch(
        &self,
        probes: &[&Probe],
        excludes: &[Option<&str>],
        max_results: usize,
    ) -> Vec<Vec<ShardAnswer>> {
        assert_eq!(probes.len(), excludes.len(), "one exclude per probe");
        let opts = IdentifyOptions {
            shortlist: self.options.shortlist + 1,
            max_results: max_results + 1,
            min_score: 0.0,
            ..self.options
        };
        let mut out: Vec<Vec<ShardAnswer>> = vec![Vec::new(); probes.len()];
        for shard in &self.local {
            let s = read(shard);
            let found = s.gallery.identify_batch(probes, &opts);
            for ((answers, mut candidates), exclude) in out.iter_mut().zip(found).zip(excludes) {
                if let Some(own) = exclude {
                    candidates.retain(|c| c.reference_id != *own);
                }
                candidates.truncate(max_results);
                answers.push(ShardAnswer {
                    shard: s.index,
                    size: s.gallery.len(),
                    candidates,
                });
            }
        }
        out
    }

    /// The score calibration of the local shards (all shards share one), for 1:1
    /// comparisons outside a shard search; `None` when no shard is held here.
    pub fn calibration(&self) -> Option<cardpipe_biometrics::matcher::Calibration> {
        self.local
            .first()
            .map(|s| read(s).gallery.calibration().clone())
    }

    /// Scatter-gather over the local shards (in parallel), thresholded for `target_fpir`
    /// over their total size.
    pub fn scatter_gather(
        &self,
        probe: &Probe,
        target_fpir: f64,
        max_results: usize,
        exclude: Option<&str>,
    ) -> Vec<Candidate> {
        let answers: Vec<ShardAnswer> = self
            .owned()
            .par_iter()
            .filter_map(|&k| self.answer(k, probe, max_results, exclude))
            .collect();
        gather(answers, target_fpir, max_results)
    }
}

fn read(s: &RwLock<Shard>) -> std::sync::RwLockReadGuard<'_, Shard> {
    s.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardpipe_biometrics::synth::Population;

    #[test]
    fn insert_many_enrols_what_one_by_one_enrols_and_skips_foreign_shards() {
        let pop = Population::generate(22, 30, 0.0);
        let subjects: Vec<(String, TenPrint)> = pop
            .subjects
            .iter()
            .map(|s| {
                (
                    s.reference_id.clone(),
                    TenPrint::from_iso(&s.templates).unwrap(),
                )
            })
            .collect();
        let one_by_one = ShardSet::new(3, &[0, 2], IdentifyOptions::default());
        let expected = subjects
            .iter()
            .filter(|(id, tp)| one_by_one.insert(id, tp) == Some(true))
            .count();
        let bulk = ShardSet::new(3, &[0, 2], IdentifyOptions::default());
        assert_eq!(bulk.insert_many(&subjects), expected);
        assert!(expected > 0 && expected < 30, "shard 1 is held elsewhere");
        assert_eq!(bulk.sizes(), one_by_one.sizes());
        // Idempotent: a second load adds nothing.
        assert_eq!(bulk.insert_many(&subjects), 0);
        let probe = Probe::new(&TenPrint::from_iso(&pop.fresh_impressions(4, 9)).unwrap());
        let ids = |set: &ShardSet| {
            set.scatter_gather(&probe, 1e-3, 5, None)
                .into_iter()
                .map(|c| c.reference_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&bulk), ids(&one_by_one));
    }

    #[test]
    fn sharded_search_equals_single_gallery_search() {
        let pop = Population::generate(21, 40, 0.0);
        let one = ShardSet::new(1, &[0], IdentifyOptions::default());
        let three = ShardSet::new(3, &[0, 1, 2], IdentifyOptions::default());
        for s in &pop.subjects {
            let tp = TenPrint::from_iso(&s.templates).unwrap();
            assert_eq!(one.insert(&s.reference_id, &tp), Some(true));
            assert_eq!(three.insert(&s.reference_id, &tp), Some(true));
        }
        assert_eq!(three.len(), 40);
        assert!(three.sizes().iter().all(|(_, n)| *n > 0));
        let probe = Probe::new(&TenPrint::from_iso(&pop.fresh_impressions(5, 9)).unwrap());
        let a = one.scatter_gather(&probe, 1e-3, 5, None);
        let b = three.scatter_gather(&probe, 1e-3, 5, None);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].reference_id, pop.subjects[5].reference_id);
        assert_eq!(
            a.iter().map(|c| &c.reference_id).collect::<Vec<_>>(),
            b.iter().map(|c| &c.reference_id).collect::<Vec<_>>()
        );
        // A process holding one shard refuses ids of others.
        let part = ShardSet::new(3, &[1], IdentifyOptions::default());
        let foreign = pop
            .subjects
            .iter()
            .find(|s| Shard::owner_of(&s.reference_id, 3) != 1)
            .unwrap();
        let tp = TenPrint::from_iso(&foreign.templates).unwrap();
        assert_eq!(part.insert(&foreign.reference_id, &tp), None);
        assert!(!part.is_complete());
    }
}
