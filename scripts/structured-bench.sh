#!/usr/bin/env bash
# Structured output's cost and effect, in one run on one `ferroserve serve` (content filter off):
#   1. `ferroserve bench` at each of LEVELS streams, every request free, then every request constrained by
#      the JSON schema in SCHEMA, over OpenAI's /v1/chat/completions, alternating ROUNDS times (this VM's
#      speed drifts by 10-20 % between minutes; the medians of the rounds are compared). The default
#      schema (benches/schemas/order-lines.json) asks for at least 200 order lines, so a constrained
#      stream never completes before max_tokens: both sides generate the same number of tokens;
#   2. the constraint metrics the server recorded (mask time per step, compile time cold and cached);
#   3. the share of outputs that parse as JSON, with and without `response_format`, on the same prompts;
#   4. with LLAMA=1, first the same rounds against llama.cpp's llama-server (scripts/build-llama-server.sh,
#      built for this host; --parallel 16), whose `response_format` JSON-schema mode turns the schema into a
#      GBNF grammar.
# Prefix caching is off, so that the second run does not find the first one's prompts cached.
# Not run in CI: it is for people and for closing notes.
#
#   scripts/structured-bench.sh                  # writes bench-results/structured-<time>/
#   OUT=/tmp/sb REQUESTS=16 LEVELS=1,16 scripts/structured-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/structured-$(date +%Y%m%d-%H%M%S)}"
requests="${REQUESTS:-32}"
levels="${LEVELS:-1,16}"
schema="${SCHEMA:-benches/schemas/order-lines.json}"
rounds="${ROUNDS:-3}"
mkdir -p "$out"
cargo build --release -p ferroserve
ferroserve="$PWD/target/release/ferroserve"
model="$("$ferroserve" fetch-model | sed -n 1p)"
source scripts/lib.sh

bench() {
  "$ferroserve" bench --target "$1/v1/chat/completions" --concurrency "$2" --requests "$requests" \
    --warmup 2 --input-tokens 64 --max-tokens 128 --ignore-eos --seed 7 --quiet "${@:3}"
}
# Rounds of free and constrained runs against one server: $1 its label, $2 its base URL.
rounds_against() {
  for round in $(seq "$rounds"); do
    for c in ${levels//,/ }; do
      echo "==> $1, round $round, $c streams: free, then constrained by $schema"
      bench "$2" "$c" --label "$1-free" --output "$out/$1-free-c$c-r$round.json" | grep -E "^c=" || true
      bench "$2" "$c" --label "$1-json-schema" --json-schema "$schema" \
        --output "$out/$1-schema-c$c-r$round.json" | grep -E "^c=" || true
    done
  done
}

labels=ferroserve
if [[ "${LLAMA:-0}" == 1 ]]; then
  llama_bin="$(scripts/build-llama-server.sh | tail -n 1)"
  "$llama_bin/llama-server" -m "$model" --host 127.0.0.1 --port 18080 --parallel 16 --cont-batching \
    -c $(( 16 * 256 )) > "$out/llama-server.log" 2>&1 &
  pids+=($!)
  wait_for curl -sf "http://127.0.0.1:18080/health"
  rounds_against llama-server "http://127.0.0.1:18080"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
  labels="llama-server,ferroserve"
fi

config="$out/ferroserve.toml"
sed -e 's/^listen = "127.0.0.1:50051"/listen = "127.0.0.1:0"/' \
    -e 's/^metrics_listen = "127.0.0.1:9464"/metrics_listen = "127.0.0.1:19464"/' \
    -e 's/^http_listen = "127.0.0.1:8080"/http_listen = "127.0.0.1:0"/' \
    -e 's/^enabled = true/enabled = false/' \
    -e 's/^prefix_caching = true/prefix_caching = false/' \
    configs/ferroserve.toml > "$config"
"$ferroserve" serve --config "$config" --model-path "$model" > "$out/ferroserve.log" 2>&1 &
pids+=($!)
wait_for grep -q "serve listening on" "$out/ferroserve.log"
addr="$(grep -m1 -o 'serve listening on [0-9.:]*' "$out/ferroserve.log" | awk '{print $4}')"
wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"
http="$(grep -m1 -o 'OpenAI API on http://[0-9.:]*' "$out/ferroserve.log" | awk '{print $4}')"
metrics="http://127.0.0.1:19464"
rounds_against ferroserve "$http"
python3 - "$out" "$levels" "$rounds" "$labels" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out, levels, rounds, labels = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4].split(",")
def runs(label, kind, c):
    return [json.load(open(f"{out}/{label}-{kind}-c{c}-r{r}.json"))["levels"][0] for r in range(1, rounds + 1)]
med = lambda rs, get: statistics.median(get(x) for x in rs)
tput = lambda x: x["output_throughput"]
print("server | streams | out tok/s free / constrained (median of rounds) | ratio | ITL p50 free / constrained (ms)"
      " | ITL p99 free / constrained (ms) | output tokens free / constrained")
for label in labels:
    for c in levels:
        f, s = runs(label, "free", c), runs(label, "schema", c)
        tf, ts = med(f, tput), med(s, tput)
        print(f"{label} | {c} | {tf:.1f} / {ts:.1f} | {ts / tf:.2f}x | {med(f, lambda x: x['itl']['median']):.2f} / "
              f"{med(s, lambda x: x['itl']['median']):.2f} | {med(f, lambda x: x['itl']['p99']):.1f} / "
              f"{med(s, lambda x: x['itl']['p99']):.1f} | {sum(x['output_tokens'] for x in f)} / "
              f"{sum(x['output_tokens'] for x in s)}")
if "llama-server" in labels:
    print("constrained, ferroserve / llama-server:")
    for c in levels:
        a, b = runs("llama-server", "schema", c), runs("ferroserve", "schema", c)
        print(f"  {c} streams: out tok/s {med(b, tput) / med(a, tput):.2f}x, ITL p50 "
              f"{med(b, lambda x: x['itl']['median']) / med(a, lambda x: x['itl']['median']):.2f}x")
PY

echo "==> constraint metrics"
curl -sf "$metrics/metrics" | grep -E '^ferroserve_(constraint_|constrained_)' | tee "$out/metrics.txt" || true

echo "==> valid JSON with and without response_format"
python3 - "$http" <<'PY' | tee "$out/valid-json.txt"
import json, sys, urllib.request
base = sys.argv[1]
asks = ["a person with a name and an age", "a book with a title, an author and a year", "a city and its country",
        "three colours in a list", "a product with a price", "the weather: temperature and sky", "a car: make, model, year",
        "a movie with its director", "a recipe with two ingredients", "a user with an email address"]
def run(fmt):
    good = 0
    for a in asks:
        body = {"messages": [{"role": "user", "content": f"Reply with only a JSON object describing {a}."}],
                "max_tokens": 96, "temperature": 0}
        if fmt:
            body["response_format"] = {"type": "json_object"}
        req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        text = json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"]
        try:
            json.loads(text)
            good += 1
        except ValueError:
            pass
    return good
free, constrained = run(False), run(True)
print(f"valid JSON without response_format: {free}/{len(asks)}; with json_object: {constrained}/{len(asks)}")
PY
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
echo "==> results in $out"
