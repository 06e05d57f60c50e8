-- Quality control, blank-card stock and reprints (workers/qc).
--
-- Blank-card stock, as the card production vault keeps it. A lot is received with a serial
-- range (serial_prefix + zero-padded numbers first_number..=last_number); every serial of it
-- gets a row in stock_serials, in exactly one state:
--   in_vault | at_encoder | consumed | spoiled | awaiting_destruction | destroyed | returned
-- and every move leaves a row in stock_moves (the journal the reconciliation replays).
-- at_encoder: issued to an encoder (location = encoder); consumed: personalized and passed QC
-- (a product); spoiled: ruined at an encoder or refused by QC (reason); awaiting_destruction:
-- put in a destruction batch by one operator; destroyed: a second, different operator
-- witnessed the destruction; returned: a recalled card (reprint, void) back in the vault.
CREATE TABLE stock_lots (
    lot_id          TEXT PRIMARY KEY,
    supplier        TEXT NOT NULL,
    chip_type       TEXT NOT NULL,
    serial_prefix   TEXT NOT NULL,
    first_number    BIGINT NOT NULL,
    last_number     BIGINT NOT NULL,
    quantity        BIGINT NOT NULL,
    received_at     TEXT NOT NULL,
    received_by     TEXT NOT NULL
);

CREATE TABLE stock_serials (
    serial          TEXT PRIMARY KEY,
    lot_id          TEXT NOT NULL REFERENCES stock_lots (lot_id),
    state           TEXT NOT NULL,
    location        TEXT,
    reason          TEXT,
    destruction_id  TEXT,
    updated_at      TEXT NOT NULL
);
CREATE INDEX stock_serials_by_state ON stock_serials (state, serial);
CREATE INDEX stock_serials_by_lot ON stock_serials (lot_id, state);

CREATE TABLE stock_moves (
    seq             BIGSERIAL PRIMARY KEY,
    serial          TEXT NOT NULL,
    lot_id          TEXT NOT NULL,
    from_state      TEXT,
    to_state        TEXT NOT NULL,
    actor           TEXT NOT NULL,
    reason          TEXT,
    at              TEXT NOT NULL
);
CREATE INDEX stock_moves_by_serial ON stock_moves (serial, seq);
CREATE INDEX stock_moves_by_at ON stock_moves (at);

-- Destruction batches: prepared by one operator, witnessed (destroyed) by another.
CREATE TABLE stock_destructions (
    id              TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    cards           BIGINT NOT NULL,
    prepared_by     TEXT NOT NULL,
    prepared_at     TEXT NOT NULL,
    witnessed_by    TEXT,
    witnessed_at    TEXT
);

-- The stock whitelist: once any lot has been received, a card row may only be created for a
-- blank serial issued to an encoder from stock.
CREATE FUNCTION cards_blank_from_stock() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM stock_lots)
       AND NOT EXISTS (SELECT 1 FROM stock_serials WHERE serial = NEW.blank_serial AND state = 'at_encoder') THEN
        RAISE EXCEPTION 'blank serial % is not in stock at an encoder (not received, or not issued to an encoder)', NEW.blank_serial;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER cards_blank_from_stock BEFORE INSERT ON cards
    FOR EACH ROW EXECUTE FUNCTION cards_blank_from_stock();

-- A blank spoiled at an encoder (or refused by QC) is spoiled in stock, in the same transaction.
CREATE FUNCTION cards_spoiled_moves_stock() RETURNS trigger AS $$
BEGIN
    IF NEW.state = 'spoiled' AND (TG_OP = 'INSERT' OR OLD.state <> 'spoiled') THEN
        INSERT INTO stock_moves (serial, lot_id, from_state, to_state, actor, reason, at)
            SELECT serial, lot_id, state, 'spoiled', 'encoder:' || NEW.encoder, NEW.spoil_reason, NEW.updated_at
            FROM stock_serials WHERE serial = NEW.blank_serial AND state = 'at_encoder';
        UPDATE stock_serials SET state = 'spoiled', reason = NEW.spoil_reason, updated_at = NEW.updated_at
            WHERE serial = NEW.blank_serial AND state = 'at_encoder';
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER cards_spoiled_moves_stock AFTER INSERT OR UPDATE OF state ON cards
    FOR EACH ROW EXECUTE FUNCTION cards_spoiled_moves_stock();

-- One row per QC check of a card (the report itself is an object-store artifact).
CREATE TABLE qc_reports (
    id              TEXT PRIMARY KEY,
    application_id  TEXT NOT NULL REFERENCES applications (id),
    blank_serial    TEXT NOT NULL,
    chip_serial     TEXT,
    outcome         TEXT NOT NULL,
    reason          TEXT,
    object_key      TEXT NOT NULL,
    elapsed_ms      BIGINT NOT NULL,
    checked_at      TEXT NOT NULL
);
CREATE INDEX qc_reports_by_application ON qc_reports (application_id, checked_at);

-- Reprint requests (operator or registry), with the card they replace.
CREATE TABLE reprints (
    id              TEXT PRIMARY KEY,
    application_id  TEXT NOT NULL REFERENCES applications (id),
    reason          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    old_blank_serial TEXT,
    revoked         BIGINT NOT NULL,
    requested_at    TEXT NOT NULL
);
CREATE INDEX reprints_by_application ON reprints (application_id);
