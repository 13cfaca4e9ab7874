#!/usr/bin/env bash
# The test command of the README's quick start (and of .ci/run). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not deployment"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
# Lint first (seconds): the ruff rules in pyproject.toml; then the tests.
ruff check .
exec python -m pytest -q "$@"
