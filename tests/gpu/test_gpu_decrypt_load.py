"""Encrypted loads to CUDA on a real GPU, through the load pipeline (skipped without CUDA): the
ciphertext goes through staging into the destination tensors and the kernels authenticate and
decrypt it there. The counter ``decrypted_on_device`` proves the GPU did it (a host decrypt
cannot pass), and nothing was opened in staging.

Run on the GPU machine: ``bash bench/on_device.sh decrypt`` (this file and
tests/gpu/test_gpu_decrypt.py), or ``pytest -m gpu -s tests/gpu/test_gpu_decrypt_load.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import decryption_for, sha256
from tensorizer_rs import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorSerializer,
    _cuda,
    _native,
)

pytestmark = pytest.mark.gpu

CHUNK = 2 << 20


@pytest.fixture(autouse=True)
def _cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    default = _cuda.staging()
    yield
    _cuda.staging(*default[:2], default[3])


def _sealed(path, sd, passphrase=None):
    enc = EncryptionParams.from_string(passphrase) if passphrase else EncryptionParams.random()
    s = TensorSerializer(str(path), encryption=enc)
    s.write_state_dict(sd)
    s.close()
    dec = (
        DecryptionParams.from_string(passphrase)
        if passphrase
        else DecryptionParams.from_key(enc.key)
    )
    return str(path), dec


def _stored(path) -> int:
    return sum(e["data_length"] for e in _native.TensorFile(str(path)).entries())


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(40 * CHUNK // 4 + 333, generator=g),  # 41 chunks: many buffers
        "two": torch.randn(CHUNK // 4 * 2, generator=g),  # exactly two chunks
        "small": torch.randn(1000, generator=g).to(torch.bfloat16),  # smaller than a chunk
        "one": torch.tensor([7], dtype=torch.int8),
        "empty": torch.empty(0, 3),
        "meta": torch.empty(64, 64, device="meta"),
        "mask": torch.rand(301, generator=g) > 0.5,
    }


def _check(d, sd):
    for k, v in sd.items():
        want = torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v
        got = d[k]
        assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got.cpu(), want), k


def _load(path, dec) -> TensorDeserializer:
    """A CUDA deserializer, loaded (an eager one loads at its first access)."""
    d = TensorDeserializer(path, device="cuda", encryption=dec)
    next(iter(d.values()))
    return d


def _on_device(fn):
    """Run ``fn``; the bytes the GPU kernels opened meanwhile (none in staging)."""
    before = _cuda.counters()
    fn()
    after = _cuda.counters()
    assert after["decrypted_in_staging"] == before["decrypted_in_staging"], after
    return after["decrypted_on_device"] - before["decrypted_on_device"]


def test_vectors_decrypt_on_the_gpu(vectors_dir):
    """Every encrypted golden vector decrypts on the GPU to the manifest's exact bytes, and to
    the same bytes as the host path (raw-key and passphrase files); the tampered one fails
    naming its tensor."""
    n = 0
    for mf in sorted(Path(vectors_dir).glob("*.tensors.json")):
        m = json.loads(mf.read_text())
        if not m.get("encryption"):
            continue
        path, dec = str(Path(vectors_dir) / m["file"]), decryption_for(m, Path(vectors_dir))
        bad = m["expect"].get("corrupted_tensor")
        if bad:
            with pytest.raises(CryptographyError, match="authentication failed") as err:
                _load(path, dec)
            assert f"tensor {bad!r}" in str(err.value) and m["file"] in str(err.value)
            continue
        box = {}
        opened = _on_device(lambda box=box, path=path, dec=dec: box.update(d=_load(path, dec)))
        assert opened == _stored(path) > 0, m["file"]
        host = TensorDeserializer(path, device="cpu", encryption=dec)
        for t in m["tensors"]:
            got = box["d"][t["name"]]
            assert got.is_cuda and sha256(got.cpu()) == t["sha256"], (m["file"], t["name"])
            assert sha256(host[t["name"]]) == t["sha256"], (m["file"], t["name"])
        n += 1
    assert n >= 4, n


@pytest.mark.parametrize("staging", [None, (16 << 20, 4 << 20), (8 << 20, 2 << 20)])
@pytest.mark.parametrize("passphrase", [None, "correct horse"], ids=["key", "passphrase"])
def test_layouts_new_tensors(tmp_path, staging, passphrase):
    """Empty tensors, tensors smaller than a chunk, a tensor spanning many staging buffers, a
    model larger than the staging pool (8 MiB pool), buffers smaller than a chunk (whole
    tensors on one stream): exact bytes, every sealed byte opened on the GPU."""
    if staging:
        _cuda.staging(*staging)
    sd = _state(1)
    path, dec = _sealed(tmp_path / "s.tensors", sd, passphrase)
    box = {}
    opened = _on_device(lambda: box.update(d=_load(path, dec)))
    assert opened == _stored(path)
    _check(box["d"], sd)


def test_in_place_and_tampered_in_place(tmp_path):
    """``load_into_module`` fills existing CUDA tensors with ciphertext opened where it lies;
    a tampered chunk fails naming the tensor and saying the module's contents are undefined."""
    g = torch.Generator().manual_seed(2)
    src = torch.nn.Linear(2048, 1024)
    with torch.no_grad():
        src.weight.copy_(torch.randn(1024, 2048, generator=g))
    enc = EncryptionParams.random()
    path = str(tmp_path / "m.tensors")
    s = TensorSerializer(path, encryption=enc)
    s.write_module(src)
    s.close()
    dec = DecryptionParams.from_key(enc.key)
    dst = torch.nn.Linear(2048, 1024, device="cuda")
    ptr = dst.weight.data_ptr()
    opened = _on_device(
        lambda: TensorDeserializer(path, device="cuda", encryption=dec).load_into_module(dst)
    )
    assert opened == _stored(path) and dst.weight.data_ptr() == ptr
    assert torch.equal(dst.weight.cpu(), src.weight.detach())
    e = next(x for x in _native.TensorFile(path).entries() if x["name"] == ".weight")
    data = bytearray(Path(path).read_bytes())
    data[e["data_offset"] + e["data_length"] // 2] ^= 1
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CryptographyError, match="undefined") as err:
        TensorDeserializer(path, device="cuda", encryption=dec).load_into_module(dst)
    assert "tensor '.weight'" in str(err.value)


