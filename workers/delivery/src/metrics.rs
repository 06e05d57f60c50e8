//! Delivery metrics (`cardpipe_delivery_*`), registered in the process registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use cardpipe_common::telemetry::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldLabel {
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SmsLabel {
    kind: String,
    outcome: String,
}

/// The delivery counters (cheap to clone).
#[derive(Clone, Default)]
pub struct DeliveryMetrics {
    packed: Counter,
    boxes_dispatched: Counter,
    shipped: Counter,
    received: Counter,
    discrepancies: Family<KindLabel, Counter>,
    transfers: Counter,
    handovers: Family<OutcomeLabel, Counter>,
    collected: Counter,
    sms: Family<SmsLabel, Counter>,
    sms_held: Family<HeldLabel, Counter>,
    sms_scheduled: Family<KindLabel, Counter>,
    voided: Counter,
    near_voiding: prometheus_client::metrics::gauge::Gauge,
    discrepancies_open: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for DeliveryMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryMetrics")
    }
}

impl DeliveryMetrics {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the counters (once per registry).
    pub fn register(&self, metrics: &Metrics) {
        let me = self.clone();
        metrics.register(move |r| {
            r.register("delivery_cards_packed", "Cards packed into boxes", me.packed);
            r.register("boxes_dispatched", "Boxes dispatched to pickup offices", me.boxes_dispatched);
            r.register("delivery_cards_shipped", "Cards dispatched to pickup offices", me.shipped);
            r.register("delivery_cards_received", "Cards acknowledged by their office", me.received);
            r.register(
                "delivery_discrepancies",
                "Missing or extra cards reported on box receipt, by kind",
                me.discrepancies,
            );
            r.register("delivery_transfers", "Cards transferred to another office after dispatch", me.transfers);
            r.register("delivery_handovers", "Handover attempts, by outcome (collected, refused, fingerprint_mismatch)", me.handovers);
            r.register("cards_collected", "Cards handed over at an office", me.collected);
            r.register(
                "sms_sent",
                "SMS sent to citizens, by kind and delivery result (delivered, failed, permanent_failure)",
                me.sms,
            );
            r.register(
                "delivery_sms_held",
                "SMS not sent, by kind and reason (deferred: quiet hours; cancelled: card collected or voided; unconfigured: no gateway)",
                me.sms_held,
            );
            r.register("delivery_sms_scheduled", "SMS created (one per application and kind), by kind", me.sms_scheduled);
            r.register("cards_voided", "Uncollected cards voided after the collection period", me.voided);
            r.register(
                "delivery_discrepancies_open",
                "Office discrepancies (missing or extra cards) not resolved yet (set by the delivery scheduler)",
                me.discrepancies_open,
            );
            r.register("cards_near_voiding", "Uncollected cards within 30 days of being voided (set by the delivery scheduler)", me.near_voiding);
        });
    }

    /// Open office discrepancies (store-wide).
    pub fn set_discrepancies_open(&self, n: i64) {
        self.discrepancies_open.set(n);
    }

    /// The open-discrepancies gauge as last set.
    pub fn discrepancies_open(&self) -> i64 {
        self.discrepancies_open.get()
    }

    /// `n` cards packed.
    pub fn packed(&self, n: u64) {
        self.packed.inc_by(n);
    }
    /// A dispatch of `boxes` boxes holding `cards` cards.
    pub fn dispatched(&self, boxes: u64, cards: u64) {
        self.boxes_dispatched.inc_by(boxes);
        self.shipped.inc_by(cards);
    }
    /// `n` cards acknowledged by an office.
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }
    /// A discrepancy of `kind` (missing, extra).
    pub fn discrepancy(&self, kind: &str) {
        self.discrepancies
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
    /// A transfer.
    pub fn transfer(&self) {
        self.transfers.inc();
    }
    /// A handover attempt (`collected` also counts a collected card).
    pub fn handover(&self, outcome: &str) {
        if outcome == "collected" {
            self.collected.inc();
        }
        self.handovers
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
    /// An SMS created.
    pub fn sms_scheduled(&self, kind: &str) {
        self.sms_scheduled
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
    /// An SMS held back (deferred, cancelled, unconfigured).
    pub fn sms_held(&self, kind: &str, reason: &str) {
        self.sms_held
            .get_or_create(&HeldLabel {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }
    /// Cards within 30 days of voiding.
    pub fn set_near_voiding(&self, n: i64) {
        self.near_voiding.set(n);
    }
    /// An SMS send result (kind: ready_for_pickup, reminder, final_notice, voided;
    /// outcome: delivered, failed (retried), permanent_failure).
    pub fn sms(&self, kind: &str, outcome: &str) {
        self.sms
            .get_or_create(&SmsLabel {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }
    /// SMS of `kind` with `outcome` so far.
    pub fn sms_count(&self, kind: &str, outcome: &str) -> u64 {
        self.sms
            .get_or_create(&SmsLabel {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .get()
    }
    /// Discrepancies of `kind` so far.
    pub fn discrepancy_count(&self, kind: &str) -> u64 {
        self.discrepancies
            .get_or_create(&KindLabel { kind: kind.into() })
            .get()
    }
    /// `n` cards voided.
    pub fn voided(&self, n: u64) {
        self.voided.inc_by(n);
    }
}
