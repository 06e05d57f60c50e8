-- PostgreSQL's 0018 gives the audit log a separate owner and a TRUNCATE trigger. SQLite has
-- neither roles nor TRUNCATE; it keeps audit_head as its append lock. Kept so both backends
-- number their migrations alike.
SELECT 1;
