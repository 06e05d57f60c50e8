//! The fee model: one set of rules that intake, the handover and every citizen message use.
//!
//! From the programme's published guidance (all amounts in rial; 10 rial = 1 toman):
//!
//! | fee | amount | paid | in the batch |
//! |---|---|---|---|
//! | issuance | 200,000 | online, before enrolment | `fees.issuance_rial` |
//! | enrolment completion | at most 90,000 | at the office, at enrolment | `fees.office_fee_rial` |
//! | delivery | 20,000 | at the office, **when the card is handed over** — or prepaid at enrolment | `fees.delivery_fee_rial` = what was prepaid (0 or 20,000) |
//!
//! Never more than 310,000 in all. A card left uncollected six months is voided; getting a card
//! after that costs double: the **issuance** fee of the new application is 400,000 (and the cap
//! rises by the same 200,000). Nothing else doubles.
//!
//! So the delivery fee is charged once: the handover collects 20,000 minus what the batch says
//! was prepaid. Intake rejects an issuance fee below 200,000 (it must be paid before
//! enrolment), flags one below 400,000 on a re-application after a voided card
//! (`double_fee_unpaid`), and flags every amount above its limit (`overcharge`: charging more is
//! an offence).

use super::applicant::Fees;

/// Issuance fee paid online before enrolment (20,000 toman).
pub const ISSUANCE_RIAL: i64 = 200_000;
/// Most the office may charge to complete an enrolment (9,000 toman).
pub const MAX_OFFICE_RIAL: i64 = 90_000;
/// The delivery fee (2,000 toman), charged once: prepaid or at handover.
pub const DELIVERY_RIAL: i64 = 20_000;
/// Most anyone may pay in all (31,000 toman), without a voided earlier card.
pub const MAX_TOTAL_RIAL: i64 = 310_000;

/// The issuance fee due: doubled for a re-application after a card was voided uncollected.
pub fn issuance_due(after_voided_card: bool) -> i64 {
    if after_voided_card {
        2 * ISSUANCE_RIAL
    } else {
        ISSUANCE_RIAL
    }
}

/// The most an applicant may be charged in all.
pub fn max_total(after_voided_card: bool) -> i64 {
    MAX_TOTAL_RIAL + issuance_due(after_voided_card) - ISSUANCE_RIAL
}

/// What the office collects at handover: the delivery fee minus what was prepaid.
pub fn due_at_handover(fees: &Fees) -> i64 {
    DELIVERY_RIAL - fees.delivery_fee_rial.clamp(0, DELIVERY_RIAL)
}

/// One breach of the fee rules intake records with an accepted application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeFlag {
    /// `overcharge` or `double_fee_unpaid`.
    pub flag: &'static str,
    /// The field (`fees`, `fees.issuance_rial`, ...).
    pub field: &'static str,
    /// Why, with the limit (never the applicant's data).
    pub reason: String,
}

/// Every flag the fees of one application raise (an issuance below
/// [`ISSUANCE_RIAL`] is a rejection, checked by intake, not a flag).
pub fn flags(fees: &Fees, after_voided_card: bool) -> Vec<FeeFlag> {
    let mut out = Vec::new();
    let mut flag = |flag, field, reason: String| {
        out.push(FeeFlag {
            flag,
            field,
            reason,
        })
    };
    let issuance = issuance_due(after_voided_card);
    if after_voided_card && fees.issuance_rial < issuance {
        flag(
            "double_fee_unpaid",
            "fees.issuance_rial",
            format!(
                "an earlier card of this national code was voided uncollected: the issuance fee is {issuance} rial (double)"
            ),
        );
    }
    if fees.issuance_rial > issuance {
        flag(
            "overcharge",
            "fees.issuance_rial",
            format!("issuance fee above {issuance} rial"),
        );
    }
    if fees.office_fee_rial > MAX_OFFICE_RIAL {
        flag(
            "overcharge",
            "fees.office_fee_rial",
            format!("office fee above the {MAX_OFFICE_RIAL} rial limit"),
        );
    }
    if fees.delivery_fee_rial > DELIVERY_RIAL {
        flag(
            "overcharge",
            "fees.delivery_fee_rial",
            format!("delivery fee above the {DELIVERY_RIAL} rial limit"),
        );
    }
    // Saturating: amounts come from the registry's file and may be as large as i64 allows.
    let total = fees
        .issuance_rial
        .saturating_add(fees.office_fee_rial)
        .saturating_add(fees.delivery_fee_rial);
    let cap = max_total(after_voided_card);
    if total > cap {
        flag(
            "overcharge",
            "fees",
            format!("total charged above the {cap} rial limit"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fees(issuance: i64, office: i64, delivery: i64) -> Fees {
        Fees {
            issuance_rial: issuance,
            office_fee_rial: office,
            delivery_fee_rial: delivery,
        }
    }

    #[test]
    fn the_delivery_fee_is_charged_once() {
        assert_eq!(due_at_handover(&fees(200_000, 90_000, 0)), 20_000);
        assert_eq!(due_at_handover(&fees(200_000, 90_000, 20_000)), 0);
        assert_eq!(due_at_handover(&fees(200_000, 90_000, 5_000)), 15_000);
        assert_eq!(due_at_handover(&fees(200_000, 90_000, 99_000)), 0);
    }

    #[test]
    fn the_published_maximum_is_clean_and_one_rial_more_is_flagged() {
        assert!(flags(&fees(200_000, 90_000, 20_000), false).is_empty());
        let over = flags(&fees(200_000, 90_001, 20_000), false);
        assert_eq!(
            over.iter().map(|f| (f.flag, f.field)).collect::<Vec<_>>(),
            [
                ("overcharge", "fees.office_fee_rial"),
                ("overcharge", "fees")
            ]
        );
    }

    #[test]
    fn after_a_voided_card_the_issuance_fee_doubles_and_nothing_else() {
        assert_eq!(issuance_due(true), 400_000);
        assert_eq!(max_total(true), 510_000);
        assert!(flags(&fees(400_000, 90_000, 20_000), true).is_empty());
        let normal = flags(&fees(200_000, 90_000, 0), true);
        assert_eq!(normal.len(), 1);
        assert_eq!(normal[0].flag, "double_fee_unpaid");
        // Double paid without a voided card is an overcharge.
        let double = flags(&fees(400_000, 0, 0), false);
        assert_eq!(double[0].flag, "overcharge");
    }
}
