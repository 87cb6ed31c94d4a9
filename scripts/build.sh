#!/usr/bin/env bash
# Build this checkout's abi3 wheel (maturin, release) and install it without deps:
#   bash scripts/build.sh                 # into $VENV (default <repo>/.venv)
#   bash scripts/build.sh --target DIR    # into DIR (put DIR on PYTHONPATH), leaving the venv alone
# The wheel is manylinux_2_28 (glibc >= 2.28: Debian 10, Ubuntu 18.10, RHEL 8 and later): maturin
# links it with zig against that glibc (`ziglang`, installed by setup-env.sh), and auditwheel
# checks the tag. Without ziglang in the venv it is built for this machine's glibc, with a warning.
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
export PATH=$VENV/bin:$PATH   # maturin finds zig as `python3 -m ziglang` (or `zig`) on PATH
cd "$REPO"
POLICY=manylinux_2_28
rm -f "$WHEELS"/tensorizer_rs-*.whl
if "$PY" -c 'import ziglang' 2>/dev/null; then
  "$VENV/bin/maturin" build --release --interpreter "$PY" -o "$WHEELS" --zig --compatibility "$POLICY"
else
  echo "build.sh: WARNING: no ziglang in $VENV (pip install ziglang): a wheel for this machine's glibc only" >&2
  POLICY=
  "$VENV/bin/maturin" build --release --interpreter "$PY" -o "$WHEELS"
fi
WHEEL=$(ls "$WHEELS"/tensorizer_rs-*.whl)
if [ -n "$POLICY" ] && [ -x "$VENV/bin/auditwheel" ]; then
  # The tag must be earned: no symbol or library that the policy does not allow.
  SHOW=$("$VENV/bin/auditwheel" show "$WHEEL")
  echo "$SHOW" | tr '\n' ' ' | sed 's/  */ /g'; echo
  # It names the oldest manylinux the wheel fits (the tag itself may be newer): <= 2.28 it must be.
  FITS=$(echo "$SHOW" | tr '\n' ' ' | grep -o 'platform tag: "manylinux_2_[0-9]*' | grep -o '[0-9]*$')
  if [ -z "$FITS" ] || [ "$FITS" -gt "${POLICY##*_}" ]; then
    echo "build.sh: auditwheel does not confirm $POLICY for $WHEEL" >&2
    exit 1
  fi
fi
if [ "${1:-}" = --target ]; then
  rm -rf "$2"
  "$PY" -m pip install -q --no-deps --target "$2" "$WHEEL"
  PYTHONPATH=$2 "$PY" -c 'import tensorizer_rs; print("installed", tensorizer_rs.__file__)'
else
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
  (cd / && "$PY" -c 'import tensorizer_rs; print("installed", tensorizer_rs.__file__)')
fi
