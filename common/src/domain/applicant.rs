//! The applicant's personal record as the registry sent it (after intake's
//! validation), and their biometrics.
//!
//! These types carry personal data: their `Debug` output is redacted, they
//! never go into messages, and they are stored sealed (see `crate::records`).

use serde::{Deserialize, Serialize};
use time::Date;

/// The four applicant groups of the programme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplicantGroup {
    /// (1) First card.
    FirstCard,
    /// (2) Card lost, or a data item changed.
    LostOrChanged,
    /// (3) Card issued in Solar Hijri 1380–1389: must replace.
    Replace13801389,
    /// (4) Card issued 1390–1396: still valid, may apply.
    Voluntary13901396,
}

/// Gender as recorded on the birth certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gender {
    /// Male.
    Male,
    /// Female.
    Female,
}

/// Fees paid, in rial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fees {
    /// Issuance fee paid online before enrolment.
    pub issuance_rial: i64,
    /// Enrolment-completion fee charged at the office.
    pub office_fee_rial: i64,
    /// Delivery fee charged at the office.
    pub delivery_fee_rial: i64,
}

/// The personal record of one application.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicantRecord {
    /// The registry's application id.
    pub registry_id: String,
    /// Enrolment date.
    pub applied_on: Date,
    /// Follow-up tracking code given to the citizen.
    pub tracking_code: String,
    /// Bank payment tracking code of the issuance fee.
    pub payment_tracking_code: String,
    /// National code, 10 ASCII digits (normalised by intake).
    pub national_code: String,
    /// Given name (Persian, UTF-8).
    pub first_name: String,
    /// Surname (Persian, UTF-8).
    pub last_name: String,
    /// Father's name (Persian, UTF-8).
    pub father_name: String,
    /// Birth date (Gregorian).
    pub birth_date: Date,
    /// Birth certificate number.
    pub birth_certificate_number: String,
    /// Gender.
    pub gender: Gender,
    /// Postal code, 10 digits.
    pub postal_code: String,
    /// Postal address.
    pub address: String,
    /// Mobile number (for SMS).
    pub mobile: String,
    /// Landline number.
    pub landline: String,
    /// Applicant group.
    pub applicant_group: ApplicantGroup,
    /// Issue date of the previous card (groups 3 and 4).
    pub previous_card_issued_on: Option<Date>,
    /// Chosen pickup office code.
    pub pickup_office: String,
    /// Fees paid.
    pub fees: Fees,
}

impl std::fmt::Debug for ApplicantRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplicantRecord")
            .field("registry_id", &self.registry_id)
            .field("applied_on", &self.applied_on)
            .field("applicant_group", &self.applicant_group)
            .field("pickup_office", &self.pickup_office)
            .finish_non_exhaustive()
    }
}

/// One finger position of a ten-print: a template, or why there is none.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintEntry {
    /// Finger position 1–10 per ISO/IEC 19794-2.
    pub position: u8,
    /// ISO/IEC 19794-2:2005 minutiae record, when captured.
    pub template: Option<Vec<u8>>,
    /// `unavailable` or `amputated` when no template was captured.
    pub missing_reason: Option<String>,
}

impl std::fmt::Debug for FingerprintEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FingerprintEntry")
            .field("position", &self.position)
            .field(
                "template",
                &self
                    .template
                    .as_ref()
                    .map(|t| format!("<{} bytes>", t.len())),
            )
            .field("missing_reason", &self.missing_reason)
            .finish()
    }
}

/// Photo and fingerprints of one application.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Biometrics {
    /// Face photo (JPEG).
    pub photo_jpeg: Vec<u8>,
    /// Ten finger positions.
    pub fingerprints: Vec<FingerprintEntry>,
}

impl std::fmt::Debug for Biometrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Biometrics")
            .field("photo_jpeg", &format!("<{} bytes>", self.photo_jpeg.len()))
            .field("fingerprints", &self.fingerprints)
            .finish()
    }
}
