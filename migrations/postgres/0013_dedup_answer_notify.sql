-- Wake the searching dedup worker when a shard answers (workers/dedup/src/distributed.rs).
--
-- Every row inserted into dedup_shard_answers sends NOTIFY on channel
-- cardpipe_dedup_answers with the scatter id as payload (ids only, no personal data).
-- PostgreSQL delivers it when the shard's transaction commits, so the waiting worker reads
-- the answer as soon as it is visible instead of polling the table. A redelivered shard job
-- inserts nothing (ON CONFLICT DO NOTHING) and so notifies nobody. The waiting side keeps
-- a slow poll as a safety net (listener reconnecting, notification lost).
CREATE FUNCTION dedup_shard_answer_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cardpipe_dedup_answers', NEW.scatter_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER dedup_shard_answers_notify AFTER INSERT ON dedup_shard_answers
    FOR EACH ROW EXECUTE FUNCTION dedup_shard_answer_notify();
