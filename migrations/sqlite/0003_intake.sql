-- Intake (registry interface): batch progress and reports, per-record outcomes,
-- overcharge flags. Batches themselves exist since 0001 (client, idempotency key,
-- state, priority, release_at). Batch states: receiving -> received -> scheduled
-- -> released, or cancelled.

ALTER TABLE batches ADD COLUMN total_records INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN accepted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN rejected INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN received_at TEXT;
ALTER TABLE batches ADD COLUMN released_at TEXT;
ALTER TABLE batches ADD COLUMN updated_at TEXT;
CREATE INDEX batches_due ON batches (state, release_at);

-- One row per NDJSON line: accepted (with the application it created) or
-- rejected (errors: JSON list of {field, reason}; never values). flags: JSON
-- list of {flag, field, reason}.
CREATE TABLE batch_records (
    batch_id       TEXT NOT NULL REFERENCES batches (id),
    line           INTEGER NOT NULL,
    registry_id    TEXT,
    application_id TEXT,
    outcome        TEXT NOT NULL,
    errors         TEXT NOT NULL DEFAULT '[]',
    flags          TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_records_by_outcome ON batch_records (batch_id, outcome, line);

-- Rules an accepted application broke that operators must see (overcharged fees).
CREATE TABLE intake_flags (
    application_id TEXT NOT NULL REFERENCES applications (id),
    flag           TEXT NOT NULL,
    field          TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (application_id, flag, field)
);
CREATE INDEX intake_flags_by_flag ON intake_flags (flag, created_at);
