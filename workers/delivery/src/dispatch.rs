//! The daily dispatch: at the cut-off (Tehran time) every box packed so far is sealed, its
//! manifests are written to the object store, and the shipment is recorded with the
//! carrier's reference; every card in it moves `packed` → `shipped`.
//!
//! Exactly once per day across replicas: the background loop runs it only while holding the
//! `delivery-scheduler` lease, and the shipment transaction records the run
//! (`scheduled_runs` row `delivery-dispatch/<day>`), every card move is a compare-and-set.
//! Manifests are written under fresh keys before the transaction, so an attempt that does
//! not commit leaves unreferenced objects, never a wrong manifest.

use std::collections::BTreeMap;

use bytes::Bytes;
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, Transition};
use serde_json::json;
use sqlx::Row;
use time::{Date, OffsetDateTime};

use crate::manifest::{self, BoxManifest, CardLine, ShipmentManifest};
use crate::{Delivery, offices};

/// `scheduled_runs` name of the daily dispatch.
pub const RUN_NAME: &str = "delivery-dispatch";

/// What a dispatch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// Shipment id (None: nothing to ship; the day's run is recorded all the same).
    pub shipment_id: Option<String>,
    /// Carrier reference.
    pub carrier_reference: Option<String>,
    /// Boxes shipped.
    pub boxes: usize,
    /// Cards shipped.
    pub cards: usize,
}

