#!/usr/bin/env bash
# Fetch here the wheels the GPU machine lacks for bench/peers_bench.py and bench/tp_bench.py, into
# .device/ (git-ignored; the device call carries it with carry: [".device"]):
#   .device/peers/  InstantTensor 0.2.2, fastsafetensors 0.5.0, Run:ai model streamer 0.17.0
#   .device/bin/direct_reader  bench/direct_reader.c, built static (the O_DIRECT probes in C)
#   .device/cw/     CoreWeave tensorizer 2.12.1 and what it needs that the image lacks: boto3,
#                   botocore, s3transfer, jmespath, redis, hiredis, libnacl (the image has torch,
#                   numpy, protobuf, psutil, urllib3, python-dateutil, humanize, typer)
# for CPython 3.12 on manylinux x86_64 (the GPU machine: Python 3.12, glibc 2.39). There,
# bench/on_device.sh installs each folder with `pip install --no-index --no-deps --target` and the
# benchmarks append those folders to sys.path, so the image's torch and numpy win.
#
#   bash scripts/fetch-device-wheels.sh [--ours WHEEL]
#
# --ours copies our wheel (e.g. target/wheels/tensorizer_rs-*.whl from `maturin build --release`)
# into .device/, replacing the one there. The script keeps one version of each package per folder
# (two stop pip's install there) and ends by adding up what would travel: the checkout (tracked
# and untracked files git does not ignore) plus .device must stay under the 64 MiB carry limit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${DEVICE_DIR:-$REPO/.device}
VENV=${VENV:-$REPO/.venv}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python
else PY=python3; fi
OURS=""
while [ $# -gt 0 ]; do
  case $1 in
    --ours) OURS=$2; shift 2 ;;
    *) echo "usage: $0 [--ours WHEEL]" >&2; exit 2 ;;
  esac
done

PEERS=(instanttensor==0.2.2 fastsafetensors==0.5.0 runai-model-streamer==0.17.0)
CW=(tensorizer==2.12.1 boto3==1.44.18 botocore==1.44.18 s3transfer==0.19.3 jmespath==1.1.0
  redis==8.2.0 hiredis==3.5.0 libnacl==2.1.0)
# pip matches manylinux_2_N exactly: runai-model-streamer 0.17.0 is manylinux_2_30, the others
# 2_27/2_28 or 2014 (2_17); all run on glibc 2.39.
PLATFORMS=()
for p in manylinux_2_30_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done

# fetch DIR SPEC...: download the pinned wheels, then drop any other wheel in DIR (another
# version of the same package would stop the install there).
fetch() {
  local dir=$1 keep="" spec name ver w base
  shift
  mkdir -p "$dir"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$dir" "$@"
  for spec in "$@"; do
    name=${spec%%==*}
    ver=${spec#*==}
    keep="$keep $(echo "$name" | tr 'A-Z-' 'a-z_')-$ver"
  done
  for w in "$dir"/*.whl; do
    base=$(basename "$w" | cut -d- -f1-2 | tr 'A-Z' 'a-z')
    case " $keep " in
      *" $base "*) ;;
      *) echo "removing $w (not pinned here)"; rm -f "$w" ;;
    esac
  done
}

echo "peers -> $DEST/peers"
fetch "$DEST/peers" "${PEERS[@]}"
echo "CoreWeave tensorizer and its dependencies -> $DEST/cw"
fetch "$DEST/cw" "${CW[@]}"
if [ -n "$OURS" ]; then
  rm -f "$DEST"/tensorizer_rs-*.whl
  cp "$OURS" "$DEST/"
fi
ls "$DEST"/tensorizer_rs-*.whl >/dev/null 2>&1 ||
  echo "NOTE: no tensorizer_rs-*.whl in $DEST: build one (maturin build --release) and pass --ours"
# The C O_DIRECT reader the disk and peers phases use beside Python's threads (static: nothing
# to match on the GPU machine).
mkdir -p "$DEST/bin"
if cc -O2 -pthread -static -o "$DEST/bin/direct_reader" "$REPO/bench/direct_reader.c" 2>/dev/null; then
  echo "bench/direct_reader.c -> $DEST/bin/direct_reader"
else
  echo "NOTE: could not build $DEST/bin/direct_reader (cc with a static libc): the O_DIRECT probes read from Python only"
fi

# What travels: the checkout as git sees it, plus .device.
cd "$REPO"
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
  awk '{s += $1} END {print s + 0}')
dev=$(du -sb "$DEST" | cut -f1)
total=$((tree + dev))
awk -v t="$tree" -v d="$dev" -v n="$(basename "$DEST")" 'BEGIN {
  printf "checkout %.1f MiB + %s %.1f MiB = %.1f MiB of the 64 MiB carry limit\n",
    t / 1048576, n, d / 1048576, (t + d) / 1048576 }'
du -sh "$DEST"/* | sed 's/^/  /'
if [ "$total" -gt $((62 * 1024 * 1024)) ]; then
  echo "TOO LARGE: remove what this call does not need from $DEST (e.g. old/, bin/)" >&2
  exit 1
fi
