-- Chip personalization (workers/personalize/src/stage.rs): one row per blank card body fed to
-- an encoder for an application.
--
-- state: in_progress (recorded BEFORE anything is written to the blank), personalized (set in
-- the stage's completion transaction), spoiled (recorded at once in its own transaction, with
-- spoil_reason: the card fault, "interrupted" for a blank found in progress on redelivery,
-- "encoder: ..." when the encoder failed mid-card, "qc_failed" when QC sent it back).
-- Later stages may add states (e.g. destroyed).
--
-- The partial unique index is the "no second card for one application unless the first was
-- recorded as spoiled" rule: at most one blank per application in progress or personalized.
CREATE TABLE cards (
    blank_serial    TEXT PRIMARY KEY,
    chip_serial     TEXT,
    application_id  TEXT NOT NULL REFERENCES applications (id),
    encoder         TEXT NOT NULL,
    state           TEXT NOT NULL,
    spoil_reason    TEXT,
    attempt         INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX cards_by_application ON cards (application_id);
CREATE INDEX cards_by_chip ON cards (chip_serial);
CREATE UNIQUE INDEX cards_one_live_card ON cards (application_id)
    WHERE state IN ('in_progress', 'personalized');