@pytest.mark.parametrize("where", ["first", "middle", "last", "mac", "wrong key"])
def test_tampered(tmp_path, where):
    """A flipped bit in the first, a middle or the last chunk, or in a MAC, or a wrong key,
    fails the load with the file and the tensor named."""
    sd = {"a.b": torch.randn(5 * CHUNK // 4 + 9), "s": torch.ones(4)}
    enc = EncryptionParams.random()
    path = str(tmp_path / "enc.tensors")
    s = TensorSerializer(path, encryption=enc)
    s.write_state_dict(sd)
    s.close()
    dec = DecryptionParams.from_key(enc.key)
    f = _native.TensorFile(path)
    i, e = next((i, x) for i, x in enumerate(f.entries()) if x["name"] == "a.b")
    data = bytearray(Path(path).read_bytes())
    if where == "mac":
        mac = bytes(_native.cuda_tensor_chunks(f, i, enc.key)[2][3][3])
        data[data.index(mac, e["header_offset"], e["data_offset"])] ^= 1
    elif where != "wrong key":
        at = {"first": 3, "middle": 2 * CHUNK + 11, "last": e["data_length"] - 1}[where]
        data[e["data_offset"] + at] ^= 0x10
    Path(path).write_bytes(bytes(data))
    if where == "wrong key":
        dec = DecryptionParams.from_key(bytes(32))
    with pytest.raises(CryptographyError, match="authentication failed") as err:
        _load(path, dec)
    assert "enc.tensors" in str(err.value) and "tensor '" in str(err.value)
    if where != "wrong key":
        assert "tensor 'a.b'" in str(err.value)


def test_two_loads_from_two_threads(tmp_path):
    sds = [_state(10 + k) for k in range(2)]
    files = [_sealed(tmp_path / f"t{k}.tensors", sd) for k, sd in enumerate(sds)]
    out, errors = [None, None], []

    def run(k):
        try:
            out[k] = _load(*files[k])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    opened = _on_device(lambda: [t.start() for t in threads] + [t.join() for t in threads])
    assert not errors, errors
    assert opened == sum(_stored(p) for p, _ in files)
    for d, sd in zip(out, sds):
        _check(d, sd)


_CHILD = """
import logging, sys, torch
from tensorizer_rs import DecryptionParams, TensorDeserializer, _cuda
lines = []
class Keep(logging.Handler):
    def emit(self, r):
        if "decrypting" in r.getMessage():
            lines.append(r.levelname + " " + r.getMessage())
logging.getLogger("tensorizer_rs").addHandler(Keep())
logging.getLogger("tensorizer_rs").setLevel(logging.INFO)
d = TensorDeserializer(sys.argv[1], device="cuda",
                       encryption=DecryptionParams.from_key(bytes.fromhex(sys.argv[2])))
total = float(d["big"].sum())
c = _cuda.counters()
assert c["decrypted_on_device"] == 0 and c["decrypted_in_staging"] > 0, c
assert len(lines) == 1 and "TENSORIZER_RS_GPU_DECRYPT=0" in lines[0], lines
print("OK", total)
"""


def test_host_decryption_when_asked(tmp_path):
    """TENSORIZER_RS_GPU_DECRYPT=0: the host path, with one log line saying why."""
    sd = _state(3)
    enc = EncryptionParams.random()
    path = str(tmp_path / "h.tensors")
    s = TensorSerializer(path, encryption=enc)
    s.write_state_dict(sd)
    s.close()
    env = {**os.environ, "TENSORIZER_RS_GPU_DECRYPT": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, path, enc.key.hex()],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
    assert float(p.stdout.split()[-1]) == pytest.approx(float(sd["big"].sum()), rel=1e-4)


def test_no_fallback_line_on_the_gpu_path(tmp_path, caplog):
    sd = _state(4)
    path, dec = _sealed(tmp_path / "q.tensors", sd)
    with caplog.at_level(logging.INFO, logger="tensorizer_rs"):
        _check(TensorDeserializer(path, device="cuda", encryption=dec), sd)
    assert not [r for r in caplog.records if "decrypting on the host" in r.getMessage()]
