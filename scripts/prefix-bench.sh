#!/usr/bin/env bash
# Prefix caching, block admission with preemption, and prefix-aware routing, measured in one run on this
# machine, each as a ratio against its baseline from the same run. Not run in CI: it is for people and for
# closing notes.
#
#   scripts/prefix-bench.sh                      # writes bench-results/prefix-<time>/
#   OLD_FERROSERVE=/path/to/old/ferroserve scripts/prefix-bench.sh
#
# 1. shared system prompt: a 1024-token system prompt shared by every request, plus a 16-token question,
#    16 output tokens, at 1 and 4 streams: Ferroserve with the prefix cache on, off, and llama-server
#    (its own per-slot prompt cache, `cache_prompt`, on as its users run it).
# 2. multi-turn: 16 conversations of 8 turns (TURNS), each turn resending the system prompt (256 tokens) and
#    the earlier turns (32-token questions, 64-token replies), 64 output tokens, 16 streams: the same three.
#    Ferroserve runs with its default KV pool (kv_budget_tokens in configs/ferroserve.toml).
# 3. two workers behind one router, 8 groups of prompts with a 256-token prefix each, 8 streams, each worker
#    with a 2048-token KV pool: prefix-aware routing against least-loaded. Hit rates from the router's and
#    the workers' /metrics.
# 4. long requests mixed in: 12 streams of 64 + 128 tokens, and beside them 4 streams asking for
#    max_tokens 2048: block admission against the old reservation of prompt + max_tokens (OLD_FERROSERVE, a
#    binary built before this change; skipped without it), both with an 8192-token KV budget, the old
#    default.
#
# PHASES (default "shared turns router mixed") picks what runs; the ratios are printed for what ran.
#
# Every request goes through OpenAI's chat API with server-sent events, so the protocol is not a variable.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/prefix-$(date +%Y%m%d-%H%M%S)}"
phases="${PHASES:-shared turns router mixed}"
turns_per_chat="${TURNS:-8}"
mkdir -p "$out"
llama_port=18081
llama_bin="$(scripts/build-llama-server.sh | tail -n 1)"
cargo build --release -p ferroserve
ferroserve="$PWD/target/release/ferroserve"
model="$("$ferroserve" fetch-model | sed -n 1p)"
source scripts/lib.sh

bench() {
  "$ferroserve" bench --chat --ignore-eos --warmup 0 --quiet "$@"
}

# A config on loopback ports with the content filter off (llama-server has none); $1 the file, then sed
# expressions.
config() {
  local file="$1"; shift
  sed -e 's/^listen = "127.0.0.1:50051"/listen = "127.0.0.1:0"/' \
      -e 's/^metrics_listen = "127.0.0.1:9464"/metrics_listen = "127.0.0.1:0"/' \
      -e 's/^http_listen = "127.0.0.1:8080"/http_listen = "127.0.0.1:0"/' \
      -e 's/^enabled = true/enabled = false/' "$@" configs/ferroserve.toml > "$file"
}

# Starts `$1 serve` with config $2, logging to $3; sets $http and $metrics.
start_serve() {
  "$1" serve --config "$2" --model-path "$model" > "$3" 2>&1 &
  pids+=($!)
  wait_for grep -q "serve listening on" "$3"
  local addr
  addr="$(grep -m1 -o 'serve listening on [0-9.:]*' "$3" | awk '{print $4}')"
  wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"
  http="$(grep -m1 -o 'OpenAI API on http://[0-9.:]*' "$3" | awk '{print $4}')"
  metrics="$(sed 's/\x1b\[[0-9;]*m//g' "$3" | grep -m1 -oE 'metrics on (http://)?[0-9.:]+' | awk '{print $3}' | sed 's#http://##')"
}

stop_last() {
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
}

# Sum of a metric's series (all labels, or those matching $2) on /metrics at $1.
metric() {
  curl -s "http://$1/metrics" | grep -E "^$2" | awk '{s += $2} END {print s + 0}'
}

