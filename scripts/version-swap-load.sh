#!/usr/bin/env bash
# Changes versions and the traffic policy over and over while `ferroserve bench` streams requests through a
# real `ferroserve serve`. Each round: split 50/50 between Q4_1 and a derived Q8_0, disable Q8_0, roll back,
# split 80/20, split 50/50; in the reload run, Q8_0 is also loaded (in the background, while Q4_1 serves)
# before and unloaded after each round. Prints the failed count, how many changes happened during the load,
# how long each `models disable` took to return (the policy applies when the call returns; this includes
# starting the CLI process), how long loads took, and latency under churn against a quiet run of the same
# bench in the same script.
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
ready() { "$BIN" models --addr "http://$ADDR" list | grep -q "^  q8_0 *ready"; }
bench() {
  "$BIN" bench --target "grpc://$ADDR" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
    --input-tokens 32 --max-tokens 32 --quiet --output "$OUT/$1.json" >"$OUT/$1.txt" 2>&1
}

# Three runs of the same bench, in this order: nothing changing (the peer for the latency figures); the
# policy changing with q8_0 loaded throughout; the policy changing and q8_0 loaded and unloaded each round.
bench quiet
: >"$OUT/disable-ms.txt"
: >"$OUT/load-ms.txt"
changes=0
loads=0
churn() {  # churn NAME RELOAD
  bench "$1" &
  local bench_pid=$!
  while kill -0 "$bench_pid" 2>/dev/null && [ "$changes" -lt 100000 ]; do
    if [ "$2" = 1 ] || ! ready; then
      local start=$(date +%s%N)
      models load q8_0 --path "$OUT/q8_0.gguf" >/dev/null
      for _ in $(seq 1 600); do ready && break; sleep 0.05; done
      if [ "$2" = 1 ]; then echo $(( ($(date +%s%N) - start) / 1000000 )) >>"$OUT/load-ms.txt"; fi
      loads=$((loads + 1))
    fi
    models split q4_1=50 q8_0=50 >/dev/null
    local start=$(date +%s%N)
    models disable q8_0 >/dev/null
    echo $(( ($(date +%s%N) - start) / 1000000 )) >>"$OUT/disable-ms.txt"
    models rollback >/dev/null
    models split q4_1=80 q8_0=20 >/dev/null
    models split q4_1=50 q8_0=50 >/dev/null
    changes=$((changes + 5))
    if [ "$2" = 1 ]; then
      models unload q8_0 >/dev/null
      changes=$((changes + 2))
    fi
    sleep 0.25  # each change starts a CLI process; unthrottled, they would take a core from the server
  done
  wait "$bench_pid"
}
churn policy 0
models unload q8_0 >/dev/null
churn reload 1
head -1 "$OUT/reload.txt"
models list
models history | tail -4
python3 - "$OUT" "$changes" "$loads" <<'PY'
import json, sys
out, changes, loads = sys.argv[1:]
runs = {n: json.load(open(f"{out}/{n}.json"))["levels"][0] for n in ("quiet", "policy", "reload")}
ms = lambda f: sorted(int(x) for x in open(f"{out}/{f}") if x.strip())
disable, load = ms("disable-ms.txt"), ms("load-ms.txt")
failed = sum(r["failed"] for n, r in runs.items() if n != "quiet")
done = sum(r["completed"] for n, r in runs.items() if n != "quiet")
print(f"under churn: {done} requests completed, {failed} failed; {changes} changes ({loads} loads of q8_0, "
      f"each unloaded again in the reload run)")
print(f"`models disable` returned in {disable[len(disable)//2]} ms median, {disable[-1]} ms max ({len(disable)} times)")
print(f"a q8_0 load took {load[len(load)//2]} ms median, {load[-1]} ms max from `models load` to `ready` ({len(load)} times)")
q = runs["quiet"]
for name in ("policy", "reload"):
    r = runs[name]
    for key in ("itl", "ttft"):
        a, b = r[key], q[key]
        print(f"{name:>6} {key.upper():>4} vs quiet: median {a['median']:.1f} vs {b['median']:.1f} ms "
              f"({a['median'] / b['median']:.2f}x), p99 {a['p99']:.1f} vs {b['p99']:.1f} ms "
              f"({a['p99'] / b['p99']:.2f}x), max {a['max']:.1f} vs {b['max']:.1f} ms")
PY
echo "files in $OUT"
