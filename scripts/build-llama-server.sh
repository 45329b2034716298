#!/usr/bin/env bash
# Builds llama.cpp's `llama-server`, `llama-bench` and `llama-batched-bench` from the source inside the PyPI
# sdist of llama-cpp-python, and caches them.
#
#   scripts/build-llama-server.sh            # for this host's ISA, as llama.cpp's users build it
#   FLAVOUR=x86-64-v3 scripts/build-llama-server.sh   # the portable AVX2 build (a labelled extra row only)
#
# The last line printed is the directory holding the binaries. Beside them, `build-flags.txt` records the
# flavour, the CMake flags and the CPU features of the host that built it.
#
# The `native` flavour is llama.cpp's default (GGML_NATIVE=ON, `-march=native`). Where the CPU reports AMX,
# it is switched off (`-mno-amx-*`): some VMs report AMX and fault on its instructions. llama.cpp's AMX path
# also needs the kernel's permission for the tile state, which such VMs do not give.
#
# The cache lives in ${FERROSERVE_PEERS:-$HOME/.cache/ferroserve/peers}; a second run only prints the path.
# Needs: python3 with pip (for the sdist, and for cmake when the machine has none), a C/C++ compiler.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
flavour="${FLAVOUR:-native}"
cache="${FERROSERVE_PEERS:-$HOME/.cache/ferroserve/peers}"
src="$cache/llama-cpp-python-$version"
build="$src/vendor/llama.cpp/build-$flavour"
bin="$build/bin"
targets=(llama-server llama-bench llama-batched-bench)

ready=1
for t in "${targets[@]}"; do [[ -x "$bin/$t" ]] || ready=0; done
if [[ "$ready" == 1 && -f "$bin/build-flags.txt" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"

if [[ ! -d "$src" ]]; then
  echo "==> downloading the llama-cpp-python==$version sdist" >&2
  # --no-binary for this package only: pip still prepares the sdist's metadata, and its build tools
  # (scikit-build-core, cmake) come as wheels instead of being compiled from source too.
  python3 -m pip download --no-binary llama-cpp-python --no-deps -d "$cache" \
    "llama-cpp-python==$version" >&2
  tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache"
  mv "$cache/llama_cpp_python-$version" "$src"
fi

cmake_bin="$(command -v cmake || true)"
if [[ -z "$cmake_bin" ]]; then
  echo "==> no cmake on this machine: installing it from PyPI into $cache/venv" >&2
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet cmake >&2
  cmake_bin="$cache/venv/bin/cmake"
fi

features="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | grep -E '^(avx|avx2|fma|f16c|bmi2|avx512[a-z0-9_]*|avx_vnni|amx[a-z0-9_]*)$' | sort | tr '\n' ' ')"
case "$flavour" in
  native)
    flags=(-DGGML_NATIVE=ON)
    if grep -qw amx_tile /proc/cpuinfo; then
      flags+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
        "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    fi
    ;;
  x86-64-v3)
    # The x86-64-v3 baseline Ferroserve's own binary is built for: AVX2, FMA, F16C, BMI2.
    flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
    ;;
  *)
    echo "FLAVOUR must be native or x86-64-v3, not $flavour" >&2
    exit 2
    ;;
esac

echo "==> building ${targets[*]} ($flavour, Release) in $build" >&2
"$cmake_bin" -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF "${flags[@]}" >&2
"$cmake_bin" --build "$build" --target "${targets[@]}" -j "$(nproc)" >&2
{
  echo "flavour: $flavour"
  echo "llama-cpp-python: $version"
  echo "cmake flags: ${flags[*]}"
  echo "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "host features: $features"
} > "$bin/build-flags.txt"
echo "$bin"
