#!/usr/bin/env bash
# Start a Flower SuperLink and N SuperNodes on 127.0.0.1 and wait until all are online.
# Arguments go to `dsparse deploy up`, e.g.
#   bash scripts/deploy_up.sh --nodes 3 --memory-mb 110,150,220
#   bash scripts/deploy_up.sh --nodes 3 --tls --auth
# Then: flwr run . dsparse-local --stream     and: bash scripts/deploy_down.sh
set -euo pipefail
# setup.sh: .venv on a clean clone, PATH, FLWR_TELEMETRY_ENABLED=0, no runtime dependency installs.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m flwr_dsparse.deploy up "$@"
