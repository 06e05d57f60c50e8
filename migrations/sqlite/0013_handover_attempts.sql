-- Fingerprint attempts at handover (issue 15): per card and Tehran day, the attempts
-- reserved before each 1:1 check. A card whose attempts of the day are used up is refused
-- until a centre supervisor unlocks it (which deletes the day's row, audited).
CREATE TABLE delivery_handover_attempts (
    application_id TEXT NOT NULL,
    day            TEXT NOT NULL,
    attempts       INTEGER NOT NULL,
    PRIMARY KEY (application_id, day)
);
