#!/usr/bin/env bash
# Stop every process that scripts/deploy_up.sh started (by process id, from its state file).
# Arguments go to `dsparse deploy down`, e.g. --connection dsparse-local
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m flwr_dsparse.deploy down "$@"
