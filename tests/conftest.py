"""Shared test harness.

* ``run_coreweave(version, script, *args)`` runs a Python snippet in a subprocess where CoreWeave's
  real ``tensorizer`` (installed by scripts/setup-env.sh into ``.cache/tz-<version>``) is importable.
  It is importable ONLY there: the test process itself must never load it (checked below), so no
  test can pass by reading through CoreWeave's package by mistake.
* ``vectors_dir`` / ``vector_manifests`` / ``vector``: the golden vectors, ``tests/vectors`` in the
  repository (env TENSORIZER_VECTORS overrides). A test with a ``vector`` argument runs once per
  manifest.
* ``s3_server``: moto's S3 server on 127.0.0.1 with SigV4 checking (one per session; see
  ``tests/servers/moto_s3.py``); ``S3Server.bucket(name)`` creates a bucket.
* ``redis_server``: a real ``redis-server`` on 127.0.0.1 (one per session).
* Markers: ``gpu`` tests skip without CUDA; ``vllm`` tests skip when vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TZ_CACHE = Path(os.environ.get("TZ_CACHE", REPO_ROOT / ".cache"))
VECTORS_DIR = Path(os.environ.get("TENSORIZER_VECTORS") or REPO_ROOT / "tests" / "vectors")
COREWEAVE_VERSIONS = ("2.12.1", "2.10.1")
# scripts/test.sh installs this checkout's wheel here (not into the venv, which may be shared by
# several checkouts); prefer it, in this process and in subprocesses (vLLM workers).
SITE = REPO_ROOT / ".cache" / "site"
if SITE.is_dir() and str(SITE) not in sys.path:
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p
    )

# vLLM on a CPU-only box (see shared/vllm-cpu/recipe.sh); inherited by subprocesses too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


# ----------------------------------------------------------------------------- CoreWeave, isolated
def coreweave_dir(version: str) -> Path:
    return TZ_CACHE / f"tz-{version}"


def run_coreweave(
    version: str,
    script: str,
    *args,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -c script *args`` with CoreWeave tensorizer ``version`` importable.

    Output is captured as text. With ``check`` (the default) a non-zero exit fails the test and
    shows the subprocess's output; pass ``check=False`` to assert on failures yourself.
    """
    target = coreweave_dir(version)
    if not (target / "tensorizer" / "__init__.py").is_file():
        pytest.fail(
            f"CoreWeave tensorizer {version} is not installed at {target}; "
            "run `bash scripts/setup-env.sh` (it installs it with pip --target)",
            pytrace=False,
        )
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), full_env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=False,
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"CoreWeave tensorizer {version} subprocess exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return proc


def _is_coreweave_tensorizer(origin: str | None) -> bool:
    """True unless the module is ours (a `tensorizer` alias living inside tensorizer_rs)."""
    return origin is not None and "tensorizer_rs" not in Path(origin).parts


