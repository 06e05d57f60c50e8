-- Per-application lookups that scanned a whole table (issue 16: cost per application flat
-- in the size of the night and of the store).
--
-- certificates by credentials_key: personalization checks the certificates of the package it
-- writes (cardpipe_pki::store::package_serials) and, for on-card keys, revokes those of an
-- unwritten blank (revoke_unwritten) — once per application, over every certificate ever
-- issued without this index.
CREATE INDEX certificates_by_credentials_key ON certificates (credentials_key);
-- parked_jobs by subject: whether an application has a parked job (recovery at start, the
-- console's and the demo's parked counts per batch) looked through every parked job.
CREATE INDEX parked_jobs_by_subject ON parked_jobs (subject, stage);
