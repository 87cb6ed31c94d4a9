"""Checks of the GPU decryption kernels through ``_native.cuda_open_chunks``, shared by the
real-GPU tests (tests/gpu/test_gpu_decrypt.py, device memory from torch) and the stand-in
driver (tests/mock_cuda/decrypt_checks.py, where device memory is host memory).

A ``Memory`` puts bytes where the kernels can reach them and reads them back; ``open_`` is
``(key, [(address, length, nonce, mac)]) -> [verdict]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path

from tensorizer_rs import _native

CHUNK = 2 << 20
LENGTHS = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 4095, 65536 + 31, CHUNK - 1, CHUNK]


def nvrtc_dirs() -> list[str]:
    """``site-packages/nvidia/*/lib`` of this interpreter (where the NVRTC wheels put it)."""
    site = sysconfig.get_paths()["purelib"]
    return [os.path.join(site, "nvidia", s, "lib") for s in ("cu13", "cuda_nvrtc", "cu12")]


def _rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _seal_all(rng, key, lengths):
    out = []
    for n in lengths:
        plain = _rand(rng, n)
        nonce = _rand(rng, 24)
        ct, mac = _native.secretbox_seal(key, nonce, plain)
        out.append((plain, ct, nonce, mac))
    return out


def lengths_and_alignments(mem, open_) -> None:
    """Every length class, at 16-byte aligned and unaligned addresses, in one call."""
    rng = random.Random(1)
    key = _rand(rng, 32)
    for shift in (0, 1, 4):
        sealed = _seal_all(rng, key, LENGTHS)
        addrs = [mem.put(ct, shift) for _, ct, _, _ in sealed]
        v = open_(key, [(a, len(ct), nonce, mac) for a, (_, ct, nonce, mac) in zip(addrs, sealed)])
        assert v == ["authentic"] * len(LENGTHS), (shift, v)
        for a, (plain, *_rest) in zip(addrs, sealed):
            assert mem.get(a, len(plain)) == plain, (shift, len(plain))


def tampering_and_wrong_keys(mem, open_) -> None:
    """A multi-chunk run (as the writer seals a tensor): a flipped bit in the first, a middle or
    the last chunk forges that chunk alone, which stays ciphertext; a flipped MAC bit forges its
    chunk; a wrong key forges all and decrypts nothing."""
    rng = random.Random(2)
    key = _rand(rng, 32)
    sealed = _seal_all(rng, key, [CHUNK, CHUNK, CHUNK, 12345])
    whole = b"".join(ct for _, ct, _, _ in sealed)
    offsets = [0, CHUNK, 2 * CHUNK, 3 * CHUNK]

    def run(data, macs=None, k=key):
        base = mem.put(data, 0)
        chunks = [
            (base + off, len(ct), nonce, (macs or {}).get(i, mac))
            for i, (off, (_, ct, nonce, mac)) in enumerate(zip(offsets, sealed))
        ]
        return base, open_(k, chunks)

    base, v = run(whole)
    assert v == ["authentic"] * 4, v
    assert mem.get(base, len(whole)) == b"".join(p for p, *_ in sealed)
    for pos, bad in ((0, 0), (CHUNK + 777, 1), (len(whole) - 1, 3)):
        data = bytearray(whole)
        data[pos] ^= 0x04
        base, v = run(bytes(data))
        want = ["authentic"] * 4
        want[bad] = "forged"
        assert v == want, (pos, v)
        got = mem.get(base, len(whole))
        for i, (off, (plain, ct, _, _)) in enumerate(zip(offsets, sealed)):
            expect = bytes(data[off : off + len(ct)]) if i == bad else plain
            assert got[off : off + len(ct)] == expect, (pos, i)
    mac = bytearray(sealed[2][3])
    mac[0] ^= 1
    _, v = run(whole, {2: bytes(mac)})
    assert v == ["authentic", "authentic", "forged", "authentic"], v
    wrong = bytes([key[0] ^ 0x80]) + key[1:]
    base, v = run(whole, k=wrong)
    assert v == ["forged"] * 4, v
    assert mem.get(base, len(whole)) == whole


def many_chunks(mem, open_, count=75) -> int:
    """More chunks than one launch holds (32). Returns the bytes opened."""
    rng = random.Random(3)
    key = _rand(rng, 32)
    sealed = _seal_all(rng, key, [rng.randrange(0, 5000) for _ in range(count)])
    addrs = [mem.put(ct, 0) for _, ct, _, _ in sealed]
    v = open_(key, [(a, len(ct), n, m) for a, (_, ct, n, m) in zip(addrs, sealed)])
    assert v == ["authentic"] * count, v
    assert all(mem.get(a, len(p)) == p for a, (p, *_r) in zip(addrs, sealed))
    return sum(len(p) for p, *_r in sealed)


def _vector_key(manifest: dict, vectors_dir: Path) -> bytes:
    enc = manifest["encryption"]
    if enc["kind"] == "random_key":
        return (vectors_dir / enc["key_file"]).read_bytes()
    return bytes.fromhex(enc["derived_key_hex"])


def open_file(mem, open_, path: str, key: bytes) -> dict[str, tuple[list[str], bytes]]:
    """Every tensor of an encrypted file opened through its own crypt info: data offset ->
    (verdicts, bytes after the kernels)."""
    f = _native.TensorFile(path)
    raw = Path(path).read_bytes()
    out = {}
    for i in range(len(f.entries())):
        off, length, chunks = _native.cuda_tensor_chunks(f, i, key)
        data = raw[off : off + length]
        base = mem.put(data, 0)
        v = open_(key, [(base + s, n, nonce, mac) for s, n, nonce, mac in chunks]) if chunks else []
        out[off] = (v, mem.get(base, length))
    return out


def golden_vectors(mem, open_, vectors_dir: Path) -> int:
    """Every encrypted golden vector: each tensor's chunks decrypt to the manifest's bytes
    (sha256), and the tampered vector's corrupted tensor is forged. Returns tensors checked."""
    checked = 0
    for mf in sorted(vectors_dir.glob("*.tensors.json")):
        m = json.loads(mf.read_text())
        if not isinstance(m, dict) or not m.get("encryption"):
            continue
        res = open_file(mem, open_, str(vectors_dir / m["file"]), _vector_key(m, vectors_dir))
        for t in m["tensors"]:
            if t["data_length"] == 0:
                continue
            v, data = res[t["data_offset"]]
            if m["expect"].get("corrupted_tensor") == t["name"]:
                assert "forged" in v, (m["file"], t["name"], v)
                continue
            assert v and all(x == "authentic" for x in v), (m["file"], t["name"], v)
            assert hashlib.sha256(data).hexdigest() == t["sha256"], (m["file"], t["name"])
            checked += 1
    return checked


def written_file(mem, open_, path: str) -> None:
    """A file our writer sealed in 2 MiB chunks (nonces n0 + i): a multi-chunk tensor, one
    smaller than a chunk; opened through the file's crypt info."""
    import torch
    from tensorizer_rs import EncryptionParams, TensorSerializer

    g = torch.Generator().manual_seed(5)
    sd = {
        "big": torch.randint(0, 255, (5 * CHUNK + 3,), dtype=torch.uint8, generator=g),
        "small": torch.randn(77, generator=g),
    }
    enc = EncryptionParams.random()
    s = TensorSerializer(path, encryption=enc)
    s.write_state_dict(sd)
    s.close()
    res = open_file(mem, open_, path, enc.key)
    blobs = sorted(res.values(), key=lambda r: -len(r[1]))
    assert blobs[0][0] == ["authentic"] * 6, blobs[0][0]
    assert blobs[0][1] == sd["big"].numpy().tobytes()
    assert blobs[1][0] == ["authentic"] and blobs[1][1] == sd["small"].numpy().tobytes()
