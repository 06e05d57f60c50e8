//! Intake record validation (one NDJSON line from the registry, untrusted): JSON parsing,
//! `validate::check_fields`, then `validate::check_artifacts` on the inline photo and
//! templates (the structural JPEG check, the chip-capacity check and the ISO/IEC 19794-2
//! placement rule), as `intake::validate_line` does minus the object store.
//!
//! Any byte string: no panic. A record is produced exactly when no field is in error, the
//! biometrics exactly when no artifact is, and an accepted record and its biometrics
//! survive the JSON round trip they take through the sealed store unchanged.
#![no_main]

use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics};
use cardpipe_intake::validate::{
    ArtifactRef, FingerprintSlot, PrintRef, check_artifacts, check_fields,
};
use cardpipe_registry::config::RegistryConfig;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;
use time::macros::date;

fn inline(r: ArtifactRef) -> Option<Vec<u8>> {
    match r {
        ArtifactRef::Inline(b) => Some(b),
        // An object-store key: intake would fetch it; nothing to validate here.
        ArtifactRef::Key(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    static CFG: OnceLock<RegistryConfig> = OnceLock::new();
    let cfg = CFG.get_or_init(RegistryConfig::default);
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut checked = check_fields(&value, cfg, date!(2025 - 11 - 22));
    assert_eq!(
        checked.record.is_some(),
        checked.errors.is_empty(),
        "a record exactly when every field is valid"
    );
    if let Some(record) = &checked.record {
        let json = serde_json::to_vec(record).expect("records serialise");
        let back: ApplicantRecord = serde_json::from_slice(&json).expect("records deserialise");
        assert!(back == *record, "record JSON round trip");
    }
    let photo = checked.photo.take().and_then(inline);
    let prints: Option<Vec<FingerprintSlot>> = checked.prints.take().map(|list| {
        list.into_iter()
            .zip(1u8..)
            .map(|(p, pos)| match p {
                PrintRef::Missing(reason) => (pos, None, Some(reason)),
                PrintRef::Template(r) => (pos, inline(r), None),
            })
            .collect()
    });
    let had_both = photo.is_some() && prints.is_some();
    let (biometrics, errors) = check_artifacts(photo, prints, cfg);
    assert_eq!(biometrics.is_some(), had_both && errors.is_empty());
    if let Some(b) = biometrics {
        let json = serde_json::to_vec(&b).expect("biometrics serialise");
        let back: Biometrics = serde_json::from_slice(&json).expect("biometrics deserialise");
        assert!(back == b, "biometrics JSON round trip");
    }
});
