#!/usr/bin/env bash
# The GPU path, checked in one prepared script on a machine with an NVIDIA GPU (the device machine lent to
# some tasks). Not run in CI, whose machine has no GPU.
#
#   scripts/gpu-check.sh                       # results in $OUT (default bench-results/gpu-check-<time>)
#   MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf DEVICE=cuda:0 scripts/gpu-check.sh
#
# Steps, each logged to $OUT:
#   1. nvidia-smi: the GPU, driver and memory;
#   2. a release build with `--features cuda` (the binary and the `device_logits` example);
#   3. the logits on the GPU against the CPU path (`device_logits`: relative difference and greedy
#      agreement over a prompt and 32 decode steps; a failure stops the script);
#   4. `ferroserve serve --device $DEVICE`, then `ferroserve bench` at 1, 16 and 64 streams (128 prompt
#      tokens, 128 output tokens, ignore-EOS), writing bench.json and bench.txt.
#
# Needs: Rust, the CUDA toolkit (nvcc) matching the driver, and the crates already fetched (`cargo fetch`,
# or a vendored directory), since the device machine reaches no network. The model comes from MODEL, or
# the cache `ferroserve fetch-model` fills; copy it next to the checkout when the machine has no cache.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
device="${DEVICE:-cuda:0}"
levels="${LEVELS:-1,16,64}"
mkdir -p "$out"
source scripts/lib.sh

echo "==> the GPU" | tee "$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/summary.txt"

echo "==> building with --features cuda" | tee -a "$out/summary.txt"
cargo build --release --offline --features cuda -p ferroserve 2>&1 | tail -n 3
cargo build --release --offline --features cuda -p ferroserve-model --example device_logits 2>&1 | tail -n 3
ferroserve="$PWD/target/release/ferroserve"
# device_logits reads the default model from the cache (checked against its sha256): put MODEL there.
cache="${FERROSERVE_CACHE_DIR:-$HOME/.cache/ferroserve}"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -n "${MODEL:-}" && ! -f "$model" ]]; then
  mkdir -p "$cache" && cp "$MODEL" "$model"
fi
echo "==> model $model" | tee -a "$out/summary.txt"

echo "==> logits on $device against the CPU path" | tee -a "$out/summary.txt"
target/release/examples/device_logits "$device" | tee "$out/logits.txt"
tail -n 2 "$out/logits.txt" >> "$out/summary.txt"

echo "==> ferroserve serve --device $device; bench at $levels streams" | tee -a "$out/summary.txt"
config="$out/ferroserve.toml"
sed -e 's/^listen = "127.0.0.1:50051"/listen = "127.0.0.1:0"/' \
    -e 's/^metrics_listen = "127.0.0.1:9464"/metrics_listen = "127.0.0.1:0"/' \
    -e 's/^http_listen = "127.0.0.1:8080"/http_listen = ""/' \
    -e 's/^enabled = true/enabled = false/' \
    configs/ferroserve.toml > "$config"
"$ferroserve" serve --config "$config" --model-path "$model" --device "$device" > "$out/serve.log" 2>&1 &
pids+=($!)
wait_for grep -q "serve listening on" "$out/serve.log"
addr="$(grep -m1 -o 'serve listening on [0-9.:]*' "$out/serve.log" | awk '{print $4}')"
wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"
"$ferroserve" bench --target "grpc://$addr" --concurrency "$levels" --requests 64 --warmup 2 \
  --input-tokens 128 --max-tokens 128 --ignore-eos --seed 7 --quiet --label "ferroserve-$device" \
  --server-build "features=cuda; device=$device" --output "$out/bench.json" | tee "$out/bench.txt"
grep -E '^c=' "$out/bench.txt" >> "$out/summary.txt" || true
nvidia-smi --query-gpu=memory.used --format=csv | tee -a "$out/summary.txt"
echo "==> results in $out"
cat "$out/summary.txt"
