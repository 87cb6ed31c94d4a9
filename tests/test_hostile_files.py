"""Hostile files (issue 24): each made by the test, each must fail cleanly or load correctly,
in work and memory linear in the file's size, never a partial model."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import run_coreweave
from tensorizer_rs import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorizerFormatError,
    TensorSerializer,
    _native,
)

DEEP = 32_000


def _run(code: str, *args, timeout: float = 120, limit_as: int | None = None):
    """`code` in a fresh interpreter (with this checkout's package), optionally under an
    address-space limit; returns the CompletedProcess."""
    pre = ""
    if limit_as:
        pre = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_as}, {limit_as}))\n"
    return subprocess.run(
        [sys.executable, "-c", pre + textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------------------------- 1: deep names
@pytest.fixture(scope="module")
def deep_file(tmp_path_factory):
    """One tensor whose structured name has 32,000 components (`\\x1e[0,0,...,0]`), written
    through write_state_dict (a 32,000-deep nest of lists: no recursion limit may bite)."""
    path = tmp_path_factory.mktemp("deep") / "deep.tensors"
    sd: list = [torch.arange(4, dtype=torch.float32)]
    for _ in range(DEEP - 1):
        sd = [sd]
    with TensorSerializer(str(path)) as s:
        s.write_state_dict(sd)
    name = _native.TensorFile(str(path)).entries()[0]["name_bytes"]
    assert name == b"\x1e[" + b",".join([b"0"] * DEEP) + b"]"
    return path


def test_deep_name_opens_in_linear_time_and_memory(deep_file):
    """Was 31 s and 11.7 GB of RSS (every path prefix copied): now the open adds a few MiB."""
    code = """
        import json, resource, sys, time
        import torch
        from tensorizer_rs import TensorDeserializer
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        d = TensorDeserializer(sys.argv[1], device="cpu")
        node, depth = d[0], 1
        while not hasattr(node, "numel"):
            node, depth = node[0], depth + 1
        tree = d.tree()
        for _ in range(depth):
            tree = tree[0]
        took = time.perf_counter() - t0
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps([depth, node.tolist(), tree.tolist(), took, grew]))
    """
    proc = _run(code, deep_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    depth, node, tree, took, grew_mib = json.loads(proc.stdout)
    assert depth == DEEP and node == tree == [0.0, 1.0, 2.0, 3.0]
    # A generous guard against the quadratic cost; docs/format.md has the measured figures.
    assert took < 20 and grew_mib < 256, (took, grew_mib)


def test_deep_name_verifies_under_a_memory_limit(deep_file):
    """`tensorizer-rs verify` under a 1 GiB address-space limit (was: SIGABRT at 4 GiB)."""
    proc = _run(
        "import sys; from tensorizer_rs.cli import main; sys.exit(main(['verify', sys.argv[1]]))",
        deep_file,
        limit_as=1 << 30,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK: 1 tensors" in proc.stdout


def test_deep_name_is_a_real_coreweave_file(deep_file):
    out = run_coreweave(
        "2.12.1",
        "import sys; from tensorizer import TensorDeserializer as D\n"
        "d = D(sys.argv[1], device='cpu'); n = d[0]\n"
        "k = 1\n"
        "while not hasattr(n, 'numel'):\n    n = n[0]; k += 1\n"
        "print(k, n.tolist())",
        deep_file,
    )
    assert out.stdout.split()[0] == str(DEEP)


def test_deeply_nested_state_dict_round_trips(tmp_path):
    """A 500-deep nest of dicts and lists: write_state_dict, d[...] and tree() (was:
    RecursionError in tree())."""
    sd: dict = {}
    node: dict = sd
    for i in range(250):
        node["k"] = [{}]
        node = node["k"][0]
    node["w"] = torch.ones(2)
    path = tmp_path / "nested.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_state_dict(sd)
    d = TensorDeserializer(str(path), device="cpu")
    tree = d.tree()
    sub = d["k"]
    for _ in range(250):
        tree = tree["k"][0]
        sub = sub[0]
        sub = sub.get("k", sub)
    assert tree["w"].tolist() == [1.0, 1.0]
    assert sub["w"].tolist() == [1.0, 1.0]
    assert d.tree(default="none", filter_func=lambda p: False) == "none"


# ----------------------------------------------------------------------------- 4: count vs index
@pytest.fixture
def four(tmp_path):
    path = tmp_path / "four.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_state_dict({f"t{i}": torch.full((4,), float(i)) for i in range(4)})
    return path


def _entry_len(e: dict) -> int:
    return 2 + len(e["name_bytes"]) + 1 + 1 + len(e["dtype"]) + 1 + 4 * len(e["shape"]) + 24


def _with(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def test_lowered_tensor_count_is_an_error(four, tmp_path):
    """Was: the first two tensors loaded without complaint (eager and lazy)."""
    low = _with(
        four, tmp_path / "low.tensors", lambda d: d.__setitem__(slice(57, 65), struct.pack("<Q", 2))
    )
    for lazy in (False, True):
        with pytest.raises(TensorizerFormatError, match="more than the header's 2 tensors") as e:
            TensorDeserializer(str(low), device="cpu", lazy_load=lazy)
        assert "low.tensors" in str(e.value)


def test_data_past_the_last_listed_tensor_is_an_error(four, tmp_path):
    """The count lowered and the entries after it wiped: the records are still there."""
    entries = _native.TensorFile(str(four)).entries()
    used = 73 + sum(_entry_len(e) for e in entries[:2])

    def edit(d):
        d[57:65] = struct.pack("<Q", 2)
        d[used : entries[0]["header_offset"]] = bytes(entries[0]["header_offset"] - used)

    wiped = _with(four, tmp_path / "wiped.tensors", edit)
    with pytest.raises(TensorizerFormatError, match="follow the last tensor"):
        TensorDeserializer(str(wiped), device="cpu")
    junk = _with(four, tmp_path / "junk.tensors", lambda d: d.extend(b"\x01" * 100))
    with pytest.raises(TensorizerFormatError, match="108 bytes follow the last tensor"):
        TensorDeserializer(str(junk), device="cpu")


def test_zero_padding_after_the_terminator_loads(four, tmp_path):
    padded = _with(four, tmp_path / "padded.tensors", lambda d: d.extend(bytes(4096)))
    d = TensorDeserializer(str(padded), device="cpu")
    assert [d[f"t{i}"].tolist() for i in range(4)] == [[float(i)] * 4 for i in range(4)]
    bare = _with(four, tmp_path / "bare.tensors", lambda d: d.__delitem__(slice(-8, None)))
    assert len(TensorDeserializer(str(bare), device="cpu")) == 4


def test_records_sharing_or_skipping_bytes_are_errors(four, tmp_path):
    entries = _native.TensorFile(str(four)).entries()
    # Entry 1 pointed at entry 0's record: names differ, but the layout check says so first.
    at = 73 + _entry_len(entries[0]) + _entry_len(entries[1]) - 24
    rec = struct.pack("<QQQ", entries[0]["header_offset"], entries[0]["data_offset"], 16)
    shared = _with(
        four, tmp_path / "shared.tensors", lambda d: d.__setitem__(slice(at, at + 24), rec)
    )
    with pytest.raises(TensorizerFormatError, match="overlapping records"):
        TensorDeserializer(str(shared), device="cpu")


# ----------------------------------------------------------------------------- 2: KDF bounds
FAST = {"opslimit": EncryptionParams.OpsLimit.MIN, "memlimit": EncryptionParams.MemLimit.MIN}


@pytest.fixture(scope="module")
def pw_file(tmp_path_factory):
    """A passphrase-encrypted file with the cheapest KDF parameters, and its salt."""
    path = tmp_path_factory.mktemp("kdf") / "pw.tensors"
    enc = EncryptionParams.from_string("hunter2", **FAST)
    with TensorSerializer(str(path), encryption=enc) as s:
        s.write_state_dict({"a": torch.arange(6.0), "b": torch.ones(3)})
    return path, enc.salt


def kdf_patched(src: tuple, dst: Path, opslimit: int, memlimit: int) -> Path:
    """`src` with every tensor's stored KDF parameters replaced (the crypt info is outside
    the hashes, so nothing else notices)."""
    path, salt = src
    old = struct.pack("<HHQQiH", 1, 1, 1, 8192, 2, 16) + salt
    new = struct.pack("<HHQQiH", 1, 1, opslimit, memlimit, 2, 16) + salt
    data = path.read_bytes()
    assert data.count(old) == 2
    dst.write_bytes(data.replace(old, new))
    return dst


@pytest.mark.parametrize(
    ("opslimit", "memlimit", "what"),
    [
        (2**32 - 1, 8192, "opslimit 4294967295 is above the bound"),
        (16_777_217, 1 << 30, "opslimit 16777217 is above the bound"),
        (1, 1 << 40, "memlimit 1099511627776 bytes is above the bound"),
    ],
)
def test_kdf_parameters_from_the_file_are_bounded(pw_file, tmp_path, opslimit, memlimit, what):
    """Was: the derivation ran for longer than anyone waits. Now refused before it starts,
    naming the file, the tensor and the parameter."""
    bad = kdf_patched(pw_file, tmp_path / "kdf.tensors", opslimit, memlimit)
    t0 = time.monotonic()
    with pytest.raises(CryptographyError, match=what) as e:
        TensorDeserializer(
            str(bad), device="cpu", encryption=DecryptionParams.from_string("hunter2")
        )
    assert time.monotonic() - t0 < 5
    assert "kdf.tensors" in str(e.value) and "tensor 'a'" in str(e.value)
    assert "max_opslimit" in str(e.value)


def test_kdf_bounds_come_from_decryption_params(pw_file):
    path = str(pw_file[0])
    tight = DecryptionParams.from_string("hunter2", max_opslimit=1, max_memlimit=4096)
    with pytest.raises(CryptographyError, match="memlimit 8192 bytes is above the bound of 4096"):
        TensorDeserializer(path, device="cpu", encryption=tight)
    exact = DecryptionParams.from_string("hunter2", max_opslimit=1, max_memlimit=8192)
    assert TensorDeserializer(path, device="cpu", encryption=exact)["a"].tolist() == list(
        map(float, range(6))
    )
    with pytest.raises(TypeError):
        DecryptionParams.from_string("hunter2", max_opslimit="4")
    with pytest.raises(ValueError):
        DecryptionParams.from_string("hunter2", max_memlimit=0)


# ----------------------------------------------------------------------------- 8: exceptions
def test_a_full_tmpdir_while_spilling_a_stream_is_a_tensorizer_error(four):
    """Was a bare OSError. A file-size limit makes every write past 1 MiB fail as on a full disk."""
    code = """
        import io, resource, signal, sys
        import torch
        from tensorizer_rs import TensorDeserializer, TensorizerIOError
        data = open(sys.argv[1], "rb").read() + bytes(2 << 20)  # spill more than the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            TensorDeserializer(io.BytesIO(data), device="cpu")
        except TensorizerIOError as e:
            print(isinstance(e, OSError), e)
    """
    proc = _run(code, four)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("True cannot spill the stream to a temporary file"), proc.stdout


def test_load_into_module_of_a_state_dict_file(four):
    from tensorizer_rs import TensorizerNotImplementedError

    d = TensorDeserializer(str(four), device="cpu", lazy_load=True)
    with pytest.raises(TensorizerNotImplementedError) as e:
        d.load_into_module(torch.nn.Linear(2, 2))
    assert isinstance(e.value, NotImplementedError)


def test_exception_classes_keep_coreweaves_builtin_bases():
    """Each class CoreWeave 2.12.1 raises, found by introspection: ours of the same name derive
    from the same builtin exceptions (and from TensorizerError)."""
    import builtins

    import tensorizer_rs

    script = (
        "import builtins, inspect, json\n"
        "import tensorizer.serialization as s\n"
        "out = {}\n"
        "for scope in (vars(s), vars(s._FileHeader)):\n"
        "    for name, c in scope.items():\n"
        "        if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__.startswith('tensorizer'):\n"
        "            out[name] = sorted({b.__name__ for b in c.__mro__ if getattr(builtins, b.__name__, None) is b})\n"
        "print(json.dumps(out))"
    )
    theirs = json.loads(run_coreweave("2.12.1", script).stdout.splitlines()[-1])
    assert {"HashMismatchError", "CryptographyError", "InvalidVersionError"} <= set(theirs)
    for name, bases in theirs.items():
        ours = getattr(tensorizer_rs, name)
        assert issubclass(ours, tensorizer_rs.TensorizerError), name
        for b in bases:
            assert issubclass(ours, getattr(builtins, b)), (name, b)
