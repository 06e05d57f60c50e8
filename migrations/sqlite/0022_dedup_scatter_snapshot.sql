-- The enrolment snapshot of a broker scatter (issue 16: dedup searches without the gallery
-- lock). The shards answering a scatter have seen every subject enrolled up to since_seq
-- (dedup_enrolled.seq); under the lock, the searching job compares only the subjects
-- enrolled after it. Stored with the scatter so that a second delivery of the same job
-- joins the open scatter with its snapshot instead of closing it under the first. A scatter
-- opened before this migration (NULL) is closed and started again.
ALTER TABLE dedup_scatters ADD COLUMN since_seq INTEGER;
