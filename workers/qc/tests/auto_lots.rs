//! Automatic blank lots (`[stock] auto_lot`): whenever the vault runs dry the next lot is
//! received, numbered on from the last one, so a night longer than one lot does not stop at
//! its size; with automatic lots off, an empty vault is an error that says what to do.

use cardpipe_card::tray::BlankSource;
use cardpipe_common::testing::{self, Mode};
use cardpipe_qc::stock::{self, AutoLot, NewLot, StockConfig, StockSource};
use sqlx::Row;

async fn lots(services: &cardpipe_common::runtime::Services) -> Vec<(String, i64, i64)> {
    sqlx::query("SELECT lot_id, first_number, last_number FROM stock_lots ORDER BY lot_id")
        .fetch_all(services.store.pool())
        .await
        .expect("lots")
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("lot_id"),
                r.get::<i64, _>("first_number"),
                r.get::<i64, _>("last_number"),
            )
        })
        .collect()
}

async fn a_dry_vault_receives_the_next_automatic_lot(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let source = StockSource::new(StockConfig {
        auto_lot: AutoLot::Always,
        auto_lot_size: 2,
        ..StockConfig::default()
    });
    let mut taken = Vec::new();
    for _ in 0..5 {
        taken.push(source.take(&services, "encoder-01").await.expect("a blank"));
    }
    let expected: Vec<String> = (1..=5).map(|n| format!("BLK-{n:08}")).collect();
    assert_eq!(
        taken, expected,
        "serials numbered on across lots, none twice"
    );
    assert_eq!(
        lots(&services).await,
        vec![
            ("LOT-AUTO-0001".to_owned(), 1, 2),
            ("LOT-AUTO-0002".to_owned(), 3, 4),
            ("LOT-AUTO-0003".to_owned(), 5, 6),
        ]
    );
    let report = stock::reconcile(&services, None).await.expect("reconcile");
    assert!(report.balanced, "{report:#?}");
}

async fn without_automatic_lots_a_dry_vault_says_what_to_do(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let source = StockSource::new(StockConfig {
        auto_lot: AutoLot::Never,
        ..StockConfig::default()
    });
    let none = source.take(&services, "encoder-01").await.unwrap_err();
    assert!(
        none.to_string().contains("cardpipe stock receive"),
        "{none}"
    );
    stock::receive(&services, &blk_lot(1, 1), "vault.alice")
        .await
        .expect("receive");
    assert_eq!(
        source
            .take(&services, "encoder-01")
            .await
            .expect("the one blank"),
        "BLK-00000001"
    );
    let dry = source.take(&services, "encoder-01").await.unwrap_err();
    assert!(dry.to_string().contains("exhausted"), "{dry}");
    assert_eq!(
        lots(&services).await.len(),
        1,
        "nothing received automatically"
    );
}

/// An operator's lot with the automatic prefix: the automatic lot after it is numbered on
/// from its last serial instead of overlapping it.
async fn an_automatic_lot_follows_an_operator_lot(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    stock::receive(&services, &blk_lot(1, 3), "vault.alice")
        .await
        .expect("receive");
    let source = StockSource::new(StockConfig {
        auto_lot: AutoLot::Always,
        auto_lot_size: 2,
        ..StockConfig::default()
    });
    let mut taken = Vec::new();
    for _ in 0..4 {
        taken.push(source.take(&services, "encoder-01").await.expect("a blank"));
    }
    assert_eq!(taken.last().map(String::as_str), Some("BLK-00000004"));
    let automatic: Vec<_> = lots(&services)
        .await
        .into_iter()
        .filter(|(id, _, _)| id.starts_with("LOT-AUTO-"))
        .collect();
    assert_eq!(automatic, vec![("LOT-AUTO-0001".to_owned(), 4, 5)]);
}

/// An operator's lot of BLK- serials `first..=last`.
fn blk_lot(first: u64, last: u64) -> NewLot {
    NewLot {
        lot_id: None,
        supplier: "Supplier".into(),
        chip_type: "test-chip".into(),
        serial_prefix: "BLK-".into(),
        first,
        last,
    }
}

#[tokio::test]
async fn embedded_after_an_operator_lot() {
    an_automatic_lot_follows_an_operator_lot(Mode::Embedded).await
}

#[tokio::test]
async fn distributed_after_an_operator_lot() {
    an_automatic_lot_follows_an_operator_lot(Mode::Distributed).await
}

#[tokio::test]
async fn embedded_auto_lots() {
    a_dry_vault_receives_the_next_automatic_lot(Mode::Embedded).await
}

#[tokio::test]
async fn distributed_auto_lots() {
    a_dry_vault_receives_the_next_automatic_lot(Mode::Distributed).await
}

#[tokio::test]
async fn embedded_without_auto_lots() {
    without_automatic_lots_a_dry_vault_says_what_to_do(Mode::Embedded).await
}

#[tokio::test]
async fn distributed_without_auto_lots() {
    without_automatic_lots_a_dry_vault_says_what_to_do(Mode::Distributed).await
}
