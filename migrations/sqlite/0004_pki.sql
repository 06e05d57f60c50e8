-- PKI state of the keys stage (workers/keys/src/store.rs).
--
-- ca_hierarchy: every version of the CA hierarchy (root, issuing CA, current and retired
-- Document Signers; certificates and keystore labels only, never a private key). The highest
-- version is current; a Document Signer rotation inserts version n+1, and the primary key
-- makes that happen once however many replicas try.
CREATE TABLE ca_hierarchy (
    version    INTEGER PRIMARY KEY,
    hierarchy  TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- Every citizen certificate issued (serial is upper-case hex, unique per issuing CA).
CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    application_id    TEXT NOT NULL REFERENCES applications (id),
    key_role          TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    issued_at         TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'valid',
    revoked_at        TEXT,
    revocation_cause  TEXT,
    credentials_key   TEXT NOT NULL
);
CREATE INDEX certificates_by_application ON certificates (application_id);
CREATE INDEX certificates_revoked ON certificates (status) WHERE status = 'revoked';

-- One row per CRL published; the primary key keeps CRL numbers unique and the publisher
-- takes MAX(number) + 1 in the same transaction, so numbers strictly increase.
CREATE TABLE crl_state (
    number        INTEGER PRIMARY KEY,
    published_at  TEXT NOT NULL,
    next_update   TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    revoked_count INTEGER NOT NULL
);

-- EF.SOD documents signed per Document Signer key (drives rotation).
CREATE TABLE ds_usage (
    ds_label      TEXT PRIMARY KEY,
    documents     INTEGER NOT NULL,
    first_used_at TEXT NOT NULL,
    last_used_at  TEXT NOT NULL
);

-- Personalization packages (wrapped citizen keys) written to the object store, and when
-- they were crypto-shredded (after QC passed).
CREATE TABLE wrapped_key_custody (
    object_key     TEXT PRIMARY KEY,
    application_id TEXT NOT NULL REFERENCES applications (id),
    transport_key_id TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    destroyed_at   TEXT
);
CREATE INDEX wrapped_key_custody_by_application ON wrapped_key_custody (application_id);
