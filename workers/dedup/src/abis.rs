//! ABIS adapter: a trait shaped like the MOSIP ABIS API, and the built-in implementation.
//!
//! MOSIP's ABIS contract is a set of queue messages — `Insert`, `Identify`, `Delete`,
//! `PingStatus`, `PendingJobs`, `ReferenceCount` — each carrying a `requestId` chosen by the
//! caller and a `referenceId` naming an enrolment, never personal data. Identify searches the
//! biometrics of an *already inserted* reference id (or fresh ones) against the gallery (or a
//! listed subset of it) and answers a candidate list with scores and per-modality analytics.
//! The [`Abis`] trait mirrors that contract synchronously over [`BuiltinAbis`], an in-memory
//! gallery of its own (MOSIP's reference ids, not the pipeline's applications). The wire
//! form MOSIP speaks — JSON messages over a RabbitMQ queue pair or HTTP, biometrics fetched
//! by `referenceURL`, answers persisted — is [`crate::mosip`], served by
//! `cardpipe abis serve`. The pipeline's own `dedup` stage does not go through this trait: it
//! searches its sharded gallery directly ([`crate::stage`]).
//!
//! Idempotency: a request id that was already answered gets the recorded answer again
//! (so a redelivered broker message is harmless); reusing a request id for a different
//! operation or reference id is refused. Failures map to MOSIP failure reason codes
//! ([`AbisError::failure_reason`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use cardpipe_biometrics::matcher::{
    FusedScore, Gallery, IdentifyOptions, PositionedTemplate, Probe, TenPrint, TenPrintError,
    Verification, verify,
};

/// Longest accepted request or reference id.
pub const MAX_ID_LEN: usize = 128;
/// Answers remembered for idempotency.
pub const REQUEST_MEMORY: usize = 200_000;

/// ABIS failures. Messages carry ids only, never biometric data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbisError {
    #[error("invalid {field}: must be 1..=128 printable ASCII characters")]
    InvalidId { field: &'static str },
    #[error("reference id {0} is not enrolled")]
    UnknownReference(String),
    #[error("request id {0} was already used for a different operation or reference id")]
    RequestIdConflict(String),
    #[error("biometric data refused: {0}")]
    BadBiometrics(#[from] TenPrintError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl AbisError {
    /// MOSIP ABIS failure reason code (ABIS API specification 0.9).
    pub fn failure_reason(&self) -> u8 {
        use crate::mosip::message::FailureReason as R;
        match self {
            AbisError::Internal(_) => R::InternalError,
            AbisError::InvalidId { .. } | AbisError::RequestIdConflict(_) => {
                R::InvalidRequestStructure
            }
            AbisError::BadBiometrics(TenPrintError::Empty) => R::QualityCheckFailed,
            AbisError::BadBiometrics(_) => R::InvalidCbeffFormat,
            AbisError::UnknownReference(_) => R::ReferenceIdNotFound,
        }
        .code()
    }
}

/// Identify request.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyRequest {
    pub request_id: String,
    /// The enrolled subject whose biometrics are searched.
    pub reference_id: String,
    /// Restrict the search to these reference ids (MOSIP `gallery.referenceIds`).
    pub gallery: Option<Vec<String>>,
    pub max_results: usize,
    /// Only candidates strong enough for this false positive identification rate over the
    /// current gallery size are returned; `None` returns the best `max_results` regardless.
    pub target_fpir: Option<f64>,
}

/// One candidate of an identify answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AbisCandidate {
    pub reference_id: String,
    /// Fused ten-print score (−log10 FMR) and per-finger scores.
    pub scores: FusedScore,
}

/// Identify answer.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyResponse {
    pub request_id: String,
    pub candidates: Vec<AbisCandidate>,
}

/// Insert answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertResponse {
    pub request_id: String,
    pub reference_id: String,
    /// False when the reference id was already enrolled (its data were replaced).
    pub newly_inserted: bool,
}

/// Delete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteResponse {
    pub request_id: String,
    pub reference_id: String,
    pub existed: bool,
}

/// The ABIS contract (see the module docs).
pub trait Abis: Send + Sync {
    /// Liveness.
    fn ping(&self) -> Result<(), AbisError>;
    /// Requests accepted but not yet answered.
    fn pending_jobs(&self) -> usize;
    /// Enrolled reference ids.
    fn reference_count(&self) -> Result<u64, AbisError>;
    /// Enrols ISO 19794-2 records under `reference_id`, each at its given finger position
    /// (MOSIP: the BIR's subtype), placed by [`cardpipe_biometrics::matcher::place_finger`].
    fn insert(
        &self,
        request_id: &str,
        reference_id: &str,
        records: &[PositionedTemplate],
    ) -> Result<InsertResponse, AbisError>;
    /// Searches an enrolled reference id against the gallery (excluding itself).
    fn identify(&self, request: &IdentifyRequest) -> Result<IdentifyResponse, AbisError>;
    /// Removes a reference id.
    fn delete(&self, request_id: &str, reference_id: &str) -> Result<DeleteResponse, AbisError>;
}

