#!/usr/bin/env bash
# Kernel and forward-pass speed without serving, Ferroserve against llama.cpp on the same GGUF, in one run.
# Serving speed is compare-llamacpp.sh's; this separates the engine's arithmetic from the server around it.
#
#   scripts/kernel-bench.sh                   # writes bench-results/kernels-<time>/
#
# - llama-bench: pp512 (prefill of 512 tokens) and tg128 (128 decode steps of one sequence), 5 repeats;
# - llama-batched-bench: 128 prompt tokens, 128 generated, for 1, 4, 8 and 16 parallel sequences;
# - Ferroserve's step_profile: prefill of 64, 256 and 512 tokens; decode steps of 1, 4, 8 and 16
#   sequences at 128 tokens of context; then the roofline (triad bandwidth, int8 peak, and the decode
#   steps as a share of each), on the kernel path this CPU runs best and on the AVX2 path.
#
# llama.cpp is built for this host's ISA (scripts/build-llama-server.sh; its flags are copied beside the
# results) and runs on all cores, as its users run it. Environment: OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/kernels-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
llama_bin="$(scripts/build-llama-server.sh | tail -n 1)"
cargo build --release -p ferroserve -p ferroserve-model --example step_profile
model="$(target/release/ferroserve fetch-model | sed -n 1p)"
threads="$(nproc)"
cp "$llama_bin/build-flags.txt" "$out/llama-build-flags.txt"
grep -m1 'model name' /proc/cpuinfo > "$out/host.txt"
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ' >> "$out/host.txt"

echo "==> llama-bench (pp512, tg128, $threads threads)"
"$llama_bin/llama-bench" -m "$model" -p 512 -n 128 -t "$threads" -r 5 -o md | tee "$out/llama-bench.md"
echo "==> llama-batched-bench (128 + 128 tokens, 1/4/8/16 sequences)"
"$llama_bin/llama-batched-bench" -m "$model" -c 8192 -npp 128 -ntg 128 -npl 1,4,8,16 -t "$threads" 2>&1 \
  | grep -E '^\|' | tee "$out/llama-batched-bench.md"
echo "==> step_profile (best kernel path)"
target/release/examples/step_profile all 1 4 8 16 | tee "$out/step_profile.txt"
echo "==> step_profile (AVX2 path)"
FERROSERVE_KERNELS=avx2 target/release/examples/step_profile all 1 4 8 16 | tee "$out/step_profile-avx2.txt"
echo "==> results in $out"
