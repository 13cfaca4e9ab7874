#!/usr/bin/env bash
# The main job of the README's quick start: DSparse on 7 simulated devices with 7 memory
# budgets, MobileNetV2 fine-tuned with per-step synchronous training, on Fashion-MNIST where
# Debian's dataset-fashion-mnist is installed (setup.sh installs it as root), else on the
# embedded synthetic data (with a warning).
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

# The dataset: Fashion-MNIST (real images) where its files are, else synthetic; one line says which.
mapfile -t data < <(python -c 'from flwr_dsparse.data import default_dataset; print(*default_dataset(), sep="\n")')
if [ "${#data[@]}" -ne 3 ]; then
  echo "[run] error: could not ask flwr_dsparse.data which dataset to use (is .venv installed?)" >&2
  exit 1
fi
dataset="${data[0]}" data_root="${data[1]}"
echo "[run] ${data[2]}" >&2

# DSparse is a fine-tuning method: start from weights pre-trained on classes 0-5 of the same
# dataset (the stand-in for downloaded weights, which this offline setting cannot fetch). Made
# once per dataset (about 1.5 min on 2 cores) and reused; the run fine-tunes on all 10 classes.
# A later --run-config in "$@" wins, e.g. --run-config "model='tiny' initial-weights=''".
weights="$root/outputs/pretrained_mobilenet_v2_$dataset.pt"
if [ ! -f "$weights" ]; then
  dsparse pretrain --model mobilenet_v2 --dataset "$dataset" --data-root "$data_root" --out "$weights"
fi

flwr run . local --federation-config "num-supernodes=7 client-resources-num-cpus=1" \
  --run-config "initial-weights='$weights' dataset='$dataset' data-root='$data_root'" --stream "$@"
