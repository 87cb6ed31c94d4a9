"""Hostile files (issue 24): each made by the test, each must fail cleanly or load correctly,
in work and memory linear in the file's size, never a partial model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_coreweave
from tensorizer_rs import (
    TensorDeserializer,
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
