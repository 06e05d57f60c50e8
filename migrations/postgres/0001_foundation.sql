-- cardpipe foundation schema (PostgreSQL). Timestamps are RFC 3339 UTC text of
-- fixed width (see common/src/clock.rs), so they sort as text and read the same
-- through sqlx's Any driver on PostgreSQL and SQLite.

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    client          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state           TEXT NOT NULL,
    priority        TEXT NOT NULL DEFAULT 'normal',
    release_at      TEXT,
    created_at      TEXT NOT NULL,
    UNIQUE (client, idempotency_key)
);

CREATE TABLE applications (
    id          TEXT PRIMARY KEY,
    registry_id TEXT NOT NULL UNIQUE,
    batch_id    TEXT REFERENCES batches (id),
    state       TEXT NOT NULL,
    priority    TEXT NOT NULL DEFAULT 'normal',
    version     BIGINT NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX applications_by_state ON applications (state, updated_at);
CREATE INDEX applications_by_batch ON applications (batch_id);

CREATE TABLE application_history (
    id             BIGSERIAL PRIMARY KEY,
    application_id TEXT NOT NULL REFERENCES applications (id),
    from_state     TEXT,
    to_state       TEXT NOT NULL,
    stage          TEXT NOT NULL,
    attempt        BIGINT NOT NULL,
    actor          TEXT NOT NULL,
    reason         TEXT,
    at             TEXT NOT NULL
);
CREATE INDEX application_history_by_application ON application_history (application_id, id);

CREATE TABLE artifacts (
    application_id TEXT NOT NULL REFERENCES applications (id),
    kind           TEXT NOT NULL,
    object_key     TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (application_id, kind)
);

CREATE TABLE outbox (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    available_at TEXT NOT NULL,
    published_at TEXT,
    attempts     BIGINT NOT NULL DEFAULT 0,
    last_error   TEXT,
    claimed_by   TEXT,
    claimed_until TEXT
);
CREATE INDEX outbox_pending ON outbox (available_at) WHERE published_at IS NULL;
CREATE INDEX outbox_pending_by_subject ON outbox (subject, topic, seq) WHERE published_at IS NULL;

CREATE TABLE parked_jobs (
    job_id    TEXT PRIMARY KEY,
    stage     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    attempt   BIGINT NOT NULL,
    error     TEXT NOT NULL,
    parked_at TEXT NOT NULL
);
CREATE INDEX parked_jobs_by_stage ON parked_jobs (stage, parked_at);

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE scheduled_runs (
    name       TEXT NOT NULL,
    period     TEXT NOT NULL,
    holder     TEXT NOT NULL,
    ran_at     TEXT NOT NULL,
    PRIMARY KEY (name, period)
);
