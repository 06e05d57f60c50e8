//! MOSIP ABIS API messages (ABIS API specification 0.9, message version 1.1): parsing a
//! request with the spec's failure reasons, and the JSON of each response.
//!
//! Every response carries the request's `id` and `requestId` and a `responsetime`;
//! `returnValue` is `"1"` (success) or `"2"` (failed, with `failureReason`). Numbers are sent
//! as strings, as in the spec's examples.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::abis::MAX_ID_LEN;

/// Message versions understood (the spec's requests say `1.1`; `1.0` messages have the same
/// fields).
pub const VERSIONS: &[&str] = &["1.1", "1.0"];

/// The six operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Insert,
    Identify,
    Delete,
    Ping,
    PendingJobs,
    ReferenceCount,
}

impl Operation {
    /// Every operation, for metrics.
    pub const ALL: [Operation; 6] = [
        Operation::Insert,
        Operation::Identify,
        Operation::Delete,
        Operation::Ping,
        Operation::PendingJobs,
        Operation::ReferenceCount,
    ];

    /// The message `id` (`mosip.abis.insert` ...).
    pub fn message_id(self) -> &'static str {
        match self {
            Operation::Insert => "mosip.abis.insert",
            Operation::Identify => "mosip.abis.identify",
            Operation::Delete => "mosip.abis.delete",
            Operation::Ping => "mosip.abis.ping",
            Operation::PendingJobs => "mosip.abis.pendingJobs",
            Operation::ReferenceCount => "mosip.abis.referenceCount",
        }
    }

    /// Short name (metric label, request log).
    pub fn name(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Identify => "identify",
            Operation::Delete => "delete",
            Operation::Ping => "ping",
            Operation::PendingJobs => "pending_jobs",
            Operation::ReferenceCount => "reference_count",
        }
    }

    fn from_message_id(id: &str) -> Option<Self> {
        Operation::ALL.into_iter().find(|op| op.message_id() == id)
    }
}

/// The spec's failure reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    InternalError = 1,
    Aborted = 2,
    UnexpectedError = 3,
    InvalidRequestStructure = 4,
    MissingReferenceId = 5,
    MissingRequestId = 6,
    UnableToFetchBiometrics = 7,
    MissingReferenceUrl = 8,
    MissingRequesttime = 9,
    ReferenceIdExists = 10,
    CbeffHasNoData = 11,
    ReferenceIdNotFound = 12,
    InvalidVersion = 13,
    InvalidId = 14,
    InvalidRequesttime = 15,
    InvalidCbeffFormat = 16,
    DataShareExpired = 17,
    QualityCheckFailed = 18,
}

impl FailureReason {
    /// The code as the spec writes it.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Whether the same request may succeed later (then its answer is not kept for a
    /// redelivery: the retry works again).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureReason::InternalError
                | FailureReason::Aborted
                | FailureReason::UnexpectedError
                | FailureReason::UnableToFetchBiometrics
        )
    }
}

/// A failed request: the reason code and, for the log, what was wrong (ids and field
/// names only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub detail: String,
}

impl Failure {
    pub fn new(reason: FailureReason, detail: impl Into<String>) -> Self {
        Failure {
            reason,
            detail: detail.into(),
        }
    }
}

/// A valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The `id` as sent (echoed in the response).
    pub id: String,
    pub operation: Operation,
    pub request_id: String,
    pub reference_id: Option<String>,
    pub reference_url: Option<String>,
    /// Identify flags.
    pub max_results: Option<usize>,
    /// Identify flag `targetFPIR` as the rate it encodes: `10^(−targetFPIR/10)`.
    pub target_fpir: Option<f64>,
    /// Identify: restrict the search to these reference ids.
    pub gallery: Option<Vec<String>>,
}

/// A request that could not be parsed: what of it could be read (for the response) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub id: String,
    pub request_id: String,
    pub failure: Failure,
}

fn text<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field).and_then(Value::as_str)
}

