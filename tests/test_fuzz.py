"""Seeded random corruption of the golden vectors' headers and indexes: every load either
succeeds or raises a TensorizerError naming the file; never a Rust panic, a MemoryError, another
exception type, or a hang.

The mutations run in a subprocess (this file run as a script) under a timeout, so a hang fails
the test instead of stalling the suite, and a crash (a signal) shows as one."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# Values that make lengths, counts and offsets absurd, off by one, or just past the end.
_SPECIAL = [0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


def _structure(path: str, data: bytes) -> list[int]:
    """The offsets of the bytes that hold structure: the file header and the used part of the
    index (the index's reserved tail is zero padding), and each tensor's own header."""
    from tensorizer_rs import _native

    entries = _native.TensorFile(path).entries()
    first = min((e["header_offset"] for e in entries), default=len(data))
    used = len(data[:first].rstrip(b"\0"))
    offsets = list(range(used))
    for e in entries:
        offsets.extend(range(e["header_offset"], e["data_offset"]))
    return offsets


def _mutations(data: bytes, structure: list[int], rng: random.Random) -> bytes:
    """One corrupted copy of `data`; most changes land where lengths and offsets live."""
    d = bytearray(data)
    kind = rng.choice(["byte", "bytes", "u64", "u32", "u16", "truncate", "anywhere"])
    if kind == "truncate":
        return bytes(d[: rng.randrange(len(d))])
    at = rng.randrange(len(d)) if kind == "anywhere" else rng.choice(structure)
    if kind in ("byte", "anywhere"):
        d[at] = rng.randrange(256)
    elif kind == "bytes":
        for _ in range(rng.randint(2, 8)):
            d[rng.choice(structure)] = rng.randrange(256)
    else:
        fmt = {"u64": "<Q", "u32": "<I", "u16": "<H"}[kind]
        size = struct.calcsize(fmt)
        pool = _SPECIAL + [len(d), len(d) + 1, len(d) - 1, rng.getrandbits(8 * size)]
        value = rng.choice(pool) % (1 << (8 * size))
        d[at : at + size] = struct.pack(fmt, value)[: len(d) - at]
    return bytes(d)


def _load_all(path: str, key: bytes | None, rng: random.Random):
    from tensorizer_rs import DecryptionParams, TensorDeserializer

    kw = {"device": "cpu", "verify_hash": rng.random() < 0.5, "lazy_load": rng.random() < 0.5}
    if key is not None:
        kw["encryption"] = DecryptionParams.from_key(key)
    with TensorDeserializer(path, **kw) as d:
        for name in list(d.keys()):
            t = d[name]
            # Touch the bytes: a lazy load reads here.
            if hasattr(t, "numel") and t.numel():
                t.reshape(-1)[:1].clone()


def worker(out_dir: str, vectors: list, seed: int, per_vector: int) -> list[dict]:
    """Corrupt each vector (`[path, key file or None]`) `per_vector` times and load it; return
    the counts, then the outcomes that break the rule."""
    from tensorizer_rs import TensorizerError

    rng = random.Random(seed)
    bad, counts = [], {"ok": 0, "error": 0}
    for src, key_file in vectors:
        key = Path(key_file).read_bytes() if key_file else None
        data = Path(src).read_bytes()
        structure = _structure(src, data)
        for i in range(per_vector):
            mutated = _mutations(data, structure, rng)
            path = os.path.join(out_dir, f"{Path(src).stem}-{i}.tensors")
            Path(path).write_bytes(mutated)
            try:
                _load_all(path, key, rng)
                counts["ok"] += 1
                os.unlink(path)
            except TensorizerError as e:
                counts["error"] += 1
                if Path(path).name not in str(e):
                    bad.append({"file": path, "problem": f"message lacks the file: {e!r}"[:400]})
                else:
                    os.unlink(path)
            except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
                bad.append({"file": path, "problem": f"{type(e).__module__}.{e!r}"[:400]})
    return [{"counts": counts}] + bad


def _vectors(vectors_dir: Path) -> list:
    """`[path, key file or None]` of the vectors that load cleanly as written, except those
    that need a passphrase (Argon2id makes each load take long)."""
    out = []
    for m in sorted(vectors_dir.glob("*.tensors.json")):
        manifest = json.loads(m.read_text())
        enc = manifest.get("encryption")
        if manifest["expect"].get("load") != "ok" or (enc and enc["kind"] != "random_key"):
            continue
        key = str(vectors_dir / enc["key_file"]) if enc else None
        out.append([str(vectors_dir / manifest["file"]), key])
    return out


def test_corrupted_vectors_fail_cleanly(vectors_dir, tmp_path):
    vectors = _vectors(vectors_dir)
    assert len(vectors) >= 10 and any(key for _, key in vectors), vectors
    per_vector = int(os.environ.get("TENSORIZER_FUZZ_N", "120"))
    seed = int(os.environ.get("TENSORIZER_FUZZ_SEED", "20261128"))
    args = [
        sys.executable,
        __file__,
        str(tmp_path),
        str(seed),
        str(per_vector),
        json.dumps(vectors),
    ]
    try:
        proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a corrupted file hung the loader (seed {seed}): {e.stdout!s:.2000}")
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    counts, *bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not bad, json.dumps(bad[:10], indent=1)
    # The corruption must really reach the parser: most copies fail, some still load.
    total = counts["counts"]["ok"] + counts["counts"]["error"]
    assert total == per_vector * len(vectors)
    assert counts["counts"]["error"] > total // 2, counts


if __name__ == "__main__":
    out_dir, seed, per_vector, vecs = sys.argv[1:]
    print(json.dumps(worker(out_dir, json.loads(vecs), int(seed), int(per_vector))))
