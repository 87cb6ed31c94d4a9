"""redis:// against a real redis-server on 127.0.0.1 (conftest.py ``redis_server``):
``TensorDeserializer.to_redis``, ``open_stream("redis://...")``, ``RedisStreamFile`` and
reading back through ``TensorDeserializer``, each cross-checked with CoreWeave's 2.12.1 in a
subprocess (its exports load here and ours load there), and bad input (missing prefix, keys
that vanish, gaps, garbage, an unreachable server) giving clear errors, never a hang.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import run_coreweave
from tensorizer_rs import (
    NotATensorizerFileError,
    TensorDeserializer,
    TensorizerError,
    TensorizerFileNotFoundError,
    TensorizerIOError,
    TensorSerializer,
)
from tensorizer_rs.stream_io import RedisStreamFile, open_stream

pytestmark = pytest.mark.crosscheck


def _module(meta: bool = True):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8))
    m[1].register_buffer("steps", torch.arange(5), persistent=True)
    if meta:
        # A meta tensor (like vLLM's marker): its data key is empty and shares its offset with
        # the next record's header key (2.12.1's RedisStreamFile fails on it: docs/format.md).
        m[0].register_parameter("marker", torch.nn.Parameter(torch.ones(2, device="meta")))
    m[1].register_buffer("z", torch.zeros(3))
    return m


def _write(path, m):
    s = TensorSerializer(path)
    s.write_module(m)
    s.close()


def _keys(client, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: client.get(k) for k in client.scan_iter(match=f"{prefix}:*")}


@pytest.fixture
def module_file(tmp_path):
    m = _module()
    path = tmp_path / "m.tensors"
    _write(path, m)
    return path, m


def _check(d, m):
    for name, t in m.state_dict().items():
        key = name if "." in name else f".{name}"
        want = torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t
        assert torch.equal(d[key], want), name


@pytest.mark.parametrize("meta", [False, True])
def test_to_redis_matches_coreweave_and_reads_back(redis_server, tmp_path, meta):
    """Our export and CoreWeave's of the same file are the same keys holding the same bytes;
    we read both exports back, and so does 2.12.1 (unless a meta tensor's empty key trips its
    reader)."""
    m = _module(meta)
    path = tmp_path / "m.tensors"
    _write(path, m)
    client = redis_server.client()
    client.flushdb()
    with TensorDeserializer(path, device="cpu", lazy_load=True) as d:
        d.to_redis(client, "ours")
    run_coreweave(
        "2.12.1",
        """
import sys, redis
from tensorizer import TensorDeserializer
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[2]))
d = TensorDeserializer(sys.argv[1], device="cpu", lazy_load=True)
d.to_redis(r, "theirs")
""",
        path,
        redis_server.port,
    )
    ours, theirs = _keys(client, "ours"), _keys(client, "theirs")
    assert ours == theirs and len(ours) == 1 + 2 * len(m.state_dict())
    assert ours[b"header:0"] == path.read_bytes()[: len(ours[b"header:0"])]

    for prefix in ("ours", "theirs"):
        _check(TensorDeserializer(open_stream(redis_server.uri(prefix)), device="cpu"), m)
        _check(TensorDeserializer(redis_server.uri(prefix), device="cpu", verify_hash=True), m)
        assert TensorDeserializer(redis_server.uri(prefix), device="cpu").verify_module(m)[0]
    if meta:
        return
    out = run_coreweave(
        "2.12.1",
        """
import sys, hashlib
from tensorizer import TensorDeserializer
from tensorizer.stream_io import open_stream
for prefix in ("ours", "theirs"):
    d = TensorDeserializer(open_stream(sys.argv[1] + prefix), device="cpu", verify_hash=True)
    print(prefix, sorted(d.keys()), hashlib.sha256(b"".join(
        d[k].detach().contiguous().view(-1).numpy().tobytes() for k in sorted(d.keys()))).hexdigest())