fn check_id(id: &str, field: &'static str) -> Result<(), AbisError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AbisError::InvalidId { field });
    }
    Ok(())
}

#[derive(Clone)]
enum Answer {
    Insert(InsertResponse),
    Identify(IdentifyResponse),
    Delete(DeleteResponse),
}

/// Key describing what a request id was used for.
#[derive(Clone, PartialEq, Eq)]
struct Usage {
    op: u8,
    reference_id: String,
}

#[derive(Default)]
struct Memory {
    answers: HashMap<String, (Usage, Answer)>,
    order: VecDeque<String>,
}

impl Memory {
    fn recall(&self, request_id: &str, usage: &Usage) -> Result<Option<Answer>, AbisError> {
        match self.answers.get(request_id) {
            Some((u, a)) if u == usage => Ok(Some(a.clone())),
            Some(_) => Err(AbisError::RequestIdConflict(request_id.to_owned())),
            None => Ok(None),
        }
    }
    fn record(&mut self, request_id: &str, usage: Usage, answer: Answer) {
        if self
            .answers
            .insert(request_id.to_owned(), (usage, answer))
            .is_none()
        {
            self.order.push_back(request_id.to_owned());
            while self.order.len() > REQUEST_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.answers.remove(&old);
                }
            }
        }
    }
}

/// Built-in ABIS over an in-memory [`Gallery`].
pub struct BuiltinAbis {
    gallery: RwLock<Gallery>,
    memory: Mutex<Memory>,
    pending: AtomicUsize,
    options: IdentifyOptions,
}

impl std::fmt::Debug for BuiltinAbis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinAbis")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);
impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BuiltinAbis {
    /// Wraps a gallery (possibly pre-loaded at start-up).
    pub fn new(gallery: Gallery, options: IdentifyOptions) -> Self {
        BuiltinAbis {
            gallery: RwLock::new(gallery),
            memory: Mutex::new(Memory::default()),
            pending: AtomicUsize::new(0),
            options,
        }
    }

    /// 1:1 verification of fresh ISO records against an enrolled reference (pickup
    /// handover), deciding at `target_fmr`.
    pub fn verify(
        &self,
        reference_id: &str,
        records: &[PositionedTemplate],
        target_fmr: f64,
    ) -> Result<Verification, AbisError> {
        check_id(reference_id, "reference id")?;
        let (tp, _) = TenPrint::from_templates(records)?;
        let gallery = self.read()?;
        let reference = gallery
            .get(reference_id)
            .ok_or_else(|| AbisError::UnknownReference(reference_id.to_owned()))?;
        Ok(verify(
            &Probe::new(&tp),
            &reference,
            target_fmr,
            gallery.calibration(),
        ))
    }

    /// Read access to the gallery (statistics, snapshots).
    pub fn with_gallery<R>(&self, f: impl FnOnce(&Gallery) -> R) -> Result<R, AbisError> {
        Ok(f(&*self.read()?))
    }

    fn begin(&self) -> PendingGuard<'_> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingGuard(&self.pending)
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Gallery>, AbisError> {
        self.gallery
            .read()
            .map_err(|_| AbisError::Internal("gallery lock poisoned"))
    }

    fn remember(&self) -> Result<std::sync::MutexGuard<'_, Memory>, AbisError> {
        self.memory
            .lock()
            .map_err(|_| AbisError::Internal("request memory lock poisoned"))
    }
}

