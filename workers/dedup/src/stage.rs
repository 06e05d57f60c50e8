//! The `dedup` pipeline stage: 1:N identification of every new application against the
//! enrolled gallery.
//!
//! ```text
//! dedup_pending ──identify (scatter-gather over shards)──┬─ no hit ─> enrol ─> dedup_clear ─> keys
//!                                                        └─ hit ───> dedup_candidates ─> possible_duplicate
//! possible_duplicate ──operator (adjudication API)──> confirmed_duplicate (final) | cleared ─> keys
//! ```
//!
//! * **Gallery**: [`DedupEngine`] holds the local shards ([`ShardSet`]). It is loaded at
//!   start from the `dedup_enrolled` table — one row per enrolled subject with its ISO
//!   templates sealed under the envelope keys (one `open` per subject, no object-store
//!   round trips) — and follows new rows by `seq` before every search (enrolments made by
//!   other processes, operator clearances). Each enrolment is inserted in memory at once
//!   and its row written in the completion transaction.
//! * **Idempotency**: identify excludes the application's own id, insert replaces by id,
//!   `dedup_enrolled.application_id` is unique and `dedup_candidates` rows are written only
//!   with the compare-and-set transition, so a redelivered job neither enrols twice nor
//!   creates a second candidate set.
//! * **Races**: the decision and the enrolment run under the gallery lock
//!   (`dedup_gallery_lock`, see [`crate::distributed`]), released in the commit of the
//!   decision: two enrolments of the same person handled concurrently, by one process or by
//!   several, catch each other. The 1:N search itself runs *before* the lock, over everything
//!   enrolled up to a snapshot (`dedup_enrolled.seq`) — with `scatter = "local"` batched with
//!   the searches of the process's other jobs ([`crate::batcher`]), with `"broker"` on the
//!   shard workers; under the lock only the subjects enrolled since that snapshot are compared
//!   ([`DedupEngine::late_enrolments`]), so searches run in parallel and the lock is held for
//!   milliseconds, not for a whole search.
//! * **Scatter**: `[dedup] scatter = "local"` searches the shards of this process;
//!   `"broker"` sends one sub-job per shard to the `dedup-shard-<k>` stages and gathers their
//!   answers ([`crate::distributed`]); both decide with [`crate::scatter::gather`].
//! * **Metrics**: `cardpipe_dedup_search_duration_seconds`, `cardpipe_dedup_gallery_subjects{shard}`,
//!   `cardpipe_dedup_possible_duplicates_total`, `cardpipe_dedup_search_batch_probes`,
//!   `cardpipe_dedup_late_enrolments_compared_total`, `cardpipe_dedup_expanded_cache_bytes{shard}`.
//! * **Expanded-template cache**: each shard's gallery keeps the cylinders of the subjects
//!   its searches compared, up to `[dedup] expanded_cache_mib` for the process, so a subject
//!   shortlisted again is not expanded again (identical results; see
//!   [`IdentifyOptions::expanded_cache_bytes`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::records::{self, RecordError};
use cardpipe_common::runtime::{Completion, JobContext, Permanent, Services, Stage};
use cardpipe_common::store::{StoreError, StoreTx};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Deserialize;
use sqlx::Row;
use time::OffsetDateTime;

use crate::batcher::SearchBatcher;
use crate::scatter::{ShardAnswer, ShardSet};
use cardpipe_biometrics::matcher::{
    Candidate, IdentifyOptions, PositionedTemplate, Probe, Shard, TenPrint, TenPrintError,
    ViewChoice,
};

/// The stage's name (queue, `cardpipe worker dedup`, `[stages.dedup]`).
pub const STAGE_NAME: &str = cardpipe_common::contract::stage_names::DEDUP;
/// The stage an application goes to when it is clear.
pub const NEXT_STAGE: &str = cardpipe_common::contract::stage_names::KEYS;
/// Input states.
pub const ACCEPTS: &[ApplicationState] = &[ApplicationState::DedupPending];

