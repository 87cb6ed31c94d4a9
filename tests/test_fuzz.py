"""Seeded, structure-aware corruption of `.tensors` files: every mutant loads identically (eager,
lazy and verified loads agree, and a load that passes hash verification returns the original
bytes), or fails with a TensorizerError naming the file; one that declares more memory than the
child may have fails with a clear limit error (a TensorizerError too). Never a panic, a
MemoryError, another exception type, or a hang.

The seeds are the golden vectors (all but the passphrase ones, whose Argon2 parameters cost a
second a load) and files the test makes: hostile tensor names (deep, conflicting, malformed
paths), a passphrase file with the cheapest key derivation, meta and empty tensors.

Mutations know the layout: each integer field of the file header, the metadata index, every
tensor header and its crypt info (KDF parameters, cipher chunk, MAC count) gets boundary values
(0, 1, 2^k ± 1, the file size, the field's own value ± 1 or with one bit flipped, ...). Blind
byte changes and truncations run beside them, and 2 to 4 mutations are stacked.

Each mutant runs under a per-mutant timeout (a SIGALRM in the worker, which the loads must
honour like Ctrl-C) in a child process with an address-space limit; the child as a whole has a
timeout too, so a hang fails the test instead of stalling the suite.

CI runs a bounded set (about a minute here). A release runs more, e.g.:

    TENSORIZER_FUZZ_N=2000 TENSORIZER_FUZZ_SEED=$RANDOM pytest tests/test_fuzz.py

(docs/robustness.md). A failing mutant is kept in the test's tmp directory and named with its
seed and mutations.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Per-width boundary values: absurd, off by one, sign boundaries.
_BOUNDS = {
    1: [0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF],
    2: [0, 1, 2, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF],
    4: [0, 1, 2, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1],
    8: [0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1],
}
# Field-specific values worth trying on top of those.
_EXTRA = {
    "version": [0, 1, 2, 3, 4, 5, 6],
    "flags": [0, 1, 2, 3, 4, 0x81],
    "tensor_type": [0, 1, 2, 3],
    "entry_version": [0, 1, 4, 5, 6],
    "hash_type": [0, 1, 2],
    "hash_len": [0, 4, 31, 32, 33],
    "chunk_type": [0, 1, 2, 3, 4],
    "kdf_method": [0, 1, 2],
    "alg": [0, 1, 2, 3, -1 & 0xFFFFFFFF],
    # KDF bounds: the fuzzing campaign's values, the presets and just past them.
    "opslimit": [0, 1, 3, 4, 5, 16, 16_777_217, 2**32 - 1, 2**32],
    "memlimit": [0, 8191, 8192, 8193, 64 << 20, 1 << 30, (1 << 30) + 1024, 1 << 42, 2**64 - 1],
    "salt_len": [0, 15, 16, 17],
    "cipher_chunk": [0, 63, 64, 1024, 1088, 2 << 20, (2 << 20) + 64],
    "mac_count": [0, 1, 2, 3, 2**32],
}

# Per mutant: a mutant's KDF parameters may ask for up to the default bound (4 passes over
# 1 GiB: 6 s on a 2-core EPYC), so the limit sits well above that.
_TIMEOUT_S = float(os.environ.get("TENSORIZER_FUZZ_TIMEOUT", "30"))
# The child's address space: torch alone maps about 3.2 GiB.
_ADDRESS_SPACE = 6 << 30


class _Walker:
    """Reads integer fields in order and records where each is."""

    def __init__(self, data: bytes, at: int, end: int, fields: list, where: str) -> None:
        self.d, self.at, self.end, self.fields, self.where = data, at, end, fields, where

    def int(self, kind: str, width: int, signed: bool = False) -> int:
        if self.at + width > self.end:
            raise ValueError("past the end")
        raw = self.d[self.at : self.at + width]
        v = int.from_bytes(raw, "little", signed=signed)
        self.fields.append((self.at, width, kind, v & ((1 << (8 * width)) - 1), self.where))
        self.at += width
        return v

    def skip(self, n: int) -> None:
        if n < 0 or self.at + n > self.end:
            raise ValueError("past the end")
        self.at += n


def _crypt_fields(w: _Walker) -> None:
    block = w.int("crypt_len", 8)
    end = min(w.at + block, w.end)
    c = _Walker(w.d, w.at, end, w.fields, w.where)
    for _ in range(c.int("chunk_count", 2)):
        chunk = c.int("chunk_len", 8)
        cc = _Walker(w.d, c.at, min(c.at + chunk, end), w.fields, w.where)
        kind = cc.int("chunk_type", 2)
        if kind == 1:
            cc.int("kdf_method", 2)
            cc.int("opslimit", 8)
            cc.int("memlimit", 8)
            cc.int("alg", 4)
            cc.skip(cc.int("salt_len", 2))
        elif kind == 2:
            cc.int("cipher_chunk", 8)
            cc.skip(24)
            cc.int("mac_count", 8)
        c.skip(chunk)
    w.skip(block)


def fields(data: bytes) -> list:
    """Every integer field of a well-formed file: `(offset, width, kind, value, where)`."""
    out: list = []
    h = _Walker(data, 5, 73, out, "file header")
    version = h.int("version", 4)
    flags = h.int("flags", 1)
    h.skip(31)
    h.int("total_data", 8)
    h.int("reserved", 8)
    count = h.int("count", 8)
    index_len = h.int("index_len", 8)
    versioned = bool(flags & 2)
    has_crypt = version == 3 or (version >= 4 and flags & 1)
    w = _Walker(data, 73, 73 + index_len, out, "index")
    records = []
    for _ in range(count):
        ev = w.int("entry_version", 4) if versioned else 1
        w.skip(w.int("name_len", 2))
        w.int("tensor_type", 1)
        w.skip(w.int("dtype_len", 1))
        for _ in range(w.int("ndim", 1)):
            w.int("dim", 8 if ev == 5 else 4)
        records.append((w.int("header_offset", 8), ev))
        w.int("data_offset", 8)
        w.int("data_length", 8)
    for i, (at, ev) in enumerate(records):
        r = _Walker(data, at, len(data), out, f"tensor header {i}")
        hl = r.int("header_len", 8)
        r.end = min(at + hl, len(data))
        r.int("module_idx", 2)
        r.int("tensor_type", 1)
        r.skip(r.int("name_len", 2))
        r.skip(r.int("dtype_len", 1))
        for _ in range(r.int("ndim", 1)):
            r.int("dim", 8 if ev == 5 else 4)
        section = r.int("hash_section_len", 2)
        s = _Walker(data, r.at, r.at + section, out, f"tensor header {i}")
        for _ in range(s.int("hash_count", 1)):
            s.int("hash_type", 1)
            s.skip(s.int("hash_len", 1))
        r.skip(section)
        if has_crypt:
            _crypt_fields(r)
        r.at = r.end - 8
        r.int("data_length", 8)
    return out


def _values(field: tuple, size: int, rng: random.Random) -> list:
    at, width, kind, value, _ = field
    mask = (1 << (8 * width)) - 1
    vals = list(_BOUNDS[width]) + _EXTRA.get(kind, [])
    vals += [value - 1, value + 1, value * 2, value // 2, value ^ (1 << rng.randrange(8 * width))]
    if width == 8:
        vals += [size, size - 1, size + 1, size - at, max(0, size - value)]
    return [v & mask for v in vals]


def mutate(data: bytes, flds: list, rng: random.Random) -> tuple[bytes, list]:
    """One mutant: 1 mutation, or 2 to 4 stacked; with what was done, for the report."""
    d = bytearray(data)
    did = []
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4)):
        kind = rng.choices(["field", "byte", "bytes", "truncate"], weights=[70, 12, 12, 6])[0]
        if kind == "field" and flds:
            f = rng.choice(flds)
            at, width = f[0], f[1]
            if at + width > len(d):
                continue
            v = rng.choice(_values(f, len(d), rng))
            d[at : at + width] = v.to_bytes(width, "little")
            did.append(f"{f[4]} {f[2]}@{at}={v}")
        elif kind == "byte":
            at = rng.randrange(len(d))
            d[at] = rng.randrange(256)
            did.append(f"byte@{at}")
        elif kind == "bytes" and flds:
            at = rng.choice(flds)[0]
            n = rng.randint(2, 16)
            d[at : at + n] = bytes(rng.randrange(256) for _ in range(n))[: len(d) - at]
            did.append(f"bytes@{at}+{n}")
        elif kind == "truncate":
            n = rng.randrange(len(d))
            del d[n:]
            did.append(f"truncate@{n}")
            flds = [f for f in flds if f[0] + f[1] <= n]
    return bytes(d), did


# ----------------------------------------------------------------------------- generated seeds
# Names of equal length in each file, so swapping in a hostile one keeps every offset.
_HOSTILE_PAIRS = [
    (b"\x1e[" + b",".join([b"0"] * 2000) + b"]", b"\x1e[" + b",".join([b"0"] * 1999) + b",1]"),
    (b'\x1e["a",0]', b'\x1e["a","b"]'),  # int and str keys at one level
    (b'\x1e["a",0]', b'\x1e["a"]\x00\x00'),  # a leaf that is a prefix (NUL-padded)
    (b'\x1e["x"]', b"x\x00\x00\x00\x00\x00"),  # the same path, spelt two ways (NUL-padded)
    (b"\x1e[18446744073709551616]", b"\x1e[-1]" + b" " * 17),
    (b"\x1e[1.5]", b"\x1e[1e3]"),
    (b"\x1e[[0]]", b'\x1e[{"a":1}]'),
    (b'\x1e["\\ud800"]', b'\x1e["\\u0000"]'),
    (b"\x1e[]", b"\x1e[" + b"[" * 3 + b"]"),
    (b"\xff\xfe\xfd", b"\xc3\x28\x00"),
    (b'\x1e[""]', b'\x1e["",""]'),
    (b"\x1e[0\n]", b"\x1e[0\r]"),
    (b"a" * 60000, b"b" * 60000),
]


def _hostile_names(dest: Path) -> list[str]:
    """Files of two tensors each, whose names are swapped for a hostile pair after writing."""
    import torch
    from tensorizer_rs import _native

    out = []
    for n, (h1, h2) in enumerate(_HOSTILE_PAIRS):
        width = max(len(h1), len(h2))
        h1, h2 = h1.ljust(width, b" "), h2.ljust(width, b" ")
        p1, p2 = b"P" + b"1" * (width - 1), b"Q" + b"2" * (width - 1)
        path = dest / f"names{n}.tensors"
        w = _native.TensorWriter(str(path))
        slot = w.add([(0, 2, p1, b"<f4", [2], False), (0, 2, p2, b"<i8", [3], False)])
        a, b = torch.ones(2), torch.arange(3)
        w.write_many([(slot, a.data_ptr(), 8), (slot + 1, b.data_ptr(), 24)])
        w.finish()
        data = path.read_bytes()
        assert data.count(p1) == 2 and data.count(p2) == 2
        path.write_bytes(data.replace(p1, h1).replace(p2, h2))
        out.append(str(path))
    return out


def _generated(dest: Path) -> list:
    """`[path, key file or None, passphrase or None]` of the seeds the test makes."""
    import torch
    from tensorizer_rs import EncryptionParams, TensorSerializer

    seeds = [[p, None, None] for p in _hostile_names(dest)]
    enc = EncryptionParams.from_string("pw", opslimit=1, memlimit=8192)
    sd = {"a": torch.arange(6.0), "m": torch.empty(3, device="meta"), "e": torch.zeros(0)}
    sd["big"] = torch.arange(300_000, dtype=torch.int32)  # two cipher chunks
    with TensorSerializer(str(dest / "pw.tensors"), encryption=enc) as s:
        s.write_state_dict(sd)
    seeds.append([str(dest / "pw.tensors"), None, "pw"])
    with TensorSerializer(str(dest / "meta.tensors")) as s:
        s.write_state_dict({"m": torch.empty(4, 5, device="meta"), "x": torch.ones(2)})
    seeds.append([str(dest / "meta.tensors"), None, None])
    return seeds


def _vectors(vectors_dir: Path) -> list:
    """`[path, key file or None, None]` of the vectors that load cleanly as written, except
    those that need a passphrase (Argon2id makes each load take long)."""
    out = []
    for m in sorted(vectors_dir.glob("*.tensors.json")):
        manifest = json.loads(m.read_text())
        enc = manifest.get("encryption")
        if manifest["expect"].get("load") != "ok" or (enc and enc["kind"] != "random_key"):
            continue
        key = str(vectors_dir / enc["key_file"]) if enc else None
        out.append([str(vectors_dir / manifest["file"]), key, None])
    return out


# ----------------------------------------------------------------------------- the worker
class _Timeout(BaseException):
    pass


def _on_alarm(*_):
    raise _Timeout()


def _read_all(path: str, key, passphrase, *, lazy: bool, verify: bool) -> dict:
    import torch
    from tensorizer_rs import DecryptionParams, TensorDeserializer

    kw: dict = {"device": "cpu", "verify_hash": verify, "lazy_load": lazy}
    if key is not None:
        kw["encryption"] = DecryptionParams.from_key(key)
    elif passphrase is not None:
        kw["encryption"] = DecryptionParams.from_string(passphrase)
    out = {}
    with TensorDeserializer(path, **kw) as d:
        # Every tensor through the nested view (deep paths must not hit a recursion limit).
        stack = [((), d.tree())]
        while stack:
            where, node = stack.pop()
            items = enumerate(node) if isinstance(node, list) else node.items()
            for k, v in items:
                if isinstance(v, (dict, list)):
                    stack.append(((*where, k), v))
                    continue
                flat = v.detach().contiguous().reshape(-1)
                raw = flat.view(torch.uint8).numpy().tobytes() if v.numel() else b""
                out[repr((*where, k))] = (None, None, str(v.dtype), tuple(v.shape), raw)
    return out


def _verify_cli(path: str, key_file) -> int:
    import contextlib
    import io

    from tensorizer_rs.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(["verify", path] + (["--keyfile", key_file] if key_file else []))


def _says_encrypted(path: str) -> bool:
    from tensorizer_rs import TensorizerError, _native

    try:
        return bool(_native.TensorFile(path).encrypted)
    except TensorizerError:
        return False


def _check(path: str, key_file, passphrase, original: dict, rng: random.Random) -> tuple:
    """`(problem or None, whether it loaded)`."""
    from tensorizer_rs import TensorizerError

    key = Path(key_file).read_bytes() if key_file else None
    name = Path(path).name
    results = {}
    for mode in ("eager", "lazy", "verified"):
        try:
            results[mode] = _read_all(
                path, key, passphrase, lazy=mode == "lazy", verify=mode == "verified"
            )
        except TensorizerError as e:
            if name not in str(e):
                return f"{mode}: message lacks the file: {e!r}", False
            results[mode] = None
    eager, lazy, verified = results["eager"], results["lazy"], results["verified"]
    loaded = eager is not None
    if (eager is None) != (lazy is None):
        return f"eager and lazy loads disagree: {[r is not None for r in results.values()]}", loaded
    if eager != lazy:
        return "eager and lazy loads returned different tensors", loaded
    if loaded and original and set(eager) != set(original):
        return f"loaded {len(eager)} tensors where the file holds {len(original)}", loaded
    if verified is not None:
        if eager is None:
            return "a verified load passed where an unverified one failed", loaded
        for k, v in verified.items():
            o = original.get(k)
            if o is not None and o[2:4] == v[2:4] and o[4] != v[4]:
                return f"tensor {k}: hash verification passed with other bytes", loaded
    if passphrase is None and rng.random() < 0.25:  # the CLI too, on a sample
        rc = _verify_cli(path, key_file)
        if rc == 2 and key_file is None and _says_encrypted(path):
            # A mutant whose header now says "encrypted" (version 3, or flag bit 0 from v4 on):
            # the CLI asks for a key (a usage error, exit 2), as the loads above refused it.
            if verified is not None:
                return "a verified load passed without a key to a file that says encrypted", loaded
            return None, loaded
        if rc not in (0, 1) or (verified is not None and rc != 0):
            return f"`tensorizer-rs verify` exited {rc} (the verified load passed)", loaded
    return None, loaded


def worker(out_dir: str, seeds: list, seed: int, per_seed: int) -> list:
    """Mutate each seed `[path, key file, passphrase]` `per_seed` times and check each mutant;
    return the counts, then the mutants that break the rules."""
    import resource
    import signal

    import torch  # noqa: F401 (imported before the limit and the alarms)
    from tensorizer_rs import TensorizerError  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(seed)
    bad, counts = [], {"ok": 0, "error": 0}
    for src, key_file, passphrase in seeds:
        data = Path(src).read_bytes()
        try:
            flds = fields(data)
        except ValueError:  # a hostile-name seed the reader refuses: blind mutations only
            flds = []
        key = Path(key_file).read_bytes() if key_file else None
        try:
            original = _read_all(src, key, passphrase, lazy=False, verify=True)
        except Exception:  # noqa: BLE001 - seeds with hostile names need not load
            original = {}
        for i in range(per_seed):
            mutated, did = mutate(data, flds, rng)
            path = os.path.join(out_dir, f"{Path(src).stem}-{seed}-{i}.tensors")
            Path(path).write_bytes(mutated)
            signal.setitimer(signal.ITIMER_REAL, _TIMEOUT_S)
            loaded = False
            try:
                problem, loaded = _check(path, key_file, passphrase, original, rng)
            except _Timeout:
                problem = f"no answer within {_TIMEOUT_S} s"
            except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
                problem = f"{type(e).__module__}.{e!r}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if problem is None:
                os.unlink(path)
                counts["ok" if loaded else "error"] += 1
            else:
                bad.append({"file": path, "mutations": did, "problem": problem[:400]})
    return [{"counts": counts}, *bad]


def test_corrupted_files_fail_cleanly(vectors_dir, tmp_path):
    seeds = _vectors(vectors_dir)
    assert len(seeds) >= 10 and any(key for _, key, _ in seeds), seeds
    gen = tmp_path / "seeds"
    gen.mkdir()
    seeds += _generated(gen)
    per_seed = int(os.environ.get("TENSORIZER_FUZZ_N", "300"))
    seed = int(os.environ.get("TENSORIZER_FUZZ_SEED", "20261128"))
    out = tmp_path / "mutants"
    out.mkdir()
    args = [sys.executable, __file__, str(out), str(seed), str(per_seed), json.dumps(seeds)]
    budget = max(600, per_seed * len(seeds))
    try:
        proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzz worker hung (seed {seed}): {e.stderr!s:.3000}")
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    counts, *bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not bad, f"seed {seed}: " + json.dumps(bad[:10], indent=1)
    total = counts["counts"]["ok"] + counts["counts"]["error"]
    assert total == per_seed * len(seeds)
    # The corruption reaches the parser (most mutants fail) but not only the first check (some
    # still load: changes the format leaves free, or data that only verification catches).
    assert counts["counts"]["error"] > total // 2, counts
    assert counts["counts"]["ok"] > total // 100, counts


def test_the_field_map_covers_every_integer_field(vectors_dir):
    """The mutations know every integer field: checked on a file with all of them."""
    data = (vectors_dir / "enc_random_v3.tensors").read_bytes()
    kinds = {f[2] for f in fields(data)}
    want = {"version", "flags", "count", "index_len", "name_len", "dim", "header_offset"}
    want |= {"data_offset", "data_length", "header_len", "module_idx", "hash_section_len"}
    want |= {"hash_count", "hash_type", "hash_len", "crypt_len", "chunk_count", "chunk_type"}
    want |= {"cipher_chunk", "mac_count"}
    assert want <= kinds, want - kinds
    v5 = {f[2] for f in fields((vectors_dir / "long_dim_v5.tensors").read_bytes())}
    assert "entry_version" in v5


if __name__ == "__main__":
    out_dir, seed, per_seed, seeds = sys.argv[1:]
    print(json.dumps(worker(out_dir, json.loads(seeds), int(seed), int(per_seed))))
