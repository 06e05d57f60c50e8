-- Dedup scatter-gather over the broker (workers/dedup/src/distributed.rs).
--
-- dedup_gallery_lock: one row; serialises "search + enrol" across every dedup worker so two
-- enrolments of one person handled at once by different processes cannot both come out
-- clear. holder is the application id being decided (NULL = free); since_ms (Unix ms, from
-- the service clock) lets a holder that crashed be taken over after the lease. Released in
-- the transaction that commits the decision (with the enrolment row).
CREATE TABLE dedup_gallery_lock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    holder    TEXT,
    since_ms  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO dedup_gallery_lock (id, holder, since_ms) VALUES (1, NULL, 0);

-- dedup_scatters: the open (finished_at NULL) or last broker scatter of an application.
-- scatter_id changes when a timed-out scatter is started again, so late answers of the old
-- one are never gathered.
CREATE TABLE dedup_scatters (
    application_id  TEXT PRIMARY KEY REFERENCES applications (id),
    scatter_id      TEXT NOT NULL UNIQUE,
    shards          INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    finished_at     TEXT
);

-- dedup_shard_answers: one shard's answer to a scatter: its size and its best candidates
-- without a score threshold (JSON list of {id, score, fmr, fingers}); ids and scores only,
-- no personal data. The primary key makes a redelivered shard job a no-op.
CREATE TABLE dedup_shard_answers (
    scatter_id   TEXT NOT NULL,
    shard        INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    candidates   TEXT NOT NULL,
    answered_at  TEXT NOT NULL,
    PRIMARY KEY (scatter_id, shard)
);
