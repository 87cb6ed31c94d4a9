#!/usr/bin/env bash
# Build this checkout's abi3 wheel (maturin, release) and install it without deps:
#   bash scripts/build.sh                 # into $VENV (default <repo>/.venv)
#   bash scripts/build.sh --target DIR    # into DIR (put DIR on PYTHONPATH), leaving the venv alone
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
WHEELS=$REPO/target/wheels
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
export PYO3_PYTHON=$PY
cd "$REPO"
rm -f "$WHEELS"/tensorizer_rs-*.whl
"$VENV/bin/maturin" build --release --interpreter "$PY" -o "$WHEELS"
WHEEL=$(ls "$WHEELS"/tensorizer_rs-*.whl)
if [ "${1:-}" = --target ]; then
  rm -rf "$2"
  "$PY" -m pip install -q --no-deps --target "$2" "$WHEEL"
  PYTHONPATH=$2 "$PY" -c 'import tensorizer_rs; print("installed", tensorizer_rs.__file__)'
else
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
  (cd / && "$PY" -c 'import tensorizer_rs; print("installed", tensorizer_rs.__file__)')
fi
