"""API mistakes a new user makes: each is a TensorizerError that names the argument or file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import run_coreweave
from tensorizer_rs import TensorDeserializer, TensorizerError, TensorSerializer


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_module(torch.nn.Sequential(torch.nn.Linear(4, 2)))  # "0.weight", "0.bias"
    return path


@pytest.mark.parametrize("device", ["bogus", "cpu:x", 3.5])
def test_bad_device_names_the_argument(small, device):
    with pytest.raises(TensorizerError, match=r"device=") as e:
        TensorDeserializer(str(small), device=device)
    # Code written against CoreWeave's tensorizer catches torch's RuntimeError here.
    assert isinstance(e.value, RuntimeError)


def test_load_into_module_errors_name_the_file(small):
    other = torch.nn.Linear(4, 2)  # has no submodule "0"
    with pytest.raises(TensorizerError) as e:
        TensorDeserializer(str(small), device="cpu").load_into_module(other)
    assert str(e.value).startswith(f"{small}: tensor "), str(e.value)
    assert "<closed>" not in str(e.value)


def test_missing_torch_names_the_extra(small):
    # A process where `import torch` fails as it does where torch is not installed.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tensorizer_rs\n"
        "try:\n"
        f"    tensorizer_rs.TensorDeserializer({str(small)!r})\n"
        "except tensorizer_rs.TensorizerError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "tensorizer-rs[torch]" in out and "PyTorch is not installed" in out, out


@pytest.mark.crosscheck
def test_serializer_creates_missing_directories_like_coreweave(tmp_path):
    # CoreWeave's open_stream makes the parent directories of a local file it writes (2.10.1
    # and 2.12.1 alike); a script that relies on it must work here too.
    ours = tmp_path / "ours" / "a" / "b" / "x.tensors"
    with TensorSerializer(str(ours)) as s:
        s.write_state_dict({"t": torch.ones(3)})
    assert ours.is_file()
    theirs = tmp_path / "theirs" / "a" / "b" / "x.tensors"
    run_coreweave(
        "2.12.1",
        "import sys, torch, tensorizer\n"
        "s = tensorizer.TensorSerializer(sys.argv[1])\n"
        "s.write_state_dict({'t': torch.ones(3)}); s.close()\n",
        theirs,
    )
    assert theirs.read_bytes() == ours.read_bytes()


def test_bad_arguments_raise_what_coreweave_raises(small, tmp_path):
    """The exception classes of tensorizer 2.12.1 for the same mistakes (checked against it
    by hand, 2026-12-08), each also a TensorizerError: num_readers not an int: TypeError, below
    1: ValueError (was: TypeError for both); a str dtype: TypeError (was: torch's "Invalid
    device string"); a text-mode file object: ValueError (was: read or written by its name);
    a directory: OSError (was: ValueError)."""
    cases = [
        (TypeError, {"num_readers": "2"}),
        (ValueError, {"num_readers": 0}),
        (ValueError, {"num_readers": -1}),
        (TypeError, {"dtype": "float16"}),
    ]
    for cls, kw in cases:
        with pytest.raises(cls) as e:
            TensorDeserializer(str(small), device="cpu", **kw)
        other = TypeError if cls is ValueError else ValueError
        assert isinstance(e.value, TensorizerError), (kw, e.value)
        assert not isinstance(e.value, other), (kw, e.value)
    assert len(TensorDeserializer(str(small), device="cpu", num_readers=True)) == 2
    with open(small) as text, pytest.raises(ValueError, match="binary mode"):
        TensorDeserializer(text, device="cpu")
    with open(tmp_path / "t.tensors", "w+") as text, pytest.raises(ValueError, match="binary"):
        TensorSerializer(text)
    for make in (
        lambda: TensorDeserializer(str(tmp_path), device="cpu"),
        lambda: TensorSerializer(str(tmp_path)),
    ):
        with pytest.raises(OSError, match="is a directory"):
            make()
