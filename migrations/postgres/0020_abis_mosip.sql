-- The MOSIP ABIS API (workers/dedup/src/mosip/): a gallery of MOSIP's reference ids, apart
-- from the pipeline's own (dedup_enrolled).
--
-- abis_references: every inserted reference id with its ISO/IEC 19794-2 records (taken from
-- the CBEFF document behind the insert's referenceURL) sealed under the envelope keys
-- (context "abis-templates:<reference id>"). `cardpipe abis serve` loads its gallery from
-- here at start; the row is written before the insert is answered.
CREATE TABLE abis_references (
    reference_id      TEXT PRIMARY KEY,
    sealed_templates  BYTEA NOT NULL,
    inserted_at       TEXT NOT NULL
);

-- abis_requests: the answer given to each request id (insert, identify, delete; not the
-- transient failures), so a redelivered message gets the same answer and a request id used
-- again for another operation or reference id is refused. Written in the transaction of
-- the change it answers.
CREATE TABLE abis_requests (
    request_id    TEXT PRIMARY KEY,
    operation     TEXT NOT NULL,
    reference_id  TEXT NOT NULL,
    response      TEXT NOT NULL,
    answered_at   TEXT NOT NULL
);
CREATE INDEX abis_requests_answered_at ON abis_requests (answered_at);
