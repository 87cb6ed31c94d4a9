"""Our writer and reader together: every feature round-trips, files are atomic, and the index
grows past CoreWeave's fixed 256 KiB."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import lookup, tensor_bytes
from samples import Model, dtype_tensors, nested_state_dict
from tensorizer_rs import TensorDeserializer, TensorSerializer, _native


def _roundtrip(tmp_path, sd, **kw):
    path = str(tmp_path / "rt.tensors")
    with TensorSerializer(path) as s:
        s.write_state_dict(sd)
    return path, TensorDeserializer(path, device="cpu", verify_hash=True, **kw)


def test_every_dtype_roundtrips(tmp_path):
    sd = dtype_tensors()
    path, d = _roundtrip(tmp_path, sd)
    for k, t in sd.items():
        got = d[k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert tensor_bytes(got) == tensor_bytes(t), k
        assert isinstance(got, torch.nn.Parameter)
        assert got.requires_grad == (t.dtype.is_floating_point or t.dtype.is_complex)
    assert _native.TensorFile(path).version == 2  # opaque dtypes force v2


def test_nested_and_list_state_dicts(tmp_path):
    sd = nested_state_dict()
    _, d = _roundtrip(tmp_path, sd)
    assert list(d.keys()) == list(sd.keys())
    tree = d.tree()
    assert torch.equal(tree["model"]["layers"][1]["b"], torch.ones(1))
    assert isinstance(tree["grid"], list) and torch.equal(tree["grid"][1][0], sd["grid"][1][0])
    assert isinstance(d["model"], type(d["model"]))
    assert torch.equal(lookup(d, ("model", "layers", 0, "w")), sd["model"]["layers"][0]["w"])
    _, lst = _roundtrip(tmp_path, [torch.ones(1), torch.zeros(2)])
    assert list(lst.keys()) == [0, 1]


def test_meta_empty_and_long_tensors(tmp_path):
    sd = {
        "meta": torch.empty(3, 4, device="meta"),
        "meta_bf16": torch.empty(2, device="meta", dtype=torch.bfloat16),
        "meta_scalar": torch.empty((), device="meta", dtype=torch.int64),
        "empty_bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "long": torch.empty(1 << 32, 0),
    }
    path, d = _roundtrip(tmp_path, sd)
    assert torch.equal(d["meta"], torch.zeros(3, 4))
    assert torch.equal(d["meta_bf16"], torch.zeros(2, dtype=torch.bfloat16))
    assert d["meta_scalar"].shape == () and d["meta_scalar"].item() == 0
    assert d["empty_bf16"].shape == (0, 4)
    assert d["long"].shape == (1 << 32, 0)
    f = _native.TensorFile(path)
    assert (f.version, f.flags) == (5, 2)


def test_module_roundtrip_and_load_into_module(tmp_path):
    m = Model()
    path = str(tmp_path / "m.tensors")
    with TensorSerializer(path) as s:
        s.write_module(m)
    names = list(TensorDeserializer(path, device="cpu", lazy_load=True).keys())
    assert names[:3] == [".scale", ".gate", ".running"]
    assert "blocks.0.scratch" in names  # non-persistent buffers are included by default
    fresh = Model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    gate = fresh.gate
    gate.custom_attr = "kept"
    n = TensorDeserializer(path, device="cpu").load_into_module(fresh)
    assert n == len(names)
    for (k, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert fresh.gate.custom_attr == "kept"

    persistent = str(tmp_path / "p.tensors")
    with TensorSerializer(persistent) as s:
        s.write_module(m, include_non_persistent_buffers=False)
    keys = list(TensorDeserializer(persistent, device="cpu", lazy_load=True).keys())
    assert ".running" in keys and "blocks.0.scratch" not in keys


def test_load_into_module_errors(tmp_path):
    path = str(tmp_path / "m.tensors")
    with TensorSerializer(path) as s:
        s.write_module(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="does not match"):
        TensorDeserializer(path, device="cpu").load_into_module(torch.nn.Linear(4, 2))
    nested = str(tmp_path / "n.tensors")
    with TensorSerializer(nested) as s:
        s.write_module(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(KeyError, match="module '0' not found"):
        TensorDeserializer(nested, device="cpu").load_into_module(torch.nn.Linear(3, 2))
    sd = str(tmp_path / "sd.tensors")
    with TensorSerializer(sd) as s:
        s.write_state_dict({"w": torch.ones(1)})
    with pytest.raises(NotImplementedError):
        TensorDeserializer(sd, device="cpu").load_into_module(torch.nn.Linear(1, 1))


def test_mapping_filter_lazy_and_read_tensors(tmp_path):
    sd = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(6)}
    path, _ = _roundtrip(tmp_path, sd)
    d = TensorDeserializer(path, device="cpu", lazy_load=True, filter_func=lambda n: n != "t2")
    assert "t0" in d and "missing" not in d and "t2" not in d
    assert list(d.keys()) == ["t0", "t1", "t3", "t4", "t5"]
    with pytest.raises(KeyError, match="Tensor missing not found"):
        d["missing"]
    first = list(d.read_tensors(num_tensors=2))
    assert [x[2] for x in first] == ["t0", "t1"]
    rest = list(d.read_tensors())
    assert [x[2] for x in rest] == ["t3", "t4", "t5"]
    arrays = list(TensorDeserializer(path, device="cpu", lazy_load=True).read_numpy_arrays())
    assert isinstance(arrays[0][3], np.ndarray) and arrays[0][4] is False
    eager = TensorDeserializer(path, device="cpu")
    assert list(eager.read_tensors()) == []  # eager loads already consumed the file


def test_dtype_cast_rules(tmp_path):
    sd = {
        "f": torch.ones(2),
        "i": torch.arange(2),
        "b": torch.tensor([True]),
        "c": torch.ones(1, dtype=torch.complex64),
    }
    _, d = _roundtrip(tmp_path, sd, dtype=torch.bfloat16)
    assert d["f"].dtype == torch.bfloat16 and d["i"].dtype == torch.bfloat16
    assert d["b"].dtype == torch.bool and d["c"].dtype == torch.complex64
    assert d["i"].requires_grad is False


def test_numpy_inputs_and_file_objects(tmp_path):
    buf = io.BytesIO()
    s = TensorSerializer(buf)
    s.write_state_dict({"a": np.arange(6, dtype=np.int16).reshape(2, 3)})
    s.close()
    assert buf.closed  # CoreWeave closes the file object too
    path = tmp_path / "f.tensors"
    with open(path, "wb+") as f:
        s = TensorSerializer(f)
        s.write_tensor(0, "x", 2, torch.ones(3))
        s.close()
    with open(path, "rb") as f:
        assert torch.equal(TensorDeserializer(f, device="cpu")["x"], torch.ones(3))
    raw = io.BytesIO(path.read_bytes())
    assert torch.equal(TensorDeserializer(raw, device="cpu")["x"], torch.ones(3))


def test_many_tensors_grow_the_index(tmp_path):
    sd = {
        f"model.layers.{i}.mlp.experts.{i % 64}.down_proj.weight": torch.full((2,), float(i))
        for i in range(7000)
    }
    path, d = _roundtrip(tmp_path, sd)
    f = _native.TensorFile(path)
    assert f.index_len > 262144
    assert len(d) == 7000 and d["model.layers.6999.mlp.experts.23.down_proj.weight"][0] == 6999


def test_writer_refuses_duplicates_and_leaves_nothing(tmp_path):
    dest = tmp_path / "dup.tensors"
    s = TensorSerializer(str(dest))
    s.write_tensor(0, "x", 2, torch.ones(1))
    with pytest.raises(ValueError, match="Conflicting tensor paths"):
        s.write_tensor(0, "x", 2, torch.ones(1))
    assert not dest.exists()


def test_objects_alive_at_interpreter_exit_finalize_quietly(tmp_path):
    """Was: "Exception ignored in ... __del__ ... 'NoneType' object has no attribute 'suppress'"
    at exit, when the module's globals (contextlib) were cleared before the objects went."""
    script = f"""
import torch
from tensorizer_rs import serialization
s = serialization.TensorSerializer({str(tmp_path / "m.tensors")!r})
s.write_state_dict({{"a": torch.arange(4.0)}})
s.close()
d = serialization.TensorDeserializer({str(tmp_path / "m.tensors")!r}, device="cpu")
lazy = serialization.TensorDeserializer({str(tmp_path / "m.tensors")!r}, device="cpu",
                                        lazy_load=True)
unclosed = serialization.TensorSerializer({str(tmp_path / "never.tensors")!r})
unclosed.write_state_dict({{"a": torch.ones(2)}})
print("done")
"""
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0 and p.stdout == "done\n", p.stderr
    assert "Exception ignored" not in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.tensors"]
