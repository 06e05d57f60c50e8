-- The audit log under a separate schema owner (`cardpipe migrate` with [store] owner_url).
--
-- The services' role gets INSERT and SELECT on audit_log only. Appenders serialise on a
-- transaction-scoped advisory lock instead of updating a head row (which would need UPDATE),
-- so audit_head goes: the chain's end is vouched for by signed checkpoints in the object
-- store (cardpipe_pki::checkpoint), which whoever owns the database cannot forge.
DROP TABLE audit_head;

-- TRUNCATE fires no row trigger: refuse it with a statement trigger, so even the owner has to
-- drop a trigger first (and a signed checkpoint then shows the log ends too early).
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
