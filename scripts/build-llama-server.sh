#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the source inside the PyPI sdist of llama-cpp-python, and caches it.
#
#   scripts/build-llama-server.sh        # prints the path of the built binary on its last line
#
# The cache lives in ${FERROSERVE_PEERS:-$HOME/.cache/ferroserve/peers}; a second run only prints the path.
# Needs: python3 with pip (for the sdist, and for cmake when the machine has none), a C/C++ compiler.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${FERROSERVE_PEERS:-$HOME/.cache/ferroserve/peers}"
src="$cache/llama-cpp-python-$version"
build="$src/vendor/llama.cpp/build"
binary="$build/bin/llama-server"

if [[ -x "$binary" ]]; then
  echo "$binary"
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

echo "==> building llama-server (Release) in $build" >&2
# GGML_NATIVE=OFF with explicit AVX2/FMA/F16C: the same x86-64-v3 baseline Ferroserve is built for, so the
# comparison is between equally portable binaries.
"$cmake_bin" -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON >&2
"$cmake_bin" --build "$build" --target llama-server -j "$(nproc)" >&2
echo "$binary"
