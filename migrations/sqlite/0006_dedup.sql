-- Biometric deduplication (workers/dedup/src/stage.rs, src/adjudication.rs).
--
-- dedup_enrolled: every application enrolled in the ABIS gallery (no hit at dedup, or
-- cleared by an operator), with its ISO 19794-2 templates sealed under the envelope keys
-- (context "dedup-templates:<id>"). Workers load the gallery from here at start (one row
-- per subject, no object-store round trips) and follow new rows by seq. Written in the same
-- transaction as the state change; the unique application id keeps enrolment single.
CREATE TABLE dedup_enrolled (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id    TEXT NOT NULL UNIQUE REFERENCES applications (id),
    sealed_templates  BLOB NOT NULL,
    enrolled_at       TEXT NOT NULL
);

-- dedup_candidates: the candidate list of a possible duplicate (rank 1 = best), written with
-- the dedup_pending -> possible_duplicate transition, so a redelivered job cannot create a
-- second set. finger_scores is a JSON array of ten (null or score) by finger position.
CREATE TABLE dedup_candidates (
    application_id  TEXT NOT NULL REFERENCES applications (id),
    rank            INTEGER NOT NULL,
    candidate_id    TEXT NOT NULL,
    score           REAL NOT NULL,
    fmr             REAL NOT NULL,
    finger_scores   TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (application_id, rank)
);
