"""Loading and writing over HTTP and S3 from Python, against real servers on 127.0.0.1:
a Range-capable HTTP/1.0 server and moto's S3 server with SigV4 checking."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import decryption_for, entry_key, http_server, interrupt_load, lookup, sha256
from tensorizer_rs import (
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorizerError,
    TensorSerializer,
)
from tensorizer_rs.stream_io import open_stream


@pytest.fixture(scope="module")
def http_root(tmp_path_factory, vectors_dir):
    root = tmp_path_factory.mktemp("www")
    for f in Path(vectors_dir).iterdir():
        shutil.copy(f, root / f.name)
    with http_server(root) as base:
        yield base, root


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.bucket("models")
    return s3_server.opts


def _positive(v):
    return all(v["expect"][k] == "ok" for k in ("open", "load", "verify_hash"))


def _check(d, manifest):
    for m in manifest["tensors"]:
        t = lookup(d, entry_key(m))
        assert sha256(t) == m["sha256"] and list(t.shape) == m["shape"], m["name"]


def test_every_vector_over_http(http_root, vector_manifests, vectors_dir):
    base, _ = http_root
    for name, v in vector_manifests.items():
        if not _positive(v):
            continue
        d = TensorDeserializer(
            f"{base}/data/{name}",
            device="cpu",
            verify_hash=True,
            encryption=decryption_for(v, Path(vectors_dir)),
        )
        _check(d, v)


def test_http_redirect_retry_and_errors(http_root, vector_manifests):
    base, _ = http_root
    v = vector_manifests["dtypes.tensors"]
    _check(TensorDeserializer(f"{base}/redirect/dtypes.tensors", device="cpu"), v)
    _check(TensorDeserializer(f"{base}/fail500/2/dtypes.tensors", device="cpu"), v)
    _check(TensorDeserializer(f"{base}/drop/1/dtypes.tensors", device="cpu"), v)
    with pytest.raises(FileNotFoundError):
        TensorDeserializer(f"{base}/data/missing.tensors", device="cpu")
    with pytest.raises(TensorizerError, match="always500"):
        TensorDeserializer(f"{base}/always500/dtypes.tensors", device="cpu")


def test_caller_headers_never_follow_a_redirect_to_another_host(http_root, vector_manifests):
    """A redirect to another origin (127.0.0.1 -> localhost) is followed without the caller's
    headers only: with `headers` given it is refused by name (was: reqwest dropped only
    Authorization and cookies, and an X-Api-Key went along to the other host)."""
    from tensorizer_rs.stream_io import CURLStreamFile

    base, _ = http_root
    v = vector_manifests["dtypes.tensors"]
    url = f"{base}/elsewhere/dtypes.tensors"
    _check(TensorDeserializer(url, device="cpu"), v)
    with pytest.raises(TensorizerError, match="redirected to another host") as e:
        TensorDeserializer(CURLStreamFile(url, headers={"X-Api-Key": "secret"}), device="cpu")
    assert "localhost" in str(e.value) and "secret" not in str(e.value)
    # The same origin still redirects with them.
    same = CURLStreamFile(f"{base}/redirect/dtypes.tensors", headers={"X-Api-Key": "secret"})
    _check(TensorDeserializer(same, device="cpu"), v)


def test_http_wrong_range_is_refused(http_root):
    """A server that answers a ranged request with other bytes than asked for (a 206 starting
    one byte later) fails the load clearly, through the direct client and through reqwest;
    never shifted bytes in a tensor."""
    base, root = http_root
    sd = {"w": torch.arange(600_000, dtype=torch.float32)}
    s = TensorSerializer(str(root / "shifted.tensors"))
    s.write_state_dict(sd)
    s.close()

    class Source:
        _tensorizer_uri = f"{base}/shifted/shifted.tensors"
        _tensorizer_storage = None

    for direct in (True, False):
        Source._tensorizer_storage = {"http_direct": direct}
        with pytest.raises(TensorizerError, match="different range") as e:
            d = TensorDeserializer(Source(), device="cpu")
            d["w"]
        assert "shifted.tensors" in str(e.value), (direct, e.value)


def test_plain_http_cpu_load_reads_into_the_tensors(http_root):
    """A CPU load over plain HTTP receives the bodies straight into the tensors (one request
    per piece); http_direct=False sends them through reqwest. Same bytes either way."""
    from tensorizer_rs import _native

    base, root = http_root
    g = torch.Generator().manual_seed(5)
    sd = {"big": torch.randn(3_000_000, generator=g), "small": torch.randn(1000, generator=g)}
    s = TensorSerializer(str(root / "direct.tensors"))
    s.write_state_dict(sd)
    s.close()

    class Source:  # a URI with storage options, as open_stream's readers carry them
        _tensorizer_uri = f"{base}/dropmid/1/direct.tensors"
        _tensorizer_storage = None

    for direct in (True, False):
        Source._tensorizer_storage = {"http_direct": direct}
        before = _native.http_direct_bytes()
        d = TensorDeserializer(Source(), device="cpu")
        for k, v in sd.items():
            assert torch.equal(d[k], v), (k, direct)
        moved = _native.http_direct_bytes() - before
        if direct:
            assert moved >= sd["big"].numel() * 4 - (1 << 20), moved  # all but the probe's MiB
        else:
            assert moved == 0, moved


_TRACE_CHILD = """
import json, sys
from tensorizer_rs import TensorDeserializer, _native
d = TensorDeserializer(sys.argv[1], device="cpu")
n = sum(t.numel() * t.element_size() for t in d.values())
print(json.dumps({"bytes": n, "events": _native.trace_take()}))
"""


def test_trace_records_a_remote_load(http_root, tmp_path):
    """TENSORIZER_RS_TRACE=1: the load's timeline (readers, pieces, requests) in order; unset,
    nothing is recorded."""
    import os

    base, root = http_root
    big = torch.arange(3_000_000, dtype=torch.float32)
    s = TensorSerializer(str(root / "trace.tensors"))
    s.write_state_dict({"big": big, "small": torch.ones(10)})
    s.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def child(trace: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _TRACE_CHILD, f"{base}/data/trace.tensors"],
            env={**env, "TENSORIZER_RS_TRACE": trace},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = child("1")
    ev = got["events"]
    names = {e[2] for e in ev}
    for want in ("reader_start", "reader_end", "piece", "piece_end", "http_request", "http_head"):
        assert want in names, (want, names)
    assert [e[0] for e in ev] == sorted(e[0] for e in ev)
    # The big tensor's data went in pieces whose lengths add up to it, each ended on the
    # thread that began it.
    pieces = [e for e in ev if e[2] == "piece"]
    assert sum(e[4] for e in pieces) == big.numel() * 4
    for p in pieces:
        assert any(e[2] == "piece_end" and e[1] == p[1] and e[3] == p[3] for e in ev), p
    assert child("")["events"] == []


def test_s3_vectors_serialize_and_side_files(s3, vector_manifests, vectors_dir, tmp_path):
    for name in ("dtypes.tensors", "enc_vllm_chunked.tensors", "nested_state_dict.tensors"):
        v = vector_manifests[name]
        with open_stream(f"s3://models/v/{name}", "wb", **s3) as f:
            f.write(Path(v["path"]).read_bytes())
        stream = open_stream(f"s3://models/v/{name}", "rb", **s3)
        d = TensorDeserializer(
            stream, device="cpu", verify_hash=True, encryption=decryption_for(v, Path(vectors_dir))
        )
        _check(d, v)
    # Serialize straight to S3 (multipart, no local file), encrypted, and read it back.
    sd = {
        f"layer.{i}": torch.randn(1 << 20, generator=torch.Generator().manual_seed(i))
        for i in range(6)
    }
    enc = EncryptionParams.random()
    s = TensorSerializer(open_stream("s3://models/m/model.tensors", "wb+", **s3), encryption=enc)
    s.write_state_dict(sd)
    s.close()
    d = TensorDeserializer(
        open_stream("s3://models/m/model.tensors", **s3),
        device="cpu",
        verify_hash=True,
        encryption=DecryptionParams.from_key(enc.key),
    )
    assert all(torch.equal(d[k], t) for k, t in sd.items())
    with open_stream("s3://models/m/model.tensors", **s3) as f:
        assert f.read(5) == b"|TZR|"


def test_s3_errors_name_bucket_and_key(s3):
    wrong = dict(s3, s3_secret_access_key="not-the-secret")
    with pytest.raises(TensorizerError, match="access denied") as e:
        TensorDeserializer(open_stream("s3://models/v/dtypes.tensors", **wrong), device="cpu")
    assert "s3://models/v/dtypes.tensors" in str(e.value)
    assert "not-the-secret" not in str(e.value) and s3["s3_secret_access_key"] not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        TensorDeserializer(open_stream("s3://models/nope.tensors", **s3), device="cpu")
    assert "s3://models/nope.tensors" in str(e.value)


def test_failed_s3_write_leaves_nothing(s3):
    target = open_stream("s3://models/fail/model.tensors", "wb+", **s3)
    with pytest.raises(TypeError), TensorSerializer(target) as s:
        s.write_state_dict({"ok": torch.ones(4 << 20), "bad": "not a tensor"})
    with pytest.raises(FileNotFoundError):
        open_stream("s3://models/fail/model.tensors", **s3)


@pytest.mark.parametrize("client", ["direct", "reqwest"])
@pytest.mark.parametrize("mode", ["slow", "stall"])
def test_ctrl_c_stops_a_load(tmp_path, mode, client):
    """Ctrl-C while a load waits on a slow server (16 KiB per connection every 100 ms: this
    load would take most of a minute) or a silent one (no byte after the first 16 KiB, the
    connection left open: a read times out after 60 s) raises KeyboardInterrupt within
    moments, as it would in Python code, instead of when the load ends. Both HTTP clients:
    the direct one and reqwest's (``TENSORIZER_RS_HTTP_DIRECT=0``), whose requests run through
    the same ranged reads as S3's."""
    root = tmp_path / "www"
    root.mkdir()
    with TensorSerializer(str(root / "big.tensors")) as s:
        s.write_state_dict({f"t{i}": torch.zeros(2 << 20) for i in range(4)})  # 32 MiB
    with http_server(root) as base:
        url = f"{base}/{mode}/big.tensors"
        load = f"from tensorizer_rs import TensorDeserializer as D; D({url!r}, device='cpu')"
        env = {"TENSORIZER_RS_HTTP_DIRECT": "0"} if client == "reqwest" else {}
        out, err, took = interrupt_load(base, f"/{mode}/big.tensors", load, env)
    assert "KeyboardInterrupt" in err, err
    assert "loaded" not in out
    assert took < 5, f"the load went on for {took:.1f} s after Ctrl-C"
