"""Small helpers shared by the Python tests."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

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
