#!/usr/bin/env bash
# Installs what the test suite needs and is missing (Debian packages, the
# pinned S3 server), then starts PostgreSQL, RabbitMQ and the S3 server if they
# are not running. Idempotent; safe to run before every test run.
#
# Cache (outside the clone, reused across runs): $CARDPIPE_CACHE, default
# /var/tmp/cardpipe. Requires root for apt-get (as on the CI machine).
set -euo pipefail

CACHE=${CARDPIPE_CACHE:-/var/tmp/cardpipe}
S3S_VERSION=0.14.1
S3_PORT=${CARDPIPE_TEST_S3_PORT:-8014}
# A second S3 server with bucket versioning (s3s-fs has none): moto's server, pinned, for the
# test that deleting an object removes every version of it (personal data, wrapped keys).
MOTO_VERSION=5.1.22
S3_VERSIONED_PORT=${CARDPIPE_TEST_S3_VERSIONED_PORT:-8015}
mkdir -p "$CACHE"

log() { printf '[services] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
PACKAGES=(
  postgresql rabbitmq-server                      # store and broker
  pcscd libpcsclite1 pcsc-tools vsmartcard-vpcd opensc python3-pyscard  # encoders through real pcscd
  softhsm2 opensc-pkcs11                          # CA keys in a PKCS#11 token
  openssl                                         # interop checks (CLI)
  python3-venv                                    # moto (versioned S3 server) in a venv
  # No -dev package: building needs only Rust and a C compiler (+ perl, make for the
  # vendored OpenSSL); pcsc-lite is loaded at run time (workers/cardpipe/tests/fresh_machine.rs).
  prometheus                                      # promtool for alert rule tests
  chromium chromium-driver fonts-noto-core        # headless console tests (Persian glyphs)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- PostgreSQL --------------------------------------------------------------
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
# Drop databases left by earlier test runs (each test makes its own).
old_dbs=$(psql -h 127.0.0.1 -U postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'cardpipe_test_%'" 2>/dev/null || true)
for db in $old_dbs; do psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done

# --- RabbitMQ ----------------------------------------------------------------
# Every step is bounded: a broker that cannot start (a node whose application
# was stopped, data left broken by a full disk) must fail this script with the
# reason, never hang the test run.
# RabbitMQ counts sockets and queue files against its file-handle limit (from ulimit -n):
# at Debian's default 1024 it stops accepting connections once ~300 quorum queues exist,
# which one test run creates, and waits for queues to expire. Start it with more.
RABBIT_NOFILE=$(ulimit -Hn)
[[ "$RABBIT_NOFILE" == unlimited || "$RABBIT_NOFILE" -gt 65536 ]] && RABBIT_NOFILE=65536
rabbit_listening() { ss -ltn | grep -q ':5672 '; }
rabbit_server_detached() {
  # Debian's wrapper starts the server through `su rabbitmq`, whose PAM session applies
  # limits.conf: raise the rabbitmq user's limit there, and this shell's for the rest.
  local want
  want=$(printf 'rabbitmq soft nofile %s\nrabbitmq hard nofile %s' "$RABBIT_NOFILE" "$RABBIT_NOFILE")
  if [[ -d /etc/security/limits.d && "$(cat /etc/security/limits.d/rabbitmq.conf 2>/dev/null)" != "$want" ]]; then
    printf '%s\n' "$want" >/etc/security/limits.d/rabbitmq.conf 2>/dev/null || true
  fi
  ( ulimit -Hn "$RABBIT_NOFILE" 2>/dev/null || true
    ulimit -n "$RABBIT_NOFILE" 2>/dev/null || true
    timeout 60 rabbitmq-server -detached ) || true
}
rabbit_handle_limit() {
  timeout 30 rabbitmqctl -q eval 'file_handle_cache:info([total_limit]).' 2>/dev/null | tr -dc 0-9
}
rabbit_wait_port() { for _ in $(seq 1 "$1"); do rabbit_listening && return 0; sleep 1; done; return 1; }
rabbit_start() {
  if timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "RabbitMQ node is up but not listening: starting its application"
    timeout 180 rabbitmqctl -q start_app >/dev/null 2>&1 || true
  else
    log "starting RabbitMQ"
    rabbit_server_detached
  fi
  rabbit_wait_port 120
}
if ! rabbit_listening && ! rabbit_start; then
  log "RabbitMQ did not start; last lines of its log:"
  tail -n 20 /var/log/rabbitmq/*.log 2>/dev/null | sed 's/^/[services]   /' || true
  if [[ "${CI:-}" == "true" || "${CARDPIPE_TEST_RESET_BROKER:-}" == "1" ]]; then
    # The test machine's broker holds nothing but test queues: set its data
    # aside (kept, renamed) and start it fresh.
    log "resetting the test broker's data (moved to /var/lib/rabbitmq/mnesia.broken.*)"
    timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || pkill -f 'beam.smp.*rabbit' || true
    sleep 2
    mv /var/lib/rabbitmq/mnesia "/var/lib/rabbitmq/mnesia.broken.$(date +%s)" 2>/dev/null || true
    rabbit_server_detached
    rabbit_wait_port 120 || { log "RabbitMQ still not listening on :5672 - giving up"; exit 1; }
  else
    log "RabbitMQ is not listening on :5672 (set CARDPIPE_TEST_RESET_BROKER=1 to reset its data)"
    exit 1
  fi
fi
if ! timeout 180 rabbitmqctl -q await_startup --timeout 170 >/dev/null 2>&1; then
  log "RabbitMQ listens on :5672 but its application did not finish starting within 3 minutes"
  exit 1
fi
limit=$(rabbit_handle_limit)
if [[ -n "$limit" && $((limit + 1000)) -lt "$RABBIT_NOFILE" ]]; then
  log "RabbitMQ has only $limit file handles (ulimit -n); restarting it with ulimit -n $RABBIT_NOFILE"
  timeout 120 rabbitmqctl -q stop >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do rabbit_listening || break; sleep 1; done
  rabbit_server_detached
  rabbit_wait_port 120 || { log "RabbitMQ did not come back on :5672"; exit 1; }
  timeout 180 rabbitmqctl -q await_startup --timeout 170 >/dev/null 2>&1 ||
    { log "RabbitMQ did not finish starting"; exit 1; }
  log "RabbitMQ file handles: $(rabbit_handle_limit)"
fi
# A resource alarm (disk or memory) blocks every publisher: tests would hang.
if ! timeout 60 rabbitmq-diagnostics -q check_local_alarms >/dev/null 2>&1; then
  log "RabbitMQ has a resource alarm in effect (free disk or memory too low):"
  timeout 60 rabbitmq-diagnostics -q alarms 2>&1 | sed 's/^/[services]   /' || true
  df -h / | sed 's/^/[services]   /'
  exit 1
fi

# --- S3-compatible server (s3s-fs, pinned, cached outside the clone) ---------
S3S="$CACHE/s3s/bin/s3s-fs"
if [[ ! -x "$S3S" ]]; then
  log "building s3s-fs $S3S_VERSION into $CACHE/s3s (once, ~3 min)"
  cargo install "s3s-fs@$S3S_VERSION" --locked --features binary --root "$CACHE/s3s" --quiet
fi
if ! ss -ltn | grep -q ":$S3_PORT "; then
  log "starting s3s-fs on :$S3_PORT"
  mkdir -p "$CACHE/s3data"
  nohup "$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key AKIATEST --secret-key secrettest \
    "$CACHE/s3data" >"$CACHE/s3s-fs.log" 2>&1 &
  for _ in $(seq 1 30); do ss -ltn | grep -q ":$S3_PORT " && break; sleep 0.5; done
fi

# --- S3 with versioning (moto server, pinned, in a venv outside the clone) --
MOTO="$CACHE/moto-$MOTO_VERSION"
if [[ ! -x "$MOTO/bin/moto_server" ]]; then
  log "installing moto $MOTO_VERSION into $MOTO (once, ~1 min)"
  python3 -m venv "$MOTO"
  "$MOTO/bin/pip" install -q "moto[server]==$MOTO_VERSION"
fi
if ! ss -ltn | grep -q ":$S3_VERSIONED_PORT "; then
  log "starting moto (S3 with versioning) on :$S3_VERSIONED_PORT"
  nohup "$MOTO/bin/moto_server" -H 127.0.0.1 -p "$S3_VERSIONED_PORT" >"$CACHE/moto.log" 2>&1 &
  for _ in $(seq 1 60); do ss -ltn | grep -q ":$S3_VERSIONED_PORT " && break; sleep 0.5; done
fi
log "PostgreSQL, RabbitMQ, S3 and versioned S3 are up"