/// The `[dedup]` section of pipeline.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Shards the gallery is split into.
    pub shards: u32,
    /// The shard this worker owns; absent = every shard lives in this process.
    pub shard: Option<u32>,
    /// Candidates kept for adjudication.
    pub max_candidates: usize,
    /// Target false positive identification rate of a search (sets the score threshold
    /// over the current gallery size).
    pub target_fpir: f64,
    /// Candidate-stage shortlist per probe (subjects sent to the precise comparator) in a
    /// shard of 1M subjects; smaller shards scale it to their size
    /// ([`IdentifyOptions::shortlist_for`]), down to `min_shortlist`.
    pub shortlist: usize,
    /// The shortest shortlist of a small shard: the precise stage's cost per search while
    /// the gallery grows from nothing (a first night) up to `min_shortlist / shortlist × 1M`.
    pub min_shortlist: usize,
    /// MiB of expanded templates (the precise stage's cylinders) this process keeps for the
    /// subjects its searches compared, shared out evenly between the shards it holds
    /// ([`IdentifyOptions::expanded_cache_bytes`]); 0 = rebuild at every comparison.
    pub expanded_cache_mib: usize,
    /// Where a search runs: `local` (every shard in the searching process) or `broker`
    /// (one sub-job per shard to the `dedup-shard-<k>` stages, answers gathered from
    /// `dedup_shard_answers`; see [`crate::distributed`]).
    pub scatter: ScatterMode,
    /// Broker scatter: how long the searching worker waits for every shard's answer
    /// before the job is retried (then parked) with the missing shards named.
    pub shard_timeout_ms: u64,
    /// How long a job waits for the gallery lock (one search + enrolment at a time across
    /// every dedup worker) before it is retried.
    pub lock_wait_ms: u64,
    /// Local scatter: most probes of concurrent jobs searched in one pass over the gallery
    /// ([`crate::batcher`]).
    pub batch_max: usize,
}

/// Where a dedup search runs (`[dedup] scatter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScatterMode {
    /// In the searching process, over the shards it holds (all of them).
    #[default]
    Local,
    /// Over the broker, to one `dedup-shard-<k>` stage per shard.
    Broker,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            shards: 1,
            shard: None,
            max_candidates: 10,
            target_fpir: 1e-3,
            shortlist: IdentifyOptions::default().shortlist,
            min_shortlist: IdentifyOptions::default().min_shortlist,
            expanded_cache_mib: 4096,
            scatter: ScatterMode::Local,
            shard_timeout_ms: 10_000,
            lock_wait_ms: 60_000,
            batch_max: 64,
        }
    }
}

impl DedupConfig {
    /// Reads `[dedup]` (defaults when absent) and checks it.
    pub fn from_loaded(loaded: &LoadedConfig) -> anyhow::Result<Self> {
        let config = match loaded.section::<DedupConfig>("dedup") {
            Ok(c) => c,
            Err(errors)
                if errors
                    .iter()
                    .all(|e| e.message.contains("missing field `dedup`")) =>
            {
                DedupConfig::default()
            }
            Err(errors) => anyhow::bail!(
                "[dedup] configuration: {}",
                cardpipe_common::config::describe(&errors)
            ),
        };
        config.validate()?;
        Ok(config)
    }

    /// Rules beyond the types.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=1024).contains(&self.shards),
            "[dedup] shards must be 1..=1024"
        );
        if let Some(k) = self.shard {
            anyhow::ensure!(k < self.shards, "[dedup] shard must be < shards");
            anyhow::ensure!(
                self.shards == 1 || self.scatter == ScatterMode::Broker,
                "[dedup] shard = {k} of {}: a worker owning one shard needs \
                 scatter = \"broker\"; omit `shard` to hold every shard in this process",
                self.shards
            );
        }
        anyhow::ensure!(
            (1..=100).contains(&self.max_candidates),
            "[dedup] max_candidates must be 1..=100"
        );
        anyhow::ensure!(
            self.target_fpir > 0.0 && self.target_fpir <= 1.0,
            "[dedup] target_fpir must be in (0, 1]"
        );
        anyhow::ensure!(self.shortlist >= 1, "[dedup] shortlist must be >= 1");
        anyhow::ensure!(
            (1..=self.shortlist).contains(&self.min_shortlist),
            "[dedup] min_shortlist must be 1..=shortlist ({}), not {}",
            self.shortlist,
            self.min_shortlist
        );
        anyhow::ensure!(
            self.expanded_cache_mib <= 1 << 24,
            "[dedup] expanded_cache_mib must be 0..=16777216 (16 TiB), not {}",
            self.expanded_cache_mib
        );
        anyhow::ensure!(
            (10..=600_000).contains(&self.shard_timeout_ms),
            "[dedup] shard_timeout_ms must be 10..=600000"
        );
        anyhow::ensure!(
            (10..=3_600_000).contains(&self.lock_wait_ms),
            "[dedup] lock_wait_ms must be 10..=3600000"
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.batch_max),
            "[dedup] batch_max must be 1..=1024"
        );
        Ok(())
    }

    /// The shards this process holds.
    pub fn owned_shards(&self) -> Vec<u32> {
        match self.shard {
            Some(k) => vec![k],
            None => (0..self.shards).collect(),
        }
    }

    /// The shard stages (`dedup-shard-<k>`) of a broker scatter; none for a local one.
    pub fn shard_stage_names(&self) -> Vec<String> {
        match self.scatter {
            ScatterMode::Local => Vec::new(),
            ScatterMode::Broker => (0..self.shards)
                .map(crate::distributed::shard_stage_name)
                .collect(),
        }
    }
}

