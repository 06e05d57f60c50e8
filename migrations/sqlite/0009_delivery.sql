-- Delivery to pickup offices (workers/delivery): the offices register, boxes and shipments,
-- cards on their way, office receipts and discrepancies, transfers between offices,
-- handovers, citizen SMS reminders and card recalls after voiding.

-- The register of pickup offices (upserted from the CSV at start).
CREATE TABLE delivery_offices (
    code        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,   -- government_service_office | post_office
    province    TEXT NOT NULL,
    city        TEXT NOT NULL,
    address     TEXT NOT NULL,
    phone       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- Daily dispatches: one per (Tehran) day, with the carrier's reference.
CREATE TABLE delivery_shipments (
    id                 TEXT PRIMARY KEY,
    period             TEXT NOT NULL UNIQUE,
    carrier            TEXT NOT NULL,
    carrier_reference  TEXT NOT NULL,
    boxes              INTEGER NOT NULL,
    cards              INTEGER NOT NULL,
    manifest_json_key  TEXT NOT NULL,
    manifest_csv_key   TEXT NOT NULL,
    manifest_html_key  TEXT NOT NULL,
    dispatched_at      TEXT NOT NULL
);

-- Boxes: open (filling) -> sealed (full) -> shipped -> received.
CREATE TABLE delivery_boxes (
    id                 TEXT PRIMARY KEY,
    office_code        TEXT NOT NULL REFERENCES delivery_offices (code),
    state              TEXT NOT NULL,
    capacity           INTEGER NOT NULL,
    card_count         INTEGER NOT NULL,
    shipment_id        TEXT REFERENCES delivery_shipments (id),
    manifest_json_key  TEXT,
    manifest_csv_key   TEXT,
    manifest_html_key  TEXT,
    created_at         TEXT NOT NULL,
    sealed_at          TEXT,
    shipped_at         TEXT,
    received_at        TEXT,
    received_by        TEXT
);
-- At most one open box per office (concurrent packers cannot both open one).
CREATE UNIQUE INDEX delivery_one_open_box ON delivery_boxes (office_code) WHERE state = 'open';
CREATE INDEX delivery_boxes_by_state ON delivery_boxes (state);

-- One row per card in delivery: its box, its current destination office and its dates.
CREATE TABLE delivery_cards (
    application_id  TEXT PRIMARY KEY REFERENCES applications (id),
    box_id          TEXT NOT NULL REFERENCES delivery_boxes (id),
    packed_office   TEXT NOT NULL,
    office_code     TEXT NOT NULL,
    issued_at       TEXT NOT NULL,
    void_on         TEXT NOT NULL,   -- Tehran date (YYYY-MM-DD) from which the card is voided
    packed_at       TEXT NOT NULL,
    shipped_at      TEXT,
    received_at     TEXT,            -- the box reached its office
    available_at    TEXT,            -- the card is at the holder's office (after any transfer)
    collected_at    TEXT,
    voided_at       TEXT
);
CREATE INDEX delivery_cards_by_box ON delivery_cards (box_id);
CREATE INDEX delivery_cards_available ON delivery_cards (available_at);

-- Missing or extra cards reported by an office on receipt.
CREATE TABLE delivery_discrepancies (
    id              TEXT PRIMARY KEY,
    box_id          TEXT NOT NULL,
    office_code     TEXT NOT NULL,
    kind            TEXT NOT NULL,   -- missing | extra
    application_id  TEXT NOT NULL,
    reported_by     TEXT NOT NULL,
    reported_at     TEXT NOT NULL,
    resolved_at     TEXT
);

-- A change of pickup office after dispatch: the card travels between offices.
CREATE TABLE delivery_transfers (
    id              TEXT PRIMARY KEY,
    application_id  TEXT NOT NULL REFERENCES applications (id),
    from_office     TEXT NOT NULL,
    to_office       TEXT NOT NULL,
    state           TEXT NOT NULL,   -- in_transit | received
    requested_by    TEXT NOT NULL,
    requested_at    TEXT NOT NULL,
    received_at     TEXT
);
CREATE UNIQUE INDEX delivery_one_open_transfer ON delivery_transfers (application_id) WHERE state = 'in_transit';

-- The pickup: who handed the card over, the checks made and the fee.
CREATE TABLE delivery_handovers (
    application_id           TEXT PRIMARY KEY REFERENCES applications (id),
    office_code              TEXT NOT NULL,
    clerk                    TEXT NOT NULL,
    finger_position          INTEGER NOT NULL,
    match_score              REAL NOT NULL,
    previous_card_presented  INTEGER NOT NULL,
    pins_set                 INTEGER NOT NULL,
    fee_rial                 INTEGER NOT NULL,
    double_fee               INTEGER NOT NULL,
    collected_at             TEXT NOT NULL
);

-- Citizen SMS: exactly one row per (application, kind); the outbox row delivers it.
CREATE TABLE delivery_reminders (
    id              TEXT PRIMARY KEY,
    application_id  TEXT NOT NULL REFERENCES applications (id),
    kind            TEXT NOT NULL,
    office_code     TEXT NOT NULL,
    state           TEXT NOT NULL,   -- pending | sent | failed
    attempts        INTEGER NOT NULL,
    due_on          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    sent_at         TEXT,
    gateway_status  INTEGER,
    gateway_message TEXT,
    last_error      TEXT,
    UNIQUE (application_id, kind)
);
CREATE INDEX delivery_reminders_by_state ON delivery_reminders (state);

-- Cards recalled to the centre for destruction (stock reconciles them).
CREATE TABLE card_recalls (
    application_id  TEXT PRIMARY KEY REFERENCES applications (id),
    office_code     TEXT NOT NULL,
    box_id          TEXT,
    reason          TEXT NOT NULL,
    recalled_at     TEXT NOT NULL,
    received_at     TEXT
);
