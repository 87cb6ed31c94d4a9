"""The bare C clients behind the benchmarks' ceilings: bench/range_client.c (bench_remote.py's
fresh-memory ceiling) must fetch exactly the served bytes, and bench/direct_reader.c (the cold
disk's O_DIRECT speed) must count exactly the bytes it read, or their figures mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import build_bench_c, http_server


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    return build_bench_c(tmp_path_factory, "range_client")


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


def test_direct_reader_counts_every_byte_up_to_the_limit(tmp_path, direct_reader):
    path = tmp_path / "f.bin"
    size = 3 * (1 << 20) + 12345  # not a whole number of chunks
    path.write_bytes(os.urandom(size))

    def read(*args):
        p = subprocess.run(
            [direct_reader, str(path), *args], capture_output=True, text=True, check=False
        )
        if p.returncode != 0 and "Invalid argument" in p.stderr:
            pytest.skip(f"no O_DIRECT on {tmp_path}: {p.stderr.strip()}")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    assert read("4", str(1 << 20))["bytes"] == size
    assert read("16", "4096")["bytes"] == size
    r = read("2", str(1 << 20), str(2 * (1 << 20) + 4096))
    assert r["bytes"] == 2 * (1 << 20) + 4096 and r["gbps"] > 0
    # The buffers' page size on request: 4 KiB pages hold no huge page; huge ones do where the
    # kernel has transparent huge pages at all. 0 is no limit.
    small = read("2", str(4 << 20), "0", "4k")
    assert small["bytes"] == size and small["huge_kb"] == 0, small
    huge = read("2", str(4 << 20), "0", "huge")
    assert huge["bytes"] == size, huge
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():
        assert huge["huge_kb"] >= 2048, huge
    # Settings it cannot honour are refused, not rounded.
    for args in (["4", "1000"], ["4", "4096", "0", "64k"]):
        bad = subprocess.run([direct_reader, str(path), *args], capture_output=True, check=False)
        assert bad.returncode == 2, args
