-- Operator console (workers/console): operators and their roles, console sessions, and the
-- operators' encoder service decisions.
--
-- operators: login, role (operator | supervisor | auditor), argon2id PHC password hash.
-- console_sessions: one row per signed-in browser; token_hash is SHA-256 of the cookie value
-- (the token itself is never stored), csrf the per-session form token.
-- encoder_service: the last in/out-of-service decision per encoder, which every process
-- driving that encoder applies to its farm.
CREATE TABLE operators (
    login               TEXT PRIMARY KEY,
    role                TEXT NOT NULL CHECK (role IN ('operator', 'supervisor', 'auditor')),
    password_hash       TEXT NOT NULL,
    disabled            BIGINT NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL,
    password_changed_at TEXT NOT NULL
);

CREATE TABLE console_sessions (
    token_hash  TEXT PRIMARY KEY,
    login       TEXT NOT NULL REFERENCES operators (login),
    csrf        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);

CREATE TABLE encoder_service (
    encoder     TEXT PRIMARY KEY,
    in_service  BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    changed_by  TEXT NOT NULL,
    changed_at  TEXT NOT NULL
);