/// A flag value: a JSON string or number.
fn flag_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses and checks one request message (a JSON object, as text or bytes).
pub fn parse(bytes: &[u8]) -> Result<Request, Refused> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Refused {
        id: String::new(),
        request_id: String::new(),
        failure: Failure::new(
            FailureReason::InvalidRequestStructure,
            format!(
                "not a JSON message (line {}, column {})",
                e.line(),
                e.column()
            ),
        ),
    })?;
    let id = text(&value, "id").unwrap_or("").to_owned();
    let request_id = text(&value, "requestId").unwrap_or("").to_owned();
    let refuse = |reason, detail: String| Refused {
        id: id.clone(),
        request_id: if valid_id(&request_id) {
            request_id.clone()
        } else {
            String::new()
        },
        failure: Failure::new(reason, detail),
    };
    if !value.is_object() {
        return Err(refuse(
            FailureReason::InvalidRequestStructure,
            "the message is not a JSON object".into(),
        ));
    }
    let Some(operation) = Operation::from_message_id(&id) else {
        return Err(refuse(
            FailureReason::InvalidId,
            format!(
                "id {id:?} is not a MOSIP ABIS operation (mosip.abis.insert, identify, delete, ping, pendingJobs, referenceCount)"
            ),
        ));
    };
    match text(&value, "version") {
        Some(v) if VERSIONS.contains(&v) => {}
        other => {
            return Err(refuse(
                FailureReason::InvalidVersion,
                format!("version {other:?} is not one of {VERSIONS:?}"),
            ));
        }
    }
    if request_id.is_empty() {
        return Err(refuse(
            FailureReason::MissingRequestId,
            "requestId is missing".into(),
        ));
    }
    if !valid_id(&request_id) {
        return Err(refuse(
            FailureReason::InvalidRequestStructure,
            format!("requestId must be 1..={MAX_ID_LEN} printable ASCII characters"),
        ));
    }
    match text(&value, "requesttime") {
        None | Some("") => {
            return Err(refuse(
                FailureReason::MissingRequesttime,
                "requesttime is missing".into(),
            ));
        }
        Some(t) if OffsetDateTime::parse(t, &Rfc3339).is_err() => {
            return Err(refuse(
                FailureReason::InvalidRequesttime,
                "requesttime is not an ISO 8601 date-time (e.g. 2020-03-29T07:01:24.692Z)".into(),
            ));
        }
        Some(_) => {}
    }
    let reference_id = match value.get("referenceId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if valid_id(s) => Some(s.clone()),
        Some(_) => {
            return Err(refuse(
                FailureReason::InvalidRequestStructure,
                format!("referenceId must be 1..={MAX_ID_LEN} printable ASCII characters"),
            ));
        }
    };
    let reference_url = match value.get("referenceURL") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        Some(_) => {
            return Err(refuse(
                FailureReason::InvalidRequestStructure,
                "referenceURL must be a string".into(),
            ));
        }
    };
    let mut request = Request {
        id: id.clone(),
        operation,
        request_id: request_id.clone(),
        reference_id,
        reference_url,
        max_results: None,
        target_fpir: None,
        gallery: None,
    };
    match operation {
        Operation::Insert => {
            if request.reference_id.is_none() {
                return Err(refuse(
                    FailureReason::MissingReferenceId,
                    "referenceId is missing".into(),
                ));
            }
            if request.reference_url.is_none() {
                return Err(refuse(
                    FailureReason::MissingReferenceUrl,
                    "referenceURL is missing".into(),
                ));
            }
        }
        Operation::Delete => {
            if request.reference_id.is_none() {
                return Err(refuse(
                    FailureReason::MissingReferenceId,
                    "referenceId is missing".into(),
                ));
            }
        }
        Operation::Identify => {
            if request.reference_id.is_none() && request.reference_url.is_none() {
                return Err(refuse(
                    FailureReason::MissingReferenceId,
                    "identify needs a referenceId (or a referenceURL)".into(),
                ));
            }
            if let Some(flags) = value.get("flags").filter(|f| !f.is_null()) {
                let Some(flags) = flags.as_object() else {
                    return Err(refuse(
                        FailureReason::InvalidRequestStructure,
                        "flags must be an object".into(),
                    ));
                };
                if let Some(v) = flags.get("maxResults") {
                    match flag_number(v) {
                        Some(n) if (1.0..=1000.0).contains(&n) && n.fract() == 0.0 => {
                            request.max_results = Some(n as usize)
                        }
                        _ => {
                            return Err(refuse(
                                FailureReason::InvalidRequestStructure,
                                "flags.maxResults must be a whole number 1..=1000".into(),
                            ));
                        }
                    }
                }
                if let Some(v) = flags.get("targetFPIR") {
                    match flag_number(v) {
                        Some(n) if (0.0..=300.0).contains(&n) => {
                            request.target_fpir = Some(10f64.powf(-n / 10.0))
                        }
                        _ => {
                            return Err(refuse(
                                FailureReason::InvalidRequestStructure,
                                "flags.targetFPIR must be a number 0..=300 \
                                 (round(-10 log10 FPIR))"
                                    .into(),
                            ));
                        }
                    }
                }
            }
            if let Some(gallery) = value.get("gallery").filter(|g| !g.is_null()) {
                let ids = gallery
                    .get("referenceIds")
                    .and_then(Value::as_array)
                    .and_then(|list| {
                        list.iter()
                            .map(|e| {
                                e.get("referenceId")
                                    .and_then(Value::as_str)
                                    .filter(|s| valid_id(s))
                                    .map(str::to_owned)
                            })
                            .collect::<Option<Vec<String>>>()
                    });
                match ids {
                    Some(ids) => request.gallery = Some(ids),
                    None => {
                        return Err(refuse(
                            FailureReason::InvalidRequestStructure,
                            "gallery must be {\"referenceIds\": [{\"referenceId\": \"...\"}, ...]}"
                                .into(),
                        ));
                    }
                }
            }
        }
        Operation::Ping | Operation::PendingJobs | Operation::ReferenceCount => {}
    }
    Ok(request)
}