@pytest.fixture(scope="session", autouse=True)
def _coreweave_not_importable_here():
    try:
        spec = importlib.util.find_spec("tensorizer")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and _is_coreweave_tensorizer(spec.origin):
        pytest.fail(
            f"CoreWeave's `tensorizer` is importable in the test process ({spec.origin}); "
            "it must only be reachable through run_coreweave(). Remove it from the venv "
            "(`pip uninstall tensorizer`) and from PYTHONPATH.",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _coreweave_not_loaded_by_test():
    yield
    mod = sys.modules.get("tensorizer")
    if mod is not None and _is_coreweave_tensorizer(getattr(mod, "__file__", None)):
        pytest.fail(
            f"this test loaded CoreWeave's tensorizer into the test process ({mod.__file__}); "
            "use run_coreweave() instead",
            pytrace=False,
        )


# ----------------------------------------------------------------------------- S3 test server
class S3Server:
    """A running moto S3 server: ``endpoint`` (http://127.0.0.1:PORT) and a key pair it accepts."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str) -> None:
        self.endpoint, self.access_key, self.secret_key = endpoint, access_key, secret_key

    @property
    def opts(self) -> dict:
        """``open_stream`` / storage keyword arguments for this server."""
        return {
            "s3_endpoint": self.endpoint,
            "s3_access_key_id": self.access_key,
            "s3_secret_access_key": self.secret_key,
        }

    @property
    def env(self) -> dict:
        """The environment variables vLLM users set for it (read by tensorizer_rs too)."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
        }

    def client(self):
        """A boto3 S3 client for this server (test set-up and inspection only)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if it does not exist yet); returns the name."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), requests checked against one key pair."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "servers" / "moto_s3.py"), "--auth"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        yield S3Server(f"http://127.0.0.1:{info['port']}", info["access_key"], info["secret_key"])
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- Redis test server
class RedisServer:
    """A running ``redis-server`` on 127.0.0.1: ``host``, ``port``, ``uri(prefix)``, ``client()``."""

    def __init__(self, port: int) -> None:
        self.host, self.port = "127.0.0.1", port

    def uri(self, prefix: str) -> str:
        return f"redis://{self.host}:{self.port}/{prefix}"

    def client(self):
        """A ``redis.Redis`` client for this server (the package CoreWeave's to_redis takes)."""
        import redis

        return redis.Redis(host=self.host, port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real ``redis-server`` (apt package redis-server; scripts/setup-env.sh installs it) on a
    free port of 127.0.0.1, without persistence; stopped at the end of the session."""
    import shutil
    import socket
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir), "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
            time.sleep(0.05)
        yield RedisServer(port)
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- golden vectors
def load_manifests(directory: Path = VECTORS_DIR) -> dict[str, dict]:
    """All ``*.tensors.json`` manifests, keyed by vector file name; each gets a ``path`` key."""
    out = {}
    for mf in sorted(Path(directory).glob("*.tensors.json")):
        manifest = json.loads(mf.read_text())
        manifest["path"] = str(mf.with_name(manifest["file"]))
        out[manifest["file"]] = manifest
    return out


def _require_vectors() -> Path:
    if not any(VECTORS_DIR.glob("*.tensors.json")):
        pytest.fail(
            f"no golden vectors at {VECTORS_DIR}; set TENSORIZER_VECTORS to the vectors directory",
            pytrace=False,
        )
    return VECTORS_DIR


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    return _require_vectors()


@pytest.fixture(scope="session")
def vector_manifests(vectors_dir) -> dict[str, dict]:
    return load_manifests(vectors_dir)


@pytest.fixture(scope="session")
def direct_reader(tmp_path_factory) -> str:
    """bench/direct_reader.c built (the cold disk's O_DIRECT speed by C threads)."""
    from helpers import build_bench_c

    return str(build_bench_c(tmp_path_factory, "direct_reader"))


@pytest.fixture
def vector(request, vector_manifests) -> dict:
    """One manifest (see pytest_generate_tests); its ``path`` is the .tensors file."""
    return vector_manifests[request.param]


def pytest_generate_tests(metafunc):
    if "vector" in metafunc.fixturenames:
        names = sorted(p.name[: -len(".json")] for p in VECTORS_DIR.glob("*.tensors.json"))
        # With no vectors, one case whose fixture fails loudly instead of an empty (skipped) set.
        metafunc.parametrize("vector", names or ["<no vectors>"], indirect=True)


# ----------------------------------------------------------------------------- report / markers
def pytest_report_header(config):
    spec = importlib.util.find_spec("tensorizer_rs")
    have = [v for v in COREWEAVE_VERSIONS if (coreweave_dir(v) / "tensorizer").is_dir()]
    return [
        f"tensorizer_rs: {spec.origin if spec else 'NOT INSTALLED'}",
        f"vectors: {VECTORS_DIR}; CoreWeave tensorizer in {TZ_CACHE}: {', '.join(have) or 'none'}",
    ]


def pytest_collection_modifyitems(config, items):
    gpu_items = [i for i in items if i.get_closest_marker("gpu")]
    if gpu_items:
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if not has_cuda:
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    vllm_items = [i for i in items if i.get_closest_marker("vllm")]
    if vllm_items and importlib.util.find_spec("vllm") is None:
        for item in vllm_items:
            item.add_marker(pytest.mark.skip(reason="vLLM is not installed"))
