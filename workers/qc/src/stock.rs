//! Blank-card stock, as a card production vault keeps it (tables of `0008_qc_stock.sql`).
//!
//! - A **lot** is received from a supplier with a serial range and a chip type
//!   ([`receive`]); each serial gets a row, `in_vault`.
//! - Every serial is in exactly one state: `in_vault`, `at_encoder` (issued to an encoder:
//!   [`StockSource`], the personalize stage's blank source), `consumed` (personalized and passed
//!   QC), `spoiled` (reason; ruined at an encoder or refused by QC — moved by a database trigger
//!   on `cards`, in the same transaction), `awaiting_destruction` ([`prepare_destruction`], one
//!   operator), `destroyed` ([`witness_destruction`], a second, different operator) and
//!   `returned` (a recalled card back in the vault: [`return_card`], reprints).
//! - Every move leaves a journal row (`stock_moves`). The whitelist is a trigger too: once any
//!   lot exists, a `cards` row can only be created for a serial at an encoder.
//! - [`reconcile`]: per lot `received = in vault + at encoders + consumed + spoiled + awaiting
//!   destruction + destroyed + returned`, the same balance replayed from the journal as of the
//!   end of a day, the journal against the current states, and the `cards` table against the
//!   stock. Any difference counts into `cardpipe_stock_imbalance_cards` (alert
//!   `StockImbalance`).
//!
//! Operator actions (receive, return, destruction sign-offs) are written to the audit log in
//! the transaction that makes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cardpipe_card::tray::BlankSource;
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Dialect, StoreError, StoreTx};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use time::OffsetDateTime;

/// Every stock state, in reconciliation order.
pub const STATES: [&str; 7] = [
    "in_vault",
    "at_encoder",
    "consumed",
    "spoiled",
    "awaiting_destruction",
    "destroyed",
    "returned",
];

/// Stock failures at the library edge.
#[derive(Debug, thiserror::Error)]
pub enum StockError {
    /// A request field is wrong (the message names the field).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The serial range overlaps a lot already received.
    #[error("serial range overlaps lot {0}")]
    Overlap(String),
    /// Nothing to act on.
    #[error("{0}")]
    NotFound(String),
    /// The second sign-off must come from another operator.
    #[error(
        "destruction {0} was prepared by the same operator: a second, different operator must witness it"
    )]
    SameOperator(String),
    /// The vault has no blank left.
    #[error(
        "blank-card stock exhausted: no blank in the vault (receive a lot: `cardpipe stock receive`)"
    )]
    Exhausted,
    /// No lot was ever received and automatic receipt is off.
    #[error("no blank-card stock received: run `cardpipe stock receive` first")]
    NoStock,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for StockError {
    fn from(e: sqlx::Error) -> Self {
        StockError::Store(StoreError::Database(e))
    }
}

/// When a default lot is received automatically (so `cardpipe run --demo` works on a fresh
/// machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AutoLot {
    /// Only on SQLite (embedded mode).
    #[default]
    Embedded,
    /// Always (test rigs).
    Always,
    /// Never: an operator receives every lot.
    Never,
}

/// `[stock]` in pipeline.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StockConfig {
    /// When the default lot is received automatically.
    pub auto_lot: AutoLot,
    /// Blanks in the default lot.
    pub auto_lot_size: u64,
    /// Seconds between reconciliations (gauge refresh).
    pub reconcile_interval_seconds: u64,
}

impl Default for StockConfig {
    fn default() -> Self {
        Self {
            auto_lot: AutoLot::Embedded,
            auto_lot_size: 10_000,
            reconcile_interval_seconds: 60,
        }
    }
}

/// The configuration section.
pub const SECTION: &str = "stock";

/// Loads `[stock]`.
pub fn load(loaded: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<StockConfig> {
    loaded
        .section(SECTION)
        .map_err(|e| anyhow::anyhow!("{}", cardpipe_common::config::describe(&e)))
}

/// A lot to receive.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NewLot {
    /// Lot id (generated when absent).
    #[serde(default)]
    pub lot_id: Option<String>,
    /// Supplier.
    pub supplier: String,
    /// Chip type.
    pub chip_type: String,
    /// Serial prefix printed before the number (e.g. `BLK-`).
    pub serial_prefix: String,
    /// First serial number.
    pub first: u64,
    /// Last serial number (inclusive).
    pub last: u64,
}

