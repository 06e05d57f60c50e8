-- Versioned lookup-digest keys (issue 14): the id of the key each national-code digest was
-- made with ('' = before this migration: the key derived from the master key of the time).
-- The re-digester moves rows to the current key in the background; lookups search every
-- known key meanwhile.
ALTER TABLE applicant_records ADD COLUMN lookup_key_id TEXT NOT NULL DEFAULT '';
CREATE INDEX applicant_records_lookup_key ON applicant_records (lookup_key_id);
