//! Probes of concurrent dedup jobs searched together.
//!
//! A 1:N search is dominated by the candidate stage: one pass over every enrolled finger
//! code. [`Gallery::identify_batch`](cardpipe_biometrics::matcher::Gallery::identify_batch)
//! scores many probes in that one pass, so the gallery is read from memory once per batch
//! instead of once per probe. The jobs of a process do not know of each other; the
//! [`SearchBatcher`] collects the probes they submit while a pass is running and searches
//! them in the next pass (up to `[dedup] batch_max` at once). Alone, a job's probe is searched
//! at once: batching never waits for company, it only takes whoever queued meanwhile.
//!
//! ```text
//! job A ─┐                ┌─ pass 1: [A]        ─> A
//! job B ─┼─> queue ──────>┤
//! job C ─┘  (while pass 1 └─ pass 2: [B, C]     ─> B, C
//!            runs)
//! ```

use std::sync::Arc;

use cardpipe_biometrics::matcher::Probe;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::scatter::{ShardAnswer, ShardSet};

/// One queued search.
struct Request {
    probe: Arc<Probe>,
    exclude: Option<String>,
    reply: oneshot::Sender<Vec<ShardAnswer>>,
}

/// Searches the probes of concurrent jobs together over a [`ShardSet`].
pub struct SearchBatcher {
    queue: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for SearchBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchBatcher").finish_non_exhaustive()
    }
}

impl SearchBatcher {
    /// Starts the batching task (on the current tokio runtime) over `shards`; at most
    /// `batch_max` probes per pass, `max_results` candidates per shard answer. `batch_sizes`
    /// observes how many probes each pass searched.
    pub fn start(
        shards: Arc<ShardSet>,
        batch_max: usize,
        max_results: usize,
        batch_sizes: Histogram,
    ) -> Self {
        let (queue, mut rx) = mpsc::unbounded_channel::<Request>();
        let batch_max = batch_max.max(1);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < batch_max {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                // A job that gave up (timed out, shut down) no longer needs its search.
                batch.retain(|r| !r.reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                batch_sizes.observe(batch.len() as f64);
                let shards = shards.clone();
                let searched = tokio::task::spawn_blocking(move || {
                    let probes: Vec<&Probe> = batch.iter().map(|r| &*r.probe).collect();
                    let excludes: Vec<Option<&str>> =
                        batch.iter().map(|r| r.exclude.as_deref()).collect();
                    let answers = shards.answer_batch(&probes, &excludes, max_results);
                    (batch, answers)
                })
                .await;
                match searched {
                    Ok((batch, answers)) => {
                        for (request, answer) in batch.into_iter().zip(answers) {
                            let _ = request.reply.send(answer);
                        }
                    }
                    // A panic in the matcher: the requests are dropped with it, so each
                    // waiting job gets an error and is retried; the batcher keeps serving.
                    Err(e) => tracing::error!(error = %e, "dedup batched search failed"),
                }
            }
        });
        SearchBatcher { queue }
    }

    /// Searches `probe` (excluding the reference id `exclude`) over every local shard, with
    /// whichever other probes are queued by then. Returns one unthresholded answer per shard.
    pub async fn search(
        &self,
        probe: Arc<Probe>,
        exclude: Option<String>,
    ) -> anyhow::Result<Vec<ShardAnswer>> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request {
                probe,
                exclude,
                reply,
            })
            .map_err(|_| anyhow::anyhow!("the dedup search batcher has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the dedup batched search failed (see the log)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardpipe_biometrics::matcher::{IdentifyOptions, TenPrint};
    use cardpipe_biometrics::synth::Population;
    use prometheus_client::metrics::histogram::exponential_buckets;

    /// Concurrent searches through the batcher find what one-by-one searches find, and are
    /// searched together when they queue while a pass runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_answers_equal_single_answers() {
        let pop = Population::generate(31, 60, 0.0);
        let shards = Arc::new(ShardSet::new(2, &[0, 1], IdentifyOptions::default()));
        for s in &pop.subjects {
            shards.insert(&s.reference_id, &TenPrint::from_iso(&s.templates).unwrap());
        }
        let sizes = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let batcher = Arc::new(SearchBatcher::start(shards.clone(), 16, 5, sizes.clone()));
        let probes: Vec<(usize, TenPrint)> = (0..12)
            .map(|i| {
                let tp = TenPrint::from_iso(&pop.fresh_impressions(i * 5, 7 + i as u64)).unwrap();
                (i * 5, tp)
            })
            .collect();
        let tasks: Vec<_> = probes
            .iter()
            .map(|(k, tp)| {
                let batcher = batcher.clone();
                let probe = Arc::new(Probe::new(tp));
                // Subject 0's own id is excluded from its search: it must not be found.
                let exclude = (*k == 0).then(|| pop.subjects[0].reference_id.clone());
                tokio::spawn(async move { batcher.search(probe, exclude).await })
            })
            .collect();
        for ((k, tp), task) in probes.iter().zip(tasks) {
            let batched = task.await.unwrap().unwrap();
            assert_eq!(batched.len(), 2, "one answer per local shard");
            let exclude = (*k == 0).then(|| pop.subjects[0].reference_id.as_str());
            let single = shards.scatter_gather(&Probe::new(tp), 1e-3, 5, exclude);
            let gathered = crate::scatter::gather(batched, 1e-3, 5);
            let ids = |c: &[cardpipe_biometrics::matcher::Candidate]| {
                c.iter().map(|c| c.reference_id.clone()).collect::<Vec<_>>()
            };
            assert_eq!(ids(&gathered), ids(&single), "probe of subject {k}");
            if *k == 0 {
                assert!(gathered.is_empty(), "the excluded mate is not returned");
            } else {
                assert_eq!(gathered[0].reference_id, pop.subjects[*k].reference_id);
            }
        }
        // Every probe went through a pass (however they were grouped).
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("passes", "", sizes);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("passes_sum 12.0"), "{text}");
    }
}
