"""Checks of the GPU pipeline against the stand-in driver (tests/mock_cuda/libcuda.c), where
"device memory" is host memory. Run by tests/test_cuda_mock.py in a subprocess whose
LD_LIBRARY_PATH finds the stand-in; prints one PASS/FAIL line per check.

The pipeline is driven through ``tensorizer_rs._cuda`` with a deserializer whose device is the
CPU, so every line of the Rust side and the placement logic on the Python side runs here; the
few lines that choose the CUDA branch in ``serialization.py`` run only in tests/gpu.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import torch
from tensorizer_rs import (
    CryptographyError,
    HashMismatchError,
    TensorDeserializer,
    TensorizerUnsupportedError,
    TensorizerValueError,
    TensorSerializer,
    _cuda,
    _native,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decrypt_cases

# NVRTC from this interpreter's nvidia-cuda-nvrtc wheel: encrypted loads decrypt on the "GPU"
# (the stand-in's kernel launches open the chunks with libsodium).
_native.cuda_nvrtc_search_dirs(decrypt_cases.nvrtc_dirs())

VECTORS = Path(os.environ["TENSORIZER_VECTORS"])
TMP = Path(tempfile.mkdtemp(prefix="tz-mock-", dir=os.environ.get("MOCK_TMP")))
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha(t) -> str:
    return hashlib.sha256(raw(t)).hexdigest()


def gpu_deser(path, **kw) -> TensorDeserializer:
    """A lazy deserializer whose loads we route through the GPU pipeline by hand."""
    return TensorDeserializer(path, device="cpu", lazy_load=True, **kw)


def gpu_load(d, verify=False):
    d._take(_cuda.load(d._cuda_request(), list(d._selected), verify))
    return {d._entries[i]["name"]: d._cache[i] for i in d._selected}


def gpu_fill(d, targets):
    """``load_into_module`` through the GPU pipeline; the indices filled in place."""
    loaded = _cuda.load_into_module(d._cuda_request(), targets, [], False, cached=d._cache)
    d._take(loaded)
    return loaded.in_place


@contextlib.contextmanager
def io_mode(mode):
    _cuda.IO_MODE = mode
    try:
        yield
    finally:
        _cuda.IO_MODE = None


def write(path, sd):
    s = TensorSerializer(str(path))
    s.write_state_dict(sd)
    s.close()
    return str(path)


def run_child(script: str, *args: str, **env: str):
    """Run `script` with `args` in a fresh process (this one's environment and `env`); the
    JSON of its last line."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def big_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(1400, 1000, generator=g),  # 5.6 MB: several chunks
        "norm": torch.randn(1000, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (3000,), generator=g),
        "mask": torch.rand(300, generator=g) > 0.5,
        "meta": torch.empty(128, 129, device="meta"),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5),
        "c": torch.randn(50, dtype=torch.complex64, generator=g),
        "odd": torch.randn(333_333, generator=g),  # unaligned sizes and offsets
    }


def expected(sd):
    return {
        k: (torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v)
        for k, v in sd.items()
    }


def assert_loaded(out, sd, *where):
    """Every tensor of ``sd`` (meta ones as zeros) came back with the same values."""
    for k, v in expected(sd).items():
        same = torch.equal(out[k], v) if v.dtype != torch.bool else bool((out[k] == v).all())
        assert same, (*where, k)


MODES = ["buffered", "direct", "auto"]


def small_staging():
    _cuda.staging(4 << 20, 2 << 20)  # 2 buffers of 2 MiB: many pieces, buffers reused


@check
def vectors_exact_bytes():
    small_staging()
    index = json.loads((VECTORS / "index.json").read_text())
    done = 0
    for f in index["files"]:
        m = json.loads((VECTORS / f["manifest"]).read_text())
        exp = m["expect"]
        if not (
            all(exp[k] == "ok" for k in ("open", "load", "verify_hash"))
            or exp.get("spec_correct_reader") == "ok"
        ):
            continue
        if m.get("encryption"):
            continue  # covered by encrypted_vectors
        for mode, verify in itertools.product(MODES, (False, True)):
            with io_mode(mode):
                d = gpu_deser(VECTORS / m["file"])
                gpu_load(d, verify)
                for t in m["tensors"]:
                    key = tuple(t["name"]) if isinstance(t["name"], list) else t["name"]
                    i = d._by_path[key if isinstance(key, tuple) else (key,)]
                    got = d._cache[i]
                    assert str(got.dtype) == "torch." + t["dtype"], (m["file"], key, got.dtype)
                    assert list(got.shape) == t["shape"], (m["file"], key)
                    assert sha(got) == t["sha256"], (m["file"], key, mode, verify)
        done += 1
    assert done >= 10, done


def _vector_params(m):
    from tensorizer_rs import DecryptionParams

    enc = m["encryption"]
    if enc["kind"] == "random_key":
        return DecryptionParams.from_key((VECTORS / enc["key_file"]).read_bytes())
    return DecryptionParams.from_string(enc["passphrase"])


def _sealed_bytes(path) -> int:
    return sum(e["data_length"] for e in _native.TensorFile(str(path)).entries())