/// Whether today's dispatch is due at `now` and not yet done; returns the day.
pub async fn due(
    delivery: &Delivery,
    services: &Services,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Date>> {
    crate::daily_run_due(services, RUN_NAME, delivery.dispatch_cutoff(), now).await
}

/// Lease held while a dispatch runs, by the daily one and by [`dispatch_now`] alike: two
/// dispatches never seal and ship the same boxes at once.
pub const RUN_LEASE: &str = "delivery-dispatch-run";

/// Runs the dispatch of `day` now (idempotent: a second call for the same day does nothing).
pub async fn dispatch(
    delivery: &Delivery,
    services: &Services,
    day: Date,
    holder: &str,
) -> anyhow::Result<Option<Dispatched>> {
    let actor = ("system:delivery-dispatch", "system");
    exclusively(services, holder, async {
        ship(
            delivery,
            services,
            day,
            &day.to_string(),
            holder,
            actor,
            "delivery.dispatch",
        )
        .await
    })
    .await
}

/// A supervisor's extra dispatch, at once: every packed card leaves in a shipment of its own
/// (the day's run at the cut-off still ships what is packed after). `actor` is the
/// supervisor's login and role, audited as `delivery.dispatch_now`.
pub async fn dispatch_now(
    delivery: &Delivery,
    services: &Services,
    actor: (&str, &str),
) -> anyhow::Result<Dispatched> {
    let now = services.clock.now();
    let day = crate::tehran_date(now);
    let holder = format!("dispatch-now-{}", uuid::Uuid::new_v4().simple());
    // Its own run period, so it never takes the place of the day's run.
    let period = format!("{day}/now-{}", uuid::Uuid::now_v7().simple());
    let shipped = exclusively(services, &holder, async {
        ship(
            delivery,
            services,
            day,
            &period,
            &holder,
            actor,
            "delivery.dispatch_now",
        )
        .await
    })
    .await?;
    Ok(shipped.unwrap_or(Dispatched {
        shipment_id: None,
        carrier_reference: None,
        boxes: 0,
        cards: 0,
    }))
}

/// Runs `work` holding [`RUN_LEASE`] (waiting up to a minute for another dispatch to end).
async fn exclusively<T>(
    services: &Services,
    holder: &str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !services
        .store
        .try_lease(
            RUN_LEASE,
            holder,
            services.clock.now(),
            time::Duration::minutes(10),
        )
        .await?
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "another dispatch has been running for over a minute; try again later"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let result = work.await;
    let _ = services.store.release_lease(RUN_LEASE, holder).await;
    result
}

async fn ship(
    delivery: &Delivery,
    services: &Services,
    day: Date,
    period: &str,
    holder: &str,
    (actor, role): (&str, &str),
    action: &str,
) -> anyhow::Result<Option<Dispatched>> {
    delivery.ensure_offices(services).await?;
    let now = services.clock.now();
    // 1. Seal every open box: no card joins a box once its manifest is being written.
    sqlx::query("UPDATE delivery_boxes SET state = 'sealed', sealed_at = $1 WHERE state = 'open'")
        .bind(to_rfc3339(now))
        .execute(services.store.pool())
        .await?;
    // 2. What leaves today: sealed boxes not yet shipped, with their packed cards.
    let rows = sqlx::query(
        "SELECT b.id AS box_id, b.office_code, c.application_id
         FROM delivery_boxes b JOIN delivery_cards c ON c.box_id = b.id
         JOIN applications a ON a.id = c.application_id
         WHERE b.state = 'sealed' AND a.state = 'packed'
         ORDER BY b.office_code, b.id, c.application_id",
    )
    .fetch_all(services.store.pool())
    .await?;
    let mut by_box: BTreeMap<String, (String, Vec<ApplicationId>)> = BTreeMap::new();
    for row in &rows {
        let box_id: String = row.try_get("box_id")?;
        let office: String = row.try_get("office_code")?;
        let app: String = row.try_get("application_id")?;
        by_box
            .entry(box_id)
            .or_insert_with(|| (office, Vec::new()))
            .1
            .push(ApplicationId(app));
    }
    let shipment_id = format!(
        "SHP-{}-{}",
        day,
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let seq = sqlx::query("SELECT COUNT(*) AS n FROM delivery_shipments")
        .fetch_one(services.store.pool())
        .await?
        .try_get::<i64, _>("n")?;
    let carrier_reference = format!(
        "{}{}-{:04}",
        delivery.cfg.carrier_reference_prefix,
        day.to_string().replace('-', ""),
        seq + 1
    );
    let registry = offices::all(&services.store).await?;
    let mut boxes = Vec::with_capacity(by_box.len());
    for (box_id, (office_code, apps)) in &by_box {
        let office = registry.get(office_code).cloned().ok_or_else(|| {
            anyhow::anyhow!("office {office_code} of box {box_id} is not in the register")
        })?;
        let mut cards = Vec::with_capacity(apps.len());
        for id in apps {
            let record = records::load_record(services, id).await?;
            cards.push(CardLine {
                application_id: id.to_string(),
                registry_id: record.registry_id.clone(),
                tracking_code: record.tracking_code.clone(),
                holder: format!("{} {}", record.first_name, record.last_name),
                national_code_masked: manifest::mask_national_code(&record.national_code),
            });
        }
        boxes.push(BoxManifest {
            box_id: box_id.clone(),
            office,
            cards,
        });
    }
    let shipment = ShipmentManifest {
        shipment_id: shipment_id.clone(),
        period: day.to_string(),
        carrier: delivery.cfg.carrier.clone(),
        carrier_reference: carrier_reference.clone(),
        dispatched_at: to_rfc3339(now),
        boxes,
    };
    // 3. Manifests, under fresh keys.
    let base = format!("shipments/{day}/{shipment_id}");
    let mut box_keys = Vec::new();
    for b in &shipment.boxes {
        let single = ShipmentManifest {
            boxes: vec![b.clone()],
            ..shipment.clone()
        };
        let prefix = format!("{base}/boxes/{}", b.box_id);
        let keys = [
            format!("{prefix}.json"),
            format!("{prefix}.csv"),
            format!("{prefix}.html"),
        ];
        put(services, &keys[0], serde_json::to_vec_pretty(&single)?).await?;
        put(
            services,
            &keys[1],
            manifest::box_csv(&shipment, b).into_bytes(),
        )
        .await?;
        put(
            services,
            &keys[2],
            manifest::box_html(&shipment, b).into_bytes(),
        )
        .await?;
        box_keys.push(keys);
    }
    let shipment_keys = [
        format!("{base}/shipment.json"),
        format!("{base}/shipment.csv"),
        format!("{base}/shipment.html"),
    ];
    if !shipment.boxes.is_empty() {
        put(
            services,
            &shipment_keys[0],
            serde_json::to_vec_pretty(&shipment)?,
        )
        .await?;
        put(
            services,
            &shipment_keys[1],
            manifest::shipment_csv(&shipment).into_bytes(),
        )
        .await?;
        put(
            services,
            &shipment_keys[2],
            manifest::shipment_html(&shipment).into_bytes(),
        )
        .await?;
    }
    // 4. One transaction: the day's run, the shipment, the boxes, every card.
    let mut tx = services.store.begin().await?;
    if !Store::record_run(&mut tx, RUN_NAME, period, holder, now).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    if shipment.boxes.is_empty() {
        tx.commit().await?;
        return Ok(Some(Dispatched {
            shipment_id: None,
            carrier_reference: None,
            boxes: 0,
            cards: 0,
        }));
    }
    let now_text = to_rfc3339(now);
    // The shipment row first: boxes reference it.
    sqlx::query(
        "INSERT INTO delivery_shipments (id, period, carrier, carrier_reference, boxes, cards,
             manifest_json_key, manifest_csv_key, manifest_html_key, dispatched_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&shipment_id)
    .bind(period)
    .bind(&shipment.carrier)
    .bind(&carrier_reference)
    .bind(shipment.boxes.len() as i64)
    .bind(0i64)
    .bind(&shipment_keys[0])
    .bind(&shipment_keys[1])
    .bind(&shipment_keys[2])
    .bind(&now_text)
    .execute(&mut *tx)
    .await?;
    let mut cards = 0usize;
    for (b, keys) in shipment.boxes.iter().zip(&box_keys) {
        for card in &b.cards {
            let id = ApplicationId(card.application_id.clone());
            let moved = Store::transition(
                &mut tx,
                &Transition {
                    id: &id,
                    from: ApplicationState::Packed,
                    to: ApplicationState::Shipped,
                    stage: "dispatch",
                    attempt: 0,
                    actor,
                    reason: Some(&format!("box {} carrier {carrier_reference}", b.box_id)),
                    at: now,
                },
            )
            .await?;
            if moved {
                cards += 1;
                sqlx::query("UPDATE delivery_cards SET shipped_at = $1 WHERE application_id = $2")
                    .bind(&now_text)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(
            "UPDATE delivery_boxes SET state = 'shipped', shipment_id = $1, shipped_at = $2,
                 manifest_json_key = $3, manifest_csv_key = $4, manifest_html_key = $5
             WHERE id = $6 AND state = 'sealed'",
        )
        .bind(&shipment_id)
        .bind(&now_text)
        .bind(&keys[0])
        .bind(&keys[1])
        .bind(&keys[2])
        .bind(&b.box_id)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE delivery_shipments SET cards = $1 WHERE id = $2")
        .bind(cards as i64)
        .bind(&shipment_id)
        .execute(&mut *tx)
        .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor,
            role,
            action,
            subject: &shipment_id,
            details: json!({
                "carrier_reference": carrier_reference,
                "boxes": shipment.boxes.len(),
                "cards": cards,
                "manifest": shipment_keys[2],
            }),
        },
    )
    .await?;
    tx.commit().await?;
    delivery
        .metrics
        .dispatched(shipment.boxes.len() as u64, cards as u64);
    tracing::info!(shipment = %shipment_id, carrier_reference = %carrier_reference, boxes = shipment.boxes.len(), cards, "shipment dispatched");
    Ok(Some(Dispatched {
        shipment_id: Some(shipment_id),
        carrier_reference: Some(carrier_reference),
        boxes: shipment.boxes.len(),
        cards,
    }))
}

/// Manifests list holders' names: they are sealed like every artifact with personal data,
/// bound to their object key ([`load_manifest`] opens them).
async fn put(services: &Services, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
    let bytes = zeroize::Zeroizing::new(bytes);
    let sealed = services.sealer.seal(&format!("manifest:{key}"), &bytes);
    services.objects.put(key, Bytes::from(sealed)).await?;
    Ok(())
}

/// A dispatched manifest (JSON, CSV or HTML, by its recorded key), opened.
pub async fn load_manifest(
    services: &Services,
    key: &str,
) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let sealed = services
        .objects
        .get(key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("manifest {key} not found"))?;
    Ok(services.sealer.open(&format!("manifest:{key}"), &sealed)?)
}
