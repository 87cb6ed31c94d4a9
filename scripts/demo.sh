#!/usr/bin/env bash
# The main job: set up the environment, build and install tensorizer_rs into $VENV, run the demo.
#   bash scripts/demo.sh        (env: VENV, default <repo>/.venv)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VENV=${VENV:-$REPO/.venv}
bash "$REPO/scripts/setup-env.sh"
bash "$REPO/scripts/build.sh"
exec "$VENV/bin/python" "$REPO/examples/demo.py" "$@"
