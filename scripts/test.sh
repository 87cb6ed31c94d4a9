#!/usr/bin/env bash
# The one test command:  bash scripts/test.sh [extra pytest args]
#
# Phases (each timed; all run even if an earlier lint phase fails; summary at the end):
#   setup    scripts/setup-env.sh (venv, apt packages, CoreWeave tensorizer for cross-checks)
#   build    scripts/build.sh: maturin build --release (abi3 wheel), installed with --no-deps into
#            .cache/site, which tests/conftest.py puts first on sys.path and PYTHONPATH: a run tests
#            exactly this checkout's build, even when several checkouts share one VENV.
#   fmt      cargo fmt --check
#   clippy   cargo clippy --all-targets --features python -- -D warnings (the extension), then the
#            core alone (`--lib`, no features: code only the bindings use must not linger there)
#   core     the core's dependency tree has no Python in it (`cargo tree`, no features)
#   cargo    cargo test --no-fail-fast   (the core, without the `python` feature; every test
#            binary runs even after a failure; debug profile: the release build's dependencies
#            are built as LTO bitcode with maturin's PyO3 env, so `cargo test --release` reuses
#            none of them and was measured 3x slower here)
#   ruff     ruff check and ruff format --check, python tests examples bench
#   stubs    python/tensorizer_rs/_native.pyi against the built module (mypy.stubtest)
#   pytest   pytest -q -m "not gpu" (exit 5, "no tests collected", counts as a failure)
#   vllm-next  the plugin's engine-free vLLM tests with the newest vLLM (0.34.0, in the second
#            venv setup-env.sh makes: VLLM_NEXT_VENV); skipped when that venv is absent
#   shared   only with SHARED_VECTORS=DIR (.ci/run sets it when CI has ../shared/vectors): the
#            in-repo golden vectors (tests/vectors) must be byte-identical to DIR, and the vector
#            tests (Rust and pytest) run once more reading DIR
#
# Env: VENV (default <repo>/.venv), TENSORIZER_VECTORS (default <repo>/tests/vectors),
#      PYTEST_TIMEOUT (per test, default 900 s), SKIP_SETUP=1 (reuse the venv as is).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
SITE=$REPO/.cache/site
# A fresh machine may have rustup's cargo only in ~/.cargo/bin.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
export PATH=$VENV/bin:$PATH
export PYO3_PYTHON=$PY             # same interpreter for every cargo invocation (no rebuilds)
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

NAMES=() STATUS=() TIMES=()
record() { NAMES+=("$1"); STATUS+=("$2"); TIMES+=("$3"); }
# phase NAME CMD...: run, time, record; returns the command's status.
phase() {
  local name=$1 t0=$SECONDS rc
  shift
  printf '\n=== %s: %s\n' "$name" "$*"
  "$@"
  rc=$?
  if [ $rc = 0 ]; then record "$name" ok $((SECONDS - t0)); else
    record "$name" "FAIL($rc)" $((SECONDS - t0)); fi
  return $rc
}
# Free space where the run writes (the checkout: venv, target; TMPDIR: pytest's files): a test
# that fails on a full disk shows here, not only as an OSError deep in its traceback.
disk_free() {
  df -h --output=avail,target "$REPO" "${TMPDIR:-/tmp}" 2>/dev/null | tail -n +2 | uniq |
    awk '{printf "%s%s free on %s", (NR > 1 ? ", " : ""), $1, $2} END {print ""}'
}
skip() { printf '\n=== %s: skipped (%s)\n' "$1" "$2"; record "$1" "skipped: $2" 0; }
summary() {
  local i failed=0
  printf '\n=== summary (%s)\n' "$(date '+%F %T')"
  for i in "${!NAMES[@]}"; do
    printf '  %-8s %-28s %5d s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${TIMES[$i]}"
    case ${STATUS[$i]} in ok|skipped*) ;; *) failed=1 ;; esac
  done
  printf '  %-8s %-28s %5d s\n' total "$([ $failed = 0 ] && echo PASSED || echo FAILED)" "$SECONDS"
  printf '  disk: %s (at the start: %s)\n' "$(disk_free)" "$DISK_AT_START"
  return $failed
}