start_llama() {
  # 16 slots; each gets ctx / 16 positions, enough for the longest prompt and its output.
  "$llama_bin/llama-server" -m "$model" --host 127.0.0.1 --port "$llama_port" --parallel 16 --cont-batching \
    -c 20480 > "$out/llama-server.log" 2>&1 &
  pids+=($!)
  wait_for curl -sf "http://127.0.0.1:$llama_port/health"
}

shared() {
  bench --target "$1/v1/chat/completions" --workload shared-prefix --prefix-tokens 1024 --groups 1 \
    --input-tokens 16 --max-tokens 16 --concurrency 1,4 --requests 16 --seed 11 --label "$2" \
    --output "$out/shared-$2.json" | tee "$out/shared-$2.txt"
}

turns() {
  bench --target "$1/v1/chat/completions" --workload multi-turn --conversations 16 --turns "$turns_per_chat" \
    --system-tokens 256 --input-tokens 32 --reply-tokens 64 --max-tokens 64 --concurrency 16 \
    --requests $(( 16 * turns_per_chat )) \
    --seed 12 --label "$2" --output "$out/turns-$2.json" | tee "$out/turns-$2.txt"
}

has() { [[ " $phases " == *" $1 "* ]]; }

for caching in on off; do
  has shared || has turns || break
  echo "==> ferroserve, prefix cache $caching"
  flag=true; [[ $caching == off ]] && flag=false
  config "$out/cache-$caching.toml" -e "s/^prefix_caching = true/prefix_caching = $flag/"
  start_serve "$ferroserve" "$out/cache-$caching.toml" "$out/ferroserve-cache-$caching.log"
  if has shared; then shared "$http" "ferroserve-cache-$caching"; fi
  if has turns; then turns "$http" "ferroserve-cache-$caching"; fi
  echo "prefix cache $caching: queries $(metric "$metrics" ferroserve_prefix_cache_queries_total) hits $(metric "$metrics" ferroserve_prefix_cache_hits_total) preemptions $(metric "$metrics" ferroserve_num_preemptions_total)" | tee -a "$out/counters.txt"
  stop_last
done

if has shared || has turns; then
  echo "==> llama-server (cache_prompt on, per slot)"
  start_llama
  if has shared; then shared "http://127.0.0.1:$llama_port" llama-server; fi
  if has turns; then turns "http://127.0.0.1:$llama_port" llama-server; fi
  stop_last
fi

config "$out/worker.toml" -e 's/^kv_budget_tokens = .*/kv_budget_tokens = 2048/'
for policy in prefix_aware least_loaded; do
  has router || break
  echo "==> two workers behind a router, $policy"
  urls=(); wmetrics=()
  for w in 1 2; do
    log="$out/worker-$policy-$w.log"
    "$ferroserve" worker --config "$out/worker.toml" --model-path "$model" --listen 127.0.0.1:0 \
      --metrics-listen 127.0.0.1:0 > "$log" 2>&1 &
    pids+=($!)
    wait_for grep -q "worker listening on" "$log"
    urls+=("http://$(grep -m1 -o 'worker listening on [0-9.:]*' "$log" | awk '{print $4}')")
    wait_for grep -qE 'metrics on' "$log"
    wmetrics+=("$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 -oE 'metrics on (http://)?[0-9.:]+' | awk '{print $3}' | sed 's#http://##')")
  done
  config "$out/router-$policy.toml" -e "s/^routing = \"prefix_aware\"/routing = \"$policy\"/"
  log="$out/router-$policy.log"
  "$ferroserve" router --config "$out/router-$policy.toml" --worker "${urls[0]}" --worker "${urls[1]}" > "$log" 2>&1 &
  pids+=($!)
  wait_for grep -q "router listening on" "$log"
  addr="$(grep -m1 -o 'router listening on [0-9.:]*' "$log" | awk '{print $4}')"
  wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"
  http="$(grep -m1 -o 'OpenAI API on http://[0-9.:]*' "$log" | awk '{print $4}')"
  rmetrics="$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 -oE 'metrics on (http://)?[0-9.:]+' | awk '{print $3}' | sed 's#http://##')"
  bench --target "$http/v1/chat/completions" --workload shared-prefix --prefix-tokens 256 --groups 8 \
    --input-tokens 16 --max-tokens 16 --concurrency 8 --requests 64 --seed 13 --label "router-$policy" \
    --output "$out/router-$policy.json" | tee "$out/router-$policy.txt"
  q=0; h=0
  for m in "${wmetrics[@]}"; do
    q=$(( q + $(metric "$m" ferroserve_prefix_cache_queries_total | cut -d. -f1) ))
    h=$(( h + $(metric "$m" ferroserve_prefix_cache_hits_total | cut -d. -f1) ))
  done
  echo "router $policy: routing hits $(metric "$rmetrics" 'ferroserve_prefix_routing_total\{outcome="hit"') of $(metric "$rmetrics" ferroserve_prefix_routing_total); workers' prefix cache hits $h of $q prompt tokens" | tee -a "$out/counters.txt"
  stop_last; stop_last; stop_last
