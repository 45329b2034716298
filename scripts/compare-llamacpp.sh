#!/usr/bin/env bash
# Ferroserve against llama.cpp's llama-server, on the same GGUF, the same prompts and the same machine, in
# one run. Not run in CI: it is for people and for closing notes.
#
#   scripts/compare-llamacpp.sh                 # writes bench-results/compare-<time>/
#   OUT=/tmp/cmp REQUESTS=16 scripts/compare-llamacpp.sh
#
# Steps: build llama-server from the llama-cpp-python==0.3.36 sdist for this host's ISA, as its users build
# it (cached; scripts/build-llama-server.sh), build ferroserve (release), fetch the default model, then for
# each server in turn: start it on
# 127.0.0.1, run `ferroserve bench` at concurrency 1,4,8,16 with 128 output tokens and ignore-EOS, note its
# peak RSS, stop it. Both servers are measured through the same protocol, OpenAI's /v1/completions with
# server-sent events, so the protocol is not a variable; Ferroserve is also measured over its gRPC door in
# the same run, which gives the HTTP door's own overhead. Finally print `bench compare` (ratios ferroserve
# / llama-server, and HTTP / gRPC), the peak RSS of both, and draw the plots. For the memory figure at 16 streams of 512 tokens:
#   LEVELS=16 INPUT_TOKENS=256 MAX_TOKENS=256 scripts/compare-llamacpp.sh
#
# Environment: OUT, REQUESTS (measured requests per level, default 32), LEVELS (default 1,4,8,16),
# INPUT_TOKENS (default 128), MAX_TOKENS (default 128), FILTER (on|off, default off: llama-server has no
# content filter, so the engine comparison runs without Ferroserve's), EXTRA_V3 (1: also measure the
# portable x86-64-v3 llama-server build, as a labelled extra row), FERROSERVE_KERNELS (force a kernel
# path, e.g. avx2, to stand in for an AVX2-only host).
#
# Each result file records this machine's CPU features and how each server was built (`server_build`:
# llama.cpp's CMake flags; Ferroserve's target CPU and the kernel path its worker logged).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/compare-$(date +%Y%m%d-%H%M%S)}"
requests="${REQUESTS:-32}"
levels="${LEVELS:-1,4,8,16}"
input_tokens="${INPUT_TOKENS:-128}"
max_tokens="${MAX_TOKENS:-128}"
filter="${FILTER:-off}"
llama_port=18080
mkdir -p "$out"

llama_bin="$(scripts/build-llama-server.sh | tail -n 1)"
cargo build --release -p ferroserve
ferroserve="$PWD/target/release/ferroserve"
model="$("$ferroserve" fetch-model | sed -n 1p)"
echo "==> model $model"

source scripts/lib.sh

# Peak resident memory (VmHWM) of a running process, appended to $out/rss.txt.
peak_rss() {
  local kb
  kb="$(awk '/^VmHWM/ {print $2}' "/proc/$2/status")"
  echo "peak RSS $1: $(( kb / 1024 )) MiB" | tee -a "$out/rss.txt"
}

bench() {
  "$ferroserve" bench --concurrency "$levels" --requests "$requests" --warmup 2 \
    --input-tokens "$input_tokens" --max-tokens "$max_tokens" --ignore-eos --seed 7 --quiet "$@"
}

# Measures one llama-server build: $1 is its bin directory, $2 the label.
measure_llama() {
  local bin="$1" label="$2"
  echo "==> $label ($bin/llama-server), --parallel 16, continuous batching"
  # Each of the 16 slots needs the prompt, the output and the chat-free completion's few extra tokens.
  local ctx=$(( 16 * (input_tokens + max_tokens + 64) ))
  "$bin/llama-server" -m "$model" --host 127.0.0.1 --port "$llama_port" --parallel 16 --cont-batching \
    -c "$ctx" > "$out/$label.log" 2>&1 &
  pids+=($!)
  wait_for curl -sf "http://127.0.0.1:$llama_port/health"
  bench --target "http://127.0.0.1:$llama_port/v1/completions" --label "$label" --output "$out/$label.json" \
    --server-build "$(tr '\n' ';' < "$bin/build-flags.txt")" | tee "$out/$label.txt"
  peak_rss "$label" "${pids[-1]}"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
}

measure_llama "$llama_bin" llama-server
if [[ "${EXTRA_V3:-0}" == 1 ]]; then
  measure_llama "$(FLAVOUR=x86-64-v3 scripts/build-llama-server.sh | tail -n 1)" llama-server-x86-64-v3
fi

echo "==> ferroserve serve (content filter $filter)"
config="$out/ferroserve.toml"
sed -e 's/^listen = "127.0.0.1:50051"/listen = "127.0.0.1:0"/' \
    -e 's/^metrics_listen = "127.0.0.1:9464"/metrics_listen = "127.0.0.1:0"/' \
    -e 's/^http_listen = "127.0.0.1:8080"/http_listen = "127.0.0.1:0"/' \
    configs/ferroserve.toml > "$config"
if [[ "$filter" == off ]]; then sed -i 's/^enabled = true/enabled = false/' "$config"; fi
"$ferroserve" serve --config "$config" --model-path "$model" > "$out/ferroserve.log" 2>&1 &
pids+=($!)
wait_for grep -q "serve listening on" "$out/ferroserve.log"
addr="$(grep -m1 -o 'serve listening on [0-9.:]*' "$out/ferroserve.log" | awk '{print $4}')"
# Listening comes before the model has loaded; one short generation says it is ready.
wait_for "$ferroserve" generate --addr "http://$addr" --max-tokens 1 "ready?"
http="$(grep -m1 -o 'OpenAI API on http://[0-9.:]*' "$out/ferroserve.log" | awk '{print $4}')"
# The log may carry colour codes; the worker logs its kernel path once the model has loaded.
kernels="$(sed 's/\x1b\[[0-9;]*m//g' "$out/ferroserve.log" | grep -m1 -o 'cpu_kernels="*[a-z0-9-]*' \
  | sed 's/.*=//; s/"//g' || true)"
build="target-cpu=x86-64-v3 (.cargo/config.toml); cpu_kernels=$kernels (chosen at run time)"
bench --target "$http/v1/completions" --label ferroserve --output "$out/ferroserve.json" \
  --server-build "$build" | tee "$out/ferroserve.txt"
bench --target "grpc://$addr" --label ferroserve-grpc --output "$out/ferroserve-grpc.json" \
  --server-build "$build" | tee "$out/ferroserve-grpc.txt"
peak_rss "ferroserve serve (router and worker in one process)" "${pids[-1]}"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

echo "==> ratios (b / a): a = llama-server, b = ferroserve"
"$ferroserve" bench compare "$out/llama-server.json" "$out/ferroserve.json" | tee "$out/compare.txt"
echo "==> the HTTP door's overhead (b / a): a = ferroserve over gRPC, b = ferroserve over HTTP"
"$ferroserve" bench compare "$out/ferroserve-grpc.json" "$out/ferroserve.json" | tee "$out/compare-protocols.txt"
if [[ -f "$out/llama-server-x86-64-v3.json" ]]; then
  echo "==> extra row (b / a): a = llama-server built for x86-64-v3 only, b = ferroserve"
  "$ferroserve" bench compare "$out/llama-server-x86-64-v3.json" "$out/ferroserve.json" | tee "$out/compare-v3.txt"
fi
"$ferroserve" bench plot "$out/llama-server.json" "$out/ferroserve.json" "$out/ferroserve-grpc.json" --out "$out/plots"
cat "$out/rss.txt"
echo "==> results in $out"
