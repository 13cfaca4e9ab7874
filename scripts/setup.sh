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

# Real images: Debian's dataset-fashion-mnist puts Fashion-MNIST in /usr/share/datasets/fashion-mnist.
# Install it where we can (root, apt-get, files absent); say in one line what happened; never fail.
# Present files cost one `test -f`, no apt call. DSPARSE_FASHION_MNIST_DIR points the loader elsewhere.
fashion_debian_dir="/usr/share/datasets/fashion-mnist"
fashion_dir="${DSPARSE_FASHION_MNIST_DIR:-$fashion_debian_dir}"
fashion_present() { [ -f "$fashion_dir/train-images-idx3-ubyte.gz" ] || [ -f "$fashion_dir/train-images-idx3-ubyte" ]; }
if fashion_present; then
  echo "[setup] Fashion-MNIST: present in $fashion_dir" >&2
elif [ "$fashion_dir" != "$fashion_debian_dir" ]; then
  echo "[setup] Fashion-MNIST: not in $fashion_dir (DSPARSE_FASHION_MNIST_DIR; apt installs only to" \
    "$fashion_debian_dir); jobs fall back to synthetic data" >&2
elif [ "$EUID" != 0 ]; then
  echo "[setup] Fashion-MNIST: not installed and not root, skipped (as root: apt-get install -y" \
    "dataset-fashion-mnist); jobs fall back to synthetic data" >&2
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] Fashion-MNIST: not installed and no apt-get here; jobs fall back to synthetic data" \
    "(or set data-root to a folder with its four IDX files)" >&2
else
  apt_log="$venv/apt-dataset-fashion-mnist.log"
  if { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; } \
      >"$apt_log" 2>&1 && fashion_present; then
    echo "[setup] Fashion-MNIST: installed dataset-fashion-mnist with apt-get into $fashion_dir" >&2
  else
    echo "[setup] Fashion-MNIST: apt-get install dataset-fashion-mnist failed or left $fashion_dir empty" \
      "(see $apt_log); jobs fall back to synthetic data" >&2
  fi
fi

# No telemetry, no per-run package installs: edge clusters and CI are offline.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
