//! A busy QC station is no reason to spoil a card (issue 15, item 6): when another QC
//! process's card is in the only station, the inspection answers "station unavailable"
//! (the QC job is retried later) and the card stays on the line's transport — nothing goes
//! to the reject bin, nothing is read.

use std::net::SocketAddr;
use std::time::Duration;

use cardpipe_card::line::CardLine;
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::vpcd::VpcdSlot;
use cardpipe_qc::station::{LineStations, Stations, Ticket};

const STATION: &str = "QC Station 01 00 00";

#[test]
fn a_busy_station_leaves_the_card_on_the_transport() {
    // A slot whose vpcd never listens: a card loaded there just sits in it.
    let slot = VpcdSlot::start(SocketAddr::from(([127, 0, 0, 1], 9)));
    let line = CardLine::new(vec![(STATION.into(), slot.handle().clone())]);
    let stock = BlankStock::healthy(MasterKeys::test_keys(), 3);
    let (theirs, ours) = (stock.take(), stock.take());
    let (their_chip, our_chip) = (theirs.serial().to_hex(), ours.serial().to_hex());
    line.deposit(theirs);
    line.deposit(ours);
    // Another QC process (another replica on the same line) holds the station.
    line.load(STATION, &their_chip).unwrap();
    let addr = line.serve(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let stations =
        LineStations::connect(&addr.to_string(), Duration::from_millis(200)).expect("stations");
    let ticket = Ticket {
        application_id: "app-1".into(),
        blank_serial: "B-1".into(),
        chip_serial: Some(our_chip.clone()),
    };
    let err = Stations::Line(stations)
        .inspect(&ticket, Box::new(|_| panic!("the card must not be read")))
        .expect_err("a busy station is unavailable, not a verdict on the card");
    assert!(err.to_string().contains("busy"), "{err}");
    let status = line.status();
    assert_eq!(status.on_transport, 1, "our card is still on the transport");
    assert_eq!(status.rejected, 0, "nothing went to the reject bin");
    assert_eq!(status.passed, 0);
    // The other process's card is untouched in the station.
    assert_eq!(
        slot.handle().with_card(|c| c.serial().to_hex()),
        Some(their_chip)
    );
}