@check
def encrypted_vectors():
    """Every encrypted golden vector loads to the manifest's exact bytes, opened by the GPU
    kernels (the counter counts every sealed byte; none opened in staging); with verify_hash on
    the host (hashes are over the plaintext). The tampered vector fails naming its tensor."""
    small_staging()
    done = 0
    for mf in sorted(VECTORS.glob("*.tensors.json")):
        m = json.loads(mf.read_text())
        if not isinstance(m, dict) or not m.get("encryption"):
            continue
        params, path = _vector_params(m), VECTORS / m["file"]
        bad = m["expect"].get("corrupted_tensor")
        for verify in (False, True):
            _cuda.reset_counters()
            d = gpu_deser(path, encryption=params)
            if m["expect"]["load"] != "ok":
                try:
                    gpu_load(d, verify)
                except CryptographyError as e:
                    assert f"tensor {bad!r}" in str(e) and m["file"] in str(e), e
                    assert "authentication failed" in str(e), e
                    continue
                raise AssertionError(f"{m['file']}: tampered tensor {bad!r} loaded")
            gpu_load(d, verify)
            for t in m["tensors"]:
                i = d._by_path[(t["name"],)]
                assert sha(d._cache[i]) == t["sha256"], (m["file"], t["name"], verify)
            c = _cuda.counters()
            stats = d.cuda_load_stats["loads"]
            if verify:
                assert c["decrypted_on_device"] == 0, (m["file"], c)
                assert stats[0]["host_decrypt"] and not stats[0]["host_decrypt_fallback"], stats
            else:
                assert c["decrypted_on_device"] == _sealed_bytes(path) > 0, (m["file"], c)
                assert c["decrypted_in_staging"] == 0, c
                assert sum(s["decrypted_on_device"] for s in stats) == c["decrypted_on_device"]
                assert stats[0]["host_decrypt"] is None, stats
        done += 1
    assert done >= 5, done


def _write_sealed(path, sd, enc):
    s = TensorSerializer(str(path), encryption=enc)
    s.write_state_dict(sd)
    s.close()
    return path


@check
def encrypted_pieces():
    """Large encrypted tensors go in pieces of whole cipher chunks through staging, opened on
    the device after their copies: every layout of buffers (chunks spanning several buffers,
    buffers smaller than a chunk: whole tensors on one stream), empty tensors, tensors smaller
    than a chunk, exact bytes; new tensors and in place."""
    from tensorizer_rs import DecryptionParams, EncryptionParams

    sd = big_state(5)
    sd["long"] = torch.randn(3 * (1 << 20) + 777, generator=torch.Generator().manual_seed(9))
    enc = EncryptionParams.random()
    path = _write_sealed(TMP / "enc.tensors", sd, enc)
    dec = DecryptionParams.from_key(enc.key)
    sealed = _sealed_bytes(path)
    for staging, mode in itertools.product(
        ((16 << 20, 4 << 20), (4 << 20, 2 << 20), (24 << 20, 8 << 20)), MODES
    ):
        _cuda.staging(*staging)
        _cuda.reset_counters()
        with io_mode(mode):
            out = gpu_load(gpu_deser(path, encryption=dec))
        assert_loaded(out, sd, staging, mode)
        c = _cuda.counters()
        assert c["decrypted_on_device"] == sealed and c["decrypted_in_staging"] == 0, (c, mode)
        assert c["pageable_bytes"] == 0, c  # encrypted bytes pass through staging
    # In place: a module's tensors receive the ciphertext and are opened where they are.
    _cuda.staging(16 << 20, 4 << 20)
    names = ("embed", "long", "odd", "norm")
    mod = torch.nn.Module()
    for k in names:
        mod.register_buffer(k, torch.zeros_like(sd[k]))
    d = gpu_deser(path, encryption=dec)
    _cuda.reset_counters()
    assert len(gpu_fill(d, [(d._by_path[(k,)], mod, k) for k in names])) == 4
    for k in names:
        assert torch.equal(getattr(mod, k), sd[k]), k
    assert _cuda.counters()["decrypted_on_device"] == sum(sd[k].nbytes for k in names)
    try:
        _tampered(sd, dec, enc.key)
    finally:
        small_staging()
        _cuda.release_staging(0)


