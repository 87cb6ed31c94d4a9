"""Encryption: our encrypted files load in CoreWeave's tensorizer and vice versa; bad keys and
tampering fail clearly, naming the file and tensor, and never leak key material."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_coreweave
from helpers import sha256
from samples import dtype_tensors
from tensorizer_rs import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorSerializer,
    _native,
)

TESTS = str(Path(__file__).parent)
MIB = 1 << 20
# Fast Argon2 parameters keep the tests quick; the defaults (MODERATE) are checked once below.
FAST = {"opslimit": EncryptionParams.OpsLimit.MIN, "memlimit": EncryptionParams.MemLimit.MIN}


def sizes_state_dict():
    g = torch.Generator().manual_seed(5)
    sd = dtype_tensors()
    for n in (0, 1, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1, 5 * MIB + 3):
        sd[f"bytes_{n}"] = torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
    sd["meta"] = torch.empty(3, device="meta")
    return sd


def write(path, sd, enc):
    with TensorSerializer(str(path), encryption=enc) as s:
        s.write_state_dict(sd)
    return str(path)


def check_same(path, sd, dec):
    d = TensorDeserializer(path, device="cpu", verify_hash=True, encryption=dec)
    for k, t in sd.items():
        want = torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t
        assert sha256(d[k]) == sha256(want), k
        assert d[k].dtype == t.dtype


def test_raw_key_and_passphrase_roundtrip(tmp_path):
    sd = sizes_state_dict()
    enc = EncryptionParams.random()
    path = write(tmp_path / "raw.tensors", sd, enc)
    check_same(path, sd, DecryptionParams.from_key(enc.key))
    f = _native.TensorFile(path)
    assert f.version == 4 and f.flags == 1  # meta tensor -> v4, encrypted flag
    pw = EncryptionParams.from_string("correct horse", **FAST)
    path2 = write(tmp_path / "pw.tensors", sd, pw)
    check_same(path2, sd, DecryptionParams.from_string("correct horse"))
    check_same(path2, sd, DecryptionParams.from_key(pw.key))  # a derived key works too
    # The plaintext never appears in the file, and the caller's tensors are untouched.
    blob = Path(path).read_bytes()
    assert sd["bytes_5242883"].numpy().tobytes()[:4096] not in blob
    assert sha256(sd["t_float32"]) == sha256(dtype_tensors()["t_float32"])


def test_v3_when_no_meta(tmp_path):
    path = write(tmp_path / "v3.tensors", {"a": torch.ones(4)}, EncryptionParams.random())
    f = _native.TensorFile(path)
    assert (f.version, f.flags) == (3, 0)


@pytest.mark.crosscheck
@pytest.mark.parametrize("version", ["2.12.1", "2.10.1"])
def test_coreweave_reads_our_encrypted_files(tmp_path, version):
    sd = sizes_state_dict()
    raw = EncryptionParams.random()
    pw = EncryptionParams.from_string("s3cret", **FAST)
    p_raw = write(tmp_path / "raw.tensors", sd, raw)
    p_pw = write(tmp_path / "pw.tensors", sd, pw)
    script = r"""
import hashlib, json, sys, torch
from tensorizer import TensorDeserializer, DecryptionParams
def h(t):
    t = t.detach().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
out = {}
for path, dec in ((sys.argv[1], DecryptionParams.from_key(bytes.fromhex(sys.argv[2]))),
                  (sys.argv[3], DecryptionParams.from_string(sys.argv[4]))):
    d = TensorDeserializer(path, device="cpu", verify_hash=True, encryption=dec)
    out[path] = {k: h(v) for k, v in d.items()}
print("RESULT" + json.dumps(out))
"""
    proc = run_coreweave(version, script, p_raw, raw.key.hex(), p_pw, "s3cret")
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])
    want = {
        k: sha256(torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t)
        for k, t in sd.items()
    }
    assert got[p_raw] == want and got[p_pw] == want


@pytest.mark.crosscheck
@pytest.mark.parametrize("version", ["2.12.1", "2.10.1"])
def test_we_read_files_coreweave_encrypts_now(tmp_path, version):
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from samples import dtype_tensors
from tensorizer import TensorSerializer, EncryptionParams
sd = dtype_tensors(); sd["big"] = torch.arange(3 * 1024 * 1024, dtype=torch.int32)
del sd["empty_f32"]  # CoreWeave's writer cannot encrypt empty tensors
raw = EncryptionParams.random()
s = TensorSerializer(sys.argv[1] + ".raw", encryption=raw); s.write_state_dict(sd); s.close()
pw = EncryptionParams.from_string("pass phrase", EncryptionParams.OpsLimit.MIN, EncryptionParams.MemLimit.MIN)
s = TensorSerializer(sys.argv[1] + ".pw", encryption=pw); s.write_state_dict(sd); s.close()
print("KEY" + raw.key.hex())
"""
    base = str(tmp_path / "cw")
    proc = run_coreweave(version, script, base, TESTS)
    key = bytes.fromhex(next(x for x in proc.stdout.splitlines() if x.startswith("KEY"))[3:])
    sd = dtype_tensors()
    sd["big"] = torch.arange(3 * 1024 * 1024, dtype=torch.int32)
    del sd["empty_f32"]
    check_same(base + ".raw", sd, DecryptionParams.from_key(key))
    check_same(base + ".pw", sd, DecryptionParams.from_string("pass phrase"))


