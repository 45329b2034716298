#!/usr/bin/env bash
# Peak resident memory of one `ferroserve worker` process under load: 16 concurrent streams of 256 prompt
# tokens and 256 generated tokens (16 sequences of 512 tokens in the KV cache, the default kv_budget_tokens),
# through `ferroserve router` on 127.0.0.1. Not run in CI: it is for people and for closing notes.
#
#   scripts/worker-rss.sh                    # STREAMS, INPUT_TOKENS, MAX_TOKENS override the shape
set -euo pipefail
cd "$(dirname "$0")/.."

streams="${STREAMS:-16}"
input_tokens="${INPUT_TOKENS:-256}"
max_tokens="${MAX_TOKENS:-256}"
out="$(mktemp -d)"
cargo build --release -p ferroserve
ferroserve="$PWD/target/release/ferroserve"

source scripts/lib.sh
kib() { awk "/^$1/ {print \$2}" "/proc/$2/status"; }

"$ferroserve" worker --listen 127.0.0.1:0 --metrics-listen "" > "$out/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
wait_for grep -q "worker listening on" "$out/worker.log"
waddr="$(grep -m1 -o 'worker listening on [0-9.:]*' "$out/worker.log" | awk '{print $4}')"
"$ferroserve" router --listen 127.0.0.1:0 --metrics-listen "" --allow-unauthenticated --worker "http://$waddr" \
  > "$out/router.log" 2>&1 &
pids+=($!)
wait_for grep -q "listening on" "$out/router.log"
raddr="$(grep -m1 -o 'listening on [0-9.:]*' "$out/router.log" | awk '{print $3}')"
wait_for "$ferroserve" generate --addr "http://$raddr" --max-tokens 1 "ready?"
echo "worker RSS idle, model loaded: $(( $(kib VmRSS "$worker") / 1024 )) MiB"
"$ferroserve" bench --target "grpc://$raddr" --concurrency "$streams" --requests "$streams" --warmup 0 \
  --input-tokens "$input_tokens" --max-tokens "$max_tokens" --ignore-eos --quiet
echo "worker peak RSS, $streams streams of $input_tokens + $max_tokens tokens: $(( $(kib VmHWM "$worker") / 1024 )) MiB"
