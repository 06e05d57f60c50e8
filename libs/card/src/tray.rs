//! The output tray of an encoder farm and the blank-card source of its feed.
//!
//! - [`OutputTray`]: personalized cards leave the encoder into the output tray, each with its
//!   job ticket (application id, blank-card body serial, encoder), until the QC station takes
//!   it. In embedded mode the cards are the in-process card OS chips; a PC/SC encoder hands its
//!   card over physically, so nothing is deposited here for it.
//! - [`BlankSource`]: where the feed's blank serials come from. Without one the farm numbers
//!   blanks itself; with one (the blank-card stock of `cardpipe-qc`) every blank is issued from
//!   the vault to the encoder before it is fed, and put back when it never entered the
//!   encoder.
//! - [`Defect`] (in `card_os`) injection: an optional injector on the tray simulates faults an
//!   encoder does not notice (a weak EEPROM cell, a skipped lock), so QC has something to catch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cardpipe_common::runtime::Services;

use crate::card_os::{Card, Defect};

/// A personalized card waiting for QC, with its job ticket.
#[derive(Debug)]
pub struct TrayCard {
    /// The blank-card body serial (printed on the card body).
    pub blank_serial: String,
    /// The encoder that wrote it.
    pub encoder: String,
    /// The chip.
    pub card: Card,
}

type Injector = Box<dyn Fn(u64, &str, &Card) -> Option<Defect> + Send + Sync>;

/// Cards between personalization and QC, keyed by application id.
#[derive(Default)]
pub struct OutputTray {
    cards: Mutex<HashMap<String, TrayCard>>,
    deposited: std::sync::atomic::AtomicU64,
    injector: Mutex<Option<Injector>>,
}

impl std::fmt::Debug for OutputTray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutputTray({} cards)", self.len())
    }
}

impl OutputTray {
    /// An empty tray.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Simulates undetected encoder faults: `f(n, application_id, card)` (n = 0-based deposit
    /// number) may name a defect to plant on the card as it lands in the tray.
    pub fn set_defect_injector(
        &self,
        f: impl Fn(u64, &str, &Card) -> Option<Defect> + Send + Sync + 'static,
    ) {
        *self.injector.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// A personalized card lands in the tray (replacing an older card of the same
    /// application, which was recorded spoiled by then).
    pub fn deposit(&self, application_id: &str, mut card: TrayCard) {
        let n = self
            .deposited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = self
            .injector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && let Some(defect) = f(n, application_id, &card.card)
        {
            card.card.inject_defect(&defect);
        }
        self.cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(application_id.to_owned(), card);
    }

    /// Takes the application's card out of the tray.
    pub fn take(&self, application_id: &str) -> Option<TrayCard> {
        self.cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(application_id)
    }

    /// Puts a card back (QC could not finish with it).
    pub fn put_back(&self, application_id: &str, card: TrayCard) {
        self.cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(application_id.to_owned())
            .or_insert(card);
    }

    /// Lets a test or tool change a card in the tray.
    pub fn with_card<R>(
        &self,
        application_id: &str,
        f: impl FnOnce(&mut TrayCard) -> R,
    ) -> Option<R> {
        self.cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(application_id)
            .map(f)
    }

    /// Cards waiting.
    pub fn len(&self) -> usize {
        self.cards.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// No card waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where blank serials come from (the vault), so no card is made from a blank not in stock.
#[async_trait]
pub trait BlankSource: Send + Sync + std::fmt::Debug {
    /// Issues the next blank from the vault to `encoder`; returns its body serial.
    async fn take(&self, services: &Services, encoder: &str) -> anyhow::Result<String>;
    /// The blank never entered the encoder (feed or reader problem): back to the vault.
    async fn put_back(&self, services: &Services, serial: &str, why: &str) -> anyhow::Result<()>;
}
