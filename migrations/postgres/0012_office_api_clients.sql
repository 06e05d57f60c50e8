-- Office API authentication and discrepancy resolution (issue 8 follow-up).
--
-- delivery_api_clients: clients of the office-facing delivery API (workers/delivery/src/clients.rs).
-- A client is bound to one pickup office (office_code) or is centre-wide (office_code NULL).
-- Only the hex SHA-256 of the bearer token is stored (the token is printed once by
-- `cardpipe offices clients add`); revoked clients keep their row for the audit trail.
CREATE TABLE delivery_api_clients (
    name          TEXT PRIMARY KEY,
    office_code   TEXT REFERENCES delivery_offices (code),
    token_sha256  TEXT NOT NULL UNIQUE,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    revoked_by    TEXT,
    revoked_at    TEXT
);

-- How an office discrepancy was resolved (workers/delivery/src/discrepancies.rs):
-- missing → found | lost (reprint_id: the lost-in-transit reprint), extra → returned.
-- resolved_at (0009) is set together with these.
ALTER TABLE delivery_discrepancies ADD COLUMN resolution TEXT;
ALTER TABLE delivery_discrepancies ADD COLUMN resolved_by TEXT;
ALTER TABLE delivery_discrepancies ADD COLUMN resolution_note TEXT;
ALTER TABLE delivery_discrepancies ADD COLUMN reprint_id TEXT;
CREATE INDEX delivery_discrepancies_open ON delivery_discrepancies (resolved_at);