/// Largest lot received at once.
pub const MAX_LOT: u64 = 1_000_000;

/// The serial of number `n` in a lot with `prefix`.
pub fn serial(prefix: &str, n: u64) -> String {
    format!("{prefix}{n:08}")
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), StockError> {
    let ok = !value.trim().is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._-/@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StockError::Invalid {
            field,
            reason: format!("must be 1..={max} characters of [A-Za-z0-9 ._-/@]"),
        })
    }
}

/// Checks an operator login.
pub fn check_operator(operator: &str) -> Result<(), StockError> {
    check_text("operator", operator, 64)
}

/// What receiving a lot produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LotSummary {
    /// Lot id.
    pub lot_id: String,
    /// Serials received.
    pub quantity: u64,
    /// First serial.
    pub first_serial: String,
    /// Last serial.
    pub last_serial: String,
}

/// A journal row: serial, lot, from, to, actor, reason.
type Move<'a> = (
    String,
    String,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
);

async fn insert_moves(tx: &mut StoreTx, rows: &[Move<'_>], at: &str) -> Result<(), StoreError> {
    for chunk in rows.chunks(200) {
        let mut sql = String::from(
            "INSERT INTO stock_moves (serial, lot_id, from_state, to_state, actor, reason, at) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 6;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                chunk.len() * 6 + 1
            ));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (serial, lot, from, to, actor, reason) in chunk {
            q = q
                .bind(serial.clone())
                .bind(lot.clone())
                .bind(from.map(str::to_owned))
                .bind(to.to_string())
                .bind(actor.to_string())
                .bind(reason.map(str::to_owned));
        }
        q.bind(at.to_owned()).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Receives a lot: one row per serial, `in_vault`, journaled and audited, in one transaction.
/// Refuses a range overlapping any lot with the same prefix.
pub async fn receive(
    services: &Services,
    lot: &NewLot,
    operator: &str,
) -> Result<LotSummary, StockError> {
    check_operator(operator)?;
    check_text("supplier", &lot.supplier, 128)?;
    check_text("chip_type", &lot.chip_type, 64)?;
    check_text("serial_prefix", &lot.serial_prefix, 16)?;
    if lot.first > lot.last {
        return Err(StockError::Invalid {
            field: "last",
            reason: "must not be below first".into(),
        });
    }
    let quantity = lot.last - lot.first + 1;
    if quantity > MAX_LOT || lot.last > 99_999_999 {
        return Err(StockError::Invalid {
            field: "last",
            reason: format!("a lot holds at most {MAX_LOT} serials numbered below 10^8"),
        });
    }
    let lot_id = match &lot.lot_id {
        Some(id) => {
            check_text("lot_id", id, 64)?;
            id.clone()
        }
        None => format!("LOT-{}", uuid::Uuid::now_v7().simple()),
    };
    let now = services.clock.now();
    let at = to_rfc3339(now);
    // The first statement writes (SQLite takes the write lock up front).
    let mut tx = services.store.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO stock_lots (lot_id, supplier, chip_type, serial_prefix, first_number, last_number, quantity, received_at, received_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&lot_id)
    .bind(&lot.supplier)
    .bind(&lot.chip_type)
    .bind(&lot.serial_prefix)
    .bind(lot.first as i64)
    .bind(lot.last as i64)
    .bind(quantity as i64)
    .bind(&at)
    .bind(operator)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(StockError::Overlap(lot_id));
        }
        Err(e) => return Err(e.into()),
    }
    let overlap = sqlx::query(
        "SELECT lot_id FROM stock_lots WHERE serial_prefix = $1 AND first_number <= $3 AND last_number >= $2
         AND lot_id <> $4 LIMIT 1",
    )
    .bind(&lot.serial_prefix)
    .bind(lot.first as i64)
    .bind(lot.last as i64)
    .bind(&lot_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = overlap {
        return Err(StockError::Overlap(row.try_get("lot_id")?));
    }
    let numbers: Vec<u64> = (lot.first..=lot.last).collect();
    for chunk in numbers.chunks(300) {
        let mut sql =
            String::from("INSERT INTO stock_serials (serial, lot_id, state, updated_at) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(${}, $1, 'in_vault', $2)", i + 3));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&lot_id)
            .bind(&at);
        for n in chunk {
            q = q.bind(serial(&lot.serial_prefix, *n));
        }
        q.execute(&mut *tx).await?;
    }
    let actor = format!("operator:{operator}");
    let moves: Vec<_> = numbers
        .iter()
        .map(|n| {
            (
                serial(&lot.serial_prefix, *n),
                lot_id.clone(),
                None,
                "in_vault",
                actor.as_str(),
                Some("received"),
            )
        })
        .collect();
    insert_moves(&mut tx, &moves, &at).await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: operator,
            role: "operator",
            action: "stock.receive",
            subject: &lot_id,
            details: serde_json::json!({
                "supplier": lot.supplier, "chip_type": lot.chip_type,
                "first": serial(&lot.serial_prefix, lot.first),
                "last": serial(&lot.serial_prefix, lot.last), "quantity": quantity,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(lot = %lot_id, quantity, %operator, "blank-card lot received");
    Ok(LotSummary {
        lot_id,
        quantity,
        first_serial: serial(&lot.serial_prefix, lot.first),
        last_serial: serial(&lot.serial_prefix, lot.last),
    })
}

/// Moves `serial` from one of `from` to `to` in `tx`, journaled. Returns false when the
/// serial is not in stock or not in one of `from`.
#[allow(clippy::too_many_arguments)]
pub async fn move_serial(
    tx: &mut StoreTx,
    serial: &str,
    from: &[&str],
    to: &str,
    actor: &str,
    reason: Option<&str>,
    location: Option<&str>,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let at = to_rfc3339(at);
    // Write first (one UPDATE per candidate state), so the old state is known for the
    // journal and SQLite never upgrades a read transaction.
    for state in from {
        let row = sqlx::query(
            "UPDATE stock_serials SET state = $1, reason = COALESCE($2, reason), location = COALESCE($3, location), updated_at = $4
             WHERE serial = $5 AND state = $6 RETURNING lot_id",
        )
        .bind(to)
        .bind(reason)
        .bind(location)
        .bind(&at)
        .bind(serial)
        .bind(*state)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = row {
            let lot: String = row.try_get("lot_id")?;
            insert_moves(
                tx,
                &[(serial.to_owned(), lot, Some(*state), to, actor, reason)],
                &at,
            )
            .await?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether any lot was ever received.
pub async fn has_stock(services: &Services) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM stock_lots")
        .fetch_one(services.store.pool())
        .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}

/// Issues the next blank from the vault to `encoder`.
pub async fn issue_to_encoder(
    services: &Services,
    encoder: &str,
) -> Result<Option<String>, StoreError> {
    let actor = format!("encoder:{encoder}");
    for _ in 0..20 {
        let at = to_rfc3339(services.clock.now());
        let mut tx = services.store.begin().await?;
        let row = sqlx::query(
            "UPDATE stock_serials SET state = 'at_encoder', location = $1, reason = 'issued', updated_at = $2
             WHERE serial = (SELECT serial FROM stock_serials WHERE state = 'in_vault' ORDER BY serial LIMIT 1)
               AND state = 'in_vault'
             RETURNING serial, lot_id",
        )
        .bind(encoder)
        .bind(&at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let left: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM stock_serials WHERE state = 'in_vault'")
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
            if left == 0 {
                return Ok(None);
            }
            // Another encoder took that one first: try the next.
            continue;
        };
        let serial: String = row.try_get("serial")?;
        let lot: String = row.try_get("lot_id")?;
        insert_moves(
            &mut tx,
            &[(
                serial.clone(),
                lot,
                Some("in_vault"),
                "at_encoder",
                actor.as_str(),
                Some("issued"),
            )],
            &at,
        )
        .await?;
        tx.commit().await?;
        return Ok(Some(serial));
    }
    Ok(None)
}

/// The personalize stage's blank source: the vault.
#[derive(Debug)]
pub struct StockSource {
    config: StockConfig,
    auto_lock: tokio::sync::Mutex<()>,
}

impl StockSource {
    /// A source following `config`.
    pub fn new(config: StockConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            auto_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// With automatic lots on, makes sure the vault holds blanks, receiving the next
    /// automatic lot if it is empty; `false` when automatic lots are off.
    async fn ensure_auto_lot(&self, services: &Services) -> anyhow::Result<bool> {
        let wanted = match self.config.auto_lot {
            AutoLot::Never => false,
            AutoLot::Always => true,
            AutoLot::Embedded => services.store.dialect() == Dialect::Sqlite,
        };
        if !wanted || self.config.auto_lot_size == 0 {
            return Ok(false);
        }
        let _guard = self.auto_lock.lock().await;
        let in_vault = sqlx::query("SELECT 1 FROM stock_serials WHERE state = 'in_vault' LIMIT 1")
            .fetch_optional(services.store.pool())
            .await?;
        if in_vault.is_some() {
            // Another job of this process received a lot meanwhile.
            return Ok(true);
        }
        // The vault is empty: the next automatic lot (LOT-AUTO-0001, -0002, …), numbered on
        // from the highest BLK- serial of any lot (automatic or received by an operator with
        // the same prefix), so a night longer than one lot does not stop at its size.
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM stock_lots WHERE lot_id LIKE 'LOT-AUTO-%') AS lots,
                    (SELECT MAX(last_number) FROM stock_lots WHERE serial_prefix = 'BLK-') AS last",
        )
        .fetch_one(services.store.pool())
        .await?;
        let received: i64 = row.try_get("lots")?;
        let last: Option<i64> = row.try_get("last")?;
        let first = last.unwrap_or(0).max(0) as u64 + 1;
        let lot = NewLot {
            lot_id: Some(format!("LOT-AUTO-{:04}", received + 1)),
            supplier: "embedded default lot".into(),
            chip_type: "cardpipe-sim P-256".into(),
            serial_prefix: "BLK-".into(),
            first,
            last: first + self.config.auto_lot_size - 1,
        };
        match receive(services, &lot, "system").await {
            Ok(_) | Err(StockError::Overlap(_)) => Ok(true),
            Err(StockError::Store(StoreError::Database(e)))
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl BlankSource for StockSource {
    async fn take(&self, services: &Services, encoder: &str) -> anyhow::Result<String> {
        if let Some(serial) = issue_to_encoder(services, encoder).await? {
            return Ok(serial);
        }
        // The vault is empty.
        if self.ensure_auto_lot(services).await? {
            if let Some(serial) = issue_to_encoder(services, encoder).await? {
                return Ok(serial);
            }
        } else if !has_stock(services).await? {
            return Err(StockError::NoStock.into());
        }
        Err(StockError::Exhausted.into())
    }

    async fn put_back(&self, services: &Services, serial: &str, why: &str) -> anyhow::Result<()> {
        let mut tx = services.store.begin().await?;
        move_serial(
            &mut tx,
            serial,
            &["at_encoder"],
            "in_vault",
            "encoder",
            Some(why),
            None,
            services.clock.now(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// A recalled card is back in the vault: `consumed → returned`, audited.
pub async fn return_card(
    services: &Services,
    serial: &str,
    operator: &str,
    reason: &str,
) -> Result<(), StockError> {
    check_operator(operator)?;
    check_text("reason", reason, 128)?;
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let actor = format!("operator:{operator}");
    if !move_serial(
        &mut tx,
        serial,
        &["consumed"],
        "returned",
        &actor,
        Some(reason),
        None,
        now,
    )
    .await?
    {
        return Err(StockError::NotFound(format!(
            "serial {serial} is not an issued (consumed) card in stock"
        )));
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: operator,
            role: "operator",
            action: "stock.return",
            subject: serial,
            details: serde_json::json!({ "reason": reason }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A destruction batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Destruction {
    /// Batch id.
    pub id: String,
    /// `prepared` or `destroyed`.
    pub state: String,
    /// Cards in it.
    pub cards: i64,
    /// First operator.
    pub prepared_by: String,
    /// Second operator.
    pub witnessed_by: Option<String>,
}

/// First sign-off: every `spoiled` and `returned` serial (or only `serials`, when given) goes
/// into a new destruction batch, `awaiting_destruction`. Audited.
pub async fn prepare_destruction(
    services: &Services,
    operator: &str,
    serials: Option<&[String]>,
) -> Result<Destruction, StockError> {
    check_operator(operator)?;
    let now = services.clock.now();
    let id = format!("DST-{}", uuid::Uuid::now_v7().simple());
    let mut tx = services.store.begin().await?;
    sqlx::query(
        "INSERT INTO stock_destructions (id, state, cards, prepared_by, prepared_at) VALUES ($1, 'prepared', 0, $2, $3)",
    )
    .bind(&id)
    .bind(operator)
    .bind(to_rfc3339(now))
    .execute(&mut *tx)
    .await?;
    let candidates: Vec<String> = match serials {
        Some(list) => list.to_vec(),
        None => sqlx::query(
            "SELECT serial FROM stock_serials WHERE state IN ('spoiled', 'returned') ORDER BY serial",
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("serial"))
        .collect::<Result<_, _>>()?,
    };
    let actor = format!("operator:{operator}");
    let mut moved = 0i64;
    for serial in &candidates {
        if move_serial(
            &mut tx,
            serial,
            &["spoiled", "returned"],
            "awaiting_destruction",
            &actor,
            None,
            None,
            now,
        )
        .await?
        {
            sqlx::query("UPDATE stock_serials SET destruction_id = $1 WHERE serial = $2")
                .bind(&id)
                .bind(serial)
                .execute(&mut *tx)
                .await?;
            moved += 1;
        } else if serials.is_some() {
            return Err(StockError::Invalid {
                field: "serials",
                reason: format!("{serial} is not a spoiled or returned card in stock"),
            });
        }
    }
    if moved == 0 {
        return Err(StockError::NotFound(
            "no spoiled or returned card to destroy".into(),
        ));
    }
    sqlx::query("UPDATE stock_destructions SET cards = $1 WHERE id = $2")
        .bind(moved)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: operator,
            role: "operator",
            action: "stock.destruction.prepare",
            subject: &id,
            details: serde_json::json!({ "cards": moved }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Destruction {
        id,
        state: "prepared".into(),
        cards: moved,
        prepared_by: operator.to_owned(),
        witnessed_by: None,
    })
}

/// Second sign-off by a different operator: the batch is destroyed. Audited.
pub async fn witness_destruction(
    services: &Services,
    id: &str,
    operator: &str,
) -> Result<Destruction, StockError> {
    check_operator(operator)?;
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    // Write first: claim the batch for this sign-off (rolled back on refusal).
    sqlx::query("UPDATE stock_destructions SET witnessed_at = $1 WHERE id = $2")
        .bind(to_rfc3339(now))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT state, cards, prepared_by FROM stock_destructions WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StockError::NotFound(format!("destruction {id} not found")))?;
    let state: String = row.try_get("state")?;
    let prepared_by: String = row.try_get("prepared_by")?;
    if state != "prepared" {
        return Err(StockError::NotFound(format!(
            "destruction {id} is already {state}"
        )));
    }
    if prepared_by == operator {
        return Err(StockError::SameOperator(id.to_owned()));
    }
    let serials: Vec<String> = sqlx::query(
        "SELECT serial FROM stock_serials WHERE destruction_id = $1 AND state = 'awaiting_destruction'",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| r.try_get("serial"))
    .collect::<Result<_, _>>()?;
    let actor = format!("operator:{prepared_by}+{operator}");
    for serial in &serials {
        move_serial(
            &mut tx,
            serial,
            &["awaiting_destruction"],
            "destroyed",
            &actor,
            None,
            None,
            now,
        )
        .await?;
    }
    sqlx::query(
        "UPDATE stock_destructions SET state = 'destroyed', witnessed_by = $1, witnessed_at = $2 WHERE id = $3",
    )
    .bind(operator)
    .bind(to_rfc3339(now))
    .bind(id)
    .execute(&mut *tx)
    .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: operator,
            role: "operator",
            action: "stock.destruction.witness",
            subject: id,
            details: serde_json::json!({ "cards": serials.len(), "prepared_by": prepared_by }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Destruction {
        id: id.to_owned(),
        state: "destroyed".into(),
        cards: serials.len() as i64,
        prepared_by,
        witnessed_by: Some(operator.to_owned()),
    })
}

/// Counts per state, with the difference `received − Σ states`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Balance {
    /// Serials received.
    pub received: i64,
    /// Count per state.
    pub states: BTreeMap<String, i64>,
    /// received − Σ states (0 when balanced).
    pub difference: i64,
}

impl Balance {
    fn close(mut self) -> Self {
        for s in STATES {
            self.states.entry(s.to_owned()).or_insert(0);
        }
        self.difference = self.received - self.states.values().sum::<i64>();
        self
    }
}

/// One lot's balance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LotBalance {
    /// Lot id.
    pub lot_id: String,
    /// Supplier.
    pub supplier: String,
    /// Chip type.
    pub chip_type: String,
    /// The balance.
    pub balance: Balance,
}

/// The reconciliation report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reconciliation {
    /// When it was computed.
    pub generated_at: String,
    /// Per lot, from the current states.
    pub lots: Vec<LotBalance>,
    /// All lots.
    pub total: Balance,
    /// The day reported (UTC), with its balance replayed from the journal as of its end.
    pub day: String,
    /// Balance at the end of `day`, from the journal alone.
    pub day_balance: Balance,
    /// Moves made during `day`, per target state.
    pub day_moves: BTreeMap<String, i64>,
    /// Serials whose current state differs from the journal's last move.
    pub journal_mismatches: i64,
    /// Card rows that disagree with the stock (made from a blank not in stock, or spoiled /
    /// live in one and not the other).
    pub card_mismatches: i64,
    /// Blanks issued to an encoder more than [`STRANDED_AFTER`] ago with no card row: the
    /// encoder's process died between issuing the blank and recording the card (the blank
    /// is in the encoder's hopper or reject bin; an operator finds it and spoils or
    /// returns it).
    #[serde(default)]
    pub stranded_at_encoder: i64,
    /// Everything that does not add up, in cards.
    pub imbalance: i64,
    /// `imbalance == 0`.
    pub balanced: bool,
}

/// How long a blank may sit at an encoder without a card row before reconciliation
/// counts it as stranded (an encoding takes seconds; the card row is written as the
/// blank is taken).
pub const STRANDED_AFTER: time::Duration = time::Duration::minutes(10);

/// Computes the reconciliation for `day` (UTC; today when `None`).
pub async fn reconcile(
    services: &Services,
    day: Option<time::Date>,
) -> Result<Reconciliation, StoreError> {
    let pool = services.store.pool();
    let now = services.clock.now();
    let day = day.unwrap_or(now.date());
    let end = to_rfc3339(day.next_day().unwrap_or(day).midnight().assume_utc());
    let start = to_rfc3339(day.midnight().assume_utc());

    let lots =
        sqlx::query("SELECT lot_id, supplier, chip_type, quantity FROM stock_lots ORDER BY lot_id")
            .fetch_all(pool)
            .await?;
    let counts = sqlx::query(
        "SELECT lot_id, state, COUNT(*) AS n FROM stock_serials GROUP BY lot_id, state",
    )
    .fetch_all(pool)
    .await?;
    let mut per_lot: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for r in &counts {
        per_lot
            .entry(r.try_get("lot_id")?)
            .or_default()
            .insert(r.try_get("state")?, r.try_get("n")?);
    }
    let mut out_lots = Vec::new();
    let mut total = Balance::default();
    for r in &lots {
        let lot_id: String = r.try_get("lot_id")?;
        let states = per_lot.remove(&lot_id).unwrap_or_default();
        let balance = Balance {
            received: r.try_get("quantity")?,
            states,
            difference: 0,
        }
        .close();
        total.received += balance.received;
        for (s, n) in &balance.states {
            *total.states.entry(s.clone()).or_insert(0) += n;
        }
        out_lots.push(LotBalance {
            lot_id,
            supplier: r.try_get("supplier")?,
            chip_type: r.try_get("chip_type")?,
            balance,
        });
    }
    // Serials whose lot is unknown count against the balance too.
    let orphans: i64 = per_lot.values().flat_map(|s| s.values()).sum();
    for states in per_lot.values() {
        for (s, n) in states {
            *total.states.entry(s.clone()).or_insert(0) += n;
        }
    }
    let total = total.close();

    // The day, from the journal alone.
    let received_by_end: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM stock_moves WHERE from_state IS NULL AND at < $1")
            .bind(&end)
            .fetch_one(pool)
            .await?
            .try_get("n")?;
    let last_states = sqlx::query(
        "SELECT m.to_state AS state, COUNT(*) AS n FROM stock_moves m
         WHERE m.at < $1 AND m.seq = (SELECT MAX(x.seq) FROM stock_moves x WHERE x.serial = m.serial AND x.at < $1)
         GROUP BY m.to_state",
    )
    .bind(&end)
    .fetch_all(pool)
    .await?;
    let mut day_balance = Balance {
        received: received_by_end,
        ..Balance::default()
    };
    for r in &last_states {
        day_balance
            .states
            .insert(r.try_get("state")?, r.try_get("n")?);
    }
    let day_balance = day_balance.close();
    let moves = sqlx::query(
        "SELECT to_state, COUNT(*) AS n FROM stock_moves WHERE at >= $1 AND at < $2 GROUP BY to_state",
    )
    .bind(&start)
    .bind(&end)
    .fetch_all(pool)
    .await?;
    let mut day_moves = BTreeMap::new();
    for r in &moves {
        day_moves.insert(r.try_get("to_state")?, r.try_get("n")?);
    }

    let journal_mismatches: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM stock_serials s
         WHERE NOT EXISTS (SELECT 1 FROM stock_moves m WHERE m.serial = s.serial
                           AND m.seq = (SELECT MAX(x.seq) FROM stock_moves x WHERE x.serial = s.serial)
                           AND m.to_state = s.state)",
    )
    .fetch_one(pool)
    .await?
    .try_get("n")?;
    let card_mismatches: i64 = if lots.is_empty() {
        0
    } else {
        sqlx::query(
            "SELECT COUNT(*) AS n FROM cards c LEFT JOIN stock_serials s ON s.serial = c.blank_serial
             WHERE s.serial IS NULL
                OR (c.state = 'spoiled' AND s.state NOT IN ('spoiled', 'awaiting_destruction', 'destroyed'))
                OR (c.state IN ('in_progress', 'personalized') AND s.state NOT IN ('at_encoder', 'consumed'))
                OR (c.state = 'recalled' AND s.state NOT IN ('consumed', 'returned', 'awaiting_destruction', 'destroyed'))",
        )
        .fetch_one(pool)
        .await?
        .try_get("n")?
    };
    let stranded_before = to_rfc3339(now - STRANDED_AFTER);
    let stranded_at_encoder: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM stock_serials s
         WHERE s.state = 'at_encoder' AND s.updated_at < $1
           AND NOT EXISTS (SELECT 1 FROM cards c WHERE c.blank_serial = s.serial)",
    )
    .bind(&stranded_before)
    .fetch_one(pool)
    .await?
    .try_get("n")?;
    let imbalance = out_lots
        .iter()
        .map(|l| l.balance.difference.abs())
        .sum::<i64>()
        + orphans
        + day_balance.difference.abs()
        + journal_mismatches
        + card_mismatches
        + stranded_at_encoder;
    Ok(Reconciliation {
        generated_at: to_rfc3339(now),
        lots: out_lots,
        total,
        day: day.to_string(),
        day_balance,
        day_moves,
        journal_mismatches,
        card_mismatches,
        stranded_at_encoder,
        imbalance,
        balanced: imbalance == 0,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LotLabel {
    lot: String,
}

/// The stock gauges: `cardpipe_stock_imbalance_cards`, `cardpipe_stock_cards{state}` and
/// `cardpipe_stock_reconciliation_difference{lot}`.
#[derive(Clone, Default, Debug)]
pub struct StockMetrics {
    imbalance: Gauge,
    cards: Family<StateLabel, Gauge>,
    lots: Family<LotLabel, Gauge>,
}

impl StockMetrics {
    /// Registers the gauges.
    pub fn register(metrics: &cardpipe_common::telemetry::metrics::Metrics) -> Self {
        let m = Self::default();
        let c = m.clone();
        metrics.register(move |r| {
            r.register(
                "stock_imbalance_cards",
                "Blank-card stock reconciliation difference, in cards (0 when balanced)",
                c.imbalance,
            );
            r.register("stock_cards", "Blank cards per stock state", c.cards);
            r.register(
                "stock_reconciliation_difference",
                "Per lot: cards received minus cards accounted for in a state (0 when balanced)",
                c.lots,
            );
        });
        m
    }

    /// Publishes a reconciliation.
    pub fn publish(&self, r: &Reconciliation) {
        self.imbalance.set(r.imbalance);
        for lot in &r.lots {
            self.lots
                .get_or_create(&LotLabel {
                    lot: lot.lot_id.clone(),
                })
                .set(lot.balance.difference);
        }
        for (state, n) in &r.total.states {
            self.cards
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n);
        }
    }
}

/// Reconciles every `interval` until `shutdown`, publishing the gauges.
pub async fn background(
    services: Services,
    metrics: StockMetrics,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match reconcile(&services, None).await {
            Ok(r) => {
                if !r.balanced {
                    tracing::warn!(
                        imbalance = r.imbalance,
                        journal = r.journal_mismatches,
                        cards = r.card_mismatches,
                        "blank-card stock does not balance"
                    );
                }
                metrics.publish(&r);
            }
            Err(e) => tracing::warn!(error = %e, "stock reconciliation failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