""",
        redis_server.uri(""),
    ).stdout.splitlines()
    assert len(out) == 2 and out[0].split(" ", 1)[1] == out[1].split(" ", 1)[1]
    want = sorted(n if "." in n else f".{n}" for n in m.state_dict())
    assert out[0].startswith(f"ours {want}")


def test_to_redis_force_and_structured_names(redis_server, tmp_path):
    """Existing records are kept unless force=True (as in 2.12.1); structured names (state
    dicts) round-trip here (2.12.1's own reader sends them unquoted and fails)."""
    sd = {"a": torch.arange(4.0), "b": [torch.ones(2), {"c": torch.zeros(3, dtype=torch.int64)}]}
    path = tmp_path / "sd.tensors"
    with TensorSerializer(path) as s:
        s.write_state_dict(sd)
    client = redis_server.client()
    d = TensorDeserializer(path, device="cpu", lazy_load=True)
    d.to_redis(client, "sd")
    keys = _keys(client, "sd")
    assert b'\x1e["b",1,"c"]:' in b"".join(keys) and len(keys) == 7
    tree = TensorDeserializer(redis_server.uri("sd"), device="cpu").tree()
    assert torch.equal(tree["b"][1]["c"], sd["b"][1]["c"]) and torch.equal(tree["a"], sd["a"])

    data_key = next(k for k in keys if k.startswith(b"a:") and len(keys[k]) == 16)
    client.set(b"sd:" + data_key, b"\0" * 16)
    d.to_redis(client, "sd")  # the record's header key exists: skipped
    assert client.get(b"sd:" + data_key) == b"\0" * 16
    d.to_redis(client, "sd", force=True)
    assert client.get(b"sd:" + data_key) == keys[data_key]
    d.close()


def test_to_redis_after_an_eager_load(redis_server, module_file, tmp_path):
    """2.12.1 raises ValueError (its file is closed); we reopen a path. A stream that cannot be
    reopened is a clear ValueError."""
    path, m = module_file
    client = redis_server.client()
    TensorDeserializer(path, device="cpu").to_redis(client, "eager")
    _check(TensorDeserializer(redis_server.uri("eager"), device="cpu"), m)
    with open(path, "rb") as f:
        import io

        d = TensorDeserializer(io.BytesIO(f.read()), device="cpu")
    with pytest.raises(ValueError, match="cannot be reopened; use lazy_load=True"):
        d.to_redis(client, "stream")


FILE_OBJECT = """
import sys
from tensorizer.stream_io import RedisStreamFile, open_stream
def exc(e):
    mro = [c for c in type(e).__mro__ if c.__module__ == "builtins"]
    return mro[max(0, mro.index(Exception) - 1)].__name__
def attempt(label, f):
    try:
        r = f()
        print(label, bytes(r).hex() if isinstance(r, (bytes, bytearray)) else r)
    except Exception as e:
        print(label, "raises", exc(e))
uri = sys.argv[1]
f = open_stream(uri)
print(type(f).__name__, f.tell(), f.readable(), f.seekable(), f.writable(), f.fileno())
attempt("read5", lambda: f.read(5))
attempt("tell", f.tell)
attempt("read60", lambda: f.read(60))
attempt("read8", lambda: f.read(8))
ba = bytearray(16)
attempt("readinto", lambda: (f.readinto(ba), ba.hex()))
f.seek(0)
attempt("from 0", lambda: f.read(9))
attempt("seek end", lambda: f.seek(0, 2))
attempt("readline", lambda: f.readline())
g = RedisStreamFile(uri, begin=3)
attempt("begin", lambda: (g.tell(), g.read(4).hex()))
f.seek(0)
attempt("all", lambda: len(f.read(int(sys.argv[2]))))
f.close()
attempt("closed", lambda: f.read(1))
attempt("mode", lambda: open_stream(uri, "wb"))
attempt("scheme", lambda: RedisStreamFile("http://127.0.0.1/x"))
"""


def test_redis_stream_file_behaves_like_coreweaves(redis_server, module_file):
    """The same bytes, positions and error classes for reads, readinto and bad calls. Past the
    exported bytes 2.12.1 returns zeros, and after a seek inside a key it has partly read it
    returns that key's next bytes instead of the ones asked for (docs/format.md): we return
    the file's bytes, checked here against the file."""
    path, _ = module_file
    with TensorDeserializer(path, device="cpu", lazy_load=True) as d:
        d.to_redis(redis_server.client(), "fobj")
    last = path.stat().st_size - 8  # the file's u64 0 terminator is not exported
    theirs = run_coreweave("2.12.1", FILE_OBJECT, redis_server.uri("fobj"), last).stdout
    ours = run_coreweave(
        "2.12.1",
        FILE_OBJECT.replace("from tensorizer.stream_io", "from tensorizer_rs.stream_io"),
        redis_server.uri("fobj"),
        last,
    ).stdout
    assert ours.splitlines() == theirs.splitlines()
    data = path.read_bytes()
    f = RedisStreamFile(redis_server.uri("fobj"))
    assert f.read(5) == data[:5]
    for pos, n in ((65, 8), (60, 16), (262217 - 3, 10), (last - 4, 10), (7, 300000)):
        f.seek(pos)
        assert f.read(n) == data[pos : min(pos + n, last)], (pos, n)
    f.seek(-10, 1)
    assert f.read(10) == data[last - 10 : last]
    f.seek(0)
    assert f.read() == data[:last] and f.read(5) == b"" and f.tell() == last
    assert f.name == redis_server.uri("fobj") and f.bytes_read > last
    limited = open_stream(redis_server.uri("fobj"), begin=10, end=20)
    assert limited.read() == path.read_bytes()[10:20]


def test_bad_redis_input(redis_server, module_file):
    path, _ = module_file
    client = redis_server.client()
    with TensorDeserializer(path, device="cpu", lazy_load=True) as d:
        d.to_redis(client, "bad")
    uri = redis_server.uri("bad")

    with pytest.raises(
        TensorizerFileNotFoundError, match=r"redis://127\.0\.0\.1:\d+/nothing: no keys"
    ):
        TensorDeserializer(redis_server.uri("nothing"), device="cpu")
    with pytest.raises(FileNotFoundError):
        open_stream(redis_server.uri("nothing"))
    with pytest.raises(ValueError, match="no key prefix"):
        open_stream(f"redis://127.0.0.1:{redis_server.port}/")
    with pytest.raises(ValueError):
        open_stream("redis://127.0.0.1:notaport/x")
    with pytest.raises(ValueError, match='Only the mode "rb"'):
        open_stream(uri, "wb")
    with pytest.raises(ValueError, match='Only the mode "rb"'):
        TensorSerializer(uri)

    # Nothing listening: a prompt OSError naming the server, not a hang.
    start = time.monotonic()
    with pytest.raises(
        TensorizerIOError, match=r"redis://127\.0\.0\.1:1/x: Redis at 127\.0\.0\.1:1"
    ):
        TensorDeserializer("redis://127.0.0.1:1/x", device="cpu")
    assert time.monotonic() - start < 10

    # A data key deleted after the keys were listed: the read names it.
    keys = sorted(_keys(client, "bad"), key=lambda k: int(k.rsplit(b":", 1)[1]))
    for k, v in _keys(client, "bad").items():
        client.set(b"gone:" + k, v)
    stream = open_stream(redis_server.uri("gone"))
    client.delete(b"gone:" + keys[-1])
    with pytest.raises(TensorizerIOError, match=r"key 'gone:1\.z:\d+' changed or disappeared"):
        TensorDeserializer(stream, device="cpu")

    # A record missing before open: a gap, named by its offset.
    for k, v in _keys(client, "bad").items():
        client.set(b"gap:" + k, v)
    client.delete(b"gap:" + keys[2])
    with pytest.raises(TensorizerIOError, match=r"/gap: no key holds the bytes at offset \d+"):
        TensorDeserializer(redis_server.uri("gap"), device="cpu")

    # Not a .tensors file: the same error as for a file, naming the URI.
    client.set("junk:x:0", b"not a tensors file at all" * 4)
    with pytest.raises(NotATensorizerFileError, match=r"redis://127\.0\.0\.1:\d+/junk"):
        TensorDeserializer(redis_server.uri("junk"), device="cpu")
    # Overlapping records (two exports under one prefix, say).
    client.set("overlap:a:0", b"x" * 10)
    client.set("overlap:b:5", b"y" * 10)
    with pytest.raises(TensorizerError, match="overlap"):
        open_stream(redis_server.uri("overlap"))
