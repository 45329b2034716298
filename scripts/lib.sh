# Shared by the measurement scripts: `source scripts/lib.sh` after `cd` to the repository root.
# Processes started in the background go into `pids`; all of them are stopped when the script exits.

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Waits (at most 300 s) until a command succeeds.
wait_for() {
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "timed out waiting for: $*" >&2
  return 1
}