pub(crate) struct DedupMetrics {
    pub(crate) search: Histogram,
    batch_probes: Histogram,
    late_compared: Counter,
    pub(crate) lock_wait: Histogram,
    pub(crate) shard_answers: Counter,
    subjects: Family<Vec<(String, String)>, Gauge>,
    expanded_cache: Family<Vec<(String, String)>, Gauge>,
    possible: Counter,
    registered: AtomicBool,
}

impl DedupMetrics {
    fn new() -> Self {
        DedupMetrics {
            search: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            batch_probes: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            late_compared: Counter::default(),
            lock_wait: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            shard_answers: Counter::default(),
            subjects: Family::default(),
            expanded_cache: Family::default(),
            possible: Counter::default(),
            registered: AtomicBool::new(false),
        }
    }

    fn register(&self, services: &Services) {
        if self.registered.swap(true, Ordering::SeqCst) {
            return;
        }
        // The registry adds the `cardpipe_` prefix.
        services.metrics.register(|r| {
            r.register(
                "dedup_search_duration_seconds",
                "Time of one 1:N dedup search (scatter-gather over every shard)",
                self.search.clone(),
            );
            r.register(
                "dedup_search_batch_probes",
                "Probes of concurrent jobs searched in one pass over the gallery (local scatter)",
                self.batch_probes.clone(),
            );
            r.register(
                "dedup_late_enrolments_compared",
                "Subjects enrolled while a search ran, compared 1:1 under the gallery lock",
                self.late_compared.clone(),
            );
            r.register(
                "dedup_gallery_subjects",
                "Subjects enrolled in each gallery shard held by this process",
                self.subjects.clone(),
            );
            r.register(
                "dedup_expanded_cache_bytes",
                "Bytes of expanded templates kept in each gallery shard held by this process ([dedup] expanded_cache_mib)",
                self.expanded_cache.clone(),
            );
            r.register(
                "dedup_gallery_lock_wait_seconds",
                "Time a dedup job waited for the gallery lock (one search + enrolment at a time)",
                self.lock_wait.clone(),
            );
            r.register(
                "dedup_shard_answers",
                "Shard answers computed by this process's dedup-shard-<k> stages",
                self.shard_answers.clone(),
            );
            r.register(
                "dedup_possible_duplicates",
                "Applications flagged as possible duplicates",
                self.possible.clone(),
            );
        });
    }
}

/// The in-memory gallery of this process with its persistence.
pub struct DedupEngine {
    config: DedupConfig,
    shards: Arc<ShardSet>,
    loaded: tokio::sync::OnceCell<()>,
    last_seq: AtomicI64,
    /// One refresh at a time (concurrent jobs would decrypt the same rows twice).
    refresh_lock: tokio::sync::Mutex<()>,
    batcher: std::sync::OnceLock<SearchBatcher>,
    pub(crate) metrics: DedupMetrics,
}

impl std::fmt::Debug for DedupEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupEngine")
            .field("config", &self.config)
            .field("subjects", &self.shards.len())
            .finish()
    }
}

impl DedupEngine {
    /// An engine for `config` (checked); the gallery is loaded by [`DedupEngine::ready`].
    pub fn new(config: DedupConfig) -> anyhow::Result<Arc<Self>> {
        let owned = config.owned_shards();
        Self::with_shards(config, &owned)
    }

