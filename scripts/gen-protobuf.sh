#!/usr/bin/env bash
# Regenerate python/tensorizer_rs/tensors_pb2.py from python/tensorizer_rs/tensors.proto with the
# official protocol buffer compiler, as shipped in grpcio-tools (pinned: its protoc 25.x emits
# "builder" code without a runtime version check, so the module imports with protobuf >= 3.20,
# like CoreWeave's, up to the newest releases). grpcio-tools goes into $TZ_CACHE/grpcio-tools-<v>
# (pip --target), never into the venv.
#
#   bash scripts/gen-protobuf.sh           # rewrite the module
#   bash scripts/gen-protobuf.sh --check   # exit 1 if the committed module differs
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TZ_CACHE=${TZ_CACHE:-$REPO/.cache}
GRPCIO_TOOLS_VERSION=1.62.3
TOOLS=$TZ_CACHE/grpcio-tools-$GRPCIO_TOOLS_VERSION
PY=$VENV/bin/python
PKG=$REPO/python/tensorizer_rs
if [ ! -d "$TOOLS/grpc_tools" ]; then
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-deps --target "$TOOLS" \
    "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# Run from the package dir so the descriptor's file name is "tensors.proto", as in CoreWeave's.
(cd "$PKG" && PYTHONPATH=$TOOLS "$PY" -m grpc_tools.protoc -I. --python_out="$OUT" tensors.proto)
if [ "${1:-}" = --check ]; then
  if cmp -s "$OUT/tensors_pb2.py" "$PKG/tensors_pb2.py"; then echo "tensors_pb2.py is up to date"; exit 0; fi
  diff -u "$PKG/tensors_pb2.py" "$OUT/tensors_pb2.py" || true
  echo "tensors_pb2.py differs from what protoc generates: run bash scripts/gen-protobuf.sh" >&2
  exit 1
fi
cp "$OUT/tensors_pb2.py" "$PKG/tensors_pb2.py"
echo "wrote $PKG/tensors_pb2.py"