@pytest.fixture
def encrypted(tmp_path):
    sd = {
        "small": torch.arange(16, dtype=torch.float32),
        "model.layers.3.mlp.down_proj.weight": torch.ones(3 * MIB // 4),
    }
    enc = EncryptionParams.random()
    return write(tmp_path / "e.tensors", sd, enc), enc


def _fails(path, dec, match, tensor=None, **kw):
    with pytest.raises(CryptographyError, match=match) as e:
        TensorDeserializer(path, device="cpu", encryption=dec, **kw)
    msg = str(e.value)
    assert Path(path).name in msg
    if tensor:
        assert f"tensor '{tensor}'" in msg
    return msg


def test_wrong_key_and_passphrase(encrypted, tmp_path):
    path, enc = encrypted
    wrong = DecryptionParams.from_key(bytes(32))
    msg = _fails(path, wrong, "authentication failed", tensor="small")
    assert enc.key.hex() not in msg and bytes(32).hex() not in msg
    pw_path = write(
        tmp_path / "pw.tensors", {"w": torch.ones(8)}, EncryptionParams.from_string("right", **FAST)
    )
    msg = _fails(
        pw_path, DecryptionParams.from_string("Zq9-not-it"), "authentication failed", tensor="w"
    )
    assert "Zq9" not in msg and "right" not in msg


def test_passphrase_for_raw_key_file(encrypted):
    path, _ = encrypted
    _fails(path, DecryptionParams.from_string("anything"), "passphrase", tensor="small")


@pytest.mark.parametrize("where", ["first_chunk", "last_chunk", "mac"])
def test_flipped_bits_fail(encrypted, tmp_path, where):
    path, enc = encrypted
    f = _native.TensorFile(path)
    e = next(x for x in f.entries() if x["name"].endswith("down_proj.weight"))
    data = bytearray(Path(path).read_bytes())
    if where == "first_chunk":
        data[e["data_offset"] + 10] ^= 1
    elif where == "last_chunk":
        data[e["data_offset"] + e["data_length"] - 1] ^= 0x80
    else:
        data[e["data_offset"] - 8 - 5] ^= 4  # inside the last MAC, just before data_length
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(bytes(data))
    for verify in (False, True):
        _fails(
            str(bad),
            DecryptionParams.from_key(enc.key),
            "authentication failed",
            tensor="model.layers.3.mlp.down_proj.weight",
            verify_hash=verify,
        )


def test_key_for_plaintext_file_and_missing_key(encrypted, tmp_path):
    plain = tmp_path / "plain.tensors"
    with TensorSerializer(str(plain)) as s:
        s.write_state_dict({"a": torch.ones(2)})
    path, _ = encrypted
    for lazy in (False, True):
        # Lazy loads too, at construction, as CoreWeave's (was: only at the first access,
        # while `in` and keys() answered).
        _fails(str(plain), DecryptionParams.from_key(bytes(32)), "not encrypted", lazy_load=lazy)
        _fails(path, None, "no decryption key", lazy_load=lazy)


def test_truncated_crypt_info(encrypted, tmp_path):
    path, enc = encrypted
    f = _native.TensorFile(path)
    e = f.entries()[0]
    data = bytearray(Path(path).read_bytes())
    # The crypt-info length sits right after the 40-byte hash section; claim far more bytes.
    hdr = data[e["header_offset"] : e["data_offset"]]
    crypt_at = hdr.find(struct.pack("<Q", 2 + 8 + 42 + 16))
    assert crypt_at > 0
    data[e["header_offset"] + crypt_at : e["header_offset"] + crypt_at + 8] = struct.pack(
        "<Q", 1 << 20
    )
    bad = tmp_path / "trunc.tensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crypt-info") as err:
        TensorDeserializer(str(bad), device="cpu", encryption=DecryptionParams.from_key(enc.key))
    assert "tensor 'small'" in str(err.value)


def test_params_api():
    with pytest.raises(ValueError):
        EncryptionParams(b"short")
    with pytest.raises(TypeError):
        EncryptionParams("not bytes" * 4)
    with pytest.raises(TypeError):
        EncryptionParams.from_string("x", opslimit=EncryptionParams.MemLimit.MIN)
    with pytest.raises(ValueError):
        _ = EncryptionParams.random().salt
    p = EncryptionParams.from_string("pw", salt=b"s" * 16)  # MODERATE defaults
    assert len(p.key) == 32 and p.salt == b"s" * 16
    assert p.key == EncryptionParams.from_string("pw", 3, 256 << 20, b"s" * 16).key
    assert "pw" not in repr(p) and p.key.hex() not in repr(p)
    d = DecryptionParams.from_string("pw")
    assert d.source == b"pw" and d.key is None
    with pytest.raises(TypeError):
        TensorDeserializer("/nonexistent", device="cpu", encryption="key")
