-- The personal record of each application, sealed (envelope encryption, see
-- common/src/envelope.rs). Only keyed digests and non-identifying fields stay
-- in clear, for look-ups: tracking code, national-code digest, birth date,
-- pickup office.
CREATE TABLE applicant_records (
    application_id       TEXT PRIMARY KEY REFERENCES applications (id),
    tracking_code        TEXT NOT NULL UNIQUE,
    national_code_digest TEXT NOT NULL,
    birth_date           TEXT NOT NULL,
    pickup_office        TEXT NOT NULL,
    sealed_record        BLOB NOT NULL
);
CREATE INDEX applicant_records_by_national_code ON applicant_records (national_code_digest);
