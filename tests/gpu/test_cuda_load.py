"""Loading to CUDA on a real GPU (run on the GPU machine; skipped elsewhere).

The counters of the Rust core prove the bytes went through the pinned staging pool straight
to the device: a host load followed by ``.to("cuda")`` leaves them untouched (checked below).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import decryption_for, entry_key, lookup, sha256
from tensorizer_rs import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    HashMismatchError,
    TensorDeserializer,
    TensorizerValueError,
    TensorSerializer,
    _cuda,
    _native,
)

pytestmark = pytest.mark.gpu


def _ok(m):
    exp = m["expect"]
    return (
        all(exp[k] == "ok" for k in ("open", "load", "verify_hash"))
        or exp.get("spec_correct_reader") == "ok"
    )


def _moved(before, after):
    keys = ("staged_bytes", "pageable_bytes")
    return sum(after[k] - before[k] for k in keys)


@pytest.fixture(autouse=True)
def _defaults():
    default = _cuda.staging()
    yield
    _cuda.IO_MODE = None
    _cuda.staging(*default[:2], default[3])


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_vectors_to_cuda_exact_bytes(vector, vectors_dir, lazy):
    if not _ok(vector):
        pytest.skip("negative vector")
    enc = decryption_for(vector, Path(vectors_dir))
    before = _cuda.counters()
    d = TensorDeserializer(
        vector["path"], device="cuda", verify_hash=True, lazy_load=lazy, encryption=enc
    )
    stored = 0
    for m in vector["tensors"]:
        t = lookup(d, entry_key(m))
        assert t.device.type == "cuda", m["name"]
        assert str(t.dtype) == "torch." + m["dtype"], m["name"]
        assert list(t.shape) == m["shape"], m["name"]
        assert sha256(t.cpu()) == m["sha256"], m["name"]
        if not m.get("is_meta"):
            stored += m["nbytes"]
    after = _cuda.counters()
    assert _moved(before, after) == stored
    assert after["h2d_copies"] > before["h2d_copies"] or stored == 0
    d.close()


def test_host_load_then_to_cuda_is_not_counted(tmp_path):
    path = _write(tmp_path / "a.tensors", {"w": torch.randn(1000, 1000)})
    before = _cuda.counters()
    t = TensorDeserializer(path, device="cpu")["w"].to("cuda")
    assert t.is_cuda and _cuda.counters() == before


def _write(path, sd):
    s = TensorSerializer(str(path))
    s.write_state_dict(sd)
    s.close()
    return str(path)


def _state(seed=0, scale=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(4096 * scale, 1024, generator=g),  # 16 MiB per scale
        "norm": torch.randn(1024, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (3001,), generator=g),
        "mask": torch.rand(301, generator=g) > 0.5,
        "meta": torch.empty(128, 129, device="meta"),
        "empty": torch.empty(0, 5),
        "odd": torch.randn(333_333, generator=g),
    }


def _check(out, sd):
    for k, v in sd.items():
        want = torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v
        got = out[k]
        assert got.is_cuda, k
        assert got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got.cpu(), want), k


@pytest.mark.parametrize(
    "mode",
    [
        {"io": "buffered", "pinned": "driver"},
        {"io": "buffered", "pinned": "thp"},
        {"io": "direct", "pinned": "driver"},
        {"io": "auto", "pinned": "thp"},
    ],
    ids=["buffered", "buffered-thp", "direct", "auto"],
)
def test_larger_than_staging_pool(tmp_path, mode):
    _cuda.staging(8 << 20, 2 << 20, mode["pinned"])
    _cuda.release_staging(0)
    _cuda.IO_MODE = mode["io"]
    sd = _state(1, scale=4)  # 64 MiB + small ones
    path = _write(tmp_path / "big.tensors", sd)
    _cuda.reset_counters()
    d = TensorDeserializer(path, device="cuda")
    _check(d, sd)
    c = _cuda.counters()
    assert c["peak_staging_allocated"] <= 8 << 20, c
    assert c["staged_bytes"] >= 64 << 20, c
    if mode["io"] == "direct":
        assert c["direct_read_bytes"] > 60 << 20, c


def test_partly_cached_file(tmp_path):
    """`auto` reads what the page cache holds through it and the rest past it (O_DIRECT): a
    file whose first half alone is cached loads exactly, direct reads covering the other half."""
    sd = _state(3, scale=8)  # a 128 MiB tensor first, the small ones after it
    path = _write(tmp_path / "half.tensors", sd)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages, so the kernel may drop them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        half = size // 2 // 4096 * 4096
        assert len(os.pread(fd, half, 0)) == half  # the first half back in the cache,
        os.posix_fadvise(fd, half, 0, os.POSIX_FADV_DONTNEED)  # and not what readahead added
    finally:
        os.close(fd)
    _cuda.IO_MODE = "auto"
    _cuda.reset_counters()
    d = TensorDeserializer(path, device="cuda")
    _check(d, sd)
    c = _cuda.counters()
    # Reads of 4 MiB: the one across the boundary goes direct too.
    assert abs(c["direct_read_bytes"] - (size - half)) <= 8 << 20, (c, size)
    assert c["staged_bytes"] >= 128 << 20, c


def test_torch_sees_bytes_on_its_current_stream(tmp_path):
    sd = _state(2)
    path = _write(tmp_path / "s.tensors", sd)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        d = TensorDeserializer(path, device="cuda")
        total = d["embed"].double().sum()  # queued on s, right after the load
    s.synchronize()
    assert total.item() == pytest.approx(sd["embed"].double().sum().item())


class Block(torch.nn.Module):
    def __init__(self, dtype=torch.float32, device=None):
        super().__init__()
        self.lin = torch.nn.Linear(1024, 2048, dtype=dtype, device=device)
        self.norm = torch.nn.LayerNorm(2048, dtype=dtype, device=device)
        self.register_buffer("steps", torch.zeros(7, dtype=torch.int64, device=device))


def _write_module(path, m):
    s = TensorSerializer(str(path))
    s.write_module(m)
    s.close()
    return str(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_load_into_module_in_place(tmp_path, lazy):
    torch.manual_seed(3)
    src = Block()
    src.steps += 5
    path = _write_module(tmp_path / "m.tensors", src)
    dst = Block(device="cuda")
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    weight = dst.lin.weight
    torch.cuda.synchronize()
    mem = torch.cuda.memory_allocated()
    before = _cuda.counters()
    d = TensorDeserializer(path, device="cuda", lazy_load=lazy)
    assert d.load_into_module(dst) == 5
    assert torch.cuda.memory_allocated() == mem  # no second allocation
    assert dst.lin.weight is weight and weight.requires_grad
    for k, v in dst.state_dict().items():
        assert v.data_ptr() == ptrs[k], k
        assert torch.equal(v.cpu(), src.state_dict()[k]), k
    assert _moved(before, _cuda.counters()) == sum(v.nbytes for v in src.state_dict().values())


def test_eager_deserializer_then_mapping_access(tmp_path):
    sd = _state(4)
    path = _write(tmp_path / "e.tensors", sd)
    d = TensorDeserializer(path, device="cuda")
    assert len(d) == len(sd) and "embed" in d
    _check(d, sd)
    assert list(d.read_tensors()) == []  # eager: nothing left to yield


def test_load_into_module_meta_creates(tmp_path):
    torch.manual_seed(5)
    src = Block()
    path = _write_module(tmp_path / "m.tensors", src)
    dst = Block(device="meta")
    TensorDeserializer(path, device="cuda").load_into_module(dst)
    for k, v in dst.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), src.state_dict()[k]), k


def test_shape_mismatch_is_clear(tmp_path):
    path = _write_module(tmp_path / "m.tensors", Block())
    dst = Block(device="cuda")
    dst.lin = torch.nn.Linear(1024, 2047, device="cuda")
    before = _cuda.counters()
    with pytest.raises(TensorizerValueError, match=r"lin\.weight.*shape"):
        TensorDeserializer(path, device="cuda").load_into_module(dst)
    assert _cuda.counters()["h2d_copies"] == before["h2d_copies"]


def test_vllm_fill_in_place_where_it_fits(tmp_path):
    """The vLLM loader's GPU part: tensors that match the file are filled where the model's
    constructor put them (no release, no second allocation); a mismatching one is replaced."""
    from tensorizer_rs.vllm.fill import fill_module

    torch.manual_seed(8)
    src = Block()
    path = _write_module(tmp_path / "m.tensors", src)
    dst = Block(device="cuda")
    dst.lin = torch.nn.Linear(1024, 2047, device="cuda")  # the file's lin is 1024 -> 2048
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    names = frozenset(src.state_dict())
    fill_module(dst, path, "cuda", None, {}, release=names)
    for k, v in dst.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), src.state_dict()[k]), k
        assert (v.data_ptr() == ptrs[k]) == (not k.startswith("lin.")), k
    assert not dst.lin.weight.requires_grad


@pytest.mark.parametrize("path", ["data", "dropmid/2"])
def test_url_to_cuda_streams_pieces(tmp_path, path):
    """A file over HTTP (tests/servers/http_server.py): the pieces of large tensors stream
    through the staging buffers, one request each, resumed after dropped connections; with
    the last pieces split finer for many readers, still no request smaller than a buffer."""
    import json
    import subprocess
    import sys
    import urllib.request

    sd = _state(10, scale=5)  # an 80 MiB tensor: two pieces over ten staging buffers
    _write(tmp_path / "u.tensors", sd)
    server = Path(__file__).resolve().parents[1] / "servers" / "http_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(server), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        total = sum(v.nbytes for v in sd.values() if v.device.type != "meta")

        def load(**kw) -> int:
            before = _cuda.counters()
            with urllib.request.urlopen(f"{base}/__stats") as r:
                seen = json.loads(r.read()).get(f"/{path}/u.tensors", 0)
            _check(TensorDeserializer(f"{base}/{path}/u.tensors", device="cuda", **kw), sd)
            after = _cuda.counters()
            assert after["staged_bytes"] - before["staged_bytes"] == total
            with urllib.request.urlopen(f"{base}/__stats") as r:
                return json.loads(r.read())[f"/{path}/u.tensors"] - seen

        # One reader splits the last pieces in two at most: far fewer requests than staging
        # buffers' worth of bytes.
        seen = load(num_readers=1)
        assert seen < total // (8 << 20), seen
        tapered = load()
        assert seen < tapered <= total // (8 << 20) + len(sd) + 2, (seen, tapered)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("client", ["direct", "reqwest"])
@pytest.mark.parametrize("mode", ["slow", "stall"])
def test_ctrl_c_stops_a_cuda_load(tmp_path, mode, client):
    """Ctrl-C while a load to CUDA waits on a server trickling 16 KiB every 100 ms, or one
    gone silent after 16 KiB, raises KeyboardInterrupt within moments (the loading thread
    checks Python's signals every 100 ms; waiting reads give up within a second), through
    either HTTP client."""
    from helpers import http_server, interrupt_load

    _write(tmp_path / "s.tensors", {f"t{i}": torch.zeros(2 << 20) for i in range(4)})
    with http_server(tmp_path) as base:
        url = f"{base}/{mode}/s.tensors"
        # An eager CUDA deserializer loads at first use.
        load = f"from tensorizer_rs import TensorDeserializer as D; D({url!r}, device='cuda')['t0']"
        env = {"TENSORIZER_RS_HTTP_DIRECT": "0"} if client == "reqwest" else {}
        out, err, took = interrupt_load(base, f"/{mode}/s.tensors", load, env)
    assert "KeyboardInterrupt" in err and "loaded" not in out, err
    assert took < 5, f"the load went on for {took:.1f} s after Ctrl-C"


_RESERVE_PROBE = """
import hashlib, json, sys, torch
from tensorizer_rs import TensorDeserializer
torch.cuda.init()
if sys.argv[2]:  # settings changed at run time (torch >= 2.9 names it so, older torch differently)
    set_conf = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (set_conf or torch.cuda.memory._set_allocator_settings)(sys.argv[2])
s0 = torch.cuda.memory_stats()
d = TensorDeserializer(sys.argv[1], device="cuda")
t = dict(d.items())
s1 = torch.cuda.memory_stats()
grown = lambda k: s1.get(k, 0) - s0.get(k, 0)
ptrs = {v.untyped_storage().data_ptr() for v in t.values()}
print(json.dumps({
    "segments": grown("segment.all.allocated"),
    "reserved": grown("reserved_bytes.all.current"),
    "storages": len(ptrs),
    "sha": {k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest() for k, v in t.items()},
}))
"""


@pytest.mark.parametrize(
    "conf,runtime",
    [
        ("", ""),
        ("expandable_segments:True", ""),
        ("max_split_size_mb:32", ""),
        ("", "max_split_size_mb:32"),
    ],
    ids=["default", "expandable", "max-split", "max-split-at-run-time"],
)
def test_new_tensors_split_one_reserved_block(tmp_path, conf, runtime):
    """A large load of new tensors asks the driver for one block and splits it in torch's
    cache (each tensor keeps its own storage), unless the allocator's settings would leave that
    block unused beside the tensors: then one allocation each, and never twice the memory
    (settings changed at run time: the unsplit block is given back)."""
    import json
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(8)
    # 12 MiB each: torch gives allocations over 10 MiB a driver allocation of their own.
    sd = {f"w{k}": torch.randn(3 << 20, generator=g) for k in range(8)}
    path = _write(tmp_path / "r.tensors", sd)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
    run = subprocess.run(
        [sys.executable, "-c", _RESERVE_PROBE, path, runtime],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["sha"] == {k: sha256(v) for k, v in sd.items()}
    assert got["storages"] == len(sd)
    total = 8 * (12 << 20)
    assert total <= got["reserved"] <= total + (4 << 20), got
    if not conf + runtime:
        assert got["segments"] == 1, got
    elif "max_split" in conf + runtime:
        assert got["segments"] >= len(sd), got


def test_dtype_conversion_on_gpu(tmp_path):
    torch.manual_seed(6)
    src = Block()
    path = _write_module(tmp_path / "m.tensors", src)
    # fp32 file -> bf16 model, in place.
    dst = Block(dtype=torch.bfloat16, device="cuda")
    ptr = dst.lin.weight.data_ptr()
    TensorDeserializer(path, device="cuda", dtype=torch.bfloat16).load_into_module(dst)
    assert dst.lin.weight.data_ptr() == ptr and dst.lin.weight.dtype == torch.bfloat16
    assert torch.equal(dst.lin.weight.cpu(), src.lin.weight.to(torch.bfloat16))
    # As a mapping: CoreWeave's rules (ints cast too, bool never).
    sd = _state(7)
    d = TensorDeserializer(_write(tmp_path / "s.tensors", sd), device="cuda", dtype=torch.bfloat16)
    assert d["embed"].dtype == torch.bfloat16 and torch.equal(
        d["embed"].cpu(), sd["embed"].to(torch.bfloat16)
    )
    assert d["ids"].dtype == torch.bfloat16 and d["mask"].dtype == torch.bool


def test_verify_hash_detects_corruption(tmp_path, vector_manifests):
    v = vector_manifests["corrupt_data.tensors"]
    with pytest.raises(HashMismatchError):
        TensorDeserializer(v["path"], device="cuda", verify_hash=True)["weight"]
    # Large tensors hash as their chunks stream through staging.
    _cuda.staging(4 << 20, 2 << 20)
    sd = _state(8, scale=2)
    path = _write(tmp_path / "v.tensors", sd)
    _check(TensorDeserializer(path, device="cuda", verify_hash=True), sd)


def test_concurrent_loads_from_two_threads(tmp_path):
    states = [_state(10 + k, scale=2) for k in range(2)]
    paths = [_write(tmp_path / f"c{k}.tensors", sd) for k, sd in enumerate(states)]
    out, errors = {}, []

    def run(k):
        try:
            for _ in range(3):
                d = TensorDeserializer(paths[k], device="cuda")
                out[k] = {name: d[name] for name in d}
                torch.cuda.current_stream().synchronize()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        _check(out[k], states[k])


def test_progress_and_log_line(tmp_path, caplog):
    path = _write(tmp_path / "p.tensors", _state(9, scale=8))
    seen = []
    with caplog.at_level("INFO", logger="tensorizer_rs"):
        d = TensorDeserializer(path, device="cuda", progress=lambda b, r: seen.append((b, r)))
        d["embed"]
    assert seen[-1][0] == d.total_tensor_bytes and seen[-1][1] > 0
    assert any("GB/s" in r.getMessage() for r in caplog.records)


def test_many_small_tensors(tmp_path):
    g = torch.Generator().manual_seed(11)
    sd = {
        f"t{k}": torch.randn(16 + (k % 5) * 8, generator=g).to(torch.bfloat16) for k in range(3000)
    }
    path = _write(tmp_path / "small.tensors", sd)
    before = _cuda.counters()
    d = TensorDeserializer(path, device="cuda")
    for k, v in sd.items():
        assert torch.equal(d[k].cpu(), v), k
    after = _cuda.counters()
    assert after["h2d_copies"] - before["h2d_copies"] == len(sd)
    # CUDA 12.8+ drivers take a segment's copies in one call.
    assert after["batched_copy_calls"] > before["batched_copy_calls"]


def _encrypted(tmp_path, sd):
    enc = EncryptionParams.random()
    s = TensorSerializer(str(tmp_path / "enc.tensors"), encryption=enc)
    s.write_state_dict(sd)
    s.close()
    return str(tmp_path / "enc.tensors"), DecryptionParams.from_key(enc.key)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_encrypted_pieces_decrypt_on_the_gpu(tmp_path, lazy):
    # 64 MiB + a 1.27 MiB odd tensor: the big one goes in pieces of whole 2 MiB cipher chunks,
    # ciphertext through staging, opened by the kernels where it landed; small ones in their
    # segments. Every sealed byte is counted on the device, none in staging.
    sd = _state(21, scale=4)
    sd["tail"] = torch.randn(8 * 1024 * 1024 // 4 * 3 + 12345, generator=torch.Generator())
    path, dec = _encrypted(tmp_path, sd)
    _cuda.reset_counters()
    d = TensorDeserializer(path, device="cuda", encryption=dec, lazy_load=lazy)
    _check(d, sd)
    c = _cuda.counters()
    stored = sum(v.nbytes for v in sd.values() if v.device.type != "meta")
    assert c["decrypted_on_device"] == stored and c["decrypted_in_staging"] == 0, c
    assert c["staged_bytes"] == stored, c
    # verify_hash decrypts on the host (the hashes are over the plaintext): same tensors.
    _cuda.reset_counters()
    _check(TensorDeserializer(path, device="cuda", encryption=dec, verify_hash=True), sd)
    assert _cuda.counters()["decrypted_on_device"] == 0


@pytest.mark.parametrize("where", [0, "middle", "last"])
def test_encrypted_pieces_tampered(tmp_path, where):
    sd = {"a.b.c": torch.randn(6 * 1024 * 1024), "s": torch.ones(4)}
    path, dec = _encrypted(tmp_path, sd)
    e = next(x for x in _native.TensorFile(path).entries() if x["name"] == "a.b.c")
    at = {0: 3, "middle": e["data_length"] // 2 + 7, "last": e["data_length"] - 1}[where]
    data = bytearray(Path(path).read_bytes())
    data[e["data_offset"] + at] ^= 0x10
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CryptographyError, match="authentication failed") as err:
        d = TensorDeserializer(path, device="cuda", encryption=dec)
        d["a.b.c"]
    assert "tensor 'a.b.c'" in str(err.value) and "enc.tensors" in str(err.value)
    with pytest.raises(CryptographyError, match="authentication failed"):
        TensorDeserializer(path, device="cuda", encryption=DecryptionParams.from_key(bytes(32)))[
            "s"
        ]
