#!/usr/bin/env bash
# Structured output's cost and effect, in one run on one `ferroserve serve` (content filter off):
#   1. `ferroserve bench` at each of LEVELS streams, every request free, then every request constrained by
#      the JSON schema in SCHEMA, over OpenAI's /v1/chat/completions, alternating ROUNDS times (this VM's
#      speed drifts by 10-20 % between minutes; the medians of the rounds are compared). The default
#      schema (benches/schemas/order-lines.json) asks for at least 200 order lines, so a constrained
#      stream never completes before max_tokens: both sides generate the same number of tokens;
#   2. the constraint metrics the server recorded (mask time per step, compile time cold and cached);
#   3. the share of outputs that parse as JSON, with and without `response_format`, on the same prompts.
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

bench() {
  "$ferroserve" bench --target "$http/v1/chat/completions" --concurrency "$1" --requests "$requests" \
    --warmup 2 --input-tokens 64 --max-tokens 128 --ignore-eos --seed 7 --quiet "${@:2}"
}
for round in $(seq "$rounds"); do
  for c in ${levels//,/ }; do
    echo "==> round $round, $c streams: free, then constrained by $schema"
    bench "$c" --label free --output "$out/free-c$c-r$round.json" | grep -E "^c=" || true
    bench "$c" --label json-schema --json-schema "$schema" --output "$out/schema-c$c-r$round.json" | grep -E "^c=" || true
  done
done
python3 - "$out" "$levels" "$rounds" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out, levels, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
def level(kind, c, r):
    return json.load(open(f"{out}/{kind}-c{c}-r{r}.json"))["levels"][0]
print("streams | out tok/s free / constrained (median of rounds) | ratio | ITL p50 free / constrained (ms) | ITL p99 free / constrained (ms) | output tokens free / constrained")
for c in levels:
    f = [level("free", c, r) for r in range(1, rounds + 1)]
    s = [level("schema", c, r) for r in range(1, rounds + 1)]
    m = lambda runs, get: statistics.median(get(x) for x in runs)
    tf, ts = m(f, lambda x: x["output_throughput"]), m(s, lambda x: x["output_throughput"])
    print(f"{c} | {tf:.1f} / {ts:.1f} | {ts / tf:.2f}x | {m(f, lambda x: x['itl']['median']):.2f} / "
          f"{m(s, lambda x: x['itl']['median']):.2f} | {m(f, lambda x: x['itl']['p99']):.1f} / "
          f"{m(s, lambda x: x['itl']['p99']):.1f} | {sum(x['output_tokens'] for x in f)} / {sum(x['output_tokens'] for x in s)}")
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
