-- Outbox dead letters (issue 15): a row whose delivery failed permanently (a sink said the
-- message can never be delivered, or it failed the configured number of times) is moved here
-- by the relay holding its claim, so it no longer blocks later rows of its subject. Operators
-- see it in the console and in `cardpipe ops dead-letters`, and a supervisor re-queues or
-- discards it (both audited).
CREATE TABLE outbox_dead_letters (
    seq          BIGINT PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    attempts     BIGINT NOT NULL,
    last_error   TEXT NOT NULL,
    dead_at      TEXT NOT NULL
);
CREATE INDEX outbox_dead_letters_by_topic ON outbox_dead_letters (topic, dead_at);
