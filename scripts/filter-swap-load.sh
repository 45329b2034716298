#!/usr/bin/env bash
# Swaps the enforcing content filter over and over while `ferroserve bench` streams the labeled dev prompts
# through a real `ferroserve serve` (real model, MiniLM filter), then prints the bench's failed count and
# how many swaps happened during the load. Blocked prompts end as FILTERED completions, not failures.
#
#   scripts/filter-swap-load.sh            # env: CONCURRENCY (8), REQUESTS (64), OUT (a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CONCURRENCY=${CONCURRENCY:-8}
REQUESTS=${REQUESTS:-64}
OUT=${OUT:-$(mktemp -d /tmp/ferroserve-filter-swap.XXXXXX)}
BIN=target/release/ferroserve
ADDR=127.0.0.1:50071
cargo build --release -q -p ferroserve

# Two filter versions to swap between: the default, and the same rules under another name.
mkdir -p "$OUT/filters"
cp configs/filters/default.toml configs/filters/default.classifier.safetensors "$OUT/filters/"
sed 's/^name = "default"/name = "twin"/' configs/filters/default.toml >"$OUT/filters/twin.toml"
sed -e "s|^dir = .*|dir = \"$OUT/filters\"|" -e "s|^listen = .*|listen = \"$ADDR\"|" \
  -e 's|^metrics_listen = .*|metrics_listen = "127.0.0.1:9474"|' configs/ferroserve.toml >"$OUT/server.toml"
python3 -c '
import json, sys
for line in open("tests/data/filter-eval-dev.jsonl"):
    if line.strip():
        print(json.dumps({"prompt": json.loads(line)["text"]}))
' >"$OUT/prompts.jsonl"

"$BIN" serve --config "$OUT/server.toml" >"$OUT/serve.log" 2>&1 &
pids+=($!)
# Ready when the in-process worker has joined and answers.
wait_for "$BIN" generate --addr "http://$ADDR" --max-tokens 1 "Hello"

"$BIN" bench --target "grpc://$ADDR" --prompts "$OUT/prompts.jsonl" --concurrency "$CONCURRENCY" \
  --requests "$REQUESTS" --max-tokens 32 --quiet --output "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 &
bench=$!
swaps=0
swap_failures=0
while kill -0 "$bench" 2>/dev/null && [ "$swaps" -lt 100000 ]; do
  name=$([ $((swaps % 2)) -eq 0 ] && echo twin || echo default)
  if "$BIN" filter swap "$name" --addr "http://$ADDR" >/dev/null 2>>"$OUT/swap-errors.txt"; then
    swaps=$((swaps + 1))
  else
    swap_failures=$((swap_failures + 1))
  fi
done
wait "$bench"
cat "$OUT/bench.txt"
"$BIN" filter list --addr "http://$ADDR"
python3 - "$OUT/bench.json" "$swaps" "$swap_failures" <<'EOF'
import json, sys
run = json.load(open(sys.argv[1]))
level = run["levels"][0]
print(f"requests {level.get('completed')} completed, {level.get('failed')} failed; "
      f"{sys.argv[2]} swaps during the load ({sys.argv[3]} swap calls failed)")
EOF
echo "files in $OUT"