def _tampered(sd, dec, key):
    """A flipped byte in the first, a middle or the last chunk of a large tensor, or in one of
    its MACs, fails the load naming the file and the tensor; in place, the error also says the
    module's contents are undefined now."""
    f = _native.TensorFile(str(TMP / "enc.tensors"))
    i, e = next((i, x) for i, x in enumerate(f.entries()) if x["name"] == "long")
    clean = (TMP / "enc.tensors").read_bytes()
    # The second MAC, in the tensor's header.
    mac = bytes(_native.cuda_tensor_chunks(f, i, key)[2][1][3])
    mac_at = clean.index(mac, e["header_offset"], e["data_offset"])
    for at in (5, e["data_length"] // 2, e["data_length"] - 1, "mac"):
        data = bytearray(clean)
        if at == "mac":
            data[mac_at] ^= 0x01
        else:
            data[e["data_offset"] + at] ^= 0x01
        (TMP / "enc_bad.tensors").write_bytes(bytes(data))
        _cuda.reset_counters()
        try:
            gpu_load(gpu_deser(TMP / "enc_bad.tensors", encryption=dec))
        except CryptographyError as err:
            assert "tensor 'long'" in str(err) and "enc_bad.tensors" in str(err), err
            assert "authentication failed" in str(err), err
        else:
            raise AssertionError(f"tampered byte at {at} not detected")
        assert _cuda.counters()["decrypted_on_device"] > 0, _cuda.counters()
    mod = torch.nn.Module()
    mod.register_buffer("long", torch.zeros_like(sd["long"]))
    d = gpu_deser(TMP / "enc_bad.tensors", encryption=dec)
    try:
        gpu_fill(d, [(d._by_path[("long",)], mod, "long")])
    except CryptographyError as err:
        assert "tensor 'long'" in str(err) and "undefined" in str(err), err
    else:
        raise AssertionError("a tampered in-place load passed")


@check
def many_small_sealed_tensors():
    """Hundreds of sealed tensors smaller than a chunk share segments; their chunks go to the
    kernels in launches of at most 32, after the segment's copies. Exact bytes."""
    from tensorizer_rs import DecryptionParams, EncryptionParams

    small_staging()
    g = torch.Generator().manual_seed(21)
    sd = {f"t{k}": torch.randn(1 + (k * 37) % 900, generator=g) for k in range(300)}
    sd["none"] = torch.empty(0)
    enc = EncryptionParams.random()
    path = _write_sealed(TMP / "small-sealed.tensors", sd, enc)
    _cuda.reset_counters()
    assert_loaded(gpu_load(gpu_deser(path, encryption=DecryptionParams.from_key(enc.key))), sd)
    c = _cuda.counters()
    assert c["decrypted_on_device"] == _sealed_bytes(path) and c["decrypted_in_staging"] == 0, c


_FALLBACK_CHILD = """
import json, logging, sys
from tensorizer_rs import DecryptionParams, TensorDeserializer, _cuda
lines = []
class Keep(logging.Handler):
    def emit(self, r):
        if "decrypting" in r.getMessage():
            lines.append([r.levelname, r.getMessage()])
logging.getLogger("tensorizer_rs").addHandler(Keep())
logging.getLogger("tensorizer_rs").setLevel(logging.INFO)
sys.path.insert(0, sys.argv[3])
import decrypt_cases
from tensorizer_rs import _native
_native.cuda_nvrtc_search_dirs(decrypt_cases.nvrtc_dirs())
_cuda.staging(16 << 20, 4 << 20)
d = TensorDeserializer(sys.argv[1], device="cpu", lazy_load=True,
                       encryption=DecryptionParams.from_key(bytes.fromhex(sys.argv[2])))
_cuda.reset_counters()
d._take(_cuda.load(d._cuda_request(), list(d._selected), False))
import hashlib, torch
out = {d._entries[i]["name"]: hashlib.sha256(d._cache[i].reshape(-1).view(torch.uint8).numpy())
       .hexdigest() for i in d._selected}
try:
    kernels = _native.cuda_decrypt_kernels(0)
except Exception as e:
    kernels = str(e)
print(json.dumps({"counters": _cuda.counters(), "lines": lines, "sha": out, "kernels": kernels}))
"""


@check
def gpu_decryption_falls_back_to_the_host():
    """Where the kernels cannot run (here: a compute capability NVRTC cannot build for) the load
    decrypts in staging on the host, with one warning saying why; TENSORIZER_RS_GPU_DECRYPT=0
    chooses the host path (one info line). Same bytes either way. A fresh process takes the
    kernels this one compiled from the kernel cache."""
    from tensorizer_rs import EncryptionParams

    g = torch.Generator().manual_seed(22)
    sd = {"big": torch.randn(3 << 20, generator=g), "small": torch.randn(100, generator=g)}
    enc = EncryptionParams.random()
    path = _write_sealed(TMP / "fallback.tensors", sd, enc)
    tests_dir = str(Path(__file__).resolve().parents[1])

    def child(**env):
        return run_child(_FALLBACK_CHILD, str(path), enc.key.hex(), tests_dir, **env)

    want = {k: sha(v) for k, v in sd.items()}
    for env, level, why in (
        ({"MOCK_CUDA_CC": "10"}, "WARNING", "cannot build for compute capability 1.0"),
        ({"TENSORIZER_RS_GPU_DECRYPT": "0"}, "INFO", "TENSORIZER_RS_GPU_DECRYPT=0"),
    ):
        got = child(**env)
        c = got["counters"]
        assert c["decrypted_on_device"] == 0 and c["decrypted_in_staging"] > 0, (env, c)
        assert len(got["lines"]) == 1, (env, got["lines"])
        assert got["lines"][0][0] == level and why in got["lines"][0][1], (env, got["lines"])
        assert "fallback.tensors" in got["lines"][0][1], got["lines"]
        assert got["sha"] == want, env
    got = child()
    assert got["counters"]["decrypted_on_device"] == _sealed_bytes(path) and not got["lines"], got
    assert got["sha"] == want
    # This process compiled the kernels and kept them: a fresh process loads them from there.
    if os.environ.get("XDG_CACHE_HOME"):
        cached = list(Path(os.environ["XDG_CACHE_HOME"], "tensorizer_rs", "kernels").iterdir())
        assert len(cached) == 1 and cached[0].name.endswith("-sm_90.cubin"), cached
        assert "from the kernel cache" in got["kernels"], got["kernels"]


@check
def larger_than_pool_all_modes():
    small_staging()
    sd = big_state()
    path = write(TMP / "big.tensors", sd)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    for mode in MODES:
        _cuda.reset_counters()
        d = gpu_deser(path)
        assert d.cuda_load_stats == {"loads": [], "alloc_seconds": []}
        with io_mode(mode):
            assert_loaded(gpu_load(d), sd, mode)
        c = _cuda.counters()
        moved = c["staged_bytes"] + c["pageable_bytes"]
        meta = 128 * 129 * 4
        assert moved == total - meta, (moved, total, c)
        # The deserializer's public account of its load agrees with the process's counters.
        loads = d.cuda_load_stats["loads"]
        assert loads and sum(s["staged_bytes"] for s in loads) == c["staged_bytes"], (loads, c)
        assert c["staged_bytes"] == moved, c
        assert c["zero_fills"] == 1 and c["h2d_copies"] >= 7, c
        assert c["peak_staging_allocated"] <= 4 << 20, c
        assert c["buffered_read_bytes"] + c["direct_read_bytes"] >= moved, c
        if mode == "direct":
            # The 5.6 MB tensor too: its buffer-sized reads leave room to round out to pages.
            assert c["direct_read_bytes"] > 5_600_000, c
        if mode == "buffered":
            assert c["direct_read_bytes"] == 0, c


@check
def hash_verification():
    small_staging()
    d = gpu_deser(VECTORS / "corrupt_data.tensors")
    try:
        gpu_load(d, True)
    except HashMismatchError as e:
        assert "corrupt_data.tensors" in str(e), e
    else:
        raise AssertionError("corrupt data passed verify_hash")
    # Tensors larger than one buffer are hashed as they stream through staging.
    sd = big_state(1)
    path = write(TMP / "verify.tensors", sd)
    out = gpu_load(gpu_deser(path), verify=True)
    assert torch.equal(out["embed"], sd["embed"])
    # Corrupt one byte in the middle of the big tensor: only verify_hash notices.
    e = next(e for e in _native.TensorFile(path).entries() if e["name"] == "embed")
    data = bytearray(Path(path).read_bytes())
    data[e["data_offset"] + e["data_length"] // 2] ^= 0xFF
    bad = TMP / "verify_bad.tensors"
    bad.write_bytes(bytes(data))
    gpu_load(gpu_deser(bad))
    try:
        gpu_load(gpu_deser(bad), verify=True)
    except HashMismatchError as err:
        assert "embed" in str(err), err
    else:
        raise AssertionError("corruption not detected")


@check
def small_tensors_are_verified_in_their_segment():
    """Small records travel together in one staging buffer; with verify_hash each is checked
    there before the segment's copies, plain or encrypted, and a flipped byte names its tensor."""
    from tensorizer_rs import DecryptionParams, EncryptionParams

    small_staging()
    g = torch.Generator().manual_seed(13)
    sd = {f"s{k}": torch.randn(50 + k, generator=g) for k in range(20)}
    enc = EncryptionParams.random()
    for name, kw, dkw in (
        ("plain", {}, {}),
        ("sealed", {"encryption": enc}, {"encryption": DecryptionParams.from_key(enc.key)}),
    ):
        path = TMP / f"segverify-{name}.tensors"
        s = TensorSerializer(str(path), **kw)
        s.write_state_dict(sd)
        s.close()
        assert_loaded(gpu_load(gpu_deser(path, **dkw), verify=True), sd, name)
        e = next(x for x in _native.TensorFile(str(path)).entries() if x["name"] == "s7")
        data = bytearray(path.read_bytes())
        data[e["data_offset"] + 3] ^= 0x10
        bad = TMP / f"segverify-{name}-bad.tensors"
        bad.write_bytes(bytes(data))
        try:
            gpu_load(gpu_deser(bad, **dkw), verify=True)
        except (HashMismatchError, CryptographyError) as err:
            assert "'s7'" in str(err), err
        else:
            raise AssertionError(f"{name}: a flipped byte passed verify_hash")


_ENV_CHILD = """
import json, sys
from tensorizer_rs import TensorDeserializer, _cuda
_cuda.reset_counters()
d = TensorDeserializer(sys.argv[1], device="cpu", lazy_load=True, num_readers=2)
try:
    d._take(_cuda.load(d._cuda_request(), list(d._selected), False))
    out = {"ok": True}
except Exception as e:
    out = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps({**out, "counters": _cuda.counters(), "staging": _cuda.staging()}))
"""


@check
def environment_settings_reach_the_load():
    """TENSORIZER_RS_IO and TENSORIZER_RS_STAGING_BYTES, read once when the module loads, govern
    the loads of the process; a value that cannot be used fails each load, naming it."""
    g = torch.Generator().manual_seed(14)
    path = write(TMP / "env.tensors", {"w": torch.randn(1_000_000, generator=g)})

    def child(**env):
        return run_child(_ENV_CHILD, path, **env)

    got = child(TENSORIZER_RS_IO="direct", TENSORIZER_RS_STAGING_BYTES=str(24 << 20))
    assert got.get("ok") and got["counters"]["direct_read_bytes"] > 3_000_000, got
    assert got["staging"][0] == 24 << 20, got
    got = child(TENSORIZER_RS_IO="buffered")
    assert got.get("ok") and got["counters"]["direct_read_bytes"] == 0, got
    got = child(TENSORIZER_RS_IO="mmap")
    assert "TensorizerValueError" in got.get("error", "") and "TENSORIZER_RS_IO" in got["error"], (
        got
    )


@check
def dtype_cast_on_device():
    small_staging()
    sd = big_state(2)
    path = write(TMP / "cast.tensors", sd)
    d = gpu_deser(path, dtype=torch.bfloat16)
    out = gpu_load(d)
    assert out["embed"].dtype == torch.bfloat16 and torch.equal(
        out["embed"], sd["embed"].to(torch.bfloat16)
    )
    assert out["ids"].dtype == torch.bfloat16  # CoreWeave casts integers too
    assert out["mask"].dtype == torch.bool  # never bool
    assert out["c"].dtype == torch.complex64  # never complex -> real (PR #207)
    assert out["embed"].requires_grad and not out["ids"].requires_grad
    # The same with a tiny cast group: several native loads, same result.
    old = _cuda.CAST_GROUP_BYTES
    _cuda.CAST_GROUP_BYTES = 1
    try:
        again = gpu_load(gpu_deser(path, dtype=torch.bfloat16))
    finally:
        _cuda.CAST_GROUP_BYTES = old
    for k in out:
        assert torch.equal(out[k], again[k]), k


class Block(torch.nn.Module):
    def __init__(self, dtype=torch.float32, device=None):
        super().__init__()
        self.lin = torch.nn.Linear(300, 200, dtype=dtype, device=device)
        self.norm = torch.nn.LayerNorm(200, dtype=dtype, device=device)
        self.register_buffer("steps", torch.zeros(7, dtype=torch.int64, device=device))


def targets_for(d, m):
    mods = dict(m.named_modules())
    out = []
    for i in d._selected:
        name = d._entries[i]["name"]
        prefix, _, attr = name.rpartition(".")
        out.append((i, mods[prefix], attr))
    return out


def write_module(path, m):
    s = TensorSerializer(str(path))
    s.write_module(m)
    s.close()
    return str(path)


@check
def load_into_module_in_place():
    small_staging()
    torch.manual_seed(3)
    src = Block()
    src.steps += 5
    path = write_module(TMP / "module.tensors", src)
    dst = Block()
    ptrs = {k: v.data_ptr() for k, v in list(dst.named_parameters()) + list(dst.named_buffers())}
    lin_weight = dst.lin.weight
    d = gpu_deser(path)
    _cuda.reset_counters()
    in_place = gpu_fill(d, targets_for(d, dst))
    assert len(in_place) == 5, in_place
    for k, v in list(dst.named_parameters()) + list(dst.named_buffers()):
        assert v.data_ptr() == ptrs[k], k
    assert dst.lin.weight is lin_weight
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    assert _cuda.counters()["staged_bytes"] > 0


@check
def load_into_module_meta_and_cast():
    small_staging()
    torch.manual_seed(4)
    src = Block()
    path = write_module(TMP / "module2.tensors", src)
    # Meta parameters: created (by the caller's _place) from new tensors.
    dst = Block(device="meta")
    d = gpu_deser(path)
    targets = targets_for(d, dst)
    in_place = gpu_fill(d, targets)
    assert not in_place
    for i, mod, attr in targets:
        d._place(mod, attr, i)
    assert torch.equal(dst.lin.weight, src.lin.weight) and dst.lin.weight.device.type == "cpu"
    # bf16 module, dtype=bf16: cast after the copy, into the existing storage.
    dst = Block(dtype=torch.bfloat16)
    ptr = dst.lin.weight.data_ptr()
    d = gpu_deser(path, dtype=torch.bfloat16)
    in_place = gpu_fill(d, targets_for(d, dst))
    assert dst.lin.weight.data_ptr() == ptr
    assert torch.equal(dst.lin.weight, src.lin.weight.to(torch.bfloat16))
    # CoreWeave's rule casts the int64 buffer to bf16 too, so it cannot go into the module's
    # int64 buffer: it is loaded into a new tensor for the caller to register.
    assert len(in_place) == 4, in_place


@check
def shape_mismatch_is_clear_and_early():
    small_staging()
    path = write_module(TMP / "module3.tensors", Block())

    class Wrong(Block):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(300, 201)

    dst = Wrong()
    d = gpu_deser(path)
    _cuda.reset_counters()
    try:
        gpu_fill(d, targets_for(d, dst))
    except TensorizerValueError as e:
        assert "shape" in str(e) and "lin.weight" in str(e), e
    else:
        raise AssertionError("no error")
    assert _cuda.counters()["h2d_copies"] == 0  # nothing read first


@check
def concurrent_loads():
    small_staging()
    paths = [write(TMP / f"conc{k}.tensors", big_state(10 + k)) for k in range(2)]
    results, errors = {}, []

    def run(k):
        try:
            for _ in range(3):
                results[k] = gpu_load(gpu_deser(paths[k]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        sd = expected(big_state(10 + k))
        for name, v in sd.items():
            assert raw(results[k][name]) == raw(v), (k, name)


@check
def progress_callback():
    small_staging()
    path = write(TMP / "progress.tensors", big_state(5))
    seen = []
    d = TensorDeserializer(
        path, device="cpu", lazy_load=True, progress=lambda b, r: seen.append((b, r))
    )
    gpu_load(d)
    assert seen and seen[-1][0] == d.total_tensor_bytes > 0, seen
    assert all(r >= 0 for _, r in seen)

    def boom(b, r):
        raise KeyError("stop here")

    d = TensorDeserializer(path, device="cpu", lazy_load=True, progress=boom)
    try:
        gpu_load(d)
    except KeyError as e:
        assert "stop here" in str(e)
    else:
        raise AssertionError("callback error swallowed")


@check
def many_small_tensors_share_allocations():
    small_staging()
    g = torch.Generator().manual_seed(7)
    sd = {f"t{k}": torch.randn(16 + (k % 3) * 8, generator=g) for k in range(600)}
    sd["big"] = torch.randn(100_000, generator=g)  # over SHARE_MAX_BYTES: its own allocation
    path = write(TMP / "small.tensors", sd)
    _cuda.reset_counters()
    out = gpu_load(gpu_deser(path))
    batches = _cuda.counters()["batched_copy_calls"]
    assert (batches == 0) if os.environ.get("MOCK_CUDA_NO_BATCH") else (0 < batches < 50), batches
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    storages = {out[f"t{k}"].untyped_storage().data_ptr() for k in range(600)}
    assert len(storages) <= 6, len(storages)  # one per shape (each well under 4 MiB)
    assert out["big"].untyped_storage().data_ptr() not in storages
    with torch.no_grad():
        out["t0"].fill_(0)
    assert torch.equal(out["t3"], sd["t3"]) and out["t0"].is_leaf and out["t0"].requires_grad


@check
def bad_arguments():
    path = write(TMP / "args.tensors", {"a": torch.ones(10)})
    f = _native.TensorFile(path)
    buf = torch.empty(40, dtype=torch.uint8)
    for kwargs, exc, text in [
        ({"device": 7}, TensorizerValueError, "does not exist"),
        ({"targets": [(0, buf.data_ptr(), 39)]}, TensorizerValueError, "needs 40"),
        ({"targets": [(0, 0, 40)]}, TensorizerValueError, "null"),
        ({"targets": [(5, buf.data_ptr(), 40)]}, TensorizerValueError, "no tensor"),
        ({"io": "sideways"}, TensorizerValueError, "io mode"),
    ]:
        args = {"targets": [(0, buf.data_ptr(), 40)], "device": 0, **kwargs}
        try:
            _native.cuda_load(f, args.pop("targets"), args.pop("device"), 0, **args)
        except exc as e:
            assert text in str(e), (kwargs, e)
        else:
            raise AssertionError(f"no error for {kwargs}")


@check
def pool_reconfigure_and_release():
    path = write(TMP / "pool.tensors", big_state(6))
    for total, chunk, pinned in [
        (4 << 20, 2 << 20, "thp"),
        (16 << 20, 4 << 20, "driver"),
        (2 << 20, 2 << 20, "thp"),
    ]:
        assert _cuda.staging(total, chunk, pinned) == (total, chunk, 4, pinned)
        _cuda.release_staging(0)
        _cuda.reset_counters()
        out = gpu_load(gpu_deser(path))
        assert torch.equal(out["embed"], big_state(6)["embed"])
        c = _cuda.counters()
        assert c["peak_staging_allocated"] <= total and c["staging_in_use"] == 0, c
    _cuda.release_staging(0)
    assert _cuda.counters()["staging_allocated"] == 0, _cuda.counters()


@check
def staging_grows_only_to_the_readers():
    """A local load makes no more staging buffers than two per reader, even when it starts
    while the prewarm is still making them: more only spread the copies over more memory
    (slower on the hosts measured, docs/benchmarks.md)."""
    chunk, readers = 2 << 20, 3
    assert _cuda.staging(32 << 20, chunk, "thp")[:2] == (32 << 20, chunk)
    g = torch.Generator().manual_seed(9)
    sd = {f"w{k}": torch.randn(1_500_000, generator=g) for k in range(6)}  # 36 MB: 18+ pieces
    path = write(TMP / "readers.tensors", sd)
    try:
        _cuda.release_staging(0)
        _cuda.reset_counters()
        _native.cuda_prewarm(0, readers)  # racing the load, as the constructor's does
        out = gpu_load(gpu_deser(path, num_readers=readers))
        for k, v in sd.items():
            assert torch.equal(out[k], v), k
        c = _cuda.counters()
        assert c["loads"] == 1 and c["peak_staging_allocated"] <= 2 * readers * chunk, c
    finally:
        _cuda.release_staging(0)


@check
def local_reads_fill_4mib_of_a_buffer():
    """A local load reads large tensors 4 MiB at a time even into 8 MiB buffers (two buffers
    per reader keep as much in flight, docs/gpu.md); a remote one fills whole buffers."""
    assert _cuda.staging(64 << 20, 8 << 20, "thp")[:2] == (64 << 20, 8 << 20)
    g = torch.Generator().manual_seed(12)
    sd = {f"w{k}": torch.randn(4 << 20, generator=g) for k in range(2)}  # 16 MiB each
    path = write(TMP / "fill.tensors", sd)
    try:
        _cuda.release_staging(0)
        before = _cuda.counters()
        out = gpu_load(gpu_deser(path, num_readers=2))
        for k, v in sd.items():
            assert torch.equal(out[k], v), k
        c = _cuda.counters()
        copies = c["h2d_copies"] - before["h2d_copies"]
        assert copies >= 8, c  # 4 per tensor; whole 8 MiB buffers would make 4 in all
        assert c["peak_staging_allocated"] <= 4 * (8 << 20), c  # two buffers per reader
    finally:
        _cuda.release_staging(0)


@check
def prewarm_for_sizes_the_pool():
    """What the constructor and the vLLM loader (before vLLM builds the model) page-lock: two
    buffers per reader for a local file, the whole pool for a URL (remote loads keep one reader
    per buffer)."""
    chunk = 2 << 20
    assert _cuda.staging(16 << 20, chunk, "thp")[:2] == (16 << 20, chunk)

    def settles_at(n):
        deadline = time.monotonic() + 10
        while _cuda.counters()["staging_allocated"] < n * chunk and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # and makes no more
        assert _cuda.counters()["staging_allocated"] == n * chunk, (n, _cuda.counters())

    dev = torch.device("cuda", 0)
    try:
        for uri, readers, n in [
            (str(TMP / "local.tensors"), 3, 6),
            ("http://127.0.0.1:9/m.tensors", 2, 4),
            ("s3://bucket/m.tensors", None, 8),
        ]:
            _cuda.release_staging(0)
            _cuda.prewarm_for(dev, uri, readers)
            settles_at(n)
    finally:
        _cuda.release_staging(0)


_TRACE_CHILD = """
import json, sys
from tensorizer_rs import TensorDeserializer, _cuda, _native
_cuda.staging(8 << 20, 2 << 20, "thp")
_cuda.reset_counters()
d = TensorDeserializer(sys.argv[1], device="cpu", lazy_load=True, num_readers=2)
d._take(_cuda.load(d._cuda_request(), list(d._selected), False))  # as gpu_load() does
c = _cuda.counters()
print(json.dumps({"read": c["buffered_read_bytes"] + c["direct_read_bytes"],
                  "events": _native.trace_take()}))
"""


@check
def trace_times_reads_and_buffer_waits():
    """With TENSORIZER_RS_TRACE=1 every local read into a staging buffer leaves a `read` mark
    (its duration and bytes: they add up to the bytes read) and every wait for a buffer's copy
    a `staging_sync` mark with its duration: with two buffers and copies that take time, some
    waits are longer than zero (bench/trace_gpu_load.py splits a load's time by them)."""
    g = torch.Generator().manual_seed(11)
    sd = {f"w{k}": torch.randn(700_000, generator=g) for k in range(4)}  # 11 MB: 6+ buffers
    sd["small"] = torch.ones(7)
    got = run_child(_TRACE_CHILD, write(TMP / "trace.tensors", sd), TENSORIZER_RS_TRACE="1")
    reads = [e for e in got["events"] if e[2] == "read"]
    waits = [e[3] for e in got["events"] if e[2] == "staging_sync"]
    assert reads and all(e[3] > 0 for e in reads), reads
    assert sum(e[4] for e in reads) == got["read"] >= sum(v.nbytes for v in sd.values()), got
    assert waits and max(waits) > 0, waits


_ORDER_CHILD = """
import json, sys, torch
from tensorizer_rs import TensorDeserializer, _native
# torch here has no CUDA: the device check is the only step skipped (the stand-in libcuda runs
# the prewarm).
TensorDeserializer._resolve_device = staticmethod(lambda device: torch.device("cuda", 0))
TensorDeserializer(sys.argv[1], device="cuda:0", lazy_load=True).close()
print(json.dumps([e[2] for e in _native.trace_take() if e[2].startswith("ctor_")]))
"""


@check
def constructor_opens_a_local_file_before_the_prewarm():
    """A CUDA deserializer opens a local file before it starts page-locking staging (the open
    is quick alone but slow beside the prewarm's page faults), and starts the prewarm before
    opening a URL, so that it runs beside the request (docs/benchmarks.md, the A/B)."""
    path = write(TMP / "order.tensors", {"a": torch.ones(1000)})

    def marks(uri):
        return [
            m
            for m in run_child(_ORDER_CHILD, uri, TENSORIZER_RS_TRACE="1")
            if m in ("ctor_opened", "ctor_prewarm")
        ]

    assert marks(path) == ["ctor_opened", "ctor_prewarm"]
    with http_server(TMP) as base:
        assert marks(f"{base}/data/order.tensors") == ["ctor_prewarm", "ctor_opened"]


@contextlib.contextmanager
def http_server(root: Path, tls: tuple = ()):
    """tests/servers/http_server.py on 127.0.0.1 (Range, injected faults, request counts),
    over TLS given (cert, key)."""
    script = Path(__file__).resolve().parents[1] / "servers" / "http_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), *map(str, tls)], stdout=subprocess.PIPE, text=True
    )
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait()


def self_signed(d: Path) -> tuple:
    """A throwaway certificate for 127.0.0.1 and its key (PEM paths)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    paths = (d / "cert.pem", d / "key.pem")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def requests_seen(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/__stats") as r:
        return json.loads(r.read())


@check
def remote_pieces_stream_through_staging():
    """Large tensors of a URL: one ranged request per piece, its body streamed through several
    staging buffers; exact bytes also when connections drop mid-body or the server fails."""
    small_staging()  # 2 MiB buffers
    g = torch.Generator().manual_seed(9)
    sd = {**big_state(4), "big": torch.randn(6_000_000, generator=g)}  # 24 MB
    root = TMP / "www"
    root.mkdir(exist_ok=True)
    write(root / "r.tensors", sd)
    chunk = _cuda.staging()[1]
    total = sum(v.numel() * v.element_size() for k, v in sd.items() if k != "meta")
    with http_server(root) as base:
        for path in ("data/r.tensors", "dropmid/3/r.tensors", "fail500/2/r.tensors"):
            _cuda.reset_counters()
            assert_loaded(gpu_load(gpu_deser(f"{base}/{path}")), sd, path)
            c = _cuda.counters()
            assert c["staged_bytes"] == total, (path, c)
            assert c["buffered_read_bytes"] >= total, (path, c)
        # One reader: the last pieces split in two at most (each still several buffers), so
        # the load takes a request per segment of small records beyond the probe's first MiB
        # (two) and per piece (embed, odd, big in two): fewer than buffers' worth of bytes.
        before = requests_seen(base)["/data/r.tensors"]
        assert_loaded(gpu_load(gpu_deser(f"{base}/data/r.tensors", num_readers=1)), sd)
        n = requests_seen(base)["/data/r.tensors"] - before
        assert n <= 1 + 2 + 4 < -(-total // chunk), (n, total)
        # Default readers split the last pieces finer, never below a buffer: at most one
        # request per buffer's worth (and the segments of small records).
        before = requests_seen(base)["/data/r.tensors"]
        assert_loaded(gpu_load(gpu_deser(f"{base}/data/r.tensors")), sd)
        tapered = requests_seen(base)["/data/r.tensors"] - before
        assert n <= tapered <= 1 + -(-total // chunk) + len(sd), (tapered, n, total)

        # Encrypted, over HTTP: cipher chunks opened in the staging buffers (4 MiB buffers
        # hold one 2 MiB chunk a read), also after dropped connections; verify_hash goes
        # tensor by tensor.
        from tensorizer_rs import DecryptionParams, EncryptionParams

        enc = EncryptionParams.random()
        s = TensorSerializer(str(root / "e.tensors"), encryption=enc)
        s.write_state_dict(sd)
        s.close()
        _cuda.staging(16 << 20, 4 << 20)
        for verify in (False, True):
            _cuda.reset_counters()
            d = gpu_deser(
                f"{base}/dropmid/2/e.tensors", encryption=DecryptionParams.from_key(enc.key)
            )
            assert_loaded(gpu_load(d, verify=verify), sd, verify)
            c = _cuda.counters()
            # On the device without verify_hash; with it, on the host.
            assert (c["decrypted_on_device"] > 0) != verify, c

        # More readers than request slots and staging buffers together: no reader may
        # hold a buffer while it waits for a slot (that could stall the load for good).
        small_staging()
        for enc_args in ({}, {"encryption": DecryptionParams.from_key(enc.key)}):
            name = "e.tensors" if enc_args else "r.tensors"
            few = SimpleNamespace(
                _tensorizer_uri=f"{base}/data/{name}",
                _tensorizer_storage={"max_concurrency": 1},
            )
            done = {}

            def crowded(few=few, enc_args=enc_args, done=done):
                done["out"] = gpu_load(gpu_deser(few, num_readers=8, **enc_args))

            t = threading.Thread(target=crowded, daemon=True)
            t.start()
            t.join(120)
            assert "out" in done, f"{name}: 8 readers, 1 request slot and 2 buffers hung"
            assert_loaded(done["out"], sd)


@check
def https_pieces_stream_through_staging():
    """The same over HTTPS: bodies decrypted by the direct client's TLS session go through the
    staging buffers in short reads; exact bytes, also when connections are cut mid-body."""
    small_staging()  # 2 MiB buffers
    g = torch.Generator().manual_seed(10)
    sd = {**big_state(5), "big": torch.randn(6_000_000, generator=g)}
    root = TMP / "www-tls"
    root.mkdir(exist_ok=True)
    write(root / "t.tensors", sd)
    total = sum(v.numel() * v.element_size() for k, v in sd.items() if k != "meta")
    with http_server(root, self_signed(TMP)) as base:
        for path in ("data/t.tensors", "dropmid/3/t.tensors"):
            src = SimpleNamespace(
                _tensorizer_uri=f"{base}/{path}",
                _tensorizer_storage={"allow_untrusted": True},
            )
            _cuda.reset_counters()
            before = _native.http_direct_bytes()
            assert_loaded(gpu_load(gpu_deser(src)), sd, path)
            assert _cuda.counters()["staged_bytes"] == total, (path, _cuda.counters())
            moved = _native.http_direct_bytes() - before
            assert moved >= 24_000_000 - (1 << 20), (path, moved)  # all but the probe


@check
def ctrl_c_stops_a_load():
    """Ctrl-C while a GPU load waits on a slow server (16 KiB per connection every 100 ms: this
    load would take a minute) or a silent one (nothing after the first 16 KiB, the connection
    left open) raises KeyboardInterrupt within moments, as it would in Python code, instead of
    when the load ends, through either HTTP client (reqwest's requests are S3's path too); the
    pipeline works afterwards. The stop reaches every read through the load's one stop signal."""
    small_staging()
    root = TMP / "www-slow"
    root.mkdir(exist_ok=True)
    sd = {f"t{i}": torch.full((2 << 20,), float(i)) for i in range(4)}  # 32 MiB
    for client in ("direct", "reqwest"):
        write(root / f"{client}.tensors", sd)
    # Python leaves SIGINT ignored when it starts so (a background job of a shell without job
    # control, as CI may run us): ask for KeyboardInterrupt explicitly.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with http_server(root) as base, contextlib.ExitStack() as undo:
        undo.callback(signal.signal, signal.SIGINT, previous)
        for client, mode in itertools.product(("direct", "reqwest"), ("slow", "stall")):
            path, sent = f"/{mode}/{client}.tensors", []
            # reqwest: the client S3's requests go through too.
            src = SimpleNamespace(
                _tensorizer_uri=base + path,
                _tensorizer_storage={"http_direct": client == "direct"},
            )

            def interrupt(path=path, sent=sent):  # once ranged reads reach the server
                while requests_seen(base).get(path, 0) < 2:
                    time.sleep(0.05)
                time.sleep(0.5)
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)

            threading.Thread(target=interrupt, daemon=True).start()
            try:
                gpu_load(gpu_deser(src))
                raise AssertionError(f"{client}, {mode}: the load ended before the interrupt")
            except KeyboardInterrupt:
                took = time.monotonic() - sent[0]
            assert took < 5, f"{client}, {mode}: the load went on for {took:.1f} s after Ctrl-C"
        assert_loaded(gpu_load(gpu_deser(f"{base}/data/reqwest.tensors")), sd)


def main() -> int:
    only = set(sys.argv[1:])
    failed = 0
    for fn in CHECKS:
        if only and fn.__name__ not in only:
            continue
        try:
            fn()
            print(f"PASS {fn.__name__}", flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {fn.__name__}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("MOCK_CUDA_INIT_ERROR"):
        ok, why = _native.cuda_available()
        assert not ok and "CUDA" in why, why
        try:
            _native.cuda_load(
                _native.TensorFile(write(TMP / "x.tensors", {"a": torch.ones(1)})), [], 0, 0
            )
        except TensorizerUnsupportedError as e:
            print(f"PASS init_error: {e}")
            sys.exit(0)
        sys.exit(1)
    sys.exit(main())
