#!/usr/bin/env bash
# The kernel crate's tests (the only crate with `unsafe`) under AddressSanitizer, with the nightly toolchain.
# (Miri is not installed with this machine's nightly; ASan checks the same loads at native speed, so the
# proptests run their full case counts.)
# Not run in CI (CI has no nightly toolchain).
#
#   scripts/sanitize-kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-Zsanitizer=address -C target-cpu=x86-64-v3" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/asan}" \
  cargo +nightly test -p ferroserve-kernels --target x86_64-unknown-linux-gnu "$@"
