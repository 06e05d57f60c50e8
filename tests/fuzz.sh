#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (the cargo-fuzz workspace fuzz/) for a bounded time.
#
#   tests/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    default: 60 s, every target
#
# Builds every target once (release, debug assertions and overflow checks on), then runs each
# for SECONDS_PER_TARGET. The seed corpus fuzz/corpus/<target>/ is read only; what libFuzzer
# learns goes to a scratch corpus under $CARDPIPE_FUZZ_WORK (kept between runs on the same
# machine, so longer runs build on shorter ones). Exits non-zero if any target crashed, timed
# out or ran out of memory, printing the input that did it and the command that replays it.
#
# Works on stable Rust: cargo-fuzz passes nightly-only flags (-Z), which RUSTC_BOOTSTRAP=1
# allows on a stable toolchain; libFuzzer itself is compiled by libfuzzer-sys with the
# system C++ compiler. No sanitizer (`--sanitizer none`): AddressSanitizer needs a nightly
# standard library, and the workspace forbids unsafe code outside the PC/SC module, so the
# targets look for panics (bounds, overflow, failed assertions, `expect`), hangs and memory
# blow-ups rather than memory corruption.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=${1:-60}
shift $(($# > 0 ? 1 : 0))
case $SECONDS_PER_TARGET in
  '' | *[!0-9]*) echo "usage: tests/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;;
esac

command -v cargo >/dev/null 2>&1 || . "$HOME/.cargo/env"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARDPIPE_FUZZ_TARGET_DIR:-/var/tmp/cardpipe/fuzz-target}
export CARGO_INCREMENTAL=0
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
WORK=${CARDPIPE_FUZZ_WORK:-/var/tmp/cardpipe/fuzz-work}
FLAGS=(--sanitizer none --release --debug-assertions)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

cd fuzz
if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list)
fi

echo "== building the fuzz targets (target dir $CARGO_TARGET_DIR)"
start=$(date +%s)
cargo fuzz build "${FLAGS[@]}"
echo "== built in $(($(date +%s) - start)) s"
BIN_DIR=$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release

failed=()
for t in "${TARGETS[@]}"; do
  if [ ! -d "corpus/$t" ]; then
    echo "unknown target $t (no fuzz/corpus/$t)" >&2
    exit 2
  fi
  scratch=$WORK/corpus/$t
  artifacts=$WORK/artifacts/$t
  log=$WORK/logs/$t.log
  mkdir -p "$scratch" "$artifacts" "$(dirname "$log")"
  before=$(find "$artifacts" -type f | wc -l)
  echo "== $t: ${SECONDS_PER_TARGET} s"
  rc=0
  # First corpus dir: the writable scratch copy; second: the repository's seeds (read only).
  "$BIN_DIR/$t" "$scratch" "corpus/$t" \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)' "$log" | tr '\n' ' ' || true
  grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true
  if [ "$rc" -ne 0 ] || [ "$(find "$artifacts" -type f | wc -l)" -gt "$before" ]; then
    failed+=("$t")
    echo "!! $t failed (exit $rc); the end of $log:"
    tail -n 40 "$log"
    crash=$(grep -Eo "Test unit written to [^ ]+" "$log" | tail -1 | sed 's/^Test unit written to //')
    if [ -n "$crash" ]; then
      echo "!! input: $crash"
      echo "!! replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${FLAGS[*]} $t $crash)"
      echo "!!     or: $BIN_DIR/$t $crash"
    fi
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]}"
  exit 1
fi
echo "fuzzing: ${#TARGETS[@]} targets, ${SECONDS_PER_TARGET} s each, no crash"
