"""Cross-checks against CoreWeave's real tensorizer (2.12.1 and 2.10.1), run in subprocesses:
it reads our files with verify_hash=True and gets identical tensors, our writer produces
byte-identical files for the same input, and files it writes now load in ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_coreweave
from helpers import sha256
from samples import Model, dtype_tensors, nested_state_dict
from tensorizer_rs import TensorDeserializer, TensorSerializer

pytestmark = pytest.mark.crosscheck
TESTS = str(Path(__file__).parent)

# Reads a file with CoreWeave's deserializer and prints {repr(path): [dtype, shape, sha256]}.
READ = r"""
import hashlib, json, sys, torch
from tensorizer import TensorDeserializer
def raw(t):
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
out = {}
def walk(node, path):
    if isinstance(node, torch.Tensor):
        out[repr(path)] = [str(node.dtype), list(node.shape), hashlib.sha256(raw(node)).hexdigest()]
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node): walk(v, path + (i,))
    else:
        for k, v in node.items(): walk(v, path + (k,))
d = TensorDeserializer(sys.argv[1], device="cpu", verify_hash=True)
walk(d.tree(), ())
print("RESULT" + json.dumps(out))
"""


def ours(path: str) -> dict:
    d = TensorDeserializer(path, device="cpu", verify_hash=True)
    out = {}

    def walk(node, p):
        if isinstance(node, torch.Tensor):
            out[repr(p)] = [str(node.dtype), list(node.shape), sha256(node)]
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, p + (i,))
        else:
            for k, v in node.items():
                walk(v, p + (k,))

    walk(d.tree(), ())
    return out


def coreweave_reads(version: str, path: str) -> dict:
    proc = run_coreweave(version, READ, path)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _write(path, fn):
    with TensorSerializer(str(path)) as s:
        fn(s)
    return str(path)


@pytest.mark.parametrize("version", ["2.12.1", "2.10.1"])
def test_coreweave_reads_our_files(tmp_path, version):
    sd = dtype_tensors()
    sd.update(
        {
            "meta": torch.empty(2, 3, device="meta"),
            "meta_scalar": torch.empty((), device="meta"),
            "meta_bf16": torch.empty(4, device="meta", dtype=torch.bfloat16),
            "empty_bf16": torch.empty(0, dtype=torch.bfloat16),
        }
    )
    files = [
        _write(tmp_path / "dtypes.tensors", lambda s: s.write_state_dict(sd)),
        _write(tmp_path / "nested.tensors", lambda s: s.write_state_dict(nested_state_dict())),
        _write(tmp_path / "module.tensors", lambda s: s.write_module(Model())),
    ]
    for f in files:
        assert coreweave_reads(version, f) == ours(f), f


def test_coreweave_reads_long_dims_and_big_indexes(tmp_path):
    # 7000 entries overflow CoreWeave's own fixed 256 KiB index; its reader accepts ours.
    many = {f"model.layers.{i}.experts.{i % 64}.w": torch.full((2,), float(i)) for i in range(7000)}
    many["long"] = torch.empty(1 << 32, 0)
    f = _write(tmp_path / "many.tensors", lambda s: s.write_state_dict(many))
    assert coreweave_reads("2.12.1", f) == ours(f)


WRITE = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from samples import Model, dtype_tensors, nested_state_dict
from tensorizer import TensorSerializer
s = TensorSerializer(sys.argv[1] + ".sd"); s.write_state_dict(dtype_tensors()); s.close()
s = TensorSerializer(sys.argv[1] + ".nested"); s.write_state_dict(nested_state_dict()); s.close()
m = Model(); m.marker = torch.nn.Parameter(torch.tensor((1,), device="meta"), requires_grad=False)
s = TensorSerializer(sys.argv[1] + ".module"); s.write_module(m); s.close()
"""


@pytest.mark.parametrize("version", ["2.12.1", "2.10.1"])
def test_byte_identical_to_coreweave_and_loads_its_files(tmp_path, version):
    theirs = str(tmp_path / "cw")
    run_coreweave(version, WRITE, theirs, TESTS)
    mine = str(tmp_path / "rs")
    _write(mine + ".sd", lambda s: s.write_state_dict(dtype_tensors()))
    _write(mine + ".nested", lambda s: s.write_state_dict(nested_state_dict()))
    m = Model()
    m.marker = torch.nn.Parameter(torch.tensor((1,), device="meta"), requires_grad=False)
    _write(mine + ".module", lambda s: s.write_module(m))
    for ext in (".sd", ".nested", ".module"):
        assert Path(theirs + ext).read_bytes() == Path(mine + ext).read_bytes(), ext
        assert ours(theirs + ext) == coreweave_reads(version, theirs + ext), ext
