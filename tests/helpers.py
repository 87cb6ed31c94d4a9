"""Small helpers shared by the Python tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorizer_rs import DecryptionParams


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-contiguous bytes of a tensor (any dtype)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def entry_key(entry: dict):
    name = entry["name"]
    return tuple(name) if isinstance(name, list) else name


def lookup(d, key):
    if isinstance(key, tuple):
        node = d[key[0]]
        for k in key[1:]:
            node = node[k]
        return node
    return d[key]


def decryption_for(manifest: dict, vectors_dir: Path):
    enc = manifest.get("encryption")
    if not enc:
        return None
    if enc["kind"] == "random_key":
        return DecryptionParams.from_key((vectors_dir / enc["key_file"]).read_bytes())
    return DecryptionParams.from_string(enc["passphrase"])


# ----------------------------------------------------------------------------- test servers
SERVERS = Path(__file__).parent / "servers"


@contextlib.contextmanager
def http_server(root: Path, tls: tuple | None = None):
    """tests/servers/http_server.py serving `root` (files under /data/NAME, faults on other
    prefixes), over TLS given `(cert, key)` PEM paths; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVERS / "http_server.py"), str(root), *map(str, tls or ())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx(d: Path, servers: str, ports: list[int]):
    """A real nginx in `d`, serving the `server { ... }` blocks `servers` (on `ports`, which it
    must be listening on before this yields); killed at the end. Without nginx the test fails
    in CI and is skipped elsewhere."""
    if shutil.which("nginx") is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed", pytrace=False)
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    (d / "tmp").mkdir()
    user = "user root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    temp = " ".join(
        f"{k}_temp_path {d}/tmp;" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"""{user}
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    {temp}
    {servers}
}}
"""
    )
    log = d / "error.log"
    proc = subprocess.Popen(
        ["nginx", "-e", str(log), "-p", str(d), "-c", str(d / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for port in ports:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"nginx exited: {log.read_text()}", pytrace=False)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"nginx did not listen on {port}: {log.read_text()}", pytrace=False
                        )
                    time.sleep(0.05)
        yield
    finally:
        proc.kill()
        proc.wait()


def requests_seen(base: str) -> dict:
    """Requests http_server.py has seen, per path."""
    with urllib.request.urlopen(f"{base}/__stats") as r:
        return json.loads(r.read())


def interrupt_load(
    base: str, path: str, load: str, env: dict | None = None, min_requests: int = 2
) -> tuple[str, str, float]:
    """Run `load` (Python statements loading `base + path`) in a subprocess (with `env` added
    to the environment), send it SIGINT once the native load is under way (`min_requests` have
    reached the server: by default the open probe and a ranged read), and return its stdout,
    its stderr and the seconds it took to end after that."""
    code = (
        # Python leaves SIGINT ignored when it starts so (a background job of a shell without
        # job control, as CI may run us): ask for KeyboardInterrupt explicitly.
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{load}\n"
        "print('loaded', flush=True)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 60
        while requests_seen(base).get(path, 0) < min_requests:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        return sigint_and_wait(p, 0.5)
    finally:
        p.kill()
        p.wait()


def sigint_and_wait(p: subprocess.Popen, settle: float) -> tuple[str, str, float]:
    """`settle` seconds on, SIGINT the child `p` (still running then); return its stdout, stderr
    and how long it took to end after the signal."""
    time.sleep(settle)
    assert p.poll() is None, p.communicate()
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    return out, err, time.monotonic() - t0


def build_bench_c(tmp_path_factory, name: str) -> Path:
    """bench/NAME.c built with the host's C compiler (skips without one)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("cc") / name
    source = Path(__file__).resolve().parent.parent / "bench" / f"{name}.c"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(out), str(source)], check=True)
    return out
