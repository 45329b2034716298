#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a set time and prints, per target, the executions,
# the coverage libFuzzer reports (edges `cov` and features `ft`), the corpus size and any crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      # default 60
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The machines here have only the stable toolchain, so it
# runs with RUSTC_BOOTSTRAP=1 (libFuzzer's sanitizer flags are nightly-only). A crash leaves its input in
# fuzz/artifacts/<target>/; once fixed, copy it to fuzz/regressions/<target>/, where the target's proptest
# mirror (`fuzz_mirror.rs` in the crate's tests) replays it on every `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
export RUSTC_BOOTSTRAP=1

# Seeds: the shipped configs, the filter's labelled prompts, and a tiny valid GGUF (written by an ignored
# test of the GGUF mirror, so that the fuzzer starts from a file that loads).
mkdir -p fuzz/corpus/{config,normalize_rules,gguf,stop_matcher}
cp configs/*.toml configs/filters/*.toml fuzz/corpus/config/ 2>/dev/null || true
if [[ -f tests/data/filter-eval-dev.jsonl ]]; then
  split -l 1 -d tests/data/filter-eval-dev.jsonl fuzz/corpus/normalize_rules/dev- 2>/dev/null || true
fi
printf '\x02END\x01\n\nUser:\x01Paris is\x01 the capital.\x01\nEN\x01D' > fuzz/corpus/stop_matcher/seed
FERROSERVE_FUZZ_SEED="$PWD/fuzz/corpus/gguf/seed.gguf" \
  cargo test -q -p ferroserve-model --test fuzz_mirror -- --ignored write_the_gguf_seed >/dev/null

cd fuzz
cargo fuzz build
summary=()
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  log="artifacts/$t.log"
  mkdir -p artifacts
  echo "== $t ($secs s)"
  status=ok
  if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=3072 -max_len=65536 \
      -print_final_stats=1 >"$log" 2>&1; then
    status="CRASH (see $log and fuzz/artifacts/$t/)"
  fi
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
  corp=$(find "corpus/$t" -type f | wc -l)
  line="$t: ${execs:-?} executions, cov ${cov:-?}, ft ${ft:-?}, corpus $corp, $status"
  echo "$line"
  summary+=("$line")
done
echo
echo "== summary (${secs} s per target)"
printf '%s\n' "${summary[@]}"
