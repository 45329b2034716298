#!/usr/bin/env bash
# One turn of the content filter's red-team feedback loop, ending on a live server:
#   1. the attack success rate (ASR) of the shipped filter on mutations of validation prompts, which
#      training never sees (the "before" figure);
#   2. the red team on training prompts; what gets through goes into a feedback store;
#   3. `filter train` on the training split plus the store: a candidate config;
#   4. the candidate's ASR on the same validation mutations (the "after" figure);
#   5. the gate (`filter validate`) on the frozen test splits;
#   6. a real `ferroserve serve` with both filters and the store: the candidate runs in shadow while the
#      second test split's prompts go through the OpenAI HTTP door, its live agreement is listed, and it is
#      promoted with SwapFilter only if the gate passed. Every step lands in the store with who did it.
#
#   scripts/filter-loop.sh          # env: PER_CATEGORY (150 training seeds per category), OUT (a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PER_CATEGORY=${PER_CATEGORY:-150}
OUT=${OUT:-$(mktemp -d /tmp/ferroserve-filter-loop.XXXXXX)}
BIN=target/release/ferroserve
ADDR=127.0.0.1:50072
HTTP=127.0.0.1:8092
DATA=configs/filters/data
STORE="$OUT/feedback.jsonl"
export FERROSERVE_OPERATOR=filter-loop
cargo build --release -q -p ferroserve
mkdir -p "$OUT/filters"
cp configs/filters/default.toml configs/filters/default.classifier.safetensors "$OUT/filters/"

"$BIN" filter redteam --seeds "$DATA/val.jsonl" --seed 2 >"$OUT/asr-before.txt"
"$BIN" filter redteam --seeds "$DATA/train.jsonl" --per-category "$PER_CATEGORY" --store "$STORE" \
  >"$OUT/redteam-train.txt"
"$BIN" filter train --data "$DATA/train.jsonl" --val "$DATA/val.jsonl" --val tests/data/filter-eval-dev.jsonl \
  --val tests/data/filter-eval-extra.jsonl --store "$STORE" --out "$OUT/filters/candidate.toml" \
  --name candidate --filter-version 4 >"$OUT/train.txt" 2>&1
"$BIN" filter redteam --config "$OUT/filters/candidate.toml" --seeds "$DATA/val.jsonl" --seed 2 >"$OUT/asr-after.txt"
gate=passed
"$BIN" filter validate --candidate "$OUT/filters/candidate.toml" --store "$STORE" --by filter-loop \
  >"$OUT/gate.txt" 2>&1 || gate=refused

sed -e "s|^dir = \"configs/filters\"|dir = \"$OUT/filters\"|" -e "s|^listen = \"127.0.0.1:50051\"|listen = \"$ADDR\"|" \
  -e "s|^http_listen = .*|http_listen = \"$HTTP\"|" -e 's|^metrics_listen = "127.0.0.1:9464"|metrics_listen = ""|' \
  -e "s|^store = \"\"|store = \"$STORE\"|" configs/ferroserve.toml >"$OUT/server.toml"
"$BIN" serve --config "$OUT/server.toml" >"$OUT/serve.log" 2>&1 &
pids+=($!)
wait_for "$BIN" generate --addr "http://$ADDR" --max-tokens 1 "Hello"
"$BIN" filter shadow candidate --addr "http://$ADDR" >/dev/null
python3 - "$HTTP" "$DATA/test2.jsonl" <<'PY' >"$OUT/live.txt"
import json, sys, urllib.request
url = f"http://{sys.argv[1]}/v1/chat/completions"
filtered = 0
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
for r in rows:
    body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 1, "messages": [{"role": "user", "content": r["text"]}]})
    req = urllib.request.Request(url, body.encode(), {"content-type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=120))
    filtered += out["choices"][0]["finish_reason"] == "content_filter"
print(f"{len(rows)} test prompts sent live; {filtered} stopped by the active filter")
PY
"$BIN" filter list --addr "http://$ADDR" >"$OUT/shadow.txt"
if [ "$gate" = passed ]; then "$BIN" filter swap candidate --addr "http://$ADDR" >"$OUT/promote.txt"; fi
"$BIN" filter review --store "$STORE" | grep '^step' >"$OUT/steps.txt" || true

grep 'attack success rate' "$OUT/asr-before.txt" "$OUT/asr-after.txt"
grep -E 'labelled findings|validation:' "$OUT/train.txt"
cat "$OUT/gate.txt" | grep -v '^ *[0-9]*: \|^ *at ' | grep -v 'Stack backtrace'
cat "$OUT/live.txt" "$OUT/shadow.txt" "$OUT/steps.txt"
echo "gate: $gate; files in $OUT"