done

if [[ -n "${OLD_FERROSERVE:-}" ]] && has mixed; then
  for build in blocks reservation; do
    bin="$ferroserve"; [[ $build == reservation ]] && bin="$OLD_FERROSERVE"
    echo "==> long requests mixed in: $build ($bin)"
    config "$out/mixed-$build.toml" -e 's/^kv_budget_tokens = .*/kv_budget_tokens = 8192/'
    # The old binary's config has no prefix-caching keys.
    [[ $build == reservation ]] && sed -i -e '/^prefix_caching/d' -e '/^prefix_cache_max_share/d' -e '/^routing =/d' -e '/^prefix_max_imbalance/d' "$out/mixed-$build.toml"
    start_serve "$bin" "$out/mixed-$build.toml" "$out/mixed-$build.log"
    # Sample the batch size once a second while the load runs.
    ( while true; do metric "$metrics" ferroserve_running_requests >> "$out/mixed-$build-running.txt"; sleep 1; done ) &
    sampler=$!
    "$ferroserve" bench --target "$http/v1/chat/completions" --chat --warmup 0 --quiet --input-tokens 64 \
      --max-tokens 2048 --concurrency 4 --duration 60 --seed 21 --label "long-$build" \
      --output "$out/mixed-long-$build.json" > "$out/mixed-long-$build.txt" &
    long=$!
    bench --target "$http/v1/chat/completions" --input-tokens 64 --max-tokens 128 --concurrency 12 \
      --duration 60 --seed 22 --label "short-$build" --output "$out/mixed-short-$build.json" | tee "$out/mixed-short-$build.txt"
    wait "$long" || true
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    echo "$build: running requests mean $(awk '{s+=$1; n++} END {printf "%.1f", s/n}' "$out/mixed-$build-running.txt") max $(sort -n "$out/mixed-$build-running.txt" | tail -n 1); preemptions $(metric "$metrics" ferroserve_num_preemptions_total)" | tee -a "$out/counters.txt"
    stop_last
  done
  "$ferroserve" bench compare "$out/mixed-short-reservation.json" "$out/mixed-short-blocks.json" | tee "$out/compare-mixed.txt"
fi

echo "==> ratios (b / a)"
for w in shared turns; do
  has "$w" || continue
  "$ferroserve" bench compare "$out/$w-ferroserve-cache-off.json" "$out/$w-ferroserve-cache-on.json" | tee "$out/compare-$w-cache.txt"
  "$ferroserve" bench compare "$out/$w-llama-server.json" "$out/$w-ferroserve-cache-on.json" | tee "$out/compare-$w-llama.txt"
done
if has router; then
  "$ferroserve" bench compare "$out/router-least_loaded.json" "$out/router-prefix_aware.json" | tee "$out/compare-router.txt"
fi
cat "$out/counters.txt"
echo "==> results in $out"