    /// An engine holding exactly the shards `owned` (e.g. one `dedup-shard-<k>` worker, or
    /// none for a `dedup` worker whose searches all go over the broker).
    pub fn with_shards(config: DedupConfig, owned: &[u32]) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        if let Some(k) = owned.iter().find(|&&k| k >= config.shards) {
            anyhow::bail!(
                "[dedup] shard {k} does not exist: shards = {}",
                config.shards
            );
        }
        let options = IdentifyOptions {
            shortlist: config.shortlist,
            min_shortlist: config.min_shortlist,
            expanded_cache_bytes: (config.expanded_cache_mib << 20) / owned.len().max(1),
            ..IdentifyOptions::default()
        };
        Ok(Arc::new(DedupEngine {
            shards: Arc::new(ShardSet::new(config.shards, owned, options)),
            config,
            loaded: tokio::sync::OnceCell::new(),
            last_seq: AtomicI64::new(0),
            refresh_lock: tokio::sync::Mutex::new(()),
            batcher: std::sync::OnceLock::new(),
            metrics: DedupMetrics::new(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &DedupConfig {
        &self.config
    }

    /// The local shards.
    pub fn shards(&self) -> &ShardSet {
        &self.shards
    }

    /// The local shards, shareable with blocking tasks.
    pub fn shard_set(&self) -> Arc<ShardSet> {
        self.shards.clone()
    }

    /// Loads the gallery once (first call), registers the metrics.
    pub async fn ready(&self, services: &Services) -> anyhow::Result<()> {
        self.loaded
            .get_or_try_init(|| async {
                self.metrics.register(services);
                let started = Instant::now();
                let n = self.refresh(services).await?;
                tracing::info!(
                    subjects = n,
                    shards = ?self.shards.owned(),
                    seconds = started.elapsed().as_secs_f64(),
                    "dedup gallery loaded"
                );
                Ok::<_, anyhow::Error>(())
            })
            .await?;
        Ok(())
    }

    /// Loads `dedup_enrolled` rows newer than the last one seen into the owned shards;
    /// returns how many subjects were added.
    ///
    /// Rows of other shards are skipped before decryption. A row whose `seq` is lower than
    /// one already seen but committed later (concurrent writers in several processes) is
    /// only picked up at the next start; enrolments made by this process are in memory
    /// already.
    pub async fn refresh(&self, services: &Services) -> anyhow::Result<usize> {
        let mut added = 0;
        if self.shards.owned().is_empty() {
            return Ok(0);
        }
        let _one_at_a_time = self.refresh_lock.lock().await;
        loop {
            let after = self.last_seq.load(Ordering::SeqCst);
            let rows = sqlx::query(
                "SELECT seq, application_id, sealed_templates FROM dedup_enrolled
                 WHERE seq > $1 ORDER BY seq LIMIT 2000",
            )
            .bind(after)
            .fetch_all(services.store.pool())
            .await
            .context("reading dedup_enrolled")?;
            let Some(last) = rows.last() else { break };
            let last: i64 = last.try_get("seq")?;
            let mut batch = Vec::new();
            for row in &rows {
                let id: String = row.try_get("application_id")?;
                if !self.shards.owns(&id) || self.shards.contains(&id) {
                    continue;
                }
                let stored = open_enrolled(services, &id, row)?;
                batch.push((id, stored));
            }
            let shards = self.shards.clone();
            added += tokio::task::spawn_blocking(move || {
                use rayon::prelude::*;
                let parsed: Vec<(String, TenPrint)> = batch
                    .into_par_iter()
                    .filter_map(|(id, stored)| match stored.tenprint() {
                        Ok(tp) => Some((id, tp)),
                        Err(e) => {
                            tracing::error!(application = %id, error = %e, "enrolled templates refused");
                            None
                        }
                    })
                    .collect();
                shards.insert_many(&parsed)
            })
            .await?;
            self.last_seq.fetch_max(last, Ordering::SeqCst);
        }
        self.update_gauges();
        Ok(added)
    }

    fn update_gauges(&self) {
        for (shard, n) in self.shards.sizes() {
            self.metrics
                .subjects
                .get_or_create(&vec![("shard".to_owned(), shard.to_string())])
                .set(n as i64);
        }
        for (shard, bytes) in self.shards.expanded_cache_bytes() {
            self.metrics
                .expanded_cache
                .get_or_create(&vec![("shard".to_owned(), shard.to_string())])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// A local search needs every shard in this process.
    fn ensure_every_shard_here(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.shards.is_complete(),
            "dedup worker holds shards {:?} of {}: searching other shards needs the broker \
             scatter-gather ([dedup] scatter = \"broker\")",
            self.shards.owned(),
            self.shards.count()
        );
        Ok(())
    }

    /// The highest `dedup_enrolled.seq` loaded into the local shards: every subject enrolled
    /// up to it is in memory (enrolments are committed one at a time, under the gallery lock).
    pub fn seen_seq(&self) -> i64 {
        self.last_seq.load(Ordering::SeqCst)
    }

    /// Searches `tenprint` over every local shard together with the probes of this process's
    /// other jobs ([`crate::batcher`]); one unthresholded answer per shard, for
    /// [`crate::scatter::gather`]. No lock is held: subjects enrolled meanwhile are compared
    /// afterwards by [`DedupEngine::late_enrolments`]. The probe is returned with the answers:
    /// the comparison with late enrolments and the enrolment reuse its expanded fingers.
    pub async fn search_batched(
        &self,
        tenprint: &TenPrint,
        exclude: &str,
    ) -> anyhow::Result<(Vec<ShardAnswer>, Arc<Probe>)> {
        self.ensure_every_shard_here()?;
        let started = Instant::now();
        let batcher = self.batcher.get_or_init(|| {
            SearchBatcher::start(
                self.shards.clone(),
                self.config.batch_max,
                self.config.max_candidates,
                self.metrics.batch_probes.clone(),
            )
        });
        let tp = tenprint.clone();
        let probe = Arc::new(tokio::task::spawn_blocking(move || Probe::new(&tp)).await?);
        let answers = batcher
            .search(probe.clone(), Some(exclude.to_owned()))
            .await?;
        self.metrics.search.observe(started.elapsed().as_secs_f64());
        Ok((answers, probe))
    }

    /// Compares `tenprint` 1:1 with every subject enrolled after `since` (a
    /// [`DedupEngine::seen_seq`] taken before a search), except `exclude`: what a search that
    /// ran without the gallery lock could not see. Called under the lock, where no enrolment
    /// can be in flight, so these are exactly the subjects the search missed. The answer
    /// joins the shards' answers in [`crate::scatter::gather`]. `probe`, the search's probe of
    /// `tenprint` if this process built one, saves expanding its fingers again.
    pub async fn late_enrolments(
        &self,
        services: &Services,
        since: i64,
        exclude: &str,
        tenprint: &TenPrint,
        probe: Option<Arc<Probe>>,
    ) -> anyhow::Result<ShardAnswer> {
        let rows = sqlx::query(
            "SELECT application_id, sealed_templates FROM dedup_enrolled
             WHERE seq > $1 ORDER BY seq",
        )
        .bind(since)
        .fetch_all(services.store.pool())
        .await
        .context("reading enrolments made during the search")?;
        // Subjects already in a local shard (enrolled by this process's own decisions, or
        // loaded by a refresh) are compared there, from their kept expansion; the others are
        // read from their row.
        let mut in_gallery = Vec::new();
        let mut late = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("application_id")?;
            if id == exclude {
                continue;
            }
            if self.shards.contains(&id) {
                in_gallery.push(id);
            } else {
                let stored = open_enrolled(services, &id, row)?;
                late.push((id, stored));
            }
        }
        let size = late.len() + in_gallery.len();
        self.metrics.late_compared.inc_by(size as u64);
        if size == 0 {
            // The usual case: nobody was enrolled during the search.
            return Ok(ShardAnswer {
                shard: u32::MAX,
                size: 0,
                candidates: Vec::new(),
            });
        }
        // A broker-scatter searcher may hold no shard: every gallery uses the shipped
        // calibration.
        let calibration = self
            .shards
            .calibration()
            .unwrap_or_else(|| cardpipe_biometrics::matcher::Calibration::fvc2002().clone());
        let tp = tenprint.clone();
        let shards = self.shards.clone();
        let candidates = tokio::task::spawn_blocking(move || {
            let probe = probe.unwrap_or_else(|| Arc::new(Probe::new(&tp)));
            // A subject deleted from the shard meanwhile is simply not compared: it left the
            // gallery.
            let kept = in_gallery
                .iter()
                .filter_map(|id| shards.verify(id, &probe))
                .collect::<Vec<_>>();
            late.into_iter()
                .filter_map(|(id, stored)| match stored.tenprint() {
                    Ok(reference) => {
                        let v = cardpipe_biometrics::matcher::verify(
                            &probe,
                            &reference,
                            1.0,
                            &calibration,
                        );
                        Some(Candidate {
                            reference_id: id,
                            fused: v.fused,
                            prefilter: 0,
                        })
                    }
                    Err(e) => {
                        tracing::error!(application = %id, error = %e, "enrolled templates refused");
                        None
                    }
                })
                .chain(kept)
                .collect::<Vec<_>>()
        })
        .await?;
        Ok(ShardAnswer {
            // Not a shard: the subjects enrolled during the search, wherever they belong.
            shard: u32::MAX,
            size,
            candidates,
        })
    }

    /// Enrols in memory (if the owning shard is held here); idempotent. From the search's
    /// probe when there is one (no finger expanded again, and its expansions seed the cache).
    pub fn enrol_local(&self, id: &str, tenprint: &TenPrint, probe: Option<&Probe>) {
        match probe {
            Some(probe) => self.shards.insert_probe(id, probe),
            None => self.shards.insert(id, tenprint),
        };
        self.update_gauges();
    }
}

/// The templates of a `dedup_enrolled` row (`sealed_templates` column) of application `id`.
fn open_enrolled(
    services: &Services,
    id: &str,
    row: &sqlx::any::AnyRow,
) -> anyhow::Result<StoredTemplates> {
    let sealed: Vec<u8> = row.try_get("sealed_templates")?;
    let plain = services
        .sealer
        .open(&templates_context(id), &sealed)
        .with_context(|| format!("opening enrolled templates of {id}"))?;
    decode_templates(&plain)
        .ok_or_else(|| anyhow::anyhow!("enrolled templates of {id} do not decode"))
}

fn templates_context(id: &str) -> String {
    format!("dedup-templates:{id}")
}

/// Marks the positioned encoding of [`encode_templates`]. Rows written before it hold a bare
/// length-prefixed list of records, whose first four bytes are a little-endian record length:
/// read as one, these bytes would announce a record of over 1.4 GB, so the two never mix.
const POSITIONED_MAGIC: &[u8; 4] = b"CPFT";

/// Enrolled templates as stored in `dedup_enrolled`: `CPFT`, then per template its contract
/// position (1 byte), the record length (u32 little-endian) and the ISO record.
pub fn encode_templates(templates: &[PositionedTemplate]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(4 + templates.iter().map(|t| t.record.len() + 5).sum::<usize>());
    out.extend_from_slice(POSITIONED_MAGIC);
    for t in templates {
        out.push(t.position);
        out.extend_from_slice(&(t.record.len() as u32).to_le_bytes());
        out.extend_from_slice(&t.record);
    }
    out
}

/// Enrolled templates read back from `dedup_enrolled`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredTemplates {
    /// Written by [`encode_templates`]: each record with its contract position.
    Positioned(Vec<PositionedTemplate>),
    /// Rows written before positions were stored: records whose header positions placed
    /// them when they were enrolled (and still do).
    Legacy(Vec<Vec<u8>>),
}

impl StoredTemplates {
    /// The ten-print, built by the same rule as at enrolment.
    pub fn tenprint(&self) -> Result<TenPrint, TenPrintError> {
        match self {
            StoredTemplates::Positioned(t) => TenPrint::from_templates(t).map(|(tp, _)| tp),
            StoredTemplates::Legacy(records) => TenPrint::from_iso(records),
        }
    }
}

/// Inverse of [`encode_templates`]; also reads the older position-less rows.
pub fn decode_templates(bytes: &[u8]) -> Option<StoredTemplates> {
    if let Some(mut rest) = bytes.strip_prefix(POSITIONED_MAGIC) {
        let mut out = Vec::new();
        while !rest.is_empty() {
            let position = *rest.first()?;
            let len = u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
            let record = rest.get(5..5usize.checked_add(len)?)?.to_vec();
            out.push(PositionedTemplate { position, record });
            rest = &rest[5 + len..];
        }
        return Some(StoredTemplates::Positioned(out));
    }
    let mut bytes = bytes;
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        out.push(bytes.get(4..4usize.checked_add(len)?)?.to_vec());
        bytes = &bytes[4 + len..];
    }
    Some(StoredTemplates::Legacy(out))
}

/// An application's stored fingerprint templates, each with its contract position.
pub async fn load_templates(
    services: &Services,
    id: &ApplicationId,
) -> Result<Vec<PositionedTemplate>, RecordError> {
    let bio = records::load_biometrics(services, id).await?;
    Ok(bio
        .fingerprints
        .into_iter()
        .filter_map(|f| {
            f.template.map(|record| PositionedTemplate {
                position: f.position,
                record,
            })
        })
        .collect())
}

/// Writes the enrolment row (sealed templates) in the caller's transaction; a second
/// write for the same application is a no-op.
pub async fn insert_enrolled(
    tx: &mut StoreTx,
    services: &Services,
    id: &ApplicationId,
    records: &[PositionedTemplate],
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let sealed = services
        .sealer
        .seal(&templates_context(id.as_str()), &encode_templates(records));
    write_enrolled(tx, id.as_str(), sealed, at).await
}

async fn write_enrolled(
    tx: &mut StoreTx,
    id: &str,
    sealed: Vec<u8>,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO dedup_enrolled (application_id, sealed_templates, enrolled_at)
         VALUES ($1, $2, $3) ON CONFLICT (application_id) DO NOTHING",
    )
    .bind(id)
    .bind(sealed)
    .bind(to_rfc3339(at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The dedup stage.
#[derive(Debug, Clone)]
pub struct DedupStage {
    engine: Arc<DedupEngine>,
}

impl DedupStage {
    /// A stage over `engine` (shared with the adjudication routes in one process).
    pub fn new(engine: Arc<DedupEngine>) -> Self {
        DedupStage { engine }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<DedupEngine> {
        &self.engine
    }
}

#[async_trait]
impl Stage for DedupStage {
    fn name(&self) -> &'static str {
        STAGE_NAME
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        ACCEPTS
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        let engine = &self.engine;
        engine.ready(services).await?;
        let Probed {
            templates: records,
            tenprint,
            choices,
        } = probe_of(services, &app.id).await?;
        // The 1:N search runs first, without the gallery lock, over everything enrolled up
        // to `since`: local scatter batched with this process's other jobs, broker scatter
        // over the shard workers.
        let (since, answers, scatter_id, probe) = match engine.config.scatter {
            ScatterMode::Local => {
                engine.refresh(services).await?;
                let seen = engine.seen_seq();
                let (answers, probe) = engine.search_batched(&tenprint, app.id.as_str()).await?;
                (seen, answers, None, Some(probe))
            }
            ScatterMode::Broker => {
                let Some(scattered) =
                    crate::distributed::scatter_gather(services, engine, &app.id, app.state)
                        .await?
                else {
                    // Decided meanwhile by another delivery: nothing to do.
                    return Ok(Completion::stay());
                };
                (
                    scattered.since,
                    scattered.answers,
                    Some(scattered.scatter_id),
                    None,
                )
            }
        };
        // One decision + enrolment at a time across every dedup worker (the gallery lock,
        // released in the commit below): a second enrolment of the same person is compared
        // with the first.
        let waited = Instant::now();
        let lock =
            crate::distributed::GalleryLock::acquire(services, engine.config(), app.id.as_str())
                .await?;
        engine
            .metrics
            .lock_wait
            .observe(waited.elapsed().as_secs_f64());
        match services.store.application(&app.id).await {
            Ok(Some(now)) if now.state == app.state => {}
            Ok(_) => {
                // Decided meanwhile by another delivery: nothing to do.
                lock.release(services).await?;
                return Ok(Completion::stay());
            }
            Err(e) => {
                lock.release(services).await?;
                return Err(e.into());
            }
        }
        // Under the lock: only who was enrolled while the search ran.
        let searched = engine
            .late_enrolments(services, since, app.id.as_str(), &tenprint, probe.clone())
            .await
            .map(|late| {
                let mut answers = answers;
                answers.push(late);
                let size = answers.iter().map(|a| a.size).sum();
                let found = crate::scatter::gather(
                    answers,
                    engine.config.target_fpir,
                    engine.config.max_candidates,
                );
                (found, size, scatter_id)
            });
        let (found, gallery_size, scatter_id) = match searched {
            Ok(s) => s,
            Err(e) => {
                if let Err(release) = lock.release(services).await {
                    tracing::warn!(error = %release, "releasing the gallery lock after a failed search");
                }
                return Err(e);
            }
        };
        Ok(decide(
            services,
            engine,
            &app.id,
            &records,
            &tenprint,
            probe.as_deref(),
            &choices,
            found,
            gallery_size,
            lock.holder().to_owned(),
            scatter_id,
        ))
    }
}

/// An application's templates and the ten-print built from them.
pub(crate) struct Probed {
    pub templates: Vec<PositionedTemplate>,
    pub tenprint: TenPrint,
    /// The view used for every template.
    pub choices: Vec<ViewChoice>,
}

/// Loads an application's fingerprints and places each at its contract position by the rule
/// intake validated them with ([`cardpipe_biometrics::matcher::place_finger`]); permanent failure when
/// missing or bad. The view used for each finger is logged at debug level (header fields and
/// counts only).
pub(crate) async fn probe_of(services: &Services, id: &ApplicationId) -> anyhow::Result<Probed> {
    let templates = match load_templates(services, id).await {
        Ok(r) => r,
        Err(e @ (RecordError::Missing { .. } | RecordError::Corrupt(_))) => {
            return Err(Permanent(format!("biometrics: {e}")).into());
        }
        Err(e) => return Err(e.into()),
    };
    let (tenprint, choices) = TenPrint::from_templates(&templates)
        .map_err(|e| Permanent(format!("fingerprints refused: {e}")))?;
    for c in &choices {
        tracing::debug!(
            application = %id,
            position = c.position,
            view = c.index + 1,
            views = c.views,
            candidates = c.candidates,
            header_position = c.header_position,
            impression_type = c.impression_type,
            quality = c.quality,
            minutiae = c.minutiae,
            "finger view placed"
        );
    }
    Ok(Probed {
        templates,
        tenprint,
        choices,
    })
}

/// For the history: which view was used where a record offered several for its finger.
fn views_note(choices: &[ViewChoice]) -> String {
    let chosen: Vec<String> = choices
        .iter()
        .filter(|c| c.views > 1)
        .map(ToString::to_string)
        .collect();
    if chosen.is_empty() {
        String::new()
    } else {
        format!("; best-quality views used: {}", chosen.join("; "))
    }
}

/// The decision after a search (identical for the local and the broker scatter): clear →
/// enrol and hand over to keys; hit → candidate list and possible_duplicate. The commit also
/// releases the gallery lock and closes the broker scatter.
#[allow(clippy::too_many_arguments)]
fn decide(
    services: &Services,
    engine: &DedupEngine,
    id: &ApplicationId,
    records: &[PositionedTemplate],
    tenprint: &TenPrint,
    probe: Option<&Probe>,
    choices: &[ViewChoice],
    found: Vec<Candidate>,
    gallery_size: usize,
    holder: String,
    scatter_id: Option<String>,
) -> Completion {
    let now = services.clock.now();
    if found.is_empty() {
        engine.enrol_local(id.as_str(), tenprint, probe);
        let sealed = services
            .sealer
            .seal(&templates_context(id.as_str()), &encode_templates(records));
        let id = id.0.clone();
        return Completion::to(ApplicationState::DedupClear)
            .then(NEXT_STAGE)
            .because(format!(
                "no candidate at FPIR {} over {} enrolled subjects{}",
                engine.config.target_fpir,
                gallery_size,
                views_note(choices)
            ))
            .with_writes(Box::new(move |tx| {
                Box::pin(async move {
                    write_enrolled(tx, &id, sealed, now).await?;
                    crate::distributed::finish_decision(tx, &holder, scatter_id.as_deref(), now)
                        .await
                })
            }));
    }
    engine.metrics.possible.inc();
    let best = &found[0];
    let reason = format!(
        "{} candidate(s); best {} with fused score {:.1} (FMR {:.1e}, {} fingers){}",
        found.len(),
        best.reference_id,
        best.fused.score,
        best.fused.fmr,
        best.fused.fingers.iter().flatten().count(),
        views_note(choices)
    );
    let id = id.0.clone();
    let rows: Vec<(i64, String, f64, f64, String)> = found
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let fingers: Vec<Option<f64>> = c
                .fused
                .fingers
                .iter()
                .map(|s| s.map(|v| (f64::from(v) * 1e4).round() / 1e4))
                .collect();
            (
                i as i64 + 1,
                c.reference_id.clone(),
                c.fused.score,
                c.fused.fmr,
                serde_json::to_string(&fingers).expect("scores serialise"),
            )
        })
        .collect();
    Completion::to(ApplicationState::PossibleDuplicate)
        .because(reason)
        .with_writes(Box::new(move |tx| {
            Box::pin(async move {
                for (rank, candidate, score, fmr, fingers) in rows {
                    sqlx::query(
                        "INSERT INTO dedup_candidates
                         (application_id, rank, candidate_id, score, fmr, finger_scores, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (application_id, rank) DO NOTHING",
                    )
                    .bind(&id)
                    .bind(rank)
                    .bind(candidate)
                    .bind(score)
                    .bind(fmr)
                    .bind(fingers)
                    .bind(to_rfc3339(now))
                    .execute(&mut **tx)
                    .await?;
                }
                crate::distributed::finish_decision(tx, &holder, scatter_id.as_deref(), now).await
            })
        }))
}

/// Which shard owns an application (for operators and logs).
pub fn owner_shard(id: &str, shards: u32) -> u32 {
    Shard::owner_of(id, shards)
}
