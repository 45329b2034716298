#!/usr/bin/env bash
# One router against three routers sharing Redis, in front of the same two real workers, under the same
# load: three `ferroserve bench` processes, each closed-loop at CONCURRENCY for REQUESTS requests. With one
# router all three aim at it; with three, each at its own replica (as a load balancer would spread them).
# Every request goes through the shared tenant limits (a key with generous limits), so the three-router
# run pays a Redis round trip per request. Prints summed throughput and the mean of the three TTFT
# percentiles for each run, and keeps the result files.
#
#   scripts/fleet-bench.sh      # env: CONCURRENCY (4), REQUESTS (48), MAX_TOKENS (32), OUT (a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CONCURRENCY=${CONCURRENCY:-4}
REQUESTS=${REQUESTS:-48}
MAX_TOKENS=${MAX_TOKENS:-32}
OUT=${OUT:-$(mktemp -d /tmp/ferroserve-fleet-bench.XXXXXX)}
BIN=target/release/ferroserve
cargo build --release -q -p ferroserve

redis-server --port 56379 --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
pids+=($!)
wait_for redis-cli -p 56379 ping
KEY=fleet-bench-key
cat >"$OUT/router.toml" <<TOML
[admission]
max_in_flight = 64
max_queued_requests = 256

[[auth.keys]]
tenant = "bench"
key_sha256 = "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"
requests_per_second = 10000.0
tokens_per_minute = 100000000.0
max_in_flight = 1000
TOML

for port in 50161 50162; do
  "$BIN" worker --listen 127.0.0.1:$port --metrics-listen "" >"$OUT/worker-$port.log" 2>&1 &
  pids+=($!)
done
router() {  # router PORT
  "$BIN" router --config "$OUT/router.toml" --listen 127.0.0.1:$1 --metrics-listen "" --http-listen "" \
    --worker http://127.0.0.1:50161 --worker http://127.0.0.1:50162 --redis-url redis://127.0.0.1:56379 \
    >"$OUT/router-$1.log" 2>&1 &
  pids+=($!)
  wait_for "$BIN" generate --addr "http://127.0.0.1:$1" --api-key "$KEY" --max-tokens 1 "Hello"
}
bench() {  # bench NAME PORT...: one load generator per port, all at once
  local name=$1; shift
  local i=0 waits=()
  for port in "$@"; do
    "$BIN" bench --target "grpc://127.0.0.1:$port" --api-key "$KEY" --concurrency "$CONCURRENCY" \
      --requests "$REQUESTS" --input-tokens 64 --max-tokens "$MAX_TOKENS" --ignore-eos --quiet \
      --output "$OUT/$name-$i.json" >"$OUT/$name-$i.txt" 2>&1 &
    waits+=($!)
    i=$((i + 1))
  done
  for w in "${waits[@]}"; do wait "$w"; done
}

router 50151
bench one-router 50151 50151 50151
router 50152
router 50153
bench three-routers 50151 50152 50153

python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
print("| routers | load generators | req/s (sum) | output tok/s (sum) | TTFT p50 ms (mean) | TTFT p99 ms (mean) | e2e p50 ms (mean) | failed |")
print("|---|---|---|---|---|---|---|---|")
for name, routers in [("one-router", 1), ("three-routers", 3)]:
    levels = [json.load(open(f))["levels"][0] for f in sorted(glob.glob(f"{out}/{name}-*.json"))]
    mean = lambda k, q: sum(l[k][q] for l in levels) / len(levels)
    print(f"| {routers} | {len(levels)} | {sum(l['request_throughput'] for l in levels):.2f} | "
          f"{sum(l['output_throughput'] for l in levels):.1f} | {mean('ttft', 'median'):.0f} | {mean('ttft', 'p99'):.0f} | "
          f"{mean('e2e', 'median'):.0f} | {sum(l['failed'] for l in levels)} |")
PY
echo "results in $OUT"
