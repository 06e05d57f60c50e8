-- What body an Idempotency-Key stands for: a SHA-256 over the batch's lines 1..body_lines
-- (each line's bytes and a newline; an over-long line as a fixed marker), updated with every
-- committed chunk and at the end. A later submission under the same key must carry the same
-- lines, or it is refused (422) naming the earlier batch. body_truncated = 1: the batch was
-- closed at a bound of [registry.intake] after body_lines lines, so the same body resent is
-- longer and only its first body_lines lines must match.
ALTER TABLE batches ADD COLUMN body_lines BIGINT;
ALTER TABLE batches ADD COLUMN body_sha256 TEXT;
ALTER TABLE batches ADD COLUMN body_truncated BIGINT NOT NULL DEFAULT 0;
