-- Wake the searching dedup worker when a shard answers (workers/dedup/src/distributed.rs).
--
-- PostgreSQL gets a NOTIFY trigger on dedup_shard_answers in this migration. SQLite has no
-- cross-process notification: embedded deployments rely on the in-process wake-up the shard
-- stage gives when its answer is written, plus the slow fallback poll. Nothing to change in
-- the schema; this file keeps the migration numbers of both backends aligned.
SELECT 1;