/// What an identify searches with.
#[derive(Clone, Copy)]
pub enum SearchProbe<'a> {
    /// The biometrics of an enrolled reference id (which is left out of the answer).
    Enrolled(&'a str),
    /// Fresh biometrics (MOSIP's identify by `referenceURL`).
    Fresh(&'a TenPrint),
}

impl BuiltinAbis {
    /// Whether `reference_id` is enrolled.
    pub fn contains(&self, reference_id: &str) -> Result<bool, AbisError> {
        Ok(self.read()?.get(reference_id).is_some())
    }

    /// Enrols (or replaces) `reference_id` without request-id bookkeeping: for a caller that
    /// keeps its own (the MOSIP API persists its answers). True when newly enrolled.
    pub fn enrol(&self, reference_id: &str, tenprint: &TenPrint) -> Result<bool, AbisError> {
        check_id(reference_id, "reference id")?;
        Ok(self
            .gallery
            .write()
            .map_err(|_| AbisError::Internal("gallery lock poisoned"))?
            .insert(reference_id, tenprint))
    }

    /// Removes `reference_id` without request-id bookkeeping. True when it was enrolled.
    pub fn remove(&self, reference_id: &str) -> Result<bool, AbisError> {
        Ok(self
            .gallery
            .write()
            .map_err(|_| AbisError::Internal("gallery lock poisoned"))?
            .delete(reference_id))
    }

    /// A 1:N search: the best `max_results` candidates, over the whole gallery or only the
    /// listed reference ids (ids not enrolled are ignored), strongest first; with
    /// `target_fpir`, only candidates whose fused score clears `−log10(fpir / N)`.
    pub fn search(
        &self,
        probe: SearchProbe<'_>,
        only: Option<&[String]>,
        max_results: usize,
        target_fpir: Option<f64>,
    ) -> Result<Vec<AbisCandidate>, AbisError> {
        let _p = self.begin();
        let gallery = self.read()?;
        let (probe, exclude) = match probe {
            SearchProbe::Enrolled(id) => {
                let tp = gallery
                    .get(id)
                    .ok_or_else(|| AbisError::UnknownReference(id.to_owned()))?;
                (Probe::new(&tp), Some(id))
            }
            SearchProbe::Fresh(tp) => (Probe::new(tp), None),
        };
        let min_score = match target_fpir {
            Some(fpir) => -(fpir.clamp(1e-300, 1.0) / gallery.len().max(1) as f64).log10(),
            None => 0.0,
        };
        let opts = IdentifyOptions {
            max_results,
            min_score,
            ..self.options
        };
        let mut candidates: Vec<AbisCandidate> = match only {
            Some(ids) => ids
                .iter()
                .filter(|id| Some(id.as_str()) != exclude)
                .filter_map(|id| {
                    let v = gallery.verify(&probe, id, 1.0)?;
                    Some(AbisCandidate {
                        reference_id: id.clone(),
                        scores: v.fused,
                    })
                })
                .filter(|c| c.scores.score >= min_score)
                .collect(),
            None => gallery
                .identify(&probe, &opts, exclude)
                .into_iter()
                .map(|c| AbisCandidate {
                    reference_id: c.reference_id,
                    scores: c.fused,
                })
                .collect(),
        };
        drop(gallery);
        candidates.sort_by(|a, b| b.scores.score.total_cmp(&a.scores.score));
        candidates.dedup_by(|a, b| a.reference_id == b.reference_id);
        candidates.truncate(max_results);
        Ok(candidates)
    }
}

impl Abis for BuiltinAbis {
    fn ping(&self) -> Result<(), AbisError> {
        self.read().map(|_| ())
    }

    fn pending_jobs(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn reference_count(&self) -> Result<u64, AbisError> {
        Ok(self.read()?.len() as u64)
    }

    fn insert(
        &self,
        request_id: &str,
        reference_id: &str,
        records: &[PositionedTemplate],
    ) -> Result<InsertResponse, AbisError> {
        check_id(request_id, "request id")?;
        check_id(reference_id, "reference id")?;
        let _p = self.begin();
        let usage = Usage {
            op: 1,
            reference_id: reference_id.to_owned(),
        };
        if let Some(Answer::Insert(a)) = self.remember()?.recall(request_id, &usage)? {
            return Ok(a);
        }
        let (tp, _) = TenPrint::from_templates(records)?;
        let newly_inserted = self
            .gallery
            .write()
            .map_err(|_| AbisError::Internal("gallery lock poisoned"))?
            .insert(reference_id, &tp);
        let answer = InsertResponse {
            request_id: request_id.to_owned(),
            reference_id: reference_id.to_owned(),
            newly_inserted,
        };
        self.remember()?
            .record(request_id, usage, Answer::Insert(answer.clone()));
        Ok(answer)
    }

    fn identify(&self, request: &IdentifyRequest) -> Result<IdentifyResponse, AbisError> {
        check_id(&request.request_id, "request id")?;
        check_id(&request.reference_id, "reference id")?;
        let usage = Usage {
            op: 2,
            reference_id: request.reference_id.clone(),
        };
        if let Some(Answer::Identify(a)) = self.remember()?.recall(&request.request_id, &usage)? {
            return Ok(a);
        }
        let candidates = self.search(
            SearchProbe::Enrolled(&request.reference_id),
            request.gallery.as_deref(),
            request.max_results,
            request.target_fpir,
        )?;
        let answer = IdentifyResponse {
            request_id: request.request_id.clone(),
            candidates,
        };
        self.remember()?
            .record(&request.request_id, usage, Answer::Identify(answer.clone()));
        Ok(answer)
    }

    fn delete(&self, request_id: &str, reference_id: &str) -> Result<DeleteResponse, AbisError> {
        check_id(request_id, "request id")?;
        check_id(reference_id, "reference id")?;
        let _p = self.begin();
        let usage = Usage {
            op: 3,
            reference_id: reference_id.to_owned(),
        };
        if let Some(Answer::Delete(a)) = self.remember()?.recall(request_id, &usage)? {
            return Ok(a);
        }
        let existed = self
            .gallery
            .write()
            .map_err(|_| AbisError::Internal("gallery lock poisoned"))?
            .delete(reference_id);
        let answer = DeleteResponse {
            request_id: request_id.to_owned(),
            reference_id: reference_id.to_owned(),
            existed,
        };
        self.remember()?
            .record(request_id, usage, Answer::Delete(answer.clone()));
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardpipe_biometrics::synth::Population;

    /// Records in position order 1..=10, as the synthetic population writes them.
    fn positioned(records: &[Vec<u8>]) -> Vec<PositionedTemplate> {
        records
            .iter()
            .zip(1..)
            .map(|(r, position)| PositionedTemplate {
                position,
                record: r.clone(),
            })
            .collect()
    }

    #[test]
    fn mosip_flow_catches_planted_duplicate_and_is_idempotent() {
        let pop = Population::generate(11, 30, 0.0);
        let abis = BuiltinAbis::new(Gallery::new(), IdentifyOptions::default());
        for (k, s) in pop.subjects.iter().enumerate() {
            let r = abis
                .insert(
                    &format!("req-ins-{k}"),
                    &s.reference_id,
                    &positioned(&s.templates),
                )
                .unwrap();
            assert!(r.newly_inserted);
        }
        // Redelivery of an insert: same answer, no second entry.
        let again = abis
            .insert(
                "req-ins-0",
                &pop.subjects[0].reference_id,
                &positioned(&pop.subjects[0].templates),
            )
            .unwrap();
        assert!(again.newly_inserted);
        assert_eq!(abis.reference_count().unwrap(), 30);
        // Same request id for another reference id is refused.
        assert!(matches!(
            abis.insert(
                "req-ins-0",
                &pop.subjects[1].reference_id,
                &positioned(&pop.subjects[1].templates)
            ),
            Err(AbisError::RequestIdConflict(_))
        ));
        // A duplicate enrolment of subject 7 under a new reference id.
        let dup = positioned(&pop.fresh_impressions(7, 1));
        abis.insert("req-dup", "ref-new-applicant", &dup).unwrap();
        let req = IdentifyRequest {
            request_id: "req-idf".into(),
            reference_id: "ref-new-applicant".into(),
            gallery: None,
            max_results: 5,
            target_fpir: Some(0.001),
        };
        let ans = abis.identify(&req).unwrap();
        assert_eq!(
            ans.candidates.len(),
            1,
            "exactly the planted duplicate is returned"
        );
        assert_eq!(ans.candidates[0].reference_id, pop.subjects[7].reference_id);
        assert!(ans.candidates[0].scores.fingers.iter().flatten().count() >= 8);
        assert_eq!(abis.identify(&req).unwrap(), ans);
        // A fresh person yields no candidate.
        let other = Population::generate(12, 1, 0.0);
        abis.insert(
            "req-other",
            "ref-other",
            &positioned(&other.subjects[0].templates),
        )
        .unwrap();
        let none = abis
            .identify(&IdentifyRequest {
                request_id: "req-idf-2".into(),
                reference_id: "ref-other".into(),
                ..req.clone()
            })
            .unwrap();
        assert!(none.candidates.is_empty());
        let d = abis.delete("req-del", "ref-new-applicant").unwrap();
        assert!(d.existed);
        assert!(abis.delete("req-del", "ref-new-applicant").unwrap().existed);
        assert!(
            !abis
                .delete("req-del-2", "ref-new-applicant")
                .unwrap()
                .existed
        );
        assert_eq!(abis.pending_jobs(), 0);
        assert!(abis.ping().is_ok());
        // Pickup handover: the enrolled person verifies, somebody else does not.
        let fresh = positioned(&pop.fresh_impressions(2, 5));
        assert!(
            abis.verify(&pop.subjects[2].reference_id, &fresh, 1e-6)
                .unwrap()
                .is_match
        );
        assert!(
            !abis
                .verify(&pop.subjects[3].reference_id, &fresh, 1e-6)
                .unwrap()
                .is_match
        );
        assert_eq!(abis.with_gallery(|g| g.len()).unwrap(), 31);
        assert!(matches!(
            abis.insert("", "x", &dup),
            Err(AbisError::InvalidId { .. })
        ));
    }
}
