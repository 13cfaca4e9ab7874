#!/usr/bin/env bash
# The main job of the README's quick start: DSparse on 7 simulated devices with 7 memory
# budgets, MobileNetV2, per-step synchronous training, on the embedded data (no download).
# Extra arguments go to `flwr run`, e.g. --run-config "method='fedavg' out-dir='outputs-fedavg'".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"

# `flwr run . local` starts a local simulation SuperLink that outlives the run and that no flwr
# command stops; stop the one this script started (by PID), and leave any older one alone.
before="$(pgrep -f 'flower-superlink.*--simulation' || true)"
stop_new_superlink() {
  for pid in $(pgrep -f 'flower-superlink.*--simulation' || true); do
    grep -qx "$pid" <<<"$before" || kill "$pid" 2>/dev/null || true
  done
}
trap stop_new_superlink EXIT

flwr run . local --federation-config "num-supernodes=7 client-resources-num-cpus=1" --stream "$@"
