//! Document Signer rotation.
//!
//! ICAO Doc 9303 part 12 limits the private-key usage period of a Document Signer to about
//! three months, and common practice also caps the documents per key (100,000), which
//! limits the damage of a compromised DS key. [`decide`] is a pure function over the DS
//! certificate's start, the number of documents it signed and the time; [`rotate`] mints a
//! new DS key and certificate and moves the old one to the retired list (its certificate
//! stays valid for the cards it signed). Making the rotation happen once across replicas is
//! the caller's job (a database lock around decide → rotate → persist).

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::ca::{CaHierarchy, label_stamp, mint_document_signer};
use crate::keystore::CaKeyStore;
use crate::{KeysError, Result};

/// ICAO practice ceiling on the DS key usage period, in days (three months).
pub const ICAO_MAX_USAGE_DAYS: u32 = 92;
/// Practice ceiling on documents per DS key.
pub const ICAO_MAX_DOCUMENTS: u64 = 100_000;

/// When to roll the Document Signer (a section of pipeline.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RotationPolicy {
    /// Rotate once this many documents were signed with the current key.
    pub max_documents: u64,
    /// Rotate once the current key is this many days old.
    pub max_age_days: u32,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_documents: ICAO_MAX_DOCUMENTS,
            max_age_days: 90,
        }
    }
}

impl RotationPolicy {
    /// Rejects settings looser than ICAO practice, or zero.
    pub fn validate(&self) -> Result<()> {
        if self.max_documents == 0 || self.max_documents > ICAO_MAX_DOCUMENTS {
            return Err(KeysError::Invalid(format!(
                "max_documents must be 1..={ICAO_MAX_DOCUMENTS}"
            )));
        }
        if self.max_age_days == 0 || self.max_age_days > ICAO_MAX_USAGE_DAYS {
            return Err(KeysError::Invalid(format!(
                "max_age_days must be 1..={ICAO_MAX_USAGE_DAYS}"
            )));
        }
        Ok(())
    }
}

/// Why a rotation is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum RotationReason {
    /// The document budget is used up.
    DocumentLimit {
        /// Documents signed.
        signed: u64,
    },
    /// The key is too old.
    AgeLimit {
        /// Age in whole days.
        age_days: i64,
    },
}

/// Outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationDecision {
    /// Keep signing with the current DS.
    Keep,
    /// Rotate now.
    Rotate(RotationReason),
}

/// Pure rotation decision. `ds_started` is the current DS certificate's notBefore.
pub fn decide(
    policy: &RotationPolicy,
    ds_started: OffsetDateTime,
    documents_signed: u64,
    now: OffsetDateTime,
) -> RotationDecision {
    if documents_signed >= policy.max_documents {
        return RotationDecision::Rotate(RotationReason::DocumentLimit {
            signed: documents_signed,
        });
    }
    let age = now - ds_started;
    if age >= Duration::days(i64::from(policy.max_age_days)) {
        return RotationDecision::Rotate(RotationReason::AgeLimit {
            age_days: age.whole_days(),
        });
    }
    RotationDecision::Keep
}

/// Convenience: [`decide`] for the hierarchy's current Document Signer.
pub fn decide_for(
    policy: &RotationPolicy,
    hierarchy: &CaHierarchy,
    documents_signed: u64,
    now: OffsetDateTime,
) -> Result<RotationDecision> {
    Ok(decide(
        policy,
        hierarchy.document_signer.not_before()?,
        documents_signed,
        now,
    ))
}

/// Generates a new DS key in `store`, certifies it under the root, and returns the updated
/// hierarchy (old DS moved to `retired_document_signers`). The caller persists the result
/// and resets the current-DS usage counter.
pub fn rotate(
    store: &dyn CaKeyStore,
    hierarchy: &CaHierarchy,
    now: OffsetDateTime,
) -> Result<CaHierarchy> {
    // A random suffix: a rotation in the same second as `init` (or as an abandoned
    // rotation attempt) must not collide with that key's label.
    let mut nonce = [0u8; 3];
    openssl::rand::rand_bytes(&mut nonce)?;
    let label = format!(
        "{}-ds-{}-{}",
        hierarchy.config.label_prefix,
        label_stamp(now),
        hex::encode(nonce)
    );
    store.generate(&label)?;
    let ds = mint_document_signer(store, &hierarchy.config, &hierarchy.root, &label, now)?;
    let mut next = hierarchy.clone();
    let old = std::mem::replace(&mut next.document_signer, ds);
    next.retired_document_signers.push(old);
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, init};
    use crate::keystore::test_support::file_store;
    use crate::pkix::verify_certificate_signature;

    #[test]
    fn decisions_follow_the_policy() {
        let p = RotationPolicy {
            max_documents: 1000,
            max_age_days: 30,
        };
        p.validate().unwrap();
        let t0 = time::macros::datetime!(2025-01-01 00:00 UTC);
        assert_eq!(
            decide(&p, t0, 999, t0 + Duration::days(29)),
            RotationDecision::Keep
        );
        assert_eq!(
            decide(&p, t0, 1000, t0),
            RotationDecision::Rotate(RotationReason::DocumentLimit { signed: 1000 })
        );
        assert_eq!(
            decide(&p, t0, 5, t0 + Duration::days(30)),
            RotationDecision::Rotate(RotationReason::AgeLimit { age_days: 30 })
        );
        assert!(
            RotationPolicy {
                max_documents: 200_000,
                max_age_days: 30
            }
            .validate()
            .is_err()
        );
        assert!(
            RotationPolicy {
                max_documents: 10,
                max_age_days: 365
            }
            .validate()
            .is_err()
        );
        RotationPolicy::default().validate().unwrap();
    }

    #[test]
    fn rotate_mints_a_new_signer_and_retires_the_old() {
        let (_dir, store) = file_store();
        let t0 = time::macros::datetime!(2025-01-01 00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), t0).unwrap();
        let t1 = t0 + Duration::days(91);
        assert!(matches!(
            decide_for(&RotationPolicy::default(), &h, 10, t1).unwrap(),
            RotationDecision::Rotate(RotationReason::AgeLimit { .. })
        ));
        let h2 = rotate(store.as_ref(), &h, t1).unwrap();
        assert_ne!(h2.document_signer.key_label, h.document_signer.key_label);
        assert_eq!(h2.retired_document_signers, vec![h.document_signer.clone()]);
        assert_eq!(h2.document_signer.not_before().unwrap(), t1);
        verify_certificate_signature(&h2.document_signer.certificate, &h.root.certificate).unwrap();
        assert_eq!(
            decide_for(&RotationPolicy::default(), &h2, 0, t1).unwrap(),
            RotationDecision::Keep
        );
    }
}
