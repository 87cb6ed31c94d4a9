#!/usr/bin/env bash
# The main job on an embedded default: set up the environment, build and install tensorizer_rs
# into $VENV, then make a tiny Llama locally, serialize it with our tensorize_vllm_model, load it
# through vLLM with load_format="tensorizer" (our plugin) and generate.
#   bash scripts/demo.sh [WORK_DIR]       (env: VENV, default <repo>/.venv)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VENV=${VENV:-$REPO/.venv}
bash "$REPO/scripts/setup-env.sh"
bash "$REPO/scripts/build.sh"
"$VENV/bin/python" "$REPO/examples/demo.py"
exec "$VENV/bin/python" "$REPO/examples/vllm_demo.py" "$@"
