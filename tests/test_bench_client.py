"""bench/range_client.c, the bare reference client behind bench_remote.py's fresh-memory
ceiling: it must fetch exactly the served bytes, or its figures mean nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import http_server

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "range_client.c"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("cc") / "range_client"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(out), str(SOURCE)], check=True)
    return out


def run(client: Path, port: int, size: int, mode: str, check: Path) -> subprocess.CompletedProcess:
    # Four threads, one range each: one request per connection, as the HTTP/1.0 server needs.
    args = [str(port), "/data/blob", str(size), "4", "0", mode, "1", str(check)]
    return subprocess.run(
        [str(client), *args], check=False, capture_output=True, text=True, timeout=60
    )


def test_range_client_fetches_the_served_bytes(client, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(5 << 20) + b"an odd tail"
    (www / "blob").write_bytes(data)
    other = tmp_path / "other"
    other.write_bytes(data[:-1] + b"X")
    with http_server(www) as base:
        port = urlsplit(base).port
        for mode in ("null", "fresh", "reused"):
            r = run(client, port, len(data), mode, www / "blob")
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout.splitlines()[-1])
            assert out["mode"] == mode and out["gbps"] > 0 and out["threads"] == 4
        # The check is real: a file that differs in its last byte is caught.
        r = run(client, port, len(data), "fresh", other)
        assert r.returncode == 1 and "bytes differ" in r.stderr
