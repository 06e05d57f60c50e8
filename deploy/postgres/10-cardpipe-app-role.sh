#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
# `cardpipe` (POSTGRES_USER) owns the database and its schema; only the `migrate` job logs in
# as it. The services log in as `cardpipe_app`, which `cardpipe migrate` grants rights on the
# tables to: INSERT and SELECT only on the audit log (no UPDATE, DELETE, TRUNCATE; not being
# the owner, it cannot drop the audit triggers).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v app_password="$POSTGRES_APP_PASSWORD" <<'SQL'
CREATE ROLE cardpipe_app LOGIN PASSWORD :'app_password';
GRANT CONNECT ON DATABASE cardpipe TO cardpipe_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
