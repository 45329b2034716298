#!/usr/bin/env bash
# The HTTP door's own cost: one `ferroserve serve`, measured by `ferroserve bench` through its gRPC door
# and through its OpenAI HTTP door (/v1/completions, server-sent events) in the same run, at 1 and 16
# streams, twice in alternating order (gRPC, HTTP, HTTP, gRPC) so that drift over the run shows. Not run in
# CI: it is for people and for closing notes.
#
#   scripts/http-vs-grpc.sh                  # writes bench-results/http-vs-grpc-<time>/
#   OUT=/tmp/hg REQUESTS=16 scripts/http-vs-grpc.sh
#
# Environment: OUT, REQUESTS (measured requests per level, default 32), LEVELS (default 1,16),
# INPUT_TOKENS (default 128), MAX_TOKENS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/http-vs-grpc-$(date +%Y%m%d-%H%M%S)}"
requests="${REQUESTS:-32}"
levels="${LEVELS:-1,16}"
mkdir -p "$out"
cargo build --release -p ferroserve
ferroserve="$PWD/target/release/ferroserve"
source scripts/lib.sh

"$ferroserve" serve --listen 127.0.0.1:0 --metrics-listen "" --http-listen 127.0.0.1:0 > "$out/serve.log" 2>&1 &
pids+=($!)
wait_for grep -q "OpenAI API on" "$out/serve.log"
addr="$(grep -m1 -o 'serve listening on [0-9.:]*' "$out/serve.log" | awk '{print $4}')"
http="$(grep -m1 -o 'OpenAI API on http://[0-9.:]*' "$out/serve.log" | awk '{print $4}')"
wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"

bench() {
  "$ferroserve" bench --concurrency "$levels" --requests "$requests" --warmup 2 \
    --input-tokens "${INPUT_TOKENS:-128}" --max-tokens "${MAX_TOKENS:-64}" --ignore-eos --seed 7 --quiet "$@"
}
bench --target "grpc://$addr" --label grpc-1 --output "$out/grpc-1.json" | tee "$out/grpc-1.txt"
bench --target "$http/v1/completions" --label http-1 --output "$out/http-1.json" | tee "$out/http-1.txt"
bench --target "$http/v1/completions" --label http-2 --output "$out/http-2.json" | tee "$out/http-2.txt"
bench --target "grpc://$addr" --label grpc-2 --output "$out/grpc-2.json" | tee "$out/grpc-2.txt"

echo "==> HTTP / gRPC, first pair (gRPC ran first)"
"$ferroserve" bench compare "$out/grpc-1.json" "$out/http-1.json" | tee "$out/compare-1.txt"
echo "==> HTTP / gRPC, second pair (HTTP ran first)"
"$ferroserve" bench compare "$out/grpc-2.json" "$out/http-2.json" | tee "$out/compare-2.txt"
echo "==> results in $out"
