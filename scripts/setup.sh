#!/usr/bin/env bash
# Create .venv and install the project with its test extras, once per pyproject change.
# Sourced by run.sh and test.sh so that each of the README's two commands works on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.dsparse-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing flwr-dsparse and its dependencies (first run: a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # pip, not uv/poetry: pip finds the torch/torchvision wheels this machine keeps on disk.
  "$venv/bin/python" -m pip install -q -e "$root[dev]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# No telemetry, no per-run package installs: edge clusters and CI are offline.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