run_pytest() {
  local rc
  "$PY" -m pytest -q -m "not gpu" \
    --timeout="${PYTEST_TIMEOUT:-900}" "$@"
  rc=$?
  [ $rc = 5 ] && echo "pytest collected no tests: that is a failure here"
  return $rc
}

# The in-repo vectors against another copy (the project's shared ground truth), then the vector
# tests reading that copy.
shared_vectors() {
  local dir=$1 rc=0
  diff -r --exclude=README.md "$dir" "$REPO/tests/vectors" || {
    echo "tests/vectors differs from $dir (copy the shared vectors again)"
    rc=1
  }
  TENSORIZER_VECTORS=$dir cargo test --test crypto_vectors || rc=1
  TENSORIZER_VECTORS=$dir run_pytest tests/test_vectors.py || rc=1
  return $rc
}

DISK_AT_START=$(disk_free)
echo "disk: $DISK_AT_START"
if [ "${SKIP_SETUP:-0}" = 1 ] && [ -x "$PY" ]; then skip setup SKIP_SETUP=1
else phase setup bash "$REPO/scripts/setup-env.sh" || { summary; exit 1; }
fi
phase build bash "$REPO/scripts/build.sh" --target "$SITE"
BUILD_OK=$?
phase fmt cargo fmt --all --check -- --color never
phase clippy bash -c 'cargo clippy --all-targets --features python -- -D warnings &&
  cargo clippy --lib -- -D warnings'
# The core must build without Python: no pyo3 anywhere in its dependency tree.
core_has_no_python() {
  local tree
  tree=$(cargo tree -e normal --prefix none) || return 1
  if grep -qE '^pyo3(-[a-z]+)? ' <<<"$tree"; then echo "pyo3 in the core's tree:"; grep -E '^pyo3' <<<"$tree"; return 1; fi
  echo "no pyo3 in the core's dependency tree ($(wc -l <<<"$tree") lines)"
}
phase core core_has_no_python
phase cargo cargo test --no-fail-fast
RUFF_PATHS=()
for d in python tests examples bench; do [ -e "$d" ] && RUFF_PATHS+=("$d"); done
phase ruff bash -c 'ruff check "$@" && ruff format --check "$@"' ruff "${RUFF_PATHS[@]}"
if [ $BUILD_OK = 0 ]; then
  phase stubs env PYTHONPATH="$SITE" "$PY" -m mypy.stubtest tensorizer_rs._native \
    --allowlist "$REPO/tests/stubtest-allowlist.txt"
else record stubs "FAIL(build failed)" 0
fi
if [ $BUILD_OK = 0 ]; then phase pytest run_pytest "$@"
else printf '\n=== pytest: not run (build failed)\n'; record pytest "FAIL(build failed)" 0
fi
# Keep the default in step with VLLM_NEXT_VERSION in setup-env.sh.
NEXT_VENV=${VLLM_NEXT_VENV:-${TZ_CACHE:-$REPO/.cache}/venv-vllm-0.34.0}
if [ $BUILD_OK != 0 ]; then record vllm-next "FAIL(build failed)" 0
elif [ -x "$NEXT_VENV/bin/python" ]; then
  phase vllm-next "$NEXT_VENV/bin/python" -m pytest -q -m "not gpu" --timeout=600 \
    tests/vllm/test_plugin.py tests/vllm/test_config.py tests/vllm/test_lora.py \
    -k "not test_llm_ and not test_vllm_serve and not test_example_script and not test_adapter_changes"
else skip vllm-next "no $NEXT_VENV"
fi
if [ -n "${SHARED_VECTORS:-}" ]; then phase shared shared_vectors "$SHARED_VECTORS"; fi
summary
