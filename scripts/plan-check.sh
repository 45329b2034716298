#!/usr/bin/env bash
# Checks `ferroserve plan` against reality. A closed-loop sweep of ONE worker behind a router calibrates
# the planner; it predicts the request rate TWO workers behind a router sustain within the SLO; then an
# open-loop (Poisson) rate sweep around that prediction measures it. Each worker gets one core of its own
# (taskset, one compute thread), so that two workers on this 2-core machine are two workers' worth; the
# router (its content filter off) and the load generator are not pinned.
#
# The measured rate is the highest rate at which TTFT p99 and TPOT p99 are both within the SLO,
# interpolated between the last level that met it and the first that did not.
#
#   scripts/plan-check.sh   # env: SLO_TTFT_MS (2000), SLO_TPOT_MS (150), INPUT (128), OUTPUT (64),
#                           #      SWEEP_REQUESTS (64), RATE_REQUESTS (120), OUT (bench-results/plan-check-...),
#                           #      RATE_FACTORS (rates as multiples of the prediction: 0.6,0.8,0.9,1,1.1,1.25),
#                           #      SWEEP_FROM (a sweep-1-worker.json to reuse instead of measuring again)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SLO_TTFT_MS=${SLO_TTFT_MS:-2000}
SLO_TPOT_MS=${SLO_TPOT_MS:-150}
INPUT=${INPUT:-128}
OUTPUT=${OUTPUT:-64}
SWEEP_REQUESTS=${SWEEP_REQUESTS:-64}
RATE_REQUESTS=${RATE_REQUESTS:-120}
OUT=${OUT:-bench-results/plan-check-$(date +%Y%m%d-%H%M%S)}
BIN=target/release/ferroserve
cargo build --release -q -p ferroserve
mkdir -p "$OUT"

cat >"$OUT/worker.toml" <<TOML
[worker]
metrics_listen = ""
[engine]
max_batch_seqs = 16
queue_capacity = 256
TOML
# The router runs beside the pinned workers here (on Kubernetes it has nodes of its own), so it must not take
# their CPU: no content filter (its embedding model would run on the workers' cores).
cat >"$OUT/router.toml" <<TOML
[server]
metrics_listen = ""
http_listen = ""
[filter]
enabled = false
[admission]
max_in_flight = 32
max_queued_requests = 1024
TOML
# The workload the planner sizes for: the bench's requests, at the SLO.
sed -e "s/^input_tokens = .*/input_tokens = { mean = $INPUT, cv = 0 }/" \
    -e "s/^output_tokens = .*/output_tokens = { mean = $OUTPUT, cv = 0 }/" \
    -e "s/^ttft_p99_ms = .*/ttft_p99_ms = $SLO_TTFT_MS/" \
    -e "s/^tpot_p99_ms = .*/tpot_p99_ms = $SLO_TPOT_MS/" \
    configs/plan/workload.toml >"$OUT/workload.toml"

worker() {  # worker CORE PORT
  RAYON_NUM_THREADS=1 taskset -c "$1" "$BIN" worker --config "$OUT/worker.toml" --listen "127.0.0.1:$2" \
    >"$OUT/worker-$2.log" 2>&1 &
  pids+=($!)
}
router() {  # router PORT WORKER_PORT...
  local port=$1; shift
  local args=()
  for w in "$@"; do args+=(--worker "http://127.0.0.1:$w"); done
  "$BIN" router --config "$OUT/router.toml" --listen "127.0.0.1:$port" "${args[@]}" >"$OUT/router-$port.log" 2>&1 &
  router_pid=$!
  pids+=($router_pid)
  wait_for "$BIN" generate --addr "http://127.0.0.1:$port" --max-tokens 1 "Hello"
}
bench() {  # bench PORT OUTPUT.json LOAD-FLAGS...
  local port=$1 file=$2; shift 2
  "$BIN" bench --target "grpc://127.0.0.1:$port" --input-tokens "$INPUT" --max-tokens "$OUTPUT" --ignore-eos \
    --temperature 0.8 --warmup 4 --seed 1 --quiet --slo "ttft=${SLO_TTFT_MS}ms,tpot=${SLO_TPOT_MS}ms" \
    --output "$OUT/$file" "$@" | tee "$OUT/${file%.json}.txt"
}

worker 0 50171
if [[ -n ${SWEEP_FROM:-} ]]; then
  echo "== one worker: the sweep of $SWEEP_FROM"
  cp "$SWEEP_FROM" "$OUT/sweep-1-worker.json"
else
  echo "== one worker (core 0) behind a router: concurrency sweep"
  router 50170 50171
  bench 50170 sweep-1-worker.json --concurrency 1,2,4,8,16 --requests "$SWEEP_REQUESTS"
  kill "$router_pid"
fi

echo "== the planner's prediction for two workers"
"$BIN" plan --bench "$OUT/sweep-1-worker.json" --workload "$OUT/workload.toml" --out "$OUT/plan" \
  --predict-workers 1 --predict-workers 2 | tee "$OUT/plan.txt"
predicted=$(sed -n 's/^prediction: 2 workers sustain \([0-9.]*\) req\/s.*/\1/p' "$OUT/plan.txt")

echo "== two workers (cores 0 and 1) behind a router: Poisson rates around $predicted req/s"
worker 1 50172
router 50173 50171 50172
RATE_FACTORS=${RATE_FACTORS:-0.6,0.8,0.9,1,1.1,1.25}
rates=$(python3 -c "print(','.join(f'{$predicted * f:.3f}' for f in ($RATE_FACTORS,)))")
bench 50173 rates-2-workers.json --rate "$rates" --requests "$RATE_REQUESTS"

python3 - "$OUT/rates-2-workers.json" "$predicted" "$SLO_TTFT_MS" "$SLO_TPOT_MS" <<'PY' | tee "$OUT/verdict.txt"
import json, sys
run = json.load(open(sys.argv[1]))
predicted, ttft_slo, tpot_slo = map(float, sys.argv[2:5])
# The rate each level actually offered (its seeded arrival times, scaled): what the prediction is about.
levels = sorted((l["achieved_rate"], l["ttft"]["p99"], l["tpot"]["p99"], l["level"]["rate"]) for l in run["levels"])
margin = lambda l: min(ttft_slo / l[1], tpot_slo / l[2]) - 1.0  # >= 0: within the SLO
for l in levels:
    print(f"offered {l[0]:.3f} req/s (target {l[3]:.3f}): TTFT p99 {l[1]:.0f} ms, TPOT p99 {l[2]:.1f} ms, "
          f"{'within' if margin(l) >= 0 else 'beyond'} the SLO")
within = [l for l in levels if margin(l) >= 0]
beyond = [l for l in levels if margin(l) < 0]
if not within or not beyond or max(within)[0] > min(beyond)[0]:
    lo = max(within)[0] if within else 0.0
    hi = min(beyond)[0] if beyond else float("inf")
    print(f"predicted {predicted:.3f} req/s; the SLO boundary is not bracketed once (last within {lo:.3f}, "
          f"first beyond {hi:.3f}): rerun with other RATE_FACTORS")
    sys.exit(1)
a, b = max(within), min(beyond)
# Linear in the margin between the last level within the SLO and the first beyond it.
measured = a[0] + margin(a) / (margin(a) - margin(b)) * (b[0] - a[0])
print(f"predicted {predicted:.3f} req/s, measured {measured:.3f} req/s: error {100 * (predicted / measured - 1):+.1f} %")
PY