/// One candidate of an identify response.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateOut {
    pub reference_id: String,
    /// Fused ten-print score: −log10 of the fused false match rate.
    pub score: f64,
    pub fmr: f64,
    /// Fingers compared.
    pub fingers: usize,
}

/// What a request came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    Candidates(Vec<CandidateOut>),
    JobsCount(usize),
    Count(u64),
    Failed(Failure),
}

/// `responsetime` format: `2020-03-29T07:01:24.692Z`.
pub fn response_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// The response message.
pub fn response(id: &str, request_id: &str, outcome: &Outcome, at: OffsetDateTime) -> Value {
    let mut r = json!({
        "id": id,
        "requestId": request_id,
        "responsetime": response_time(at),
        "returnValue": "1",
    });
    match outcome {
        Outcome::Done => {}
        Outcome::JobsCount(n) => r["jobscount"] = json!(n.to_string()),
        Outcome::Count(n) => r["count"] = json!(n.to_string()),
        Outcome::Candidates(list) => {
            let candidates: Vec<Value> = list
                .iter()
                .map(|c| {
                    let analytics = json!({
                        "internalScore": format!("{:.2}", c.score),
                        "fmr": format!("{:.3e}", c.fmr),
                        "fingersCompared": c.fingers.to_string(),
                    });
                    json!({
                        "referenceId": c.reference_id,
                        "analytics": analytics,
                        "modalities": [{ "biometricType": "FIR", "analytics": analytics }],
                    })
                })
                .collect();
            r["candidateList"] = json!({
                "count": list.len().to_string(),
                "candidates": candidates,
            });
        }
        Outcome::Failed(f) => {
            r["returnValue"] = json!("2");
            r["failureReason"] = json!(f.reason.code().to_string());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's recorded examples (ABIS API 0.9), verbatim apart from the comments JSON
    /// cannot carry.
    const INSERT: &str = r#"{
      "id": "mosip.abis.insert",
      "version": "1.1",
      "requestId": "91234567-89AB-CDEF-0123-456789ABCDEF",
      "requesttime": "2020-03-29T07:01:24.692Z",
      "referenceId": "01234567-89AB-CDEF-0123-456789ABCDEF",
      "referenceURL": "https://example.org/v1/datashare/get/mpolicy-default-abis/mpartner-default-abis/x"
    }"#;
    const IDENTIFY: &str = r#"{
      "id": "mosip.abis.identify",
      "version": "1.1",
      "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
      "requesttime": "2020-03-29T07:01:24.692Z",
      "referenceId": "987654321-89AB-CDEF-0123-456789ABCDEF",
      "referenceURL": "",
      "flags": { "maxResults": "10", "targetFPIR": "30", "flag1": "value1", "flag2": "value2" },
      "gallery": { "referenceIds": [
        { "referenceId": "2abe7b7d-b58a-4466-a006-c79297281123" },
        { "referenceId": "7acce7b7d-b58a-4466-a006-c79297281456" } ] }
    }"#;

    #[test]
    fn the_spec_examples_parse() {
        let insert = parse(INSERT.as_bytes()).unwrap();
        assert_eq!(insert.operation, Operation::Insert);
        assert_eq!(
            insert.reference_id.as_deref(),
            Some("01234567-89AB-CDEF-0123-456789ABCDEF")
        );
        let identify = parse(IDENTIFY.as_bytes()).unwrap();
        assert_eq!(identify.max_results, Some(10));
        assert!((identify.target_fpir.unwrap() - 1e-3).abs() < 1e-12);
        assert_eq!(identify.reference_url, None);
        assert_eq!(identify.gallery.as_ref().map(Vec::len), Some(2));
    }

    fn reason_of(message: &str) -> (FailureReason, String) {
        let r = parse(message.as_bytes()).unwrap_err();
        (r.failure.reason, r.request_id)
    }

    #[test]
    fn each_defect_gets_the_spec_failure_reason() {
        let without = |field: &str| {
            let mut v: Value = serde_json::from_str(INSERT).unwrap();
            v.as_object_mut().unwrap().remove(field);
            v.to_string()
        };
        let with = |field: &str, value: Value| {
            let mut v: Value = serde_json::from_str(INSERT).unwrap();
            v[field] = value;
            v.to_string()
        };
        assert_eq!(reason_of("{").0, FailureReason::InvalidRequestStructure);
        assert_eq!(reason_of("[1]").0, FailureReason::InvalidRequestStructure);
        assert_eq!(
            reason_of(&with("id", json!("mosip.id.insert"))).0,
            FailureReason::InvalidId
        );
        assert_eq!(
            reason_of(&with("version", json!("2.0"))).0,
            FailureReason::InvalidVersion
        );
        assert_eq!(
            reason_of(&without("requestId")).0,
            FailureReason::MissingRequestId
        );
        assert_eq!(
            reason_of(&without("requesttime")).0,
            FailureReason::MissingRequesttime
        );
        assert_eq!(
            reason_of(&with("requesttime", json!("29/03/2020"))).0,
            FailureReason::InvalidRequesttime
        );
        assert_eq!(
            reason_of(&without("referenceId")).0,
            FailureReason::MissingReferenceId
        );
        assert_eq!(
            reason_of(&with("referenceURL", json!(""))).0,
            FailureReason::MissingReferenceUrl
        );
        // The request id of a refused message is echoed when it is usable.
        assert_eq!(
            reason_of(&without("referenceId")).1,
            "91234567-89AB-CDEF-0123-456789ABCDEF"
        );
        let mut identify: Value = serde_json::from_str(IDENTIFY).unwrap();
        identify["flags"]["maxResults"] = json!("many");
        assert_eq!(
            reason_of(&identify.to_string()).0,
            FailureReason::InvalidRequestStructure
        );
        identify["flags"]["maxResults"] = json!(5);
        identify["referenceId"] = Value::Null;
        assert_eq!(
            reason_of(&identify.to_string()).0,
            FailureReason::MissingReferenceId
        );
    }

    #[test]
    fn responses_have_the_spec_shape() {
        let at = time::macros::datetime!(2020-03-29 07:01:24.692 UTC);
        assert_eq!(
            response("mosip.abis.insert", "r1", &Outcome::Done, at),
            json!({"id": "mosip.abis.insert", "requestId": "r1",
                   "responsetime": "2020-03-29T07:01:24.692Z", "returnValue": "1"})
        );
        assert_eq!(
            response(
                "mosip.abis.insert",
                "r1",
                &Outcome::Failed(Failure::new(FailureReason::UnableToFetchBiometrics, "x")),
                at
            ),
            json!({"id": "mosip.abis.insert", "requestId": "r1",
                   "responsetime": "2020-03-29T07:01:24.692Z", "returnValue": "2",
                   "failureReason": "7"})
        );
        assert_eq!(
            response("mosip.abis.pendingJobs", "r2", &Outcome::JobsCount(10), at)["jobscount"],
            json!("10")
        );
        let found = response(
            "mosip.abis.identify",
            "r3",
            &Outcome::Candidates(vec![CandidateOut {
                reference_id: "a".into(),
                score: 12.345,
                fmr: 4.5e-13,
                fingers: 10,
            }]),
            at,
        );
        assert_eq!(found["candidateList"]["count"], json!("1"));
        assert_eq!(
            found["candidateList"]["candidates"][0]["referenceId"],
            json!("a")
        );
        assert_eq!(
            found["candidateList"]["candidates"][0]["modalities"][0]["biometricType"],
            json!("FIR")
        );
        assert_eq!(
            found["candidateList"]["candidates"][0]["analytics"]["internalScore"],
            json!("12.35")
        );
    }
}
