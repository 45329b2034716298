#!/usr/bin/env bash
# Splits, disables, rolls back and re-splits traffic between two versions of the model over and over while
# `ferroserve bench` streams requests through a real `ferroserve serve`, then prints the bench's failed
# count, how many policy changes happened during the load, and how long each `models disable` took to
# return (the policy applies when the call returns; this includes starting the CLI process).
#
#   scripts/version-swap-load.sh           # env: CONCURRENCY (8), REQUESTS (96), OUT (a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CONCURRENCY=${CONCURRENCY:-8}
REQUESTS=${REQUESTS:-96}
OUT=${OUT:-$(mktemp -d /tmp/ferroserve-version-swap.XXXXXX)}
BIN=target/release/ferroserve
ADDR=127.0.0.1:50072
cargo build --release -q -p ferroserve

"$BIN" model derive --to q8_0 --output "$OUT/q8_0.gguf" >/dev/null
"$BIN" serve --listen "$ADDR" --metrics-listen 127.0.0.1:9475 >"$OUT/serve.log" 2>&1 &
pids+=($!)
wait_for "$BIN" generate --addr "http://$ADDR" --max-tokens 1 "Hello"
models() { "$BIN" models --addr "http://$ADDR" --operator swap-script "$@"; }
models load q8_0 --path "$OUT/q8_0.gguf" >/dev/null
wait_for bash -c "'$BIN' models --addr http://$ADDR list | grep -q 'q8_0 .* ready'"
models split q4_1=50 q8_0=50 >/dev/null

"$BIN" bench --target "grpc://$ADDR" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
  --input-tokens 32 --max-tokens 32 --quiet --output "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 &
bench=$!
changes=0
: >"$OUT/disable-ms.txt"
while kill -0 "$bench" 2>/dev/null && [ "$changes" -lt 100000 ]; do
  start=$(date +%s%N)
  models disable q8_0 >/dev/null
  echo $(( ($(date +%s%N) - start) / 1000000 )) >>"$OUT/disable-ms.txt"
  models rollback >/dev/null
  models split q4_1=80 q8_0=20 >/dev/null
  models split q4_1=50 q8_0=50 >/dev/null
  changes=$((changes + 4))
done
wait "$bench"
head -1 "$OUT/bench.txt"
models list
models history | tail -4
python3 - "$OUT/bench.json" "$changes" "$OUT/disable-ms.txt" <<'PY'
import json, sys
level = json.load(open(sys.argv[1]))["levels"][0]
ms = sorted(int(x) for x in open(sys.argv[3]) if x.strip())
print(f"requests {level['completed']} completed, {level['failed']} failed; {sys.argv[2]} policy changes during "
      f"the load; `models disable` returned in {ms[len(ms)//2]} ms median, {ms[-1]} ms max ({len(ms)} times)")
PY
echo "files in $OUT"
